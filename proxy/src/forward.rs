//! Forwarding: the pooled upstream client (of updates, replays and supervision; reads have
//! their own connections, see `upstream`) and the header rules of a correct reverse proxy.
//!
//! hyper does not strip hop-by-hop headers, so this module drops `Connection` and every
//! header it names, `Keep-Alive`, `Proxy-*`, `TE`, `Trailer`, `Transfer-Encoding` and
//! `Upgrade`, in both directions, and adds `Forwarded` and `X-Forwarded-*` on the way in.

use std::net::SocketAddr;
use std::time::Duration;

use bytes::Bytes;
use http::header::{self, HeaderMap, HeaderName, HeaderValue};
use http::{Request, Response, Uri};
use http_body_util::combinators::UnsyncBoxBody;
use http_body_util::{BodyExt, Full};
use hyper::body::Incoming;
use hyper_util::client::legacy::Client;
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::rt::TokioExecutor;

/// A boxed error, as tower and hyper exchange them.
pub type BoxError = Box<dyn std::error::Error + Send + Sync>;

/// The body type the proxy sends and returns.
pub type ProxyBody = UnsyncBoxBody<Bytes, BoxError>;

/// The pooled HTTP/1 client used for every partition.
pub type Upstream = Client<HttpConnector, ProxyBody>;

/// A body holding `bytes`.
pub fn full(bytes: impl Into<Bytes>) -> ProxyBody {
    Full::new(bytes.into())
        .map_err(|never| match never {})
        .boxed_unsync()
}

/// Boxes a streaming body from hyper.
pub fn stream(body: Incoming) -> ProxyBody {
    body.map_err(BoxError::from).boxed_unsync()
}

/// A client with a keep-alive pool sized for a proxy.
pub fn upstream_client() -> Upstream {
    let mut connector = HttpConnector::new();
    connector.set_nodelay(true);
    connector.set_connect_timeout(Some(Duration::from_secs(2)));
    Client::builder(TokioExecutor::new())
        .pool_idle_timeout(Duration::from_secs(30))
        .pool_max_idle_per_host(256)
        .build(connector)
}

const HOP_BY_HOP: [&str; 9] = [
    "connection",
    "keep-alive",
    "proxy-connection",
    "proxy-authenticate",
    "proxy-authorization",
    "te",
    "trailer",
    "transfer-encoding",
    "upgrade",
];

/// Removes hop-by-hop headers, including every header named by `Connection`.
pub fn strip_hop_by_hop(headers: &mut HeaderMap) {
    // One pass without allocation in the common case (no hop-by-hop header at all).
    if !headers.keys().any(is_hop_by_hop) {
        return;
    }
    let named: Vec<HeaderName> = headers
        .get_all(header::CONNECTION)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(','))
        .filter_map(|name| HeaderName::from_bytes(name.trim().as_bytes()).ok())
        .collect();
    for name in named {
        headers.remove(name);
    }
    for name in HOP_BY_HOP {
        headers.remove(name);
    }
}

fn is_hop_by_hop(name: &HeaderName) -> bool {
    *name == header::CONNECTION
        || *name == header::TE
        || *name == header::TRAILER
        || *name == header::TRANSFER_ENCODING
        || *name == header::UPGRADE
        || *name == header::PROXY_AUTHENTICATE
        || *name == header::PROXY_AUTHORIZATION
        || name.as_str() == "keep-alive"
        || name.as_str() == "proxy-connection"
}

/// Removes the replay headers a client might send: only regroup sets them.
pub fn strip_replay_headers(headers: &mut HeaderMap) {
    if !headers.keys().any(|k| k.as_str().starts_with("regroup-")) {
        return;
    }
    for name in regroup_replay::headers::ALL {
        headers.remove(name);
    }
}

const X_FORWARDED_FOR: HeaderName = HeaderName::from_static("x-forwarded-for");
const X_FORWARDED_PROTO: HeaderName = HeaderName::from_static("x-forwarded-proto");
const X_FORWARDED_HOST: HeaderName = HeaderName::from_static("x-forwarded-host");

