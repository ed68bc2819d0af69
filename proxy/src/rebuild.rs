//! Rebuild: a partition (new, diverged, or behind what retention kept) gets a snapshot of a
//! healthy one, taken at a known seq, then the journal after it, without blocking clients.
//!
//! 1. The target leaves client traffic and replay: it is quarantined durably (so a proxy
//!    restart mid-way never serves it) and shown `rebuilding`; its replayer stops.
//! 2. A source is chosen: answering, not quarantined, caught up (`available`), not the
//!    target, a replica before the primary; `from` forces one. The target is asked whether
//!    it would take a restore from this proxy (`GET /_regroup/restore`) before anything
//!    is sent.
//! 3. The source's `GET /_regroup/snapshot` is streamed, as it arrives, into the target's
//!    `PUT /_regroup/restore` (both signed with the group's replay secret when it has one).
//!    No write slot is held: updates go on meanwhile, and retention keeps every record after
//!    the snapshot's seq.
//! 4. The target's checkpoint is set to the snapshot's seq, its quarantine lifted, and its
//!    replayer restarts from there.
//!
//! Progress (phase, bytes, seq, source) is part of the partition's state, in `/status` as
//! `rebuild`; `rebuild` and `rebuild_failed` transitions say why it started and how it
//! ended. A failure names what failed; a target that cannot have changed (nothing sent, or
//! a restore refused) is left as it was, otherwise it stays quarantined until the next
//! rebuild.

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use serde::{Deserialize, Serialize};

use crate::error::ProxyError;
use crate::group::Group;
use crate::link::{Progress, SnapshotError};
use crate::partition::{Health, Partition};
use crate::replicate;
use crate::status::PartitionStatus;

/// How long a snapshot's transfer (snapshot, stream, restore) may take at most.
pub const REBUILD_TIMEOUT: Duration = Duration::from_secs(30 * 60);

/// Where a rebuild stands.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum RebuildPhase {
    /// The target is being taken out of service.
    Starting,
    /// The source is taking its snapshot.
    Snapshot,
    /// The snapshot streams into the target.
    Restore,
    /// The target's checkpoint is set and its replayer restarts.
    Rejoin,
    /// Finished: the target replays from the snapshot's seq.
    Done,
    /// Stopped on an error (see `error`).
    Failed,
}

impl RebuildPhase {
    /// Whether the rebuild still runs.
    pub fn running(self) -> bool {
        !matches!(self, RebuildPhase::Done | RebuildPhase::Failed)
    }
}

/// A partition's latest rebuild, as shown in `/status`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct RebuildProgress {
    /// Tells one rebuild from the next (rising).
    pub id: u64,
    /// Where it stands.
    pub phase: RebuildPhase,
    /// The partition the snapshot comes from.
    pub source: String,
    /// Snapshot bytes streamed into the target so far.
    pub bytes: u64,
    /// The seq the snapshot includes, once known.
    pub seq: Option<u64>,
    /// Why it started.
    pub reason: String,
    /// What failed, when it failed.
    pub error: Option<String>,
    /// When it started (RFC 3339).
    pub started: String,
    /// The lowest seq retention must keep for this rebuild (the snapshot's, once known).
    #[serde(skip)]
    pub(crate) hold: u64,
}

static IDS: AtomicU64 = AtomicU64::new(1);

/// Starts rebuilding `target` of `group` from a snapshot of `from` (or of the best source),
/// in the background; progress shows in the group's state (`/status`). Refused at once
/// when `target` is the primary or already rebuilding, or no source qualifies.
pub async fn start(group: &Arc<Group>, target: &str, from: Option<&str>) -> Result<(), ProxyError> {
    start_because(group, target, from, "requested".to_owned()).await
}

