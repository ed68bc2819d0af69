//! Connection-level limits of a real proxy: the cap on concurrent client connections (new
//! ones wait until one closes), and accept errors (out of file descriptors) met with a
//! logged back-off instead of a busy loop.

#![allow(clippy::unwrap_used)]

mod support;

use std::time::{Duration, Instant};

use support::raw::{Recorder, exchange};
use support::*;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

async fn start(dir: &std::path::Path, top: &str, upstream: &Recorder) -> Proxy {
    let toml = format!(
        "listen = \"127.0.0.1:0\"\nadmin_listen = \"127.0.0.1:0\"\njournal = \"sqlite://{}\"\n{top}\n\
         [[groups]]\nname = \"raw\"\n[[groups.partitions]]\nname = \"a\"\nurl = \"{}\"\n",
        dir.join("journal.db").display(),
        upstream.url
    );
    let config = dir.join("regroup.toml");
    std::fs::write(&config, toml).unwrap();
    Proxy::start(&config).await
}

const GET: &[u8] = b"GET /h/x HTTP/1.1\r\nhost: regroup.test\r\n\r\n";

/// Sends a keep-alive GET on `stream` and reads its (2-byte) answer.
async fn get_on(stream: &mut TcpStream) -> String {
    stream.write_all(GET).await.unwrap();
    let mut got = Vec::new();
    let mut chunk = [0u8; 4096];
    while !got.ends_with(b"ok") {
        let n = stream.read(&mut chunk).await.unwrap();
        assert!(n > 0, "closed: {}", String::from_utf8_lossy(&got));
        got.extend_from_slice(&chunk[..n]);
    }
    String::from_utf8_lossy(&got).into_owned()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn single_partition_connections_beyond_the_cap_wait_for_one_to_close() {
    let dir = tempfile::tempdir().unwrap();
    let upstream = Recorder::start().await;
    let proxy = start(dir.path(), "max_connections = 2", &upstream).await;
    let addr = proxy.url.trim_start_matches("http://").to_owned();
    let mut first = TcpStream::connect(&addr).await.unwrap();
    let mut second = TcpStream::connect(&addr).await.unwrap();
    assert!(get_on(&mut first).await.starts_with("HTTP/1.1 200"));
    assert!(get_on(&mut second).await.starts_with("HTTP/1.1 200"));
    // A third connection is taken by the kernel but not served while two are open.
    let mut third = TcpStream::connect(&addr).await.unwrap();
    let waiting = tokio::time::timeout(Duration::from_millis(700), get_on(&mut third)).await;
    assert!(waiting.is_err(), "served beyond the cap: {waiting:?}");
    // One closes: the third is served.
    drop(first);
    let mut got = Vec::new();
    let mut chunk = [0u8; 4096];
    tokio::time::timeout(Duration::from_secs(5), async {
        while !got.ends_with(b"ok") {
            let n = third.read(&mut chunk).await.unwrap();
            assert!(n > 0);
            got.extend_from_slice(&chunk[..n]);
        }
    })
    .await
    .expect("the waiting connection is served once another closes");
    assert!(String::from_utf8_lossy(&got).starts_with("HTTP/1.1 200"));
    assert!(get_on(&mut second).await.starts_with("HTTP/1.1 200"));
}

/// utime + stime of `pid`, in clock ticks.
fn cpu_ticks(pid: u32) -> u64 {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap();
    // Fields after the command name (which is in parentheses): state is field 3, utime 14,
    // stime 15.
    let rest = &stat[stat.rfind(')').unwrap() + 2..];
    let fields: Vec<&str> = rest.split_whitespace().collect();
    fields[11].parse::<u64>().unwrap() + fields[12].parse::<u64>().unwrap()
}

fn open_fds(pid: u32) -> usize {
    std::fs::read_dir(format!("/proc/{pid}/fd"))
        .unwrap()
        .count()
}

/// Sets the soft limit on open files of `pid` (the hard one stays, so it can go back up).
fn set_nofile(pid: u32, limit: usize) {
    let out = std::process::Command::new("prlimit")
        .arg(format!("--pid={pid}"))
        .arg(format!("--nofile={limit}:"))
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "prlimit: {}",
        String::from_utf8_lossy(&out.stderr)
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn single_partition_accept_errors_back_off_instead_of_spinning() {
    if std::process::Command::new("prlimit")
        .arg("--version")
        .output()
        .is_err()
    {
        assert!(!in_ci(), "prlimit (util-linux) is missing");
        eprintln!("skipped: prlimit (util-linux) is not installed");
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let upstream = Recorder::start().await;
    let proxy = start(dir.path(), "", &upstream).await;
    let pid = proxy.child_pid().unwrap();
    let addr = proxy.url.trim_start_matches("http://").to_owned();
    // Leave the proxy two spare descriptors, then connect more clients than that: accepts
    // fail with "too many open files" while the connections wait in the backlog.
    set_nofile(pid, open_fds(pid) + 2);
    let mut clients = Vec::new();
    for _ in 0..8 {
        clients.push(TcpStream::connect(&addr).await.unwrap());
    }
    eventually(
        "accept errors to be logged",
        Duration::from_secs(10),
        || async {
            let log = proxy.log();
            if log.contains("accept failed; pausing before the next accept") {
                Ok(())
            } else {
                Err(log)
            }
        },
    )
    .await;
    // While descriptors stay exhausted the proxy sleeps between attempts: well under a
    // tenth of a core (a loop retrying at once burns a whole one).
    let ticks = cpu_ticks(pid);
    let started = Instant::now();
    tokio::time::sleep(Duration::from_secs(2)).await;
    let used = cpu_ticks(pid) - ticks;
    let elapsed = started.elapsed().as_secs_f64();
    eprintln!("cpu while accepts fail: {used} ticks in {elapsed:.1} s");
    assert!(
        (used as f64) < 0.1 * 100.0 * elapsed,
        "the proxy used {used} ticks in {elapsed:.1} s with accepts failing"
    );
    // Descriptors come back: the proxy serves again.
    drop(clients);
    set_nofile(pid, 1024);
    eventually(
        "the proxy to serve again",
        Duration::from_secs(10),
        || async {
            let got = exchange(
                &proxy.url,
                &[b"GET /h/again HTTP/1.1\r\nhost: regroup.test\r\nconnection: close\r\n\r\n"],
                Duration::ZERO,
                Duration::from_secs(2),
            )
            .await;
            if got.status == Some(200) {
                Ok(())
            } else {
                Err(format!("{got:?}"))
            }
        },
    )
    .await;
}
