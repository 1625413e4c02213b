"""Hosting an HTTP app (Starlette) on uvicorn in a background thread, and
what our HTTP handlers share: JSON errors, bounded bodies, bounded
concurrency, blocking work off the event loop.

The socket is bound before the thread starts, so a port in use fails at
once in the caller and port 0 gives a free port known at construction.
"""

import asyncio
import dataclasses
import json
import logging
import socket
import threading

log = logging.getLogger("dplg_tf.serving")


class HttpError(Exception):
    """An error answered as {"error": message} with an HTTP status."""

    def __init__(self, status, message):
        super().__init__(message)
        self.status = status


def json_response(payload, status=200):
    from starlette.responses import Response

    body = json.dumps(payload, allow_nan=True, separators=(",", ":"))
    return Response(body, status_code=status, media_type="application/json")


def error_response(status, message):
    return json_response({"error": str(message)}, status)


async def prometheus_response(registry):
    """The Prometheus text page of a prometheus_client registry, written on a
    worker thread (a scrape does not hold up the event loop)."""
    import anyio.to_thread
    from prometheus_client import CONTENT_TYPE_LATEST, generate_latest
    from starlette.responses import Response

    page = await anyio.to_thread.run_sync(generate_latest, registry)
    return Response(page, headers={"Content-Type": CONTENT_TYPE_LATEST})


async def read_body(request, limit):
    """The request body, refused (400) past `limit` bytes before reading it all."""
    declared = request.headers.get("content-length")
    if declared is not None:
        if not declared.isdigit():
            raise HttpError(400, "The Content-Length header is not a number.")
        if int(declared) > limit:
            raise HttpError(400, f"The request body is {int(declared)} bytes; the limit is "
                            f"{limit} bytes (--max_request_mb).")
    from starlette.requests import ClientDisconnect

    chunks, size = [], 0
    try:
        async for chunk in request.stream():
            size += len(chunk)
            if size > limit:
                raise HttpError(400, f"The request body is over the limit of {limit} bytes "
                                "(--max_request_mb).")
            chunks.append(chunk)
    except ClientDisconnect:   # the client left, or the body timeout closed the connection
        raise HttpError(400, "The connection closed before the whole body came.") from None
    return b"".join(chunks)


def call_boxed(box, refusals=(HttpError,)):
    """Run the (fn, args) popped from `box` and put (result, None) or (None,
    error) back in it. The thread keeps nothing of the call (anyio's and the
    pool's idle threads hold their last arguments and results); a refusal
    (`refusals`) loses its traceback, whose frames may hold a parsed body, and
    any other exception is logged here and becomes a 500."""
    fn, args = box.pop()
    try:
        box.append((fn(*args), None))
    except refusals as e:
        e.__context__ = None
        box.append((None, e.with_traceback(None)))
    except Exception as e:  # noqa: BLE001 - never take the server down
        log.exception("%s failed", getattr(fn, "__qualname__", fn))
        box.append((None, HttpError(500, f"internal error: {e}")))


def unbox(box):
    """The result `call_boxed` left in `box`, or its error raised."""
    result, error = box.pop()
    if error is None:
        return result
    try:
        raise error
    finally:
        del error   # no cycle through this frame


class Gate:
    """At most `limit` requests inside at once; the next are refused at once
    (429) rather than queued without bound. Work runs on `workers` threads;
    `refusals`: the exceptions that are answers (see call_boxed)."""

    def __init__(self, limit, workers, refusals=(HttpError,)):
        self.limit = max(1, int(limit))
        self.inside = 0
        self.refusals = tuple(refusals)
        self._workers = int(workers)
        self._limiter = None

    def enter(self):
        if self.inside >= self.limit:
            raise HttpError(429, f"The server is busy ({self.inside} requests in progress, "
                            f"the limit is {self.limit}); retry later.")
        self.inside += 1   # on the event loop thread: no lock needed

    def leave(self):
        self.inside -= 1

    async def run(self, fn, *args):
        """fn(*args) on a worker thread (through call_boxed)."""
        import anyio.to_thread

        if self._limiter is None:
            self._limiter = anyio.CapacityLimiter(self._workers)
        box = [(fn, args)]
        await anyio.to_thread.run_sync(call_boxed, box, self.refusals, limiter=self._limiter)
        return unbox(box)