/// [`start`] with the reason shown for it.
pub(crate) async fn start_because(
    group: &Arc<Group>,
    target: &str,
    from: Option<&str>,
    reason: String,
) -> Result<(), ProxyError> {
    let bad = |m: String| ProxyError::BadRequest(m);
    let t = group.member(target).ok_or_else(|| {
        bad(format!(
            "group {:?} has no partition {target:?}",
            group.name()
        ))
    })?;
    if group.is_primary(&t) {
        return Err(bad(format!(
            "partition {target:?} is the primary of group {:?}: move the role first (regroup promote)",
            group.name()
        )));
    }
    let source = choose_source(group, &t, from)?;
    let id = IDS.fetch_add(1, Ordering::Relaxed);
    let mut started = false;
    t.update_rebuild(|r| {
        if r.as_ref().is_some_and(|r| r.phase.running()) {
            return;
        }
        started = true;
        *r = Some(RebuildProgress {
            id,
            phase: RebuildPhase::Starting,
            source: source.name().to_owned(),
            bytes: 0,
            seq: None,
            reason: reason.clone(),
            error: None,
            started: regroup_replay::record::format_timestamp(time::OffsetDateTime::now_utc()),
            hold: source.applied(),
        });
    });
    if !started {
        return Err(bad(format!(
            "partition {target:?} of group {:?} is already being rebuilt",
            group.name()
        )));
    }
    group.transition(
        "rebuild",
        format!(
            "{target:?} is rebuilt from a snapshot of {:?} ({reason})",
            source.name()
        ),
    );
    group.refresh(&t);
    tokio::spawn(run(group.clone(), t, source));
    Ok(())
}

/// The start of a partition's stored quarantine while a rebuild of it runs: found at start,
/// it says the proxy stopped mid-rebuild.
const UNDER_WAY: &str = "being rebuilt from ";

/// At start: every partition whose stored quarantine says a rebuild was under way when the
/// proxy stopped (crashed, restarted, lost its lease) is rebuilt again once it answers, so
/// it is not left quarantined until an operator notices.
pub(crate) fn resume_interrupted(group: &Arc<Group>) {
    let group = group.clone();
    tokio::spawn(async move {
        for p in group.members().iter() {
            let stored = match group.journal.diverged(group.name(), p.name()).await {
                Ok(stored) => stored,
                Err(e) => {
                    tracing::warn!(group = %group.name(), partition = %p.name(), error = %e,
                        "cannot read whether a rebuild was under way; run regroup rebuild if it was");
                    continue;
                }
            };
            if stored.is_some_and(|why| why.starts_with(UNDER_WAY)) {
                tracing::info!(group = %group.name(), partition = %p.name(),
                    "a rebuild was under way when the proxy stopped: starting it again");
                start_when_answering_because(
                    &group,
                    p.name(),
                    "a rebuild was under way when the proxy stopped".to_owned(),
                );
            }
        }
    });
}

/// Rebuilds `target` once it answers heartbeats again (a partition that needs records
/// retention truncated): tried again every second until it starts or the group stops.
pub(crate) fn start_when_answering(group: &Arc<Group>, target: &str, applied: u64) {
    let reason = format!("it stands at {applied}, but retention truncated the records after it");
    start_when_answering_because(group, target, reason);
}

/// Rebuilds `target` once it answers heartbeats, for `reason` (a partition just added or
/// moved here): tried again every second until it starts or the group stops.
pub(crate) fn start_when_answering_because(group: &Arc<Group>, target: &str, reason: String) {
    let group = group.clone();
    let target = target.to_owned();
    let before = group
        .member(&target)
        .and_then(|p| p.rebuild())
        .map(|r| r.id);
    tokio::spawn(async move {
        let mut stop = group.stop.subscribe();
        let mut attempts = 0u32;
        loop {
            if *stop.borrow() {
                return;
            }
            let Some(p) = group.member(&target) else {
                return;
            };
            if p.rebuild().map(|r| r.id) != before {
                // Another rebuild started meanwhile (an operator's): it takes care of it.
                return;
            }
            if p.health() == Health::Up {
                match start_because(&group, &target, None, reason.clone()).await {
                    Ok(()) => return,
                    Err(e) => {
                        attempts = attempts.saturating_add(1);
                        if attempts == 1 || attempts.is_multiple_of(30) {
                            tracing::warn!(group = %group.name(), partition = %target, error = %e,
                                "cannot start the rebuild yet; trying again");
                        }
                    }
                }
            }
            tokio::select! {
                biased;
                _ = tokio::time::sleep(Duration::from_secs(1)) => {}
                _ = stop.changed() => return,
            }
        }
    });
}

