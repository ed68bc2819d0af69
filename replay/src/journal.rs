//! The journal: the durable, ordered record of every group's transactions.
//!
//! The router appends a record *before* it forwards the update (write-ahead) and seals it
//! with the primary's answer; replayers read sealed records in order and keep a durable
//! checkpoint per partition. [`SqlJournal`] implements it on sea-orm (SQLite by default,
//! PostgreSQL by URL); tests and other backends implement the same narrow trait.

mod cache;
mod sql;

pub use cache::CachedJournal;
pub use sql::{JournalSync, SqlJournal};

use crate::record::{Fingerprint, Record};

/// What went wrong in the journal. Messages name the group and record concerned.
#[derive(Debug, thiserror::Error)]
pub enum JournalError {
    /// The backing database failed.
    #[error("journal database error: {0}")]
    Database(String),
    /// An append did not extend the journal by exactly one (a lost race or a bug).
    #[error("journal gap in group {group:?}: expected seq {expected}, got {got}")]
    JournalGap {
        /// The group.
        group: String,
        /// The next seq the journal expected.
        expected: u64,
        /// The seq that was offered.
        got: u64,
    },
    /// The record does not exist.
    #[error("group {group:?} has no record {seq}")]
    NoSuchRecord {
        /// The group.
        group: String,
        /// The seq asked for.
        seq: u64,
    },
    /// A stored row could not be read back.
    #[error("corrupt journal row in group {group:?} at seq {seq}: {reason}")]
    Corrupt {
        /// The group.
        group: String,
        /// The seq of the row.
        seq: u64,
        /// What is wrong with it.
        reason: String,
    },
}

impl From<sea_orm::DbErr> for JournalError {
    fn from(e: sea_orm::DbErr) -> Self {
        JournalError::Database(e.to_string())
    }
}

/// The outcome that seals (or un-seals) a record.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Outcome {
    /// Executed by the primary with this answer (`None`: executed, answer unknown).
    Executed(Option<Fingerprint>),
    /// Not to be replayed.
    Skipped,
    /// Execution unknown.
    InDoubt,
}

/// A group's durable state, as loaded when the proxy starts.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct GroupState {
    /// The primary's term.
    pub epoch: u64,
    /// The partition holding the primary role.
    pub primary: String,
    /// The highest seq in the journal (0 for none).
    pub head: u64,
    /// Records that are not sealed, in seq order. Any that were pending are returned (and
    /// stored) as in doubt: nobody is executing them any more.
    pub unsealed: Vec<Record>,
}

/// The durable, ordered journal of every group's transactions.
#[async_trait::async_trait]
pub trait Journal: Send + Sync + 'static {
    /// Loads a group, creating it with `epoch` 1 and `primary` when it is new. Records
    /// found pending become in doubt.
    async fn open_group(&self, group: &str, primary: &str) -> Result<GroupState, JournalError>;

    /// Appends a pending record; it must be exactly one past the group's head. Durable
    /// when this returns.
    async fn append(&self, record: &Record) -> Result<(), JournalError>;

    /// Records the outcome of `seq`. Durable when this returns.
    async fn seal(&self, group: &str, seq: u64, outcome: &Outcome) -> Result<(), JournalError>;

    /// Changes the epoch of a record that is not sealed, before it is sent to a new
    /// primary (it is then executed in that epoch). Durable when this returns.
    async fn restamp(&self, group: &str, seq: u64, epoch: u64) -> Result<(), JournalError>;

    /// Up to `limit` records of `group` with seq greater than `after`, in order.
    async fn read_after(
        &self,
        group: &str,
        after: u64,
        limit: u64,
    ) -> Result<Vec<Record>, JournalError>;

    /// One record.
    async fn record(&self, group: &str, seq: u64) -> Result<Option<Record>, JournalError>;

    /// The highest seq `partition` has applied (0 when it has never been checkpointed).
    async fn checkpoint(&self, group: &str, partition: &str) -> Result<u64, JournalError>;

    /// Records that `partition` has applied up to `applied`.
    async fn save_checkpoint(
        &self,
        group: &str,
        partition: &str,
        applied: u64,
    ) -> Result<(), JournalError>;

    /// Why `partition` is quarantined as diverged, if it is.
    async fn diverged(&self, group: &str, partition: &str) -> Result<Option<String>, JournalError>;

    /// Durably quarantines `partition` (`Some(reason)`) or returns it to service (`None`).
    async fn set_diverged(
        &self,
        group: &str,
        partition: &str,
        reason: Option<&str>,
    ) -> Result<(), JournalError>;

    /// Durably records a new primary and epoch for the group.
    async fn set_primary(&self, group: &str, epoch: u64, primary: &str)
    -> Result<(), JournalError>;
}
