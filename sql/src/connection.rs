//! The connection an application uses wherever it used sea-orm's `DatabaseConnection`:
//! [`SqlGroup`] (and its transaction, [`SqlTransaction`]) over a redundancy group of
//! database copies.
//!
//! # Path of a write
//!
//! A write transaction takes the group's write slot when it begins (write transactions of
//! a group are serialized, as updates are in HTTP mode) and runs on the primary copy. Every
//! statement is classified first ([`crate::classify`]): reads run on the primary inside the
//! transaction and are not journaled; transaction control through raw SQL is refused (use
//! `begin`/`commit`); every other statement is checked for nondeterminism, its
//! nondeterministic values fixed to literals ([`crate::rewrite`]) or the statement refused
//! (nothing runs, nothing is journaled), then executed and kept with its bound values and
//! affected-row count. On commit, the copy's checkpoint row (`regroup_sql_checkpoint`) is
//! moved to the record's seq inside the same database transaction, the record is appended
//! to the journal *pending* (write-ahead), the primary commits, and the record is sealed
//! `executed`. A commit whose answer was lost is settled by reading the primary's
//! checkpoint row: at or past the seq means committed (sealed executed, the caller gets
//! `Ok`), below means not (sealed skipped, the caller gets the error). When even that
//! cannot be read the record stays in doubt and the next write, or the next open, settles
//! it the same way before anything else is journaled.
//!
//! # Replay and reads
//!
//! Every other copy has a [`Replayer`] with a [`CopyApplier`]: it executes each sealed
//! record's statements and advances its checkpoint row in one database transaction
//! (exactly once), comparing each statement's affected rows and the running hash with the
//! primary's; a mismatch quarantines the copy durably (`set_diverged`). Reads outside a
//! transaction are balanced round-robin over the copies that are not quarantined and have
//! applied everything sealed, so a read after a commit sees that commit (read-your-writes).
//! Inside a transaction everything runs on the primary.

use std::pin::Pin;
use std::sync::atomic::{AtomicU32, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use regroup_replay::{
    Journal, Outcome, Payload, Record, RecordState, ReplayExit, ReplayObserver, Replayer,
    SqlStatement, SqlTransaction as JournaledTransaction,
};
use sea_orm::{
    AccessMode, ConnectOptions, ConnectionTrait, Database, DatabaseConnection, DatabaseTransaction,
    DbBackend, DbErr, ExecResult, IsolationLevel, QueryResult, Statement, TransactionError,
    TransactionOptions, TransactionSession, TransactionTrait,
};
use time::OffsetDateTime;
use tokio::sync::{OwnedMutexGuard, watch};
use tokio::task::JoinHandle;
use uuid::Uuid;

use crate::applier::CopyApplier;
use crate::checkpoint;
use crate::classify::{Class, Dialect, analyze};
use crate::rewrite::Fixed;
use crate::value::to_journal;

/// Why a group could not be opened.
#[derive(Debug, thiserror::Error)]
pub enum OpenError {
    /// A copy's database failed.
    #[error("copy {copy:?}: {source}")]
    Copy {
        /// The copy.
        copy: String,
        /// What failed.
        source: DbErr,
    },
    /// The journal failed.
    #[error("journal: {0}")]
    Journal(#[from] regroup_replay::JournalError),
    /// The configuration is not usable.
    #[error("{0}")]
    Config(String),
}

/// One database copy of the group.
#[derive(Debug, Clone)]
pub struct CopyConfig {
    /// Its stable name (the partition's name in the journal).
    pub name: String,
    /// Its database URL (`sqlite://path` creates the file; `postgres://…`).
    pub url: String,
}

impl CopyConfig {
    /// A copy named `name` at `url`.
    pub fn new(name: impl Into<String>, url: impl Into<String>) -> Self {
        CopyConfig {
            name: name.into(),
            url: url.into(),
        }
    }
}

/// Where one copy stands.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CopyStatus {
    /// The copy.
    pub name: String,
    /// Whether it holds the primary role.
    pub primary: bool,
    /// The highest seq it has applied (or passed).
    pub applied: u64,
    /// Why it is quarantined, if it is.
    pub diverged: Option<String>,
}

struct Copy {
    name: String,
    db: DatabaseConnection,
    applied: AtomicU64,
    diverged: Mutex<Option<String>>,
    /// Consecutive failed health checks.
    misses: AtomicU32,
}

impl Copy {
    fn healthy(&self, retries: u32) -> bool {
        self.misses.load(Ordering::Acquire) < retries
    }
}

/// How the group watches its copies: a cheap query every `interval`, answered within
/// `timeout`; a copy that misses `retries` in a row is unavailable, and an unavailable
/// primary hands its role to the most caught-up available copy.
#[derive(Debug, Clone, Copy)]
pub struct Supervision {
    /// Between health checks.
    pub interval: Duration,
    /// For one health check.
    pub timeout: Duration,
    /// Consecutive misses before a copy is unavailable.
    pub retries: u32,
}

impl Default for Supervision {
    fn default() -> Self {
        Supervision {
            interval: Duration::from_millis(200),
            timeout: Duration::from_secs(1),
            retries: 3,
        }
    }
}

/// The primary role: who leads, in which term (one value, read together).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct Role {
    epoch: u64,
    primary: usize,
}

impl Copy {
    fn diverged(&self) -> Option<String> {
        self.diverged.lock().ok().and_then(|d| d.clone())
    }
}

/// The write slot's state: what the next record extends.
struct Writer {
    /// The journal's head.
    head: u64,
    /// The running hash after the last executed record.
    hash: String,
    /// A record appended but not sealed (its commit's outcome not yet known).
    unsealed: Option<Record>,
}

/// A running replayer: its copy's index, its stop, its task.
type Running = (usize, watch::Sender<bool>, JoinHandle<ReplayExit>);

