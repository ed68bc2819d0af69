//! One proxy per journal, with real processes, on a SQLite and on a PostgreSQL journal: a
//! second `regroup serve` on the same journal refuses to start, naming the first, with a
//! non-zero exit; after the first stops cleanly a new one starts at once; after it is
//! SIGKILLed a new one starts once its lease ran out.

#![allow(clippy::unwrap_used)]

mod support;

use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::time::{Duration, Instant};

use support::postgres::TempDatabase;
use support::*;

/// The lease of the clean-stop case: long, so that waiting for it would show.
const LONG_LEASE_MS: u64 = 30_000;
/// The lease of the SIGKILL case.
const SHORT_LEASE_MS: u64 = 2_000;

fn write_config(dir: &Path, name: &str, journal: &str, lease_ms: u64, bank: &Bank) -> PathBuf {
    let toml = format!(
        "listen = \"127.0.0.1:0\"\nadmin_listen = \"127.0.0.1:0\"\njournal = \"{journal}\"\n\
         journal_lease_ms = {lease_ms}\n\n[[groups]]\nname = \"bank\"\n\n\
         [[groups.partitions]]\nname = \"a\"\nurl = \"{}\"\n",
        bank.url
    );
    let path = dir.join(format!("{name}.toml"));
    std::fs::write(&path, toml).unwrap();
    path
}

