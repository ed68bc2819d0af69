//! Conflict keys: which updates of a group are independent, so that a replica may replay
//! them in parallel.
//!
//! A group's rules give each recorded update a set of keys (the accounts it touches, say).
//! A replica replays records that share no key in parallel and keeps the order of those
//! that do; a record without keys is a *barrier*: it is replayed after every record before
//! it and before every record after it, as if replay were sequential. No rule matching,
//! a source yielding nothing, or a payload that is not HTTP all make a barrier, so a
//! missing or wrong rule costs parallelism, never order (unless it gives two records that
//! touch the same state no common key: that is the rule's author's to avoid).
//!
//! # Rules
//!
//! Rules are tried in order; the first whose method and path match, and all of whose
//! sources yield a value, gives the keys. `method` is spelled exactly (`*` or absent: any);
//! `path` is a pattern as in route rules ([`crate::classify::RouteRule`]: `*` one segment,
//! a trailing `**` any rest), matched against the normalized path
//! ([`crate::classify::normalize_path`]) of the recorded request without its query, which
//! is the path the partitions receive. Each entry of `keys` names a source:
//!
//! - `path:N`: segment `N` (from 0) of the normalized path, percent-decoded; the pattern's
//!   segment `N` must be a literal or `*`.
//! - `header:NAME`: the value of that request header (name case-insensitive). A header
//!   sent more than once yields nothing.
//! - `body:/json/pointer`: the value an RFC 6901 pointer selects in a JSON body. A body
//!   that is not JSON, or whose objects repeat a member name (parsers disagree on which
//!   one counts), yields nothing.
//!
//! A request whose normalized path has a `;` in a segment (a path parameter, which some
//! servers strip before routing and others keep) gets no keys either: which rule it
//! matches and which entity a segment names depend on the server.
//!
//! # Key values
//!
//! Keys of every source share one namespace per group and are compared as text: a JSON
//! string gives its content, a number or boolean its JSON text (`1`, `true`), any other
//! JSON value its compact JSON text; a path segment its decoded text; a header its value.
//! So `path:1` of `/accounts/7/deposit` and `body:/from` of `{"from":7}` both give `"7"`
//! and those two records conflict: write the same entity the same way everywhere (`7` and
//! `7.0`, or `7` and `"07"`, are different keys).
//!
//! ```toml
//! [[groups.conflict_keys]]
//! method = "POST"
//! path = "/transfers"
//! keys = ["body:/from", "body:/to"]
//!
//! [[groups.conflict_keys]]
//! method = "POST"
//! path = "/accounts/*/deposit"
//! keys = ["path:1"]
//! ```

use std::fmt;

use http::{HeaderName, Method};
use serde::de::{self, Deserializer, MapAccess, SeqAccess, Visitor};
use serde_json::Value;

use crate::classify::{matches, normalize_path, pattern_segments};
use crate::record::{Payload, RecordedRequest};

/// A conflict-key rule, as configured.
#[derive(Debug, Clone, PartialEq, Eq, serde::Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ConflictRule {
    /// The method it applies to, spelled exactly (`*` or absent: any).
    #[serde(default)]
    pub method: Option<String>,
    /// Path pattern, as route rules ([`crate::classify::RouteRule`]): `*` one segment,
    /// trailing `**` any rest; matched against the normalized path.
    pub path: String,
    /// Where the keys come from: `path:N` (segment N of the normalized path, from 0),
    /// `header:NAME` (that request header's value), `body:/json/pointer` (RFC 6901 pointer
    /// into a JSON body).
    pub keys: Vec<String>,
}

