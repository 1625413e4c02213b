"""What a command prints on the console: progress bars, and TensorFlow's
start-up chatter kept out of sight.

Progress bars (tqdm) show count, rate and ETA on stderr. On a terminal the
bar is redrawn in place; in logs (CI, nohup) a plain line is printed at most
every 10 seconds, so logs stay short and readable.

TensorFlow's C++ runtime prints a dozen lines when it is imported and when
its devices are first listed (absl's "All log messages before
absl::InitializeLog()", oneDNN, CUDA stubs on machines without a GPU),
before any logging setting applies. After `quiet_tensorflow()`, the first
`import tensorflow` (whoever makes it) and its device listing write their
stderr into a pipe; a small helper process passes on the lines that are not
that chatter, as they come. Should the import crash the process (SIGSEGV,
SIGILL, abort), the helper still passes on what was written before it, so
the crash's last words reach the console. --verbosity=1 (any command) shows
everything.
"""

import contextlib
import logging
import os
import re
import subprocess
import sys

# TensorFlow's start-up lines that say nothing to a user of this package
_CHATTER = re.compile(
    r"^(WARNING: All log messages before absl::InitializeLog|[IWE]\d{4} [\d:.]+ +\d+ "
    r"(port|cudart_stub|cpu_feature_guard|cuda_platform|cuda_executor|cuda_dnn|cuda_fft|"
    r"cuda_blas|gpu_device|cuda_diagnostics)\.cc|To enable the following instructions|"
    r"this TensorFlow binary is optimized)")
# third-party loggers that report normal events as if they were failures
_QUIET_LOGGERS = ("faiss", "faiss.loader")


class _Lines:
    """A file for tqdm that turns its in-place redraws into whole lines (for logs)."""

    def __init__(self, stream):
        self.stream = stream

    def write(self, text):
        text = text.replace("\r", "\n").strip("\n")
        if text.strip():
            self.stream.write(text + "\n")

    def flush(self):
        self.stream.flush()


def progress_bar(total, unit="images", enabled=True):
    """A tqdm bar over `total` items; `.update(n)` and `.close()`."""
    from tqdm import tqdm

    tty = sys.stderr.isatty()
    return tqdm(total=None if total is None else int(total), unit=f" {unit}", disable=not enabled,
                file=sys.stderr if tty else _Lines(sys.stderr),
                mininterval=0.2 if tty else 10.0, dynamic_ncols=tty, ascii=not tty)


# the helper: stdin's lines that are not chatter (argv[1]) to stdout, each at once
_FILTER = """
import re, sys
chatter = re.compile(sys.argv[1])
for line in sys.stdin.buffer:
    if line.strip() and not chatter.search(line.decode("utf-8", "replace")):
        sys.stdout.buffer.write(line if line.endswith(b"\\n") else line + b"\\n")
        sys.stdout.buffer.flush()
"""


@contextlib.contextmanager
def _filtered_stderr():
    """File descriptor 2 into a pipe, read by a helper process that passes
    the lines that are not chatter to the real stderr. The helper outlives a
    crash of this process: it reads to the pipe's end, which comes when the
    last writer (fd 2 here) is closed, by us or by the kernel."""
    sys.stderr.flush()
    saved = os.dup(2)
    read_end, write_end = os.pipe()
    try:
        helper = subprocess.Popen(
            [sys.executable, "-I", "-S", "-c", _FILTER, _CHATTER.pattern], stdin=read_end,
            stdout=saved, start_new_session=True)   # a Ctrl-C reaches us, not the helper
    except OSError:   # no interpreter to start: stderr unfiltered
        os.close(read_end)
        os.close(write_end)
        os.close(saved)
        yield
        return
    os.close(read_end)
    os.dup2(write_end, 2)
    os.close(write_end)
    try:
        yield
    finally:
        sys.stderr.flush()
        os.dup2(saved, 2)   # closes the pipe's last writer: the helper ends
        os.close(saved)
        helper.wait()


class _QuietImport:
    """A meta-path finder for the first `import tensorflow`: it runs the import,
    and the listing of the devices, with stderr filtered. TensorFlow is not
    imported before some code needs it (commands that never do start fast)."""

    def find_spec(self, name, path=None, target=None):
        if name != "tensorflow":
            return None
        sys.meta_path.remove(self)
        import importlib.util

        spec = importlib.util.find_spec(name)
        if spec is None or spec.loader is None:
            return spec
        spec.loader = _QuietLoader(spec.loader)
        return spec


class _QuietLoader:
    def __init__(self, loader):
        self.loader = loader

    def create_module(self, spec):
        return self.loader.create_module(spec)

    def exec_module(self, module):
        with _filtered_stderr():
            self.loader.exec_module(module)
            module.config.list_physical_devices()


def quiet_tensorflow(verbose=False):
    """Keep TensorFlow's start-up chatter (at its import and first device
    listing) out of the console, and quiet the loggers of libraries that
    report normal events as failures; everything is shown when `verbose`,
    except the C++ INFO and WARNING lines (TF_CPP_MIN_LOG_LEVEL=2 unless set).
    Every command calls it (dplg_tf.cli.run) before TensorFlow is imported."""
    # TensorFlow's C++ INFO and WARNING lines; a user's own setting wins
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    if verbose:
        return
    for name in _QUIET_LOGGERS:
        logging.getLogger(name).setLevel(logging.WARNING)
    if "tensorflow" in sys.modules:
        return
    if not any(isinstance(f, _QuietImport) for f in sys.meta_path):
        sys.meta_path.insert(0, _QuietImport())
