//! The admin API with a real proxy: bearer-token protection, and an operator settling an
//! in-doubt update of a partition that does not run the app-side layer.

#![allow(clippy::unwrap_used)]

mod support;

use std::time::Duration;

use axum::Router;
use axum::routing::{get, post};
use support::*;

/// An app without the app-side layer: `POST /ok` answers, `POST /hang` never does.
async fn start_app() -> String {
    let app = Router::new()
        .route("/health", get(|| async { "ok" }))
        .route(
            "/ok",
            post(|| async { (axum::http::StatusCode::CREATED, "{}") }),
        )
        .route(
            "/hang",
            post(|| async {
                tokio::time::sleep(Duration::from_secs(3600)).await;
                "never"
            }),
        );
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let url = format!("http://{}", listener.local_addr().unwrap());
    tokio::spawn(async move { axum::serve(listener, app).await });
    url
}

async fn start_proxy(dir: &std::path::Path, top: &str, group: &str, url: &str) -> Proxy {
    let toml = format!(
        "listen = \"127.0.0.1:0\"\nadmin_listen = \"127.0.0.1:0\"\njournal = \"sqlite://{}\"\n{top}\n[[groups]]\nname = \"app\"\n{group}\n[[groups.partitions]]\nname = \"a\"\nurl = \"{url}\"\n",
        dir.join("journal.db").display()
    );
    let config = dir.join("regroup.toml");
    std::fs::write(&config, toml).unwrap();
    Proxy::start(&config).await
}

