'use strict';
// Hearth Node runtime server: Open Runtimes protocol v5, and legacy v2 when INTERNAL_RUNTIME_KEY
// is non-empty. Built-in modules only. See /work/shared/spec/runtime-protocol.md for the contract.

const http = require('http');
const fs = require('fs');
const path = require('path');
const util = require('util');
const { pathToFileURL } = require('url');
const { AsyncLocalStorage } = require('async_hooks');

// ---------------------------------------------------------------------------------------------
// Configuration, read once at start (in pool mode: again once specialised, see readConfig).
// ---------------------------------------------------------------------------------------------
const env = process.env;
// Pool mode (runtimes/pool-protocol.md): read once, then gone from the environment at once, so
// neither the function nor a process it starts can see it. v2 is never pooled.
const POOL_SECRET = env.OPEN_RUNTIMES_POOL_SECRET || '';
if (env.OPEN_RUNTIMES_POOL_SECRET !== undefined) {
  delete env.OPEN_RUNTIMES_POOL_SECRET;
  scrubEnviron('OPEN_RUNTIMES_POOL_SECRET');
}
const PORT = 3000;
// Hearth extension (runtimes/socket.md): the same server on a Unix socket as well, in a folder the
// executor shares with the container, so its calls skip TCP and the bridge. Read once at start.
const SOCKET = env.OPEN_RUNTIMES_SOCKET || '';
const FUNCTION_DIR = '/usr/local/server/src/function';
const LOGS_DIR = '/mnt/logs';
const TIMINGS_FILE = '/mnt/telemetry/timings.txt';
const V2_KEY = env.INTERNAL_RUNTIME_KEY || '';
const V2 = V2_KEY !== '';
const POOLED = POOL_SECRET !== '' && !V2;
let SECRET = '';
let DEV = false;
let ENTRYPOINT = '';
// OPEN_RUNTIMES_HEADERS: lower-cased keys, stringified values, forced onto every request.
const FORCED_HEADERS = [];
const BODY_LIMIT = 20 * 1024 * 1024;
const LOG_LIMIT = 8000;
const LOG_TRUNCATED = '... Log truncated due to size limit (8000 characters)';
const NATIVE_NOTICE = 'Native logs detected. Use context.log() or context.error() for better experience.';
const MSG_TIMEOUT_HEADER = 'Header "x-open-runtimes-timeout" must be an integer greater than 0.';
const MSG_UNAUTHORIZED = 'Unauthorized. Provide correct "x-open-runtimes-secret" header.';
const MSG_NO_RETURN = 'Return statement missing. return context.res.empty() if no response is expected.';
const MSG_SIGNATURE = "Function signature invalid. Did you forget to export a 'main' function?";
const MSG_TIMED_OUT = 'Execution timed out.';
const MSG_TOO_LARGE = 'Request body is larger than 20MB.';
const EMPTY = Buffer.alloc(0);
const MAX_TIMER_MS = 2147483647;

// Every setting taken from the environment: at start, and in pool mode once specialised.
function readConfig() {
  SECRET = env.OPEN_RUNTIMES_SECRET || '';
  DEV = env.OPEN_RUNTIMES_ENV === 'development';
  ENTRYPOINT = (V2 ? env.INTERNAL_RUNTIME_ENTRYPOINT || env.OPEN_RUNTIMES_ENTRYPOINT
    : env.OPEN_RUNTIMES_ENTRYPOINT || env.INTERNAL_RUNTIME_ENTRYPOINT) || '';
  FORCED_HEADERS.length = 0;
  try {
    const parsed = JSON.parse(env.OPEN_RUNTIMES_HEADERS || '{}');
    if (parsed !== null && typeof parsed === 'object' && !Array.isArray(parsed)) {
      for (const key of Object.keys(parsed)) {
        const value = parsed[key];
        FORCED_HEADERS.push([key.toLowerCase(), typeof value === 'string' ? value
          : value !== null && typeof value === 'object' ? JSON.stringify(value) : String(value)]);
      }
    }
  } catch (err) {
    process.stderr.write(`Ignoring invalid OPEN_RUNTIMES_HEADERS: ${err.message}\n`);
  }
}
// A pool member has no function yet: its settings are read when it gets one.
if (!POOLED) readConfig();

// ---------------------------------------------------------------------------------------------
// Log ids: 20 characters of [a-z0-9] from a pool refilled from /dev/urandom (one read per 204
// ids; reading the device directly avoids loading `crypto`, which costs ~10 ms of start time).
// ---------------------------------------------------------------------------------------------
const ID_ALPHABET = Buffer.from('abcdefghijklmnopqrstuvwxyz0123456789', 'latin1');
const ID_POOL = Buffer.alloc(4080); // random bytes, mapped in place to alphabet characters
let idOffset = ID_POOL.length;
let urandom = -1;
function refillIdPool() {
  try {
    if (urandom < 0) urandom = fs.openSync('/dev/urandom', 'r');
    if (fs.readSync(urandom, ID_POOL, 0, ID_POOL.length, null) !== ID_POOL.length) throw new Error('short read');
  } catch (_) {
    for (let i = 0; i < ID_POOL.length; i++) ID_POOL[i] = (Math.random() * 256) | 0;
  }
  for (let i = 0; i < ID_POOL.length; i++) ID_POOL[i] = ID_ALPHABET[ID_POOL[i] % 36];
}
function newLogId() {
  if (idOffset + 20 > ID_POOL.length) {
    refillIdPool();
    idOffset = 0;
  }
  const id = ID_POOL.latin1Slice(idOffset, idOffset + 20);
  idOffset += 20;
  return id;
}

// Log ids come from the executor; keep them inside /mnt/logs.
function safeId(id) {
  return /[/\\\0]/.test(id) || id === '.' || id === '..' ? id.replace(/[/\\\0.]/g, '_') : id;
}

// ---------------------------------------------------------------------------------------------
// Log formatting and the per-request buffer (each file written once, at the end of the call).
// ---------------------------------------------------------------------------------------------
function formatValue(value) {
  if (typeof value === 'string') return value;
  if (value instanceof Error) return value.stack || String(value);
  if (value === undefined || typeof value === 'bigint' || typeof value === 'symbol' || typeof value === 'function') {
    return String(value);
  }
  try {
    const json = JSON.stringify(value);
    return json === undefined ? String(value) : json;
  } catch (_) {
    return util.inspect(value, { depth: 4, breakLength: Infinity });
  }
}

function formatArgs(args) {
  if (args.length === 1) return formatValue(args[0]);
  let out = '';
  for (let i = 0; i < args.length; i++) {
    if (i > 0) out += ' ';
    out += formatValue(args[i]);
  }
  return out;
}

function limit(message) {
  return message.length > LOG_LIMIT ? message.slice(0, LOG_LIMIT) + LOG_TRUNCATED : message;
}

class Store {
  constructor(id, enabled) {
    this.id = id;
    this.enabled = enabled;
    this.done = false;
    this.logs = null; // string[] once something is logged
    this.errors = null;
    this.native = false;
    this.v2 = false; // v2: native output captured into stdout / stderr strings
    this.stdout = '';
    this.stderr = '';
    this.res = null; // v5: the response, for the deadline
    this.due = 0; // v5: deadline (Date.now() ms) while listed in the pending calls
    this.prev = null;
    this.next = null;
  }

  log(message) {
    if (!this.enabled || this.done) return;
    (this.logs || (this.logs = [])).push(limit(message) + '\n');
  }

  error(message) {
    if (!this.enabled || this.done) return;
    (this.errors || (this.errors = [])).push(limit(message) + '\n');
  }

  nativeLog(message) {
    if (!this.enabled || this.done) return;
    const logs = this.logs || (this.logs = []);
    if (!this.native) {
      this.native = true;
      logs.push(NATIVE_NOTICE + '\n');
    }
    logs.push(limit(message) + '\n');
  }

