"""Bulk extraction (dplg-extract on Ray Data), its Parquet shards, and their
use by dplg-index and dplg-eval."""

import json
import os
import secrets
import shutil
import signal
import subprocess
import sys
import tempfile
import time

import numpy as np
import pytest

from conftest import free_ports, image_bytes, small_dplg
from dplg_tf.errors import UserError

ENV = dict(os.environ, RAY_USAGE_STATS_ENABLED="0", TF_CPP_MIN_LOG_LEVEL="2")


@pytest.fixture(scope="module")
def model(tmp_path_factory):
    from dplg_tf.export import export

    base = tmp_path_factory.mktemp("extract_model")
    return export.export(small_dplg(0), str(base / "m"), version=1)


def mixed_blobs():
    """Images of mixed sizes: 4:3, 3:4, 16:9, and two originals that the
    1024 limit brings to one size, plus two bad ones."""
    sizes = [(120, 160), (160, 120), (90, 160), (120, 160), (2000, 1500), (1600, 1200),
             (160, 120), (90, 160), (120, 160)]
    blobs = [image_bytes(h, w, seed=i) for i, (h, w) in enumerate(sizes)]
    return blobs + [b"\xff\xd8\xff not a jpeg", image_bytes(10, 10, fmt="PNG")]


def reference(model, blobs):
    from dplg_tf.retrieval.describers import Describer

    describer = Describer(model=model)
    return np.stack([describer.describe_bytes([b])[0] for b in blobs])


def test_batches_equal_serving_default(model):
    from dplg_tf.retrieval.describers import Describer

    blobs = mixed_blobs()
    worker = Describer(model=model, batch_size=8)
    rows, errors = worker.describe_rows(blobs)
    assert worker.batched
    np.testing.assert_allclose(rows[:9], reference(model, blobs[:9]), atol=1e-5)
    # sizes 120x160 (3), 160x120 (2), 90x160 (2), 768x1024 (2 originals): 4 calls
    assert (worker.calls, worker.described) == (4, 9)
    assert errors[:9] == [None] * 9
    assert errors[9][0] == "undecodable" and errors[10][0] == "too small"
    assert "shorter side" in errors[10][1]


def test_fingerprint_names_the_model(model, tmp_path):
    from dplg_tf.export import export
    from dplg_tf.export.saved_models import fingerprint

    other = export.export(small_dplg(1), str(tmp_path / "other"), version=1)
    assert fingerprint(model) == fingerprint(model) != fingerprint(other)
    assert len(fingerprint(model)) == 64


def write_images(folder, count, size=(96, 128)):
    os.makedirs(folder, exist_ok=True)
    for i in range(count):
        h, w = size if i % 3 else size[::-1]
        with open(os.path.join(folder, f"im{i:03d}.jpg"), "wb") as f:
            f.write(image_bytes(h, w, seed=i))


def extract_cmd(model, out, inputs, *extra):
    return [sys.executable, "-m", "dplg_tf.cli.extract", f"--model={model}",
            f"--output_dir={out}", "--num_cpus=2", *extra, *inputs]


def shard_rows(out):
    from dplg_tf.storage import extraction

    rows, names, _ = extraction.read_all(out)
    return dict(zip(names, rows))


def _sigkill_when(cmd, ready, seconds=240, may_finish=False):
    """Start `cmd` (dplg-extract) and SIGKILL its driver once `ready()` holds;
    True if killed. A run that ends first fails the test unless `may_finish`."""
    proc = subprocess.Popen(cmd, env=ENV, stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL, start_new_session=True)
    deadline = time.time() + seconds
    try:
        while time.time() < deadline and proc.poll() is None and not ready():
            time.sleep(0.01)
        if may_finish and proc.poll() is not None:
            return False
        assert proc.poll() is None, "the run ended before it could be killed"
        os.kill(proc.pid, signal.SIGKILL)
        return True
    finally:
        proc.wait(30)


