"""Shared pieces of the command-line tools (absl apps)."""

import sys

from absl import app


class UserError(Exception):
    """A problem with the user's input, reported as one sentence without a traceback."""


def run(main, name):
    """`app.run(main)`, printing user errors (bad flags, configs, files) as
    `name: error: <sentence>` and exiting with status 2."""

    def guarded(argv):
        try:
            return main(argv)
        except (UserError, ValueError, FileNotFoundError) as e:
            print(f"{name}: error: {e}", file=sys.stderr)
            sys.exit(2)

    app.run(guarded)
