//! The journal on NATS JetStream: `nats://host:port[,host:port...]`.
//!
//! # Layout
//!
//! - **One stream per group** (`{prefix}_G_{hex of the group name}`, subject
//!   `{prefix}.g.{hex}`: stream names cannot hold `.`, `*`, `>` or spaces, so the name is
//!   hex-encoded), file storage, replicas = the cluster size up to 3. Every write of the
//!   group's log, role and membership is an *entry* of that stream: an append (the record,
//!   its body after the entry's JSON line), a seal, a restamp, the records found pending
//!   when the log was opened (now in doubt), a role, a membership, and a **fence**: the
//!   entry a new lease holder writes before its first other write in the group.
//! - **The lease** in the key-value bucket `{prefix}_LEASE` (history 1), key `owner`.
//! - **Checkpoints and quarantines** in the key-value bucket `{prefix}_CHECKPOINTS`.
//!
//! # Writes of the log: expected sequence, not timing
//!
//! A handle keeps each group's state folded in memory (records by seq, role, membership,
//! the last fence) with the last stream sequence it folded. Every entry is published with
//! `Nats-Expected-Last-Sequence` = that sequence, under one write mutex per handle and
//! group, after checking the write against the folded state (gap, conflict, no such
//! record, the same seal again). JetStream stores the entry only if nothing else was
//! stored since, so two writers can never both write on the same state. A refused
//! publish, or a check that failed on a state that may be stale, catches up from the
//! stream and checks again. Reads catch up first.
//!
//! Fencing: a handle whose own fence is the group's last fence publishes without looking
//! at the lease (a write that publishes nothing, such as the same seal again, reads the
//! lease instead). Any other handle (a handle that never claimed, or one whose fence was
//! followed by another holder's) reads the lease first: held by another claim →
//! [`JournalError::Fenced`]; held by this handle → it writes its fence entry first; held by
//! nobody → it writes. A deposed holder's late write is therefore refused by JetStream
//! itself in every group the new holder has written in (opening a group writes the
//! fence): its expected sequence is stale once the fence is stored, and catching up shows
//! it the newer fence. In a group the new holder has not touched yet, a late write of the
//! old holder may still land; the new holder reads it when it opens the group, before its
//! fence, so nothing it decided on is changed behind its back.
//!
//! A publish whose answer is lost (a time-out, a broken connection) is looked for by its
//! `Nats-Msg-Id` when catching up: found, it is done; not found, the call fails
//! (retryable) and a late arrival is refused by its stale expected sequence if anything
//! was stored since.
//!
//! # Truncation and purge
//!
//! [`Log::truncate`] writes a `Truncate` entry that also carries the group's role,
//! membership and last fence as they stand, then purges the stream below the append of the
//! first record it keeps (JetStream's purge up to a sequence): what goes is the truncated
//! records' entries and older role, membership and fence entries, all summarized by the
//! `Truncate` entry, which stays (it comes after the first kept append). So the stream holds
//! the kept records' entries plus those written after them, however long the group ran. A
//! handle reads each position as "the first entry at or after it" (`next_by_subj`): one
//! that opens a purged stream, or had folded less than what was purged, finds the gap,
//! drops the truncated records it had, starts the log at the next append, and gets the
//! rest back from the `Truncate` entry. A failed purge is logged; the next truncation
//! purges again.
//!
//! # The lease
//!
//! The `owner` key holds `{owner, token, ttl_ms}`. A claim is `create` when the key is
//! absent, or an `update` at the read revision when nobody holds it, the same owner does,
//! or the holder's lease expired; a renewal and a release are `update`s at the read
//! revision too, so two claimers can never both win. The fencing token is a counter kept in
//! the value (up by one with every claim), not the key's revision: renewals bump the
//! revision, and the journal's token must go up by exactly one per new owner. A release
//! therefore writes "nobody" and keeps the counter rather than deleting the key (a deleted
//! key would restart the counter). Expiry is the stored entry's server timestamp plus the
//! ttl, compared with the NATS server's clock (read as the timestamp of a `clock` key
//! written for the purpose), never the local clock. The bucket has no `max_age`: the
//! expiry is judged from the value, and a key that aged out would lose the counter.
//! Expiry alone does not fence: an expired holder writes until another claims.
//!
//! # Checkpoints and quarantines
//!
//! Kept in their bucket (`c.x{group}.x{partition}`, `q.x{group}.x{partition}`, hex), with
//! the lease read before each write. This leaves a window: a deposed holder that read the
//! lease just before a takeover can store one checkpoint or quarantine after it. Both are
//! observations of a partition (how far it applied, that it diverged), true whoever
//! writes them, and a checkpoint may go down anyway (a restored copy).
//!
//! # Durability and limits
//!
//! A publish is acknowledged once the stream stored it (on a replicated stream, once a
//! majority of its replicas did), so seals are durable when [`Log::seal`] returns. The NATS
//! server writes file storage to the operating system at once and syncs it to disk on its
//! `sync_interval`: a process crash loses nothing, a power loss of a single server may lose
//! the last entries; three replicas on three hosts cover one host's power loss. An entry
//! (a record with its body) must fit the server's `max_payload` (1 MB by default); one
//! that does not is refused before it is sent ([`JournalError::TooLarge`], which the proxy
//! answers with 413).
//! The whole log of every group a handle opened is kept in its memory.
//!
//! # Servers and replicas
//!
//! The replicas of a new stream or bucket are the number of servers known (named in the
//! URL, or announced by the cluster at connect time) up to 3; streams created earlier keep
//! theirs. NATS 2.9 (Debian's) works: the client is built without its 2.10+ features, buckets
//! are created as their streams (the client's `create_key_value` first reads account
//! information in a shape 2.9 does not send), and reads use the stream leader's
//! `STREAM.MSG.GET` (consistent, no consumer to create).

use std::collections::{BTreeMap, HashMap};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use async_nats::jetstream::{self, kv, stream};
use async_trait::async_trait;
use bytes::Bytes;
use futures_util::StreamExt as _;
use serde::{Deserialize, Serialize};
use time::OffsetDateTime;
use uuid::Uuid;

use super::sql::SQL_URI_PREFIX;
use super::{
    Checkpoints, JournalError, Lease, Log, LogState, MemberSpec, Membership, Outcome, Owner,
    OwnerInfo, RoleStore, StoredMembers, StoredRole,
};
use crate::record::{
    Fingerprint, Payload, Record, RecordState, RecordedRequest, format_timestamp, parse_timestamp,
};

/// The lease's key.
const OWNER_KEY: &str = "owner";
/// The key written to read the server's clock.
const CLOCK_KEY: &str = "clock";
/// The holder named when a renewal finds the lease released.
const RELEASED: &str = "nobody (the lease was released)";
/// What limits the size of an entry.
const MAX_PAYLOAD: &str = "the NATS server's max_payload";
/// Compare-and-set rounds of one lease call before it gives up.
const LEASE_ATTEMPTS: u32 = 16;
/// Refused publishes of one write before it gives up (each follows another writer's
/// entry, so this bounds a write only under constant contention).
const WRITE_ATTEMPTS: u32 = 32;
/// Most stream reads in flight while catching up.
const CATCH_UP_WINDOW: u64 = 64;

