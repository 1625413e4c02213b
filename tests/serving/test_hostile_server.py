"""Hostile requests against dplg-serve and the exported signatures, and a
hostile life for dplg-client: every case checks the status or exit code and
the message, and the server must still be SERVING with the same answer."""

import dataclasses
import io
import os
import random
import shutil
import signal
import struct
import subprocess
import sys
import threading
import time

import grpc
import numpy as np
import pytest
from conftest import free_ports, small_dplg
import tensorflow as tf
from grpc_health.v1 import health_pb2, health_pb2_grpc
from PIL import Image
from tensorflow.core.framework import tensor_pb2, types_pb2
from tensorflow_serving.apis import (get_model_status_pb2, model_service_pb2_grpc,
                                     predict_pb2, prediction_service_pb2_grpc)

from dplg_tf.export import export as export_lib
from dplg_tf import images
from dplg_tf.storage.chunks import ChunkedOutput
from dplg_tf.storage.descriptors import read_npz
from dplg_tf.serving import batching
from dplg_tf.errors import tf_error_message
from dplg_tf.serving.server import Server

LIMITS = dataclasses.replace(images.DEFAULT_LIMITS, max_images=16, max_pixels=1_000_000,
                             max_request_pixels=5_000_000, max_request_mb=4)
ENV = dict(os.environ, TF_CPP_MIN_LOG_LEVEL="3", PYTHONUNBUFFERED="1")


def _model(seed=0):
    return small_dplg(seed)


def _encode(arr, fmt="JPEG", **kw):
    buf = io.BytesIO()
    Image.fromarray(arr).save(buf, fmt, **kw)
    return buf.getvalue()


def _image(h=96, w=128, seed=0, fmt="JPEG"):
    return _encode(np.random.default_rng(seed).integers(0, 255, (h, w, 3), np.uint8), fmt)


def _gif_big_frame(frame=1500, screen=100):
    """A decodable GIF: a 100x100 screen holding a 1500x1500 frame."""
    buf = io.BytesIO()
    Image.new("P", (frame, frame), 3).save(buf, "GIF")
    data = buf.getvalue()
    return data[:6] + struct.pack("<HH", screen, screen) + data[10:]


def _gif_many_frames(n=150, side=100):
    frames = [Image.new("RGB", (side, side), (i % 250, 255 - i % 250, 0)) for i in range(n)]
    buf = io.BytesIO()
    frames[0].save(buf, "GIF", save_all=True, append_images=frames[1:])
    return buf.getvalue()


def _patched(data, offset, fmt, *values):
    data = bytearray(data)
    data[offset:offset + struct.calcsize(fmt)] = struct.pack(fmt, *values)
    return bytes(data)


def _jpeg_huge_sof():
    data = _image()
    at = data.index(b"\xff\xc0")
    return _patched(data, at + 5, ">HH", 60000, 60000)


@pytest.fixture(scope="module")
def exported(tmp_path_factory):
    base = str(tmp_path_factory.mktemp("hostile") / "dplg")
    model = _model()
    export_lib.export(model, base, limits=LIMITS)
    return base, model


@pytest.fixture(scope="module")
def server(exported):
    params = dict(batching.DEFAULTS, max_batch_size=4, batch_timeout_micros=2000)
    srv = Server(exported[0], "dplg", "127.0.0.1", 0, params, poll_seconds=0.2,
                 limits=LIMITS).start()
    channel = grpc.insecure_channel(srv.address)
    grpc.channel_ready_future(channel).result(timeout=30)
    stub = prediction_service_pb2_grpc.PredictionServiceStub(channel)
    deadline = time.time() + 60
    while srv.manager.current is None and time.time() < deadline:
        time.sleep(0.1)
    srv.stub, srv.channel = stub, channel
    srv.model_stub = model_service_pb2_grpc.ModelServiceStub(channel)
    srv.health_stub = health_pb2_grpc.HealthStub(channel)
    srv.reference = _describe(stub, [_image(seed=42)])
    yield srv
    channel.close()
    srv.stop(5)


