use super::*;
use http::header;

// The wire behaviour of the read path's HTTP/1 client (`Endpoint::send`, `ReadBody`,
// `client_response`), against a scripted raw upstream: what the client writes, how it reads
// each kind of answer, and when it keeps the connection for the next read.

use std::net::SocketAddr;
use std::sync::atomic::{AtomicUsize, Ordering};

use http_body_util::BodyExt;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpListener;

/// The longest any step of a test may take: a hang fails the test instead of blocking it.
const LIMIT: Duration = Duration::from_secs(5);

/// Waits for `f`, failing the test after [`LIMIT`].
async fn within<F: Future>(what: &str, f: F) -> F::Output {
    match tokio::time::timeout(LIMIT, f).await {
        Ok(out) => out,
        Err(_) => panic!("{what}: no result within {LIMIT:?}"),
    }
}

/// What the scripted upstream answers to one request.
#[derive(Clone)]
struct Reply {
    /// Written one after the other, with [`Reply::pause`] between.
    writes: Vec<Vec<u8>>,
    pause: Duration,
    /// Closes the connection after the writes.
    close: bool,
    /// Waited on before answering (to hold answers until several reads are in flight).
    barrier: Option<Arc<tokio::sync::Barrier>>,
}

impl Reply {
    /// An answer written in these pieces, 10 ms apart, keeping the connection open.
    fn new(writes: &[&[u8]]) -> Reply {
        Reply {
            writes: writes.iter().map(|w| w.to_vec()).collect(),
            pause: Duration::from_millis(10),
            close: false,
            barrier: None,
        }
    }

    fn then_close(mut self) -> Reply {
        self.close = true;
        self
    }
}

/// Answers the requests, numbered across all connections, with `replies` in order.
fn in_order(replies: Vec<Reply>) -> impl Fn(usize, &[u8]) -> Reply + Send + Sync + 'static {
    move |n, _| {
        replies.get(n).cloned().unwrap_or_else(|| {
            Reply::new(&[b"HTTP/1.1 500 Unscripted\r\ncontent-length: 0\r\n\r\n"]).then_close()
        })
    }
}

/// How the scripted upstream answers request `n` (counted across connections), given its
/// raw bytes.
type Script = Arc<dyn Fn(usize, &[u8]) -> Reply + Send + Sync>;

/// A scripted raw HTTP/1 upstream on 127.0.0.1:0 and an endpoint for it.
struct Upstream {
    endpoint: Arc<Endpoint>,
    addr: SocketAddr,
    accepted: Arc<AtomicUsize>,
    /// Each request as it came on the wire: head and body (still chunked if it was).
    requests: Arc<Mutex<Vec<Vec<u8>>>>,
}

impl Upstream {
    /// Answers request `n` (counted across connections), received as `raw`, with
    /// `script(n, raw)`.
    async fn start(script: impl Fn(usize, &[u8]) -> Reply + Send + Sync + 'static) -> Upstream {
        let script: Script = Arc::new(script);
        let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
        let addr = listener.local_addr().expect("addr");
        let accepted = Arc::new(AtomicUsize::new(0));
        let requests = Arc::new(Mutex::new(Vec::new()));
        let (count, seen) = (accepted.clone(), requests.clone());
        tokio::spawn(async move {
            while let Ok((stream, _)) = listener.accept().await {
                count.fetch_add(1, Ordering::SeqCst);
                let (script, seen) = (script.clone(), seen.clone());
                tokio::spawn(async move {
                    let mut wire = Wire {
                        stream,
                        buf: Vec::new(),
                    };
                    while let Some(raw) = wire.request().await {
                        let reply = {
                            let mut seen: MutexGuard<'_, Vec<Vec<u8>>> =
                                seen.lock().expect("requests");
                            let n = seen.len();
                            seen.push(raw.clone());
                            script(n, &raw)
                        };
                        if let Some(barrier) = &reply.barrier {
                            barrier.wait().await;
                        }
                        for (i, write) in reply.writes.iter().enumerate() {
                            if i > 0 {
                                tokio::time::sleep(reply.pause).await;
                            }
                            if wire.stream.write_all(write).await.is_err() {
                                return;
                            }
                        }
                        if reply.close {
                            let _ = wire.stream.shutdown().await;
                            return;
                        }
                    }
                });
            }
        });
        Upstream {
            endpoint: endpoint_at(addr, "wire"),
            addr,
            accepted,
            requests,
        }
    }

