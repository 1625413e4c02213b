"""Hostile data files: ground-truth pickles, descriptor files, index folders,
builder inputs. Each case checks the exit code or error, its one sentence,
and that nothing already on disk was lost."""

import io
import json
import os
import pickle
import random
import signal
import struct
import subprocess
import sys
import time

import numpy as np
import pytest
from PIL import Image

from conftest import image_bytes
from dplg_tf.data import revisited
from dplg_tf.storage import safe_pickle
from dplg_tf.storage.descriptors import read_npz, write_npz
from dplg_tf.search.index import DescriptorIndex

ENV = dict(os.environ, TF_CPP_MIN_LOG_LEVEL="3", PYTHONUNBUFFERED="1")


def _cli(module, *args, timeout=120):
    return subprocess.run([sys.executable, "-m", module, *args], capture_output=True,
                          text=True, timeout=timeout, env=ENV)


def _one_sentence_error(proc, code=2):
    assert proc.returncode == code, (proc.returncode, proc.stdout, proc.stderr)
    lines = [line for line in proc.stderr.splitlines() if line.strip()]
    assert "Traceback" not in proc.stderr, proc.stderr
    return lines[-1]


# ------------------------------------------------------------ ground truth

def _genuine():
    """A ground truth as the Revisited files hold it: lists, dicts, NumPy arrays."""
    gnd = [{"bbx": np.array([1.0, 2.0, 30.5, 40.0]), "easy": np.array([0, 2]),
            "hard": np.array([1], dtype=np.int64), "junk": []},
           {"bbx": [0, 0, 10, 10], "easy": [3], "hard": [], "junk": np.array([0])}]
    return {"imlist": ["a", "b", "c", "d"], "qimlist": ["q1", "q2"], "gnd": gnd}


@pytest.mark.parametrize("protocol", [2, 4, 5])
def test_genuine_ground_truth_loads(tmp_path, protocol):
    root = tmp_path / "mine"
    root.mkdir()
    (root / "gnd_mine.pkl").write_bytes(pickle.dumps(_genuine(), protocol=protocol))
    ds = revisited.load_dataset(str(tmp_path), "mine")
    assert ds.imlist == ["a", "b", "c", "d"] and len(ds.qimlist) == 2
    assert ds.bbx(0) == (1.0, 2.0, 30.5, 40.0)
    ok, junk = ds.positives("medium")[0]
    assert sorted(ok.tolist()) == [0, 1, 2] and junk.tolist() == []
    # NumPy scalars and big-endian arrays come back as numbers too
    value = safe_pickle.loads(pickle.dumps([np.float64(2.5), np.arange(3, dtype=">i4")],
                                           protocol=protocol))
    assert value[0] == 2.5 and value[1].tolist() == [0, 1, 2]


def _global(module, name):
    return b"c" + module.encode() + b"\n" + name.encode() + b"\n"


def _array_pickle(descr, data=b"\0" * 16, shape=b"K\x00\x85"):
    """A protocol-2 pickle of a 2-element array with the dtype name, raw data
    and _reconstruct shape replaced (data: ASCII bytes, kept as latin-1 text)."""
    base = pickle.dumps(np.zeros(2, np.float64), protocol=2)
    parts = [b"X\x02\x00\x00\x00f8", b"X\x10\x00\x00\x00" + b"\0" * 16, b"K\x00\x85"]
    assert all(p in base for p in parts)
    return base.replace(parts[0], b"X\x02\x00\x00\x00" + descr.encode()).replace(
        parts[1], b"X" + struct.pack("<I", len(data)) + data).replace(parts[2], shape)


