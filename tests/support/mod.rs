//! Shared harness for the end-to-end tests: real processes (the `regroup` proxy and the
//! example bank, a program of its own) on `127.0.0.1:0` ports in temp dirs, killed on drop,
//! a bounded `eventually` poll instead of fixed sleeps, and fault injection in front of a
//! bank ([`fault`]): the shipped programs carry no test hooks.
//!
//! (`tests/support/mod.rs` rather than `support.rs`: cargo would build the latter as a
//! test crate of its own.)

#![allow(dead_code, unreachable_pub, missing_docs, clippy::unwrap_used)]

pub mod nats;
pub mod postgres;

use std::future::Future;
use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::time::{Duration, Instant};

use regroup::client::{Answer, HttpClient};
use regroup_proxy::admin::StatusDoc;
use serde_json::Value;
use tokio::io::{AsyncBufReadExt, BufReader};
use tokio::process::{Child, Command};

pub mod fault;
pub mod raw;
pub mod several;

pub const REGROUP: &str = env!("CARGO_BIN_EXE_regroup");

/// The example bank's executable, `examples/bank` beside the `regroup` that cargo built for
/// this test run. It is built (once per test process, with the same profile) by
/// `cargo build --example bank`: `cargo test --test NAME` does not build examples, and a
/// stale one would test old code.
pub fn bank_exe() -> &'static Path {
    static BANK: std::sync::OnceLock<PathBuf> = std::sync::OnceLock::new();
    BANK.get_or_init(|| {
        let dir = Path::new(REGROUP).parent().unwrap();
        let cargo = std::env::var_os("CARGO").unwrap_or_else(|| env!("CARGO").into());
        let mut build = std::process::Command::new(cargo);
        build
            .args(["build", "--quiet", "--example", "bank", "--manifest-path"])
            .arg(Path::new(env!("CARGO_MANIFEST_DIR")).join("Cargo.toml"));
        match dir.file_name().and_then(|n| n.to_str()) {
            Some("debug") | None => {}
            Some("release") => {
                build.arg("--release");
            }
            Some(profile) => {
                build.args(["--profile", profile]);
            }
        }
        let status = build.stdin(Stdio::null()).status().unwrap();
        assert!(status.success(), "cargo build --example bank: {status}");
        let bank = dir
            .join("examples")
            .join(format!("bank{}", std::env::consts::EXE_SUFFIX));
        assert!(bank.exists(), "{} was not built", bank.display());
        bank
    })
}

/// Polls `check` every 25 ms until it returns `Ok`, or panics after `timeout` naming
/// `what` and the last observation.
pub async fn eventually<T, F, Fut>(what: &str, timeout: Duration, check: F) -> T
where
    F: FnMut() -> Fut,
    Fut: Future<Output = Result<T, String>>,
{
    match try_eventually(what, timeout, check).await {
        Ok(v) => v,
        Err(e) => panic!("{e}"),
    }
}

/// [`eventually`] that returns why it timed out instead of panicking, so the caller can
/// add what it knows (the proxy's log, a cluster's).
pub async fn try_eventually<T, F, Fut>(
    what: &str,
    timeout: Duration,
    mut check: F,
) -> Result<T, String>
where
    F: FnMut() -> Fut,
    Fut: Future<Output = Result<T, String>>,
{
    let deadline = Instant::now() + timeout;
    loop {
        match check().await {
            Ok(v) => return Ok(v),
            Err(last) => {
                if Instant::now() > deadline {
                    return Err(format!(
                        "timed out after {timeout:?} waiting for {what}; last: {last}"
                    ));
                }
            }
        }
        tokio::time::sleep(Duration::from_millis(25)).await;
    }
}

/// Spawns `exe ARGS`, logging stderr to `log`, and returns the child and the first stdout
/// line that starts with `prefix` (minus the prefix).
async fn spawn_exe_and_read(
    exe: &Path,
    args: &[&str],
    log: &Path,
    prefix: &str,
) -> (Child, String) {
    spawn_exe_and_read_env(exe, args, log, prefix, &[]).await
}

/// [`spawn_exe_and_read`] with extra environment variables.
async fn spawn_exe_and_read_env(
    exe: &Path,
    args: &[&str],
    log: &Path,
    prefix: &str,
    env: &[(String, String)],
) -> (Child, String) {
    match try_spawn_exe_and_read(exe, args, log, prefix, env).await {
        Ok(started) => started,
        Err(why) => panic!("{why}"),
    }
}

