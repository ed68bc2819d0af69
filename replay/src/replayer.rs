//! The replayer: drives one partition's cursor through its group's sealed records, in
//! order, through an [`Applier`], checking each answer against the primary's fingerprint.
//! With a [`PipelinedApplier`] and a partition that keeps the exactly-once record, a small
//! window of records is on its way to the partition at once (its app layer still applies
//! them one at a time in seq order); outcomes are taken in seq order all the same.

use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use futures_util::StreamExt;
use futures_util::stream::FuturesOrdered;
use tokio::sync::watch;

use crate::applier::{Applier, ApplyError, Position};
use crate::conflict::{ConflictKeys, conflict};
use crate::headers::Behind;
use crate::journal::{Journal, JournalError};
use crate::record::{Compare, Fingerprint, Record, RecordState};

/// What the replayer reports about its partition as it goes.
pub trait ReplayObserver: Send + Sync + 'static {
    /// The partition has applied (or, for skipped records, passed) everything up to `seq`.
    fn applied(&self, seq: u64);
    /// An attempt to apply `seq` failed; `attempt` counts consecutive failures from 1.
    fn apply_failed(&self, seq: u64, attempt: u32, error: &ApplyError);
    /// The partition's answer to `seq` differs from the primary's: it is diverged and the
    /// replayer stops.
    fn diverged(&self, seq: u64, reason: &str);
}

/// An applier that can also send a record right behind the one before it, while that one
/// may still be on its way to the partition or executing there (`Regroup-Prev` and
/// `Regroup-Pipelined`): the partition's app layer waits for it, bounded, and applies the
/// records one at a time in seq order.
#[async_trait::async_trait]
pub trait PipelinedApplier: Send + Sync + 'static {
    /// Sends `record` as a replay while records before it may still be on their way to the
    /// partition or executing there, in the place `behind` gives it: right behind the
    /// record sent before it (`Regroup-Prev`), or, in parallel replay, behind only the
    /// records it conflicts with (`Regroup-After`, `Regroup-Floor`); returns the
    /// fingerprint of the answer. The partition refuses it when a record it follows
    /// finished there unrecorded.
    async fn apply_pipelined(
        &self,
        record: &Record,
        behind: Behind<'_>,
    ) -> Result<Fingerprint, ApplyError>;
}

/// Why a replayer stopped.
#[derive(Debug, PartialEq, Eq)]
pub enum ReplayExit {
    /// Asked to stop, or the group's sealed-head channel closed.
    Stopped,
    /// The partition's answer differed from the primary's at this seq.
    Diverged(u64),
    /// The partition stands at this seq, but retention already truncated the records
    /// after it: it can only be rebuilt from a snapshot.
    Truncated(u64),
}

/// Backoff between attempts to apply one record.
#[derive(Debug, Clone, Copy)]
pub struct Backoff {
    /// The first wait.
    pub initial: Duration,
    /// The longest wait.
    pub max: Duration,
}

impl Default for Backoff {
    fn default() -> Self {
        Backoff {
            initial: Duration::from_millis(25),
            max: Duration::from_secs(1),
        }
    }
}

impl Backoff {
    fn delay(&self, attempt: u32) -> Duration {
        let factor = 1u32 << attempt.saturating_sub(1).min(16);
        self.initial.saturating_mul(factor).min(self.max)
    }
}

/// Replays one group's journal on one partition.
pub struct Replayer {
    group: String,
    partition: String,
    journal: Arc<dyn Journal>,
    applier: Arc<dyn Applier>,
    compare: Compare,
    backoff: Backoff,
    batch: u64,
    /// Sends records behind their predecessor, with the most on their way at once.
    pipeline: Option<(Arc<dyn PipelinedApplier>, usize)>,
    /// Which records are independent (parallel replay), when declared.
    keys: Option<Arc<ConflictKeys>>,
    /// The checkpoint this replayer saved last (an exactly-once partition's lags behind
    /// what it applied: see [`CHECKPOINT_EVERY`]).
    saved: AtomicU64,
}

impl std::fmt::Debug for Replayer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Replayer")
            .field("group", &self.group)
            .field("partition", &self.partition)
            .field("compare", &self.compare)
            .finish_non_exhaustive()
    }
}

impl Replayer {
    /// A replayer for `partition` of `group`.
    pub fn new(
        group: &str,
        partition: &str,
        journal: Arc<dyn Journal>,
        applier: Arc<dyn Applier>,
    ) -> Self {
        Replayer {
            group: group.to_owned(),
            partition: partition.to_owned(),
            journal,
            applier,
            compare: Compare::default(),
            backoff: Backoff::default(),
            batch: 256,
            pipeline: None,
            saved: AtomicU64::new(0),
            keys: None,
        }
    }

    /// Keeps up to `window` records on their way to the partition at once, each after the
    /// first sent through `applier` (the same partition's, able to send a record behind the
    /// one before it), when the partition keeps the exactly-once record: its app layer then
    /// applies them one at a time in seq order, and one that arrives again (after a broken
    /// window) is answered from its record. A window of 1, or a partition without that
    /// record, gets each record answered before the next is sent.
    pub fn pipelined(mut self, applier: Arc<dyn PipelinedApplier>, window: usize) -> Self {
        self.pipeline = (window > 1).then_some((applier, window));
        self
    }

    /// Replays records that share no conflict key in parallel (with [`Replayer::pipelined`],
    /// to a partition whose layer records out of seq order): each is sent behind only the
    /// records in flight it conflicts with. Outcomes are still taken in seq order, so the
    /// checkpoint and the position stay a dense prefix. No rules: in seq order, as before.
    pub fn conflict_keys(mut self, keys: Arc<ConflictKeys>) -> Self {
        self.keys = (!keys.is_empty()).then_some(keys);
        self
    }

    /// Sets how answers are compared with the primary's.
    pub fn compare(mut self, compare: Compare) -> Self {
        self.compare = compare;
        self
    }

    /// Sets the retry backoff.
    pub fn backoff(mut self, backoff: Backoff) -> Self {
        self.backoff = backoff;
        self
    }

