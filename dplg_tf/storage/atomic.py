"""Writing files so that a crash never leaves half of one under the final name.

`write_atomic` writes one file through a temporary name, flushed to disk,
and a rename. `StateFolder` commits a set of files together: each state is
a sub-folder written in full before a one-line pointer file (`CURRENT`) is
replaced to name it, so a reader sees the old set or the new one, never a
mix, whenever the writer is killed.
"""

import os
import shutil
import tempfile

from dplg_tf.errors import UserError


def fsync_dir(path):
    """Flush a folder's entries (renames) to disk, where the OS allows it."""
    try:
        fd = os.open(path or ".", os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def write_atomic(path, data):
    """Write `data` (str or bytes) to `path` through a temporary file, fsync and rename."""
    folder = os.path.dirname(os.path.abspath(path))
    fd, tmp = tempfile.mkstemp(prefix=f".{os.path.basename(path)}.", suffix=".tmp",
                               dir=folder)
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data.encode("utf-8") if isinstance(data, str) else data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise
    fsync_dir(folder)


def fsync_tree(folder):
    for root, _, names in os.walk(folder):
        for name in names:
            with open(os.path.join(root, name), "rb") as f:
                os.fsync(f.fileno())
        fsync_dir(root)


class StateFolder:
    """A folder whose files are replaced together: `folder/state-N/` plus
    `folder/CURRENT` naming the committed N."""

    POINTER = "CURRENT"

    def __init__(self, folder):
        self.folder = folder

    def current(self):
        """The committed state's folder, or None when nothing was committed."""
        pointer = os.path.join(self.folder, self.POINTER)
        if not os.path.isfile(pointer):
            return None
        with open(pointer) as f:
            name = f.read().strip()
        if not name.startswith("state-") or os.sep in name or not os.path.isdir(
                os.path.join(self.folder, name)):
            raise UserError(f"{self.folder}/{self.POINTER} names no state folder; the "
                             "folder was changed by hand.")
        return os.path.join(self.folder, name)

    def new(self):
        """A fresh temporary folder to write the next state into."""
        os.makedirs(self.folder, exist_ok=True)
        return tempfile.mkdtemp(prefix=".state-", suffix=".tmp", dir=self.folder)

    def commit(self, tmp):
        """Make the files in `tmp` (from new()) the current state; then drop old ones."""
        numbers = [int(n[6:]) for n in os.listdir(self.folder)
                   if n.startswith("state-") and n[6:].isdigit()]
        name = f"state-{max(numbers, default=0) + 1:06d}"
        fsync_tree(tmp)
        os.rename(tmp, os.path.join(self.folder, name))
        fsync_dir(self.folder)
        write_atomic(os.path.join(self.folder, self.POINTER), name + "\n")
        self.clean(keep=name)
        return os.path.join(self.folder, name)

    def clean(self, keep):
        """Remove states other than `keep` and temporary folders of killed writers."""
        for n in os.listdir(self.folder):
            if (n.startswith("state-") and n != keep) or (
                    n.startswith(".state-") and n.endswith(".tmp")):
                shutil.rmtree(os.path.join(self.folder, n), ignore_errors=True)