/// [`spawn_exe_and_read`], returning why it failed (with the program's log) instead of
/// panicking.
async fn try_spawn_exe_and_read(
    exe: &Path,
    args: &[&str],
    log: &Path,
    prefix: &str,
    env: &[(String, String)],
) -> Result<(Child, String), String> {
    let log_file = std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(log)
        .unwrap();
    let mut child = Command::new(exe)
        .args(args)
        .env("RUST_LOG", "info,sea_orm_migration=warn")
        .envs(env.iter().cloned())
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::from(log_file))
        .kill_on_drop(true)
        .spawn()
        .unwrap();
    let stdout = child.stdout.take().unwrap();
    let mut lines = BufReader::new(stdout).lines();
    let line = tokio::time::timeout(Duration::from_secs(60), async {
        while let Ok(Some(line)) = lines.next_line().await {
            if let Some(rest) = line.strip_prefix(prefix) {
                return Some(rest.to_owned());
            }
        }
        None
    })
    .await
    .ok()
    .flatten();
    let Some(line) = line else {
        let log = std::fs::read_to_string(log).unwrap_or_default();
        return Err(format!(
            "{} {args:?} did not print {prefix:?}; its log:\n{log}",
            exe.display()
        ));
    };
    tokio::spawn(async move { while let Ok(Some(_)) = lines.next_line().await {} });
    Ok((child, line))
}

fn kill9(child: &Child) {
    sigkill(child.id());
}

/// SIGKILLs a process by pid.
pub fn sigkill(pid: Option<u32>) {
    if let Some(pid) = pid {
        let _ = nix::sys::signal::kill(
            nix::unistd::Pid::from_raw(pid as i32),
            nix::sys::signal::Signal::SIGKILL,
        );
    }
}

/// One bank partition process.
pub struct Bank {
    pub name: String,
    /// Where the proxy and the tests reach it: the bank itself, or the fault interposer in
    /// front of it.
    pub url: String,
    /// The bank process's own address.
    pub direct: String,
    pub db: String,
    /// The fault interposer in front of it, if any.
    pub fault: Option<fault::Interposer>,
    /// Extra environment of the bank process (restarts included).
    env: Vec<(String, String)>,
    log: PathBuf,
    child: Option<Child>,
}

impl Bank {
    /// Starts a bank on a free port with its SQLite file in `dir`.
    pub async fn start(dir: &Path, name: &str) -> Bank {
        Bank::start_with(dir, name, None).await
    }

    /// Starts a bank, with `fault` injected by an interposer in front of it (the bank is
    /// then reached through the interposer, restarts included).
    pub async fn start_with(dir: &Path, name: &str, fault: Option<fault::Fault>) -> Bank {
        Bank::start_full(dir, name, fault, Vec::new()).await
    }

    /// Starts a bank with extra environment variables (e.g. `REGROUP_REPLAY_SECRET`).
    pub async fn start_env(dir: &Path, name: &str, env: Vec<(String, String)>) -> Bank {
        Bank::start_full(dir, name, None, env).await
    }

    async fn start_full(
        dir: &Path,
        name: &str,
        fault: Option<fault::Fault>,
        env: Vec<(String, String)>,
    ) -> Bank {
        let db = format!("sqlite://{}", dir.join(format!("bank-{name}.db")).display());
        Bank::start_db(dir, name, &db, fault, env).await
    }

    /// Starts a bank on the database at `db` (its log in `dir`).
    pub async fn start_db(
        dir: &Path,
        name: &str,
        db: &str,
        fault: Option<fault::Fault>,
        env: Vec<(String, String)>,
    ) -> Bank {
        let db = db.to_owned();
        let log = dir.join(format!("bank-{name}.log"));
        let (child, url) = spawn_exe_and_read_env(
            bank_exe(),
            &[
                "--listen",
                "127.0.0.1:0",
                "--db",
                &db,
                "--unsigned-snapshots",
            ],
            &log,
            "bank listening on ",
            &env,
        )
        .await;
        let direct = url.trim().to_owned();
        let fault = match fault {
            Some(f) => Some(fault::Interposer::start(&direct, child.id(), f).await),
            None => None,
        };
        Bank {
            name: name.to_owned(),
            url: fault
                .as_ref()
                .map_or_else(|| direct.clone(), |f| f.url.clone()),
            direct,
            db,
            fault,
            env,
            log,
            child: Some(child),
        }
    }

    /// The fault interposer in front of this bank.
    pub fn interposer(&self) -> &fault::Interposer {
        self.fault.as_ref().expect("a bank started with a fault")
    }

    /// The process id, while it runs.
    pub fn pid(&self) -> Option<u32> {
        self.child.as_ref().and_then(|c| c.id())
    }

