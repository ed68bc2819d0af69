//! SQL-mode writes against plain sea-orm writes on one database, measured in one run:
//! `cargo test --release -p regroup-sql --test bench_writes -- --ignored --nocapture`
#![allow(clippy::unwrap_used)]

use std::sync::Arc;
use std::time::Instant;

use regroup_replay::SqlJournal;
use regroup_sql::{CopyConfig, SqlGroup};
use sea_orm::{
    ConnectionTrait, DatabaseConnection, DbErr, Statement, TransactionSession, TransactionTrait,
};

const WRITES: u64 = 1_000;

/// One write transaction: two updates and an insert, as a transfer does.
async fn write<C>(db: &C, i: u64) -> Result<(), DbErr>
where
    C: TransactionTrait,
{
    let txn = db.begin().await?;
    let b = txn.get_database_backend();
    let a = (i % 8) as i64 + 1;
    txn.execute_raw(Statement::from_sql_and_values(
        b,
        "UPDATE accounts SET balance = balance - 1 WHERE id = ?",
        [a.into()],
    ))
    .await?;
    txn.execute_raw(Statement::from_sql_and_values(
        b,
        "UPDATE accounts SET balance = balance + 1 WHERE id = ?",
        [(a % 8 + 1).into()],
    ))
    .await?;
    txn.execute_raw(Statement::from_sql_and_values(
        b,
        "INSERT INTO transfers (src, dst, amount) VALUES (?, ?, 1)",
        [a.into(), (a % 8 + 1).into()],
    ))
    .await?;
    txn.commit().await
}

const SCHEMA: [&str; 3] = [
    "CREATE TABLE accounts (id INTEGER PRIMARY KEY, balance INTEGER NOT NULL)",
    "CREATE TABLE transfers (id INTEGER PRIMARY KEY, src INTEGER, dst INTEGER, amount INTEGER)",
    "INSERT INTO accounts (id, balance) VALUES (1, 100), (2, 100), (3, 100), (4, 100), (5, 100), (6, 100), (7, 100), (8, 100)",
];

async fn plain(dir: &std::path::Path) -> f64 {
    let db: DatabaseConnection = regroup_sql::connection::connect_copy(&format!(
        "sqlite://{}",
        dir.join("plain.db").display()
    ))
    .await
    .unwrap();
    for s in SCHEMA {
        db.execute_unprepared(s).await.unwrap();
    }
    let t = Instant::now();
    for i in 0..WRITES {
        write(&db, i).await.unwrap();
    }
    t.elapsed().as_secs_f64() * 1e6 / WRITES as f64
}

async fn sql_mode(dir: &std::path::Path, copies: usize) -> f64 {
    let sub = dir.join(format!("sql{copies}"));
    std::fs::create_dir_all(&sub).unwrap();
    let journal = Arc::new(
        SqlJournal::connect(&format!("sqlite://{}", sub.join("journal.db").display()))
            .await
            .unwrap(),
    );
    let cs: Vec<CopyConfig> = (0..copies)
        .map(|i| {
            CopyConfig::new(
                format!("c{i}"),
                format!("sqlite://{}", sub.join(format!("{i}.db")).display()),
            )
        })
        .collect();
    let g = SqlGroup::open("bench", &cs, journal).await.unwrap();
    for s in SCHEMA {
        g.execute_unprepared(s).await.unwrap();
    }
    let t = Instant::now();
    for i in 0..WRITES {
        write(&g, i).await.unwrap();
    }
    let took = t.elapsed().as_secs_f64() * 1e6 / WRITES as f64;
    assert!(g.wait_caught_up(std::time::Duration::from_secs(60)).await);
    g.close().await;
    took
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "a measurement, not a check"]
async fn sql_mode_writes_vs_plain_sea_orm() {
    let dir = tempfile::tempdir().unwrap();
    let base = plain(dir.path()).await;
    let one = sql_mode(dir.path(), 1).await;
    let three = sql_mode(dir.path(), 3).await;
    println!("{WRITES} write transactions (2 updates + 1 insert), sequential, SQLite WAL");
    println!("plain sea-orm, one database:       {base:8.1} µs per transaction (1.00x)");
    println!(
        "SQL mode, one copy:                {one:8.1} µs per transaction ({:.2}x)",
        one / base
    );
    println!(
        "SQL mode, three copies (replayed): {three:8.1} µs per transaction ({:.2}x)",
        three / base
    );
}
