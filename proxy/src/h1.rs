//! HTTP/1.1 on the read path's upstream connections, without I/O: a request's head
//! written into a buffer, an answer's head parsed (with httparse) and its body's framing
//! decoded (a length, chunked, or until the connection closes, RFC 9112 section 6), and a
//! client's simple request parsed and its answer's head written.
//! [`crate::upstream`] drives it over a partition's TCP connection.
//!
//! Hand-written because hyper's client costs the proxy as many instructions per read as
//! nginx spends on the whole proxied request (BENCHMARKS.md, "The proxy's own instructions
//! per request"); what it parses is only what the proxy's own partitions answer, and
//! anything it does not understand fails the read instead of guessing.

use std::mem::MaybeUninit;
use std::ops::Range;

use bytes::{Buf, BufMut, Bytes, BytesMut};
use http::header::{self, HeaderMap, HeaderName, HeaderValue};
use http::{StatusCode, Uri, Version};

/// Most header lines an answer may carry (hyper's default too).
const MAX_HEADERS: usize = 100;
/// The largest answer head accepted.
pub(crate) const MAX_HEAD: usize = 64 * 1024;
/// The longest chunk-size line or trailer line accepted.
const MAX_LINE: usize = 4 * 1024;

/// An answer the proxy cannot read.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub(crate) enum H1Error {
    /// The head is not HTTP/1.
    #[error("malformed answer head: {0}")]
    Head(String),
    /// The head is larger than [`MAX_HEAD`].
    #[error("answer head larger than {MAX_HEAD} bytes")]
    HeadTooLarge,
    /// `Content-Length` is not one number.
    #[error("malformed content-length in the answer")]
    ContentLength,
    /// The chunked body is malformed.
    #[error("malformed chunked answer body: {0}")]
    Chunk(&'static str),
    /// The partition switched protocols, which no read asks for.
    #[error("unexpected 101 Switching Protocols")]
    Switch,
    /// The connection closed before the body's end.
    #[error("the connection closed before the end of the answer's body")]
    CutShort,
}

/// How a message's body is delimited.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Framing {
    /// No body.
    Empty,
    /// Exactly this many bytes.
    Length(u64),
    /// Chunked transfer coding.
    Chunked,
    /// Until the connection closes (answers only).
    Close,
}

/// Writes a request's head: origin form, HTTP/1.1, the headers but the framing ones,
/// `host` when the request has none, and the framing header `body` asks for
/// ([`Framing::Empty`] keeps a `content-length` the headers carry).
pub(crate) fn write_request_head(
    buf: &mut BytesMut,
    parts: &http::request::Parts,
    host: Option<&HeaderValue>,
    body: Framing,
) {
    buf.put_slice(parts.method.as_str().as_bytes());
    buf.put_u8(b' ');
    let target = parts.uri.path_and_query().map_or("/", |pq| pq.as_str());
    buf.put_slice(target.as_bytes());
    buf.put_slice(b" HTTP/1.1\r\n");
    put_headers(buf, &parts.headers, body);
    if let Some(host) = host
        && !parts.headers.contains_key(header::HOST)
    {
        put_header(buf, b"host", host.as_bytes());
    }
    put_framing(buf, body);
    buf.put_slice(b"\r\n");
}

/// Writes `headers` but the framing ones the proxy sets itself (`Transfer-Encoding`,
/// `Connection`, and `Content-Length` unless `body` keeps it).
fn put_headers(buf: &mut BytesMut, headers: &HeaderMap, body: Framing) {
    for (name, value) in headers {
        let framing = *name == header::TRANSFER_ENCODING
            || *name == header::CONNECTION
            || (*name == header::CONTENT_LENGTH && body != Framing::Empty);
        if !framing {
            put_header(buf, name.as_str().as_bytes(), value.as_bytes());
        }
    }
}

/// Writes the framing header `body` asks for.
fn put_framing(buf: &mut BytesMut, body: Framing) {
    match body {
        Framing::Length(n) => put_header(buf, b"content-length", n.to_string().as_bytes()),
        Framing::Chunked => put_header(buf, b"transfer-encoding", b"chunked"),
        Framing::Empty | Framing::Close => {}
    }
}

fn put_header(buf: &mut BytesMut, name: &[u8], value: &[u8]) {
    buf.put_slice(name);
    buf.put_slice(b": ");
    buf.put_slice(value);
    buf.put_slice(b"\r\n");
}

/// A message is written whenever this much of its body is buffered (and a write buffer
/// grown past it is not kept).
pub(crate) const WRITE_AT: usize = 64 * 1024;

/// Writes what `buf` holds to `io` and empties it (the one piece of I/O here, shared by
/// both sides of the proxy's HTTP/1).
pub(crate) async fn write_out(
    io: &mut tokio::net::TcpStream,
    buf: &mut BytesMut,
) -> std::io::Result<()> {
    use tokio::io::AsyncWriteExt;
    let result = io.write_all(buf).await;
    buf.clear();
    if buf.capacity() > WRITE_AT {
        *buf = BytesMut::new();
    }
    result
}

