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
"""

from __future__ import annotations

import http.client
import http.server
import json
import signal
import sys
import threading
import urllib.parse

from petseg.deploy import endpoints
from petseg.deploy.endpoints import STATUS_PATH
from petseg.errors import ConfigError

HOP_BY_HOP = {"connection", "keep-alive", "proxy-authenticate", "proxy-authorization", "te", "trailers",
              "transfer-encoding", "upgrade", "host"}
CHUNK = 1 << 16
BACKEND_TIMEOUT = 300.0
"""Seconds a backend may take to answer one request."""


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


class _Body:
    """Exactly ``length`` bytes of a request body, read as they are sent on."""

    def __init__(self, stream, length: int):
        self.stream, self.left = stream, length

    def read(self, size: int = CHUNK) -> bytes:
        data = self.stream.read(min(size if size > 0 else CHUNK, self.left)) if self.left else b""
        self.left -= len(data)
        return data


class Handler(http.server.BaseHTTPRequestHandler):
    """Forwards each request to the serving backend; answers `STATUS_PATH` itself."""

    protocol_version = "HTTP/1.1"
    server: Front

    def log_message(self, format, *args):  # quiet: the backends log their requests
        pass

    def do_GET(self):
        if self.path == STATUS_PATH:
            self._reply(200, self.server.status())
        else:
            self.forward()

    def do_POST(self):
        self.forward()

    def do_PUT(self):
        self.forward()

    def do_DELETE(self):
        self.forward()

    def do_HEAD(self):
        self.forward()

    def forward(self):
        """Send the request to the serving backend and its answer back."""
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
        try:
            try:
                connection.request(self.command, self.path, body=_Body(self.rfile, length) if length else None,
                                   headers=headers)
                answer = connection.getresponse()
            except OSError as err:
                return self._refuse(502, "BACKEND_DOWN", f"release {serving.get('version')} at {url} did not "
                                                         f"answer ({type(err).__name__}: {err})")
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

    def _refuse(self, status: int, kind: str, message: str) -> None:
        """A JSON error, then the connection closes (a body it did not read cannot be taken for a request)."""
        self.close_connection = True
        self._reply(status, {"status": {"status": "FAILURE", "reason": kind, "info": message}})

    def _reply(self, status: int, document: dict) -> None:
        data = json.dumps(document).encode()
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        if self.command != "HEAD":
            self.wfile.write(data)


class Front(http.server.ThreadingHTTPServer):
    """The proxy server of one endpoint."""

    daemon_threads = True

    def __init__(self, name: str, address: tuple[str, int]):
        self.backends = Backends(name)
        super().__init__(address, Handler)

    def status(self) -> dict:
        """What `STATUS_PATH` answers."""
        serving = self.backends.serving() or {}
        return {"name": self.backends.name, "version": serving.get("version"),
                "backend": (serving.get("deployment") or {}).get("url"), "in_flight": dict(self.backends.in_flight)}


def main(argv: list[str]) -> int:
    """Serve an endpoint's front until SIGTERM or SIGINT; 2 for arguments it cannot use."""
    try:
        name, port, host = endpoints.check_name(argv[0]), int(argv[1]), (argv[2:] or ["127.0.0.1"])[0]
    except (IndexError, ValueError, ConfigError) as err:
        print(f"usage: python -m petseg.entrypoints.endpoint_proxy NAME PORT [ADDRESS] ({err})", file=sys.stderr)
        return 2
    front = Front(name, (host, port))
    for signum in (signal.SIGTERM, signal.SIGINT):
        signal.signal(signum, lambda *_: threading.Thread(target=front.shutdown).start())
    front.serve_forever()
    front.server_close()
    return 0


if __name__ == "__main__":
    raise SystemExit(main(sys.argv[1:]))
