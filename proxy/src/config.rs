//! Configuration: one TOML file, every key documented, unknown keys rejected.
//!
//! Defaults are named constants beside the keys they fill. [`Config::load`] parses and
//! [`Config::validate`]s; errors name the file and the line and column or key at fault.

use std::collections::HashSet;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use http::{Method, Uri};
use regroup_replay::Compare;
use regroup_replay::signature::{SECRET_ENV, Secret};
use serde::Deserialize;

use crate::classify::Classifier;
pub use crate::classify::RouteRule;

/// Default client-facing address.
pub const DEFAULT_LISTEN: &str = "127.0.0.1:8080";
/// Default admin address (status, admin verbs).
pub const DEFAULT_ADMIN_LISTEN: &str = "127.0.0.1:8081";
/// Default journal: a SQLite file in the working directory.
pub const DEFAULT_JOURNAL: &str = "sqlite://regroup-journal.db";
/// Default health-check path.
pub const DEFAULT_HEALTH_PATH: &str = "/health";
/// Default request body limit for updates (1 MiB).
pub const DEFAULT_MAX_BODY_BYTES: usize = 1024 * 1024;
/// Default heartbeat interval.
pub const DEFAULT_HEARTBEAT_INTERVAL_MS: u64 = 200;
/// Default heartbeat time-out.
pub const DEFAULT_HEARTBEAT_TIMEOUT_MS: u64 = 200;
/// Default number of consecutive missed heartbeats before a partition is unavailable.
pub const DEFAULT_HEARTBEAT_RETRIES: u32 = 3;
/// Default bound on how long an update waits for its group to be able to take it
/// (an in-doubt record being resolved, later a failover).
pub const DEFAULT_FAILOVER_WAIT_MS: u64 = 5000;
/// Default time-out for the primary's answer to an update.
pub const DEFAULT_UPDATE_TIMEOUT_MS: u64 = 30_000;
/// Default `pipeline_window`: updates on their way to the primary at once. Four, now that
/// replayers keep records in flight too (a primary fed without gaps outran a replica that
/// replayed one record per round trip: a replica behind under full load never caught up).
pub const DEFAULT_PIPELINE_WINDOW: usize = 4;
/// Largest `pipeline_window` and `replay_window`.
pub const MAX_PIPELINE_WINDOW: usize = 64;
/// Default `replay_window`: records on their way to one replica at once while it replays.
pub const DEFAULT_REPLAY_WINDOW: usize = 8;
/// Default bound on how long a read waits for an eligible partition.
pub const DEFAULT_READ_WAIT_MS: u64 = 2000;
/// Default number of records a replica may lag and still serve reads.
pub const DEFAULT_MAX_READ_LAG: u64 = 16;
/// Default time-out for a partition's answer to a read (until its headers arrive).
pub const DEFAULT_READ_TIMEOUT_MS: u64 = 30_000;
/// Default limit on a request's header block, request line included (64 KiB); larger gets
/// 431.
pub const DEFAULT_MAX_HEADER_BYTES: usize = 64 * 1024;
/// The smallest `max_header_bytes` accepted (hyper's smallest read buffer).
pub const MIN_MAX_HEADER_BYTES: usize = 8 * 1024;
/// Default limit on the number of headers of a request; more gets 431.
pub const DEFAULT_MAX_HEADERS: usize = 100;
/// Default time a client has to send a request's header block before the connection is
/// closed.
pub const DEFAULT_HEADER_READ_TIMEOUT_MS: u64 = 10_000;
/// Default time a client has to send a whole request body; later gets 408.
pub const DEFAULT_BODY_READ_TIMEOUT_MS: u64 = 30_000;
/// Default cap on concurrent client connections; beyond it new connections wait in the
/// listen backlog until one closes.
pub const DEFAULT_MAX_CONNECTIONS: usize = 1024;
/// Most `client_threads`.
pub const MAX_CLIENT_THREADS: usize = 256;
/// Most `main_threads`.
pub const MAX_MAIN_THREADS: usize = 256;
/// Cores per default main runtime thread: `main_threads` defaults to one per this many
/// cores, at least one.
pub const CORES_PER_MAIN_THREAD: usize = 4;
/// Default cap on concurrent admin connections.
pub const DEFAULT_ADMIN_MAX_CONNECTIONS: usize = 64;
/// Default limit on an admin request body (64 KiB); larger gets 413.
pub const DEFAULT_ADMIN_MAX_BODY_BYTES: usize = 64 * 1024;
/// Default lifetime of the journal's ownership lease, in ms (renewed every fifth of it).
pub const DEFAULT_JOURNAL_LEASE_MS: u64 = 10_000;
/// Shortest journal lease accepted, in ms.
pub const MIN_JOURNAL_LEASE_MS: u64 = 500;

