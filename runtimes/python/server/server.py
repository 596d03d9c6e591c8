"""Hearth Python runtime server: Open Runtimes protocol v5 (and legacy v2) on asyncio (uvloop).

Run by the system python3; the function's venv (`src/function/runtime-env`, built by
helpers/build.sh) is put on `sys.path` for the user code only after the server's own imports, so a
function pinning other versions cannot break the server.

Start time matters (every cold start waits for it): the server imports only asyncio, uvloop and
httptools (Debian's C HTTP/1.1 parser) before it listens. aiohttp took ~250 ms to import (client,
multipart, cookies...) for the few parts a server without a router needs; the small HTTP/1.1 layer
here (`HttpProtocol`) does keep-alive, pipelining, chunked request bodies, `Expect: 100-continue`,
gzip/deflate request bodies, HEAD, and the 20 MiB body limit (413). Modules that only a request
needs (json, hmac, zlib...) are imported on first use.

Layout of this file:
- configuration read once at start (secret, enforced headers, entrypoint, mode), or once
  specialised in pool mode (`_read_config`);
- `Logger`: per-request log buffers, written to /mnt/logs once at the end of the request;
- `_NativeStream`: the `sys.stdout`/`sys.stderr` proxy that routes `print()` to the logger of
  the request running in the current context (a ContextVar, which also flows into the thread
  pool), or to the real stream outside a request;
- `Request`/`Response`/`Context`: the `context` API given to `main(context)`;
- `handle_v5` / `handle_v2`: the per-request steps of runtime-protocol.md §2 / §3; each returns
  `(status, [(header, value)...], body bytes)`;
- pool mode (runtimes/pool-protocol.md): started without code, the function arrives over
  `POST /__hearth/specialise`; `_load_specialisation` does the start steps in process;
- `HttpProtocol`: HTTP/1.1 on an asyncio Protocol (every path is the function);
- `main()`: binds 0.0.0.0:3000 and prints the startup line.
"""

import asyncio
import concurrent.futures
import contextvars
import importlib
import inspect
import os
import signal
import sys
import time
from collections import deque
from concurrent.futures import ThreadPoolExecutor

from httptools import HttpParserError, HttpParserUpgrade, HttpRequestParser

SERVER_FILES = (__file__, os.path.abspath(__file__))
FUNCTION_ROOT = "/usr/local/server/src"
FUNCTION_DIR = FUNCTION_ROOT + "/function"
VENV_DIR = FUNCTION_DIR + "/runtime-env"
LOGS_DIR = "/mnt/logs"
TIMINGS_FILE = "/mnt/telemetry/timings.txt"
MAX_BODY = 20 * 1024 * 1024
MAX_LOG_LENGTH = 8000
TRUNCATED_SUFFIX = "... Log truncated due to size limit (8000 characters)"
NATIVE_NOTICE = "Native logs detected. Use context.log() or context.error() for better experience.\n"
TIMEOUT_MESSAGE = 'Header "x-open-runtimes-timeout" must be an integer greater than 0.'
UNAUTHORIZED_MESSAGE = 'Unauthorized. Provide correct "x-open-runtimes-secret" header.'
RETURN_MISSING = "Return statement missing. return context.res.empty() if no response is expected."
NO_MAIN = "Function signature invalid. Did you forget to export a 'main' function?"
HIDDEN_PREFIX = "x-open-runtimes-"



def _scrub_environ(name):
    """Zeroes `name=value` in the environment block the kernel gave this process (what
    /proc/<pid>/environ shows): removing it from os.environ only unlinks it. Best effort."""
    try:
        with open("/proc/self/environ", "rb") as f:
            block = f.read()
        needle = name.encode() + b"="
        at = block.find(needle)
        while at > 0 and block[at - 1] != 0:
            at = block.find(needle, at + 1)
        if at < 0:
            return
        end = block.find(b"\0", at)
        if end < 0:
            end = len(block)
        with open("/proc/self/stat", "rb") as f:
            stat = f.read()
        env_start = int(stat[stat.rindex(b")") + 2:].split()[47])
        mem = os.open("/proc/self/mem", os.O_RDWR)
        try:
            os.pwrite(mem, bytes(end - at), env_start + at)
        finally:
            os.close(mem)
    except (OSError, ValueError, IndexError):
        pass  # nothing worse than before: the variable is already out of os.environ


# Pool mode (runtimes/pool-protocol.md): read once, then gone from the environment at once, so
# neither the function nor a process it starts can see it. v2 is never pooled.
POOL_SECRET = os.environ.pop("OPEN_RUNTIMES_POOL_SECRET", None)
if POOL_SECRET is not None:
    _scrub_environ("OPEN_RUNTIMES_POOL_SECRET")
POOL_SECRET = (POOL_SECRET or "").encode()
V2_KEY = os.environ.get("INTERNAL_RUNTIME_KEY", "")
POOLED = bool(POOL_SECRET) and not V2_KEY


def _stringify_header(value):
    import json

    return value if isinstance(value, str) else json.dumps(value, separators=(",", ":"))


def _enforced_headers():
    raw = (os.environ.get("OPEN_RUNTIMES_HEADERS", "") or "{}").strip()
    if raw == "{}":
        return {}
    import json

    try:
        parsed = json.loads(raw)
    except ValueError:
        print("OPEN_RUNTIMES_HEADERS is not valid JSON; ignoring it.", file=sys.stderr)
        return {}
    if not isinstance(parsed, dict):
        return {}
    return {str(k).lower(): _stringify_header(v) for k, v in parsed.items()}


def _thread_count():
    try:
        return max(1, int(os.environ.get("HEARTH_PYTHON_THREADS", "")))
    except ValueError:
        return 64


def _read_config():
    """Every setting taken from the environment: at start, and in pool mode once specialised."""
    global SECRET, DEVELOPMENT, ENFORCED_HEADERS, ENTRYPOINT, V2_ENTRYPOINT, POOL
    SECRET = os.environ.get("OPEN_RUNTIMES_SECRET", "").encode()
    DEVELOPMENT = os.environ.get("OPEN_RUNTIMES_ENV", "") == "development"
    ENFORCED_HEADERS = _enforced_headers()
    ENTRYPOINT = os.environ.get("OPEN_RUNTIMES_ENTRYPOINT", "")
    V2_ENTRYPOINT = os.environ.get("INTERNAL_RUNTIME_ENTRYPOINT", "") or ENTRYPOINT
    # Sync `def main` runs here so a blocking function does not stall the event loop. Threads
    # are created on demand, so a large maximum costs nothing until concurrent sync calls need it.
    POOL = ThreadPoolExecutor(max_workers=_thread_count(), thread_name_prefix="function")


