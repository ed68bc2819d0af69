//! `ReplayLayer`, `ExactlyOnce` and `ReplayContext` from the application's side, without
//! sockets: every request goes through `tower::ServiceExt::oneshot` to an inner service that
//! records whether it was called and which `ReplayContext` it saw.

#![allow(clippy::unwrap_used)]

use std::convert::Infallible;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};

use http::{Method, Request, Response, StatusCode};
use http_body_util::BodyExt;
use rand::Rng;
use regroup_replay::classify::{Classifier, Kind, RouteRule};
use regroup_replay::layer::APPLIED_PATH;
use regroup_replay::signature::{Secret, sign_headers};
use regroup_replay::{Answer, ExactlyOnce, ReplayContext, ReplayLayer, RunError};
use sea_orm::{ConnectionTrait, Database, DatabaseConnection};
use sea_orm_migration::{MigrationTrait, SchemaManager};
use serde_json::{Value, json};
use time::macros::datetime;
use tower::{Layer, Service, ServiceExt, service_fn};
use uuid::Uuid;

/// The request body: the layer needs one it can rebuild from bytes.
type Body = http_body_util::Full<bytes::Bytes>;

const TXN: &str = "0190b6e0-0000-7000-8000-0000000000aa";

/// What the inner service saw: one entry per call, with the context it was given.
type Seen = Arc<Mutex<Vec<Option<ReplayContext>>>>;

/// An inner service that records its calls and answers 200 "inner".
fn inner() -> (
    impl Service<Request<Body>, Response = Response<String>, Error = Infallible, Future: Send + 'static>
    + Clone
    + Send
    + 'static,
    Seen,
) {
    let seen: Seen = Arc::default();
    let log = seen.clone();
    let svc = service_fn(move |req: Request<Body>| {
        log.lock()
            .unwrap()
            .push(req.extensions().get::<ReplayContext>().cloned());
        std::future::ready(Ok::<_, Infallible>(Response::new("inner".to_owned())))
    });
    (svc, seen)
}

/// A request with the full replay headers.
fn update(seq: &str, epoch: &str) -> http::request::Builder {
    Request::post("/transfers")
        .header("regroup-seq", seq)
        .header("regroup-txn-id", TXN)
        .header("regroup-epoch", epoch)
        .header("regroup-timestamp", "2026-11-30T12:00:00.123456Z")
}

async fn send<S>(svc: &S, req: Request<Body>) -> (StatusCode, String)
where
    S: Service<Request<Body>, Response = Response<String>, Error = Infallible> + Clone,
{
    let resp = svc.clone().oneshot(req).await.unwrap();
    (resp.status(), resp.into_body())
}

async fn send_json<S>(svc: &S, req: Request<Body>) -> (StatusCode, Value)
where
    S: Service<Request<Body>, Response = Response<String>, Error = Infallible> + Clone,
{
    let (status, body) = send(svc, req).await;
    let value = serde_json::from_str(&body).unwrap_or_else(|e| panic!("{e}: {body}"));
    (status, value)
}

fn calls(seen: &Seen) -> usize {
    seen.lock().unwrap().len()
}

#[tokio::test]
async fn request_without_replay_headers_passes_through_without_context() {
    let (svc, seen) = inner();
    let svc = ReplayLayer::new().layer(svc);
    let (status, body) = send(
        &svc,
        Request::post("/transfers").body(Body::default()).unwrap(),
    )
    .await;
    assert_eq!((status, body.as_str()), (StatusCode::OK, "inner"));
    let (status, _) = send(
        &svc,
        Request::get("/accounts").body(Body::default()).unwrap(),
    )
    .await;
    assert_eq!(status, StatusCode::OK);
    let seen = seen.lock().unwrap();
    assert_eq!(seen.len(), 2);
    assert!(seen.iter().all(Option::is_none), "{seen:?}");
}

#[tokio::test]
async fn full_headers_give_the_context_exactly_as_sent() {
    let (svc, seen) = inner();
    let svc = ReplayLayer::new().layer(svc);
    let (status, _) = send(&svc, update("12", "3").body(Body::default()).unwrap()).await;
    assert_eq!(status, StatusCode::OK);
    let (status, _) = send(
        &svc,
        update("13", "3")
            .header("regroup-replay", "1")
            .body(Body::default())
            .unwrap(),
    )
    .await;
    assert_eq!(status, StatusCode::OK);
    let seen = seen.lock().unwrap();
    let primary = seen[0]
        .as_ref()
        .expect("a context on the primary's execution");
    let replay = seen[1].as_ref().expect("a context on the replay");
    let txn = Uuid::parse_str(TXN).unwrap();
    let at = datetime!(2026-11-30 12:00:00.123456 UTC);
    assert_eq!(
        (
            primary.seq(),
            primary.txn_id(),
            primary.epoch(),
            primary.now(),
            primary.is_replay()
        ),
        (12, txn, 3, at, false)
    );
    assert_eq!(
        (
            replay.seq(),
            replay.txn_id(),
            replay.epoch(),
            replay.now(),
            replay.is_replay()
        ),
        (13, txn, 3, at, true)
    );
}

#[tokio::test]
async fn malformed_replay_headers_get_400_and_the_inner_service_is_not_called() {
    let (svc, seen) = inner();
    let svc = ReplayLayer::new().layer(svc);

    let (status, body) = send_json(&svc, update("x", "1").body(Body::default()).unwrap()).await;
    assert_eq!(status, StatusCode::BAD_REQUEST);
    assert_eq!(body["error"], "bad_replay_headers");
    let message = body["message"].as_str().unwrap();
    assert!(
        message.starts_with("invalid replay header regroup-seq: "),
        "{message}"
    );

    let no_timestamp = Request::post("/transfers")
        .header("regroup-seq", "1")
        .header("regroup-txn-id", TXN)
        .header("regroup-epoch", "1")
        .body(Body::default())
        .unwrap();
    let (status, body) = send_json(&svc, no_timestamp).await;
    assert_eq!(status, StatusCode::BAD_REQUEST);
    assert_eq!(
        body,
        json!({"error": "bad_replay_headers", "message": "invalid replay header regroup-timestamp: missing"})
    );

    let mut bad_txn = update("1", "1").body(Body::default()).unwrap();
    bad_txn.headers_mut().insert(
        "regroup-txn-id",
        http::HeaderValue::from_static("not-a-uuid"),
    );
    let (status, body) = send_json(&svc, bad_txn).await;
    assert_eq!(status, StatusCode::BAD_REQUEST);
    assert_eq!(body["error"], "bad_replay_headers");
    assert_eq!(calls(&seen), 0, "the inner service must not be called");
}

