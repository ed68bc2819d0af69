//! Several proxies, one journal (`proxies = "several"`).
//!
//! Every `regroup serve` of the same config is a **node**. The node holding the journal's
//! ownership lease *leads*: it runs the groups (sequencer, supervision, replayers, failover)
//! exactly as a lone proxy does. Every other node *follows*: it forwards each client request
//! and each admin request to the leader, whose addresses it reads from the lease
//! (`ownership::describe`), and tries to claim the lease every renewal interval. When the
//! leader stops renewing (killed, frozen, partitioned away), its lease runs out, one
//! follower's claim succeeds (the journal's claim is a compare-and-set: only one can), and
//! that node opens the groups from the journal — settling the in-doubt record like any
//! restart — and serves from then on. A request a follower could not hand to the leader
//! (connection refused) waits for the new leader, up to `failover_wait_ms`; one whose outcome
//! is unknown (the leader died while it was executing) is answered 502 and must be retried
//! by the client like any update without an answer. A deposed leader's late writes are
//! refused by the journal's fencing token; when its next renewal finds the lease taken (see
//! `ownership`) it steps down: its groups' background work stops and it follows the new
//! leader.
//!
//! Each partition is replayed by exactly one proxy: only the leader runs replayers.
//!
//! **Reads on a follower** are served by the follower itself, from the partitions, by the
//! same rules as on the leader: it polls the leader's `/status` (every 100 ms) and sends a
//! read (a bodiless request its group classifies as a read, consistency `any` or `session`)
//! to a partition the leader has `available` (for `session`, one that applied the position),
//! refusing an answer whose `Regroup-Applied` stands further behind the sealed head than
//! `max_read_lag`. With no fresh view (the last poll older than a second), no eligible
//! partition, or `primary` consistency, the read goes to the leader like an update.

use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use http::{Request, Response, StatusCode, Uri};
use http_body_util::BodyExt;
use regroup_replay::Journal;
use tokio::sync::watch;
use tower::Service;
use tower::util::BoxCloneSyncService;

use crate::admin::{Admin, ProxyStatus};
use crate::config::Config;
use crate::error::ProxyError;
use crate::forward::{self, BoxError, ProxyBody, Upstream};
use crate::ownership::{self, Ownership};
use crate::route::client_addr;
use crate::server::Proxy;

/// The leader's client-facing service in a node.
pub(crate) type LeaderService =
    BoxCloneSyncService<Request<ProxyBody>, Response<ProxyBody>, BoxError>;

/// What this node does now.
#[derive(Clone)]
pub(crate) enum Mode {
    /// Another node leads: requests go to it.
    Following(Arc<Leader>),
    /// This node leads.
    Leading(Arc<Leading>),
}

/// Where the leading node is.
#[derive(Debug)]
pub(crate) struct Leader {
    /// Its description, from the lease.
    pub(crate) describe: String,
    /// Its client-facing base URL (`None`: not known yet, or not reachable as described).
    client: Option<Uri>,
    /// Its admin base URL.
    admin: Option<Uri>,
}

/// This node, leading.
pub(crate) struct Leading {
    pub(crate) proxy: Proxy,
    service: LeaderService,
}

impl Leading {
    /// Runs a client request through this node's groups.
    async fn call(&self, req: Request<ProxyBody>) -> Result<Response<ProxyBody>, BoxError> {
        let mut svc = self.service.clone();
        std::future::poll_fn(|cx| svc.poll_ready(cx)).await?;
        svc.call(req).await
    }
}

/// How often a follower asks the leader for the group's state.
const MIRROR_POLL: Duration = Duration::from_millis(100);
/// A view older than this is not used for reads.
const MIRROR_FRESH: Duration = Duration::from_secs(1);

/// What a follower knows of the groups (the leader's `/status`), to serve reads itself.
struct Mirror {
    /// The groups' configs, longest path prefix first.
    groups: Vec<(crate::config::GroupConfig, crate::classify::Classifier)>,
    view: std::sync::RwLock<Option<(tokio::time::Instant, crate::admin::StatusDoc)>>,
    next: std::sync::atomic::AtomicUsize,
}

impl Mirror {
    fn new(config: &Config) -> Mirror {
        let mut groups: Vec<_> = config
            .groups
            .iter()
            .map(|g| (g.clone(), g.classifier()))
            .collect();
        groups.sort_by_key(|(g, _)| std::cmp::Reverse(g.path_prefix.len()));
        Mirror {
            groups,
            view: std::sync::RwLock::new(None),
            next: std::sync::atomic::AtomicUsize::new(0),
        }
    }

