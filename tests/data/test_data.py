"""Training data: the synthetic set, the TFRecord builder, the input pipeline,
and the Revisited loaders."""

import hashlib
import io
import json
import os
import pickle
import subprocess
import sys

import numpy as np
import pytest
import tensorflow as tf
from PIL import Image

from dplg_tf.config import base_config
from dplg_tf.errors import UserError
from dplg_tf.data import pipeline, revisited, sources, synthetic, tfrecords
from dplg_tf.storage import safe_pickle

SMALL = dict(num_landmarks=4, views_per_landmark=6, num_eval_landmarks=3,
             queries_per_landmark=2, db_per_landmark=6, num_distractors=5,
             width=128, height=96, progress=False)


@pytest.fixture(scope="module")
def synthetic_root(tmp_path_factory):
    root = str(tmp_path_factory.mktemp("synthetic"))
    synthetic.generate(root, seed=3, num_workers=1, **SMALL)
    return root


def _digest(root):
    h = hashlib.sha256()
    for dirpath, _, files in sorted(os.walk(root)):
        for name in sorted(files):
            if name == "synthetic.json":  # holds the run time
                continue
            path = os.path.join(dirpath, name)
            h.update(os.path.relpath(path, root).encode())
            with open(path, "rb") as f:
                h.update(f.read())
    return h.hexdigest()


# ---------------------------------------------------------------- synthetic

def test_synthetic_is_deterministic_with_any_worker_count(synthetic_root, tmp_path):
    again = str(tmp_path / "again")
    synthetic.generate(again, seed=3, num_workers=2, **SMALL)
    assert _digest(again) == _digest(synthetic_root)
    other = str(tmp_path / "other")
    synthetic.generate(other, seed=4, num_workers=1, **SMALL)
    assert _digest(other) != _digest(synthetic_root)


def test_synthetic_layout_and_ground_truth(synthetic_root):
    train = os.path.join(synthetic_root, "train")
    assert sorted(os.listdir(train)) == [f"landmark_{k:04d}" for k in range(4)]
    assert all(len(os.listdir(os.path.join(train, d))) == 6 for d in os.listdir(train))
    ds = revisited.load_dataset(synthetic_root, "synthetic")
    assert len(ds.qimlist) == 6 and len(ds.imlist) == 3 * 6 + 5
    for i, g in enumerate(ds.gnd):
        assert len(g["easy"]) >= 1 and len(g["hard"]) >= 1 and len(g["junk"]) >= 1
        groups = [set(g["easy"]), set(g["hard"]), set(g["junk"])]
        assert not (groups[0] & groups[1] or groups[0] & groups[2] or groups[1] & groups[2])
        # positives of a query are views of its own landmark only
        lm = ds.qimlist[i].split("_")[1]
        assert all(ds.imlist[j].split("_")[1] == lm for j in set().union(*groups))
        x1, y1, x2, y2 = ds.bbx(i)
        assert 0 <= x1 < x2 <= 128 and 0 <= y1 < y2 <= 96
        crop = ds.load_query(i)
        assert crop.shape == (round(y2) - round(y1), round(x2) - round(x1), 3)
        assert ds.label(i, sorted(g["easy"])[0]) == "positive"
        assert ds.label(i, sorted(g["hard"])[0]) == "positive"
        assert ds.label(i, sorted(g["hard"])[0], "easy") == "junk"
        assert ds.label(i, sorted(g["junk"])[0]) == "junk"
    distractors = [j for j, n in enumerate(ds.imlist) if n.startswith("distractor")]
    assert len(distractors) == 5
    assert not any(set(distractors) & set(g["easy"] + g["hard"] + g["junk"]) for g in ds.gnd)
    assert ds.label(0, distractors[0]) == "negative"


