"""How indexed images are named: never by a path of the server.

dplg-index names the images it describes relative to an image root (its
--image_root, else the folder holding what it was given) and records that
root in the index. The search server shows each name as it is stored when
relative; an absolute name (indexes made before the root was recorded, or
descriptor files named so) is shown relative to its --image_root when under
it, else by its base name. Thumbnails are read only under --image_root.
"""

import os
from urllib.parse import quote

from dplg_tf.errors import UserError
from dplg_tf.images import display_name


def _under(path, root):
    return os.path.commonpath([path, root]) == root


def common_root(paths):
    """The folder holding every one of `paths` (a folder given is its own root)."""
    folders = [p if os.path.isdir(p) else os.path.dirname(p) or "." for p in paths]
    return os.path.commonpath([os.path.abspath(f) for f in folders])


def relative_names(paths, root, strict=True):
    """`paths` named relative to `root` ("/" separated). One outside `root` is an
    error when `strict`, else kept as it is (descriptor names need not be paths)."""
    root = os.path.abspath(root)
    names = []
    for path in paths:
        full = os.path.abspath(path)
        if _under(full, root):
            names.append(os.path.relpath(full, root).replace(os.sep, "/"))
        elif strict:
            raise UserError(f"{display_name(path)} is not under the image root {root}; "
                            "give an --image_root that holds every image.")
        else:
            names.append(path)
    return names


class ImageFiles:
    """What a search server shows of an index's names, and which file a
    thumbnail reads: `image_root` is --image_root (None: no thumbnails),
    `index_root` the root the index recorded (None for older indexes)."""

    def __init__(self, image_root, index_root=None):
        self.root = None if image_root is None else os.path.realpath(image_root)
        self.roots = [] if image_root is None else sorted(
            {os.path.abspath(image_root), self.root}, key=len, reverse=True)
        self.index_root = index_root

    def shown(self, name):
        """The name an answer gives: relative, never a server path."""
        if not os.path.isabs(name):
            return name
        for root in self.roots:
            if _under(name, root) and name != root:
                return os.path.relpath(name, root).replace(os.sep, "/")
        return os.path.basename(name)

    def url(self, name):
        """The thumbnail's URL, or None where the server shows no picture."""
        if self.root is None or (os.path.isabs(name) and not any(
                _under(name, root) for root in self.roots)):
            return None
        return "/v1/images/" + quote(self.shown(name), safe="/")

    def index_name(self, shown, names):
        """The stored name that answers show as `shown` (in the set `names`), or None."""
        if shown in names and not os.path.isabs(shown):
            return shown
        for root in self.roots:
            full = os.path.normpath(os.path.join(root, shown))
            if full in names:
                return full
        return None

    def path(self, name):
        """The file of a stored name, resolved under --image_root, or None."""
        if self.root is None:
            return None
        if os.path.isabs(name):
            candidates = [name]
        else:   # under the recorded root, then under --image_root, then as given
            candidates = ([os.path.join(self.index_root, name)] if self.index_root else []) + [
                os.path.join(self.root, name), os.path.abspath(name)]
        for candidate in candidates:
            real = os.path.realpath(candidate)
            if _under(real, self.root) and os.path.isfile(real):
                return real
        return None
