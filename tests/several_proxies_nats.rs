//! Several proxies (`proxies = "several"`) on the NATS JetStream journal: two proxies on a
//! 3-node cluster the test starts, the leader SIGKILLed under load four times (restarted
//! each time, so two stay up) and one NATS node stopped during the run; and a frozen leader
//! resumed after a takeover, whose late writes JetStream refuses, stepping down to follow.

#![allow(clippy::unwrap_used)]

mod support;

use std::time::Duration;

use serde_json::json;
use support::nats::{Cluster, LOCAL_URL, TempJournal, local_or_skip};
use support::several::{
    FAST, RetryingClients, assert_at_most_once, doc, fail_over, leads, settle_roles, until_created,
};
use support::*;

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn two_proxies_on_a_nats_cluster_survive_leader_kills_and_a_node_stop() {
    // The cluster is the test's own (nats-server is installed when missing): no skip.
    let mut cluster = Cluster::start().await;
    let journal = TempJournal::new(&cluster.url());
    let dir = tempfile::tempdir().unwrap();
    let mut banks = Vec::new();
    for name in ["a", "b", "c"] {
        banks.push(Bank::start(dir.path(), name).await);
    }
    let config = write_config_on(
        dir.path(),
        &journal.url(),
        "proxies = \"several\"\njournal_lease_ms = 1000",
        FAST,
        &banks,
    );
    let first = Proxy::start(&config).await;
    let second = Proxy::start_after(&config, &[&first]).await;
    let http = regroup::client::HttpClient::new();
    leads(&http, &first).await;
    assert_eq!(
        doc(&http, &second).await.unwrap().proxy.unwrap().role,
        "follower"
    );
    let mut g = BankGroup {
        dir,
        banks,
        proxy: second,
        http: http.clone(),
    };
    let mut leader = first;
    let mut report = LoadReport::default();
    let seeds = seed_accounts(&g, 4, &mut report).await;
    let (replicas, stream_leader) = journal.open().await.stream_placement("bank").await.unwrap();
    assert_eq!(
        replicas, 3,
        "the group's stream is replicated on every node"
    );
    let victim = cluster
        .nodes
        .iter()
        .position(|n| stream_leader.as_deref() == Some(n.name.as_str()))
        .unwrap_or_else(|| panic!("the stream's leader {stream_leader:?} is none of the nodes"));

    let clients =
        RetryingClients::start(&http, [g.proxy.url.clone(), leader.url.clone()], &seeds, 8);
    let mut times = Vec::new();
    for round in 0..4 {
        tokio::time::sleep(Duration::from_millis(700)).await;
        if round == 2 {
            // The node leading the group's stream, under load, between two leader kills.
            cluster.kill(victim).await;
            eprintln!("stopped NATS node {}", cluster.nodes[victim].name);
            // Updates pass again once the two remaining nodes elected their leaders.
            let body = json!({"from": seeds[0], "to": seeds[1], "amount": 1});
            let url = format!("{}/transfers", leader.url);
            let acked = until_created(&http, &url, &body, Duration::from_secs(60)).await;
            report.acked_transfers.push(acked);
            // A lease renewal held up by the election may have moved the lead.
            settle_roles(&mut g, &mut leader, Some(&clients)).await;
        }
        let (took, acked) = fail_over(&mut g, &mut leader, &clients, (seeds[0], seeds[1])).await;
        eprintln!(
            "round {round}: leader failover (kill -> first 201 through the other proxy) took {took:?}"
        );
        times.push(took);
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
        "failover times {times:?}; {} acknowledged transfers, {} requests retried on the other proxy",
        seen.acked.len(),
        seen.errors
    );
    report.acked_transfers.extend(seen.acked);
    // Status and convergence from the leader.
    settle_roles(&mut g, &mut leader, None).await;
    std::mem::swap(&mut g.proxy, &mut leader);
    let doc = g.wait_converged(Duration::from_secs(90)).await;
    let (accounts, transfers) = g.assert_identical().await;
    assert_bank_invariants(&report, &accounts, &transfers);
    assert_at_most_once(report.acked_transfers.len(), seen.errors, &transfers);
    // The journal holds exactly the group's records, dense and every one sealed.
    let records = regroup_replay::Log::read_after(&journal.open().await, "bank", 0, u64::MAX)
        .await
        .unwrap();
    let head = doc.groups[0].head;
    assert_eq!(
        records.iter().map(|r| r.seq).collect::<Vec<_>>(),
        (1..=head).collect::<Vec<_>>()
    );
    assert!(records.iter().all(|r| r.state.is_sealed()));
    drop(g);
    drop(leader);
    drop(journal);
    drop(cluster);
}

/// A frozen leader resumed after the other proxy took over, on the local NATS server:
/// JetStream refuses its late writes (expected sequence, lease revision), it steps down and
/// follows the new leader, and nothing is stored that was not acknowledged.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_frozen_leader_on_nats_writes_nothing_and_follows() {
    if !local_or_skip().await {
        return;
    }
    let journal = TempJournal::new(LOCAL_URL);
    support::several::a_frozen_leader_writes_nothing(Some(&journal.url())).await;
}
