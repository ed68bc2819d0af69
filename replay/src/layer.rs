//! [`ReplayLayer`]: the application side of the wire contract, as a Tower layer for axum or
//! plain hyper services.
//!
//! - Reads the replay headers into a [`ReplayContext`] request extension. Requests without
//!   them (reads, or an app run without regroup) get no context and pass through.
//! - Malformed replay headers get 400.
//! - Signatures: with a replay secret (from `REGROUP_REPLAY_SECRET`, and
//!   `REGROUP_REPLAY_SECRET_PREVIOUS` during a rotation, or given with
//!   [`ReplayLayer::with_secret`]), a request carrying replay headers must carry a valid
//!   `Regroup-Signature` ([`crate::signature`]); one that does not gets 403 `bad_signature`
//!   before anything else happens: the inner service is not called and the fence does not
//!   move. To check the body hash the layer reads the body of such a request (up to
//!   [`DEFAULT_MAX_SIGNED_BODY_BYTES`], else 413), so the request body type must be
//!   buildable from [`Bytes`] (axum's `Body`, `http_body_util::Full<Bytes>`).
//! - Fencing: an update whose `Regroup-Epoch` is older than the highest this partition has
//!   seen gets 409 `fenced` (unless it is a re-delivery of a transaction already applied,
//!   which the exactly-once helper answers from its record). The highest epoch rises only
//!   with a request that passed the signature check and the fence. With
//!   [`ReplayLayer::require_regroup`], updates that did not come through regroup get 403;
//!   what an update is comes from the same [`Classifier`] the proxy uses (set the proxy's
//!   route rules with [`ReplayLayer::classifier`]).
//! - With a store ([`ReplayLayer::with_store`]) it answers the proxy's questions:
//!   `GET /_regroup/applied` → `{"applied": <highest seq>, "epoch": <highest epoch>}` (with
//!   `"resume"` when the store records floors: see parallel replay below) and
//!   `GET /_regroup/applied?seq=N` → `{"seq": N, "applied": true, "status": S, "epoch": E}`
//!   or `{"seq": N, "applied": false}`.
//! - [`ReplayLayer::snapshots`] makes a [`SnapshotLayer`] to stack outside it: `GET
//!   /_regroup/snapshot` and `PUT /_regroup/restore` over a [`Snapshotter`] (see
//!   [`crate::snapshot`] for the format and who may call them; `GET /_regroup/restore`
//!   answers 204 to a caller whose restore would be taken). A restore repositions this
//!   layer's memory (highest seq and epoch) at the restored copy's.
//! - Order: with the store, a record carrying `Regroup-Prev: P` is applied only right after
//!   seq P. With `Regroup-Pipelined: 1` too (the proxy sent it while P may still be on its
//!   way or executing), a record whose predecessor is not recorded yet waits for it, at most
//!   [`ReplayLayer::predecessor_wait`] ([`DEFAULT_PREDECESSOR_WAIT`]); it stops waiting as
//!   soon as the predecessor's request finishes without being recorded, and is then refused
//!   as `behind`. So records sent one after another without waiting for each answer are
//!   still executed one at a time, in seq order.
//! - Parallel replay (the proxy's `conflict_keys`): a record carrying `Regroup-After: D1,..`
//!   and `Regroup-Floor: F` instead of `Regroup-Prev` is applied once each Di is recorded
//!   (waiting for them with `Regroup-Pipelined: 1`, bounded the same way), so records with no
//!   key in common run side by side and the others in seq order. It is refused as `behind`
//!   when F is above where this copy is dense (its resume), until one record passed after
//!   the process started, and as `out_of_order` when a Di finished
//!   unrecorded or the store records in seq order only. F is recorded with the transaction,
//!   and `GET /_regroup/applied` adds `"resume": R` (the highest floor held among the newest
//!   records, a record taken in seq order standing for itself): every record at or below R
//!   is recorded, which is where a sender resumes. Offered only by a store that records
//!   floors ([`AppliedStore::resume`]: [`ExactlyOnce`] with
//!   `regroup_migrations::AppliedFloorMigration`). Out of seq order, a lower epoch than
//!   one seen is fenced only when a record below it has a higher one.

use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::task::{Context, Poll};
use std::time::Duration;

use bytes::Bytes;
use futures_util::{StreamExt, TryStreamExt};
use http::{Method, Request, Response, StatusCode, header};
use http_body_util::{BodyExt, Limited};
use tower::{Layer, Service};

use crate::classify::Classifier;
use crate::context::ReplayContext;
use crate::exactly_once::{AppliedRecord, ExactlyOnce};
use crate::headers;
use crate::signature::{PREVIOUS_SECRET_ENV, SECRET_ENV, Secret, Signed};
use crate::snapshot::{self, SnapshotBody, Snapshotter};

/// Default bound on the body the layer reads to check a signature (16 MiB).
pub const DEFAULT_MAX_SIGNED_BODY_BYTES: usize = 16 * 1024 * 1024;

/// Default bound on how long a pipelined record waits for its predecessor (1 s).
pub const DEFAULT_PREDECESSOR_WAIT: Duration = Duration::from_secs(1);

/// The path the proxy asks about applied transactions.
pub const APPLIED_PATH: &str = "/_regroup/applied";

