//! Request classification: is this request an update (journaled, sent to the primary,
//! replayed everywhere) or a read (balanced over caught-up partitions)?

use http::Method;
use serde::Deserialize;

use crate::config::RouteRule;

/// What a request is to the group.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Kind {
    /// Changes state: serialized, journaled, forwarded to the primary, replayed.
    Update,
    /// Does not change state: balanced over partitions that are caught up.
    Read,
}

/// Classifies requests by the group's route rules, then by method.
///
/// ```
/// use regroup_proxy::classify::{Classifier, Kind};
/// use http::Method;
/// let c = Classifier::new(&[]);
/// assert_eq!(c.classify(&Method::POST, "/accounts"), Kind::Update);
/// assert_eq!(c.classify(&Method::GET, "/accounts"), Kind::Read);
/// ```
#[derive(Debug, Clone)]
pub struct Classifier {
    rules: Vec<Rule>,
}

#[derive(Debug, Clone)]
struct Rule {
    method: Option<Method>,
    segments: Vec<String>,
    kind: Kind,
}

impl Classifier {
    /// A classifier with `rules` tried in order before the method default. Rules are
    /// assumed validated (see [`crate::config::Config::validate`]); an unparsable method
    /// matches any method.
    pub fn new(rules: &[RouteRule]) -> Self {
        Classifier {
            rules: rules
                .iter()
                .map(|r| Rule {
                    method: r
                        .method
                        .as_deref()
                        .filter(|m| *m != "*")
                        .and_then(|m| Method::from_bytes(m.as_bytes()).ok()),
                    segments: split(&r.path).map(str::to_owned).collect(),
                    kind: r.kind,
                })
                .collect(),
        }
    }

    /// The kind of a request with this method and path (no query).
    pub fn classify(&self, method: &Method, path: &str) -> Kind {
        for rule in &self.rules {
            if rule.method.as_ref().is_none_or(|m| m == method) && matches(&rule.segments, path) {
                return rule.kind;
            }
        }
        default_kind(method)
    }
}

/// POST, PUT, PATCH and DELETE update; every other method reads.
pub fn default_kind(method: &Method) -> Kind {
    match *method {
        Method::POST | Method::PUT | Method::PATCH | Method::DELETE => Kind::Update,
        _ => Kind::Read,
    }
}

fn split(path: &str) -> impl Iterator<Item = &str> {
    path.split('/').filter(|s| !s.is_empty())
}

fn matches(pattern: &[String], path: &str) -> bool {
    let mut parts = split(path);
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

    #[test]
    fn rules_override_methods_first_match_wins() {
        let c = Classifier::new(&[
            rule(Some("POST"), "/search", Kind::Read),
            rule(Some("GET"), "/accounts/*/touch", Kind::Update),
            rule(None, "/admin/**", Kind::Update),
            rule(Some("*"), "/admin/**", Kind::Read),
        ]);
        assert_eq!(c.classify(&Method::POST, "/search"), Kind::Read);
        assert_eq!(c.classify(&Method::POST, "/search/x"), Kind::Update);
        assert_eq!(c.classify(&Method::GET, "/accounts/7/touch"), Kind::Update);
        assert_eq!(c.classify(&Method::GET, "/accounts/7"), Kind::Read);
        assert_eq!(c.classify(&Method::GET, "/admin/a/b"), Kind::Update);
        assert_eq!(c.classify(&Method::GET, "/admin"), Kind::Update);
        assert_eq!(c.classify(&Method::DELETE, "/x"), Kind::Update);
        assert_eq!(c.classify(&Method::OPTIONS, "/x"), Kind::Read);
    }
}
