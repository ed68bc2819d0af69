//! What a SQL statement does to a copy: `read`, `write`, `ddl`, `txn`, `side_effect` or
//! `other`, decided with sqlparser for the SQLite, PostgreSQL and MySQL dialects.
//!
//! Classification fails closed: only a statement that is positively a read is a read;
//! anything not understood (a statement kind not listed here, text that does not parse) is
//! treated as a write. Keywords inside string literals and comments are never taken for
//! writes (the parser sees them as literals); writes inside CTEs are writes.

use std::ops::ControlFlow;

use serde::Serialize;
use sqlparser::ast::{BinaryOperator, Expr, Query, Select, SetExpr, Statement, Visit, Visitor};
use sqlparser::dialect::{Dialect as SqlDialect, MySqlDialect, PostgreSqlDialect, SQLiteDialect};
use sqlparser::parser::Parser;
use sqlparser::tokenizer::{Token, Tokenizer, Whitespace};

use crate::rewrite::{self, Fixed};

/// The SQL dialect of a group's copies.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, serde::Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Dialect {
    /// SQLite.
    Sqlite,
    /// PostgreSQL.
    Postgres,
    /// MySQL and MariaDB.
    Mysql,
}

impl Dialect {
    /// Parses a dialect name: `sqlite`, `postgres` (or `postgresql`), `mysql` (or `mariadb`).
    pub fn parse(name: &str) -> Option<Self> {
        Some(match name.to_ascii_lowercase().as_str() {
            "sqlite" => Dialect::Sqlite,
            "postgres" | "postgresql" => Dialect::Postgres,
            "mysql" | "mariadb" => Dialect::Mysql,
            _ => return None,
        })
    }

    /// The dialect's name.
    pub fn as_str(self) -> &'static str {
        match self {
            Dialect::Sqlite => "sqlite",
            Dialect::Postgres => "postgres",
            Dialect::Mysql => "mysql",
        }
    }

    pub(crate) fn parser_dialect(self) -> Box<dyn SqlDialect> {
        match self {
            Dialect::Sqlite => Box::new(SQLiteDialect {}),
            Dialect::Postgres => Box::new(PostgreSqlDialect {}),
            Dialect::Mysql => Box::new(MySqlDialect {}),
        }
    }
}

/// What a statement does to a copy.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Class {
    /// Reads only: may run on any caught-up copy.
    Read,
    /// Transaction control: `BEGIN`, `COMMIT`, savepoints, `SET TRANSACTION`, XA,
    /// `PREPARE TRANSACTION`.
    Txn,
    /// Session settings and utilities: `SET`, `PRAGMA`, `VACUUM`, `ATTACH`, `SHOW`,
    /// `LISTEN`/`NOTIFY`, `LOCK`, `DO`, `PREPARE`/`EXECUTE`, `CALL`, `GRANT`, ...
    Other,
    /// A query or call that changes state although it looks like a read: `nextval`,
    /// advisory and user locks, `pg_notify`, `set_config`, `load_extension`,
    /// `LAST_INSERT_ID(x)`, user-variable assignment.
    SideEffect,
    /// Changes rows: `INSERT`, `UPDATE`, `DELETE`, `MERGE`, `REPLACE`, writes in CTEs,
    /// and anything not positively understood.
    Write,
    /// Changes the schema: `CREATE`, `ALTER`, `DROP`, `TRUNCATE`, triggers, ...
    Ddl,
}

impl Class {
    /// The class's name, as the classifier CLI prints it.
    pub fn as_str(self) -> &'static str {
        match self {
            Class::Read => "read",
            Class::Write => "write",
            Class::Ddl => "ddl",
            Class::Txn => "txn",
            Class::SideEffect => "side_effect",
            Class::Other => "other",
        }
    }

    /// Whether statements of this class change a copy and are therefore run on the primary
    /// and journaled (everything but reads and transaction control).
    pub fn is_journaled(self) -> bool {
        !matches!(self, Class::Read | Class::Txn)
    }
}

