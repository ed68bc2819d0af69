//! Replication: one [`Replayer`] per replica of a group, reporting progress and divergence
//! into the group's partition statuses.

use std::sync::{Arc, Weak};

use regroup_replay::{ApplyError, ReplayExit, ReplayObserver, Replayer};

use crate::applier::HttpApplier;
use crate::group::Group;
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
    for partition in &group.partitions {
        if group.is_primary(partition) {
            continue;
        }
        let applier = HttpApplier::new(
            group.client.clone(),
            partition.clone(),
            group.config.update_timeout(),
        );
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
        let stop = group.stop.subscribe();
        let name = format!("{}/{}", group.name(), partition.name());
        tokio::spawn(async move {
            match replayer.run(sealed, stop, observer).await {
                ReplayExit::Stopped => tracing::debug!(partition = %name, "replayer stopped"),
                ReplayExit::Diverged(seq) => {
                    tracing::warn!(partition = %name, seq, "replayer stopped at divergence")
                }
            }
        });
    }
}
