"""The resumable chunk writer: parts by range, commits by count and by time,
damaged parts described again."""

import os

import numpy as np
import pytest

from dplg_tf.errors import UserError
from dplg_tf.storage.chunks import ChunkedOutput
from dplg_tf.storage.descriptors import read_npz, write_npz

PROBE = np.ones(4, np.float32) / 2


def _rows(start, end):
    return np.arange(start, end, dtype=np.float32)[:, None] * np.ones((1, 4), np.float32)


def _work(run, size, stop_after=None):
    """Describe run's pending names in batches; the `stop_after`th batch is lost (a kill)."""
    for k, (start, end) in enumerate(run.batches(size)):
        if stop_after is not None and k == stop_after:
            return
        run.add(start, end, run.names[start:end], _rows(start, end), [])


def test_commits_by_count_and_resume_skips_committed_names(tmp_path):
    names = [f"n{i}" for i in range(20)]
    out = str(tmp_path / "o.npz")
    run = ChunkedOutput(out, names, chunk_size=6, probe=PROBE, max_seconds=1e9)
    _work(run, 2, stop_after=7)          # 7 batches of 2 done, 12 committed (2 parts of 6)
    again = ChunkedOutput(out, names, chunk_size=6, probe=PROBE)
    assert int(again.done.sum()) == 12 and again.batches(100) == [(12, 20)]
    _work(again, 3)
    count, dim, errors = again.finish()
    rows, got, probe = read_npz(out)
    assert (count, dim, errors, got) == (20, 4, [], names)
    np.testing.assert_allclose(rows, _rows(0, 20))
    assert not os.path.exists(out + ".parts")


def test_commits_by_time_whatever_the_chunk_size(tmp_path):
    names = [f"n{i}" for i in range(9)]
    out = str(tmp_path / "o.npz")
    run = ChunkedOutput(out, names, chunk_size=10 ** 6, probe=PROBE, max_seconds=0.0)
    _work(run, 2, stop_after=3)          # every add is past the time limit: 3 parts
    assert sorted(run.parts) == [(0, 2), (2, 4), (4, 6)]
    assert int(ChunkedOutput(out, names, 10 ** 6, PROBE).done.sum()) == 6


@pytest.mark.parametrize("damage", ["truncated", "empty", "nan", "other model", "renamed",
                                    "other dimension", "not npz"])
def test_a_damaged_part_is_set_aside_and_described_again(tmp_path, damage):
    names = [f"n{i}" for i in range(8)]
    out = str(tmp_path / "o.npz")
    run = ChunkedOutput(out, names, chunk_size=4, probe=PROBE)
    _work(run, 4)
    part = os.path.join(out + ".parts", "part-000000004-000000008.npz")
    data = open(part, "rb").read()
    if damage == "truncated":
        open(part, "wb").write(data[:len(data) // 2])
    elif damage == "empty":
        open(part, "wb").write(b"")
    elif damage == "not npz":
        open(part, "wb").write(b"PK\x03\x04 not really a zip")
    else:
        rows, probe = _rows(4, 8), PROBE
        part_names = names[4:]
        if damage == "nan":
            rows[1, 2] = np.nan
        if damage == "other model":
            probe = -PROBE
        if damage == "renamed":
            part_names = ["x4", "x5", "x6", "x7"]
        if damage == "other dimension":
            rows = np.ones((4, 6), np.float32)
        write_npz(part, part_names, rows, probe)
    again = ChunkedOutput(out, names, chunk_size=4, probe=PROBE)
    assert [n for n, _ in again.damaged] == ["part-000000004-000000008.npz"]
    assert again.batches(10) == [(4, 8)]
    _work(again, 4)
    again.finish()
    np.testing.assert_allclose(read_npz(out)[0], _rows(0, 8))


def test_another_model_other_inputs_or_a_damaged_manifest_are_refused(tmp_path):
    names = [f"n{i}" for i in range(6)]
    out = str(tmp_path / "o.npz")
    ChunkedOutput(out, names, 4, PROBE)
    with pytest.raises(UserError, match="another model"):
        ChunkedOutput(out, names, 4, -PROBE)
    with pytest.raises(UserError, match="other inputs"):
        ChunkedOutput(out, names[:-1], 4, PROBE)
    for text in ("not json", "[1, 2]"):
        with open(os.path.join(out + ".parts", "manifest.json"), "w") as f:
            f.write(text)
        with pytest.raises(UserError, match="damaged.*delete"):
            ChunkedOutput(out, names, 4, PROBE)
