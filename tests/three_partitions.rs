//! Three bank partitions behind the proxy: convergence under concurrent load, replay of
//! failed updates, a replica killed and restarted, the proxy killed and restarted.

#![allow(clippy::unwrap_used)]

mod support;

use std::time::Duration;

use support::*;

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn three_partitions_converge_under_concurrent_load() {
    let g = BankGroup::start(3, None, "").await;
    let mut report = LoadReport::default();
    let seeds = seed_accounts(&g, 8, &mut report).await;
    let load = run_load(&g, &seeds, 16, 520, false, "load").await;
    report
        .acked_accounts
        .extend(load.acked_accounts.iter().cloned());
    report
        .acked_transfers
        .extend(load.acked_transfers.iter().cloned());
    report.initial_balance.extend(load.initial_balance.clone());
    assert_eq!(load.answered(), 520);
    assert!(
        load.count(409) > 0,
        "the load should include refused transfers: {:?}",
        load.statuses
    );
    assert!(
        load.count(400) > 0 && load.count(404) > 0,
        "{:?}",
        load.statuses
    );
    assert_eq!(
        load.count(201) + load.count(409) + load.count(400) + load.count(404),
        520,
        "unexpected answers: {:?}",
        load.statuses
    );

    let doc = g.wait_converged(Duration::from_secs(60)).await;
    // Every update was journaled, the failed ones too.
    assert_eq!(doc.groups[0].head, 8 + 520);
    let (accounts, transfers) = g.assert_identical().await;
    assert_bank_invariants(&report, &accounts, &transfers);
    assert_eq!(transfers.len(), report.acked_transfers.len());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn rejoin_replica_killed_mid_load_catches_up() {
    let mut g = BankGroup::start(3, None, "").await;
    let mut report = LoadReport::default();
    let seeds = seed_accounts(&g, 6, &mut report).await;
    let first = run_load(&g, &seeds, 8, 120, false, "before").await;
    g.banks[2].kill().await;
    // Updates go on while the replica is down; reads avoid it once it is suspect.
    let during = run_load(&g, &seeds, 8, 150, false, "during").await;
    let doc = g.proxy.status(&g.http).await;
    let c = doc.groups[0]
        .partitions
        .iter()
        .find(|p| p.name == "c")
        .unwrap();
    assert_ne!(
        c.status, "available",
        "a killed replica must not stay available"
    );
    g.banks[2].restart().await;
    let after = run_load(&g, &seeds, 8, 60, false, "after").await;
    for r in [first, during, after] {
        report.acked_accounts.extend(r.acked_accounts);
        report.acked_transfers.extend(r.acked_transfers);
        report.initial_balance.extend(r.initial_balance);
    }
    g.wait_converged(Duration::from_secs(60)).await;
    let (accounts, transfers) = g.assert_identical().await;
    assert_bank_invariants(&report, &accounts, &transfers);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn proxy_killed_mid_load_loses_no_acknowledged_update() {
    proxy_killed_mid_load(BankGroup::start(3, None, "").await).await;
}

/// The same with `journal_sync = "overlap"`: each record is flushed while the primary
/// executes it. A killed process loses nothing it wrote, flushed or not.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn proxy_killed_mid_load_loses_no_acknowledged_update_with_overlapped_flushes() {
    proxy_killed_mid_load(BankGroup::start_top(3, "journal_sync = \"overlap\"").await).await;
}

/// The same with the pipelined sequencer: up to eight records on their way to the primary
/// when the proxy dies; the restarted proxy finds them unsealed and settles them in seq order
/// from the primary's exactly-once record.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn proxy_killed_mid_load_loses_no_acknowledged_update_with_a_pipeline_window() {
    proxy_killed_mid_load(BankGroup::start(3, None, "pipeline_window = 8").await).await;
}

async fn proxy_killed_mid_load(mut g: BankGroup) {
    let mut report = LoadReport::default();
    let seeds = seed_accounts(&g, 6, &mut report).await;

    // Kill the proxy while 16 clients are mid-update.
    let load = {
        let g = &g;
        let seeds = &seeds;
        let load = run_load(g, seeds, 16, 100_000, true, "killed");
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
    assert!(
        !load.errors.is_empty(),
        "the kill should have cut requests off"
    );
    report
        .acked_accounts
        .extend(load.acked_accounts.iter().cloned());
    report
        .acked_transfers
        .extend(load.acked_transfers.iter().cloned());
    report.initial_balance.extend(load.initial_balance.clone());

    g.proxy.restart().await;
    // A record left in flight is reported in doubt at start, never guessed: the bank runs
    // the app-side layer, so the proxy asks the primary and settles it exactly (re-sent, it
    // is applied once there: answered from its record if it had been applied).
    let log = g.proxy.log();
    let reported = log.contains("record found in doubt at start");
    let settled = eventually("no record in doubt", Duration::from_secs(30), || async {
        let d = g.proxy.status(&g.http).await;
        let group = &d.groups[0];
        assert!(
            group.in_doubt.len() <= 1,
            "at most one update can be in flight: {group:?}"
        );
        if group.in_doubt.is_empty() {
            Ok(group.head)
        } else {
            Err(format!("{group:?}"))
        }
    })
    .await;
    if reported {
        assert!(
            g.proxy.log().contains("in-doubt update settled exactly"),
            "the in-doubt record must be settled by asking the primary"
        );
    }
    eprintln!("after the restart: head {settled}, in doubt at start: {reported}");
    // The group takes updates again and converges.
    let after = run_load(&g, &seeds, 8, 40, false, "after").await;
    report.acked_accounts.extend(after.acked_accounts);
    report.acked_transfers.extend(after.acked_transfers);
    report.initial_balance.extend(after.initial_balance);
    g.wait_converged(Duration::from_secs(60)).await;
    let (accounts, transfers) = g.assert_identical().await;
    assert_bank_invariants(&report, &accounts, &transfers);
}