async fn regroup(args: &[&str]) -> std::process::Output {
    tokio::process::Command::new(REGROUP)
        .args(args)
        .env_remove("REGROUP_ADMIN_TOKEN")
        .output()
        .await
        .unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn single_partition_admin_verbs_need_the_bearer_token() {
    let dir = tempfile::tempdir().unwrap();
    let url = start_app().await;
    let proxy = start_proxy(dir.path(), "admin_token = \"s3cret\"", "", &url).await;
    let http = regroup::client::HttpClient::new();
    let body = serde_json::json!({"partition": "a"});
    for token in [None, Some("wrong")] {
        let a = http
            .send(
                "POST",
                &format!("{}/groups/app/drain", proxy.admin),
                Some(&body),
                token,
            )
            .await
            .unwrap();
        assert_eq!(a.status, 401);
        let v: serde_json::Value = a.json().unwrap();
        assert_eq!(v["error"], "unauthorized");
    }
    // Nothing changed.
    let doc = proxy.status(&http).await;
    assert_eq!(doc.groups[0].partitions[0].status, "available");
    // The CLI names the refusal; with the token the verb works.
    let out = regroup(&[
        "drain",
        "--admin",
        &proxy.admin,
        "--group",
        "app",
        "--partition",
        "a",
    ])
    .await;
    assert!(!out.status.success());
    assert_eq!(
        String::from_utf8_lossy(&out.stderr).trim(),
        "error: drain refused (401): missing or wrong admin bearer token"
    );
    // With the token the verb runs: draining the only partition is refused for what it is,
    // and nothing changes.
    let out = regroup(&[
        "drain",
        "--admin",
        &proxy.admin,
        "--group",
        "app",
        "--partition",
        "a",
        "--token",
        "s3cret",
    ])
    .await;
    assert!(!out.status.success());
    assert_eq!(
        String::from_utf8_lossy(&out.stderr).trim(),
        "error: drain refused (503): group \"app\" cannot take updates: cannot drain primary \"a\": no partition can take the primary role"
    );
    let doc = proxy.status(&http).await;
    assert_eq!(doc.groups[0].partitions[0].status, "available");
    let out = regroup(&[
        "undrain",
        "--admin",
        &proxy.admin,
        "--group",
        "app",
        "--partition",
        "a",
        "--token",
        "s3cret",
    ])
    .await;
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    // Status stays open to read, as JSON and as the CLI's table.
    let a = http.get(&format!("{}/status", proxy.admin)).await.unwrap();
    assert_eq!(a.status, 200);
    let out = regroup(&["status", "--admin", &proxy.admin]).await;
    assert!(out.status.success());
    let table = String::from_utf8_lossy(&out.stdout);
    assert!(
        table.starts_with("group app  primary a  epoch 1  head 0  sealed 0\n"),
        "{table}"
    );
    let row = table
        .lines()
        .find(|l| l.starts_with("* a "))
        .unwrap_or_default();
    assert!(row.contains(&url) && row.contains("available"), "{table}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn single_partition_in_doubt_update_waits_for_the_operator() {
    let dir = tempfile::tempdir().unwrap();
    let url = start_app().await;
    let proxy = start_proxy(
        dir.path(),
        "",
        "update_timeout_ms = 300\nfailover_wait_ms = 500",
        &url,
    )
    .await;
    let http = regroup::client::HttpClient::new();
    let post = |path: &str| {
        let http = http.clone();
        let url = format!("{}{path}", proxy.url);
        async move { http.post(&url, &serde_json::json!({})).await.unwrap() }
    };
    assert_eq!(post("/ok").await.status, 201);
    // The primary takes the request and never answers: in doubt, not guessed.
    let a = post("/hang").await;
    assert_eq!(a.status, 502);
    let v: serde_json::Value = a.json().unwrap();
    assert_eq!(
        (v["error"].as_str(), v["seq"].as_u64()),
        (Some("in_doubt"), Some(2))
    );
    let doc = proxy.status(&http).await;
    assert_eq!(doc.groups[0].in_doubt, vec![2]);
    // Later updates wait for it, then get 503 naming what to do; nothing is journaled.
    let a = post("/ok").await;
    assert_eq!(a.status, 503);
    let v: serde_json::Value = a.json().unwrap();
    assert!(
        v["message"].as_str().unwrap().contains(
            "update 2 is in doubt and must be resolved first (regroup resolve --group app --seq 2"
        ),
        "{v}"
    );
    assert_eq!(proxy.status(&http).await.groups[0].head, 2);
    // Resolving the wrong record is refused and changes nothing.
    let out = regroup(&[
        "resolve",
        "--admin",
        &proxy.admin,
        "--group",
        "app",
        "--seq",
        "1",
        "skipped",
    ])
    .await;
    assert!(!out.status.success());
    assert_eq!(
        String::from_utf8_lossy(&out.stderr).trim(),
        "error: resolve refused (409): record 1 of group \"app\" is executed, not in doubt"
    );
    // The operator settles it; updates flow again.
    let out = regroup(&[
        "resolve",
        "--admin",
        &proxy.admin,
        "--group",
        "app",
        "--seq",
        "2",
        "skipped",
    ])
    .await;
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let a = post("/ok").await;
    assert_eq!(a.status, 201);
    let doc = proxy.status(&http).await;
    assert!(doc.groups[0].in_doubt.is_empty());
    assert_eq!((doc.groups[0].head, doc.groups[0].sealed), (3, 3));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn single_partition_admin_port_is_hardened() {
    let dir = tempfile::tempdir().unwrap();
    let url = start_app().await;
    let proxy = start_proxy(
        dir.path(),
        "admin_token = \"s3cret\"\nadmin_status_requires_token = true\n\
         admin_max_body_bytes = 256\nheader_read_timeout_ms = 300",
        "",
        &url,
    )
    .await;
    let http = regroup::client::HttpClient::new();
    let status = format!("{}/status", proxy.admin);
    // `/status` needs the token; tokens that share a prefix with it are refused.
    for token in [None, Some("s3cre"), Some("s3cret2"), Some("")] {
        let a = http.send("GET", &status, None, token).await.unwrap();
        assert_eq!(a.status, 401, "token {token:?}");
    }
    let a = http
        .send("GET", &status, None, Some("s3cret"))
        .await
        .unwrap();
    assert_eq!(a.status, 200);
    // `/health` stays open (a load balancer probes it).
    let a = http.get(&format!("{}/health", proxy.admin)).await.unwrap();
    assert_eq!(a.status, 200);
    // The CLI sends the token for `status` too.
    let out = regroup(&["status", "--admin", &proxy.admin]).await;
    assert!(!out.status.success());
    let out = regroup(&["status", "--admin", &proxy.admin, "--token", "s3cret"]).await;
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    // An admin body over the limit is refused before it is parsed, and changes nothing.
    let big = serde_json::json!({"partition": "a".repeat(1000)});
    let a = http
        .send(
            "POST",
            &format!("{}/groups/app/drain", proxy.admin),
            Some(&big),
            Some("s3cret"),
        )
        .await
        .unwrap();
    assert_eq!(a.status, 413, "{}", String::from_utf8_lossy(&a.body));
    // A client that does not finish its header block is cut off after the time-out.
    let started = std::time::Instant::now();
    let slow = support::raw::exchange(
        &proxy.admin,
        &[b"GET /status HTTP/1.1\r\nhost: x\r\n"],
        Duration::ZERO,
        Duration::from_secs(5),
    )
    .await;
    assert!(slow.closed && slow.status.is_none(), "{slow:?}");
    assert!(started.elapsed() < Duration::from_secs(3), "{slow:?}");
    // A 200 KB header block gets 431 on the admin port too.
    let huge = format!(
        "GET /health HTTP/1.1\r\nhost: x\r\nx-big: {}\r\n\r\n",
        "a".repeat(200_000)
    );
    let a = support::raw::exchange(
        &proxy.admin,
        &[huge.as_bytes()],
        Duration::ZERO,
        Duration::from_secs(5),
    )
    .await;
    assert_eq!(a.status, Some(431), "{a:?}");
    let doc = http
        .send("GET", &status, None, Some("s3cret"))
        .await
        .unwrap();
    let doc: regroup_proxy::StatusDoc = doc.json().unwrap();
    assert_eq!(doc.groups[0].partitions[0].status, "available");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn single_partition_open_admin_port_off_loopback_is_warned_about() {
    let dir = tempfile::tempdir().unwrap();
    let url = start_app().await;
    let toml = format!(
        "listen = \"127.0.0.1:0\"\nadmin_listen = \"0.0.0.0:0\"\njournal = \"sqlite://{}\"\n[[groups]]\nname = \"app\"\n[[groups.partitions]]\nname = \"a\"\nurl = \"{url}\"\n",
        dir.path().join("journal.db").display()
    );
    let config = dir.path().join("regroup.toml");
    std::fs::write(&config, toml).unwrap();
    let proxy = Proxy::start(&config).await;
    let log = proxy.log();
    assert!(
        log.contains("admin_listen is not a loopback address and no admin_token is set"),
        "{log}"
    );
}
