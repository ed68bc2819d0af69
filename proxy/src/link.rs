//! The seam between the group's core and its partitions: send a record to partition X (as
//! the primary's execution or as a replay), check its health, ask where it stands, take a
//! snapshot of its copy and restore one into another. The core (update, settlement,
//! hand-over, supervision, replay, rebuild) only talks to partitions through
//! [`PartitionLink`], so it runs against real partitions over HTTP ([`HttpLink`]) and
//! against simulated ones in the deterministic simulation alike. Reads stream through the
//! balancer in `read.rs` and do not use this seam.

use std::time::Duration;

use bytes::Bytes;
use http::Request;
use http_body_util::BodyExt;
use regroup_replay::headers::Behind;
use regroup_replay::layer::APPLIED_PATH;
use regroup_replay::signature::Secret;
use regroup_replay::snapshot::{
    EPOCH_HEADER, FORMAT_HEADER, RESTORE_PATH, SEQ_HEADER, SNAPSHOT_PATH, sign_snapshot_request,
};
use regroup_replay::{Position, Record};

use crate::forward::{self, BoxError, ProxyBody, Upstream};
use crate::partition::Partition;

/// A partition's whole answer.
#[derive(Debug)]
pub struct Answer {
    /// Status and headers.
    pub parts: http::response::Parts,
    /// The body.
    pub body: Bytes,
}

/// Why a request to a partition got no answer.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum SendError {
    /// The request never left (connection refused, no route): nothing was executed.
    #[error("not sent: {0}")]
    NotSent(String),
    /// The request may have been executed; no answer came back (connection broken,
    /// time-out).
    #[error("no answer: {0}")]
    Unknown(String),
    /// The partition refused it without executing: it stands at this seq by its own
    /// record, behind the record sent (a copy restored from an older backup).
    #[error("the partition stands behind, at {0}")]
    Behind(u64),
}

/// A snapshot of a partition's copy, as it streams from the partition.
pub struct Snapshot {
    /// The last seq its copy had applied when it was taken.
    pub seq: u64,
    /// The epoch of that record.
    pub epoch: u64,
    /// Its format, handed to the restore as it is.
    pub format: http::HeaderValue,
    /// The snapshot itself.
    pub body: ProxyBody,
}

/// Why taking or restoring a snapshot failed, and whether the target may have changed.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SnapshotError {
    /// What failed.
    pub what: String,
    /// Whether the target may have been changed (a restore that was under way).
    pub touched: bool,
}

impl SnapshotError {
    /// A failure that changed nothing on the target.
    pub fn untouched(what: impl Into<String>) -> Self {
        SnapshotError {
            what: what.into(),
            touched: false,
        }
    }

    /// A failure after which the target may have changed.
    pub fn touched(what: impl Into<String>) -> Self {
        SnapshotError {
            what: what.into(),
            touched: true,
        }
    }
}

/// Called with the size of each piece of a snapshot as it passes into the target.
pub type Progress = Box<dyn Fn(u64) + Send + Sync>;

/// Talks to partitions.
#[async_trait::async_trait]
pub trait PartitionLink: Send + Sync + 'static {
    /// Sends `record` to `partition`, as the primary's execution (`replay` false) or as a
    /// replay (`Regroup-Replay: 1`), and waits at most `timeout` for the whole answer.
    async fn send(
        &self,
        partition: &Partition,
        record: &Record,
        replay: bool,
        timeout: Duration,
    ) -> Result<Answer, SendError>;

    /// Whether this link sends records pipelined ([`PartitionLink::send_pipelined`]).
    fn pipelines(&self) -> bool {
        false
    }

    /// Sends `record` to `partition` (as [`PartitionLink::send`]) while records before it may
    /// still be on their way or executing there (`Regroup-Pipelined: 1`), in the place
    /// `behind` gives it: right behind one record (`Regroup-Prev`; the partition's app layer
    /// waits for it to be recorded, bounded, before it runs this one), or, in parallel
    /// replay, behind only the records it conflicts with (`Regroup-After`,
    /// `Regroup-Floor`). Refused (`Behind`) when a record it follows finished there
    /// unrecorded. A link that does not pipeline refuses to send it.
    async fn send_pipelined(
        &self,
        partition: &Partition,
        record: &Record,
        replay: bool,
        behind: Behind<'_>,
        timeout: Duration,
    ) -> Result<Answer, SendError> {
        let _ = (partition, replay, behind, timeout);
        Err(SendError::NotSent(format!(
            "record {}: this link does not send records pipelined",
            record.seq
        )))
    }

    /// One heartbeat: `GET path`; Ok on a 2xx within `timeout`.
    async fn health(
        &self,
        partition: &Partition,
        path: &str,
        timeout: Duration,
    ) -> Result<(), String>;

    /// Where the partition stands by its own record (the app-side layer's
    /// `/_regroup/applied`); `None` when it keeps no such record.
    async fn position(
        &self,
        partition: &Partition,
        timeout: Duration,
    ) -> Result<Option<Position>, SendError>;

    /// Whether `target` takes a restore from this proxy now, before anything is taken.
    async fn restore_ready(
        &self,
        target: &Partition,
        timeout: Duration,
    ) -> Result<(), SnapshotError>;

    /// A snapshot of `source`'s copy, streaming; `timeout` bounds its start.
    async fn snapshot(
        &self,
        source: &Partition,
        timeout: Duration,
    ) -> Result<Snapshot, SnapshotError>;

    /// Restores `snapshot` into `target`, replacing its copy, within `timeout`; returns the
    /// seq the target says it restored. A restore that fails changes nothing unless the
    /// error says it touched the target.
    async fn restore(
        &self,
        target: &Partition,
        snapshot: Snapshot,
        progress: Progress,
        timeout: Duration,
    ) -> Result<Option<u64>, SnapshotError>;
}