fn usable_source(p: &Partition) -> Result<(), String> {
    if p.health() != Health::Up {
        return Err("is not answering heartbeats".into());
    }
    if let Some(why) = p.diverged() {
        return Err(format!("is quarantined: {why}"));
    }
    if p.is_rebuilding() {
        return Err("is being rebuilt itself".into());
    }
    Ok(())
}

/// The source: `from` when given and usable; else an available replica that applied the
/// most (then by name), else the primary.
fn choose_source(
    group: &Group,
    target: &Partition,
    from: Option<&str>,
) -> Result<Arc<Partition>, ProxyError> {
    if let Some(q) = from {
        let p = group.member(q).ok_or_else(|| {
            ProxyError::BadRequest(format!("group {:?} has no partition {q:?}", group.name()))
        })?;
        if p.name() == target.name() {
            return Err(ProxyError::BadRequest(format!(
                "partition {q:?} cannot be rebuilt from itself"
            )));
        }
        usable_source(&p).map_err(|why| {
            ProxyError::BadRequest(format!("partition {q:?} cannot be the source: it {why}"))
        })?;
        return Ok(p);
    }
    let members = group.members();
    let usable = |p: &&Arc<Partition>| {
        p.name() != target.name()
            && usable_source(p).is_ok()
            && p.status() == PartitionStatus::Available
    };
    // Only a partition with the app layer can give a snapshot: one known to keep the
    // layer's record first, then a replica rather than the primary, then the most applied.
    members
        .iter()
        .filter(usable)
        .max_by(|a, b| {
            a.keeps_own_record()
                .cmp(&b.keeps_own_record())
                .then(group.is_primary(b).cmp(&group.is_primary(a)))
                .then(a.applied().cmp(&b.applied()))
                .then(b.name().cmp(a.name()))
        })
        .cloned()
        .ok_or_else(|| ProxyError::Unavailable {
            group: group.name().to_owned(),
            reason: format!(
                "no partition can be the source of {:?}'s rebuild (none is available)",
                target.name()
            ),
        })
}

/// Why a rebuild failed, and whether the target may have changed.
type Failure = SnapshotError;

fn failed(what: impl Into<String>, touched: bool) -> Failure {
    SnapshotError {
        what: what.into(),
        touched,
    }
}

async fn run(group: Arc<Group>, target: Arc<Partition>, source: Arc<Partition>) {
    let was = target.diverged();
    match steps(&group, &target, &source).await {
        Ok(seq) => {
            target.update_rebuild(|r| {
                if let Some(r) = r {
                    r.phase = RebuildPhase::Done;
                }
            });
            group.refresh(&target);
            group.transition(
                "rebuild",
                format!(
                    "{:?} rebuilt from {:?} at seq {seq}: replaying the journal after it",
                    target.name(),
                    source.name()
                ),
            );
        }
        Err(f) => {
            let what = format!("rebuild from {:?} failed: {}", source.name(), f.what);
            target.update_rebuild(|r| {
                if let Some(r) = r {
                    r.phase = RebuildPhase::Failed;
                    r.error = Some(f.what.clone());
                }
            });
            if !f.touched && was.is_none() {
                // Nothing reached the target: it goes back to what it was.
                let lifted = group
                    .journal
                    .set_diverged(group.name(), target.name(), None)
                    .await;
                if lifted.is_ok() {
                    target.clear_diverged(None);
                    group.refresh(&target);
                    replicate::start_one(&group, &target);
                    group.transition(
                        "rebuild_failed",
                        format!("{:?}: {what}; left as it was", target.name()),
                    );
                    return;
                }
            }
            let reason = format!("{what}; run regroup rebuild again");
            target.set_diverged(&reason);
            if let Err(e) = group
                .journal
                .set_diverged(group.name(), target.name(), Some(&reason))
                .await
            {
                tracing::error!(group = %group.name(), partition = %target.name(), error = %e,
                    "cannot store the quarantine of a failed rebuild");
            }
            group.refresh(&target);
            group.transition(
                "rebuild_failed",
                format!("{:?}: {what}; it stays quarantined", target.name()),
            );
        }
    }
}

