//! The journal on sea-orm: SQLite (WAL, synchronous FULL) by default, PostgreSQL by URL.
//!
//! On SQLite, appends and seals are written by a thread that owns a connection of its own
//! ([`Writer`]: one thread round trip per write, where sqlx takes several), and those that
//! queue up while one is being written commit together in one transaction (group commit):
//! with several updates in flight, one flush makes the seal of one and the records of
//! those behind it durable. PostgreSQL does the same with concurrent commits by itself.
//!
//! # The ownership lease and fencing
//!
//! `regroup_owner` holds one row: the owning claim's id (NULL when nobody holds the lease),
//! its description, the fencing token (up by one with every claim) and the expiry. Expiry
//! is kept in milliseconds since the Unix epoch **by the database's clock**
//! (`julianday('now')` on SQLite, `clock_timestamp()` on PostgreSQL), so proxies on hosts
//! whose clocks disagree still agree on when a lease ran out. A claim is one conditional
//! `UPDATE … WHERE owner_id IS NULL OR expires_at <= now OR owner_id = me RETURNING token`:
//! on PostgreSQL a concurrent claimer waits for the row lock and then re-checks the
//! condition against the winner's row, so two claimers cannot both win; on SQLite writers
//! are serialized anyway.
//!
//! Every write carries the condition in the same statement: `EXISTS (SELECT 1 FROM
//! regroup_owner WHERE id = 1 AND (owner_id IS NULL OR token = mine))` (`mine` is 0 for a
//! handle that never claimed, which may therefore write only while nobody holds the lease).
//! On PostgreSQL the sub-select takes the row `FOR SHARE`: a write and a claim exclude
//! each other, so a write that starts before a takeover commits before it and one that
//! starts after sees the new token. A write that changes nothing is then examined (one
//! more read, off the hot path) to tell [`JournalError::Fenced`] from a gap or a conflict.
//! Expiry alone does not fence: a lease that ran out still lets its holder write (and
//! renew) until another proxy actually claims the journal.

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use async_trait::async_trait;
use bytes::Bytes;
use regroup_migrations::{Checkpoint, Group, JournalMigrator, Owner as O, Record as R};
use sea_orm::sea_query::{Expr, ExprTrait, Func, LockType, OnConflict, Order, Query, SimpleExpr};
use sea_orm::sqlx::sqlite::{SqliteJournalMode, SqliteSynchronous};
use sea_orm::{
    ConnectOptions, ConnectionTrait, Database, DatabaseConnection, DbBackend, QueryResult,
};
use sea_orm_migration::MigratorTrait;
use uuid::Uuid;

use super::sqlite_writer::{Flush, Writer};
use super::{
    Checkpoints, JournalError, Lease, Log, LogState, MemberSpec, Membership, Outcome, Owner,
    OwnerInfo, RoleStore, StoredMembers, StoredRole, membership,
};
use crate::record::{Fingerprint, Payload, Record, RecordState, RecordedRequest, parse_timestamp};

/// When the journal waits for the disk.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum JournalSync {
    /// Every write is flushed before it returns: the record before it is forwarded, its
    /// seal before the client is answered (the default).
    #[default]
    Full,
    /// Records are flushed before they are forwarded (write-ahead); seals are written at
    /// once but flushed with the next record (checkpoints stay durable at once). A process crash loses
    /// nothing; after a power loss a record whose seal was not yet flushed comes back in
    /// doubt and is settled like any other (exactly, when the partition runs the app-side
    /// layer). Saves one disk flush per update.
    Append,
    /// Records and seals are written at once (a process crash loses nothing) and the
    /// record's flush runs while the primary executes it: the client is answered only once
    /// the record is durable, so no acknowledged update is lost, and the primary never
    /// waits for the disk. Only a primary that keeps the app-side layer's record is sent a
    /// record before it is durable (others wait for the flush, as with `append`). After a
    /// power loss, a primary may have executed a record the journal lost (its client was
    /// never answered): it stands ahead of the journal and is quarantined when the proxy
    /// starts (rebuild it). Seals as with `append`.
    Overlap,
}

/// A journal in a SQL database reached through sea-orm.
#[derive(Debug, Clone)]
pub struct SqlJournal {
    /// Flushed writes: records, epochs.
    db: DatabaseConnection,
    /// Seals, and records under `overlap` (the same connection under [`JournalSync::Full`],
    /// and where a writer of its own takes them: a SQLite file).
    relaxed: DatabaseConnection,
    sync: JournalSync,
    /// SQLite in a file: the writers of the appends and seals of `db` and of `relaxed`
    /// (the same under [`JournalSync::Full`]), each on a connection of its own with the
    /// same `synchronous`; writes that queue up commit together ([`Writer`]). `None` on
    /// PostgreSQL, which commits concurrent transactions together by itself, and for an
    /// in-memory SQLite database (which only its own connection sees).
    flushed_writes: Option<Arc<Writer>>,
    relaxed_writes: Option<Arc<Writer>>,
    /// SQLite under [`JournalSync::Overlap`]: the database's write-ahead log, synced by
    /// [`Log::flush`] (everything committed on either connection is in it).
    wal: Option<std::path::PathBuf>,
    /// The fencing token of this handle's claim (0: never claimed). Clones share it.
    token: Arc<AtomicU64>,
    /// The SQL of the two writes of every update, rendered once ([`HotSql`]).
    hot: Arc<HotSql>,
}

/// The SQL text of the journal's two writes on every update, an append and a seal,
/// rendered by sea-query once per journal: each write binds its values to it instead of
/// building and rendering the statement again (building them took a third of the proxy's
/// own instructions per update, BENCHMARKS.md). Debug builds check every write against the
/// statement built the long way ([`bind`]).
#[derive(Debug)]
struct HotSql {
    append: String,
    seal: String,
}

impl SqlJournal {
    /// Connects to `url` (`sqlite://path` creates the file; `postgres://…` uses an existing
    /// database) and applies the journal migrations.
    pub async fn connect(url: &str) -> Result<Self, JournalError> {
        Self::connect_with(url, JournalSync::Full).await
    }