struct Inner {
    group: String,
    dialect: Dialect,
    backend: DbBackend,
    copies: Vec<Arc<Copy>>,
    journal: Arc<dyn Journal>,
    /// Lock order: the write slot (`writer`), then `role`, then `replayers`; the last two
    /// are short `std` locks never held across an await.
    role: std::sync::RwLock<Role>,
    supervision: Supervision,
    writer: Arc<tokio::sync::Mutex<Writer>>,
    sealed: watch::Sender<u64>,
    stop: watch::Sender<bool>,
    next_read: AtomicUsize,
    /// The running replayers, by copy index, each with its own stop.
    replayers: Mutex<Vec<Running>>,
    supervisor: Mutex<Option<JoinHandle<()>>>,
}

/// A sea-orm connection over a redundancy group of database copies. Cheap to clone.
///
/// Use it wherever a `DatabaseConnection` was used: it implements [`ConnectionTrait`] and
/// [`TransactionTrait`], so entities, query builders and `transaction(...)` work unchanged.
#[derive(Clone)]
pub struct SqlGroup {
    inner: Arc<Inner>,
}

impl std::fmt::Debug for SqlGroup {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SqlGroup")
            .field("group", &self.inner.group)
            .field("dialect", &self.inner.dialect)
            .finish_non_exhaustive()
    }
}

/// Connects to one copy: SQLite files are created, in WAL mode with a busy time-out.
pub async fn connect_copy(url: &str) -> Result<DatabaseConnection, DbErr> {
    let mut opts = ConnectOptions::new(url.to_owned());
    opts.sqlx_logging(false)
        .connect_timeout(Duration::from_secs(5))
        // Short: a copy that does not answer must not hold the write slot long.
        .acquire_timeout(Duration::from_secs(3))
        .max_connections(if url.starts_with("sqlite") { 4 } else { 8 })
        // SQLite: no ping (a round trip to the connection's worker thread) before each use;
        // an open database file has no far end that could hang up.
        .test_before_acquire(!url.starts_with("sqlite"))
        .map_sqlx_sqlite_opts(|o| {
            o.create_if_missing(true)
                .journal_mode(sea_orm::sqlx::sqlite::SqliteJournalMode::Wal)
                .busy_timeout(Duration::from_secs(10))
        });
    Database::connect(opts).await
}

/// How long a write waits for the group's write slot.
const WRITE_SLOT_WAIT: Duration = Duration::from_secs(60);

/// How long a seal is retried before the record is left for the next write to settle.
const SEAL_ATTEMPTS: u32 = 5;

impl SqlGroup {
    /// Opens group `group` over `copies` (the first is the primary of a new group), with
    /// `journal`. Settles a record left in doubt by the primary's checkpoint row and starts
    /// a replayer for every other copy.
    pub async fn open(
        group: &str,
        copies: &[CopyConfig],
        journal: Arc<dyn Journal>,
    ) -> Result<Self, OpenError> {
        Self::open_with(group, copies, journal, Supervision::default()).await
    }

    /// [`SqlGroup::open`] with a choice of supervision.
    pub async fn open_with(
        group: &str,
        copies: &[CopyConfig],
        journal: Arc<dyn Journal>,
        supervision: Supervision,
    ) -> Result<Self, OpenError> {
        let Some(first) = copies.first() else {
            return Err(OpenError::Config(format!("group {group:?} has no copies")));
        };
        let mut opened = Vec::new();
        for c in copies {
            if opened.iter().any(|o: &Arc<Copy>| o.name == c.name) {
                return Err(OpenError::Config(format!(
                    "group {group:?} names copy {:?} twice",
                    c.name
                )));
            }
            let err = |source| OpenError::Copy {
                copy: c.name.clone(),
                source,
            };
            let db = connect_copy(&c.url).await.map_err(err)?;
            checkpoint::ensure(&db, group).await.map_err(err)?;
            let at = checkpoint::read(&db, group).await.map_err(err)?;
            opened.push(Arc::new(Copy {
                name: c.name.clone(),
                db,
                applied: AtomicU64::new(at.seq),
                diverged: Mutex::new(None),
                misses: AtomicU32::new(0),
            }));
        }
        let backend = opened[0].db.get_database_backend();
        if opened
            .iter()
            .any(|c| c.db.get_database_backend() != backend)
        {
            return Err(OpenError::Config(format!(
                "group {group:?} mixes database backends: its copies must all be one kind"
            )));
        }
        let dialect = match backend {
            DbBackend::Sqlite => Dialect::Sqlite,
            DbBackend::Postgres => Dialect::Postgres,
            DbBackend::MySql => Dialect::Mysql,
            #[allow(unreachable_patterns)]
            _ => return Err(OpenError::Config("unsupported database backend".into())),
        };
        let state = journal.open_group(group, &first.name).await?;
        let Some(primary) = opened.iter().position(|c| c.name == state.role.primary) else {
            return Err(OpenError::Config(format!(
                "the journal names {:?} primary of group {group:?}, which is not among its copies",
                state.role.primary
            )));
        };
        let pc = opened[primary].clone();
        let err = |source| OpenError::Copy {
            copy: pc.name.clone(),
            source,
        };
        // Records left unsealed are settled by the primary's own row.
        let at = checkpoint::read(&pc.db, group).await.map_err(err)?;
        for r in &state.log.unsealed {
            let outcome = if at.seq >= r.seq {
                Outcome::Executed(Some(record_fingerprint(r)))
            } else {
                Outcome::Skipped
            };
            tracing::info!(
                group,
                seq = r.seq,
                ?outcome,
                "settling a SQL record left in doubt by the primary's checkpoint row"
            );
            journal.seal(group, r.seq, &outcome).await?;
        }
        pc.applied.store(state.log.head, Ordering::Release);
        let (sealed, _) = watch::channel(state.log.head);
        let (stop, _) = watch::channel(false);
        let inner = Arc::new(Inner {
            group: group.to_owned(),
            dialect,
            backend,
            copies: opened,
            journal,
            role: std::sync::RwLock::new(Role {
                epoch: state.role.epoch,
                primary,
            }),
            supervision,
            writer: Arc::new(tokio::sync::Mutex::new(Writer {
                head: state.log.head,
                hash: at.hash,
                unsealed: None,
            })),
            sealed,
            stop,
            next_read: AtomicUsize::new(0),
            replayers: Mutex::new(Vec::new()),
            supervisor: Mutex::new(None),
        });
        let group = SqlGroup { inner };
        for n in 0..group.inner.copies.len() {
            if n != primary {
                group.start_replayer(n);
            }
        }
        let weak = Arc::downgrade(&group.inner);
        let task = tokio::spawn(supervise(weak, group.inner.stop.subscribe()));
        if let Ok(mut s) = group.inner.supervisor.lock() {
            *s = Some(task);
        }
        Ok(group)
    }

