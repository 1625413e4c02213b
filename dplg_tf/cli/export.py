"""dplg-export: a trained model -> a SavedModel version folder (dplg_tf.export.export).

    dplg-export --workdir=runs/r50 --output_dir=models/dplg
    dplg-export --keras_model=runs/r50/model.keras --output_dir=models/dplg --whitening=w.npz
    dplg-export --workdir=runs/r50 --output_dir=models/dplg_sg --scale_aggregation=max \
        --regional_gem --gem_p=auto --gem_p_records='shards/train-*'

The refinements (--scale_aggregation, --regional_gem, --gem_p; off by default)
are those of dplg_tf.export.refinements.
"""

import sys

from absl import flags
from ml_collections import config_flags

from dplg_tf import cli
from dplg_tf.cli.flags import define_limit_flags, limits_from_flags, scales_from_flag
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
    flags.DEFINE_enum("scale_aggregation", "mean", ["mean", "max"], "How the scale "
                      "descriptors are combined: their mean (the paper) or element-wise max.")
    flags.DEFINE_bool("regional_gem", False, "Regional GeM on X5 before the global GeM "
                      "(SuperGlobal).")
    flags.DEFINE_float("regional_gem_p", 2.5, "Regional GeM: the power.", lower_bound=0.01,
                       upper_bound=100.0)
    flags.DEFINE_integer("regional_gem_size", 5, "Regional GeM: the window's side.",
                         lower_bound=1, upper_bound=15)
    flags.DEFINE_string("gem_p", None, "GeM+: the global GeM's power at extraction, a "
                        "number, or auto (the best of a grid on --gem_p_records); default: "
                        "the model's own.")
    flags.DEFINE_string("gem_p_records", None, "Labelled TFRecord shards for --gem_p=auto "
                        "(dplg-build-tfrecords), e.g. 'shards/train-*'.")
    flags.DEFINE_integer("gem_p_images", 500, "--gem_p=auto: records used at most.",
                         lower_bound=2, upper_bound=100000)
    flags.DEFINE_enum("precision", "float32", ["float32", "bfloat16", "float16"], "What "
                      "the layers compute in (descriptors are float32 either way): bfloat16 "
                      "is faster on CPUs with AVX-512 BF16 or AMX, float16 on GPUs.")
    flags.DEFINE_bool("freeze", True, "Write the weights into the graph as constants "
                      "(faster on CPU); --nofreeze keeps them as variables.")


def main(argv):
    del argv
    f = flags.FLAGS
    limits = limits_from_flags(GRAPH_LIMITS)
    scales = scales_from_flag(f.scales, limits=limits)   # refused before the model loads
    model = load_for_export(f.workdir, f.keras_model, f.config, f.allow_random_init)
    config = f.config if f.config is not None else run_config(f.workdir)
    scales = scales or (list(config.eval.scales) if config is not None else None)
    max_side = f.max_image_side or (config.eval.max_image_side if config is not None else 1024)
    min_side = config.model.min_image_size if config is not None else 64
    refinements = _refinements(model, scales, max_side, min_side)
    path = export(model, f.output_dir, f.version, scales, max_side, min_side,
                  limits, f.freeze, f.whitening, refinements, f.precision)
    print(path)


def _refinements(model, scales, max_side, min_side):
    """export.refinements.Refinements of the flags; --gem_p=auto is chosen here."""
    import dataclasses

    from dplg_tf.config import PAPER_SCALES
    from dplg_tf.errors import UserError
    from dplg_tf.export.refinements import Refinements

    f = flags.FLAGS
    r = Refinements(f.scale_aggregation, f.regional_gem, f.regional_gem_p, f.regional_gem_size)
    if f.gem_p is None:
        if f.gem_p_records:
            raise UserError("--gem_p_records is only read with --gem_p=auto.")
        return r
    if f.gem_p != "auto":
        try:
            power = float(f.gem_p)
        except ValueError:
            raise UserError(f"--gem_p must be a number or auto, not {f.gem_p!r}.") from None
        return dataclasses.replace(r, gem_p=power)   # checked by Refinements
    if not f.gem_p_records:
        raise UserError("--gem_p=auto needs --gem_p_records (labelled training shards).")
    from dplg_tf.retrieval.gem_plus import choose_gem_p

    best, table = choose_gem_p(model, f.gem_p_records, scales or PAPER_SCALES, max_side,
                               min_side, r, max_images=f.gem_p_images)
    print("GeM+ on the records (each searched against the others):", file=sys.stderr)
    for p, score in table:
        print(f"  p = {p:<6g} mAP {score:6.2f}{'  <- chosen' if p == best else ''}",
              file=sys.stderr)
    return dataclasses.replace(r, gem_p=best)


def run():
    _define_flags()
    cli.run(main, "dplg-export")


if __name__ == "__main__":
    sys.exit(run())