SECRET = b""
DEVELOPMENT = False
ENFORCED_HEADERS = {}
ENTRYPOINT = ""
V2_ENTRYPOINT = ""
POOL = None
# A pool member has no function yet: its settings are read when it gets one.
if not POOLED:
    _read_config()


# --- logging --------------------------------------------------------------------------------

_CURRENT = contextvars.ContextVar("hearth_logger", default=None)


def new_log_id():
    """20 characters of [a-z0-9]: 8 hex of seconds + 5 hex of microseconds (so ids sort by time)
    + 7 random hex."""
    now = time.time()
    seconds = int(now)
    rand = int.from_bytes(os.urandom(4), "little") & 0xFFFFFFF
    return "%08x%05x%07x" % (seconds, int((now - seconds) * 1_000_000) % 1_000_000, rand)


def _safe_log_id(given):
    # The id becomes a file name under /mnt/logs: refuse anything that could leave that folder.
    if not given or "/" in given or "\\" in given or "\0" in given or given.startswith("."):
        return None
    return given


def _format_value(value):
    if isinstance(value, str):
        return value
    if isinstance(value, BaseException):
        import traceback

        return "".join(traceback.format_exception(value))
    import json

    try:
        return json.dumps(value, separators=(",", ":"), ensure_ascii=False, default=str)
    except (TypeError, ValueError):
        return str(value)


class Logger:
    """Buffers one request's log entries; `flush` writes each file at most once."""

    __slots__ = ("id", "enabled", "logs", "errors", "native", "closed")

    def __init__(self, enabled, log_id):
        self.enabled = enabled
        self.id = log_id
        self.logs = []
        self.errors = []
        self.native = False
        self.closed = False

    def entry(self, messages, errors=False):
        if not self.enabled or self.closed:
            return
        text = " ".join([_format_value(m) for m in messages])
        if len(text) > MAX_LOG_LENGTH:
            text = text[:MAX_LOG_LENGTH] + TRUNCATED_SUFFIX
        (self.errors if errors else self.logs).append(text + "\n")

    def write_native(self, text, errors=False):
        if not self.enabled or self.closed or not text:
            return
        if not self.native:
            self.native = True
            self.logs.append(NATIVE_NOTICE)
        (self.errors if errors else self.logs).append(text)

    def flush(self):
        if self.closed:
            return
        self.closed = True
        if not self.enabled:
            return
        # Append: in development the id `dev` repeats across requests.
        try:
            if self.logs:
                with open(LOGS_DIR + "/" + self.id + "_logs.log", "a", encoding="utf-8") as f:
                    f.write("".join(self.logs))
            if self.errors:
                with open(LOGS_DIR + "/" + self.id + "_errors.log", "a", encoding="utf-8") as f:
                    f.write("".join(self.errors))
        except OSError as err:
            # A full or missing log volume must not turn a good response into a 500.
            sys.__stderr__.write("Failed to write logs %s: %s\n" % (self.id, err))


class V2Capture:
    """Collects a v2 call's native stdout/stderr for the JSON reply."""

    __slots__ = ("stdout", "stderr")

    def __init__(self):
        self.stdout = []
        self.stderr = []

    def write_native(self, text, errors=False):
        (self.stderr if errors else self.stdout).append(text)


class _NativeStream:
    """Replaces sys.stdout / sys.stderr: output of code running for a request goes to that
    request's log; everything else to the real stream."""

    def __init__(self, real, errors):
        self._real = real
        self._errors = errors

    def write(self, text):
        target = _CURRENT.get()
        if target is None:
            return self._real.write(text)
        if not isinstance(text, str):
            raise TypeError("write() argument must be str, not %s" % type(text).__name__)
        target.write_native(text, self._errors)
        return len(text)

    def writelines(self, lines):
        for line in lines:
            self.write(line)

    def flush(self):
        if _CURRENT.get() is None:
            self._real.flush()

    def isatty(self):
        return False

    def __getattr__(self, name):
        return getattr(self._real, name)


# --- the context API --------------------------------------------------------------------------


class Request:
    # No __slots__ here nor on Context: user code may hang its own attributes on them.
    body_binary = b""
    headers = None

    @property
    def body_text(self):
        return self.body_binary.decode("utf-8")

    @property
    def body_raw(self):
        return self.body_text

    @property
    def body_json(self):
        import json

        return json.loads(self.body_text)

    @property
    def body(self):
        content_type = self.headers.get("content-type", "text/plain").lower()
        if content_type.startswith("application/json"):
            return self.body_json if self.body_binary else {}
        return self.body_text

    # camelCase aliases, for code written against the Node API
    bodyBinary = property(lambda self: self.body_binary)
    bodyText = property(lambda self: self.body_text)
    bodyJson = property(lambda self: self.body_json)
    bodyRaw = property(lambda self: self.body_raw)
    queryString = property(lambda self: self.query_string)


def _to_bytes(body):
    if isinstance(body, bytes):
        return body
    if isinstance(body, (bytearray, memoryview)):
        return bytes(body)
    if isinstance(body, str):
        return body.encode("utf-8")
    if body is None:
        return b""
    import json

    return json.dumps(body, separators=(",", ":"), ensure_ascii=False).encode("utf-8")


class Response:
    """Each method returns the response description; only main's return value is sent."""

    __slots__ = ()

    def binary(self, bytes, statusCode=200, headers=None):  # noqa: A002 (upstream name)
        return {"body": _to_bytes(bytes), "statusCode": statusCode, "headers": dict(headers or {})}

    def text(self, body, statusCode=200, headers=None):
        return {"body": _to_bytes(body), "statusCode": statusCode, "headers": dict(headers or {})}

    def send(self, body, statusCode=200, headers=None):
        return {"body": _to_bytes(body), "statusCode": statusCode, "headers": dict(headers or {})}

    def json(self, obj, statusCode=200, headers=None):
        headers = dict(headers or {})
        headers["content-type"] = "application/json"
        import json

        body = json.dumps(obj, separators=(",", ":"), ensure_ascii=False).encode("utf-8")
        return {"body": body, "statusCode": statusCode, "headers": headers}

    def empty(self):
        return {"body": b"", "statusCode": 204, "headers": {}}

    def redirect(self, url, statusCode=301, headers=None):
        headers = dict(headers or {})
        headers["location"] = url
        return {"body": b"", "statusCode": statusCode, "headers": headers}


_RESPONSE = Response()


class Context:
    def __init__(self, req, logger):
        self.req = req
        self.res = _RESPONSE
        self._logger = logger

    def log(self, *messages):
        self._logger.entry(messages)

    def error(self, *messages):
        self._logger.entry(messages, errors=True)


# --- entrypoint ------------------------------------------------------------------------------

_entry_cache = {}