/// The whole configuration file.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Config {
    /// Client-facing proxy address.
    #[serde(default = "default_listen")]
    pub listen: SocketAddr,
    /// Admin address: `GET /status`, admin verbs.
    #[serde(default = "default_admin_listen")]
    pub admin_listen: SocketAddr,
    /// Journal URL: `sqlite://path` (created if missing), `postgres://…`, or
    /// `nats://host:port[,host:port...]` (NATS JetStream).
    #[serde(default = "default_journal")]
    pub journal: String,
    /// When journal writes wait for the disk: `full` (every write, the default) or `append`
    /// (records before they are forwarded; seals ride on the next record's flush).
    #[serde(default)]
    pub journal_sync: regroup_replay::JournalSync,
    /// Lifetime of the journal's ownership lease in ms: how long a crashed proxy keeps the
    /// next one waiting (see `ownership`).
    #[serde(default = "default_journal_lease_ms")]
    pub journal_lease_ms: u64,
    /// How many `regroup serve` processes share the journal: `one` (a second is refused) or
    /// `several` (one leads, holding the journal's lease; the others follow: they forward
    /// every request to the leader and take the lease over when it stops renewing).
    #[serde(default)]
    pub proxies: Proxies,
    /// Bearer token required by admin verbs (`resolve`). Overridden by the
    /// `REGROUP_ADMIN_TOKEN` environment variable. Unset: admin verbs are open to whoever
    /// reaches `admin_listen` (loopback by default).
    #[serde(default)]
    pub admin_token: Option<String>,
    /// Require the admin token for `GET /status` too (default: only the admin verbs).
    #[serde(default)]
    pub admin_status_requires_token: bool,
    /// Largest admin request body, in bytes; larger gets 413.
    #[serde(default = "default_admin_max_body")]
    pub admin_max_body_bytes: usize,
    /// Cap on concurrent admin connections; beyond it new ones wait.
    #[serde(default = "default_admin_max_connections")]
    pub admin_max_connections: usize,
    /// Largest request header block (request line included), in bytes, on both ports;
    /// larger gets 431.
    #[serde(default = "default_max_header_bytes")]
    pub max_header_bytes: usize,
    /// Most headers in one request, on both ports; more gets 431.
    #[serde(default = "default_max_headers")]
    pub max_headers: usize,
    /// Time a client has to send a request's header block, on both ports; then the
    /// connection is closed.
    #[serde(default = "default_header_read_timeout")]
    pub header_read_timeout_ms: u64,
    /// Time a client has to send a whole request body; then 408 (an update is not
    /// journaled).
    #[serde(default = "default_body_read_timeout")]
    pub body_read_timeout_ms: u64,
    /// Cap on concurrent client connections; beyond it new ones wait in the listen backlog.
    #[serde(default = "default_max_connections")]
    pub max_connections: usize,
    /// Threads serving client connections, each with its own single-threaded runtime, its
    /// own listener on the client port (`SO_REUSEPORT`: the kernel spreads new connections
    /// over them) and its own upstream pool, so a read's client and upstream connections
    /// are served on one thread. Absent: one per core; `0`: clients are served on the
    /// proxy's main runtime with everything else.
    #[serde(default)]
    pub client_threads: Option<usize>,
    /// Worker threads of the main runtime of `regroup serve`, where every group's update
    /// path (the sequencer, the journal, the exchange with the primary), the replayers,
    /// supervision and the admin API run. Absent: one per four cores, at least one, while
    /// client threads serve the clients (an update crosses fewer threads on fewer workers;
    /// see BENCHMARKS.md), else one per core. Read only by the binary: a proxy embedded
    /// as a library runs on its host's runtime.
    #[serde(default)]
    pub main_threads: Option<usize>,
    /// The redundancy groups.
    pub groups: Vec<GroupConfig>,
}

impl Config {
    /// The number of client threads: `client_threads`, else one per core (0: none, clients
    /// are served on the main runtime).
    pub fn client_threads(&self) -> usize {
        self.client_threads.unwrap_or_else(|| {
            std::thread::available_parallelism().map_or(1, std::num::NonZero::get)
        })
    }

    /// The main runtime's worker threads: `main_threads`, else one per
    /// [`CORES_PER_MAIN_THREAD`] cores (at least one) while client threads serve the
    /// clients, and one per core when the main runtime serves them too (`client_threads =
    /// 0`, or several proxies).
    pub fn main_threads(&self) -> usize {
        self.main_threads.unwrap_or_else(|| {
            let cores = std::thread::available_parallelism().map_or(1, std::num::NonZero::get);
            if self.proxies == Proxies::Several || self.client_threads() == 0 {
                cores
            } else {
                (cores / CORES_PER_MAIN_THREAD).max(1)
            }
        })
    }
}

/// Which of the primary's answers are replayed.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum ReplayPolicy {
    /// Every update the primary executed, failed ones too (the default: apps change state
    /// on failed requests).
    #[default]
    All,
    /// Only 2xx answers.
    Success,
}

