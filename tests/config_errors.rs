//! `regroup check` and `regroup serve` on bad config files: a non-zero exit and one exact
//! `error: ` line naming the file and the place at fault, and no journal created.

#![allow(clippy::unwrap_used)]

mod support;

use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::time::Duration;

use support::REGROUP;

/// What a finished `regroup` run printed.
struct Run {
    code: Option<i32>,
    stdout: String,
    stderr: String,
}

/// Runs `regroup VERB --config CONFIG` to completion (killed after 60 s: a `serve` that
/// wrongly starts would otherwise never end).
async fn regroup(verb: &str, config: &Path) -> Run {
    let child = tokio::process::Command::new(REGROUP)
        .args([verb, "--config", config.to_str().unwrap()])
        .env("RUST_LOG", "warn")
        .env("NO_COLOR", "1")
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .kill_on_drop(true)
        .spawn()
        .unwrap();
    let out = tokio::time::timeout(Duration::from_secs(60), child.wait_with_output())
        .await
        .unwrap_or_else(|_| panic!("regroup {verb} {} did not exit", config.display()))
        .unwrap();
    Run {
        code: out.status.code(),
        stdout: String::from_utf8_lossy(&out.stdout).into_owned(),
        stderr: String::from_utf8_lossy(&out.stderr).into_owned(),
    }
}

/// Runs `verb` on `config` and asserts it failed with exactly one stderr line, which it
/// returns without the newline.
async fn fails(verb: &str, config: &Path) -> String {
    let run = regroup(verb, config).await;
    assert_eq!(
        run.code,
        Some(1),
        "regroup {verb} should fail; stdout:\n{}\nstderr:\n{}",
        run.stdout,
        run.stderr
    );
    assert!(
        !run.stdout.contains("listening"),
        "regroup {verb} started serving: {}",
        run.stdout
    );
    assert!(
        run.stderr.starts_with("error: ") && run.stderr.ends_with('\n'),
        "regroup {verb}: {:?}",
        run.stderr
    );
    assert_eq!(
        run.stderr.lines().count(),
        1,
        "regroup {verb}: one error line expected: {:?}",
        run.stderr
    );
    run.stderr.trim_end_matches('\n').to_owned()
}

/// A valid two-partition config with `journal`, `extra` lines in the `[[groups]]` table
/// (line 7 is the first of them) and `second` as the second partition's name.
fn config_text(journal: &str, extra: &str, second: &str) -> String {
    format!(
        r#"listen = "127.0.0.1:0"
admin_listen = "127.0.0.1:0"
journal = "{journal}"

[[groups]]
name = "bank"
{extra}

[[groups.partitions]]
name = "a"
url = "http://127.0.0.1:9"

[[groups.partitions]]
name = "{second}"
url = "http://127.0.0.1:10"
"#
    )
}

/// A temp dir with a SQLite journal URL inside it.
struct Dir {
    dir: tempfile::TempDir,
}

impl Dir {
    fn new() -> Dir {
        Dir {
            dir: tempfile::tempdir().unwrap(),
        }
    }

    fn journal_path(&self) -> PathBuf {
        self.dir.path().join("journal.db")
    }

    fn journal(&self) -> String {
        format!("sqlite://{}", self.journal_path().display())
    }

    fn write(&self, name: &str, text: &str) -> PathBuf {
        let path = self.dir.path().join(name);
        std::fs::write(&path, text).unwrap();
        path
    }

    /// Asserts that no journal file (nor its WAL companions) was created.
    fn assert_no_journal(&self) {
        let left: Vec<_> = std::fs::read_dir(self.dir.path())
            .unwrap()
            .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
            .filter(|n| n.starts_with("journal.db"))
            .collect();
        assert!(left.is_empty(), "journal files were created: {left:?}");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn config_good_file_checks_ok_without_creating_the_journal() {
    let d = Dir::new();
    let path = d.write("regroup.toml", &config_text(&d.journal(), "", "b"));
    let run = regroup("check", &path).await;
    assert_eq!(run.code, Some(0), "stderr: {}", run.stderr);
    assert_eq!(
        run.stdout,
        format!(
            "{}: ok (1 group(s), 2 partition(s), journal {})\n",
            path.display(),
            d.journal()
        )
    );
    d.assert_no_journal();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn config_malformed_toml_is_located() {
    let d = Dir::new();
    let path = d.write(
        "regroup.toml",
        &format!(
            "journal = \"{}\"\n[[groups]\nname = \"bank\"\n",
            d.journal()
        ),
    );
    for verb in ["check", "serve"] {
        let e = fails(verb, &path).await;
        assert!(
            e.starts_with(&format!(
                "error: {}:2:10: unclosed array table, expected `]`",
                path.display()
            )),
            "{verb}: {e}"
        );
    }
    d.assert_no_journal();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn config_unknown_key_is_named_with_line_and_column() {
    let d = Dir::new();
    let path = d.write(
        "regroup.toml",
        &config_text(&d.journal(), "hearbeat_retries = 3", "b"),
    );
    for verb in ["check", "serve"] {
        let e = fails(verb, &path).await;
        let want = format!(
            "error: {}:7:1: unknown field `hearbeat_retries`, expected one of ",
            path.display()
        );
        assert!(e.starts_with(&want), "{verb}: {e}");
        assert!(e.contains("`heartbeat_retries`"), "{verb}: {e}");
    }
    d.assert_no_journal();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn config_duplicate_partition_name_is_named() {
    let d = Dir::new();
    let path = d.write("regroup.toml", &config_text(&d.journal(), "", "a"));
    for verb in ["check", "serve"] {
        assert_eq!(
            fails(verb, &path).await,
            format!(
                "error: {}: groups[0].partitions[1].name: duplicate partition name \"a\" in group \"bank\"",
                path.display()
            ),
            "{verb}"
        );
    }
    d.assert_no_journal();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn config_missing_file_is_named_once() {
    let d = Dir::new();
    let path = d.dir.path().join("nope.toml");
    for verb in ["check", "serve"] {
        assert_eq!(
            fails(verb, &path).await,
            format!(
                "error: cannot read config file {}: No such file or directory (os error 2)",
                path.display()
            ),
            "{verb}: the cause should be printed once"
        );
    }
    d.assert_no_journal();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn config_unreachable_postgres_journal_is_named_with_its_cause() {
    let d = Dir::new();
    let url = "postgres://postgres@127.0.0.1:1/nope";
    let path = d.write("regroup.toml", &config_text(url, "", "b"));
    let check = fails("check", &path).await;
    assert!(
        check.starts_with(&format!("error: {}: journal {url}: ", path.display())),
        "{check}"
    );
    let serve = fails("serve", &path).await;
    assert!(
        serve.starts_with(&format!("error: journal unavailable: {url}: ")),
        "{serve}"
    );
    // Nothing listens on port 1: the operator should be told so, not about a pool.
    for e in [&check, &serve] {
        assert!(
            e.to_lowercase().contains("connection refused"),
            "the cause is lost: {e}"
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn config_check_sqlite_journal_in_missing_directory_is_named() {
    let d = Dir::new();
    let path = d.write(
        "regroup.toml",
        &config_text("sqlite:///nonexistent-dir-xyz/j.db", "", "b"),
    );
    assert_eq!(
        fails("check", &path).await,
        format!(
            "error: {}: journal sqlite:///nonexistent-dir-xyz/j.db: journal unavailable: directory /nonexistent-dir-xyz does not exist",
            path.display()
        )
    );
    assert!(!Path::new("/nonexistent-dir-xyz").exists());
}
