"""SavedModel export, the TF-Serving-compatible server and the client, over 127.0.0.1."""

import dataclasses
import io
import json
import os
import signal
import struct
import subprocess
import sys
import threading
import time

import grpc
import numpy as np
import pytest
from conftest import free_ports, image_bytes, small_dplg
import tensorflow as tf
from grpc_health.v1 import health_pb2, health_pb2_grpc
from PIL import Image
from tensorflow_serving.apis import (classification_pb2, get_model_metadata_pb2,
                                     get_model_status_pb2, model_service_pb2_grpc,
                                     predict_pb2, prediction_service_pb2_grpc)

from dplg_tf.export import export as export_lib
from dplg_tf.export.signatures import DescriptorExtractor
from dplg_tf.export.saved_models import next_version
from dplg_tf import images
from dplg_tf.config import PAPER_SCALES
from dplg_tf.serving import batching
from dplg_tf.serving.client import Client, ClientError
from dplg_tf.serving.server import Server

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
RNG = np.random.default_rng(7)


def _model(seed=0):
    return small_dplg(seed)


@pytest.fixture(scope="module")
def exported(tmp_path_factory):
    base = str(tmp_path_factory.mktemp("models") / "dplg")
    model = _model()
    path = export_lib.export(model, base)
    return base, path, model


@pytest.fixture(scope="module")
def server(exported):
    base = exported[0]
    params = dict(batching.DEFAULTS, max_batch_size=8, batch_timeout_micros=5000)
    srv = Server(base, "dplg", "127.0.0.1", 0, params, poll_seconds=0.2,
                 limits=dataclasses.replace(images.DEFAULT_LIMITS, max_request_mb=4)).start()
    client = Client(srv.address, timeout=60)
    deadline = time.time() + 60
    while time.time() < deadline:
        try:
            client.status()
            break
        except ClientError:
            time.sleep(0.2)
    yield srv
    client.close()
    srv.stop(5)


# ------------------------------------------------------------------ export

@pytest.mark.slow
def test_saved_model_cli_shows_both_signatures(exported):
    cli = os.path.join(os.path.dirname(sys.executable), "saved_model_cli")
    out = subprocess.run([cli, "show", "--all", "--dir", exported[1]], capture_output=True,
                         text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-2000:]
    text = out.stdout

    def block(name):
        start = text.index(f"signature_def['{name}']")
        nxt = text.find("signature_def[", start + 10)
        return text[start: nxt if nxt > 0 else None]

    sd, ms = block("serving_default"), block("multiscale")
    assert "inputs['image_bytes'] tensor_info:\n        dtype: DT_STRING\n        shape: (-1)" in sd
    assert "outputs['global_descriptor'] tensor_info:\n        dtype: DT_FLOAT\n" \
           "        shape: (-1, 512)" in sd
    assert "inputs['image'] tensor_info:\n        dtype: DT_UINT8\n        shape: (-1, -1, 3)" in ms
    assert "inputs['scales'] tensor_info:\n        dtype: DT_FLOAT\n        shape: (-1)" in ms
    assert "outputs['global_descriptor'] tensor_info:\n        dtype: DT_FLOAT\n" \
           "        shape: (512)" in ms
    assert "outputs['scale_descriptors'] tensor_info:\n        dtype: DT_FLOAT\n" \
           "        shape: (-1, 512)" in ms
    assert "outputs['attention'] tensor_info:\n        dtype: DT_FLOAT\n" \
           "        shape: (-1, -1)" in ms


@pytest.mark.slow
def test_saved_model_cli_run_loads_it_in_a_session(exported, tmp_path):
    # saved_model_cli run loads the SavedModel into a TF1 session, the way
    # tensorflow_model_server's C++ loader does, not through tf.function
    _, path, _ = exported
    data = image_bytes(90, 120, seed=8)
    np.save(tmp_path / "in.npy", np.array([data]))
    cli = os.path.join(os.path.dirname(sys.executable), "saved_model_cli")
    out = subprocess.run([cli, "run", "--dir", path, "--tag_set", "serve", "--signature_def",
                          "serving_default", "--inputs", f"image_bytes={tmp_path / 'in.npy'}",
                          "--outdir", str(tmp_path / "out")],
                         capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-2000:]
    served = np.load(tmp_path / "out" / "global_descriptor.npy")
    local = tf.saved_model.load(path).signatures["serving_default"](
        image_bytes=tf.constant([data]))["global_descriptor"].numpy()
    assert served.shape == (1, 512)
    np.testing.assert_allclose(served, local, atol=1e-6)