/// One redundancy group.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct GroupConfig {
    /// The group's name (journal key).
    pub name: String,
    /// Requests whose path starts with this prefix go to this group (default `/`: all).
    #[serde(default = "default_prefix")]
    pub path_prefix: String,
    /// Remove `path_prefix` from the path before forwarding (`/bank/accounts` reaches the
    /// partitions as `/accounts`).
    #[serde(default)]
    pub strip_prefix: bool,
    /// The health-check path on every partition.
    #[serde(default = "default_health_path")]
    pub health_path: String,
    /// Replay every executed update (`all`) or only 2xx answers (`success`).
    #[serde(default)]
    pub replay: ReplayPolicy,
    /// How replica answers are compared with the primary's: `status_and_body` or `status`.
    #[serde(default)]
    pub compare: Compare,
    /// Largest update body accepted, in bytes; larger gets 413 and is not journaled.
    #[serde(default = "default_max_body")]
    pub max_body_bytes: usize,
    /// Heartbeat interval in milliseconds.
    #[serde(default = "default_hb_interval")]
    pub heartbeat_interval_ms: u64,
    /// Heartbeat time-out in milliseconds.
    #[serde(default = "default_hb_timeout")]
    pub heartbeat_timeout_ms: u64,
    /// Consecutive missed heartbeats before a partition is unavailable.
    #[serde(default = "default_hb_retries")]
    pub heartbeat_retries: u32,
    /// How long an update waits for the group to take it before 503.
    #[serde(default = "default_failover_wait")]
    pub failover_wait_ms: u64,
    /// How long the primary has to answer an update before it is in doubt.
    #[serde(default = "default_update_timeout")]
    pub update_timeout_ms: u64,
    /// How many updates may be on their way to the primary at once (the pipelined
    /// sequencer's window). Above 1 only for a primary whose app layer keeps the
    /// exactly-once record: it executes them one at a time in seq order (`Regroup-Prev`,
    /// `Regroup-Pipelined`). 1: each update is sealed before the next is sent.
    #[serde(default = "default_pipeline_window")]
    pub pipeline_window: usize,
    /// How many records may be on their way to one replica at once while it replays (its
    /// app layer applies them one at a time in seq order). Above 1 only for a replica whose
    /// app layer keeps the exactly-once record; 1: each record is answered before the next
    /// is sent.
    #[serde(default = "default_replay_window")]
    pub replay_window: usize,
    /// How long a read waits for an eligible partition before 503.
    #[serde(default = "default_read_wait")]
    pub read_wait_ms: u64,
    /// How many records a replica may lag and still serve reads.
    #[serde(default = "default_max_read_lag")]
    pub max_read_lag: u64,
    /// How long a partition has to answer a read (its headers) before 504.
    #[serde(default = "default_read_timeout")]
    pub read_timeout_ms: u64,
    /// Classification overrides, first match wins, matched against the normalized path;
    /// unmatched requests are classified by method ([`GroupConfig::read_methods`] read,
    /// everything else updates).
    #[serde(default)]
    pub routes: Vec<RouteRule>,
    /// The methods that read (exact spelling). Absent: GET, HEAD, OPTIONS, PROPFIND, REPORT
    /// and SEARCH. Every other method is an update.
    #[serde(default)]
    pub read_methods: Option<Vec<String>>,
    /// Conflict keys: which updates are independent, so that a replica whose app layer
    /// offers parallel replay may replay them in parallel ([`regroup_replay::conflict`]).
    /// First match wins; a record no rule gives keys to is a barrier. Empty: every record
    /// is replayed in seq order. Changes nothing for the primary.
    #[serde(default)]
    pub conflict_keys: Vec<regroup_replay::ConflictRule>,
    /// The secret that signs the replay headers of this group's updates and replays
    /// (`Regroup-Signature`); its partitions' app layers must know it. Absent: the
    /// `REGROUP_REPLAY_SECRET` environment variable, if set; else nothing is signed.
    #[serde(default)]
    pub replay_secret: Option<String>,
    /// Retention: keep at least this many of the newest records (absent, with
    /// `retain_hours` absent too: keep every record). See [`GroupConfig::retains`].
    #[serde(default)]
    pub retain_records: Option<u64>,
    /// Retention: keep at least the records of the last this many hours (fractions allowed).
    #[serde(default)]
    pub retain_hours: Option<f64>,
    /// The partitions; the first is the primary when the group is new.
    pub partitions: Vec<PartitionConfig>,
}

/// One partition.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PartitionConfig {
    /// Its name, unique in the group.
    pub name: String,
    /// Its base URL, `http://host:port`.
    pub url: String,
    /// The computing system it runs on (its fault domain): failover prefers a partition on
    /// another host, and `/status` shows a host down when all its partitions stop answering.
    #[serde(default)]
    pub host: Option<String>,
    /// Failover preference among equally caught-up partitions (higher first).
    #[serde(default)]
    pub priority: i32,
}

impl PartitionConfig {
    /// The partition as the journal stores it.
    pub fn spec(&self) -> regroup_replay::MemberSpec {
        regroup_replay::MemberSpec {
            name: self.name.clone(),
            url: self.url.clone(),
            host: self.host.clone(),
            priority: self.priority,
        }
    }
}

/// How many proxies share a journal.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Proxies {
    /// One proxy per journal: a second one is refused at start.
    #[default]
    One,
    /// Several proxies: the lease holder leads, the others follow and take over.
    Several,
}

