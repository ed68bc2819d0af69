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

fn merge(report: &mut LoadReport, r: LoadReport) {
    report.acked_accounts.extend(r.acked_accounts);
    report.acked_transfers.extend(r.acked_transfers);
    report.initial_balance.extend(r.initial_balance);
    for (k, v) in r.statuses {
        *report.statuses.entry(k).or_default() += v;
    }
    report.errors.extend(r.errors);
}

/// Every answer was a bank answer: no 5xx from the proxy, no connection error.
fn assert_no_failed_request(r: &LoadReport) {
    assert!(
        r.errors.is_empty(),
        "client requests failed: {:?}",
        r.errors
    );
    let failed: u64 = r
        .statuses
        .iter()
        .filter(|(s, _)| ![201, 400, 404, 409].contains(*s))
        .map(|(_, n)| n)
        .sum();
    assert_eq!(failed, 0, "client requests failed: {:?}", r.statuses);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn failover_primary_killed_five_times_under_load() {
    let mut g = BankGroup::start(3, None, FAST).await;
    let mut report = LoadReport::default();
    let seeds = seed_accounts(&g, 6, &mut report).await;
    let stop = Arc::new(AtomicBool::new(false));
    let mut epochs = vec![g.proxy.status(&g.http).await.groups[0].epoch];
    let target = g.target();
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
