//! What counts as an update: the one definition shared by the proxy (which journals
//! updates and balances reads) and the app layer (which refuses updates that did not come
//! through regroup).
//!
//! Classification fails closed. Reads are the methods their RFCs define as safe (GET,
//! HEAD, OPTIONS; WebDAV's PROPFIND, REPORT, SEARCH), spelled exactly so (`get` is not GET);
//! every other method, unknown ones included, is an update. Route rules override the
//! method and match the *normalized* path ([`normalize_path`]); a path that cannot be
//! normalized safely is an update whatever its method and rules.

use http::Method;
use serde::Deserialize;

/// The methods that read by default: those their RFCs define as safe.
pub const DEFAULT_READ_METHODS: [&str; 6] =
    ["GET", "HEAD", "OPTIONS", "PROPFIND", "REPORT", "SEARCH"];

/// What a request is to the group.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Kind {
    /// Changes state: serialized, journaled, forwarded to the primary, replayed.
    Update,
    /// Does not change state: balanced over partitions that are caught up.
    Read,
}

/// A classification rule, as configured.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RouteRule {
    /// The method it applies to, spelled exactly (`*` or absent: any).
    #[serde(default)]
    pub method: Option<String>,
    /// Path pattern: `*` matches one segment, a trailing `**` any rest. Matched against
    /// the normalized request path.
    pub path: String,
    /// `read` or `update`.
    pub kind: Kind,
}

/// Why a path cannot be normalized safely (and so is classified as an update).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum PathError {
    /// Not an origin-form path (does not start with `/`).
    #[error("path {0:?} does not start with '/'")]
    NotAbsolute(String),
    /// A `%` not followed by two hex digits.
    #[error("path {0:?} has an invalid percent-encoding")]
    BadPercent(String),
    /// An encoded or literal character that servers disagree on: `%2F`, `%5C`, `\`, NUL or
    /// another control character, or bytes that are not UTF-8 once decoded.
    #[error(
        "path {0:?} has an ambiguous character (encoded slash or backslash, control character or non-UTF-8)"
    )]
    Ambiguous(String),
    /// A `..` that would climb above the root.
    #[error("path {0:?} climbs above the root")]
    AboveRoot(String),
}

/// The path as servers resolve it: percent-decoded, `.` and `..` segments resolved,
/// repeated and trailing slashes dropped. Returns the segments.
///
/// Refuses what servers do not agree on: an encoded slash or backslash (some decode it
/// into a separator, others keep it in the segment), a literal backslash, NUL and other
/// control characters, invalid percent-encoding, bytes that are not UTF-8, and `..` above
/// the root (some answer 400, others clamp it). A segment whose part before `;` (a path
/// parameter, which Tomcat strips) is `.` or `..` counts as a dot segment to refuse too.
///
/// ```
/// use regroup_replay::classify::normalize_path;
/// assert_eq!(normalize_path("/search/../transfers").unwrap(), ["transfers"]);
/// assert_eq!(normalize_path("//a/./b/%2e%2E/c/").unwrap(), ["a", "c"]);
/// assert!(normalize_path("/a%2Fb").is_err());
/// assert!(normalize_path("/../etc").is_err());
/// ```
pub fn normalize_path(path: &str) -> Result<Vec<String>, PathError> {
    if !path.starts_with('/') {
        return Err(PathError::NotAbsolute(path.to_owned()));
    }
    let mut out: Vec<String> = Vec::new();
    for raw in path.split('/') {
        let seg = decode_segment(raw).map_err(|e| e(path))?;
        let dots = seg.split(';').next().unwrap_or("");
        match (seg.as_str(), dots) {
            ("", _) | (".", _) => {}
            ("..", _) => {
                if out.pop().is_none() {
                    return Err(PathError::AboveRoot(path.to_owned()));
                }
            }
            (_, "." | "..") => return Err(PathError::Ambiguous(path.to_owned())),
            _ => out.push(seg),
        }
    }
    Ok(out)
}

type PathErrorFor = fn(&str) -> PathError;

fn decode_segment(raw: &str) -> Result<String, PathErrorFor> {
    let bytes = raw.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while let Some(&b) = bytes.get(i) {
        let byte = if b == b'%' {
            let hi = bytes.get(i + 1).and_then(|c| (*c as char).to_digit(16));
            let lo = bytes.get(i + 2).and_then(|c| (*c as char).to_digit(16));
            let (Some(hi), Some(lo)) = (hi, lo) else {
                return Err(|p| PathError::BadPercent(p.to_owned()));
            };
            i += 3;
            let decoded = (hi * 16 + lo) as u8;
            if decoded == b'/' {
                return Err(|p| PathError::Ambiguous(p.to_owned()));
            }
            decoded
        } else {
            i += 1;
            b
        };
        if byte == b'\\' || byte < 0x20 || byte == 0x7f {
            return Err(|p| PathError::Ambiguous(p.to_owned()));
        }
        out.push(byte);
    }
    String::from_utf8(out)
        .map_err(|_| (|p: &str| PathError::Ambiguous(p.to_owned())) as PathErrorFor)
}

