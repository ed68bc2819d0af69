//! The bank group with its journal on NATS JetStream: on the local server (a journal
//! prefix of its own per run, deleted after) with the proxy killed under load and
//! restarted, and on a 3-node cluster started by the test (its streams at 3 replicas) with
//! one node stopped under load. Nothing acknowledged is lost, nothing is applied twice,
//! every copy is identical.

#![allow(clippy::unwrap_used)]

mod support;

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use regroup_replay::{Log, RecordState};
use support::nats::{Cluster, LOCAL_URL, TempJournal, local_or_skip};
use support::*;

/// `log` without the lines of updates that timed out waiting for an earlier one (they
/// repeat; what held the earlier one up is in the other lines).
fn without_waits(log: &str) -> String {
    log.lines()
        .filter(|l| !l.contains("timed out waiting for earlier updates"))
        .collect::<Vec<_>>()
        .join("\n")
}

/// The journal in NATS holds exactly the group's records, dense and every one sealed.
async fn assert_journal_sealed(journal: &TempJournal, head: u64) {
    let j = journal.open().await;
    let records = j.read_after("bank", 0, u64::MAX).await.unwrap();
    let seqs: Vec<u64> = records.iter().map(|r| r.seq).collect();
    assert_eq!(seqs, (1..=head).collect::<Vec<_>>(), "the journal's seqs");
    let unsealed: Vec<(u64, RecordState)> = records
        .iter()
        .filter(|r| !r.state.is_sealed())
        .map(|r| (r.seq, r.state))
        .collect();
    assert!(unsealed.is_empty(), "unsealed records: {unsealed:?}");
}

