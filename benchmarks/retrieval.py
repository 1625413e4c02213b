"""Retrieval beyond the paper: what SuperGlobal's extraction refinements and
shortlist re-ranking, alpha-QE, DBA and whitening add to our trained models,
and what re-ranking costs behind a pq index at 1M distractors.

Part 1 (mAP): the dplg runs of benchmarks/ablation.py (demo_cpu config, one run
a seed; missing runs are trained here the same way), each exported plain and
with the refinements (dplg_tf.export.refinements): regional GeM, GeM+ (its
power chosen by dplg_tf.retrieval.gem_plus on 240 training records) and all
of them with the scale maximum. The synthetic evaluation set is described by
each export's multiscale signature at the paper's 5 scales; the scale mean
(the paper) and maximum are both taken from its scale descriptors (equal to
the graph's, tests/export/test_refinements.py). Rows: mAP Easy / Medium /
Hard, mean +- the 95% t-interval over seeds, and Medium minus raw paired by
seed. alpha-QE and DBA with k = 2, alpha = 3; re-ranking M = 400, K = 9,
beta = 0.15; the whitening is dplg-whiten's supervised one, its dimension
chosen on held-out training classes (the only row that uses labels).

Part 2 (cost): 1M generated unit descriptors (512-d, clustered) in a pq
index (4-bit fast-scan codes, exact re-ranking of 10 x k), 70 queries:
ms/query of the index search for the shortlist of M, of fetching its
vectors, of the re-ranking, batched (all queries in one call) and single
(one query a call).

Usage: python benchmarks/retrieval.py [--work /tmp/abl] [--seeds 0,1,2,3,4]
           [--skip_map] [--skip_cost] [--vectors 1000000]
"""

import argparse
import json
import os
import sys
import time

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from ablation import interval, train  # noqa: E402
from common import record  # noqa: E402

from dplg_tf.storage.atomic import write_atomic  # noqa: E402

ROWS = ("raw (the paper)", "scale maximum", "regional GeM", "GeM+", "all three",
        "raw + re-ranking", "all three + re-ranking", "all three + QE + DBA",
        "all three + QE + DBA + re-ranking", "raw + whitening",
        "all three + whitening + QE + DBA + re-ranking")
LABELLED = set(ROWS[-2:])
# rows computed from the cached descriptors after the first run (the pair that gained
# alone, without regional GeM, which lost)
LATER = ("scale maximum + GeM+", "scale maximum + GeM+ + QE + DBA")
QE = {"qe_k": 2, "qe_alpha": 3.0, "dba_k": 2, "dba_alpha": 3.0, "dba_graph": "exact"}
RERANK = {"m": 400, "k": 9, "beta": 0.15}


def describe(base, dataset):
    """(database, queries) x (mean, max) of the scale descriptors at the paper's scales."""
    from dplg_tf import images
    from dplg_tf.config import PAPER_SCALES
    from dplg_tf.retrieval.describers import Describer

    describer = Describer(model=base)

    def one(path, bbx=None):
        s = describer.multiscale(images.load(path, bbx=bbx), PAPER_SCALES)["scale_descriptors"]
        s = np.asarray(s, np.float64)
        return [v / np.linalg.norm(v) for v in (s.mean(0), s.max(0))]

    db = [one(dataset.image_path(i)) for i in range(len(dataset.imlist))]
    q = [one(dataset.query_path(i), dataset.bbx(i)) for i in range(len(dataset.qimlist))]
    return ({"mean": np.float32([d[0] for d in db]), "max": np.float32([d[1] for d in db])},
            {"mean": np.float32([d[0] for d in q]), "max": np.float32([d[1] for d in q])})


def score(dataset, queries, db, expansion=None, rerank=None):
    """(Easy, Medium, Hard) mAP of one query path (retrieval.query)."""
    from dplg_tf.retrieval import evaluation, query

    settings = query.Settings(**(expansion or {}), rerank=bool(rerank), rerank_params=rerank)
    ranks = query.run(queries, np.array(db), settings).ids.T
    r = evaluation.evaluate(ranks, dataset)
    return [r[p]["mAP"] for p in ("easy", "medium", "hard")]


