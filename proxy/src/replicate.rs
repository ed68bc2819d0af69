//! Replication: one [`Replayer`] per replica of a group, reporting progress and divergence
//! into the group's partition statuses. Replayers are started for every partition but the
//! primary, stopped when a partition takes the primary role, and started for a deposed
//! primary. `rewind` and `rejoin` move a partition's position by hand or by its own word.

use std::sync::{Arc, Weak};

use regroup_replay::{ApplyError, ReplayExit, ReplayObserver, Replayer};
use tokio::sync::watch;

use crate::applier::LinkApplier;
use crate::error::ProxyError;
use crate::group::{Group, ReplayerHandle};
use crate::partition::Partition;

struct Observer {
    group: Weak<Group>,
    partition: Arc<Partition>,
}

impl ReplayObserver for Observer {
    fn applied(&self, seq: u64) {
        // The replayer is the only writer of a replica's position, and it may move it down
        // (the partition's own record says it stands behind its checkpoint).
        self.partition.set_applied(seq);
        if let Some(g) = self.group.upgrade() {
            g.refresh(&self.partition);
        }
    }

    fn apply_failed(&self, seq: u64, attempt: u32, error: &ApplyError) {
        if attempt == 1 || attempt.is_multiple_of(20) {
            tracing::info!(partition = %self.partition.name(), seq, attempt, %error,
                "replay not delivered yet; retrying");
        }
    }

    fn diverged(&self, seq: u64, reason: &str) {
        self.partition.set_diverged(reason);
        if let Some(g) = self.group.upgrade() {
            g.transition(
                "quarantine",
                format!(
                    "{:?} diverged from the primary at seq {seq}: {reason}",
                    self.partition.name()
                ),
            );
            g.refresh(&self.partition);
        }
    }
}

/// Starts a replayer for every partition of `group` except the primary.
pub(crate) fn start(group: &Arc<Group>) {
    for p in group.members().iter() {
        if !group.is_primary(p) {
            start_one(group, p);
        }
    }
}

/// Starts the replayer of `partition` (no-op when it runs).
pub(crate) fn start_one(group: &Arc<Group>, partition: &Arc<Partition>) {
    let mut replayers = group.replayers.lock().unwrap_or_else(|p| p.into_inner());
    if replayers
        .get(partition.name())
        .is_some_and(|h| !h.task.is_finished())
    {
        return;
    }
    let applier = Arc::new(
        LinkApplier::new(
            group.link.clone(),
            partition.clone(),
            group.config.update_timeout(),
        )
        .timed(group.metrics.replay(partition.name())),
    );
    let mut replayer = Replayer::new(
        group.name(),
        partition.name(),
        group.journal.clone(),
        applier.clone(),
    )
    .compare(group.config.compare);
    // Records on their way to a replica at once (`replay_window`; its app layer applies
    // them one at a time in seq order, each waiting for the one before it at most its
    // `predecessor_wait`), when its link pipelines (the replayer sends them so only to a
    // replica that keeps the exactly-once record).
    if applier.pipelines() && group.config.replay_window > 1 {
        replayer = replayer.pipelined(applier, group.config.replay_window);
        // Records that share no conflict key go in parallel, to a replica whose layer
        // records out of seq order (the replayer asks it).
        replayer = replayer.conflict_keys(group.conflict_keys.clone());
    }
    let observer = Arc::new(Observer {
        group: Arc::downgrade(group),
        partition: partition.clone(),
    });
    let sealed = group.watch_sealed();
    let (stop_tx, stop) = watch::channel(false);
    let mut group_stop = group.stop.subscribe();
    let own_stop = stop_tx.clone();
    let name = format!("{}/{}", group.name(), partition.name());
    let weak = Arc::downgrade(group);
    let member = partition.name().to_owned();
    let task = tokio::spawn(async move {
        // The group stopping stops this replayer too.
        let forward = tokio::spawn(async move {
            let _ = group_stop.wait_for(|s| *s).await;
            let _ = own_stop.send(true);
        });
        match replayer.run(sealed, stop, observer).await {
            ReplayExit::Stopped => tracing::debug!(partition = %name, "replayer stopped"),
            ReplayExit::Diverged(seq) => {
                tracing::warn!(partition = %name, seq, "replayer stopped at divergence")
            }
            ReplayExit::Truncated(applied) => {
                tracing::warn!(partition = %name, applied,
                    "the journal no longer holds what it needs: rebuilding it from a snapshot");
                if let Some(g) = weak.upgrade() {
                    crate::rebuild::start_when_answering(&g, &member, applied);
                }
            }
        }
        forward.abort();
    });
    replayers.insert(
        partition.name().to_owned(),
        ReplayerHandle {
            stop: stop_tx,
            task,
        },
    );
}

