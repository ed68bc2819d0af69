//! Supervision: the patent's periodic messages, time-outs and retry counts. Every
//! `heartbeat_interval_ms` each partition gets `GET <health_path>`; no 2xx within
//! `heartbeat_timeout_ms` is a miss. One miss makes it `suspect`, `heartbeat_retries`
//! consecutive misses `unavailable`; one answer makes it healthy again.

use std::sync::Arc;

use http::Request;
use tokio::time::MissedTickBehavior;

use crate::forward::{full, upstream_uri};
use crate::group::Group;
use crate::partition::{Health, Partition};

/// Starts one heartbeat task per partition of `group`.
pub(crate) fn start(group: &Arc<Group>) {
    for p in &group.partitions {
        tokio::spawn(heartbeat(group.clone(), p.clone()));
    }
}

/// Checks every partition once, concurrently; used before the proxy opens so the first
/// reads find the healthy partitions.
pub(crate) async fn check_all(group: &Arc<Group>) {
    let checks = group.partitions.iter().map(|p| beat(group, p));
    futures_util::future::join_all(checks).await;
    group.refresh_all();
}

async fn heartbeat(group: Arc<Group>, partition: Arc<Partition>) {
    let mut tick = tokio::time::interval(group.config.heartbeat_interval());
    tick.set_missed_tick_behavior(MissedTickBehavior::Delay);
    let mut stop = group.stop.subscribe();
    loop {
        tokio::select! {
            _ = tick.tick() => {}
            _ = stop.changed() => return,
        }
        beat(&group, &partition).await;
        group.refresh(&partition);
    }
}

async fn beat(group: &Group, partition: &Partition) {
    let ok = match upstream_uri(partition.base(), &group.config.health_path) {
        Ok(uri) => {
            let req = Request::get(uri).body(full(bytes::Bytes::new()));
            match req {
                // The body is read too, so the pooled connection is reused by the next beat
                // instead of a new one being opened every interval.
                Ok(req) => tokio::time::timeout(group.config.heartbeat_timeout(), async {
                    let resp = group.client.request(req).await.ok()?;
                    let ok = resp.status().is_success();
                    http_body_util::BodyExt::collect(resp.into_body())
                        .await
                        .ok()?;
                    Some(ok)
                })
                .await
                .ok()
                .flatten()
                .unwrap_or(false),
                Err(_) => false,
            }
        }
        Err(_) => false,
    };
    if ok {
        partition.set_health(Health::Up);
    } else {
        partition.record_miss();
    }
}
