"""The demo command as a user runs it."""

import subprocess
import sys

import numpy as np


def test_demo_describes_a_generated_image(tmp_path):
    out = tmp_path / "demo.npz"
    proc = subprocess.run(
        [sys.executable, "-m", "dplg_tf.demo", f"--output={out}", "--height=160", "--width=224"],
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
        [sys.executable, "-m", "dplg_tf.demo", "--config.model.head=transformer"],
        capture_output=True, text=True, timeout=300)
    assert proc.returncode == 2
    assert "dplg-demo: error: config.model.head='transformer' is unknown" in proc.stderr
    assert "Traceback" not in proc.stderr


def test_helpfull_lists_the_flags():
    proc = subprocess.run([sys.executable, "-m", "dplg_tf.demo", "--helpfull"],
                          capture_output=True, text=True, timeout=300)
    assert "--config" in proc.stdout and "--output" in proc.stdout