    /// [`SqlJournal::connect`] with a choice of when writes wait for the disk.
    pub async fn connect_with(url: &str, sync: JournalSync) -> Result<Self, JournalError> {
        // A pool hides why it cannot connect behind a time-out; one direct connection
        // first gives the real reason (connection refused, no such database, ...).
        Self::probe(url).await?;
        let sqlite = url.starts_with("sqlite");
        let mut opts = ConnectOptions::new(url.to_owned());
        opts.sqlx_logging(false)
            .connect_timeout(Duration::from_secs(5))
            .acquire_timeout(Duration::from_secs(10))
            // SQLite: one connection, so writers queue in the pool instead of sleeping in
            // SQLite's busy handler.
            .max_connections(if sqlite { 1 } else { 8 })
            // SQLite: no ping before each use. An open database file has no far end that
            // could hang up, and the ping is a round trip to the connection's worker
            // thread (two thread wake-ups) in front of every journal write.
            .test_before_acquire(!sqlite)
            .map_sqlx_sqlite_opts(|o| {
                o.create_if_missing(true)
                    .journal_mode(SqliteJournalMode::Wal)
                    .synchronous(SqliteSynchronous::Full)
                    .busy_timeout(Duration::from_secs(10))
            });
        let db = Database::connect(opts.clone()).await?;
        JournalMigrator::up(&db, None).await?;
        let (flushed_writes, relaxed_writes) = match sqlite_file(url) {
            Some(file) if sqlite => {
                let flushed = Arc::new(Writer::open(&file, Flush::EveryCommit)?);
                let relaxed_writes = match sync {
                    JournalSync::Full => flushed.clone(),
                    JournalSync::Append | JournalSync::Overlap => {
                        Arc::new(Writer::open(&file, Flush::Later)?)
                    }
                };
                (Some(flushed), Some(relaxed_writes))
            }
            _ => (None, None),
        };
        let relaxed = match sync {
            JournalSync::Full => db.clone(),
            // The relaxed writes go to their writer, which has a connection of its own.
            _ if relaxed_writes.is_some() => db.clone(),
            JournalSync::Append | JournalSync::Overlap => {
                opts.map_sqlx_sqlite_opts(|o| {
                    o.journal_mode(SqliteJournalMode::Wal)
                        .synchronous(SqliteSynchronous::Normal)
                        .busy_timeout(Duration::from_secs(10))
                })
                .map_sqlx_postgres_opts(|o| o.options([("synchronous_commit", "off")]));
                Database::connect(opts).await?
            }
        };
        let wal = match sync {
            JournalSync::Overlap => sqlite_file(url).map(|f| {
                let mut wal = f.into_os_string();
                wal.push("-wal");
                std::path::PathBuf::from(wal)
            }),
            _ => None,
        };
        let backend = db.get_database_backend();
        let hot = Arc::new(HotSql {
            append: render::<AppendValues>(backend)?,
            seal: render::<SealValues>(backend)?,
        });
        Ok(SqlJournal {
            db,
            relaxed,
            sync,
            flushed_writes,
            relaxed_writes,
            wal,
            token: Arc::new(AtomicU64::new(0)),
            hot,
        })
    }

    /// Checks that `url` can hold a journal without changing anything: a SQLite file's
    /// directory must exist (and the file, if present, must open); a PostgreSQL server
    /// must accept the connection.
    pub async fn probe(url: &str) -> Result<(), JournalError> {
        if url.starts_with("sqlite:") {
            let Some(path) = sqlite_file(url) else {
                return Ok(());
            };
            let path = path.as_path();
            let dir = match path.parent() {
                Some(d) if !d.as_os_str().is_empty() => d,
                _ => std::path::Path::new("."),
            };
            if !dir.is_dir() {
                return Err(JournalError::Unavailable {
                    reason: format!("directory {} does not exist", dir.display()),
                    retryable: false,
                });
            }
            if !path.exists() {
                return Ok(());
            }
        }
        if url.starts_with("postgres") {
            use sea_orm::sqlx::Connection as _;
            let conn = tokio::time::timeout(
                Duration::from_secs(5),
                sea_orm::sqlx::PgConnection::connect(url),
            )
            .await
            .map_err(|_| JournalError::unavailable("no answer within 5 s"))?
            .map_err(|e| JournalError::unavailable(e.to_string()))?;
            let _ = conn.close().await;
            return Ok(());
        }
        let mut opts = ConnectOptions::new(url.to_owned());
        opts.sqlx_logging(false)
            .connect_timeout(Duration::from_secs(5))
            .acquire_timeout(Duration::from_secs(5))
            .max_connections(1);
        let db = Database::connect(opts).await?;
        db.ping().await?;
        db.close().await?;
        Ok(())
    }

    /// The underlying connection.
    pub fn connection(&self) -> &DatabaseConnection {
        &self.db
    }
}

const RECORD_COLUMNS: [R; 13] = [
    R::GroupName,
    R::Seq,
    R::TxnId,
    R::Epoch,
    R::Timestamp,
    R::Method,
    R::Uri,
    R::Headers,
    R::Body,
    R::State,
    R::Status,
    R::BodyHash,
    R::Executors,
];

/// The file of a `sqlite:` URL (`None` for an in-memory database or another scheme).
fn sqlite_file(url: &str) -> Option<std::path::PathBuf> {
    let rest = url.strip_prefix("sqlite:")?;
    let path = rest.trim_start_matches("//");
    let path = path.split('?').next().unwrap_or(path);
    if path.is_empty() || path == ":memory:" {
        return None;
    }
    Some(std::path::PathBuf::from(path))
}

/// Syncs `file` to disk (`fsync` on a descriptor of its own): everything written to it by
/// any process is durable after. A missing file has nothing unsynced.
async fn sync_file(file: &std::path::Path) -> Result<(), JournalError> {
    let file = file.to_owned();
    let synced = tokio::task::spawn_blocking(move || match std::fs::File::open(&file) {
        Ok(f) => f.sync_data(),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(()),
        Err(e) => Err(e),
    })
    .await
    .map_err(|e| JournalError::unavailable(format!("flush task: {e}")))?;
    synced.map_err(|e| JournalError::unavailable(format!("cannot sync the journal: {e}")))
}

/// One of the two writes of every update ([`HotSql`]): its values, and the statement
/// sea-query builds of them.
trait HotWrite: Default {
    /// The statement built the long way, with its values.
    fn build(&self, backend: DbBackend) -> Result<sea_orm::Statement, JournalError>;
    /// The values in the order of the statement's placeholders.
    fn into_values(self) -> Vec<sea_orm::Value>;
}

/// `W`'s SQL, rendered once (with any values: they are placeholders in it).
fn render<W: HotWrite>(backend: DbBackend) -> Result<String, JournalError> {
    Ok(W::default().build(backend)?.sql)
}

/// `write` bound to `sql`, its SQL from [`render`]. Debug builds check the result against
/// the statement built the long way.
fn bind<W: HotWrite>(
    backend: DbBackend,
    sql: &str,
    write: W,
) -> Result<sea_orm::Statement, JournalError> {
    #[cfg(debug_assertions)]
    let long_way = write.build(backend)?;
    let bound = sea_orm::Statement::from_sql_and_values(backend, sql, write.into_values());
    #[cfg(debug_assertions)]
    assert_eq!(bound, long_way, "a journal write bound to its rendered SQL");
    Ok(bound)
}

/// What an append binds, in its own types.
#[derive(Debug, Clone, Default)]
struct AppendValues {
    group: String,
    seq: u64,
    txn_id: String,
    epoch: u64,
    timestamp: String,
    method: String,
    uri: String,
    headers: String,
    body: Vec<u8>,
    executors: String,
    token: u64,
}

