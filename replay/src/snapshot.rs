//! Snapshot and restore of a partition's whole database, so the proxy can rebuild a new,
//! diverged or too-far-behind partition from a healthy one without replaying the journal
//! from the start.
//!
//! [`Snapshotter`] is the seam: take a consistent snapshot and say which seq it includes
//! (exactly: the snapshot holds the exactly-once table `regroup_applied`, so the seq is
//! its highest row, or, with the `floor` column of parallel replay, the dense prefix every
//! record below which is in it), and restore one. [`SeaOrmSnapshotter`] implements it for sea-orm on
//! SQLite (`VACUUM INTO` a temp file; a restore ATTACHes the received file on one pooled
//! connection and replaces every table's rows in one transaction, so the app's pool stays
//! open and sees the new rows at commit) and on PostgreSQL (every table read in one
//! `REPEATABLE READ READ ONLY` transaction as JSON lines; a restore truncates and refills
//! every table, and moves the serial sequences past the restored ids, in one transaction).
//! An app on another store implements the trait itself.
//!
//! The app layer serves it ([`crate::ReplayLayer::snapshots`], a [`crate::SnapshotLayer`]): `GET
//! /_regroup/snapshot` answers the snapshot as the body with `Regroup-Snapshot-Seq`,
//! `Regroup-Snapshot-Epoch` and `Regroup-Snapshot-Format`; `PUT /_regroup/restore` takes one
//! (with `Regroup-Snapshot-Format`) and answers `{"seq": S, "epoch": E}`; `GET
//! /_regroup/restore` answers 204 when a restore from this caller would be taken (the proxy
//! asks before it streams a snapshot, so a refusal is clear and nothing is sent).
//!
//! **Who may call them.** A snapshot is the whole database and a restore replaces it, so
//! with a replay secret both need a `Regroup-Signature` made with it
//! ([`sign_snapshot_request`]: over the method, the path, `Regroup-Timestamp` and a nonce in
//! `Regroup-Txn-Id`; refused when the timestamp is more than [`SIGNATURE_WINDOW_SECS`] away
//! from the partition's clock). Without a secret they are refused (403) unless the app
//! opted in with [`crate::ReplayLayer::allow_unsigned_snapshots`], for a network where only
//! the proxy reaches the partitions. The body of a restore is not covered by the signature
//! (it is streamed from the source partition, so its hash is not known in advance).

use std::pin::Pin;

use bytes::Bytes;
use futures_util::{Stream, StreamExt};
use sea_orm::{
    AccessMode, ConnectionTrait, DatabaseConnection, DbBackend, IsolationLevel, Statement,
    TransactionTrait,
};

use crate::signature::{Secret, Signed};

/// The path of the snapshot endpoint.
pub const SNAPSHOT_PATH: &str = "/_regroup/snapshot";
/// The path of the restore endpoint.
pub const RESTORE_PATH: &str = "/_regroup/restore";
/// The seq a snapshot includes (every transaction up to it, none after).
pub const SEQ_HEADER: &str = "regroup-snapshot-seq";
/// The highest epoch a snapshot includes.
pub const EPOCH_HEADER: &str = "regroup-snapshot-epoch";
/// The snapshot's format (`sqlite`, `postgres-json-v1`, or an app's own).
pub const FORMAT_HEADER: &str = "regroup-snapshot-format";
/// How far a signed snapshot request's timestamp may be from the partition's clock.
pub const SIGNATURE_WINDOW_SECS: i64 = 300;

/// The format of [`SeaOrmSnapshotter`] on SQLite: the database file itself.
pub const FORMAT_SQLITE: &str = "sqlite";
/// The format of [`SeaOrmSnapshotter`] on PostgreSQL: one JSON object per line,
/// `{"table": NAME, "row": {...}}`.
pub const FORMAT_POSTGRES: &str = "postgres-json-v1";

/// A snapshot's bytes, as a stream of chunks.
pub type SnapshotBody = Pin<Box<dyn Stream<Item = Result<Bytes, std::io::Error>> + Send>>;

/// A consistent snapshot of a partition's database.
pub struct Snapshot {
    /// Every transaction up to this seq is in it (after it, only some taken out of seq
    /// order by parallel replay, each answered from its record when it comes again).
    pub seq: u64,
    /// The highest epoch of the transactions in it.
    pub epoch: u64,
    /// How the bytes are laid out (what [`Snapshotter::restore`] is told).
    pub format: String,
    /// The bytes.
    pub body: SnapshotBody,
}

