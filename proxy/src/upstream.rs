//! The read path's upstream connections: HTTP/1 connections to one partition, kept per
//! balancer (so per client thread), each driven by the read that uses it.
//!
//! A read takes an idle connection of the partition it was balanced to (or opens one),
//! writes its request and reads the answer's head in its own task ([`crate::h1`] writes
//! and parses the bytes), then returns the answer with a body ([`ReadBody`]) that reads the
//! rest from the connection as the client takes it: no task per connection, no pool shared
//! between threads, no pool key. A connection goes back to its partition's idle list as
//! soon as the answer's body was read from it to its end (at once when the body came with
//! the head) and the partition keeps it open (not after `Connection: close`, HTTP/1.0, a
//! body delimited by the close, a body dropped early, an error). A connection idle for
//! [`IDLE_TIMEOUT`] is closed.
//!
//! The partition's load is tower's peak-EWMA ([`PeakEwma`]), kept with its connections.

use std::io;
use std::pin::Pin;
use std::sync::{Arc, Mutex, MutexGuard};
use std::task::{Context, Poll, ready};
use std::time::Duration;

use bytes::{Bytes, BytesMut};
use http::header::HeaderValue;
use http::{Method, Request, Response};
use http_body::{Body, Frame, SizeHint};
use http_body_util::BodyExt;
use tokio::io::AsyncReadExt;
use tokio::net::TcpStream;
use tokio::time::Instant;

use crate::forward::{BoxError, ProxyBody, strip_hop_by_hop};
use crate::h1::{self, Decoded, Decoder, Framing, Head};
use crate::partition::Partition;

/// How long a connection to a partition may take to open.
pub(crate) const CONNECT_TIMEOUT: Duration = Duration::from_secs(2);
/// How long an idle connection is kept.
pub(crate) const IDLE_TIMEOUT: Duration = Duration::from_secs(30);
/// Most idle connections kept per partition and balancer.
pub(crate) const MAX_IDLE: usize = 256;
/// Peak-EWMA's first estimate of a partition's latency (as the read path had it with tower).
const DEFAULT_RTT: Duration = Duration::from_millis(1);
/// Peak-EWMA's decay time.
const DECAY: Duration = Duration::from_secs(10);
/// Room made in a connection's read buffer before each read.
const READ_AHEAD: usize = 16 * 1024;

/// One open connection to a partition: its stream, what was read past the answer's head,
/// and a buffer for the requests it writes (both kept across requests).
struct Conn {
    io: TcpStream,
    read: BytesMut,
    write: BytesMut,
}

struct Idle {
    conn: Conn,
    since: Instant,
}

/// A read failed at a partition.
#[derive(Debug, thiserror::Error)]
#[error("partition {partition}: {reason}")]
pub(crate) struct EndpointError {
    pub(crate) partition: String,
    pub(crate) reason: String,
}

/// A read to send: its parts, kept by the caller so that it can be sent again (a read
/// without a body), or the request itself (with its body: sent at most once).
// Lives in the read's future, moved once: boxing the request would cost an allocation.
#[allow(clippy::large_enum_variant)]
pub(crate) enum Outgoing<'a> {
    /// A read without a body.
    Bodiless(&'a http::request::Parts),
    /// A read with a body, until it is sent.
    WithBody(Option<Request<ProxyBody>>),
}

impl Outgoing<'_> {
    fn bodiless(&self) -> bool {
        matches!(self, Outgoing::Bodiless(_))
    }
}

/// An empty body (boxing it allocates nothing: it has no size).
pub(crate) fn empty() -> ProxyBody {
    http_body_util::Empty::new()
        .map_err(|never| match never {})
        .boxed_unsync()
}

/// Peak-EWMA load of one partition, as tower's `PeakEwma` with `CompleteOnResponse`
/// computes it: the latency estimate jumps up to any slower answer and decays towards the
/// faster ones (over [`DECAY`]); the cost is that estimate times the reads in flight plus one.
#[derive(Debug, Clone)]
pub(crate) struct PeakEwma {
    rtt_ns: f64,
    update_at: Instant,
    pending: u32,
}