  // Ends the call: appends both files (in development the id `dev` repeats); nothing logged, no I/O.
  flush() {
    this.done = true;
    if (!this.enabled) return;
    if (this.logs !== null) writeLog(`${LOGS_DIR}/${this.id}_logs.log`, this.logs);
    if (this.errors !== null) writeLog(`${LOGS_DIR}/${this.id}_errors.log`, this.errors);
  }
}

function writeLog(file, entries) {
  try {
    fs.appendFileSync(file, entries.length === 1 ? entries[0] : entries.join(''));
  } catch (err) {
    process.stderr.write(`Failed to write ${file}: ${err.message}\n`);
  }
}

// ---------------------------------------------------------------------------------------------
// Deadlines (x-open-runtimes-timeout): one timer for every pending call, armed for the earliest
// deadline, instead of a setTimeout per call (each one an async resource and a timer-list insert).
// ---------------------------------------------------------------------------------------------
let pendingHead = null; // doubly linked list of the calls waiting with a deadline
let deadlineTimer = null;
let deadlineDue = Infinity;

function addDeadline(store, timeoutMs) {
  const due = Date.now() + timeoutMs;
  store.due = due;
  store.next = pendingHead;
  if (pendingHead !== null) pendingHead.prev = store;
  pendingHead = store;
  if (due < deadlineDue) armDeadlines(due, timeoutMs);
}

function removeDeadline(store) {
  if (store.due === 0) return;
  store.due = 0;
  if (store.prev !== null) store.prev.next = store.next;
  else pendingHead = store.next;
  if (store.next !== null) store.next.prev = store.prev;
  store.prev = null;
  store.next = null;
}

function armDeadlines(due, delay) {
  if (deadlineTimer !== null) clearTimeout(deadlineTimer);
  deadlineDue = due;
  deadlineTimer = setTimeout(onDeadlines, delay);
}

function onDeadlines() {
  deadlineTimer = null;
  deadlineDue = Infinity;
  const now = Date.now();
  let next = Infinity;
  for (let store = pendingHead; store !== null;) {
    const after = store.next;
    if (store.due <= now) {
      removeDeadline(store);
      if (!store.done) {
        store.error(MSG_TIMED_OUT);
        store.flush();
        sendEmpty(store.res, 500, store.id);
      }
    } else if (store.due < next) {
      next = store.due;
    }
    store = after;
  }
  if (next !== Infinity) armDeadlines(next, next - now);
}

// ---------------------------------------------------------------------------------------------
// Native console routing: during a call, console output goes to that call's buffer.
// ---------------------------------------------------------------------------------------------
const als = new AsyncLocalStorage();
const nativeConsole = {};
for (const method of ['log', 'info', 'debug', 'warn', 'error', 'trace']) {
  const original = console[method].bind(console);
  nativeConsole[method] = original;
  const toStderr = method === 'warn' || method === 'error' || method === 'trace';
  console[method] = function (...args) {
    const store = als.getStore();
    if (store === undefined || store.done) return original(...args);
    const message = util.format(...args);
    if (store.v2) {
      if (toStderr) store.stderr += message + '\n';
      else store.stdout += message + '\n';
    } else {
      store.nativeLog(message);
    }
  };
}

// Errors thrown outside the awaited chain (timers, stray rejections) must not kill the server.
function strayError(err) {
  const store = als.getStore();
  const message = formatValue(err);
  if (store !== undefined && !store.done) {
    if (store.v2) store.stderr += message + '\n';
    else store.error(message);
  } else {
    process.stderr.write(message + '\n');
  }
}
process.on('uncaughtException', strayError);
process.on('unhandledRejection', strayError);

// ---------------------------------------------------------------------------------------------
// User function: loaded once, the result (function or failure) cached.
// ---------------------------------------------------------------------------------------------
let loaded = null; // { fn } | { error } | Promise<{ fn } | { error }>

function pickFunction(mod) {
  if (typeof mod === 'function') return mod;
  if (mod !== null && typeof mod === 'object') {
    if (typeof mod.default === 'function') return mod.default;
    if (typeof mod.main === 'function') return mod.main;
    const inner = mod.default;
    if (inner !== null && typeof inner === 'object') {
      if (typeof inner.default === 'function') return inner.default;
      if (typeof inner.main === 'function') return inner.main;
    }
  }
  return null;
}

function fromModule(mod) {
  const fn = pickFunction(mod);
  return fn === null ? { error: MSG_SIGNATURE } : { fn };
}

function fromError(err) {
  return { error: (err && err.stack) || String(err) };
}

function importModule(file) {
  return import(pathToFileURL(file).href).then(fromModule, fromError);
}

function loadFunction() {
  const file = path.resolve(FUNCTION_DIR, ENTRYPOINT);
  let isFile = false;
  try {
    isFile = ENTRYPOINT !== '' && fs.statSync(file).isFile();
  } catch (_) {
    isFile = false;
  }
  if (!isFile) return { error: `Failed to load entrypoint, file ${ENTRYPOINT} does not exist.` };
  if (file.endsWith('.mjs')) return importModule(file);
  try {
    return fromModule(require(file));
  } catch (err) {
    if (err && err.code === 'ERR_REQUIRE_ESM') return importModule(file);
    return fromError(err);
  }
}

function getFunction() {
  if (loaded === null) {
    try {
      loaded = loadFunction();
    } catch (err) {
      loaded = fromError(err);
    }
    if (typeof loaded.then === 'function') loaded.then((result) => { loaded = result; });
  }
  return loaded;
}

// ---------------------------------------------------------------------------------------------
// context.res: every method returns a response value; only the returned one is sent.
// ---------------------------------------------------------------------------------------------
function withHeader(headers, name, value) {
  const merged = {};
  if (headers !== null && typeof headers === 'object') {
    for (const key of Object.keys(headers)) if (key.toLowerCase() !== name) merged[key] = headers[key];
  }
  merged[name] = value;
  return merged;
}
function resSend(body, statusCode = 200, headers = {}) {
  return { body, statusCode, headers };
}
function resBinary(bytes, statusCode = 200, headers = {}) {
  return { body: bytes, statusCode, headers };
}
function resText(body, statusCode = 200, headers = {}) {
  return { body: body === undefined || body === null ? '' : String(body), statusCode, headers };
}
function resJson(obj, statusCode = 200, headers = {}) {
  return { body: JSON.stringify(obj), statusCode, headers: withHeader(headers, 'content-type', 'application/json') };
}
function resEmpty() {
  return { body: '', statusCode: 204, headers: {} };
}
function resRedirect(url, statusCode = 301, headers = {}) {
  return { body: '', statusCode, headers: withHeader(headers, 'location', url) };
}

// ---------------------------------------------------------------------------------------------
// context.req
// ---------------------------------------------------------------------------------------------
function parseQuery(queryString) {
  const query = {};
  if (queryString === '') return query;
  for (const part of queryString.split('&')) {
    if (part === '') continue;
    const eq = part.indexOf('=');
    if (eq === -1) query[part] = '';
    else if (eq > 0) query[part.slice(0, eq)] = part.slice(eq + 1);
  }
  return query;
}

