//! The conformance suite every journal implementation passes.
//!
//! [`run`] takes a factory of handles on one fresh, empty store: the first handle runs the
//! log, role and checkpoint checks (each in a group of its own), and two handles (two
//! "processes" on the same store) run the lease checks, which end with the lease released.
//! Every failed check is reported, named, in the returned error.
//!
//! It covers: dense appends and gaps (with the expected and offered seq), a re-appended
//! seq, one seal per record (the same outcome again is fine, another is a conflict, an
//! unknown seq is no such record), restamps (executors added sorted and once, refused on a
//! sealed record), opening a log (pending becomes in doubt, unsealed records returned with
//! their executors), `read_after` order and limit, the round trip of every field of a
//! record, role creation and compare-and-set, checkpoints (which may go down), quarantine
//! (set and cleared, keeping the checkpoint), and the lease: claim, a second claim refused
//! naming the holder, renew, release, takeover after expiry with a higher token, and every
//! write kind of a fenced handle refused without effect; retention (`truncate` removes
//! sealed records up to a seq but never the newest one, refuses an unsealed one, keeps
//! appends dense; `low_water` says what is gone).

use std::future::Future;
use std::time::Duration;

use bytes::Bytes;
use time::macros::datetime;
use uuid::Uuid;

use super::{Journal, JournalError, MemberSpec, Outcome, Owner, StoredRole};
use crate::record::{
    Fingerprint, Record, RecordState, RecordedRequest, SqlStatement, SqlTransaction, SqlValue,
};

/// Runs every check. `open` gives a new handle on the same store each time it is called
/// (as another process connecting to the same database would); the store must be empty.
pub async fn run<J, F, Fut>(open: F) -> Result<(), String>
where
    J: Journal,
    F: Fn() -> Fut,
    Fut: Future<Output = Result<J, JournalError>>,
{
    let j = open().await.map_err(|e| format!("opening a handle: {e}"))?;
    let mut failures = Vec::new();
    let mut note = |name: &str, result: Result<(), String>| {
        if let Err(e) = result {
            failures.push(format!("{name}: {e}"));
        }
    };
    note("appends are dense", appends_are_dense(&j).await);
    note("one seal per record", one_seal_per_record(&j).await);
    note("restamp", restamp(&j).await);
    note("open_log", open_log(&j).await);
    note("read_after", read_after(&j).await);
    note("record round trip", round_trip(&j).await);
    note("sql payload round trip", sql_round_trip(&j).await);
    note("role", role(&j).await);
    note("checkpoints", checkpoints(&j).await);
    note("quarantine", quarantine(&j).await);
    note("membership", membership(&j).await);
    note("truncate", truncate(&j).await);
    let b = open()
        .await
        .map_err(|e| format!("opening a second handle: {e}"))?;
    note("lease", lease(&j, &b).await);
    let mut racers = Vec::new();
    for _ in 0..CLAIMERS {
        racers.push(
            open()
                .await
                .map_err(|e| format!("opening a racing handle: {e}"))?,
        );
    }
    note("claims race", claims_race(&racers).await);
    if failures.is_empty() {
        Ok(())
    } else {
        Err(failures.join("\n"))
    }
}

/// Names the step of a check that failed.
trait Step<T> {
    fn at(self, step: &str) -> Result<T, String>;
}

impl<T> Step<T> for Result<T, JournalError> {
    fn at(self, step: &str) -> Result<T, String> {
        self.map_err(|e| format!("{step}: unexpected error: {e}"))
    }
}

fn ensure_eq<T: PartialEq + std::fmt::Debug>(got: T, want: T, what: &str) -> Result<(), String> {
    if got == want {
        Ok(())
    } else {
        Err(format!("{what}: got {got:?}, want {want:?}"))
    }
}

fn ensure(cond: bool, what: impl FnOnce() -> String) -> Result<(), String> {
    if cond { Ok(()) } else { Err(what()) }
}

fn request(body: &str) -> RecordedRequest {
    RecordedRequest {
        method: "POST".into(),
        uri: "/accounts".into(),
        headers: vec![],
        body: Bytes::from(body.to_owned()),
    }
}

fn record(group: &str, seq: u64) -> Record {
    Record::pending(group, seq, 1, request(&format!("{{\"seq\":{seq}}}")))
}

