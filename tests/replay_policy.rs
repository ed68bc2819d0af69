//! What the partitions receive: failed updates replayed (or not, with `replay = "success"`),
//! oversized bodies refused before the journal, forged replay headers stripped, against
//! in-process recording apps behind the real proxy.

#![allow(clippy::unwrap_used)]

mod support;

use std::convert::Infallible;
use std::path::Path;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use axum::Router;
use axum::extract::{Request, State};
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use bytes::Bytes;
use http::HeaderMap;
use http_body_util::combinators::UnsyncBoxBody;
use http_body_util::{BodyExt, Full, StreamBody};
use hyper::body::Frame;
use hyper_util::client::legacy::Client;
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::rt::TokioExecutor;
use regroup::client::HttpClient;
use regroup_proxy::admin::GroupStatus;
use support::{Proxy, eventually};

/// One request as an app saw it.
#[derive(Debug, Clone, PartialEq, Eq)]
struct Seen {
    method: String,
    path: String,
    /// `regroup-replay` values, comma-joined; `None` when absent.
    replay: Option<String>,
    /// `regroup-seq` values, comma-joined; `None` when absent.
    seq: Option<String>,
    /// `regroup-txn-id` values, comma-joined.
    txn: Option<String>,
    /// `regroup-epoch` values, comma-joined.
    epoch: Option<String>,
}

impl Seen {
    /// `(method, path, replay, seq)`, for compact assertions.
    fn short(&self) -> (&str, &str, Option<&str>, Option<&str>) {
        (
            &self.method,
            &self.path,
            self.replay.as_deref(),
            self.seq.as_deref(),
        )
    }
}

type Log = Arc<Mutex<Vec<Seen>>>;

/// A recording app on `127.0.0.1:0`, stopped on drop.
struct App {
    url: String,
    log: Log,
    task: tokio::task::JoinHandle<()>,
}

impl Drop for App {
    fn drop(&mut self) {
        self.task.abort();
    }
}

impl App {
    async fn start() -> App {
        let log = Log::default();
        let router = Router::new().fallback(record).with_state(log.clone());
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let url = format!("http://{}", listener.local_addr().unwrap());
        let task = tokio::spawn(async move {
            axum::serve(listener, router).await.unwrap();
        });
        App { url, log, task }
    }

    /// Everything but heartbeats and the proxy's questions about the app-side layer (which
    /// this app does not run), in arrival order.
    fn seen(&self) -> Vec<Seen> {
        self.log
            .lock()
            .unwrap()
            .iter()
            .filter(|s| {
                !(s.method == "GET" && (s.path == "/health" || s.path.starts_with("/_regroup/")))
            })
            .cloned()
            .collect()
    }

    fn short(&self) -> Vec<(String, String, Option<String>, Option<String>)> {
        self.seen()
            .iter()
            .map(|s| {
                let (m, p, r, q) = s.short();
                (m.into(), p.into(), r.map(Into::into), q.map(Into::into))
            })
            .collect()
    }
}