class Request {
  constructor(nodeReq, body) {
    const raw = nodeReq.headers;
    const headers = {};
    for (const key in raw) {
      if (key.charCodeAt(0) === 120 /* x */ && key.startsWith('x-open-runtimes-')) continue;
      headers[key] = raw[key];
    }
    for (let i = 0; i < FORCED_HEADERS.length; i++) headers[FORCED_HEADERS[i][0]] = FORCED_HEADERS[i][1];

    const forwarded = raw['x-forwarded-proto'];
    const scheme = forwarded ? forwarded.split(',')[0].trim().toLowerCase() || 'http' : 'http';
    const defaultPort = scheme === 'https' ? 443 : 80;
    let host = raw.host || '';
    let port = defaultPort;
    const colon = host.lastIndexOf(':');
    if (colon !== -1 && colon > host.lastIndexOf(']')) {
      const parsed = parseInt(host.slice(colon + 1), 10);
      if (!Number.isNaN(parsed)) port = parsed;
      host = host.slice(0, colon);
    }

    const target = nodeReq.url || '/';
    const q = target.indexOf('?');
    const urlPath = q === -1 ? target : target.slice(0, q);
    const queryString = q === -1 ? '' : target.slice(q + 1);

    this.bodyBinary = body;
    this.headers = headers;
    this.method = nodeReq.method;
    this.host = host;
    this.scheme = scheme;
    this.query = parseQuery(queryString);
    this.queryString = queryString;
    this.port = port;
    this.url = `${scheme}://${host}${port === defaultPort ? '' : ':' + port}${urlPath}${queryString === '' ? '' : '?' + queryString}`;
    this.path = urlPath;
  }

  get bodyText() {
    return this.bodyBinary.length === 0 ? '' : this.bodyBinary.toString('utf8');
  }

  get bodyRaw() {
    return this.bodyText;
  }

  get bodyJson() {
    const text = this.bodyText;
    return text === '' ? {} : JSON.parse(text);
  }

  get body() {
    const contentType = this.headers['content-type'];
    if (typeof contentType === 'string' && contentType.toLowerCase().startsWith('application/json')) {
      return this.bodyJson;
    }
    return this.bodyText;
  }
}

// ---------------------------------------------------------------------------------------------
// HTTP helpers
// ---------------------------------------------------------------------------------------------
function sendPlain(res, status, body, logId) {
  const headers = { 'content-type': 'text/plain; charset=utf-8', 'content-length': Buffer.byteLength(body) };
  if (logId !== undefined) headers['x-open-runtimes-log-id'] = logId;
  res.writeHead(status, headers);
  res.end(body);
}

function sendEmpty(res, status, logId) {
  res.writeHead(status, { 'content-type': 'text/plain; charset=utf-8', 'content-length': 0, 'x-open-runtimes-log-id': logId });
  res.end();
}

// GET /__opr/health and /__opr/timings: no auth, no logging.
function handleInternal(req, res) {
  const url = req.url;
  if (url === '/__opr/health') {
    sendPlain(res, 200, 'OK');
    return true;
  }
  if (url === '/__opr/timings') {
    fs.readFile(TIMINGS_FILE, (err, data) => {
      const body = err ? EMPTY : data;
      res.writeHead(200, { 'content-type': 'text/plain; charset=utf-8', 'content-length': body.length });
      res.end(body);
    });
    return true;
  }
  return false;
}

// Reads the body into one Buffer. Past 20 MiB: 413 at once; the rest is discarded, never buffered.
function readBody(req, res, logId, done) {
  const headers = req.headers;
  const contentLength = headers['content-length'];
  if (headers['transfer-encoding'] === undefined && (contentLength === undefined || contentLength === '0')) {
    done(EMPTY);
    return;
  }
  if (contentLength !== undefined && Number(contentLength) > BODY_LIMIT) {
    sendPlain(res, 413, MSG_TOO_LARGE, logId);
    return;
  }
  const chunks = [];
  let size = 0;
  let over = false;
  req.on('data', (chunk) => {
    if (over) return;
    size += chunk.length;
    if (size > BODY_LIMIT) {
      over = true;
      chunks.length = 0;
      sendPlain(res, 413, MSG_TOO_LARGE, logId);
      return;
    }
    chunks.push(chunk);
  });
  req.on('end', () => {
    if (over) return;
    done(chunks.length === 1 ? chunks[0] : chunks.length === 0 ? EMPTY : Buffer.concat(chunks, size));
  });
  req.on('error', () => {});
}

// ---------------------------------------------------------------------------------------------
// v5
// ---------------------------------------------------------------------------------------------
let lastTimeoutHeader = '';
let lastTimeoutMs = 0;

function onRequest(req, res) {
  if (handleInternal(req, res)) return;
  const headers = req.headers;

  // 2. Logging and log id.
  const loggingHeader = headers['x-open-runtimes-logging'];
  const logging = loggingHeader === undefined || loggingHeader.toLowerCase() !== 'disabled';
  let logId = '';
  if (logging) {
    const given = headers['x-open-runtimes-log-id'];
    logId = given ? safeId(given) : DEV ? 'dev' : newLogId();
  }

  // 3. Timeout header (executors repeat the same value: the last one parsed is kept).
  let timeoutMs = 0;
  const timeoutHeader = headers['x-open-runtimes-timeout'];
  if (timeoutHeader !== undefined) {
    if (timeoutHeader === lastTimeoutHeader) {
      timeoutMs = lastTimeoutMs;
    } else {
      const seconds = /^[0-9]+$/.test(timeoutHeader) ? Number(timeoutHeader) : 0;
      if (!(seconds > 0)) {
        sendPlain(res, 500, MSG_TIMEOUT_HEADER, logId);
        return;
      }
      timeoutMs = seconds * 1000;
      lastTimeoutHeader = timeoutHeader;
      lastTimeoutMs = timeoutMs;
    }
  }

  // 4. Secret.
  if (SECRET !== '' && headers['x-open-runtimes-secret'] !== SECRET) {
    sendPlain(res, 500, MSG_UNAUTHORIZED, logId);
    return;
  }

  // 5. Body, then the call inside this request's async context.
  if (headers['transfer-encoding'] === undefined) {
    const contentLength = headers['content-length'];
    if (contentLength === undefined || contentLength === '0') {
      startCall(req, res, EMPTY, logId, logging, timeoutMs);
      return;
    }
  }
  readBody(req, res, logId, (body) => startCall(req, res, body, logId, logging, timeoutMs));
}

function startCall(req, res, body, logId, logging, timeoutMs) {
  const store = new Store(logId, logging);
  store.res = res;
  als.run(store, execute, req, res, body, store, timeoutMs);
}

function execute(req, res, body, store, timeoutMs) {
  const result = getFunction();
  if (typeof result.then === 'function') result.then((r) => invoke(r, req, res, body, store, timeoutMs));
  else invoke(result, req, res, body, store, timeoutMs);
}

function invoke(loadedFn, req, res, body, store, timeoutMs) {
  if (loadedFn.error !== undefined) {
    store.error(loadedFn.error);
    store.flush();
    sendEmpty(res, 503, store.id);
    return;
  }

  const onError = (err) => {
    if (store.done) return;
    removeDeadline(store);
    store.error(formatValue(err));
    store.flush();
    sendEmpty(res, 500, store.id);
  };

  let output;
  try {
    const context = {
      req: new Request(req, body),
      res: { send: resSend, text: resText, binary: resBinary, json: resJson, empty: resEmpty, redirect: resRedirect },
      log: (...args) => store.log(formatArgs(args)),
      error: (...args) => store.error(formatArgs(args)),
    };
    const fn = loadedFn.fn;
    output = fn(context);
  } catch (err) {
    onError(err);
    return;
  }
  if (output !== null && typeof output === 'object' && typeof output.then === 'function') {
    if (timeoutMs > 0 && timeoutMs <= MAX_TIMER_MS) addDeadline(store, timeoutMs);
    output.then((value) => {
      if (store.done) return;
      removeDeadline(store);
      respond(res, store, value);
    }, onError);
  } else {
    respond(res, store, output);
  }
}

