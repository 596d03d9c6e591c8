//! The WASI preview 1 subset a guest gets (module `wasi_snapshot_preview1`), written by hand:
//! what a C program built against wasi-libc needs to read its arguments, environment and stdin,
//! write its streams, read clocks, sleep, draw random bytes and exit. There is no filesystem and
//! no network: `fd_prestat_get` reports no preopened directory, and any other import traps when
//! called (see `Engine::prepare`).
//!
//! File descriptors: 0 stdin (the request body), 1 stdout (the response), 2 stderr (native
//! output, goes to the logs file), 3 the `log` stream, 4 the `error` stream.

use std::sync::OnceLock;
use std::thread;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use bytes::Bytes;
use rand::RngCore;
use wasmtime::{Caller, Linker, Memory};

use crate::engine::State;

const MODULE: &str = "wasi_snapshot_preview1";

const ESUCCESS: i32 = 0;
const EBADF: i32 = 8;
const EFAULT: i32 = 21;
const EINVAL: i32 = 28;
const ESPIPE: i32 = 70;

/// Most a guest may write to stdout (the response) in one run.
pub const MAX_STDOUT: usize = 64 << 20;
/// Most log text (all three log streams together) kept per run; the executor keeps 5 MiB.
pub const MAX_LOG_BYTES: usize = 8 << 20;

/// Where a log line came from.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Stream {
    /// stderr: output that bypassed `log`/`error` (printf to stderr, a panic message, ...).
    Native,
    /// fd 3: `log` lines.
    Log,
    /// fd 4: `error` lines.
    Error,
}

/// One complete line written by the guest, in write order across streams.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LogLine {
    pub stream: Stream,
    pub text: String,
}

/// Everything a run wrote.
#[derive(Debug, Clone, Default)]
pub struct Output {
    /// fd 1 bytes, unchanged.
    pub stdout: Vec<u8>,
    /// Lines of fds 2, 3 and 4; an unterminated last line counts as a line.
    pub lines: Vec<LogLine>,
}

/// Why the guest stopped early, carried through wasmtime as the error of a host call.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum Exit {
    #[error("guest exited with code {0}")]
    Code(i32),
    #[error("guest slept past its deadline")]
    Timeout,
}

/// Wall-clock deadline of the run (the epoch deadline covers Wasm code, this covers sleeps).
#[derive(Debug, Clone, Copy)]
pub struct Deadline(pub Option<Instant>);

type MakeEnv = Box<dyn FnOnce() -> Vec<(String, String)> + Send>;

/// A run's environment variables. A lazy one is only made (and turned into `KEY=VALUE` entries)
/// when the guest first asks for it with `environ_sizes_get` or `environ_get`: most functions
/// never do, and skip the cost on every request.
#[derive(Default)]
pub struct Env {
    make: Option<MakeEnv>,
    entries: Vec<Vec<u8>>,
}

impl Env {
    /// Variables known now.
    pub fn new(vars: Vec<(String, String)>) -> Self {
        Self::lazy(move || vars)
    }

    /// Variables made by `make`, on the guest's first request for them.
    pub fn lazy(make: impl FnOnce() -> Vec<(String, String)> + Send + 'static) -> Self {
        Self {
            make: Some(Box::new(make)),
            entries: Vec::new(),
        }
    }

    fn entries(&mut self) -> &[Vec<u8>] {
        if let Some(make) = self.make.take() {
            self.entries = make()
                .iter()
                .map(|(k, v)| {
                    let mut entry = Vec::with_capacity(k.len() + v.len() + 2);
                    entry.extend_from_slice(k.as_bytes());
                    entry.push(b'=');
                    entry.extend_from_slice(v.as_bytes());
                    nul_terminated(entry)
                })
                .collect();
        }
        &self.entries
    }
}

impl std::fmt::Debug for Env {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match &self.make {
            Some(_) => f.write_str("Env(not made yet)"),
            None => write!(f, "Env({} variables)", self.entries.len()),
        }
    }
}

/// Per-run WASI state.
pub struct WasiCtx {
    args: Vec<Vec<u8>>,
    env: Env,
    stdin: Bytes,
    stdin_pos: usize,
    output: Output,
    partial: [Vec<u8>; 3],
    log_bytes: usize,
    deadline: Deadline,
}

impl WasiCtx {
    pub fn new(args: Vec<String>, env: Env, stdin: Bytes, deadline: Deadline) -> Self {
        let args = args
            .into_iter()
            .map(|a| nul_terminated(a.into_bytes()))
            .collect();
        Self {
            args,
            env,
            stdin,
            stdin_pos: 0,
            output: Output::default(),
            partial: [Vec::new(), Vec::new(), Vec::new()],
            log_bytes: 0,
            deadline,
        }
    }

