"""Search: the FAISS descriptor index on disk (index), the inputs of dplg-index /
dplg-search (inputs), and the search server (service: the HTTP API and the
web page in static/; queries: checking a search request, its metrics).

Imports: every layer up to retrieval.
"""
