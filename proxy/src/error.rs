//! Proxy errors and the one place they become HTTP responses: a stable JSON body
//! `{"error": <code>, "message": <text>}`, a status that fits, no internal detail.
//!
//! The `Display` text of an error is for the log: it may name files, SQL, partitions' URLs
//! and upstream error chains. A client sees [`ProxyError::public_message`] only: for errors
//! about its own request (4xx), and for a group that cannot take updates (503: the reason is
//! the group's state in the proxy's words), the full text; for the proxy's other failures a
//! short fixed sentence naming the group. The detail is logged
//! by [`ProxyError::into_response`] under the same code.

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
    /// The update's record is larger than the journal holds in one entry (413; nothing
    /// journaled): the group's `max_body_bytes` is above what its journal takes.
    #[error("{0}")]
    RecordTooLarge(String),
    /// The request cannot be journaled or forwarded as sent (400; nothing journaled).
    #[error("{0}")]
    BadRequest(String),
    /// The client did not send the whole request body within `body_read_timeout_ms`
    /// (408; nothing journaled).
    #[error("request body not received within the time-out (body_read_timeout_ms)")]
    BodyTimeout,
    /// The request body could not be read from the client (400; nothing journaled).
    #[error("cannot read request body: {0}")]
    BodyRead(String),
    /// A partition did not answer a read within `read_timeout_ms` (504).
    #[error("no partition of group {group:?} answered a read within {ms} ms")]
    ReadTimeout {
        /// The group.
        group: String,
        /// The time-out.
        ms: u64,
    },
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
    /// The configuration disagrees with the journal (the proxy refuses to start).
    #[error("{0}")]
    Config(String),
}

impl ProxyError {
    /// The stable machine-readable code.
    pub fn code(&self) -> &'static str {
        match self {
            ProxyError::BodyTooLarge { .. } | ProxyError::RecordTooLarge(_) => "body_too_large",
            ProxyError::BadRequest(_) => "bad_request",
            ProxyError::BodyTimeout => "body_timeout",
            ProxyError::BodyRead(_) => "body_unreadable",
            ProxyError::ReadTimeout { .. } => "read_timeout",
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
            ProxyError::Config(_) => "config",
        }
    }

    /// The HTTP status.
    pub fn status(&self) -> StatusCode {
        match self {
            ProxyError::BodyTooLarge { .. } | ProxyError::RecordTooLarge(_) => {
                StatusCode::PAYLOAD_TOO_LARGE
            }
            ProxyError::BadRequest(_) | ProxyError::BodyRead(_) => StatusCode::BAD_REQUEST,
            ProxyError::BodyTimeout => StatusCode::REQUEST_TIMEOUT,
            ProxyError::ReadTimeout { .. } => StatusCode::GATEWAY_TIMEOUT,
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
            ProxyError::Config(_) => StatusCode::INTERNAL_SERVER_ERROR,
        }
    }

    /// An error met while reading a request body (through `limit`, the body read
    /// deadline and hyper): 413, 408 or 400.
    pub fn from_body_error(error: crate::forward::BoxError, limit: usize) -> Self {
        if error
            .downcast_ref::<http_body_util::LengthLimitError>()
            .is_some()
        {
            ProxyError::BodyTooLarge { limit }
        } else if error
            .downcast_ref::<tower_http::timeout::TimeoutError>()
            .is_some()
        {
            ProxyError::BodyTimeout
        } else {
            ProxyError::BodyRead(error.to_string())
        }
    }

    /// What a client is told: no file, SQL, URL or upstream error chain.
    pub fn public_message(&self) -> String {
        match self {
            ProxyError::BodyTooLarge { .. }
            | ProxyError::RecordTooLarge(_)
            | ProxyError::BadRequest(_)
            | ProxyError::BodyTimeout
            | ProxyError::NoGroup(_)
            | ProxyError::NoSuchRecord { .. }
            | ProxyError::NotInDoubt { .. }
            | ProxyError::Unauthorized
            // The reason is the group's own state in the proxy's words (what is in doubt,
            // which partition could not take the role), and tells the operator what to do.
            | ProxyError::Unavailable { .. } => self.to_string(),
            ProxyError::BodyRead(_) => "cannot read request body".to_owned(),
            ProxyError::NoPartition { group, .. } => {
                format!("no partition of group {group:?} can serve reads now")
            }
            ProxyError::PrimaryUnreachable { group, .. } => {
                format!(
                    "the primary of group {group:?} is unreachable; the update was not executed"
                )
            }
            ProxyError::InDoubt { group, seq, .. } => format!(
                "the outcome of update {seq} of group {group:?} is unknown (in doubt); it will be resolved, not guessed"
            ),
            ProxyError::Upstream { group, .. } => {
                format!("a partition of group {group:?} failed to answer")
            }
            ProxyError::ReadTimeout { .. } => self.to_string(),
            ProxyError::Journal(_) => "the journal is unavailable".to_owned(),
            ProxyError::Config(_) => "the proxy is misconfigured".to_owned(),
            ProxyError::JournalOwned(_) => "the journal is owned by another proxy".to_owned(),
        }
    }

    /// The response a client sees; the full error goes to the log.
    pub fn into_response(self) -> Response<ProxyBody> {
        let status = self.status();
        if status.is_server_error() {
            tracing::warn!(code = self.code(), error = %self, "request failed");
        } else {
            tracing::debug!(code = self.code(), error = %self, "request refused");
        }
        let mut body =
            serde_json::json!({ "error": self.code(), "message": self.public_message() });
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

#[cfg(test)]
mod tests {
    use http_body_util::BodyExt;

    use super::*;

    async fn body_of(e: ProxyError) -> (StatusCode, serde_json::Value) {
        let resp = e.into_response();
        let status = resp.status();
        let bytes = resp
            .into_body()
            .collect()
            .await
            .map(|b| b.to_bytes())
            .unwrap_or_default();
        (status, serde_json::from_slice(&bytes).unwrap_or_default())
    }

    #[tokio::test]
    async fn server_errors_carry_no_internal_detail() {
        let detail = "error returned from database: (code: 8) attempt to write a readonly \
                      database /var/lib/regroup/journal.db: INSERT INTO records (seq) VALUES (?)";
        for e in [
            ProxyError::Journal(detail.to_owned()),
            ProxyError::Upstream {
                group: "bank".into(),
                partition: "b".into(),
                reason: format!("http://10.0.0.7:9002/accounts: {detail}"),
            },
            ProxyError::InDoubt {
                group: "bank".into(),
                seq: 7,
                reason: detail.to_owned(),
            },
            ProxyError::BodyRead(detail.to_owned()),
        ] {
            let code = e.code();
            let (status, body) = body_of(e).await;
            let text = body.to_string();
            assert_eq!(body["error"], code, "{text}");
            for leak in ["/var/lib", "journal.db", "INSERT", "database", "10.0.0.7"] {
                assert!(!text.contains(leak), "{status}: {text} leaks {leak:?}");
            }
        }
    }

    #[tokio::test]
    async fn limits_get_their_statuses() {
        let (s, b) = body_of(ProxyError::BodyTimeout).await;
        assert_eq!(
            (s.as_u16(), b["error"].as_str()),
            (408, Some("body_timeout"))
        );
        let (s, _) = body_of(ProxyError::ReadTimeout {
            group: "g".into(),
            ms: 5,
        })
        .await;
        assert_eq!(s.as_u16(), 504);
    }
}