impl PeakEwma {
    pub(crate) fn new(now: Instant) -> Self {
        PeakEwma {
            rtt_ns: nanos(DEFAULT_RTT),
            update_at: now,
            pending: 0,
        }
    }

    /// The cost of one more read now.
    pub(crate) fn cost(&mut self, now: Instant) -> f64 {
        self.update(now, now);
        self.rtt_ns * f64::from(self.pending + 1)
    }

    /// A read was sent.
    pub(crate) fn start(&mut self) {
        self.pending += 1;
    }

    /// A read sent at `sent_at` got its answer's headers (or failed, or was given up) at `now`.
    pub(crate) fn complete(&mut self, sent_at: Instant, now: Instant) {
        self.pending = self.pending.saturating_sub(1);
        self.update(sent_at, now);
    }

    fn update(&mut self, sent_at: Instant, now: Instant) {
        let rtt = nanos(now.saturating_duration_since(sent_at));
        self.rtt_ns = if self.rtt_ns < rtt {
            rtt
        } else {
            let elapsed = nanos(now.saturating_duration_since(self.update_at));
            let decay = (-elapsed / nanos(DECAY)).exp();
            self.rtt_ns * decay + rtt * (1.0 - decay)
        };
        self.update_at = now;
    }
}

fn nanos(d: Duration) -> f64 {
    d.as_nanos() as f64
}

/// One partition as one balancer sees it: its load and its idle connections.
pub(crate) struct Endpoint {
    partition: Arc<Partition>,
    host: String,
    port: u16,
    /// The `Host` of a request that came without one.
    authority: Option<HeaderValue>,
    state: Mutex<State>,
}

struct State {
    load: PeakEwma,
    idle: Vec<Idle>,
}

impl std::fmt::Debug for Endpoint {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Endpoint")
            .field("partition", &self.partition.name())
            .finish_non_exhaustive()
    }
}

impl Endpoint {
    /// An endpoint for `partition`, with no connection yet.
    pub(crate) fn new(partition: Arc<Partition>) -> Endpoint {
        let base = partition.base();
        let host = base
            .host()
            .unwrap_or("")
            .trim_start_matches('[')
            .trim_end_matches(']')
            .to_owned();
        let port = base.port_u16().unwrap_or(80);
        let authority = base
            .authority()
            .and_then(|a| HeaderValue::from_str(a.as_str()).ok());
        Endpoint {
            partition,
            host,
            port,
            authority,
            state: Mutex::new(State {
                load: PeakEwma::new(Instant::now()),
                idle: Vec::new(),
            }),
        }
    }

    /// The partition.
    pub(crate) fn partition(&self) -> &Arc<Partition> {
        &self.partition
    }

    fn state(&self) -> MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// The cost of one more read here now (peak-EWMA).
    pub(crate) fn cost(&self, now: Instant) -> f64 {
        self.state().load.cost(now)
    }

    /// Counts one more read in flight (for tests of the balancer).
    #[cfg(test)]
    pub(crate) fn add_in_flight(&self) {
        self.state().load.start();
    }

    /// Idle connections kept.
    #[cfg(test)]
    pub(crate) fn idle(&self) -> usize {
        self.state().idle.len()
    }

    /// Closes the connections idle for longer than [`IDLE_TIMEOUT`].
    pub(crate) fn sweep(&self, now: Instant) {
        self.state()
            .idle
            .retain(|i| now.saturating_duration_since(i.since) < IDLE_TIMEOUT);
    }

    fn error(&self, reason: String) -> EndpointError {
        EndpointError {
            partition: self.partition.name().to_owned(),
            reason,
        }
    }

    /// The most recently used idle connection still usable, if any.
    fn checkout(&self) -> Option<Conn> {
        let now = Instant::now();
        let mut state = self.state();
        while let Some(mut idle) = state.idle.pop() {
            if now.saturating_duration_since(idle.since) < IDLE_TIMEOUT && idle.conn.still_open() {
                return Some(idle.conn);
            }
        }
        None
    }