/// Classifies requests by route rules on the normalized path, then by method; see the
/// module docs.
///
/// ```
/// use regroup_replay::classify::{Classifier, Kind, RouteRule};
/// use http::Method;
/// let c = Classifier::new(&[RouteRule {
///     method: Some("POST".into()),
///     path: "/search/**".into(),
///     kind: Kind::Read,
/// }]);
/// assert_eq!(c.classify(&Method::POST, "/search/q"), Kind::Read);
/// assert_eq!(c.classify(&Method::POST, "/search/../transfers"), Kind::Update);
/// assert_eq!(c.classify(&Method::GET, "/accounts"), Kind::Read);
/// assert_eq!(c.classify(&Method::from_bytes(b"MKCOL").unwrap(), "/d/"), Kind::Update);
/// ```
#[derive(Debug, Clone)]
pub struct Classifier {
    rules: Vec<Rule>,
    reads: Vec<String>,
}

impl Default for Classifier {
    /// No rules; the default read methods.
    fn default() -> Self {
        Classifier::new(&[])
    }
}

#[derive(Debug, Clone)]
struct Rule {
    /// `None`: any method.
    method: Option<String>,
    segments: Vec<String>,
    kind: Kind,
}

impl Classifier {
    /// A classifier with `rules` tried in order before the method default
    /// ([`DEFAULT_READ_METHODS`]). A rule's path is normalized like a request's; a rule
    /// whose path cannot be normalized never matches.
    pub fn new(rules: &[RouteRule]) -> Self {
        Classifier {
            rules: rules
                .iter()
                .filter_map(|r| {
                    let segments = pattern_segments(&r.path)?;
                    Some(Rule {
                        method: r.method.clone().filter(|m| m != "*"),
                        segments,
                        kind: r.kind,
                    })
                })
                .collect(),
            reads: DEFAULT_READ_METHODS
                .iter()
                .map(|m| (*m).to_owned())
                .collect(),
        }
    }

    /// Replaces the methods that read by default (exact spelling) with `methods`.
    pub fn with_read_methods<S: AsRef<str>>(mut self, methods: &[S]) -> Self {
        self.reads = methods.iter().map(|m| m.as_ref().to_owned()).collect();
        self
    }

    /// The kind of a request with this method and path (no query).
    pub fn classify(&self, method: &Method, path: &str) -> Kind {
        let method = method.as_str();
        if is_plain(path) {
            // The common case, without allocating: nothing to decode or resolve.
            return self.kind_of(method, path.split('/').filter(|s| !s.is_empty()));
        }
        let Ok(segments) = normalize_path(path) else {
            return Kind::Update;
        };
        let kind = self.kind_of(method, segments.iter().map(String::as_str));
        if kind == Kind::Read && segments.iter().any(|s| s.contains(';')) {
            // Some servers (Tomcat) strip `;` path parameters before routing, others keep
            // them: a read only if it reads both ways.
            let stripped = segments.iter().map(|s| s.split(';').next().unwrap_or(""));
            return self.kind_of(method, stripped);
        }
        kind
    }

    fn kind_of<'s>(&self, method: &str, segments: impl Iterator<Item = &'s str> + Clone) -> Kind {
        for rule in &self.rules {
            if rule.method.as_deref().is_none_or(|m| m == method)
                && matches(&rule.segments, segments.clone())
            {
                return rule.kind;
            }
        }
        if self.reads.iter().any(|m| m == method) {
            Kind::Read
        } else {
            Kind::Update
        }
    }

    /// Whether a request with this method and path is an update.
    pub fn is_update(&self, method: &Method, path: &str) -> bool {
        self.classify(method, path) == Kind::Update
    }
}

/// A rule's segments: `*` and `**` kept, the rest normalized like a request path.
pub(crate) fn pattern_segments(pattern: &str) -> Option<Vec<String>> {
    normalize_path(pattern).ok()
}

/// A path that normalizes to its own non-empty segments: it starts with `/` and has no
/// `%`, `\\`, `;`, control character, non-ASCII byte or `.`/`..` segment.
fn is_plain(path: &str) -> bool {
    path.starts_with('/')
        && path
            .bytes()
            .all(|b| b.is_ascii_graphic() && !matches!(b, b'%' | b'\\' | b';'))
        && path.split('/').all(|s| s != "." && s != "..")
}

