//! Prometheus metrics, served as text (format 0.0.4) at `GET /metrics` on the admin port.
//!
//! Two kinds of values: **counters and histograms** kept by each group ([`GroupMetrics`],
//! the group's `metrics` field) and updated on the hot paths with one call each (an update
//! answered, a read answered, a record replayed, a hand-over, a record in doubt); and
//! **gauges** taken at scrape time from the group's own view (status, applied, lag, epoch,
//! journal). Nothing is process-global: every proxy owns its groups and so its metrics, so
//! several proxies (tests, or regroup embedded as a library) never share a recorder. A
//! scrape builds a `prometheus-client` registry over the proxy's groups and encodes it.
//!
//! | metric | type | labels | meaning |
//! | --- | --- | --- | --- |
//! | `regroup_group_epoch` | gauge | group | the primary's term |
//! | `regroup_group_handing_over` | gauge | group | 1 while the primary role moves |
//! | `regroup_journal_head` | gauge | group | highest seq in the journal |
//! | `regroup_journal_sealed` | gauge | group | highest seq up to which every record is durably sealed |
//! | `regroup_journal_records` | gauge | group | records the journal holds (head − first held + 1) |
//! | `regroup_in_doubt_records` | gauge | group | records whose execution is unknown now |
//! | `regroup_partition_status` | gauge | group, partition, status | 1 for the partition's status, 0 for the others |
//! | `regroup_partition_primary` | gauge | group, partition | 1 for the primary |
//! | `regroup_partition_applied` | gauge | group, partition | highest seq applied |
//! | `regroup_partition_lag_records` | gauge | group, partition | sealed − applied |
//! | `regroup_partition_lag_seconds` | gauge | group, partition | age of the oldest sealed record not applied (now − its `Regroup-Timestamp`); 0 when caught up |
//! | `regroup_updates_total` | counter | group, outcome | updates answered |
//! | `regroup_reads_total` | counter | group, outcome | reads answered |
//! | `regroup_update_duration_seconds` | histogram | group | from the update's arrival to its answer |
//! | `regroup_read_duration_seconds` | histogram | group | from the read's arrival to the partition's answer headers |
//! | `regroup_replay_duration_seconds` | histogram | group, partition | one replay exchange that got an answer |
//! | `regroup_replay_failures_total` | counter | group, partition | replay exchanges without an answer (retried) |
//! | `regroup_hand_overs_total` | counter | group, kind | completed hand-overs of the primary role, `planned` or `unplanned` |
//! | `regroup_in_doubt_total` | counter | group | records that became in doubt |
//!
//! `outcome` is the class of the partition's answer (`2xx`, `3xx`, `4xx`, `5xx`) when a
//! partition answered, else the code of regroup's own error answer (`unavailable`,
//! `in_doubt`, `read_timeout`, `no_partition`, ...: the `error` field of its JSON body).
//! An update is timed from the end of its body's read to its answer (a body refused before,
//! 413 or 408, is not counted); a read from its dispatch to the partition's answer headers.

use std::collections::BTreeMap;
use std::sync::{Arc, RwLock};
use std::time::Duration;

use prometheus_client::collector::Collector;
use prometheus_client::encoding::{DescriptorEncoder, EncodeLabelSet, EncodeMetric};
use prometheus_client::metrics::MetricType;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::gauge::ConstGauge;
use prometheus_client::metrics::histogram::{Histogram, exponential_buckets};
use prometheus_client::registry::Registry;
use time::OffsetDateTime;

use crate::error::ProxyError;
use crate::group::{Group, GroupView};
use crate::status::PartitionStatus;

/// The `Content-Type` of `GET /metrics`.
pub const CONTENT_TYPE: &str = prometheus_client::encoding::prometheus_text::CONTENT_TYPE;

/// Every status a partition can have, so each gets its 0/1 sample.
fn statuses() -> [PartitionStatus; 7] {
    use PartitionStatus::*;
    // Exhaustive: a new status does not compile here until it is listed below too.
    match Available {
        Available | CatchingUp | Suspect | Unavailable | Diverged | Draining | Rebuilding => {}
    }
    [
        Available,
        CatchingUp,
        Suspect,
        Unavailable,
        Diverged,
        Draining,
        Rebuilding,
    ]
}

