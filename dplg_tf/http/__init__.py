"""What both HTTP servers (dplg-serve's REST port and dplg-search-server)
share: the uvicorn/Starlette hosting, JSON errors, body and connection
bounds, the concurrency gate, access rules and the Prometheus page.

Imports: every layer up to export (in practice only errors).
"""