    fn start_replayer(&self, n: usize) {
        let i = &self.inner;
        let copy = &i.copies[n];
        let applier = Arc::new(CopyApplier::new(&i.group, &copy.name, copy.db.clone()));
        let replayer = Replayer::new(&i.group, &copy.name, i.journal.clone(), applier);
        let observer = Arc::new(Observe(copy.clone()));
        let (stop, stopped) = watch::channel(false);
        let task = tokio::spawn(replayer.run(i.sealed.subscribe(), stopped, observer));
        if let Ok(mut r) = i.replayers.lock() {
            r.push((n, stop, task));
        }
    }

    /// Stops copy `n`'s replayer and waits for it.
    async fn stop_replayer(&self, n: usize) {
        let found = match self.inner.replayers.lock() {
            Ok(mut r) => r
                .iter()
                .position(|(m, _, _)| *m == n)
                .map(|at| r.remove(at)),
            Err(_) => None,
        };
        if let Some((_, stop, task)) = found {
            let _ = stop.send(true);
            let _ = task.await;
        }
    }

    fn role(&self) -> Role {
        match self.inner.role.read() {
            Ok(r) => *r,
            Err(p) => *p.into_inner(),
        }
    }

    /// The copy holding the primary role and the epoch it holds it in.
    pub fn primary_name(&self) -> (String, u64) {
        let r = self.role();
        (self.inner.copies[r.primary].name.clone(), r.epoch)
    }

    /// The group's name.
    pub fn name(&self) -> &str {
        &self.inner.group
    }

    /// The highest seq up to which every record is sealed.
    pub fn sealed(&self) -> u64 {
        *self.inner.sealed.borrow()
    }

    /// Where every copy stands.
    pub fn status(&self) -> Vec<CopyStatus> {
        let i = &self.inner;
        i.copies
            .iter()
            .enumerate()
            .map(|(n, c)| CopyStatus {
                name: c.name.clone(),
                primary: n == self.role().primary,
                applied: c.applied.load(Ordering::Acquire),
                diverged: c.diverged(),
            })
            .collect()
    }

    /// Waits until every copy that is not quarantined has applied everything sealed;
    /// false when `timeout` passed first.
    pub async fn wait_caught_up(&self, timeout: Duration) -> bool {
        let deadline = tokio::time::Instant::now() + timeout;
        loop {
            let sealed = self.sealed();
            if self
                .inner
                .copies
                .iter()
                .all(|c| c.diverged().is_some() || c.applied.load(Ordering::Acquire) >= sealed)
            {
                return true;
            }
            if tokio::time::Instant::now() >= deadline {
                return false;
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    }

    /// The underlying connection of copy `name` (for checks and tools: writing through it
    /// bypasses the journal).
    pub fn copy_connection(&self, name: &str) -> Option<&DatabaseConnection> {
        self.inner
            .copies
            .iter()
            .find(|c| c.name == name)
            .map(|c| &c.db)
    }

    /// Stops the replayers and waits for them.
    pub async fn close(&self) {
        let _ = self.inner.stop.send(true);
        let tasks: Vec<_> = match self.inner.replayers.lock() {
            Ok(mut r) => r.drain(..).collect(),
            Err(_) => Vec::new(),
        };
        for (_, stop, t) in tasks {
            let _ = stop.send(true);
            let _ = t.await;
        }
        let supervisor = self.inner.supervisor.lock().ok().and_then(|mut s| s.take());
        if let Some(t) = supervisor {
            let _ = t.await;
        }
    }

    fn primary(&self) -> &Arc<Copy> {
        &self.inner.copies[self.role().primary]
    }

    /// A copy for a read: round-robin over the caught-up copies that are not quarantined;
    /// the primary when there is none.
    fn read_copy(&self) -> &Arc<Copy> {
        let i = &self.inner;
        let sealed = self.sealed();
        let ready: Vec<&Arc<Copy>> = i
            .copies
            .iter()
            .filter(|c| {
                c.applied.load(Ordering::Acquire) >= sealed
                    && c.diverged().is_none()
                    && c.healthy(i.supervision.retries)
            })
            .collect();
        if ready.is_empty() {
            return self.primary();
        }
        let n = i.next_read.fetch_add(1, Ordering::Relaxed);
        ready[n % ready.len()]
    }

    async fn begin_txn(&self, options: TransactionOptions) -> Result<SqlTransaction, DbErr> {
        // Bounded: a write through the group while the same task holds an open transaction
        // would otherwise wait for itself forever.
        let slot = tokio::time::timeout(WRITE_SLOT_WAIT, self.inner.writer.clone().lock_owned())
            .await
            .map_err(|_| {
                DbErr::Custom(format!(
                    "group {:?}: no write slot within {} s (another write transaction is open: inside a transaction, write through it, not through the group)",
                    self.inner.group,
                    WRITE_SLOT_WAIT.as_secs()
                ))
            })?;
        let primary = self.primary().clone();
        let txn = primary.db.begin_with_options(options).await?;
        let prelude = match self.inner.backend {
            DbBackend::Postgres => sequence_positions(&txn).await?,
            _ => Vec::new(),
        };
        let txn_id = Uuid::now_v7();
        let now = OffsetDateTime::now_utc();
        let timestamp = now.replace_microsecond(now.microsecond()).unwrap_or(now);
        Ok(SqlTransaction {
            group: self.clone(),
            txn,
            slot: Some(slot),
            parent: None,
            txn_id,
            timestamp,
            state: Arc::new(Mutex::new(TxnState {
                statements: Vec::new(),
                prelude,
                fixed: Fixed::new(timestamp, txn_id),
            })),
        })
    }

    /// A statement outside a transaction: a read goes to a balanced copy, anything else
    /// runs as its own write transaction.
    async fn autocommit<T, F>(&self, sql: &str, read: F, write: F) -> Result<T, DbErr>
    where
        F: AsyncOp<T>,
    {
        let class = analyze(self.inner.dialect, sql, &mut Fixed::for_test()).class;
        if class == Class::Read {
            return read.run_on(&self.read_copy().db).await;
        }
        let txn = self.begin_txn(TransactionOptions::default()).await?;
        match write.run_in(&txn).await {
            Ok(v) => {
                txn.commit().await?;
                Ok(v)
            }
            Err(e) => {
                let _ = txn.rollback().await;
                Err(e)
            }
        }
    }
}

/// One operation run either on a copy's connection (reads) or in a write transaction.
enum Op {
    Execute(Statement),
    Unprepared(String),
    QueryOne(Statement),
    QueryAll(Statement),
}

trait AsyncOp<T>: Send {
    fn run_on<'a>(
        self,
        db: &'a DatabaseConnection,
    ) -> Pin<Box<dyn Future<Output = Result<T, DbErr>> + Send + 'a>>;
    fn run_in<'a>(
        self,
        txn: &'a SqlTransaction,
    ) -> Pin<Box<dyn Future<Output = Result<T, DbErr>> + Send + 'a>>;
}

