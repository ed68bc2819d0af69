//! The update path: serialize, journal ahead, forward to the primary with the replay
//! headers, seal with the primary's answer, answer the client with `Regroup-Seq`.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use http::header::{self, HeaderMap, HeaderName, HeaderValue};
use http::{Request, Response};
use http_body_util::{BodyExt, Limited};
use regroup_replay::signature::{Secret, sign_headers};
use regroup_replay::{Fingerprint, Outcome, Record, RecordedRequest, headers as rh};
use tokio::time::Instant;

use crate::config::ReplayPolicy;
use crate::error::ProxyError;
use crate::forward::{self, BoxError, ProxyBody};
use crate::group::Group;
use crate::status::PartitionStatus;

/// Handles one update end to end. The journaled part runs in its own task: a client that
/// disconnects cannot leave a record half-written.
pub(crate) async fn handle<B>(
    group: Arc<Group>,
    req: Request<B>,
    client: Option<SocketAddr>,
) -> Result<Response<ProxyBody>, ProxyError>
where
    B: http_body::Body<Data = Bytes> + Send + 'static,
    B::Error: Into<BoxError>,
{
    let limit = group.config.max_body_bytes;
    let (parts, body) = req.into_parts();
    if let Some(len) = parts
        .headers
        .get(header::CONTENT_LENGTH)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.parse::<u64>().ok())
        && len > limit as u64
    {
        return Err(ProxyError::BodyTooLarge { limit });
    }
    let body = Limited::new(body, limit)
        .collect()
        .await
        .map_err(|e| {
            if e.downcast_ref::<http_body_util::LengthLimitError>()
                .is_some()
            {
                ProxyError::BodyTooLarge { limit }
            } else {
                ProxyError::BadRequest(format!("cannot read request body: {e}"))
            }
        })?
        .to_bytes();
    let mut headers = parts.headers;
    forward::strip_hop_by_hop(&mut headers);
    forward::strip_replay_headers(&mut headers);
    forward::add_forwarded(&mut headers, client);
    headers.remove(header::CONTENT_LENGTH);
    let recorded = RecordedRequest {
        method: parts.method.to_string(),
        uri: parts
            .uri
            .path_and_query()
            .map_or("/", |pq| pq.as_str())
            .to_owned(),
        headers: recorded_headers(&headers)?,
        body,
    };
    tokio::spawn(execute(group, recorded))
        .await
        .map_err(|e| ProxyError::Journal(format!("update task failed: {e}")))?
}

fn recorded_headers(headers: &HeaderMap) -> Result<Vec<(String, String)>, ProxyError> {
    headers
        .iter()
        .map(|(name, value)| {
            let value = value.to_str().map_err(|_| {
                ProxyError::BadRequest(format!(
                    "header {name} is not valid UTF-8 and cannot be journaled"
                ))
            })?;
            Ok((name.as_str().to_owned(), value.to_owned()))
        })
        .collect()
}

/// Builds the request a partition receives for `record` (`replay`: with
/// `Regroup-Replay: 1`), signed with `secret` when set.
pub(crate) fn record_request(
    record: &Record,
    base: &http::Uri,
    replay: bool,
    secret: Option<&Secret>,
) -> Result<Request<ProxyBody>, http::Error> {
    let mut builder = Request::builder()
        .method(record.request.method.as_str())
        .uri(forward::upstream_uri(base, &record.request.uri)?);
    if let Some(h) = builder.headers_mut() {
        for (name, value) in &record.request.headers {
            if let (Ok(n), Ok(v)) = (
                HeaderName::from_bytes(name.as_bytes()),
                HeaderValue::from_str(value),
            ) {
                h.append(n, v);
            }
        }
        for (name, value) in record.replay_headers(replay) {
            if let Ok(v) = HeaderValue::from_str(&value) {
                h.insert(name, v);
            }
        }
    }
    let mut req = builder.body(forward::full(record.request.body.clone()))?;
    if let Some(secret) = secret {
        let path = req
            .uri()
            .path_and_query()
            .map_or("/", |pq| pq.as_str())
            .to_owned();
        let method = req.method().as_str().to_owned();
        sign_headers(
            req.headers_mut(),
            &method,
            &path,
            &record.request.body,
            secret,
        );
    }
    Ok(req)
}

