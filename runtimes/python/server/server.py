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
- configuration read once at start (secret, enforced headers, entrypoint, mode);
- `Logger`: per-request log buffers, written to /mnt/logs once at the end of the request;
- `_NativeStream`: the `sys.stdout`/`sys.stderr` proxy that routes `print()` to the logger of
  the request running in the current context (a ContextVar, which also flows into the thread
  pool), or to the real stream outside a request;
- `Request`/`Response`/`Context`: the `context` API given to `main(context)`;
- `handle_v5` / `handle_v2`: the per-request steps of runtime-protocol.md §2 / §3; each returns
  `(status, [(header, value)...], body bytes)`;
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

SECRET = os.environ.get("OPEN_RUNTIMES_SECRET", "").encode()
DEVELOPMENT = os.environ.get("OPEN_RUNTIMES_ENV", "") == "development"
V2_KEY = os.environ.get("INTERNAL_RUNTIME_KEY", "")


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


ENFORCED_HEADERS = _enforced_headers()


def _thread_count():
    try:
        return max(1, int(os.environ.get("HEARTH_PYTHON_THREADS", "")))
    except ValueError:
        return 64


# Sync `def main` runs here so a blocking function does not stall the event loop. Threads are
# created on demand, so a large maximum costs nothing until concurrent sync calls need it.
POOL = ThreadPoolExecutor(max_workers=_thread_count(), thread_name_prefix="function")


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

ENTRYPOINT = os.environ.get("OPEN_RUNTIMES_ENTRYPOINT", "")


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


V2_ENTRYPOINT = os.environ.get("INTERNAL_RUNTIME_ENTRYPOINT", "") or ENTRYPOINT
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
        if length is not None and length.strip().isdigit() and int(length) > MAX_BODY:
            self._reject(413, "Request Entity Too Large")
        elif expect is not None and expect.lower() == "100-continue" and self.parser.get_http_version() == "1.1":
            self.transport.write(b"HTTP/1.1 100 Continue\r\n\r\n")

    def on_body(self, chunk):
        if self.discard:
            return
        self.body_size += len(chunk)
        if self.body_size > MAX_BODY:
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


async def serve():
    loop = asyncio.get_running_loop()
    listener = await loop.create_server(HttpProtocol, "0.0.0.0", 3000, reuse_address=True, backlog=1024)
    print("HTTP server successfully started!", flush=True)
    # The server is PID 1 of its container, where SIGTERM has no default action: handle it, so
    # `docker stop` ends the container at once instead of after its kill timeout.
    stop = asyncio.Event()
    for signum in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(signum, stop.set)
    # What only requests need, once the server listens (the first request would pay for it).
    _use_function_packages()
    await stop.wait()
    listener.close()


def main():
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