/// Adds `Forwarded`, `X-Forwarded-For`, `X-Forwarded-Proto` and `X-Forwarded-Host` for
/// a request received from `client`.
///
/// On every proxied request, so without formatting machinery on the way: the values for the
/// client address (and the host) seen last on this thread are kept ([`ForwardedFor`]), as a
/// connection's requests, and often every client behind one balancer, share them; a
/// request then costs header clones instead of text formatting and allocations.
pub fn add_forwarded(headers: &mut HeaderMap, client: Option<SocketAddr>) {
    let Some(client) = client else { return };
    let ip = client.ip();
    let host = headers
        .get(header::HOST)
        .filter(|h| h.to_str().is_ok())
        .cloned();
    LAST_CLIENT.with_borrow_mut(|last| {
        let seen = match last {
            Some(seen) if seen.ip == ip => seen,
            _ => last.insert(ForwardedFor::new(ip)),
        };
        let xff = match headers.get(&X_FORWARDED_FOR).and_then(|v| v.to_str().ok()) {
            Some(prev) => {
                let mut v = String::with_capacity(prev.len() + 2 + seen.text.len());
                v.push_str(prev);
                v.push_str(", ");
                v.push_str(&seen.text);
                HeaderValue::from_str(&v).ok()
            }
            None => seen.xff.clone(),
        };
        if let Some(v) = xff {
            headers.insert(X_FORWARDED_FOR, v);
        }
        if let Some(v) = seen.forwarded(host.as_ref()) {
            headers.append(header::FORWARDED, v);
        }
    });
    headers.insert(X_FORWARDED_PROTO, HeaderValue::from_static("http"));
    if let Some(h) = host {
        headers.insert(X_FORWARDED_HOST, h);
    }
}

thread_local! {
    /// The forwarding values of the client address seen last on this thread.
    static LAST_CLIENT: std::cell::RefCell<Option<ForwardedFor>> =
        const { std::cell::RefCell::new(None) };
}

/// The forwarding header values for one client address.
struct ForwardedFor {
    ip: std::net::IpAddr,
    /// The address as text.
    text: String,
    /// `X-Forwarded-For` of a request that carries none: the address alone.
    xff: Option<HeaderValue>,
    /// `Forwarded` for the `Host` seen last with this address (`None`: no `Host`).
    forwarded: Option<(Option<HeaderValue>, HeaderValue)>,
}

impl ForwardedFor {
    fn new(ip: std::net::IpAddr) -> Self {
        let text = ip.to_string();
        ForwardedFor {
            ip,
            xff: HeaderValue::from_str(&text).ok(),
            text,
            forwarded: None,
        }
    }

    /// `Forwarded: for=…;proto=http[;host="…"]` for a request with `host`.
    fn forwarded(&mut self, host: Option<&HeaderValue>) -> Option<HeaderValue> {
        if let Some((seen, value)) = &self.forwarded
            && seen.as_ref() == host
        {
            return Some(value.clone());
        }
        let host_text = host.and_then(|h| h.to_str().ok());
        let mut fwd = String::with_capacity(40 + host_text.map_or(0, str::len));
        fwd.push_str("for=");
        if self.ip.is_ipv6() {
            fwd.push_str("\"[");
            fwd.push_str(&self.text);
            fwd.push_str("]\"");
        } else {
            fwd.push_str(&self.text);
        }
        fwd.push_str(";proto=http");
        if let Some(h) = host_text {
            fwd.push_str(";host=\"");
            fwd.push_str(h);
            fwd.push('"');
        }
        let value = HeaderValue::from_str(&fwd).ok()?;
        self.forwarded = Some((host.cloned(), value.clone()));
        Some(value)
    }
}

/// The URI of `path_and_query` on the partition at `base`.
pub fn upstream_uri(base: &Uri, path_and_query: &str) -> Result<Uri, http::Error> {
    on_partition(base, &path_and_query.parse()?)
}

/// The URI of a request's `path_and_query` on the partition at `base` (without re-parsing:
/// the parts are shared, not copied).
pub(crate) fn on_partition(
    base: &Uri,
    path_and_query: &http::uri::PathAndQuery,
) -> Result<Uri, http::Error> {
    let mut parts = base.clone().into_parts();
    parts.path_and_query = Some(path_and_query.clone());
    Ok(Uri::from_parts(parts)?)
}

/// Prepares an upstream response for the client: hop-by-hop headers dropped.
pub fn client_response(resp: Response<Incoming>) -> Response<ProxyBody> {
    let (mut parts, body) = resp.into_parts();
    strip_hop_by_hop(&mut parts.headers);
    Response::from_parts(parts, stream(body))
}