def seed_descriptors(run, model, shards):
    """{variant: (db, queries) x (mean, max)} of one run's exports (made here
    when missing) and the GeM+ power; kept in run/beyond-descriptors.npz."""
    from dplg_tf.config import PAPER_SCALES
    from dplg_tf.data.revisited import load_dataset
    from dplg_tf.export import export
    from dplg_tf.export.refinements import Refinements
    from dplg_tf.retrieval.gem_plus import choose_gem_p

    cache = os.path.join(run, "beyond-descriptors.npz")
    if os.path.isfile(cache):
        with np.load(cache) as f:
            arrays = {k: f[k] for k in f.files}
        out = {}
        for key, value in arrays.items():
            if key != "gem_p":
                variant, side, pool = key.split("/")
                out.setdefault(variant, ({}, {}))[side == "q"][pool] = value
        return out, float(arrays["gem_p"])
    dataset = load_dataset(os.path.join(os.path.dirname(run), "data"), "synthetic")
    gem_p_file = os.path.join(run, "beyond-gem_p.json")
    if os.path.isfile(gem_p_file):
        with open(gem_p_file) as f:
            p = json.load(f)
    else:
        start = time.perf_counter()
        p, table = choose_gem_p(model, os.path.join(shards, "train-*"), PAPER_SCALES,
                                max_images=240, progress=False)
        print(f"{os.path.basename(run)}: GeM+ chose p = {p:g} "
              f"({time.perf_counter() - start:.0f} s): "
              + ", ".join(f"{q:g}: {s:.1f}" for q, s in sorted(table)), flush=True)
        write_atomic(gem_p_file, json.dumps(p))
    variants = {"plain": Refinements(), "regional": Refinements(regional_gem=True),
                "gemp": Refinements(gem_p=p),
                "all": Refinements(scale_aggregation="max", regional_gem=True, gem_p=p)}
    out = {}
    for name, r in variants.items():
        base = os.path.join(run, "beyond", name)
        if not os.path.isdir(os.path.join(base, "1")):
            export.export(model, base, version=1, refinements=r)
        out[name] = describe(os.path.join(base, "1"), dataset)
    np.savez(cache + ".tmp.npz", gem_p=p, **{
        f"{v}/{'q' if i else 'db'}/{pool}": a for v, sides in out.items()
        for i, side in enumerate(sides) for pool, a in side.items()})
    os.replace(cache + ".tmp.npz", cache)   # a killed run leaves no half-written cache
    return out, p


SWEEP = ((400, 9), (400, 3), (400, 1), (100, 9), (100, 3), (50, 3))


def sweep(work, seed, dataset):
    """{(m, k): Medium mAP} of re-ranking settings on the "all three + QE + DBA"
    descriptors of one run (a sensitivity check, measured on the test set)."""
    from dplg_tf.nn.model import load_model

    run = os.path.join(work, f"dplg_{seed}")
    out, _ = seed_descriptors(run, load_model(os.path.join(run, "model.keras")),
                              os.path.join(work, "shards"))
    db, q = out["all"][0]["max"], out["all"][1]["max"]
    found = {"none": score(dataset, q, db, QE)[1]}
    for m, k in SWEEP:
        found[(m, k)] = score(dataset, q, db, QE, {"m": m, "k": k, "beta": 0.15})[1]
    return found


def later_rows(work, seed, dataset):
    """{row: [E, M, H]} of LATER, from the run's cached descriptors."""
    run = os.path.join(work, f"dplg_{seed}")
    out, _ = seed_descriptors(run, None, os.path.join(work, "shards"))
    db, q = out["gemp"][0]["max"], out["gemp"][1]["max"]
    return {LATER[0]: score(dataset, q, db), LATER[1]: score(dataset, q, db, QE)}


