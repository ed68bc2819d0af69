//! The change feed (`GET /groups/{group}/journal?after=N`) with a real proxy and two bank
//! partitions: a client reading the feed while concurrent updates run sees every
//! acknowledged update exactly once, in seq order; the feed needs the admin token, and a
//! bad `after` is a clear 400. Also `/metrics` behind `admin_status_requires_token`.

#![allow(clippy::unwrap_used)]

mod support;

use std::collections::BTreeMap;
use std::time::Duration;

use bytes::Bytes;
use http_body_util::{BodyExt, Full};
use hyper_util::client::legacy::Client;
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::rt::TokioExecutor;
use serde_json::Value;
use support::*;
use tokio::sync::mpsc;

const TOKEN: &str = "feed-s3cret";

type Raw = Client<HttpConnector, Full<Bytes>>;

/// Two banks behind a proxy with an admin token that `/status` and `/metrics` need too.
async fn start(dir: &std::path::Path) -> (Vec<Bank>, Proxy) {
    let banks = vec![Bank::start(dir, "a").await, Bank::start(dir, "b").await];
    let top = format!("admin_token = \"{TOKEN}\"\nadmin_status_requires_token = true");
    let proxy = start_proxy_for(dir, &top, &banks).await;
    (banks, proxy)
}

/// `POST path` with `body`; the answer's status and `Regroup-Seq`.
async fn post(http: &Raw, url: &str, body: &Value) -> (u16, Option<u64>) {
    let req = http::Request::post(url)
        .header("content-type", "application/json")
        .body(Full::new(Bytes::from(body.to_string())))
        .unwrap();
    let resp = tokio::time::timeout(Duration::from_secs(30), http.request(req))
        .await
        .unwrap()
        .unwrap();
    let seq = resp
        .headers()
        .get("regroup-seq")
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.parse().ok());
    let status = resp.status().as_u16();
    let _ = resp.into_body().collect().await;
    (status, seq)
}

/// Opens the feed after `after` and sends each line, parsed, to the returned receiver;
/// the reader ends when the receiver is dropped or the stream ends.
async fn open_feed(http: &Raw, admin: &str, after: u64) -> mpsc::UnboundedReceiver<Value> {
    let req = http::Request::get(format!("{admin}/groups/bank/journal?after={after}"))
        .header("authorization", format!("Bearer {TOKEN}"))
        .body(Full::new(Bytes::new()))
        .unwrap();
    let resp = tokio::time::timeout(Duration::from_secs(10), http.request(req))
        .await
        .unwrap()
        .unwrap();
    assert_eq!(resp.status(), 200);
    assert_eq!(resp.headers()["content-type"], "application/x-ndjson");
    let (tx, rx) = mpsc::unbounded_channel();
    let mut body = resp.into_body();
    tokio::spawn(async move {
        let mut buf = Vec::new();
        while let Some(Ok(frame)) = body.frame().await {
            let Ok(data) = frame.into_data() else {
                continue;
            };
            buf.extend_from_slice(&data);
            while let Some(end) = buf.iter().position(|b| *b == b'\n') {
                let line: Vec<u8> = buf.drain(..=end).collect();
                let v: Value = serde_json::from_slice(&line).unwrap();
                if tx.send(v).is_err() {
                    return;
                }
            }
        }
    });
    rx
}