#[tokio::test]
async fn stale_epoch_is_fenced_with_409_and_newer_epochs_pass() {
    let (svc, seen) = inner();
    let svc = ReplayLayer::new().layer(svc);
    let (status, _) = send(&svc, update("1", "3").body(Body::default()).unwrap()).await;
    assert_eq!(status, StatusCode::OK);
    assert_eq!(calls(&seen), 1);

    let (status, body) = send_json(&svc, update("2", "2").body(Body::default()).unwrap()).await;
    assert_eq!(status, StatusCode::CONFLICT);
    assert_eq!(
        body,
        json!({"error": "fenced", "message": "epoch 2 is older than epoch 3 already seen by this partition"})
    );
    assert_eq!(calls(&seen), 1, "a fenced update must not reach the app");

    let (status, _) = send(&svc, update("2", "3").body(Body::default()).unwrap()).await;
    assert_eq!(status, StatusCode::OK);
    let (status, _) = send(&svc, update("3", "4").body(Body::default()).unwrap()).await;
    assert_eq!(status, StatusCode::OK);
    // Epoch 3 is now older than the 4 seen.
    let (status, _) = send(&svc, update("4", "3").body(Body::default()).unwrap()).await;
    assert_eq!(status, StatusCode::CONFLICT);
    let seen = seen.lock().unwrap();
    let epochs: Vec<u64> = seen.iter().map(|c| c.as_ref().unwrap().epoch()).collect();
    assert_eq!(epochs, [3, 3, 4]);
}

#[tokio::test]
async fn a_lower_proxy_term_is_refused_as_deposed_and_names_the_highest() {
    let (svc, seen) = inner();
    let svc = ReplayLayer::new().without_secret().layer(svc);
    let with_term = |seq: &str, term: &str| {
        update(seq, "1")
            .header("regroup-term", term)
            .body(Body::default())
            .unwrap()
    };
    let (status, _) = send(&svc, with_term("1", "7")).await;
    assert_eq!(status, StatusCode::OK);
    // A proxy that was taken over (term 6) is refused, whatever it sends.
    let resp = svc.clone().oneshot(with_term("2", "6")).await.unwrap();
    assert_eq!(resp.status(), StatusCode::CONFLICT);
    assert_eq!(resp.headers()["regroup-term"], "7");
    let body: Value = serde_json::from_str(resp.body()).unwrap();
    assert_eq!(body["error"], "deposed");
    assert_eq!(
        calls(&seen),
        1,
        "a deposed proxy's request must not reach the app"
    );
    // The same term and newer ones pass; no term at all passes too (a proxy without one).
    for (seq, term) in [("2", "7"), ("3", "9")] {
        let (status, _) = send(&svc, with_term(seq, term)).await;
        assert_eq!(status, StatusCode::OK);
    }
    let (status, _) = send(&svc, update("4", "1").body(Body::default()).unwrap()).await;
    assert_eq!(status, StatusCode::OK);
    let (status, _) = send(&svc, with_term("5", "8")).await;
    assert_eq!(status, StatusCode::CONFLICT, "8 is below the 9 seen");
    let (status, _) = send(&svc, with_term("5", "x")).await;
    assert_eq!(status, StatusCode::BAD_REQUEST);
    assert_eq!(calls(&seen), 4);
}

#[tokio::test]
async fn require_regroup_refuses_direct_updates_but_not_reads() {
    let (svc, seen) = inner();
    let svc = ReplayLayer::new().require_regroup(true).layer(svc);
    for method in [Method::POST, Method::PUT, Method::PATCH, Method::DELETE] {
        let req = Request::builder()
            .method(method.clone())
            .uri("/accounts")
            .body(Body::default())
            .unwrap();
        let (status, body) = send_json(&svc, req).await;
        assert_eq!(status, StatusCode::FORBIDDEN, "{method}");
        assert_eq!(
            body,
            json!({"error": "not_through_regroup", "message": "updates are only accepted through regroup"})
        );
    }
    assert_eq!(calls(&seen), 0);
    let (status, body) = send(
        &svc,
        Request::get("/accounts").body(Body::default()).unwrap(),
    )
    .await;
    assert_eq!((status, body.as_str()), (StatusCode::OK, "inner"));
    let (status, _) = send(&svc, update("1", "1").body(Body::default()).unwrap()).await;
    assert_eq!(status, StatusCode::OK, "an update through regroup passes");
    let seen = seen.lock().unwrap();
    assert!(seen[0].is_none());
    assert_eq!(seen[1].as_ref().map(ReplayContext::seq), Some(1));
}

// ---------------------------------------------------------------------------------------
// With a store: ExactlyOnce on SQLite
// ---------------------------------------------------------------------------------------

/// A SQLite database in a temp dir with `regroup_applied` and a table `item(id, name)`.
async fn database() -> (tempfile::TempDir, DatabaseConnection) {
    let dir = tempfile::tempdir().unwrap();
    let url = format!("sqlite://{}?mode=rwc", dir.path().join("app.db").display());
    let db = Database::connect(&url).await.unwrap();
    regroup_migrations::AppliedMigration
        .up(&SchemaManager::new(&db))
        .await
        .unwrap();
    db.execute_unprepared(
        "CREATE TABLE item (id INTEGER PRIMARY KEY AUTOINCREMENT, name TEXT NOT NULL)",
    )
    .await
    .unwrap();
    (dir, db)
}

fn ctx(seq: u64, epoch: u64) -> ReplayContext {
    ReplayContext::new(
        seq,
        Uuid::now_v7(),
        epoch,
        datetime!(2026-11-30 12:00:00 UTC),
        false,
    )
}