    /// Ends the run: unterminated lines become lines.
    pub fn finish(mut self) -> Output {
        for (i, stream) in [Stream::Native, Stream::Log, Stream::Error]
            .into_iter()
            .enumerate()
        {
            let rest = std::mem::take(&mut self.partial[i]);
            if !rest.is_empty() {
                self.push_line(stream, &rest);
            }
        }
        self.output
    }

    fn push_line(&mut self, stream: Stream, line: &[u8]) {
        let line = line.strip_suffix(b"\r").unwrap_or(line);
        if self.log_bytes + line.len() > MAX_LOG_BYTES {
            return;
        }
        self.log_bytes += line.len();
        self.output.lines.push(LogLine {
            stream,
            text: String::from_utf8_lossy(line).into_owned(),
        });
    }

    fn write(&mut self, fd: i32, bytes: &[u8]) -> Result<(), i32> {
        let (index, stream) = match fd {
            1 => {
                if self.output.stdout.len() + bytes.len() > MAX_STDOUT {
                    return Err(EFAULT);
                }
                self.output.stdout.extend_from_slice(bytes);
                return Ok(());
            }
            2 => (0, Stream::Native),
            3 => (1, Stream::Log),
            4 => (2, Stream::Error),
            _ => return Err(EBADF),
        };
        let mut rest = bytes;
        while let Some(pos) = rest.iter().position(|&b| b == b'\n') {
            let mut line = std::mem::take(&mut self.partial[index]);
            line.extend_from_slice(&rest[..pos]);
            self.push_line(stream, &line);
            rest = &rest[pos + 1..];
        }
        if self.partial[index].len() + rest.len() <= MAX_LOG_BYTES {
            self.partial[index].extend_from_slice(rest);
        }
        Ok(())
    }
}

fn nul_terminated(mut bytes: Vec<u8>) -> Vec<u8> {
    bytes.push(0);
    bytes
}

fn memory(caller: &mut Caller<'_, State>) -> wasmtime::Result<Memory> {
    caller
        .get_export("memory")
        .and_then(|e| e.into_memory())
        .ok_or_else(|| wasmtime::Error::msg("the guest exports no memory named `memory`"))
}

/// Bounds-checked views of guest memory.
struct Mem<'a>(&'a mut [u8]);

impl Mem<'_> {
    fn slice(&self, ptr: i32, len: usize) -> Result<&[u8], i32> {
        let start = ptr as u32 as usize;
        self.0
            .get(start..start.checked_add(len).ok_or(EFAULT)?)
            .ok_or(EFAULT)
    }

    fn slice_mut(&mut self, ptr: i32, len: usize) -> Result<&mut [u8], i32> {
        let start = ptr as u32 as usize;
        self.0
            .get_mut(start..start.checked_add(len).ok_or(EFAULT)?)
            .ok_or(EFAULT)
    }

    fn u32(&self, ptr: i32) -> Result<u32, i32> {
        let b = self.slice(ptr, 4)?;
        Ok(u32::from_le_bytes([b[0], b[1], b[2], b[3]]))
    }

    fn u64(&self, ptr: i32) -> Result<u64, i32> {
        let b = self.slice(ptr, 8)?;
        let mut a = [0u8; 8];
        a.copy_from_slice(b);
        Ok(u64::from_le_bytes(a))
    }

    fn put(&mut self, ptr: i32, bytes: &[u8]) -> Result<(), i32> {
        self.slice_mut(ptr, bytes.len())?.copy_from_slice(bytes);
        Ok(())
    }

    fn put_u32(&mut self, ptr: i32, v: u32) -> Result<(), i32> {
        self.put(ptr, &v.to_le_bytes())
    }

    fn put_u64(&mut self, ptr: i32, v: u64) -> Result<(), i32> {
        self.put(ptr, &v.to_le_bytes())
    }

    /// The (ptr, len) pairs of an iovec array.
    fn iovecs(&self, iovs: i32, count: i32) -> Result<Vec<(i32, usize)>, i32> {
        (0..count.max(0))
            .map(|i| {
                let at = iovs.wrapping_add(i.wrapping_mul(8));
                Ok((self.u32(at)? as i32, self.u32(at.wrapping_add(4))? as usize))
            })
            .collect()
    }
}

