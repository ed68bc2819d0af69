//! regroup: transaction-level replication for a redundancy group of application instances,
//! as an HTTP reverse proxy or a Tower layer.
//!
//! This crate is the `regroup` binary plus re-exports for users who embed regroup:
//! [`proxy`] (the gateway: config, routing, replay over HTTP, supervision, admin API),
//! [`replay`] (records, the journal, the replayer) and [`migrations`] (the journal schema).
//! See ARCHITECTURE.md for how they fit together.

pub use regroup_migrations as migrations;
pub use regroup_proxy as proxy;
pub use regroup_replay as replay;

pub mod client;
