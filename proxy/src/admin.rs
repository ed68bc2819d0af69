//! The admin API on `admin_listen`: `GET /status` (JSON), `GET /health`, and the admin
//! verbs (bearer token when configured): `POST /groups/{group}/resolve` (settle an in-doubt
//! record), `POST /groups/{group}/promote`, `/drain`, `/undrain` (`{"partition": NAME}`),
//! `/rejoin` (`{"partition": NAME, "applied": SEQ}`: lift a diverged partition's quarantine),
//! and the membership verbs `/add` (`{"partition", "url", "host"?, "priority"?}`), `/remove`
//! (`{"partition"}`) and `/move` (`{"partition", "to": GROUP}`); `/rebuild`
//! (`{"partition": NAME, "from": NAME?}`: 202, then progress in `/status`).
//!
//! `GET /metrics` (Prometheus text, [`crate::metrics`]), `GET /` (the live dashboard) and
//! `GET /groups/{group}/journal?after=N` (the change feed, NDJSON; needs the token).
//!
//! Hardening: the token is compared in constant time; with `admin_status_requires_token`
//! `/status` needs it too (`/health` never does); bodies over `admin_max_body_bytes` get 413.

use std::sync::Arc;

use bytes::Bytes;
use http::{Method, Request, Response, StatusCode, header};
use http_body_util::{BodyExt, Limited};
use serde::{Deserialize, Serialize};
use subtle::ConstantTimeEq;

use crate::error::ProxyError;
use crate::forward::{ProxyBody, full};
use crate::group::{Group, GroupView};
use crate::partition::PartitionView;

/// `GET /status`.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct StatusDoc {
    /// Every group.
    pub groups: Vec<GroupStatus>,
    /// The computing systems named by partitions' `host`, across groups.
    #[serde(default)]
    pub hosts: Vec<HostStatus>,
    /// With `proxies = "several"`: which proxy answers and which leads.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub proxy: Option<ProxyStatus>,
}

/// Which proxy answered `/status` and which leads the journal (`proxies = "several"`).
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct ProxyStatus {
    /// `leader` or `follower`: what the answering proxy is.
    pub role: String,
    /// The answering proxy (host, pid, addresses).
    pub this: String,
    /// The proxy holding the journal's lease.
    pub leader: String,
}

/// One computing system in `/status`: the partitions that run on it, in every group.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct HostStatus {
    /// The host's name (the partitions' `host`).
    pub name: String,
    /// `up` (every partition answers), `degraded` (some do not), `suspect` (none answers,
    /// not all have missed `heartbeat_retries` yet) or `down` (none has answered for
    /// `heartbeat_retries` heartbeats: the computing system is taken as failed).
    pub status: String,
    /// Its partitions as `group/partition`.
    pub partitions: Vec<String>,
    /// How many of them answer heartbeats.
    pub answering: usize,
}

impl HostStatus {
    /// The hosts named by `groups`' partitions, by name.
    fn of(groups: &[Arc<Group>], views: &[GroupView]) -> Vec<HostStatus> {
        let mut hosts: std::collections::BTreeMap<String, (Vec<String>, usize, usize)> =
            std::collections::BTreeMap::new();
        for (g, view) in groups.iter().zip(views) {
            let retries = g.config().heartbeat_retries;
            for p in &view.partitions {
                let Some(host) = &p.host else { continue };
                let h = hosts.entry(host.clone()).or_default();
                h.0.push(format!("{}/{}", view.name, p.name));
                h.1 += usize::from(p.missed == 0);
                h.2 += usize::from(p.missed >= retries);
            }
        }
        hosts
            .into_iter()
            .map(|(name, (partitions, answering, failed))| {
                let status = if answering == partitions.len() {
                    "up"
                } else if answering > 0 {
                    "degraded"
                } else if failed == partitions.len() {
                    "down"
                } else {
                    "suspect"
                };
                HostStatus {
                    name,
                    status: status.to_owned(),
                    partitions,
                    answering,
                }
            })
            .collect()
    }
}

/// One group in `/status`.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct GroupStatus {
    /// Name.
    pub name: String,
    /// The primary partition's name.
    pub primary: String,
    /// The primary's term.
    pub epoch: u64,
    /// Highest seq in the journal.
    pub head: u64,
    /// Highest seq up to which every record is sealed.
    pub sealed: u64,
    /// Records whose execution is unknown; updates wait until they are resolved.
    pub in_doubt: Vec<u64>,
    /// The partitions that may have executed the in-doubt record.
    #[serde(default)]
    pub in_doubt_executors: Vec<String>,
    /// Whether the primary role is moving (updates wait).
    #[serde(default)]
    pub handing_over: bool,
    /// The partitions.
    pub partitions: Vec<PartitionStatusDoc>,
    /// The group's latest transitions, oldest first.
    #[serde(default)]
    pub transitions: Vec<TransitionDoc>,
    /// How the config's partitions differ from the journal's membership (the journal's is
    /// used; the config only seeds a new group).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub config_drift: Vec<String>,
}

