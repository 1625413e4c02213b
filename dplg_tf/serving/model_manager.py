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

    def __init__(self, name, version, path, batching_params=None, warm_up=True,
                 metrics=None):
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
            observe = None if metrics is None else metrics.batch_observer(name)
            self.batcher = batching.Batcher(self._run_batched, observe=observe,
                                            **batching_params)
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
    """Serves the versions of one model that its policy asks for (by default
    the newest under `base_path`), polling for new ones.

    A request without a version gets the newest loaded one; a version label
    (`labels`, from the model config) names a loaded version. A version the
    policy no longer wants is unloaded once its replacement is loaded.
    """

    def __init__(self, name, base_path, batching_params=None, poll_seconds=1.0,
                 warm_up=True, policy=("latest", 1), labels=(), metrics=None):
        from dplg_tf.serving.config import ModelConfig

        self.config = ModelConfig(name, base_path, tuple(policy), tuple(labels))
        self.name, self.base_path = name, base_path
        self.batching_params = batching_params
        self.poll_seconds = poll_seconds
        self.warm_up = warm_up
        self.metrics = metrics
        self._loaded = {}  # version -> LoadedVersion
        self._failed = {}  # version -> (files' stamp, error message)
        self._lock = threading.Lock()
        self._poll_lock = threading.Lock()
        self._stop = threading.Event()
        self._thread = None
        if metrics is not None:
            metrics.watch_queue(name, self.queued_items)

    def queued_items(self):
        """Items waiting in the batch queues of the loaded versions."""
        return sum(v.batcher.queued_items for v in self.loaded_versions().values()
                   if v.batcher is not None)

    def reconfigure(self, config):
        """Take a new policy and labels (a reread model config); the next
        poll loads and unloads versions to match."""
        with self._lock:
            self.config = config

    def versions_on_disk(self):
        from dplg_tf.export.saved_models import saved_model_versions

        return saved_model_versions(self.base_path)

    def poll_once(self):
        """Load the versions the policy wants that are not loaded (newest
        first), then unload those it no longer wants. A version that failed
        to load is tried again once its files change. True if anything changed."""
        with self._poll_lock:
            failed = self.failed_versions(stamps=True)
            on_disk = [v for v in self.versions_on_disk()
                       if v not in failed or failed[v][0] != self._stamp(v)]
            wanted = self.config.wanted(on_disk)
            changed = False
            for version in sorted(set(wanted) - set(self._loaded), reverse=True):
                changed |= self._load(version)
            # what the policy wants of the versions that could be loaded
            usable = [v for v in on_disk if v in self._loaded or v not in self._failed]
            keep = set(self.config.wanted(usable)) & set(self._loaded)
            if self._loaded and not keep:
                keep = {max(self._loaded)}   # never drop the last servable version
            for version in sorted(set(self._loaded) - keep):
                with self._lock:
                    old = self._loaded.pop(version)
                log.info("unloading %s version %d", self.name, version)
                threading.Thread(target=old.close, daemon=True).start()  # drains its queue
                changed = True
            return changed

    def _load(self, version):
        path = os.path.join(self.base_path, str(version))
        log.info("loading %s version %d from %s", self.name, version, path)
        start, stamp = time.perf_counter(), self._stamp(version)
        try:
            loaded = LoadedVersion(self.name, version, path, self.batching_params,
                                   self.warm_up, self.metrics)
        except Exception as e:  # noqa: BLE001 - a broken version must not stop serving
            message = tf_error_message(e)
            log.error("version %d failed to load and is skipped until its files change: %s",
                      version, message)
            with self._lock:
                self._failed[version] = (stamp, message)
            if self.metrics is not None:
                self.metrics.loaded(self.name, path, False, time.perf_counter() - start)
            return False
        with self._lock:
            self._failed.pop(version, None)
            self._loaded[version] = loaded
        seconds = time.perf_counter() - start
        if self.metrics is not None:
            self.metrics.loaded(self.name, path, True, seconds)
        log.info("serving %s version %d (loaded in %.1f s)", self.name, version, seconds)
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

    def loaded_versions(self):
        """{version: LoadedVersion} being served (a copy)."""
        with self._lock:
            return dict(self._loaded)

    def start(self):
        self.poll_once()

        def loop():
            while not self._stop.wait(self.poll_seconds):
                try:
                    self.poll_once()
                except Exception as e:  # noqa: BLE001
                    log.error("polling %s failed: %s", self.base_path, e)

        self._thread = threading.Thread(target=loop, name=f"version-poll-{self.name}",
                                        daemon=True)
        self._thread.start()

    def stop(self):
        self._stop.set()
        if self._thread is not None and self._thread is not threading.current_thread():
            self._thread.join(60)   # a load in progress finishes first
        for loaded in self.loaded_versions().values():
            loaded.close()

    @property
    def current(self):
        """The newest loaded version, or None."""
        with self._lock:
            return self._loaded[max(self._loaded)] if self._loaded else None

    def get(self, model_spec):
        """The loaded version a request's ModelSpec asks for, or ServingError."""
        if model_spec.name != self.name:
            raise ServingError(grpc.StatusCode.NOT_FOUND,
                               f"model {shorten(model_spec.name)} is not served here "
                               f"(this server serves {self.name!r})")
        with self._lock:
            loaded, labels = dict(self._loaded), dict(self.config.labels)
        if not loaded:
            raise ServingError(grpc.StatusCode.UNAVAILABLE,
                               f"model {self.name!r} has no loaded version yet")
        serving = ", ".join(str(v) for v in sorted(loaded))
        if model_spec.HasField("version") and model_spec.version_label:
            raise ServingError(grpc.StatusCode.INVALID_ARGUMENT,
                               "give a version or a version label, not both")
        if model_spec.HasField("version"):
            version = model_spec.version.value
            if version not in loaded:
                raise ServingError(grpc.StatusCode.NOT_FOUND,
                                   f"version {version} of {self.name!r} is not loaded "
                                   f"(serving version {serving})")
            return loaded[version]
        if model_spec.version_label:
            label = model_spec.version_label
            if label not in labels:
                raise ServingError(grpc.StatusCode.NOT_FOUND,
                                   f"version label {shorten(label)} of {self.name!r} is not "
                                   f"defined (labels: {sorted(labels) or 'none'})")
            if labels[label] not in loaded:
                raise ServingError(grpc.StatusCode.NOT_FOUND,
                                   f"version label {shorten(label)} points to version "
                                   f"{labels[label]}, which is not loaded (serving version "
                                   f"{serving})")
            return loaded[labels[label]]
        return loaded[max(loaded)]


