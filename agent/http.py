"""A minimal keep-alive HTTP/1.1 JSON client on asyncio streams, for one model server.

Why not httpx: measured on these machines (DESIGN.md, "HTTP client cost"), httpx 0.28 costs
~3 ms of CPU per request with 64 requests in flight (its pool polls every connection on each
request), against ~120-180 µs for a bare keep-alive client on asyncio streams. A policy server
is one host on a trusted network, speaking plain HTTP/1.1 with JSON bodies, so this client
does only that:

- a pool of at most `max_connections` keep-alive connections to one `host:port`; a request
  waits for a free one (the wait counts against its timeout);
- request bodies with `Content-Length`; responses framed by `Content-Length`, `chunked`, or
  the end of the connection;
- one timeout per request, covering the pool wait, connecting, sending and reading;
- optionally TLS (`ssl`) and fixed extra headers on every request (`headers`: an API key),
  for a hosted OpenAI-compatible API;
- resending, and when: a keep-alive connection the server has closed while idle is noticed
  before anything is written to it (its end-of-stream has arrived) and replaced. A request
  whose bytes were written and that got no response is resent once on a new connection only
  when it is idempotent: a server may have acted on bytes that reached it, and a completion
  request sent twice samples a turn twice. Everything else fails with a typed error.

Errors are `HTTPError` subclasses, each with `sent`: whether the request's bytes may have
reached the server (False: it certainly did not act on it).
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import ssl as _ssl
from collections.abc import Mapping
from dataclasses import dataclass
from types import TracebackType
from typing import Any

IDEMPOTENT_METHODS = frozenset({"GET", "HEAD", "PUT", "DELETE", "OPTIONS"})
"""Methods resent once after a lost connection unless the caller says otherwise (RFC 9110
9.2.2)."""
_HEADER_LIMIT = 1 << 16
"""Longest response head accepted (status line and headers)."""


class HTTPError(Exception):
    """A request failed. `sent`: its bytes may have reached the server."""

    def __init__(self, message: str, *, sent: bool) -> None:
        super().__init__(message)
        self.sent = sent


class HTTPTimeoutError(HTTPError):
    """No complete response within the request's timeout."""


class HTTPConnectionError(HTTPError):
    """The connection could not be opened, or was lost before the whole response arrived
    (refused, reset, closed early, a body shorter than its `Content-Length`)."""


class HTTPStatusError(HTTPError):
    """The server answered with a status other than 2xx."""

    def __init__(self, status: int, body: bytes) -> None:
        text = body[:2000].decode("utf-8", "replace")
        super().__init__(f"HTTP {status}: {text}", sent=True)
        self.status = status
        self.body = body


class HTTPMalformedError(HTTPError):
    """The response could not be read: bad framing, or a body that is not the JSON asked for."""


@dataclass(frozen=True)
class Response:
    """One complete response."""

    status: int
    """The status code."""
    headers: dict[str, str]
    """Header values by lowercased name (a repeated header keeps its last value)."""
    body: bytes
    """The body, de-chunked."""


class _NoResponse(Exception):
    """The connection ended before the first byte of the response (resendable if idempotent)."""


class _Conn:
    __slots__ = ("reader", "writer")

    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.reader = reader
        self.writer = writer

    def usable(self) -> bool:
        # A server that closed an idle keep-alive connection has sent its FIN, which the loop
        # has already fed to the reader: writing there would lose the request.
        return not self.reader.at_eof() and not self.writer.transport.is_closing()

    def close(self) -> None:
        self.writer.close()