/// A journal on NATS JetStream. Clones share the connection, the folded groups and the
/// lease token (one "process"); [`NatsJournal::connect`] again for another.
#[derive(Clone)]
pub struct NatsJournal {
    inner: Arc<Inner>,
}

struct Inner {
    /// The URL with any password replaced, for messages.
    url: String,
    js: jetstream::Context,
    prefix: String,
    replicas: usize,
    /// The server's `max_payload` when connecting: the most one entry may take.
    max_payload: usize,
    lease: kv::Store,
    checkpoints: kv::Store,
    /// This handle's claim: (token, description); token 0 when it never claimed.
    claim: Mutex<(u64, String)>,
    groups: Mutex<HashMap<String, Arc<tokio::sync::Mutex<GroupLog>>>>,
}

impl std::fmt::Debug for NatsJournal {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("NatsJournal")
            .field("url", &self.inner.url)
            .field("prefix", &self.inner.prefix)
            .field("replicas", &self.inner.replicas)
            .finish_non_exhaustive()
    }
}

/// One group as this handle folded it from its stream.
#[derive(Default)]
struct GroupLog {
    stream: Option<stream::Stream>,
    /// Whether the stream was read at least once.
    loaded: bool,
    /// The last stream sequence folded.
    last: u64,
    records: BTreeMap<u64, Record>,
    role: Option<StoredRole>,
    members: Option<StoredMembers>,
    /// The token of the last fence entry (0: none).
    fence: u64,
    /// The highest seq truncated (0: none).
    low: u64,
    /// The stream sequence of each record's append (a purge keeps the stream from the
    /// first kept record's on).
    appended_at: BTreeMap<u64, u64>,
    /// The stream was found purged past what this handle had folded: the next append
    /// starts the log wherever it stands.
    resync: bool,
    /// The stream sequence the stream was last purged below (0: never, by this handle).
    purged: u64,
}

impl GroupLog {
    fn head(&self) -> u64 {
        self.records.keys().next_back().copied().unwrap_or(0)
    }

    fn log_state(&self) -> LogState {
        LogState {
            head: self.head(),
            unsealed: self
                .records
                .values()
                .filter(|r| !r.state.is_sealed())
                .cloned()
                .collect(),
        }
    }
}

/// One entry of a group's stream (the JSON line; an append's body follows it).
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(tag = "kind", rename_all = "snake_case")]
enum Entry {
    Append {
        seq: u64,
        txn_id: Uuid,
        epoch: u64,
        timestamp: String,
        method: String,
        uri: String,
        headers: Vec<(String, String)>,
        executors: Vec<String>,
    },
    Seal {
        seq: u64,
        state: RecordState,
        fingerprint: Option<Fingerprint>,
    },
    Restamp {
        seq: u64,
        epoch: u64,
        executor: String,
    },
    InDoubt {
        seqs: Vec<u64>,
    },
    Role {
        epoch: u64,
        primary: String,
    },
    Members {
        version: u64,
        partitions: Vec<MemberSpec>,
    },
    Fence {
        token: u64,
        describe: String,
    },
    /// Records up to `through` are gone (retention). With the group's role, membership
    /// and last fence as they stood, so that the stream can be purged below the first
    /// record kept: a reader that finds the stream purged gets them from here.
    Truncate {
        through: u64,
        #[serde(default, skip_serializing_if = "Option::is_none")]
        state: Option<Compacted>,
    },
}

/// A group's state besides its records, as a `Truncate` entry carries it.
#[derive(Debug, Clone, Serialize, Deserialize)]
struct Compacted {
    /// The role: epoch and primary.
    role: Option<(u64, String)>,
    /// The membership: version and partitions.
    members: Option<(u64, Vec<MemberSpec>)>,
    /// The token of the last fence (0: none).
    fence: u64,
}

impl Compacted {
    fn of(log: &GroupLog) -> Compacted {
        Compacted {
            role: log.role.as_ref().map(|r| (r.epoch, r.primary.clone())),
            members: log
                .members
                .as_ref()
                .map(|m| (m.version, m.partitions.clone())),
            fence: log.fence,
        }
    }
}

/// What a write does once checked against the folded state.
enum Plan<T> {
    /// Nothing to store; the answer.
    Done(T),
    /// Store this entry (with this body), then answer.
    Publish(Entry, Bytes, T),
}

/// The stored lease.
#[derive(Debug, Clone, Serialize, Deserialize)]
struct LeaseValue {
    owner: Option<LeaseOwner>,
    token: u64,
    ttl_ms: u64,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
struct LeaseOwner {
    id: String,
    describe: String,
}

/// What a publish came to.
enum Published {
    Stored,
    Refused,
}

fn unavailable(what: impl std::fmt::Display) -> JournalError {
    JournalError::unavailable(what.to_string())
}

/// `url` with every password replaced by `***`.
fn redact(url: &str) -> String {
    url.split(',')
        .map(|part| {
            let (scheme, rest) = part.split_once("://").unwrap_or(("", part));
            let shown = match rest.split_once('@') {
                Some((user, host)) => match user.split_once(':') {
                    Some((name, _)) => format!("{name}:***@{host}"),
                    None => rest.to_owned(),
                },
                None => rest.to_owned(),
            };
            if scheme.is_empty() {
                shown
            } else {
                format!("{scheme}://{shown}")
            }
        })
        .collect::<Vec<_>>()
        .join(",")
}

/// The servers of a `nats://host:port[,host:port...][?prefix=NAME]` URL, and its prefix.
fn parse_url(url: &str) -> Result<(Vec<async_nats::ServerAddr>, Option<String>), JournalError> {
    let bad = |why: String| JournalError::Unavailable {
        reason: format!("{}: {why}", redact(url)),
        retryable: false,
    };
    if !url.starts_with("nats://") {
        return Err(bad("not a nats:// URL".into()));
    }
    let (list, query) = url.split_once('?').unwrap_or((url, ""));
    let mut prefix = None;
    for pair in query.split('&').filter(|p| !p.is_empty()) {
        match pair.split_once('=') {
            Some(("prefix", value)) => prefix = Some(value.to_owned()),
            _ => return Err(bad(format!("unknown option {pair:?} (known: prefix=NAME)"))),
        }
    }
    let servers = list
        .split(',')
        .map(|s| s.trim().trim_start_matches("nats://"))
        .filter(|s| !s.is_empty())
        .map(|s| {
            let full = format!("nats://{s}");
            full.parse::<async_nats::ServerAddr>()
                .map_err(|e| bad(format!("server {}: {e}", redact(s))))
        })
        .collect::<Result<Vec<_>, _>>()?;
    if servers.is_empty() {
        return Err(bad("no server".into()));
    }
    Ok((servers, prefix))
}

fn valid_prefix(prefix: &str) -> bool {
    !prefix.is_empty()
        && prefix
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || c == '_' || c == '-')
}

impl NatsJournal {
    /// The prefix of stream and bucket names when none is given.
    pub const DEFAULT_PREFIX: &'static str = "REGROUP";

    /// Connects to the NATS servers of `url` (`nats://host:port[,host:port...]`, optionally
    /// `?prefix=NAME`) and opens (creating them when missing) the journal's buckets, named
    /// from the URL's prefix or [`NatsJournal::DEFAULT_PREFIX`].
    pub async fn connect(url: &str) -> Result<Self, JournalError> {
        let (_, prefix) = parse_url(url)?;
        let prefix = prefix.unwrap_or_else(|| Self::DEFAULT_PREFIX.to_owned());
        Self::connect_with_prefix(url, &prefix).await
    }

