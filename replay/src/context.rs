//! The replay context: what an application uses instead of the wall clock, random numbers
//! and fresh UUIDs, so that every partition computes the same result from the same
//! transaction.

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};

use http::HeaderMap;
use rand::SeedableRng;
use rand_chacha::ChaCha8Rng;
use sha2::{Digest, Sha256};
use time::OffsetDateTime;
use uuid::Uuid;

use crate::headers;
use crate::record::parse_timestamp;

/// The transaction an update belongs to, as regroup delivered it: the same on the primary
/// and on every replay.
///
/// ```
/// use regroup_replay::ReplayContext;
/// let txn = uuid::Uuid::now_v7();
/// let now = time::OffsetDateTime::now_utc();
/// let on_primary = ReplayContext::new(7, txn, 1, now, false);
/// let on_replica = ReplayContext::new(7, txn, 1, now, true);
/// assert_eq!(on_primary.uuid(), on_replica.uuid());
/// assert_eq!(on_primary.uuid(), on_replica.uuid()); // the second call matches too
/// assert_eq!(on_primary.now(), on_replica.now());
/// use rand::Rng;
/// assert_eq!(on_primary.rng().random::<u64>(), on_replica.rng().random::<u64>());
/// ```
#[derive(Debug, Clone)]
pub struct ReplayContext {
    seq: u64,
    txn_id: Uuid,
    epoch: u64,
    now: OffsetDateTime,
    replay: bool,
    /// `Regroup-Floor` (parallel replay): recorded with the transaction.
    floor: Option<u64>,
    uuids: Arc<AtomicU64>,
    rngs: Arc<AtomicU64>,
}

/// The replay headers are present but malformed.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("invalid replay header {header}: {reason}")]
pub struct HeaderError {
    /// The header at fault.
    pub header: &'static str,
    /// What is wrong.
    pub reason: String,
}

impl ReplayContext {
    /// A context from its parts.
    pub fn new(seq: u64, txn_id: Uuid, epoch: u64, now: OffsetDateTime, replay: bool) -> Self {
        ReplayContext {
            seq,
            txn_id,
            epoch,
            now,
            replay,
            floor: None,
            uuids: Arc::new(AtomicU64::new(0)),
            rngs: Arc::new(AtomicU64::new(0)),
        }
    }

