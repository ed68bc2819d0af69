//! Nondeterminism: values that would differ from one copy to another (the clock, random
//! numbers, UUIDs, the connection's last insert id, `LIMIT` without `ORDER BY` in a write),
//! found before a statement runs, and fixed to literals chosen once at the primary where
//! that is exact.
//!
//! Exact means the rewritten statement does on every copy what the original did on the
//! primary: a clock function that is stable within a statement (`now()`,
//! `CURRENT_TIMESTAMP`, SQLite's `'now'`) becomes the fixed time anywhere in a statement; a
//! function evaluated per call (`random()`, `uuid()`, `clock_timestamp()`) only where it is
//! evaluated exactly once, in the rows of `INSERT … VALUES`. Everything else is a refusal
//! naming the function. In DDL nothing is fixed: a default, a generated column or a trigger
//! body is evaluated later, at replay time on each copy.
//!
//! Fixed times are UTC. On PostgreSQL the literal is a `timestamptz`, cast to the original
//! type so `LOCALTIMESTAMP` and friends still follow the session's time zone; on MySQL and
//! SQLite they are UTC wall-clock values (SQLite's own are UTC too).

use std::ops::ControlFlow;

use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;
use sqlparser::ast::{
    Expr, Function, FunctionArg, FunctionArgExpr, FunctionArguments, ObjectName, Query, SetExpr,
    Statement, Value, VisitMut, VisitorMut,
};
use sqlparser::parser::Parser;
use time::OffsetDateTime;
use time::macros::format_description;
use uuid::Uuid;

use crate::classify::{Class, Dialect, classify_statement};

/// The values fixed once at the primary for one transaction: its time and a random stream
/// seeded from its id.
#[derive(Debug, Clone)]
pub struct Fixed {
    timestamp: OffsetDateTime,
    rng: ChaCha8Rng,
}

impl Fixed {
    /// The values for a transaction stamped `timestamp` with id `txn_id`.
    pub fn new(timestamp: OffsetDateTime, txn_id: Uuid) -> Self {
        let mut seed = [0u8; 32];
        seed[..16].copy_from_slice(txn_id.as_bytes());
        Fixed {
            timestamp: timestamp.to_offset(time::UtcOffset::UTC),
            rng: ChaCha8Rng::from_seed(seed),
        }
    }

    /// Fixed values for examples and tests: 2026-12-01 12:00:00 UTC, seed zero.
    pub fn for_test() -> Self {
        Fixed::new(
            time::macros::datetime!(2026-12-01 12:00:00 UTC),
            Uuid::nil(),
        )
    }

    /// The fixed time.
    pub fn timestamp(&self) -> OffsetDateTime {
        self.timestamp
    }

    fn format(&self, f: &[time::format_description::BorrowedFormatItem<'_>]) -> String {
        self.timestamp.format(f).unwrap_or_default()
    }

    fn uuid(&mut self) -> Uuid {
        let bytes: [u8; 16] = self.rng.random();
        uuid::Builder::from_random_bytes(bytes).into_uuid()
    }
}

/// One value found to differ per copy.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Finding {
    /// The function or clause, e.g. `random()`, `'now'::timestamptz`, `LIMIT`.
    pub function: String,
    /// The literal it was fixed to, or `None` when it cannot be fixed exactly.
    pub fixed: Option<String>,
    /// Why it cannot be fixed (empty when fixed).
    pub why: String,
}

impl Finding {
    /// One line for the classifier's `reasons` and for refusals.
    pub fn describe(&self) -> String {
        match &self.fixed {
            Some(lit) => format!(
                "{} differs per copy: fixed at the primary to {lit}",
                self.function
            ),
            None => format!("{} {}", self.function, self.why),
        }
    }
}