_RUNTIME_DIRS = (
    os.path.dirname(asyncio.__file__) + os.sep,
    os.path.dirname(concurrent.futures.__file__) + os.sep,
    os.path.dirname(importlib.__file__) + os.sep,
    "<frozen importlib",
)


def _is_runtime_frame(filename):
    return filename in SERVER_FILES or filename.startswith(_RUNTIME_DIRS)


def _short_traceback(err):
    """Traceback without the leading server / executor frames, so it starts in user code."""
    tb = err.__traceback__
    first = tb
    while first is not None and _is_runtime_frame(first.tb_frame.f_code.co_filename):
        first = first.tb_next
    # No user frame at all (e.g. a SyntaxError, which names its file and line itself): no stack.
    err = err.with_traceback(first)
    import traceback

    return "".join(traceback.format_exception(err))


def load_entrypoint(entry):
    """Imports the user module once. Returns (main, is_async, error_message)."""
    cached = _entry_cache.get(entry)
    if cached is not None:
        return cached
    if not entry or not os.path.isfile(os.path.join(FUNCTION_DIR, entry)):
        result = (None, False, "Failed to load entrypoint, file %s does not exist." % entry)
    else:
        module_name = entry[:-3] if entry.endswith(".py") else entry
        module_name = "function." + module_name.strip("/").replace("/", ".")
        try:
            module = importlib.import_module(module_name)
        except BaseException as err:  # SyntaxError, ImportError, SystemExit at import...
            result = (None, False, _short_traceback(err))
        else:
            main = getattr(module, "main", None)
            if not callable(main):
                result = (None, False, NO_MAIN)
            else:
                result = (main, inspect.iscoroutinefunction(main), None)
    _entry_cache[entry] = result
    return result


class Deadline(Exception):
    """The request's `x-open-runtimes-timeout` passed (a TimeoutError raised by the function
    itself stays an ordinary error)."""


async def run_function(main, is_async, args, timeout):
    """Runs main(*args) in the current context: async functions on the loop, sync ones in POOL
    (a sync function's thread cannot be stopped: at the deadline we answer anyway)."""
    if is_async:
        call = main(*args)
    else:
        loop = asyncio.get_running_loop()
        call = loop.run_in_executor(POOL, contextvars.copy_context().run, main, *args)
    if timeout is None:
        result = await call
    else:
        deadline = asyncio.timeout(timeout)
        try:
            async with deadline:
                result = await call
        except TimeoutError:
            if deadline.expired():
                raise Deadline() from None
            raise
    if inspect.isawaitable(result):  # a plain def that returned a coroutine
        result = await result
    return result


# --- v5 ---------------------------------------------------------------------------------------


def _parse_url(request, scheme):
    raw = request.raw_path
    raw = raw.split("#", 1)[0]
    path, _, query_string = raw.partition("?")
    query = {}
    if query_string:
        for param in query_string.split("&"):
            key, _, value = param.partition("=")
            if key:
                query[key] = value
    default_port = 443 if scheme == "https" else 80
    host = request.headers.get("host", "")
    port = default_port
    colon = host.rfind(":")
    if colon != -1 and "]" not in host[colon:]:
        try:
            port = int(host[colon + 1:])
            host = host[:colon]
        except ValueError:
            pass
    url = scheme + "://" + host
    if port != default_port:
        url += ":" + str(port)
    url += path
    if query_string:
        url += "?" + query_string
    return path, query_string, query, host, port, url


def _request_headers(raw_headers):
    headers = {}
    for key, value in raw_headers:
        if key.startswith(HIDDEN_PREFIX):
            continue
        if key in headers:
            value = headers[key] + ("; " if key == "cookie" else ", ") + value
        headers[key] = value
    if ENFORCED_HEADERS:
        headers.update(ENFORCED_HEADERS)
    return headers


def _compare_digest(a, b):
    import hmac

    return hmac.compare_digest(a, b)


TEXT_PLAIN = "text/plain; charset=utf-8"


def _build_response(output, log_id):
    if not isinstance(output, dict):
        raise TypeError("main must return a context.res response, got %s" % type(output).__name__)
    body = _to_bytes(output.get("body", b""))
    status = int(output.get("statusCode", 200))
    if not 100 <= status <= 999:
        raise ValueError("statusCode must be between 100 and 999, got %d" % status)
    headers = []
    content_type = None
    for key, value in (output.get("headers") or {}).items():
        key = str(key).lower()
        if key.startswith(HIDDEN_PREFIX) or key in _FRAMING_HEADERS:
            continue
        if key == "content-type":
            content_type = str(value).lower()
            continue
        if isinstance(value, (list, tuple)):
            for item in value:
                headers.append((key, str(item)))
        else:
            headers.append((key, value if isinstance(value, str) else _stringify_header(value)))
    if not content_type:
        content_type = "text/plain"
    if not content_type.startswith("multipart/") and "charset=" not in content_type:
        content_type += "; charset=utf-8"
    headers.append(("content-type", content_type))
    headers.append(("x-open-runtimes-log-id", log_id))
    for key, value in headers:
        if "\r" in key or "\n" in key or "\r" in value or "\n" in value or ":" in key or not key:
            raise ValueError("Invalid response header %r: %r" % (key, value))
    return status, headers, body


def _empty(status, log_id):
    return status, [("x-open-runtimes-log-id", log_id)], b""


def _log_id_of(h):
    """The log id of a request (v5): "" when logging is disabled."""
    logging_mode = h.get("x-open-runtimes-logging", "")
    if not (logging_mode == "" or logging_mode.lower() == "enabled"):
        return ""
    return _safe_log_id(h.get("x-open-runtimes-log-id", "")) or ("dev" if DEVELOPMENT else new_log_id())


async def handle_v5(request):
    h = request.headers
    log_id = _log_id_of(h)
    logger = Logger(log_id != "", log_id)

    timeout = h.get("x-open-runtimes-timeout", "")
    if timeout:
        if not (timeout.isascii() and timeout.isdigit()) or int(timeout) == 0:
            return 500, [("content-type", TEXT_PLAIN), ("x-open-runtimes-log-id", log_id)], TIMEOUT_MESSAGE.encode()
        timeout = int(timeout)
    else:
        timeout = None

    if SECRET and not _compare_digest(h.get("x-open-runtimes-secret", "").encode(), SECRET):
        return 500, [("content-type", TEXT_PLAIN), ("x-open-runtimes-log-id", log_id)], UNAUTHORIZED_MESSAGE.encode()

    try:
        req = Request()
        req.body_binary = request.body
        req.method = request.method
        req.headers = _request_headers(request.header_list)
        req.scheme = h.get("x-forwarded-proto", "http")
        req.path, req.query_string, req.query, req.host, req.port, req.url = _parse_url(request, req.scheme)
        context = Context(req, logger)

        main, is_async, load_error = load_entrypoint(ENTRYPOINT)
        if load_error is not None:
            logger.entry([load_error], errors=True)
            return _empty(503, log_id)

        token = _CURRENT.set(logger)
        try:
            output = await run_function(main, is_async, (context,), timeout)
        except Deadline:
            logger.entry(["Execution timed out."], errors=True)
            return _empty(500, log_id)
        except asyncio.CancelledError:
            raise
        except BaseException as err:  # the function's own error, incl. SystemExit
            logger.entry([_short_traceback(err)], errors=True)
            return _empty(500, log_id)
        finally:
            _CURRENT.reset(token)

        if output is None:
            logger.entry([RETURN_MISSING], errors=True)
            return _empty(500, log_id)
        try:
            return _build_response(output, log_id)
        except Exception as err:
            logger.entry([_short_traceback(err)], errors=True)
            return _empty(500, log_id)
    finally:
        logger.flush()