macro_rules! op_impl {
    ($t:ty, $variant:ident, $method:ident) => {
        impl AsyncOp<$t> for Op {
            fn run_on<'a>(
                self,
                db: &'a DatabaseConnection,
            ) -> Pin<Box<dyn Future<Output = Result<$t, DbErr>> + Send + 'a>> {
                Box::pin(async move {
                    match self {
                        Op::$variant(s) => db.$method(s).await,
                        _ => Err(DbErr::Custom("internal: mismatched operation".into())),
                    }
                })
            }
            fn run_in<'a>(
                self,
                txn: &'a SqlTransaction,
            ) -> Pin<Box<dyn Future<Output = Result<$t, DbErr>> + Send + 'a>> {
                Box::pin(async move {
                    match self {
                        Op::$variant(s) => txn.$method(s).await,
                        _ => Err(DbErr::Custom("internal: mismatched operation".into())),
                    }
                })
            }
        }
    };
}

/// `execute_raw` and `execute_unprepared` share a result type: one impl for both.
impl AsyncOp<ExecResult> for Op {
    fn run_on<'a>(
        self,
        db: &'a DatabaseConnection,
    ) -> Pin<Box<dyn Future<Output = Result<ExecResult, DbErr>> + Send + 'a>> {
        Box::pin(async move {
            match self {
                Op::Execute(s) => db.execute_raw(s).await,
                Op::Unprepared(s) => db.execute_unprepared(&s).await,
                _ => Err(DbErr::Custom("internal: mismatched operation".into())),
            }
        })
    }
    fn run_in<'a>(
        self,
        txn: &'a SqlTransaction,
    ) -> Pin<Box<dyn Future<Output = Result<ExecResult, DbErr>> + Send + 'a>> {
        Box::pin(async move {
            match self {
                Op::Execute(s) => txn.execute_raw(s).await,
                Op::Unprepared(s) => txn.execute_unprepared(&s).await,
                _ => Err(DbErr::Custom("internal: mismatched operation".into())),
            }
        })
    }
}

op_impl!(Option<QueryResult>, QueryOne, query_one_raw);
op_impl!(Vec<QueryResult>, QueryAll, query_all_raw);

#[async_trait::async_trait]
impl ConnectionTrait for SqlGroup {
    fn get_database_backend(&self) -> DbBackend {
        self.inner.backend
    }

    async fn execute_raw(&self, stmt: Statement) -> Result<ExecResult, DbErr> {
        let sql = stmt.sql.clone();
        self.autocommit(&sql, Op::Execute(stmt.clone()), Op::Execute(stmt))
            .await
    }

    async fn execute_unprepared(&self, sql: &str) -> Result<ExecResult, DbErr> {
        self.autocommit(
            sql,
            Op::Unprepared(sql.to_owned()),
            Op::Unprepared(sql.to_owned()),
        )
        .await
    }

    async fn query_one_raw(&self, stmt: Statement) -> Result<Option<QueryResult>, DbErr> {
        let sql = stmt.sql.clone();
        self.autocommit(&sql, Op::QueryOne(stmt.clone()), Op::QueryOne(stmt))
            .await
    }

    async fn query_all_raw(&self, stmt: Statement) -> Result<Vec<QueryResult>, DbErr> {
        let sql = stmt.sql.clone();
        self.autocommit(&sql, Op::QueryAll(stmt.clone()), Op::QueryAll(stmt))
            .await
    }
}

#[async_trait::async_trait]
impl TransactionTrait for SqlGroup {
    type Transaction = SqlTransaction;

    async fn begin(&self) -> Result<SqlTransaction, DbErr> {
        self.begin_txn(TransactionOptions::default()).await
    }

    async fn begin_with_config(
        &self,
        isolation_level: Option<IsolationLevel>,
        access_mode: Option<AccessMode>,
    ) -> Result<SqlTransaction, DbErr> {
        self.begin_txn(TransactionOptions {
            isolation_level,
            access_mode,
            ..Default::default()
        })
        .await
    }

    async fn begin_with_options(
        &self,
        options: TransactionOptions,
    ) -> Result<SqlTransaction, DbErr> {
        self.begin_txn(options).await
    }

