"""What dplg-index and dplg-search take in: a descriptor file, a dplg-extract
folder, or image files described by one model."""

import sys

from dplg_tf import images
from dplg_tf.errors import UserError
from dplg_tf.console import progress_bar
from dplg_tf.storage.sources import open_descriptors


def report(errors, command):
    for name, reason in errors[:20]:
        print(f"{command}: skipped {name}: {reason}", file=sys.stderr)
    if len(errors) > 20:
        print(f"{command}: ... and {len(errors) - 20} more", file=sys.stderr)


def read_inputs(paths, descriptors=None, model=None, server=None, model_name="dplg",
                allow_unverified=False, command="dplg-index"):
    """(descriptors, names, probe, errors) from a descriptor source
    (storage.sources: .npz, .npy, an index folder, a dplg-extract folder), or of image
    `paths` described by `model` or `server`; for a dplg-extract folder the
    descriptors and names are None (stream them with extraction.iter_descriptors)."""
    paths = list(paths)
    if bool(paths) == bool(descriptors):
        raise UserError("Give either --descriptors or image files / folders.")
    if descriptors:   # a folder's shards are only checked here: callers stream them
        source = open_descriptors(descriptors, allow_unverified, rows=False)
        return source.rows, source.names, source.probe, []
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
