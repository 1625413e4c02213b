"""Finding image files under folders, and printable names for paths."""

import os

from dplg_tf.errors import InputNotFound

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".gif", ".bmp")   # what the SavedModel decodes
# what dplg-build-tfrecords also takes: it re-encodes every image it reads as JPEG
BUILDER_EXTENSIONS = IMAGE_EXTENSIONS + (".webp", ".tif", ".tiff")

def display_name(path):
    """A path as printable text (undecodable bytes as escapes, newlines escaped)."""
    raw = path if isinstance(path, bytes) else os.fsencode(path)
    text = raw.decode("utf-8", "backslashreplace")
    return text.replace("\n", "\\n").replace("\r", "\\r").replace("\t", "\\t")

def list_images(paths, problems=None, extensions=IMAGE_EXTENSIONS):
    """Image files named or found under folders (recursively, sorted, each once).

    Symbolic-link loops and names that are not valid text are not followed
    or kept; each is appended to `problems` as (path, reason) when given.
    A named path that does not exist is an error.
    """
    files, seen_dirs = [], set()
    problems = problems if problems is not None else []

    def walk(folder):
        key = os.path.realpath(folder)
        if key in seen_dirs:
            problems.append((display_name(folder), "symbolic-link loop, not followed"))
            return
        seen_dirs.add(key)
        try:
            entries = sorted(os.scandir(folder), key=lambda e: e.name)
        except OSError as e:
            problems.append((display_name(folder), f"unreadable: {e.strerror or e}"))
            return
        for entry in entries:
            if not is_text_name(entry.name):
                problems.append((display_name(entry.path), "name is not valid UTF-8"))
                continue
            try:
                is_dir = entry.is_dir()
                is_file = entry.is_file()
            except OSError as e:       # e.g. too many levels of symbolic links
                problems.append((display_name(entry.path), f"unreadable: {e.strerror or e}"))
                continue
            if entry.is_symlink() and not (is_dir or is_file):
                problems.append((display_name(entry.path), "broken or looping symbolic link"))
            elif is_dir:
                walk(entry.path)
            elif is_file and entry.name.lower().endswith(extensions):
                files.append(entry.path)

    for path in paths:
        if os.path.isdir(path):
            walk(path)
        elif os.path.isfile(path):
            files.append(path)
        else:
            raise InputNotFound(f"{display_name(path)} is neither an image file nor "
                                    "a folder.")
    return files

def is_text_name(name):
    try:
        name.encode("utf-8")
        return True
    except UnicodeEncodeError:      # surrogate escapes of undecodable bytes
        return False
