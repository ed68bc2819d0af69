//! Several proxies on one journal (`proxies = "several"`), for the tests on SQLite and on
//! NATS alike: who leads, transfer clients that retry on the other proxy, and one round of
//! "kill the leader, the other takes over, the killed one comes back as a follower".

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use rand::Rng;
use regroup::client::HttpClient;
use regroup_proxy::admin::StatusDoc;
use serde_json::{Value, json};
use tokio::task::JoinHandle;

use super::{BankGroup, Proxy, eventually};

/// Fast supervision for the group table of a several-proxies config.
pub const FAST: &str =
    "heartbeat_interval_ms = 100\nheartbeat_timeout_ms = 100\nheartbeat_retries = 3";

/// `p`'s `/status`, or `None` when it does not answer.
pub async fn doc(http: &HttpClient, p: &Proxy) -> Option<StatusDoc> {
    http.get(&format!("{}/status", p.admin))
        .await
        .ok()?
        .json()
        .ok()
}

/// Waits until `p` says it leads.
pub async fn leads(http: &HttpClient, p: &Proxy) {
    eventually("the proxy to lead", Duration::from_secs(30), || async {
        match doc(http, p).await.and_then(|d| d.proxy) {
            Some(s) if s.role == "leader" => Ok(()),
            other => Err(format!("{other:?}")),
        }
    })
    .await
}

/// Waits until `p`'s `/status` shows its first group's partitions all available at the head.
pub async fn caught_up(http: &HttpClient, p: &Proxy, what: &str) {
    eventually(what, Duration::from_secs(20), || async {
        let d = doc(http, p).await.ok_or("no status")?;
        let g = d.groups.first().ok_or("no group")?;
        if g.partitions
            .iter()
            .all(|p| p.status == "available" && p.applied == g.head)
        {
            Ok(())
        } else {
            Err(format!("{g:?}"))
        }
    })
    .await
}

/// Whether `p` says it leads now.
pub async fn is_leader(http: &HttpClient, p: &Proxy) -> bool {
    doc(http, p)
        .await
        .and_then(|d| d.proxy)
        .is_some_and(|s| s.role == "leader")
}

/// What the retrying clients saw.
#[derive(Debug, Default)]
pub struct Retried {
    /// Transfers answered 201, as returned.
    pub acked: Vec<Value>,
    /// Requests without a bank answer (no answer, or a proxy error), each retried on the
    /// other proxy: at most this many transfers may be stored beyond the acknowledged.
    pub errors: u64,
}

/// Transfer clients over two proxies: each sends random transfers between the seed
/// accounts to one proxy and, when it gets no bank answer, switches to the other. Bounded
/// by count and by time (120 s).
pub struct RetryingClients {
    urls: Arc<Mutex<Vec<String>>>,
    stop: Arc<AtomicBool>,
    clients: Vec<JoinHandle<Retried>>,
}

impl RetryingClients {
    /// Starts `n` clients over the proxies at `urls`.
    pub fn start(http: &HttpClient, urls: [String; 2], seeds: &[i64], n: usize) -> Self {
        let urls = Arc::new(Mutex::new(urls.to_vec()));
        let stop = Arc::new(AtomicBool::new(false));
        let clients = (0..n)
            .map(|c| {
                let (urls, stop, http, seeds) =
                    (urls.clone(), stop.clone(), http.clone(), seeds.to_vec());
                tokio::spawn(async move {
                    let mut seen = Retried::default();
                    let mut turn = c;
                    let started = Instant::now();
                    for _ in 0..100_000 {
                        if stop.load(Ordering::Relaxed)
                            || started.elapsed() > Duration::from_secs(120)
                        {
                            break;
                        }
                        let (from, to, amount) = {
                            let mut rng = rand::rng();
                            let from = seeds[rng.random_range(0..seeds.len())];
                            let to = seeds[rng.random_range(0..seeds.len())];
                            (from, to, rng.random_range(1..5))
                        };
                        if from == to {
                            continue;
                        }
                        let url = urls.lock().unwrap()[turn % 2].clone();
                        let body = json!({"from": from, "to": to, "amount": amount});
                        match http.post(&format!("{url}/transfers"), &body).await {
                            Ok(a) if a.status == 201 => seen.acked.push(a.json().unwrap()),
                            Ok(a) if a.status == 409 => {}
                            // No answer, or the proxy could not tell: retry on the other one.
                            _ => {
                                seen.errors += 1;
                                turn += 1;
                                tokio::time::sleep(Duration::from_millis(20)).await;
                            }
                        }
                    }
                    seen
                })
            })
            .collect();
        RetryingClients {
            urls,
            stop,
            clients,
        }
    }