# --- v2 ---------------------------------------------------------------------------------------


class V2Request:
    __slots__ = ("variables", "headers", "payload")

    @property
    def env(self):
        return self.variables


class V2Response:
    __slots__ = ("response", "status")

    def __init__(self):
        self.response = ""
        self.status = 200

    def send(self, text, status=200):
        self.response = text if isinstance(text, str) else _to_bytes(text).decode("utf-8", "replace")
        self.status = int(status)
        return self

    def json(self, obj, status=200):
        self.response = obj
        self.status = int(status)
        return self


JSON_HEADERS = [("content-type", "application/json")]


def _v2_reply(status, response, capture, extra_error=""):
    import json

    stderr = "".join(capture.stderr) + extra_error
    body = {"response": response, "stdout": "".join(capture.stdout), "stderr": stderr}
    if not 100 <= status <= 999:
        status = 500
    return status, JSON_HEADERS, json.dumps(body, separators=(",", ":"), ensure_ascii=False).encode("utf-8")


async def handle_v2(request):
    challenge = request.headers.get("x-internal-challenge", "")
    if not _compare_digest(challenge.encode(), V2_KEY.encode()):
        return 500, JSON_HEADERS, b'{"stderr":"Unauthorized"}'
    capture = V2Capture()
    try:
        import json

        raw = request.body
        data = json.loads(raw) if raw.strip() else {}
        if not isinstance(data, dict):
            raise ValueError("the v2 request body must be a JSON object")
    except ValueError as err:
        return _v2_reply(500, "", capture, "Invalid request body: %s\n" % err)

    req = V2Request()
    variables = data.get("variables")
    req.variables = variables if isinstance(variables, dict) else (data.get("env") or {})
    req.headers = data.get("headers") or {}
    payload = data.get("payload", "")
    req.payload = "" if payload is None else payload
    res = V2Response()

    main, is_async, load_error = load_entrypoint(V2_ENTRYPOINT)
    if load_error is not None:
        return _v2_reply(500, "", capture, load_error + "\n")

    token = _CURRENT.set(capture)
    try:
        await run_function(main, is_async, (req, res), None)
    except asyncio.CancelledError:
        raise
    except BaseException as err:
        return _v2_reply(500, "", capture, _short_traceback(err))
    finally:
        _CURRENT.reset(token)
    return _v2_reply(res.status, res.response, capture)


# --- HTTP/1.1 ---------------------------------------------------------------------------------

TEXT_HEADERS = [("content-type", TEXT_PLAIN)]
HEALTH_REPLY = (200, TEXT_HEADERS, b"OK")


async def dispatch(request):
    path = request.raw_path
    if path.startswith("/__opr/"):
        path = path.partition("?")[0]
        if path == "/__opr/health":
            return HEALTH_REPLY
        if path == "/__opr/timings":
            try:
                with open(TIMINGS_FILE, "r", encoding="utf-8") as f:
                    timings = f.read()
            except OSError:
                timings = ""
            return 200, TEXT_HEADERS, timings.encode("utf-8")
    return await (handle_v2(request) if V2_KEY else handle_v5(request))


# --- pool mode --------------------------------------------------------------------------------
# Started without code (runtimes/pool-protocol.md); the function arrives once, over
# POST /__hearth/specialise. Until then only that route and the health check answer. `main`
# points `dispatch` at `_pool_dispatch`, and specialising at `_specialised_dispatch`, so requests
# of a fresh server pay nothing for pool mode.

POOL_ROUTE = "/__hearth/specialise"
POOL_BODY_LIMIT = 512 * 1024 * 1024
NOT_SPECIALISED_REPLY = (503, JSON_HEADERS, b'{"message":"Runtime is not specialised yet."}')
# `.open-runtimes` beyond plain `NAME=word` lines: bash sources it (as start.sh does) on top of the
# env it is given, its output to stderr, and prints the resulting environment.
SOURCE_SCRIPT = 'set -a; source "$1" >&2; exec /usr/bin/env -0'
# Variables bash sets for itself: the server keeps its own (those of a fresh start).
SHELL_OWN = frozenset(("SHLVL", "PWD", "OLDPWD", "_"))
# A value written by bash's `printf %q` for the usual values: characters bash takes literally,
# backslash escapes, or '' for the empty string. Anything else is left to bash.
PLAIN_LINE = r"([A-Za-z_][A-Za-z0-9_]*)=((?:[A-Za-z0-9_./:@%+,=^-]|[^\x00-\x7f]|\\.)*|'')"
_fresh_dispatch = dispatch
_pool_state = "waiting"  # -> "specialising" -> "specialised" | "failed": the step runs once
# Request bodies: larger than MAX_BODY only for the archive of a pool member.
_body_limit = MAX_BODY


def _pool_reply(status, message):
    import json

    return status, JSON_HEADERS, json.dumps({"message": message}, separators=(",", ":")).encode()


async def _pool_dispatch(request):
    path = request.raw_path
    if path == "/__opr/health":
        return HEALTH_REPLY
    if path == POOL_ROUTE and request.method == "POST":
        return await _specialise(request)
    return NOT_SPECIALISED_REPLY


def _specialised_dispatch(request):
    """The fresh server's dispatch; only the pool route answers (409)."""
    if request.raw_path == POOL_ROUTE and request.method == "POST":
        return _specialise(request)
    return _fresh_dispatch(request)


async def _specialise(request):
    global _pool_state
    given = request.headers.get("x-hearth-pool-secret", "").encode("utf-8", "surrogateescape")
    if not _compare_digest(given, POOL_SECRET):
        return _pool_reply(401, 'Missing or wrong "x-hearth-pool-secret" header.')
    if _pool_state != "waiting":
        if _pool_state == "specialising":
            return _pool_reply(409, "A specialisation is under way.")
        if _pool_state == "failed":
            return _pool_reply(409, "A specialisation failed: this runtime is unusable.")
        return _pool_reply(409, "Runtime is already specialised.")
    _pool_state = "specialising"
    # Shielded: a client gone away does not leave the runtime half specialised.
    return await asyncio.shield(asyncio.ensure_future(_run_specialisation(request.body)))


