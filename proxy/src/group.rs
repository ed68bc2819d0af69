//! A redundancy group at run time: one explicit state, changed only by named transitions,
//! each logged with its reason (and kept in the group's recent transitions for `/status`).
//!
//! | part | what it holds | changed by |
//! | --- | --- | --- |
//! | role | epoch, primary and whether a hand-over runs: **one value** ([`Role`]) | `hand_over` (failover, promote, drain) |
//! | membership | partitions by stable id (their names), stored in the journal with a version | `add`, `remove` (membership.rs; the config only seeds a new group) |
//! | sequencer | head, sealed head, the write slot | `append`, `seal` (update.rs) |
//! | in doubt | the record whose execution is unknown, with the partitions that may have executed it (durable in the record) | `mark_in_doubt`, `settle`, `resolve` |
//! | per partition | health, applied (may go *down*), quarantine, draining | heartbeats, replays, `rewind`, `quarantine`, `rejoin`, `drain` |
//!
//! **Lock order** (outermost first; never take an earlier one while holding a later one):
//! `membership_lock` → `role_lock` → `write_slot` → `settle_lock` → `seal_gate` → the short `std::sync` locks
//! (members, replayers, transitions, a partition's state). The `std::sync` locks are never
//! held across an await.

use std::collections::{HashMap, VecDeque};
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};

use regroup_replay::{Journal, Outcome, Record, RecordState};
use time::OffsetDateTime;
use tokio::sync::{Mutex, watch};
use tokio::task::JoinHandle;

use crate::classify::Classifier;
use crate::config::{GroupConfig, base_uri};
use crate::error::ProxyError;
use crate::link::PartitionLink;
use crate::partition::{Health, Partition, PartitionView};
use crate::status::PartitionStatus;

/// The primary role, published as one value: an update reads who leads and in which term
/// in one look, so it can never pair a deposed primary with a new epoch.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Role {
    /// The primary's term.
    pub epoch: u64,
    /// The partition holding the role.
    pub primary: String,
    /// A hand-over to another partition runs: nothing is forwarded and no answer of an
    /// older epoch is sealed until it ends.
    pub handing_over: bool,
}

/// One named transition of the group's state, with its reason.
#[derive(Debug, Clone)]
pub struct Transition {
    /// When it happened.
    pub at: OffsetDateTime,
    /// Its name (`hand_over`, `seal`, `mark_in_doubt`, `settle`, `rewind`, `quarantine`, ...).
    pub name: &'static str,
    /// What changed and why.
    pub reason: String,
}

/// Transitions kept per group for `/status`.
const TRANSITIONS_KEPT: usize = 64;

