//! The replay headers: the wire contract between regroup and applications.
//!
//! Every update forwarded to the primary and every replay carries these headers; the
//! app-side layer turns them into a replay context. Names are lowercase, as HTTP/2 and
//! the `http` crate store them; HTTP/1 matching is case-insensitive.

/// The transaction's position in its group's journal (dense, from 1). Also returned to
/// the client on the answer to an update.
pub const SEQ: &str = "regroup-seq";
/// The transaction's UUID (v7), the same on every partition.
pub const TXN_ID: &str = "regroup-txn-id";
/// The primary's term; an app layer refuses updates from an older epoch.
pub const EPOCH: &str = "regroup-epoch";
/// The time fixed at the primary (RFC 3339, UTC); use it instead of the wall clock.
pub const TIMESTAMP: &str = "regroup-timestamp";
/// `1` on replays; absent on the primary's execution.
pub const REPLAY: &str = "regroup-replay";

/// The sending proxy's term: the fencing token of its claim on the journal (it goes up
/// with every proxy that takes the journal over). A partition's app layer refuses a request
/// whose term is below the highest it has seen with 409 `deposed` (and this header set to
/// that highest term): a proxy that was frozen and taken over cannot deliver its late
/// updates or replays to a partition the new proxy already talks to.
pub const TERM: &str = "regroup-term";

/// The seq of the record the sender last delivered to this partition (by the partition's
/// own word: its `Regroup-Applied`), sent when the sender knows it. A partition's app layer
/// that keeps the exactly-once record applies a record only right after that one (a
/// re-delivery of a recorded seq is answered from the record): a sender that is out of
/// date — a proxy that was frozen and taken over, a copy reset behind its back — is refused
/// with 409 `behind` or `out_of_order` and `Regroup-Applied`, and nothing is applied.
pub const PREV: &str = "regroup-prev";

/// `1` when the record was sent right behind its predecessor (the seq in `Regroup-Prev`)
/// while that one may still be on its way or executing: a layer that has not recorded the
/// predecessor yet waits for it, bounded, instead of refusing at once. Without it, a
/// `Regroup-Prev` ahead of the partition is refused with 409 `behind` immediately.
pub const PIPELINED: &str = "regroup-pipelined";

/// Parallel replay (conflict keys): the seqs, comma-separated, of the records sent before
/// this one that it conflicts with and that may still be on their way or executing. Sent
/// instead of `Regroup-Prev`, always with `Regroup-Floor` and `Regroup-Pipelined`: a layer
/// that keeps the exactly-once record applies the record only once each of them is
/// recorded (waiting for them, bounded), and refuses it as `behind` when one finished
/// unrecorded. Empty: it depends on nothing in flight.
pub const AFTER: &str = "regroup-after";

/// Parallel replay: the sender's floor when it sent the record, a seq below it such that
/// every record at or below it that this partition needs is recorded there. The layer stores
/// it with the record and reports the highest floor it holds as `resume` (where a sender
/// resumes safely after a restart), and refuses the record as `behind` when the floor is
/// above what it recorded (a copy restored from an older backup).
pub const FLOOR: &str = "regroup-floor";

/// Where a record sent pipelined (`Regroup-Pipelined: 1`: records before it may still be on
/// their way or executing) stands in order at the partition's layer.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Behind<'a> {
    /// Right behind this record ([`PREV`]): applied after it, one at a time in seq order.
    Prev(u64),
    /// Parallel replay: behind only these records ([`AFTER`]), with every record at or below
    /// `floor` recorded there ([`FLOOR`]).
    After {
        /// The records sent before it that it conflicts with.
        after: &'a [u64],
        /// The sender's floor when it sent the record.
        floor: u64,
    },
}

/// On every answer of a partition that keeps the exactly-once record: the highest seq it
/// has applied. The proxy refuses to serve a read from a partition whose answer says it
/// stands further behind the sealed head than the group allows (a copy restored from an
/// older backup, before supervision noticed).
pub const APPLIED: &str = "regroup-applied";
/// HMAC-SHA256 over the other replay headers, the method, path and body hash, with the
/// secret shared by the proxy and its partitions (see [`crate::signature`]).
pub const SIGNATURE: &str = "regroup-signature";

/// All replay headers, for stripping them from client requests (a client must not be
/// able to forge a replay).
pub const ALL: [&str; 11] = [
    SEQ, TXN_ID, EPOCH, TIMESTAMP, REPLAY, TERM, PREV, PIPELINED, AFTER, FLOOR, SIGNATURE,
];
