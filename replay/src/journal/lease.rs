//! Ownership of a journal: one proxy at a time sequences a journal's groups. The owner
//! holds a lease with a fencing token; every write of the journal checks the token, so a
//! paused old owner's late writes are refused ([`JournalError::Fenced`]) once another took
//! over, whatever the clocks say.

use std::time::Duration;

use super::JournalError;

/// Who claims a journal: a stable description (host, process, addresses) shown to the
/// operator of a second proxy that is refused.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Owner {
    /// A unique id for this process's claim (e.g. a UUID).
    pub id: String,
    /// What an operator needs to find it: host, pid, listen and admin addresses.
    pub describe: String,
}

/// The lease as stored.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct OwnerInfo {
    /// The owner's id.
    pub id: String,
    /// The owner's description.
    pub describe: String,
    /// The fencing token: goes up by one with every new owner.
    pub token: u64,
    /// Milliseconds the lease has left when it was read (0: expired).
    pub remaining_ms: u64,
}

/// The journal's ownership lease.
#[async_trait::async_trait]
pub trait Lease: Send + Sync + 'static {
    /// Claims the journal for `owner` for `ttl`. Succeeds when nobody holds a live lease (a
    /// new token is issued and every later write of this journal handle carries it);
    /// [`JournalError::Fenced`] naming the holder otherwise.
    async fn claim(&self, owner: &Owner, ttl: Duration) -> Result<u64, JournalError>;

    /// Extends this handle's lease by `ttl`; [`JournalError::Fenced`] when another owner
    /// took over meanwhile.
    async fn renew(&self, ttl: Duration) -> Result<(), JournalError>;

    /// Gives the lease up (a clean shutdown), so another proxy may start at once.
    async fn release(&self) -> Result<(), JournalError>;

    /// The current lease, if any was ever claimed.
    async fn owner(&self) -> Result<Option<OwnerInfo>, JournalError>;
}
