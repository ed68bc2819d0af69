//! A tiny bank: accounts and transfers over JSON, stored with sea-orm, the app that regroup
//! replicates in its examples and tests.
//!
//! ```text
//! cargo run --release --example bank -- --listen 127.0.0.1:9001 --db sqlite://bank-a.db
//! ```
//!
//! Every write is deterministic under ordered replay: account ids come from the database's
//! auto-increment, nothing stored depends on a clock or on randomness, and each write runs
//! in one database transaction. Replaying the same requests in the same order on an empty
//! database therefore yields the same rows and responses.
//!
//! Transfers that share no account also commute, so a group may declare them independent
//! (conflict keys `body:/from` and `body:/to`) and its replicas replay them in parallel: a
//! transfer that came through regroup takes its regroup seq as its id (not the next
//! auto-increment, which would depend on the order of execution), and on PostgreSQL it locks
//! its two accounts (`FOR UPDATE`, lower id first) instead of taking the process-wide write
//! lock. On SQLite every write still takes that lock (one writer at a time, never
//! `SQLITE_BUSY`).
//!
//! | route                 | body                          | answers                         |
//! |-----------------------|-------------------------------|---------------------------------|
//! | `POST /accounts`      | `{"name","balance"}`          | 201, 400                        |
//! | `GET /accounts`       |                               | 200, ordered by id              |
//! | `GET /accounts/{id}`  |                               | 200, 404                        |
//! | `POST /transfers`     | `{"from","to","amount"}`      | 201, 400, 404, 409              |
//! | `GET /transfers`      |                               | 200, ordered by id              |
//! | `GET /health`         |                               | 200 `{"status":"ok"}`           |
//!
//! Amounts are integer cents. Errors are `{"error": "..."}`.

use std::io::Write as _;
use std::sync::Arc;

use axum::extract::rejection::{JsonRejection, PathRejection};
use axum::extract::{Extension, Path, State};
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use axum::{Json, Router};
use clap::Parser;
use regroup_replay::{
    Answer, ExactlyOnce, ReplayContext, ReplayLayer, RunError, SeaOrmSnapshotter,
};
use sea_orm::sqlx::sqlite::{SqliteJournalMode, SqliteSynchronous};
use sea_orm::{
    ActiveModelTrait,
    ActiveValue::{NotSet, Set},
    ConnectOptions, ConnectionTrait, Database, DatabaseConnection, DatabaseTransaction, DbBackend,
    DbErr, EntityTrait, QueryOrder, QuerySelect,
};
use sea_orm_migration::MigratorTrait;
use serde::Deserialize;
use serde_json::json;
use tokio::sync::Mutex;

/// Connections in the read pool; writes use one at a time (see [`AppState::writes`]).
const MAX_CONNECTIONS: u32 = 4;

/// Command line of the example.
#[derive(Debug, Parser)]
#[command(about = "A tiny bank over JSON, for trying regroup")]
struct Args {
    /// Address to listen on; port 0 picks a free port.
    #[arg(long, default_value = "127.0.0.1:9001")]
    listen: String,
    /// Database URL: sqlite://FILE (created if missing) or postgres://...
    #[arg(long, default_value = "sqlite://bank.db")]
    db: String,
    /// Serve `/_regroup/snapshot` and `/_regroup/restore` without a replay secret (only
    /// where nothing but the proxy reaches this process); with `REGROUP_REPLAY_SECRET` set
    /// they need a signature whatever this says.
    #[arg(long)]
    unsigned_snapshots: bool,
}

fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env()
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info")),
        )
        .with_writer(std::io::stderr)
        .init();
    tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()?
        .block_on(serve(&args.listen, &args.db, args.unsigned_snapshots))
}