/// What SQL mode makes of one SQL text (which may hold several statements).
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Analysis {
    /// The strongest class among the statements (`ddl` > `write` > `side_effect` > `other`
    /// > `txn` > `read`).
    pub class: Class,
    /// True when nothing in the text can differ from one copy to another.
    pub deterministic: bool,
    /// Why it is not deterministic, one line per finding, each naming the function (or
    /// clause) and saying whether it was fixed or why it cannot be.
    pub reasons: Vec<String>,
    /// The text with every nondeterministic value fixed to a literal; `None` when nothing
    /// needed fixing, or when something cannot be fixed.
    pub rewritten: Option<String>,
    /// The first finding that cannot be fixed: SQL mode refuses the text for it.
    #[serde(skip)]
    pub refusal: Option<String>,
}

impl Analysis {
    /// The SQL to execute and journal: the rewritten text, or `sql` as given.
    pub fn effective<'a>(&'a self, sql: &'a str) -> &'a str {
        self.rewritten.as_deref().unwrap_or(sql)
    }
}

/// Classifies `sql` and fixes what it can with `fixed` (the time and random values fixed
/// once at the primary).
///
/// ```
/// use regroup_sql::classify::{analyze, Class, Dialect};
/// use regroup_sql::rewrite::Fixed;
/// let mut fixed = Fixed::for_test();
/// let a = analyze(Dialect::Sqlite, "SELECT 'DELETE FROM t' -- DROP TABLE t", &mut fixed);
/// assert_eq!((a.class, a.deterministic), (Class::Read, true));
/// let a = analyze(Dialect::Sqlite, "INSERT INTO t (at) VALUES (CURRENT_TIMESTAMP)", &mut fixed);
/// assert_eq!(a.class, Class::Write);
/// assert_eq!(a.rewritten.as_deref(), Some("INSERT INTO t (at) VALUES ('2026-12-01 12:00:00')"));
/// ```
pub fn analyze(dialect: Dialect, sql: &str, fixed: &mut Fixed) -> Analysis {
    let parser_dialect = dialect.parser_dialect();
    let mut statements = match Parser::parse_sql(parser_dialect.as_ref(), sql) {
        Ok(s) => s,
        Err(e) => return unparsed(dialect, sql, &e.to_string()),
    };
    if statements.is_empty() {
        return Analysis {
            class: Class::Other,
            deterministic: true,
            reasons: vec![],
            rewritten: None,
            refusal: None,
        };
    }
    let mut class = Class::Read;
    let mut reasons = Vec::new();
    let mut refusal = None;
    let mut changed = false;
    for statement in &mut statements {
        // Why a statement is not a read is not a reason it is nondeterministic: the notes
        // are for logs, the reasons only list values that differ per copy.
        let (c, _notes) = classify_statement(statement);
        class = class.max(c);
        let text = statement.to_string();
        for finding in rewrite::fix(dialect, statement, fixed) {
            if finding.fixed.is_some() {
                changed = true;
            } else if refusal.is_none() {
                refusal = Some(format!("{} in statement `{text}`", finding.describe()));
            }
            reasons.push(finding.describe());
        }
    }
    let deterministic = reasons.is_empty();
    let rewritten = (changed && refusal.is_none()).then(|| {
        statements
            .iter()
            .map(ToString::to_string)
            .collect::<Vec<_>>()
            .join("; ")
    });
    Analysis {
        class,
        deterministic,
        reasons,
        rewritten,
        refusal,
    }
}

/// Text that does not parse: transaction-control and utility statements that sqlparser
/// does not know are named by their first keywords; anything else is a write, refused.
fn unparsed(dialect: Dialect, sql: &str, error: &str) -> Analysis {
    let words = leading_words(dialect, sql, 3);
    let w: Vec<&str> = words.iter().map(String::as_str).collect();
    let class = match w.as_slice() {
        ["XA", ..] => Some(Class::Txn),
        ["PREPARE", "TRANSACTION", ..] => Some(Class::Txn),
        ["COMMIT" | "ROLLBACK", "PREPARED", ..] => Some(Class::Txn),
        [
            "DO" | "REINDEX" | "CHECKPOINT" | "CLUSTER" | "PRAGMA" | "OPTIMIZE" | "REPAIR"
            | "CHECKSUM",
            ..,
        ] => Some(Class::Other),
        _ => None,
    };
    match class {
        Some(class) => Analysis {
            class,
            deterministic: true,
            reasons: vec![],
            rewritten: None,
            refusal: None,
        },
        None => {
            let why = format!(
                "not understood ({error}): treated as a write whose values cannot be checked"
            );
            Analysis {
                class: Class::Write,
                deterministic: false,
                refusal: Some(format!("{why}, in statement `{}`", sql.trim())),
                reasons: vec![why],
                rewritten: None,
            }
        }
    }
}

