//! regroup's SQL mode: a sea-orm connection over a redundancy group of database copies.
//!
//! # Design
//!
//! **Purpose.** Applications that cannot be made deterministic at the HTTP level but talk
//! to their database through sea-orm get transaction-level replication at the SQL level:
//! [`SqlGroup`] is used wherever a `DatabaseConnection` was, and keeps a group of database
//! copies (SQLite files, PostgreSQL databases) identical.
//!
//! **Path of a write.** A write transaction runs on the primary copy; each statement is
//! classified ([`classify`]), its nondeterministic values fixed to literals or the
//! statement refused ([`rewrite`]); on commit the statements with their bound values
//! ([`value`]) are one journal record (`Payload::Sql`), appended before the primary commits
//! together with its checkpoint row ([`checkpoint`]), and sealed after. Every other copy
//! replays the record in one database transaction with its own checkpoint row
//! ([`applier`]), so each transaction applies exactly once per copy.
//!
//! **Guarantees.** Copies apply the same transactions in the same order; a statement whose
//! value would differ per copy never runs unless fixed exactly; a copy whose affected-row
//! counts or running hash differ from the primary's is quarantined durably and serves no
//! read; a read outside a transaction goes to a copy that has applied everything sealed.
//!
//! **Failover.** Supervision queries every copy (`SELECT 1`) on an interval; an
//! unavailable primary hands its role to the most caught-up healthy copy (epoch + 1,
//! compare-and-set in the journal's role store) under the write slot, after applying a
//! record whose commit is in doubt on it (exactly once by its checkpoint row).
//!
//! **Failure modes and their cost.** Write transactions of a group are serialized (one
//! write slot), read-only ones included once they begin a transaction. A commit whose
//! answer is lost is settled by the primary's checkpoint row; while the primary cannot be
//! read, the next write waits on it (fails) rather than guess.

pub mod applier;
pub mod checkpoint;
pub mod classify;
pub mod connection;
pub mod rewrite;
pub mod value;
pub mod verify;

pub use applier::CopyApplier;
pub use classify::{Analysis, Class, Dialect, analyze};
pub use connection::{CopyConfig, CopyStatus, OpenError, SqlGroup, SqlTransaction};
