"""Revisited Oxford/Paris evaluation (Radenovic et al., CVPR 2018) and dplg-eval.

`compute_map(ranks, gnd, kappas=(1, 5, 10))` follows the reference
evaluation: `ranks` is [n_db, n_query] (database indices, best first), `gnd`
a list of per-query dicts with `ok` and `junk` index lists. For each query
the positions of its `ok` images are taken with the junk images ranked
before them removed; AP is the trapezoidal area over those positions
divided by the number of `ok` images; mP@k is measured at min(k, position
of the last positive). Queries without positives are left out of the means
(their AP and P@k are NaN). Returns `(map, aps, pr, prs)`.

    dplg-eval --dataset=roxford5k --data_root=DIR --model=models/dplg
    dplg-eval --dataset=synthetic --data_root=data --server=127.0.0.1:8500 --figures=5
"""

import json
import os
import sys

import numpy as np

from dplg_tf.errors import UserError

from dplg_tf.data.revisited import PROTOCOLS


def compute_ap(positions, num_positives):
    """AP from the 0-based, junk-adjusted positions of the positives."""
    ap = 0.0
    step = 1.0 / num_positives
    for j, rank in enumerate(positions):
        precision_before = 1.0 if rank == 0 else j / rank
        precision_at = (j + 1) / (rank + 1)
        ap += (precision_before + precision_at) * step / 2.0
    return ap


def compute_map(ranks, gnd, kappas=(1, 5, 10)):
    """(mAP, APs [n_query], mP@k [len(kappas)], P@k [n_query, len(kappas)])."""
    ranks = np.asarray(ranks)
    if ranks.ndim != 2 or ranks.shape[1] != len(gnd):
        raise UserError(f"ranks must be [n_db, n_query={len(gnd)}], got {ranks.shape}.")
    n_query = len(gnd)
    aps = np.full(n_query, np.nan)
    prs = np.full((n_query, len(kappas)), np.nan)
    total_ap, total_pr, counted = 0.0, np.zeros(len(kappas)), 0
    for i in range(n_query):
        ok = np.asarray(gnd[i].get("ok", []), dtype=np.int64)
        if ok.size == 0:
            continue
        junk = np.asarray(gnd[i].get("junk", []), dtype=np.int64)
        column = ranks[:, i]
        pos = np.flatnonzero(np.isin(column, ok))
        junk_pos = np.flatnonzero(np.isin(column, junk))
        # each positive moves up by the number of junk images ranked before it
        pos = pos - np.searchsorted(junk_pos, pos)
        ap = compute_ap(pos, len(ok))
        aps[i] = ap
        total_ap += ap
        pos1 = pos + 1
        for j, k in enumerate(kappas):
            kq = min(pos1.max(), k) if pos1.size else k
            prs[i, j] = (pos1 <= kq).sum() / kq
        total_pr += prs[i]
        counted += 1
    if counted == 0:
        return float("nan"), aps, np.full(len(kappas), np.nan), prs
    return total_ap / counted, aps, total_pr / counted, prs


