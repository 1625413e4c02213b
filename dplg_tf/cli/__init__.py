"""The command layer: one thin absl module per console script.

Each `dplg_tf.cli.<command>` defines its flags, reads them in its `main`,
calls the library and maps errors to exit codes (dplg_tf.errors): a
UserError is one sentence on stderr and exit 2. Nothing outside this
package reads absl's FLAGS. It may import every other layer.
"""

import sys

from absl import app

from dplg_tf.console import quiet_tensorflow
from dplg_tf.errors import BAD_INPUT, UserError


def fail(name, message, code=BAD_INPUT):
    """Print `name: error: message` on stderr and exit with `code`."""
    print(f"{name}: error: {message}", file=sys.stderr)
    sys.exit(code)


def run(main, name):
    """`app.run(main)`, turning UserError into `name: error: <sentence>`, exit 2.

    Quiet by default: TensorFlow's start-up lines and noisy library loggers
    are filtered (dplg_tf.console); --verbosity=1 shows everything."""

    def guarded(argv):
        from absl import flags

        quiet_tensorflow(verbose=flags.FLAGS.verbosity >= 1)
        try:
            return main(argv)
        except UserError as e:
            fail(name, e)

    def parse(argv):
        """absl's flag parsing, with a bad flag value as one sentence and exit 2."""
        from absl import flags

        try:
            return flags.FLAGS(argv)
        except flags.Error as e:
            fail(name, f"{e}; see --helpfull.")

    app.run(guarded, flags_parser=parse)


def wait_for_stop_signal(log):
    """Block until SIGTERM or SIGINT (a server's main thread)."""
    import signal
    import threading

    stopping = threading.Event()

    def on_signal(signum, frame):
        del frame
        log.info("signal %d: finishing the requests in flight and stopping", signum)
        stopping.set()

    signal.signal(signal.SIGTERM, on_signal)
    signal.signal(signal.SIGINT, on_signal)
    while not stopping.wait(0.5):
        pass