/// One redundancy group.
pub struct Group {
    pub(crate) config: GroupConfig,
    pub(crate) classifier: Classifier,
    /// Which updates are independent (`conflict_keys`): replicas replay them in parallel.
    pub(crate) conflict_keys: Arc<regroup_replay::ConflictKeys>,
    members: std::sync::RwLock<Arc<[Arc<Partition>]>>,
    /// The version of the membership stored in the journal (its compare-and-set token).
    members_version: AtomicU64,
    /// One membership change at a time (outermost lock: taken before `role_lock`).
    pub(crate) membership_lock: Mutex<()>,
    /// How the config's partitions differ from the journal's membership (which wins).
    drift: Vec<String>,
    pub(crate) journal: Arc<dyn Journal>,
    /// How the core reaches partitions (updates, replays, heartbeats, positions).
    pub(crate) link: Arc<dyn PartitionLink>,
    role: watch::Sender<Role>,
    /// Highest seq appended to the journal.
    head: AtomicU64,
    /// Highest seq up to which every record is sealed *durably*: what replicas may replay.
    sealed: watch::Sender<u64>,
    /// Highest seq sealed in the journal, durable or not yet flushed.
    written: AtomicU64,
    /// Wakes the flusher when a seal waits for the journal's next flush.
    pub(crate) flush_wanted: tokio::sync::Notify,
    /// The record whose execution is unknown, if any. Updates wait while set.
    in_doubt: watch::Sender<Option<Record>>,
    /// Serializes the group's appends (held from taking a seq to the record's registration
    /// in the window; with a window of one, until the record is sealed or in doubt).
    pub(crate) write_slot: Mutex<()>,
    /// The records sent to the primary and not yet sealed or in doubt (update.rs: the
    /// pipelined sequencer).
    pub(crate) window: std::sync::Mutex<crate::update::Window>,
    /// Woken when the window shrinks or the written sealed head moves.
    pub(crate) window_moved: tokio::sync::Notify,
    /// Whether a background settlement runs (`update::spawn_settle`).
    pub(crate) settling: std::sync::atomic::AtomicBool,
    /// Held while an answer is sealed and while a hand-over starts: a seal checks, under
    /// it, that the epoch it was sent in still leads.
    pub(crate) seal_gate: Mutex<()>,
    /// One role change at a time.
    pub(crate) role_lock: Mutex<()>,
    /// One settlement of an in-doubt record at a time.
    pub(crate) settle_lock: Mutex<()>,
    /// The transaction ids of the latest records this proxy decided were never written
    /// (their clients were told so): one the journal shows afterwards (an append whose
    /// answer was lost and that landed late) was never sent anywhere, and is sealed skipped.
    not_written: std::sync::Mutex<VecDeque<uuid::Uuid>>,
    /// Bumped whenever a partition's status, the role or the in-doubt record changed.
    pub(crate) changed: watch::Sender<u64>,
    /// Set to stop the group's background tasks.
    pub(crate) stop: watch::Sender<bool>,
    /// The running replayers, by partition name.
    pub(crate) replayers: std::sync::Mutex<HashMap<String, ReplayerHandle>>,
    transitions: std::sync::Mutex<VecDeque<Transition>>,
    /// Counters and histograms for `/metrics`.
    pub(crate) metrics: crate::metrics::GroupMetrics,
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
            .field("role", &*self.role.borrow())
            .field("head", &self.head())
            .finish_non_exhaustive()
    }
}

/// How many transaction ids of records decided never written are remembered.
const NOT_WRITTEN_KEPT: usize = 256;

/// How many records after a settled one are looked at for the next unsealed one (more than
/// any window holds).
const IN_DOUBT_SCAN: u64 = 256;

/// A point-in-time view of a group, for `/status`.
#[derive(Debug, Clone)]
pub struct GroupView {
    /// Name.
    pub name: String,
    /// The primary's name.
    pub primary: String,
    /// The primary's term.
    pub epoch: u64,
    /// Whether the primary role is moving.
    pub handing_over: bool,
    /// Highest seq in the journal.
    pub head: u64,
    /// Highest seq every partition may replay.
    pub sealed: u64,
    /// Seqs whose execution is unknown.
    pub in_doubt: Vec<u64>,
    /// Who may have executed the in-doubt record.
    pub in_doubt_executors: Vec<String>,
    /// The partitions.
    pub partitions: Vec<PartitionView>,
    /// How the config's partitions differ from the journal's membership, which wins.
    pub config_drift: Vec<String>,
    /// The latest transitions, oldest first.
    pub transitions: Vec<Transition>,
}