    fn check_in(&self, conn: Conn) {
        let since = Instant::now();
        let mut state = self.state();
        if state.idle.len() < MAX_IDLE {
            state.idle.push(Idle { conn, since });
        }
    }

    async fn connect(&self) -> Result<Conn, EndpointError> {
        let connect = TcpStream::connect((self.host.as_str(), self.port));
        let io = match tokio::time::timeout(CONNECT_TIMEOUT, connect).await {
            Ok(Ok(stream)) => stream,
            Ok(Err(e)) => {
                // A proxied request that cannot connect counts as a missed heartbeat.
                self.partition.record_miss();
                return Err(self.error(format!("cannot connect: {e}")));
            }
            Err(_) => {
                self.partition.record_miss();
                return Err(self.error(format!(
                    "cannot connect: no answer within {} ms",
                    CONNECT_TIMEOUT.as_millis()
                )));
            }
        };
        let _ = io.set_nodelay(true);
        Ok(Conn {
            io,
            read: BytesMut::new(),
            write: BytesMut::new(),
        })
    }

    /// Sends `out` on one of this partition's connections and returns the answer once its
    /// head arrived, with a body that reads the rest. A connection taken from the idle list
    /// that fails before any byte of an answer (the partition closed it meanwhile) is given
    /// up and the read sent again on a new one, when it can be: a read without a body.
    pub(crate) async fn send(
        self: &Arc<Self>,
        mut out: Outgoing<'_>,
    ) -> Result<Response<ReadBody>, EndpointError> {
        let sent_at = Instant::now();
        let _load = InFlight::start(self, sent_at);
        loop {
            let (mut conn, reused) = match self.checkout() {
                Some(conn) => (conn, true),
                None => (self.connect().await?, false),
            };
            let (written, head_request) = match &mut out {
                Outgoing::Bodiless(parts) => (
                    conn.write_bodiless(parts, self.authority.as_ref()).await,
                    parts.method == Method::HEAD,
                ),
                Outgoing::WithBody(slot) => {
                    let Some(req) = slot.take() else {
                        return Err(self.error("the read's body was already sent".into()));
                    };
                    let head_request = req.method() == Method::HEAD;
                    (
                        conn.write_with_body(req, self.authority.as_ref()).await,
                        head_request,
                    )
                }
            };
            let failed = match written {
                Ok(()) => match conn.read_head(head_request).await {
                    Ok(head) => return Ok(self.answer(conn, head)),
                    Err(failed) => failed,
                },
                Err(reason) => Failed {
                    reason,
                    answered: false,
                },
            };
            if !(reused && !failed.answered && out.bodiless()) {
                return Err(self.error(failed.reason));
            }
            // The partition closed an idle connection (it may have restarted): the others
            // idle beside it are as likely closed, so the next one is new.
            self.state().idle.clear();
            tracing::debug!(partition = %self.partition.name(), error = %failed.reason,
                "an idle connection failed before answering; sending the read on a new one");
        }
    }

    /// The answer of `head` read on `conn`, with its body. A body that came whole with the
    /// head is taken out at once and the connection given back.
    fn answer(self: &Arc<Self>, mut conn: Conn, head: Head) -> Response<ReadBody> {
        let Head {
            status,
            version,
            headers,
            body,
            keep_alive,
        } = head;
        let whole = match body {
            Framing::Empty => Some(None),
            Framing::Length(n) => usize::try_from(n)
                .ok()
                .filter(|&n| conn.read.len() >= n)
                .map(|n| Some(conn.read.split_to(n).freeze())),
            Framing::Chunked | Framing::Close => None,
        };
        let body = match whole {
            Some(data) => {
                self.release(conn, keep_alive);
                ReadBody::Whole(data)
            }
            None => ReadBody::Streaming(Streaming {
                conn: Some(conn),
                decoder: Decoder::new(body),
                endpoint: self.clone(),
                keep_alive,
            }),
        };
        let mut resp = Response::new(body);
        *resp.status_mut() = status;
        *resp.version_mut() = version;
        *resp.headers_mut() = headers;
        resp
    }

