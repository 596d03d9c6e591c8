'use strict';
// Startup snapshot of the Node runtime (built in the image: `node --build-snapshot snapshot.js`,
// see the Dockerfile). The Debian Node build has no built-in snapshot nor code cache, so every
// start compiles Node's own bootstrap; starting from this blob skips that (about 50 ms less from
// exec to listen). Nothing of the server is captured: the deserialized main loads server.js
// through a regular CommonJS `require`, exactly as `node server.js` would, so configuration,
// environment and the user function are all read at start. helpers/server.sh falls back to
// `node server.js` when the blob is absent.
const { createRequire } = require('module');
// Built-ins the server loads anyway and that user snapshots support: compiled once, here.
require('fs');
require('path');
require('util');
require('url');
require('events');
require('stream');

const SERVER = '/usr/local/server/server.js';
require('v8').startupSnapshot.setDeserializeMainFunction(() => {
  createRequire(SERVER)(SERVER);
});
