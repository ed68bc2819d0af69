//! Starting and serving the proxy: opens the journal and groups, starts supervision,
//! replication and read balancing, builds the client-facing service stack and serves it
//! and the admin API with hyper.

use std::future::Future;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use http::{Request, Response};
use http_body_util::BodyExt;
use hyper::body::Incoming;
use hyper_util::rt::TokioIo;
use hyper_util::server::graceful::GracefulShutdown;
use hyper_util::service::TowerToHyperService;
use regroup_replay::{CachedJournal, Journal, NatsJournal, SqlJournal};
use tokio::net::{TcpListener, TcpSocket, TcpStream};
use tokio::sync::{OwnedSemaphorePermit, Semaphore};
use tower::{Service, ServiceBuilder};
use tower_http::timeout::DeadlineBody;

use crate::admin::Admin;
use crate::config::{Config, Proxies};
use crate::error::ProxyError;
use crate::forward::{BoxError, ProxyBody, upstream_client};
use crate::group::Group;
use crate::link::{HttpLink, PartitionLink};
use crate::ownership::{self, Ownership};
use crate::read::Reads;
use crate::route::{CLIENT, RegroupLayer, Routed};
use crate::serve_h1;

/// The environment variable that overrides `admin_token`.
pub const ADMIN_TOKEN_ENV: &str = "REGROUP_ADMIN_TOKEN";

/// A running regroup: its groups with their background tasks (supervision, replayers,
/// read membership). Dropping it stops them.
#[derive(Debug)]
pub struct Proxy {
    routes: Vec<Routed>,
    admin: Admin,
    limits: Limits,
    ownership: Ownership,
}

/// The request limits of the client-facing stack, from the config.
#[derive(Debug, Clone, Copy)]
struct Limits {
    body_read_timeout: Duration,
}

impl Proxy {
    /// Connects the configured journal and starts every group.
    pub async fn start(config: &Config) -> Result<Proxy, ProxyError> {
        Proxy::with_journal(
            config,
            open_journal(&config.journal, config.journal_sync).await?,
        )
        .await
    }

    /// Starts every group on `journal`.
    pub async fn with_journal(
        config: &Config,
        journal: Arc<dyn Journal>,
    ) -> Result<Proxy, ProxyError> {
        let ownership = ownership::claim(config, journal.clone()).await?;
        Proxy::with_ownership(config, journal, ownership).await
    }

    /// Starts every group on `journal`, which this process has claimed.
    pub async fn with_ownership(
        config: &Config,
        journal: Arc<dyn Journal>,
        ownership: Ownership,
    ) -> Result<Proxy, ProxyError> {
        let token = admin_token(config)?;
        let client = upstream_client();
        let mut routes = Vec::new();
        let mut groups = Vec::new();
        for gc in &config.groups {
            let link: Arc<dyn PartitionLink> = Arc::new(
                HttpLink::new(client.clone())
                    .signed(gc.signing_secret())
                    .term(ownership.token()),
            );
            if let Some((limit, what)) = journal.record_limit()
                && gc.max_body_bytes >= limit
            {
                tracing::warn!(group = %gc.name, max_body_bytes = gc.max_body_bytes, limit,
                    "max_body_bytes is not below the journal's record limit ({what}): \
                     updates whose record exceeds it are answered 413");
            }
            let group = Group::open(gc.clone(), journal.clone(), link).await?;
            group.start().await;
            let reads = Reads::start(&group);
            tracing::info!(group = %group.name(), primary = %group.role().primary,
                epoch = group.epoch(), head = group.head(), "group started");
            groups.push(group.clone());
            routes.push(Routed {
                group,
                reads,
                runtime: tokio::runtime::Handle::current(),
                on_client_thread: false,
            });
        }
        if token.is_none() && !config.admin_listen.ip().is_loopback() {
            tracing::warn!(admin_listen = %config.admin_listen,
                "admin_listen is not a loopback address and no admin_token is set: \
                 anyone who reaches it can promote, drain and resolve");
        }
        Ok(Proxy {
            routes,
            admin: Admin::new(groups, token, config),
            limits: Limits {
                body_read_timeout: config.body_read_timeout(),
            },
            ownership,
        })
    }

    /// Shows which proxy answers and leads in `/status` (several proxies).
    pub(crate) fn proxy_status(mut self, status: crate::admin::ProxyStatus) -> Self {
        self.admin = self.admin.clone().with_proxy(status);
        self
    }

