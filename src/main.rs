//! The `regroup` command: `serve`, `check`, `status`, `resolve` and `demo`.

use std::path::PathBuf;
use std::process::ExitCode;

use anyhow::{Context, bail};
use clap::{Parser, Subcommand, ValueEnum};
use regroup::client::HttpClient;
use regroup_proxy::admin::StatusDoc;
use regroup_proxy::{Config, server};

mod demo;
mod rebuild_cli;
mod sql_cli;

/// mimalloc instead of the system's malloc: allocation is a tenth of the proxy's
/// user-space time per request (hyper's buffers, headers, boxed futures), and glibc's
/// malloc spends part of it consolidating its free lists (BENCHMARKS.md).
#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;

#[derive(Parser)]
#[command(
    name = "regroup",
    version,
    about = "Transaction-level replication for a redundancy group of application instances"
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Run the proxy.
    Serve {
        /// The TOML config file.
        #[arg(long, short)]
        config: PathBuf,
    },
    /// Validate a config file (and that its journal is reachable) without serving.
    Check {
        /// The TOML config file.
        #[arg(long, short)]
        config: PathBuf,
    },
    /// Print every group's status as a table.
    Status {
        /// The admin URL, e.g. http://127.0.0.1:8081.
        #[arg(long, default_value = "http://127.0.0.1:8081")]
        admin: String,
        /// Print the raw JSON instead.
        #[arg(long)]
        json: bool,
        /// Admin bearer token, needed when the config sets `admin_status_requires_token`
        /// (default: $REGROUP_ADMIN_TOKEN).
        #[arg(long, env = "REGROUP_ADMIN_TOKEN", hide_env_values = true)]
        token: Option<String>,
    },
    /// Settle an in-doubt update: it was `executed` by the primary, or `skipped`.
    Resolve {
        /// The admin URL.
        #[arg(long, default_value = "http://127.0.0.1:8081")]
        admin: String,
        /// The group.
        #[arg(long)]
        group: String,
        /// The in-doubt record.
        #[arg(long)]
        seq: u64,
        /// What happened to it.
        outcome: Outcome,
        /// Admin bearer token (default: $REGROUP_ADMIN_TOKEN).
        #[arg(long, env = "REGROUP_ADMIN_TOKEN", hide_env_values = true)]
        token: Option<String>,
    },
    /// Move the primary role to a partition (planned switchover: no request fails).
    Promote(RoleArgs),
    /// Take a partition out of client traffic (moving the primary role away first).
    Drain(RoleArgs),
    /// Return a drained partition to service.
    Undrain(RoleArgs),
    /// Lift a diverged partition's quarantine once it has been rebuilt.
    Rejoin {
        #[command(flatten)]
        role: RoleArgs,
        /// The seq the rebuilt copy includes (default: its checkpoint, or what its
        /// app-side layer says).
        #[arg(long)]
        applied: Option<u64>,
    },
    /// Add a partition to a group at run time (stored in the journal: a restart keeps it).
    /// A new, empty copy replays the group's journal and takes reads once caught up.
    Add {
        #[command(flatten)]
        role: RoleArgs,
        /// Its base URL, e.g. http://127.0.0.1:9004.
        #[arg(long)]
        url: String,
        /// The computing system it runs on (its fault domain).
        #[arg(long)]
        host: Option<String>,
        /// Failover preference among equally caught-up partitions (higher first).
        #[arg(long, default_value_t = 0)]
        priority: i32,
    },
    /// Remove a partition from its group (a primary hands its role over first; no request
    /// fails).
    Remove(RoleArgs),
    /// Move a partition to another group: it leaves this one and joins the other
    /// quarantined, to be rebuilt with the other group's data.
    Move {
        #[command(flatten)]
        role: RoleArgs,
        /// The group it joins.
        #[arg(long)]
        to: String,
    },
    /// Rebuild a partition from a snapshot of another, showing progress until it is done.
    Rebuild(rebuild_cli::RebuildArgs),
    /// Run a redundancy group of three bank partitions behind the proxy, on SQLite files
    /// in a fresh directory.
    Demo(demo::DemoArgs),
    /// SQL mode: `classify` statements.
    Sql(sql_cli::SqlArgs),
}

#[derive(clap::Args)]
struct RoleArgs {
    /// The admin URL.
    #[arg(long, default_value = "http://127.0.0.1:8081")]
    admin: String,
    /// The group.
    #[arg(long)]
    group: String,
    /// The partition.
    #[arg(long)]
    partition: String,
    /// Admin bearer token (default: $REGROUP_ADMIN_TOKEN).
    #[arg(long, env = "REGROUP_ADMIN_TOKEN", hide_env_values = true)]
    token: Option<String>,
}

