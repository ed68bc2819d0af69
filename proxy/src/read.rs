//! The read path: requests balanced over the partitions that are available and within the
//! allowed lag, by power of two choices over peak-EWMA latency (tower's `p2c` and
//! `PeakEwma`, kept here in plain types so that each client thread has a balancer of its
//! own, with the connections of its partitions: see `upstream`).
//!
//! Each balancer has a task on its own runtime that keeps its endpoints equal to the group's
//! available partitions (it follows the group's `changed` watch), and every read waits at
//! most `read_wait_ms` for an eligible partition before a 503.

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;

use http::{Request, Response};
use tokio::sync::watch;
use tokio::time::Instant;

use crate::error::ProxyError;
use crate::forward::ProxyBody;
use crate::group::Group;
use crate::partition::Partition;
use crate::status::PartitionStatus;
use crate::upstream::{Endpoint, EndpointError, Outgoing, ReadBody};

/// How fresh a read must be, from the client's `Regroup-Consistency` header (and
/// `Regroup-Position` for `session`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Consistency {
    /// Any available partition within the allowed lag (the default), balanced.
    Any,
    /// Only a partition that has applied at least this seq (read-your-writes: pass the
    /// `Regroup-Seq` of your last update as `Regroup-Position`); the primary when none has.
    Session(u64),
    /// The primary.
    Primary,
}

/// The header that picks a read's [`Consistency`].
pub const CONSISTENCY_HEADER: &str = "regroup-consistency";
/// The position a `session` read must see.
pub const POSITION_HEADER: &str = "regroup-position";

impl Consistency {
    /// Reads (and removes) the consistency headers; malformed ones are a 400.
    pub fn take_from(headers: &mut http::HeaderMap) -> Result<Consistency, ProxyError> {
        if !headers.keys().any(|k| k.as_str().starts_with("regroup-")) {
            return Ok(Consistency::Any);
        }
        let text =
            |h: Option<http::HeaderValue>, name: &str| -> Result<Option<String>, ProxyError> {
                h.map(|v| {
                    v.to_str()
                        .map(|s| s.trim().to_ascii_lowercase())
                        .map_err(|_| ProxyError::BadRequest(format!("header {name} is not text")))
                })
                .transpose()
            };
        let mode = text(headers.remove(CONSISTENCY_HEADER), CONSISTENCY_HEADER)?;
        let position = text(headers.remove(POSITION_HEADER), POSITION_HEADER)?;
        match mode.as_deref() {
            None | Some("any") => Ok(Consistency::Any),
            Some("primary") => Ok(Consistency::Primary),
            Some("session") => match position {
                None => Ok(Consistency::Any),
                Some(p) => p.parse().map(Consistency::Session).map_err(|_| {
                    ProxyError::BadRequest(format!(
                        "header {POSITION_HEADER} must be a seq (a number), not {p:?}"
                    ))
                }),
            },
            Some(other) => Err(ProxyError::BadRequest(format!(
                "header {CONSISTENCY_HEADER} must be any, session or primary, not {other:?}"
            ))),
        }
    }
}

/// A read balancer of one group: power of two choices over the peak-EWMA load of the
/// group's available partitions. One per client thread (and one for the group's own runtime),
/// so that its lock is never contended and its connections stay on one runtime.
pub(crate) struct Reads {
    balancer: Mutex<Balancer>,
    /// Bumped by the membership task after each change (a read waiting for a partition).
    updated: watch::Sender<u64>,
    /// The group's sealed head and allowed lag: an answer whose `Regroup-Applied` says the
    /// partition stands further behind is not served.
    sealed: watch::Receiver<u64>,
    max_lag: u64,
    /// Rotates `session` reads over the partitions fresh enough to serve them.
    next: AtomicUsize,
}

impl std::fmt::Debug for Reads {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Reads").finish_non_exhaustive()
    }
}

/// The endpoints a balancer chooses from, and its random draws.
struct Balancer {
    /// The available partitions (in the order of the group's members).
    endpoints: Vec<Arc<Endpoint>>,
    rng: u64,
}

impl Balancer {
    /// A random number (xorshift64*: the draw only has to spread reads).
    fn next_random(&mut self) -> u64 {
        let mut x = self.rng;
        x ^= x >> 12;
        x ^= x << 25;
        x ^= x >> 27;
        self.rng = x;
        x.wrapping_mul(0x2545_f491_4f6c_dd1d)
    }