    /// Sends `signal` (e.g. SIGSTOP to make it stop answering, SIGCONT to resume).
    pub fn signal(&self, signal: nix::sys::signal::Signal) {
        if let Some(pid) = self.pid() {
            let _ = nix::sys::signal::kill(nix::unistd::Pid::from_raw(pid as i32), signal);
        }
    }

    /// SIGKILLs the process and waits for it to be gone.
    pub async fn kill(&mut self) {
        if let Some(mut c) = self.child.take() {
            kill9(&c);
            let _ = c.wait().await;
        }
    }

    /// Starts the process again on the same port and database (retrying while the port is
    /// still held by the old socket).
    pub async fn restart(&mut self) {
        self.kill().await;
        let listen = self.direct.trim_start_matches("http://").to_owned();
        let deadline = Instant::now() + Duration::from_secs(20);
        loop {
            let log_file = std::fs::OpenOptions::new()
                .create(true)
                .append(true)
                .open(&self.log)
                .unwrap();
            let mut child = Command::new(bank_exe())
                .args([
                    "--listen",
                    &listen,
                    "--db",
                    &self.db,
                    "--unsigned-snapshots",
                ])
                .envs(self.env.iter().cloned())
                .stdin(Stdio::null())
                .stdout(Stdio::piped())
                .stderr(Stdio::from(log_file))
                .kill_on_drop(true)
                .spawn()
                .unwrap();
            let stdout = child.stdout.take().unwrap();
            let mut lines = BufReader::new(stdout).lines();
            if let Ok(Ok(Some(line))) =
                tokio::time::timeout(Duration::from_secs(30), lines.next_line()).await
                && line.starts_with("bank listening on ")
            {
                tokio::spawn(async move { while let Ok(Some(_)) = lines.next_line().await {} });
                self.child = Some(child);
                return;
            }
            let _ = child.kill().await;
            assert!(
                Instant::now() < deadline,
                "bank {} could not restart on {listen}",
                self.name
            );
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }

    /// `GET path` on this partition directly.
    pub async fn get(&self, http: &HttpClient, path: &str) -> Answer {
        http.get(&format!("{}{path}", self.url)).await.unwrap()
    }
}

/// The proxy process.
pub struct Proxy {
    pub url: String,
    pub admin: String,
    pub config: PathBuf,
    log: PathBuf,
    /// The process id it was started with (kept after it exited).
    pid: Option<u32>,
    child: Option<Child>,
}

impl Proxy {
    /// Starts `regroup serve` on `config`.
    pub async fn start(config: &Path) -> Proxy {
        match Proxy::try_start(config).await {
            Ok(proxy) => proxy,
            Err(why) => panic!("{why}"),
        }
    }

    /// Starts `regroup serve` on `config`; when it does not come up, why, with its log.
    pub async fn try_start(config: &Path) -> Result<Proxy, String> {
        let log = config.with_extension("log");
        let (child, line) = try_spawn_exe_and_read(
            Path::new(REGROUP),
            &["serve", "--config", config.to_str().unwrap()],
            &log,
            "regroup listening on ",
            &[],
        )
        .await?;
        // "http://A (admin http://B)"
        let (url, admin) = line.split_once(" (admin ").unwrap();
        Ok(Proxy {
            url: url.to_owned(),
            admin: admin.trim_end_matches(')').to_owned(),
            config: config.to_owned(),
            log,
            pid: child.id(),
            child: Some(child),
        })
    }

    /// Starts `regroup serve` on `config` after the proxies `before` on the same journal;
    /// when it does not come up, panics with its log and every one of theirs.
    pub async fn start_after(config: &Path, before: &[&Proxy]) -> Proxy {
        match Proxy::try_start(config).await {
            Ok(proxy) => proxy,
            Err(why) => {
                let mut message = why;
                for p in before {
                    message.push_str(&format!(
                        "\n--- log of the proxy on {} (pid was {:?}):\n{}",
                        p.config.display(),
                        p.pid,
                        p.log()
                    ));
                }
                panic!("{message}");
            }
        }
    }

    /// The proxy's process id.
    pub fn child_pid(&self) -> Option<u32> {
        self.child.as_ref().and_then(|c| c.id())
    }

    /// SIGKILLs the proxy.
    pub async fn kill(&mut self) {
        if let Some(mut c) = self.child.take() {
            kill9(&c);
            let _ = c.wait().await;
        }
    }

    /// Stops the proxy cleanly (SIGTERM) and returns how it exited.
    pub async fn terminate(&mut self) -> Option<std::process::ExitStatus> {
        let mut c = self.child.take()?;
        if let Some(pid) = c.id() {
            let _ = nix::sys::signal::kill(
                nix::unistd::Pid::from_raw(pid as i32),
                nix::sys::signal::Signal::SIGTERM,
            );
        }
        tokio::time::timeout(Duration::from_secs(30), c.wait())
            .await
            .ok()
            .and_then(Result::ok)
    }