    /// The proxy that was at `old` is at `new` now (restarted on new ports).
    pub fn moved(&self, old: &str, new: &str) {
        for u in self.urls.lock().unwrap().iter_mut() {
            if u == old {
                *u = new.to_owned();
            }
        }
    }

    /// Stops the clients and returns what they saw, together.
    pub async fn finish(self) -> Retried {
        self.stop.store(true, Ordering::Relaxed);
        let mut all = Retried::default();
        for c in self.clients {
            let seen = c.await.unwrap();
            all.acked.extend(seen.acked);
            all.errors += seen.errors;
        }
        all
    }
}

/// One leader failover: SIGKILLs `leader`, sends one transfer at a time through
/// `g.proxy` (the follower) until one is answered 201 (bounded: 60 s), waits for it to say
/// it leads, restarts the killed one (a follower now) and swaps the two, so that `leader`
/// is the one leading afterwards and `g.proxy` the restarted follower. Returns the failover time (the kill to
/// that 201) and the transfer, acknowledged.
pub async fn fail_over(
    g: &mut BankGroup,
    leader: &mut Proxy,
    clients: &RetryingClients,
    probe: (i64, i64),
) -> (Duration, Value) {
    let killed_at = Instant::now();
    let old_url = leader.url.clone();
    leader.kill().await;
    let body = json!({"from": probe.0, "to": probe.1, "amount": 1});
    let url = format!("{}/transfers", g.proxy.url);
    let acked = until_created(&g.http, &url, &body, Duration::from_secs(60)).await;
    let took = killed_at.elapsed();
    leads(&g.http, &g.proxy).await;
    leader.restart().await;
    clients.moved(&old_url, &leader.url);
    let s = doc(&g.http, leader).await.unwrap().proxy.unwrap();
    assert_eq!(s.role, "follower", "{s:?}");
    // Named by role again: `leader` leads, `g.proxy` (the restarted one) follows.
    std::mem::swap(&mut g.proxy, leader);
    (took, acked)
}

/// At most one stored transfer per request without a bank answer beyond the acknowledged
/// ones, and every stored transfer once (by id).
pub fn assert_at_most_once(acked: usize, errors: u64, transfers: &[Value]) {
    let mut ids: Vec<i64> = transfers
        .iter()
        .map(|t| t["id"].as_i64().unwrap())
        .collect();
    ids.sort_unstable();
    let stored = ids.len();
    ids.dedup();
    assert_eq!(ids.len(), stored, "a transfer id is stored twice");
    assert!(
        stored as u64 <= acked as u64 + errors,
        "{stored} transfers stored for {acked} acknowledged and {errors} without an answer"
    );
}

