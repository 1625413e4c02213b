"""The SavedModel: graph-side decoding, the exported signatures, export and
SavedModel version folders.

Imports: errors, config, storage, images, nn, data, training.
"""
