"""atomic_path: the final name holds the old file or the whole new one, never
half of one, and a failed writer leaves no temporary behind."""

import json
import os

import pytest

from dplg_tf.storage import atomic


class Crash(Exception):
    pass


def test_a_crash_inside_leaves_no_file_and_no_temporary(tmp_path):
    path = tmp_path / "out.bin"
    with pytest.raises(Crash):
        with atomic.atomic_path(str(path)) as tmp:
            with open(tmp, "wb") as f:
                f.write(b"half")
            raise Crash()
    assert os.listdir(tmp_path) == []


def test_a_crash_keeps_the_old_file(tmp_path):
    path = tmp_path / "out.txt"
    path.write_text("old")
    with pytest.raises(Crash):
        with atomic.atomic_path(str(path)) as tmp:
            open(tmp, "w").write("new")
            raise Crash()
    assert path.read_text() == "old" and os.listdir(tmp_path) == ["out.txt"]


def test_success_replaces_an_existing_file(tmp_path):
    path = tmp_path / "model.keras"
    path.write_text("old")
    with atomic.atomic_path(str(path)) as tmp:
        name = os.path.basename(tmp)
        # hidden, beside the file, ending in its extension (Keras wants .keras)
        assert os.path.dirname(tmp) == str(tmp_path)
        assert name.startswith(".model.keras.") and name.endswith(".tmp.keras")
        assert not os.path.exists(tmp)
        open(tmp, "w").write("new")
    assert path.read_text() == "new" and os.listdir(tmp_path) == ["model.keras"]


def test_a_folder_is_written_whole_and_a_crash_removes_it(tmp_path):
    final = tmp_path / "1"
    with pytest.raises(Crash):
        with atomic.atomic_path(str(final)) as tmp:
            os.makedirs(os.path.join(tmp, "variables"))
            open(os.path.join(tmp, "variables", "v"), "w").write("half")
            raise Crash()
    assert os.listdir(tmp_path) == []
    with atomic.atomic_path(str(final)) as tmp:
        os.makedirs(os.path.join(tmp, "variables"))
        open(os.path.join(tmp, "variables", "v"), "w").write("whole")
        open(os.path.join(tmp, "saved_model.pb"), "w").write("pb")
    assert (final / "variables" / "v").read_text() == "whole"
    assert sorted(os.listdir(tmp_path)) == ["1"]


def test_a_folder_never_replaces_one_that_holds_files(tmp_path):
    final = tmp_path / "1"
    final.mkdir()
    (final / "kept").write_text("theirs")
    with pytest.raises(OSError):
        with atomic.atomic_path(str(final)) as tmp:
            os.makedirs(tmp)
            open(os.path.join(tmp, "mine"), "w").write("mine")
    assert os.listdir(final) == ["kept"] and os.listdir(tmp_path) == ["1"]


def test_a_writer_that_writes_nothing_is_an_error(tmp_path):
    with pytest.raises(FileNotFoundError, match="wrote nothing"):
        with atomic.atomic_path(str(tmp_path / "x")):
            pass
    assert os.listdir(tmp_path) == []


def test_the_temporary_may_lie_in_another_folder_of_the_same_disk(tmp_path):
    state = tmp_path / ".state"
    state.mkdir()
    with atomic.atomic_path(str(tmp_path / "shard"), tmp_dir=str(state)) as tmp:
        assert os.path.dirname(tmp) == str(state)
        open(tmp, "w").write("records")
    assert (tmp_path / "shard").read_text() == "records" and os.listdir(state) == []


def test_remove_temporaries_removes_only_those_of_killed_writers(tmp_path):
    for name in (".a.npz.0123456789ab.tmp.npz", ".CURRENT.0123456789ab.tmp",
                 "a.npz", ".hidden", "b.tmp"):
        (tmp_path / name).write_text("x")
    (tmp_path / ".1.0123456789ab.tmp").mkdir()
    atomic.remove_temporaries(str(tmp_path))
    assert sorted(os.listdir(tmp_path)) == [".hidden", "a.npz", "b.tmp"]


def test_write_atomic_and_write_json_atomic(tmp_path):
    atomic.write_atomic(str(tmp_path / "t.txt"), "text")
    atomic.write_atomic(str(tmp_path / "b.bin"), b"\0bytes")
    atomic.write_json_atomic(str(tmp_path / "j.json"), {"a": [1, 2]}, indent=1)
    assert (tmp_path / "t.txt").read_text() == "text"
    assert (tmp_path / "b.bin").read_bytes() == b"\0bytes"
    assert json.loads((tmp_path / "j.json").read_text()) == {"a": [1, 2]}
    assert sorted(os.listdir(tmp_path)) == ["b.bin", "j.json", "t.txt"]


def test_set_aside_moves_a_damaged_file_out_of_the_way(tmp_path):
    path = tmp_path / "shard.parquet"
    path.write_text("bad")
    (tmp_path / "shard.parquet.damaged").write_text("older")
    assert atomic.set_aside(str(path)) == str(path) + ".damaged"
    assert not path.exists() and (tmp_path / "shard.parquet.damaged").read_text() == "bad"
