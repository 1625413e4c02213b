"""The files we read back, under hostile edits: each loads correctly or is
refused with a UserError (exit 2 for the commands), in bounded time and
memory; a mutation never reaches the caller as another exception."""

import io
import json
import subprocess
import sys
import zipfile

import numpy as np
import pytest

from dplg_tf.errors import UserError
from dplg_tf.storage import whitening as whitening_file
from dplg_tf.storage.descriptors import write_npz

PROBE = np.ones(8, np.float32) / np.sqrt(8)


def _npz_bytes(**arrays):
    buf = io.BytesIO()
    np.savez(buf, **arrays)
    return buf.getvalue()


def _bomb(name, shape):
    """An .npz whose member declares `shape` float32 (a large array of zeros,
    deflated: a small file that inflates to gigabytes)."""
    header = io.BytesIO()
    np.lib.format.write_array_header_1_0(header, {"descr": "<f4", "fortran_order": False,
                                                  "shape": shape})
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w", zipfile.ZIP_DEFLATED) as z:
        with z.open(name + ".npy", "w", force_zip64=True) as f:
            f.write(header.getvalue())
            zeros = bytes(1 << 20)
            for _ in range(256):          # 256 MiB of zeros, deflated to a few hundred KB
                f.write(zeros)
    return buf.getvalue()


@pytest.mark.parametrize("case", ["empty", "truncated", "strings", "metadata list",
                                  "declared 1e12", "bomb", "zero projection", "not zip"])
