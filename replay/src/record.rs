//! Transaction records: one update, as the journal keeps it and the replayer sends it.

use bytes::Bytes;
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};
use time::OffsetDateTime;
use uuid::Uuid;

/// The request of an update, as recorded before it was forwarded to the primary.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RecordedRequest {
    /// HTTP method, e.g. `POST`.
    pub method: String,
    /// Path and query, e.g. `/transfers?dry=0`.
    pub uri: String,
    /// End-to-end headers worth replaying (hop-by-hop and proxy headers removed).
    pub headers: Vec<(String, String)>,
    /// The request body.
    pub body: Bytes,
}

/// What a record carries: the transaction every partition re-executes: an HTTP request
/// (the proxy), or one database transaction's SQL statements (SQL mode). Every place that
/// sends or stores a payload says what it does with each kind.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Payload {
    /// An HTTP request, sent to every partition as recorded.
    Http(RecordedRequest),
    /// One database transaction's statements with their bound values, executed on every
    /// copy in one database transaction with the copy's checkpoint row. Never sent over
    /// HTTP.
    Sql(SqlTransaction),
}

/// One database transaction of SQL mode, as executed on the primary copy (nondeterministic
/// values already fixed to literals).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct SqlTransaction {
    /// The dialect of the copies (`sqlite`, `postgres`, `mysql`): a record is replayed
    /// only on copies of the same backend.
    pub dialect: String,
    /// The statements, in execution order.
    pub statements: Vec<SqlStatement>,
    /// Hex SHA-256 chaining the group's previous running hash with these statements and
    /// values: the running hash kept with each copy's checkpoint.
    pub hash: String,
}

/// One statement of a [`SqlTransaction`].
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct SqlStatement {
    /// The SQL text, with placeholders.
    pub sql: String,
    /// The bound values, in placeholder order.
    pub values: Vec<SqlValue>,
    /// Rows the primary's execution affected (for statements run as `execute`), compared
    /// on every replay; `None` for queries whose rows were returned instead.
    pub rows_affected: Option<u64>,
}

/// A bound value, typed as the application bound it (a typed NULL stays typed, so a
/// replay binds exactly what the primary bound). Floating-point values are kept as their
/// shortest exact decimal text.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case", tag = "type", content = "value")]
pub enum SqlValue {
    /// A boolean.
    Bool(Option<bool>),
    /// An 8-bit integer.
    TinyInt(Option<i8>),
    /// A 16-bit integer.
    SmallInt(Option<i16>),
    /// A 32-bit integer.
    Int(Option<i32>),
    /// A 64-bit integer.
    BigInt(Option<i64>),
    /// An unsigned 8-bit integer.
    TinyUnsigned(Option<u8>),
    /// An unsigned 16-bit integer.
    SmallUnsigned(Option<u16>),
    /// An unsigned 32-bit integer.
    Unsigned(Option<u32>),
    /// An unsigned 64-bit integer.
    BigUnsigned(Option<u64>),
    /// A 32-bit float, as decimal text.
    Float(Option<String>),
    /// A 64-bit float, as decimal text.
    Double(Option<String>),
    /// Text.
    String(Option<String>),
    /// One character.
    Char(Option<char>),
    /// Bytes, as hex.
    Bytes(Option<String>),
}

impl Payload {
    /// The bytes it holds (what in-memory caches count against their bound).
    pub fn size(&self) -> usize {
        match self {
            Payload::Http(r) => {
                r.body.len()
                    + r.uri.len()
                    + r.headers
                        .iter()
                        .map(|(n, v)| n.len() + v.len())
                        .sum::<usize>()
            }
            Payload::Sql(t) => t
                .statements
                .iter()
                .map(|s| s.sql.len() + s.values.len() * 16)
                .sum(),
        }
    }
}

impl From<SqlTransaction> for Payload {
    fn from(t: SqlTransaction) -> Self {
        Payload::Sql(t)
    }
}

