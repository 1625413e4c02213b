"""dplg-demo: the whole system on generated data, on 2 CPU cores
(dplg_tf.demo.pipeline: data, TFRecords, training, export, dplg-serve, the
index, the search server, the evaluation and pictures; an interrupted demo
resumes).

    dplg-demo                        # in ./demo_run
    dplg-demo --describe             # only build the model and describe an image
"""

from absl import flags
from ml_collections import config_flags

from dplg_tf import cli
from dplg_tf.config import config_file

_DEFAULT_CONFIG = config_file("demo_cpu.py")
FLAGS = flags.FLAGS


def main(argv):
    del argv
    from dplg_tf.demo import pipeline

    if FLAGS.describe:
        pipeline.describe(FLAGS.config, FLAGS.height, FLAGS.width, FLAGS.seed, FLAGS.output)
        return
    pipeline.run(FLAGS.config, FLAGS.workdir,
                 config_flags.get_config_filename(FLAGS["config"]),
                 dict(config_flags.get_override_values(FLAGS["config"])),
                 FLAGS.train_steps, FLAGS.num_landmarks, FLAGS.views_per_landmark,
                 FLAGS.figures)


def _define_flags():
    config_flags.DEFINE_config_file("config", _DEFAULT_CONFIG, "Model and training config file.")
    flags.DEFINE_string("workdir", "demo_run", "Where the demo keeps data, runs and results.")
    flags.DEFINE_integer("train_steps", 900, "Training steps of the demo model.")
    flags.DEFINE_integer("num_landmarks", 60, "Training landmarks of the synthetic set.")
    flags.DEFINE_integer("views_per_landmark", 20, "Training views per landmark.")
    flags.DEFINE_integer("figures", 3, "Queries to draw pictures for.")
    flags.DEFINE_bool("describe", False, "Only build the model and describe a generated image.")
    flags.DEFINE_integer("height", 192, "Height of the generated image (--describe).")
    flags.DEFINE_integer("width", 256, "Width of the generated image (--describe).")
    flags.DEFINE_integer("seed", 0, "Seed of the generated image (--describe).")
    flags.DEFINE_string("output", "", "With --describe: an .npz for image, descriptor, attention.")


def run():
    _define_flags()
    cli.run(main, "dplg-demo")


if __name__ == "__main__":
    run()
