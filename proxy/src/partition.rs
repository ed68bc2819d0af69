//! A partition: one application instance with its own copy of the database, as the group
//! tracks it (health, replay progress, divergence, status history).

use std::sync::Mutex;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};

use http::Uri;
use time::OffsetDateTime;

use crate::rebuild::RebuildProgress;
use crate::status::PartitionStatus;

/// `delivered` before the partition's app layer said anything.
const UNKNOWN: u64 = u64::MAX;

/// What supervision last learned about a partition.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Health {
    /// Answered its last heartbeat.
    Up,
    /// Missed `n` consecutive heartbeats.
    Missed(u32),
}

#[derive(Debug)]
struct State {
    health: Health,
    diverged: Option<String>,
    status: PartitionStatus,
    since: OffsetDateTime,
    reason: String,
    /// The latest rebuild, running or ended.
    rebuild: Option<RebuildProgress>,
}

/// One partition of a group.
#[derive(Debug)]
pub struct Partition {
    name: String,
    url: String,
    host: Option<String>,
    base: Uri,
    priority: i32,
    applied: AtomicU64,
    /// The last seq its app layer says it recorded (`Regroup-Applied`), sent as
    /// `Regroup-Prev` with the next record; [`UNKNOWN`] until it said.
    delivered: AtomicU64,
    draining: AtomicBool,
    own_record: AtomicBool,
    state: Mutex<State>,
}

/// A point-in-time view of a partition, for status and decisions.
#[derive(Debug, Clone)]
pub struct PartitionView {
    /// Name.
    pub name: String,
    /// Base URL.
    pub url: String,
    /// The computing system it runs on, if named.
    pub host: Option<String>,
    /// Derived status.
    pub status: PartitionStatus,
    /// When the status last changed.
    pub since: OffsetDateTime,
    /// Why it changed.
    pub reason: String,
    /// Highest seq applied.
    pub applied: u64,
    /// Consecutive heartbeats missed (0: it answers).
    pub missed: u32,
    /// The latest rebuild, running or ended.
    pub rebuild: Option<RebuildProgress>,
}

impl Partition {
    /// A partition as the group first knows it: not yet checked (no reads until its first
    /// heartbeat answers), at `applied` by its checkpoint.
    pub fn new(spec: &regroup_replay::MemberSpec, base: Uri, applied: u64) -> Self {
        Partition {
            name: spec.name.clone(),
            url: spec.url.clone(),
            host: spec.host.clone(),
            base,
            priority: spec.priority,
            applied: AtomicU64::new(applied),
            delivered: AtomicU64::new(UNKNOWN),
            draining: AtomicBool::new(false),
            own_record: AtomicBool::new(false),
            state: Mutex::new(State {
                // Not yet checked: treated as one missed heartbeat (no reads) until the
                // first heartbeat answers.
                health: Health::Missed(1),
                diverged: None,
                status: PartitionStatus::Suspect,
                since: OffsetDateTime::now_utc(),
                reason: "not yet checked".to_owned(),
                rebuild: None,
            }),
        }
    }

    /// The partition's name.
    pub fn name(&self) -> &str {
        &self.name
    }

    /// The computing system it runs on, if named.
    pub fn host(&self) -> Option<&str> {
        self.host.as_deref()
    }

    /// What it is, as stored in the group's membership.
    pub fn spec(&self) -> regroup_replay::MemberSpec {
        regroup_replay::MemberSpec {
            name: self.name.clone(),
            url: self.url.clone(),
            host: self.host.clone(),
            priority: self.priority,
        }
    }

    /// Its base URI.
    pub fn base(&self) -> &Uri {
        &self.base
    }

    /// Failover preference.
    pub fn priority(&self) -> i32 {
        self.priority
    }

    /// The last seq its app layer said it recorded, if it said (see `Regroup-Prev`).
    pub(crate) fn delivered(&self) -> Option<u64> {
        let d = self.delivered.load(Ordering::Acquire);
        (d != UNKNOWN).then_some(d)
    }

    /// Notes what its app layer says it recorded last.
    pub(crate) fn set_delivered(&self, seq: u64) {
        self.delivered.store(seq, Ordering::Release);
    }

    /// Notes what its app layer said on an answer: never lower than what a later answer
    /// said already (answers of pipelined records may arrive in any order). A copy that
    /// stands lower (restored) is re-aimed by [`Partition::set_delivered`].
    pub(crate) fn note_delivered(&self, seq: u64) {
        let _ = self
            .delivered
            .fetch_update(Ordering::AcqRel, Ordering::Acquire, |d| {
                (d == UNKNOWN || seq > d).then_some(seq)
            });
    }

