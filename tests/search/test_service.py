"""The search server (dplg-search-server) over an index folder, on 127.0.0.1."""

import base64
import dataclasses
import io
import json
import os
import time
import urllib.error
import urllib.request

import pytest
from conftest import small_dplg

from dplg_tf import images
from dplg_tf.export import export as export_lib
from dplg_tf.retrieval.describers import Describer
from dplg_tf.search.index import DescriptorIndex
from dplg_tf.search.searcher import Searcher
from dplg_tf.search.service import SearchServer

LIMITS = dataclasses.replace(images.DEFAULT_LIMITS, max_request_mb=2, max_pixels=4_000_000)


def _jpeg(seed, h=96, w=128):
    from PIL import Image

    buf = io.BytesIO()
    Image.fromarray(images.facade_image(h, w, seed)).save(buf, "JPEG", quality=92)
    return buf.getvalue()


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    """A model, 8 indexed photos under photos/ and an index folder of them."""
    root = tmp_path_factory.mktemp("search_service")
    model = export_lib.export(small_dplg(0), str(root / "models" / "dplg"))
    photos = root / "photos"
    (photos / "sub").mkdir(parents=True)
    names = [f"p{i}.jpg" if i % 2 else f"sub/p{i}.jpg" for i in range(8)]
    for i, name in enumerate(names):
        (photos / name).write_bytes(_jpeg(100 + i))
    (root / "secret.jpg").write_bytes(_jpeg(999))
    describer = Describer(model=model, limits=LIMITS)
    rows = describer.describe_bytes([(photos / n).read_bytes() for n in names])
    index = DescriptorIndex(rows.shape[1], "exact", describer.probe())
    index.add(rows, names)
    index.save(str(root / "idx"))
    return {"root": root, "photos": str(photos), "index": str(root / "idx"), "names": names,
            "describer": describer, "model": model}


def _start(world, reload_seconds=0.2):
    searcher = Searcher(world["index"], world["describer"], world["photos"], LIMITS,
                        max_top_k=50, reload_seconds=reload_seconds)
    return SearchServer(searcher, "127.0.0.1", 0, LIMITS, workers=2, max_concurrent=8).start()


@pytest.fixture(scope="module")
def server(world):
    srv = _start(world)
    yield srv
    srv.stop(5)