def test_hostile_whitening_files_are_one_sentence(tmp_path, case):
    path = tmp_path / "w.npz"
    good = _npz_bytes(mean=np.zeros(8, np.float32), projection=np.eye(8, dtype=np.float32),
                      metadata=np.array(json.dumps({"kind": "pca", "probe": PROBE.tolist()})))
    data = {"empty": b"", "truncated": good[:len(good) // 2], "not zip": b"PK\x03\x04zzzz",
            "strings": _npz_bytes(mean=np.array(["a"] * 8), projection=np.eye(8),
                                  metadata=np.array("{}")),
            "metadata list": _npz_bytes(mean=np.zeros(8), projection=np.eye(8),
                                        metadata=np.array("[1, 2]")),
            "zero projection": _npz_bytes(mean=np.zeros(8), projection=np.zeros((4, 8)),
                                          metadata=np.array("{}")),
            "bomb": _bomb("projection", (1 << 16, 1 << 14)),
            "declared 1e12": None}[case]
    if case == "declared 1e12":   # a stored member whose header claims 10^12 floats
        header = io.BytesIO()
        np.lib.format.write_array_header_1_0(header, {"descr": "<f4", "fortran_order": False,
                                                      "shape": (10 ** 6, 10 ** 6)})
        buf = io.BytesIO()
        with zipfile.ZipFile(buf, "w") as z:
            z.writestr("mean.npy", header.getvalue() + bytes(64))
        data = buf.getvalue()
    path.write_bytes(data)
    with pytest.raises(UserError, match=str(path)):
        whitening_file.load(str(path))


MUTATE_SCRIPT = r"""
import io, json, os, random, shutil, sys, time
import numpy as np
from dplg_tf.errors import UserError
kind, source, trials = sys.argv[1], sys.argv[2], int(sys.argv[3])
rng = random.Random(7)
counts = {"loaded": 0, "refused": 0, "other": [], "slowest_s": 0.0}

def mutate(data):
    data = bytearray(data)
    how = rng.choice(["truncate", "flip", "flip", "zero", "splice"])
    if how == "truncate" or not data:
        return bytes(data[:rng.randrange(len(data) + 1)])
    if how == "flip":
        for _ in range(rng.randint(1, 8)):
            data[rng.randrange(len(data))] = rng.randrange(256)
    elif how == "zero":
        start = rng.randrange(len(data))
        data[start:start + rng.randint(1, 64)] = bytes(min(64, len(data) - start))
    else:
        a, b = sorted(rng.randrange(len(data)) for _ in range(2))
        data = data[:a] + data[b:] + data[a:b]
    return bytes(data)

def load(path):
    if kind == "part":
        from dplg_tf.storage.descriptors import read_npz
        read_npz(path)
    elif kind == "whitening":
        from dplg_tf.storage.whitening import load as w
        w(path)
    elif kind in ("shard", "manifest"):
        from dplg_tf.storage.extraction import read_all
        read_all(path)
    elif kind in ("index_meta", "index_names", "index_faiss"):
        from dplg_tf.search.index import DescriptorIndex
        DescriptorIndex.load(path).search(np.ones((1, 8), np.float32), 3)

work = source + ".fuzz"
for t in range(trials):
    shutil.rmtree(work, ignore_errors=True)
    if os.path.isdir(source):
        shutil.copytree(source, work)
    else:
        shutil.copy(source, work)
    target = {"shard": "shards/shard-00001.parquet", "manifest": "manifest.json",
              "index_meta": "meta.json", "index_names": "names.json",
              "index_faiss": "index.faiss"}.get(kind)
    if target:
        from dplg_tf.storage.atomic import StateFolder
        state = StateFolder(work).current() or work if kind.startswith("index") else work
        victim = os.path.join(state, target)
    else:
        victim = work
    with open(victim, "rb") as f:
        data = f.read()
    with open(victim, "wb") as f:
        f.write(mutate(data))
    start = time.time()
    try:
        load(work)
        counts["loaded"] += 1
    except UserError:
        counts["refused"] += 1
    except Exception as e:
        counts["other"].append(f"{type(e).__name__}: {str(e)[:200]}")
    counts["slowest_s"] = max(counts["slowest_s"], time.time() - start)
with open("/proc/self/status") as f:
    counts["peak_mb"] = [int(l.split()[1]) / 1024 for l in f if l.startswith("VmHWM")][0]
print(json.dumps(counts))
"""


def _sources(tmp_path):
    from dplg_tf.search.index import DescriptorIndex
    from dplg_tf.storage import extraction

    rng = np.random.default_rng(0)
    rows = rng.normal(size=(7, 8)).astype(np.float32)
    part = str(tmp_path / "part.npz")
    write_npz(part, [f"n{i}" for i in range(7)], rows, PROBE, [("bad.jpg", "too small: x")])
    white = str(tmp_path / "white.npz")
    whitening_file.save(white, np.zeros(8), np.eye(8), kind="pca", probe=PROBE.tolist())
    out = str(tmp_path / "extraction")
    names = [f"img{i}.jpg" for i in range(7)]
    manifest = {"model": "m/1", "fingerprint": "f" * 64, "probe": PROBE.tolist(), "dim": 8,
                "requested_scales": None, "scales": [1.0], "limits": {}, "shard_size": 3,
                "listing_sha256": extraction.listing_hash(names), "images": 7, "num_shards": 3}
    extraction.open_folder(out, manifest, names)
    for s in range(3):
        extraction.write_shard(out, s, names[3 * s:3 * s + 3], rows[3 * s:3 * s + 3],
                               [None] * len(names[3 * s:3 * s + 3]), manifest)
    index = DescriptorIndex(8, "exact", PROBE)
    index.add(rows, names)
    folder = str(tmp_path / "index")
    index.save(folder)
    return {"part": part, "whitening": white, "shard": out, "manifest": out,
            "index_meta": folder, "index_names": folder, "index_faiss": folder}


@pytest.mark.slow
def test_two_hundred_and_more_random_mutations_load_or_are_refused(tmp_path):
    sources = _sources(tmp_path)
    trials = {"part": 60, "whitening": 60, "shard": 40, "manifest": 40, "index_meta": 30,
              "index_names": 30, "index_faiss": 30}
    total = 0
    for kind, n in trials.items():
        proc = subprocess.run([sys.executable, "-c", MUTATE_SCRIPT, kind, sources[kind], str(n)],
                              capture_output=True, text=True, timeout=600)
        assert proc.returncode == 0, (kind, proc.stderr[-3000:])   # no crash of the process
        counts = json.loads(proc.stdout.strip().splitlines()[-1])
        assert counts["other"] == [], (kind, counts["other"][:5])
        assert counts["loaded"] + counts["refused"] == n
        assert counts["slowest_s"] < 20 and counts["peak_mb"] < 2500, (kind, counts)
        total += n
    assert total >= 200