def _proto(dtype, shape, **fields):
    p = tensor_pb2.TensorProto(dtype=dtype)
    for d in shape:
        p.tensor_shape.dim.add(size=d)
    for name, values in fields.items():
        if name == "tensor_content":
            p.tensor_content = values
        else:
            getattr(p, name).extend(values)
    return p


def _request(inputs, signature=""):
    request = predict_pb2.PredictRequest()
    request.model_spec.name = "dplg"
    request.model_spec.signature_name = signature
    for name, value in inputs.items():
        request.inputs[name].CopyFrom(value if isinstance(value, tensor_pb2.TensorProto)
                                      else tf.make_tensor_proto(value))
    return request


def _describe(stub, blobs):
    out = stub.Predict(_request({"image_bytes": np.array(blobs, dtype=object)}), timeout=120)
    return tf.make_ndarray(out.outputs["global_descriptor"])


STRING, UINT8, FLOAT = types_pb2.DT_STRING, types_pb2.DT_UINT8, types_pb2.DT_FLOAT
SCALES = np.array([1.0], np.float32)
SMALL = np.zeros((64, 64, 3), np.uint8)


def _ms(image=SMALL, scales=SCALES):
    return ({"image": image, "scales": scales}, "multiscale")


def _bytes(*blobs):
    return ({"image_bytes": np.array(list(blobs), dtype=object)}, "")