class ModelRegistry:
    """The models one server serves, by name (one ModelManager each); a
    reread model config adds, removes and reconfigures them."""

    def __init__(self, configs, batching_params=None, poll_seconds=1.0, warm_up=True,
                 metrics=None):
        self.batching_params, self.poll_seconds = batching_params, poll_seconds
        self.warm_up, self.metrics = warm_up, metrics
        self._managers = {}
        self._lock = threading.Lock()
        self._started = False
        for config in configs:
            self._managers[config.name] = self._manager(config)

    def _manager(self, config):
        return ModelManager(config.name, config.base_path, self.batching_params,
                            self.poll_seconds, self.warm_up, config.policy, config.labels,
                            self.metrics)

    @property
    def names(self):
        with self._lock:
            return list(self._managers)

    def managers(self):
        with self._lock:
            return list(self._managers.values())

    def manager(self, name):
        """The ModelManager of `name`, or NOT_FOUND."""
        with self._lock:
            manager = self._managers.get(name)
            names = list(self._managers)
        if manager is None:
            raise ServingError(grpc.StatusCode.NOT_FOUND,
                               f"model {shorten(name)} is not served here (this server "
                               f"serves {', '.join(repr(n) for n in names)})")
        return manager

    def get(self, model_spec):
        return self.manager(model_spec.name).get(model_spec)

    def start(self):
        for manager in self.managers():
            manager.start()
        self._started = True

    def ready(self):
        """True when every model has a loaded version."""
        return all(m.current is not None for m in self.managers())

    def update(self, configs):
        """Serve `configs` from now on: new models are loaded, removed ones
        stopped, changed policies and labels take effect at the next poll."""
        wanted = {c.name: c for c in configs}
        started, stopped = [], []
        with self._lock:
            for name in list(self._managers):
                old = self._managers[name]
                config = wanted.get(name)
                if config is None or config.base_path != old.base_path:
                    stopped.append(self._managers.pop(name))
            for name, config in wanted.items():
                if name in self._managers:
                    self._managers[name].reconfigure(config)
                else:
                    self._managers[name] = self._manager(config)
                    started.append(self._managers[name])
        for manager in stopped:
            log.info("model %s is no longer in the config: unloading it", manager.name)
            threading.Thread(target=manager.stop, daemon=True).start()
        if self._started:
            for manager in started:
                manager.start()
        for manager in self.managers():
            if manager not in started:
                threading.Thread(target=manager.poll_once, daemon=True).start()

    def stop(self):
        for manager in self.managers():
            manager.stop()
