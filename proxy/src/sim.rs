//! The deterministic simulation of a group's core: the real sequencer, settlement,
//! hand-over, supervision and replayers, with simulated partitions behind the
//! [`PartitionLink`] seam, the in-memory journal (with injected write errors and lost
//! acknowledgements), concurrent clients, and tokio's paused clock. A seeded schedule of
//! faults (crash and restart, freeze, slow answers, answers lost after the work was done,
//! refused connections, a partition restored to an older copy, proxy crash and restart on
//! the same journal, planned promote and drain) runs against it; afterwards every guarantee
//! is checked. A failing seed prints itself; `REGROUP_SIM_SEED=N` replays it, and
//! `REGROUP_SIM_SEEDS=100000` runs more (see the README).

use std::collections::{BTreeMap, BTreeSet};
use std::sync::atomic::{AtomicBool, AtomicU32, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use bytes::Bytes;
use http::Request;
use http_body_util::Full;
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;
use regroup_replay::headers::Behind;
use regroup_replay::{
    Checkpoints, Fingerprint, JournalError, Lease, Log, LogState, MemoryJournal, Outcome, Owner,
    OwnerInfo, Position, Record, RecordState, RoleStore, StoredRole,
};
use sha2::{Digest, Sha256};
use tokio::time::Instant;

use crate::config::Config;
use crate::group::Group;
use crate::link::{Answer, PartitionLink, SendError, Snapshot, SnapshotError};
use crate::partition::Partition;
use crate::status::PartitionStatus;

/// The simulated application: its state is the hash chain of the transactions it applied,
/// and every answer depends on that state, so a copy that applied anything twice, skipped
/// or reordered answers differently from then on.
#[derive(Debug, Clone, Default)]
struct Copy {
    /// The transactions it executed, in order: (seq, txn id).
    executed: Vec<(u64, String)>,
    /// The chain hash of `executed`.
    state: [u8; 32],
    /// Keyed runs: the chain hash of the transactions that touched each key (a barrier
    /// touches all of [`SIM_KEYS`]), so records with no key in common commute.
    chains: BTreeMap<&'static str, [u8; 32]>,
    /// The app layer's exactly-once record: seq → (txn id, answer body).
    record: BTreeMap<u64, (String, Bytes)>,
    /// The epoch each recorded seq was delivered in.
    epochs: BTreeMap<u64, u64>,
    /// The sender's floor of each record taken out of seq order (parallel replay).
    floors: BTreeMap<u64, u64>,
    /// The app layer's fence: the highest epoch accepted.
    fence: u64,
}

/// The keys of keyed runs' updates (`x-key`); an update without one is a barrier.
const SIM_KEYS: [&str; 4] = ["0", "1", "2", "3"];

fn chain(h: [u8; 32], txn: &str) -> [u8; 32] {
    let mut d = Sha256::new();
    d.update(h);
    d.update(txn.as_bytes());
    d.finalize().into()
}

impl Copy {
    /// Applies a transaction: in a keyed run (`key` Some) only the chains of its key (all
    /// of them for a barrier, `Some(None)`) move and the answer depends on those alone;
    /// otherwise the one chain of everything.
    fn apply(&mut self, seq: u64, txn: &str, key: Option<Option<&str>>) -> Bytes {
        self.executed.push((seq, txn.to_owned()));
        let Some(key) = key else {
            self.state = chain(self.state, txn);
            return Bytes::from(hex::encode(self.state));
        };
        let touched: Vec<&'static str> = match key {
            Some(k) => SIM_KEYS.iter().copied().filter(|s| *s == k).collect(),
            None => SIM_KEYS.to_vec(),
        };
        let mut answer = Sha256::new();
        for k in touched {
            let h = chain(self.chains.get(k).copied().unwrap_or_default(), txn);
            self.chains.insert(k, h);
            answer.update(h);
        }
        Bytes::from(hex::encode(answer.finalize()))
    }

    fn last_seq(&self) -> u64 {
        self.record.keys().next_back().copied().unwrap_or(0)
    }

    /// Where a sender resumes: the highest floor among the newest records (a record taken
    /// in seq order stands for itself), as the layer's `resume`.
    fn resume(&self) -> u64 {
        self.record
            .keys()
            .rev()
            .take(256)
            .map(|seq| self.floors.get(seq).copied().unwrap_or(*seq))
            .max()
            .unwrap_or(0)
    }
}

/// The `x-key` of a record's request, if any.
fn sim_key(record: &Record) -> Option<&str> {
    match &record.payload {
        regroup_replay::Payload::Http(r) => r
            .headers
            .iter()
            .find(|(n, _)| n.eq_ignore_ascii_case("x-key"))
            .map(|(_, v)| v.as_str()),
        regroup_replay::Payload::Sql(_) => None,
    }
}

#[derive(Debug, Default)]
struct PState {
    down: bool,
    frozen: bool,
    slow: Duration,
    lose_answers: u32,
    copy: Copy,
    /// Older copies, for restores.
    backups: Vec<Copy>,
    /// Bumped on every crash: requests accepted before it are lost with the process.
    boot: u64,
    /// Whether the layer checked the first record since the last start for a gap.
    gap_checked: bool,
    /// The highest proxy term the layer has seen since the last start (in memory).
    term: u64,
    /// The highest seq whose request finished at the layer, recorded or not (pipelined
    /// records wait for their predecessor to finish).
    finished: u64,
    /// Every seq whose request finished at the layer (records sent in parallel wait for
    /// the ones they name).
    finished_set: std::collections::BTreeSet<u64>,
}

/// One simulated partition.
struct SimPartition {
    name: String,
    exactly_once: bool,
    state: Mutex<PState>,
}

impl SimPartition {
    fn lock(&self) -> std::sync::MutexGuard<'_, PState> {
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }
}

/// What the link saw: every answer a partition gave to a primary execution.
#[derive(Debug, Clone)]
struct Sent {
    partition: String,
    epoch: u64,
    seq: u64,
    fingerprint: Fingerprint,
}

/// The simulated network and partitions.
struct SimLink {
    partitions: Vec<Arc<SimPartition>>,
    sent: Mutex<Vec<Sent>>,
    /// Every snapshot taken, by the id its body carries.
    snapshots: Mutex<Vec<Copy>>,
    /// Records sent pipelined (right behind the one before them).
    pipelined: AtomicU32,
    /// Records sent in parallel (behind only those they conflict with).
    parallel: AtomicU32,
    /// Whether the run declares conflict keys (its app's answers depend on keys).
    keyed: bool,
}

impl SimLink {
    fn find(&self, name: &str) -> Option<Arc<SimPartition>> {
        self.partitions.iter().find(|p| p.name == name).cloned()
    }

    /// The partition behind a snapshot or restore request, once it is reachable.
    async fn snapshot_end(
        &self,
        partition: &Partition,
        timeout: Duration,
    ) -> Result<Arc<SimPartition>, SnapshotError> {
        let p = self
            .find(partition.name())
            .ok_or_else(|| SnapshotError::untouched("no such partition"))?;
        match tokio::time::timeout(timeout, SimLink::reachable(&p)).await {
            Ok(Ok(())) => Ok(p),
            Ok(Err(e)) => Err(SnapshotError::untouched(e.to_string())),
            Err(_) => Err(SnapshotError::untouched("time-out")),
        }
    }

    /// Waits while the partition is frozen; refused when it is down.
    async fn reachable(p: &SimPartition) -> Result<(), SendError> {
        loop {
            let (down, frozen, slow) = {
                let s = p.lock();
                (s.down, s.frozen, s.slow)
            };
            if down {
                return Err(SendError::NotSent("connection refused".into()));
            }
            if !frozen {
                tokio::time::sleep(Duration::from_micros(300) + slow).await;
                return Ok(());
            }
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
    }

    /// The app (with or without its layer) handles one record.
    #[allow(clippy::too_many_arguments)]
    fn handle(
        keyed: bool,
        p: &SimPartition,
        record: &Record,
        replay: bool,
        term: u64,
        prev: Option<u64>,
        parallel: Option<(&[u64], u64)>,
    ) -> (u16, Bytes) {
        let mut s = p.lock();
        let txn = record.txn_id.to_string();
        let _ = replay;
        let key = keyed.then(|| sim_key(record));
        if p.exactly_once {
            let last = s.copy.last_seq();
            if let Some((after, floor)) = parallel {
                // Parallel replay: until a record passes after a start, a floor above where
                // the copy is dense means it may stand behind (restored); later it may be
                // records the journal skipped. Each record named must be recorded (a
                // re-delivery is answered anyway).
                if !s.gap_checked {
                    let resume = s.copy.resume();
                    if last > 0 && floor > resume {
                        return (409, Bytes::from(format!("behind {resume}")));
                    }
                    s.gap_checked = true;
                }
                if !s.copy.record.contains_key(&record.seq)
                    && after.iter().any(|d| !s.copy.record.contains_key(d))
                {
                    return (409, Bytes::from(format!("out_of_order {last}")));
                }
            } else {
                // The layer's gap check: the first record after a start only.
                if !s.gap_checked {
                    s.gap_checked = true;
                    if last > 0 && record.seq > last + 1 {
                        return (409, Bytes::from(format!("behind {last}")));
                    }
                }
                // The layer's contiguity check: only right after the record the sender
                // last delivered, unless it is a re-delivery.
                if let Some(prev) = prev
                    && last != prev
                    && !s.copy.record.contains_key(&record.seq)
                {
                    return if last < prev {
                        (409, Bytes::from(format!("behind {last}")))
                    } else {
                        (409, Bytes::from(format!("out_of_order {last}")))
                    };
                }
            }
            // The layer's term fence: a proxy that was taken over is refused.
            if term < s.term {
                return (409, Bytes::from(format!("deposed {}", s.term)));
            }
            s.term = term;
            if let Some((t, answer)) = s.copy.record.get(&record.seq) {
                if *t == txn {
                    return (200, answer.clone());
                }
                return (409, Bytes::from_static(b"seq conflict"));
            }
            // Out of seq order only the records below it fence it (epochs never go down
            // along seqs); in order, the highest epoch seen.
            let fence = if parallel.is_some() {
                s.copy
                    .epochs
                    .range(..record.seq)
                    .next_back()
                    .map_or(0, |(_, e)| *e)
            } else {
                s.copy.fence
            };
            if record.epoch < fence {
                return (409, Bytes::from_static(b"fenced"));
            }
            s.copy.fence = s.copy.fence.max(record.epoch);
            let answer = s.copy.apply(record.seq, &txn, key);
            s.copy.record.insert(record.seq, (txn, answer.clone()));
            s.copy.epochs.insert(record.seq, record.epoch);
            if let Some((_, floor)) = parallel {
                s.copy.floors.insert(record.seq, floor);
            }
            (200, answer)
        } else {
            (200, s.copy.apply(record.seq, &txn, key))
        }
    }
}

#[async_trait::async_trait]
impl PartitionLink for SimLink {
    async fn send(
        &self,
        partition: &Partition,
        record: &Record,
        replay: bool,
        timeout: Duration,
    ) -> Result<Answer, SendError> {
        self.send_as(0, partition, record, replay, None, timeout)
            .await
    }

    fn pipelines(&self) -> bool {
        true
    }

    async fn send_pipelined(
        &self,
        partition: &Partition,
        record: &Record,
        replay: bool,
        behind: Behind<'_>,
        timeout: Duration,
    ) -> Result<Answer, SendError> {
        self.send_as(0, partition, record, replay, Some(behind), timeout)
            .await
    }

    async fn health(
        &self,
        partition: &Partition,
        _path: &str,
        timeout: Duration,
    ) -> Result<(), String> {
        let p = self.find(partition.name()).ok_or("no such partition")?;
        match tokio::time::timeout(timeout, SimLink::reachable(&p)).await {
            Ok(Ok(())) => Ok(()),
            Ok(Err(e)) => Err(e.to_string()),
            Err(_) => Err("time-out".into()),
        }
    }