FRESH = r"""
import json, sys
import numpy as np
import tensorflow as tf
model = tf.saved_model.load(sys.argv[1])
data = open(sys.argv[2], "rb").read()
d = model.signatures["serving_default"](image_bytes=tf.constant([data, data]))
print(json.dumps({"descriptor": d["global_descriptor"].numpy().tolist(),
                  "dplg_tf_imported": any(m.startswith("dplg_tf") for m in sys.modules)}))
"""


@pytest.mark.slow
def test_saved_model_in_a_fresh_process_matches_keras(exported, tmp_path):
    _, path, model = exported
    image_file = tmp_path / "query.jpg"
    image_file.write_bytes(image_bytes(150, 230, seed=3))
    proc = subprocess.run([sys.executable, "-c", FRESH, path, str(image_file)],
                          capture_output=True, text=True, timeout=300, cwd=str(tmp_path))
    assert proc.returncode == 0, proc.stderr[-3000:]
    out = json.loads(proc.stdout.strip().splitlines()[-1])
    assert out["dplg_tf_imported"] is False
    served = np.array(out["descriptor"])
    # the same extraction run eagerly on the Keras model
    image = tf.io.decode_jpeg(image_file.read_bytes(), channels=3)
    keras_side = DescriptorExtractor(model, PAPER_SCALES).multiscale(
        image, tf.constant(PAPER_SCALES, tf.float32))["global_descriptor"].numpy()
    assert served.shape == (2, 512)
    np.testing.assert_allclose(served[0], keras_side, atol=1e-5)
    np.testing.assert_allclose(served[1], served[0], atol=1e-6)


@pytest.mark.slow
def test_multiscale_is_the_normalised_mean_of_the_scales(exported):
    loaded = tf.saved_model.load(exported[1])
    image = RNG.integers(0, 255, (200, 300, 3), dtype=np.uint8)
    out = loaded.signatures["multiscale"](image=tf.constant(image),
                                          scales=tf.constant([0.5, 1.0, 1.5]))
    per = out["scale_descriptors"].numpy()
    np.testing.assert_allclose(np.linalg.norm(per, axis=1), 1.0, rtol=1e-5)
    mean = per.mean(axis=0)
    np.testing.assert_allclose(out["global_descriptor"].numpy(), mean / np.linalg.norm(mean),
                               atol=1e-6)
    assert out["attention"].shape == (13, 19)  # scale 1: ceil(200/16) x ceil(300/16)
    np.testing.assert_allclose(out["attention"].numpy().sum(), 1.0, rtol=1e-5)
    # each row is the model's descriptor of the image resized by that scale
    model = exported[2]
    small = tf.image.resize(tf.cast(image, tf.float32), (100, 150), antialias=True)
    direct = model(small[None])["descriptor"].numpy()[0]
    np.testing.assert_allclose(per[0], direct, atol=1e-5)


@pytest.mark.slow
def test_frozen_and_variable_exports_agree(exported, tmp_path):
    # the default export holds the weights as constants; --nofreeze as variables
    _, path, model = exported
    frozen = tf.saved_model.load(path)
    assert len(frozen.signatures["serving_default"].variables) == 0
    plain = tf.saved_model.load(export_lib.export(model, str(tmp_path / "m"), freeze=False))
    assert len(plain.signatures["serving_default"].variables) == len(model.weights)
    data = tf.constant([image_bytes(140, 100, seed=5), image_bytes(64, 300, seed=6)])
    np.testing.assert_allclose(frozen.signatures["serving_default"](image_bytes=data)[
        "global_descriptor"].numpy(), plain.signatures["serving_default"](image_bytes=data)[
        "global_descriptor"].numpy(), atol=1e-5)
    image = tf.constant(RNG.integers(0, 255, (80, 120, 3), dtype=np.uint8))
    scales = tf.constant([0.7, 1.0])
    a, b = (m.signatures["multiscale"](image=image, scales=scales) for m in (frozen, plain))
    for key in ("global_descriptor", "scale_descriptors", "attention"):
        np.testing.assert_allclose(a[key].numpy(), b[key].numpy(), atol=1e-5)
    with pytest.raises(ValueError, match="Scales must be 1 to 8 values"):
        export_lib.export(model, str(tmp_path / "bad"), scales=[0.5, -1.0])


