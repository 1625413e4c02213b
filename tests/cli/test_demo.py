"""The demo command as a user runs it."""

import json
import os
import subprocess
import sys

import numpy as np
import pytest

from dplg_tf.search.index import DescriptorIndex


def test_describe_a_generated_image(tmp_path):
    out = tmp_path / "demo.npz"
    proc = subprocess.run(
        [sys.executable, "-m", "dplg_tf.cli.demo", "--describe", f"--output={out}",
         "--height=160", "--width=224"],
        capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "L2 norm 1.000000" in proc.stdout
    saved = np.load(out)
    assert saved["image"].shape == (160, 224, 3) and saved["image"].dtype == np.uint8
    assert saved["descriptor"].shape == (512,)
    np.testing.assert_allclose(np.linalg.norm(saved["descriptor"]), 1.0, rtol=1e-5)
    assert saved["attention"].shape == (10, 14)


def test_demo_rejects_a_bad_config_value_in_one_sentence():
    proc = subprocess.run(
        [sys.executable, "-m", "dplg_tf.cli.demo", "--describe", "--config.model.head=transformer"],
        capture_output=True, text=True, timeout=300)
    assert proc.returncode == 2
    assert "dplg-demo: error: config.model.head='transformer' is unknown" in proc.stderr
    assert "Traceback" not in proc.stderr


def test_the_speed_measure_takes_the_best_of_its_timings():
    """A timing slowed by other work does not count (the demo once said
    "about 25 min" and took 4): the fastest of the timings gives the speed."""
    from dplg_tf.demo.pipeline import matmul_gflops

    ticks = iter([0.0, 10.0, 10.0, 10.1, 10.1, 20.1])   # timings of 10 s, 0.1 s, 10 s
    assert matmul_gflops(size=64, timings=3, clock=lambda: next(ticks)) == pytest.approx(
        2 * 64 ** 3 / 0.1 / 1e9)


def test_the_time_estimate_scales_the_reference_and_names_other_work():
    from dplg_tf.demo.pipeline import estimate

    idle, busy = estimate(900, gflops=134, load=0.1), estimate(900, gflops=67, load=0.9)
    assert "should take about 10 min here" in idle and "busy" not in idle
    assert "should take about 20 min here" in busy
    assert "other work keeps the cores 90% busy now, which makes it longer" in busy


def test_helpfull_lists_the_flags():
    proc = subprocess.run([sys.executable, "-m", "dplg_tf.cli.demo", "--helpfull"],
                          capture_output=True, text=True, timeout=300)
    assert "--config" in proc.stdout and "--train_steps" in proc.stdout


@pytest.mark.slow
def test_the_whole_demo_at_a_small_scale(tmp_path):
    workdir = tmp_path / "demo"
    proc = subprocess.run(
        [sys.executable, "-m", "dplg_tf.cli.demo", f"--workdir={workdir}", "--train_steps=12",
         "--num_landmarks=5", "--views_per_landmark=8", "--figures=1",
         "--config.train.batch_size=8", "--config.data.image_size=64"],
        capture_output=True, text=True, timeout=1200)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    for stage in range(1, 10):
        assert f"== {stage}/9" in proc.stdout
    assert "/v1/models/dplg -> version 1 AVAILABLE" in proc.stdout
    hits = [line for line in proc.stdout.splitlines() if "/v1/search (" in line]
    assert hits and hits[0].count(".jpg") >= 3   # the query's top 3 over HTTP
    assert "| untrained | Medium |" in proc.stdout and "| trained | Hard |" in proc.stdout
    assert "dplg-serve exited with 0" in proc.stdout
    figures = os.listdir(workdir / "eval_trained" / "figures")
    assert {"ranked_000.png", "attention_000.png"} <= set(figures)
    assert len(DescriptorIndex.load(str(workdir / "index"))) == 264
    assert (workdir / "results.md").is_file()
    run_config = json.loads((workdir / "run" / "config.json").read_text())
    assert run_config["train"]["batch_size"] == 8  # the --config.* overrides reach dplg-train
    assert run_config["data"]["image_size"] == 64 and run_config["train"]["max_steps"] == 12