/// What became of one forward of a record to a partition.
enum Forwarded {
    /// The partition answered.
    Answer(http::response::Parts, Bytes),
    /// The request never left: nothing was executed.
    NotSent(String),
    /// The request may have been executed; no answer came back (connection broken,
    /// time-out, or the partition was deposed while it was working).
    Unknown(String),
}

/// Sends `record` to partition `index` as the primary's execution, giving up with
/// `Unknown` when the group's epoch moves past `epoch` meanwhile.
async fn forward(group: &Group, record: &Record, index: usize, epoch: u64) -> Forwarded {
    let Some(partition) = group.partitions.get(index) else {
        return Forwarded::NotSent(format!("no partition {index}"));
    };
    let upstream = match record_request(record, partition.base(), false, group.signer.as_ref()) {
        Ok(r) => r,
        Err(e) => return Forwarded::NotSent(format!("cannot build request: {e}")),
    };
    let timeout = group.config.update_timeout();
    let exchange = tokio::time::timeout(timeout, async {
        let resp = group.client.request(upstream).await?;
        let (parts, body) = resp.into_parts();
        let body = body.collect().await?.to_bytes();
        Ok::<_, BoxError>((parts, body))
    });
    let mut epochs = group.epoch.subscribe();
    let deposed = epochs.wait_for(|e| *e != epoch);
    tokio::select! {
        answer = exchange => match answer {
            Ok(Ok((parts, body))) => Forwarded::Answer(parts, body),
            Ok(Err(e)) if is_connect_error(e.as_ref()) => Forwarded::NotSent(error_chain(e.as_ref())),
            Ok(Err(e)) => Forwarded::Unknown(error_chain(e.as_ref())),
            Err(_) => Forwarded::Unknown(format!("no answer within {} ms", timeout.as_millis())),
        },
        _ = deposed => Forwarded::Unknown(format!(
            "partition {:?} was deposed (epoch {epoch} ended) before it answered",
            partition.name()
        )),
    }
}

async fn execute(
    group: Arc<Group>,
    request: RecordedRequest,
) -> Result<Response<ProxyBody>, ProxyError> {
    let started = Instant::now();
    let deadline = started + group.config.failover_wait();
    let _slot = take_write_slot(&group, deadline).await?;
    wait_for_primary(&group, deadline).await?;
    let slotted = Instant::now();
    let seq = group.head() + 1;
    let mut record = Record::pending(group.name(), seq, group.epoch(), request);
    group
        .journal
        .append(&record)
        .await
        .map_err(|e| ProxyError::Journal(e.to_string()))?;
    group.set_head(seq);
    let appended = Instant::now();
    loop {
        let (index, epoch) = (group.primary_index(), group.epoch());
        restamp(&group, &mut record, epoch).await?;
        match forward(&group, &record, index, epoch).await {
            Forwarded::Answer(parts, body) => {
                let answered = Instant::now();
                return match seal_answer(&group, &mut record, epoch, &parts, &body).await {
                    Ok(()) => {
                        tracing::debug!(
                            seq,
                            wait_us = (slotted - started).as_micros() as u64,
                            append_us = (appended - slotted).as_micros() as u64,
                            primary_us = (answered - appended).as_micros() as u64,
                            seal_us = answered.elapsed().as_micros() as u64,
                            "update timings"
                        );
                        Ok(client_answer(parts, body, seq))
                    }
                    Err(reason) => in_doubt(group.clone(), record, index, deadline, reason).await,
                };
            }
            Forwarded::NotSent(reason) => {
                let primary = &group.partitions[index];
                tracing::warn!(group = %group.name(), partition = %primary.name(), seq, %reason,
                    "primary unreachable; waiting for the role to move");
                miss(&group, primary);
                if !wait_for_new_epoch(&group, epoch, deadline).await {
                    // Never executed anywhere: nothing to replay.
                    seal(&group, seq, &Outcome::Skipped).await?;
                    group.sealed_through(seq);
                    return Err(ProxyError::Unavailable {
                        group: group.name().to_owned(),
                        reason: format!(
                            "primary {:?} is unreachable ({reason}) and no partition took its place within {} ms",
                            primary.name(),
                            group.config.failover_wait_ms
                        ),
                    });
                }
            }
            Forwarded::Unknown(reason) => {
                // A broken exchange with the primary counts as a missed heartbeat, so a dead
                // primary is noticed as fast as when it refuses connections.
                if group.epoch() == epoch {
                    miss(&group, &group.partitions[index]);
                }
                return in_doubt(group.clone(), record, index, deadline, reason).await;
            }
        }
    }
}