    fn accepted(&self) -> usize {
        self.accepted.load(Ordering::SeqCst)
    }

    fn requests(&self) -> Vec<Vec<u8>> {
        self.requests.lock().expect("requests").clone()
    }
}

/// The upstream's side of one connection: reads whole requests.
struct Wire {
    stream: TcpStream,
    buf: Vec<u8>,
}

impl Wire {
    /// Reads more; `None` at the end of the stream.
    async fn fill(&mut self) -> Option<()> {
        let mut chunk = [0u8; 16 * 1024];
        match self.stream.read(&mut chunk).await {
            Ok(0) | Err(_) => None,
            Ok(n) => {
                self.buf.extend_from_slice(&chunk[..n]);
                Some(())
            }
        }
    }

    /// The end of the next CRLF at or after `from` (the index just past it).
    async fn line_end(&mut self, from: usize) -> Option<usize> {
        loop {
            if let Some(i) = find(&self.buf[from..], b"\r\n") {
                return Some(from + i + 2);
            }
            self.fill().await?;
        }
    }

    async fn at_least(&mut self, len: usize) -> Option<()> {
        while self.buf.len() < len {
            self.fill().await?;
        }
        Some(())
    }

    /// The next request's raw bytes: its head, and its body when it has `content-length`
    /// or is chunked (chunks and trailers as sent).
    async fn request(&mut self) -> Option<Vec<u8>> {
        let head_end = loop {
            if let Some(i) = find(&self.buf, b"\r\n\r\n") {
                break i + 4;
            }
            self.fill().await?;
        };
        let (_, headers, _) = parse_head(&self.buf[..head_end]);
        let value = |name: &str| {
            headers
                .iter()
                .find(|(n, _)| n == name)
                .map(|(_, v)| v.to_ascii_lowercase())
        };
        let end = if let Some(len) = value("content-length") {
            let len: usize = len.parse().expect("content-length");
            self.at_least(head_end + len).await?;
            head_end + len
        } else if value("transfer-encoding").is_some_and(|te| te.contains("chunked")) {
            let mut pos = head_end;
            loop {
                let line = self.line_end(pos).await?;
                let size = String::from_utf8_lossy(&self.buf[pos..line - 2]).into_owned();
                let size = size.split(';').next().unwrap_or("").trim();
                let size = usize::from_str_radix(size, 16).expect("chunk size");
                pos = line;
                if size == 0 {
                    // Trailers, up to an empty line.
                    loop {
                        let line = self.line_end(pos).await?;
                        let empty = line == pos + 2;
                        pos = line;
                        if empty {
                            break;
                        }
                    }
                    break pos;
                }
                self.at_least(pos + size + 2).await?;
                pos += size + 2;
            }
        } else {
            head_end
        };
        Some(self.buf.drain(..end).collect())
    }
}

fn find(haystack: &[u8], needle: &[u8]) -> Option<usize> {
    haystack.windows(needle.len()).position(|w| w == needle)
}

/// A message's first line, its headers (names lowercased, in order) and what follows the
/// head.
fn parse_head(raw: &[u8]) -> (String, Vec<(String, String)>, Vec<u8>) {
    let end = find(raw, b"\r\n\r\n").expect("a whole head") + 4;
    let head = String::from_utf8_lossy(&raw[..end - 4]).into_owned();
    let mut lines = head.split("\r\n");
    let first = lines.next().unwrap_or("").to_owned();
    let headers = lines
        .map(|line| {
            let (name, value) = line.split_once(':').expect("a header line");
            (name.to_ascii_lowercase(), value.trim().to_owned())
        })
        .collect();
    (first, headers, raw[end..].to_vec())
}

