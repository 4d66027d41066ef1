"""A real HTTP file server on loopback for download tests, with faults on cue: Range and
If-Range as a CDN does them, ETags that change, 5xx answers, cut connections, slow
bodies, and a Hugging Face-like tree listing. It records every request's headers."""

from __future__ import annotations

import json
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer


@dataclass
class Served:
    body: bytes
    etag: str = '"v1"'
    linked_etag: str | None = None  # the hub's X-Linked-Etag (a sha256 for LFS files)
    statuses: list[int] = field(default_factory=list)  # answered first, one per request
    cut_at: int | None = None  # the next full answer stops after this many bytes
    chunk_delay: float = 0.0  # seconds between 64 KiB chunks
    no_length: bool = False  # no Content-Length: the body ends when the connection closes


@dataclass
class Seen:
    path: str
    headers: dict[str, str]


class FileServer:
    def __init__(self) -> None:
        self.files: dict[str, Served] = {}
        self.requests: list[Seen] = []
        self.lock = threading.Lock()
        self.stopping = threading.Event()
        server = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, *args: object) -> None:
                pass

            def do_GET(self) -> None:
                path = self.path.split("?", 1)[0]
                with server.lock:
                    server.requests.append(Seen(self.path, {k.lower(): v for k, v in self.headers.items()}))
                    served = server.files.get(path)
                    status = served.statuses.pop(0) if served and served.statuses else None
                    cut = served.cut_at if served else None
                    if served is not None and status is None:
                        served.cut_at = None
                if served is None or status is not None:
                    self.send_response(status or 404)
                    self.send_header("Content-Length", "0")
                    self.end_headers()
                    return
                body, start = served.body, 0
                rng = self.headers.get("Range")
                if rng and self.headers.get("If-Range") in (None, served.etag):
                    start = int(rng.removeprefix("bytes=").split("-")[0])
                    if start >= len(body):
                        self.send_response(416)
                        self.send_header("Content-Length", "0")
                        self.end_headers()
                        return
                    self.send_response(206)
                    self.send_header("Content-Range", f"bytes {start}-{len(body) - 1}/{len(body)}")
                else:
                    self.send_response(200)
                if served.no_length:
                    self.close_connection = True
                else:
                    self.send_header("Content-Length", str(len(body) - start))
                self.send_header("ETag", served.etag)
                if served.linked_etag:
                    self.send_header("X-Linked-Etag", served.linked_etag)
                self.end_headers()
                end = len(body) if cut is None else min(len(body), start + cut)
                for at in range(start, end, 65536):
                    self.wfile.write(body[at:min(end, at + 65536)])
                    self.wfile.flush()
                    if served.chunk_delay:
                        server.stopping.wait(served.chunk_delay)  # a slow server, until it stops
                if cut is not None:
                    self.close_connection = True

        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.httpd.server_address[1]}"

    def add(self, path: str, body: bytes, **kw: object) -> Served:
        served = Served(body, **kw)  # type: ignore[arg-type]
        self.files[path] = served
        return served

    def add_tree(self, repo: str, revision: str, files: dict[str, bytes]) -> None:
        """A hub repo: its tree listing and each file's resolve URL."""
        listing = [{"type": "file", "path": name, "size": len(body)} for name, body in files.items()]
        self.add(f"/api/models/{repo}/tree/{revision}", json.dumps(listing).encode())
        for name, body in files.items():
            self.add(f"/{repo}/resolve/{revision}/{name}", body)

    def seen(self, path: str) -> list[Seen]:
        with self.lock:
            return [r for r in self.requests if r.path.split("?", 1)[0] == path]


@contextmanager
def file_server() -> Iterator[FileServer]:
    server = FileServer()
    thread = threading.Thread(target=server.httpd.serve_forever, name="fileserver", daemon=True)
    thread.start()
    try:
        yield server
    finally:
        server.stopping.set()
        server.httpd.shutdown()
        server.httpd.server_close()
