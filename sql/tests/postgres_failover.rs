//! Failover of the primary copy: the primary PostgreSQL database refuses connections and
//! its backends are terminated mid-load; the role moves, no acknowledged transaction is
//! lost, and the old primary catches up when it comes back.
#![allow(clippy::unwrap_used)]

mod support;

use std::collections::BTreeSet;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use regroup_replay::{Log, RoleStore, SqlJournal};
use regroup_sql::SqlGroup;
use regroup_sql::connection::Supervision;
use sea_orm::{ConnectionTrait, Database, Statement};
use support::postgres::{ADMIN_URL, TempDatabase};
use support::*;

async fn admin(sql: &str) {
    let db = Database::connect(ADMIN_URL).await.unwrap();
    db.execute_unprepared(sql).await.unwrap();
    let _ = db.close().await;
}

async fn head(j: &SqlJournal) -> u64 {
    j.open_log("bank").await.unwrap().head
}

async fn notes(db: &sea_orm::DatabaseConnection) -> BTreeSet<String> {
    db.query_all_raw(Statement::from_string(
        db.get_database_backend(),
        "SELECT note FROM transfers WHERE note IS NOT NULL",
    ))
    .await
    .unwrap()
    .iter()
    .map(|r| r.try_get::<String>("", "note").unwrap())
    .collect()
}

async fn eventually(what: &str, limit: Duration, mut check: impl AsyncFnMut() -> bool) {
    let deadline = Instant::now() + limit;
    while !check().await {
        assert!(Instant::now() < deadline, "timed out waiting for {what}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn failover_primary_database_unreachable_mid_load_loses_no_acknowledged_transfer() {
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
    let supervision = Supervision {
        interval: Duration::from_millis(100),
        timeout: Duration::from_millis(500),
        retries: 3,
    };
    let g = SqlGroup::open_with("bank", &copies(&urls), journal.clone(), supervision)
        .await
        .unwrap();
    create_bank(&g, true).await;
    assert_eq!(g.primary_name(), ("a".to_owned(), 1));

    // Clients that keep transferring, each transfer carrying a token; a token is
    // acknowledged when its commit returned Ok.
    let stop = Arc::new(AtomicBool::new(false));
    let mut clients = Vec::new();
    for c in 0..3u64 {
        let g = g.clone();
        let stop = stop.clone();
        clients.push(tokio::spawn(async move {
            let mut acked = Vec::new();
            let mut failed = 0u32;
            let started = Instant::now();
            for n in 0..100_000u64 {
                if stop.load(Ordering::Acquire) || started.elapsed() > Duration::from_secs(120) {
                    break;
                }
                let src = ((c + n) % ACCOUNTS as u64) as i64 + 1;
                let dst = ((c + n * 3 + 1) % ACCOUNTS as u64) as i64 + 1;
                if src == dst {
                    continue;
                }
                let token = format!("c{c}-{n}");
                match transfer_noted(&g, src, dst, 1, Some(token.clone())).await {
                    Ok(true) => acked.push(token),
                    Ok(false) => {}
                    Err(_) => {
                        failed += 1;
                        tokio::time::sleep(Duration::from_millis(20)).await;
                    }
                }
            }
            (acked, failed)
        }));
    }
    let before = head(&journal).await;
    eventually(
        "load before the fault",
        Duration::from_secs(60),
        async || head(&journal).await >= before + 40,
    )
    .await;

    // The primary database refuses new connections and loses every backend.
    let a = &dbs[0].name;
    admin(&format!("ALTER DATABASE {a} ALLOW_CONNECTIONS false")).await;
    admin(&format!(
        "SELECT pg_terminate_backend(pid) FROM pg_stat_activity WHERE datname = '{a}'"
    ))
    .await;
    eventually("the role to move", Duration::from_secs(30), async || {
        g.primary_name().0 != "a"
    })
    .await;
    let (primary, epoch) = g.primary_name();
    assert_eq!(epoch, 2);
    let stored = journal.role("bank", "a").await.unwrap();
    assert_eq!(
        (stored.epoch, stored.primary.as_str()),
        (2, primary.as_str())
    );
    let at_failover = head(&journal).await;
    eventually(
        "load after the failover",
        Duration::from_secs(60),
        async || head(&journal).await >= at_failover + 40,
    )
    .await;
    stop.store(true, Ordering::Release);
    let mut acked = BTreeSet::new();
    for c in clients {
        let (a, _failed) = c.await.unwrap();
        acked.extend(a);
    }
    assert!(
        acked.len() > 80,
        "only {} transfers acknowledged",
        acked.len()
    );

    // The survivors: caught up, identical, money conserved, every acknowledged transfer.
    let survivors = ["b", "c"];
    eventually(
        "the survivors to catch up",
        Duration::from_secs(60),
        async || {
            let sealed = g.sealed();
            g.status()
                .iter()
                .filter(|c| survivors.contains(&c.name.as_str()))
                .all(|c| c.applied >= sealed)
        },
    )
    .await;
    assert_identical(&g, &survivors).await;
    for name in survivors {
        let db = g.copy_connection(name).unwrap();
        assert_eq!(money(db).await, ACCOUNTS * OPENING, "money on {name}");
        let present = notes(db).await;
        let lost: Vec<_> = acked.difference(&present).collect();
        assert!(
            lost.is_empty(),
            "acknowledged transfers missing on {name}: {lost:?}"
        );
    }

    // The old primary comes back and catches up from its own checkpoint row.
    admin(&format!("ALTER DATABASE {a} ALLOW_CONNECTIONS true")).await;
    eventually(
        "the old primary to catch up",
        Duration::from_secs(60),
        async || {
            let sealed = g.sealed();
            g.status()
                .iter()
                .all(|c| c.applied >= sealed && c.diverged.is_none())
        },
    )
    .await;
    assert_identical(&g, &["a", "b", "c"]).await;
    assert_eq!(g.primary_name(), (primary, 2));
    g.close().await;
}
