//! Shared by SQL mode's tests: a bank over a group of copies.
#![allow(dead_code, unreachable_pub, missing_docs, clippy::unwrap_used)]

use std::sync::Arc;
use std::time::Duration;

/// The root's PostgreSQL helper (a member crate's tests cannot reach the root's `tests/`
/// as a module otherwise).
#[path = "../../../tests/support/postgres.rs"]
pub mod postgres;

/// Whether the tests run in CI (`CI=true`), where a missing server fails them.
pub fn in_ci() -> bool {
    std::env::var("CI").is_ok_and(|v| !v.is_empty() && v != "false" && v != "0")
}

use regroup_sql::{CopyConfig, SqlGroup};
use sea_orm::entity::prelude::*;
use sea_orm::{ActiveValue::Set, ConnectionTrait, TransactionTrait};

/// The bank's accounts, as an application declares them.
pub mod account {
    use sea_orm::entity::prelude::*;

    #[sea_orm::model]
    #[derive(Clone, Debug, PartialEq, Eq, DeriveEntityModel)]
    #[sea_orm(table_name = "accounts")]
    pub struct Model {
        #[sea_orm(primary_key, auto_increment = false)]
        pub id: i64,
        pub owner: String,
        pub balance: i64,
    }

    impl ActiveModelBehavior for ActiveModel {}
}

pub const ACCOUNTS: i64 = 8;
pub const OPENING: i64 = 1_000;

/// The schema, created through the group (journaled DDL), and the opening balances.
pub async fn create_bank(g: &SqlGroup, pg: bool) {
    let serial = if pg {
        "BIGSERIAL PRIMARY KEY"
    } else {
        "INTEGER PRIMARY KEY AUTOINCREMENT"
    };
    g.execute_unprepared(
        "CREATE TABLE accounts (id BIGINT PRIMARY KEY, owner TEXT NOT NULL, balance BIGINT NOT NULL)",
    )
    .await
    .unwrap();
    g.execute_unprepared(&format!(
        "CREATE TABLE transfers (id {serial}, src BIGINT NOT NULL, dst BIGINT NOT NULL, amount BIGINT NOT NULL, at TEXT NOT NULL, note TEXT)"
    ))
    .await
    .unwrap();
    for id in 1..=ACCOUNTS {
        account::ActiveModel {
            id: Set(id),
            owner: Set(format!("owner {id}")),
            balance: Set(OPENING),
        }
        .insert(g)
        .await
        .unwrap();
    }
}

/// One transfer in one transaction, as an application writes it: entity reads and
/// updates, and a raw insert whose time comes from the database's clock.
pub async fn transfer(g: &SqlGroup, src: i64, dst: i64, amount: i64) -> Result<bool, String> {
    transfer_noted(g, src, dst, amount, None).await
}

/// [`transfer`] with a note kept in the transfer's row (a client's token).
pub async fn transfer_noted(
    g: &SqlGroup,
    src: i64,
    dst: i64,
    amount: i64,
    note: Option<String>,
) -> Result<bool, String> {
    let pg = g.get_database_backend() == sea_orm::DbBackend::Postgres;
    g.transaction::<_, bool, DbErr>(move |txn| {
        Box::pin(async move {
            let Some(from) = account::Entity::find_by_id(src).one(txn).await? else {
                return Ok(false);
            };
            if from.balance < amount {
                return Ok(false);
            }
            let to = account::Entity::find_by_id(dst)
                .one(txn)
                .await?
                .ok_or_else(|| DbErr::RecordNotFound(format!("account {dst}")))?;
            let mut a: account::ActiveModel = from.clone().into();
            a.balance = Set(from.balance - amount);
            a.update(txn).await?;
            let mut b: account::ActiveModel = to.clone().into();
            b.balance = Set(to.balance + amount);
            b.update(txn).await?;
            let sql = if pg {
                "INSERT INTO transfers (src, dst, amount, at, note) VALUES ($1, $2, $3, CAST(now() AS TEXT), $4)"
            } else {
                "INSERT INTO transfers (src, dst, amount, at, note) VALUES (?, ?, ?, strftime('%Y-%m-%d %H:%M:%f', 'now'), ?)"
            };
            txn.execute_raw(sea_orm::Statement::from_sql_and_values(
                txn.get_database_backend(),
                sql,
                [src.into(), dst.into(), amount.into(), note.clone().into()],
            ))
            .await?;
            Ok(true)
        })
    })
    .await
    .map_err(|e| e.to_string())
}

/// Runs `clients` concurrent clients of `per_client` transfers each (seeded), with reads
/// in between; returns how many transfers committed.
pub async fn workload(g: &SqlGroup, clients: u64, per_client: u64) -> u64 {
    let mut tasks = Vec::new();
    for c in 0..clients {
        let g = g.clone();
        tasks.push(tokio::spawn(async move {
            let mut done = 0;
            let mut x = c.wrapping_mul(0x9e37_79b9_7f4a_7c15) | 1;
            for _ in 0..per_client {
                x ^= x << 13;
                x ^= x >> 7;
                x ^= x << 17;
                let src = (x % ACCOUNTS as u64) as i64 + 1;
                let dst = ((x >> 8) % ACCOUNTS as u64) as i64 + 1;
                let amount = ((x >> 16) % 300) as i64 + 1;
                if src != dst && transfer(&g, src, dst, amount).await.unwrap() {
                    done += 1;
                }
                // A balanced read outside any transaction.
                let all = account::Entity::find().all(&g).await.unwrap();
                assert_eq!(all.len(), ACCOUNTS as usize);
            }
            done
        }));
    }
    let mut total = 0;
    for t in tasks {
        total += t.await.unwrap();
    }
    total
}

/// Sum of balances on one copy.
pub async fn money(db: &DatabaseConnection) -> i64 {
    let row = db
        .query_one_raw(sea_orm::Statement::from_string(
            db.get_database_backend(),
            "SELECT CAST(SUM(balance) AS BIGINT) AS s FROM accounts",
        ))
        .await
        .unwrap()
        .unwrap();
    row.try_get::<i64>("", "s").unwrap()
}

/// Asserts every table is identical row for row on every copy.
pub async fn assert_identical(g: &SqlGroup, names: &[&str]) {
    let first = regroup_sql::verify::digests(g.copy_connection(names[0]).unwrap())
        .await
        .unwrap();
    assert!(
        first.contains_key("accounts") && first.contains_key("transfers"),
        "{first:?}"
    );
    for n in &names[1..] {
        let other = regroup_sql::verify::digests(g.copy_connection(n).unwrap())
            .await
            .unwrap();
        assert_eq!(
            regroup_sql::verify::first_difference(&first, &other),
            None,
            "copy {n} differs from {}: {first:?} vs {other:?}; {:?}",
            names[0],
            g.status()
        );
    }
}

pub fn copies(urls: &[String]) -> Vec<CopyConfig> {
    ["a", "b", "c"]
        .iter()
        .zip(urls)
        .map(|(n, u)| CopyConfig::new(*n, u.clone()))
        .collect()
}

pub async fn caught_up(g: &SqlGroup) {
    assert!(
        g.wait_caught_up(Duration::from_secs(60)).await,
        "copies did not catch up: {:?}",
        g.status()
    );
}

pub type Journal = Arc<dyn regroup_replay::Journal>;
