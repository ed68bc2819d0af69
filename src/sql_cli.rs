//! `regroup sql`: SQL mode's commands (`classify`: what SQL mode does with each statement;
//! `verify`: table checksums across a group's copies).

use std::io::{BufRead, Write};

use anyhow::Context;
use clap::{Args, Subcommand, ValueEnum};
use regroup_sql::classify::{Dialect, analyze};
use regroup_sql::rewrite::Fixed;

/// `regroup sql …`.
#[derive(Args)]
pub(crate) struct SqlArgs {
    #[command(subcommand)]
    command: SqlCommand,
}

#[derive(Subcommand)]
enum SqlCommand {
    /// Classify SQL statements: reads JSON lines `{"sql": "..."}` on stdin, writes one JSON
    /// line per statement line: `{"class", "deterministic", "reasons", "rewritten"}`.
    Classify {
        /// The SQL dialect.
        #[arg(long)]
        dialect: DialectArg,
    },
    /// Compare every table's checksum across copies; names the first table that differs
    /// from the first copy's (exit status 1), or says they agree.
    Verify {
        /// A copy as NAME=URL (`sqlite://path`, `postgres://…`); two or more.
        #[arg(long = "copy", required = true, num_args = 1)]
        copies: Vec<String>,
    },
}

#[derive(Clone, Copy, ValueEnum)]
enum DialectArg {
    Sqlite,
    Postgres,
    Mysql,
}

impl From<DialectArg> for Dialect {
    fn from(d: DialectArg) -> Self {
        match d {
            DialectArg::Sqlite => Dialect::Sqlite,
            DialectArg::Postgres => Dialect::Postgres,
            DialectArg::Mysql => Dialect::Mysql,
        }
    }
}

#[derive(serde::Deserialize)]
#[serde(deny_unknown_fields)]
struct Input {
    sql: String,
}

/// Runs `regroup sql …`.
pub(crate) async fn run(args: SqlArgs) -> anyhow::Result<()> {
    match args.command {
        SqlCommand::Classify { dialect } => classify(dialect.into()),
        SqlCommand::Verify { copies } => verify(&copies).await,
    }
}

async fn verify(copies: &[String]) -> anyhow::Result<()> {
    if copies.len() < 2 {
        anyhow::bail!("verify needs two or more --copy NAME=URL");
    }
    let mut digests = Vec::new();
    for c in copies {
        let Some((name, url)) = c.split_once('=') else {
            anyhow::bail!("--copy {c:?}: expected NAME=URL");
        };
        if url.starts_with("sqlite:") {
            let path = url.trim_start_matches("sqlite:").trim_start_matches("//");
            let path = path.split('?').next().unwrap_or(path);
            if !std::path::Path::new(path).exists() {
                anyhow::bail!("copy {name}: {path} does not exist");
            }
        }
        let db = sea_orm::Database::connect(url)
            .await
            .with_context(|| format!("copy {name}: connecting"))?;
        let d = regroup_sql::verify::digests(&db)
            .await
            .with_context(|| format!("copy {name}: reading its tables"))?;
        let _ = db.close().await;
        digests.push((name.to_owned(), d));
    }
    let (first, base) = &digests[0];
    let mut differ = false;
    for (name, d) in &digests[1..] {
        match regroup_sql::verify::first_difference(base, d) {
            None => println!("{name}: identical to {first} ({} tables)", d.len()),
            Some((table, how)) => {
                differ = true;
                println!("{name}: table {table} differs from {first}'s: {how}");
            }
        }
    }
    if differ {
        anyhow::bail!("copies differ");
    }
    Ok(())
}

/// One output line per non-blank input line; a line that is not `{"sql": "..."}` gets
/// `{"error": "..."}` and makes the command fail once every line is done.
fn classify(dialect: Dialect) -> anyhow::Result<()> {
    let stdin = std::io::stdin();
    let mut out = std::io::stdout().lock();
    let mut bad = 0usize;
    for (n, line) in stdin.lock().lines().enumerate() {
        let line = line.context("reading stdin")?;
        if line.trim().is_empty() {
            continue;
        }
        let answer = match serde_json::from_str::<Input>(&line) {
            Ok(input) => {
                let mut fixed = Fixed::new(time::OffsetDateTime::now_utc(), uuid::Uuid::now_v7());
                let a = analyze(dialect, &input.sql, &mut fixed);
                serde_json::json!({
                    "class": a.class.as_str(),
                    "deterministic": a.deterministic,
                    "reasons": a.reasons,
                    "rewritten": a.rewritten,
                })
            }
            Err(e) => {
                bad += 1;
                serde_json::json!({
                    "error": format!("line {}: expected {{\"sql\": \"...\"}}: {e}", n + 1)
                })
            }
        };
        writeln!(out, "{answer}").context("writing stdout")?;
    }
    out.flush().context("writing stdout")?;
    if bad > 0 {
        anyhow::bail!("{bad} input line(s) were not {{\"sql\": \"...\"}}");
    }
    Ok(())
}
