//! The replayer's [`Applier`] for one database copy: executes a journaled transaction's
//! statements and advances the copy's checkpoint row in one database transaction.

use regroup_replay::{Applier, ApplyError, Fingerprint, Payload, Record};
use sea_orm::{ConnectionTrait, DatabaseConnection, DbErr, Statement, TransactionTrait};

use crate::checkpoint;
use crate::value::from_journal;

/// Replays SQL mode records on one copy.
#[derive(Debug, Clone)]
pub struct CopyApplier {
    group: String,
    copy: String,
    db: DatabaseConnection,
}

impl CopyApplier {
    /// An applier for copy `copy` of `group`, reached through `db`.
    pub fn new(group: &str, copy: &str, db: DatabaseConnection) -> Self {
        CopyApplier {
            group: group.to_owned(),
            copy: copy.to_owned(),
            db,
        }
    }
}

/// A connection that failed is worth a retry; a statement that failed here but not on the
/// primary is a divergence.
fn transient(e: &DbErr) -> bool {
    matches!(e, DbErr::Conn(_) | DbErr::ConnectionAcquire(_))
        || e.to_string().contains("database is locked")
}

fn unreachable(e: DbErr) -> ApplyError {
    ApplyError::Unreachable(e.to_string())
}

/// A fingerprint that cannot match the primary's, saying why.
fn differs(why: String) -> Fingerprint {
    Fingerprint::of(500, why.as_bytes())
}

#[async_trait::async_trait]
impl Applier for CopyApplier {
    async fn apply(&self, record: &Record) -> Result<Fingerprint, ApplyError> {
        let Payload::Sql(t) = &record.payload else {
            return Err(ApplyError::Unreachable(format!(
                "record {} is not a SQL mode transaction; a database copy replays only those",
                record.seq
            )));
        };
        let backend = self.db.get_database_backend();
        let txn = self.db.begin().await.map_err(unreachable)?;
        let at = checkpoint::read(&txn, &self.group)
            .await
            .map_err(unreachable)?;
        let counts: Vec<Option<u64>> = t.statements.iter().map(|s| s.rows_affected).collect();
        if at.seq >= record.seq {
            // Applied already (exactly once): the copy's own row says so.
            txn.rollback().await.map_err(unreachable)?;
            return Ok(checkpoint::fingerprint(&counts));
        }
        let hash = checkpoint::chain(&at.hash, &t.statements);
        if hash != t.hash {
            tracing::warn!(group = %self.group, copy = %self.copy, seq = record.seq,
                "running hash differs from the primary's");
            return Ok(differs(format!(
                "running hash {hash} differs from the primary's {}",
                t.hash
            )));
        }
        for (i, s) in t.statements.iter().enumerate() {
            let values = s
                .values
                .iter()
                .map(from_journal)
                .collect::<Result<Vec<_>, _>>()
                .map_err(|e| ApplyError::Unreachable(format!("statement {i}: {e}")))?;
            let result = if values.is_empty() {
                txn.execute_unprepared(&s.sql).await
            } else {
                txn.execute_raw(Statement::from_sql_and_values(backend, &s.sql, values))
                    .await
            };
            let rows = match result {
                Ok(r) => r.rows_affected(),
                Err(e) if transient(&e) => return Err(unreachable(e)),
                Err(e) => {
                    tracing::warn!(group = %self.group, copy = %self.copy, seq = record.seq,
                        statement = i, error = %e, "a statement the primary executed fails here");
                    return Ok(differs(format!("statement {i} failed: {e}")));
                }
            };
            if let Some(expected) = s.rows_affected
                && expected != rows
            {
                tracing::warn!(group = %self.group, copy = %self.copy, seq = record.seq,
                    statement = i, expected, rows, "affected rows differ from the primary's");
                return Ok(differs(format!(
                    "statement {i} affected {rows} rows, the primary {expected}"
                )));
            }
        }
        let moved = checkpoint::advance(
            &txn,
            &self.group,
            record.seq,
            &hash,
            &record.txn_id.to_string(),
        )
        .await
        .map_err(unreachable)?;
        if !moved {
            txn.rollback().await.map_err(unreachable)?;
            return Ok(checkpoint::fingerprint(&counts));
        }
        txn.commit()
            .await
            .map_err(|e| ApplyError::NoAnswer(e.to_string()))?;
        Ok(checkpoint::fingerprint(&counts))
    }

    async fn position(&self) -> Result<Option<regroup_replay::Position>, ApplyError> {
        let at = checkpoint::read(&self.db, &self.group)
            .await
            .map_err(unreachable)?;
        Ok(Some(regroup_replay::Position::in_order(at.seq)))
    }
}