/// Checks one partition's definition (from the config or the admin API's `add`): a name,
/// an `http://` URL, a host that is not blank. Errors name the field at fault.
pub fn validate_member(spec: &regroup_replay::MemberSpec) -> Result<(), (&'static str, String)> {
    if spec.name.trim().is_empty() {
        return Err(("name", "must not be empty".into()));
    }
    if spec.name.len() > 128 || spec.name.chars().any(|c| c.is_control() || c == '/') {
        return Err((
            "name",
            "must be at most 128 characters, without '/' or control characters".into(),
        ));
    }
    base_uri(&spec.url).map_err(|m| ("url", m))?;
    if let Some(h) = &spec.host
        && h.trim().is_empty()
    {
        return Err((
            "host",
            "must not be empty (leave it out to name none)".into(),
        ));
    }
    Ok(())
}

fn default_listen() -> SocketAddr {
    parse_const(DEFAULT_LISTEN)
}
fn default_admin_listen() -> SocketAddr {
    parse_const(DEFAULT_ADMIN_LISTEN)
}
fn parse_const(s: &str) -> SocketAddr {
    s.parse()
        .unwrap_or_else(|_| SocketAddr::from(([127, 0, 0, 1], 0)))
}
fn default_journal_lease_ms() -> u64 {
    DEFAULT_JOURNAL_LEASE_MS
}

fn default_journal() -> String {
    DEFAULT_JOURNAL.to_owned()
}
fn default_prefix() -> String {
    "/".to_owned()
}
fn default_health_path() -> String {
    DEFAULT_HEALTH_PATH.to_owned()
}
fn default_max_body() -> usize {
    DEFAULT_MAX_BODY_BYTES
}
fn default_hb_interval() -> u64 {
    DEFAULT_HEARTBEAT_INTERVAL_MS
}
fn default_hb_timeout() -> u64 {
    DEFAULT_HEARTBEAT_TIMEOUT_MS
}
fn default_hb_retries() -> u32 {
    DEFAULT_HEARTBEAT_RETRIES
}
fn default_failover_wait() -> u64 {
    DEFAULT_FAILOVER_WAIT_MS
}
fn default_pipeline_window() -> usize {
    DEFAULT_PIPELINE_WINDOW
}
fn default_replay_window() -> usize {
    DEFAULT_REPLAY_WINDOW
}

fn default_update_timeout() -> u64 {
    DEFAULT_UPDATE_TIMEOUT_MS
}
fn default_read_wait() -> u64 {
    DEFAULT_READ_WAIT_MS
}
fn default_max_read_lag() -> u64 {
    DEFAULT_MAX_READ_LAG
}
fn default_read_timeout() -> u64 {
    DEFAULT_READ_TIMEOUT_MS
}
fn default_max_header_bytes() -> usize {
    DEFAULT_MAX_HEADER_BYTES
}
fn default_max_headers() -> usize {
    DEFAULT_MAX_HEADERS
}
fn default_header_read_timeout() -> u64 {
    DEFAULT_HEADER_READ_TIMEOUT_MS
}
fn default_body_read_timeout() -> u64 {
    DEFAULT_BODY_READ_TIMEOUT_MS
}
fn default_max_connections() -> usize {
    DEFAULT_MAX_CONNECTIONS
}
fn default_admin_max_connections() -> usize {
    DEFAULT_ADMIN_MAX_CONNECTIONS
}
fn default_admin_max_body() -> usize {
    DEFAULT_ADMIN_MAX_BODY_BYTES
}

/// A configuration that cannot be used. The message names the file and where.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    /// The file could not be read.
    #[error("cannot read config file {}: {error}", path.display())]
    Read {
        /// The file.
        path: PathBuf,
        /// Why.
        error: std::io::Error,
    },
    /// The file is not valid TOML for this schema.
    #[error("{}:{line}:{column}: {message}", path.display())]
    Parse {
        /// The file.
        path: PathBuf,
        /// 1-based line.
        line: usize,
        /// 1-based column.
        column: usize,
        /// What is wrong.
        message: String,
    },
    /// A value is out of range or inconsistent with another.
    #[error("{}: {key}: {message}", path.display())]
    Invalid {
        /// The file.
        path: PathBuf,
        /// The key at fault, e.g. `groups[0].partitions[1].name`.
        key: String,
        /// What is wrong.
        message: String,
    },
}

impl Config {
    /// Reads, parses and validates `path`.
    pub fn load(path: &Path) -> Result<Config, ConfigError> {
        let text = std::fs::read_to_string(path).map_err(|error| ConfigError::Read {
            path: path.to_owned(),
            error,
        })?;
        Config::parse(&text, path)
    }

    /// Parses and validates `text`; `path` is only used in messages.
    pub fn parse(text: &str, path: &Path) -> Result<Config, ConfigError> {
        let config: Config = toml::from_str(text).map_err(|e| {
            let (line, column) = e
                .span()
                .map(|span| line_col(text, span.start))
                .unwrap_or((1, 1));
            ConfigError::Parse {
                path: path.to_owned(),
                line,
                column,
                message: e.message().trim().to_owned(),
            }
        })?;
        config.validate(path)?;
        Ok(config)
    }