/// Binds `listen` (e.g. `"127.0.0.1:0"`), opens, creates if needed and migrates the
/// database at `db`, prints `bank listening on http://IP:PORT` to stdout, and serves until
/// SIGINT or SIGTERM, then shuts down gracefully.
pub async fn serve(listen: &str, db: &str, unsigned_snapshots: bool) -> anyhow::Result<()> {
    let listener = tokio::net::TcpListener::bind(listen).await?;
    let addr = listener.local_addr()?;
    let db = connect(db).await?;
    Migrator::up(&db, None).await?;

    // The one line a parent process waits for; the port is the real one when `listen`
    // asked for port 0.
    let mut stdout = std::io::stdout().lock();
    writeln!(stdout, "bank listening on http://{addr}")?;
    stdout.flush()?;
    drop(stdout);
    tracing::info!(%addr, "bank listening");

    axum::serve(listener, app(db, unsigned_snapshots))
        .with_graceful_shutdown(shutdown_signal())
        .await?;
    tracing::info!("bank stopped");
    Ok(())
}

/// The bank's routes over `db`; run the migrations first (as [`serve`] does).
pub fn app(db: DatabaseConnection, unsigned_snapshots: bool) -> Router {
    let once = ExactlyOnce::new(db.clone());
    let replay = ReplayLayer::new()
        .with_store(once.clone())
        .allow_unsigned_snapshots(unsigned_snapshots);
    let snapshots = replay.snapshots(SeaOrmSnapshotter::new(db.clone()));
    let state = AppState {
        db,
        once: once.clone(),
        writes: Arc::new(Mutex::new(())),
    };
    Router::new()
        .route("/accounts", get(list_accounts).post(create_account))
        .route("/accounts/{id}", get(get_account))
        .route("/transfers", get(list_transfers).post(create_transfer))
        .route("/health", get(health))
        .fallback(|| async { ApiError::NotFound("route not found".to_owned()) })
        .with_state(state)
        // regroup's replay context on every request, fencing of stale epochs, and the
        // `/_regroup/applied` answers from the exactly-once records; with
        // REGROUP_REPLAY_SECRET set, only replay headers signed with it are accepted.
        .layer(replay)
        // Outside it: `/_regroup/snapshot` and `/_regroup/restore`, so the proxy can rebuild
        // a partition from another's snapshot (signed with REGROUP_REPLAY_SECRET when set).
        .layer(snapshots)
}

/// Opens the database; a SQLite file is created if missing, in WAL mode with full fsync.
async fn connect(url: &str) -> Result<DatabaseConnection, DbErr> {
    let mut options = ConnectOptions::new(url);
    options
        .max_connections(MAX_CONNECTIONS)
        // Statement logging at info would drown the request log.
        .sqlx_logging(false)
        // Applies to sqlite:// URLs only.
        .map_sqlx_sqlite_opts(|o| {
            o.create_if_missing(true)
                .journal_mode(SqliteJournalMode::Wal)
                .synchronous(SqliteSynchronous::Full)
        });
    Database::connect(options).await
}

/// Resolves on the first SIGINT (Ctrl-C) or SIGTERM.
async fn shutdown_signal() {
    let interrupt = async {
        if let Err(e) = tokio::signal::ctrl_c().await {
            tracing::error!("cannot listen for ctrl-c: {e}");
            std::future::pending::<()>().await;
        }
    };
    #[cfg(unix)]
    let terminate = async {
        use tokio::signal::unix::{SignalKind, signal};
        match signal(SignalKind::terminate()) {
            Ok(mut sigterm) => {
                sigterm.recv().await;
            }
            Err(e) => {
                tracing::error!("cannot listen for sigterm: {e}");
                std::future::pending::<()>().await;
            }
        }
    };
    #[cfg(not(unix))]
    let terminate = std::future::pending::<()>();
    tokio::select! {
        () = interrupt => {}
        () = terminate => {}
    }
    tracing::info!("shutting down");
}

