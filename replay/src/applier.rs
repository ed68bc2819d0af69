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

    /// The highest seq the partition itself recorded as applied, when it keeps such a
    /// record (the app-side exactly-once layer); `None` when it does not. A partition that
    /// answers is the truth about where to resume, and re-delivery to it is harmless.
    async fn position(&self) -> Result<Option<u64>, ApplyError> {
        Ok(None)
    }
}
