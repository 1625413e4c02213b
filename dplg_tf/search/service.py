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

Queries are described by the model the index was built with (checked by
the probe descriptor at start and at each reload). The index is reloaded in
the background when its CURRENT state changes; requests in flight keep the
index they started with. The server only reads the index folder, so several
replicas can serve one folder. Answers name images as search.names says:
relative, never by a server path. A search gets `timeout` seconds; past
them, or when the model server (search.model_server) fails, it answers 503.
"""

import asyncio
import base64
import concurrent.futures
import io
import json
import logging
import os
import threading
import time

import numpy as np

from dplg_tf import images
from dplg_tf.errors import UserError
from dplg_tf.search.index import DescriptorIndex
from dplg_tf.search.names import ImageFiles
from dplg_tf.search.queries import SearchMetrics, bad_request, parse_query
from dplg_tf.errors import shorten
from dplg_tf.http.server import (Gate, HttpError, HttpServer, error_response,
                                  json_response, prometheus_response,
                                  read_body)
from dplg_tf.storage.atomic import StateFolder

log = logging.getLogger("dplg_tf.search")

STATIC = os.path.join(os.path.dirname(os.path.abspath(__file__)), "static")
THUMBNAIL = 256


def _model_info(describer):
    """The model's name and version, not where it lies on the server."""
    identity = describer.identity
    if identity.startswith("grpc://"):
        name, version = identity.rsplit("/", 2)[1:]
    else:
        version = os.path.basename(identity)
        name = os.path.basename(os.path.dirname(identity)) if version.isdigit() else version
    return {"name": name, "version": int(version) if version.isdigit() else None}


def _state_name(folder):
    """The committed state's name (what CURRENT says), or '' for a flat folder."""
    current = StateFolder(folder).current()
    return "" if current is None else os.path.basename(current)