async fn record(State(log): State<Log>, req: Request) -> Response {
    let (parts, body) = req.into_parts();
    let _ = axum::body::to_bytes(body, usize::MAX).await;
    let values = |name: &str| {
        let v: Vec<&str> = parts
            .headers
            .get_all(name)
            .iter()
            .map(|v| v.to_str().unwrap_or("<not utf-8>"))
            .collect();
        (!v.is_empty()).then(|| v.join(","))
    };
    log.lock().unwrap().push(Seen {
        method: parts.method.to_string(),
        path: parts.uri.path().to_owned(),
        replay: values("regroup-replay"),
        seq: values("regroup-seq"),
        txn: values("regroup-txn-id"),
        epoch: values("regroup-epoch"),
    });
    let json = |status: StatusCode, body: &'static str| {
        (status, [("content-type", "application/json")], body).into_response()
    };
    match (parts.method.as_str(), parts.uri.path()) {
        ("GET", "/health") => StatusCode::OK.into_response(),
        ("GET", "/read") => json(StatusCode::OK, r#"{"read":true}"#),
        ("POST", "/ok") => json(StatusCode::CREATED, r#"{"ok":true}"#),
        ("POST", "/fail") => json(StatusCode::CONFLICT, r#"{"error":"no"}"#),
        ("POST", "/bad") => StatusCode::BAD_REQUEST.into_response(),
        _ => StatusCode::NOT_FOUND.into_response(),
    }
}

/// Writes a config for `apps` (partitions `a`, `b`, `c`, … in order; `a` is the primary)
/// with `extra` lines in the group, as `BankGroup::start` does, and starts the proxy.
async fn start_proxy(dir: &Path, apps: &[App], extra: &str) -> Proxy {
    let journal = format!("sqlite://{}", dir.join("journal.db").display());
    let mut toml = format!(
        "listen = \"127.0.0.1:0\"\nadmin_listen = \"127.0.0.1:0\"\njournal = \"{journal}\"\n\n[[groups]]\nname = \"rec\"\n{extra}\n"
    );
    for (name, app) in ["a", "b", "c"].iter().zip(apps) {
        toml.push_str(&format!(
            "\n[[groups.partitions]]\nname = \"{name}\"\nurl = \"{}\"\n",
            app.url
        ));
    }
    let config = dir.join("regroup.toml");
    std::fs::write(&config, toml).unwrap();
    Proxy::start(&config).await
}

type Body = UnsyncBoxBody<Bytes, Infallible>;

/// An answer with its headers.
struct Reply {
    status: u16,
    headers: HeaderMap,
    body: Bytes,
}

impl Reply {
    fn seq(&self) -> Option<&str> {
        self.headers.get("regroup-seq").map(|v| v.to_str().unwrap())
    }
}

/// A hyper client for requests with custom headers and bodies.
struct Raw(Client<HttpConnector, Body>);

impl Raw {
    fn new() -> Raw {
        Raw(Client::builder(TokioExecutor::new()).build(HttpConnector::new()))
    }

    async fn send(&self, method: &str, url: &str, headers: &[(&str, &str)], body: Body) -> Reply {
        let mut req = http::Request::builder().method(method).uri(url);
        for (k, v) in headers {
            req = req.header(*k, *v);
        }
        let resp = tokio::time::timeout(
            Duration::from_secs(10),
            self.0.request(req.body(body).unwrap()),
        )
        .await
        .unwrap_or_else(|_| panic!("{method} {url}: no answer within 10 s"))
        .unwrap();
        let status = resp.status().as_u16();
        let headers = resp.headers().clone();
        let body = resp.into_body().collect().await.unwrap().to_bytes();
        Reply {
            status,
            headers,
            body,
        }
    }

    async fn post(&self, url: &str, body: impl Into<Bytes>) -> Reply {
        self.send(
            "POST",
            url,
            &[("content-type", "application/json")],
            full(body),
        )
        .await
    }
}

fn full(body: impl Into<Bytes>) -> Body {
    Full::new(body.into()).boxed_unsync()
}

/// Waits until every partition is `available` and has applied exactly `head`, which is
/// the journal's head; panics at once if one diverges.
async fn wait_applied(proxy: &Proxy, http: &HttpClient, head: u64) -> GroupStatus {
    eventually(
        "every partition to apply the whole journal",
        Duration::from_secs(30),
        || async {
            let g = proxy.status(http).await.groups.remove(0);
            if let Some(p) = g.partitions.iter().find(|p| p.status == "diverged") {
                panic!("partition {} diverged: {}", p.name, p.reason);
            }
            if g.head == head
                && g.in_doubt.is_empty()
                && g.partitions
                    .iter()
                    .all(|p| p.applied == head && p.status == "available")
            {
                Ok(g)
            } else {
                Err(format!("{g:?}"))
            }
        },
    )
    .await
}

/// Sends ok, fail, missing, bad, ok and asserts that the client got each app answer
/// unchanged, with `regroup-seq` 1..5.
async fn send_mixed(raw: &Raw, proxy: &Proxy) {
    let want: [(&str, u16, &str); 5] = [
        ("/ok", 201, r#"{"ok":true}"#),
        ("/fail", 409, r#"{"error":"no"}"#),
        ("/missing", 404, ""),
        ("/bad", 400, ""),
        ("/ok", 201, r#"{"ok":true}"#),
    ];
    for (i, (path, status, body)) in want.into_iter().enumerate() {
        let r = raw.post(&format!("{}{path}", proxy.url), "{}").await;
        assert_eq!(
            (r.status, String::from_utf8_lossy(&r.body).as_ref()),
            (status, body),
            "POST {path}"
        );
        assert_eq!(r.seq(), Some((i + 1).to_string().as_str()), "POST {path}");
    }
}

fn expected(
    list: &[(&str, &str)],
    replay: bool,
) -> Vec<(String, String, Option<String>, Option<String>)> {
    list.iter()
        .map(|(path, seq)| {
            (
                "POST".to_owned(),
                (*path).to_owned(),
                replay.then(|| "1".to_owned()),
                Some((*seq).to_owned()),
            )
        })
        .collect()
}

const MIXED: [(&str, &str); 5] = [
    ("/ok", "1"),
    ("/fail", "2"),
    ("/missing", "3"),
    ("/bad", "4"),
    ("/ok", "5"),
];

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn three_partitions_replay_failed_updates() {
    let dir = tempfile::tempdir().unwrap();
    let apps = [App::start().await, App::start().await, App::start().await];
    let proxy = start_proxy(dir.path(), &apps, "").await;
    let (raw, http) = (Raw::new(), HttpClient::new());

    send_mixed(&raw, &proxy).await;
    let g = wait_applied(&proxy, &http, 5).await;
    assert_eq!(g.primary, "a");

    assert_eq!(apps[0].short(), expected(&MIXED, false), "primary");
    for (name, app) in ["b", "c"].iter().zip(&apps[1..]) {
        assert_eq!(app.short(), expected(&MIXED, true), "replica {name}");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn three_partitions_replay_success_only() {
    let dir = tempfile::tempdir().unwrap();
    let apps = [App::start().await, App::start().await, App::start().await];
    let proxy = start_proxy(dir.path(), &apps, "replay = \"success\"").await;
    let (raw, http) = (Raw::new(), HttpClient::new());

    // The client sees the same answers and seqs: every update is journaled.
    send_mixed(&raw, &proxy).await;
    // Replicas pass the skipped records too, so they reach 5.
    wait_applied(&proxy, &http, 5).await;

    assert_eq!(apps[0].short(), expected(&MIXED, false), "primary");
    for (name, app) in ["b", "c"].iter().zip(&apps[1..]) {
        assert_eq!(
            app.short(),
            expected(&[("/ok", "1"), ("/ok", "5")], true),
            "replica {name} must get only the 2xx updates"
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn single_partition_rejects_oversized_body() {
    let dir = tempfile::tempdir().unwrap();
    let apps = [App::start().await];
    let proxy = start_proxy(dir.path(), &apps, "max_body_bytes = 1024").await;
    let (raw, http) = (Raw::new(), HttpClient::new());
    let big = format!("\"{}\"", "x".repeat(1998));
    assert_eq!(big.len(), 2000);
    let want = serde_json::json!({
        "error": "body_too_large",
        "message": "request body is larger than the limit of 1024 bytes",
    });

    // With Content-Length: refused up front.
    let r = raw.post(&format!("{}/ok", proxy.url), big.clone()).await;
    assert_eq!(r.status, 413, "{}", String::from_utf8_lossy(&r.body));
    assert_eq!(r.headers["content-type"], "application/json");
    assert_eq!(
        serde_json::from_slice::<serde_json::Value>(&r.body).unwrap(),
        want
    );
    assert_eq!(r.seq(), None);

    // Chunked, without Content-Length: refused while reading.
    let chunks: Vec<Result<Frame<Bytes>, Infallible>> = big
        .as_bytes()
        .chunks(500)
        .map(|c| Ok(Frame::data(Bytes::copy_from_slice(c))))
        .collect();
    let body = StreamBody::new(futures_util::stream::iter(chunks)).boxed_unsync();
    let r = raw
        .send(
            "POST",
            &format!("{}/ok", proxy.url),
            &[("content-type", "application/json")],
            body,
        )
        .await;
    assert_eq!(r.status, 413, "{}", String::from_utf8_lossy(&r.body));
    assert_eq!(
        serde_json::from_slice::<serde_json::Value>(&r.body).unwrap(),
        want
    );

    let g = proxy.status(&http).await.groups.remove(0);
    assert_eq!((g.head, g.sealed), (0, 0), "{g:?}");
    assert_eq!(apps[0].seen(), [], "the app must never see a refused body");

    // A body at the limit goes through and takes seq 1: nothing was journaled before.
    let at_limit = format!("\"{}\"", "x".repeat(1022));
    let r = raw.post(&format!("{}/ok", proxy.url), at_limit).await;
    assert_eq!((r.status, r.seq()), (201, Some("1")));
    assert_eq!(apps[0].short(), expected(&[("/ok", "1")], false));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn three_partitions_forged_replay_headers_are_stripped() {
    let dir = tempfile::tempdir().unwrap();
    let apps = [App::start().await, App::start().await, App::start().await];
    let proxy = start_proxy(dir.path(), &apps, "").await;
    let (raw, http) = (Raw::new(), HttpClient::new());
    let forged_txn = "00000000-0000-7000-8000-000000000999";
    let forged = [
        ("content-type", "application/json"),
        ("Regroup-Seq", "999"),
        ("Regroup-Replay", "1"),
        ("Regroup-Txn-Id", forged_txn),
        ("Regroup-Epoch", "999"),
        ("Regroup-Timestamp", "2000-01-01T00:00:00Z"),
    ];

    let r = raw
        .send("POST", &format!("{}/ok", proxy.url), &forged, full("{}"))
        .await;
    assert_eq!((r.status, r.seq()), (201, Some("1")));
    wait_applied(&proxy, &http, 1).await;

    let primary = apps[0].seen();
    assert_eq!(primary.len(), 1, "{primary:?}");
    let p = &primary[0];
    assert_eq!(
        p.short(),
        ("POST", "/ok", None, Some("1")),
        "primary's copy"
    );
    assert_eq!(p.epoch.as_deref(), Some("1"));
    let txn = p.txn.clone().unwrap();
    assert_ne!(txn, forged_txn);
    for (name, app) in ["b", "c"].iter().zip(&apps[1..]) {
        let seen = app.seen();
        assert_eq!(seen.len(), 1, "replica {name}: {seen:?}");
        assert_eq!(
            seen[0].short(),
            ("POST", "/ok", Some("1"), Some("1")),
            "replica {name}"
        );
        assert_eq!(seen[0].txn.as_deref(), Some(txn.as_str()), "replica {name}");
        assert_eq!(seen[0].epoch.as_deref(), Some("1"), "replica {name}");
    }

    // A read does not carry them either.
    let r = raw
        .send("GET", &format!("{}/read", proxy.url), &forged, full(""))
        .await;
    assert_eq!(r.status, 200);
    let reads: Vec<Seen> = apps
        .iter()
        .flat_map(App::seen)
        .filter(|s| s.method == "GET")
        .collect();
    assert_eq!(reads.len(), 1, "{reads:?}");
    assert_eq!(
        (
            reads[0].short(),
            reads[0].txn.as_deref(),
            reads[0].epoch.as_deref()
        ),
        (("GET", "/read", None, None), None, None)
    );
}