/// [`PartitionLink`] over HTTP with the proxy's pooled client.
#[derive(Debug, Clone)]
pub struct HttpLink {
    client: Upstream,
    secret: Option<Secret>,
    /// This proxy's term (its lease's fencing token), sent as `Regroup-Term`; 0: none.
    term: u64,
}

impl HttpLink {
    /// A link using `client`, sending records unsigned.
    pub fn new(client: Upstream) -> Self {
        HttpLink {
            client,
            secret: None,
            term: 0,
        }
    }

    /// Signs the replay headers of every record it sends with `secret` (none: unsigned).
    pub fn signed(mut self, secret: Option<Secret>) -> Self {
        self.secret = secret;
        self
    }

    /// Sends `term` (the fencing token of this proxy's claim on the journal) with every
    /// record, so partitions refuse this proxy once a newer one has reached them.
    pub fn term(mut self, term: u64) -> Self {
        self.term = term;
        self
    }

    /// A signed request for a snapshot endpoint (`path`) of `partition`.
    fn snapshot_request(
        &self,
        partition: &Partition,
        method: http::Method,
        path: &str,
        body: ProxyBody,
    ) -> Result<Request<ProxyBody>, SnapshotError> {
        let uri = forward::upstream_uri(partition.base(), path)
            .map_err(|e| SnapshotError::untouched(format!("{path} address: {e}")))?;
        let mut req = Request::builder()
            .method(method.clone())
            .uri(uri)
            .body(body)
            .map_err(|e| SnapshotError::untouched(e.to_string()))?;
        if let Some(s) = &self.secret {
            sign_snapshot_request(req.headers_mut(), method.as_str(), path, s);
        }
        Ok(req)
    }

    async fn exchange(
        &self,
        req: Request<forward::ProxyBody>,
        timeout: Duration,
    ) -> Result<Answer, SendError> {
        let exchange = async {
            let resp = self.client.request(req).await?;
            let (parts, body) = resp.into_parts();
            let body = body.collect().await?.to_bytes();
            Ok::<_, BoxError>(Answer { parts, body })
        };
        match tokio::time::timeout(timeout, exchange).await {
            Ok(Ok(answer)) => Ok(answer),
            Ok(Err(e)) if is_connect_error(e.as_ref()) => {
                Err(SendError::NotSent(error_chain(e.as_ref())))
            }
            Ok(Err(e)) => Err(SendError::Unknown(error_chain(e.as_ref()))),
            Err(_) => Err(SendError::Unknown(format!(
                "no answer within {} ms",
                timeout.as_millis()
            ))),
        }
    }
}

/// The app layer's own refusal code in a 409 (`behind`, `out_of_order`, `deposed`,
/// `fenced`), as opposed to an app's 409 answer.
fn layer_refusal(answer: &Answer) -> Option<String> {
    if answer.parts.status != http::StatusCode::CONFLICT {
        return None;
    }
    let doc: serde_json::Value = serde_json::from_slice(&answer.body).ok()?;
    let code = doc["error"].as_str()?;
    matches!(code, "behind" | "out_of_order" | "deposed" | "fenced")
        .then(|| doc["message"].as_str().unwrap_or(code).to_owned())
}

/// A partition's refusal of a record that does not follow the one it recorded last while
/// it stands further (409 `out_of_order`): this proxy's idea of it is out of date; nothing
/// was executed.
pub(crate) fn out_of_order(answer: &Answer) -> Option<SendError> {
    let message = layer_refusal(answer)?;
    let doc: serde_json::Value = serde_json::from_slice(&answer.body).ok()?;
    (doc["error"] == "out_of_order").then(|| SendError::NotSent(format!("refused: {message}")))
}