/// Where a partition's applied transactions are recorded.
#[async_trait::async_trait]
pub trait AppliedStore: Send + Sync + 'static {
    /// The highest seq and the highest epoch applied.
    async fn applied(&self) -> Result<(u64, u64), String>;
    /// What was recorded for `seq`.
    async fn lookup(&self, seq: u64) -> Result<Option<AppliedRecord>, String>;
    /// Where a sender resumes safely when records may be recorded out of seq order
    /// (parallel replay): every record at or below it is recorded. `None` (the default):
    /// this store records in seq order only, and the layer does not offer parallel replay.
    async fn resume(&self) -> Result<Option<u64>, String> {
        Ok(None)
    }
}

#[async_trait::async_trait]
impl AppliedStore for ExactlyOnce {
    async fn applied(&self) -> Result<(u64, u64), String> {
        ExactlyOnce::applied(self).await.map_err(|e| e.to_string())
    }
    async fn lookup(&self, seq: u64) -> Result<Option<AppliedRecord>, String> {
        ExactlyOnce::lookup(self, seq)
            .await
            .map_err(|e| e.to_string())
    }
    async fn resume(&self) -> Result<Option<u64>, String> {
        ExactlyOnce::resume(self).await.map_err(|e| e.to_string())
    }
}

/// Layer that gives requests a [`ReplayContext`]; see the module docs.
///
/// ```
/// use regroup_replay::{ReplayContext, ReplayLayer};
/// use tower::{ServiceBuilder, ServiceExt, service_fn};
/// # tokio::runtime::Runtime::new().unwrap().block_on(async {
/// let svc = ServiceBuilder::new().layer(ReplayLayer::new().without_secret()).service(service_fn(
///     |req: http::Request<http_body_util::Full<bytes::Bytes>>| async move {
///         let seq = req.extensions().get::<ReplayContext>().map(|c| c.seq());
///         Ok::<_, std::convert::Infallible>(http::Response::new(format!("{seq:?}")))
///     },
/// ));
/// let req = http::Request::post("/transfers")
///     .header("regroup-seq", "5")
///     .header("regroup-txn-id", uuid::Uuid::now_v7().to_string())
///     .header("regroup-epoch", "1")
///     .header("regroup-timestamp", "2026-11-30T12:00:00Z")
///     .body(Default::default())
///     .unwrap();
/// assert_eq!(svc.oneshot(req).await.unwrap().into_body(), "Some(5)");
/// # });
/// ```
#[derive(Clone)]
pub struct ReplayLayer {
    store: Option<Arc<dyn AppliedStore>>,
    require_regroup: bool,
    classifier: Arc<Classifier>,
    secrets: Vec<Secret>,
    max_signed_body: usize,
    highest_epoch: Arc<AtomicU64>,
    highest_seq: Arc<AtomicU64>,
    /// The highest proxy term seen (`Regroup-Term`), in memory: after a restart the gap
    /// check of the first record stands in for it.
    highest_term: Arc<AtomicU64>,
    /// Whether the first record after start has been checked for a gap.
    gap_checked: Arc<std::sync::atomic::AtomicBool>,
    loaded: Arc<tokio::sync::OnceCell<()>>,
    unsigned_snapshots: bool,
    /// The highest seq whose request has finished here, recorded or not.
    finished_seq: Arc<AtomicU64>,
    /// Woken whenever a request with replay headers finishes.
    finished: Arc<tokio::sync::Notify>,
    /// How long a pipelined record waits for its predecessor.
    predecessor_wait: Duration,
    /// Seqs recently recorded and finished here (parallel replay waits on them).
    recent: Arc<std::sync::Mutex<Recent>>,
    /// Whether the store records floors (offers parallel replay), asked once.
    floors: Arc<tokio::sync::OnceCell<bool>>,
}

/// The seqs whose requests recently finished here, and those of them that were recorded:
/// what a record sent in parallel waits for (a bounded memory; the store decides for older
/// ones).
#[derive(Debug, Default)]
struct Recent {
    recorded: std::collections::BTreeSet<u64>,
    finished: std::collections::BTreeSet<u64>,
    /// Seqs at or below it may have been recorded before this memory began (by an earlier
    /// process, or in a restored copy): only the store knows them.
    before: u64,
}

/// How many seqs [`Recent`] keeps of each kind.
const RECENT: usize = 4096;

impl Recent {
    fn note(set: &mut std::collections::BTreeSet<u64>, seq: u64) {
        set.insert(seq);
        if set.len() > RECENT {
            set.pop_first();
        }
    }
}

impl std::fmt::Debug for ReplayLayer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ReplayLayer")
            .field("store", &self.store.is_some())
            .field("require_regroup", &self.require_regroup)
            .field("signed", &!self.secrets.is_empty())
            .field("highest_epoch", &self.highest_epoch.load(Ordering::Relaxed))
            .finish()
    }
}

impl ReplayLayer {
    /// A layer that reads the replay headers and fences stale epochs it has seen. It
    /// requires signed replay headers when `REGROUP_REPLAY_SECRET` is set (and accepts the
    /// `REGROUP_REPLAY_SECRET_PREVIOUS` secret too).
    pub fn new() -> Self {
        ReplayLayer {
            store: None,
            require_regroup: false,
            classifier: Arc::new(Classifier::default()),
            secrets: [SECRET_ENV, PREVIOUS_SECRET_ENV]
                .into_iter()
                .filter_map(Secret::from_env)
                .collect(),
            max_signed_body: DEFAULT_MAX_SIGNED_BODY_BYTES,
            highest_epoch: Arc::default(),
            highest_term: Arc::default(),
            highest_seq: Arc::default(),
            gap_checked: Arc::default(),
            loaded: Arc::default(),
            unsigned_snapshots: false,
            finished_seq: Arc::default(),
            finished: Arc::default(),
            predecessor_wait: DEFAULT_PREDECESSOR_WAIT,
            recent: Arc::default(),
            floors: Arc::default(),
        }
    }