/// Compiled rules; see the module docs.
///
/// ```
/// use regroup_replay::conflict::{ConflictKeys, ConflictRule, conflict};
/// use regroup_replay::{Payload, RecordedRequest};
/// let keys = ConflictKeys::new(&[
///     ConflictRule {
///         method: Some("POST".into()),
///         path: "/transfers".into(),
///         keys: vec!["body:/from".into(), "body:/to".into()],
///     },
///     ConflictRule {
///         method: Some("POST".into()),
///         path: "/accounts/*/deposit".into(),
///         keys: vec!["path:1".into()],
///     },
/// ])
/// .unwrap();
/// let post = |uri: &str, body: &str| {
///     Payload::Http(RecordedRequest {
///         method: "POST".into(),
///         uri: uri.into(),
///         headers: vec![],
///         body: body.to_owned().into(),
///     })
/// };
/// let transfer = keys.keys(&post("/transfers", r#"{"from":7,"to":9}"#));
/// assert_eq!(transfer.as_deref(), Some(&["7".to_owned(), "9".to_owned()][..]));
/// let deposit = keys.keys(&post("/accounts/7/deposit", "{}"));
/// let other = keys.keys(&post("/accounts/8/deposit", "{}"));
/// assert!(conflict(transfer.as_deref(), deposit.as_deref()));
/// assert!(!conflict(transfer.as_deref(), other.as_deref()));
/// // No rule: a barrier, in conflict with everything.
/// assert_eq!(keys.keys(&post("/accounts", "{}")), None);
/// ```
#[derive(Debug, Clone, Default)]
pub struct ConflictKeys {
    rules: Vec<Rule>,
}

#[derive(Debug, Clone)]
struct Rule {
    /// `None`: any method.
    method: Option<String>,
    segments: Vec<String>,
    sources: Vec<Source>,
}

#[derive(Debug, Clone)]
enum Source {
    /// A segment of the normalized path.
    Path(usize),
    /// A request header, by its lowercase name.
    Header(HeaderName),
    /// An RFC 6901 pointer into a JSON body.
    Body(String),
}

impl ConflictKeys {
    /// Compiles `rules`; an error names the rule (by index and path) and what is wrong:
    /// bad method token, a path that cannot be normalized, no keys, an unknown source
    /// prefix, `path:N` not naming a literal-or-`*` segment of the pattern (N past the
    /// pattern or at `**`), an invalid header name, a body pointer not starting with `/`
    /// (or with a `~` not followed by `0` or `1`).
    pub fn new(rules: &[ConflictRule]) -> Result<Self, String> {
        let rules = rules
            .iter()
            .enumerate()
            .map(|(i, r)| compile(r).map_err(|e| format!("rule {i} (path {:?}): {e}", r.path)))
            .collect::<Result<_, _>>()?;
        Ok(ConflictKeys { rules })
    }

    /// Whether there are no rules.
    pub fn is_empty(&self) -> bool {
        self.rules.is_empty()
    }

    /// The keys of a recorded request: `Some(keys)` from the first rule whose method and
    /// path match and all of whose sources yield a value (never empty, in source order,
    /// without repeats); `None`, which conflicts with every other record (a barrier), when
    /// no rule matches, a source yields nothing (missing header, body not JSON, pointer
    /// absent), the path cannot be normalized or has a `;` path parameter, or the payload
    /// is not HTTP.
    pub fn keys(&self, payload: &Payload) -> Option<Vec<String>> {
        let Payload::Http(req) = payload else {
            return None;
        };
        if self.rules.is_empty() {
            return None;
        }
        let path = req.uri.split_once('?').map_or(req.uri.as_str(), |(p, _)| p);
        let segments = normalize_path(path).ok()?;
        if segments.iter().any(|s| s.contains(';')) {
            return None;
        }
        // Parsed once, on the first rule that needs it.
        let mut body: Option<Option<Value>> = None;
        for rule in &self.rules {
            if rule
                .method
                .as_deref()
                .is_some_and(|m| m != req.method.as_str())
                || !matches(&rule.segments, segments.iter().map(String::as_str))
            {
                continue;
            }
            let mut keys: Vec<String> = Vec::with_capacity(rule.sources.len());
            let mut complete = true;
            for source in &rule.sources {
                let Some(key) = value_of(source, req, &segments, &mut body) else {
                    complete = false;
                    break;
                };
                if !keys.contains(&key) {
                    keys.push(key);
                }
            }
            if complete {
                return Some(keys);
            }
        }
        None
    }
}