# name -> ((inputs, signature), expected status, text in the message)
HOSTILE = {
    "one string declared as 100000": (({"image_bytes": _proto(STRING, [100000], string_val=[
        b"x"])}, ""), "INVALID_ARGUMENT", "declares 100000 elements"),
    "one string declared as 3": (({"image_bytes": _proto(STRING, [3], string_val=[b"x"])}, ""),
                                 "INVALID_ARGUMENT", "carries 1 values"),
    "one byte declared as 20000x20000x3": (_ms(image=_proto(UINT8, [20000, 20000, 3],
                                                            int_val=[7])),
                                           "INVALID_ARGUMENT", "declares 1200000000 elements"),
    "one byte declared as 100x100x3": (_ms(image=_proto(UINT8, [100, 100, 3], int_val=[7])),
                                       "INVALID_ARGUMENT", "carries 1 values"),
    "tensor_content too short": (_ms(scales=_proto(FLOAT, [4], tensor_content=b"\0" * 8)),
                                 "INVALID_ARGUMENT", "carries 2 values"),
    "negative dimension": (({"image_bytes": _proto(STRING, [-5])}, ""), "INVALID_ARGUMENT",
                           "negative dimension"),
    "unknown rank": (({"image_bytes": tensor_pb2.TensorProto(
        dtype=STRING, tensor_shape={"unknown_rank": True})}, ""), "INVALID_ARGUMENT",
        "known shape"),
    "unknown dtype enum": (({"image_bytes": _proto(999, [1])}, ""), "INVALID_ARGUMENT",
                           "must be string"),
    "1500 images": (_bytes(*[b"x"] * 1500), "INVALID_ARGUMENT", "declares 1500 elements"),
    "17 images": (_bytes(*[b"x"] * 17), "INVALID_ARGUMENT", "declares 17 elements"),
    "1500 scales": (_ms(scales=np.ones(1500, np.float32)), "INVALID_ARGUMENT",
                    "declares 1500 elements"),
    "scale 3": (_ms(scales=np.array([3.0], np.float32)), "INVALID_ARGUMENT",
                "Scales must be 1 to 8 values in (0, 2]"),
    "NaN scale": (_ms(scales=np.array([np.nan], np.float32)), "INVALID_ARGUMENT", "finite"),
    "no scales": (_ms(scales=np.zeros(0, np.float32)), "INVALID_ARGUMENT", "Scales must be"),
    "multiscale image over the pixel limit": (_ms(image=np.zeros((1100, 1000, 3), np.uint8)),
                                              "INVALID_ARGUMENT", "declares 3300000 elements"),
    "multiscale image too small": (_ms(image=np.zeros((8, 300, 3), np.uint8)),
                                   "INVALID_ARGUMENT", "shorter side must be at least 16"),
    "multiscale image as string": (_ms(image=np.array([b"x"], dtype=object)),
                                   "INVALID_ARGUMENT", "must be uint8"),
    "GIF with a large frame in a small screen": (_bytes(_gif_big_frame()), "INVALID_ARGUMENT",
                                                 "hold 2260000 pixels"),
    "GIF of 150 frames": (_bytes(_gif_many_frames()), "INVALID_ARGUMENT",
                          "hold 1510000 pixels"),
    "JPEG frame header of 60000x60000": (_bytes(_jpeg_huge_sof()), "INVALID_ARGUMENT",
                                         "3600000000 pixels"),
    "PNG header of 50000x40000": (_bytes(_patched(_image(fmt="PNG"), 16, ">II", 40000,
                                                  50000)),
                                  "INVALID_ARGUMENT", "2000000000 pixels"),
    "BMP header of 30000x30000": (_bytes(_patched(_image(fmt="BMP"), 18, "<ii", 30000,
                                                  -30000)),
                                  "INVALID_ARGUMENT", "900000000 pixels"),
    "JPEG cut after its magic": (_bytes(_image()[:3]), "INVALID_ARGUMENT", "not a JPEG, PNG"),
    "empty bytes": (_bytes(b""), "INVALID_ARGUMENT", "not a JPEG, PNG"),
    "WebP": (_bytes(_image(fmt="WEBP")), "INVALID_ARGUMENT", "not a JPEG, PNG"),
    "8x8 image": (_bytes(_image(8, 8)), "INVALID_ARGUMENT", "shorter side must be at least 16"),
    "bad image after a good one": (_bytes(_image(), b"junk"), "INVALID_ARGUMENT",
                                   "Image 1 of the request"),
    "rank-0 image_bytes": (({"image_bytes": np.array(b"x", dtype=object)}, ""),
                           "INVALID_ARGUMENT", "must have rank 1"),
    "message over 4 MiB": (_bytes(b"\xff\xd8\xff" + b"x" * (5 << 20)), "RESOURCE_EXHAUSTED",
                           ""),
    "JPEG whose body is garbage": (_bytes(_image()[:200] + b"\0" * 50), "INVALID_ARGUMENT",
                                   "JPEG"),
}


@pytest.mark.slow
@pytest.mark.parametrize("name", sorted(HOSTILE))
def test_hostile_request_is_refused_and_the_server_keeps_serving(server, name):
    (inputs, signature), code, text = HOSTILE[name]
    start = time.perf_counter()
    with pytest.raises(grpc.RpcError) as info:
        server.stub.Predict(_request(inputs, signature), timeout=60)
    assert info.value.code().name == code, (name, info.value.details())
    details = info.value.details() or ""
    assert text in details, (name, details)
    assert "stack trace" not in details and "Traceback" not in details, details
    assert time.perf_counter() - start < 20, name
    np.testing.assert_allclose(_describe(server.stub, [_image(seed=42)]), server.reference,
                               atol=1e-6)


@pytest.mark.slow
def test_within_limits_but_unusual_images_are_described(server):
    # an empty batch is answered [0, D], as TF Serving does
    out = server.stub.Predict(_request({"image_bytes": np.zeros(0, dtype=object)}),
                              timeout=60)
    assert [d.size for d in out.outputs["global_descriptor"].tensor_shape.dim] == [0, 512]
    # a very long thin image (16 x 40000) is valid and described
    thin = _encode(np.random.default_rng(1).integers(0, 255, (16, 40000, 3), np.uint8), "PNG")
    row = _describe(server.stub, [thin])
    assert row.shape == (1, 512) and abs(np.linalg.norm(row) - 1) < 1e-4
    # 16 images, the limit, in one request, batched in fours
    rows = _describe(server.stub, [_image(seed=s) for s in range(16)])
    assert rows.shape == (16, 512)


