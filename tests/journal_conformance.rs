//! The journal conformance suite (`regroup_replay::journal::conformance`) over every
//! implementation: in memory, SQLite, PostgreSQL (a fresh database per run, dropped after),
//! the cached journal over SQLite, and NATS JetStream (a journal prefix of its own per run,
//! deleted after).

mod support;

use regroup_replay::journal::conformance;
use regroup_replay::{CachedJournal, JournalError, MemoryJournal, NatsJournal, SqlJournal};
use support::postgres::TempDatabase;

fn pass(name: &str, result: Result<(), String>) {
    if let Err(failures) = result {
        panic!("{name} fails the journal conformance suite:\n{failures}");
    }
}

#[tokio::test]
async fn memory_journal_conforms() {
    let store = MemoryJournal::new();
    let result = conformance::run(|| {
        let handle = store.handle();
        async move { Ok::<_, JournalError>(handle) }
    })
    .await;
    pass("MemoryJournal", result);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sqlite_journal_conforms() {
    let dir = tempfile::tempdir().expect("temp dir");
    let url = format!("sqlite://{}", dir.path().join("journal.db").display());
    let result = conformance::run(|| SqlJournal::connect(&url)).await;
    pass("SqlJournal on SQLite", result);
}

#[tokio::test]
async fn memory_journal_with_deferred_writes_conforms() {
    let store = MemoryJournal::deferred();
    let result = conformance::run(|| {
        let handle = store.handle();
        async move { Ok::<_, JournalError>(handle) }
    })
    .await;
    pass("MemoryJournal (deferred writes)", result);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sqlite_journal_with_overlapped_flushes_conforms() {
    let dir = tempfile::tempdir().expect("temp dir");
    let url = format!("sqlite://{}", dir.path().join("journal.db").display());
    let result =
        conformance::run(|| SqlJournal::connect_with(&url, regroup_replay::JournalSync::Overlap))
            .await;
    pass("SqlJournal on SQLite (journal_sync = overlap)", result);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sqlite_journal_with_relaxed_seals_conforms() {
    let dir = tempfile::tempdir().expect("temp dir");
    let url = format!("sqlite://{}", dir.path().join("journal.db").display());
    let result =
        conformance::run(|| SqlJournal::connect_with(&url, regroup_replay::JournalSync::Append))
            .await;
    pass("SqlJournal on SQLite (journal_sync = append)", result);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn postgres_journal_conforms() {
    let Some(db) = TempDatabase::create_or_skip().await else {
        return;
    };
    let result = conformance::run(|| SqlJournal::connect(&db.url)).await;
    pass("SqlJournal on PostgreSQL", result);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cached_journal_conforms() {
    let dir = tempfile::tempdir().expect("temp dir");
    let url = format!("sqlite://{}", dir.path().join("journal.db").display());
    let result = conformance::run(|| async {
        Ok::<_, JournalError>(CachedJournal::new(SqlJournal::connect(&url).await?))
    })
    .await;
    pass("CachedJournal over SQLite", result);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn nats_journal_conforms() {
    if !support::nats::local_or_skip().await {
        return;
    }
    let url = support::nats::LOCAL_URL;
    let prefix = support::nats::unique_prefix();
    let result = conformance::run(|| NatsJournal::connect_with_prefix(url, &prefix)).await;
    support::nats::delete_journal(url, &prefix).await;
    pass("NatsJournal on the local NATS server", result);
}
