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
index they started with, and an answer names the state it was computed on
and what was done ("search": rerank, qe_k as applied). A state that fails to
load is refused (logged, counted, told by /v1/health) and the last good one
served. The server only reads the index folder, so several
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
from dplg_tf.http.bodies import parse_json
from dplg_tf.http.server import (DEFAULT_HTTP_LIMITS, Gate, HttpError, HttpServer,
                                  call_boxed, error_response, json_response,
                                  prometheus_response, read_body, unbox)
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


def _pointer(folder):
    """CURRENT's text, None without one: what the reload thread watches."""
    try:
        with open(os.path.join(folder, StateFolder.POINTER), "rb") as f:
            return f.read(4096)
    except FileNotFoundError:
        return None
    except OSError as e:
        return f"unreadable: {e}"


class IndexView:
    """One served index state; a request takes one and uses only it."""

    def __init__(self, state, index, image_root):
        self.state, self.index = state, index
        self.names = set(index.names)
        self.files = ImageFiles(image_root, index.image_root)


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
        pointer = _pointer(index_dir)
        self._view = self._load()
        self._served = pointer   # CURRENT's text when the served state was read
        self._refused = None     # (CURRENT's text, sentence, when) of a refused state
        self._stop = threading.Event()
        self._thread = None
        self.reloads = self.refused = self.thread_restarts = 0

    @property
    def index(self):
        return self._view.index

    @property
    def state(self):
        return self._view.state

    def _load(self):
        state = _state_name(self.index_dir)
        index = DescriptorIndex.load(
            self.index_dir, os.path.join(self.index_dir, state) if state else None)
        index.check_probe(self.probe)
        return IndexView(state, index, self.image_root)

    def reload_if_changed(self):
        """Load the committed state if it is not the one served; True if swapped.
        A state that fails to load is refused (logged, counted, told by
        problem()) and the last good one kept; it is tried again when CURRENT
        changes or after RETRY_SECONDS. One replaced while read is tried at
        the next check."""
        pointer = _pointer(self.index_dir)
        if pointer == self._served:
            return False
        if self._refused is not None and self._refused[0] == pointer and (
                time.monotonic() - self._refused[2] < self.RETRY_SECONDS):
            return False
        try:
            view = self._load()
        except Exception as e:  # noqa: BLE001 - no state may stop the serving of the last good one
            if _pointer(self.index_dir) == pointer:   # else a writer moved CURRENT meanwhile
                self._refuse(pointer, e)
            return False
        self._view, self._served, self._refused = view, pointer, None
        self.reloads += 1
        if self.metrics is not None:
            self.metrics.reloaded(len(view.index))
        log.info("serving index state %s (%d vectors)", view.state or "(flat)",
                 len(view.index))
        return True

    RETRY_SECONDS = 60.0

    def _refuse(self, pointer, error):
        why = str(error) if isinstance(error, UserError) else (
            f"{type(error).__name__}: {shorten(error, 200)}")
        folder = os.path.normpath(self.index_dir)   # no server path in /v1/health
        why = why.replace(folder, os.path.basename(folder))
        name = "(no CURRENT)" if pointer is None else shorten(pointer.decode(
            "utf-8", "replace").strip() if isinstance(pointer, bytes) else pointer, 80)
        sentence = (f"Index state {name} was refused ({why.rstrip('.')}); serving state "
                    f"{self.state or '(flat)'} instead.")
        again = self._refused is not None and self._refused[:2] == (pointer, sentence)
        if self._refused is None or self._refused[0] != pointer:
            self.refused += 1
            if self.metrics is not None:
                self.metrics.refused.inc()
        self._refused = (pointer, sentence, time.monotonic())
        if not again:
            log.error("%s (in %s)", sentence, self.index_dir)

    def _start_reloads(self):
        self._thread = threading.Thread(target=self._reload_loop, name="index-reload",
                                        daemon=True)
        self._thread.start()

    def _reload_loop(self):
        """Check for a new state every reload_seconds until stopped; whatever
        ends this loop otherwise is logged and a new thread takes over."""
        try:
            while not self._stop.wait(self.reload_seconds):
                try:
                    self.reload_if_changed()
                except Exception:  # noqa: BLE001 - a bug must not end the reloads
                    log.exception("checking the index in %s failed; checked again later",
                                  self.index_dir)
        except BaseException:  # noqa: BLE001 - even SystemExit: a new thread goes on
            if self._stop.is_set():
                return
            self.thread_restarts += 1
            log.exception("the index reload thread ended unexpectedly; starting a new one")
            try:
                self._start_reloads()
            except Exception:  # noqa: BLE001 - problem() then tells /v1/health
                log.exception("the index reload thread could not be started again")

    def start(self):
        if self.reload_seconds > 0:
            self._start_reloads()
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
        """Why the server is degraded now (sentences: a failing model server, a
        refused index state, a stopped reload thread), or None."""
        problems = [] if self.model_server is None or self.model_server.problem is None else [
            self.model_server.problem]
        refused = self._refused
        if refused is not None:
            problems.append(refused[1])
        thread = self._thread
        if thread is not None and not thread.is_alive() and not self._stop.is_set():
            problems.append("The index reload thread has stopped, so new index states are "
                            "not loaded; restart the server.")
        return " ".join(problems) or None

    def too_slow(self):
        """The sentence of a search past its deadline (recorded for the model server)."""
        if self.model_server is not None:
            return self.model_server.failed(f"The model server did not answer within "
                                            f"{self.timeout:g} s; try again later.")
        return f"The search did not finish within {self.timeout:g} s; try again later."

    # ------------------------------------------------------------ searching

    def info(self, view=None):
        """The model, the index state (`view`'s, else the served one) and the defaults."""
        view = view or self._view
        index, model = view.index, dict(self.model, dim=int(view.index.dim))
        if self.model_server is not None and self.model_server.version is not None:
            model["version"] = self.model_server.version   # the one served now
        return {"model": model,
                "index": {"folder": os.path.basename(os.path.normpath(self.index_dir)),
                          "state": view.state, "kind": index.kind, "vectors": len(index)},
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
        view = self._view   # this request's index state, whatever reloads meanwhile
        index, files = view.index, view.files
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
        qe_k = min(query["qe_k"], len(index))
        if qe_k:
            vectors = alpha_qe(vectors, k=qe_k, alpha=query["qe_alpha"],
                               neighbours=index_neighbours(index))
        rerank = bool(query.get("rerank", self.rerank_default)) and len(index) >= 2
        if rerank:   # (index_rerank leaves an index of one as it is)
            from dplg_tf.retrieval.rerank import index_rerank

            scores, ids = index_rerank(index, vectors, query["top_k"], **self.rerank)
        else:
            scores, ids = index.search(vectors, query["top_k"])
        results = [{"name": files.shown(index.names[i]), "score": round(float(s), 6),
                    "image": files.url(index.names[i])}
                   for s, i in zip(scores[0], ids[0]) if i >= 0]
        answer = dict(self.info(view), results=results)
        answer["search"] = {"rerank": rerank, **self.rerank, "qe_k": qe_k,   # what was done
                            "qe_alpha": query["qe_alpha"] if qe_k else None}
        if query.get("attention") and query.get("image") is not None:
            answer["attention"] = self._attention(query["image"])
        answer["took_ms"] = round((time.perf_counter() - start) * 1000, 2)
        return answer

    def thumbnail(self, name):
        """JPEG bytes of an indexed image, at most THUMBNAIL pixels a side."""
        from PIL import Image

        view = self._view
        names, files = view.names, view.files
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
