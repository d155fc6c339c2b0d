"""A real HTTP/1.1 server on 127.0.0.1 with well-behaved and hostile routes, for fetch tests.

Raw sockets, one thread per connection: a route can send anything, at any pace, or nothing
(never answer, drip a byte at a time, lie about its charset, inflate to gigabytes). Each
route records the body bytes the kernel accepted from it before the peer went away, so a test
can bound what a client really read.
"""

from __future__ import annotations

import functools
import gzip
import json
import socket
import socketserver
import threading
import time
import zlib
from collections.abc import Callable

Route = Callable[["Conn"], None]

ARTICLE_SENTENCE = "The keeper of the northern light climbed its ninety stairs every evening. "
HUGE_BYTES = 1 << 30
"""Size the `/huge` page claims and would send to a client that never stops reading."""
BOMB_BYTES = 128 << 20
"""Decompressed size of `/bomb` (its compressed size is about a thousandth of it)."""
DRIP_FOR_S = 120.0
"""How long `/drip` goes on at most (a client that works hangs up long before)."""

ARTICLE = f"""<!DOCTYPE html>
<html><head><title>The Lighthouse Keeper</title></head>
<body>
<nav><ul><li><a href="/">Home</a></li><li><a href="/news">News</a></li>
<li><a href="/shop">Shop</a></li><li><a href="/login">Log in</a></li></ul></nav>
<main><article>
<h1>The Lighthouse Keeper</h1>
<p>{ARTICLE_SENTENCE * 6}</p>
<p>In the winter of 1901 the fog horn sounded for forty days, and forty-two ships passed
the point without harm. The keeper wrote each of them into the log by name.</p>
<table><tr><th>Year</th><th>Ships</th></tr><tr><td>1901</td><td>42</td></tr></table>
</article></main>
<footer>Copyright 2024 Footer Corp. All rights reserved. Privacy. Cookies.</footer>
</body></html>"""

MALFORMED = (
    b"<html><body><div><p>Hello <b>world<p>unclosed paragraph <table><tr><td>cell"
    b"</div></span></i>&&&<<>><!-- never closed <script>var x = '<p>';</scr\x00ipt"
    b"<p>Tail text after the garbage"
)

FRENCH = "Le café était très agréable, où nous étions déjà assis près de la fenêtre."


class Conn:
    """One accepted connection: the request line read, helpers to answer."""

    def __init__(self, sock: socket.socket, server: HostileServer, path: str) -> None:
        self.sock = sock
        self.server = server
        self.path = path
        self.sent = 0
        """Body bytes accepted by the kernel so far."""

    def head(self, status: str, headers: dict[str, str]) -> None:
        lines = [f"HTTP/1.1 {status}", *(f"{k}: {v}" for k, v in headers.items())]
        lines.append("Connection: close")
        self.sock.sendall(("\r\n".join(lines) + "\r\n\r\n").encode("latin-1"))

    def body(self, data: bytes) -> None:
        self.sock.sendall(data)
        self.sent += len(data)

    def respond(self, status: str, content_type: str | None, data: bytes, **headers: str) -> None:
        all_headers = {"Content-Length": str(len(data))}
        if content_type is not None:
            all_headers["Content-Type"] = content_type
        all_headers.update({k.replace("_", "-"): v for k, v in headers.items()})
        self.head(status, all_headers)
        self.body(data)

    def redirect(self, location: str, status: str = "302 Found") -> None:
        self.respond(status, "text/html", b"<p>moved</p>", Location=location)


