"""Data: image sources (folders, GLDv2 CSVs), the TFRecord builder, the tf.data
input pipeline, the synthetic landmark set, the Revisited Oxford / Paris
loaders and the safe pickle reader of their ground truth.

Imports: errors, config, console, storage, images, nn.
"""