    /// Replays from the partition's durable checkpoint, following `sealed` (the highest
    /// seq up to which every record is sealed), until `stop` turns true or `sealed` closes.
    /// The checkpoint is saved after every record, before the next one is sent; for a
    /// partition that keeps its own exactly-once record, in batches ([`CHECKPOINT_EVERY`]).
    pub async fn run(
        self,
        mut sealed: watch::Receiver<u64>,
        mut stop: watch::Receiver<bool>,
        observer: Arc<dyn ReplayObserver>,
    ) -> ReplayExit {
        let Some(mut applied) = self
            .retry_journal(&mut stop, || {
                self.journal.checkpoint(&self.group, &self.partition)
            })
            .await
        else {
            return ReplayExit::Stopped;
        };
        // What the journal holds, even where the partition then says it stands elsewhere.
        self.saved.store(applied, Ordering::Relaxed);
        observer.applied(applied);
        // A quarantined partition stays so until an operator rejoins it.
        let Some(quarantined) = self
            .retry_journal(&mut stop, || {
                self.journal.diverged(&self.group, &self.partition)
            })
            .await
        else {
            return ReplayExit::Stopped;
        };
        if let Some(reason) = quarantined {
            observer.diverged(applied, &reason);
            return ReplayExit::Diverged(applied);
        }
        // A partition that keeps its own exactly-once record says where to resume (after a
        // restore, or when the last checkpoint lagged), and re-delivery to it is harmless, so
        // its checkpoint is saved in batches rather than after every record.
        let Some(position) = self.position(&mut stop).await else {
            return ReplayExit::Stopped;
        };
        let exactly_once = position.is_some();
        let parallel = self.keys.is_some() && position.is_some_and(|p| p.parallel());
        if self.keys.is_some() && exactly_once && !parallel {
            tracing::info!(group = %self.group, partition = %self.partition,
                "conflict keys are declared, but this partition's layer records in seq order \
                 only (no floor column): replaying in seq order");
        }
        if let Some(p) = position.map(|p| p.resume_at())
            && p != applied
        {
            tracing::info!(group = %self.group, partition = %self.partition, journal = applied,
                partition_says = p, "resuming from the partition's own record");
            applied = p;
            observer.applied(applied);
        }
        loop {
            let target = *sealed.borrow_and_update();
            if target <= applied {
                // Caught up. An exactly-once partition's checkpoint, saved in batches, is
                // saved once nothing new came for a while.
                let lags = self.saved.load(Ordering::Relaxed) < applied;
                tokio::select! {
                    biased;
                    changed = sealed.changed() => if changed.is_err() { return ReplayExit::Stopped },
                    _ = stop.changed() => return ReplayExit::Stopped,
                    () = tokio::time::sleep(CHECKPOINT_IDLE), if lags => {
                        if self.save_checkpoint(applied, &mut stop).await.is_none() {
                            return ReplayExit::Stopped;
                        }
                    }
                }
                continue;
            }
            let limit = (target - applied).min(self.batch);
            let Some(records) = self
                .retry_journal(&mut stop, || {
                    self.journal.read_after(&self.group, applied, limit)
                })
                .await
            else {
                return ReplayExit::Stopped;
            };
            if records.first().is_none_or(|r| r.seq != applied + 1) {
                // Retention may have removed what this partition still needs.
                if let Some(low) = self
                    .retry_journal(&mut stop, || self.journal.low_water(&self.group))
                    .await
                    && low > applied
                {
                    tracing::warn!(group = %self.group, partition = %self.partition, applied,
                        low_water = low, "the records this partition needs were truncated");
                    return ReplayExit::Truncated(applied);
                }
            }
            // The records that follow on densely from `applied`, sealed.
            let dense = records
                .iter()
                .zip(applied + 1..)
                .take_while(|(r, seq)| r.seq == *seq && r.state.is_sealed())
                .count();
            let next = match &self.pipeline {
                Some((behind, window)) if exactly_once => {
                    self.replay_window(
                        behind.as_ref(),
                        *window,
                        parallel,
                        &records[..dense],
                        &mut applied,
                        &mut stop,
                        observer.as_ref(),
                    )
                    .await
                }
                _ => {
                    self.replay_serially(
                        &records[..dense],
                        exactly_once,
                        &mut applied,
                        &mut stop,
                        observer.as_ref(),
                    )
                    .await
                }
            };
            let resumed = match next {
                Next::Go => false,
                Next::Resume => true,
                Next::Exit(exit) => return exit,
            };
            if !resumed && let Some(record) = records.get(dense) {
                tracing::error!(group = %self.group, partition = %self.partition,
                    seq = record.seq, expected = applied + 1, state = record.state.as_str(),
                    "journal is not dense and sealed where the group says it is; waiting");
            }
        }
    }

    /// Replays `records` (dense from `*applied + 1`, sealed) one at a time: each is
    /// answered before the next is sent.
    async fn replay_serially(
        &self,
        records: &[Record],
        exactly_once: bool,
        applied: &mut u64,
        stop: &mut watch::Receiver<bool>,
        observer: &dyn ReplayObserver,
    ) -> Next {
        for record in records {
            if *stop.borrow() {
                return Next::Exit(ReplayExit::Stopped);
            }
            let step = if record.state == RecordState::Executed {
                Some(
                    self.apply(record, exactly_once, None, 0, stop, observer)
                        .await,
                )
            } else {
                None
            };
            match self
                .after(record, step, applied, exactly_once, stop, observer)
                .await
            {
                Next::Go => {}
                other => return other,
            }
        }
        Next::Go
    }