/// Runs `f` with guest memory and the WASI state; a returned errno becomes the call's result.
fn with_mem(
    caller: &mut Caller<'_, State>,
    f: impl FnOnce(&mut Mem<'_>, &mut WasiCtx) -> Result<(), i32>,
) -> wasmtime::Result<i32> {
    let memory = memory(caller)?;
    let (data, state) = memory.data_and_store_mut(caller);
    Ok(match f(&mut Mem(data), &mut state.wasi) {
        Ok(()) => ESUCCESS,
        Err(errno) => errno,
    })
}

fn sizes(list: &[Vec<u8>]) -> (u32, u32) {
    (
        list.len() as u32,
        list.iter().map(|e| e.len()).sum::<usize>() as u32,
    )
}

fn put_list(mem: &mut Mem<'_>, list: &[Vec<u8>], ptrs: i32, buf: i32) -> Result<(), i32> {
    let mut at = buf;
    for (i, entry) in list.iter().enumerate() {
        mem.put_u32(ptrs.wrapping_add(i as i32 * 4), at as u32)?;
        mem.put(at, entry)?;
        at = at.wrapping_add(entry.len() as i32);
    }
    Ok(())
}

fn monotonic_ns() -> u64 {
    static BASE: OnceLock<Instant> = OnceLock::new();
    BASE.get_or_init(Instant::now).elapsed().as_nanos() as u64
}

fn realtime_ns() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_nanos() as u64)
        .unwrap_or(0)
}

/// Sleeps `duration`, or until the deadline and then stops the guest.
fn sleep(deadline: Deadline, duration: Duration) -> wasmtime::Result<()> {
    if let Some(deadline) = deadline.0 {
        let left = deadline.saturating_duration_since(Instant::now());
        if duration >= left {
            thread::sleep(left);
            return Err(wasmtime::Error::new(Exit::Timeout));
        }
    }
    thread::sleep(duration);
    Ok(())
}