impl Group {
    /// Loads the group's durable state from the journal and builds its partitions.
    /// Records found pending are now in doubt. A stored primary that the config no longer
    /// names is refused: the role never moves silently.
    pub async fn open(
        config: GroupConfig,
        journal: Arc<dyn Journal>,
        link: Arc<dyn PartitionLink>,
    ) -> Result<Arc<Group>, ProxyError> {
        let journal_err = |e: regroup_replay::JournalError| ProxyError::Journal(e.to_string());
        let first = config
            .partitions
            .first()
            .map(|p| p.name.clone())
            .unwrap_or_default();
        let state = journal
            .open_group(&config.name, &first)
            .await
            .map_err(journal_err)?;
        let stored_members = journal.members(&config.name).await.map_err(journal_err)?;
        if stored_members.is_none()
            && !config
                .partitions
                .iter()
                .any(|p| p.name == state.role.primary)
        {
            return Err(ProxyError::Config(format!(
                "group {:?}: the journal's primary {:?} (epoch {}) is not in the config; \
                 put it back, move the role first (regroup promote) while it is still \
                 configured, or point the group at a new journal",
                config.name, state.role.primary, state.role.epoch
            )));
        }
        let (specs, members_version, drift) = load_membership(&config, journal.as_ref()).await?;
        if !specs.iter().any(|p| p.name == state.role.primary) {
            return Err(ProxyError::Config(format!(
                "group {:?}: the journal's primary {:?} (epoch {}) is not in the journal's \
                 membership",
                config.name, state.role.primary, state.role.epoch
            )));
        }
        let mut partitions = Vec::with_capacity(specs.len());
        for p in &specs {
            let base = base_uri(&p.url).map_err(ProxyError::BadRequest)?;
            let applied = journal
                .checkpoint(&config.name, &p.name)
                .await
                .map_err(journal_err)?;
            let partition = Partition::new(p, base, applied);
            // A quarantine outlives restarts: never serve a diverged copy, not even briefly.
            if let Some(reason) = journal
                .diverged(&config.name, &p.name)
                .await
                .map_err(journal_err)?
            {
                tracing::warn!(group = %config.name, partition = %p.name, %reason,
                    "partition is quarantined as diverged (regroup rejoin lifts it)");
                partition.set_diverged(&reason);
            }
            partitions.push(Arc::new(partition));
        }
        let first_unsealed = state.log.unsealed.first().cloned();
        let sealed = first_unsealed
            .as_ref()
            .map_or(state.log.head, |r| r.seq - 1);
        if let Some(r) = &first_unsealed {
            tracing::warn!(group = %config.name, seq = r.seq, executors = ?r.executors,
                "record found in doubt at start; later updates wait until it is settled");
        }
        if let Some(p) = partitions.iter().find(|p| p.name() == state.role.primary) {
            // The primary executed every sealed record.
            p.credit(sealed);
        }
        let conflict_keys = regroup_replay::ConflictKeys::new(&config.conflict_keys)
            .map_err(|e| ProxyError::Config(format!("group {:?}: {e}", config.name)))?;
        let group = Arc::new(Group {
            classifier: config.classifier(),
            conflict_keys: Arc::new(conflict_keys),
            config,
            members: std::sync::RwLock::new(partitions.into()),
            members_version: AtomicU64::new(members_version),
            membership_lock: Mutex::new(()),
            drift,
            journal,
            link,
            role: watch::Sender::new(Role {
                epoch: state.role.epoch,
                primary: state.role.primary,
                handing_over: false,
            }),
            head: AtomicU64::new(state.log.head),
            sealed: watch::Sender::new(sealed),
            written: AtomicU64::new(sealed),
            flush_wanted: tokio::sync::Notify::new(),
            in_doubt: watch::Sender::new(first_unsealed),
            write_slot: Mutex::new(()),
            window: std::sync::Mutex::default(),
            window_moved: tokio::sync::Notify::new(),
            settling: std::sync::atomic::AtomicBool::new(false),
            seal_gate: Mutex::new(()),
            role_lock: Mutex::new(()),
            settle_lock: Mutex::new(()),
            not_written: std::sync::Mutex::new(VecDeque::new()),
            changed: watch::Sender::new(0),
            stop: watch::Sender::new(false),
            replayers: std::sync::Mutex::new(HashMap::new()),
            transitions: std::sync::Mutex::new(VecDeque::new()),
            metrics: crate::metrics::GroupMetrics::default(),
        });
        Ok(group)
    }

