//! Several proxies in front of one group (`proxies = "several"`): the proxy holding the
//! journal's lease leads, the other forwards to it; the leader killed under load (twice,
//! each proxy once) → the other takes the lease over and leads; a client that retries on the
//! other proxy loses no acknowledged update, money is conserved and every copy is identical.

#![allow(clippy::unwrap_used)]

mod support;

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use rand::Rng;
use regroup_proxy::admin::StatusDoc;
use serde_json::json;
use support::*;

const FAST: &str = "heartbeat_interval_ms = 100\nheartbeat_timeout_ms = 100\nheartbeat_retries = 3";

async fn doc(http: &regroup::client::HttpClient, p: &Proxy) -> Option<StatusDoc> {
    http.get(&format!("{}/status", p.admin))
        .await
        .ok()?
        .json()
        .ok()
}

/// Waits until `p` says it leads.
async fn leads(http: &regroup::client::HttpClient, p: &Proxy) {
    eventually("the proxy to lead", Duration::from_secs(20), || async {
        match doc(http, p).await.and_then(|d| d.proxy) {
            Some(s) if s.role == "leader" => Ok(()),
            other => Err(format!("{other:?}")),
        }
    })
    .await
}

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
    let mut other = first;
    // Seeded through the follower: forwarded to the leader.
    let mut report = LoadReport::default();
    let seeds = seed_accounts(&g, 4, &mut report).await;

    let urls = Arc::new(std::sync::Mutex::new(vec![
        g.proxy.url.clone(),
        other.url.clone(),
    ]));
    let stop = Arc::new(AtomicBool::new(false));
    let clients: Vec<_> = (0..8)
        .map(|c| {
            let (urls, stop, http, seeds) =
                (urls.clone(), stop.clone(), http.clone(), seeds.clone());
            tokio::spawn(async move {
                let mut acked = Vec::new();
                let mut errors = 0u64;
                let mut turn = c;
                let started = Instant::now();
                for _ in 0..100_000 {
                    if stop.load(Ordering::Relaxed) || started.elapsed() > Duration::from_secs(120)
                    {
                        break;
                    }
                    let (from, to, amount) = {
                        let mut rng = rand::rng();
                        let from = seeds[rng.random_range(0..seeds.len())];
                        let to = seeds[rng.random_range(0..seeds.len())];
                        (from, to, rng.random_range(1..5))
                    };
                    if from == to {
                        continue;
                    }
                    let url = urls.lock().unwrap()[turn % 2].clone();
                    let body = json!({"from": from, "to": to, "amount": amount});
                    match http.post(&format!("{url}/transfers"), &body).await {
                        Ok(a) if a.status == 201 => {
                            acked.push(a.json::<serde_json::Value>().unwrap())
                        }
                        Ok(a) if a.status == 409 => {}
                        // No answer, or the proxy could not tell: retry on the other one.
                        _ => {
                            errors += 1;
                            turn += 1;
                            tokio::time::sleep(Duration::from_millis(20)).await;
                        }
                    }
                }
                (acked, errors)
            })
        })
        .collect();

    // `other` leads, `g.proxy` follows; twice: kill the leader, the follower takes over,
    // the killed one comes back as a follower and is the next round's follower.
    for round in 0..2 {
        tokio::time::sleep(Duration::from_millis(700)).await;
        let killed_at = Instant::now();
        let old_url = other.url.clone();
        other.kill().await;
        leads(&http, &g.proxy).await;
        eprintln!(
            "round {round}: leader failover took {:?}",
            killed_at.elapsed()
        );
        other.restart().await;
        for u in urls.lock().unwrap().iter_mut() {
            if *u == old_url {
                *u = other.url.clone();
            }
        }
        let s = doc(&http, &other).await.unwrap().proxy.unwrap();
        assert_eq!(s.role, "follower", "{s:?}");
        std::mem::swap(&mut g.proxy, &mut other);
    }
    tokio::time::sleep(Duration::from_millis(500)).await;
    stop.store(true, Ordering::Relaxed);
    let mut errors = 0;
    for c in clients {
        let (acked, e) = c.await.unwrap();
        report.acked_transfers.extend(acked);
        errors += e;
    }
    assert!(
        report.acked_transfers.len() > 50,
        "too little load: {}",
        report.acked_transfers.len()
    );
    eprintln!(
        "{} acknowledged transfers, {errors} requests retried on the other proxy",
        report.acked_transfers.len()
    );
    // `g.proxy` is whichever leads now.
    if doc(&http, &g.proxy)
        .await
        .and_then(|d| d.proxy)
        .is_none_or(|s| s.role != "leader")
    {
        std::mem::swap(&mut g.proxy, &mut other);
    }
    g.wait_converged(Duration::from_secs(60)).await;
    let (accounts, transfers) = g.assert_identical().await;
    assert_bank_invariants(&report, &accounts, &transfers);
}