@pytest.mark.slow
def test_resume_after_driver_sigkill(model, tmp_path):
    """Killed halfway, the rerun keeps the finished shards untouched and does
    the rest; each image is there once; bad images are listed."""
    from dplg_tf.storage import extraction

    images = tmp_path / "images"
    write_images(str(images), 40, size=(768, 1024))
    (images / "broken.jpg").write_bytes(b"\xff\xd8\xff\xe0 cut")
    out = str(tmp_path / "out")
    cmd = extract_cmd(model, out, [str(images)], "--shard_size=4", "--batch_size=2")
    _sigkill_when(cmd, lambda: os.path.isdir(out + "/shards")
                  and len(extraction.done_shards(out, 11)) >= 2)
    kept = {i: (open(extraction.shard_path(out, i), "rb").read(),
                os.stat(extraction.shard_path(out, i)).st_mtime_ns)
            for i in extraction.done_shards(out, 11)}
    assert 2 <= len(kept) < 11, sorted(kept)
    from dplg_tf.bulk import leftovers

    session = json.load(open(os.path.join(out, leftovers.RECORD)))["session_dir"]
    time.sleep(5)   # the raylet and workers end with the driver; its agents do not
    left = leftovers.session_processes(session)
    result = subprocess.run(cmd, env=ENV, capture_output=True, text=True, timeout=300)
    assert result.returncode == 1, result.stderr[-2000:]   # one bad image
    if left:
        assert f"stopped {len(left)} Ray processes left running by a killed run" in \
            result.stderr
    assert leftovers.session_processes(session) == []
    assert not os.path.exists(os.path.join(out, leftovers.RECORD))
    for i, (data, mtime) in kept.items():
        assert open(extraction.shard_path(out, i), "rb").read() == data
        assert os.stat(extraction.shard_path(out, i)).st_mtime_ns == mtime
    rows = shard_rows(out)
    assert len(rows) == 40 and len(set(rows)) == 40
    errors = extraction.read_errors(out)
    assert [n for n, _ in errors] == [str(images / "broken.jpg")]
    progress = json.load(open(os.path.join(out, "progress.json")))
    assert progress["state"] == "done" and progress["shards_done"] == 11
    import pyarrow.parquet as pq

    from dplg_tf.export.saved_models import fingerprint

    meta = pq.read_schema(extraction.shard_path(out, 0)).metadata
    assert meta[b"dplg.fingerprint"].decode() == fingerprint(model)
    manifest = extraction.read_manifest(out)
    assert manifest["fingerprint"] == fingerprint(model) and manifest["dim"] == 512
    np.testing.assert_allclose(json.loads(meta[b"dplg.probe"]), manifest["probe"])
    names = sorted(rows)[:3]
    np.testing.assert_allclose(np.stack([rows[n] for n in names]), reference(
        model, [open(n, "rb").read() for n in names]), atol=1e-5)

    # another model, other scales: refused, the folder untouched
    from dplg_tf.export import export

    other = export.export(small_dplg(1), str(tmp_path / "other"), version=1)
    refused = subprocess.run(extract_cmd(other, out, [str(images)], "--shard_size=4"),
                             env=ENV, capture_output=True, text=True, timeout=300)
    assert refused.returncode == 2 and "another model" in refused.stderr
    refused = subprocess.run(cmd + ["--scales=1.0"], env=ENV, capture_output=True, text=True,
                             timeout=300)
    assert refused.returncode == 2 and "other scales" in refused.stderr


