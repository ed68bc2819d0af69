//! Table checksums across copies: every table's rows, in a fixed order, hashed per copy;
//! the first table whose digest differs is named.

use std::collections::BTreeMap;

use sea_orm::{ConnectionTrait, DatabaseConnection, DbBackend, DbErr, Statement};
use sha2::{Digest, Sha256};

/// One table's contents on one copy.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TableDigest {
    /// Its rows.
    pub rows: u64,
    /// Hex SHA-256 over its rows, each rendered with every column, in sorted order.
    pub sha256: String,
}

/// Every user table of `db` (SQLite or PostgreSQL's `public` schema), by name.
pub async fn digests(db: &DatabaseConnection) -> Result<BTreeMap<String, TableDigest>, DbErr> {
    let backend = db.get_database_backend();
    let list = match backend {
        DbBackend::Sqlite => {
            "SELECT name FROM sqlite_master WHERE type = 'table' AND name NOT LIKE 'sqlite_%' ORDER BY name"
        }
        DbBackend::Postgres => {
            "SELECT tablename AS name FROM pg_tables WHERE schemaname = 'public' ORDER BY tablename"
        }
        _ => {
            return Err(DbErr::Custom(
                "table checksums support SQLite and PostgreSQL".into(),
            ));
        }
    };
    let mut out = BTreeMap::new();
    for row in db
        .query_all_raw(Statement::from_string(backend, list))
        .await?
    {
        let name: String = row.try_get("", "name")?;
        let rows = table_rows(db, backend, &name).await?;
        let mut h = Sha256::new();
        for r in &rows {
            h.update(r.as_bytes());
            h.update(b"\n");
        }
        out.insert(
            name,
            TableDigest {
                rows: rows.len() as u64,
                sha256: hex::encode(h.finalize()),
            },
        );
    }
    Ok(out)
}

fn quote_ident(name: &str) -> String {
    format!("\"{}\"", name.replace('"', "\"\""))
}

/// Every row of `table` as one text, sorted.
async fn table_rows(
    db: &DatabaseConnection,
    backend: DbBackend,
    table: &str,
) -> Result<Vec<String>, DbErr> {
    let sql = match backend {
        DbBackend::Postgres => format!("SELECT CAST(t AS TEXT) AS r FROM {} t", quote_ident(table)),
        _ => {
            let cols = db
                .query_all_raw(Statement::from_sql_and_values(
                    backend,
                    "SELECT name FROM pragma_table_info(?) ORDER BY cid",
                    [table.into()],
                ))
                .await?;
            let mut parts = Vec::new();
            for c in cols {
                let col: String = c.try_get("", "name")?;
                parts.push(format!("quote({})", quote_ident(&col)));
            }
            if parts.is_empty() {
                return Ok(Vec::new());
            }
            format!(
                "SELECT {} AS r FROM {}",
                parts.join(" || '|' || "),
                quote_ident(table)
            )
        }
    };
    let mut rows = Vec::new();
    for r in db
        .query_all_raw(Statement::from_string(backend, sql))
        .await?
    {
        rows.push(r.try_get::<String>("", "r")?);
    }
    rows.sort();
    Ok(rows)
}

/// The first table (by name) whose contents differ between two copies' digests, with a
/// line saying how; `None` when they agree on every table.
pub fn first_difference(
    a: &BTreeMap<String, TableDigest>,
    b: &BTreeMap<String, TableDigest>,
) -> Option<(String, String)> {
    let names: std::collections::BTreeSet<&String> = a.keys().chain(b.keys()).collect();
    for name in names {
        match (a.get(name), b.get(name)) {
            (Some(x), Some(y)) if x == y => {}
            (Some(x), Some(y)) => {
                return Some((
                    name.clone(),
                    format!(
                        "{} rows (sha256 {}) vs {} rows (sha256 {})",
                        x.rows,
                        x.sha256.get(..12).unwrap_or(&x.sha256),
                        y.rows,
                        y.sha256.get(..12).unwrap_or(&y.sha256)
                    ),
                ));
            }
            (Some(_), None) => return Some((name.clone(), "missing on the second copy".into())),
            (None, _) => return Some((name.clone(), "missing on the first copy".into())),
        }
    }
    None
}