    fn fresh(&self) -> Option<crate::admin::StatusDoc> {
        let view = self.view.read().unwrap_or_else(|p| p.into_inner());
        view.as_ref()
            .filter(|(at, _)| at.elapsed() <= MIRROR_FRESH)
            .map(|(_, doc)| doc.clone())
    }
}

/// One node of several sharing a journal.
pub(crate) struct Node {
    mode: watch::Sender<Mode>,
    mirror: Mirror,
    /// The admin token, for the leader's `/status`.
    token: Option<String>,
    client: Upstream,
    /// Largest body a forwarded request may have (the largest group's `max_body_bytes`).
    max_body: usize,
    failover_wait: Duration,
    describe: String,
}

impl Node {
    fn new(config: &Config, mode: Mode, describe: String) -> Arc<Node> {
        Arc::new(Node {
            mode: watch::Sender::new(mode),
            mirror: Mirror::new(config),
            token: crate::server::admin_token(config).ok().flatten(),
            client: forward::upstream_client(),
            max_body: config
                .groups
                .iter()
                .map(|g| g.max_body_bytes)
                .max()
                .unwrap_or(crate::config::DEFAULT_MAX_BODY_BYTES),
            failover_wait: config
                .groups
                .iter()
                .map(|g| g.failover_wait())
                .max()
                .unwrap_or(Duration::from_secs(5)),
            describe,
        })
    }

    fn mode(&self) -> Mode {
        self.mode.borrow().clone()
    }

    /// Handles one client request: locally when leading, else forwarded to the leader.
    pub(crate) fn handle(
        self: Arc<Self>,
        req: Request<ProxyBody>,
    ) -> std::pin::Pin<
        Box<dyn std::future::Future<Output = Result<Response<ProxyBody>, BoxError>> + Send>,
    > {
        Box::pin(self.handle_inner(req))
    }

    async fn handle_inner(
        self: Arc<Self>,
        req: Request<ProxyBody>,
    ) -> Result<Response<ProxyBody>, BoxError> {
        let leader = match self.mode() {
            Mode::Leading(l) => return l.call(req).await,
            Mode::Following(leader) => leader,
        };
        let client = client_addr(&req);
        let req = match self.read_here(req, client).await {
            Ok(resp) => return Ok(resp),
            Err(req) => req,
        };
        let (parts, body) = req.into_parts();
        let body = match read_body(body, self.max_body).await {
            Ok(b) => b,
            Err(e) => return Ok(e.into_response()),
        };
        let req = forward::prepare_request(Request::from_parts(parts, ()), client);
        match self.forward(leader, req, body, |l| l.client.clone()).await {
            Ok(resp) => Ok(resp),
            Err(Handoff::Local(req)) => match self.mode() {
                Mode::Leading(l) => l.call(req).await,
                Mode::Following(_) => Ok(no_leader("client").into_response()),
            },
            Err(Handoff::Failed(e)) => Ok(e.into_response()),
        }
    }

