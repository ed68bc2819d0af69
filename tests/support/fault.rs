//! Fault injection for the end-to-end tests, outside the programs under test: an
//! [`Interposer`] is a tiny HTTP forwarder that the proxy reaches instead of a bank. It
//! passes every request through unchanged, except the primary's execution (`Regroup-Seq`
//! without `Regroup-Replay`) of the one seq its [`Fault`] names.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::time::Duration;

use bytes::Bytes;
use http::{Request, Response};
use http_body_util::{BodyExt, Full};
use hyper::body::Incoming;
use hyper_util::client::legacy::Client;
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::rt::{TokioExecutor, TokioIo};

type BoxError = Box<dyn std::error::Error + Send + Sync>;

/// What the interposer does to the primary's execution of one seq.
#[derive(Debug, Clone, Copy)]
pub enum Fault {
    /// Forward it, wait for the bank's answer (it has committed), then SIGKILL the bank and
    /// close the proxy's connection without answering: a crash between commit and answer.
    /// Once: the restarted bank is reached normally.
    ExitAfterSeq(u64),
    /// Hold it this long before forwarding it, every time it comes.
    DelaySeq(u64, Duration),
}

struct State {
    fault: Fault,
    bank: String,
    pid: Option<u32>,
    holds: AtomicUsize,
    killed: AtomicBool,
    client: Client<HttpConnector, Full<Bytes>>,
}

/// A running interposer in front of one bank; stops accepting when dropped.
pub struct Interposer {
    /// Its address, `http://127.0.0.1:PORT`: the partition URL the proxy gets.
    pub url: String,
    state: Arc<State>,
    task: tokio::task::JoinHandle<()>,
}

impl Interposer {
    /// Starts an interposer in front of the bank at `bank` (process `pid`).
    pub async fn start(bank: &str, pid: Option<u32>, fault: Fault) -> Interposer {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let url = format!("http://{}", listener.local_addr().unwrap());
        let state = Arc::new(State {
            fault,
            bank: bank.to_owned(),
            pid,
            holds: AtomicUsize::new(0),
            killed: AtomicBool::new(false),
            client: Client::builder(TokioExecutor::new()).build(HttpConnector::new()),
        });
        let shared = state.clone();
        let task = tokio::spawn(async move {
            while let Ok((stream, _)) = listener.accept().await {
                let state = shared.clone();
                let svc = hyper::service::service_fn(move |req| forward(state.clone(), req));
                tokio::spawn(async move {
                    let _ = hyper::server::conn::http1::Builder::new()
                        .serve_connection(TokioIo::new(stream), svc)
                        .await;
                });
            }
        });
        Interposer { url, state, task }
    }

    /// How many times the delayed seq was held.
    pub fn holds(&self) -> usize {
        self.state.holds.load(Ordering::SeqCst)
    }

    /// Whether the bank was killed after committing the seq.
    pub fn killed(&self) -> bool {
        self.state.killed.load(Ordering::SeqCst)
    }
}

impl Drop for Interposer {
    fn drop(&mut self) {
        self.task.abort();
    }
}

/// The seq of a primary's execution (not a replay).
fn primary_seq<B>(req: &Request<B>) -> Option<u64> {
    if req.headers().contains_key("regroup-replay") {
        return None;
    }
    req.headers()
        .get("regroup-seq")?
        .to_str()
        .ok()?
        .parse()
        .ok()
}

async fn forward(
    state: Arc<State>,
    req: Request<Incoming>,
) -> Result<Response<Full<Bytes>>, BoxError> {
    let seq = primary_seq(&req);
    if let (Fault::DelaySeq(n, hold), Some(seq)) = (state.fault, seq)
        && n == seq
    {
        state.holds.fetch_add(1, Ordering::SeqCst);
        tokio::time::sleep(hold).await;
    }
    let (parts, body) = req.into_parts();
    let body = body.collect().await?.to_bytes();
    let target = format!(
        "{}{}",
        state.bank,
        parts.uri.path_and_query().map_or("/", |pq| pq.as_str())
    );
    let mut upstream = Request::builder().method(parts.method).uri(target);
    for (name, value) in &parts.headers {
        if name != http::header::HOST {
            upstream = upstream.header(name, value);
        }
    }
    let resp = state
        .client
        .request(upstream.body(Full::new(body))?)
        .await?;
    let (parts, body) = resp.into_parts();
    let body = body.collect().await?.to_bytes();
    if let (Fault::ExitAfterSeq(n), Some(seq)) = (state.fault, seq)
        && n == seq
        && !state.killed.swap(true, Ordering::SeqCst)
    {
        super::sigkill(state.pid);
        // An error from the service makes hyper close the connection without an answer.
        return Err(format!("fault: bank killed after committing seq {seq}").into());
    }
    let mut resp = Response::from_parts(parts, Full::new(body));
    resp.headers_mut().remove(http::header::TRANSFER_ENCODING);
    Ok(resp)
}
