//! The update path: serialize, journal ahead, forward to the primary with the replay
//! headers, seal with the primary's answer, answer the client with `Regroup-Seq`.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use http::header::{self, HeaderMap, HeaderName, HeaderValue};
use http::{Request, Response};
use http_body_util::{BodyExt, Limited};
use regroup_replay::{Fingerprint, Outcome, Record, RecordedRequest, headers as rh};
use tokio::time::Instant;

use crate::config::ReplayPolicy;
use crate::error::ProxyError;
use crate::forward::{self, BoxError, ProxyBody};
use crate::group::Group;
use crate::partition::Health;

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
/// `Regroup-Replay: 1`).
pub(crate) fn record_request(
    record: &Record,
    base: &http::Uri,
    replay: bool,
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
    builder.body(forward::full(record.request.body.clone()))
}

async fn execute(
    group: Arc<Group>,
    request: RecordedRequest,
) -> Result<Response<ProxyBody>, ProxyError> {
    let _slot = take_write_slot(&group).await?;
    let seq = group.head() + 1;
    let mut record = Record::pending(group.name(), seq, group.epoch(), request);
    group
        .journal
        .append(&record)
        .await
        .map_err(|e| ProxyError::Journal(e.to_string()))?;
    group.set_head(seq);
    let primary = group.primary().clone();
    let upstream = record_request(&record, primary.base(), false)
        .map_err(|e| ProxyError::BadRequest(format!("cannot forward request: {e}")))?;
    let timeout = group.config.update_timeout();
    let answer = tokio::time::timeout(timeout, async {
        let resp = group.client.request(upstream).await?;
        let (parts, body) = resp.into_parts();
        let body = body.collect().await?.to_bytes();
        Ok::<_, BoxError>((parts, body))
    })
    .await;
    let (parts, body) = match answer {
        Ok(Ok(answer)) => answer,
        Ok(Err(e)) if is_connect_error(e.as_ref()) => {
            // Never sent: not executed anywhere. Nothing to replay.
            seal(&group, seq, &Outcome::Skipped).await?;
            group.sealed_through(seq);
            primary.set_health(Health::Missed(1));
            group.refresh(&primary);
            return Err(ProxyError::PrimaryUnreachable {
                group: group.name().to_owned(),
                partition: primary.name().to_owned(),
                reason: error_chain(e.as_ref()),
            });
        }
        other => {
            let reason = match other {
                Err(_) => format!("no answer within {} ms", timeout.as_millis()),
                Ok(Err(e)) => error_chain(e.as_ref()),
                Ok(Ok(_)) => String::new(),
            };
            return Err(in_doubt(&group, seq, reason).await);
        }
    };
    let fingerprint = Fingerprint::of(parts.status.as_u16(), &body);
    let outcome = if group.config.replay == ReplayPolicy::Success && !parts.status.is_success() {
        Outcome::Skipped
    } else {
        Outcome::Executed(Some(fingerprint.clone()))
    };
    if let Err(e) = seal(&group, seq, &outcome).await {
        return Err(in_doubt(
            &group,
            seq,
            format!("executed, but the answer could not be journaled: {e}"),
        )
        .await);
    }
    record.fingerprint = Some(fingerprint);
    group.sealed_through(seq);
    let mut resp = Response::from_parts(parts, forward::full(body));
    forward::strip_hop_by_hop(resp.headers_mut());
    resp.headers_mut().remove(header::CONTENT_LENGTH);
    resp.headers_mut().insert(rh::SEQ, HeaderValue::from(seq));
    Ok(resp)
}

/// Takes the group's write slot once no record is in doubt, waiting at most
/// `failover_wait_ms` for a resolution.
async fn take_write_slot(group: &Group) -> Result<tokio::sync::MutexGuard<'_, ()>, ProxyError> {
    let deadline = Instant::now() + group.config.failover_wait();
    let mut in_doubt = group.in_doubt.subscribe();
    loop {
        let pending = *in_doubt.borrow_and_update();
        if let Some(seq) = pending {
            let waited = tokio::time::timeout_at(deadline, in_doubt.changed()).await;
            if !matches!(waited, Ok(Ok(()))) {
                return Err(ProxyError::Unavailable {
                    group: group.name().to_owned(),
                    reason: format!(
                        "update {seq} is in doubt and must be resolved first (regroup resolve --group {} --seq {seq} executed|skipped)",
                        group.name()
                    ),
                });
            }
            continue;
        }
        let guard = tokio::time::timeout_at(deadline, group.write_slot.lock())
            .await
            .map_err(|_| ProxyError::Unavailable {
                group: group.name().to_owned(),
                reason: "timed out waiting for earlier updates".into(),
            })?;
        if group.in_doubt.borrow().is_none() {
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

/// Marks `seq` in doubt (durably when the journal allows) and stops later updates until it
/// is resolved.
async fn in_doubt(group: &Group, seq: u64, reason: String) -> ProxyError {
    tracing::error!(group = %group.name(), seq, %reason,
        "update in doubt: later updates wait until it is resolved");
    if let Err(e) = group
        .journal
        .seal(group.name(), seq, &Outcome::InDoubt)
        .await
    {
        // Still pending in the journal: a restart finds it and reports it in doubt too.
        tracing::warn!(group = %group.name(), seq, error = %e, "could not mark record in doubt");
    }
    group.in_doubt.send_replace(Some(seq));
    ProxyError::InDoubt {
        group: group.name().to_owned(),
        seq,
        reason,
    }
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