    /// Gives back a connection whose answer was read to its end, if it may carry another
    /// request (and nothing unasked for followed the answer).
    fn release(&self, conn: Conn, keep_alive: bool) {
        if keep_alive && conn.read.is_empty() {
            self.check_in(conn);
        }
    }
}

/// Why an exchange failed, and whether any byte of an answer had arrived.
struct Failed {
    reason: String,
    answered: bool,
}

impl Conn {
    /// Whether an idle connection can carry a request: nothing to read on it (bytes would
    /// answer no request; the end of the stream: the partition closed it). No system call
    /// unless the socket was seen readable since the last read drained it.
    fn still_open(&mut self) -> bool {
        let mut probe = [0u8; 1];
        self.read.is_empty()
            && matches!(self.io.try_read(&mut probe),
                Err(e) if e.kind() == io::ErrorKind::WouldBlock)
    }

    /// Writes the buffered request bytes.
    async fn flush(&mut self) -> Result<(), String> {
        h1::write_out(&mut self.io, &mut self.write)
            .await
            .map_err(|e| format!("cannot send the read: {e}"))
    }

    /// Writes a read without a body, from its parts (no copy of its headers).
    async fn write_bodiless(
        &mut self,
        parts: &http::request::Parts,
        host: Option<&HeaderValue>,
    ) -> Result<(), String> {
        h1::write_request_head(&mut self.write, parts, host, Framing::Empty);
        self.flush().await
    }

    /// Writes a read with its body: as long as its `Content-Length` says, or as its size
    /// is known, else chunked.
    async fn write_with_body(
        &mut self,
        req: Request<ProxyBody>,
        host: Option<&HeaderValue>,
    ) -> Result<(), String> {
        let (parts, mut body) = req.into_parts();
        let declared = h1::declared_length(&parts.headers)
            .map_err(|()| "the read's content-length is not a number")?;
        let framing = match (declared, body.size_hint().exact()) {
            (Some(_), _) => Framing::Empty,
            (None, _) if body.is_end_stream() => Framing::Empty,
            (None, Some(n)) => Framing::Length(n),
            (None, None) => Framing::Chunked,
        };
        h1::write_request_head(&mut self.write, &parts, host, framing);
        h1::write_message(&mut self.io, &mut self.write, &mut body, framing, declared)
            .await
            .map_err(|e| format!("cannot send the read: {e}"))
    }

    /// Reads until the answer's head is complete and parses it.
    async fn read_head(&mut self, head_request: bool) -> Result<Head, Failed> {
        let mut answered = false;
        loop {
            if !self.read.is_empty() {
                answered = true;
                match h1::parse_head(&mut self.read, head_request) {
                    Ok(Some(head)) => return Ok(head),
                    Ok(None) => {}
                    Err(e) => {
                        return Err(Failed {
                            reason: e.to_string(),
                            answered,
                        });
                    }
                }
            }
            self.read.reserve(READ_AHEAD);
            match self.io.read_buf(&mut self.read).await {
                Ok(0) => {
                    return Err(Failed {
                        reason: "the connection closed before the answer".into(),
                        answered,
                    });
                }
                Ok(_) => {}
                Err(e) => {
                    return Err(Failed {
                        reason: format!("cannot read the answer: {e}"),
                        answered,
                    });
                }
            }
        }
    }

    /// Reads more of an answer's body; 0 at the end of the stream.
    fn poll_read_more(&mut self, cx: &mut Context<'_>) -> Poll<io::Result<usize>> {
        if self.read.capacity() - self.read.len() < READ_AHEAD / 4 {
            self.read.reserve(READ_AHEAD);
        }
        std::pin::pin!(self.io.read_buf(&mut self.read)).poll(cx)
    }
}

/// A read in flight at an endpoint: counted in its load until it is dropped (the answer's
/// headers arrived, it failed, or it was given up).
struct InFlight<'a> {
    endpoint: &'a Endpoint,
    sent_at: Instant,
}

impl<'a> InFlight<'a> {
    fn start(endpoint: &'a Endpoint, sent_at: Instant) -> Self {
        endpoint.state().load.start();
        InFlight { endpoint, sent_at }
    }
}

