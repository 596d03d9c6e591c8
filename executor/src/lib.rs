//! The executor: the Open Runtimes Executor HTTP API (`/v1/runtimes`, executions, builds, logs,
//! commands, health, metrics) on top of an `Adapter`. It cold-starts runtime containers of the
//! images in `runtimes/`, guards each with its own secret, forwards calls over the runtime protocol
//! (v5 and legacy v2), and returns status, headers, body, logs and errors.
//!
//! Status: not built yet (issue "Executor: the Open Runtimes Executor API on Docker").
