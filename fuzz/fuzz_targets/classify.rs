//! Path normalization and classification: the first line is the method, the rest the path.
//! Checks that nothing panics and that the classifier fails closed: a path that does not
//! normalize is an update under any rule, and a normalized path holds no dot or empty
//! segment.

#![no_main]

use http::Method;
use libfuzzer_sys::fuzz_target;
use regroup_replay::classify::{Classifier, Kind, RouteRule, normalize_path};

fuzz_target!(|data: &[u8]| {
    let Ok(text) = std::str::from_utf8(data) else {
        return;
    };
    let (method, path) = text.split_once('\n').unwrap_or(("GET", text));
    let Ok(method) = Method::from_bytes(method.as_bytes()) else {
        return;
    };
    let everything_reads = Classifier::new(&[RouteRule {
        method: None,
        path: "/**".into(),
        kind: Kind::Read,
    }]);
    match normalize_path(path) {
        Ok(segments) => {
            for s in &segments {
                assert!(
                    !s.is_empty() && s != "." && s != "..",
                    "{path:?} → {segments:?}"
                );
                assert!(
                    !s.contains('/') && !s.contains('\\'),
                    "{path:?} → {segments:?}"
                );
            }
            assert_eq!(
                everything_reads.classify(&method, path),
                Kind::Read,
                "{path:?}"
            );
        }
        Err(_) => {
            assert_eq!(
                everything_reads.classify(&method, path),
                Kind::Update,
                "{path:?}"
            );
        }
    }
    let rules = [
        RouteRule {
            method: Some("POST".into()),
            path: "/search/**".into(),
            kind: Kind::Read,
        },
        RouteRule {
            method: None,
            path: "/accounts/*/touch".into(),
            kind: Kind::Update,
        },
    ];
    let kind = Classifier::new(&rules).classify(&method, path);
    if !matches!(
        method.as_str(),
        "GET" | "HEAD" | "OPTIONS" | "PROPFIND" | "REPORT" | "SEARCH" | "POST"
    ) {
        assert_eq!(kind, Kind::Update, "{method} {path:?}");
    }
});
