"""The README's dplg-index and dplg-search-server commands (sections "Search
your own photos" and "Search service") run as written, in a folder of a few
generated photos: every thumbnail of a search loads, and no answer shows a
server path. Only the port (0) and a --server address (a dplg-serve started
here) are replaced; the models the commands name are one small export."""

import base64
import io
import json
import os
import pathlib
import re
import shlex
import subprocess
import sys
import time
import urllib.request

import pytest
from conftest import small_dplg

from dplg_tf import images
from dplg_tf.export import export as export_lib

README = pathlib.Path(__file__).resolve().parents[2] / "README.md"
PHOTOS = ["a.jpg", "b.jpg", "c.jpg", "sub/d.jpg", "sub/e.jpg"]
MODULES = {"dplg-index": "dplg_tf.cli.index", "dplg-search-server": "dplg_tf.cli.search_server"}


def _commands(section):
    """The dplg-index / dplg-search-server lines of a README section, as argv lists."""
    body = README.read_text().split(f"\n## {section}\n", 1)[1].split("\n## ", 1)[0]
    found = []
    for block in re.findall(r"```bash\n(.*?)```", body, re.S):
        for line in block.replace("\\\n", " ").splitlines():
            argv = shlex.split(line, comments=True)
            if argv and argv[0] in MODULES:
                found.append(argv)
    return found


def _program(name):
    script = os.path.join(os.path.dirname(sys.executable), name)
    return [script] if os.path.isfile(script) else [sys.executable, "-m", MODULES[name]]


@pytest.fixture(scope="module")
def model_base(tmp_path_factory):
    base = str(tmp_path_factory.mktemp("readme_model") / "dplg")
    export_lib.export(small_dplg(0), base)
    return base


def _search_and_fetch_thumbnails(url, folder):
    from PIL import Image

    query = (folder / "photos" / "sub" / "d.jpg").read_bytes()
    body = json.dumps({"image": {"b64": base64.b64encode(query).decode()},
                       "top_k": 10}).encode()
    request = urllib.request.Request(url + "/v1/search", body,
                                     {"Content-Type": "application/json"})
    with urllib.request.urlopen(request, timeout=120) as response:
        text = response.read().decode()
    answer = json.loads(text)
    assert str(folder) not in text and os.path.realpath(folder) not in text, text
    assert sorted(r["name"] for r in answer["results"]) == sorted(PHOTOS)
    assert answer["results"][0]["name"] == "sub/d.jpg"
    for result in answer["results"]:
        with urllib.request.urlopen(url + result["image"], timeout=60) as response:
            assert response.status == 200 and response.headers["Content-Type"] == "image/jpeg"
            assert Image.open(io.BytesIO(response.read())).size[0] > 0


def _serve(argv, folder):
    """Run a dplg-search-server line on a free port, search, fetch every thumbnail."""
    argv = [a for a in argv if not a.startswith("--port=")] + ["--port=0"]
    log_path = folder / "server.log"
    with open(log_path, "w") as log:
        proc = subprocess.Popen(_program(argv[0]) + argv[1:], cwd=folder, stdout=log,
                                stderr=subprocess.STDOUT)
    try:
        deadline, url = time.time() + 180, None
        while url is None:
            assert proc.poll() is None, log_path.read_text()[-3000:]
            assert time.time() < deadline, log_path.read_text()[-3000:]
            found = re.search(r"dplg-search-server: (http://\S+?)/ ", log_path.read_text())
            url = found and found.group(1)
            time.sleep(0.3)
        _search_and_fetch_thumbnails(url, folder)
    finally:
        proc.terminate()
        assert proc.wait(60) == 0, log_path.read_text()[-3000:]


@pytest.mark.slow
@pytest.mark.parametrize("section", ["Search your own photos", "Search service"])
def test_the_readme_commands_show_every_thumbnail(model_base, tmp_path, section):
    from PIL import Image

    commands = _commands(section)
    assert [a[0] for a in commands].count("dplg-search-server") >= 1, commands
    folder = tmp_path / "work"
    for i, name in enumerate(PHOTOS):
        (folder / "photos" / name).parent.mkdir(parents=True, exist_ok=True)
        Image.fromarray(images.facade_image(96, 128, 700 + i)).save(folder / "photos" / name)
    for argv in commands:   # every model the commands name is the one export
        for arg in argv:
            if arg.startswith("--model="):
                link = folder / arg.split("=", 1)[1]
                if not link.exists():
                    link.parent.mkdir(parents=True, exist_ok=True)
                    os.symlink(model_base, link)
    model_server = None
    try:
        for argv in commands:
            if any(a.startswith("--server=") for a in argv):
                if model_server is None:
                    from dplg_tf.serving.server import Server

                    model_server = Server(model_base, "dplg", "127.0.0.1", 0, None,
                                          poll_seconds=5).start()
                argv = [f"--server={model_server.address}" if a.startswith("--server=")
                        else a for a in argv]
            if argv[0] == "dplg-index":
                done = subprocess.run(_program(argv[0]) + argv[1:], cwd=folder, timeout=600,
                                      capture_output=True, text=True)
                assert done.returncode == 0, done.stderr[-3000:]
            else:
                _serve(argv, folder)
    finally:
        if model_server is not None:
            model_server.stop(0)
