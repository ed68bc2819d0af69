//! Membership at run time: `add`, `remove` and `move` of partitions while the group serves
//! (claims 5–7 of EP 0 990 986: a redundancy group redefined to include other computing
//! systems, a partition removed from one group and added to another).
//!
//! Every change is a compare-and-set of the group's membership in the journal (so it
//! outlives a restart, and a stale change is refused), then the new snapshot is published,
//! and the partition's heartbeat and replayer are started or stopped. Changes of one group
//! are serialized by `membership_lock`, taken before `role_lock`.
//!
//! - `add`: a new partition starts at seq 0 (its old checkpoint and quarantine, if the name
//!   was used before, are reset) and is rebuilt from a snapshot of a healthy partition as
//!   soon as it answers (`rebuild`), then replays the journal after the snapshot; until
//!   then (or when its app offers no snapshots) it replays the journal from the start. It
//!   takes reads once caught up.
//! - `remove`: the partition leaves client traffic first (as `drain`); a primary hands the
//!   role to another partition with no failed request, then it leaves the membership. A
//!   partition that may have executed the in-doubt record is kept until it is settled.
//! - `move`: `remove` from one group, then `add` to the other, where it holds the first
//!   group's data: it is quarantined there and rebuilt for its new group from a snapshot
//!   of one of that group's partitions.

use std::sync::Arc;

use regroup_replay::MemberSpec;

use crate::config::{base_uri, validate_member};
use crate::error::ProxyError;
use crate::group::Group;
use crate::partition::Partition;

fn journal_err(e: regroup_replay::JournalError) -> ProxyError {
    ProxyError::Journal(e.to_string())
}

fn bad(msg: String) -> ProxyError {
    ProxyError::BadRequest(msg)
}

/// Checks that `spec` may join `group`: a valid definition, a name and a URL no member has.
fn check_new(group: &Group, spec: &MemberSpec) -> Result<(), ProxyError> {
    validate_member(spec).map_err(|(field, m)| bad(format!("partition {field}: {m}")))?;
    for p in group.members().iter() {
        if p.name() == spec.name {
            return Err(bad(format!(
                "group {:?} already has a partition {:?}",
                group.name(),
                spec.name
            )));
        }
        if p.spec().url.trim_end_matches('/') == spec.url.trim_end_matches('/') {
            return Err(bad(format!(
                "group {:?}: partition {:?} already has url {} (one copy cannot be two \
                 partitions)",
                group.name(),
                p.name(),
                spec.url
            )));
        }
    }
    Ok(())
}

/// Adds `spec` to `group`. With `quarantine`, it joins quarantined for that reason (it
/// must be rebuilt before it serves). Returns once the membership is stored and the
/// partition supervised; it takes reads when it has caught up.
pub(crate) async fn add(
    group: &Arc<Group>,
    spec: MemberSpec,
    quarantine: Option<String>,
) -> Result<Arc<Partition>, ProxyError> {
    let _changing = group.membership_lock.lock().await;
    check_new(group, &spec)?;
    let base = base_uri(&spec.url).map_err(bad)?;
    // A new copy starts from nothing: forget what a partition of the same name had.
    let journal = &group.journal;
    journal
        .save_checkpoint(group.name(), &spec.name, 0)
        .await
        .map_err(journal_err)?;
    journal
        .set_diverged(group.name(), &spec.name, quarantine.as_deref())
        .await
        .map_err(journal_err)?;
    let partition = Arc::new(Partition::new(&spec, base, 0));
    if let Some(reason) = &quarantine {
        partition.set_diverged(reason);
    }
    let mut members: Vec<Arc<Partition>> = group.members().to_vec();
    members.push(partition.clone());
    store(group, &members).await?;
    crate::supervise::start_one(group, &partition);
    if quarantine.is_none() {
        // Until the rebuild takes over (or if it cannot: an app without snapshots), it
        // replays the journal from the start.
        crate::replicate::start_one(group, &partition);
    }
    group.transition(
        "add",
        format!(
            "{:?} ({}{}) added{}; it is rebuilt from a snapshot of a healthy partition once \
             it answers",
            spec.name,
            spec.url,
            spec.host
                .as_deref()
                .map(|h| format!(" on host {h}"))
                .unwrap_or_default(),
            match &quarantine {
                Some(r) => format!(", quarantined: {r}"),
                None => String::new(),
            }
        ),
    );
    let reason = quarantine.unwrap_or_else(|| "added to the group".to_owned());
    crate::rebuild::start_when_answering_because(group, &spec.name, reason);
    Ok(partition)
}