/// Whether two records with these keys must keep their order: a barrier (`None`)
/// conflicts with everything; otherwise they conflict when they share a key.
///
/// ```
/// use regroup_replay::conflict::conflict;
/// let a = ["7".to_owned(), "9".to_owned()];
/// let b = ["9".to_owned()];
/// let c = ["8".to_owned()];
/// assert!(conflict(Some(&a), Some(&b)));
/// assert!(!conflict(Some(&a), Some(&c)));
/// assert!(conflict(None, Some(&c)));
/// ```
pub fn conflict(a: Option<&[String]>, b: Option<&[String]>) -> bool {
    match (a, b) {
        (Some(a), Some(b)) => a.iter().any(|k| b.contains(k)),
        _ => true,
    }
}

fn compile(r: &ConflictRule) -> Result<Rule, String> {
    let method = r.method.clone().filter(|m| m != "*");
    if let Some(m) = &method
        && Method::from_bytes(m.as_bytes()).is_err()
    {
        return Err(format!("method {m:?} is not an HTTP method"));
    }
    let segments = pattern_segments(&r.path).ok_or_else(|| {
        normalize_path(&r.path).err().map_or_else(
            || "the path cannot be normalized".to_owned(),
            |e| e.to_string(),
        )
    })?;
    if r.keys.is_empty() {
        return Err("no keys".into());
    }
    let sources = r
        .keys
        .iter()
        .map(|k| source(k, &segments).map_err(|e| format!("key {k:?}: {e}")))
        .collect::<Result<_, _>>()?;
    Ok(Rule {
        method,
        segments,
        sources,
    })
}

fn source(key: &str, pattern: &[String]) -> Result<Source, String> {
    if let Some(n) = key.strip_prefix("path:") {
        let n: usize = n
            .parse()
            .map_err(|_| format!("{n:?} is not a segment number"))?;
        return match pattern.get(n).map(String::as_str) {
            None => Err(format!(
                "the pattern has no segment {n} (it has {})",
                pattern.len()
            )),
            Some("**") => Err(format!("segment {n} of the pattern is \"**\"")),
            Some(_) => Ok(Source::Path(n)),
        };
    }
    if let Some(name) = key.strip_prefix("header:") {
        return HeaderName::from_bytes(name.as_bytes())
            .map(Source::Header)
            .map_err(|_| format!("{name:?} is not a header name"));
    }
    if let Some(pointer) = key.strip_prefix("body:") {
        if !pointer.starts_with('/') {
            return Err("a JSON pointer must start with '/'".into());
        }
        let mut escapes = pointer.split('~').skip(1);
        if escapes.any(|rest| !rest.starts_with(['0', '1'])) {
            return Err("a '~' in a JSON pointer must be followed by '0' or '1'".into());
        }
        return Ok(Source::Body(pointer.to_owned()));
    }
    Err("unknown source, expected path:N, header:NAME or body:/json/pointer".into())
}

/// The value `source` yields for `req`, if any. `body` caches the parsed body (`Some(None)`:
/// not JSON).
fn value_of(
    source: &Source,
    req: &RecordedRequest,
    segments: &[String],
    body: &mut Option<Option<Value>>,
) -> Option<String> {
    match source {
        Source::Path(n) => segments.get(*n).cloned(),
        Source::Header(name) => {
            let mut values = req
                .headers
                .iter()
                .filter(|(n, _)| n.eq_ignore_ascii_case(name.as_str()))
                .map(|(_, v)| v);
            let value = values.next()?;
            // Sent more than once: servers disagree on which one (or their join) counts.
            values.next().is_none().then(|| value.clone())
        }
        Source::Body(pointer) => {
            let value = body
                .get_or_insert_with(|| parse_strict(&req.body))
                .as_ref()?
                .pointer(pointer)?;
            Some(match value {
                Value::String(s) => s.clone(),
                other => other.to_string(),
            })
        }
    }
}

