"""dplg-serve's REST API, model config file and Prometheus metrics, over 127.0.0.1."""

import base64
import json
import os
import shutil
import subprocess
import sys
import time
import urllib.error
import urllib.request

import grpc
import numpy as np
import pytest
from conftest import image_bytes, small_dplg
from tensorflow_serving.apis import predict_pb2, prediction_service_pb2_grpc

from dplg_tf.errors import UserError
from dplg_tf.export import export as export_lib
from dplg_tf.serving import batching, config as config_lib
from dplg_tf.serving.server import Server

MONITORING = config_lib.MonitoringConfig(True, "/monitoring/prometheus/metrics")


@pytest.fixture(scope="module")
def bases(tmp_path_factory):
    """Two base paths: `a` with version 1, `b` with versions 1, 2, 3 (copies)."""
    root = tmp_path_factory.mktemp("rest_models")
    path = export_lib.export(small_dplg(0), str(root / "a"))
    for v in (1, 2, 3):
        shutil.copytree(path, root / "b" / str(v))
    return str(root / "a"), str(root / "b")


def _wait(cond, seconds=90):
    deadline = time.time() + seconds
    while time.time() < deadline:
        if cond():
            return True
        time.sleep(0.1)
    return False


@pytest.fixture(scope="module")
def server(bases):
    params = dict(batching.DEFAULTS, max_batch_size=8, batch_timeout_micros=2000)
    srv = Server(bases[0], "dplg", "127.0.0.1", 0, params, poll_seconds=0.2, rest_port=0,
                 monitoring=MONITORING).start()
    assert _wait(srv.models.ready)
    yield srv
    srv.stop(5)


def _http(srv, path, body=None, method=None, raw=None):
    """(status, parsed JSON or text) of one request to the REST port."""
    data = raw if raw is not None else (None if body is None else json.dumps(body).encode())
    request = urllib.request.Request(f"http://{srv.rest_address}{path}", data=data,
                                     method=method or ("POST" if data is not None else "GET"))
    try:
        with urllib.request.urlopen(request, timeout=60) as response:
            status, text = response.status, response.read().decode()
    except urllib.error.HTTPError as e:
        status, text = e.code, e.read().decode()
    try:
        return status, json.loads(text)
    except ValueError:
        return status, text


def _grpc_describe(srv, blobs, name="dplg"):
    import tensorflow as tf

    channel = grpc.insecure_channel(srv.address)
    stub = prediction_service_pb2_grpc.PredictionServiceStub(channel)
    request = predict_pb2.PredictRequest()
    request.model_spec.name = name
    request.inputs["image_bytes"].CopyFrom(tf.make_tensor_proto(blobs, dtype=tf.string))
    out = tf.make_ndarray(stub.Predict(request, timeout=60).outputs["global_descriptor"])
    channel.close()
    return out


def _b64(data):
    return {"b64": base64.b64encode(data).decode()}


@pytest.mark.slow
def test_rest_predict_equals_grpc_in_both_formats(server):
    blobs = [image_bytes(90, 120, seed=1), image_bytes(150, 110, seed=2)]
    want = _grpc_describe(server, blobs)
    status, rows = _http(server, "/v1/models/dplg:predict",
                         {"instances": [_b64(b) for b in blobs]})
    assert status == 200, rows
    np.testing.assert_array_equal(np.asarray(rows["predictions"], np.float32), want)
    status, named = _http(server, "/v1/models/dplg/versions/1:predict",
                          {"signature_name": "serving_default",
                           "instances": [{"image_bytes": _b64(b)} for b in blobs]})
    assert status == 200
    np.testing.assert_array_equal(np.asarray(named["predictions"], np.float32), want)
    status, cols = _http(server, "/v1/models/dplg:predict",
                         {"inputs": {"image_bytes": [_b64(b) for b in blobs]}})
    assert status == 200
    np.testing.assert_array_equal(np.asarray(cols["outputs"], np.float32), want)
    assert want.shape == (2, 512)


