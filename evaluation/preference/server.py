"""The rating app's HTTP server: the page, its JSON API, and the videos (with byte ranges, so players can seek).

    GET  /                         the rating page
    GET  /api/next?rater=R         R's next pair: {"done": false, "pair", "label", "left", "right", "axes", "voted",
                                   "progress": {"done", "total"}}, or {"done": true, "axes", "progress"}
    POST /api/votes                {"pair", "rater", "axis", "choice": "left"|"right"|"none"} -> {"ok": true,
                                   "progress"}; a bad vote -> 400 {"error": one line}, nothing stored
    GET  /media/PAIR/left|right    the videos, by pair and side only (nothing in a URL names a system)

On loopback no token is needed; on any other address every request must carry the study's token (`?token=` in
the URL, which the page passes on, or an `X-Study-Token` header): the printed URL has it. One server per study
(the study folder's lock), since it alone appends to the vote log.
"""

from __future__ import annotations

import contextlib
import hmac
import json
import re
import secrets
import socket
import threading
from http import HTTPStatus
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any
from urllib.parse import parse_qs, quote, urlsplit

from common.requests import RequestError
from evaluation.preference.page import PAGE_HTML
from evaluation.preference.request import StudyServeRequest, is_loopback
from evaluation.preference.store import VoteError, VoteStore
from infra.output_lock import OutputLocked, acquire_output_lock, release_output_lock

MAX_BODY_BYTES = 4096
CHUNK_BYTES = 1 << 16
MEDIA_PATH = re.compile(r"/media/([A-Za-z0-9]+)/(left|right)")
RANGE_HEADER = re.compile(r"bytes=(\d*)-(\d*)")
SECURITY_HEADERS = {
    "Content-Security-Policy": "default-src 'self'; script-src 'unsafe-inline'; style-src 'unsafe-inline'; "
                               "media-src 'self'",
    "X-Content-Type-Options": "nosniff",
    "Referrer-Policy": "no-referrer",
    "Cache-Control": "no-store",
}


def access_token(request: StudyServeRequest) -> str | None:
    """The token raters need: the one given, else a fresh random one off loopback, else none."""
    if request.token is not None:
        return request.token
    return None if is_loopback(request.host) else secrets.token_urlsafe(24)


class StudyServer:
    """The server of one study; `start()` serves in a thread, `serve_forever()` in the caller, `stop()` ends it."""

    def __init__(self, request: StudyServeRequest) -> None:
        self.layout = request.layout
        try:  # the port first: a taken port then leaves the study's lock alone
            self.httpd = ThreadingHTTPServer((request.host, request.port), _Handler)
        except OSError as error:  # port taken, address not on this machine
            raise RequestError(f"cannot listen on {request.host}:{request.port} ({error.strerror or error})") from None
        try:
            acquire_output_lock(self.layout.root)
        except OutputLocked as error:
            self.httpd.server_close()
            raise RequestError(f"another server has this study: {error}") from None
        try:
            self.store = VoteStore(self.layout)
        except BaseException:
            self.httpd.server_close()
            release_output_lock(self.layout.root)
            raise
        self.token = access_token(request)
        self.httpd.daemon_threads = True
        self.httpd.study = self  # type: ignore[attr-defined]
        self.host = request.host
        self._thread: threading.Thread | None = None

    @property
    def port(self) -> int:
        return self.httpd.server_address[1]

    @property
    def url(self) -> str:
        host = f"[{self.host}]" if ":" in self.host else self.host
        if self.host in ("0.0.0.0", "::", ""):  # every address: raters reach it by this machine's name
            host = socket.gethostname()
        return f"http://{host}:{self.port}/" + (f"?token={quote(self.token)}" if self.token else "")

    def token_ok(self, given: str | None) -> bool:
        return self.token is None or (given is not None and hmac.compare_digest(given.encode(), self.token.encode()))

    def start(self) -> StudyServer:
        self._thread = threading.Thread(target=self.httpd.serve_forever, name="study-server", daemon=True)
        self._thread.start()
        return self

    def serve_forever(self) -> None:
        try:
            self.httpd.serve_forever()
        finally:
            self.close()

    def stop(self) -> None:
        self.httpd.shutdown()
        if self._thread is not None:
            self._thread.join()
        self.close()

    def close(self) -> None:
        self.httpd.server_close()
        self.store.close()
        release_output_lock(self.layout.root)