/// The values of header `name` (lowercase), in order.
fn values<'a>(headers: &'a [(String, String)], name: &str) -> Vec<&'a str> {
    headers
        .iter()
        .filter(|(n, _)| n == name)
        .map(|(_, v)| v.as_str())
        .collect()
}

/// Decodes a chunked body (as the upstream received it), trailers dropped.
fn decode_chunked(mut raw: &[u8]) -> Vec<u8> {
    let mut out = Vec::new();
    loop {
        let line = find(raw, b"\r\n").expect("a chunk size line");
        let size = String::from_utf8_lossy(&raw[..line]).into_owned();
        let size = size.split(';').next().unwrap_or("").trim();
        let size = usize::from_str_radix(size, 16).expect("chunk size");
        raw = &raw[line + 2..];
        if size == 0 {
            return out;
        }
        out.extend_from_slice(&raw[..size]);
        assert_eq!(&raw[size..size + 2], b"\r\n", "a chunk ends with CRLF");
        raw = &raw[size + 2..];
    }
}

fn parts(method: &str, uri: &str) -> http::request::Parts {
    Request::builder()
        .method(method)
        .uri(uri)
        .body(())
        .expect("request")
        .into_parts()
        .0
}

/// Sends a bodiless read and waits for its answer's headers.
async fn send(endpoint: &Arc<Endpoint>, parts: &http::request::Parts) -> Response<ReadBody> {
    within("answer", endpoint.send(Outgoing::Bodiless(parts)))
        .await
        .expect("an answer")
}

/// Reads a body to its end.
async fn body<B: Body<Data = Bytes>>(body: B) -> Bytes
where
    B::Error: std::fmt::Debug,
{
    within("body", body.collect())
        .await
        .expect("a whole body")
        .to_bytes()
}

/// A bodiless GET of `path`: its status and body.
async fn get(endpoint: &Arc<Endpoint>, path: &str) -> (http::StatusCode, Bytes) {
    let resp = send(endpoint, &parts("GET", path)).await;
    let status = resp.status();
    (status, body(resp.into_body()).await)
}

/// A GET of `path` answers `expected` on the connection already open (no second one), which
/// goes back idle after it.
async fn next_read_reuses_the_connection(up: &Upstream, path: &str, expected: &str) {
    assert_eq!(
        get(&up.endpoint, path).await,
        (http::StatusCode::OK, Bytes::from(expected.to_owned())),
        "{path}: its own answer, not bytes of the one before"
    );
    assert_eq!(up.accepted(), 1, "{path}: on the connection already open");
    assert_eq!(up.endpoint.idle(), 1, "{path}: back idle after its body");
}

#[tokio::test]
async fn a_content_length_answer_in_pieces_is_whole_and_its_connection_reused() {
    let up = Upstream::start(in_order(vec![
        Reply::new(&[
            b"HTTP/1.1 200 OK\r\ncontent-le",
            b"ngth: 11\r\nx-a",
            b": 1\r\n\r\n",
            b"hello",
            b" world",
        ]),
        Reply::new(&[b"HTTP/1.1 200 OK\r\ncontent-length: 6\r\n\r\nsecond"]),
    ]))
    .await;
    let resp = send(&up.endpoint, &parts("GET", "/one")).await;
    assert_eq!(resp.status(), 200);
    assert_eq!(resp.headers()["x-a"], "1");
    assert_eq!(resp.headers()[header::CONTENT_LENGTH], "11");
    assert_eq!(body(resp.into_body()).await, "hello world");
    assert_eq!(up.endpoint.idle(), 1, "kept once its body was read");

    next_read_reuses_the_connection(&up, "/two", "second").await;
}

