//! The bank in SQL mode: one process over three database copies, through
//! `regroup_sql::SqlGroup` where the app would use a sea-orm `DatabaseConnection`.
//!
//! ```text
//! cargo run --example sql_bank                      # three SQLite files in a fresh temp dir
//! cargo run --example sql_bank -- --dir /tmp/bank   # ... in a directory of your choice
//! cargo run --example sql_bank -- --copy postgres://postgres@127.0.0.1/a \
//!     --copy postgres://postgres@127.0.0.1/b --copy postgres://postgres@127.0.0.1/c
//! ```
//!
//! It creates the schema through the group (DDL is journaled too), opens accounts, runs
//! concurrent transfers (each one sea-orm transaction: entity reads and updates, and a raw
//! insert stamped with the database's clock, which SQL mode fixes at the primary), shows
//! that a statement that cannot be made deterministic is refused, and checks that every
//! copy holds the same rows and the same total. The PostgreSQL databases must exist and be
//! empty.

use std::sync::Arc;
use std::time::Duration;

use clap::Parser;
use regroup_replay::SqlJournal;
use regroup_sql::{CopyConfig, SqlGroup};
use sea_orm::entity::prelude::*;
use sea_orm::{ActiveValue::Set, ConnectionTrait, DbBackend, Statement, TransactionTrait};

#[allow(unreachable_pub)]
mod account {
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

#[derive(Parser)]
#[command(about = "The bank in SQL mode: one process over three database copies")]
struct Args {
    /// Where the SQLite copies and the journal go (default: a fresh temp dir).
    #[arg(long)]
    dir: Option<std::path::PathBuf>,
    /// A copy's database URL, three times for PostgreSQL (default: SQLite files in --dir).
    #[arg(long = "copy")]
    copies: Vec<String>,
    /// Transfers per client (four clients).
    #[arg(long, default_value_t = 50)]
    transfers: u64,
}

const ACCOUNTS: i64 = 5;
const OPENING: i64 = 10_000;

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    tracing_subscriber::fmt()
        .with_env_filter(tracing_subscriber::EnvFilter::new("error"))
        .init();
    let args = Args::parse();
    let temp = tempfile::tempdir()?;
    let dir = args.dir.clone().unwrap_or_else(|| temp.path().to_owned());
    std::fs::create_dir_all(&dir)?;
    let urls: Vec<String> = if args.copies.is_empty() {
        ["a", "b", "c"]
            .iter()
            .map(|n| format!("sqlite://{}", dir.join(format!("{n}.db")).display()))
            .collect()
    } else {
        args.copies.clone()
    };
    let copies: Vec<CopyConfig> = urls
        .iter()
        .enumerate()
        .map(|(i, u)| CopyConfig::new(format!("copy{}", i + 1), u.clone()))
        .collect();
    let journal =
        SqlJournal::connect(&format!("sqlite://{}", dir.join("journal.db").display())).await?;
    let db = SqlGroup::open("bank", &copies, Arc::new(journal)).await?;
    let pg = db.get_database_backend() == DbBackend::Postgres;
    println!(
        "group bank over {} copies ({:?})",
        copies.len(),
        db.get_database_backend()
    );

    let serial = if pg {
        "BIGSERIAL PRIMARY KEY"
    } else {
        "INTEGER PRIMARY KEY AUTOINCREMENT"
    };
    db.execute_unprepared("CREATE TABLE IF NOT EXISTS accounts (id BIGINT PRIMARY KEY, owner TEXT NOT NULL, balance BIGINT NOT NULL)")
        .await?;
    db.execute_unprepared(&format!("CREATE TABLE IF NOT EXISTS transfers (id {serial}, src BIGINT NOT NULL, dst BIGINT NOT NULL, amount BIGINT NOT NULL, at TEXT NOT NULL)"))
        .await?;
    if account::Entity::find().all(&db).await?.is_empty() {
        for id in 1..=ACCOUNTS {
            account::ActiveModel {
                id: Set(id),
                owner: Set(format!("owner {id}")),
                balance: Set(OPENING),
            }
            .insert(&db)
            .await?;
        }
    }