impl From<RecordedRequest> for Payload {
    fn from(r: RecordedRequest) -> Self {
        Payload::Http(r)
    }
}

/// Where a record stands.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum RecordState {
    /// Written ahead, being executed by the primary.
    Pending,
    /// Executed by the primary: replicas replay it.
    Executed,
    /// Not to be replayed: never executed, or an answer that the group's replay policy
    /// excludes.
    Skipped,
    /// Execution unknown (the primary's connection broke mid-request, or the proxy
    /// restarted and found it pending). Later updates of the group wait until it is
    /// resolved.
    InDoubt,
}

impl RecordState {
    /// The name stored in the journal and shown in status.
    pub fn as_str(self) -> &'static str {
        match self {
            RecordState::Pending => "pending",
            RecordState::Executed => "executed",
            RecordState::Skipped => "skipped",
            RecordState::InDoubt => "in_doubt",
        }
    }

    /// Parses a stored name.
    pub fn parse(s: &str) -> Option<Self> {
        Some(match s {
            "pending" => RecordState::Pending,
            "executed" => RecordState::Executed,
            "skipped" => RecordState::Skipped,
            "in_doubt" => RecordState::InDoubt,
            _ => return None,
        })
    }

    /// Whether the record's outcome is final (replicas may move past it).
    pub fn is_sealed(self) -> bool {
        matches!(self, RecordState::Executed | RecordState::Skipped)
    }
}

/// The primary's answer to a transaction, reduced to what replicas must reproduce.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Fingerprint {
    /// The HTTP status code.
    pub status: u16,
    /// Hex SHA-256 of the response body.
    pub body_hash: String,
}

impl Fingerprint {
    /// The fingerprint of an answer.
    ///
    /// ```
    /// use regroup_replay::Fingerprint;
    /// let a = Fingerprint::of(201, br#"{"id":1}"#);
    /// assert_eq!(a, Fingerprint::of(201, br#"{"id":1}"#));
    /// assert_ne!(a, Fingerprint::of(201, br#"{"id":2}"#));
    /// ```
    pub fn of(status: u16, body: &[u8]) -> Self {
        Fingerprint {
            status,
            body_hash: hex::encode(Sha256::digest(body)),
        }
    }
}

/// How a replica's answer is compared with the primary's fingerprint.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Compare {
    /// Status and body hash must both match (the default).
    #[default]
    StatusAndBody,
    /// Only the status must match (for apps whose answers carry per-copy detail).
    Status,
}

impl Compare {
    /// Why `replica` does not match `primary`, or `None` when it does.
    pub fn mismatch(self, primary: &Fingerprint, replica: &Fingerprint) -> Option<String> {
        if primary.status != replica.status {
            return Some(format!(
                "status {} differs from the primary's {}",
                replica.status, primary.status
            ));
        }
        if self == Compare::StatusAndBody && primary.body_hash != replica.body_hash {
            return Some(format!(
                "body hash {} differs from the primary's {}",
                short(&replica.body_hash),
                short(&primary.body_hash)
            ));
        }
        None
    }
}

fn short(hash: &str) -> &str {
    hash.get(..12).unwrap_or(hash)
}

/// One transaction of a group's journal.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Record {
    /// The group.
    pub group: String,
    /// Dense position in the group's journal, from 1.
    pub seq: u64,
    /// The transaction's UUID (v7).
    pub txn_id: Uuid,
    /// The epoch (primary term) it was executed in.
    pub epoch: u64,
    /// The time fixed at the primary.
    pub timestamp: OffsetDateTime,
    /// The transaction to re-execute on every partition.
    pub payload: Payload,
    /// Where it stands.
    pub state: RecordState,
    /// The primary's answer, once executed (absent when an operator resolved an in-doubt
    /// record as executed without knowing the answer).
    pub fingerprint: Option<Fingerprint>,
    /// The partitions it was sent to for execution, sorted: who may have executed it.
    /// Recorded durably before each send, so a record in doubt (even after a restart)
    /// knows which partitions must not be sent it again blindly.
    pub executors: Vec<String>,
}