@pytest.mark.slow
def test_image_formats_work_or_fail_clearly(exported):
    sd = tf.saved_model.load(exported[1]).signatures["serving_default"]
    arr = RNG.integers(0, 255, (90, 120, 3), dtype=np.uint8)

    def enc(img, fmt, **kw):
        buf = io.BytesIO()
        img.save(buf, fmt, **kw)
        return buf.getvalue()

    ok = {
        "grayscale": enc(Image.fromarray(arr[..., 0]), "PNG"),
        "rgba": enc(Image.fromarray(np.dstack([arr, arr[..., :1]])), "PNG"),
        "png16": enc(Image.fromarray(arr[..., 0].astype(np.uint16) * 257), "PNG"),
        "gif_animated": enc(Image.fromarray(arr), "GIF", save_all=True,
                            append_images=[Image.fromarray(255 - arr)]),
        "bmp": enc(Image.fromarray(arr), "BMP"),
        "cmyk_jpeg": enc(Image.fromarray(arr).convert("CMYK"), "JPEG"),
    }
    for name, data in ok.items():
        d = sd(image_bytes=tf.constant([data]))["global_descriptor"].numpy()
        assert d.shape == (1, 512) and abs(np.linalg.norm(d) - 1) < 1e-5, name
    # an animated GIF is described by its first frame
    first = enc(Image.fromarray(arr), "GIF")
    np.testing.assert_allclose(sd(image_bytes=tf.constant([ok["gif_animated"]]))[
        "global_descriptor"].numpy(), sd(image_bytes=tf.constant([first]))[
        "global_descriptor"].numpy(), atol=1e-6)


def test_export_versions_and_random_init_guard(tmp_path, small_config):
    base = str(tmp_path / "m")
    with pytest.raises(ValueError, match="allow_random_init"):
        export_lib.load_for_export(config=small_config)
    assert next_version(base) == 1
    os.makedirs(os.path.join(base, "7"))
    os.makedirs(os.path.join(base, ".tmp-9-1"))
    assert next_version(base) == 8
    with pytest.raises(FileExistsError, match="choose another --version"):
        export_lib.export(_model(), base, version=7)


# ------------------------------------------------------------------ server

@pytest.mark.slow
def test_predict_through_the_server_equals_the_local_signature(server, exported):
    data = [image_bytes(100, 140, seed=s) for s in range(3)]
    local = tf.saved_model.load(exported[1]).signatures["serving_default"](
        image_bytes=tf.constant(data))["global_descriptor"].numpy()
    with Client(server.address) as client:
        remote = client.describe_bytes(data)
        np.testing.assert_allclose(remote, local, atol=1e-6)
        image = RNG.integers(0, 255, (100, 130, 3), dtype=np.uint8)
        out = client.multiscale(image, [0.75, 1.0])
        assert out["scale_descriptors"].shape == (2, 512)
        assert out["attention"].shape == (7, 9)


@pytest.mark.slow
def test_metadata_and_status(server):
    with Client(server.address) as client:
        assert client.status()[0][1] == "AVAILABLE"
        sigs = client.signatures()
        assert sigs["serving_default"][0] == {"image_bytes": ("string", [-1])}
        assert sigs["serving_default"][1] == {"global_descriptor": ("float", [-1, 512])}
        assert sigs["multiscale"][0] == {"image": ("uint8", [-1, -1, 3]),
                                         "scales": ("float", [-1])}


def _stubs(address):
    channel = grpc.insecure_channel(address)
    return (channel, prediction_service_pb2_grpc.PredictionServiceStub(channel),
            model_service_pb2_grpc.ModelServiceStub(channel),
            health_pb2_grpc.HealthStub(channel))


def _predict_request(inputs, name="dplg", signature="", version=None, output_filter=()):
    request = predict_pb2.PredictRequest()
    request.model_spec.name = name
    if signature:
        request.model_spec.signature_name = signature
    if version is not None:
        request.model_spec.version.value = version
    for key, value in inputs.items():
        request.inputs[key].CopyFrom(tf.make_tensor_proto(value))
    request.output_filter.extend(output_filter)
    return request