@pytest.mark.slow
def test_rest_multiscale_columnar_has_every_output(server):
    from PIL import Image
    import io

    image = np.asarray(Image.open(io.BytesIO(image_bytes(64, 80, seed=3))))
    status, out = _http(server, "/v1/models/dplg:predict",
                        {"signature_name": "multiscale",
                         "inputs": {"image": image.tolist(), "scales": [1.0, 0.5]}})
    assert status == 200, out
    assert sorted(out["outputs"]) == ["attention", "global_descriptor", "scale_descriptors"]
    assert np.asarray(out["outputs"]["scale_descriptors"]).shape == (2, 512)
    # rows stack each input along a new first dimension: multiscale takes one image
    status, out = _http(server, "/v1/models/dplg:predict",
                        {"signature_name": "multiscale",
                         "instances": [{"image": image.tolist(), "scales": [1.0]}]})
    assert status == 400 and "must have rank" in out["error"]


@pytest.mark.slow
def test_status_and_metadata_have_tf_servings_json_shape(server):
    status, body = _http(server, "/v1/models/dplg")
    assert status == 200
    assert body == {"model_version_status": [
        {"version": "1", "state": "AVAILABLE",
         "status": {"error_code": "OK", "error_message": ""}}]}
    assert _http(server, "/v1/models/dplg/versions/1")[1] == body
    status, meta = _http(server, "/v1/models/dplg/metadata")
    assert status == 200
    assert meta["model_spec"] == {"name": "dplg", "signature_name": "", "version": "1"}
    sigs = meta["metadata"]["signature_def"]["signature_def"]
    inputs = sigs["serving_default"]["inputs"]["image_bytes"]
    assert inputs["dtype"] == "DT_STRING"
    assert inputs["tensor_shape"]["dim"] == [{"size": "-1", "name": ""}]
    assert sigs["serving_default"]["method_name"] == "tensorflow/serving/predict"
    assert sorted(sigs["multiscale"]["outputs"]) == ["attention", "global_descriptor",
                                                     "scale_descriptors"]


@pytest.mark.parametrize("path,body,raw,code,words", [
    ("/v1/models/nope:predict", {"instances": []}, None, 404, "not served"),
    ("/v1/models/dplg/versions/7:predict", {"instances": []}, None, 404, "not loaded"),
    ("/v1/models/dplg/labels/stable:predict", {"instances": []}, None, 400, "label"),
    ("/v1/models/dplg:predict", {"instances": [], "signature_name": "nope"}, None, 400,
     "signature"),
    ("/v1/models/dplg:predict", None, b"{not json", 400, "not valid JSON"),
    ("/v1/models/dplg:predict", {"instances": [], "extra": 1}, None, 400, "Unknown fields"),
    ("/v1/models/dplg:predict", {"instances": [], "inputs": []}, None, 400, "exactly one"),
    ("/v1/models/dplg:predict", {"instances": [{"b64": "@@@"}]}, None, 400, "base64"),
    ("/v1/models/dplg:predict", {"instances": [{"b64": base64.b64encode(b"xx").decode()}]},
     None, 400, "Image 0"),
    ("/v1/models/dplg:predict", {"inputs": {"image_bytes": [["a"], "b"]}}, None, 400,
     "ragged"),
    ("/v1/models/dplg:predict", {"signature_name": "multiscale",
                                 "inputs": {"image": [[[300, 0, 0]]], "scales": [1.0]}},
     None, 400, "uint8"),
    ("/v1/models/dplg:predict", [1, 2], None, 400, "JSON object"),
    ("/v1/models/dplg:classify", {"instances": []}, None, 400, "predict"),
    ("/v1/models/dplg:frobnicate", {"instances": []}, None, 400, "Malformed request"),
    ("/v1/models/dplg/versions/99999999999999999999:predict", {"instances": []}, None, 400,
     "range"),
])
@pytest.mark.slow
def test_bad_rest_requests_get_tf_servings_codes_and_the_server_keeps_serving(
        server, path, body, raw, code, words):
    status, out = _http(server, path, body, raw=raw)
    assert status == code, out
    assert words in out["error"]
    status, ok = _http(server, "/v1/models/dplg:predict",
                       {"instances": [_b64(image_bytes(60, 60, seed=4))]})
    assert status == 200 and len(ok["predictions"][0]) == 512


