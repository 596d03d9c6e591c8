#!/usr/bin/env bash
# Builds hearth/base:bookworm from Debian's packages, with no registry: debootstrap + docker import.
# A no-op when the image exists and was built from the same inputs (suite, package list, mirror and
# the slimming steps' revision), which the image carries in its `hearth.inputs` label.
set -euo pipefail

IMAGE="${HEARTH_BASE_IMAGE:-hearth/base:bookworm}"
MIRROR="${DEBIAN_MIRROR:-http://deb.debian.org/debian}"
# The language interpreters live in the base; each runtime image adds its own tools (npm, ...) with
# apt-get inside `docker build`.
PACKAGES="bash,tar,gzip,bsdutils,util-linux,ca-certificates,procps,nodejs,python3,python3-venv,python3-pip,python3-aiohttp"

# Bump when the steps below change what ends up in the image.
REVISION=1
inputs="$(printf '%s|%s|%s|%s' bookworm "$PACKAGES" "$MIRROR" "$REVISION" | sha256sum | cut -c1-16)"

if current="$(docker image inspect --format '{{ index .Config.Labels "hearth.inputs" }}' "$IMAGE" 2>/dev/null)" \
    && [ "$current" = "$inputs" ]; then
  echo "$IMAGE is up to date (inputs $inputs)"
  exit 0
fi

if ! command -v debootstrap >/dev/null; then
  if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null; then
    echo "installing debootstrap"
    apt-get update -q >/dev/null && DEBIAN_FRONTEND=noninteractive apt-get install -y -q debootstrap >/dev/null
  else
    echo "debootstrap is missing: sudo apt-get install -y debootstrap" >&2
    exit 1
  fi
fi

root="$(mktemp -d /tmp/hearth-base.XXXXXX)"
trap 'rm -rf "$root"' EXIT
echo "debootstrap bookworm into $root (this takes a few minutes)"
debootstrap --variant=minbase --include="$PACKAGES" bookworm "$root" "$MIRROR" >"$root.log" 2>&1 \
  || { tail -n 40 "$root.log" >&2; rm -f "$root.log"; exit 1; }
rm -f "$root.log"

# Slim the root: package caches and docs are not needed at run time.
rm -rf "$root"/var/cache/apt/archives/*.deb "$root"/var/lib/apt/lists/* \
  "$root"/usr/share/doc/* "$root"/usr/share/man/* "$root"/usr/share/info/*
echo "deb $MIRROR bookworm main" > "$root/etc/apt/sources.list"

tar -C "$root" -c . | docker import \
  --change 'ENV PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin' \
  --change 'ENV LANG=C.UTF-8' \
  --change "LABEL hearth.inputs=$inputs" \
  --change 'CMD ["bash"]' \
  - "$IMAGE" >/dev/null
echo "built $IMAGE (inputs $inputs)"