/// What every handler shares.
#[derive(Clone)]
struct AppState {
    /// The pool; reads use it freely.
    db: DatabaseConnection,
    /// Runs each update's database work exactly once per regroup transaction.
    once: ExactlyOnce,
    /// Held around every write transaction, so writes never race each other (and SQLite
    /// never answers `SQLITE_BUSY`) and commit in the order they took the lock.
    writes: Arc<Mutex<()>>,
}

// ---------------------------------------------------------------------------------------
// Handlers
// ---------------------------------------------------------------------------------------

/// Body of `POST /accounts`.
#[derive(Debug, Deserialize)]
struct NewAccount {
    name: String,
    balance: i64,
}

/// Body of `POST /transfers`.
#[derive(Debug, Deserialize)]
struct NewTransfer {
    from: i64,
    to: i64,
    amount: i64,
}

async fn health() -> Json<serde_json::Value> {
    Json(json!({ "status": "ok" }))
}

async fn create_account(
    State(state): State<AppState>,
    ctx: Option<Extension<ReplayContext>>,
    body: Result<Json<NewAccount>, JsonRejection>,
) -> Response {
    let ctx = ctx.map(|Extension(c)| c);
    let answer = to_the_end(async move {
        let _write = state.writes.lock().await;
        state
            .once
            .run(ctx.as_ref(), |txn| {
                Box::pin(async move {
                    let Json(new) = body.map_err(|e| ApiError::from(e).answer())?;
                    if new.name.trim().is_empty() {
                        return Err(
                            ApiError::BadRequest("account name must not be empty".into()).answer(),
                        );
                    }
                    if new.balance < 0 {
                        return Err(ApiError::BadRequest(format!(
                            "invalid balance {}: must not be negative",
                            new.balance
                        ))
                        .answer());
                    }
                    let created = account::ActiveModel {
                        name: Set(new.name),
                        balance: Set(new.balance),
                        ..Default::default()
                    }
                    .insert(txn)
                    .await
                    .map_err(|e| ApiError::from(e).answer())?;
                    Ok(Answer::json(201, &created))
                })
            })
            .await
    })
    .await;
    respond(answer)
}

/// Runs a write to its end even when its request is dropped (the client went away): a
/// transaction cancelled in the middle of its commit would let the write lock go before the
/// commit lands, and the next write would start on a snapshot already stale (SQLite answers
/// it `SQLITE_BUSY_SNAPSHOT`).
async fn to_the_end<F>(work: F) -> Result<Answer, RunError>
where
    F: std::future::Future<Output = Result<Answer, RunError>> + Send + 'static,
{
    match tokio::spawn(work).await {
        Ok(answer) => answer,
        Err(e) => Err(RunError::Db(DbErr::Custom(format!(
            "the write's task failed: {e}"
        )))),
    }
}

/// Turns the exactly-once helper's result into the HTTP answer.
fn respond(answer: Result<Answer, RunError>) -> Response {
    match answer {
        Ok(a) => (
            StatusCode::from_u16(a.status).unwrap_or(StatusCode::INTERNAL_SERVER_ERROR),
            [(axum::http::header::CONTENT_TYPE, "application/json")],
            a.body,
        )
            .into_response(),
        Err(RunError::Fenced { .. }) => ApiError::Conflict("fenced".into()).into_response(),
        Err(e @ RunError::SeqConflict { .. }) => ApiError::Conflict(e.to_string()).into_response(),
        Err(RunError::Db(e)) => ApiError::Database(e).into_response(),
    }
}

async fn list_accounts(
    State(state): State<AppState>,
) -> Result<Json<Vec<account::Model>>, ApiError> {
    let accounts = account::Entity::find()
        .order_by_asc(account::Column::Id)
        .all(&state.db)
        .await?;
    Ok(Json(accounts))
}

async fn get_account(
    State(state): State<AppState>,
    id: Result<Path<i64>, PathRejection>,
) -> Result<Json<account::Model>, ApiError> {
    let Path(id) = id?;
    account::Entity::find_by_id(id)
        .one(&state.db)
        .await?
        .map(Json)
        .ok_or_else(|| ApiError::account_not_found(id))
}

