//! The journal: the durable, ordered record of every group's transactions, behind three
//! narrow seams.
//!
//! - [`Log`]: an append-only sequence of records per group. An append is a compare-and-set
//!   on the expected last position (`seq - 1`), so two writers can never both append at one
//!   position; a record then receives at most one seal (its outcome) and, while unsealed, may
//!   be restamped with a new epoch and a new partition that may execute it.
//! - [`RoleStore`]: the group's role (epoch and primary) with compare-and-set on the epoch.
//! - [`Checkpoints`]: per partition, the applied position and the quarantine.
//! - [`Membership`]: the group's partitions, versioned, with compare-and-set.
//!
//! Retention ([`Log::truncate`], [`Log::low_water`]) removes old sealed records; the
//! newest record of a group is never removed, so the head (and dense appends) survive.
//!
//! [`Journal`] is the three together. [`SqlJournal`] implements it on sea-orm (SQLite by
//! default, PostgreSQL by URL), [`NatsJournal`] on NATS JetStream (`nats://` URLs),
//! [`MemoryJournal`] in memory (tests and the simulation), and
//! [`CachedJournal`] wraps either with an in-memory tail for replayers. Every implementation
//! passes the same conformance suite (`conformance`, behind the `conformance` feature).

mod cache;
#[cfg(feature = "conformance")]
pub mod conformance;
mod lease;
mod membership;
mod memory;
mod nats;
mod sql;
mod sqlite_writer;

pub use cache::CachedJournal;
pub use lease::{Lease, Owner, OwnerInfo};
pub use membership::{MemberSpec, Membership, StoredMembers};
pub use memory::MemoryJournal;
pub use nats::NatsJournal;
pub use sql::{JournalSync, SqlJournal};

use crate::record::{Fingerprint, Record};

/// What went wrong in the journal. Messages name the group and record concerned. Callers
/// match on the kind: a [`JournalError::Conflict`] or [`JournalError::Fenced`] means someone
/// else changed the journal, an [`JournalError::Unavailable`] may be retried when it says so.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum JournalError {
    /// The backing store failed or could not be reached.
    #[error("journal unavailable: {reason}")]
    Unavailable {
        /// What failed.
        reason: String,
        /// Whether the same call may succeed when tried again.
        retryable: bool,
    },
    /// A compare-and-set found something other than what it expected.
    #[error("journal conflict in group {group:?}: {what}")]
    Conflict {
        /// The group.
        group: String,
        /// What was expected and what was found.
        what: String,
    },
    /// This process no longer owns the journal: another took it over.
    #[error("journal is owned by {holder}: this process was fenced off")]
    Fenced {
        /// Who owns it now.
        holder: String,
    },
    /// An append did not extend the journal by exactly one (a lost race or a bug).
    #[error("journal gap in group {group:?}: expected seq {expected}, got {got}")]
    Gap {
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
    /// A record is larger than the journal can hold in one entry (on NATS, the server's
    /// `max_payload`): nothing was written, and sending it again cannot succeed.
    #[error(
        "group {group:?}: the record takes {size} bytes, more than the journal holds in one entry ({limit} bytes: {what})"
    )]
    TooLarge {
        /// The group.
        group: String,
        /// The bytes the record's entry takes.
        size: usize,
        /// The most one entry may take.
        limit: usize,
        /// Where the limit comes from.
        what: String,
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

impl JournalError {
    /// An unavailable store whose call may be retried.
    pub fn unavailable(reason: impl Into<String>) -> Self {
        JournalError::Unavailable {
            reason: reason.into(),
            retryable: true,
        }
    }

    /// Whether the same call may succeed when tried again.
    pub fn is_retryable(&self) -> bool {
        matches!(
            self,
            JournalError::Unavailable {
                retryable: true,
                ..
            }
        )
    }
}

impl From<sea_orm::DbErr> for JournalError {
    fn from(e: sea_orm::DbErr) -> Self {
        use sea_orm::DbErr;
        let retryable = matches!(
            e,
            DbErr::Conn(_) | DbErr::ConnectionAcquire(_) | DbErr::Exec(_) | DbErr::Query(_)
        );
        JournalError::Unavailable {
            reason: e.to_string(),
            retryable,
        }
    }
}

/// The outcome that seals a record.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Outcome {
    /// Executed by the primary with this answer (`None`: executed, answer unknown).
    Executed(Option<Fingerprint>),
    /// Not to be replayed.
    Skipped,
}

/// A group's log as found when the proxy opens it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LogState {
    /// The highest seq in the log (0 for none).
    pub head: u64,
    /// Records that are not sealed, in seq order. Any that were pending are returned (and
    /// stored) as in doubt: nobody is executing them any more.
    pub unsealed: Vec<Record>,
}

/// The primary role as stored: who leads, in which term.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct StoredRole {
    /// The primary's term.
    pub epoch: u64,
    /// The partition holding the primary role.
    pub primary: String,
}

/// A group's durable state, as loaded when the proxy starts.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct GroupState {
    /// The role.
    pub role: StoredRole,
    /// The log.
    pub log: LogState,
}

