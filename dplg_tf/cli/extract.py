"""dplg-extract: describe a whole collection on Ray Data, resumably (dplg_tf.bulk.job).

    dplg-extract --model=models/dplg --output_dir=desc photos/ more/*.jpg list.txt
    dplg-extract --model=models/dplg --output_dir=desc --ray_address=HEAD:6379 s3://b/imgs/
    dplg-extract --server=127.0.0.1:8500 --output_dir=desc photos/
"""

import sys

from absl import flags

from dplg_tf import cli
from dplg_tf.bulk.job import Options, extract
from dplg_tf.images import READ_LIMITS
from dplg_tf.cli.flags import (define_limit_flags, define_model_flags, limits_from_flags,
                               scales_from_flag)


def define_flags():
    define_model_flags()
    flags.DEFINE_string("output_dir", None, "Where the shards go.", required=True)
    flags.DEFINE_list("inputs", None, "Folders, globs, files, .txt listings (also positional).")
    flags.DEFINE_integer("shard_size", 1000, "Images per shard.", lower_bound=1)
    flags.DEFINE_integer("workers", 1, "Describing actors (each loads the model once).",
                         lower_bound=1)
    flags.DEFINE_integer("batch_size", 8, "Images per model call at most.", lower_bound=1)
    flags.DEFINE_float("cpus_per_worker", 0, "CPUs per actor (0: the CPUs / --workers).",
                       lower_bound=0)
    flags.DEFINE_float("gpus_per_worker", 0, "GPUs per actor.", lower_bound=0)
    flags.DEFINE_string("ray_address", None, "Join this Ray cluster instead of a local one.")
    flags.DEFINE_integer("num_cpus", None, "CPUs of the local Ray runtime (default: all).")
    flags.DEFINE_list("scales", None, "Scales (default: those of the model's serving_default).")
    flags.DEFINE_float("commit_seconds", 60.0, "How often an unfinished shard's rows are "
                       "saved (a kill loses at most about this much work).", lower_bound=0,
                       upper_bound=86400)
    define_limit_flags(READ_LIMITS)


def main(argv):
    f = flags.FLAGS
    options = Options(
        output_dir=f.output_dir, model=f.model, server=f.server, model_name=f.model_name,
        shard_size=f.shard_size, workers=f.workers, batch_size=f.batch_size,
        cpus_per_worker=f.cpus_per_worker, gpus_per_worker=f.gpus_per_worker,
        ray_address=f.ray_address, num_cpus=f.num_cpus,
        scales=scales_from_flag(f.scales),
        limits=limits_from_flags(READ_LIMITS), commit_seconds=f.commit_seconds)
    return extract(list(f.inputs or []) + argv[1:], options)


def run():
    define_flags()
    cli.run(main, "dplg-extract")


if __name__ == "__main__":
    sys.exit(run())