#[tokio::test]
async fn a_chunked_answer_with_extensions_is_decoded_and_its_connection_reused() {
    let up = Upstream::start(in_order(vec![
        Reply::new(&[
            b"HTTP/1.1 200 OK\r\ntransfer-encoding: chunked\r\n\r\n5;ext=1\r\nhel",
            b"lo\r\n1\r\n \r\n",
            b"A; name=\"v\"\r\n0123456789\r",
            b"\n0\r\n",
            b"\r\n",
        ]),
        Reply::new(&[b"HTTP/1.1 200 OK\r\ncontent-length: 4\r\n\r\nnext"]),
    ]))
    .await;
    let resp = send(&up.endpoint, &parts("GET", "/chunked")).await;
    assert_eq!(resp.status(), 200);
    let resp = client_response(resp);
    assert!(
        !resp.headers().contains_key(header::TRANSFER_ENCODING),
        "transfer-encoding is hop-by-hop: {:?}",
        resp.headers()
    );
    assert!(!resp.headers().contains_key(header::CONTENT_LENGTH));
    assert_eq!(body(resp.into_body()).await, "hello 0123456789");
    assert_eq!(up.endpoint.idle(), 1, "kept after the last chunk");

    next_read_reuses_the_connection(&up, "/next", "next").await;
}

#[tokio::test]
async fn a_chunked_answer_with_trailers_is_read_past_them_and_its_connection_reused() {
    let up = Upstream::start(in_order(vec![
        Reply::new(&[
            b"HTTP/1.1 200 OK\r\ntransfer-encoding: chunked\r\ntrailer: x-trailer\r\n\r\n",
            b"4\r\nbody\r\n0\r\nx-trai",
            b"ler: 1\r\nx-other: 2\r\n\r\n",
        ]),
        Reply::new(&[b"HTTP/1.1 200 OK\r\ncontent-length: 5\r\n\r\nafter"]),
    ]))
    .await;
    let (status, got) = get(&up.endpoint, "/trailers").await;
    assert_eq!(status, 200);
    assert_eq!(got, "body");
    assert_eq!(up.endpoint.idle(), 1, "kept after the trailer section");

    next_read_reuses_the_connection(&up, "/after", "after").await;
}

#[tokio::test]
async fn an_answer_delimited_by_close_is_read_to_the_close_and_not_reused() {
    let up = Upstream::start(in_order(vec![
        Reply::new(&[
            b"HTTP/1.1 200 OK\r\nx-a: 1\r\n\r\n",
            b"part one, ",
            b"part two",
        ])
        .then_close(),
        Reply::new(&[b"HTTP/1.1 200 OK\r\ncontent-length: 3\r\n\r\nnew"]),
    ]))
    .await;
    assert_eq!(
        get(&up.endpoint, "/until-close").await,
        (http::StatusCode::OK, Bytes::from("part one, part two"))
    );
    assert_eq!(up.endpoint.idle(), 0, "a closed connection is not kept");

    assert_eq!(
        get(&up.endpoint, "/again").await,
        (http::StatusCode::OK, Bytes::from("new"))
    );
    assert_eq!(up.accepted(), 2, "the second read opened a new connection");
}

#[tokio::test]
async fn an_http_1_0_answer_is_returned_and_its_connection_not_reused() {
    // The upstream keeps the connection open: the client is the one not to reuse it.
    let up = Upstream::start(in_order(vec![
        Reply::new(&[b"HTTP/1.0 200 OK\r\ncontent-length: 4\r\n\r\n", b"old!"]),
        Reply::new(&[b"HTTP/1.1 200 OK\r\ncontent-length: 3\r\n\r\nnew"]),
    ]))
    .await;
    let resp = send(&up.endpoint, &parts("GET", "/old")).await;
    assert_eq!(resp.status(), 200);
    assert_eq!(resp.version(), http::Version::HTTP_10);
    assert_eq!(body(resp.into_body()).await, "old!");
    assert_eq!(
        up.endpoint.idle(),
        0,
        "HTTP/1.0 without keep-alive is not kept"
    );

    assert_eq!(
        get(&up.endpoint, "/new").await,
        (http::StatusCode::OK, Bytes::from("new"))
    );
    assert_eq!(up.accepted(), 2);
}