    /// [`NatsJournal::connect`] with streams and buckets named from `prefix` (letters,
    /// digits, `_` and `-`; it overrides the URL's): several journals on one NATS system,
    /// e.g. one per test.
    pub async fn connect_with_prefix(url: &str, prefix: &str) -> Result<Self, JournalError> {
        if !valid_prefix(prefix) {
            return Err(JournalError::Unavailable {
                reason: format!("journal prefix {prefix:?}: only letters, digits, _ and -"),
                retryable: false,
            });
        }
        let shown = redact(url);
        let (addrs, _) = parse_url(url)?;
        let count = addrs.len();
        let client = async_nats::ConnectOptions::new()
            .name("regroup journal")
            .connection_timeout(Duration::from_secs(5))
            .request_timeout(Some(Duration::from_secs(10)))
            .connect(addrs)
            .await
            .map_err(|e| unavailable(format!("{shown}: cannot connect: {e}")))?;
        let info = client.server_info();
        let replicas = count.max(info.connect_urls.len()).clamp(1, 3);
        let max_payload = info.max_payload;
        let js = jetstream::new(client);
        let lease = open_bucket(&js, &format!("{prefix}_LEASE"), replicas, &shown).await?;
        let checkpoints =
            open_bucket(&js, &format!("{prefix}_CHECKPOINTS"), replicas, &shown).await?;
        Ok(NatsJournal {
            inner: Arc::new(Inner {
                url: shown,
                js,
                prefix: prefix.to_owned(),
                replicas,
                max_payload,
                lease,
                checkpoints,
                claim: Mutex::new((0, String::new())),
                groups: Mutex::new(HashMap::new()),
            }),
        })
    }

    /// Checks that `url` reaches a NATS server with JetStream enabled, changing nothing.
    pub async fn probe(url: &str) -> Result<(), JournalError> {
        let shown = redact(url);
        let client = async_nats::ConnectOptions::new()
            .name("regroup check")
            .connection_timeout(Duration::from_secs(5))
            .connect(parse_url(url)?.0)
            .await
            .map_err(|e| unavailable(format!("{shown}: cannot connect: {e}")))?;
        // The account's JetStream information, read raw: the typed answer of this client
        // expects fields that older servers do not send.
        let no_js =
            |why: String| unavailable(format!("{shown}: JetStream is not available: {why}"));
        let answer = client
            .request("$JS.API.INFO", Bytes::new())
            .await
            .map_err(|e| no_js(e.to_string()))?;
        let doc: serde_json::Value =
            serde_json::from_slice(&answer.payload).map_err(|e| no_js(e.to_string()))?;
        if let Some(error) = doc.get("error") {
            return Err(no_js(error.to_string()));
        }
        Ok(())
    }

    /// `url` (`nats://` with one or more servers) with every password replaced by `***`,
    /// for messages.
    pub fn redact(url: &str) -> String {
        redact(url)
    }

    /// How many replicas this journal's streams and buckets get.
    pub fn replicas(&self) -> usize {
        self.inner.replicas
    }

    /// The replicas of `group`'s stream and the name of the server leading it (`None` on a
    /// single server), as the NATS server reports them.
    pub async fn stream_placement(
        &self,
        group: &str,
    ) -> Result<(usize, Option<String>), JournalError> {
        let name = self.stream_name(group);
        let failed = |e: &dyn std::fmt::Display| unavailable(format!("reading stream {name}: {e}"));
        let mut stream = self
            .inner
            .js
            .get_stream(&name)
            .await
            .map_err(|e| failed(&e))?;
        let info = stream.info().await.map_err(|e| failed(&e))?;
        let leader = info.cluster.as_ref().and_then(|c| c.leader.clone());
        Ok((info.config.num_replicas, leader))
    }

    /// How many entries `group`'s stream holds, and the stream sequence of its first (for
    /// tests and operators: a purge after truncation keeps these bounded).
    pub async fn stream_extent(&self, group: &str) -> Result<(u64, u64), JournalError> {
        let name = self.stream_name(group);
        let failed = |e: &dyn std::fmt::Display| unavailable(format!("reading stream {name}: {e}"));
        let stream = self
            .inner
            .js
            .get_stream(&name)
            .await
            .map_err(|e| failed(&e))?;
        let info = stream.get_info().await.map_err(|e| failed(&e))?;
        Ok((info.state.messages, info.state.first_sequence))
    }

    /// The name of `group`'s stream.
    pub fn stream_name(&self, group: &str) -> String {
        format!("{}_G_{}", self.inner.prefix, hex::encode(group))
    }

    fn subject(&self, group: &str) -> String {
        format!("{}.g.{}", self.inner.prefix, hex::encode(group))
    }

    /// Deletes every stream and bucket of this journal (its prefix): for tests, and to
    /// decommission a journal. Other handles on it fail afterwards.
    pub async fn delete_all(&self) -> Result<(), JournalError> {
        let js = &self.inner.js;
        let mut names = js.stream_names();
        let mut doomed = Vec::new();
        let group_prefix = format!("{}_G_", self.inner.prefix);
        while let Some(name) = names.next().await {
            let name = name.map_err(|e| unavailable(format!("listing streams: {e}")))?;
            if name.starts_with(&group_prefix) {
                doomed.push(name);
            }
        }
        for name in doomed {
            js.delete_stream(&name)
                .await
                .map_err(|e| unavailable(format!("deleting stream {name}: {e}")))?;
        }
        for bucket in ["LEASE", "CHECKPOINTS"] {
            let name = format!("{}_{bucket}", self.inner.prefix);
            js.delete_key_value(&name)
                .await
                .map_err(|e| unavailable(format!("deleting bucket {name}: {e}")))?;
        }
        Ok(())
    }

    fn claim_state(&self) -> (u64, String) {
        self.inner
            .claim
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .clone()
    }

    fn my_token(&self) -> u64 {
        self.claim_state().0
    }

    fn group(&self, group: &str) -> Arc<tokio::sync::Mutex<GroupLog>> {
        self.inner
            .groups
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .entry(group.to_owned())
            .or_default()
            .clone()
    }

    // ---- the stream of a group ----

