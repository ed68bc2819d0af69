//! regroup's SQL mode: a sea-orm connection over a redundancy group of database copies.
//!
//! See the crate's DESIGN section below.
pub mod classify;
pub mod rewrite;
