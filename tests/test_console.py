"""dplg_tf.console: TensorFlow's start-up chatter filtered without losing a
crash's last words; importing the package changes nothing."""

import os
import signal
import subprocess
import sys

CHATTER = (b"I0000 00:00:1700000000.000000   123 cpu_feature_guard.cc:210] This TensorFlow "
           b"binary is optimized to use available CPU instructions\n")
QUIET_IMPORT = ("from dplg_tf.console import quiet_tensorflow; quiet_tensorflow(); "
                "import tensorflow; import sys; print('after the import', file=sys.stderr)")


def _fake_tensorflow(folder, body):
    """A package named tensorflow in `folder` (found before the real one)."""
    package = folder / "tensorflow"
    package.mkdir()
    (package / "__init__.py").write_text("import os\n" + body)
    env = dict(os.environ, PYTHONPATH=str(folder))
    env.pop("TF_CPP_MIN_LOG_LEVEL", None)
    return env


def test_the_import_chatter_is_filtered_and_other_lines_pass_in_order(tmp_path):
    env = _fake_tensorflow(tmp_path, f"""
os.write(2, {CHATTER!r})
os.write(2, b"a line worth reading\\n")

class config:
    @staticmethod
    def list_physical_devices():
        os.write(2, {CHATTER!r})
        os.write(2, b"no GPU found\\n")
""")
    proc = subprocess.run([sys.executable, "-c", QUIET_IMPORT], env=env, capture_output=True,
                          timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert proc.stderr.decode().splitlines() == ["a line worth reading", "no GPU found",
                                                 "after the import"]


def test_a_crash_during_the_import_keeps_its_last_words(tmp_path):
    """The process dies inside the import (as on a CPU without the
    instructions TensorFlow was built for): what it wrote still arrives."""
    env = _fake_tensorflow(tmp_path, f"""
os.write(2, {CHATTER!r})
os.write(2, b"F the last words before the crash\\n")
os.abort()
""")
    proc = subprocess.run([sys.executable, "-c", QUIET_IMPORT], env=env, capture_output=True,
                          timeout=120)
    assert proc.returncode == -signal.SIGABRT
    assert b"F the last words before the crash" in proc.stderr
    assert b"cpu_feature_guard" not in proc.stderr


def test_importing_the_package_and_its_commands_changes_no_environment_variable():
    commands = sorted(p[:-3] for p in os.listdir(os.path.join(
        os.path.dirname(__file__), "..", "dplg_tf", "cli")) if p.endswith(".py"))
    code = ("import os; before = dict(os.environ); import dplg_tf, dplg_tf.config, "
            "dplg_tf.console; " + "; ".join(f"import dplg_tf.cli.{c}" for c in commands
                                             if c != "__init__") +
            "; assert dict(os.environ) == before, set(os.environ.items()) ^ set(before.items())"
            "; from dplg_tf.console import quiet_tensorflow; quiet_tensorflow()"
            "; print(os.environ['TF_CPP_MIN_LOG_LEVEL'])")
    env = dict(os.environ)
    env.pop("TF_CPP_MIN_LOG_LEVEL", None)
    proc = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True,
                          timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip() == "2"   # the commands' console setting, not the import's
    env["TF_CPP_MIN_LOG_LEVEL"] = "0"   # a user's own setting wins
    proc = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True,
                          timeout=120)
    assert proc.returncode == 0 and proc.stdout.strip() == "0", proc.stderr