    /// Replays `records` (dense from `*applied + 1`, sealed) with up to `window` of them on
    /// their way to an exactly-once partition at once: the first executed one as usual,
    /// each next one right behind the one sent before it. Outcomes are taken in seq order.
    /// At the first failure the rest of the window is dropped (what of it reached the
    /// partition is answered from its record when it comes again) and the failed record
    /// goes the serial way, with its retries; the next batch starts a new window.
    /// With `parallel`, each is sent behind only the records in flight it conflicts with
    /// (its conflict keys), with the dense prefix taken so far as its floor.
    #[allow(clippy::too_many_arguments)]
    async fn replay_window(
        &self,
        behind: &dyn PipelinedApplier,
        window: usize,
        parallel: bool,
        records: &[Record],
        applied: &mut u64,
        stop: &mut watch::Receiver<bool>,
        observer: &dyn ReplayObserver,
    ) -> Next {
        type Sent<'a> =
            Pin<Box<dyn Future<Output = Option<Result<Fingerprint, ApplyError>>> + Send + 'a>>;
        let mut in_flight: FuturesOrdered<Sent<'_>> = FuturesOrdered::new();
        let mut sent = records.iter();
        let mut taken = records.iter();
        // The executed record sent last: the next one goes right behind it.
        let mut prev: Option<u64> = None;
        // Parallel: the executed records sent and not taken yet, with their keys.
        let mut pending: std::collections::VecDeque<(u64, Option<Vec<String>>)> =
            std::collections::VecDeque::new();
        loop {
            if *stop.borrow() {
                return Next::Exit(ReplayExit::Stopped);
            }
            while in_flight.len() < window
                && let Some(record) = sent.next()
            {
                let outcome: Sent<'_> = if record.state != RecordState::Executed {
                    Box::pin(async { None })
                } else if parallel {
                    let keys = self.keys.as_ref().and_then(|k| k.keys(&record.payload));
                    // Those before it are recorded once taken; of those in flight, it waits
                    // for the ones it conflicts with (all of them, for a barrier).
                    let after: Vec<u64> = pending
                        .iter()
                        .filter(|(_, k)| conflict(k.as_deref(), keys.as_deref()))
                        .map(|(seq, _)| *seq)
                        .collect();
                    pending.push_back((record.seq, keys));
                    let floor = *applied;
                    Box::pin(async move {
                        let order = Behind::After {
                            after: &after,
                            floor,
                        };
                        Some(behind.apply_pipelined(record, order).await)
                    })
                } else if let Some(p) = prev {
                    Box::pin(
                        async move { Some(behind.apply_pipelined(record, Behind::Prev(p)).await) },
                    )
                } else {
                    Box::pin(async move { Some(self.applier.apply(record).await) })
                };
                if record.state == RecordState::Executed {
                    prev = Some(record.seq);
                }
                in_flight.push_back(outcome);
            }
            let outcome = tokio::select! {
                biased;
                o = in_flight.next() => o,
                _ = stop.changed() => return Next::Exit(ReplayExit::Stopped),
            };
            let (Some(outcome), Some(record)) = (outcome, taken.next()) else {
                return Next::Go;
            };
            if pending.front().is_some_and(|(seq, _)| *seq == record.seq) {
                pending.pop_front();
            }
            let step = match outcome {
                None => None,
                Some(Ok(answer)) => Some(self.judge(record, &answer)),
                Some(Err(e)) => {
                    observer.apply_failed(record.seq, 1, &e);
                    tracing::debug!(group = %self.group, partition = %self.partition,
                        seq = record.seq, error = %e, "pipelined replay failed; going on one at a time");
                    drop(in_flight);
                    let via = parallel.then_some((behind, *applied));
                    let step = self.apply(record, true, via, 1, stop, observer).await;
                    return match self
                        .after(record, Some(step), applied, true, stop, observer)
                        .await
                    {
                        Next::Go => Next::Resume,
                        other => other,
                    };
                }
            };
            match self
                .after(record, step, applied, true, stop, observer)
                .await
            {
                Next::Go => {}
                other => return other,
            }
        }
    }

    /// What follows a record's outcome, in seq order (`step` None: a record not replayed,
    /// as it was not executed): a divergence quarantines the partition durably; an applied
    /// or passed record moves the checkpoint (in batches for an exactly-once partition) and
    /// the position.
    #[allow(clippy::too_many_arguments)]
    async fn after(
        &self,
        record: &Record,
        step: Option<Step>,
        applied: &mut u64,

        exactly_once: bool,
        stop: &mut watch::Receiver<bool>,
        observer: &dyn ReplayObserver,
    ) -> Next {
        match step {
            None | Some(Step::Applied) => {}
            Some(Step::Stopped) => return Next::Exit(ReplayExit::Stopped),
            Some(Step::Reposition(p)) => {
                tracing::info!(group = %self.group, partition = %self.partition,
                    was = *applied, now = p, "partition came back elsewhere; resuming there");
                *applied = p;
                observer.applied(p);
                return Next::Resume;
            }
            Some(Step::Diverged(reason)) => {
                tracing::warn!(group = %self.group, partition = %self.partition,
                    seq = record.seq, %reason, "partition diverged");
                let _ = self
                    .journal
                    .save_checkpoint(&self.group, &self.partition, record.seq)
                    .await;
                // Durable: the quarantine outlives a restart of the proxy.
                self.retry_journal(stop, || {
                    self.journal
                        .set_diverged(&self.group, &self.partition, Some(&reason))
                })
                .await;
                observer.diverged(record.seq, &reason);
                return Next::Exit(ReplayExit::Diverged(record.seq));
            }
        }
        let seq = record.seq;
        let save = !exactly_once || seq.is_multiple_of(CHECKPOINT_EVERY);
        if save && self.save_checkpoint(seq, stop).await.is_none() {
            return Next::Exit(ReplayExit::Stopped);
        }
        *applied = seq;
        observer.applied(seq);
        Next::Go
    }

    /// Saves `seq` as the partition's checkpoint (retrying while the journal is away):
    /// `None` when stopped first.
    async fn save_checkpoint(&self, seq: u64, stop: &mut watch::Receiver<bool>) -> Option<()> {
        self.retry_journal(stop, || {
            self.journal
                .save_checkpoint(&self.group, &self.partition, seq)
        })
        .await?;
        self.saved.store(seq, Ordering::Relaxed);
        Some(())
    }

    /// Whether `answer` is the primary's (a record resolved as executed by an operator has
    /// nothing to compare with).
    fn judge(&self, record: &Record, answer: &Fingerprint) -> Step {
        let Some(expected) = &record.fingerprint else {
            return Step::Applied;
        };
        match self.compare.mismatch(expected, answer) {
            None => Step::Applied,
            Some(reason) => Step::Diverged(format!("seq {}: {reason}", record.seq)),
        }
    }

    /// Asks the partition where it stands, retrying while it is unreachable.
    async fn position(&self, stop: &mut watch::Receiver<bool>) -> Option<Option<Position>> {
        let mut attempt = 0u32;
        loop {
            match self.applier.position().await {
                Ok(p) => return Some(p),
                Err(e) => {
                    attempt = attempt.saturating_add(1);
                    tracing::debug!(group = %self.group, partition = %self.partition,
                        attempt, error = %e, "cannot ask the partition where it stands");
                    if !self.sleep_or_stop(attempt, stop).await {
                        return None;
                    }
                }
            }
        }
    }

    /// Sends `record` until the partition answers, with backoff. With `parallel` (the
    /// applier, and the dense prefix taken: everything before `record`), it goes the
    /// parallel way, behind nothing: a copy that took later records out of seq order, of a
    /// later epoch, must not fence it as it would a deposed sender's. `failed`: the
    /// attempts at it that failed already (in a window); the observer's count goes on
    /// from there.
    #[allow(clippy::too_many_arguments)]
    async fn apply(
        &self,
        record: &Record,
        exactly_once: bool,
        parallel: Option<(&dyn PipelinedApplier, u64)>,
        failed: u32,
        stop: &mut watch::Receiver<bool>,
        observer: &dyn ReplayObserver,
    ) -> Step {
        let mut attempt = 0u32;
        loop {
            if attempt > 0
                && exactly_once
                && let Ok(Some(p)) = self.applier.position().await
            {
                // Out of seq order the copy is dense only up to its resume, which may lag what
                // it recorded: going back there re-sends a few records, each answered from its
                // record, and fills any hole a restore left.
                let at = p.resume_at();
                if at + 1 != record.seq {
                    return Step::Reposition(at);
                }
            }
            let sent = match parallel {
                Some((applier, floor)) => {
                    let alone = Behind::After { after: &[], floor };
                    applier.apply_pipelined(record, alone).await
                }
                None => self.applier.apply(record).await,
            };
            match sent {
                Ok(answer) => return self.judge(record, &answer),
                // Without the app layer's record, a request that may have reached the
                // partition cannot be sent again: it may still be applied late, after the
                // retry, where no answer shows it (the fingerprint check sees only the
                // retry's). The copy is quarantined instead of possibly applying it twice.
                Err(e @ ApplyError::NoAnswer(_)) if !exactly_once => {
                    return Step::Diverged(format!(
                        "seq {}: {e}; it keeps no exactly-once record, so it may have applied \
                         it, and sending it again could apply it twice: rebuild it",
                        record.seq
                    ));
                }
                Err(e) => {
                    attempt = attempt.saturating_add(1);
                    let counted = attempt.saturating_add(failed);
                    observer.apply_failed(record.seq, counted, &e);
                    tracing::debug!(group = %self.group, partition = %self.partition,
                        seq = record.seq, attempt = counted, error = %e, "replay attempt failed");
                    if !self.sleep_or_stop(attempt, stop).await {
                        return Step::Stopped;
                    }
                }
            }
        }
    }

    async fn retry_journal<T, F, Fut>(
        &self,
        stop: &mut watch::Receiver<bool>,
        mut op: F,
    ) -> Option<T>
    where
        F: FnMut() -> Fut,
        Fut: Future<Output = Result<T, JournalError>>,
    {
        let mut attempt = 0u32;
        loop {
            match op().await {
                Ok(v) => return Some(v),
                Err(e) => {
                    attempt = attempt.saturating_add(1);
                    tracing::warn!(group = %self.group, partition = %self.partition,
                        attempt, error = %e, "journal access failed; retrying");
                    if !self.sleep_or_stop(attempt, stop).await {
                        return None;
                    }
                }
            }
        }
    }

    /// Waits out the backoff; false when asked to stop meanwhile.
    async fn sleep_or_stop(&self, attempt: u32, stop: &mut watch::Receiver<bool>) -> bool {
        if *stop.borrow() {
            return false;
        }
        tokio::select! {
            biased;
            _ = tokio::time::sleep(self.backoff.delay(attempt)) => !*stop.borrow(),
            _ = stop.changed() => false,
        }
    }
}

