//! A redundancy group at run time: its partitions, the primary role and epoch, the journal
//! head, the write slot that serializes updates, and in-doubt records.

use std::collections::HashMap;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};

use regroup_replay::{Journal, Outcome, Record, RecordState};
use tokio::sync::{Mutex, watch};
use tokio::task::JoinHandle;

use crate::classify::Classifier;
use crate::config::{GroupConfig, base_uri};
use crate::error::ProxyError;
use crate::forward::Upstream;
use crate::partition::{Health, Partition, PartitionView};
use crate::status::PartitionStatus;

/// One redundancy group.
pub struct Group {
    pub(crate) config: GroupConfig,
    pub(crate) classifier: Classifier,
    /// Signs the replay headers of every forward and replay, when set.
    pub(crate) signer: Option<regroup_replay::signature::Secret>,
    pub(crate) partitions: Vec<Arc<Partition>>,
    pub(crate) journal: Arc<dyn Journal>,
    pub(crate) client: Upstream,
    primary: AtomicUsize,
    /// The primary's term. Bumped (and made durable) before a new primary is chosen, so
    /// no answer from a deposed primary can be sealed afterwards.
    pub(crate) epoch: watch::Sender<u64>,
    /// Highest seq appended to the journal.
    head: AtomicU64,
    /// Highest seq up to which every record is sealed: what replicas may replay.
    pub(crate) sealed: watch::Sender<u64>,
    /// The lowest record whose execution is unknown, if any. Updates wait while set.
    pub(crate) in_doubt: watch::Sender<Option<u64>>,
    /// The partition that may have executed the in-doubt record.
    pub(crate) in_doubt_by: std::sync::Mutex<Option<usize>>,
    /// Serializes the group's updates (held from append to seal).
    pub(crate) write_slot: Mutex<()>,
    /// Held while an answer is sealed, and while the epoch is bumped: a seal checks the
    /// epoch it was sent in under it.
    pub(crate) seal_gate: Mutex<()>,
    /// One role change (failover, promote) at a time.
    pub(crate) role_lock: Mutex<()>,
    /// One settlement of an in-doubt record at a time.
    pub(crate) settle_lock: Mutex<()>,
    /// True while the primary role is moving: new updates wait.
    pub(crate) switching: watch::Sender<bool>,
    /// Bumped whenever a partition's status or the primary may have changed.
    pub(crate) changed: watch::Sender<u64>,
    /// Set to stop the group's background tasks.
    pub(crate) stop: watch::Sender<bool>,
    /// The running replayers, by partition index.
    pub(crate) replayers: std::sync::Mutex<HashMap<usize, ReplayerHandle>>,
}

/// A running replayer and the way to stop it.
#[derive(Debug)]
pub(crate) struct ReplayerHandle {
    pub(crate) stop: watch::Sender<bool>,
    pub(crate) task: JoinHandle<()>,
}

impl std::fmt::Debug for Group {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Group")
            .field("name", &self.config.name)
            .field("epoch", &self.epoch())
            .field("head", &self.head())
            .finish_non_exhaustive()
    }
}

/// A point-in-time view of a group, for `/status`.
#[derive(Debug, Clone)]
pub struct GroupView {
    /// Name.
    pub name: String,
    /// The primary's name.
    pub primary: String,
    /// The primary's term.
    pub epoch: u64,
    /// Highest seq in the journal.
    pub head: u64,
    /// Highest seq every partition may replay.
    pub sealed: u64,
    /// Seqs whose execution is unknown.
    pub in_doubt: Vec<u64>,
    /// The partitions.
    pub partitions: Vec<PartitionView>,
}

