"""Files on disk: atomic writes, and every format the project writes and reads back.

atomic (atomic_path, the one way a finished file or folder is published,
and write_atomic, StateFolder), descriptors (.npz descriptor files and the
probe check), sources (the one opener of descriptor sources: .npz, .npy,
dplg-extract and index folders), index_files (the one reader of index
folders' files), npz (the one .npz reader), chunks (the one resumable
chunk writer), extraction (dplg-extract folders: Parquet shards and their
manifest), whitening (whitening files), safe_pickle (the restricted
unpickler: ground-truth pickles) and checkpoints (PyTorch and safetensors
weight files, read with that unpickler). Every file read back is checked
here before use; no other package calls np.load or os.replace.
Imports: dplg_tf.errors only.
"""
