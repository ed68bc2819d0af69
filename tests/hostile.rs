//! Hostile requests against a real proxy in front of a raw recording upstream: smuggling
//! shapes (CL+TE, TE+CL, two Content-Lengths, obfuscated Transfer-Encoding, a bad chunk
//! size), oversized and malformed headers, hop-by-hop headers both ways, slow headers, slow
//! and oversized bodies. Each is refused or sanitized as the README's table says; a refused
//! one reaches no upstream and journals nothing, and the proxy serves the next request.
//! A read the upstream never answers gets 504 after `read_timeout_ms`.

#![allow(clippy::unwrap_used)]

mod support;

use std::time::Duration;

use support::raw::{Recorder, exchange};
use support::*;

/// What a case must get.
enum Expect {
    /// This status (`None`: the connection closed without an answer); the upstream never
    /// sees the request and nothing is journaled.
    Refused(Option<u16>),
    /// A 200 from the upstream; it received exactly one request for the case's path, which
    /// passes the check; an update is journaled once.
    Forwarded { update: bool, check: fn(&str) },
}

struct Case {
    name: &'static str,
    parts: Vec<Vec<u8>>,
    pause: Duration,
    expect: Expect,
}

/// A request for `/h/{name}` with `Connection: close`, `headers` (each ending in CRLF) and
/// `body`.
fn request(method: &str, name: &str, headers: &str, body: &[u8]) -> Vec<u8> {
    let mut r = format!(
        "{method} /h/{name} HTTP/1.1\r\nhost: regroup.test\r\nconnection: close\r\n{headers}\r\n"
    )
    .into_bytes();
    r.extend_from_slice(body);
    r
}

fn one(parts: Vec<u8>) -> Vec<Vec<u8>> {
    vec![parts]
}

/// The upstream got `hello` framed once, by Content-Length, with no Transfer-Encoding.
fn reframed_hello(req: &str) {
    let lower = req.to_ascii_lowercase();
    assert!(!lower.contains("transfer-encoding"), "{req}");
    assert_eq!(lower.matches("content-length:").count(), 1, "{req}");
    assert!(lower.contains("content-length: 5\r\n"), "{req}");
    assert!(req.ends_with("\r\n\r\nhello"), "{req:?}");
}

/// No hop-by-hop header and nothing `Connection` named reached the upstream.
fn no_hop_by_hop(req: &str) {
    let lower = req.to_ascii_lowercase();
    for h in [
        "x-secret:",
        "keep-alive:",
        "proxy-authorization:",
        "\r\nte:",
        "upgrade:",
        "trailer:",
    ] {
        assert!(!lower.contains(h), "{h} reached the upstream:\n{req}");
    }
    assert!(lower.contains("x-visible: 1"), "{req}");
}

/// The client's address (the test's, on loopback) reached the upstream, once.
fn from_the_client(req: &str) {
    let lower = req.to_ascii_lowercase();
    assert_eq!(lower.matches("x-forwarded-for:").count(), 1, "{req}");
    assert!(lower.contains("x-forwarded-for: 127.0.0.1\r\n"), "{req}");
    assert!(lower.contains("forwarded: for=127.0.0.1;"), "{req}");
}

