//! Signed replay headers: an HMAC-SHA256, with a secret shared by the proxy and its
//! partitions, over what a partition must not take from anyone but regroup.
//!
//! The signed message is, one per line: a version tag, `Regroup-Seq`, `Regroup-Txn-Id`,
//! `Regroup-Epoch`, `Regroup-Timestamp` (the header values exactly as sent),
//! `Regroup-Replay` (`1` or empty), the method, the path and query, and the hex SHA-256 of
//! the body. No part can hold a line feed, so the message is unambiguous. The signature
//! goes in `Regroup-Signature` as lowercase hex. A request that carries `Regroup-Term` or
//! `Regroup-Prev` is signed as version 2: the same lines with the term and the previous seq
//! (each empty when absent) after `Regroup-Replay`, so neither can be changed by anyone
//! without the secret.

use std::sync::Arc;

use hmac::digest::KeyInit;
use hmac::{Hmac, Mac};
use http::HeaderMap;
use sha2::{Digest, Sha256};

use crate::headers;

/// The environment variable holding the shared secret, read by the proxy and the app layer.
pub const SECRET_ENV: &str = "REGROUP_REPLAY_SECRET";
/// The environment variable holding the previous secret, still accepted by the app layer
/// while a rotation is under way.
pub const PREVIOUS_SECRET_ENV: &str = "REGROUP_REPLAY_SECRET_PREVIOUS";

const VERSION: &str = "regroup-signature-v1";
const VERSION_WITH_TERM: &str = "regroup-signature-v2";
const VERSION_WITH_ORDER: &str = "regroup-signature-v3";

type HmacSha256 = Hmac<Sha256>;

/// A replay secret. Its `Debug` output does not show it.
#[derive(Clone, PartialEq, Eq)]
pub struct Secret(Arc<[u8]>);

impl std::fmt::Debug for Secret {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Secret(..)")
    }
}

impl Secret {
    /// A secret from its bytes; `None` when empty (an empty secret is no secret).
    pub fn new(bytes: impl AsRef<[u8]>) -> Option<Secret> {
        let bytes = bytes.as_ref();
        (!bytes.is_empty()).then(|| Secret(Arc::from(bytes)))
    }

    /// The secret in environment variable `name`, if it is set and not empty.
    pub fn from_env(name: &str) -> Option<Secret> {
        std::env::var_os(name).and_then(|v| Secret::new(v.as_encoded_bytes()))
    }

    fn mac(&self) -> HmacSha256 {
        // HMAC takes a key of any length (long ones are hashed), so this never falls back.
        <HmacSha256 as KeyInit>::new_from_slice(&self.0)
            .unwrap_or_else(|_| <HmacSha256 as KeyInit>::new(&Default::default()))
    }
}

/// What a signature covers, as sent on the wire.
#[derive(Debug, Clone, Copy)]
pub struct Signed<'a> {
    /// `Regroup-Seq`.
    pub seq: &'a str,
    /// `Regroup-Txn-Id`.
    pub txn_id: &'a str,
    /// `Regroup-Epoch`.
    pub epoch: &'a str,
    /// `Regroup-Timestamp`.
    pub timestamp: &'a str,
    /// Whether `Regroup-Replay: 1` is sent.
    pub replay: bool,
    /// `Regroup-Term`, when sent.
    pub term: Option<&'a str>,
    /// `Regroup-Prev`, when sent.
    pub prev: Option<&'a str>,
    /// `Regroup-After`, when sent (parallel replay).
    pub after: Option<&'a str>,
    /// `Regroup-Floor`, when sent (parallel replay).
    pub floor: Option<&'a str>,
    /// The request method.
    pub method: &'a str,
    /// The request's path and query, as in the request line.
    pub path_and_query: &'a str,
    /// The request body.
    pub body: &'a [u8],
}

/// Why a signature was refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum SignatureError {
    /// No `Regroup-Signature` header.
    #[error("replay headers without a regroup-signature")]
    Missing,
    /// The header is not lowercase hex of the right length.
    #[error("regroup-signature is malformed")]
    Malformed,
    /// It does not match under any accepted secret.
    #[error("regroup-signature does not match")]
    Mismatch,
    /// A replay header is missing or not text.
    #[error("replay header {0} is missing or not text")]
    Header(&'static str),
}