impl std::fmt::Debug for Snapshot {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Snapshot")
            .field("seq", &self.seq)
            .field("epoch", &self.epoch)
            .field("format", &self.format)
            .finish_non_exhaustive()
    }
}

/// Where a restored copy stands.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Restored {
    /// The seq the restored snapshot includes.
    pub seq: u64,
    /// The highest epoch it includes.
    pub epoch: u64,
}

/// Why a snapshot or a restore failed.
#[derive(Debug, thiserror::Error)]
pub enum SnapshotError {
    /// The database failed.
    #[error("database error: {0}")]
    Db(String),
    /// Reading or writing the snapshot's bytes failed.
    #[error("snapshot i/o: {0}")]
    Io(#[from] std::io::Error),
    /// The snapshot is not one this store can restore.
    #[error("cannot restore this snapshot: {0}")]
    Invalid(String),
}

impl From<sea_orm::DbErr> for SnapshotError {
    fn from(e: sea_orm::DbErr) -> Self {
        SnapshotError::Db(e.to_string())
    }
}

impl From<sea_orm::sqlx::Error> for SnapshotError {
    fn from(e: sea_orm::sqlx::Error) -> Self {
        SnapshotError::Db(e.to_string())
    }
}

/// Takes and restores consistent snapshots of a partition's whole store.
#[async_trait::async_trait]
pub trait Snapshotter: Send + Sync + 'static {
    /// A consistent snapshot, with the seq it includes (exact: the exactly-once records
    /// are part of it).
    async fn snapshot(&self) -> Result<Snapshot, SnapshotError>;

    /// Replaces the store's whole content with a snapshot of `format`, atomically: on an
    /// error nothing changed.
    async fn restore(&self, format: &str, body: SnapshotBody) -> Result<Restored, SnapshotError>;
}

/// [`Snapshotter`] for a sea-orm database on SQLite or PostgreSQL (see the module docs).
#[derive(Debug, Clone)]
pub struct SeaOrmSnapshotter {
    db: DatabaseConnection,
}

impl SeaOrmSnapshotter {
    /// Snapshots `db`, whose schema includes [`regroup_migrations::AppliedMigration`].
    pub fn new(db: DatabaseConnection) -> Self {
        SeaOrmSnapshotter { db }
    }
}

/// Chunks a file is streamed in.
const CHUNK: usize = 64 * 1024;
/// Rows inserted per statement on a PostgreSQL restore.
const PG_BATCH: usize = 500;

#[async_trait::async_trait]
impl Snapshotter for SeaOrmSnapshotter {
    async fn snapshot(&self) -> Result<Snapshot, SnapshotError> {
        match self.db.get_database_backend() {
            DbBackend::Sqlite => self.sqlite_snapshot().await,
            DbBackend::Postgres => self.postgres_snapshot().await,
            other => Err(SnapshotError::Invalid(format!(
                "snapshots of {other:?} are not supported"
            ))),
        }
    }

    async fn restore(&self, format: &str, body: SnapshotBody) -> Result<Restored, SnapshotError> {
        let (backend, expected) = match self.db.get_database_backend() {
            DbBackend::Sqlite => (DbBackend::Sqlite, FORMAT_SQLITE),
            DbBackend::Postgres => (DbBackend::Postgres, FORMAT_POSTGRES),
            other => {
                return Err(SnapshotError::Invalid(format!(
                    "restores into {other:?} are not supported"
                )));
            }
        };
        if format != expected {
            return Err(SnapshotError::Invalid(format!(
                "format {format:?}, but this store restores {expected:?}"
            )));
        }
        match backend {
            DbBackend::Sqlite => self.sqlite_restore(body).await,
            _ => self.postgres_restore(body).await,
        }
    }
}

fn quote(ident: &str) -> String {
    format!("\"{}\"", ident.replace('"', "\"\""))
}

fn to_u64(v: Option<i64>) -> u64 {
    v.and_then(|v| u64::try_from(v).ok()).unwrap_or(0)
}

/// Streams a file in a temp dir (removed when the stream ends or is dropped).
fn file_stream(dir: tempfile::TempDir, file: tokio::fs::File) -> SnapshotBody {
    use tokio::io::AsyncReadExt;
    let stream =
        futures_util::stream::unfold(Some((dir, file, vec![0u8; CHUNK])), |state| async move {
            let (dir, mut file, mut buf) = state?;
            match file.read(&mut buf).await {
                Ok(0) => None,
                Ok(n) => {
                    let chunk = Bytes::copy_from_slice(&buf[..n]);
                    Some((Ok(chunk), Some((dir, file, buf))))
                }
                Err(e) => Some((Err(e), None)),
            }
        });
    Box::pin(stream)
}