/// Seals `record` with the primary's answer, unless the epoch it was sent in has ended
/// (then the answer came from a deposed primary and the record is in doubt).
async fn seal_answer(
    group: &Group,
    record: &mut Record,
    epoch: u64,
    parts: &http::response::Parts,
    body: &Bytes,
) -> Result<(), String> {
    let fingerprint = Fingerprint::of(parts.status.as_u16(), body);
    let outcome = if group.config.replay == ReplayPolicy::Success && !parts.status.is_success() {
        Outcome::Skipped
    } else {
        Outcome::Executed(Some(fingerprint.clone()))
    };
    let _gate = group.seal_gate.lock().await;
    if group.epoch() != epoch {
        return Err(format!("answered after epoch {epoch} ended"));
    }
    if let Err(e) = seal(group, record.seq, &outcome).await {
        return Err(format!(
            "executed, but the answer could not be journaled: {e}"
        ));
    }
    record.fingerprint = Some(fingerprint);
    group.sealed_through(record.seq);
    Ok(())
}

fn client_answer(parts: http::response::Parts, body: Bytes, seq: u64) -> Response<ProxyBody> {
    let mut resp = Response::from_parts(parts, forward::full(body));
    forward::strip_hop_by_hop(resp.headers_mut());
    resp.headers_mut().remove(header::CONTENT_LENGTH);
    resp.headers_mut().insert(rh::SEQ, HeaderValue::from(seq));
    resp
}

/// Gives a record that has not been executed the current epoch before it is sent.
async fn restamp(group: &Group, record: &mut Record, epoch: u64) -> Result<(), ProxyError> {
    if record.epoch != epoch {
        group
            .journal
            .restamp(group.name(), record.seq, epoch)
            .await
            .map_err(|e| ProxyError::Journal(e.to_string()))?;
        record.epoch = epoch;
    }
    Ok(())
}

/// A proxied update that could not connect counts as a missed heartbeat.
fn miss(group: &Group, p: &crate::partition::Partition) {
    p.record_miss();
    group.refresh(p);
}

/// Waits until the epoch moves past `epoch` (a failover happened); false at `deadline`.
async fn wait_for_new_epoch(group: &Group, epoch: u64, deadline: Instant) -> bool {
    let mut epochs = group.epoch.subscribe();
    let mut switching = group.switching.subscribe();
    let moved = async {
        let _ = epochs.wait_for(|e| *e != epoch).await;
        let _ = switching.wait_for(|s| !*s).await;
    };
    tokio::time::timeout_at(deadline, moved).await.is_ok()
}

/// Waits until the group has a primary that can lead (or a failover found one); 503
/// naming every partition's state at `deadline`. Nothing has been journaled yet.
async fn wait_for_primary(group: &Group, deadline: Instant) -> Result<(), ProxyError> {
    let mut changed = group.changed.subscribe();
    loop {
        changed.borrow_and_update();
        let primary = group.primary();
        if primary.status() != PartitionStatus::Unavailable && primary.diverged().is_none() {
            return Ok(());
        }
        if tokio::time::timeout_at(deadline, changed.changed())
            .await
            .is_err()
        {
            let states: Vec<String> = group
                .partitions
                .iter()
                .map(|p| format!("{} {}", p.name(), p.status()))
                .collect();
            return Err(ProxyError::Unavailable {
                group: group.name().to_owned(),
                reason: format!(
                    "no partition can take the primary role within {} ms ({})",
                    group.config.failover_wait_ms,
                    states.join(", ")
                ),
            });
        }
    }
}

