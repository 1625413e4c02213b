"""The package as users install it: a wheel (not `pip install -e`) in a
fresh environment, its commands run from outside the checkout with their
default config (configs/demo_cpu.py, shipped as dplg_tf/configs). No
network: the wheel is built without build isolation, installed with
--no-index, and the fresh environment sees this one's dependencies through a
.pth file."""

import json
import os
import shutil
import subprocess
import sys
import sysconfig

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
NOT_COPIED = (".venv", ".git", "build", "dist", "*.egg-info", "__pycache__", ".pytest_cache",
              "bazel-*", "demo_run", ".whl")


def _run(cmd, cwd, env, timeout=600):
    proc = subprocess.run(cmd, cwd=cwd, env=env, capture_output=True, text=True,
                          timeout=timeout)
    assert proc.returncode == 0, f"{cmd}\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}"
    return proc


@pytest.fixture(scope="module")
def installed(tmp_path_factory):
    """(the fresh environment's bin folder, a folder outside the checkout, env)."""
    base = tmp_path_factory.mktemp("wheel")
    env = {k: v for k, v in os.environ.items() if not k.startswith(("PYTHON", "PIP_"))}
    env["PIP_DISABLE_PIP_VERSION_CHECK"] = "1"
    # a copy of the checkout, so that the build leaves nothing in it
    source = base / "source"
    shutil.copytree(ROOT, source, ignore=shutil.ignore_patterns(*NOT_COPIED))
    wheels = base / "wheels"
    _run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation",
          "--no-index", "-w", str(wheels), str(source)], base, env)
    [wheel] = wheels.glob("dplg_tf-*.whl")
    venv = base / "venv"
    _run([sys.executable, "-m", "venv", "--without-pip", str(venv)], base, env)
    python = str(venv / "bin" / "python")
    # installed before the .pth below exists, so pip sees no dplg_tf already there
    _run([sys.executable, "-m", "pip", "--python", python, "install", "--no-deps",
          "--no-index", str(wheel)], base, env)
    site = _run([python, "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
                base, env).stdout.strip()
    # this environment's packages, after the fresh one's own; a path line is
    # not scanned for .pth files, so the editable install's finder stays out
    ours = dict.fromkeys([sysconfig.get_paths()["purelib"], sysconfig.get_paths()["platlib"]])
    with open(os.path.join(site, "dependencies.pth"), "w") as f:
        f.write("".join(f"{p}\n" for p in ours))
    outside = base / "elsewhere"
    outside.mkdir()
    return venv / "bin", outside, env


def test_a_checkout_finds_its_own_configs_and_an_install_its_copy(monkeypatch):
    from dplg_tf import config as config_lib

    assert config_lib.config_file("demo_cpu.py") == os.path.join(ROOT, "configs", "demo_cpu.py")
    package = os.path.join(ROOT, "dplg_tf")
    real_isdir = os.path.isdir
    monkeypatch.setattr(os.path, "isdir", lambda p: p == os.path.join(package, "configs")
                        or real_isdir(p))   # as in a wheel's site-packages/dplg_tf
    assert config_lib.config_file("demo_cpu.py") == os.path.join(package, "configs",
                                                                 "demo_cpu.py")


@pytest.mark.slow
def test_the_wheel_holds_the_configs_and_is_the_copy_imported(installed):
    bin_dir, outside, env = installed
    code = ("import dplg_tf, json, os; from dplg_tf.config import config_file; "
            "print(dplg_tf.__file__); print(config_file('demo_cpu.py')); "
            "print(json.dumps(os.listdir(os.path.dirname(config_file('demo_cpu.py')))))")
    out = _run([str(bin_dir / "python"), "-c", code], outside, env).stdout.splitlines()
    venv = os.path.dirname(str(bin_dir))
    assert out[0].startswith(venv + os.sep), out   # not the checkout's editable copy
    assert out[1].startswith(venv + os.sep) and out[1].endswith(
        os.path.join("dplg_tf", "configs", "demo_cpu.py")), out
    shipped = {n for n in json.loads(out[2]) if n.endswith(".py")}
    assert shipped == {n for n in os.listdir(os.path.join(ROOT, "configs")) if n.endswith(".py")}


@pytest.mark.slow
def test_demo_describe_with_the_default_config_from_the_wheel(installed):
    bin_dir, outside, env = installed
    proc = _run([str(bin_dir / "dplg-demo"), "--describe", "--height=96", "--width=128"],
                outside, env)
    assert "backbone=small" in proc.stdout   # configs/demo_cpu.py, not base_config()
    assert "L2 norm 1.000000" in proc.stdout


@pytest.mark.slow
def test_two_training_steps_with_the_default_config_from_the_wheel(installed, train_shards):
    bin_dir, outside, env = installed
    workdir = outside / "run"
    overrides = {"data.train_pattern": f"{train_shards}/train-*",
                 "data.validation_pattern": f"{train_shards}/validation-*",
                 "data.image_size": 64, "data.shuffle_buffer": 64, "model.local_dim": 32,
                 "train.batch_size": 8, "train.max_steps": 2, "train.eval_batches": 1}
    _run([str(bin_dir / "dplg-train"), f"--workdir={workdir}", "--cpu_devices=1"]
         + [f"--config.{k}={v}" for k, v in overrides.items()], outside, env)
    result = json.loads((workdir / "result.json").read_text())
    config = json.loads((workdir / "config.json").read_text())
    assert result["step"] == 2 and len(result["losses"]) == 2
    assert config["model"]["backbone"] == "small"   # the default config was found
    assert config["train"]["warmup_steps"] == 20    # demo_cpu's own value
