"""SavedModels on disk: version folders BASE/<integer>/ as TensorFlow Serving
reads them, and a SavedModel's identity."""

import hashlib
import os

from dplg_tf.errors import InputNotFound


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


def fingerprint(model):
    """The SavedModel's identity without TensorFlow: a hash of its
    fingerprint.pb (which holds checksums of the graph and the weights), or of
    saved_model.pb for exports without one."""
    path = os.path.join(model, "fingerprint.pb")
    if not os.path.isfile(path):
        path = os.path.join(model, "saved_model.pb")
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()