    /// Checks what serde cannot: names unique and non-empty, URLs usable, limits sane.
    pub fn validate(&self, path: &Path) -> Result<(), ConfigError> {
        let invalid = |key: String, message: String| ConfigError::Invalid {
            path: path.to_owned(),
            key,
            message,
        };
        if self.groups.is_empty() {
            return Err(invalid(
                "groups".into(),
                "at least one group is required".into(),
            ));
        }
        if !(self.journal.starts_with("sqlite:")
            || self.journal.starts_with("postgres://")
            || self.journal.starts_with("postgresql://")
            || self.journal.starts_with("nats://"))
        {
            return Err(invalid(
                "journal".into(),
                format!(
                    "{:?} is not a sqlite://, postgres:// or nats:// URL",
                    self.journal
                ),
            ));
        }
        if self
            .admin_token
            .as_ref()
            .is_some_and(|t| t.trim().is_empty())
        {
            return Err(invalid(
                "admin_token".into(),
                "must not be empty (remove the key to leave admin verbs open on a loopback admin_listen)".into(),
            ));
        }
        if self.max_header_bytes < MIN_MAX_HEADER_BYTES {
            return Err(invalid(
                "max_header_bytes".into(),
                format!("must be at least {MIN_MAX_HEADER_BYTES}"),
            ));
        }
        for (k, v) in [
            ("max_headers", self.max_headers as u64),
            ("header_read_timeout_ms", self.header_read_timeout_ms),
            ("body_read_timeout_ms", self.body_read_timeout_ms),
            ("max_connections", self.max_connections as u64),
            ("admin_max_connections", self.admin_max_connections as u64),
            ("admin_max_body_bytes", self.admin_max_body_bytes as u64),
        ] {
            if v == 0 {
                return Err(invalid(k.into(), "must be greater than 0".into()));
            }
        }
        if self.client_threads.is_some_and(|n| n > MAX_CLIENT_THREADS) {
            return Err(invalid(
                "client_threads".into(),
                format!("must be at most {MAX_CLIENT_THREADS}"),
            ));
        }
        if let Some(n) = self.main_threads
            && !(1..=MAX_MAIN_THREADS).contains(&n)
        {
            return Err(invalid(
                "main_threads".into(),
                format!("must be between 1 and {MAX_MAIN_THREADS}, not {n}"),
            ));
        }
        if self.proxies == Proxies::Several {
            for (k, addr) in [("listen", self.listen), ("admin_listen", self.admin_listen)] {
                if addr.ip().is_unspecified() {
                    return Err(invalid(
                        k.into(),
                        format!(
                            "{addr} cannot be reached by the other proxies: with proxies = \
                             \"several\" give the address they reach this one on"
                        ),
                    ));
                }
            }
        }
        if self.journal_lease_ms < MIN_JOURNAL_LEASE_MS {
            return Err(invalid(
                "journal_lease_ms".into(),
                format!("must be at least {MIN_JOURNAL_LEASE_MS}"),
            ));
        }
        let mut group_names = HashSet::new();
        let mut prefixes = HashSet::new();
        for (gi, g) in self.groups.iter().enumerate() {
            let key = |k: &str| format!("groups[{gi}].{k}");
            if g.name.trim().is_empty() {
                return Err(invalid(key("name"), "must not be empty".into()));
            }
            if !group_names.insert(g.name.as_str()) {
                return Err(invalid(
                    key("name"),
                    format!("duplicate group name {:?}", g.name),
                ));
            }
            if !g.path_prefix.starts_with('/') {
                return Err(invalid(key("path_prefix"), "must start with '/'".into()));
            }
            if !prefixes.insert(g.path_prefix.as_str()) {
                return Err(invalid(
                    key("path_prefix"),
                    format!("{:?} is already used by another group", g.path_prefix),
                ));
            }
            if !g.health_path.starts_with('/') {
                return Err(invalid(key("health_path"), "must start with '/'".into()));
            }
            for (k, v) in [
                ("heartbeat_interval_ms", g.heartbeat_interval_ms),
                ("heartbeat_timeout_ms", g.heartbeat_timeout_ms),
                ("failover_wait_ms", g.failover_wait_ms),
                ("update_timeout_ms", g.update_timeout_ms),
                ("read_wait_ms", g.read_wait_ms),
                ("read_timeout_ms", g.read_timeout_ms),
            ] {
                if v == 0 {
                    return Err(invalid(key(k), "must be greater than 0".into()));
                }
            }
            for (k, v) in [
                ("pipeline_window", g.pipeline_window),
                ("replay_window", g.replay_window),
            ] {
                if v == 0 || v > MAX_PIPELINE_WINDOW {
                    return Err(invalid(
                        key(k),
                        format!("must be between 1 and {MAX_PIPELINE_WINDOW}"),
                    ));
                }
            }
            if g.heartbeat_retries == 0 {
                return Err(invalid(
                    key("heartbeat_retries"),
                    "must be at least 1".into(),
                ));
            }
            if g.max_body_bytes == 0 {
                return Err(invalid(
                    key("max_body_bytes"),
                    "must be greater than 0".into(),
                ));
            }
            for (ri, r) in g.routes.iter().enumerate() {
                if let Some(m) = &r.method
                    && m != "*"
                    && Method::from_bytes(m.as_bytes()).is_err()
                {
                    return Err(invalid(
                        key(&format!("routes[{ri}].method")),
                        format!("{m:?} is not an HTTP method"),
                    ));
                }
                if !r.path.starts_with('/') {
                    return Err(invalid(
                        key(&format!("routes[{ri}].path")),
                        "must start with '/'".into(),
                    ));
                }
                if let Err(e) = crate::classify::normalize_path(&r.path) {
                    return Err(invalid(key(&format!("routes[{ri}].path")), e.to_string()));
                }
            }
            if let Some(methods) = &g.read_methods {
                regroup_replay::classify::validate_read_methods(methods)
                    .map_err(|m| invalid(key("read_methods"), m))?;
            }
            regroup_replay::ConflictKeys::new(&g.conflict_keys)
                .map_err(|m| invalid(key("conflict_keys"), format!("group {:?}, {m}", g.name)))?;
            if g.replay_secret.as_deref() == Some("") {
                return Err(invalid(
                    key("replay_secret"),
                    "must not be empty (leave it out to sign nothing)".into(),
                ));
            }
            if let Some(h) = g.retain_hours
                && !(h.is_finite() && h >= 0.0)
            {
                return Err(invalid(
                    key("retain_hours"),
                    format!("must be a number of hours, 0 or more (got {h})"),
                ));
            }
            if g.partitions.is_empty() {
                return Err(invalid(
                    key("partitions"),
                    "at least one partition is required".into(),
                ));
            }
            let mut names = HashSet::new();
            for (pi, p) in g.partitions.iter().enumerate() {
                let pkey = |k: &str| key(&format!("partitions[{pi}].{k}"));
                validate_member(&p.spec()).map_err(|(k, m)| invalid(pkey(k), m))?;
                if !names.insert(p.name.as_str()) {
                    return Err(invalid(
                        pkey("name"),
                        format!(
                            "duplicate partition name {:?} in group {:?}",
                            p.name, g.name
                        ),
                    ));
                }
            }
        }
        Ok(())
    }
}