/// A frozen leader resumed after the other proxy took over: its late writes are refused by
/// the journal (fencing token), it stops serving, and nothing it answered after the freeze
/// is lost or doubled.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_frozen_leader_resumed_after_a_takeover_writes_nothing_and_stops() {
    let dir = tempfile::tempdir().unwrap();
    let mut banks = Vec::new();
    for name in ["a", "b"] {
        banks.push(Bank::start(dir.path(), name).await);
    }
    let config = write_config(
        dir.path(),
        "proxies = \"several\"\njournal_lease_ms = 1000",
        FAST,
        &banks,
    );
    let mut frozen = Proxy::start(&config).await;
    let follower = Proxy::start_after(&config, &[&frozen]).await;
    let http = regroup::client::HttpClient::new();
    leads(&http, &frozen).await;
    let g = BankGroup {
        dir,
        banks,
        proxy: follower,
        http: http.clone(),
    };
    let mut report = LoadReport::default();
    let seeds = seed_accounts(&g, 2, &mut report).await;
    // Updates sent to the leader while it is frozen wait; the follower takes over.
    frozen.signal(nix::sys::signal::Signal::SIGSTOP);
    let stuck: Vec<_> = (0..4)
        .map(|_| {
            let (http, url) = (http.clone(), frozen.url.clone());
            let body = json!({"from": seeds[0], "to": seeds[1], "amount": 1});
            tokio::spawn(async move {
                tokio::time::timeout(
                    Duration::from_secs(30),
                    http.post(&format!("{url}/transfers"), &body),
                )
                .await
            })
        })
        .collect();
    leads(&http, &g.proxy).await;
    let after = run_load(&g, &seeds, 4, 40, false, "after-takeover").await;
    assert_no_failed_request(&after);
    merge(&mut report, after);
    // Resumed: it learns at its next renewal that the journal was taken over, and stops.
    frozen.signal(nix::sys::signal::Signal::SIGCONT);
    let exit = frozen.wait(Duration::from_secs(20)).await;
    assert!(
        exit.is_some_and(|s| !s.success()),
        "the deposed leader must stop: {exit:?}"
    );
    assert!(frozen.log().contains("taken over"), "{}", frozen.log());
    for s in stuck {
        if let Ok(Ok(Ok(a))) = s.await
            && a.status == 201
        {
            report.acked_transfers.push(a.json().unwrap());
        }
    }
    g.wait_converged(Duration::from_secs(60)).await;
    let (accounts, transfers) = g.assert_identical().await;
    assert_bank_invariants(&report, &accounts, &transfers);
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
    eventually(
        "the follower's view to be caught up",
        Duration::from_secs(20),
        || async {
            let d = doc(&http, &follower).await.ok_or("no status")?;
            let g = &d.groups[0];
            if g.partitions
                .iter()
                .all(|p| p.status == "available" && p.applied == g.head)
            {
                Ok(())
            } else {
                Err(format!("{g:?}"))
            }
        },
    )
    .await;
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
