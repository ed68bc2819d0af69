//! The SQLite journal's appends and seals, written on a thread of their own.
//!
//! sqlx runs a SQLite connection on a worker thread and reaches it through its pool with
//! a message per step: acquiring the connection, the statement, its result, the return to
//! the pool. A journal write is one statement with nothing to read back but the rows it
//! changed, yet it cost about seven context switches through sqlx (BENCHMARKS.md, "Thread
//! hand-offs on the update path"). A [`Writer`] owns a connection of its own on a thread
//! of its own: one message there, one answer back.
//!
//! Writes that queue up while one is written are written next, in one transaction, so
//! one flush (one `fsync` of the write-ahead log under `synchronous = FULL`) makes all of
//! them durable (group commit). A write alone is written alone. Each caller gets its own
//! statement's outcome, and only once the transaction that holds it committed. Only the
//! journal's appends and seals go this way: both may be written again after a failed
//! batch without harm (an append checks that it extends the journal by one, a seal that
//! the record is unsealed, and the caller tells a repeat from a conflict by reading the
//! record), which is what a failed batch does, one write at a time, so that each caller
//! hears its own outcome.
//!
//! A caller that goes away does not stop its write: the thread writes what it was given.
//! The thread ends, and closes its connection, once every handle to it is dropped.
//!
//! rusqlite 0.39 links the same `libsqlite3-sys` (0.37) as sqlx 0.9, and Cargo lets only
//! one crate that links `sqlite3` into a build: the writer's connection and sqlx's share one
//! SQLite library, and with it the per-process table through which SQLite keeps the POSIX
//! locks of several connections to one file apart. (Two copies of SQLite in one process
//! would release each other's locks.) Upgrade the two together.

use std::path::Path;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::mpsc;
use std::time::Duration;

use rusqlite::types::{ToSqlOutput, Value as Sqlite, ValueRef};
use sea_orm::Statement;
use sea_orm::sea_query::Value;

use super::JournalError;

/// How long a write waits for another connection's write lock (as the journal's sqlx
/// connections do).
const BUSY_TIMEOUT: Duration = Duration::from_secs(10);

/// A thread that owns one SQLite connection and writes the statements sent to it.
#[derive(Debug)]
pub(super) struct Writer {
    jobs: mpsc::Sender<Job>,
    /// Transactions written (a batch or a write alone), for tests.
    #[cfg_attr(not(test), expect(dead_code, reason = "read by tests"))]
    pub(super) batches: Arc<AtomicU64>,
}

/// One write and where its outcome goes (rows affected).
struct Job {
    stmt: Statement,
    done: tokio::sync::oneshot::Sender<Result<u64, JournalError>>,
}

/// `synchronous` of the writer's connection.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum Flush {
    /// `FULL`: every commit is synced before it returns.
    EveryCommit,
    /// `NORMAL`: commits reach the write-ahead log; it is synced later.
    Later,
}

impl Writer {
    /// Opens `file` (an existing journal, migrated) on a new connection and starts its
    /// thread.
    pub(super) fn open(file: &Path, flush: Flush) -> Result<Self, JournalError> {
        let conn = connect(file, flush).map_err(|e| JournalError::Unavailable {
            reason: format!(
                "cannot open the journal {} for writing: {e}",
                file.display()
            ),
            retryable: false,
        })?;
        let (jobs, queue) = mpsc::channel();
        let batches = Arc::new(AtomicU64::new(0));
        let counted = batches.clone();
        std::thread::Builder::new()
            .name("regroup-journal".to_owned())
            .spawn(move || run(conn, &queue, &counted))
            .map_err(|e| JournalError::Unavailable {
                reason: format!("cannot start the journal's writer thread: {e}"),
                retryable: false,
            })?;
        Ok(Writer { jobs, batches })
    }

