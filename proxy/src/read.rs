//! The read path: requests balanced over the partitions that are available and within the
//! allowed lag, with tower's power-of-two-choices balancer over peak-EWMA latency.
//!
//! tower's `Balance` never evicts an endpoint by itself and waits forever with none, so
//! `membership` inserts and removes endpoints as statuses change, and every read waits
//! at most `read_wait_ms` for an eligible partition before a 503.

use std::collections::HashSet;
use std::convert::Infallible;
use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;

use futures_util::Stream;
use http::{Request, Response};
use hyper::body::Incoming;
use tokio::sync::mpsc;
use tower::Service;
use tower::balance::p2c::Balance;
use tower::discover::Change;
use tower::load::{CompleteOnResponse, PeakEwma};

use crate::error::ProxyError;
use crate::forward::{BoxError, LocalUpstream, ProxyBody, Upstream, on_partition};
use crate::group::Group;
use crate::link::error_chain;
use crate::partition::Partition;
use crate::status::PartitionStatus;

type Endpoint = PeakEwma<ReadEndpoint, CompleteOnResponse>;
type Changes = Pin<Box<dyn Stream<Item = Result<Change<String, Endpoint>, Infallible>> + Send>>;

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

/// The group's read balancer.
pub(crate) struct Reads {
    balance: std::sync::Mutex<Balance<Changes, Request<ProxyBody>>>,
    /// Rotates `session` reads over the partitions fresh enough to serve them.
    next: std::sync::atomic::AtomicUsize,
}

impl std::fmt::Debug for Reads {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Reads").finish_non_exhaustive()
    }
}

/// A read failed at a partition.
#[derive(Debug, thiserror::Error)]
#[error("partition {partition}: {reason}")]
struct EndpointError {
    partition: String,
    reason: String,
}

/// Forwards a prepared read to one partition.
#[derive(Clone)]
struct ReadEndpoint {
    client: Arc<Upstream>,
    partition: Arc<Partition>,
    /// The group's sealed head and allowed lag: an answer whose `Regroup-Applied` says the
    /// partition stands further behind is not served.
    sealed: tokio::sync::watch::Receiver<u64>,
    max_lag: u64,
}

impl ReadEndpoint {
    fn new(group: &Group, partition: Arc<Partition>) -> Self {
        ReadEndpoint {
            client: Arc::new(group.client.clone()),
            partition,
            sealed: group.watch_sealed(),
            max_lag: group.config.max_read_lag,
        }
    }
}

impl Service<Request<ProxyBody>> for ReadEndpoint {
    type Response = Response<Incoming>;
    type Error = EndpointError;
    type Future = Pin<Box<dyn Future<Output = Result<Self::Response, Self::Error>> + Send>>;

    fn poll_ready(&mut self, _: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        Poll::Ready(Ok(()))
    }

    fn call(&mut self, mut req: Request<ProxyBody>) -> Self::Future {
        let partition = self.partition.clone();
        let slash = http::uri::PathAndQuery::from_static("/");
        let uri = on_partition(
            partition.base(),
            req.uri().path_and_query().unwrap_or(&slash),
        );
        // The serving thread's own client when there is one (see `LocalUpstream`).
        let client = match req.extensions_mut().remove::<LocalUpstream>() {
            Some(local) => local.0,
            None => self.client.clone(),
        };
        let sealed = *self.sealed.borrow();
        let max_lag = self.max_lag;
        Box::pin(async move {
            *req.uri_mut() = uri.map_err(|e| EndpointError {
                partition: partition.name().to_owned(),
                reason: e.to_string(),
            })?;
            let resp = client.request(req).await.map_err(|e| {
                if e.is_connect() {
                    // A proxied request that cannot connect counts as a missed heartbeat.
                    partition.record_miss();
                }
                EndpointError {
                    partition: partition.name().to_owned(),
                    reason: error_chain(&e),
                }
            })?;
            if let Some(applied) = resp
                .headers()
                .get(regroup_replay::headers::APPLIED)
                .and_then(|v| v.to_str().ok())
                .and_then(|v| v.parse::<u64>().ok())
                && applied.saturating_add(max_lag) < sealed
            {
                // Restarted behind where the group had it (a restored copy): out of the read
                // set until supervision has asked it where it stands.
                partition.record_miss();
                return Err(EndpointError {
                    partition: partition.name().to_owned(),
                    reason: format!(
                        "stands at {applied} by its own record, {sealed} are sealed: not served"
                    ),
                });
            }
            Ok(resp)
        })
    }
}

impl Reads {
    /// Starts the balancer and the task that keeps its endpoints in step with statuses.
    pub(crate) fn start(group: &Arc<Group>) -> Reads {
        let (tx, rx) = mpsc::unbounded_channel();
        let changes: Changes = Box::pin(futures_util::stream::unfold(rx, |mut rx| async move {
            rx.recv().await.map(|c| (Ok(c), rx))
        }));
        tokio::spawn(membership(group.clone(), tx));
        Reads {
            balance: std::sync::Mutex::new(Balance::new(changes)),
            next: std::sync::atomic::AtomicUsize::new(0),
        }
    }