    /// Starts the group's background work: one check of every partition (so the first
    /// reads find the healthy ones), heartbeats, replayers, the failover watch, the flusher
    /// of deferred seals, and the settlement of a record found in doubt.
    pub async fn start(self: &Arc<Self>) {
        crate::supervise::check_all(self).await;
        crate::supervise::start(self);
        crate::replicate::start(self);
        crate::failover::start(self);
        crate::update::start_flusher(self);
        crate::retention::start(self);
        crate::rebuild::resume_interrupted(self);
        if self.in_doubt().is_some() {
            crate::update::spawn_settle(self.clone());
        }
    }

    /// Stops the group's background work.
    pub fn stop(&self) {
        self.stop.send_replace(true);
    }

    /// The group's name.
    pub fn name(&self) -> &str {
        &self.config.name
    }

    /// The group's configuration.
    pub fn config(&self) -> &GroupConfig {
        &self.config
    }

    /// The role, as one value.
    pub fn role(&self) -> Role {
        self.role.borrow().clone()
    }

    /// Watches the role.
    pub(crate) fn watch_role(&self) -> watch::Receiver<Role> {
        self.role.subscribe()
    }

    /// The primary's term.
    pub fn epoch(&self) -> u64 {
        self.role.borrow().epoch
    }

    /// The partitions, as a snapshot.
    pub fn members(&self) -> Arc<[Arc<Partition>]> {
        self.members
            .read()
            .unwrap_or_else(|p| p.into_inner())
            .clone()
    }

    /// The stored membership's version.
    pub(crate) fn members_version(&self) -> u64 {
        self.members_version.load(Ordering::Acquire)
    }

    /// Publishes a new membership the journal stored as `version` (the caller holds
    /// `membership_lock`).
    pub(crate) fn replace_members(&self, members: Vec<Arc<Partition>>, version: u64) {
        *self.members.write().unwrap_or_else(|p| p.into_inner()) = members.into();
        self.members_version.store(version, Ordering::Release);
        self.refresh_all();
        self.bump();
    }

    /// The partition named `name`.
    pub fn member(&self, name: &str) -> Option<Arc<Partition>> {
        self.members().iter().find(|p| p.name() == name).cloned()
    }

    /// The partition holding the primary role.
    pub fn primary(&self) -> Option<Arc<Partition>> {
        let name = self.role.borrow().primary.clone();
        self.member(&name)
    }

    pub(crate) fn is_primary(&self, p: &Partition) -> bool {
        self.role.borrow().primary == p.name()
    }

    /// Highest seq in the journal.
    pub fn head(&self) -> u64 {
        self.head.load(Ordering::Acquire)
    }

    pub(crate) fn set_head(&self, seq: u64) {
        self.head.store(seq, Ordering::Release);
    }

    /// Highest seq up to which every record is durably sealed.
    pub fn sealed(&self) -> u64 {
        *self.sealed.borrow()
    }

    pub(crate) fn watch_sealed(&self) -> watch::Receiver<u64> {
        self.sealed.subscribe()
    }

    /// The in-doubt record, if any.
    pub(crate) fn in_doubt(&self) -> Option<Record> {
        self.in_doubt.borrow().clone()
    }

    pub(crate) fn in_doubt_seq(&self) -> Option<u64> {
        self.in_doubt.borrow().as_ref().map(|r| r.seq)
    }

    /// Logs a named transition with its reason and keeps it for `/status`.
    pub(crate) fn transition(&self, name: &'static str, reason: String) {
        tracing::info!(group = %self.name(), transition = name, %reason, "group transition");
        let mut t = self.transitions.lock().unwrap_or_else(|p| p.into_inner());
        if t.len() == TRANSITIONS_KEPT {
            t.pop_front();
        }
        t.push_back(Transition {
            at: OffsetDateTime::now_utc(),
            name,
            reason,
        });
    }

    /// Publishes a new role (the caller made it durable, or is starting a hand-over).
    pub(crate) fn publish_role(&self, role: Role) {
        self.role.send_replace(role);
        self.refresh_all();
        self.bump();
    }