/// Writes the head already in `buf`, then `body` as the head framed it (`framing`, and the
/// length its own headers `declared`), to `io`: whenever [`WRITE_AT`] is buffered, and at
/// the end. A body that fails, or does not have its length, is an error (the peer cannot
/// tell where the message ends: the connection must end).
pub(crate) async fn write_message<B>(
    io: &mut tokio::net::TcpStream,
    buf: &mut BytesMut,
    body: &mut B,
    framing: Framing,
    declared: Option<u64>,
) -> Result<(), String>
where
    B: http_body::Body<Data = Bytes> + Unpin,
    B::Error: std::fmt::Display,
{
    use http_body_util::BodyExt;
    let mut encoder = BodyEncoder::new(framing, declared);
    while let Some(frame) = body.frame().await {
        let frame = frame.map_err(|e| format!("its body failed: {e}"))?;
        let Ok(data) = frame.into_data() else {
            continue; // trailers: not forwarded
        };
        encoder.data(buf, &data);
        if buf.len() >= WRITE_AT {
            write_out(io, buf).await.map_err(|e| e.to_string())?;
        }
    }
    encoder.finish(buf)?;
    write_out(io, buf).await.map_err(|e| e.to_string())
}

/// Writes a message's body as its head framed it: chunked, or raw and then checked against
/// the length its head said.
struct BodyEncoder {
    chunked: bool,
    /// The length the head said (its own `Content-Length`, or the one written).
    length: Option<u64>,
    written: u64,
}

impl BodyEncoder {
    /// For a head written with `framing` whose own headers said `declared` bytes.
    fn new(framing: Framing, declared: Option<u64>) -> BodyEncoder {
        BodyEncoder {
            chunked: framing == Framing::Chunked,
            length: match framing {
                Framing::Length(n) => Some(n),
                _ => declared,
            },
            written: 0,
        }
    }

    /// Writes some of the body.
    fn data(&mut self, buf: &mut BytesMut, data: &[u8]) {
        self.written += data.len() as u64;
        if !self.chunked {
            buf.put_slice(data);
        } else if !data.is_empty() {
            // (An empty chunk would end the body.)
            buf.put_slice(format!("{:x}\r\n", data.len()).as_bytes());
            buf.put_slice(data);
            buf.put_slice(b"\r\n");
        }
    }

    /// Ends the body: the last chunk, or an error when it did not have its length.
    fn finish(&self, buf: &mut BytesMut) -> Result<(), String> {
        match self.length {
            _ if self.chunked => {
                buf.put_slice(b"0\r\n\r\n");
                Ok(())
            }
            Some(n) if n != self.written => Err(format!(
                "the body had {} bytes, its length said {n}",
                self.written
            )),
            _ => Ok(()),
        }
    }
}

/// An answer's head.
#[derive(Debug)]
pub(crate) struct Head {
    pub(crate) status: StatusCode,
    pub(crate) version: Version,
    pub(crate) headers: HeaderMap,
    /// How its body is delimited.
    pub(crate) body: Framing,
    /// Whether the connection may carry another request after this answer.
    pub(crate) keep_alive: bool,
}

