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
// Configuration, read once at start.
// ---------------------------------------------------------------------------------------------
const env = process.env;
const PORT = 3000;
const FUNCTION_DIR = '/usr/local/server/src/function';
const LOGS_DIR = '/mnt/logs';
const TIMINGS_FILE = '/mnt/telemetry/timings.txt';
const SECRET = env.OPEN_RUNTIMES_SECRET || '';
const DEV = env.OPEN_RUNTIMES_ENV === 'development';
const V2_KEY = env.INTERNAL_RUNTIME_KEY || '';
const V2 = V2_KEY !== '';
const ENTRYPOINT = (V2 ? env.INTERNAL_RUNTIME_ENTRYPOINT || env.OPEN_RUNTIMES_ENTRYPOINT
  : env.OPEN_RUNTIMES_ENTRYPOINT || env.INTERNAL_RUNTIME_ENTRYPOINT) || '';
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

// OPEN_RUNTIMES_HEADERS: lower-cased keys, stringified values, forced onto every request.
const FORCED_HEADERS = [];
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
// Server
// ---------------------------------------------------------------------------------------------
const server = http.createServer({ noDelay: true }, V2 ? onRequestV2 : onRequest);
// Executors pool connections: keep idle ones open longer than their pools do. Functions may run
// for a long time, so no request timeout (the executor enforces x-open-runtimes-timeout).
server.keepAliveTimeout = 120 * 1000;
server.headersTimeout = 125 * 1000;
server.requestTimeout = 0;
server.listen(PORT, '0.0.0.0', () => {
  nativeConsole.log('HTTP server successfully started!');
});

function shutdown() {
  server.close();
  process.exit(0);
}
process.on('SIGTERM', shutdown);
process.on('SIGINT', shutdown);
