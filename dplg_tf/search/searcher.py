"""The searcher behind the search server: an index folder and a describer.
The served index state is swapped in by a background thread when the
folder's CURRENT changes (a state that fails to load is refused, logged,
counted and skipped); a search takes one state and answers on it alone,
through retrieval.query.run with the server's default Settings changed by
what the query asks. Thumbnails are read under the image root only.
"""

import base64
import io
import logging
import os
import threading
import time

import numpy as np

from dplg_tf import images
from dplg_tf.errors import UserError, shorten
from dplg_tf.http.server import HttpError
from dplg_tf.search.index import DescriptorIndex
from dplg_tf.search.names import ImageFiles
from dplg_tf.search.queries import bad_request
from dplg_tf.storage.atomic import StateFolder

log = logging.getLogger("dplg_tf.search")

THUMBNAIL = 256          # pixels a side of the images the page lists
ATTENTION_SIDE = 512     # and of the query's attention picture


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
                 max_top_k=1000, reload_seconds=2.0, metrics=None, settings=None,
                 timeout=30.0, check_seconds=2.0):
        """`settings` (retrieval.query.Settings): what a search does unless
        its query says otherwise (qe_k, qe_alpha, rerank). `timeout`: the
        seconds a search may take; a model server is checked every
        `check_seconds`."""
        from dplg_tf.retrieval import query
        from dplg_tf.search.model_server import ModelServer

        self.index_dir, self.describer = index_dir, describer
        self.settings = settings or query.OFF
        if self.settings.dba_k:
            raise UserError("DBA is applied when the index is built (dplg-index --dba_k), "
                            "not by the search server.")
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
        self._checking_since = None   # when the running check of the folder began
        self._decoding = threading.BoundedSemaphore(2)   # host-side decodes at once
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
    STUCK_SECONDS = 120.0   # a check of the folder longer than this is reported

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
                self._checking_since = time.monotonic()   # problem() sees a hung check
                try:
                    self.reload_if_changed()
                except Exception:  # noqa: BLE001 - a bug must not end the reloads
                    log.exception("checking the index in %s failed; checked again later",
                                  self.index_dir)
                finally:
                    self._checking_since = None
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
        since = self._checking_since
        if since is not None and time.monotonic() - since > self.STUCK_SECONDS:
            problems.append(f"Reading the index folder has not finished for "
                            f"{time.monotonic() - since:.0f} s, so new index states are not "
                            "loaded; check the disk that holds it.")
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
                "search": self.settings.report()}

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

        with self._decoding:   # a frame of up to max_pixels each, two at a time
            image = images.decode(blob, self.limits, max_side=ATTENTION_SIDE)
        amap = self._call_model(self.describer.multiscale, image, [1.0])["attention"]
        picture = (attention.overlay(image, np.squeeze(amap)) * 255).astype(np.uint8)
        buf = io.BytesIO()
        Image.fromarray(picture).save(buf, "PNG")
        return "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode("ascii")

    def search(self, query):
        """The JSON answer of a checked query {image bytes or descriptor, top_k, ...}."""
        from dplg_tf.retrieval.query import run

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
        asked = {k: query[k] for k in ("qe_k", "qe_alpha", "rerank") if k in query}
        found = run(vector[None, :], index, self.settings.replace(**asked), query["top_k"])
        scores, ids = found.scores, found.ids
        results = [{"name": files.shown(index.names[i]), "score": round(float(s), 6),
                    "image": files.url(index.names[i])}
                   for s, i in zip(scores[0], ids[0]) if i >= 0]
        answer = dict(self.info(view), results=results)
        answer["search"] = found.settings.report()   # as done
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
            with self._decoding:
                pixels = images.decode(images.read_bytes(path, self.limits), self.limits,
                                       max_side=THUMBNAIL)
        except images.ImageError as e:
            raise HttpError(404, f"{shorten(name)} cannot be shown ({e.reason}).") from None
        buf = io.BytesIO()
        Image.fromarray(pixels).save(buf, "JPEG", quality=85)
        return buf.getvalue()
