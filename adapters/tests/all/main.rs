//! Integration tests of hearth-adapters, one module per area (one test binary for the crate).
//!
//! The `docker` tests need a Docker engine and the local image `hearth/base:bookworm`; every
//! container they create carries the `hearth.test=1` label and is removed by a drop guard.

// Test helpers outside `#[test]` functions unwrap too: a failure there is a failed test.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod docker;
