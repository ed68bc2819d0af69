//! The README's first command: `regroup demo` starts three bank partitions and the proxy,
//! drives a workload, and reports that every partition holds the same data.

#![allow(clippy::unwrap_used)]

mod support;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn three_partitions_demo_workload_converges() {
    let dir = tempfile::tempdir().unwrap();
    let out = tokio::time::timeout(
        std::time::Duration::from_secs(120),
        tokio::process::Command::new(support::REGROUP)
            .args(["demo", "--workload", "300", "--listen", "127.0.0.1:0"])
            .args(["--admin-listen", "127.0.0.1:0", "--dir"])
            .arg(dir.path())
            .arg("--bank")
            .arg(support::bank_exe())
            .env("RUST_LOG", "warn")
            .output(),
    )
    .await
    .expect("the demo finishes within 120 s")
    .unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "{stdout}\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(stdout.contains("300 transfers done"), "{stdout}");
    assert!(
        stdout.contains("every partition holds the same data"),
        "{stdout}"
    );
    for p in ["a", "b", "c"] {
        assert!(
            stdout.contains(&format!("partition {p}: 4 accounts")),
            "{stdout}"
        );
    }
    assert!(dir.path().join("regroup.toml").exists());
}