/// The first `n` words of `sql`, upper-cased, comments and whitespace skipped.
fn leading_words(dialect: Dialect, sql: &str, n: usize) -> Vec<String> {
    let d = dialect.parser_dialect();
    let Ok(tokens) = Tokenizer::new(d.as_ref(), sql).tokenize() else {
        return Vec::new();
    };
    tokens
        .into_iter()
        .filter(|t| {
            !matches!(
                t,
                Token::Whitespace(
                    Whitespace::Space
                        | Whitespace::Newline
                        | Whitespace::Tab
                        | Whitespace::SingleLineComment { .. }
                        | Whitespace::MultiLineComment(_)
                )
            )
        })
        .take(n)
        .filter_map(|t| match t {
            Token::Word(w) => Some(w.value.to_ascii_uppercase()),
            _ => None,
        })
        .collect()
}

/// The class of one parsed statement, with notes on why a statement that looks like a read
/// is not one.
pub fn classify_statement(statement: &Statement) -> (Class, Vec<String>) {
    use Statement as S;
    let class = match statement {
        S::Query(q) => return classify_query(q),
        S::Insert(_)
        | S::Update(_)
        | S::Delete(_)
        | S::Merge(_)
        | S::Copy { .. }
        | S::CopyIntoSnowflake { .. }
        | S::LoadData { .. }
        | S::Load { .. }
        | S::Directory { .. }
        | S::Unload { .. }
        | S::ExportData(_)
        | S::Install { .. } => Class::Write,
        S::Truncate(_)
        | S::CreateView(_)
        | S::CreateTable(_)
        | S::CreateVirtualTable { .. }
        | S::CreateIndex(_)
        | S::CreateRole(_)
        | S::CreateSecret { .. }
        | S::CreateServer(_)
        | S::CreateForeignTable(_)
        | S::CreateForeignDataWrapper(_)
        | S::CreateUserMapping(_)
        | S::CreatePolicy(_)
        | S::CreateRule(_)
        | S::CreateConnector(_)
        | S::CreateOperator(_)
        | S::CreateOperatorFamily(_)
        | S::CreateOperatorClass(_)
        | S::CreateTextSearch(_)
        | S::CreateAggregate(_)
        | S::AlterTable(_)
        | S::AlterSchema(_)
        | S::AlterIndex { .. }
        | S::AlterView(_)
        | S::AlterFunction(_)
        | S::AlterType(_)
        | S::AlterCollation(_)
        | S::AlterOperator(_)
        | S::AlterOperatorFamily(_)
        | S::AlterOperatorClass(_)
        | S::AlterTextSearch(_)
        | S::AlterRole { .. }
        | S::AlterPolicy(_)
        | S::AlterTrigger(_)
        | S::AlterConnector { .. }
        | S::Drop { .. }
        | S::DropFunction(_)
        | S::DropDomain(_)
        | S::DropProcedure { .. }
        | S::DropSecret { .. }
        | S::DropPolicy(_)
        | S::DropRule(_)
        | S::DropConnector { .. }
        | S::CreateExtension(_)
        | S::CreateCollation(_)
        | S::DropExtension(_)
        | S::DropOperator(_)
        | S::DropOperatorFamily(_)
        | S::DropOperatorClass(_)
        | S::Comment { .. }
        | S::CreateSchema { .. }
        | S::CreateDatabase { .. }
        | S::CreateFunction(_)
        | S::CreateTrigger(_)
        | S::DropTrigger(_)
        | S::CreateProcedure { .. }
        | S::CreateMacro { .. }
        | S::CreateSequence { .. }
        | S::CreateDomain(_)
        | S::CreateType { .. }
        | S::RenameTable(_)
        | S::CreateUser(_)
        | S::AlterUser(_)
        | S::RefreshMaterializedView(_) => Class::Ddl,
        S::StartTransaction { .. }
        | S::Commit { .. }
        | S::Rollback { .. }
        | S::Savepoint { .. }
        | S::ReleaseSavepoint { .. } => Class::Txn,
        S::Set(set) => return classify_set(set),
        S::Explain {
            analyze, statement, ..
        } => {
            if *analyze {
                // EXPLAIN ANALYZE executes the statement.
                return classify_statement(statement);
            }
            Class::Read
        }
        S::ExplainTable { .. } => Class::Read,
        S::Pragma { .. }
        | S::Vacuum(_)
        | S::AttachDatabase { .. }
        | S::AttachDuckDBDatabase { .. }
        | S::DetachDuckDBDatabase { .. }
        | S::ShowFunctions { .. }
        | S::ShowVariable { .. }
        | S::ShowStatus { .. }
        | S::ShowVariables { .. }
        | S::ShowCreate { .. }
        | S::ShowColumns { .. }
        | S::ShowCatalogs { .. }
        | S::ShowDatabases { .. }
        | S::ShowProcessList { .. }
        | S::ShowSchemas { .. }
        | S::ShowCharset(_)
        | S::ShowObjects(_)
        | S::ShowTables { .. }
        | S::ShowViews { .. }
        | S::ShowCollation { .. }
        | S::LISTEN { .. }
        | S::UNLISTEN { .. }
        | S::NOTIFY { .. }
        | S::Lock(_)
        | S::LockTables { .. }
        | S::UnlockTables
        | S::Prepare { .. }
        | S::Execute { .. }
        | S::Deallocate { .. }
        | S::Call(_)
        | S::Grant(_)
        | S::GrantRole(_)
        | S::Deny(_)
        | S::Revoke(_)
        | S::RevokeRole(_)
        | S::AlterDefaultPrivileges(_)
        | S::Use(_)
        | S::Analyze(_)
        | S::OptimizeTable { .. }
        | S::Kill { .. }
        | S::Discard { .. }
        | S::Reset(_)
        | S::Declare { .. }
        | S::Fetch { .. }
        | S::Close { .. }
        | S::Flush { .. }
        | S::Cache { .. }
        | S::UNCache { .. }
        | S::AlterSession { .. }
        | S::Msck(_) => Class::Other,
        _ => {
            return (
                Class::Write,
                vec!["statement kind not recognised as a read: treated as a write".to_owned()],
            );
        }
    };
    (class, Vec::new())
}

