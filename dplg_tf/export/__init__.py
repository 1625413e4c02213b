"""The SavedModel: graph-side decoding (graph_decode), the exported signatures
(signatures: the one multi-scale extraction), export (export), SuperGlobal's
pooling options (refinements), the precision it computes in (precision), TF
Serving's warm-up file (warmup) and SavedModel version folders (saved_models).

Imports: errors, config, storage, images, nn, data, training.
"""