async def _run_specialisation(body):
    global _pool_state, dispatch, _body_limit
    try:
        status, message = await _load_specialisation(body)
    except Exception as err:
        status, message = 500, "Failed to load the function: %s" % err
    if status != 200:
        _pool_state = "failed"
        return _pool_reply(status, message)
    _pool_state = "specialised"
    _body_limit = MAX_BODY
    dispatch = _specialised_dispatch
    return 200, JSON_HEADERS, b'{"specialised":true}'


def _parse_specialisation(body):
    """{"env": {"NAME": "value", ...}, "code": "<base64 archive>"} -> (env, archive) or a message."""
    import base64
    import json

    try:
        payload = json.loads(body)
    except ValueError as err:
        return "The body is not JSON: %s" % err
    if not isinstance(payload, dict):
        return 'The body must be a JSON object with "env" and "code".'
    variables = payload.get("env")
    if variables is None:
        variables = {}
    if not isinstance(variables, dict):
        return '"env" must be an object of strings.'
    for key, value in variables.items():
        if not key or "=" in key or "\0" in key or not isinstance(value, str) or "\0" in value:
            return 'Invalid variable in "env": %s.' % json.dumps(key)
    code = payload.get("code")
    if not isinstance(code, str):
        return '"code" must be a base64 string.'
    try:
        archive = base64.b64decode(code, validate=True)
    except ValueError:  # binascii.Error, or non-ASCII text
        return '"code" must be a base64 string.'
    return variables, archive


def _run(command, data, child_env):
    """Runs a command with `data` on stdin: (None, stdout) or (message of the failure, None)."""
    import subprocess

    try:
        done = subprocess.run(command, input=data, capture_output=True, env=child_env, cwd="/usr/local/server")
    except (OSError, ValueError) as err:  # e.g. a variable the OS cannot take
        return str(err), None
    stderr = done.stderr.decode("utf-8", "replace")
    if done.returncode != 0:
        return stderr.strip() or "%s exited with %d" % (command[0], done.returncode), None
    if stderr:
        sys.__stderr__.write(stderr)
    return None, done.stdout


class _Refused(Exception):
    """An archive member that could lead out of the function folder."""


def _umask():
    """The process umask, from /proc (setting it to read it would race with other threads)."""
    try:
        with open("/proc/self/status", "rb") as f:
            for line in f:
                if line.startswith(b"Umask:"):
                    return int(line.split()[1], 8)
    except (OSError, ValueError, IndexError):
        pass
    return 0o022


def _member_path(name):
    """A member name as a relative path ("" for the folder itself), refused when it could lead
    out of the folder."""
    if name.startswith("/") or "\0" in name:
        raise _Refused("Member name is absolute: %s" % name)
    parts = [part for part in name.split("/") if part not in ("", ".")]
    if ".." in parts:
        raise _Refused("Member name contains '..': %s" % name)
    return "/".join(parts)


def _owner_ids():
    """User and group ids by name (tar gives owners by name first), read once from the image."""
    global _OWNER_IDS
    if _OWNER_IDS is None:
        ids = ({}, {})
        for table, path in zip(ids, ("/etc/passwd", "/etc/group")):
            try:
                with open(path, "rb") as f:
                    for line in f.read().split(b"\n"):
                        fields = line.split(b":")
                        if len(fields) > 2 and fields[2].isdigit():
                            table.setdefault(os.fsdecode(fields[0]), int(fields[2]))
            except OSError:
                pass  # numeric ids only
        _OWNER_IDS = ids
    return _OWNER_IDS


_OWNER_IDS = None
_UMASK = None


def _mtime_ns(member):
    """The modification time in nanoseconds: pax gives decimals a float would round."""
    text = member.pax_headers.get("mtime")
    if text:
        seconds, _, decimals = text.partition(".")
        try:
            whole = int(seconds) * 1_000_000_000
            part = int((decimals + "000000000")[:9]) if decimals else 0
            return whole - part if seconds.startswith("-") else whole + part
        except ValueError:
            pass
    return int(member.mtime * 1_000_000_000)