def _huge_png_header():
    """A PNG whose header claims 50000 x 40000 pixels (the body is one pixel)."""
    data = bytearray(image_bytes(1, 1, fmt="PNG"))
    data[16:24] = struct.pack(">II", 50000, 40000)
    return bytes(data)


BAD_REQUESTS = [
    ("unknown model", dict(name="other"), grpc.StatusCode.NOT_FOUND, "not served here"),
    ("unknown version", dict(version=99), grpc.StatusCode.NOT_FOUND, "version 99"),
    ("unknown signature", dict(signature="nope"), grpc.StatusCode.FAILED_PRECONDITION,
     "signature 'nope'"),
    ("no inputs", dict(inputs={}), grpc.StatusCode.INVALID_ARGUMENT, "missing ['image_bytes']"),
    ("wrong input name", dict(inputs={"images": np.array([b"x"], dtype=object)}),
     grpc.StatusCode.INVALID_ARGUMENT, "unexpected ['images']"),
    ("wrong dtype", dict(inputs={"image_bytes": np.zeros(2, np.float32)}),
     grpc.StatusCode.INVALID_ARGUMENT, "must be string, got float32"),
    ("wrong rank", dict(inputs={"image_bytes": np.array([[b"x"]], dtype=object)}),
     grpc.StatusCode.INVALID_ARGUMENT, "must have rank 1"),
    ("undecodable bytes", dict(inputs={"image_bytes": np.array([b"not an image"], dtype=object)}),
     grpc.StatusCode.INVALID_ARGUMENT, "not a JPEG, PNG, GIF or BMP"),
    ("too many pixels", dict(inputs={"image_bytes": np.array([_huge_png_header()], dtype=object)}),
     grpc.StatusCode.INVALID_ARGUMENT, "hold 2000000000 pixels (40000x50000)"),
    ("tiny image", dict(inputs={"image_bytes": np.array([image_bytes(8, 8)], dtype=object)}),
     grpc.StatusCode.INVALID_ARGUMENT, "shorter side must be at least 16"),
    ("four channels", dict(signature="multiscale", inputs={
        "image": np.zeros((64, 64, 4), np.uint8), "scales": np.ones(1, np.float32)}),
     grpc.StatusCode.INVALID_ARGUMENT, "shape"),
    ("negative scale", dict(signature="multiscale", inputs={
        "image": np.zeros((64, 64, 3), np.uint8), "scales": np.array([-1.0], np.float32)}),
     grpc.StatusCode.INVALID_ARGUMENT, "Scales must be"),
    ("unknown output", dict(output_filter=["nope"]), grpc.StatusCode.INVALID_ARGUMENT,
     "output_filter"),
    ("message too large", dict(inputs={"image_bytes": np.array([b"x" * (5 << 20)], dtype=object)}),
     grpc.StatusCode.RESOURCE_EXHAUSTED, ""),
]


@pytest.mark.slow
def test_bad_requests_get_the_right_status_and_the_server_keeps_serving(server):
    channel, predict, models, health_stub = _stubs(server.address)
    good = {"image_bytes": np.array([image_bytes()], dtype=object)}
    try:
        for name, kw, code, text in BAD_REQUESTS:
            kw = dict(kw)
            inputs = kw.pop("inputs", good)
            with pytest.raises(grpc.RpcError) as info:
                predict.Predict(_predict_request(inputs, **kw), timeout=60)
            assert info.value.code() == code, (name, info.value.details())
            assert text in info.value.details(), (name, info.value.details())
        # the other methods and services
        with pytest.raises(grpc.RpcError) as info:
            predict.Classify(classification_pb2.ClassificationRequest(), timeout=10)
        assert info.value.code() == grpc.StatusCode.UNIMPLEMENTED
        status = get_model_status_pb2.GetModelStatusRequest()
        status.model_spec.name = "other"
        with pytest.raises(grpc.RpcError) as info:
            models.GetModelStatus(status, timeout=10)
        assert info.value.code() == grpc.StatusCode.NOT_FOUND
        meta = get_model_metadata_pb2.GetModelMetadataRequest()
        meta.model_spec.name = "dplg"
        meta.metadata_field.append("weights")
        with pytest.raises(grpc.RpcError) as info:
            predict.GetModelMetadata(meta, timeout=10)
        assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT
        # still healthy, still answering
        reply = health_stub.Check(health_pb2.HealthCheckRequest(service=""), timeout=10)
        assert reply.status == health_pb2.HealthCheckResponse.SERVING
        reply = health_stub.Check(health_pb2.HealthCheckRequest(
            service="tensorflow.serving.PredictionService"), timeout=10)
        assert reply.status == health_pb2.HealthCheckResponse.SERVING
        out = predict.Predict(_predict_request(good), timeout=60)
        assert list(out.outputs["global_descriptor"].tensor_shape.dim)[1].size == 512
    finally:
        channel.close()


