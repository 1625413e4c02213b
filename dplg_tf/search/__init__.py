"""Search: the FAISS descriptor index on disk (index), the inputs of dplg-index /
dplg-search (inputs), the searcher (an index folder and a describer: reloads,
searches, thumbnails) and the search server in front of it (service: the HTTP
API and the web page in static/; queries: checking a search request, its
metrics; names: images named relative to a root; model_server: is it answering).

Imports: every layer up to retrieval.
"""