/// Posts `body` to `url` until it is answered 201 (bounded by `bound`): the answer's JSON.
pub async fn until_created(http: &HttpClient, url: &str, body: &Value, bound: Duration) -> Value {
    let started = Instant::now();
    let mut last = String::new();
    loop {
        assert!(
            started.elapsed() < bound,
            "POST {url} not answered 201 within {bound:?}; last: {last}"
        );
        match http.post(url, body).await {
            Ok(a) if a.status == 201 => return a.json().unwrap(),
            Ok(a) => last = format!("{} {}", a.status, String::from_utf8_lossy(&a.body)),
            Err(e) => last = format!("{e:#}"),
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

/// Both proxies up again and named by role: a proxy that exited (it stops when it finds
/// the journal taken over) is restarted, and `leader` is the one that leads.
pub async fn settle_roles(
    g: &mut BankGroup,
    leader: &mut Proxy,
    clients: Option<&RetryingClients>,
) {
    for p in [&mut *leader, &mut g.proxy] {
        if p.wait(Duration::from_millis(1)).await.is_some() || p.child_pid().is_none() {
            let old = p.url.clone();
            eprintln!("a proxy had stopped; its log:\n{}", p.log());
            p.restart().await;
            if let Some(c) = clients {
                c.moved(&old, &p.url);
            }
        }
    }
    eventually(
        "one of the two to lead",
        Duration::from_secs(30),
        || async {
            if is_leader(&g.http, leader).await || is_leader(&g.http, &g.proxy).await {
                Ok(())
            } else {
                Err("neither leads".to_owned())
            }
        },
    )
    .await;
    if !is_leader(&g.http, leader).await {
        std::mem::swap(&mut g.proxy, leader);
    }
}

/// A frozen leader (SIGSTOP) resumed after the other proxy took over, on the journal at
/// `journal` (`None`: SQLite in the group's directory): its late writes are refused by the
/// journal (nothing is stored that was not acknowledged), it steps down and follows the new
/// leader (an update through it is forwarded there), and every copy is identical with
/// exactly the acknowledged transfers.
pub async fn a_frozen_leader_writes_nothing(journal: Option<&str>) {
    let dir = tempfile::tempdir().unwrap();
    let mut banks = Vec::new();
    for name in ["a", "b"] {
        banks.push(super::Bank::start(dir.path(), name).await);
    }
    let journal = journal.map_or_else(
        || format!("sqlite://{}", dir.path().join("journal.db").display()),
        str::to_owned,
    );
    let config = super::write_config_on(
        dir.path(),
        &journal,
        "proxies = \"several\"\njournal_lease_ms = 1000",
        FAST,
        &banks,
    );
    let mut frozen = Proxy::start(&config).await;
    let follower = Proxy::start_after(&config, &[&frozen]).await;
    let http = HttpClient::new();
    leads(&http, &frozen).await;
    let g = BankGroup {
        dir,
        banks,
        proxy: follower,
        http: http.clone(),
    };
    let mut report = super::LoadReport::default();
    let seeds = super::seed_accounts(&g, 2, &mut report).await;
    // Frozen once its replayers have taken the seeds: a leader stopped in the middle of a
    // write to a shared SQLite journal holds the journal's write lock, and no follower can
    // claim the lease until it runs again (the stop this test is about comes after the
    // writes).
    caught_up(
        &http,
        &frozen,
        "the leader's partitions to have applied the seeds",
    )
    .await;
    // Updates sent to the leader while it is frozen wait; the follower takes over.
    frozen.signal(nix::sys::signal::Signal::SIGSTOP);
    let stuck: Vec<_> = (0..4)
        .map(|_| {
            let (http, url) = (http.clone(), frozen.url.clone());
            let body = json!({"from": seeds[0], "to": seeds[1], "amount": 1});
            tokio::spawn(async move {
                tokio::time::timeout(
                    Duration::from_secs(30),
                    http.post(&format!("{url}/transfers"), &body),
                )
                .await
            })
        })
        .collect();
    leads(&http, &g.proxy).await;
    let after = super::run_load(&g, &seeds, 4, 40, false, "after-takeover").await;
    super::assert_no_failed_request(&after);
    super::merge(&mut report, after);
    // Resumed: it learns at its next renewal that the journal was taken over, and steps
    // down.
    frozen.signal(nix::sys::signal::Signal::SIGCONT);
    let new_leader = doc(&http, &g.proxy).await.unwrap().proxy.unwrap().this;
    eventually(
        "the deposed leader to follow the new one",
        Duration::from_secs(20),
        || async {
            match doc(&http, &frozen).await.and_then(|d| d.proxy) {
                Some(s) if s.role == "follower" && s.leader == new_leader => Ok(()),
                other => Err(format!("{other:?}")),
            }
        },
    )
    .await;
    assert!(frozen.log().contains("taken over"), "{}", frozen.log());
    assert!(
        frozen.wait(Duration::from_millis(1)).await.is_none(),
        "the deposed leader must go on as a follower:\n{}",
        frozen.log()
    );
    // Refused as the old leader; an update that reached it after it stepped down was
    // forwarded to the new leader.
    let mut refused = Vec::new();
    for s in stuck {
        match s.await.unwrap() {
            Ok(Ok(a)) if a.status == 201 => report.acked_transfers.push(a.json().unwrap()),
            Ok(Ok(a)) => refused.push(format!("{} {}", a.status, String::from_utf8_lossy(&a.body))),
            Ok(Err(e)) => refused.push(format!("{e:#}")),
            Err(_) => panic!("an update sent to the frozen leader was not answered within 30 s"),
        }
    }
    eprintln!("updates sent to the frozen leader, refused: {refused:?}");
    // Through the deposed one (forwarded) and through the new leader.
    for p in [&frozen, &g.proxy] {
        let last = until_created(
            &http,
            &format!("{}/transfers", p.url),
            &json!({"from": seeds[0], "to": seeds[1], "amount": 1}),
            Duration::from_secs(10),
        )
        .await;
        report.acked_transfers.push(last);
    }
    g.wait_converged(Duration::from_secs(60)).await;
    let (accounts, transfers) = g.assert_identical().await;
    super::assert_bank_invariants(&report, &accounts, &transfers);
    assert_eq!(
        transfers.len(),
        report.acked_transfers.len(),
        "stored transfers beyond the acknowledged ones: a write of the deposed leader landed"
    );
}