impl GroupConfig {
    /// Whether retention truncates this group's journal (`retain_records` or
    /// `retain_hours` set).
    pub fn retains(&self) -> bool {
        self.retain_records.is_some() || self.retain_hours.is_some()
    }

    /// How long records are kept at least, by `retain_hours` (zero when absent).
    pub fn retain_for(&self) -> std::time::Duration {
        std::time::Duration::try_from_secs_f64(self.retain_hours.unwrap_or(0.0) * 3600.0)
            .unwrap_or(std::time::Duration::MAX)
    }

    /// The group's classifier: its route rules and read methods.
    pub fn classifier(&self) -> Classifier {
        let c = Classifier::new(&self.routes);
        match &self.read_methods {
            Some(methods) => c.with_read_methods(methods),
            None => c,
        }
    }
    /// The secret that signs replay headers: `replay_secret`, else `REGROUP_REPLAY_SECRET`.
    pub fn signing_secret(&self) -> Option<Secret> {
        match &self.replay_secret {
            Some(s) => Secret::new(s),
            None => Secret::from_env(SECRET_ENV),
        }
    }
    /// Heartbeat interval.
    pub fn heartbeat_interval(&self) -> Duration {
        Duration::from_millis(self.heartbeat_interval_ms)
    }
    /// Heartbeat time-out.
    pub fn heartbeat_timeout(&self) -> Duration {
        Duration::from_millis(self.heartbeat_timeout_ms)
    }
    /// Bound on an update's wait for the group.
    pub fn failover_wait(&self) -> Duration {
        Duration::from_millis(self.failover_wait_ms)
    }
    /// Time-out for the primary's answer.
    pub fn update_timeout(&self) -> Duration {
        Duration::from_millis(self.update_timeout_ms)
    }
    /// Bound on a read's wait for a partition.
    pub fn read_wait(&self) -> Duration {
        Duration::from_millis(self.read_wait_ms)
    }
    /// Time-out for a partition's answer to a read.
    pub fn read_timeout(&self) -> Duration {
        Duration::from_millis(self.read_timeout_ms)
    }
}

impl Config {
    /// Time a client has to send a request's header block.
    pub fn header_read_timeout(&self) -> Duration {
        Duration::from_millis(self.header_read_timeout_ms)
    }
    /// Time a client has to send a whole request body.
    pub fn body_read_timeout(&self) -> Duration {
        Duration::from_millis(self.body_read_timeout_ms)
    }
}

/// Parses a partition base URL: `http://host:port` with no path beyond `/`.
pub fn base_uri(url: &str) -> Result<Uri, String> {
    let uri: Uri = url
        .parse()
        .map_err(|e| format!("{url:?} is not a URL: {e}"))?;
    if uri.scheme_str() != Some("http") {
        return Err(format!("{url:?} must start with http://"));
    }
    if uri.authority().is_none() {
        return Err(format!("{url:?} has no host"));
    }
    if !matches!(uri.path(), "" | "/") || uri.query().is_some() {
        return Err(format!("{url:?} must not have a path or query"));
    }
    Ok(uri)
}