def _huge(c: Conn) -> None:
    c.head("200 OK", {"Content-Type": "text/plain", "Content-Length": str(HUGE_BYTES)})
    block = b"lorem ipsum dolor sit amet, " * (65536 // 28) + b"\n"
    while c.sent < HUGE_BYTES:
        c.body(block)


def _drip(c: Conn) -> None:
    c.head("200 OK", {"Content-Type": "text/plain"})
    end = time.monotonic() + DRIP_FOR_S
    while time.monotonic() < end:
        c.body(b"x")
        time.sleep(0.2)


def _silent(c: Conn) -> None:
    # Never answers: blocks until the client hangs up (recv then returns b"" or fails).
    c.sock.settimeout(DRIP_FOR_S)
    while c.sock.recv(4096):
        pass


@functools.cache
def bomb() -> bytes:
    """`BOMB_BYTES` of "A", gzip-compressed (built once; a fraction of a second)."""
    z = zlib.compressobj(9, zlib.DEFLATED, 16 + zlib.MAX_WBITS)
    block = b"A" * (1 << 20)
    return b"".join([*(z.compress(block) for _ in range(BOMB_BYTES >> 20)), z.flush()])


def _routes(server: HostileServer) -> dict[str, Route]:
    port = server.port
    html = "text/html; charset=utf-8"
    return {
        "/article": lambda c: c.respond("200 OK", html, ARTICLE.encode()),
        "/text": lambda c: c.respond("200 OK", "text/plain", b"plain words, nothing more"),
        "/json": lambda c: c.respond(
            "200 OK", "application/json", json.dumps({"answer": 42, "unit": "ships"}).encode()
        ),
        "/huge": _huge,
        "/drip": _drip,
        "/silent": _silent,
        "/png": lambda c: c.respond("200 OK", "image/png", b"\x89PNG\r\n\x1a\n" + bytes(64)),
        "/octet": lambda c: c.respond("200 OK", "application/octet-stream", bytes(range(256))),
        "/untyped": lambda c: c.respond("200 OK", None, b"who knows"),
        "/loop": lambda c: c.redirect("/loop"),
        "/chain/3": lambda c: c.redirect("/chain/2", "301 Moved Permanently"),
        "/chain/2": lambda c: c.redirect("/chain/1", "307 Temporary Redirect"),
        "/chain/1": lambda c: c.redirect("text"),  # relative to /chain/: /chain/text
        "/chain/text": lambda c: c.respond("200 OK", "text/plain", b"end of the chain"),
        "/to-localhost": lambda c: c.redirect(f"http://localhost:{port}/text"),
        "/to-file": lambda c: c.redirect("file:///etc/passwd"),
        "/to-ftp": lambda c: c.redirect(f"ftp://127.0.0.1:{port}/text"),
        "/to-garbage": lambda c: c.redirect("http://[::1"),
        "/malformed": lambda c: c.respond("200 OK", "text/html", MALFORMED),
        "/utf8-as-latin1": lambda c: c.respond(
            "200 OK", "text/plain; charset=iso-8859-1", FRENCH.encode("utf-8")
        ),
        "/latin1-as-utf8": lambda c: c.respond(
            "200 OK", "text/plain; charset=utf-8", FRENCH.encode("latin-1")
        ),
        "/unknown-charset": lambda c: c.respond(
            "200 OK", "text/plain; charset=x-klingon", FRENCH.encode("utf-8")
        ),
        "/zlib-charset": lambda c: c.respond(
            "200 OK", "text/plain; charset=zlib", FRENCH.encode("utf-8")
        ),
        "/meta-charset": lambda c: c.respond(
            "200 OK",
            "text/html",
            f'<html><head><meta charset="windows-1252"></head><body><p>{FRENCH}</p>'
            "</body></html>".encode("cp1252"),
        ),
        "/gzip": lambda c: c.respond(
            "200 OK", "text/plain", gzip.compress(FRENCH.encode()), Content_Encoding="gzip"
        ),
        "/deflate-raw": lambda c: c.respond(
            "200 OK", "text/plain", _raw_deflate(FRENCH.encode()), Content_Encoding="deflate"
        ),
        "/brotli": lambda c: c.respond("200 OK", "text/plain", b"\x0b\x02", Content_Encoding="br"),
        "/bomb": lambda c: c.respond("200 OK", "text/plain", bomb(), Content_Encoding="gzip"),
        "/404": lambda c: c.respond(
            "404 Not Found", html, b"<html><body><h1>Page not found</h1></body></html>"
        ),
        "/500": lambda c: c.respond("500 Internal Server Error", "text/plain", b"boom"),
        "/404-png": lambda c: c.respond("404 Not Found", "image/png", b"\x89PNG\r\n\x1a\n"),
    }


def _raw_deflate(data: bytes) -> bytes:
    z = zlib.compressobj(6, zlib.DEFLATED, -zlib.MAX_WBITS)
    return z.compress(data) + z.flush()


class _Handler(socketserver.BaseRequestHandler):
    server: _TCPServer

    def handle(self) -> None:
        sock: socket.socket = self.request
        # A small send buffer keeps what the kernel holds for a client that stopped reading
        # small, so `sent` stays close to what the client read.
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 64 * 1024)
        raw = b""
        while b"\r\n\r\n" not in raw:
            chunk = sock.recv(4096)
            if not chunk:
                return
            raw += chunk
        path = raw.split(b" ", 2)[1].decode("latin-1")
        owner = self.server.owner
        conn = Conn(sock, owner, path)
        route = owner.routes.get(path)
        try:
            if route is None:
                conn.respond("404 Not Found", "text/plain", b"no such route")
            else:
                route(conn)
        except OSError:
            pass  # the client hung up: exactly what hostile routes wait for
        finally:
            owner.record(path, conn.sent)


class _TCPServer(socketserver.ThreadingTCPServer):
    daemon_threads = True
    allow_reuse_address = True
    owner: HostileServer


class HostileServer:
    """Serves the routes above on a free loopback port from a background thread."""

    def __init__(self) -> None:
        self._tcp = _TCPServer(("127.0.0.1", 0), _Handler)
        self._tcp.owner = self
        self.port: int = self._tcp.server_address[1]
        """The port it listens on."""
        self.routes = _routes(self)
        self._lock = threading.Lock()
        self._done = threading.Condition(self._lock)
        self._sent: dict[str, list[int]] = {}
        self._thread = threading.Thread(target=self._tcp.serve_forever, daemon=True)
        self._thread.start()

    def url(self, path: str, host: str = "127.0.0.1") -> str:
        return f"http://{host}:{self.port}{path}"

    def record(self, path: str, sent: int) -> None:
        with self._done:
            self._sent.setdefault(path, []).append(sent)
            self._done.notify_all()

    def sent(self, path: str, timeout_s: float = 30.0) -> list[int]:
        """Body bytes sent by each finished request for `path`, waiting (up to `timeout_s`)
        for at least one to finish."""
        with self._done:
            self._done.wait_for(lambda: path in self._sent, timeout=timeout_s)
            return list(self._sent.get(path, []))

    def close(self) -> None:
        self._tcp.shutdown()
        self._tcp.server_close()