/// Runs a work that inserts an item named `name` and answers 201 with the new id (or, when
/// `fail`, inserts and then answers `Err` 409), counting its calls.
async fn insert_item(
    once: &ExactlyOnce,
    ctx: &ReplayContext,
    name: &str,
    fail: bool,
    calls: &Arc<AtomicUsize>,
) -> Result<Answer, RunError> {
    let calls = calls.clone();
    let name = name.to_owned();
    once.run(Some(ctx), move |txn| {
        Box::pin(async move {
            calls.fetch_add(1, Ordering::SeqCst);
            txn.execute_unprepared(&format!("INSERT INTO item (name) VALUES ('{name}')"))
                .await
                .map_err(|e| Answer::json(500, &json!({"error": e.to_string()})))?;
            let row = txn
                .query_one_raw(sea_orm::Statement::from_string(
                    txn.get_database_backend(),
                    "SELECT last_insert_rowid()",
                ))
                .await
                .unwrap()
                .unwrap();
            let id: i64 = row.try_get_by_index(0).unwrap();
            if fail {
                Err(Answer::json(409, &json!({"error": "refused", "id": id})))
            } else {
                Ok(Answer::json(201, &json!({"id": id, "name": name})))
            }
        })
    })
    .await
}

async fn items(db: &DatabaseConnection) -> Vec<String> {
    db.query_all_raw(sea_orm::Statement::from_string(
        db.get_database_backend(),
        "SELECT name FROM item ORDER BY id",
    ))
    .await
    .unwrap()
    .iter()
    .map(|r| r.try_get_by_index::<String>(0).unwrap())
    .collect()
}

#[tokio::test]
async fn applied_endpoint_answers_from_the_store() {
    let (_dir, db) = database().await;
    let once = ExactlyOnce::new(db.clone());
    let (svc, seen) = inner();
    let svc = ReplayLayer::new().with_store(once.clone()).layer(svc);
    let get = |q: &str| {
        Request::get(format!("{APPLIED_PATH}{q}"))
            .body(Body::default())
            .unwrap()
    };

    assert_eq!(
        send_json(&svc, get("")).await,
        (StatusCode::OK, json!({"applied": 0, "epoch": 0}))
    );
    let n = Arc::new(AtomicUsize::new(0));
    for seq in [1, 2] {
        let a = insert_item(&once, &ctx(seq, 1), "x", false, &n)
            .await
            .unwrap();
        assert_eq!(a.status, 201);
    }
    assert_eq!(
        send_json(&svc, get("")).await,
        (StatusCode::OK, json!({"applied": 2, "epoch": 1}))
    );
    assert_eq!(
        send_json(&svc, get("?seq=2")).await,
        (
            StatusCode::OK,
            json!({"seq": 2, "applied": true, "status": 201, "epoch": 1})
        )
    );
    assert_eq!(
        send_json(&svc, get("?seq=9")).await,
        (StatusCode::OK, json!({"seq": 9, "applied": false}))
    );
    let (status, body) = send_json(&svc, get("?seq=x")).await;
    assert_eq!(status, StatusCode::BAD_REQUEST);
    assert_eq!(body["error"], "bad_seq");
    assert_eq!(calls(&seen), 0, "the layer answers these itself");
}

#[tokio::test]
async fn layer_with_store_fences_from_the_recorded_epoch_but_lets_applied_redeliveries_through() {
    let (_dir, db) = database().await;
    let once = ExactlyOnce::new(db.clone());
    let n = Arc::new(AtomicUsize::new(0));
    insert_item(&once, &ctx(1, 1), "a", false, &n)
        .await
        .unwrap();
    insert_item(&once, &ctx(2, 2), "b", false, &n)
        .await
        .unwrap();

    // A fresh layer (a restarted app) learns epoch 2 from the store.
    let (svc, seen) = inner();
    let svc = ReplayLayer::new().with_store(once).layer(svc);
    let (status, body) = send_json(&svc, update("3", "1").body(Body::default()).unwrap()).await;
    assert_eq!(status, StatusCode::CONFLICT);
    assert_eq!(body["error"], "fenced");
    assert_eq!(calls(&seen), 0);
    // seq 1 was applied (in epoch 1): its re-delivery reaches the app, which answers it
    // from the record.
    let (status, _) = send(&svc, update("1", "1").body(Body::default()).unwrap()).await;
    assert_eq!(status, StatusCode::OK);
    assert_eq!(calls(&seen), 1);
}

#[tokio::test]
async fn exactly_once_runs_a_seq_once_and_answers_the_same_twice() {
    let (_dir, db) = database().await;
    let once = ExactlyOnce::new(db.clone());
    let n = Arc::new(AtomicUsize::new(0));
    let c = ctx(1, 1);
    let first = insert_item(&once, &c, "a", false, &n).await.unwrap();
    let second = insert_item(&once, &c, "a", false, &n).await.unwrap();
    assert_eq!(first, second);
    assert_eq!(first.status, 201);
    assert_eq!(n.load(Ordering::SeqCst), 1, "the work ran more than once");
    assert_eq!(items(&db).await, ["a"]);
    assert_eq!(once.applied().await.unwrap(), (1, 1));
}

#[tokio::test]
async fn exactly_once_failed_work_rolls_back_but_records_its_answer() {
    let (_dir, db) = database().await;
    let once = ExactlyOnce::new(db.clone());
    let n = Arc::new(AtomicUsize::new(0));
    let c = ctx(1, 1);
    let first = insert_item(&once, &c, "doomed", true, &n).await.unwrap();
    assert_eq!(first.status, 409);
    assert!(
        items(&db).await.is_empty(),
        "the failed work's insert must roll back"
    );
    let record = once.lookup(1).await.unwrap().expect("the seq is recorded");
    assert_eq!((record.seq, record.epoch), (1, 1));
    assert_eq!(record.answer, first);

    let second = insert_item(&once, &c, "doomed", true, &n).await.unwrap();
    assert_eq!(second, first);
    assert_eq!(n.load(Ordering::SeqCst), 1, "answered from the record");
    assert!(items(&db).await.is_empty());
}

#[tokio::test]
async fn exactly_once_fences_a_stale_epoch() {
    let (_dir, db) = database().await;
    let once = ExactlyOnce::new(db.clone());
    let n = Arc::new(AtomicUsize::new(0));
    insert_item(&once, &ctx(1, 2), "new", false, &n)
        .await
        .unwrap();
    let stale = insert_item(&once, &ctx(2, 1), "stale", false, &n).await;
    assert!(
        matches!(
            stale,
            Err(RunError::Fenced {
                epoch: 1,
                highest: 2
            })
        ),
        "{stale:?}"
    );
    assert_eq!(n.load(Ordering::SeqCst), 1);
    assert_eq!(items(&db).await, ["new"]);
    assert!(once.lookup(2).await.unwrap().is_none());
    assert_eq!(once.applied().await.unwrap(), (1, 2));
}

