"""Data: image sources (sources: folders, GLDv2 CSVs), the TFRecord builder
(tfrecords), the tf.data input pipeline and TFRecord reading (pipeline), the
synthetic landmark set (synthetic) and the Revisited Oxford / Paris loaders
(revisited; their ground truth goes through dplg_tf.storage.safe_pickle).

Imports: errors, config, console, storage, images, nn.
"""
