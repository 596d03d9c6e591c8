#!/usr/bin/env bash
# Starts the HTTP server on 0.0.0.0:3000. The system interpreter on purpose: the function's venv
# may be first on PATH, and the server needs Debian's uvloop and httptools. Imported as a module (not run as a
# script) so the bytecode compiled into the image is used.
cd /usr/local/server || exit 1
exec /usr/bin/python3 -c 'import server; server.main()'
