//! NATS for the tests: a journal prefix of its own on the local server (127.0.0.1:4222,
//! `nats-server -js`), deleted afterwards, and a 3-node JetStream cluster started by the
//! test on loopback ports with its own store directories (`nats-server` from Debian,
//! installed when missing).

use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::time::Duration;

use regroup_replay::NatsJournal;
use tokio::process::{Child, Command};

/// The local server the tests share.
pub const LOCAL_URL: &str = "nats://127.0.0.1:4222";

/// A prefix no other run uses.
pub fn unique_prefix() -> String {
    format!("T{:016X}", rand::random::<u64>())
}

/// Whether the local server answers with JetStream: `Err` with the reason otherwise.
pub async fn local_reachable() -> Result<(), String> {
    tokio::time::timeout(Duration::from_secs(10), NatsJournal::probe(LOCAL_URL))
        .await
        .map_err(|_| "no answer within 10 s".to_owned())?
        .map_err(|e| e.to_string())
}

/// `true` when the local server is there; `false` (printing why) when it is not outside
/// CI; panics in CI.
pub async fn local_or_skip() -> bool {
    match local_reachable().await {
        Ok(()) => true,
        Err(e) if super::in_ci() => {
            panic!("NATS not reachable at {LOCAL_URL} (required in CI): {e}")
        }
        Err(e) => {
            eprintln!("skipping: NATS not reachable at {LOCAL_URL}: {e}");
            false
        }
    }
}

/// A journal prefix of its own on `url`; every stream and bucket of it is deleted when
/// this is dropped (also when the test fails).
pub struct TempJournal {
    pub server: String,
    pub prefix: String,
}

impl TempJournal {
    pub fn new(server: &str) -> TempJournal {
        TempJournal {
            server: server.to_owned(),
            prefix: unique_prefix(),
        }
    }

    /// The journal URL for the proxy's config.
    pub fn url(&self) -> String {
        format!("{}?prefix={}", self.server, self.prefix)
    }

    /// A handle of its own on the journal.
    pub async fn open(&self) -> NatsJournal {
        NatsJournal::connect(&self.url())
            .await
            .unwrap_or_else(|e| panic!("opening {}: {e}", self.url()))
    }
}

impl Drop for TempJournal {
    fn drop(&mut self) {
        // Drop may run inside the test's runtime, which cannot be blocked on: clean up from
        // a thread with a runtime of its own.
        let (server, prefix) = (self.server.clone(), self.prefix.clone());
        let done = std::thread::spawn(move || {
            if let Ok(rt) = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
            {
                rt.block_on(async {
                    let cleanup = delete_journal(&server, &prefix);
                    if tokio::time::timeout(Duration::from_secs(20), cleanup)
                        .await
                        .is_err()
                    {
                        eprintln!("cleaning up NATS journal {prefix}: no answer within 20 s");
                    }
                });
            }
        });
        let _ = done.join();
    }
}

/// Deletes every stream and bucket of `prefix` on `url` (best effort, logged).
pub async fn delete_journal(url: &str, prefix: &str) {
    match NatsJournal::connect_with_prefix(url, prefix).await {
        Ok(j) => {
            if let Err(e) = j.delete_all().await {
                eprintln!("cleaning up NATS journal {prefix}: {e}");
            }
        }
        Err(e) => eprintln!("cleaning up NATS journal {prefix}: {e}"),
    }
}

/// The `nats-server` program, installed from Debian when missing.
pub fn nats_server() -> PathBuf {
    for p in ["/usr/sbin/nats-server", "/usr/bin/nats-server"] {
        if Path::new(p).exists() {
            return PathBuf::from(p);
        }
    }
    let ok = std::process::Command::new("apt-get")
        .arg("update")
        .status()
        .is_ok_and(|s| s.success())
        && std::process::Command::new("apt-get")
            .args(["install", "-y", "nats-server"])
            .env("DEBIAN_FRONTEND", "noninteractive")
            .status()
            .is_ok_and(|s| s.success());
    assert!(ok, "installing nats-server with apt-get failed");
    PathBuf::from("/usr/sbin/nats-server")
}

