//! Exactly-once application under forced faults, with real processes: the primary killed
//! between its commit and its answer (failover executes the in-doubt update on the new
//! primary; the old one rejoins without applying it twice), and the proxy killed while an
//! update is pending at the primary (the restarted proxy settles it by asking the primary).
//! The faults come from an interposer in front of the bank (`support::fault`), so each
//! case happens on every run, not by timing luck, and the bank carries no test hooks.

#![allow(clippy::unwrap_used)]

mod support;

use std::time::Duration;

use bytes::Bytes;
use http_body_util::{BodyExt, Full};
use hyper_util::client::legacy::Client;
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::rt::TokioExecutor;
use serde_json::{Value, json};
use support::*;

/// A client answer with its headers.
struct Raw {
    status: u16,
    headers: http::HeaderMap,
    body: Bytes,
}

impl Raw {
    fn json(&self) -> Value {
        serde_json::from_slice(&self.body)
            .unwrap_or_else(|e| panic!("{e}: {}", String::from_utf8_lossy(&self.body)))
    }
}

/// `POST url` with a JSON body, keeping the answer's headers; `Err` when no answer came.
async fn post_raw(url: &str, body: &Value) -> Result<Raw, String> {
    let client: Client<HttpConnector, Full<Bytes>> =
        Client::builder(TokioExecutor::new()).build(HttpConnector::new());
    let req = http::Request::builder()
        .method("POST")
        .uri(url)
        .header("content-type", "application/json")
        .body(Full::new(Bytes::from(body.to_string())))
        .unwrap();
    let resp = tokio::time::timeout(Duration::from_secs(20), client.request(req))
        .await
        .map_err(|_| format!("POST {url}: no answer within 20 s"))?
        .map_err(|e| format!("POST {url}: {e}"))?;
    let status = resp.status().as_u16();
    let headers = resp.headers().clone();
    let body = resp
        .into_body()
        .collect()
        .await
        .map_err(|e| format!("POST {url}: reading the answer: {e}"))?
        .to_bytes();
    Ok(Raw {
        status,
        headers,
        body,
    })
}

/// Creates accounts "alice" (10 000) and "bob" (500) through the proxy: seq 1 and 2.
async fn two_accounts(g: &BankGroup) -> (i64, i64) {
    let mut ids = Vec::new();
    for (seq, (name, balance)) in [("alice", 10_000), ("bob", 500)].into_iter().enumerate() {
        let a = post_raw(
            &format!("{}/accounts", g.proxy.url),
            &json!({"name": name, "balance": balance}),
        )
        .await
        .unwrap();
        assert_eq!(a.status, 201, "{}", String::from_utf8_lossy(&a.body));
        assert_eq!(
            a.headers["regroup-seq"].to_str().unwrap(),
            (seq + 1).to_string()
        );
        ids.push(a.json()["id"].as_i64().unwrap());
    }
    (ids[0], ids[1])
}

/// A partition's `/_regroup/applied?seq=N` answer.
async fn applied(g: &BankGroup, bank: usize, seq: u64) -> Result<Value, String> {
    let url = format!("{}/_regroup/applied?seq={seq}", g.banks[bank].url);
    let a = g.http.get(&url).await.map_err(|e| format!("{e:#}"))?;
    if a.status != 200 {
        return Err(format!(
            "{url}: {} {}",
            a.status,
            String::from_utf8_lossy(&a.body)
        ));
    }
    a.json().map_err(|e| format!("{e:#}"))
}