/// Receives lines until one has seq `last` (bounded in time and count).
async fn read_through(rx: &mut mpsc::UnboundedReceiver<Value>, last: u64) -> Vec<Value> {
    let mut lines = Vec::new();
    let deadline = tokio::time::Instant::now() + Duration::from_secs(60);
    while lines.last().and_then(|l: &Value| l["seq"].as_u64()) != Some(last) {
        assert!(lines.len() < 10_000, "too many lines: {}", lines.len());
        match tokio::time::timeout_at(deadline, rx.recv()).await {
            Ok(Some(v)) => {
                assert!(v.get("error").is_none(), "the feed ended with {v}");
                lines.push(v);
            }
            Ok(None) => panic!("the feed ended after {} lines", lines.len()),
            Err(_) => panic!("no line with seq {last} within 60 s; got {}", lines.len()),
        }
    }
    lines
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn two_partitions_feed_streams_every_acknowledged_update_once_in_order() {
    let dir = tempfile::tempdir().unwrap();
    let (_banks, proxy) = start(dir.path()).await;
    let http = regroup::client::HttpClient::new();
    let raw: Raw = Client::builder(TokioExecutor::new()).build(HttpConnector::new());

    // The feed and /metrics need the token; a bad `after` or group is a clear 400.
    let feed = format!("{}/groups/bank/journal", proxy.admin);
    for url in [
        format!("{feed}?after=0"),
        format!("{}/metrics", proxy.admin),
    ] {
        let a = http.send("GET", &url, None, None).await.unwrap();
        assert_eq!(a.status, 401, "{url}");
        let a = http.send("GET", &url, None, Some("wrong")).await.unwrap();
        assert_eq!(a.status, 401, "{url}");
    }
    let m = http
        .send(
            "GET",
            &format!("{}/metrics", proxy.admin),
            None,
            Some(TOKEN),
        )
        .await
        .unwrap();
    assert_eq!(m.status, 200);
    assert!(String::from_utf8_lossy(&m.body).contains("regroup_journal_head{group=\"bank\"} 0"));
    for (query, message) in [
        (
            "after=x",
            "after must be a seq (a number of 0 or more), not \"x\"",
        ),
        (
            "after=-3",
            "after must be a seq (a number of 0 or more), not \"-3\"",
        ),
        (
            "since=3",
            "unknown query parameter \"since=3\": the feed takes only after=SEQ",
        ),
    ] {
        let a = http
            .send("GET", &format!("{feed}?{query}"), None, Some(TOKEN))
            .await
            .unwrap();
        assert_eq!(a.status, 400, "{query}");
        let v: Value = a.json().unwrap();
        assert_eq!(v["message"], message);
    }
    let a = http
        .send(
            "GET",
            &format!("{}/groups/nope/journal", proxy.admin),
            None,
            Some(TOKEN),
        )
        .await
        .unwrap();
    assert_eq!(a.status, 400);

    // Two updates before the feed opens: after=0 streams them first.
    let accounts = format!("{}/accounts", proxy.url);
    let mut acked: BTreeMap<u64, (u16, String)> = BTreeMap::new();
    for name in ["before-0", "before-1"] {
        let body = serde_json::json!({"name": name, "balance": 1000});
        let (status, seq) = post(&raw, &accounts, &body).await;
        assert_eq!(status, 201);
        acked.insert(seq.unwrap(), (status, body.to_string()));
    }
    let mut rx = open_feed(&raw, &proxy.admin, 0).await;

    // Concurrent updates while the feed is read: creations (201) and invalid transfers
    // (400, executed and journaled all the same).
    let mut clients = Vec::new();
    for c in 0..4 {
        let raw = raw.clone();
        let base = proxy.url.clone();
        clients.push(tokio::spawn(async move {
            let mut acked = Vec::new();
            for i in 0..20 {
                let (path, body) = if i % 5 == 4 {
                    (
                        "transfers",
                        serde_json::json!({"from": 1, "to": 1, "amount": 1}),
                    )
                } else {
                    (
                        "accounts",
                        serde_json::json!({"name": format!("c{c}-{i}"), "balance": 10}),
                    )
                };
                let (status, seq) = post(&raw, &format!("{base}/{path}"), &body).await;
                if let Some(seq) = seq {
                    acked.push((seq, status, body.to_string()));
                }
            }
            acked
        }));
    }
    for c in clients {
        for (seq, status, body) in c.await.unwrap() {
            assert!(
                acked.insert(seq, (status, body)).is_none(),
                "seq {seq} acknowledged twice"
            );
        }
    }
    assert_eq!(acked.len(), 82, "every update was acknowledged");
    let last = *acked.keys().last().unwrap();
    let lines = read_through(&mut rx, last).await;

    // Exactly once, in order: the seqs strictly increase, and they are exactly the
    // acknowledged ones (nothing here was skipped).
    let seqs: Vec<u64> = lines.iter().map(|l| l["seq"].as_u64().unwrap()).collect();
    assert!(
        seqs.windows(2).all(|w| w[0] < w[1]),
        "not in order: {seqs:?}"
    );
    assert_eq!(seqs, acked.keys().copied().collect::<Vec<_>>());
    let doc: Value = http
        .send("GET", &format!("{}/status", proxy.admin), None, Some(TOKEN))
        .await
        .unwrap()
        .json()
        .unwrap();
    assert_eq!(doc["groups"][0]["head"].as_u64(), Some(last));
    for line in &lines {
        let seq = line["seq"].as_u64().unwrap();
        let (status, body) = &acked[&seq];
        assert_eq!(line["method"], "POST");
        assert_eq!(line["status"].as_u64(), Some(u64::from(*status)), "{line}");
        assert_eq!(line["body_encoding"], "utf-8");
        assert_eq!(line["body"].as_str(), Some(body.as_str()), "{line}");
        assert!(
            line["path"] == "/accounts" || line["path"] == "/transfers",
            "{line}"
        );
        assert!(
            line["txn_id"].as_str().is_some_and(|t| t.len() == 36),
            "{line}"
        );
        assert!(line["epoch"].as_u64().is_some_and(|e| e >= 1), "{line}");
        assert!(
            line["timestamp"].as_str().is_some_and(|t| t.ends_with('Z')),
            "{line}"
        );
        let headers = line["headers"].as_array().unwrap();
        assert!(
            headers
                .iter()
                .any(|h| h[0] == "content-type" && h[1] == "application/json"),
            "{line}"
        );
    }
    assert!(
        lines.iter().any(|l| l["status"] == 400),
        "failed updates are committed too"
    );

    // The feed keeps streaming what is sealed after it caught up.
    let (status, seq) = post(
        &raw,
        &accounts,
        &serde_json::json!({"name": "after", "balance": 1}),
    )
    .await;
    assert_eq!(status, 201);
    let more = read_through(&mut rx, seq.unwrap()).await;
    assert_eq!(more.len(), 1, "{more:?}");

    // A second reader from the middle starts right after its `after`.
    let mut from_middle = open_feed(&raw, &proxy.admin, 40).await;
    let first = tokio::time::timeout(Duration::from_secs(10), from_middle.recv())
        .await
        .unwrap()
        .unwrap();
    assert_eq!(first["seq"].as_u64(), Some(41));
}
