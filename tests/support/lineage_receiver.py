"""A lineage backend on loopback: a real HTTP server that keeps every OpenLineage event POSTed to it.

It answers ``POST /api/v1/lineage`` (the path of the OpenLineage HTTP transport
and of Marquez) with 201 and keeps the JSON bodies, in arrival order::

    with running_receiver() as receiver:
        env = {"OPENLINEAGE_URL": receiver.url}
        ...
        receiver.events  # the parsed events
"""

from __future__ import annotations

import contextlib
import http.server
import json
import threading
from collections.abc import Iterator


class Receiver(http.server.ThreadingHTTPServer):
    """Keeps every JSON body POSTed to it (``events``, with their ``paths``)."""

    def __init__(self):
        self.events: list[dict] = []
        self.paths: list[str] = []
        self._lock = threading.Lock()
        receiver = self

        class Handler(http.server.BaseHTTPRequestHandler):
            def do_POST(self):  # noqa: N802 - http.server's name
                body = self.rfile.read(int(self.headers.get("Content-Length") or 0))
                with receiver._lock:
                    receiver.paths.append(self.path)
                    receiver.events.append(json.loads(body))
                self.send_response(201)
                self.send_header("Content-Length", "0")
                self.end_headers()

            def log_message(self, *args):
                pass

        super().__init__(("127.0.0.1", 0), Handler)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.server_address[1]}"


@contextlib.contextmanager
def running_receiver() -> Iterator[Receiver]:
    """A `Receiver` serving in a thread for the duration of the block."""
    receiver = Receiver()
    thread = threading.Thread(target=receiver.serve_forever, daemon=True)
    thread.start()
    try:
        yield receiver
    finally:
        receiver.shutdown()
        receiver.server_close()