def labelled_map(descriptors, labels, max_queries=2000, seed=0):
    """mAP (%) of a labelled set searched against itself: each descriptor is a
    query, the others of its class are its positives (itself left out);
    classes of a single image ask nothing. Past `max_queries` descriptors a
    seeded sample of them queries (each against the whole set), and a block of
    queries ranks at most ~16M entries, so large sets stay bounded. For
    choices made on training records (GeM+'s power, whitening), not for
    reported results."""
    from dplg_tf.retrieval import knn

    x = np.asarray(descriptors, np.float32)
    x = x / np.maximum(np.linalg.norm(x, axis=1, keepdims=True), 1e-12)
    labels = np.asarray(labels)
    if len(x) != len(labels) or len(x) < 2:
        raise UserError(f"labelled_map needs as many labels as descriptors (>= 2), got "
                        f"{len(x)} and {len(labels)}.")
    queries = np.arange(len(x))
    if len(x) > max_queries:
        queries = np.sort(np.random.default_rng(seed).choice(len(x), max_queries,
                                                             replace=False))
    block = max(1, min(256, 2 ** 24 // len(x)))
    aps = []
    for start in range(0, len(queries), block):
        part = queries[start:start + block]
        ranked = knn.search(x[part], x, len(x))[1]
        for i, row in zip(part, ranked):
            row = row[row != i]
            positions = np.flatnonzero(labels[row] == labels[i])
            if len(positions):
                aps.append(compute_ap(positions, len(positions)))
    if not aps:
        raise UserError("No class has two images, so no query has a positive.")
    return 100.0 * float(np.mean(aps))


def rank(query_descriptors, db_descriptors):
    """[n_db, n_query] database indices by descending inner product."""
    from dplg_tf.retrieval import knn

    return knn.rank(query_descriptors, db_descriptors)


def evaluate(ranks, dataset, kappas=(1, 5, 10)):
    """{protocol: {"mAP": %, "mP@k": %...}} for Easy / Medium / Hard."""
    results = {}
    for protocol in PROTOCOLS:
        m, _, pr, _ = compute_map(ranks, dataset.ground_truth(protocol), kappas)
        results[protocol] = {"mAP": round(100 * m, 2),
                             **{f"mP@{k}": round(100 * p, 2) for k, p in zip(kappas, pr)}}
    return results


def markdown_table(results, title=None):
    """Rows per protocol; `results` {protocol: metrics} or {label: {protocol: metrics}}."""
    first = next(iter(results.values()))
    nested = isinstance(next(iter(first.values())), dict)
    runs = results if nested else {title or "model": results}
    metrics = list(next(iter(next(iter(runs.values())).values())))
    header = "| model | protocol | " + " | ".join(metrics) + " |"
    lines = [header, "|---|---|" + "---:|" * len(metrics)]
    for label, by_protocol in runs.items():
        for protocol, values in by_protocol.items():
            lines.append(f"| {label} | {protocol.capitalize()} | "
                         + " | ".join(f"{values[m]:.2f}" for m in metrics) + " |")
    return "\n".join(lines)


# ------------------------------------------------------------- extraction

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


def _same_scales(a, b):
    return a is not None and b is not None and len(a) == len(b) and np.allclose(
        np.asarray(a, np.float64), np.asarray(b, np.float64), atol=1e-6)


def load_distractors(path, dim, probe, scales, serving_scales=None, allow_unverified=False):
    """Distractor descriptors (+1M), each kind checked against the model like
    every descriptor file: a dplg-extract folder (its probe, and the scales it
    used must be `scales`), a dplg-client .npz (its probe; it was described by
    serving_default, so `scales` must be the model's `serving_scales`) or an
    .npy (no probe: only with `allow_unverified`)."""
    from dplg_tf.storage import extraction
    from dplg_tf.storage.descriptors import read_npz, same_probe

    theirs, kind = None, "npy"
    if os.path.isdir(path):
        manifest = extraction.check_complete(path)
        if not _same_scales(manifest.get("scales"), scales):
            raise UserError(f"The distractors in {path} were described at scales "
                            f"{manifest.get('scales')}, this evaluation uses {list(scales)}; "
                            "pass the same --scales or extract them again.")
        rows, _, theirs = extraction.read_all(path, dim)
        kind = "folder"
    elif path.endswith(".npz"):
        rows, _, theirs = read_npz(path)
        kind = "npz"
        if serving_scales is not None and not _same_scales(serving_scales, scales):
            raise UserError(f"{path} was described by serving_default at the export's scales "
                            f"{[round(s, 4) for s in serving_scales]}, this evaluation uses "
                            f"{[round(s, 4) for s in scales]}; leave --scales out.")
    else:
        try:
            rows = np.load(path, allow_pickle=False)
        except (OSError, ValueError) as e:
            raise UserError(f"{path} is not a readable .npy array ({type(e).__name__}); "
                            "give a dplg-extract folder or a dplg-client .npz.") from None
    if theirs is None and not allow_unverified:
        raise UserError(f"{path} carries no probe descriptor, so the model that made it "
                        "cannot be checked; describe the distractors with dplg-extract or "
                        "dplg-client, or pass --allow_unverified.")
    if theirs is not None and probe is not None and not same_probe(probe, theirs):
        raise UserError(f"The distractors in {path} were described by another model "
                        "(the probe descriptor differs); describe them with this model.")
    rows = np.asarray(rows)
    if rows.ndim != 2 or rows.shape[1] != dim or rows.dtype.kind != "f" or (
            kind == "npy" and not np.all(np.isfinite(rows))):
        raise UserError(f"Distractors in {path} have shape {list(rows.shape)} of "
                        f"{rows.dtype}; expected finite [N, {dim}] descriptors of this model.")
    return rows.astype(np.float32, copy=False)


EXPANSION_OFF = {"qe_k": 0, "qe_alpha": 3.0, "dba_k": 0, "dba_alpha": 3.0, "dba_graph": "auto"}


def expand(queries, database, settings, log=None):
    """(database after DBA, queries after alpha-QE against it). DBA's neighbour
    graph is exact, or approximate at +1M scale (settings["dba_graph"]); the
    recall of an approximate one is measured and logged."""
    from dplg_tf.retrieval import expansion

    neighbours = None
    if settings["dba_k"]:
        database = expansion.normalise(database, in_place=True)
        neighbours, graph = expansion.dba_neighbours(database, settings.get("dba_graph", "auto"))
        if graph != "exact" and log is not None:
            log(f"DBA over {len(database)} descriptors with an approximate ({graph}) "
                f"neighbour graph: recall@{settings['dba_k']} "
                f"{neighbours.recall(settings['dba_k']):.3f} against exact on 1000 rows")
    database = expansion.dba(database, settings["dba_k"], settings["dba_alpha"], neighbours)
    queries = expansion.alpha_qe(queries, database, settings["qe_k"], settings["qe_alpha"])
    return database, queries


def run_eval(dataset_name, data_root, model=None, server=None, model_name="dplg",
             scales=None, cache_dir=None, distractors=None, figures=0, output_dir=None,
             progress=True, workers=4, expansion=None, allow_unverified=False, rerank=None):
    """Extract, rank, score; returns (results, ranks, dataset, db, queries).

    `expansion` {qe_k, qe_alpha, dba_k, dba_alpha}: alpha-QE of the queries
    and DBA of the database (distractors included) before ranking; `rerank`
    {m, k, beta}: each query's first m re-ranked (dplg_tf.retrieval.rerank)."""
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
    expansion = dict(EXPANSION_OFF, **(expansion or {}))
    full_db, expanded = expand(queries, full_db, expansion,
                               log=lambda m: print(m, file=sys.stderr))
    ranks = rank(expanded, full_db)
    if rerank:
        from dplg_tf.retrieval.rerank import rerank_ranks

        ranks = rerank_ranks(ranks, expanded, full_db, **rerank, in_place=True)
    results = evaluate(ranks, dataset)
    os.makedirs(output_dir, exist_ok=True)
    with open(os.path.join(output_dir, "results.json"), "w") as f:
        json.dump({"dataset": dataset_name, "model": describer.identity,
                   "distractors": int(full_db.shape[0] - db.shape[0]), "scales": scales,
                   "refinements": describer.refinements, "expansion": expansion,
                   "rerank": rerank, "results": results},
                  f, indent=1)
    with open(os.path.join(output_dir, "results.md"), "w") as f:
        f.write(markdown_table(results, dataset_name) + "\n")
    if figures:
        from dplg_tf.retrieval import pictures

        from dplg_tf.training.diagnostics import attention_entropy

        entropies = []

        def attention(image):
            a = describer.multiscale(image, scales)["attention"]
            entropies.append(float(attention_entropy(a)[0]))
            return a

        pictures.write_figures(dataset, ranks, attention, output_dir, figures)
        print(f"attention entropy of the drawn images: {np.mean(entropies):.3f} "
              "(1 = uniform: the local branch then averages)", file=sys.stderr)
    return results, ranks, dataset, db, queries