/// Latency buckets: 0.5 ms to about 16 s, doubling.
fn latency() -> Histogram {
    Histogram::new(exponential_buckets(0.0005, 2.0, 16))
}

/// Counters by outcome and one latency histogram: the requests of one kind of a group.
#[derive(Debug)]
struct Requests {
    /// By outcome; read-locked on the hot path, written once per new outcome.
    by_outcome: RwLock<BTreeMap<&'static str, Counter>>,
    duration: Histogram,
}

impl Default for Requests {
    fn default() -> Self {
        Requests {
            by_outcome: RwLock::new(BTreeMap::new()),
            duration: latency(),
        }
    }
}

impl Requests {
    fn done(&self, outcome: &'static str, elapsed: Duration) {
        self.duration.observe(elapsed.as_secs_f64());
        let known = self
            .by_outcome
            .read()
            .unwrap_or_else(|p| p.into_inner())
            .get(outcome)
            .map(Counter::inc)
            .is_some();
        if !known {
            self.by_outcome
                .write()
                .unwrap_or_else(|p| p.into_inner())
                .entry(outcome)
                .or_default()
                .inc();
        }
    }

    fn counters(&self) -> Vec<(&'static str, Counter)> {
        self.by_outcome
            .read()
            .unwrap_or_else(|p| p.into_inner())
            .iter()
            .map(|(k, v)| (*k, v.clone()))
            .collect()
    }
}

/// The replay metrics of one partition, handed to its replayer's applier.
#[derive(Debug, Clone)]
pub struct ReplayMetrics {
    duration: Histogram,
    failures: Counter,
}

impl Default for ReplayMetrics {
    fn default() -> Self {
        ReplayMetrics {
            duration: latency(),
            failures: Counter::default(),
        }
    }
}

impl ReplayMetrics {
    /// One replay exchange ended after `elapsed`: `answered`, or without an answer.
    pub fn replayed(&self, elapsed: Duration, answered: bool) {
        if answered {
            self.duration.observe(elapsed.as_secs_f64());
        } else {
            self.failures.inc();
        }
    }
}

/// A group's counters and histograms (the gauges are read from the group at scrape time).
#[derive(Debug, Default)]
pub struct GroupMetrics {
    updates: Requests,
    reads: Requests,
    replays: RwLock<BTreeMap<String, ReplayMetrics>>,
    planned: Counter,
    unplanned: Counter,
    in_doubt: Counter,
}

/// The outcome label of an answer: the partition's status class, or regroup's error code.
fn outcome<B>(result: &Result<http::Response<B>, ProxyError>) -> &'static str {
    match result {
        Ok(resp) => match resp.status().as_u16() {
            100..=199 => "1xx",
            200..=299 => "2xx",
            300..=399 => "3xx",
            400..=499 => "4xx",
            _ => "5xx",
        },
        Err(e) => e.code(),
    }
}

impl GroupMetrics {
    /// An update was answered (`result`) `elapsed` after it arrived.
    pub fn update_done<B>(
        &self,
        result: &Result<http::Response<B>, ProxyError>,
        elapsed: Duration,
    ) {
        self.updates.done(outcome(result), elapsed);
    }

    /// A read was answered (`result`) `elapsed` after it arrived.
    pub fn read_done<B>(&self, result: &Result<http::Response<B>, ProxyError>, elapsed: Duration) {
        self.reads.done(outcome(result), elapsed);
    }

    /// The replay metrics of `partition` (created on first use).
    pub fn replay(&self, partition: &str) -> ReplayMetrics {
        if let Some(m) = self
            .replays
            .read()
            .unwrap_or_else(|p| p.into_inner())
            .get(partition)
        {
            return m.clone();
        }
        self.replays
            .write()
            .unwrap_or_else(|p| p.into_inner())
            .entry(partition.to_owned())
            .or_default()
            .clone()
    }