fn classify_set(set: &sqlparser::ast::Set) -> (Class, Vec<String>) {
    use sqlparser::ast::Set;
    match set {
        Set::SetTransaction { .. } => (Class::Txn, Vec::new()),
        Set::SingleAssignment { variable, .. } if is_user_variable(&variable.to_string()) => {
            (Class::SideEffect, Vec::new())
        }
        Set::ParenthesizedAssignments { variables, .. }
            if variables.iter().any(|v| is_user_variable(&v.to_string())) =>
        {
            (Class::SideEffect, Vec::new())
        }
        Set::MultipleAssignments { assignments }
            if assignments
                .iter()
                .any(|a| is_user_variable(&a.name.to_string())) =>
        {
            (Class::SideEffect, Vec::new())
        }
        _ => (Class::Other, Vec::new()),
    }
}

/// `@name` (a MySQL user variable), not `@@system` variables.
fn is_user_variable(name: &str) -> bool {
    name.starts_with('@') && !name.starts_with("@@")
}

/// A query: a read unless it holds a write (a data-modifying CTE, `SELECT … INTO` a table)
/// or a call with a side effect.
fn classify_query(query: &Query) -> (Class, Vec<String>) {
    let mut v = QueryScan::default();
    let _ = query.visit(&mut v);
    if let Some(note) = v.write {
        return (Class::Write, vec![note]);
    }
    if let Some(note) = v.side_effect {
        return (Class::SideEffect, vec![note]);
    }
    (Class::Read, Vec::new())
}