/// The append-only log of a group's records.
#[async_trait::async_trait]
pub trait Log: Send + Sync + 'static {
    /// Opens a group's log: records found pending become in doubt (stored so).
    async fn open_log(&self, group: &str) -> Result<LogState, JournalError>;

    /// Appends a pending record; it must be exactly one past the group's head
    /// ([`JournalError::Gap`] otherwise). Written when this returns (a crash of this
    /// process loses nothing); durable too unless the journal defers appends to the next
    /// [`Log::flush`] (see [`Log::appends_durable`]).
    async fn append(&self, record: &Record) -> Result<(), JournalError>;

    /// Seals an unsealed record with its outcome. Sealing a sealed record again with the
    /// same outcome is a no-op; with another outcome it is a [`JournalError::Conflict`].
    /// Written when this returns; durable too unless the journal defers seals to the next
    /// [`Log::flush`] (see [`Log::seals_durable`]).
    async fn seal(&self, group: &str, seq: u64, outcome: &Outcome) -> Result<(), JournalError>;

    /// Gives an unsealed record a new epoch and adds `executor` to the partitions that may
    /// have executed it, before it is sent there. Durable when this returns; a sealed record
    /// is a [`JournalError::Conflict`].
    async fn restamp(
        &self,
        group: &str,
        seq: u64,
        epoch: u64,
        executor: &str,
    ) -> Result<(), JournalError>;

    /// Up to `limit` records of `group` with seq greater than `after`, in order.
    async fn read_after(
        &self,
        group: &str,
        after: u64,
        limit: u64,
    ) -> Result<Vec<Record>, JournalError>;

    /// One record.
    async fn record(&self, group: &str, seq: u64) -> Result<Option<Record>, JournalError>;

    /// Retention: removes `group`'s records with seq up to `through`, except the group's
    /// newest record, which is always kept (it holds the head, so appends stay dense after
    /// any truncation). Only sealed records go: an unsealed record in the range is a
    /// [`JournalError::Conflict`] and nothing is removed. Returns how many were removed;
    /// truncating below what is already gone removes nothing.
    async fn truncate(&self, group: &str, through: u64) -> Result<u64, JournalError>;

    /// The highest seq truncated so far: `group`'s records up to it are gone (0 when none
    /// ever was). [`Log::read_after`] below it returns what is left, starting above it.
    async fn low_water(&self, group: &str) -> Result<u64, JournalError>;

    /// Whether a seal is durable when [`Log::seal`] returns (true), or only after the next
    /// append or [`Log::flush`] (false).
    fn seals_durable(&self) -> bool {
        true
    }

    /// Whether an append is durable when [`Log::append`] returns (true), or only after the
    /// next [`Log::flush`] (false: the update path then flushes while the primary executes
    /// the record, and answers the client only once it is durable).
    fn appends_durable(&self) -> bool {
        true
    }

    /// Makes everything written so far durable.
    async fn flush(&self) -> Result<(), JournalError> {
        Ok(())
    }

    /// The largest record, encoded, the journal can hold, and what sets it (a NATS
    /// server's `max_payload`); `None` when only the database's own limits apply.
    fn record_limit(&self) -> Option<(usize, &'static str)> {
        None
    }
}

/// The group's role, with compare-and-set on the epoch.
#[async_trait::async_trait]
pub trait RoleStore: Send + Sync + 'static {
    /// The stored role, creating it as epoch 1 with `primary` when the group is new.
    async fn role(&self, group: &str, primary: &str) -> Result<StoredRole, JournalError>;

    /// Replaces the role if the stored epoch is still `expected_epoch`
    /// ([`JournalError::Conflict`] otherwise). The new epoch must be higher.
    async fn set_role(
        &self,
        group: &str,
        expected_epoch: u64,
        role: &StoredRole,
    ) -> Result<(), JournalError>;
}

/// Per partition: how far it applied its group's journal, and its quarantine.
#[async_trait::async_trait]
pub trait Checkpoints: Send + Sync + 'static {
    /// The highest seq `partition` has applied (0 when it has never been checkpointed).
    async fn checkpoint(&self, group: &str, partition: &str) -> Result<u64, JournalError>;

    /// Records that `partition` has applied up to `applied` (it may go down: a partition
    /// restored from an older copy).
    async fn save_checkpoint(
        &self,
        group: &str,
        partition: &str,
        applied: u64,
    ) -> Result<(), JournalError>;

    /// Why `partition` is quarantined, if it is.
    async fn diverged(&self, group: &str, partition: &str) -> Result<Option<String>, JournalError>;

    /// Durably quarantines `partition` (`Some(reason)`) or returns it to service (`None`).
    async fn set_diverged(
        &self,
        group: &str,
        partition: &str,
        reason: Option<&str>,
    ) -> Result<(), JournalError>;
}

/// The whole journal: log, role store, checkpoints and membership, plus the ownership
/// lease.
#[async_trait::async_trait]
pub trait Journal: Log + RoleStore + Checkpoints + Membership + Lease {
    /// Loads a group: its role (created with `primary` when new) and its log.
    async fn open_group(&self, group: &str, primary: &str) -> Result<GroupState, JournalError> {
        let role = self.role(group, primary).await?;
        let log = self.open_log(group).await?;
        Ok(GroupState { role, log })
    }
}

impl<T: Log + RoleStore + Checkpoints + Membership + Lease> Journal for T {}
