//! [`CachedJournal`]: keeps each group's most recent records in memory, so replayers that
//! follow the head read them without a database round trip. Writes go through to the
//! wrapped journal first; the cache only ever holds what the journal holds.

use std::collections::{HashMap, VecDeque};
use std::sync::Mutex;

use async_trait::async_trait;

use super::{
    Checkpoints, JournalError, Lease, Log, LogState, MemberSpec, Membership, Outcome, Owner,
    OwnerInfo, RoleStore, StoredMembers, StoredRole,
};
use crate::record::{Record, RecordState};

/// Records kept per group at most.
pub(super) const CACHE_RECORDS: usize = 4096;
/// Request-body bytes kept per group at most.
pub(super) const CACHE_BYTES: usize = 64 * 1024 * 1024;

#[derive(Default)]
struct Tail {
    records: VecDeque<Record>,
    bytes: usize,
}

impl Tail {
    fn get_mut(&mut self, seq: u64) -> Option<&mut Record> {
        let first = self.records.front()?.seq;
        let i = usize::try_from(seq.checked_sub(first)?).ok()?;
        self.records.get_mut(i)
    }

    fn push(&mut self, record: Record) {
        if self.records.back().is_some_and(|b| b.seq + 1 != record.seq) {
            self.records.clear();
            self.bytes = 0;
        }
        self.bytes += record.payload.size();
        self.records.push_back(record);
        while self.records.len() > CACHE_RECORDS || self.bytes > CACHE_BYTES {
            match self.records.pop_front() {
                Some(r) => self.bytes -= r.payload.size(),
                None => break,
            }
        }
    }
}

/// A journal with an in-memory tail per group.
pub struct CachedJournal<J> {
    inner: J,
    tails: Mutex<HashMap<String, Tail>>,
}

impl<J: std::fmt::Debug> std::fmt::Debug for CachedJournal<J> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("CachedJournal")
            .field("inner", &self.inner)
            .finish_non_exhaustive()
    }
}

impl<J> CachedJournal<J> {
    /// Wraps `inner`.
    pub fn new(inner: J) -> Self {
        CachedJournal {
            inner,
            tails: Mutex::new(HashMap::new()),
        }
    }

    /// The wrapped journal.
    pub fn get_ref(&self) -> &J {
        &self.inner
    }

    fn with_tail<T>(&self, group: &str, f: impl FnOnce(&mut Tail) -> T) -> T {
        let mut tails = self.tails.lock().unwrap_or_else(|p| p.into_inner());
        f(tails.entry(group.to_owned()).or_default())
    }
}

#[async_trait]
impl<J: Log> Log for CachedJournal<J> {
    async fn open_log(&self, group: &str) -> Result<LogState, JournalError> {
        let state = self.inner.open_log(group).await?;
        self.with_tail(group, |t| *t = Tail::default());
        Ok(state)
    }

    async fn append(&self, record: &Record) -> Result<(), JournalError> {
        self.inner.append(record).await?;
        // As the journal stores it: pending, no answer yet.
        let mut stored = record.clone();
        stored.state = RecordState::Pending;
        stored.fingerprint = None;
        self.with_tail(&record.group, |t| t.push(stored));
        Ok(())
    }

    async fn seal(&self, group: &str, seq: u64, outcome: &Outcome) -> Result<(), JournalError> {
        self.inner.seal(group, seq, outcome).await?;
        self.with_tail(group, |t| {
            if let Some(r) = t.get_mut(seq) {
                match outcome {
                    Outcome::Executed(fp) => {
                        r.state = RecordState::Executed;
                        r.fingerprint = fp.clone();
                    }
                    Outcome::Skipped => {
                        r.state = RecordState::Skipped;
                        r.fingerprint = None;
                    }
                }
            }
        });
        Ok(())
    }

    async fn restamp(
        &self,
        group: &str,
        seq: u64,
        epoch: u64,
        executor: &str,
    ) -> Result<(), JournalError> {
        self.inner.restamp(group, seq, epoch, executor).await?;
        self.with_tail(group, |t| {
            if let Some(r) = t.get_mut(seq) {
                r.epoch = epoch;
                r.add_executor(executor);
            }
        });
        Ok(())
    }

    async fn read_after(
        &self,
        group: &str,
        after: u64,
        limit: u64,
    ) -> Result<Vec<Record>, JournalError> {
        let cached = self.with_tail(group, |t| {
            let first = t.records.front()?.seq;
            if after + 1 < first || after >= t.records.back()?.seq {
                return None;
            }
            let skip = usize::try_from(after + 1 - first).ok()?;
            let take = usize::try_from(limit).unwrap_or(usize::MAX);
            Some(t.records.iter().skip(skip).take(take).cloned().collect())
        });
        match cached {
            Some(records) => Ok(records),
            None => self.inner.read_after(group, after, limit).await,
        }
    }

    async fn record(&self, group: &str, seq: u64) -> Result<Option<Record>, JournalError> {
        if let Some(r) = self.with_tail(group, |t| t.get_mut(seq).map(|r| r.clone())) {
            return Ok(Some(r));
        }
        self.inner.record(group, seq).await
    }

