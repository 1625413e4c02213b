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

import numpy as np
from absl import flags

from dplg_tf.errors import InputNotFound, UserError
from dplg_tf import cli
from dplg_tf.retrieval import whitening


def read_records(pattern, max_images=0):
    """(encoded images [bytes], labels [int]) of the records matching `pattern`."""
    import tensorflow as tf

    from dplg_tf.data.pipeline import FEATURES

    files = sorted(tf.io.gfile.glob(pattern))
    if not files:
        raise InputNotFound(f"No TFRecord shards match {pattern!r}.")
    blobs, labels = [], []
    ds = tf.data.TFRecordDataset(files).map(
        lambda r: tf.io.parse_single_example(r, FEATURES))
    if max_images:
        ds = ds.take(max_images)
    for example in ds:
        blobs.append(example["image/encoded"].numpy())
        labels.append(int(example["image/class/label"]))
    if not blobs:
        raise UserError(f"The shards {pattern!r} hold no records.")
    return blobs, np.asarray(labels)


def describe_records(describer, blobs, batch_size=16, progress=True):
    from dplg_tf.progress import progress_bar

    bar = progress_bar(len(blobs), "images", enabled=progress)
    rows = []
    for start in range(0, len(blobs), batch_size):
        rows.append(describer.describe_bytes(blobs[start:start + batch_size]))
        bar.update(min(batch_size, len(blobs) - start))
    bar.close()
    return np.concatenate(rows).astype(np.float32)


def learn(describer, pattern, kind, dim, max_images=0, shrinkage=0.1, progress=True):
    """(mean, projection, metadata) learned on the records of `pattern`."""
    if kind not in whitening.KINDS:
        raise UserError(f"--kind={kind!r} is unknown; use supervised or pca.")
    blobs, labels = read_records(pattern, max_images)
    x = describe_records(describer, blobs, progress=progress)
    dim = dim or x.shape[1]
    if kind == "supervised":
        mean, projection = whitening.learn_supervised(x, labels, dim)
    else:
        mean, projection = whitening.learn_pca(x, dim, shrinkage)
    metadata = {"kind": kind, "input_dim": int(x.shape[1]), "output_dim": int(dim),
                "images": len(x), "classes": int(len(np.unique(labels))),
                "records": pattern, "model": describer.identity,
                "probe": [float(v) for v in describer.probe()],
                "scales": "the export's serving_default scales"}
    if kind == "pca":
        metadata["shrinkage"] = shrinkage
    return mean, projection, metadata


def main(argv):
    del argv
    from dplg_tf.retrieval.describers import Describer

    f = flags.FLAGS
    describer = Describer(model=f.model)
    mean, projection, metadata = learn(describer, f.records, f.kind, f.dim, f.max_images,
                                       f.shrinkage)
    whitening.save(f.output, mean, projection, **metadata)
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
