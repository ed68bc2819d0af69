//! Read-your-writes: `Regroup-Consistency: session` with the `Regroup-Seq` of the client's
//! last update as `Regroup-Position` never reads from a partition that has not applied it,
//! even when lagging partitions still count as available for plain reads.

#![allow(clippy::unwrap_used)]

mod support;

use std::time::Duration;

use nix::sys::signal::Signal;
use support::*;

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn three_partitions_session_reads_see_the_clients_writes() {
    // Heartbeats far apart and a huge allowed lag: frozen replicas stay `available`, so only
    // the consistency header keeps reads away from them.
    let extra = "heartbeat_interval_ms = 600000\nmax_read_lag = 1000000\nread_wait_ms = 500";
    let g = BankGroup::start(3, None, extra).await;
    let a = g
        .post(
            "/accounts",
            serde_json::json!({"name": "first", "balance": 1}),
        )
        .await
        .unwrap();
    assert_eq!(a.status, 201);
    g.wait_converged(Duration::from_secs(10)).await;
    g.banks[1].signal(Signal::SIGSTOP);
    g.banks[2].signal(Signal::SIGSTOP);

    let resp = g
        .post(
            "/accounts",
            serde_json::json!({"name": "mine", "balance": 2}),
        )
        .await
        .unwrap();
    assert_eq!(resp.status, 201);
    let doc = g.proxy.status(&g.http).await;
    let group = &doc.groups[0];
    assert_eq!(group.head, 2);
    assert!(
        group
            .partitions
            .iter()
            .filter(|p| p.name != "a")
            .all(|p| p.status == "available" && p.applied < 2),
        "the replicas must be available but behind: {group:?}"
    );
    for consistency in [("session", "2"), ("primary", "")] {
        for _ in 0..20 {
            let mut req = http::Request::get(format!("{}/accounts", g.proxy.url))
                .header("regroup-consistency", consistency.0);
            if !consistency.1.is_empty() {
                req = req.header("regroup-position", consistency.1);
            }
            let (status, answer) = tokio::time::timeout(Duration::from_secs(5), send(req))
                .await
                .expect("a fresh partition answers at once");
            assert_eq!(status, 200);
            let accounts: Vec<serde_json::Value> = serde_json::from_slice(&answer).unwrap();
            assert_eq!(
                accounts.len(),
                2,
                "{consistency:?} read missed the write: {accounts:?}"
            );
        }
    }
    // A malformed header is refused, not guessed.
    let req = http::Request::get(format!("{}/accounts", g.proxy.url))
        .header("regroup-consistency", "session")
        .header("regroup-position", "latest");
    let (status, body) = send(req).await;
    assert_eq!(status, 400);
    let v: serde_json::Value = serde_json::from_slice(&body).unwrap();
    assert_eq!(
        v["message"],
        "header regroup-position must be a seq (a number), not \"latest\""
    );
    g.banks[1].signal(Signal::SIGCONT);
    g.banks[2].signal(Signal::SIGCONT);
    g.wait_converged(Duration::from_secs(30)).await;
}

async fn send(req: http::request::Builder) -> (u16, bytes::Bytes) {
    use http_body_util::BodyExt;
    let client = hyper_util::client::legacy::Client::builder(hyper_util::rt::TokioExecutor::new())
        .build_http::<http_body_util::Full<bytes::Bytes>>();
    let resp = client
        .request(
            req.body(http_body_util::Full::new(bytes::Bytes::new()))
                .unwrap(),
        )
        .await
        .unwrap();
    let status = resp.status().as_u16();
    (status, resp.into_body().collect().await.unwrap().to_bytes())
}