    async fn transaction<F, T, E>(&self, callback: F) -> Result<T, TransactionError<E>>
    where
        F: for<'c> FnOnce(
                &'c SqlTransaction,
            ) -> Pin<Box<dyn Future<Output = Result<T, E>> + Send + 'c>>
            + Send,
        T: Send,
        E: std::fmt::Display + std::fmt::Debug + Send,
    {
        self.transaction_with_config(callback, None, None).await
    }

    async fn transaction_with_config<F, T, E>(
        &self,
        callback: F,
        isolation_level: Option<IsolationLevel>,
        access_mode: Option<AccessMode>,
    ) -> Result<T, TransactionError<E>>
    where
        F: for<'c> FnOnce(
                &'c SqlTransaction,
            ) -> Pin<Box<dyn Future<Output = Result<T, E>> + Send + 'c>>
            + Send,
        T: Send,
        E: std::fmt::Display + std::fmt::Debug + Send,
    {
        let txn = self
            .begin_with_config(isolation_level, access_mode)
            .await
            .map_err(TransactionError::Connection)?;
        match callback(&txn).await {
            Ok(v) => {
                txn.commit().await.map_err(TransactionError::Connection)?;
                Ok(v)
            }
            Err(e) => {
                txn.rollback().await.map_err(TransactionError::Connection)?;
                Err(TransactionError::Transaction(e))
            }
        }
    }
}

struct TxnState {
    statements: Vec<SqlStatement>,
    /// Journaled before the statements when there are any: the primary's sequence
    /// positions as the transaction began (PostgreSQL sequences are not transactional, so
    /// a rolled-back insert on one copy would otherwise shift every later id).
    prelude: Vec<SqlStatement>,
    fixed: Fixed,
}

/// A write transaction on the group's primary copy; journaled as one record on commit.
/// It holds the group's write slot until it ends. Dropped without `commit`, it rolls back
/// and nothing is journaled.
pub struct SqlTransaction {
    group: SqlGroup,
    txn: DatabaseTransaction,
    /// The write slot (top level); `None` in a nested transaction, whose parent holds it.
    slot: Option<OwnedMutexGuard<Writer>>,
    /// A nested transaction's parent's state: its statements join the parent's on commit.
    parent: Option<Arc<Mutex<TxnState>>>,
    txn_id: Uuid,
    timestamp: OffsetDateTime,
    state: Arc<Mutex<TxnState>>,
}

impl std::fmt::Debug for SqlTransaction {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SqlTransaction")
            .field("group", &self.group.inner.group)
            .field("txn_id", &self.txn_id)
            .finish_non_exhaustive()
    }
}

/// The error of a refused statement: it names the reason and the statement.
fn refused(why: &str) -> DbErr {
    DbErr::Custom(format!("regroup SQL mode refuses: {why}"))
}

/// What to do with one statement of a transaction.
enum Plan {
    /// A read: run as given, not journaled.
    Read,
    /// Run this text (rewritten when something was fixed) and journal it; `true` when its
    /// affected-row count means something (a row change: SQLite reports a stale count for
    /// DDL and utilities), so replays compare it.
    Journal(String, bool),
}

impl SqlTransaction {
    fn plan(&self, sql: &str) -> Result<Plan, DbErr> {
        let mut state = self
            .state
            .lock()
            .map_err(|_| DbErr::Custom("transaction state poisoned".into()))?;
        let a = analyze(self.group.inner.dialect, sql, &mut state.fixed);
        match a.class {
            Class::Read => Ok(Plan::Read),
            Class::Txn => Err(refused(&format!(
                "transaction control through SQL (`{}`): use begin, commit and rollback",
                sql.trim()
            ))),
            _ => match a.refusal {
                Some(why) => {
                    tracing::warn!(group = %self.group.inner.group, %why, "statement refused");
                    Err(refused(&why))
                }
                None => Ok(Plan::Journal(
                    a.effective(sql).to_owned(),
                    a.class == Class::Write,
                )),
            },
        }
    }

    fn journal_values(stmt: &Statement) -> Result<Vec<regroup_replay::SqlValue>, DbErr> {
        if stmt.db_backend == DbBackend::Sqlite
            && let Some(values) = &stmt.values
            && sqlite_now_bound(&stmt.sql, &values.0)
        {
            return Err(refused(&format!(
                "a bound value 'now' may reach SQLite's date and time functions, which read the clock on each copy: bind the time itself, in statement `{}`",
                stmt.sql
            )));
        }
        match &stmt.values {
            None => Ok(Vec::new()),
            Some(values) => values
                .0
                .iter()
                .map(|v| to_journal(v).map_err(|e| refused(&format!("{e} (`{}`)", stmt.sql))))
                .collect(),
        }
    }

    fn keep(&self, sql: String, values: Vec<regroup_replay::SqlValue>, rows: Option<u64>) {
        if let Ok(mut s) = self.state.lock() {
            s.statements.push(SqlStatement {
                sql,
                values,
                rows_affected: rows,
            });
        }
    }

    fn rewritten(&self, stmt: &Statement, sql: String) -> Statement {
        Statement {
            sql,
            values: stmt.values.clone(),
            db_backend: stmt.db_backend,
        }
    }

