//! [`MemoryJournal`]: the journal in memory, for tests and the deterministic simulation.
//! It keeps the same rules as the durable journals (compare-and-set appends and roles, one
//! seal per record, fencing by the lease token) and passes the same conformance suite;
//! nothing survives the process.
//!
//! [`MemoryJournal::deferred`] models a journal that writes records and seals at once but
//! makes them durable only at the next [`Log::flush`] or durable write
//! (`journal_sync = "overlap"` on SQL): [`MemoryJournal::power_loss`] then drops what was
//! not durable, as a power loss of the journal's host would.

use std::collections::{BTreeMap, HashMap};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use async_trait::async_trait;
use tokio::time::Instant;

use super::{
    Checkpoints, JournalError, Lease, Log, LogState, MemberSpec, Membership, Outcome, Owner,
    OwnerInfo, RoleStore, StoredMembers, StoredRole,
};
use crate::record::{Record, RecordState};

#[derive(Debug, Clone, Default)]
struct Group {
    role: Option<StoredRole>,
    records: BTreeMap<u64, Record>,
    checkpoints: HashMap<String, u64>,
    diverged: HashMap<String, String>,
    members: Option<StoredMembers>,
}

#[derive(Debug, Clone)]
struct Held {
    info: OwnerInfo,
    until: Instant,
}

#[derive(Debug, Clone, Default)]
struct Store {
    groups: HashMap<String, Group>,
    lease: Option<Held>,
    tokens: u64,
}

/// A journal in memory. Clones share the store (as two processes share one database);
/// each handle carries its own lease token, so [`MemoryJournal::handle`] gives a second
/// "process" on the same store.
#[derive(Debug, Clone, Default)]
pub struct MemoryJournal {
    store: Arc<Mutex<Store>>,
    token: Arc<Mutex<Option<u64>>>,
    /// With deferred writes: what is durable (the store as of the last flush or durable
    /// write). `None`: every write is durable when it returns.
    disk: Option<Arc<Mutex<Store>>>,
}

impl MemoryJournal {
    /// An empty journal.
    pub fn new() -> Self {
        Self::default()
    }

    /// An empty journal whose appends and seals are durable only at the next
    /// [`Log::flush`] or durable write (a role, a restamp, a lease, a membership change:
    /// each makes everything before it durable too, as one file's sync does).
    pub fn deferred() -> Self {
        MemoryJournal {
            disk: Some(Arc::default()),
            ..Self::default()
        }
    }

    /// Another handle on the same store with no lease of its own (another process).
    pub fn handle(&self) -> Self {
        MemoryJournal {
            store: self.store.clone(),
            token: Arc::new(Mutex::new(None)),
            disk: self.disk.clone(),
        }
    }

    /// A power loss of the journal's host: every write not yet durable is gone. Nothing
    /// changes on a journal without deferred writes.
    pub fn power_loss(&self) {
        if let Some(disk) = &self.disk {
            let durable = disk.lock().unwrap_or_else(|p| p.into_inner()).clone();
            *self.lock() = durable;
        }
    }

    /// This handle's process is gone (it lost power with the journal's host): every later
    /// write through it is refused as fenced, as a dead process writes nothing.
    pub fn lose_process(&self) {
        *self.token.lock().unwrap_or_else(|p| p.into_inner()) = Some(u64::MAX);
    }

