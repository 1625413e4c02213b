"""Who may talk to the HTTP servers (dplg_tf.http.access): allowed hosts, CORS,
cross-site writes, security headers, the bearer token; on a small app, on
both servers, through both commands' flags, and the search page in headless
Chromium under the CSP with a token. Loopback only."""

import base64
import html.parser
import http.client
import importlib.util
import json
import os
import subprocess
import sys
import time
import urllib.error
import urllib.request

import pytest
from conftest import free_ports, small_dplg

from dplg_tf import images
from dplg_tf.errors import InputNotFound, UserError
from dplg_tf.http.access import Access, protect, read_token_file
from dplg_tf.http.server import HttpServer

STATIC = os.path.join(os.path.dirname(images.__file__), os.pardir, "search", "static")
TOKEN = "s3cret-Token_42"
EVIL = "https://evil.example"


def _request(address, method, path, headers=None, body=None):
    """(status, headers with lower-case names, body) of one request; Host is
    what `headers` says, or the address when it says none."""
    host, port = address.rsplit(":", 1)
    conn = http.client.HTTPConnection(host, int(port), timeout=60)
    headers = dict(headers or {})
    conn.putrequest(method, path, skip_host=True, skip_accept_encoding=True)
    if "Host" not in headers:
        headers["Host"] = address
    if body is not None:
        headers.setdefault("Content-Length", str(len(body)))
    for key, value in headers.items():
        conn.putheader(key, value)
    conn.endheaders(body)
    response = conn.getresponse()
    data = response.read()
    conn.close()
    return response.status, {k.lower(): v for k, v in response.getheaders()}, data


def _error(data):
    return json.loads(data)["error"]


# -------------------------------------------------------- the rules, on a small app

@pytest.fixture(scope="module")
def small_app():
    """protect() around a two-route Starlette app, served with three rule sets."""
    from starlette.applications import Starlette
    from starlette.responses import PlainTextResponse
    from starlette.routing import Route

    async def hello(request):
        return PlainTextResponse(f"{request.method} ok")

    app = Starlette(routes=[Route("/", hello, methods=["GET"]),
                            Route("/v1/thing", hello, methods=["GET", "POST"])])
    rules = {"default": Access(),
             "open": Access(allowed_hosts=("search.example.com", "*.photos.example"),
                            cors_origins=("https://app.example",)),
             "token": Access(token=TOKEN)}
    servers = {k: HttpServer(protect(app, a, "127.0.0.1", public=("/",)), "127.0.0.1", 0,
                             name=k).start() for k, a in rules.items()}
    yield {k: s.address for k, s in servers.items()}
    for s in servers.values():
        s.stop(1)


def test_only_loopback_host_names_are_answered_by_default(small_app):
    address = small_app["default"]
    port = address.rsplit(":", 1)[1]
    for host in ("localhost", f"localhost:{port}", f"127.0.0.1:{port}", "[::1]", "[::1]:9",
                 "LOCALHOST:1", "localhost."):
        status, _, data = _request(address, "GET", "/v1/thing", {"Host": host})
        assert (status, data) == (200, b"GET ok"), host
    for host in ("evil.example", "evil.example:" + port, "127.0.0.1.evil.example",
                 "localhost.evil.example", "evil.example@127.0.0.1", "", "[::1", "a b"):
        status, headers, data = _request(address, "GET", "/v1/thing", {"Host": host})
        assert status == 400, host
        assert "--allowed_hosts" in _error(data)
        assert headers["x-content-type-options"] == "nosniff"   # refusals too


def test_allowed_hosts_add_names_and_subdomains(small_app):
    address = small_app["open"]
    for host in ("search.example.com", "search.example.com:443", "a.photos.example",
                 "x.y.photos.example:8600", "localhost:1"):
        assert _request(address, "GET", "/v1/thing", {"Host": host})[0] == 200, host
    for host in ("photos.example", "example.com", "evil.example"):
        assert _request(address, "GET", "/v1/thing", {"Host": host})[0] == 400, host
    with pytest.raises(UserError, match="allowed_hosts"):
        Access(allowed_hosts=("ev*l.example",))
    with pytest.raises(UserError, match="cors_origins"):
        Access(cors_origins=("app.example",))