    /// Reads every entry stored after the last one folded; returns the message ids seen.
    async fn catch_up(&self, log: &mut GroupLog, group: &str) -> Result<Vec<String>, JournalError> {
        log.loaded = true;
        if log.stream.is_none() {
            let name = self.stream_name(group);
            match self.inner.js.get_stream(&name).await {
                Ok(s) => log.stream = Some(s),
                Err(e) if is_not_found(&e) => return Ok(Vec::new()),
                Err(e) => return Err(unavailable(format!("reading stream {name}: {e}"))),
            }
        }
        let Some(stream) = log.stream.clone() else {
            return Ok(Vec::new());
        };
        let mut seen = Vec::new();
        let mut window = 1;
        let subject = self.subject(group);
        loop {
            let from = log.last + 1;
            // The first entry at or after each sequence: the same one unless the stream was
            // purged past `from`.
            let reads = (from..from + window).map(|seq| {
                stream
                    .raw_message_builder()
                    .sequence(seq)
                    .next_by_subject(subject.clone())
                    .send()
            });
            let results = futures_util::future::join_all(reads).await;
            let mut ended = false;
            for result in results {
                match result {
                    Ok(msg) => {
                        if msg.sequence <= log.last {
                            // Read twice (a purge moved a later read to the same entry).
                            continue;
                        }
                        if msg.sequence != log.last + 1 {
                            // Purged below `msg.sequence` (only below a record's append):
                            // what was folded before is older than the truncation that
                            // follows, which brings the state back.
                            tracing::debug!(
                                group,
                                from = log.last + 1,
                                to = msg.sequence,
                                "the stream was purged past this handle's position"
                            );
                            log.records.clear();
                            log.appended_at.clear();
                            log.resync = true;
                        }
                        if let Some(id) = msg.headers.get(async_nats::header::NATS_MESSAGE_ID) {
                            seen.push(id.as_str().to_owned());
                        }
                        match decode_entry(&msg.payload) {
                            Ok((entry, body)) => apply(log, group, entry, body, msg.sequence),
                            Err(why) => tracing::warn!(
                                group,
                                seq = msg.sequence,
                                "skipping an unreadable journal entry: {why}"
                            ),
                        }
                        log.last = msg.sequence;
                    }
                    Err(e) if e.kind() == stream::RawMessageErrorKind::NoMessageFound => {
                        ended = true;
                        break;
                    }
                    Err(e) => {
                        return Err(unavailable(format!(
                            "reading stream {} at {}: {e}",
                            self.stream_name(group),
                            log.last + 1
                        )));
                    }
                }
            }
            if ended {
                return Ok(seen);
            }
            window = (window * 4).min(CATCH_UP_WINDOW);
        }
    }

    async fn ensure_stream(&self, log: &mut GroupLog, group: &str) -> Result<(), JournalError> {
        if log.stream.is_some() {
            return Ok(());
        }
        let name = self.stream_name(group);
        let config = stream::Config {
            name: name.clone(),
            subjects: vec![self.subject(group)],
            storage: stream::StorageType::File,
            num_replicas: self.inner.replicas,
            ..Default::default()
        };
        let stream = self
            .inner
            .js
            .get_or_create_stream(config)
            .await
            .map_err(|e| unavailable(format!("creating stream {name}: {e}")))?;
        log.stream = Some(stream);
        Ok(())
    }

    /// Publishes `entry` at the group's folded position, folding it when stored.
    async fn publish(
        &self,
        log: &mut GroupLog,
        group: &str,
        entry: Entry,
        body: Bytes,
    ) -> Result<Published, JournalError> {
        let payload = encode_entry(&entry, &body)?;
        let too_large = |size: usize| JournalError::TooLarge {
            group: group.to_owned(),
            size,
            limit: self.inner.max_payload,
            what: MAX_PAYLOAD.to_owned(),
        };
        // Refused before anything is sent: the server would refuse it anyway.
        if self.inner.max_payload > 0 && payload.len() > self.inner.max_payload {
            return Err(too_large(payload.len()));
        }
        self.ensure_stream(log, group).await?;
        let size = payload.len();
        let id = Uuid::now_v7().to_string();
        let message = jetstream::message::PublishMessage::build()
            .payload(payload)
            .message_id(&id)
            .expected_last_sequence(log.last);
        let ack = match self
            .inner
            .js
            .send_publish(self.subject(group), message)
            .await
        {
            Ok(future) => future.await,
            Err(e) => Err(e),
        };
        match ack {
            Ok(ack) if ack.sequence == log.last + 1 && !ack.duplicate => {
                apply(log, group, entry, body, ack.sequence);
                log.last = ack.sequence;
                Ok(Published::Stored)
            }
            Ok(_) => {
                let seen = self.catch_up(log, group).await?;
                Ok(if seen.contains(&id) {
                    Published::Stored
                } else {
                    Published::Refused
                })
            }
            Err(e) => match e.kind() {
                jetstream::context::PublishErrorKind::WrongLastSequence => {
                    self.catch_up(log, group).await?;
                    Ok(Published::Refused)
                }
                // A server of the cluster with a smaller limit than the one connected to.
                jetstream::context::PublishErrorKind::MaxPayloadExceeded => Err(too_large(size)),
                jetstream::context::PublishErrorKind::StreamNotFound => {
                    log.stream = None;
                    Err(unavailable(format!(
                        "group {group:?}: stream {} vanished: {e}",
                        self.stream_name(group)
                    )))
                }
                _ => {
                    // The answer was lost: stored or not, the stream tells.
                    let seen = self.catch_up(log, group).await?;
                    if seen.contains(&id) {
                        Ok(Published::Stored)
                    } else {
                        Err(unavailable(format!(
                            "group {group:?}: publishing to {}: {e}",
                            self.inner.url
                        )))
                    }
                }
            },
        }
    }

    /// Runs a write of `group`: fences, checks it against the folded state (`plan`), and
    /// publishes what it plans, catching up and checking again when refused.
    async fn write<T>(
        &self,
        group: &str,
        plan: impl Fn(&GroupLog) -> Result<Plan<T>, JournalError>,
    ) -> Result<T, JournalError> {
        let cell = self.group(group);
        let mut log = cell.lock().await;
        let mut fresh = false;
        if !log.loaded {
            self.catch_up(&mut log, group).await?;
            fresh = true;
        }
        for _ in 0..WRITE_ATTEMPTS {
            let (token, describe) = self.claim_state();
            // Not this handle's fence last: the lease says whether it may write.
            if (token == 0 || log.fence != token)
                && let Some((_, value)) = self.lease_entry().await?
            {
                match &value.owner {
                    Some(o) if value.token != token => {
                        return Err(JournalError::Fenced {
                            holder: o.describe.clone(),
                        });
                    }
                    Some(_) => {
                        let fence = Entry::Fence { token, describe };
                        if let Published::Refused =
                            self.publish(&mut log, group, fence, Bytes::new()).await?
                        {
                            fresh = true;
                            continue;
                        }
                    }
                    None => {}
                }
            }
            match plan(&log) {
                Err(_) if !fresh => {
                    self.catch_up(&mut log, group).await?;
                    fresh = true;
                }
                Err(e) => return Err(e),
                Ok(Plan::Done(v)) => {
                    // Nothing is published, so JetStream checks nothing: the lease does.
                    self.check_lease().await?;
                    return Ok(v);
                }
                Ok(Plan::Publish(entry, body, v)) => {
                    match self.publish(&mut log, group, entry, body).await? {
                        Published::Stored => return Ok(v),
                        Published::Refused => fresh = true,
                    }
                }
            }
        }
        Err(unavailable(format!(
            "group {group:?}: {WRITE_ATTEMPTS} writes in a row were refused (another writer)"
        )))
    }

    /// Runs a read of `group` on its state, caught up first.
    async fn read<T>(
        &self,
        group: &str,
        f: impl FnOnce(&GroupLog) -> T,
    ) -> Result<T, JournalError> {
        let cell = self.group(group);
        let mut log = cell.lock().await;
        self.catch_up(&mut log, group).await?;
        Ok(f(&log))
    }

