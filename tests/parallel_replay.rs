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

/// The same record delivered twice at once on PostgreSQL (a retry while the first delivery
/// still runs, as a broken parallel window sends it): both are answered alike from one
/// execution, the loser's work rolled back with its transaction, not a 500 from the
/// record's primary key (which made the replica diverge).
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_record_delivered_twice_at_once_is_applied_once_on_postgres() {
    use regroup_replay::{Answer, ExactlyOnce, ReplayContext};
    use sea_orm_migration::{MigrationTrait, SchemaManager};
    let Some(db) = TempDatabase::create_or_skip().await else {
        return;
    };
    let conn = Database::connect(&db.url).await.unwrap();
    for m in [
        Box::new(regroup_migrations::AppliedMigration) as Box<dyn MigrationTrait>,
        Box::new(regroup_migrations::AppliedFloorMigration),
    ] {
        m.up(&SchemaManager::new(&conn)).await.unwrap();
    }
    conn.execute_unprepared("CREATE TABLE item (id BIGSERIAL PRIMARY KEY, name TEXT NOT NULL)")
        .await
        .unwrap();
    let once = ExactlyOnce::new(conn.clone());
    let ctx = ReplayContext::new(
        7,
        uuid::Uuid::now_v7(),
        1,
        time::OffsetDateTime::now_utc(),
        true,
    )
    .with_floor(Some(5));
    let run = |once: ExactlyOnce, ctx: ReplayContext| async move {
        once.run(Some(&ctx), |txn| {
            Box::pin(async move {
                txn.execute_unprepared("INSERT INTO item (name) VALUES ('seven')")
                    .await
                    .map_err(|e| Answer::json(500, &e.to_string()))?;
                // Both deliveries are inside their transactions at once.
                tokio::time::sleep(Duration::from_millis(200)).await;
                Ok(Answer::json(201, &"done"))
            })
        })
        .await
    };
    let (first, second) = tokio::join!(
        tokio::spawn(run(once.clone(), ctx.clone())),
        tokio::spawn(run(once.clone(), ctx.clone()))
    );
    let (first, second) = (first.unwrap().unwrap(), second.unwrap().unwrap());
    assert_eq!(first, second);
    assert_eq!(first.status, 201);
    let rows = conn
        .query_one_raw(Statement::from_string(
            conn.get_database_backend(),
            "SELECT (SELECT count(*) FROM item) AS items, \
             (SELECT count(*) FROM regroup_applied) AS records",
        ))
        .await
        .unwrap()
        .unwrap();
    assert_eq!(
        (
            rows.try_get::<i64>("", "items").unwrap(),
            rows.try_get::<i64>("", "records").unwrap()
        ),
        (1, 1),
        "executed once, recorded once"
    );
    conn.close().await.unwrap();
}
