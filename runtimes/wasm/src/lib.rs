//! The Hearth Wasm runtime: serves a WASI preview 1 command module behind the Open Runtimes
//! protocol (v5, and legacy v2 when `INTERNAL_RUNTIME_KEY` is set).
//!
//! # Layout
//! - [`engine`]: the Wasm engine wrapper, no HTTP: [`engine::EngineBuilder`] (pooling allocator,
//!   epoch deadlines, memory limit), [`engine::Guest`] (a pre-linked module), one
//!   [`engine::Invocation`] in, one [`engine::Outcome`] out.
//! - [`wasi`]: the hand-written WASI preview 1 subset the guest links against.
//! - [`abi`]: the guest ABI on the HTTP side: request → environment + stdin, stdout → response.
//! - [`server`]: hyper server, v5 and v2 request handling, log files, the pool protocol's
//!   `POST /__hearth/specialise`.
//! - [`pool`]: pool mode without HTTP: the pool secret, the specialisation body, unpacking the
//!   code archive and reading its `.open-runtimes` (`runtimes/pool-protocol.md`).
//! - [`config`]: the binary's settings (clap, environment) → [`server::Config`].
//!
//! # Guest ABI
//! A function is a WASI preview 1 *command* module (it exports `_start` and `memory`; C's
//! `main`). Each request runs it once, in a fresh instance, so nothing survives between
//! requests.
//!
//! | what | how |
//! |---|---|
//! | request body | **stdin**, the raw bytes (binary-safe) |
//! | method, URL | env `REQUEST_METHOD`, `REQUEST_URL`, `REQUEST_SCHEME`, `REQUEST_HOST`, `REQUEST_PORT`, `REQUEST_PATH`, `REQUEST_QUERY_STRING`, `REQUEST_QUERY` (JSON object) |
//! | headers | env `HTTP_<NAME>` per header (CGI style: `x-custom` → `HTTP_X_CUSTOM`), and all of them as one JSON object in `REQUEST_HEADERS` (lower-cased names); `x-open-runtimes-*` are never visible, `OPEN_RUNTIMES_HEADERS` win |
//! | variables | the server's environment (the function's variables, `OPEN_RUNTIMES_*`); the request variables above win over them |
//! | response | **stdout**: header lines `name: value`, an empty line, then the body bytes unchanged. `status: 404` sets the status (default 200); `content-type` defaults to `text/plain`. An empty first line means "no headers". Nothing on stdout = no response (500, `Return statement missing.`) |
//! | `log` | **fd 3**: each line is one log line (logs file) |
//! | `error` | **fd 4**: each line is one error line (errors file) |
//! | native output | **stderr**: goes to the logs file after the line `Native logs detected. ...` |
//! | failure | `exit(n)` with `n != 0`, a trap, running out of memory or time: 500, empty body, the reason in the errors file |
//!
//! A C function in full:
//! ```c
//! #include <stdio.h>
//! #include <stdlib.h>
//! int main(void) {
//!     const char *name = getenv("HTTP_X_NAME");
//!     dprintf(3, "greeting %s\n", name ? name : "world");     /* log() */
//!     printf("content-type: text/plain\n\nHello, %s!", name ? name : "world");
//!     return 0;
//! }
//! ```
//! Only the WASI calls of [`wasi`] are provided (no filesystem, no sockets); a call to any
//! other import traps. Time limit: `x-open-runtimes-timeout` (epoch interruption, sleeps
//! included). Memory limit: `OPEN_RUNTIMES_MEMORY` MB per instance.

pub mod abi;
pub mod config;
pub mod engine;
pub mod pool;
pub mod server;
pub mod wasi;
