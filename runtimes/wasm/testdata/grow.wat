;; Grows its memory a page at a time until growing fails, then reports via `unreachable` (with the
;; server's limiter the failed grow already traps).
(module
  (memory (export "memory") 1)
  (func (export "_start")
    (loop $more
      (if (i32.eq (memory.grow (i32.const 1)) (i32.const -1))
        (then unreachable))
      (br $more))))
