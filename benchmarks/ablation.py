"""The paper's Table 2 ablation (plus DOLG) on the synthetic landmarks.

Each head is trained from scratch with the demo_cpu config and the same
budget (steps, batch, data, seed), exported, and evaluated with the
Revisited protocol at the paper's 5 scales, raw and with a supervised
whitening (128-d) learned on the training records; mAP Medium/Hard per head
and seed, their mean and 95% t-interval over seeds. The result is recorded
whatever it shows.
Runs go seed by seed (every head for seed 0, then seed 1, ...) so that a
stopped run still compares the heads on the same seeds; with --work a rerun
keeps the finished runs (one result.json each) and does only the others.
Usage: python benchmarks/ablation.py [--steps 1200] [--seeds 0,1,2,3,4]
           [--heads gem,no_fusion,dplg] [--work DIR]
"""

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from common import record  # noqa: E402

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
HEADS = ("gem", "no_fusion", "dplg")
# two-sided 95% Student t quantiles by degrees of freedom
T95 = {1: 12.706, 2: 4.303, 3: 3.182, 4: 2.776, 5: 2.571, 6: 2.447, 7: 2.365, 8: 2.306,
       9: 2.262}


def interval(values):
    """'mean +- half-width' of a 95% t-interval (the mean alone for one value)."""
    v = np.asarray(values, np.float64)
    if len(v) < 2:
        return f"{v.mean():.2f}"
    half = T95.get(len(v) - 1, 1.96) * v.std(ddof=1) / np.sqrt(len(v))
    return f"{v.mean():.2f} +- {half:.2f}"


def whitened_scores(run, shards, dataset, db, queries):
    """(Medium, Hard) mAP with a 128-d supervised whitening learned on the
    training records by the run's own export."""
    from dplg_tf.retrieval import whitening
    from dplg_tf.retrieval.describers import Describer
    from dplg_tf.retrieval.evaluation import evaluate
    from dplg_tf.retrieval.knn import rank
    from dplg_tf.cli.whiten import learn

    mean, proj, _ = learn(Describer(model=os.path.join(run, "export")),
                          os.path.join(shards, "train-*"), "supervised", 128, progress=False)
    r = evaluate(rank(whitening.apply(queries, mean, proj), whitening.apply(db, mean, proj)),
                 dataset)
    return r["medium"]["mAP"], r["hard"]["mAP"]


def train(run, head, seed, shards, steps):
    cmd = [sys.executable, "-m", "dplg_tf.cli.train", f"--workdir={run}",
           "--cpu_devices=1", f"--config={os.path.join(ROOT, 'configs', 'demo_cpu.py')}",
           f"--config.model.head={head}", f"--config.train.seed={seed}",
           f"--config.train.max_steps={steps}", f"--config.train.log_every={steps}",
           f"--config.train.checkpoint_every={steps}",
           f"--config.data.train_pattern={shards}/train-*",
           f"--config.data.validation_pattern={shards}/validation-*"]
    subprocess.run(cmd, check=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                   cwd=ROOT)


def run_one(run, head, seed, data, shards, steps):
    """(Medium, Hard, Medium whitened, Hard whitened) of one head and seed;
    kept from an earlier run when its result file is there."""
    from dplg_tf.retrieval import eval_run
    from dplg_tf.export import export

    done = os.path.join(run, "ablation_result.json")
    if os.path.isfile(done):
        print(f"{head} seed {seed}: kept from an earlier run", flush=True)
        with open(done) as f:
            return tuple(json.load(f))
    if not os.path.isfile(os.path.join(run, "model.keras")):  # not trained yet
        shutil.rmtree(run, ignore_errors=True)
        train(run, head, seed, shards, steps)
    base = os.path.join(run, "export")
    shutil.rmtree(base, ignore_errors=True)
    export.export(export.load_for_export(workdir=run), base, version=1)
    results, _, dataset, db, queries = eval_run.run_eval(
        "synthetic", data, model=base, progress=False, output_dir=os.path.join(run, "eval"))
    raw = (results["medium"]["mAP"], results["hard"]["mAP"])
    white = whitened_scores(run, shards, dataset, db, queries)
    with open(done, "w") as f:
        json.dump(raw + white, f)
    print(f"{head} seed {seed}: mAP medium/hard {raw[0]:.2f}/{raw[1]:.2f}, "
          f"whitened {white[0]:.2f}/{white[1]:.2f}", flush=True)
    return raw + white


