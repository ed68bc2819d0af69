//! Membership at run time with real processes: a new, empty partition added under load
//! becomes available and identical to the others; the current primary removed under load
//! hands its role over with no failed request; a restart keeps both changes (the journal's
//! membership wins over the config, and the difference is reported); bad input is refused
//! and changes nothing.

#![allow(clippy::unwrap_used)]

mod support;

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::Duration;

use serde_json::json;
use support::*;

const FAST: &str = "heartbeat_interval_ms = 100\nheartbeat_timeout_ms = 100\nheartbeat_retries = 3";

async fn admin(g: &BankGroup, verb: &str, body: serde_json::Value) -> regroup::client::Answer {
    g.http
        .post(&format!("{}/groups/bank/{verb}", g.proxy.admin), &body)
        .await
        .unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn add_a_new_partition_and_remove_the_primary_under_load() {
    let mut g = BankGroup::start(2, None, FAST).await;
    let mut report = LoadReport::default();
    let seeds = seed_accounts(&g, 6, &mut report).await;
    let target = g.target();
    let start_head = target.status().await.groups[0].head;
    let stop = Arc::new(AtomicBool::new(false));
    let pace = Arc::new(AtomicU64::new(0));
    let load = run_load_until(
        &target,
        &seeds,
        8,
        1_000_000,
        false,
        "members",
        LoadControl {
            stop: Some(stop.clone()),
            pace_ms: pace.clone(),
        },
    );
    let fresh = Bank::start(g.dir.path(), "d").await;
    let changes = async {
        wait_for_head(&target, start_head + 30).await;
        // Bad input: refused with a reason, nothing changes.
        for (body, want) in [
            (
                json!({"partition": "a", "url": fresh.url}),
                "already has a partition",
            ),
            (json!({"partition": "x", "url": "ftp://nowhere"}), "url"),
            (json!({"partition": "", "url": fresh.url}), "name"),
            (json!({"partition": "x"}), "body must be"),
        ] {
            let a = admin(&g, "add", body.clone()).await;
            assert_eq!(
                a.status,
                400,
                "{body}: {}",
                String::from_utf8_lossy(&a.body)
            );
            assert!(
                String::from_utf8_lossy(&a.body).contains(want),
                "{body}: {}",
                String::from_utf8_lossy(&a.body)
            );
        }
        assert_eq!(target.status().await.groups[0].partitions.len(), 2);

        // A new, empty copy joins under load and catches up from the journal. The load is
        // slowed meanwhile: one replica's replay is slower than what 8 clients get through a
        // pipelining primary here (~105 vs ~150 records/s in CI), so under the full load it
        // would never catch up (issue 11's "replay that keeps up").
        pace.store(100, Ordering::Relaxed);
        let a = admin(
            &g,
            "add",
            json!({"partition": "d", "url": fresh.url, "host": "rack-2"}),
        )
        .await;
        assert_eq!(a.status, 200, "{}", String::from_utf8_lossy(&a.body));
        eventually(
            "d to be available and caught up",
            Duration::from_secs(60),
            || async {
                let doc = target.status().await;
                let grp = &doc.groups[0];
                match grp.partitions.iter().find(|p| p.name == "d") {
                    Some(d) if d.status == "available" && d.applied + 5 >= grp.sealed => Ok(()),
                    other => Err(format!("{other:?} sealed {}", grp.sealed)),
                }
            },
        )
        .await;
        pace.store(0, Ordering::Relaxed);
        let doc = target.status().await;
        assert!(
            doc.hosts
                .iter()
                .any(|h| h.name == "rack-2" && h.status == "up"),
            "{:?}",
            doc.hosts
        );
        let mid_head = doc.groups[0].head;
        wait_for_head(&target, mid_head + 30).await;

        // The primary leaves: the role moves first, no request fails.
        let primary = target.status().await.groups[0].primary.clone();
        let a = admin(&g, "remove", json!({"partition": primary})).await;
        assert_eq!(a.status, 200, "{}", String::from_utf8_lossy(&a.body));
        let doc = target.status().await;
        let grp = &doc.groups[0];
        assert_ne!(grp.primary, primary);
        assert!(grp.partitions.iter().all(|p| p.name != primary), "{grp:?}");
        assert!(
            grp.transitions.iter().any(|t| t.name == "remove"),
            "{:?}",
            grp.transitions
        );
        // The last partition cannot leave.
        let head = grp.head;
        wait_for_head(&target, head + 30).await;
        stop.store(true, Ordering::Relaxed);
        primary
    };
    let (load, removed) = tokio::join!(load, changes);
    assert_no_failed_request(&load);
    merge(&mut report, load);
    let gone = g.banks.iter().position(|b| b.name == removed).unwrap();
    let _left = g.banks.remove(gone);
    g.banks.push(fresh);
    g.wait_converged(Duration::from_secs(60)).await;
    let (accounts, transfers) = g.assert_identical().await;
    assert_bank_invariants(&report, &accounts, &transfers);

    // A restart keeps the membership the journal holds, and says how the config differs.
    g.proxy.restart().await;
    let doc = g.proxy.status(&g.http).await;
    let grp = &doc.groups[0];
    let mut names: Vec<&str> = grp.partitions.iter().map(|p| p.name.as_str()).collect();
    names.sort();
    let mut want: Vec<&str> = g.banks.iter().map(|b| b.name.as_str()).collect();
    want.sort();
    assert_eq!(names, want);
    assert_eq!(grp.config_drift.len(), 2, "{:?}", grp.config_drift);
    assert!(
        g.proxy
            .log()
            .contains("differ from the journal's membership")
    );

    // One partition left cannot be removed.
    let survivor = g
        .banks
        .iter()
        .find(|b| b.name != grp.primary)
        .unwrap()
        .name
        .clone();
    let a = admin(&g, "remove", json!({"partition": survivor})).await;
    assert_eq!(a.status, 200, "{}", String::from_utf8_lossy(&a.body));
    let last = target_last(&g).await;
    let a = admin(&g, "remove", json!({"partition": last})).await;
    assert_eq!(a.status, 400, "{}", String::from_utf8_lossy(&a.body));
    assert!(String::from_utf8_lossy(&a.body).contains("last partition"));
}

async fn target_last(g: &BankGroup) -> String {
    let doc = g.proxy.status(&g.http).await;
    assert_eq!(doc.groups[0].partitions.len(), 1);
    doc.groups[0].partitions[0].name.clone()
}

/// `move`: a partition leaves one group and joins a second one, where it is rebuilt from a
/// snapshot of that group's partitions and ends identical to them.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_partition_moved_to_a_second_group_is_rebuilt_for_it() {
    let dir = tempfile::tempdir().unwrap();
    let mut banks = Vec::new();
    for name in ["a", "b", "x", "y"] {
        banks.push(Bank::start(dir.path(), name).await);
    }
    let mut toml = format!(
        "listen = \"127.0.0.1:0\"\nadmin_listen = \"127.0.0.1:0\"\njournal = \"sqlite://{}\"\n\
         journal_lease_ms = 1000\n",
        dir.path().join("journal.db").display()
    );
    for (group, prefix, members) in [("bank", "/", &banks[..2]), ("audit", "/audit", &banks[2..])] {
        toml.push_str(&format!(
            "\n[[groups]]\nname = \"{group}\"\npath_prefix = \"{prefix}\"\nstrip_prefix = true\n{FAST}\n"
        ));
        for b in members {
            toml.push_str(&format!(
                "\n[[groups.partitions]]\nname = \"{}\"\nurl = \"{}\"\n",
                b.name, b.url
            ));
        }
    }
    let config = dir.path().join("regroup.toml");
    std::fs::write(&config, toml).unwrap();
    let proxy = Proxy::start(&config).await;
    let http = regroup::client::HttpClient::new();
    for (prefix, name) in [
        ("", "in-bank"),
        ("/audit", "in-audit-1"),
        ("/audit", "in-audit-2"),
    ] {
        let a = http
            .post(
                &format!("{}{prefix}/accounts", proxy.url),
                &json!({"name": name, "balance": 10}),
            )
            .await
            .unwrap();
        assert_eq!(a.status, 201, "{}", String::from_utf8_lossy(&a.body));
    }
    let a = http
        .post(
            &format!("{}/groups/bank/move", proxy.admin),
            &json!({"partition": "b", "to": "audit"}),
        )
        .await
        .unwrap();
    assert_eq!(a.status, 200, "{}", String::from_utf8_lossy(&a.body));
    let doc = eventually("b to serve in audit", Duration::from_secs(60), || async {
        let doc = proxy.status(&http).await;
        let audit = doc.groups.iter().find(|g| g.name == "audit").unwrap();
        match audit.partitions.iter().find(|p| p.name == "b") {
            Some(b) if b.status == "available" && b.applied == audit.head => Ok(doc),
            other => Err(format!("{other:?}")),
        }
    })
    .await;
    let bank = doc.groups.iter().find(|g| g.name == "bank").unwrap();
    assert!(bank.partitions.iter().all(|p| p.name != "b"), "{bank:?}");
    let audit = doc.groups.iter().find(|g| g.name == "audit").unwrap();
    assert!(
        audit.transitions.iter().any(|t| t.name == "rebuild"),
        "{:?}",
        audit.transitions
    );
    // b now holds the audit group's data, nothing of the bank's.
    let want = banks[2].get(&http, "/accounts").await;
    let got = banks[1].get(&http, "/accounts").await;
    assert_eq!(
        String::from_utf8_lossy(&got.body),
        String::from_utf8_lossy(&want.body)
    );
    assert!(!String::from_utf8_lossy(&got.body).contains("in-bank"));
}