    /// Sends `signal` to the proxy (e.g. SIGSTOP to pause it, SIGCONT to resume).
    pub fn signal(&self, signal: nix::sys::signal::Signal) {
        if let Some(pid) = self.child_pid() {
            let _ = nix::sys::signal::kill(nix::unistd::Pid::from_raw(pid as i32), signal);
        }
    }

    /// Waits up to `timeout` for the proxy to exit by itself; its exit status.
    pub async fn wait(&mut self, timeout: Duration) -> Option<std::process::ExitStatus> {
        let c = self.child.as_mut()?;
        let status = tokio::time::timeout(timeout, c.wait()).await.ok()?.ok();
        if status.is_some() {
            self.child = None;
        }
        status
    }

    /// Starts it again with the same config (new ports when the config says `:0`).
    pub async fn restart(&mut self) {
        self.kill().await;
        let again = Proxy::start(&self.config).await;
        *self = again;
    }

    /// The proxy's log so far.
    pub fn log(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    /// `GET /status` (once more on a broken connection: a pooled keep-alive connection may
    /// be closed by the proxy's header time-out just as it is reused).
    pub async fn status(&self, http: &HttpClient) -> StatusDoc {
        let url = format!("{}/status", self.admin);
        let answer = match http.get(&url).await {
            Ok(a) => a,
            Err(_) => http.get(&url).await.unwrap(),
        };
        answer.json().unwrap()
    }
}

/// A group of bank partitions behind a proxy, in its own temp dir.
pub struct BankGroup {
    pub dir: tempfile::TempDir,
    pub banks: Vec<Bank>,
    pub proxy: Proxy,
    pub http: HttpClient,
}

impl BankGroup {
    /// `n` banks and a proxy with the journal at `journal` (None: SQLite in the temp dir)
    /// and `extra` lines added to the `[[groups]]` table.
    pub async fn start(n: usize, journal: Option<&str>, extra: &str) -> BankGroup {
        BankGroup::start_with(n, journal, extra, |_| None).await
    }

    /// [`BankGroup::start`] with a fault injected in front of the banks `fault` names.
    pub async fn start_with(
        n: usize,
        journal: Option<&str>,
        extra: &str,
        fault: impl Fn(&str) -> Option<fault::Fault>,
    ) -> BankGroup {
        BankGroup::start_full(n, journal, "", extra, fault, |_| Vec::new()).await
    }

    /// [`BankGroup::start`] with `top` lines at the config's top level (the SQLite journal
    /// in the temp dir).
    pub async fn start_top(n: usize, top: &str) -> BankGroup {
        BankGroup::start_full(n, None, top, "", |_| None, |_| Vec::new()).await
    }

    /// [`BankGroup::start`] with extra environment variables for each bank.
    pub async fn start_env(
        n: usize,
        journal: Option<&str>,
        extra: &str,
        env: impl Fn(&str) -> Vec<(String, String)>,
    ) -> BankGroup {
        BankGroup::start_full(n, journal, "", extra, |_| None, env).await
    }

    async fn start_full(
        n: usize,
        journal: Option<&str>,
        top: &str,
        extra: &str,
        fault: impl Fn(&str) -> Option<fault::Fault>,
        env: impl Fn(&str) -> Vec<(String, String)>,
    ) -> BankGroup {
        let dir = tempfile::tempdir().unwrap();
        let mut banks = Vec::new();
        for name in ["a", "b", "c", "d", "e"].iter().take(n) {
            banks.push(Bank::start_full(dir.path(), name, fault(name), env(name)).await);
        }
        BankGroup::over(dir, banks, journal, top, extra).await
    }

    /// One bank per database URL of `dbs` (named a, b, c, ...) and a proxy over them with
    /// `extra` lines in the `[[groups]]` table (the SQLite journal in the temp dir).
    pub async fn start_on(dbs: &[&str], extra: &str) -> BankGroup {
        let dir = tempfile::tempdir().unwrap();
        let mut banks = Vec::new();
        for (name, db) in ["a", "b", "c", "d", "e"].iter().zip(dbs) {
            banks.push(Bank::start_db(dir.path(), name, db, None, Vec::new()).await);
        }
        BankGroup::over(dir, banks, None, "", extra).await
    }

