"""dplg-train: train a config with tf.distribute (dplg_tf.training.trainer).

    dplg-train --config=configs/dplg_r50_gldv2.py --workdir=runs/r50
    dplg-train --config=configs/demo_cpu.py --config.train.batch_size=16 --workdir=w
"""

from absl import flags, logging
from ml_collections import config_flags

from dplg_tf import cli
from dplg_tf.config import config_file
from dplg_tf.errors import PARTLY_FAILED
from dplg_tf.training.trainer import TrainingError, train


_DEFAULT_CONFIG = config_file("demo_cpu.py")


def _define_flags():
    config_flags.DEFINE_config_file("config", _DEFAULT_CONFIG, "Training config file.")
    flags.DEFINE_string("workdir", None, "Checkpoints, TensorBoard logs and the model.",
                        required=True)
    flags.DEFINE_enum("strategy", "auto", ["auto", "mirrored", "multiworker"],
                      "auto: MultiWorkerMirrored when TF_CONFIG is set, else Mirrored.")
    flags.DEFINE_integer("cpu_devices", 1,
                         "Without GPUs, split the CPU into this many logical devices.")


def main(argv):
    del argv
    f = flags.FLAGS
    logging.set_verbosity(logging.INFO)
    try:
        train(f.config, f.workdir, f.strategy, f.cpu_devices)
    except TrainingError as e:  # stopped part-way; the checkpoints so far are kept
        cli.fail("dplg-train", e, PARTLY_FAILED)


def run():
    from dplg_tf.training.malloc import keep_freed_memory

    keep_freed_memory()  # before TensorFlow starts its threads
    _define_flags()
    cli.run(main, "dplg-train")


if __name__ == "__main__":
    run()