    /// Writes `stmt` (built for SQLite), together with the writes queued beside it: the
    /// rows it affected.
    pub(super) async fn execute(&self, stmt: Statement) -> Result<u64, JournalError> {
        let (done, outcome) = tokio::sync::oneshot::channel();
        self.jobs
            .send(Job { stmt, done })
            .map_err(|_| JournalError::unavailable("the journal's writer thread has stopped"))?;
        outcome.await.unwrap_or_else(|_| {
            Err(JournalError::unavailable(
                "the journal's write ended without an outcome",
            ))
        })
    }
}

fn connect(file: &Path, flush: Flush) -> rusqlite::Result<rusqlite::Connection> {
    let conn = rusqlite::Connection::open(file)?;
    conn.busy_timeout(BUSY_TIMEOUT)?;
    // Already so (the migrations' connection set it, and it stays with the file); set
    // again so that this connection never writes a rollback journal.
    let _mode: String = conn.query_row("PRAGMA journal_mode = WAL", [], |row| row.get(0))?;
    let synchronous = match flush {
        Flush::EveryCommit => "FULL",
        Flush::Later => "NORMAL",
    };
    conn.pragma_update(None, "synchronous", synchronous)?;
    Ok(conn)
}

fn run(mut conn: rusqlite::Connection, queue: &mpsc::Receiver<Job>, batches: &AtomicU64) {
    while let Ok(first) = queue.recv() {
        let mut jobs = vec![first];
        jobs.extend(queue.try_iter());
        batches.fetch_add(1, Ordering::Relaxed);
        if jobs.len() == 1 {
            for job in jobs {
                let _ = job.done.send(alone(&conn, &job.stmt));
            }
            continue;
        }
        tracing::debug!(writes = jobs.len(), "journal writes committed together");
        match together(&mut conn, &jobs) {
            Ok(rows) => {
                for (job, rows) in jobs.into_iter().zip(rows) {
                    let _ = job.done.send(Ok(rows));
                }
            }
            Err(e) => {
                tracing::debug!(writes = jobs.len(), error = %e,
                    "a batch of journal writes failed; writing them one at a time");
                for job in jobs {
                    let _ = job.done.send(alone(&conn, &job.stmt));
                }
            }
        }
    }
}

fn alone(conn: &rusqlite::Connection, stmt: &Statement) -> Result<u64, JournalError> {
    written(conn, stmt).map_err(|e| JournalError::Unavailable {
        reason: e.to_string(),
        retryable: true,
    })
}

/// Every job's statement in one transaction: the rows each affected, once committed.
fn together(conn: &mut rusqlite::Connection, jobs: &[Job]) -> rusqlite::Result<Vec<u64>> {
    let txn = conn.transaction_with_behavior(rusqlite::TransactionBehavior::Immediate)?;
    let mut rows = Vec::with_capacity(jobs.len());
    for job in jobs {
        rows.push(written(&txn, &job.stmt)?);
    }
    txn.commit()?;
    Ok(rows)
}

fn written(conn: &rusqlite::Connection, stmt: &Statement) -> rusqlite::Result<u64> {
    let mut prepared = conn.prepare_cached(&stmt.sql)?;
    let values = stmt.values.as_ref().map_or(&[][..], |v| v.0.as_slice());
    let changed = prepared.execute(rusqlite::params_from_iter(values.iter().map(Bound)))?;
    Ok(u64::try_from(changed).unwrap_or(u64::MAX))
}

/// A sea-query value bound to a SQLite parameter, borrowed where it can be. The journal
/// binds integers, text, blobs and NULLs; any other kind is refused by name.
struct Bound<'a>(&'a Value);

