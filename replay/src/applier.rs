//! The seam between the replayer and a partition: apply one record, return its answer.

use crate::record::{Fingerprint, Record};

/// Why a record could not be applied. The replayer retries every variant with backoff:
/// the record stays next in line until the partition answers.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ApplyError {
    /// The request never reached the partition (connection refused, DNS, pool closed):
    /// retrying cannot apply it twice.
    #[error("partition unreachable: {0}")]
    Unreachable(String),
    /// The request may have reached the partition but no answer came back (connection
    /// broken, timeout). Sent again only to a partition that keeps the app-side exactly-once
    /// record (a re-delivery is answered from it); any other is quarantined, since it may
    /// still apply the first request late, after a retry, where no answer shows it.
    #[error("no answer from partition: {0}")]
    NoAnswer(String),
}

/// Applies records to one partition.
#[async_trait::async_trait]
pub trait Applier: Send + Sync + 'static {
    /// Sends `record` to the partition as a replay and returns the fingerprint of its
    /// answer.
    async fn apply(&self, record: &Record) -> Result<Fingerprint, ApplyError>;

    /// Where the partition stands by its own record, when it keeps one (the app-side
    /// exactly-once layer); `None` when it does not. A partition that answers is the truth
    /// about where to resume, and re-delivery to it is harmless.
    async fn position(&self) -> Result<Option<Position>, ApplyError> {
        Ok(None)
    }
}

/// Where a partition stands by its own exactly-once record (`GET /_regroup/applied`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Position {
    /// The highest seq it recorded.
    pub applied: u64,
    /// With a layer that records out of seq order (parallel replay): a seq at or below
    /// which every record it needs is recorded. `None`: it records in seq order only.
    pub resume: Option<u64>,
}

impl Position {
    /// A partition that records in seq order, at `applied`.
    pub fn in_order(applied: u64) -> Self {
        Position {
            applied,
            resume: None,
        }
    }

    /// Where a sender resumes: every record at or below it is recorded there.
    pub fn resume_at(&self) -> u64 {
        self.resume.map_or(self.applied, |r| r.min(self.applied))
    }

    /// Whether the partition takes records out of seq order (parallel replay).
    pub fn parallel(&self) -> bool {
        self.resume.is_some()
    }
}