    /// Power of two choices: the less loaded of two distinct endpoints drawn at random.
    fn pick(&mut self, now: Instant) -> Option<Arc<Endpoint>> {
        let n = self.endpoints.len() as u64;
        match n {
            0 => None,
            1 => self.endpoints.first().cloned(),
            _ => {
                let r = self.next_random();
                let a = (r % n) as usize;
                // A second index among the n - 1 others.
                let b = ((a as u64 + 1 + (r >> 32) % (n - 1)) % n) as usize;
                let (ea, eb) = (&self.endpoints[a], &self.endpoints[b]);
                let chosen = if ea.cost(now) <= eb.cost(now) { ea } else { eb };
                Some(chosen.clone())
            }
        }
    }
}

/// How long an idle-connection sweep waits for the next.
const SWEEP_EVERY: Duration = Duration::from_secs(10);

impl Reads {
    /// Starts a balancer and, on the current runtime, the task that keeps its endpoints in
    /// step with statuses (and closes connections idle too long).
    pub(crate) fn start(group: &Arc<Group>) -> Arc<Reads> {
        // A different sequence per balancer (std's hasher keys are random).
        let seed = {
            use std::hash::{BuildHasher, Hasher};
            std::collections::hash_map::RandomState::new()
                .build_hasher()
                .finish()
                | 1
        };
        let reads = Arc::new(Reads {
            balancer: Mutex::new(Balancer {
                endpoints: Vec::new(),
                rng: seed,
            }),
            updated: watch::Sender::new(0),
            sealed: group.watch_sealed(),
            max_lag: group.config.max_read_lag,
            next: AtomicUsize::new(0),
        });
        // Subscribed before the first update, so that no change falls between.
        let changed = group.changed.subscribe();
        let stop = group.stop.subscribe();
        reads.update(group);
        tokio::spawn(membership(
            group.clone(),
            Arc::downgrade(&reads),
            changed,
            stop,
        ));
        reads
    }

    fn balancer(&self) -> MutexGuard<'_, Balancer> {
        self.balancer.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Makes the endpoints those of the available partitions: a partition that stays keeps
    /// its endpoint (its load and its connections).
    fn update(&self, group: &Group) {
        let members = group.members();
        let mut balancer = self.balancer();
        let endpoints = members
            .iter()
            .filter(|p| p.status() == PartitionStatus::Available)
            .map(|p| {
                balancer
                    .endpoints
                    .iter()
                    .find(|e| Arc::ptr_eq(e.partition(), p))
                    .cloned()
                    .unwrap_or_else(|| Arc::new(Endpoint::new(p.clone())))
            })
            .collect();
        balancer.endpoints = endpoints;
        drop(balancer);
        self.updated.send_modify(|v| *v = v.wrapping_add(1));
    }

    fn sweep(&self) {
        let now = Instant::now();
        for e in &self.balancer().endpoints {
            e.sweep(now);
        }
    }

    /// This balancer's endpoint of `partition`, or a new one (not kept) when it has none.
    fn endpoint_of(&self, partition: Arc<Partition>) -> Arc<Endpoint> {
        self.balancer()
            .endpoints
            .iter()
            .find(|e| Arc::ptr_eq(e.partition(), &partition))
            .cloned()
            .unwrap_or_else(|| Arc::new(Endpoint::new(partition)))
    }

    /// The endpoint to send a balanced read to, waiting at most `read_wait_ms` for one.
    async fn choose(&self, group: &Group) -> Result<Arc<Endpoint>, ProxyError> {
        if let Some(e) = self.balancer().pick(Instant::now()) {
            return Ok(e);
        }
        let wait = group.config.read_wait();
        // Subscribed before looking again, so that no change falls between.
        let mut updated = self.updated.subscribe();
        let found = tokio::time::timeout(wait, async {
            loop {
                if let Some(e) = self.balancer().pick(Instant::now()) {
                    return Some(e);
                }
                if updated.changed().await.is_err() {
                    return None;
                }
            }
        })
        .await;
        match found {
            Ok(Some(e)) => Ok(e),
            Ok(None) => Err(ProxyError::NoPartition {
                group: group.name().to_owned(),
                reason: "the read balancer stopped".into(),
            }),
            Err(_) => Err(ProxyError::NoPartition {
                group: group.name().to_owned(),
                reason: format!("none available within {} ms", wait.as_millis()),
            }),
        }
    }

