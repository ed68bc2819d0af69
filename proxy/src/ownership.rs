//! One proxy per journal: the journal's ownership lease, claimed at start, renewed while
//! serving, released on a clean shutdown.
//!
//! A journal is sequenced by one proxy at a time. [`claim`] takes the journal's lease
//! ([`regroup_replay::Lease`]) before any group is opened, as an [`Owner`] that names this
//! process (host, pid, listen and admin addresses). When another proxy holds it:
//!
//! - if that proxy is alive (its lease is renewed while we look), this one refuses to
//!   start with [`ProxyError::JournalOwned`] naming it, within about one renewal interval;
//! - if it is silent (crashed, SIGKILLed, frozen), this one waits until the holder's lease
//!   runs out and takes over, logging every second how long it still waits. The wait is
//!   measured by the *holder's* lease (the milliseconds it has left, by the database's
//!   clock), which may be longer than this proxy's own TTL, and bounded by
//!   [`MAX_OWNER_WAIT`] (or this proxy's TTL plus one renewal interval, if longer). A holder
//!   whose lease runs out later than that is refused at once, with a message that says in
//!   how many seconds it runs out (when to start again if that proxy stopped).
//!
//! While serving, a task renews the lease every TTL / [`RENEWALS_PER_TTL`] (every 2 s for
//! the default TTL of 10 s, [`crate::config::DEFAULT_JOURNAL_LEASE_MS`]). A renewal that
//! fails for a database error is retried at the next tick (the lease survives a few); one
//! refused because another proxy claimed the journal meanwhile
//! ([`regroup_replay::JournalError::Fenced`], e.g. this process was paused past its TTL) is
//! logged as an error naming the new owner, and [`Ownership::lost`] resolves: a lone proxy
//! stops serving and exits non-zero, a node of several steps down and follows (`follow`). The journal's fencing refuses every write this process
//! still attempts, so nothing it does after the takeover reaches the journal.
//!
//! Expiry alone does not fence: a proxy whose lease ran out (say the database was
//! unreachable for longer than the TTL) keeps it, and renews it, until another proxy
//! actually claims the journal.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use regroup_replay::{Journal, JournalError, Owner};
use tokio::sync::watch;
use tokio::time::Instant;

use crate::config::Config;
use crate::error::ProxyError;
use crate::server::redact;

/// Renewals per lease TTL: the lease is renewed every TTL / 5, so four renewals in a row
/// may fail before it runs out.
pub const RENEWALS_PER_TTL: u32 = 5;

/// The longest a starting proxy waits for a silent holder's lease to run out (unless its
/// own TTL plus one renewal interval is longer): a holder whose lease runs out later is
/// refused at once, saying when it runs out.
pub const MAX_OWNER_WAIT: Duration = Duration::from_secs(60);

/// How often a refused claim looks at the holder's lease again while waiting.
const WAIT_POLL: Duration = Duration::from_millis(200);

/// How often the wait for a silent owner's lease is reported.
const WAIT_REPORT: Duration = Duration::from_secs(1);

/// This process's claim on its journal; dropping it stops renewing and releases the lease.
pub struct Ownership {
    journal: Arc<dyn Journal>,
    owner: Owner,
    token: u64,
    /// `true` once the holder is to stop renewing (and release).
    stop: watch::Sender<bool>,
    /// The new owner's description once another proxy took the journal over.
    lost: watch::Receiver<Option<String>>,
}

impl std::fmt::Debug for Ownership {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Ownership")
            .field("owner", &self.owner)
            .field("token", &self.token)
            .finish_non_exhaustive()
    }
}

impl Ownership {
    /// Who this process claims to be.
    pub fn owner(&self) -> &Owner {
        &self.owner
    }

    /// The fencing token of the claim.
    pub fn token(&self) -> u64 {
        self.token
    }

    /// Resolves with the new owner's description when another proxy took the journal
    /// over (never, while this process owns it).
    pub async fn lost(&self) -> String {
        let mut lost = self.lost.clone();
        let holder = lost
            .wait_for(Option::is_some)
            .await
            .ok()
            .and_then(|h| h.clone());
        match holder {
            Some(holder) => holder,
            // The renew task is gone without losing the lease: this process stopped.
            None => std::future::pending().await,
        }
    }

