"""What both HTTP servers (dplg-serve's REST port and dplg-search-server)
share: the uvicorn/Starlette hosting, JSON errors, connection bounds, the
concurrency gate and the Prometheus page (server), JSON bodies parsed within
bounds (bodies) and access rules (access).

Imports: every layer up to export (in practice only errors).
"""
