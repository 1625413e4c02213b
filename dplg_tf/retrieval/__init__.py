"""Retrieval: describers (a local SavedModel, a model server, batches), the
one brute-force kNN, query expansion and DBA, learning whitening, the
Revisited evaluation and pictures.

Imports: every layer up to serving.
"""
