//! The change feed: `GET /groups/{group}/journal?after=N` on the admin port streams the
//! group's committed transactions as NDJSON, for search indexers, caches and audits.
//!
//! One JSON object per line, in seq order, from `N + 1` on (`after` defaults to 0: the whole
//! journal it still holds):
//!
//! ```json
//! {"seq":7,"txn_id":"0193…","epoch":2,"timestamp":"2026-12-01T12:00:00.123456Z",
//!  "method":"POST","path":"/transfers","headers":[["content-type","application/json"]],
//!  "status":201,"body":"{\"from\":1,\"to\":2,\"amount\":5}","body_encoding":"utf-8"}
//! ```
//!
//! - Only **executed** records are emitted (the ones every partition replays, failed
//!   answers of the primary included: `status` is the primary's). Skipped records (never
//!   executed, or excluded by `replay = "success"`) are not emitted, so seqs may have gaps.
//! - A record is emitted once it is **durably sealed** (the group's sealed head), never
//!   while pending or in doubt; then the feed waits for the next seal, until the client
//!   disconnects or the group stops.
//! - `headers` are the request's end-to-end headers as journaled and replayed (hop-by-hop
//!   headers and regroup's replay headers removed), as `[name, value]` pairs in order.
//! - `body` is the request body as text when it is UTF-8 (`"body_encoding": "utf-8"`), else
//!   standard base64 (`"body_encoding": "base64"`).
//! - When the journal fails, or no longer holds a record the feed needs, a last line
//!   `{"error": CODE, "message": TEXT, "after": SEQ}` ends the stream; reconnect with
//!   `after=SEQ` (the last seq the feed had passed).

use std::collections::VecDeque;
use std::sync::Arc;

use base64::Engine;
use bytes::Bytes;
use http::{Response, StatusCode, header};
use http_body_util::{BodyExt, StreamBody};
use hyper::body::Frame;
use regroup_replay::{Payload, Record, RecordState};
use serde::Serialize;
use tokio::sync::watch;

use crate::error::ProxyError;
use crate::forward::{BoxError, ProxyBody};
use crate::group::Group;

/// Records read from the journal at a time.
const BATCH: u64 = 256;

/// The `Content-Type` of the feed.
const CONTENT_TYPE: &str = "application/x-ndjson";

/// One line of the feed.
#[derive(Debug, Serialize)]
struct Line<'a> {
    seq: u64,
    txn_id: String,
    epoch: u64,
    timestamp: String,
    method: &'a str,
    path: &'a str,
    headers: &'a [(String, String)],
    #[serde(skip_serializing_if = "Option::is_none")]
    status: Option<u16>,
    body: String,
    body_encoding: &'static str,
}

/// Parses the query of a feed request: `after=N` (optional, default 0); anything else is a
/// 400 naming it.
pub(crate) fn parse_after(query: Option<&str>) -> Result<u64, ProxyError> {
    let mut after = 0;
    for pair in query.unwrap_or("").split('&').filter(|p| !p.is_empty()) {
        match pair.split_once('=') {
            Some(("after", v)) => {
                after = v.parse().map_err(|_| {
                    ProxyError::BadRequest(format!(
                        "after must be a seq (a number of 0 or more), not {v:?}"
                    ))
                })?;
            }
            _ => {
                return Err(ProxyError::BadRequest(format!(
                    "unknown query parameter {pair:?}: the feed takes only after=SEQ"
                )));
            }
        }
    }
    Ok(after)
}

/// The NDJSON line of `record`.
fn line(record: &Record) -> Option<Bytes> {
    // A group the proxy serves holds HTTP records only (SQL mode journals its own groups).
    let Payload::Http(request) = &record.payload else {
        return None;
    };
    let (body, body_encoding) = match std::str::from_utf8(&request.body) {
        Ok(text) => (text.to_owned(), "utf-8"),
        Err(_) => (
            base64::engine::general_purpose::STANDARD.encode(&request.body),
            "base64",
        ),
    };
    let line = Line {
        seq: record.seq,
        txn_id: record.txn_id.to_string(),
        epoch: record.epoch,
        timestamp: record.timestamp_rfc3339(),
        method: &request.method,
        path: &request.uri,
        headers: &request.headers,
        status: record.fingerprint.as_ref().map(|f| f.status),
        body,
        body_encoding,
    };
    let mut bytes = serde_json::to_vec(&line).ok()?;
    bytes.push(b'\n');
    Some(Bytes::from(bytes))
}