/// Removes partition `name` from `group`, moving the primary role away first.
pub(crate) async fn remove(group: &Arc<Group>, name: &str) -> Result<MemberSpec, ProxyError> {
    let _changing = group.membership_lock.lock().await;
    remove_locked(group, name).await
}

async fn remove_locked(group: &Arc<Group>, name: &str) -> Result<MemberSpec, ProxyError> {
    let partition = group.member(name).ok_or_else(|| {
        bad(format!(
            "group {:?} has no partition {name:?}",
            group.name()
        ))
    })?;
    if group.members().len() == 1 {
        return Err(bad(format!(
            "{name:?} is the last partition of group {:?}: a group keeps at least one",
            group.name()
        )));
    }
    let was_draining = partition.is_draining();
    // Out of client traffic, and the role moved away (as `drain` does).
    crate::failover::drain(group, &partition).await?;
    let role = group.role_lock.lock().await;
    let refuse = |e: ProxyError| {
        if !was_draining {
            crate::failover::undrain(group, &partition);
        }
        e
    };
    if group.is_primary(&partition) {
        return Err(refuse(ProxyError::Unavailable {
            group: group.name().to_owned(),
            reason: format!("{name:?} took the primary role again; try again"),
        }));
    }
    if let Some(r) = group.in_doubt()
        && r.may_have_executed(name)
    {
        return Err(refuse(bad(format!(
            "{name:?} may have executed the in-doubt record {} of group {:?}: settle it \
             first (regroup resolve)",
            r.seq,
            group.name()
        ))));
    }
    let members: Vec<Arc<Partition>> = group
        .members()
        .iter()
        .filter(|p| p.name() != name)
        .cloned()
        .collect();
    store(group, &members).await.map_err(refuse)?;
    drop(role);
    crate::replicate::stop_one(group, name).await;
    group.transition(
        "remove",
        format!("{name:?} removed from the group by an operator"),
    );
    Ok(partition.spec())
}

/// Moves partition `name` from `from` to `to`. In `to` it is quarantined until rebuilt:
/// its copy holds `from`'s data.
pub(crate) async fn move_to(
    from: &Arc<Group>,
    to: &Arc<Group>,
    name: &str,
) -> Result<Arc<Partition>, ProxyError> {
    if Arc::ptr_eq(from, to) {
        return Err(bad(format!(
            "partition {name:?} is in group {:?} already",
            to.name()
        )));
    }
    let spec = from
        .member(name)
        .ok_or_else(|| bad(format!("group {:?} has no partition {name:?}", from.name())))?
        .spec();
    // Refuse before anything changes when the other group cannot take it.
    check_new(to, &spec)?;
    let spec = remove(from, name).await?;
    let reason = format!(
        "moved from group {:?}: its copy holds that group's data; rebuild it for this group",
        from.name()
    );
    add(to, spec, Some(reason)).await.map_err(|e| {
        tracing::error!(partition = %name, from = %from.name(), to = %to.name(), error = %e,
            "partition left its group but could not join the other; add it again");
        ProxyError::Unavailable {
            group: to.name().to_owned(),
            reason: format!(
                "{name:?} was removed from group {:?} but could not join: {e}; add it again",
                from.name()
            ),
        }
    })?;
    to.member(name).ok_or_else(|| ProxyError::Unavailable {
        group: to.name().to_owned(),
        reason: format!("{name:?} left the group while it joined"),
    })
}

/// Stores `members` as the group's new membership (compare-and-set on the version) and
/// publishes it.
///
/// A failed or refused write is checked against the journal: a write whose acknowledgement
/// was lost (the journal holds exactly this membership, one version on) is adopted, so the
/// next change does not conflict with our own; anything else is an error and nothing
/// changed here.
async fn store(group: &Group, members: &[Arc<Partition>]) -> Result<(), ProxyError> {
    let specs: Vec<MemberSpec> = members.iter().map(|p| p.spec()).collect();
    let expected = group.members_version();
    let version = match group
        .journal
        .set_members(group.name(), expected, &specs)
        .await
    {
        Ok(version) => version,
        Err(e) => match group.journal.members(group.name()).await {
            Ok(Some(stored)) if stored.version == expected + 1 && stored.partitions == specs => {
                tracing::info!(group = %group.name(), version = stored.version, error = %e,
                    "membership change was stored although its write reported an error");
                stored.version
            }
            _ => return Err(journal_err(e)),
        },
    };
    group.replace_members(members.to_vec(), version);
    Ok(())
}