# name -> (file, why it is refused)
HOSTILE_PICKLES = {
    "object array": (pickle.dumps(np.array([1, "a", None], dtype=object), protocol=2),
                     "dtype 'O8' is not a plain number type"),
    "object array from raw bytes (pointers)": (
        _array_pickle("O8", struct.pack("<QQ", 1, 2)), "dtype 'O8' is not a plain number"),
    "void dtype": (_array_pickle("V8"), "dtype 'V8' is not a plain number type"),
    "array bytes shorter than its shape": (_array_pickle("f8", b"\0" * 8),
                                           "needs 16 bytes but the file gives 8"),
    "os.system": (pickle.dumps(os.system, protocol=2), "system, which a ground-truth"),
    "eval by REDUCE": (_global("builtins", "eval") + b"(S'1+1'\ntR.",
                       "builtins.eval, which a ground-truth"),
    "bytearray of 10 GB": (_global("builtins", "bytearray") + b"(L10000000000L\ntR.",
                           "data is not bytes"),
    "bytes claiming 4 GB": (b"\x80\x03B\xff\xff\xff\xffabc.", "not a valid pickle"),
    "NEWOBJ": (b"\x80\x02" + _global("builtins", "set") + b")\x81.",
               "opcode that builds arbitrary objects"),
    "INST": (b"(i__builtin__\nset\n.", "opcode that builds arbitrary objects"),
    "extension registry": (b"\x80\x02\x82\x01.", "opcode that builds arbitrary objects"),
    "persistent id": (b"\x80\x02X\x01\x00\x00\x00xQ.", "opcode that builds arbitrary"),
    "BUILD on a list": (b"\x80\x02]}b.", "sets the state of an object"),
    "codecs other than latin-1": (_global("_codecs", "encode") + b"(X\x01\x00\x00\x00aX"
                                  b"\x05\x00\x00\x00rot13tR.", "latin-1 text only"),
    "truncated": (pickle.dumps(_genuine(), protocol=2)[:50], "not a valid pickle"),
    "empty": (b"", "not a valid pickle"),
    "text, not a pickle": (b"imlist = ['a']\n", "opcode that builds arbitrary objects"),
    "deep nesting": (b"\x80\x02" + b"]" * 50_000 + b"a" * 49_999 + b".",
                     "nested too deeply"),
}


@pytest.mark.parametrize("name", sorted(HOSTILE_PICKLES))
def test_hostile_pickle_is_refused_in_one_sentence(tmp_path, name):
    data, why = HOSTILE_PICKLES[name]
    with pytest.raises(safe_pickle.UnsafePickleError) as info:
        safe_pickle.loads(data)
    assert why in str(info.value), str(info.value)
    root = tmp_path / "evil"
    root.mkdir()
    (root / "gnd_evil.pkl").write_bytes(data)
    with pytest.raises(ValueError) as info:
        revisited.load_dataset(str(tmp_path), "evil")
    message = str(info.value)
    assert "\n" not in message and "gnd_evil.pkl" in message and why in message, message


# files that try to make the loader allocate or walk without bound: they load
# at their own small size, then fail the ground-truth checks
BOUNDED_PICKLES = {
    "reconstruct with a huge shape": _array_pickle("f8", shape=b"J\x00\xca\x9a\x3b\x85"),
    "memo index 2**32-1": b"\x80\x02]r\xff\xff\xff\xff.",
    "exponential sharing": b"\x80\x02]" + b"q\x00h\x00h\x00\x86" * 60 + b".",
}


@pytest.mark.parametrize("name", sorted(BOUNDED_PICKLES))
def test_amplifying_pickle_stays_small_and_is_refused(tmp_path, name):
    import resource

    before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    start = time.perf_counter()
    safe_pickle.loads(BOUNDED_PICKLES[name])
    assert time.perf_counter() - start < 5
    assert resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - before < 200_000  # KiB
    (tmp_path / "x").mkdir()
    (tmp_path / "x" / "gnd_x.pkl").write_bytes(BOUNDED_PICKLES[name])
    with pytest.raises(ValueError, match="gnd_x.pkl"):
        revisited.load_dataset(str(tmp_path), "x")


BAD_SCHEMAS = {
    "not a dict": ([1, 2], "not the dict"),
    "no gnd": ({"imlist": [], "qimlist": []}, "lacks the 'gnd' entry"),
    "names not text": ({"imlist": [1], "qimlist": [], "gnd": []}, "list of image names"),
    "fewer entries than queries": ({"imlist": ["a"], "qimlist": ["q"], "gnd": []},
                                   "0 ground-truth entries for 1 queries"),
    "index out of range": ({"imlist": ["a"], "qimlist": ["q"], "gnd": [
        {"easy": [5], "bbx": [0, 0, 1, 1]}]}, "database indices in [0, 1)"),
    "bad box": ({"imlist": ["a"], "qimlist": ["q"], "gnd": [{"easy": [0], "bbx": [0, 1]}]},
                "4 finite numbers"),
}


