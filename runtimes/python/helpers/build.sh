#!/usr/bin/env bash
# Python build: the shared steps of runtimes/base/helpers/build.sh with a venv `runtime-env` in the
# build dir, so `pip install -r requirements.txt` lands in it and ships inside code.tar.gz.
# Usage: bash helpers/build.sh "<install command>"
#
# The venv is created without its own copy of pip and setuptools (~7 MB gzipped, 1,600 files that
# every cold start would have to extract): a .pth file puts the image's pip and setuptools wheels
# (Debian's python3-pip-whl / python3-setuptools-whl, present at build and at run time) on the
# venv's path, and bin/pip* run `python -m pip`. So `pip install`, `python -m pip` and offline
# builds of local setup.py / pyproject packages work as in a regular venv.

prepare_build() {
  local wheels=/usr/share/python-wheels
  python3 -m venv --without-pip runtime-env
  local site_packages
  site_packages="$(runtime-env/bin/python -c 'import sysconfig; print(sysconfig.get_path("purelib"))')"
  # shellcheck disable=SC2012
  ls "$wheels"/pip-*.whl "$wheels"/setuptools-*.whl > "$site_packages/_hearth_build_tools.pth"
  local shim
  for shim in pip pip3 "pip3.$(runtime-env/bin/python -c 'import sys; print(sys.version_info[1])')"; do
    printf '#!/bin/sh\nexec "$(dirname "$0")/python" -m pip "$@"\n' > "runtime-env/bin/$shim"
    chmod +x "runtime-env/bin/$shim"
  done
  # shellcheck disable=SC1091
  source runtime-env/bin/activate
}

# shellcheck disable=SC1091
source /usr/local/server/helpers/lib/build.sh "$@"
