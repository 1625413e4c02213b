"""Writing files so that a crash never leaves half of one under the final name.

`atomic_path` hands a writer a temporary name beside the final one (a file
or a folder), then flushes it to disk and renames it into place; on an
error the temporary is removed. `write_atomic` and `write_json_atomic`
write bytes, text or JSON through it. `set_aside` moves a damaged file out
of the way. `StateFolder` commits a set of files together: each state is
a sub-folder written in full before a one-line pointer file (`CURRENT`) is
replaced to name it, so a reader sees the old set or the new one, never a
mix, whenever the writer is killed. Every rename of the package is here.
"""

import contextlib
import json
import os
import re
import secrets
import shutil
import tempfile

from dplg_tf.errors import UserError

# atomic_path's temporaries: .<name>.<12 hex>.tmp<the name's extension>
_TEMPORARY = re.compile(r"^\..+\.[0-9a-f]{12}\.tmp(\.[^.]*)?$")


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


def fsync_file(path):
    with open(path, "rb") as f:
        os.fsync(f.fileno())


def fsync_tree(folder):
    for root, _, names in os.walk(folder):
        for name in names:
            fsync_file(os.path.join(root, name))
        fsync_dir(root)


def _remove(path):
    if os.path.isdir(path) and not os.path.islink(path):
        shutil.rmtree(path, ignore_errors=True)
    else:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(path)


def publish(tmp, path):
    """Flush `tmp` (a file, or a folder and all it holds) to disk, rename it
    onto `path` and flush the folder: `path` is then whole or unchanged. A
    folder replaces only a missing or empty folder (rename's rule)."""
    if os.path.isdir(tmp):
        fsync_tree(tmp)
    else:
        fsync_file(tmp)
    os.replace(tmp, path)
    fsync_dir(os.path.dirname(os.path.abspath(path)))


@contextlib.contextmanager
def atomic_path(path, tmp_dir=None):
    """Yield a temporary path for the writer of `path` to create (a file or a
    folder); on a normal exit it is published onto `path`, on an exception
    removed. The name is hidden and ends in the extension of `path` (Keras
    wants .keras); it lies beside `path`, or in `tmp_dir` (the same disk)."""
    folder = tmp_dir or os.path.dirname(os.path.abspath(path))
    base = os.path.basename(os.path.normpath(path))
    extension = os.path.splitext(base)[1]
    tmp = os.path.join(folder, f".{base}.{secrets.token_hex(6)}.tmp{extension}")
    try:
        yield tmp
        if not os.path.lexists(tmp):
            raise FileNotFoundError(f"the writer of {path} wrote nothing at {tmp}")
        publish(tmp, path)
    except BaseException:
        _remove(tmp)
        raise


def remove_temporaries(folder):
    """Remove the temporaries that killed writers of atomic_path left in
    `folder`; only for a folder no other process is writing into."""
    for name in os.listdir(folder):
        if _TEMPORARY.match(name):
            _remove(os.path.join(folder, name))


def write_atomic(path, data):
    """Write `data` (str or bytes) to `path` through a temporary file, fsync and rename."""
    with atomic_path(path) as tmp, open(tmp, "wb") as f:
        f.write(data.encode("utf-8") if isinstance(data, str) else data)


def write_json_atomic(path, obj, **dump_kwargs):
    """Write `obj` as JSON to `path` atomically (`dump_kwargs` go to json.dumps)."""
    write_atomic(path, json.dumps(obj, **dump_kwargs))


def set_aside(path, suffix=".damaged"):
    """Rename `path` to `path + suffix` (replacing an older one); returns the new name."""
    target = path + suffix
    os.replace(path, target)
    fsync_dir(os.path.dirname(os.path.abspath(path)))
    return target


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
        publish(tmp, os.path.join(self.folder, name))
        write_atomic(os.path.join(self.folder, self.POINTER), name + "\n")
        self.clean(keep=name)
        return os.path.join(self.folder, name)

    def clean(self, keep):
        """Remove states other than `keep` and temporary folders of killed writers."""
        for n in os.listdir(self.folder):
            if (n.startswith("state-") and n != keep) or (
                    n.startswith(".state-") and n.endswith(".tmp")):
                shutil.rmtree(os.path.join(self.folder, n), ignore_errors=True)