    /// Stops renewing and gives the lease up, so the next proxy may start at once.
    pub async fn release(&self) {
        self.stop.send_replace(true);
        if self.lost.borrow().is_some() {
            return;
        }
        match self.journal.release().await {
            Ok(()) => tracing::info!("journal lease released"),
            Err(e) => tracing::warn!(error = %e, "could not release the journal lease"),
        }
    }
}

impl Drop for Ownership {
    fn drop(&mut self) {
        // The renew task releases the lease when it sees this (if the runtime lives on).
        self.stop.send_replace(true);
    }
}

/// Describes this process for an operator: host, pid, listen and admin addresses.
pub fn describe(config: &Config) -> String {
    format!(
        "regroup pid {} on {} (listen {}, admin {})",
        std::process::id(),
        hostname(),
        config.listen,
        config.admin_listen
    )
}

fn hostname() -> String {
    std::fs::read_to_string("/proc/sys/kernel/hostname")
        .ok()
        .map(|h| h.trim().to_owned())
        .filter(|h| !h.is_empty())
        .or_else(|| std::env::var("HOSTNAME").ok().filter(|h| !h.is_empty()))
        .unwrap_or_else(|| "an unknown host".to_owned())
}

/// The leader's client and admin addresses, from its lease's description (see
/// [`describe`]).
pub fn leader_addresses(describe: &str) -> Option<(SocketAddr, SocketAddr)> {
    let inside = describe.rsplit_once(" (listen ")?.1.strip_suffix(')')?;
    let (listen, admin) = inside.split_once(", admin ")?;
    Some((listen.parse().ok()?, admin.parse().ok()?))
}

/// This process as a claimant of its journal.
pub fn owner(config: &Config) -> Owner {
    Owner {
        id: uuid::Uuid::now_v7().to_string(),
        describe: describe(config),
    }
}

/// One attempt to claim `journal` for `owner`: the ownership, or `None` while another
/// proxy holds a live lease (a follower tries again later).
pub async fn try_claim(
    config: &Config,
    journal: Arc<dyn Journal>,
    owner: &Owner,
) -> Result<Option<Ownership>, ProxyError> {
    let ttl = Duration::from_millis(config.journal_lease_ms);
    match journal.claim(owner, ttl).await {
        Ok(token) => Ok(Some(hold(config, journal, owner.clone(), token))),
        Err(JournalError::Fenced { .. }) => Ok(None),
        Err(e) => Err(ProxyError::Journal(format!(
            "{}: claiming the journal: {e}",
            redact(&config.journal)
        ))),
    }
}

/// Starts renewing a lease just claimed.
fn hold(config: &Config, journal: Arc<dyn Journal>, owner: Owner, token: u64) -> Ownership {
    let ttl = Duration::from_millis(config.journal_lease_ms);
    let every = ttl / RENEWALS_PER_TTL;
    tracing::info!(token, ttl_ms = config.journal_lease_ms, "journal claimed");
    let (stop, stop_rx) = watch::channel(false);
    let (lost_tx, lost) = watch::channel(None);
    tokio::spawn(renew(journal.clone(), ttl, every, stop_rx, lost_tx));
    Ownership {
        journal,
        owner,
        token,
        stop,
        lost,
    }
}