async fn list_transfers(
    State(state): State<AppState>,
) -> Result<Json<Vec<transfer::Model>>, ApiError> {
    let transfers = transfer::Entity::find()
        .order_by_asc(transfer::Column::Id)
        .all(&state.db)
        .await?;
    Ok(Json(transfers))
}

async fn create_transfer(
    State(state): State<AppState>,
    ctx: Option<Extension<ReplayContext>>,
    body: Result<Json<NewTransfer>, JsonRejection>,
) -> Response {
    let ctx = ctx.map(|Extension(c)| c);
    // Deterministic under replay: the primary's time, a UUID derived from the transaction
    // and its seq as the id, not the local clock, randomness and the next auto-increment
    // (used only outside regroup).
    let (created_at, reference, id) = match &ctx {
        Some(c) => (c.now(), c.uuid(), i64::try_from(c.seq()).ok()),
        None => (time::OffsetDateTime::now_utc(), uuid::Uuid::now_v7(), None),
    };
    let answer = to_the_end(async move {
        // On PostgreSQL the transfer locks its two accounts instead (see `transfer_in`).
        let _write = match state.db.get_database_backend() {
            DbBackend::Postgres => None,
            _ => Some(state.writes.lock().await),
        };
        state
            .once
            .run(ctx.as_ref(), |txn| {
                Box::pin(async move {
                    let Json(new) = body.map_err(|e| ApiError::from(e).answer())?;
                    let stamp = Stamp {
                        id,
                        created_at: regroup_replay::record::format_timestamp(created_at),
                        reference: reference.to_string(),
                    };
                    match transfer_in(txn, &new, stamp).await {
                        Ok(created) => Ok(Answer::json(201, &created)),
                        Err(e) => Err(e.answer()),
                    }
                })
            })
            .await
    })
    .await;
    respond(answer)
}

/// When, under which id and under which public reference a transfer is recorded.
struct Stamp {
    /// Its regroup seq (through regroup), or `None`: the next auto-increment.
    id: Option<i64>,
    created_at: String,
    reference: String,
}

/// The body of a transfer: reads both balances, checks them, moves the money and records
/// the transfer, all inside `txn`.
async fn transfer_in(
    txn: &DatabaseTransaction,
    new: &NewTransfer,
    stamp: Stamp,
) -> Result<transfer::Model, ApiError> {
    if new.amount <= 0 {
        return Err(ApiError::BadRequest(format!(
            "invalid amount {}: must be positive",
            new.amount
        )));
    }
    if new.from == new.to {
        return Err(ApiError::BadRequest(format!(
            "cannot transfer from account {} to itself",
            new.from
        )));
    }
    // Both accounts locked, the lower id first, so concurrent transfers never deadlock
    // (PostgreSQL; SQLite writes one at a time under the process's write lock).
    let lock = txn.get_database_backend() == DbBackend::Postgres;
    let (mut from, mut to) = (None, None);
    for id in [new.from.min(new.to), new.from.max(new.to)] {
        let mut find = account::Entity::find_by_id(id);
        if lock {
            find = find.lock_exclusive();
        }
        let found = find.one(txn).await?;
        if id == new.from {
            from = found;
        } else {
            to = found;
        }
    }
    let from = from.ok_or_else(|| ApiError::account_not_found(new.from))?;
    let to = to.ok_or_else(|| ApiError::account_not_found(new.to))?;
    if from.balance < new.amount {
        return Err(ApiError::Conflict(format!(
            "insufficient funds in account {}: balance {}, amount {}",
            from.id, from.balance, new.amount
        )));
    }
    let credited = to.balance.checked_add(new.amount).ok_or_else(|| {
        ApiError::Conflict(format!(
            "balance of account {} would overflow: balance {}, amount {}",
            to.id, to.balance, new.amount
        ))
    })?;

    let debited = from.balance - new.amount;
    let mut from: account::ActiveModel = from.into();
    from.balance = Set(debited);
    from.update(txn).await?;
    let mut to: account::ActiveModel = to.into();
    to.balance = Set(credited);
    to.update(txn).await?;

    let created = transfer::ActiveModel {
        id: stamp.id.map_or(NotSet, Set),
        from_id: Set(new.from),
        to_id: Set(new.to),
        amount: Set(new.amount),
        created_at: Set(stamp.created_at),
        reference: Set(stamp.reference),
    }
    .insert(txn)
    .await?;
    Ok(created)
}

