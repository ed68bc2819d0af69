//! Failover and planned switchover: moving the primary role (patent claims 3, 4, 10, 11).
//!
//! **Unplanned.** When supervision marks the primary `unavailable`, the partition that can
//! lead (answering heartbeats, not diverged, not drained) and has applied the most of the
//! journal (ties: higher `priority`, then name) takes the role:
//!
//! 1. New updates wait (`switching`), bounded by their `failover_wait_ms`.
//! 2. The epoch goes up by one, durably, under the seal gate: from now on no answer from
//!    the deposed primary can be sealed; an update that was in flight there becomes in doubt.
//! 3. The candidate replays what it lacks up to the sealed head; its replayer stops.
//! 4. The candidate becomes primary (durable), the old primary's checkpoint is saved at the
//!    sealed head and a replayer starts for it: when it returns it catches up like any
//!    replica (and the fingerprint check, or its exactly-once record, meets any update it
//!    executed in doubt).
//! 5. Updates resume; an in-doubt update is executed by the new primary (same seq, txn id
//!    and timestamp, new epoch) and its waiting client gets that answer.
//!
//! **Planned** (`promote`, `drain`): the same, but the write slot is taken first, so the
//! update in flight finishes normally and nothing is in doubt: no client request fails.

use std::sync::Arc;
use std::time::Duration;

use tokio::time::Instant;

use crate::error::ProxyError;
use crate::group::Group;
use crate::replicate;
use crate::status::PartitionStatus;

/// Starts the task that fails over when the primary becomes unavailable.
pub(crate) fn start(group: &Arc<Group>) {
    let group = group.clone();
    tokio::spawn(async move {
        let mut changed = group.changed.subscribe();
        let mut stop = group.stop.subscribe();
        loop {
            changed.borrow_and_update();
            let primary = group.primary();
            let lost =
                primary.status() == PartitionStatus::Unavailable || primary.diverged().is_some();
            if lost && has_candidate(&group) {
                let from = primary.name().to_owned();
                let started = std::time::Instant::now();
                match move_role(&group, None, false).await {
                    Ok(to) => tracing::warn!(group = %group.name(), %from, %to,
                        epoch = group.epoch(), took_ms = started.elapsed().as_millis() as u64,
                        "failover: primary role moved"),
                    Err(e) => {
                        tracing::error!(group = %group.name(), error = %e, "failover failed");
                        tokio::time::sleep(Duration::from_millis(100)).await;
                    }
                }
                continue;
            }
            tokio::select! {
                r = changed.changed() => if r.is_err() { return },
                _ = stop.changed() => return,
            }
        }
    });
}

fn has_candidate(group: &Group) -> bool {
    choose(group, None).is_some()
}

/// The partition that should take the role: `target` if it can lead, else the one that
/// can lead and has applied the most (ties: priority, then name), never the primary.
fn choose(group: &Group, target: Option<usize>) -> Option<usize> {
    let primary = group.primary_index();
    let eligible = |i: usize| i != primary && group.partitions[i].can_lead();
    if let Some(t) = target {
        return eligible(t).then_some(t);
    }
    (0..group.partitions.len())
        .filter(|&i| eligible(i))
        .max_by(|&a, &b| {
            let (pa, pb) = (&group.partitions[a], &group.partitions[b]);
            pa.applied()
                .cmp(&pb.applied())
                .then(pa.priority().cmp(&pb.priority()))
                .then(pb.name().cmp(pa.name()))
        })
}

/// Moves the primary role to `target` (or the best candidate). `planned` waits for the
/// update in flight to finish first. Returns the new primary's name.
pub(crate) async fn move_role(
    group: &Arc<Group>,
    target: Option<usize>,
    planned: bool,
) -> Result<String, ProxyError> {
    let _role = group.role_lock.lock().await;
    let unavailable = |reason: String| ProxyError::Unavailable {
        group: group.name().to_owned(),
        reason,
    };
    if let Some(t) = target
        && t == group.primary_index()
    {
        return Ok(group.partitions[t].name().to_owned());
    }
    if choose(group, target).is_none() {
        return Err(unavailable(match target {
            Some(t) => format!(
                "partition {:?} cannot take the primary role (status {})",
                group.partitions[t].name(),
                group.partitions[t].status()
            ),
            None => "no partition can take the primary role".into(),
        }));
    }
    group.switching.send_replace(true);
    group.bump();
    let slot = if planned {
        let wait = group.config.failover_wait();
        match tokio::time::timeout(wait, group.write_slot.lock()).await {
            Ok(slot) => Some(slot),
            Err(_) => {
                group.switching.send_replace(false);
                group.bump();
                return Err(unavailable(
                    "the update in flight did not finish in time for the switchover".into(),
                ));
            }
        }
    } else {
        None
    };
    let result = hand_over(group, target, planned).await;
    drop(slot);
    group.switching.send_replace(false);
    group.bump();
    result
}

