//! The live dashboard (`GET /` on the admin port) in headless Chromium, driven through
//! chromedriver's WebDriver HTTP API: the page asks for the admin token once, shows the
//! partitions, and when a partition is stopped its status cell changes on the page without
//! a reload; a verb button (drain) works with the kept token. A screenshot is saved under
//! `target/test-artifacts/`.
//!
//! Debian's `chromium` and `chromium-driver` are installed when missing (as root:
//! `apt-get update` once, then `apt-get install -y`). Under `CI=true` a failed install fails
//! the test; elsewhere the test is skipped with the reason.

#![allow(clippy::unwrap_used)]

mod support;

use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::time::Duration;

use base64::Engine;
use regroup::client::HttpClient;
use serde_json::{Value, json};
use support::*;
use tokio::io::{AsyncBufReadExt, BufReader};
use tokio::process::{Child, Command};

const TOKEN: &str = "dash-s3cret";
/// The W3C WebDriver element key.
const ELEMENT: &str = "element-6066-11e4-a52e-4f735466cecf";

fn runs(program: &str) -> bool {
    std::process::Command::new(program)
        .arg("--version")
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status()
        .is_ok_and(|s| s.success())
}

/// Makes sure `chromium` and `chromedriver` run, installing Debian's packages when missing;
/// why not, when they cannot be had.
fn ensure_chromium() -> Result<(), String> {
    if runs("chromium") && runs("chromedriver") {
        return Ok(());
    }
    let root = std::process::Command::new("id")
        .arg("-u")
        .output()
        .is_ok_and(|o| o.stdout.trim_ascii() == b"0");
    if !root {
        return Err("chromium or chromedriver is missing and this is not root (apt-get install -y chromium chromium-driver)".into());
    }
    let apt = |args: &[&str]| -> Result<(), String> {
        let status = std::process::Command::new("apt-get")
            .args(args)
            .env("DEBIAN_FRONTEND", "noninteractive")
            .stdin(Stdio::null())
            .status()
            .map_err(|e| format!("apt-get {args:?}: {e}"))?;
        if status.success() {
            Ok(())
        } else {
            Err(format!("apt-get {args:?}: {status}"))
        }
    };
    apt(&["update", "-q"])?;
    apt(&["install", "-y", "-q", "chromium", "chromium-driver"])?;
    if runs("chromium") && runs("chromedriver") {
        Ok(())
    } else {
        Err("chromium and chromium-driver were installed but do not run".into())
    }
}

/// chromedriver on a 127.0.0.1 port of its choosing, killed on drop.
struct Driver {
    url: String,
    _child: Child,
}

impl Driver {
    async fn start() -> Driver {
        let mut child = Command::new("chromedriver")
            .args(["--port=0", "--allowed-ips=127.0.0.1"])
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::null())
            .kill_on_drop(true)
            .spawn()
            .unwrap();
        let mut lines = BufReader::new(child.stdout.take().unwrap()).lines();
        let port = tokio::time::timeout(Duration::from_secs(30), async {
            while let Ok(Some(line)) = lines.next_line().await {
                // "ChromeDriver was started successfully on port 45893."
                if let Some(rest) = line.split("successfully on port ").nth(1) {
                    return rest.trim_end_matches('.').parse::<u16>().ok();
                }
            }
            None
        })
        .await
        .ok()
        .flatten()
        .expect("chromedriver did not say its port");
        tokio::spawn(async move { while let Ok(Some(_)) = lines.next_line().await {} });
        Driver {
            url: format!("http://127.0.0.1:{port}"),
            _child: child,
        }
    }
}

/// One WebDriver session (a headless Chromium with a fresh profile).
struct Browser {
    http: HttpClient,
    session: String,
    _profile: tempfile::TempDir,
}

impl Browser {
    async fn start(driver: &Driver) -> Browser {
        let http = HttpClient::new();
        let profile = tempfile::tempdir().unwrap();
        let caps = json!({"capabilities": {"alwaysMatch": {
            "browserName": "chrome",
            "goog:chromeOptions": {"args": [
                "--headless", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage",
                "--window-size=1280,900",
                format!("--user-data-dir={}", profile.path().display()),
            ]}
        }}});
        let answer = http
            .send(
                "POST",
                &format!("{}/session", driver.url),
                Some(&caps),
                None,
            )
            .await
            .unwrap();
        let v: Value = answer.json().unwrap();
        let session = v["value"]["sessionId"]
            .as_str()
            .unwrap_or_else(|| panic!("no WebDriver session: {v}"))
            .to_owned();
        Browser {
            http,
            session: format!("{}/session/{session}", driver.url),
            _profile: profile,
        }
    }