@pytest.mark.parametrize("name", sorted(BAD_SCHEMAS))
def test_ground_truth_of_the_wrong_shape_is_refused(tmp_path, name):
    cfg, text = BAD_SCHEMAS[name]
    (tmp_path / "x").mkdir()
    (tmp_path / "x" / "gnd_x.pkl").write_bytes(pickle.dumps(cfg, protocol=2))
    with pytest.raises(ValueError, match=text.replace("(", r"\(").replace(")", r"\)")
                       .replace("[", r"\[")):
        revisited.load_dataset(str(tmp_path), "x")


def test_oversized_ground_truth_file_is_not_read(tmp_path):
    path = tmp_path / "big.pkl"
    path.write_bytes(pickle.dumps(list(range(1000))))
    with pytest.raises(safe_pickle.UnsafePickleError, match="more than a ground-truth"):
        safe_pickle.load(str(path), max_bytes=100)


def test_hostile_ground_truth_through_the_command_exits_2(tmp_path):
    (tmp_path / "evil").mkdir()
    (tmp_path / "evil" / "gnd_evil.pkl").write_bytes(HOSTILE_PICKLES["os.system"][0])
    proc = _cli("dplg_tf.cli.revisited", "show", "--data_root", str(tmp_path),
                "--dataset", "evil")
    line = _one_sentence_error(proc)
    assert "posix.system" in line or "os.system" in line, line


# ------------------------------------------------------- descriptor files

def _desc_file(path, n=20, dim=8, probe=True, seed=0):
    x = np.random.default_rng(seed).normal(size=(n, dim)).astype(np.float32)
    write_npz(str(path), [f"img{i}" for i in range(n)], x,
              np.ones(dim, np.float32) / np.sqrt(dim) if probe else None)
    return x


def test_descriptor_file_checks(tmp_path):
    good = tmp_path / "good.npz"
    _desc_file(good)
    assert read_npz(str(good))[0].shape == (20, 8)
    cases = {
        "nan.npz": ({"descriptors": np.full((2, 4), np.nan, np.float32)}, "NaN"),
        "flat.npz": ({"descriptors": np.ones(4, np.float32)}, "2-D array"),
        "names.npz": ({"descriptors": np.ones((2, 4)), "names": np.array(["a"])}, "1 names"),
        "none.npz": ({"names": np.array(["a"])}, "no 'descriptors'"),
        "probe.npz": ({"descriptors": np.ones((2, 4)), "probe": np.ones(3)}, "probe"),
    }
    for name, (arrays, text) in cases.items():
        np.savez(tmp_path / name, **arrays)
        with pytest.raises(ValueError, match=text):
            read_npz(str(tmp_path / name))
    (tmp_path / "junk.npz").write_bytes(b"PK\x03\x04 not really a zip")
    with pytest.raises(ValueError, match="not a readable"):
        read_npz(str(tmp_path / "junk.npz"))


# ------------------------------------------------------------------ index

def _index_cli(*args):
    return _cli("dplg_tf.cli.index", *args)


def _search_cli(*args):
    return subprocess.run([sys.executable, "-c", "from dplg_tf.cli.search import run_search; "
                           "run_search()", *args], capture_output=True, text=True,
                          timeout=120, env=ENV)


@pytest.fixture
def index_dir(tmp_path):
    desc = tmp_path / "db.npz"
    _desc_file(desc, n=30)
    proc = _index_cli(f"--index_dir={tmp_path / 'idx'}", f"--descriptors={desc}")
    assert proc.returncode == 0, proc.stderr
    return tmp_path / "idx"


