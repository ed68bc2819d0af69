//! Partition status: what the group knows about each partition, as shown in `/status`.

use serde::Serialize;

/// A partition's status, derived from supervision, replay progress and divergence.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum PartitionStatus {
    /// Answering heartbeats and within the allowed lag: takes reads (and updates, when
    /// primary).
    Available,
    /// Answering heartbeats but behind the journal by more than the allowed lag:
    /// replaying, takes no reads.
    CatchingUp,
    /// Missed at least one heartbeat (or a proxied request failed to connect), fewer than
    /// the configured retries: takes no reads.
    Suspect,
    /// Missed `heartbeat_retries` consecutive heartbeats: takes no traffic; its replayer
    /// keeps retrying and it resumes from its checkpoint when it answers again.
    Unavailable,
    /// Answered a replay differently from the primary: quarantined, takes no traffic,
    /// replays stop until it is rebuilt.
    Diverged,
    /// Taken out of service by an operator (`regroup drain`): no client traffic; it keeps
    /// replaying so it can come back (`regroup undrain`) caught up.
    Draining,
    /// Being rebuilt from a snapshot of another partition (`regroup rebuild`, or by itself
    /// when it needs records retention truncated): quarantined, no traffic, no replay until
    /// the snapshot is restored.
    Rebuilding,
}

impl PartitionStatus {
    /// The name used in `/status`.
    pub fn as_str(self) -> &'static str {
        match self {
            PartitionStatus::Available => "available",
            PartitionStatus::CatchingUp => "catching_up",
            PartitionStatus::Suspect => "suspect",
            PartitionStatus::Unavailable => "unavailable",
            PartitionStatus::Diverged => "diverged",
            PartitionStatus::Draining => "draining",
            PartitionStatus::Rebuilding => "rebuilding",
        }
    }
}

impl std::fmt::Display for PartitionStatus {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}