    async fn position(
        &self,
        partition: &Partition,
        timeout: Duration,
    ) -> Result<Option<Position>, SendError> {
        let p = self
            .find(partition.name())
            .ok_or_else(|| SendError::NotSent("no such partition".into()))?;
        match tokio::time::timeout(timeout, SimLink::reachable(&p)).await {
            Ok(Ok(())) => Ok(p.exactly_once.then(|| {
                let s = p.lock();
                Position {
                    applied: s.copy.last_seq(),
                    resume: Some(s.copy.resume()),
                }
            })),
            Ok(Err(e)) => Err(e),
            Err(_) => Err(SendError::Unknown("time-out".into())),
        }
    }

    async fn restore_ready(
        &self,
        target: &Partition,
        timeout: Duration,
    ) -> Result<(), SnapshotError> {
        let p = self.snapshot_end(target, timeout).await?;
        if !p.exactly_once {
            return Err(SnapshotError::untouched(
                "the target answered 404 to the restore",
            ));
        }
        Ok(())
    }

    async fn snapshot(
        &self,
        source: &Partition,
        timeout: Duration,
    ) -> Result<Snapshot, SnapshotError> {
        let p = self.snapshot_end(source, timeout).await?;
        if !p.exactly_once {
            return Err(SnapshotError::untouched(
                "the source answered 404 to the snapshot",
            ));
        }
        // The snapshot is a copy of its database, taken in one transaction; the body names
        // it in the link's store of snapshots.
        let copy = p.lock().copy.clone();
        let (seq, epoch) = (copy.resume(), copy.fence);
        let mut snapshots = lock(&self.snapshots);
        snapshots.push(copy);
        let id = snapshots.len() - 1;
        Ok(Snapshot {
            seq,
            epoch,
            format: http::HeaderValue::from_static("sim"),
            body: crate::forward::full(Bytes::from(id.to_string())),
        })
    }

    async fn restore(
        &self,
        target: &Partition,
        snapshot: Snapshot,
        progress: crate::link::Progress,
        timeout: Duration,
    ) -> Result<Option<u64>, SnapshotError> {
        let p = self.snapshot_end(target, timeout).await?;
        if !p.exactly_once {
            return Err(SnapshotError::untouched(
                "the target answered 404 to the restore",
            ));
        }
        let body = http_body_util::BodyExt::collect(snapshot.body)
            .await
            .map_err(|e| SnapshotError::untouched(e.to_string()))?
            .to_bytes();
        progress(u64::try_from(body.len()).unwrap_or(0));
        let copy = std::str::from_utf8(&body)
            .ok()
            .and_then(|id| id.parse::<usize>().ok())
            .and_then(|id| lock(&self.snapshots).get(id).cloned())
            .ok_or_else(|| SnapshotError::untouched("the target cannot read the snapshot"))?;
        let seq = copy.resume();
        // Replaced in one transaction: its database is the snapshot's from now on.
        p.lock().copy = copy;
        Ok(Some(seq))
    }
}

impl SimLink {
    /// Sends `record` as a proxy of term `term` would (0: none); pipelined in the place `via`
    /// gives when set (right behind one record, or in parallel: the layer waits, bounded,
    /// for the records it follows).
    async fn send_as(
        &self,
        term: u64,
        partition: &Partition,
        record: &Record,
        replay: bool,
        via: Option<Behind<'_>>,
        timeout: Duration,
    ) -> Result<Answer, SendError> {
        let p = self
            .find(partition.name())
            .ok_or_else(|| SendError::NotSent("no such partition".into()))?;
        SimLink::reachable(&p).await?;
        // The request is on the wire: the partition handles it even if the proxy stops
        // waiting (a frozen process resumes and executes it), unless it crashes first.
        let boot = p.lock().boot;
        let (behind, parallel) = match via {
            None => (None, None),
            Some(Behind::Prev(prev)) => (Some(prev), None),
            Some(Behind::After { after, floor }) => (None, Some((after.to_vec(), floor))),
        };
        if behind.is_some() {
            self.pipelined.fetch_add(1, Ordering::AcqRel);
        }
        if parallel.is_some() {
            self.parallel.fetch_add(1, Ordering::AcqRel);
        }
        let prev = if parallel.is_some() {
            None
        } else {
            behind.or_else(|| partition.delivered())
        };
        let (tx, rx) = tokio::sync::oneshot::channel();
        let sent_record = record.clone();
        let this = p.clone();
        let keyed = self.keyed;
        tokio::spawn(async move {
            let r = match SimLink::reachable(&this).await {
                Err(_) => Err(SendError::Unknown("connection reset".into())),
                Ok(()) if this.lock().boot != boot => {
                    Err(SendError::Unknown("connection reset".into()))
                }
                Ok(()) => {
                    if keyed {
                        // Requests on their way at once reach the app in an order of
                        // their own (a fixed draw from the record and the partition), so
                        // records sent in parallel run out of seq order unless they wait.
                        let mut d = Sha256::new();
                        d.update(sent_record.seq.to_le_bytes());
                        d.update(this.name.as_bytes());
                        let jitter = u64::from(d.finalize()[0]) * 12;
                        tokio::time::sleep(Duration::from_micros(jitter)).await;
                    }
                    if behind.is_some() || parallel.is_some() {
                        // The layer waits, bounded, for the records it follows to finish.
                        let until =
                            Instant::now() + regroup_replay::layer::DEFAULT_PREDECESSOR_WAIT;
                        while Instant::now() < until {
                            let ready = {
                                let s = this.lock();
                                let followed = match (&behind, &parallel) {
                                    (Some(prev), _) => {
                                        s.copy.last_seq() >= *prev || s.finished >= *prev
                                    }
                                    (None, Some((after, _))) => after.iter().all(|d| {
                                        s.copy.record.contains_key(d) || s.finished_set.contains(d)
                                    }),
                                    (None, None) => true,
                                };
                                s.boot != boot || !this.exactly_once || followed
                            };
                            if ready {
                                break;
                            }
                            tokio::time::sleep(Duration::from_millis(1)).await;
                        }
                    }
                    let rebooted = this.lock().boot != boot;
                    let (status, body) = if rebooted {
                        (0, Bytes::new())
                    } else {
                        let parallel = parallel.as_ref().map(|(a, f)| (a.as_slice(), *f));
                        SimLink::handle(keyed, &this, &sent_record, replay, term, prev, parallel)
                    };
                    let mut s = this.lock();
                    s.finished = s.finished.max(sent_record.seq);
                    s.finished_set.insert(sent_record.seq);
                    if status == 0 {
                        return drop(tx.send(Err(SendError::Unknown("connection reset".into()))));
                    }
                    if s.lose_answers > 0 {
                        s.lose_answers -= 1;
                        Err(SendError::Unknown("connection reset after the work".into()))
                    } else {
                        Ok((status, body))
                    }
                }
            };
            let _ = tx.send(r);
        });
        let (status, body) = match tokio::time::timeout(timeout, rx).await {
            Ok(Ok(r)) => r?,
            Ok(Err(_)) => return Err(SendError::Unknown("partition task gone".into())),
            Err(_) => return Err(SendError::Unknown("time-out".into())),
        };
        if let Some(at) = std::str::from_utf8(&body)
            .ok()
            .and_then(|b| b.strip_prefix("behind "))
            .and_then(|n| n.parse::<u64>().ok())
        {
            return Err(SendError::Behind(at));
        }
        if let Some(at) = std::str::from_utf8(&body)
            .ok()
            .and_then(|b| b.strip_prefix("out_of_order "))
        {
            return Err(SendError::NotSent(format!(
                "refused: the partition stands at {at}, past this proxy's idea of it"
            )));
        }
        if let Some(seen) = std::str::from_utf8(&body)
            .ok()
            .and_then(|b| b.strip_prefix("deposed "))
        {
            return Err(SendError::NotSent(format!(
                "refused: the partition has seen proxy term {seen}, this one's is {term}"
            )));
        }
        if p.exactly_once {
            // Its layer's Regroup-Applied on the answer.
            partition.note_delivered(p.lock().copy.last_seq());
        }
        if !replay {
            self.sent
                .lock()
                .unwrap_or_else(|p| p.into_inner())
                .push(Sent {
                    partition: partition.name().to_owned(),
                    epoch: record.epoch,
                    seq: record.seq,
                    fingerprint: Fingerprint::of(status, &body),
                });
        }
        let mut parts = http::Response::new(()).into_parts().0;
        parts.status = http::StatusCode::from_u16(status).unwrap_or(http::StatusCode::OK);
        Ok(Answer { parts, body })
    }
}

/// One proxy core's way to its partitions: the shared simulated link, paused while that
/// core is frozen (a request already on the wire is handled by the partition anyway).
struct CoreLink {
    inner: Arc<SimLink>,
    frozen: Arc<AtomicBool>,
    /// The core's term: the fencing token of its claim.
    term: u64,
}

#[async_trait::async_trait]
impl PartitionLink for CoreLink {
    async fn send(
        &self,
        partition: &Partition,
        record: &Record,
        replay: bool,
        timeout: Duration,
    ) -> Result<Answer, SendError> {
        pause(&self.frozen).await;
        self.inner
            .send_as(self.term, partition, record, replay, None, timeout)
            .await
    }

    fn pipelines(&self) -> bool {
        true
    }

    async fn send_pipelined(
        &self,
        partition: &Partition,
        record: &Record,
        replay: bool,
        behind: Behind<'_>,
        timeout: Duration,
    ) -> Result<Answer, SendError> {
        pause(&self.frozen).await;
        self.inner
            .send_as(self.term, partition, record, replay, Some(behind), timeout)
            .await
    }

    async fn health(
        &self,
        partition: &Partition,
        path: &str,
        timeout: Duration,
    ) -> Result<(), String> {
        pause(&self.frozen).await;
        self.inner.health(partition, path, timeout).await
    }

    async fn position(
        &self,
        partition: &Partition,
        timeout: Duration,
    ) -> Result<Option<Position>, SendError> {
        pause(&self.frozen).await;
        self.inner.position(partition, timeout).await
    }

    async fn restore_ready(
        &self,
        target: &Partition,
        timeout: Duration,
    ) -> Result<(), SnapshotError> {
        pause(&self.frozen).await;
        self.inner.restore_ready(target, timeout).await
    }

    async fn snapshot(
        &self,
        source: &Partition,
        timeout: Duration,
    ) -> Result<Snapshot, SnapshotError> {
        pause(&self.frozen).await;
        self.inner.snapshot(source, timeout).await
    }