def test_no_cors_unless_origins_are_given(small_app):
    origin = {"Origin": "https://app.example"}
    _, headers, _ = _request(small_app["default"], "GET", "/v1/thing", origin)
    assert "access-control-allow-origin" not in headers
    _, headers, _ = _request(small_app["open"], "GET", "/v1/thing", origin)
    assert headers["access-control-allow-origin"] == "https://app.example"
    _, headers, _ = _request(small_app["open"], "GET", "/v1/thing", {"Origin": EVIL})
    assert "access-control-allow-origin" not in headers
    # a preflight of the allowed origin may send a token
    status, headers, _ = _request(small_app["open"], "OPTIONS", "/v1/thing", dict(
        origin, **{"Access-Control-Request-Method": "POST",
                   "Access-Control-Request-Headers": "authorization, content-type"}))
    assert status == 200 and "authorization" in headers["access-control-allow-headers"].lower()


def test_cross_site_writes_are_refused(small_app):
    address = small_app["default"]
    own = f"http://{address}"
    for headers in ({"Origin": EVIL}, {"Origin": "null"},
                    {"Origin": f"http://localhost:{address.rsplit(':', 1)[1]}"},  # another host
                    {"Sec-Fetch-Site": "cross-site"}, {"Sec-Fetch-Site": "same-site"}):
        status, _, data = _request(address, "POST", "/v1/thing", headers, b"q=1")
        assert status == 403, headers
        assert "refused" in _error(data)
    for headers in ({}, {"Origin": own}, {"Origin": own, "Sec-Fetch-Site": "same-origin"}):
        assert _request(address, "POST", "/v1/thing", headers, b"q=1")[0] == 200, headers
    # reads are not writes; an allowed CORS origin may write
    assert _request(address, "GET", "/v1/thing", {"Origin": EVIL})[0] == 200
    assert _request(small_app["open"], "POST", "/v1/thing",
                    {"Origin": "https://app.example"}, b"q=1")[0] == 200


def test_security_headers_on_every_answer(small_app):
    for path in ("/", "/v1/thing", "/nothing"):
        _, headers, _ = _request(small_app["default"], "GET", path)
        _check_security_headers(headers)
        assert headers["cross-origin-resource-policy"] == "same-origin"


def _check_security_headers(headers):
    directives = dict((d.strip().split(" ", 1) + [""])[:2]
                      for d in headers["content-security-policy"].split(";"))
    script = directives.get("script-src", directives["default-src"])
    style = directives.get("style-src", directives["default-src"])
    assert "'unsafe-inline'" not in script and "'unsafe-eval'" not in script
    assert "'unsafe-inline'" not in style
    assert directives["frame-ancestors"] == "'none'"
    assert headers["x-content-type-options"] == "nosniff"
    assert headers["x-frame-options"] == "DENY"
    assert headers["referrer-policy"] == "no-referrer"


def test_the_token_is_required_except_on_public_pages(small_app):
    address = small_app["token"]
    for headers in ({}, {"Authorization": "Bearer wrong"}, {"Authorization": TOKEN},
                    {"Authorization": f"Basic {TOKEN}"}, {"Authorization": f"Bearer {TOKEN}x"}):
        status, answer, data = _request(address, "GET", "/v1/thing", headers)
        assert status == 401, headers
        assert answer["www-authenticate"].startswith("Bearer")
        assert "Authorization: Bearer" in _error(data) and _error(data).count(".") == 1
    for scheme in ("Bearer", "bearer"):
        status, _, data = _request(address, "GET", "/v1/thing",
                                   {"Authorization": f"{scheme} {TOKEN}"})
        assert (status, data) == (200, b"GET ok")
    assert _request(address, "GET", "/")[0] == 200            # the page needs none
    assert _request(address, "POST", "/", body=b"")[0] == 401  # only GET is public