    async fn truncate(&self, group: &str, through: u64) -> Result<u64, JournalError> {
        let removed = self.inner.truncate(group, through).await?;
        // The journal kept its newest record; so does the tail.
        self.with_tail(group, |t| {
            while t.records.len() > 1 && t.records.front().is_some_and(|r| r.seq <= through) {
                if let Some(r) = t.records.pop_front() {
                    t.bytes -= r.payload.size();
                }
            }
        });
        Ok(removed)
    }

    async fn low_water(&self, group: &str) -> Result<u64, JournalError> {
        self.inner.low_water(group).await
    }

    fn seals_durable(&self) -> bool {
        self.inner.seals_durable()
    }

    fn appends_durable(&self) -> bool {
        self.inner.appends_durable()
    }

    fn record_limit(&self) -> Option<(usize, &'static str)> {
        self.inner.record_limit()
    }

    async fn flush(&self) -> Result<(), JournalError> {
        self.inner.flush().await
    }
}

#[async_trait]
impl<J: RoleStore> RoleStore for CachedJournal<J> {
    async fn role(&self, group: &str, primary: &str) -> Result<StoredRole, JournalError> {
        self.inner.role(group, primary).await
    }

    async fn set_role(
        &self,
        group: &str,
        expected_epoch: u64,
        role: &StoredRole,
    ) -> Result<(), JournalError> {
        self.inner.set_role(group, expected_epoch, role).await
    }
}

#[async_trait]
impl<J: Checkpoints> Checkpoints for CachedJournal<J> {
    async fn checkpoint(&self, group: &str, partition: &str) -> Result<u64, JournalError> {
        self.inner.checkpoint(group, partition).await
    }

    async fn save_checkpoint(
        &self,
        group: &str,
        partition: &str,
        applied: u64,
    ) -> Result<(), JournalError> {
        self.inner.save_checkpoint(group, partition, applied).await
    }

    async fn diverged(&self, group: &str, partition: &str) -> Result<Option<String>, JournalError> {
        self.inner.diverged(group, partition).await
    }

    async fn set_diverged(
        &self,
        group: &str,
        partition: &str,
        reason: Option<&str>,
    ) -> Result<(), JournalError> {
        self.inner.set_diverged(group, partition, reason).await
    }
}

#[async_trait]
impl<J: Membership> Membership for CachedJournal<J> {
    async fn members(&self, group: &str) -> Result<Option<StoredMembers>, JournalError> {
        self.inner.members(group).await
    }

    async fn set_members(
        &self,
        group: &str,
        expected_version: u64,
        partitions: &[MemberSpec],
    ) -> Result<u64, JournalError> {
        self.inner
            .set_members(group, expected_version, partitions)
            .await
    }
}

#[async_trait]
impl<J: Lease> Lease for CachedJournal<J> {
    async fn claim(&self, owner: &Owner, ttl: std::time::Duration) -> Result<u64, JournalError> {
        self.inner.claim(owner, ttl).await
    }

    async fn renew(&self, ttl: std::time::Duration) -> Result<(), JournalError> {
        self.inner.renew(ttl).await
    }

    async fn release(&self) -> Result<(), JournalError> {
        self.inner.release().await
    }

    async fn owner(&self) -> Result<Option<OwnerInfo>, JournalError> {
        self.inner.owner().await
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::journal::{Journal, SqlJournal};
    use crate::record::{Fingerprint, RecordedRequest};
    use bytes::Bytes;

    #[tokio::test]
    #[allow(clippy::unwrap_used)]
    async fn the_cache_answers_like_the_journal() {
        let dir = tempfile::tempdir().unwrap();
        let url = format!("sqlite://{}", dir.path().join("j.db").display());
        let j = CachedJournal::new(SqlJournal::connect(&url).await.unwrap());
        j.open_group("g", "a").await.unwrap();
        for seq in 1..=5u64 {
            let r = Record::pending(
                "g",
                seq,
                1,
                RecordedRequest {
                    method: "POST".into(),
                    uri: "/".into(),
                    headers: vec![],
                    body: Bytes::from(format!("{seq}")),
                },
            );
            j.append(&r).await.unwrap();
            let outcome = if seq == 3 {
                Outcome::Skipped
            } else {
                Outcome::Executed(Some(Fingerprint::of(200, b"x")))
            };
            if seq < 5 {
                j.seal("g", seq, &outcome).await.unwrap();
            }
        }
        j.restamp("g", 5, 2, "b").await.unwrap();
        for (after, limit) in [(0, 10), (2, 2), (4, 1), (5, 3)] {
            assert_eq!(
                j.read_after("g", after, limit).await.unwrap(),
                j.get_ref().read_after("g", after, limit).await.unwrap(),
                "after {after} limit {limit}"
            );
        }
        assert_eq!(
            j.record("g", 5).await.unwrap(),
            j.get_ref().record("g", 5).await.unwrap()
        );
        // A failed append leaves the cache alone.
        let bad = Record::pending(
            "g",
            9,
            1,
            RecordedRequest {
                method: "POST".into(),
                uri: "/".into(),
                headers: vec![],
                body: Bytes::new(),
            },
        );
        assert!(j.append(&bad).await.is_err());
        assert_eq!(j.read_after("g", 4, 10).await.unwrap().len(), 1);
    }
}
