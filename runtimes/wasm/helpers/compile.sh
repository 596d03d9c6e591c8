#!/usr/bin/env bash
# Post-install step of the Wasm build (run from the build directory by helpers/build.sh):
# 1. with HEARTH_WASM_COMPILE_C=1 (empty install command), each top-level `X.c` without an
#    `X.wasm` is compiled to `X.wasm` with Debian's clang for wasm32-wasi;
# 2. each top-level `.wasm`/`.wat` of the output directory is precompiled to `<file>.cwasm`.
#    A module that does not compile is left as it is: the server reports it (503) at start.
set -eo pipefail
shopt -s nullglob

if [ "${HEARTH_WASM_COMPILE_C:-0}" = 1 ]; then
  for source in *.c; do
    module="${source%.c}.wasm"
    [ -e "$module" ] && continue
    echo "Compiling $source to $module."
    clang --target=wasm32-wasi -O2 -o "$module" "$source"
  done
fi

output_dir=.
if [ -n "${OPEN_RUNTIMES_OUTPUT_DIRECTORY:-}" ]; then
  output_dir="$OPEN_RUNTIMES_OUTPUT_DIRECTORY"
fi
for module in "$output_dir"/*.wasm "$output_dir"/*.wat; do
  /usr/local/server/hearth-wasm-runtime precompile "$module" \
    || echo "Warning: $module could not be precompiled; the server will report why."
done
