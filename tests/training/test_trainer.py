"""The trainer under tf.distribute, run as users run it (dplg-train in a
subprocess, the CPU split into 2 logical devices)."""

import glob
import json
import os
import signal
import subprocess
import sys
import time

import numpy as np
import pytest

from conftest import free_ports


ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
CONFIG = os.path.join(ROOT, "configs", "demo_cpu.py")


@pytest.fixture
def shards(train_shards):
    return train_shards


def _flags(shards, workdir, **overrides):
    values = {"data.train_pattern": f"{shards}/train-*",
              "data.validation_pattern": f"{shards}/validation-*",
              "data.image_size": 64, "data.shuffle_buffer": 64,
              "data.random_resized_crop": False,
              "model.local_dim": 32, "train.batch_size": 16, "train.max_steps": 30,
              "train.learning_rate": 0.01, "train.warmup_steps": 3,
              "train.log_every": 5, "train.checkpoint_every": 10, "train.eval_batches": 2}
    values.update(overrides)
    return [f"--config={CONFIG}", f"--workdir={workdir}"] + [
        f"--config.{k}={v}" for k, v in values.items()]


def _train(args, env=None, timeout=600, cpu_devices=2):
    cmd = [sys.executable, "-m", "dplg_tf.cli.train", f"--cpu_devices={cpu_devices}"] + args
    return subprocess.run(cmd, capture_output=True, text=True, timeout=timeout,
                          env=env or os.environ.copy())


def _result(workdir):
    with open(os.path.join(workdir, "result.json")) as f:
        return json.load(f)


def _event_tags(folder):
    import tensorflow as tf

    tags = set()
    for path in glob.glob(os.path.join(folder, "events.out.tfevents.*")):
        for event in tf.compat.v1.train.summary_iterator(path):
            for value in event.summary.value:
                tags.add(value.tag)
    return tags


@pytest.mark.slow
def test_mirrored_training_lowers_the_loss_and_logs_everything(shards, tmp_path):
    workdir = str(tmp_path / "run")
    proc = _train(_flags(shards, workdir, profile_steps="20,24"))
    assert proc.returncode == 0, proc.stderr[-4000:]
    result = _result(workdir)
    assert result["replicas"] == 2 and result["global_batch"] == 16
    assert result["per_replica_batch"] == 8  # half the global batch
    assert "global batch 16, per-replica batch 8" in proc.stderr
    losses = np.array(result["losses"])
    assert len(losses) == 30 and result["step"] == 30
    assert losses[-5:].mean() < 0.7 * losses[:5].mean(), losses
    assert os.path.isfile(os.path.join(workdir, "model.keras"))
    assert {"loss", "accuracy", "learning_rate", "gradient_norm", "gem_p", "steps_per_sec",
            "images_per_sec"} <= _event_tags(os.path.join(workdir, "train"))
    assert {"accuracy", "attention", "fusion/attention_entropy",
            "fusion/local_to_global_norm"} <= _event_tags(os.path.join(workdir, "validation"))
    traces = glob.glob(os.path.join(workdir, "train", "plugins", "profile", "*", "*.xplane.pb"))
    assert traces and os.path.getsize(traces[0]) > 0
    assert "step 30/30 loss" in proc.stderr  # the progress line


@pytest.mark.slow
def test_the_saved_model_is_the_descriptor_model(shards, tmp_path):
    from dplg_tf.nn.model import load_model

    workdir = str(tmp_path / "run")
    proc = _train(_flags(shards, workdir, **{"train.max_steps": 2}), cpu_devices=1)
    assert proc.returncode == 0, proc.stderr[-4000:]
    model = load_model(os.path.join(workdir, "model.keras"))
    out = model(np.zeros((1, 96, 128, 3), "float32"))
    assert out["descriptor"].shape == (1, 512) and out["attention"].shape == (1, 6, 8)


@pytest.mark.slow
def test_sigkill_then_restart_resumes_at_the_last_checkpoint(shards, tmp_path):
    import tensorflow as tf

    workdir = str(tmp_path / "run")
    args = _flags(shards, workdir, **{"train.max_steps": 400, "train.checkpoint_every": 4})
    cmd = [sys.executable, "-m", "dplg_tf.cli.train", "--cpu_devices=2"] + args
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    ckpt_dir = os.path.join(workdir, "checkpoints")
    deadline = time.time() + 300
    try:
        while time.time() < deadline:
            latest = tf.train.latest_checkpoint(ckpt_dir) if os.path.isdir(ckpt_dir) else None
            if latest and int(latest.rsplit("-", 1)[1]) >= 12:
                break
            assert proc.poll() is None, "training ended before it could be killed"
            time.sleep(0.2)
        else:
            pytest.fail("no checkpoint at step >= 12 within 300 s")
        os.kill(proc.pid, signal.SIGKILL)  # any moment: maybe in the middle of a save
    finally:
        proc.kill()
        proc.wait()
    latest = tf.train.latest_checkpoint(ckpt_dir)
    saved_step = int(latest.rsplit("-", 1)[1])
    assert not os.path.exists(os.path.join(workdir, "result.json"))
    # the unfinished run can be exported from its checkpoint
    from dplg_tf.export.export import load_for_export

    model = load_for_export(workdir=workdir)
    assert model(np.zeros((1, 64, 64, 3), "float32"))["descriptor"].shape == (1, 512)
    proc = _train(_flags(shards, workdir, **{"train.max_steps": saved_step + 8,
                                             "train.checkpoint_every": 4}))
    assert proc.returncode == 0, proc.stderr[-4000:]
    result = _result(workdir)
    assert result["start_step"] == saved_step
    assert result["step"] == saved_step + 8 and len(result["losses"]) == 8
    assert f"resumed from {latest} at step {saved_step}" in proc.stderr


