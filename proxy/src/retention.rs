//! Retention: a background task per group (with `retain_records` or `retain_hours` set)
//! truncates journal records nobody needs any more, so the journal stays bounded under an
//! endless load.
//!
//! **The rule.** A record may go when it is all of: older than the newest `retain_records`
//! records, older than `retain_hours`, sealed and at or below the durable sealed head, and
//! applied by every partition that *holds* the journal. A partition holds it while it
//! answers heartbeats (`available`, `catching_up`, `suspect`, `draining`) and, while it is
//! being rebuilt, at the seq its snapshot includes. One that is `unavailable`, `diverged`
//! or `rebuilding` without a snapshot yet does not hold it: a partition that is down for
//! long cannot make the journal grow without bound. When it returns needing truncated
//! records, its replayer finds them gone and it is rebuilt from a snapshot automatically;
//! meanwhile (standing below what is left) it holds nothing either.
//! The newest record always stays (it holds the head).

use std::sync::Arc;
use std::time::Duration;

use crate::group::Group;
use crate::status::PartitionStatus;

/// How often retention looks at a group.
pub(crate) const RETAIN_EVERY: Duration = Duration::from_millis(500);
/// Records removed at most per look (so one look never holds the journal long).
pub(crate) const TRUNCATE_BATCH: u64 = 10_000;

/// Starts the group's retention task, when its config asks for one.
pub(crate) fn start(group: &Arc<Group>) {
    if !group.config.retains() {
        return;
    }
    let group = group.clone();
    tokio::spawn(async move {
        let mut stop = group.stop.subscribe();
        let mut low = match group.journal.low_water(group.name()).await {
            Ok(l) => l,
            Err(e) => {
                tracing::warn!(group = %group.name(), error = %e, "retention cannot read the low water; trying later");
                0
            }
        };
        loop {
            tokio::select! {
                biased;
                _ = tokio::time::sleep(RETAIN_EVERY) => {}
                _ = stop.changed() => return,
            }
            if *stop.borrow() {
                return;
            }
            let Some(through) = truncatable(&group, low).await else {
                continue;
            };
            match group.journal.truncate(group.name(), through).await {
                Ok(removed) => {
                    tracing::debug!(group = %group.name(), through, removed, "journal truncated");
                    low = through;
                }
                Err(e) => {
                    tracing::warn!(group = %group.name(), through, error = %e, "journal truncation failed; trying later");
                    if let Ok(l) = group.journal.low_water(group.name()).await {
                        low = l;
                    }
                }
            }
        }
    });
}

/// The highest seq that may be truncated now, if it is above `low` (what is gone already).
async fn truncatable(group: &Group, low: u64) -> Option<u64> {
    let sealed = group.sealed();
    // Never the in-doubt record or anything after it, never the newest record.
    let mut through = sealed.min(group.head().saturating_sub(1));
    if let Some(seq) = group.in_doubt_seq() {
        through = through.min(seq.saturating_sub(1));
    }
    if let Some(n) = group.config.retain_records {
        through = through.min(group.head().saturating_sub(n));
    }
    for p in group.members().iter() {
        // Nor a partition that already needs truncated records: only a rebuild helps it,
        // and the journal must not grow while it waits for one.
        if group.is_primary(p) || p.applied() < low {
            continue;
        }
        if let Some(r) = p.rebuild().filter(|r| r.phase.running()) {
            through = through.min(r.hold);
            continue;
        }
        match p.status() {
            PartitionStatus::Available
            | PartitionStatus::CatchingUp
            | PartitionStatus::Suspect
            | PartitionStatus::Draining => through = through.min(p.applied()),
            PartitionStatus::Unavailable
            | PartitionStatus::Diverged
            | PartitionStatus::Rebuilding => {}
        }
    }
    through = through.min(low.saturating_add(TRUNCATE_BATCH));
    if through <= low {
        return None;
    }
    let keep_for = group.config.retain_for();
    if keep_for.is_zero() {
        return Some(through);
    }
    // The newest record old enough: timestamps rise with seq, so a binary search over what
    // is left finds it.
    let cutoff = time::OffsetDateTime::now_utc() - keep_for;
    let old_enough = |seq: u64| async move {
        match group.journal.record(group.name(), seq).await {
            Ok(Some(r)) => r.timestamp < cutoff,
            _ => false,
        }
    };
    let newest = newest_old_enough(low, through, old_enough).await;
    (newest > low).then_some(newest)
}

/// The highest seq in `low..=through` for which `old_enough` holds, given that it holds for
/// a prefix of the range (timestamps rise with seq); `low` when it holds for none.
async fn newest_old_enough<F, Fut>(low: u64, through: u64, old_enough: F) -> u64
where
    F: Fn(u64) -> Fut,
    Fut: std::future::Future<Output = bool>,
{
    let (mut lo, mut hi) = (low, through);
    if hi <= lo || old_enough(hi).await {
        return hi.max(lo);
    }
    // Invariant: everything up to `lo` may go, `hi` may not.
    while lo + 1 < hi {
        let mid = lo + (hi - lo) / 2;
        if old_enough(mid).await {
            lo = mid;
        } else {
            hi = mid;
        }
    }
    lo
}

#[cfg(test)]
mod tests {
    use super::newest_old_enough;

    #[tokio::test]
    async fn the_search_finds_the_newest_record_old_enough() {
        // Records low+1..=through; those up to `cut` are old enough.
        for (low, through) in [(0u64, 1u64), (0, 10), (3, 17), (100, 101), (5, 5)] {
            for cut in low..=through {
                let found = newest_old_enough(low, through, |seq| async move { seq <= cut }).await;
                assert_eq!(found, cut, "low {low} through {through} cut {cut}");
            }
        }
    }
}