/// `n` distinct free loopback ports (bound together, then released: the servers bind them
/// right after). Bound one at a time and released, the kernel may hand the same port out
/// twice.
fn free_ports(n: usize) -> Vec<u16> {
    let held: Vec<std::net::TcpListener> = (0..n)
        .map(|_| std::net::TcpListener::bind("127.0.0.1:0").expect("bind a port"))
        .collect();
    held.iter()
        .map(|l| l.local_addr().expect("local addr").port())
        .collect()
}

/// One node of a [`Cluster`].
pub struct Node {
    pub name: String,
    pub client_port: u16,
    pub cluster_port: u16,
    pub store: PathBuf,
    pub log: PathBuf,
    child: Option<Child>,
}

/// A 3-node JetStream cluster on loopback ports, stopped on drop.
pub struct Cluster {
    pub nodes: Vec<Node>,
    _dir: tempfile::TempDir,
}

impl Cluster {
    /// Starts three nodes and waits until JetStream answers on every one (bounded).
    pub async fn start() -> Cluster {
        let exe = nats_server();
        let dir = tempfile::tempdir().expect("temp dir");
        let mut nodes = Vec::new();
        let ports = free_ports(6);
        for i in 0..3 {
            let store = dir.path().join(format!("n{i}"));
            std::fs::create_dir_all(&store).expect("store dir");
            nodes.push(Node {
                name: format!("n{i}"),
                client_port: ports[2 * i],
                cluster_port: ports[2 * i + 1],
                log: dir.path().join(format!("n{i}.log")),
                store,
                child: None,
            });
        }
        let routes: Vec<String> = nodes
            .iter()
            .map(|n| format!("nats://127.0.0.1:{}", n.cluster_port))
            .collect();
        let routes = routes.join(",");
        let mut cluster = Cluster { nodes, _dir: dir };
        for i in 0..3 {
            cluster.spawn(&exe, i, &routes);
        }
        let url = cluster.url();
        super::eventually(
            "the NATS cluster to serve JetStream",
            Duration::from_secs(60),
            || {
                let url = url.clone();
                async move {
                    let prefix = unique_prefix();
                    let j = NatsJournal::connect_with_prefix(&url, &prefix)
                        .await
                        .map_err(|e| e.to_string())?;
                    let replicas = j.replicas();
                    let _ = j.delete_all().await;
                    if replicas == 3 {
                        Ok(())
                    } else {
                        Err(format!("{replicas} replicas"))
                    }
                }
            },
        )
        .await;
        cluster
    }

    fn spawn(&mut self, exe: &Path, i: usize, routes: &str) {
        let node = &mut self.nodes[i];
        let log = std::fs::File::create(&node.log).expect("log file");
        let child = Command::new(exe)
            .args([
                "-js",
                "-a",
                "127.0.0.1",
                "-p",
                &node.client_port.to_string(),
                "-n",
                &node.name,
                "--cluster_name",
                "regroup-test",
                "--cluster",
                &format!("nats://127.0.0.1:{}", node.cluster_port),
                "--routes",
                routes,
                "-sd",
                &node.store.display().to_string(),
            ])
            .stdout(Stdio::null())
            .stderr(log)
            .kill_on_drop(true)
            .spawn()
            .expect("start nats-server");
        node.child = Some(child);
    }

    /// The journal URL naming every node.
    pub fn url(&self) -> String {
        let servers: Vec<String> = self
            .nodes
            .iter()
            .map(|n| format!("127.0.0.1:{}", n.client_port))
            .collect();
        format!("nats://{}", servers.join(","))
    }

    /// Stops node `i` (SIGKILL).
    pub async fn kill(&mut self, i: usize) {
        if let Some(mut c) = self.nodes[i].child.take() {
            let _ = c.kill().await;
        }
    }

    /// The logs of every node (for a failure message).
    pub fn logs(&self) -> String {
        self.nodes
            .iter()
            .map(|n| {
                let text = std::fs::read_to_string(&n.log).unwrap_or_default();
                format!("--- {} ---\n{}", n.name, super::tail(&text, 30))
            })
            .collect::<Vec<_>>()
            .join("\n")
    }
}
