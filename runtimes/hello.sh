#!/usr/bin/env bash
# Builds runtimes/<runtime>/example with the image's own build step, starts it the way the executor
# does (secret, start helper, port 3000 published on 127.0.0.1), calls it once, and cleans up.
# Usage: bash runtimes/hello.sh [node|python]
set -euo pipefail

runtime="${1:-node}"
case "$runtime" in
  node) image=hearth/node:v5-18; entry=index.js ;;
  python) image=hearth/python:v5-3.11; entry=main.py ;;
  *) echo "unknown runtime '$runtime' (node or python)" >&2; exit 2 ;;
esac
here="$(cd "$(dirname "$0")" && pwd)"
secret="$(head -c 16 /dev/urandom | od -An -tx1 | tr -d ' \n')"
work="$(mktemp -d)"
containers=()
cleanup() {
  [ "${#containers[@]}" -eq 0 ] || docker rm -f -v "${containers[@]}" >/dev/null 2>&1 || true
  rm -rf "$work"
}
trap cleanup EXIT

echo "building $runtime example in $image"
builder="$(docker create -e OPEN_RUNTIMES_ENTRYPOINT="$entry" "$image" bash helpers/build.sh "")"
containers+=("$builder")
docker cp "$here/$runtime/example/." "$builder:/mnt/code/" >/dev/null
docker start -a "$builder" | sed 's/^/  build: /'
docker cp "$builder:/mnt/code/code.tar.gz" "$work/code.tar.gz" >/dev/null

server="$(docker create -p 127.0.0.1::3000 -e OPEN_RUNTIMES_SECRET="$secret" "$image" \
  bash helpers/start.sh "bash helpers/server.sh")"
containers+=("$server")
docker cp "$work/code.tar.gz" "$server:/mnt/code/code.tar.gz" >/dev/null
docker start "$server" >/dev/null
port="$(docker port "$server" 3000/tcp | head -n 1 | sed 's/.*://')"

for _ in $(seq 1 200); do
  curl -fsS "http://127.0.0.1:$port/__opr/health" >/dev/null 2>&1 && break
  sleep 0.05
done

echo "calling the function: curl -H 'x-open-runtimes-secret: ...' http://127.0.0.1:$port/"
curl -sS -i -H "x-open-runtimes-secret: $secret" "http://127.0.0.1:$port/"
echo
