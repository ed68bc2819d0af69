//! Supervision: the patent's periodic messages, time-outs and retry counts. Every
//! `heartbeat_interval_ms` each partition gets `GET <health_path>`; no 2xx within
//! `heartbeat_timeout_ms` is a miss. One miss makes it `suspect`, `heartbeat_retries`
//! consecutive misses `unavailable`; one answer makes it healthy again.
//!
//! **A partition that comes back is asked where it stands** before it is healthy again:
//! after any miss (and every [`POSITION_EVERY`] beats for a partition that keeps the
//! app-side layer's record), its `/_regroup/applied` is read. Behind where the group had it
//! (a copy restored from an older backup, or reset) → `rewind`: it leaves the read set and
//! replays from there; ahead of the journal → `quarantine`. A partition without the app
//! layer cannot say where it stands: a restored copy of it is only caught by the
//! fingerprint check of the next replay.

use std::sync::Arc;

use tokio::time::MissedTickBehavior;

use crate::group::Group;
use crate::partition::{Health, Partition};
use crate::replicate;

/// A partition that keeps its own record is asked where it stands every this many beats,
/// even when it never missed one (a restart between two beats).
pub const POSITION_EVERY: u64 = 5;

/// Starts one heartbeat task per partition of `group`.
pub(crate) fn start(group: &Arc<Group>) {
    for p in group.members().iter() {
        start_one(group, p);
    }
}

/// Starts the heartbeat task of `partition` (a partition added at run time); it ends when
/// the partition leaves the group.
pub(crate) fn start_one(group: &Arc<Group>, partition: &Arc<Partition>) {
    tokio::spawn(heartbeat(group.clone(), partition.clone()));
}

/// Checks every partition once, concurrently; used before the proxy opens so the first
/// reads find the healthy partitions.
pub(crate) async fn check_all(group: &Arc<Group>) {
    let members = group.members();
    let checks = members.iter().map(|p| beat(group, p, 0));
    futures_util::future::join_all(checks).await;
    group.refresh_all();
}

async fn heartbeat(group: Arc<Group>, partition: Arc<Partition>) {
    let mut tick = tokio::time::interval(group.config.heartbeat_interval());
    tick.set_missed_tick_behavior(MissedTickBehavior::Delay);
    let mut stop = group.stop.subscribe();
    let mut beats = 0u64;
    loop {
        tokio::select! {
            biased;
            _ = tick.tick() => {}
            _ = stop.changed() => return,
        }
        if !group
            .member(partition.name())
            .is_some_and(|p| Arc::ptr_eq(&p, &partition))
        {
            // Removed from the group.
            return;
        }
        beats = beats.wrapping_add(1);
        beat(&group, &partition, beats).await;
        group.refresh(&partition);
    }
}

/// Whether the journal holds a record executed after `from` up to `to`: a partition's own
/// record only counts executed records, so one that stands at `from` while the group had it
/// at `to` is behind only if something between was executed (skipped records leave gaps).
async fn executed_between(group: &Group, from: u64, to: u64) -> bool {
    match group
        .journal
        .read_after(group.name(), from, to - from)
        .await
    {
        Ok(records) => records
            .iter()
            .any(|r| r.seq <= to && r.state == regroup_replay::RecordState::Executed),
        // Unknown: treat it as behind (it replays from its own record, which is harmless).
        Err(_) => true,
    }
}

async fn beat(group: &Arc<Group>, partition: &Arc<Partition>, n: u64) {
    let timeout = group.config.heartbeat_timeout();
    let came_back = partition.health() != Health::Up;
    if let Err(reason) = group
        .link
        .health(partition, &group.config.health_path, timeout)
        .await
    {
        tracing::trace!(partition = %partition.name(), %reason, "heartbeat missed");
        partition.record_miss();
        return;
    }
    let ask = came_back || (partition.keeps_own_record() && n.is_multiple_of(POSITION_EVERY));
    if ask && partition.diverged().is_none() {
        // Read before asking: the partition's own record is never behind what the group
        // credited it with before the question, so "behind" below is a real rewind.
        let before = partition.applied();
        match group.link.position(partition, timeout).await {
            Ok(Some(position)) => {
                // Judged by the highest seq it recorded: a copy that took records out of seq
                // order (parallel replay) holds every executed record the group credited it
                // with below that seq, so "behind" still means a real rewind. It is replayed
                // from where every record below is recorded.
                let (highest, resume) = (position.applied, position.resume_at());
                partition.set_keeps_own_record(true);
                if highest > group.head()
                    || (highest < before && executed_between(group, highest, before).await)
                {
                    // Out of the read set while it is repositioned.
                    partition.record_miss();
                    group.refresh(partition);
                    let at = if highest > group.head() {
                        highest
                    } else {
                        resume
                    };
                    replicate::rewind(group, partition, at).await;
                    return;
                }
            }
            Ok(None) => partition.set_keeps_own_record(false),
            Err(e) => {
                tracing::debug!(partition = %partition.name(), error = %e,
                    "cannot ask where it stands; it stays out of service this beat");
                partition.record_miss();
                return;
            }
        }
    }
    partition.set_health(Health::Up);
}