/// One transition of a group's state in `/status`.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct TransitionDoc {
    /// When (RFC 3339).
    pub at: String,
    /// Its name: `hand_over`, `mark_in_doubt`, `settle`, `rewind`, `quarantine`, ...
    pub name: String,
    /// What changed and why.
    pub reason: String,
}

/// One partition in `/status`.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct PartitionStatusDoc {
    /// Name.
    pub name: String,
    /// Base URL.
    pub url: String,
    /// The computing system it runs on, if named.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub host: Option<String>,
    /// `available`, `catching_up`, `suspect`, `unavailable`, `diverged` or `draining`.
    pub status: String,
    /// Highest seq applied.
    pub applied: u64,
    /// When the status last changed (RFC 3339).
    pub since: String,
    /// Why it changed.
    pub reason: String,
    /// Consecutive heartbeats missed (0: it answers).
    #[serde(default)]
    pub missed: u32,
    /// The latest rebuild from a snapshot, running or ended.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub rebuild: Option<crate::rebuild::RebuildProgress>,
}

impl From<GroupView> for GroupStatus {
    fn from(g: GroupView) -> Self {
        GroupStatus {
            name: g.name,
            primary: g.primary,
            epoch: g.epoch,
            head: g.head,
            sealed: g.sealed,
            in_doubt: g.in_doubt,
            in_doubt_executors: g.in_doubt_executors,
            handing_over: g.handing_over,
            partitions: g.partitions.into_iter().map(Into::into).collect(),
            config_drift: g.config_drift,
            transitions: g
                .transitions
                .into_iter()
                .map(|t| TransitionDoc {
                    at: regroup_replay::record::format_timestamp(t.at),
                    name: t.name.to_owned(),
                    reason: t.reason,
                })
                .collect(),
        }
    }
}

impl From<PartitionView> for PartitionStatusDoc {
    fn from(p: PartitionView) -> Self {
        PartitionStatusDoc {
            name: p.name,
            url: p.url,
            host: p.host,
            status: p.status.as_str().to_owned(),
            applied: p.applied,
            since: regroup_replay::record::format_timestamp(p.since),
            reason: p.reason,
            missed: p.missed,
            rebuild: p.rebuild,
        }
    }
}

/// The body of `POST /groups/{group}/resolve`.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ResolveRequest {
    /// The in-doubt record.
    pub seq: u64,
    /// `executed` or `skipped`.
    pub outcome: ResolveOutcome,
}

/// The body of `POST /groups/{group}/promote|drain|undrain`.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PartitionRequest {
    /// The partition.
    pub partition: String,
}

/// The body of `POST /groups/{group}/add`.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct AddRequest {
    /// The new partition's name.
    pub partition: String,
    /// Its base URL.
    pub url: String,
    /// The computing system it runs on.
    #[serde(default)]
    pub host: Option<String>,
    /// Failover preference (higher first).
    #[serde(default)]
    pub priority: i32,
}

/// The body of `POST /groups/{group}/move`.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct MoveRequest {
    /// The partition.
    pub partition: String,
    /// The group it joins.
    pub to: String,
}

/// The body of `POST /groups/{group}/rejoin`.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RejoinRequest {
    /// The diverged partition, rebuilt.
    pub partition: String,
    /// The seq the rebuilt copy includes (default: its checkpoint, or what its app-side
    /// layer says).
    #[serde(default)]
    pub applied: Option<u64>,
}

/// The body of `POST /groups/{group}/rebuild`.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RebuildRequest {
    /// The partition to rebuild.
    pub partition: String,
    /// The partition to take the snapshot from (default: the best available replica, else
    /// the primary).
    #[serde(default)]
    pub from: Option<String>,
}

/// How an operator settles an in-doubt record.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum ResolveOutcome {
    /// The primary did execute it: replicas replay it.
    Executed,
    /// The primary did not execute it: nobody replays it.
    Skipped,
}

/// Serves the admin API for `groups`.
#[derive(Debug, Clone)]
pub struct Admin {
    groups: Arc<Vec<Arc<Group>>>,
    proxy: Option<ProxyStatus>,
    token: Option<String>,
    status_requires_token: bool,
    max_body_bytes: usize,
}

impl Admin {
    pub(crate) fn new(
        groups: Vec<Arc<Group>>,
        token: Option<String>,
        config: &crate::config::Config,
    ) -> Self {
        Admin {
            groups: Arc::new(groups),
            proxy: None,
            token,
            status_requires_token: config.admin_status_requires_token,
            max_body_bytes: config.admin_max_body_bytes,
        }
    }