@pytest.mark.slow
def test_a_body_over_the_limit_is_refused_before_it_is_read(bases):
    import dataclasses

    from dplg_tf import images

    limits = dataclasses.replace(images.DEFAULT_LIMITS, max_request_mb=1)
    srv = Server(bases[0], "dplg", "127.0.0.1", 0, None, poll_seconds=5, rest_port=0,
                 limits=limits, warm_up=False).start()
    try:
        assert _wait(srv.models.ready)
        import http.client

        host, port = srv.rest_address.rsplit(":", 1)
        conn = http.client.HTTPConnection(host, int(port), timeout=30)
        conn.putrequest("POST", "/v1/models/dplg:predict")
        conn.putheader("Content-Length", str(2 << 20))
        conn.endheaders()   # the body is never sent: the answer comes first
        response = conn.getresponse()
        assert response.status == 400
        assert "limit" in json.loads(response.read())["error"]
        conn.close()
        assert _http(srv, "/v1/models/dplg")[0] == 200
    finally:
        srv.stop(5)


@pytest.mark.slow
def test_metrics_parse_and_count_the_requests(server):
    from prometheus_client.parser import text_string_to_metric_families

    def count(status):
        _, text = _http(server, MONITORING.path)
        for family in text_string_to_metric_families(text):
            if family.name == ":tensorflow:serving:request_count":
                return sum(s.value for s in family.samples
                           if s.labels == {"model_name": "dplg", "status": status})
        return 0

    ok, bad = count("OK"), count("NOT_FOUND")
    for _ in range(3):
        assert _http(server, "/v1/models/dplg:predict",
                     {"instances": [_b64(image_bytes(50, 70, seed=5))]})[0] == 200
    _grpc_describe(server, [image_bytes(50, 70, seed=6)])
    assert _http(server, "/v1/models/dplg/versions/5:predict", {"instances": []})[0] == 404
    assert count("OK") == ok + 4
    assert count("NOT_FOUND") == bad + 1
    _, text = _http(server, MONITORING.path)
    families = {f.name: f for f in text_string_to_metric_families(text)}
    latency = families[":tensorflow:serving:request_latency"]
    rest = [s for s in latency.samples if s.name.endswith("_count")
            and s.labels.get("entrypoint") == "REST" and s.labels["API"] == "predict"]
    assert rest and rest[0].value >= 3
    sizes = families[":tensorflow:serving:batching_session:processed_batch_size"]
    assert any(s.name.endswith("_count") and s.value >= 4 for s in sizes.samples)
    loads = families[":tensorflow:cc:saved_model:load_attempt_count"]
    assert [s.labels["status"] for s in loads.samples] == ["success"]
    assert ":dplg:serving:batch_queue_items" in families


def _write_config(path, text):
    tmp = path + ".tmp"
    with open(tmp, "w") as f:
        f.write(text)
    os.replace(tmp, path)


@pytest.mark.slow
def test_model_config_serves_two_models_with_policies_labels_and_rereads(bases, tmp_path):
    config = str(tmp_path / "models.config")
    _write_config(config, f"""
model_config_list {{
  config {{ name: "first" base_path: "{bases[0]}" model_platform: "tensorflow" }}
  config {{
    name: "second" base_path: "{bases[1]}"
    model_version_policy {{ specific {{ versions: 1 versions: 3 }} }}
    version_labels {{ key: "stable" value: 1 }}
    version_labels {{ key: "canary" value: 3 }}
  }}
}}""")
    srv = Server(model_config_file=config, host="127.0.0.1", port=0, poll_seconds=0.2,
                 config_poll_seconds=0.3, rest_port=0, warm_up=False).start()
    try:
        assert _wait(lambda: srv.models.ready() and
                     sorted(srv.models.manager("second").loaded_versions()) == [1, 3])
        versions = [s["version"] for s in _http(srv, "/v1/models/second")[1][
            "model_version_status"]]
        assert versions == ["1", "3"]
        blob = image_bytes(70, 90, seed=9)
        want = _grpc_describe(srv, [blob], name="first")
        for path in ("/v1/models/first:predict", "/v1/models/second:predict",
                     "/v1/models/second/labels/stable:predict",
                     "/v1/models/second/labels/canary:predict",
                     "/v1/models/second/versions/3:predict"):
            status, out = _http(srv, path, {"instances": [_b64(blob)]})
            assert status == 200, (path, out)
            np.testing.assert_array_equal(np.asarray(out["predictions"], np.float32), want)
        assert _http(srv, "/v1/models/second/versions/2:predict",
                     {"instances": [_b64(blob)]})[0] == 404
        assert _http(srv, "/v1/models/second/labels/canary")[1]["model_version_status"][0][
            "version"] == "3"
        # reread: the second model now serves the latest 2, the first is gone
        _write_config(config, f"""
model_config_list {{
  config {{ name: "second" base_path: "{bases[1]}"
           model_version_policy {{ latest {{ num_versions: 2 }} }} }}
}}""")
        assert _wait(lambda: srv.models.names == ["second"] and
                     sorted(srv.models.manager("second").loaded_versions()) == [2, 3])
        assert _http(srv, "/v1/models/first")[0] == 404
        assert _http(srv, "/v1/models/second/labels/stable")[0] == 400   # no such label now
        # a broken reread keeps the config being served
        _write_config(config, "model_config_list { config { name: ")
        time.sleep(1.0)
        assert srv.models.names == ["second"]
        assert _http(srv, "/v1/models/second/versions/2:predict",
                     {"instances": [_b64(blob)]})[0] == 200
    finally:
        srv.stop(5)