/// A partition's refusal of a proxy that was taken over (409 with a higher
/// `Regroup-Term`): nothing was executed.
pub(crate) fn deposed(answer: &Answer, term: u64) -> Option<SendError> {
    if answer.parts.status != http::StatusCode::CONFLICT {
        return None;
    }
    let seen = answer
        .parts
        .headers
        .get(regroup_replay::headers::TERM)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.parse::<u64>().ok())?;
    (seen > term).then(|| {
        SendError::NotSent(format!(
            "refused: the partition has seen proxy term {seen}, this proxy's is {term} \
             (another proxy took the journal over)"
        ))
    })
}

impl HttpLink {
    /// Sends `record` in `order` (`pipelined`: with `Regroup-Pipelined: 1`).
    async fn send_after(
        &self,
        partition: &Partition,
        record: &Record,
        replay: bool,
        order: Option<Behind<'_>>,
        pipelined: bool,
        timeout: Duration,
    ) -> Result<Answer, SendError> {
        let mut req = crate::update::record_request(
            record,
            partition.base(),
            replay,
            self.term,
            order,
            self.secret.as_ref(),
        )
        .map_err(|e| {
            tracing::error!(partition = %partition.name(), seq = record.seq, error = %e,
                "refusing to send a record over HTTP");
            SendError::NotSent(format!("cannot build request: {e}"))
        })?;
        if pipelined {
            req.headers_mut().insert(
                regroup_replay::headers::PIPELINED,
                http::HeaderValue::from_static("1"),
            );
        }
        let answer = self.exchange(req, timeout).await?;
        // What the partition says it recorded, unless its layer refused the record (then
        // this proxy's idea stays as it was: a refused sender must not be re-aimed by the
        // refusal; supervision's question re-aims it).
        if let Some(applied) = answer
            .parts
            .headers
            .get(regroup_replay::headers::APPLIED)
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.parse::<u64>().ok())
            && layer_refusal(&answer).is_none()
        {
            // Answers of pipelined records may come back in any order.
            partition.note_delivered(applied);
        }
        if let Some(refusal) = deposed(&answer, self.term) {
            return Err(refusal);
        }
        if let Some(refusal) = out_of_order(&answer) {
            return Err(refusal);
        }
        if answer.parts.status == http::StatusCode::CONFLICT
            && let Some(applied) = answer
                .parts
                .headers
                .get(regroup_replay::headers::APPLIED)
                .and_then(|v| v.to_str().ok())
                .and_then(|v| v.parse::<u64>().ok())
            && applied.saturating_add(1) < record.seq
        {
            return Err(SendError::Behind(applied));
        }
        Ok(answer)
    }
}

#[async_trait::async_trait]
impl PartitionLink for HttpLink {
    async fn send(
        &self,
        partition: &Partition,
        record: &Record,
        replay: bool,
        timeout: Duration,
    ) -> Result<Answer, SendError> {
        let order = partition.delivered().map(Behind::Prev);
        self.send_after(partition, record, replay, order, false, timeout)
            .await
    }

    fn pipelines(&self) -> bool {
        true
    }

    async fn send_pipelined(
        &self,
        partition: &Partition,
        record: &Record,
        replay: bool,
        behind: Behind<'_>,
        timeout: Duration,
    ) -> Result<Answer, SendError> {
        self.send_after(partition, record, replay, Some(behind), true, timeout)
            .await
    }

    async fn health(
        &self,
        partition: &Partition,
        path: &str,
        timeout: Duration,
    ) -> Result<(), String> {
        let uri = forward::upstream_uri(partition.base(), path).map_err(|e| e.to_string())?;
        let req = Request::get(uri)
            .body(forward::full(Bytes::new()))
            .map_err(|e| e.to_string())?;
        // The body is read too, so the pooled connection is reused by the next beat instead
        // of a new one being opened every interval.
        let answer = self
            .exchange(req, timeout)
            .await
            .map_err(|e| e.to_string())?;
        if answer.parts.status.is_success() {
            Ok(())
        } else {
            Err(format!("answered {}", answer.parts.status))
        }
    }

    async fn position(
        &self,
        partition: &Partition,
        timeout: Duration,
    ) -> Result<Option<Position>, SendError> {
        let uri = forward::upstream_uri(partition.base(), APPLIED_PATH)
            .map_err(|e| SendError::NotSent(e.to_string()))?;
        let req = Request::get(uri)
            .body(forward::full(Bytes::new()))
            .map_err(|e| SendError::NotSent(e.to_string()))?;
        let answer = self.exchange(req, timeout).await?;
        if !answer.parts.status.is_success() {
            // Not an app-side layer: the journal checkpoint is the only record.
            return Ok(None);
        }
        // Not noted as `delivered` here: a heartbeat's question may be answered just before
        // an update's answer arrives. The replayer's question (no update runs beside it) and a
        // rewind re-aim it.
        let doc = serde_json::from_slice::<serde_json::Value>(&answer.body).ok();
        Ok(doc.as_ref().and_then(|v| {
            Some(Position {
                applied: v.get("applied")?.as_u64()?,
                resume: v.get("resume").and_then(|r| r.as_u64()),
            })
        }))
    }

