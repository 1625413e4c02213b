"""The search server describing through a real dplg-serve that turns slow, goes
away and comes back: 503 with one sentence within the deadline, /v1/health
says why, and it recovers by itself."""

import base64
import dataclasses
import io
import json
import time
import urllib.error
import urllib.request

import pytest
from conftest import small_dplg

from dplg_tf import images
from dplg_tf.export import export as export_lib

LIMITS = dataclasses.replace(images.DEFAULT_LIMITS, max_request_mb=2, max_pixels=4_000_000)
TIMEOUT = 3.0


def _jpeg(seed):
    from PIL import Image

    buf = io.BytesIO()
    Image.fromarray(images.facade_image(96, 128, seed)).save(buf, "JPEG", quality=92)
    return buf.getvalue()


def _http(srv, path, body=None):
    data = None if body is None else json.dumps(body).encode()
    request = urllib.request.Request(f"http://{srv.address}{path}", data=data,
                                     headers={"Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(request, timeout=60) as response:
            return response.status, json.loads(response.read())
    except urllib.error.HTTPError as e:
        return e.code, json.loads(e.read())


def _until(what, seconds=30):
    deadline = time.time() + seconds
    while time.time() < deadline:
        value = what()
        if value:
            return value
        time.sleep(0.2)
    raise AssertionError(f"not within {seconds} s")


def _model_server(base, port=0):
    from dplg_tf.serving.server import Server

    deadline = time.time() + 20
    while True:   # the port of a stopped server may take a moment to be free
        try:
            return Server(base, "dplg", "127.0.0.1", port, None, poll_seconds=5).start()
        except OSError:
            if time.time() > deadline:
                raise
            time.sleep(0.5)


def _one_sentence(text):
    return text.endswith(".") and text.count(". ") == 0 and "\n" not in text and \
        "grpc" not in text.lower() and "StatusCode" not in text


@pytest.mark.slow
def test_a_slow_or_stopped_model_server_gives_503_and_the_search_server_recovers(tmp_path):
    from dplg_tf.retrieval.describers import Describer
    from dplg_tf.search.index import DescriptorIndex
    from dplg_tf.search.searcher import Searcher
    from dplg_tf.search.service import SearchServer

    base = str(tmp_path / "models" / "dplg")
    export_lib.export(small_dplg(0), base)
    photos = tmp_path / "photos"
    photos.mkdir()
    blobs = [_jpeg(200 + i) for i in range(4)]
    for i, blob in enumerate(blobs):
        (photos / f"p{i}.jpg").write_bytes(blob)
    model = _model_server(base)
    port = model.port
    describer = Describer(server=model.address)
    rows = describer.describe_bytes(blobs)
    index = DescriptorIndex(rows.shape[1], "exact", describer.probe())
    index.add(rows, [f"p{i}.jpg" for i in range(4)])
    index.save(str(tmp_path / "idx"))
    searcher = Searcher(str(tmp_path / "idx"), describer, str(photos), LIMITS, max_top_k=10,
                        reload_seconds=0, timeout=TIMEOUT, check_seconds=0.3)
    srv = SearchServer(searcher, "127.0.0.1", 0, LIMITS, workers=2).start()
    query = {"image": {"b64": base64.b64encode(blobs[1]).decode()}, "top_k": 2}

    def health():
        return _http(srv, "/v1/health")[1]

    def timed_search():
        start = time.time()
        status, answer = _http(srv, "/v1/search", query)
        return status, answer, time.time() - start

    try:
        status, answer = _http(srv, "/v1/search", query)
        assert status == 200 and answer["results"][0]["name"] == "p1.jpg", answer
        assert health()["status"] == "ok"
        assert answer["model"] == {"name": "dplg", "version": 1, "dim": 512}

        # slow: every Predict of dplg-serve takes longer than the search's deadline
        predict = model.servicer.Predict
        model.servicer.Predict = lambda request, context: (time.sleep(2 * TIMEOUT),
                                                           predict(request, context))[1]
        status, answer, took = timed_search()
        assert status == 503 and took < TIMEOUT + 1.0, (status, answer, took)
        assert "did not answer within 3 s" in answer["error"] and _one_sentence(answer["error"])
        now = health()
        assert now["status"] == "degraded" and now["reason"] == answer["error"]
        del model.servicer.Predict   # fast again
        _until(lambda: health()["status"] == "ok")
        assert _http(srv, "/v1/search", query)[0] == 200

        # down: health notices it without a search; searches fail at once
        model.stop(0)
        now = _until(lambda: (lambda h: "does not answer" in h.get("reason", "") and h)(
            health()))
        assert now["status"] == "degraded" and _one_sentence(now["reason"])
        status, answer, took = timed_search()
        assert status == 503 and took < TIMEOUT, (status, answer, took)
        assert answer["error"] == "The model server does not answer; try again later."
        by_vector = {"descriptor": rows[2].tolist(), "top_k": 1}   # no model needed
        assert _http(srv, "/v1/search", by_vector)[1]["results"][0]["name"] == "p2.jpg"

        # back on the same port: the search server uses it again by itself
        model = _model_server(base, port)
        _until(lambda: health()["status"] == "ok")
        status, answer = _http(srv, "/v1/search", query)
        assert status == 200 and answer["results"][0]["name"] == "p1.jpg", answer
    finally:
        srv.stop(5)
        model.stop(0)
        describer.close()