// Response body as a string (sent in the same write as the headers) or a Buffer.
function normalizeBody(body) {
  if (typeof body === 'string') return body;
  if (body === undefined || body === null) return '';
  if (Buffer.isBuffer(body)) return body;
  if (body instanceof Uint8Array) return Buffer.from(body.buffer, body.byteOffset, body.byteLength);
  if (body instanceof ArrayBuffer) return Buffer.from(body);
  if (typeof body === 'object') return JSON.stringify(body);
  return String(body);
}

function respond(res, store, output) {
  if (output === null || output === undefined || typeof output !== 'object') {
    store.error(MSG_NO_RETURN);
    store.flush();
    sendEmpty(res, 500, store.id);
    return;
  }

  let body;
  try {
    body = normalizeBody(output.body);
  } catch (err) {
    store.error(formatValue(err));
    store.flush();
    sendEmpty(res, 500, store.id);
    return;
  }
  const statusCode = output.statusCode === undefined || output.statusCode === null ? 200 : Number(output.statusCode);
  const outHeaders = {};
  let contentType = 'text/plain';
  const given = output.headers;
  if (given !== null && typeof given === 'object') {
    for (const key of Object.keys(given)) {
      const name = key.toLowerCase();
      if (name.startsWith('x-open-runtimes-') || name === 'content-length' || name === 'transfer-encoding') continue;
      const value = given[key];
      if (value === undefined || value === null) continue;
      if (name === 'content-type') {
        contentType = String(value);
        continue;
      }
      outHeaders[name] = Array.isArray(value) ? value.map(String) : String(value);
    }
  }
  const lowerType = contentType.toLowerCase();
  if (!lowerType.startsWith('multipart/')) {
    contentType = lowerType.includes('charset=') ? lowerType : lowerType + '; charset=utf-8';
  }
  outHeaders['content-type'] = contentType;
  let encoding = 'utf8';
  let length;
  if (typeof body === 'string') {
    length = Buffer.byteLength(body, 'utf8');
  } else {
    length = body.length;
    // Small binary bodies go out as latin1 strings so Node writes headers and body at once.
    if (length <= 16384) {
      body = body.latin1Slice(0, length);
      encoding = 'latin1';
    }
  }
  if (statusCode >= 200 && statusCode !== 204 && statusCode !== 304) outHeaders['content-length'] = length;
  outHeaders['x-open-runtimes-log-id'] = store.id;

  try {
    res.writeHead(statusCode, outHeaders);
  } catch (err) {
    // Invalid status code or header value from the function; nothing was sent yet.
    store.error(formatValue(err));
    store.flush();
    sendEmpty(res, 500, store.id);
    return;
  }
  store.flush();
  res.end(body, encoding);
}

// ---------------------------------------------------------------------------------------------
// v2 (legacy internal-challenge protocol)
// ---------------------------------------------------------------------------------------------
function sendJson(res, status, obj) {
  const body = JSON.stringify(obj);
  res.writeHead(status, { 'content-type': 'application/json; charset=utf-8', 'content-length': Buffer.byteLength(body) });
  res.end(body);
}

function onRequestV2(req, res) {
  if (handleInternal(req, res)) return;
  if (req.headers['x-internal-challenge'] !== V2_KEY) {
    sendJson(res, 500, { stderr: 'Unauthorized' });
    return;
  }
  readBody(req, res, undefined, (body) => {
    let data = {};
    try {
      if (body.length > 0) data = JSON.parse(body.toString('utf8'));
    } catch (_) {
      data = {};
    }
    if (data === null || typeof data !== 'object') data = {};
    const store = new Store('', false);
    store.v2 = true;
    als.run(store, executeV2, res, data, store);
  });
}

function executeV2(res, data, store) {
  const reply = (status, obj) => {
    if (store.done) return;
    store.done = true;
    try {
      sendJson(res, status, obj);
    } catch (err) {
      sendJson(res, 500, { stdout: store.stdout, stderr: store.stderr + formatValue(err) });
    }
  };
  const fail = (err) => reply(500, { stdout: store.stdout, stderr: store.stderr + formatValue(err) });
  const run = (result) => {
    if (result.error !== undefined) {
      fail(result.error);
      return;
    }
    const variables = data.variables || data.env || {};
    const request = {
      variables,
      env: variables,
      headers: data.headers || {},
      payload: data.payload === undefined || data.payload === null ? '' : data.payload,
    };
    const response = {
      send: (text, status = 200) => reply(status, { response: text, stdout: store.stdout, stderr: store.stderr }),
      json: (obj, status = 200) => reply(status, { response: obj, stdout: store.stdout, stderr: store.stderr }),
    };
    try {
      const fn = result.fn;
      const output = fn(request, response);
      if (output !== null && typeof output === 'object' && typeof output.then === 'function') {
        output.then(undefined, fail);
      }
    } catch (err) {
      fail(err);
    }
  };
  const result = getFunction();
  if (typeof result.then === 'function') result.then(run);
  else run(result);
}

// ---------------------------------------------------------------------------------------------
// Pool mode (runtimes/pool-protocol.md): started without code; the function arrives once, over
// POST /__hearth/specialise. Until then only that route and the health check answer. The request
// listener is swapped when the function is in place, so requests pay nothing for pool mode.
// ---------------------------------------------------------------------------------------------
const POOL_ROUTE = '/__hearth/specialise';
const POOL_BODY_LIMIT = 512 * 1024 * 1024; // base64 of the archive, under V8's string limit
const NOT_SPECIALISED = { message: 'Runtime is not specialised yet.' };
// `.open-runtimes` beyond plain `NAME=word` lines: bash sources it (as start.sh does) on top of the
// env it is given, its output to stderr, and prints the resulting environment.
const SOURCE_SCRIPT = 'set -a; source "$1" >&2; exec /usr/bin/env -0';
// Variables bash sets for itself: the server keeps its own (those of a fresh start).
const SHELL_OWN = new Set(['SHLVL', 'PWD', 'OLDPWD', '_']);
// A value written by bash's `printf %q` for the usual values: characters bash takes literally,
// backslash escapes, or '' for the empty string. Anything else is left to bash.
const PLAIN_LINE = /^([A-Za-z_][A-Za-z0-9_]*)=((?:[A-Za-z0-9_./:@%+,=^-]|[^\x00-\x7f]|\\[^])*|'')$/;
let poolState = 'waiting'; // -> 'specialising' -> 'specialised' | 'failed': the step runs once

// Zeroes `name=value` in the environment block the kernel gave this process (what
// /proc/<pid>/environ shows): deleting from process.env only unlinks it. Best effort.
function scrubEnviron(name) {
  try {
    const block = fs.readFileSync('/proc/self/environ');
    const needle = Buffer.from(name + '=', 'latin1');
    let at = block.indexOf(needle);
    while (at > 0 && block[at - 1] !== 0) at = block.indexOf(needle, at + 1);
    if (at < 0) return;
    let end = block.indexOf(0, at);
    if (end < 0) end = block.length;
    const stat = fs.readFileSync('/proc/self/stat', 'latin1');
    const envStart = Number(stat.slice(stat.lastIndexOf(')') + 2).split(' ')[47]);
    const mem = fs.openSync('/proc/self/mem', 'r+');
    try {
      fs.writeSync(mem, Buffer.alloc(end - at), 0, end - at, envStart + at);
    } finally {
      fs.closeSync(mem);
    }
  } catch (_) {
    // Nothing worse than before: the variable is already out of process.env.
  }
}

// Constant time in the content of the secrets (their lengths are not secret).
function poolSecretMatches(given) {
  if (typeof given !== 'string') return false;
  const a = Buffer.from(given, 'utf8');
  const b = Buffer.from(POOL_SECRET, 'utf8');
  let diff = a.length ^ b.length;
  for (let i = 0; i < b.length; i++) diff |= (i < a.length ? a[i] : 0) ^ b[i];
  return diff === 0;
}

