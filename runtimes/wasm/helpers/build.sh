#!/usr/bin/env bash
# Wasm build: bash helpers/build.sh "<install command>".
# The shared steps run the install command (e.g. a clang line that links a vendored library);
# then helpers/compile.sh turns sources into modules: with an empty install command every
# top-level `X.c` becomes `X.wasm` (clang --target=wasm32-wasi), and every `.wasm`/`.wat` is
# precompiled into `X.cwasm` next to it, so the server never compiles at start.
prepare_build() {
  :
}
install_command="${1:-}"
if [ -n "$install_command" ]; then
  step="( ${install_command}
) && HEARTH_WASM_COMPILE_C=0 bash /usr/local/server/helpers/compile.sh"
else
  step="HEARTH_WASM_COMPILE_C=1 bash /usr/local/server/helpers/compile.sh"
fi
# shellcheck disable=SC1091
source /usr/local/server/helpers/lib/build.sh "$step"