@pytest.mark.slow
def test_resume_keeps_the_learning_rate_schedule(shards, tmp_path):
    """Ten steps in one go, or five, a stop and five more: same LR at each step."""
    straight, split = str(tmp_path / "straight"), str(tmp_path / "split")
    common = {"train.warmup_steps": 4, "train.log_every": 1}
    one = _train(_flags(shards, straight, **{"train.max_steps": 10}, **common), cpu_devices=1)
    assert one.returncode == 0, one.stderr[-3000:]
    a = _train(_flags(shards, split, **{"train.max_steps": 5, "train.checkpoint_every": 5},
                      **common), cpu_devices=1)
    assert a.returncode == 0, a.stderr[-3000:]
    # the same run continued: max_steps is part of the schedule, so give the same 10
    b = _train(_flags(shards, split, **{"train.max_steps": 10}, **common), cpu_devices=1)
    assert b.returncode == 0, b.stderr[-3000:]

    def lrs(text):
        return {int(line.split("step ")[1].split("/")[0]): line.split(" lr ")[1].split()[0]
                for line in text.splitlines() if " lr " in line and "step " in line}

    first, second = lrs(one.stderr), lrs(b.stderr)
    assert second and all(first[s] == lr for s, lr in second.items()), (first, second)
    assert min(second) == 6


@pytest.mark.slow
def test_a_nan_loss_stops_the_run_and_keeps_the_last_good_checkpoint(shards, tmp_path):
    import tensorflow as tf

    workdir = str(tmp_path / "run")
    proc = _train(_flags(shards, workdir, **{"train.debug_nan_step": 8,
                                             "train.checkpoint_every": 5}), cpu_devices=1)
    assert proc.returncode == 1
    assert "dplg-train: error: non-finite loss at step 8" in proc.stderr
    assert "Traceback" not in proc.stderr
    latest = tf.train.latest_checkpoint(os.path.join(workdir, "checkpoints"))
    assert latest.endswith("ckpt-5")
    assert not os.path.exists(os.path.join(workdir, "model.keras"))
    reader = tf.train.load_checkpoint(latest)
    for name in reader.get_variable_to_shape_map():
        value = reader.get_tensor(name)
        if isinstance(value, np.ndarray) and value.dtype.kind == "f":
            assert np.all(np.isfinite(value)), name


@pytest.mark.slow
def test_wrong_data_for_the_config_fails_in_one_sentence(shards, tmp_path):
    proc = _train(_flags(shards, str(tmp_path / "run"), **{"loss.num_classes": 99}),
                  cpu_devices=1)
    assert proc.returncode == 2
    assert "config.loss.num_classes=99 but the training data has 6 classes" in proc.stderr
    proc = _train(_flags(shards, str(tmp_path / "run2"), **{"train.batch_size": 15}))
    assert proc.returncode == 2 and "not a multiple of the 2 replicas" in proc.stderr


@pytest.mark.slow
def test_multiworker_training_with_two_local_workers(shards, tmp_path):
    workdir = str(tmp_path / "run")
    ports = free_ports(2)
    cluster = {"worker": [f"127.0.0.1:{p}" for p in ports]}
    procs = []
    scratch = tmp_path / "tmp"
    scratch.mkdir()
    for index in range(2):
        env = os.environ.copy()
        env["TF_CONFIG"] = json.dumps({"cluster": cluster,
                                       "task": {"type": "worker", "index": index}})
        env["TMPDIR"] = str(scratch)  # where the non-chief worker's scratch checkpoints go
        cmd = [sys.executable, "-m", "dplg_tf.cli.train", "--strategy=multiworker"] + _flags(
            shards, workdir, **{"train.max_steps": 4, "train.log_every": 1})
        procs.append(subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE,
                                      stderr=subprocess.PIPE, text=True))
    outputs = []
    try:
        for p in procs:
            outputs.append(p.communicate(timeout=420))
    finally:
        for p in procs:
            p.kill()
    for p, (_, err) in zip(procs, outputs):
        assert p.returncode == 0, err[-4000:]
    assert ("MultiWorkerMirroredStrategy: 2 replicas, global batch 16, per-replica batch 8"
            in outputs[0][1])
    result = _result(workdir)  # written by the chief only
    assert result["step"] == 4 and result["replicas"] == 2
    assert not [n for n in os.listdir(scratch) if n.startswith("dplg_worker_ckpt_")]
    assert not [n for n in os.listdir(workdir) if n.endswith(".tmp.keras")]


@pytest.mark.slow
def test_shards_of_another_builder_train_without_dataset_info(shards, tmp_path):
    """DELG's builder writes no dataset_info.json: classes and counts are read
    from the records once; every output file is whole."""
    import shutil

    delg = tmp_path / "delg"
    delg.mkdir()
    for name in os.listdir(shards):
        if name.startswith("train-"):
            shutil.copy(os.path.join(shards, name), delg / name)
    workdir = str(tmp_path / "run")
    args = _flags(str(delg), workdir, **{"train.max_steps": 3, "train.log_every": 1,
                                         "data.validation_pattern": ""})
    proc = _train(args, cpu_devices=1)
    assert proc.returncode == 0, proc.stderr[-3000:]
    with open(os.path.join(workdir, "config.json")) as f:
        assert json.load(f)["loss"]["num_classes"] == 6
    assert _result(workdir)["step"] == 3
    assert sorted(n for n in os.listdir(workdir) if not os.path.isdir(
        os.path.join(workdir, n))) == ["config.json", "model.keras", "result.json"]