/// What the replay loop does after a run of records.
enum Next {
    /// Every record given was taken: read the next ones.
    Go,
    /// Read again from the position (it moved, or a window broke).
    Resume,
    /// The replayer stops.
    Exit(ReplayExit),
}

enum Step {
    Applied,
    Stopped,
    Diverged(String),
    /// The partition's own record says it stands elsewhere (restarted from a backup, or
    /// already applied this record): resume after this seq.
    Reposition(u64),
}

/// With an exactly-once partition, the journal checkpoint is saved every this many records,
/// and once the replayer has been caught up for [`CHECKPOINT_IDLE`]: a partition that keeps
/// up with a steady stream of updates saves one checkpoint per 64 of them, not one each.
/// Re-delivery to such a partition is harmless, and it says itself where to resume.
const CHECKPOINT_EVERY: u64 = 64;

/// How long a caught-up replayer waits for the next record before it saves a lagging
/// checkpoint.
const CHECKPOINT_IDLE: Duration = Duration::from_millis(100);

#[cfg(test)]
mod tests {
    use super::*;
    use crate::journal::{Checkpoints, Journal, Log as _, Outcome, SqlJournal};
    use crate::record::{Fingerprint, RecordedRequest};
    use bytes::Bytes;
    use std::sync::Mutex;

    /// An applier that answers with the request body, failing the first `fail` attempts.
    struct Echo {
        fail: Mutex<u32>,
        seen: Mutex<Vec<u64>>,
        corrupt_seq: Option<u64>,
    }

    #[async_trait::async_trait]
    impl Applier for Echo {
        async fn apply(&self, record: &Record) -> Result<Fingerprint, ApplyError> {
            {
                let mut fail = self
                    .fail
                    .lock()
                    .map_err(|_| ApplyError::NoAnswer("poisoned".into()))?;
                if *fail > 0 {
                    *fail -= 1;
                    return Err(ApplyError::Unreachable("refused".into()));
                }
            }
            if let Ok(mut seen) = self.seen.lock() {
                seen.push(record.seq);
            }
            if self.corrupt_seq == Some(record.seq) {
                return Ok(Fingerprint::of(200, b"something else"));
            }
            echo(record)
        }
    }

    /// The answer of a partition that answers with the request body.
    fn echo(record: &Record) -> Result<Fingerprint, ApplyError> {
        match &record.payload {
            crate::record::Payload::Http(request) => Ok(Fingerprint::of(200, &request.body)),
            crate::record::Payload::Sql(_) => Err(ApplyError::Unreachable("sql".into())),
        }
    }

    #[derive(Default)]
    struct Log(Mutex<Vec<String>>);

    impl ReplayObserver for Log {
        fn applied(&self, seq: u64) {
            if let Ok(mut l) = self.0.lock() {
                l.push(format!("applied {seq}"));
            }
        }
        fn apply_failed(&self, seq: u64, attempt: u32, _: &ApplyError) {
            if let Ok(mut l) = self.0.lock() {
                l.push(format!("failed {seq} #{attempt}"));
            }
        }
        fn diverged(&self, seq: u64, reason: &str) {
            if let Ok(mut l) = self.0.lock() {
                l.push(format!("diverged {seq}: {reason}"));
            }
        }
    }

    async fn journal_with(dir: &tempfile::TempDir, n: u64, skip: &[u64]) -> Arc<SqlJournal> {
        let bodies: Vec<String> = (1..=n).map(|seq| format!("body {seq}")).collect();
        journal_of(dir, &bodies, skip).await
    }

    /// A journal of sealed records with these bodies, seq 1 first: executed, answered with
    /// their body, but those in `skip` skipped.
    pub(super) async fn journal_of(
        dir: &tempfile::TempDir,
        bodies: &[String],
        skip: &[u64],
    ) -> Arc<SqlJournal> {
        let url = format!("sqlite://{}", dir.path().join("j.db").display());
        let j = SqlJournal::connect(&url).await.expect("journal opens");
        fill(&j, bodies, skip).await;
        Arc::new(j)
    }

    /// Opens group "g" in `j` and writes sealed records with these bodies, seq 1 first:
    /// executed, answered with their body, but those in `skip` skipped.
    async fn fill(j: &impl Journal, bodies: &[String], skip: &[u64]) {
        j.open_group("g", "a").await.expect("group opens");
        for (seq, body) in (1..).zip(bodies) {
            let r = Record::pending(
                "g",
                seq,
                1,
                RecordedRequest {
                    method: "POST".into(),
                    uri: "/".into(),
                    headers: vec![],
                    body: Bytes::from(body.clone()),
                },
            );
            j.append(&r).await.expect("append");
            let outcome = if skip.contains(&seq) {
                Outcome::Skipped
            } else {
                Outcome::Executed(Some(Fingerprint::of(200, body.as_bytes())))
            };
            j.seal("g", seq, &outcome).await.expect("seal");
        }
    }