def _untar(data, dest):
    """Extracts the tar archive `data` into the empty folder `dest` in process, as GNU tar does:
    as root, modes as they are, owners (by name first) and modification times, folders' attributes
    once their content is in place; as another user, modes through the umask and owners kept.
    `tarfile` reads the headers (ustar, GNU, pax); the files are written here, with only the calls
    that change something (with fuse-overlayfs, every one is a round trip to its daemon).
    Absolute names and `..` are refused; symbolic links are made last, so nothing is written
    through one (they may point anywhere, as with tar: a venv's `bin/python3` points to /usr/bin).
    Returns (None, the content of `.open-runtimes`: bytes, None when there is none, False when it
    is no plain file, a link say, to be read from the folder), or (an error message, None), or
    (False, None) for entry types left to GNU tar (devices, fifos, sparse files)."""
    import io
    import stat
    import tarfile

    global _UMASK
    try:
        tar = tarfile.open(fileobj=io.BytesIO(data), mode="r:")
        members = tar.getmembers()
    except tarfile.TarError as err:
        return "This does not look like a tar archive (%s)" % err, None
    # tarfile takes a damaged header after the first one for the end of the archive, tar does not.
    end = data[tar.offset:tar.offset + tarfile.BLOCKSIZE]
    if end and (len(end) < tarfile.BLOCKSIZE or any(end)):
        return "Damaged or truncated archive at byte %d" % tar.offset, None
    entries = []
    for member in members:
        if not (member.isdir() or member.issym() or member.islnk() or member.isreg()) or member.issparse():
            return False, None
        if member.isreg() and member.offset_data + member.size > len(data):
            return "Unexpected end of archive in %s" % member.name, None
        try:
            path = _member_path(member.name)
            link = _member_path(member.linkname) if member.islnk() else member.linkname
        except _Refused as err:
            return str(err), None
        if (not path and not member.isdir()) or (member.issym() and (not link or "\0" in link)):
            return "Invalid member %r" % member.name, None
        entries.append((member, path, link))

    if _UMASK is None:
        _UMASK = _umask()
    umask = _UMASK
    euid, egid = os.geteuid(), os.getegid()
    as_root = euid == 0
    root_stat = os.stat(dest)
    inherits = bool(root_stat.st_mode & stat.S_ISGID)  # new files would get the folder's group
    users, groups = _owner_ids() if as_root else ({}, {})
    made = {"": stat.S_IMODE(root_stat.st_mode)}  # folders in place -> mode made with (or -1)
    symlinks = {}  # path -> member, made last
    late_links = []  # hard links to symbolic links, made after them
    dirs = []
    view = memoryview(data)

    def full(rel):
        return dest + "/" + rel if rel else dest

    def parent_of(rel):
        return rel.rpartition("/")[0]

    def ensure_parent(rel):
        parent = parent_of(rel)
        if parent not in made:
            os.makedirs(full(parent), exist_ok=True)
            while parent and parent not in made:
                made[parent] = -1
                parent = parent_of(parent)

    def through_link(rel):
        parent = parent_of(rel)
        while parent:
            if parent in symlinks:
                return True
            parent = parent_of(parent)
        return False

    def replace(rel, create):
        """Creates rel; an entry already there (a duplicate name) is replaced, as tar does."""
        try:
            return create()
        except FileExistsError:
            path = full(rel)
            if stat.S_ISDIR(os.lstat(path).st_mode):
                os.rmdir(path)
            else:
                os.unlink(path)
            made.pop(rel, None)
            return create()

    def mode_of(member):
        return member.mode & 0o7777 if as_root else member.mode & 0o777 & ~umask

    def chown_if_needed(member, uid, gid, chown):
        if as_root:
            want_uid = users.get(member.uname, member.uid) if member.uname else member.uid
            want_gid = groups.get(member.gname, member.gid) if member.gname else member.gid
            if want_uid != uid or want_gid != gid or inherits:
                chown(want_uid, want_gid)

    def hard_link(rel, link):
        ensure_parent(rel)
        replace(rel, lambda: os.link(full(link), full(rel), follow_symlinks=False))

    env_file = None
    try:
        for member, rel, link in entries:
            if rel == ".open-runtimes":
                env_file = bytes(view[member.offset_data:member.offset_data + member.size]) if member.isreg() else False
            if not member.issym():
                symlinks.pop(rel, None)  # a later entry of that name wins
            if member.isreg():
                ensure_parent(rel)
                created = member.mode & 0o777
                flags = os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC
                fd = replace(rel, lambda: os.open(full(rel), flags, created))
                try:
                    start, size = member.offset_data, member.size
                    while size > 0:
                        written = os.write(fd, view[start:start + size])
                        start += written
                        size -= written
                    chown_if_needed(member, euid, egid, lambda uid, gid: os.fchown(fd, uid, gid))
                    mode = mode_of(member)  # after chown, which clears the set-id bits
                    if mode != created & ~umask:
                        os.fchmod(fd, mode)
                    mtime = _mtime_ns(member)
                    os.utime(fd, ns=(mtime, mtime))
                finally:
                    os.close(fd)
            elif member.isdir():
                if rel not in made:
                    ensure_parent(rel)
                    # Made with its mode already (root writes in any folder, others need rwx).
                    created = member.mode & 0o777 if as_root else 0o700
                    try:
                        os.mkdir(full(rel), created)
                        made[rel] = created & ~umask
                    except FileExistsError:
                        if not stat.S_ISDIR(os.lstat(full(rel)).st_mode):
                            raise
                        made[rel] = -1
                dirs.append((member, rel))
            elif member.islnk():
                if link in symlinks:
                    late_links.append((rel, link))
                else:
                    hard_link(rel, link)
            else:  # symbolic link
                symlinks.pop(rel, None)
                symlinks[rel] = (member, link)
        for rel, (member, link) in symlinks.items():
            if through_link(rel):
                return "Cannot create %s: it is inside a symbolic link" % rel, None
            ensure_parent(rel)
            path = full(rel)
            replace(rel, lambda: os.symlink(link, path))
            chown_if_needed(member, euid, egid, lambda uid, gid: os.lchown(path, uid, gid))
            mtime = _mtime_ns(member)
            os.utime(path, ns=(mtime, mtime), follow_symlinks=False)
        for rel, link in late_links:
            if through_link(rel) or through_link(link):
                return "Cannot create %s: it is inside a symbolic link" % rel, None
            hard_link(rel, link)
        for member, rel in reversed(dirs):
            if rel in symlinks or through_link(rel):
                continue  # replaced by a link
            path = full(rel)
            created = made.get(rel, -1)
            if not rel:
                owner = (root_stat.st_uid, root_stat.st_gid)
            else:
                owner = (euid, egid) if created != -1 else (-1, -1)
            chown_if_needed(member, owner[0], owner[1], lambda uid, gid: os.chown(path, uid, gid))
            mode = mode_of(member)
            if mode != created:
                os.chmod(path, mode)
            mtime = _mtime_ns(member)
            os.utime(path, ns=(mtime, mtime))
    except (OSError, ValueError, OverflowError) as err:
        return str(err), None
    return None, env_file


# `.open-runtimes` lines, compiled while a pool member waits.
_plain_line = None
_ESCAPE = None


def _compile_plain_line():
    global _plain_line, _ESCAPE
    import re

    _plain_line = re.compile(PLAIN_LINE, re.S)
    _ESCAPE = re.compile(r"\\(.)", re.S)


def _extract(archive, child_env):
    """Extracts the archive like start.sh and returns (None, the function's environment) or (a
    message, None). Blocking: runs in a worker thread."""
    # Gzip by its magic bytes, inflated here: tar -z would start a gzip process for it.
    if archive[:2] == b"\x1f\x8b":
        import gzip

        try:
            archive = gzip.decompress(archive)
        except (OSError, EOFError, ValueError) as err:  # gzip.BadGzipFile, zlib.error, truncated
            return "The code is not a valid archive: %s" % err, None
    # In process: a `tar` process costs more than extracting a small archive. Entry types beyond
    # files, folders and links (devices, fifos, sparse files) are left to GNU tar.
    error, env_file = _untar(archive, FUNCTION_DIR)
    if error is False:
        error, env_file = _run(["tar", "-xf", "-", "-C", FUNCTION_DIR], archive, child_env)[0], False
    if error is not None:
        return "The code is not a valid archive: %s" % error, None
    path = FUNCTION_DIR + "/.open-runtimes"
    if env_file is False:  # to be read (start.sh sources it only when it is a file)
        try:
            with open(path, "rb") as f:
                env_file = f.read()
        except OSError:
            env_file = None
    lines = [] if env_file is None else env_file.decode("utf-8", "surrogateescape").split("\n")
    if _plain_line is None:
        _compile_plain_line()
    following = dict(child_env)
    for line in lines:
        if not line:
            continue
        match = _plain_line.fullmatch(line)
        if match is None:
            error, dump = _run(["bash", "-c", SOURCE_SCRIPT, "bash", path], b"", child_env)
            if error is not None:
                return "Failed to source .open-runtimes: %s" % error, None
            following = {}
            for entry in dump.split(b"\0"):
                name, eq, value = entry.partition(b"=")
                if name and eq:
                    following[os.fsdecode(name)] = os.fsdecode(value)
            return None, following
        value = match.group(2)
        following[match.group(1)] = "" if value == "''" else _ESCAPE.sub(r"\1", value)
    return None, following