fn error_line(code: &str, message: &str, after: u64) -> Bytes {
    let mut bytes =
        serde_json::to_vec(&serde_json::json!({"error": code, "message": message, "after": after}))
            .unwrap_or_default();
    bytes.push(b'\n');
    Bytes::from(bytes)
}

/// The state of one feed.
struct Feed {
    group: Arc<Group>,
    /// The last seq passed (emitted or skipped).
    cursor: u64,
    ready: VecDeque<Bytes>,
    sealed: watch::Receiver<u64>,
    stop: watch::Receiver<bool>,
    ended: bool,
}

impl Feed {
    /// The next line, waiting for new seals; `None` ends the stream.
    async fn next(&mut self) -> Option<Bytes> {
        loop {
            if let Some(line) = self.ready.pop_front() {
                return Some(line);
            }
            if self.ended || *self.stop.borrow() {
                return None;
            }
            let sealed = *self.sealed.borrow_and_update();
            if self.cursor < sealed {
                let limit = (sealed - self.cursor).min(BATCH);
                let name = self.group.name().to_owned();
                match self
                    .group
                    .journal
                    .read_after(&name, self.cursor, limit)
                    .await
                {
                    Ok(records) => {
                        if records.first().is_some_and(|r| r.seq > self.cursor + 1) {
                            self.ended = true;
                            return Some(error_line(
                                "truncated",
                                &format!(
                                    "the journal no longer holds records {} to {}",
                                    self.cursor + 1,
                                    records.first().map_or(0, |r| r.seq - 1)
                                ),
                                self.cursor,
                            ));
                        }
                        if records.is_empty() {
                            self.ended = true;
                            return Some(error_line(
                                "truncated",
                                &format!("the journal holds no record after {}", self.cursor),
                                self.cursor,
                            ));
                        }
                        for r in records.into_iter().take_while(|r| r.seq <= sealed) {
                            self.cursor = r.seq;
                            if r.state == RecordState::Executed
                                && let Some(line) = line(&r)
                            {
                                self.ready.push_back(line);
                            }
                        }
                    }
                    Err(e) => {
                        tracing::warn!(group = %name, after = self.cursor, error = %e,
                            "change feed: journal read failed; ending the feed");
                        self.ended = true;
                        return Some(error_line(
                            "journal_unavailable",
                            "the journal could not be read; reconnect with after=SEQ",
                            self.cursor,
                        ));
                    }
                }
                continue;
            }
            tokio::select! {
                biased;
                changed = self.sealed.changed() => if changed.is_err() { return None },
                _ = self.stop.changed() => {}
            }
        }
    }
}

/// The feed of `group` after `after`, as a streaming NDJSON response.
pub(crate) fn respond(group: Arc<Group>, after: u64) -> Response<ProxyBody> {
    let feed = Feed {
        sealed: group.watch_sealed(),
        stop: group.stop.subscribe(),
        group,
        cursor: after,
        ready: VecDeque::new(),
        ended: false,
    };
    let lines = futures_util::stream::unfold(feed, |mut feed| async move {
        let line = feed.next().await?;
        Some((Ok::<_, BoxError>(Frame::data(line)), feed))
    });
    let mut resp = Response::new(StreamBody::new(lines).boxed_unsync());
    *resp.status_mut() = StatusCode::OK;
    let headers = resp.headers_mut();
    headers.insert(
        header::CONTENT_TYPE,
        header::HeaderValue::from_static(CONTENT_TYPE),
    );
    headers.insert(
        header::CACHE_CONTROL,
        header::HeaderValue::from_static("no-store"),
    );
    resp
}

#[cfg(test)]
mod tests {
    use super::parse_after;

    #[test]
    fn after_is_a_seq_or_a_clear_400() {
        assert_eq!(parse_after(None).ok(), Some(0));
        assert_eq!(parse_after(Some("after=42")).ok(), Some(42));
        let bad = parse_after(Some("after=-1")).err().map(|e| e.to_string());
        assert_eq!(
            bad.as_deref(),
            Some("after must be a seq (a number of 0 or more), not \"-1\"")
        );
        let unknown = parse_after(Some("from=3")).err().map(|e| e.to_string());
        assert_eq!(
            unknown.as_deref(),
            Some("unknown query parameter \"from=3\": the feed takes only after=SEQ")
        );
    }
}
