#!/usr/bin/env bash
# Node start: bash helpers/start.sh "bash helpers/server.sh".
# Everything happens in the shared steps; Node needs no preparation before the server starts.
prepare_start() {
  :
}
# shellcheck disable=SC1091
source /usr/local/server/helpers/lib/start.sh "$@"