def one_seed(work, seed, dataset, shards, steps):
    """{row: [E, M, H]} of one seed's run, kept in run/beyond.json."""
    from dplg_tf.nn.model import load_model
    from dplg_tf.retrieval import whitening
    from dplg_tf.retrieval.describers import Describer

    run = os.path.join(work, f"dplg_{seed}")
    done = os.path.join(run, "beyond.json")
    if os.path.isfile(done):
        with open(done) as f:
            return json.load(f)
    if not os.path.isfile(os.path.join(run, "model.keras")):
        train(run, "dplg", seed, shards, steps)
    model = load_model(os.path.join(run, "model.keras"))
    out, p = seed_descriptors(run, model, shards)
    rows = {}
    plain_db, plain_q = out["plain"]
    rows[ROWS[0]] = score(dataset, plain_q["mean"], plain_db["mean"])
    rows[ROWS[1]] = score(dataset, plain_q["max"], plain_db["max"])
    rows[ROWS[2]] = score(dataset, out["regional"][1]["mean"], out["regional"][0]["mean"])
    rows[ROWS[3]] = score(dataset, out["gemp"][1]["mean"], out["gemp"][0]["mean"])
    all_db, all_q = out["all"][0]["max"], out["all"][1]["max"]
    rows[ROWS[4]] = score(dataset, all_q, all_db)
    rows[ROWS[5]] = score(dataset, plain_q["mean"], plain_db["mean"], rerank=RERANK)
    rows[ROWS[6]] = score(dataset, all_q, all_db, rerank=RERANK)
    rows[ROWS[7]] = score(dataset, all_q, all_db, QE)
    rows[ROWS[8]] = score(dataset, all_q, all_db, QE, RERANK)
    verdicts = {}
    for variant, row, q, db, post in (("plain", ROWS[9], plain_q["mean"], plain_db["mean"], {}),
                                      ("all", ROWS[10], all_q, all_db, {"e": QE, "r": RERANK})):
        mean, projection, meta = whitening.learn(
            Describer(model=os.path.join(run, "beyond", variant, "1")),
            os.path.join(shards, "train-*"), "supervised", 0, progress=False)
        held = meta["held_out"]
        verdicts[variant] = {"dim": meta["output_dim"], "raw": held["raw_map"],
                             "whitened": held["whitened_map"]}
        print(f"seed {seed}: whitening of {variant} {meta['output_dim']}-d, held-out mAP raw "
              f"{held['raw_map']:.1f} whitened {held['whitened_map']:.1f}", flush=True)
        rows[row] = score(dataset, whitening.apply(q, mean, projection),
                          whitening.apply(db, mean, projection), post.get("e"), post.get("r"))
    rows["_gem_p"] = p
    rows["_whitening"] = verdicts
    write_atomic(done, json.dumps(rows))
    print(f"seed {seed}: " + "; ".join(f"{k} {v[1]:.2f}" for k, v in rows.items()
                                      if not k.startswith("_")), flush=True)
    return rows


def map_table(work, seeds, steps):
    from dplg_tf.data.revisited import load_dataset

    dataset = load_dataset(os.path.join(work, "data"), "synthetic")
    shards = os.path.join(work, "shards")
    runs = {s: one_seed(work, s, dataset, shards, steps) for s in seeds}
    for s in seeds:
        runs[s].update(later_rows(work, s, dataset))
    lines = ["| descriptor | mAP Easy | mAP Medium | mAP Hard | Medium minus raw, paired |",
             "|---|---:|---:|---:|---:|"]
    medium = {}
    order = list(ROWS[:5]) + list(LATER) + list(ROWS[5:])
    for row in order:
        v = np.array([runs[s][row] for s in seeds])
        d = v[:, 1] - np.array([runs[s][ROWS[0]][1] for s in seeds])
        medium[row] = d.mean()
        lines.append(f"| {row} | " + " | ".join(interval(v[:, i]) for i in range(3))
                     + f" | {interval(d)} |")
    best = max((r for r in order[1:] if r not in LABELLED), key=medium.get)
    powers = [runs[s]["_gem_p"] for s in seeds]
    dims = {s: runs[s]["_whitening"] for s in seeds}
    sizes = (len(dataset.qimlist), len(dataset.imlist))
    sweeps = [sweep(work, s, dataset) for s in seeds]
    sweep_lines = ["| re-ranking of all three + QE + DBA | mAP Medium | minus no re-ranking, "
                   "paired |", "|---|---:|---:|"]
    for key in ["none"] + list(SWEEP):
        v = np.array([sw[key] for sw in sweeps])
        d = v - np.array([sw["none"] for sw in sweeps])
        label = "none" if key == "none" else f"M = {key[0]}, K = {key[1]}"
        sweep_lines.append(f"| {label} | {interval(v)} | {interval(d)} |")
    table = "\n".join(lines) + "\n\nRe-ranking settings (beta 0.15), measured on the " \
        "evaluation set itself, so a sensitivity check, not a tuned result:\n\n" \
        + "\n".join(sweep_lines)
    return table, best, medium[best], powers, dims, runs, sizes