    /// The routing stack over boxed bodies (a node of several proxies puts the body
    /// deadline in front of it, per connection).
    pub(crate) fn node_service(
        &self,
    ) -> impl Service<
        Request<ProxyBody>,
        Response = Response<ProxyBody>,
        Error = BoxError,
        Future: Send + 'static,
    > + Clone
    + Send
    + Sync
    + 'static {
        ServiceBuilder::new()
            .layer(self.layer())
            .service_fn(|req: Request<ProxyBody>| async move {
                Ok::<_, BoxError>(ProxyError::NoGroup(req.uri().path().to_owned()).into_response())
            })
    }

    /// The layer that routes requests to this proxy's groups (for embedding regroup in a
    /// server of your own; requests no group serves reach your service).
    pub fn layer(&self) -> RegroupLayer {
        RegroupLayer::new(self.routes.clone())
    }

    /// The groups.
    pub fn groups(&self) -> impl Iterator<Item = &Arc<Group>> {
        self.routes.iter().map(|r| &r.group)
    }

    /// The journal's ownership lease held by this proxy.
    pub fn ownership(&self) -> &Ownership {
        &self.ownership
    }

    /// The admin API.
    pub fn admin(&self) -> &Admin {
        &self.admin
    }

    /// The client-facing stack, outermost layer first (the connection-level limits, header
    /// size, header count and header time-out, are hyper's: see [`serve`]).
    pub fn service(
        &self,
    ) -> impl Service<
        Request<Incoming>,
        Response = Response<ProxyBody>,
        Error = BoxError,
        Future: Send + 'static,
    > + Clone
    + Send
    + Sync
    + 'static {
        client_stack(self.layer(), self.limits)
    }

    /// What each client thread builds its own client-facing stack from.
    fn thread_stacks(&self) -> ThreadStacks {
        ThreadStacks {
            groups: self
                .routes
                .iter()
                .map(|r| (r.group.clone(), r.runtime.clone()))
                .collect(),
            limits: self.limits,
        }
    }
}

/// Builds, on a client thread, that thread's client-facing stack: the same as
/// [`Proxy::service`], with read balancers (and their upstream connections) of the thread's
/// own, each kept in step with its group by a task on the thread's runtime.
#[derive(Clone)]
struct ThreadStacks {
    groups: Vec<(Arc<Group>, tokio::runtime::Handle)>,
    limits: Limits,
}

impl ThreadStacks {
    /// The current thread's stack (called on its runtime), under the body deadline.
    fn build(&self) -> impl ClientService<ClientBody<Incoming>> {
        let routes = self
            .groups
            .iter()
            .map(|(group, runtime)| Routed {
                group: group.clone(),
                reads: Reads::start(group),
                runtime: runtime.clone(),
                on_client_thread: true,
            })
            .collect();
        routed_stack(RegroupLayer::new(routes))
    }
}

/// The client-facing stack over `layer`, outermost layer first.
fn client_stack(
    layer: RegroupLayer,
    limits: Limits,
) -> impl Service<
    Request<Incoming>,
    Response = Response<ProxyBody>,
    Error = BoxError,
    Future: Send + 'static,
> + Clone
+ Send
+ Sync
+ 'static {
    ServiceBuilder::new()
        // Bounds the time a client has to send the whole body: a stalled or trickled
        // update body fails its read with a time-out, answered 408 before anything is
        // journaled. Outermost, so the clock starts when the request arrives.
        .map_request(move |req| client_body(req, limits.body_read_timeout))
        .service(routed_stack(layer))
}

/// The client-facing stack under the body deadline ([`ClientBody`]).
fn routed_stack(layer: RegroupLayer) -> impl ClientService<ClientBody<Incoming>> {
    ServiceBuilder::new()
        // Routes each request to its group: updates to the journaled path (body limit
        // `max_body_bytes`, 413), reads to the balancer (time-out `read_timeout_ms`, 504).
        .layer(layer)
        // Requests no group serves get a JSON 404.
        .service_fn(|req: Request<ClientBody<Incoming>>| async move {
            Ok::<_, BoxError>(ProxyError::NoGroup(req.uri().path().to_owned()).into_response())
        })
}

