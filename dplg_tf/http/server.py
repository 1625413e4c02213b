"""Hosting an HTTP app (Starlette) on uvicorn in a background thread, and
what our HTTP handlers share: JSON errors, bounded bodies, bounded
concurrency, blocking work off the event loop.

The socket is bound before the thread starts, so a port in use fails at
once in the caller and port 0 gives a free port known at construction.
"""

import asyncio
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


def prometheus_response(registry):
    """The Prometheus text page of a prometheus_client registry."""
    from prometheus_client import CONTENT_TYPE_LATEST, generate_latest
    from starlette.responses import Response

    return Response(generate_latest(registry), headers={"Content-Type": CONTENT_TYPE_LATEST})


async def read_body(request, limit):
    """The request body, refused (400) past `limit` bytes before reading it all."""
    declared = request.headers.get("content-length")
    if declared is not None:
        if not declared.isdigit():
            raise HttpError(400, "The Content-Length header is not a number.")
        if int(declared) > limit:
            raise HttpError(400, f"The request body is {int(declared)} bytes; the limit is "
                            f"{limit} bytes (--max_request_mb).")
    chunks, size = [], 0
    async for chunk in request.stream():
        size += len(chunk)
        if size > limit:
            raise HttpError(400, f"The request body is over the limit of {limit} bytes "
                            "(--max_request_mb).")
        chunks.append(chunk)
    return b"".join(chunks)


class Gate:
    """At most `limit` requests inside at once; the next are refused at once
    (429) rather than queued without bound. Work runs on `workers` threads."""

    def __init__(self, limit, workers):
        self.limit = max(1, int(limit))
        self.inside = 0
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
        """fn(*args) on a worker thread."""
        import anyio.to_thread

        if self._limiter is None:
            self._limiter = anyio.CapacityLimiter(self._workers)
        return await anyio.to_thread.run_sync(fn, *args, limiter=self._limiter)


class HttpServer:
    """uvicorn serving `app` on host:port from a background thread."""

    def __init__(self, app, host="127.0.0.1", port=0, name="http"):
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
        config = uvicorn.Config(app, log_level="warning", access_log=False, lifespan="off",
                                timeout_keep_alive=30, timeout_graceful_shutdown=30)
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