impl Group {
    /// Loads the group's durable state from the journal and builds its partitions.
    /// Records found pending are now in doubt.
    pub async fn open(
        config: GroupConfig,
        journal: Arc<dyn Journal>,
        client: Upstream,
    ) -> Result<Arc<Group>, ProxyError> {
        let first = config
            .partitions
            .first()
            .map(|p| p.name.clone())
            .unwrap_or_default();
        let state = journal
            .open_group(&config.name, &first)
            .await
            .map_err(|e| ProxyError::Journal(e.to_string()))?;
        let mut partitions = Vec::with_capacity(config.partitions.len());
        for p in &config.partitions {
            let base = base_uri(&p.url).map_err(ProxyError::BadRequest)?;
            let applied = journal
                .checkpoint(&config.name, &p.name)
                .await
                .map_err(|e| ProxyError::Journal(e.to_string()))?;
            let partition = Partition::new(&p.name, &p.url, base, p.priority, applied);
            // A quarantine outlives restarts: never serve a diverged copy, not even briefly.
            if let Some(reason) = journal
                .diverged(&config.name, &p.name)
                .await
                .map_err(|e| ProxyError::Journal(e.to_string()))?
            {
                tracing::warn!(group = %config.name, partition = %p.name, %reason,
                    "partition is quarantined as diverged (regroup rejoin lifts it)");
                partition.set_diverged(&reason);
            }
            partitions.push(Arc::new(partition));
        }
        let primary = partitions
            .iter()
            .position(|p| p.name() == state.primary)
            .unwrap_or_else(|| {
                tracing::warn!(group = %config.name, stored = %state.primary,
                    "stored primary is no longer configured; using the first partition");
                0
            });
        let first_unsealed = state.unsealed.iter().map(|r| r.seq).min();
        let sealed = first_unsealed.map_or(state.head, |s| s - 1);
        for r in &state.unsealed {
            tracing::warn!(group = %config.name, seq = r.seq, "record found in doubt at start; \
                later updates wait until it is resolved (regroup resolve)");
        }
        if let Some(p) = partitions.get(primary) {
            // The primary executed every sealed record.
            p.set_applied(sealed);
        }
        let group = Arc::new(Group {
            classifier: config.classifier(),
            signer: config.signing_secret(),
            config,
            partitions,
            journal,
            client,
            primary: AtomicUsize::new(primary),
            epoch: watch::Sender::new(state.epoch),
            head: AtomicU64::new(state.head),
            sealed: watch::Sender::new(sealed),
            in_doubt: watch::Sender::new(first_unsealed),
            in_doubt_by: std::sync::Mutex::new(first_unsealed.map(|_| primary)),
            write_slot: Mutex::new(()),
            seal_gate: Mutex::new(()),
            role_lock: Mutex::new(()),
            settle_lock: Mutex::new(()),
            switching: watch::Sender::new(false),
            changed: watch::Sender::new(0),
            stop: watch::Sender::new(false),
            replayers: std::sync::Mutex::new(HashMap::new()),
        });
        Ok(group)
    }

    /// The group's name.
    pub fn name(&self) -> &str {
        &self.config.name
    }

    /// The group's configuration.
    pub fn config(&self) -> &GroupConfig {
        &self.config
    }

    /// The primary's term.
    pub fn epoch(&self) -> u64 {
        *self.epoch.borrow()
    }

    /// Highest seq in the journal.
    pub fn head(&self) -> u64 {
        self.head.load(Ordering::Acquire)
    }

    pub(crate) fn set_head(&self, seq: u64) {
        self.head.store(seq, Ordering::Release);
    }

    /// The partition holding the primary role.
    pub fn primary(&self) -> &Arc<Partition> {
        let i = self.primary.load(Ordering::Acquire);
        // The index always comes from `partitions`, which is never empty.
        &self.partitions[i.min(self.partitions.len() - 1)]
    }

    /// The primary's index in `partitions`.
    pub(crate) fn primary_index(&self) -> usize {
        self.primary
            .load(Ordering::Acquire)
            .min(self.partitions.len() - 1)
    }

    pub(crate) fn is_primary(&self, p: &Partition) -> bool {
        std::ptr::eq(self.primary().as_ref(), p)
    }

    /// Hands the primary role to partition `index` (the caller made it durable).
    pub(crate) fn set_primary(&self, index: usize) {
        self.primary.store(index, Ordering::Release);
        self.refresh_all();
        self.bump();
    }

    /// Wakes everyone watching `changed`.
    pub(crate) fn bump(&self) {
        self.changed.send_modify(|v| *v = v.wrapping_add(1));
    }

