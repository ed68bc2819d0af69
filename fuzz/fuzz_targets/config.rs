//! Config parsing: any text either parses and validates into a usable config or is refused
//! with an error that names the file; nothing panics.

#![no_main]

use std::path::Path;

use libfuzzer_sys::fuzz_target;
use regroup_proxy::Config;

fuzz_target!(|data: &[u8]| {
    let Ok(text) = std::str::from_utf8(data) else {
        return;
    };
    match Config::parse(text, Path::new("fuzz.toml")) {
        Ok(config) => {
            for g in &config.groups {
                // A validated group yields its classifier and its signing secret.
                let c = g.classifier();
                let _ = c.classify(&http::Method::GET, &g.path_prefix);
                let _ = g.signing_secret();
            }
        }
        Err(e) => assert!(e.to_string().starts_with("fuzz.toml"), "{e}"),
    }
});
