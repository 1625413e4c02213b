"""Model versions for dplg-serve: loading one SavedModel version with its
signatures and batcher, and serving the newest version under a base path.

A version that fails to load (half copied, broken) is skipped and reported
with its error until its files change; then it is tried again. A base path
that does not exist or holds no versions, and `specific` versions that are
not on disk, are logged once and reported by the model's status. A version
is a folder named by a whole number up to 2**63 - 1 (int64, as in TF
Serving's protos) without leading zeros; other numeric names are ignored and
logged once. One thread (ModelRegistry's) polls the base paths of all models.
"""

import io
import logging
import os
import threading
import time

import grpc
import numpy as np

from dplg_tf.errors import tf_error_message
from dplg_tf.serving import batching
from dplg_tf.errors import shorten
from dplg_tf.serving.requests import ServingError

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
            try:
                self._warm_up()
            except BaseException:
                self.close()
                raise

    def _run_batched(self, images):
        import tensorflow as tf

        out = self.signatures[BATCHED_SIGNATURE](image_bytes=tf.constant(images, tf.string))
        return out["global_descriptor"].numpy()

    def _warm_up(self):
        """Replay the export's TF Serving warm-up file (export.warmup), each
        request through its signature as Predict runs it; exports without
        one get one private image through serving_default. A file that
        cannot be replayed fails the load (WarmupError), as in TF Serving."""
        import tensorflow as tf

        from dplg_tf.export import warmup

        replay = warmup.read(self.path, self.inputs)
        if not replay and BATCHED_SIGNATURE in self.signatures:
            from PIL import Image

            buf = io.BytesIO()
            Image.new("RGB", (96, 96), (128, 96, 64)).save(buf, "JPEG")
            replay = [(BATCHED_SIGNATURE, {"image_bytes": np.array([buf.getvalue()], object)})]
        for i, (name, inputs) in enumerate(replay):
            try:
                self.signatures[name](**{k: tf.constant(v, self.inputs[name][k].dtype)
                                         for k, v in inputs.items()})
            except (tf.errors.OpError, TypeError, ValueError) as e:
                raise warmup.WarmupError(
                    f"{warmup.path_in(self.path)}: request {i} for {name!r} failed "
                    f"({tf_error_message(e)}).") from None
        self.warmed_up = len(replay)

    def close(self):
        if self.batcher is not None:
            self.batcher.close()


