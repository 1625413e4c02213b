"""SavedModels on disk: version folders BASE/<integer>/ as TensorFlow Serving
reads them, and the readable sentence of a TensorFlow error."""

import os
import re

from dplg_tf.cli import InputNotFound


def saved_model_versions(base):
    """The complete versions (folders with saved_model.pb) under BASE, oldest first."""
    if not os.path.isdir(base):
        return []
    return sorted(int(d) for d in os.listdir(base)
                  if d.isdigit() and os.path.isfile(os.path.join(base, d, "saved_model.pb")))


def resolve_saved_model(path):
    """A SavedModel folder from a version folder or a base path (its newest version)."""
    if os.path.isdir(path) and not os.path.isfile(os.path.join(path, "saved_model.pb")):
        versions = saved_model_versions(path)
        if not versions:
            raise InputNotFound(f"{path} holds no SavedModel version; run dplg-export.")
        path = os.path.join(path, str(versions[-1]))
    if not os.path.isfile(os.path.join(path, "saved_model.pb")):
        raise InputNotFound(f"{path} is not a SavedModel folder.")
    return os.path.abspath(path)


def next_version(base):
    versions = [int(d) for d in os.listdir(base) if d.isdigit()] if os.path.isdir(base) else []
    return max(versions, default=0) + 1


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