#[tokio::test]
async fn no_content_and_not_modified_answers_have_no_body_and_keep_the_connection() {
    let up = Upstream::start(in_order(vec![
        Reply::new(&[b"HTTP/1.1 204 No Content\r\nx-a: 1\r\n\r\n"]),
        // A 304 may give the length of the representation it stands for: still no body.
        Reply::new(&[b"HTTP/1.1 304 Not Modified\r\netag: \"v1\"\r\ncontent-length: 5\r\n\r\n"]),
        Reply::new(&[b"HTTP/1.1 200 OK\r\ncontent-length: 5\r\n\r\nfresh"]),
    ]))
    .await;
    let resp = send(&up.endpoint, &parts("GET", "/a")).await;
    assert_eq!(resp.status(), 204);
    assert_eq!(body(resp.into_body()).await, "");
    assert_eq!(up.endpoint.idle(), 1);

    let resp = send(&up.endpoint, &parts("GET", "/b")).await;
    assert_eq!(resp.status(), 304);
    assert_eq!(resp.headers()[header::ETAG], "\"v1\"");
    assert_eq!(body(resp.into_body()).await, "");
    assert_eq!(up.endpoint.idle(), 1);

    next_read_reuses_the_connection(&up, "/c", "fresh").await;
}

#[tokio::test]
async fn a_head_answer_has_no_body_keeps_its_length_and_its_connection() {
    let up = Upstream::start(in_order(vec![
        Reply::new(&[b"HTTP/1.1 200 OK\r\ncontent-length: 10\r\n\r\n"]),
        Reply::new(&[b"HTTP/1.1 200 OK\r\ncontent-length: 10\r\n\r\n0123456789"]),
    ]))
    .await;
    let resp = send(&up.endpoint, &parts("HEAD", "/h")).await;
    assert_eq!(resp.status(), 200);
    let resp = client_response(resp);
    assert_eq!(resp.headers()[header::CONTENT_LENGTH], "10");
    assert_eq!(body(resp.into_body()).await, "");
    assert_eq!(up.endpoint.idle(), 1);

    next_read_reuses_the_connection(&up, "/g", "0123456789").await;
    let requests = up.requests();
    assert_eq!(requests.len(), 2);
    assert!(requests[0].starts_with(b"HEAD /h HTTP/1.1\r\n"));
    assert!(requests[1].starts_with(b"GET /g HTTP/1.1\r\n"));
}

#[tokio::test]
async fn informational_answers_before_the_final_one_are_skipped() {
    let up = Upstream::start(in_order(vec![
        Reply::new(&[
            b"HTTP/1.1 100 Continue\r\n\r\n",
            b"HTTP/1.1 103 Early Hints\r\nlink: </s.css>; rel=preload\r\n\r\n",
            b"HTTP/1.1 200 OK\r\ncontent-length: 5\r\n\r\nfinal",
        ]),
        Reply::new(&[b"HTTP/1.1 200 OK\r\ncontent-length: 4\r\n\r\nnext"]),
    ]))
    .await;
    let resp = send(&up.endpoint, &parts("GET", "/hints")).await;
    assert_eq!(resp.status(), 200);
    assert!(
        !resp.headers().contains_key(header::LINK),
        "the 103's headers are not the answer's"
    );
    assert_eq!(body(resp.into_body()).await, "final");
    assert_eq!(up.endpoint.idle(), 1);

    next_read_reuses_the_connection(&up, "/next", "next").await;
}

#[tokio::test]
async fn a_malformed_answer_is_an_error() {
    // The connection stays open: the client must not wait for it to close.
    let up = Upstream::start(in_order(vec![Reply::new(&[b"garbage\r\n\r\n"])])).await;
    let parts = parts("GET", "/bad");
    let got = within("error", up.endpoint.send(Outgoing::Bodiless(&parts))).await;
    let e = got.err().expect("an error");
    assert_eq!(e.partition, "wire");
    assert!(!e.reason.is_empty());
    assert_eq!(up.endpoint.idle(), 0);
}