fn line_col(text: &str, offset: usize) -> (usize, usize) {
    let before = text.get(..offset).unwrap_or(text);
    let line = before.matches('\n').count() + 1;
    let column = before.rsplit('\n').next().map_or(0, |l| l.chars().count()) + 1;
    (line, column)
}

#[cfg(test)]
mod tests {
    use super::*;

    const GOOD: &str = r#"
listen = "127.0.0.1:0"
admin_listen = "127.0.0.1:0"
journal = "sqlite://j.db"
[[groups]]
name = "bank"
[[groups.partitions]]
name = "a"
url = "http://127.0.0.1:9001"
[[groups.partitions]]
name = "b"
url = "http://127.0.0.1:9002"
"#;

    fn err(text: &str) -> String {
        match Config::parse(text, Path::new("regroup.toml")) {
            Ok(_) => panic!("accepted:\n{text}"),
            Err(e) => e.to_string(),
        }
    }

    #[test]
    fn the_sample_config_is_valid() {
        let text = include_str!("../../examples/regroup.toml");
        let c = Config::parse(text, Path::new("examples/regroup.toml")).expect("valid sample");
        assert_eq!(c.groups[0].partitions.len(), 3);
    }

    #[test]
    fn good_config_gets_documented_defaults() {
        let c = Config::parse(GOOD, Path::new("x.toml")).expect("valid");
        let g = &c.groups[0];
        assert_eq!(g.health_path, "/health");
        assert_eq!(g.max_body_bytes, 1024 * 1024);
        assert_eq!(g.heartbeat_retries, 3);
        assert_eq!(g.replay, ReplayPolicy::All);
        assert_eq!(c.journal_sync, regroup_replay::JournalSync::Full);
        assert_eq!(c.journal_lease_ms, DEFAULT_JOURNAL_LEASE_MS);
        assert_eq!(g.partitions[1].name, "b");
        assert_eq!(g.replay_window, DEFAULT_REPLAY_WINDOW);
    }

    #[test]
    fn replay_window_is_bounded_and_named() {
        let with = |line: &str| GOOD.replacen("[[groups]]\n", &format!("[[groups]]\n{line}\n"), 1);
        let c = Config::parse(&with("replay_window = 1"), Path::new("x.toml")).expect("valid");
        assert_eq!(c.groups[0].replay_window, 1);
        for bad in ["replay_window = 0", "replay_window = 65"] {
            let e = Config::parse(&with(bad), Path::new("x.toml"))
                .expect_err(bad)
                .to_string();
            assert!(
                e.contains("replay_window: must be between 1 and 64"),
                "{bad}: {e}"
            );
        }
    }

    #[test]
    fn main_threads_is_bounded_and_follows_where_clients_are_served() {
        let top = |line: &str| format!("{line}\n{GOOD}");
        assert_eq!(
            err(&top("main_threads = 0")),
            "regroup.toml: main_threads: must be between 1 and 256, not 0"
        );
        let cores = std::thread::available_parallelism().map_or(1, std::num::NonZero::get);
        let parse = |text: &str| Config::parse(text, Path::new("x.toml")).expect("valid");
        assert_eq!(parse(&top("main_threads = 3")).main_threads(), 3);
        let with_client_threads = parse(&top("client_threads = 2"));
        assert_eq!(
            with_client_threads.main_threads(),
            (cores / CORES_PER_MAIN_THREAD).max(1)
        );
        // The main runtime serves the clients too: a worker per core, as before.
        assert_eq!(parse(&top("client_threads = 0")).main_threads(), cores);
    }

    #[test]
    fn unknown_key_is_named_with_line_and_column() {
        let text = GOOD.replace("name = \"bank\"", "name = \"bank\"\nhearbeat_retries = 3");
        let e = err(&text);
        assert!(
            e.starts_with("regroup.toml:7:1: unknown field `hearbeat_retries`"),
            "{e}"
        );
    }

    #[test]
    fn malformed_toml_is_located() {
        let e = err("listen = \"127.0.0.1:0\"\n[[groups]\n");
        assert!(e.starts_with("regroup.toml:2:"), "{e}");
    }

    #[test]
    fn duplicate_partition_names_the_key() {
        let text = GOOD.replace("name = \"b\"", "name = \"a\"");
        assert_eq!(
            err(&text),
            "regroup.toml: groups[0].partitions[1].name: duplicate partition name \"a\" in group \"bank\""
        );
    }