/// Whether a replayer runs for partition `name`.
pub(crate) fn running(group: &Group, name: &str) -> bool {
    group
        .replayers
        .lock()
        .unwrap_or_else(|p| p.into_inner())
        .get(name)
        .is_some_and(|h| !h.task.is_finished())
}

/// Stops the replayer of partition `name` and waits until it has finished the record it
/// was sending (so the partition receives nothing from it afterwards).
pub(crate) async fn stop_one(group: &Group, name: &str) {
    let handle = group
        .replayers
        .lock()
        .unwrap_or_else(|p| p.into_inner())
        .remove(name);
    if let Some(h) = handle {
        let _ = h.stop.send(true);
        let _ = h.task.await;
    }
}

/// `rewind`: `p` says it stands at `position`, behind where the group had it (its copy was
/// restored from an older backup, or reset). It leaves the read set at once, its
/// checkpoint goes back, and it replays from there. A position ahead of the sealed head
/// (it applied something the journal does not hold as sealed) quarantines it instead.
pub(crate) async fn rewind(group: &Arc<Group>, p: &Arc<Partition>, position: u64) {
    let was = p.applied();
    if position > group.head() {
        let reason = format!(
            "applied {position} by its own record, but the journal holds only {}",
            group.head()
        );
        quarantine(group, p, &reason).await;
        return;
    }
    p.set_applied(position);
    p.set_delivered(position);
    group.refresh(p);
    group.transition(
        "rewind",
        format!(
            "{:?} stands at {position} by its own record, behind {was}: replaying from there",
            p.name()
        ),
    );
    // A primary too: the failover task moves the role to a partition that holds every
    // sealed record if there is one; meanwhile (or if there is none) its own replayer
    // catches it up, and no update is sent to it until it has (update.rs:
    // `wait_for_primary`).
    stop_one(group, p.name()).await;
    if let Err(e) = group
        .journal
        .save_checkpoint(group.name(), p.name(), position)
        .await
    {
        tracing::warn!(group = %group.name(), partition = %p.name(), error = %e,
            "cannot save the rewound checkpoint; the replayer asks the partition itself");
    }
    start_one(group, p);
}

/// `quarantine`: takes `p` out of service durably, with `reason`.
pub(crate) async fn quarantine(group: &Arc<Group>, p: &Arc<Partition>, reason: &str) {
    p.set_diverged(reason);
    group.refresh(p);
    group.transition("quarantine", format!("{:?}: {reason}", p.name()));
    stop_one(group, p.name()).await;
    if let Err(e) = group
        .journal
        .set_diverged(group.name(), p.name(), Some(reason))
        .await
    {
        tracing::error!(group = %group.name(), partition = %p.name(), error = %e,
            "cannot store the quarantine; it holds until this proxy restarts");
    }
}

/// `rejoin`: returns a quarantined partition to service after an operator rebuilt it (for
/// example from a snapshot of a healthy partition): its quarantine is lifted durably and
/// its replayer starts again, from `applied` when given (the seq the rebuilt copy
/// includes), else from its checkpoint (a partition with the app-side layer says itself
/// where it stands).
pub(crate) async fn rejoin(
    group: &Arc<Group>,
    p: &Arc<Partition>,
    applied: Option<u64>,
) -> Result<(), ProxyError> {
    if p.diverged().is_none() {
        return Err(ProxyError::BadRequest(format!(
            "partition {:?} of group {:?} is not diverged",
            p.name(),
            group.name()
        )));
    }
    stop_one(group, p.name()).await;
    let journal_err = |e: regroup_replay::JournalError| ProxyError::Journal(e.to_string());
    if let Some(a) = applied {
        group
            .journal
            .save_checkpoint(group.name(), p.name(), a)
            .await
            .map_err(journal_err)?;
    }
    group
        .journal
        .set_diverged(group.name(), p.name(), None)
        .await
        .map_err(journal_err)?;
    p.clear_diverged(applied);
    group.refresh(p);
    group.transition(
        "rejoin",
        format!(
            "{:?} rejoined by an operator (applied {applied:?})",
            p.name()
        ),
    );
    start_one(group, p);
    Ok(())
}