impl HotWrite for AppendValues {
    /// One statement that inserts only when the record extends the journal by exactly
    /// one: `INSERT … SELECT … WHERE (SELECT COALESCE(MAX(seq), 0) …) = seq - 1 AND <fence>`.
    fn build(&self, backend: DbBackend) -> Result<sea_orm::Statement, JournalError> {
        let postgres = backend == DbBackend::Postgres;
        let values: [sea_orm::sea_query::Expr; 13] = [
            Expr::val(self.group.clone()),
            Expr::val(to_i64(self.seq)),
            Expr::val(self.txn_id.clone()),
            Expr::val(to_i64(self.epoch)),
            Expr::val(self.timestamp.clone()),
            Expr::val(self.method.clone()),
            Expr::val(self.uri.clone()),
            Expr::val(self.headers.clone()),
            Expr::val(self.body.clone()),
            Expr::val(RecordState::Pending.as_str()),
            Expr::val(None::<i32>),
            Expr::val(None::<String>),
            Expr::val(self.executors.clone()),
        ];
        let head = Query::select()
            .expr(Func::coalesce([
                Func::max(Expr::col(R::Seq)).into(),
                Expr::val(0i64),
            ]))
            .from(R::Table)
            .and_where(Expr::col(R::GroupName).eq(self.group.as_str()))
            .to_owned();
        let select = Query::select()
            .exprs(values)
            .and_where(
                Expr::from(sea_orm::sea_query::SubQueryStatement::from(head))
                    .eq(to_i64(self.seq) - 1),
            )
            .and_where(SqlJournal::fence_for(postgres, self.token))
            .to_owned();
        let insert = Query::insert()
            .into_table(R::Table)
            .columns(RECORD_COLUMNS)
            .select_from(select)
            .map_err(|e| JournalError::Corrupt {
                group: self.group.clone(),
                seq: self.seq,
                reason: format!("cannot build the append: {e}"),
            })?
            .to_owned();
        Ok(backend.build(&insert))
    }

    /// The 13 record columns, the head's 0 and group, seq - 1, then the fence's.
    fn into_values(self) -> Vec<sea_orm::Value> {
        let seq = to_i64(self.seq);
        let mut values: Vec<sea_orm::Value> = vec![
            self.group.clone().into(),
            seq.into(),
            self.txn_id.into(),
            to_i64(self.epoch).into(),
            self.timestamp.into(),
            self.method.into(),
            self.uri.into(),
            self.headers.into(),
            self.body.into(),
            RecordState::Pending.as_str().into(),
            None::<i32>.into(),
            None::<String>.into(),
            self.executors.into(),
            0i64.into(),
            self.group.into(),
            (seq - 1).into(),
        ];
        values.extend(fence_values(self.token));
        values
    }
}

/// What a seal binds.
#[derive(Debug, Clone, Default)]
struct SealValues {
    group: String,
    seq: u64,
    state: &'static str,
    status: Option<i32>,
    body_hash: Option<String>,
    token: u64,
}

impl HotWrite for SealValues {
    /// The record's state and fingerprint, only while it is unsealed and under the fence.
    fn build(&self, backend: DbBackend) -> Result<sea_orm::Statement, JournalError> {
        let postgres = backend == DbBackend::Postgres;
        let update = Query::update()
            .table(R::Table)
            .value(R::State, self.state)
            .value(R::Status, self.status)
            .value(R::BodyHash, self.body_hash.clone())
            .and_where(Expr::col(R::GroupName).eq(self.group.as_str()))
            .and_where(Expr::col(R::Seq).eq(to_i64(self.seq)))
            .and_where(Expr::col(R::State).is_in(UNSEALED))
            .and_where(SqlJournal::fence_for(postgres, self.token))
            .to_owned();
        Ok(backend.build(&update))
    }

    /// State, status, body hash, group, seq, the two unsealed states, then the fence's.
    fn into_values(self) -> Vec<sea_orm::Value> {
        let mut values: Vec<sea_orm::Value> = vec![
            self.state.into(),
            self.status.into(),
            self.body_hash.into(),
            self.group.into(),
            to_i64(self.seq).into(),
        ];
        values.extend(UNSEALED.map(sea_orm::Value::from));
        values.extend(fence_values(self.token));
        values
    }
}

/// The values of [`SqlJournal::fence_for`], in order.
fn fence_values(token: u64) -> [sea_orm::Value; 3] {
    [1i64.into(), 1i64.into(), to_i64(token).into()]
}

fn to_i64(v: u64) -> i64 {
    i64::try_from(v).unwrap_or(i64::MAX)
}

fn to_u64(v: i64) -> u64 {
    u64::try_from(v).unwrap_or(0)
}

fn row_to_record(group: &str, row: &QueryResult) -> Result<Record, JournalError> {
    let seq = to_u64(row.try_get::<i64>("", "seq")?);
    let corrupt = |reason: String| JournalError::Corrupt {
        group: group.to_owned(),
        seq,
        reason,
    };
    let txn: String = row.try_get("", "txn_id")?;
    let txn_id = Uuid::parse_str(&txn).map_err(|e| corrupt(format!("txn_id {txn:?}: {e}")))?;
    let ts: String = row.try_get("", "timestamp")?;
    let timestamp = parse_timestamp(&ts).ok_or_else(|| corrupt(format!("timestamp {ts:?}")))?;
    let headers: String = row.try_get("", "headers")?;
    let headers: Vec<(String, String)> =
        serde_json::from_str(&headers).map_err(|e| corrupt(format!("headers: {e}")))?;
    let state: String = row.try_get("", "state")?;
    let state = RecordState::parse(&state).ok_or_else(|| corrupt(format!("state {state:?}")))?;
    let status: Option<i32> = row.try_get("", "status")?;
    let body_hash: Option<String> = row.try_get("", "body_hash")?;
    let fingerprint = match (status, body_hash) {
        (Some(status), Some(body_hash)) => Some(Fingerprint {
            status: u16::try_from(status).map_err(|e| corrupt(format!("status: {e}")))?,
            body_hash,
        }),
        _ => None,
    };
    let body: Vec<u8> = row.try_get("", "body")?;
    let method: String = row.try_get("", "method")?;
    let uri: String = row.try_get("", "uri")?;
    // An empty method (no HTTP request has one) marks a SQL mode payload, kept as JSON in
    // the body column; the uri names its dialect.
    let payload = if method.is_empty() && uri.starts_with(SQL_URI_PREFIX) {
        Payload::Sql(
            serde_json::from_slice(&body).map_err(|e| corrupt(format!("sql payload: {e}")))?,
        )
    } else {
        Payload::Http(RecordedRequest {
            method,
            uri,
            headers,
            body: Bytes::from(body),
        })
    };
    let executors: String = row.try_get("", "executors")?;
    let executors: Vec<String> =
        serde_json::from_str(&executors).map_err(|e| corrupt(format!("executors: {e}")))?;
    Ok(Record {
        group: group.to_owned(),
        seq,
        txn_id,
        epoch: to_u64(row.try_get::<i64>("", "epoch")?),
        timestamp,
        payload,
        state,
        fingerprint,
        executors,
    })
}

impl SqlJournal {
    /// Writes `stmt` on the relaxed connection (seals; records under `overlap`) or the
    /// flushed one, through its writer on SQLite: the rows it affected.
    async fn write(
        &self,
        relaxed: bool,
        stmt: &impl sea_orm::StatementBuilder,
    ) -> Result<u64, JournalError> {
        let stmt = self.db.get_database_backend().build(stmt);
        self.write_built(relaxed, stmt).await
    }

