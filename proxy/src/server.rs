//! Starting and serving the proxy: opens the journal and groups, starts supervision,
//! replication and read balancing, builds the client-facing service stack and serves it
//! and the admin API with hyper.

use std::future::Future;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use http::{Request, Response};
use hyper::body::Incoming;
use hyper_util::rt::{TokioExecutor, TokioIo};
use hyper_util::server::conn::auto;
use hyper_util::server::graceful::GracefulShutdown;
use hyper_util::service::TowerToHyperService;
use regroup_replay::{CachedJournal, Journal, SqlJournal};
use tokio::net::TcpListener;
use tower::{Service, ServiceBuilder};

use crate::admin::Admin;
use crate::config::Config;
use crate::error::ProxyError;
use crate::forward::{BoxError, ProxyBody, upstream_client};
use crate::group::Group;
use crate::ownership::{self, Ownership};
use crate::read::Reads;
use crate::route::{ClientAddr, RegroupLayer, Routed};
use crate::{failover, replicate, supervise, update};

/// The environment variable that overrides `admin_token`.
pub const ADMIN_TOKEN_ENV: &str = "REGROUP_ADMIN_TOKEN";

/// A running regroup: its groups with their background tasks (supervision, replayers,
/// read membership). Dropping it stops them.
#[derive(Debug)]
pub struct Proxy {
    routes: Vec<Routed>,
    admin: Admin,
    ownership: Ownership,
}

impl Proxy {
    /// Connects the configured journal and starts every group.
    pub async fn start(config: &Config) -> Result<Proxy, ProxyError> {
        let journal = SqlJournal::connect_with(&config.journal, config.journal_sync)
            .await
            .map_err(|e| ProxyError::Journal(format!("{}: {e}", redact(&config.journal))))?;
        Proxy::with_journal(config, Arc::new(CachedJournal::new(journal))).await
    }

    /// Starts every group on `journal`.
    pub async fn with_journal(
        config: &Config,
        journal: Arc<dyn Journal>,
    ) -> Result<Proxy, ProxyError> {
        let ownership = ownership::claim(config, journal.clone()).await?;
        let client = upstream_client();
        let mut routes = Vec::new();
        let mut groups = Vec::new();
        for gc in &config.groups {
            let group = Group::open(gc.clone(), journal.clone(), client.clone()).await?;
            supervise::check_all(&group).await;
            supervise::start(&group);
            replicate::start(&group);
            failover::start(&group);
            let in_doubt = *group.in_doubt.borrow();
            if let Some(seq) = in_doubt {
                match journal.record(group.name(), seq).await {
                    Ok(Some(record)) => update::spawn_settle(group.clone(), record),
                    _ => tracing::warn!(group = %group.name(), seq, "in-doubt record not found"),
                }
            }
            let reads = Arc::new(Reads::start(&group));
            tracing::info!(group = %group.name(), primary = %group.primary().name(),
                epoch = group.epoch(), head = group.head(), "group started");
            groups.push(group.clone());
            routes.push(Routed { group, reads });
        }
        let token = std::env::var(ADMIN_TOKEN_ENV)
            .ok()
            .filter(|t| !t.is_empty())
            .or_else(|| config.admin_token.clone());
        Ok(Proxy {
            routes,
            admin: Admin::new(groups, token),
            ownership,
        })
    }

    /// This proxy's claim on its journal: [`Ownership::lost`] resolves when another proxy
    /// took it over; [`Ownership::release`] gives it up on a clean shutdown.
    pub fn ownership(&self) -> &Ownership {
        &self.ownership
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

    /// The admin API.
    pub fn admin(&self) -> &Admin {
        &self.admin
    }

    /// The client-facing stack, outermost layer first.
    pub fn service(
        &self,
    ) -> impl Service<
        Request<Incoming>,
        Response = Response<ProxyBody>,
        Error = BoxError,
        Future: Send + 'static,
    > + Clone
    + Send
    + 'static {
        ServiceBuilder::new()
            // Routes each request to its group: updates to the journaled path, reads to
            // the balancer.
            .layer(self.layer())
            // Requests no group serves get a JSON 404.
            .service_fn(|req: Request<Incoming>| async move {
                Ok::<_, BoxError>(ProxyError::NoGroup(req.uri().path().to_owned()).into_response())
            })
    }
}

impl Drop for Proxy {
    fn drop(&mut self) {
        for r in &self.routes {
            r.group.stop.send_replace(true);
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
pub async fn serve(
    config: Config,
    shutdown: impl Future<Output = ()> + Send,
    on_bound: impl FnOnce(Bound),
) -> Result<(), ProxyError> {
    let listener = TcpListener::bind(config.listen)
        .await
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
    let proxy = Proxy::start(&config).await?;
    let bound = Bound {
        listen: listener
            .local_addr()
            .map_err(|e| ProxyError::BadRequest(e.to_string()))?,
        admin: admin_listener
            .local_addr()
            .map_err(|e| ProxyError::BadRequest(e.to_string()))?,
    };
    on_bound(bound);
    let service = proxy.service();
    let admin = proxy.admin().clone();
    let graceful = GracefulShutdown::new();
    // Clients speak HTTP/1.1 (the version sniffing of an HTTP/1 + h2c server cost ~5% of
    // read throughput); the admin API accepts both.
    let mut http1 = hyper::server::conn::http1::Builder::new();
    http1.timer(hyper_util::rt::TokioTimer::new());
    let builder = auto::Builder::new(TokioExecutor::new());
    tokio::pin!(shutdown);
    let mut taken_over = None;
    loop {
        tokio::select! {
            accepted = listener.accept() => {
                let Ok((stream, peer)) = accepted else { continue };
                let _ = stream.set_nodelay(true);
                let svc = ServiceBuilder::new()
                    .map_request(move |mut req: Request<Incoming>| {
                        req.extensions_mut().insert(ClientAddr(peer));
                        req
                    })
                    .service(service.clone());
                let conn = http1.serve_connection(TokioIo::new(stream), TowerToHyperService::new(svc));
                let conn = graceful.watch(conn);
                tokio::spawn(async move {
                    if let Err(e) = conn.await {
                        tracing::debug!(%peer, error = %e, "client connection ended with an error");
                    }
                });
            }
            accepted = admin_listener.accept() => {
                let Ok((stream, _)) = accepted else { continue };
                let admin = admin.clone();
                let svc = hyper::service::service_fn(move |req: Request<Incoming>| {
                    let admin = admin.clone();
                    async move { Ok::<_, std::convert::Infallible>(admin.handle(req).await) }
                });
                let conn = builder.serve_connection(TokioIo::new(stream), svc);
                let conn = graceful.watch(conn.into_owned());
                tokio::spawn(async move { let _ = conn.await; });
            }
            _ = &mut shutdown => break,
            holder = proxy.ownership().lost() => {
                taken_over = Some(holder);
                break;
            }
        }
    }
    tracing::info!("shutting down: finishing requests in flight");
    drop(listener);
    drop(admin_listener);
    if tokio::time::timeout(Duration::from_secs(10), graceful.shutdown())
        .await
        .is_err()
    {
        tracing::warn!("requests still in flight after 10 s; closing");
    }
    if let Some(holder) = taken_over {
        return Err(ProxyError::JournalOwned(format!(
            "journal {} was taken over by {holder}: this proxy stopped serving",
            redact(&config.journal)
        )));
    }
    proxy.ownership().release().await;
    drop(proxy);
    Ok(())
}

/// A URL with its password hidden, for messages.
pub fn redact(url: &str) -> String {
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
