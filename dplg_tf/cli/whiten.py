"""dplg-whiten: learn a whitening of the global descriptor from training records.

    dplg-whiten --model=models/dplg --records='shards/train-*' --output=whiten.npz \
        --kind=supervised --dim=512
    dplg-export --workdir=runs/r50 --whitening=whiten.npz --output_dir=models/dplg_w

The records (dplg-build-tfrecords shards) are described by the SavedModel's
serving_default, so at the export's own scales (the paper's five unless the
export was told otherwise), exactly as the descriptors that the whitening
will later transform. `supervised` learns Lw from the class labels, `pca`
PCA-whitening with shrinkage (dplg_tf.retrieval.whitening). A share of the
classes (--holdout_fraction) is held out: the dimension (unless --dim) and
pca's shrinkage (unless --shrinkage) are chosen by the held-out classes'
mAP (or by --holdout_records, classes the model never saw: the fairer
measure), the table is printed, the chosen setting is learned on every record,
and a whitening that makes the held-out mAP worse than the raw descriptor's
is refused (exit 2) unless --force. The file keeps the mean,
the projection, and the model's identity and probe descriptor, so that
dplg-export refuses to put it into another model.
"""

import sys

from absl import flags

from dplg_tf import cli
from dplg_tf.retrieval import whitening
from dplg_tf.retrieval.whitening import check_gain, learn
from dplg_tf.retrieval.describers import Describer
from dplg_tf.storage.whitening import save


def main(argv):
    del argv
    f = flags.FLAGS
    describer = Describer(model=f.model)
    shrinkage = f.shrinkage if f["shrinkage"].present else None
    mean, projection, metadata = learn(describer, f.records, f.kind, f.dim, f.max_images,
                                       shrinkage, holdout_fraction=f.holdout_fraction,
                                       holdout_records=f.holdout_records)
    held = metadata["held_out"]
    if held is None:
        print("the whitening's effect was not measured (--holdout_fraction=0)")
    else:
        where = (f"the records of {held['records']}" if held["records"]
                 else f"{held['fraction']:g} of the classes")
        print(f"held-out classes ({where}), mAP: raw {held['raw_map']:.2f}")
        for i, row in enumerate(held["table"]):
            setting = f"dim {row['dim']}" + (f", shrinkage {row['shrinkage']:g}"
                                             if row["shrinkage"] is not None else "")
            print(f"  {metadata['kind']} {setting:<28} {row['map']:6.2f}"
                  + ("  <- chosen" if i == 0 else ""))
    check_gain(metadata, f.force)
    save(f.output, mean, projection, **metadata)
    print(f"wrote {f.output}: {metadata['kind']} whitening {metadata['input_dim']} -> "
          f"{metadata['output_dim']} learned on {metadata['images']} images of "
          f"{metadata['classes']} classes")


def run():
    flags.DEFINE_string("model", None, "A SavedModel base path or version folder.",
                        required=True)
    flags.DEFINE_string("records", None, "TFRecord shards with class labels "
                        "(dplg-build-tfrecords), e.g. 'shards/train-*'.", required=True)
    flags.DEFINE_string("output", "whiten.npz", "The whitening file to write.")
    flags.DEFINE_enum("kind", "supervised", list(whitening.KINDS),
                      "supervised (Lw, from the labels) or pca (PCA-whitening).")
    flags.DEFINE_integer("dim", 0, "Output dimension (0: the descriptor's).", lower_bound=0)
    flags.DEFINE_integer("max_images", 0, "Use at most this many records (0: all).",
                         lower_bound=0)
    flags.DEFINE_float("shrinkage", 0.1, "pca: eigenvalue shrinkage, as a share of the "
                       "mean eigenvalue (default: the best of 0.01, 0.1, 0.3, 1 on the "
                       "held-out classes; 0.1 with --holdout_fraction=0).", lower_bound=0.0,
                       upper_bound=1e6)
    flags.DEFINE_float("holdout_fraction", 0.2, "Share of the classes held out to measure "
                       "the whitening (0: no measure, no check).", lower_bound=0.0,
                       upper_bound=0.9)
    flags.DEFINE_string("holdout_records", None, "Labelled shards of classes the model did "
                        "not train on, to measure the whitening on instead of a share of "
                        "--records' classes (which the model knows).")
    flags.DEFINE_bool("force", False, "Write the file even when it makes the held-out "
                      "classes worse.")
    cli.run(main, "dplg-whiten")


if __name__ == "__main__":
    sys.exit(run())