/// A rebuild's journal write (idempotent), tried again on a passing error: a journal that
/// hiccups once must not leave a restored copy quarantined until an operator steps in.
async fn journal_write<F, Fut>(write: F) -> Result<(), regroup_replay::JournalError>
where
    F: Fn() -> Fut,
    Fut: std::future::Future<Output = Result<(), regroup_replay::JournalError>>,
{
    let mut wait = Duration::from_millis(50);
    let mut attempt = 1u32;
    loop {
        match write().await {
            Err(e) if e.is_retryable() && attempt < JOURNAL_ATTEMPTS => {
                tracing::debug!(attempt, error = %e, "rebuild: journal write failed; retrying");
                tokio::time::sleep(wait).await;
                wait = (wait * 2).min(Duration::from_secs(1));
                attempt += 1;
            }
            r => return r,
        }
    }
}

/// How many times a rebuild tries one journal write (~8 s in all).
const JOURNAL_ATTEMPTS: u32 = 12;

fn set_phase(p: &Partition, phase: RebuildPhase) {
    p.update_rebuild(|r| {
        if let Some(r) = r {
            r.phase = phase;
        }
    });
}

async fn steps(
    group: &Arc<Group>,
    target: &Arc<Partition>,
    source: &Arc<Partition>,
) -> Result<u64, Failure> {
    let name = group.name();
    // 1. Out of traffic and replay, durably.
    let reason = format!("{UNDER_WAY}{:?}", source.name());
    target.set_diverged(&reason);
    group.refresh(target);
    replicate::stop_one(group, target.name()).await;
    journal_write(|| {
        group
            .journal
            .set_diverged(name, target.name(), Some(&reason))
    })
    .await
    .map_err(|e| failed(format!("cannot store the quarantine: {e}"), false))?;

    // The target must be ready to take a restore from this proxy before anything is taken.
    let timeout = group.config.update_timeout();
    group.link.restore_ready(target, timeout).await?;

    // 2. The source's snapshot.
    set_phase(target, RebuildPhase::Snapshot);
    let snapshot = group.link.snapshot(source, REBUILD_TIMEOUT).await?;
    let seq = snapshot.seq;
    if seq > group.head() {
        return Err(failed(
            format!(
                "the source's snapshot includes seq {seq}, past the journal's head {}",
                group.head()
            ),
            false,
        ));
    }
    target.update_rebuild(|r| {
        if let Some(r) = r {
            r.seq = Some(seq);
            r.hold = seq;
            r.phase = RebuildPhase::Restore;
        }
    });
    tracing::info!(group = name, partition = %target.name(), source = %source.name(), seq,
        epoch = snapshot.epoch, "snapshot taken; streaming it into the target");

    // 3. Into the target's restore, counting bytes as they pass.
    let counted = target.clone();
    let progress: Progress = Box::new(move |n| {
        counted.update_rebuild(|r| {
            if let Some(r) = r {
                r.bytes += n;
            }
        });
    });
    let restored = group
        .link
        .restore(target, snapshot, progress, REBUILD_TIMEOUT)
        .await?;
    if restored != Some(seq) {
        return Err(failed(
            format!("the target restored seq {restored:?}, not the snapshot's {seq}"),
            true,
        ));
    }

    // 4. Back in service from the snapshot's seq.
    set_phase(target, RebuildPhase::Rejoin);
    journal_write(|| group.journal.save_checkpoint(name, target.name(), seq))
        .await
        .map_err(|e| failed(format!("cannot save the checkpoint: {e}"), true))?;
    journal_write(|| group.journal.set_diverged(name, target.name(), None))
        .await
        .map_err(|e| failed(format!("cannot lift the quarantine: {e}"), true))?;
    target.clear_diverged(Some(seq));
    // Its layer's record now ends at the snapshot's seq: the next record follows it.
    target.set_delivered(seq);
    set_phase(target, RebuildPhase::Done);
    group.refresh(target);
    replicate::start_one(group, target);
    Ok(seq)
}
