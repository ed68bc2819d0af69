//! regroup's network-facing gateway: configuration, request classification, the update
//! path (serialize, journal ahead, forward to the primary, seal), balanced reads, HTTP
//! replay, supervision and the admin API.
//!
//! # Design
//!
//! **Request path.** [`route::Regroup`] picks the group by path prefix and classifies the
//! request ([`classify`]). An update takes the group's write slot, is appended to the
//! journal *pending*, forwarded to the primary with the replay headers, sealed with the
//! primary's answer and answered with `Regroup-Seq` (`update.rs`). A read goes to tower's
//! p2c balancer over the partitions that are `available` (`read.rs`).
//!
//! **Replication.** One replayer per replica (`replicate.rs`, [`applier`]) follows the
//! group's sealed head and replays records in order with `Regroup-Replay: 1`.
//!
//! **Rebuild and retention.** [`rebuild::start`] rebuilds a partition from a snapshot of a
//! healthy one (the app layer's `/_regroup/snapshot` streamed into the target's
//! `/_regroup/restore`), then the journal after the snapshot's seq, holding no lock of the
//! group; `retention.rs` truncates records no partition that holds the journal still needs
//! (`retain_records`, `retain_hours`), and a partition that needs truncated records is
//! rebuilt by itself.
//!
//! **Supervision and failover.** Heartbeats with a time-out and a retry count
//! (`supervise.rs`) and failed proxied connections drive each partition's
//! [`status::PartitionStatus`]; when the primary becomes unavailable, `failover.rs` fences it
//! with a new durable epoch and hands the role to the most caught-up healthy partition.
//! `promote` and `drain` do the same after the update in flight has finished.
//!
//! **Guarantees.** An update is durable in the journal before the primary sees it; a
//! client is answered only after the primary's answer is durable; a record whose outcome
//! is unknown is *in doubt*, shown in `/status`, and blocks later updates of its group
//! until resolved, so replicas never apply out of order and nothing is guessed.
//!
//! **Failure modes.** Primary unreachable before sending: the update waits for a failover
//! (up to `failover_wait_ms`, then 503; the record is skipped). Connection broken or time-out
//! after sending: the record is in doubt and settled exactly when possible (re-sent to a
//! partition running the app-side layer, or executed by a new primary), its client waiting;
//! otherwise 502 `in_doubt`, and later updates wait up to `failover_wait_ms` then 503. Journal
//! down: 503, nothing forwarded. No readable partition within `read_wait_ms`: 503.
//!
//! **Limits.** Every limit and time-out is a named config key with a default
//! ([`config`]): header block size and count (431), header read time-out (connection
//! closed), body read deadline (408), body size (413), read time-out (504), concurrent
//! connections (new ones wait); refused requests journal nothing. Errors reach clients as
//! a code and a public message ([`error`]); the detail goes to the log.

pub mod admin;
pub mod applier;
pub mod classify;
pub mod config;
mod dashboard;
pub mod error;
mod failover;
mod feed;
mod follow;
pub mod forward;
pub mod group;
mod h1;
pub mod link;
mod membership;
pub mod metrics;
pub mod ownership;
pub mod partition;
pub mod read;
pub mod rebuild;
mod replicate;
mod retention;
pub mod route;
mod serve_h1;
pub mod server;
#[cfg(test)]
mod sim;
pub mod status;
pub mod supervise;
mod update;
mod upstream;

pub use admin::{Admin, StatusDoc};
pub use config::{Config, ConfigError};
pub use error::ProxyError;
pub use group::Group;
pub use route::{Regroup, RegroupLayer};
pub use server::{Bound, Proxy, serve};
pub use status::PartitionStatus;
