"""The descriptors of an evaluation's images, cached: `extract` describes
(path, bbx) jobs at some scales into `cache_dir/<name>-<key>.npz`, where the
key is what the descriptors depend on (the model, the scales, the images),
through resumable chunks (storage.chunks) while it runs, so an interrupted
evaluation resumes where it stopped.
"""

import os

import numpy as np


def cache_key(describer, scales, name, jobs):
    """What the cached descriptors depend on: the model (its identity and its
    descriptor of the probe image), the scales and the images."""
    import hashlib

    h = hashlib.sha1()
    h.update(f"{describer.identity}|{list(scales)}|{name}|{len(jobs)}".encode())
    h.update(np.round(describer.probe(), 4).tobytes())
    h.update(repr(jobs).encode("utf-8", "surrogateescape"))
    return h.hexdigest()[:16]


def extract(describer, scales, jobs, cache_dir, name, chunk=32, progress=True, workers=4,
            serving_default=False):
    """Descriptors of `jobs` [(path, bbx or None)] at `scales`, cached: the
    finished file `cache_dir/<name>-<key>.npz`, or its resumable chunks
    (storage.chunks) while it is being made. `serving_default`: whole images
    through the model's serving_default (its decoder, its scales), as
    dplg-client and dplg-extract describe; else decoded here (cropped to the
    bbx) and described by the multiscale signature at `scales`."""
    import concurrent.futures

    from dplg_tf import images
    from dplg_tf.console import progress_bar
    from dplg_tf.storage.chunks import ChunkedOutput
    from dplg_tf.storage.descriptors import read_npz

    key = cache_key(describer, "serving_default" if serving_default else scales, name, jobs)
    final = os.path.join(cache_dir, f"{name}-{key}.npz")
    names = [f"{path}|{bbx}" for path, bbx in jobs]
    if os.path.isfile(final):
        rows, cached, _ = read_npz(final)
        if cached == names:
            return rows
    os.makedirs(cache_dir, exist_ok=True)
    run = ChunkedOutput(final, names, chunk, describer.probe())
    bar = progress_bar(len(jobs), f"{name} images", enabled=progress)

    def one(job):
        path, bbx = job
        if serving_default and bbx is None:
            return describer.describe_bytes([images.read_bytes(path)])[0]
        return describer.multiscale(images.load(path, bbx=bbx), scales)["global_descriptor"]

    bar.update(int(run.done.sum()))
    try:
        with concurrent.futures.ThreadPoolExecutor(workers) as pool:
            for start, end in run.batches(max(1, workers)):
                rows = list(pool.map(one, jobs[start:end]))
                run.add(start, end, names[start:end], np.stack(rows).astype(np.float32), [])
                bar.update(end - start)
    finally:
        run.flush()   # what was described is kept, whatever stopped the loop
    bar.close()
    run.finish()
    return read_npz(final)[0] if jobs else np.zeros((0, 0), np.float32)