async fn fill<J: Journal>(j: &J, group: &str, n: u64) -> Result<(), String> {
    for seq in 1..=n {
        j.append(&record(group, seq))
            .await
            .at(&format!("append {group} {seq}"))?;
    }
    Ok(())
}

fn is_gap(r: Result<(), JournalError>, expected: u64, got: u64) -> Result<(), String> {
    match r {
        Err(JournalError::Gap {
            expected: e,
            got: g,
            ..
        }) if (e, g) == (expected, got) => Ok(()),
        other => Err(format!(
            "appending {got}: got {other:?}, want Gap {{ expected: {expected}, got: {got} }}"
        )),
    }
}

fn is_conflict<T: std::fmt::Debug>(r: Result<T, JournalError>, what: &str) -> Result<(), String> {
    match r {
        Err(JournalError::Conflict { .. }) => Ok(()),
        other => Err(format!("{what}: got {other:?}, want Conflict")),
    }
}

fn is_fenced<T: std::fmt::Debug>(
    r: Result<T, JournalError>,
    holder: &str,
    what: &str,
) -> Result<(), String> {
    match r {
        Err(JournalError::Fenced { holder: h }) if h == holder => Ok(()),
        other => Err(format!(
            "{what}: got {other:?}, want Fenced naming {holder:?}"
        )),
    }
}

async fn appends_are_dense<J: Journal>(j: &J) -> Result<(), String> {
    let g = "c-append";
    is_gap(j.append(&record(g, 2)).await, 1, 2)?;
    is_gap(j.append(&record(g, 0)).await, 1, 0)?;
    fill(j, g, 2).await?;
    is_gap(j.append(&record(g, 5)).await, 3, 5)?;
    // A taken seq is refused and leaves the stored record alone.
    let again = record(g, 2);
    is_gap(j.append(&again).await, 3, 2)?;
    let stored = j.record(g, 2).await.at("record 2")?;
    ensure(stored.is_some_and(|r| r.txn_id != again.txn_id), || {
        "re-appending seq 2 replaced the stored record".into()
    })?;
    // Whatever the offered state, an appended record is pending with no answer.
    let mut sealed = record(g, 3);
    sealed.state = RecordState::Executed;
    sealed.fingerprint = Some(Fingerprint::of(200, b"no"));
    j.append(&sealed).await.at("append 3")?;
    let stored = j.read_after(g, 2, 10).await.at("read_after 2")?;
    ensure_eq(
        stored
            .iter()
            .map(|r| (r.state, r.fingerprint.clone()))
            .collect(),
        vec![(RecordState::Pending, None)],
        "record appended as executed",
    )?;
    ensure_eq(
        j.open_log(g).await.at("open_log")?.head,
        3,
        "head after 3 appends",
    )
}

async fn one_seal_per_record<J: Journal>(j: &J) -> Result<(), String> {
    let g = "c-seal";
    fill(j, g, 3).await?;
    let fp = Fingerprint::of(201, b"created");
    let executed = Outcome::Executed(Some(fp.clone()));
    j.seal(g, 1, &executed).await.at("seal 1")?;
    j.seal(g, 1, &executed)
        .await
        .at("seal 1 again, same outcome")?;
    is_conflict(j.seal(g, 1, &Outcome::Skipped).await, "seal 1 skipped")?;
    is_conflict(
        j.seal(
            g,
            1,
            &Outcome::Executed(Some(Fingerprint::of(201, b"other"))),
        )
        .await,
        "seal 1 with another answer",
    )?;
    is_conflict(
        j.seal(g, 1, &Outcome::Executed(None)).await,
        "seal 1 with no answer",
    )?;
    j.seal(g, 2, &Outcome::Skipped).await.at("seal 2")?;
    j.seal(g, 2, &Outcome::Skipped).await.at("seal 2 again")?;
    is_conflict(j.seal(g, 2, &executed).await, "seal 2 executed")?;
    j.seal(g, 3, &Outcome::Executed(None)).await.at("seal 3")?;
    j.seal(g, 3, &Outcome::Executed(None))
        .await
        .at("seal 3 again")?;
    match j.seal(g, 9, &Outcome::Skipped).await {
        Err(JournalError::NoSuchRecord { seq: 9, .. }) => {}
        other => return Err(format!("seal 9: got {other:?}, want NoSuchRecord")),
    }
    let all = j.read_after(g, 0, 10).await.at("read_after")?;
    ensure_eq(
        all.iter()
            .map(|r| (r.seq, r.state, r.fingerprint.clone()))
            .collect(),
        vec![
            (1, RecordState::Executed, Some(fp)),
            (2, RecordState::Skipped, None),
            (3, RecordState::Executed, None),
        ],
        "sealed records",
    )
}