    /// How long a record sent right behind its predecessor (`Regroup-Pipelined: 1`) waits
    /// for that predecessor to be recorded here before it is refused (409 `behind`).
    pub fn predecessor_wait(mut self, wait: Duration) -> Self {
        self.predecessor_wait = wait;
        self
    }

    /// Without a replay secret, serves snapshots and restores to anyone who reaches the
    /// partition (only for a network where nothing but the proxy does). With a secret this
    /// changes nothing: a signature is always required.
    pub fn allow_unsigned_snapshots(mut self, on: bool) -> Self {
        self.unsigned_snapshots = on;
        self
    }

    /// The layer serving `/_regroup/snapshot` and `/_regroup/restore` from `snapshotter`,
    /// sharing this layer's secrets and memory; stack it outside this one.
    pub fn snapshots(&self, snapshotter: impl Snapshotter) -> SnapshotLayer {
        SnapshotLayer {
            snapshotter: Arc::new(snapshotter),
            replay: self.clone(),
        }
    }

    /// Requires replay headers signed with `secret` (replacing the secrets from the
    /// environment). An empty secret turns the check off.
    pub fn with_secret(mut self, secret: impl AsRef<[u8]>) -> Self {
        self.secrets = Secret::new(secret).into_iter().collect();
        self
    }

    /// Also accepts signatures made with `secret` (the previous one, while a rotation is
    /// under way). Given without a current secret, it is the only one accepted.
    pub fn with_previous_secret(mut self, secret: impl AsRef<[u8]>) -> Self {
        self.secrets.extend(Secret::new(secret));
        self
    }

    /// Accepts unsigned replay headers, whatever the environment says.
    pub fn without_secret(mut self) -> Self {
        self.secrets.clear();
        self
    }

    /// What counts as an update for [`ReplayLayer::require_regroup`]: give it the same
    /// route rules and read methods as the proxy's group.
    pub fn classifier(mut self, classifier: Classifier) -> Self {
        self.classifier = Arc::new(classifier);
        self
    }

    /// The largest body read to check a signature; larger gets 413.
    pub fn max_signed_body_bytes(mut self, limit: usize) -> Self {
        self.max_signed_body = limit;
        self
    }

    /// Answers `/_regroup/applied` from `store` and fences against the highest epoch it
    /// has recorded.
    pub fn with_store(mut self, store: impl AppliedStore) -> Self {
        self.store = Some(Arc::new(store));
        self
    }

    /// Refuses updates (every request the [`Classifier`] does not call a read) that did not
    /// come through regroup (403).
    pub fn require_regroup(mut self, on: bool) -> Self {
        self.require_regroup = on;
        self
    }
}

impl Default for ReplayLayer {
    /// Same as [`ReplayLayer::new`].
    fn default() -> Self {
        Self::new()
    }
}

impl<S> Layer<S> for ReplayLayer {
    type Service = Replay<S>;

    fn layer(&self, inner: S) -> Self::Service {
        Replay {
            inner,
            layer: self.clone(),
        }
    }
}

/// The service made by [`ReplayLayer`].
#[derive(Debug, Clone)]
pub struct Replay<S> {
    inner: S,
    layer: ReplayLayer,
}

impl<S> Replay<S> {
    /// The wrapped service.
    pub fn get_ref(&self) -> &S {
        &self.inner
    }

    /// Unwraps the inner service.
    pub fn into_inner(self) -> S {
        self.inner
    }
}

fn json<B: From<String>>(status: StatusCode, value: serde_json::Value) -> Response<B> {
    let mut resp = Response::new(B::from(value.to_string()));
    *resp.status_mut() = status;
    resp.headers_mut().insert(
        header::CONTENT_TYPE,
        header::HeaderValue::from_static("application/json"),
    );
    resp
}

fn error<B: From<String>>(status: StatusCode, code: &str, message: String) -> Response<B> {
    json(
        status,
        serde_json::json!({"error": code, "message": message}),
    )
}

