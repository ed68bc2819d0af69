//! Several proxies in front of one group (`proxies = "several"`): the proxy holding the
//! journal's lease leads, the other forwards to it; the leader killed under load (twice,
//! each proxy once) → the other takes the lease over and leads; a client that retries on the
//! other proxy loses no acknowledged update, money is conserved and every copy is identical.

#![allow(clippy::unwrap_used)]

mod support;

use std::time::Duration;

use serde_json::json;
use support::several::{
    FAST, RetryingClients, assert_at_most_once, caught_up, doc, fail_over, leads,
};
use support::*;

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn the_leader_killed_under_load_the_other_proxy_takes_over() {
    let dir = tempfile::tempdir().unwrap();
    let mut banks = Vec::new();
    for name in ["a", "b", "c"] {
        banks.push(Bank::start(dir.path(), name).await);
    }
    let config = write_config(
        dir.path(),
        "proxies = \"several\"\njournal_lease_ms = 1000",
        FAST,
        &banks,
    );
    let first = Proxy::start(&config).await;
    let second = Proxy::start_after(&config, &[&first]).await;
    let http = regroup::client::HttpClient::new();
    leads(&http, &first).await;
    let seen = doc(&http, &second).await.unwrap().proxy.unwrap();
    assert_eq!(seen.role, "follower");
    assert_eq!(
        seen.leader,
        doc(&http, &first).await.unwrap().proxy.unwrap().this
    );

    let mut g = BankGroup {
        dir,
        banks,
        proxy: second,
        http: http.clone(),
    };
    let mut leader = first;
    // Seeded through the follower: forwarded to the leader.
    let mut report = LoadReport::default();
    let seeds = seed_accounts(&g, 4, &mut report).await;
    let clients =
        RetryingClients::start(&http, [g.proxy.url.clone(), leader.url.clone()], &seeds, 8);
    // Twice: kill the leader, the follower takes over, the killed one comes back as a
    // follower and is the next round's follower.
    for round in 0..2 {
        tokio::time::sleep(Duration::from_millis(700)).await;
        let (took, acked) = fail_over(&mut g, &mut leader, &clients, (seeds[0], seeds[1])).await;
        eprintln!("round {round}: leader failover took {took:?}");
        report.acked_transfers.push(acked);
    }
    tokio::time::sleep(Duration::from_millis(500)).await;
    let seen = clients.finish().await;
    assert!(
        seen.acked.len() > 50,
        "too little load: {}",
        seen.acked.len()
    );
    eprintln!(
        "{} acknowledged transfers, {} requests retried on the other proxy",
        seen.acked.len(),
        seen.errors
    );
    report.acked_transfers.extend(seen.acked);
    // Status and convergence from the leader.
    std::mem::swap(&mut g.proxy, &mut leader);
    g.wait_converged(Duration::from_secs(60)).await;
    let (accounts, transfers) = g.assert_identical().await;
    assert_bank_invariants(&report, &accounts, &transfers);
    assert_at_most_once(report.acked_transfers.len(), seen.errors, &transfers);
}

/// A frozen leader resumed after the other proxy took over: its late writes are refused by
/// the journal (fencing token), it steps down and follows the new leader, and nothing is
/// stored that was not acknowledged.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_frozen_leader_resumed_after_a_takeover_writes_nothing_and_follows() {
    support::several::a_frozen_leader_writes_nothing(None).await;
}

/// A follower serves reads itself, from the partitions: with the leader frozen (its lease
/// not yet run out), reads through the follower still answer, with the data written before.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_follower_serves_reads_from_the_partitions_itself() {
    let dir = tempfile::tempdir().unwrap();
    let mut banks = Vec::new();
    for name in ["a", "b", "c"] {
        banks.push(Bank::start(dir.path(), name).await);
    }
    // A long lease: the follower must not take over during the test.
    let config = write_config(
        dir.path(),
        "proxies = \"several\"\njournal_lease_ms = 60000",
        FAST,
        &banks,
    );
    let leader = Proxy::start(&config).await;
    let follower = Proxy::start_after(&config, &[&leader]).await;
    let http = regroup::client::HttpClient::new();
    leads(&http, &leader).await;
    let a = http
        .post(
            &format!("{}/accounts", follower.url),
            &json!({"name": "seen", "balance": 7}),
        )
        .await
        .unwrap();
    assert_eq!(a.status, 201, "{}", String::from_utf8_lossy(&a.body));
    // Every partition has it, and the follower has seen the leader say so.
    caught_up(&http, &follower, "the follower's view to be caught up").await;
    leader.signal(nix::sys::signal::Signal::SIGSTOP);
    for _ in 0..6 {
        let r = tokio::time::timeout(
            Duration::from_secs(5),
            http.get(&format!("{}/accounts", follower.url)),
        )
        .await
        .expect("a read through the follower must not wait for the frozen leader")
        .unwrap();
        assert_eq!(r.status, 200);
        assert!(String::from_utf8_lossy(&r.body).contains("seen"));
    }
    leader.signal(nix::sys::signal::Signal::SIGCONT);
}