#[tokio::test]
async fn a_body_cut_short_is_an_error_and_its_connection_not_kept() {
    let up = Upstream::start(in_order(vec![
        Reply::new(&[b"HTTP/1.1 200 OK\r\ncontent-length: 10\r\n\r\n", b"abcd"]).then_close(),
    ]))
    .await;
    let resp = send(&up.endpoint, &parts("GET", "/short")).await;
    assert_eq!(resp.status(), 200);
    let mut body = resp.into_body();
    let mut data = Vec::new();
    let error = loop {
        match within("frame", body.frame()).await {
            Some(Ok(frame)) => {
                if let Ok(d) = frame.into_data() {
                    data.extend_from_slice(&d);
                }
            }
            Some(Err(e)) => break e,
            None => panic!("the body ended after {data:?} without an error"),
        }
    };
    assert_eq!(data, b"abcd", "what arrived before the close");
    assert!(!error.to_string().is_empty());
    drop(body);
    assert_eq!(up.endpoint.idle(), 0);
}

#[tokio::test]
async fn a_bodiless_read_is_sent_in_origin_form_with_its_headers_and_a_host() {
    let ok = || Reply::new(&[b"HTTP/1.1 200 OK\r\ncontent-length: 2\r\n\r\nok"]);
    let up = Upstream::start(in_order(vec![ok(), ok(), ok()])).await;
    let authority = up.addr.to_string();

    let mut first = parts("GET", "/a/b?x=1&y=2");
    first
        .headers
        .append(header::ACCEPT, HeaderValue::from_static("text/html"));
    first
        .headers
        .append(header::ACCEPT, HeaderValue::from_static("application/json"));
    first
        .headers
        .insert("x-request-id", HeaderValue::from_static("r-1"));
    let resp = send(&up.endpoint, &first).await;
    assert_eq!(body(resp.into_body()).await, "ok");

    let absolute = parts("GET", "http://example.com/p?q=1");
    let resp = send(&up.endpoint, &absolute).await;
    assert_eq!(body(resp.into_body()).await, "ok");

    let mut hosted = parts("GET", "/h");
    hosted
        .headers
        .insert(header::HOST, HeaderValue::from_static("app.example"));
    let resp = send(&up.endpoint, &hosted).await;
    assert_eq!(body(resp.into_body()).await, "ok");

    let requests = up.requests();
    assert_eq!(requests.len(), 3, "{requests:?}");

    let (line, headers, rest) = parse_head(&requests[0]);
    assert_eq!(line, "GET /a/b?x=1&y=2 HTTP/1.1");
    assert_eq!(
        values(&headers, "accept"),
        ["text/html", "application/json"]
    );
    assert_eq!(values(&headers, "x-request-id"), ["r-1"]);
    assert_eq!(values(&headers, "host"), [authority.as_str()]);
    assert!(values(&headers, "content-length").is_empty(), "{headers:?}");
    assert!(
        values(&headers, "transfer-encoding").is_empty(),
        "{headers:?}"
    );
    assert!(rest.is_empty(), "no body");

    let (line, headers, _) = parse_head(&requests[1]);
    assert_eq!(line, "GET /p?q=1 HTTP/1.1");
    assert_eq!(values(&headers, "host"), [authority.as_str()]);

    let (line, headers, _) = parse_head(&requests[2]);
    assert_eq!(line, "GET /h HTTP/1.1");
    assert_eq!(
        values(&headers, "host"),
        ["app.example"],
        "its own host kept"
    );

    assert_eq!(up.accepted(), 1);
}