// ---------------------------------------------------------------------------------------
// Errors
// ---------------------------------------------------------------------------------------

/// Every way a request can fail; becomes `{"error": "..."}` with a fitting status.
#[derive(Debug)]
enum ApiError {
    /// 400: the request itself is wrong (bad JSON, bad amount, empty name).
    BadRequest(String),
    /// 404: an account (or route) that does not exist.
    NotFound(String),
    /// 409: valid, but the current balances do not allow it.
    Conflict(String),
    /// 500: the database failed; the detail goes to the log, not to the client.
    Database(DbErr),
}

impl ApiError {
    fn account_not_found(id: i64) -> Self {
        Self::NotFound(format!("account {id} not found"))
    }

    /// The answer recorded (and sent) for this failure.
    fn answer(self) -> Answer {
        let (status, message) = self.parts();
        Answer::json(status.as_u16(), &json!({ "error": message }))
    }

    fn parts(self) -> (StatusCode, String) {
        match self {
            Self::BadRequest(m) => (StatusCode::BAD_REQUEST, m),
            Self::NotFound(m) => (StatusCode::NOT_FOUND, m),
            Self::Conflict(m) => (StatusCode::CONFLICT, m),
            Self::Database(e) => {
                tracing::error!("database error: {e}");
                (
                    StatusCode::INTERNAL_SERVER_ERROR,
                    "database error".to_owned(),
                )
            }
        }
    }
}

impl From<DbErr> for ApiError {
    fn from(e: DbErr) -> Self {
        Self::Database(e)
    }
}

impl From<JsonRejection> for ApiError {
    fn from(rejection: JsonRejection) -> Self {
        Self::BadRequest(format!(
            "invalid json body: {}",
            lowercase_first(&rejection.body_text())
        ))
    }
}

impl From<PathRejection> for ApiError {
    fn from(rejection: PathRejection) -> Self {
        Self::BadRequest(format!(
            "invalid path: {}",
            lowercase_first(&rejection.body_text())
        ))
    }
}

/// axum's rejection texts start with a capital; ours are lowercase throughout.
fn lowercase_first(text: &str) -> String {
    let mut chars = text.chars();
    chars.next().map_or_else(String::new, |first| {
        first.to_lowercase().chain(chars).collect()
    })
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        let (status, message) = self.parts();
        (status, Json(json!({ "error": message }))).into_response()
    }
}

// ---------------------------------------------------------------------------------------
// Entities
// ---------------------------------------------------------------------------------------

/// An account and its balance, in cents.
mod account {
    use sea_orm::entity::prelude::*;
    use serde::Serialize;

    #[derive(Clone, Debug, PartialEq, Eq, DeriveEntityModel, Serialize)]
    #[sea_orm(table_name = "account")]
    pub(crate) struct Model {
        #[sea_orm(primary_key)]
        pub id: i64,
        pub name: String,
        pub balance: i64,
    }

    #[derive(Copy, Clone, Debug, EnumIter, DeriveRelation)]
    pub(crate) enum Relation {}

    impl ActiveModelBehavior for ActiveModel {}
}

/// A completed transfer of `amount` cents; serialized as `{"id","from","to","amount"}`.
mod transfer {
    use sea_orm::entity::prelude::*;
    use serde::Serialize;

