"""Property-based fuzzing (hypothesis) of what the HTTP servers parse: REST
predict bodies, and the search server's JSON and multipart bodies. No answer
may be 5xx, an error is one sentence, and the server's memory stays bounded.
Loopback only; a bounded number of examples."""

import dataclasses
import gc
import http.client
import json
import time

import numpy as np
import pytest
from conftest import small_dplg
from hypothesis import HealthCheck, given, settings, strategies as st

from dplg_tf import images
from dplg_tf.export import export as export_lib
from dplg_tf.serving import batching
from dplg_tf.serving.server import Server

LIMITS = dataclasses.replace(images.DEFAULT_LIMITS, max_request_mb=4, max_images=8)
FUZZ = settings(max_examples=60, deadline=None, derandomize=True, database=None,
                suppress_health_check=list(HealthCheck))

# text with lone surrogates and JSON's own characters
TEXT = st.text(st.characters(codec=None, exclude_categories=()) | st.sampled_from(
    ['"', "\\", "[", "{", "\ud800", "\udfff", "\x00"]), max_size=12)
SCALARS = (st.none() | st.booleans() | st.integers(-2 ** 70, 2 ** 70) |
           st.floats(allow_nan=True, allow_infinity=True) | TEXT)
REST_KEYS = st.sampled_from(["instances", "inputs", "signature_name", "b64", "image_bytes",
                             "image", "scales", "multiscale", "serving_default",
                             "__saved_model_init_op"]) | TEXT
SEARCH_KEYS = st.sampled_from(["image", "descriptor", "top_k", "qe_k", "qe_alpha", "rerank",
                               "attention", "b64"]) | TEXT


def _values(keys):
    return st.recursive(SCALARS, lambda inner: st.lists(inner, max_size=4) |
                        st.dictionaries(keys, inner, max_size=4), max_leaves=20)


def _rss_mb():
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) / 1024 for line in f if line.startswith("VmRSS:"))


class _Client:
    """One keep-alive connection, reopened when the server closes it."""

    def __init__(self, address):
        self.host, self.port = address.rsplit(":", 1)
        self.conn = None

    def post(self, path, body, content_type="application/json"):
        for attempt in range(2):
            if self.conn is None:
                self.conn = http.client.HTTPConnection(self.host, int(self.port), timeout=60)
            try:
                self.conn.request("POST", path, body=body,
                                  headers={"Content-Type": content_type})
                response = self.conn.getresponse()
                data = response.read()
            except (http.client.HTTPException, OSError):
                self.conn.close()
                self.conn = None
                if attempt:
                    raise
                continue
            if response.getheader("connection", "").lower() == "close":
                self.conn.close()
                self.conn = None
            return response.status, data


def _check(status, data):
    assert status < 500, (status, data[:300])
    if status >= 400:
        message = json.loads(data)["error"]
        assert message and "\n" not in message and "internal error" not in message


@pytest.fixture(scope="module")
def servers(tmp_path_factory):
    from dplg_tf.retrieval.describers import Describer
    from dplg_tf.search.index import DescriptorIndex
    from dplg_tf.search.searcher import Searcher
    from dplg_tf.search.service import SearchServer

    root = tmp_path_factory.mktemp("fuzz")
    base = str(root / "dplg")
    export_lib.export(small_dplg(0), base)
    params = dict(batching.DEFAULTS, max_batch_size=4, batch_timeout_micros=2000)
    rest = Server(base, "dplg", "127.0.0.1", 0, params, poll_seconds=1.0, limits=LIMITS,
                  rest_port=0).start()
    deadline = time.time() + 90
    while not rest.models.ready() and time.time() < deadline:
        time.sleep(0.1)
    describer = Describer(model=base, limits=LIMITS)
    rows = np.eye(4, 512, dtype=np.float32)
    index = DescriptorIndex(512, "exact", describer.probe())
    index.add(rows, [f"p{i}.jpg" for i in range(4)])
    index.save(str(root / "idx"))
    searcher = Searcher(str(root / "idx"), describer, None, LIMITS, max_top_k=5,
                        reload_seconds=0)
    search = SearchServer(searcher, "127.0.0.1", 0, LIMITS, workers=2).start()
    yield _Client(rest.rest_address), _Client(search.address)
    search.stop(2)
    rest.stop(2)
    describer.close()


@pytest.fixture(scope="module")
def memory(servers):
    """The RSS before the fuzzing, checked after it (within 300 MB)."""
    gc.collect()
    before = _rss_mb()
    yield
    gc.collect()
    assert _rss_mb() - before < 300


def _dump(value):
    return json.dumps(value).encode()   # lone surrogates travel as \ud800 escapes


@FUZZ
@given(doc=st.dictionaries(REST_KEYS, _values(REST_KEYS), max_size=4) | _values(REST_KEYS),
       signature=st.sampled_from([None, "serving_default", "multiscale",
                                  "__saved_model_init_op", "\ud800"]),
       raw=st.binary(max_size=64))
def test_rest_predict_bodies_never_answer_5xx(servers, memory, doc, signature, raw):
    rest, _ = servers
    if isinstance(doc, dict) and signature is not None:
        doc["signature_name"] = signature
    _check(*rest.post("/v1/models/dplg:predict", _dump(doc)))
    _check(*rest.post("/v1/models/dplg:predict", raw))
    _check(*rest.post("/v1/models/dplg:predict", _dump(doc)[:len(raw)] + raw))


@FUZZ
@given(doc=st.dictionaries(SEARCH_KEYS, _values(SEARCH_KEYS), max_size=4) |
       _values(SEARCH_KEYS), raw=st.binary(max_size=64))
def test_search_json_bodies_never_answer_5xx(servers, memory, doc, raw):
    _, search = servers
    _check(*search.post("/v1/search", _dump(doc)))
    _check(*search.post("/v1/search", raw))


@FUZZ
@given(fields=st.dictionaries(SEARCH_KEYS, TEXT | _values(SEARCH_KEYS).map(json.dumps),
                              max_size=5),
       image=st.none() | st.binary(max_size=256), raw=st.binary(max_size=128),
       cut=st.integers(0, 400))
def test_search_multipart_bodies_never_answer_5xx(servers, memory, fields, image, raw, cut):
    _, search = servers
    boundary = "fuzzb0undary"
    parts = [f'--{boundary}\r\nContent-Disposition: form-data; name="{k}"\r\n\r\n{v}\r\n'
             .encode("utf-8", "surrogatepass") for k, v in fields.items()]
    if image is not None:
        parts.append(f'--{boundary}\r\nContent-Disposition: form-data; name="image"; '
                     'filename="q.jpg"\r\nContent-Type: image/jpeg\r\n\r\n'.encode() +
                     image + b"\r\n")
    body = b"".join(parts) + f"--{boundary}--\r\n".encode()
    kind = f"multipart/form-data; boundary={boundary}"
    _check(*search.post("/v1/search", body, kind))
    _check(*search.post("/v1/search", body[:cut] + raw, kind))