def unseen_shards(work):
    """Shards of 20 landmarks x 8 views that no run trained on (another seed)."""
    from dplg_tf.data import synthetic, tfrecords

    out = os.path.join(work, "unseen_shards")
    if not os.path.isdir(out):
        data = os.path.join(work, "unseen_data")
        synthetic.generate(data, num_landmarks=20, views_per_landmark=8, num_eval_landmarks=1,
                           queries_per_landmark=1, db_per_landmark=3, num_distractors=0,
                           width=192, height=144, seed=7, progress=False)
        items, _ = tfrecords.list_image_dir(os.path.join(data, "train"))
        tfrecords.build(out + ".tmp", items, num_shards=1, progress=False)
        os.replace(out + ".tmp", out)
    return out


def whitening_check(work, seeds, runs):
    """Markdown: for each seed, dplg-whiten's verdict on the plain export's
    whitening measured on held-out training classes (the default) and on
    classes no run trained on (--holdout_records), against what it did to the
    evaluation set (raw + whitening minus raw, Medium)."""
    from dplg_tf.retrieval import whitening
    from dplg_tf.retrieval.describers import Describer

    unseen = unseen_shards(work)
    lines = ["| seed | held-out training classes: raw -> whitened | unseen classes: raw -> "
             "whitened | evaluation set, Medium: whitened minus raw |", "|---|---:|---:|---:|"]
    agree = 0
    for seed in seeds:
        run = os.path.join(work, f"dplg_{seed}")
        cache = os.path.join(run, "beyond-whiten-check.json")
        if not os.path.isfile(cache):
            _, _, meta = whitening.learn(
                Describer(model=os.path.join(run, "beyond", "plain", "1")),
                os.path.join(work, "shards", "train-*"), "supervised", 0, progress=False,
                holdout_records=os.path.join(unseen, "train-*"))
            write_atomic(cache, json.dumps(meta["held_out"]))
        with open(cache) as f:
            other = json.load(f)
        split = runs[seed]["_whitening"]["plain"]
        gain = runs[seed][ROWS[9]][1] - runs[seed][ROWS[0]][1]
        agree += (other["whitened_map"] >= other["raw_map"]) == (gain >= 0)
        lines.append(f"| {seed} | {split['raw']:.1f} -> {split['whitened']:.1f} | "
                     f"{other['raw_map']:.1f} -> {other['whitened_map']:.1f} | {gain:+.2f} |")
    return "\n".join(lines), agree


def clustered(n, dim, seed, centres=4096, spread=0.9):
    rng = np.random.default_rng(seed)
    c = rng.standard_normal((centres, dim), dtype=np.float32)
    c /= np.linalg.norm(c, axis=1, keepdims=True)
    out = np.empty((n, dim), np.float32)
    for start in range(0, n, 100_000):
        m = min(100_000, n - start)
        x = c[rng.integers(0, centres, m)] + spread * rng.standard_normal(
            (m, dim), dtype=np.float32) / np.sqrt(dim)
        out[start:start + m] = x / np.linalg.norm(x, axis=1, keepdims=True)
    return out


