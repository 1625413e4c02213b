"""dplg-search-server: image search over an index folder, as a JSON API and a
web page (dplg_tf.search.service).

    dplg-search-server --index_dir=idx --model=models/dplg --image_root=photos/
    dplg-search-server --index_dir=idx --server=127.0.0.1:8500 --port=8600 --image_root=.
    dplg-search-server --index_dir=idx --model=models/dplg --rerank   # re-rank by default
"""

import logging
import sys

from absl import flags

from dplg_tf import cli
from dplg_tf.cli.flags import (access_from_flags, define_access_flags, define_http_flags,
                              http_limits_from_flags, define_limit_flags,
                              define_model_flags, define_query_flags, limits_from_flags,
                              settings_from_flags)

log = logging.getLogger("dplg_tf.search")


def _define_flags():
    flags.DEFINE_string("index_dir", None, "The index folder (dplg-index).", required=True)
    define_model_flags()
    flags.DEFINE_string("image_root", None, "The folder thumbnails are read from (nothing "
                        "outside it is shown); names are shown relative to it or to the "
                        "index's own image root.")
    flags.DEFINE_string("host", "127.0.0.1", "Address to bind (0.0.0.0 for all).")
    flags.DEFINE_integer("port", 8600, "HTTP port (0: any free port, printed).",
                         lower_bound=0, upper_bound=65535)
    define_limit_flags()
    flags.DEFINE_integer("max_top_k", 1000, "The most results a search may ask for.",
                         lower_bound=1, upper_bound=100000)
    flags.DEFINE_float("reload_seconds", 2.0, "How often to look for a new index state "
                       "(0: never).", lower_bound=0)
    flags.DEFINE_float("timeout_seconds", 30.0, "The most a search may take; past it, or "
                       "when the model server fails, the answer is 503.", lower_bound=0.1)
    flags.DEFINE_integer("workers", 8, "Threads doing searches.", lower_bound=1,
                         upper_bound=1024)
    flags.DEFINE_integer("max_concurrent", 64, "Requests in progress at most; more are "
                         "answered 429.", lower_bound=1, upper_bound=100000)
    # the defaults of a search, which a query may change: "rerank": false, "qe_k": 2
    define_query_flags(qe=True, rerank=True)
    flags.DEFINE_float("grace_seconds", 10.0, "On SIGTERM, time for requests in flight.",
                       lower_bound=0)
    define_access_flags("the API (/v1/..., /metrics; the page and its files need none)")
    define_http_flags()   # header/body/keep-alive timeouts, connections, JSON bounds


def main(argv):
    del argv
    from dplg_tf.errors import UserError
    from dplg_tf.retrieval.describers import Describer
    from dplg_tf.search.searcher import Searcher
    from dplg_tf.search.service import SearchServer

    f = flags.FLAGS
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(message)s")
    if f.image_root is not None:
        import os

        if not os.path.isdir(f.image_root):
            raise UserError(f"--image_root {f.image_root!r} is not a folder.")
    limits = limits_from_flags()
    access = access_from_flags()   # before the model loads: a bad flag fails at once
    describer = Describer(f.model, f.server, f.model_name, limits=limits)
    searcher = Searcher(f.index_dir, describer, f.image_root, limits, f.max_top_k,
                        f.reload_seconds, settings=settings_from_flags(),
                        timeout=f.timeout_seconds)
    server = SearchServer(searcher, f.host, f.port, limits, f.workers,
                          f.max_concurrent, access=access,
                          http_limits=http_limits_from_flags()).start()
    print(f"dplg-search-server: http://{server.address}/ searching {len(searcher.index)} "
          f"images of {f.index_dir} with {describer.identity}", flush=True)
    cli.wait_for_stop_signal(log)
    server.stop(f.grace_seconds)
    describer.close()
    print("dplg-search-server: stopped", flush=True)


def run():
    _define_flags()
    cli.run(main, "dplg-search-server")


if __name__ == "__main__":
    sys.exit(run())
