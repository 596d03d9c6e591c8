#!/usr/bin/env bash
# Starts the Hearth Node server (v5, or legacy v2 when INTERNAL_RUNTIME_KEY is non-empty).
cd /usr/local/server
exec node --max-semi-space-size=16 /usr/local/server/server.js
