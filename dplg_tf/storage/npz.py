"""The one reader of the .npz files the project writes (descriptor files, their
parts, whitening files): nothing is allocated before the file says, within
its own size, what it holds.

`read_arrays(path, kinds)` opens the zip, and for each member named in
`kinds` ({name: dtype kinds, e.g. "f" or "fiu" or "U"}) reads the .npy
header first: the declared shape and dtype must fit the member's stored
size, the member must be stored or only modestly compressed (np.savez
stores; a zip bomb is refused before it is inflated), object arrays are
refused. Any failure is a UserError naming the file and what to do.
"""

import os
import zipfile

import numpy as np

from dplg_tf.errors import InputNotFound, UserError

MAX_RATIO = 20   # inflated / compressed bytes allowed for a compressed member


def read_arrays(path, kinds, what="file", remedy="make it again"):
    """{name: array} of the members of `kinds` present in the .npz at `path`."""
    if not os.path.isfile(path):
        raise InputNotFound(f"{path} does not exist.")

    def bad(reason):
        raise UserError(f"{path} is not a readable {what} ({reason}); {remedy}.")

    try:
        archive = zipfile.ZipFile(path)
    except (zipfile.BadZipFile, OSError, ValueError) as e:
        bad(f"not a .npz: {type(e).__name__}")
    out = {}
    with archive:
        members = {info.filename[:-4]: info for info in archive.infolist()
                   if info.filename.endswith(".npy")}
        for name, allowed in kinds.items():
            info = members.get(name)
            if info is None:
                continue
            if info.compress_type != zipfile.ZIP_STORED and (
                    info.file_size > MAX_RATIO * max(info.compress_size, 1) + (1 << 16)):
                bad(f"{name!r} inflates {info.file_size} bytes from {info.compress_size}")
            try:
                with archive.open(info) as f:
                    version = np.lib.format.read_magic(f)
                    header = (np.lib.format.read_array_header_1_0 if version == (1, 0)
                              else np.lib.format.read_array_header_2_0)
                    shape, fortran, dtype = header(f, max_header_size=10000)
                    if dtype.hasobject or dtype.kind not in allowed:
                        bad(f"{name!r} holds {dtype}, not {allowed!r} data")
                    count = int(np.prod(shape, dtype=np.int64)) if shape else 1
                    if count < 0 or count * dtype.itemsize > info.file_size:
                        bad(f"{name!r} declares {shape} of {dtype}, more than it stores")
                    array = np.empty(shape, dtype, order="F" if fortran else "C")
                    view = memoryview(array.reshape(-1, order="A")).cast("B") if count else b""
                    got, size = 0, count * dtype.itemsize
                    while got < size:   # read into the array itself: no second copy
                        n = f.readinto(view[got:])
                        if not n:
                            bad(f"{name!r} is cut short")
                        got += n
            except UserError:
                raise
            except (zipfile.BadZipFile, OSError, ValueError, EOFError) as e:
                bad(f"{name!r}: {type(e).__name__}")
            out[name] = array
    return out
