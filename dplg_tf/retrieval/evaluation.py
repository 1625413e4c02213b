"""Revisited Oxford/Paris evaluation (Radenovic et al., CVPR 2018) and dplg-eval.

`compute_map(ranks, gnd, kappas=(1, 5, 10))` follows the reference
evaluation: `ranks` is [n_db, n_query] (database indices, best first), `gnd`
a list of per-query dicts with `ok` and `junk` index lists. For each query
the positions of its `ok` images are taken with the junk images ranked
before them removed; AP is the trapezoidal area over those positions
divided by the number of `ok` images; mP@k is measured at min(k, position
of the last positive). Queries without positives are left out of the means
(their AP and P@k are NaN). Returns `(map, aps, pr, prs)`.

Also here: `evaluate` (the three protocols of a dataset), `labelled_map`
(a labelled set searched against itself) and `markdown_table`. The
descriptors a run needs are cached by retrieval.cache; dplg-eval's run is
retrieval.eval_run.
"""

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
