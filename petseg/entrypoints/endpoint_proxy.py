"""The front of a local endpoint: a reverse proxy on the endpoint's stable port that hands every request to the
release serving under its name (`petseg.deploy.endpoints`), so that switching releases never drops a request.

    python -m petseg.entrypoints.endpoint_proxy NAME PORT [ADDRESS]      (default address 127.0.0.1)

The backend is read from the endpoint record whenever the record file changes.
A request goes to the backend serving when it arrives and finishes there, so
a switch sends new requests to the new server while the old one finishes its
own. ``GET /petseg/endpoint`` answers JSON: the name, the release serving and
its backend, and the requests in flight per backend (a switch waits for the
old backend's to reach 0 before stopping it). A request with no release
serving, or whose backend does not answer, gets a JSON error (503, 502), and
a request body must come with a Content-Length that is a number (411, 400 otherwise).

Closed like the servers behind it: the front reads the servers' tokens file
(`petseg.tokens.tokens_path`) when it starts. Only the open routes of either
protocol (health, readiness, model metadata: `petseg.serving.routes.is_open`)
pass without a token; any other request needs a token the file holds (401
otherwise, its body dropped, not sent on), and the endpoint's status one with
the ``predict`` role. The backend then checks the role, the route and the method.

At most ``MAX_CONNECTIONS`` connections (default 64) are served at once,
each on a thread; a connection beyond them is answered 503 with
``Retry-After`` (its request read, its body dropped) by one of a few refusing
threads, and when those are busy too it waits in the listening socket's
backlog: none is dropped. A connection idle for `IDLE_SECONDS` is closed.
"""

from __future__ import annotations

import http.client
import http.server
import json
import signal
import sys
import threading
import time
import urllib.parse

from petseg import tokens
from petseg.deploy import endpoints
from petseg.deploy.endpoints import STATUS_PATH
from petseg.errors import PetsegError
from petseg.serving import routes
from petseg.serving.messages import int_setting

HOP_BY_HOP = {"connection", "keep-alive", "proxy-authenticate", "proxy-authorization", "te", "trailers",
              "transfer-encoding", "upgrade", "host"}
CHUNK = 1 << 16
BACKEND_TIMEOUT = 300.0
"""Seconds a backend may take to answer one request."""
MAX_CONNECTIONS = 64
"""Connections served at once (a thread each): a backend answers a few requests at once, the rest wait here."""
REFUSERS = 4
"""Threads answering 503 to the connections beyond `MAX_CONNECTIONS`."""
IDLE_SECONDS = 60.0
"""Seconds a connection may stay silent (between requests, or within one) before it is closed."""
REFUSE_SECONDS = 5.0
"""Seconds a connection beyond the limit gets to send its request line and headers."""
DRAIN_SECONDS = 10.0
"""How long the body of a refused request is read and dropped before the answer goes out."""
RETRY_AFTER_SECONDS = 1


class Backends:
    """The endpoint's serving release, read again when its record changes, and the requests in flight per backend."""

    def __init__(self, name: str):
        self.name = name
        self._lock = threading.Lock()
        self._stamp: int | None = None
        self._serving: dict | None = None
        self.in_flight: dict[str, int] = {}

    def serving(self) -> dict | None:
        """The record's ``serving`` entry now."""
        try:
            stamp = endpoints.path(self.name).stat().st_mtime_ns
        except FileNotFoundError:
            stamp = None
        with self._lock:
            if stamp != self._stamp:
                self._serving = endpoints.read(self.name)["serving"] if stamp else None
                self._stamp = stamp
            return self._serving

    def count(self, url: str, step: int) -> None:
        """Add ``step`` (1 or -1) to the requests in flight at ``url``."""
        with self._lock:
            self.in_flight[url] = self.in_flight.get(url, 0) + step


class _Stalled(Exception):
    """The client stopped sending its request body for `IDLE_SECONDS`."""


class _Body:
    """Exactly ``length`` bytes of a request body, read as they are sent on."""

    def __init__(self, stream, length: int):
        self.stream, self.left = stream, length

    def read(self, size: int = CHUNK) -> bytes:
        try:
            data = self.stream.read(min(size if size > 0 else CHUNK, self.left)) if self.left else b""
        except TimeoutError:  # told apart from the backend's errors, which are OSErrors too
            raise _Stalled from None
        self.left -= len(data)
        return data