@pytest.mark.slow
def test_a_kill_inside_a_shard_keeps_the_rows_saved_so_far(model, tmp_path):
    """One shard of 30 images, its rows saved after every batch
    (--commit_seconds=0): killed inside the shard, the rerun describes only
    the images its partial file does not hold, and the shard comes out whole."""
    import re

    from dplg_tf.storage import extraction

    import shutil

    images = tmp_path / "images"
    write_images(str(images), 30, size=(384, 512))
    out = str(tmp_path / "out")
    cmd = extract_cmd(model, out, [str(images)], "--shard_size=100", "--batch_size=2",
                      "--commit_seconds=0")
    partial = extraction.shard_path(out, 0, "partial")

    def six_rows_saved():
        import pyarrow.parquet as pq

        try:
            return pq.ParquetFile(partial).metadata.num_rows >= 6
        except (OSError, ValueError):
            return False

    # when the driver falls behind the workers it takes their rows in a burst, and
    # the partial file may live for less than a poll: then the run is tried again
    for _ in range(3):
        shutil.rmtree(out, ignore_errors=True)
        if _sigkill_when(cmd, six_rows_saved, may_finish=True):
            break
    else:
        pytest.fail("three runs ended before a partial file of 6 rows was seen")
    assert not os.path.exists(extraction.shard_path(out, 0))
    saved = extraction.read_partial(out, 0, sorted(str(p) for p in images.iterdir()),
                                    extraction.read_manifest(out))
    assert 6 <= len(saved) < 30
    result = subprocess.run(cmd, env=ENV, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-2000:]
    kept = int(re.search(r"(\d+) images of unfinished shards kept", result.stderr).group(1))
    assert kept >= len(saved)
    progress = json.load(open(os.path.join(out, "progress.json")))
    assert progress["images_total"] == 30 - kept and progress["images_done"] == 30 - kept
    assert not os.path.exists(partial)
    rows = shard_rows(out)
    assert len(rows) == 30
    names = sorted(rows)
    np.testing.assert_allclose(np.stack([rows[n] for n in names[:4]]), reference(
        model, [open(n, "rb").read() for n in names[:4]]), atol=1e-5)


def test_partial_files_round_trip_and_a_foreign_one_is_set_aside(tmp_path):
    from dplg_tf.storage import extraction

    out = str(tmp_path)
    manifest = {"dim": 4, "fingerprint": "sha256:abc"}
    names = ["a.jpg", "b.jpg", "c.jpg"]
    rows = {0: (np.ones(4, np.float32), None), 2: (np.zeros(4, np.float32),
                                                   ("undecodable", "cut short"))}
    extraction.write_partial(out, 0, names, rows, manifest)
    back = extraction.read_partial(out, 0, names, manifest)
    assert sorted(back) == [0, 2] and back[2][1] == ("undecodable", "cut short")
    np.testing.assert_array_equal(back[0][0], np.ones(4))
    for other_names, other in [(["x.jpg", "b.jpg", "c.jpg"], manifest),
                               (names, dict(manifest, fingerprint="sha256:other")),
                               (names[:2], manifest)]:
        extraction.write_partial(out, 0, names, rows, manifest)
        damaged = []
        assert extraction.read_partial(out, 0, other_names, other, damaged) == {}
        assert damaged and os.path.exists(extraction.shard_path(out, 0, "partial") + ".damaged")
    with open(extraction.shard_path(out, 1, "partial"), "wb") as f:
        f.write(b"PAR1 not really")
    damaged = []
    assert extraction.read_partial(out, 1, names, manifest, damaged) == {} and damaged
    assert extraction.read_partial(out, 5, names, manifest) == {}