async def _load_specialisation(body):
    """The start steps of a fresh runtime, in process: the archive into the function folder, then
    the environment, then the settings. Returns (status, message)."""
    started = time.perf_counter()
    parsed = _parse_specialisation(body)
    if isinstance(parsed, str):
        return 400, parsed
    variables, archive = parsed
    child_env = dict(os.environ)
    child_env.update(variables)
    error, following = await asyncio.get_running_loop().run_in_executor(None, _extract, archive, child_env)
    if error is not None:
        return 400, error

    # The function's environment becomes ours (but for the shell's own variables: those of the
    # server's start stay).
    for name in list(os.environ):
        if name not in following and name not in SHELL_OWN:
            del os.environ[name]
    for name, value in following.items():
        if name not in SHELL_OWN and os.environ.get(name) != value:
            os.environ[name] = value
    # helpers/start.sh's prepare_start: the function's venv for the processes it starts.
    if os.path.isdir(VENV_DIR + "/bin"):
        os.environ["VIRTUAL_ENV"] = VENV_DIR
        os.environ["PATH"] = VENV_DIR + "/bin:" + os.environ.get("PATH", "")

    _read_config()
    _use_function_packages()
    try:
        with open(TIMINGS_FILE, "w", encoding="utf-8") as f:
            f.write("extract=%.6f\n" % (time.perf_counter() - started))
    except OSError as err:
        sys.__stderr__.write("Failed to write %s: %s\n" % (TIMINGS_FILE, err))
    return 200, None


# Set by the server, never taken from the function's headers.
_FRAMING_HEADERS = frozenset(("content-length", "transfer-encoding", "connection", "keep-alive", "upgrade"))
# Statuses that never carry a body nor a content-length (RFC 9110 §8.6).
_NO_BODY_STATUS = frozenset((204, 304))
_REASONS = {}
_DATE = [0, b""]


def _reason(status):
    reason = _REASONS.get(status)
    if reason is None:
        from http import HTTPStatus

        try:
            reason = HTTPStatus(status).phrase
        except ValueError:
            reason = "Unknown"
        _REASONS[status] = reason
    return reason


def _date_header():
    now = int(time.time())
    if now != _DATE[0]:
        _DATE[0] = now
        _DATE[1] = time.strftime("date: %a, %d %b %Y %H:%M:%S GMT\r\n", time.gmtime(now)).encode()
    return _DATE[1]


class HttpRequest:
    """What the handlers read of a request: method, raw_path, headers (first value of each
    lower-cased name), header_list (every (name, value), lower-cased names) and body."""

    __slots__ = ("method", "raw_path", "headers", "header_list", "body", "keep_alive", "http10")


class HttpProtocol(asyncio.Protocol):
    """One connection: requests are parsed by httptools, answered one after the other in order
    (a pipelined request waits for the previous answer), each by `dispatch` in a task of its own
    connection."""

    __slots__ = (
        "transport", "parser", "url", "header_list", "body", "body_size", "queue", "task",
        "paused", "closed", "discard", "upgrade",
    )

    def __init__(self):
        self.transport = None
        self.parser = HttpRequestParser(self)
        self.url = b""
        self.header_list = []
        self.body = []
        self.body_size = 0
        self.queue = deque()
        self.task = None
        self.paused = False
        self.closed = False
        self.discard = False
        self.upgrade = False

    # -- asyncio callbacks --

    def connection_made(self, transport):
        self.transport = transport

    def connection_lost(self, exc):
        self.closed = True
        self.queue.clear()
        if self.task is not None:
            self.task.cancel()  # the client is gone: so is its request

    def data_received(self, data):
        if self.discard:
            return
        try:
            self.parser.feed_data(data)
        except HttpParserUpgrade:
            # A request asking to switch protocols was answered as a plain request: parsing
            # stops there, so the connection closes after the answer.
            self.discard = True
            self.upgrade = True
            if self.task is None and not self.queue:
                self.transport.close()
        except HttpParserError:
            self._reject(400, "Bad Request")

    # -- httptools callbacks --

    def on_message_begin(self):
        self.url = b""
        self.header_list = []
        self.body = []
        self.body_size = 0

    def on_url(self, url):
        self.url += url

    def on_header(self, name, value):
        self.header_list.append((name.decode("latin-1").lower(), value.decode("utf-8", "surrogateescape")))

    def on_headers_complete(self):
        if self.discard:
            return
        length = None
        expect = None
        for name, value in self.header_list:
            if name == "content-length":
                length = value
            elif name == "expect":
                expect = value
        if length is not None and length.strip().isdigit() and int(length) > _body_limit:
            self._reject(413, "Request Entity Too Large")
        elif expect is not None and expect.lower() == "100-continue" and self.parser.get_http_version() == "1.1":
            self.transport.write(b"HTTP/1.1 100 Continue\r\n\r\n")

    def on_body(self, chunk):
        if self.discard:
            return
        self.body_size += len(chunk)
        if self.body_size > _body_limit:
            self._reject(413, "Request Entity Too Large")
        else:
            self.body.append(chunk)

    def on_message_complete(self):
        if self.discard:
            return
        request = HttpRequest()
        request.method = self.parser.get_method().decode("latin-1")
        request.raw_path = self.url.decode("utf-8", "surrogateescape")
        header_list = request.header_list = self.header_list
        headers = {}
        for name, value in header_list:
            if name not in headers:
                headers[name] = value
        request.headers = headers
        body = self.body
        request.body = body[0] if len(body) == 1 else b"".join(body)
        request.keep_alive = self.parser.should_keep_alive()
        request.http10 = self.parser.get_http_version() == "1.0"
        self.body = []
        encoding = headers.get("content-encoding")
        if encoding is not None and request.body:
            try:
                request.body = _decompress(request.body, encoding.strip().lower())
            except _TooLarge:
                self._reject(413, "Request Entity Too Large")
                return
            except Exception:
                self._reject(400, "Can not decode content-encoding: %s" % encoding)
                return
        self.queue.append(request)
        if self.task is None:
            self.task = asyncio.get_running_loop().create_task(self._serve())
        elif len(self.queue) > 16 and not self.paused:
            self.paused = True
            self.transport.pause_reading()

    # -- answering --

    def _reject(self, status, message):
        """Answers `status` after the requests before it, then closes: the rest of what the client
        sends is dropped (the body of a 413 is not worth reading)."""
        self.discard = True
        headers = [("content-type", TEXT_PLAIN)]
        if status == 413 and not V2_KEY:
            log_id = _log_id_of(dict(self.header_list[::-1]))
            headers.append(("x-open-runtimes-log-id", log_id))
        self.queue.append((status, headers, message.encode()))
        if self.task is None:
            self.task = asyncio.get_running_loop().create_task(self._serve())

    async def _serve(self):
        queue = self.queue
        try:
            while queue:
                request = queue.popleft()
                if isinstance(request, tuple):  # an answer to send before closing
                    self._write(request[0], request[1] + [("connection", "close")], request[2], False)
                    self._close_later()
                    return
                try:
                    status, headers, body = await dispatch(request)
                except Exception:
                    import traceback

                    traceback.print_exc(file=sys.__stderr__)
                    status, headers, body = 500, TEXT_HEADERS, b"Internal Server Error"
                if self.closed:
                    return
                keep_alive = request.keep_alive and not (self.upgrade and not queue)
                if not keep_alive:
                    headers = headers + [("connection", "close")]
                elif request.http10:
                    headers = headers + [("connection", "keep-alive")]
                self._write(status, headers, body, request.method == "HEAD")
                if not keep_alive:
                    self.transport.close()
                    return
                if self.paused and len(queue) <= 4:
                    self.paused = False
                    self.transport.resume_reading()
        finally:
            self.task = None

    def _write(self, status, headers, body, head):
        parts = ["HTTP/1.1 %d %s\r\n" % (status, _reason(status))]
        for key, value in headers:
            parts.append(key + ": " + value + "\r\n")
        if status in _NO_BODY_STATUS or status < 200:
            body = b""
        else:
            parts.append("content-length: %d\r\n" % len(body))
            if head:
                body = b""
        data = "".join(parts).encode("utf-8") + _date_header() + b"\r\n"
        if len(body) < 65536:
            self.transport.write(data + body)
        else:
            self.transport.write(data)
            self.transport.write(body)

    def _close_later(self):
        # Give the client a moment to read the answer before the connection (and what it still
        # sends) goes: closing at once could reset the connection under the unread answer.
        transport = self.transport
        try:
            transport.write_eof()
        except (OSError, RuntimeError, NotImplementedError):
            pass
        asyncio.get_running_loop().call_later(2.0, transport.close)