    /// Wakes everyone watching `changed`.
    pub(crate) fn bump(&self) {
        self.changed.send_modify(|v| *v = v.wrapping_add(1));
    }

    /// `mark_in_doubt`: `record`'s execution is unknown; later updates wait. The group holds
    /// the lowest such record: one above it is taken up again from the journal once every
    /// record below it is settled ([`Group::clear_in_doubt`]).
    pub(crate) fn mark_in_doubt(&self, record: Record, reason: &str) {
        self.transition(
            "mark_in_doubt",
            format!(
                "update in doubt: record {} (may have executed: {:?}): {reason}",
                record.seq, record.executors
            ),
        );
        let taken = self.in_doubt.send_if_modified(|current| match current {
            Some(lower) if lower.seq <= record.seq => false,
            _ => {
                *current = Some(record);
                true
            }
        });
        if taken {
            self.metrics.in_doubt();
        }
        self.bump();
    }

    /// Updates the in-doubt record after it was restamped for another partition.
    pub(crate) fn update_in_doubt(&self, record: &Record) {
        self.in_doubt.send_if_modified(|r| match r {
            Some(current) if current.seq == record.seq => {
                *current = record.clone();
                true
            }
            _ => false,
        });
    }

    /// Notes that the record with `txn` was decided never written (its client was told).
    pub(crate) fn note_not_written(&self, txn: uuid::Uuid) {
        let mut ids = self.not_written.lock().unwrap_or_else(|p| p.into_inner());
        if ids.len() == NOT_WRITTEN_KEPT {
            ids.pop_front();
        }
        ids.push_back(txn);
    }

    /// Whether the record with `txn` was decided never written (see
    /// [`Group::note_not_written`]).
    pub(crate) fn was_not_written(&self, txn: uuid::Uuid) -> bool {
        self.not_written
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .contains(&txn)
    }

    /// The pipelined sequencer's window (a short lock, never held across an await).
    pub(crate) fn window_lock(&self) -> std::sync::MutexGuard<'_, crate::update::Window> {
        self.window.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Takes up the records above the written sealed head that no update task holds in its
    /// window: those the journal holds sealed are adopted in seq order, and the first
    /// unsealed one becomes the in-doubt record (see `update::Window`: only a settlement that
    /// could not read the journal leaves one behind). Whether anything was taken up (not
    /// when the journal cannot be read).
    pub(crate) async fn take_up_unsealed(self: &Arc<Self>) -> bool {
        let written = self.written();
        let Ok(after) = self
            .journal
            .read_after(self.name(), written, IN_DOUBT_SCAN)
            .await
        else {
            return false;
        };
        if after.is_empty() {
            return self.drop_unwritten(written);
        }
        let mut progressed = false;
        for record in after {
            if self.window_lock().holds(record.seq) {
                break;
            }
            if !record.state.is_sealed() {
                self.mark_in_doubt(record, "found unsealed below the journal's head");
                crate::update::spawn_settle(self.clone());
                return true;
            }
            // Sealed in the journal, though the group does not count it as written (a seal
            // whose writer heard an error, or written by an earlier process): adopted, in
            // seq order, as a settlement would.
            if record.seq != self.written() + 1 {
                break;
            }
            crate::update::adopt(self, &record, &self.role()).await;
            progressed = true;
            if self.in_doubt().is_some() {
                // The adoption took up the unsealed record after it.
                crate::update::spawn_settle(self.clone());
                return true;
            }
        }
        progressed
    }

