//! `GET /metrics` with a real proxy and three bank partitions: the text is parsed with a
//! Prometheus text-format parser, and its values are checked against `/status` and against
//! what the test itself sent (updates and reads by outcome, a replica stopped, a planned
//! hand-over).

#![allow(clippy::unwrap_used)]

mod support;

use std::collections::BTreeMap;
use std::time::{Duration, Instant};

use prometheus_parse::{Sample, Scrape, Value};
use regroup_proxy::admin::StatusDoc;
use support::*;

/// `GET /metrics`, parsed.
async fn scrape(g: &BankGroup) -> Scrape {
    let answer = g
        .http
        .get(&format!("{}/metrics", g.proxy.admin))
        .await
        .unwrap();
    assert_eq!(answer.status, 200);
    let text = String::from_utf8(answer.body.to_vec()).unwrap();
    Scrape::parse(text.lines().map(|l| Ok(l.to_owned()))).unwrap()
}

/// The value of the one sample named `metric` whose labels include `labels`.
fn value(s: &Scrape, metric: &str, labels: &[(&str, &str)]) -> Option<f64> {
    let found: Vec<&Sample> = s
        .samples
        .iter()
        .filter(|x| x.metric == metric && labels.iter().all(|(k, v)| x.labels.get(k) == Some(*v)))
        .collect();
    assert!(found.len() <= 1, "{metric} {labels:?} matches {found:?}");
    found.first().map(|x| match &x.value {
        Value::Counter(v) | Value::Gauge(v) | Value::Untyped(v) => *v,
        other => panic!("{metric}: unexpected value {other:?}"),
    })
}

/// Sums the samples named `metric` by the value of `label`.
fn by_label(s: &Scrape, metric: &str, label: &str) -> BTreeMap<String, f64> {
    let mut sums = BTreeMap::new();
    for x in s.samples.iter().filter(|x| x.metric == metric) {
        if let (Some(l), Value::Counter(v)) = (x.labels.get(label), &x.value) {
            *sums.entry(l.to_owned()).or_insert(0.0) += v;
        }
    }
    sums
}

fn class(status: u16) -> String {
    format!("{}xx", status / 100)
}

/// Scrapes between two equal `/status` documents, so the values compared are of one moment.
async fn steady(g: &BankGroup) -> (StatusDoc, Scrape) {
    eventually(
        "a scrape between two equal status documents",
        Duration::from_secs(30),
        || async {
            let before = g.proxy.status(&g.http).await;
            let scraped = scrape(g).await;
            let after = g.proxy.status(&g.http).await;
            let key = |d: &StatusDoc| {
                let g = &d.groups[0];
                let parts: Vec<_> = g
                    .partitions
                    .iter()
                    .map(|p| (p.name.clone(), p.status.clone(), p.applied))
                    .collect();
                (g.head, g.sealed, g.epoch, g.primary.clone(), parts)
            };
            if key(&before) == key(&after) {
                Ok((after, scraped))
            } else {
                Err(format!("{:?} != {:?}", key(&before), key(&after)))
            }
        },
    )
    .await
}