    /// Purges `group`'s stream below the append of its first record kept, once a
    /// `Truncate` entry (which carries the role, membership and last fence) was stored
    /// after it: what is purged is truncated records and entries the truncation
    /// summarizes. Best effort: a failure is logged, and the next truncation purges.
    async fn purge(&self, group: &str) {
        let cell = self.group(group);
        let mut log = cell.lock().await;
        let Some(below) = log.appended_at.values().next().copied() else {
            return;
        };
        if below <= log.purged.max(1) {
            return;
        }
        let Some(stream) = log.stream.clone() else {
            return;
        };
        match stream.purge().sequence(below).await {
            Ok(r) => {
                log.purged = below;
                tracing::debug!(group, below, purged = r.purged, "journal stream purged");
            }
            Err(e) => tracing::warn!(group, below, error = %e,
                "could not purge the journal's stream below its first record kept; the next \
                 truncation tries again"),
        }
    }

    // ---- the lease ----

    async fn lease_entry(&self) -> Result<Option<(kv::Entry, LeaseValue)>, JournalError> {
        let entry = self
            .inner
            .lease
            .entry(OWNER_KEY)
            .await
            .map_err(|e| unavailable(format!("{}: reading the lease: {e}", self.inner.url)))?;
        match entry {
            Some(e) if e.operation == kv::Operation::Put => {
                let value: LeaseValue =
                    serde_json::from_slice(&e.value).map_err(|err| JournalError::Corrupt {
                        group: String::new(),
                        seq: 0,
                        reason: format!("stored lease: {err}"),
                    })?;
                Ok(Some((e, value)))
            }
            _ => Ok(None),
        }
    }

    /// The NATS server's clock: the timestamp it gives a value written now.
    async fn server_now(&self) -> Result<OffsetDateTime, JournalError> {
        let store = &self.inner.lease;
        let clock_err = |e: &dyn std::fmt::Display| {
            unavailable(format!(
                "{}: reading the server's clock: {e}",
                self.inner.url
            ))
        };
        let revision = store
            .put(CLOCK_KEY, Bytes::new())
            .await
            .map_err(|e| clock_err(&e))?;
        let entry = store
            .entry_for_revision(CLOCK_KEY, revision)
            .await
            .map_err(|e| clock_err(&e))?;
        Ok(entry.map_or_else(OffsetDateTime::now_utc, |e| e.created))
    }

    /// Milliseconds the stored lease has left by the server's clock.
    async fn remaining_ms(
        &self,
        entry: &kv::Entry,
        value: &LeaseValue,
    ) -> Result<u64, JournalError> {
        let now = self.server_now().await?;
        let until = entry.created + Duration::from_millis(value.ttl_ms);
        let left = until - now;
        Ok(u64::try_from(left.whole_milliseconds()).unwrap_or(0))
    }

    fn encode_lease(value: &LeaseValue) -> Bytes {
        Bytes::from(serde_json::to_vec(value).unwrap_or_default())
    }

    fn set_claim(&self, token: u64, describe: &str) {
        *self.inner.claim.lock().unwrap_or_else(|p| p.into_inner()) = (token, describe.to_owned());
    }

    /// Refuses when another claim holds the lease.
    async fn check_lease(&self) -> Result<(), JournalError> {
        if let Some((_, value)) = self.lease_entry().await?
            && let Some(o) = value.owner
            && value.token != self.my_token()
        {
            return Err(JournalError::Fenced { holder: o.describe });
        }
        Ok(())
    }

    fn checkpoint_key(kind: &str, group: &str, partition: &str) -> String {
        format!("{kind}.x{}.x{}", hex::encode(group), hex::encode(partition))
    }
}

fn is_not_found(e: &jetstream::context::GetStreamError) -> bool {
    matches!(
        e.kind(),
        jetstream::context::GetStreamErrorKind::JetStream(j)
            if j.error_code() == jetstream::ErrorCode::STREAM_NOT_FOUND
    )
}

/// Opens the key-value bucket `name`, creating it when missing. Created as its stream
/// (what `create_key_value` sends), since this client's `create_key_value` first reads
/// account information in a form NATS servers before 2.10 do not send.
async fn open_bucket(
    js: &jetstream::Context,
    name: &str,
    replicas: usize,
    url: &str,
) -> Result<kv::Store, JournalError> {
    if let Ok(store) = js.get_key_value(name).await {
        return Ok(store);
    }
    let config = stream::Config {
        name: format!("KV_{name}"),
        subjects: vec![format!("$KV.{name}.>")],
        max_messages_per_subject: 1,
        max_bytes: -1,
        max_message_size: -1,
        storage: stream::StorageType::File,
        allow_rollup: true,
        deny_delete: true,
        allow_direct: true,
        num_replicas: replicas,
        discard: stream::DiscardPolicy::New,
        ..Default::default()
    };
    let created = js.get_or_create_stream(config).await;
    // Another handle may have created it meanwhile: open it either way.
    js.get_key_value(name).await.map_err(|e| {
        let why = match created {
            Err(c) => c.to_string(),
            Ok(_) => e.to_string(),
        };
        unavailable(format!("{url}: opening bucket {name}: {why}"))
    })
}

fn encode_entry(entry: &Entry, body: &[u8]) -> Result<Bytes, JournalError> {
    let mut out = serde_json::to_vec(entry).map_err(|e| JournalError::Unavailable {
        reason: format!("encoding a journal entry: {e}"),
        retryable: false,
    })?;
    out.push(b'\n');
    out.extend_from_slice(body);
    Ok(Bytes::from(out))
}

fn decode_entry(payload: &Bytes) -> Result<(Entry, Bytes), String> {
    let end = payload
        .iter()
        .position(|&b| b == b'\n')
        .ok_or("no entry line")?;
    let entry = serde_json::from_slice(&payload[..end]).map_err(|e| e.to_string())?;
    Ok((entry, payload.slice(end + 1..)))
}

