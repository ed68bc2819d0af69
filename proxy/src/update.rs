//! The update path, the group's sequencer: serialize, journal ahead, forward to the
//! primary with the replay headers, seal with the primary's answer, answer the client with
//! `Regroup-Seq`; and what happens when any of it fails (`in_doubt`, `settle`).
//!
//! **The sequencer's rules.** Records are appended one at a time (the write slot), and a
//! window of up to `pipeline_window` of them may be on their way to the primary at once
//! ([`Window`]):
//!
//! 1. Records reach the primary in seq order: a record is sent right behind the one before
//!    it (`Regroup-Prev` + `Regroup-Pipelined`, and the primary's app layer runs them one at
//!    a time in that order) only while that one is in the window for the same primary and
//!    epoch; any other send, a re-send included, waits until every record before it is
//!    sealed. A primary without the app layer's record gets a window of one.
//! 2. Seals are written in seq order: a record is sealed only once every record before it
//!    is, so the sealed head has no holes and the epochs of sealed records never go down.
//! 3. Every failure after an append (no answer, a journal error on restamp or seal, an
//!    append whose outcome is unknown, a record before it in doubt) makes the record in
//!    doubt; the group holds the lowest one, settles them lowest first (each only once
//!    every record before it is sealed), and takes no new update meanwhile.
//!
//! So a record can never stay pending below sealed ones, and replicas, which only see
//! durably sealed records, never skip one.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use http::header::{self, HeaderMap, HeaderName, HeaderValue};
use http::{Request, Response};
use http_body_util::{BodyExt, Limited};
use regroup_replay::headers::Behind;
use regroup_replay::signature::{Secret, sign_headers};
use regroup_replay::{
    Fingerprint, JournalError, Outcome, Payload, Record, RecordedRequest, headers as rh,
};
use tokio::time::Instant;

use crate::config::ReplayPolicy;
use crate::error::ProxyError;
use crate::forward::{self, BoxError, ProxyBody};
use crate::group::{Group, Role};
use crate::link::{Answer, SendError};
use crate::partition::Partition;
use crate::status::PartitionStatus;

/// Handles one update end to end, on the current runtime ([`handle_on`]).
pub(crate) async fn handle<B>(
    group: Arc<Group>,
    req: Request<B>,
    client: Option<SocketAddr>,
) -> Result<Response<ProxyBody>, ProxyError>
where
    B: http_body::Body<Data = Bytes> + Send + 'static,
    B::Error: Into<BoxError>,
{
    handle_on(group, req, client, &tokio::runtime::Handle::current()).await
}

/// Handles one update end to end: the request is read here, on the task that serves the
/// client's connection, and the journaled part runs in a task of its own on `runtime` (the
/// group's, where the journal, the replayers and supervision run), so that a client that
/// disconnects cannot leave a record half-written.
pub(crate) async fn handle_on<B>(
    group: Arc<Group>,
    req: Request<B>,
    client: Option<SocketAddr>,
    runtime: &tokio::runtime::Handle,
) -> Result<Response<ProxyBody>, ProxyError>
where
    B: http_body::Body<Data = Bytes> + Send + 'static,
    B::Error: Into<BoxError>,
{
    let recorded = recorded(&group, req, client).await?;
    let started = Instant::now();
    let result = match runtime.spawn(execute(group.clone(), recorded)).await {
        Ok(answer) => answer,
        Err(e) if e.is_cancelled() => Err(ProxyError::Unavailable {
            group: group.name().to_owned(),
            reason: "the proxy is shutting down".into(),
        }),
        Err(e) => Err(ProxyError::Journal(format!("update task failed: {e}"))),
    };
    group.metrics.update_done(&result, started.elapsed());
    result
}

/// What the journal records of `req`: its body read whole (within the group's limit), its
/// headers without the hop-by-hop ones and with the forwarding ones.
async fn recorded<B>(
    group: &Group,
    req: Request<B>,
    client: Option<SocketAddr>,
) -> Result<RecordedRequest, ProxyError>
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
        .map_err(|e| ProxyError::from_body_error(e, limit))?
        .to_bytes();
    let mut headers = parts.headers;
    forward::strip_hop_by_hop(&mut headers);
    forward::strip_replay_headers(&mut headers);
    forward::add_forwarded(&mut headers, client);
    headers.remove(header::CONTENT_LENGTH);
    Ok(RecordedRequest {
        method: parts.method.to_string(),
        uri: parts
            .uri
            .path_and_query()
            .map_or("/", |pq| pq.as_str())
            .to_owned(),
        headers: recorded_headers(&headers)?,
        body,
    })
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
/// `Regroup-Replay: 1`; `term` > 0: with `Regroup-Term`; `order`: with the order headers
/// that place it, `Regroup-Prev` or `Regroup-After` + `Regroup-Floor`; none when the sender
/// does not know what the partition recorded last), signed with `secret` when set. A SQL
/// mode payload is refused: it is replayed by SQL mode's own applier on database copies,
/// never sent over HTTP.
pub(crate) fn record_request(
    record: &Record,
    base: &http::Uri,
    replay: bool,
    term: u64,
    order: Option<Behind<'_>>,
    secret: Option<&Secret>,
) -> Result<Request<ProxyBody>, String> {
    let request = match &record.payload {
        Payload::Http(request) => request,
        Payload::Sql(_) => {
            return Err(format!(
                "record {} of group {:?} holds SQL statements (SQL mode), which are never sent over HTTP",
                record.seq, record.group
            ));
        }
    };
    build_request(record, request, base, replay, term, order, secret).map_err(|e| e.to_string())
}