pub(crate) fn matches<'s>(pattern: &[String], mut parts: impl Iterator<Item = &'s str>) -> bool {
    for (i, seg) in pattern.iter().enumerate() {
        if seg == "**" && i + 1 == pattern.len() {
            return true;
        }
        match parts.next() {
            Some(p) if seg == "*" || seg == p => {}
            _ => return false,
        }
    }
    parts.next().is_none()
}

/// Checks a `read_methods` list: every entry a non-empty HTTP method token.
pub fn validate_read_methods<S: AsRef<str>>(methods: &[S]) -> Result<(), String> {
    for m in methods {
        let m = m.as_ref();
        if m.is_empty() || Method::from_bytes(m.as_bytes()).is_err() {
            return Err(format!("{m:?} is not an HTTP method"));
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn rule(method: Option<&str>, path: &str, kind: Kind) -> RouteRule {
        RouteRule {
            method: method.map(str::to_owned),
            path: path.to_owned(),
            kind,
        }
    }

    fn m(s: &str) -> Method {
        Method::from_bytes(s.as_bytes()).unwrap_or(Method::GET)
    }

    #[test]
    fn normalization_table() {
        let ok: &[(&str, &[&str])] = &[
            ("/", &[]),
            ("//", &[]),
            ("/a/b/", &["a", "b"]),
            ("/a//b", &["a", "b"]),
            ("/a/./b", &["a", "b"]),
            ("/a/../b", &["b"]),
            ("/a/b/..", &["a"]),
            ("/search/../transfers", &["transfers"]),
            ("/search/%2e%2e/transfers", &["transfers"]),
            ("/search/.%2E/transfers", &["transfers"]),
            ("/search/%2e/x", &["search", "x"]),
            ("/s%65arch", &["search"]),
            ("/caf%C3%A9", &["café"]),
            ("/a;v=1/b", &["a;v=1", "b"]),
            ("/a%20b", &["a b"]),
        ];
        for (path, want) in ok {
            let got = normalize_path(path);
            assert!(got.as_ref().is_ok_and(|g| g == want), "{path}: {got:?}");
        }
        type Check = fn(&PathError) -> bool;
        let bad: &[(&str, Check)] = &[
            ("x", |e| matches!(e, PathError::NotAbsolute(_))),
            ("", |e| matches!(e, PathError::NotAbsolute(_))),
            ("/..", |e| matches!(e, PathError::AboveRoot(_))),
            ("/a/../../b", |e| matches!(e, PathError::AboveRoot(_))),
            ("/%2e%2e/b", |e| matches!(e, PathError::AboveRoot(_))),
            ("/a%2Fb", |e| matches!(e, PathError::Ambiguous(_))),
            ("/a%2fb", |e| matches!(e, PathError::Ambiguous(_))),
            ("/a%5Cb", |e| matches!(e, PathError::Ambiguous(_))),
            ("/a\\b", |e| matches!(e, PathError::Ambiguous(_))),
            ("/a%00b", |e| matches!(e, PathError::Ambiguous(_))),
            ("/a%0a", |e| matches!(e, PathError::Ambiguous(_))),
            ("/a%7F", |e| matches!(e, PathError::Ambiguous(_))),
            ("/a%ff", |e| matches!(e, PathError::Ambiguous(_))),
            ("/search/..;/transfers", |e| {
                matches!(e, PathError::Ambiguous(_))
            }),
            ("/search/.;x/t", |e| matches!(e, PathError::Ambiguous(_))),
            ("/a%", |e| matches!(e, PathError::BadPercent(_))),
            ("/a%2", |e| matches!(e, PathError::BadPercent(_))),
            ("/a%zz", |e| matches!(e, PathError::BadPercent(_))),
            ("/a%+1", |e| matches!(e, PathError::BadPercent(_))),
        ];
        for (path, want) in bad {
            let got = normalize_path(path);
            assert!(got.as_ref().is_err_and(want), "{path}: {got:?}");
        }
    }

    #[test]
    fn plain_paths_classify_like_normalized_ones() {
        let c = Classifier::new(&[
            rule(Some("POST"), "/search/**", Kind::Read),
            rule(None, "/a/*/c", Kind::Update),
        ]);
        for path in [
            "/",
            "/search",
            "//search//x/",
            "/a/b/c",
            "/a/b/c/",
            "/x/.hidden/..x",
            "/a/b/c/d",
        ] {
            assert!(is_plain(path), "{path}");
            let slow = normalize_path(path).unwrap_or_default();
            for method in [Method::GET, Method::POST] {
                let fast = c.classify(&method, path);
                let via = c.kind_of(method.as_str(), slow.iter().map(String::as_str));
                assert_eq!(fast, via, "{method} {path}");
            }
        }
        for path in [
            "/a/../b",
            "/a/./b",
            "/a%2e",
            "/a;b",
            "/a\\b",
            "/caf\u{e9}",
            "x",
            "/a b",
        ] {
            assert!(!is_plain(path), "{path}");
        }
    }

    #[test]
    fn methods_fail_closed() {
        let c = Classifier::default();
        for read in DEFAULT_READ_METHODS {
            assert_eq!(c.classify(&m(read), "/x"), Kind::Read, "{read}");
        }
        for update in [
            "POST",
            "PUT",
            "PATCH",
            "DELETE",
            "MKCOL",
            "COPY",
            "MOVE",
            "PROPPATCH",
            "MKCALENDAR",
            "LOCK",
            "UNLOCK",
            "ACL",
            "BIND",
            "CONNECT",
            "TRACE",
            "FROBNICATE",
            "post",
            "get",
            "Get",
            "head",
            "propfind",
        ] {
            assert_eq!(c.classify(&m(update), "/x"), Kind::Update, "{update}");
        }
    }

    #[test]
    fn unsafe_paths_are_updates_whatever_the_method() {
        let c = Classifier::new(&[rule(None, "/**", Kind::Read)]);
        assert_eq!(c.classify(&Method::POST, "/anything"), Kind::Read);
        for path in ["/../x", "/a%2Fb", "/a%00", "/a%zz", "/a\\b", "*"] {
            assert_eq!(c.classify(&Method::GET, path), Kind::Update, "{path}");
        }
    }

    #[test]
    fn read_methods_replace_the_list() {
        let c = Classifier::default().with_read_methods(&["GET"]);
        assert_eq!(c.classify(&Method::GET, "/x"), Kind::Read);
        assert_eq!(c.classify(&Method::HEAD, "/x"), Kind::Update);
        assert_eq!(c.classify(&m("PROPFIND"), "/x"), Kind::Update);
        let none: [&str; 0] = [];
        let c = Classifier::default().with_read_methods(&none);
        assert_eq!(c.classify(&Method::GET, "/x"), Kind::Update);
        assert!(validate_read_methods(&["GET", "PROPFIND"]).is_ok());
        assert!(validate_read_methods(&[""]).is_err());
        assert!(validate_read_methods(&["GE T"]).is_err());
    }

    #[test]
    fn rules_match_the_normalized_path_first_match_wins() {
        let c = Classifier::new(&[
            rule(Some("POST"), "/search/**", Kind::Read),
            rule(Some("GET"), "/accounts/*/touch", Kind::Update),
            rule(None, "/admin/**", Kind::Update),
            rule(Some("*"), "/admin/**", Kind::Read),
        ]);
        assert_eq!(c.classify(&Method::POST, "/search"), Kind::Read);
        assert_eq!(c.classify(&Method::POST, "/search/x"), Kind::Read);
        assert_eq!(c.classify(&Method::POST, "//search//x/"), Kind::Read);
        assert_eq!(
            c.classify(&Method::POST, "/search/../transfers"),
            Kind::Update
        );
        assert_eq!(
            c.classify(&Method::POST, "/search/%2e%2e/transfers"),
            Kind::Update
        );
        assert_eq!(
            c.classify(&Method::POST, "/search/..;/transfers"),
            Kind::Update
        );
        assert_eq!(
            c.classify(&Method::POST, "/search/x%2F..%2F..%2Ftransfers"),
            Kind::Update
        );
        assert_eq!(c.classify(&m("post"), "/search/x"), Kind::Update);
        assert_eq!(c.classify(&Method::GET, "/accounts/7/touch"), Kind::Update);
        assert_eq!(
            c.classify(&Method::GET, "/accounts/7/./touch"),
            Kind::Update
        );
        assert_eq!(
            c.classify(&Method::GET, "/accounts/7/x/../touch"),
            Kind::Update
        );
        assert_eq!(
            c.classify(&Method::GET, "/accounts/7/t%6Fuch"),
            Kind::Update
        );
        assert_eq!(
            c.classify(&Method::GET, "/accounts/7/touch;x"),
            Kind::Update
        );
        assert_eq!(c.classify(&Method::GET, "/accounts/7;x"), Kind::Read);
        assert_eq!(c.classify(&Method::GET, "/accounts/7"), Kind::Read);
        assert_eq!(c.classify(&Method::GET, "/admin/a/b"), Kind::Update);
        assert_eq!(c.classify(&Method::GET, "/admin"), Kind::Update);
        assert_eq!(c.classify(&Method::DELETE, "/x"), Kind::Update);
        assert_eq!(c.classify(&Method::OPTIONS, "/x"), Kind::Read);
    }
}