#[test]
fn contexts_with_the_same_txn_id_derive_the_same_values() {
    let txn = Uuid::now_v7();
    let now = datetime!(2026-11-30 12:00:00 UTC);
    let a = ReplayContext::new(1, txn, 1, now, false);
    let b = ReplayContext::new(1, txn, 2, now, true);
    let other = ReplayContext::new(1, Uuid::now_v7(), 1, now, false);

    let uuids = |c: &ReplayContext| (0..5).map(|_| c.uuid()).collect::<Vec<_>>();
    let (ua, ub, uo) = (uuids(&a), uuids(&b), uuids(&other));
    assert_eq!(ua, ub);
    assert_ne!(ua, uo);
    assert_eq!(
        ua.iter().collect::<std::collections::HashSet<_>>().len(),
        5,
        "the n-th UUIDs differ from each other"
    );

    let draws = |c: &ReplayContext| {
        let mut first = c.rng();
        let mut second = c.rng();
        (
            (0..4).map(|_| first.random::<u64>()).collect::<Vec<_>>(),
            (0..4).map(|_| second.random::<u64>()).collect::<Vec<_>>(),
        )
    };
    let (ra, rb, ro) = (draws(&a), draws(&b), draws(&other));
    assert_eq!(ra, rb);
    assert_ne!(ra.0, ra.1, "the second generator is a different stream");
    assert_ne!(ra.0, ro.0);
    assert_ne!(ra.1, ro.1);
}

/// `Service::call` on the layer must not need `poll_ready` of a fresh clone to differ: the
/// same service value answers several requests in a row.
#[tokio::test]
async fn one_service_value_answers_several_requests() {
    let (svc, seen) = inner();
    let mut svc = ReplayLayer::new().layer(svc);
    for seq in ["1", "2", "3"] {
        let resp = svc
            .ready()
            .await
            .unwrap()
            .call(update(seq, "1").body(Body::default()).unwrap())
            .await
            .unwrap();
        assert_eq!(resp.status(), StatusCode::OK);
    }
    assert_eq!(calls(&seen), 3);
}

#[tokio::test]
async fn exactly_once_refuses_another_transaction_at_an_applied_seq() {
    let (_dir, db) = database().await;
    let once = ExactlyOnce::new(db.clone());
    let n = Arc::new(AtomicUsize::new(0));
    let first = ctx(1, 1);
    insert_item(&once, &first, "a", false, &n).await.unwrap();
    // Same seq, another transaction: never answered from the first one's record.
    let other = ctx(1, 1);
    let r = insert_item(&once, &other, "b", false, &n).await;
    match r {
        Err(RunError::SeqConflict {
            seq: 1,
            recorded,
            offered,
        }) => {
            assert_eq!(recorded, first.txn_id().to_string());
            assert_eq!(offered, other.txn_id().to_string());
        }
        other => panic!("expected a seq conflict, got {other:?}"),
    }
    assert_eq!(n.load(Ordering::SeqCst), 1);
    assert_eq!(items(&db).await, ["a"]);
}

// ---------------------------------------------------------------------------------------
// Signed replay headers and the shared classifier
// ---------------------------------------------------------------------------------------

const SECRET: &str = "current-secret-0123456789abcdef";
const PREVIOUS: &str = "previous-secret-0123456789abcdef";

/// An update to `/transfers` with `body`, signed with `secret` when given.
fn signed_update(
    seq: &str,
    epoch: &str,
    body: &'static str,
    secret: Option<&str>,
) -> Request<Body> {
    let mut req = update(seq, epoch)
        .body(Body::from(bytes::Bytes::from_static(body.as_bytes())))
        .unwrap();
    if let Some(secret) = secret.and_then(Secret::new) {
        sign_headers(
            req.headers_mut(),
            "POST",
            "/transfers",
            body.as_bytes(),
            &secret,
        );
    }
    req
}

/// An inner service that answers with the body it was given, counting its calls.
fn echo() -> (
    impl Service<Request<Body>, Response = Response<String>, Error = Infallible, Future: Send + 'static>
    + Clone
    + Send
    + 'static,
    Arc<AtomicUsize>,
) {
    let calls = Arc::new(AtomicUsize::new(0));
    let n = calls.clone();
    let svc = service_fn(move |req: Request<Body>| {
        n.fetch_add(1, Ordering::SeqCst);
        async move {
            let body = req.into_body().collect().await.unwrap().to_bytes();
            Ok::<_, Infallible>(Response::new(String::from_utf8_lossy(&body).into_owned()))
        }
    });
    (svc, calls)
}