async fn restamp<J: Journal>(j: &J) -> Result<(), String> {
    let g = "c-restamp";
    fill(j, g, 2).await?;
    j.restamp(g, 1, 2, "b").await.at("restamp 1 b")?;
    j.restamp(g, 1, 3, "a").await.at("restamp 1 a")?;
    j.restamp(g, 1, 3, "b").await.at("restamp 1 b again")?;
    let r = j.record(g, 1).await.at("record 1")?;
    ensure_eq(
        r.map(|r| (r.epoch, r.executors, r.state)),
        Some((
            3,
            vec!["a".to_owned(), "b".to_owned()],
            RecordState::Pending,
        )),
        "restamped record",
    )?;
    j.seal(g, 1, &Outcome::Skipped).await.at("seal 1")?;
    is_conflict(j.restamp(g, 1, 4, "c").await, "restamp a sealed record")?;
    let r = j.record(g, 1).await.at("record 1")?;
    ensure_eq(
        r.map(|r| (r.epoch, r.executors.len())),
        Some((3, 2)),
        "a refused restamp",
    )?;
    match j.restamp(g, 9, 2, "b").await {
        Err(JournalError::NoSuchRecord { seq: 9, .. }) => Ok(()),
        other => Err(format!("restamp 9: got {other:?}, want NoSuchRecord")),
    }
}

async fn open_log<J: Journal>(j: &J) -> Result<(), String> {
    let empty = j.open_log("c-open-empty").await.at("open an empty log")?;
    ensure_eq((empty.head, empty.unsealed.len()), (0, 0), "an empty log")?;
    let g = "c-open";
    fill(j, g, 4).await?;
    j.seal(g, 1, &Outcome::Skipped).await.at("seal 1")?;
    j.restamp(g, 2, 2, "b").await.at("restamp 2")?;
    j.seal(g, 4, &Outcome::Executed(None)).await.at("seal 4")?;
    let log = j.open_log(g).await.at("open_log")?;
    ensure_eq(log.head, 4, "head")?;
    ensure_eq(
        log.unsealed
            .iter()
            .map(|r| (r.seq, r.state, r.epoch, r.executors.clone()))
            .collect(),
        vec![
            (2, RecordState::InDoubt, 2, vec!["b".to_owned()]),
            (3, RecordState::InDoubt, 1, vec![]),
        ],
        "unsealed records",
    )?;
    // Stored as in doubt, and an in-doubt record can still be sealed.
    ensure_eq(
        j.record(g, 3).await.at("record 3")?.map(|r| r.state),
        Some(RecordState::InDoubt),
        "stored state of 3",
    )?;
    j.seal(g, 3, &Outcome::Skipped)
        .await
        .at("seal in-doubt 3")?;
    let log = j.open_log(g).await.at("open_log again")?;
    ensure_eq(
        log.unsealed.iter().map(|r| r.seq).collect(),
        vec![2],
        "unsealed after sealing 3",
    )
}