/// Prepares a client request for a partition: hop-by-hop and replay headers dropped,
/// forwarded headers added. The URI is left for the chosen partition to complete.
pub fn prepare_request<B>(req: Request<B>, client: Option<SocketAddr>) -> Request<B> {
    let (mut parts, body) = req.into_parts();
    strip_hop_by_hop(&mut parts.headers);
    strip_replay_headers(&mut parts.headers);
    add_forwarded(&mut parts.headers, client);
    parts.version = http::Version::HTTP_11;
    Request::from_parts(parts, body)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn hop_by_hop_and_named_headers_are_dropped() {
        let mut h = HeaderMap::new();
        h.insert("connection", HeaderValue::from_static("close, x-secret"));
        h.insert("x-secret", HeaderValue::from_static("1"));
        h.insert("keep-alive", HeaderValue::from_static("timeout=5"));
        h.insert("transfer-encoding", HeaderValue::from_static("chunked"));
        h.insert("upgrade", HeaderValue::from_static("websocket"));
        h.insert("content-type", HeaderValue::from_static("text/plain"));
        h.insert("regroup-seq", HeaderValue::from_static("99"));
        strip_hop_by_hop(&mut h);
        strip_replay_headers(&mut h);
        let left: Vec<_> = h.keys().map(|k| k.as_str()).collect();
        assert_eq!(left, ["content-type"]);
    }

    #[test]
    fn forwarded_headers_extend_the_chain() {
        let mut h = HeaderMap::new();
        h.insert("host", HeaderValue::from_static("bank.example"));
        h.insert("x-forwarded-for", HeaderValue::from_static("10.0.0.1"));
        add_forwarded(&mut h, Some(SocketAddr::from(([127, 0, 0, 2], 5000))));
        assert_eq!(h["x-forwarded-for"], "10.0.0.1, 127.0.0.2");
        assert_eq!(
            h["forwarded"],
            "for=127.0.0.2;proto=http;host=\"bank.example\""
        );
        assert_eq!(h["x-forwarded-host"], "bank.example");
        assert_eq!(h["x-forwarded-proto"], "http");
        let mut h = HeaderMap::new();
        add_forwarded(&mut h, Some("[2001:db8::1]:443".parse().expect("addr")));
        assert_eq!(h["x-forwarded-for"], "2001:db8::1");
        assert_eq!(h["forwarded"], "for=\"[2001:db8::1]\";proto=http");
        assert!(!h.contains_key("x-forwarded-host"));
    }

    /// The values kept for the address seen last are never those of another address or
    /// another host.
    #[test]
    fn forwarded_values_follow_the_address_and_host() {
        let forward = |addr: [u8; 4], host: Option<&'static str>, xff: Option<&'static str>| {
            let mut h = HeaderMap::new();
            if let Some(host) = host {
                h.insert("host", HeaderValue::from_static(host));
            }
            if let Some(xff) = xff {
                h.insert("x-forwarded-for", HeaderValue::from_static(xff));
            }
            add_forwarded(&mut h, Some(SocketAddr::from((addr, 5000))));
            let get = |name: &str| h.get(name).map(|v| v.to_str().unwrap_or("?").to_owned());
            (
                get("x-forwarded-for"),
                get("forwarded"),
                get("x-forwarded-host"),
            )
        };
        let some = |s: &str| Some(s.to_owned());
        for _ in 0..2 {
            assert_eq!(
                forward([10, 0, 0, 1], Some("a.example"), None),
                (
                    some("10.0.0.1"),
                    some("for=10.0.0.1;proto=http;host=\"a.example\""),
                    some("a.example")
                )
            );
        }
        assert_eq!(
            forward([10, 0, 0, 1], Some("b.example"), Some("192.0.2.7")),
            (
                some("192.0.2.7, 10.0.0.1"),
                some("for=10.0.0.1;proto=http;host=\"b.example\""),
                some("b.example")
            )
        );
        assert_eq!(
            forward([10, 0, 0, 1], None, None),
            (some("10.0.0.1"), some("for=10.0.0.1;proto=http"), None)
        );
        assert_eq!(
            forward([10, 0, 0, 2], None, None),
            (some("10.0.0.2"), some("for=10.0.0.2;proto=http"), None)
        );
        assert_eq!(
            forward([10, 0, 0, 1], Some("a.example"), None),
            (
                some("10.0.0.1"),
                some("for=10.0.0.1;proto=http;host=\"a.example\""),
                some("a.example")
            )
        );
    }

    #[test]
    fn upstream_uri_keeps_path_and_query() {
        let base: Uri = "http://127.0.0.1:9001".parse().expect("uri");
        let u = upstream_uri(&base, "/a/b?c=1&d").expect("uri");
        assert_eq!(u.to_string(), "http://127.0.0.1:9001/a/b?c=1&d");
    }
}