def test_token_files(tmp_path):
    path = tmp_path / "token"
    path.write_text(f"  {TOKEN}\n")
    assert read_token_file(str(path)) == TOKEN
    for bad in ("", "two words", "caf\u00e9", "x" * 5000):
        path.write_text(bad)
        with pytest.raises(UserError, match="auth_token_file"):
            read_token_file(str(path))
    with pytest.raises(InputNotFound):
        read_token_file(str(tmp_path / "missing"))


class _Inline(html.parser.HTMLParser):
    """What a CSP without 'unsafe-inline' would block in a page."""

    def __init__(self):
        super().__init__()
        self.found, self._in_script = [], False

    def handle_starttag(self, tag, attrs):
        attrs = dict(attrs)
        if tag == "style":
            self.found.append("<style>")
        if tag == "script" and "src" not in attrs:
            self._in_script = True
        for name, value in attrs.items():
            if name == "style" or name.startswith("on"):
                self.found.append(f"{tag} {name}=")
            if value and value.strip().lower().startswith("javascript:"):
                self.found.append(f"{tag} {name}=javascript:")

    def handle_endtag(self, tag):
        self._in_script = self._in_script and tag != "script"

    def handle_data(self, data):
        if self._in_script and data.strip():
            self.found.append("inline <script>")


def test_the_search_page_has_no_inline_script_or_style():
    parser = _Inline()
    with open(os.path.join(STATIC, "index.html")) as f:
        parser.feed(f.read())
    assert parser.found == []
    for name in ("search.js", "search.css"):
        assert os.path.getsize(os.path.join(STATIC, name)) > 0


# ------------------------------------------------------------- both servers

@pytest.fixture(scope="module")
def world(tmp_path_factory):
    """A model base path, 6 indexed photos and their index folder."""
    from PIL import Image

    from dplg_tf.export import export as export_lib
    from dplg_tf.retrieval.describers import Describer
    from dplg_tf.search.index import DescriptorIndex

    root = tmp_path_factory.mktemp("access")
    base = str(root / "models" / "dplg")
    export_lib.export(small_dplg(0), base)
    photos = root / "photos"
    photos.mkdir()
    names = [f"photo_{i}.jpg" for i in range(6)]
    for i, name in enumerate(names):
        Image.fromarray(images.facade_image(120, 160, 500 + i)).save(photos / name, "JPEG")
    describer = Describer(model=base)
    rows = describer.describe_bytes([(photos / n).read_bytes() for n in names])
    index = DescriptorIndex(rows.shape[1], "exact", describer.probe())
    index.add(rows, names)
    index.save(str(root / "idx"))
    (root / "token").write_text(TOKEN + "\n")
    return {"root": root, "base": base, "photos": photos, "names": names,
            "index": str(root / "idx"), "describer": describer}


def _search_server(world, access=None):
    from dplg_tf.search.searcher import Searcher
    from dplg_tf.search.service import SearchServer

    searcher = Searcher(world["index"], world["describer"], str(world["photos"]),
                        reload_seconds=0)
    return SearchServer(searcher, "127.0.0.1", 0, workers=2, access=access).start()


def _form(image):
    boundary = "accessboundary7"
    body = (f"--{boundary}\r\nContent-Disposition: form-data; name=\"top_k\"\r\n\r\n3\r\n"
            f"--{boundary}\r\nContent-Disposition: form-data; name=\"image\"; "
            "filename=\"q.jpg\"\r\nContent-Type: image/jpeg\r\n\r\n").encode() + image + \
        f"\r\n--{boundary}--\r\n".encode()
    return body, {"Content-Type": f"multipart/form-data; boundary={boundary}"}