#[tokio::test]
async fn a_read_with_a_body_sends_it_by_length_or_chunked() {
    let multi = || Reply::new(&[b"HTTP/1.1 207 Multi-Status\r\ncontent-length: 2\r\n\r\nok"]);
    let up = Upstream::start(in_order(vec![multi(), multi()])).await;

    let full: ProxyBody = http_body_util::Full::new(Bytes::from("hello"))
        .map_err(|never| match never {})
        .boxed_unsync();
    let req = Request::builder()
        .method("PROPFIND")
        .uri("/dav/x")
        .header(header::CONTENT_LENGTH, "5")
        .body(full)
        .expect("request");
    let resp = within("answer", up.endpoint.send(Outgoing::WithBody(Some(req))))
        .await
        .expect("an answer");
    assert_eq!(resp.status(), 207);
    assert_eq!(body(resp.into_body()).await, "ok");

    let frames: Vec<Result<Frame<Bytes>, BoxError>> = vec![
        Ok(Frame::data(Bytes::from("hello "))),
        Ok(Frame::data(Bytes::from("streamed world"))),
    ];
    let streamed: ProxyBody =
        http_body_util::StreamBody::new(futures_util::stream::iter(frames)).boxed_unsync();
    let req = Request::builder()
        .method("PROPFIND")
        .uri("/dav/y")
        .body(streamed)
        .expect("request");
    let resp = within("answer", up.endpoint.send(Outgoing::WithBody(Some(req))))
        .await
        .expect("an answer");
    assert_eq!(resp.status(), 207);
    assert_eq!(body(resp.into_body()).await, "ok");

    let requests = up.requests();
    assert_eq!(requests.len(), 2, "{requests:?}");

    let (line, headers, rest) = parse_head(&requests[0]);
    assert_eq!(line, "PROPFIND /dav/x HTTP/1.1");
    assert_eq!(values(&headers, "content-length"), ["5"]);
    assert!(
        values(&headers, "transfer-encoding").is_empty(),
        "{headers:?}"
    );
    assert_eq!(rest, b"hello");
    assert!(requests[0].ends_with(b"\r\n\r\nhello"));

    let (line, headers, rest) = parse_head(&requests[1]);
    assert_eq!(line, "PROPFIND /dav/y HTTP/1.1");
    assert_eq!(values(&headers, "transfer-encoding"), ["chunked"]);
    assert!(values(&headers, "content-length").is_empty(), "{headers:?}");
    assert_eq!(decode_chunked(&rest), b"hello streamed world");

    assert_eq!(up.accepted(), 1);
}

#[tokio::test]
async fn a_large_answer_in_many_writes_arrives_byte_exact() {
    const LEN: usize = 1 << 20;
    let expected: Vec<u8> = (0..LEN).map(|i| (i % 251) as u8).collect();
    let mut writes: Vec<Vec<u8>> = vec![
        b"HTTP/1.1 200 OK\r\ncontent-".to_vec(),
        format!("length: {LEN}\r\n\r\n").into_bytes(),
    ];
    // Uneven pieces, so that they do not fall on the client's read boundaries.
    writes.extend(expected.chunks(13_001).map(<[u8]>::to_vec));
    let large = Reply {
        writes,
        pause: Duration::from_millis(1),
        close: false,
        barrier: None,
    };
    let up = Upstream::start(in_order(vec![
        large,
        Reply::new(&[b"HTTP/1.1 200 OK\r\ncontent-length: 4\r\n\r\nnext"]),
    ]))
    .await;
    let resp = send(&up.endpoint, &parts("GET", "/large")).await;
    assert_eq!(resp.status(), 200);
    let got = body(resp.into_body()).await;
    assert_eq!(got.len(), LEN);
    assert!(got == expected, "the bytes differ");
    assert_eq!(up.endpoint.idle(), 1);

    next_read_reuses_the_connection(&up, "/next", "next").await;
}

#[tokio::test]
async fn two_reads_in_flight_use_two_connections_and_get_their_own_answers() {
    // Neither read is answered before both arrived: one connection for both would hang.
    let barrier = Arc::new(tokio::sync::Barrier::new(2));
    let up = Upstream::start(move |_, raw: &[u8]| {
        let (line, _, _) = parse_head(raw);
        let path = line.split(' ').nth(1).unwrap_or("").to_owned();
        let head = format!("HTTP/1.1 200 OK\r\ncontent-length: {}\r\n\r\n", path.len());
        Reply {
            barrier: Some(barrier.clone()),
            ..Reply::new(&[head.as_bytes(), path.as_bytes()])
        }
    })
    .await;
    let (one, two) = tokio::join!(get(&up.endpoint, "/one"), get(&up.endpoint, "/two"));
    assert_eq!(one, (http::StatusCode::OK, Bytes::from("/one")));
    assert_eq!(two, (http::StatusCode::OK, Bytes::from("/two")));
    assert_eq!(up.accepted(), 2);
    assert_eq!(up.endpoint.idle(), 2, "both kept");
}
