//! Snapshots and restores without sockets: [`SeaOrmSnapshotter`] on SQLite (a consistent
//! copy with the exact seq; a restore into a live pool that other connections keep open,
//! ids that continue where the snapshot's did, a mismatched snapshot refused with nothing
//! changed), and the layer's endpoints (who may call them, and a restore repositioning the
//! layer's memory).

#![allow(clippy::unwrap_used)]

use std::convert::Infallible;

use bytes::Bytes;
use futures_util::StreamExt;
use http::{Request, Response, StatusCode};
use regroup_replay::signature::Secret;
use regroup_replay::snapshot::{
    FORMAT_HEADER, FORMAT_SQLITE, RESTORE_PATH, SEQ_HEADER, SNAPSHOT_PATH, sign_snapshot_request,
};
use regroup_replay::{
    Answer, ExactlyOnce, ReplayContext, ReplayLayer, SeaOrmSnapshotter, SnapshotBody, Snapshotter,
};
use sea_orm::{ConnectOptions, ConnectionTrait, Database, DatabaseConnection, Statement};
use sea_orm_migration::{MigrationTrait, SchemaManager};
use time::macros::datetime;
use tower::{Layer, ServiceExt, service_fn};
use uuid::Uuid;

type Body = http_body_util::Full<Bytes>;

/// A SQLite database with `regroup_applied`, `owner` and `pet` (a foreign key to owner),
/// both with AUTOINCREMENT ids, in a pool of 3 connections.
async fn database(dir: &tempfile::TempDir, name: &str) -> DatabaseConnection {
    let url = format!("sqlite://{}?mode=rwc", dir.path().join(name).display());
    let mut opts = ConnectOptions::new(url);
    opts.max_connections(3).sqlx_logging(false);
    let db = Database::connect(opts).await.unwrap();
    regroup_migrations::AppliedMigration
        .up(&SchemaManager::new(&db))
        .await
        .unwrap();
    db.execute_unprepared(
        "CREATE TABLE owner (id INTEGER PRIMARY KEY AUTOINCREMENT, name TEXT NOT NULL);
         CREATE TABLE pet (id INTEGER PRIMARY KEY AUTOINCREMENT,
                           owner INTEGER NOT NULL REFERENCES owner(id), name TEXT NOT NULL);",
    )
    .await
    .unwrap();
    db
}

async fn apply(once: &ExactlyOnce, seq: u64, epoch: u64, owner: &str, pet: &str) {
    let ctx = ReplayContext::new(
        seq,
        Uuid::now_v7(),
        epoch,
        datetime!(2026-11-30 12:00:00 UTC),
        false,
    );
    let (owner, pet) = (owner.to_owned(), pet.to_owned());
    once.run(Some(&ctx), move |txn| {
        Box::pin(async move {
            txn.execute_unprepared(&format!("INSERT INTO owner (name) VALUES ('{owner}')"))
                .await
                .unwrap();
            txn.execute_unprepared(&format!(
                "INSERT INTO pet (owner, name) VALUES (last_insert_rowid(), '{pet}')"
            ))
            .await
            .unwrap();
            Ok(Answer::json(201, &serde_json::json!({})))
        })
    })
    .await
    .unwrap();
}

async fn rows(db: &DatabaseConnection, sql: &str) -> Vec<String> {
    db.query_all_raw(Statement::from_string(db.get_database_backend(), sql))
        .await
        .unwrap()
        .iter()
        .map(|r| r.try_get_by_index::<String>(0).unwrap())
        .collect()
}

const DUMP: &str = "SELECT 'owner ' || id || ' ' || name FROM owner
                    UNION ALL SELECT 'pet ' || id || ' ' || owner || ' ' || name FROM pet
                    UNION ALL SELECT 'applied ' || seq || ' ' || epoch FROM regroup_applied
                    ORDER BY 1";

