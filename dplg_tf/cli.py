"""Shared pieces of the command-line tools (absl apps).

Exit codes, the same for every command: 0 done; 1 done in part, with a
report of what failed (bad images skipped, a training run stopped by a
non-finite loss); 2 bad usage or bad input, as one sentence on stderr and
no traceback. Anything else is a bug and keeps its traceback.
"""

import sys

from absl import app

DONE, PARTLY_FAILED, BAD_INPUT = 0, 1, 2


class UserError(ValueError):
    """A problem with the user's input (flags, configs, files), reported as one
    sentence without a traceback (exit code 2)."""


class InputNotFound(UserError, FileNotFoundError):
    """A file or folder the user named does not exist or is not what it should be."""


class OutputExists(UserError, FileExistsError):
    """An output the command would write is already there."""


def fail(name, message, code=BAD_INPUT):
    """Print `name: error: message` on stderr and exit with `code`."""
    print(f"{name}: error: {message}", file=sys.stderr)
    sys.exit(code)


def run(main, name):
    """`app.run(main)`, turning UserError into `name: error: <sentence>`, exit 2."""

    def guarded(argv):
        try:
            return main(argv)
        except UserError as e:
            fail(name, e)

    app.run(guarded)
