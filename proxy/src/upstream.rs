//! The read path's upstream connections: HTTP/1 connections to one partition, kept per
//! balancer (so per client thread), each driven by the read that uses it.
//!
//! A read takes an idle connection of the partition it was balanced to (or opens one),
//! sends its request and polls the connection beside the request until the answer's headers
//! arrive, then beside the answer's body ([`ReadBody`]): no task per connection, no pool
//! shared between threads, no pool key. A connection goes back to its partition's idle list
//! only once the answer's body was read to its end and hyper keeps the connection open (an
//! answer with `Connection: close`, a body dropped early, an error: the connection is
//! closed). A connection idle for [`IDLE_TIMEOUT`] is closed.
//!
//! The partition's load is tower's peak-EWMA ([`PeakEwma`]), kept with its connections.

use std::future::Future;
use std::pin::Pin;
use std::sync::{Arc, Mutex, MutexGuard};
use std::task::{Context, Poll};
use std::time::Duration;

use bytes::Bytes;
use http::header::{self, HeaderValue};
use http::{Request, Response};
use http_body::{Body, Frame, SizeHint};
use http_body_util::BodyExt;
use hyper::body::Incoming;
use hyper::client::conn::http1;
use hyper_util::rt::TokioIo;
use tokio::net::TcpStream;
use tokio::time::Instant;

use crate::forward::{BoxError, ProxyBody, strip_hop_by_hop};
use crate::link::error_chain;
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

type Conn = http1::Connection<TokioIo<TcpStream>, ProxyBody>;
type Sender = http1::SendRequest<ProxyBody>;

/// One open connection: the sender of its requests and the connection itself, which only
/// moves when it is polled.
struct Pooled {
    sender: Sender,
    conn: Conn,
}

struct Idle {
    pooled: Pooled,
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
    /// The request to send, if there is one still to send.
    fn take(&mut self) -> Option<Request<ProxyBody>> {
        match self {
            Outgoing::Bodiless(parts) => {
                // Method, URI, version and headers: the extensions stay behind (hyper does
                // not send them) and the body is empty (no allocation).
                let mut req = Request::new(empty());
                *req.method_mut() = parts.method.clone();
                *req.uri_mut() = parts.uri.clone();
                *req.version_mut() = parts.version;
                *req.headers_mut() = parts.headers.clone();
                Some(req)
            }
            Outgoing::WithBody(req) => req.take(),
        }
    }

    /// Gives back a request that was not sent.
    fn put_back(&mut self, req: Request<ProxyBody>) {
        if let Outgoing::WithBody(slot) = self {
            *slot = Some(req);
        }
    }

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
    fn checkout(&self) -> Option<Pooled> {
        let now = Instant::now();
        let mut state = self.state();
        while let Some(idle) = state.idle.pop() {
            if now.saturating_duration_since(idle.since) < IDLE_TIMEOUT
                && !idle.pooled.sender.is_closed()
            {
                return Some(idle.pooled);
            }
        }
        None
    }

    fn check_in(&self, pooled: Pooled) {
        let since = Instant::now();
        let mut state = self.state();
        if state.idle.len() < MAX_IDLE {
            state.idle.push(Idle { pooled, since });
        }
    }