    /// Sends a prepared read as `consistency` asks: balanced (`any`), to a partition that has
    /// applied the client's position (`session`, else the primary), or to the primary.
    pub(crate) async fn call_consistent(
        &self,
        group: &Group,
        req: Request<ProxyBody>,
        consistency: Consistency,
    ) -> Result<Response<Incoming>, ProxyError> {
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
                let turn = self.next.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                fresh[turn % fresh.len()].clone()
            }
        };
        let mut endpoint = ReadEndpoint::new(group, partition);
        endpoint.call(req).await.map_err(|e| ProxyError::Upstream {
            group: group.name().to_owned(),
            partition: e.partition,
            reason: e.reason,
        })
    }

    /// Sends a prepared read to the least loaded of two random eligible partitions. A read
    /// without a body whose partition fails (refused or broken connection) is sent again,
    /// to the partitions left (at most twice the number of partitions in all); a refusing
    /// partition counts a missed heartbeat.
    pub(crate) async fn call(
        &self,
        group: &Group,
        req: Request<ProxyBody>,
    ) -> Result<Response<Incoming>, ProxyError> {
        if !crate::route::has_no_body(&req) {
            return self.call_once(group, req).await;
        }
        let (parts, _) = req.into_parts();
        let mut attempts = 2 * group.members().len().max(1);
        loop {
            let req = Request::from_parts(parts.clone(), crate::forward::full(bytes::Bytes::new()));
            match self.call_once(group, req).await {
                Ok(resp) => return Ok(resp),
                Err(e) => {
                    attempts -= 1;
                    // A read changes nothing, so one without a body is safe to send again,
                    // whether the connection was refused or broke before the answer.
                    if !matches!(e, ProxyError::Upstream { .. }) || attempts == 0 {
                        return Err(e);
                    }
                    if let ProxyError::Upstream { partition, .. } = &e
                        && let Some(p) = group.member(partition)
                    {
                        group.refresh(&p);
                    }
                    // Give the membership task a moment to drop the refusing partition.
                    tokio::time::sleep(std::time::Duration::from_millis(5)).await;
                }
            }
        }
    }

    async fn call_once(
        &self,
        group: &Group,
        req: Request<ProxyBody>,
    ) -> Result<Response<Incoming>, ProxyError> {
        let wait = group.config.read_wait();
        // Ready and call under one short lock, never held across an await: the chosen
        // endpoint's future runs outside it.
        let mut req = Some(req);
        let mut ready_and_call = |cx: &mut Context<'_>| {
            let mut balance = self.balance.lock().unwrap_or_else(|p| p.into_inner());
            match balance.poll_ready(cx) {
                Poll::Ready(Ok(())) => match req.take() {
                    Some(r) => Poll::Ready(Ok(balance.call(r))),
                    None => Poll::Ready(Err(BoxError::from("request already sent"))),
                },
                Poll::Ready(Err(e)) => Poll::Ready(Err(e)),
                Poll::Pending => Poll::Pending,
            }
        };
        // Usually a partition is ready at once; only a wait arms the timer.
        let first = std::future::poll_fn(|cx| Poll::Ready(ready_and_call(cx))).await;
        let fut = match first {
            Poll::Ready(r) => Ok(r),
            Poll::Pending => {
                tokio::time::timeout(wait, std::future::poll_fn(&mut ready_and_call)).await
            }
        };
        let fut = match fut {
            Ok(Ok(fut)) => fut,
            Ok(Err(e)) => {
                return Err(ProxyError::NoPartition {
                    group: group.name().to_owned(),
                    reason: e.to_string(),
                });
            }
            Err(_) => {
                return Err(ProxyError::NoPartition {
                    group: group.name().to_owned(),
                    reason: format!("none available within {} ms", wait.as_millis()),
                });
            }
        };
        fut.await.map_err(|e| match e.downcast::<EndpointError>() {
            Ok(e) => ProxyError::Upstream {
                group: group.name().to_owned(),
                partition: e.partition,
                reason: e.reason,
            },
            Err(e) => ProxyError::Upstream {
                group: group.name().to_owned(),
                partition: "?".into(),
                reason: e.to_string(),
            },
        })
    }
}

/// Keeps the balancer's endpoints equal to the set of available partitions.
async fn membership(group: Arc<Group>, tx: mpsc::UnboundedSender<Change<String, Endpoint>>) {
    let mut current: HashSet<String> = HashSet::new();
    let mut stop = group.stop.subscribe();
    let mut changed = group.changed.subscribe();
    loop {
        changed.borrow_and_update();
        let members = group.members();
        let eligible: HashSet<String> = members
            .iter()
            .filter(|p| p.status() == PartitionStatus::Available)
            .map(|p| p.name().to_owned())
            .collect();
        for name in current.difference(&eligible) {
            if tx.send(Change::Remove(name.clone())).is_err() {
                return;
            }
        }
        for name in eligible.difference(&current) {
            let Some(partition) = group.member(name) else {
                continue;
            };
            let endpoint = ReadEndpoint::new(&group, partition);
            let svc = PeakEwma::new(
                endpoint,
                Duration::from_millis(1),
                Duration::from_secs(10).as_nanos() as f64,
                CompleteOnResponse::default(),
            );
            if tx.send(Change::Insert(name.clone(), svc)).is_err() {
                return;
            }
        }
        current = eligible;
        tokio::select! {
            r = changed.changed() => if r.is_err() { return },
            _ = stop.changed() => return,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

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