    #[test]
    fn classification_and_signing_keys_are_validated() {
        let with =
            |line: &str| GOOD.replace("name = \"bank\"", &format!("name = \"bank\"\n{line}"));
        assert_eq!(
            err(&with("read_methods = [\"GET\", \"\"]")),
            "regroup.toml: groups[0].read_methods: \"\" is not an HTTP method"
        );
        assert_eq!(
            err(&with("replay_secret = \"\"")),
            "regroup.toml: groups[0].replay_secret: must not be empty (leave it out to sign nothing)"
        );
        assert_eq!(
            err(&with(
                "[[groups.routes]]\npath = \"/a/%2e%2e/../x\"\nkind = \"read\""
            )),
            "regroup.toml: groups[0].routes[0].path: path \"/a/%2e%2e/../x\" climbs above the root"
        );
        let c =
            Config::parse(&with("read_methods = [\"GET\"]"), Path::new("x.toml")).expect("valid");
        let classifier = c.groups[0].classifier();
        assert_eq!(
            classifier.classify(&Method::GET, "/a"),
            crate::classify::Kind::Read
        );
        assert_eq!(
            classifier.classify(&Method::HEAD, "/a"),
            crate::classify::Kind::Update
        );
        let c = Config::parse(&with("replay_secret = \"s\""), Path::new("x.toml")).expect("valid");
        assert_eq!(
            c.groups[0].signing_secret(),
            regroup_replay::signature::Secret::new("s")
        );
    }

    #[test]
    fn conflict_keys_parse_and_bad_rules_name_the_group() {
        let with =
            |rules: &str| GOOD.replace("name = \"bank\"", &format!("name = \"bank\"\n{rules}"));
        let c = Config::parse(
            &with(
                "[[groups.conflict_keys]]\nmethod = \"POST\"\npath = \"/transfers\"\n\
                 keys = [\"body:/from\", \"body:/to\"]\n\
                 [[groups.conflict_keys]]\npath = \"/accounts/*/deposit\"\nkeys = [\"path:1\"]",
            ),
            Path::new("x.toml"),
        )
        .expect("valid");
        let rules = &c.groups[0].conflict_keys;
        assert_eq!(rules.len(), 2);
        assert_eq!(rules[0].method.as_deref(), Some("POST"));
        assert_eq!(rules[0].keys, ["body:/from", "body:/to"]);
        assert_eq!(rules[1].method, None);
        assert!(
            Config::parse(GOOD, Path::new("x.toml"))
                .is_ok_and(|c| c.groups[0].conflict_keys.is_empty())
        );
        assert_eq!(
            err(&with(
                "[[groups.conflict_keys]]\npath = \"/transfers\"\nkeys = [\"query:from\"]"
            )),
            "regroup.toml: groups[0].conflict_keys: group \"bank\", rule 0 (path \"/transfers\"): \
             key \"query:from\": unknown source, expected path:N, header:NAME or body:/json/pointer"
        );
        assert_eq!(
            err(&with(
                "[[groups.conflict_keys]]\npath = \"/accounts/**\"\nkeys = [\"path:1\"]"
            )),
            "regroup.toml: groups[0].conflict_keys: group \"bank\", rule 0 (path \"/accounts/**\"): \
             key \"path:1\": segment 1 of the pattern is \"**\""
        );
        let e = err(&with(
            "[[groups.conflict_keys]]\npath = \"/t\"\nkeys = [\"path:0\"]\nkind = \"read\"",
        ));
        assert!(e.contains("unknown field `kind`"), "{e}");
    }

    #[test]
    fn bad_values_are_named() {
        let e = err(&GOOD.replace("http://127.0.0.1:9002", "ftp://x"));
        assert_eq!(
            e,
            "regroup.toml: groups[0].partitions[1].url: \"ftp://x\" must start with http://"
        );
        let e = err(&GOOD.replace("sqlite://j.db", "mysql://x"));
        assert_eq!(
            e,
            "regroup.toml: journal: \"mysql://x\" is not a sqlite://, postgres:// or nats:// URL"
        );
        let e = err(&GOOD.replace("name = \"bank\"", "name = \"bank\"\nheartbeat_retries = 0"));
        assert_eq!(
            e,
            "regroup.toml: groups[0].heartbeat_retries: must be at least 1"
        );
        let e = err(&GOOD.replace(
            "journal = \"sqlite://j.db\"",
            "journal = \"sqlite://j.db\"\njournal_lease_ms = 100",
        ));
        assert_eq!(e, "regroup.toml: journal_lease_ms: must be at least 500");
        let several = "journal = \"sqlite://j.db\"\nproxies = \"several\"";
        let e = err(&GOOD
            .replace("journal = \"sqlite://j.db\"", several)
            .replace(
                "listen = \"127.0.0.1:0\"\nadmin",
                "listen = \"0.0.0.0:8080\"\nadmin",
            ));
        assert!(
            e.starts_with(
                "regroup.toml: listen: 0.0.0.0:8080 cannot be reached by the other proxies"
            ),
            "{e}"
        );
        let e = err(&GOOD.replace(
            "journal = \"sqlite://j.db\"",
            "journal = \"sqlite://j.db\"\nproxies = \"many\"",
        ));
        assert!(
            e.contains("unknown variant `many`, expected `one` or `several`"),
            "{e}"
        );
    }

    #[test]
    fn several_proxies_parse() {
        let c = Config::parse(
            &GOOD.replace(
                "journal = \"sqlite://j.db\"",
                "journal = \"sqlite://j.db\"\nproxies = \"several\"",
            ),
            std::path::Path::new("regroup.toml"),
        );
        assert!(c.is_ok_and(|c| c.proxies == Proxies::Several));
    }
}