/// Takes the group's write slot once no record is in doubt and no failover is under way,
/// waiting at most until `deadline`.
async fn take_write_slot(
    group: &Group,
    deadline: Instant,
) -> Result<tokio::sync::MutexGuard<'_, ()>, ProxyError> {
    let mut in_doubt = group.in_doubt.subscribe();
    let mut switching = group.switching.subscribe();
    let unavailable = |reason: String| ProxyError::Unavailable {
        group: group.name().to_owned(),
        reason,
    };
    loop {
        let pending = *in_doubt.borrow_and_update();
        if let Some(seq) = pending {
            if tokio::time::timeout_at(deadline, in_doubt.changed())
                .await
                .is_err()
            {
                return Err(unavailable(format!(
                    "update {seq} is in doubt and must be resolved first (regroup resolve --group {} --seq {seq} executed|skipped)",
                    group.name()
                )));
            }
            continue;
        }
        if *switching.borrow_and_update() {
            if tokio::time::timeout_at(deadline, switching.wait_for(|s| !*s))
                .await
                .is_err()
            {
                return Err(unavailable(format!(
                    "the primary role is moving and did not settle within {} ms",
                    group.config.failover_wait_ms
                )));
            }
            continue;
        }
        let guard = tokio::time::timeout_at(deadline, group.write_slot.lock())
            .await
            .map_err(|_| unavailable("timed out waiting for earlier updates".into()))?;
        if group.in_doubt.borrow().is_none() && !*group.switching.borrow() {
            return Ok(guard);
        }
    }
}

async fn seal(group: &Group, seq: u64, outcome: &Outcome) -> Result<(), ProxyError> {
    let mut last = None;
    for attempt in 0..3u32 {
        match group.journal.seal(group.name(), seq, outcome).await {
            Ok(()) => return Ok(()),
            Err(e) => {
                tracing::warn!(group = %group.name(), seq, attempt, error = %e, "seal failed");
                last = Some(e);
                tokio::time::sleep(Duration::from_millis(50 << attempt)).await;
            }
        }
    }
    Err(ProxyError::Journal(
        last.map(|e| e.to_string()).unwrap_or_default(),
    ))
}

/// The record's execution is unknown: mark it in doubt (durably when the journal allows),
/// try to settle it exactly until `deadline` (the waiting client then gets the answer), and
/// otherwise keep trying in the background while later updates wait.
async fn in_doubt(
    group: Arc<Group>,
    record: Record,
    executed_by: usize,
    deadline: Instant,
    reason: String,
) -> Result<Response<ProxyBody>, ProxyError> {
    let seq = record.seq;
    tracing::warn!(group = %group.name(), seq, %reason,
        "update in doubt: settling it before later updates run");
    if let Err(e) = group
        .journal
        .seal(group.name(), seq, &Outcome::InDoubt)
        .await
    {
        // Still pending in the journal: a restart finds it and reports it in doubt too.
        tracing::warn!(group = %group.name(), seq, error = %e, "could not mark record in doubt");
    }
    group.set_in_doubt(seq, executed_by);
    match settle(&group, record.clone(), Some(deadline)).await {
        Settled::Answer(parts, body) => {
            // The waiting client gets the answer after all.
            return Ok(client_answer(parts, body, seq));
        }
        Settled::ByOperator => {}
        Settled::Pending => {
            spawn_settle(group.clone(), record);
        }
    }
    Err(ProxyError::InDoubt {
        group: group.name().to_owned(),
        seq,
        reason,
    })
}

/// Keeps trying to settle an in-doubt record in the background.
pub(crate) fn spawn_settle(group: Arc<Group>, record: Record) {
    tokio::spawn(async move {
        if let Settled::Answer(..) = settle(&group, record.clone(), None).await {
            tracing::info!(group = %group.name(), seq = record.seq, "in-doubt record settled");
        }
    });
}

/// How a settlement attempt ended.
pub(crate) enum Settled {
    /// Executed exactly once, with this answer (sealed).
    Answer(http::response::Parts, Bytes),
    /// Someone else (an operator) resolved it.
    ByOperator,
    /// Still in doubt at the deadline.
    Pending,
}

