//! A replica restored from an older copy of its database files (stopped, files put back,
//! started): the proxy asks it where it stands when it answers again, rewinds it, and it
//! serves no read older than `max_read_lag` while it replays what it lacks; it ends
//! identical to the primary. With and without load meanwhile.

#![allow(clippy::unwrap_used)]

mod support;

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::Duration;

use support::*;

const MAX_READ_LAG: u64 = 2;

fn db_files(db_url: &str) -> Vec<PathBuf> {
    let path = PathBuf::from(db_url.trim_start_matches("sqlite://"));
    ["", "-wal", "-shm"]
        .iter()
        .map(|s| PathBuf::from(format!("{}{s}", path.display())))
        .collect()
}

fn copy_files(from: &[PathBuf], to: &Path) -> Vec<(PathBuf, PathBuf)> {
    from.iter()
        .filter(|f| f.exists())
        .map(|f| {
            let dest = to.join(f.file_name().unwrap());
            std::fs::copy(f, &dest).unwrap();
            (dest, f.clone())
        })
        .collect()
}

async fn create_account(g: &Target, name: &str) -> bool {
    g.http
        .post(
            &format!("{}/accounts", g.url),
            &serde_json::json!({"name": name, "balance": 100}),
        )
        .await
        .is_ok_and(|a| a.status == 201)
}

async fn restored_replica(with_load: bool) {
    let mut g = BankGroup::start(3, None, &format!("max_read_lag = {MAX_READ_LAG}")).await;
    let target = g.target();
    let acked = Arc::new(AtomicU64::new(0));
    for i in 0..20 {
        assert!(create_account(&target, &format!("before-{i}")).await);
        acked.fetch_add(1, Ordering::SeqCst);
    }
    g.wait_converged(Duration::from_secs(60)).await;
    // An older copy of c's database files, taken while it is stopped.
    let backup = tempfile::tempdir().unwrap();
    g.banks[2].kill().await;
    let saved = copy_files(&db_files(&g.banks[2].db), backup.path());
    g.banks[2].restart().await;
    for i in 0..60 {
        assert!(create_account(&target, &format!("after-{i}")).await);
        acked.fetch_add(1, Ordering::SeqCst);
    }
    g.wait_converged(Duration::from_secs(60)).await;

    // Restore: stop c, put the older files back, start it.
    g.banks[2].kill().await;
    for f in db_files(&g.banks[2].db) {
        let _ = std::fs::remove_file(f);
    }
    for (from, to) in &saved {
        std::fs::copy(from, to).unwrap();
    }
    let stop = Arc::new(AtomicBool::new(false));
    let writer = with_load.then(|| {
        let (target, acked, stop) = (target.clone(), acked.clone(), stop.clone());
        tokio::spawn(async move {
            let mut i = 0u64;
            while !stop.load(Ordering::SeqCst) && i < 2000 {
                if create_account(&target, &format!("during-{i}")).await {
                    acked.fetch_add(1, Ordering::SeqCst);
                }
                i += 1;
            }
        })
    });
    g.banks[2].restart().await;
    // Read through the proxy while c comes back and replays: no read may miss more than
    // `max_read_lag` of the accounts acknowledged before it was sent.
    let started = tokio::time::Instant::now();
    let mut reads = 0u64;
    while started.elapsed() < Duration::from_secs(4) {
        let before = acked.load(Ordering::SeqCst);
        let a = g.get("/accounts").await.unwrap();
        if a.status != 200 {
            continue;
        }
        let seen = a.json::<Vec<serde_json::Value>>().unwrap().len() as u64;
        reads += 1;
        assert!(
            seen + MAX_READ_LAG >= before,
            "a read saw {seen} accounts, {before} were acknowledged before it (read {reads})"
        );
    }
    stop.store(true, Ordering::SeqCst);
    if let Some(w) = writer {
        w.await.unwrap();
    }
    assert!(reads > 50, "only {reads} reads in 4 s");
    let doc = g.wait_converged(Duration::from_secs(60)).await;
    let (accounts, _) = g.assert_identical().await;
    assert_eq!(accounts.len() as u64, acked.load(Ordering::SeqCst));
    // The proxy noticed and said so: supervision rewound it, or its replayer found it
    // standing elsewhere first.
    let log = g.proxy.log();
    assert!(
        log.contains("transition=\"rewind\"") || log.contains("came back elsewhere"),
        "no rewind in the log:\n{log}"
    );
    assert_eq!(doc.groups[0].head, acked.load(Ordering::SeqCst));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn rejoin_replica_restored_from_an_older_backup_is_rewound() {
    restored_replica(false).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn rejoin_replica_restored_from_an_older_backup_is_rewound_under_load() {
    restored_replica(true).await;
}