    /// Commits: journals the transaction as one record (see the module docs).
    async fn finish(self) -> Result<(), DbErr> {
        let SqlTransaction {
            group,
            txn,
            slot,
            parent,
            txn_id,
            timestamp,
            state,
        } = self;
        let poisoned = || DbErr::Custom("transaction state poisoned".into());
        let mut own = std::mem::replace(
            &mut *state.lock().map_err(|_| poisoned())?,
            TxnState {
                statements: Vec::new(),
                prelude: Vec::new(),
                fixed: Fixed::new(timestamp, txn_id),
            },
        );
        if let Some(parent) = parent {
            // A savepoint released: its statements become the parent's.
            txn.commit().await?;
            parent
                .lock()
                .map_err(|_| poisoned())?
                .statements
                .append(&mut own.statements);
            return Ok(());
        }
        let Some(mut slot) = slot else {
            return Err(DbErr::Custom(
                "internal: a top-level transaction without the write slot".into(),
            ));
        };
        let statements = if own.statements.is_empty() {
            Vec::new()
        } else {
            own.prelude.append(&mut own.statements);
            own.prelude
        };
        if statements.is_empty() {
            // Read only: nothing to journal.
            return txn.commit().await;
        }
        let i = &group.inner;
        // A record whose commit outcome was not known is settled before anything else.
        group.settle(&mut slot).await?;
        let seq = slot.head + 1;
        let hash = checkpoint::chain(&slot.hash, &statements);
        let primary = group.primary().clone();
        if !checkpoint::advance(&txn, &i.group, seq, &hash, &txn_id.to_string()).await? {
            return Err(DbErr::Custom(format!(
                "the primary copy {:?} already stands at or past seq {seq}: it is not the copy the journal thinks it is",
                primary.name
            )));
        }
        let record = Record {
            group: i.group.clone(),
            seq,
            txn_id,
            epoch: group.role().epoch,
            timestamp,
            payload: Payload::Sql(JournaledTransaction {
                dialect: i.dialect.as_str().to_owned(),
                statements,
                hash: hash.clone(),
            }),
            state: RecordState::Pending,
            fingerprint: None,
            executors: vec![primary.name.clone()],
        };
        // Write-ahead: durable before the primary commits.
        i.journal
            .append(&record)
            .await
            .map_err(|e| DbErr::Custom(format!("journal: {e}")))?;
        slot.head = seq;
        let committed = txn.commit().await;
        let outcome = match &committed {
            Ok(()) => Some(true),
            // The commit's answer is lost or it failed: the primary's row tells.
            Err(_) => checkpoint::read(&primary.db, &i.group)
                .await
                .ok()
                .map(|at| at.seq >= seq),
        };
        match outcome {
            Some(true) => {
                slot.hash = hash;
                group.seal(&mut slot, record, true).await;
                Ok(())
            }
            Some(false) => {
                group.seal(&mut slot, record, false).await;
                committed
            }
            None => {
                tracing::warn!(group = %i.group, seq, "commit outcome unknown; settled by the primary's checkpoint row before the next write");
                slot.unsealed = Some(record);
                Err(DbErr::Custom(format!(
                    "the commit of seq {seq} is in doubt: the primary copy {:?} did not answer; the next write settles it",
                    primary.name
                )))
            }
        }
    }
}

impl SqlGroup {
    /// Seals `record` (executed or skipped), retrying a while; left unsealed for the next
    /// write when the journal stays unavailable.
    async fn seal(&self, slot: &mut Writer, record: Record, executed: bool) {
        let i = &self.inner;
        let outcome = if executed {
            Outcome::Executed(Some(record_fingerprint(&record)))
        } else {
            Outcome::Skipped
        };
        for attempt in 1..=SEAL_ATTEMPTS {
            match i.journal.seal(&i.group, record.seq, &outcome).await {
                Ok(()) => {
                    if executed {
                        self.primary().applied.store(record.seq, Ordering::Release);
                    }
                    let _ = i.sealed.send(record.seq);
                    return;
                }
                Err(e) => {
                    tracing::warn!(group = %i.group, seq = record.seq, attempt, error = %e, "seal failed");
                    tokio::time::sleep(Duration::from_millis(20 * u64::from(attempt))).await;
                }
            }
        }
        slot.unsealed = Some(record);
    }

    /// Settles the record left unsealed by an earlier commit, from the primary's row.
    async fn settle(&self, slot: &mut Writer) -> Result<(), DbErr> {
        let Some(record) = slot.unsealed.take() else {
            return Ok(());
        };
        let i = &self.inner;
        let at = match checkpoint::read(&self.primary().db, &i.group).await {
            Ok(at) => at,
            Err(e) => {
                slot.unsealed = Some(record);
                return Err(e);
            }
        };
        let executed = at.seq >= record.seq;
        if executed {
            slot.hash = at.hash;
        }
        let seq = record.seq;
        self.seal(slot, record, executed).await;
        if slot.unsealed.is_some() {
            return Err(DbErr::Custom(format!(
                "record {seq} of group {:?} cannot be sealed: the journal is unavailable",
                i.group
            )));
        }
        Ok(())
    }
}

/// Whether a statement calling SQLite's date and time functions binds the text `'now'`
/// (which those functions read as the clock): checked coarsely, failing closed.
fn sqlite_now_bound(sql: &str, values: &[sea_orm::Value]) -> bool {
    let binds_now = values.iter().any(
        |v| matches!(v, sea_orm::Value::String(Some(s)) if s.trim().eq_ignore_ascii_case("now")),
    );
    if !binds_now {
        return false;
    }
    let sql = sql.to_ascii_lowercase();
    [
        "date",
        "time",
        "julianday",
        "unixepoch",
        "strftime",
        "timediff",
    ]
    .iter()
    .any(|f| sql.contains(&format!("{f}(")) || sql.contains(&format!("{f} (")))
}

/// `setval` statements that put every sequence where it stands on the primary now.
async fn sequence_positions(txn: &DatabaseTransaction) -> Result<Vec<SqlStatement>, DbErr> {
    let rows = txn
        .query_all_raw(Statement::from_string(
            DbBackend::Postgres,
            "SELECT format('%I.%I', schemaname, sequencename) AS name, \
             COALESCE(last_value, start_value) AS v, last_value IS NOT NULL AS called \
             FROM pg_sequences ORDER BY 1",
        ))
        .await?;
    let mut out = Vec::new();
    for r in rows {
        let name: String = r.try_get("", "name")?;
        let v: i64 = r.try_get("", "v")?;
        let called: bool = r.try_get("", "called")?;
        out.push(SqlStatement {
            sql: "SELECT setval(CAST($1 AS regclass), $2, $3)".to_owned(),
            values: vec![
                regroup_replay::SqlValue::String(Some(name)),
                regroup_replay::SqlValue::BigInt(Some(v)),
                regroup_replay::SqlValue::Bool(Some(called)),
            ],
            rows_affected: None,
        });
    }
    Ok(out)
}

