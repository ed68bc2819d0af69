//! Three bank partitions with the journal on PostgreSQL: a fresh database per run,
//! convergence under concurrent load, the database dropped afterwards (also on failure).

#![allow(clippy::unwrap_used)]

mod support;

use std::time::Duration;

use sea_orm::{ConnectionTrait, Database, Statement};
use support::*;

/// The server's maintenance database (trust auth on the test machines and in CI).
use support::postgres::{ADMIN_URL, TempDatabase};

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn three_partitions_journal_on_postgres_converge() {
    let db = match TempDatabase::create().await {
        Ok(db) => db,
        Err(e) if in_ci() => {
            panic!("PostgreSQL not reachable at {ADMIN_URL} (required in CI): {e}")
        }
        Err(e) => {
            eprintln!("skipping: PostgreSQL not reachable at {ADMIN_URL}: {e}");
            return;
        }
    };
    // Declared after `db`, so dropped first: the proxy is gone before the database is.
    let g = BankGroup::start(3, Some(&db.url), "").await;
    let mut report = LoadReport::default();
    let seeds = seed_accounts(&g, 8, &mut report).await;
    let load = run_load(&g, &seeds, 16, 520, false, "pg").await;
    assert_eq!(load.answered(), 520);
    assert_eq!(
        load.count(201) + load.count(409) + load.count(400) + load.count(404),
        520,
        "unexpected answers: {:?}",
        load.statuses
    );
    report.acked_accounts.extend(load.acked_accounts);
    report.acked_transfers.extend(load.acked_transfers);
    report.initial_balance.extend(load.initial_balance);

    let doc = g.wait_converged(Duration::from_secs(90)).await;
    assert_eq!(doc.groups[0].head, 8 + 520);
    assert_eq!(doc.groups[0].sealed, 8 + 520);
    let (accounts, transfers) = g.assert_identical().await;
    assert_bank_invariants(&report, &accounts, &transfers);
    assert_eq!(transfers.len(), report.acked_transfers.len());

    // The journal really is in PostgreSQL, every record sealed.
    assert!(!g.dir.path().join("journal.db").exists());
    let journal = Database::connect(&db.url).await.unwrap();
    let row = journal
        .query_one_raw(Statement::from_string(
            journal.get_database_backend(),
            "SELECT count(*), max(seq), count(*) FILTER (WHERE state = 'pending') \
             FROM regroup_record WHERE group_name = 'bank'",
        ))
        .await
        .unwrap()
        .unwrap();
    let counts: (i64, i64, i64) = (
        row.try_get_by_index(0).unwrap(),
        row.try_get_by_index(1).unwrap(),
        row.try_get_by_index(2).unwrap(),
    );
    assert_eq!(counts, (528, 528, 0));
    let _ = journal.close().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn failover_with_the_journal_on_postgres_fences_and_converges() {
    let db = match TempDatabase::create().await {
        Ok(db) => db,
        Err(e) if in_ci() => {
            panic!("PostgreSQL not reachable at {ADMIN_URL} (required in CI): {e}")
        }
        Err(e) => {
            eprintln!("skipping: PostgreSQL not reachable at {ADMIN_URL}: {e}");
            return;
        }
    };
    let fast = "heartbeat_interval_ms = 100\nheartbeat_timeout_ms = 100\nheartbeat_retries = 3";
    let mut g = BankGroup::start(3, Some(&db.url), fast).await;
    let mut report = LoadReport::default();
    let seeds = seed_accounts(&g, 6, &mut report).await;
    let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let target = g.target();
    let load = run_load_until(
        &target,
        &seeds,
        16,
        usize::MAX,
        false,
        "pg-failover",
        Some(stop.clone()),
    );
    let chaos = async {
        tokio::time::sleep(Duration::from_millis(700)).await;
        g.banks[0].kill().await;
        eventually("the role to move", Duration::from_secs(10), || async {
            let d = target.status().await;
            if d.groups[0].primary != "a" {
                Ok(())
            } else {
                Err(format!("{:?}", d.groups[0]))
            }
        })
        .await;
        tokio::time::sleep(Duration::from_millis(500)).await;
        g.banks[0].restart().await;
        tokio::time::sleep(Duration::from_millis(300)).await;
        stop.store(true, std::sync::atomic::Ordering::Relaxed);
    };
    let (load, ()) = tokio::join!(load, chaos);
    assert!(
        load.errors.is_empty(),
        "client requests failed: {:?}",
        load.errors
    );
    assert_eq!(
        load.count(201) + load.count(409) + load.count(400) + load.count(404),
        load.answered(),
        "client requests failed: {:?}",
        load.statuses
    );
    report.acked_accounts.extend(load.acked_accounts);
    report.acked_transfers.extend(load.acked_transfers);
    report.initial_balance.extend(load.initial_balance);
    let doc = g.wait_converged(Duration::from_secs(60)).await;
    assert_eq!(doc.groups[0].epoch, 2);
    let (accounts, transfers) = g.assert_identical().await;
    assert_bank_invariants(&report, &accounts, &transfers);

    // The new epoch and primary are in PostgreSQL.
    let journal = Database::connect(&db.url).await.unwrap();
    let row = journal
        .query_one_raw(Statement::from_string(
            journal.get_database_backend(),
            "SELECT epoch, primary_name FROM regroup_group WHERE name = 'bank'",
        ))
        .await
        .unwrap()
        .unwrap();
    let epoch: i64 = row.try_get_by_index(0).unwrap();
    let primary: String = row.try_get_by_index(1).unwrap();
    assert_eq!(
        (epoch, primary.as_str()),
        (2, doc.groups[0].primary.as_str())
    );
    let _ = journal.close().await;
}