    async fn restore_ready(
        &self,
        target: &Partition,
        timeout: Duration,
    ) -> Result<(), SnapshotError> {
        let req = self.snapshot_request(
            target,
            http::Method::GET,
            RESTORE_PATH,
            forward::full(Bytes::new()),
        )?;
        let answer = self.exchange(req, timeout).await.map_err(|e| {
            SnapshotError::untouched(format!("cannot reach the target's restore: {e}"))
        })?;
        if !answer.parts.status.is_success() {
            return Err(SnapshotError::untouched(format!(
                "the target answered {} to {RESTORE_PATH}: {}",
                answer.parts.status,
                String::from_utf8_lossy(&answer.body)
            )));
        }
        Ok(())
    }

    async fn snapshot(
        &self,
        source: &Partition,
        timeout: Duration,
    ) -> Result<Snapshot, SnapshotError> {
        let req = self.snapshot_request(
            source,
            http::Method::GET,
            SNAPSHOT_PATH,
            forward::full(Bytes::new()),
        )?;
        let resp = tokio::time::timeout(timeout, self.client.request(req))
            .await
            .map_err(|_| SnapshotError::untouched("the source's snapshot timed out"))?
            .map_err(|e| {
                SnapshotError::untouched(format!(
                    "cannot reach the source's snapshot: {}",
                    error_chain(&e)
                ))
            })?;
        if !resp.status().is_success() {
            let status = resp.status();
            let body = resp
                .into_body()
                .collect()
                .await
                .map(|b| b.to_bytes())
                .unwrap_or_default();
            return Err(SnapshotError::untouched(format!(
                "the source answered {status} to {SNAPSHOT_PATH}: {}",
                String::from_utf8_lossy(&body)
            )));
        }
        let (parts, body) = resp.into_parts();
        let header =
            |name: &str| -> Option<u64> { parts.headers.get(name)?.to_str().ok()?.parse().ok() };
        let seq = header(SEQ_HEADER).ok_or_else(|| {
            SnapshotError::untouched(format!("the source's snapshot has no {SEQ_HEADER}"))
        })?;
        let epoch = header(EPOCH_HEADER).unwrap_or(0);
        let format = parts.headers.get(FORMAT_HEADER).cloned().ok_or_else(|| {
            SnapshotError::untouched(format!("the source's snapshot has no {FORMAT_HEADER}"))
        })?;
        Ok(Snapshot {
            seq,
            epoch,
            format,
            body: body.map_err(BoxError::from).boxed_unsync(),
        })
    }

    async fn restore(
        &self,
        target: &Partition,
        snapshot: Snapshot,
        progress: Progress,
        timeout: Duration,
    ) -> Result<Option<u64>, SnapshotError> {
        // Streamed into the target's restore, counted as it passes.
        let body: ProxyBody = snapshot
            .body
            .map_frame(move |frame| {
                if let Some(data) = frame.data_ref() {
                    progress(u64::try_from(data.len()).unwrap_or(0));
                }
                frame
            })
            .boxed_unsync();
        let mut req = self.snapshot_request(target, http::Method::PUT, RESTORE_PATH, body)?;
        req.headers_mut().insert(FORMAT_HEADER, snapshot.format);
        let (status, answer) = tokio::time::timeout(timeout, async {
            let resp = self.client.request(req).await?;
            let status = resp.status();
            let body = resp.into_body().collect().await?.to_bytes();
            Ok::<_, BoxError>((status, body))
        })
        .await
        .map_err(|_| SnapshotError::touched("the target's restore timed out"))?
        .map_err(|e| SnapshotError {
            what: format!(
                "the target's restore got no answer: {}",
                error_chain(e.as_ref())
            ),
            // Refused before anything was sent: the target is as it was.
            touched: !is_connect_error(e.as_ref()),
        })?;
        if !status.is_success() {
            // A restore that fails changes nothing (the Snapshotter's contract).
            return Err(SnapshotError::untouched(format!(
                "the target answered {status} to {RESTORE_PATH}: {}",
                String::from_utf8_lossy(&answer)
            )));
        }
        Ok(serde_json::from_slice::<serde_json::Value>(&answer)
            .ok()
            .and_then(|v| v.get("seq").and_then(serde_json::Value::as_u64)))
    }
}

pub(crate) fn is_connect_error(e: &(dyn std::error::Error + 'static)) -> bool {
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