def cost(n, queries=70, dim=512):
    from dplg_tf.retrieval.rerank import rerank
    from dplg_tf.search.index import DescriptorIndex

    m = RERANK["m"]
    db = clustered(n, dim, 0)
    q = clustered(queries, dim, 1)
    start = time.perf_counter()
    index = DescriptorIndex(dim, "pq")
    for s in range(0, n, 200_000):
        index.add(db[s:s + 200_000], [str(i) for i in range(s, min(n, s + 200_000))])
    built = time.perf_counter() - start
    del db
    timings = {}
    for mode, groups in (("batched", [np.arange(queries)]),
                         ("single", [np.array([i]) for i in range(queries)])):
        t = {"search": 0.0, "fetch": 0.0, "rerank": 0.0}
        for g in groups:
            a = time.perf_counter()
            _, ids = index.search(q[g], m)
            b = time.perf_counter()
            vectors = index.vectors(ids)
            c = time.perf_counter()
            rerank(q[g], vectors, RERANK["k"], RERANK["beta"], ids >= 0)
            d = time.perf_counter()
            t["search"] += b - a
            t["fetch"] += c - b
            t["rerank"] += d - c
        timings[mode] = {k: 1000 * v / queries for k, v in t.items()}
    return built, timings


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--work", default="/tmp/abl", help="benchmarks/ablation.py's --work")
    parser.add_argument("--seeds", default="0,1,2,3,4")
    parser.add_argument("--steps", type=int, default=1200)
    parser.add_argument("--vectors", type=int, default=1_000_000)
    parser.add_argument("--skip_map", action="store_true")
    parser.add_argument("--skip_cost", action="store_true")
    args = parser.parse_args()
    seeds = [int(s) for s in args.seeds.split(",")]
    body = []
    if not args.skip_map:
        table, best, gain, powers, dims, runs, sizes = map_table(args.work, seeds, args.steps)
        check, agree = whitening_check(args.work, seeds, runs)
        print(table + "\n\n" + check)
        body.append(f"""{table}

The dplg runs of benchmarks/ablation.py (demo_cpu, {args.steps} steps, seeds {args.seeds};
60 training landmarks x 20 views) on the synthetic evaluation set ({sizes[0]} queries,
{sizes[1]} database images, distractors included), the paper's 5 scales. GeM+ powers chosen per
seed on 240 training records: {powers} (the model was trained with p = 3).
Whitening: dplg-whiten's supervised one, dimension chosen on held-out training classes
(per seed, for the plain and the "all three" export: dimension, held-out mAP raw and
whitened; dplg-whiten refuses to write a file whose whitened figure is the lower, and
these rows apply it anyway, as --force would):
`{json.dumps(dims)}`.
QE / DBA k = 2, alpha = 3; re-ranking M = 400 (the whole database here), K = 9,
beta = 0.15. Best label-free row (picked on the evaluation set itself): "{best}",
Medium {gain:+.2f} over raw (mean of the paired differences). The rows "scale maximum +
GeM+" were added after a first run showed regional GeM losing alone; they come from
the same exports (the GeM+ export's scale descriptors, maximum).
Raw scores by seed: `{json.dumps({s: {k: v for k, v in r.items()} for s, r in runs.items()})}`.

Does dplg-whiten's held-out check predict what the whitening does to landmarks the
model never saw? The plain export's whitening, its dimension chosen by each measure
(the evaluation column is the "raw + whitening" row, the default measure's choice); the
unseen classes are 20 landmarks x 8 views generated with another seed.

{check}

The unseen-class measure has the evaluation set's sign on {agree} of {len(seeds)} seeds.""")
    if not args.skip_cost:
        built, t = cost(args.vectors)
        lines = ["| queries | shortlist search (pq) | fetch M vectors | re-ranking | total |",
                 "|---|---:|---:|---:|---:|"]
        for mode, v in t.items():
            lines.append(f"| {mode} | {v['search']:.2f} | {v['fetch']:.2f} | "
                         f"{v['rerank']:.2f} | {sum(v.values()):.2f} |")
        print("\n".join(lines))
        body.append(f"""Cost of re-ranking at {args.vectors:,} distractors, ms per query (70 queries,
512-d, M = 400, K = 9), behind a pq index (built in {built:.0f} s):

""" + "\n".join(lines))
    body.append(f"Command: `python benchmarks/retrieval.py --work {args.work} "
                f"--seeds {args.seeds}" + (" --skip_map" if args.skip_map else "")
                + (" --skip_cost" if args.skip_cost else "") + "`.")
    record("Retrieval beyond the paper (benchmarks/retrieval.py)", "\n\n".join(body))


if __name__ == "__main__":
    main()
