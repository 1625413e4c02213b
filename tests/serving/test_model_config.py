"""dplg-serve's model versions and model config file: version folders are
bounded to int64, a config file is taken only once it has settled and parses
whole, and one thread polls the base paths of all models."""

import base64
import json
import logging
import os
import shutil
import threading
import time
import urllib.error
import urllib.request

import pytest
from conftest import image_bytes

from dplg_tf.serving import config as config_lib
from dplg_tf.serving.server import Server


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    """A SavedModel version folder whose serving_default maps image_bytes to
    [n, 4] zeros: what the server needs, in a second."""
    import tensorflow as tf

    class Tiny(tf.Module):
        @tf.function(input_signature=[tf.TensorSpec([None], tf.string, name="image_bytes")])
        def serve(self, image_bytes):
            return {"global_descriptor": tf.zeros(tf.stack([tf.shape(image_bytes)[0], 4]))}

    path = str(tmp_path_factory.mktemp("tiny") / "1")
    module = Tiny()
    tf.saved_model.save(module, path, signatures={"serving_default": module.serve})
    return path


def _until(cond, seconds=60):
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        if cond():
            return True
        time.sleep(0.05)
    return False


def _http(srv, path, body=None):
    data = None if body is None else json.dumps(body).encode()
    request = urllib.request.Request(f"http://{srv.rest_address}{path}", data=data)
    try:
        with urllib.request.urlopen(request, timeout=60) as response:
            return response.status, json.loads(response.read())
    except urllib.error.HTTPError as e:
        return e.code, json.loads(e.read())


def _write(path, text):
    tmp = str(path) + ".tmp"
    with open(tmp, "w") as f:
        f.write(text)
    os.replace(tmp, path)


def _config(*models):
    """Config text of (name, base path) pairs."""
    return "model_config_list {\n" + "".join(
        f'  config {{ name: "{name}" base_path: "{base}" model_platform: "tensorflow" }}\n'
        for name, base in models) + "}\n"


def test_version_names_are_whole_int64_numbers():
    version = config_lib.version_number
    assert [version(n) for n in ("0", "1", "42", str(2 ** 63 - 1))] == [0, 1, 42, 2 ** 63 - 1]
    for name in (str(2 ** 63), "9" * 30, "0001", "-1", "+1", "1.0", " 1", "\u0661", "\u00b2",
                 "", "1a"):
        assert version(name) is None, name


def test_a_version_folder_past_int64_is_ignored_with_a_log_line(tiny, tmp_path, caplog):
    base = tmp_path / "dplg"
    shutil.copytree(tiny, base / "1")
    for name in (str(2 ** 63), "99999999999999999999999", "0002"):
        shutil.copytree(tiny, base / name)
    caplog.set_level(logging.WARNING, "dplg_tf.serving")
    srv = Server(str(base), "dplg", "127.0.0.1", 0, poll_seconds=0.1, rest_port=0,
                 warm_up=False).start()
    try:
        assert sorted(srv.manager.loaded_versions()) == [1]
        status, answer = _http(srv, "/v1/models/dplg")
        assert status == 200, answer
        assert [s["version"] for s in answer["model_version_status"]] == ["1"]
        status, answer = _http(srv, "/v1/models/dplg/metadata")
        assert status == 200 and answer["model_spec"]["version"] == "1", answer
        status, answer = _http(srv, "/v1/models/dplg:predict",
                               {"instances": [{"b64": base64.b64encode(
                                   image_bytes(32, 32)).decode()}]})
        assert status == 200 and answer["predictions"] == [[0.0] * 4], answer
        lines = [r.getMessage() for r in caplog.records if "ignored" in r.getMessage()]
        assert len(lines) == 1 and str(2 ** 63) in lines[0] and "'0002'" in lines[0]
        # polls go on without logging it again
        polls = srv.manager.versions_on_disk
        assert polls() == [1] and polls() == [1]
        assert len([r for r in caplog.records if "ignored" in r.getMessage()]) == 1
    finally:
        srv.stop(5)


def test_a_config_changes_only_once_it_has_settled_and_parses_whole(tiny, tmp_path, caplog):
    bases = {}
    for name in ("first", "second", "third"):
        shutil.copytree(tiny, tmp_path / name / "1")
        bases[name] = str(tmp_path / name)
    path = tmp_path / "models.config"
    _write(path, _config(("first", bases["first"]), ("second", bases["second"])))
    srv = Server(model_config_file=str(path), host="127.0.0.1", port=0, poll_seconds=0.1,
                 warm_up=False).start()   # no poll thread: the test polls
    second = srv.models.manager("second")
    caplog.set_level(logging.ERROR, "dplg_tf.serving")
    try:
        assert srv.models.names == ["first", "second"]
        # a writer's first step (a whole, valid config of one model) is seen once
        _write(path, _config(("first", bases["first"])))
        assert srv.poll_config_once() is False
        # its second step: the new config; taken once it reads the same again
        _write(path, _config(("first", bases["first"]), ("second", bases["second"]),
                             ("third", bases["third"])))
        assert srv.poll_config_once() is False
        assert srv.models.names == ["first", "second"]
        assert srv.poll_config_once() is True
        assert srv.models.names == ["first", "second", "third"]
        assert srv.models.manager("second") is second and second.loaded_versions()
        # a half-written file and one that does not validate keep the served set
        for text, words in [('model_config_list { config { name: "first" base_path: ',
                             "not valid text format"),
                            (_config(("first", bases["first"]), ("first", bases["second"])),
                             "twice")]:
            caplog.clear()
            _write(path, text)
            for _ in range(3):
                assert srv.poll_config_once() is False
            assert srv.models.names == ["first", "second", "third"]
            errors = [r.getMessage() for r in caplog.records]
            assert len(errors) == 1 and words in errors[0] and "old one stays" in errors[0]
        # a model removed from a settled config is unloaded
        _write(path, _config(("first", bases["first"]), ("third", bases["third"])))
        assert not srv.poll_config_once() and srv.poll_config_once()
        assert srv.models.names == ["first", "third"]
    finally:
        srv.stop(5)


def test_one_thread_polls_the_versions_of_all_models(tiny, tmp_path):
    shutil.copytree(tiny, tmp_path / "shared" / "1")
    models = [(f"m{i}", str(tmp_path / "empty" / f"m{i}")) for i in range(197)]
    for _, base in models:
        os.makedirs(base)
    models += [(f"s{i}", str(tmp_path / "shared")) for i in range(3)]   # one SavedModel
    path = tmp_path / "models.config"
    _write(path, _config(*models))
    before = threading.active_count()
    srv = Server(model_config_file=str(path), host="127.0.0.1", port=0, poll_seconds=0.1,
                 config_poll_seconds=0.05, warm_up=False).start()
    try:
        assert len(srv.models.names) == 200
        assert all(srv.models.manager(f"s{i}").loaded_versions() for i in range(3))
        grown = threading.active_count() - before
        assert grown < 20, f"{grown} threads for 200 models"
        # the one thread polls them all: a new version of an empty model is loaded
        shutil.copytree(tiny, tmp_path / "empty" / "m150" / "7")
        assert _until(lambda: list(srv.models.manager("m150").loaded_versions()) == [7])
        # a reread config of 300 models does not cost a thread a model either
        models += [(f"n{i}", str(tmp_path / "empty" / f"m{i}")) for i in range(100)]
        _write(path, _config(*models))
        assert _until(lambda: len(srv.models.names) == 300)
        assert _until(lambda: threading.active_count() - before < 20)
    finally:
        srv.stop(5)
