//! `replay = "success"` with the app layer: updates the primary refused (4xx) are skipped in
//! the journal, so the replicas' exactly-once records have gaps; a replica restarted in the
//! middle must not take a gap for a lost record (it is not "behind"), and every copy ends
//! identical with money conserved.

#![allow(clippy::unwrap_used)]

mod support;

use std::time::Duration;

use support::*;

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn refused_updates_are_skipped_and_replicas_restarted_between_them_stay_in_step() {
    let extra = "replay = \"success\"\nheartbeat_interval_ms = 100\nheartbeat_timeout_ms = 100\n\
                 heartbeat_retries = 3";
    let mut g = BankGroup::start(3, None, extra).await;
    let mut report = LoadReport::default();
    let seeds = seed_accounts(&g, 4, &mut report).await;
    let first = run_load(&g, &seeds, 8, 150, false, "before").await;
    assert_no_failed_request(&first);
    merge(&mut report, first);
    // A replica restarts between skipped records: its first record after the start lies
    // past a gap the journal skipped.
    g.banks[2].restart().await;
    let second = run_load(&g, &seeds, 8, 150, false, "after").await;
    assert_no_failed_request(&second);
    merge(&mut report, second);
    let refused: u64 = [400u16, 404, 409].iter().map(|s| report.count(*s)).sum();
    assert!(
        refused > 0,
        "the load must include refused updates: {:?}",
        report.statuses
    );
    let doc = g.wait_converged(Duration::from_secs(60)).await;
    let grp = &doc.groups[0];
    assert!(
        grp.partitions.iter().all(|p| p.status == "available"),
        "{:?}",
        grp.partitions
    );
    assert!(
        !grp.transitions
            .iter()
            .any(|t| t.name == "rewind" || t.name == "quarantine"),
        "a gap left by skipped records is not a lost record: {:?}",
        grp.transitions
    );
    let (accounts, transfers) = g.assert_identical().await;
    assert_bank_invariants(&report, &accounts, &transfers);
}