impl rusqlite::ToSql for Bound<'_> {
    fn to_sql(&self) -> rusqlite::Result<ToSqlOutput<'_>> {
        fn int(v: Option<i64>) -> ToSqlOutput<'static> {
            ToSqlOutput::Borrowed(v.map_or(ValueRef::Null, ValueRef::Integer))
        }
        Ok(match self.0 {
            Value::Bool(v) => int(v.map(i64::from)),
            Value::TinyInt(v) => int(v.map(i64::from)),
            Value::SmallInt(v) => int(v.map(i64::from)),
            Value::Int(v) => int(v.map(i64::from)),
            Value::BigInt(v) => int(*v),
            Value::TinyUnsigned(v) => int(v.map(i64::from)),
            Value::SmallUnsigned(v) => int(v.map(i64::from)),
            Value::Unsigned(v) => int(v.map(i64::from)),
            Value::BigUnsigned(Some(v)) => match i64::try_from(*v) {
                Ok(v) => int(Some(v)),
                Err(e) => return Err(rusqlite::Error::ToSqlConversionFailure(Box::new(e))),
            },
            Value::BigUnsigned(None) => int(None),
            Value::Float(v) => {
                ToSqlOutput::Borrowed(v.map_or(ValueRef::Null, |f| ValueRef::Real(f64::from(f))))
            }
            Value::Double(v) => ToSqlOutput::Borrowed(v.map_or(ValueRef::Null, ValueRef::Real)),
            Value::String(v) => ToSqlOutput::Borrowed(
                v.as_deref()
                    .map_or(ValueRef::Null, |s| ValueRef::Text(s.as_bytes())),
            ),
            Value::Char(v) => {
                ToSqlOutput::Owned(v.map_or(Sqlite::Null, |c| Sqlite::Text(c.into())))
            }
            Value::Bytes(v) => {
                ToSqlOutput::Borrowed(v.as_deref().map_or(ValueRef::Null, ValueRef::Blob))
            }
            other => {
                return Err(rusqlite::Error::ToSqlConversionFailure(
                    format!("the journal's writer cannot bind {other:?}").into(),
                ));
            }
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use sea_orm::DbBackend;

    fn statement(sql: &str, values: Vec<Value>) -> Statement {
        Statement::from_sql_and_values(DbBackend::Sqlite, sql, values)
    }

    /// Every kind of value the journal binds arrives as SQLite stores it; a kind it does
    /// not bind is refused by name and writes nothing.
    #[tokio::test]
    async fn binds_what_the_journal_writes_and_refuses_the_rest() -> Result<(), JournalError> {
        let dir = tempfile::tempdir().map_err(|e| JournalError::unavailable(e.to_string()))?;
        let file = dir.path().join("w.db");
        let setup = rusqlite::Connection::open(&file)
            .and_then(|c| c.execute_batch("CREATE TABLE t (i INTEGER, s TEXT, b BLOB, n INTEGER)"))
            .map_err(|e| JournalError::unavailable(e.to_string()));
        setup?;
        let w = Writer::open(&file, Flush::EveryCommit)?;
        let insert = "INSERT INTO t (i, s, b, n) VALUES (?, ?, ?, ?)";
        let rows = w
            .execute(statement(
                insert,
                vec![
                    Value::BigInt(Some(-7)),
                    Value::String(Some("päth".to_owned())),
                    Value::Bytes(Some(vec![0, 1, 255])),
                    Value::Int(None),
                ],
            ))
            .await?;
        assert_eq!(rows, 1);
        let refused = w
            .execute(statement(
                insert,
                vec![
                    Value::BigUnsigned(Some(u64::MAX)),
                    Value::String(None),
                    Value::Bytes(None),
                    Value::Int(None),
                ],
            ))
            .await;
        match refused {
            Err(JournalError::Unavailable { reason, .. }) => {
                assert!(reason.contains("out of range"), "{reason}");
            }
            other => panic!("a u64 beyond i64 was bound: {other:?}"),
        }
        let read = rusqlite::Connection::open(&file)
            .and_then(|c| {
                c.query_row(
                    "SELECT i, s, b, n, (SELECT COUNT(*) FROM t) FROM t",
                    [],
                    |r| {
                        Ok((
                            r.get::<_, i64>(0)?,
                            r.get::<_, String>(1)?,
                            r.get::<_, Vec<u8>>(2)?,
                            r.get::<_, Option<i64>>(3)?,
                            r.get::<_, i64>(4)?,
                        ))
                    },
                )
            })
            .map_err(|e| JournalError::unavailable(e.to_string()))?;
        assert_eq!(read, (-7, "päth".to_owned(), vec![0, 1, 255], None, 1));
        Ok(())
    }
}