    #[tokio::test]
    #[allow(clippy::unwrap_used)]
    async fn replays_in_order_skips_skipped_retries_and_resumes() {
        let dir = tempfile::tempdir().unwrap();
        let j = journal_with(&dir, 5, &[3]).await;
        let echo = Arc::new(Echo {
            fail: Mutex::new(2),
            seen: Mutex::new(vec![]),
            corrupt_seq: None,
        });
        let (sealed_tx, sealed) = watch::channel(4u64);
        let (stop_tx, stop) = watch::channel(false);
        let log = Arc::new(Log::default());
        let r = Replayer::new("g", "b", j.clone(), echo.clone());
        let task = tokio::spawn(r.run(sealed, stop, log.clone()));
        // Only up to the sealed head (4) is replayed.
        for _ in 0..200 {
            if j.checkpoint("g", "b").await.unwrap() == 4 {
                break;
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        assert_eq!(*echo.seen.lock().unwrap(), vec![1, 2, 4]);
        sealed_tx.send(5).unwrap();
        for _ in 0..200 {
            if j.checkpoint("g", "b").await.unwrap() == 5 {
                break;
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        stop_tx.send(true).unwrap();
        assert_eq!(task.await.unwrap(), ReplayExit::Stopped);
        assert_eq!(*echo.seen.lock().unwrap(), vec![1, 2, 4, 5]);
        let log = log.0.lock().unwrap().clone();
        assert_eq!(&log[..3], ["applied 0", "failed 1 #1", "failed 1 #2"]);

        // A new replayer resumes from the checkpoint: nothing is sent twice.
        let (_sealed_tx, sealed) = watch::channel(5u64);
        let (stop_tx, stop) = watch::channel(false);
        let again = Arc::new(Echo {
            fail: Mutex::new(0),
            seen: Mutex::new(vec![]),
            corrupt_seq: None,
        });
        let task = tokio::spawn(Replayer::new("g", "b", j.clone(), again.clone()).run(
            sealed,
            stop,
            Arc::new(Log::default()),
        ));
        tokio::time::sleep(Duration::from_millis(50)).await;
        stop_tx.send(true).unwrap();
        assert_eq!(task.await.unwrap(), ReplayExit::Stopped);
        assert!(again.seen.lock().unwrap().is_empty());
    }

    #[tokio::test]
    #[allow(clippy::unwrap_used)]
    async fn a_different_answer_marks_the_partition_diverged() {
        let dir = tempfile::tempdir().unwrap();
        let j = journal_with(&dir, 3, &[]).await;
        let echo = Arc::new(Echo {
            fail: Mutex::new(0),
            seen: Mutex::new(vec![]),
            corrupt_seq: Some(2),
        });
        let (_sealed_tx, sealed) = watch::channel(3u64);
        let (_stop_tx, stop) = watch::channel(false);
        let log = Arc::new(Log::default());
        let exit = Replayer::new("g", "b", j.clone(), echo.clone())
            .run(sealed, stop, log.clone())
            .await;
        assert_eq!(exit, ReplayExit::Diverged(2));
        assert_eq!(*echo.seen.lock().unwrap(), vec![1, 2]);
        // The quarantine is durable: a new replayer (a restarted proxy) sends nothing.
        let (_sealed_tx, sealed) = watch::channel(3u64);
        let (_stop_tx, stop) = watch::channel(false);
        let again = Replayer::new("g", "b", j.clone(), echo.clone())
            .run(sealed, stop, Arc::new(Log::default()))
            .await;
        assert_eq!(again, ReplayExit::Diverged(2));
        assert_eq!(*echo.seen.lock().unwrap(), vec![1, 2]);
        let log = log.0.lock().unwrap().clone();
        assert!(
            log[2].starts_with("diverged 2: seq 2: body hash"),
            "{log:?}"
        );
    }

    /// An applier without the exactly-once record whose answer to `lost` never comes back
    /// (the partition may have applied it).
    struct LosesAnswer {
        lost: u64,
        seen: Mutex<Vec<u64>>,
    }

    #[async_trait::async_trait]
    impl Applier for LosesAnswer {
        async fn apply(&self, record: &Record) -> Result<Fingerprint, ApplyError> {
            if let Ok(mut seen) = self.seen.lock() {
                seen.push(record.seq);
            }
            if record.seq == self.lost {
                return Err(ApplyError::NoAnswer("timed out".into()));
            }
            echo(record)
        }
    }

    /// A replay with no answer is never sent again to a partition without the exactly-once
    /// record (it may still apply it late, where no answer would show it): it is quarantined.
    #[tokio::test]
    #[allow(clippy::unwrap_used)]
    async fn no_answer_from_a_partition_without_the_record_quarantines_it_instead_of_resending() {
        let dir = tempfile::tempdir().unwrap();
        let j = journal_with(&dir, 3, &[]).await;
        let applier = Arc::new(LosesAnswer {
            lost: 2,
            seen: Mutex::new(vec![]),
        });
        let (_sealed_tx, sealed) = watch::channel(3u64);
        let (_stop_tx, stop) = watch::channel(false);
        let log = Arc::new(Log::default());
        let exit = tokio::time::timeout(
            Duration::from_secs(10),
            Replayer::new("g", "b", j.clone(), applier.clone()).run(sealed, stop, log.clone()),
        )
        .await
        .unwrap_or_else(|_| panic!("still replaying: {:?}", applier.seen.lock().unwrap()));
        assert_eq!(exit, ReplayExit::Diverged(2));
        assert_eq!(*applier.seen.lock().unwrap(), vec![1, 2]);
        let log = log.0.lock().unwrap().clone();
        assert!(
            log.iter()
                .any(|l| l.starts_with("diverged 2:") && l.contains("may have applied it")),
            "{log:?}"
        );
        assert!(j.diverged("g", "b").await.unwrap().is_some());
    }

    #[tokio::test]
    #[allow(clippy::unwrap_used)]
    async fn a_partition_whose_records_were_truncated_stops_as_truncated() {
        let dir = tempfile::tempdir().unwrap();
        let j = journal_with(&dir, 8, &[]).await;
        j.save_checkpoint("g", "b", 2).await.unwrap();
        j.save_checkpoint("g", "c", 5).await.unwrap();
        assert_eq!(j.truncate("g", 5).await.unwrap(), 5);
        let run = |partition: &'static str| {
            let (j, echo) = (
                j.clone(),
                Arc::new(Echo {
                    fail: Mutex::new(0),
                    seen: Mutex::new(vec![]),
                    corrupt_seq: None,
                }),
            );
            async move {
                let (_sealed_tx, sealed) = watch::channel(8u64);
                let (stop_tx, stop) = watch::channel(false);
                let task =
                    tokio::spawn(Replayer::new("g", partition, j.clone(), echo.clone()).run(
                        sealed,
                        stop,
                        Arc::new(Log::default()),
                    ));
                for _ in 0..200 {
                    if task.is_finished() || j.checkpoint("g", partition).await.unwrap() == 8 {
                        break;
                    }
                    tokio::time::sleep(Duration::from_millis(10)).await;
                }
                let _ = stop_tx.send(true);
                let exit = task.await.unwrap();
                let seen = echo.seen.lock().unwrap().clone();
                (exit, seen)
            }
        };
        // b needs record 3, which is gone: nothing is sent, it must be rebuilt.
        assert_eq!(run("b").await, (ReplayExit::Truncated(2), vec![]));
        // c needs 6 on, which the journal still holds.
        assert_eq!(run("c").await, (ReplayExit::Stopped, vec![6, 7, 8]));
    }

    /// A partition that keeps the exactly-once record, takes a moment per record and, as the
    /// app layer does, runs a record sent behind another only once that one is recorded
    /// (waiting for it, bounded); counts how many records were on their way at once.
    #[derive(Default)]
    struct Layered {
        state: Mutex<Layer>,
    }

    #[derive(Default)]
    struct Layer {
        applied: u64,
        on_the_way: usize,
        most_on_the_way: usize,
        executed: Vec<u64>,
        /// Seqs refused once each (a seq listed twice is refused twice).
        failures: Vec<u64>,
    }

    /// Counts one record on its way to [`Layered`] while it lives.
    struct OnTheWay<'a>(&'a Layered);

    impl Drop for OnTheWay<'_> {
        fn drop(&mut self) {
            if let Ok(mut s) = self.0.state.lock() {
                s.on_the_way -= 1;
            }
        }
    }

    impl Layered {
        fn lock(&self) -> Result<std::sync::MutexGuard<'_, Layer>, ApplyError> {
            self.state
                .lock()
                .map_err(|_| ApplyError::NoAnswer("poisoned".into()))
        }

        async fn exchange(&self, record: &Record, prev: u64) -> Result<Fingerprint, ApplyError> {
            {
                let mut s = self.lock()?;
                s.on_the_way += 1;
                s.most_on_the_way = s.most_on_the_way.max(s.on_the_way);
            }
            let _counted = OnTheWay(self);
            {
                let mut s = self.lock()?;
                if let Some(i) = s.failures.iter().position(|seq| *seq == record.seq) {
                    s.failures.remove(i);
                    return Err(ApplyError::Unreachable("refused".into()));
                }
            }
            for _ in 0..1000 {
                if self.lock()?.applied >= prev {
                    break;
                }
                tokio::time::sleep(Duration::from_millis(1)).await;
            }
            tokio::time::sleep(Duration::from_millis(2)).await;
            let mut s = self.lock()?;
            if s.applied < prev {
                return Err(ApplyError::Unreachable("behind".into()));
            }
            // A record it has recorded is answered from the record.
            if record.seq > s.applied {
                s.applied = record.seq;
                s.executed.push(record.seq);
            }
            match &record.payload {
                crate::record::Payload::Http(request) => Ok(Fingerprint::of(200, &request.body)),
                crate::record::Payload::Sql(_) => Err(ApplyError::Unreachable("sql".into())),
            }
        }
    }

