"""Writing files so that a crash never leaves half of one under the final name."""

import os


def write_atomic(path, data):
    """Write `data` (str or bytes) to `path` through a temporary file and a rename."""
    tmp = f"{path}.tmp"
    with open(tmp, "wb" if isinstance(data, bytes) else "w") as f:
        f.write(data)
    os.replace(tmp, path)
