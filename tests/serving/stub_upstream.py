"""A tiny HTTP server that names itself in every answer: an upstream for gateway tests that need no
model. Runs in a thread of the test process."""

from __future__ import annotations

import json
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from urllib.parse import parse_qs, urlparse


class StubUpstream:
    """Answers any GET/POST with ``{"upstream": name, "method", "path"}``; ``?sleep=S`` delays it."""

    def __init__(self, name: str) -> None:
        self.name = name
        self.requests = 0
        self.sleeping = threading.Event()  # set while a ?sleep= request is being held
        lock = threading.Lock()
        outer = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"
            disable_nagle_algorithm = True  # headers and body go out in two writes

            def _answer(self) -> None:
                length = int(self.headers.get("Content-Length") or 0)
                if length:
                    self.rfile.read(length)
                query = parse_qs(urlparse(self.path).query)
                if "sleep" in query:
                    outer.sleeping.set()
                    time.sleep(float(query["sleep"][0]))
                with lock:
                    outer.requests += 1
                body = json.dumps(
                    {"upstream": outer.name, "method": self.command, "path": self.path}
                ).encode()
                self.send_response(200)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            do_GET = _answer
            do_POST = _answer

            def log_message(self, *args) -> None:  # keep test output clean
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.server.daemon_threads = True
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)
        self.thread.start()

    @property
    def url(self) -> str:
        host, port = self.server.server_address[:2]
        return f"http://{host}:{port}"

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()

    def __enter__(self) -> StubUpstream:
        return self

    def __exit__(self, *exc) -> None:
        self.close()