/// Checks every per-group and per-partition gauge against `/status`.
fn check_against_status(doc: &StatusDoc, s: &Scrape) {
    let g = &doc.groups[0];
    let group = [("group", "bank")];
    assert_eq!(
        value(s, "regroup_journal_head", &group),
        Some(g.head as f64)
    );
    assert_eq!(
        value(s, "regroup_journal_sealed", &group),
        Some(g.sealed as f64)
    );
    assert_eq!(
        value(s, "regroup_journal_records", &group),
        Some(g.head as f64)
    );
    assert_eq!(
        value(s, "regroup_group_epoch", &group),
        Some(g.epoch as f64)
    );
    assert_eq!(value(s, "regroup_group_handing_over", &group), Some(0.0));
    assert_eq!(
        value(s, "regroup_in_doubt_records", &group),
        Some(g.in_doubt.len() as f64)
    );
    for p in &g.partitions {
        let labels = [("group", "bank"), ("partition", p.name.as_str())];
        assert_eq!(
            value(s, "regroup_partition_applied", &labels),
            Some(p.applied as f64),
            "{}",
            p.name
        );
        assert_eq!(
            value(s, "regroup_partition_lag_records", &labels),
            Some(g.sealed.saturating_sub(p.applied) as f64),
            "{}",
            p.name
        );
        let primary = if p.name == g.primary { 1.0 } else { 0.0 };
        assert_eq!(
            value(s, "regroup_partition_primary", &labels),
            Some(primary),
            "{}",
            p.name
        );
        for status in [
            "available",
            "catching_up",
            "suspect",
            "unavailable",
            "diverged",
            "draining",
        ] {
            let with = [
                ("group", "bank"),
                ("partition", p.name.as_str()),
                ("status", status),
            ];
            let on = if p.status == status { 1.0 } else { 0.0 };
            assert_eq!(
                value(s, "regroup_partition_status", &with),
                Some(on),
                "{} {status}",
                p.name
            );
        }
        let lag = value(s, "regroup_partition_lag_seconds", &labels).unwrap();
        if p.applied >= g.sealed {
            assert_eq!(lag, 0.0, "{} is caught up", p.name);
        } else {
            assert!(
                lag > 0.0,
                "{} lags {} records but {lag} s",
                p.name,
                g.sealed - p.applied
            );
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn three_partitions_metrics_match_status_and_traffic() {
    let mut g = BankGroup::start(3, None, "").await;
    let mut updates: BTreeMap<String, f64> = BTreeMap::new();
    let mut count = |status: u16| *updates.entry(class(status)).or_insert(0.0) += 1.0;
    let mut ids = Vec::new();
    for i in 0..6 {
        let a = g
            .post(
                "/accounts",
                serde_json::json!({"name": format!("m-{i}"), "balance": 100}),
            )
            .await
            .unwrap();
        assert_eq!(a.status, 201);
        count(a.status);
        ids.push(
            a.json::<serde_json::Value>().unwrap()["id"]
                .as_i64()
                .unwrap(),
        );
    }
    // Refused by the application (409: not enough money; 400: invalid): executed and
    // journaled all the same, counted as 4xx.
    for body in [
        serde_json::json!({"from": ids[0], "to": ids[1], "amount": 1_000_000}),
        serde_json::json!({"from": ids[0], "to": ids[0], "amount": 1}),
        serde_json::json!({"from": ids[0], "to": ids[1], "amount": 5}),
    ] {
        let a = g.post("/transfers", body).await.unwrap();
        count(a.status);
    }
    let sent_updates: f64 = updates.values().sum();
    assert!(updates.get("4xx").is_some_and(|n| *n >= 1.0), "{updates:?}");
    let reads = 7;
    for _ in 0..reads {
        assert_eq!(g.get("/accounts").await.unwrap().status, 200);
    }
    g.wait_converged(Duration::from_secs(60)).await;
    let (doc, s) = steady(&g).await;
    check_against_status(&doc, &s);
    assert_eq!(
        doc.groups[0].head as f64, sent_updates,
        "every update is journaled"
    );
    assert_eq!(by_label(&s, "regroup_updates_total", "outcome"), updates);
    let mut expected_reads = BTreeMap::new();
    expected_reads.insert("2xx".to_owned(), f64::from(reads));
    assert_eq!(
        by_label(&s, "regroup_reads_total", "outcome"),
        expected_reads
    );
    let group = [("group", "bank")];
    assert_eq!(
        value(&s, "regroup_update_duration_seconds_count", &group),
        Some(sent_updates)
    );
    assert_eq!(
        value(&s, "regroup_read_duration_seconds_count", &group),
        Some(f64::from(reads))
    );
    // Each replica replayed every record (at least once: a retry counts again).
    for p in ["b", "c"] {
        let n = value(
            &s,
            "regroup_replay_duration_seconds_count",
            &[("group", "bank"), ("partition", p)],
        );
        assert!(
            n.is_some_and(|n| n >= sent_updates),
            "{p}: {n:?} replays of {sent_updates}"
        );
    }
    assert_eq!(value(&s, "regroup_in_doubt_total", &group), Some(0.0));
    for kind in ["planned", "unplanned"] {
        assert_eq!(
            value(
                &s,
                "regroup_hand_overs_total",
                &[("group", "bank"), ("kind", kind)]
            ),
            Some(0.0)
        );
    }

    // A replica stops: its status, applied and lag follow.
    g.banks[2].kill().await;
    eventually("c to be unavailable", Duration::from_secs(30), || async {
        let doc = g.proxy.status(&g.http).await;
        let c = &doc.groups[0].partitions[2];
        if c.status == "unavailable" {
            Ok(())
        } else {
            Err(c.status.clone())
        }
    })
    .await;
    let a = g
        .post(
            "/transfers",
            serde_json::json!({"from": ids[2], "to": ids[3], "amount": 1}),
        )
        .await
        .unwrap();
    let first_unapplied_answered = Instant::now();
    assert_eq!(a.status, 201);
    for _ in 0..2 {
        let a = g
            .post(
                "/transfers",
                serde_json::json!({"from": ids[3], "to": ids[4], "amount": 1}),
            )
            .await
            .unwrap();
        assert_eq!(a.status, 201);
    }
    eventually("b to apply everything", Duration::from_secs(30), || async {
        let doc = g.proxy.status(&g.http).await;
        let gs = &doc.groups[0];
        if gs.partitions[1].applied == gs.sealed {
            Ok(())
        } else {
            Err(format!("{gs:?}"))
        }
    })
    .await;
    let (doc, s) = steady(&g).await;
    check_against_status(&doc, &s);
    let gs = &doc.groups[0];
    let c = &gs.partitions[2];
    assert_eq!(c.status, "unavailable");
    assert_eq!(gs.sealed - c.applied, 3, "{gs:?}");
    let lag = value(
        &s,
        "regroup_partition_lag_seconds",
        &[("group", "bank"), ("partition", "c")],
    )
    .unwrap();
    let at_least = first_unapplied_answered.elapsed().as_secs_f64();
    assert!(
        lag + 0.05 >= at_least && lag < at_least + 30.0,
        "c's oldest unapplied record is {lag} s old; it was answered {at_least} s ago"
    );

    // A planned hand-over is counted, and the epoch follows.
    let promoted = g
        .http
        .send(
            "POST",
            &format!("{}/groups/bank/promote", g.proxy.admin),
            Some(&serde_json::json!({"partition": "b"})),
            None,
        )
        .await
        .unwrap();
    assert_eq!(
        promoted.status,
        200,
        "{}",
        String::from_utf8_lossy(&promoted.body)
    );
    let (doc, s) = steady(&g).await;
    check_against_status(&doc, &s);
    assert_eq!(doc.groups[0].primary, "b");
    assert_eq!(
        value(
            &s,
            "regroup_hand_overs_total",
            &[("group", "bank"), ("kind", "planned")]
        ),
        Some(1.0)
    );
    assert_eq!(
        value(
            &s,
            "regroup_hand_overs_total",
            &[("group", "bank"), ("kind", "unplanned")]
        ),
        Some(0.0)
    );

    // The primary stops: the failover is counted as an unplanned hand-over.
    g.banks[1].kill().await;
    eventually(
        "a to take the primary role",
        Duration::from_secs(30),
        || async {
            let doc = g.proxy.status(&g.http).await;
            let gs = &doc.groups[0];
            if gs.primary == "a" && !gs.handing_over {
                Ok(())
            } else {
                Err(format!("{gs:?}"))
            }
        },
    )
    .await;
    let (doc, s) = steady(&g).await;
    check_against_status(&doc, &s);
    assert_eq!(doc.groups[0].epoch, 3);
    assert_eq!(
        value(
            &s,
            "regroup_hand_overs_total",
            &[("group", "bank"), ("kind", "unplanned")]
        ),
        Some(1.0)
    );
}
