//! Guest isolation, straight on the engine: a guest that loops, traps, or grows past its memory
//! fails its own run only, and no state crosses runs.

use std::time::{Duration, Instant};

use hearth_wasm_runtime::engine::{EngineBuilder, Invocation, Status};

use crate::testdata;

fn engine() -> hearth_wasm_runtime::engine::Engine {
    EngineBuilder::new()
        .memory_limit(16 << 20)
        .max_instances(8)
        .build()
        .unwrap()
}

fn hello_works(engine: &hearth_wasm_runtime::engine::Engine) {
    let hello = engine
        .load_bytes("hello.wat", testdata("hello.wat").as_bytes())
        .unwrap();
    let outcome = hello.run(Invocation::default());
    assert_eq!(outcome.status, Status::Success);
    assert!(outcome.output.stdout.ends_with(b"Hello from WebAssembly!"));
}

#[test]
fn infinite_loop_is_stopped_at_the_timeout() {
    let engine = engine();
    let guest = engine
        .load_bytes("loop.wat", testdata("loop.wat").as_bytes())
        .unwrap();
    let started = Instant::now();
    let outcome = guest.run(Invocation {
        timeout: Some(Duration::from_millis(300)),
        ..Invocation::default()
    });
    let took = started.elapsed();
    assert_eq!(outcome.status, Status::Timeout);
    assert!(
        took >= Duration::from_millis(300),
        "stopped early: {took:?}"
    );
    assert!(took < Duration::from_millis(800), "stopped late: {took:?}");
    hello_works(&engine);
}

#[test]
fn memory_grow_past_the_limit_fails_the_run_only() {
    let engine = engine();
    let guest = engine
        .load_bytes("grow.wat", testdata("grow.wat").as_bytes())
        .unwrap();
    let outcome = guest.run(Invocation::default());
    match &outcome.status {
        Status::Trap(reason) => assert!(reason.contains("memory"), "reason: {reason}"),
        other => panic!("expected a trap, got {other:?}"),
    }
    // The slot is reusable: the same guest fails the same way again, and others still run.
    assert!(matches!(
        guest.run(Invocation::default()).status,
        Status::Trap(_)
    ));
    hello_works(&engine);
}

#[test]
fn a_trap_fails_the_run_only() {
    let engine = engine();
    let guest = engine
        .load_bytes("trap.wat", testdata("trap.wat").as_bytes())
        .unwrap();
    match guest.run(Invocation::default()).status {
        Status::Trap(reason) => assert!(reason.contains("unreachable"), "reason: {reason}"),
        other => panic!("expected a trap, got {other:?}"),
    }
    hello_works(&engine);
}

#[test]
fn exit_code_and_error_stream_are_reported() {
    let engine = engine();
    let guest = engine
        .load_bytes("exit.wat", testdata("exit.wat").as_bytes())
        .unwrap();
    let outcome = guest.run(Invocation::default());
    assert_eq!(outcome.status, Status::Exit(3));
    assert_eq!(outcome.output.lines.len(), 1);
    assert_eq!(outcome.output.lines[0].text, "guest failed");
}

#[test]
fn state_of_one_run_is_not_seen_by_the_next() {
    let engine = engine();
    let guest = engine
        .load_bytes("state.wat", testdata("state.wat").as_bytes())
        .unwrap();
    for _ in 0..5 {
        let outcome = guest.run(Invocation::default());
        assert_eq!(outcome.status, Status::Success);
        // Global and memory cell both start from their initial value every time.
        assert_eq!(outcome.output.stdout, b"\n11");
    }
}

#[test]
fn stdin_reaches_the_guest_binary_safe() {
    let engine = engine();
    let guest = engine
        .load_bytes("echo.wat", testdata("echo.wat").as_bytes())
        .unwrap();
    let body: Vec<u8> = (0..=255u8).cycle().take(300_000).collect();
    let outcome = guest.run(Invocation {
        stdin: body.clone().into(),
        ..Invocation::default()
    });
    assert_eq!(outcome.status, Status::Success);
    let head = b"content-type: application/octet-stream\n\n";
    assert_eq!(&outcome.output.stdout[..head.len()], head);
    assert_eq!(&outcome.output.stdout[head.len()..], body.as_slice());
}

#[test]
fn a_module_without_start_is_rejected_at_load() {
    let engine = engine();
    let err = engine
        .load_bytes("lib.wat", b"(module (func (export \"run\")))")
        .err()
        .unwrap();
    assert!(
        err.to_string().contains("Function signature invalid"),
        "{err}"
    );
}
