//! The HTTP [`Applier`]: sends a journal record to a partition as a replay and returns the
//! fingerprint of its answer.

use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use http::Request;
use http_body_util::BodyExt;
use regroup_replay::layer::APPLIED_PATH;
use regroup_replay::signature::Secret;
use regroup_replay::{Applier, ApplyError, Fingerprint, Record};

use crate::forward::{Upstream, full, upstream_uri};
use crate::partition::Partition;
use crate::update::{error_chain, record_request};

/// Replays records on one partition over HTTP, with `Regroup-Replay: 1`.
#[derive(Debug, Clone)]
pub struct HttpApplier {
    client: Upstream,
    partition: Arc<Partition>,
    timeout: Duration,
    secret: Option<Secret>,
}

impl HttpApplier {
    /// An applier for `partition`; an answer slower than `timeout` counts as no answer.
    pub fn new(client: Upstream, partition: Arc<Partition>, timeout: Duration) -> Self {
        HttpApplier {
            client,
            partition,
            timeout,
            secret: None,
        }
    }

    /// Signs every replay with `secret` (none: unsigned).
    pub fn signed(mut self, secret: Option<Secret>) -> Self {
        self.secret = secret;
        self
    }
}

impl HttpApplier {
    /// Sends `req` and reads the whole answer within the time-out.
    async fn exchange(
        &self,
        req: Request<crate::forward::ProxyBody>,
    ) -> Result<(u16, Bytes), ApplyError> {
        let answer = tokio::time::timeout(self.timeout, async {
            let resp = self.client.request(req).await.map_err(|e| {
                if e.is_connect() {
                    ApplyError::Unreachable(error_chain(&e))
                } else {
                    ApplyError::NoAnswer(error_chain(&e))
                }
            })?;
            let status = resp.status().as_u16();
            let body = resp
                .into_body()
                .collect()
                .await
                .map_err(|e| ApplyError::NoAnswer(error_chain(&e)))?
                .to_bytes();
            Ok((status, body))
        })
        .await;
        answer.unwrap_or_else(|_| {
            Err(ApplyError::NoAnswer(format!(
                "no answer within {} ms",
                self.timeout.as_millis()
            )))
        })
    }
}

#[async_trait::async_trait]
impl Applier for HttpApplier {
    async fn apply(&self, record: &Record) -> Result<Fingerprint, ApplyError> {
        let req = record_request(record, self.partition.base(), true, self.secret.as_ref())
            .map_err(|e| ApplyError::Unreachable(format!("cannot build request: {e}")))?;
        let (status, body) = self.exchange(req).await?;
        Ok(Fingerprint::of(status, &body))
    }

    async fn position(&self) -> Result<Option<u64>, ApplyError> {
        let uri = upstream_uri(self.partition.base(), APPLIED_PATH)
            .map_err(|e| ApplyError::Unreachable(e.to_string()))?;
        let req = Request::get(uri)
            .body(full(Bytes::new()))
            .map_err(|e| ApplyError::Unreachable(e.to_string()))?;
        let (status, body) = self.exchange(req).await?;
        if !(200..300).contains(&status) {
            // Not an app-side layer: the journal checkpoint is the only record.
            return Ok(None);
        }
        Ok(serde_json::from_slice::<serde_json::Value>(&body)
            .ok()
            .and_then(|v| v.get("applied").and_then(|a| a.as_u64())))
    }
}