async fn hand_over(
    group: &Arc<Group>,
    target: Option<usize>,
    planned: bool,
) -> Result<String, ProxyError> {
    let old = group.primary_index();
    let journal_err = |e: regroup_replay::JournalError| ProxyError::Journal(e.to_string());
    // Fence the deposed primary: no answer of the old epoch is sealed after this.
    let (was, epoch) = {
        let _gate = group.seal_gate.lock().await;
        let was = group.epoch();
        group.epoch.send_replace(was + 1);
        (was, was + 1)
    };
    // Catch the candidate up to the sealed head (frozen now), re-choosing if it fails.
    let limit = Instant::now() + Duration::from_secs(if planned { 30 } else { 3600 });
    let mut changed = group.changed.subscribe();
    let new = loop {
        changed.borrow_and_update();
        let Some(candidate) = choose(group, target) else {
            if Instant::now() > limit || target.is_some() {
                return Err(ProxyError::Unavailable {
                    group: group.name().to_owned(),
                    reason: "no partition can take the primary role".into(),
                });
            }
            let _ = tokio::time::timeout(Duration::from_millis(200), changed.changed()).await;
            continue;
        };
        let sealed = *group.sealed.borrow();
        let p = &group.partitions[candidate];
        if p.applied() >= sealed {
            replicate::stop_one(group, candidate).await;
            if p.applied() >= sealed && p.can_lead() {
                break candidate;
            }
            replicate::start_one(group, candidate);
            continue;
        }
        if Instant::now() > limit {
            return Err(ProxyError::Unavailable {
                group: group.name().to_owned(),
                reason: format!(
                    "partition {:?} did not catch up ({} of {sealed}) in time",
                    p.name(),
                    p.applied()
                ),
            });
        }
        let _ = tokio::time::timeout(Duration::from_millis(50), changed.changed()).await;
    };
    let sealed = *group.sealed.borrow();
    let new_name = group.partitions[new].name().to_owned();
    // The old primary executed every sealed record; it resumes from there as a replica.
    group
        .journal
        .save_checkpoint(group.name(), group.partitions[old].name(), sealed)
        .await
        .map_err(journal_err)?;
    group
        .journal
        .set_role(
            group.name(),
            was,
            &regroup_replay::StoredRole {
                epoch,
                primary: new_name.clone(),
            },
        )
        .await
        .map_err(journal_err)?;
    group.partitions[old].set_applied(sealed);
    group.partitions[new].set_applied(sealed);
    group.set_primary(new);
    replicate::start_one(group, old);
    Ok(new_name)
}

/// Takes partition `index` out of client traffic, moving the primary role away first
/// when it holds it. It keeps replaying.
pub(crate) async fn drain(group: &Arc<Group>, index: usize) -> Result<(), ProxyError> {
    let p = &group.partitions[index];
    p.set_draining(true);
    group.refresh(p);
    if index == group.primary_index()
        && let Err(e) = move_role(group, None, true).await
    {
        p.set_draining(false);
        group.refresh(p);
        return Err(match e {
            ProxyError::Unavailable { group, reason } => ProxyError::Unavailable {
                reason: format!("cannot drain primary {:?}: {reason}", p.name()),
                group,
            },
            e => e,
        });
    }
    tracing::info!(group = %group.name(), partition = %p.name(), "partition drained");
    Ok(())
}

/// Returns a drained partition to service.
pub(crate) fn undrain(group: &Group, index: usize) {
    let p = &group.partitions[index];
    p.set_draining(false);
    group.refresh(p);
    tracing::info!(group = %group.name(), partition = %p.name(), "partition back in service");
}
