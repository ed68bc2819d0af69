//! SQL mode over three SQLite copies: a concurrent bank workload, refusals, divergence.
#![allow(clippy::unwrap_used)]

mod support;

use std::sync::Arc;

use regroup_replay::{Checkpoints, Log, SqlJournal};
use regroup_sql::SqlGroup;
use sea_orm::{ConnectionTrait, Statement};
use support::*;

struct Setup {
    _dir: tempfile::TempDir,
    group: SqlGroup,
    journal: Arc<SqlJournal>,
}

async fn setup() -> Setup {
    let dir = tempfile::tempdir().unwrap();
    let urls: Vec<String> = ["a", "b", "c"]
        .iter()
        .map(|n| format!("sqlite://{}", dir.path().join(format!("{n}.db")).display()))
        .collect();
    let journal = Arc::new(
        SqlJournal::connect(&format!(
            "sqlite://{}",
            dir.path().join("journal.db").display()
        ))
        .await
        .unwrap(),
    );
    let group = SqlGroup::open("bank", &copies(&urls), journal.clone())
        .await
        .unwrap();
    Setup {
        _dir: dir,
        group,
        journal,
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn three_sqlite_copies_concurrent_transfers_stay_identical_and_conserve_money() {
    let s = setup().await;
    let g = &s.group;
    create_bank(g, false).await;
    let done = workload(g, 4, 40).await;
    assert!(done > 20, "only {done} transfers committed");
    caught_up(g).await;
    assert_identical(g, &["a", "b", "c"]).await;
    for name in ["a", "b", "c"] {
        assert_eq!(
            money(g.copy_connection(name).unwrap()).await,
            ACCOUNTS * OPENING,
            "money on copy {name}"
        );
    }
    // Every transfer and the schema are in the journal, one record per transaction.
    let head = s.journal.open_log("bank").await.unwrap().head;
    assert_eq!(head, 2 + ACCOUNTS as u64 + done);
    assert!(
        g.status()
            .iter()
            .all(|c| c.diverged.is_none() && c.applied == head)
    );
    g.close().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_nondeterministic_statement_that_cannot_be_fixed_is_refused_and_nothing_journaled() {
    let s = setup().await;
    let g = &s.group;
    create_bank(g, false).await;
    let head = s.journal.open_log("bank").await.unwrap().head;
    let err = g
        .execute_unprepared("UPDATE accounts SET balance = balance + abs(random() % 10)")
        .await
        .unwrap_err()
        .to_string();
    assert!(
        err.contains("random()") && err.contains("UPDATE accounts SET balance"),
        "{err}"
    );
    // Inside a transaction too: the transaction's other statements are journaled only if
    // it commits, and the refused one never ran.
    let txn = sea_orm::TransactionTrait::begin(g).await.unwrap();
    let err = txn
        .execute_unprepared("DELETE FROM transfers WHERE id IN (SELECT id FROM transfers LIMIT 1)")
        .await
        .unwrap_err()
        .to_string();
    assert!(err.contains("LIMIT without ORDER BY"), "{err}");
    // 'now' bound as a value is the clock too, for SQLite's date functions.
    let err = txn
        .execute_raw(Statement::from_sql_and_values(
            txn.get_database_backend(),
            "INSERT INTO transfers (src, dst, amount, at) VALUES (1, 2, 3, datetime(?))",
            ["now".into()],
        ))
        .await
        .unwrap_err()
        .to_string();
    assert!(err.contains("bound value 'now'"), "{err}");
    sea_orm::TransactionSession::rollback(txn).await.unwrap();
    assert_eq!(s.journal.open_log("bank").await.unwrap().head, head);
    caught_up(g).await;
    for name in ["a", "b", "c"] {
        assert_eq!(
            money(g.copy_connection(name).unwrap()).await,
            ACCOUNTS * OPENING
        );
    }
    g.close().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_copy_whose_affected_rows_differ_is_quarantined_durably_and_serves_no_read() {
    let s = setup().await;
    let g = &s.group;
    create_bank(g, false).await;
    assert!(transfer(g, 1, 2, 10).await.unwrap());
    assert!(transfer(g, 2, 3, 10).await.unwrap());
    caught_up(g).await;
    // Someone changes copy c behind the group's back.
    let c = g.copy_connection("c").unwrap();
    c.execute_raw(Statement::from_string(
        c.get_database_backend(),
        "DELETE FROM transfers WHERE src = 2",
    ))
    .await
    .unwrap();
    g.execute_unprepared("UPDATE transfers SET note = 'audited' WHERE amount >= 10")
        .await
        .unwrap();
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(30);
    while s.journal.diverged("bank", "c").await.unwrap().is_none() {
        assert!(std::time::Instant::now() < deadline, "{:?}", g.status());
        tokio::time::sleep(std::time::Duration::from_millis(20)).await;
    }
    let status = g.status();
    assert!(status.iter().any(|c| c.name == "c" && c.diverged.is_some()));
    assert!(status.iter().any(|c| c.name == "b" && c.diverged.is_none()));
    // Balanced reads only go to copies that are not quarantined: c has 1 transfer, the
    // others 2.
    for _ in 0..12 {
        let rows = g
            .query_all_raw(Statement::from_string(
                g.get_database_backend(),
                "SELECT id FROM transfers",
            ))
            .await
            .unwrap();
        assert_eq!(rows.len(), 2);
    }
    g.close().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn nested_transactions_are_savepoints_journaled_with_their_parent() {
    use sea_orm::{TransactionSession, TransactionTrait};
    let s = setup().await;
    let g = &s.group;
    create_bank(g, false).await;
    let head = s.journal.open_log("bank").await.unwrap().head;
    let outer = g.begin().await.unwrap();
    outer
        .execute_unprepared("UPDATE accounts SET balance = balance - 5 WHERE id = 1")
        .await
        .unwrap();
    let kept = outer.begin().await.unwrap();
    kept.execute_unprepared("UPDATE accounts SET balance = balance + 5 WHERE id = 2")
        .await
        .unwrap();
    kept.commit().await.unwrap();
    let dropped = outer.begin().await.unwrap();
    dropped
        .execute_unprepared("UPDATE accounts SET balance = balance + 1000 WHERE id = 3")
        .await
        .unwrap();
    dropped.rollback().await.unwrap();
    outer.commit().await.unwrap();
    // One record: the outer statement and the released savepoint's, not the rolled-back one.
    let log = s.journal.read_after("bank", head, 10).await.unwrap();
    assert_eq!(log.len(), 1);
    let regroup_replay::Payload::Sql(t) = &log[0].payload else {
        panic!("a SQL record");
    };
    assert_eq!(t.statements.len(), 2, "{:?}", t.statements);
    caught_up(g).await;
    assert_identical(g, &["a", "b", "c"]).await;
    for name in ["a", "b", "c"] {
        assert_eq!(
            money(g.copy_connection(name).unwrap()).await,
            ACCOUNTS * OPENING
        );
    }
    g.close().await;
}
