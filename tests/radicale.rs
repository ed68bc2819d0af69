//! A second real application: Radicale, a CalDAV server, three times behind regroup.
//! Concurrent clients create calendars (MKCALENDAR), set their properties (PROPPATCH), put,
//! move and delete events; afterwards the three storage trees hold the same data byte for
//! byte and no partition is diverged.
//!
//! Needs Debian's `radicale`; installs it when missing and it can (as root), otherwise
//! skips with a printed reason, except under `CI=true`, where it fails.

#![allow(clippy::unwrap_used)]

mod support;

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::sync::Mutex;
use std::time::{Duration, Instant};

use bytes::Bytes;
use http_body_util::{BodyExt, Full};
use hyper_util::client::legacy::Client;
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::rt::TokioExecutor;
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use regroup::client::HttpClient;
use support::*;
use tokio::process::{Child, Command};

const CLIENTS: usize = 3;
const OPS_PER_CLIENT: usize = 40;
const LOAD_TIMEOUT: Duration = Duration::from_secs(120);
/// Radicale accepts any credentials with `auth type = none`; the user owns `/alice/`.
const AUTH: &str = "Basic YWxpY2U6eA==";

/// Finds radicale, installing Debian's package once when it is missing.
fn radicale() -> Option<PathBuf> {
    static INSTALL: Mutex<()> = Mutex::new(());
    let _once = INSTALL.lock().unwrap_or_else(|p| p.into_inner());
    let find = || Some(PathBuf::from("/usr/bin/radicale")).filter(|p| p.exists());
    if let Some(p) = find() {
        return Some(p);
    }
    let root = std::process::Command::new("id")
        .arg("-u")
        .output()
        .is_ok_and(|o| o.stdout.starts_with(b"0"));
    if root {
        eprintln!("radicale is missing: installing Debian's radicale package");
        let run = |args: &[&str]| {
            std::process::Command::new("apt-get")
                .args(args)
                .env("DEBIAN_FRONTEND", "noninteractive")
                .stdout(Stdio::null())
                .status()
                .is_ok_and(|s| s.success())
        };
        let _ = run(&["update", "-qq"]) && run(&["install", "-y", "-qq", "radicale"]);
    }
    let found = find();
    if found.is_none() {
        assert!(!in_ci(), "radicale is missing and could not be installed");
        eprintln!("skipping: radicale is missing and could not be installed (not root?)");
    }
    found
}

/// One Radicale server with its own storage; killed on drop.
struct Cal {
    url: String,
    storage: PathBuf,
    _child: Child,
}