    async fn connect(&self) -> Result<Pooled, EndpointError> {
        let connect = TcpStream::connect((self.host.as_str(), self.port));
        let stream = match tokio::time::timeout(CONNECT_TIMEOUT, connect).await {
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
        let _ = stream.set_nodelay(true);
        let (sender, conn) = http1::Builder::new()
            .handshake(TokioIo::new(stream))
            .await
            .map_err(|e| self.error(error_chain(&e)))?;
        Ok(Pooled { sender, conn })
    }

    /// An idle connection that is still open and ready (each polled once, so that one the
    /// partition closed meanwhile is seen closed), or a new one; and whether it was reused.
    async fn connection(&self) -> Result<(Pooled, bool), EndpointError> {
        while let Some(mut pooled) = self.checkout() {
            let closed = std::future::poll_fn(|cx| {
                Poll::Ready(Pin::new(&mut pooled.conn).poll(cx).is_ready())
            })
            .await;
            if !closed && pooled.sender.is_ready() {
                return Ok((pooled, true));
            }
        }
        Ok((self.connect().await?, false))
    }

    /// Sends `out` on one of this partition's connections and returns the answer once its
    /// headers arrived, with a body that drives the connection. A connection taken from the
    /// idle list that fails before answering (the partition closed it meanwhile) is given
    /// up and the read sent again on a new one, when it can be: not sent yet, or bodiless.
    pub(crate) async fn send(
        self: &Arc<Self>,
        mut out: Outgoing<'_>,
    ) -> Result<Response<ReadBody>, EndpointError> {
        let sent_at = Instant::now();
        let _load = InFlight::start(self, sent_at);
        loop {
            let (pooled, reused) = self.connection().await?;
            let Some(mut req) = out.take() else {
                return Err(self.error("the read's body was already sent".into()));
            };
            if req.uri().scheme().is_some() || req.uri().authority().is_some() {
                // Origin form on the wire, as a client of a partition (not of a proxy) sends.
                let pq = req
                    .uri()
                    .path_and_query()
                    .cloned()
                    .unwrap_or_else(|| http::uri::PathAndQuery::from_static("/"));
                *req.uri_mut() = http::Uri::from(pq);
            }
            if !req.headers().contains_key(header::HOST)
                && let Some(host) = &self.authority
            {
                req.headers_mut().insert(header::HOST, host.clone());
            }
            match exchange(pooled, req).await {
                Ok((resp, sender, conn)) => {
                    let endpoint = self.clone();
                    return Ok(resp.map(|incoming| ReadBody {
                        incoming,
                        conn,
                        sender: Some(sender),
                        endpoint,
                        ended: false,
                    }));
                }
                Err(Failed { error, unsent }) => {
                    let again = reused && (unsent.is_some() || out.bodiless());
                    if let Some(req) = unsent {
                        out.put_back(req);
                    }
                    if !again {
                        return Err(self.error(error));
                    }
                    // The partition closed an idle connection (it may have restarted): the
                    // others idle beside it are as likely closed, so the next one is new.
                    self.state().idle.clear();
                    tracing::debug!(partition = %self.partition.name(), %error,
                        "an idle connection failed before answering; sending the read on a new one");
                }
            }
        }
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

/// An exchange that failed: why, and the request when it was not sent.
struct Failed {
    error: String,
    unsent: Option<Request<ProxyBody>>,
}

/// Sends `req` on `pooled` and polls the connection until the answer's headers arrive.
async fn exchange(
    pooled: Pooled,
    req: Request<ProxyBody>,
) -> Result<(Response<Incoming>, Sender, Option<Conn>), Failed> {
    let Pooled { mut sender, conn } = pooled;
    let mut conn = Some(conn);
    let answer = sender.try_send_request(req);
    let mut answer = std::pin::pin!(answer);
    let result = std::future::poll_fn(|cx| {
        // The connection first: it writes the request and reads the answer, which the
        // answer's future then finds at once.
        if let Some(c) = conn.as_mut()
            && Pin::new(c).poll(cx).is_ready()
        {
            conn = None;
        }
        match answer.as_mut().poll(cx) {
            Poll::Ready(r) => Poll::Ready(Some(r)),
            // The connection ended without settling the request (hyper settles it first).
            Poll::Pending if conn.is_none() => Poll::Ready(None),
            Poll::Pending => Poll::Pending,
        }
    })
    .await;
    match result {
        Some(Ok(resp)) => Ok((resp, sender, conn)),
        Some(Err(mut e)) => Err(Failed {
            unsent: e.take_message(),
            error: error_chain(&e.into_error()),
        }),
        None => Err(Failed {
            error: "the connection closed before the answer".into(),
            unsent: None,
        }),
    }
}

/// An answer's body from a partition. Polling it polls its connection too; read to its
/// end, it gives the connection back to its partition's idle list (when still open).
pub(crate) struct ReadBody {
    incoming: Incoming,
    conn: Option<Conn>,
    sender: Option<Sender>,
    endpoint: Arc<Endpoint>,
    /// The body was read to its end.
    ended: bool,
}

impl ReadBody {
    /// Gives the connection back, if the body was read to its end and it is still open.
    fn finish(&mut self) {
        if !(self.ended || self.incoming.is_end_stream()) {
            return;
        }
        if let (Some(sender), Some(conn)) = (self.sender.take(), self.conn.take())
            && !sender.is_closed()
        {
            self.endpoint.check_in(Pooled { sender, conn });
        }
    }
}

impl Body for ReadBody {
    type Data = Bytes;
    type Error = BoxError;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, BoxError>>> {
        let this = self.get_mut();
        if let Some(conn) = this.conn.as_mut()
            && Pin::new(conn).poll(cx).is_ready()
        {
            // Closed (after this answer, or broken): what it read is still in the body.
            this.conn = None;
        }
        match Pin::new(&mut this.incoming).poll_frame(cx) {
            Poll::Ready(None) => {
                this.ended = true;
                Poll::Ready(None)
            }
            Poll::Ready(Some(Ok(frame))) => Poll::Ready(Some(Ok(frame))),
            Poll::Ready(Some(Err(e))) => {
                this.conn = None;
                this.sender = None;
                Poll::Ready(Some(Err(e.into())))
            }
            Poll::Pending => Poll::Pending,
        }
    }

    fn is_end_stream(&self) -> bool {
        self.incoming.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        self.incoming.size_hint()
    }
}

impl Drop for ReadBody {
    fn drop(&mut self) {
        self.finish();
    }
}

/// Prepares a partition's answer for the client: hop-by-hop headers dropped, one box.
pub(crate) fn client_response(resp: Response<ReadBody>) -> Response<ProxyBody> {
    let (mut parts, body) = resp.into_parts();
    strip_hop_by_hop(&mut parts.headers);
    Response::from_parts(parts, body.boxed_unsync())
}

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
        let url = format!("http://{addr}");
        let spec = regroup_replay::MemberSpec {
            name: "a".into(),
            url: url.clone(),
            host: None,
            priority: 0,
        };
        let partition = Partition::new(&spec, url.parse().expect("uri"), 0);
        (Arc::new(Endpoint::new(Arc::new(partition))), accepted)
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
