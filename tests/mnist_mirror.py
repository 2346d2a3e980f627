"""A local MNIST mirror for tests: an HTTP server on 127.0.0.1 that serves a folder and records each path asked for.

Besides plain files it has two broken routes: ``/truncated/*`` drops the connection mid-body and
``/not-http/*`` answers with a non-HTTP status line, so the downloader's handling of them can be tested.
"""

from __future__ import annotations

import functools
import http.server
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path


class _MirrorHandler(http.server.SimpleHTTPRequestHandler):
    requests: list[str]

    def do_GET(self) -> None:
        self.requests.append(self.path)
        if self.path.startswith("/not-http/"):
            self.wfile.write(b"SSH-2.0-OpenSSH_9.6\r\n")
            self.close_connection = True
            return
        if self.path.startswith("/truncated/"):
            self.send_response(200)
            self.send_header("Content-Length", "100000")
            self.end_headers()
            self.wfile.write(bytes(1000))
            self.close_connection = True
            return
        super().do_GET()

    def log_message(self, format: str, *args: object) -> None:
        pass


@contextmanager
def serve_mirror(root: Path) -> Iterator[tuple[str, list[str]]]:
    """Serve ``root`` over HTTP on a free port: yields ``(base URL without a trailing slash, requested paths)``."""
    requests: list[str] = []
    handler = type("Handler", (_MirrorHandler,), {"requests": requests})
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), functools.partial(handler, directory=str(root)))
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}", requests
    finally:
        server.shutdown()
        server.server_close()
        thread.join(timeout=5)