class _TooLarge(Exception):
    pass


def _decompress(body, encoding):
    """gzip / deflate request bodies are inflated (as aiohttp did); others stay as they are."""
    if encoding in ("gzip", "x-gzip"):
        wbits = 16 + 15
    elif encoding == "deflate":
        wbits = 15 if body[:1] and (body[0] & 0x0F) == 8 else -15  # zlib header or raw deflate
    else:
        return body
    import zlib

    inflater = zlib.decompressobj(wbits)
    out = inflater.decompress(body, MAX_BODY + 1)
    if len(out) > MAX_BODY or inflater.unconsumed_tail:
        raise _TooLarge()
    return out + inflater.flush()


# --- server -----------------------------------------------------------------------------------


def _use_function_packages():
    """After the server's imports: user code sees its venv first, then the function folder."""
    import site

    version = "python%d.%d" % sys.version_info[:2]
    site_packages = os.path.join(VENV_DIR, "lib", version, "site-packages")
    before = list(sys.path)
    if os.path.isdir(site_packages):
        site.addsitedir(site_packages)  # also runs its .pth files
    added = [p for p in sys.path if p not in before]
    sys.path[:] = added + [p for p in before if p != ""] + [FUNCTION_ROOT, FUNCTION_DIR]


def _warm_pool_member():
    """While a pool member waits (never in fresh mode, whose start this would delay): what the
    specialise step would otherwise load or compile."""
    global _UMASK
    import base64  # noqa: F401 (the modules are cached: the specialise step finds them)
    import gzip  # noqa: F401
    import hmac  # noqa: F401
    import json  # noqa: F401
    import stat  # noqa: F401
    import subprocess  # noqa: F401 (archives left to GNU tar, unusual `.open-runtimes`)
    import tarfile  # noqa: F401

    _compile_plain_line()
    _ESCAPE.sub(r"\1", _plain_line.fullmatch("A=b\\ c").group(2))
    _UMASK = _umask()
    _owner_ids()
    # The folders written to: an image's folders are copied up by overlayfs on their first change
    # (the same mode again changes nothing else).
    for folder in (FUNCTION_DIR, LOGS_DIR, "/mnt/telemetry"):
        try:
            os.chmod(folder, os.stat(folder).st_mode & 0o7777)
        except OSError:
            pass


async def serve():
    loop = asyncio.get_running_loop()
    # The socket first: once the port answers, the executor finds it there.
    side = await _listen_on_socket(loop, os.environ.get("OPEN_RUNTIMES_SOCKET", ""))
    listener = await loop.create_server(HttpProtocol, "0.0.0.0", 3000, reuse_address=True, backlog=1024)
    print("HTTP server successfully started!", flush=True)
    # The server is PID 1 of its container, where SIGTERM has no default action: handle it, so
    # `docker stop` ends the container at once instead of after its kill timeout.
    stop = asyncio.Event()
    for signum in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(signum, stop.set)
    # What only requests need, once the server listens (the first request would pay for it). A
    # pool member does this once it has its function, and meanwhile loads what specialising needs.
    if POOLED:
        _warm_pool_member()
        await loop.run_in_executor(None, int)  # starts the worker thread of the extraction
    else:
        _use_function_packages()
    await stop.wait()
    listener.close()
    if side is not None:
        side.close()


async def _listen_on_socket(loop, path):
    """Hearth extension (runtimes/socket.md): the same server on a Unix socket as well, in a folder
    the executor shares with the container, so its calls skip TCP and the bridge. A socket left by
    an earlier run of this container (a restart) is replaced; failing to listen leaves the TCP
    port, which the executor falls back to."""
    if not path:
        return None
    try:
        os.unlink(path)
    except OSError:
        pass
    try:
        return await loop.create_unix_server(HttpProtocol, path, backlog=1024)
    except OSError as err:
        print(f"Unix socket {path}: {err}", file=sys.stderr, flush=True)
        return None


def main():
    global dispatch, _body_limit
    if POOLED:
        dispatch = _pool_dispatch
        _body_limit = POOL_BODY_LIMIT
    sys.stdout = _NativeStream(sys.stdout, errors=False)
    sys.stderr = _NativeStream(sys.stderr, errors=True)
    try:
        import uvloop  # optional: about twice the requests/s of the stock loop
    except ImportError:
        uvloop = None
    if uvloop is not None:
        uvloop.install()
    asyncio.run(serve())


if __name__ == "__main__":
    main()