fn build_request(
    record: &Record,
    request: &RecordedRequest,
    base: &http::Uri,
    replay: bool,
    term: u64,
    order: Option<Behind<'_>>,
    secret: Option<&Secret>,
) -> Result<Request<ProxyBody>, http::Error> {
    let mut builder = Request::builder()
        .method(request.method.as_str())
        .uri(forward::upstream_uri(base, &request.uri)?);
    if let Some(h) = builder.headers_mut() {
        for (name, value) in &request.headers {
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
        if term > 0 {
            h.insert(rh::TERM, HeaderValue::from(term));
        }
        match order {
            None => {}
            Some(Behind::Prev(prev)) => {
                h.insert(rh::PREV, HeaderValue::from(prev));
            }
            Some(Behind::After { after, floor }) => {
                let list = after
                    .iter()
                    .map(u64::to_string)
                    .collect::<Vec<_>>()
                    .join(",");
                h.insert(rh::AFTER, HeaderValue::from_str(&list)?);
                h.insert(rh::FLOOR, HeaderValue::from(floor));
            }
        }
    }
    let mut req = builder.body(forward::full(request.body.clone()))?;
    if let Some(secret) = secret {
        let path = req
            .uri()
            .path_and_query()
            .map_or("/", |pq| pq.as_str())
            .to_owned();
        let method = req.method().as_str().to_owned();
        sign_headers(req.headers_mut(), &method, &path, &request.body, secret);
    }
    Ok(req)
}

/// What became of one forward of a record to a partition.
enum Forwarded {
    /// The partition refused it unexecuted: by its own record it stands at this seq,
    /// behind the record (a restored copy). It cannot lead until it has caught up.
    Behind(u64),
    /// The partition answered.
    Answer(Answer),
    /// The request never left: nothing was executed.
    NotSent(String),
    /// The request may have been executed; no answer came back (connection broken,
    /// time-out, or the partition was deposed while it was working).
    Unknown(String),
}

/// Sends `record` to `primary` as the primary's execution in `epoch` (right behind record
/// `behind` when set: see [`Window`]), giving up with `Unknown` when the role moves past
/// `epoch` meanwhile.
async fn forward(
    group: &Group,
    record: &Record,
    primary: &Partition,
    epoch: u64,
    behind: Option<u64>,
) -> Forwarded {
    let timeout = group.config.update_timeout();
    let send = async {
        match behind {
            Some(prev) => {
                group
                    .link
                    .send_pipelined(primary, record, false, Behind::Prev(prev), timeout)
                    .await
            }
            None => group.link.send(primary, record, false, timeout).await,
        }
    };
    let mut roles = group.watch_role();
    let deposed = roles.wait_for(|r| r.epoch != epoch);
    tokio::select! {
        biased;
        answer = send => match answer {
            Ok(a) => Forwarded::Answer(a),
            Err(SendError::NotSent(r)) => Forwarded::NotSent(r),
            Err(SendError::Unknown(r)) => Forwarded::Unknown(r),
            Err(SendError::Behind(at)) => Forwarded::Behind(at),
        },
        _ = deposed => Forwarded::Unknown(format!(
            "partition {:?} was deposed (epoch {epoch} ended) before it answered",
            primary.name()
        )),
    }
}

/// Makes `record` durable as sent to `primary` in `epoch` before it is sent: a new epoch,
/// and `primary` among the partitions that may have executed it.
async fn stamp(
    group: &Group,
    record: &mut Record,
    epoch: u64,
    primary: &str,
) -> Result<(), JournalError> {
    if record.epoch != epoch || !record.may_have_executed(primary) {
        group
            .journal
            .restamp(group.name(), record.seq, epoch, primary)
            .await?;
        record.epoch = epoch;
        record.add_executor(primary);
    }
    Ok(())
}

/// `append`: writes `record` ahead. An error whose outcome is unknown is checked against
/// the journal itself: committed after all, not written (503, nothing changed), or unknown
/// (the record is in doubt).
async fn append(group: &Arc<Group>, record: &Record) -> Result<(), ProxyError> {
    let Err(e) = group.journal.append(record).await else {
        return Ok(());
    };
    match group.journal.record(group.name(), record.seq).await {
        Ok(Some(found)) if found.txn_id == record.txn_id => {
            tracing::warn!(group = %group.name(), seq = record.seq, error = %e,
                "append reported an error but committed");
            Ok(())
        }
        // The journal cannot hold it at all: the client's to fix, and nothing was written.
        Ok(_) if matches!(e, JournalError::TooLarge { .. }) => {
            Err(ProxyError::RecordTooLarge(e.to_string()))
        }
        Ok(found) => {
            // Not written: the client hears that nothing changed, so should it land after
            // all (a journal that sends it again later), it is sealed skipped.
            group.note_not_written(record.txn_id);
            if let Some(found) = found {
                // The journal holds another record at this seq that the group did not count:
                // an earlier append whose answer was lost landed late. It is taken up.
                tracing::warn!(group = %group.name(), seq = found.seq,
                    "the journal holds a record this proxy had not counted (an append that landed late); taking it up");
                group.set_head(found.seq);
                group.mark_in_doubt(found, "an append whose answer was lost landed late");
                spawn_settle(group.clone());
            }
            Err(ProxyError::Journal(e.to_string()))
        }
        Err(check) => {
            group.set_head(record.seq);
            let reason = format!(
                "append failed ({e}) and the journal cannot say whether it committed ({check})"
            );
            leave_in_doubt(group, record.clone(), &reason);
            // Settled (kept or dropped) as soon as the journal answers again.
            spawn_settle(group.clone());
            Err(ProxyError::InDoubt {
                group: group.name().to_owned(),
                seq: record.seq,
                reason,
            })
        }
    }
}

async fn execute(
    group: Arc<Group>,
    request: RecordedRequest,
) -> Result<Response<ProxyBody>, ProxyError> {
    let started = Instant::now();
    let deadline = started + group.config.failover_wait();
    let slot = take_write_slot(&group, deadline).await?;
    let (role, first_primary, behind) = loop {
        let (role, primary) = wait_for_primary(&group, deadline).await?;
        let behind = match window_room(&group, &role, &primary, deadline).await? {
            Room::Alone => None,
            Room::Behind(prev) => Some(prev),
            Room::Moved => continue,
        };
        if group.role() == role {
            break (role, primary, behind);
        }
    };
    let slotted = Instant::now();
    let seq = group.head() + 1;
    let mut record = Record::pending(group.name(), seq, role.epoch, request);
    record.add_executor(&role.primary);
    // In the window before it is written: a settlement scanning for unsealed records
    // leaves it to this task.
    group.window_lock().enter(seq, role.epoch, &role.primary);
    let written_before = group.written();
    if let Err(e) = append(&group, &record).await {
        leave_window(&group, seq);
        return Err(e);
    }
    group.set_head(seq);
    drop(slot);
    // Written; flushed too unless the journal defers appends (`journal_sync = "overlap"`).
    let mut unflushed = Unflushed::after_append(&group, written_before);
    let appended = Instant::now();
    // The first send, as the window placed it: right behind the record before it, or (an
    // empty window) after every record before it was sealed. Any later send waits its turn.
    let mut first = Some(behind);
    loop {
        let (role, primary) = match wait_for_primary(&group, deadline).await {
            Ok(leader) => leader,
            // Appended, but nobody to send it to in time: never executed anywhere.
            Err(e) => return skip_unexecuted(&group, record, e.to_string(), deadline).await,
        };
        let behind = match first.take() {
            Some(behind)
                if role.epoch == record.epoch && primary.name() == first_primary.name() =>
            {
                behind
            }
            _ => {
                if let Err(reason) = wait_turn(&group, seq, deadline).await {
                    return in_doubt(&group, record, deadline, reason).await;
                }
                None
            }
        };
        if let Err(e) = stamp(&group, &mut record, role.epoch, primary.name()).await {
            let reason = format!("cannot restamp it for {:?}: {e}", primary.name());
            return in_doubt(&group, record, deadline, reason).await;
        }
        // Only a primary that keeps the app layer's record may execute a record that is
        // not durable yet: if the journal then loses it (a power loss), that primary says
        // it stands ahead of the journal and is quarantined. Any other waits for the flush.
        let overlap = primary.keeps_own_record();
        if !overlap && let Err(e) = unflushed.flush(&group).await {
            let reason = format!("the journal cannot make it durable: {e}");
            return skip_unexecuted(&group, record, reason, deadline).await;
        }
        let (forwarded, flushed) = tokio::join!(
            forward(&group, &record, &primary, role.epoch, behind),
            unflushed.flush(&group)
        );
        match forwarded {
            Forwarded::Answer(answer) => {
                if let Err(e) = flushed {
                    // Executed, but its record is not durable: never answered as done.
                    let reason = format!("executed, but the journal cannot make it durable: {e}");
                    return in_doubt(&group, record, deadline, reason).await;
                }
                let answered = Instant::now();
                // Sealed in seq order: after every record before it.
                if let Err(reason) = wait_turn(&group, seq, deadline).await {
                    return in_doubt(&group, record, deadline, reason).await;
                }
                return match seal_answer(&group, &mut record, &role, &primary, &answer).await {
                    Ok(()) => {
                        leave_window(&group, seq);
                        tracing::debug!(
                            seq,
                            wait_us = (slotted - started).as_micros() as u64,
                            append_us = (appended - slotted).as_micros() as u64,
                            primary_us = (answered - appended).as_micros() as u64,
                            seal_us = answered.elapsed().as_micros() as u64,
                            "update timings"
                        );
                        Ok(client_answer(answer, seq))
                    }
                    Err(reason) => in_doubt(&group, record, deadline, reason).await,
                };
            }
            Forwarded::Behind(_) if behind.is_some() => {
                // Sent behind a record its layer never recorded (that one failed): nothing
                // ran; sent again in its turn.
            }
            Forwarded::Behind(at) => {
                // Nothing executed; the failover task moves the role to a partition that
                // holds every sealed record.
                rewound(&group, &primary, at);
                if !wait_for_new_epoch(&group, role.epoch, deadline).await {
                    let reason = format!(
                        "primary {:?} stands behind the journal and no partition took its place within {} ms",
                        primary.name(),
                        group.config.failover_wait_ms
                    );
                    return skip_unexecuted(&group, record, reason, deadline).await;
                }
            }
            Forwarded::NotSent(reason) => {
                tracing::warn!(group = %group.name(), partition = %primary.name(), seq, %reason,
                    "primary unreachable; waiting for the role to move");
                miss(&group, &primary);
                if !wait_for_new_epoch(&group, role.epoch, deadline).await {
                    // The upstream error stays in the log; the client hears the state.
                    tracing::warn!(group = %group.name(), primary = %primary.name(), %reason,
                        "primary unreachable and no failover in time");
                    let reason = format!(
                        "primary {:?} is unreachable and no partition took its place within {} ms",
                        primary.name(),
                        group.config.failover_wait_ms
                    );
                    return skip_unexecuted(&group, record, reason, deadline).await;
                }
            }
            Forwarded::Unknown(reason) => {
                // A broken exchange with the primary counts as a missed heartbeat, so a dead
                // primary is noticed as fast as when it refuses connections.
                if group.epoch() == role.epoch {
                    miss(&group, &primary);
                }
                return in_doubt(&group, record, deadline, reason).await;
            }
        }
    }
}

/// The pipelined sequencer's window: the records appended (or being appended) and sent, or
/// about to be sent, to the primary, and not yet sealed or in doubt; and the epoch and
/// primary they went to. A record leaves it sealed, or in doubt in the same step
/// ([`leave_in_doubt`]), so every unsealed record below the head is in the window, in doubt,
/// or above the in-doubt record.
#[derive(Debug, Default)]
pub(crate) struct Window {
    open: std::collections::BTreeSet<u64>,
    to: Option<(u64, String)>,
    /// In-doubt records whose update task is settling them itself (its client waits for
    /// the answer): the background settlement leaves them to it.
    settling: std::collections::BTreeSet<u64>,
}

impl Window {
    /// Whether the record `seq` is in the window (its update task settles it).
    pub(crate) fn holds(&self, seq: u64) -> bool {
        self.open.contains(&seq)
    }

    /// Whether no record is in the window.
    pub(crate) fn is_empty(&self) -> bool {
        self.open.is_empty()
    }

    fn enter(&mut self, seq: u64, epoch: u64, primary: &str) {
        self.open.insert(seq);
        if self
            .to
            .as_ref()
            .is_none_or(|(e, p)| *e != epoch || p != primary)
        {
            self.to = Some((epoch, primary.to_owned()));
        }
    }

    fn leave(&mut self, seq: u64) {
        self.open.remove(&seq);
    }
}

/// Where the window takes the next record.
enum Room {
    /// The window is empty: send it as the only one.
    Alone,
    /// Send it right behind this record.
    Behind(u64),
    /// The role moved, or records were taken up from the journal, meanwhile: look again.
    Moved,
}

/// With the write slot held: waits until the window takes the next record for `primary` in
/// `role`'s epoch. 503 at `deadline`.
async fn window_room(
    group: &Arc<Group>,
    role: &Role,
    primary: &Partition,
    deadline: Instant,
) -> Result<Room, ProxyError> {
    let pipelines =
        group.config.pipeline_window > 1 && group.link.pipelines() && primary.keeps_own_record();
    loop {
        let moved = group.window_moved.notified();
        tokio::pin!(moved);
        moved.as_mut().enable();
        let admitted = group.in_doubt_seq().is_none() && !group.role().handing_over;
        if admitted {
            let w = group.window_lock();
            match w.open.last() {
                None if group.written() >= group.head() => return Ok(Room::Alone),
                // Every record below the head is sealed, in doubt or in the window; one that
                // is none of these (a settlement could not read the journal) is taken up.
                None => {}
                Some(&last)
                    if pipelines
                        && w.open.len() < group.config.pipeline_window
                        && w.to.as_ref() == Some(&(role.epoch, primary.name().to_owned())) =>
                {
                    return Ok(Room::Behind(last));
                }
                Some(_) => {}
            }
        }
        // Records below the head that are neither sealed, in doubt nor in the window.
        let left_behind =
            admitted && group.window_lock().is_empty() && group.written() < group.head();
        if left_behind && group.take_up_unsealed().await {
            return Ok(Room::Moved);
        }
        // Nothing could be taken up (the journal did not answer): look again shortly, not
        // at once (a retry without a pause would spin a core).
        let retry = async {
            if left_behind {
                tokio::time::sleep(TAKE_UP_RETRY).await;
            } else {
                std::future::pending::<()>().await;
            }
        };
        let changed = async {
            let mut roles = group.watch_role();
            let _ = roles.changed().await;
        };
        tokio::select! {
            biased;
            _ = tokio::time::sleep_until(deadline) => {
                return Err(ProxyError::Unavailable {
                    group: group.name().to_owned(),
                    reason: "timed out waiting for earlier updates".into(),
                });
            }
            _ = &mut moved => {}
            _ = retry => {}
            _ = changed => return Ok(Room::Moved),
        }
    }
}

/// How long the window waits before it looks again for records it could not take up.
const TAKE_UP_RETRY: Duration = Duration::from_millis(20);

/// Waits until every record before `seq` is sealed (written), so `seq` may be sent again or
/// sealed; an error when a record before it is in doubt or at `deadline`.
async fn wait_turn(group: &Group, seq: u64, deadline: Instant) -> Result<(), String> {
    let mut changed = group.changed.subscribe();
    loop {
        let moved = group.window_moved.notified();
        tokio::pin!(moved);
        moved.as_mut().enable();
        changed.borrow_and_update();
        if group.written() + 1 >= seq {
            return Ok(());
        }
        if let Some(lower) = group.in_doubt_seq()
            && lower < seq
        {
            return Err(format!("record {lower} before it is in doubt"));
        }
        tokio::select! {
            biased;
            _ = tokio::time::sleep_until(deadline) => {
                return Err(format!(
                    "the records before it were not sealed within {} ms",
                    group.config.failover_wait_ms
                ));
            }
            _ = &mut moved => {}
            _ = changed.changed() => {}
        }
    }
}

/// Record `seq` leaves the window sealed (or never written), waking those waiting for room.
fn leave_window(group: &Group, seq: u64) {
    group.window_lock().leave(seq);
    group.window_moved.notify_waiters();
}

/// `record` leaves the window in doubt, in one step (see [`Window`]).
fn leave_in_doubt(group: &Group, record: Record, reason: &str) {
    let seq = record.seq;
    let mut w = group.window_lock();
    group.mark_in_doubt(record, reason);
    w.leave(seq);
    drop(w);
    group.window_moved.notify_waiters();
}

/// Waits until the window is empty (a planned hand-over: every update on its way has been
/// sealed or is in doubt); false at `deadline`.
pub(crate) async fn drain_window(group: &Group, deadline: Instant) -> bool {
    loop {
        let moved = group.window_moved.notified();
        tokio::pin!(moved);
        moved.as_mut().enable();
        if group.window_lock().is_empty() {
            return true;
        }
        if tokio::time::timeout_at(deadline, moved).await.is_err() {
            return false;
        }
    }
}

/// Whether an appended record is not durable yet (`journal_sync = "overlap"`).
struct Unflushed(bool);

impl Unflushed {
    /// After the append: nothing left to flush when the journal's appends are durable.
    fn after_append(group: &Group, written_before: u64) -> Unflushed {
        if group.journal.appends_durable() {
            // The append's flush made earlier seals durable too.
            group.flushed(written_before);
            return Unflushed(false);
        }
        Unflushed(true)
    }

    /// Flushes the journal unless the record is durable already; an error leaves it to
    /// flush again.
    async fn flush(&mut self, group: &Group) -> Result<(), JournalError> {
        if self.0 {
            group.flush_journal().await?;
            self.0 = false;
        }
        Ok(())
    }
}

/// A record that no partition executed (every send was refused) is sealed `skipped`; the
/// client gets 503. If even that seal fails, the record is in doubt like any other.
async fn skip_unexecuted(
    group: &Arc<Group>,
    record: Record,
    reason: String,
    deadline: Instant,
) -> Result<Response<ProxyBody>, ProxyError> {
    // Sealed in seq order, like any seal.
    if let Err(why) = wait_turn(group, record.seq, deadline).await {
        let reason = format!("{reason}; and it could not be sealed skipped: {why}");
        return in_doubt(group, record, deadline, reason).await;
    }
    match seal(group, record.seq, &Outcome::Skipped).await {
        Ok(()) => {
            credit_skipped(group, record.seq);
            sealed(group, record.seq);
            leave_window(group, record.seq);
            Err(ProxyError::Unavailable {
                group: group.name().to_owned(),
                reason,
            })
        }
        Err(e) => {
            let reason = format!("{reason}; and it could not be sealed skipped: {e}");
            in_doubt(group, record, deadline, reason).await
        }
    }
}

/// `seal`: records `answer` from `primary` as `record`'s outcome, unless the epoch it was
/// sent in has ended (then the answer came from a deposed primary and the record is in
/// doubt). The answer is credited to the partition that gave it.
async fn seal_answer(
    group: &Group,
    record: &mut Record,
    role: &Role,
    primary: &Partition,
    answer: &Answer,
) -> Result<(), String> {
    let status = answer.parts.status;
    let fingerprint = Fingerprint::of(status.as_u16(), &answer.body);
    let outcome = if group.config.replay == ReplayPolicy::Success && !status.is_success() {
        Outcome::Skipped
    } else {
        Outcome::Executed(Some(fingerprint.clone()))
    };
    let _gate = group.seal_gate.lock().await;
    let now = group.role();
    if now.epoch != role.epoch || now.primary != primary.name() {
        return Err(format!(
            "{:?} answered after its epoch {} ended",
            primary.name(),
            role.epoch
        ));
    }
    if let Err(e) = seal(group, record.seq, &outcome).await {
        return Err(format!(
            "executed, but the answer could not be journaled: {e}"
        ));
    }
    record.fingerprint = Some(fingerprint);
    primary.credit(record.seq);
    sealed(group, record.seq);
    Ok(())
}

/// A skipped record needs no applying: a primary that held everything before it holds it
/// too.
pub(crate) fn credit_skipped(group: &Group, seq: u64) {
    if let Some(p) = group.primary()
        && p.applied() + 1 >= seq
    {
        p.credit(seq);
    }
}

/// Advances the sealed head past `seq`, now or at the journal's next flush.
fn sealed(group: &Group, seq: u64) {
    if group.journal.seals_durable() {
        group.sealed_through(seq);
    } else {
        group.sealed_unflushed(seq);
    }
}

/// Flushes seals the journal defers (`journal_sync = "append"`) when no append came to
/// carry them, so replicas never wait long for a seal that is not durable yet.
pub(crate) fn start_flusher(group: &Arc<Group>) {
    if group.journal.seals_durable() {
        return;
    }
    let group = group.clone();
    tokio::spawn(async move {
        let mut stop = group.stop.subscribe();
        loop {
            tokio::select! {
                biased;
                _ = group.flush_wanted.notified() => {}
                _ = stop.changed() => return,
            }
            // Let a following append carry the flush, if one comes at once.
            tokio::time::sleep(FLUSH_AFTER).await;
            let written = group.written();
            if written <= group.sealed() {
                continue;
            }
            match group.journal.flush().await {
                Ok(()) => group.flushed(written),
                Err(e) => {
                    tracing::warn!(group = %group.name(), error = %e, "journal flush failed; retrying");
                    group.flush_wanted.notify_one();
                }
            }
        }
    });
}

/// How long a deferred seal waits for an append to flush it before the flusher does.
const FLUSH_AFTER: Duration = Duration::from_millis(2);

fn client_answer(answer: Answer, seq: u64) -> Response<ProxyBody> {
    let mut resp = Response::from_parts(answer.parts, forward::full(answer.body));
    forward::strip_hop_by_hop(resp.headers_mut());
    resp.headers_mut().remove(header::CONTENT_LENGTH);
    resp.headers_mut().insert(rh::SEQ, HeaderValue::from(seq));
    resp
}

/// The primary said it stands at `at`, behind the journal: it is no longer credited with
/// more, so the failover task moves the role to one that holds every sealed record.
fn rewound(group: &Group, p: &Partition, at: u64) {
    group.transition(
        "rewind",
        format!(
            "primary {:?} stands at {at} by its own record, behind {}",
            p.name(),
            p.applied()
        ),
    );
    p.set_applied(at);
    // Its layer's record ends there: the next record it is sent follows it (left at what
    // it said before, every send would be refused again: seed 8964 settled in a loop).
    p.set_delivered(at);
    group.refresh(p);
    group.bump();
}

/// A proxied update that could not connect counts as a missed heartbeat.
fn miss(group: &Group, p: &Partition) {
    p.record_miss();
    group.refresh(p);
}

/// Waits until a new epoch leads (a hand-over ended); false at `deadline`.
async fn wait_for_new_epoch(group: &Group, epoch: u64, deadline: Instant) -> bool {
    let mut roles = group.watch_role();
    let moved = roles.wait_for(|r| r.epoch != epoch && !r.handing_over);
    tokio::time::timeout_at(deadline, moved).await.is_ok()
}

/// Waits until the role is not moving and its primary can take updates; 503 naming every
/// partition's state at `deadline`.
/// How often a waiting update looks whether a catching-up primary has caught up.
const CATCH_UP_POLL: Duration = Duration::from_millis(10);

/// Whether `primary` may be sent a new record: it holds every sealed record (a copy
/// restored from an older backup is first caught up by its own replayer), and no replayer
/// sends it records any more (stopped here once it caught up).
async fn caught_up(group: &Group, primary: &Partition) -> bool {
    if primary.applied() < group.sealed() {
        return false;
    }
    if crate::replicate::running(group, primary.name()) {
        crate::replicate::stop_one(group, primary.name()).await;
    }
    primary.applied() >= group.sealed()
}

async fn wait_for_primary(
    group: &Group,
    deadline: Instant,
) -> Result<(Role, Arc<Partition>), ProxyError> {
    let mut changed = group.changed.subscribe();
    loop {
        changed.borrow_and_update();
        let role = group.role();
        if !role.handing_over
            && let Some(primary) = group.member(&role.primary)
            && primary.status() != PartitionStatus::Unavailable
            && primary.diverged().is_none()
            && caught_up(group, &primary).await
        {
            return Ok((role, primary));
        }
        // A primary catching up on its own records advances without a status change:
        // looked at again every few milliseconds too.
        let next = deadline.min(Instant::now() + CATCH_UP_POLL);
        if tokio::time::timeout_at(next, changed.changed())
            .await
            .is_err()
            && Instant::now() >= deadline
        {
            let behind = group
                .primary()
                .filter(|p| p.applied() < group.sealed())
                .map(|p| {
                    format!(
                        "; primary {:?} is catching up: applied {} of {}",
                        p.name(),
                        p.applied(),
                        group.sealed()
                    )
                })
                .unwrap_or_default();
            let states: Vec<String> = group
                .members()
                .iter()
                .map(|p| format!("{} {}", p.name(), p.status()))
                .collect();
            return Err(ProxyError::Unavailable {
                group: group.name().to_owned(),
                reason: format!(
                    "no partition can take the primary role within {} ms ({}){behind}",
                    group.config.failover_wait_ms,
                    states.join(", ")
                ),
            });
        }
    }
}

/// Takes the group's write slot once no record is in doubt and no hand-over runs, waiting
/// at most until `deadline`.
async fn take_write_slot(
    group: &Group,
    deadline: Instant,
) -> Result<tokio::sync::MutexGuard<'_, ()>, ProxyError> {
    let mut changed = group.changed.subscribe();
    let unavailable = |reason: String| ProxyError::Unavailable {
        group: group.name().to_owned(),
        reason,
    };
    loop {
        changed.borrow_and_update();
        let blocked = match group.in_doubt_seq() {
            Some(seq) => Some(format!(
                "update {seq} is in doubt and must be resolved first (regroup resolve --group {} --seq {seq} executed|skipped)",
                group.name()
            )),
            None if group.role().handing_over => Some(format!(
                "the primary role is moving and did not settle within {} ms",
                group.config.failover_wait_ms
            )),
            None => None,
        };
        if let Some(reason) = blocked {
            if tokio::time::timeout_at(deadline, changed.changed())
                .await
                .is_err()
            {
                return Err(unavailable(reason));
            }
            continue;
        }
        let guard = tokio::time::timeout_at(deadline, group.write_slot.lock())
            .await
            .map_err(|_| unavailable("timed out waiting for earlier updates".into()))?;
        if group.in_doubt_seq().is_none() && !group.role().handing_over {
            return Ok(guard);
        }
    }
}

