//! regroup as a Tower layer inside another server: requests under the group's prefix are
//! journaled and replayed on every partition (prefix stripped), others reach the inner
//! service untouched.

#![allow(clippy::unwrap_used)]

mod support;

use std::time::Duration;

use axum::Router;
use axum::routing::get;
use hyper_util::rt::{TokioExecutor, TokioIo};
use hyper_util::server::conn::auto;
use hyper_util::service::TowerToHyperService;
use regroup_proxy::{Config, Proxy};
use support::*;
use tower::ServiceBuilder;

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn three_partitions_behind_an_embedded_layer_converge() {
    let dir = tempfile::tempdir().unwrap();
    let mut banks = Vec::new();
    for name in ["a", "b", "c"] {
        banks.push(Bank::start(dir.path(), name).await);
    }
    let mut toml = format!(
        "journal = \"sqlite://{}\"\n[[groups]]\nname = \"bank\"\npath_prefix = \"/bank\"\nstrip_prefix = true\n",
        dir.path().join("journal.db").display()
    );
    for b in &banks {
        toml.push_str(&format!(
            "[[groups.partitions]]\nname = \"{}\"\nurl = \"{}\"\n",
            b.name, b.url
        ));
    }
    let config = Config::parse(&toml, std::path::Path::new("embedded.toml")).unwrap();
    let proxy = Proxy::start(&config).await.unwrap();
    let local = Router::new().route("/hello", get(|| async { "local" }));
    let service = ServiceBuilder::new().layer(proxy.layer()).service(local);
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let url = format!("http://{}", listener.local_addr().unwrap());
    tokio::spawn(async move {
        loop {
            let Ok((stream, _)) = listener.accept().await else {
                return;
            };
            let service = TowerToHyperService::new(service.clone());
            tokio::spawn(async move {
                let _ = auto::Builder::new(TokioExecutor::new())
                    .serve_connection(TokioIo::new(stream), service)
                    .await;
            });
        }
    });

    let http = regroup::client::HttpClient::new();
    let hello = http.get(&format!("{url}/hello")).await.unwrap();
    assert_eq!((hello.status, &hello.body[..]), (200, &b"local"[..]));
    for (name, balance) in [("alice", 100), ("bob", 50)] {
        let a = http
            .post(
                &format!("{url}/bank/accounts"),
                &serde_json::json!({"name": name, "balance": balance}),
            )
            .await
            .unwrap();
        assert_eq!(a.status, 201, "{}", String::from_utf8_lossy(&a.body));
    }
    let t = http
        .post(
            &format!("{url}/bank/transfers"),
            &serde_json::json!({"from": 1, "to": 2, "amount": 30}),
        )
        .await
        .unwrap();
    assert_eq!(t.status, 201);
    // Replayed everywhere, with the prefix stripped.
    let expected = http.get(&format!("{url}/bank/accounts")).await.unwrap();
    assert_eq!(expected.status, 200);
    for b in &banks {
        eventually(
            &format!("{} to hold both accounts", b.name),
            Duration::from_secs(10),
            || async {
                let got = b.get(&http, "/accounts").await;
                let v: Vec<serde_json::Value> = got.json().unwrap();
                let balances: Vec<i64> = v.iter().map(|a| a["balance"].as_i64().unwrap()).collect();
                if balances == [70, 80] {
                    Ok(())
                } else {
                    Err(format!("{balances:?}"))
                }
            },
        )
        .await;
    }
    let group = proxy.groups().next().unwrap();
    assert_eq!(group.head(), 3);
}
