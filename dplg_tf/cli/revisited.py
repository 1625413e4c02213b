"""`python -m dplg_tf.cli.revisited download|show --data_root=DIR --dataset=NAME`:
fetch or summarise a Revisited Oxford / Paris data set (dplg_tf.data.revisited)."""

import numpy as np
from absl import flags

from dplg_tf import cli
from dplg_tf.data.revisited import PROTOCOLS, download_dataset, load_dataset
from dplg_tf.errors import UserError


def main(argv):
    """`python -m dplg_tf.cli.revisited download|show --data_root=DIR --dataset=NAME`."""
    f = flags.FLAGS
    if len(argv) != 2 or argv[1] not in ("download", "show"):
        raise UserError("Say what to do: download (roxford5k or rparis6k, needs a network) "
                        "or show (summarise a data set on disk).")
    if argv[1] == "download":
        if f.dataset not in ("roxford5k", "rparis6k"):
            raise UserError(f"Only roxford5k and rparis6k can be downloaded, not {f.dataset!r}.")
        download_dataset(f.data_root, f.dataset)
        return
    ds = load_dataset(f.data_root, f.dataset)
    print(ds)
    for protocol in PROTOCOLS:
        counts = [len(ok) for ok, _ in ds.positives(protocol)]
        print(f"{protocol}: {sum(c > 0 for c in counts)} queries with positives, "
              f"{np.mean(counts):.1f} positives per query")


def run():
    flags.DEFINE_string("data_root", None, "Folder holding <dataset>/.", required=True)
    flags.DEFINE_string("dataset", None, "roxford5k, rparis6k or a data set of yours in the "
                        "same layout.", required=True)
    cli.run(main, "revisited")


if __name__ == "__main__":
    run()