@pytest.mark.parametrize("text,words", [
    ("model_config_list { config { name: \"a\" } }", "no base_path"),
    ("model_config_list { config { name: \"a\" base_path: \"/x\" } "
     "config { name: \"a\" base_path: \"/y\" } }", "twice"),
    ("model_config_list { }", "no models"),
    ("model_config_list { config { name: \"a\" base_path: \"/x\" model_platform: \"onnx\" } }",
     "platform"),
    ("model_config_list { config { name: \"a\" base_path: \"/x\" "
     "model_version_policy { specific { } } } }", "no versions"),
    ("model_config_list { config { nme: \"a\" } }", "text format"),
    ("custom_model_config { }", "needs a model_config_list"),
    ("", "is empty"),
])
def test_bad_model_configs_are_refused_with_a_reason(tmp_path, text, words):
    path = tmp_path / "models.config"
    path.write_text(text)
    with pytest.raises(UserError) as info:
        config_lib.read_model_config(str(path))
    assert words in str(info.value)


def test_the_shipped_config_files_parse(tmp_path):
    root = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    models = config_lib.read_model_config(os.path.join(root, "serving", "models.config"))
    assert models == [config_lib.ModelConfig("dplg", "/models/dplg", ("latest", 1), ())]
    monitoring = config_lib.read_monitoring_config(
        os.path.join(root, "serving", "monitoring.config"))
    assert monitoring == MONITORING
    bad = tmp_path / "m.config"
    bad.write_text("prometheus_config { enable: true path: \"/v1/x\" }")
    with pytest.raises(UserError, match="REST API"):
        config_lib.read_monitoring_config(str(bad))


def test_version_policies_choose_versions():
    versions = [1, 2, 5, 9]
    assert config_lib.ModelConfig("m", "/x").wanted(versions) == [9]
    assert config_lib.ModelConfig("m", "/x", ("latest", 3)).wanted(versions) == [2, 5, 9]
    assert config_lib.ModelConfig("m", "/x", ("all",)).wanted(versions) == versions
    assert config_lib.ModelConfig("m", "/x", ("specific", (2, 7))).wanted(versions) == [2]


@pytest.mark.slow
def test_nothing_loaded_is_503_and_past_the_concurrency_bound_is_429(bases, tmp_path):
    import threading

    empty = tmp_path / "empty"
    empty.mkdir()
    srv = Server(str(empty), "dplg", "127.0.0.1", 0, None, poll_seconds=5, rest_port=0,
                 max_concurrent_rpcs=2, warm_up=False).start()
    try:
        status, out = _http(srv, "/v1/models/dplg")   # the status says why
        assert status == 200, out
        (row,) = out["model_version_status"]
        assert row["state"] == "START" and row["status"]["error_code"] == "NOT_FOUND"
        assert "No versions" in row["status"]["error_message"]
        status, out = _http(srv, "/v1/models/dplg:predict", {"instances": []})
        assert status == 503 and "no versions" in out["error"].lower()
        # two requests held inside the server: the third is refused at once
        release, inside = threading.Event(), threading.Semaphore(0)

        def held(spec, signature):
            inside.release()
            release.wait(30)
            raise ValueError("a bug of ours")

        srv.servicer.input_infos = held
        results = []
        threads = [threading.Thread(target=lambda: results.append(_http(
            srv, "/v1/models/dplg:predict", {"instances": []}))) for _ in range(2)]
        for t in threads:
            t.start()
        assert inside.acquire(timeout=30) and inside.acquire(timeout=30)
        start = time.time()
        status, out = _http(srv, "/v1/models/dplg:predict", {"instances": []})
        assert status == 429 and "busy" in out["error"] and time.time() - start < 5
        release.set()
        for t in threads:
            t.join(30)
        assert sorted(r[0] for r in results) == [500, 500]   # our bug: 500, not the client's
        assert _http(srv, "/v1/models/dplg")[0] == 200        # and it keeps serving
    finally:
        srv.stop(5)