class _JsonErrors(http.server.BaseHTTPRequestHandler):
    """http.server's own errors (a malformed request line, headers too long, an unknown method) as JSON."""

    protocol_version = "HTTP/1.1"

    def log_message(self, format, *args):  # quiet: the backends log their requests
        pass

    def send_error(self, code, message=None, explain=None):
        short, long = self.responses.get(code, ("", ""))
        self.close_connection = True
        self._reply(code, {"status": {"status": "FAILURE", "reason": message or short, "info": explain or long}})

    def _reply(self, status: int, document: dict, *, headers: dict[str, str] | None = None) -> None:
        data = json.dumps(document).encode()
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        for key, value in (headers or {}).items():
            self.send_header(key, value)
        self.end_headers()
        if self.command != "HEAD":
            self.wfile.write(data)

    def _refuse(self, status: int, kind: str, message: str, *, headers: dict[str, str] | None = None,
                unread: int | None = None) -> None:
        """Drops the rest of the request's body (``unread`` bytes, default all of it; for at most `DRAIN_SECONDS`),
        answers a JSON error, then closes the connection (a body it did not read cannot be taken for a request)."""
        self._drain(unread)
        self.close_connection = True
        self._reply(status, {"status": {"status": "FAILURE", "reason": kind, "info": message}}, headers=headers)

    def _drain(self, left: int | None) -> None:
        try:
            left = int(self.headers.get("Content-Length") or 0) if left is None else left
        except ValueError:
            return
        deadline = time.monotonic() + DRAIN_SECONDS
        try:
            while left > 0 and time.monotonic() < deadline:
                chunk = self.rfile.read(min(CHUNK, left))
                if not chunk:
                    return
                left -= len(chunk)
        except OSError:
            return


class Handler(_JsonErrors):
    """Forwards each request to the serving backend; answers `STATUS_PATH` itself."""

    server: Front
    timeout = IDLE_SECONDS

    def do_GET(self):
        if self.path == STATUS_PATH:
            try:
                self.server.tokens.check(self.headers.get("Authorization"), routes.PREDICT)
            except tokens.AccessDenied as err:
                return self._refuse(err.status, err.reason, str(err))
            self._reply(200, self.server.status())
        else:
            self.forward()

    def do_POST(self):
        self.forward()

    def do_PUT(self):
        self.forward()

    def do_PATCH(self):
        self.forward()

    def do_DELETE(self):
        self.forward()

    def do_HEAD(self):
        self.forward()

    def do_OPTIONS(self):
        self.forward()

    def forward(self):
        """Send the request to the serving backend and its answer back."""
        path = self.path.partition("?")[0]
        if not routes.is_open(path) and self.server.tokens.identify(self.headers.get("Authorization")) is None:
            return self._refuse(401, "UNAUTHORIZED", "this request needs a bearer token "
                                                     "(Authorization: Bearer TOKEN; petseg sends the one in "
                                                     "$PETSEG_TOKENS_FILE)")
        backends = self.server.backends
        serving = backends.serving()
        if not serving:
            return self._refuse(503, "NO_RELEASE", f"nothing serves under endpoint {backends.name} now "
                                                   "(petseg status shows it)")
        if self.headers.get("Transfer-Encoding"):
            return self._refuse(411, "LENGTH_REQUIRED", "a request body needs a Content-Length header")
        try:
            length = int(self.headers.get("Content-Length") or 0)
        except ValueError:
            length = -1
        if length < 0:
            return self._refuse(400, "BAD_LENGTH", f"Content-Length {self.headers.get('Content-Length')!r} is not "
                                                   "a number of bytes")
        url = serving["deployment"]["url"]
        target = urllib.parse.urlsplit(url)
        headers = {key: value for key, value in self.headers.items() if key.lower() not in HOP_BY_HOP}
        backends.count(url, 1)
        connection = http.client.HTTPConnection(target.hostname, target.port, timeout=BACKEND_TIMEOUT)
        body = _Body(self.rfile, length)
        try:
            try:
                connection.request(self.command, self.path, body=body if length else None, headers=headers)
                answer = connection.getresponse()
            except _Stalled:
                return self._refuse(408, "REQUEST_TIMEOUT", f"the request body stalled for {IDLE_SECONDS:g} s",
                                    unread=0)
            except OSError as err:
                return self._refuse(502, "BACKEND_DOWN", f"release {serving.get('version')} at {url} did not "
                                                         f"answer ({type(err).__name__}: {err})", unread=body.left)
            self._relay(answer)
        finally:
            connection.close()
            backends.count(url, -1)

    def _relay(self, answer: http.client.HTTPResponse) -> None:
        body = None if answer.getheader("Content-Length") else answer.read()
        self.send_response(answer.status, answer.reason)
        for key, value in answer.getheaders():
            if key.lower() not in HOP_BY_HOP and key.lower() not in ("server", "date"):
                self.send_header(key, value)
        if body is not None:
            self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        if self.command == "HEAD":
            return
        if body is not None:
            self.wfile.write(body)
            return
        while chunk := answer.read(CHUNK):
            self.wfile.write(chunk)


