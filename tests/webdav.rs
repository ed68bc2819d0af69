//! A real application that no one here wrote: nginx's WebDAV module, three times behind
//! regroup. Concurrent clients send a bounded mix of PUT, DELETE, MKCOL, COPY and MOVE
//! (with `Destination` on the proxy's own host) and a few GETs; afterwards the three
//! directory trees are identical byte for byte and no partition is diverged.
//!
//! MKCOL, COPY and MOVE were once classified as reads and run on one copy only: this test
//! is what shows they are updates now. It needs Debian's `nginx` (built with the dav
//! module); it installs it when missing and it can (as root), and otherwise skips with a
//! printed reason, except under `CI=true`, where it fails.

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

/// Clients sending at once, and updates each sends.
const CLIENTS: usize = 4;
const OPS_PER_CLIENT: usize = 60;
/// Bound on the whole load.
const LOAD_TIMEOUT: Duration = Duration::from_secs(120);

/// Finds nginx, installing Debian's package once when it is missing.
fn nginx() -> Option<PathBuf> {
    static INSTALL: Mutex<()> = Mutex::new(());
    let _once = INSTALL.lock().unwrap_or_else(|p| p.into_inner());
    let find = || {
        ["/usr/sbin/nginx", "/usr/bin/nginx", "/usr/local/sbin/nginx"]
            .into_iter()
            .map(PathBuf::from)
            .find(|p| p.exists())
    };
    if let Some(p) = find() {
        return Some(p);
    }
    let root = std::process::Command::new("id")
        .arg("-u")
        .output()
        .is_ok_and(|o| o.stdout.starts_with(b"0"));
    if root {
        eprintln!("nginx is missing: installing Debian's nginx package");
        let run = |args: &[&str]| {
            std::process::Command::new("apt-get")
                .args(args)
                .env("DEBIAN_FRONTEND", "noninteractive")
                .stdout(Stdio::null())
                .status()
                .is_ok_and(|s| s.success())
        };
        let _ = run(&["update", "-qq"]) && run(&["install", "-y", "-qq", "nginx"]);
    }
    let found = find();
    if found.is_none() {
        assert!(!in_ci(), "nginx is missing and could not be installed");
        eprintln!("skipping: nginx is missing and could not be installed (not root?)");
    }
    found
}

/// One nginx WebDAV server with its own root, temp dirs and logs; killed on drop.
struct Dav {
    url: String,
    root: PathBuf,
    _child: Child,
}

impl Dav {
    /// Starts nginx in `dir` on a free port (retrying when another process took it).
    async fn start(nginx: &Path, dir: &Path) -> Dav {
        let root = dir.join("root");
        let tmp = dir.join("tmp");
        for d in [&root, &tmp] {
            std::fs::create_dir_all(d).unwrap();
        }
        let mut last = String::new();
        for _ in 0..10 {
            let port = std::net::TcpListener::bind("127.0.0.1:0")
                .unwrap()
                .local_addr()
                .unwrap()
                .port();
            let conf = dir.join("nginx.conf");
            std::fs::write(&conf, config(dir, &root, &tmp, port)).unwrap();
            let mut child = Command::new(nginx)
                .args(["-p", dir.to_str().unwrap(), "-e", "error.log", "-c"])
                .arg(&conf)
                .stdin(Stdio::null())
                .stdout(Stdio::null())
                .stderr(Stdio::null())
                .kill_on_drop(true)
                .spawn()
                .unwrap();
            let url = format!("http://127.0.0.1:{port}");
            let http = HttpClient::new();
            let deadline = Instant::now() + Duration::from_secs(10);
            while Instant::now() < deadline {
                if let Ok(Some(status)) = child.try_wait() {
                    last = format!(
                        "nginx exited with {status}: {}",
                        std::fs::read_to_string(dir.join("error.log")).unwrap_or_default()
                    );
                    break;
                }
                if http
                    .get(&format!("{url}/health"))
                    .await
                    .is_ok_and(|a| a.status == 200)
                {
                    return Dav {
                        url,
                        root,
                        _child: child,
                    };
                }
                tokio::time::sleep(Duration::from_millis(25)).await;
            }
            let _ = child.kill().await;
        }
        panic!("nginx did not start: {last}");
    }
}