def _infos(**dtypes):
    from tensorflow.core.framework import types_pb2
    from tensorflow.core.protobuf import meta_graph_pb2

    return {n: meta_graph_pb2.TensorInfo(dtype=getattr(types_pb2, d)) for n, d in dtypes.items()}


def test_json_rows_and_columns_become_arrays_and_back():
    from dplg_tf.serving import rest_json as rest
    from dplg_tf.serving.requests import ServingError
    from dplg_tf.serving.rest import HTTP_CODES

    arrays, form = rest.arrays_from_json({"instances": [_b64(b"ab"), "cd"]},
                                         _infos(image_bytes="DT_STRING"))
    assert form == "row" and arrays["image_bytes"].tolist() == [b"ab", b"cd"]
    arrays, form = rest.arrays_from_json(
        {"inputs": {"image": [[[1, 2, 3]]], "scales": [0.5, 1]}},
        _infos(image="DT_UINT8", scales="DT_FLOAT"))
    assert form == "columnar" and arrays["image"].dtype == np.uint8
    assert arrays["image"].shape == (1, 1, 3) and arrays["scales"].tolist() == [0.5, 1.0]
    for doc, words in [({"instances": [[1], [1, 2]]}, "ragged"),
                       ({"instances": [{"x": 1}]}, "takes"),
                       ({"inputs": {"scales": [True]}}, "number"),
                       ({"inputs": [[1], 2]}, "ragged")]:
        with pytest.raises(ServingError, match=words):
            rest.arrays_from_json(doc, _infos(scales="DT_FLOAT"))
    out = {"a": np.zeros((2, 3), np.float32), "b": np.ones((2,), np.float32)}
    assert rest.outputs_to_json(out, "row") == {"predictions": [
        {"a": [0.0, 0.0, 0.0], "b": 1.0}, {"a": [0.0, 0.0, 0.0], "b": 1.0}]}
    assert rest.outputs_to_json({"a": out["a"]}, "columnar") == {"outputs": [[0.0] * 3] * 2}
    with pytest.raises(ServingError, match="batch size"):
        rest.outputs_to_json({"a": out["a"], "c": np.zeros(5)}, "row")
    assert rest.outputs_to_json({"x_bytes": np.array([b"hi"], dtype=object)}, "row") == {
        "predictions": [{"b64": "aGk="}]}
    assert HTTP_CODES[grpc.StatusCode.RESOURCE_EXHAUSTED] == 429
    assert HTTP_CODES[grpc.StatusCode.UNAVAILABLE] == 503


# ------------------------------------------- TF Serving's codes, one README table

@pytest.fixture(scope="module")
def labelled(bases, tmp_path_factory):
    """A server from a model config: `dplg` serves versions 1 and 2 of `b`,
    labelled `stable` (2) and `next` (3, not loaded: allowed by the flag);
    `gone` has a base path that does not exist."""
    root = tmp_path_factory.mktemp("labelled")
    config = str(root / "models.config")
    _write_config(config, f"""
model_config_list {{
  config {{
    name: "dplg" base_path: "{bases[1]}"
    model_version_policy {{ specific {{ versions: 1 versions: 2 }} }}
    version_labels {{ key: "stable" value: 2 }}
    version_labels {{ key: "next" value: 3 }}
  }}
  config {{ name: "gone" base_path: "{root / 'nowhere'}" }}
}}""")
    srv = Server(model_config_file=config, host="127.0.0.1", port=0, poll_seconds=0.5,
                 rest_port=0, warm_up=False, allow_unavailable_labels=True).start()
    assert _wait(lambda: sorted(srv.models.manager("dplg").loaded_versions()) == [1, 2])
    yield srv
    srv.stop(5)


_IMAGE = "one image"   # a predict body of one image, made when the test runs

