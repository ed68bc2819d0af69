//! Exactly-once application with sea-orm: the handler's database work and the record of
//! the transaction (`seq`, txn id, epoch, answer) commit together in the partition's
//! `regroup_applied` table, so a transaction delivered twice is applied once and answered
//! the same both times.

use std::future::Future;
use std::pin::Pin;

use bytes::Bytes;
use regroup_migrations::Applied;
use sea_orm::sea_query::{Expr, ExprTrait, Order, Query};
use sea_orm::{
    ConnectionTrait, DatabaseConnection, DatabaseTransaction, DbErr, SqlErr, TransactionTrait,
};

use crate::context::ReplayContext;

/// An answer as recorded: status and body.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Answer {
    /// HTTP status code.
    pub status: u16,
    /// Body bytes.
    pub body: Bytes,
}

impl Answer {
    /// An answer with a JSON body.
    pub fn json(status: u16, value: &impl serde::Serialize) -> Self {
        Answer {
            status,
            body: Bytes::from(serde_json::to_vec(value).unwrap_or_default()),
        }
    }
}

/// Why a transaction was not run.
#[derive(Debug, thiserror::Error)]
pub enum RunError {
    /// The transaction's epoch is older than one this partition already applied: it comes
    /// from a deposed primary.
    #[error("fenced: epoch {epoch} is older than epoch {highest} already applied here")]
    Fenced {
        /// The transaction's epoch.
        epoch: u64,
        /// The highest epoch applied here.
        highest: u64,
    },
    /// This seq was applied here as another transaction: the partition's history and the
    /// journal disagree (e.g. a journal reset, or a partition from another group).
    #[error("seq {seq} was applied here as transaction {recorded}, not {offered}")]
    SeqConflict {
        /// The seq.
        seq: u64,
        /// The transaction recorded here.
        recorded: String,
        /// The transaction delivered now.
        offered: String,
    },
    /// The database failed.
    #[error("database error: {0}")]
    Db(#[from] DbErr),
}

/// What a partition recorded for one seq.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AppliedRecord {
    /// The seq.
    pub seq: u64,
    /// The transaction's id, as delivered.
    pub txn_id: String,
    /// The epoch it was delivered in.
    pub epoch: u64,
    /// The answer given.
    pub answer: Answer,
}

/// The work of one transaction: `Ok` commits it, `Err` rolls it back; either way the
/// answer is recorded.
pub type Work<'t> = Pin<Box<dyn Future<Output = Result<Answer, Answer>> + Send + 't>>;

/// Runs handlers' database work exactly once per transaction.
#[derive(Debug, Clone)]
pub struct ExactlyOnce {
    db: DatabaseConnection,
    /// Whether `regroup_applied` has the `floor` column (looked up once).
    floor_column: std::sync::Arc<tokio::sync::OnceCell<bool>>,
}

/// How many of the newest records [`ExactlyOnce::resume`] looks at: more than a sender
/// keeps on its way at once, so the newest floor is among them.
const RESUME_SCAN: u64 = 256;

fn to_i64(v: u64) -> i64 {
    i64::try_from(v).unwrap_or(i64::MAX)
}

impl ExactlyOnce {
    /// Uses `db`, whose schema must include [`regroup_migrations::AppliedMigration`].
    /// With [`regroup_migrations::AppliedFloorMigration`] too, it offers parallel replay
    /// ([`ExactlyOnce::resume`]).
    pub fn new(db: DatabaseConnection) -> Self {
        ExactlyOnce {
            db,
            floor_column: std::sync::Arc::default(),
        }
    }

    /// Whether the table has the `floor` column parallel replay needs.
    async fn has_floor(&self) -> Result<bool, DbErr> {
        self.floor_column
            .get_or_try_init(|| async {
                sea_orm_migration::SchemaManager::new(&self.db)
                    .has_column("regroup_applied", "floor")
                    .await
            })
            .await
            .copied()
    }