@pytest.mark.slow
def test_signatures_check_the_limits_without_the_server(exported):
    """TF Serving runs the signatures as they are: they refuse alone."""
    loaded = tf.saved_model.load(os.path.join(exported[0], "1"))
    default, multi = loaded.signatures["serving_default"], loaded.signatures["multiscale"]
    cases = [
        (lambda: default(image_bytes=tf.constant([_image()] * 17)),
         "A request may hold at most 16 images; it holds 17"),
        (lambda: default(image_bytes=tf.constant([_gif_big_frame()])), "2260000"),
        (lambda: default(image_bytes=tf.constant([_gif_many_frames()])), "1510000"),
        (lambda: default(image_bytes=tf.constant([_jpeg_huge_sof()])), "3600000000"),
        (lambda: multi(image=tf.zeros([1100, 1000, 3], tf.uint8), scales=tf.ones([1])),
         "1100000"),
        (lambda: multi(image=tf.zeros([64, 64, 3], tf.uint8), scales=tf.ones([9])),
         "scales must be 1 to 8"),
        (lambda: multi(image=tf.zeros([64, 64, 3], tf.uint8), scales=tf.constant([2.5])),
         "scales must be 1 to 8"),
    ]
    for call, text in cases:
        with pytest.raises(tf.errors.InvalidArgumentError) as info:
            call()
        assert text in tf_error_message(info.value), tf_error_message(info.value)
    # a GIF within the limits decodes (the frame walk accepts real GIFs)
    ok = default(image_bytes=tf.constant([_gif_many_frames(n=3), _image(16, 4000)]))
    assert ok["global_descriptor"].shape == (2, 512)


# ------------------------------------------------------ deadlines, fairness

def test_batcher_drops_expired_and_abandoned_tasks_unrun():
    ran = []
    b = batching.Batcher(lambda items: ran.extend(items) or items, max_batch_size=4,
                         batch_timeout_micros=0, num_batch_threads=1)
    (late,) = b.submit([1], deadline=time.monotonic() - 1)
    with pytest.raises(batching.Expired):
        late.result(5)
    (gone,) = b.submit([2], is_active=lambda: False)
    with pytest.raises(batching.Cancelled):
        gone.result(5)
    assert b([3]) == [3] and ran == [3]
    b.close()


def test_a_large_request_does_not_starve_small_ones():
    order, started, release = [], threading.Event(), threading.Event()

    def run(items):
        started.set()
        release.wait(10)  # the first batch holds the thread until the small request is in
        order.append(tuple(items))
        return items

    b = batching.Batcher(run, max_batch_size=4, batch_timeout_micros=0, num_batch_threads=1)
    big = b.submit(list(range(100, 140)))  # 10 tasks of 4
    assert started.wait(10)
    small = b.submit([1])
    release.set()
    assert small[0].result(10) == [1]
    assert [f.result(10) for f in big][-1] == [136, 137, 138, 139]
    assert order.index((1,)) <= 2  # served after at most two of the big request's tasks
    b.close()


@pytest.mark.slow
def test_a_request_past_its_deadline_is_not_finished_by_the_server(server):
    batcher = server.manager.current.batcher
    before = batcher.items_run
    with pytest.raises(grpc.RpcError) as info:
        server.stub.Predict(_request(_bytes(*[_image(seed=s) for s in range(16)])[0]),
                            timeout=0.05)
    assert info.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED
    time.sleep(3)
    assert batcher.items_run - before < 16  # the remaining tasks were dropped unrun
    np.testing.assert_allclose(_describe(server.stub, [_image(seed=42)]), server.reference,
                               atol=1e-6)