impl SeaOrmSnapshotter {
    async fn sqlite_snapshot(&self) -> Result<Snapshot, SnapshotError> {
        let dir = tempfile::tempdir()?;
        let path = dir.path().join("snapshot.db");
        let path_text = path
            .to_str()
            .ok_or_else(|| SnapshotError::Invalid("temp path is not UTF-8".into()))?
            .to_owned();
        // One read transaction: a consistent copy while writers go on (WAL).
        self.db
            .execute_raw(Statement::from_sql_and_values(
                DbBackend::Sqlite,
                "VACUUM INTO ?",
                [path_text.clone().into()],
            ))
            .await?;
        let (seq, epoch) = sqlite_applied(&path_text).await?;
        let file = tokio::fs::File::open(&path).await?;
        Ok(Snapshot {
            seq,
            epoch,
            format: FORMAT_SQLITE.to_owned(),
            body: file_stream(dir, file),
        })
    }

    async fn sqlite_restore(&self, mut body: SnapshotBody) -> Result<Restored, SnapshotError> {
        use sea_orm::sqlx::{AssertSqlSafe, Row, query};
        use tokio::io::AsyncWriteExt;
        let dir = tempfile::tempdir()?;
        let path = dir.path().join("restore.db");
        let mut file = tokio::fs::File::create(&path).await?;
        while let Some(chunk) = body.next().await {
            file.write_all(&chunk?).await?;
        }
        file.sync_all().await?;
        drop(file);
        let path_text = path
            .to_str()
            .ok_or_else(|| SnapshotError::Invalid("temp path is not UTF-8".into()))?
            .to_owned();
        let restored = sqlite_applied(&path_text).await.map_err(|e| {
            SnapshotError::Invalid(format!(
                "the snapshot is not a database with regroup_applied: {e}"
            ))
        })?;
        // ATTACH cannot run inside a transaction, and holds per connection: one pooled
        // connection does it all.
        let pool = self.db.get_sqlite_connection_pool();
        let mut conn = pool.acquire().await?;
        query("ATTACH DATABASE ? AS regroup_snapshot")
            .bind(&path_text)
            .execute(&mut *conn)
            .await?;
        let result: Result<(), SnapshotError> = async {
            let tables = |schema: &'static str| {
                format!(
                    "SELECT name FROM {schema}.sqlite_master WHERE type = 'table' \
                     AND name NOT LIKE 'sqlite_%' ORDER BY name"
                )
            };
            let mine: Vec<String> = query(AssertSqlSafe(tables("main")))
                .fetch_all(&mut *conn)
                .await?
                .iter()
                .map(|r| r.try_get::<String, _>(0))
                .collect::<Result<_, _>>()?;
            let theirs: Vec<String> = query(AssertSqlSafe(tables("regroup_snapshot")))
                .fetch_all(&mut *conn)
                .await?
                .iter()
                .map(|r| r.try_get::<String, _>(0))
                .collect::<Result<_, _>>()?;
            if mine != theirs {
                return Err(SnapshotError::Invalid(format!(
                    "tables differ: this database has {mine:?}, the snapshot {theirs:?}"
                )));
            }
            let has_sequence = |schema: &'static str| {
                format!(
                    "SELECT count(*) FROM {schema}.sqlite_master WHERE name = 'sqlite_sequence'"
                )
            };
            let sequences = query(AssertSqlSafe(has_sequence("main")))
                .fetch_one(&mut *conn)
                .await?
                .try_get::<i64, _>(0)?
                > 0
                && query(AssertSqlSafe(has_sequence("regroup_snapshot")))
                    .fetch_one(&mut *conn)
                    .await?
                    .try_get::<i64, _>(0)?
                    > 0;
            query("BEGIN IMMEDIATE").execute(&mut *conn).await?;
            let work: Result<(), SnapshotError> = async {
                // Foreign keys are checked at commit, when every table is whole again.
                query("PRAGMA defer_foreign_keys = ON")
                    .execute(&mut *conn)
                    .await?;
                for t in &mine {
                    let columns: Vec<String> = query(AssertSqlSafe(format!(
                        "SELECT name FROM pragma_table_info({})",
                        quote_literal(t)
                    )))
                    .fetch_all(&mut *conn)
                    .await?
                    .iter()
                    .map(|r| r.try_get::<String, _>(0))
                    .collect::<Result<_, _>>()?;
                    let cols = columns
                        .iter()
                        .map(|c| quote(c))
                        .collect::<Vec<_>>()
                        .join(", ");
                    query(AssertSqlSafe(format!("DELETE FROM main.{}", quote(t))))
                        .execute(&mut *conn)
                        .await?;
                    query(AssertSqlSafe(format!(
                        "INSERT INTO main.{t} ({cols}) SELECT {cols} FROM regroup_snapshot.{t}",
                        t = quote(t)
                    )))
                    .execute(&mut *conn)
                    .await?;
                }
                if sequences {
                    // AUTOINCREMENT's next ids must follow the snapshot too.
                    query("DELETE FROM main.sqlite_sequence")
                        .execute(&mut *conn)
                        .await?;
                    query(
                        "INSERT INTO main.sqlite_sequence (name, seq) \
                         SELECT name, seq FROM regroup_snapshot.sqlite_sequence",
                    )
                    .execute(&mut *conn)
                    .await?;
                }
                Ok(())
            }
            .await;
            match work {
                Ok(()) => {
                    query("COMMIT").execute(&mut *conn).await?;
                    Ok(())
                }
                Err(e) => {
                    let _ = query("ROLLBACK").execute(&mut *conn).await;
                    Err(e)
                }
            }
        }
        .await;
        let detached = query("DETACH DATABASE regroup_snapshot")
            .execute(&mut *conn)
            .await;
        if detached.is_err() {
            // A connection that still holds the attachment must not go back to the pool.
            conn.detach();
        }
        result?;
        Ok(Restored {
            seq: restored.0,
            epoch: restored.1,
        })
    }

    async fn postgres_snapshot(&self) -> Result<Snapshot, SnapshotError> {
        let txn = self
            .db
            .begin_with_config(
                Some(IsolationLevel::RepeatableRead),
                Some(AccessMode::ReadOnly),
            )
            .await?;
        let tables = postgres_tables(&txn).await?;
        let mut out = Vec::new();
        for t in &tables {
            let rows = txn
                .query_all_raw(Statement::from_string(
                    DbBackend::Postgres,
                    format!("SELECT row_to_json(t)::text AS j FROM {} t", quote(t)),
                ))
                .await?;
            for row in rows {
                let j: String = row.try_get("", "j")?;
                let row: serde_json::Value = serde_json::from_str(&j)
                    .map_err(|e| SnapshotError::Db(format!("row of {t}: {e}")))?;
                let line = serde_json::json!({"table": t, "row": row});
                out.extend_from_slice(line.to_string().as_bytes());
                out.push(b'\n');
            }
        }
        let (seq, epoch) = postgres_applied(&txn).await?;
        txn.commit().await?;
        let body = futures_util::stream::once(async move { Ok(Bytes::from(out)) });
        Ok(Snapshot {
            seq,
            epoch,
            format: FORMAT_POSTGRES.to_owned(),
            body: Box::pin(body),
        })
    }

    async fn postgres_restore(&self, mut body: SnapshotBody) -> Result<Restored, SnapshotError> {
        let mut bytes = Vec::new();
        while let Some(chunk) = body.next().await {
            bytes.extend_from_slice(&chunk?);
        }
        let mut rows: std::collections::BTreeMap<String, Vec<serde_json::Value>> =
            Default::default();
        for line in bytes.split(|b| *b == b'\n').filter(|l| !l.is_empty()) {
            let mut v: serde_json::Value = serde_json::from_slice(line)
                .map_err(|e| SnapshotError::Invalid(format!("a line is not JSON: {e}")))?;
            let table = v
                .get("table")
                .and_then(|t| t.as_str())
                .ok_or_else(|| SnapshotError::Invalid("a line names no table".into()))?
                .to_owned();
            let row = v
                .get_mut("row")
                .map(serde_json::Value::take)
                .ok_or_else(|| SnapshotError::Invalid("a line holds no row".into()))?;
            rows.entry(table).or_default().push(row);
        }
        let txn = self.db.begin().await?;
        let tables = postgres_tables(&txn).await?;
        if let Some(unknown) = rows.keys().find(|t| !tables.contains(t)) {
            return Err(SnapshotError::Invalid(format!(
                "the snapshot holds table {unknown:?}, which this database does not have"
            )));
        }
        txn.execute_unprepared("SET CONSTRAINTS ALL DEFERRED")
            .await?;
        if !tables.is_empty() {
            let all = tables
                .iter()
                .map(|t| quote(t))
                .collect::<Vec<_>>()
                .join(", ");
            txn.execute_unprepared(&format!("TRUNCATE {all}")).await?;
        }
        for (t, list) in &rows {
            // Generated columns are computed again; identity columns take the stored ids.
            let columns = txn
                .query_all_raw(Statement::from_sql_and_values(
                    DbBackend::Postgres,
                    "SELECT column_name AS c FROM information_schema.columns \
                     WHERE table_schema = current_schema() AND table_name = $1 \
                     AND is_generated = 'NEVER' ORDER BY ordinal_position",
                    [t.clone().into()],
                ))
                .await?
                .iter()
                .map(|r| r.try_get::<String>("", "c").map(|c| quote(&c)))
                .collect::<Result<Vec<_>, _>>()?
                .join(", ");
            for batch in list.chunks(PG_BATCH) {
                let json = serde_json::Value::Array(batch.to_vec()).to_string();
                txn.execute_raw(Statement::from_sql_and_values(
                    DbBackend::Postgres,
                    format!(
                        "INSERT INTO {t} ({columns}) OVERRIDING SYSTEM VALUE \
                         SELECT {columns} FROM json_populate_recordset(NULL::{t}, $1::json)",
                        t = quote(t)
                    ),
                    [json.into()],
                ))
                .await?;
            }
        }
        // Serial and identity columns continue after the restored ids.
        let serials = txn
            .query_all_raw(Statement::from_string(
                DbBackend::Postgres,
                "SELECT c.table_name AS t, c.column_name AS c, \
                 pg_get_serial_sequence(quote_ident(c.table_name), c.column_name) AS s \
                 FROM information_schema.columns c \
                 WHERE c.table_schema = current_schema() \
                 AND pg_get_serial_sequence(quote_ident(c.table_name), c.column_name) IS NOT NULL",
            ))
            .await?;
        for s in serials {
            let (t, c, seq): (String, String, String) = (
                s.try_get("", "t")?,
                s.try_get("", "c")?,
                s.try_get("", "s")?,
            );
            txn.execute_raw(Statement::from_sql_and_values(
                DbBackend::Postgres,
                format!(
                    "SELECT setval($1::regclass, COALESCE((SELECT max({c}) FROM {t}), 0) + 1, false)",
                    c = quote(&c),
                    t = quote(&t)
                ),
                [seq.into()],
            ))
            .await?;
        }
        let (seq, epoch) = postgres_applied(&txn).await?;
        txn.commit().await?;
        Ok(Restored { seq, epoch })
    }
}

