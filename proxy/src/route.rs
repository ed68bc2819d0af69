//! The client-facing service: picks the group by path prefix, classifies the request, and
//! sends updates down the journaled path and reads to the balancer.
//!
//! [`RegroupLayer`] makes this a Tower layer: requests no group serves fall through to the
//! wrapped service, so regroup can sit inside an existing server.

use std::future::Future;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};

use bytes::Bytes;
use http::{Request, Response};
use http_body_util::BodyExt;
use tower::{Layer, Service};

use crate::classify::Kind;
use crate::error::ProxyError;
use crate::forward::{self, BoxError, ProxyBody};
use crate::group::Group;
use crate::read::Reads;
use crate::update;

/// The client's address, as a request extension (set by the server per connection).
#[derive(Debug, Clone, Copy)]
pub struct ClientAddr(pub SocketAddr);

/// A group and its read balancer, as the router sees them.
#[derive(Debug, Clone)]
pub(crate) struct Routed {
    pub(crate) group: Arc<Group>,
    pub(crate) reads: Arc<Reads>,
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

fn prefix_matches(prefix: &str, path: &str) -> bool {
    prefix == "/"
        || path == prefix
        || (path.starts_with(prefix)
            && (prefix.ends_with('/') || path.as_bytes().get(prefix.len()) == Some(&b'/')))
}

impl<S, B> Service<Request<B>> for Regroup<S>
where
    S: Service<Request<B>, Response = Response<ProxyBody>> + Clone + Send + 'static,
    S::Future: Send + 'static,
    S::Error: Into<BoxError>,
    B: http_body::Body<Data = Bytes> + Send + 'static,
    B::Error: Into<BoxError>,
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
            return Box::pin(async move { fut.await.map_err(Into::into) });
        };
        Box::pin(async move {
            let resp = match dispatch(routed, req).await {
                Ok(resp) => resp,
                Err(e) => {
                    tracing::debug!(error = %e, "request failed");
                    e.into_response()
                }
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
    let client = req.extensions().get::<ClientAddr>().map(|c| c.0);
    let kind = routed
        .group
        .classifier
        .classify(req.method(), req.uri().path());
    match kind {
        Kind::Update => update::handle(routed.group, req, client).await,
        Kind::Read => {
            let req = req.map(|b| b.map_err(Into::into).boxed_unsync());
            let req = forward::prepare_request(req, client);
            let resp = routed.reads.call(&routed.group, req).await?;
            Ok(forward::client_response(resp))
        }
    }
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
    fn prefixes_match_whole_segments() {
        assert!(prefix_matches("/", "/anything"));
        assert!(prefix_matches("/api", "/api"));
        assert!(prefix_matches("/api", "/api/x"));
        assert!(!prefix_matches("/api", "/apix"));
        assert!(prefix_matches("/api/", "/api/x"));
    }
}