impl Drop for InFlight<'_> {
    fn drop(&mut self) {
        let now = Instant::now();
        self.endpoint.state().load.complete(self.sent_at, now);
    }
}

/// An answer's body from a partition: whole (it came with the head), or read from its
/// connection as it is polled, which goes back to its partition's idle list once the body
/// ended (when the partition keeps it open). Dropped early, it closes the connection.
pub(crate) enum ReadBody {
    /// The whole body (`None` once taken, or for an answer without one).
    Whole(Option<Bytes>),
    /// The body still on its connection.
    Streaming(Streaming),
}

/// A body still being read from its connection.
pub(crate) struct Streaming {
    /// `None` once the body ended or failed.
    conn: Option<Conn>,
    decoder: Decoder,
    endpoint: Arc<Endpoint>,
    keep_alive: bool,
}

impl Streaming {
    fn poll_data(&mut self, cx: &mut Context<'_>) -> Poll<Option<Result<Bytes, BoxError>>> {
        loop {
            let Some(conn) = self.conn.as_mut() else {
                return Poll::Ready(None);
            };
            match self.decoder.decode(&mut conn.read) {
                Ok(Decoded::Data(data)) => {
                    if self.decoder.is_done() {
                        self.finish();
                    }
                    return Poll::Ready(Some(Ok(data)));
                }
                Ok(Decoded::End) => {
                    self.finish();
                    return Poll::Ready(None);
                }
                Ok(Decoded::More) => {}
                Err(e) => return Poll::Ready(Some(Err(self.fail(e)))),
            }
            match ready!(conn.poll_read_more(cx)) {
                Ok(0) => {
                    self.conn = None;
                    return match self.decoder.eof() {
                        Ok(()) => Poll::Ready(None),
                        Err(e) => Poll::Ready(Some(Err(Box::new(e)))),
                    };
                }
                Ok(_) => {}
                Err(e) => return Poll::Ready(Some(Err(self.fail(e)))),
            }
        }
    }

    /// The body ended: the connection goes back.
    fn finish(&mut self) {
        if let Some(conn) = self.conn.take() {
            self.endpoint.release(conn, self.keep_alive);
        }
    }

    /// The body failed: the connection is closed.
    fn fail(&mut self, e: impl Into<BoxError>) -> BoxError {
        self.conn = None;
        e.into()
    }
}

impl Body for ReadBody {
    type Data = Bytes;
    type Error = BoxError;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, BoxError>>> {
        match self.get_mut() {
            ReadBody::Whole(data) => Poll::Ready(data.take().map(|d| Ok(Frame::data(d)))),
            ReadBody::Streaming(s) => s.poll_data(cx).map(|d| d.map(|d| d.map(Frame::data))),
        }
    }

    fn is_end_stream(&self) -> bool {
        match self {
            ReadBody::Whole(data) => data.is_none(),
            ReadBody::Streaming(s) => s.decoder.is_done(),
        }
    }

    fn size_hint(&self) -> SizeHint {
        let exact = match self {
            ReadBody::Whole(data) => Some(data.as_ref().map_or(0, |d| d.len() as u64)),
            ReadBody::Streaming(s) => s.decoder.remaining(),
        };
        exact.map_or_else(SizeHint::default, SizeHint::with_exact)
    }
}

/// Prepares a partition's answer for the client: hop-by-hop headers dropped, one box.
pub(crate) fn client_response(resp: Response<ReadBody>) -> Response<ProxyBody> {
    let (mut parts, body) = resp.into_parts();
    strip_hop_by_hop(&mut parts.headers);
    Response::from_parts(parts, body.boxed_unsync())
}

/// An endpoint for a test upstream listening on `addr`, as partition `name`.
#[cfg(test)]
fn endpoint_at(addr: std::net::SocketAddr, name: &str) -> Arc<Endpoint> {
    let url = format!("http://{addr}");
    let spec = regroup_replay::MemberSpec {
        name: name.into(),
        url: url.clone(),
        host: None,
        priority: 0,
    };
    let base = url.parse().unwrap_or_else(|e| panic!("{url}: {e}"));
    Arc::new(Endpoint::new(Arc::new(Partition::new(&spec, base, 0))))
}

