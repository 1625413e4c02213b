"""How indexed images are named and found (dplg_tf.search.names): relative to
an image root, never by a server path."""

import os

import pytest

from dplg_tf.errors import UserError
from dplg_tf.search.names import ImageFiles, common_root, relative_names


@pytest.fixture
def tree(tmp_path, monkeypatch):
    """photos/{a.jpg, sub/b.jpg}, other/c.jpg and secret.jpg, the cwd at tmp_path."""
    for name in ("photos/a.jpg", "photos/sub/b.jpg", "other/c.jpg", "secret.jpg"):
        (tmp_path / name).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / name).write_bytes(b"x")
    monkeypatch.chdir(tmp_path)
    return tmp_path


def test_dplg_index_names_images_relative_to_the_folder_given(tree):
    assert common_root(["photos/"]) == str(tree / "photos")
    assert common_root(["photos/a.jpg"]) == str(tree / "photos")
    assert common_root(["photos/", "other/c.jpg"]) == str(tree)
    root = common_root(["photos/"])
    assert relative_names(["photos/a.jpg", "photos/sub/b.jpg"], root) == ["a.jpg", "sub/b.jpg"]
    assert relative_names([str(tree / "photos/a.jpg")], "photos") == ["a.jpg"]
    with pytest.raises(UserError, match="not under the image root"):
        relative_names(["other/c.jpg"], root)
    assert relative_names(["other/c.jpg", "q7"], root, strict=False) == ["other/c.jpg", "q7"]


@pytest.mark.parametrize("image_root", ["photos/", "photos", "."])
def test_relative_names_are_found_under_the_index_root_or_image_root(tree, image_root):
    files = ImageFiles(image_root, index_root=str(tree / "photos"))
    names = {"a.jpg", "sub/b.jpg"}
    assert files.shown("sub/b.jpg") == "sub/b.jpg"
    assert files.url("sub/b.jpg") == "/v1/images/sub/b.jpg"
    assert files.index_name("sub/b.jpg", names) == "sub/b.jpg"
    assert files.path("sub/b.jpg") == str(tree / "photos/sub/b.jpg")
    assert files.index_name("c.jpg", names) is None


def test_older_indexes_never_show_or_serve_a_server_path(tree):
    inside, outside = str(tree / "photos/sub/b.jpg"), str(tree / "secret.jpg")
    names = {inside, outside, "photos/a.jpg", "../secret.jpg"}
    files = ImageFiles("photos")   # no recorded root
    assert files.shown(inside) == "sub/b.jpg" and files.url(inside) == "/v1/images/sub/b.jpg"
    assert files.index_name("sub/b.jpg", names) == inside
    assert files.path(inside) == inside
    assert files.shown(outside) == "secret.jpg" and files.url(outside) is None
    assert files.index_name("secret.jpg", names) is None
    assert files.path(outside) is None
    # a relative name of an older index: under --image_root, or as given from the cwd
    assert files.path("photos/a.jpg") == str(tree / "photos/a.jpg")
    assert files.path("../secret.jpg") is None   # never outside --image_root
    link = tree / "photos" / "link.jpg"
    os.symlink(tree / "secret.jpg", link)
    assert files.path("link.jpg") is None
    # no --image_root: names shown, no pictures
    bare = ImageFiles(None)
    assert bare.shown(inside) == "b.jpg" and bare.url(inside) is None
    assert bare.url("a.jpg") is None and bare.path("a.jpg") is None