async fn truncate<J: Journal>(j: &J) -> Result<(), String> {
    let g = "c-truncate";
    let seqs = |v: Vec<Record>| v.into_iter().map(|r| r.seq).collect::<Vec<_>>();
    ensure_eq(
        j.low_water(g).await.at("low_water of nothing")?,
        0,
        "low water of an empty log",
    )?;
    fill(j, g, 10).await?;
    for seq in 1..=9 {
        j.seal(g, seq, &Outcome::Executed(None))
            .await
            .at(&format!("seal {seq}"))?;
    }
    ensure_eq(
        j.truncate(g, 3).await.at("truncate through 3")?,
        3,
        "removed through 3",
    )?;
    ensure_eq(
        j.low_water(g).await.at("low_water")?,
        3,
        "low water after 3",
    )?;
    ensure_eq(
        j.record(g, 2).await.at("record 2")?,
        None,
        "a truncated record",
    )?;
    ensure_eq(
        seqs(j.read_after(g, 0, 3).await.at("read_after 0")?),
        vec![4, 5, 6],
        "read_after below the low water",
    )?;
    ensure_eq(
        j.truncate(g, 2).await.at("truncate again")?,
        0,
        "truncating what is gone",
    )?;
    // Record 10 is pending and 11 too: 10 is in range and unsealed, so nothing goes.
    j.append(&record(g, 11)).await.at("append 11")?;
    is_conflict(j.truncate(g, 10).await, "truncating an unsealed record")?;
    ensure_eq(
        j.low_water(g).await.at("low_water")?,
        3,
        "low water after a refusal",
    )?;
    j.seal(g, 10, &Outcome::Skipped).await.at("seal 10")?;
    j.seal(g, 11, &Outcome::Executed(None))
        .await
        .at("seal 11")?;
    // Through past the head: everything but the newest record.
    ensure_eq(
        j.truncate(g, 100).await.at("truncate through 100")?,
        7,
        "removed 4..=10",
    )?;
    ensure_eq(
        j.low_water(g).await.at("low_water")?,
        10,
        "low water keeps the newest",
    )?;
    ensure_eq(
        j.open_log(g).await.at("open_log")?.head,
        11,
        "head after truncation",
    )?;
    is_gap(j.append(&record(g, 5)).await, 12, 5)?;
    j.append(&record(g, 12))
        .await
        .at("append 12 after truncation")?;
    ensure_eq(
        seqs(j.read_after(g, 0, 10).await.at("read_after 0")?),
        vec![11, 12],
        "what is left",
    )
}

async fn read_after<J: Journal>(j: &J) -> Result<(), String> {
    let g = "c-read";
    fill(j, g, 5).await?;
    fill(j, "c-read-other", 2).await?;
    let seqs = |v: Vec<Record>| v.into_iter().map(|r| r.seq).collect::<Vec<_>>();
    for (after, limit, want) in [
        (0, 10, vec![1, 2, 3, 4, 5]),
        (0, 2, vec![1, 2]),
        (2, 2, vec![3, 4]),
        (4, 10, vec![5]),
        (5, 3, vec![]),
        (9, 3, vec![]),
        (1, 0, vec![]),
        (3, u64::MAX, vec![4, 5]),
    ] {
        let got = j
            .read_after(g, after, limit)
            .await
            .at(&format!("read_after {after} limit {limit}"))?;
        ensure_eq(
            seqs(got),
            want,
            &format!("read_after {after} limit {limit}"),
        )?;
    }
    ensure_eq(
        seqs(
            j.read_after("c-read-nothing", 0, 10)
                .await
                .at("unknown group")?,
        ),
        vec![],
        "an unknown group",
    )?;
    ensure_eq(
        j.record("c-read-nothing", 1).await.at("unknown record")?,
        None,
        "an unknown record",
    )
}

async fn round_trip<J: Journal>(j: &J) -> Result<(), String> {
    let g = "c-round-trip";
    let mut r = Record::pending(
        g,
        1,
        7,
        RecordedRequest {
            method: "PATCH".into(),
            uri: "/accounts/7?note=caf%C3%A9&x=1".into(),
            headers: vec![
                ("content-type".into(), "application/json".into()),
                ("x-note".into(), "café \"quoted\"".into()),
                ("x-note".into(), "second".into()),
            ],
            body: Bytes::from_static(&[0, 1, 2, 0xff, 0xfe, b'{', b'}', 0]),
        },
    );
    r.txn_id = Uuid::from_u128(0x0192_3456_789a_7bcd_8ef0_1234_5678_9abc);
    r.timestamp = datetime!(2026-03-04 05:06:07.123456 UTC);
    r.executors = vec!["a".into()];
    j.append(&r).await.at("append")?;
    ensure_eq(
        j.record(g, 1).await.at("record pending")?,
        Some(r.clone()),
        "the pending record",
    )?;
    let fp = Fingerprint::of(207, b"multi");
    j.seal(g, 1, &Outcome::Executed(Some(fp.clone())))
        .await
        .at("seal")?;
    r.state = RecordState::Executed;
    r.fingerprint = Some(fp);
    ensure_eq(
        j.record(g, 1).await.at("record sealed")?,
        Some(r.clone()),
        "the sealed record",
    )?;
    ensure_eq(
        j.read_after(g, 0, 1).await.at("read_after")?,
        vec![r],
        "the sealed record read after 0",
    )
}