    /// Makes everything written so far durable.
    fn sync(&self, store: &Store) {
        if let Some(disk) = &self.disk {
            *disk.lock().unwrap_or_else(|p| p.into_inner()) = store.clone();
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Store> {
        self.store.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn my_token(&self) -> Option<u64> {
        *self.token.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Runs a write under the store lock, refusing it when another handle holds the lease
    /// (a handle that never claimed writes freely only while nobody holds one).
    fn write<T>(
        &self,
        f: impl FnOnce(&mut Store) -> Result<T, JournalError>,
    ) -> Result<T, JournalError> {
        let mut store = self.lock();
        let r = Self::fenced_write(&self.my_token(), &mut store, f);
        if r.is_ok() {
            self.sync(&store);
        }
        r
    }

    /// A write that is durable only at the next flush or durable write (with deferred
    /// writes; like [`MemoryJournal::write`] otherwise).
    fn write_deferred<T>(
        &self,
        f: impl FnOnce(&mut Store) -> Result<T, JournalError>,
    ) -> Result<T, JournalError> {
        if self.disk.is_none() {
            return self.write(f);
        }
        let mut store = self.lock();
        Self::fenced_write(&self.my_token(), &mut store, f)
    }

    fn fenced_write<T>(
        token: &Option<u64>,
        store: &mut Store,
        f: impl FnOnce(&mut Store) -> Result<T, JournalError>,
    ) -> Result<T, JournalError> {
        if let Some(held) = &store.lease
            && Some(held.info.token) != *token
        {
            return Err(JournalError::Fenced {
                holder: held.info.describe.clone(),
            });
        }
        f(store)
    }
}

fn group_mut<'a>(store: &'a mut Store, group: &str) -> &'a mut Group {
    store.groups.entry(group.to_owned()).or_default()
}

#[async_trait]
impl Log for MemoryJournal {
    async fn open_log(&self, group: &str) -> Result<LogState, JournalError> {
        self.write(|s| {
            let g = group_mut(s, group);
            for r in g.records.values_mut() {
                if r.state == RecordState::Pending {
                    r.state = RecordState::InDoubt;
                }
            }
            Ok(LogState {
                head: g.records.keys().next_back().copied().unwrap_or(0),
                unsealed: g
                    .records
                    .values()
                    .filter(|r| !r.state.is_sealed())
                    .cloned()
                    .collect(),
            })
        })
    }

    async fn append(&self, record: &Record) -> Result<(), JournalError> {
        self.write_deferred(|s| {
            let g = group_mut(s, &record.group);
            let head = g.records.keys().next_back().copied().unwrap_or(0);
            if record.seq != head + 1 {
                return Err(JournalError::Gap {
                    group: record.group.clone(),
                    expected: head + 1,
                    got: record.seq,
                });
            }
            let mut stored = record.clone();
            stored.state = RecordState::Pending;
            stored.fingerprint = None;
            g.records.insert(record.seq, stored);
            Ok(())
        })
    }

    async fn seal(&self, group: &str, seq: u64, outcome: &Outcome) -> Result<(), JournalError> {
        self.write_deferred(|s| {
            let r = group_mut(s, group).records.get_mut(&seq).ok_or_else(|| {
                JournalError::NoSuchRecord {
                    group: group.to_owned(),
                    seq,
                }
            })?;
            let (state, fingerprint) = match outcome {
                Outcome::Executed(fp) => (RecordState::Executed, fp.clone()),
                Outcome::Skipped => (RecordState::Skipped, None),
            };
            if r.state.is_sealed() {
                if r.state == state && r.fingerprint == fingerprint {
                    return Ok(());
                }
                return Err(JournalError::Conflict {
                    group: group.to_owned(),
                    what: format!("record {seq} is already sealed {}", r.state.as_str()),
                });
            }
            r.state = state;
            r.fingerprint = fingerprint;
            Ok(())
        })
    }

    async fn restamp(
        &self,
        group: &str,
        seq: u64,
        epoch: u64,
        executor: &str,
    ) -> Result<(), JournalError> {
        self.write(|s| {
            let r = group_mut(s, group).records.get_mut(&seq).ok_or_else(|| {
                JournalError::NoSuchRecord {
                    group: group.to_owned(),
                    seq,
                }
            })?;
            if r.state.is_sealed() {
                return Err(JournalError::Conflict {
                    group: group.to_owned(),
                    what: format!("record {seq} is sealed and cannot be restamped"),
                });
            }
            r.epoch = epoch;
            r.add_executor(executor);
            Ok(())
        })
    }

    async fn read_after(
        &self,
        group: &str,
        after: u64,
        limit: u64,
    ) -> Result<Vec<Record>, JournalError> {
        let s = self.lock();
        let take = usize::try_from(limit).unwrap_or(usize::MAX);
        Ok(s.groups
            .get(group)
            .map(|g| {
                g.records
                    .range(after.saturating_add(1)..)
                    .take(take)
                    .map(|(_, r)| r.clone())
                    .collect()
            })
            .unwrap_or_default())
    }

    async fn record(&self, group: &str, seq: u64) -> Result<Option<Record>, JournalError> {
        Ok(self
            .lock()
            .groups
            .get(group)
            .and_then(|g| g.records.get(&seq).cloned()))
    }

    async fn truncate(&self, group: &str, through: u64) -> Result<u64, JournalError> {
        self.write(|s| {
            let g = group_mut(s, group);
            let head = g.records.keys().next_back().copied().unwrap_or(0);
            let bound = through.min(head.saturating_sub(1));
            if let Some(r) = g
                .records
                .range(..=bound)
                .map(|(_, r)| r)
                .find(|r| !r.state.is_sealed())
            {
                return Err(JournalError::Conflict {
                    group: group.to_owned(),
                    what: format!("record {} is not sealed and cannot be truncated", r.seq),
                });
            }
            let keep = g.records.split_off(&bound.saturating_add(1));
            let removed = g.records.len();
            g.records = keep;
            Ok(u64::try_from(removed).unwrap_or(u64::MAX))
        })
    }

    async fn low_water(&self, group: &str) -> Result<u64, JournalError> {
        Ok(self
            .lock()
            .groups
            .get(group)
            .and_then(|g| g.records.keys().next().copied())
            .map_or(0, |first| first - 1))
    }

    fn seals_durable(&self) -> bool {
        self.disk.is_none()
    }

    fn appends_durable(&self) -> bool {
        self.disk.is_none()
    }

    async fn flush(&self) -> Result<(), JournalError> {
        // A durable write of nothing; a fenced handle still hears that it is.
        self.write(|_| Ok(()))
    }
}

#[async_trait]
impl RoleStore for MemoryJournal {
    async fn role(&self, group: &str, primary: &str) -> Result<StoredRole, JournalError> {
        self.write(|s| {
            let g = group_mut(s, group);
            Ok(g.role
                .get_or_insert_with(|| StoredRole {
                    epoch: 1,
                    primary: primary.to_owned(),
                })
                .clone())
        })
    }

    async fn set_role(
        &self,
        group: &str,
        expected_epoch: u64,
        role: &StoredRole,
    ) -> Result<(), JournalError> {
        self.write(|s| {
            let g = group_mut(s, group);
            // A role is created by `role`; a compare-and-set on a group nobody opened is a
            // conflict, as in the SQL journal.
            let stored = g.role.as_ref().map(|r| r.epoch);
            if stored != Some(expected_epoch) || role.epoch <= expected_epoch {
                let stored = stored.map_or_else(|| "none".to_owned(), |e| e.to_string());
                return Err(JournalError::Conflict {
                    group: group.to_owned(),
                    what: format!(
                        "role at epoch {stored}, expected {expected_epoch} (new epoch {})",
                        role.epoch
                    ),
                });
            }
            g.role = Some(role.clone());
            Ok(())
        })
    }
}

#[async_trait]
impl Checkpoints for MemoryJournal {
    async fn checkpoint(&self, group: &str, partition: &str) -> Result<u64, JournalError> {
        Ok(self
            .lock()
            .groups
            .get(group)
            .and_then(|g| g.checkpoints.get(partition).copied())
            .unwrap_or(0))
    }

    async fn save_checkpoint(
        &self,
        group: &str,
        partition: &str,
        applied: u64,
    ) -> Result<(), JournalError> {
        self.write(|s| {
            group_mut(s, group)
                .checkpoints
                .insert(partition.to_owned(), applied);
            Ok(())
        })
    }

    async fn diverged(&self, group: &str, partition: &str) -> Result<Option<String>, JournalError> {
        Ok(self
            .lock()
            .groups
            .get(group)
            .and_then(|g| g.diverged.get(partition).cloned()))
    }

    async fn set_diverged(
        &self,
        group: &str,
        partition: &str,
        reason: Option<&str>,
    ) -> Result<(), JournalError> {
        self.write(|s| {
            let g = group_mut(s, group);
            match reason {
                Some(r) => g.diverged.insert(partition.to_owned(), r.to_owned()),
                None => g.diverged.remove(partition),
            };
            Ok(())
        })
    }
}

#[async_trait]
impl Membership for MemoryJournal {
    async fn members(&self, group: &str) -> Result<Option<StoredMembers>, JournalError> {
        Ok(self
            .lock()
            .groups
            .get(group)
            .and_then(|g| g.members.clone()))
    }

    async fn set_members(
        &self,
        group: &str,
        expected_version: u64,
        partitions: &[MemberSpec],
    ) -> Result<u64, JournalError> {
        self.write(|s| {
            let conflict = |what: String| JournalError::Conflict {
                group: group.to_owned(),
                what,
            };
            let g = s
                .groups
                .get_mut(group)
                .filter(|g| g.role.is_some())
                .ok_or_else(|| conflict("the group does not exist".to_owned()))?;
            let stored = g.members.as_ref().map_or(0, |m| m.version);
            if stored != expected_version {
                return Err(conflict(format!(
                    "membership at version {stored}, expected {expected_version}"
                )));
            }
            let version = stored + 1;
            g.members = Some(StoredMembers {
                version,
                partitions: partitions.to_vec(),
            });
            Ok(version)
        })
    }
}

#[async_trait]
impl Lease for MemoryJournal {
    async fn claim(&self, owner: &Owner, ttl: Duration) -> Result<u64, JournalError> {
        let mut s = self.lock();
        let now = Instant::now();
        if let Some(held) = &s.lease
            && held.until > now
            && held.info.id != owner.id
        {
            return Err(JournalError::Fenced {
                holder: held.info.describe.clone(),
            });
        }
        s.tokens += 1;
        let token = s.tokens;
        s.lease = Some(Held {
            info: OwnerInfo {
                id: owner.id.clone(),
                describe: owner.describe.clone(),
                token,
                remaining_ms: 0,
            },
            until: now + ttl,
        });
        *self.token.lock().unwrap_or_else(|p| p.into_inner()) = Some(token);
        Ok(token)
    }

    async fn renew(&self, ttl: Duration) -> Result<(), JournalError> {
        let mine = self.my_token();
        let mut s = self.lock();
        match &mut s.lease {
            Some(held) if Some(held.info.token) == mine => {
                held.until = Instant::now() + ttl;
                Ok(())
            }
            Some(held) => Err(JournalError::Fenced {
                holder: held.info.describe.clone(),
            }),
            None => Err(JournalError::Fenced {
                holder: "nobody (the lease was released)".to_owned(),
            }),
        }
    }

    async fn release(&self) -> Result<(), JournalError> {
        let mine = self.my_token();
        let mut s = self.lock();
        if s.lease.as_ref().is_some_and(|h| Some(h.info.token) == mine) {
            s.lease = None;
        }
        Ok(())
    }

    async fn owner(&self) -> Result<Option<OwnerInfo>, JournalError> {
        let s = self.lock();
        let now = Instant::now();
        Ok(s.lease.as_ref().map(|h| {
            let mut info = h.info.clone();
            info.remaining_ms =
                u64::try_from(h.until.saturating_duration_since(now).as_millis()).unwrap_or(0);
            info
        }))
    }
}