impl<S, ReqBody, ResBody> Service<Request<ReqBody>> for Replay<S>
where
    S: Service<Request<ReqBody>, Response = Response<ResBody>> + Clone + Send + 'static,
    S::Future: Send + 'static,
    ReqBody: http_body::Body + From<Bytes> + Send + 'static,
    ReqBody::Data: Send,
    ReqBody::Error: Into<Box<dyn std::error::Error + Send + Sync>>,
    ResBody: From<String> + Send + 'static,
{
    type Response = Response<ResBody>;
    type Error = S::Error;
    type Future = Pin<Box<dyn Future<Output = Result<Self::Response, Self::Error>> + Send>>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, mut req: Request<ReqBody>) -> Self::Future {
        let clone = self.inner.clone();
        let mut inner = std::mem::replace(&mut self.inner, clone);
        let layer = self.layer.clone();
        Box::pin(async move {
            if req.uri().path() == APPLIED_PATH
                && req.method() == Method::GET
                && let Some(store) = &layer.store
            {
                if req.uri().query().is_none()
                    && let Ok((seq, epoch)) = store.applied().await
                {
                    // The proxy asks where this copy stands: memory catches up with the store.
                    layer.highest_seq.fetch_max(seq, Ordering::AcqRel);
                    layer.highest_epoch.fetch_max(epoch, Ordering::AcqRel);
                }
                return Ok(applied(store.as_ref(), req.uri().query()).await);
            }
            let ctx = match ReplayContext::from_headers(req.headers()) {
                Ok(ctx) => ctx,
                Err(e) => {
                    return Ok(error(
                        StatusCode::BAD_REQUEST,
                        "bad_replay_headers",
                        e.to_string(),
                    ));
                }
            };
            let seq = ctx.as_ref().map(ReplayContext::seq);
            // However the request ends (answered, refused, or dropped with its client),
            // records pipelined behind it stop waiting for it.
            let _finished = seq.map(|seq| Finished {
                layer: layer.clone(),
                seq,
            });
            match ctx {
                Some(ctx) => {
                    if !layer.secrets.is_empty() {
                        req = match layer.check_signature(req).await {
                            Ok(req) => req,
                            Err(resp) => return Ok(resp),
                        };
                    }
                    let parallel = req.headers().contains_key(headers::AFTER);
                    if parallel {
                        // Sent behind only the records it conflicts with (parallel replay).
                        if let Some(resp) = layer.after(&ctx, req.headers()).await {
                            return Ok(resp);
                        }
                    } else {
                        // A record past a gap is refused before the fence can rise for it.
                        if let Some(resp) = layer.gap(&ctx).await {
                            return Ok(resp);
                        }
                        if let Some(resp) = layer.contiguous(&ctx, req.headers()).await {
                            return Ok(resp);
                        }
                    }
                    if let Some(resp) = layer.term_fence(req.headers()) {
                        return Ok(resp);
                    }
                    if parallel {
                        // Out of seq order a lower epoch is no sign of a deposed sender: the
                        // exactly-once record compares it with the records below it.
                        layer.highest_epoch.fetch_max(ctx.epoch(), Ordering::AcqRel);
                    } else if let Some(resp) = layer.fence(&ctx).await {
                        return Ok(resp);
                    }
                    req.extensions_mut().insert(ctx);
                }
                None if layer.require_regroup
                    && layer.classifier.is_update(req.method(), req.uri().path()) =>
                {
                    return Ok(error(
                        StatusCode::FORBIDDEN,
                        "not_through_regroup",
                        "updates are only accepted through regroup".into(),
                    ));
                }
                None => {}
            }
            let mut resp = inner.call(req).await?;
            if layer.load().await {
                // Requests reach a partition one at a time, in seq order: an answer that is
                // not a server error means the seq was recorded (with its answer).
                if let Some(seq) = seq
                    && !resp.status().is_server_error()
                {
                    layer.highest_seq.fetch_max(seq, Ordering::AcqRel);
                    // A 409 may be the layer's own refusal from the handler's side (a
                    // fence, a seq conflict): records waiting on it ask the store instead.
                    if resp.status() != StatusCode::CONFLICT {
                        layer.note(seq, true);
                    }
                }
                resp.headers_mut().insert(
                    crate::headers::APPLIED,
                    header::HeaderValue::from(layer.highest_seq.load(Ordering::Acquire)),
                );
            }
            Ok(resp)
        })
    }
}

/// Marks a request with replay headers finished when dropped (after its answer, if any,
/// moved the highest recorded seq), waking the records pipelined behind it.
struct Finished {
    layer: ReplayLayer,
    seq: u64,
}

impl Drop for Finished {
    fn drop(&mut self) {
        self.layer.note(self.seq, false);
        self.layer
            .finished_seq
            .fetch_max(self.seq, Ordering::AcqRel);
        self.layer.finished.notify_waiters();
    }
}

impl ReplayLayer {
    /// Reads the body of a request with replay headers and checks its signature: the
    /// request rebuilt around the body, or the answer refusing it.
    async fn check_signature<ReqBody, B>(
        &self,
        req: Request<ReqBody>,
    ) -> Result<Request<ReqBody>, Response<B>>
    where
        ReqBody: http_body::Body + From<Bytes>,
        ReqBody::Error: Into<Box<dyn std::error::Error + Send + Sync>>,
        B: From<String>,
    {
        let (parts, body) = req.into_parts();
        let body = match Limited::new(body, self.max_signed_body).collect().await {
            Ok(collected) => collected.to_bytes(),
            Err(e) if e.is::<http_body_util::LengthLimitError>() => {
                return Err(error(
                    StatusCode::PAYLOAD_TOO_LARGE,
                    "body_too_large",
                    format!("a signed body is limited to {} bytes", self.max_signed_body),
                ));
            }
            Err(e) => {
                return Err(error(
                    StatusCode::BAD_REQUEST,
                    "bad_body",
                    format!("cannot read the request body: {e}"),
                ));
            }
        };
        let path = parts.uri.path_and_query().map_or("/", |pq| pq.as_str());
        let verdict = Signed::from_request(&parts.headers, parts.method.as_str(), path, &body)
            .and_then(|signed| {
                signed.verify(
                    parts.headers.get(headers::SIGNATURE).map(|v| v.as_bytes()),
                    &self.secrets,
                )
            });
        if let Err(e) = verdict {
            tracing::warn!(method = %parts.method, path, error = %e,
                "refused a request with replay headers: bad signature");
            return Err(error(StatusCode::FORBIDDEN, "bad_signature", e.to_string()));
        }
        Ok(Request::from_parts(parts, ReqBody::from(body)))
    }

    /// 409 when `ctx` comes from an older epoch than this partition has seen (and is not a
    /// re-delivery of an applied transaction).
    /// Loads the highest seq and epoch recorded, once per process (a restarted process, a
    /// restored copy included, reads them again).
    /// False while the store cannot be read (tried again on the next request).
    async fn load(&self) -> bool {
        let Some(store) = &self.store else {
            return false;
        };
        self.loaded
            .get_or_try_init(|| async {
                let (seq, epoch) = store.applied().await?;
                self.highest_epoch.fetch_max(epoch, Ordering::AcqRel);
                self.highest_seq.fetch_max(seq, Ordering::AcqRel);
                self.lock_recent().before = seq;
                Ok::<(), String>(())
            })
            .await
            .is_ok()
    }