/// A SQL mode payload (statements, typed values and NULLs, counts, the running hash)
/// comes back exactly as appended, pending and sealed, beside an HTTP record.
async fn sql_round_trip<J: Journal>(j: &J) -> Result<(), String> {
    let g = "c-sql-round-trip";
    fill(j, g, 1).await?;
    let t = SqlTransaction {
        dialect: "postgres".into(),
        statements: vec![
            SqlStatement {
                sql: "UPDATE accounts SET balance = balance - $1, note = $2 WHERE id = $3".into(),
                values: vec![
                    SqlValue::BigInt(Some(-9_007_199_254_740_993)),
                    SqlValue::String(Some("café \"quoted\" 'x'".into())),
                    SqlValue::Int(None),
                ],
                rows_affected: Some(1),
            },
            SqlStatement {
                sql: "INSERT INTO t (b, f, u, c, z) VALUES (?, ?, ?, ?, ?) RETURNING id".into(),
                values: vec![
                    SqlValue::Bytes(Some("00ff10".into())),
                    SqlValue::Double(Some("0.1".into())),
                    SqlValue::BigUnsigned(Some(u64::MAX)),
                    SqlValue::Char(Some('é')),
                    SqlValue::Bool(Some(false)),
                ],
                rows_affected: None,
            },
        ],
        hash: "ab".repeat(32),
    };
    let mut r = Record::pending(g, 2, 3, t);
    r.executors = vec!["a".into()];
    j.append(&r).await.at("append")?;
    ensure_eq(
        j.record(g, 2).await.at("record pending")?,
        Some(r.clone()),
        "the pending sql record",
    )?;
    j.seal(g, 2, &Outcome::Executed(None)).await.at("seal")?;
    r.state = RecordState::Executed;
    let read = j.read_after(g, 0, 5).await.at("read_after")?;
    ensure_eq(read.len(), 2, "records read")?;
    ensure(
        matches!(read[0].payload, crate::record::Payload::Http(_)),
        || "the http record before it stays http".to_owned(),
    )?;
    ensure_eq(read.get(1).cloned(), Some(r), "the sealed sql record")
}

async fn role<J: Journal>(j: &J) -> Result<(), String> {
    let g = "c-role";
    let a1 = StoredRole {
        epoch: 1,
        primary: "a".into(),
    };
    ensure_eq(
        j.role(g, "a").await.at("create")?,
        a1.clone(),
        "a new group",
    )?;
    ensure_eq(
        j.role(g, "z").await.at("role again")?,
        a1.clone(),
        "an existing group",
    )?;
    let b2 = StoredRole {
        epoch: 2,
        primary: "b".into(),
    };
    is_conflict(j.set_role(g, 2, &b2).await, "wrong expected epoch")?;
    is_conflict(
        j.set_role(
            g,
            1,
            &StoredRole {
                epoch: 1,
                primary: "b".into(),
            },
        )
        .await,
        "an epoch that is not higher",
    )?;
    ensure_eq(
        j.role(g, "z").await.at("role")?,
        a1,
        "after refused changes",
    )?;
    j.set_role(g, 1, &b2).await.at("set epoch 2")?;
    is_conflict(j.set_role(g, 1, &b2).await, "the same change twice")?;
    is_conflict(
        j.set_role(
            g,
            2,
            &StoredRole {
                epoch: 1,
                primary: "a".into(),
            },
        )
        .await,
        "a lower epoch",
    )?;
    ensure_eq(j.role(g, "z").await.at("role")?, b2, "after epoch 2")?;
    let state = j.open_group(g, "z").await.at("open_group")?;
    ensure_eq(
        (state.role.epoch, state.role.primary.as_str()),
        (2, "b"),
        "open_group",
    )?;
    // A role is created by `role`, never by a compare-and-set on a group nobody opened.
    is_conflict(
        j.set_role(
            "c-role-unknown",
            0,
            &StoredRole {
                epoch: 1,
                primary: "a".into(),
            },
        )
        .await,
        "set_role on an unknown group",
    )
}

