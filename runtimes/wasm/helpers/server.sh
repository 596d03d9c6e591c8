#!/usr/bin/env bash
# Starts the Hearth Wasm server (v5, or legacy v2 when INTERNAL_RUNTIME_KEY is non-empty).
cd /usr/local/server
exec /usr/local/server/hearth-wasm-runtime
