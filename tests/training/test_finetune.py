"""configs/finetune_cpu.py as a user runs it: a class-folder build without a
validation split, dplg-train with the config and max_steps, dplg-export --workdir."""

import os
import subprocess
import sys

import numpy as np
import pytest

from conftest import image_bytes

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def _run(*args):
    result = subprocess.run([sys.executable, "-m", *args], capture_output=True, text=True,
                            timeout=900, cwd=ROOT)
    assert result.returncode == 0, result.stderr[-3000:]
    return result


@pytest.mark.slow
def test_finetune_cpu_trains_and_exports_from_a_folder_of_photos(tmp_path):
    import tensorflow as tf

    photos = tmp_path / "photos"
    for c in range(3):
        (photos / f"thing{c}").mkdir(parents=True)
        for i in range(5):
            (photos / f"thing{c}" / f"{i}.jpg").write_bytes(image_bytes(150, 200, seed=10 * c + i))
    _run("dplg_tf.cli.build_tfrecords", f"--image_dir={photos}",
         f"--output_dir={tmp_path / 'records'}", "--num_shards=1")
    work = tmp_path / "run"
    _run("dplg_tf.cli.train", "--config=configs/finetune_cpu.py",
         f"--config.data.train_pattern={tmp_path / 'records'}/train-*",
         "--config.train.max_steps=3", "--config.train.batch_size=4", f"--workdir={work}")
    assert (work / "model.keras").is_file()
    _run("dplg_tf.cli.export", f"--workdir={work}", f"--export_dir={tmp_path / 'models'}",
         "--scales=0.7071,1.0")
    loaded = tf.saved_model.load(str(tmp_path / "models" / "1"))
    assert loaded.preprocessing.numpy() == b"lite"
    out = loaded.signatures["serving_default"](
        image_bytes=tf.constant([image_bytes(150, 200, seed=99)]))["global_descriptor"].numpy()
    assert out.shape == (1, 1280) and np.isfinite(out).all()