/// Claims `journal` for this process (see the module docs) and starts renewing it.
pub async fn claim(config: &Config, journal: Arc<dyn Journal>) -> Result<Ownership, ProxyError> {
    let owner = owner(config);
    let ttl = Duration::from_millis(config.journal_lease_ms);
    let every = ttl / RENEWALS_PER_TTL;
    let url = redact(&config.journal);
    let bound = MAX_OWNER_WAIT.max(ttl + every);
    let owned = |holder: &str| {
        ProxyError::JournalOwned(format!(
            "journal {url} is owned by {holder}: only one proxy may use a journal; stop that \
             one, or give this one another journal"
        ))
    };
    let silent_too_long = |holder: &str, left: Duration| {
        ProxyError::JournalOwned(format!(
            "journal {url} is owned by {holder}, whose lease runs out in {} s unless it renews \
             it (this proxy waits at most {} s): only one proxy may use a journal; if that one \
             stopped, start this one again in {} s, otherwise stop it or give this one another \
             journal",
            left.as_secs_f64().ceil(),
            bound.as_secs(),
            left.as_secs_f64().ceil()
        ))
    };
    let started = Instant::now();
    let mut seen: Option<regroup_replay::OwnerInfo> = None;
    let mut reported: Option<Instant> = None;
    let token = loop {
        let holder = match journal.claim(&owner, ttl).await {
            Ok(token) => break token,
            Err(JournalError::Fenced { holder }) => holder,
            Err(e) => {
                return Err(ProxyError::Journal(format!(
                    "{url}: claiming the journal: {e}"
                )));
            }
        };
        let info = journal
            .owner()
            .await
            .map_err(|e| ProxyError::Journal(format!("{url}: reading the journal's owner: {e}")))?;
        let Some(info) = info else {
            // Released meanwhile: claim again.
            continue;
        };
        // A live owner renews within its renewal interval: its lease moves forward, or a new
        // claim replaced it.
        let renewed = seen
            .as_ref()
            .is_some_and(|s| s.token != info.token || info.remaining_ms > s.remaining_ms);
        if renewed {
            return Err(owned(&info.describe));
        }
        // Silent so far: wait for its lease to run out, if that is within the bound.
        let left = Duration::from_millis(info.remaining_ms);
        let waited = started.elapsed();
        if waited + left > bound {
            return Err(silent_too_long(&info.describe, left));
        }
        if waited >= bound {
            // Run out, yet still refused (a claim racing ours): held, like a live one.
            return Err(owned(&info.describe));
        }
        if reported.is_none_or(|r| r.elapsed() >= WAIT_REPORT) {
            tracing::warn!(owner = %holder, remaining_ms = info.remaining_ms,
                "the journal is owned by another proxy; waiting to see whether it renews its \
                 lease, else until it runs out (a stopped owner's lease is not renewed)");
            reported = Some(Instant::now());
        }
        seen = Some(info);
        tokio::time::sleep(WAIT_POLL).await;
    };
    Ok(hold(config, journal, owner, token))
}

fn stopping(stop: &watch::Receiver<bool>) -> bool {
    *stop.borrow()
}

