;; Grows its memory by 64 pages (4 MiB) and answers `grown`: with a smaller memory limit
;; (`OPEN_RUNTIMES_MEMORY` below 5) the failed grow traps instead.
(module
  (import "wasi_snapshot_preview1" "fd_write"
    (func $fd_write (param i32 i32 i32 i32) (result i32)))
  (memory (export "memory") 1)
  (data (i32.const 16) "content-type: text/plain\n\ngrown")
  (func (export "_start")
    (if (i32.eq (memory.grow (i32.const 64)) (i32.const -1))
      (then unreachable))
    (i32.store (i32.const 0) (i32.const 16))
    (i32.store (i32.const 4) (i32.const 31))
    (drop (call $fd_write (i32.const 1) (i32.const 0) (i32.const 1) (i32.const 8)))))
