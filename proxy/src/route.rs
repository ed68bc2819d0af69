//! The client-facing service: picks the group by path prefix, classifies the request, and
//! sends updates down the journaled path and reads to the balancer.
//!
//! [`RegroupLayer`] makes this a Tower layer: requests no group serves fall through to the
//! wrapped service, so regroup can sit inside an existing server.

use std::future::Future;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::task::{Context, Poll};

use bytes::Bytes;
use http::{Request, Response};
use http_body_util::BodyExt;
use tower::{Layer, Service};

use crate::classify::Kind;
use crate::error::ProxyError;
use crate::forward::{self, BoxError, ProxyBody};
use crate::group::Group;
use crate::read::{Consistency, Reads};
use crate::update;
use crate::upstream;

/// The client's address, as a request extension: how a server that embeds the layer says
/// where a request came from (regroup's own server sets it per connection instead, see
/// [`client_addr`]).
#[derive(Debug, Clone, Copy)]
pub struct ClientAddr(pub SocketAddr);

tokio::task_local! {
    /// The address of the client whose connection the current task serves (regroup's own
    /// server: one task per client connection). Kept beside the connection rather than in
    /// every request's extensions, which cost two allocations per request.
    pub(crate) static CLIENT: SocketAddr;
}

/// Where `req` came from: its [`ClientAddr`] extension, else the client of the connection
/// the current task serves.
pub(crate) fn client_addr<B>(req: &Request<B>) -> Option<SocketAddr> {
    req.extensions()
        .get::<ClientAddr>()
        .map(|c| c.0)
        .or_else(|| CLIENT.try_with(|c| *c).ok())
}

/// A group and its read balancer, as the router sees them.
#[derive(Debug, Clone)]
pub(crate) struct Routed {
    pub(crate) group: Arc<Group>,
    pub(crate) reads: Arc<Reads>,
    /// The runtime the group's background tasks run on: updates arriving on a client
    /// thread's own runtime run there (see [`dispatch`]).
    pub(crate) runtime: tokio::runtime::Handle,
    /// Served on a client thread's own runtime (with that thread's `reads`).
    pub(crate) on_client_thread: bool,
}

/// Routes requests to regroup's groups; others go to the inner service.
#[derive(Debug, Clone)]
pub struct Regroup<S> {
    routes: Arc<Vec<Routed>>,
    inner: S,
}

/// Layer that puts [`Regroup`] in front of a service.
#[derive(Debug, Clone)]
pub struct RegroupLayer {
    routes: Arc<Vec<Routed>>,
}

impl RegroupLayer {
    pub(crate) fn new(mut routes: Vec<Routed>) -> Self {
        // Longest prefix first, so `/api/v2` wins over `/api` and `/`.
        routes.sort_by_key(|r| std::cmp::Reverse(r.group.config.path_prefix.len()));
        RegroupLayer {
            routes: Arc::new(routes),
        }
    }
}

impl<S> Layer<S> for RegroupLayer {
    type Service = Regroup<S>;

    fn layer(&self, inner: S) -> Self::Service {
        Regroup {
            routes: self.routes.clone(),
            inner,
        }
    }
}

impl<S> Regroup<S> {
    /// The wrapped service.
    pub fn get_ref(&self) -> &S {
        &self.inner
    }

    /// Unwraps the inner service.
    pub fn into_inner(self) -> S {
        self.inner
    }
}

pub(crate) fn prefix_matches(prefix: &str, path: &str) -> bool {
    prefix == "/"
        || path == prefix
        || (path.starts_with(prefix)
            && (prefix.ends_with('/') || path.as_bytes().get(prefix.len()) == Some(&b'/')))
}

impl<S, B, ResB> Service<Request<B>> for Regroup<S>
where
    S: Service<Request<B>, Response = Response<ResB>> + Clone + Send + 'static,
    S::Future: Send + 'static,
    S::Error: Into<BoxError>,
    B: http_body::Body<Data = Bytes> + Send + 'static,
    B::Error: Into<BoxError>,
    ResB: http_body::Body<Data = Bytes> + Send + 'static,
    ResB::Error: Into<BoxError>,
{
    type Response = Response<ProxyBody>;
    type Error = BoxError;
    type Future = Pin<Box<dyn Future<Output = Result<Self::Response, Self::Error>> + Send>>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        self.inner.poll_ready(cx).map_err(Into::into)
    }

    fn call(&mut self, req: Request<B>) -> Self::Future {
        let path = req.uri().path();
        let Some(routed) = self
            .routes
            .iter()
            .find(|r| prefix_matches(&r.group.config.path_prefix, path))
            .cloned()
        else {
            let fut = self.inner.call(req);
            return Box::pin(async move {
                let resp = fut.await.map_err(Into::into)?;
                Ok(resp.map(|b| b.map_err(Into::into).boxed_unsync()))
            });
        };
        Box::pin(async move {
            let resp = match dispatch(routed, req).await {
                Ok(resp) => resp,
                Err(e) => e.into_response(),
            };
            Ok(resp)
        })
    }
}