# ------------------------------------------------------------ versions

@pytest.mark.slow
def test_a_version_that_failed_to_load_is_reported_and_retried(server, exported):
    base = exported[0]
    broken = os.path.join(base, "2")
    os.makedirs(broken)
    with open(os.path.join(broken, "saved_model.pb"), "wb") as f:
        f.write(b"half written")
    request = get_model_status_pb2.GetModelStatusRequest()
    request.model_spec.name = "dplg"
    deadline = time.time() + 30
    while time.time() < deadline and 2 not in server.manager.failed_versions():
        time.sleep(0.2)
    reply = server.model_stub.GetModelStatus(request, timeout=10)
    states = {s.version: (s.state, s.status.error_message) for s in reply.model_version_status}
    assert states[1][0] == get_model_status_pb2.ModelVersionStatus.AVAILABLE
    assert states[2][0] == get_model_status_pb2.ModelVersionStatus.END and states[2][1]
    # the copy completes: the server tries again and serves version 2
    tmp = os.path.join(base, ".copy")
    shutil.copytree(os.path.join(base, "1"), tmp)
    shutil.rmtree(broken)
    os.rename(tmp, broken)
    deadline = time.time() + 90
    while time.time() < deadline and server.manager.current.version != 2:
        time.sleep(0.3)
    assert server.manager.current.version == 2
    reply = server.model_stub.GetModelStatus(request, timeout=10)
    assert [(s.version, s.state) for s in reply.model_version_status] == [
        (2, get_model_status_pb2.ModelVersionStatus.AVAILABLE)]
    request.model_spec.version.value = 7
    with pytest.raises(grpc.RpcError) as info:
        server.model_stub.GetModelStatus(request, timeout=10)
    assert info.value.code() == grpc.StatusCode.NOT_FOUND
    assert "version 7" in info.value.details()
    np.testing.assert_allclose(_describe(server.stub, [_image(seed=42)]), server.reference,
                               atol=1e-6)


# ------------------------------------------------- a server under a memory cap

