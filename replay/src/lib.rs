//! regroup's transport-free core: transaction records, the durable [`Journal`], and the
//! [`Replayer`] that drives one partition through the journal via an [`Applier`]; and what
//! an application links: the [`ReplayContext`] and its [`ReplayLayer`], [`ExactlyOnce`]
//! application with sea-orm, and the [`Snapshotter`] that lets the proxy rebuild a
//! partition from another's snapshot ([`SnapshotLayer`]).
//!
//! # Design
//!
//! **Purpose.** Transaction-level replication: every update the primary executed is one
//! [`Record`] in its group's journal, and every other partition re-executes the records in
//! the same order.
//!
//! **Path of a record.** The proxy's router appends it *pending* before forwarding
//! (write-ahead), then seals it `executed` with the primary's [`Fingerprint`] (status and
//! body hash), `skipped`, or `in_doubt` when the primary's answer was lost. A replayer per
//! replica reads sealed records after the replica's checkpoint, applies each through its
//! [`Applier`], compares the answer with the fingerprint ([`Compare`]), saves the checkpoint,
//! and moves on.
//!
//! **Guarantees.** Records are dense per group (a gap is an error, [`JournalError::Gap`]);
//! a record is durable before it is forwarded; a replica never sees an unsealed record, so a
//! replica cannot have applied an in-doubt transaction; a replica whose answer differs is
//! reported diverged and not driven further.
//!
//! **Failure modes and their cost.** The checkpoint is saved after the replica answered:
//! if the proxy dies in between, the record is sent again on restart. Without the app-side
//! exactly-once checkpoint that is a double application, which the fingerprint check
//! usually catches (and reports as divergence) rather than prevents.

pub mod applier;
pub mod classify;
pub mod conflict;
pub mod context;
pub mod exactly_once;
pub mod headers;
pub mod journal;
pub mod layer;
pub mod record;
pub mod replayer;
pub mod signature;
pub mod snapshot;

pub use applier::{Applier, ApplyError, Position};
pub use conflict::{ConflictKeys, ConflictRule};
pub use context::ReplayContext;
pub use exactly_once::{Answer, AppliedRecord, ExactlyOnce, RunError, Work};
pub use journal::{
    CachedJournal, Checkpoints, GroupState, Journal, JournalError, JournalSync, Lease, Log,
    LogState, MemberSpec, Membership, MemoryJournal, NatsJournal, Outcome, Owner, OwnerInfo,
    RoleStore, SqlJournal, StoredMembers, StoredRole,
};
pub use layer::{AppliedStore, Replay, ReplayLayer, SnapshotLayer, Snapshots};
pub use record::{
    Compare, Fingerprint, Payload, Record, RecordState, RecordedRequest, SqlStatement,
    SqlTransaction, SqlValue,
};
pub use replayer::{Backoff, ReplayExit, ReplayObserver, Replayer};
pub use snapshot::{
    Restored, SeaOrmSnapshotter, Snapshot, SnapshotBody, SnapshotError, Snapshotter,
};