    let mut clients = Vec::new();
    for c in 0..4u64 {
        let db = db.clone();
        let n = args.transfers;
        clients.push(tokio::spawn(async move {
            let mut done = 0u64;
            for i in 0..n {
                let src = ((c * 7 + i * 3) % ACCOUNTS as u64) as i64 + 1;
                let dst = ((c + i * 5 + 1) % ACCOUNTS as u64) as i64 + 1;
                if src != dst && transfer(&db, src, dst, (i % 90 + 1) as i64, pg).await? {
                    done += 1;
                }
            }
            Ok::<_, DbErr>(done)
        }));
    }
    let mut done = 0;
    for c in clients {
        done += c.await??;
    }
    println!("{done} transfers committed");

    let refused = db
        .execute_unprepared("UPDATE accounts SET balance = balance + abs(random() % 10)")
        .await;
    if let Err(e) = refused {
        println!("refused, nothing journaled: {e}");
    }

    if !db.wait_caught_up(Duration::from_secs(30)).await {
        anyhow::bail!("the copies did not catch up: {:?}", db.status());
    }
    let mut reference = None;
    for c in &copies {
        let conn = db
            .copy_connection(&c.name)
            .ok_or_else(|| anyhow::anyhow!("no copy {}", c.name))?;
        let total = conn
            .query_one_raw(Statement::from_string(
                conn.get_database_backend(),
                "SELECT CAST(SUM(balance) AS BIGINT) AS s FROM accounts",
            ))
            .await?
            .map(|r| r.try_get::<i64>("", "s"))
            .transpose()?
            .unwrap_or(0);
        let digests = regroup_sql::verify::digests(conn).await?;
        let same = match &reference {
            None => {
                reference = Some(digests);
                "reference".to_owned()
            }
            Some(r) => match regroup_sql::verify::first_difference(r, &digests) {
                None => "identical".to_owned(),
                Some((table, how)) => format!("DIFFERS in {table}: {how}"),
            },
        };
        println!(
            "{}: total {total} (expected {}), {same}",
            c.name,
            ACCOUNTS * OPENING
        );
    }
    for s in db.status() {
        println!(
            "{}{}: applied {}{}",
            s.name,
            if s.primary { " (primary)" } else { "" },
            s.applied,
            s.diverged
                .map(|d| format!(", diverged: {d}"))
                .unwrap_or_default()
        );
    }
    db.close().await;
    Ok(())
}

/// One transfer, as one sea-orm transaction.
async fn transfer(db: &SqlGroup, src: i64, dst: i64, amount: i64, pg: bool) -> Result<bool, DbErr> {
    let result = db
        .transaction::<_, bool, DbErr>(move |txn| {
            Box::pin(async move {
                let Some(from) = account::Entity::find_by_id(src).one(txn).await? else {
                    return Ok(false);
                };
                let Some(to) = account::Entity::find_by_id(dst).one(txn).await? else {
                    return Ok(false);
                };
                if from.balance < amount {
                    return Ok(false);
                }
                let mut a: account::ActiveModel = from.clone().into();
                a.balance = Set(from.balance - amount);
                a.update(txn).await?;
                let mut b: account::ActiveModel = to.clone().into();
                b.balance = Set(to.balance + amount);
                b.update(txn).await?;
                let sql = if pg {
                    "INSERT INTO transfers (src, dst, amount, at) VALUES ($1, $2, $3, CAST(now() AS TEXT))"
                } else {
                    "INSERT INTO transfers (src, dst, amount, at) VALUES (?, ?, ?, CURRENT_TIMESTAMP)"
                };
                txn.execute_raw(Statement::from_sql_and_values(
                    txn.get_database_backend(),
                    sql,
                    [src.into(), dst.into(), amount.into()],
                ))
                .await?;
                Ok(true)
            })
        })
        .await;
    result.map_err(|e| DbErr::Custom(e.to_string()))
}