/// Settles an in-doubt record exactly, never by guessing: it is sent to the current
/// primary when that is safe — the primary is not the partition that may have executed it
/// (a replica never saw an unsealed record), or that partition runs the app-side layer
/// (exactly-once: a re-delivery is answered from its record). Otherwise waits for a
/// failover, the layer, or an operator.
pub(crate) async fn settle(
    group: &Group,
    mut record: Record,
    deadline: Option<Instant>,
) -> Settled {
    let seq = record.seq;
    let mut changed = group.changed.subscribe();
    let mut stop = group.stop.subscribe();
    loop {
        changed.borrow_and_update();
        if *group.in_doubt.borrow() != Some(seq) {
            return Settled::ByOperator;
        }
        if !*group.switching.borrow() {
            let _settling = group.settle_lock.lock().await;
            if *group.in_doubt.borrow() != Some(seq) {
                return Settled::ByOperator;
            }
            let (index, epoch) = (group.primary_index(), group.epoch());
            let primary = &group.partitions[index];
            let by = group.in_doubt_by();
            let safe = primary.status() != PartitionStatus::Unavailable
                && (by != Some(index) || has_exactly_once(group, primary, seq).await);
            if safe && restamp(group, &mut record, epoch).await.is_ok() {
                match forward(group, &record, index, epoch).await {
                    Forwarded::Answer(parts, body) => {
                        if seal_answer(group, &mut record, epoch, &parts, &body)
                            .await
                            .is_ok()
                        {
                            tracing::info!(group = %group.name(), seq, partition = %primary.name(),
                                status = parts.status.as_u16(), "in-doubt update settled exactly");
                            group.clear_in_doubt();
                            return Settled::Answer(parts, body);
                        }
                        // Answered by a primary deposed meanwhile: it has executed it.
                        group.set_in_doubt_by(index);
                    }
                    Forwarded::NotSent(reason) => {
                        tracing::debug!(seq, %reason, "settling: primary unreachable");
                        miss(group, primary);
                    }
                    Forwarded::Unknown(reason) => {
                        tracing::warn!(seq, %reason, "settling: no answer; it may have executed there");
                        group.set_in_doubt_by(index);
                    }
                }
            }
        }
        let wait = async {
            tokio::select! {
                _ = changed.changed() => {}
                _ = tokio::time::sleep(Duration::from_millis(100)) => {}
                _ = stop.changed() => {}
            }
        };
        match deadline {
            Some(d) => {
                if tokio::time::timeout_at(d, wait).await.is_err() {
                    return Settled::Pending;
                }
            }
            None => wait.await,
        }
        if *stop.borrow() {
            return Settled::Pending;
        }
    }
}

/// Whether `partition` answers the app-side layer's `/_regroup/applied?seq=N`.
async fn has_exactly_once(
    group: &Group,
    partition: &crate::partition::Partition,
    seq: u64,
) -> bool {
    let path = format!("{}?seq={seq}", regroup_replay::layer::APPLIED_PATH);
    let Ok(uri) = forward::upstream_uri(partition.base(), &path) else {
        return false;
    };
    let Ok(req) = Request::get(uri).body(forward::full(Bytes::new())) else {
        return false;
    };
    let answer = tokio::time::timeout(group.config.heartbeat_timeout() * 5, async {
        let resp = group.client.request(req).await.ok()?;
        if !resp.status().is_success() {
            return None;
        }
        let body = resp.into_body().collect().await.ok()?.to_bytes();
        let v: serde_json::Value = serde_json::from_slice(&body).ok()?;
        v.get("applied").and_then(|a| a.as_bool())
    })
    .await;
    matches!(answer, Ok(Some(_)))
}

fn is_connect_error(e: &(dyn std::error::Error + 'static)) -> bool {
    e.downcast_ref::<hyper_util::client::legacy::Error>()
        .is_some_and(|e| e.is_connect())
}

/// An error and its sources, as one line.
pub(crate) fn error_chain(e: &(dyn std::error::Error + 'static)) -> String {
    let mut s = e.to_string();
    let mut cur = e.source();
    while let Some(c) = cur {
        let next = c.to_string();
        if !s.contains(&next) {
            s.push_str(": ");
            s.push_str(&next);
        }
        cur = c.source();
    }
    s
}
