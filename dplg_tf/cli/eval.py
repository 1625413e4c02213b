"""dplg-eval: the Revisited Oxford / Paris evaluation of a model (dplg_tf.retrieval.evaluation).

    dplg-eval --dataset=roxford5k --data_root=DIR --model=models/dplg
    dplg-eval --dataset=synthetic --data_root=data --server=127.0.0.1:8500 --figures=5
    dplg-eval --dataset=roxford5k --data_root=DIR --model=models/dplg --qe_k=2 --rerank
"""

import os
import sys

from absl import flags

from dplg_tf import cli
from dplg_tf.cli.flags import (define_model_flags, define_query_flags, scales_from_flag,
                              settings_from_flags)
from dplg_tf.retrieval.eval_run import run_eval
from dplg_tf.retrieval.evaluation import markdown_table


def _define_flags():
    flags.DEFINE_string("dataset", None, "Data set: roxford5k, rparis6k, synthetic or any "
                        "folder <data_root>/NAME in the Revisited layout.", required=True)
    flags.DEFINE_string("data_root", None, "Folder holding <dataset>/jpg and the gnd file.",
                        required=True)
    define_model_flags()
    flags.DEFINE_list("scales", None, "Extraction scales (default: those of the model's "
                      "serving_default; the paper's 5 for a server).")
    flags.DEFINE_string("output_dir", None, "Results, cache and figures "
                        "(default: <data_root>/<dataset>/eval).")
    flags.DEFINE_string("distractors", None, "Distractor descriptors (+1M): a dplg-extract "
                        "folder, or an .npz/.npy.")
    flags.DEFINE_integer("figures", 0, "Write ranked-result and attention pictures for N queries.")
    flags.DEFINE_integer("workers", 4, "Images extracted at once.")
    flags.DEFINE_bool("allow_unverified", False, "Accept distractors without a probe "
                      "descriptor (an .npy; the model that made them is then not checked).")
    define_query_flags(qe=True, dba=True, dba_graph=True, rerank=True)


def main(argv):
    del argv
    f = flags.FLAGS
    settings = settings_from_flags()
    results, *_ = run_eval(f.dataset, f.data_root, f.model, f.server, f.model_name,
                           scales_from_flag(f.scales),
                           None, f.distractors, f.figures, f.output_dir, workers=f.workers,
                           settings=settings, allow_unverified=f.allow_unverified)
    print(markdown_table(results, f.dataset))
    out = f.output_dir or os.path.join(f.data_root, f.dataset, "eval")
    print(f"results in {out}/results.json and results.md", file=sys.stderr)


def run():
    _define_flags()
    cli.run(main, "dplg-eval")


if __name__ == "__main__":
    run()