/// Parses the answer's head at the front of `buf` and takes it (and any informational 1xx
/// answers before it) out of `buf`; `None` while the head is incomplete. The header values
/// share the head's bytes (no copy). `head_request`: the request was `HEAD` (no body).
pub(crate) fn parse_head(buf: &mut BytesMut, head_request: bool) -> Result<Option<Head>, H1Error> {
    loop {
        let mut slots = [MaybeUninit::<httparse::Header<'_>>::uninit(); MAX_HEADERS];
        let mut resp = httparse::Response::new(&mut []);
        let parsed = httparse::ParserConfig::default().parse_response_with_uninit_headers(
            &mut resp,
            &buf[..],
            &mut slots,
        );
        let len = match parsed {
            Ok(httparse::Status::Complete(len)) => len,
            Ok(httparse::Status::Partial) if buf.len() > MAX_HEAD => {
                return Err(H1Error::HeadTooLarge);
            }
            Ok(httparse::Status::Partial) => return Ok(None),
            Err(e) => return Err(H1Error::Head(e.to_string())),
        };
        let code = resp.code.unwrap_or(0);
        if code == 101 {
            return Err(H1Error::Switch);
        }
        if (100..200).contains(&code) {
            // Informational (100 Continue, 103 Early Hints): the answer follows.
            buf.advance(len);
            continue;
        }
        let status = StatusCode::from_u16(code).map_err(|e| H1Error::Head(e.to_string()))?;
        let version = if resp.version == Some(0) {
            Version::HTTP_10
        } else {
            Version::HTTP_11
        };
        let at = spans(buf, resp.headers);
        let head = buf.split_to(len).freeze();
        // The framing headers, noted on the way (no lookups afterwards).
        let mut seen = Framed::default();
        let headers = header_map(&head, at, |name, value| seen.note(name, value))?;
        let (body, delimited) = seen.framing(status, head_request);
        let keep_alive = delimited && version == Version::HTTP_11 && !seen.close;
        return Ok(Some(Head {
            status,
            version,
            headers,
            body,
            keep_alive,
        }));
    }
}

/// Where each header lies in `buf`, so that once `buf` is frozen the values can share its
/// bytes.
fn spans(buf: &[u8], headers: &[httparse::Header<'_>]) -> Vec<(Range<usize>, Range<usize>)> {
    let base = buf.as_ptr() as usize;
    headers
        .iter()
        .map(|h| {
            let name = h.name.as_ptr() as usize - base;
            let value = h.value.as_ptr() as usize - base;
            (name..name + h.name.len(), value..value + h.value.len())
        })
        .collect()
}

/// The headers lying at `spans` of `head` (values sharing its bytes), each shown to `note`
/// on the way.
fn header_map(
    head: &Bytes,
    spans: Vec<(Range<usize>, Range<usize>)>,
    mut note: impl FnMut(&HeaderName, &HeaderValue) -> Result<(), H1Error>,
) -> Result<HeaderMap, H1Error> {
    let mut headers = HeaderMap::with_capacity(spans.len());
    for (name, value) in spans {
        let name = HeaderName::from_bytes(&head[name])
            .map_err(|e| H1Error::Head(format!("header name: {e}")))?;
        let value = HeaderValue::from_maybe_shared(head.slice(value))
            .map_err(|e| H1Error::Head(format!("header {name}: {e}")))?;
        note(&name, &value)?;
        headers.append(name, value);
    }
    Ok(headers)
}

/// The length a message's `Content-Length` says: `Ok(None)` without one, `Err` when it is
/// not a number.
pub(crate) fn declared_length(headers: &HeaderMap) -> Result<Option<u64>, ()> {
    headers
        .get(header::CONTENT_LENGTH)
        .map(|v| {
            v.to_str()
                .ok()
                .and_then(|v| v.trim().parse::<u64>().ok())
                .ok_or(())
        })
        .transpose()
}

/// What an answer's headers say about its framing.
#[derive(Default)]
struct Framed {
    /// Whether the last transfer coding is chunked, once `Transfer-Encoding` was seen.
    chunked: Option<bool>,
    /// The `Content-Length` (all its values agree).
    length: Option<u64>,
    /// `Connection: close`.
    close: bool,
}

impl Framed {
    fn note(&mut self, name: &HeaderName, value: &HeaderValue) -> Result<(), H1Error> {
        if *name == header::CONTENT_LENGTH {
            for part in value.as_bytes().split(|&b| b == b',') {
                let n = std::str::from_utf8(part)
                    .ok()
                    .map(str::trim)
                    .filter(|p| !p.is_empty() && p.bytes().all(|b| b.is_ascii_digit()))
                    .and_then(|p| p.parse::<u64>().ok())
                    .ok_or(H1Error::ContentLength)?;
                if self.length.is_some_and(|l| l != n) {
                    return Err(H1Error::ContentLength);
                }
                self.length = Some(n);
            }
        } else if *name == header::TRANSFER_ENCODING {
            self.chunked = Some(
                value
                    .to_str()
                    .ok()
                    .and_then(|v| v.rsplit(',').next())
                    .is_some_and(|c| c.trim().eq_ignore_ascii_case("chunked")),
            );
        } else if *name == header::CONNECTION {
            self.close |= value
                .to_str()
                .is_ok_and(|v| v.split(',').any(|t| t.trim().eq_ignore_ascii_case("close")));
        }
        Ok(())
    }

    /// The answer's body framing (RFC 9112 section 6.3), and whether the connection may be
    /// reused after it (not after a body delimited by the close, nor after one with both
    /// `Transfer-Encoding` and `Content-Length`).
    fn framing(&self, status: StatusCode, head_request: bool) -> (Framing, bool) {
        if head_request || status == StatusCode::NO_CONTENT || status == StatusCode::NOT_MODIFIED {
            return (Framing::Empty, true);
        }
        match (self.chunked, self.length) {
            (Some(true), length) => (Framing::Chunked, length.is_none()),
            (Some(false), _) | (None, None) => (Framing::Close, false),
            (None, Some(0)) => (Framing::Empty, true),
            (None, Some(n)) => (Framing::Length(n), true),
        }
    }
}

/// A client's request head, as the proxy's own HTTP/1 sees it.
#[derive(Debug)]
// Returned once per request and matched at once: boxing the request would cost an allocation.
#[allow(clippy::large_enum_variant)]
pub(crate) enum RequestHead {
    /// A request it serves itself: `GET` or `HEAD`, HTTP/1.1, origin form, no body (no
    /// `Transfer-Encoding`, no `Content-Length` but 0), no `Expect`, no `Upgrade`, within
    /// the head limits; and whether the client asked to close after it.
    Simple(http::Request<()>, bool),
    /// Not complete yet.
    Partial,
    /// Anything else (including a malformed head, or one over the limits): hyper's, which
    /// answers it as it answers any (400, 431...). Nothing was taken out of the buffer.
    Other,
}

/// Parses the request head at the front of `buf` and takes it out of `buf` when it is
/// [`RequestHead::Simple`]. `max_bytes`, `max_headers`: the head limits (hyper's too).
pub(crate) fn parse_request(
    buf: &mut BytesMut,
    max_bytes: usize,
    max_headers: usize,
) -> RequestHead {
    let mut slots = [MaybeUninit::<httparse::Header<'_>>::uninit(); MAX_HEADERS];
    let slots = &mut slots[..max_headers.min(MAX_HEADERS)];
    let mut req = httparse::Request::new(&mut []);
    let len = match httparse::ParserConfig::default().parse_request_with_uninit_headers(
        &mut req,
        &buf[..],
        slots,
    ) {
        Ok(httparse::Status::Complete(len)) if len <= max_bytes => len,
        Ok(httparse::Status::Partial) if buf.len() < max_bytes => return RequestHead::Partial,
        _ => return RequestHead::Other,
    };
    let method = match req.method {
        Some("GET") => http::Method::GET,
        Some("HEAD") => http::Method::HEAD,
        _ => return RequestHead::Other,
    };
    let Some(path) = req.path.filter(|p| p.starts_with('/')) else {
        return RequestHead::Other;
    };
    if req.version != Some(1) {
        return RequestHead::Other;
    }
    let mut close = false;
    for h in req.headers.iter() {
        let name = h.name.as_bytes();
        if name.eq_ignore_ascii_case(b"transfer-encoding")
            || name.eq_ignore_ascii_case(b"expect")
            || name.eq_ignore_ascii_case(b"upgrade")
            || (name.eq_ignore_ascii_case(b"content-length") && h.value.trim_ascii() != b"0")
        {
            return RequestHead::Other;
        }
        if name.eq_ignore_ascii_case(b"connection") {
            for token in h.value.split(|&b| b == b',') {
                let token = token.trim_ascii();
                if token.eq_ignore_ascii_case(b"close") {
                    close = true;
                } else if token.eq_ignore_ascii_case(b"upgrade") {
                    return RequestHead::Other;
                }
            }
        }
    }
    // Where the target and each header lie, so that they can share the head's bytes.
    let target = path.as_ptr() as usize - buf.as_ptr() as usize;
    let target = target..target + path.len();
    let at = spans(buf, req.headers);
    let head = buf.split_to(len).freeze();
    let built = (|| {
        let uri = Uri::from_maybe_shared(head.slice(target)).ok()?;
        let headers = header_map(&head, at, |_, _| Ok(())).ok()?;
        let mut req = http::Request::new(());
        *req.method_mut() = method;
        *req.uri_mut() = uri;
        *req.headers_mut() = headers;
        Some(req)
    })();
    match built {
        Some(req) => RequestHead::Simple(req, close),
        None => {
            // Back as it was, for hyper.
            let mut whole = BytesMut::from(&head[..]);
            whole.extend_from_slice(buf);
            *buf = whole;
            RequestHead::Other
        }
    }
}

/// Writes an answer's head: the status line, its headers but the framing ones the proxy
/// sets, `date` when it has none, the framing `body` asks for ([`Framing::Empty`] keeps a
/// `content-length` the headers carry) and `connection: close` when `close`.
pub(crate) fn write_response_head(
    buf: &mut BytesMut,
    status: StatusCode,
    headers: &HeaderMap,
    body: Framing,
    date: &HeaderValue,
    close: bool,
) {
    buf.put_slice(b"HTTP/1.1 ");
    buf.put_slice(status.as_str().as_bytes());
    buf.put_u8(b' ');
    buf.put_slice(status.canonical_reason().unwrap_or("").as_bytes());
    buf.put_slice(b"\r\n");
    put_headers(buf, headers, body);
    if !headers.contains_key(header::DATE) {
        put_header(buf, b"date", date.as_bytes());
    }
    put_framing(buf, body);
    if close {
        put_header(buf, b"connection", b"close");
    }
    buf.put_slice(b"\r\n");
}

/// Decodes an answer's body from the bytes read so far.
#[derive(Debug)]
pub(crate) struct Decoder {
    state: State,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum State {
    /// This many bytes left.
    Length(u64),
    /// Everything until the connection closes.
    Close,
    /// Before a chunk-size line.
    ChunkSize,
    /// This many bytes of the current chunk left.
    ChunkData(u64),
    /// The CRLF after a chunk's data.
    ChunkEnd,
    /// Trailer lines, up to the empty line.
    Trailers,
    /// The body ended.
    Done,
}

/// What [`Decoder::decode`] found.
#[derive(Debug, PartialEq, Eq)]
pub(crate) enum Decoded {
    /// Some of the body.
    Data(Bytes),
    /// Nothing yet: more must be read.
    More,
    /// The body ended.
    End,
}

impl Decoder {
    /// A decoder for a body framed as `framing`.
    pub(crate) fn new(framing: Framing) -> Decoder {
        let state = match framing {
            Framing::Empty | Framing::Length(0) => State::Done,
            Framing::Length(n) => State::Length(n),
            Framing::Chunked => State::ChunkSize,
            Framing::Close => State::Close,
        };
        Decoder { state }
    }

    /// Whether the body ended.
    pub(crate) fn is_done(&self) -> bool {
        self.state == State::Done
    }

    /// The body's exact length left, when known.
    pub(crate) fn remaining(&self) -> Option<u64> {
        match self.state {
            State::Length(n) => Some(n),
            State::Done => Some(0),
            _ => None,
        }
    }

    /// Takes the next piece of the body out of `buf` (chunked framing and trailers are
    /// consumed, trailers dropped).
    pub(crate) fn decode(&mut self, buf: &mut BytesMut) -> Result<Decoded, H1Error> {
        loop {
            match self.state {
                State::Done => return Ok(Decoded::End),
                State::Length(n) | State::ChunkData(n) => {
                    if buf.is_empty() {
                        return Ok(Decoded::More);
                    }
                    let take = usize::try_from(n).unwrap_or(usize::MAX).min(buf.len());
                    let left = n - take as u64;
                    self.state = match (self.state, left) {
                        (State::Length(_), 0) => State::Done,
                        (State::Length(_), _) => State::Length(left),
                        (_, 0) => State::ChunkEnd,
                        _ => State::ChunkData(left),
                    };
                    return Ok(Decoded::Data(buf.split_to(take).freeze()));
                }
                State::Close => {
                    if buf.is_empty() {
                        return Ok(Decoded::More);
                    }
                    return Ok(Decoded::Data(buf.split().freeze()));
                }
                State::ChunkSize => match httparse::parse_chunk_size(&buf[..]) {
                    Ok(httparse::Status::Complete((used, size))) => {
                        buf.advance(used);
                        self.state = if size == 0 {
                            State::Trailers
                        } else {
                            State::ChunkData(size)
                        };
                    }
                    Ok(httparse::Status::Partial) if buf.len() > MAX_LINE => {
                        return Err(H1Error::Chunk("chunk-size line too long"));
                    }
                    Ok(httparse::Status::Partial) => return Ok(Decoded::More),
                    Err(_) => return Err(H1Error::Chunk("invalid chunk size")),
                },
                State::ChunkEnd => {
                    if buf.len() < 2 {
                        return Ok(Decoded::More);
                    }
                    if &buf[..2] != b"\r\n" {
                        return Err(H1Error::Chunk("no CRLF after a chunk's data"));
                    }
                    buf.advance(2);
                    self.state = State::ChunkSize;
                }
                State::Trailers => match buf.windows(2).position(|w| w == b"\r\n") {
                    Some(0) => {
                        buf.advance(2);
                        self.state = State::Done;
                    }
                    // A trailer line: dropped (the proxy forwards no trailers).
                    Some(end) => buf.advance(end + 2),
                    None if buf.len() > MAX_LINE => {
                        return Err(H1Error::Chunk("trailer line too long"));
                    }
                    None => return Ok(Decoded::More),
                },
            }
        }
    }

    /// The connection closed: the end of a body delimited by the close, a body cut short
    /// otherwise.
    pub(crate) fn eof(&mut self) -> Result<(), H1Error> {
        match self.state {
            State::Close | State::Done => {
                self.state = State::Done;
                Ok(())
            }
            _ => Err(H1Error::CutShort),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn head(raw: &str, head_request: bool) -> (Head, BytesMut) {
        let mut buf = BytesMut::from(raw.as_bytes());
        let head = parse_head(&mut buf, head_request)
            .expect("valid")
            .expect("complete");
        (head, buf)
    }

    /// Decodes `raw` fed in pieces of `step` bytes; the body, and what was left after it.
    fn decode_in_steps(framing: Framing, raw: &[u8], step: usize) -> (Vec<u8>, Vec<u8>) {
        let mut decoder = Decoder::new(framing);
        let mut buf = BytesMut::new();
        let mut body = Vec::new();
        let mut fed = 0;
        loop {
            match decoder.decode(&mut buf).expect("valid body") {
                Decoded::Data(d) => body.extend_from_slice(&d),
                Decoded::End => {
                    let mut rest = buf.to_vec();
                    rest.extend_from_slice(&raw[fed..]);
                    return (body, rest);
                }
                Decoded::More => {
                    assert!(fed < raw.len(), "the body never ended");
                    let end = (fed + step).min(raw.len());
                    buf.extend_from_slice(&raw[fed..end]);
                    fed = end;
                }
            }
        }
    }

    #[test]
    fn a_head_is_parsed_only_once_complete_and_taken_out_of_the_buffer() {
        let raw = "HTTP/1.1 200 OK\r\ncontent-length: 2\r\nx-a: 1\r\nx-a: 2\r\n\r\nok";
        for cut in 0..raw.len() - 2 {
            let mut buf = BytesMut::from(&raw.as_bytes()[..cut]);
            assert!(
                matches!(parse_head(&mut buf, false), Ok(None)),
                "cut at {cut}"
            );
        }
        let (h, rest) = head(raw, false);
        assert_eq!(h.status, StatusCode::OK);
        assert_eq!(h.body, Framing::Length(2));
        assert!(h.keep_alive);
        let values: Vec<_> = h.headers.get_all("x-a").iter().collect();
        assert_eq!(values, ["1", "2"]);
        assert_eq!(&rest[..], b"ok");
    }

    #[test]
    fn informational_answers_are_skipped() {
        let (h, rest) = head(
            "HTTP/1.1 100 Continue\r\n\r\nHTTP/1.1 103 Early Hints\r\nlink: </a>\r\n\r\nHTTP/1.1 200 OK\r\ncontent-length: 1\r\n\r\nx",
            false,
        );
        assert_eq!(h.status, StatusCode::OK);
        assert!(!h.headers.contains_key("link"));
        assert_eq!(&rest[..], b"x");
    }

    #[test]
    fn framing_follows_rfc_9112() {
        let cases = [
            (
                "HTTP/1.1 200 OK\r\ncontent-length: 5\r\n\r\n",
                false,
                Framing::Length(5),
                true,
            ),
            (
                "HTTP/1.1 200 OK\r\ncontent-length: 5\r\n\r\n",
                true,
                Framing::Empty,
                true,
            ),
            (
                "HTTP/1.1 204 No Content\r\n\r\n",
                false,
                Framing::Empty,
                true,
            ),
            (
                "HTTP/1.1 304 Not Modified\r\ncontent-length: 9\r\n\r\n",
                false,
                Framing::Empty,
                true,
            ),
            (
                "HTTP/1.1 200 OK\r\ntransfer-encoding: chunked\r\n\r\n",
                false,
                Framing::Chunked,
                true,
            ),
            (
                "HTTP/1.1 200 OK\r\ntransfer-encoding: gzip, chunked\r\n\r\n",
                false,
                Framing::Chunked,
                true,
            ),
            (
                "HTTP/1.1 200 OK\r\ntransfer-encoding: chunked\r\ncontent-length: 3\r\n\r\n",
                false,
                Framing::Chunked,
                false,
            ),
            (
                "HTTP/1.1 200 OK\r\ntransfer-encoding: gzip\r\n\r\n",
                false,
                Framing::Close,
                false,
            ),
            ("HTTP/1.1 200 OK\r\n\r\n", false, Framing::Close, false),
            (
                "HTTP/1.1 200 OK\r\ncontent-length: 0\r\n\r\n",
                false,
                Framing::Empty,
                true,
            ),
            (
                "HTTP/1.1 200 OK\r\ncontent-length: 4, 4\r\n\r\n",
                false,
                Framing::Length(4),
                true,
            ),
            (
                "HTTP/1.1 200 OK\r\ncontent-length: 4\r\nconnection: close\r\n\r\n",
                false,
                Framing::Length(4),
                false,
            ),
            (
                "HTTP/1.0 200 OK\r\ncontent-length: 4\r\n\r\n",
                false,
                Framing::Length(4),
                false,
            ),
        ];
        for (raw, head_request, framing, keep_alive) in cases {
            let (h, _) = head(raw, head_request);
            assert_eq!((h.body, h.keep_alive), (framing, keep_alive), "{raw:?}");
        }
    }

    #[test]
    fn unreadable_heads_are_errors() {
        for raw in [
            "garbage\r\n\r\n",
            "HTTP/1.1 200 OK\r\ncontent-length: 4, 5\r\n\r\n",
            "HTTP/1.1 200 OK\r\ncontent-length: -1\r\n\r\n",
            "HTTP/1.1 200 OK\r\ncontent-length: 1\r\ncontent-length: 2\r\n\r\n",
            "HTTP/1.1 101 Switching Protocols\r\n\r\n",
        ] {
            let mut buf = BytesMut::from(raw.as_bytes());
            assert!(parse_head(&mut buf, false).is_err(), "{raw:?}");
        }
        let mut huge = BytesMut::from(&b"HTTP/1.1 200 OK\r\nx: "[..]);
        huge.resize(MAX_HEAD + 1, b'a');
        assert!(matches!(
            parse_head(&mut huge, false),
            Err(H1Error::HeadTooLarge)
        ));
    }

    #[test]
    fn bodies_decode_alike_however_the_bytes_arrive() {
        let chunked = b"5;ext=1\r\nhello\r\n1\r\n \r\nA\r\n0123456789\r\n0\r\nx-t: 1\r\n\r\nNEXT";
        for step in 1..chunked.len() {
            let (body, rest) = decode_in_steps(Framing::Chunked, chunked, step);
            assert_eq!(body, b"hello 0123456789", "step {step}");
            assert_eq!(rest, b"NEXT", "step {step}");
        }
        let length = b"0123456789NEXT";
        for step in 1..length.len() {
            let (body, rest) = decode_in_steps(Framing::Length(10), length, step);
            assert_eq!(body, b"0123456789");
            assert_eq!(rest, b"NEXT");
        }
    }

    #[test]
    fn a_body_cut_short_or_malformed_is_an_error() {
        let mut d = Decoder::new(Framing::Length(4));
        let mut buf = BytesMut::from(&b"ab"[..]);
        assert_eq!(
            d.decode(&mut buf),
            Ok(Decoded::Data(Bytes::from_static(b"ab")))
        );
        assert_eq!(d.remaining(), Some(2));
        assert_eq!(d.eof(), Err(H1Error::CutShort));
        let mut d = Decoder::new(Framing::Chunked);
        assert_eq!(d.eof(), Err(H1Error::CutShort));
        let mut close = Decoder::new(Framing::Close);
        assert_eq!(close.eof(), Ok(()));
        assert!(close.is_done());
        for raw in [&b"zz\r\n"[..], b"2\r\nabX\r\n"] {
            let mut d = Decoder::new(Framing::Chunked);
            let mut buf = BytesMut::from(raw);
            let mut result = d.decode(&mut buf);
            while let Ok(Decoded::Data(_)) = result {
                result = d.decode(&mut buf);
            }
            assert!(result.is_err(), "{raw:?}");
        }
    }

    #[test]
    fn a_request_head_is_written_in_origin_form_with_its_framing() {
        let mut headers = HeaderMap::new();
        headers.append("accept", HeaderValue::from_static("a"));
        headers.append("accept", HeaderValue::from_static("b"));
        headers.append("content-length", HeaderValue::from_static("0"));
        headers.append("connection", HeaderValue::from_static("x"));
        let host = HeaderValue::from_static("p:1");
        let mut req = http::Request::get("http://example.com/p?q=1")
            .body(())
            .expect("request");
        *req.headers_mut() = headers;
        let (mut parts, ()) = req.into_parts();
        let mut buf = BytesMut::new();
        write_request_head(&mut buf, &parts, Some(&host), Framing::Empty);
        assert_eq!(
            &buf[..],
            b"GET /p?q=1 HTTP/1.1\r\naccept: a\r\naccept: b\r\ncontent-length: 0\r\nhost: p:1\r\n\r\n"
        );
        buf.clear();
        parts.headers.insert("host", HeaderValue::from_static("h"));
        parts.method = http::Method::POST;
        parts.uri = Uri::from_static("/");
        write_request_head(&mut buf, &parts, Some(&host), Framing::Chunked);
        assert_eq!(
            &buf[..],
            b"POST / HTTP/1.1\r\naccept: a\r\naccept: b\r\nhost: h\r\ntransfer-encoding: chunked\r\n\r\n"
        );
        buf.clear();
        let mut chunks = BodyEncoder::new(Framing::Chunked, None);
        chunks.data(&mut buf, b"");
        chunks.data(&mut buf, b"0123456789abcdefX");
        assert_eq!(chunks.finish(&mut buf), Ok(()));
        assert_eq!(&buf[..], b"11\r\n0123456789abcdefX\r\n0\r\n\r\n");
        for (framing, declared) in [(Framing::Length(3), None), (Framing::Empty, Some(3))] {
            let mut raw = BodyEncoder::new(framing, declared);
            raw.data(&mut buf, b"ab");
            assert!(raw.finish(&mut buf).is_err(), "2 bytes of 3");
            raw.data(&mut buf, b"c");
            assert_eq!(raw.finish(&mut buf), Ok(()));
        }
    }

    fn request(raw: &str) -> (RequestHead, BytesMut) {
        let mut buf = BytesMut::from(raw.as_bytes());
        let head = parse_request(&mut buf, 8192, 100);
        (head, buf)
    }

    #[test]
    fn a_simple_read_is_parsed_and_taken_out_of_the_buffer() {
        let raw = "GET /a/b?x=1 HTTP/1.1\r\nhost: h\r\naccept: a\r\naccept: b\r\ncontent-length: 0\r\n\r\nHEAD / HTTP/1.1\r\nconnection: keep-alive, close\r\n\r\n";
        let (head, mut rest) = request(raw);
        let RequestHead::Simple(req, close) = head else {
            panic!("not simple: {head:?}");
        };
        assert!(!close);
        assert_eq!(req.method(), http::Method::GET);
        assert_eq!(req.uri(), "/a/b?x=1");
        assert_eq!(req.version(), Version::HTTP_11);
        let accept: Vec<_> = req.headers().get_all("accept").iter().collect();
        assert_eq!(accept, ["a", "b"]);
        assert_eq!(req.headers()["host"], "h");
        // The pipelined request behind it stays, and is read next.
        let RequestHead::Simple(next, close) = parse_request(&mut rest, 8192, 100) else {
            panic!("second request not simple");
        };
        assert!(close, "connection: close seen among its tokens");
        assert_eq!(next.method(), http::Method::HEAD);
        assert!(rest.is_empty());
        for cut in 0..raw.find("\r\n\r\n").unwrap_or(0) + 3 {
            let mut buf = BytesMut::from(&raw.as_bytes()[..cut]);
            assert!(
                matches!(parse_request(&mut buf, 8192, 100), RequestHead::Partial),
                "cut at {cut}"
            );
            assert_eq!(buf.len(), cut, "nothing taken from a partial head");
        }
    }

    #[test]
    fn anything_but_a_simple_read_is_left_whole_for_hyper() {
        for raw in [
            "POST / HTTP/1.1\r\ncontent-length: 2\r\n\r\n{}",
            "DELETE /x HTTP/1.1\r\n\r\n",
            "GET / HTTP/1.0\r\n\r\n",
            "GET / HTTP/1.1\r\ncontent-length: 5\r\n\r\nhello",
            "GET / HTTP/1.1\r\ntransfer-encoding: chunked\r\n\r\n0\r\n\r\n",
            "GET / HTTP/1.1\r\nexpect: 100-continue\r\n\r\n",
            "GET / HTTP/1.1\r\nupgrade: websocket\r\nconnection: upgrade\r\n\r\n",
            "GET http://example.com/ HTTP/1.1\r\n\r\n",
            "GET * HTTP/1.1\r\n\r\n",
            "GET / HTTP/1.1\r\nx-nul: a\0b\r\n\r\n",
            "garbage\r\n\r\n",
        ] {
            let (head, rest) = request(raw);
            assert!(matches!(head, RequestHead::Other), "{raw:?}: {head:?}");
            assert_eq!(&rest[..], raw.as_bytes(), "{raw:?}: buffer untouched");
        }
        // Over the limits: hyper answers 431.
        let many: String = (0..5).map(|i| format!("x-{i}: 1\r\n")).collect();
        let raw = format!("GET / HTTP/1.1\r\n{many}\r\n");
        let mut buf = BytesMut::from(raw.as_bytes());
        assert!(matches!(
            parse_request(&mut buf, 8192, 4),
            RequestHead::Other
        ));
        let mut buf = BytesMut::from(raw.as_bytes());
        assert!(matches!(
            parse_request(&mut buf, 20, 100),
            RequestHead::Other
        ));
        let mut partial = BytesMut::from(&raw.as_bytes()[..30]);
        assert!(matches!(
            parse_request(&mut partial, 20, 100),
            RequestHead::Other
        ));
    }

    #[test]
    fn an_answer_head_carries_its_framing_a_date_and_close() {
        let mut headers = HeaderMap::new();
        headers.insert("content-type", HeaderValue::from_static("text/plain"));
        headers.insert("transfer-encoding", HeaderValue::from_static("gzip"));
        let date = HeaderValue::from_static("Fri, 04 Dec 2026 19:00:00 GMT");
        let mut buf = BytesMut::new();
        write_response_head(
            &mut buf,
            StatusCode::OK,
            &headers,
            Framing::Length(5),
            &date,
            false,
        );
        assert_eq!(
            &buf[..],
            b"HTTP/1.1 200 OK\r\ncontent-type: text/plain\r\ndate: Fri, 04 Dec 2026 19:00:00 GMT\r\ncontent-length: 5\r\n\r\n"
        );
        buf.clear();
        headers.remove("transfer-encoding");
        headers.insert("date", HeaderValue::from_static("then"));
        headers.insert("content-length", HeaderValue::from_static("9"));
        write_response_head(
            &mut buf,
            StatusCode::NOT_FOUND,
            &headers,
            Framing::Empty,
            &date,
            true,
        );
        assert_eq!(
            &buf[..],
            b"HTTP/1.1 404 Not Found\r\ncontent-type: text/plain\r\ndate: then\r\ncontent-length: 9\r\nconnection: close\r\n\r\n"
        );
        buf.clear();
        headers.remove("content-length");
        write_response_head(
            &mut buf,
            StatusCode::OK,
            &headers,
            Framing::Chunked,
            &date,
            false,
        );
        assert!(buf.ends_with(b"transfer-encoding: chunked\r\n\r\n"));
    }
}
