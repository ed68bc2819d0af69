//! Replay header parsing and signature checking: the input's lines are the values of
//! `Regroup-Seq`, `-Txn-Id`, `-Epoch`, `-Timestamp`, `-Replay` and `-Signature`, then the
//! method, the path and the body. Nothing panics; a request signed with the secret
//! verifies, the same request under another secret or with a changed body does not.

#![no_main]

use http::{HeaderMap, HeaderValue};
use libfuzzer_sys::fuzz_target;
use regroup_replay::ReplayContext;
use regroup_replay::headers;
use regroup_replay::signature::{Secret, Signed};

fuzz_target!(|data: &[u8]| {
    let mut parts = data.splitn(9, |b| *b == b'\n');
    let mut h = HeaderMap::new();
    for name in [
        headers::SEQ,
        headers::TXN_ID,
        headers::EPOCH,
        headers::TIMESTAMP,
        headers::REPLAY,
        headers::SIGNATURE,
    ] {
        if let Some(v) = parts.next().and_then(|v| HeaderValue::from_bytes(v).ok()) {
            h.insert(name, v);
        }
    }
    let method = parts
        .next()
        .and_then(|m| std::str::from_utf8(m).ok())
        .unwrap_or("POST");
    let path = parts
        .next()
        .and_then(|p| std::str::from_utf8(p).ok())
        .unwrap_or("/");
    let body = parts.next().unwrap_or(b"");
    let _ = ReplayContext::from_headers(&h);
    let (Some(secret), Some(other)) = (Secret::new("fuzz-secret"), Secret::new("other")) else {
        return;
    };
    let Ok(signed) = Signed::from_request(&h, method, path, body) else {
        return;
    };
    // Whatever signature came in, checking it never panics.
    let sent = h.get(headers::SIGNATURE).map(|v| v.as_bytes());
    let _ = signed.verify(sent, std::slice::from_ref(&secret));
    let signature = signed.sign(&secret);
    assert!(
        signed
            .verify(Some(signature.as_bytes()), std::slice::from_ref(&secret))
            .is_ok()
    );
    assert!(
        signed
            .verify(Some(signature.as_bytes()), std::slice::from_ref(&other))
            .is_err()
    );
    let mut changed = body.to_vec();
    changed.push(0);
    let tampered = Signed {
        body: &changed,
        ..signed
    };
    assert!(
        tampered
            .verify(Some(signature.as_bytes()), &[secret])
            .is_err()
    );
});