@pytest.mark.slow
def test_a_bad_image_in_a_batch_fails_only_its_own_request(server):
    good = image_bytes()
    results = {}

    def send(key, data):
        with Client(server.address, retries=0) as client:
            try:
                results[key] = client.describe_bytes([data]).shape
            except ClientError as e:
                results[key] = e.code

    threads = [threading.Thread(target=send, args=(i, b"junk" if i == 3 else good))
               for i in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert results.pop(3) == grpc.StatusCode.INVALID_ARGUMENT
    assert set(results.values()) == {(1, 512)}


@pytest.mark.slow
def test_bounded_concurrent_load_has_no_errors(server):
    data = [image_bytes(96, 128, seed=s) for s in range(4)]
    errors, done = [], []

    def worker(k):
        with Client(server.address, retries=2) as client:
            for i in range(50):
                try:
                    d = client.describe_bytes([data[(k + i) % 4]])
                    assert d.shape == (1, 512)
                    done.append(1)
                except Exception as e:  # noqa: BLE001
                    errors.append(repr(e))

    threads = [threading.Thread(target=worker, args=(k,)) for k in range(8)]
    start = time.time()
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=600)
    assert not errors, errors[:3]
    assert len(done) == 400 and time.time() - start < 600


@pytest.mark.slow
def test_a_new_version_is_picked_up_while_a_client_keeps_sending(server, exported):
    base = exported[0]
    versions, errors = [], []
    stop = threading.Event()
    channel, predict, _, _ = _stubs(server.address)
    request = _predict_request({"image_bytes": np.array([image_bytes()], dtype=object)})

    def keep_sending():
        while not stop.is_set():
            try:
                versions.append(predict.Predict(request, timeout=60).model_spec.version.value)
            except grpc.RpcError as e:
                errors.append(e.details())

    def until(condition, seconds=120):
        deadline = time.time() + seconds
        while not condition() and time.time() < deadline:
            time.sleep(0.05)

    thread = threading.Thread(target=keep_sending)
    thread.start()
    try:
        until(lambda: versions or errors)   # the old version has answered
        new = export_lib.export(_model(seed=1), base)
        new_version = int(os.path.basename(new))
        until(lambda: new_version in versions)
        seen = len(versions)
        until(lambda: len(versions) >= seen + 3 or errors)   # and the new one goes on
    finally:
        stop.set()
        thread.join()
        channel.close()
    assert not errors, errors[:3]
    assert versions[0] == new_version - 1 and versions[-1] == new_version
    with Client(server.address) as client:
        assert client.status() == [(new_version, "AVAILABLE")]


# ------------------------------------- TF Serving's clients: the typed fields

def _tf_serving_example_client(address, data, image):
    """A client written the way TF Serving's example clients are
    (resnet_client_grpc.py, mnist_client.py): a PredictRequest from
    tf.make_tensor_proto, the stub, and the answer's float_val."""
    channel = grpc.insecure_channel(address)
    stub = prediction_service_pb2_grpc.PredictionServiceStub(channel)
    request = predict_pb2.PredictRequest()
    request.model_spec.name = "dplg"
    request.model_spec.signature_name = "serving_default"
    request.inputs["image_bytes"].CopyFrom(tf.make_tensor_proto(data, shape=[1]))
    result = stub.Predict(request, 10.0)  # 10 secs timeout
    typed = np.array(result.outputs["global_descriptor"].float_val)
    whole = tf.make_ndarray(result.outputs["global_descriptor"])
    request = predict_pb2.PredictRequest()
    request.model_spec.name = "dplg"
    request.model_spec.signature_name = "multiscale"
    request.inputs["image"].CopyFrom(tf.make_tensor_proto(image))
    request.inputs["scales"].CopyFrom(tf.make_tensor_proto([1.0, 0.5], dtype=tf.float32))
    future = stub.Predict.future(request, 10.0)
    scales = np.array(future.result().outputs["scale_descriptors"].float_val)
    channel.close()
    return typed, whole, scales, result