# (the README table's row, its HTTP code, the requests that show it)
REST_CODES = [
    ("predict, status, metadata", 200, [
        ("POST", "/v1/models/dplg:predict", _IMAGE),
        ("POST", "/v1/models/dplg/labels/stable:predict", _IMAGE),
        ("GET", "/v1/models/dplg", None), ("GET", "/v1/models/dplg/versions/1/metadata", None)]),
    ("the same with `/V1/` or any other case of the path", 200, [
        ("POST", "/V1/Models/dplg:PREDICT", _IMAGE), ("GET", "/V1/MODELS/dplg", None)]),
    ("status of a model with nothing to load (its rows say why)", 200, [
        ("GET", "/v1/models/gone", None)]),
    ("unknown model name", 404, [
        ("POST", "/v1/models/nope:predict", _IMAGE), ("GET", "/v1/models/nope", None)]),
    ("unknown version number, or a version that is not loaded", 404, [
        ("POST", "/v1/models/dplg/versions/7:predict", _IMAGE),
        ("POST", "/v1/models/dplg/versions/3:predict", _IMAGE)]),
    ("version label of a version that is not loaded "
     "(`--allow_version_labels_for_unavailable_models`)", 404, [
         ("POST", "/v1/models/dplg/labels/next:predict", _IMAGE)]),
    ("unknown version label", 400, [
        ("POST", "/v1/models/dplg/labels/nope:predict", _IMAGE),
        ("GET", "/v1/models/dplg/labels/nope", None),
        ("GET", "/v1/models/gone/labels/nope", None)]),   # on a model with nothing loaded
    ("unknown `signature_name`", 400, [
        ("POST", "/v1/models/dplg:predict", {"signature_name": "nope", "instances": []})]),
    ("`:classify`, `:regress`", 400, [
        ("POST", "/v1/models/dplg:classify", {"examples": []}),
        ("POST", "/v1/models/dplg:regress", {"examples": []})]),
    ("another method (`PUT`, `DELETE`, ...) under `/v1/`", 400, [
        ("PUT", "/v1/models/dplg", {}), ("DELETE", "/v1/models/dplg", None),
        ("PATCH", "/v1/models/dplg:predict", {})]),
    ("another path under `/v1/`", 400, [
        ("GET", "/v1/models/dplg:predict", None), ("POST", "/v1/models/dplg", {}),
        ("GET", "/v1/other", None)]),
    ("a bad body or input", 400, [
        ("POST", "/v1/models/dplg:predict", b"{not json"),
        ("POST", "/v1/models/dplg:predict", {"instances": [{"b64": "@@"}]})]),
    ("predict on a model with nothing loaded", 503, [
        ("POST", "/v1/models/gone:predict", _IMAGE)]),
    ("a path outside `/v1/`", 404, [("GET", "/v2/models/dplg", None)]),
]


def _send(srv, method, path, body):
    """(status, content type, parsed JSON or text) of one request."""
    if body is _IMAGE:
        body = {"instances": [_b64(image_bytes(60, 80, seed=11))]}
    data = body if isinstance(body, bytes) or body is None else json.dumps(body).encode()
    request = urllib.request.Request(f"http://{srv.rest_address}{path}", data=data,
                                     method=method)
    try:
        with urllib.request.urlopen(request, timeout=60) as response:
            status, kind, text = (response.status, response.headers["Content-Type"],
                                  response.read().decode())
    except urllib.error.HTTPError as e:
        status, kind, text = e.code, e.headers["Content-Type"], e.read().decode()
    try:
        return status, kind, json.loads(text)
    except ValueError:
        return status, kind, text


@pytest.mark.slow
@pytest.mark.parametrize("row,code,requests", REST_CODES, ids=[r[0] for r in REST_CODES])
def test_rest_codes_are_tf_servings(labelled, row, code, requests):
    for method, path, body in requests:
        status, kind, out = _send(labelled, method, path, body)
        assert status == code, (method, path, out)
        assert kind.startswith("application/json"), (method, path, kind)
        if code >= 400:   # TF Serving's error body: one sentence under "error"
            assert list(out) == ["error"] and isinstance(out["error"], str), out
            assert out["error"] and "\n" not in out["error"], out


def test_the_readme_table_lists_the_tested_rest_codes():
    root = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    with open(os.path.join(root, "README.md"), encoding="utf-8") as f:
        lines = f.read().splitlines()
    start = lines.index("| REST request | HTTP code |")
    rows = {}
    for line in lines[start + 2:]:
        if not line.startswith("|"):
            break
        case, code = [cell.strip() for cell in line.strip("|").rsplit("|", 1)]
        rows[case] = int(code)
    assert rows == {row: code for row, code, _ in REST_CODES}