    /// [`SqlJournal::write`] of a statement already built.
    async fn write_built(
        &self,
        relaxed: bool,
        stmt: sea_orm::Statement,
    ) -> Result<u64, JournalError> {
        let (conn, batched) = if relaxed {
            (&self.relaxed, &self.relaxed_writes)
        } else {
            (&self.db, &self.flushed_writes)
        };
        match batched {
            Some(batched) => batched.execute(stmt).await,
            None => Ok(conn.execute_raw(stmt).await?.rows_affected()),
        }
    }

    fn my_token(&self) -> u64 {
        self.token.load(Ordering::Acquire)
    }

    fn postgres(&self) -> bool {
        self.db.get_database_backend() == DbBackend::Postgres
    }

    /// The database's clock, in milliseconds since the Unix epoch.
    fn now_ms(&self) -> SimpleExpr {
        if self.postgres() {
            Expr::cust("CAST(EXTRACT(EPOCH FROM clock_timestamp()) * 1000 AS BIGINT)")
        } else {
            Expr::cust("CAST((julianday('now') - 2440587.5) * 86400000.0 AS INTEGER)")
        }
    }

    /// The condition every write carries: nobody holds the lease, or this handle does.
    fn fence(&self) -> SimpleExpr {
        Self::fence_for(self.postgres(), self.my_token())
    }

    /// [`SqlJournal::fence`] for the holder of `token`. Its values, in order: 1, 1, the
    /// token ([`fence_values`]).
    fn fence_for(postgres: bool, token: u64) -> SimpleExpr {
        let mut q = Query::select();
        q.expr(Expr::val(1i64))
            .from(O::Table)
            .and_where(Expr::col(O::Id).eq(1i64))
            .and_where(
                Expr::col(O::OwnerId)
                    .is_null()
                    .or(Expr::col(O::Token).eq(to_i64(token))),
            );
        if postgres {
            // A write and a claim exclude each other (see the module docs).
            q.lock(LockType::Share);
        }
        Expr::exists(q.to_owned())
    }

    /// The lease row: (owner id, description, token, milliseconds left).
    async fn lease_row(&self) -> Result<(Option<String>, String, u64, i64), JournalError> {
        let q = Query::select()
            .columns([O::OwnerId, O::Describe, O::Token])
            .expr_as(
                Expr::col(O::ExpiresAt).sub(self.now_ms()),
                sea_orm::sea_query::Alias::new("remaining"),
            )
            .from(O::Table)
            .and_where(Expr::col(O::Id).eq(1i64))
            .to_owned();
        let row = self
            .db
            .query_one(&q)
            .await?
            .ok_or_else(|| JournalError::Unavailable {
                reason: "the journal has no ownership row (regroup_owner)".to_owned(),
                retryable: false,
            })?;
        Ok((
            row.try_get("", "owner_id")?,
            row.try_get("", "describe")?,
            to_u64(row.try_get::<i64>("", "token")?),
            row.try_get::<i64>("", "remaining")?,
        ))
    }

    /// `Some(Fenced)` when another claim holds the lease: why a fenced write changed
    /// nothing.
    async fn fenced(&self) -> Result<Option<JournalError>, JournalError> {
        let (owner, describe, token, _) = self.lease_row().await?;
        Ok((owner.is_some() && token != self.my_token())
            .then_some(JournalError::Fenced { holder: describe }))
    }

    /// Refuses at once when another claim holds the lease (for writes whose statement may
    /// legitimately change nothing).
    async fn check_fence(&self) -> Result<(), JournalError> {
        match self.fenced().await? {
            Some(e) => Err(e),
            None => Ok(()),
        }
    }

    async fn head(&self, group: &str) -> Result<u64, JournalError> {
        let q = Query::select()
            .expr(Func::max(Expr::col(R::Seq)))
            .from(R::Table)
            .and_where(Expr::col(R::GroupName).eq(group))
            .to_owned();
        let row = self.db.query_one(&q).await?;
        let max: Option<i64> = match row {
            Some(row) => row.try_get_by_index(0)?,
            None => None,
        };
        Ok(max.map_or(0, to_u64))
    }

    async fn select_records(
        &self,
        group: &str,
        filter: impl FnOnce(&mut sea_orm::sea_query::SelectStatement),
        limit: Option<u64>,
    ) -> Result<Vec<Record>, JournalError> {
        let mut q = Query::select();
        q.columns(RECORD_COLUMNS)
            .from(R::Table)
            .and_where(Expr::col(R::GroupName).eq(group))
            .order_by(R::Seq, Order::Asc);
        filter(&mut q);
        if let Some(limit) = limit {
            // sqlx binds a u64 above i64::MAX by panicking: clamp (no journal is that long).
            q.limit(std::cmp::min(limit, to_u64(i64::MAX)));
        }
        let rows = self.db.query_all(&q).await?;
        rows.iter().map(|r| row_to_record(group, r)).collect()
    }
}

#[async_trait]
impl Log for SqlJournal {
    async fn open_log(&self, group: &str) -> Result<LogState, JournalError> {
        let update = Query::update()
            .table(R::Table)
            .value(R::State, RecordState::InDoubt.as_str())
            .and_where(Expr::col(R::GroupName).eq(group))
            .and_where(Expr::col(R::State).eq(RecordState::Pending.as_str()))
            .and_where(self.fence())
            .to_owned();
        self.check_fence().await?;
        self.db.execute(&update).await?;
        let unsealed = self
            .select_records(
                group,
                |q| {
                    q.and_where(Expr::col(R::State).is_in(UNSEALED));
                },
                None,
            )
            .await?;
        Ok(LogState {
            head: self.head(group).await?,
            unsealed,
        })
    }

    async fn append(&self, record: &Record) -> Result<(), JournalError> {
        // The HTTP payload's columns; a SQL payload is JSON in the body, with an empty
        // method (which no HTTP request has) and its dialect in the uri.
        let (method, uri, headers, body) = match &record.payload {
            Payload::Http(request) => (
                request.method.clone(),
                request.uri.clone(),
                serde_json::to_string(&request.headers)
                    .map_err(|e| corrupt_input(record, format!("headers: {e}")))?,
                request.body.to_vec(),
            ),
            Payload::Sql(t) => (
                String::new(),
                format!("{SQL_URI_PREFIX}{}", t.dialect),
                "[]".to_owned(),
                serde_json::to_vec(t)
                    .map_err(|e| corrupt_input(record, format!("sql payload: {e}")))?,
            ),
        };
        let executors = serde_json::to_string(&record.executors)
            .map_err(|e| corrupt_input(record, format!("executors: {e}")))?;
        let values = AppendValues {
            group: record.group.clone(),
            seq: record.seq,
            txn_id: record.txn_id.to_string(),
            epoch: record.epoch,
            timestamp: record.timestamp_rfc3339(),
            method,
            uri,
            headers,
            body,
            executors,
            token: self.my_token(),
        };
        let insert = bind(self.db.get_database_backend(), &self.hot.append, values)?;
        // Under `overlap` the record is written at once and made durable by `flush`.
        let inserted = self
            .write_built(self.sync == JournalSync::Overlap, insert)
            .await?;
        if inserted != 1 {
            if let Some(fenced) = self.fenced().await? {
                return Err(fenced);
            }
            return Err(JournalError::Gap {
                group: record.group.clone(),
                expected: self.head(&record.group).await? + 1,
                got: record.seq,
            });
        }
        Ok(())
    }

