"""Retrieval: describers (a local SavedModel, a model server, batches), the
one brute-force kNN, the one query path after description (query: its
settings, QE / DBA, the first search and the re-rankers), query expansion
and DBA, SuperGlobal's re-ranking, learning whitening, the Revisited
evaluation and pictures.

Imports: every layer up to serving.
"""