/// Finds every value of `statement` that would differ per copy and fixes what can be
/// fixed exactly, in place.
pub fn fix(dialect: Dialect, statement: &mut Statement, fixed: &mut Fixed) -> Vec<Finding> {
    let (class, _) = classify_statement(statement);
    let mut v = Fixer {
        dialect,
        fixed,
        ddl: class == Class::Ddl,
        write: class.is_journaled(),
        once: false,
        findings: Vec::new(),
    };
    // The rows of `INSERT … VALUES`: each expression there is evaluated exactly once.
    if !v.ddl
        && let Statement::Insert(insert) = statement
        && let Some(source) = insert.source.as_mut()
        && source.with.is_none()
        && let SetExpr::Values(values) = source.body.as_mut()
    {
        v.once = true;
        for row in &mut values.rows {
            for expr in &mut row.content {
                let _ = expr.visit(&mut v);
            }
        }
        v.once = false;
    }
    if v.write {
        match statement {
            Statement::Update(u) if u.limit.is_some() && u.order_by.is_empty() => {
                v.limit_finding("UPDATE");
            }
            Statement::Delete(d) if d.limit.is_some() && d.order_by.is_empty() => {
                v.limit_finding("DELETE");
            }
            _ => {}
        }
    }
    let _ = statement.visit(&mut v);
    v.findings
}

struct Fixer<'a> {
    dialect: Dialect,
    fixed: &'a mut Fixed,
    /// A DDL statement: nothing is fixed, everything found is evaluated later.
    ddl: bool,
    /// A statement that is journaled (not a read): `LIMIT` without `ORDER BY` matters.
    write: bool,
    /// Inside an expression evaluated exactly once.
    once: bool,
    findings: Vec<Finding>,
}

/// How a nondeterministic function behaves.
#[derive(Clone, Copy, PartialEq, Eq)]
enum Kind {
    /// The same value everywhere within a statement (or transaction): the clock.
    Stable,
    /// A new value on every call: random numbers, UUIDs, the running clock.
    PerCall,
    /// Depends on what the connection did before (last insert id, changed rows).
    Connection,
    /// Differs per copy and cannot be fixed (a backend's pid, its transaction id).
    Never,
}

fn kind_of(name: &str, args: usize) -> Option<Kind> {
    Some(match name {
        "now"
        | "current_timestamp"
        | "current_date"
        | "current_time"
        | "localtime"
        | "localtimestamp"
        | "transaction_timestamp"
        | "statement_timestamp"
        | "curdate"
        | "curtime"
        | "utc_timestamp"
        | "utc_date"
        | "utc_time"
        | "current_timestamp_tz" => Kind::Stable,
        "unix_timestamp" if args == 0 => Kind::Stable,
        "random" | "randomblob" | "gen_random_uuid" | "uuid_generate_v4" | "uuid_generate_v1"
        | "uuid" | "uuid_short" | "sys_guid" | "clock_timestamp" | "timeofday" | "sysdate" => {
            Kind::PerCall
        }
        "rand" if args == 0 => Kind::PerCall,
        "last_insert_rowid" | "changes" | "total_changes" | "lastval" | "currval" | "row_count"
        | "found_rows" => Kind::Connection,
        "last_insert_id" if args == 0 => Kind::Connection,
        "pg_backend_pid"
        | "connection_id"
        | "txid_current"
        | "pg_current_xact_id"
        | "inet_client_addr"
        | "inet_client_port"
        | "pg_postmaster_start_time" => Kind::Never,
        _ => return None,
    })
}

/// SQLite's date and time functions, and the position of their time-value argument.
fn sqlite_time_arg(name: &str) -> Option<usize> {
    match name {
        "date" | "time" | "datetime" | "julianday" | "unixepoch" | "timediff" => Some(0),
        "strftime" => Some(1),
        _ => None,
    }
}

/// The unqualified, lower-cased name of a function.
pub(crate) fn function_name(name: &ObjectName) -> String {
    name.0
        .last()
        .map(|p| {
            p.to_string()
                .trim_matches('"')
                .trim_matches('`')
                .to_ascii_lowercase()
        })
        .unwrap_or_default()
}

/// How many arguments a call has.
pub(crate) fn argument_count(f: &Function) -> usize {
    match &f.args {
        FunctionArguments::None => 0,
        FunctionArguments::Subquery(_) => 1,
        FunctionArguments::List(l) => l.args.len(),
    }
}

fn string_literal(e: &Expr) -> Option<&str> {
    match e {
        Expr::Value(v) => match &v.value {
            Value::SingleQuotedString(s) => Some(s.as_str()),
            _ => None,
        },
        _ => None,
    }
}

fn quote(s: &str) -> String {
    format!("'{}'", s.replace('\'', "''"))
}