/// Runs `regroup serve` expecting it to refuse: its exit status and stderr.
async fn serve_refused(config: &Path) -> (std::process::ExitStatus, String) {
    let child = tokio::process::Command::new(REGROUP)
        .args(["serve", "--config", config.to_str().unwrap()])
        .env("RUST_LOG", "info,sea_orm_migration=warn")
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .kill_on_drop(true)
        .spawn()
        .unwrap();
    let out = tokio::time::timeout(Duration::from_secs(60), child.wait_with_output())
        .await
        .expect("the second proxy neither refused nor exited within 60 s")
        .unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout).into_owned();
    assert!(
        !stdout.contains("regroup listening on"),
        "the second proxy served: {stdout}"
    );
    (
        out.status,
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

async fn one_owner_per_journal(journal: &str) {
    let dir = tempfile::tempdir().unwrap();
    let bank = Bank::start(dir.path(), "a").await;

    // A first proxy owns the journal; a second on the same journal refuses, naming it.
    let first_config = write_config(dir.path(), "first", journal, LONG_LEASE_MS, &bank);
    let mut first = Proxy::start(&first_config).await;
    let pid = first.child_pid().unwrap();
    let admin = first.admin.trim_start_matches("http://").to_owned();
    let second_config = write_config(dir.path(), "second", journal, LONG_LEASE_MS, &bank);
    let started = Instant::now();
    let (status, stderr) = serve_refused(&second_config).await;
    assert!(!status.success(), "the second proxy exited {status}");
    assert!(
        stderr.contains(&format!("is owned by regroup pid {pid} on "))
            && stderr.contains(&format!("admin {admin})"))
            && stderr.contains("only one proxy may use a journal"),
        "the refusal does not name the first proxy (pid {pid}, admin {admin}):\n{stderr}"
    );
    assert!(
        started.elapsed() < Duration::from_secs(15),
        "the refusal took {:?}, not about one renewal interval",
        started.elapsed()
    );
    // The first still serves.
    let http = regroup::client::HttpClient::new();
    let doc = first.status(&http).await;
    assert_eq!(doc.groups[0].name, "bank");

    // A clean stop releases the lease: the next proxy starts at once, not after 30 s.
    let status = first.terminate().await.unwrap();
    assert!(
        status.success(),
        "the first proxy exited {status}; its log:\n{}",
        first.log()
    );
    let started = Instant::now();
    let mut second = Proxy::start_after(&second_config, &[&first]).await;
    assert!(
        started.elapsed() < Duration::from_secs(10),
        "the proxy after a clean stop took {:?} to start",
        started.elapsed()
    );
    let doc = second.status(&http).await;
    assert_eq!(doc.groups[0].name, "bank");

    // SIGKILLed, the owner cannot release: the next proxy waits, saying so, until the
    // lease ran out (a short one here), then starts.
    let status = second.terminate().await.unwrap();
    assert!(
        status.success(),
        "the second proxy exited {status}; its log:\n{}",
        second.log()
    );
    let killed_config = write_config(dir.path(), "killed", journal, SHORT_LEASE_MS, &bank);
    let mut killed = Proxy::start_after(&killed_config, &[&first, &second]).await;
    killed.kill().await;
    let started = Instant::now();
    let third_config = write_config(dir.path(), "third", journal, SHORT_LEASE_MS, &bank);
    let mut third = Proxy::start_after(&third_config, &[&first, &second, &killed]).await;
    let waited = started.elapsed();
    assert!(
        waited >= Duration::from_millis(SHORT_LEASE_MS / 2),
        "the proxy after a SIGKILL started after {waited:?}, before the lease ran out"
    );
    assert!(
        waited < Duration::from_millis(SHORT_LEASE_MS) + Duration::from_secs(10),
        "the proxy after a SIGKILL took {waited:?}"
    );
    assert!(
        third
            .log()
            .contains("the journal is owned by another proxy; waiting"),
        "no progress while waiting:\n{}",
        third.log()
    );
    let doc = third.status(&http).await;
    assert_eq!(doc.groups[0].name, "bank");

    // Paused past its lease, the owner is taken over; resumed, its renewal is refused and it
    // stops serving with a non-zero exit naming the new owner.
    third.signal(nix::sys::signal::Signal::SIGSTOP);
    tokio::time::sleep(Duration::from_millis(SHORT_LEASE_MS + 500)).await;
    let fourth_config = write_config(dir.path(), "fourth", journal, SHORT_LEASE_MS, &bank);
    let mut fourth = Proxy::start_after(&fourth_config, &[&first, &second, &killed, &third]).await;
    let fourth_pid = fourth.child_pid().unwrap();
    third.signal(nix::sys::signal::Signal::SIGCONT);
    let status = third.wait(Duration::from_secs(20)).await;
    assert!(
        status.is_some_and(|s| !s.success()),
        "the deposed proxy exited {status:?}"
    );
    let log = third.log();
    assert!(
        log.contains(&format!("was taken over by regroup pid {fourth_pid} on "))
            && log.contains("this proxy stopped serving"),
        "the deposed proxy does not name its successor (pid {fourth_pid}):\n{log}"
    );
    let doc = fourth.status(&http).await;
    assert_eq!(doc.groups[0].name, "bank");
    fourth.terminate().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn one_owner_per_sqlite_journal() {
    let dir = tempfile::tempdir().unwrap();
    let journal = format!("sqlite://{}", dir.path().join("journal.db").display());
    one_owner_per_journal(&journal).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn one_owner_per_postgres_journal() {
    let Some(db) = TempDatabase::create_or_skip().await else {
        return;
    };
    one_owner_per_journal(&db.url).await;
}

/// Proxies started and stopped at once in [`a_sigterm_as_soon_as_it_listens_is_a_clean_stop`].
const EARLY_STOPS: usize = 10;

/// A SIGTERM sent as soon as the proxy says it listens is a clean stop like any other: the
/// proxy exits 0 and releases the lease (it used to be killed by the signal while its handler
/// was not installed yet, leaving a fresh 30 s lease behind), so the next proxy, and the one
/// after it, start at once.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_sigterm_as_soon_as_it_listens_is_a_clean_stop() {
    let dir = tempfile::tempdir().unwrap();
    let journal = format!("sqlite://{}", dir.path().join("journal.db").display());
    let bank = Bank::start(dir.path(), "a").await;
    let mut stopped: Vec<Proxy> = Vec::new();
    for round in 0..EARLY_STOPS {
        let config = write_config(
            dir.path(),
            &format!("early{round}"),
            &journal,
            LONG_LEASE_MS,
            &bank,
        );
        let started = Instant::now();
        let mut proxy = Proxy::start_after(&config, &stopped.iter().collect::<Vec<_>>()).await;
        assert!(
            started.elapsed() < Duration::from_secs(10),
            "round {round}: the proxy after a clean stop took {:?} to start",
            started.elapsed()
        );
        let status = proxy.terminate().await.unwrap();
        assert!(
            status.success(),
            "round {round}: the proxy stopped as soon as it listened exited {status}; its log:\n{}",
            proxy.log()
        );
        stopped.push(proxy);
    }
}
