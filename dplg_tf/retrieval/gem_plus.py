"""GeM+ (SuperGlobal): the power of the global GeM chosen at extraction time,
by the mAP it gives on labelled training records, since the trained (or
configured) power is rarely the best one for retrieval.

    best, table = choose_gem_p(model, "shards/train-*", scales, ...)

Each candidate power is exported in memory (export.refinements.refined, the
export's own scales and aggregation), the records are described with it,
and the records searched among themselves (evaluation.labelled_map).
"""

import dataclasses

import numpy as np

from dplg_tf.errors import UserError

GRID = (1.0, 2.0, 3.0, 4.0, 4.6, 6.0, 8.0)


def choose_gem_p(model, pattern, scales, max_image_side=1024, min_scaled_side=64,
                 refinements=None, grid=GRID, max_images=500, progress=True):
    """(the best power, [(power, mAP %)] best first) over `grid` plus the
    model's own power, on at most `max_images` records of `pattern`."""
    import tensorflow as tf

    from dplg_tf.console import progress_bar
    from dplg_tf.export.refinements import NONE, refined, trained_gem_p
    from dplg_tf.export.signatures import DescriptorExtractor
    from dplg_tf.retrieval.evaluation import labelled_map
    from dplg_tf.data.pipeline import record_batches

    refinements = refinements or NONE
    batches = list(record_batches(pattern, max_images, batch_size=8))
    labels = np.concatenate([b[1] for b in batches])
    if len(np.unique(labels)) == len(labels):
        raise UserError(f"The records of {pattern!r} hold one image per class; choosing "
                        "the GeM power needs classes with several images.")
    powers = sorted({float(p) for p in grid} | {round(trained_gem_p(model), 4)})
    if any(not 0 < p <= 100 for p in powers):
        raise UserError(f"GeM powers must lie in (0, 100], got {powers}.")
    bar = progress_bar(len(powers) * len(labels), "GeM+ images", enabled=progress)
    table = []
    for p in powers:
        r = dataclasses.replace(refinements, gem_p=p)
        extractor = DescriptorExtractor(refined(model, r), scales, max_image_side,
                                        min_scaled_side, aggregation=r.scale_aggregation)
        describe = tf.function(extractor.describe_bytes)
        rows = []
        for blobs, _ in batches:
            rows.append(describe(tf.constant(blobs))["global_descriptor"].numpy())
            bar.update(len(blobs))
        table.append((p, labelled_map(np.concatenate(rows), labels)))
    bar.close()
    table.sort(key=lambda row: (-row[1], row[0]))
    return table[0][0], table