class Searcher:
    """An index folder and a describer; the index is swapped when CURRENT changes."""

    def __init__(self, index_dir, describer, image_root=None, limits=images.DEFAULT_LIMITS,
                 max_top_k=1000, reload_seconds=2.0, metrics=None, rerank=False,
                 rerank_settings=None, timeout=30.0, check_seconds=2.0):
        """`rerank`: whether a query that does not say ("rerank": true/false)
        is re-ranked, with `rerank_settings` {m, k, beta} (retrieval.rerank's
        defaults if None). `timeout`: the seconds a search may take; a model
        server is checked every `check_seconds`."""
        from dplg_tf.retrieval import rerank as reranking
        from dplg_tf.search.model_server import ModelServer

        self.index_dir, self.describer = index_dir, describer
        self.rerank_default = bool(rerank)
        self.rerank = dict(rerank_settings or reranking.DEFAULTS)
        reranking.check(**self.rerank)
        self.image_root = image_root
        self.limits, self.max_top_k = limits, int(max_top_k)
        self.reload_seconds = reload_seconds
        self.timeout = float(timeout)
        self.metrics = metrics
        self.probe = describer.probe()
        self.model = _model_info(describer)
        self.model_server = None if getattr(describer, "client", None) is None else ModelServer(
            describer, self.probe, self.timeout, check_seconds, limits.max_request_mb)
        self.state, index = self._load()
        self._view = self._view_of(index)
        self._stop = threading.Event()
        self._thread = None
        self.reloads = 0

    def _view_of(self, index):
        """(index, its names as a set, ImageFiles): swapped as one."""
        return index, set(index.names), ImageFiles(self.image_root, index.image_root)

    @property
    def index(self):
        return self._view[0]

    def _load(self):
        state = _state_name(self.index_dir)
        index = DescriptorIndex.load(self.index_dir)
        index.check_probe(self.probe)
        return state, index

    def reload_if_changed(self):
        """Load the committed state if it is not the one served; True if swapped.
        A state that cannot be read yet (a writer is committing) is tried again later."""
        try:
            if _state_name(self.index_dir) == self.state:
                return False
            state, index = self._load()
        except (UserError, OSError) as e:
            log.warning("the index in %s was not reloaded (tried again later): %s",
                        self.index_dir, e)
            return False
        self._view, self.state = self._view_of(index), state
        self.reloads += 1
        if self.metrics is not None:
            self.metrics.reloaded(len(index))
        log.info("serving index state %s (%d vectors)", state or "(flat)", len(index))
        return True

    def start(self):
        def loop():
            while not self._stop.wait(self.reload_seconds):
                self.reload_if_changed()

        if self.reload_seconds > 0:
            self._thread = threading.Thread(target=loop, name="index-reload", daemon=True)
            self._thread.start()
        if self.model_server is not None:
            self.model_server.start()
        return self

    def stop(self):
        self._stop.set()
        if self._thread is not None:
            self._thread.join(30)
        if self.model_server is not None:
            self.model_server.stop()

    def problem(self):
        """Why searches by image fail now (one sentence), or None."""
        return None if self.model_server is None else self.model_server.problem

    def too_slow(self):
        """The sentence of a search past its deadline (recorded for the model server)."""
        if self.model_server is not None:
            return self.model_server.failed(f"The model server did not answer within "
                                            f"{self.timeout:g} s; try again later.")
        return f"The search did not finish within {self.timeout:g} s; try again later."

    # ------------------------------------------------------------ searching

    def info(self):
        index, model = self.index, dict(self.model, dim=int(self.index.dim))
        if self.model_server is not None and self.model_server.version is not None:
            model["version"] = self.model_server.version   # the one served now
        return {"model": model,
                "index": {"folder": os.path.basename(os.path.normpath(self.index_dir)),
                          "state": self.state, "kind": index.kind, "vectors": len(index)},
                "search": {"rerank": self.rerank_default, **self.rerank}}

    def _call_model(self, fn, *args):
        """fn(*args) of the describer: a refused image is 400, a model server
        that fails 503."""
        from dplg_tf.retrieval.describers import refusal
        from dplg_tf.serving.client import ClientError

        server = self.model_server
        if server is not None and server.other_model:
            raise HttpError(503, server.problem)
        try:
            out = fn(*args)
        except Exception as e:  # noqa: BLE001 - a refused image is the client's error
            reason = refusal(e)
            if reason is not None:
                raise bad_request(f"The query image was refused by the model: {reason}") from None
            if server is not None and isinstance(e, ClientError):
                raise HttpError(503, server.failed(e)) from None
            raise
        if server is not None:
            server.answered()
        return out

    def _describe(self, blob):
        try:
            images.check_bytes(blob, self.limits)
        except images.ImageError as e:
            raise bad_request(f"The query image was refused: {e}") from None
        return np.asarray(self._call_model(self.describer.describe_bytes, [blob])[0],
                          np.float32)

    def _attention(self, blob):
        """The query's attention map (multiscale, scale 1) over it, as a PNG data URL."""
        from PIL import Image

        from dplg_tf.images import attention

        image = images.decode(blob, self.limits)
        scale = min(1.0, 512.0 / max(image.shape[:2]))   # what the page shows
        if scale < 1.0:
            size = (max(1, round(image.shape[1] * scale)), max(1, round(image.shape[0] * scale)))
            image = np.asarray(Image.fromarray(image).resize(size, Image.Resampling.BILINEAR))
        amap = self._call_model(self.describer.multiscale, image, [1.0])["attention"]
        picture = (attention.overlay(image, np.squeeze(amap)) * 255).astype(np.uint8)
        buf = io.BytesIO()
        Image.fromarray(picture).save(buf, "PNG")
        return "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode("ascii")

    def search(self, query):
        """The JSON answer of a checked query {image bytes or descriptor, top_k, ...}."""
        from dplg_tf.retrieval.expansion import alpha_qe, index_neighbours

        start = time.perf_counter()
        index, _, files = self._view   # this request's index, whatever reloads meanwhile
        if query.get("image") is not None:
            vector = self._describe(query["image"])
        else:
            vector = query["descriptor"]
            if vector.shape != (index.dim,):
                raise bad_request(f"The descriptor has {vector.size} values; the index holds "
                           f"{index.dim}-d descriptors.")
            if not np.all(np.isfinite(vector)) or not np.any(vector):
                raise bad_request("The descriptor must be finite and not all zero.")
        vectors = vector[None, :]
        if query["qe_k"]:
            vectors = alpha_qe(vectors, k=query["qe_k"], alpha=query["qe_alpha"],
                               neighbours=index_neighbours(index))
        if query.get("rerank", self.rerank_default):
            from dplg_tf.retrieval.rerank import index_rerank

            scores, ids = index_rerank(index, vectors, query["top_k"], **self.rerank)
        else:
            scores, ids = index.search(vectors, query["top_k"])
        results = [{"name": files.shown(index.names[i]), "score": round(float(s), 6),
                    "image": files.url(index.names[i])}
                   for s, i in zip(scores[0], ids[0]) if i >= 0]
        answer = dict(self.info(), results=results)
        if query.get("attention") and query.get("image") is not None:
            answer["attention"] = self._attention(query["image"])
        answer["took_ms"] = round((time.perf_counter() - start) * 1000, 2)
        return answer

    def thumbnail(self, name):
        """JPEG bytes of an indexed image, at most THUMBNAIL pixels a side."""
        from PIL import Image

        _, names, files = self._view
        if files.root is None:
            raise HttpError(404, "This server has no --image_root, so it shows no images.")
        stored = files.index_name(name, names)
        if stored is None:
            raise HttpError(404, f"{shorten(name)} is not in the index.")
        path = files.path(stored)
        if path is None:
            raise HttpError(404, f"{shorten(name)} is not a file under --image_root.")
        try:
            data = images.read_bytes(path, self.limits)
            with Image.open(io.BytesIO(data)) as img:
                img.draft("RGB", (THUMBNAIL, THUMBNAIL))
                img = img.convert("RGB")
                img.thumbnail((THUMBNAIL, THUMBNAIL))
                buf = io.BytesIO()
                img.save(buf, "JPEG", quality=85)
        except images.ImageError as e:
            raise HttpError(404, f"{shorten(name)} cannot be shown ({e.reason}).") from None
        except (OSError, ValueError, SyntaxError) as e:
            raise HttpError(404, f"{shorten(name)} cannot be decoded: {e}.") from None
        return buf.getvalue()


