//! A longer chaos run, behind `#[ignore]`: `cargo test --test soak -- --ignored` (the
//! duration in seconds from `SOAK_SECS`, default 60). Sixteen clients keep updating while
//! partitions are killed, frozen and brought back at random; afterwards every partition is
//! identical, money is conserved and no client request failed.

#![allow(clippy::unwrap_used)]

mod support;

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use nix::sys::signal::Signal;
use rand::Rng;
use support::*;

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
#[ignore = "long chaos run: cargo test --test soak -- --ignored"]
async fn soak_three_partitions_under_chaos() {
    let secs: u64 = std::env::var("SOAK_SECS")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(60);
    let fast = "heartbeat_interval_ms = 100\nheartbeat_timeout_ms = 100\nheartbeat_retries = 3";
    let mut g = BankGroup::start(3, None, fast).await;
    let mut report = LoadReport::default();
    let seeds = seed_accounts(&g, 8, &mut report).await;
    let stop = Arc::new(AtomicBool::new(false));
    let target = g.target();
    let load = run_load_until(
        &target,
        &seeds,
        16,
        usize::MAX,
        false,
        "soak",
        Some(stop.clone()),
    );
    let chaos = async {
        let end = Instant::now() + Duration::from_secs(secs);
        let mut actions = 0;
        while Instant::now() < end {
            let pause = rand::rng().random_range(200..1500);
            tokio::time::sleep(Duration::from_millis(pause)).await;
            let doc = target.status().await;
            let primary = doc.groups[0].primary.clone();
            let victim = rand::rng().random_range(0..g.banks.len());
            match rand::rng().random_range(0..3) {
                0 => {
                    // Kill and bring back (the primary when it is the victim: a failover).
                    g.banks[victim].kill().await;
                    if g.banks[victim].name == primary {
                        eventually("the role to move", Duration::from_secs(10), || async {
                            let d = target.status().await;
                            if d.groups[0].primary != primary {
                                Ok(())
                            } else {
                                Err(String::new())
                            }
                        })
                        .await;
                    }
                    g.banks[victim].restart().await;
                }
                1 if g.banks[victim].name != primary => {
                    // Freeze a replica for a while.
                    g.banks[victim].signal(Signal::SIGSTOP);
                    tokio::time::sleep(Duration::from_millis(800)).await;
                    g.banks[victim].signal(Signal::SIGCONT);
                }
                _ => {}
            }
            actions += 1;
        }
        stop.store(true, Ordering::Relaxed);
        actions
    };
    let (load, actions) = tokio::join!(load, chaos);
    eprintln!("{actions} chaos actions, answers {:?}", load.statuses);
    assert_no_failed_request(&load);
    merge(&mut report, load);
    g.wait_converged(Duration::from_secs(60)).await;
    let (accounts, transfers) = g.assert_identical().await;
    assert_bank_invariants(&report, &accounts, &transfers);
}
