//! `regroup sql classify` and `regroup sql verify`: the real binary.

use std::io::Write;
use std::process::{Command, Stdio};

fn classify(dialect: &str, input: &str) -> (bool, Vec<serde_json::Value>, String) {
    let mut child = Command::new(env!("CARGO_BIN_EXE_regroup"))
        .args(["sql", "classify", "--dialect", dialect])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("regroup starts");
    child
        .stdin
        .take()
        .expect("stdin")
        .write_all(input.as_bytes())
        .expect("stdin written");
    let out = child.wait_with_output().expect("regroup ends");
    let lines = String::from_utf8_lossy(&out.stdout)
        .lines()
        .map(|l| serde_json::from_str(l).expect("each output line is JSON"))
        .collect();
    (
        out.status.success(),
        lines,
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

#[test]
fn sql_classify_one_json_line_per_statement_line() {
    let input = concat!(
        r#"{"sql": "SELECT 'DELETE FROM t' FROM accounts -- DROP TABLE x"}"#,
        "\n",
        r#"{"sql": "INSERT INTO t (at) VALUES (datetime('now'))"}"#,
        "\n\n",
        r#"{"sql": "UPDATE t SET r = random()"}"#,
        "\n",
        r#"{"sql": "SELECT nextval('s')"}"#,
        "\n",
    );
    let (ok, lines, stderr) = classify("sqlite", input);
    assert!(ok, "{stderr}");
    assert_eq!(lines.len(), 4, "{lines:?}");
    assert_eq!(
        lines[0],
        serde_json::json!({"class": "read", "deterministic": true, "reasons": [], "rewritten": null})
    );
    assert_eq!(lines[1]["class"], "write");
    assert_eq!(lines[1]["deterministic"], false);
    let rewritten = lines[1]["rewritten"].as_str().unwrap_or_default();
    assert!(
        rewritten.starts_with("INSERT INTO t (at) VALUES (datetime('20")
            && !rewritten.contains("now"),
        "{rewritten}"
    );
    assert_eq!(lines[2]["deterministic"], false);
    assert_eq!(lines[2]["rewritten"], serde_json::Value::Null);
    assert!(
        lines[2]["reasons"][0]
            .as_str()
            .is_some_and(|r| r.starts_with("random() gives a new value on every call")),
        "{:?}",
        lines[2]
    );
    assert_eq!(lines[3]["class"], "side_effect");
}

#[test]
fn sql_classify_names_a_bad_input_line_and_fails() {
    let (ok, lines, stderr) = classify("postgres", "{\"sql\": \"BEGIN\"}\nnot json\n");
    assert!(!ok);
    assert_eq!(lines[0]["class"], "txn");
    assert!(
        lines[1]["error"]
            .as_str()
            .is_some_and(|e| e.starts_with("line 2:")),
        "{lines:?}"
    );
    assert!(stderr.contains("1 input line(s)"), "{stderr}");
}

#[test]
fn sql_classify_refuses_an_unknown_dialect() {
    let (ok, lines, stderr) = classify("oracle", "");
    assert!(!ok);
    assert!(lines.is_empty());
    assert!(stderr.contains("oracle"), "{stderr}");
}

#[test]
fn sql_verify_names_the_first_differing_table() {
    let dir = tempfile::tempdir().expect("temp dir");
    let url = |n: &str| format!("sqlite://{}", dir.path().join(format!("{n}.db")).display());
    let rt = tokio::runtime::Runtime::new().expect("runtime");
    rt.block_on(async {
        use sea_orm::ConnectionTrait;
        for n in ["a", "b"] {
            let db = sea_orm::Database::connect(format!("{}?mode=rwc", url(n)))
                .await
                .expect("sqlite");
            for sql in [
                "CREATE TABLE accounts (id INTEGER PRIMARY KEY, balance INTEGER)",
                "CREATE TABLE zebra (id INTEGER PRIMARY KEY)",
                "INSERT INTO accounts VALUES (1, 10), (2, 20)",
            ] {
                db.execute_unprepared(sql).await.expect("setup");
            }
            if n == "b" {
                db.execute_unprepared("UPDATE accounts SET balance = 21 WHERE id = 2")
                    .await
                    .expect("change");
                db.execute_unprepared("INSERT INTO zebra VALUES (1)")
                    .await
                    .expect("change");
            }
            let _ = db.close().await;
        }
    });
    let run = |copies: &[&str]| {
        let mut cmd = Command::new(env!("CARGO_BIN_EXE_regroup"));
        cmd.args(["sql", "verify"]);
        for c in copies {
            cmd.arg("--copy").arg(format!("{c}={}", url(c)));
        }
        cmd.output().expect("regroup runs")
    };
    let same = run(&["a", "a"]);
    assert!(same.status.success(), "{same:?}");
    assert!(String::from_utf8_lossy(&same.stdout).contains("identical"));
    let differ = run(&["a", "b"]);
    assert!(!differ.status.success());
    let out = String::from_utf8_lossy(&differ.stdout);
    assert!(out.contains("b: table accounts differs from a's"), "{out}");
    let missing = Command::new(env!("CARGO_BIN_EXE_regroup"))
        .args([
            "sql",
            "verify",
            "--copy",
            "a=sqlite:///nonexistent/x.db",
            "--copy",
        ])
        .arg(format!("b={}", url("b")))
        .output()
        .expect("regroup runs");
    assert!(!missing.status.success());
    assert!(String::from_utf8_lossy(&missing.stderr).contains("does not exist"));
}
