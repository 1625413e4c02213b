"""`python -m dplg_tf.cli.costs`: parameters and multiply-adds of each head (dplg_tf.nn.costs)."""

from absl import flags

from dplg_tf import cli


def main(argv):
    from dplg_tf.nn.costs import cost_table, markdown   # TensorFlow, after cli.run's setup

    del argv
    f = flags.FLAGS
    print(markdown(cost_table(f.backbone, f.image_size), f.backbone, f.image_size))


def run():


    flags.DEFINE_enum("backbone", "resnet50", ["resnet50", "resnet101", "small"],
                      "The backbone to count.")
    flags.DEFINE_integer("image_size", 512, "Square image side.", lower_bound=32)
    cli.run(main, "costs")


if __name__ == "__main__":
    run()