    async fn command(&self, method: &str, path: &str, body: Option<Value>) -> Value {
        let answer = self
            .http
            .send(
                method,
                &format!("{}{path}", self.session),
                body.as_ref(),
                None,
            )
            .await
            .unwrap();
        let v: Value = answer.json().unwrap();
        assert_eq!(answer.status, 200, "WebDriver {method} {path}: {v}");
        v["value"].clone()
    }

    async fn go(&self, url: &str) {
        self.command("POST", "/url", Some(json!({"url": url})))
            .await;
    }

    /// Runs `script` in the page with `args`; its result.
    async fn eval(&self, script: &str, args: Value) -> Value {
        self.command(
            "POST",
            "/execute/sync",
            Some(json!({"script": script, "args": args})),
        )
        .await
    }

    async fn element(&self, css: &str) -> String {
        let v = self
            .command(
                "POST",
                "/element",
                Some(json!({"using": "css selector", "value": css})),
            )
            .await;
        v[ELEMENT].as_str().unwrap().to_owned()
    }

    async fn click(&self, css: &str) {
        let id = self.element(css).await;
        self.command("POST", &format!("/element/{id}/click"), Some(json!({})))
            .await;
    }

    async fn type_into(&self, css: &str, text: &str) {
        let id = self.element(css).await;
        self.command(
            "POST",
            &format!("/element/{id}/value"),
            Some(json!({"text": text})),
        )
        .await;
    }

    /// The `data-status` of partition `name`'s status cell, and the cell's text.
    async fn status_cell(&self, name: &str) -> Option<(String, String)> {
        let v = self
            .eval(
                "const e = document.querySelector(`td.status[data-group=\"bank\"][data-partition=\"${arguments[0]}\"]`);\
                 return e ? [e.dataset.status, e.textContent] : null;",
                json!([name]),
            )
            .await;
        Some((v[0].as_str()?.to_owned(), v[1].as_str()?.to_owned()))
    }

    /// Polls until partition `name`'s cell shows `status` (bounded).
    async fn wait_status(&self, name: &str, status: &str) {
        eventually(
            &format!("the page to show {name} {status}"),
            Duration::from_secs(45),
            || async {
                match self.status_cell(name).await {
                    Some((s, text)) if s == status && text == status => Ok(()),
                    other => Err(format!("{other:?}")),
                }
            },
        )
        .await
    }

    async fn screenshot(&self, to: &Path) {
        let png = self.command("GET", "/screenshot", None).await;
        let bytes = base64::engine::general_purpose::STANDARD
            .decode(png.as_str().unwrap())
            .unwrap();
        assert!(bytes.starts_with(b"\x89PNG"), "not a PNG");
        std::fs::create_dir_all(to.parent().unwrap()).unwrap();
        std::fs::write(to, bytes).unwrap();
    }
}

impl Drop for Browser {
    /// Ends the session (Chromium exits) even when the test failed: a blocking `DELETE`, as
    /// `Drop` cannot await.
    fn drop(&mut self) {
        use std::io::{Read, Write};
        let Some((host, path)) = self
            .session
            .strip_prefix("http://")
            .and_then(|rest| rest.split_once('/'))
        else {
            return;
        };
        let Ok(mut stream) = std::net::TcpStream::connect(host) else {
            return;
        };
        let _ = stream.set_read_timeout(Some(Duration::from_secs(10)));
        let request = format!(
            "DELETE /{path} HTTP/1.1\r\nhost: {host}\r\ncontent-length: 0\r\nconnection: close\r\n\r\n"
        );
        if stream.write_all(request.as_bytes()).is_ok() {
            let mut answer = Vec::new();
            let _ = stream.read_to_end(&mut answer);
        }
    }
}

