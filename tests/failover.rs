//! Supervision and failover with real processes: the primary killed under load again and
//! again, a replica that stops answering, planned switchover, and a group with nobody left.

#![allow(clippy::unwrap_used)]

mod support;

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use rand::Rng;
use support::*;

const FAST: &str = "heartbeat_interval_ms = 100\nheartbeat_timeout_ms = 100\nheartbeat_retries = 3";

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn failover_primary_killed_five_times_under_load() {
    primary_killed_five_times(BankGroup::start(3, None, FAST).await).await;
}

/// The same with the pipelined sequencer: up to eight updates on their way to the primary
/// when it is killed; those in flight are settled in seq order by the next primary.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn failover_primary_killed_five_times_under_load_with_a_pipeline_window() {
    let extra = format!("{FAST}\npipeline_window = 8");
    primary_killed_five_times(BankGroup::start(3, None, &extra).await).await;
}

async fn primary_killed_five_times(mut g: BankGroup) {
    let mut report = LoadReport::default();
    let seeds = seed_accounts(&g, 6, &mut report).await;
    let stop = Arc::new(AtomicBool::new(false));
    let mut epochs = vec![g.proxy.status(&g.http).await.groups[0].epoch];
    let target = g.target();
    let start_head = target.status().await.groups[0].head;
    let load = run_load_until(
        &target,
        &seeds,
        16,
        1_000_000,
        false,
        "chaos",
        Some(stop.clone()),
    );
    let chaos = async {
        for _ in 0..5 {
            let pause = rand::rng().random_range(300..900);
            tokio::time::sleep(Duration::from_millis(pause)).await;
            let doc = target.status().await;
            let primary = doc.groups[0].primary.clone();
            let index = g.banks.iter().position(|b| b.name == primary).unwrap();
            g.banks[index].kill().await;
            // Bounded: the role moves and the group keeps taking updates.
            let epoch = eventually(
                "the primary role to move",
                Duration::from_secs(10),
                || async {
                    let d = target.status().await;
                    let grp = &d.groups[0];
                    if grp.primary != primary {
                        Ok(grp.epoch)
                    } else {
                        Err(format!("{grp:?}"))
                    }
                },
            )
            .await;
            epochs.push(epoch);
            // It comes back as a replica before the next kill, so the group never runs
            // out of partitions.
            g.banks[index].restart().await;
        }
        // The load runs until it has done enough work to mean something, however slow the
        // machine is.
        wait_for_head(&target, start_head + 150).await;
        stop.store(true, Ordering::Relaxed);
    };
    let (load, ()) = tokio::join!(load, chaos);
    assert_no_failed_request(&load);
    assert!(load.count(201) > 50, "too little load: {:?}", load.statuses);
    merge(&mut report, load);
    // Five failovers, five new epochs.
    assert!(epochs.windows(2).all(|w| w[1] > w[0]), "epochs: {epochs:?}");
    assert_eq!(epochs.len(), 6);

    // Everyone, returning old primaries included, catches up (none diverged), and every
    // acknowledged update is on every partition.
    g.wait_converged(Duration::from_secs(60)).await;
    let (accounts, transfers) = g.assert_identical().await;
    assert_bank_invariants(&report, &accounts, &transfers);
    let log = g.proxy.log();
    assert_eq!(
        log.matches("failover: primary role moved").count(),
        5,
        "{log}"
    );
    eprintln!(
        "in-doubt updates settled by the new primary: {}",
        log.matches("in-doubt update settled exactly").count()
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn rejoin_replica_that_stops_answering_is_unavailable_then_catches_up() {
    let g = BankGroup::start(3, None, FAST).await;
    let mut report = LoadReport::default();
    let seeds = seed_accounts(&g, 4, &mut report).await;
    // Frozen, not dead: connections open but nothing answers, so only time-outs tell.
    g.banks[2].signal(nix::sys::signal::Signal::SIGSTOP);
    eventually("c to be unavailable", Duration::from_secs(10), || async {
        let d = g.proxy.status(&g.http).await;
        let c = d.groups[0]
            .partitions
            .iter()
            .find(|p| p.name == "c")
            .unwrap()
            .clone();
        if c.status == "unavailable" {
            Ok(())
        } else {
            Err(format!("{c:?}"))
        }
    })
    .await;
    let doc = g.proxy.status(&g.http).await;
    let c = doc.groups[0]
        .partitions
        .iter()
        .find(|p| p.name == "c")
        .unwrap();
    assert_eq!(c.reason, "3 consecutive heartbeats missed");
    // Reads and updates go on without it: a read sent to a frozen partition would hang.
    let during = run_load(&g, &seeds, 8, 120, false, "during").await;
    assert_no_failed_request(&during);
    merge(&mut report, during);
    let doc = g.proxy.status(&g.http).await;
    let c = doc.groups[0]
        .partitions
        .iter()
        .find(|p| p.name == "c")
        .unwrap();
    assert_eq!(c.status, "unavailable");
    assert!(c.applied < doc.groups[0].head);

    g.banks[2].signal(nix::sys::signal::Signal::SIGCONT);
    g.wait_converged(Duration::from_secs(30)).await;
    let (accounts, transfers) = g.assert_identical().await;
    assert_bank_invariants(&report, &accounts, &transfers);
    let log = g.proxy.log();
    assert!(
        log.contains("to=unavailable"),
        "the change must be logged with its reason"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn failover_promote_and_drain_under_load_fail_no_request() {
    let g = BankGroup::start(3, None, FAST).await;
    let mut report = LoadReport::default();
    let seeds = seed_accounts(&g, 6, &mut report).await;
    let stop = Arc::new(AtomicBool::new(false));
    let target = g.target();
    let start_head = target.status().await.groups[0].head;
    let load = run_load_until(
        &target,
        &seeds,
        16,
        1_000_000,
        false,
        "switch",
        Some(stop.clone()),
    );
    let verb = |args: Vec<String>| {
        let admin = target.admin.clone();
        async move {
            let mut full = args.clone();
            full.extend([
                "--admin".to_owned(),
                admin,
                "--group".to_owned(),
                "bank".to_owned(),
            ]);
            let out = tokio::process::Command::new(REGROUP)
                .args(&full)
                .output()
                .await
                .unwrap();
            assert!(
                out.status.success(),
                "regroup {args:?}: {}",
                String::from_utf8_lossy(&out.stderr)
            );
        }
    };
    let switches = async {
        tokio::time::sleep(Duration::from_millis(400)).await;
        verb(vec!["promote".into(), "--partition".into(), "b".into()]).await;
        let d = target.status().await;
        assert_eq!((d.groups[0].primary.as_str(), d.groups[0].epoch), ("b", 2));
        tokio::time::sleep(Duration::from_millis(400)).await;
        // Draining the primary moves the role away first.
        verb(vec!["drain".into(), "--partition".into(), "b".into()]).await;
        let d = target.status().await;
        let grp = &d.groups[0];
        assert_ne!(grp.primary, "b");
        assert_eq!(grp.epoch, 3);
        let b = grp.partitions.iter().find(|p| p.name == "b").unwrap();
        assert_eq!(b.status, "draining");
        tokio::time::sleep(Duration::from_millis(400)).await;
        verb(vec!["undrain".into(), "--partition".into(), "b".into()]).await;
        tokio::time::sleep(Duration::from_millis(200)).await;
        // The load runs until it has done enough work to mean something, however slow the
        // machine is.
        wait_for_head(&target, start_head + 150).await;
        stop.store(true, Ordering::Relaxed);
    };
    let (load, ()) = tokio::join!(load, switches);
    assert_no_failed_request(&load);
    assert!(load.count(201) > 50, "too little load: {:?}", load.statuses);
    merge(&mut report, load);
    g.wait_converged(Duration::from_secs(30)).await;
    let (accounts, transfers) = g.assert_identical().await;
    assert_bank_invariants(&report, &accounts, &transfers);
    // Planned switchovers never leave an update in doubt.
    assert!(!g.proxy.log().contains("update in doubt"));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn failover_with_no_partition_left_answers_503_and_applies_nothing() {
    let extra = format!("{FAST}\nfailover_wait_ms = 1000");
    let mut g = BankGroup::start(2, None, &extra).await;
    let a = g
        .post("/accounts", serde_json::json!({"name": "x", "balance": 5}))
        .await
        .unwrap();
    assert_eq!(a.status, 201);
    g.wait_converged(Duration::from_secs(10)).await;
    g.banks[0].kill().await;
    g.banks[1].kill().await;
    eventually(
        "both partitions unavailable",
        Duration::from_secs(10),
        || async {
            let d = g.proxy.status(&g.http).await;
            let all = d.groups[0]
                .partitions
                .iter()
                .all(|p| p.status == "unavailable");
            if all {
                Ok(())
            } else {
                Err(format!("{:?}", d.groups[0]))
            }
        },
    )
    .await;
    let started = std::time::Instant::now();
    let resp = g
        .post(
            "/accounts",
            serde_json::json!({"name": "lost", "balance": 1}),
        )
        .await
        .unwrap();
    let waited = started.elapsed();
    assert_eq!(resp.status, 503);
    assert!(
        waited >= Duration::from_millis(900),
        "answered after {waited:?}"
    );
    let body: serde_json::Value = resp.json().unwrap();
    assert_eq!(body["error"], "unavailable");
    let message = body["message"].as_str().unwrap();
    assert!(
        message.contains("no partition can take the primary role within 1000 ms"),
        "{message}"
    );
    let doc = g.proxy.status(&g.http).await;
    assert_eq!(
        doc.groups[0].head, 1,
        "the refused update must not be journaled"
    );

    for b in &mut g.banks {
        b.restart().await;
    }
    g.wait_converged(Duration::from_secs(20)).await;
    let (accounts, _) = g.assert_identical().await;
    assert_eq!(
        accounts.len(),
        1,
        "the refused update was applied somewhere: {accounts:?}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn failover_prefers_priority_among_equally_caught_up_partitions() {
    let mut g = BankGroup::start(3, None, FAST).await;
    // Give c the higher priority (b would win the tie on name otherwise). The journal's
    // membership wins over the config once stored, so the new config seeds a new journal
    // (nothing was written yet).
    let config = std::fs::read_to_string(&g.proxy.config).unwrap();
    let c_url = format!("url = \"{}\"\n", g.banks[2].url);
    std::fs::write(
        &g.proxy.config,
        config
            .replace(&c_url, &format!("{c_url}priority = 5\n"))
            .replace("journal.db", "journal-2.db"),
    )
    .unwrap();
    g.proxy.restart().await;
    let a = g
        .post("/accounts", serde_json::json!({"name": "x", "balance": 5}))
        .await
        .unwrap();
    assert_eq!(a.status, 201);
    g.wait_converged(Duration::from_secs(10)).await;
    g.banks[0].kill().await;
    let doc = eventually("the role to move", Duration::from_secs(10), || async {
        let d = g.proxy.status(&g.http).await;
        if d.groups[0].primary != "a" {
            Ok(d)
        } else {
            Err(format!("{:?}", d.groups[0]))
        }
    })
    .await;
    assert_eq!(
        (doc.groups[0].primary.as_str(), doc.groups[0].epoch),
        ("c", 2)
    );
    // The epoch is durable: a restarted proxy keeps c and epoch 2.
    g.proxy.restart().await;
    let doc = g.proxy.status(&g.http).await;
    assert_eq!(
        (doc.groups[0].primary.as_str(), doc.groups[0].epoch),
        ("c", 2)
    );
}