/// Seals `seq`, retrying a few times: a seal is idempotent, so a retry after a lost
/// acknowledgement is harmless.
async fn seal(group: &Group, seq: u64, outcome: &Outcome) -> Result<(), ProxyError> {
    let mut last = None;
    for attempt in 0..3u32 {
        match group.journal.seal(group.name(), seq, outcome).await {
            Ok(()) => return Ok(()),
            Err(e) if !e.is_retryable() => return Err(ProxyError::Journal(e.to_string())),
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

/// The record's execution is unknown: it becomes the group's in-doubt record; try to
/// settle it exactly until `deadline` (the waiting client then gets the answer), and
/// otherwise keep trying in the background while later updates wait.
async fn in_doubt(
    group: &Arc<Group>,
    record: Record,
    deadline: Instant,
    reason: String,
) -> Result<Response<ProxyBody>, ProxyError> {
    let seq = record.seq;
    group.window_lock().settling.insert(seq);
    leave_in_doubt(group, record.clone(), &reason);
    let settled = settle(group, Some(deadline), Some(&record)).await;
    group.window_lock().settling.remove(&seq);
    if group.in_doubt().is_some() {
        // Records after this one (or this one) are left to the background settlement.
        spawn_settle(group.clone());
    }
    match settled {
        Settled::Answer(answer) => {
            // Under `overlap` the record itself may not be durable yet: it is acknowledged
            // only once it is.
            if group.journal.appends_durable() {
                return Ok(client_answer(answer, seq));
            }
            match group.flush_journal().await {
                Ok(()) => return Ok(client_answer(answer, seq)),
                Err(e) => {
                    return Err(ProxyError::InDoubt {
                        group: group.name().to_owned(),
                        seq,
                        reason: format!(
                            "{reason}; settled, but the journal cannot make it durable: {e}"
                        ),
                    });
                }
            }
        }
        Settled::Elsewhere | Settled::Pending => {}
    }
    Err(ProxyError::InDoubt {
        group: group.name().to_owned(),
        seq,
        reason,
    })
}

/// Keeps trying to settle the group's in-doubt records in the background, lowest first,
/// until none is left (one such task per group at a time).
pub(crate) fn spawn_settle(group: Arc<Group>) {
    if group
        .settling
        .swap(true, std::sync::atomic::Ordering::AcqRel)
    {
        return;
    }
    tokio::spawn(async move {
        loop {
            let outcome = settle(&group, None, None).await;
            if let Settled::Answer(..) = outcome {
                tracing::info!(group = %group.name(), "in-doubt record settled");
            }
            if !matches!(outcome, Settled::Answer(..)) || group.in_doubt().is_none() {
                break;
            }
        }
        group
            .settling
            .store(false, std::sync::atomic::Ordering::Release);
        // One marked while this task was on its way out is not left behind.
        if group.in_doubt().is_some() && !*group.stop.borrow() {
            spawn_settle(group);
        }
    });
}

/// How a settlement attempt ended.
pub(crate) enum Settled {
    /// Executed exactly once, with this answer (sealed).
    Answer(Answer),
    /// Settled otherwise: by an operator, or found sealed in the journal.
    Elsewhere,
    /// Still in doubt at the deadline.
    Pending,
}

/// Settles the in-doubt record exactly, never by guessing (see [`try_settle`]); waits for a
/// failover, the app layer or an operator meanwhile. With `own` (an update task's record,
/// which it left in doubt), it settles only that record, once the records before it are
/// settled: `Answer` is then its answer.
pub(crate) async fn settle(
    group: &Group,
    deadline: Option<Instant>,
    own: Option<&Record>,
) -> Settled {
    let mut changed = group.changed.subscribe();
    let mut stop = group.stop.subscribe();
    loop {
        changed.borrow_and_update();
        match (group.in_doubt(), own) {
            (None, None) => return Settled::Elsewhere,
            (None, Some(own)) if group.written() >= own.seq || group.head() < own.seq => {
                return Settled::Elsewhere;
            }
            // Not in doubt, not sealed, and no longer in the window: the settlement before it
            // could not take it up (the journal did not answer); taken up here, as the
            // journal holds it.
            (None, Some(own)) => match group.journal.record(group.name(), own.seq).await {
                Ok(Some(found)) if !found.state.is_sealed() => {
                    group.mark_in_doubt(found, "taken up again after the records before it");
                    continue;
                }
                Ok(_) => return Settled::Elsewhere,
                Err(_) => {}
            },
            (Some(r), Some(own)) if r.seq > own.seq => return Settled::Elsewhere,
            // A record before it is settled first.
            (Some(r), Some(own)) if r.seq < own.seq => {}
            // Its own update task is settling it (and answers its client).
            (Some(r), None) if group.window_lock().settling.contains(&r.seq) => {}
            (Some(record), _) => {
                if let Some(answer) = try_settle(group, record).await {
                    return Settled::Answer(answer);
                }
            }
        }
        if own.is_none() && group.in_doubt().is_none() {
            return Settled::Elsewhere;
        }
        let wait = async {
            tokio::select! {
                biased;
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

/// One attempt to settle `record`, the in-doubt record. First the journal is asked: a
/// seal whose acknowledgement was lost may have landed (then it is adopted), an append
/// whose outcome was unknown may not have (then the record is dropped). Otherwise it is
/// sent to the current primary only when that cannot apply it twice: the primary is not
/// among the partitions that may have executed it (a replica never saw an unsealed
/// record), or it keeps the app-side layer's exactly-once record (a re-delivery is answered
/// from it).
async fn try_settle(group: &Group, mut record: Record) -> Option<Answer> {
    let seq = record.seq;
    let role = group.role();
    if role.handing_over {
        return None;
    }
    let primary = group.member(&role.primary)?;
    let _settling = group.settle_lock.lock().await;
    if group.in_doubt_seq() != Some(seq) {
        return None;
    }
    // Records reach a primary in seq order: a record in the window before it goes first.
    if group.written() + 1 < seq {
        return None;
    }
    match group.journal.record(group.name(), seq).await {
        Ok(Some(found)) if found.state.is_sealed() => {
            adopt(group, &found, &role).await;
            return None;
        }
        Ok(Some(found)) if group.was_not_written(found.txn_id) => {
            // Its client heard that nothing changed, and it was never sent anywhere.
            return match group
                .journal
                .seal(group.name(), seq, &Outcome::Skipped)
                .await
            {
                Ok(()) => {
                    group.transition(
                        "settle",
                        format!("record {seq} landed after its client was told it was not written: skipped"),
                    );
                    credit_skipped(group, seq);
                    sealed(group, seq);
                    group.clear_in_doubt(seq).await;
                    None
                }
                Err(e) => {
                    tracing::debug!(group = %group.name(), seq, error = %e, "settling: cannot skip it");
                    None
                }
            };
        }
        Ok(Some(_)) => {}
        Ok(None) => {
            group.transition("settle", format!("record {seq} was never written: dropped"));
            group.note_not_written(record.txn_id);
            group.set_head(seq - 1);
            group.clear_in_doubt(seq).await;
            return None;
        }
        Err(e) => {
            tracing::debug!(group = %group.name(), seq, error = %e, "settling: journal unavailable");
            return None;
        }
    }
    if primary.status() == PartitionStatus::Unavailable
        || primary.diverged().is_some()
        || !caught_up(group, &primary).await
    {
        return None;
    }
    let may_have = record.may_have_executed(primary.name());
    if may_have && !keeps_own_record(group, &primary).await {
        return None;
    }
    if let Err(e) = stamp(group, &mut record, role.epoch, primary.name()).await {
        tracing::debug!(group = %group.name(), seq, error = %e, "settling: cannot restamp");
        return None;
    }
    group.update_in_doubt(&record);
    match forward(group, &record, &primary, role.epoch, None).await {
        Forwarded::Answer(answer) => {
            match seal_answer(group, &mut record, &role, &primary, &answer).await {
                Ok(()) => {
                    group.transition(
                        "settle",
                        format!(
                            "in-doubt update settled exactly: record {seq} executed once by {:?} (status {})",
                            primary.name(),
                            answer.parts.status.as_u16()
                        ),
                    );
                    group.clear_in_doubt(seq).await;
                    Some(answer)
                }
                Err(reason) => {
                    tracing::debug!(group = %group.name(), seq, %reason, "settling: not sealed");
                    None
                }
            }
        }
        Forwarded::Behind(at) => {
            rewound(group, &primary, at);
            None
        }
        Forwarded::NotSent(reason) => {
            tracing::debug!(group = %group.name(), seq, %reason, "settling: primary unreachable");
            miss(group, &primary);
            None
        }
        Forwarded::Unknown(reason) => {
            tracing::warn!(group = %group.name(), seq, %reason,
                "settling: no answer; it may have executed there");
            None
        }
    }
}

/// The journal holds `found` sealed although the group had it in doubt (the seal's
/// acknowledgement was lost): the group takes it as sealed.
pub(crate) async fn adopt(group: &Group, found: &Record, role: &Role) {
    if found.epoch == role.epoch
        && let Some(p) = group.member(&role.primary)
    {
        p.credit(found.seq);
    }
    group.transition(
        "settle",
        format!(
            "record {} found sealed {} in the journal",
            found.seq,
            found.state.as_str()
        ),
    );
    sealed(group, found.seq);
    group.clear_in_doubt(found.seq).await;
}

/// Whether `partition` answers the app-side layer's `/_regroup/applied` (it keeps its own
/// exactly-once record, so a re-delivery cannot apply twice).
async fn keeps_own_record(group: &Group, partition: &Partition) -> bool {
    let answer = group
        .link
        .position(partition, group.config.heartbeat_timeout() * 5)
        .await;
    let keeps = matches!(answer, Ok(Some(_)));
    if keeps {
        partition.set_keeps_own_record(true);
    }
    keeps
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_sql_payload_is_never_sent_over_http() {
        let record = Record::pending(
            "bank",
            4,
            1,
            regroup_replay::SqlTransaction {
                dialect: "sqlite".into(),
                statements: vec![],
                hash: String::new(),
            },
        );
        let base: http::Uri = "http://127.0.0.1:1".parse().unwrap_or_default();
        match record_request(&record, &base, true, 0, None, None) {
            Err(e) => assert!(e.contains("never sent over HTTP"), "{e}"),
            Ok(_) => panic!("a SQL payload was turned into an HTTP request"),
        }
    }
}