    /// The journal was read to end at `written`, the written sealed head: the records the
    /// group counted above it were never written (an append whose outcome was unknown, in
    /// doubt behind a lower record and not taken up since), and the journal's end is the
    /// group's head again. Only while the window is empty and the written head has not
    /// moved since the read: a record can be appended above the written head only behind
    /// one in the window, so no append is on its way. Whether the head went back.
    fn drop_unwritten(&self, written: u64) -> bool {
        let window = self.window_lock();
        let head = self.head();
        if head <= written || self.written() != written || !window.is_empty() {
            return false;
        }
        self.set_head(written);
        drop(window);
        self.transition(
            "settle",
            format!(
                "records {} to {head} were never written: dropped (the journal ends at {written})",
                written + 1
            ),
        );
        self.bump();
        true
    }

    /// Clears the in-doubt record `seq` (settled), and takes up the next unsealed record
    /// after it that no update task still holds in its window: one that was sent behind it
    /// and failed too, or one left unsealed by an earlier process. When the journal ends at
    /// `seq`, those the group counted above it were never written. When the journal cannot
    /// be read, the window takes them up with the next update. One sealed since the read is
    /// found sealed again by its settlement, and adopted.
    pub(crate) async fn clear_in_doubt(&self, seq: u64) {
        self.in_doubt
            .send_if_modified(|r| r.take_if(|r| r.seq == seq).is_some());
        if self.head() > seq
            && let Ok(after) = self
                .journal
                .read_after(self.name(), seq, IN_DOUBT_SCAN)
                .await
        {
            if after.is_empty() {
                self.drop_unwritten(seq);
            } else if let Some(next) = after
                .into_iter()
                .find(|r| !r.state.is_sealed() && !self.window_lock().holds(r.seq))
            {
                self.mark_in_doubt(next, "left unsealed behind a settled record");
            }
        }
        self.window_moved.notify_waiters();
        self.bump();
    }