fn cases() -> Vec<Case> {
    let chunked_hello = b"5\r\nhello\r\n0\r\n\r\n";
    let hop = "connection: x-secret\r\nx-secret: 1\r\nkeep-alive: timeout=5\r\n\
               proxy-authorization: Basic eA==\r\nte: trailers\r\ntrailer: x-t\r\n\
               upgrade: websocket\r\nx-visible: 1\r\n";
    let quick = Duration::ZERO;
    vec![
        Case {
            name: "cl-te",
            parts: one(request(
                "POST",
                "cl-te",
                "content-length: 4\r\ntransfer-encoding: chunked\r\n",
                chunked_hello,
            )),
            pause: quick,
            expect: Expect::Forwarded {
                update: true,
                check: reframed_hello,
            },
        },
        Case {
            name: "te-cl",
            parts: one(request(
                "POST",
                "te-cl",
                "transfer-encoding: chunked\r\ncontent-length: 4\r\n",
                chunked_hello,
            )),
            pause: quick,
            expect: Expect::Forwarded {
                update: true,
                check: reframed_hello,
            },
        },
        Case {
            name: "two-content-lengths",
            parts: one(request(
                "POST",
                "two-content-lengths",
                "content-length: 3\r\ncontent-length: 5\r\n",
                b"hello",
            )),
            pause: quick,
            expect: Expect::Refused(Some(400)),
        },
        Case {
            name: "te-xchunked",
            parts: one(request(
                "POST",
                "te-xchunked",
                "transfer-encoding: xchunked\r\n",
                chunked_hello,
            )),
            pause: quick,
            expect: Expect::Refused(Some(400)),
        },
        Case {
            name: "te-space-chunked",
            parts: one(request(
                "POST",
                "te-space-chunked",
                "transfer-encoding:  chunked\r\n",
                chunked_hello,
            )),
            pause: quick,
            expect: Expect::Forwarded {
                update: true,
                check: reframed_hello,
            },
        },
        Case {
            name: "te-folded",
            parts: one(request(
                "POST",
                "te-folded",
                "transfer-encoding:\r\n chunked\r\n",
                chunked_hello,
            )),
            pause: quick,
            expect: Expect::Refused(Some(400)),
        },
        Case {
            name: "te-chunked-identity",
            parts: one(request(
                "POST",
                "te-chunked-identity",
                "transfer-encoding: chunked, identity\r\n",
                chunked_hello,
            )),
            pause: quick,
            expect: Expect::Refused(Some(400)),
        },
        Case {
            name: "bad-chunk-size",
            parts: one(request(
                "POST",
                "bad-chunk-size",
                "transfer-encoding: chunked\r\n",
                b"zz\r\nhello\r\n0\r\n\r\n",
            )),
            pause: quick,
            expect: Expect::Refused(Some(400)),
        },
        Case {
            name: "header-200k",
            parts: one(request(
                "GET",
                "header-200k",
                &format!("x-big: {}\r\n", "a".repeat(200_000)),
                b"",
            )),
            pause: quick,
            expect: Expect::Refused(Some(431)),
        },
        Case {
            name: "too-many-headers",
            parts: one(request(
                "GET",
                "too-many-headers",
                &(0..150)
                    .map(|i| format!("x-h{i}: {i}\r\n"))
                    .collect::<String>(),
                b"",
            )),
            pause: quick,
            expect: Expect::Refused(Some(431)),
        },
        Case {
            name: "nul-in-header",
            parts: one(request("GET", "nul-in-header", "x-nul: a\0b\r\n", b"")),
            pause: quick,
            expect: Expect::Refused(Some(400)),
        },
        Case {
            name: "hop-by-hop-read",
            parts: one(request("GET", "hop-by-hop-read", hop, b"")),
            pause: quick,
            expect: Expect::Forwarded {
                update: false,
                check: no_hop_by_hop,
            },
        },
        Case {
            name: "hop-by-hop-update",
            parts: one(request(
                "POST",
                "hop-by-hop-update",
                &format!("{hop}content-length: 2\r\n"),
                b"{}",
            )),
            pause: quick,
            expect: Expect::Forwarded {
                update: true,
                check: no_hop_by_hop,
            },
        },
        Case {
            name: "forwarded-for-read",
            parts: one(request("GET", "forwarded-for-read", "", b"")),
            pause: quick,
            expect: Expect::Forwarded {
                update: false,
                check: from_the_client,
            },
        },
        Case {
            name: "forwarded-for-update",
            parts: one(request(
                "POST",
                "forwarded-for-update",
                "content-length: 2\r\n",
                b"{}",
            )),
            pause: quick,
            expect: Expect::Forwarded {
                update: true,
                check: from_the_client,
            },
        },
        Case {
            name: "slow-headers",
            parts: vec![
                b"POST /h/slow-headers HTTP/1.1\r\nhost: regroup.test\r\n".to_vec(),
                b"content-length: 0\r\n\r\n".to_vec(),
            ],
            pause: Duration::from_millis(1500),
            expect: Expect::Refused(None),
        },
        Case {
            name: "stalled-body",
            parts: one(request(
                "POST",
                "stalled-body",
                "content-length: 10\r\n",
                b"12345",
            )),
            pause: quick,
            expect: Expect::Refused(Some(408)),
        },
        Case {
            name: "trickled-body",
            parts: std::iter::once(request(
                "POST",
                "trickled-body",
                "content-length: 12\r\n",
                b"",
            ))
            .chain((0..12).map(|_| b"x".to_vec()))
            .collect(),
            pause: Duration::from_millis(100),
            expect: Expect::Refused(Some(408)),
        },
        Case {
            // A read's body streams to the partition; a stalled one is still the client's
            // fault (408), and the partition sees no complete request.
            name: "stalled-read-body",
            parts: one(request(
                "GET",
                "stalled-read-body",
                "content-length: 10\r\n",
                b"12345",
            )),
            pause: quick,
            expect: Expect::Refused(Some(408)),
        },
        Case {
            name: "oversized-body",
            parts: one(request(
                "POST",
                "oversized-body",
                "content-length: 5000\r\n",
                &[b'x'; 5000],
            )),
            pause: quick,
            expect: Expect::Refused(Some(413)),
        },
        Case {
            name: "oversized-chunked-body",
            parts: one(request(
                "POST",
                "oversized-chunked-body",
                "transfer-encoding: chunked\r\n",
                format!(
                    "320\r\n{}\r\n320\r\n{}\r\n0\r\n\r\n",
                    "x".repeat(800),
                    "y".repeat(800)
                )
                .as_bytes(),
            )),
            pause: quick,
            expect: Expect::Refused(Some(413)),
        },
    ]
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn single_partition_hostile_requests_are_refused_or_sanitized() {
    let dir = tempfile::tempdir().unwrap();
    let upstream = Recorder::start().await;
    let toml = format!(
        "listen = \"127.0.0.1:0\"\nadmin_listen = \"127.0.0.1:0\"\njournal = \"sqlite://{}\"\n\
         header_read_timeout_ms = 1000\nbody_read_timeout_ms = 1000\n\
         [[groups]]\nname = \"raw\"\nmax_body_bytes = 1024\nread_timeout_ms = 1500\n\
         [[groups.partitions]]\nname = \"a\"\nurl = \"{}\"\n",
        dir.path().join("journal.db").display(),
        upstream.url
    );
    let config = dir.path().join("regroup.toml");
    std::fs::write(&config, toml).unwrap();
    let proxy = Proxy::start(&config).await;
    let http = regroup::client::HttpClient::new();
    let head = || async { proxy.status(&http).await.groups[0].head };

    let mut failures = Vec::new();
    for (i, case) in cases().into_iter().enumerate() {
        let before = head().await;
        let parts: Vec<&[u8]> = case.parts.iter().map(Vec::as_slice).collect();
        let got = exchange(&proxy.url, &parts, case.pause, Duration::from_secs(5)).await;
        let seen = upstream.requests_with(&format!("/h/{} ", case.name));
        let after = head().await;
        let summary = format!(
            "{}: status {:?}, closed {}, upstream saw {}, head {before} -> {after}\n{}",
            case.name,
            got.status,
            got.closed,
            seen.len(),
            got.text.lines().take(12).collect::<Vec<_>>().join("\n")
        );
        eprintln!("{}", summary.lines().next().unwrap_or_default());
        match case.expect {
            Expect::Refused(status) => {
                if got.status != status || !seen.is_empty() || after != before {
                    failures.push(summary);
                }
            }
            Expect::Forwarded { update, check } => {
                let journaled = if update { before + 1 } else { before };
                if got.status != Some(200) || seen.len() != 1 || after != journaled {
                    failures.push(summary);
                } else {
                    check(&seen[0]);
                    // The upstream's hop-by-hop answer headers stay with the proxy.
                    let lower = got.text.to_ascii_lowercase();
                    for h in ["x-upstream-secret", "keep-alive", "proxy-authenticate"] {
                        assert!(
                            !lower.contains(h),
                            "{}: {h} reached the client:\n{}",
                            case.name,
                            got.text
                        );
                    }
                    assert!(lower.contains("x-upstream-visible: 1"), "{}", got.text);
                }
            }
        }
        // The proxy serves the next request.
        let next = exchange(
            &proxy.url,
            &[&request("GET", &format!("next-{i}"), "", b"")],
            Duration::ZERO,
            Duration::from_secs(5),
        )
        .await;
        assert_eq!(next.status, Some(200), "after {}: {}", case.name, next.text);
    }

    // A read its partition never answers: 504 once `read_timeout_ms` has passed.
    let started = std::time::Instant::now();
    let stalled = exchange(
        &proxy.url,
        &[&request("GET", "stall", "", b"")],
        Duration::ZERO,
        Duration::from_secs(10),
    )
    .await;
    assert_eq!(stalled.status, Some(504), "{}", stalled.text);
    assert!(
        stalled.text.contains("\"read_timeout\""),
        "{}",
        stalled.text
    );
    assert!(started.elapsed() >= Duration::from_millis(1000));
    assert_eq!(upstream.requests_with("/h/stall ").len(), 1);

    // Pipelined on one keep-alive connection: two reads (served by the proxy's own HTTP/1),
    // an update (the connection goes to hyper with what was read of it), a last read
    // (hyper's): four answers in order, the HEAD's without a body, each request forwarded
    // once and in order.
    let keep = |method: &str, name: &str, headers: &str, body: &[u8]| {
        let mut r = format!("{method} /h/{name} HTTP/1.1\r\nhost: regroup.test\r\n{headers}\r\n")
            .into_bytes();
        r.extend_from_slice(body);
        r
    };
    let before = head().await;
    let pipelined = [
        keep("GET", "pipe-1", "", b""),
        keep("HEAD", "pipe-2", "", b""),
        keep("POST", "pipe-3", "content-length: 2\r\n", b"{}"),
        request("GET", "pipe-4", "", b""),
    ]
    .concat();
    let got = exchange(
        &proxy.url,
        &[&pipelined],
        Duration::ZERO,
        Duration::from_secs(5),
    )
    .await;
    assert!(got.closed, "closed after the last answer: {}", got.text);
    let answers: Vec<&str> = got.text.split("HTTP/1.1 ").skip(1).collect();
    assert_eq!(answers.len(), 4, "{}", got.text);
    for (i, answer) in answers.iter().enumerate() {
        assert!(answer.starts_with("200 OK\r\n"), "answer {i}: {answer}");
        assert!(
            answer
                .to_ascii_lowercase()
                .contains("\r\ncontent-length: 2\r\n"),
            "answer {i}: {answer}"
        );
        let body = answer.split_once("\r\n\r\n").map_or("", |(_, b)| b);
        assert_eq!(body, if i == 1 { "" } else { "ok" }, "answer {i}: {answer}");
    }
    let seen: Vec<String> = (1..=4)
        .map(|i| {
            let mut r = upstream.requests_with(&format!("/h/pipe-{i} "));
            assert_eq!(r.len(), 1, "pipe-{i} forwarded once");
            r.remove(0)
        })
        .collect();
    assert!(seen[1].starts_with("HEAD /h/pipe-2 "), "{}", seen[1]);
    assert!(seen[2].ends_with("\r\n\r\n{}"), "{}", seen[2]);
    assert_eq!(head().await, before + 1, "the update journaled once");

    assert!(
        failures.is_empty(),
        "cases not handled as documented:\n\n{}\n\nproxy log:\n{}",
        failures.join("\n\n"),
        proxy.log()
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn single_partition_journal_error_answer_carries_no_detail() {
    use sea_orm::ConnectionTrait;
    let dir = tempfile::tempdir().unwrap();
    let upstream = Recorder::start().await;
    let journal = dir.path().join("journal.db");
    let toml = format!(
        "listen = \"127.0.0.1:0\"\nadmin_listen = \"127.0.0.1:0\"\njournal = \"sqlite://{}\"\n\
         [[groups]]\nname = \"raw\"\n[[groups.partitions]]\nname = \"a\"\nurl = \"{}\"\n",
        journal.display(),
        upstream.url
    );
    let config = dir.path().join("regroup.toml");
    std::fs::write(&config, toml).unwrap();
    let proxy = Proxy::start(&config).await;
    let post = |name: &str| {
        let r = request("POST", name, "content-length: 2\r\n", b"{}");
        let url = proxy.url.clone();
        async move { exchange(&url, &[&r], Duration::ZERO, Duration::from_secs(30)).await }
    };
    assert_eq!(post("before").await.status, Some(200));

    // The journal's table disappears under the proxy: its next append fails in SQLite.
    let db = sea_orm::Database::connect(format!("sqlite://{}", journal.display()))
        .await
        .unwrap();
    db.execute_unprepared("ALTER TABLE regroup_record RENAME TO regroup_record_away")
        .await
        .unwrap();
    // The journal cannot be read either, so it cannot say whether the record was stored:
    // the update is in doubt (502), not "nothing changed".
    let failed = post("during").await;
    assert_eq!(failed.status, Some(502), "{}", failed.text);
    let body = failed.text.split("\r\n\r\n").nth(1).unwrap_or_default();
    let v: serde_json::Value = serde_json::from_str(body).unwrap();
    assert_eq!(v["error"], "in_doubt", "{body}");
    let lower = body.to_ascii_lowercase();
    for leak in [
        dir.path().to_str().unwrap(),
        "journal.db",
        "regroup_record",
        "sqlite",
        "database",
        "insert",
        "select",
        "no such table",
    ] {
        assert!(!lower.contains(leak), "the answer leaks {leak:?}: {body}");
    }
    // The log has the detail.
    let log = proxy.log();
    assert!(log.contains("no such table"), "{log}");
    assert!(upstream.requests_with("/h/during ").is_empty());

    // The table comes back; so does the journal.
    db.execute_unprepared("ALTER TABLE regroup_record_away RENAME TO regroup_record")
        .await
        .unwrap();
    assert_eq!(post("after").await.status, Some(200));
    let http = regroup::client::HttpClient::new();
    assert_eq!(proxy.status(&http).await.groups[0].head, 2);
}