/// At most one copy of each transfer: the transfers stored are the acknowledged ones plus
/// at most one per request that was cut off without an answer.
fn assert_applied_once(report: &LoadReport, cut_off: usize, transfers: &[serde_json::Value]) {
    assert!(
        transfers.len() <= report.acked_transfers.len() + cut_off,
        "{} transfers stored for {} acknowledged and {cut_off} cut off",
        transfers.len(),
        report.acked_transfers.len()
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn proxy_killed_under_load_on_a_nats_journal_loses_nothing() {
    if !local_or_skip().await {
        return;
    }
    // Declared before the group, so dropped after it: the proxy is gone first.
    let journal = TempJournal::new(LOCAL_URL);
    let mut g = BankGroup::start(3, Some(&journal.url()), "").await;
    let mut report = LoadReport::default();
    let seeds = seed_accounts(&g, 6, &mut report).await;

    let load = {
        let g = &g;
        let seeds = &seeds;
        let load = run_load(g, seeds, 16, 100_000, true, "nats-killed");
        let killer = async {
            tokio::time::sleep(Duration::from_millis(1500)).await;
            g.proxy.child_pid()
        };
        tokio::pin!(load);
        tokio::select! {
            r = &mut load => panic!("load ended before the kill: {:?}", r.statuses),
            pid = killer => {
                support::sigkill(pid);
                load.await
            }
        }
    };
    assert!(
        load.count(201) > 20,
        "too little load before the kill: {:?}",
        load.statuses
    );
    let cut_off = load.errors.len();
    merge(&mut report, load);

    g.proxy.restart().await;
    eventually("no record in doubt", Duration::from_secs(30), || async {
        let d = g.proxy.status(&g.http).await;
        let group = &d.groups[0];
        if group.in_doubt.is_empty() {
            Ok(())
        } else {
            Err(format!("{group:?}"))
        }
    })
    .await;
    let after = run_load(&g, &seeds, 8, 60, false, "nats-after").await;
    assert_no_failed_request(&after);
    merge(&mut report, after);

    let doc = g.wait_converged(Duration::from_secs(90)).await;
    let (accounts, transfers) = g.assert_identical().await;
    assert_bank_invariants(&report, &accounts, &transfers);
    assert_applied_once(&report, cut_off, &transfers);
    assert!(!g.dir.path().join("journal.db").exists());
    assert_journal_sealed(&journal, doc.groups[0].head).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_nats_node_stopped_under_load_loses_nothing() {
    // The cluster is the test's own (nats-server is installed when missing): no skip.
    let mut cluster = Cluster::start().await;
    let journal = TempJournal::new(&cluster.url());
    let g = BankGroup::start(3, Some(&journal.url()), "").await;
    let mut report = LoadReport::default();
    let seeds = seed_accounts(&g, 6, &mut report).await;
    let (replicas, leader) = journal.open().await.stream_placement("bank").await.unwrap();
    assert_eq!(
        replicas, 3,
        "the group's stream is replicated on every node"
    );
    // The node that leads the group's stream is the one stopped.
    let victim = cluster
        .nodes
        .iter()
        .position(|n| leader.as_deref() == Some(n.name.as_str()))
        .unwrap_or_else(|| panic!("the stream's leader {leader:?} is none of the nodes"));

    let stop = Arc::new(AtomicBool::new(false));
    let target = g.target();
    let load = run_load_until(
        &target,
        &seeds,
        8,
        usize::MAX,
        true,
        "nats-node",
        Some(stop.clone()),
    );
    let chaos = async {
        wait_for_head(&target, 6 + 40).await;
        cluster.kill(victim).await;
        let stopped_at = target.status().await.groups[0].head;
        // The group goes on with two of three nodes.
        let gone_on = try_wait_for_head(&target, stopped_at + 40, Duration::from_secs(120)).await;
        stop.store(true, Ordering::Relaxed);
        if let Err(e) = gone_on {
            panic!(
                "with node {victim} stopped at head {stopped_at}: {e}\n--- the proxy's log ---\n{}\n{}",
                tail(&without_waits(&g.proxy.log()), 120),
                cluster.logs()
            );
        }
    };
    let (load, ()) = tokio::join!(load, chaos);
    let cut_off = load.errors.len();
    let answered_5xx: u64 = load
        .statuses
        .iter()
        .filter(|(s, _)| **s >= 500)
        .map(|(_, n)| n)
        .sum();
    eprintln!(
        "with a node stopped: {:?}, {cut_off} without an answer, {answered_5xx} 5xx",
        load.statuses
    );
    merge(&mut report, load);

    // The remaining two nodes may still be electing leaders for the journal's buckets (a
    // few 503s, nothing lost): once updates pass again in a row, none may fail.
    let mut in_a_row = 0;
    let started = std::time::Instant::now();
    let mut probe = 0;
    while in_a_row < 5 {
        assert!(
            started.elapsed() < Duration::from_secs(60),
            "updates did not pass again on the two remaining nodes"
        );
        probe += 1;
        let name = format!("steady-{probe}");
        // Requested, whether or not it is answered (an unanswered one may exist).
        report.initial_balance.insert(name.clone(), 0);
        let a = g
            .post("/accounts", serde_json::json!({"name": name, "balance": 0}))
            .await;
        match a {
            Ok(a) if a.status == 201 => {
                in_a_row += 1;
                report.acked_accounts.push(a.json().unwrap());
            }
            _ => {
                in_a_row = 0;
                tokio::time::sleep(Duration::from_millis(200)).await;
            }
        }
    }
    let after = run_load(&g, &seeds, 8, 40, false, "nats-node-after").await;
    assert_no_failed_request(&after);
    merge(&mut report, after);

    let doc = g.wait_converged(Duration::from_secs(90)).await;
    let (accounts, transfers) = g.assert_identical().await;
    assert_bank_invariants(&report, &accounts, &transfers);
    assert_applied_once(&report, cut_off + answered_5xx as usize, &transfers);
    assert_journal_sealed(&journal, doc.groups[0].head).await;
    drop(g);
    drop(journal);
    drop(cluster);
}

/// Truncation purges the group's stream below the first record kept: the stream's entry
/// count stays bounded however many records were written, and a handle opened afterwards,
/// and one that had read only the start of the stream, see the same log, role, membership
/// and low water as the handle that truncated; the fence still holds.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn truncation_purges_the_stream_and_reopening_gives_the_same_state() {
    use regroup_replay::{Lease, MemberSpec, Membership, Outcome, Owner, Record, RoleStore};
    if !local_or_skip().await {
        return;
    }
    let journal = TempJournal::new(LOCAL_URL);
    let g = "bank";
    let writer = journal.open().await;
    writer
        .claim(
            &Owner {
                id: "writer".into(),
                describe: "the writer".into(),
            },
            Duration::from_secs(60),
        )
        .await
        .unwrap();
    let request = |seq: u64| regroup_replay::RecordedRequest {
        method: "POST".into(),
        uri: "/transfers".into(),
        headers: Vec::new(),
        body: bytes::Bytes::from(format!("{{\"seq\":{seq}}}")),
    };
    let role = writer.role(g, "a").await.unwrap();
    let members = |n: usize| {
        ["a", "b", "c"][..n]
            .iter()
            .map(|name| MemberSpec {
                name: (*name).into(),
                url: format!("http://127.0.0.1:1/{name}"),
                host: None,
                priority: 0,
            })
            .collect::<Vec<_>>()
    };
    let version = writer.set_members(g, 0, &members(3)).await.unwrap();
    // A handle that reads the first records only, then nothing until after the purge.
    let behind = journal.open().await;
    let mut kept_per_round = Vec::new();
    let mut head = 0;
    for round in 0..3u64 {
        for _ in 0..40 {
            head += 1;
            writer
                .append(&Record::pending(g, head, role.epoch, request(head)))
                .await
                .unwrap();
            writer
                .seal(g, head, &Outcome::Executed(None))
                .await
                .unwrap();
        }
        if round == 0 {
            assert_eq!(behind.low_water(g).await.unwrap(), 0);
            assert_eq!(
                behind.read_after(g, 0, u64::MAX).await.unwrap().len() as u64,
                head
            );
        }
        if round == 1 {
            // A role change and a membership change before the truncation.
            writer
                .set_role(
                    g,
                    role.epoch,
                    &regroup_replay::StoredRole {
                        epoch: role.epoch + 1,
                        primary: "b".into(),
                    },
                )
                .await
                .unwrap();
            writer.set_members(g, version, &members(2)).await.unwrap();
        }
        // Keep the last 5 records.
        let removed = writer.truncate(g, head - 5).await.unwrap();
        assert!(removed > 0);
        let (messages, first) = writer.stream_extent(g).await.unwrap();
        kept_per_round.push(messages);
        assert!(first > 1, "the stream was not purged (first entry {first})");
        // Each kept record has its append and its seal, plus the truncation entry (and in
        // round 1 the role and membership entries written after the first kept record).
        let changes = if round == 1 { 2 } else { 0 };
        assert!(
            messages <= 5 * 2 + 1 + changes,
            "round {round}: {messages} entries left in the stream after the purge"
        );
    }
    eprintln!("entries left after each truncation: {kept_per_round:?}");

    let want_records = writer.read_after(g, 0, u64::MAX).await.unwrap();
    assert_eq!(
        want_records.iter().map(|r| r.seq).collect::<Vec<_>>(),
        ((head - 4)..=head).collect::<Vec<_>>()
    );
    let want_low = writer.low_water(g).await.unwrap();
    assert_eq!(want_low, head - 5);
    let want_role = writer.role(g, "a").await.unwrap();
    assert_eq!(want_role.primary, "b");
    let want_members = writer.members(g).await.unwrap().unwrap();
    assert_eq!(want_members.partitions.len(), 2);
    let reopened = journal.open().await;
    let fields = |r: &Record| (r.seq, r.txn_id, r.state, r.epoch);
    for (name, h) in [
        ("a reopened handle", &reopened),
        ("a handle left behind", &behind),
    ] {
        let records = h.read_after(g, 0, u64::MAX).await.unwrap();
        assert_eq!(
            records.iter().map(fields).collect::<Vec<_>>(),
            want_records.iter().map(fields).collect::<Vec<_>>(),
            "{name}: records"
        );
        assert_eq!(h.low_water(g).await.unwrap(), want_low, "{name}: low water");
        assert_eq!(
            h.members(g).await.unwrap().unwrap(),
            want_members,
            "{name}: membership"
        );
        // Not the lease holder: refused.
        let refused = h
            .append(&Record::pending(
                g,
                head + 1,
                want_role.epoch,
                request(head + 1),
            ))
            .await;
        assert!(
            matches!(refused, Err(regroup_replay::JournalError::Fenced { .. })),
            "{name}: {refused:?}"
        );
    }
    // The writer hands over: the reopened handle claims, its log and role are the
    // writer's, it writes, and the writer is refused.
    writer.release().await.unwrap();
    reopened
        .claim(
            &Owner {
                id: "next".into(),
                describe: "the next writer".into(),
            },
            Duration::from_secs(60),
        )
        .await
        .unwrap();
    assert_eq!(reopened.open_log(g).await.unwrap().head, head);
    assert_eq!(reopened.role(g, "a").await.unwrap(), want_role);
    reopened
        .append(&Record::pending(
            g,
            head + 1,
            want_role.epoch,
            request(head + 1),
        ))
        .await
        .unwrap();
    let late = writer
        .append(&Record::pending(
            g,
            head + 2,
            want_role.epoch,
            request(head + 2),
        ))
        .await;
    assert!(
        matches!(late, Err(regroup_replay::JournalError::Fenced { .. })),
        "the old writer: {late:?}"
    );
    assert_eq!(behind.read_after(g, 0, u64::MAX).await.unwrap().len(), 6);
}

/// An update whose record does not fit the NATS server's `max_payload` (1 MB by default),
/// with the group's `max_body_bytes` above it, is answered 413 `body_too_large` naming the
/// limit; nothing is journaled or executed, and the next update goes through as usual.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_update_larger_than_the_servers_max_payload_gets_413_and_changes_nothing() {
    if !local_or_skip().await {
        return;
    }
    let journal = TempJournal::new(LOCAL_URL);
    let g = BankGroup::start(1, Some(&journal.url()), "max_body_bytes = 4194304").await;
    let mut report = LoadReport::default();
    seed_accounts(&g, 2, &mut report).await;
    let head = g.proxy.status(&g.http).await.groups[0].head;
    // Said at start: the body limit lets through bodies the journal cannot hold.
    assert!(
        g.proxy
            .log()
            .contains("max_body_bytes is not below the journal's record limit"),
        "{}",
        g.proxy.log()
    );

    let name = "x".repeat(2 * 1024 * 1024);
    let answer = g
        .post("/accounts", serde_json::json!({ "name": name }))
        .await
        .unwrap();
    assert_eq!(
        answer.status,
        413,
        "{:?}",
        String::from_utf8_lossy(&answer.body)
    );
    let body: serde_json::Value = answer.json().unwrap();
    assert_eq!(body["error"], "body_too_large", "{body}");
    let message = body["message"].as_str().unwrap_or_default();
    assert!(message.contains("max_payload"), "{body}");
    assert_eq!(g.proxy.status(&g.http).await.groups[0].head, head);

    let answer = g
        .post(
            "/accounts",
            serde_json::json!({ "name": "small", "balance": 1 }),
        )
        .await
        .unwrap();
    assert_eq!(
        answer.status,
        201,
        "{:?}",
        String::from_utf8_lossy(&answer.body)
    );
    assert_eq!(g.proxy.status(&g.http).await.groups[0].head, head + 1);
    assert_journal_sealed(&journal, head + 1).await;
}