fn quote_literal(text: &str) -> String {
    format!("'{}'", text.replace('\'', "''"))
}

/// Where a copy stands by its `regroup_applied` table, and its highest epoch. Without the
/// `floor` column, its highest seq; with it, its dense prefix: the highest floor among the
/// newest records, a record taken in seq order standing for itself (as
/// [`crate::ExactlyOnce::resume`]), so a copy made while records were taken out of seq
/// order (parallel replay) is credited with no record it lacks, and the records above are
/// answered from its record when they come again.
fn applied_sql(floors: bool) -> &'static str {
    if floors {
        "SELECT (SELECT max(CASE WHEN floor IS NULL THEN seq ELSE floor END) \
         FROM (SELECT seq, floor FROM regroup_applied ORDER BY seq DESC LIMIT 256) AS newest) \
         AS seq, max(epoch) AS epoch FROM regroup_applied"
    } else {
        "SELECT max(seq) AS seq, max(epoch) AS epoch FROM regroup_applied"
    }
}

/// Where the PostgreSQL copy `db` stands, and its highest epoch ([`applied_sql`]).
async fn postgres_applied(db: &impl ConnectionTrait) -> Result<(u64, u64), SnapshotError> {
    let floors = db
        .query_one_raw(Statement::from_string(
            DbBackend::Postgres,
            "SELECT count(*) AS n FROM information_schema.columns \
             WHERE table_name = 'regroup_applied' AND column_name = 'floor' \
             AND table_schema = current_schema()",
        ))
        .await?
        .map(|r| r.try_get::<i64>("", "n"))
        .transpose()?
        .is_some_and(|n| n > 0);
    let applied = db
        .query_one_raw(Statement::from_string(
            DbBackend::Postgres,
            applied_sql(floors),
        ))
        .await?;
    Ok(match applied {
        Some(r) => (
            to_u64(r.try_get::<Option<i64>>("", "seq")?),
            to_u64(r.try_get::<Option<i64>>("", "epoch")?),
        ),
        None => (0, 0),
    })
}

