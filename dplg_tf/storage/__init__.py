"""Files on disk: atomic writes, and every format the project writes and reads back.

atomic (write_atomic, StateFolder), descriptors (.npz descriptor files and
the probe check), chunks (the one resumable chunk writer), extraction
(dplg-extract folders: Parquet shards and their manifest), whitening
(whitening files), safe_pickle (the restricted unpickler: ground-truth
pickles) and checkpoints (PyTorch and safetensors weight files, read with
that unpickler). Every file read back is checked here before use.
Imports: dplg_tf.errors only.
"""