#[cfg(test)]
mod wire_tests;

#[cfg(test)]
mod tests {
    use std::sync::atomic::{AtomicUsize, Ordering};

    use http_body_util::BodyExt;
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    use tokio::net::TcpListener;

    use super::*;

    /// How a test upstream answers.
    #[derive(Clone, Copy)]
    enum Answer {
        /// `ok`, keeping the connection open.
        KeepAlive,
        /// `ok`, then closes the connection (without saying so).
        ThenClose,
        /// `ok` with `Connection: close`.
        SaysClose,
        /// A body of 256 KiB.
        Large,
        /// Never.
        Never,
    }

    /// A raw HTTP/1.1 upstream on 127.0.0.1:0 that counts the connections it accepted.
    async fn upstream(answer: Answer) -> (Arc<Endpoint>, Arc<AtomicUsize>) {
        let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
        let addr = listener.local_addr().expect("addr");
        let accepted = Arc::new(AtomicUsize::new(0));
        let count = accepted.clone();
        tokio::spawn(async move {
            while let Ok((mut stream, _)) = listener.accept().await {
                count.fetch_add(1, Ordering::SeqCst);
                tokio::spawn(async move {
                    let mut buf = Vec::new();
                    let mut chunk = [0u8; 1024];
                    loop {
                        let Ok(n) = stream.read(&mut chunk).await else {
                            return;
                        };
                        if n == 0 {
                            return;
                        }
                        buf.extend_from_slice(&chunk[..n]);
                        // One request head at a time (the tests send no bodies).
                        while let Some(end) = buf.windows(4).position(|w| w == b"\r\n\r\n") {
                            buf.drain(..end + 4);
                            let reply: Vec<u8> = match answer {
                                Answer::KeepAlive | Answer::ThenClose => {
                                    b"HTTP/1.1 200 OK\r\ncontent-length: 2\r\n\r\nok".to_vec()
                                }
                                Answer::SaysClose => b"HTTP/1.1 200 OK\r\ncontent-length: 2\r\nconnection: close\r\n\r\nok".to_vec(),
                                Answer::Large => {
                                    let mut r = b"HTTP/1.1 200 OK\r\ncontent-length: 262144\r\n\r\n".to_vec();
                                    r.resize(r.len() + 262_144, b'x');
                                    r
                                }
                                Answer::Never => continue,
                            };
                            if stream.write_all(&reply).await.is_err() {
                                return;
                            }
                            if matches!(answer, Answer::ThenClose | Answer::SaysClose) {
                                return;
                            }
                        }
                    }
                });
            }
        });
        (endpoint_at(addr, "a"), accepted)
    }

    fn get(path: &str) -> http::request::Parts {
        Request::get(path).body(()).expect("request").into_parts().0
    }

    /// One read, its body read to the end.
    async fn read(endpoint: &Arc<Endpoint>) -> String {
        let parts = get("/health");
        let resp = endpoint
            .send(Outgoing::Bodiless(&parts))
            .await
            .expect("answer");
        assert_eq!(resp.status(), 200);
        let body = resp.into_body().collect().await.expect("body").to_bytes();
        String::from_utf8_lossy(&body).into_owned()
    }

    #[tokio::test]
    async fn sequential_reads_share_one_connection() {
        let (endpoint, accepted) = upstream(Answer::KeepAlive).await;
        for _ in 0..20 {
            assert_eq!(read(&endpoint).await, "ok");
            assert_eq!(endpoint.idle(), 1, "back in the idle list after its body");
        }
        assert_eq!(accepted.load(Ordering::SeqCst), 1);
    }

    #[tokio::test]
    async fn a_connection_the_partition_closed_is_not_reused() {
        let (endpoint, accepted) = upstream(Answer::ThenClose).await;
        for _ in 0..10 {
            assert_eq!(read(&endpoint).await, "ok");
        }
        assert_eq!(
            accepted.load(Ordering::SeqCst),
            10,
            "one connection per read"
        );
    }

