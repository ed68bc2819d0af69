//! SQL mode over three PostgreSQL databases, created and dropped by the test.
#![allow(clippy::unwrap_used)]

mod support;

use std::sync::Arc;

use regroup_replay::{Log, SqlJournal};
use regroup_sql::SqlGroup;
use sea_orm::ConnectionTrait;
use support::postgres::TempDatabase;
use support::*;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn three_postgres_copies_concurrent_transfers_stay_identical_and_conserve_money() {
    let mut dbs = Vec::new();
    for _ in 0..3 {
        let Some(db) = TempDatabase::create_or_skip().await else {
            return;
        };
        dbs.push(db);
    }
    let urls: Vec<String> = dbs.iter().map(|d| d.url.clone()).collect();
    let dir = tempfile::tempdir().unwrap();
    let journal = Arc::new(
        SqlJournal::connect(&format!(
            "sqlite://{}",
            dir.path().join("journal.db").display()
        ))
        .await
        .unwrap(),
    );
    let g = SqlGroup::open("bank", &copies(&urls), journal.clone())
        .await
        .unwrap();
    create_bank(&g, true).await;
    let done = workload(&g, 4, 30).await;
    assert!(done > 20, "only {done} transfers committed");
    caught_up(&g).await;
    assert_identical(&g, &["a", "b", "c"]).await;
    for name in ["a", "b", "c"] {
        assert_eq!(
            money(g.copy_connection(name).unwrap()).await,
            ACCOUNTS * OPENING
        );
    }
    let head = journal.open_log("bank").await.unwrap().head;
    assert_eq!(head, 2 + ACCOUNTS as u64 + done);
    // A refused statement changes nothing anywhere.
    let err = g
        .execute_unprepared("UPDATE accounts SET balance = balance + floor(random() * 10)")
        .await
        .unwrap_err()
        .to_string();
    assert!(err.contains("random()"), "{err}");
    assert_eq!(journal.open_log("bank").await.unwrap().head, head);
    g.close().await;
    for c in ["a", "b", "c"] {
        if let Some(db) = g.copy_connection(c) {
            let _ = db.clone().close().await;
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_rolled_back_insert_does_not_shift_serial_ids_on_the_copies() {
    let mut dbs = Vec::new();
    for _ in 0..3 {
        let Some(db) = TempDatabase::create_or_skip().await else {
            return;
        };
        dbs.push(db);
    }
    let urls: Vec<String> = dbs.iter().map(|d| d.url.clone()).collect();
    let dir = tempfile::tempdir().unwrap();
    let journal = Arc::new(
        SqlJournal::connect(&format!(
            "sqlite://{}",
            dir.path().join("journal.db").display()
        ))
        .await
        .unwrap(),
    );
    let g = SqlGroup::open("bank", &copies(&urls), journal)
        .await
        .unwrap();
    create_bank(&g, true).await;
    // The primary's sequence moves on in a transaction that rolls back; the copies never
    // see that transaction.
    let txn = sea_orm::TransactionTrait::begin(&g).await.unwrap();
    txn.execute_unprepared(
        "INSERT INTO transfers (src, dst, amount, at) VALUES (1, 2, 5, 'rolled back')",
    )
    .await
    .unwrap();
    sea_orm::TransactionSession::rollback(txn).await.unwrap();
    assert!(transfer(&g, 1, 2, 5).await.unwrap());
    caught_up(&g).await;
    assert_identical(&g, &["a", "b", "c"]).await;
    g.close().await;
}
