//! Request classification: is this request an update (journaled, sent to the primary,
//! replayed everywhere) or a read (balanced over caught-up partitions)?
//!
//! The definition lives in [`regroup_replay::classify`], so that the proxy and the app
//! layer agree on it: reads are GET, HEAD, OPTIONS, PROPFIND, REPORT and SEARCH spelled
//! exactly so (or a group's `read_methods`), every other method is an update, route rules
//! match the normalized path, and a path that cannot be normalized safely is an update.
//!
//! ```
//! use regroup_proxy::classify::{Classifier, Kind};
//! use http::Method;
//! let c = Classifier::new(&[]);
//! assert_eq!(c.classify(&Method::POST, "/accounts"), Kind::Update);
//! assert_eq!(c.classify(&Method::GET, "/accounts"), Kind::Read);
//! assert_eq!(c.classify(&Method::from_bytes(b"MKCOL").unwrap(), "/d/"), Kind::Update);
//! ```

use http::Method;

pub use regroup_replay::classify::{
    Classifier, DEFAULT_READ_METHODS, Kind, PathError, RouteRule, normalize_path,
};

/// The kind of a request by its method alone, with the default read methods: GET, HEAD,
/// OPTIONS, PROPFIND, REPORT and SEARCH read; every other method updates.
pub fn default_kind(method: &Method) -> Kind {
    if DEFAULT_READ_METHODS.contains(&method.as_str()) {
        Kind::Read
    } else {
        Kind::Update
    }
}
