//! The live dashboard at `GET /` on the admin port: one HTML page with its script and
//! styles, compiled into the binary (no build step, nothing fetched from elsewhere).
//!
//! The page polls `GET /status` every second and redraws: groups (primary, epoch, head,
//! sealed, in-doubt record), hosts when the status has them, partitions (status, applied,
//! lag, host and rebuild progress when present, why the status last changed) and the
//! latest transitions with their reasons. Buttons send the admin verbs; the bearer token is
//! asked once, when the proxy first answers 401, and kept in the tab's `sessionStorage`.
//! The verbs are one table in the script (`VERBS`), so a new verb is one line there.

use http::{Response, StatusCode, header};

use crate::forward::{ProxyBody, full};

/// The page.
const PAGE: &str = include_str!("dashboard.html");

/// `GET /`: the dashboard.
pub(crate) fn page() -> Response<ProxyBody> {
    let mut resp = Response::new(full(PAGE));
    *resp.status_mut() = StatusCode::OK;
    let headers = resp.headers_mut();
    headers.insert(
        header::CONTENT_TYPE,
        header::HeaderValue::from_static("text/html; charset=utf-8"),
    );
    headers.insert(
        header::CACHE_CONTROL,
        header::HeaderValue::from_static("no-store"),
    );
    // The page runs only its own inline script and talks only to this admin port.
    headers.insert(
        header::CONTENT_SECURITY_POLICY,
        header::HeaderValue::from_static(
            "default-src 'none'; script-src 'unsafe-inline'; style-src 'unsafe-inline'; \
             connect-src 'self'; img-src 'self' data:; frame-ancestors 'none'",
        ),
    );
    headers.insert(
        header::X_CONTENT_TYPE_OPTIONS,
        header::HeaderValue::from_static("nosniff"),
    );
    resp
}
