//! The replayer's [`Applier`] for one partition, over the group's [`PartitionLink`]: sends
//! a journal record as a replay and returns the fingerprint of the answer; as a
//! [`PipelinedApplier`], also right behind the record sent before it.

use std::sync::Arc;
use std::time::Duration;

use regroup_replay::headers::Behind;
use regroup_replay::replayer::PipelinedApplier;
use regroup_replay::{Applier, ApplyError, Fingerprint, Position, Record};

use crate::link::{PartitionLink, SendError};
use crate::metrics::ReplayMetrics;
use crate::partition::{Health, Partition};

/// Replays records on one partition, with `Regroup-Replay: 1`.
pub struct LinkApplier {
    link: Arc<dyn PartitionLink>,
    partition: Arc<Partition>,
    timeout: Duration,
    metrics: ReplayMetrics,
}

impl std::fmt::Debug for LinkApplier {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("LinkApplier")
            .field("partition", &self.partition.name())
            .finish_non_exhaustive()
    }
}

impl LinkApplier {
    /// An applier for `partition`; an answer slower than `timeout` counts as no answer.
    pub fn new(link: Arc<dyn PartitionLink>, partition: Arc<Partition>, timeout: Duration) -> Self {
        LinkApplier {
            link,
            partition,
            timeout,
            metrics: ReplayMetrics::default(),
        }
    }

    /// Records every replay exchange in `metrics`.
    pub fn timed(mut self, metrics: ReplayMetrics) -> Self {
        self.metrics = metrics;
        self
    }
}

fn apply_error(e: SendError) -> ApplyError {
    match e {
        SendError::NotSent(r) => ApplyError::Unreachable(r),
        SendError::Unknown(r) => ApplyError::NoAnswer(r),
        // Nothing was applied; the replayer asks where it stands and resumes there.
        SendError::Behind(at) => {
            ApplyError::Unreachable(format!("the partition stands behind, at {at}"))
        }
    }
}

impl LinkApplier {
    /// Whether records may be sent to this partition behind the one before it (the link
    /// sends `Regroup-Pipelined`; the partition's app layer must keep the exactly-once
    /// record too, which the replayer checks).
    pub fn pipelines(&self) -> bool {
        self.link.pipelines()
    }

    /// Sends `record` as a replay (pipelined, in the place `behind` gives it, when given)
    /// and returns the fingerprint of the answer.
    async fn replay(
        &self,
        record: &Record,
        behind: Option<Behind<'_>>,
    ) -> Result<Fingerprint, ApplyError> {
        // Nothing is replayed to a partition that supervision does not see answering: one
        // that comes back is first asked where it stands (and rewound), so a copy restored
        // from an older backup never receives a record it is not ready for.
        if self.partition.health() != Health::Up {
            return Err(ApplyError::Unreachable(format!(
                "partition {:?} is not answering heartbeats",
                self.partition.name()
            )));
        }
        let started = std::time::Instant::now();
        let answer = match behind {
            None => {
                self.link
                    .send(&self.partition, record, true, self.timeout)
                    .await
            }
            Some(behind) => {
                self.link
                    .send_pipelined(&self.partition, record, true, behind, self.timeout)
                    .await
            }
        };
        self.metrics.replayed(started.elapsed(), answer.is_ok());
        let answer = answer.map_err(apply_error)?;
        Ok(Fingerprint::of(answer.parts.status.as_u16(), &answer.body))
    }
}

#[async_trait::async_trait]
impl PipelinedApplier for LinkApplier {
    async fn apply_pipelined(
        &self,
        record: &Record,
        behind: Behind<'_>,
    ) -> Result<Fingerprint, ApplyError> {
        self.replay(record, Some(behind)).await
    }
}

#[async_trait::async_trait]
impl Applier for LinkApplier {
    async fn apply(&self, record: &Record) -> Result<Fingerprint, ApplyError> {
        self.replay(record, None).await
    }

    async fn position(&self) -> Result<Option<Position>, ApplyError> {
        let position = self
            .link
            .position(&self.partition, self.timeout)
            .await
            .map_err(apply_error)?;
        if let Some(at) = position {
            // The replayer asks before it sends: nothing else is sent to this partition
            // meanwhile, so this is where the next record follows (its layer compares a
            // record's `Regroup-Prev` with the highest seq it recorded).
            self.partition.set_delivered(at.applied);
        }
        Ok(position)
    }
}