/// The body as JSON, refusing objects that repeat a member name.
fn parse_strict(body: &[u8]) -> Option<Value> {
    let mut de = serde_json::Deserializer::from_slice(body);
    let value = de.deserialize_any(StrictVisitor).ok()?;
    de.end().ok()?;
    Some(value)
}

/// Builds a [`Value`] like serde_json's own, but fails on a repeated member name.
struct StrictVisitor;

struct Strict(Value);

impl<'de> serde::Deserialize<'de> for Strict {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        d.deserialize_any(StrictVisitor).map(Strict)
    }
}

impl<'de> Visitor<'de> for StrictVisitor {
    type Value = Value;

    fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("a JSON value")
    }

    fn visit_bool<E>(self, v: bool) -> Result<Value, E> {
        Ok(Value::Bool(v))
    }

    fn visit_i64<E>(self, v: i64) -> Result<Value, E> {
        Ok(Value::from(v))
    }

    fn visit_u64<E>(self, v: u64) -> Result<Value, E> {
        Ok(Value::from(v))
    }

    fn visit_f64<E: de::Error>(self, v: f64) -> Result<Value, E> {
        serde_json::Number::from_f64(v)
            .map(Value::Number)
            .ok_or_else(|| E::custom("not a finite number"))
    }

    fn visit_str<E>(self, v: &str) -> Result<Value, E> {
        Ok(Value::String(v.to_owned()))
    }

    fn visit_string<E>(self, v: String) -> Result<Value, E> {
        Ok(Value::String(v))
    }

    fn visit_unit<E>(self) -> Result<Value, E> {
        Ok(Value::Null)
    }

    fn visit_seq<A: SeqAccess<'de>>(self, mut seq: A) -> Result<Value, A::Error> {
        let mut out = Vec::new();
        while let Some(Strict(v)) = seq.next_element()? {
            out.push(v);
        }
        Ok(Value::Array(out))
    }

    fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<Value, A::Error> {
        let mut out = serde_json::Map::new();
        while let Some(k) = map.next_key::<String>()? {
            if out.contains_key(&k) {
                return Err(de::Error::custom(format!("duplicate member {k:?}")));
            }
            let Strict(v) = map.next_value()?;
            out.insert(k, v);
        }
        Ok(Value::Object(out))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn rule(method: Option<&str>, path: &str, keys: &[&str]) -> ConflictRule {
        ConflictRule {
            method: method.map(str::to_owned),
            path: path.to_owned(),
            keys: keys.iter().map(|k| (*k).to_owned()).collect(),
        }
    }

    fn compiled(rules: &[ConflictRule]) -> ConflictKeys {
        match ConflictKeys::new(rules) {
            Ok(k) => k,
            Err(e) => panic!("{e}"),
        }
    }

    fn req(method: &str, uri: &str, headers: &[(&str, &str)], body: &str) -> Payload {
        Payload::Http(RecordedRequest {
            method: method.to_owned(),
            uri: uri.to_owned(),
            headers: headers
                .iter()
                .map(|(n, v)| ((*n).to_owned(), (*v).to_owned()))
                .collect(),
            body: body.to_owned().into(),
        })
    }

    fn post(uri: &str, body: &str) -> Payload {
        req("POST", uri, &[], body)
    }

    fn some(keys: &[&str]) -> Option<Vec<String>> {
        Some(keys.iter().map(|k| (*k).to_owned()).collect())
    }

    #[test]
    fn rules_match_by_method_and_path_first_match_wins() {
        let k = compiled(&[
            rule(Some("POST"), "/accounts/*/deposit", &["path:1"]),
            rule(None, "/accounts/*/**", &["path:0"]),
            rule(Some("*"), "/x", &["path:0"]),
        ]);
        assert!(!k.is_empty());
        assert_eq!(k.keys(&post("/accounts/7/deposit", "")), some(&["7"]));
        assert_eq!(
            k.keys(&req("PUT", "/accounts/7/deposit", &[], "")),
            some(&["accounts"])
        );
        assert_eq!(
            k.keys(&req("post", "/accounts/7/deposit", &[], "")),
            some(&["accounts"])
        );
        assert_eq!(k.keys(&post("/accounts/7/a/b", "")), some(&["accounts"]));
        assert_eq!(k.keys(&req("DELETE", "/x", &[], "")), some(&["x"]));
        assert_eq!(k.keys(&post("/y", "")), None);
        assert_eq!(k.keys(&post("/x/y", "")), None);
        assert_eq!(k.keys(&post("/accounts", "")), None);
    }

    #[test]
    fn a_rule_whose_source_yields_nothing_falls_through() {
        let k = compiled(&[
            rule(None, "/t", &["header:x-account"]),
            rule(None, "/t", &["body:/account"]),
        ]);
        assert_eq!(
            k.keys(&req("POST", "/t", &[("X-Account", "a")], "")),
            some(&["a"])
        );
        assert_eq!(k.keys(&post("/t", r#"{"account":"b"}"#)), some(&["b"]));
        assert_eq!(k.keys(&post("/t", "{}")), None);
    }

    #[test]
    fn path_sources_give_decoded_segments() {
        let k = compiled(&[rule(None, "/accounts/*/deposit", &["path:1", "path:2"])]);
        assert_eq!(
            k.keys(&post("/accounts/caf%C3%A9/deposit", "")),
            some(&["café", "deposit"])
        );
        assert_eq!(
            k.keys(&post("/accounts/%37/deposit", "")),
            some(&["7", "deposit"])
        );
        assert_eq!(
            k.keys(&post("//accounts/./x/../7/deposit/", "")),
            some(&["7", "deposit"])
        );
        assert_eq!(
            k.keys(&post("/accounts/7/d%65posit", "")),
            some(&["7", "deposit"])
        );
        assert_eq!(
            k.keys(&post("/accounts/a%20b/deposit", "")),
            some(&["a b", "deposit"])
        );
    }

    #[test]
    fn the_query_is_stripped() {
        let k = compiled(&[rule(None, "/accounts/*", &["path:1"])]);
        assert_eq!(k.keys(&post("/accounts/7?dry=1", "")), some(&["7"]));
        assert_eq!(k.keys(&post("/accounts/7?x=/a/b", "")), some(&["7"]));
        assert_eq!(k.keys(&post("/accounts/7/?", "")), some(&["7"]));
    }

    #[test]
    fn paths_that_cannot_be_normalized_or_carry_parameters_are_barriers() {
        let k = compiled(&[rule(None, "/accounts/**", &["path:0"])]);
        for uri in [
            "/accounts/a%2Fb",
            "/accounts/../../x",
            "/accounts/%zz",
            "/accounts/7;v=1",
            "/accounts;x/7",
            "*",
            "http://h/accounts/7",
        ] {
            assert_eq!(k.keys(&post(uri, "")), None, "{uri}");
        }
    }

    #[test]
    fn header_sources_match_names_case_insensitively() {
        let k = compiled(&[rule(None, "/t", &["header:X-Account"])]);
        assert_eq!(
            k.keys(&req("POST", "/t", &[("x-account", "7")], "")),
            some(&["7"])
        );
        assert_eq!(
            k.keys(&req("POST", "/t", &[("X-ACCOUNT", " a b ")], "")),
            some(&[" a b "])
        );
        assert_eq!(k.keys(&req("POST", "/t", &[("x-other", "7")], "")), None);
        assert_eq!(
            k.keys(&req(
                "POST",
                "/t",
                &[("x-account", "7"), ("X-Account", "8")],
                ""
            )),
            None
        );
    }

    #[test]
    fn body_sources_give_json_text() {
        let k = compiled(&[rule(None, "/t", &["body:/v"])]);
        let cases: &[(&str, &str)] = &[
            (r#"{"v":"7"}"#, "7"),
            (r#"{"v":7}"#, "7"),
            (r#"{"v":-1.5}"#, "-1.5"),
            (r#"{"v":true}"#, "true"),
            (r#"{"v":null}"#, "null"),
            (r#"{"v":[1, "a"]}"#, r#"[1,"a"]"#),
            (r#"{"v":{"b": 1,"a":2}}"#, r#"{"a":2,"b":1}"#),
            (r#"{"v":"a\"b"}"#, "a\"b"),
        ];
        for (body, want) in cases {
            assert_eq!(k.keys(&post("/t", body)), some(&[want]), "{body}");
        }
        let k = compiled(&[rule(None, "/t", &["body:/a/0/b~1c", "body:/m~0n"])]);
        assert_eq!(
            k.keys(&post("/t", r#"{"a":[{"b/c":"x"}],"m~n":"y"}"#)),
            some(&["x", "y"])
        );
    }

    #[test]
    fn sources_share_one_namespace_and_repeats_are_dropped() {
        let k = compiled(&[
            rule(Some("POST"), "/accounts/*/deposit", &["path:1"]),
            rule(Some("POST"), "/transfers", &["body:/from", "body:/to"]),
            rule(Some("POST"), "/touch", &["header:x-account"]),
        ]);
        let deposit = k.keys(&post("/accounts/7/deposit", ""));
        let transfer = k.keys(&post("/transfers", r#"{"from":7,"to":"9"}"#));
        let touch = k.keys(&req("POST", "/touch", &[("x-account", "9")], ""));
        assert_eq!(deposit, some(&["7"]));
        assert_eq!(transfer, some(&["7", "9"]));
        assert!(conflict(deposit.as_deref(), transfer.as_deref()));
        assert!(conflict(touch.as_deref(), transfer.as_deref()));
        assert!(!conflict(touch.as_deref(), deposit.as_deref()));
        assert_eq!(
            k.keys(&post("/transfers", r#"{"from":7,"to":7}"#)),
            some(&["7"])
        );
    }

    #[test]
    fn missing_values_make_barriers() {
        let k = compiled(&[rule(None, "/t", &["body:/from", "header:x-a"])]);
        let h = [("x-a", "1")];
        assert_eq!(
            k.keys(&req("POST", "/t", &h, r#"{"from":2}"#)),
            some(&["2", "1"])
        );
        for body in [
            "",
            "not json",
            r#"{"from":2"#,
            r#"{"from":2} x"#,
            r#"{"to":2}"#,
            r#"[2]"#,
            r#"{"from":2,"from":3}"#,
            r#"{"from":2,"x":{"a":1,"a":1}}"#,
        ] {
            assert_eq!(k.keys(&req("POST", "/t", &h, body)), None, "{body}");
        }
        assert_eq!(k.keys(&req("POST", "/t", &[], r#"{"from":2}"#)), None);
    }

    #[test]
    fn non_http_payloads_and_no_rules_are_barriers() {
        let k = compiled(&[rule(None, "/*/**", &["path:0"])]);
        let sql = Payload::Sql(crate::record::SqlTransaction {
            dialect: "sqlite".into(),
            statements: vec![],
            hash: String::new(),
        });
        assert_eq!(k.keys(&sql), None);
        let none = ConflictKeys::default();
        assert!(none.is_empty());
        assert_eq!(none.keys(&post("/a", "")), None);
        assert!(compiled(&[]).is_empty());
    }

    #[test]
    fn conflict_is_symmetric_and_barriers_conflict_with_everything() {
        let k = |keys: &[&str]| keys.iter().map(|k| (*k).to_owned()).collect::<Vec<_>>();
        let (a, b, c) = (k(&["1", "2"]), k(&["2", "3"]), k(&["4"]));
        assert!(conflict(Some(&a), Some(&b)));
        assert!(conflict(Some(&b), Some(&a)));
        assert!(!conflict(Some(&a), Some(&c)));
        assert!(!conflict(Some(&c), Some(&a)));
        assert!(conflict(Some(&a), Some(&a)));
        assert!(conflict(None, Some(&c)));
        assert!(conflict(Some(&c), None));
        assert!(conflict(None, None));
    }

    #[test]
    fn every_validation_error_names_the_rule() {
        let err = |r: ConflictRule| match ConflictKeys::new(&[rule(None, "/ok", &["path:0"]), r]) {
            Ok(_) => panic!("accepted"),
            Err(e) => e,
        };
        let cases: &[(ConflictRule, &str)] = &[
            (
                rule(Some("GE T"), "/a", &["path:0"]),
                r#"rule 1 (path "/a"): method "GE T" is not an HTTP method"#,
            ),
            (
                rule(Some(""), "/a", &["path:0"]),
                r#"rule 1 (path "/a"): method "" is not an HTTP method"#,
            ),
            (
                rule(None, "a", &["path:0"]),
                r#"rule 1 (path "a"): path "a" does not start with '/'"#,
            ),
            (
                rule(None, "/../a", &["path:0"]),
                r#"rule 1 (path "/../a"): path "/../a" climbs above the root"#,
            ),
            (
                rule(None, "/a%2Fb", &["path:0"]),
                r#"rule 1 (path "/a%2Fb"): path "/a%2Fb" has an ambiguous character (encoded slash or backslash, control character or non-UTF-8)"#,
            ),
            (rule(None, "/a", &[]), r#"rule 1 (path "/a"): no keys"#),
            (
                rule(None, "/a", &["query:x"]),
                r#"rule 1 (path "/a"): key "query:x": unknown source, expected path:N, header:NAME or body:/json/pointer"#,
            ),
            (
                rule(None, "/a", &["path0"]),
                r#"rule 1 (path "/a"): key "path0": unknown source, expected path:N, header:NAME or body:/json/pointer"#,
            ),
            (
                rule(None, "/a", &["path:x"]),
                r#"rule 1 (path "/a"): key "path:x": "x" is not a segment number"#,
            ),
            (
                rule(None, "/a/*", &["path:2"]),
                r#"rule 1 (path "/a/*"): key "path:2": the pattern has no segment 2 (it has 2)"#,
            ),
            (
                rule(None, "/a/**", &["path:1"]),
                r#"rule 1 (path "/a/**"): key "path:1": segment 1 of the pattern is "**""#,
            ),
            (
                rule(None, "/a", &["path:0", "header:x y"]),
                r#"rule 1 (path "/a"): key "header:x y": "x y" is not a header name"#,
            ),
            (
                rule(None, "/a", &["header:"]),
                r#"rule 1 (path "/a"): key "header:": "" is not a header name"#,
            ),
            (
                rule(None, "/a", &["body:from"]),
                r#"rule 1 (path "/a"): key "body:from": a JSON pointer must start with '/'"#,
            ),
            (
                rule(None, "/a", &["body:"]),
                r#"rule 1 (path "/a"): key "body:": a JSON pointer must start with '/'"#,
            ),
            (
                rule(None, "/a", &["body:/a~2"]),
                r#"rule 1 (path "/a"): key "body:/a~2": a '~' in a JSON pointer must be followed by '0' or '1'"#,
            ),
        ];
        for (r, want) in cases {
            assert_eq!(err(r.clone()), *want);
        }
    }

    #[test]
    fn rules_deserialize_strictly() {
        let r: ConflictRule = match serde_json::from_str(r#"{"path":"/t","keys":["body:/from"]}"#) {
            Ok(r) => r,
            Err(e) => panic!("{e}"),
        };
        assert_eq!(r, rule(None, "/t", &["body:/from"]));
        assert!(
            serde_json::from_str::<ConflictRule>(r#"{"path":"/t","keys":[],"kind":"read"}"#)
                .is_err()
        );
    }
}