    /// Highest seq applied.
    pub fn applied(&self) -> u64 {
        self.applied.load(Ordering::Acquire)
    }

    /// Sets where the partition stands: replay progress, or a rewind (a copy restored from
    /// an older backup stands *behind* where it stood).
    pub(crate) fn set_applied(&self, seq: u64) {
        self.applied.store(seq, Ordering::Release);
    }

    /// Credits the partition with having executed `seq` (it answered it as primary).
    pub(crate) fn credit(&self, seq: u64) {
        self.applied.fetch_max(seq, Ordering::AcqRel);
    }

    /// Whether it answered the app-side layer's `/_regroup/applied` (so it can say where it
    /// stands, and a re-delivery to it is answered from its exactly-once record).
    pub(crate) fn keeps_own_record(&self) -> bool {
        self.own_record.load(Ordering::Acquire)
    }

    pub(crate) fn set_keeps_own_record(&self, on: bool) {
        self.own_record.store(on, Ordering::Release);
    }

    /// Whether an operator drained it.
    pub fn is_draining(&self) -> bool {
        self.draining.load(Ordering::Acquire)
    }

    pub(crate) fn set_draining(&self, on: bool) {
        self.draining.store(on, Ordering::Release);
    }

    /// Answering heartbeats, not diverged, not drained: may take the primary role.
    pub(crate) fn can_lead(&self) -> bool {
        self.health() == Health::Up
            && self.diverged().is_none()
            && !self.is_draining()
            && !self.is_rebuilding()
    }

    /// Whether a rebuild runs.
    pub fn is_rebuilding(&self) -> bool {
        self.lock()
            .rebuild
            .as_ref()
            .is_some_and(|r| r.phase.running())
    }

    /// The latest rebuild, running or ended.
    pub fn rebuild(&self) -> Option<RebuildProgress> {
        self.lock().rebuild.clone()
    }

    /// Changes the latest rebuild's progress.
    pub(crate) fn update_rebuild(&self, f: impl FnOnce(&mut Option<RebuildProgress>)) {
        f(&mut self.lock().rebuild);
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    pub(crate) fn health(&self) -> Health {
        self.lock().health
    }

    /// Records a heartbeat outcome.
    pub(crate) fn set_health(&self, health: Health) {
        self.lock().health = health;
    }

    /// Counts one more consecutive miss (a heartbeat, or a proxied request that failed).
    pub(crate) fn record_miss(&self) {
        let mut s = self.lock();
        s.health = match s.health {
            Health::Up => Health::Missed(1),
            Health::Missed(n) => Health::Missed(n.saturating_add(1)),
        };
    }

    pub(crate) fn set_diverged(&self, reason: &str) {
        self.lock().diverged = Some(reason.to_owned());
    }

    /// Returns a quarantined partition to service, resuming at `applied` when given.
    pub(crate) fn clear_diverged(&self, applied: Option<u64>) {
        self.lock().diverged = None;
        if let Some(a) = applied {
            self.applied.store(a, Ordering::Release);
        }
    }

    pub(crate) fn diverged(&self) -> Option<String> {
        self.lock().diverged.clone()
    }

    /// Stores a newly derived status; logs and returns true when it changed.
    pub(crate) fn update_status(
        &self,
        group: &str,
        status: PartitionStatus,
        reason: impl FnOnce() -> String,
    ) -> bool {
        let mut s = self.lock();
        if s.status == status {
            return false;
        }
        let reason = reason();
        tracing::info!(group, partition = %self.name, from = %s.status, to = %status,
            %reason, "partition status changed");
        s.status = status;
        s.since = OffsetDateTime::now_utc();
        s.reason = reason;
        true
    }

    /// The current status.
    pub fn status(&self) -> PartitionStatus {
        self.lock().status
    }

    /// A snapshot for `/status`.
    pub fn view(&self) -> PartitionView {
        let s = self.lock();
        PartitionView {
            name: self.name.clone(),
            url: self.url.clone(),
            host: self.host.clone(),
            status: s.status,
            since: s.since,
            reason: s.reason.clone(),
            applied: self.applied(),
            missed: match s.health {
                Health::Up => 0,
                Health::Missed(n) => n,
            },
            rebuild: s.rebuild.clone(),
        }
    }
}
