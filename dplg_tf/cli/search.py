"""dplg-search: the nearest indexed images of query images or descriptors.

    dplg-search --index_dir=idx --server=127.0.0.1:8500 query.jpg --top_k=10
    dplg-search --index_dir=idx --model=models/dplg query.jpg
    dplg-search --index_dir=idx --descriptors=queries.npz --output=hits.json
    dplg-search --index_dir=idx --model=models/dplg query.jpg --rerank   # retrieval.rerank

Queries are described by the same model as the index (checked through the
probe descriptor); what was done (QE, re-ranking, as capped by the index's
size) and the results are printed and, with --output, written as JSON:
{"search": {"qe_k": ..., "rerank": ...}, "results": [{"query", "results":
[{"name", "score"}]}]}. Exit codes: 0 done, 1 some query images could not be described (listed
on stderr), 2 bad usage or input.
"""

import json
import sys

from absl import flags

from dplg_tf import cli
from dplg_tf.cli.flags import (define_index_input_flags, define_query_flags, index_inputs,
                              settings_from_flags)
from dplg_tf.errors import UserError
from dplg_tf.retrieval import query
from dplg_tf.search.index import DescriptorIndex
from dplg_tf.storage import extraction
from dplg_tf.storage.atomic import write_atomic


def search_main(argv):
    f = flags.FLAGS
    if f.top_k < 1:
        raise UserError(f"--top_k must be at least 1, not {f.top_k}.")
    settings = settings_from_flags()
    index = DescriptorIndex.load(f.index_dir)
    queries, names, probe, errors = index_inputs(argv, "dplg-search")
    if queries is None:  # a dplg-extract folder: its described images are the queries
        queries, names, _ = extraction.read_all(f.descriptors)
    if probe is not None:
        index.check_probe(probe)
    index.tune(f.refine, f.nprobe, f.ef_search)
    found = query.run(queries, index, settings, f.top_k)
    scores, ids = found.scores, found.ids
    done = found.settings.report()
    print("search: " + ", ".join(f"{k}={v}" for k, v in done.items() if v is not None))
    results = []
    for name, row_scores, row_ids in zip(names, scores, ids):
        hits = [{"name": index.names[i], "score": round(float(s), 5)}
                for s, i in zip(row_scores, row_ids) if i >= 0]
        results.append({"query": name, "results": hits})
        print(name)
        for rank, hit in enumerate(hits, 1):
            print(f"  {rank:3d}. {hit['score']:.4f}  {hit['name']}")
    if f.output:
        write_atomic(f.output, json.dumps({"search": done, "results": results}, indent=1))
    if errors:
        sys.exit(1)


def run_search():
    define_index_input_flags()
    flags.DEFINE_integer("top_k", 10, "Results per query.", lower_bound=1, upper_bound=10000)
    flags.DEFINE_string("output", None, "Also write the results as JSON here.")
    flags.DEFINE_integer("refine", None, "pq / ivfpq: candidates re-ranked exactly, as a "
                         "multiple of top_k (default: the index's).", lower_bound=1,
                         upper_bound=1000)
    flags.DEFINE_integer("nprobe", None, "ivfpq: inverted lists scanned per query.",
                         lower_bound=1, upper_bound=65536)
    flags.DEFINE_integer("ef_search", None, "hnsw: size of the search frontier.",
                         lower_bound=1, upper_bound=100000)
    define_query_flags(qe=True, rerank=True)
    cli.run(search_main, "dplg-search")


if __name__ == "__main__":
    sys.exit(run_search())