def fusion_scalars(run):
    """The last validation fusion/... scalars the trainer wrote (entropy of the
    attention, |Vl| / |V'g|), {} for heads without fusion."""
    import glob

    import tensorflow as tf
    from tensorflow.core.util import event_pb2

    out = {}
    for path in sorted(glob.glob(os.path.join(run, "validation", "events.out.tfevents.*"))):
        for raw in tf.data.TFRecordDataset(path):
            for v in event_pb2.Event.FromString(raw.numpy()).summary.value:
                if v.tag.startswith("fusion/"):
                    out[v.tag[len("fusion/"):]] = float(tf.make_ndarray(v.tensor))
    return out


def diagnostics_table(work, heads, seeds):
    """Markdown: each head's fusion diagnostics, mean (min..max) over seeds."""
    rows = ["| head | attention entropy (1 = uniform) | abs(Vl) / abs(V'g) |",
            "|---|---:|---:|"]
    for head in heads:
        found = [fusion_scalars(os.path.join(work, f"{head}_{s}")) for s in seeds]
        found = [f for f in found if f]
        if not found:
            continue
        cells = []
        for key in ("attention_entropy", "local_to_global_norm"):
            v = [f[key] for f in found if key in f]
            cells.append(f"{np.mean(v):.3f} ({min(v):.3f}..{max(v):.3f})" if v else "-")
        rows.append(f"| {head} | " + " | ".join(cells) + " |")
    return "\n".join(rows)


def tables(scores):
    """Markdown: each head's mean and interval over seeds, then each head
    minus the first head paired by seed. `scores` is {head: {seed: 4 scores}}."""
    columns = "| mAP Medium | mAP Hard | Medium, whitened | Hard, whitened | seeds |"
    rule = "|---|---:|---:|---:|---:|---:|"
    rows = ["| head " + columns, rule]
    for head, by_seed in scores.items():
        v = np.array(list(by_seed.values()))
        rows.append(f"| {head} | " + " | ".join(interval(v[:, i]) for i in range(4))
                    + f" | {len(v)} |")
    reference, *others = scores
    paired = ["| paired difference " + columns, rule]
    for head in others:
        seeds = [s for s in scores[head] if s in scores[reference]]
        if len(seeds) < 2:
            continue
        d = np.array([np.subtract(scores[head][s], scores[reference][s]) for s in seeds])
        paired.append(f"| {head} - {reference} | "
                      + " | ".join(interval(d[:, i]) for i in range(4)) + f" | {len(d)} |")
    return "\n".join(rows) + ("\n\n" + "\n".join(paired) if len(paired) > 2 else "")


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--steps", type=int, default=1200)
    parser.add_argument("--seeds", default="0,1,2,3,4")
    parser.add_argument("--heads", default=",".join(HEADS))
    parser.add_argument("--work", default=None,
                        help="keep data and runs here; a rerun skips the finished runs")
    args = parser.parse_args()

    from dplg_tf.data import synthetic, tfrecords

    work = args.work or tempfile.mkdtemp(prefix="dplg_ablation_")
    os.makedirs(work, exist_ok=True)
    data = os.path.join(work, "data")
    try:
        if not os.path.isfile(os.path.join(data, "synthetic.json")):
            synthetic.generate(data, num_landmarks=60, views_per_landmark=20,
                               num_eval_landmarks=12, queries_per_landmark=2,
                               db_per_landmark=12, num_distractors=120, width=192,
                               height=144, seed=0, progress=False)
        shards = os.path.join(work, "shards")
        if not os.path.isdir(shards):
            items, _ = tfrecords.list_image_dir(os.path.join(data, "train"))
            tfrecords.build(shards + ".tmp", items, num_shards=4, progress=False,
                            validation_fraction=0.2)
            os.replace(shards + ".tmp", shards)
        scores = {}
        seeds = [int(s) for s in args.seeds.split(",")]
        for seed in seeds:
            for head in args.heads.split(","):
                scores.setdefault(head, {})[seed] = run_one(
                    os.path.join(work, f"{head}_{seed}"), head, seed, data, shards, args.steps)
        table = tables(scores) + "\n\nFusion diagnostics at the end of training (validation " \
            "batch):\n\n" + diagnostics_table(work, list(scores), seeds)
        print(table)
        record("Ablation on synthetic landmarks (benchmarks/ablation.py)", f"""
{table}

demo_cpu config (small backbone, 128x128 crops, batch 32, one replica),
{args.steps} steps per head and seed, 60 training landmarks x 20 views; evaluated on
12 other landmarks (24 queries, 264 database images) at the paper's 5 scales; mean
+- the half-width of the 95% t-interval over seeds; whitened: supervised, 128-d,
learned on the training records.
Paired: the head minus the first head, seed by seed (only the seeds both have), which
takes out what a seed does to every head alike.
Raw scores by seed: `{json.dumps(scores)}`.
Command: `python benchmarks/ablation.py --steps {args.steps} --seeds {args.seeds} --heads {args.heads}`.
""")
    finally:
        if not args.work:
            shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
