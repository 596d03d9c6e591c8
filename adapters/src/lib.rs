//! Where runtimes live: `trait Adapter` (create, start, stop, remove a runtime container, exec a
//! command in it, put an archive into it, list runtimes by label, inspect, networks), with a Docker
//! implementation on bollard, a Swarm implementation, and a recording fake for unit tests.
//!
//! The executor never sees bollard types: adapters map engine errors into
//! `NotFound / Conflict / Timeout / Unavailable / Backend`.
//!
//! Status: not built yet (issue "Executor: the Open Runtimes Executor API on Docker").