def test_index_and_eval_read_an_extraction_folder(model, tmp_path):
    """dplg-index --descriptors OUT streams the shards and checks the probe;
    eval_run.load_distractors takes the folder for the +1M setting."""
    from dplg_tf.retrieval import eval_run
    from dplg_tf.storage import extraction
    from dplg_tf.export.saved_models import fingerprint
    from dplg_tf.retrieval.describers import Describer
    from dplg_tf.search.index import DescriptorIndex

    out = str(tmp_path / "out")
    describer = Describer(model=model)
    info = {"probe": describer.probe().tolist(), "scales": describer.scales}
    names = [f"img{i}.jpg" for i in range(7)]
    manifest = {"model": model, "fingerprint": fingerprint(model), "probe": info["probe"],
                "dim": 512, "requested_scales": None, "limits": {}, "shard_size": 3,
                "scales": info["scales"],
                "listing_sha256": extraction.listing_hash(names), "images": 7, "num_shards": 3}
    extraction.open_folder(out, manifest, names)
    rng = np.random.default_rng(0)
    rows = rng.normal(size=(7, 512)).astype(np.float32)
    for s in range(2):
        part = slice(3 * s, 3 * s + 3)
        errors = [None, ("too small", "too small: x"), None] if s == 1 else [None] * 3
        extraction.write_shard(out, s, names[part], rows[part], errors, manifest)
    with pytest.raises(UserError, match="1 of 3 shards are missing"):
        extraction.read_all(out)
    extraction.write_shard(out, 2, names[6:], rows[6:], [None], manifest)

    index_dir = str(tmp_path / "idx")
    run = subprocess.run([sys.executable, "-m", "dplg_tf.cli.index", f"--index_dir={index_dir}",
                          f"--descriptors={out}"], env=ENV, capture_output=True, text=True,
                         timeout=300)
    assert run.returncode == 0, run.stderr[-2000:]
    index = DescriptorIndex.load(index_dir)
    assert index.names == [n for n in names if n != "img4.jpg"]
    np.testing.assert_allclose(index.vectors(np.arange(6)), np.delete(
        rows, 4, 0) / np.linalg.norm(np.delete(rows, 4, 0), axis=1, keepdims=True), atol=1e-6)
    np.testing.assert_allclose(index.probe, info["probe"], atol=1e-6)
    # dplg-search takes the folder's described images as its queries
    hits = str(tmp_path / "hits.json")
    run = subprocess.run([sys.executable, "-m", "dplg_tf.cli.search", f"--index_dir={index_dir}",
                          f"--descriptors={out}", "--top_k=1", f"--output={hits}"], env=ENV,
                         capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stderr[-2000:]
    with open(hits) as f:
        found = json.load(f)["results"]
    assert [h["query"] for h in found] == index.names
    assert all(h["results"][0]["name"] == h["query"] for h in found)

    used = info["scales"]
    loaded = eval_run.load_distractors(out, 512, np.asarray(info["probe"]), used)
    assert loaded.shape == (6, 512)
    with pytest.raises(UserError, match="another model"):
        eval_run.load_distractors(out, 512, -np.asarray(info["probe"]), used)
    with pytest.raises(UserError, match="described at scales"):
        eval_run.load_distractors(out, 512, np.asarray(info["probe"]), used[:2])
    # a rerun into the folder with other inputs is refused
    with pytest.raises(UserError, match="another input listing"):
        extraction.open_folder(out, dict(manifest, listing_sha256="0"), names)


@pytest.mark.slow
def test_two_node_cluster_matches_local_run(model, tmp_path):
    """A head and a second node (both `ray start` on 127.0.0.1, one actor
    each), joined with --ray_address, give serving_default's descriptors."""
    images = tmp_path / "images"
    write_images(str(images), 12)
    ports = iter(free_ports(2 * 27 + 1))
    port = next(ports)

    def own_ports():
        # every port a node opens, drawn here: Ray's defaults (worker ports
        # 10002-19999, 10001, 52365) would collide with the head's port or
        # with what a killed run left behind
        fixed = ["node-manager", "object-manager", "dashboard-agent-listen",
                 "dashboard-agent-grpc", "metrics-export", "runtime-env-agent",
                 "ray-client-server"]
        return [f"--{name}-port={next(ports)}" for name in fixed] + [
            "--worker-port-list=" + ",".join(str(next(ports)) for _ in range(20))]

    ray = os.path.join(os.path.dirname(sys.executable), "ray")
    # a short temp dir (Unix socket paths are limited to ~107 bytes); every
    # process of the cluster and its driver share one token
    temp = tempfile.mkdtemp(prefix="ray", dir="/tmp")
    env = dict(ENV, RAY_AUTH_MODE="token", RAY_AUTH_TOKEN=secrets.token_hex(32))
    common = ["--num-cpus=2", "--disable-usage-stats"]
    try:
        for node in (["--head", f"--port={port}", f"--temp-dir={temp}",
                      "--include-dashboard=false"], [f"--address=127.0.0.1:{port}"]):
            start = subprocess.run([ray, "start", "--node-ip-address=127.0.0.1", *node,
                                    *own_ports(), *common], env=env, capture_output=True,
                                   text=True, timeout=120)
            assert start.returncode == 0, (start.stdout + start.stderr)[-3000:]
        cluster = str(tmp_path / "cluster")
        run = subprocess.run(
            [sys.executable, "-m", "dplg_tf.cli.extract", f"--model={model}",
             f"--output_dir={cluster}", f"--ray_address=127.0.0.1:{port}", "--workers=2",
             "--cpus_per_worker=1.5", "--shard_size=5", str(images)],
            env=env, capture_output=True, text=True, timeout=300)
        assert run.returncode == 0, run.stderr[-2000:]
        assert json.load(open(os.path.join(cluster, "progress.json")))["state"] == "done"
    finally:
        subprocess.run([ray, "stop", "--force"], env=env, capture_output=True, timeout=120)
        shutil.rmtree(temp, ignore_errors=True)
    rows = shard_rows(cluster)
    names = sorted(str(p) for p in images.iterdir())
    assert sorted(rows) == names
    np.testing.assert_allclose(np.stack([rows[n] for n in names]), reference(
        model, [open(n, "rb").read() for n in names]), atol=1e-5)


def test_inputs_are_listed_sorted_once(tmp_path):
    """Folders, globs, single files and .txt listings, sorted, each name once."""
    from dplg_tf.bulk.job import list_inputs

    write_images(str(tmp_path / "a"), 3)
    write_images(str(tmp_path / "b" / "deep"), 2)
    (tmp_path / "a" / "notes.md").write_text("not an image")
    listing = tmp_path / "list.txt"
    listing.write_text(f"# a comment\n{tmp_path}/b/deep/im000.jpg\n\n/elsewhere/x.jpg\n")
    names, problems = list_inputs([str(tmp_path / "a"), str(tmp_path / "b" / "*" / "*.jpg"),
                                   str(listing), str(tmp_path / "a" / "im001.jpg")])
    expected = sorted([f"{tmp_path}/a/im00{i}.jpg" for i in range(3)]
                      + [f"{tmp_path}/b/deep/im00{i}.jpg" for i in range(2)]
                      + ["/elsewhere/x.jpg"])
    assert names == expected and problems == []
    with pytest.raises(UserError, match="matches no file"):
        list_inputs([str(tmp_path / "c" / "*.jpg")])
    with pytest.raises(UserError, match="neither an image file nor a folder"):
        list_inputs([str(tmp_path / "missing")])


def test_read_rows_sorts_bad_files_by_reason(tmp_path):
    """Each bad file gets its reason under the same Limits as the server."""
    import dataclasses

    from dplg_tf.bulk.reading import read_rows
    from dplg_tf.images import DEFAULT_LIMITS

    good = tmp_path / "good.jpg"
    good.write_bytes(image_bytes(64, 64))
    big = tmp_path / "big.png"
    big.write_bytes(image_bytes(300, 300, fmt="PNG"))
    small = tmp_path / "small.png"
    small.write_bytes(image_bytes(8, 40, fmt="PNG"))
    junk = tmp_path / "junk.jpg"
    junk.write_bytes(b"GIF87a")
    limits = dataclasses.replace(DEFAULT_LIMITS, max_pixels=200 * 200)
    paths = [str(p) for p in (good, big, small, junk, tmp_path / "gone.jpg")]
    blobs, errors = read_rows(paths, limits)
    assert blobs[0] == good.read_bytes() and errors[0] is None
    assert [e[0] for e in errors[1:]] == ["too large", "too small", "undecodable",
                                          "unreadable"]
    assert all(b is None for b in blobs[1:])
    assert "the limit is 40000" in errors[1][1]


@pytest.mark.slow
def test_server_describer_matches_the_local_batches(model):
    """--server: the same descriptors through dplg-serve; a batch holding an
    image the model refuses is retried image by image."""
    from dplg_tf.retrieval.describers import Describer
    from dplg_tf.serving import batching
    from dplg_tf.serving.server import Server

    params = dict(batching.DEFAULTS, max_batch_size=4, batch_timeout_micros=2000)
    srv = Server(os.path.dirname(model), "dplg", "127.0.0.1", 0, params,
                 poll_seconds=0.2).start()
    try:
        deadline = time.time() + 60
        while srv.manager.current is None and time.time() < deadline:
            time.sleep(0.1)
        # the header check passes; the decoder refuses what follows it
        cut = image_bytes(96, 128, seed=5)[:200]
        blobs = [image_bytes(96, 128, seed=1), cut, image_bytes(128, 96, seed=2)]
        worker = Describer(server=srv.address, batch_size=8)
        rows, errors = worker.describe_rows(blobs)
        local, _ = Describer(model=model).describe_rows([blobs[0], blobs[2]])
        np.testing.assert_allclose(rows[[0, 2]], local, atol=1e-5)
        assert errors[0] is None and errors[2] is None
        assert errors[1][0] == "undecodable" and "refused by the model" in errors[1][1]
        worker.close()
    finally:
        srv.stop(5)


def test_uris_are_listed_and_read_through_pyarrow(tmp_path):
    """A URI input (here file://, the same code as s3:// or gs://) is listed
    recursively and read through pyarrow's filesystem."""
    from dplg_tf.bulk.reading import read_rows
    from dplg_tf.bulk.job import list_inputs
    from dplg_tf.images import DEFAULT_LIMITS

    write_images(str(tmp_path / "a" / "b"), 2)
    (tmp_path / "a" / "notes.txt").write_text("not an image")
    names, _ = list_inputs([f"file://{tmp_path}/a"])
    assert names == [f"file://{tmp_path}/a/b/im00{i}.jpg" for i in range(2)]
    assert list_inputs([f"file://{tmp_path}/a/b/*1.jpg"])[0] == names[1:]
    blobs, errors = read_rows(names + [f"file://{tmp_path}/gone.jpg"], DEFAULT_LIMITS)
    assert blobs[0] == (tmp_path / "a" / "b" / "im000.jpg").read_bytes()
    assert errors[:2] == [None, None] and errors[2][0] == "unreadable"


def test_leftovers_of_a_dead_driver_are_stopped_and_a_live_one_refuses(tmp_path):
    from dplg_tf.bulk import leftovers

    out = str(tmp_path / "out")
    session = str(tmp_path / "session_2026-12-02_00-00-00_1_2")
    os.makedirs(session)
    orphan = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)", session])
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    os.makedirs(out)
    with open(os.path.join(out, leftovers.RECORD), "w") as f:
        json.dump({"driver": dead.pid, "session_dir": session}, f)
    assert leftovers.reap(out) == 1
    assert orphan.wait(10) == -signal.SIGKILL
    assert not os.path.exists(os.path.join(out, leftovers.RECORD))
    live = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)", "dplg-extract"])
    deadline = time.monotonic() + 30   # until exec: a forked child shows our command line
    while "dplg-extract" not in leftovers._cmdline(live.pid) and time.monotonic() < deadline:
        time.sleep(0.01)
    try:
        with open(os.path.join(out, leftovers.RECORD), "w") as f:
            json.dump({"driver": live.pid, "session_dir": session}, f)
        with pytest.raises(UserError, match=f"Another dplg-extract \\(pid {live.pid}\\)"):
            leftovers.reap(out)
    finally:
        live.kill()
        live.wait()
    with open(os.path.join(out, leftovers.RECORD), "w") as f:
        f.write("{not json")
    assert leftovers.reap(out) == 0 and not os.path.exists(os.path.join(out, leftovers.RECORD))