def _http(srv, path, body=None, raw=None, headers=None):
    data = raw if raw is not None else (None if body is None else json.dumps(body).encode())
    request = urllib.request.Request(f"http://{srv.address}{path}", data=data,
                                     headers=headers or {"Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(request, timeout=60) as response:
            status, payload, kind = response.status, response.read(), response.headers[
                "Content-Type"]
    except urllib.error.HTTPError as e:
        status, payload, kind = e.code, e.read(), e.headers["Content-Type"]
    if kind and kind.startswith("application/json"):
        return status, json.loads(payload)
    return status, payload


def _b64(data):
    return {"b64": base64.b64encode(data).decode()}


def _multipart(fields, image):
    boundary = "dplgboundary42"
    parts = [f'--{boundary}\r\nContent-Disposition: form-data; name="{k}"\r\n\r\n{v}\r\n'
             .encode() for k, v in fields.items()]
    parts.append(f'--{boundary}\r\nContent-Disposition: form-data; name="image"; '
                 f'filename="q.jpg"\r\nContent-Type: image/jpeg\r\n\r\n'.encode() + image +
                 b"\r\n")
    body = b"".join(parts) + f"--{boundary}--\r\n".encode()
    return body, {"Content-Type": f"multipart/form-data; boundary={boundary}"}


@pytest.mark.slow
def test_every_indexed_image_finds_itself_first(server, world):
    photos = world["photos"]
    for name in world["names"]:
        data = open(os.path.join(photos, name), "rb").read()
        status, answer = _http(server, "/v1/search", {"image": _b64(data), "top_k": 3})
        assert status == 200, answer
        assert answer["results"][0]["name"] == name
        assert answer["results"][0]["score"] == pytest.approx(1.0, abs=1e-4)
        assert len(answer["results"]) == 3
        assert answer["index"]["vectors"] == 8 and answer["took_ms"] > 0
    assert answer["model"] == {"name": "dplg", "version": 1, "dim": 512}
    assert str(world["root"]) not in json.dumps(answer)   # no server path


@pytest.mark.slow
def test_multipart_upload_with_attention_and_descriptor_queries(server, world):
    data = open(os.path.join(world["photos"], world["names"][3]), "rb").read()
    body, headers = _multipart({"top_k": "5", "attention": "true"}, data)
    status, answer = _http(server, "/v1/search", raw=body, headers=headers)
    assert status == 200, answer
    assert answer["results"][0]["name"] == world["names"][3]
    assert answer["attention"].startswith("data:image/png;base64,")
    from PIL import Image

    png = Image.open(io.BytesIO(base64.b64decode(answer["attention"].split(",", 1)[1])))
    assert png.size == (128, 96)
    vector = world["describer"].describe_bytes([data])[0]
    status, by_vector = _http(server, "/v1/search", {"descriptor": vector.tolist(),
                                                     "top_k": 5, "qe_k": 2})
    assert status == 200 and by_vector["results"][0]["name"] == world["names"][3]


@pytest.mark.slow
def test_large_queries_with_attention_are_decoded_small_two_at_a_time(world, monkeypatch):
    """The page asks for the attention picture with every upload: the server
    decodes the query shrunk to 512 a side, at most two at once (each may hold
    one full-size frame of max_pixels), however many workers search."""
    import concurrent.futures
    import threading

    from PIL import Image

    buf = io.BytesIO()
    Image.fromarray(images.facade_image(1900, 1500, 5)).save(buf, "JPEG", quality=80)
    running, most, lock = [0], [0], threading.Lock()
    decode = images.decode

    def counted(*args, **kwargs):
        with lock:
            running[0] += 1
            most[0] = max(most[0], running[0])
        try:
            time.sleep(1.5)   # long enough for all six to meet here without the bound
            return decode(*args, **kwargs)
        finally:
            with lock:
                running[0] -= 1

    monkeypatch.setattr(images, "decode", counted)
    searcher = Searcher(world["index"], world["describer"], world["photos"], LIMITS,
                        max_top_k=50)
    srv = SearchServer(searcher, "127.0.0.1", 0, LIMITS, workers=8, max_concurrent=8).start()
    try:
        query = {"image": _b64(buf.getvalue()), "top_k": 3, "attention": True}
        with concurrent.futures.ThreadPoolExecutor(6) as pool:
            answers = list(pool.map(lambda _: _http(srv, "/v1/search", query), range(6)))
    finally:
        srv.stop(5)
    for status, answer in answers:
        assert status == 200, answer
        png = Image.open(io.BytesIO(base64.b64decode(answer["attention"].split(",", 1)[1])))
        assert png.size == (404, 512)   # 1500 x 1900 shrunk to 512 high
    assert most[0] == 2


@pytest.mark.slow
def test_a_search_asks_for_re_ranking(server, world):
    from dplg_tf.retrieval import query

    index = DescriptorIndex.load(world["index"])
    data = open(os.path.join(world["photos"], world["names"][5]), "rb").read()
    vector = world["describer"].describe_bytes([data])[0]
    found = query.run(vector[None], index, query.Settings(rerank=True), 6)
    scores, ids = found.scores, found.ids
    status, answer = _http(server, "/v1/search", {"descriptor": vector.tolist(), "top_k": 6,
                                                  "rerank": True})
    assert status == 200, answer
    assert [r["name"] for r in answer["results"]] == [index.names[i] for i in ids[0]]
    assert [r["score"] for r in answer["results"]] == pytest.approx(scores[0].tolist(),
                                                                    abs=1e-5)
    plain = _http(server, "/v1/search", {"descriptor": vector.tolist(), "top_k": 6})[1]
    assert plain["results"][0]["score"] == pytest.approx(1.0, abs=1e-4)   # not re-scored
    assert answer["search"] == {"rerank": True, "reranker": "superglobal", "m": 400,
                                "k": 9, "beta": 0.15, "qe_k": 0, "qe_alpha": None,
                                "dba_k": 0, "dba_alpha": None, "dba_graph": None}   # as done
    assert plain["search"]["rerank"] is False


@pytest.mark.slow
def test_thumbnails_only_for_names_in_the_index(server, world):
    from PIL import Image

    status, data = _http(server, "/v1/images/" + world["names"][0])
    assert status == 200
    assert Image.open(io.BytesIO(data)).size == (128, 96)
    for path in ("/v1/images/../secret.jpg", "/v1/images/%2e%2e/secret.jpg",
                 "/v1/images/sub/../../secret.jpg", "/v1/images/nothere.jpg",
                 "/v1/images/" + world["photos"] + "/../secret.jpg"):
        status, answer = _http(server, path)
        assert status == 404, path
        assert "error" in answer


@pytest.mark.parametrize("body,raw,words", [
    ({"image": _b64(b"not an image at all")}, None, "refused"),
    ({"image": {"b64": "!!"}}, None, "base64"),
    ({"image": "plain"}, None, "b64"),
    (None, b"{broken", "not valid JSON"),
    ({"image": _b64(b"x"), "colour": "red"}, None, "Unknown fields"),
    ({"descriptor": [0.1] * 5}, None, "512-d"),
    ({"descriptor": [float("nan")] * 512}, None, "finite"),
    ({"descriptor": [1.0] * 512, "top_k": 0}, None, "top_k"),
    ({"descriptor": [1.0] * 512, "top_k": 51}, None, "top_k"),
    ({"descriptor": [1.0] * 512, "top_k": "ten"}, None, "top_k"),
    ({"descriptor": [1.0] * 512, "top_k": True}, None, "top_k"),
    ({"descriptor": [1.0] * 512, "qe_k": -1}, None, "qe_k"),
    ({"descriptor": [1.0] * 512, "rerank": "yes please"}, None, "rerank"),
    ({}, None, "exactly one"),
    ([1, 2], None, "JSON object"),
])
@pytest.mark.slow
def test_bad_searches_are_400_with_a_sentence_and_the_server_keeps_serving(
        server, world, body, raw, words):
    status, answer = _http(server, "/v1/search", body, raw=raw)
    assert status == 400, answer
    assert words in answer["error"]
    data = open(os.path.join(world["photos"], world["names"][1]), "rb").read()
    assert _http(server, "/v1/search", {"image": _b64(data)})[1]["results"][0]["name"] == \
        world["names"][1]


@pytest.mark.slow
def test_oversized_images_and_bodies_are_refused(server):
    from PIL import Image

    buf = io.BytesIO()
    Image.new("RGB", (2500, 2000)).save(buf, "JPEG")   # 5 M pixels > max_pixels
    status, answer = _http(server, "/v1/search", {"image": _b64(buf.getvalue())})
    assert status == 400 and "pixels" in answer["error"]
    import http.client

    host, port = server.address.rsplit(":", 1)
    conn = http.client.HTTPConnection(host, int(port), timeout=30)
    conn.putrequest("POST", "/v1/search")
    conn.putheader("Content-Length", str(3 << 20))
    conn.putheader("Content-Type", "application/json")
    conn.endheaders()   # the body is never sent: the answer comes first
    response = conn.getresponse()
    assert response.status == 400 and "limit" in json.loads(response.read())["error"]
    conn.close()
    status, answer = _http(server, "/v1/nothing")
    assert status == 404


@pytest.mark.slow
def test_an_older_index_of_absolute_names_shows_no_server_path(world, tmp_path):
    photos = world["photos"]
    names = [os.path.join(photos, world["names"][0]), os.path.join(photos, world["names"][1]),
             str(world["root"] / "secret.jpg")]
    rows = world["describer"].describe_bytes([open(n, "rb").read() for n in names])
    index = DescriptorIndex(rows.shape[1], "exact", world["describer"].probe())
    index.add(rows, names)
    index.save(str(tmp_path / "idx"))
    srv = _start(dict(world, index=str(tmp_path / "idx")))
    try:
        status, answer = _http(srv, "/v1/search", {"descriptor": rows[2].tolist(), "top_k": 3})
        assert status == 200, answer
        assert str(world["root"]) not in json.dumps(answer)
        shown = {r["name"]: r["image"] for r in answer["results"]}
        assert shown == {world["names"][0]: "/v1/images/" + world["names"][0],
                         world["names"][1]: "/v1/images/" + world["names"][1],
                         "secret.jpg": None}   # outside --image_root: no picture
        for url in (u for u in shown.values() if u):
            assert _http(srv, url)[0] == 200
        for path in ("/v1/images/secret.jpg", "/v1/images/../secret.jpg",
                     "/v1/images/" + names[2]):
            assert _http(srv, path)[0] == 404, path
    finally:
        srv.stop(5)


@pytest.mark.slow
def test_health_and_metrics(server, world):
    from prometheus_client.parser import text_string_to_metric_families

    data = open(os.path.join(world["photos"], world["names"][0]), "rb").read()
    assert _http(server, "/v1/search", {"image": _b64(data)})[0] == 200   # one to count

    status, health = _http(server, "/v1/health")
    assert status == 200 and health["status"] == "ok" and health["index"]["vectors"] >= 8
    status, text = _http(server, "/metrics")
    families = {f.name: f for f in text_string_to_metric_families(text.decode())}
    ok = [s for s in families["dplg_search_requests"].samples
          if s.name == "dplg_search_requests_total" and s.labels == {"endpoint": "search",
                                                                       "code": "200"}]
    assert ok and ok[0].value >= 1
    assert families["dplg_search_index_vectors"].samples[0].value >= 8


@pytest.mark.slow
def test_an_append_is_seen_without_a_restart_by_two_replicas(world, tmp_path):
    import shutil

    folder = str(tmp_path / "idx")
    shutil.copytree(world["index"], folder)
    replicas = [_start(dict(world, index=folder)) for _ in range(2)]
    try:
        new = _jpeg(555, 80, 100)
        with open(os.path.join(world["photos"], "new.jpg"), "wb") as f:
            f.write(new)
        for srv in replicas:
            status, answer = _http(srv, "/v1/search", {"image": _b64(new), "top_k": 1})
            assert status == 200 and answer["results"][0]["name"] != "new.jpg"
        index = DescriptorIndex.load(folder)
        index.add(world["describer"].describe_bytes([new]), ["new.jpg"])
        index.save(folder)
        for srv in replicas:
            deadline = time.time() + 30
            while time.time() < deadline:
                answer = _http(srv, "/v1/search", {"image": _b64(new), "top_k": 1})[1]
                if answer["results"][0]["name"] == "new.jpg":
                    break
                time.sleep(0.1)
            assert answer["results"][0]["name"] == "new.jpg"
            assert answer["results"][0]["score"] == pytest.approx(1.0, abs=1e-4)
            assert answer["index"]["vectors"] == 9
        assert not [n for n in os.listdir(folder) if n.endswith(".tmp")]
    finally:
        for srv in replicas:
            srv.stop(5)
        os.remove(os.path.join(world["photos"], "new.jpg"))


@pytest.mark.slow
def test_another_models_index_is_refused_at_start(world, tmp_path):
    from dplg_tf.search.index import IndexMismatch

    other = export_lib.export(small_dplg(1), str(tmp_path / "other"))
    with pytest.raises(IndexMismatch):
        Searcher(world["index"], Describer(model=other), world["photos"])


def test_search_queries_are_checked_before_any_work():
    from dplg_tf.search.queries import parse_query
    from dplg_tf.http.server import HttpError

    query = parse_query({"image": _b64(b"jpeg"), "top_k": 5, "attention": True}, 50)
    assert query["image"] == b"jpeg" and query["top_k"] == 5 and query["attention"]
    assert parse_query({"top_k": "7", "qe_k": "2"}, 50, image=b"x")["qe_k"] == 2
    assert parse_query({"descriptor": [1, 0.5]}, 50)["descriptor"].dtype.name == "float32"
    assert "rerank" not in parse_query({"descriptor": [1]}, 50)   # the server's default
    assert parse_query({"top_k": "7", "rerank": "true"}, 50, image=b"x")["rerank"] is True
    assert parse_query({"descriptor": [1], "rerank": False}, 50)["rerank"] is False
    for fields, words in [({"image": _b64(b"x"), "top_k": 51}, "top_k"),
                          ({"image": _b64(b"x"), "qe_alpha": float("inf")}, "qe_alpha"),
                          ({"image": _b64(b"x"), "attention": "maybe"}, "attention"),
                          ({"image": _b64(b"x"), "rerank": 2}, "rerank"),
                          ({"descriptor": ["a"]}, "numbers"),
                          ({"descriptor": []}, "numbers"),
                          ({"image": {"b64": 3}}, "b64"),
                          ({"image": _b64(b""), }, "empty"),
                          ({"nope": 1}, "Unknown")]:
        with pytest.raises(HttpError, match=words) as info:
            parse_query(fields, 50)
        assert info.value.status == 400