    async fn seal(&self, group: &str, seq: u64, outcome: &Outcome) -> Result<(), JournalError> {
        let (state, fp) = match outcome {
            Outcome::Executed(fp) => (RecordState::Executed, fp.as_ref()),
            Outcome::Skipped => (RecordState::Skipped, None),
        };
        let values = SealValues {
            group: group.to_owned(),
            seq,
            state: state.as_str(),
            status: fp.map(|f| i32::from(f.status)),
            body_hash: fp.map(|f| f.body_hash.clone()),
            token: self.my_token(),
        };
        let update = bind(self.db.get_database_backend(), &self.hot.seal, values)?;
        if self.write_built(true, update).await? == 1 {
            return Ok(());
        }
        self.check_fence().await?;
        match self.record(group, seq).await? {
            None => Err(JournalError::NoSuchRecord {
                group: group.to_owned(),
                seq,
            }),
            Some(r) if r.state == state && r.fingerprint.as_ref() == fp => Ok(()),
            Some(r) => Err(JournalError::Conflict {
                group: group.to_owned(),
                what: format!("record {seq} is already sealed {}", r.state.as_str()),
            }),
        }
    }

    async fn restamp(
        &self,
        group: &str,
        seq: u64,
        epoch: u64,
        executor: &str,
    ) -> Result<(), JournalError> {
        let Some(mut record) = self.record(group, seq).await? else {
            return Err(JournalError::NoSuchRecord {
                group: group.to_owned(),
                seq,
            });
        };
        record.add_executor(executor);
        let executors = serde_json::to_string(&record.executors)
            .map_err(|e| corrupt_input(&record, format!("executors: {e}")))?;
        let update = Query::update()
            .table(R::Table)
            .value(R::Epoch, to_i64(epoch))
            .value(R::Executors, executors)
            .and_where(Expr::col(R::GroupName).eq(group))
            .and_where(Expr::col(R::Seq).eq(to_i64(seq)))
            .and_where(Expr::col(R::State).is_in(UNSEALED))
            .and_where(self.fence())
            .to_owned();
        if self.db.execute(&update).await?.rows_affected() == 0 {
            self.check_fence().await?;
            return Err(JournalError::Conflict {
                group: group.to_owned(),
                what: format!("record {seq} is sealed and cannot be restamped"),
            });
        }
        Ok(())
    }

    async fn read_after(
        &self,
        group: &str,
        after: u64,
        limit: u64,
    ) -> Result<Vec<Record>, JournalError> {
        self.select_records(
            group,
            |q| {
                q.and_where(Expr::col(R::Seq).gt(to_i64(after)));
            },
            Some(limit),
        )
        .await
    }

    async fn truncate(&self, group: &str, through: u64) -> Result<u64, JournalError> {
        // Off the hot path: a fenced handle hears so before anything else.
        self.check_fence().await?;
        let head = self.head(group).await?;
        let bound = to_i64(std::cmp::min(through, head.saturating_sub(1)));
        let unsealed = Query::select()
            .expr(Func::min(Expr::col(R::Seq)))
            .from(R::Table)
            .and_where(Expr::col(R::GroupName).eq(group))
            .and_where(Expr::col(R::Seq).lte(bound))
            .and_where(Expr::col(R::State).is_in(UNSEALED))
            .to_owned();
        let first: Option<i64> = match self.db.query_one(&unsealed).await? {
            Some(row) => row.try_get_by_index(0)?,
            None => None,
        };
        if let Some(seq) = first {
            return Err(JournalError::Conflict {
                group: group.to_owned(),
                what: format!("record {seq} is not sealed and cannot be truncated"),
            });
        }
        let delete = Query::delete()
            .from_table(R::Table)
            .and_where(Expr::col(R::GroupName).eq(group))
            .and_where(Expr::col(R::Seq).lte(bound))
            .and_where(Expr::col(R::State).is_not_in(UNSEALED))
            .and_where(self.fence())
            .to_owned();
        let removed = self.db.execute(&delete).await?.rows_affected();
        if removed == 0 {
            self.check_fence().await?;
        }
        Ok(removed)
    }

    async fn low_water(&self, group: &str) -> Result<u64, JournalError> {
        let q = Query::select()
            .expr(Func::min(Expr::col(R::Seq)))
            .from(R::Table)
            .and_where(Expr::col(R::GroupName).eq(group))
            .to_owned();
        let min: Option<i64> = match self.db.query_one(&q).await? {
            Some(row) => row.try_get_by_index(0)?,
            None => None,
        };
        Ok(min.map_or(0, |m| to_u64(m).saturating_sub(1)))
    }

    async fn record(&self, group: &str, seq: u64) -> Result<Option<Record>, JournalError> {
        let mut v = self
            .select_records(
                group,
                |q| {
                    q.and_where(Expr::col(R::Seq).eq(to_i64(seq)));
                },
                Some(1),
            )
            .await?;
        Ok(v.pop())
    }

    fn seals_durable(&self) -> bool {
        self.sync == JournalSync::Full
    }

    fn appends_durable(&self) -> bool {
        self.sync != JournalSync::Overlap
    }

    async fn flush(&self) -> Result<(), JournalError> {
        if self.sync == JournalSync::Full {
            // Everything is durable already; a fenced handle still hears that it is.
            return self.check_fence().await;
        }
        if let Some(wal) = &self.wal {
            // SQLite: one sync of the write-ahead log makes every commit in it durable,
            // without a write that would wait for the connection the seals use.
            sync_file(wal).await?;
            return self.check_fence().await;
        }
        // A write on the flushed connection: its commit makes everything written before it
        // durable (SQLite syncs the whole WAL; PostgreSQL flushes WAL up to its commit).
        let touch = Query::update()
            .table(Group::Table)
            .value(Group::Epoch, Expr::col(Group::Epoch))
            .and_where(self.fence())
            .to_owned();
        if self.write(false, &touch).await? == 0 {
            // No group to touch, or fenced.
            self.check_fence().await?;
        }
        Ok(())
    }
}

#[async_trait]
impl RoleStore for SqlJournal {
    async fn role(&self, group: &str, primary: &str) -> Result<StoredRole, JournalError> {
        self.check_fence().await?;
        let values = Query::select()
            .exprs([Expr::val(group), Expr::val(1i64), Expr::val(primary)])
            .and_where(self.fence())
            .to_owned();
        let insert = Query::insert()
            .into_table(Group::Table)
            .columns([Group::Name, Group::Epoch, Group::PrimaryName])
            .select_from(values)
            .map_err(|e| JournalError::Unavailable {
                reason: e.to_string(),
                retryable: false,
            })?
            .on_conflict(OnConflict::column(Group::Name).do_nothing().to_owned())
            .to_owned();
        self.db.execute(&insert).await?;
        let q = Query::select()
            .columns([Group::Epoch, Group::PrimaryName])
            .from(Group::Table)
            .and_where(Expr::col(Group::Name).eq(group))
            .to_owned();
        let row = self
            .db
            .query_one(&q)
            .await?
            .ok_or_else(|| JournalError::Unavailable {
                reason: format!("group {group:?} vanished from the journal"),
                retryable: false,
            })?;
        let stored: Option<String> = row.try_get("", "primary_name")?;
        Ok(StoredRole {
            epoch: to_u64(row.try_get::<i64>("", "epoch")?),
            primary: stored.unwrap_or_else(|| primary.to_owned()),
        })
    }