# ------------------------------------------------------------------ the app

class SearchApp:
    def __init__(self, searcher, limits=images.DEFAULT_LIMITS, workers=8, max_concurrent=64,
                 metrics=None):
        self.searcher, self.metrics = searcher, metrics or SearchMetrics()
        self.metrics.vectors.set(len(searcher.index))
        searcher.metrics = self.metrics
        self.limit = limits.max_request_mb * 1024 * 1024
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
        async def work():
            start = time.perf_counter()
            body = await read_body(request, self.limit)
            content_type = request.headers.get("content-type", "")
            if content_type.startswith("multipart/form-data"):
                query = await self._form_query(request, body)
            else:
                try:
                    fields = json.loads(body)
                except (ValueError, RecursionError) as e:
                    raise bad_request(f"The body is not valid JSON ({shorten(e, 120)}).") from None
                if not isinstance(fields, dict):
                    raise bad_request("The body must be a JSON object.")
                query = parse_query(fields, self.searcher.max_top_k)
            left = max(0.0, self.searcher.timeout - (time.perf_counter() - start))
            try:
                answer = await asyncio.wait_for(asyncio.wrap_future(
                    self.pool.submit(self.searcher.search, query)), left)
            except asyncio.TimeoutError:
                raise HttpError(503, self.searcher.too_slow()) from None
            self.metrics.latency.observe(time.perf_counter() - start)
            return json_response(answer)
        return await self._guarded("search", work)

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
            try:
                fields["descriptor"] = json.loads(fields["descriptor"])
            except ValueError:
                raise bad_request("The descriptor field must be a JSON list of numbers.") from None
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
        return prometheus_response(self.metrics.registry)


class SearchServer(HttpServer):
    """The search service on host:port (a Searcher behind a SearchApp)."""

    def __init__(self, searcher, host="127.0.0.1", port=8600, limits=images.DEFAULT_LIMITS,
                 workers=8, max_concurrent=64):
        self.searcher = searcher
        self.api = SearchApp(searcher, limits, workers, max_concurrent)
        super().__init__(self.api.app(), host, port, name="search")

    def start(self):
        self.searcher.start()
        return super().start()

    def stop(self, grace=30.0):
        super().stop(grace)
        self.api.pool.shutdown(wait=False, cancel_futures=True)
        self.searcher.stop()
