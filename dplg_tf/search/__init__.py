"""Search: the FAISS descriptor index on disk and the inputs of dplg-index /
dplg-search.

Imports: every layer up to retrieval.
"""
