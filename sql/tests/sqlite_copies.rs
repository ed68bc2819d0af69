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

/// A record left pending (the process stopped between the journal append and the seal) is
/// settled on the next open by the primary's checkpoint row: below it, the commit never
/// happened (skipped); at it, it did (executed, and replayed on the others).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_record_left_pending_is_settled_by_the_primarys_checkpoint_row_on_open() {
    use regroup_replay::{Payload, Record, RecordState, SqlStatement, SqlTransaction};
    let s = setup().await;
    create_bank(&s.group, false).await;
    caught_up(&s.group).await;
    s.group.close().await;
    let a = s.group.copy_connection("a").unwrap().clone();
    let row = |a: sea_orm::DatabaseConnection| async move {
        let r = a
            .query_one_raw(Statement::from_string(
                a.get_database_backend(),
                "SELECT seq, hash FROM regroup_sql_checkpoint WHERE group_name = 'bank'",
            ))
            .await
            .unwrap()
            .unwrap();
        (
            r.try_get::<i64>("", "seq").unwrap() as u64,
            r.try_get::<String>("", "hash").unwrap(),
        )
    };
    let pending = |seq: u64, hash: &str| {
        let statements = vec![SqlStatement {
            sql: "UPDATE accounts SET balance = balance - 7 WHERE id = 1".into(),
            values: vec![],
            rows_affected: Some(1),
        }];
        let hash = regroup_sql::checkpoint::chain(hash, &statements);
        Record::pending(
            "bank",
            seq,
            1,
            SqlTransaction {
                dialect: "sqlite".into(),
                statements,
                hash,
            },
        )
    };

    // Never committed on the primary: skipped.
    let (seq, hash) = row(a.clone()).await;
    s.journal.append(&pending(seq + 1, &hash)).await.unwrap();
    let g = SqlGroup::open("bank", &copies_of(&s), s.journal.clone())
        .await
        .unwrap();
    let r = s.journal.record("bank", seq + 1).await.unwrap().unwrap();
    assert_eq!(r.state, RecordState::Skipped);
    g.close().await;

    // Committed on the primary (its row moved with it), the seal lost: executed.
    let record = pending(seq + 2, &hash);
    s.journal.append(&record).await.unwrap();
    let Payload::Sql(t) = &record.payload else {
        panic!("a SQL record")
    };
    a.execute_unprepared(&t.statements[0].sql).await.unwrap();
    a.execute_unprepared(&format!(
        "UPDATE regroup_sql_checkpoint SET seq = {}, hash = '{}', txn_id = '{}' WHERE group_name = 'bank'",
        seq + 2,
        t.hash,
        record.txn_id
    ))
    .await
    .unwrap();
    let g = SqlGroup::open("bank", &copies_of(&s), s.journal.clone())
        .await
        .unwrap();
    let r = s.journal.record("bank", seq + 2).await.unwrap().unwrap();
    assert_eq!(r.state, RecordState::Executed);
    caught_up(&g).await;
    assert_identical(&g, &["a", "b", "c"]).await;
    let b = g.copy_connection("b").unwrap();
    assert_eq!(money(b).await, ACCOUNTS * OPENING - 7);
    assert!(g.status().iter().all(|c| c.diverged.is_none()));
    g.close().await;
}

fn copies_of(s: &Setup) -> Vec<regroup_sql::CopyConfig> {
    let urls: Vec<String> = ["a", "b", "c"]
        .iter()
        .map(|n| {
            format!(
                "sqlite://{}",
                s._dir.path().join(format!("{n}.db")).display()
            )
        })
        .collect();
    copies(&urls)
}
