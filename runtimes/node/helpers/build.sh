#!/usr/bin/env bash
# Node build: bash helpers/build.sh "<install command>" (e.g. "npm install").
# Everything happens in the shared steps; Node needs no preparation before the install command.
prepare_build() {
  :
}
# shellcheck disable=SC1091
source /usr/local/server/helpers/lib/build.sh "$@"
