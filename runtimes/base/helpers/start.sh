# Shared start steps of every Hearth runtime image (sourced by each image's helpers/start.sh).
#
# Contract (runtime-protocol.md §1): extract /mnt/code/code.tar.gz (or code.tar; gzip detected by
# its magic bytes; /tmp/code.tar.gz, where an executor presents a source, as the last resort) into /usr/local/server/src/function, source its `.open-runtimes` with allexport,
# run the image's `prepare_start` hook, then exec the server command given as $1.
# The caller defines `prepare_start` (may be a no-op) before sourcing this file.
set -eo pipefail

server_command="${1:-bash helpers/server.sh}"
function_dir=/usr/local/server/src/function
started="$EPOCHREALTIME"

archive=""
for candidate in /mnt/code/code.tar.gz /mnt/code/code.tar /tmp/code.tar.gz /tmp/code.tar; do
  if [ -f "$candidate" ]; then archive="$candidate"; break; fi
done
if [ -z "$archive" ]; then
  echo "Code archive not found."
  exit 1
fi

mkdir -p "$function_dir" /mnt/logs /mnt/telemetry
if [ "$(head -c 2 "$archive" | od -An -tx1 | tr -d ' \n')" = "1f8b" ]; then
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

elapsed="$(awk -v a="$started" -v b="$EPOCHREALTIME" 'BEGIN { printf "%.6f", b - a }')"
echo "extract=$elapsed" > /mnt/telemetry/timings.txt

exec bash -c "$server_command"
