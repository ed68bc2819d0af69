//! A throwaway PostgreSQL database per test on the local server (127.0.0.1:5432, user
//! `postgres`, trust auth on the test machines and in CI), dropped when the handle is.

use std::time::Duration;

use sea_orm::{ConnectionTrait, Database, DatabaseConnection};

/// The server's maintenance database.
pub const ADMIN_URL: &str = "postgres://postgres@127.0.0.1:5432/postgres";

async fn connect_admin() -> Result<DatabaseConnection, String> {
    // A plain TCP connect first: sqlx's pool reports a refused connection only as a
    // time-out.
    tokio::time::timeout(
        Duration::from_secs(5),
        tokio::net::TcpStream::connect("127.0.0.1:5432"),
    )
    .await
    .map_err(|_| "no TCP connection within 5 s".to_owned())?
    .map_err(|e| e.to_string())?;
    let db = tokio::time::timeout(Duration::from_secs(10), Database::connect(ADMIN_URL))
        .await
        .map_err(|_| "no connection within 10 s".to_owned())?
        .map_err(|e| e.to_string())?;
    db.ping().await.map_err(|e| e.to_string())?;
    Ok(db)
}

/// A fresh database, dropped (with its connections) when this is dropped.
pub struct TempDatabase {
    pub name: String,
    pub url: String,
}

impl TempDatabase {
    /// Creates `regroup_test_<random>`; `Err` when the server is not reachable.
    pub async fn create() -> Result<TempDatabase, String> {
        let admin = connect_admin().await?;
        let name = format!("regroup_test_{:016x}", rand::random::<u64>());
        admin
            .execute_unprepared(&format!("CREATE DATABASE {name}"))
            .await
            .map_err(|e| format!("CREATE DATABASE {name}: {e}"))?;
        let _ = admin.close().await;
        let url = format!("postgres://postgres@127.0.0.1:5432/{name}");
        Ok(TempDatabase { name, url })
    }

    /// [`TempDatabase::create`], or `None` with the reason printed when the server is not
    /// reachable outside CI (in CI that fails the test).
    pub async fn create_or_skip() -> Option<TempDatabase> {
        match TempDatabase::create().await {
            Ok(db) => Some(db),
            Err(e) if in_ci() => {
                panic!("PostgreSQL not reachable at {ADMIN_URL} (required in CI): {e}")
            }
            Err(e) => {
                eprintln!("skipping: PostgreSQL not reachable at {ADMIN_URL}: {e}");
                None
            }
        }
    }
}

impl Drop for TempDatabase {
    fn drop(&mut self) {
        // Drop may run inside the test's runtime, which cannot be blocked on: clean up from
        // a thread with a runtime of its own.
        let name = self.name.clone();
        let done = std::thread::spawn(move || {
            let rt = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
                .map_err(|e| e.to_string())?;
            rt.block_on(async {
                let admin = connect_admin().await?;
                admin
                    .execute_unprepared(&format!("DROP DATABASE IF EXISTS {name} WITH (FORCE)"))
                    .await
                    .map_err(|e| e.to_string())?;
                let _ = admin.close().await;
                Ok::<_, String>(())
            })
        })
        .join();
        match done {
            Ok(Ok(())) => {}
            Ok(Err(e)) => eprintln!("could not drop test database {}: {e}", self.name),
            Err(_) => eprintln!(
                "could not drop test database {}: cleanup panicked",
                self.name
            ),
        }
    }
}

/// Whether the tests run in CI (`CI=true`), where a missing server fails them.
pub fn in_ci() -> bool {
    std::env::var("CI").is_ok_and(|v| !v.is_empty() && v != "false" && v != "0")
}
