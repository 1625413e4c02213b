"""dplg-client: describe image files through dplg-serve or TF Serving, resumably
(dplg_tf.serving.client).

    dplg-client --server=127.0.0.1:8500 photos/ extra.jpg --output=desc.npz
    dplg-client --server=127.0.0.1:8500 --status
"""

import os
import sys

from absl import flags

from dplg_tf import cli, images
from dplg_tf.cli.flags import define_limit_flags, limits_from_flags
from dplg_tf.errors import UserError
from dplg_tf.console import progress_bar
from dplg_tf.retrieval.describers import describe_files
from dplg_tf.serving.client import Client, ClientError
from dplg_tf.storage.chunks import ChunkedOutput


def _define_flags():
    flags.DEFINE_string("server", "127.0.0.1:8500", "host:port of dplg-serve or TF Serving.")
    flags.DEFINE_string("model_name", "dplg", "Model name on the server.")
    flags.DEFINE_integer("model_version", None, "A specific version (default: the served one).")
    flags.DEFINE_string("output", "descriptors.npz", "The descriptor file to write (exactly "
                        "this name; unfinished work waits in <output>.parts/).")
    flags.DEFINE_integer("batch_size", 8, "Images per request.", lower_bound=1)
    flags.DEFINE_integer("chunk_size", 256, "Images per saved part at most; a part is "
                         "also saved every minute (a rerun resumes after the saved parts).",
                         lower_bound=1)
    flags.DEFINE_integer("concurrency", 4, "Requests in flight.", lower_bound=1)
    flags.DEFINE_float("deadline", 120.0, "Seconds per request before it is abandoned.")
    flags.DEFINE_integer("retries", 4, "Retries on UNAVAILABLE / RESOURCE_EXHAUSTED.")
    flags.DEFINE_bool("status", False, "Print the model's status and signatures, then exit.")
    define_limit_flags(images.READ_LIMITS)


def main(argv):
    f = flags.FLAGS
    limits = limits_from_flags(images.READ_LIMITS)
    with Client(f.server, f.model_name, f.deadline, f.retries, version=f.model_version,
                max_message_mb=limits.max_request_mb) as c:
        if f.status:
            for version, state in c.status():
                print(f"{f.model_name} version {version}: {state}")
            for name, (inputs, outputs) in sorted(c.signatures().items()):
                print(f"signature {name}: inputs {inputs} -> outputs {outputs}")
            return
        problems = []
        files = images.list_images(argv[1:], problems)
        if not files and not problems:
            raise UserError("Name image files or folders to describe (or use --status).")
        if os.path.isdir(f.output):
            raise UserError(f"--output {f.output} is a folder; name a file.")
        try:
            probe = c.describe_bytes([images.probe_bytes()])[0]
            run = ChunkedOutput(f.output, files, f.chunk_size, probe)
            for name, reason in run.damaged:
                print(f"dplg-client: {f.output}.parts/{name} is {reason}: its images are "
                      "described again", file=sys.stderr)
            bar = progress_bar(len(files), "images")
            bar.update(int(run.done.sum()))
            for start, end in run.batches(f.batch_size * f.concurrency):
                ok, rows, errors = describe_files(c.describe_bytes, files[start:end],
                                                  f.batch_size, f.concurrency, limits, bar)
                run.add(start, end, ok, rows, errors)
            bar.close()
        except ClientError as e:
            run.flush()
            print(f"dplg-client: error: {e}; finished work is kept in {f.output}.parts "
                  "and a rerun resumes from it.", file=sys.stderr)
            sys.exit(1)
        count, dim, errors = run.finish()
    errors = problems + errors
    print(f"wrote {count} descriptors of dimension {dim} to {f.output}")
    if errors:
        for name, reason in errors[:20]:
            print(f"dplg-client: skipped {name}: {reason}", file=sys.stderr)
        print(f"dplg-client: {len(errors)} images were not described; their names and "
              f"reasons are in {f.output} (error_names, error_reasons).", file=sys.stderr)
        sys.exit(1)


def run():
    _define_flags()
    cli.run(main, "dplg-client")


if __name__ == "__main__":
    run()
