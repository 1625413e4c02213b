"""The flag parsers that several commands share (dplg_tf.cli.flags)."""

import os
import subprocess
import sys

import pytest

from dplg_tf.cli.flags import scales_from_flag
from dplg_tf.errors import UserError
from dplg_tf.images import DEFAULT_LIMITS, Limits

ENV = dict(os.environ, TF_CPP_MIN_LOG_LEVEL="2", KERAS_BACKEND="tensorflow")


def test_scales_are_parsed_and_checked_in_one_place():
    assert scales_from_flag(None) is None and scales_from_flag([]) is None
    assert scales_from_flag(["0.5", "1", "1.414"]) == [0.5, 1.0, 1.414]
    for bad, words in [(["abc"], "numbers separated by commas"), (["nan"], "finite"),
                       (["inf"], "finite"), (["0"], "above 0"), (["-1"], "above 0")]:
        with pytest.raises(UserError, match="--scales") as caught:
            scales_from_flag(bad)
        assert words in str(caught.value)
    # without limits the bounds are the exported model's; with them, theirs
    assert scales_from_flag(["3"] + ["1"] * 9) == [3.0] + [1.0] * 9
    assert scales_from_flag(["2.5"], limits=Limits(max_scale=3.0)) == [2.5]
    for bad, words in [(["3"], "(0, 2]"), (["1"] * 9, "1 to 8 values")]:
        with pytest.raises(UserError, match="--scales") as caught:
            scales_from_flag(bad, limits=DEFAULT_LIMITS)
        assert words in str(caught.value)


def test_a_bad_scale_is_one_sentence_and_exit_2(tmp_path):
    """dplg-export's --scales (dplg-eval and dplg-extract call the same parser)."""
    args = ["--config", "configs/demo_cpu.py", "--allow_random_init", "--output_dir",
            str(tmp_path / "m")]
    done = subprocess.run([sys.executable, "-m", "dplg_tf.cli.export", *args,
                           "--scales", "1,x"], env=ENV, capture_output=True, text=True,
                          timeout=300)
    assert done.returncode == 2, done.stderr[-2000:]
    assert "Traceback" not in done.stderr and "--scales must be numbers" in done.stderr
    # the scales are checked against the export's own --max_scale, not the default
    done = subprocess.run([sys.executable, "-m", "dplg_tf.cli.export", *args,
                           "--max_scale=3", "--scales", "2.5,3.5"], env=ENV,
                          capture_output=True, text=True, timeout=300)
    assert done.returncode == 2, done.stderr[-2000:]
    assert "Traceback" not in done.stderr and "(0, 3]" in done.stderr, done.stderr[-2000:]