class _Handler(BaseHTTPRequestHandler):
    server_version = "lvd-study"
    protocol_version = "HTTP/1.1"

    @property
    def study(self) -> StudyServer:
        return self.server.study  # type: ignore[attr-defined]

    def log_message(self, format: str, *args: Any) -> None:  # noqa: A002 - the base class's name
        """Quiet: a rating session makes hundreds of media requests."""

    def do_GET(self) -> None:  # noqa: N802 - http.server's naming
        url = urlsplit(self.path)
        query = parse_qs(url.query)
        if not self._authorised(query):
            return
        if url.path in ("/", "/index.html"):
            self._send(HTTPStatus.OK, PAGE_HTML.encode(), "text/html; charset=utf-8")
        elif url.path == "/api/next":
            try:
                self._json(HTTPStatus.OK, self.study.store.next_pair(query.get("rater", [""])[0]))
            except VoteError as error:
                self._json(HTTPStatus.BAD_REQUEST, {"error": str(error)})
        elif media := MEDIA_PATH.fullmatch(url.path):
            self._media(*media.groups())
        else:
            self._json(HTTPStatus.NOT_FOUND, {"error": f"no such resource: {url.path}"})

    def do_POST(self) -> None:  # noqa: N802
        url = urlsplit(self.path)
        if not self._authorised(parse_qs(url.query)):
            return
        if url.path != "/api/votes":
            self._json(HTTPStatus.NOT_FOUND, {"error": f"no such resource: {url.path}"}, close=True)
            return
        try:
            length = int(self.headers.get("Content-Length", ""))
        except ValueError:
            self._json(HTTPStatus.BAD_REQUEST, {"error": "a vote needs a Content-Length"}, close=True)
            return
        if not 0 < length <= MAX_BODY_BYTES:
            self._json(HTTPStatus.BAD_REQUEST, {"error": f"a vote is 1-{MAX_BODY_BYTES} bytes of JSON, got {length}"},
                       close=True)
            return
        body = self.rfile.read(length)
        try:
            vote = json.loads(body)
        except (json.JSONDecodeError, UnicodeDecodeError):
            self._json(HTTPStatus.BAD_REQUEST, {"error": "a vote must be JSON"})
            return
        try:
            progress = self.study.store.cast(vote)
        except VoteError as error:
            self._json(HTTPStatus.BAD_REQUEST, {"error": str(error)})
            return
        self._json(HTTPStatus.OK, {"ok": True, "progress": progress})

    # ------------------------------------------------------------------------------------------ helpers

    def _authorised(self, query: dict[str, list[str]]) -> bool:
        given = query.get("token", [None])[0] or self.headers.get("X-Study-Token")
        if self.study.token_ok(given):
            return True
        # closes the connection: a refused POST's body is never read, so it must not be parsed as a next request
        self._send(HTTPStatus.FORBIDDEN, b"this study needs the token from its URL\n", "text/plain; charset=utf-8",
                   close=True)
        return False

    def _media(self, pair_id: str, side: str) -> None:
        pair = self.study.store.pair_by_id.get(pair_id)
        if pair is None:
            self._json(HTTPStatus.NOT_FOUND, {"error": f"no pair {pair_id!r}"})
            return
        path = Path(self.study.layout.root, pair.left_video if side == "left" else pair.right_video)
        size = path.stat().st_size
        start, end = 0, size - 1
        status = HTTPStatus.OK
        wanted = RANGE_HEADER.fullmatch(self.headers.get("Range", "").strip())
        if wanted and (wanted.group(1) or wanted.group(2)):
            if wanted.group(1):
                start = int(wanted.group(1))
                end = min(int(wanted.group(2)), size - 1) if wanted.group(2) else size - 1
            else:  # the last N bytes
                start = max(0, size - int(wanted.group(2)))
            if start > end or start >= size:
                self._send(HTTPStatus.REQUESTED_RANGE_NOT_SATISFIABLE, b"", "text/plain",
                           {"Content-Range": f"bytes */{size}"})
                return
            status = HTTPStatus.PARTIAL_CONTENT
        headers = {"Accept-Ranges": "bytes"}
        if status == HTTPStatus.PARTIAL_CONTENT:
            headers["Content-Range"] = f"bytes {start}-{end}/{size}"
        self._start(status, "video/webm", end - start + 1, headers)
        try:
            with path.open("rb") as handle:
                handle.seek(start)
                remaining = end - start + 1
                while remaining > 0:
                    chunk = handle.read(min(CHUNK_BYTES, remaining))
                    if not chunk:
                        break
                    self.wfile.write(chunk)
                    remaining -= len(chunk)
        except (BrokenPipeError, ConnectionResetError):  # the player moved on (seek, next pair)
            self.close_connection = True

    def _json(self, status: HTTPStatus, data: dict[str, Any], close: bool = False) -> None:
        self._send(status, json.dumps(data).encode(), "application/json", close=close)

    def _send(self, status: HTTPStatus, body: bytes, content_type: str, headers: dict[str, str] | None = None,
              close: bool = False) -> None:
        self._start(status, content_type, len(body), headers, close)
        try:
            self.wfile.write(body)
        except (BrokenPipeError, ConnectionResetError):
            self.close_connection = True

    def _start(self, status: HTTPStatus, content_type: str, length: int, headers: dict[str, str] | None = None,
               close: bool = False) -> None:
        self.send_response(status)
        self.send_header("Content-Type", content_type)
        self.send_header("Content-Length", str(length))
        for name, value in {**SECURITY_HEADERS, **(headers or {})}.items():
            self.send_header(name, value)
        if close:
            self.send_header("Connection", "close")
            self.close_connection = True
        self.end_headers()


def serve_study(request: StudyServeRequest, announce: Any = print) -> None:
    """Serve until interrupted (Ctrl-C); `announce` gets the URL to open (with the token when there is one)."""
    server = StudyServer(request)
    announce(f"rating page: {server.url}")
    with contextlib.suppress(KeyboardInterrupt):
        server.serve_forever()