    async fn restore(
        &self,
        target: &Partition,
        snapshot: Snapshot,
        progress: crate::link::Progress,
        timeout: Duration,
    ) -> Result<Option<u64>, SnapshotError> {
        pause(&self.frozen).await;
        self.inner
            .restore(target, snapshot, progress, timeout)
            .await
    }
}

/// What every proxy incarnation of a run records for the checks.
#[derive(Default)]
struct Records {
    /// Every role set: epoch → primary.
    roles: Mutex<BTreeMap<u64, String>>,
    /// Every record retention truncated, as it was.
    truncated: Mutex<BTreeMap<u64, Record>>,
}

/// The journal faults the schedule injects, shared by every proxy incarnation.
#[derive(Default)]
struct JournalFaults {
    /// Writes to fail before they are done.
    fail: AtomicU32,
    /// Writes done whose acknowledgement is lost.
    lose_ack: AtomicU32,
    /// While set, the journal does not answer at all: every read and write of the log
    /// fails (a NATS stream electing a new leader, a database failing over).
    outage: AtomicBool,
    /// Appends that get no answer and land a while later, when nothing was appended
    /// meanwhile (a NATS publish sent again after a reconnect, refused by its expected
    /// sequence if anything came first).
    late: AtomicU32,
}

impl JournalFaults {
    /// Every fault lifted.
    fn clear(&self) {
        self.fail.store(0, Ordering::Release);
        self.lose_ack.store(0, Ordering::Release);
        self.outage.store(false, Ordering::Release);
        self.late.store(0, Ordering::Release);
    }
}

/// The in-memory journal with injected faults: a write failed before it is done, a write
/// done and its acknowledgement lost, an outage (nothing answers), an append that lands
/// late. Every role change is recorded for the checks.
struct FaultyJournal {
    inner: MemoryJournal,
    faults: Arc<JournalFaults>,
    roles: Arc<Records>,
    /// Seals wait for the next flush (`journal_sync = "append"`); flushes are counted.
    deferred: Option<Arc<AtomicU32>>,
    /// Flushes to fail (of a journal that defers its writes), apart from other writes.
    fail_flushes: Arc<AtomicU32>,
    /// While set, this proxy's process is frozen: every call waits (then goes on, late).
    frozen: Arc<AtomicBool>,
}

/// Waits while `frozen` is set (a frozen process does nothing until it resumes).
async fn pause(frozen: &AtomicBool) {
    while frozen.load(Ordering::Acquire) {
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
}

impl FaultyJournal {
    /// Before a read: an outage answers nothing.
    fn reachable(&self) -> Result<(), JournalError> {
        if self.faults.outage.load(Ordering::Acquire) {
            return Err(JournalError::unavailable("injected outage: no answer"));
        }
        Ok(())
    }

    fn before(&self) -> Result<(), JournalError> {
        self.reachable()?;
        if take(&self.faults.fail) {
            return Err(JournalError::unavailable("injected write error"));
        }
        Ok(())
    }

    fn after<T>(&self, r: Result<T, JournalError>) -> Result<T, JournalError> {
        if r.is_ok() && take(&self.faults.lose_ack) {
            return Err(JournalError::unavailable("injected lost acknowledgement"));
        }
        r
    }
}

fn take(n: &AtomicU32) -> bool {
    n.fetch_update(Ordering::AcqRel, Ordering::Acquire, |v| v.checked_sub(1))
        .is_ok()
}

#[async_trait::async_trait]
impl Log for FaultyJournal {
    async fn open_log(&self, group: &str) -> Result<LogState, JournalError> {
        pause(&self.frozen).await;
        self.inner.open_log(group).await
    }
    async fn append(&self, record: &Record) -> Result<(), JournalError> {
        pause(&self.frozen).await;
        self.before()?;
        if take(&self.faults.late) {
            // No answer now; it lands a while later if it is still next (the journal
            // refuses it otherwise, as NATS does by the expected sequence).
            let (inner, record) = (self.inner.clone(), record.clone());
            let delay = Duration::from_millis(1 + record.seq * 37 % 300);
            tokio::spawn(async move {
                tokio::time::sleep(delay).await;
                let _ = inner.append(&record).await;
            });
            return Err(JournalError::unavailable(
                "injected: no answer to an append",
            ));
        }
        let r = self.inner.append(record).await;
        self.after(r)
    }
    async fn seal(&self, group: &str, seq: u64, outcome: &Outcome) -> Result<(), JournalError> {
        pause(&self.frozen).await;
        self.before()?;
        let r = self.inner.seal(group, seq, outcome).await;
        self.after(r)
    }
    async fn restamp(
        &self,
        group: &str,
        seq: u64,
        epoch: u64,
        executor: &str,
    ) -> Result<(), JournalError> {
        pause(&self.frozen).await;
        self.before()?;
        let r = self.inner.restamp(group, seq, epoch, executor).await;
        self.after(r)
    }
    async fn read_after(
        &self,
        group: &str,
        after: u64,
        limit: u64,
    ) -> Result<Vec<Record>, JournalError> {
        pause(&self.frozen).await;
        self.reachable()?;
        self.inner.read_after(group, after, limit).await
    }
    async fn record(&self, group: &str, seq: u64) -> Result<Option<Record>, JournalError> {
        pause(&self.frozen).await;
        self.reachable()?;
        self.inner.record(group, seq).await
    }
    async fn truncate(&self, group: &str, through: u64) -> Result<u64, JournalError> {
        pause(&self.frozen).await;
        self.before()?;
        // Kept for the checks, as they were: they are gone from the journal after this.
        let going = self.inner.read_after(group, 0, through).await?;
        let r = self.inner.truncate(group, through).await;
        if r.is_ok() {
            let mut truncated = lock(&self.roles.truncated);
            for record in going.into_iter().filter(|r| r.seq <= through) {
                truncated.insert(record.seq, record);
            }
        }
        self.after(r)
    }
    async fn low_water(&self, group: &str) -> Result<u64, JournalError> {
        pause(&self.frozen).await;
        self.reachable()?;
        self.inner.low_water(group).await
    }
    fn seals_durable(&self) -> bool {
        self.deferred.is_none() && self.inner.seals_durable()
    }
    fn appends_durable(&self) -> bool {
        self.inner.appends_durable()
    }
    async fn flush(&self) -> Result<(), JournalError> {
        pause(&self.frozen).await;
        self.reachable()?;
        if let Some(flushes) = &self.deferred {
            flushes.fetch_add(1, Ordering::AcqRel);
        }
        if self.inner.appends_durable() {
            return Ok(());
        }
        // A journal that defers writes (`overlap`): its flush can fail like any write.
        if take(&self.fail_flushes) {
            return Err(JournalError::unavailable("injected flush error"));
        }
        self.before()?;
        let r = self.inner.flush().await;
        self.after(r)
    }
}

#[async_trait::async_trait]
impl RoleStore for FaultyJournal {
    async fn role(&self, group: &str, primary: &str) -> Result<StoredRole, JournalError> {
        pause(&self.frozen).await;
        self.inner.role(group, primary).await
    }
    async fn set_role(
        &self,
        group: &str,
        expected_epoch: u64,
        role: &StoredRole,
    ) -> Result<(), JournalError> {
        pause(&self.frozen).await;
        self.before()?;
        let r = self.inner.set_role(group, expected_epoch, role).await;
        if r.is_ok() {
            self.roles
                .roles
                .lock()
                .unwrap_or_else(|p| p.into_inner())
                .insert(role.epoch, role.primary.clone());
        }
        self.after(r)
    }
}

#[async_trait::async_trait]
impl Checkpoints for FaultyJournal {
    async fn checkpoint(&self, group: &str, partition: &str) -> Result<u64, JournalError> {
        pause(&self.frozen).await;
        self.inner.checkpoint(group, partition).await
    }
    async fn save_checkpoint(
        &self,
        group: &str,
        partition: &str,
        applied: u64,
    ) -> Result<(), JournalError> {
        pause(&self.frozen).await;
        self.before()?;
        let r = self.inner.save_checkpoint(group, partition, applied).await;
        self.after(r)
    }
    async fn diverged(&self, group: &str, partition: &str) -> Result<Option<String>, JournalError> {
        pause(&self.frozen).await;
        self.inner.diverged(group, partition).await
    }
    async fn set_diverged(
        &self,
        group: &str,
        partition: &str,
        reason: Option<&str>,
    ) -> Result<(), JournalError> {
        pause(&self.frozen).await;
        self.inner.set_diverged(group, partition, reason).await
    }
}

#[async_trait::async_trait]
impl regroup_replay::Membership for FaultyJournal {
    async fn members(
        &self,
        group: &str,
    ) -> Result<Option<regroup_replay::StoredMembers>, JournalError> {
        pause(&self.frozen).await;
        self.inner.members(group).await
    }

    async fn set_members(
        &self,
        group: &str,
        expected_version: u64,
        partitions: &[regroup_replay::MemberSpec],
    ) -> Result<u64, JournalError> {
        pause(&self.frozen).await;
        self.before()?;
        let r = self
            .inner
            .set_members(group, expected_version, partitions)
            .await;
        self.after(r)
    }
}

#[async_trait::async_trait]
impl Lease for FaultyJournal {
    async fn claim(&self, owner: &Owner, ttl: Duration) -> Result<u64, JournalError> {
        pause(&self.frozen).await;
        self.inner.claim(owner, ttl).await
    }
    async fn renew(&self, ttl: Duration) -> Result<(), JournalError> {
        pause(&self.frozen).await;
        self.inner.renew(ttl).await
    }
    async fn release(&self) -> Result<(), JournalError> {
        pause(&self.frozen).await;
        self.inner.release().await
    }
    async fn owner(&self) -> Result<Option<OwnerInfo>, JournalError> {
        pause(&self.frozen).await;
        self.inner.owner().await
    }
}

/// What a run saw, for the checks.
#[derive(Debug, Default)]
struct Seen {
    /// Acknowledged updates: seq → the answer's fingerprint.
    acked: BTreeMap<u64, Fingerprint>,
    /// Reads served by a partition that should not serve them.
    bad_reads: Vec<String>,
    reads: u64,
}

const NAMES: [&str; 3] = ["a", "b", "c"];
const MAX_READ_LAG: u64 = 4;

/// A simulated partition's URL. The core reaches partitions through the simulated link;
/// what still goes over HTTP (a rebuild's snapshot and restore) finds a loopback port
/// that refuses at once, never a name to resolve.
fn sim_url(name: &str) -> String {
    let port = 1 + name
        .bytes()
        .fold(0u16, |a, b| a.wrapping_mul(31).wrapping_add(u16::from(b)))
        % 1000;
    format!("http://127.0.0.1:{port}")
}

fn config(seed: u64) -> crate::config::GroupConfig {
    let mut text = format!(
        "[[groups]]\nname = \"sim\"\nheartbeat_interval_ms = 50\nheartbeat_timeout_ms = 40\n\
         heartbeat_retries = 2\nfailover_wait_ms = 3000\nupdate_timeout_ms = 300\n\
         max_read_lag = {MAX_READ_LAG}\npipeline_window = {}\nreplay_window = {}\n",
        pipeline_window(seed),
        replay_window(seed)
    );
    if retains(seed) {
        // A short journal: a partition down for a while finds the records it needs
        // truncated and is rebuilt from a snapshot.
        text.push_str("retain_records = 8\n");
    }
    if keyed(seed) {
        text.push_str(
            "[[groups.conflict_keys]]\nmethod = \"POST\"\npath = \"/op\"\nkeys = [\"header:x-key\"]\n",
        );
    }
    for (i, n) in NAMES.iter().enumerate() {
        let priority = (seed as usize + i) % 3;
        let url = sim_url(n);
        text.push_str(&format!(
            "[[groups.partitions]]\nname = \"{n}\"\nurl = \"{url}\"\npriority = {priority}\n"
        ));
    }
    match Config::parse(&text, std::path::Path::new("sim.toml")) {
        Ok(mut c) => c.groups.remove(0),
        Err(e) => panic!("sim config: {e}"),
    }
}

/// The run's `pipeline_window`, drawn apart from the main schedule: one (each update sealed
/// before the next is sent) in a quarter of the runs, else 2 to 8.
fn pipeline_window(seed: u64) -> usize {
    let mut rng = ChaCha8Rng::seed_from_u64(seed ^ 0x0717_e11e);
    if rng.random_bool(0.25) {
        1
    } else {
        rng.random_range(2..=8)
    }
}

/// The run's `replay_window`, drawn apart from the main schedule: one (each replayed record
/// answered before the next is sent) in a quarter of the runs, else 2 to 8.
fn replay_window(seed: u64) -> usize {
    let mut rng = ChaCha8Rng::seed_from_u64(seed ^ 0x4e91_a7ed);
    if rng.random_bool(0.25) {
        1
    } else {
        rng.random_range(2..=8)
    }
}

/// How a copy's executed records differ from the journal's when only the order of records
/// sharing a key (or a barrier) counts: `None` when they agree.
fn differs_per_key(
    copy: &[(u64, String)],
    journal: &[(u64, String)],
    by_seq: &BTreeMap<u64, &Record>,
) -> Option<String> {
    let mut sorted = copy.to_vec();
    sorted.sort();
    if sorted != journal {
        return Some(format!(
            "{} applied vs {} executed, not the same records once each",
            copy.len(),
            journal.len()
        ));
    }
    for k in SIM_KEYS {
        // A record the journal does not hold counts under every key.
        let of_key = |list: &[(u64, String)]| -> Vec<u64> {
            list.iter()
                .filter(|(seq, _)| {
                    by_seq
                        .get(seq)
                        .is_none_or(|r| sim_key(r).is_none_or(|x| x == k))
                })
                .map(|(seq, _)| *seq)
                .collect()
        };
        let (mine, theirs) = (of_key(copy), of_key(journal));
        if mine != theirs {
            return Some(format!(
                "key {k}: applied in the order {mine:?}, the journal's is {theirs:?}"
            ));
        }
    }
    None
}

/// Whether the run of `seed` declares conflict keys (`x-key`): its replicas replay updates
/// with no key in common in parallel. Drawn apart from the main schedule; the regression
/// seeds keep the run they failed with.
fn keyed(seed: u64) -> bool {
    KEYED_REGRESSION_SEEDS.contains(&seed)
        || (!REGRESSION_SEEDS.contains(&seed)
            && ChaCha8Rng::seed_from_u64(seed ^ 0x6e7e_d001).random_bool(0.4))
}

/// Whether the run of `seed` keeps a short journal (retention), drawn apart from the main
/// schedule: only where every copy keeps the app layer, so every partition can give and
/// take snapshots (one that cannot, and needs truncated records, waits for an operator:
/// README). The regression seeds keep the whole journal they failed with.
fn retains(seed: u64) -> bool {
    !FULL_JOURNAL_SEEDS.contains(&seed)
        && every_copy_keeps_the_layer(seed)
        && ChaCha8Rng::seed_from_u64(seed ^ 0x004e_7a1a).random_bool(0.3)
}

/// Whether every copy of the run of `seed` keeps the app layer: the run's first draw.
fn every_copy_keeps_the_layer(seed: u64) -> bool {
    ChaCha8Rng::seed_from_u64(seed).random_bool(0.75)
}

/// The proxy: one incarnation of the group on its own journal handle.
struct Proxy {
    group: Arc<Group>,
    /// Its own handle on the journal.
    journal: MemoryJournal,
    /// Freezes this core (its journal calls and its partition requests wait).
    frozen: Arc<AtomicBool>,
}

async fn start_proxy(
    store: &MemoryJournal,
    faults: &Arc<JournalFaults>,
    roles: &Arc<Records>,
    link: &Arc<SimLink>,
    seed: u64,
    incarnation: u32,
) -> Result<Proxy, String> {
    let inner = store.handle();
    let owner = Owner {
        id: format!("proxy-{incarnation}"),
        describe: format!("proxy incarnation {incarnation}"),
    };
    // Every incarnation claims with a short lease that it never renews: the next one takes
    // over once it expired, and from then on the predecessor's late writes are fenced.
    tokio::time::sleep(Duration::from_millis(2)).await;
    let term = inner
        .claim(&owner, Duration::from_millis(1))
        .await
        .map_err(|e| e.to_string())?;
    let frozen = Arc::new(AtomicBool::new(false));
    let handle = inner.clone();
    let journal = Arc::new(FaultyJournal {
        inner,
        faults: faults.clone(),
        roles: roles.clone(),
        deferred: None,
        fail_flushes: Arc::default(),
        frozen: frozen.clone(),
    });
    let core_link = Arc::new(CoreLink {
        inner: link.clone(),
        frozen: frozen.clone(),
        term,
    });
    let group = Group::open(config(seed), journal, core_link)
        .await
        .map_err(|e| e.to_string())?;
    group.start().await;
    Ok(Proxy {
        group,
        journal: handle,
        frozen,
    })
}

/// Fault kinds, drawn by the schedule.
#[derive(Debug, Clone, Copy)]
enum Fault {
    Crash,
    Refuse,
    Freeze,
    Slow,
    LoseAnswer,
    Restore,
    ProxyRestart,
    JournalError,
    JournalLostAck,
    Promote,
    Drain,
}

const FAULTS: [Fault; 11] = [
    Fault::Crash,
    Fault::Refuse,
    Fault::Freeze,
    Fault::Slow,
    Fault::LoseAnswer,
    Fault::Restore,
    Fault::ProxyRestart,
    Fault::JournalError,
    Fault::JournalLostAck,
    Fault::Promote,
    Fault::Drain,
];

type Current = Arc<Mutex<Proxy>>;

fn current(c: &Current) -> Arc<Group> {
    c.lock().unwrap_or_else(|p| p.into_inner()).group.clone()
}

/// One client: a bounded mix of updates and reads against whichever proxy runs.
async fn client(id: u64, seed: u64, proxy: Current, link: Arc<SimLink>, seen: Arc<Mutex<Seen>>) {
    let mut rng = ChaCha8Rng::seed_from_u64(seed.wrapping_mul(31).wrapping_add(id));
    // Drawn apart from the schedule, so a seed's schedule is the same keyed or not.
    let mut keys = ChaCha8Rng::seed_from_u64(seed.wrapping_mul(31).wrapping_add(id) ^ 0x6b65_7973);
    for i in 0..25u32 {
        let group = current(&proxy);
        if rng.random_bool(0.3) {
            read(&group, &link, &seen, &mut rng);
        } else {
            // Keyed runs: most updates name one of a few keys, the rest are barriers.
            let key = keyed(seed)
                .then(|| {
                    keys.random_bool(0.85)
                        .then(|| SIM_KEYS[keys.random_range(0..4)])
                })
                .flatten();
            let _ = update_once(&group, format!("{id}-{i}"), key, &seen).await;
        }
        tokio::time::sleep(Duration::from_millis(rng.random_range(0..20))).await;
    }
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

/// A read, as the balancer would place it: on a partition the group has `available`. The
/// copy it lands on must be within the allowed lag and not quarantined.
fn read(group: &Group, link: &SimLink, seen: &Mutex<Seen>, rng: &mut ChaCha8Rng) {
    let members = group.members();
    let eligible: Vec<&Arc<Partition>> = members
        .iter()
        .filter(|p| p.status() == PartitionStatus::Available)
        .collect();
    if eligible.is_empty() {
        return;
    }
    let p = eligible[rng.random_range(0..eligible.len())];
    let Some(sim) = link.find(p.name()) else {
        return;
    };
    if sim.lock().down || sim.lock().frozen {
        // Refused or no answer: not served (the read path retries elsewhere).
        return;
    }
    // Where the copy stands: its last record; in a keyed run, where records with no key in
    // common may have run out of seq order, its highest (the final check holds every copy
    // to every record once, in order per key).
    let actual = {
        let s = sim.lock();
        if link.keyed {
            s.copy
                .executed
                .iter()
                .map(|(seq, _)| *seq)
                .max()
                .unwrap_or(0)
        } else {
            s.copy.executed.last().map_or(0, |(seq, _)| *seq)
        }
    };
    let sealed = group.sealed();
    let mut seen = lock(seen);
    seen.reads += 1;
    if p.diverged().is_some() {
        seen.bad_reads
            .push(format!("read served by quarantined {:?}", p.name()));
    } else if actual + MAX_READ_LAG < sealed {
        seen.bad_reads.push(format!(
            "read served by {:?} at {actual}, sealed head {sealed}",
            p.name()
        ));
    }
}

/// The fault schedule: a seeded list of faults, each applied and (for the lasting ones)
/// lifted after a while.
#[allow(clippy::too_many_arguments)]
async fn faults(
    seed: u64,
    deferred: bool,
    proxy: Current,
    link: Arc<SimLink>,
    store: MemoryJournal,
    journal_faults: Arc<JournalFaults>,
    roles: Arc<Records>,
    log: Arc<Mutex<Vec<String>>>,
    incarnations: Arc<AtomicU32>,
) -> Result<(), String> {
    let mut rng = ChaCha8Rng::seed_from_u64(seed ^ 0x5eed);
    let mut power = ChaCha8Rng::seed_from_u64(seed ^ 0x9051);
    for _ in 0..rng.random_range(3..9) {
        tokio::time::sleep(Duration::from_millis(rng.random_range(50..600))).await;
        let fault = FAULTS[rng.random_range(0..FAULTS.len())];
        let p = link.partitions[rng.random_range(0..link.partitions.len())].clone();
        let lasting = Duration::from_millis(rng.random_range(20..700));
        lock(&log).push(format!("{:?} {} for {lasting:?}", fault, p.name));
        match fault {
            Fault::Crash | Fault::Refuse => {
                {
                    let mut s = p.lock();
                    s.down = true;
                    if matches!(fault, Fault::Crash) {
                        s.boot += 1;
                        s.term = 0;
                        s.gap_checked = false;
                    }
                }
                tokio::time::sleep(lasting).await;
                p.lock().down = false;
            }
            Fault::Freeze => {
                p.lock().frozen = true;
                tokio::time::sleep(lasting).await;
                p.lock().frozen = false;
            }
            Fault::Slow => {
                p.lock().slow = Duration::from_millis(rng.random_range(5..400));
                tokio::time::sleep(lasting).await;
                p.lock().slow = Duration::ZERO;
            }
            Fault::LoseAnswer => p.lock().lose_answers += 1,
            Fault::Restore => {
                // Stop it, put back an older copy of its database, start it. Without the
                // app layer a partition cannot say where it stands (README): not simulated.
                if !p.exactly_once {
                    continue;
                }
                {
                    let mut s = p.lock();
                    s.down = true;
                    s.boot += 1;
                    s.term = 0;
                    s.gap_checked = false;
                    if !s.backups.is_empty() {
                        let i = rng.random_range(0..s.backups.len());
                        s.copy = s.backups[i].clone();
                    }
                }
                tokio::time::sleep(lasting.max(Duration::from_millis(120))).await;
                p.lock().down = false;
            }
            Fault::ProxyRestart => {
                let old = current(&proxy);
                old.stop();
                if deferred && power.random_bool(0.5) {
                    // The journal's host lost power with the proxy: the process is gone
                    // (nothing it still had running writes again), and what it had not
                    // made durable is gone.
                    lock(&proxy).journal.lose_process();
                    store.power_loss();
                    lock(&log).push("PowerLoss of the journal's host".to_owned());
                }
                // A takeover claiming at the same moment may fence this one off while it
                // opens: the next incarnation claims after it.
                let mut started = Err(String::new());
                for _ in 0..3 {
                    let incarnation = incarnations.fetch_add(1, Ordering::AcqRel) + 1;
                    started =
                        start_proxy(&store, &journal_faults, &roles, &link, seed, incarnation)
                            .await;
                    if started.is_ok() {
                        break;
                    }
                }
                *lock(&proxy) = started?;
            }
            Fault::JournalError => {
                journal_faults.fail.fetch_add(1, Ordering::AcqRel);
            }
            Fault::JournalLostAck => {
                journal_faults.lose_ack.fetch_add(1, Ordering::AcqRel);
            }
            Fault::Promote => {
                let g = current(&proxy);
                let _ = crate::failover::move_role(&g, Some(&p.name), true).await;
            }
            Fault::Drain => {
                let g = current(&proxy);
                if let Some(member) = g.member(&p.name) {
                    let _ = crate::failover::drain(&g, &member).await;
                    tokio::time::sleep(lasting).await;
                    crate::failover::undrain(&g, &member);
                }
            }
        }
    }
    Ok(())
}

/// Journal outages and late appends, on their own seeded schedule (so the main schedule of
/// a seed is the same with or without them), in about half the runs; never in the
/// regression seeds found before them, which keep the schedule they failed with.
async fn journal_outages(seed: u64, faults: Arc<JournalFaults>, log: Arc<Mutex<Vec<String>>>) {
    let mut rng = ChaCha8Rng::seed_from_u64(seed ^ 0x0a7a_9e11);
    if REGRESSION_SEEDS[..BEFORE_OUTAGES].contains(&seed) || !rng.random_bool(0.5) {
        return;
    }
    for _ in 0..rng.random_range(1..4) {
        tokio::time::sleep(Duration::from_millis(rng.random_range(50..1500))).await;
        if rng.random_bool(0.6) {
            let lasting = Duration::from_millis(rng.random_range(20..2500));
            lock(&log).push(format!("JournalOutage for {lasting:?}"));
            faults.outage.store(true, Ordering::Release);
            tokio::time::sleep(lasting).await;
            faults.outage.store(false, Ordering::Release);
        } else {
            lock(&log).push("JournalLateAppend".to_owned());
            faults.late.fetch_add(1, Ordering::AcqRel);
        }
    }
}

/// Membership changes at run time, on their own seeded schedule (so the fault schedule of
/// a seed is the same with or without them): in some runs a partition (the primary, too) is
/// removed under load and, a while later, added back as a new, empty copy that must replay
/// the whole journal. A proxy restart in between finds the removal in the journal.
async fn membership_changes(
    seed: u64,
    proxy: Current,
    link: Arc<SimLink>,
    log: Arc<Mutex<Vec<String>>>,
) -> Result<(), String> {
    let mut rng = ChaCha8Rng::seed_from_u64(seed ^ 0x03e3_be25);
    if !rng.random_bool(0.4) {
        return Ok(());
    }
    for _ in 0..rng.random_range(1..3) {
        tokio::time::sleep(Duration::from_millis(rng.random_range(50..800))).await;
        let p = link.partitions[rng.random_range(0..link.partitions.len())].clone();
        let g = current(&proxy);
        let Some(member) = g.member(&p.name) else {
            continue;
        };
        let spec = member.spec();
        match crate::membership::remove(&g, &p.name).await {
            Ok(_) => lock(&log).push(format!("Remove {}", p.name)),
            Err(e) => {
                lock(&log).push(format!("Remove {} refused ({e})", p.name));
                continue;
            }
        }
        tokio::time::sleep(Duration::from_millis(rng.random_range(20..500))).await;
        {
            // A new instance with an empty database takes its place.
            let mut s = p.lock();
            s.copy = Copy::default();
            s.backups.clear();
            s.boot += 1;
            s.term = 0;
            s.gap_checked = false;
        }
        let mut added = false;
        for _ in 0..100 {
            let g = current(&proxy);
            if g.member(&p.name).is_some() {
                added = true;
                break;
            }
            match crate::membership::add(&g, spec.clone(), None).await {
                Ok(_) => {
                    lock(&log).push(format!("Add {}", p.name));
                    added = true;
                    break;
                }
                Err(_) => tokio::time::sleep(Duration::from_millis(50)).await,
            }
        }
        if !added {
            return Err(format!("{} could not be added back", p.name));
        }
    }
    Ok(())
}

/// Set to `0` to leave proxy takeovers (a frozen proxy core taken over, then resumed) out
/// of the simulated faults. They found that a resumed core's late replay was applied by a
/// new, empty copy the new core had not reached yet (seed 624): `Regroup-Prev` (the layer
/// applies a record only right after the one the sender last delivered) closed it, and
/// `Regroup-Term` refuses the late requests wherever the new core has been.
const TAKEOVERS_ENV: &str = "REGROUP_SIM_TAKEOVERS";

fn takeovers_enabled() -> bool {
    std::env::var(TAKEOVERS_ENV).map_or(true, |v| v != "0")
}

/// Proxy takeovers, on their own seeded schedule: in some runs the running proxy core is
/// frozen (its journal calls and partition requests wait, as a stopped process's would),
/// another core claims the journal (the frozen one's lease ran out) and opens the group
/// while the frozen one still holds its in-flight updates and replays; after a while the
/// frozen core resumes, late — its journal writes must be refused by the lease's fencing
/// token — and is stopped.
#[allow(clippy::too_many_arguments)]
async fn takeovers(
    seed: u64,
    proxy: Current,
    link: Arc<SimLink>,
    store: MemoryJournal,
    journal_faults: Arc<JournalFaults>,
    roles: Arc<Records>,
    log: Arc<Mutex<Vec<String>>>,
    incarnations: Arc<AtomicU32>,
) -> Result<(), String> {
    let mut rng = ChaCha8Rng::seed_from_u64(seed ^ 0x7a6e_0fe5);
    // Only where every copy keeps the app layer: a copy without it cannot refuse a frozen
    // core's late replay (README: several proxies need the layer on every partition).
    let every_copy_layered = link.partitions.iter().all(|p| p.exactly_once);
    if !takeovers_enabled() || !every_copy_layered || !rng.random_bool(0.3) {
        return Ok(());
    }
    for _ in 0..rng.random_range(1..3) {
        tokio::time::sleep(Duration::from_millis(rng.random_range(100..900))).await;
        let lasting = Duration::from_millis(rng.random_range(20..600));
        let (old_group, old_frozen) = {
            let p = lock(&proxy);
            (p.group.clone(), p.frozen.clone())
        };
        old_frozen.store(true, Ordering::Release);
        let incarnation = incarnations.fetch_add(1, Ordering::AcqRel) + 1;
        lock(&log).push(format!(
            "Takeover by incarnation {incarnation}, the old core frozen for {lasting:?}"
        ));
        let next = start_proxy(&store, &journal_faults, &roles, &link, seed, incarnation).await;
        let next = match next {
            Ok(next) => next,
            Err(e) => {
                // Another core (a proxy restart at the same moment) claimed the journal
                // after this one: this one is fenced off while it opens, as it should be.
                lock(&log).push(format!("Takeover by incarnation {incarnation} lost: {e}"));
                old_frozen.store(false, Ordering::Release);
                continue;
            }
        };
        *lock(&proxy) = next;
        tokio::time::sleep(lasting).await;
        // Resumes, late: whatever it was doing goes on against a journal it no longer owns.
        old_frozen.store(false, Ordering::Release);
        tokio::time::sleep(Duration::from_millis(rng.random_range(0..200))).await;
        old_group.stop();
    }
    Ok(())
}

/// Keeps a few older copies of every partition, for restores.
async fn backups(link: Arc<SimLink>, mut done: tokio::sync::watch::Receiver<bool>) {
    loop {
        tokio::select! {
            biased;
            _ = tokio::time::sleep(Duration::from_millis(150)) => {}
            _ = done.changed() => return,
        }
        for p in &link.partitions {
            let mut s = p.lock();
            let copy = s.copy.clone();
            s.backups.push(copy);
            if s.backups.len() > 4 {
                s.backups.remove(0);
            }
        }
    }
}

/// Waits (bounded, simulated) until nothing is in doubt, everything is sealed and every
/// copy not quarantined has applied it and is available.
async fn settle(group: &Group) -> bool {
    let limit = Instant::now() + Duration::from_secs(120);
    loop {
        let view = group.view();
        // A partition being rebuilt is quarantined only on its way back: waited for too.
        let caught_up = group.members().iter().all(|p| {
            let rebuilding = p.rebuild().is_some_and(|r| r.phase.running());
            (p.diverged().is_some() && !rebuilding)
                || (p.applied() >= view.sealed && p.status() == PartitionStatus::Available)
        });
        if view.in_doubt.is_empty() && view.sealed == view.head && caught_up && !view.handing_over {
            return true;
        }
        if Instant::now() > limit {
            return false;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// One update through the group; an answered one is recorded as acknowledged (and `true`).
async fn update_once(
    group: &Arc<Group>,
    body: String,
    key: Option<&str>,
    seen: &Mutex<Seen>,
) -> bool {
    let mut req = Request::post("/op");
    if let Some(key) = key {
        req = req.header("x-key", key);
    }
    let req = req.body(Full::new(Bytes::from(body))).unwrap_or_default();
    if let Ok(resp) = crate::update::handle(group.clone(), req, None).await
        && resp.status().is_success()
    {
        let seq = resp
            .headers()
            .get(regroup_replay::headers::SEQ)
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.parse::<u64>().ok());
        let status = resp.status().as_u16();
        let body = http_body_util::BodyExt::collect(resp.into_body())
            .await
            .map(|b| b.to_bytes())
            .unwrap_or_default();
        if let Some(seq) = seq {
            lock(seen).acked.insert(seq, Fingerprint::of(status, &body));
            return true;
        }
    }
    false
}

/// Runs one seed; `Err` names the first guarantee that failed.
async fn run(seed: u64) -> Result<(String, String), String> {
    let mut rng = ChaCha8Rng::seed_from_u64(seed);
    let all_exactly_once = rng.random_bool(0.75);
    debug_assert_eq!(all_exactly_once, every_copy_keeps_the_layer(seed));
    let partitions = NAMES
        .iter()
        .map(|n| {
            Arc::new(SimPartition {
                name: (*n).to_owned(),
                exactly_once: all_exactly_once || rng.random_bool(0.5),
                state: Mutex::new(PState::default()),
            })
        })
        .collect();
    let keyed = keyed(seed);
    let link = Arc::new(SimLink {
        partitions,
        sent: Mutex::new(Vec::new()),
        snapshots: Mutex::new(Vec::new()),
        pipelined: AtomicU32::new(0),
        parallel: AtomicU32::new(0),
        keyed,
    });
    // In some runs the journal defers its writes to a flush that overlaps the primary's
    // execution (`journal_sync = "overlap"`), and some proxy restarts are power losses that
    // drop what was not durable. Drawn apart from the main schedule, so a seed's faults are
    // the same either way; the regression seeds keep the journal they failed with.
    let deferred = !FULL_JOURNAL_SEEDS.contains(&seed)
        && ChaCha8Rng::seed_from_u64(seed ^ 0xdefe_44ed).random_bool(0.4);
    let store = if deferred {
        MemoryJournal::deferred()
    } else {
        MemoryJournal::new()
    };
    let journal_faults = Arc::new(JournalFaults::default());
    let roles = Arc::new(Records {
        roles: Mutex::new(BTreeMap::from([(1u64, NAMES[0].to_owned())])),
        truncated: Mutex::default(),
    });
    let first = start_proxy(&store, &journal_faults, &roles, &link, seed, 0).await?;
    let proxy: Current = Arc::new(Mutex::new(first));
    let incarnations = Arc::new(AtomicU32::new(0));
    let seen = Arc::new(Mutex::new(Seen::default()));
    let log = Arc::new(Mutex::new(Vec::new()));
    let (done_tx, done) = tokio::sync::watch::channel(false);
    let backup_task = tokio::spawn(backups(link.clone(), done));
    let clients: Vec<_> = (0..4)
        .map(|id| tokio::spawn(client(id, seed, proxy.clone(), link.clone(), seen.clone())))
        .collect();
    let outages = tokio::spawn(journal_outages(seed, journal_faults.clone(), log.clone()));
    let membership = tokio::spawn(membership_changes(
        seed,
        proxy.clone(),
        link.clone(),
        log.clone(),
    ));
    let takeover = tokio::spawn(takeovers(
        seed,
        proxy.clone(),
        link.clone(),
        store.clone(),
        journal_faults.clone(),
        roles.clone(),
        log.clone(),
        incarnations.clone(),
    ));
    let schedule = faults(
        seed,
        deferred,
        proxy.clone(),
        link.clone(),
        store.clone(),
        journal_faults.clone(),
        roles.clone(),
        log.clone(),
        incarnations.clone(),
    )
    .await;
    let takeover = takeover
        .await
        .unwrap_or_else(|e| Err(format!("the takeover task failed: {e}")));
    let membership = membership
        .await
        .unwrap_or_else(|e| Err(format!("the membership task failed: {e}")));
    for c in clients {
        let _ = c.await;
    }
    let _ = outages.await;
    let _ = done_tx.send(true);
    let _ = backup_task.await;
    let faults_seen = lock(&log).join("; ");
    let fail = |what: String| Err(format!("{what}\n  faults: {faults_seen}"));
    if let Err(e) = schedule {
        return fail(format!("the fault schedule failed: {e}"));
    }
    if let Err(e) = membership {
        return fail(format!("the membership changes failed: {e}"));
    }
    if let Err(e) = takeover {
        return fail(format!("a takeover failed: {e}"));
    }
    // Quiesce: every fault lifted; wait (bounded, simulated) for the group to settle.
    for p in &link.partitions {
        let mut s = p.lock();
        (s.down, s.frozen, s.slow, s.lose_answers) = (false, false, Duration::ZERO, 0);
    }
    journal_faults.clear();
    let group = current(&proxy);
    let mut settled = settle(&group).await;
    let mut probed = true;
    if settled {
        // One more update after the faults: a copy without the app layer that applied a
        // record twice answers it differently from the primary and is caught, as it would
        // be by the next real update. With every fault lifted and the group settled, a
        // primary that is not quarantined takes it: the first may still meet what a fault
        // left (an append that landed late is found by the next append, which is refused).
        probed = false;
        for attempt in 0..3 {
            probed = update_once(&group, format!("probe-{attempt}"), None, &seen).await
                || group.primary().is_none_or(|p| p.diverged().is_some());
            settled = settle(&group).await;
            if probed || !settled {
                break;
            }
        }
    }
    let view = group.view();
    let history: Vec<String> = view
        .transitions
        .iter()
        .map(|t| format!("{}: {}", t.name, t.reason))
        .collect();
    let fail = |what: String| {
        Err(format!(
            "{what}\n  faults: {faults_seen}\n  transitions: {}\n  partitions: {:?}",
            history.join(" | "),
            view.partitions
                .iter()
                .map(|p| format!("{} {} {}", p.name, p.status, p.applied))
                .collect::<Vec<_>>()
        ))
    };
    // The journal as it stands, with what retention truncated before it.
    let mut journal: BTreeMap<u64, Record> = lock(&roles.truncated).clone();
    for r in store
        .read_after("sim", 0, u64::MAX)
        .await
        .map_err(|e| e.to_string())?
    {
        journal.insert(r.seq, r);
    }
    let journal: Vec<Record> = journal.into_values().collect();
    let everyone_keeps_a_record = link.partitions.iter().all(|p| p.exactly_once);
    if !settled {
        // Only a record that may have run on a primary without the app layer may stay in
        // doubt (it is shown, and an operator resolves it).
        let stuck = view
            .in_doubt
            .first()
            .is_some_and(|_| !everyone_keeps_a_record);
        if !stuck {
            return fail(format!(
                "the group did not settle: head {} sealed {} in doubt {:?} epoch {} primary {:?}{} partitions {:?}",
                view.head,
                view.sealed,
                view.in_doubt,
                view.epoch,
                group.role().primary,
                if view.handing_over {
                    " (handing over)"
                } else {
                    ""
                },
                view.partitions
                    .iter()
                    .map(|p| format!("{} {} {}", p.name, p.status, p.applied))
                    .collect::<Vec<_>>()
            ));
        }
    }
    if !probed {
        return fail(format!(
            "the group settled after the faults but did not take an update: head {} sealed {} \
             written {}, journal head {:?}",
            view.head,
            view.sealed,
            group.written(),
            journal.last().map(|r| (r.seq, r.state))
        ));
    }
    // 1. Every acknowledged update is in the journal, executed, with the answer the
    //    client got.
    let by_seq: BTreeMap<u64, &Record> = journal.iter().map(|r| (r.seq, r)).collect();
    for (seq, fp) in &lock(&seen).acked {
        match by_seq.get(seq) {
            Some(r) if r.state == RecordState::Executed && r.fingerprint.as_ref() == Some(fp) => {}
            other => {
                return fail(format!(
                    "acknowledged update {seq} is not in the journal as answered: {:?}",
                    other.map(|r| (r.state, r.fingerprint.clone()))
                ));
            }
        }
    }
    // 2. Every copy not quarantined applied the executed records exactly once, in journal
    //    order, and nothing else.
    let executed: Vec<(u64, String)> = journal
        .iter()
        .filter(|r| r.state == RecordState::Executed && r.seq <= view.sealed)
        .map(|r| (r.seq, r.txn_id.to_string()))
        .collect();
    for p in &link.partitions {
        let quarantined = group
            .member(&p.name)
            .is_some_and(|m| m.diverged().is_some());
        if quarantined && p.exactly_once && !ahead_after_power_loss(&group, &p.name, &faults_seen) {
            // Its own record makes every re-delivery harmless and says where it stands
            // after a restore: nothing should ever make it diverge, except a record the
            // journal lost in a power loss after this copy executed it (`overlap`): then it
            // stands ahead of the journal, which quarantines it.
            return fail(format!(
                "copy {:?} keeps its own record but was quarantined",
                p.name
            ));
        }
        if quarantined {
            continue;
        }
        let copy = p.lock().copy.executed.clone();
        let upto: Vec<(u64, String)> = copy
            .iter()
            .filter(|(seq, _)| *seq <= view.sealed)
            .cloned()
            .collect();
        if keyed {
            // Records with no key in common may have run in either order: each key's
            // records (barriers included) in journal order, and every record once.
            if let Some(why) = differs_per_key(&upto, &executed, &by_seq) {
                return fail(format!(
                    "copy {:?} (exactly once: {}) differs from the journal and is not \
                     quarantined: {why}",
                    p.name, p.exactly_once
                ));
            }
        } else if upto != executed {
            let first = upto
                .iter()
                .zip(&executed)
                .position(|(a, b)| a != b)
                .unwrap_or(upto.len().min(executed.len()));
            return fail(format!(
                "copy {:?} (exactly once: {}) differs from the journal and is not quarantined: \
                 {} applied vs {} executed, first difference at position {first}: {:?} vs {:?}",
                p.name,
                p.exactly_once,
                upto.len(),
                executed.len(),
                upto.get(first),
                executed.get(first)
            ));
        }
    }
    // 2b. Seals in seq order keep the epochs of executed records from going down along the
    //     journal (a replica's layer would fence a lower one after a higher).
    if let Some(w) = journal
        .iter()
        .filter(|r| r.state == RecordState::Executed)
        .collect::<Vec<_>>()
        .windows(2)
        .find(|w| w[1].epoch < w[0].epoch)
    {
        return fail(format!(
            "executed record {} has epoch {} after record {} of epoch {}",
            w[1].seq, w[1].epoch, w[0].seq, w[0].epoch
        ));
    }
    // 3. No answer sealed from a deposed epoch: every executed record's answer came from
    //    the primary of the epoch it is stamped with.
    let roles = lock(&roles.roles).clone();
    let sent = lock(&link.sent).clone();
    for r in journal.iter().filter(|r| r.state == RecordState::Executed) {
        let Some(fp) = &r.fingerprint else { continue };
        let primary = roles.range(..=r.epoch).next_back().map(|(_, p)| p.clone());
        let from_primary = sent.iter().any(|s| {
            s.seq == r.seq
                && s.epoch == r.epoch
                && Some(&s.partition) == primary.as_ref()
                && &s.fingerprint == fp
        });
        if !from_primary {
            return fail(format!(
                "record {} sealed with an answer not given by {primary:?}, primary of epoch {}",
                r.seq, r.epoch
            ));
        }
    }
    // 4. Never two partitions accepting updates in one epoch.
    let mut accepting: BTreeMap<u64, BTreeSet<String>> = BTreeMap::new();
    for s in sent.iter().filter(|s| s.fingerprint.status == 200) {
        accepting
            .entry(s.epoch)
            .or_default()
            .insert(s.partition.clone());
    }
    if let Some((epoch, who)) = accepting.iter().find(|(_, who)| who.len() > 1) {
        return fail(format!(
            "epoch {epoch} had two partitions accepting updates: {who:?}"
        ));
    }
    // 5. No read from a quarantined or stale copy.
    if let Some(bad) = lock(&seen).bad_reads.first() {
        return fail(bad.clone());
    }
    group.stop();
    let seen = lock(&seen);
    // Everything the run decided, without the transaction ids and answer hashes (those come
    // from the clock and the ids).
    let trace = format!(
        "faults: {faults_seen}\njournal: {:?}\nsent: {:?}\nacked: {:?}\ntransitions: {:?}\npartitions: {:?}",
        journal
            .iter()
            .map(|r| (r.seq, r.state, r.epoch, r.executors.clone()))
            .collect::<Vec<_>>(),
        sent.iter()
            .map(|s| (s.partition.clone(), s.epoch, s.seq, s.fingerprint.status))
            .collect::<Vec<_>>(),
        seen.acked.keys().collect::<Vec<_>>(),
        view.transitions.iter().map(|t| t.name).collect::<Vec<_>>(),
        view.partitions
            .iter()
            .map(|p| (p.name.clone(), p.status, p.applied))
            .collect::<Vec<_>>(),
    );
    let readded = lock(&log).iter().filter(|l| l.starts_with("Add ")).count();
    let summary = format!(
        "{} records, {} acknowledged ({} sent pipelined, {} in parallel, window {}, replay window {}), \
         {} reads, epoch {}, {} quarantined, {readded} re-added",
        journal.len(),
        seen.acked.len(),
        link.pipelined.load(Ordering::Acquire),
        link.parallel.load(Ordering::Acquire),
        group.config.pipeline_window,
        group.config.replay_window,
        seen.reads,
        view.epoch,
        view.partitions
            .iter()
            .filter(|p| p.status == PartitionStatus::Diverged)
            .count()
    );
    Ok((summary, trace))
}

/// Whether `name` was quarantined for standing ahead of the journal, in a run where the
/// journal's host lost power (the only way a copy with its own record may be).
fn ahead_after_power_loss(group: &Group, name: &str, faults_seen: &str) -> bool {
    faults_seen.contains("PowerLoss")
        && group
            .member(name)
            .and_then(|m| m.diverged())
            .is_some_and(|why| why.contains("but the journal holds only"))
}

fn run_seed(seed: u64) -> Result<String, String> {
    watched(SEED_WATCHDOG, move || {
        run_traced(seed).map(|(summary, _)| summary)
    })
}

/// The longest one seed may run in real time. A task that spins without ever awaiting
/// something that blocks starves the paused clock, so no simulated time-out can end the
/// run: the watchdog turns that into a failure naming the seed instead of a hung test.
const SEED_WATCHDOG: Duration = Duration::from_secs(120);

/// Runs `run` on a thread of its own, failing when it takes longer than `limit` (the thread
/// is left behind) or panics.
fn watched(
    limit: Duration,
    run: impl FnOnce() -> Result<String, String> + Send + 'static,
) -> Result<String, String> {
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::Builder::new()
        .name("sim-seed".to_owned())
        .spawn(move || {
            let _ = tx.send(run());
        })
        .map_err(|e| format!("cannot start the run's thread: {e}"))?;
    match rx.recv_timeout(limit) {
        Ok(result) => result,
        Err(std::sync::mpsc::RecvTimeoutError::Timeout) => Err(format!(
            "the run did not finish within {} s of real time: a task spins without end \
             (the simulated clock never moves again)",
            limit.as_secs()
        )),
        Err(std::sync::mpsc::RecvTimeoutError::Disconnected) => {
            Err("the run panicked (its message is above)".to_owned())
        }
    }
}

/// Runs one seed, returning the summary and a trace of everything the run decided (for the
/// replay check).
fn run_traced(seed: u64) -> Result<(String, String), String> {
    let rt = sim_runtime(seed).map_err(|e| e.to_string())?;
    rt.block_on(run(seed))
}

/// The runtime a seed runs on: one thread, the clock paused (it moves only when every task
/// waits), and tokio's own random draws (which `watch` waiter wakes first, an unbiased
/// `select!`'s order) seeded from `seed`. Those need `--cfg tokio_unstable`, which
/// `.cargo/config.toml` sets; a build without it (`RUSTFLAGS` set replaces that file's
/// flags) runs, but a seed may not replay exactly, and `a_seed_replays_exactly` says why.
fn sim_runtime(seed: u64) -> std::io::Result<tokio::runtime::Runtime> {
    let mut b = tokio::runtime::Builder::new_current_thread();
    b.enable_time().start_paused(true);
    #[cfg(tokio_unstable)]
    b.rng_seed(tokio::runtime::RngSeed::from_bytes(&seed.to_le_bytes()));
    #[cfg(not(tokio_unstable))]
    let _ = seed;
    b.build()
}

/// A seed replays exactly: the same faults, the same journal (states, epochs, executors),
/// the same answers from the same partitions in the same epochs, the same transitions.
/// tokio's own random draws are seeded from the seed (`sim_runtime`): unseeded, which of
/// the tasks waiting on a `watch` channel wakes first varied between runs, and seed 8285
/// ran differently in about one run in four. (Every `select!` in the core is `biased` besides: its
/// branches are polled in the order written, the order that says what comes first.) The
/// regression seeds run here too, with journal outages and late appends. Anything else that
/// varies between runs — a `HashMap` iterated for a decision, a wall-clock read — makes this
/// fail.
#[test]
fn a_seed_replays_exactly() {
    if !cfg!(tokio_unstable) {
        panic!(
            "built without --cfg tokio_unstable (is RUSTFLAGS set? it replaces \
             .cargo/config.toml's flags): tokio's random draws are not seeded, so a seed \
             cannot replay exactly"
        );
    }
    for seed in (0..20)
        .chain(REGRESSION_SEEDS)
        .chain(KEYED_REGRESSION_SEEDS)
    {
        let first = run_traced(seed);
        let again = run_traced(seed);
        match (first, again) {
            (Ok((_, a)), Ok((_, b))) => {
                assert!(a == b, "seed {seed} ran differently:\n{a}\n---\n{b}")
            }
            (a, b) => panic!("seed {seed}: {a:?} / {b:?}"),
        }
    }
}

/// Seeds outside the default range that found a bug: 2355, a hand-over abandoned after a
/// journal error left the replica it had chosen without a replayer; 26431 and 26671, a
/// partition whose own record has gaps where the journal skipped records was taken as
/// behind and rewound (supervise.rs: `executed_between`); 405, a primary restored from an
/// older copy with nobody else to lead executed past the records it lost; 624, a frozen
/// core's late replay applied by a new, empty copy (both with proxy takeovers).
/// 1664, 1941 and 2203, a proxy restart in the middle of a rebuild left the copy
/// quarantined (`rebuild::resume_interrupted`). 3448, an update spun without end (the
/// simulated clock never moved again): with the window empty, the record above the written
/// sealed head was sealed in the journal, and taking up records only looked for unsealed
/// ones (`Group::take_up_unsealed` now adopts sealed ones, and waits when the journal does
/// not answer). 6220, a replica without the app layer applied a record twice (a replay that
/// timed out was applied late, after its retry had been answered) and, made primary, got
/// the healthy copies quarantined (a replay with no answer now quarantines such a copy).
/// 94 and 370 (journal outages), a group stuck for good: an append with no answer went in
/// doubt behind a lower record in doubt, was never written, and the window waited for the
/// journal to show it (`Group::take_up_unsealed` now drops records above the journal's
/// end). 91 (late appends), every update refused with a gap: an append answered "not
/// written" landed afterwards (`update::append` takes it up, and it is sealed skipped).
/// 12134, a rebuild resumed after a proxy restart took a source without the app layer,
/// which cannot give a snapshot (`rebuild::choose_source` now prefers one that keeps the
/// layer's record). 15181 (`overlap`), a hand-over adopted an in-doubt record found sealed
/// after it had flushed the journal, so the new primary was caught up to the head before
/// it and executed the next record without it (`failover::hand_over` now flushes until
/// nothing sealed is left unflushed, and holds off settlements until the new role).
/// 8285 (in some runs: the order tokio's `select!` draws decides it), a hand-over whose
/// candidate was quarantined on the way waited an hour for another while the old primary
/// could lead again, and every update waited with it (`failover::hand_over` now gives up
/// then, and the old primary keeps the role).
const REGRESSION_SEEDS: [u64; 16] = [
    2355, 26431, 26671, 405, 624, 1664, 1941, 2203, 3448, 6220, 91, 94, 370, 12134, 15181, 8285,
];

/// Seeds of keyed runs (conflict keys) that once found a bug, run every time, keyed. 602: a
/// record that failed in a parallel window went again in seq order, and the copy, which had
/// taken a later epoch's record, fenced it (it now goes the parallel way). 3409: a floor
/// above the highest recorded was refused as `behind`, but it was the journal's skipped
/// records (checked now only after a start, against where the copy is dense). 8964: a primary restored
/// from an older copy was refused an in-doubt record's settlement for good, since its
/// `delivered` stayed where it stood before (`update::rewound` now re-aims it). 10688: a
/// copy restored from an older copy with holes below its highest record took records
/// past them, and diverged (a floor is now checked against where the copy is dense until one
/// passes after a start, and a retry goes back to there).
const KEYED_REGRESSION_SEEDS: [u64; 4] = [602, 3409, 8964, 10688];

/// How many of the regression seeds, the first ones, were found before journal outages
/// were simulated: they keep the schedule they failed with.
const BEFORE_OUTAGES: usize = 10;

/// The regression seeds found before runs could defer journal writes or keep a short
/// journal: they keep the journal they failed with.
const FULL_JOURNAL_SEEDS: [u64; 5] = [2355, 26431, 26671, 405, 624];

/// The default run covers `DEFAULT_SEEDS` seeds.
const DEFAULT_SEEDS: u64 = 1000;

/// Simulated time in the log of one seed (`REGROUP_SIM_LOG`): milliseconds since the
/// first line.
struct SimClock;

impl tracing_subscriber::fmt::time::FormatTime for SimClock {
    fn format_time(&self, w: &mut tracing_subscriber::fmt::format::Writer<'_>) -> std::fmt::Result {
        static START: std::sync::OnceLock<Instant> = std::sync::OnceLock::new();
        let start = *START.get_or_init(Instant::now);
        write!(
            w,
            "{:>8}ms",
            Instant::now().duration_since(start).as_millis()
        )
    }
}

#[test]
fn simulation_holds_every_guarantee_over_many_seeds() {
    if let Some(seed) = std::env::var("REGROUP_SIM_SEED")
        .ok()
        .and_then(|s| s.parse::<u64>().ok())
    {
        // `REGROUP_SIM_LOG=debug` (any tracing filter) prints the core's log for the seed,
        // in the order things ran, with simulated times: two runs of a seed compare.
        if let Ok(filter) = std::env::var("REGROUP_SIM_LOG") {
            let _ = tracing_subscriber::fmt()
                .with_env_filter(tracing_subscriber::EnvFilter::new(filter))
                .with_timer(SimClock)
                .with_test_writer()
                .try_init();
        }
        match run_seed(seed) {
            Ok(summary) => println!("seed {seed}: ok ({summary})"),
            Err(e) => panic!("seed {seed} failed: {e}"),
        }
        return;
    }
    let seeds = std::env::var("REGROUP_SIM_SEEDS")
        .ok()
        .and_then(|s| s.parse::<u64>().ok())
        .unwrap_or(DEFAULT_SEEDS);
    let mut failed = Vec::new();
    // Seeds beyond the default range that once found a bug, run every time.
    for seed in (0..seeds)
        .chain(REGRESSION_SEEDS)
        .chain(KEYED_REGRESSION_SEEDS)
    {
        if let Err(e) = run_seed(seed) {
            eprintln!(
                "seed {seed} failed (replay: REGROUP_SIM_SEED={seed} cargo test -p regroup-proxy simulation): {e}"
            );
            failed.push(seed);
            if failed.len() >= 5 {
                break;
            }
        }
    }
    assert!(failed.is_empty(), "seeds failed: {failed:?}");
}

/// A run that never finishes fails, named, instead of hanging the test.
#[test]
fn a_run_that_does_not_finish_fails_instead_of_hanging() {
    let e = watched(Duration::from_millis(50), || {
        std::thread::sleep(Duration::from_secs(5));
        Ok(String::new())
    })
    .expect_err("the watchdog fires");
    assert!(e.contains("did not finish within"), "{e}");
    assert!(watched(Duration::from_secs(5), || Ok("done".to_owned())).is_ok());
}

fn sim_link() -> Arc<SimLink> {
    Arc::new(SimLink {
        partitions: NAMES
            .iter()
            .map(|n| {
                Arc::new(SimPartition {
                    name: (*n).to_owned(),
                    exactly_once: true,
                    state: Mutex::new(PState::default()),
                })
            })
            .collect(),
        sent: Mutex::new(Vec::new()),
        snapshots: Mutex::new(Vec::new()),
        pipelined: AtomicU32::new(0),
        parallel: AtomicU32::new(0),
        keyed: false,
    })
}

/// With seals deferred to the next flush, replicas are never offered a seal that is not
/// durable: after a power loss such a record comes back in doubt, and no replica may have
/// applied it.
#[test]
fn deferred_seals_reach_replicas_only_once_flushed() {
    let rt = runtime();
    rt.block_on(async {
        let flushes = Arc::new(AtomicU32::new(0));
        let journal = Arc::new(FaultyJournal {
            inner: MemoryJournal::new(),
            faults: Arc::default(),
            roles: Arc::default(),
            deferred: Some(flushes.clone()),
            fail_flushes: Arc::default(),
            frozen: Arc::default(),
        });
        let link = sim_link();
        let group = Group::open(config(0), journal, link.clone())
            .await
            .unwrap_or_else(|e| panic!("open: {e}"));
        group.start().await;
        let req = Request::post("/op")
            .body(Full::new(Bytes::from_static(b"x")))
            .unwrap_or_default();
        let resp = crate::update::handle(group.clone(), req, None).await;
        assert!(resp.is_ok_and(|r| r.status().is_success()));
        // Answered and written, not yet durable: no replica may see it.
        assert_eq!((group.written(), group.sealed()), (1, 0));
        assert_eq!(flushes.load(Ordering::Acquire), 0);
        tokio::time::sleep(Duration::from_millis(50)).await;
        assert_eq!(group.sealed(), 1, "the flusher makes it durable");
        assert!(flushes.load(Ordering::Acquire) >= 1);
        // Then the replicas apply it.
        for _ in 0..100 {
            if link
                .partitions
                .iter()
                .all(|p| p.lock().copy.last_seq() == 1)
            {
                break;
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        assert!(
            link.partitions
                .iter()
                .all(|p| p.lock().copy.last_seq() == 1)
        );
        group.stop();
    });
}

/// A journal whose primary the config no longer names is refused at start, naming it:
/// the role never moves silently.
#[test]
fn a_stored_primary_missing_from_the_config_is_refused() {
    let rt = match tokio::runtime::Builder::new_current_thread()
        .enable_time()
        .build()
    {
        Ok(rt) => rt,
        Err(e) => panic!("runtime: {e}"),
    };
    rt.block_on(async {
        let journal = MemoryJournal::new();
        let stored = journal.role("sim", "gone").await;
        assert!(stored.is_ok_and(|r| r.primary == "gone"));
        let opened = Group::open(config(0), Arc::new(journal), sim_link()).await;
        match opened {
            Err(crate::error::ProxyError::Config(why)) => {
                assert!(why.contains("\"gone\""), "{why}")
            }
            Err(e) => panic!("want a config error, got {e}"),
            Ok(_) => panic!("a stored primary missing from the config must be refused"),
        }
    });
}

fn runtime() -> tokio::runtime::Runtime {
    match sim_runtime(0) {
        Ok(rt) => rt,
        Err(e) => panic!("runtime: {e}"),
    }
}

/// Waits (bounded, simulated time) until `cond` holds.
async fn eventually(what: &str, mut cond: impl FnMut() -> bool) {
    for _ in 0..400 {
        if cond() {
            return;
        }
        tokio::time::sleep(Duration::from_millis(25)).await;
    }
    panic!("timed out waiting until {what}");
}

async fn open_sim(
    config: crate::config::GroupConfig,
    journal: &MemoryJournal,
    link: &Arc<SimLink>,
) -> Arc<Group> {
    let group = Group::open(config, Arc::new(journal.clone()), link.clone())
        .await
        .unwrap_or_else(|e| panic!("open: {e}"));
    group.start().await;
    group
}

/// When the primary's computing system fails, the role goes to a partition on another
/// host, even when one on the failed host ranks higher.
#[test]
fn failover_prefers_a_partition_on_another_host() {
    runtime().block_on(async {
        let mut config = config(0);
        // a and b share host h1 (b ranks highest), c is alone on h2.
        for (p, (host, priority)) in
            config
                .partitions
                .iter_mut()
                .zip([("h1", 0), ("h1", 9), ("h2", 0)])
        {
            p.host = Some(host.to_owned());
            p.priority = priority;
        }
        let link = sim_link();
        let journal = MemoryJournal::new();
        let group = open_sim(config, &journal, &link).await;
        eventually("every partition is available", || {
            group
                .members()
                .iter()
                .all(|p| p.status() == PartitionStatus::Available)
        })
        .await;
        // Only the primary fails (host h1 still runs b).
        if let Some(a) = link.find("a") {
            a.lock().down = true;
        }
        eventually("the role moved", || group.role().primary != "a").await;
        assert_eq!(group.role().primary, "c", "{:?}", group.view().transitions);
        group.stop();
    });
}

/// A partition removed at run time stays removed after a restart on the same journal, one
/// added comes back with it, and the config's disagreement is reported, not applied.
#[test]
fn run_time_membership_outlives_a_restart_and_drift_is_reported() {
    runtime().block_on(async {
        let link = sim_link();
        let journal = MemoryJournal::new();
        let group = open_sim(config(0), &journal, &link).await;
        eventually("a is available", || {
            group
                .member("a")
                .is_some_and(|p| p.status() == PartitionStatus::Available)
        })
        .await;
        // Removing the primary moves the role first.
        let removed = crate::membership::remove(&group, "a").await;
        assert!(removed.is_ok(), "{removed:?}");
        assert_ne!(group.role().primary, "a");
        assert!(group.member("a").is_none());
        // Bad input changes nothing and says what is wrong.
        let dup = regroup_replay::MemberSpec {
            name: "b".into(),
            url: sim_url("b2"),
            host: None,
            priority: 0,
        };
        match crate::membership::add(&group, dup, None).await {
            Err(crate::error::ProxyError::BadRequest(m)) => {
                assert!(m.contains("already has"), "{m}")
            }
            other => panic!("a duplicate name must be refused, got {other:?}"),
        }
        let same_url = regroup_replay::MemberSpec {
            name: "d".into(),
            url: sim_url("b"),
            host: None,
            priority: 0,
        };
        assert!(
            crate::membership::add(&group, same_url, None)
                .await
                .is_err()
        );
        let last = crate::membership::remove(&group, "zz").await;
        assert!(matches!(last, Err(crate::error::ProxyError::BadRequest(_))));
        // "a" comes back as a new copy on another address.
        if let Some(a) = link.find("a") {
            a.lock().copy = Copy::default();
        }
        let back = regroup_replay::MemberSpec {
            name: "a".into(),
            url: sim_url("a"),
            host: Some("h9".into()),
            priority: 1,
        };
        assert!(
            crate::membership::add(&group, back.clone(), None)
                .await
                .is_ok()
        );
        crate::membership::remove(&group, "c")
            .await
            .unwrap_or_else(|e| panic!("remove c: {e}"));
        let version = group.members_version();
        group.stop();

        let again = open_sim(config(0), &journal, &link).await;
        let names: Vec<String> = again
            .members()
            .iter()
            .map(|p| p.name().to_owned())
            .collect();
        assert_eq!(names, ["b", "a"], "the journal's membership wins");
        assert_eq!(again.members_version(), version);
        assert_eq!(again.member("a").map(|p| p.spec()), Some(back));
        let drift = again.view().config_drift;
        assert_eq!(drift.len(), 2, "{drift:?}");
        assert!(
            drift
                .iter()
                .any(|d| d.contains("\"c\" is in the config but not")),
            "{drift:?}"
        );
        assert!(
            drift.iter().any(|d| d.contains("\"a\": the journal has")),
            "{drift:?}"
        );
        again.stop();
    });
}

/// `move`: the partition leaves its group and joins the other quarantined (its copy holds
/// the first group's data); a move the other group cannot take is refused before anything
/// changes.
#[test]
fn a_moved_partition_joins_the_other_group_quarantined() {
    runtime().block_on(async {
        let journal = MemoryJournal::new();
        let link = sim_link();
        let group = open_sim(config(0), &journal, &link).await;
        let mut other_config = config(0);
        other_config.name = "other".into();
        // x and b; this b is not the first group's b.
        other_config.partitions.truncate(2);
        other_config.partitions[0].name = "x".into();
        other_config.partitions[0].url = sim_url("x");
        let other_link = Arc::new(SimLink {
            partitions: ["x", "b", "c"]
                .iter()
                .map(|n| {
                    Arc::new(SimPartition {
                        name: (*n).to_owned(),
                        exactly_once: true,
                        state: Mutex::new(PState::default()),
                    })
                })
                .collect(),
            sent: Mutex::new(Vec::new()),
            snapshots: Mutex::new(Vec::new()),
            pipelined: AtomicU32::new(0),
        parallel: AtomicU32::new(0),
        keyed: false,
        });
        let other = open_sim(other_config, &journal, &other_link).await;
        // Into a group that has the name already: refused, nothing changed.
        let clash = crate::membership::move_to(&group, &other, "b").await;
        assert!(
            matches!(&clash, Err(crate::error::ProxyError::BadRequest(m)) if m.contains("already has")),
            "{clash:?}"
        );
        assert!(group.member("b").is_some(), "a refused move changes nothing");
        assert_eq!(group.members().len(), 3);
        let moved = crate::membership::move_to(&group, &other, "c").await;
        assert!(moved.is_ok(), "{moved:?}");
        assert!(group.member("c").is_none());
        let c = other.member("c").unwrap_or_else(|| panic!("c joined"));
        let why = c.diverged().unwrap_or_default();
        assert!(why.contains("moved from group \"sim\""), "{why}");
        assert_eq!(c.status(), PartitionStatus::Diverged);
        // Durably: the journal says so too.
        assert_eq!(
            journal.diverged("other", "c").await.ok().flatten(),
            Some(why)
        );
        group.stop();
        other.stop();
    });
}

async fn update_ok(group: &Arc<Group>, body: &str) -> bool {
    let req = Request::post("/op")
        .body(Full::new(Bytes::from(body.to_owned())))
        .unwrap_or_default();
    crate::update::handle(group.clone(), req, None)
        .await
        .is_ok_and(|r| r.status().is_success())
}

/// `journal_sync = "overlap"`: the primary executes a record while the journal flushes it.
/// When the flush fails the client is not answered as done; when the journal's host then
/// loses power, the record is gone, and the primary, which says it executed it, stands
/// ahead of the journal: it is quarantined at the restart and the role moves on. No
/// acknowledged update is lost.
#[test]
fn a_record_lost_in_a_power_loss_quarantines_the_primary_that_executed_it() {
    runtime().block_on(async {
        let store = MemoryJournal::deferred();
        let link = sim_link();
        let fail_flushes = Arc::new(AtomicU32::new(0));
        let faulty = |inner: MemoryJournal, fail_flushes: Arc<AtomicU32>| {
            Arc::new(FaultyJournal {
                inner,
                faults: Arc::default(),
                roles: Arc::default(),
                deferred: None,
                fail_flushes,
                frozen: Arc::default(),
            })
        };
        let first = store.handle();
        let group = Group::open(
            config(0),
            faulty(first.clone(), fail_flushes.clone()),
            link.clone(),
        )
        .await
        .unwrap_or_else(|e| panic!("open: {e}"));
        group.start().await;
        let primary = group.role().primary.clone();
        assert!(update_ok(&group, "acknowledged").await);
        eventually("the first update durable and replayed", || {
            group.sealed() == 1
                && link
                    .partitions
                    .iter()
                    .all(|p| p.lock().copy.last_seq() == 1)
        })
        .await;
        fail_flushes.store(u32::MAX, Ordering::Release);
        assert!(
            !update_ok(&group, "never durable").await,
            "an update whose record could not be made durable was answered as done"
        );
        let executed_by_primary = |link: &SimLink| {
            link.partitions
                .iter()
                .find(|p| p.name == primary)
                .map(|p| p.lock().copy.last_seq())
        };
        assert_eq!(
            executed_by_primary(&link),
            Some(2),
            "the primary executed it"
        );
        // Power loss: the process is gone, and so is what the journal had not made durable.
        group.stop();
        first.lose_process();
        store.power_loss();
        let again = Group::open(
            config(0),
            faulty(store.handle(), Arc::default()),
            link.clone(),
        )
        .await
        .unwrap_or_else(|e| panic!("reopen: {e}"));
        again.start().await;
        assert_eq!(again.head(), 1, "the record that was never durable is gone");
        eventually("the primary quarantined as ahead of the journal", || {
            again.member(&primary).and_then(|m| m.diverged()).is_some()
        })
        .await;
        let why = again
            .member(&primary)
            .and_then(|m| m.diverged())
            .unwrap_or_default();
        assert!(why.contains("journal holds only 1"), "{why}");
        assert!(update_ok(&again, "after").await, "the group goes on");
        assert_ne!(again.role().primary, primary);
        let journal = store
            .read_after("sim", 0, u64::MAX)
            .await
            .unwrap_or_default();
        assert_eq!(journal.len(), 2);
        assert!(journal.iter().all(|r| r.state == RecordState::Executed));
        again.stop();
    });
}

/// A primary restored from an older backup while no other partition can lead is caught up
/// by its own replayer before it executes another update: it never applies a new record
/// past the records it lost.
#[test]
fn a_rewound_primary_catches_up_before_it_executes_again() {
    runtime().block_on(async {
        let link = sim_link();
        let journal = MemoryJournal::new();
        let group = open_sim(config(0), &journal, &link).await;
        eventually("every partition is available", || {
            group
                .members()
                .iter()
                .all(|p| p.status() == PartitionStatus::Available)
        })
        .await;
        let a = link.find("a").unwrap_or_else(|| panic!("a"));
        let mut backup = None;
        for i in 0..5 {
            assert!(update_ok(&group, &format!("u{i}")).await, "update {i}");
            if i == 1 {
                backup = Some(a.lock().copy.clone());
            }
        }
        // Nobody else can lead; the primary comes back from the older copy.
        for n in ["b", "c"] {
            if let Some(p) = link.find(n) {
                p.lock().down = true;
            }
        }
        {
            let mut s = a.lock();
            s.copy = backup.unwrap_or_default();
            s.down = true;
            s.boot += 1;
            s.term = 0;
            s.gap_checked = false;
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
        a.lock().down = false;
        eventually("the primary is rewound", || {
            group.view().transitions.iter().any(|t| t.name == "rewind")
        })
        .await;
        let req = Request::post("/op")
            .body(Full::new(Bytes::from_static(b"after")))
            .unwrap_or_default();
        let resp = crate::update::handle(group.clone(), req, None).await;
        let status = resp.as_ref().map(|r| r.status().as_u16()).ok();
        let view = group.view();
        assert!(
            status == Some(200),
            "{:?} {:?} {:?}",
            resp.err(),
            view.transitions,
            view.partitions
                .iter()
                .map(|p| (p.name.clone(), p.status, p.applied))
                .collect::<Vec<_>>()
        );
        let seqs: Vec<u64> = a.lock().copy.executed.iter().map(|(s, _)| *s).collect();
        assert_eq!(
            seqs,
            (1..=6).collect::<Vec<u64>>(),
            "applied in journal order, once"
        );
        group.stop();
    });
}

/// The pipelined sequencer: concurrent updates reach the primary right behind one another,
/// and the answer of one of them is lost. That one and those sent behind it are settled in
/// seq order from the primary's exactly-once record: every client gets its own answer, and
/// every copy applied each record once, in journal order.
#[test]
fn a_lost_answer_in_the_window_settles_it_and_those_behind_it_in_order() {
    runtime().block_on(async {
        let link = sim_link();
        let journal = MemoryJournal::new();
        let mut config = config(0);
        config.pipeline_window = 4;
        let group = open_sim(config, &journal, &link).await;
        eventually("the primary keeps its own record", || {
            group.primary().is_some_and(|p| p.keeps_own_record())
                && group
                    .members()
                    .iter()
                    .all(|p| p.status() == PartitionStatus::Available)
        })
        .await;
        assert!(update_ok(&group, "first").await);
        let a = link.find("a").unwrap_or_else(|| panic!("a"));
        {
            let mut s = a.lock();
            s.slow = Duration::from_millis(5);
            s.lose_answers = 1;
        }
        let updates: Vec<_> = (0..6)
            .map(|i| {
                let group = group.clone();
                tokio::spawn(async move { update_ok(&group, &format!("u{i}")).await })
            })
            .collect();
        for (i, u) in updates.into_iter().enumerate() {
            assert!(
                u.await.unwrap_or(false),
                "update {i} was not answered as done"
            );
        }
        a.lock().slow = Duration::ZERO;
        assert!(
            link.pipelined.load(Ordering::Acquire) > 0,
            "no record was sent pipelined"
        );
        assert!(
            group
                .view()
                .transitions
                .iter()
                .any(|t| t.name == "mark_in_doubt"),
            "the lost answer put a record in doubt"
        );
        assert_eq!((group.head(), group.written()), (7, 7));
        eventually("every copy applied everything", || {
            link.partitions
                .iter()
                .all(|p| p.lock().copy.last_seq() == 7)
        })
        .await;
        for p in &link.partitions {
            let seqs: Vec<u64> = p.lock().copy.executed.iter().map(|(s, _)| *s).collect();
            assert_eq!(seqs, (1..=7).collect::<Vec<u64>>(), "copy {}", p.name);
        }
        group.stop();
    });
}