class HTTPClient:
    """Keep-alive HTTP/1.1 client for one `host:port` (see the module docstring).

    One event loop drives a client. Use `async with`, or call `close()` (idempotent)."""

    def __init__(
        self,
        host: str,
        port: int,
        *,
        max_connections: int = 64,
        timeout_s: float = 60.0,
        max_body_bytes: int = 256 << 20,
        ssl: _ssl.SSLContext | None = None,
        headers: Mapping[str, str] | None = None,
    ) -> None:
        if max_connections < 1:
            raise ValueError("max_connections must be at least 1")
        headers = headers or {}
        if any(c in k + v for k, v in headers.items() for c in "\r\n"):
            raise ValueError("header names and values must not contain line breaks")
        extra = "".join(f"{k}: {v}\r\n" for k, v in headers.items())
        self.host = host
        self.port = port
        self.max_connections = max_connections
        self.timeout_s = timeout_s
        self.max_body_bytes = max_body_bytes
        self.n_connects = 0
        """Connections opened so far."""
        self.n_sent = 0
        """Requests written to a connection so far (a resent request counts twice)."""
        self._host_header = f"Host: {host}:{port}\r\n{extra}".encode()
        self._ssl = ssl
        self._slots = asyncio.Semaphore(max_connections)
        self._idle: list[_Conn] = []
        self._open: set[_Conn] = set()
        self._closed = False

    async def request(
        self,
        method: str,
        path: str,
        body: bytes = b"",
        *,
        content_type: str = "application/json",
        timeout_s: float | None = None,
        idempotent: bool | None = None,
    ) -> Response:
        """Send one request and read its whole response, whatever its status.

        `idempotent` (default: by method) allows one resend on a fresh connection when a
        written request got no response at all."""
        if self._closed:
            raise HTTPConnectionError("the client is closed", sent=False)
        resend = method in IDEMPOTENT_METHODS if idempotent is None else idempotent
        head = (
            f"{method} {path} HTTP/1.1\r\n".encode()
            + self._host_header
            + f"Content-Type: {content_type}\r\nContent-Length: {len(body)}\r\n\r\n".encode()
        )
        data = head + body
        sent = False
        try:
            async with asyncio.timeout(self.timeout_s if timeout_s is None else timeout_s):
                async with self._slots:
                    for attempt in range(2):
                        conn = await self._checkout()
                        sent = True
                        try:
                            response, keep = await self._exchange(conn, data, method)
                        except _NoResponse as e:
                            self._discard(conn)
                            if attempt == 0 and resend:
                                continue
                            raise HTTPConnectionError(
                                f"{method} {path}: the connection closed without a response ({e})",
                                sent=True,
                            ) from None
                        except BaseException:
                            self._discard(conn)
                            raise
                        if keep and not self._closed:
                            self._idle.append(conn)
                        else:
                            self._discard(conn)
                        return response
        except TimeoutError:
            raise HTTPTimeoutError(f"{method} {path}: no response in time", sent=sent) from None
        except OSError as e:  # reset or broken pipe after the first response byte
            raise HTTPConnectionError(f"{method} {path}: {e!r}", sent=sent) from None
        except asyncio.IncompleteReadError as e:
            raise HTTPConnectionError(
                f"{method} {path}: the connection closed mid-response "
                f"({len(e.partial)} bytes of a part expecting {e.expected})",
                sent=True,
            ) from None
        except (ValueError, asyncio.LimitOverrunError) as e:
            raise HTTPMalformedError(f"{method} {path}: {e}", sent=True) from None
        raise AssertionError("unreachable")  # the loop above returns or raises

    async def post_json(
        self,
        path: str,
        payload: Any,
        *,
        timeout_s: float | None = None,
        idempotent: bool = False,
    ) -> Any:
        """POST `payload` as JSON; return the decoded JSON body of a 2xx response.
        Raises `HTTPStatusError` on any other status, `HTTPMalformedError` on a non-JSON body."""
        body = json.dumps(payload, separators=(",", ":")).encode()
        response = await self.request(
            "POST", path, body, timeout_s=timeout_s, idempotent=idempotent
        )
        return _json(path, response)

    async def get_json(self, path: str, *, timeout_s: float | None = None) -> Any:
        """GET `path`; the decoded JSON body of a 2xx response (errors as `post_json`)."""
        return _json(path, await self.request("GET", path, timeout_s=timeout_s))

    def close(self) -> None:
        """Close every connection; requests in progress fail. Idempotent."""
        self._closed = True
        for conn in list(self._open):
            self._discard(conn)
        self._idle.clear()

    async def __aenter__(self) -> HTTPClient:
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        writers = [c.writer for c in self._open]
        self.close()
        for writer in writers:
            with contextlib.suppress(OSError):
                await writer.wait_closed()

    # -- internals ------------------------------------------------------------------------

    async def _checkout(self) -> _Conn:
        while self._idle:
            conn = self._idle.pop()  # the most recently used: the least likely to be stale
            if conn.usable():
                return conn
            self._discard(conn)
        try:
            reader, writer = await asyncio.open_connection(
                self.host,
                self.port,
                limit=_HEADER_LIMIT,
                ssl=self._ssl,
                server_hostname=self.host if self._ssl is not None else None,
            )
        except OSError as e:
            raise HTTPConnectionError(
                f"cannot connect to {self.host}:{self.port}: {e!r}", sent=False
            ) from None
        self.n_connects += 1
        conn = _Conn(reader, writer)
        self._open.add(conn)
        return conn

    def _discard(self, conn: _Conn) -> None:
        self._open.discard(conn)
        conn.close()

    async def _exchange(self, conn: _Conn, data: bytes, method: str) -> tuple[Response, bool]:
        """Write one request and read its response; also says whether the connection can be
        reused."""
        reader = conn.reader
        self.n_sent += 1
        conn.writer.write(data)
        try:
            await conn.writer.drain()
            head = await reader.readuntil(b"\r\n\r\n")
        except asyncio.IncompleteReadError as e:
            if e.partial:
                raise
            raise _NoResponse("end of stream") from None
        except ConnectionResetError as e:
            raise _NoResponse(repr(e)) from None
        lines = head[:-4].decode("latin-1").split("\r\n")
        version, _, rest = lines[0].partition(" ")
        code = rest[:3]
        if not version.startswith("HTTP/1.") or not code.isdigit():
            raise ValueError(f"bad status line {lines[0][:100]!r}")
        status = int(code)
        headers: dict[str, str] = {}
        for line in lines[1:]:
            name, sep, value = line.partition(":")
            if not sep:
                raise ValueError(f"bad header line {line[:100]!r}")
            headers[name.strip().lower()] = value.strip()
        connection = headers.get("connection", "").lower()
        keep = connection != "close" and (version == "HTTP/1.1" or connection == "keep-alive")
        if method == "HEAD" or status in (204, 304) or 100 <= status < 200:
            return Response(status, headers, b""), keep
        if "chunked" in headers.get("transfer-encoding", "").lower():
            return Response(status, headers, await self._chunked(reader)), keep
        length = headers.get("content-length")
        if length is not None:
            if not length.isdigit():
                raise ValueError(f"bad Content-Length {length[:40]!r}")
            n = int(length)
            if n > self.max_body_bytes:
                raise ValueError(f"body of {n} bytes exceeds {self.max_body_bytes}")
            return Response(status, headers, await reader.readexactly(n)), keep
        # Neither length nor chunks: the body runs to the end of the connection.
        body = await reader.read(self.max_body_bytes + 1)
        while body and len(body) <= self.max_body_bytes:
            more = await reader.read(self.max_body_bytes + 1 - len(body))
            if not more:
                break
            body += more
        if len(body) > self.max_body_bytes:
            raise ValueError(f"body exceeds {self.max_body_bytes} bytes")
        return Response(status, headers, body), False

    async def _chunked(self, reader: asyncio.StreamReader) -> bytes:
        parts: list[bytes] = []
        total = 0
        while True:
            line = await reader.readuntil(b"\r\n")
            size_text = line[:-2].split(b";", 1)[0].strip()
            try:
                size = int(size_text, 16)
            except ValueError:
                raise ValueError(f"bad chunk size {size_text[:40]!r}") from None
            if size == 0:
                while await reader.readuntil(b"\r\n") != b"\r\n":  # trailers
                    pass
                return b"".join(parts)
            total += size
            if total > self.max_body_bytes:
                raise ValueError(f"body exceeds {self.max_body_bytes} bytes")
            chunk = await reader.readexactly(size + 2)
            if chunk[-2:] != b"\r\n":
                raise ValueError("chunk not followed by CRLF")
            parts.append(chunk[:-2])


def _json(path: str, response: Response) -> Any:
    if not 200 <= response.status < 300:
        raise HTTPStatusError(response.status, response.body)
    try:
        return json.loads(response.body)
    except ValueError as e:  # UnicodeDecodeError is a ValueError too
        raise HTTPMalformedError(f"{path}: the body is not JSON ({e})", sent=True) from None