    async fn set_role(
        &self,
        group: &str,
        expected_epoch: u64,
        role: &StoredRole,
    ) -> Result<(), JournalError> {
        if role.epoch <= expected_epoch {
            return Err(JournalError::Conflict {
                group: group.to_owned(),
                what: format!(
                    "new epoch {} is not above the expected {expected_epoch}",
                    role.epoch
                ),
            });
        }
        let update = Query::update()
            .table(Group::Table)
            .value(Group::Epoch, to_i64(role.epoch))
            .value(Group::PrimaryName, role.primary.as_str())
            .and_where(Expr::col(Group::Name).eq(group))
            .and_where(Expr::col(Group::Epoch).eq(to_i64(expected_epoch)))
            .and_where(self.fence())
            .to_owned();
        if self.db.execute(&update).await?.rows_affected() == 0 {
            self.check_fence().await?;
            let found = self.role(group, &role.primary).await?;
            return Err(JournalError::Conflict {
                group: group.to_owned(),
                what: format!("role at epoch {}, expected {expected_epoch}", found.epoch),
            });
        }
        Ok(())
    }
}

#[async_trait]
impl Checkpoints for SqlJournal {
    async fn checkpoint(&self, group: &str, partition: &str) -> Result<u64, JournalError> {
        let q = Query::select()
            .column(Checkpoint::Applied)
            .from(Checkpoint::Table)
            .and_where(Expr::col(Checkpoint::GroupName).eq(group))
            .and_where(Expr::col(Checkpoint::Partition).eq(partition))
            .to_owned();
        Ok(match self.db.query_one(&q).await? {
            Some(row) => to_u64(row.try_get::<i64>("", "applied")?),
            None => 0,
        })
    }

    async fn save_checkpoint(
        &self,
        group: &str,
        partition: &str,
        applied: u64,
    ) -> Result<(), JournalError> {
        let values = Query::select()
            .exprs([
                Expr::val(group),
                Expr::val(partition),
                Expr::val(to_i64(applied)),
            ])
            .and_where(self.fence())
            .to_owned();
        let upsert = Query::insert()
            .into_table(Checkpoint::Table)
            .columns([
                Checkpoint::GroupName,
                Checkpoint::Partition,
                Checkpoint::Applied,
            ])
            .select_from(values)
            .map_err(|e| JournalError::Unavailable {
                reason: e.to_string(),
                retryable: false,
            })?
            .on_conflict(
                OnConflict::columns([Checkpoint::GroupName, Checkpoint::Partition])
                    .update_column(Checkpoint::Applied)
                    .to_owned(),
            )
            .to_owned();
        // Durable at once in every mode: for a partition without the app layer's record the
        // checkpoint is the only record of what it applied, and one that went back after a
        // power loss would have records applied there twice.
        if self.db.execute(&upsert).await?.rows_affected() == 0 {
            self.check_fence().await?;
        }
        Ok(())
    }

    async fn diverged(&self, group: &str, partition: &str) -> Result<Option<String>, JournalError> {
        let q = Query::select()
            .column(Checkpoint::Diverged)
            .from(Checkpoint::Table)
            .and_where(Expr::col(Checkpoint::GroupName).eq(group))
            .and_where(Expr::col(Checkpoint::Partition).eq(partition))
            .to_owned();
        Ok(match self.db.query_one(&q).await? {
            Some(row) => row.try_get::<Option<String>>("", "diverged")?,
            None => None,
        })
    }

    async fn set_diverged(
        &self,
        group: &str,
        partition: &str,
        reason: Option<&str>,
    ) -> Result<(), JournalError> {
        let values = Query::select()
            .exprs([
                Expr::val(group),
                Expr::val(partition),
                Expr::val(0i64),
                Expr::val(reason.map(str::to_owned)),
            ])
            .and_where(self.fence())
            .to_owned();
        let upsert = Query::insert()
            .into_table(Checkpoint::Table)
            .columns([
                Checkpoint::GroupName,
                Checkpoint::Partition,
                Checkpoint::Applied,
                Checkpoint::Diverged,
            ])
            .select_from(values)
            .map_err(|e| JournalError::Unavailable {
                reason: e.to_string(),
                retryable: false,
            })?
            .on_conflict(
                OnConflict::columns([Checkpoint::GroupName, Checkpoint::Partition])
                    .update_column(Checkpoint::Diverged)
                    .to_owned(),
            )
            .to_owned();
        if self.db.execute(&upsert).await?.rows_affected() == 0 {
            self.check_fence().await?;
        }
        Ok(())
    }
}

#[async_trait]
impl Membership for SqlJournal {
    async fn members(&self, group: &str) -> Result<Option<StoredMembers>, JournalError> {
        let q = Query::select()
            .columns([Group::Members, Group::MembersVersion])
            .from(Group::Table)
            .and_where(Expr::col(Group::Name).eq(group))
            .to_owned();
        let Some(row) = self.db.query_one(&q).await? else {
            return Ok(None);
        };
        let text: Option<String> = row.try_get("", "members")?;
        let version = to_u64(row.try_get::<i64>("", "members_version")?);
        match text {
            Some(text) if version > 0 => Ok(Some(StoredMembers {
                version,
                partitions: membership::decode(group, &text)?,
            })),
            _ => Ok(None),
        }
    }

    async fn set_members(
        &self,
        group: &str,
        expected_version: u64,
        partitions: &[MemberSpec],
    ) -> Result<u64, JournalError> {
        let version = expected_version + 1;
        let update = Query::update()
            .table(Group::Table)
            .value(Group::Members, membership::encode(partitions))
            .value(Group::MembersVersion, to_i64(version))
            .and_where(Expr::col(Group::Name).eq(group))
            .and_where(Expr::col(Group::MembersVersion).eq(to_i64(expected_version)))
            .and_where(self.fence())
            .to_owned();
        if self.db.execute(&update).await?.rows_affected() == 0 {
            self.check_fence().await?;
            let what = match self.members(group).await? {
                Some(m) => format!(
                    "membership at version {}, expected {expected_version}",
                    m.version
                ),
                None if expected_version == 0 => "the group does not exist".to_owned(),
                None => format!("no membership stored, expected version {expected_version}"),
            };
            return Err(JournalError::Conflict {
                group: group.to_owned(),
                what,
            });
        }
        Ok(version)
    }
}