/// `target/test-artifacts/NAME`, beside the profile directory cargo built the tests in.
fn artifact(name: &str) -> PathBuf {
    let target = Path::new(REGROUP).parent().and_then(Path::parent).unwrap();
    target.join("test-artifacts").join(name)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn three_partitions_dashboard_shows_a_stopped_partition_live() {
    if let Err(why) = ensure_chromium() {
        assert!(
            !in_ci(),
            "the dashboard test needs chromium under CI: {why}"
        );
        eprintln!("skipped: {why}");
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let mut banks = Vec::new();
    for name in ["a", "b", "c"] {
        banks.push(Bank::start(dir.path(), name).await);
    }
    let top = format!("admin_token = \"{TOKEN}\"\nadmin_status_requires_token = true");
    let proxy = start_proxy_for(dir.path(), &top, &banks).await;
    let http = HttpClient::new();
    let a = http
        .post(
            &format!("{}/accounts", proxy.url),
            &json!({"name": "x", "balance": 5}),
        )
        .await
        .unwrap();
    assert_eq!(a.status, 201);

    let driver = Driver::start().await;
    let browser = Browser::start(&driver).await;
    browser.go(&format!("{}/", proxy.admin)).await;
    // /status needs the token: the page asks for it once.
    eventually(
        "the page to ask for the token",
        Duration::from_secs(20),
        || async {
            let shown = browser
                .eval(
                    "return getComputedStyle(document.getElementById('token')).display;",
                    json!([]),
                )
                .await;
            if shown == "block" {
                Ok(())
            } else {
                Err(format!("{shown}"))
            }
        },
    )
    .await;
    browser.type_into("#token-input", TOKEN).await;
    browser.click("#token button[type=submit]").await;
    for name in ["a", "b", "c"] {
        browser.wait_status(name, "available").await;
    }
    let primary = browser
        .eval("return document.querySelector('section[data-group=\"bank\"] [data-field=\"primary\"]').textContent;", json!([]))
        .await;
    assert_eq!(primary, "a");
    // A mark that a reload would wipe out.
    browser
        .eval("window.regroupMark = 'still here'; return true;", json!([]))
        .await;

    // Stop partition c: its cell changes on the page by itself.
    banks[2].kill().await;
    browser.wait_status("c", "unavailable").await;

    // A verb button works with the kept token: drain b.
    browser
        .click("tr[data-partition=\"b\"] button[data-verb=\"drain\"]")
        .await;
    browser.wait_status("b", "draining").await;
    let doc: Value = http
        .send("GET", &format!("{}/status", proxy.admin), None, Some(TOKEN))
        .await
        .unwrap()
        .json()
        .unwrap();
    let parts = doc["groups"][0]["partitions"].as_array().unwrap();
    assert_eq!(parts[1]["status"], "draining");
    assert_eq!(parts[2]["status"], "unavailable");
    let error = browser
        .eval(
            "return document.getElementById('error').textContent;",
            json!([]),
        )
        .await;
    assert_eq!(error, "", "no error shown");

    // An admin verb the proxy refuses shows its error on the page: draining the primary
    // while no other partition can lead.
    browser
        .click("tr[data-partition=\"a\"] button[data-verb=\"drain\"]")
        .await;
    eventually("the refusal to show", Duration::from_secs(20), || async {
        let text = browser
            .eval(
                "return document.getElementById('error').textContent;",
                json!([]),
            )
            .await;
        match text.as_str() {
            Some(t) if t.contains("cannot drain primary") => Ok(()),
            _ => Err(format!("{text}")),
        }
    })
    .await;

    // Fields a status may carry (hosts, a partition's host and rebuild progress) are shown
    // when present.
    let shown = browser
        .eval(
            "const g = renderGroup({name: 'g2', primary: 'p', epoch: 3, head: 9, sealed: 9,\
               in_doubt: [], partitions: [{name: 'p', status: 'available', applied: 9, host: 'h1',\
               since: '', reason: ''}, {name: 'q', status: 'catching_up', applied: 4, host: 'h2',\
               rebuild: {progress: 0.5, from: 'p'}, since: '', reason: ''}],\
               hosts: [{name: 'h1', status: 'up', partitions: ['p']}, {name: 'h2', status: 'down', partitions: ['q']}]});\
             return [g.querySelectorAll('tr[data-host]').length,\
               g.querySelector('tr[data-partition=\"q\"]').textContent,\
               g.querySelector('tr[data-partition=\"q\"] progress').value];",
            json!([]),
        )
        .await;
    assert_eq!(shown[0], 2, "{shown}");
    let row = shown[1].as_str().unwrap();
    assert!(
        row.contains("h2") && row.contains("50%") && row.contains("from p"),
        "{row}"
    );
    assert_eq!(shown[2], 0.5, "{shown}");

    let mark = browser
        .eval("return window.regroupMark || null;", json!([]))
        .await;
    assert_eq!(mark, "still here", "the page was reloaded");
    let shot = artifact("dashboard.png");
    browser.screenshot(&shot).await;
    println!("dashboard screenshot: {}", shot.display());
}
