"""The search server: image search over an index folder, for programs (JSON)
and people (a web page), on Starlette / uvicorn.

    POST /v1/search        {"image": {"b64": ...}, "top_k": 10, "qe_k": 0,
                            "rerank": false, "attention": false} or
                           {"descriptor": [...]}, or a multipart form (fields
                           image, top_k, qe_k, rerank, attention)
                        -> {"results": [{"name", "score", "image"}], "model": {...},
                            "index": {...}, "took_ms": ..., "attention": PNG data URL}
    GET  /v1/images/NAME   a thumbnail of an indexed image (names as answers give
                           them, read under --image_root only)
    GET  /v1/health        "ok" or "degraded" (and why), the model, the index state
    GET  /metrics          Prometheus text
    GET  /                 the web page (static/index.html, no build step, no CDN)

The work is the searcher's (search.searcher): queries are described by the
model the index was built with (checked by the probe descriptor at start and
at each reload), and the index is reloaded in
the background when its CURRENT state changes; requests in flight keep the
index they started with, and an answer names the state it was computed on
and what was done ("search": retrieval.query's settings as applied). A state that fails to
load is refused (logged, counted, told by /v1/health) and the last good one
served. The server only reads the index folder, so several
replicas can serve one folder. Answers name images as search.names says:
relative, never by a server path. A search gets `timeout` seconds; past
them, or when the model server (search.model_server) fails, it answers 503.
"""

import asyncio
import concurrent.futures
import logging
import os
import time

from dplg_tf import images
from dplg_tf.errors import shorten
from dplg_tf.http.bodies import parse_json
from dplg_tf.http.server import (DEFAULT_HTTP_LIMITS, Gate, HttpError, HttpServer,
                                  call_boxed, error_response, json_response,
                                  prometheus_response, read_body, unbox)
from dplg_tf.search.queries import SearchMetrics, bad_request, parse_query
log = logging.getLogger("dplg_tf.search")

STATIC = os.path.join(os.path.dirname(os.path.abspath(__file__)), "static")


# ------------------------------------------------------------------ the app