    /// 409 `behind` when the first record after start is more than one past the highest seq
    /// recorded here: this copy stands behind where the proxy thinks (restored from an older
    /// backup), and applying the record on the older state would make it diverge. The answer carries
    /// `Regroup-Applied`, so the proxy repositions it. A partition that has recorded
    /// nothing yet accepts any seq (it may be a copy made before it ever took part).
    async fn gap<B: From<String>>(&self, ctx: &ReplayContext) -> Option<Response<B>> {
        if !self.load().await {
            return None;
        }
        // Only the first record after the process started is checked: that is when a copy
        // restored from an older backup meets a replayer that does not know yet. Later gaps
        // are records the journal skipped (never executed anywhere), and a refused first
        // record is sent again once the proxy has asked where the copy stands.
        if self.gap_checked.swap(true, Ordering::AcqRel) {
            return None;
        }
        let mut highest = self.highest_seq.load(Ordering::Acquire);
        if highest != 0 && ctx.seq() > highest + 1 {
            // Memory may lag the store (a request whose connection was dropped after its
            // work committed): only the store decides a gap.
            if let Some(store) = &self.store
                && let Ok((seq, _)) = store.applied().await
            {
                highest = self.highest_seq.fetch_max(seq, Ordering::AcqRel).max(seq);
            }
        }
        if highest == 0 || ctx.seq() <= highest + 1 {
            return None;
        }
        Some(Self::refuse_at(
            "behind",
            format!(
                "seq {} offered, but this partition has applied only up to {highest}",
                ctx.seq()
            ),
            highest,
        ))
    }

    /// With `Regroup-Prev: P` and the exactly-once record: applies the record only right after
    /// seq P (this partition's own last recorded seq must be P), unless the seq is recorded
    /// already (a re-delivery, answered from the record). Otherwise 409 `behind` (it stands
    /// before P) or `out_of_order` (after P: the sender is out of date), with
    /// `Regroup-Applied`; nothing is applied.
    async fn contiguous<B: From<String>>(
        &self,
        ctx: &ReplayContext,
        h: &http::HeaderMap,
    ) -> Option<Response<B>> {
        let value = h.get(headers::PREV)?;
        let Some(prev) = value.to_str().ok().and_then(|v| v.parse::<u64>().ok()) else {
            return Some(error(
                StatusCode::BAD_REQUEST,
                "bad_replay_headers",
                format!("invalid replay header {}: not a number", headers::PREV),
            ));
        };
        let store = self.store.as_ref()?;
        if !self.load().await {
            return None;
        }
        let mut highest = self.highest_seq.load(Ordering::Acquire);
        if highest < prev && h.get(headers::PIPELINED).is_some_and(|v| v == "1") {
            highest = self.wait_for_predecessor(prev).await;
        }
        if highest != prev {
            // Memory may lag the store (a request whose connection was dropped after its
            // work committed): the store decides.
            if let Ok((seq, _)) = store.applied().await {
                highest = seq;
                self.highest_seq.store(seq, Ordering::Release);
            }
        }
        if highest == prev || matches!(store.lookup(ctx.seq()).await, Ok(Some(_))) {
            return None;
        }
        let (code, why) = if highest < prev {
            ("behind", "it has applied only up to")
        } else {
            ("out_of_order", "it has applied up to")
        };
        Some(Self::refuse_at(
            code,
            format!(
                "seq {} offered after {prev}, but {why} {highest}",
                ctx.seq()
            ),
            highest,
        ))
    }

    fn lock_recent(&self) -> std::sync::MutexGuard<'_, Recent> {
        self.recent.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Notes that `seq`'s request finished here (`recorded`: with its record).
    fn note(&self, seq: u64, recorded: bool) {
        let mut recent = self.lock_recent();
        if recorded {
            Recent::note(&mut recent.recorded, seq);
        } else {
            Recent::note(&mut recent.finished, seq);
        }
    }

    /// The copy was replaced (restored): what memory knew of its records is void.
    fn forget_recent(&self, seq: u64) {
        let mut recent = self.lock_recent();
        *recent = Recent::default();
        recent.before = seq;
    }

