//! Parallel replay with conflict keys, on real banks: transfers that share no account are
//! replayed side by side on a replica that catches up, those that share one in seq order,
//! and every copy ends identical to the primary. On SQLite (one writer at a time in the
//! bank) and on PostgreSQL (the bank locks its two accounts; transactions overlap).

#![allow(clippy::unwrap_used)]

mod support;

use std::time::Duration;

use sea_orm::{ConnectionTrait, Database, Statement};
use support::postgres::TempDatabase;
use support::*;

/// Transfers are independent unless they share an account.
const CONFLICT_KEYS: &str = r#"
[[groups.conflict_keys]]
method = "POST"
path = "/transfers"
keys = ["body:/from", "body:/to"]
"#;

/// Seeds accounts, takes replica c down while a load runs, brings it back and checks that
/// it caught up to a copy identical to the others. Returns the group.
async fn catch_up(mut g: BankGroup) -> BankGroup {
    let mut report = LoadReport::default();
    let seeds = seed_accounts(&g, 12, &mut report).await;
    let before = run_load(&g, &seeds, 8, 60, false, "before").await;
    g.banks[2].kill().await;
    let during = run_load(&g, &seeds, 8, 400, false, "during").await;
    g.banks[2].restart().await;
    let after = run_load(&g, &seeds, 8, 60, false, "after").await;
    for r in [before, during, after] {
        merge(&mut report, r);
    }
    g.wait_converged(Duration::from_secs(90)).await;
    let (accounts, transfers) = g.assert_identical().await;
    assert_bank_invariants(&report, &accounts, &transfers);
    g
}

/// How many records `db`'s copy took while records before them were still on their way
/// (sent in parallel: their floor is below the seq right before them).
async fn sent_in_parallel(db: &str) -> i64 {
    let conn = Database::connect(db).await.unwrap();
    let row = conn
        .query_one_raw(Statement::from_string(
            conn.get_database_backend(),
            "SELECT count(*) AS n FROM regroup_applied WHERE floor IS NOT NULL AND floor < seq - 1",
        ))
        .await
        .unwrap()
        .unwrap();
    row.try_get::<i64>("", "n").unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_returning_replica_replays_independent_transfers_in_parallel_on_sqlite() {
    let g = catch_up(BankGroup::start(3, None, CONFLICT_KEYS).await).await;
    let parallel = sent_in_parallel(&g.banks[2].db).await;
    assert!(
        parallel > 0,
        "no record reached the returning replica in parallel\nproxy log:\n{}",
        tail(&g.proxy.log(), 40)
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_returning_replica_runs_independent_transfers_side_by_side_on_postgres() {
    let mut dbs = Vec::new();
    for _ in 0..3 {
        let Some(db) = TempDatabase::create_or_skip().await else {
            return;
        };
        dbs.push(db);
    }
    let urls: Vec<&str> = dbs.iter().map(|d| d.url.as_str()).collect();
    let g = catch_up(BankGroup::start_on(&urls, CONFLICT_KEYS).await).await;
    assert!(sent_in_parallel(&dbs[2].url).await > 0);
    // The replica's transactions overlapped: some record committed before one with a lower
    // seq (transaction ids are handed out in the order transactions first write).
    let conn = Database::connect(&dbs[2].url).await.unwrap();
    let rows = conn
        .query_all_raw(Statement::from_string(
            conn.get_database_backend(),
            "SELECT seq FROM regroup_applied ORDER BY xmin::text::bigint",
        ))
        .await
        .unwrap();
    let order: Vec<i64> = rows.iter().map(|r| r.try_get("", "seq").unwrap()).collect();
    assert!(
        order.windows(2).any(|w| w[0] > w[1]),
        "the replica executed every record in seq order"
    );
    drop(g);
}