fn member(name: &str, host: Option<&str>) -> MemberSpec {
    MemberSpec {
        name: name.into(),
        url: format!("http://127.0.0.1:1/{name}"),
        host: host.map(str::to_owned),
        priority: 3,
    }
}

async fn membership<J: Journal>(j: &J) -> Result<(), String> {
    let g = "c-members";
    ensure_eq(
        j.members(g).await.at("unknown group")?,
        None,
        "unknown group",
    )?;
    is_conflict(
        j.set_members(g, 0, &[member("a", None)]).await,
        "set_members on a group nobody opened",
    )?;
    j.role(g, "a").await.at("create the group")?;
    ensure_eq(j.members(g).await.at("new group")?, None, "never stored")?;
    let one = vec![member("a", Some("h1")), member("b", None)];
    ensure_eq(
        j.set_members(g, 0, &one).await.at("seed")?,
        1,
        "first version",
    )?;
    is_conflict(j.set_members(g, 0, &one).await, "seeding twice")?;
    is_conflict(j.set_members(g, 2, &one).await, "a version ahead")?;
    let stored = j.members(g).await.at("members")?;
    ensure_eq(
        stored.as_ref().map(|m| (m.version, m.partitions.clone())),
        Some((1, one.clone())),
        "stored membership round trip (names, urls, hosts, priorities, order)",
    )?;
    let two = vec![
        member("b", None),
        member("c", Some("h2")),
        member("a", Some("h1")),
    ];
    ensure_eq(
        j.set_members(g, 1, &two).await.at("change")?,
        2,
        "second version",
    )?;
    is_conflict(j.set_members(g, 1, &one).await, "a stale version")?;
    ensure_eq(
        j.members(g)
            .await
            .at("members")?
            .map(|m| (m.version, m.partitions)),
        Some((2, two)),
        "after a change and a refused stale one",
    )?;
    let other = "c-members-other";
    j.role(other, "x").await.at("create another group")?;
    ensure_eq(j.members(other).await.at("other")?, None, "another group")
}

async fn checkpoints<J: Journal>(j: &J) -> Result<(), String> {
    let g = "c-checkpoint";
    ensure_eq(j.checkpoint(g, "b").await.at("unknown")?, 0, "never saved")?;
    j.save_checkpoint(g, "b", 5).await.at("save 5")?;
    j.save_checkpoint(g, "c", 2).await.at("save c 2")?;
    j.save_checkpoint("c-checkpoint-other", "b", 9)
        .await
        .at("save other group")?;
    ensure_eq(j.checkpoint(g, "b").await.at("b")?, 5, "b")?;
    j.save_checkpoint(g, "b", 3).await.at("save 3")?;
    ensure_eq(j.checkpoint(g, "b").await.at("b")?, 3, "b went down")?;
    ensure_eq(j.checkpoint(g, "c").await.at("c")?, 2, "c")?;
    ensure_eq(
        j.checkpoint("c-checkpoint-other", "b").await.at("other")?,
        9,
        "another group",
    )
}

async fn quarantine<J: Journal>(j: &J) -> Result<(), String> {
    let g = "c-quarantine";
    ensure_eq(j.diverged(g, "b").await.at("unknown")?, None, "never set")?;
    j.save_checkpoint(g, "b", 4).await.at("save")?;
    j.set_diverged(g, "b", Some("seq 4: status 409 differs"))
        .await
        .at("quarantine")?;
    ensure_eq(
        j.diverged(g, "b").await.at("diverged")?.as_deref(),
        Some("seq 4: status 409 differs"),
        "quarantined",
    )?;
    ensure_eq(j.checkpoint(g, "b").await.at("b")?, 4, "checkpoint kept")?;
    j.save_checkpoint(g, "b", 6)
        .await
        .at("save while quarantined")?;
    ensure_eq(
        j.diverged(g, "b").await.at("diverged")?.is_some(),
        true,
        "a checkpoint keeps the quarantine",
    )?;
    j.set_diverged(g, "b", None).await.at("clear")?;
    ensure_eq(j.diverged(g, "b").await.at("diverged")?, None, "cleared")?;
    ensure_eq(
        j.checkpoint(g, "b").await.at("b")?,
        6,
        "checkpoint kept on clear",
    )?;
    // A partition quarantined before any checkpoint.
    j.set_diverged(g, "c", Some("ahead"))
        .await
        .at("quarantine c")?;
    ensure_eq(
        (
            j.checkpoint(g, "c").await.at("c")?,
            j.diverged(g, "c").await.at("c")?,
        ),
        (0, Some("ahead".to_owned())),
        "c",
    )
}

