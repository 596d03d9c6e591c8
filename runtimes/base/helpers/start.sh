# Shared start steps of every Hearth runtime image (sourced by each image's helpers/start.sh).
#
# Contract (runtime-protocol.md §1): extract /mnt/code/code.tar.gz (or code.tar; gzip detected by
# its magic bytes; /tmp/code.tar.gz, where an executor presents a source, as the last resort) into /usr/local/server/src/function, source its `.open-runtimes` with allexport,
# run the image's `prepare_start` hook, then exec the server command given as $1.
# Pool mode: no archive but a non-empty OPEN_RUNTIMES_POOL_SECRET; only the folders, then the server.
# The caller defines `prepare_start` (may be a no-op) before sourcing this file.
set -eo pipefail

server_command="${1:-bash helpers/server.sh}"
function_dir=/usr/local/server/src/function
started="$EPOCHREALTIME"

exec_server() {
  # The standard command needs no `bash -c` in between (it would only exec it).
  if [ "$server_command" = "bash helpers/server.sh" ]; then
    exec bash helpers/server.sh
  fi
  exec bash -c "$server_command"
}

archive=""
for candidate in /mnt/code/code.tar.gz /mnt/code/code.tar /tmp/code.tar.gz /tmp/code.tar; do
  if [ -f "$candidate" ]; then archive="$candidate"; break; fi
done
if [ -z "$archive" ] && [ -z "${OPEN_RUNTIMES_POOL_SECRET:-}" ]; then
  echo "Code archive not found."
  exit 1
fi

# Builtins only where they suffice: every process spawned here delays the server's start.
if [ ! -d "$function_dir" ] || [ ! -d /mnt/logs ] || [ ! -d /mnt/telemetry ]; then
  mkdir -p "$function_dir" /mnt/logs /mnt/telemetry
fi

# Pool mode (pool-protocol.md): no code yet. The server receives archive and env over
# `POST /__hearth/specialise` and does the steps below itself, so neither `.open-runtimes` nor
# `prepare_start` runs here, and the server records the extract timing.
if [ -z "$archive" ]; then
  cd /usr/local/server
  exec_server
fi

magic=""
LC_ALL=C IFS= read -r -d '' -n 2 magic < "$archive" || true
if [ "$magic" = $'\x1f\x8b' ]; then
  tar -xzf "$archive" -C "$function_dir"
else
  tar -xf "$archive" -C "$function_dir"
fi

if [ -f "$function_dir/.open-runtimes" ]; then
  set -a
  # shellcheck disable=SC1091
  source "$function_dir/.open-runtimes"
  set +a
fi

cd /usr/local/server
prepare_start

# EPOCHREALTIME has 6 decimals: subtract as integer microseconds.
now="$EPOCHREALTIME"
elapsed=$(( 10#${now/[.,]/} - 10#${started/[.,]/} ))
printf 'extract=%d.%06d\n' $((elapsed / 1000000)) $((elapsed % 1000000)) > /mnt/telemetry/timings.txt

exec_server
