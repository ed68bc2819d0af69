//! Raw HTTP/1.1 on TCP for tests that must see exact bytes: a recording upstream (records
//! each request it receives, byte for byte, and answers a fixed response) and a raw client
//! exchange.

use std::sync::{Arc, Mutex};
use std::time::Duration;

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};

/// The fixed answer of a [`Recorder`]: a 200 with hop-by-hop headers (and one named by
/// `Connection`) that a proxy must not pass on.
pub const RECORDER_ANSWER: &[u8] = b"HTTP/1.1 200 OK\r\n\
content-type: text/plain\r\n\
content-length: 2\r\n\
connection: x-upstream-secret\r\n\
x-upstream-secret: 1\r\n\
keep-alive: timeout=5\r\n\
proxy-authenticate: Basic\r\n\
x-upstream-visible: 1\r\n\
\r\n\
ok";

/// A raw upstream that records every request's bytes (head and body) and answers
/// [`RECORDER_ANSWER`], except requests for a path containing `/stall`, which it records
/// and never answers; stops when dropped.
pub struct Recorder {
    /// `http://127.0.0.1:PORT`.
    pub url: String,
    requests: Arc<Mutex<Vec<Vec<u8>>>>,
    task: tokio::task::JoinHandle<()>,
}

impl Recorder {
    pub async fn start() -> Recorder {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let url = format!("http://{}", listener.local_addr().unwrap());
        let requests = Arc::new(Mutex::new(Vec::new()));
        let shared = requests.clone();
        let task = tokio::spawn(async move {
            while let Ok((stream, _)) = listener.accept().await {
                tokio::spawn(record_connection(stream, shared.clone()));
            }
        });
        Recorder {
            url,
            requests,
            task,
        }
    }

    /// Every recorded request whose request line contains `needle`, as text.
    pub fn requests_with(&self, needle: &str) -> Vec<String> {
        self.requests
            .lock()
            .unwrap()
            .iter()
            .map(|r| String::from_utf8_lossy(r).into_owned())
            .filter(|r| r.lines().next().is_some_and(|l| l.contains(needle)))
            .collect()
    }
}

impl Drop for Recorder {
    fn drop(&mut self) {
        self.task.abort();
    }
}

fn find(hay: &[u8], needle: &[u8]) -> Option<usize> {
    hay.windows(needle.len()).position(|w| w == needle)
}

/// Reads requests off one connection, records them, answers each.
async fn record_connection(mut stream: TcpStream, requests: Arc<Mutex<Vec<Vec<u8>>>>) {
    let mut buf = Vec::new();
    loop {
        let Some(end) = read_until(&mut stream, &mut buf, |b| {
            find(b, b"\r\n\r\n").map(|i| i + 4)
        })
        .await
        else {
            return;
        };
        let head = String::from_utf8_lossy(&buf[..end]).to_ascii_lowercase();
        let length = head
            .lines()
            .find_map(|l| l.strip_prefix("content-length:"))
            .and_then(|v| v.trim().parse::<usize>().ok());
        let chunked = head
            .lines()
            .any(|l| l.starts_with("transfer-encoding:") && l.contains("chunked"));
        let total = if chunked {
            read_until(&mut stream, &mut buf, |b| {
                find(&b[end..], b"0\r\n\r\n").map(|i| end + i + 5)
            })
            .await
        } else {
            let want = end + length.unwrap_or(0);
            read_until(&mut stream, &mut buf, |b| (b.len() >= want).then_some(want)).await
        };
        let Some(total) = total else { return };
        let request: Vec<u8> = buf.drain(..total).collect();
        let stall = head.lines().next().is_some_and(|l| l.contains("/stall"));
        requests.lock().unwrap().push(request);
        if stall {
            std::future::pending::<()>().await;
        }
        if stream.write_all(RECORDER_ANSWER).await.is_err() {
            return;
        }
    }
}

/// Reads into `buf` until `done` finds the end of what is wanted; `None` at EOF.
async fn read_until(
    stream: &mut TcpStream,
    buf: &mut Vec<u8>,
    done: impl Fn(&[u8]) -> Option<usize>,
) -> Option<usize> {
    let mut chunk = [0u8; 16 * 1024];
    loop {
        if let Some(n) = done(buf) {
            return Some(n);
        }
        match stream.read(&mut chunk).await {
            Ok(0) | Err(_) => return None,
            Ok(n) => buf.extend_from_slice(&chunk[..n]),
        }
    }
}

/// What a raw exchange saw.
#[derive(Debug)]
pub struct Exchange {
    /// The answer's status, if one came.
    pub status: Option<u16>,
    /// Everything read until the server closed the connection (or the time-out).
    pub text: String,
    /// Whether the server closed the connection.
    pub closed: bool,
}

/// Connects to `addr`, writes `parts` one after the other with `pause` between them, and
/// reads until the server closes the connection or `wait` passes.
pub async fn exchange(addr: &str, parts: &[&[u8]], pause: Duration, wait: Duration) -> Exchange {
    let mut stream = TcpStream::connect(addr.trim_start_matches("http://"))
        .await
        .unwrap();
    for (i, part) in parts.iter().enumerate() {
        if i > 0 {
            tokio::time::sleep(pause).await;
        }
        if stream.write_all(part).await.is_err() {
            break;
        }
    }
    let mut got = Vec::new();
    let mut chunk = [0u8; 16 * 1024];
    let closed = tokio::time::timeout(wait, async {
        loop {
            match stream.read(&mut chunk).await {
                Ok(0) | Err(_) => return,
                Ok(n) => got.extend_from_slice(&chunk[..n]),
            }
        }
    })
    .await
    .is_ok();
    let text = String::from_utf8_lossy(&got).into_owned();
    let status = text
        .strip_prefix("HTTP/1.1 ")
        .and_then(|r| r.get(..3))
        .and_then(|s| s.parse().ok());
    Exchange {
        status,
        text,
        closed,
    }
}