function onPoolRequest(req, res) {
  const url = req.url;
  if (url === '/__opr/health') sendPlain(res, 200, 'OK');
  else if (url === POOL_ROUTE && req.method === 'POST') specialise(req, res);
  else sendJson(res, 503, NOT_SPECIALISED);
}

// After specialisation: the fresh server's listener, only the pool route answers 409.
function onSpecialisedRequest(req, res) {
  if (req.url === POOL_ROUTE && req.method === 'POST') specialise(req, res);
  else onRequest(req, res);
}

function specialise(req, res) {
  if (!poolSecretMatches(req.headers['x-hearth-pool-secret'])) {
    sendJson(res, 401, { message: 'Missing or wrong "x-hearth-pool-secret" header.' });
    return;
  }
  if (poolState !== 'waiting') {
    const message = poolState === 'specialising' ? 'A specialisation is under way.'
      : poolState === 'failed' ? 'A specialisation failed: this runtime is unusable.'
        : 'Runtime is already specialised.';
    sendJson(res, 409, { message });
    return;
  }
  poolState = 'specialising';
  const fail = (status, message) => {
    poolState = 'failed';
    sendJson(res, status, { message });
  };
  const chunks = [];
  let size = 0;
  let over = false;
  req.on('data', (chunk) => {
    if (over) return;
    size += chunk.length;
    if (size > POOL_BODY_LIMIT) {
      over = true;
      chunks.length = 0;
      fail(413, 'Request body is larger than 512MB.');
      return;
    }
    chunks.push(chunk);
  });
  req.on('error', () => {
    poolState = 'failed';
  });
  req.on('end', () => {
    if (!over) loadSpecialisation(Buffer.concat(chunks, size), res, fail);
  });
}

// Checks the body: { env: { NAME: "value", ... }, code: "<base64 archive>" }.
function parseSpecialisation(body) {
  let payload;
  try {
    payload = JSON.parse(body.toString('utf8'));
  } catch (err) {
    return `The body is not JSON: ${err.message}`;
  }
  if (payload === null || typeof payload !== 'object' || Array.isArray(payload)) {
    return 'The body must be a JSON object with "env" and "code".';
  }
  const vars = payload.env === undefined || payload.env === null ? {} : payload.env;
  if (typeof vars !== 'object' || Array.isArray(vars)) return '"env" must be an object of strings.';
  for (const key of Object.keys(vars)) {
    const value = vars[key];
    if (key === '' || key.includes('=') || key.includes('\0') || typeof value !== 'string' || value.includes('\0')) {
      return `Invalid variable in "env": ${JSON.stringify(key)}.`;
    }
  }
  const code = payload.code;
  if (typeof code !== 'string' || code.length % 4 !== 0) return '"code" must be a base64 string.';
  // The decoder skips what is not base64 and stops at padding: then fewer bytes come out (a
  // scan of the text first would cost as much as decoding it).
  const padding = code.endsWith('==') ? 2 : code.endsWith('=') ? 1 : 0;
  const archive = Buffer.from(code, 'base64');
  if (archive.length !== (code.length / 4) * 3 - padding) return '"code" must be a base64 string.';
  return { vars, archive };
}

// The start steps of a fresh runtime, in process: the archive into the function folder, then the
// environment, then the settings. Answers the specialise request.
function loadSpecialisation(body, res, fail) {
  const started = process.hrtime.bigint();
  const parsed = parseSpecialisation(body);
  if (typeof parsed === 'string') {
    fail(400, parsed);
    return;
  }
  const { vars, archive } = parsed;
  const next = Object.assign({}, env, vars);
  const finish = (dump) => {
    applyEnvironment(dump);
    readConfig();
    const seconds = Number(process.hrtime.bigint() - started) / 1e9;
    poolState = 'specialised';
    server.removeListener('request', onPoolRequest);
    server.on('request', onSpecialisedRequest);
    sendJson(res, 200, { specialised: true });
    // Written while the answer travels: nothing else runs before it is (this is one tick).
    try {
      fs.writeFileSync(TIMINGS_FILE, `extract=${seconds.toFixed(6)}\n`);
    } catch (err) {
      process.stderr.write(`Failed to write ${TIMINGS_FILE}: ${err.message}\n`);
    }
  };
  // `envFile`: the `.open-runtimes` content as extracted, null when there is none, undefined
  // when it is to be read (start.sh sources it only when it is a file).
  const loadEnv = (envFile) => {
    let file = null;
    if (envFile !== undefined) {
      file = envFile === null ? null : envFile.toString('utf8');
    } else {
      try {
        file = fs.readFileSync(`${FUNCTION_DIR}/.open-runtimes`, 'utf8');
      } catch (_) {
        file = null;
      }
    }
    const lines = file === null ? [] : file.split('\n');
    const plain = [];
    for (const line of lines) {
      const match = line === '' ? null : PLAIN_LINE.exec(line);
      if (line !== '' && match === null) {
        run('bash', ['-c', SOURCE_SCRIPT, 'bash', `${FUNCTION_DIR}/.open-runtimes`], EMPTY, next, (error, out) => {
          if (error !== null) fail(400, `Failed to source .open-runtimes: ${error}`);
          else finish(parseEnvDump(out));
        });
        return;
      }
      if (match !== null) plain.push([match[1], match[2] === "''" ? '' : match[2].replace(/\\([^])/g, '$1')]);
    }
    for (const [key, value] of plain) next[key] = value;
    finish(new Map(Object.entries(next)));
  };
  // Gzip by its magic bytes, inflated here: tar -z would start a gzip process for it. In one go:
  // nothing else is served while specialising, and the thread pool would first have to start.
  let tarball = archive;
  if (archive.length >= 2 && archive[0] === 0x1f && archive[1] === 0x8b) {
    try {
      tarball = (zlib || (zlib = require('zlib'))).gunzipSync(archive);
    } catch (err) {
      fail(400, `The code is not a valid archive: ${err.message}`);
      return;
    }
  }
  // The archive is read in process (a `tar` process costs more than extracting a small archive).
  // Entry types beyond files, directories and links (devices, sparse files...) go to GNU tar.
  let entries;
  let envFile;
  try {
    entries = readArchive(tarball);
    if (entries !== null) envFile = writeEntries(tarball, entries, FUNCTION_DIR);
  } catch (err) {
    fail(400, `The code is not a valid archive: ${err.message}`);
    return;
  }
  if (entries !== null) {
    loadEnv(envFile);
    return;
  }
  run('tar', ['-xf', '-', '-C', FUNCTION_DIR], tarball, next, (err) => {
    if (err !== null) fail(400, `The code is not a valid archive: ${err}`);
    else loadEnv(undefined);
  });
}

// ---------------------------------------------------------------------------------------------
// Tar archives, read in process (pool mode): ustar, GNU (long names `L`/`K`, base-256 numbers)
// and pax (`path`, `linkpath`, `size`, `mtime`, `uid`, `gid`), as GNU tar extracts them as root:
// modes as given (no umask), owners, modification times, directories' attributes set last.
// Names are kept as bytes (latin1 strings, one character a byte) and must stay inside the folder:
// absolute names and `..` are refused. Symbolic links are created after everything else, so no
// entry is ever written through one (GNU tar delays the links that could lead out likewise).
// ---------------------------------------------------------------------------------------------
let zlib = null; // loaded while a pool member waits
const TAR_BLOCK = 512;
// Entry kinds read in process; any other type flag means GNU tar extracts the archive.
const TAR_FILE = 0;
const TAR_LINK = 1;
const TAR_SYMLINK = 2;
const TAR_DIR = 5;
const TAR_KINDS = { 0x30: TAR_FILE, 0x00: TAR_FILE, 0x37: TAR_FILE, 0x31: TAR_LINK, 0x32: TAR_SYMLINK, 0x35: TAR_DIR };

