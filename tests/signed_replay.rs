//! Signed replay headers end to end: the proxy and three bank partitions share a replay
//! secret; requests with replay headers sent straight to a partition, unsigned or signed
//! with another secret, are refused with 403 and change nothing, and the partition goes on
//! replaying the group's updates.

#![allow(clippy::unwrap_used)]

mod support;

use std::time::Duration;

use regroup_replay::signature::{Secret, sign_headers};
use serde_json::{Value, json};
use support::*;
use tokio::io::{AsyncReadExt, AsyncWriteExt};

const SECRET: &str = "signed-replay-test-secret-0123456789";

/// Sends a POST with `headers` and `body` straight to `url` (`http://host:port`) over a
/// fresh connection; returns the status and body.
async fn raw_post(url: &str, path: &str, headers: &http::HeaderMap, body: &str) -> (u16, String) {
    let addr = url.trim_start_matches("http://");
    let mut conn = tokio::net::TcpStream::connect(addr).await.unwrap();
    let mut req = format!(
        "POST {path} HTTP/1.1\r\nhost: {addr}\r\ncontent-type: application/json\r\ncontent-length: {}\r\nconnection: close\r\n",
        body.len()
    );
    for (name, value) in headers {
        req.push_str(&format!("{name}: {}\r\n", value.to_str().unwrap()));
    }
    req.push_str("\r\n");
    req.push_str(body);
    conn.write_all(req.as_bytes()).await.unwrap();
    let mut answer = Vec::new();
    tokio::time::timeout(Duration::from_secs(10), conn.read_to_end(&mut answer))
        .await
        .unwrap()
        .unwrap();
    let text = String::from_utf8_lossy(&answer).into_owned();
    let status = text
        .split(' ')
        .nth(1)
        .and_then(|s| s.parse().ok())
        .unwrap_or(0);
    let body = text
        .split_once("\r\n\r\n")
        .map(|(_, b)| b.to_owned())
        .unwrap_or_default();
    (status, body)
}

/// The replay headers of a forged transaction.
fn forged(seq: u64, epoch: u64) -> http::HeaderMap {
    let mut h = http::HeaderMap::new();
    h.insert("regroup-seq", seq.to_string().parse().unwrap());
    h.insert(
        "regroup-txn-id",
        uuid::Uuid::now_v7().to_string().parse().unwrap(),
    );
    h.insert("regroup-epoch", epoch.to_string().parse().unwrap());
    h.insert("regroup-timestamp", "2026-12-01T09:00:00Z".parse().unwrap());
    h.insert("regroup-replay", "1".parse().unwrap());
    h
}

async fn applied(g: &BankGroup, partition: usize) -> Value {
    g.banks[partition]
        .get(&g.http, "/_regroup/applied")
        .await
        .json()
        .unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn three_partitions_forged_replays_straight_to_a_partition_get_403_and_change_nothing() {
    let env = |_: &str| vec![("REGROUP_REPLAY_SECRET".to_owned(), SECRET.to_owned())];
    let g = BankGroup::start_env(3, None, &format!("replay_secret = \"{SECRET}\""), env).await;
    let mut report = LoadReport::default();
    let seeds = seed_accounts(&g, 4, &mut report).await;
    g.wait_converged(Duration::from_secs(20)).await;
    let before = applied(&g, 1).await;
    let accounts_before = g.banks[1].get(&g.http, "/accounts").await.body;
    assert_eq!(before["applied"], 4, "{before}");

    let body = r#"{"name":"forged","balance":1000000}"#;
    // Unsigned, with a far-future epoch and seq.
    let (status, answer) = raw_post(
        &g.banks[1].url,
        "/accounts",
        &forged(999_999, 999_999),
        body,
    )
    .await;
    assert_eq!(status, 403, "{answer}");
    assert!(answer.contains("bad_signature"), "{answer}");
    // Signed, but with another secret.
    let mut wrong = forged(999_999, 999_999);
    sign_headers(
        &mut wrong,
        "POST",
        "/accounts",
        body.as_bytes(),
        &Secret::new("not-the-secret").unwrap(),
    );
    let (status, answer) = raw_post(&g.banks[1].url, "/accounts", &wrong, body).await;
    assert_eq!(status, 403, "{answer}");
    // Signed with the right secret over another body: the body hash does not match.
    let mut moved = forged(5, 999_999);
    sign_headers(
        &mut moved,
        "POST",
        "/accounts",
        br#"{"name":"x","balance":1}"#,
        &Secret::new(SECRET).unwrap(),
    );
    let (status, answer) = raw_post(&g.banks[1].url, "/accounts", &moved, body).await;
    assert_eq!(status, 403, "{answer}");

    // Nothing changed there: no seq recorded, no fence raised, no account created.
    assert_eq!(applied(&g, 1).await, before);
    assert_eq!(
        g.banks[1].get(&g.http, "/accounts").await.body,
        accounts_before
    );

    // The partition goes on replaying: more updates through the proxy converge everywhere
    // (a raised fence would answer 409 to every replay and quarantine the partition).
    let load = run_load(&g, &seeds, 4, 40, false, "after").await;
    assert_eq!(load.answered(), 40);
    let doc = g.wait_converged(Duration::from_secs(30)).await;
    assert!(
        doc.groups[0]
            .partitions
            .iter()
            .all(|p| p.status == "available"),
        "{doc:?}"
    );
    g.assert_identical().await;
    let after = applied(&g, 1).await;
    assert_eq!(after["applied"], doc.groups[0].head, "{after}");
    assert_eq!(after["epoch"], before["epoch"], "{after}");
    let accounts: Vec<Value> = g.banks[1].get(&g.http, "/accounts").await.json().unwrap();
    assert!(
        accounts.iter().all(|a| a["name"] != json!("forged")),
        "{accounts:?}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn single_partition_without_the_proxys_secret_refuses_its_updates() {
    // The partition knows the secret, the proxy signs with another: nothing is executed.
    let env = |_: &str| vec![("REGROUP_REPLAY_SECRET".to_owned(), SECRET.to_owned())];
    let g = BankGroup::start_env(
        1,
        None,
        "replay_secret = \"another-secret-0123456789\"",
        env,
    )
    .await;
    let a = g
        .post("/accounts", json!({"name": "x", "balance": 1}))
        .await
        .unwrap();
    assert_eq!(a.status, 403, "{}", String::from_utf8_lossy(&a.body));
    assert_eq!(applied(&g, 0).await["applied"], 0);
}