    /// A hand-over of the primary role completed.
    pub fn hand_over(&self, planned: bool) {
        if planned {
            self.planned.inc();
        } else {
            self.unplanned.inc();
        }
    }

    /// A record became in doubt.
    pub fn in_doubt(&self) {
        self.in_doubt.inc();
    }
}

/// What a scrape saw of one group.
#[derive(Debug)]
struct Scraped {
    group: Arc<Group>,
    view: GroupView,
    /// By partition: the age in seconds of its oldest sealed record not applied.
    lag_seconds: BTreeMap<String, f64>,
    /// Records the journal holds; unknown when the journal did not answer.
    records: Option<u64>,
}

/// Renders the metrics of `groups` in the Prometheus text format.
pub async fn render(groups: &[Arc<Group>]) -> Result<String, std::fmt::Error> {
    let mut scraped = Vec::with_capacity(groups.len());
    for group in groups {
        scraped.push(scrape(group).await);
    }
    let mut registry = Registry::default();
    registry.register_collector(Box::new(Scrape(scraped)));
    let mut text = String::new();
    prometheus_client::encoding::prometheus_text::encode(&mut text, &registry)?;
    Ok(text)
}

async fn scrape(group: &Arc<Group>) -> Scraped {
    let view = group.view();
    let now = OffsetDateTime::now_utc();
    let mut lag_seconds = BTreeMap::new();
    for p in &view.partitions {
        let lag = if p.applied >= view.sealed {
            Some(0.0)
        } else {
            // The oldest record it has not applied is the one after its position.
            match group.journal.read_after(group.name(), p.applied, 1).await {
                Ok(records) => records
                    .first()
                    .map(|r| (now - r.timestamp).as_seconds_f64().max(0.0)),
                Err(e) => {
                    tracing::debug!(group = %group.name(), partition = %p.name, error = %e,
                        "metrics: cannot read the journal for the lag in seconds");
                    None
                }
            }
        };
        if let Some(lag) = lag {
            lag_seconds.insert(p.name.clone(), lag);
        }
    }
    let records = if view.head == 0 {
        Some(0)
    } else {
        match group.journal.read_after(group.name(), 0, 1).await {
            Ok(first) => Some(
                first
                    .first()
                    .map_or(0, |r| view.head.saturating_sub(r.seq) + 1),
            ),
            Err(_) => None,
        }
    };
    Scraped {
        group: group.clone(),
        view,
        lag_seconds,
        records,
    }
}

/// The collector of one scrape.
#[derive(Debug)]
struct Scrape(Vec<Scraped>);

/// Encodes one metric family: its descriptor, then every sample.
fn family<L: EncodeLabelSet, M: EncodeMetric>(
    encoder: &mut DescriptorEncoder,
    name: &str,
    help: &str,
    kind: MetricType,
    samples: impl IntoIterator<Item = (L, M)>,
) -> Result<(), std::fmt::Error> {
    let mut metric = encoder.encode_descriptor(name, help, None, kind)?;
    for (labels, sample) in samples {
        sample.encode(metric.encode_family(&labels)?)?;
    }
    Ok(())
}

impl Scrape {
    fn per_group<'a, M: 'a>(
        &'a self,
        value: impl Fn(&'a Scraped) -> Option<M> + 'a,
    ) -> impl Iterator<Item = ([(&'static str, &'a str); 1], M)> + 'a {
        self.0
            .iter()
            .filter_map(move |s| value(s).map(|v| ([("group", s.view.name.as_str())], v)))
    }

    fn per_partition<'a, M>(
        &'a self,
        value: impl Fn(&'a Scraped, &'a crate::partition::PartitionView) -> Option<M>,
    ) -> Vec<([(&'static str, &'a str); 2], M)> {
        let mut samples = Vec::new();
        for s in &self.0 {
            for p in &s.view.partitions {
                if let Some(v) = value(s, p) {
                    let labels = [
                        ("group", s.view.name.as_str()),
                        ("partition", p.name.as_str()),
                    ];
                    samples.push((labels, v));
                }
            }
        }
        samples
    }
}