impl Cal {
    async fn start(radicale: &Path, dir: &Path) -> Cal {
        let storage = dir.join("collections");
        std::fs::create_dir_all(&storage).unwrap();
        let mut last = String::new();
        for _ in 0..10 {
            let port = std::net::TcpListener::bind("127.0.0.1:0")
                .unwrap()
                .local_addr()
                .unwrap()
                .port();
            let conf = dir.join("radicale.conf");
            std::fs::write(
                &conf,
                format!(
                    "[server]\nhosts = 127.0.0.1:{port}\n[auth]\ntype = none\n[rights]\ntype = owner_only\n[storage]\nfilesystem_folder = {}\n[web]\ntype = none\n[logging]\nlevel = warning\n",
                    storage.display()
                ),
            )
            .unwrap();
            let log = std::fs::File::create(dir.join("radicale.log")).unwrap();
            let mut child = Command::new(radicale)
                .arg("--config")
                .arg(&conf)
                .stdin(Stdio::null())
                .stdout(Stdio::null())
                .stderr(Stdio::from(log))
                .kill_on_drop(true)
                .spawn()
                .unwrap();
            let url = format!("http://127.0.0.1:{port}");
            let http = HttpClient::new();
            let deadline = Instant::now() + Duration::from_secs(15);
            while Instant::now() < deadline {
                if let Ok(Some(status)) = child.try_wait() {
                    last = format!(
                        "radicale exited with {status}: {}",
                        std::fs::read_to_string(dir.join("radicale.log")).unwrap_or_default()
                    );
                    break;
                }
                if http
                    .get(&format!("{url}/.web"))
                    .await
                    .is_ok_and(|a| a.status == 200)
                {
                    return Cal {
                        url,
                        storage,
                        _child: child,
                    };
                }
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
            let _ = child.kill().await;
        }
        panic!("radicale did not start: {last}");
    }
}

/// The stored data: relative path → bytes (`None`: a directory). Radicale's own caches
/// and lock files (`.Radicale.cache`, `.Radicale.lock`) are derived state, left out.
fn tree(root: &Path) -> BTreeMap<String, Option<Vec<u8>>> {
    fn walk(root: &Path, dir: &Path, out: &mut BTreeMap<String, Option<Vec<u8>>>) {
        for entry in std::fs::read_dir(dir).unwrap() {
            let path = entry.unwrap().path();
            let name = path.file_name().unwrap().to_string_lossy().into_owned();
            if name == ".Radicale.cache" || name == ".Radicale.lock" {
                continue;
            }
            let rel = path.strip_prefix(root).unwrap().display().to_string();
            if path.is_dir() {
                out.insert(format!("{rel}/"), None);
                walk(root, &path, out);
            } else {
                out.insert(rel, Some(std::fs::read(&path).unwrap()));
            }
        }
    }
    let mut out = BTreeMap::new();
    walk(root, root, &mut out);
    out
}

type Http1 = Client<HttpConnector, Full<Bytes>>;

async fn send(
    client: &Http1,
    method: &str,
    url: &str,
    headers: &[(&str, String)],
    body: String,
) -> u16 {
    let mut req = http::Request::builder()
        .method(method)
        .uri(url)
        .header("authorization", AUTH);
    for (k, v) in headers {
        req = req.header(*k, v);
    }
    let req = req.body(Full::new(Bytes::from(body))).unwrap();
    match tokio::time::timeout(Duration::from_secs(20), client.request(req)).await {
        Ok(Ok(resp)) => {
            let status = resp.status().as_u16();
            let _ = resp.into_body().collect().await;
            status
        }
        _ => 0,
    }
}

fn event(uid: &str, summary: &str) -> String {
    format!(
        "BEGIN:VCALENDAR\r\nVERSION:2.0\r\nPRODID:-//regroup//test//EN\r\nBEGIN:VEVENT\r\nUID:{uid}\r\nDTSTAMP:20261201T090000Z\r\nDTSTART:20261202T100000Z\r\nDTEND:20261202T110000Z\r\nSUMMARY:{summary}\r\nEND:VEVENT\r\nEND:VCALENDAR\r\n"
    )
}

async fn client_run(proxy: String, seed: u64) -> Vec<(String, u16)> {
    let client: Http1 = Client::builder(TokioExecutor::new()).build(HttpConnector::new());
    let mut rng = StdRng::seed_from_u64(seed);
    let cal = |rng: &mut StdRng| format!("/alice/cal{}/", rng.random_range(0..3));
    let mut seen = Vec::new();
    for i in 0..OPS_PER_CLIENT {
        let (method, path, headers, body) = match rng.random_range(0..100) {
            0..15 => ("MKCALENDAR", cal(&mut rng), vec![], String::new()),
            15..30 => {
                let body = format!(
                    "<?xml version=\"1.0\"?><D:propertyupdate xmlns:D=\"DAV:\"><D:set><D:prop><D:displayname>client {seed} op {i}</D:displayname></D:prop></D:set></D:propertyupdate>"
                );
                let headers = vec![("content-type", "application/xml".to_owned())];
                ("PROPPATCH", cal(&mut rng), headers, body)
            }
            30..65 => {
                let uid = format!("e{}", rng.random_range(0..5));
                let path = format!("{}{uid}.ics", cal(&mut rng));
                let headers = vec![("content-type", "text/calendar".to_owned())];
                (
                    "PUT",
                    path,
                    headers,
                    event(&uid, &format!("client {seed} op {i}")),
                )
            }
            65..85 => {
                let uid = format!("e{}", rng.random_range(0..5));
                let from = format!("{}{uid}.ics", cal(&mut rng));
                let to = format!("{}{uid}.ics", cal(&mut rng));
                let headers = vec![("destination", format!("{proxy}{to}"))];
                ("MOVE", from, headers, String::new())
            }
            _ => {
                let path = if rng.random_bool(0.2) {
                    cal(&mut rng)
                } else {
                    format!("{}e{}.ics", cal(&mut rng), rng.random_range(0..5))
                };
                ("DELETE", path, vec![], String::new())
            }
        };
        let status = send(&client, method, &format!("{proxy}{path}"), &headers, body).await;
        seen.push((method.to_owned(), status));
    }
    seen
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn three_partitions_radicale_caldav_storage_stays_identical() {
    let Some(radicale) = radicale() else {
        return;
    };
    let dir = tempfile::tempdir().unwrap();
    let mut cals = Vec::new();
    for name in ["a", "b", "c"] {
        let d = dir.path().join(name);
        std::fs::create_dir_all(&d).unwrap();
        cals.push(Cal::start(&radicale, &d).await);
    }
    let mut toml = format!(
        "listen = \"127.0.0.1:0\"\nadmin_listen = \"127.0.0.1:0\"\njournal = \"sqlite://{}\"\n\n[[groups]]\nname = \"cal\"\nhealth_path = \"/.web\"\n",
        dir.path().join("journal.db").display()
    );
    for (name, c) in ["a", "b", "c"].iter().zip(&cals) {
        toml.push_str(&format!(
            "\n[[groups.partitions]]\nname = \"{name}\"\nurl = \"{}\"\n",
            c.url
        ));
    }
    let config = dir.path().join("regroup.toml");
    std::fs::write(&config, toml).unwrap();
    let proxy = Proxy::start(&config).await;

    let started = Instant::now();
    let clients: Vec<_> = (0..CLIENTS)
        .map(|i| tokio::spawn(client_run(proxy.url.clone(), 2000 + i as u64)))
        .collect();
    let mut seen = Vec::new();
    for c in clients {
        let remaining = LOAD_TIMEOUT.saturating_sub(started.elapsed());
        let run = tokio::time::timeout(remaining, c)
            .await
            .expect("the load finished in time")
            .unwrap();
        seen.extend(run);
    }
    let mut statuses: BTreeMap<(String, u16), usize> = BTreeMap::new();
    for s in &seen {
        *statuses.entry(s.clone()).or_default() += 1;
    }
    eprintln!("answers (method, status) → count: {statuses:?}");
    assert!(
        seen.iter().all(|(_, s)| !matches!(*s, 0 | 503 | 504)),
        "every request answered by radicale: {statuses:?}"
    );
    for method in ["MKCALENDAR", "PROPPATCH", "PUT", "MOVE", "DELETE"] {
        assert!(
            seen.iter()
                .any(|(m, s)| m == method && (200..300).contains(s)),
            "{method} succeeded at least once: {statuses:?}"
        );
    }

    let http = HttpClient::new();
    let doc = eventually(
        "every partition to apply the whole journal",
        Duration::from_secs(30),
        || async {
            let doc = proxy.status(&http).await;
            let g = &doc.groups[0];
            if let Some(p) = g.partitions.iter().find(|p| p.status == "diverged") {
                panic!("partition {} diverged: {}", p.name, p.reason);
            }
            let done = g.in_doubt.is_empty()
                && g.partitions
                    .iter()
                    .all(|p| p.applied == g.head && p.status == "available");
            if done { Ok(doc) } else { Err(format!("{g:?}")) }
        },
    )
    .await;
    assert_eq!(
        doc.groups[0].head,
        seen.len() as u64,
        "every update journaled once"
    );

    let first = tree(&cals[0].storage);
    assert!(
        first.keys().any(|k| k.ends_with(".ics")),
        "the load left some events: {:?}",
        first.keys().collect::<Vec<_>>()
    );
    for (name, c) in ["b", "c"].iter().zip(&cals[1..]) {
        let other = tree(&c.storage);
        assert_eq!(
            other.keys().collect::<Vec<_>>(),
            first.keys().collect::<Vec<_>>(),
            "the tree of {name} differs from a's"
        );
        assert!(other == first, "stored data of {name} differs from a's");
    }
}
