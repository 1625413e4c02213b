"""Prometheus metrics of dplg-serve, under TensorFlow Serving's names.

Served in Prometheus' text format (http.server.prometheus_response) at
the monitoring config's path on the REST port. TF Serving names its metrics
by path (/tensorflow/serving/request_count) and its exporter writes them
with ':' for '/'; the same names are used here:

- `:tensorflow:serving:request_count{model_name, status}`: requests by final
  status (OK or the gRPC code's name), gRPC and REST together.
- `:tensorflow:serving:request_latency{model_name, API, entrypoint}`:
  histogram of the wall time of a request in microseconds (API: predict,
  metadata, status; entrypoint: GRPC or REST).
- `:tensorflow:serving:runtime_latency{model_name, API, runtime}`: histogram
  of the model call alone, microseconds.
- `:tensorflow:serving:batching_session:processed_batch_size{thread_pool_name}`
  and `...:queuing_latency{thread_pool_name}` (microseconds): each batch run
  and how long its requests waited; the thread pool is the model's name.
- `:tensorflow:cc:saved_model:load_attempt_count{model_path, status}` and
  `...:load_latency{model_path}` (microseconds, summed): version loads.
- `:dplg:serving:batch_queue_items{model_name}` (no TF Serving name): items
  waiting in the batch queues now.

Series are kept only for the models the server knows (`known_models`);
requests naming any other model are counted under model_name "<unknown>",
so what clients send cannot grow the page.

TF Serving writes its counters without the `_total` suffix that
prometheus_client's Counter adds, so the counters here are kept by a small
collector and exposed as untyped samples under the exact names; the
histograms are prometheus_client Histograms.
"""

import threading
from collections import defaultdict

LATENCY_BUCKETS_US = tuple(10.0 * 2 ** i for i in range(25))   # 10 us .. 168 s
BATCH_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128, 256, 512, 1024)
UNKNOWN_MODEL = "<unknown>"


class _ExactCounters:
    """Counters exposed under their exact names (see the module doc)."""

    def __init__(self):
        self._lock = threading.Lock()
        self._families = {}   # name -> (help, label names, {label values: value})

    def define(self, name, documentation, labelnames):
        self._families[name] = (documentation, tuple(labelnames), defaultdict(float))

    def inc(self, name, labels, amount=1.0):
        with self._lock:
            self._families[name][2][tuple(labels)] += amount

    def collect(self):
        from prometheus_client.core import Metric

        with self._lock:
            snapshot = {n: (d, ln, dict(v)) for n, (d, ln, v) in self._families.items()}
        for name, (documentation, labelnames, values) in snapshot.items():
            family = Metric(name, documentation, "unknown")
            for labels, value in sorted(values.items()):
                family.add_sample(name, dict(zip(labelnames, labels)), value)
            yield family


class Metrics:
    """The metrics of one server, in their own registry."""

    REQUEST_COUNT = ":tensorflow:serving:request_count"
    LOAD_ATTEMPTS = ":tensorflow:cc:saved_model:load_attempt_count"
    LOAD_LATENCY = ":tensorflow:cc:saved_model:load_latency"

    def __init__(self):
        from prometheus_client import CollectorRegistry, Gauge, Histogram

        self.registry = CollectorRegistry(auto_describe=True)
        self.counters = _ExactCounters()
        self.counters.define(self.REQUEST_COUNT, "The total number of requests.",
                             ("model_name", "status"))
        self.counters.define(self.LOAD_ATTEMPTS, "The number of times a SavedModel was "
                             "loaded.", ("model_path", "status"))
        self.counters.define(self.LOAD_LATENCY, "Latency in microseconds for SavedModels "
                             "that were successfully loaded.", ("model_path",))
        self.registry.register(self.counters)
        self.request_latency = Histogram(
            ":tensorflow:serving:request_latency",
            "Distribution of wall time (in microseconds) for TensorFlow Serving request.",
            ("model_name", "API", "entrypoint"), buckets=LATENCY_BUCKETS_US,
            registry=self.registry)
        self.runtime_latency = Histogram(
            ":tensorflow:serving:runtime_latency",
            "Distribution of wall time (in microseconds) for TensorFlow runtime.",
            ("model_name", "API", "runtime"), buckets=LATENCY_BUCKETS_US,
            registry=self.registry)
        self.batch_size = Histogram(
            ":tensorflow:serving:batching_session:processed_batch_size",
            "Tracks the batch size distribution on processing.", ("thread_pool_name",),
            buckets=BATCH_BUCKETS, registry=self.registry)
        self.queuing_latency = Histogram(
            ":tensorflow:serving:batching_session:queuing_latency",
            "Tracks the latency (in microseconds) spent in the batching queue.",
            ("thread_pool_name",), buckets=LATENCY_BUCKETS_US, registry=self.registry)
        self.queue_items = Gauge(":dplg:serving:batch_queue_items",
                                 "Items waiting in the batch queues.", ("model_name",),
                                 registry=self.registry)
        self._queues = {}   # model name -> function giving the items waiting
        self.known_models = None   # function giving the served names (None: any name)

    def model_label(self, model_name):
        """`model_name` if the server knows it, else UNKNOWN_MODEL."""
        known = self.known_models
        return model_name if known is None or model_name in known() else UNKNOWN_MODEL

    def request(self, model_name, status, seconds, api="predict", entrypoint="GRPC"):
        model_name = self.model_label(model_name)
        self.counters.inc(self.REQUEST_COUNT, (model_name, status))
        self.request_latency.labels(model_name, api, entrypoint).observe(seconds * 1e6)

    def runtime(self, model_name, seconds, api="predict"):
        model_name = self.model_label(model_name)
        self.runtime_latency.labels(model_name, api, "TF2").observe(seconds * 1e6)

    def batch_observer(self, model_name):
        """The Batcher `observe` callback of a model."""
        sizes = self.batch_size.labels(model_name)
        waits = self.queuing_latency.labels(model_name)

        def observe(size, waited):
            sizes.observe(size)
            for seconds in waited:
                waits.observe(seconds * 1e6)
        return observe

    def watch_queue(self, model_name, items):
        """Report `items()` (the items waiting for `model_name`) at each scrape."""
        self.queue_items.labels(model_name).set_function(items)

    def loaded(self, model_name, path, ok, seconds):
        del model_name
        self.counters.inc(self.LOAD_ATTEMPTS, (path, "success" if ok else "fail"))
        if ok:
            self.counters.inc(self.LOAD_LATENCY, (path,), seconds * 1e6)
