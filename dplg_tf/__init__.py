"""dplg_tf: DPLG (Hu & Bors, ICIP 2022) in Keras 3 / TensorFlow.

The subpackages, bottom up (each imports only from the layers below it;
README "Layout"):

- errors, config, console: user errors and exit codes, the config tree, what a command
  prints (progress bars, TensorFlow start-up lines filtered)
- storage: atomic files and every file format we write and read back
- images: limits, header checks, host decoding, listing, the probe image
- nn: Keras layers, backbones, the head registry, the model, costs
- data: image sources, the TFRecord builder, the input pipeline, generated data
- training: the tf.distribute trainer and what it needs
- export: the SavedModel's signatures, graph decoding, version folders
- serving: the model server (TF Serving API) and its client
- retrieval: describers, the one kNN, QE/DBA, whitening, evaluation, pictures
- search, bulk: the FAISS index and dplg-search; the Ray Data extraction
- cli: one thin absl module per console script

Nothing is imported here, so tools that need no TensorFlow start fast, and
nothing is changed: the commands quiet TensorFlow (dplg_tf.console).
"""

__version__ = "0.1.0"