    /// Shows `proxy` in `/status`.
    pub(crate) fn with_proxy(mut self, proxy: ProxyStatus) -> Self {
        self.proxy = Some(proxy);
        self
    }

    /// `GET /health`'s answer.
    pub(crate) fn health() -> Response<ProxyBody> {
        json(StatusCode::OK, &serde_json::json!({"status": "ok"}))
    }

    /// The status document.
    pub fn status(&self) -> StatusDoc {
        let views: Vec<GroupView> = self.groups.iter().map(|g| g.view()).collect();
        StatusDoc {
            hosts: HostStatus::of(&self.groups, &views),
            groups: views.into_iter().map(Into::into).collect(),
            proxy: self.proxy.clone(),
        }
    }

    /// Handles one admin request.
    pub async fn handle<B>(&self, req: Request<B>) -> Response<ProxyBody>
    where
        B: http_body::Body<Data = Bytes>,
        B::Error: Into<crate::forward::BoxError>,
    {
        match self.route(req).await {
            Ok(resp) => resp,
            Err(e) => e.into_response(),
        }
    }

    async fn route<B>(&self, req: Request<B>) -> Result<Response<ProxyBody>, ProxyError>
    where
        B: http_body::Body<Data = Bytes>,
        B::Error: Into<crate::forward::BoxError>,
    {
        let limit = self.max_body_bytes;
        let path = req.uri().path().to_owned();
        let segments: Vec<&str> = path.split('/').filter(|s| !s.is_empty()).collect();
        match (req.method(), segments.as_slice()) {
            (&Method::GET, []) => Ok(crate::dashboard::page()),
            (&Method::GET, ["metrics"]) => {
                if self.status_requires_token {
                    self.authorize(&req)?;
                }
                Ok(metrics(&self.groups).await)
            }
            (&Method::GET, ["groups", group, "journal"]) => {
                self.authorize(&req)?;
                let after = crate::feed::parse_after(req.uri().query())?;
                Ok(crate::feed::respond(self.group(group)?, after))
            }
            (&Method::GET, ["health"]) => Ok(Admin::health()),
            (&Method::GET, ["status"]) => {
                if self.status_requires_token {
                    self.authorize(&req)?;
                }
                Ok(json(StatusCode::OK, &self.status()))
            }
            (&Method::POST, ["groups", group, "resolve"]) => {
                self.authorize(&req)?;
                let group = self.group(group)?;
                let ask: ResolveRequest = read_json(
                    req,
                    limit,
                    "{\"seq\": N, \"outcome\": \"executed\"|\"skipped\"}",
                )
                .await?;
                let record = group
                    .resolve(ask.seq, ask.outcome == ResolveOutcome::Executed)
                    .await?;
                Ok(json(
                    StatusCode::OK,
                    &serde_json::json!({
                        "group": group.name(),
                        "seq": record.seq,
                        "state": record.state.as_str(),
                    }),
                ))
            }
            (&Method::POST, ["groups", group, "rejoin"]) => {
                self.authorize(&req)?;
                let group = self.group(group)?;
                let ask: RejoinRequest = read_json(
                    req,
                    limit,
                    "{\"partition\": NAME, \"applied\": SEQ (optional)}",
                )
                .await?;
                let partition = self.partition(&group, &ask.partition)?;
                crate::replicate::rejoin(&group, &partition, ask.applied).await?;
                Ok(json(StatusCode::OK, &GroupStatus::from(group.view())))
            }
            (&Method::POST, ["groups", group, "add"]) => {
                self.authorize(&req)?;
                let group = self.group(group)?;
                let ask: AddRequest = read_json(
                    req,
                    limit,
                    "{\"partition\": NAME, \"url\": URL, \"host\": HOST (optional), \
                     \"priority\": N (optional)}",
                )
                .await?;
                let spec = regroup_replay::MemberSpec {
                    name: ask.partition,
                    url: ask.url,
                    host: ask.host,
                    priority: ask.priority,
                };
                crate::membership::add(&group, spec, None).await?;
                Ok(json(StatusCode::OK, &GroupStatus::from(group.view())))
            }
            (&Method::POST, ["groups", group, "remove"]) => {
                self.authorize(&req)?;
                let group = self.group(group)?;
                let ask: PartitionRequest = read_json(req, limit, "{\"partition\": NAME}").await?;
                crate::membership::remove(&group, &ask.partition).await?;
                Ok(json(StatusCode::OK, &GroupStatus::from(group.view())))
            }
            (&Method::POST, ["groups", group, "move"]) => {
                self.authorize(&req)?;
                let group = self.group(group)?;
                let ask: MoveRequest =
                    read_json(req, limit, "{\"partition\": NAME, \"to\": GROUP}").await?;
                let to = self.group(&ask.to)?;
                crate::membership::move_to(&group, &to, &ask.partition).await?;
                Ok(json(
                    StatusCode::OK,
                    &StatusDoc {
                        groups: vec![group.view().into(), to.view().into()],
                        hosts: Vec::new(),
                        proxy: None,
                    },
                ))
            }
            (&Method::POST, ["groups", group, "rebuild"]) => {
                self.authorize(&req)?;
                let group = self.group(group)?;
                let ask: RebuildRequest = read_json(
                    req,
                    limit,
                    "{\"partition\": NAME, \"from\": NAME (optional)}",
                )
                .await?;
                crate::rebuild::start(&group, &ask.partition, ask.from.as_deref()).await?;
                let rebuild = group.member(&ask.partition).and_then(|p| p.rebuild());
                Ok(json(
                    StatusCode::ACCEPTED,
                    &serde_json::json!({
                        "group": group.name(),
                        "partition": ask.partition,
                        "rebuild": rebuild,
                    }),
                ))
            }
            (&Method::POST, ["groups", group, verb @ ("promote" | "drain" | "undrain")]) => {
                self.authorize(&req)?;
                let group = self.group(group)?;
                let ask: PartitionRequest = read_json(req, limit, "{\"partition\": NAME}").await?;
                let partition = self.partition(&group, &ask.partition)?;
                match *verb {
                    "promote" => {
                        crate::failover::move_role(&group, Some(partition.name()), true).await?;
                    }
                    "drain" => crate::failover::drain(&group, &partition).await?,
                    _ => crate::failover::undrain(&group, &partition),
                }
                Ok(json(StatusCode::OK, &GroupStatus::from(group.view())))
            }
            _ => Err(ProxyError::NoGroup(path)),
        }
    }