    /// The partition that may have executed the in-doubt record.
    pub(crate) fn in_doubt_by(&self) -> Option<usize> {
        *self.in_doubt_by.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Records that partition `by` may have executed the in-doubt record.
    pub(crate) fn set_in_doubt_by(&self, by: usize) {
        *self.in_doubt_by.lock().unwrap_or_else(|p| p.into_inner()) = Some(by);
    }

    /// Records that `seq` is in doubt, possibly executed by partition `by`.
    pub(crate) fn set_in_doubt(&self, seq: u64, by: usize) {
        self.set_in_doubt_by(by);
        self.in_doubt.send_replace(Some(seq));
        self.bump();
    }

    /// Clears the in-doubt record.
    pub(crate) fn clear_in_doubt(&self) {
        *self.in_doubt_by.lock().unwrap_or_else(|p| p.into_inner()) = None;
        self.in_doubt.send_replace(None);
        self.bump();
    }

    /// Marks `seq` sealed and advances what replicas may replay.
    pub(crate) fn sealed_through(&self, seq: u64) {
        self.primary().set_applied(seq);
        self.sealed.send_if_modified(|s| {
            if seq > *s {
                *s = seq;
                true
            } else {
                false
            }
        });
        self.refresh_all();
    }

    /// Re-derives every partition's status (cheap: a few locks), notifying watchers of a
    /// change.
    pub(crate) fn refresh_all(&self) {
        let mut changed = false;
        for p in &self.partitions {
            changed |= self.derive_status(p);
        }
        if changed {
            self.bump();
        }
    }

    /// Re-derives one partition's status.
    pub(crate) fn refresh(&self, p: &Partition) {
        if self.derive_status(p) {
            self.bump();
        }
    }

    fn derive_status(&self, p: &Partition) -> bool {
        let retries = self.config.heartbeat_retries;
        let sealed = *self.sealed.borrow();
        let (status, reason): (PartitionStatus, Box<dyn FnOnce() -> String>) = if let Some(why) =
            p.diverged()
        {
            (PartitionStatus::Diverged, Box::new(move || why))
        } else if p.is_draining() {
            (
                PartitionStatus::Draining,
                Box::new(|| "drained by an operator".to_owned()),
            )
        } else {
            match p.health() {
                Health::Missed(n) if n >= retries => (
                    PartitionStatus::Unavailable,
                    Box::new(move || format!("{n} consecutive heartbeats missed")),
                ),
                Health::Missed(n) => (
                    PartitionStatus::Suspect,
                    Box::new(move || format!("{n} heartbeat(s) missed")),
                ),
                Health::Up => {
                    let applied = p.applied();
                    // Hysteresis: an available replica falls behind past `max_read_lag`, and
                    // comes back once within half of it, so a replica hovering at the limit
                    // does not flap (and churn the read balancer) with every record.
                    let lag = if p.status() == PartitionStatus::Available {
                        self.config.max_read_lag
                    } else {
                        self.config.max_read_lag / 2
                    };
                    if !self.is_primary(p) && applied.saturating_add(lag) < sealed {
                        (
                            PartitionStatus::CatchingUp,
                            Box::new(move || format!("applied {applied} of {sealed}: replaying")),
                        )
                    } else {
                        (
                            PartitionStatus::Available,
                            Box::new(move || format!("answering, applied {applied}")),
                        )
                    }
                }
            }
        };
        p.update_status(self.name(), status, reason)
    }

    /// A snapshot for `/status`.
    pub fn view(&self) -> GroupView {
        GroupView {
            name: self.name().to_owned(),
            primary: self.primary().name().to_owned(),
            epoch: self.epoch(),
            head: self.head(),
            sealed: *self.sealed.borrow(),
            in_doubt: self.in_doubt.borrow().iter().copied().collect(),
            partitions: self.partitions.iter().map(|p| p.view()).collect(),
        }
    }

    /// Settles an in-doubt record as `executed` (replicas replay it without comparing
    /// answers: the primary's was never seen) or `skipped` (nobody replays it).
    pub async fn resolve(&self, seq: u64, executed: bool) -> Result<Record, ProxyError> {
        let _settling = self.settle_lock.lock().await;
        let current = *self.in_doubt.borrow();
        if current != Some(seq) {
            let record = self
                .journal
                .record(self.name(), seq)
                .await
                .map_err(|e| ProxyError::Journal(e.to_string()))?;
            return Err(match record {
                None => ProxyError::NoSuchRecord {
                    group: self.name().to_owned(),
                    seq,
                },
                Some(r) => ProxyError::NotInDoubt {
                    group: self.name().to_owned(),
                    seq,
                    state: r.state.as_str(),
                },
            });
        }
        let outcome = if executed {
            Outcome::Executed(None)
        } else {
            Outcome::Skipped
        };
        self.journal
            .seal(self.name(), seq, &outcome)
            .await
            .map_err(|e| ProxyError::Journal(e.to_string()))?;
        let record = self
            .journal
            .record(self.name(), seq)
            .await
            .map_err(|e| ProxyError::Journal(e.to_string()))?
            .ok_or_else(|| ProxyError::NoSuchRecord {
                group: self.name().to_owned(),
                seq,
            })?;
        tracing::info!(group = %self.name(), seq, outcome = record.state.as_str(),
            "in-doubt record resolved by an operator");
        debug_assert!(record.state != RecordState::InDoubt);
        self.clear_in_doubt();
        self.sealed_through(seq);
        Ok(record)
    }
}