/// Folds one stored entry (at stream sequence `at`) into the group's state. Every entry was
/// checked against the state it was published on, so the checks here only guard against a
/// corrupt stream.
fn apply(log: &mut GroupLog, group: &str, entry: Entry, body: Bytes, at: u64) {
    match entry {
        Entry::Append {
            seq,
            txn_id,
            epoch,
            timestamp,
            method,
            uri,
            headers,
            executors,
        } => {
            if log.resync && log.records.is_empty() && seq > log.low {
                // The first append after a purge: the log starts here.
                log.low = seq - 1;
                log.resync = false;
            } else if seq != log.head() + 1 {
                tracing::warn!(
                    group,
                    seq,
                    "skipping an append that does not extend the log"
                );
                return;
            }
            let Some(timestamp) = parse_timestamp(&timestamp) else {
                tracing::warn!(group, seq, "skipping an append with a bad timestamp");
                return;
            };
            log.records.insert(
                seq,
                Record {
                    group: group.to_owned(),
                    seq,
                    txn_id,
                    epoch,
                    timestamp,
                    payload: if method.is_empty() && uri.starts_with(SQL_URI_PREFIX) {
                        match serde_json::from_slice(&body) {
                            Ok(t) => Payload::Sql(t),
                            Err(e) => {
                                tracing::warn!(group, seq, error = %e,
                                    "skipping an append with a bad SQL payload");
                                return;
                            }
                        }
                    } else {
                        Payload::Http(RecordedRequest {
                            method,
                            uri,
                            headers,
                            body,
                        })
                    },
                    state: RecordState::Pending,
                    fingerprint: None,
                    executors,
                },
            );
            log.appended_at.insert(seq, at);
        }
        Entry::Seal {
            seq,
            state,
            fingerprint,
        } => {
            if let Some(r) = log.records.get_mut(&seq)
                && !r.state.is_sealed()
                && state.is_sealed()
            {
                r.state = state;
                r.fingerprint = fingerprint;
            }
        }
        Entry::Restamp {
            seq,
            epoch,
            executor,
        } => {
            if let Some(r) = log.records.get_mut(&seq)
                && !r.state.is_sealed()
            {
                r.epoch = epoch;
                r.add_executor(&executor);
            }
        }
        Entry::InDoubt { seqs } => {
            for seq in seqs {
                if let Some(r) = log.records.get_mut(&seq)
                    && r.state == RecordState::Pending
                {
                    r.state = RecordState::InDoubt;
                }
            }
        }
        Entry::Role { epoch, primary } => {
            if log.role.as_ref().is_none_or(|r| epoch > r.epoch) {
                log.role = Some(StoredRole { epoch, primary });
            }
        }
        Entry::Members {
            version,
            partitions,
        } => {
            log.members = Some(StoredMembers {
                version,
                partitions,
            });
        }
        Entry::Fence { token, .. } => log.fence = token,
        Entry::Truncate { through, state } => {
            let keep = log.records.split_off(&through.saturating_add(1));
            log.records = keep;
            log.appended_at = log.appended_at.split_off(&through.saturating_add(1));
            log.low = log.low.max(through);
            if let Some(state) = state {
                if let Some((epoch, primary)) = state.role
                    && log.role.as_ref().is_none_or(|r| epoch >= r.epoch)
                {
                    log.role = Some(StoredRole { epoch, primary });
                }
                if let Some((version, partitions)) = state.members {
                    log.members = Some(StoredMembers {
                        version,
                        partitions,
                    });
                }
                if state.fence != 0 {
                    log.fence = state.fence;
                }
            }
        }
    }
}

fn no_such(group: &str, seq: u64) -> JournalError {
    JournalError::NoSuchRecord {
        group: group.to_owned(),
        seq,
    }
}

fn conflict(group: &str, what: String) -> JournalError {
    JournalError::Conflict {
        group: group.to_owned(),
        what,
    }
}

#[async_trait]
impl Log for NatsJournal {
    async fn open_log(&self, group: &str) -> Result<LogState, JournalError> {
        self.write(group, |log| {
            let pending: Vec<u64> = log
                .records
                .values()
                .filter(|r| r.state == RecordState::Pending)
                .map(|r| r.seq)
                .collect();
            let mut state = log.log_state();
            for r in &mut state.unsealed {
                if r.state == RecordState::Pending {
                    r.state = RecordState::InDoubt;
                }
            }
            Ok(if pending.is_empty() {
                Plan::Done(state)
            } else {
                Plan::Publish(Entry::InDoubt { seqs: pending }, Bytes::new(), state)
            })
        })
        .await
    }

    async fn append(&self, record: &Record) -> Result<(), JournalError> {
        let group = record.group.as_str();
        // A SQL mode payload is kept as an HTTP-shaped entry with an empty method (no HTTP
        // request has one), its JSON as the body, as the SQL journal keeps it.
        let (method, uri, headers, body) = match &record.payload {
            Payload::Http(request) => (
                request.method.clone(),
                request.uri.clone(),
                request.headers.clone(),
                request.body.clone(),
            ),
            Payload::Sql(t) => (
                String::new(),
                format!("{SQL_URI_PREFIX}{}", t.dialect),
                Vec::new(),
                Bytes::from(serde_json::to_vec(t).map_err(|e| JournalError::Corrupt {
                    group: group.to_owned(),
                    seq: record.seq,
                    reason: format!("sql payload: {e}"),
                })?),
            ),
        };
        self.write(group, |log| {
            let head = log.head();
            if record.seq != head + 1 {
                return Err(JournalError::Gap {
                    group: group.to_owned(),
                    expected: head + 1,
                    got: record.seq,
                });
            }
            let entry = Entry::Append {
                seq: record.seq,
                txn_id: record.txn_id,
                epoch: record.epoch,
                timestamp: format_timestamp(record.timestamp),
                method: method.clone(),
                uri: uri.clone(),
                headers: headers.clone(),
                executors: record.executors.clone(),
            };
            Ok(Plan::Publish(entry, body.clone(), ()))
        })
        .await
    }

    async fn truncate(&self, group: &str, through: u64) -> Result<u64, JournalError> {
        let removed = self
            .write(group, |log| {
                let bound = through.min(log.head().saturating_sub(1));
                if let Some(r) = log
                    .records
                    .range(..=bound)
                    .map(|(_, r)| r)
                    .find(|r| !r.state.is_sealed())
                {
                    return Err(conflict(
                        group,
                        format!("record {} is not sealed and cannot be truncated", r.seq),
                    ));
                }
                let removed = log.records.range(..=bound).count();
                if removed == 0 {
                    return Ok(Plan::Done(0));
                }
                let removed = u64::try_from(removed).unwrap_or(u64::MAX);
                Ok(Plan::Publish(
                    Entry::Truncate {
                        through: bound,
                        state: Some(Compacted::of(log)),
                    },
                    Bytes::new(),
                    removed,
                ))
            })
            .await?;
        if removed > 0 {
            self.purge(group).await;
        }
        Ok(removed)
    }

    async fn low_water(&self, group: &str) -> Result<u64, JournalError> {
        self.read(group, |log| {
            log.records.keys().next().map_or(log.low, |first| first - 1)
        })
        .await
    }

    async fn seal(&self, group: &str, seq: u64, outcome: &Outcome) -> Result<(), JournalError> {
        let (state, fingerprint) = match outcome {
            Outcome::Executed(fp) => (RecordState::Executed, fp.clone()),
            Outcome::Skipped => (RecordState::Skipped, None),
        };
        self.write(group, |log| {
            let r = log.records.get(&seq).ok_or_else(|| no_such(group, seq))?;
            if r.state.is_sealed() {
                if r.state == state && r.fingerprint == fingerprint {
                    return Ok(Plan::Done(()));
                }
                return Err(conflict(
                    group,
                    format!("record {seq} is already sealed {}", r.state.as_str()),
                ));
            }
            let entry = Entry::Seal {
                seq,
                state,
                fingerprint: fingerprint.clone(),
            };
            Ok(Plan::Publish(entry, Bytes::new(), ()))
        })
        .await
    }

    async fn restamp(
        &self,
        group: &str,
        seq: u64,
        epoch: u64,
        executor: &str,
    ) -> Result<(), JournalError> {
        self.write(group, |log| {
            let r = log.records.get(&seq).ok_or_else(|| no_such(group, seq))?;
            if r.state.is_sealed() {
                return Err(conflict(
                    group,
                    format!("record {seq} is sealed and cannot be restamped"),
                ));
            }
            let entry = Entry::Restamp {
                seq,
                epoch,
                executor: executor.to_owned(),
            };
            Ok(Plan::Publish(entry, Bytes::new(), ()))
        })
        .await
    }