impl VisitorMut for Fixer<'_> {
    type Break = ();

    fn pre_visit_query(&mut self, query: &mut Query) -> ControlFlow<()> {
        if self.write && query.limit_clause.is_some() && query.order_by.is_none() {
            self.limit_finding("a query");
        }
        ControlFlow::Continue(())
    }

    fn post_visit_expr(&mut self, expr: &mut Expr) -> ControlFlow<()> {
        let replacement = match expr {
            Expr::Function(f) => self.function(f),
            Expr::Cast {
                expr: inner,
                data_type,
                ..
            } => match string_literal(inner).map(str::to_ascii_lowercase) {
                Some(word) if is_special_time_word(&word) => {
                    let shown = format!("'{word}'::{data_type}");
                    self.special_time(&word, shown, &data_type.to_string())
                }
                _ => None,
            },
            Expr::TypedString(t) => {
                match t
                    .value
                    .value
                    .clone()
                    .into_string()
                    .map(|s| s.to_ascii_lowercase())
                {
                    Some(word) if is_special_time_word(&word) => {
                        let ty = t.data_type.to_string();
                        let shown = format!("{ty} '{word}'");
                        self.special_time(&word, shown, &ty)
                    }
                    _ => None,
                }
            }
            _ => None,
        };
        if let Some(new) = replacement {
            *expr = new;
        }
        ControlFlow::Continue(())
    }
}

fn is_special_time_word(w: &str) -> bool {
    matches!(w.trim(), "now" | "today" | "tomorrow" | "yesterday")
}