#[derive(Clone, Copy, ValueEnum)]
enum Outcome {
    Executed,
    Skipped,
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env().unwrap_or_else(|_| {
                tracing_subscriber::EnvFilter::new("info,sea_orm_migration=warn")
            }),
        )
        .with_writer(std::io::stderr)
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
        .init();
    let outcome = match cli.command {
        // `serve` reads its config first: it says how many threads the main runtime gets.
        Command::Serve { config } => match Config::load(&config) {
            Ok(config) => runtime(Some(config.main_threads())).map(|rt| rt.block_on(serve(config))),
            Err(e) => Ok(Err(e.into())),
        },
        command => runtime(None).map(|rt| rt.block_on(run(command))),
    };
    match outcome {
        Ok(Ok(())) => ExitCode::SUCCESS,
        Ok(Err(e)) => {
            eprintln!("error: {e:#}");
            ExitCode::FAILURE
        }
        Err(e) => {
            eprintln!("error: cannot start the runtime: {e}");
            ExitCode::FAILURE
        }
    }
}

/// The main runtime: `threads` workers, or one per core.
fn runtime(threads: Option<usize>) -> std::io::Result<tokio::runtime::Runtime> {
    let mut builder = tokio::runtime::Builder::new_multi_thread();
    if let Some(threads) = threads {
        builder.worker_threads(threads);
    }
    builder.enable_all().build()
}

/// `regroup serve` on its loaded config.
async fn serve(config: Config) -> anyhow::Result<()> {
    // Before anything else, so that no signal finds the default handler (see
    // `shutdown_signal`).
    let shutdown = shutdown_signal();
    server::serve(config, shutdown, |b| {
        println!(
            "regroup listening on http://{} (admin http://{})",
            b.listen, b.admin
        );
    })
    .await?;
    Ok(())
}

/// Runs every command but `serve`.
async fn run(command: Command) -> anyhow::Result<()> {
    match command {
        Command::Sql(args) => sql_cli::run(args).await,
        Command::Serve { config } => serve(Config::load(&config)?).await,
        Command::Check { config: path } => {
            let config = Config::load(&path)?;
            server::admin_token(&config)?;
            let probed = if config.journal.starts_with("nats://") {
                regroup_replay::NatsJournal::probe(&config.journal).await
            } else {
                regroup_replay::SqlJournal::probe(&config.journal).await
            };
            probed.with_context(|| {
                format!(
                    "{}: journal {}",
                    path.display(),
                    server::redact(&config.journal)
                )
            })?;
            let partitions: usize = config.groups.iter().map(|g| g.partitions.len()).sum();
            println!(
                "{}: ok ({} group(s), {partitions} partition(s), journal {})",
                path.display(),
                config.groups.len(),
                server::redact(&config.journal)
            );
            Ok(())
        }
        Command::Status { admin, json, token } => {
            let url = format!("{}/status", admin.trim_end_matches('/'));
            let answer = HttpClient::new()
                .send("GET", &url, None, token.as_deref())
                .await?;
            if answer.status != 200 {
                bail!(
                    "{url} answered {}: {}",
                    answer.status,
                    String::from_utf8_lossy(&answer.body)
                );
            }
            if json {
                println!("{}", String::from_utf8_lossy(&answer.body));
            } else {
                print!("{}", status_table(&answer.json()?));
            }
            Ok(())
        }
        Command::Resolve {
            admin,
            group,
            seq,
            outcome,
            token,
        } => {
            let url = format!("{}/groups/{group}/resolve", admin.trim_end_matches('/'));
            let outcome = match outcome {
                Outcome::Executed => "executed",
                Outcome::Skipped => "skipped",
            };
            let body = serde_json::json!({"seq": seq, "outcome": outcome});
            let answer = HttpClient::new()
                .send("POST", &url, Some(&body), token.as_deref())
                .await?;
            if answer.status != 200 {
                let v: serde_json::Value = answer.json().unwrap_or_default();
                bail!(
                    "resolve refused ({}): {}",
                    answer.status,
                    v["message"].as_str().unwrap_or("no message")
                );
            }
            println!("group {group}: record {seq} resolved as {outcome}");
            Ok(())
        }
        Command::Promote(a) => role_verb("promote", a).await,
        Command::Drain(a) => role_verb("drain", a).await,
        Command::Undrain(a) => role_verb("undrain", a).await,
        Command::Rejoin { role, applied } => {
            let mut body = serde_json::json!({"partition": role.partition});
            if let Some(n) = applied {
                body["applied"] = n.into();
            }
            admin_verb("rejoin", &role, body).await
        }
        Command::Add {
            role,
            url,
            host,
            priority,
        } => {
            let body = serde_json::json!({
                "partition": role.partition, "url": url, "host": host, "priority": priority,
            });
            admin_verb("add", &role, body).await
        }
        Command::Remove(a) => role_verb("remove", a).await,
        Command::Move { role, to } => {
            let body = serde_json::json!({"partition": role.partition, "to": to});
            admin_verb("move", &role, body).await
        }
        Command::Rebuild(args) => rebuild_cli::run(args).await,
        Command::Demo(args) => demo::run(args).await,
    }
}