class ModelManager:
    """Serves the versions of one model that its policy asks for (by default
    the newest under `base_path`); poll_once() (ModelRegistry's poll thread)
    looks for new ones.

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
        self._missing = {}  # version (0: the whole model) -> why it is not on disk
        self._loading = None
        self._ignored = set()   # numeric folder names that are no version (logged)
        self._lock = threading.Lock()
        self._poll_lock = threading.RLock()
        self._stop = threading.Event()
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
        """The complete versions (folders named by a version, holding
        saved_model.pb) under the base path, oldest first."""
        from dplg_tf.serving.config import version_number

        try:
            names = os.listdir(self.base_path)
        except OSError:
            return []
        versions, ignored = [], set()
        for name in names:
            version = version_number(name)
            if version is None:
                if name.isdigit():
                    ignored.add(name)
            elif os.path.isfile(os.path.join(self.base_path, name, "saved_model.pb")):
                versions.append(version)
        if ignored - self._ignored:
            log.warning("model %r: folders %s under base path %r are ignored: a version "
                        "is a whole number from 0 to 2**63 - 1 without leading zeros",
                        self.name, ", ".join(sorted(shorten(n, 40) for n in ignored
                                                    - self._ignored)), self.base_path)
        self._ignored = ignored
        return sorted(versions)

    def poll_once(self):
        """Load the versions the policy wants that are not loaded (newest
        first), then unload those it no longer wants. A version that failed
        to load is tried again once its files change. True if anything changed."""
        with self._poll_lock:
            if self._stop.is_set():   # stopped (no longer in the config)
                return False
            disk = self.versions_on_disk()
            self._note_missing(disk)
            with self._lock:   # a failed version whose folder went away is forgotten
                self._failed = {v: f for v, f in self._failed.items() if v in disk}
            failed = self.failed_versions(stamps=True)
            on_disk = [v for v in disk if v not in failed or failed[v][0] != self._stamp(v)]
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

    def _note_missing(self, disk):
        """Record what the policy wants that the base path lacks; log it once."""
        name, base = self.name, self.base_path
        exists = os.path.isdir(base)
        gone = "" if exists else " (the base path does not exist)"
        policy = self.config.policy
        missing, warning = {}, None
        if policy[0] == "specific":
            absent = [v for v in policy[1] if v not in disk]
            missing = {v: f"Version {v} of model {name!r} is not under base path "
                          f"{base!r}{gone}." for v in absent}
            if absent:
                warning = (f"model {name!r} asks for versions that are not under base path "
                           f"{base!r}{gone}: {', '.join(map(str, absent))}")
        elif not disk:
            if exists:
                missing[0] = (f"No versions of model {name!r} found under base path {base!r} "
                              "(a version is a folder named by an integer holding "
                              "saved_model.pb).")
            else:
                missing[0] = (f"No versions of model {name!r} found: base path {base!r} does "
                              "not exist.")
            warning = missing[0]
        with self._lock:
            changed, self._missing = missing != self._missing, missing
        if changed and warning:
            log.warning("%s", warning)

    def _load(self, version):
        path = os.path.join(self.base_path, str(version))
        log.info("loading %s version %d from %s", self.name, version, path)
        start, stamp = time.perf_counter(), self._stamp(version)
        with self._lock:
            self._loading = version
        try:
            loaded = LoadedVersion(self.name, version, path, self.batching_params,
                                   self.warm_up, self.metrics)
        except Exception as e:  # noqa: BLE001 - a broken version must not stop serving
            message = tf_error_message(e)
            log.error("version %d of %s failed to load and is skipped until its files "
                      "change: %s", version, self.name, message)
            with self._lock:
                self._failed[version] = (stamp, message)
                self._loading = None
            if self.metrics is not None:
                self.metrics.loaded(self.name, path, False, time.perf_counter() - start)
            return False
        with self._lock:
            self._failed.pop(version, None)
            self._loaded[version] = loaded
            self._loading = None
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

    def status_rows(self):
        """[(version, state, error code, message)] sorted, with TF Serving's
        state and error code names: loaded versions AVAILABLE, the one loading
        LOADING, failed ones END with their error, and what the policy wants
        but the base path lacks START with NOT_FOUND (version 0 standing for a
        model without any version)."""
        with self._lock:
            rows = {v: (v, "START", "NOT_FOUND", why) for v, why in self._missing.items()}
            rows.update({v: (v, "END", "UNKNOWN", why) for v, (_, why) in self._failed.items()})
            if self._loading is not None:
                rows[self._loading] = (self._loading, "LOADING", "OK", "")
            rows.update({v: (v, "AVAILABLE", "OK", "") for v in self._loaded})
        return sorted(rows.values())

    def why_unavailable(self):
        """A sentence on why nothing is loaded ("" when nothing is known)."""
        with self._lock:
            missing, failed = dict(self._missing), sorted(self._failed)
            loading = self._loading
        if loading is not None:
            return f"version {loading} is loading"
        if failed:
            return (f"version {', '.join(map(str, failed))} failed to load (its status "
                    "has the error)")
        if missing:
            why, more = missing[min(missing)].rstrip("."), len(missing) - 1
            return why[0].lower() + why[1:] + (f" (and {more} more)" if more else "")
        return ""

    def label_version(self, label):
        """The version `label` names, or INVALID_ARGUMENT as TF Serving answers
        an unknown label."""
        with self._lock:
            labels = dict(self.config.labels)
        if label not in labels:
            raise ServingError(grpc.StatusCode.INVALID_ARGUMENT,
                               f"version label {shorten(label)} of {self.name!r} is not "
                               f"defined (labels: {sorted(labels) or 'none'})")
        return labels[label]

    def start(self):
        """Load what the policy wants of what is on disk (later polls: ModelRegistry's)."""
        self.poll_once()

    def stop(self):
        self._stop.set()
        with self._poll_lock:   # a load in progress finishes first
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
        if model_spec.HasField("version") and model_spec.version_label:
            raise ServingError(grpc.StatusCode.INVALID_ARGUMENT,
                               "give a version or a version label, not both")
        version, label = None, model_spec.version_label
        if label:
            version = self.label_version(label)
        elif model_spec.HasField("version"):
            version = model_spec.version.value
        loaded = self.loaded_versions()
        if not loaded:
            why = self.why_unavailable()
            raise ServingError(grpc.StatusCode.UNAVAILABLE,
                               f"model {self.name!r} has no loaded version yet"
                               + (f": {why}" if why else ""))
        if version is None:
            return loaded[max(loaded)]
        if version not in loaded:
            serving = ", ".join(str(v) for v in sorted(loaded))
            what = (f"version label {shorten(label)} points to version {version}, which"
                    if label else f"version {version} of {self.name!r}")
            raise ServingError(grpc.StatusCode.NOT_FOUND,
                               f"{what} is not loaded (serving version {serving})")
        return loaded[version]


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
        self._stop, self._wake = threading.Event(), threading.Event()
        self._thread = None
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
        self._thread = threading.Thread(target=self._poll_loop, name="version-poll",
                                        daemon=True)
        self._thread.start()

    def _poll_loop(self):
        """Poll every model's base path each poll_seconds (sooner when woken),
        in this one thread: a version loading holds up the others' polls."""
        while not self._stop.is_set():
            self._wake.wait(self.poll_seconds)
            self._wake.clear()
            for manager in self.managers():
                if self._stop.is_set():
                    break
                try:
                    manager.poll_once()
                except Exception as e:  # noqa: BLE001 - one model must not stop the others
                    log.error("polling %s failed: %s", manager.base_path, e)

    def ready(self):
        """True when every model has a loaded version."""
        return all(m.current is not None for m in self.managers())

    def configs(self):
        return [m.config for m in self.managers()]

    def label_problem(self, configs, allow_unavailable=False):
        """Why `configs` may not be served now, or None. TF Serving's rule: a
        version label points at a loaded version; with `allow_unavailable` a
        new or unchanged label may point at any version, but a label never
        moves to a version that is not loaded."""
        with self._lock:
            managers = dict(self._managers)
        for config in configs:
            manager = managers.get(config.name)
            if manager is not None and manager.base_path != config.base_path:
                manager = None   # a new base path starts with nothing loaded
            loaded = sorted(manager.loaded_versions()) if manager is not None else []
            old = dict(manager.config.labels) if manager is not None else {}
            for label, version in config.labels:
                if version in loaded:
                    continue
                if allow_unavailable and old.get(label, version) == version:
                    continue
                serving = ", ".join(map(str, loaded)) or "none"
                advice = ("a label moves only to a loaded version" if allow_unavailable
                          else "load it first, or start dplg-serve with "
                               "--allow_version_labels_for_unavailable_models")
                return (f"Label {label!r} of model {config.name!r} points to version "
                        f"{version}, which is not loaded (loaded: {serving}); {advice}.")
        return None

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
            manager._stop.set()   # no poll loads it again
        if stopped:   # one thread unloads them all
            threading.Thread(target=lambda: [m.stop() for m in stopped], daemon=True).start()
        if self._started:
            for manager in started:
                manager.start()
        self._wake.set()   # the others take their new policies at once

    def stop(self):
        self._stop.set()
        self._wake.set()
        if self._thread is not None and self._thread is not threading.current_thread():
            self._thread.join(60)   # a load in progress finishes first
        for manager in self.managers():
            manager.stop()
