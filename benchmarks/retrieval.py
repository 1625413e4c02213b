"""What whitening, alpha-QE and DBA add to the trained demo model, and what
whitening costs in the served model.

Needs a finished `make demo` work dir (default demo_run): its trained
SavedModel (models/dplg), its TFRecords (shards/) and its synthetic
evaluation set (data/synthetic). The evaluation images are described once
(multiscale, the paper's 5 scales); the whitenings are learned on the
training records described by the same SavedModel (serving_default, the same
scales) and applied to those descriptors exactly as the Whitening layer does
in an exported model (tests/test_retrieval_options.py checks the equality).
Latency: serving_default of the plain and the whitened export, same images,
one process, alternating. Usage: python benchmarks/retrieval.py [--workdir demo_run]
"""

import argparse
import os
import sys
import tempfile
import time

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from common import record  # noqa: E402


def evaluation_descriptors(describer, dataset, cache):
    from dplg_tf.config import PAPER_SCALES
    from dplg_tf.retrieval.evaluation import extract

    db = extract(describer, PAPER_SCALES, [(dataset.image_path(i), None)
                                           for i in range(len(dataset.imlist))],
                 cache, "database", progress=False)
    queries = extract(describer, PAPER_SCALES, [(dataset.query_path(i), dataset.bbx(i))
                                                for i in range(len(dataset.qimlist))],
                      cache, "queries", progress=False)
    return db, queries


def score(dataset, queries, db, qe_k=0, dba_k=0, alpha=3.0):
    from dplg_tf.retrieval.evaluation import evaluate, expand, rank

    db, queries = expand(queries, db, {"qe_k": qe_k, "qe_alpha": alpha, "dba_k": dba_k,
                                       "dba_alpha": alpha})
    r = evaluate(rank(queries, db), dataset)
    return [r[p]["mAP"] for p in ("easy", "medium", "hard")]


def latency(base, whitened, blobs, rounds):
    import tensorflow as tf

    fns = {name: tf.saved_model.load(path).signatures["serving_default"]
           for name, path in (("plain", base), ("whitened", whitened))}
    batch = tf.constant(blobs)
    for fn in fns.values():
        fn(image_bytes=batch)
    times = {name: [] for name in fns}
    for _ in range(rounds):
        for name, fn in fns.items():
            start = time.perf_counter()
            fn(image_bytes=batch)["global_descriptor"].numpy()
            times[name].append(time.perf_counter() - start)
    return {name: float(np.median(t)) for name, t in times.items()}


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--workdir", default="demo_run")
    parser.add_argument("--alpha", type=float, default=3.0)
    parser.add_argument("--k", type=int, default=2, help="QE and DBA neighbours")
    parser.add_argument("--rounds", type=int, default=5)
    args = parser.parse_args()

    from dplg_tf.export import export
    from dplg_tf.retrieval import whitening
    from dplg_tf.storage import whitening as whitening_file
    from dplg_tf.data.revisited import load_dataset
    from dplg_tf.retrieval.describers import Describer
    from dplg_tf.retrieval.whitening import describe_records

    work = os.path.abspath(args.workdir)
    model_base = os.path.join(work, "models", "dplg")
    describer = Describer(model=model_base)
    dataset = load_dataset(os.path.join(work, "data"), "synthetic")
    cache = tempfile.mkdtemp(prefix="dplg_retrieval_")
    db, queries = evaluation_descriptors(describer, dataset, cache)
    train, labels = describe_records(describer, os.path.join(work, "shards", "train-*"),
                                     progress=False)
    print(f"{len(db)} database, {len(queries)} queries, {len(train)} training descriptors",
          flush=True)

    rows = [("raw", score(dataset, queries, db))]
    learned, medium = {}, {}
    for kind in ("supervised", "pca"):
        for dim in (512, 256, 128):
            if kind == "supervised":
                mean, proj = whitening.learn_supervised(train, labels, dim)
            else:
                mean, proj = whitening.learn_pca(train, dim)
            learned[(kind, dim)] = (mean, proj)
            rows.append((f"{kind} whitening {dim}", score(
                dataset, whitening.apply(queries, mean, proj), whitening.apply(db, mean, proj))))
            medium[(kind, dim)] = rows[-1][1][1]
            print(rows[-1], flush=True)
    k, a = args.k, args.alpha
    rows.append((f"alpha-QE (k={k}, alpha={a:g})", score(dataset, queries, db, qe_k=k, alpha=a)))
    rows.append((f"DBA (k={k}, alpha={a:g})", score(dataset, queries, db, dba_k=k, alpha=a)))
    rows.append(("alpha-QE + DBA", score(dataset, queries, db, qe_k=k, dba_k=k, alpha=a)))
    best = max(medium, key=medium.get)
    mean, proj = learned[best]
    wq, wdb = whitening.apply(queries, mean, proj), whitening.apply(db, mean, proj)
    rows.append((f"{best[0]} whitening {best[1]} + alpha-QE + DBA",
                 score(dataset, wq, wdb, qe_k=k, dba_k=k, alpha=a)))
    for row in rows[-4:]:
        print(row, flush=True)

    # the cost of whitening inside the served model
    path = os.path.join(cache, "w.npz")
    whitening_file.save(path, mean, proj, kind=best[0], probe=[float(v) for v in
                                                          describer.probe()])
    model = export.load_for_export(workdir=os.path.join(work, "run"))
    plain = export.export(model, os.path.join(cache, "plain"), version=1)
    white = export.export(model, os.path.join(cache, "white"), version=1, whitening=path)
    images = [open(dataset.image_path(i), "rb").read() for i in range(8)]
    t = latency(plain, white, images, args.rounds)
    ratio = t["whitened"] / t["plain"]
    print(f"serving_default, 8 images: plain {t['plain']:.3f} s, whitened "
          f"{t['whitened']:.3f} s, ratio {ratio:.3f}", flush=True)

    raw = rows[0][1]
    table = "\n".join(["| descriptor | mAP Easy | mAP Medium | mAP Hard | Medium vs raw |",
                       "|---|---:|---:|---:|---:|"] + [
        f"| {name} | {e:.2f} | {m:.2f} | {h:.2f} | {m - raw[1]:+.2f} |"
        for name, (e, m, h) in rows])
    print(table)
    record("Retrieval post-processing (benchmarks/retrieval.py)", f"""
{table}

The demo's trained model (`make demo`, 900 steps of demo_cpu) on the synthetic
Revisited-layout set (24 queries, 264 database images), 5 scales. Whitenings
learned on the {len(train)} training records ({len(set(labels.tolist()))} classes)
described by the same SavedModel. Latency of serving_default on 8 database
images (median of {args.rounds}), plain export {t['plain']:.3f} s, with the
{best[0]} {best[1]}-d whitening layer {t['whitened']:.3f} s: ratio {ratio:.3f}.
Command: `python benchmarks/retrieval.py --workdir {args.workdir}`.
""")


if __name__ == "__main__":
    main()
