"""The errors every command maps to an exit code, and TensorFlow's error text.

Exit codes, the same for every command: 0 done; 1 done in part, with a
report of what failed (bad images skipped, a training run stopped by a
non-finite loss); 2 bad usage or bad input, as one sentence on stderr and
no traceback. Anything else is a bug and keeps its traceback.

This module is the bottom layer: it imports nothing of the package.
"""

import re

DONE, PARTLY_FAILED, BAD_INPUT = 0, 1, 2


class UserError(ValueError):
    """A problem with the user's input (flags, configs, files), reported as one
    sentence without a traceback (exit code 2)."""


class InputNotFound(UserError, FileNotFoundError):
    """A file or folder the user named does not exist or is not what it should be."""


class OutputExists(UserError, FileExistsError):
    """An output the command would write is already there."""


def shorten(text, limit=80):
    """`text` quoted for an error message, cut to `limit` characters: error
    details never echo unbounded client text."""
    text = str(text)
    return repr(text) if len(text) <= limit else repr(text[:limit]) + f"... ({len(text)} chars)"


def tf_error_message(error):
    """The useful sentence of a TensorFlow op error: an Assert's text, or the
    first line that is not TensorFlow's own framing, whole."""
    text = str(getattr(error, "message", error))
    match = re.search(r"assertion failed: \[(.*)\]", text)
    if match:  # "[part] [part] ...": parts may hold brackets themselves
        parts = match.group(1).split("] [")
        return " ".join(p.strip().strip("'\"") for p in parts)
    framing = ("Graph execution error", "[[", "{{", "Detected at", "<stack traces",
               "File \"", "Op:")
    for line in text.splitlines():
        line = re.sub(r"\s*\[\[\{\{node [^]]*\]\]|\s*\[Op:[^]]*\]", "", line).strip()
        if line and not line.startswith(framing):
            return line
    return type(error).__name__
