#!/usr/bin/env bash
# Wasm start: bash helpers/start.sh "bash helpers/server.sh".
# Everything happens in the shared steps; the server loads (and, if the build left no usable
# precompiled artifact, compiles) the module itself.
prepare_start() {
  :
}
# shellcheck disable=SC1091
source /usr/local/server/helpers/lib/start.sh "$@"