/// Where the copy in the SQLite file at `path` stands, and its highest epoch
/// ([`applied_sql`]).
async fn sqlite_applied(path: &str) -> Result<(u64, u64), SnapshotError> {
    use sea_orm::sqlx::{Connection, Row, query};
    let opts = sea_orm::sqlx::sqlite::SqliteConnectOptions::new()
        .filename(path)
        .read_only(true);
    let mut conn = sea_orm::sqlx::SqliteConnection::connect_with(&opts).await?;
    let floors: i64 =
        query("SELECT count(*) FROM pragma_table_info('regroup_applied') WHERE name = 'floor'")
            .fetch_one(&mut conn)
            .await?
            .try_get(0)?;
    let row = query(applied_sql(floors > 0)).fetch_one(&mut conn).await?;
    let seq: Option<i64> = row.try_get(0)?;
    let epoch: Option<i64> = row.try_get(1)?;
    let _ = conn.close().await;
    Ok((to_u64(seq), to_u64(epoch)))
}

async fn postgres_tables(db: &impl ConnectionTrait) -> Result<Vec<String>, SnapshotError> {
    let rows = db
        .query_all_raw(Statement::from_string(
            DbBackend::Postgres,
            "SELECT table_name AS t FROM information_schema.tables \
             WHERE table_schema = current_schema() AND table_type = 'BASE TABLE' \
             ORDER BY table_name",
        ))
        .await?;
    rows.iter()
        .map(|r| r.try_get::<String>("", "t").map_err(Into::into))
        .collect()
}

