"""dplg-eval's run: describe a Revisited dataset (cached), add distractors
(+1M), search through the one query path (retrieval.query), score
(retrieval.evaluation) and write results.json / results.md and pictures.

    dplg-eval --dataset=roxford5k --data_root=DIR --model=models/dplg
    dplg-eval --dataset=synthetic --data_root=data --server=127.0.0.1:8500 --figures=5
"""

import os
import sys

import numpy as np

from dplg_tf.errors import UserError
from dplg_tf.retrieval import query
from dplg_tf.retrieval.cache import extract
from dplg_tf.retrieval.evaluation import evaluate, markdown_table
from dplg_tf.storage.atomic import write_atomic, write_json_atomic


def _same_scales(a, b):
    return a is not None and b is not None and len(a) == len(b) and np.allclose(
        np.asarray(a, np.float64), np.asarray(b, np.float64), atol=1e-6)


def load_distractors(path, dim, probe, scales, serving_scales=None, allow_unverified=False):
    """Distractor descriptors (+1M), each kind checked against the model like
    every descriptor file: a dplg-extract folder (its probe, and the scales it
    used must be `scales`), a dplg-client .npz (its probe; it was described by
    serving_default, so `scales` must be the model's `serving_scales`), an
    index folder (its probe; it records no scales) or an .npy (no probe: only
    with `allow_unverified`)."""
    from dplg_tf.storage.descriptors import same_probe
    from dplg_tf.storage.sources import open_descriptors

    source = open_descriptors(path, allow_unverified, rows=False)
    if source.kind == "folder" and not _same_scales(source.scales, scales):
        raise UserError(f"The distractors in {path} were described at scales "
                        f"{source.scales}, this evaluation uses {list(scales)}; "
                        "pass the same --scales or extract them again.")
    if source.kind == "npz" and serving_scales is not None and not _same_scales(
            serving_scales, scales):
        raise UserError(f"{path} was described by serving_default at the export's scales "
                        f"{[round(s, 4) for s in serving_scales]}, this evaluation uses "
                        f"{[round(s, 4) for s in scales]}; leave --scales out.")
    if source.probe is not None and probe is not None and not same_probe(probe, source.probe):
        raise UserError(f"The distractors in {path} were described by another model "
                        "(the probe descriptor differs); describe them with this model.")
    rows = source.read_rows(dim)
    if rows.shape[1] != dim:
        raise UserError(f"Distractors in {path} have shape {list(rows.shape)} of "
                        f"{rows.dtype}; expected finite [N, {dim}] descriptors of this model.")
    return rows


def run_eval(dataset_name, data_root, model=None, server=None, model_name="dplg",
             scales=None, cache_dir=None, distractors=None, figures=0, output_dir=None,
             progress=True, workers=4, settings=None, allow_unverified=False):
    """Extract, rank, score; returns (results, ranks, dataset, db, queries).

    `settings` (retrieval.query.Settings): DBA of the database (distractors
    included), alpha-QE of the queries and re-ranking, as dplg-search does."""
    from dplg_tf.config import PAPER_SCALES
    from dplg_tf.data.revisited import load_dataset
    from dplg_tf.retrieval.describers import Describer

    dataset = load_dataset(data_root, dataset_name)
    describer = Describer(model, server, model_name)
    serving = describer.scales   # a local SavedModel's serving_default scales (None: a server)
    scales = list(scales or serving or PAPER_SCALES)
    # the database (like distractors from dplg-client or dplg-extract) through the
    # SavedModel's own decoder at its own scales when those are the scales asked for
    own_path = _same_scales(serving, scales) if serving else scales == list(PAPER_SCALES)
    output_dir = output_dir or os.path.join(data_root, dataset_name, "eval")
    cache_dir = cache_dir or os.path.join(output_dir, "cache")
    db = extract(describer, scales, [(dataset.image_path(i), None)
                                     for i in range(len(dataset.imlist))],
                 cache_dir, "database", progress=progress, workers=workers,
                 serving_default=own_path)
    queries = extract(describer, scales, [(dataset.query_path(i), dataset.bbx(i))
                                          for i in range(len(dataset.qimlist))],
                      cache_dir, "queries", progress=progress, workers=workers)
    full_db = db
    if distractors:
        full_db = np.concatenate([db, load_distractors(
            distractors, db.shape[1], describer.probe(), scales, serving,
            allow_unverified)])
    found = query.run(queries, full_db, settings or query.OFF,
                      log=lambda m: print(m, file=sys.stderr))
    ranks = found.ids.T   # [n_db, n_query], the protocol's layout
    results = evaluate(ranks, dataset)
    os.makedirs(output_dir, exist_ok=True)
    write_json_atomic(os.path.join(output_dir, "results.json"), {
        "dataset": dataset_name, "model": describer.identity,
        "distractors": int(full_db.shape[0] - db.shape[0]), "scales": scales,
        "refinements": describer.refinements, "query": found.settings.report(),
        "results": results}, indent=1)
    write_atomic(os.path.join(output_dir, "results.md"),
                 markdown_table(results, dataset_name) + "\n")
    if figures:
        from dplg_tf.images.attention import entropy as attention_entropy
        from dplg_tf.retrieval import pictures

        entropies = []

        def attention(image):
            a = describer.multiscale(image, scales)["attention"]
            entropies.append(float(attention_entropy(a)[0]))
            return a

        pictures.write_figures(dataset, ranks, attention, output_dir, figures)
        print(f"attention entropy of the drawn images: {np.mean(entropies):.3f} "
              "(1 = uniform: the local branch then averages)", file=sys.stderr)
    return results, ranks, dataset, db, queries
