"""The demo: the whole system on generated data, as a library (pipeline);
dplg-demo is its command.

Imports: every layer up to search and bulk.
"""