impl<'a> Signed<'a> {
    /// The signed parts of a request with these headers, method, path and body.
    pub fn from_request(
        h: &'a HeaderMap,
        method: &'a str,
        path_and_query: &'a str,
        body: &'a [u8],
    ) -> Result<Signed<'a>, SignatureError> {
        let text = |name: &'static str| {
            h.get(name)
                .and_then(|v| v.to_str().ok())
                .ok_or(SignatureError::Header(name))
        };
        Ok(Signed {
            seq: text(headers::SEQ)?,
            txn_id: text(headers::TXN_ID)?,
            epoch: text(headers::EPOCH)?,
            timestamp: text(headers::TIMESTAMP)?,
            replay: h.get(headers::REPLAY).is_some_and(|v| v == "1"),
            term: optional(h, headers::TERM)?,
            prev: optional(h, headers::PREV)?,
            after: optional(h, headers::AFTER)?,
            floor: optional(h, headers::FLOOR)?,
            method,
            path_and_query,
            body,
        })
    }

    fn mac(&self, secret: &Secret) -> HmacSha256 {
        let mut mac = secret.mac();
        let body = hex::encode(Sha256::digest(self.body));
        let v3 = self.after.is_some() || self.floor.is_some();
        let v2 = v3 || self.term.is_some() || self.prev.is_some();
        let head = [
            if v3 {
                VERSION_WITH_ORDER
            } else if v2 {
                VERSION_WITH_TERM
            } else {
                VERSION
            },
            self.seq,
            self.txn_id,
            self.epoch,
            self.timestamp,
            if self.replay { "1" } else { "" },
        ];
        let tail = [self.method, self.path_and_query, &body];
        let extra = [
            self.term.unwrap_or(""),
            self.prev.unwrap_or(""),
            self.after.unwrap_or(""),
            self.floor.unwrap_or(""),
        ];
        let extra: &[&str] = if v3 {
            &extra
        } else if v2 {
            &extra[..2]
        } else {
            &[]
        };
        for part in head.iter().chain(extra.iter()).chain(tail.iter()) {
            mac.update(part.as_bytes());
            mac.update(b"\n");
        }
        mac
    }

    /// The `Regroup-Signature` value under `secret`.
    pub fn sign(&self, secret: &Secret) -> String {
        hex::encode(self.mac(secret).finalize().into_bytes())
    }

    /// Checks `signature` (the header's value, if any) against each of `secrets` in
    /// constant time per secret.
    pub fn verify(
        &self,
        signature: Option<&[u8]>,
        secrets: &[Secret],
    ) -> Result<(), SignatureError> {
        let signature = signature.ok_or(SignatureError::Missing)?;
        if signature.len() != 64
            || !signature
                .iter()
                .all(|b| matches!(b, b'0'..=b'9' | b'a'..=b'f'))
        {
            return Err(SignatureError::Malformed);
        }
        let raw = hex::decode(signature).map_err(|_| SignatureError::Malformed)?;
        for secret in secrets {
            if self.mac(secret).verify_slice(&raw).is_ok() {
                return Ok(());
            }
        }
        Err(SignatureError::Mismatch)
    }
}

/// An optional replay header's text; an error when it is there but not text.
fn optional<'a>(h: &'a HeaderMap, name: &'static str) -> Result<Option<&'a str>, SignatureError> {
    h.get(name)
        .map(|v| v.to_str().map_err(|_| SignatureError::Header(name)))
        .transpose()
}

/// Signs a request about to be sent: reads its replay headers from `h` and inserts
/// `Regroup-Signature`. Without the replay headers nothing is inserted (and a partition
/// with a secret refuses the request).
pub fn sign_headers(
    h: &mut HeaderMap,
    method: &str,
    path_and_query: &str,
    body: &[u8],
    secret: &Secret,
) {
    let Ok(signed) = Signed::from_request(h, method, path_and_query, body) else {
        return;
    };
    let signature = signed.sign(secret);
    if let Ok(v) = http::HeaderValue::from_str(&signature) {
        h.insert(headers::SIGNATURE, v);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn signed(body: &[u8]) -> Signed<'_> {
        Signed {
            seq: "7",
            txn_id: "0190b6e0-0000-7000-8000-0000000000aa",
            epoch: "2",
            timestamp: "2026-11-30T12:00:00Z",
            replay: true,
            term: None,
            prev: None,
            after: None,
            floor: None,
            method: "POST",
            path_and_query: "/transfers?x=1",
            body,
        }
    }

    fn secret(s: &str) -> Secret {
        Secret::new(s).unwrap_or_else(|| panic!("empty secret"))
    }

    #[test]
    fn sign_and_verify_every_part_counts() {
        let (a, b) = (secret("current"), secret("previous"));
        let sig = signed(b"{}").sign(&a);
        assert_eq!(sig.len(), 64);
        assert_eq!(
            signed(b"{}").verify(Some(sig.as_bytes()), std::slice::from_ref(&a)),
            Ok(())
        );
        assert_eq!(
            signed(b"{}").verify(Some(sig.as_bytes()), &[b.clone(), a.clone()]),
            Ok(())
        );
        assert_eq!(
            signed(b"{}").verify(Some(sig.as_bytes()), std::slice::from_ref(&b)),
            Err(SignatureError::Mismatch)
        );
        let base = signed(b"{}");
        let changed = [
            Signed { seq: "8", ..base },
            Signed {
                txn_id: "0190b6e0-0000-7000-8000-0000000000ab",
                ..base
            },
            Signed {
                epoch: "999999",
                ..base
            },
            Signed {
                timestamp: "2026-11-30T12:00:01Z",
                ..base
            },
            Signed {
                replay: false,
                ..base
            },
            // A term added, or another term: both change the signature.
            Signed {
                term: Some("3"),
                ..base
            },
            Signed {
                prev: Some("6"),
                ..base
            },
            // Parallel replay's order headers count too.
            Signed {
                after: Some("5"),
                ..base
            },
            Signed {
                floor: Some("4"),
                ..base
            },
            Signed {
                method: "PUT",
                ..base
            },
            Signed {
                path_and_query: "/transfers?x=2",
                ..base
            },
            Signed {
                body: b"{ }",
                ..base
            },
        ];
        for c in changed {
            assert_eq!(
                c.verify(Some(sig.as_bytes()), std::slice::from_ref(&a)),
                Err(SignatureError::Mismatch),
                "{c:?}"
            );
        }
        assert_eq!(
            base.verify(None, std::slice::from_ref(&a)),
            Err(SignatureError::Missing)
        );
        assert_eq!(
            base.verify(Some(b"zz"), std::slice::from_ref(&a)),
            Err(SignatureError::Malformed)
        );
        let upper = sig.to_uppercase();
        assert_eq!(
            base.verify(Some(upper.as_bytes()), &[a]),
            Err(SignatureError::Malformed)
        );
    }

    #[test]
    fn empty_secret_is_no_secret_and_debug_hides_it() {
        assert!(Secret::new("").is_none());
        assert_eq!(format!("{:?}", secret("hunter2")), "Secret(..)");
    }
}