function archiveError(message) {
  return new Error(message);
}

// A NUL-terminated field, as bytes.
function tarText(buf, start, end) {
  let stop = start;
  while (stop < end && buf[stop] !== 0) stop++;
  return buf.latin1Slice(start, stop);
}

// Octal digits (after spaces, up to a NUL or space), or GNU base-256 (high bit of the first
// byte). -1 for anything else.
function tarNumber(buf, start, length) {
  const end = start + length;
  if (buf[start] & 0x80) {
    if (buf[start] !== 0x80) return -1; // negative
    let value = 0;
    for (let i = start + 1; i < end; i++) value = value * 256 + buf[i];
    return Number.isSafeInteger(value) ? value : -1;
  }
  let i = start;
  while (i < end && buf[i] === 0x20) i++;
  let value = 0;
  for (; i < end; i++) {
    const c = buf[i];
    if (c === 0 || c === 0x20) break;
    if (c < 0x30 || c > 0x37) return -1;
    value = value * 8 + (c - 0x30);
  }
  return value;
}

// The header checksum: its bytes summed with the checksum field as spaces (unsigned, or signed
// as some old tars wrote it).
function tarHeaderOk(buf, at) {
  const stored = tarNumber(buf, at + 148, 8);
  if (stored < 0) return false;
  let unsigned = 8 * 0x20;
  let signed = 8 * 0x20;
  for (let i = at; i < at + TAR_BLOCK; i++) {
    if (i === at + 148) {
      i += 7;
      continue;
    }
    const b = buf[i];
    unsigned += b;
    signed += b > 127 ? b - 256 : b;
  }
  return stored === unsigned || stored === signed;
}

function tarZeroBlock(buf, at) {
  for (let i = at; i < at + TAR_BLOCK; i++) if (buf[i] !== 0) return false;
  return true;
}

// pax records `<length> <key>=<value>\n` into `into` (values as bytes, like the names).
function parsePax(buf, start, end, into) {
  let at = start;
  while (at < end && buf[at] !== 0) {
    const space = buf.indexOf(0x20, at);
    const length = space === -1 || space >= end ? NaN : Number(buf.latin1Slice(at, space));
    if (!Number.isInteger(length) || length <= space - at + 1 || at + length > end || buf[at + length - 1] !== 0x0a) {
      throw archiveError('Malformed extended header');
    }
    const record = buf.latin1Slice(space + 1, at + length - 1);
    const eq = record.indexOf('=');
    if (eq <= 0) throw archiveError('Malformed extended header');
    const key = record.slice(0, eq);
    const value = record.slice(eq + 1);
    if (value === '') delete into[key];
    else into[key] = value;
    at += length;
  }
  return into;
}

// A number of a pax record (NaN when malformed), else `fallback` (from the header).
function paxNumber(pax, key, fallback) {
  const value = pax[key];
  return value === undefined ? fallback : value.trim() === '' ? NaN : Number(value);
}

function validId(n) {
  return Number.isSafeInteger(n) && n >= 0;
}

// A member name as a path relative to the folder ('' for the folder itself); refused when it
// could lead out of it.
function tarPath(name) {
  if (name === '' || name.includes('\0')) throw archiveError(`Invalid member name ${JSON.stringify(name)}`);
  if (name.charCodeAt(0) === 0x2f) throw archiveError(`Member name is absolute: ${name}`);
  const kept = [];
  for (const part of name.split('/')) {
    if (part === '' || part === '.') continue;
    if (part === '..') throw archiveError(`Member name contains '..': ${name}`);
    kept.push(part);
  }
  return kept.join('/');
}

// The entries of a tar archive, checked: { kind, path, link, mode, uid, gid, mtime, start, size }
// each, or null when it holds an entry type left to GNU tar. Throws what tar would refuse.
function readArchive(buf) {
  const entries = [];
  const global = {};
  let pax = null;
  let longName = null;
  let longLink = null;
  let at = 0;
  for (;;) {
    if (at + TAR_BLOCK > buf.length) {
      if (at === buf.length && at > 0) break; // no end-of-archive blocks: tar takes it too
      throw archiveError(at === 0 ? 'This does not look like a tar archive' : 'Unexpected EOF in archive');
    }
    if (tarZeroBlock(buf, at)) break; // end of archive (what follows is ignored, as tar does)
    if (!tarHeaderOk(buf, at)) {
      throw archiveError(at === 0 ? 'This does not look like a tar archive' : 'Invalid header (bad checksum)');
    }
    const header = at;
    const type = buf[header + 156];
    const meta = type === 0x78 || type === 0x67 || type === 0x4c || type === 0x4b; // x g L K
    const local = pax === null ? global : pax;
    const size = meta ? tarNumber(buf, header + 124, 12) : paxNumber(local, 'size', tarNumber(buf, header + 124, 12));
    if (!validId(size)) throw archiveError('Invalid header (size)');
    const start = header + TAR_BLOCK;
    if (start + size > buf.length) throw archiveError('Unexpected EOF in archive');
    at = start + Math.ceil(size / TAR_BLOCK) * TAR_BLOCK;
    if (meta) {
      if (type === 0x4c) longName = tarText(buf, start, start + size);
      else if (type === 0x4b) longLink = tarText(buf, start, start + size);
      else if (type === 0x78) pax = parsePax(buf, start, start + size, Object.assign({}, global));
      else parsePax(buf, start, start + size, global);
      continue;
    }
    const kind = TAR_KINDS[type];
    if (kind === undefined) return null; // devices, fifos, sparse files, GNU dumpdirs...
    // pax keys beyond those read here are ignored, as GNU tar does (xattrs...), but sparse files.
    for (const key in local) if (key.startsWith('GNU.sparse.')) return null;
    let name = local.path;
    if (name === undefined && longName !== null) name = longName;
    if (name === undefined) {
      name = tarText(buf, header, header + 100);
      // POSIX ustar splits long names into a prefix (GNU's own format keeps other fields there).
      if (buf[header + 345] !== 0 && buf.latin1Slice(header + 257, header + 263) === 'ustar\0') {
        name = `${tarText(buf, header + 345, header + 500)}/${name}`;
      }
    }
    let link = local.linkpath;
    if (link === undefined) link = longLink !== null ? longLink : tarText(buf, header + 157, header + 257);
    const entry = {
      kind,
      path: tarPath(name),
      link: kind === TAR_LINK ? tarPath(link) : link,
      mode: tarNumber(buf, header + 100, 8),
      uid: paxNumber(local, 'uid', tarNumber(buf, header + 108, 8)),
      gid: paxNumber(local, 'gid', tarNumber(buf, header + 116, 8)),
      mtime: paxNumber(local, 'mtime', tarNumber(buf, header + 136, 12)),
      uname: local.uname !== undefined ? local.uname : tarText(buf, header + 265, header + 297),
      gname: local.gname !== undefined ? local.gname : tarText(buf, header + 297, header + 329),
      start,
      size: kind === TAR_FILE ? size : 0,
    };
    if (entry.mode < 0 || !validId(entry.uid) || !validId(entry.gid) || !(entry.mtime >= 0)) {
      throw archiveError(`Invalid header of ${name}`);
    }
    entry.mode &= 0o7777;
    if (entry.path === '' && kind !== TAR_DIR) throw archiveError(`Invalid member name ${JSON.stringify(name)}`);
    if (kind === TAR_SYMLINK && (link === '' || link.includes('\0'))) throw archiveError(`Invalid link target of ${name}`);
    entries.push(entry);
    pax = null;
    longName = null;
    longLink = null;
  }
  return entries;
}