    /// Sends a prepared read as `consistency` asks: balanced (`any`), to a partition that has
    /// applied the client's position (`session`, else the primary), or to the primary.
    pub(crate) async fn call_consistent(
        &self,
        group: &Group,
        req: Request<ProxyBody>,
        consistency: Consistency,
    ) -> Result<Response<ReadBody>, ProxyError> {
        let no_primary = || ProxyError::NoPartition {
            group: group.name().to_owned(),
            reason: "the primary is not a member".into(),
        };
        let partition = match consistency {
            Consistency::Any => return self.call(group, req).await,
            Consistency::Primary => group.primary().ok_or_else(no_primary)?,
            Consistency::Session(position) => {
                let primary = group.primary().ok_or_else(no_primary)?;
                let members = group.members();
                let mut fresh: Vec<&Arc<Partition>> = members
                    .iter()
                    .filter(|p| {
                        p.name() != primary.name()
                            && p.status() == PartitionStatus::Available
                            && p.applied() >= position
                    })
                    .collect();
                fresh.push(&primary);
                let turn = self.next.fetch_add(1, Ordering::Relaxed);
                fresh[turn % fresh.len()].clone()
            }
        };
        let endpoint = self.endpoint_of(partition);
        self.send(group, &endpoint, Outgoing::WithBody(Some(req)))
            .await
    }

    /// Sends a prepared read to the less loaded of two random eligible partitions. A read
    /// without a body whose partition fails (refused or broken connection) is sent again,
    /// to the partitions left (at most twice the number of partitions in all); a refusing
    /// partition counts a missed heartbeat.
    pub(crate) async fn call(
        &self,
        group: &Group,
        req: Request<ProxyBody>,
    ) -> Result<Response<ReadBody>, ProxyError> {
        if !crate::route::has_no_body(&req) {
            let endpoint = self.choose(group).await?;
            return self
                .send(group, &endpoint, Outgoing::WithBody(Some(req)))
                .await;
        }
        let (parts, _) = req.into_parts();
        let mut attempts = 2 * group.members().len().max(1);
        loop {
            let endpoint = self.choose(group).await?;
            match self
                .send(group, &endpoint, Outgoing::Bodiless(&parts))
                .await
            {
                Ok(resp) => return Ok(resp),
                Err(e) => {
                    attempts -= 1;
                    // A read changes nothing, so one without a body is safe to send again,
                    // whether the connection was refused or broke before the answer.
                    if !matches!(e, ProxyError::Upstream { .. }) || attempts == 0 {
                        return Err(e);
                    }
                    group.refresh(endpoint.partition());
                    // Give the membership task a moment to drop the refusing partition.
                    tokio::time::sleep(Duration::from_millis(5)).await;
                }
            }
        }
    }

    /// Sends `out` to `endpoint`; an answer whose `Regroup-Applied` stands further behind the
    /// sealed head than the allowed lag is not served.
    async fn send(
        &self,
        group: &Group,
        endpoint: &Arc<Endpoint>,
        out: Outgoing<'_>,
    ) -> Result<Response<ReadBody>, ProxyError> {
        let upstream = |e: EndpointError| ProxyError::Upstream {
            group: group.name().to_owned(),
            partition: e.partition,
            reason: e.reason,
        };
        let resp = endpoint.send(out).await.map_err(upstream)?;
        if let Some(applied) = resp
            .headers()
            .get(regroup_replay::headers::APPLIED)
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.parse::<u64>().ok())
        {
            let sealed = *self.sealed.borrow();
            if applied.saturating_add(self.max_lag) < sealed {
                // Restarted behind where the group had it (a restored copy): out of the read
                // set until supervision has asked it where it stands.
                let partition = endpoint.partition();
                partition.record_miss();
                return Err(ProxyError::Upstream {
                    group: group.name().to_owned(),
                    partition: partition.name().to_owned(),
                    reason: format!(
                        "stands at {applied} by its own record, {sealed} are sealed: not served"
                    ),
                });
            }
        }
        Ok(resp)
    }
}