    /// Serves `req` from the partitions when it is a read this follower may serve (see the
    /// module docs); hands it back otherwise, or when no partition served it.
    async fn read_here(
        &self,
        req: Request<ProxyBody>,
        client: Option<std::net::SocketAddr>,
    ) -> Result<Response<ProxyBody>, Request<ProxyBody>> {
        if !crate::route::has_no_body(&req) {
            return Err(req);
        }
        let path = req.uri().path().to_owned();
        let Some((config, classifier)) = self
            .mirror
            .groups
            .iter()
            .find(|(g, _)| crate::route::prefix_matches(&g.path_prefix, &path))
        else {
            return Err(req);
        };
        let Some(doc) = self.mirror.fresh() else {
            return Err(req);
        };
        let Some(group) = doc.groups.iter().find(|g| g.name == config.name) else {
            return Err(req);
        };
        let (parts, body) = req.into_parts();
        let probe = Request::from_parts(parts.clone(), ());
        let Ok(local) = crate::route::strip_prefix(config, probe) else {
            return Err(Request::from_parts(parts, body));
        };
        if classifier.classify(local.method(), local.uri().path()) != crate::classify::Kind::Read {
            return Err(Request::from_parts(parts, body));
        }
        let mut headers = local.headers().clone();
        let consistency = match crate::read::Consistency::take_from(&mut headers) {
            Ok(crate::read::Consistency::Any) => None,
            Ok(crate::read::Consistency::Session(at)) => Some(at),
            // `primary` (and a malformed header, answered by the leader) goes to the leader.
            _ => return Err(Request::from_parts(parts, body)),
        };
        let eligible: Vec<&crate::admin::PartitionStatusDoc> = group
            .partitions
            .iter()
            .filter(|p| p.status == "available" && consistency.is_none_or(|at| p.applied >= at))
            .collect();
        if eligible.is_empty() {
            return Err(Request::from_parts(parts, body));
        }
        let pq = local
            .uri()
            .path_and_query()
            .map_or("/", |pq| pq.as_str())
            .to_owned();
        let turn = self
            .mirror
            .next
            .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        for i in 0..eligible.len().min(2) {
            let p = eligible[(turn + i) % eligible.len()];
            let Ok(base) = crate::config::base_uri(&p.url) else {
                continue;
            };
            let Ok(uri) = forward::upstream_uri(&base, &pq) else {
                continue;
            };
            let mut out = Request::from_parts(local.clone_parts(), forward::full(Bytes::new()));
            *out.headers_mut() = headers.clone();
            *out.uri_mut() = uri;
            let out = forward::prepare_request(out, client);
            let answer =
                tokio::time::timeout(config.read_timeout(), self.client.request(out)).await;
            let Ok(Ok(resp)) = answer else {
                continue;
            };
            let behind = resp
                .headers()
                .get(regroup_replay::headers::APPLIED)
                .and_then(|v| v.to_str().ok())
                .and_then(|v| v.parse::<u64>().ok())
                .is_some_and(|applied| applied.saturating_add(config.max_read_lag) < group.sealed);
            if behind {
                continue;
            }
            return Ok(forward::client_response(resp));
        }
        Err(Request::from_parts(parts, body))
    }