// The process umask, from /proc (reading it with process.umask() sets it for a moment).
let umaskValue = -1;
function currentUmask() {
  if (umaskValue < 0) {
    umaskValue = 0o022;
    try {
      const match = /^Umask:\s*([0-7]+)$/m.exec(fs.readFileSync('/proc/self/status', 'latin1'));
      if (match !== null) umaskValue = parseInt(match[1], 8);
    } catch (_) {
      // the usual one
    }
  }
  return umaskValue;
}

// User and group ids by name (tar gives owners by name first), read once from the image.
let ownerIds = null;
function ownerId(kind, name, fallback) {
  if (name === '') return fallback;
  if (ownerIds === null) {
    ownerIds = { user: new Map(), group: new Map() };
    for (const [map, file] of [[ownerIds.user, '/etc/passwd'], [ownerIds.group, '/etc/group']]) {
      try {
        for (const line of fs.readFileSync(file, 'latin1').split('\n')) {
          const fields = line.split(':');
          if (fields.length > 2 && !map.has(fields[0]) && /^[0-9]+$/.test(fields[2])) map.set(fields[0], Number(fields[2]));
        }
      } catch (_) {
        // numeric ids only
      }
    }
  }
  const id = ownerIds[kind].get(name);
  return id === undefined ? fallback : id;
}

// Creates the entries under `root` (an empty folder), from the archive `buf`, and returns the
// content of its `.open-runtimes` (null when it has none, undefined when it is no plain file but a
// link, say: then it is read from the folder). Every call on the
// container's filesystem counts (with fuse-overlayfs each one is a round trip to its daemon), so
// only those that change something are made: owners when they differ from the new file's, modes
// when creating with them did not give them.
function writeEntries(buf, entries, root) {
  const euid = process.geteuid();
  const egid = process.getegid();
  const asRoot = euid === 0;
  const umask = currentUmask();
  const rootStat = fs.statSync(root);
  // New files get our ids, unless a set-group-id folder gives them its group.
  const inherits = (rootStat.mode & 0o2000) !== 0;
  const full = (rel) => Buffer.from(rel === '' ? root : `${root}/${rel}`, 'latin1');
  const made = new Map([['', rootStat.mode & 0o7777]]); // folders in place -> mode made with (or -1)
  const symlinks = new Map(); // path -> entry, created last
  const lateLinks = []; // hard links to symbolic links, made after them
  const dirs = [];
  const parentOf = (rel) => {
    const slash = rel.lastIndexOf('/');
    return slash === -1 ? '' : rel.slice(0, slash);
  };
  const ensureParent = (rel) => {
    const parent = parentOf(rel);
    if (made.has(parent)) return;
    fs.mkdirSync(full(parent), { recursive: true });
    for (let p = parent; p !== '' && !made.has(p); p = parentOf(p)) made.set(p, -1);
  };
  // Once symbolic links exist: nothing is created nor changed through one.
  const throughLink = (rel) => {
    for (let p = parentOf(rel); p !== ''; p = parentOf(p)) if (symlinks.has(p)) return true;
    return false;
  };
  // Creates rel with `create`; an entry already there (a duplicate name) is replaced, as tar does.
  const replace = (rel, create) => {
    try {
      return create();
    } catch (err) {
      if (err.code !== 'EEXIST') throw err;
      const path = full(rel);
      if (fs.lstatSync(path).isDirectory()) fs.rmdirSync(path);
      else fs.unlinkSync(path);
      made.delete(rel);
      return create();
    }
  };
  // As root, tar gives entries their owners (by name first) and their modes as they are; as
  // another user, modes lose their high bits and go through the umask, and owners stay ours.
  const modeOf = (entry) => (asRoot ? entry.mode : entry.mode & 0o777 & ~umask);
  const chownIfNeeded = (entry, uid, gid, chown) => {
    if (!asRoot) return;
    const wantUid = ownerId('user', entry.uname, entry.uid);
    const wantGid = ownerId('group', entry.gname, entry.gid);
    if (wantUid !== uid || wantGid !== gid || inherits) chown(wantUid, wantGid);
  };
  const hardLink = (entry) => {
    ensureParent(entry.path);
    replace(entry.path, () => fs.linkSync(full(entry.link), full(entry.path)));
  };
  let envFile = null;

  for (const entry of entries) {
    const rel = entry.path;
    if (rel === '.open-runtimes') envFile = entry.kind === TAR_FILE ? buf.subarray(entry.start, entry.start + entry.size) : undefined;
    if (entry.kind !== TAR_SYMLINK) symlinks.delete(rel); // a later entry of that name wins
    switch (entry.kind) {
      case TAR_FILE: {
        ensureParent(rel);
        const created = entry.mode & 0o777;
        const fd = replace(rel, () => fs.openSync(full(rel), 'wx', created));
        try {
          for (let done = 0; done < entry.size;) {
            done += fs.writeSync(fd, buf, entry.start + done, entry.size - done);
          }
          chownIfNeeded(entry, euid, egid, (uid, gid) => fs.fchownSync(fd, uid, gid));
          // After chown, which clears the set-id bits.
          const mode = modeOf(entry);
          if (mode !== (created & ~umask)) fs.fchmodSync(fd, mode);
          fs.futimesSync(fd, entry.mtime, entry.mtime);
        } finally {
          fs.closeSync(fd);
        }
        break;
      }
      case TAR_DIR:
        if (!made.has(rel)) {
          ensureParent(rel);
          // Made with its mode already (root writes in any folder; anyone else needs rwx first).
          const created = asRoot ? entry.mode & 0o777 : 0o700;
          try {
            fs.mkdirSync(full(rel), created);
            made.set(rel, created & ~umask);
          } catch (err) {
            if (err.code !== 'EEXIST' || !fs.lstatSync(full(rel)).isDirectory()) throw err;
            made.set(rel, -1);
          }
        }
        dirs.push(entry); // owner, mode and time once its content is in place
        break;
      case TAR_LINK:
        if (symlinks.has(entry.link)) lateLinks.push(entry);
        else hardLink(entry);
        break;
      default: // TAR_SYMLINK
        symlinks.delete(rel);
        symlinks.set(rel, entry);
    }
  }
  for (const [rel, entry] of symlinks) {
    if (throughLink(rel)) throw archiveError(`Cannot create ${rel}: it is inside a symbolic link`);
    ensureParent(rel);
    const path = full(rel);
    replace(rel, () => fs.symlinkSync(Buffer.from(entry.link, 'latin1'), path));
    chownIfNeeded(entry, euid, egid, (uid, gid) => fs.lchownSync(path, uid, gid));
    fs.lutimesSync(path, entry.mtime, entry.mtime);
  }
  for (const entry of lateLinks) {
    if (throughLink(entry.path) || throughLink(entry.link)) {
      throw archiveError(`Cannot create ${entry.path}: it is inside a symbolic link`);
    }
    hardLink(entry);
  }
  for (let i = dirs.length - 1; i >= 0; i--) {
    const entry = dirs[i];
    const rel = entry.path;
    if (symlinks.has(rel) || throughLink(rel)) continue; // replaced by a link
    const path = full(rel);
    const created = made.get(rel);
    if (rel === '') chownIfNeeded(entry, rootStat.uid, rootStat.gid, (uid, gid) => fs.chownSync(path, uid, gid));
    else if (created === -1 || created === undefined) chownIfNeeded(entry, -1, -1, (uid, gid) => fs.chownSync(path, uid, gid));
    else chownIfNeeded(entry, euid, egid, (uid, gid) => fs.chownSync(path, uid, gid));
    const mode = modeOf(entry);
    if (mode !== created) fs.chmodSync(path, mode);
    fs.utimesSync(path, entry.mtime, entry.mtime);
  }
  return envFile;
}