def test_search_refuses_bad_queries_in_one_sentence(tmp_path, index_dir):
    queries = tmp_path / "q.npz"
    _desc_file(queries, n=2, seed=1)
    ok = _search_cli(f"--index_dir={index_dir}", f"--descriptors={queries}", "--top_k=3")
    assert ok.returncode == 0 and ok.stdout.count("img") == 8, ok.stderr  # 2 queries + 6 hits
    np.savez(tmp_path / "nan.npz", descriptors=np.full((1, 8), np.nan, np.float32),
             probe=np.ones(8, np.float32) / np.sqrt(8))
    np.savez(tmp_path / "flat.npz", descriptors=np.ones(8, np.float32))
    noprobe = tmp_path / "noprobe.npz"
    _desc_file(noprobe, n=2, probe=False)
    other = tmp_path / "other.npz"
    x = np.ones((1, 8), np.float32)
    write_npz(str(other), ["o"], x, -np.ones(8, np.float32) / np.sqrt(8))
    cases = [
        ([f"--descriptors={tmp_path / 'nan.npz'}"], "NaN"),
        ([f"--descriptors={tmp_path / 'flat.npz'}"], "2-D array"),
        ([f"--descriptors={queries}", "--top_k=-3"], "not an integer in the range [1, 10000]"),
        ([f"--descriptors={queries}", "--top_k=0"], "not an integer in the range [1, 10000]"),
        ([f"--descriptors={noprobe}"], "carries no probe"),
        ([f"--descriptors={other}"], "built with another model"),
        ([f"--descriptors={queries}", "--refine=0"], "not an integer in the range [1, 1000]"),
    ]
    for extra, text in cases:
        proc = _search_cli(f"--index_dir={index_dir}", *extra)
        assert text in _one_sentence_error(proc), (extra, proc.stderr)
    proc = _search_cli(f"--index_dir={index_dir}", f"--descriptors={noprobe}",
                       "--allow_unverified")
    assert proc.returncode == 0, proc.stderr