    /// Advances the durable sealed head to `seq` (every record up to it is sealed).
    pub(crate) fn sealed_through(&self, seq: u64) {
        self.written.fetch_max(seq, Ordering::AcqRel);
        self.window_moved.notify_waiters();
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

    /// Notes that `seq` is sealed in the journal but not yet durable (the journal defers
    /// seals to its next flush); replicas do not see it until [`Group::flushed`].
    pub(crate) fn sealed_unflushed(&self, seq: u64) {
        self.written.fetch_max(seq, Ordering::AcqRel);
        self.window_moved.notify_waiters();
        self.flush_wanted.notify_one();
    }

    /// Flushes the journal: every seal written before it becomes durable (and visible to
    /// replicas).
    pub(crate) async fn flush_journal(&self) -> Result<(), regroup_replay::JournalError> {
        let written = self.written();
        self.journal.flush().await?;
        self.flushed(written);
        Ok(())
    }

    /// Everything written before the flush that just completed is durable.
    pub(crate) fn flushed(&self, written_before: u64) {
        if written_before > self.sealed() {
            self.sealed_through(written_before);
        }
    }

    /// Highest seq sealed in the journal, durable or not.
    pub(crate) fn written(&self) -> u64 {
        self.written.load(Ordering::Acquire)
    }

    /// Re-derives every partition's status (cheap: a few locks), notifying watchers of a
    /// change.
    pub(crate) fn refresh_all(&self) {
        let mut changed = false;
        for p in self.members().iter() {
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
        let sealed = self.sealed();
        let rebuild = p.rebuild().filter(|r| r.phase.running());
        let (status, reason): (PartitionStatus, Box<dyn FnOnce() -> String>) = if let Some(r) =
            rebuild
        {
            (
                PartitionStatus::Rebuilding,
                Box::new(move || format!("rebuilding: {}", r.reason)),
            )
        } else if let Some(why) = p.diverged() {
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
                    if applied.saturating_add(lag) < sealed {
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
        let role = self.role();
        let in_doubt = self.in_doubt();
        GroupView {
            name: self.name().to_owned(),
            primary: role.primary,
            epoch: role.epoch,
            handing_over: role.handing_over,
            head: self.head(),
            sealed: self.sealed(),
            in_doubt: in_doubt.iter().map(|r| r.seq).collect(),
            in_doubt_executors: in_doubt.map(|r| r.executors).unwrap_or_default(),
            partitions: self.members().iter().map(|p| p.view()).collect(),
            config_drift: self.drift.clone(),
            transitions: self
                .transitions
                .lock()
                .unwrap_or_else(|p| p.into_inner())
                .iter()
                .cloned()
                .collect(),
        }
    }

    /// Settles an in-doubt record by an operator's word: `executed` (replicas replay it
    /// without comparing answers: the primary's was never seen; the primary is credited
    /// with it) or `skipped` (nobody replays it).
    pub async fn resolve(&self, seq: u64, executed: bool) -> Result<Record, ProxyError> {
        let _settling = self.settle_lock.lock().await;
        let journal_err = |e: regroup_replay::JournalError| ProxyError::Journal(e.to_string());
        if self.in_doubt_seq() != Some(seq) {
            let record = self
                .journal
                .record(self.name(), seq)
                .await
                .map_err(journal_err)?;
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
            .map_err(journal_err)?;
        self.journal.flush().await.map_err(journal_err)?;
        let record = self
            .journal
            .record(self.name(), seq)
            .await
            .map_err(journal_err)?
            .ok_or_else(|| ProxyError::NoSuchRecord {
                group: self.name().to_owned(),
                seq,
            })?;
        debug_assert!(record.state != RecordState::InDoubt);
        self.transition(
            "settle",
            format!(
                "record {seq} resolved {} by an operator",
                record.state.as_str()
            ),
        );
        if executed && let Some(p) = self.primary() {
            p.credit(seq);
        } else if !executed {
            crate::update::credit_skipped(self, seq);
        }
        self.sealed_through(seq);
        self.clear_in_doubt(seq).await;
        Ok(record)
    }
}

/// The group's membership as the journal keeps it: stored on first open from the config
/// (the config seeds a new group); afterwards the journal's wins, and every way the config
/// differs from it is returned (and logged) so an operator sees it, never applied silently.
async fn load_membership(
    config: &GroupConfig,
    journal: &dyn Journal,
) -> Result<(Vec<regroup_replay::MemberSpec>, u64, Vec<String>), ProxyError> {
    let journal_err = |e: regroup_replay::JournalError| ProxyError::Journal(e.to_string());
    let seeded: Vec<_> = config.partitions.iter().map(|p| p.spec()).collect();
    let Some(stored) = journal.members(&config.name).await.map_err(journal_err)? else {
        let version = journal
            .set_members(&config.name, 0, &seeded)
            .await
            .map_err(journal_err)?;
        return Ok((seeded, version, Vec::new()));
    };
    let drift = membership_drift(&stored.partitions, &seeded);
    for d in &drift {
        tracing::warn!(group = %config.name, drift = %d,
            "the config's partitions differ from the journal's membership; the journal's \
             is used (change it with regroup add/remove/move)");
    }
    Ok((stored.partitions, stored.version, drift))
}

/// Every way `config` differs from the stored membership, in words.
pub(crate) fn membership_drift(
    stored: &[regroup_replay::MemberSpec],
    config: &[regroup_replay::MemberSpec],
) -> Vec<String> {
    let mut drift = Vec::new();
    for c in config {
        match stored.iter().find(|s| s.name == c.name) {
            None => drift.push(format!(
                "partition {:?} is in the config but not in the journal's membership \
                 (removed or moved at run time, or add it with regroup add)",
                c.name
            )),
            Some(s) if s != c => drift.push(format!(
                "partition {:?}: the journal has url {} host {:?} priority {}, the config url \
                 {} host {:?} priority {}",
                c.name, s.url, s.host, s.priority, c.url, c.host, c.priority
            )),
            Some(_) => {}
        }
    }
    for s in stored {
        if !config.iter().any(|c| c.name == s.name) {
            drift.push(format!(
                "partition {:?} ({}) is in the journal's membership but not in the config \
                 (added at run time)",
                s.name, s.url
            ));
        }
    }
    drift
}
