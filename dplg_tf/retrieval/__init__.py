"""Retrieval: describers (a local SavedModel, a model server, batches), the
one brute-force kNN (knn), the one query path after description (query: its
settings, QE / DBA, the first search and the re-rankers), query expansion
and DBA (expansion), SuperGlobal's re-ranking (rerank), learning whitening
(whitening), GeM+'s power (gem_plus), the Revisited metrics (evaluation),
described images cached resumably (cache), dplg-eval's run (eval_run) and
pictures.

Imports: every layer up to serving.
"""