/// The fingerprint the primary's execution of a SQL record has: its affected-row counts.
fn record_fingerprint(record: &Record) -> regroup_replay::Fingerprint {
    let counts: Vec<Option<u64>> = match &record.payload {
        Payload::Sql(t) => t.statements.iter().map(|s| s.rows_affected).collect(),
        Payload::Http(_) => Vec::new(),
    };
    checkpoint::fingerprint(&counts)
}

#[async_trait::async_trait]
impl ConnectionTrait for SqlTransaction {
    fn get_database_backend(&self) -> DbBackend {
        self.group.inner.backend
    }

    async fn execute_raw(&self, stmt: Statement) -> Result<ExecResult, DbErr> {
        match self.plan(&stmt.sql)? {
            Plan::Read => self.txn.execute_raw(stmt).await,
            Plan::Journal(sql, counted) => {
                let values = Self::journal_values(&stmt)?;
                let r = self
                    .txn
                    .execute_raw(self.rewritten(&stmt, sql.clone()))
                    .await?;
                // Journaled without values, a statement replays through
                // `execute_unprepared`: the same for a statement that binds nothing.
                self.keep(sql, values, counted.then(|| r.rows_affected()));
                Ok(r)
            }
        }
    }

    async fn execute_unprepared(&self, sql: &str) -> Result<ExecResult, DbErr> {
        match self.plan(sql)? {
            Plan::Read => self.txn.execute_unprepared(sql).await,
            Plan::Journal(text, counted) => {
                let r = self.txn.execute_unprepared(&text).await?;
                self.keep(text, Vec::new(), counted.then(|| r.rows_affected()));
                Ok(r)
            }
        }
    }

    async fn query_one_raw(&self, stmt: Statement) -> Result<Option<QueryResult>, DbErr> {
        match self.plan(&stmt.sql)? {
            Plan::Read => self.txn.query_one_raw(stmt).await,
            Plan::Journal(sql, _) => {
                let values = Self::journal_values(&stmt)?;
                let r = self
                    .txn
                    .query_one_raw(self.rewritten(&stmt, sql.clone()))
                    .await?;
                self.keep(sql, values, None);
                Ok(r)
            }
        }
    }

    async fn query_all_raw(&self, stmt: Statement) -> Result<Vec<QueryResult>, DbErr> {
        match self.plan(&stmt.sql)? {
            Plan::Read => self.txn.query_all_raw(stmt).await,
            Plan::Journal(sql, _) => {
                let values = Self::journal_values(&stmt)?;
                let r = self
                    .txn
                    .query_all_raw(self.rewritten(&stmt, sql.clone()))
                    .await?;
                self.keep(sql, values, None);
                Ok(r)
            }
        }
    }
}

#[async_trait::async_trait]
impl TransactionSession for SqlTransaction {
    async fn commit(self) -> Result<(), DbErr> {
        self.finish().await
    }

    async fn rollback(self) -> Result<(), DbErr> {
        self.txn.rollback().await
    }
}

impl SqlTransaction {
    /// A nested transaction: a savepoint on the same database transaction.
    async fn nest(&self, txn: DatabaseTransaction) -> SqlTransaction {
        SqlTransaction {
            group: self.group.clone(),
            txn,
            slot: None,
            parent: Some(self.state.clone()),
            txn_id: self.txn_id,
            timestamp: self.timestamp,
            state: Arc::new(Mutex::new(TxnState {
                statements: Vec::new(),
                prelude: Vec::new(),
                fixed: Fixed::new(self.timestamp, Uuid::now_v7()),
            })),
        }
    }
}

#[async_trait::async_trait]
impl TransactionTrait for SqlTransaction {
    type Transaction = SqlTransaction;

    async fn begin(&self) -> Result<SqlTransaction, DbErr> {
        let txn = self.txn.begin().await?;
        Ok(self.nest(txn).await)
    }

    async fn begin_with_config(
        &self,
        isolation_level: Option<IsolationLevel>,
        access_mode: Option<AccessMode>,
    ) -> Result<SqlTransaction, DbErr> {
        let txn = self
            .txn
            .begin_with_config(isolation_level, access_mode)
            .await?;
        Ok(self.nest(txn).await)
    }

    async fn begin_with_options(
        &self,
        options: TransactionOptions,
    ) -> Result<SqlTransaction, DbErr> {
        let txn = self.txn.begin_with_options(options).await?;
        Ok(self.nest(txn).await)
    }

    async fn transaction<F, T, E>(&self, callback: F) -> Result<T, TransactionError<E>>
    where
        F: for<'c> FnOnce(
                &'c SqlTransaction,
            ) -> Pin<Box<dyn Future<Output = Result<T, E>> + Send + 'c>>
            + Send,
        T: Send,
        E: std::fmt::Display + std::fmt::Debug + Send,
    {
        self.transaction_with_config(callback, None, None).await
    }

    async fn transaction_with_config<F, T, E>(
        &self,
        callback: F,
        isolation_level: Option<IsolationLevel>,
        access_mode: Option<AccessMode>,
    ) -> Result<T, TransactionError<E>>
    where
        F: for<'c> FnOnce(
                &'c SqlTransaction,
            ) -> Pin<Box<dyn Future<Output = Result<T, E>> + Send + 'c>>
            + Send,
        T: Send,
        E: std::fmt::Display + std::fmt::Debug + Send,
    {
        let txn = self
            .begin_with_config(isolation_level, access_mode)
            .await
            .map_err(TransactionError::Connection)?;
        match callback(&txn).await {
            Ok(v) => {
                txn.commit().await.map_err(TransactionError::Connection)?;
                Ok(v)
            }
            Err(e) => {
                txn.rollback().await.map_err(TransactionError::Connection)?;
                Err(TransactionError::Transaction(e))
            }
        }
    }
}

