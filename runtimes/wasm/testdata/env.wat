;; Answers with its environment, one `KEY=value` per line (text/plain): what a guest can see.
(module
  (import "wasi_snapshot_preview1" "environ_sizes_get"
    (func $environ_sizes_get (param i32 i32) (result i32)))
  (import "wasi_snapshot_preview1" "environ_get"
    (func $environ_get (param i32 i32) (result i32)))
  (import "wasi_snapshot_preview1" "fd_write"
    (func $fd_write (param i32 i32 i32 i32) (result i32)))
  ;; 0: iovec, 8: written, 16: count, 20: size of the strings, 64: the header,
  ;; 1024: the pointers, 65536: the strings (up to 192 KiB).
  (memory (export "memory") 4)
  (data (i32.const 64) "content-type: text/plain\n\n")
  (func (export "_start")
    (local $i i32)
    (local $end i32)
    (drop (call $environ_sizes_get (i32.const 16) (i32.const 20)))
    (drop (call $environ_get (i32.const 1024) (i32.const 65536)))
    ;; The strings are NUL-terminated and contiguous: each NUL becomes a newline.
    (local.set $i (i32.const 65536))
    (local.set $end (i32.add (i32.const 65536) (i32.load (i32.const 20))))
    (block $done
      (loop $next
        (br_if $done (i32.ge_u (local.get $i) (local.get $end)))
        (if (i32.eqz (i32.load8_u (local.get $i)))
          (then (i32.store8 (local.get $i) (i32.const 10))))
        (local.set $i (i32.add (local.get $i) (i32.const 1)))
        (br $next)))
    (i32.store (i32.const 0) (i32.const 64))
    (i32.store (i32.const 4) (i32.const 26))
    (drop (call $fd_write (i32.const 1) (i32.const 0) (i32.const 1) (i32.const 8)))
    (i32.store (i32.const 0) (i32.const 65536))
    (i32.store (i32.const 4) (i32.load (i32.const 20)))
    (drop (call $fd_write (i32.const 1) (i32.const 0) (i32.const 1) (i32.const 8)))))