    /// Reads the replay headers: `Ok(None)` when the request did not come through regroup
    /// as an update (no `Regroup-Seq`).
    pub fn from_headers(h: &HeaderMap) -> Result<Option<Self>, HeaderError> {
        if !h.contains_key(headers::SEQ) {
            return Ok(None);
        }
        let text = |name: &'static str| -> Result<&str, HeaderError> {
            h.get(name)
                .ok_or_else(|| HeaderError {
                    header: name,
                    reason: "missing".into(),
                })?
                .to_str()
                .map_err(|_| HeaderError {
                    header: name,
                    reason: "not ASCII".into(),
                })
        };
        let seq = text(headers::SEQ)?
            .parse::<u64>()
            .map_err(|e| HeaderError {
                header: headers::SEQ,
                reason: e.to_string(),
            })?;
        let txn_id = Uuid::parse_str(text(headers::TXN_ID)?).map_err(|e| HeaderError {
            header: headers::TXN_ID,
            reason: e.to_string(),
        })?;
        let epoch = text(headers::EPOCH)?
            .parse::<u64>()
            .map_err(|e| HeaderError {
                header: headers::EPOCH,
                reason: e.to_string(),
            })?;
        let now = parse_timestamp(text(headers::TIMESTAMP)?).ok_or_else(|| HeaderError {
            header: headers::TIMESTAMP,
            reason: "not an RFC 3339 time".into(),
        })?;
        let replay = h.get(headers::REPLAY).is_some_and(|v| v == "1");
        let floor = match h.get(headers::FLOOR) {
            None => None,
            Some(_) => Some(
                text(headers::FLOOR)?
                    .parse::<u64>()
                    .map_err(|e| HeaderError {
                        header: headers::FLOOR,
                        reason: e.to_string(),
                    })?,
            ),
        };
        Ok(Some(
            ReplayContext::new(seq, txn_id, epoch, now, replay).with_floor(floor),
        ))
    }

    /// The same context delivered out of seq order with this floor (`Regroup-Floor`): see
    /// [`ReplayContext::floor`].
    pub fn with_floor(mut self, floor: Option<u64>) -> Self {
        self.floor = floor;
        self
    }

    /// Parallel replay: the sender's floor (every record at or below it that this
    /// partition needs is recorded here), when the record was sent out of seq order, behind
    /// only the records it conflicts with. [`crate::ExactlyOnce`] records it with the
    /// transaction.
    pub fn floor(&self) -> Option<u64> {
        self.floor
    }

    /// The transaction's position in its group's journal.
    pub fn seq(&self) -> u64 {
        self.seq
    }

    /// The transaction's UUID, the same on every partition.
    pub fn txn_id(&self) -> Uuid {
        self.txn_id
    }

    /// The primary's term when the transaction was executed.
    pub fn epoch(&self) -> u64 {
        self.epoch
    }

    /// Whether this delivery is a replay (not the primary's execution).
    pub fn is_replay(&self) -> bool {
        self.replay
    }

    /// The time fixed at the primary: use it instead of the wall clock.
    pub fn now(&self) -> OffsetDateTime {
        self.now
    }

    /// The next UUID of this transaction: the n-th call gives the same UUID (version 8,
    /// derived from the transaction id and n) on every partition.
    pub fn uuid(&self) -> Uuid {
        let n = self.uuids.fetch_add(1, Ordering::Relaxed);
        let digest = self.derive(b"uuid", n);
        let mut bytes = [0u8; 16];
        bytes.copy_from_slice(&digest[..16]);
        Uuid::new_v8(bytes)
    }

    /// A random number generator seeded from the transaction id: the n-th generator of a
    /// transaction yields the same sequence on every partition.
    pub fn rng(&self) -> ChaCha8Rng {
        let n = self.rngs.fetch_add(1, Ordering::Relaxed);
        ChaCha8Rng::from_seed(self.derive(b"rng", n))
    }

    fn derive(&self, what: &[u8], n: u64) -> [u8; 32] {
        let mut h = Sha256::new();
        h.update(self.txn_id.as_bytes());
        h.update(what);
        h.update(n.to_be_bytes());
        h.finalize().into()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use http::HeaderValue;

    fn headers(seq: &'static str) -> HeaderMap {
        let mut h = HeaderMap::new();
        h.insert(headers::SEQ, HeaderValue::from_static(seq));
        h.insert(
            headers::TXN_ID,
            HeaderValue::from_static("0190b6e0-0000-7000-8000-000000000001"),
        );
        h.insert(headers::EPOCH, HeaderValue::from_static("3"));
        h.insert(
            headers::TIMESTAMP,
            HeaderValue::from_static("2026-11-30T12:00:00.5Z"),
        );
        h
    }

    #[test]
    fn parses_headers_and_derives_the_same_values_twice() {
        let a = ReplayContext::from_headers(&headers("12"))
            .expect("valid")
            .expect("present");
        let mut h = headers("12");
        h.insert(headers::REPLAY, HeaderValue::from_static("1"));
        let b = ReplayContext::from_headers(&h)
            .expect("valid")
            .expect("present");
        assert_eq!(
            (a.seq(), a.epoch(), a.is_replay(), b.is_replay()),
            (12, 3, false, true)
        );
        assert_eq!(a.now(), b.now());
        let (u1, u2) = (a.uuid(), a.uuid());
        assert_ne!(u1, u2);
        assert_eq!((u1, u2), (b.uuid(), b.uuid()));
        assert_eq!(u1.get_version_num(), 8);
    }

    #[test]
    fn absent_and_malformed_headers() {
        assert!(
            ReplayContext::from_headers(&HeaderMap::new())
                .expect("ok")
                .is_none()
        );
        let e = ReplayContext::from_headers(&headers("x")).expect_err("bad seq");
        assert_eq!(e.header, headers::SEQ);
        let mut h = headers("1");
        h.remove(headers::TIMESTAMP);
        let e = ReplayContext::from_headers(&h).expect_err("missing");
        assert_eq!(
            e.to_string(),
            "invalid replay header regroup-timestamp: missing"
        );
    }
}
