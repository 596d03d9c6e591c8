#!/usr/bin/env bash
# Starts the Hearth Node server (v5, or legacy v2 when INTERNAL_RUNTIME_KEY is non-empty).
# From the startup snapshot built into the image (server/snapshot.js) when present: it loads
# server.js like `node server.js` does, but skips compiling Node's own bootstrap. V8 refuses a
# snapshot built under other V8 flags, so any NODE_OPTIONS (the user's) means a plain start; the
# flags below must stay the ones the Dockerfile builds the snapshot with.
cd /usr/local/server
if [ -z "${NODE_OPTIONS:-}" ] && [ -f /usr/local/server/server.blob ]; then
  exec node --max-semi-space-size=16 --snapshot-blob /usr/local/server/server.blob
fi
exec node --max-semi-space-size=16 /usr/local/server/server.js
