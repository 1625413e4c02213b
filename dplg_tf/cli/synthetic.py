"""dplg-synthetic: generate the synthetic landmark data set (dplg_tf.data.synthetic)."""

import json
import sys

from absl import flags

from dplg_tf import cli
from dplg_tf.data.synthetic import generate


def main(argv):
    f = flags.FLAGS
    summary = generate(f.output_dir, f.num_landmarks, f.views_per_landmark,
                       f.num_eval_landmarks, f.queries_per_landmark, f.db_per_landmark,
                       f.num_distractors, f.width, f.height, f.seed, f.num_workers)
    print(json.dumps(summary), file=sys.stdout)


def _define_flags():
    flags.DEFINE_string("output_dir", None, "Where to write train/ and synthetic/ (the evaluation set).", required=True)
    flags.DEFINE_integer("num_landmarks", 20, "Training landmarks (classes).")
    flags.DEFINE_integer("views_per_landmark", 30, "Training views per landmark.")
    flags.DEFINE_integer("num_eval_landmarks", 10, "Evaluation landmarks (disjoint).")
    flags.DEFINE_integer("queries_per_landmark", 2, "Queries per evaluation landmark.")
    flags.DEFINE_integer("db_per_landmark", 12, "Database views per evaluation landmark.")
    flags.DEFINE_integer("num_distractors", 60, "Database images with no landmark.")
    flags.DEFINE_integer("width", 256, "Image width.")
    flags.DEFINE_integer("height", 192, "Image height.")
    flags.DEFINE_integer("seed", 0, "Seed: the same seed gives the same bytes.")
    flags.DEFINE_integer("num_workers", 0, "Worker processes (0: one per CPU).")


def run():
    _define_flags()
    cli.run(main, "dplg-synthetic")


if __name__ == "__main__":
    run()