@pytest.mark.slow
def test_the_search_server_checks_host_origin_and_sends_the_headers(world):
    server = _search_server(world)
    try:
        address = server.address
        for path in ("/", "/v1/health", "/metrics", "/static/search.js"):
            status, _, data = _request(address, "GET", path, {"Host": "evil.example"})
            assert status == 400 and "--allowed_hosts" in _error(data), path
        status, headers, page = _request(address, "GET", "/")
        assert status == 200 and b"/static/search.js" in page
        _check_security_headers(headers)
        assert "access-control-allow-origin" not in headers
        status, headers, _ = _request(address, "GET", "/static/search.js")
        assert status == 200 and "javascript" in headers["content-type"]
        # a form of another site posting a search: refused before any work
        image = (world["photos"] / world["names"][1]).read_bytes()
        body, form = _form(image)
        status, _, data = _request(address, "POST", "/v1/search", dict(form, Origin=EVIL),
                                   body)
        assert status == 403 and "refused" in _error(data)
        # the page's own search (its origin is the server's) and a program's (no Origin)
        for extra in ({"Origin": f"http://{address}"}, {}):
            status, _, data = _request(address, "POST", "/v1/search", dict(form, **extra),
                                       body)
            assert status == 200 and json.loads(data)["results"][0]["name"] == \
                world["names"][1]
        status, headers, _ = _request(address, "GET", "/v1/health",
                                      {"Origin": "https://app.example"})
        assert status == 200 and "access-control-allow-origin" not in headers
    finally:
        server.stop(5)


@pytest.mark.slow
def test_the_search_server_with_a_token_and_cors(world):
    server = _search_server(world, Access(cors_origins=("https://app.example",),
                                          token=TOKEN))
    try:
        address, auth = server.address, {"Authorization": f"Bearer {TOKEN}"}
        name = world["names"][0]
        body = json.dumps({"image": {"b64": base64.b64encode(
            (world["photos"] / name).read_bytes()).decode()}, "top_k": 2}).encode()
        for method, path, data in (("GET", "/v1/health", None), ("GET", "/metrics", None),
                                   ("GET", f"/v1/images/{name}", None),
                                   ("POST", "/v1/search", body)):
            assert _request(address, method, path, body=data)[0] == 401, path
            status, _, answer = _request(address, method, path, auth, data)
            assert status == 200, (path, answer[:200])
        for path in ("/", "/static/search.js", "/static/search.css"):
            assert _request(address, "GET", path)[0] == 200, path
        status, headers, _ = _request(address, "POST", "/v1/search",
                                      dict(auth, Origin="https://app.example"), body)
        assert status == 200
        assert headers["access-control-allow-origin"] == "https://app.example"
        assert _request(address, "POST", "/v1/search", dict(auth, Origin=EVIL), body)[0] == 403
    finally:
        server.stop(5)


MONITORING_PATH = "/monitoring/prometheus/metrics"


def _model_server(world, access=None):
    from dplg_tf.serving import config as config_lib
    from dplg_tf.serving.server import Server

    server = Server(world["base"], "dplg", "127.0.0.1", 0, None, poll_seconds=5, rest_port=0,
                    monitoring=config_lib.MonitoringConfig(True, MONITORING_PATH),
                    access=access).start()
    deadline = time.time() + 90
    while not server.models.ready() and time.time() < deadline:
        time.sleep(0.1)
    return server


def _predict_body(world):
    data = (world["photos"] / world["names"][0]).read_bytes()
    return json.dumps({"instances": [{"b64": base64.b64encode(data).decode()}]}).encode()