def test_synthetic_views_look_alike_more_within_a_landmark(synthetic_root):
    """A sanity check of the data, not the model: the junk views are the
    smallest, the easy views show more of the landmark than the hard ones."""
    ds = revisited.load_dataset(synthetic_root, "synthetic")
    ok_easy, _ = revisited.protocol_lists(ds.gnd[0], "easy")
    ok_hard, junk_hard = revisited.protocol_lists(ds.gnd[0], "hard")
    assert set(ok_easy) == set(ds.gnd[0]["easy"])
    assert set(junk_hard) == set(ds.gnd[0]["junk"]) | set(ds.gnd[0]["easy"])
    medium_ok, medium_junk = revisited.protocol_lists(ds.gnd[0], "medium")
    assert set(medium_ok) == set(ds.gnd[0]["easy"]) | set(ds.gnd[0]["hard"])
    assert set(medium_junk) == set(ds.gnd[0]["junk"])


# --------------------------------------------------------- restricted pickle

def test_restricted_unpickler_accepts_plain_data_and_arrays(tmp_path):
    cfg = {"imlist": ["a", "b"], "qimlist": ["q"],
           "gnd": [{"bbx": np.array([1.0, 2.0, 30.5, 40.0]), "easy": np.array([0]),
                    "hard": [1], "junk": [], "extra": (1, 2.5, None, True, {3})}]}
    for protocol in (2, 4, 5):
        path = tmp_path / f"gnd_{protocol}.pkl"
        path.write_bytes(pickle.dumps(cfg, protocol=protocol))
        loaded = revisited.safe_load_pickle(str(path))
        np.testing.assert_array_equal(loaded["gnd"][0]["bbx"], cfg["gnd"][0]["bbx"])
        assert loaded["gnd"][0]["extra"] == (1, 2.5, None, True, {3})


class _Evil:
    def __reduce__(self):
        return (os.system, ("echo pwned > /dev/null",))


@pytest.mark.parametrize("payload", [
    _Evil(), {"gnd": [{"bbx": _Evil()}]}, [tfrecords.BuildError("x")],
])
def test_restricted_unpickler_refuses_other_objects(tmp_path, payload):
    path = tmp_path / "gnd_bad.pkl"
    path.write_bytes(pickle.dumps(payload))
    with pytest.raises(safe_pickle.UnsafePickleError, match="which a ground-truth file never"):
        revisited.safe_load_pickle(str(path))


def test_missing_gnd_file_says_how_to_get_it(tmp_path):
    with pytest.raises(FileNotFoundError, match="download --data_root"):
        revisited.load_dataset(str(tmp_path), "roxford5k")
    with pytest.raises(FileNotFoundError, match="gnd_holidays.pkl does not exist"):
        revisited.load_dataset(str(tmp_path), "holidays")
    with pytest.raises(ValueError, match="plain folder name"):
        revisited.load_dataset(str(tmp_path), "../etc")


# -------------------------------------------------------------- the builder