/// The parts of a snapshot or restore request that its signature covers.
fn signed<'a>(method: &'a str, path: &'a str, timestamp: &'a str, nonce: &'a str) -> Signed<'a> {
    Signed {
        seq: "0",
        txn_id: nonce,
        epoch: "0",
        timestamp,
        replay: false,
        term: None,
        prev: None,
        after: None,
        floor: None,
        method,
        path_and_query: path,
        body: b"",
    }
}

/// Signs a snapshot or restore request about to be sent: inserts `Regroup-Timestamp` (now),
/// a nonce in `Regroup-Txn-Id` and `Regroup-Signature`.
pub fn sign_snapshot_request(
    headers: &mut http::HeaderMap,
    method: &str,
    path: &str,
    secret: &Secret,
) {
    let timestamp = crate::record::format_timestamp(time::OffsetDateTime::now_utc());
    let nonce = uuid::Uuid::now_v7().to_string();
    let signature = signed(method, path, &timestamp, &nonce).sign(secret);
    for (name, value) in [
        (crate::headers::TIMESTAMP, timestamp),
        (crate::headers::TXN_ID, nonce),
        (crate::headers::SIGNATURE, signature),
    ] {
        if let Ok(v) = http::HeaderValue::from_str(&value) {
            headers.insert(name, v);
        }
    }
}

/// Checks the signature of a snapshot or restore request against `secrets`.
pub(crate) fn verify_snapshot_request(
    headers: &http::HeaderMap,
    method: &str,
    path: &str,
    secrets: &[Secret],
) -> Result<(), String> {
    let text = |name: &str| headers.get(name).and_then(|v| v.to_str().ok());
    let (Some(timestamp), Some(nonce)) = (
        text(crate::headers::TIMESTAMP),
        text(crate::headers::TXN_ID),
    ) else {
        return Err("a signed snapshot request needs regroup-timestamp and regroup-txn-id".into());
    };
    let at = crate::record::parse_timestamp(timestamp)
        .ok_or_else(|| format!("regroup-timestamp {timestamp:?} is not RFC 3339"))?;
    let skew = (time::OffsetDateTime::now_utc() - at).whole_seconds().abs();
    if skew > SIGNATURE_WINDOW_SECS {
        return Err(format!(
            "regroup-timestamp is {skew} s away from this partition's clock (at most {SIGNATURE_WINDOW_SECS})"
        ));
    }
    signed(method, path, timestamp, nonce)
        .verify(
            headers.get(crate::headers::SIGNATURE).map(|v| v.as_bytes()),
            secrets,
        )
        .map_err(|e| e.to_string())
}
