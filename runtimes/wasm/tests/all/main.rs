//! Integration tests of the Wasm runtime, one binary (wasmtime's layout): `isolation` drives the
//! engine directly, `http` the server in process on port 0, `pool` pool mode (in process and the
//! real binary). Guests are WAT files in `testdata/`.

#![allow(clippy::unwrap_used, clippy::expect_used)] // a failure is the test failing

mod http;
mod isolation;
mod pool;

use std::path::PathBuf;

/// A module of `testdata/` as text.
pub fn testdata(name: &str) -> String {
    let path = PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("testdata")
        .join(name);
    std::fs::read_to_string(&path).unwrap_or_else(|e| panic!("{}: {e}", path.display()))
}