def test_damaged_or_misnamed_index_folders_fail_in_one_sentence(tmp_path, index_dir):
    queries = tmp_path / "q.npz"
    _desc_file(queries, n=1)
    state = DescriptorIndex.load(str(index_dir))
    assert len(state) == 30
    current = open(index_dir / "CURRENT").read().strip()
    faiss_file = index_dir / current / "index.faiss"
    data = faiss_file.read_bytes()
    faiss_file.write_bytes(data[:len(data) // 2])
    line = _one_sentence_error(_search_cli(f"--index_dir={index_dir}",
                                           f"--descriptors={queries}"))
    assert "damaged" in line, line
    faiss_file.write_bytes(data)
    (tmp_path / "afile").write_text("x")
    for args, text in [([f"--index_dir={tmp_path / 'afile'}"], "is a file"),
                       ([f"--index_dir={tmp_path / 'nothing'}"], "is missing")]:
        line = _one_sentence_error(_search_cli(*args, f"--descriptors={queries}"))
        assert text in line, line
    line = _one_sentence_error(_index_cli(f"--index_dir={tmp_path / 'afile'}",
                                          f"--descriptors={queries}"))
    assert "is a file" in line, line
    (index_dir / "CURRENT").write_text("state-999999\n")
    line = _one_sentence_error(_search_cli(f"--index_dir={index_dir}",
                                           f"--descriptors={queries}"))
    assert "names no state folder" in line, line


def test_index_refuses_unverified_descriptors_unless_told(tmp_path):
    noprobe = tmp_path / "noprobe.npz"
    _desc_file(noprobe, probe=False)
    line = _one_sentence_error(_index_cli(f"--index_dir={tmp_path / 'i'}",
                                          f"--descriptors={noprobe}"))
    assert "--allow_unverified" in line
    assert not os.path.exists(tmp_path / "i" / "CURRENT")
    proc = _index_cli(f"--index_dir={tmp_path / 'i'}", f"--descriptors={noprobe}",
                      "--allow_unverified")
    assert proc.returncode == 0, proc.stderr


@pytest.mark.slow
def test_sigkill_during_append_never_loses_the_index(tmp_path, index_dir):
    """Kill `dplg-index --append` at random moments: every time, the folder
    loads, holds the old or the new count, and names match vectors."""
    rng = random.Random(3)
    more = tmp_path / "more.npz"
    _desc_file(more, n=20_000, seed=5)  # big enough that the save takes a while
    expected = 30
    for attempt in range(8):
        proc = subprocess.Popen([sys.executable, "-m", "dplg_tf.cli.index",
                                 f"--index_dir={index_dir}", f"--descriptors={more}",
                                 "--append"], env=ENV, stdout=subprocess.DEVNULL,
                                stderr=subprocess.DEVNULL)
        time.sleep(rng.uniform(0.5, 3.0))
        proc.send_signal(signal.SIGKILL)
        proc.wait()
        index = DescriptorIndex.load(str(index_dir))
        assert len(index) in (expected, expected + 20_000), (attempt, len(index))
        assert index.index.ntotal == len(index.names)
        expected = len(index)
    proc = _index_cli(f"--index_dir={index_dir}", f"--descriptors={more}", "--append")
    assert proc.returncode == 0, proc.stderr
    assert len(DescriptorIndex.load(str(index_dir))) == expected + 20_000
    leftovers = [n for n in os.listdir(index_dir) if n.startswith(".state-")]
    assert leftovers == []


# ---------------------------------------------------------------- builder

def _jpeg_bytes(seed, size=(48, 40)):
    return image_bytes(size[1], size[0], seed)


def _gif_bomb(frame=12000, screen=100):
    """A GIF whose 100x100 screen holds a frame whose descriptor says 12000x12000."""
    buf = io.BytesIO()
    Image.new("P", (screen, screen), 0).save(buf, "GIF")
    data = bytearray(buf.getvalue())
    at = data.index(b"\x2c\x00\x00\x00\x00")  # the image descriptor at (0, 0)
    data[at + 5:at + 9] = struct.pack("<HH", frame, frame)
    return bytes(data)


def test_builder_reports_hostile_names_and_keeps_going(tmp_path):
    src = tmp_path / "src"
    for cls in ("a", "b"):
        (src / cls).mkdir(parents=True)
        for i in range(4):
            (src / cls / f"{i}.jpg").write_bytes(_jpeg_bytes(i))
    bad_name = os.path.join(os.fsencode(src / "a"), b"bad\xff.jpg")
    with open(bad_name, "wb") as f:
        f.write(_jpeg_bytes(9))
    (src / "a" / "new\nline.jpg").write_bytes(b"not an image")
    os.symlink(src / "b" / "loop.jpg", src / "b" / "loop.jpg")
    os.symlink(src / "loopdir", src / "loopdir")
    (src / "b" / "bomb.gif").write_bytes(_gif_bomb())
    out = tmp_path / "out"
    proc = _cli("dplg_tf.cli.build_tfrecords", f"--image_dir={src}", f"--output_dir={out}",
                "--num_shards=2", "--validation_fraction=0")
    assert proc.returncode == 1, proc.stderr   # done in part: 4 files were skipped
    report = json.loads((out / "build_report.json").read_text())
    reasons = {b["path"].rsplit("/", 1)[-1]: b["reason"] for b in report["bad"]}
    assert "bad\\xff.jpg" not in reasons   # a good JPEG: kept (tests/data/test_data.py)
    assert "looping symbolic link" in reasons["loop.jpg"]
    assert "looping symbolic link" in reasons["loopdir"]
    assert "too large" in reasons["bomb.gif"]
    assert "new\\nline.jpg" in reasons
    lines = (out / "bad_files.txt").read_text().splitlines()
    assert len(lines) == len(report["bad"]) == 4
    assert report["train_records"] == 9
    (tmp_path / "afile").write_text("x")
    line = _one_sentence_error(_cli("dplg_tf.cli.build_tfrecords", f"--image_dir={src}",
                                    f"--output_dir={tmp_path / 'afile'}"))
    assert "is a file" in line, line


# ------------------------------------------------------- messages, caches

def test_error_messages_are_whole_sentences_without_tensorflow_framing():
    from dplg_tf.errors import tf_error_message

    framed = ("Graph execution error:\n\nDetected at node Assert/Assert defined at (most recent "
              "call last):\n<stack traces unavailable>\n{}\n\t [[{{{{node Assert/Assert}}}}]] "
              "[Op:__inference_signature_wrapper_describe_bytes_1779]")
    assert tf_error_message(framed.format(
        "assertion failed: [scales must be 1 to 8 values in (0, 2]; got] [-1 3]")) == \
        "scales must be 1 to 8 values in (0, 2]; got -1 3"
    assert tf_error_message(framed.format("Invalid JPEG data, size 250")) == \
        "Invalid JPEG data, size 250"


class _FakeDescriber:
    def __init__(self, identity, sign=1.0):
        self.identity, self.sign = identity, sign

    def probe(self):
        return self.sign * np.ones(4, np.float32) / 2


def test_evaluation_cache_key_follows_model_and_scales():
    from dplg_tf.retrieval.cache import cache_key

    jobs = [("a.jpg", None), ("b.jpg", (0, 0, 5, 5))]
    key = cache_key(_FakeDescriber("m/1"), [1.0, 0.5], "database", jobs)
    assert key == cache_key(_FakeDescriber("m/1"), [1.0, 0.5], "database", jobs)
    assert key != cache_key(_FakeDescriber("m/1"), [1.0], "database", jobs)  # scales
    assert key != cache_key(_FakeDescriber("m/1", -1), [1.0, 0.5], "database", jobs)  # model
    assert key != cache_key(_FakeDescriber("m/2"), [1.0, 0.5], "database", jobs)  # identity
    assert key != cache_key(_FakeDescriber("m/1"), [1.0, 0.5], "database", jobs[:1] + [
        ("c.jpg", None)])  # images


@pytest.mark.parametrize("module,args", [
    ("dplg_tf.cli.search", ["--qe_k=1000000000"]),
    ("dplg_tf.cli.search", ["--qe_k=-1"]),
    ("dplg_tf.cli.search", ["--qe_alpha=nan"]),
    ("dplg_tf.cli.search", ["--refine=1000000000"]),
    ("dplg_tf.cli.search", ["--ef_search=1000000000"]),
    ("dplg_tf.cli.search", ["--top_k=0"]),
    ("dplg_tf.cli.index", ["--dba_k=1000000000"]),
    ("dplg_tf.cli.index", ["--dba_alpha=inf"]),
    ("dplg_tf.cli.eval", ["--dataset=x", "--data_root=y", "--dba_alpha=-1"]),
    ("dplg_tf.cli.eval", ["--dataset=x", "--data_root=y", "--dba_graph=hnsw9"]),
    ("dplg_tf.cli.eval", ["--dataset=x", "--data_root=y", "--rerank_beta=nan"]),
    ("dplg_tf.cli.search", ["--rerank_m=1"]),
    ("dplg_tf.cli.search", ["--rerank_beta=2"]),
])
def test_numeric_flags_out_of_range_are_one_sentence_and_exit_2(tmp_path, module, args):
    proc = _cli(module, f"--index_dir={tmp_path / 'idx'}", *args, "some.jpg",
                timeout=60) if "eval" not in module else _cli(module, *args, timeout=60)
    line = _one_sentence_error(proc)
    assert "flag --" in line and "see --helpfull" in line, line


def test_ground_truth_round_two_bytearray8_overflow_protocol2_and_paths():
    """BYTEARRAY8 may not allocate its declared length before reading; a box of
    10**400 is one sentence; a genuine protocol-2 file with an empty junk array
    loads; image names stay inside the data set's folder."""
    import pickle
    import struct
    import tracemalloc

    from dplg_tf.storage import safe_pickle
    from dplg_tf.data.revisited import check_ground_truth
    from dplg_tf.errors import UserError

    bomb = b"\x80\x05" + pickle.BYTEARRAY8 + struct.pack("<Q", 3 * 10 ** 9) + b"."
    tracemalloc.start()
    with pytest.raises(safe_pickle.UnsafePickleError, match="declares a bytearray"):
        safe_pickle.loads(bomb)
    assert tracemalloc.get_traced_memory()[1] < 10 ** 7
    tracemalloc.stop()
    genuine = {"imlist": ["a", "b"], "qimlist": ["q"],
               "gnd": [{"ok": np.array([0]), "junk": np.array([], np.int64),
                        "bbx": [0.0, 0.0, 5.0, 5.0]}]}
    loaded = check_ground_truth(safe_pickle.loads(pickle.dumps(genuine, protocol=2)), "x")
    assert loaded["gnd"][0]["junk"] == [] and loaded["gnd"][0]["ok"] == [0]
    for cfg, text in (({"imlist": ["../../etc/passwd"], "qimlist": ["q"], "gnd": [{}]},
                       "outside the data set's folder"),
                      ({"imlist": ["/abs/x"], "qimlist": ["q"], "gnd": [{}]}, "outside"),
                      ({"imlist": ["a"], "qimlist": ["q"], "gnd": [{"bbx": [10 ** 400, 0, 0, 0]}]},
                       "4 finite numbers")):
        with pytest.raises(UserError, match=text):
            check_ground_truth(cfg, "x")