impl Collector for Scrape {
    fn encode(&self, mut e: DescriptorEncoder) -> Result<(), std::fmt::Error> {
        let gauge = MetricType::Gauge;
        let g = |v: u64| Some(ConstGauge::new(v));
        family(
            &mut e,
            "regroup_group_epoch",
            "The primary's term.",
            gauge,
            self.per_group(|s| g(s.view.epoch)),
        )?;
        family(
            &mut e,
            "regroup_group_handing_over",
            "1 while the primary role moves.",
            gauge,
            self.per_group(|s| g(u64::from(s.view.handing_over))),
        )?;
        family(
            &mut e,
            "regroup_journal_head",
            "Highest seq in the journal.",
            gauge,
            self.per_group(|s| g(s.view.head)),
        )?;
        family(
            &mut e,
            "regroup_journal_sealed",
            "Highest seq up to which every record is durably sealed.",
            gauge,
            self.per_group(|s| g(s.view.sealed)),
        )?;
        family(
            &mut e,
            "regroup_journal_records",
            "Records the journal holds.",
            gauge,
            self.per_group(|s| s.records.map(ConstGauge::new)),
        )?;
        family(
            &mut e,
            "regroup_in_doubt_records",
            "Records whose execution is unknown (later updates wait).",
            gauge,
            self.per_group(|s| g(s.view.in_doubt.len() as u64)),
        )?;

        let mut status = e.encode_descriptor(
            "regroup_partition_status",
            "1 for the partition's status, 0 for the others.",
            None,
            gauge,
        )?;
        for s in &self.0 {
            for p in &s.view.partitions {
                for each in statuses() {
                    let labels = [
                        ("group", s.view.name.as_str()),
                        ("partition", p.name.as_str()),
                        ("status", each.as_str()),
                    ];
                    let on = u64::from(each == p.status);
                    ConstGauge::new(on).encode(status.encode_family(&labels)?)?;
                }
            }
        }
        family(
            &mut e,
            "regroup_partition_primary",
            "1 for the partition holding the primary role.",
            gauge,
            self.per_partition(|s, p| g(u64::from(p.name == s.view.primary))),
        )?;
        family(
            &mut e,
            "regroup_partition_applied",
            "Highest seq the partition applied.",
            gauge,
            self.per_partition(|_, p| g(p.applied)),
        )?;
        family(
            &mut e,
            "regroup_partition_lag_records",
            "Sealed records the partition has not applied.",
            gauge,
            self.per_partition(|s, p| g(s.view.sealed.saturating_sub(p.applied))),
        )?;
        family(
            &mut e,
            "regroup_partition_lag_seconds",
            "Age of the oldest sealed record the partition has not applied (0 when caught up).",
            gauge,
            self.per_partition(|s, p| s.lag_seconds.get(&p.name).map(|v| ConstGauge::new(*v))),
        )?;

        let counter = MetricType::Counter;
        let histogram = MetricType::Histogram;
        let mut updates = e.encode_descriptor(
            "regroup_updates",
            "Updates answered, by outcome.",
            None,
            counter,
        )?;
        for s in &self.0 {
            for (outcome, c) in s.group.metrics.updates.counters() {
                c.encode(
                    updates
                        .encode_family(&[("group", s.view.name.as_str()), ("outcome", outcome)])?,
                )?;
            }
        }
        let mut reads = e.encode_descriptor(
            "regroup_reads",
            "Reads answered, by outcome.",
            None,
            counter,
        )?;
        for s in &self.0 {
            for (outcome, c) in s.group.metrics.reads.counters() {
                c.encode(
                    reads
                        .encode_family(&[("group", s.view.name.as_str()), ("outcome", outcome)])?,
                )?;
            }
        }
        family(
            &mut e,
            "regroup_update_duration_seconds",
            "From an update's arrival to its answer.",
            histogram,
            self.per_group(|s| Some(s.group.metrics.updates.duration.clone())),
        )?;
        family(
            &mut e,
            "regroup_read_duration_seconds",
            "From a read's arrival to the partition's answer headers.",
            histogram,
            self.per_group(|s| Some(s.group.metrics.reads.duration.clone())),
        )?;
        let replays: Vec<(&Scraped, Vec<(String, ReplayMetrics)>)> = self
            .0
            .iter()
            .map(|s| {
                let m = s
                    .group
                    .metrics
                    .replays
                    .read()
                    .unwrap_or_else(|p| p.into_inner());
                (s, m.iter().map(|(k, v)| (k.clone(), v.clone())).collect())
            })
            .collect();
        let mut duration = e.encode_descriptor(
            "regroup_replay_duration_seconds",
            "One replay exchange with a partition that answered.",
            None,
            histogram,
        )?;
        for (s, by_partition) in &replays {
            for (p, m) in by_partition {
                m.duration.encode(duration.encode_family(&[
                    ("group", s.view.name.as_str()),
                    ("partition", p.as_str()),
                ])?)?;
            }
        }
        let mut failures = e.encode_descriptor(
            "regroup_replay_failures",
            "Replay exchanges without an answer (retried).",
            None,
            counter,
        )?;
        for (s, by_partition) in &replays {
            for (p, m) in by_partition {
                m.failures.encode(failures.encode_family(&[
                    ("group", s.view.name.as_str()),
                    ("partition", p.as_str()),
                ])?)?;
            }
        }
        let mut hand_overs = e.encode_descriptor(
            "regroup_hand_overs",
            "Completed hand-overs of the primary role.",
            None,
            counter,
        )?;
        for s in &self.0 {
            let m = &s.group.metrics;
            for (kind, c) in [("planned", &m.planned), ("unplanned", &m.unplanned)] {
                c.encode(
                    hand_overs.encode_family(&[("group", s.view.name.as_str()), ("kind", kind)])?,
                )?;
            }
        }
        family(
            &mut e,
            "regroup_in_doubt",
            "Records that became in doubt.",
            counter,
            self.per_group(|s| Some(s.group.metrics.in_doubt.clone())),
        )?;
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn answer(status: u16) -> Result<http::Response<()>, ProxyError> {
        let mut resp = http::Response::new(());
        *resp.status_mut() = http::StatusCode::from_u16(status).unwrap_or_default();
        Ok(resp)
    }

    /// `histogram` encoded as Prometheus text.
    fn encoded(histogram: &Histogram) -> String {
        let mut registry = Registry::default();
        registry.register("h", "h", histogram.clone());
        let mut text = String::new();
        prometheus_client::encoding::prometheus_text::encode(&mut text, &registry)
            .unwrap_or_default();
        text
    }

    #[test]
    fn outcomes_are_status_classes_or_error_codes() {
        assert_eq!(outcome(&answer(201)), "2xx");
        assert_eq!(outcome(&answer(409)), "4xx");
        assert_eq!(outcome(&answer(503)), "5xx");
        let refused: Result<http::Response<()>, ProxyError> = Err(ProxyError::Unavailable {
            group: "g".into(),
            reason: "no primary".into(),
        });
        assert_eq!(outcome(&refused), "unavailable");
    }

    #[test]
    fn requests_count_by_outcome_and_time_every_one() {
        let m = GroupMetrics::default();
        for status in [201, 201, 409] {
            m.update_done(&answer(status), Duration::from_millis(3));
        }
        let counts: Vec<(&str, u64)> = m
            .updates
            .counters()
            .into_iter()
            .map(|(k, c)| (k, c.get()))
            .collect();
        assert_eq!(counts, vec![("2xx", 2), ("4xx", 1)]);
        assert!(encoded(&m.updates.duration).contains("\nh_count 3\n"));
        assert!(m.reads.counters().is_empty());
        let replay = m.replay("b");
        replay.replayed(Duration::from_millis(1), true);
        replay.replayed(Duration::from_millis(1), false);
        assert!(encoded(&m.replay("b").duration).contains("\nh_count 1\n"));
        assert_eq!(m.replay("b").failures.get(), 1);
    }
}
