"""A loopback HTTP file server for the fetch tests (127.0.0.1 only; stops by itself).

Per file, ``modes[name]`` picks a behaviour:
  "normal"   200, or 206 for ``Range: bytes=N-``
  "break"    the first response sends half of what it promises, then drops the connection
  "short"    the first response has no Content-Length and ends (connection closed) after half
  "norange"  ignores Range: always 200 with the whole file
  "flaky"    answers 500 to the first ``flaky_failures`` requests, then behaves normally
  "length-list"  Content-Length as a list of one repeated value ("N, N"; RFC 9110 lets it pass)
  "bad-length"   Content-Length "abc" (the body then ends where the connection does)
  "bad-chunk"    the first response is chunked, and after one 4 KiB chunk its next size line
                 runs past http.client's 64 KiB limit
Unknown names get 404. Every request is recorded as a ``Request`` (name, Range header, status,
body bytes sent). ``chunk_delay`` slows the body down so two clients overlap.
"""

from __future__ import annotations

import re
import threading
import time
from dataclasses import dataclass
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

LIFETIME = 60.0  # seconds: the server shuts itself down even if a test forgets to
MAX_REQUESTS = 200  # then it answers 503 to everything: a runaway client cannot loop forever


@dataclass
class Request:
    name: str
    range: str | None
    status: int
    sent: int


class FileServer:
    def __init__(self, files: dict[str, bytes] | None = None):
        self.files: dict[str, bytes] = dict(files or {})
        self.modes: dict[str, str] = {}
        self.flaky_failures = 2
        self.chunk_delay = 0.0
        self.requests: list[Request] = []
        self._lock = threading.Lock()
        self._httpd = ThreadingHTTPServer(("127.0.0.1", 0), _handler(self))
        self._httpd.daemon_threads = True
        self._thread = threading.Thread(target=self._httpd.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)
        self._timer = threading.Timer(LIFETIME, self.stop)
        self._timer.daemon = True

    @property
    def base(self) -> str:
        host, port = self._httpd.server_address[:2]
        return f"http://{host}:{port}/"

    def url(self, name: str) -> str:
        return self.base + name

    def requests_for(self, name: str) -> list[Request]:
        with self._lock:
            return [r for r in self.requests if r.name == name]

    def start(self) -> "FileServer":
        self._thread.start()
        self._timer.start()
        return self

    def stop(self) -> None:
        self._timer.cancel()
        self._httpd.shutdown()
        self._httpd.server_close()

    def __enter__(self) -> "FileServer":
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()

    def _record(self, request: Request) -> int:
        with self._lock:
            self.requests.append(request)
            return len(self.requests)


class _Handler(BaseHTTPRequestHandler):
    state: "FileServer"  # the server's files, modes and log; set per server by _handler()

    def log_message(self, *args) -> None:  # keep pytest output clean
        pass

    def do_GET(self) -> None:  # noqa: N802 - http.server's naming
        name = self.path.lstrip("/")
        rng = self.headers.get("Range")
        mode = self.state.modes.get(name, "normal")
        earlier = len(self.state.requests_for(name))
        if len(self.state.requests) >= MAX_REQUESTS:
            return self._status(name, rng, 503)
        if name not in self.state.files:
            return self._status(name, rng, 404)
        if mode == "flaky" and earlier < self.state.flaky_failures:
            return self._status(name, rng, 500)
        data = self.state.files[name]
        start = 0
        m = re.match(r"bytes=(\d+)-$", rng or "")
        if m and mode != "norange":
            start = int(m.group(1))
            if start >= len(data):
                return self._status(name, rng, 416, {"Content-Range": f"bytes */{len(data)}"})
        body = data[start:]
        if mode in ("break", "short") and earlier == 0:
            body = body[: len(body) // 2]  # promise everything (or nothing), deliver half, hang up
        record = Request(name, rng, 206 if start else 200, 0)
        self.state._record(record)  # before any byte leaves: the client may finish first
        self.send_response(record.status)
        if mode == "bad-chunk" and earlier == 0:
            self.send_header("Transfer-Encoding", "chunked")
            self.end_headers()
            record.sent = 4096
            self.wfile.write(b"1000\r\n" + body[:4096] + b"\r\n" + b"f" * 70000 + b"\r\n")
            self.close_connection = True
            return
        length = {"length-list": f"{len(data) - start}, {len(data) - start}", "bad-length": "abc"}.get(
            mode, str(len(data) - start))
        if not (mode == "short" and earlier == 0):  # HTTP/1.0: the body then ends where we hang up
            self.send_header("Content-Length", length)
        if start:
            self.send_header("Content-Range", f"bytes {start}-{len(data) - 1}/{len(data)}")
        self.send_header("Accept-Ranges", "none" if mode == "norange" else "bytes")
        self.end_headers()
        self._send(body, record)
        if mode in ("break", "short") and earlier == 0:
            self.close_connection = True

    def _send(self, body: bytes, record: Request) -> None:
        try:
            for i in range(0, len(body), 1 << 16):
                chunk = body[i:i + (1 << 16)]
                record.sent += len(chunk)  # counted before the write, for the same reason
                self.wfile.write(chunk)
                if self.state.chunk_delay:
                    time.sleep(self.state.chunk_delay)
            self.wfile.flush()
        except (BrokenPipeError, ConnectionResetError):  # the client stopped reading (tests do):
            self.close_connection = True                  # no traceback on the test's stderr

    def _status(self, name: str, rng: str | None, code: int, headers: dict | None = None) -> None:
        self.state._record(Request(name, rng, code, 0))
        self.send_response(code)
        for k, v in (headers or {}).items():
            self.send_header(k, v)
        self.send_header("Content-Length", "0")
        self.end_headers()


def _handler(server: FileServer) -> type:
    return type("Handler", (_Handler,), {"state": server})