@pytest.mark.slow
def test_a_tf_serving_example_client_reads_float_val(server, exported):
    data = image_bytes(100, 120, seed=21)
    image = RNG.integers(0, 255, (90, 110, 3), dtype=np.uint8)
    typed, whole, scales, result = _tf_serving_example_client(server.address, data, image)
    served = os.path.join(exported[0], str(result.model_spec.version.value))
    signatures = tf.saved_model.load(served).signatures   # (another test adds versions)
    local = signatures["serving_default"](image_bytes=tf.constant([data]))[
        "global_descriptor"].numpy()
    assert typed.shape == (512,) and not result.outputs["global_descriptor"].tensor_content
    np.testing.assert_allclose(typed, local[0], atol=1e-6)
    np.testing.assert_array_equal(whole, typed.reshape(1, 512).astype(np.float32))
    local_scales = signatures["multiscale"](image=tf.constant(image),
                                            scales=tf.constant([1.0, 0.5]))
    np.testing.assert_allclose(scales.reshape(2, 512),
                               local_scales["scale_descriptors"].numpy(), atol=1e-5)


@pytest.mark.slow
def test_tensor_content_when_asked_and_our_client_reads_both(server, exported):
    data = [image_bytes(80, 90, seed=s) for s in (22, 23)]
    srv = Server(exported[0], "dplg", "127.0.0.1", 0, None, poll_seconds=5, warm_up=False,
                 tensor_content=True).start()
    try:
        channel, predict, _, _ = _stubs(srv.address)
        out = predict.Predict(_predict_request({"image_bytes": np.array(data, dtype=object)}),
                              timeout=60).outputs["global_descriptor"]
        channel.close()
        assert len(out.tensor_content) == 2 * 512 * 4 and not out.float_val
        with Client(srv.address) as content, Client(server.address) as typed:
            np.testing.assert_array_equal(content.describe_bytes(data),
                                          typed.describe_bytes(data))
            np.testing.assert_array_equal(content.describe_bytes(data), tf.make_ndarray(out))
    finally:
        srv.stop(5)


def test_outputs_fill_the_field_tf_serving_fills_for_each_dtype():
    from dplg_tf.serving.server import output_proto

    cases = [(np.float32, "float_val"), (np.float64, "double_val"), (np.int32, "int_val"),
             (np.uint8, "int_val"), (np.int64, "int64_val"), (np.bool_, "bool_val"),
             (np.float16, "half_val"), (np.uint32, "uint32_val")]
    for dtype, field in cases:
        array = np.arange(6).reshape(2, 3).astype(dtype)
        typed = output_proto(array)
        assert len(getattr(typed, field)) == 6 and not typed.tensor_content, dtype
        assert [d.size for d in typed.tensor_shape.dim] == [2, 3]
        content = output_proto(array, tensor_content=True)
        assert len(content.tensor_content) == array.nbytes and not getattr(content, field)
        for proto in (typed, content):
            np.testing.assert_array_equal(tf.make_ndarray(proto), array)
            assert tf.make_ndarray(proto).dtype == array.dtype
    strings = np.array([b"a", b"bc"], dtype=object)
    for as_content in (False, True):
        proto = output_proto(strings, as_content)
        assert list(proto.string_val) == [b"a", b"bc"]
    empty = output_proto(np.zeros((0, 512), np.float32))
    assert tf.make_ndarray(empty).shape == (0, 512)


def test_serve_cli_takes_tf_servings_flags(tmp_path):
    missing = str(tmp_path / "nowhere")
    proc = subprocess.run(
        [sys.executable, "-m", "dplg_tf.cli.serve", f"--model_base_path={missing}",
         "--enable_serialization_as_tensor_content",
         "--allow_version_labels_for_unavailable_models"],
        capture_output=True, text=True, timeout=300)
    assert proc.returncode == 2, proc.stderr[-2000:]
    assert "is not a folder" in proc.stderr   # the flags parsed; the path was checked


