//! Rebuild by snapshot with real processes: a diverged partition rebuilt under load from a
//! replica's snapshot (signed with the group's replay secret) ends identical with no failed
//! client request; the snapshot endpoints refuse unsigned callers; refusals and a failed
//! rebuild name what is wrong.

#![allow(clippy::unwrap_used)]

mod support;

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use support::*;

const SECRET: &str = "rebuild-test-secret";

fn secret_env(secret: &str) -> Vec<(String, String)> {
    vec![("REGROUP_REPLAY_SECRET".to_owned(), secret.to_owned())]
}

async fn signed_group(env: impl Fn(&str) -> Vec<(String, String)>) -> BankGroup {
    BankGroup::start_env(3, None, &format!("replay_secret = \"{SECRET}\""), env).await
}

/// Makes `c` diverge: an account created on it alone shifts its ids, so the next account
/// created through the proxy answers differently there.
async fn diverge_c(g: &BankGroup) {
    let stray = g
        .http
        .post(
            &format!("{}/accounts", g.banks[2].url),
            &serde_json::json!({"name": "stray", "balance": 1}),
        )
        .await
        .unwrap();
    assert_eq!(
        stray.status,
        201,
        "{}",
        String::from_utf8_lossy(&stray.body)
    );
    for i in 0..3 {
        let a = g
            .post(
                "/accounts",
                serde_json::json!({"name": format!("shift-{i}"), "balance": 5}),
            )
            .await
            .unwrap();
        assert_eq!(a.status, 201);
    }
    eventually(
        "c to be quarantined as diverged",
        Duration::from_secs(30),
        || async {
            let doc = g.proxy.status(&g.http).await;
            let c = doc.groups[0]
                .partitions
                .iter()
                .find(|p| p.name == "c")
                .unwrap();
            if c.status == "diverged" {
                Ok(())
            } else {
                Err(format!("c is {}", c.status))
            }
        },
    )
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rebuild_of_a_diverged_partition_under_load_ends_identical() {
    let g = signed_group(|_| secret_env(SECRET)).await;
    let mut report = LoadReport::default();
    let ids = seed_accounts(&g, 4, &mut report).await;
    // The shift accounts are created outside the load report.
    for i in 0..3 {
        report.initial_balance.insert(format!("shift-{i}"), 5);
    }
    g.wait_converged(Duration::from_secs(60)).await;

    // Nobody but the proxy may take a snapshot or restore one.
    let unsigned = g.banks[0].get(&g.http, "/_regroup/snapshot").await;
    assert_eq!(
        unsigned.status,
        403,
        "{}",
        String::from_utf8_lossy(&unsigned.body)
    );
    let forged = g
        .http
        .send(
            "PUT",
            &format!("{}/_regroup/restore", g.banks[1].url),
            None,
            None,
        )
        .await
        .unwrap();
    assert_eq!(forged.status, 403);

    diverge_c(&g).await;
    let head_before = g.proxy.status(&g.http).await.groups[0].head;

    // The rebuild runs while clients keep updating and reading.
    let stop = Arc::new(AtomicBool::new(false));
    let load = {
        let (target, ids, stop) = (g.target(), ids.clone(), stop.clone());
        tokio::spawn(async move {
            run_load_until(&target, &ids, 4, 5_000, false, "during", Some(stop)).await
        })
    };
    wait_for_head(&g.target(), head_before + 20).await;
    let (ok, out) = g
        .rebuild_cli(&["--partition", "c"], Duration::from_secs(120))
        .await;
    assert!(
        ok,
        "regroup rebuild failed:\n{out}\nproxy log:\n{}",
        g.proxy.log()
    );
    assert!(out.contains("done"), "{out}");
    // Updates went on after the rebuild too, then the load stops.
    let head_after = g.proxy.status(&g.http).await.groups[0].head;
    wait_for_head(&g.target(), head_after + 20).await;
    stop.store(true, Ordering::SeqCst);
    let during = load.await.unwrap();
    assert_no_failed_request(&during);
    merge(&mut report, during);

    let doc = g.wait_converged(Duration::from_secs(120)).await;
    let (accounts, transfers) = g.assert_identical().await;
    assert_bank_invariants(&report, &accounts, &transfers);

    let group = &doc.groups[0];
    let c = group.partitions.iter().find(|p| p.name == "c").unwrap();
    let rebuild = c.rebuild.as_ref().expect("c's rebuild in /status");
    assert_eq!(rebuild.phase, regroup_proxy::rebuild::RebuildPhase::Done);
    assert_eq!(
        rebuild.source, "b",
        "a replica is the source before the primary"
    );
    assert!(rebuild.bytes > 0, "{rebuild:?}");
    let seq = rebuild.seq.unwrap();
    assert!(
        seq > head_before,
        "the snapshot was taken under load: {rebuild:?}"
    );
    let names: Vec<&str> = group.transitions.iter().map(|t| t.name.as_str()).collect();
    assert!(
        group
            .transitions
            .iter()
            .any(|t| t.name == "rebuild" && t.reason.contains(&format!("at seq {seq}"))),
        "{names:?}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rebuild_refusals_and_failures_name_the_problem() {
    // c knows another secret: the proxy's replays and its restore are refused there.
    let g = signed_group(|name| {
        secret_env(if name == "c" {
            "another-secret"
        } else {
            SECRET
        })
    })
    .await;
    let mut report = LoadReport::default();
    seed_accounts(&g, 2, &mut report).await;

    let (ok, out) = g
        .rebuild_cli(&["--partition", "a"], Duration::from_secs(30))
        .await;
    assert!(!ok && out.contains("is the primary"), "{out}");
    let (ok, out) = g
        .rebuild_cli(
            &["--partition", "c", "--from", "c"],
            Duration::from_secs(30),
        )
        .await;
    assert!(!ok && out.contains("itself"), "{out}");
    let (ok, out) = g
        .rebuild_cli(&["--partition", "z"], Duration::from_secs(30))
        .await;
    assert!(!ok && out.contains("no partition \"z\""), "{out}");

    eventually(
        "c to be quarantined: it refuses the proxy's replays",
        Duration::from_secs(30),
        || async {
            let doc = g.proxy.status(&g.http).await;
            let c = doc.groups[0]
                .partitions
                .iter()
                .find(|p| p.name == "c")
                .unwrap();
            if c.status == "diverged" {
                Ok(())
            } else {
                Err(format!("c is {}", c.status))
            }
        },
    )
    .await;
    let (ok, out) = g
        .rebuild_cli(
            &["--partition", "c", "--from", "b"],
            Duration::from_secs(60),
        )
        .await;
    assert!(!ok, "a restore refused by the target must fail:\n{out}");
    assert!(
        out.contains("/_regroup/restore") && out.contains("403"),
        "{out}"
    );
    let doc = g.proxy.status(&g.http).await;
    let group = &doc.groups[0];
    let c = group.partitions.iter().find(|p| p.name == "c").unwrap();
    assert_eq!(
        c.status, "diverged",
        "a quarantined target stays quarantined when its rebuild fails"
    );
    assert!(
        c.reason.contains("rebuild from \"b\" failed"),
        "{}",
        c.reason
    );
    assert!(
        group
            .transitions
            .iter()
            .any(|t| t.name == "rebuild_failed" && t.reason.contains("403")),
        "{:?}",
        group.transitions
    );
    // The others go on serving.
    let a = g
        .post(
            "/accounts",
            serde_json::json!({"name": "after", "balance": 1}),
        )
        .await
        .unwrap();
    assert_eq!(a.status, 201);
}

/// The PostgreSQL snapshotter: every table read in one REPEATABLE READ READ ONLY
/// transaction, restored in one transaction into a database with other rows, foreign keys
/// and serial ids continuing where the snapshot's did.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn postgres_snapshot_restores_every_table() {
    use regroup_replay::{SeaOrmSnapshotter, Snapshotter};
    use sea_orm::{ConnectionTrait, Database, Statement};
    use sea_orm_migration::{MigrationTrait, SchemaManager};
    let Some(source_db) = support::postgres::TempDatabase::create_or_skip().await else {
        return;
    };
    let Some(target_db) = support::postgres::TempDatabase::create_or_skip().await else {
        return;
    };
    let schema = "CREATE TABLE owner (id SERIAL PRIMARY KEY, name TEXT NOT NULL);
                  CREATE TABLE pet (id BIGSERIAL PRIMARY KEY,
                                    owner INTEGER NOT NULL REFERENCES owner(id),
                                    name TEXT NOT NULL, tags JSONB, born TIMESTAMPTZ,
                                    shout TEXT GENERATED ALWAYS AS (upper(name)) STORED);
                  CREATE TABLE visit (id INTEGER GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
                                      pet BIGINT NOT NULL REFERENCES pet(id));";
    let mut dbs = Vec::new();
    for t in [&source_db, &target_db] {
        let db = Database::connect(&t.url).await.unwrap();
        regroup_migrations::AppliedMigration
            .up(&SchemaManager::new(&db))
            .await
            .unwrap();
        db.execute_unprepared(schema).await.unwrap();
        dbs.push(db);
    }
    let (source, target) = (&dbs[0], &dbs[1]);
    source
        .execute_unprepared(
            "INSERT INTO owner (name) VALUES ('ann'), ('bo');
             INSERT INTO pet (owner, name, tags, born) VALUES
               (1, 'rex', '{\"a\": [1, 2]}', '2026-01-02T03:04:05Z'), (2, 'tom', NULL, NULL);
             INSERT INTO visit (pet) VALUES (2), (1);
             INSERT INTO regroup_applied (seq, txn_id, epoch, status, body) VALUES
               (1, 't1', 1, 201, '\\x7b7d'), (3, 't3', 2, 201, '\\x7b7d');",
        )
        .await
        .unwrap();
    target
        .execute_unprepared(
            "INSERT INTO owner (name) VALUES ('x'), ('y'), ('z');
             INSERT INTO pet (owner, name) VALUES (3, 'stale');
             INSERT INTO regroup_applied (seq, txn_id, epoch, status, body) VALUES
               (9, 't9', 4, 201, '\\x00');",
        )
        .await
        .unwrap();
    let dump = |db: &sea_orm::DatabaseConnection| {
        let db = db.clone();
        async move {
            let mut out = Vec::new();
            for q in [
                "SELECT row_to_json(t)::text FROM (SELECT * FROM owner ORDER BY id) t",
                "SELECT row_to_json(t)::text FROM (SELECT * FROM pet ORDER BY id) t",
                "SELECT row_to_json(t)::text FROM (SELECT * FROM visit ORDER BY id) t",
                "SELECT row_to_json(t)::text FROM (SELECT * FROM regroup_applied ORDER BY seq) t",
            ] {
                for r in db
                    .query_all_raw(Statement::from_string(db.get_database_backend(), q))
                    .await
                    .unwrap()
                {
                    out.push(r.try_get_by_index::<String>(0).unwrap());
                }
            }
            out
        }
    };
    let snap = SeaOrmSnapshotter::new(source.clone())
        .snapshot()
        .await
        .unwrap();
    assert_eq!((snap.seq, snap.epoch), (3, 2));
    let restored = SeaOrmSnapshotter::new(target.clone())
        .restore(&snap.format.clone(), snap.body)
        .await
        .unwrap();
    assert_eq!((restored.seq, restored.epoch), (3, 2));
    assert_eq!(dump(target).await, dump(source).await);
    // New ids continue after the restored ones, the same on both.
    for db in [source, target] {
        db.execute_unprepared(
            "INSERT INTO owner (name) VALUES ('cy'); INSERT INTO pet (owner, name) VALUES (3, 'new');
             INSERT INTO visit (pet) VALUES (3);",
        )
        .await
        .unwrap();
    }
    assert_eq!(dump(target).await, dump(source).await);
    for db in dbs {
        let _ = db.close().await;
    }
}