#[derive(Default)]
struct QueryScan {
    write: Option<String>,
    side_effect: Option<String>,
}

impl Visitor for QueryScan {
    type Break = ();

    fn pre_visit_query(&mut self, query: &Query) -> ControlFlow<()> {
        if let Some(with) = &query.with {
            for cte in &with.cte_tables {
                if matches!(
                    *cte.query.body,
                    SetExpr::Insert(_)
                        | SetExpr::Update(_)
                        | SetExpr::Delete(_)
                        | SetExpr::Merge(_)
                ) && self.write.is_none()
                {
                    self.write = Some(format!("the CTE {} changes rows", cte.alias.name.value));
                }
            }
        }
        if matches!(
            *query.body,
            SetExpr::Insert(_) | SetExpr::Update(_) | SetExpr::Delete(_) | SetExpr::Merge(_)
        ) && self.write.is_none()
        {
            self.write = Some("a nested statement changes rows".to_owned());
        }
        if let SetExpr::Select(select) = &*query.body {
            self.select_into(select);
        }
        ControlFlow::Continue(())
    }

    fn pre_visit_select(&mut self, select: &Select) -> ControlFlow<()> {
        self.select_into(select);
        ControlFlow::Continue(())
    }

    fn pre_visit_expr(&mut self, expr: &Expr) -> ControlFlow<()> {
        if self.side_effect.is_some() {
            return ControlFlow::Continue(());
        }
        match expr {
            Expr::Function(f) => {
                let name = rewrite::function_name(&f.name);
                let has_args = rewrite::argument_count(f) > 0;
                if is_side_effect_function(&name, has_args) {
                    self.side_effect = Some(format!("{name}() changes state"));
                }
            }
            Expr::BinaryOp {
                op: BinaryOperator::Assignment,
                left,
                ..
            } if is_user_variable(&left.to_string()) => {
                self.side_effect = Some(format!("{left} := assigns a user variable"));
            }
            _ => {}
        }
        ControlFlow::Continue(())
    }
}

impl QueryScan {
    fn select_into(&mut self, select: &Select) {
        let Some(into) = &select.into else { return };
        if into
            .targets
            .iter()
            .all(|t| is_user_variable(&t.to_string()))
        {
            if self.side_effect.is_none() {
                self.side_effect = Some("SELECT … INTO assigns user variables".to_owned());
            }
        } else if self.write.is_none() {
            self.write = Some("SELECT … INTO creates a table".to_owned());
        }
    }
}

/// Functions that change state although they are called in a query.
fn is_side_effect_function(name: &str, has_args: bool) -> bool {
    match name {
        "nextval"
        | "setval"
        | "pg_notify"
        | "set_config"
        | "load_extension"
        | "get_lock"
        | "release_lock"
        | "release_all_locks"
        | "pg_terminate_backend"
        | "pg_cancel_backend"
        | "pg_reload_conf"
        | "lo_import"
        | "lo_export"
        | "lo_unlink"
        | "lo_create"
        | "lo_creat"
        | "pg_logical_emit_message"
        | "sleep"
        | "pg_sleep" => true,
        "last_insert_id" => has_args,
        n => n.starts_with("pg_advisory") || n.starts_with("pg_try_advisory"),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn class(dialect: Dialect, sql: &str) -> Class {
        analyze(dialect, sql, &mut Fixed::for_test()).class
    }

    #[test]
    fn fails_closed_on_text_that_does_not_parse() {
        let a = analyze(
            Dialect::Sqlite,
            "FROBNICATE ALL THE ROWS",
            &mut Fixed::for_test(),
        );
        assert_eq!(a.class, Class::Write);
        assert!(!a.deterministic);
        assert!(a.refusal.is_some());
    }

    #[test]
    fn txn_keywords_sqlparser_does_not_know() {
        assert_eq!(class(Dialect::Mysql, "XA START 'x'"), Class::Txn);
        assert_eq!(
            class(Dialect::Postgres, "PREPARE TRANSACTION 'foo'"),
            Class::Txn
        );
        assert_eq!(
            class(Dialect::Postgres, "/* c */ COMMIT PREPARED 'foo'"),
            Class::Txn
        );
    }
}