#[async_trait]
impl Lease for SqlJournal {
    async fn claim(&self, owner: &Owner, ttl: Duration) -> Result<u64, JournalError> {
        let ttl_ms = i64::try_from(ttl.as_millis()).unwrap_or(i64::MAX / 4);
        // Taken when nobody holds it, when it ran out, or when it is this owner's already.
        let update = Query::update()
            .table(O::Table)
            .value(O::OwnerId, owner.id.as_str())
            .value(O::Describe, owner.describe.as_str())
            .value(O::Token, Expr::col(O::Token).add(1i64))
            .value(O::ExpiresAt, self.now_ms().add(ttl_ms))
            .and_where(Expr::col(O::Id).eq(1i64))
            .and_where(
                Expr::col(O::OwnerId)
                    .is_null()
                    .or(Expr::col(O::ExpiresAt).lte(self.now_ms()))
                    .or(Expr::col(O::OwnerId).eq(owner.id.as_str())),
            )
            .returning_col(O::Token)
            .to_owned();
        // A holder that releases between the refused claim and the look at who holds it:
        // claim again (a few times, each after a release).
        let mut attempts = 0;
        loop {
            if let Some(row) = self.db.query_one(&update).await? {
                let token = to_u64(row.try_get::<i64>("", "token")?);
                self.token.store(token, Ordering::Release);
                return Ok(token);
            }
            let (holder, describe, _, _) = self.lease_row().await?;
            attempts += 1;
            if holder.is_some() || attempts >= CLAIM_ATTEMPTS {
                return Err(JournalError::Fenced { holder: describe });
            }
        }
    }

    async fn renew(&self, ttl: Duration) -> Result<(), JournalError> {
        let ttl_ms = i64::try_from(ttl.as_millis()).unwrap_or(i64::MAX / 4);
        let update = Query::update()
            .table(O::Table)
            .value(O::ExpiresAt, self.now_ms().add(ttl_ms))
            .and_where(Expr::col(O::Id).eq(1i64))
            .and_where(Expr::col(O::OwnerId).is_not_null())
            .and_where(Expr::col(O::Token).eq(to_i64(self.my_token())))
            .to_owned();
        if self.db.execute(&update).await?.rows_affected() == 1 {
            return Ok(());
        }
        let (owner, describe, _, _) = self.lease_row().await?;
        Err(JournalError::Fenced {
            holder: match owner {
                Some(_) => describe,
                None => RELEASED.to_owned(),
            },
        })
    }

    async fn release(&self) -> Result<(), JournalError> {
        let update = Query::update()
            .table(O::Table)
            .value(O::OwnerId, None::<String>)
            .value(O::ExpiresAt, 0i64)
            .and_where(Expr::col(O::Id).eq(1i64))
            .and_where(Expr::col(O::OwnerId).is_not_null())
            .and_where(Expr::col(O::Token).eq(to_i64(self.my_token())))
            .to_owned();
        self.db.execute(&update).await?;
        Ok(())
    }

    async fn owner(&self) -> Result<Option<OwnerInfo>, JournalError> {
        let (owner, describe, token, remaining) = self.lease_row().await?;
        Ok(owner.map(|id| OwnerInfo {
            id,
            describe,
            token,
            remaining_ms: u64::try_from(remaining).unwrap_or(0),
        }))
    }
}

/// Claims tried when the lease is released while a claim is refused.
const CLAIM_ATTEMPTS: u32 = 3;

/// The holder named when a renewal finds the lease released.
const RELEASED: &str = "nobody (the lease was released)";

/// The uri column's prefix for a SQL mode payload (followed by its dialect).
pub(super) const SQL_URI_PREFIX: &str = "sql:";

const UNSEALED: [&str; 2] = ["pending", "in_doubt"];