    async fn read_after(
        &self,
        group: &str,
        after: u64,
        limit: u64,
    ) -> Result<Vec<Record>, JournalError> {
        let take = usize::try_from(limit).unwrap_or(usize::MAX);
        self.read(group, |log| {
            log.records
                .range(after.saturating_add(1)..)
                .take(take)
                .map(|(_, r)| r.clone())
                .collect()
        })
        .await
    }

    async fn record(&self, group: &str, seq: u64) -> Result<Option<Record>, JournalError> {
        self.read(group, |log| log.records.get(&seq).cloned()).await
    }

    fn seals_durable(&self) -> bool {
        true
    }

    fn record_limit(&self) -> Option<(usize, &'static str)> {
        (self.inner.max_payload > 0).then_some((self.inner.max_payload, MAX_PAYLOAD))
    }

    async fn flush(&self) -> Result<(), JournalError> {
        // Every write is stored when acknowledged; a fenced handle still hears that it is.
        self.check_lease().await
    }
}

#[async_trait]
impl RoleStore for NatsJournal {
    async fn role(&self, group: &str, primary: &str) -> Result<StoredRole, JournalError> {
        self.write(group, |log| {
            Ok(match &log.role {
                Some(role) => Plan::Done(role.clone()),
                None => {
                    let role = StoredRole {
                        epoch: 1,
                        primary: primary.to_owned(),
                    };
                    let entry = Entry::Role {
                        epoch: 1,
                        primary: primary.to_owned(),
                    };
                    Plan::Publish(entry, Bytes::new(), role)
                }
            })
        })
        .await
    }

    async fn set_role(
        &self,
        group: &str,
        expected_epoch: u64,
        role: &StoredRole,
    ) -> Result<(), JournalError> {
        self.write(group, |log| {
            let stored = log.role.as_ref().map(|r| r.epoch);
            if stored != Some(expected_epoch) || role.epoch <= expected_epoch {
                let stored = stored.map_or_else(|| "none".to_owned(), |e| e.to_string());
                return Err(conflict(
                    group,
                    format!(
                        "role at epoch {stored}, expected {expected_epoch} (new epoch {})",
                        role.epoch
                    ),
                ));
            }
            let entry = Entry::Role {
                epoch: role.epoch,
                primary: role.primary.clone(),
            };
            Ok(Plan::Publish(entry, Bytes::new(), ()))
        })
        .await
    }
}

#[async_trait]
impl Checkpoints for NatsJournal {
    async fn checkpoint(&self, group: &str, partition: &str) -> Result<u64, JournalError> {
        let key = Self::checkpoint_key("c", group, partition);
        let value =
            self.inner.checkpoints.get(key).await.map_err(|e| {
                unavailable(format!("{}: reading a checkpoint: {e}", self.inner.url))
            })?;
        Ok(value
            .and_then(|v| std::str::from_utf8(&v).ok()?.parse().ok())
            .unwrap_or(0))
    }

    async fn save_checkpoint(
        &self,
        group: &str,
        partition: &str,
        applied: u64,
    ) -> Result<(), JournalError> {
        self.check_lease().await?;
        let key = Self::checkpoint_key("c", group, partition);
        self.inner
            .checkpoints
            .put(key, Bytes::from(applied.to_string()))
            .await
            .map_err(|e| unavailable(format!("{}: saving a checkpoint: {e}", self.inner.url)))?;
        Ok(())
    }

    async fn diverged(&self, group: &str, partition: &str) -> Result<Option<String>, JournalError> {
        let key = Self::checkpoint_key("q", group, partition);
        let value =
            self.inner.checkpoints.get(key).await.map_err(|e| {
                unavailable(format!("{}: reading a quarantine: {e}", self.inner.url))
            })?;
        Ok(value.and_then(|v| serde_json::from_slice::<Option<String>>(&v).ok().flatten()))
    }

    async fn set_diverged(
        &self,
        group: &str,
        partition: &str,
        reason: Option<&str>,
    ) -> Result<(), JournalError> {
        self.check_lease().await?;
        let key = Self::checkpoint_key("q", group, partition);
        let value = serde_json::to_vec(&reason).unwrap_or_default();
        self.inner
            .checkpoints
            .put(key, Bytes::from(value))
            .await
            .map_err(|e| unavailable(format!("{}: saving a quarantine: {e}", self.inner.url)))?;
        Ok(())
    }
}

#[async_trait]
impl Membership for NatsJournal {
    async fn members(&self, group: &str) -> Result<Option<StoredMembers>, JournalError> {
        self.read(group, |log| log.members.clone()).await
    }

    async fn set_members(
        &self,
        group: &str,
        expected_version: u64,
        partitions: &[MemberSpec],
    ) -> Result<u64, JournalError> {
        self.write(group, |log| {
            if log.role.is_none() {
                return Err(conflict(group, "the group does not exist".to_owned()));
            }
            let stored = log.members.as_ref().map_or(0, |m| m.version);
            if stored != expected_version {
                return Err(conflict(
                    group,
                    format!("membership at version {stored}, expected {expected_version}"),
                ));
            }
            let version = stored + 1;
            let entry = Entry::Members {
                version,
                partitions: partitions.to_vec(),
            };
            Ok(Plan::Publish(entry, Bytes::new(), version))
        })
        .await
    }
}

#[async_trait]
impl Lease for NatsJournal {
    async fn claim(&self, owner: &Owner, ttl: Duration) -> Result<u64, JournalError> {
        let ttl_ms = u64::try_from(ttl.as_millis()).unwrap_or(u64::MAX / 4);
        let store = &self.inner.lease;
        let mut holder = String::new();
        for _ in 0..LEASE_ATTEMPTS {
            let mine = LeaseOwner {
                id: owner.id.clone(),
                describe: owner.describe.clone(),
            };
            match self.lease_entry().await? {
                None => {
                    let value = LeaseValue {
                        owner: Some(mine),
                        token: 1,
                        ttl_ms,
                    };
                    match store.create(OWNER_KEY, Self::encode_lease(&value)).await {
                        Ok(_) => {
                            self.set_claim(1, &owner.describe);
                            return Ok(1);
                        }
                        Err(e) if e.kind() == kv::CreateErrorKind::AlreadyExists => continue,
                        Err(e) => {
                            return Err(unavailable(format!(
                                "{}: claiming the lease: {e}",
                                self.inner.url
                            )));
                        }
                    }
                }
                Some((entry, value)) => {
                    if let Some(o) = &value.owner
                        && o.id != owner.id
                        && self.remaining_ms(&entry, &value).await? > 0
                    {
                        return Err(JournalError::Fenced {
                            holder: o.describe.clone(),
                        });
                    }
                    if let Some(o) = &value.owner {
                        holder.clone_from(&o.describe);
                    }
                    let token = value.token + 1;
                    let next = LeaseValue {
                        owner: Some(mine),
                        token,
                        ttl_ms,
                    };
                    match store
                        .update(OWNER_KEY, Self::encode_lease(&next), entry.revision)
                        .await
                    {
                        Ok(_) => {
                            self.set_claim(token, &owner.describe);
                            return Ok(token);
                        }
                        Err(e) if e.kind() == kv::UpdateErrorKind::WrongLastRevision => continue,
                        Err(e) => {
                            return Err(unavailable(format!(
                                "{}: claiming the lease: {e}",
                                self.inner.url
                            )));
                        }
                    }
                }
            }
        }
        Err(JournalError::Fenced { holder })
    }