/// How long a lease lives in the checks that do not let it run out.
const LONG: Duration = Duration::from_secs(60);
/// A lease that runs out during the check.
const SHORT: Duration = Duration::from_millis(200);

async fn lease<J: Journal>(a: &J, b: &J) -> Result<(), String> {
    let g = "c-lease";
    let owner_a = Owner {
        id: "owner-a".into(),
        describe: "proxy A (pid 1 on host a)".into(),
    };
    let owner_b = Owner {
        id: "owner-b".into(),
        describe: "proxy B (pid 2 on host b)".into(),
    };
    ensure_eq(
        a.owner().await.at("owner")?,
        None,
        "nobody owns a new journal",
    )?;
    // Unowned: any handle writes.
    fill(b, g, 1).await?;

    let t1 = a.claim(&owner_a, LONG).await.at("a claims")?;
    let info = a.owner().await.at("owner")?;
    ensure(
        info.as_ref().is_some_and(|i| {
            i.id == owner_a.id
                && i.describe == owner_a.describe
                && i.token == t1
                && i.remaining_ms > 0
                && i.remaining_ms <= 60_000
        }),
        || format!("owner after a's claim (token {t1}): {info:?}"),
    )?;
    is_fenced(b.claim(&owner_b, LONG).await, &owner_a.describe, "b claims")?;
    // A handle that never claimed is refused while the lease is held.
    is_fenced(
        b.append(&record(g, 2)).await,
        &owner_a.describe,
        "b appends",
    )?;
    append_next(a, g).await?;
    append_next(a, g).await?;
    a.renew(LONG).await.at("a renews")?;
    ensure_eq(
        a.claim(&owner_a, LONG).await.at("a claims again")? > t1,
        true,
        "a's second claim has a higher token",
    )?;

    // Released: the next claim is at once, with a higher token, and fences a.
    a.release().await.at("a releases")?;
    ensure_eq(a.owner().await.at("owner")?, None, "released")?;
    let t2 = b.claim(&owner_b, LONG).await.at("b claims")?;
    ensure(t2 > t1 + 1, || format!("b's token {t2} after a's {t1}"))?;
    fenced_writes(a, b, g, &owner_b.describe).await?;
    is_fenced(a.renew(LONG).await, &owner_b.describe, "a renews")?;
    is_fenced(a.claim(&owner_a, LONG).await, &owner_b.describe, "a claims")?;

    // Expiry: b's lease runs out; until someone claims, b still writes (expiry alone does
    // not fence), then a takes over with a higher token and b is fenced.
    b.renew(SHORT).await.at("b renews briefly")?;
    tokio::time::sleep(SHORT + Duration::from_millis(150)).await;
    let info = b.owner().await.at("owner")?;
    ensure(
        info.as_ref()
            .is_some_and(|i| i.token == t2 && i.remaining_ms == 0),
        || format!("an expired lease: {info:?}"),
    )?;
    append_next(b, g).await?;
    let t3 = a.claim(&owner_a, LONG).await.at("a takes over")?;
    ensure_eq(t3, t2 + 1, "the token after a takeover")?;
    fenced_writes(b, a, g, &owner_a.describe).await?;
    is_fenced(b.renew(LONG).await, &owner_a.describe, "b renews")?;
    a.renew(LONG).await.at("a renews")?;
    append_next(a, g).await?;

    // A release by a fenced handle changes nothing.
    b.release().await.at("b releases")?;
    ensure_eq(
        a.owner().await.at("owner")?.map(|i| i.token),
        Some(t3),
        "after b's release",
    )?;
    a.release().await.at("a releases")?;
    ensure_eq(a.owner().await.at("owner")?, None, "released at the end")?;
    append_next(b, g).await
}

/// How many handles claim a free journal at the same moment.
const CLAIMERS: usize = 4;