# ---------------------------------------------------------------- batching

def test_batcher_combines_concurrent_tasks_and_respects_limits():
    calls = []

    def run(items):
        calls.append(len(items))
        time.sleep(0.05)
        return [x * 10 for x in items]

    b = batching.Batcher(run, max_batch_size=4, batch_timeout_micros=50_000,
                         num_batch_threads=1, max_enqueued_batches=2)
    futures = [b.submit([i])[0] for i in range(6)]
    assert [f.result(10) for f in futures] == [[i * 10] for i in range(6)]
    assert max(calls) <= 4 and len(calls) < 6  # batched, never over max_batch_size
    # a full queue refuses at once
    taken, release = threading.Event(), threading.Event()

    def held(items):
        taken.set()
        release.wait(10)
        return items

    slow = batching.Batcher(held, max_batch_size=1, batch_timeout_micros=0,
                            num_batch_threads=1, max_enqueued_batches=1)
    first = slow.submit([1])[0]
    assert taken.wait(10)  # the batch thread holds the first; one more fits the queue
    second = slow.submit([2])[0]
    with pytest.raises(batching.QueueFull, match="queue is full"):
        slow.submit([3])
    release.set()
    assert first.result(5) == [1] and second.result(5) == [2]
    slow.close()
    b.close()
    with pytest.raises(batching.BatcherClosed):
        b.submit([1])


def test_batching_parameters_file_parses():
    with open(os.path.join(ROOT, "serving", "batching_parameters.txt")) as f:
        params = batching.parse_batching_parameters(f.read())
    assert params == {"max_batch_size": 16, "batch_timeout_micros": 2000,
                      "num_batch_threads": 2, "max_enqueued_batches": 64}
    with pytest.raises(ValueError, match="max_batch_size must be >= 1"):
        batching.parse_batching_parameters("max_batch_size { value: 0 }")


def test_models_config_is_a_valid_model_server_config():
    from google.protobuf import text_format
    from tensorflow_serving.config import model_server_config_pb2

    with open(os.path.join(ROOT, "serving", "models.config")) as f:
        config = text_format.Parse(f.read(), model_server_config_pb2.ModelServerConfig())
    (model,) = config.model_config_list.config
    assert (model.name, model.base_path, model.model_platform) == (
        "dplg", "/models/dplg", "tensorflow")


# ----------------------------------------------------------- the commands