    #[tokio::test]
    async fn a_connection_close_answer_is_not_kept() {
        let (endpoint, accepted) = upstream(Answer::SaysClose).await;
        for _ in 0..5 {
            assert_eq!(read(&endpoint).await, "ok");
            assert_eq!(endpoint.idle(), 0);
        }
        assert_eq!(accepted.load(Ordering::SeqCst), 5);
    }

    #[tokio::test]
    async fn a_body_not_read_to_its_end_closes_its_connection() {
        let (endpoint, accepted) = upstream(Answer::Large).await;
        let parts = get("/big");
        let resp = endpoint
            .send(Outgoing::Bodiless(&parts))
            .await
            .expect("answer");
        let mut body = resp.into_body();
        let first = body.frame().await.expect("a frame").expect("data");
        assert!(first.into_data().is_ok_and(|d| !d.is_empty()));
        drop(body);
        assert_eq!(
            endpoint.idle(),
            0,
            "a half-read body's connection is not kept"
        );
        let whole = read(&endpoint).await;
        assert_eq!(whole.len(), 262_144);
        assert_eq!(endpoint.idle(), 1, "a body read to its end keeps it");
        assert_eq!(accepted.load(Ordering::SeqCst), 2);
    }

    #[tokio::test]
    async fn a_read_given_up_closes_its_connection_and_leaves_no_load() {
        let (endpoint, accepted) = upstream(Answer::Never).await;
        let parts = get("/stall");
        let given_up = tokio::time::timeout(
            Duration::from_millis(100),
            endpoint.send(Outgoing::Bodiless(&parts)),
        )
        .await;
        assert!(given_up.is_err(), "the upstream never answers");
        assert_eq!(endpoint.idle(), 0);
        assert_eq!(
            endpoint.state().load.pending,
            0,
            "no read in flight any more"
        );
        assert_eq!(accepted.load(Ordering::SeqCst), 1);
    }

    #[tokio::test]
    async fn a_refused_connection_is_a_missed_heartbeat() {
        // A port that was just free: nothing listens there.
        let addr = TcpListener::bind("127.0.0.1:0")
            .await
            .expect("bind")
            .local_addr()
            .expect("addr");
        let url = format!("http://{addr}");
        let spec = regroup_replay::MemberSpec {
            name: "gone".into(),
            url: url.clone(),
            host: None,
            priority: 0,
        };
        let partition = Arc::new(Partition::new(&spec, url.parse().expect("uri"), 0));
        partition.set_health(crate::partition::Health::Up);
        let endpoint = Arc::new(Endpoint::new(partition.clone()));
        let parts = get("/health");
        let e = endpoint.send(Outgoing::Bodiless(&parts)).await.err();
        assert!(
            e.as_ref()
                .is_some_and(|e| e.reason.starts_with("cannot connect")),
            "{e:?}"
        );
        assert_eq!(partition.health(), crate::partition::Health::Missed(1));
    }

    #[tokio::test(start_paused = true)]
    async fn peak_ewma_jumps_to_a_slow_answer_and_decays() {
        let t0 = Instant::now();
        let mut load = PeakEwma::new(t0);
        let base = load.cost(t0);
        assert!((base - 1e6).abs() < 1.0, "1 ms at first: {base}");
        load.start();
        assert!(
            (load.cost(t0) - 2e6).abs() < 1.0,
            "one in flight doubles it"
        );
        // A 50 ms answer: the estimate jumps to it.
        let t1 = t0 + Duration::from_millis(50);
        load.complete(t0, t1);
        assert!((load.cost(t1) - 50e6).abs() < 1.0);
        // Fast answers afterwards pull it back down over the decay time.
        let mut t = t1;
        for _ in 0..100 {
            load.start();
            let sent = t;
            t += Duration::from_millis(100);
            load.complete(sent + Duration::from_millis(99), t);
        }
        let after = load.cost(t);
        assert!(after < 25e6 && after > 1e6, "{after}");
    }
}
