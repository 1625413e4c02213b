"""Model versions for dplg-serve: loading one SavedModel version with its
signatures and batcher, and serving the newest version under a base path.

A version that fails to load (half copied, broken) is skipped and reported
with its error until its files change; then it is tried again.
"""

import io
import logging
import os
import threading
import time

import grpc

from dplg_tf.errors import tf_error_message
from dplg_tf.serving import batching
from dplg_tf.serving.requests import ServingError, shorten

log = logging.getLogger("dplg_tf.serving")

BATCHED_SIGNATURE = "serving_default"


# ----------------------------------------------------------------- models

class LoadedVersion:
    """One loaded SavedModel version with its signatures and batcher."""

    def __init__(self, name, version, path, batching_params=None, warm_up=True):
        import tensorflow as tf
        from tensorflow.core.protobuf import saved_model_pb2

        self.name, self.version, self.path = name, version, path
        self.saved_model = tf.saved_model.load(path)
        self.signatures = dict(self.saved_model.signatures)
        proto = saved_model_pb2.SavedModel()
        with open(os.path.join(path, "saved_model.pb"), "rb") as f:
            proto.ParseFromString(f.read())
        self.signature_defs = dict(proto.meta_graphs[0].signature_def)
        self.inputs = {name: fn.structured_input_signature[1]
                       for name, fn in self.signatures.items()}
        self.batcher = None
        if batching_params is not None and BATCHED_SIGNATURE in self.signatures:
            self.batcher = batching.Batcher(self._run_batched, **batching_params)
        if warm_up:
            self._warm_up()

    def _run_batched(self, images):
        import tensorflow as tf

        out = self.signatures[BATCHED_SIGNATURE](image_bytes=tf.constant(images, tf.string))
        return out["global_descriptor"].numpy()

    def _warm_up(self):
        """One request through serving_default, so the first client is not slow."""
        if BATCHED_SIGNATURE not in self.signatures:
            return
        from PIL import Image

        buf = io.BytesIO()
        Image.new("RGB", (96, 96), (128, 96, 64)).save(buf, "JPEG")
        self._run_batched([buf.getvalue()])

    def close(self):
        if self.batcher is not None:
            self.batcher.close()


class ModelManager:
    """Serves the newest version under `base_path`, polling for new ones."""

    def __init__(self, name, base_path, batching_params=None, poll_seconds=1.0,
                 warm_up=True):
        self.name, self.base_path = name, base_path
        self.batching_params = batching_params
        self.poll_seconds = poll_seconds
        self.warm_up = warm_up
        self._current = None
        self._failed = {}  # version -> (files' stamp, error message)
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._thread = None

    def versions_on_disk(self):
        from dplg_tf.export.saved_models import saved_model_versions

        return saved_model_versions(self.base_path)

    def poll_once(self):
        """Load the newest version if it is newer than the one served. A version
        that failed to load is tried again once its files change."""
        failed = self.failed_versions(stamps=True)
        versions = [v for v in self.versions_on_disk()
                    if v not in failed or failed[v][0] != self._stamp(v)]
        if not versions:
            return False
        newest = versions[-1]
        current = self._current
        if current is not None and current.version >= newest:
            return False
        path = os.path.join(self.base_path, str(newest))
        log.info("loading %s version %d from %s", self.name, newest, path)
        start, stamp = time.perf_counter(), self._stamp(newest)
        try:
            loaded = LoadedVersion(self.name, newest, path, self.batching_params, self.warm_up)
        except Exception as e:  # noqa: BLE001 - a broken version must not stop serving
            message = tf_error_message(e)
            log.error("version %d failed to load and is skipped until its files change: %s",
                      newest, message)
            with self._lock:
                self._failed[newest] = (stamp, message)
            return False
        with self._lock:
            self._failed.pop(newest, None)
            old, self._current = self._current, loaded
        log.info("serving %s version %d (loaded in %.1f s)", self.name, newest,
                 time.perf_counter() - start)
        if old is not None:
            threading.Thread(target=old.close, daemon=True).start()  # drains its queue
        return True

    def _stamp(self, version):
        """Names, sizes and modification times of a version's files."""
        stamp = []
        for root, _, names in os.walk(os.path.join(self.base_path, str(version))):
            for name in sorted(names):
                try:
                    st = os.stat(os.path.join(root, name))
                except OSError:
                    continue
                stamp.append((os.path.join(root, name), st.st_size, st.st_mtime_ns))
        return tuple(sorted(stamp))

    def failed_versions(self, stamps=False):
        """{version: error message} of the versions that failed to load (a copy
        taken under the lock: the poll thread changes the table)."""
        with self._lock:
            table = dict(self._failed)
        return table if stamps else {v: message for v, (_, message) in table.items()}

    def start(self):
        self.poll_once()

        def loop():
            while not self._stop.wait(self.poll_seconds):
                try:
                    self.poll_once()
                except Exception as e:  # noqa: BLE001
                    log.error("polling %s failed: %s", self.base_path, e)

        self._thread = threading.Thread(target=loop, name="version-poll", daemon=True)
        self._thread.start()

    def stop(self):
        self._stop.set()
        if self._thread is not None and self._thread is not threading.current_thread():
            self._thread.join(60)   # a load in progress finishes first
        if self._current is not None:
            self._current.close()

    @property
    def current(self):
        return self._current

    def get(self, model_spec):
        """The loaded version a request's ModelSpec asks for, or ServingError."""
        if model_spec.name != self.name:
            raise ServingError(grpc.StatusCode.NOT_FOUND,
                               f"model {shorten(model_spec.name)} is not served here "
                               f"(this server serves {self.name!r})")
        current = self._current
        if current is None:
            raise ServingError(grpc.StatusCode.UNAVAILABLE,
                               f"model {self.name!r} has no loaded version yet")
        if model_spec.HasField("version") and model_spec.version.value != current.version:
            raise ServingError(grpc.StatusCode.NOT_FOUND,
                               f"version {model_spec.version.value} of {self.name!r} is not "
                               f"loaded (serving version {current.version})")
        if model_spec.version_label:
            raise ServingError(grpc.StatusCode.NOT_FOUND,
                               f"version label {shorten(model_spec.version_label)} is not "
                               "defined")
        return current