    /// Keeps the follower's view of the groups: the leader's `/status`, every
    /// [`MIRROR_POLL`], while following.
    async fn mirror(self: Arc<Self>) {
        let mut tick = tokio::time::interval(MIRROR_POLL);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tick.tick().await;
            let Mode::Following(leader) = self.mode() else {
                continue;
            };
            let Some(admin) = &leader.admin else {
                continue;
            };
            let Ok(uri) = forward::upstream_uri(admin, "/status") else {
                continue;
            };
            let mut req = Request::get(uri).body(forward::full(Bytes::new()));
            if let (Ok(r), Some(t)) = (&mut req, &self.token)
                && let Ok(v) = http::HeaderValue::from_str(&format!("Bearer {t}"))
            {
                r.headers_mut().insert(http::header::AUTHORIZATION, v);
            }
            let Ok(req) = req else { continue };
            let doc = match tokio::time::timeout(MIRROR_FRESH, self.client.request(req)).await {
                Ok(Ok(resp)) if resp.status() == StatusCode::OK => {
                    match resp.into_body().collect().await {
                        Ok(b) => {
                            serde_json::from_slice::<crate::admin::StatusDoc>(&b.to_bytes()).ok()
                        }
                        Err(_) => None,
                    }
                }
                _ => None,
            };
            if let Some(doc) = doc {
                *self.mirror.view.write().unwrap_or_else(|p| p.into_inner()) =
                    Some((tokio::time::Instant::now(), doc));
            }
        }
    }

    /// Sends `req` with `body` to the leader at the base URL `pick` gives, waiting (up to
    /// `failover_wait`) through refused connections for a new leader, or for this node to
    /// lead (then the request is handed back to run here).
    async fn forward(
        &self,
        mut leader: Arc<Leader>,
        req: Request<()>,
        body: Bytes,
        pick: impl Fn(&Leader) -> Option<Uri>,
    ) -> Result<Response<ProxyBody>, Handoff> {
        let deadline = tokio::time::Instant::now() + self.failover_wait;
        let mut changes = self.mode.subscribe();
        loop {
            if let Some(base) = pick(&leader) {
                let pq = req
                    .uri()
                    .path_and_query()
                    .map_or("/", |pq| pq.as_str())
                    .to_owned();
                let uri = forward::upstream_uri(&base, &pq)
                    .map_err(|e| Handoff::Failed(ProxyError::BadRequest(e.to_string())))?;
                let mut out = Request::from_parts(req.clone_parts(), forward::full(body.clone()));
                *out.uri_mut() = uri;
                match self.client.request(out).await {
                    Ok(resp) => return Ok(forward::client_response(resp)),
                    Err(e) if e.is_connect() => {
                        tracing::debug!(leader = %leader.describe, error = %e,
                            "leader unreachable; waiting for a new one");
                    }
                    Err(e) => {
                        tracing::warn!(leader = %leader.describe, error = %crate::link::error_chain(&e),
                            "the leader did not answer a forwarded request");
                        return Err(Handoff::Failed(ProxyError::Upstream {
                            group: "-".into(),
                            partition: "leader proxy".into(),
                            reason: "the leading proxy did not answer; the outcome is unknown"
                                .into(),
                        }));
                    }
                }
            }
            let wait = deadline.saturating_duration_since(tokio::time::Instant::now());
            if wait.is_zero() {
                return Err(Handoff::Failed(no_leader("request")));
            }
            tokio::select! {
                biased;
                _ = changes.changed() => {}
                _ = tokio::time::sleep(wait.min(Duration::from_millis(50))) => {}
            }
            match self.mode() {
                Mode::Leading(_) => {
                    let (parts, ()) = req.into_parts();
                    return Err(Handoff::Local(Request::from_parts(
                        parts,
                        forward::full(body),
                    )));
                }
                Mode::Following(l) => leader = l,
            }
        }
    }

    /// Handles one admin request: by this node's admin API when leading; else `/health`
    /// here, `/status` from the leader (marked as seen from a follower), verbs forwarded.
    pub(crate) fn admin(
        self: Arc<Self>,
        req: Request<hyper::body::Incoming>,
    ) -> std::pin::Pin<Box<dyn std::future::Future<Output = Response<ProxyBody>> + Send>> {
        Box::pin(self.admin_inner(req))
    }

    async fn admin_inner(
        self: Arc<Self>,
        req: Request<hyper::body::Incoming>,
    ) -> Response<ProxyBody> {
        let leader = match self.mode() {
            Mode::Leading(l) => return l.proxy.admin().handle(req).await,
            Mode::Following(leader) => leader,
        };
        if req.uri().path() == "/health" {
            return Admin::health();
        }
        let status = req.method() == http::Method::GET && req.uri().path() == "/status";
        let (parts, body) = req.into_parts();
        let body = match read_body(forward::stream(body), 64 * 1024).await {
            Ok(b) => b,
            Err(e) => return e.into_response(),
        };
        let req = forward::prepare_request(Request::from_parts(parts, ()), None);
        let describe = leader.describe.clone();
        let resp = match self.forward(leader, req, body, |l| l.admin.clone()).await {
            Ok(resp) => resp,
            // Became the leader meanwhile: ask again, it will be answered here.
            Err(Handoff::Local(_)) => return no_leader("admin").into_response(),
            Err(Handoff::Failed(e)) => return e.into_response(),
        };
        if !status || resp.status() != StatusCode::OK {
            return resp;
        }
        // The leader's status, with who answers and who leads.
        let bytes = match resp.into_body().collect().await {
            Ok(b) => b.to_bytes(),
            Err(_) => return no_leader("status").into_response(),
        };
        match serde_json::from_slice::<crate::admin::StatusDoc>(&bytes) {
            Ok(mut doc) => {
                doc.proxy = Some(ProxyStatus {
                    role: "follower".into(),
                    this: self.describe.clone(),
                    leader: describe,
                });
                crate::admin::json(StatusCode::OK, &doc)
            }
            Err(_) => no_leader("status").into_response(),
        }
    }
}

/// Reads a whole body of at most `limit` bytes (413 beyond).
async fn read_body(mut body: ProxyBody, limit: usize) -> Result<Bytes, ProxyError> {
    let mut buf = bytes::BytesMut::new();
    while let Some(frame) = body.frame().await {
        let frame = frame.map_err(|e| ProxyError::from_body_error(e, limit))?;
        if let Ok(data) = frame.into_data() {
            if buf.len() + data.len() > limit {
                return Err(ProxyError::BodyTooLarge { limit });
            }
            buf.extend_from_slice(&data);
        }
    }
    Ok(buf.freeze())
}

/// Why a forward did not produce an answer.
enum Handoff {
    /// This node leads now: run the request here.
    Local(Request<ProxyBody>),
    /// Answer this error.
    Failed(ProxyError),
}

trait CloneParts {
    fn clone_parts(&self) -> http::request::Parts;
}

impl CloneParts for Request<()> {
    fn clone_parts(&self) -> http::request::Parts {
        let mut b = Request::builder()
            .method(self.method().clone())
            .uri(self.uri().clone())
            .version(self.version());
        if let Some(h) = b.headers_mut() {
            *h = self.headers().clone();
        }
        match b.body(()) {
            Ok(r) => r.into_parts().0,
            Err(_) => Request::new(()).into_parts().0,
        }
    }
}

