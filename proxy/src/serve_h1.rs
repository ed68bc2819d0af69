//! A client connection on a client thread, served by the proxy's own HTTP/1 while its
//! requests are simple reads, by hyper from the first request that is not.
//!
//! A simple read ([`h1::RequestHead::Simple`]: `GET` or `HEAD`, HTTP/1.1, no body, no
//! `Expect` or `Upgrade`, within the head limits) is parsed from the connection's buffer,
//! sent through the client-facing stack like any request, and its answer written back (its
//! body as it comes: by its length, or chunked). Anything else, a malformed or oversized
//! head included, hands the connection with what was read of it to hyper's HTTP/1 server
//! for the rest of its life, so that updates, bodies, `Expect: 100-continue`, HTTP/1.0
//! and every error answer (400, 431) stay hyper's. The head time-out
//! (`header_read_timeout_ms`) closes a connection whose next head does not arrive in time,
//! as hyper's does; a stopping thread closes an idle connection at once and one busy after
//! its answer.
//!
//! Why: hyper's server side cost the proxy ~15k of the ~30k instructions of a proxied read,
//! nginx's whole proxied read is 19k (BENCHMARKS.md).

use std::io;
use std::pin::Pin;
use std::task::{Context, Poll};
use std::time::Duration;

use bytes::{Bytes, BytesMut};
use http::header::HeaderValue;
use http::{Method, Response, StatusCode};
use http_body::Body;
use hyper::body::Incoming;
use hyper_util::rt::TokioIo;
use hyper_util::server::graceful::Watcher;
use hyper_util::service::TowerToHyperService;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt, ReadBuf};
use tokio::net::TcpStream;
use tokio::time::Instant;
use tower::ServiceExt;

use crate::forward::ProxyBody;
use crate::h1::{self, Framing, RequestHead};
use crate::server::{ClientBody, ClientService, client_body};

/// Room made in the connection's read buffer before each read.
const READ_AHEAD: usize = 8 * 1024;

/// What every connection of a client thread shares.
#[derive(Clone)]
pub(crate) struct Setup {
    /// hyper's server, for the connections handed over.
    pub(crate) http1: hyper::server::conn::http1::Builder,
    pub(crate) max_header_bytes: usize,
    pub(crate) max_headers: usize,
    pub(crate) header_read_timeout: Duration,
    pub(crate) body_read_timeout: Duration,
    /// Says when the thread stops.
    pub(crate) stop: tokio::sync::watch::Receiver<bool>,
}

/// Serves `io` until the client closes it, its head time-out, a failure, or the thread
/// stops; `watcher` watches it once handed to hyper.
pub(crate) async fn serve<S: ClientService<ClientBody<Incoming>>>(
    io: TcpStream,
    stack: S,
    setup: Setup,
    watcher: Watcher,
) {
    let mut conn = Conn {
        io,
        read: BytesMut::new(),
        write: BytesMut::new(),
        setup,
    };
    match conn.serve_simple(&stack).await {
        Ok(Next::Close) => {}
        Ok(Next::HandOver) => {
            let Conn {
                io, read, setup, ..
            } = conn;
            let timeout = setup.body_read_timeout;
            let svc = TowerToHyperService::new(
                tower::ServiceBuilder::new()
                    .map_request(move |req| client_body(req, timeout))
                    .service(stack),
            );
            let io = Rewind {
                first: read.freeze(),
                io,
            };
            let served = watcher.watch(setup.http1.serve_connection(TokioIo::new(io), svc));
            if let Err(e) = served.await {
                tracing::debug!(error = %e, "client connection ended with an error");
            }
        }
        Err(e) => tracing::debug!(error = %e, "client connection ended with an error"),
    }
}

/// What follows the simple requests of a connection.
enum Next {
    Close,
    HandOver,
}

struct Conn {
    io: TcpStream,
    read: BytesMut,
    write: BytesMut,
    setup: Setup,
}

impl Conn {
    /// Serves simple requests until one is not, or the connection ends.
    async fn serve_simple<S: ClientService<ClientBody<Incoming>>>(
        &mut self,
        stack: &S,
    ) -> io::Result<Next> {
        // One timer for the connection's head time-out, moved only when it fires early
        // (each wait moves the deadline, not the timer).
        let mut timer: Option<Pin<Box<tokio::time::Sleep>>> = None;
        loop {
            let (req, close) = match self.next_head(&mut timer).await? {
                Some(RequestHead::Simple(req, close)) => (req, close),
                Some(_) => return Ok(Next::HandOver),
                None => return Ok(Next::Close),
            };
            let head_request = req.method() == Method::HEAD;
            let resp = stack
                .clone()
                .oneshot(req.map(|()| ClientBody::Empty))
                .await
                .map_err(io::Error::other)?;
            let close = close || *self.setup.stop.borrow();
            self.answer(resp, head_request, close).await?;
            if close {
                let _ = self.io.shutdown().await;
                return Ok(Next::Close);
            }
        }
    }