#[tokio::test]
async fn signed_layer_refuses_unsigned_and_wrong_signatures_and_the_fence_does_not_move() {
    let (svc, calls) = echo();
    let svc = ReplayLayer::new().with_secret(SECRET).layer(svc);

    // A forged request straight to the partition: epoch 999999, no signature.
    let (status, body) = send_json(&svc, signed_update("999999", "999999", "{}", None)).await;
    assert_eq!(status, StatusCode::FORBIDDEN);
    assert_eq!(
        body,
        json!({"error": "bad_signature", "message": "replay headers without a regroup-signature"})
    );
    // Signed with another secret.
    let (status, body) = send_json(
        &svc,
        signed_update("999999", "999999", "{}", Some("not-the-secret")),
    )
    .await;
    assert_eq!(status, StatusCode::FORBIDDEN);
    assert_eq!(body["message"], "regroup-signature does not match");
    // A signature copied from a genuine request onto another body, or another epoch.
    let genuine = signed_update("1", "1", r#"{"amount":1}"#, Some(SECRET));
    let signature = genuine.headers()["regroup-signature"].clone();
    let mut other_body = signed_update("1", "1", r#"{"amount":1000}"#, None);
    other_body
        .headers_mut()
        .insert("regroup-signature", signature.clone());
    assert_eq!(send(&svc, other_body).await.0, StatusCode::FORBIDDEN);
    let mut other_epoch = signed_update("1", "999999", r#"{"amount":1}"#, None);
    other_epoch
        .headers_mut()
        .insert("regroup-signature", signature);
    assert_eq!(send(&svc, other_epoch).await.0, StatusCode::FORBIDDEN);
    let mut garbage = signed_update("1", "1", "{}", None);
    garbage
        .headers_mut()
        .insert("regroup-signature", http::HeaderValue::from_static("zz"));
    assert_eq!(send(&svc, garbage).await.0, StatusCode::FORBIDDEN);
    assert_eq!(
        calls.load(Ordering::SeqCst),
        0,
        "a refused request must not reach the app"
    );

    // The genuine request passes with its body intact, and epoch 1 is not fenced: none of
    // the forged epochs raised the fence.
    let (status, body) = send(&svc, genuine).await;
    assert_eq!((status, body.as_str()), (StatusCode::OK, r#"{"amount":1}"#));
    assert_eq!(calls.load(Ordering::SeqCst), 1);
    // A signed request from a newer epoch raises it.
    let (status, _) = send(&svc, signed_update("2", "2", "{}", Some(SECRET))).await;
    assert_eq!(status, StatusCode::OK);
    let (status, _) = send(&svc, signed_update("3", "1", "{}", Some(SECRET))).await;
    assert_eq!(status, StatusCode::CONFLICT);
}

#[tokio::test]
async fn signed_layer_with_store_records_nothing_for_a_forged_request() {
    let (_dir, db) = database().await;
    let once = ExactlyOnce::new(db.clone());
    let (svc, calls) = echo();
    let svc = ReplayLayer::new()
        .with_secret(SECRET)
        .with_store(once.clone())
        .layer(svc);
    let (status, _) = send(&svc, signed_update("999999", "999999", "{}", None)).await;
    assert_eq!(status, StatusCode::FORBIDDEN);
    assert_eq!(calls.load(Ordering::SeqCst), 0);
    assert_eq!(once.applied().await.unwrap(), (0, 0), "no seq recorded");
    let get = Request::get(APPLIED_PATH).body(Body::default()).unwrap();
    assert_eq!(
        send_json(&svc, get).await,
        (StatusCode::OK, json!({"applied": 0, "epoch": 0}))
    );
    let (status, _) = send(&svc, signed_update("1", "1", "{}", Some(SECRET))).await;
    assert_eq!(
        status,
        StatusCode::OK,
        "the genuine seq 1 in epoch 1 is not fenced"
    );
}

#[tokio::test]
async fn signed_layer_accepts_the_previous_secret_during_a_rotation() {
    let (svc, calls) = echo();
    let rotating = ReplayLayer::new()
        .with_secret(SECRET)
        .with_previous_secret(PREVIOUS)
        .layer(svc.clone());
    for (seq, secret) in [("1", PREVIOUS), ("2", SECRET)] {
        let (status, _) = send(&rotating, signed_update(seq, "1", "{}", Some(secret))).await;
        assert_eq!(status, StatusCode::OK, "signed with {secret}");
    }
    let (status, _) = send(&rotating, signed_update("3", "1", "{}", Some("third"))).await;
    assert_eq!(status, StatusCode::FORBIDDEN);
    // Once the rotation is over, the previous secret is refused.
    let rotated = ReplayLayer::new().with_secret(SECRET).layer(svc);
    let (status, _) = send(&rotated, signed_update("3", "1", "{}", Some(PREVIOUS))).await;
    assert_eq!(status, StatusCode::FORBIDDEN);
    let (status, _) = send(&rotated, signed_update("3", "1", "{}", Some(SECRET))).await;
    assert_eq!(status, StatusCode::OK);
    assert_eq!(calls.load(Ordering::SeqCst), 3);
}

#[tokio::test]
async fn signed_layer_bounds_the_body_it_reads() {
    let (svc, calls) = echo();
    let svc = ReplayLayer::new()
        .with_secret(SECRET)
        .max_signed_body_bytes(4)
        .layer(svc);
    let (status, body) = send_json(&svc, signed_update("1", "1", "12345", Some(SECRET))).await;
    assert_eq!(status, StatusCode::PAYLOAD_TOO_LARGE);
    assert_eq!(body["error"], "body_too_large");
    assert_eq!(calls.load(Ordering::SeqCst), 0);
}

#[tokio::test]
async fn require_regroup_uses_the_shared_classifier() {
    let (svc, seen) = inner();
    let rules = [RouteRule {
        method: Some("POST".into()),
        path: "/search/**".into(),
        kind: Kind::Read,
    }];
    let svc = ReplayLayer::new()
        .require_regroup(true)
        .classifier(Classifier::new(&rules))
        .layer(svc);
    let req = |method: &str, path: &str| {
        Request::builder()
            .method(method)
            .uri(path)
            .body(Body::default())
            .unwrap()
    };
    // A POST that a route rule makes a read needs no replay headers.
    let (status, body) = send(&svc, req("POST", "/search/accounts")).await;
    assert_eq!((status, body.as_str()), (StatusCode::OK, "inner"));
    for (method, path) in [
        ("POST", "/search/../transfers"),
        ("POST", "/search/%2e%2e/transfers"),
        ("post", "/search/accounts"),
        ("MKCOL", "/dir/"),
        ("COPY", "/a"),
        ("MOVE", "/a"),
        ("PROPPATCH", "/a"),
        ("LOCK", "/a"),
        ("FROBNICATE", "/a"),
        ("GET", "/a/%2e%2e/%2e%2e/etc"),
    ] {
        let (status, _) = send(&svc, req(method, path)).await;
        assert_eq!(status, StatusCode::FORBIDDEN, "{method} {path}");
    }
    for (method, path) in [
        ("GET", "/a"),
        ("PROPFIND", "/a"),
        ("REPORT", "/a"),
        ("OPTIONS", "/"),
    ] {
        let (status, _) = send(&svc, req(method, path)).await;
        assert_eq!(status, StatusCode::OK, "{method} {path}");
    }
    assert_eq!(calls(&seen), 5);
}

#[tokio::test]
async fn layer_with_store_stamps_where_it_stands_on_every_answer() {
    let (_dir, db) = database().await;
    let once = ExactlyOnce::new(db.clone());
    let n = Arc::new(AtomicUsize::new(0));
    for seq in 1..=3 {
        insert_item(&once, &ctx(seq, 1), &format!("i{seq}"), false, &n)
            .await
            .unwrap();
    }
    // A fresh layer (a restarted copy) says where it stands by its own record, on reads too,
    // so the proxy never serves a read from a copy further behind than it allows.
    let (svc, seen) = inner();
    let svc = ReplayLayer::new()
        .without_secret()
        .with_store(once)
        .layer(svc);
    let resp = svc
        .clone()
        .oneshot(Request::get("/items").body(Body::default()).unwrap())
        .await
        .unwrap();
    assert_eq!(resp.headers()["regroup-applied"], "3");
    // The first record after start, past a gap: refused unrun, with where it stands, and the
    // fence does not rise for it (epoch 9).
    let resp = svc
        .clone()
        .oneshot(update("7", "9").body(Body::default()).unwrap())
        .await
        .unwrap();
    assert_eq!(resp.status(), StatusCode::CONFLICT);
    assert_eq!(resp.headers()["regroup-applied"], "3");
    let body: Value = serde_json::from_str(resp.body()).unwrap();
    assert_eq!(body["error"], "behind");
    assert_eq!(calls(&seen), 1);
    // Later gaps are records the journal skipped: only the first is checked.
    let resp = svc
        .clone()
        .oneshot(update("4", "1").body(Body::default()).unwrap())
        .await
        .unwrap();
    assert_eq!(resp.status(), StatusCode::OK);
    assert_eq!(resp.headers()["regroup-applied"], "4");
    assert_eq!(calls(&seen), 2);
}

/// `Regroup-Prev`: a record is applied only right after the one the sender last delivered;
/// a stale sender (it believes the copy stands elsewhere) is refused, naming where the copy
/// stands, and a re-delivery of a recorded seq still passes.
#[tokio::test]
async fn a_record_not_following_the_senders_last_is_refused_with_where_the_copy_stands() {
    let (_dir, db) = database().await;
    let once = ExactlyOnce::new(db.clone());
    let n = Arc::new(AtomicUsize::new(0));
    for seq in 1..=2 {
        insert_item(&once, &ctx(seq, 1), "x", false, &n)
            .await
            .unwrap();
    }
    let (svc, seen) = inner();
    let svc = ReplayLayer::new()
        .without_secret()
        .with_store(once)
        .layer(svc);
    let after = |seq: &str, prev: &str| {
        update(seq, "1")
            .header("regroup-prev", prev)
            .body(Body::default())
            .unwrap()
    };
    // The copy stands at 2: a sender that believes 57 is ahead of it…
    let resp = svc.clone().oneshot(after("58", "57")).await.unwrap();
    assert_eq!(resp.status(), StatusCode::CONFLICT);
    assert_eq!(resp.headers()["regroup-applied"], "2");
    let body: Value = serde_json::from_str(resp.body()).unwrap();
    assert_eq!(body["error"], "behind");
    // …one that believes 1 is behind it.
    let (status, body) = send_json(&svc, after("2x", "1")).await;
    assert_eq!(status, StatusCode::BAD_REQUEST, "{body}");
    let (status, body) = send_json(&svc, after("3", "1")).await;
    assert_eq!(
        (status, body["error"].as_str()),
        (StatusCode::CONFLICT, Some("out_of_order"))
    );
    assert_eq!(calls(&seen), 0, "a refused record must not reach the app");
    // A re-delivery of a recorded seq passes (answered from the record by the app), and so
    // does the record right after 2.
    let (status, _) = send(&svc, after("2", "1")).await;
    assert_eq!(status, StatusCode::OK);
    let (status, _) = send(&svc, after("3", "2")).await;
    assert_eq!(status, StatusCode::OK);
    let (status, _) = send(&svc, after("4", "x")).await;
    assert_eq!(status, StatusCode::BAD_REQUEST);
    assert_eq!(calls(&seen), 2);
}

/// An inner service that runs every record as an exactly-once insert of an item named after
/// its seq, slowly for the seqs in `slow`, and answers 500 unrecorded for the seqs in `fail`
/// (once each).
fn recording(
    once: ExactlyOnce,
    slow: &'static [u64],
    fail: &'static [u64],
) -> impl Service<Request<Body>, Response = Response<String>, Error = Infallible, Future: Send + 'static>
+ Clone
+ Send
+ 'static {
    let n = Arc::new(AtomicUsize::new(0));
    let fail = Arc::new(Mutex::new(fail.to_vec()));
    service_fn(move |req: Request<Body>| {
        let once = once.clone();
        let n = n.clone();
        let fail = fail.clone();
        async move {
            let Some(ctx) = req.extensions().get::<ReplayContext>().cloned() else {
                return Ok::<_, Infallible>(Response::new("no context".to_owned()));
            };
            if slow.contains(&ctx.seq()) {
                tokio::time::sleep(std::time::Duration::from_millis(150)).await;
            }
            let failing = {
                let mut fail = fail.lock().unwrap();
                let i = fail.iter().position(|s| *s == ctx.seq());
                i.map(|i| fail.remove(i)).is_some()
            };
            if failing {
                let mut resp = Response::new("crashed".to_owned());
                *resp.status_mut() = StatusCode::INTERNAL_SERVER_ERROR;
                return Ok(resp);
            }
            let answer = insert_item(&once, &ctx, &ctx.seq().to_string(), false, &n)
                .await
                .unwrap();
            let mut resp = Response::new(String::from_utf8_lossy(&answer.body).into_owned());
            *resp.status_mut() = StatusCode::from_u16(answer.status).unwrap();
            Ok(resp)
        }
    })
}

fn pipelined(seq: u64, prev: u64) -> Request<Body> {
    Request::post("/transfers")
        .header("regroup-seq", seq.to_string())
        .header("regroup-txn-id", Uuid::now_v7().to_string())
        .header("regroup-epoch", "1")
        .header("regroup-timestamp", "2026-11-30T12:00:00.123456Z")
        .header("regroup-prev", prev.to_string())
        .header("regroup-pipelined", "1")
        .body(Body::default())
        .unwrap()
}

/// `Regroup-Pipelined`: records sent one behind the other without waiting for answers are
/// executed one at a time in seq order, even when the later one arrives first; a successor
/// whose predecessor finished unrecorded is refused at once, and one whose predecessor never
/// comes is refused after the bound. Without the header, nothing waits.
#[tokio::test]
async fn a_pipelined_record_waits_for_its_predecessor_and_runs_after_it() {
    let (_dir, db) = database().await;
    let once = ExactlyOnce::new(db.clone());
    let svc = ReplayLayer::new()
        .without_secret()
        .predecessor_wait(std::time::Duration::from_millis(400))
        .with_store(once.clone())
        .layer(recording(once, &[1], &[4]));
    // 2 (behind 1) arrives first, and 1 is slow: 2 waits and runs after it.
    let second = tokio::spawn(svc.clone().oneshot(pipelined(2, 1)));
    tokio::time::sleep(std::time::Duration::from_millis(20)).await;
    let first = svc.clone().oneshot(pipelined(1, 0)).await.unwrap();
    let second = second.await.unwrap().unwrap();
    assert_eq!(first.status(), StatusCode::CREATED, "{}", first.body());
    assert_eq!(second.status(), StatusCode::CREATED, "{}", second.body());
    assert_eq!(second.headers()["regroup-applied"], "2");
    assert_eq!(items(&db).await, ["1", "2"], "executed in seq order");
    let (status, body) = send_json(&svc, pipelined(3, 2)).await;
    assert_eq!(status, StatusCode::CREATED, "{body}");
    // 5 behind 4, and 4 fails unrecorded: 5 is refused as soon as 4 has finished.
    let started = std::time::Instant::now();
    let fifth = tokio::spawn(svc.clone().oneshot(pipelined(5, 4)));
    tokio::time::sleep(std::time::Duration::from_millis(20)).await;
    let fourth = svc.clone().oneshot(pipelined(4, 3)).await.unwrap();
    assert_eq!(
        fourth.status(),
        StatusCode::INTERNAL_SERVER_ERROR,
        "{}",
        fourth.body()
    );
    let fifth = fifth.await.unwrap().unwrap();
    assert_eq!(fifth.status(), StatusCode::CONFLICT, "{}", fifth.body());
    let body: Value = serde_json::from_str(fifth.body()).unwrap();
    assert_eq!(body["error"], "behind");
    assert!(started.elapsed() < std::time::Duration::from_millis(300));
    // 4 failed with 500 and recorded nothing; 3 is the copy's last.
    let (status, body) = send_json(&svc, pipelined(4, 3)).await;
    assert_eq!(status, StatusCode::CREATED, "{body}");
    // A predecessor that never comes: refused after the bound, not before.
    let started = std::time::Instant::now();
    let (status, body) = send_json(&svc, pipelined(9, 8)).await;
    assert_eq!(
        (status, body["error"].as_str()),
        (StatusCode::CONFLICT, Some("behind"))
    );
    assert!(started.elapsed() >= std::time::Duration::from_millis(400));
    // Without the header a record ahead of the copy is refused at once.
    let started = std::time::Instant::now();
    let req = update("9", "1")
        .header("regroup-prev", "8")
        .body(Body::default())
        .unwrap();
    let (status, _) = send_json(&svc, req).await;
    assert_eq!(status, StatusCode::CONFLICT);
    assert!(started.elapsed() < std::time::Duration::from_millis(300));
    assert_eq!(items(&db).await, ["1", "2", "3", "4"]);
}

// ---------------------------------------------------------------------------------------
// Parallel replay: Regroup-After and Regroup-Floor
// ---------------------------------------------------------------------------------------

/// [`database`] with the `floor` column parallel replay needs.
async fn database_with_floors() -> (tempfile::TempDir, DatabaseConnection) {
    let (dir, db) = database().await;
    regroup_migrations::AppliedFloorMigration
        .up(&SchemaManager::new(&db))
        .await
        .unwrap();
    (dir, db)
}

/// A replay of `seq` (the same transaction id for the same seq) sent behind only the
/// records of `after`, with `floor`.
fn parallel(seq: u64, after: &str, floor: u64, epoch: u64) -> Request<Body> {
    let txn = Uuid::from_u128(0x0190_b6e0_0000_7000_8000_0000_0000_0000 + u128::from(seq));
    Request::post("/transfers")
        .header("regroup-seq", seq.to_string())
        .header("regroup-txn-id", txn.to_string())
        .header("regroup-epoch", epoch.to_string())
        .header("regroup-timestamp", "2026-11-30T12:00:00.123456Z")
        .header("regroup-replay", "1")
        .header("regroup-after", after)
        .header("regroup-floor", floor.to_string())
        .header("regroup-pipelined", "1")
        .body(Body::default())
        .unwrap()
}

async fn position<S>(svc: &S) -> Value
where
    S: Service<Request<Body>, Response = Response<String>, Error = Infallible> + Clone,
{
    let (status, body) = send_json(
        svc,
        Request::get(APPLIED_PATH).body(Body::default()).unwrap(),
    )
    .await;
    assert_eq!(status, StatusCode::OK, "{body}");
    body
}

/// A record sent in parallel waits only for the records it names: an independent one runs
/// beside a slow one, a dependent one after it. `/_regroup/applied` reports where a sender
/// resumes (the highest floor held), beside the highest seq. A record whose dependency
/// finished unrecorded is refused at once, and the first after a restart whose floor is
/// above what the copy recorded is refused as `behind`; nothing runs for either.
#[tokio::test]
async fn records_sent_in_parallel_wait_only_for_those_they_conflict_with() {
    let (_dir, db) = database_with_floors().await;
    let once = ExactlyOnce::new(db.clone());
    let svc = ReplayLayer::new()
        .without_secret()
        .predecessor_wait(std::time::Duration::from_millis(400))
        .with_store(once.clone())
        .layer(recording(once, &[1], &[5]));
    let before = position(&svc).await;
    assert_eq!(
        (before["applied"].as_u64(), before["resume"].as_u64()),
        (Some(0), Some(0))
    );
    // 1 is slow; 2 depends on nothing and 3 on 1.
    let first = tokio::spawn(svc.clone().oneshot(parallel(1, "", 0, 1)));
    tokio::time::sleep(std::time::Duration::from_millis(20)).await;
    let third = tokio::spawn(svc.clone().oneshot(parallel(3, "1", 0, 1)));
    let (status, body) = send_json(&svc, parallel(2, "", 0, 1)).await;
    assert_eq!(status, StatusCode::CREATED, "{body}");
    let first = first.await.unwrap().unwrap();
    let third = third.await.unwrap().unwrap();
    assert_eq!(first.status(), StatusCode::CREATED, "{}", first.body());
    assert_eq!(third.status(), StatusCode::CREATED, "{}", third.body());
    assert_eq!(
        items(&db).await,
        ["2", "1", "3"],
        "2 ran beside the slow 1, 3 after it"
    );
    // The floors sent were 0: a sender resumes from 0 (those above are answered from
    // their records when they come again).
    let now = position(&svc).await;
    assert_eq!(
        (now["applied"].as_u64(), now["resume"].as_u64()),
        (Some(3), Some(0))
    );
    let (status, body) = send_json(&svc, parallel(4, "", 3, 1)).await;
    assert_eq!(status, StatusCode::CREATED, "{body}");
    assert_eq!(position(&svc).await["resume"].as_u64(), Some(3));
    // A re-delivery is answered from its record, whatever it names.
    let (status, body) = send_json(&svc, parallel(2, "1", 0, 1)).await;
    assert_eq!(status, StatusCode::CREATED, "{body}");
    // 6 behind 5, and 5 fails unrecorded: 6 is refused as soon as 5 has finished.
    let started = std::time::Instant::now();
    let sixth = tokio::spawn(svc.clone().oneshot(parallel(6, "5", 4, 1)));
    tokio::time::sleep(std::time::Duration::from_millis(20)).await;
    let fifth = svc.clone().oneshot(parallel(5, "", 4, 1)).await.unwrap();
    assert_eq!(fifth.status(), StatusCode::INTERNAL_SERVER_ERROR);
    let sixth = sixth.await.unwrap().unwrap();
    let body: Value = serde_json::from_str(sixth.body()).unwrap();
    assert_eq!(
        (sixth.status(), body["error"].as_str()),
        (StatusCode::CONFLICT, Some("out_of_order")),
        "{body}"
    );
    assert!(started.elapsed() < std::time::Duration::from_millis(300));
    // Later, a floor above the highest recorded is the journal's skipped records.
    let (status, body) = send_json(&svc, parallel(8, "", 7, 1)).await;
    assert_eq!(status, StatusCode::CREATED, "{body}");
    // After a restart, a floor above where the copy is dense (its resume, 7): it may stand
    // behind where the sender thinks (a restored older copy), until a floor passes.
    let once = ExactlyOnce::new(db.clone());
    let restarted = ReplayLayer::new()
        .without_secret()
        .with_store(once.clone())
        .layer(recording(once, &[], &[]));
    let (status, body) = send_json(&restarted, parallel(20, "", 10, 1)).await;
    assert_eq!(
        (status, body["error"].as_str()),
        (StatusCode::CONFLICT, Some("behind")),
        "{body}"
    );
    let (status, body) = send_json(&restarted, parallel(9, "", 7, 1)).await;
    assert_eq!(status, StatusCode::CREATED, "{body}");
    let (status, body) = send_json(&restarted, parallel(20, "", 10, 1)).await;
    assert_eq!(status, StatusCode::CREATED, "once one passed: {body}");
    // Malformed order headers: 400, nothing runs.
    let (status, _) = send_json(&svc, parallel(7, "x", 4, 1)).await;
    assert_eq!(status, StatusCode::BAD_REQUEST);
    let (status, _) = send_json(&svc, parallel(7, "8", 4, 1)).await;
    assert_eq!(
        status,
        StatusCode::BAD_REQUEST,
        "a dependency after the record"
    );
    assert_eq!(items(&db).await, ["2", "1", "3", "4", "8", "9", "20"]);
}

/// A copy whose `regroup_applied` has no floor column offers no parallel replay: its
/// `/_regroup/applied` has no `resume`, and a record sent in parallel is refused unrun.
#[tokio::test]
async fn a_copy_without_the_floor_column_refuses_records_sent_in_parallel() {
    let (_dir, db) = database().await;
    let once = ExactlyOnce::new(db.clone());
    let svc = ReplayLayer::new()
        .without_secret()
        .with_store(once.clone())
        .layer(recording(once, &[], &[]));
    assert_eq!(position(&svc).await.get("resume"), None);
    let (status, body) = send_json(&svc, parallel(1, "", 0, 1)).await;
    assert_eq!(
        (status, body["error"].as_str()),
        (StatusCode::CONFLICT, Some("out_of_order")),
        "{body}"
    );
    assert!(
        body["message"]
            .as_str()
            .is_some_and(|m| m.contains("AppliedFloorMigration")),
        "{body}"
    );
    assert!(items(&db).await.is_empty());
}

/// Out of seq order, an older epoch below a newer one is no sign of a deposed sender: the
/// record is fenced only by the records below it.
#[tokio::test]
async fn exactly_once_fences_a_record_out_of_order_only_by_the_records_below_it() {
    let (_dir, db) = database_with_floors().await;
    let once = ExactlyOnce::new(db.clone());
    let calls = Arc::new(AtomicUsize::new(0));
    let at = |seq, epoch| ctx(seq, epoch).with_floor(Some(0));
    insert_item(&once, &at(8, 2), "8", false, &calls)
        .await
        .unwrap();
    insert_item(&once, &at(7, 1), "7", false, &calls)
        .await
        .unwrap();
    match insert_item(&once, &at(9, 1), "9", false, &calls).await {
        Err(RunError::Fenced {
            epoch: 1,
            highest: 2,
        }) => {}
        other => panic!("seq 9 of epoch 1 after seq 8 of epoch 2: {other:?}"),
    }
    assert_eq!(items(&db).await, ["8", "7"]);
    assert_eq!(once.resume().await.unwrap(), Some(0));
}

/// A store that cannot be read: its layer cannot tell what is recorded.
struct Unreadable;

#[async_trait::async_trait]
impl regroup_replay::AppliedStore for Unreadable {
    async fn applied(&self) -> Result<(u64, u64), String> {
        Err("the database is down".into())
    }
    async fn lookup(&self, _: u64) -> Result<Option<regroup_replay::AppliedRecord>, String> {
        Err("the database is down".into())
    }
    async fn resume(&self) -> Result<Option<u64>, String> {
        Ok(Some(0))
    }
}

/// Out of seq order nothing runs unchecked: while the layer cannot read its record, a
/// record sent in parallel is refused (the sender tries again) and the handler never runs.
#[tokio::test]
async fn a_record_sent_in_parallel_is_refused_while_the_record_cannot_be_read() {
    let (svc, seen) = inner();
    let svc = ReplayLayer::new()
        .without_secret()
        .with_store(Unreadable)
        .layer(svc);
    let (status, body) = send_json(&svc, parallel(3, "1", 0, 1)).await;
    assert_eq!(
        (status, body["error"].as_str()),
        (StatusCode::CONFLICT, Some("out_of_order")),
        "{body}"
    );
    assert_eq!(calls(&seen), 0);
}