@pytest.mark.slow
def test_serve_cli_sigterm_drains_in_flight_requests(exported, tmp_path):
    port_file = tmp_path / "port"
    port = free_ports()[0]
    proc = subprocess.Popen(
        [sys.executable, "-m", "dplg_tf.cli.serve", f"--model_base_path={exported[0]}",
         f"--port={port}", "--rest_api_port=0", "--grace_seconds=60"],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    del port_file
    try:
        client = Client(f"127.0.0.1:{port}", retries=8, backoff=0.5)
        deadline = time.time() + 120  # the server answers LOADING until its warm-up is done
        while not any(s == "AVAILABLE" for _, s in client.status()) and time.time() < deadline:
            time.sleep(0.2)
        big = image_bytes(1000, 1000, seed=9)
        result = {}

        def slow_request():
            result["shape"] = client.describe_bytes([big, big, big]).shape

        thread = threading.Thread(target=slow_request)
        thread.start()
        time.sleep(0.3)  # the request is in flight
        proc.send_signal(signal.SIGTERM)
        thread.join(timeout=120)
        out, err = proc.communicate(timeout=120)
    finally:
        proc.kill()
    assert result.get("shape") == (3, 512)
    assert proc.returncode == 0, err[-2000:]
    assert "dplg-serve: stopped" in out


@pytest.mark.slow
def test_client_cli_writes_descriptors(server, tmp_path):
    folder = tmp_path / "images"
    folder.mkdir()
    for i in range(5):
        (folder / f"{i}.jpg").write_bytes(image_bytes(80, 100, seed=i))
    (folder / "notes.txt").write_text("not an image")
    out = tmp_path / "desc.npz"
    proc = subprocess.run([sys.executable, "-m", "dplg_tf.cli.client",
                           f"--server={server.address}", str(folder), f"--output={out}",
                           "--batch_size=2"], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    saved = np.load(out)
    assert saved["descriptors"].shape == (5, 512)
    assert [os.path.basename(n) for n in saved["names"]] == [f"{i}.jpg" for i in range(5)]
    status = subprocess.run([sys.executable, "-m", "dplg_tf.cli.client",
                             f"--server={server.address}", "--status"],
                            capture_output=True, text=True, timeout=300)
    assert "AVAILABLE" in status.stdout and "signature multiscale" in status.stdout


def test_export_writes_tf_servings_warm_up_file(exported):
    """assets.extra/tf_serving_warmup_requests: TFRecords of PredictionLog, a few
    Predict requests for each signature, each one the signature answers."""
    from tensorflow_serving.apis import prediction_log_pb2

    from dplg_tf.export import warmup

    path = os.path.join(exported[1], "assets.extra", "tf_serving_warmup_requests")
    records = list(tf.data.TFRecordDataset(path).as_numpy_iterator())
    assert 0 < len(records) <= 1000
    logs = [prediction_log_pb2.PredictionLog.FromString(r) for r in records]
    names = [log.predict_log.request.model_spec.signature_name for log in logs]
    assert set(names) == {"serving_default", "multiscale"}
    loaded = tf.saved_model.load(exported[1])
    for log in logs:
        request = log.predict_log.request
        inputs = {k: tf.make_ndarray(v) for k, v in request.inputs.items()}
        out = loaded.signatures[request.model_spec.signature_name](
            **{k: tf.constant(v) for k, v in inputs.items()})
        assert np.isfinite(out["global_descriptor"].numpy()).all()
    signatures = {k: set(v.structured_input_signature[1])
                  for k, v in loaded.signatures.items()}
    assert len(warmup.read(exported[1], signatures)) == len(logs)


def _version_with_warmup(exported, tmp_path, content):
    import shutil

    base = tmp_path / "dplg"
    shutil.copytree(exported[1], base / "1")
    target = base / "1" / "assets.extra" / "tf_serving_warmup_requests"
    if callable(content):
        content(str(target))
    else:
        target.write_bytes(content)
    return str(base)


def _bad_signature_warmup(path):
    from tensorflow_serving.apis import predict_pb2, prediction_log_pb2

    request = predict_pb2.PredictRequest()
    request.model_spec.signature_name = "no_such_signature"
    log = prediction_log_pb2.PredictionLog(
        predict_log=prediction_log_pb2.PredictLog(request=request))
    with tf.io.TFRecordWriter(path) as writer:
        writer.write(log.SerializeToString())


def _bad_input_warmup(path):
    from tensorflow_serving.apis import predict_pb2, prediction_log_pb2

    request = predict_pb2.PredictRequest()
    request.model_spec.signature_name = "serving_default"
    request.inputs["image_bytes"].CopyFrom(tf.make_tensor_proto(np.array([b"not an image"],
                                                                         object)))
    log = prediction_log_pb2.PredictionLog(
        predict_log=prediction_log_pb2.PredictLog(request=request))
    with tf.io.TFRecordWriter(path) as writer:
        writer.write(log.SerializeToString())


@pytest.mark.parametrize("content,words", [
    (b"\x00garbage that is no TFRecord" * 3, "is not a file of TFRecords"),
    (_bad_signature_warmup, "asks for signature 'no_such_signature'"),
    (_bad_input_warmup, "request 0 for 'serving_default' failed")])
def test_a_warm_up_file_that_fails_fails_the_load_and_says_why(exported, tmp_path, content,
                                                                words):
    """As TF Serving: the version is not served, its status carries the reason; the
    server keeps running. With --enable_model_warmup off the same version serves."""
    base = _version_with_warmup(exported, tmp_path, content)
    srv = Server(base, "dplg", "127.0.0.1", 0, None, poll_seconds=5).start()
    try:
        manager = srv.models.managers()[0]
        rows = manager.status_rows()
        assert rows and rows[0][0] == 1 and words in rows[0][3], rows
        assert manager.current is None
    finally:
        srv.stop(0)
    srv = Server(base, "dplg", "127.0.0.1", 0, None, poll_seconds=5, warm_up=False).start()
    try:
        assert srv.models.managers()[0].current is not None
    finally:
        srv.stop(0)


def test_the_server_replays_the_export_warm_up_file(server):
    loaded = server.models.managers()[0].current
    assert loaded.warmed_up == 3
