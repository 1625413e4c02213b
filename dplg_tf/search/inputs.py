"""What dplg-index and dplg-search take in: a descriptor file, a dplg-extract
folder, or image files described by one model."""

import os
import sys

import numpy as np

from dplg_tf import images
from dplg_tf.errors import UserError
from dplg_tf.console import progress_bar
from dplg_tf.storage import extraction
from dplg_tf.storage.descriptors import read_npz


def report(errors, command):
    for name, reason in errors[:20]:
        print(f"{command}: skipped {name}: {reason}", file=sys.stderr)
    if len(errors) > 20:
        print(f"{command}: ... and {len(errors) - 20} more", file=sys.stderr)


def read_inputs(paths, descriptors=None, model=None, server=None, model_name="dplg",
                allow_unverified=False, command="dplg-index"):
    """(descriptors, names, probe, errors) from a descriptor file, or of image
    `paths` described by `model` or `server`; for a dplg-extract folder the
    descriptors and names are None (stream them with extraction.iter_descriptors)."""
    paths = list(paths)
    if bool(paths) == bool(descriptors):
        raise UserError("Give either --descriptors or image files / folders.")
    if descriptors and os.path.isdir(descriptors):
        manifest = extraction.check_complete(descriptors)
        return None, None, np.asarray(manifest["probe"], np.float32), []
    if descriptors:
        rows, names, probe = read_npz(descriptors)
        if probe is None and not allow_unverified:
            raise UserError(f"{descriptors} carries no probe descriptor, so the model "
                            "that made it cannot be checked; describe the images again "
                            "with dplg-client, or pass --allow_unverified.")
        return rows, names, probe, []
    from dplg_tf.retrieval.describers import Describer

    describer = Describer(model, server, model_name)
    problems = []
    files = images.list_images(paths, problems)
    if not files:
        raise UserError("No image files found in " + ", ".join(paths) + ".")
    bar = progress_bar(len(files), "images")
    names, rows, errors = describer.describe_files(files, progress=bar)
    bar.close()
    errors = problems + errors
    report(errors, command)
    return rows, names, describer.probe(), errors
