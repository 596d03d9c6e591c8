//! Shared harness for Hearth's cross-component tests and benchmarks.
//!
//! Layout:
//! - [`balancer`]: the real balancer served in-process in front of test executors;
//! - [`builds`]: RabbitMQ in a container, git repositories served on loopback, and the
//!   `hearth-builds` binary as child processes a test can kill;
//! - [`docker`]: test containers on the real engine, labelled `hearth.test=1`, removed on drop;
//! - [`executor`]: a real executor served in-process, with helpers to stage sources;
//! - [`s3`]: a local S3-compatible server (moto) for storage tests;
//! - [`swarm`]: the repository's stack on Docker Swarm (`make swarm-up`/`swarm-down`) for the
//!   Swarm end-to-end test;
//! - [`runtime`]: the runtime images and their fixtures, building functions with an image's own
//!   `helpers/build.sh` and starting server containers from the result.
//!
//! The conformance suite is `tests/all/conformance.rs`; the benchmark is `src/bin/bench.rs`.

pub mod balancer;
pub mod builds;
pub mod docker;
pub mod executor;
pub mod runtime;
pub mod s3;
pub mod swarm;
