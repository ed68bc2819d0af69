//! [`Membership`]: which partitions form a group, kept in the journal so that partitions
//! added, removed or moved at run time stay so across restarts.
//!
//! A group's membership is one versioned value: a replacement is a compare-and-set on the
//! version, so two administrators (or two proxies) can never both change it from the same
//! starting point. Version 0 means none is stored yet (a new group, seeded from the config).

use serde::{Deserialize, Serialize};

use super::JournalError;

/// One partition of a group, as stored.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct MemberSpec {
    /// Its name, unique in the group.
    pub name: String,
    /// Its base URL, `http://host:port`.
    pub url: String,
    /// The computing system it runs on (its fault domain), if named.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub host: Option<String>,
    /// Failover preference among equally caught-up partitions (higher first).
    #[serde(default)]
    pub priority: i32,
}

/// A group's stored membership.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct StoredMembers {
    /// Goes up by one with every change; 0 is never stored.
    pub version: u64,
    /// The partitions, in the order they were added.
    pub partitions: Vec<MemberSpec>,
}

/// The group's membership, with compare-and-set on its version.
#[async_trait::async_trait]
pub trait Membership: Send + Sync + 'static {
    /// The stored membership of `group`, `None` when none was ever stored.
    async fn members(&self, group: &str) -> Result<Option<StoredMembers>, JournalError>;

    /// Replaces the membership if the stored version is still `expected_version` (0: none
    /// is stored yet), returning the new version (`expected_version + 1`);
    /// [`JournalError::Conflict`] otherwise. The group must exist (its role was created).
    async fn set_members(
        &self,
        group: &str,
        expected_version: u64,
        partitions: &[MemberSpec],
    ) -> Result<u64, JournalError>;
}

/// Encodes a membership for a text column.
pub(crate) fn encode(partitions: &[MemberSpec]) -> String {
    serde_json::to_string(partitions).unwrap_or_else(|_| "[]".to_owned())
}

/// Decodes a stored membership.
pub(crate) fn decode(group: &str, text: &str) -> Result<Vec<MemberSpec>, JournalError> {
    serde_json::from_str(text).map_err(|e| JournalError::Corrupt {
        group: group.to_owned(),
        seq: 0,
        reason: format!("stored membership: {e}"),
    })
}