class Refusal(_JsonErrors):
    """Answers the one request of a connection beyond `MAX_CONNECTIONS`: 503 with ``Retry-After``."""

    timeout = REFUSE_SECONDS

    def handle_one_request(self):
        self.raw_requestline = self.rfile.readline(65537)
        if not self.raw_requestline or not self.parse_request():  # parse_request answers a bad request itself
            self.close_connection = True
            return
        self._refuse(503, "BUSY", f"the endpoint serves {self.server.max_connections} connections at once; "
                                  f"send the request again after Retry-After seconds",
                     headers={"Retry-After": str(RETRY_AFTER_SECONDS)})


class Front(http.server.ThreadingHTTPServer):
    """The proxy server of one endpoint.

    Args:
        name: The endpoint.
        address: (host, port) to listen on.
        table: The tokens the servers behind it accept.
        max_connections: Connections served at once.
    """

    daemon_threads = True

    def __init__(self, name: str, address: tuple[str, int], *, table: tokens.TokenTable,
                 max_connections: int = MAX_CONNECTIONS):
        self.backends = Backends(name)
        self.tokens = table
        self.max_connections = max_connections
        self._serving = threading.BoundedSemaphore(max_connections)
        self._refusing = threading.BoundedSemaphore(REFUSERS)
        super().__init__(address, Handler)

    def process_request(self, request, client_address):
        """A thread for the connection: one that serves it while fewer than ``max_connections`` are served,
        else one that refuses it (waiting, with the connection in the backlog, while `REFUSERS` refuse others)."""
        if self._serving.acquire(blocking=False):
            handler, slot = Handler, self._serving
        else:
            self._refusing.acquire()
            handler, slot = Refusal, self._refusing
        threading.Thread(target=self._connection, args=(request, client_address, handler, slot), daemon=True).start()

    def _connection(self, request, client_address, handler, slot: threading.BoundedSemaphore) -> None:
        try:
            handler(request, client_address, self)
        except Exception:
            self.handle_error(request, client_address)
        finally:
            self.shutdown_request(request)
            slot.release()

    def status(self) -> dict:
        """What `STATUS_PATH` answers."""
        serving = self.backends.serving() or {}
        return {"name": self.backends.name, "version": serving.get("version"),
                "backend": (serving.get("deployment") or {}).get("url"), "in_flight": dict(self.backends.in_flight)}


def main(argv: list[str]) -> int:
    """Serve an endpoint's front until SIGTERM or SIGINT; 2 for arguments it cannot use or a tokens file it refuses."""
    try:
        name, port, host = endpoints.check_name(argv[0]), int(argv[1]), (argv[2:] or ["127.0.0.1"])[0]
    except (IndexError, ValueError, PetsegError) as err:
        print(f"usage: python -m petseg.entrypoints.endpoint_proxy NAME PORT [ADDRESS] ({err})", file=sys.stderr)
        return 2
    try:
        table = tokens.load(tokens.tokens_path())
        max_connections = int_setting("MAX_CONNECTIONS", MAX_CONNECTIONS)
    except PetsegError as err:
        print(f"petseg: the front of endpoint {name} does not start: {err}", file=sys.stderr)
        return 2
    front = Front(name, (host, port), table=table, max_connections=max_connections)
    for signum in (signal.SIGTERM, signal.SIGINT):
        signal.signal(signum, lambda *_: threading.Thread(target=front.shutdown).start())
    front.serve_forever()
    front.server_close()
    return 0


if __name__ == "__main__":
    raise SystemExit(main(sys.argv[1:]))
