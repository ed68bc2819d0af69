//! A copy's own checkpoint row, `regroup_sql_checkpoint`: per group, the last journal seq
//! the copy executed and the running hash up to it. Written in the same database
//! transaction as the statements (on the primary and on every replay), so a copy is the
//! truth about what it applied: exactly once, and the outcome of a commit that went
//! unanswered is read back from it.

use regroup_replay::{Fingerprint, SqlStatement};
use sea_orm::sea_query::{Alias, ColumnDef, Expr, ExprTrait, OnConflict, Query, Table};
use sea_orm::{ConnectionTrait, DbErr};
use sha2::{Digest, Sha256};

/// The table's name.
pub const TABLE: &str = "regroup_sql_checkpoint";

/// Where a copy stands by its own row.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct Position {
    /// The last journal seq it executed (0: none).
    pub seq: u64,
    /// The running hash up to it (empty: none).
    pub hash: String,
}

fn t() -> Alias {
    Alias::new(TABLE)
}

/// Creates the table and the group's row when missing.
pub(crate) async fn ensure<C: ConnectionTrait>(db: &C, group: &str) -> Result<(), DbErr> {
    let create = Table::create()
        .table(t())
        .if_not_exists()
        .col(
            ColumnDef::new(Alias::new("group_name"))
                .string_len(191)
                .not_null()
                .primary_key(),
        )
        .col(ColumnDef::new(Alias::new("seq")).big_integer().not_null())
        .col(ColumnDef::new(Alias::new("hash")).string_len(64).not_null())
        .col(
            ColumnDef::new(Alias::new("txn_id"))
                .string_len(36)
                .not_null(),
        )
        .to_owned();
    db.execute(&create).await?;
    let insert = Query::insert()
        .into_table(t())
        .columns([
            Alias::new("group_name"),
            Alias::new("seq"),
            Alias::new("hash"),
            Alias::new("txn_id"),
        ])
        .values_panic([group.into(), 0i64.into(), "".into(), "".into()])
        .on_conflict(
            OnConflict::column(Alias::new("group_name"))
                .do_nothing()
                .to_owned(),
        )
        .to_owned();
    db.execute(&insert).await?;
    Ok(())
}

/// The copy's position.
pub(crate) async fn read<C: ConnectionTrait>(db: &C, group: &str) -> Result<Position, DbErr> {
    let q = Query::select()
        .columns([Alias::new("seq"), Alias::new("hash")])
        .from(t())
        .and_where(Expr::col(Alias::new("group_name")).eq(group))
        .to_owned();
    Ok(match db.query_one(&q).await? {
        Some(row) => Position {
            seq: u64::try_from(row.try_get::<i64>("", "seq")?).unwrap_or(0),
            hash: row.try_get("", "hash")?,
        },
        None => Position::default(),
    })
}

/// Moves the row to `seq` with `hash`, only if it stands below `seq`; false when it does
/// not (the transaction was applied already).
pub(crate) async fn advance<C: ConnectionTrait>(
    db: &C,
    group: &str,
    seq: u64,
    hash: &str,
    txn_id: &str,
) -> Result<bool, DbErr> {
    let seq = i64::try_from(seq).unwrap_or(i64::MAX);
    let update = Query::update()
        .table(t())
        .value(Alias::new("seq"), seq)
        .value(Alias::new("hash"), hash)
        .value(Alias::new("txn_id"), txn_id)
        .and_where(Expr::col(Alias::new("group_name")).eq(group))
        .and_where(Expr::col(Alias::new("seq")).lt(seq))
        .to_owned();
    Ok(db.execute(&update).await?.rows_affected() == 1)
}

/// The running hash after `statements`, chained on `previous`.
pub fn chain(previous: &str, statements: &[SqlStatement]) -> String {
    let mut h = Sha256::new();
    h.update(previous.as_bytes());
    h.update(b"\n");
    h.update(serde_json::to_vec(statements).unwrap_or_default());
    hex::encode(h.finalize())
}

/// The fingerprint of a transaction's execution: its statements' affected-row counts.
pub fn fingerprint(counts: &[Option<u64>]) -> Fingerprint {
    Fingerprint::of(200, &serde_json::to_vec(counts).unwrap_or_default())
}