/// Keeps a balancer's endpoints equal to the set of available partitions, and closes the
/// connections idle for too long. Ends with the group, or when the balancer is dropped.
async fn membership(
    group: Arc<Group>,
    reads: std::sync::Weak<Reads>,
    mut changed: watch::Receiver<u64>,
    mut stop: watch::Receiver<bool>,
) {
    let mut sweep = tokio::time::interval_at(Instant::now() + SWEEP_EVERY, SWEEP_EVERY);
    sweep.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tokio::select! {
            r = changed.changed() => {
                if r.is_err() {
                    return;
                }
                changed.borrow_and_update();
                let Some(reads) = reads.upgrade() else { return };
                reads.update(&group);
            }
            _ = sweep.tick() => {
                let Some(reads) = reads.upgrade() else { return };
                reads.sweep();
            }
            _ = stop.changed() => return,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn endpoint(name: &str) -> Arc<Endpoint> {
        let spec = regroup_replay::MemberSpec {
            name: name.into(),
            url: "http://127.0.0.1:1".into(),
            host: None,
            priority: 0,
        };
        let base = "http://127.0.0.1:1".parse().expect("uri");
        Arc::new(Endpoint::new(Arc::new(Partition::new(&spec, base, 0))))
    }

    #[tokio::test(start_paused = true)]
    async fn p2c_never_picks_the_most_loaded_of_three() {
        let (a, b, c) = (endpoint("a"), endpoint("b"), endpoint("c"));
        for _ in 0..3 {
            c.add_in_flight();
        }
        let mut balancer = Balancer {
            endpoints: vec![a, b, c],
            rng: 0x9e37_79b9_7f4a_7c15,
        };
        let mut seen = std::collections::BTreeMap::new();
        for _ in 0..300 {
            let e = balancer.pick(Instant::now()).expect("an endpoint");
            *seen.entry(e.partition().name().to_owned()).or_insert(0) += 1;
        }
        assert_eq!(seen.get("c"), None, "{seen:?}");
        assert!(seen.get("a").is_some_and(|n| *n > 50), "{seen:?}");
        assert!(seen.get("b").is_some_and(|n| *n > 50), "{seen:?}");
        balancer.endpoints.truncate(1);
        assert!(balancer.pick(Instant::now()).is_some());
        balancer.endpoints.clear();
        assert!(balancer.pick(Instant::now()).is_none());
    }

    fn headers(pairs: &[(&'static str, &'static str)]) -> http::HeaderMap {
        let mut h = http::HeaderMap::new();
        for (k, v) in pairs {
            h.insert(*k, http::HeaderValue::from_static(v));
        }
        h
    }

    #[test]
    fn consistency_headers_are_read_and_removed() {
        let mut h = headers(&[
            ("regroup-consistency", "Session"),
            ("regroup-position", "42"),
        ]);
        assert_eq!(
            Consistency::take_from(&mut h).ok(),
            Some(Consistency::Session(42))
        );
        assert!(h.is_empty(), "the headers must not reach the partition");
        let mut h = headers(&[("regroup-consistency", "primary")]);
        assert_eq!(
            Consistency::take_from(&mut h).ok(),
            Some(Consistency::Primary)
        );
        let mut h = headers(&[("regroup-consistency", "session")]);
        assert_eq!(Consistency::take_from(&mut h).ok(), Some(Consistency::Any));
        assert_eq!(
            Consistency::take_from(&mut headers(&[])).ok(),
            Some(Consistency::Any)
        );
    }

    #[test]
    fn bad_consistency_headers_are_named() {
        let e = Consistency::take_from(&mut headers(&[("regroup-consistency", "strong")]));
        assert_eq!(
            e.err().map(|e| e.to_string()).as_deref(),
            Some("header regroup-consistency must be any, session or primary, not \"strong\"")
        );
        let mut h = headers(&[
            ("regroup-consistency", "session"),
            ("regroup-position", "x"),
        ]);
        assert_eq!(
            Consistency::take_from(&mut h)
                .err()
                .map(|e| e.to_string())
                .as_deref(),
            Some("header regroup-position must be a seq (a number), not \"x\"")
        );
    }
}