impl Record {
    /// A new pending record stamped now with a fresh UUID v7.
    pub fn pending(group: &str, seq: u64, epoch: u64, payload: impl Into<Payload>) -> Self {
        Record {
            group: group.to_owned(),
            seq,
            txn_id: Uuid::now_v7(),
            epoch,
            timestamp: truncate_to_micros(OffsetDateTime::now_utc()),
            payload: payload.into(),
            state: RecordState::Pending,
            fingerprint: None,
            executors: Vec::new(),
        }
    }

    /// Adds `partition` to the partitions that may have executed it (kept sorted, once).
    pub fn add_executor(&mut self, partition: &str) {
        if let Err(i) = self
            .executors
            .binary_search_by(|p| p.as_str().cmp(partition))
        {
            self.executors.insert(i, partition.to_owned());
        }
    }

    /// Whether `partition` may have executed it.
    pub fn may_have_executed(&self, partition: &str) -> bool {
        self.executors
            .binary_search_by(|p| p.as_str().cmp(partition))
            .is_ok()
    }

    /// The timestamp as RFC 3339, as sent in `Regroup-Timestamp`.
    pub fn timestamp_rfc3339(&self) -> String {
        format_timestamp(self.timestamp)
    }

    /// The replay headers for this record (`replay` adds `Regroup-Replay: 1`).
    pub fn replay_headers(&self, replay: bool) -> Vec<(&'static str, String)> {
        let mut headers = vec![
            (crate::headers::SEQ, self.seq.to_string()),
            (crate::headers::TXN_ID, self.txn_id.to_string()),
            (crate::headers::EPOCH, self.epoch.to_string()),
            (crate::headers::TIMESTAMP, self.timestamp_rfc3339()),
        ];
        if replay {
            headers.push((crate::headers::REPLAY, "1".to_owned()));
        }
        headers
    }
}

/// Formats a timestamp as RFC 3339 UTC.
pub fn format_timestamp(t: OffsetDateTime) -> String {
    t.format(&time::format_description::well_known::Rfc3339)
        .unwrap_or_else(|_| t.unix_timestamp().to_string())
}

/// Parses an RFC 3339 timestamp.
pub fn parse_timestamp(s: &str) -> Option<OffsetDateTime> {
    OffsetDateTime::parse(s, &time::format_description::well_known::Rfc3339).ok()
}

/// Microsecond precision survives every journal backend and the header round trip.
fn truncate_to_micros(t: OffsetDateTime) -> OffsetDateTime {
    let micros = t.microsecond();
    t.replace_microsecond(micros).unwrap_or(t)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn timestamp_round_trips_through_rfc3339() {
        let r = Record::pending("g", 1, 1, sample());
        let parsed = parse_timestamp(&r.timestamp_rfc3339());
        assert_eq!(parsed, Some(r.timestamp));
    }

    #[test]
    fn compare_names_what_differs() {
        let p = Fingerprint::of(201, b"a");
        assert_eq!(
            Compare::Status.mismatch(&p, &Fingerprint::of(201, b"b")),
            None
        );
        let why = Compare::StatusAndBody.mismatch(&p, &Fingerprint::of(201, b"b"));
        assert!(why.is_some_and(|w| w.starts_with("body hash")));
        let why = Compare::Status.mismatch(&p, &Fingerprint::of(409, b"a"));
        assert_eq!(
            why.as_deref(),
            Some("status 409 differs from the primary's 201")
        );
    }

    #[test]
    fn states_round_trip() {
        for s in [
            RecordState::Pending,
            RecordState::Executed,
            RecordState::Skipped,
            RecordState::InDoubt,
        ] {
            assert_eq!(RecordState::parse(s.as_str()), Some(s));
        }
        assert_eq!(RecordState::parse("bogus"), None);
    }

    fn sample() -> RecordedRequest {
        RecordedRequest {
            method: "POST".into(),
            uri: "/x".into(),
            headers: vec![],
            body: Bytes::new(),
        }
    }
}