fn no_leader(what: &str) -> ProxyError {
    ProxyError::Unavailable {
        group: "-".into(),
        reason: format!("no proxy leads the journal yet ({what}): try again shortly"),
    }
}

/// Where the lease's holder is, from its description.
async fn leader(journal: &dyn Journal) -> Arc<Leader> {
    let describe = match journal.owner().await {
        Ok(Some(info)) => info.describe,
        Ok(None) => String::new(),
        Err(e) => {
            tracing::warn!(error = %e, "cannot read the journal's owner");
            String::new()
        }
    };
    let base = |addr: std::net::SocketAddr| format!("http://{addr}").parse::<Uri>().ok();
    let addrs = ownership::leader_addresses(&describe);
    Arc::new(Leader {
        client: addrs.and_then(|(c, _)| base(c)),
        admin: addrs.and_then(|(_, a)| base(a)),
        describe,
    })
}

/// Runs this node: leads when it holds the lease, follows otherwise, taking the lease over
/// when the leader's runs out. A leader that finds the lease taken over (it was frozen or
/// cut off past its lease) **steps down**: it stops its groups' background work (its late
/// writes are refused by the journal anyway), and follows the new holder, forwarding to it
/// and ready to take over again. Returns the node (for the listeners) at once, and the
/// future that runs the node's changes of role; it does not end by itself.
pub(crate) async fn start(
    config: &Config,
    journal: Arc<dyn Journal>,
) -> Result<
    (
        Arc<Node>,
        impl std::future::Future<Output = String> + Send + 'static,
    ),
    ProxyError,
> {
    let owner = ownership::owner(config);
    let describe = owner.describe.clone();
    let first = match ownership::try_claim(config, journal.clone(), &owner).await? {
        Some(held) => Mode::Leading(lead(config, journal.clone(), held).await?),
        None => {
            let leader = leader(journal.as_ref()).await;
            tracing::info!(leader = %leader.describe,
                "another proxy leads the journal: following it (requests are forwarded to it)");
            Mode::Following(leader)
        }
    };
    let node = Node::new(config, first, describe);
    let mirrored = node.clone();
    tokio::spawn(mirrored.mirror());
    let config = config.clone();
    let task_node = node.clone();
    let lost = async move {
        let node = task_node;
        let every = Duration::from_millis(config.journal_lease_ms) / ownership::RENEWALS_PER_TTL;
        loop {
            if let Mode::Leading(l) = node.mode() {
                let holder = l.proxy.ownership().lost().await;
                l.proxy.stop_groups();
                drop(l);
                let now = leader(journal.as_ref()).await;
                tracing::error!(new_owner = %holder, leader = %now.describe,
                    "the journal was taken over by another proxy: this proxy stops leading \
                     and follows it");
                node.mode.send_replace(Mode::Following(now));
                continue;
            }
            tokio::time::sleep(every).await;
            match ownership::try_claim(&config, journal.clone(), &owner).await {
                Ok(Some(held)) => match lead(&config, journal.clone(), held).await {
                    Ok(leading) => {
                        tracing::warn!("took the journal over: this proxy leads now");
                        node.mode.send_replace(Mode::Leading(leading));
                    }
                    Err(e) => {
                        tracing::error!(error = %e, "claimed the journal but could not open its groups")
                    }
                },
                Ok(None) => {
                    let now = leader(journal.as_ref()).await;
                    node.mode.send_if_modified(|m| match m {
                        Mode::Following(l) if l.describe != now.describe => {
                            tracing::info!(leader = %now.describe, "following a new leader");
                            *m = Mode::Following(now);
                            true
                        }
                        _ => false,
                    });
                }
                Err(e) => tracing::warn!(error = %e, "cannot claim the journal; trying again"),
            }
        }
    };
    Ok((node, lost))
}

/// Opens the groups on a journal this node just claimed.
async fn lead(
    config: &Config,
    journal: Arc<dyn Journal>,
    held: Ownership,
) -> Result<Arc<Leading>, ProxyError> {
    let describe = held.owner().describe.clone();
    let proxy = Proxy::with_ownership(config, journal, held)
        .await?
        .proxy_status(ProxyStatus {
            role: "leader".into(),
            this: describe.clone(),
            leader: describe,
        });
    let service = BoxCloneSyncService::new(proxy.node_service());
    Ok(Arc::new(Leading { proxy, service }))
}

impl Node {
    /// Stops this node's groups and gives up the lease, if it leads.
    pub(crate) async fn release(&self) {
        if let Mode::Leading(l) = self.mode() {
            l.proxy.ownership().release().await;
        }
    }
}