    fn authorize<B>(&self, req: &Request<B>) -> Result<(), ProxyError> {
        let Some(token) = &self.token else {
            return Ok(());
        };
        let given = req
            .headers()
            .get(header::AUTHORIZATION)
            .and_then(|v| v.as_bytes().strip_prefix(b"Bearer "));
        // Constant time in the bytes compared (the lengths may differ in time: a token's
        // length is not its secret).
        match given {
            Some(given) if bool::from(given.ct_eq(token.as_bytes())) => Ok(()),
            _ => Err(ProxyError::Unauthorized),
        }
    }

    fn partition(
        &self,
        group: &Group,
        name: &str,
    ) -> Result<Arc<crate::partition::Partition>, ProxyError> {
        group.member(name).ok_or_else(|| {
            ProxyError::BadRequest(format!(
                "group {:?} has no partition {name:?}",
                group.name()
            ))
        })
    }

    fn group(&self, name: &str) -> Result<Arc<Group>, ProxyError> {
        self.groups
            .iter()
            .find(|g| g.name() == name)
            .cloned()
            .ok_or_else(|| ProxyError::BadRequest(format!("no group named {name:?}")))
    }
}

/// Reads a JSON body of type `T` of at most `limit` bytes (413 beyond); a bad one is a 400
/// that shows the expected `shape`.
async fn read_json<T, B>(req: Request<B>, limit: usize, shape: &str) -> Result<T, ProxyError>
where
    T: serde::de::DeserializeOwned,
    B: http_body::Body<Data = Bytes>,
    B::Error: Into<crate::forward::BoxError>,
{
    let body = Limited::new(req.into_body(), limit)
        .collect()
        .await
        .map_err(|e| ProxyError::from_body_error(e, limit))?
        .to_bytes();
    serde_json::from_slice(&body)
        .map_err(|e| ProxyError::BadRequest(format!("body must be {shape}: {e}")))
}

/// `GET /metrics`: the Prometheus text format ([`crate::metrics`]).
async fn metrics(groups: &[Arc<Group>]) -> Response<ProxyBody> {
    let text = crate::metrics::render(groups).await.unwrap_or_default();
    let mut resp = Response::new(full(text));
    resp.headers_mut().insert(
        header::CONTENT_TYPE,
        header::HeaderValue::from_static(crate::metrics::CONTENT_TYPE),
    );
    resp
}

pub(crate) fn json<T: Serialize>(status: StatusCode, value: &T) -> Response<ProxyBody> {
    let body = serde_json::to_vec_pretty(value).unwrap_or_default();
    let mut resp = Response::new(full(body));
    *resp.status_mut() = status;
    resp.headers_mut().insert(
        header::CONTENT_TYPE,
        header::HeaderValue::from_static("application/json"),
    );
    resp
}