    /// Parallel replay (`Regroup-After: D1,D2,..` with `Regroup-Floor: F`): applies the record
    /// once each Di is recorded here, waiting for those still on their way or executing when
    /// it was sent right behind them (`Regroup-Pipelined: 1`), bounded by
    /// [`ReplayLayer::predecessor_wait`]. Refused with 409 `behind` (and `Regroup-Applied`
    /// at its resume) when F is above where this copy is dense, until a record passes that
    /// after the process started (a restored copy may have holes below its highest record),
    /// with 409
    /// `out_of_order` when a Di is not recorded (nothing is applied; a re-delivery of a
    /// recorded seq is answered from its record) or when the store cannot record floors.
    async fn after<B: From<String>>(
        &self,
        ctx: &ReplayContext,
        h: &http::HeaderMap,
    ) -> Option<Response<B>> {
        let deps = h
            .get(headers::AFTER)
            .and_then(|v| parse_seqs(v.to_str().ok()?));
        let (Some(mut deps), Some(floor)) = (deps, ctx.floor()) else {
            return Some(error(
                StatusCode::BAD_REQUEST,
                "bad_replay_headers",
                format!(
                    "{} must be a comma-separated list of seqs, sent with {}",
                    headers::AFTER,
                    headers::FLOOR
                ),
            ));
        };
        if deps.iter().any(|d| *d >= ctx.seq()) || floor >= ctx.seq() {
            return Some(error(
                StatusCode::BAD_REQUEST,
                "bad_replay_headers",
                format!(
                    "seq {}: {} and {} must name earlier seqs",
                    ctx.seq(),
                    headers::AFTER,
                    headers::FLOOR
                ),
            ));
        }
        let store = self.store.as_ref()?;
        if !self.load().await {
            // Out of seq order nothing may run unchecked: the sender tries again.
            return Some(self.refuse(
                "out_of_order",
                format!(
                    "seq {} sent out of seq order, but this partition cannot read its \
                     exactly-once record now",
                    ctx.seq()
                ),
            ));
        }
        let floors = self
            .floors
            .get_or_try_init(|| async { store.resume().await.map(|r| r.is_some()) })
            .await;
        if !matches!(floors, Ok(true)) {
            return Some(self.refuse(
                "out_of_order",
                format!(
                    "seq {} sent out of seq order, but this partition records in seq order \
                     only (its regroup_applied has no floor column: add \
                     regroup_migrations::AppliedFloorMigration)",
                    ctx.seq()
                ),
            ));
        }
        // Until a record passes it after the process started, each record's floor is checked
        // against where this copy is dense (its resume): that is when a copy restored from
        // an older backup, with holes below its highest record, meets a sender that does not
        // know yet. The sender resumes where the copy is dense, and its next floor passes.
        // Later, the records up to a floor may end with ones the journal skipped (never sent
        // here): past the copy's record, and no sign of anything.
        if !self.gap_checked.load(Ordering::Acquire) {
            let resume = match store.resume().await {
                Ok(Some(resume)) => resume,
                _ => 0,
            };
            let highest = self.highest_seq.load(Ordering::Acquire);
            if highest != 0 && floor > resume {
                return Some(Self::refuse_at(
                    "behind",
                    format!(
                        "seq {} offered with floor {floor}, but this partition holds every \
                         record only up to {resume} (it was restarted, perhaps restored)",
                        ctx.seq()
                    ),
                    resume,
                ));
            }
            self.gap_checked.store(true, Ordering::Release);
        }
        // Those memory has not seen recorded: recorded before it began (the store knows),
        // or still on their way (wait for them when sent right behind them).
        let before = {
            let recent = self.lock_recent();
            deps.retain(|d| !recent.recorded.contains(d));
            recent.before
        };
        let mut missing = Vec::new();
        for d in deps {
            if d > before || !matches!(store.lookup(d).await, Ok(Some(_))) {
                missing.push(d);
            }
        }
        if !missing.is_empty() && h.get(headers::PIPELINED).is_some_and(|v| v == "1") {
            missing = self.wait_for_recorded(missing).await;
        }
        for d in missing {
            if matches!(store.lookup(d).await, Ok(Some(_))) {
                continue;
            }
            if matches!(store.lookup(ctx.seq()).await, Ok(Some(_))) {
                // A re-delivery: answered from its record.
                return None;
            }
            return Some(self.refuse(
                "out_of_order",
                format!(
                    "seq {} comes after seq {d}, which is not recorded here",
                    ctx.seq()
                ),
            ));
        }
        None
    }

    /// A 409 refusal with `Regroup-Applied`.
    fn refuse<B: From<String>>(&self, code: &str, message: String) -> Response<B> {
        Self::refuse_at(code, message, self.highest_seq.load(Ordering::Acquire))
    }

    /// A 409 refusal with `Regroup-Applied: applied`.
    fn refuse_at<B: From<String>>(code: &str, message: String, applied: u64) -> Response<B> {
        let mut resp: Response<B> = error(StatusCode::CONFLICT, code, message);
        resp.headers_mut()
            .insert(crate::headers::APPLIED, header::HeaderValue::from(applied));
        resp
    }

    /// Waits until every seq of `missing` is recorded here, one of them finished without
    /// being recorded, or [`ReplayLayer::predecessor_wait`] passed: those not recorded then.
    async fn wait_for_recorded(&self, mut missing: Vec<u64>) -> Vec<u64> {
        let deadline = tokio::time::Instant::now() + self.predecessor_wait;
        loop {
            let finished = self.finished.notified();
            tokio::pin!(finished);
            // Registered before looking, so a finish between the look and the wait wakes it.
            finished.as_mut().enable();
            {
                let recent = self.lock_recent();
                missing.retain(|d| !recent.recorded.contains(d));
                if missing.is_empty() || missing.iter().any(|d| recent.finished.contains(d)) {
                    return missing;
                }
            }
            if tokio::time::timeout_at(deadline, finished).await.is_err() {
                return missing;
            }
        }
    }

    /// Waits until seq `prev` is recorded here, its request finished without being
    /// recorded, or [`ReplayLayer::predecessor_wait`] passed: the highest seq recorded then.
    async fn wait_for_predecessor(&self, prev: u64) -> u64 {
        let deadline = tokio::time::Instant::now() + self.predecessor_wait;
        loop {
            let finished = self.finished.notified();
            tokio::pin!(finished);
            // Registered before looking, so a finish between the look and the wait wakes it.
            finished.as_mut().enable();
            let highest = self.highest_seq.load(Ordering::Acquire);
            if highest >= prev || self.finished_seq.load(Ordering::Acquire) >= prev {
                return highest;
            }
            if tokio::time::timeout_at(deadline, finished).await.is_err() {
                return self.highest_seq.load(Ordering::Acquire);
            }
        }
    }