    async fn over(
        dir: tempfile::TempDir,
        banks: Vec<Bank>,
        journal: Option<&str>,
        top: &str,
        extra: &str,
    ) -> BankGroup {
        let journal = journal
            .map(str::to_owned)
            .unwrap_or_else(|| format!("sqlite://{}", dir.path().join("journal.db").display()));
        let mut toml = format!(
            "listen = \"127.0.0.1:0\"\nadmin_listen = \"127.0.0.1:0\"\njournal = \"{journal}\"\n\
             # A killed proxy's successor waits at most this long for the journal.\n\
             journal_lease_ms = 1000\n{top}\n\n[[groups]]\nname = \"bank\"\n{extra}\n"
        );
        for b in &banks {
            toml.push_str(&format!(
                "\n[[groups.partitions]]\nname = \"{}\"\nurl = \"{}\"\n",
                b.name, b.url
            ));
        }
        let config = dir.path().join("regroup.toml");
        std::fs::write(&config, toml).unwrap();
        let proxy = Proxy::start(&config).await;
        BankGroup {
            dir,
            banks,
            proxy,
            http: HttpClient::new(),
        }
    }

    /// `POST path` through the proxy.
    pub async fn post(&self, path: &str, body: Value) -> anyhow::Result<Answer> {
        self.http
            .post(&format!("{}{path}", self.proxy.url), &body)
            .await
    }

    /// `GET path` through the proxy.
    pub async fn get(&self, path: &str) -> anyhow::Result<Answer> {
        self.http.get(&format!("{}{path}", self.proxy.url)).await
    }

    /// Waits until every partition has applied the whole journal and none is diverged.
    pub async fn wait_converged(&self, timeout: Duration) -> StatusDoc {
        let deadline = Instant::now() + timeout;
        eventually(
            "every partition to apply the whole journal",
            timeout,
            || async {
                let doc: StatusDoc = self
                    .http
                    .get(&format!("{}/status", self.proxy.admin))
                    .await
                    .map_err(|e| e.to_string())?
                    .json()
                    .map_err(|e| e.to_string())?;
                let g = &doc.groups[0];
                if let Some(p) = g.partitions.iter().find(|p| p.status == "diverged") {
                    let log = self
                        .banks
                        .iter()
                        .find(|b| b.name == p.name)
                        .and_then(|b| std::fs::read_to_string(&b.log).ok())
                        .unwrap_or_default();
                    panic!(
                        "partition {} diverged: {}\nits log:\n{}",
                        p.name,
                        p.reason,
                        tail(&log, 20)
                    );
                }
                let done = g.in_doubt.is_empty()
                    && g.partitions
                        .iter()
                        .all(|p| p.applied == g.head && p.status == "available");
                if done {
                    Ok(doc)
                } else if Instant::now() > deadline {
                    // The last observation: with the proxy's log, to see why.
                    Err(format!("{g:?}\nproxy log:\n{}", self.proxy.log()))
                } else {
                    Err(format!("{g:?}"))
                }
            },
        )
        .await
    }

    /// Asserts that every partition returns byte-identical `GET /accounts` and
    /// `GET /transfers`; returns the accounts and transfers.
    pub async fn assert_identical(&self) -> (Vec<Value>, Vec<Value>) {
        let first = &self.banks[0];
        let accounts = first.get(&self.http, "/accounts").await;
        let transfers = first.get(&self.http, "/transfers").await;
        for b in &self.banks[1..] {
            let a = b.get(&self.http, "/accounts").await;
            let t = b.get(&self.http, "/transfers").await;
            assert_eq!(
                String::from_utf8_lossy(&a.body),
                String::from_utf8_lossy(&accounts.body),
                "accounts of {} differ from {}",
                b.name,
                first.name
            );
            assert_eq!(
                String::from_utf8_lossy(&t.body),
                String::from_utf8_lossy(&transfers.body),
                "transfers of {} differ from {}",
                b.name,
                first.name
            );
        }
        (accounts.json().unwrap(), transfers.json().unwrap())
    }
}

/// Starts a proxy in `dir` for `banks` as group "bank", with `top` lines at the top level of
/// its config (e.g. an admin token).
pub async fn start_proxy_for(dir: &Path, top: &str, banks: &[Bank]) -> Proxy {
    Proxy::start(&write_config(dir, top, "", banks)).await
}

/// Writes `dir/regroup.toml`: loopback ports, a SQLite journal in `dir`, `top` lines at the
/// top level, and one group `bank` with `group` lines over `banks`; returns its path.
pub fn write_config(dir: &Path, top: &str, group: &str, banks: &[Bank]) -> PathBuf {
    let journal = format!("sqlite://{}", dir.join("journal.db").display());
    write_config_on(dir, &journal, top, group, banks)
}

/// [`write_config`] with the journal at `journal`.
pub fn write_config_on(
    dir: &Path,
    journal: &str,
    top: &str,
    group: &str,
    banks: &[Bank],
) -> PathBuf {
    let mut toml = format!(
        "listen = \"127.0.0.1:0\"\nadmin_listen = \"127.0.0.1:0\"\njournal = \"{journal}\"\n{top}\n\n[[groups]]\nname = \"bank\"\n{group}\n"
    );
    for b in banks {
        toml.push_str(&format!(
            "\n[[groups.partitions]]\nname = \"{}\"\nurl = \"{}\"\n",
            b.name, b.url
        ));
    }
    let config = dir.join("regroup.toml");
    std::fs::write(&config, toml).unwrap();
    config
}

/// Whether tests must not skip when a service is missing.
pub fn in_ci() -> bool {
    std::env::var("CI").is_ok_and(|v| !v.is_empty() && v != "false" && v != "0")
}

/// What a load run saw.
#[derive(Debug, Default)]
pub struct LoadReport {
    /// Transfers answered 201, as returned.
    pub acked_transfers: Vec<Value>,
    /// Accounts answered 201, as returned.
    pub acked_accounts: Vec<Value>,
    /// Initial balance by account name, for every creation attempted.
    pub initial_balance: std::collections::HashMap<String, i64>,
    /// Count of answers by status.
    pub statuses: std::collections::BTreeMap<u16, u64>,
    /// Requests that got no answer (connection errors), with the error.
    pub errors: Vec<String>,
}

impl LoadReport {
    pub fn count(&self, status: u16) -> u64 {
        self.statuses.get(&status).copied().unwrap_or(0)
    }

