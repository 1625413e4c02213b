"""The CPU side of dplg-extract: read and check image bytes (the same Limits as
the server) before the describing actors get them (retrieval.describers'
`describe_rows`). Nothing here needs Ray; dplg_tf.bulk.job runs it on Ray Data.
"""


from dplg_tf import images

PROBE = "<dplg probe image>"


def read_rows(paths, limits):
    """(list of bytes or None, list of (status, reason) or None) for `paths`;
    the name PROBE stands for the probe image."""
    blobs, errors = [], []
    for path in paths:
        if path == PROBE:
            blobs.append(images.probe_bytes())
            errors.append(None)
            continue
        try:
            blobs.append(images.read_bytes(path, limits))
            errors.append(None)
        except images.ImageError as e:
            blobs.append(None)
            errors.append((e.reason, f"{e.reason}: {e}"))
    return blobs, errors