/// Defines the subset in `linker`.
pub(crate) fn add_to_linker(linker: &mut Linker<State>) -> wasmtime::Result<()> {
    linker.func_wrap(
        MODULE,
        "args_sizes_get",
        |mut c: Caller<'_, State>, argc: i32, size: i32| {
            with_mem(&mut c, |mem, wasi| {
                let (n, bytes) = sizes(&wasi.args);
                mem.put_u32(argc, n)?;
                mem.put_u32(size, bytes)
            })
        },
    )?;
    linker.func_wrap(
        MODULE,
        "args_get",
        |mut c: Caller<'_, State>, ptrs: i32, buf: i32| {
            with_mem(&mut c, |mem, wasi| put_list(mem, &wasi.args, ptrs, buf))
        },
    )?;
    linker.func_wrap(
        MODULE,
        "environ_sizes_get",
        |mut c: Caller<'_, State>, count: i32, size: i32| {
            with_mem(&mut c, |mem, wasi| {
                let (n, bytes) = sizes(wasi.env.entries());
                mem.put_u32(count, n)?;
                mem.put_u32(size, bytes)
            })
        },
    )?;
    linker.func_wrap(
        MODULE,
        "environ_get",
        |mut c: Caller<'_, State>, ptrs: i32, buf: i32| {
            with_mem(&mut c, |mem, wasi| {
                put_list(mem, wasi.env.entries(), ptrs, buf)
            })
        },
    )?;
    linker.func_wrap(
        MODULE,
        "fd_write",
        |mut c: Caller<'_, State>, fd: i32, iovs: i32, count: i32, written: i32| {
            with_mem(&mut c, |mem, wasi| {
                let mut total = 0u32;
                for (ptr, len) in mem.iovecs(iovs, count)? {
                    let bytes = mem.slice(ptr, len)?;
                    wasi.write(fd, bytes)?;
                    total = total.wrapping_add(len as u32);
                }
                mem.put_u32(written, total)
            })
        },
    )?;
    linker.func_wrap(
        MODULE,
        "fd_read",
        |mut c: Caller<'_, State>, fd: i32, iovs: i32, count: i32, read: i32| {
            with_mem(&mut c, |mem, wasi| {
                if fd != 0 {
                    return Err(EBADF);
                }
                let mut total = 0usize;
                for (ptr, len) in mem.iovecs(iovs, count)? {
                    let rest = &wasi.stdin[wasi.stdin_pos..];
                    let n = len.min(rest.len());
                    mem.put(ptr, &rest[..n])?;
                    wasi.stdin_pos += n;
                    total += n;
                    if n < len {
                        break;
                    }
                }
                mem.put_u32(read, total as u32)
            })
        },
    )?;
    linker.func_wrap(MODULE, "fd_close", |fd: i32| -> i32 {
        if (0..=4).contains(&fd) {
            ESUCCESS
        } else {
            EBADF
        }
    })?;
    linker.func_wrap(
        MODULE,
        "fd_fdstat_get",
        |mut c: Caller<'_, State>, fd: i32, out: i32| {
            with_mem(&mut c, |mem, _| {
                if !(0..=4).contains(&fd) {
                    return Err(EBADF);
                }
                // filetype unknown (not a tty: stdout is fully buffered), no flags, all rights.
                let mut stat = [0u8; 24];
                stat[8..16].copy_from_slice(&u64::MAX.to_le_bytes());
                stat[16..24].copy_from_slice(&u64::MAX.to_le_bytes());
                mem.put(out, &stat)
            })
        },
    )?;
    linker.func_wrap(
        MODULE,
        "fd_fdstat_set_flags",
        |_fd: i32, _flags: i32| -> i32 { ESUCCESS },
    )?;
    linker.func_wrap(
        MODULE,
        "fd_seek",
        |_fd: i32, _offset: i64, _whence: i32, _out: i32| -> i32 { ESPIPE },
    )?;
    linker.func_wrap(MODULE, "fd_prestat_get", |_fd: i32, _out: i32| -> i32 {
        EBADF
    })?;
    linker.func_wrap(
        MODULE,
        "fd_prestat_dir_name",
        |_fd: i32, _buf: i32, _len: i32| -> i32 { EBADF },
    )?;
    linker.func_wrap(MODULE, "proc_exit", |code: i32| -> wasmtime::Result<()> {
        Err(wasmtime::Error::new(Exit::Code(code)))
    })?;
    linker.func_wrap(MODULE, "sched_yield", || -> i32 { ESUCCESS })?;
    linker.func_wrap(
        MODULE,
        "clock_time_get",
        |mut c: Caller<'_, State>, id: i32, _precision: i64, out: i32| {
            with_mem(&mut c, |mem, _| {
                let now = match id {
                    0 => realtime_ns(),
                    1..=3 => monotonic_ns(),
                    _ => return Err(EINVAL),
                };
                mem.put_u64(out, now)
            })
        },
    )?;
    linker.func_wrap(
        MODULE,
        "clock_res_get",
        |mut c: Caller<'_, State>, _id: i32, out: i32| {
            with_mem(&mut c, |mem, _| mem.put_u64(out, 1_000))
        },
    )?;
    linker.func_wrap(
        MODULE,
        "random_get",
        |mut c: Caller<'_, State>, buf: i32, len: i32| {
            with_mem(&mut c, |mem, _| {
                rand::rng().fill_bytes(mem.slice_mut(buf, len as u32 as usize)?);
                Ok(())
            })
        },
    )?;
    linker.func_wrap(
        MODULE,
        "poll_oneoff",
        |mut c: Caller<'_, State>,
         subs: i32,
         events: i32,
         count: i32,
         written: i32|
         -> wasmtime::Result<i32> {
            // Clock subscriptions sleep (the shortest wins); fd subscriptions are always ready.
            let mut wait: Option<Duration> = None;
            let mut ready = Vec::new();
            let errno = with_mem(&mut c, |mem, _| {
                for i in 0..count.max(0) {
                    let sub = subs.wrapping_add(i * 48);
                    let userdata = mem.u64(sub)?;
                    let tag = mem.slice(sub.wrapping_add(8), 1)?[0];
                    if tag == 0 {
                        let clock = mem.u32(sub.wrapping_add(16))?;
                        let timeout = mem.u64(sub.wrapping_add(24))?;
                        let flags = mem.slice(sub.wrapping_add(40), 2)?[0];
                        let ns = if flags & 1 == 1 {
                            let now = if clock == 0 {
                                realtime_ns()
                            } else {
                                monotonic_ns()
                            };
                            timeout.saturating_sub(now)
                        } else {
                            timeout
                        };
                        let d = Duration::from_nanos(ns);
                        wait = Some(wait.map_or(d, |w| w.min(d)));
                        ready.push((userdata, 0u8));
                    } else {
                        ready.push((userdata, tag));
                    }
                }
                Ok(())
            })?;
            if errno != ESUCCESS {
                return Ok(errno);
            }
            let any_fd = ready.iter().any(|(_, tag)| *tag != 0);
            if let (Some(wait), false) = (wait, any_fd) {
                let deadline = c.data().wasi.deadline;
                sleep(deadline, wait)?;
            }
            with_mem(&mut c, |mem, _| {
                let mut n = 0u32;
                for (userdata, tag) in ready.iter().filter(|(_, tag)| any_fd == (*tag != 0)) {
                    let mut event = [0u8; 32];
                    event[0..8].copy_from_slice(&userdata.to_le_bytes());
                    event[10] = *tag;
                    mem.put(events.wrapping_add(n as i32 * 32), &event)?;
                    n += 1;
                }
                mem.put_u32(written, n)
            })
        },
    )?;
    Ok(())
}