    /// Refuses a request from a proxy whose term is below the highest seen: a proxy that was
    /// taken over (409 `deposed`, with the highest term in `Regroup-Term`). A request
    /// without the header passes (a proxy that sends none).
    fn term_fence<B: From<String>>(&self, h: &http::HeaderMap) -> Option<Response<B>> {
        let value = h.get(headers::TERM)?;
        let Some(term) = value.to_str().ok().and_then(|v| v.parse::<u64>().ok()) else {
            return Some(error(
                StatusCode::BAD_REQUEST,
                "bad_replay_headers",
                format!("invalid replay header {}: not a number", headers::TERM),
            ));
        };
        let highest = self.highest_term.fetch_max(term, Ordering::AcqRel);
        if term >= highest {
            return None;
        }
        let mut resp = error(
            StatusCode::CONFLICT,
            "deposed",
            format!(
                "proxy term {term} is older than term {highest} already seen by this \
                 partition: another proxy took the journal over"
            ),
        );
        resp.headers_mut()
            .insert(headers::TERM, header::HeaderValue::from(highest));
        Some(resp)
    }

    async fn fence<B: From<String>>(&self, ctx: &ReplayContext) -> Option<Response<B>> {
        self.load().await;
        let highest = self.highest_epoch.fetch_max(ctx.epoch(), Ordering::AcqRel);
        if ctx.epoch() >= highest {
            return None;
        }
        if let Some(store) = &self.store
            && matches!(store.lookup(ctx.seq()).await, Ok(Some(_)))
        {
            return None;
        }
        Some(error(
            StatusCode::CONFLICT,
            "fenced",
            format!(
                "epoch {} is older than epoch {highest} already seen by this partition",
                ctx.epoch()
            ),
        ))
    }
}

/// A comma-separated list of seqs (empty: none).
fn parse_seqs(v: &str) -> Option<Vec<u64>> {
    if v.trim().is_empty() {
        return Some(Vec::new());
    }
    v.split(',').map(|p| p.trim().parse::<u64>().ok()).collect()
}

async fn applied<B: From<String>>(store: &dyn AppliedStore, query: Option<&str>) -> Response<B> {
    let seq = query
        .unwrap_or("")
        .split('&')
        .find_map(|kv| kv.strip_prefix("seq="));
    match seq {
        None => match store.applied().await {
            Ok((applied, epoch)) => {
                let mut doc = serde_json::json!({"applied": applied, "epoch": epoch});
                match store.resume().await {
                    // Offered only by a store that records floors: parallel replay.
                    Ok(Some(resume)) => doc["resume"] = resume.into(),
                    Ok(None) => {}
                    Err(e) => {
                        return error(StatusCode::SERVICE_UNAVAILABLE, "store_unavailable", e);
                    }
                }
                json(StatusCode::OK, doc)
            }
            Err(e) => error(StatusCode::SERVICE_UNAVAILABLE, "store_unavailable", e),
        },
        Some(n) => {
            let Ok(n) = n.parse::<u64>() else {
                return error(
                    StatusCode::BAD_REQUEST,
                    "bad_seq",
                    format!("seq {n:?} is not a number"),
                );
            };
            match store.lookup(n).await {
                Ok(Some(r)) => json(
                    StatusCode::OK,
                    serde_json::json!({"seq": n, "applied": true, "status": r.answer.status, "epoch": r.epoch}),
                ),
                Ok(None) => json(
                    StatusCode::OK,
                    serde_json::json!({"seq": n, "applied": false}),
                ),
                Err(e) => error(StatusCode::SERVICE_UNAVAILABLE, "store_unavailable", e),
            }
        }
    }
}

/// Serves `GET /_regroup/snapshot` and `PUT /_regroup/restore` (made by
/// [`ReplayLayer::snapshots`]). The snapshot is buffered in memory to be answered, so the
/// response body type must be buildable from [`Bytes`] (axum's `Body`).
#[derive(Clone)]
pub struct SnapshotLayer {
    snapshotter: Arc<dyn Snapshotter>,
    replay: ReplayLayer,
}

impl std::fmt::Debug for SnapshotLayer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SnapshotLayer")
            .field("replay", &self.replay)
            .finish_non_exhaustive()
    }
}

impl<S> Layer<S> for SnapshotLayer {
    type Service = Snapshots<S>;

    fn layer(&self, inner: S) -> Self::Service {
        Snapshots {
            inner,
            layer: self.clone(),
        }
    }
}

/// The service made by [`SnapshotLayer`].
#[derive(Debug, Clone)]
pub struct Snapshots<S> {
    inner: S,
    layer: SnapshotLayer,
}

impl<S> Snapshots<S> {
    /// The wrapped service.
    pub fn get_ref(&self) -> &S {
        &self.inner
    }

    /// Unwraps the inner service.
    pub fn into_inner(self) -> S {
        self.inner
    }
}

impl<S, ReqBody, ResBody> Service<Request<ReqBody>> for Snapshots<S>
where
    S: Service<Request<ReqBody>, Response = Response<ResBody>> + Clone + Send + 'static,
    S::Future: Send + 'static,
    ReqBody: http_body::Body + Send + 'static,
    ReqBody::Data: Send,
    ReqBody::Error: Into<Box<dyn std::error::Error + Send + Sync>>,
    ResBody: From<String> + From<Bytes> + Send + 'static,
{
    type Response = Response<ResBody>;
    type Error = S::Error;
    type Future = Pin<Box<dyn Future<Output = Result<Self::Response, Self::Error>> + Send>>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, req: Request<ReqBody>) -> Self::Future {
        let path = req.uri().path();
        let ours = (path == snapshot::SNAPSHOT_PATH && req.method() == Method::GET)
            || (path == snapshot::RESTORE_PATH
                && (req.method() == Method::PUT || req.method() == Method::GET));
        if !ours {
            let fut = self.inner.call(req);
            return Box::pin(fut);
        }
        let layer = self.layer.clone();
        Box::pin(async move { Ok(layer.serve(req).await) })
    }
}