impl Fixer<'_> {
    fn limit_finding(&mut self, what: &str) {
        self.findings.push(Finding {
            function: "LIMIT without ORDER BY".to_owned(),
            fixed: None,
            why: format!(
                "in {what} of a write picks rows in an order that may differ per copy: add an ORDER BY on a unique key"
            ),
        });
    }

    fn refuse(&mut self, function: String, why: &str) {
        self.findings.push(Finding {
            function,
            fixed: None,
            why: why.to_owned(),
        });
    }

    fn ddl_refusal(&mut self, function: String) {
        self.refuse(
            function,
            "in a DDL statement is evaluated later, on each copy at replay time (a default, a generated column or a trigger fires there): use a value the application passes",
        );
    }

    fn parse(&self, text: &str) -> Option<Expr> {
        let d = self.dialect.parser_dialect();
        Parser::new(d.as_ref())
            .try_with_sql(text)
            .ok()?
            .parse_expr()
            .ok()
    }

    /// A finding for `shown`, fixed to `text` when it parses; the expression to put in
    /// place of the original.
    fn fixed_to(&mut self, shown: String, text: String) -> Option<Expr> {
        match self.parse(&text) {
            Some(expr) => {
                self.findings.push(Finding {
                    function: shown,
                    fixed: Some(text),
                    why: String::new(),
                });
                Some(expr)
            }
            None => {
                self.refuse(shown, "cannot be fixed to a literal here");
                None
            }
        }
    }

    fn function(&mut self, f: &mut Function) -> Option<Expr> {
        let name = function_name(&f.name);
        let args = argument_count(f);
        let shown = format!("{name}()");
        if self.dialect == Dialect::Sqlite
            && let Some(at) = sqlite_time_arg(&name)
        {
            self.sqlite_time(f, &name, at);
            return None;
        }
        let kind = kind_of(&name, args)?;
        if self.ddl {
            self.ddl_refusal(shown);
            return None;
        }
        match kind {
            Kind::Connection => {
                self.refuse(
                    shown,
                    "depends on what the connection did before and differs per copy: use the value returned to the application (RETURNING, the result's last insert id) instead",
                );
                None
            }
            Kind::Never => {
                self.refuse(shown, "differs per copy and cannot be fixed to a literal");
                None
            }
            Kind::PerCall if !self.once => {
                self.refuse(
                    shown,
                    "gives a new value on every call (per row here) and cannot be fixed to one literal: compute it in the application, or use it in INSERT … VALUES",
                );
                None
            }
            Kind::Stable | Kind::PerCall => match self.literal_for(&name, f) {
                Some(text) => self.fixed_to(shown, text),
                None => {
                    self.refuse(shown, "cannot be fixed to a literal here");
                    None
                }
            },
        }
    }

    /// The literal SQL that stands for a call of `name`, in this dialect.
    fn literal_for(&mut self, name: &str, f: &Function) -> Option<String> {
        let date = format_description!("[year]-[month]-[day]");
        let secs = format_description!("[year]-[month]-[day] [hour]:[minute]:[second]");
        let micros = format_description!(
            "[year]-[month]-[day] [hour]:[minute]:[second].[subsecond digits:6]"
        );
        let time_secs = format_description!("[hour]:[minute]:[second]");
        let time_micros = format_description!("[hour]:[minute]:[second].[subsecond digits:6]");
        let pg_ts = || {
            format!(
                "CAST({} AS TIMESTAMPTZ)",
                quote(&format!("{}+00", self.fixed.format(micros)))
            )
        };
        Some(match (self.dialect, name) {
            (
                Dialect::Postgres,
                "now"
                | "current_timestamp"
                | "transaction_timestamp"
                | "statement_timestamp"
                | "clock_timestamp",
            ) => pg_ts(),
            (Dialect::Postgres, "current_date") => format!("CAST({} AS DATE)", pg_ts()),
            (Dialect::Postgres, "current_time") => format!("CAST({} AS TIMETZ)", pg_ts()),
            (Dialect::Postgres, "localtime") => format!("CAST({} AS TIME)", pg_ts()),
            (Dialect::Postgres, "localtimestamp") => format!("CAST({} AS TIMESTAMP)", pg_ts()),
            (Dialect::Postgres, "timeofday") => {
                let f = format_description!(
                    "[weekday repr:short] [month repr:short] [day] [hour]:[minute]:[second].[subsecond digits:6] [year] UTC"
                );
                quote(&self.fixed.format(f))
            }
            (Dialect::Postgres, "random") => format!("{:?}", self.fixed.rng.random::<f64>()),
            (Dialect::Postgres, "gen_random_uuid" | "uuid_generate_v4" | "uuid_generate_v1") => {
                format!("CAST({} AS UUID)", quote(&self.fixed.uuid().to_string()))
            }
            (Dialect::Sqlite, "current_timestamp") => quote(&self.fixed.format(secs)),
            (Dialect::Sqlite, "current_date") => quote(&self.fixed.format(date)),
            (Dialect::Sqlite, "current_time") => quote(&self.fixed.format(time_secs)),
            (Dialect::Sqlite, "random") => self.fixed.rng.random::<i64>().to_string(),
            (Dialect::Sqlite, "randomblob") => {
                let n = match &f.args {
                    FunctionArguments::List(l) => match l.args.first() {
                        Some(FunctionArg::Unnamed(FunctionArgExpr::Expr(Expr::Value(v)))) => {
                            match &v.value {
                                Value::Number(n, _) => n.parse::<usize>().ok()?,
                                _ => return None,
                            }
                        }
                        _ => return None,
                    },
                    _ => return None,
                };
                let n = n.clamp(1, 1 << 20);
                let bytes: Vec<u8> = (0..n).map(|_| self.fixed.rng.random::<u8>()).collect();
                format!("X'{}'", hex::encode_upper(bytes))
            }
            (Dialect::Mysql, _) => {
                let fsp = matches!(&f.args, FunctionArguments::List(l) if !l.args.is_empty());
                let (ts, t) = if fsp {
                    (micros, time_micros)
                } else {
                    (secs, time_secs)
                };
                match name {
                    "now" | "current_timestamp" | "localtime" | "localtimestamp" | "sysdate"
                    | "utc_timestamp" => format!("TIMESTAMP {}", quote(&self.fixed.format(ts))),
                    "curdate" | "current_date" | "utc_date" => {
                        format!("DATE {}", quote(&self.fixed.format(date)))
                    }
                    "curtime" | "current_time" | "utc_time" => {
                        format!("TIME {}", quote(&self.fixed.format(t)))
                    }
                    "unix_timestamp" => self.fixed.timestamp.unix_timestamp().to_string(),
                    "uuid" => quote(&self.fixed.uuid().to_string()),
                    "uuid_short" => (self.fixed.rng.random::<u64>() >> 8).to_string(),
                    "rand" => format!("{:?}", self.fixed.rng.random::<f64>()),
                    _ => return None,
                }
            }
            _ => return None,
        })
    }

    /// SQLite's date and time functions read the clock when their time value is `'now'`
    /// or missing: the time value becomes the fixed time (SQLite accepts it in place of
    /// `'now'`, with milliseconds).
    fn sqlite_time(&mut self, f: &mut Function, name: &str, at: usize) {
        let FunctionArguments::List(list) = &mut f.args else {
            return;
        };
        let positions: Vec<usize> = if name == "timediff" {
            vec![0, 1]
        } else {
            vec![at]
        };
        for at in positions {
            let is_now = match list.args.get(at) {
                None => name != "timediff" && list.args.len() == at,
                Some(FunctionArg::Unnamed(FunctionArgExpr::Expr(e))) => {
                    string_literal(e).is_some_and(|s| s.trim().eq_ignore_ascii_case("now"))
                }
                Some(_) => false,
            };
            if !is_now {
                continue;
            }
            let shown = format!("{name}('now')");
            if self.ddl {
                self.ddl_refusal(shown);
                continue;
            }
            let ms = format_description!(
                "[year]-[month]-[day] [hour]:[minute]:[second].[subsecond digits:3]"
            );
            let text = quote(&self.fixed.format(ms));
            if let Some(lit) = self.fixed_to(shown, text) {
                let arg = FunctionArg::Unnamed(FunctionArgExpr::Expr(lit));
                if at < list.args.len() {
                    list.args[at] = arg;
                } else {
                    list.args.push(arg);
                }
            }
        }
    }

    /// PostgreSQL's special time values (`'now'::timestamptz`, `TIMESTAMP 'now'`): `'now'`
    /// becomes the fixed instant cast to the same type; `'today'` and friends are refused.
    fn special_time(&mut self, word: &str, shown: String, ty: &str) -> Option<Expr> {
        if self.dialect != Dialect::Postgres && word != "now" {
            return None;
        }
        if self.ddl {
            self.ddl_refusal(shown);
            return None;
        }
        if word.trim() != "now" {
            self.refuse(
                shown,
                "reads the clock in the session's time zone and cannot be fixed exactly: pass the date from the application",
            );
            return None;
        }
        let micros = format_description!(
            "[year]-[month]-[day] [hour]:[minute]:[second].[subsecond digits:6]"
        );
        let lit = quote(&format!("{}+00", self.fixed.format(micros)));
        self.fixed_to(shown, format!("CAST(CAST({lit} AS TIMESTAMPTZ) AS {ty})"))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::classify::analyze;

    fn rewritten(d: Dialect, sql: &str) -> Option<String> {
        analyze(d, sql, &mut Fixed::for_test()).rewritten
    }

    #[test]
    fn sqlite_now_forms_become_the_fixed_time() {
        assert_eq!(
            rewritten(
                Dialect::Sqlite,
                "UPDATE t SET at = datetime('now', '+1 day')"
            )
            .as_deref(),
            Some("UPDATE t SET at = datetime('2026-12-01 12:00:00.000', '+1 day')")
        );
        assert_eq!(
            rewritten(Dialect::Sqlite, "UPDATE t SET d = date()").as_deref(),
            Some("UPDATE t SET d = date('2026-12-01 12:00:00.000')")
        );
        assert_eq!(
            rewritten(Dialect::Sqlite, "UPDATE t SET s = strftime('%s', 'now')").as_deref(),
            Some("UPDATE t SET s = strftime('%s', '2026-12-01 12:00:00.000')")
        );
        assert_eq!(rewritten(Dialect::Sqlite, "UPDATE t SET d = date(x)"), None);
    }

    #[test]
    fn per_call_values_are_fixed_only_where_evaluated_once() {
        let a = analyze(
            Dialect::Postgres,
            "INSERT INTO t (id) VALUES (gen_random_uuid()), (gen_random_uuid())",
            &mut Fixed::for_test(),
        );
        let r = a.rewritten.unwrap_or_default();
        assert_eq!(r.matches("AS UUID)").count(), 2, "{r}");
        let a = analyze(
            Dialect::Postgres,
            "UPDATE t SET token = gen_random_uuid()",
            &mut Fixed::for_test(),
        );
        assert!(a.rewritten.is_none());
        assert!(a.refusal.unwrap_or_default().contains("gen_random_uuid()"));
    }
}
