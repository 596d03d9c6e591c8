#!/usr/bin/env bash
# Python start: the shared steps of runtimes/base/helpers/start.sh; the function's venv (extracted
# to src/function/runtime-env) is activated for subprocesses the function may start. The server
# itself runs on the system python3 and adds the venv's site-packages to sys.path (server.py).
# Usage: bash helpers/start.sh "bash helpers/server.sh"

prepare_start() {
  local venv=/usr/local/server/src/function/runtime-env
  if [ -d "$venv/bin" ]; then
    export VIRTUAL_ENV="$venv"
    export PATH="$venv/bin:$PATH"
  fi
}

# shellcheck disable=SC1091
source /usr/local/server/helpers/lib/start.sh "$@"