    #[async_trait::async_trait]
    impl Applier for Layered {
        async fn apply(&self, record: &Record) -> Result<Fingerprint, ApplyError> {
            let prev = self.lock()?.applied;
            self.exchange(record, prev).await
        }

        async fn position(&self) -> Result<Option<Position>, ApplyError> {
            Ok(Some(Position::in_order(self.lock()?.applied)))
        }
    }

    #[async_trait::async_trait]
    impl PipelinedApplier for Layered {
        async fn apply_pipelined(
            &self,
            record: &Record,
            behind: Behind<'_>,
        ) -> Result<Fingerprint, ApplyError> {
            match behind {
                Behind::Prev(prev) => self.exchange(record, prev).await,
                Behind::After { .. } => Err(ApplyError::Unreachable(format!(
                    "record {}: this layer applies in seq order only",
                    record.seq
                ))),
            }
        }
    }

    /// A replayer of partition "b" of group "g" over `j`, retrying within milliseconds, with
    /// up to `window` records on their way to `partition` at once.
    pub(super) fn fast_pipelined<P: Applier + PipelinedApplier>(
        j: &Arc<SqlJournal>,
        partition: Arc<P>,
        window: usize,
    ) -> Replayer {
        Replayer::new("g", "b", j.clone(), partition.clone())
            .backoff(Backoff {
                initial: Duration::from_millis(1),
                max: Duration::from_millis(5),
            })
            .pipelined(partition, window)
    }