impl Proxy {
    /// Stops every group's background work (supervision, replayers, failover, retention):
    /// a node of several proxies that lost the lease steps down.
    pub(crate) fn stop_groups(&self) {
        for r in &self.routes {
            r.group.stop();
        }
    }
}

impl Drop for Proxy {
    fn drop(&mut self) {
        for r in &self.routes {
            r.group.stop();
        }
    }
}

/// The addresses a started server listens on.
#[derive(Debug, Clone, Copy)]
pub struct Bound {
    /// Client-facing.
    pub listen: SocketAddr,
    /// Admin.
    pub admin: SocketAddr,
}

/// Starts `config`'s proxy and serves it until `shutdown` completes. `on_bound` is called
/// once both listeners are bound (with the real ports when the config says `:0`).
///
/// With `proxies = "several"` this process is a node of several (see `follow`): it leads
/// when it holds the journal's lease, and otherwise forwards to the leader and takes over
/// when the leader's lease runs out.
pub async fn serve(
    config: Config,
    shutdown: impl Future<Output = ()> + Send,
    on_bound: impl FnOnce(Bound),
) -> Result<(), ProxyError> {
    admin_token(&config)?;
    let client_threads = match config.proxies {
        Proxies::Several => 0,
        _ => config.client_threads(),
    };
    // With client threads, each listens on the client port: the first listener already
    // allows that (`SO_REUSEPORT`).
    let listener = if client_threads > 0 {
        bind_client(config.listen)
    } else {
        TcpListener::bind(config.listen).await
    }
    .map_err(|e| ProxyError::BadRequest(format!("cannot listen on {}: {e}", config.listen)))?;
    let admin_listener = TcpListener::bind(config.admin_listen).await.map_err(|e| {
        ProxyError::BadRequest(format!("cannot listen on {}: {e}", config.admin_listen))
    })?;
    // The journal's owner is described by the addresses really bound.
    let mut config = config;
    (config.listen, config.admin_listen) = (
        listener.local_addr().unwrap_or(config.listen),
        admin_listener.local_addr().unwrap_or(config.admin_listen),
    );
    let bound = Bound {
        listen: config.listen,
        admin: config.admin_listen,
    };
    let listeners = Listeners {
        client: listener,
        admin: admin_listener,
    };
    if config.proxies == Proxies::Several {
        let journal = open_journal(&config.journal, config.journal_sync).await?;
        let (node, lost) = crate::follow::start(&config, journal).await?;
        let body_timeout = config.body_read_timeout();
        let clients = {
            let node = node.clone();
            ServiceBuilder::new()
                .map_request(move |req| boxed_body(client_body(req, body_timeout)))
                .service_fn(move |req: Request<ProxyBody>| node.clone().handle(req))
        };
        let admin_node = node.clone();
        let admin = move |req: Request<Incoming>| admin_node.clone().admin(req);
        // Several proxies: a node's clients stay on its main runtime (the node forwards to
        // the leader or takes over; client threads are for the single proxy).
        let taken_over = listeners
            .run(
                &config,
                Clients::Inline(clients),
                admin,
                move || on_bound(bound),
                shutdown,
                async move { Some(lost.await) },
            )
            .await?;
        return finish(&config, taken_over, node.release()).await;
    }
    let proxy = Proxy::start(&config).await?;
    let admin = proxy.admin().clone();
    let handle_admin = move |req: Request<Incoming>| {
        let admin = admin.clone();
        async move { admin.handle(req).await }
    };
    let clients = if client_threads > 0 {
        Clients::Threads(client_threads, proxy.thread_stacks())
    } else {
        Clients::Inline(proxy.service())
    };
    let taken_over = listeners
        .run(
            &config,
            clients,
            handle_admin,
            move || on_bound(bound),
            shutdown,
            async { Some(proxy.ownership().lost().await) },
        )
        .await?;
    finish(&config, taken_over, proxy.ownership().release()).await
}

fn boxed_body(req: Request<ClientBody<Incoming>>) -> Request<ProxyBody> {
    req.map(BodyExt::boxed_unsync)
}

