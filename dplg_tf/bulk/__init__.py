"""Bulk extraction: the Ray Data job of dplg-extract (job), its CPU-side
reading (reading), and the Ray processes a killed run leaves (leftovers).

Imports: every layer up to retrieval (Ray only here).
"""