@pytest.fixture
def messy_tree(tmp_path):
    """Three classes of good JPEGs, a PNG, a CMYK JPEG and four bad files."""
    root = tmp_path / "images"
    rng = np.random.default_rng(0)
    good = []
    for c, cls in enumerate(["beta", "alpha", "gamma"]):
        (root / cls).mkdir(parents=True)
        for i in range(5 + c):
            path = root / cls / f"img{i}.jpg"
            Image.fromarray(rng.integers(0, 255, (40, 60, 3), dtype=np.uint8)).save(path)
            good.append(str(path))
    png = root / "alpha" / "picture.png"
    Image.fromarray(rng.integers(0, 255, (30, 50, 4), dtype=np.uint8), "RGBA").save(png)
    cmyk = root / "gamma" / "cmyk.jpg"
    Image.fromarray(rng.integers(0, 255, (30, 30, 4), dtype=np.uint8), "CMYK").save(cmyk)
    good += [str(png), str(cmyk)]
    full = io.BytesIO()
    Image.fromarray(rng.integers(0, 255, (64, 64, 3), dtype=np.uint8)).save(full, "JPEG")
    bad = {
        "beta/truncated.jpg": full.getvalue()[: len(full.getvalue()) // 2],
        "beta/zero.jpg": b"",
        "alpha/notes.jpg": b"this is a text file, not an image\n",
        "gamma/garbage.jpg": b"\xff\xd8\xff\xe0" + bytes(rng.integers(0, 255, 500, dtype=np.uint8)),
    }
    for rel, data in bad.items():
        (root / rel).write_bytes(data)
    (root / "alpha" / "README.txt").write_text("ignored: not an image extension")
    return str(root), sorted(good), sorted(str(root / r) for r in bad)


def _read_shards(pattern):
    records = []
    for path in sorted(tf.io.gfile.glob(pattern)):
        for raw in tf.data.TFRecordDataset(path):
            ex = tf.train.Example.FromString(raw.numpy())
            f = ex.features.feature
            records.append(dict(
                id=os.fsdecode(f["image/id"].bytes_list.value[0]),  # names' bytes kept
                label=f["image/class/label"].int64_list.value[0],
                height=f["image/height"].int64_list.value[0],
                width=f["image/width"].int64_list.value[0],
                image=f["image/encoded"].bytes_list.value[0],
                fmt=f["image/format"].bytes_list.value[0],
                channels=f["image/channels"].int64_list.value[0],
                colorspace=f["image/colorspace"].bytes_list.value[0]))
    return records


def test_builder_splits_relabels_and_reports(messy_tree, tmp_path):
    root, good, bad = messy_tree
    out = str(tmp_path / "shards")
    items, ignored = tfrecords.list_image_dir(root)
    summary = tfrecords.build(out, items, num_shards=3, validation_fraction=0.25, seed=1,
                              num_workers=2, progress=False, ignored=ignored)
    train, val = _read_shards(out + "/train-*"), _read_shards(out + "/validation-*")
    ids = [r["id"] for r in train + val]
    expected = sorted(f"{os.path.basename(os.path.dirname(p))}/"
                      f"{os.path.splitext(os.path.basename(p))[0]}" for p in good)
    assert sorted(ids) == expected  # every good image in exactly one split
    assert summary["train_records"] == len(train) and summary["validation_records"] == len(val)
    # labels follow the sorted class names, as relabeling.csv says
    with open(os.path.join(out, "relabeling.csv")) as f:
        rows = [line.strip().split(",") for line in f]
    assert rows == [["new_label", "old_label"], ["0", "alpha"], ["1", "beta"], ["2", "gamma"]]
    mapping = {old: int(new) for new, old in rows[1:]}
    for r in train + val:
        assert r["label"] == mapping[r["id"].split("/")[0]]
        img = Image.open(io.BytesIO(r["image"]))
        assert img.format == "JPEG" and img.mode == "RGB"
        assert img.size == (r["width"], r["height"])
        assert (r["fmt"], r["channels"], r["colorspace"]) == (b"JPEG", 3, b"RGB")
    # per class, max(1, floor(0.25 n)) of the n non-empty image files go to
    # validation; the corrupt ones among them are then skipped
    counts = {c: sum(1 for n in os.listdir(os.path.join(root, c))
                     if n.endswith((".jpg", ".png")) and os.path.getsize(os.path.join(root, c, n)))
              for c in os.listdir(root)}
    _, expected_val = tfrecords.split(tfrecords.present(items)[0],
                                      tfrecords.relabel(items), 0.25, 1)
    assert len(expected_val) == sum(max(1, int(0.25 * n)) for n in counts.values())
    expected_val_ids = {f"{p.split('/')[-2]}/{os.path.splitext(p.split('/')[-1])[0]}"
                        for p, _, _ in expected_val if p in good}
    assert {r["id"] for r in val} == expected_val_ids
    with open(os.path.join(out, "build_report.json")) as f:
        report = json.load(f)
    assert sorted(b["path"] for b in report["bad"]) == bad
    reasons = {os.path.basename(b["path"]): b["reason"] for b in report["bad"]}
    assert reasons["zero.jpg"] == "empty file"
    assert reasons["notes.jpg"] == "not an image"
    assert reasons["truncated.jpg"].startswith("corrupt image")
    assert report["ignored_non_image_files"] == 1
    with open(os.path.join(out, "dataset_info.json")) as f:
        info = json.load(f)
    assert info["num_classes"] == 3
    assert info["splits"]["train"]["num_records"] == len(train)


def test_builder_rerun_rewrites_only_the_missing_shard(messy_tree, tmp_path):
    root, _, _ = messy_tree
    out = str(tmp_path / "shards")
    items, _ = tfrecords.list_image_dir(root)
    tfrecords.build(out, items, num_shards=3, seed=1, num_workers=2, progress=False,
                    validation_fraction=0.2)
    shards = sorted(n for n in os.listdir(out) if n.startswith(("train-", "validation-")))
    assert shards == ["train-00000-of-00003", "train-00001-of-00003", "train-00002-of-00003",
                      "validation-00000-of-00001"]
    before = {n: (os.stat(os.path.join(out, n)).st_mtime_ns,
                  open(os.path.join(out, n), "rb").read()) for n in shards}
    os.remove(os.path.join(out, "train-00001-of-00003"))
    summary = tfrecords.build(out, items, num_shards=3, seed=1, num_workers=2, progress=False,
                              validation_fraction=0.2)
    assert summary["shards_written"] == 1
    for n in shards:
        data = open(os.path.join(out, n), "rb").read()
        assert data == before[n][1]
        if n != "train-00001-of-00003":
            assert os.stat(os.path.join(out, n)).st_mtime_ns == before[n][0]
    # a different build into the same folder is refused
    with pytest.raises(tfrecords.BuildError, match="different build"):
        tfrecords.build(out, items, num_shards=2, seed=1, progress=False)


def test_an_unfinished_shard_is_not_taken_as_complete(messy_tree, tmp_path):
    root, _, _ = messy_tree
    out = str(tmp_path / "shards")
    items, _ = tfrecords.list_image_dir(root)
    tfrecords.build(out, items, num_shards=2, seed=0, progress=False)
    # a kill between writing and renaming leaves only atomic_path's temporary
    os.remove(os.path.join(out, "train-00000-of-00002"))
    partial = os.path.join(out, tfrecords.STATE_DIR, ".train-00000-of-00002.0123456789ab.tmp")
    with open(partial, "wb") as f:
        f.write(b"partial")
    summary = tfrecords.build(out, items, num_shards=2, seed=0, progress=False)
    assert summary["shards_written"] == 1
    assert len(_read_shards(out + "/train-00000-of-00002")) > 0
    assert not os.path.exists(partial)   # a killed build's temporary is cleared


def test_a_jpeg_whose_name_is_not_utf8_is_kept_and_its_id_names_the_file(tmp_path):
    root = tmp_path / "images"
    rng = np.random.default_rng(1)
    for cls in ("a", "b"):
        (root / cls).mkdir(parents=True)
        for i in range(2):
            Image.fromarray(rng.integers(0, 255, (40, 48, 3), dtype=np.uint8)).save(
                root / cls / f"{i}.jpg")
    raw = os.path.join(os.fsencode(root / "a"), b"caf\xff.jpg")
    buf = io.BytesIO()
    Image.fromarray(rng.integers(0, 255, (40, 48, 3), dtype=np.uint8)).save(buf, "JPEG")
    with open(raw, "wb") as f:
        f.write(buf.getvalue())
    bad_class = os.path.join(os.fsencode(root), b"cl\xffss")
    os.mkdir(bad_class)
    problems = []
    items, _ = tfrecords.list_image_dir(str(root), problems)
    assert [reason for _, reason in problems] == ["folder name is not valid UTF-8"]
    out = str(tmp_path / "shards")
    summary = tfrecords.build(out, items, num_shards=1, progress=False)
    assert summary["train_records"] == 5 and summary["bad_files"] == 0
    records = {r["id"]: r for r in _read_shards(out + "/train-*")}
    kept = records[os.fsdecode(b"a/caf\xff")]   # the id is the name's bytes as on disk
    assert os.fsencode(os.path.join(str(root), kept["id"] + ".jpg")) == raw
    assert kept["image"] == buf.getvalue() and kept["label"] == 0


def test_gldv2_csv_layouts(tmp_path):
    images = tmp_path / "gld"
    rng = np.random.default_rng(2)
    ids = ["abc001", "abd002", "bcd003", "cde004"]
    for image_id in ids:
        folder = images / image_id[0] / image_id[1] / image_id[2]
        folder.mkdir(parents=True, exist_ok=True)
        Image.fromarray(rng.integers(0, 255, (20, 20, 3), dtype=np.uint8)).save(
            folder / f"{image_id}.jpg")
    train_csv = tmp_path / "train.csv"
    train_csv.write_text("id,url,landmark_id\n" + "".join(
        f"{i},http://x/{i},{lm}\n" for i, lm in zip(ids + ["eee005"], [17, 3, 17, 3, 9])))
    items = tfrecords.list_gldv2(str(train_csv), str(images))
    assert [(os.path.basename(p), i, lm) for p, i, lm in items][:2] == [
        ("abc001.jpg", "abc001", 17), ("abd002.jpg", "abd002", 3)]
    assert tfrecords.relabel(items) == {3: 0, 9: 1, 17: 2}  # numeric order
    clean_csv = tmp_path / "train_clean.csv"
    clean_csv.write_text("landmark_id,images\n17,abc001 bcd003\n3,abd002 cde004\n")
    clean = tfrecords.list_gldv2(str(clean_csv), str(images))
    assert sorted(i for _, i, _ in clean) == sorted(ids)
    out = str(tmp_path / "shards")
    summary = tfrecords.build(out, items, num_shards=1, validation_fraction=0.0,
                              progress=False)
    assert summary["train_records"] == 4 and summary["bad_files"] == 1  # eee005 is missing
    # --exclude_landmarks: landmark 17 (and two ids that are not in the CSV) left out
    listed = tmp_path / "rgldv2.txt"
    listed.write_text("landmark_id\n# shared with ROxf\n17, 12345\n99999\n")
    kept, account = sources.exclude_landmarks(items, str(listed))
    assert {lm for _, _, lm in kept} == {3, 9}
    assert account == {"file": str(listed), "listed": 3, "found": 1, "images": 2}
    out = str(tmp_path / "excluded")
    summary = tfrecords.build(out, kept, num_shards=1, progress=False, excluded=account)
    assert summary["train_records"] == 2 and summary["num_classes"] == 1   # 9: eee005 missing
    with open(os.path.join(out, "build_report.json")) as f:
        assert json.load(f)["excluded_landmarks"] == account
    (tmp_path / "empty.txt").write_text("# nothing\n")
    with pytest.raises(tfrecords.BuildError, match="lists no landmark ids"):
        sources.exclude_landmarks(items, str(tmp_path / "empty.txt"))
    with pytest.raises(tfrecords.BuildError, match="does not exist"):
        sources.exclude_landmarks(items, str(tmp_path / "nope.txt"))
    with pytest.raises(tfrecords.BuildError, match="is not a file"):
        sources.exclude_landmarks(items, str(tmp_path))
    bad_csv = tmp_path / "other.csv"
    bad_csv.write_text("name,label\n")
    with pytest.raises(tfrecords.BuildError, match="expected GLDv2 train.csv"):
        tfrecords.list_gldv2(str(bad_csv), str(images))


def test_builder_cli_end_to_end(synthetic_root, tmp_path):
    out = str(tmp_path / "cli")
    proc = subprocess.run(
        [sys.executable, "-m", "dplg_tf.cli.build_tfrecords",
         f"--image_dir={os.path.join(synthetic_root, 'train')}", f"--output_dir={out}",
         "--num_shards=2", "--max_image_size=100", "--num_workers=2"],
        capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    summary = json.loads(proc.stdout.strip().splitlines()[-1])
    assert summary["num_classes"] == 4
    assert summary["train_records"] + summary["validation_records"] == 24
    assert "images" in proc.stderr and ("/s" in proc.stderr or "s/" in proc.stderr)  # progress
    r = _read_shards(out + "/train-*")[0]
    assert max(r["width"], r["height"]) == 100  # re-encoded down
    bad = subprocess.run([sys.executable, "-m", "dplg_tf.cli.build_tfrecords",
                          f"--output_dir={out}"], capture_output=True, text=True, timeout=300)
    assert bad.returncode == 2 and "Give either --image_dir or --gldv2_csv" in bad.stderr
    classes = sorted(os.listdir(os.path.join(synthetic_root, "train")))
    (tmp_path / "skip.txt").write_text(classes[0] + "\n")
    excl = subprocess.run(
        [sys.executable, "-m", "dplg_tf.cli.build_tfrecords",
         f"--image_dir={os.path.join(synthetic_root, 'train')}", f"--output_dir={out}-excl",
         "--num_shards=1", f"--exclude_landmarks={tmp_path / 'skip.txt'}"],
        capture_output=True, text=True, timeout=300)
    assert excl.returncode == 0, excl.stderr[-2000:]
    assert json.loads(excl.stdout.strip().splitlines()[-1])["num_classes"] == 3
    assert "1 of the 1 listed landmarks found, 6 images left out" in excl.stderr


# ------------------------------------------------------------- the pipeline

@pytest.fixture(scope="module")
def shards(synthetic_root, tmp_path_factory):
    out = str(tmp_path_factory.mktemp("shards"))
    items, _ = tfrecords.list_image_dir(os.path.join(synthetic_root, "train"))
    tfrecords.build(out, items, num_shards=4, num_workers=2, progress=False,
                    validation_fraction=0.2)
    return out


def _data_config(size=64):
    c = base_config().data
    c.image_size = size
    c.shuffle_buffer = 32
    return c


def test_pipeline_batches_shape_dtype_and_labels(shards):
    c = _data_config()
    images, labels = next(iter(pipeline.make_dataset(shards + "/train-*", c, True, 8)))
    assert images.shape == (8, 64, 64, 3) and images.dtype == tf.float32
    assert labels.dtype == tf.int32
    assert 0 <= labels.numpy().min() and labels.numpy().max() < pipeline.num_classes(
        shards + "/train-*") == 4
    assert 0.0 <= images.numpy().min() and images.numpy().max() <= 255.0
    assert pipeline.num_records(shards + "/train-*") == 20
    assert pipeline.num_records(shards + "/validation-*") == 4


def test_validation_is_deterministic_and_complete(shards):
    c = _data_config()
    run = [np.concatenate([y.numpy() for _, y in pipeline.make_dataset(
        shards + "/validation-*", c, False, 2)]) for _ in range(2)]
    np.testing.assert_array_equal(run[0], run[1])
    assert len(run[0]) == 4
    a = next(iter(pipeline.make_dataset(shards + "/validation-*", c, False, 2)))[0]
    b = next(iter(pipeline.make_dataset(shards + "/validation-*", c, False, 2)))[0]
    np.testing.assert_array_equal(a.numpy(), b.numpy())


def test_pipeline_errors_are_clear(tmp_path, shards):
    with pytest.raises(FileNotFoundError, match="No TFRecord shards match"):
        pipeline.make_dataset(str(tmp_path / "train-*"), _data_config(), True, 4)
    with pytest.raises(FileNotFoundError, match="No TFRecord shards match"):
        pipeline.num_classes(str(tmp_path / "train-*"))
    # a worker with no shard file would stop first and leave the others hanging
    files = len(tf.io.gfile.glob(shards + "/train-*"))
    context = tf.distribute.InputContext(num_input_pipelines=files + 1, input_pipeline_id=0)
    with pytest.raises(UserError, match=f"{files} shard files .* {files + 1} workers"):
        pipeline.make_dataset(shards + "/train-*", _data_config(), True, 4, context)


def test_shards_without_dataset_info_are_counted_once(shards, tmp_path, monkeypatch):
    """Shards from DELG's builder (no dataset_info.json) train: classes and
    counts are read from the records once and cached beside them."""
    import shutil

    delg = tmp_path / "delg"
    delg.mkdir()
    for name in os.listdir(shards):
        if name.startswith("train-"):
            shutil.copy(os.path.join(shards, name), delg / name)
    ours = pipeline.dataset_info(shards + "/train-*")
    counted = pipeline.dataset_info(str(delg / "train-*"))
    assert counted["num_classes"] == ours["num_classes"] == 4
    assert counted["splits"]["train"] == {"num_records": ours["splits"]["train"]["num_records"]}
    assert [n for n in os.listdir(delg) if n.startswith(".dplg_counts-")]
    monkeypatch.setattr(tf.data, "TFRecordDataset", None)   # the cache answers now
    assert pipeline.dataset_info(str(delg / "train-*")) == counted
    # the builder's file without a validation split: that split is counted too
    assert pipeline.num_records(shards + "/validation-*") == 4


MIRRORED_SCRIPT = r"""
import sys, json
import tensorflow as tf
cpu = tf.config.list_physical_devices("CPU")[0]
tf.config.set_logical_device_configuration(cpu, [tf.config.LogicalDeviceConfiguration()] * 2)
from dplg_tf.config import base_config
from dplg_tf.data import pipeline
strategy = tf.distribute.MirroredStrategy(["/cpu:0", "/cpu:1"])
c = base_config().data
c.image_size = 64
c.shuffle_buffer = 16
ds = pipeline.distributed_dataset(strategy, sys.argv[1] + "/train-*", c, True, 8)
images, labels = next(iter(ds))
shapes = [list(t.shape) for t in strategy.experimental_local_results(images)]
lab = [t.numpy().tolist() for t in strategy.experimental_local_results(labels)]
dtypes = [t.dtype.name for t in strategy.experimental_local_results(images)]
print(json.dumps(dict(replicas=strategy.num_replicas_in_sync, shapes=shapes, labels=lab,
                      dtypes=dtypes)))
"""


def test_pipeline_under_mirrored_strategy_with_two_cpu_devices(shards):
    proc = subprocess.run([sys.executable, "-c", MIRRORED_SCRIPT, shards],
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    out = json.loads(proc.stdout.strip().splitlines()[-1])
    assert out["replicas"] == 2
    assert out["shapes"] == [[4, 64, 64, 3], [4, 64, 64, 3]]  # half the global batch each
    assert out["dtypes"] == ["float32", "float32"]
    assert all(0 <= v < 4 for part in out["labels"] for v in part)


def test_resized_images_stay_within_0_255():
    """Antialiased resizing can land a hair above 255 on white; the model's input
    range is [0, 255], so the pipeline clips."""
    from conftest import image_bytes

    white = image_bytes(97, 131, seed=0)
    from PIL import Image as PILImage

    buf = io.BytesIO()
    PILImage.new("RGB", (131, 97), (255, 255, 255)).save(buf, "JPEG", quality=100)
    c = _data_config(size=40)
    for encoded in (white, buf.getvalue()):
        record = tfrecords.make_example(encoded, "x", 0, 131, 97).SerializeToString()
        for fn in (pipeline._train_map(c), pipeline._eval_map(c)):
            for _ in range(5):
                image = fn(tf.constant(record))[0].numpy()
                assert 0.0 <= image.min() and image.max() <= 255.0


def test_builds_keep_every_image_for_training_unless_asked(tmp_path):
    """The paper trains on all of GLDv2-clean: no split by default; asked for,
    a split never takes a class's last image (a class of one stays in training)."""
    from PIL import Image

    root = tmp_path / "classes"
    for cls, n in (("a", 6), ("b", 3), ("single", 1)):
        (root / cls).mkdir(parents=True)
        for i in range(n):
            Image.fromarray(np.full((32, 32, 3), 40 * i, np.uint8)).save(root / cls / f"{i}.jpg")
    items, _ = tfrecords.list_image_dir(str(root))
    out = str(tmp_path / "all")
    summary = tfrecords.build(out, items, num_shards=2, progress=False)
    assert (summary["train_records"], summary["validation_records"]) == (10, 0)
    assert not [n for n in os.listdir(out) if n.startswith("validation-")]
    labels = tfrecords.relabel(items)
    for per_class, fraction, held in ((2, 0.0, {"a": 2, "b": 2, "single": 0}),
                                      (0, 0.5, {"a": 3, "b": 1, "single": 0}),
                                      (9, 0.0, {"a": 5, "b": 2, "single": 0})):
        train, validation = tfrecords.split(items, labels, fraction, 0, per_class)
        for cls, count in held.items():
            assert sum(c == cls for _, _, c in validation) == count, (per_class, cls)
            assert sum(c == cls for _, _, c in train) >= 1
    with pytest.raises(tfrecords.BuildError, match="not both"):
        tfrecords.build(str(tmp_path / "x"), items, validation_fraction=0.1,
                        validation_per_class=1, progress=False)
    with pytest.raises(tfrecords.BuildError, match="num_shards"):
        tfrecords.build(str(tmp_path / "x"), items, num_shards=10 ** 9, progress=False)