// Runs a command with `input` on stdin; done(null, stdout) or done(message of the failure).
function run(command, args, input, childEnv, done) {
  let child;
  try {
    child = require('child_process').spawn(command, args,
      { cwd: '/usr/local/server', env: childEnv, stdio: ['pipe', 'pipe', 'pipe'] });
  } catch (err) {
    done(err.message);
    return;
  }
  const out = [];
  const errors = [];
  let failed = false;
  child.stdout.on('data', (chunk) => out.push(chunk));
  child.stderr.on('data', (chunk) => errors.push(chunk));
  child.stdin.on('error', () => {}); // tar may stop reading a bad archive early
  child.on('error', (err) => {
    failed = true;
    done(err.message);
  });
  child.on('close', (code) => {
    if (failed) return;
    const stderr = Buffer.concat(errors).toString('utf8');
    if (code !== 0) {
      done(stderr.trim() || `${command} exited with ${code}`);
      return;
    }
    if (stderr !== '') process.stderr.write(stderr);
    done(null, Buffer.concat(out).toString('utf8'));
  });
  child.stdin.end(input);
}

function parseEnvDump(dump) {
  const vars = new Map();
  for (const entry of dump.split('\0')) {
    const eq = entry.indexOf('=');
    if (eq > 0) vars.set(entry.slice(0, eq), entry.slice(eq + 1));
  }
  return vars;
}

// Makes process.env `next` (but for the shell's own variables: those of the server's start stay).
function applyEnvironment(next) {
  for (const key of Object.keys(env)) {
    if (!next.has(key) && !SHELL_OWN.has(key)) delete env[key];
  }
  for (const [key, value] of next) {
    if (!SHELL_OWN.has(key) && env[key] !== value) env[key] = value;
  }
}

// ---------------------------------------------------------------------------------------------
// Server
// ---------------------------------------------------------------------------------------------
const server = http.createServer({ noDelay: true }, V2 ? onRequestV2 : POOLED ? onPoolRequest : onRequest);
// Executors pool connections: keep idle ones open longer than their pools do. Functions may run
// for a long time, so no request timeout (the executor enforces x-open-runtimes-timeout).
server.keepAliveTimeout = 120 * 1000;
server.headersTimeout = 125 * 1000;
server.requestTimeout = 0;
// The socket first (bound at once, as the port is): once the port answers, the executor finds it.
if (SOCKET !== '') listenOnSocket(SOCKET);
server.listen(PORT, '0.0.0.0', () => {
  nativeConsole.log('HTTP server successfully started!');
  // A pool member waits for its function: what specialising needs is loaded before it answers
  // anything (the health check included), so a member found ready is warm.
  if (POOLED) warmPoolMember();
});

// Connections accepted on the Unix socket are handed to the HTTP server, so they take the same
// handler (swapped on specialisation), keep-alive and timeouts as those on the TCP port. A socket
// left by an earlier run of this container (a restart) is replaced; failing to listen leaves the
// TCP port, which the executor falls back to.
function listenOnSocket(socketPath) {
  try {
    fs.unlinkSync(socketPath);
  } catch (_) {
    // none there
  }
  const side = require('net').createServer((socket) => server.emit('connection', socket));
  side.on('error', (err) => process.stderr.write(`Unix socket ${socketPath}: ${err.message}\n`));
  side.listen(socketPath);
}

// While a pool member is idle (never in fresh mode, whose start this would delay): loads and
// compiles what the specialise step and the first request would otherwise pay for.
function warmPoolMember() {
  zlib = require('zlib');
  require('child_process'); // only for archives left to GNU tar and unusual `.open-runtimes`
  // The folders written to (an image's folders are copied up by overlayfs on their first change):
  // the same mode again changes nothing else.
  for (const dir of [FUNCTION_DIR, LOGS_DIR, '/mnt/telemetry']) {
    try {
      fs.chmodSync(dir, fs.statSync(dir).mode & 0o7777);
    } catch (_) {
      // not ours to change: nothing to warm
    }
  }
  // The specialise steps on a small archive in a scratch folder, so their code is compiled, then
  // a CommonJS and an ES module from there: the first of each costs the loaders' own start.
  let scratch = null;
  const cleanup = () => {
    if (scratch !== null) fs.rmSync(scratch, { recursive: true, force: true });
  };
  try {
    scratch = fs.mkdtempSync('/tmp/.hearth-warm-');
    const archive = zlib.gzipSync(Buffer.concat([
      warmEntry('d/', 0x35, EMPTY), warmEntry('d/.env', 0x30, Buffer.from('A=b\\ c\n')),
      warmEntry('d/l', 0x32, EMPTY, '.env'), warmEntry('d/h', 0x31, EMPTY, 'd/.env'),
      warmEntry('d/package.json', 0x30, Buffer.from('{}')),
      warmEntry('d/w.js', 0x30, Buffer.from('module.exports = async () => null;')),
      warmEntry('d/w.mjs', 0x30, Buffer.from('export default async () => null;')), Buffer.alloc(TAR_BLOCK * 2),
    ]));
    const parsed = parseSpecialisation(Buffer.from(JSON.stringify({ env: { A: 'b' }, code: archive.toString('base64') })));
    const tarball = zlib.gunzipSync(parsed.archive);
    writeEntries(tarball, readArchive(tarball), scratch);
    for (const line of fs.readFileSync(`${scratch}/d/.env`, 'utf8').split('\n')) {
      const match = line === '' ? null : PLAIN_LINE.exec(line);
      if (match !== null) match[2].replace(/\\([^])/g, '$1');
    }
    const cjs = path.resolve(scratch, 'd/w.js');
    if (fs.statSync(cjs).isFile()) pickFunction(require(cjs));
    delete require.cache[cjs];
    import(pathToFileURL(path.resolve(scratch, 'd/w.mjs')).href).then(fromModule).then(cleanup, cleanup);
  } catch (err) {
    process.stderr.write(`Pool warm-up: ${err.message}\n`);
    cleanup();
  }
  // A call of a function, its answer sent nowhere (no log files either), so that what every
  // request runs is compiled; the async context installs its hooks on its first run.
  const store = new Store('', false);
  const request = { method: 'GET', url: '/?warm=1', headers: { host: 'localhost', 'x-forwarded-proto': 'http' } };
  const response = { writeHead() {}, end() {} };
  const fn = async (context) => context.res.text(context.req.path);
  als.run(store, invoke, { fn }, request, response, EMPTY, store, 0);
  // A request body read as the specialise step reads its own (a stream's flowing mode).
  const body = new (require('stream').Readable)({ read() {} });
  const chunks = [];
  body.on('data', (chunk) => chunks.push(chunk));
  body.on('end', () => Buffer.concat(chunks));
  body.push(Buffer.from('{}'));
  body.push(null);
  // The first log ids.
  if (idOffset + 20 > ID_POOL.length) {
    refillIdPool();
    idOffset = 0;
  }
}

// One ustar header (and data) of the warm-up archive.
function warmEntry(name, type, data, link = '') {
  const block = Buffer.alloc(TAR_BLOCK + Math.ceil(data.length / TAR_BLOCK) * TAR_BLOCK);
  block.latin1Write(name, 0);
  block.latin1Write(type === 0x35 ? '0000755\0' : '0000644\0', 100);
  block.latin1Write(`${data.length.toString(8).padStart(11, '0')}\0`, 124);
  block.latin1Write('00000000000\0', 136);
  block.fill(0x20, 148, 156);
  block[156] = type;
  block.latin1Write(link, 157);
  block.latin1Write('ustar\x0000', 257);
  let sum = 0;
  for (let i = 0; i < TAR_BLOCK; i++) sum += block[i];
  block.latin1Write(`${sum.toString(8).padStart(6, '0')}\0 `, 148);
  data.copy(block, TAR_BLOCK);
  return block;
}

function shutdown() {
  server.close();
  process.exit(0);
}
process.on('SIGTERM', shutdown);
process.on('SIGINT', shutdown);
