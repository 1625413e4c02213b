"""dplg-build-tfrecords: image folders or GLDv2 CSVs -> TFRecord shards
(dplg_tf.data.tfrecords)."""

import json
import os
import sys

from absl import flags

from dplg_tf import cli
from dplg_tf.errors import DONE, PARTLY_FAILED
from dplg_tf.data.sources import BuildError, exclude_landmarks, list_gldv2, list_image_dir
from dplg_tf.data.tfrecords import build, relabel


def _define_flags():
    flags.DEFINE_string("image_dir", None, "Folder with one sub-folder of images per class.")
    flags.DEFINE_string("gldv2_csv", None, "GLDv2 train.csv or train_clean.csv.")
    flags.DEFINE_string("gldv2_image_dir", None, "GLDv2 images, laid out as a/b/c/<id>.jpg.")
    flags.DEFINE_string("output_dir", None, "Where the shards go.", required=True)
    flags.DEFINE_integer("num_shards", 8, "Training shards.")
    flags.DEFINE_integer("num_validation_shards", 0,
                         "Validation shards (0: in proportion to num_shards, at least 1).")
    flags.DEFINE_float("validation_fraction", 0.0, "Share of each class held out for "
                       "validation (0: every image trains, as the paper does).")
    flags.DEFINE_integer("validation_per_class", 0, "Instead: this many images of each "
                         "class held out (a class keeps at least one for training).")
    flags.DEFINE_integer("seed", 0, "Seed of the split and the shard order.")
    flags.DEFINE_integer("max_image_size", 0,
                         "Re-encode images whose longest side is larger (0: keep sizes).")
    flags.DEFINE_integer("num_workers", os.cpu_count() or 1, "Shards written at once.")
    flags.DEFINE_string("exclude_landmarks", None, "A file of landmark ids (class folder "
                        "names for --image_dir) left out, such as the landmarks that GLDv2 "
                        "shares with ROxf/RPar (RGLDv2-clean); counted in build_report.json.")
    flags.DEFINE_bool("overwrite", False, "Discard the shards of an earlier, different build.")


def main(argv):
    f = flags.FLAGS
    if bool(f.image_dir) == bool(f.gldv2_csv):
        raise BuildError("Give either --image_dir or --gldv2_csv (with --gldv2_image_dir).")
    ignored, problems = 0, []
    if f.image_dir:
        items, ignored = list_image_dir(f.image_dir, problems)
    else:
        if not f.gldv2_image_dir:
            raise BuildError("--gldv2_csv needs --gldv2_image_dir.")
        items = list_gldv2(f.gldv2_csv, f.gldv2_image_dir)
    excluded = None
    if f.exclude_landmarks:
        items, excluded = exclude_landmarks(items, f.exclude_landmarks)
        print(f"--exclude_landmarks: {excluded['found']} of the {excluded['listed']} listed "
              f"landmarks found, {excluded['images']} images left out", file=sys.stderr)
        if not items:
            raise BuildError(f"Every image belongs to a landmark of {f.exclude_landmarks}; "
                             "nothing is left to train on.")
    print(f"{len(items)} images in {len(relabel(items))} classes", file=sys.stderr)
    summary = build(f.output_dir, items, f.num_shards, f.num_validation_shards,
                    f.validation_fraction, f.seed, f.max_image_size, f.num_workers,
                    f.overwrite, ignored=ignored,
                    log=lambda m: print(m, file=sys.stderr), listing_problems=problems,
                    validation_per_class=f.validation_per_class, excluded=excluded)
    print(json.dumps(summary))
    if summary["bad_files"]:
        print(f"{summary['bad_files']} files skipped: see "
              f"{os.path.join(f.output_dir, 'bad_files.txt')}", file=sys.stderr)
        return PARTLY_FAILED
    return DONE


def run():
    _define_flags()
    cli.run(main, "dplg-build-tfrecords")


if __name__ == "__main__":
    run()
