"""Bulk extraction: the Ray Data job of dplg-extract and its CPU-side reading.

Imports: every layer up to retrieval (Ray only here).
"""