fn corrupt_input(record: &Record, reason: String) -> JournalError {
    JournalError::Corrupt {
        group: record.group.clone(),
        seq: record.seq,
        reason,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::journal::Journal;

    fn request(body: &'static str) -> RecordedRequest {
        RecordedRequest {
            method: "POST".into(),
            uri: "/accounts?x=1".into(),
            headers: vec![("content-type".into(), "application/json".into())],
            body: Bytes::from_static(body.as_bytes()),
        }
    }

    async fn journal(dir: &tempfile::TempDir) -> SqlJournal {
        let url = format!("sqlite://{}", dir.path().join("j.db").display());
        match SqlJournal::connect(&url).await {
            Ok(j) => j,
            Err(e) => panic!("cannot open journal at {url}: {e}"),
        }
    }

    /// Writes that queue up while one is written commit together, each caller hearing its
    /// own outcome: 32 seals at once take fewer than 32 transactions, a seal of a record
    /// that does not exist fails alone, and every other one is sealed.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn queued_writes_commit_together_and_each_hears_its_own_outcome()
    -> Result<(), JournalError> {
        let dir = tempfile::tempdir().map_err(|e| JournalError::unavailable(e.to_string()))?;
        let j = journal(&dir).await;
        j.open_group("g", "a").await?;
        for seq in 1..=32 {
            j.append(&Record::pending("g", seq, 1, request("{}")))
                .await?;
        }
        let batched = j
            .flushed_writes
            .clone()
            .ok_or_else(|| JournalError::unavailable("a SQLite journal has a group commit"))?;
        let before = batched.batches.load(Ordering::Relaxed);
        let seals = (1..=33u64).map(|seq| {
            let j = j.clone();
            async move { (seq, j.seal("g", seq, &Outcome::Executed(None)).await) }
        });
        let outcomes = futures_util::future::join_all(seals).await;
        let batches = batched.batches.load(Ordering::Relaxed) - before;
        for (seq, outcome) in outcomes {
            match (seq, outcome) {
                (33, Err(JournalError::NoSuchRecord { seq: 33, .. })) => {}
                (33, other) => panic!("seal of a record never appended: {other:?}"),
                (seq, Err(e)) => panic!("seal {seq}: {e}"),
                (_, Ok(())) => {}
            }
        }
        assert!(batches < 33, "33 seals at once took {batches} transactions");
        let records = j.read_after("g", 0, 100).await?;
        assert_eq!(records.len(), 32);
        assert!(records.iter().all(|r| r.state == RecordState::Executed));
        Ok(())
    }

    /// The two writes of every update bind their values to SQL rendered once; bound in
    /// the wrong order, a record would be written with one column's value in another.
    #[test]
    fn hot_writes_bind_what_sea_query_builds() -> Result<(), JournalError> {
        let append = AppendValues {
            group: "bank".into(),
            seq: 42,
            txn_id: "0190a0b0-0000-7000-8000-000000000042".into(),
            epoch: 3,
            timestamp: "2026-12-04T01:00:00.000000Z".into(),
            method: "POST".into(),
            uri: "/transfers".into(),
            headers: r#"[["content-type","application/json"]]"#.into(),
            body: br#"{"from":1,"to":2,"amount":1}"#.to_vec(),
            executors: r#"["a"]"#.into(),
            token: 7,
        };
        let seals = [
            SealValues {
                group: "bank".into(),
                seq: 42,
                state: RecordState::Executed.as_str(),
                status: Some(201),
                body_hash: Some("ab".repeat(32)),
                token: 7,
            },
            SealValues {
                group: "other".into(),
                seq: 9,
                state: RecordState::Skipped.as_str(),
                status: None,
                body_hash: None,
                token: 0,
            },
        ];
        for backend in [DbBackend::Sqlite, DbBackend::Postgres] {
            let sql = render::<AppendValues>(backend)?;
            let bound =
                sea_orm::Statement::from_sql_and_values(backend, sql, append.clone().into_values());
            assert_eq!(bound, append.build(backend)?, "{backend:?} append");
            let sql = render::<SealValues>(backend)?;
            for seal in &seals {
                let bound = sea_orm::Statement::from_sql_and_values(
                    backend,
                    sql.clone(),
                    seal.clone().into_values(),
                );
                assert_eq!(bound, seal.build(backend)?, "{backend:?} seal {seal:?}");
            }
        }
        Ok(())
    }

    #[tokio::test]
    async fn append_seal_read_and_reopen() -> Result<(), JournalError> {
        let dir = tempfile::tempdir().map_err(|e| JournalError::unavailable(e.to_string()))?;
        let j = journal(&dir).await;
        let g = j.open_group("bank", "a").await?;
        assert_eq!(
            (g.role.epoch, g.log.head, g.role.primary.as_str()),
            (1, 0, "a")
        );

        let r1 = Record::pending("bank", 1, 1, request("{}"));
        j.append(&r1).await?;
        let fp = Fingerprint::of(201, b"ok");
        j.seal("bank", 1, &Outcome::Executed(Some(fp.clone())))
            .await?;
        let r2 = Record::pending("bank", 2, 1, request("{\"b\":2}"));
        j.append(&r2).await?;

        // Appending out of order is a gap, named precisely.
        let r5 = Record::pending("bank", 5, 1, request(""));
        match j.append(&r5).await {
            Err(JournalError::Gap { expected, got, .. }) => {
                assert_eq!((expected, got), (3, 5));
            }
            other => panic!("expected a gap, got {other:?}"),
        }
        // Re-appending a taken seq is refused too.
        assert!(j.append(&r2).await.is_err());

        let all = j.read_after("bank", 0, 10).await?;
        assert_eq!(all.len(), 2);
        assert_eq!(all[0].state, RecordState::Executed);
        assert_eq!(all[0].fingerprint.as_ref(), Some(&fp));
        assert_eq!(all[0].payload, r1.payload);
        assert_eq!(all[0].txn_id, r1.txn_id);
        assert_eq!(all[0].timestamp, r1.timestamp);

        j.save_checkpoint("bank", "b", 1).await?;
        j.save_checkpoint("bank", "b", 2).await?;
        assert_eq!(j.checkpoint("bank", "b").await?, 2);
        assert_eq!(j.checkpoint("bank", "c").await?, 0);

        // Reopening finds the pending record and reports it in doubt.
        drop(j);
        let j = journal(&dir).await;
        let g = j.open_group("bank", "ignored").await?;
        assert_eq!(
            (g.role.epoch, g.log.head, g.role.primary.as_str()),
            (1, 2, "a")
        );
        assert_eq!(g.log.unsealed.len(), 1);
        assert_eq!(g.log.unsealed[0].seq, 2);
        assert_eq!(g.log.unsealed[0].state, RecordState::InDoubt);

        assert_eq!(j.diverged("bank", "b").await?, None);
        j.set_diverged("bank", "b", Some("seq 1: status 409 differs"))
            .await?;
        assert_eq!(
            j.diverged("bank", "b").await?.as_deref(),
            Some("seq 1: status 409 differs")
        );
        assert_eq!(
            j.checkpoint("bank", "b").await?,
            2,
            "quarantine keeps the checkpoint"
        );
        j.set_diverged("bank", "b", None).await?;
        assert_eq!(j.diverged("bank", "b").await?, None);
        j.restamp("bank", 2, 2, "b").await?;
        let r2 = j.record("bank", 2).await?;
        assert_eq!(r2.as_ref().map(|r| r.epoch), Some(2));
        assert_eq!(r2.map(|r| r.executors), Some(vec!["b".to_owned()]));
        let role = StoredRole {
            epoch: 2,
            primary: "b".into(),
        };
        j.set_role("bank", 1, &role).await?;
        assert!(matches!(
            j.set_role("bank", 1, &role).await,
            Err(JournalError::Conflict { .. })
        ));
        let g = j.open_group("bank", "a").await?;
        assert_eq!((g.role.epoch, g.role.primary.as_str()), (2, "b"));
        assert!(matches!(
            j.seal("bank", 9, &Outcome::Skipped).await,
            Err(JournalError::NoSuchRecord { seq: 9, .. })
        ));
        Ok(())
    }
}

#[cfg(test)]
mod cost {
    use super::*;

    /// The hot path's cost: `REGROUP_COST_URL` (default: a SQLite file in a temp dir),
    /// What handing a piece of work to another thread and its answer back costs on this
    /// machine (as each statement goes to sqlx's SQLite worker thread and back): 20,000
    /// round trips over a pair of channels, three rounds.
    /// `cargo test -p regroup-replay --release --lib -- --ignored thread_round_trip_cost --nocapture`
    #[test]
    #[ignore = "a measurement, not a check"]
    #[allow(clippy::unwrap_used)]
    fn thread_round_trip_cost() {
        let (to_worker, work) = std::sync::mpsc::channel::<u64>();
        let (answer, back) = std::sync::mpsc::channel::<u64>();
        let worker = std::thread::spawn(move || {
            for v in work {
                if answer.send(v).is_err() {
                    break;
                }
            }
        });
        let n = 20_000u64;
        for round in 1..=3 {
            let started = std::time::Instant::now();
            for i in 0..n {
                to_worker.send(i).unwrap();
                back.recv().unwrap();
            }
            println!(
                "round {round}: {:.1} µs per thread round trip",
                started.elapsed().as_secs_f64() * 1e6 / n as f64
            );
        }
        drop(to_worker);
        worker.join().unwrap();
    }

    /// 2,000 appends each followed by its seal, as the update path does them.
    /// `cargo test -p regroup-replay --release -- --ignored append_and_seal_cost --nocapture`
    #[tokio::test]
    #[ignore = "a measurement, not a check"]
    #[allow(clippy::unwrap_used)]
    async fn append_and_seal_cost() {
        let dir = tempfile::tempdir().unwrap();
        let url = std::env::var("REGROUP_COST_URL")
            .unwrap_or_else(|_| format!("sqlite://{}", dir.path().join("j.db").display()));
        let j = SqlJournal::connect(&url).await.unwrap();
        let group = format!("cost{:x}", rand::random::<u32>());
        let owner = Owner {
            id: Uuid::now_v7().to_string(),
            describe: "cost loop".into(),
        };
        j.claim(&owner, Duration::from_secs(60)).await.unwrap();
        let request = RecordedRequest {
            method: "POST".into(),
            uri: "/x".into(),
            headers: vec![],
            body: Bytes::from_static(b"{}"),
        };
        let n = 2000u64;
        let started = std::time::Instant::now();
        for seq in 1..=n {
            j.append(&Record::pending(&group, seq, 1, request.clone()))
                .await
                .unwrap();
            j.seal(&group, seq, &Outcome::Executed(None)).await.unwrap();
        }
        let took = started.elapsed();
        j.release().await.unwrap();
        println!(
            "{url}: {n} append+seal in {took:?}: {:.1} µs per update",
            took.as_secs_f64() * 1e6 / n as f64
        );
    }
}