impl SnapshotLayer {
    /// Who may call: with secrets, a valid signature; without, only when allowed.
    fn authorize<B: From<String>>(&self, parts: &http::request::Parts) -> Option<Response<B>> {
        let replay = &self.replay;
        if replay.secrets.is_empty() {
            if replay.unsigned_snapshots {
                return None;
            }
            return Some(error(
                StatusCode::FORBIDDEN,
                "snapshots_disabled",
                "snapshots and restores need a replay secret (REGROUP_REPLAY_SECRET), or the \
                 app's explicit permission to serve them unsigned"
                    .into(),
            ));
        }
        match snapshot::verify_snapshot_request(
            &parts.headers,
            parts.method.as_str(),
            parts.uri.path(),
            &replay.secrets,
        ) {
            Ok(()) => None,
            Err(e) => {
                tracing::warn!(path = parts.uri.path(), error = %e,
                    "refused a snapshot request: bad signature");
                Some(error(StatusCode::FORBIDDEN, "bad_signature", e))
            }
        }
    }

    async fn serve<ReqBody, B>(&self, req: Request<ReqBody>) -> Response<B>
    where
        ReqBody: http_body::Body + Send + 'static,
        ReqBody::Data: Send,
        ReqBody::Error: Into<Box<dyn std::error::Error + Send + Sync>>,
        B: From<String> + From<Bytes>,
    {
        let (parts, body) = req.into_parts();
        if let Some(refused) = self.authorize(&parts) {
            return refused;
        }
        if parts.method == Method::GET && parts.uri.path() == snapshot::SNAPSHOT_PATH {
            return self.snapshot().await;
        }
        if parts.method == Method::GET {
            // `GET /_regroup/restore`: whether a restore from this caller would be taken,
            // asked before a snapshot is streamed here.
            let mut resp = Response::new(B::from(String::new()));
            *resp.status_mut() = StatusCode::NO_CONTENT;
            return resp;
        }
        let Some(format) = parts
            .headers
            .get(snapshot::FORMAT_HEADER)
            .and_then(|v| v.to_str().ok())
        else {
            return error(
                StatusCode::BAD_REQUEST,
                "no_format",
                format!("a restore needs {}", snapshot::FORMAT_HEADER),
            );
        };
        let stream: SnapshotBody = Box::pin(
            BodyExt::into_data_stream(body)
                .map_ok(|mut d| {
                    let n = bytes::Buf::remaining(&d);
                    bytes::Buf::copy_to_bytes(&mut d, n)
                })
                .map_err(|e| std::io::Error::other(e.into())),
        );
        match self.snapshotter.restore(format, stream).await {
            Ok(restored) => {
                // This copy now stands where the snapshot stood, even if it was further
                // ahead before: the next record it takes is the one after it.
                let replay = &self.replay;
                replay.highest_seq.store(restored.seq, Ordering::Release);
                replay.forget_recent(restored.seq);
                replay
                    .highest_epoch
                    .store(restored.epoch, Ordering::Release);
                replay.gap_checked.store(true, Ordering::Release);
                tracing::info!(
                    seq = restored.seq,
                    epoch = restored.epoch,
                    "restored a snapshot"
                );
                json(
                    StatusCode::OK,
                    serde_json::json!({"seq": restored.seq, "epoch": restored.epoch}),
                )
            }
            Err(e) => {
                tracing::error!(error = %e, "restore failed; nothing changed");
                let status = match e {
                    snapshot::SnapshotError::Invalid(_) => StatusCode::UNPROCESSABLE_ENTITY,
                    _ => StatusCode::SERVICE_UNAVAILABLE,
                };
                error(status, "restore_failed", e.to_string())
            }
        }
    }

    async fn snapshot<B: From<String> + From<Bytes>>(&self) -> Response<B> {
        let snap = match self.snapshotter.snapshot().await {
            Ok(s) => s,
            Err(e) => {
                tracing::error!(error = %e, "snapshot failed");
                return error(
                    StatusCode::SERVICE_UNAVAILABLE,
                    "snapshot_failed",
                    e.to_string(),
                );
            }
        };
        let mut body = Vec::new();
        let mut stream = snap.body;
        while let Some(chunk) = stream.next().await {
            match chunk {
                Ok(c) => body.extend_from_slice(&c),
                Err(e) => {
                    return error(
                        StatusCode::SERVICE_UNAVAILABLE,
                        "snapshot_failed",
                        e.to_string(),
                    );
                }
            }
        }
        let mut resp = Response::new(B::from(Bytes::from(body)));
        let h = resp.headers_mut();
        h.insert(snapshot::SEQ_HEADER, header::HeaderValue::from(snap.seq));
        h.insert(
            snapshot::EPOCH_HEADER,
            header::HeaderValue::from(snap.epoch),
        );
        if let Ok(v) = header::HeaderValue::from_str(&snap.format) {
            h.insert(snapshot::FORMAT_HEADER, v);
        }
        h.insert(
            header::CONTENT_TYPE,
            header::HeaderValue::from_static("application/octet-stream"),
        );
        resp
    }
}