@pytest.mark.slow
def test_dplg_serve_rest_checks_host_origin_token_and_sends_the_headers(world):
    server = _model_server(world)
    try:
        address, body = server.rest_address, _predict_body(world)
        for path in ("/v1/models/dplg", MONITORING_PATH):
            status, headers, data = _request(address, "GET", path, {"Host": "evil.example"})
            assert status == 400 and "--allowed_hosts" in _error(data), path
            status, headers, _ = _request(address, "GET", path, {"Host": "localhost"})
            assert status == 200, path
            _check_security_headers(headers)
            assert "access-control-allow-origin" not in headers
        status, _, data = _request(address, "POST", "/v1/models/dplg:predict",
                                   {"Origin": EVIL, "Content-Type": "text/plain"}, body)
        assert status == 403 and "refused" in _error(data)
        status, _, data = _request(address, "POST", "/v1/models/dplg:predict", body=body)
        assert status == 200 and len(json.loads(data)["predictions"][0]) == 512
    finally:
        server.stop(5)
    server = _model_server(world, Access(token=TOKEN))
    try:
        address, auth = server.rest_address, {"Authorization": f"Bearer {TOKEN}"}
        for method, path, data in (("GET", "/v1/models/dplg", None),
                                   ("GET", MONITORING_PATH, None),
                                   ("POST", "/v1/models/dplg:predict", body)):
            status, _, answer = _request(address, method, path, body=data)
            assert status == 401 and "Bearer" in _error(answer), path
            assert _request(address, method, path, auth, data)[0] == 200, path
    finally:
        server.stop(5)


def _wait_for(url, proc, log, headers=None):
    deadline = time.time() + 180
    while time.time() < deadline:
        assert proc.poll() is None, log.read_text()[-3000:]
        try:
            urllib.request.urlopen(urllib.request.Request(url, headers=headers or {}),
                                   timeout=5).read()
            return
        except urllib.error.HTTPError:
            return   # it answers
        except OSError:
            time.sleep(0.3)
    raise AssertionError(f"{url} did not answer; {log.read_text()[-3000:]}")


@pytest.mark.slow
def test_dplg_serve_flags(world):
    grpc_port, rest_port = free_ports(2)
    log = world["root"] / "serve.log"
    with open(log, "w") as out:
        proc = subprocess.Popen([sys.executable, "-m", "dplg_tf.cli.serve",
                                 f"--model_base_path={world['base']}", f"--port={grpc_port}",
                                 f"--rest_api_port={rest_port}",
                                 "--allowed_hosts=models.example,*.lan",
                                 "--cors_origins=https://app.example",
                                 f"--auth_token_file={world['root'] / 'token'}"],
                                stdout=out, stderr=subprocess.STDOUT)
    try:
        address = f"127.0.0.1:{rest_port}"
        deadline = time.time() + 180   # started: models loaded, SIGTERM handled
        while "REST API on" not in log.read_text() and time.time() < deadline:
            assert proc.poll() is None, log.read_text()[-3000:]
            time.sleep(0.3)
        auth = {"Authorization": f"Bearer {TOKEN}"}
        assert _request(address, "GET", "/v1/models/dplg")[0] == 401
        for host in ("models.example", "gpu.lan:8501", address):
            assert _request(address, "GET", "/v1/models/dplg", dict(auth, Host=host))[0] == 200
        assert _request(address, "GET", "/v1/models/dplg", dict(auth, Host="evil.example"))[
            0] == 400
        _, headers, _ = _request(address, "GET", "/v1/models/dplg",
                                 dict(auth, Origin="https://app.example"))
        assert headers["access-control-allow-origin"] == "https://app.example"
    finally:
        proc.terminate()
        assert proc.wait(60) == 0
    # a missing token file is one sentence and exit code 2
    done = subprocess.run([sys.executable, "-m", "dplg_tf.cli.serve",
                           f"--model_base_path={world['base']}", "--port=0",
                           "--auth_token_file=/nonexistent/token"],
                          capture_output=True, text=True, timeout=120)
    assert done.returncode == 2 and "--auth_token_file" in done.stderr
    assert "Traceback" not in done.stderr


# ------------------------------------------- the page in Chromium, under the CSP

