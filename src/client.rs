//! A small HTTP/1 client for the CLI verbs (`status`, `resolve`) and the demo.

use std::time::Duration;

use anyhow::{Context, anyhow};
use bytes::Bytes;
use http_body_util::{BodyExt, Full};
use hyper_util::client::legacy::Client;
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::rt::TokioExecutor;

/// A pooled client.
#[derive(Debug, Clone)]
pub struct HttpClient {
    inner: Client<HttpConnector, Full<Bytes>>,
}

/// An answer: status and body.
#[derive(Debug, Clone)]
pub struct Answer {
    /// HTTP status code.
    pub status: u16,
    /// The body.
    pub body: Bytes,
}

impl Answer {
    /// The body parsed as JSON.
    pub fn json<T: serde::de::DeserializeOwned>(&self) -> anyhow::Result<T> {
        serde_json::from_slice(&self.body).with_context(|| {
            format!(
                "answer is not the expected JSON: {}",
                String::from_utf8_lossy(&self.body)
            )
        })
    }
}

impl Default for HttpClient {
    fn default() -> Self {
        Self::new()
    }
}

impl HttpClient {
    /// A new client.
    pub fn new() -> Self {
        HttpClient {
            inner: Client::builder(TokioExecutor::new()).build(HttpConnector::new()),
        }
    }

    /// Sends a request with an optional JSON body and bearer token; 10 s time-out.
    pub async fn send(
        &self,
        method: &str,
        url: &str,
        body: Option<&serde_json::Value>,
        token: Option<&str>,
    ) -> anyhow::Result<Answer> {
        let mut req = http::Request::builder().method(method).uri(url);
        if body.is_some() {
            req = req.header("content-type", "application/json");
        }
        if let Some(t) = token {
            req = req.header("authorization", format!("Bearer {t}"));
        }
        let bytes = body.map(|b| b.to_string()).unwrap_or_default();
        let req = req
            .body(Full::new(Bytes::from(bytes)))
            .with_context(|| format!("bad request to {url}"))?;
        let resp = tokio::time::timeout(Duration::from_secs(10), self.inner.request(req))
            .await
            .map_err(|_| anyhow!("{method} {url}: no answer within 10 s"))?
            .with_context(|| format!("{method} {url}"))?;
        let status = resp.status().as_u16();
        let body = resp
            .into_body()
            .collect()
            .await
            .with_context(|| format!("{method} {url}: reading the answer"))?
            .to_bytes();
        Ok(Answer { status, body })
    }

    /// `GET url`.
    pub async fn get(&self, url: &str) -> anyhow::Result<Answer> {
        self.send("GET", url, None, None).await
    }

    /// `POST url` with a JSON body.
    pub async fn post(&self, url: &str, body: &serde_json::Value) -> anyhow::Result<Answer> {
        self.send("POST", url, Some(body), None).await
    }
}
