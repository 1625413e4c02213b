"""Data: image sources (folders, GLDv2 CSVs), the TFRecord builder, the tf.data
input pipeline, the synthetic landmark set and the Revisited Oxford / Paris
loaders (their ground truth goes through dplg_tf.storage.safe_pickle).

Imports: errors, config, console, storage, images, nn.
"""
