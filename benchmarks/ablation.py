"""The paper's Table 2 ablation (plus DOLG) on the synthetic landmarks.

Each head (gem, no_rfb, no_fusion, dplg, dolg) is trained from scratch with
the demo_cpu config and the same budget (steps, batch, data, seed), exported,
and evaluated with the Revisited protocol at the paper's 5 scales; mAP
Medium/Hard per head and seed. The result is recorded whatever it shows.
Usage: python benchmarks/ablation.py [--steps 400] [--seeds 0,1] [--data DIR]
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
HEADS = ("gem", "no_rfb", "no_fusion", "dplg", "dolg")


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--steps", type=int, default=400)
    parser.add_argument("--seeds", default="0")
    parser.add_argument("--heads", default=",".join(HEADS))
    parser.add_argument("--data", default=None, help="reuse a synthetic data folder")
    args = parser.parse_args()

    from dplg_tf import evaluate, export
    from dplg_tf.data import synthetic, tfrecords

    work = tempfile.mkdtemp(prefix="dplg_ablation_")
    data = args.data or os.path.join(work, "data")
    try:
        if not os.path.isfile(os.path.join(data, "synthetic.json")):
            synthetic.generate(data, num_landmarks=60, views_per_landmark=20,
                               num_eval_landmarks=12, queries_per_landmark=2,
                               db_per_landmark=12, num_distractors=120, width=192,
                               height=144, seed=0, progress=False)
        shards = os.path.join(work, "shards")
        items, _ = tfrecords.list_image_dir(os.path.join(data, "train"))
        tfrecords.build(shards, items, num_shards=4, progress=False)
        scores = {}
        for head in args.heads.split(","):
            for seed in [int(s) for s in args.seeds.split(",")]:
                run = os.path.join(work, f"{head}_{seed}")
                cmd = [sys.executable, "-m", "dplg_tf.train", f"--workdir={run}",
                       "--cpu_devices=2", f"--config={os.path.join(ROOT, 'configs', 'demo_cpu.py')}",
                       f"--config.model.head={head}", f"--config.train.seed={seed}",
                       f"--config.train.max_steps={args.steps}",
                       f"--config.train.log_every={args.steps}",
                       f"--config.train.checkpoint_every={args.steps}",
                       f"--config.data.train_pattern={shards}/train-*",
                       f"--config.data.validation_pattern={shards}/validation-*"]
                subprocess.run(cmd, check=True, stdout=subprocess.DEVNULL,
                               stderr=subprocess.DEVNULL)
                base = os.path.join(run, "export")
                export.export(export.load_for_export(workdir=run), base, version=1)
                results = evaluate.run_eval("synthetic", data, model=base, progress=False,
                                            output_dir=os.path.join(run, "eval"))[0]
                scores.setdefault(head, []).append(
                    (results["medium"]["mAP"], results["hard"]["mAP"]))
                print(f"{head} seed {seed}: mAP medium {results['medium']['mAP']:.2f} "
                      f"hard {results['hard']['mAP']:.2f}", flush=True)
        rows = []
        for head, values in scores.items():
            v = np.array(values)
            spread = (f" (+-{v[:, 0].std():.2f} / +-{v[:, 1].std():.2f})" if len(v) > 1 else "")
            rows.append(f"| {head} | {v[:, 0].mean():.2f} | {v[:, 1].mean():.2f} | {len(v)} |"
                        f"{spread} |")
        table = "\n".join(["| head | mAP Medium | mAP Hard | seeds | spread |",
                           "|---|---:|---:|---:|---|"] + rows)
        print(table)
        record("Ablation on synthetic landmarks (benchmarks/ablation.py)", f"""
{table}

demo_cpu config (small backbone, 128x128 crops, batch 32 over 2 CPU replicas),
{args.steps} steps per head and seed, 60 training landmarks x 20 views; evaluated on
12 other landmarks (24 queries, 264 database images) at the paper's 5 scales.
Raw scores: `{json.dumps(scores)}`.
Command: `python benchmarks/ablation.py --steps {args.steps} --seeds {args.seeds}`.
""")
    finally:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