    #[derive(Clone, Debug, PartialEq, Eq, DeriveEntityModel, Serialize)]
    #[sea_orm(table_name = "transfer")]
    pub(crate) struct Model {
        #[sea_orm(primary_key)]
        pub id: i64,
        #[serde(rename = "from")]
        pub from_id: i64,
        #[serde(rename = "to")]
        pub to_id: i64,
        pub amount: i64,
        /// The primary's time of the transaction (RFC 3339).
        pub created_at: String,
        /// A public reference, a UUID derived from the transaction.
        #[serde(rename = "ref")]
        pub reference: String,
    }

    #[derive(Copy, Clone, Debug, EnumIter, DeriveRelation)]
    pub(crate) enum Relation {}

    impl ActiveModelBehavior for ActiveModel {}
}

// ---------------------------------------------------------------------------------------
// Schema
// ---------------------------------------------------------------------------------------

/// The bank's schema, applied at start; bookkeeping in sea-orm's `seaql_migrations`.
struct Migrator;

#[sea_orm_migration::async_trait::async_trait]
impl MigratorTrait for Migrator {
    fn migrations() -> Vec<Box<dyn sea_orm_migration::MigrationTrait>> {
        vec![
            Box::new(schema::Migration),
            // regroup's exactly-once checkpoint table, with the column parallel replay
            // (conflict keys) needs.
            Box::new(regroup_migrations::AppliedMigration),
            Box::new(regroup_migrations::AppliedFloorMigration),
        ]
    }
}

/// The first (and only) migration: tables `account` and `transfer`.
mod schema {
    use sea_orm_migration::prelude::*;
    use sea_orm_migration::schema::{big_integer, big_pk_auto, string};

    pub(super) struct Migration;

    // Named explicitly rather than after the file, so the name recorded in
    // `seaql_migrations` stays the same wherever this file is compiled from.
    impl MigrationName for Migration {
        fn name(&self) -> &str {
            "m0001_create_account_and_transfer"
        }
    }

    #[derive(DeriveIden)]
    enum Account {
        Table,
        Id,
        Name,
        Balance,
    }

    #[derive(DeriveIden)]
    enum Transfer {
        Table,
        Id,
        FromId,
        ToId,
        Amount,
        CreatedAt,
        Reference,
    }

    #[async_trait::async_trait]
    impl MigrationTrait for Migration {
        async fn up(&self, manager: &SchemaManager) -> Result<(), DbErr> {
            manager
                .create_table(
                    Table::create()
                        .table(Account::Table)
                        .if_not_exists()
                        .col(big_pk_auto(Account::Id))
                        .col(string(Account::Name))
                        .col(big_integer(Account::Balance))
                        .to_owned(),
                )
                .await?;
            manager
                .create_table(
                    Table::create()
                        .table(Transfer::Table)
                        .if_not_exists()
                        .col(big_pk_auto(Transfer::Id))
                        .col(big_integer(Transfer::FromId))
                        .col(big_integer(Transfer::ToId))
                        .col(big_integer(Transfer::Amount))
                        .col(string(Transfer::CreatedAt))
                        .col(string(Transfer::Reference))
                        .foreign_key(
                            ForeignKey::create()
                                .from(Transfer::Table, Transfer::FromId)
                                .to(Account::Table, Account::Id),
                        )
                        .foreign_key(
                            ForeignKey::create()
                                .from(Transfer::Table, Transfer::ToId)
                                .to(Account::Table, Account::Id),
                        )
                        .to_owned(),
                )
                .await
        }

        async fn down(&self, manager: &SchemaManager) -> Result<(), DbErr> {
            manager
                .drop_table(Table::drop().table(Transfer::Table).to_owned())
                .await?;
            manager
                .drop_table(Table::drop().table(Account::Table).to_owned())
                .await
        }
    }
}
