"""The checked query of a search request (JSON or form fields), and the
search server's Prometheus metrics."""

import base64
import binascii
import math

import numpy as np

from dplg_tf.http.server import HttpError
from dplg_tf.errors import shorten

SEARCH_KEYS = {"image", "descriptor", "top_k", "qe_k", "qe_alpha", "rerank", "attention"}


def bad_request(message):
    return HttpError(400, message)


def _integer(value, name, low, high, default):
    if value is None or value == "":
        return default
    if isinstance(value, bool):
        raise bad_request(f"{name} must be an integer from {low} to {high}.")
    try:
        number = int(value) if isinstance(value, str) else value
    except ValueError:
        raise bad_request(f"{name} must be an integer from {low} to {high}, got "
                   f"{shorten(value)}.") from None
    if not isinstance(number, int) or not low <= number <= high:
        raise bad_request(f"{name} must be an integer from {low} to {high}, got {shorten(value)}.")
    return number


def _number(value, name, low, high, default):
    if value is None or value == "":
        return default
    try:
        number = float(value)
    except (TypeError, ValueError):
        raise bad_request(f"{name} must be a number from {low} to {high}.") from None
    if isinstance(value, bool) or not math.isfinite(number) or not low <= number <= high:
        raise bad_request(f"{name} must be a number from {low} to {high}, got {shorten(value)}.")
    return number


def _flag(value, name, default=False):
    if isinstance(value, bool):
        return value
    if value in (None, ""):
        return default
    if value in ("0", "false", "off"):
        return False
    if value in ("1", "true", "on"):
        return True
    raise bad_request(f"{name} must be true or false, got {shorten(value)}.")


def parse_query(fields, max_top_k, image=None):
    """The checked query of a JSON object or form `fields` (image bytes given apart
    for a form)."""
    unknown = sorted(set(map(str, fields)) - SEARCH_KEYS)
    if unknown:
        raise bad_request(f"Unknown fields {shorten(unknown)}; a search takes "
                   f"{sorted(SEARCH_KEYS)}.")
    query = {"top_k": _integer(fields.get("top_k"), "top_k", 1, max_top_k, 10),
             "attention": _flag(fields.get("attention"), "attention")}
    # absent: the server's default (its retrieval.query.Settings)
    if fields.get("qe_k") not in (None, ""):
        query["qe_k"] = _integer(fields["qe_k"], "qe_k", 0, 100, 0)
    if fields.get("qe_alpha") not in (None, ""):
        query["qe_alpha"] = _number(fields["qe_alpha"], "qe_alpha", 0.0, 100.0, 3.0)
    if fields.get("rerank") not in (None, ""):
        query["rerank"] = _flag(fields["rerank"], "rerank")
    if image is None and fields.get("image") is not None:
        value = fields["image"]
        if not (isinstance(value, dict) and set(value) == {"b64"} and
                isinstance(value["b64"], str)):
            raise bad_request('image must be {"b64": "<base64 of the encoded image>"}.')
        try:
            image = base64.b64decode(value["b64"], validate=True)
        except (binascii.Error, ValueError):
            raise bad_request("image.b64 is not valid base64.") from None
    descriptor = fields.get("descriptor")
    if (image is None) == (descriptor is None):
        raise bad_request("Give exactly one of image or descriptor.")
    if image is not None:
        if not image:
            raise bad_request("The image is empty.")
        query["image"] = image
    else:
        if not (isinstance(descriptor, list) and descriptor and all(
                isinstance(v, (int, float)) and not isinstance(v, bool) for v in descriptor)):
            raise bad_request("descriptor must be a non-empty list of numbers.")
        query["descriptor"] = np.asarray(descriptor, np.float32)
    return query


class SearchMetrics:
    def __init__(self):
        from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

        self.registry = CollectorRegistry(auto_describe=True)
        self.requests = Counter("dplg_search_requests", "Search requests by HTTP status.",
                                ("endpoint", "code"), registry=self.registry)
        self.latency = Histogram("dplg_search_latency_seconds", "Wall time of a search.",
                                 registry=self.registry,
                                 buckets=(.005, .01, .025, .05, .1, .25, .5, 1, 2.5, 5, 10))
        self.vectors = Gauge("dplg_search_index_vectors", "Vectors in the served index.",
                             registry=self.registry)
        self.reloads = Counter("dplg_search_index_reloads", "Index states loaded after the "
                               "first.", registry=self.registry)
        self.refused = Counter("dplg_search_index_refused", "Index states refused (unreadable "
                               "or invalid) and skipped.", registry=self.registry)

    def reloaded(self, vectors):
        self.vectors.set(vectors)
        self.reloads.inc()
