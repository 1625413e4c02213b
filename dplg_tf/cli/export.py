"""dplg-export: a trained model -> a SavedModel version folder (dplg_tf.export.export).

    dplg-export --workdir=runs/r50 --output_dir=models/dplg
    dplg-export --keras_model=runs/r50/model.keras --output_dir=models/dplg --whitening=w.npz
"""

import sys

from absl import flags
from ml_collections import config_flags

from dplg_tf import cli
from dplg_tf.cli.flags import define_limit_flags, limits_from_flags
from dplg_tf.export.export import export, load_for_export, run_config
from dplg_tf.images import GRAPH_LIMITS


def _define_flags():
    flags.DEFINE_string("workdir", None, "A dplg-train work dir (model.keras or checkpoints).")
    flags.DEFINE_string("keras_model", None, "A .keras descriptor model (dplg-train's "
                        "workdir/model.keras).")
    config_flags.DEFINE_config_file("config", None, "Config file, with --allow_random_init.")
    flags.DEFINE_bool("allow_random_init", False, "Export an untrained model (tests, demos).")
    flags.DEFINE_string("output_dir", None, "The model base path: the SavedModel goes to "
                        "OUTPUT_DIR/<version>/.", required=True)
    flags.DEFINE_alias("export_dir", "output_dir")
    flags.DEFINE_integer("version", None, "Version number (default: the next one).")
    flags.DEFINE_list("scales", None, "Scales of serving_default (default: the config's "
                      "eval.scales, the paper's 5).")
    flags.DEFINE_integer("max_image_side", None, "Longest side before the scales (default: "
                         "the config's eval.max_image_side, 1024).")
    flags.DEFINE_string("whitening", None, "A dplg-whiten file to end both signatures with.")
    define_limit_flags(GRAPH_LIMITS)
    flags.DEFINE_bool("freeze", True, "Write the weights into the graph as constants "
                      "(faster on CPU); --nofreeze keeps them as variables.")


def main(argv):
    del argv
    f = flags.FLAGS
    model = load_for_export(f.workdir, f.keras_model, f.config, f.allow_random_init)
    config = f.config if f.config is not None else run_config(f.workdir)
    scales = [float(s) for s in f.scales] if f.scales else (
        list(config.eval.scales) if config is not None else None)
    max_side = f.max_image_side or (config.eval.max_image_side if config is not None else 1024)
    min_side = config.model.min_image_size if config is not None else 64
    path = export(model, f.output_dir, f.version, scales, max_side, min_side,
                  limits_from_flags(GRAPH_LIMITS), f.freeze, f.whitening)
    print(path)


def run():
    _define_flags()
    cli.run(main, "dplg-export")


if __name__ == "__main__":
    sys.exit(run())