async fn renew(
    journal: Arc<dyn Journal>,
    ttl: Duration,
    every: Duration,
    mut stop: watch::Receiver<bool>,
    lost: watch::Sender<Option<String>>,
) {
    let mut tick = tokio::time::interval(every);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    tick.tick().await;
    loop {
        let stopped = tokio::select! {
            biased;
            _ = tick.tick() => false,
            stopped = stop.wait_for(|s| *s) => stopped.is_ok(),
        };
        if stopped || stop.has_changed().is_err() {
            let _ = journal.release().await;
            return;
        }
        match journal.renew(ttl).await {
            Ok(()) => {}
            Err(JournalError::Fenced { .. }) if stopping(&stop) => return,
            Err(JournalError::Fenced { holder }) => {
                tracing::error!(new_owner = %holder,
                    "another proxy took the journal over");
                lost.send_replace(Some(holder));
                return;
            }
            Err(e) => tracing::warn!(error = %e, "could not renew the journal lease; retrying"),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use regroup_replay::{Lease, MemoryJournal};

    fn config(lease_ms: u64) -> Config {
        let text = format!(
            "journal_lease_ms = {lease_ms}\n[[groups]]\nname = \"g\"\n\
             [[groups.partitions]]\nname = \"a\"\nurl = \"http://127.0.0.1:1\"\n"
        );
        match Config::parse(&text, std::path::Path::new("t.toml")) {
            Ok(c) => c,
            Err(e) => panic!("test config: {e}"),
        }
    }

    fn refused(r: Result<Ownership, ProxyError>) -> String {
        match r {
            Err(ProxyError::JournalOwned(m)) => m,
            other => panic!("want JournalOwned, got {other:?}"),
        }
    }

    #[tokio::test]
    async fn a_live_owner_is_refused_by_name() -> Result<(), ProxyError> {
        let store = MemoryJournal::new();
        let first = claim(&config(2000), Arc::new(store.handle())).await?;
        let started = Instant::now();
        let message = refused(claim(&config(2000), Arc::new(store.handle())).await);
        assert!(
            message.contains(&first.owner().describe) && message.contains("only one proxy"),
            "{message}"
        );
        // Refused once a renewal was seen (every 400 ms), not at the end of the wait (2.4 s).
        assert!(
            started.elapsed() < Duration::from_millis(1500),
            "{:?}",
            started.elapsed()
        );
        Ok(())
    }

    #[tokio::test]
    async fn a_silent_owner_is_waited_for_then_taken_over() -> Result<(), ProxyError> {
        let store = MemoryJournal::new();
        let silent = Owner {
            id: "crashed".into(),
            describe: "a crashed proxy".into(),
        };
        let old = store
            .handle()
            .claim(&silent, Duration::from_millis(300))
            .await
            .map_err(|e| ProxyError::Journal(e.to_string()))?;
        let started = Instant::now();
        let next = claim(&config(500), Arc::new(store.handle())).await?;
        assert!(
            started.elapsed() >= Duration::from_millis(250),
            "{:?}",
            started.elapsed()
        );
        assert_eq!(next.token(), old + 1);
        Ok(())
    }

    #[tokio::test]
    async fn a_silent_owner_is_waited_for_by_its_lease_not_this_ttl() -> Result<(), ProxyError> {
        let store = MemoryJournal::new();
        let silent = Owner {
            id: "crashed".into(),
            describe: "a crashed proxy with a longer lease".into(),
        };
        let old = store
            .handle()
            .claim(&silent, Duration::from_millis(1500))
            .await
            .map_err(|e| ProxyError::Journal(e.to_string()))?;
        let started = Instant::now();
        // This proxy's own TTL plus one renewal is 600 ms: the holder's lease is what counts.
        let next = claim(&config(500), Arc::new(store.handle())).await?;
        assert!(
            started.elapsed() >= Duration::from_millis(1400),
            "{:?}",
            started.elapsed()
        );
        assert_eq!(next.token(), old + 1);
        Ok(())
    }

    #[tokio::test]
    async fn a_silent_owner_past_the_bound_is_refused_at_once_saying_when() -> Result<(), ProxyError>
    {
        let store = MemoryJournal::new();
        let silent = Owner {
            id: "frozen".into(),
            describe: "a frozen proxy".into(),
        };
        store
            .handle()
            .claim(&silent, MAX_OWNER_WAIT + Duration::from_secs(30))
            .await
            .map_err(|e| ProxyError::Journal(e.to_string()))?;
        let started = Instant::now();
        let message = refused(claim(&config(500), Arc::new(store.handle())).await);
        assert!(
            started.elapsed() < Duration::from_secs(1),
            "{:?}",
            started.elapsed()
        );
        let left = MAX_OWNER_WAIT.as_secs() + 30;
        assert!(
            message.contains("a frozen proxy, whose lease runs out in ")
                && message.contains(&format!("waits at most {} s", MAX_OWNER_WAIT.as_secs()))
                && message.contains(&format!("start this one again in {left} s")),
            "{message}"
        );
        Ok(())
    }

    #[tokio::test]
    async fn a_takeover_is_noticed_at_the_next_renewal() -> Result<(), ProxyError> {
        let store = MemoryJournal::new();
        let first = claim(&config(500), Arc::new(store.handle())).await?;
        // Another handle claims as the same owner: the first's token is no longer live.
        let usurper = Owner {
            id: first.owner().id.clone(),
            describe: "the new owner".into(),
        };
        store
            .handle()
            .claim(&usurper, Duration::from_secs(5))
            .await
            .map_err(|e| ProxyError::Journal(e.to_string()))?;
        let holder = tokio::time::timeout(Duration::from_secs(2), first.lost())
            .await
            .map_err(|_| ProxyError::Journal("the takeover went unnoticed".into()))?;
        assert_eq!(holder, "the new owner");
        Ok(())
    }

    #[tokio::test]
    async fn a_release_lets_the_next_owner_in_at_once() -> Result<(), ProxyError> {
        let store = MemoryJournal::new();
        let first = claim(&config(60_000), Arc::new(store.handle())).await?;
        first.release().await;
        let started = Instant::now();
        claim(&config(60_000), Arc::new(store.handle())).await?;
        assert!(
            started.elapsed() < Duration::from_secs(1),
            "{:?}",
            started.elapsed()
        );
        Ok(())
    }
}