    /// Runs `work` in one database transaction that also records the transaction's seq and
    /// answer. A seq already recorded is answered from the record and not executed again;
    /// when `work` fails (`Err`), its changes roll back but its answer is still recorded.
    /// Without a context (a request that did not come through regroup) `work` simply runs
    /// in a transaction.
    pub async fn run<F>(&self, ctx: Option<&ReplayContext>, work: F) -> Result<Answer, RunError>
    where
        F: for<'t> FnOnce(&'t DatabaseTransaction) -> Work<'t>,
    {
        // Looked up (once) before the transaction takes a connection of the pool.
        let floor = match ctx.and_then(ReplayContext::floor) {
            Some(floor) if self.has_floor().await? => Some(floor),
            _ => None,
        };
        let txn = self.db.begin().await?;
        let Some(ctx) = ctx else {
            return match work(&txn).await {
                Ok(a) => {
                    txn.commit().await?;
                    Ok(a)
                }
                Err(a) => {
                    txn.rollback().await?;
                    Ok(a)
                }
            };
        };
        // One index probe in the common case: the newest record tells both whether this seq
        // is the latest one applied (a re-delivery) and the highest epoch seen.
        let newest = newest_record(&txn, None).await?;
        // Below the newest (a re-delivery, or a record taken out of seq order): one probe
        // finds the record at its seq, or else the one right below it (whose epoch fences).
        let (applied, below) = match &newest {
            Some(n) if n.seq == ctx.seq() => (newest.clone(), None),
            Some(n) if n.seq > ctx.seq() => match newest_record(&txn, Some(ctx.seq())).await? {
                Some(r) if r.seq == ctx.seq() => (Some(r), None),
                other => (None, Some(other.map_or(0, |r| r.epoch))),
            },
            _ => (None, None),
        };
        if let Some(done) = applied {
            txn.rollback().await?;
            if done.txn_id != ctx.txn_id().to_string() {
                // The same position with another transaction: this partition and the
                // journal disagree about history. Never answer it from the wrong record.
                return Err(RunError::SeqConflict {
                    seq: ctx.seq(),
                    recorded: done.txn_id,
                    offered: ctx.txn_id().to_string(),
                });
            }
            tracing::debug!(
                seq = ctx.seq(),
                "transaction already applied: answering from the record"
            );
            return Ok(done.answer);
        }
        let highest = match (below, ctx.floor()) {
            // Delivered out of seq order (parallel replay): only the records below it count,
            // as epochs never decrease along seqs.
            (Some(epoch), Some(_)) => epoch,
            _ => newest.map_or(0, |n| n.epoch),
        };
        if ctx.epoch() < highest {
            txn.rollback().await?;
            return Err(RunError::Fenced {
                epoch: ctx.epoch(),
                highest,
            });
        }
        let recorded = match work(&txn).await {
            Ok(answer) => match record(&txn, ctx, floor, &answer).await {
                Ok(()) => txn.commit().await.map(|()| answer),
                Err(e) => Err(e),
            },
            Err(answer) => {
                txn.rollback().await?;
                let txn = self.db.begin().await?;
                match record(&txn, ctx, floor, &answer).await {
                    Ok(()) => txn.commit().await.map(|()| answer),
                    Err(e) => Err(e),
                }
            }
        };
        match recorded {
            Ok(answer) => Ok(answer),
            // The same seq delivered twice at once (a retry while the first delivery still
            // ran, on a database that lets them overlap): the other one's record won, and
            // everything this one did rolls back with its transaction. Answered from the
            // record, as any re-delivery.
            Err(e) if matches!(e.sql_err(), Some(SqlErr::UniqueConstraintViolation(_))) => {
                match lookup(&self.db, ctx.seq()).await? {
                    Some(done) if done.txn_id == ctx.txn_id().to_string() => {
                        tracing::debug!(
                            seq = ctx.seq(),
                            "transaction applied meanwhile by another delivery: answering from the record"
                        );
                        Ok(done.answer)
                    }
                    Some(done) => Err(RunError::SeqConflict {
                        seq: ctx.seq(),
                        recorded: done.txn_id,
                        offered: ctx.txn_id().to_string(),
                    }),
                    None => Err(RunError::Db(e)),
                }
            }
            Err(e) => Err(RunError::Db(e)),
        }
    }

    /// The highest seq and the highest epoch applied here (0, 0 for none).
    pub async fn applied(&self) -> Result<(u64, u64), DbErr> {
        Ok(newest_record(&self.db, None)
            .await?
            .map_or((0, 0), |n| (n.seq, n.epoch)))
    }

    /// Where a sender resumes safely: a seq at or below which every record this partition
    /// needs is recorded here. `None` without the `floor` column (then the partition is
    /// replayed in seq order only, and [`ExactlyOnce::applied`] is that seq). Records
    /// delivered out of seq order hold their sender's floor; one delivered in order stands
    /// for itself.
    pub async fn resume(&self) -> Result<Option<u64>, DbErr> {
        if !self.has_floor().await? {
            return Ok(None);
        }
        let q = Query::select()
            .columns([Applied::Seq, Applied::Floor])
            .from(Applied::Table)
            .order_by(Applied::Seq, Order::Desc)
            .limit(RESUME_SCAN)
            .to_owned();
        let mut resume = 0u64;
        for row in self.db.query_all(&q).await? {
            let seq: i64 = row.try_get("", "seq")?;
            let floor: Option<i64> = row.try_get("", "floor")?;
            resume = Ord::max(resume, u64::try_from(floor.unwrap_or(seq)).unwrap_or(0));
        }
        Ok(Some(resume))
    }

    /// What was recorded for `seq`, if it was applied here.
    pub async fn lookup(&self, seq: u64) -> Result<Option<AppliedRecord>, DbErr> {
        lookup(&self.db, seq).await
    }
}