def _page_fixtures():
    """tests/search/test_page.py's browser fixture (headless Chromium)."""
    path = os.path.join(os.path.dirname(__file__), os.pardir, "search", "test_page.py")
    spec = importlib.util.spec_from_file_location("_search_page_tests", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


browser = _page_fixtures().browser

CSP_WATCH = ("window.__csp = []; document.addEventListener('securitypolicyviolation', "
             "(e) => window.__csp.push(`${e.violatedDirective} ${e.blockedURI}`));")


@pytest.mark.slow
def test_the_page_works_under_the_csp_with_a_token(world, browser, tmp_path):
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support import expected_conditions as ec
    from selenium.webdriver.support.ui import WebDriverWait

    port = free_ports()[0]
    log = tmp_path / "search.log"
    with open(log, "w") as out:
        proc = subprocess.Popen([sys.executable, "-m", "dplg_tf.cli.search_server",
                                 f"--index_dir={world['index']}", f"--model={world['base']}",
                                 f"--image_root={world['photos']}", f"--port={port}",
                                 f"--auth_token_file={world['root'] / 'token'}"],
                                stdout=out, stderr=subprocess.STDOUT)
    try:
        url = f"http://127.0.0.1:{port}"
        _wait_for(url + "/v1/health", proc, log)
        browser.execute_cdp_cmd("Page.addScriptToEvaluateOnNewDocument", {"source": CSP_WATCH})
        browser.get(url + "/")
        wait = WebDriverWait(browser, 60)
        # the API wants the token: the page asks for it
        wait.until(ec.visibility_of_element_located((By.ID, "token")))
        assert "token" in browser.find_element(By.ID, "info").text
        shot = os.environ.get("DPLG_SCREENSHOT")
        browser.save_screenshot(shot.replace(".png", "-token-asked.png") if shot
                                else str(tmp_path / "token-asked.png"))
        browser.find_element(By.ID, "token").send_keys(TOKEN + "\n")
        wait.until(lambda d: "6 images indexed" in d.find_element(By.ID, "info").text)
        assert not browser.find_element(By.ID, "auth").is_displayed()
        query = world["names"][4]
        browser.find_element(By.ID, "file").send_keys(str(world["photos"] / query))
        wait.until(ec.text_to_be_present_in_element((By.ID, "status"), "results in"))
        names = [e.text for e in browser.find_elements(By.CSS_SELECTOR, "#results .name")]
        assert names[0] == query and len(names) == 6
        # thumbnails (fetched with the token), the query and its attention map are shown
        wait.until(lambda d: d.execute_script(
            "const shown = [...document.querySelectorAll('#results img'), "
            "document.getElementById('query-image'), "
            "document.getElementById('query-attention')]; "
            "return shown.every(i => i.complete && i.naturalWidth > 0);"))
        assert all(i.get_attribute("src").startswith("blob:")
                   for i in browser.find_elements(By.CSS_SELECTOR, "#results img"))
        # the style sheet applied (the header is white) and nothing was blocked
        assert browser.execute_script(
            "return getComputedStyle(document.querySelector('header')).backgroundColor"
        ) == "rgb(255, 255, 255)"
        assert browser.execute_script("return window.__csp") == []
        shot = os.environ.get("DPLG_SCREENSHOT")
        shot = shot.replace(".png", "-token.png") if shot else str(tmp_path / "token.png")
        assert browser.save_screenshot(shot)
        # an inline script would be blocked: the policy is in force
        browser.execute_script("const s = document.createElement('script'); "
                               "s.textContent = 'window.__ran = 1'; document.body.append(s);")
        wait.until(lambda d: any("script-src" in v for v in d.execute_script(
            "return window.__csp")))
        assert browser.execute_script("return window.__ran") is None
    finally:
        browser.execute_script("sessionStorage.clear()")
        proc.terminate()
        assert proc.wait(60) == 0