    /// Runs `replayer` (of partition "b" of group "g") until its checkpoint reaches the
    /// journal's `n` sealed records, stops it, and checks that it stopped there.
    pub(super) async fn replay_to_the_end(
        replayer: Replayer,
        j: &SqlJournal,
        n: u64,
        observer: Arc<dyn ReplayObserver>,
    ) {
        let (_sealed_tx, sealed) = watch::channel(n);
        let (stop_tx, stop) = watch::channel(false);
        let task = tokio::spawn(replayer.run(sealed, stop, observer));
        for _ in 0..2000 {
            if j.checkpoint("g", "b").await.expect("checkpoint") == n {
                break;
            }
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
        let _ = stop_tx.send(true);
        assert_eq!(task.await.expect("replayer"), ReplayExit::Stopped);
        assert_eq!(j.checkpoint("g", "b").await.expect("checkpoint"), n);
    }

    /// Replays `n` records on an exactly-once partition with a window of `window`, each seq
    /// of `failures` refused once: what the partition did, and what the observer heard.
    async fn replay_pipelined(n: u64, window: usize, failures: &[u64]) -> (Layer, Vec<String>) {
        let dir = tempfile::tempdir().expect("temp dir");
        let j = journal_with(&dir, n, &[]).await;
        let partition = Arc::new(Layered::default());
        if let Ok(mut s) = partition.state.lock() {
            s.failures = failures.to_vec();
        }
        let replayer = fast_pipelined(&j, partition.clone(), window);
        let log = Arc::new(Log::default());
        replay_to_the_end(replayer, &j, n, log.clone()).await;
        let heard = std::mem::take(&mut *log.0.lock().expect("log"));
        (
            std::mem::take(&mut *partition.state.lock().expect("state")),
            heard,
        )
    }

    #[tokio::test]
    async fn an_exactly_once_partition_gets_a_window_of_records_applied_in_order() {
        let (layer, _) = replay_pipelined(40, 4, &[]).await;
        assert_eq!(layer.executed, (1..=40).collect::<Vec<_>>());
        assert!(
            layer.most_on_the_way > 1,
            "one record at a time: {}",
            layer.most_on_the_way
        );
        assert!(
            layer.most_on_the_way <= 4,
            "{} on their way",
            layer.most_on_the_way
        );
    }

    #[tokio::test]
    async fn a_broken_window_goes_on_one_at_a_time_and_applies_nothing_twice() {
        let (layer, _) = replay_pipelined(40, 4, &[7]).await;
        assert_eq!(layer.executed, (1..=40).collect::<Vec<_>>());
        assert!(layer.most_on_the_way > 1);
    }

    #[tokio::test]
    async fn a_record_refused_in_a_window_and_again_alone_counts_its_attempts_on() {
        let (layer, heard) = replay_pipelined(20, 4, &[7, 7]).await;
        assert_eq!(layer.executed, (1..=20).collect::<Vec<_>>());
        let failed: Vec<&str> = heard
            .iter()
            .map(String::as_str)
            .filter(|l| l.starts_with("failed"))
            .collect();
        assert_eq!(failed, ["failed 7 #1", "failed 7 #2"]);
    }

    #[tokio::test]
    async fn a_window_of_one_sends_one_record_at_a_time() {
        let (layer, _) = replay_pipelined(20, 1, &[]).await;
        assert_eq!(layer.executed, (1..=20).collect::<Vec<_>>());
        assert_eq!(layer.most_on_the_way, 1);
    }

    /// A partition that says it stands ahead of its journal checkpoint (the checkpoint
    /// lagged when the proxy stopped) gets that checkpoint saved once its replayer idles,
    /// even with nothing left to send it.
    #[tokio::test(start_paused = true)]
    async fn a_checkpoint_behind_the_partitions_own_record_is_saved_once_idle() {
        let j = Arc::new(crate::journal::MemoryJournal::new());
        let bodies: Vec<String> = (1..=5).map(|seq| format!("body {seq}")).collect();
        fill(j.as_ref(), &bodies, &[]).await;
        let partition = Arc::new(Layered::default());
        partition.state.lock().expect("state").applied = 5;
        let replayer = Replayer::new("g", "b", j.clone(), partition.clone());
        let (_sealed_tx, sealed) = watch::channel(5u64);
        let (stop_tx, stop) = watch::channel(false);
        let task = tokio::spawn(replayer.run(sealed, stop, Arc::new(Log::default())));
        tokio::time::sleep(CHECKPOINT_IDLE + Duration::from_millis(10)).await;
        assert_eq!(j.checkpoint("g", "b").await.expect("checkpoint"), 5);
        let _ = stop_tx.send(true);
        assert_eq!(task.await.expect("replayer"), ReplayExit::Stopped);
        assert!(partition.state.lock().expect("state").executed.is_empty());
    }

    /// A replayer that keeps up with an exactly-once partition, fed one record at a time,
    /// saves the partition's checkpoint every `CHECKPOINT_EVERY` records, not after each,
    /// and saves the last one once it has been idle for `CHECKPOINT_IDLE`. (Simulated
    /// time: the partition answers after 2 ms, and nothing else waits.)
    #[tokio::test(start_paused = true)]
    async fn a_caught_up_replayer_saves_an_exactly_once_checkpoint_in_batches_and_when_idle() {
        let n = CHECKPOINT_EVERY + 6;
        let j = Arc::new(crate::journal::MemoryJournal::new());
        let bodies: Vec<String> = (1..=n).map(|seq| format!("body {seq}")).collect();
        fill(j.as_ref(), &bodies, &[]).await;
        let partition = Arc::new(Layered::default());
        let replayer = Replayer::new("g", "b", j.clone(), partition.clone());
        let (sealed_tx, sealed) = watch::channel(0u64);
        let (stop_tx, stop) = watch::channel(false);
        let log = Arc::new(Log::default());
        let task = tokio::spawn(replayer.run(sealed, stop, log.clone()));
        let mut saved = Vec::new();
        for seq in 1..=n {
            sealed_tx.send(seq).expect("replayer listens");
            let heard = format!("applied {seq}");
            for _ in 0..1000 {
                if log.0.lock().expect("log").contains(&heard) {
                    break;
                }
                tokio::time::sleep(Duration::from_millis(1)).await;
            }
            saved.push(j.checkpoint("g", "b").await.expect("checkpoint"));
        }
        let every = |seq: u64| seq / CHECKPOINT_EVERY * CHECKPOINT_EVERY;
        assert_eq!(saved, (1..=n).map(every).collect::<Vec<_>>());
        tokio::time::sleep(CHECKPOINT_IDLE + Duration::from_millis(10)).await;
        assert_eq!(j.checkpoint("g", "b").await.expect("checkpoint"), n);
        let _ = stop_tx.send(true);
        assert_eq!(task.await.expect("replayer"), ReplayExit::Stopped);
        assert_eq!(
            partition.state.lock().expect("state").executed.len() as u64,
            n
        );
    }
}

#[cfg(test)]
mod parallel_tests {
    use super::*;
    use crate::conflict::ConflictRule;
    use crate::record::Payload;
    use bytes::Bytes;
    use std::collections::BTreeSet;
    use std::sync::Mutex;

    /// A partition whose layer takes records out of seq order: each waits for the records
    /// it was sent behind, then executes after a delay that varies with its seq.
    #[derive(Default)]
    struct Parallel {
        state: Mutex<State>,
    }

    #[derive(Default)]
    struct State {
        recorded: BTreeSet<u64>,
        executed: Vec<u64>,
        on_the_way: usize,
        most_on_the_way: usize,
        fail_once: Option<u64>,
        /// Records sent in seq order, each checked to follow everything.
        in_order: Vec<u64>,
        /// Records whose answer was lost.
        lost: Vec<u64>,
    }

    impl Parallel {
        fn lock(&self) -> Result<std::sync::MutexGuard<'_, State>, ApplyError> {
            self.state
                .lock()
                .map_err(|_| ApplyError::NoAnswer("poisoned".into()))
        }

        fn body(record: &Record) -> Result<Bytes, ApplyError> {
            match &record.payload {
                Payload::Http(r) => Ok(r.body.clone()),
                Payload::Sql(_) => Err(ApplyError::Unreachable("sql".into())),
            }
        }

        async fn exchange(
            &self,
            record: &Record,
            after: &[u64],
        ) -> Result<Fingerprint, ApplyError> {
            {
                let mut s = self.lock()?;
                s.on_the_way += 1;
                s.most_on_the_way = s.most_on_the_way.max(s.on_the_way);
            }
            let result = self.execute(record, after).await;
            self.lock()?.on_the_way -= 1;
            result
        }

