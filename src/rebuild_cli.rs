//! `regroup rebuild`: asks the admin API to rebuild a partition from a snapshot, then polls
//! `/status` and shows the rebuild's progress as a bar until it is done (exit 0) or failed
//! (non-zero exit, naming what failed).

use std::time::Duration;

use anyhow::{Context, bail};
use indicatif::{ProgressBar, ProgressStyle};
use regroup::client::HttpClient;
use regroup_proxy::admin::StatusDoc;
use regroup_proxy::rebuild::{RebuildPhase, RebuildProgress};

/// How often `/status` is polled.
const POLL: Duration = Duration::from_millis(200);

/// `regroup rebuild --group G --partition P [--from Q]`.
#[derive(clap::Args)]
pub(crate) struct RebuildArgs {
    /// The admin URL.
    #[arg(long, default_value = "http://127.0.0.1:8081")]
    admin: String,
    /// The group.
    #[arg(long)]
    group: String,
    /// The partition to rebuild.
    #[arg(long)]
    partition: String,
    /// The partition to take the snapshot from (default: the best available replica, else
    /// the primary).
    #[arg(long)]
    from: Option<String>,
    /// Admin bearer token (default: $REGROUP_ADMIN_TOKEN).
    #[arg(long, env = "REGROUP_ADMIN_TOKEN", hide_env_values = true)]
    token: Option<String>,
    /// Give up waiting after this many seconds (the rebuild itself goes on).
    #[arg(long, default_value_t = 3600)]
    wait_secs: u64,
}

pub(crate) async fn run(a: RebuildArgs) -> anyhow::Result<()> {
    let admin = a.admin.trim_end_matches('/').to_owned();
    let http = HttpClient::new();
    let mut body = serde_json::json!({"partition": a.partition});
    if let Some(f) = &a.from {
        body["from"] = f.clone().into();
    }
    let url = format!("{admin}/groups/{}/rebuild", a.group);
    let answer = http
        .send("POST", &url, Some(&body), a.token.as_deref())
        .await?;
    if answer.status != 202 {
        let v: serde_json::Value = answer.json().unwrap_or_default();
        bail!(
            "rebuild refused ({}): {}",
            answer.status,
            v["message"].as_str().unwrap_or("no message")
        );
    }
    let v: serde_json::Value = answer.json()?;
    let id = v["rebuild"]["id"]
        .as_u64()
        .context("the admin API did not say which rebuild started")?;
    let bar = ProgressBar::new_spinner();
    bar.set_style(
        ProgressStyle::with_template("{spinner} {elapsed_precise} {msg} {binary_bytes} streamed")
            .unwrap_or_else(|_| ProgressStyle::default_spinner()),
    );
    bar.enable_steady_tick(Duration::from_millis(120));
    let deadline = tokio::time::Instant::now() + Duration::from_secs(a.wait_secs);
    loop {
        let progress = poll(&http, &admin, &a, id).await;
        match progress {
            Ok(Some(p)) => {
                bar.set_position(p.bytes);
                bar.set_message(describe(&a.partition, &p));
                match p.phase {
                    RebuildPhase::Done => {
                        bar.finish_and_clear();
                        // Also when stderr is no terminal (the bar is then hidden).
                        println!("{} ({} bytes)", describe(&a.partition, &p), p.bytes);
                        return Ok(());
                    }
                    RebuildPhase::Failed => {
                        bar.finish_and_clear();
                        println!("{}", describe(&a.partition, &p));
                        bail!(
                            "rebuild of {} failed: {}",
                            a.partition,
                            p.error.as_deref().unwrap_or("no reason given")
                        );
                    }
                    _ => {}
                }
            }
            Ok(None) => {
                bar.abandon();
                bail!(
                    "rebuild {id} of {} is no longer shown in /status",
                    a.partition
                );
            }
            // A status poll that failed once is tried again until the deadline.
            Err(e) => bar.set_message(format!("cannot read /status: {e:#}")),
        }
        if tokio::time::Instant::now() >= deadline {
            bar.abandon();
            bail!(
                "gave up waiting after {} s; the rebuild goes on (see regroup status)",
                a.wait_secs
            );
        }
        tokio::time::sleep(POLL).await;
    }
}

fn describe(partition: &str, p: &RebuildProgress) -> String {
    let phase = match p.phase {
        RebuildPhase::Starting => "starting",
        RebuildPhase::Snapshot => "taking the snapshot",
        RebuildPhase::Restore => "restoring",
        RebuildPhase::Rejoin => "rejoining",
        RebuildPhase::Done => "done",
        RebuildPhase::Failed => "failed",
    };
    let seq = p.seq.map(|s| format!(" at seq {s}")).unwrap_or_default();
    format!("{partition} from {}{seq}: {phase}", p.source)
}

async fn poll(
    http: &HttpClient,
    admin: &str,
    a: &RebuildArgs,
    id: u64,
) -> anyhow::Result<Option<RebuildProgress>> {
    let answer = http
        .send("GET", &format!("{admin}/status"), None, a.token.as_deref())
        .await?;
    if answer.status != 200 {
        bail!("/status answered {}", answer.status);
    }
    let doc: StatusDoc = answer.json()?;
    Ok(doc
        .groups
        .into_iter()
        .find(|g| g.name == a.group)
        .and_then(|g| g.partitions.into_iter().find(|p| p.name == a.partition))
        .and_then(|p| p.rebuild)
        .filter(|r| r.id == id))
}
