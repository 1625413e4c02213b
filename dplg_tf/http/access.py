"""Who may talk to the HTTP servers (dplg-serve's REST port, dplg-search-server).

`protect(app, access, ...)` wraps an ASGI app in these rules, outermost first:

1. security headers on every answer: a Content-Security-Policy without
   inline script or style (`frame-ancestors 'none'`), X-Content-Type-Options
   nosniff, X-Frame-Options DENY, Referrer-Policy no-referrer, and
   Cross-Origin-Resource-Policy same-origin unless CORS origins are given;
2. the Host check: only the allowed host names are answered (loopback names
   and the bound address always; `--allowed_hosts` adds more, `*` allows
   any), any port; others get 400. This stops DNS rebinding: a page of
   another site whose name is made to resolve to 127.0.0.1 still sends its
   own name as Host. Starlette's TrustedHostMiddleware does the same check
   but answers a plain "Invalid host header"; ours answers JSON naming the flag,
   as every other error of these servers;
3. CORS (Starlette's CORSMiddleware) only for the `--cors_origins` given;
4. no cross-site writes: a request other than GET / HEAD / OPTIONS whose
   Origin is neither this server's own (its Host) nor a CORS origin, or that
   a browser marks Sec-Fetch-Site cross-site / same-site without an Origin,
   gets 403 (so a form of another site cannot POST a search);
5. the bearer token, when one is set: `Authorization: Bearer <token>` on
   every request but those of the `public` paths (the search page and its
   static files), else 401.
"""

import dataclasses
import hmac
import os
import re

from dplg_tf.errors import InputNotFound, UserError, shorten

LOOPBACK = ("localhost", "127.0.0.1", "::1")
SAFE_METHODS = {"GET", "HEAD", "OPTIONS"}
CSP = ("default-src 'self'; script-src 'self'; style-src 'self'; img-src 'self' data: blob:; "
       "object-src 'none'; base-uri 'none'; form-action 'self'; frame-ancestors 'none'")
HEADERS = {
    "content-security-policy": CSP,
    "x-content-type-options": "nosniff",
    "x-frame-options": "DENY",
    "referrer-policy": "no-referrer",
}
# a Host header: a name or IPv4 address, or [IPv6], and an optional port
_HOST = re.compile(r"(\[[0-9A-Fa-f:.]+\]|[A-Za-z0-9_.-]+)(?::(\d{1,5}))?")
_WILDCARD = ("0.0.0.0", "::", "")


@dataclasses.dataclass(frozen=True)
class Access:
    """The access rules of one server.

    `allowed_hosts`: host names answered besides the loopback names and the
    bound address (`*.example.com` matches its subdomains, `*` any name);
    `cors_origins`: origins (`https://app.example.com`, or `*`) whose pages
    may call the API; `token`: the bearer token every API request must carry
    (None: no token)."""

    allowed_hosts: tuple = ()
    cors_origins: tuple = ()
    token: str = None

    def __post_init__(self):
        hosts = tuple(_host_name(h) for h in self.allowed_hosts)
        for host in hosts:
            if not host or ("*" in host and host != "*" and not
                            (host.startswith("*.") and "*" not in host[1:])):
                raise UserError(f"--allowed_hosts: {shorten(host)} is not a host name "
                                "(a name, an address, *.example.com or *).")
        object.__setattr__(self, "allowed_hosts", hosts)
        origins = tuple(o.strip().rstrip("/") for o in self.cors_origins if o.strip())
        for origin in origins:
            if origin != "*" and not re.fullmatch(r"https?://[^/?#\s]+", origin):
                raise UserError(f"--cors_origins: {shorten(origin)} is not an origin "
                                "(scheme://host[:port], e.g. https://app.example.com, or *).")
        object.__setattr__(self, "cors_origins", origins)
        if self.token is not None:
            _check_token(self.token)


def split_list(text):
    """The items of a comma-separated flag value, stripped, empty ones dropped."""
    return tuple(item.strip() for item in (text or "").split(",") if item.strip())


def _check_token(token):
    if not token or not re.fullmatch(r"[\x21-\x7e]+", token):
        raise UserError("The token must be one word of printable ASCII characters (no "
                        "spaces).")


def read_token_file(path):
    """The token in the file at `path` (surrounding blank space dropped)."""
    if not os.path.isfile(path):
        raise InputNotFound(f"--auth_token_file {path!r} is not a file.")
    with open(path, "rb") as f:
        data = f.read(4097)
    try:
        token = data.decode("ascii").strip()
    except UnicodeDecodeError:
        token = None
    if not token or len(data) > 4096 or not re.fullmatch(r"[\x21-\x7e]+", token):
        raise UserError(f"--auth_token_file {path!r} must hold one token: a word of printable "
                        "ASCII characters (no spaces), at most 4096 bytes.")
    return token


def _host_name(host):
    """A host name or address as compared: lower case, no brackets, no final dot."""
    host = host.strip().lower()
    if host.startswith("[") and host.endswith("]"):
        host = host[1:-1]
    return host[:-1] if host.endswith(".") and host != "." else host