/// Keeps a copy's standing as its replayer reports it.
struct Observe(Arc<Copy>);

impl ReplayObserver for Observe {
    fn applied(&self, seq: u64) {
        self.0.applied.store(seq, Ordering::Release);
    }

    fn apply_failed(&self, seq: u64, attempt: u32, error: &regroup_replay::ApplyError) {
        if attempt == 1 || attempt.is_multiple_of(20) {
            tracing::warn!(copy = %self.0.name, seq, attempt, %error, "replay on a copy failed; retrying");
        }
    }

    fn diverged(&self, seq: u64, reason: &str) {
        tracing::error!(copy = %self.0.name, seq, reason, "copy diverged: quarantined");
        if let Ok(mut d) = self.0.diverged.lock() {
            *d = Some(reason.to_owned());
        }
    }
}

/// Checks every copy's health every interval; hands the primary role over when the
/// primary is unavailable. Ends when the group is closed or dropped.
async fn supervise(inner: std::sync::Weak<Inner>, mut stop: watch::Receiver<bool>) {
    loop {
        let Some(i) = inner.upgrade() else { return };
        let sup = i.supervision;
        let checks = i.copies.iter().map(|c| {
            let c = c.clone();
            async move {
                let ok = matches!(
                    tokio::time::timeout(sup.timeout, c.db.execute_unprepared("SELECT 1")).await,
                    Ok(Ok(_))
                );
                let before = c.misses.load(Ordering::Acquire);
                if ok {
                    if before >= sup.retries {
                        tracing::info!(copy = %c.name, "copy answers again");
                    }
                    c.misses.store(0, Ordering::Release);
                } else {
                    let now = c.misses.fetch_add(1, Ordering::AcqRel) + 1;
                    if now == sup.retries {
                        tracing::warn!(copy = %c.name, misses = now, "copy unavailable");
                    }
                }
            }
        });
        futures_util::future::join_all(checks).await;
        let group = SqlGroup { inner: i };
        let primary = group.primary().clone();
        if !primary.healthy(sup.retries) {
            group.fail_over().await;
        }
        drop(group);
        tokio::select! {
            _ = tokio::time::sleep(sup.interval) => {}
            _ = stop.changed() => return,
        }
    }
}

impl SqlGroup {
    /// Moves the primary role from an unavailable primary to the most caught-up available
    /// copy (ties: the first in the group's order). Under the write slot, so no write
    /// transaction runs meanwhile (they wait). A record whose commit is in doubt is applied
    /// on the new primary (exactly once by its checkpoint row) and sealed executed: the old
    /// primary, when it comes back, skips it by its own row if it committed it, or replays
    /// it if it did not.
    async fn fail_over(&self) {
        let i = &self.inner;
        let retries = i.supervision.retries;
        let mut slot = i.writer.clone().lock_owned().await;
        let role = self.role();
        let old = i.copies[role.primary].clone();
        if old.healthy(retries) {
            return;
        }
        let sealed = self.sealed();
        let candidate = i
            .copies
            .iter()
            .enumerate()
            .filter(|(n, c)| *n != role.primary && c.healthy(retries) && c.diverged().is_none())
            .max_by(|(an, a), (bn, b)| {
                a.applied
                    .load(Ordering::Acquire)
                    .cmp(&b.applied.load(Ordering::Acquire))
                    .then(bn.cmp(an))
            })
            .map(|(n, _)| n);
        let Some(n) = candidate else {
            tracing::error!(group = %i.group, primary = %old.name, "primary unavailable and no other copy can take the role; writes wait");
            return;
        };
        let new = i.copies[n].clone();
        tracing::warn!(group = %i.group, from = %old.name, to = %new.name, epoch = role.epoch + 1, "failover: handing the primary role over");
        // The candidate replays what it lacks first (bounded).
        let deadline = tokio::time::Instant::now() + Duration::from_secs(30);
        while new.applied.load(Ordering::Acquire) < sealed {
            if tokio::time::Instant::now() >= deadline || new.diverged().is_some() {
                tracing::error!(group = %i.group, candidate = %new.name, "candidate did not catch up; failover abandoned");
                return;
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        self.stop_replayer(n).await;
        if let Some(record) = slot.unsealed.take() {
            let applier = CopyApplier::new(&i.group, &new.name, new.db.clone());
            match regroup_replay::Applier::apply(&applier, &record).await {
                Ok(fp) if fp == record_fingerprint(&record) => {
                    let seq = record.seq;
                    self.seal(&mut slot, record, true).await;
                    if slot.unsealed.is_some() {
                        self.start_replayer(n);
                        return;
                    }
                    new.applied.store(seq, Ordering::Release);
                }
                other => {
                    tracing::error!(group = %i.group, seq = record.seq, result = ?other, "the in-doubt record does not apply on the candidate; failover abandoned");
                    slot.unsealed = Some(record);
                    self.start_replayer(n);
                    return;
                }
            }
        }
        let stored = regroup_replay::StoredRole {
            epoch: role.epoch + 1,
            primary: new.name.clone(),
        };
        if let Err(e) = i.journal.set_role(&i.group, role.epoch, &stored).await {
            tracing::error!(group = %i.group, error = %e, "cannot store the new role; failover abandoned");
            self.start_replayer(n);
            return;
        }
        match checkpoint::read(&new.db, &i.group).await {
            Ok(at) => slot.hash = at.hash,
            Err(e) => {
                tracing::error!(group = %i.group, error = %e, "the new primary's checkpoint row cannot be read");
            }
        }
        if let Ok(mut r) = i.role.write() {
            *r = Role {
                epoch: role.epoch + 1,
                primary: n,
            };
        }
        // The old primary catches up from its own row when it answers again.
        self.start_replayer(role.primary);
        tracing::warn!(group = %i.group, primary = %new.name, epoch = role.epoch + 1, "failover done");
    }
}