@pytest.mark.slow
def test_a_model_that_cannot_be_served_says_why_in_the_log_status_and_health(
        bases, tmp_path, caplog):
    import logging

    from grpc_health.v1 import health_pb2, health_pb2_grpc
    from tensorflow.core.protobuf import error_codes_pb2
    from tensorflow_serving.apis import get_model_status_pb2, model_service_pb2_grpc

    missing = str(tmp_path / "nowhere")
    config = str(tmp_path / "models.config")
    _write_config(config, f"""
model_config_list {{
  config {{ name: "gone" base_path: "{missing}" }}
  config {{ name: "partial" base_path: "{bases[1]}"
           model_version_policy {{ specific {{ versions: 1 versions: 5 }} }} }}
}}""")
    caplog.set_level(logging.WARNING, logger="dplg_tf.serving")
    srv = Server(model_config_file=config, host="127.0.0.1", port=0, poll_seconds=0.1,
                 rest_port=0, warm_up=False).start()
    channel = grpc.insecure_channel(srv.address)
    try:
        time.sleep(1.0)   # several polls: each problem is logged once
        warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
        assert len([w for w in warnings if missing in w]) == 1, warnings
        assert len([w for w in warnings if "5" in w and bases[1] in w]) == 1, warnings
        # gRPC status: the state and the error, as TF Serving's status carries them
        stub = model_service_pb2_grpc.ModelServiceStub(channel)
        request = get_model_status_pb2.GetModelStatusRequest()
        request.model_spec.name = "partial"
        reply = stub.GetModelStatus(request, timeout=10)
        rows = {s.version: s for s in reply.model_version_status}
        states = get_model_status_pb2.ModelVersionStatus
        assert rows[1].state == states.AVAILABLE
        assert rows[5].state == states.START
        assert rows[5].status.error_code == error_codes_pb2.NOT_FOUND
        assert "Version 5" in rows[5].status.error_message
        assert bases[1] in rows[5].status.error_message
        # REST status of the model with no base path
        status, out = _http(srv, "/v1/models/gone")
        assert status == 200
        (row,) = out["model_version_status"]
        assert row["state"] == "START" and row["status"]["error_code"] == "NOT_FOUND"
        assert "does not exist" in row["status"]["error_message"]
        assert missing in row["status"]["error_message"]
        # health: the server serves, `gone` does not, `partial` does
        health = health_pb2_grpc.HealthStub(channel)

        def check(service):
            return health.Check(health_pb2.HealthCheckRequest(service=service),
                                timeout=10).status

        assert _wait(lambda: check("partial") == health_pb2.HealthCheckResponse.SERVING, 10)
        assert check("gone") == health_pb2.HealthCheckResponse.NOT_SERVING
        assert check("") == health_pb2.HealthCheckResponse.SERVING
    finally:
        channel.close()
        srv.stop(5)


def _config_text(*models):
    """A model_config_list of (name, base path, policy text, {label: version})."""
    entries = []
    for name, base, policy, labels in models:
        text = f'config {{ name: "{name}" base_path: "{base}" {policy} '
        text += " ".join(f'version_labels {{ key: "{k}" value: {v} }}'
                         for k, v in labels.items())
        entries.append(text + " }")
    return "model_config_list { " + " ".join(entries) + " }"


@pytest.mark.slow
def test_a_label_of_a_version_that_is_not_loaded_is_refused_unless_allowed(bases, tmp_path):
    config = str(tmp_path / "models.config")
    _write_config(config, _config_text(
        ("m", bases[1], "model_version_policy { specific { versions: 1 } }", {"canary": 2})))
    srv = Server(model_config_file=config, host="127.0.0.1", port=0, rest_port=0,
                 warm_up=False)
    with pytest.raises(UserError, match="allow_version_labels_for_unavailable_models"):
        srv.start()
    srv = Server(model_config_file=config, host="127.0.0.1", port=0, rest_port=0,
                 warm_up=False, allow_unavailable_labels=True).start()
    try:
        status, out = _http(srv, "/v1/models/m/labels/canary:predict",
                            {"instances": [_b64(image_bytes(60, 60, seed=3))]})
        assert status == 404 and "not loaded" in out["error"]
    finally:
        srv.stop(5)


