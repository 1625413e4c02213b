"""dplg-whiten: learn a whitening of the global descriptor from training records.

    dplg-whiten --model=models/dplg --records='shards/train-*' --output=whiten.npz \
        --kind=supervised --dim=512
    dplg-export --workdir=runs/r50 --whitening=whiten.npz --output_dir=models/dplg_w

The records (dplg-build-tfrecords shards) are described by the SavedModel's
serving_default, so at the export's own scales (the paper's five unless the
export was told otherwise), exactly as the descriptors that the whitening
will later transform. `supervised` learns Lw from the class labels, `pca`
PCA-whitening with shrinkage (dplg_tf.retrieval.whitening). The file keeps the mean,
the projection, and the model's identity and probe descriptor, so that
dplg-export refuses to put it into another model.
"""

import sys

from absl import flags

from dplg_tf import cli
from dplg_tf.retrieval import whitening
from dplg_tf.retrieval.whitening import learn
from dplg_tf.retrieval.describers import Describer
from dplg_tf.storage.whitening import save


def main(argv):
    del argv
    f = flags.FLAGS
    describer = Describer(model=f.model)
    mean, projection, metadata = learn(describer, f.records, f.kind, f.dim, f.max_images,
                                       f.shrinkage)
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
                       "mean eigenvalue.", lower_bound=0.0)
    cli.run(main, "dplg-whiten")


if __name__ == "__main__":
    sys.exit(run())