/// Concurrent claims on a free journal: exactly one wins, the others are refused naming it.
async fn claims_race<J: Journal>(handles: &[J]) -> Result<(), String> {
    let owners: Vec<Owner> = (0..handles.len())
        .map(|i| Owner {
            id: format!("racer-{i}"),
            describe: format!("racer {i}"),
        })
        .collect();
    let results =
        futures_util::future::join_all(handles.iter().zip(&owners).map(|(h, o)| h.claim(o, LONG)))
            .await;
    let winners: Vec<usize> = (0..results.len()).filter(|&i| results[i].is_ok()).collect();
    let [winner] = winners[..] else {
        return Err(format!("{} claims won at once: {results:?}", winners.len()));
    };
    for (i, r) in results.iter().enumerate() {
        if i != winner {
            is_fenced(r.clone(), &owners[winner].describe, &format!("racer {i}"))?;
        }
    }
    handles[winner].release().await.at("the winner releases")
}

/// Appends the next record of `group`.
async fn append_next<J: Journal>(j: &J, group: &str) -> Result<(), String> {
    let head = j
        .read_after(group, 0, u64::MAX)
        .await
        .at("read the log")?
        .last()
        .map_or(0, |r| r.seq);
    j.append(&record(group, head + 1))
        .await
        .at(&format!("append {}", head + 1))
}

/// Every write kind of `fenced` is refused naming `holder`, and none took effect (as
/// `owner`, the live handle, sees it).
async fn fenced_writes<J: Journal>(
    fenced: &J,
    owner: &J,
    g: &str,
    holder: &str,
) -> Result<(), String> {
    let head = owner.open_log(g).await.at("open_log")?.head;
    owner
        .append(&record(g, head + 1))
        .await
        .at("the owner appends")?;
    let head = head + 1;
    owner.save_checkpoint(g, "b", 1).await.at("checkpoint")?;
    let role = owner.role(g, "a").await.at("role")?;

    is_fenced(fenced.append(&record(g, head + 1)).await, holder, "append")?;
    is_fenced(
        fenced.seal(g, head, &Outcome::Skipped).await,
        holder,
        "seal",
    )?;
    is_fenced(fenced.restamp(g, head, 9, "z").await, holder, "restamp")?;
    is_fenced(
        fenced
            .set_role(
                g,
                role.epoch,
                &StoredRole {
                    epoch: role.epoch + 1,
                    primary: "z".into(),
                },
            )
            .await,
        holder,
        "set_role",
    )?;
    is_fenced(
        fenced.role("c-lease-new", "a").await,
        holder,
        "create a role",
    )?;
    is_fenced(fenced.open_log(g).await, holder, "open_log")?;
    is_fenced(
        fenced.save_checkpoint(g, "b", 7).await,
        holder,
        "save_checkpoint",
    )?;
    is_fenced(
        fenced.set_diverged(g, "b", Some("late")).await,
        holder,
        "set_diverged",
    )?;
    is_fenced(fenced.flush().await, holder, "flush")?;
    is_fenced(
        fenced.set_members(g, 0, &[member("z", None)]).await,
        holder,
        "set_members",
    )?;
    is_fenced(fenced.truncate(g, head).await, holder, "truncate")?;

    let last = owner.record(g, head).await.at("record")?;
    ensure_eq(
        last.map(|r| (r.state, r.epoch, r.executors.is_empty())),
        Some((RecordState::Pending, 1, true)),
        "the owner's last record after fenced writes",
    )?;
    ensure_eq(
        owner.open_log(g).await.at("open_log")?.head,
        head,
        "head after a fenced append",
    )?;
    ensure_eq(
        owner.role(g, "a").await.at("role")?,
        role,
        "role after a fenced set_role",
    )?;
    ensure_eq(
        owner.role("c-lease-new", "b").await.at("role")?.primary,
        "b".to_owned(),
        "a group a fenced handle tried to create",
    )?;
    ensure_eq(
        (
            owner.checkpoint(g, "b").await.at("checkpoint")?,
            owner.diverged(g, "b").await.at("diverged")?,
        ),
        (1, None),
        "checkpoint after fenced writes",
    )?;
    ensure_eq(
        owner.members(g).await.at("members")?,
        None,
        "membership after a fenced set_members",
    )
}