/// An nginx configuration for one partition: the dav module on `root`, every temp path
/// and log in `dir`, no master process, and nothing that differs between copies in a body.
fn config(dir: &Path, root: &Path, tmp: &Path, port: u16) -> String {
    let (dir, root, tmp) = (dir.display(), root.display(), tmp.display());
    format!(
        r#"daemon off;
master_process off;
worker_processes 1;
pid {dir}/nginx.pid;
error_log {dir}/error.log warn;
events {{ worker_connections 256; }}
http {{
    access_log {dir}/access.log;
    client_body_temp_path {tmp}/body;
    proxy_temp_path {tmp}/proxy;
    fastcgi_temp_path {tmp}/fastcgi;
    uwsgi_temp_path {tmp}/uwsgi;
    scgi_temp_path {tmp}/scgi;
    server {{
        listen 127.0.0.1:{port};
        root {root};
        location = /health {{ return 200 "ok\n"; }}
        location / {{
            dav_methods PUT DELETE MKCOL COPY MOVE;
            create_full_put_path on;
            dav_access user:rw group:r all:r;
            client_max_body_size 1m;
        }}
    }}
}}
"#
    )
}

/// Every file and directory under `root`: relative path → `None` (directory) or the bytes.
fn tree(root: &Path) -> BTreeMap<String, Option<Vec<u8>>> {
    fn walk(root: &Path, dir: &Path, out: &mut BTreeMap<String, Option<Vec<u8>>>) {
        for entry in std::fs::read_dir(dir).unwrap() {
            let path = entry.unwrap().path();
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

type Dav1 = Client<HttpConnector, Full<Bytes>>;

/// One request; the status (0 when no answer came).
async fn send(
    client: &Dav1,
    method: &str,
    url: &str,
    headers: &[(&str, String)],
    body: Bytes,
) -> u16 {
    let mut req = http::Request::builder().method(method).uri(url);
    for (k, v) in headers {
        req = req.header(*k, v);
    }
    let req = req.body(Full::new(body)).unwrap();
    match tokio::time::timeout(Duration::from_secs(20), client.request(req)).await {
        Ok(Ok(resp)) => {
            let status = resp.status().as_u16();
            let _ = resp.into_body().collect().await;
            status
        }
        _ => 0,
    }
}

/// A random path: a file or a collection under a small namespace, so operations collide.
fn pick(rng: &mut StdRng, collection: bool) -> String {
    let dirs = ["", "x/", "y/", "x/z/"];
    let dir = dirs[rng.random_range(0..dirs.len())];
    if collection {
        let d = if dir.is_empty() { "x/" } else { dir };
        return format!("/{d}");
    }
    let names = ["a", "b", "c", "d.txt"];
    format!("/{dir}{}", names[rng.random_range(0..names.len())])
}

/// One client's run: `OPS_PER_CLIENT` updates (and a GET after every fourth); the
/// `(method, status)` pairs seen.
async fn client_run(proxy: String, seed: u64) -> Vec<(String, u16)> {
    let client: Dav1 = Client::builder(TokioExecutor::new()).build(HttpConnector::new());
    let mut rng = StdRng::seed_from_u64(seed);
    let mut seen = Vec::new();
    for i in 0..OPS_PER_CLIENT {
        let (method, path, headers, body) = match rng.random_range(0..100) {
            0..35 => {
                let body = format!("client {seed} op {i} {}\n", rng.random::<u32>());
                ("PUT", pick(&mut rng, false), vec![], Bytes::from(body))
            }
            35..50 => {
                let collection = rng.random_bool(0.3);
                ("DELETE", pick(&mut rng, collection), vec![], Bytes::new())
            }
            50..65 => ("MKCOL", pick(&mut rng, true), vec![], Bytes::new()),
            r => {
                let method = if r < 83 { "COPY" } else { "MOVE" };
                let collection = rng.random_bool(0.2);
                let (from, mut to) = (pick(&mut rng, collection), pick(&mut rng, collection));
                if collection && (to.starts_with(&from) || from.starts_with(&to)) {
                    // A collection into its own subtree (or over its parent): nginx copies
                    // forever instead of refusing it as RFC 4918 asks. Not the point here.
                    to = "/y/".to_owned();
                    if from.starts_with("/y/") {
                        to = "/x/".to_owned();
                    }
                }
                let mut headers = vec![("destination", format!("{proxy}{to}"))];
                if rng.random_bool(0.3) {
                    headers.push(("overwrite", "F".to_owned()));
                }
                if collection {
                    headers.push(("depth", "infinity".to_owned()));
                }
                (method, from, headers, Bytes::new())
            }
        };
        let status = send(&client, method, &format!("{proxy}{path}"), &headers, body).await;
        seen.push((method.to_owned(), status));
        if i % 4 == 3 {
            let path = pick(&mut rng, false);
            let status = send(&client, "GET", &format!("{proxy}{path}"), &[], Bytes::new()).await;
            seen.push(("GET".to_owned(), status));
        }
    }
    seen
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn three_partitions_nginx_webdav_trees_stay_identical_under_concurrent_updates() {
    let Some(nginx) = nginx() else {
        return;
    };
    let dir = tempfile::tempdir().unwrap();
    let mut davs = Vec::new();
    for name in ["a", "b", "c"] {
        let d = dir.path().join(name);
        std::fs::create_dir_all(&d).unwrap();
        davs.push(Dav::start(&nginx, &d).await);
    }
    let journal = dir.path().join("journal.db");
    let mut toml = format!(
        "listen = \"127.0.0.1:0\"\nadmin_listen = \"127.0.0.1:0\"\njournal = \"sqlite://{}\"\n\n[[groups]]\nname = \"dav\"\n",
        journal.display()
    );
    for (name, d) in ["a", "b", "c"].iter().zip(&davs) {
        toml.push_str(&format!(
            "\n[[groups.partitions]]\nname = \"{name}\"\nurl = \"{}\"\n",
            d.url
        ));
    }
    let config = dir.path().join("regroup.toml");
    std::fs::write(&config, toml).unwrap();
    let proxy = Proxy::start(&config).await;

    let started = Instant::now();
    let clients: Vec<_> = (0..CLIENTS)
        .map(|i| tokio::spawn(client_run(proxy.url.clone(), 1000 + i as u64)))
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
    // nginx's own answers include 500 (e.g. COPY of a file onto an existing collection,
    // the same on every copy); what must not appear is the proxy failing: no answer, 502,
    // 503 or 504.
    assert!(
        seen.iter().all(|(_, s)| !matches!(*s, 0 | 502 | 503 | 504)),
        "every request answered by nginx: {statuses:?}"
    );
    for method in ["PUT", "DELETE", "MKCOL", "COPY", "MOVE"] {
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
    let updates = seen.iter().filter(|(m, _)| m != "GET").count() as u64;
    assert_eq!(doc.groups[0].head, updates, "every update journaled once");

    let first = tree(&davs[0].root);
    assert!(
        first.values().any(Option::is_some),
        "the load left some files: {first:?}"
    );
    for (name, d) in ["b", "c"].iter().zip(&davs[1..]) {
        let other = tree(&d.root);
        assert_eq!(
            other.keys().collect::<Vec<_>>(),
            first.keys().collect::<Vec<_>>(),
            "the tree of {name} differs from a's"
        );
        assert!(other == first, "file contents of {name} differ from a's");
    }
}
