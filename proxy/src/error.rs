//! Proxy errors and the one place they become HTTP responses: a stable JSON body
//! `{"error": <code>, "message": <text>}`, a status that fits, no internal detail.

use http::{Response, StatusCode, header};

use crate::forward::{ProxyBody, full};

/// Why the proxy could not serve a request.
#[derive(Debug, thiserror::Error)]
pub enum ProxyError {
    /// The request body is over the group's limit (413; nothing journaled).
    #[error("request body is larger than the limit of {limit} bytes")]
    BodyTooLarge {
        /// The limit.
        limit: usize,
    },
    /// The request cannot be journaled or forwarded as sent (400; nothing journaled).
    #[error("{0}")]
    BadRequest(String),
    /// No group serves this path (404).
    #[error("no group serves path {0:?}")]
    NoGroup(String),
    /// No partition can serve a read now (503 + Retry-After).
    #[error("no partition of group {group:?} can serve reads: {reason}")]
    NoPartition {
        /// The group.
        group: String,
        /// Why.
        reason: String,
    },
    /// The group cannot take updates now (503 + Retry-After): an in-doubt record waits for
    /// resolution, or no primary.
    #[error("group {group:?} cannot take updates: {reason}")]
    Unavailable {
        /// The group.
        group: String,
        /// Why.
        reason: String,
    },
    /// The primary could not be reached; the update was not executed (502).
    #[error("primary {partition:?} of group {group:?} is unreachable: {reason}")]
    PrimaryUnreachable {
        /// The group.
        group: String,
        /// The primary.
        partition: String,
        /// Why.
        reason: String,
    },
    /// The primary may or may not have executed the update (502). Later updates wait until
    /// the record is resolved.
    #[error(
        "the outcome of update {seq} of group {group:?} is unknown (in doubt): {reason}; it will be resolved, not guessed"
    )]
    InDoubt {
        /// The group.
        group: String,
        /// The record.
        seq: u64,
        /// What happened.
        reason: String,
    },
    /// A read's partition failed (502).
    #[error("partition {partition:?} of group {group:?} failed: {reason}")]
    Upstream {
        /// The group.
        group: String,
        /// The partition.
        partition: String,
        /// Why.
        reason: String,
    },
    /// The journal could not record the update (503; nothing forwarded).
    #[error("journal unavailable: {0}")]
    Journal(String),
    /// The record does not exist (404).
    #[error("group {group:?} has no record {seq}")]
    NoSuchRecord {
        /// The group.
        group: String,
        /// The seq.
        seq: u64,
    },
    /// The record is not in doubt (409).
    #[error("record {seq} of group {group:?} is {state}, not in doubt")]
    NotInDoubt {
        /// The group.
        group: String,
        /// The seq.
        seq: u64,
        /// Its state.
        state: &'static str,
    },
    /// Another proxy owns the journal (refused at start, or taken over while serving).
    #[error("{0}")]
    JournalOwned(String),
    /// Admin verb without the right bearer token (401).
    #[error("missing or wrong admin bearer token")]
    Unauthorized,
}

impl ProxyError {
    /// The stable machine-readable code.
    pub fn code(&self) -> &'static str {
        match self {
            ProxyError::BodyTooLarge { .. } => "body_too_large",
            ProxyError::BadRequest(_) => "bad_request",
            ProxyError::NoGroup(_) => "no_group",
            ProxyError::NoPartition { .. } => "no_partition",
            ProxyError::Unavailable { .. } => "unavailable",
            ProxyError::PrimaryUnreachable { .. } => "primary_unreachable",
            ProxyError::InDoubt { .. } => "in_doubt",
            ProxyError::Upstream { .. } => "upstream_failed",
            ProxyError::Journal(_) => "journal_unavailable",
            ProxyError::JournalOwned(_) => "journal_owned",
            ProxyError::NoSuchRecord { .. } => "no_such_record",
            ProxyError::NotInDoubt { .. } => "not_in_doubt",
            ProxyError::Unauthorized => "unauthorized",
        }
    }

    /// The HTTP status.
    pub fn status(&self) -> StatusCode {
        match self {
            ProxyError::BodyTooLarge { .. } => StatusCode::PAYLOAD_TOO_LARGE,
            ProxyError::BadRequest(_) => StatusCode::BAD_REQUEST,
            ProxyError::NoGroup(_) | ProxyError::NoSuchRecord { .. } => StatusCode::NOT_FOUND,
            ProxyError::NoPartition { .. }
            | ProxyError::Unavailable { .. }
            | ProxyError::Journal(_)
            | ProxyError::JournalOwned(_) => StatusCode::SERVICE_UNAVAILABLE,
            ProxyError::PrimaryUnreachable { .. }
            | ProxyError::InDoubt { .. }
            | ProxyError::Upstream { .. } => StatusCode::BAD_GATEWAY,
            ProxyError::NotInDoubt { .. } => StatusCode::CONFLICT,
            ProxyError::Unauthorized => StatusCode::UNAUTHORIZED,
        }
    }

    /// The response a client sees.
    pub fn into_response(self) -> Response<ProxyBody> {
        let status = self.status();
        let mut body = serde_json::json!({ "error": self.code(), "message": self.to_string() });
        if let ProxyError::InDoubt { seq, .. } = &self {
            body["seq"] = (*seq).into();
        }
        let mut resp = Response::new(full(body.to_string()));
        *resp.status_mut() = status;
        let headers = resp.headers_mut();
        headers.insert(
            header::CONTENT_TYPE,
            header::HeaderValue::from_static("application/json"),
        );
        if status == StatusCode::SERVICE_UNAVAILABLE {
            headers.insert(header::RETRY_AFTER, header::HeaderValue::from_static("1"));
        }
        if status == StatusCode::UNAUTHORIZED {
            headers.insert(
                header::WWW_AUTHENTICATE,
                header::HeaderValue::from_static("Bearer"),
            );
        }
        resp
    }
}