pin_project_lite::pin_project! {
    /// A client's request body: under tower-http's [`DeadlineBody`] (the whole body within
    /// `body_read_timeout_ms`) when the request may carry one, as it is when it carries none
    /// (no `Content-Length` above 0, no `Transfer-Encoding`: the usual read), which spares
    /// every such request a timer for a body that never comes.
    #[project = ClientBodyProj]
    pub(crate) enum ClientBody<B> {
        /// A request without a body.
        Bodiless { #[pin] body: B },
        /// A request that may carry a body, under its deadline.
        Bounded { #[pin] body: DeadlineBody<B> },
        /// A request the proxy's own HTTP/1 read (it has no body, see [`serve_h1`]).
        Empty,
    }
}

/// `req` with its body as [`ClientBody`].
pub(crate) fn client_body<B>(req: Request<B>, timeout: Duration) -> Request<ClientBody<B>> {
    let bodiless = crate::route::has_no_body(&req);
    req.map(|body| {
        if bodiless {
            ClientBody::Bodiless { body }
        } else {
            ClientBody::Bounded {
                body: DeadlineBody::new(timeout, body),
            }
        }
    })
}

impl<B> http_body::Body for ClientBody<B>
where
    B: http_body::Body,
    B::Error: Into<BoxError>,
{
    type Data = B::Data;
    type Error = BoxError;

    fn poll_frame(
        self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<Option<Result<http_body::Frame<B::Data>, BoxError>>> {
        match self.project() {
            ClientBodyProj::Bodiless { body } => body
                .poll_frame(cx)
                .map(|frame| frame.map(|f| f.map_err(Into::into))),
            ClientBodyProj::Bounded { body } => body.poll_frame(cx),
            ClientBodyProj::Empty => std::task::Poll::Ready(None),
        }
    }

    fn is_end_stream(&self) -> bool {
        match self {
            ClientBody::Bodiless { body } => body.is_end_stream(),
            ClientBody::Bounded { body } => body.is_end_stream(),
            ClientBody::Empty => true,
        }
    }

    fn size_hint(&self) -> http_body::SizeHint {
        match self {
            ClientBody::Bodiless { body } => body.size_hint(),
            ClientBody::Bounded { body } => body.size_hint(),
            ClientBody::Empty => http_body::SizeHint::with_exact(0),
        }
    }
}

/// After serving: an error naming the new owner when the journal was taken over, else the
/// lease released (`release`).
async fn finish(
    config: &Config,
    taken_over: Option<String>,
    release: impl Future<Output = ()>,
) -> Result<(), ProxyError> {
    if let Some(holder) = taken_over {
        return Err(ProxyError::JournalOwned(format!(
            "journal {} was taken over by {holder}: this proxy stopped serving",
            redact(&config.journal)
        )));
    }
    release.await;
    Ok(())
}

/// The client and admin listeners.
struct Listeners {
    client: TcpListener,
    admin: TcpListener,
}

/// The client-facing stack as the listeners take it: requests with hyper's body, or with
/// a [`ClientBody`] (a client thread's connections, [`serve_h1`]).
pub(crate) trait ClientService<B = Incoming>:
    Service<Request<B>, Response = Response<ProxyBody>, Error = BoxError, Future: Send + 'static>
    + Clone
    + Send
    + Sync
    + 'static
{
}

impl<S, B> ClientService<B> for S where
    S: Service<
            Request<B>,
            Response = Response<ProxyBody>,
            Error = BoxError,
            Future: Send + 'static,
        > + Clone
        + Send
        + Sync
        + 'static
{
}

/// Where client connections are served.
enum Clients<S> {
    /// On the current runtime, by this stack.
    Inline(S),
    /// On that many client threads, each with a stack of its own (see [`client_thread`]).
    Threads(usize, ThreadStacks),
}

impl Listeners {
    /// Serves the clients and `admin` until `shutdown` or `lost` completes (then finishes the
    /// requests in flight, for at most 10 s); returns what `lost` said, if it ended it.
    /// Clients are served on this runtime or on client threads, as `clients` says;
    /// `on_ready` is called once they are accepted (every client thread that could start
    /// listens), and an error naming why is returned when no client thread could.
    async fn run<S, A, AF>(
        self,
        config: &Config,
        clients: Clients<S>,
        admin: A,
        on_ready: impl FnOnce(),
        shutdown: impl Future<Output = ()> + Send,
        lost: impl Future<Output = Option<String>>,
    ) -> Result<Option<String>, ProxyError>
    where
        S: ClientService,
        A: Fn(Request<Incoming>) -> AF + Clone + Send + Sync + 'static,
        AF: Future<Output = Response<ProxyBody>> + Send + 'static,
    {
        let graceful = GracefulShutdown::new();
        // Both ports speak HTTP/1.1 only (the version sniffing of an HTTP/1 + h2c server cost
        // ~5% of read throughput), with the same header limits: a header block over
        // `max_header_bytes` or with more than `max_headers` headers gets hyper's 431 and the
        // connection is closed; one not received within `header_read_timeout_ms` closes it.
        let mut http1 = hyper::server::conn::http1::Builder::new();
        http1
            .timer(hyper_util::rt::TokioTimer::new())
            .max_header_size(config.max_header_bytes)
            .max_buf_size(config.max_header_bytes.max(MIN_READ_BUFFER))
            .header_read_timeout(config.header_read_timeout());
        // hyper's own limit is the same 100 and keeps its header slots on the stack; set only
        // when it differs.
        if config.max_headers != crate::config::DEFAULT_MAX_HEADERS {
            http1.max_headers(config.max_headers);
        }
        let Listeners {
            client,
            admin: admin_listener,
        } = self;
        let permits = Arc::new(Semaphore::new(config.max_connections));
        // Client threads: each stops accepting when `stop` says so, finishes its connections
        // and drops its sender of `alive`, which closes when none is left.
        let (stop, stopped) = tokio::sync::watch::channel(false);
        let (alive, mut all_gone) = tokio::sync::mpsc::channel::<()>(1);
        // Each client thread says whether it listens before it accepts.
        let (ready, mut listening) = tokio::sync::mpsc::unbounded_channel();
        let mut inline = None;
        let threads = match clients {
            Clients::Inline(clients) => {
                inline = Some((client, clients));
                None
            }
            Clients::Threads(n, stacks) => Some((client, n, stacks)),
        };
        let thread_count = threads.as_ref().map_or(0, |(_, n, _)| *n);
        if let Some((client, client_threads, stacks)) = threads {
            let addr = client.local_addr().map_err(|e| {
                ProxyError::BadRequest(format!("cannot read the client listener's address: {e}"))
            })?;
            let mut first = Some(client.into_std().map_err(|e| {
                ProxyError::BadRequest(format!("cannot hand the client listener over: {e}"))
            })?);
            for index in 0..client_threads {
                let on = match first.take() {
                    Some(listener) => ListenOn::Bound(listener),
                    None => ListenOn::Port(addr),
                };
                let thread = ClientThread {
                    index,
                    on,
                    setup: serve_h1::Setup {
                        http1: http1.clone(),
                        max_header_bytes: config.max_header_bytes,
                        max_headers: config.max_headers,
                        header_read_timeout: config.header_read_timeout(),
                        body_read_timeout: stacks.limits.body_read_timeout,
                        stop: stopped.clone(),
                    },
                    stacks: stacks.clone(),
                    permits: permits.clone(),
                    stop: stopped.clone(),
                    alive: alive.clone(),
                    ready: ready.clone(),
                };
                std::thread::Builder::new()
                    .name(format!("regroup-client-{index}"))
                    .spawn(move || client_thread(thread))
                    .map_err(|e| {
                        ProxyError::BadRequest(format!("cannot start client thread {index}: {e}"))
                    })?;
            }
        }
        drop((alive, ready));
        if thread_count > 0 {
            client_threads_listen(thread_count, &mut listening, config.listen).await?;
        }
        on_ready();
        let client_loop = async {
            match &inline {
                Some((listener, clients)) => {
                    accept_loop(
                        "client",
                        listener,
                        permits.clone(),
                        PermitOrder::BeforeAccept,
                        |stream, peer, permit| {
                            serve_client(&http1, &graceful, clients, stream, peer, permit);
                        },
                    )
                    .await
                }
                // Ends when every client thread has (none could bind, or all stopped).
                None => while all_gone.recv().await.is_some() {},
            }
        };
        let admin_permits = Arc::new(Semaphore::new(config.admin_max_connections));
        let admin_loop = accept_loop(
            "admin",
            &admin_listener,
            admin_permits,
            PermitOrder::BeforeAccept,
            |stream, peer, permit| {
                let admin = admin.clone();
                let svc = hyper::service::service_fn(move |req: Request<Incoming>| {
                    let answer = admin(req);
                    async move { Ok::<_, std::convert::Infallible>(answer.await) }
                });
                let conn = graceful.watch(http1.serve_connection(TokioIo::new(stream), svc));
                tokio::spawn(async move {
                    if let Err(e) = conn.await {
                        tracing::debug!(%peer, error = %e, "admin connection ended with an error");
                    }
                    drop(permit);
                });
            },
        );
        let mut taken_over = None;
        tokio::select! {
            biased;
            _ = client_loop => {}
            _ = admin_loop => {}
            _ = shutdown => {}
            holder = lost => taken_over = holder,
        }
        tracing::info!("shutting down: finishing requests in flight");
        drop((inline, admin_listener));
        let _ = stop.send(true);
        let threads_done = async { while all_gone.recv().await.is_some() {} };
        if tokio::time::timeout(
            GRACE + Duration::from_secs(1),
            futures_util::future::join(graceful.shutdown(), threads_done),
        )
        .await
        .is_err()
        {
            tracing::warn!("requests still in flight after 10 s; closing");
        }
        Ok(taken_over)
    }
}

/// How long requests in flight have to finish at shutdown.
const GRACE: Duration = Duration::from_secs(10);

/// Serves one client connection on the current runtime, in a task that knows the client's
/// address ([`crate::route::client_addr`]).
fn serve_client<S: ClientService>(
    http1: &hyper::server::conn::http1::Builder,
    graceful: &GracefulShutdown,
    clients: &S,
    stream: TcpStream,
    peer: SocketAddr,
    permit: OwnedSemaphorePermit,
) {
    let _ = stream.set_nodelay(true);
    let svc = TowerToHyperService::new(clients.clone());
    let conn = http1.serve_connection(TokioIo::new(stream), svc);
    let conn = graceful.watch(conn);
    tokio::spawn(CLIENT.scope(peer, async move {
        if let Err(e) = conn.await {
            tracing::debug!(%peer, error = %e, "client connection ended with an error");
        }
        drop(permit);
    }));
}

/// Where a client thread listens: the listener bound at start, or a listener of its own on
/// the same port.
enum ListenOn {
    Bound(std::net::TcpListener),
    Port(SocketAddr),
}

/// What a client thread needs.
struct ClientThread {
    index: usize,
    on: ListenOn,
    /// Builds the thread's client-facing stack, on its runtime.
    stacks: ThreadStacks,
    /// How its connections are served.
    setup: serve_h1::Setup,
    /// Shared by every client thread: `max_connections` bounds them together.
    permits: Arc<Semaphore>,
    stop: tokio::sync::watch::Receiver<bool>,
    alive: tokio::sync::mpsc::Sender<()>,
    /// Told once whether the thread listens (or why it cannot), before it accepts.
    ready: tokio::sync::mpsc::UnboundedSender<Result<(), String>>,
}

/// A client thread: a single-threaded runtime serving the connections its listener
/// accepts, with read balancers and upstream connections of its own. A read's upstream
/// connection is driven in the client connection's own task, so forwarding one wakes no
/// other task or thread (on a multi-threaded runtime, most of a read's cost was the
/// wake-ups between the two tasks).
/// Updates are handed to the groups' runtime (see `route::dispatch`). When told to stop,
/// it stops accepting and gives its connections [`GRACE`] to finish.
fn client_thread(thread: ClientThread) {
    let ClientThread {
        index,
        on,
        stacks,
        setup,
        permits,
        mut stop,
        alive,
        ready,
    } = thread;
    let runtime = match tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
    {
        Ok(runtime) => runtime,
        Err(e) => {
            tracing::error!(thread = index, error = %e, "cannot start a client thread's runtime");
            let _ = ready.send(Err(format!(
                "client thread {index}: cannot start its runtime: {e}"
            )));
            return;
        }
    };
    runtime.block_on(async move {
        let listener = match on {
            ListenOn::Bound(listener) => TcpListener::from_std(listener),
            ListenOn::Port(addr) => bind_client(addr),
        };
        let listener = match listener {
            Ok(listener) => listener,
            Err(e) => {
                tracing::error!(thread = index, error = %e,
                    "a client thread cannot listen on the client port; serving without it");
                let _ = ready.send(Err(format!("client thread {index}: cannot listen: {e}")));
                return;
            }
        };
        let _ = ready.send(Ok(()));
        let clients = stacks.build();
        let graceful = GracefulShutdown::new();
        // Each connection holds a sender: all are gone once the last connection ended.
        let (open, mut all_closed) = tokio::sync::mpsc::channel::<()>(1);
        tokio::select! {
            biased;
            _ = accept_loop("client", &listener, permits, PermitOrder::AfterAccept, |stream, peer, permit| {
                let _ = stream.set_nodelay(true);
                let served = serve_h1::serve(stream, clients.clone(), setup.clone(), graceful.watcher());
                let open = open.clone();
                tokio::spawn(CLIENT.scope(peer, async move {
                    served.await;
                    drop((permit, open));
                }));
            }) => {}
            _ = stop.wait_for(|stop| *stop) => {}
        }
        drop((listener, open));
        let finished = async {
            graceful.shutdown().await;
            while all_closed.recv().await.is_some() {}
        };
        if tokio::time::timeout(GRACE, finished).await.is_err() {
            tracing::warn!(
                thread = index,
                "client requests still in flight after 10 s; closing"
            );
        }
        drop(alive);
    });
}

/// Waits until each of the `threads` client threads said whether it listens on `addr`:
/// those that cannot were logged and the others serve without them; an error naming why
/// when none can.
async fn client_threads_listen(
    threads: usize,
    listening: &mut tokio::sync::mpsc::UnboundedReceiver<Result<(), String>>,
    addr: SocketAddr,
) -> Result<(), ProxyError> {
    let mut failures = Vec::new();
    let mut up = 0;
    for _ in 0..threads {
        match listening.recv().await {
            Some(Ok(())) => up += 1,
            Some(Err(why)) => failures.push(why),
            // Every sender is gone: the rest ended before saying (a panic is logged).
            None => {
                failures.push("a client thread ended before it listened".to_owned());
                break;
            }
        }
    }
    if up == 0 {
        return Err(ProxyError::BadRequest(format!(
            "cannot serve clients on {addr}: no client thread could listen ({})",
            failures.join("; ")
        )));
    }
    Ok(())
}

/// Binds a client listener on `addr` with `SO_REUSEPORT`, so that every client thread can
/// listen on the same port (another process of the same user could too).
fn bind_client(addr: SocketAddr) -> std::io::Result<TcpListener> {
    let socket = if addr.is_ipv4() {
        TcpSocket::new_v4()?
    } else {
        TcpSocket::new_v6()?
    };
    socket.set_reuseaddr(true)?;
    #[cfg(unix)]
    socket.set_reuseport(true)?;
    socket.bind(addr)?;
    socket.listen(LISTEN_BACKLOG)
}

/// The client port's listen backlog (as tokio's `TcpListener::bind` has it).
const LISTEN_BACKLOG: u32 = 1024;

/// When an accept loop takes its connection permit.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum PermitOrder {
    /// Before accepting: beyond the cap, new connections wait in the listen backlog. For a
    /// listener with a semaphore of its own.
    BeforeAccept,
    /// After accepting: the connection waits, accepted, for a permit. For listeners sharing
    /// one semaphore (the client threads'): a loop holding a permit while waiting in accept
    /// would keep it from a connection waiting in another thread's backlog.
    AfterAccept,
}

/// hyper's smallest read buffer (`max_buf_size` may not be set below it).
const MIN_READ_BUFFER: usize = 8 * 1024;
/// First pause after a failed accept (e.g. out of file descriptors); doubled on each
/// failure in a row up to [`ACCEPT_BACKOFF_MAX`], reset by a successful accept.
pub const ACCEPT_BACKOFF_MIN: Duration = Duration::from_millis(5);
/// Longest pause between accepts after failures.
pub const ACCEPT_BACKOFF_MAX: Duration = Duration::from_secs(1);

/// Accepts connections on `listener` while `permits` has one, taken as `order` says (beyond
/// the cap, new ones wait in the kernel's listen backlog, or accepted), handing each to
/// `serve` with its permit; a failed accept is logged and followed by a pause that grows
/// while failures repeat, so running out of descriptors does not spin a core. Runs until
/// dropped.
async fn accept_loop(
    what: &'static str,
    listener: &TcpListener,
    permits: Arc<Semaphore>,
    order: PermitOrder,
    mut serve: impl FnMut(TcpStream, SocketAddr, OwnedSemaphorePermit),
) {
    let mut backoff = ACCEPT_BACKOFF_MIN;
    loop {
        let mut permit = None;
        if order == PermitOrder::BeforeAccept {
            let Ok(p) = permits.clone().acquire_owned().await else {
                return;
            };
            permit = Some(p);
        }
        match listener.accept().await {
            Ok((stream, peer)) => {
                backoff = ACCEPT_BACKOFF_MIN;
                let permit = match permit {
                    Some(p) => p,
                    None => match permits.clone().acquire_owned().await {
                        Ok(p) => p,
                        Err(_) => return,
                    },
                };
                serve(stream, peer, permit);
            }
            Err(e) => {
                tracing::warn!(listener = what, error = %e, pause_ms = backoff.as_millis() as u64,
                    "accept failed; pausing before the next accept");
                tokio::time::sleep(backoff).await;
                backoff = (backoff * 2).min(ACCEPT_BACKOFF_MAX);
            }
        }
    }
}

/// The admin token: `REGROUP_ADMIN_TOKEN` when set, else the config's. An empty variable is
/// refused (as an empty `admin_token` is by [`Config::validate`]): it would open the verbs.
pub fn admin_token(config: &Config) -> Result<Option<String>, ProxyError> {
    match std::env::var(ADMIN_TOKEN_ENV) {
        Ok(t) if t.trim().is_empty() => Err(ProxyError::BadRequest(format!(
            "{ADMIN_TOKEN_ENV} is set but empty: unset it or give it a token"
        ))),
        Ok(t) => Ok(Some(t)),
        Err(_) => Ok(config.admin_token.clone()),
    }
}

/// A URL with its password hidden, for messages (every server's, in a `nats://` URL
/// naming several).
pub fn redact(url: &str) -> String {
    if url.starts_with("nats://") {
        return regroup_replay::NatsJournal::redact(url);
    }
    match (url.find("://"), url.find('@')) {
        (Some(s), Some(at)) if at > s => {
            let userinfo = &url[s + 3..at];
            match userinfo.find(':') {
                Some(c) => format!("{}{}:***{}", &url[..s + 3], &userinfo[..c], &url[at..]),
                None => url.to_owned(),
            }
        }
        _ => url.to_owned(),
    }
}

/// Opens the journal at `url`: `nats://` on NATS JetStream, `sqlite:` and `postgres://` on
/// SQL (with `sync`), each behind an in-memory tail for replayers.
pub async fn open_journal(
    url: &str,
    sync: regroup_replay::JournalSync,
) -> Result<Arc<dyn Journal>, ProxyError> {
    let failed =
        |e: regroup_replay::JournalError| ProxyError::Journal(format!("{}: {e}", redact(url)));
    if url.starts_with("nats://") {
        let journal = NatsJournal::connect(url).await.map_err(failed)?;
        return Ok(Arc::new(CachedJournal::new(journal)));
    }
    let journal = SqlJournal::connect_with(url, sync).await.map_err(failed)?;
    Ok(Arc::new(CachedJournal::new(journal)))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn reports(
        got: Vec<Result<(), String>>,
    ) -> tokio::sync::mpsc::UnboundedReceiver<Result<(), String>> {
        let (tx, rx) = tokio::sync::mpsc::unbounded_channel();
        for r in got {
            let _ = tx.send(r);
        }
        rx
    }

    #[tokio::test]
    async fn the_proxy_serves_when_one_client_thread_listens_and_names_why_when_none_does() {
        let addr: SocketAddr = ([127, 0, 0, 1], 8080).into();
        let mut one_up = reports(vec![
            Err("client thread 0: cannot listen: x".into()),
            Ok(()),
        ]);
        assert!(client_threads_listen(2, &mut one_up, addr).await.is_ok());
        let mut none = reports(vec![
            Err("client thread 0: cannot start its runtime: Too many open files".into()),
            Err("client thread 1: cannot listen: Too many open files".into()),
        ]);
        let err = client_threads_listen(2, &mut none, addr)
            .await
            .expect_err("no thread listens")
            .to_string();
        assert!(
            err.contains("127.0.0.1:8080")
                && err.contains("client thread 0: cannot start its runtime")
                && err.contains("client thread 1: cannot listen"),
            "{err}"
        );
        // A thread that ended without a word counts as not listening.
        let mut silent = reports(vec![]);
        let err = client_threads_listen(1, &mut silent, addr)
            .await
            .expect_err("the only thread ended")
            .to_string();
        assert!(err.contains("ended before it listened"), "{err}");
    }
}