async fn dispatch<B>(routed: Routed, req: Request<B>) -> Result<Response<ProxyBody>, ProxyError>
where
    B: http_body::Body<Data = Bytes> + Send + 'static,
    B::Error: Into<BoxError>,
{
    let client = client_addr(&req);
    let req = strip_prefix(&routed.group.config, req)?;
    let kind = routed
        .group
        .classifier
        .classify(req.method(), req.uri().path());
    match kind {
        // A connection served on a client thread's own runtime reads its update's request
        // there and hands the journaled part to the group's runtime, where the journal, the
        // replayers and supervision run: an update's work outlives no client runtime.
        Kind::Update if routed.on_client_thread => {
            update::handle_on(routed.group, req, client, &routed.runtime).await
        }
        Kind::Update => update::handle(routed.group, req, client).await,
        Kind::Read => {
            // A read's body streams to the partition; when the client is too slow sending
            // it (the body deadline), the failed exchange is the client's: 408, not 502.
            // The usual bodiless read sends an empty body instead (nothing allocated).
            let bodiless = has_no_body(&req);
            let body_late = (!bodiless).then(|| Arc::new(AtomicBool::new(false)));
            let late = body_late.clone();
            let mut req = req.map(|b| {
                if bodiless {
                    return upstream::empty();
                }
                b.map_err(move |e| {
                    let e: BoxError = e.into();
                    if let Some(late) = &late
                        && e.is::<tower_http::timeout::TimeoutError>()
                    {
                        late.store(true, Ordering::Relaxed);
                    }
                    e
                })
                .boxed_unsync()
            });
            let body_late = move || {
                body_late
                    .as_ref()
                    .is_some_and(|l| l.load(Ordering::Relaxed))
            };
            let consistency = Consistency::take_from(req.headers_mut())?;
            let req = forward::prepare_request(req, client);
            // Bounded until the partition's answer headers arrive (`read_timeout_ms`, 504).
            let timeout = routed.group.config.read_timeout();
            let started = std::time::Instant::now();
            let resp = tokio::time::timeout(
                timeout,
                routed
                    .reads
                    .call_consistent(&routed.group, req, consistency),
            )
            .await;
            let result = match resp {
                Err(_) if body_late() => Err(ProxyError::BodyTimeout),
                Err(_) => Err(ProxyError::ReadTimeout {
                    group: routed.group.name().to_owned(),
                    ms: routed.group.config.read_timeout_ms,
                }),
                Ok(resp) => match resp {
                    Ok(resp) => Ok(upstream::client_response(resp)),
                    Err(_) if body_late() => Err(ProxyError::BodyTimeout),
                    Err(e) => Err(e),
                },
            };
            routed.group.metrics.read_done(&result, started.elapsed());
            result
        }
    }
}

/// With `strip_prefix`, removes the group's path prefix before the request is classified,
/// journaled and forwarded (`/bank/accounts?x` reaches the partitions as `/accounts?x`).
pub(crate) fn strip_prefix<B>(
    config: &crate::config::GroupConfig,
    mut req: Request<B>,
) -> Result<Request<B>, ProxyError> {
    let prefix = config.path_prefix.trim_end_matches('/');
    if !config.strip_prefix || prefix.is_empty() {
        return Ok(req);
    }
    let pq = req.uri().path_and_query().map_or("/", |pq| pq.as_str());
    let rest = pq.strip_prefix(prefix).unwrap_or(pq);
    let rest = if rest.is_empty() || rest.starts_with('?') {
        format!("/{rest}")
    } else {
        rest.to_owned()
    };
    *req.uri_mut() = rest
        .parse()
        .map_err(|e| ProxyError::BadRequest(format!("bad request target {rest:?}: {e}")))?;
    Ok(req)
}

/// Whether a request carries no body, so it can be sent again to another partition when
/// the first one refused the connection.
pub(crate) fn has_no_body<B>(req: &Request<B>) -> bool {
    let h = req.headers();
    !h.contains_key(http::header::TRANSFER_ENCODING)
        && h.get(http::header::CONTENT_LENGTH)
            .is_none_or(|v| v.as_bytes() == b"0")
}

#[cfg(test)]
mod body_tests {
    use super::has_no_body;

    #[test]
    fn only_bodiless_requests_are_retried() {
        let get = http::Request::get("/").body(()).expect("request");
        assert!(has_no_body(&get));
        let post = http::Request::post("/")
            .header("content-length", "3")
            .body(())
            .expect("request");
        assert!(!has_no_body(&post));
    }
}

#[cfg(test)]
mod tests {
    use super::prefix_matches;

    #[test]
    fn strip_prefix_keeps_the_rest_and_the_query() {
        let text = "[[groups]]\nname = \"g\"\npath_prefix = \"/bank\"\nstrip_prefix = true\n[[groups.partitions]]\nname = \"a\"\nurl = \"http://127.0.0.1:1\"\n";
        let config = crate::Config::parse(text, std::path::Path::new("x.toml")).expect("valid");
        let g = &config.groups[0];
        for (from, to) in [
            ("/bank/accounts?x=1", "/accounts?x=1"),
            ("/bank", "/"),
            ("/bank?q", "/?q"),
            ("/bank/", "/"),
        ] {
            let req = http::Request::get(from).body(()).expect("request");
            let req = super::strip_prefix(g, req).expect("stripped");
            assert_eq!(req.uri().to_string(), to, "from {from}");
        }
    }

    #[test]
    fn prefixes_match_whole_segments() {
        assert!(prefix_matches("/", "/anything"));
        assert!(prefix_matches("/api", "/api"));
        assert!(prefix_matches("/api", "/api/x"));
        assert!(!prefix_matches("/api", "/apix"));
        assert!(prefix_matches("/api/", "/api/x"));
    }
}
