//! regroup as a Tower layer inside a server of your own: requests under a group's
//! `path_prefix` go to the redundancy group (journaled, replayed); everything else reaches
//! your service.
//!
//! ```text
//! # three bank partitions on 9001-9003 (see examples/regroup.toml), then:
//! cargo run --example embedded -- --config examples/embedded.toml --listen 127.0.0.1:8090
//! curl -s -XPOST localhost:8090/bank/accounts -H 'content-type: application/json' \
//!      -d '{"name":"alice","balance":100}'            # replicated to every partition
//! curl -s localhost:8090/hello                          # served locally
//! ```

use std::path::PathBuf;

use axum::Router;
use axum::routing::get;
use clap::Parser;
use hyper_util::rt::{TokioExecutor, TokioIo};
use hyper_util::server::conn::auto;
use hyper_util::service::TowerToHyperService;
use regroup_proxy::{Config, Proxy};
use tower::ServiceBuilder;

#[derive(Parser)]
struct Args {
    /// regroup config; its groups should set `path_prefix` (and usually `strip_prefix`).
    #[arg(long)]
    config: PathBuf,
    /// Address to serve on.
    #[arg(long, default_value = "127.0.0.1:8090")]
    listen: String,
}

/// Your own routes.
fn local_routes() -> Router {
    Router::new().route(
        "/hello",
        get(|| async { "hello from the embedding server\n" }),
    )
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    tracing_subscriber::fmt()
        .with_writer(std::io::stderr)
        .init();
    let args = Args::parse();
    let config = Config::load(&args.config)?;
    let proxy = Proxy::start(&config).await?;
    // regroup's layer in front of the local routes.
    let service = ServiceBuilder::new()
        .layer(proxy.layer())
        .service(local_routes());
    let listener = tokio::net::TcpListener::bind(&args.listen).await?;
    println!("embedded server on http://{}", listener.local_addr()?);
    loop {
        let (stream, _) = listener.accept().await?;
        let service = TowerToHyperService::new(service.clone());
        tokio::spawn(async move {
            let _ = auto::Builder::new(TokioExecutor::new())
                .serve_connection(TokioIo::new(stream), service)
                .await;
        });
    }
}