class SearchApp:
    def __init__(self, searcher, limits=images.DEFAULT_LIMITS, workers=8, max_concurrent=64,
                 metrics=None, http_limits=None):
        self.searcher, self.metrics = searcher, metrics or SearchMetrics()
        self.metrics.vectors.set(len(searcher.index))
        searcher.metrics = self.metrics
        self.limit = limits.max_request_mb * 1024 * 1024
        self.http_limits = http_limits or DEFAULT_HTTP_LIMITS
        self.gate = Gate(max_concurrent, workers)
        # searches run here: one past its deadline is answered and left to finish
        self.pool = concurrent.futures.ThreadPoolExecutor(workers, "search")

    def app(self):
        from starlette.applications import Starlette
        from starlette.routing import Mount, Route
        from starlette.staticfiles import StaticFiles

        return Starlette(routes=[
            Route("/", self.page, methods=["GET"]),
            Route("/v1/search", self.search, methods=["POST"]),
            Route("/v1/images/{name:path}", self.image, methods=["GET"]),
            Route("/v1/health", self.health, methods=["GET"]),
            Route("/metrics", self.prometheus, methods=["GET"]),
            Mount("/static", StaticFiles(directory=STATIC), name="static"),
        ], exception_handlers={404: self._not_found, 405: self._not_allowed})

    async def _not_found(self, request, exc):
        del exc
        return error_response(404, f"There is nothing at {shorten(request.url.path)}.")

    async def _not_allowed(self, request, exc):
        del exc
        return error_response(405, f"{request.method} is not allowed on "
                              f"{shorten(request.url.path)}.")

    async def page(self, request):
        from starlette.responses import FileResponse

        del request
        return FileResponse(os.path.join(STATIC, "index.html"), media_type="text/html")

    async def _guarded(self, endpoint, work):
        code = 200
        try:
            self.gate.enter()
        except HttpError as e:
            self.metrics.requests.labels(endpoint, str(e.status)).inc()
            return error_response(e.status, e)
        try:
            return await work()
        except HttpError as e:
            code = e.status
            return error_response(e.status, e)
        except Exception as e:  # noqa: BLE001 - never take the server down
            code = 500
            log.exception("%s failed", endpoint)
            return error_response(500, f"internal error: {e}")
        finally:
            self.gate.leave()
            self.metrics.requests.labels(endpoint, str(code)).inc()

    async def search(self, request):
        try:   # the body first: a slow one holds no slot (the body timeout bounds it)
            body = await read_body(request, self.limit)
        except HttpError as e:
            self.metrics.requests.labels("search", str(e.status)).inc()
            return error_response(e.status, e)

        async def work():
            start = time.perf_counter()
            if request.headers.get("content-type", "").startswith("multipart/form-data"):
                box = [(self.searcher.search, (await self._form_query(request, body),))]
            else:   # parsed on the search thread, not the event loop
                box = [(self._search_json, (body,))]
            left = max(0.0, self.searcher.timeout - (time.perf_counter() - start))
            try:
                await asyncio.wait_for(asyncio.wrap_future(self.pool.submit(call_boxed, box)),
                                       left)
            except asyncio.TimeoutError:
                raise HttpError(503, self.searcher.too_slow()) from None
            answer = unbox(box)
            self.metrics.latency.observe(time.perf_counter() - start)
            return json_response(answer)
        return await self._guarded("search", work)

    def _search_json(self, body):
        fields = parse_json(body, self.http_limits, "The body")
        if not isinstance(fields, dict):
            raise bad_request("The body must be a JSON object.")
        return self.searcher.search(parse_query(fields, self.searcher.max_top_k))

    async def _form_query(self, request, body):
        request._body = body   # Starlette parses the form from the body read above
        try:
            form = await request.form(max_files=1, max_fields=8)
        except Exception as e:  # noqa: BLE001 - a malformed form is the client's error
            raise bad_request(f"The form cannot be read ({shorten(e, 120)}).") from None
        fields, image = {}, None
        for key, value in form.multi_items():
            if hasattr(value, "read"):
                if key != "image":
                    raise bad_request(f"The file field must be named image, not {shorten(key)}.")
                image = await value.read()
            else:
                fields[key] = value
        await form.close()
        if image is None and "descriptor" not in fields:
            raise bad_request("The form holds no image file (field image).")
        if "descriptor" in fields:
            fields["descriptor"] = parse_json(fields["descriptor"].encode("utf-8", "replace"),
                                              self.http_limits, "The descriptor field")
        return parse_query(fields, self.searcher.max_top_k, image=image)

    async def image(self, request):
        from starlette.responses import Response

        async def work():
            data = await self.gate.run(self.searcher.thumbnail,
                                       request.path_params["name"])
            return Response(data, media_type="image/jpeg",
                            headers={"Cache-Control": "max-age=300"})
        return await self._guarded("image", work)

    async def health(self, request):
        del request
        problem = self.searcher.problem()
        state = {"status": "ok"} if problem is None else {"status": "degraded",
                                                         "reason": problem}
        return json_response(dict(self.searcher.info(), **state,
                                  reloads=self.searcher.reloads))

    async def prometheus(self, request):
        del request
        return await prometheus_response(self.metrics.registry)


class SearchServer(HttpServer):
    """The search service on host:port (a Searcher behind a SearchApp), behind
    `access` (http.access: hosts, CORS, token; the page and its static files
    need no token)."""

    def __init__(self, searcher, host="127.0.0.1", port=8600, limits=images.DEFAULT_LIMITS,
                 workers=8, max_concurrent=64, access=None, http_limits=None):
        from dplg_tf.http.access import protect

        self.searcher = searcher
        self.api = SearchApp(searcher, limits, workers, max_concurrent,
                             http_limits=http_limits)
        super().__init__(protect(self.api.app(), access, host, public=("/", "/static/*")),
                         host, port, name="search", limits=http_limits)

    def start(self):
        self.searcher.start()
        return super().start()

    def stop(self, grace=30.0):
        super().stop(grace)
        self.api.pool.shutdown(wait=False, cancel_futures=True)
        self.searcher.stop()