async fn collect(body: SnapshotBody) -> Bytes {
    let chunks: Vec<Bytes> = body.map(|c| c.unwrap()).collect().await;
    Bytes::from(chunks.concat())
}

fn once_body(bytes: Bytes) -> SnapshotBody {
    Box::pin(futures_util::stream::once(async move { Ok(bytes) }))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sqlite_snapshot_restores_into_a_live_pool() {
    let dir = tempfile::tempdir().unwrap();
    let source = database(&dir, "source.db").await;
    let target = database(&dir, "target.db").await;
    let once = ExactlyOnce::new(source.clone());
    for (seq, epoch) in [(1, 1), (2, 1), (4, 2)] {
        apply(&once, seq, epoch, &format!("o{seq}"), &format!("p{seq}")).await;
    }
    // The target holds other rows, and ids further on, before the restore.
    let target_once = ExactlyOnce::new(target.clone());
    for seq in 1..=6 {
        apply(&target_once, seq, 3, "stale", "stale").await;
    }

    let snap = SeaOrmSnapshotter::new(source.clone())
        .snapshot()
        .await
        .unwrap();
    assert_eq!(
        (snap.seq, snap.epoch),
        (4, 2),
        "the seq it includes, exactly"
    );
    assert_eq!(snap.format, FORMAT_SQLITE);
    let bytes = collect(snap.body).await;
    let want = rows(&source, DUMP).await;
    // The source goes on; the snapshot does not see it.
    apply(&once, 5, 2, "o5", "p5").await;

    let restored = SeaOrmSnapshotter::new(target.clone())
        .restore(FORMAT_SQLITE, once_body(bytes.clone()))
        .await
        .unwrap();
    assert_eq!((restored.seq, restored.epoch), (4, 2));
    // Every pooled connection sees the restored rows.
    for _ in 0..3 {
        assert_eq!(rows(&target, DUMP).await, want);
    }
    // Ids continue where the snapshot's did, as on the source.
    apply(&target_once, 5, 2, "o5", "p5").await;
    assert_eq!(rows(&target, DUMP).await, rows(&source, DUMP).await);

    // A snapshot of another schema is refused, and nothing changes.
    let other = tempfile::tempdir().unwrap();
    let odd = Database::connect(format!(
        "sqlite://{}?mode=rwc",
        other.path().join("odd.db").display()
    ))
    .await
    .unwrap();
    regroup_migrations::AppliedMigration
        .up(&SchemaManager::new(&odd))
        .await
        .unwrap();
    let odd_snap = SeaOrmSnapshotter::new(odd).snapshot().await.unwrap();
    let odd_bytes = collect(odd_snap.body).await;
    let before = rows(&target, DUMP).await;
    let refused = SeaOrmSnapshotter::new(target.clone())
        .restore(FORMAT_SQLITE, once_body(odd_bytes))
        .await;
    assert!(refused.is_err(), "{refused:?}");
    let not_a_db = SeaOrmSnapshotter::new(target.clone())
        .restore(FORMAT_SQLITE, once_body(Bytes::from_static(b"garbage")))
        .await;
    assert!(not_a_db.is_err());
    let wrong_format = SeaOrmSnapshotter::new(target.clone())
        .restore("postgres-json-v1", once_body(bytes))
        .await;
    assert!(wrong_format.is_err());
    assert_eq!(rows(&target, DUMP).await, before);
}

fn app(
    layer: ReplayLayer,
    snapshotter: SeaOrmSnapshotter,
) -> impl tower::Service<
    Request<Body>,
    Response = Response<axum_like::Body>,
    Error = Infallible,
    Future: Send,
> + Clone {
    let inner = service_fn(|_req: Request<Body>| async {
        Ok::<_, Infallible>(Response::new(axum_like::Body::from("inner".to_owned())))
    });
    let snapshots = layer.snapshots(snapshotter);
    snapshots.layer(layer.layer(inner))
}

/// A response body buildable from `String` and `Bytes`, as axum's is.
mod axum_like {
    #[derive(Debug, Default)]
    pub(crate) struct Body(pub(crate) bytes::Bytes);
    impl From<String> for Body {
        fn from(s: String) -> Self {
            Body(s.into())
        }
    }
    impl From<bytes::Bytes> for Body {
        fn from(b: bytes::Bytes) -> Self {
            Body(b)
        }
    }
}

fn get_snapshot(secret: Option<&Secret>) -> Request<Body> {
    let mut req = Request::get(SNAPSHOT_PATH).body(Body::default()).unwrap();
    if let Some(s) = secret {
        sign_snapshot_request(req.headers_mut(), "GET", SNAPSHOT_PATH, s);
    }
    req
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn snapshot_endpoints_are_not_open_to_anyone() {
    let dir = tempfile::tempdir().unwrap();
    let db = database(&dir, "app.db").await;
    let once = ExactlyOnce::new(db.clone());
    apply(&once, 1, 1, "o1", "p1").await;
    let snap = || SeaOrmSnapshotter::new(db.clone());

    // No secret and no permission: refused.
    let closed = app(
        ReplayLayer::new().without_secret().with_store(once.clone()),
        snap(),
    );
    let resp = closed.clone().oneshot(get_snapshot(None)).await.unwrap();
    assert_eq!(resp.status(), StatusCode::FORBIDDEN);
    let resp = closed
        .oneshot(
            Request::put(RESTORE_PATH)
                .header(FORMAT_HEADER, FORMAT_SQLITE)
                .body(Body::default())
                .unwrap(),
        )
        .await
        .unwrap();
    assert_eq!(resp.status(), StatusCode::FORBIDDEN);

    // No secret, permission given: served.
    let open = app(
        ReplayLayer::new()
            .without_secret()
            .with_store(once.clone())
            .allow_unsigned_snapshots(true),
        snap(),
    );
    let resp = open.oneshot(get_snapshot(None)).await.unwrap();
    assert_eq!(resp.status(), StatusCode::OK);
    assert_eq!(resp.headers()[SEQ_HEADER], "1");

    // A secret: only a valid signature, whatever the permission says.
    let secret = Secret::new("s").unwrap();
    let signed = app(
        ReplayLayer::new()
            .with_secret("s")
            .with_store(once.clone())
            .allow_unsigned_snapshots(true),
        snap(),
    );
    let resp = signed.clone().oneshot(get_snapshot(None)).await.unwrap();
    assert_eq!(resp.status(), StatusCode::FORBIDDEN);
    let wrong = Secret::new("not s").unwrap();
    let resp = signed
        .clone()
        .oneshot(get_snapshot(Some(&wrong)))
        .await
        .unwrap();
    assert_eq!(resp.status(), StatusCode::FORBIDDEN);
    // A signature made for the snapshot does not open the restore.
    let mut req = get_snapshot(Some(&secret));
    *req.method_mut() = http::Method::PUT;
    *req.uri_mut() = RESTORE_PATH.parse().unwrap();
    req.headers_mut()
        .insert(FORMAT_HEADER, FORMAT_SQLITE.parse().unwrap());
    let resp = signed.clone().oneshot(req).await.unwrap();
    assert_eq!(resp.status(), StatusCode::FORBIDDEN);
    // Asking whether a restore would be taken: only a signed caller hears yes.
    let ask = |secret: Option<&Secret>| {
        let mut req = Request::get(RESTORE_PATH).body(Body::default()).unwrap();
        if let Some(s) = secret {
            sign_snapshot_request(req.headers_mut(), "GET", RESTORE_PATH, s);
        }
        req
    };
    let resp = signed.clone().oneshot(ask(None)).await.unwrap();
    assert_eq!(resp.status(), StatusCode::FORBIDDEN);
    let resp = signed.clone().oneshot(ask(Some(&secret))).await.unwrap();
    assert_eq!(resp.status(), StatusCode::NO_CONTENT);
    let resp = signed
        .clone()
        .oneshot(get_snapshot(Some(&secret)))
        .await
        .unwrap();
    assert_eq!(resp.status(), StatusCode::OK);
    let bytes = resp.into_body().0;

    // The copy moves on to seq 3, then gets the snapshot at seq 1 back: the layer's memory
    // follows it down (answers say Regroup-Applied 1, not 3).
    apply(&once, 2, 1, "o2", "p2").await;
    apply(&once, 3, 1, "o3", "p3").await;
    let resp = signed
        .clone()
        .oneshot(
            Request::get("/_regroup/applied")
                .body(Body::default())
                .unwrap(),
        )
        .await
        .unwrap();
    assert_eq!(resp.status(), StatusCode::OK);
    let mut req = Request::put(RESTORE_PATH)
        .header(FORMAT_HEADER, FORMAT_SQLITE)
        .body(Body::new(bytes))
        .unwrap();
    sign_snapshot_request(req.headers_mut(), "PUT", RESTORE_PATH, &secret);
    let resp = signed.clone().oneshot(req).await.unwrap();
    let status = resp.status();
    let body = resp.into_body().0;
    assert_eq!(status, StatusCode::OK, "{}", String::from_utf8_lossy(&body));
    let v: serde_json::Value = serde_json::from_slice(&body).unwrap();
    assert_eq!(v["seq"], 1);
    let resp = signed
        .oneshot(Request::get("/anything").body(Body::default()).unwrap())
        .await
        .unwrap();
    assert_eq!(resp.headers()["regroup-applied"], "1");
    assert_eq!(once.applied().await.unwrap(), (1, 1));
}

/// A copy that took records out of seq order (parallel replay) is snapshotted at its dense
/// prefix, not at its highest record: 2 is still missing, so the snapshot stands at 1 and
/// the restored copy says the same (what is above comes again, answered from the record).
#[tokio::test]
async fn a_copy_with_records_out_of_seq_order_is_snapshotted_at_its_dense_prefix() {
    let dir = tempfile::tempdir().unwrap();
    let source = database(&dir, "source.db").await;
    let target = database(&dir, "target.db").await;
    for db in [&source, &target] {
        regroup_migrations::AppliedFloorMigration
            .up(&SchemaManager::new(db))
            .await
            .unwrap();
    }
    let once = ExactlyOnce::new(source.clone());
    apply(&once, 1, 1, "ann", "rex").await;
    // 3 and 4 were sent with floor 1, while 2 was still on its way.
    source
        .execute_unprepared(
            "INSERT INTO regroup_applied (seq, txn_id, epoch, status, body, floor) VALUES
               (3, 't3', 1, 201, x'7b7d', 1), (4, 't4', 1, 201, x'7b7d', 1)",
        )
        .await
        .unwrap();
    let snapshotter = SeaOrmSnapshotter::new(source.clone());
    let snapshot = snapshotter.snapshot().await.unwrap();
    assert_eq!((snapshot.seq, snapshot.epoch), (1, 1));
    let restored = SeaOrmSnapshotter::new(target.clone())
        .restore(&snapshot.format.clone(), snapshot.body)
        .await
        .unwrap();
    assert_eq!(restored.seq, 1);
    assert_eq!(
        rows(
            &target,
            "SELECT CAST(seq AS TEXT) FROM regroup_applied ORDER BY seq"
        )
        .await,
        ["1", "3", "4"]
    );
    // Once 2 is in, with the floor of 4's window, the copy stands at 4.
    source
        .execute_unprepared(
            "INSERT INTO regroup_applied (seq, txn_id, epoch, status, body, floor) VALUES
               (2, 't2', 1, 201, x'7b7d', 1), (5, 't5', 1, 201, x'7b7d', 4)",
        )
        .await
        .unwrap();
    assert_eq!(snapshotter.snapshot().await.unwrap().seq, 4);
}
