//! Replication: one [`Replayer`] per replica of a group, reporting progress and divergence
//! into the group's partition statuses. Replayers are started for every partition but the
//! primary, stopped when a partition takes the primary role, and started for a deposed
//! primary.

use std::sync::{Arc, Weak};

use regroup_replay::{ApplyError, ReplayExit, ReplayObserver, Replayer};
use tokio::sync::watch;

use crate::applier::HttpApplier;
use crate::group::{Group, ReplayerHandle};
use crate::partition::Partition;

struct Observer {
    group: Weak<Group>,
    partition: Arc<Partition>,
}

impl ReplayObserver for Observer {
    fn applied(&self, seq: u64) {
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
        tracing::error!(partition = %self.partition.name(), seq, %reason,
            "partition diverged from the primary: quarantined");
        self.partition.set_diverged(reason);
        if let Some(g) = self.group.upgrade() {
            g.refresh(&self.partition);
        }
    }
}

/// Starts a replayer for every partition of `group` except the primary.
pub(crate) fn start(group: &Arc<Group>) {
    for index in 0..group.partitions.len() {
        if index != group.primary_index() {
            start_one(group, index);
        }
    }
}

/// Starts the replayer of partition `index` (no-op when it runs).
pub(crate) fn start_one(group: &Arc<Group>, index: usize) {
    let mut replayers = group.replayers.lock().unwrap_or_else(|p| p.into_inner());
    if replayers.get(&index).is_some_and(|h| !h.task.is_finished()) {
        return;
    }
    let Some(partition) = group.partitions.get(index).cloned() else {
        return;
    };
    let applier = HttpApplier::new(
        group.client.clone(),
        partition.clone(),
        group.config.update_timeout(),
    )
    .signed(group.signer.clone());
    let replayer = Replayer::new(
        group.name(),
        partition.name(),
        group.journal.clone(),
        Arc::new(applier),
    )
    .compare(group.config.compare);
    let observer = Arc::new(Observer {
        group: Arc::downgrade(group),
        partition: partition.clone(),
    });
    let sealed = group.sealed.subscribe();
    let (stop_tx, stop) = watch::channel(false);
    let mut group_stop = group.stop.subscribe();
    let own_stop = stop_tx.clone();
    let name = format!("{}/{}", group.name(), partition.name());
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
        }
        forward.abort();
    });
    replayers.insert(
        index,
        ReplayerHandle {
            stop: stop_tx,
            task,
        },
    );
}

/// Stops the replayer of partition `index` and waits until it has finished the record it
/// was sending (so the partition receives nothing from it afterwards).
pub(crate) async fn stop_one(group: &Group, index: usize) {
    let handle = group
        .replayers
        .lock()
        .unwrap_or_else(|p| p.into_inner())
        .remove(&index);
    if let Some(h) = handle {
        let _ = h.stop.send(true);
        let _ = h.task.await;
    }
}

/// Returns a diverged partition to service after an operator rebuilt it (for example from a
/// snapshot of a healthy partition): its quarantine is lifted durably and its replayer
/// starts again, from `applied` when given (the seq the rebuilt copy includes), else from
/// its checkpoint (a partition with the app-side layer says itself where it stands).
pub(crate) async fn rejoin(
    group: &Arc<Group>,
    index: usize,
    applied: Option<u64>,
) -> Result<(), crate::error::ProxyError> {
    use crate::error::ProxyError;
    let p = &group.partitions[index];
    if p.diverged().is_none() {
        return Err(ProxyError::BadRequest(format!(
            "partition {:?} of group {:?} is not diverged",
            p.name(),
            group.name()
        )));
    }
    stop_one(group, index).await;
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
    tracing::info!(group = %group.name(), partition = %p.name(), ?applied,
        "partition rejoined by an operator");
    start_one(group, index);
    Ok(())
}