/// The converged data holds exactly the one transfer of 300 from `alice` to `bob`, with
/// the balances moved once; returns the transfer.
async fn assert_one_transfer(g: &BankGroup, alice: i64, bob: i64) -> Value {
    let (accounts, transfers) = g.assert_identical().await;
    assert_eq!(transfers.len(), 1, "exactly one transfer: {transfers:?}");
    let t = &transfers[0];
    assert_eq!(
        (t["from"].as_i64(), t["to"].as_i64(), t["amount"].as_i64()),
        (Some(alice), Some(bob), Some(300)),
        "{t}"
    );
    let balance = |id: i64| {
        accounts
            .iter()
            .find(|a| a["id"].as_i64() == Some(id))
            .and_then(|a| a["balance"].as_i64())
            .unwrap()
    };
    assert_eq!(
        (balance(alice), balance(bob)),
        (9_700, 800),
        "balances moved once: {accounts:?}"
    );
    t.clone()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn failover_primary_killed_after_commit_before_answer_applies_once() {
    let mut g = BankGroup::start_with(
        3,
        None,
        "heartbeat_interval_ms = 100\nheartbeat_timeout_ms = 100\nheartbeat_retries = 3",
        |name| (name == "a").then_some(fault::Fault::ExitAfterSeq(3)),
    )
    .await;
    let (alice, bob) = two_accounts(&g).await;

    // Seq 3: a commits it and exits before answering. The client waits through the
    // failover and gets the new primary's answer.
    let answer = post_raw(
        &format!("{}/transfers", g.proxy.url),
        &json!({"from": alice, "to": bob, "amount": 300}),
    )
    .await
    .unwrap();
    let log = g.proxy.log();
    assert_eq!(
        answer.status,
        201,
        "{}\nproxy log:\n{log}",
        String::from_utf8_lossy(&answer.body)
    );
    assert_eq!(answer.headers["regroup-seq"].to_str().unwrap(), "3");
    assert!(
        g.banks[0].interposer().killed(),
        "a must have been killed after committing seq 3"
    );
    assert!(log.contains("update in doubt"), "proxy log:\n{log}");
    // Logged by the failover task once the role moved, possibly just after the answer.
    eventually(
        "the failover to be logged",
        Duration::from_secs(10),
        || async {
            let log = g.proxy.log();
            if log.contains("failover: primary role moved") {
                Ok(())
            } else {
                Err(log)
            }
        },
    )
    .await;
    assert!(
        log.contains("in-doubt update settled exactly"),
        "proxy log:\n{log}"
    );
    let doc = g.proxy.status(&g.http).await;
    let group = &doc.groups[0];
    assert_ne!(group.primary, "a", "{group:?}");
    assert_eq!(group.epoch, 2, "{group:?}");
    let a = group.partitions.iter().find(|p| p.name == "a").unwrap();
    assert_ne!(a.status, "available", "a is down: {group:?}");

    // a comes back: it catches up from its checkpoint and meets seq 3, which it already
    // applied; its exactly-once record answers the replay, identically.
    g.banks[0].restart().await;
    let doc = g.wait_converged(Duration::from_secs(60)).await;
    let group = &doc.groups[0];
    assert_eq!((group.head, group.sealed), (3, 3), "{group:?}");
    assert_ne!(group.primary, "a", "{group:?}");
    assert_eq!(group.epoch, 2, "{group:?}");
    for p in &group.partitions {
        assert_eq!(
            (p.status.as_str(), p.applied),
            ("available", 3),
            "{group:?}"
        );
    }
    let t = assert_one_transfer(&g, alice, bob).await;
    assert_eq!(
        answer.json(),
        t,
        "the client's answer is what every partition holds"
    );

    // a's record of seq 3 is its own execution in epoch 1, not a second one in epoch 2;
    // the new primary executed it in epoch 2.
    let on_a = applied(&g, 0, 3).await.unwrap();
    assert_eq!(
        (on_a["applied"].as_bool(), on_a["epoch"].as_u64()),
        (Some(true), Some(1)),
        "{on_a}"
    );
    let new = g
        .banks
        .iter()
        .position(|b| b.name == group.primary)
        .unwrap();
    let on_new = applied(&g, new, 3).await.unwrap();
    assert_eq!(
        (on_new["applied"].as_bool(), on_new["epoch"].as_u64()),
        (Some(true), Some(2)),
        "{on_new}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn proxy_killed_with_update_pending_applies_once() {
    let mut g = BankGroup::start_with(3, None, "", |name| {
        (name == "a").then_some(fault::Fault::DelaySeq(3, Duration::from_millis(1500)))
    })
    .await;
    let (alice, bob) = two_accounts(&g).await;

    // Seq 3 is journaled and pending while a holds it; the proxy dies meanwhile.
    let url = format!("{}/transfers", g.proxy.url);
    let client = tokio::spawn(async move {
        post_raw(&url, &json!({"from": alice, "to": bob, "amount": 300})).await
    });
    eventually(
        "seq 3 journaled, pending, and held by a",
        Duration::from_secs(10),
        || async {
            let doc = g.proxy.status(&g.http).await;
            let group = &doc.groups[0];
            if group.head == 3 && group.sealed == 2 && g.banks[0].interposer().holds() == 1 {
                Ok(())
            } else {
                Err(format!("{group:?}"))
            }
        },
    )
    .await;
    // The proxy dies after a committed, before it sealed a's answer. It is frozen first
    // (SIGSTOP) so that its connection to a stays open: a SIGKILL right away closes it, and
    // the bank's HTTP server then drops the held handler before it commits (checked by
    // hand: a then never applies seq 3 until the restarted proxy sends it again). Frozen,
    // it lets a commit and answer into the socket; then it is SIGKILLed, answer unread.
    let pid = nix::unistd::Pid::from_raw(i32::try_from(g.proxy.child_pid().unwrap()).unwrap());
    nix::sys::signal::kill(pid, nix::sys::signal::Signal::SIGSTOP).unwrap();
    eventually("a to commit seq 3", Duration::from_secs(10), || async {
        let v = applied(&g, 0, 3).await?;
        if v["applied"].as_bool() == Some(true) {
            Ok(())
        } else {
            Err(v.to_string())
        }
    })
    .await;
    g.proxy.kill().await;
    let cut = client.await.unwrap();
    assert!(
        cut.is_err(),
        "the client's request must fail with the proxy: got {:?}",
        cut.map(|r| (r.status, r.body))
    );

    g.proxy.restart().await;
    let doc = g.wait_converged(Duration::from_secs(60)).await;
    let log = g.proxy.log();
    assert!(
        log.contains("record found in doubt at start"),
        "proxy log:\n{log}"
    );
    assert!(
        log.contains("in-doubt update settled exactly"),
        "proxy log:\n{log}"
    );
    let group = &doc.groups[0];
    assert_eq!((group.head, group.sealed), (3, 3), "{group:?}");
    assert_eq!((group.primary.as_str(), group.epoch), ("a", 1), "{group:?}");
    assert_one_transfer(&g, alice, bob).await;
    let on_a = applied(&g, 0, 3).await.unwrap();
    assert_eq!(
        (on_a["applied"].as_bool(), on_a["status"].as_u64()),
        (Some(true), Some(201)),
        "{on_a}"
    );
    // Settling delivered seq 3 to a a second time (held again by the interposer), and a
    // answered it from its record: still one transfer.
    assert_eq!(g.banks[0].interposer().holds(), 2);
}