    /// The next request's head (`None`: the client closed, its head timed out, or the
    /// thread stops while the connection is idle).
    async fn next_head(
        &mut self,
        timer: &mut Option<Pin<Box<tokio::time::Sleep>>>,
    ) -> io::Result<Option<RequestHead>> {
        let mut deadline = None;
        loop {
            if !self.read.is_empty() {
                match h1::parse_request(
                    &mut self.read,
                    self.setup.max_header_bytes,
                    self.setup.max_headers,
                ) {
                    RequestHead::Partial => {}
                    head => return Ok(Some(head)),
                }
            }
            let deadline =
                *deadline.get_or_insert_with(|| Instant::now() + self.setup.header_read_timeout);
            let sleep = timer.get_or_insert_with(|| Box::pin(tokio::time::sleep_until(deadline)));
            self.read.reserve(READ_AHEAD);
            let idle = self.read.is_empty();
            tokio::select! {
                biased;
                read = self.io.read_buf(&mut self.read) => {
                    if read? == 0 {
                        return Ok(None);
                    }
                }
                () = sleep.as_mut() => {
                    if Instant::now() >= deadline {
                        tracing::debug!("client head not received in time; closing");
                        return Ok(None);
                    }
                    sleep.as_mut().reset(deadline);
                }
                _ = self.setup.stop.wait_for(|stop| *stop), if idle => return Ok(None),
            }
        }
    }

    /// Writes `resp` (its head, and its body unless the request was `HEAD`).
    async fn answer(
        &mut self,
        resp: Response<ProxyBody>,
        head_request: bool,
        close: bool,
    ) -> io::Result<()> {
        let (parts, mut body) = resp.into_parts();
        let status = parts.status;
        let bodiless = head_request
            || status.is_informational()
            || status == StatusCode::NO_CONTENT
            || status == StatusCode::NOT_MODIFIED;
        // The length the answer declares, which its body must then have.
        let declared = h1::declared_length(&parts.headers).unwrap_or(None);
        let framing = match (bodiless, declared, body.size_hint().exact()) {
            (true, _, _) | (false, Some(_), _) => Framing::Empty,
            (false, None, Some(n)) => Framing::Length(n),
            (false, None, None) => Framing::Chunked,
        };
        h1::write_response_head(
            &mut self.write,
            status,
            &parts.headers,
            framing,
            &date(),
            close,
        );
        if bodiless {
            return self.flush().await;
        }
        h1::write_message(&mut self.io, &mut self.write, &mut body, framing, declared)
            .await
            .map_err(|e| io::Error::other(format!("an answer to a client: {e}")))
    }

    async fn flush(&mut self) -> io::Result<()> {
        h1::write_out(&mut self.io, &mut self.write).await
    }
}

thread_local! {
    /// The `date` of this second, made once per second and thread.
    static DATE: std::cell::RefCell<(u64, HeaderValue)> =
        const { std::cell::RefCell::new((0, HeaderValue::from_static(""))) };
}

/// The `date` header's value now (RFC 9110's IMF-fixdate).
fn date() -> HeaderValue {
    let now = std::time::SystemTime::now();
    let second = now
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_secs());
    DATE.with(|cell| {
        let mut cached = cell.borrow_mut();
        if cached.0 != second {
            let text = httpdate::fmt_http_date(now);
            cached.1 =
                HeaderValue::from_str(&text).unwrap_or_else(|_| HeaderValue::from_static(""));
            cached.0 = second;
        }
        cached.1.clone()
    })
}

/// A connection handed to hyper: what was read of it first, then the connection.
struct Rewind {
    first: Bytes,
    io: TcpStream,
}

impl AsyncRead for Rewind {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        if !this.first.is_empty() {
            let n = this.first.len().min(buf.remaining());
            buf.put_slice(&this.first.split_to(n));
            return Poll::Ready(Ok(()));
        }
        Pin::new(&mut this.io).poll_read(cx, buf)
    }
}

impl AsyncWrite for Rewind {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.get_mut().io).poll_write(cx, buf)
    }

    fn poll_write_vectored(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.get_mut().io).poll_write_vectored(cx, bufs)
    }

    fn is_write_vectored(&self) -> bool {
        self.io.is_write_vectored()
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().io).poll_flush(cx)
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().io).poll_shutdown(cx)
    }
}