async fn lookup(db: &impl ConnectionTrait, seq: u64) -> Result<Option<AppliedRecord>, DbErr> {
    let q = Query::select()
        .columns([
            Applied::TxnId,
            Applied::Epoch,
            Applied::Status,
            Applied::Body,
        ])
        .from(Applied::Table)
        .and_where(Expr::col(Applied::Seq).eq(to_i64(seq)))
        .to_owned();
    let Some(row) = db.query_one(&q).await? else {
        return Ok(None);
    };
    applied_record(seq, &row).map(Some)
}

fn applied_record(seq: u64, row: &sea_orm::QueryResult) -> Result<AppliedRecord, DbErr> {
    let epoch: i64 = row.try_get("", "epoch")?;
    let status: i32 = row.try_get("", "status")?;
    let body: Vec<u8> = row.try_get("", "body")?;
    let txn_id: String = row.try_get("", "txn_id")?;
    Ok(AppliedRecord {
        seq,
        txn_id,
        epoch: u64::try_from(epoch).unwrap_or(0),
        answer: Answer {
            status: u16::try_from(status).unwrap_or(500),
            body: Bytes::from(body),
        },
    })
}

/// The record with the highest seq (epochs never decrease along seqs, so it also holds the
/// highest epoch), at or below `at` when given.
async fn newest_record(
    db: &impl ConnectionTrait,
    at: Option<u64>,
) -> Result<Option<AppliedRecord>, DbErr> {
    let mut q = Query::select()
        .columns([
            Applied::Seq,
            Applied::TxnId,
            Applied::Epoch,
            Applied::Status,
            Applied::Body,
        ])
        .from(Applied::Table)
        .order_by(Applied::Seq, Order::Desc)
        .limit(1)
        .to_owned();
    if let Some(at) = at {
        q.and_where(Expr::col(Applied::Seq).lte(to_i64(at)));
    }
    let Some(row) = db.query_one(&q).await? else {
        return Ok(None);
    };
    let seq: i64 = row.try_get("", "seq")?;
    applied_record(u64::try_from(seq).unwrap_or(0), &row).map(Some)
}

async fn record(
    txn: &DatabaseTransaction,
    ctx: &ReplayContext,
    floor: Option<u64>,
    answer: &Answer,
) -> Result<(), DbErr> {
    let mut columns = vec![
        Applied::Seq,
        Applied::TxnId,
        Applied::Epoch,
        Applied::Status,
        Applied::Body,
    ];
    let mut values: Vec<sea_orm::sea_query::SimpleExpr> = vec![
        to_i64(ctx.seq()).into(),
        ctx.txn_id().to_string().into(),
        to_i64(ctx.epoch()).into(),
        i32::from(answer.status).into(),
        answer.body.to_vec().into(),
    ];
    if let Some(floor) = floor {
        columns.push(Applied::Floor);
        values.push(to_i64(floor).into());
    }
    let insert = Query::insert()
        .into_table(Applied::Table)
        .columns(columns)
        .values_panic(values)
        .to_owned();
    txn.execute(&insert).await?;
    Ok(())
}