def _header(scope, name):
    for key, value in scope.get("headers", ()):
        if key == name:
            return value.decode("latin-1")
    return None


def _without_default_port(netloc):
    for port in (":80", ":443"):
        if netloc.endswith(port):
            return netloc[:-len(port)]
    return netloc


async def _refuse(scope, receive, send, status, message, headers=None):
    from dplg_tf.http.server import error_response

    response = error_response(status, message)
    response.headers.update(headers or {})
    await response(scope, receive, send)


class _Guard:
    """The Host check (outside CORS) and the security headers."""

    def __init__(self, app, hosts, headers):
        self.app, self.headers = app, headers
        self.any_host = "*" in hosts
        self.names = {h for h in hosts if not h.startswith("*.")}
        self.suffixes = tuple(h[1:] for h in hosts if h.startswith("*."))

    def host_allowed(self, value):
        match = _HOST.fullmatch(value or "")
        if match is None or (match.group(2) and int(match.group(2)) > 65535):
            return False
        host = _host_name(match.group(1))
        return host in self.names or any(host.endswith(s) for s in self.suffixes)

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return

        async def send_with_headers(message):
            if message["type"] == "http.response.start":
                present = {k.lower() for k, _ in message.get("headers", ())}
                extra = [(k.encode(), v.encode()) for k, v in self.headers.items()
                         if k.encode() not in present]
                message = dict(message, headers=list(message.get("headers", ())) + extra)
            await send(message)

        host = _header(scope, b"host")
        if not self.any_host and not self.host_allowed(host):
            await _refuse(scope, receive, send_with_headers, 400,
                          f"This server does not answer to the host {shorten(host or '')}; "
                          "name it in --allowed_hosts to allow it.")
            return
        await self.app(scope, receive, send_with_headers)


class _Gate:
    """Cross-site writes refused (403); the bearer token checked (401)."""

    def __init__(self, app, origins, token, public):
        self.app, self.origins, self.public = app, set(origins), tuple(public)
        self.token = None if token is None else token.encode("ascii")

    def _foreign(self, scope):
        """Why a write comes from another site's page, or None."""
        origin = _header(scope, b"origin")
        if origin is not None:
            if "*" in self.origins or origin.rstrip("/") in self.origins:
                return None
            own = _without_default_port((_header(scope, b"host") or "").lower())
            netloc = origin.split("://", 1)[-1].lower()
            if "://" in origin and _without_default_port(netloc) == own:
                return None
            return f"from the page of {shorten(origin)}"
        if (_header(scope, b"sec-fetch-site") or "").lower() in ("cross-site", "same-site"):
            return "from another site's page"
        return None

    def _public(self, scope):
        path = scope.get("path", "")
        return scope["method"] in ("GET", "HEAD") and any(
            path == p or (p.endswith("*") and path.startswith(p[:-1])) for p in self.public)

    def _authorized(self, scope):
        value = (_header(scope, b"authorization") or "").strip()
        scheme, _, given = value.partition(" ")
        return scheme.lower() == "bearer" and hmac.compare_digest(
            given.strip().encode("latin-1"), self.token)

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        if scope["method"] not in SAFE_METHODS:
            foreign = self._foreign(scope)
            if foreign is not None:
                await _refuse(scope, receive, send, 403,
                              f"A {scope['method']} request {foreign} is refused: this server "
                              "takes writes only from its own page and --cors_origins.")
                return
        if self.token is not None and not self._public(scope) and not self._authorized(scope):
            await _refuse(scope, receive, send, 401,
                          "This server needs a token: send the header 'Authorization: Bearer "
                          "<token>' with the token of its --auth_token_file.",
                          {"WWW-Authenticate": 'Bearer realm="dplg"'})
            return
        await self.app(scope, receive, send)


def allowed_hosts(access, bind_host=None):
    """The host names a server bound to `bind_host` answers to."""
    hosts = list(LOOPBACK) + list(access.allowed_hosts)
    if bind_host is not None and _host_name(bind_host) not in _WILDCARD:
        hosts.append(_host_name(bind_host))
    return hosts


def protect(app, access=None, bind_host=None, public=()):
    """`app` (ASGI) behind the rules of `access` (an Access; None: the
    defaults). `bind_host`: the address the server listens on, answered as a
    host name too. `public`: paths served to GET without the token (`/static/*`
    covers what lies under /static/)."""
    from starlette.middleware.cors import CORSMiddleware

    access = access or Access()
    app = _Gate(app, access.cors_origins, access.token, public)
    if access.cors_origins:
        app = CORSMiddleware(app, allow_origins=list(access.cors_origins),
                             allow_methods=["GET", "POST"],
                             allow_headers=["Authorization", "Content-Type"], max_age=600)
    headers = dict(HEADERS)
    if not access.cors_origins:
        headers["cross-origin-resource-policy"] = "same-origin"
    return _Guard(app, allowed_hosts(access, bind_host), headers)