@dataclasses.dataclass(frozen=True)
class HttpLimits:
    """Bounds on each connection and JSON body of both HTTP servers (the
    README's "HTTP bounds" lists them with their flags)."""

    header_timeout: float = 10.0     # s from connecting (or a request's first byte) to its head
    body_timeout: float = 60.0       # s from a request's head to the end of its body
    keep_alive: float = 5.0          # s an idle connection is kept between requests
    max_connections: int = 512       # open connections; the next are answered 503 and closed
    json_max_depth: int = 32         # nesting of arrays and objects in a JSON body
    json_max_items: int = 8_000_000  # values of a JSON body (its , [ and { outside strings)
    json_max_objects: int = 10_000   # objects of a JSON body

    def __post_init__(self):
        for name in ("header_timeout", "body_timeout", "keep_alive"):
            if not getattr(self, name) > 0:
                raise ValueError(f"{name} must be > 0")
        for name in ("max_connections", "json_max_depth", "json_max_items",
                     "json_max_objects"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1")


DEFAULT_HTTP_LIMITS = HttpLimits()


def _raw_response(status, reason, message):
    body = json.dumps({"error": message}).encode()
    return (f"HTTP/1.1 {status} {reason}\r\ncontent-type: application/json\r\n"
            f"content-length: {len(body)}\r\nconnection: close\r\n\r\n").encode() + body


def _protocol_class(limits):
    """uvicorn's h11 protocol with what it lacks: a deadline for a request's
    head and one for its body (a connection past either is answered 408, if
    nothing was answered yet, and closed), and a bound on open connections."""
    import h11
    from uvicorn.protocols.http.h11_impl import H11Protocol

    class BoundedH11Protocol(H11Protocol):
        _phase = _timer = None

        def connection_made(self, transport):
            super().connection_made(transport)
            if len(self.connections) > limits.max_connections:
                transport.write(_raw_response(
                    503, "Service Unavailable", f"The server has {limits.max_connections} "
                    "open connections, its limit; retry later."))
                transport.close()
                return
            self._watch()

        def connection_lost(self, exc):
            self._arm(None)
            super().connection_lost(exc)

        def data_received(self, data):
            super().data_received(data)
            self._watch()

        def on_response_complete(self):
            super().on_response_complete()
            self._watch()

        def _watch(self):
            """Arm the deadline of the phase the connection is in: a head coming
            (uvicorn's keep-alive timer covers a connection idle between
            requests), a body coming, or none."""
            if self.transport.is_closing():
                phase = None
            elif self.conn.their_state is h11.SEND_BODY:
                phase = "body"
            elif self.conn.their_state is h11.IDLE and self.timeout_keep_alive_task is None:
                phase = "head"
            else:
                phase = None
            if phase != self._phase:
                self._arm(phase)

        def _arm(self, phase):
            if self._timer is not None:
                self._timer.cancel()
            self._phase, self._timer = phase, None
            if phase is not None:
                seconds = limits.header_timeout if phase == "head" else limits.body_timeout
                self._timer = self.loop.call_later(seconds, self._expired, phase, seconds)

        def _expired(self, phase, seconds):
            self._phase = self._timer = None
            if self.transport.is_closing():
                return
            answered = self.cycle is not None and self.cycle.response_started
            started = phase == "body" or self.conn.trailing_data[0]
            if started and not answered:
                what = "headers" if phase == "head" else "body"
                self.transport.write(_raw_response(
                    408, "Request Timeout", f"The request's {what} did not come within "
                    f"{seconds:g} s."))
            self.transport.close()

    return BoundedH11Protocol


def fit_open_files(limits, name="http"):
    """`limits` with max_connections that the process's open-file limit can
    hold beside everything else (gRPC's connections, model and index files):
    the soft limit is raised toward the hard one as far as needed, and when
    that is not enough the bound is lowered to half of the descriptors still
    free, with a log line saying so."""
    import os
    import resource

    wanted = limits.max_connections
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    need = 2 * wanted + 256
    if soft != resource.RLIM_INFINITY and soft < need:
        raised = need if hard == resource.RLIM_INFINITY else min(hard, need)
        if raised > soft:
            try:
                resource.setrlimit(resource.RLIMIT_NOFILE, (raised, hard))
                soft = raised
            except (ValueError, OSError):
                pass
    if soft == resource.RLIM_INFINITY:
        return limits
    try:
        in_use = len(os.listdir("/proc/self/fd"))
    except OSError:
        in_use = 64
    fit = max(8, (soft - in_use) // 2)
    if fit >= wanted:
        return limits
    log.warning("%s: the open-file limit (ulimit -n %d) leaves room for %d connections; "
                "serving at most %d instead of %d (raise the limit to serve more)",
                name, soft, fit, fit, wanted)
    return dataclasses.replace(limits, max_connections=fit)


class HttpServer:
    """uvicorn serving `app` on host:port from a background thread, within
    `limits` (HttpLimits)."""

    def __init__(self, app, host="127.0.0.1", port=0, name="http", limits=None):
        import uvicorn

        family = socket.AF_INET6 if ":" in host else socket.AF_INET
        # proto TCP: asyncio then sets TCP_NODELAY on each connection (with proto 0
        # it does not, and a response's head and body wait 40 ms for a delayed ACK)
        self.socket = socket.socket(family, socket.SOCK_STREAM, socket.IPPROTO_TCP)
        self.socket.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        self.socket.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        try:
            self.socket.bind((host, port))
        except OSError as e:
            self.socket.close()
            raise OSError(f"cannot listen on {host}:{port} ({e.strerror}); is the port "
                          "in use?") from None
        self.socket.listen(256)
        self.port = self.socket.getsockname()[1]
        self.address = f"{host}:{self.port}" if ":" not in host else f"[{host}]:{self.port}"
        self.name = name
        self.limits = limits = fit_open_files(limits or DEFAULT_HTTP_LIMITS, name)
        # uvicorn's own: keep-alive timeout, and limit_concurrency (503 once requests
        # still running reach the connection bound); ours: the rest (_protocol_class)
        config = uvicorn.Config(app, log_level="warning", access_log=False, lifespan="off",
                                http=_protocol_class(limits), ws="none",
                                timeout_keep_alive=limits.keep_alive,
                                limit_concurrency=limits.max_connections + 1,
                                timeout_graceful_shutdown=30)
        self._server = uvicorn.Server(config)
        self._thread = None

    def start(self):
        def serve():
            try:
                asyncio.run(self._server.serve(sockets=[self.socket]))
            except Exception:  # noqa: BLE001 - logged; the caller sees the port closed
                log.exception("the %s server stopped", self.name)

        self._thread = threading.Thread(target=serve, name=self.name, daemon=True)
        self._thread.start()
        return self

    def stop(self, grace=30.0):
        """Finish the requests in flight (up to `grace` s), then close."""
        self._server.config.timeout_graceful_shutdown = max(0.1, grace)
        self._server.should_exit = True
        if self._thread is not None:
            self._thread.join(grace + 5)
        self.socket.close()