        async fn execute(&self, record: &Record, after: &[u64]) -> Result<Fingerprint, ApplyError> {
            for _ in 0..1000 {
                let ready = {
                    let s = self.lock()?;
                    after.iter().all(|d| s.recorded.contains(d))
                };
                if ready {
                    break;
                }
                tokio::time::sleep(Duration::from_millis(1)).await;
            }
            tokio::time::sleep(Duration::from_millis(record.seq * 7 % 5)).await;
            let mut s = self.lock()?;
            if !after.iter().all(|d| s.recorded.contains(d)) {
                return Err(ApplyError::Unreachable(
                    "a dependency is not recorded".into(),
                ));
            }
            if s.fail_once.take_if(|seq| *seq == record.seq).is_some() {
                s.lost.push(record.seq);
                return Err(ApplyError::NoAnswer("lost".into()));
            }
            if s.recorded.insert(record.seq) {
                s.executed.push(record.seq);
            }
            Ok(Fingerprint::of(200, &Self::body(record)?))
        }
    }

    #[async_trait::async_trait]
    impl Applier for Parallel {
        async fn apply(&self, record: &Record) -> Result<Fingerprint, ApplyError> {
            // In seq order: everything before it must be recorded already.
            let before: Vec<u64> = (1..record.seq).collect();
            self.lock()?.in_order.push(record.seq);
            self.exchange(record, &before).await
        }

        async fn position(&self) -> Result<Option<Position>, ApplyError> {
            let s = self.lock()?;
            let applied = s.recorded.last().copied().unwrap_or(0);
            let resume = (1..).take_while(|seq| s.recorded.contains(seq)).count() as u64;
            Ok(Some(Position {
                applied,
                resume: Some(resume),
            }))
        }
    }

    #[async_trait::async_trait]
    impl PipelinedApplier for Parallel {
        async fn apply_pipelined(
            &self,
            record: &Record,
            behind: Behind<'_>,
        ) -> Result<Fingerprint, ApplyError> {
            let (after, floor) = match behind {
                Behind::Prev(prev) => {
                    let before: Vec<u64> = (1..=prev).collect();
                    return self.exchange(record, &before).await;
                }
                Behind::After { after, floor } => (after, floor),
            };
            // The floor is true when sent: everything at or below it is recorded.
            if !(1..=floor).all(|seq| self.lock().is_ok_and(|s| s.recorded.contains(&seq))) {
                return Err(ApplyError::Unreachable(format!(
                    "floor {floor} of record {} is not recorded",
                    record.seq
                )));
            }
            self.exchange(record, after).await
        }
    }

    struct Quiet;

    impl ReplayObserver for Quiet {
        fn applied(&self, _: u64) {}
        fn apply_failed(&self, _: u64, _: u32, _: &ApplyError) {}
        fn diverged(&self, seq: u64, reason: &str) {
            panic!("diverged at {seq}: {reason}");
        }
    }

    /// The key of a body `{"k": K}`; a body that is not JSON is a barrier.
    fn key(body: &str) -> Option<String> {
        serde_json::from_str::<serde_json::Value>(body)
            .ok()
            .map(|v| v["k"].to_string())
    }

    /// Replays `n` records keyed `seq % 3` (every tenth a barrier) on a parallel partition
    /// with a window of `window`.
    async fn replay(n: u64, window: usize, fail_once: Option<u64>) -> (State, Vec<String>) {
        let bodies: Vec<String> = (1..=n)
            .map(|seq| {
                if seq % 10 == 0 {
                    format!("barrier {seq}")
                } else {
                    format!("{{\"k\": {}, \"seq\": {seq}}}", seq % 3)
                }
            })
            .collect();
        let dir = tempfile::tempdir().expect("temp dir");
        let j = super::tests::journal_of(&dir, &bodies, &[]).await;
        let partition = Arc::new(Parallel::default());
        if let Ok(mut s) = partition.state.lock() {
            s.fail_once = fail_once;
        }
        let keys = ConflictKeys::new(&[ConflictRule {
            method: Some("POST".into()),
            path: "/".into(),
            keys: vec!["body:/k".into()],
        }])
        .expect("rules compile");
        let replayer = super::tests::fast_pipelined(&j, partition.clone(), window)
            .conflict_keys(Arc::new(keys));
        super::tests::replay_to_the_end(replayer, &j, n, Arc::new(Quiet)).await;
        let state = std::mem::take(&mut *partition.state.lock().expect("state"));
        (state, bodies)
    }

    /// Every pair of records that conflict (a shared key, or a barrier) executed in seq
    /// order; every record executed once.
    fn check_order(state: &State, bodies: &[String]) {
        let mut sorted = state.executed.clone();
        sorted.sort_unstable();
        assert_eq!(
            sorted,
            (1..=bodies.len() as u64).collect::<Vec<_>>(),
            "each once"
        );
        let at: std::collections::HashMap<u64, usize> = state
            .executed
            .iter()
            .enumerate()
            .map(|(i, s)| (*s, i))
            .collect();
        for a in 1..=bodies.len() as u64 {
            for b in a + 1..=bodies.len() as u64 {
                let (ka, kb) = (key(&bodies[a as usize - 1]), key(&bodies[b as usize - 1]));
                let conflicts = ka.is_none() || kb.is_none() || ka == kb;
                if conflicts {
                    assert!(
                        at[&a] < at[&b],
                        "{a} and {b} conflict but ran out of order: {:?}",
                        state.executed
                    );
                }
            }
        }
    }

    #[tokio::test]
    async fn records_that_share_no_key_run_in_parallel_and_those_that_do_keep_their_order() {
        let (state, bodies) = replay(60, 8, None).await;
        check_order(&state, &bodies);
        assert!(
            state.most_on_the_way > 2,
            "{} at once",
            state.most_on_the_way
        );
        let reordered = state.executed.windows(2).any(|w| w[0] > w[1]);
        assert!(
            reordered,
            "independent records ran in seq order only: {:?}",
            state.executed
        );
        assert!(state.in_order.is_empty(), "{:?}", state.in_order);
    }

    /// The failed record is sent again alone, still the parallel way (a copy that took
    /// later records, of a later epoch, would fence it in seq order), and nothing twice.
    #[tokio::test]
    async fn a_failure_in_a_parallel_window_is_sent_again_the_parallel_way_and_applies_nothing_twice()
     {
        let (state, bodies) = replay(60, 8, Some(23)).await;
        check_order(&state, &bodies);
        assert!(state.in_order.is_empty(), "{:?}", state.in_order);
        assert_eq!(state.lost, [23]);
    }
}