    pub fn answered(&self) -> u64 {
        self.statuses.values().sum()
    }
}

/// Creates `n` accounts of 10 000 cents through the proxy, sequentially.
pub async fn seed_accounts(g: &BankGroup, n: usize, report: &mut LoadReport) -> Vec<i64> {
    let mut ids = Vec::new();
    for i in 0..n {
        let name = format!("seed-{i}");
        report.initial_balance.insert(name.clone(), 10_000);
        let a = g
            .post(
                "/accounts",
                serde_json::json!({"name": name, "balance": 10_000}),
            )
            .await
            .unwrap();
        assert_eq!(a.status, 201, "{}", String::from_utf8_lossy(&a.body));
        let v: Value = a.json().unwrap();
        ids.push(v["id"].as_i64().unwrap());
        report.acked_accounts.push(v);
    }
    ids
}

/// Runs `updates` mixed updates with `clients` concurrent clients through the proxy:
/// ~10% account creations, ~4% invalid transfers (400 / 404), the rest transfers of random
/// amounts (some refused with 409), plus a read after every fifth update. With
/// `tolerate_errors` a request without an answer is recorded and ends that client, instead of
/// failing the test.
pub async fn run_load(
    g: &BankGroup,
    seed_ids: &[i64],
    clients: usize,
    updates: usize,
    tolerate_errors: bool,
    tag: &str,
) -> LoadReport {
    run_load_until(
        &g.target(),
        seed_ids,
        clients,
        updates,
        tolerate_errors,
        tag,
        None,
    )
    .await
}

/// Where a load goes: the proxy's URL and a client.
#[derive(Clone)]
pub struct Target {
    pub url: String,
    pub admin: String,
    pub http: HttpClient,
}

impl Target {
    /// `GET /status` on the proxy's admin address.
    pub async fn status(&self) -> StatusDoc {
        self.http
            .get(&format!("{}/status", self.admin))
            .await
            .unwrap()
            .json()
            .unwrap()
    }
}

/// Waits (bounded) until the group's journal head reaches `at_least`.
pub async fn wait_for_head(target: &Target, at_least: u64) {
    if let Err(e) = try_wait_for_head(target, at_least, Duration::from_secs(120)).await {
        panic!("{e}");
    }
}

/// [`wait_for_head`] that returns why it timed out instead of panicking, so the caller can
/// add what it knows (the proxy's log, a cluster's).
pub async fn try_wait_for_head(
    target: &Target,
    at_least: u64,
    timeout: Duration,
) -> Result<(), String> {
    try_eventually(
        &format!("the journal head to reach {at_least}"),
        timeout,
        || async {
            let head = target.status().await.groups[0].head;
            if head >= at_least {
                Ok(())
            } else {
                Err(format!("head {head}"))
            }
        },
    )
    .await
}

/// The last `n` lines of `text`.
pub fn tail(text: &str, n: usize) -> String {
    let lines: Vec<&str> = text.lines().collect();
    lines[lines.len().saturating_sub(n)..].join("\n")
}

impl BankGroup {
    /// The load target (so a test can drive load while it restarts partitions).
    pub fn target(&self) -> Target {
        Target {
            url: self.proxy.url.clone(),
            admin: self.proxy.admin.clone(),
            http: self.http.clone(),
        }
    }
}

/// How a running load is steered from outside: stopped once `stop` turns true, and each
/// client pausing `pace_ms` milliseconds before every request (read at each request, so
/// the caller can slow the load down and speed it up again).
#[derive(Clone, Default)]
pub struct LoadControl {
    pub stop: Option<std::sync::Arc<std::sync::atomic::AtomicBool>>,
    pub pace_ms: std::sync::Arc<std::sync::atomic::AtomicU64>,
}

impl From<Option<std::sync::Arc<std::sync::atomic::AtomicBool>>> for LoadControl {
    fn from(stop: Option<std::sync::Arc<std::sync::atomic::AtomicBool>>) -> Self {
        LoadControl {
            stop,
            ..LoadControl::default()
        }
    }
}

/// [`run_load`] against `target`, steered by `control` (a stop flag, or a [`LoadControl`]).
pub async fn run_load_until(
    g: &Target,
    seed_ids: &[i64],
    clients: usize,
    updates: usize,
    tolerate_errors: bool,
    tag: &str,
    control: impl Into<LoadControl>,
) -> LoadReport {
    use rand::Rng;
    use std::sync::atomic::{AtomicUsize, Ordering};
    use std::sync::{Arc, Mutex};
    let control = control.into();
    let next = Arc::new(AtomicUsize::new(0));
    let report = Arc::new(Mutex::new(LoadReport::default()));
    let ids = Arc::new(Mutex::new(seed_ids.to_vec()));
    let base = g.url.clone();
    let mut tasks = Vec::new();
    for c in 0..clients {
        let (next, report, ids, http, base) = (
            next.clone(),
            report.clone(),
            ids.clone(),
            g.http.clone(),
            base.clone(),
        );
        let tag = tag.to_owned();
        let LoadControl { stop, pace_ms } = control.clone();
        tasks.push(tokio::spawn(async move {
            loop {
                let pause = pace_ms.load(Ordering::Relaxed);
                if pause > 0 {
                    tokio::time::sleep(Duration::from_millis(pause)).await;
                }
                let i = next.fetch_add(1, Ordering::Relaxed);
                if i >= updates || stop.as_ref().is_some_and(|s| s.load(Ordering::Relaxed)) {
                    break;
                }
                let (path, body, name) = {
                    let mut rng = rand::rng();
                    let known = ids.lock().unwrap().clone();
                    let roll: u32 = rng.random_range(0..100);
                    if roll < 10 {
                        let name = format!("{tag}-{c}-{i}");
                        let balance = rng.random_range(0..5000i64);
                        report
                            .lock()
                            .unwrap()
                            .initial_balance
                            .insert(name.clone(), balance);
                        (
                            "/accounts",
                            serde_json::json!({"name": name, "balance": balance}),
                            Some(name),
                        )
                    } else if roll < 12 {
                        (
                            "/transfers",
                            serde_json::json!({"from": known[0], "to": known[1], "amount": 0}),
                            None,
                        )
                    } else if roll < 14 {
                        (
                            "/transfers",
                            serde_json::json!({"from": known[0], "to": 999_999, "amount": 5}),
                            None,
                        )
                    } else {
                        let from = known[rng.random_range(0..known.len())];
                        let mut to = known[rng.random_range(0..known.len())];
                        if to == from {
                            to = if from == known[0] { known[1] } else { known[0] };
                        }
                        let amount = rng.random_range(1..3000i64);
                        (
                            "/transfers",
                            serde_json::json!({"from": from, "to": to, "amount": amount}),
                            None,
                        )
                    }
                };
                match http.post(&format!("{base}{path}"), &body).await {
                    Ok(a) => {
                        let mut r = report.lock().unwrap();
                        *r.statuses.entry(a.status).or_default() += 1;
                        if a.status == 201 {
                            let v: Value = a.json().unwrap();
                            if name.is_some() {
                                ids.lock().unwrap().push(v["id"].as_i64().unwrap());
                                r.acked_accounts.push(v);
                            } else {
                                r.acked_transfers.push(v);
                            }
                        }
                    }
                    Err(e) if tolerate_errors => {
                        // The proxy is gone: this client stops.
                        report.lock().unwrap().errors.push(format!("{e:#}"));
                        break;
                    }
                    Err(e) => panic!("update {i} failed: {e:#}"),
                }
                if i % 5 == 0 {
                    match http.get(&format!("{base}/accounts")).await {
                        Ok(a) => assert!(
                            a.status == 200 || (tolerate_errors && a.status >= 500),
                            "read answered {}: {}",
                            a.status,
                            String::from_utf8_lossy(&a.body)
                        ),
                        Err(e) if tolerate_errors => {
                            report.lock().unwrap().errors.push(format!("read: {e:#}"))
                        }
                        Err(e) => panic!("read failed: {e:#}"),
                    }
                }
            }
        }));
    }
    for t in tasks {
        t.await.unwrap();
    }
    Arc::try_unwrap(report)
        .map(|m| m.into_inner().unwrap())
        .unwrap_or_default()
}

/// Asserts the bank invariants on converged data: money is conserved (every account's
/// balance started at its creation balance, transfers only move money) and every
/// acknowledged account and transfer is present, unchanged.
pub fn assert_bank_invariants(report: &LoadReport, accounts: &[Value], transfers: &[Value]) {
    let mut expected_total = 0i64;
    for a in accounts {
        let name = a["name"].as_str().unwrap();
        expected_total += report
            .initial_balance
            .get(name)
            .unwrap_or_else(|| panic!("account {name} was never requested"));
        assert!(a["balance"].as_i64().unwrap() >= 0, "negative balance: {a}");
    }
    let total: i64 = accounts
        .iter()
        .map(|a| a["balance"].as_i64().unwrap())
        .sum();
    assert_eq!(total, expected_total, "money is not conserved");
    let by_id =
        |list: &[Value], id: i64| list.iter().find(|v| v["id"].as_i64() == Some(id)).cloned();
    for t in &report.acked_transfers {
        let id = t["id"].as_i64().unwrap();
        assert_eq!(
            by_id(transfers, id).as_ref(),
            Some(t),
            "acknowledged transfer {id} lost or changed"
        );
    }
    for a in &report.acked_accounts {
        let id = a["id"].as_i64().unwrap();
        let found = by_id(accounts, id).unwrap_or_else(|| panic!("acknowledged account {id} lost"));
        assert_eq!(found["name"], a["name"]);
    }
}

/// Adds `r` to `report`.
pub fn merge(report: &mut LoadReport, r: LoadReport) {
    report.acked_accounts.extend(r.acked_accounts);
    report.acked_transfers.extend(r.acked_transfers);
    report.initial_balance.extend(r.initial_balance);
    for (k, v) in r.statuses {
        *report.statuses.entry(k).or_default() += v;
    }
    report.errors.extend(r.errors);
}

/// Every answer was a bank answer: no 5xx from the proxy, no connection error.
pub fn assert_no_failed_request(r: &LoadReport) {
    assert!(
        r.errors.is_empty(),
        "client requests failed: {:?}",
        r.errors
    );
    let failed: u64 = r
        .statuses
        .iter()
        .filter(|(s, _)| ![201, 400, 404, 409].contains(*s))
        .map(|(_, n)| n)
        .sum();
    assert_eq!(failed, 0, "client requests failed: {:?}", r.statuses);
}

impl BankGroup {
    /// The SQLite journal's records of group `bank`: how many rows, and the lowest seq
    /// (0 when none), read through a connection of its own.
    pub async fn journal_records(&self) -> (u64, u64) {
        use sea_orm::sqlx::{Connection, Row};
        let path = self.dir.path().join("journal.db");
        let opts = sea_orm::sqlx::sqlite::SqliteConnectOptions::new()
            .filename(&path)
            .read_only(true);
        let mut conn = sea_orm::sqlx::SqliteConnection::connect_with(&opts)
            .await
            .unwrap();
        let row = sea_orm::sqlx::query(
            "SELECT count(*), COALESCE(min(seq), 0) FROM regroup_record WHERE group_name = 'bank'",
        )
        .fetch_one(&mut conn)
        .await
        .unwrap();
        let (count, min): (i64, i64) = (row.get(0), row.get(1));
        let _ = conn.close().await;
        (count as u64, min as u64)
    }

    /// Runs `regroup rebuild` against this group's admin API with `args`, bounded by
    /// `timeout`: its exit status and what it printed (stdout and stderr).
    pub async fn rebuild_cli(&self, args: &[&str], timeout: Duration) -> (bool, String) {
        let mut cmd = Command::new(REGROUP);
        cmd.args(["rebuild", "--group", "bank", "--admin", &self.proxy.admin])
            .args(args)
            .stdin(Stdio::null())
            .kill_on_drop(true);
        let out = tokio::time::timeout(timeout, cmd.output())
            .await
            .expect("regroup rebuild did not end in time")
            .unwrap();
        let text = format!(
            "{}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
        (out.status.success(), text)
    }
}
