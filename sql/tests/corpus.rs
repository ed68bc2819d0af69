//! The classification corpus (`tests/data/corpus.jsonl`): statements of the SQLite,
//! PostgreSQL and MySQL dialects with the class and the findings SQL mode must report.

use regroup_sql::classify::{Dialect, analyze};
use regroup_sql::rewrite::Fixed;
use serde::Deserialize;

#[derive(Deserialize)]
struct Case {
    dialect: String,
    sql: String,
    class: String,
    deterministic: bool,
    /// A text one of the reasons must contain.
    finding: Option<String>,
    /// Whether the statement must be rewritten (true) or refused (false).
    fixed: Option<bool>,
}

#[test]
fn corpus_classes_and_findings() {
    let text = include_str!("data/corpus.jsonl");
    let mut failures = Vec::new();
    let mut per_dialect = std::collections::BTreeMap::<String, usize>::new();
    for (n, line) in text.lines().enumerate() {
        let case: Case = match serde_json::from_str(line) {
            Ok(c) => c,
            Err(e) => panic!("corpus line {}: {e}", n + 1),
        };
        *per_dialect.entry(case.dialect.clone()).or_default() += 1;
        let Some(dialect) = Dialect::parse(&case.dialect) else {
            panic!("corpus line {}: unknown dialect {}", n + 1, case.dialect);
        };
        let a = analyze(dialect, &case.sql, &mut Fixed::for_test());
        let mut wrong = Vec::new();
        if a.class.as_str() != case.class {
            wrong.push(format!(
                "class {} (expected {})",
                a.class.as_str(),
                case.class
            ));
        }
        if a.deterministic != case.deterministic {
            wrong.push(format!("deterministic {}", a.deterministic));
        }
        if let Some(f) = &case.finding
            && !a.reasons.iter().any(|r| r.contains(f.as_str()))
        {
            wrong.push(format!("no reason mentions {f:?}"));
        }
        if case.deterministic && (a.rewritten.is_some() || a.refusal.is_some()) {
            wrong.push("a deterministic statement was rewritten or refused".to_owned());
        }
        match case.fixed {
            Some(true) => match &a.rewritten {
                // A rewritten statement is deterministic: nothing left to fix.
                Some(r) => {
                    let again = analyze(dialect, r, &mut Fixed::for_test());
                    if !again.deterministic {
                        wrong.push(format!("rewritten {r:?} still has {:?}", again.reasons));
                    }
                    if again.class != a.class {
                        wrong.push(format!("rewritten {r:?} changed class"));
                    }
                }
                None => wrong.push("not rewritten".to_owned()),
            },
            Some(false) => {
                if a.rewritten.is_some() {
                    wrong.push(format!("rewritten to {:?}", a.rewritten));
                }
                match &a.refusal {
                    Some(r) if r.contains(case.sql.split_whitespace().next().unwrap_or("")) => {}
                    other => wrong.push(format!("refusal does not name the statement: {other:?}")),
                }
            }
            None => {}
        }
        if !wrong.is_empty() {
            failures.push(format!(
                "line {} [{}] {}: {} — reasons {:?}, rewritten {:?}",
                n + 1,
                case.dialect,
                case.sql,
                wrong.join("; "),
                a.reasons,
                a.rewritten
            ));
        }
    }
    let total: usize = per_dialect.values().sum();
    assert!(total >= 150, "the corpus has {total} statements");
    for d in ["sqlite", "postgres", "mysql"] {
        assert!(
            per_dialect.get(d).copied().unwrap_or(0) >= 40,
            "{d}: {per_dialect:?}"
        );
    }
    assert!(
        failures.is_empty(),
        "{} of {total} cases wrong:\n{}",
        failures.len(),
        failures.join("\n")
    );
}