    async fn renew(&self, ttl: Duration) -> Result<(), JournalError> {
        let ttl_ms = u64::try_from(ttl.as_millis()).unwrap_or(u64::MAX / 4);
        let mine = self.my_token();
        for _ in 0..LEASE_ATTEMPTS {
            let Some((entry, value)) = self.lease_entry().await? else {
                return Err(JournalError::Fenced {
                    holder: RELEASED.to_owned(),
                });
            };
            match &value.owner {
                None => {
                    return Err(JournalError::Fenced {
                        holder: RELEASED.to_owned(),
                    });
                }
                Some(o) if value.token != mine => {
                    return Err(JournalError::Fenced {
                        holder: o.describe.clone(),
                    });
                }
                Some(_) => {}
            }
            let next = LeaseValue { ttl_ms, ..value };
            match self
                .inner
                .lease
                .update(OWNER_KEY, Self::encode_lease(&next), entry.revision)
                .await
            {
                Ok(_) => return Ok(()),
                Err(e) if e.kind() == kv::UpdateErrorKind::WrongLastRevision => continue,
                Err(e) => {
                    return Err(unavailable(format!(
                        "{}: renewing the lease: {e}",
                        self.inner.url
                    )));
                }
            }
        }
        Err(unavailable(format!(
            "{}: renewing the lease: the lease kept changing",
            self.inner.url
        )))
    }

    async fn release(&self) -> Result<(), JournalError> {
        let mine = self.my_token();
        for _ in 0..LEASE_ATTEMPTS {
            let Some((entry, value)) = self.lease_entry().await? else {
                return Ok(());
            };
            if value.owner.is_none() || value.token != mine {
                return Ok(());
            }
            let next = LeaseValue {
                owner: None,
                token: value.token,
                ttl_ms: 0,
            };
            match self
                .inner
                .lease
                .update(OWNER_KEY, Self::encode_lease(&next), entry.revision)
                .await
            {
                Ok(_) => return Ok(()),
                Err(e) if e.kind() == kv::UpdateErrorKind::WrongLastRevision => continue,
                Err(e) => {
                    return Err(unavailable(format!(
                        "{}: releasing the lease: {e}",
                        self.inner.url
                    )));
                }
            }
        }
        Err(unavailable(format!(
            "{}: releasing the lease: the lease kept changing",
            self.inner.url
        )))
    }

    async fn owner(&self) -> Result<Option<OwnerInfo>, JournalError> {
        let Some((entry, value)) = self.lease_entry().await? else {
            return Ok(None);
        };
        let Some(o) = &value.owner else {
            return Ok(None);
        };
        Ok(Some(OwnerInfo {
            id: o.id.clone(),
            describe: o.describe.clone(),
            token: value.token,
            remaining_ms: self.remaining_ms(&entry, &value).await?,
        }))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Serialized updates on the journal alone, NATS beside SQLite in the same run: 2,000
    /// appends each followed by its seal (as the update path does them) on the local NATS
    /// server (`REGROUP_COST_NATS`, default `nats://127.0.0.1:4222`; a prefix of its own,
    /// deleted after) and on a SQLite file with its durable defaults.
    /// `cargo test -p regroup-replay --release --lib -- --ignored nats_vs_sqlite_cost --nocapture`
    #[tokio::test]
    #[ignore = "a measurement, not a check"]
    #[allow(clippy::unwrap_used)]
    async fn nats_vs_sqlite_cost() {
        use crate::journal::{Journal, SqlJournal};

        async fn cost<J: Journal>(j: &J, n: u64) -> Duration {
            let owner = Owner {
                id: Uuid::now_v7().to_string(),
                describe: "cost loop".into(),
            };
            j.claim(&owner, Duration::from_secs(60)).await.unwrap();
            let group = format!("cost{:x}", rand::random::<u32>());
            let request = RecordedRequest {
                method: "POST".into(),
                uri: "/transfers".into(),
                headers: vec![("content-type".into(), "application/json".into())],
                body: Bytes::from_static(br#"{"from":1,"to":2,"amount":1}"#),
            };
            j.open_log(&group).await.unwrap();
            let started = std::time::Instant::now();
            for seq in 1..=n {
                j.append(&Record::pending(&group, seq, 1, request.clone()))
                    .await
                    .unwrap();
                // The update path makes the record durable before it forwards it.
                if !j.appends_durable() {
                    j.flush().await.unwrap();
                }
                j.seal(&group, seq, &Outcome::Executed(None)).await.unwrap();
            }
            let took = started.elapsed();
            j.release().await.unwrap();
            took
        }

        let n = 2000u64;
        let per = |d: Duration| d.as_secs_f64() * 1e6 / n as f64;
        let url = std::env::var("REGROUP_COST_NATS")
            .unwrap_or_else(|_| "nats://127.0.0.1:4222".to_owned());
        let prefix = format!("COST{:X}", rand::random::<u32>());
        let nats = NatsJournal::connect_with_prefix(&url, &prefix)
            .await
            .unwrap();
        let dir = tempfile::tempdir().unwrap();
        let sqlite =
            SqlJournal::connect(&format!("sqlite://{}", dir.path().join("j.db").display()))
                .await
                .unwrap();
        // Alternated, so both see the same machine.
        let mut rounds = Vec::new();
        for _ in 0..3 {
            rounds.push((per(cost(&nats, n).await), per(cost(&sqlite, n).await)));
        }
        nats.delete_all().await.unwrap();
        for (i, (a, b)) in rounds.iter().enumerate() {
            println!(
                "round {}: {url} ({} replica(s)): {a:.0} us per update; SQLite: {b:.0} us per update",
                i + 1,
                nats.replicas()
            );
        }
    }

    #[test]
    fn passwords_are_redacted_in_every_server() {
        assert_eq!(
            redact("nats://u:secret@h1:4222,nats://v:pw@h2:4222,h3:4222"),
            "nats://u:***@h1:4222,nats://v:***@h2:4222,h3:4222"
        );
        assert_eq!(redact("nats://h:4222"), "nats://h:4222");
    }

    #[test]
    fn urls_name_every_server() {
        let (s, prefix) =
            parse_url("nats://127.0.0.1:4222,127.0.0.1:4223, nats://127.0.0.1:4224?prefix=P1")
                .expect("three servers");
        assert_eq!((s.len(), prefix.as_deref()), (3, Some("P1")));
        assert!(parse_url("postgres://x").is_err());
        assert!(parse_url("nats://").is_err());
        assert!(parse_url("nats://h:1?replicas=2").is_err());
    }

    #[test]
    fn entries_keep_their_body() {
        let entry = Entry::Seal {
            seq: 3,
            state: RecordState::Executed,
            fingerprint: None,
        };
        let body = Bytes::from_static(b"a\nb\0");
        let encoded = encode_entry(&entry, &body).expect("encodes");
        let (back, got) = decode_entry(&encoded).expect("decodes");
        assert!(matches!(back, Entry::Seal { seq: 3, .. }));
        assert_eq!(got, body);
    }
}