async fn role_verb(verb: &str, a: RoleArgs) -> anyhow::Result<()> {
    let body = serde_json::json!({"partition": a.partition});
    admin_verb(verb, &a, body).await
}

/// Sends an admin verb about one partition and prints the group(s) it answers with.
async fn admin_verb(verb: &str, a: &RoleArgs, body: serde_json::Value) -> anyhow::Result<()> {
    let url = format!(
        "{}/groups/{}/{verb}",
        a.admin.trim_end_matches('/'),
        a.group
    );
    let answer = HttpClient::new()
        .send("POST", &url, Some(&body), a.token.as_deref())
        .await?;
    if answer.status != 200 {
        let v: serde_json::Value = answer.json().unwrap_or_default();
        bail!(
            "{verb} refused ({}): {}",
            answer.status,
            v["message"].as_str().unwrap_or("no message")
        );
    }
    // One group, or (move) both groups.
    let doc = match answer.json::<StatusDoc>() {
        Ok(doc) => doc,
        Err(_) => StatusDoc {
            groups: vec![answer.json()?],
            hosts: Vec::new(),
            proxy: None,
        },
    };
    print!("{}", status_table(&doc));
    Ok(())
}

/// Listens for Ctrl-C and SIGTERM from this call on, and returns a future that completes on
/// either.
///
/// The handlers are installed here, not when the future is first polled: `serve` polls it
/// only once it is serving, after it claimed the journal and announced its ports, and a
/// SIGTERM that arrived in between used to find the default handler and kill the process
/// with the journal lease still held (the next proxy then waited for a 30 s lease). Installed
/// before the proxy starts, a signal sent at any point of the start is kept until the server
/// looks at it, and ends in the same clean stop (lease released) as one sent later.
pub(crate) fn shutdown_signal() -> impl std::future::Future<Output = ()> + Send + 'static {
    #[cfg(unix)]
    {
        use tokio::signal::unix::{Signal, SignalKind, signal};
        let listen = |kind: SignalKind, name: &'static str| match signal(kind) {
            Ok(s) => Some(s),
            Err(e) => {
                tracing::error!(signal = name, error = %e,
                    "cannot handle the signal: it will stop this process without a clean \
                     shutdown (the journal lease is not released)");
                None
            }
        };
        let interrupt = listen(SignalKind::interrupt(), "SIGINT");
        let terminate = listen(SignalKind::terminate(), "SIGTERM");
        async fn received(signal: Option<Signal>) {
            match signal {
                Some(mut s) => {
                    s.recv().await;
                }
                None => std::future::pending::<()>().await,
            }
        }
        async move {
            tokio::select! {
                _ = received(interrupt) => {}
                _ = received(terminate) => {}
            }
        }
    }
    #[cfg(not(unix))]
    {
        async {
            let _ = tokio::signal::ctrl_c().await;
        }
    }
}

fn status_table(doc: &StatusDoc) -> String {
    let mut out = String::new();
    for g in &doc.groups {
        out.push_str(&format!(
            "group {}  primary {}  epoch {}  head {}  sealed {}",
            g.name, g.primary, g.epoch, g.head, g.sealed
        ));
        if !g.in_doubt.is_empty() {
            out.push_str(&format!("  IN DOUBT {:?}", g.in_doubt));
        }
        out.push('\n');
        out.push_str(&format!(
            "  {:<12} {:<28} {:<10} {:<12} {:>8}  {}\n",
            "PARTITION", "URL", "HOST", "STATUS", "APPLIED", "SINCE / REASON"
        ));
        for p in &g.partitions {
            let role = if p.name == g.primary { "*" } else { " " };
            out.push_str(&format!(
                "{role} {:<12} {:<28} {:<10} {:<12} {:>8}  {} {}\n",
                p.name,
                p.url,
                p.host.as_deref().unwrap_or("-"),
                p.status,
                p.applied,
                p.since,
                p.reason
            ));
            if let Some(r) = p.rebuild.as_ref().filter(|r| r.phase.running()) {
                out.push_str(&format!(
                    "    rebuild from {}: {:?}, {} bytes\n",
                    r.source, r.phase, r.bytes
                ));
            }
        }
        for d in &g.config_drift {
            out.push_str(&format!("  config differs from the journal: {d}\n"));
        }
    }
    if let Some(p) = &doc.proxy {
        out.push_str(&format!(
            "proxy: this one ({}) is a {}; leader: {}\n",
            p.this, p.role, p.leader
        ));
    }
    for h in &doc.hosts {
        out.push_str(&format!(
            "host {}  {}  ({} of {} answering: {})\n",
            h.name,
            h.status,
            h.answering,
            h.partitions.len(),
            h.partitions.join(", ")
        ));
    }
    out
}