def _reload(stub, text):
    from google.protobuf import text_format
    from tensorflow_serving.apis import model_management_pb2

    request = model_management_pb2.ReloadConfigRequest()
    text_format.Parse(text, request.config)
    return stub.HandleReloadConfigRequest(request, timeout=120)


@pytest.mark.slow
def test_handle_reload_config_request_adds_removes_and_repolicies_models(bases, tmp_path):
    from tensorflow_serving.apis import model_management_pb2, model_service_pb2_grpc
    from tensorflow_serving.config import model_server_config_pb2

    config = str(tmp_path / "models.config")
    _write_config(config, _config_text(("first", bases[0], "", {})))
    srv = Server(model_config_file=config, host="127.0.0.1", port=0, poll_seconds=0.2,
                 config_poll_seconds=0.2, rest_port=0, warm_up=False).start()
    channel = grpc.insecure_channel(srv.address)
    stub = model_service_pb2_grpc.ModelServiceStub(channel)
    blob = _b64(image_bytes(64, 64, seed=8))

    def served():
        return {m.name: sorted(m.loaded_versions()) for m in srv.models.managers()}

    try:
        # add a model, the way TF Serving's guide builds the request
        request = model_management_pb2.ReloadConfigRequest()
        configs = model_server_config_pb2.ModelConfigList()
        for name, base in (("first", bases[0]), ("second", bases[1])):
            entry = configs.config.add()
            entry.name, entry.base_path, entry.model_platform = name, base, "tensorflow"
        configs.config[1].model_version_policy.latest.num_versions = 2
        request.config.model_config_list.CopyFrom(configs)
        reply = stub.HandleReloadConfigRequest(request, timeout=120)
        assert reply.status.error_code == 0 and not reply.status.error_message
        assert _wait(lambda: served() == {"first": [1], "second": [2, 3]})
        # a bad config: INVALID_ARGUMENT in one sentence, the served set kept
        for text, words in [(_config_text(("x", "", "", {})), "no base_path"),
                            ("", "is empty"),
                            (_config_text(("a", "/x", "", {}), ("a", "/y", "", {})), "twice")]:
            with pytest.raises(grpc.RpcError) as info:
                _reload(stub, text)
            assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT
            assert words in info.value.details() and "\n" not in info.value.details()
        # a label of a version that is not loaded: FAILED_PRECONDITION, as TF Serving
        with pytest.raises(grpc.RpcError) as info:
            _reload(stub, _config_text(("second", bases[1], "", {"old": 1})))
        assert info.value.code() == grpc.StatusCode.FAILED_PRECONDITION
        assert "version 1" in info.value.details()
        assert served() == {"first": [1], "second": [2, 3]}
        # remove one model, re-policy the other; then label a loaded version
        _reload(stub, _config_text(("second", bases[1], "model_version_policy { all {} }",
                                    {})))
        assert _wait(lambda: served() == {"second": [1, 2, 3]})
        _reload(stub, _config_text(("second", bases[1], "model_version_policy { all {} }",
                                    {"old": 1})))
        status, out = _http(srv, "/v1/models/second/labels/old:predict", {"instances": [blob]})
        assert status == 200, out
        assert _http(srv, "/v1/models/first")[0] == 404
        # the unchanged config file does not undo the reload at its next poll
        time.sleep(1.0)
        assert srv.models.names == ["second"]
        # serving/reload_models.py, the deployment's way to send it (TF Serving too)
        script = os.path.join(os.path.dirname(__file__), "..", "..", "serving",
                              "reload_models.py")
        new_config = tmp_path / "reload.config"
        new_config.write_text(_config_text(("first", bases[0], "", {})))
        done = subprocess.run([sys.executable, script, f"--server={srv.address}",
                               str(new_config)], capture_output=True, text=True, timeout=120)
        assert done.returncode == 0, done.stderr
        assert _wait(lambda: served() == {"first": [1]})
        new_config.write_text("")
        done = subprocess.run([sys.executable, script, f"--server={srv.address}",
                               str(new_config)], capture_output=True, text=True, timeout=120)
        assert done.returncode == 1 and "is empty" in done.stderr
        assert served() == {"first": [1]}
    finally:
        channel.close()
        srv.stop(5)