@pytest.mark.slow
def test_amplification_requests_under_a_memory_cap(exported, tmp_path):
    """dplg-serve under `prlimit --as` (its own size plus 1.5 GiB): the
    requests that used to expand to gigabytes are refused, and it serves on."""
    port = free_ports()[0]
    cmd = [sys.executable, "-m", "dplg_tf.cli.serve", f"--model_base_path={exported[0]}",
           f"--port={port}", "--rest_api_port=0", "--max_pixels=1000000",
           "--max_images_per_request=16"]
    probe = subprocess.Popen(cmd, env=ENV, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                             text=True)
    channel = grpc.insecure_channel(f"127.0.0.1:{port}")
    health = health_pb2_grpc.HealthStub(channel)

    def wait_serving(proc):
        deadline = time.time() + 120
        while time.time() < deadline and proc.poll() is None:
            try:
                if health.Check(health_pb2.HealthCheckRequest(), timeout=2).status == \
                        health_pb2.HealthCheckResponse.SERVING:
                    return True
            except grpc.RpcError:
                pass
            time.sleep(0.5)
        return False

    try:
        assert wait_serving(probe)
        with open(f"/proc/{probe.pid}/status") as f:
            vm = next(int(line.split()[1]) for line in f if line.startswith("VmPeak"))
    finally:
        probe.send_signal(signal.SIGTERM)
        probe.wait(60)
    cap = vm * 1024 + (3 << 29)
    proc = subprocess.Popen(["prlimit", f"--as={cap}", "--"] + cmd, env=ENV,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        assert wait_serving(proc), proc.stdout.read() if proc.poll() is not None else ""
        stub = prediction_service_pb2_grpc.PredictionServiceStub(channel)
        reference = _describe(stub, [_image(seed=42)])
        for name in ("one byte declared as 20000x20000x3", "one string declared as 100000",
                     "1500 scales", "GIF with a large frame in a small screen",
                     "JPEG frame header of 60000x60000"):
            (inputs, signature), code, _ = HOSTILE[name]
            for _ in range(3):
                with pytest.raises(grpc.RpcError) as info:
                    stub.Predict(_request(inputs, signature), timeout=60)
                assert info.value.code().name == code, name
        assert proc.poll() is None
        np.testing.assert_allclose(_describe(stub, [_image(seed=42)]), reference, atol=1e-6)
    finally:
        channel.close()
        proc.send_signal(signal.SIGTERM)
        proc.wait(60)


# ------------------------------------------------------------ dplg-client

def _client(server, out, *paths, chunk=4):
    return subprocess.Popen([sys.executable, "-m", "dplg_tf.cli.client",
                             f"--server={server.address}", f"--output={out}",
                             f"--chunk_size={chunk}", "--batch_size=2", *map(str, paths)],
                            env=ENV, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


@pytest.fixture(scope="module")
def photos(tmp_path_factory):
    folder = tmp_path_factory.mktemp("photos")
    for i in range(22):
        (folder / f"p{i:02d}.jpg").write_bytes(_image(seed=i))
    (folder / "p05.jpg").write_bytes(b"truncated")          # bad: undecodable
    (folder / "p11.png").write_bytes(_image(8, 8, fmt="PNG"))  # bad: too small
    return folder


@pytest.mark.slow
def test_client_keeps_going_past_bad_images_and_names_them(server, photos, tmp_path):
    out = tmp_path / "x.desc"  # written under exactly this name
    proc = _client(server, out, photos)
    stdout, stderr = proc.communicate(timeout=300)
    assert proc.returncode == 1, stderr
    assert f"to {out}" in stdout and out.is_file() and not (tmp_path / "x.desc.npz").exists()
    descriptors, names, probe = read_npz(str(out))
    assert len(names) == 21 and descriptors.shape == (21, 512) and probe is not None
    with np.load(out) as data:
        bad = dict(zip(data["error_names"].tolist(), data["error_reasons"].tolist()))
    assert set(bad) == {str(photos / "p05.jpg"), str(photos / "p11.png")}
    assert bad[str(photos / "p11.png")].startswith("too small")
    assert "p05.jpg" in stderr and "2 images were not described" in stderr
    assert not os.path.exists(str(out) + ".parts")


@pytest.mark.slow
def test_client_killed_at_random_moments_resumes_without_redoing(server, photos, tmp_path):
    out = tmp_path / "desc.npz"
    rng = random.Random(11)
    mtimes = {}
    for _ in range(6):
        proc = _client(server, out, photos)
        time.sleep(rng.uniform(2.0, 7.0))
        proc.send_signal(signal.SIGKILL)
        proc.communicate()
        parts = str(out) + ".parts"
        if os.path.isdir(parts):
            for name in os.listdir(parts):
                if name.startswith("part-"):
                    mtime = os.stat(os.path.join(parts, name)).st_mtime_ns
                    assert mtimes.setdefault(name, mtime) == mtime, name  # never redone
        if out.is_file():
            break
    if not out.is_file():
        proc = _client(server, out, photos)
        proc.communicate(timeout=300)
    descriptors, names, _ = read_npz(str(out))
    assert len(names) == len(set(names)) == 21
    fresh = tmp_path / "fresh.npz"
    proc = _client(server, fresh, photos)
    proc.communicate(timeout=300)
    again, fresh_names, _ = read_npz(str(fresh))
    assert names == fresh_names
    np.testing.assert_allclose(descriptors, again, atol=1e-6)


def test_unfinished_client_work_of_another_model_is_refused(tmp_path):
    names = [f"n{i}" for i in range(10)]
    run = ChunkedOutput(str(tmp_path / "o.npz"), names, 4, np.ones(8) / np.sqrt(8))
    run.add(0, 4, names[:4], np.ones((4, 8)), [])
    with pytest.raises(ValueError, match="another model"):
        ChunkedOutput(str(tmp_path / "o.npz"), names, 4, -np.ones(8) / np.sqrt(8))
    with pytest.raises(ValueError, match="other inputs"):
        ChunkedOutput(str(tmp_path / "o.npz"), names[:-1], 4, np.ones(8) / np.sqrt(8))
    again = ChunkedOutput(str(tmp_path / "o.npz"), names, 4, np.ones(8) / np.sqrt(8))
    assert again.done[:4].all() and not again.done[4:].any()
    assert again.batches(3) == [(4, 7), (7, 10)]


@pytest.mark.slow
def test_client_output_that_is_a_folder_is_refused(server, photos, tmp_path):
    proc = _client(server, tmp_path, photos)
    _, stderr = proc.communicate(timeout=120)
    assert proc.returncode == 2 and "is a folder" in stderr.strip().splitlines()[-1]
    assert "Traceback" not in stderr


def test_a_large_request_finishes_while_small_ones_keep_arriving():
    """Sustained small traffic: each new request's first task shares the round
    being served with the large request's next task, so the large one advances."""
    b = batching.Batcher(lambda items: time.sleep(0.002) or items, max_batch_size=4,
                         batch_timeout_micros=0, num_batch_threads=1)
    big = b.submit(list(range(1000, 1040)))   # 10 tasks of 4
    small_served, stop = [], threading.Event()

    def traffic():
        while not stop.is_set() and len(small_served) < 400:
            small_served.append(b([len(small_served)], timeout=10)[0])

    threads = [threading.Thread(target=traffic) for _ in range(4)]  # the queue never empties
    for thread in threads:
        thread.start()
    try:
        big[-1].result(30)
        served_before = len(small_served)
    finally:
        stop.set()
        for thread in threads:
            thread.join(30)
        b.close()
    assert [f.result(1) for f in big][-1] == [1036, 1037, 1038, 1039]
    assert served_before < 100, served_before  # not starved until the traffic ends (400)


class _ThreadKiller(BaseException):
    pass


def test_a_dead_batch_thread_answers_its_callers_and_is_replaced():
    calls = []

    def run(items):
        calls.append(items)
        if len(calls) == 1:
            raise _ThreadKiller("boom")
        return items

    b = batching.Batcher(run, max_batch_size=2, batch_timeout_micros=0, num_batch_threads=1)
    (first,) = b.submit([1])
    with pytest.raises(RuntimeError, match="batch thread stopped .*_ThreadKiller"):
        first.result(10)
    assert b([2], timeout=10) == [2] and b.replaced == 1   # a new thread serves
    b.close()


def test_a_caller_never_waits_past_its_deadline():
    release = threading.Event()
    b = batching.Batcher(lambda items: release.wait(10) and items, max_batch_size=1,
                         batch_timeout_micros=0, num_batch_threads=1)
    start = time.monotonic()
    with pytest.raises(batching.Expired, match="while it ran"):
        b([1], deadline=time.monotonic() + 0.3)
    assert time.monotonic() - start < 2.0
    release.set()
    b.close()


def test_error_details_never_echo_unbounded_client_text():
    from dplg_tf.errors import shorten

    assert shorten("dplg") == "'dplg'"
    long = shorten("x" * 10 ** 6)
    assert len(long) < 120 and "1000000 chars" in long


@pytest.mark.slow
def test_a_huge_model_name_is_not_found_with_short_details(server):
    request = _request({"image_bytes": np.array([_image()], dtype=object)})
    request.model_spec.name = "m" * 10 ** 6
    with pytest.raises(grpc.RpcError) as info:
        server.stub.Predict(request, timeout=30)
    assert info.value.code() == grpc.StatusCode.NOT_FOUND
    assert len(info.value.details()) < 300
    assert np.allclose(_describe(server.stub, [_image(seed=42)]), server.reference, atol=1e-5)


@pytest.mark.slow
def test_calls_past_maximum_concurrent_rpcs_are_refused_and_our_bugs_are_internal(exported):
    """At most 2 calls: with 2 held inside the server the 3rd is RESOURCE_EXHAUSTED
    at once; a ValueError of ours is INTERNAL, not the client's fault."""
    import concurrent.futures

    srv = Server(exported[0], "dplg", "127.0.0.1", 0, None, poll_seconds=0.2, limits=LIMITS,
                 workers=4, max_concurrent_rpcs=2).start()
    try:
        deadline = time.time() + 60
        while srv.manager.current is None and time.time() < deadline:
            time.sleep(0.1)
        channel = grpc.insecure_channel(srv.address)
        stub = prediction_service_pb2_grpc.PredictionServiceStub(channel)
        release, inside = threading.Event(), threading.Semaphore(0)
        real_get = srv.manager.get

        def held_get(spec):
            if spec.signature_name == "hold":
                inside.release()
                release.wait(30)
                raise ValueError("a bug of ours")
            return real_get(spec)

        srv.manager.get = held_get
        held = _request({"image_bytes": np.array([_image()], dtype=object)}, "hold")
        with concurrent.futures.ThreadPoolExecutor(2) as pool:
            calls = [pool.submit(stub.Predict, held, timeout=60) for _ in range(2)]
            assert inside.acquire(timeout=30) and inside.acquire(timeout=30)  # both inside
            start = time.time()
            with pytest.raises(grpc.RpcError) as info:
                stub.Predict(_request({"image_bytes": np.array([_image()], dtype=object)}),
                             timeout=30)
            assert info.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
            assert time.time() - start < 5
            release.set()
            codes = []
            for call in calls:
                with pytest.raises(grpc.RpcError) as info:
                    call.result(60)
                codes.append(info.value.code())
        assert codes == [grpc.StatusCode.INTERNAL] * 2
        srv.manager.get = real_get
        assert _describe(stub, [_image(seed=42)]).shape == (1, 512)
        channel.close()
    finally:
        srv.stop(5)


def _claims(height, width):
    """A small JPEG whose frame header claims height x width (not decodable as such)."""
    data = bytearray(_image(16, 16))
    i = data.index(b"\xff\xc0")
    data[i + 5:i + 9] = struct.pack(">HH", height, width)
    return bytes(data)


def test_a_request_of_many_legal_large_images_is_refused_before_decoding():
    """Each header claims 6000 x 6600 (under the 40 Mpx image limit); together
    they exceed the request's pixel budget: INVALID_ARGUMENT, nothing decoded."""
    from dplg_tf import images
    from dplg_tf.serving.requests import ServingError, check_limits

    blob = _claims(6000, 6600)
    assert images.frame_size(blob)[2] == 39_600_000
    check_limits({"image_bytes": np.array([blob] * 5, dtype=object)}, images.DEFAULT_LIMITS)
    with pytest.raises(ServingError, match="hold 237600000 pixels together") as info:
        check_limits({"image_bytes": np.array([blob] * 6, dtype=object)}, images.DEFAULT_LIMITS)
    assert info.value.code == grpc.StatusCode.INVALID_ARGUMENT


@pytest.mark.slow
def test_the_graph_refuses_the_request_pixel_budget_too(exported):
    """serving_default (what TF Serving runs) sums the headers before decoding:
    6 images each under the 1 Mpx limit hold more than the 5 Mpx budget."""
    loaded = tf.saved_model.load(os.path.join(exported[0], "1"))
    with pytest.raises(tf.errors.InvalidArgumentError, match="pixels together"):
        loaded.signatures["serving_default"](image_bytes=tf.constant([_claims(990, 1000)] * 6))
