"""Fetch a web page over HTTP(S) and show its readable text, as a `Tool`.

One shared `httpx.AsyncClient` serves every call. Redirects are followed here, not by httpx, so
that each hop is counted and checked like the first URL: scheme http or https, host allowed,
address public when `block_private` is set. The body is streamed and read no further than
`max_bytes`; the whole fetch (DNS, connect, headers, every hop, the body) runs under one
deadline, so a server that never answers or drips a byte at a time cannot hold a call longer
than `timeout_s`. Decompression is done here too, with zlib's `max_length`, because httpx's
decoders inflate a whole network chunk at once: a gzip bomb would blow up ~1000x per 64 KiB
chunk before any cap could apply. The cap counts decompressed bytes, and raw bytes as well
(a compressed stream of empty members inflates to nothing).

Text comes from the declared charset (a BOM first, then the header, then an HTML `<meta>`
prescan), falling back to UTF-8 and then to `charset_normalizer`'s guess; a wrong or unknown
label never raises. HTML becomes readable text with trafilatura (`extract`, else `html2txt`).

Outcomes: any HTTP status the server answers with (404, 500, ...) is an observation showing
the status. Everything else that stops a fetch (a refused URL, host, address, content type or
encoding; too many redirects; a timeout; a server breaking HTTP; a network failure) raises
`FetchError`, a `ToolError` whose `kind` says which; the runner shows it to the agent as a
`tool_error` observation.

Threat model. Covered: allow/deny lists by host name on every hop (trailing dots and case
folded); non-HTTP schemes; redirect loops; oversized, slow, silent and compressed-bomb
responses; binary content. With `block_private`, hosts resolving to loopback, private,
link-local, multicast or reserved addresses are refused. Not covered: DNS rebinding (the name
is resolved again by the connection, so a resolver that changes its answer in between wins);
deny lists are by name, so an IP literal or another name for a denied host is not caught by
them (`block_private` is the address-based guard); bytes of refused responses are not priced.
"""

from __future__ import annotations

import asyncio
import codecs
import ipaddress
import re
import socket
import zlib
from dataclasses import dataclass, replace
from types import TracebackType
from typing import Any, Literal

import charset_normalizer
import httpx
import trafilatura
from pydantic import BaseModel, ConfigDict, Field

from turnrl.tools.base import Encode, ToolError, ToolOutput, ToolSpec, truncate_to_tokens
from turnrl.tools.web_config import WebFetchConfig, host_matches

__all__ = [
    "FetchArgs",
    "FetchError",
    "FetchErrorKind",
    "FetchedPage",
    "Inflater",
    "WebFetch",
    "WebFetchConfig",
    "decode_body",
    "host_matches",
    "is_public_address",
    "page_text",
]

HTML_TYPES = frozenset({"text/html", "application/xhtml+xml"})
"""Media types converted to readable text with trafilatura; others are shown as decoded."""

_REDIRECT_STATUSES = frozenset({301, 302, 303, 307, 308})
_EXTRACT_SLACK_S = 10.0
"""Time the runner allows beyond the fetch deadline, for decoding and text extraction."""
_MAX_TOKEN_CHARS = 32
"""Tokens are rarely longer than this many characters: text is pre-cut to budget x this."""


def is_public_address(ip: ipaddress.IPv4Address | ipaddress.IPv6Address) -> bool:
    """Whether `ip` is a globally routed unicast address (IPv4 inside IPv6 checked as IPv4)."""
    if isinstance(ip, ipaddress.IPv6Address):
        mapped = ip.ipv4_mapped or ip.sixtofour
        if mapped is not None:
            return is_public_address(mapped)
    return ip.is_global and not ip.is_multicast


FetchErrorKind = Literal[
    "bad_url",
    "scheme",
    "denied_host",
    "private_address",
    "redirects",
    "content_type",
    "encoding",
    "timeout",
    "protocol",
    "network",
]


class FetchError(ToolError):
    """A fetch that produced no page to show; `kind` says why."""

    def __init__(self, kind: FetchErrorKind, message: str) -> None:
        super().__init__(message)
        self.kind: FetchErrorKind = kind
        """Which check or failure stopped the fetch."""


class FetchArgs(BaseModel):
    """Arguments of the `fetch` tool."""

    model_config = ConfigDict(extra="forbid", str_strip_whitespace=True)

    url: str = Field(min_length=1, max_length=2048, description="The http(s) URL to fetch.")
    """Absolute http or https URL."""


@dataclass(frozen=True)
class FetchedPage:
    """What one fetch read, before it is turned into text."""

    url: str
    """The final URL, after redirects."""
    status: int
    """HTTP status of the final response."""
    reason: str
    """Its reason phrase (`Not Found`)."""
    content_type: str
    """Media type without parameters, lower case; empty when the server sent none."""
    charset: str | None
    """The `charset` parameter of the `Content-Type` header, as sent."""
    body: bytes
    """Decompressed body, at most `max_bytes`; empty for an error status with a type that is
    not shown."""
    truncated: bool
    """True when reading stopped at the cap before the body ended."""
    bytes_downloaded: int
    """Bytes read off the network for the body (compressed size)."""
    redirects: tuple[str, ...]
    """The URLs redirected to, in order."""


class WebFetch:
    """The `fetch` tool: GET one URL and show its text under a short header."""

    def __init__(self, encode: Encode, config: WebFetchConfig | None = None) -> None:
        """`encode` is the policy's tokenizer (text -> ids): the output budget is counted in
        the tokens the agent will read."""
        self.config = config or WebFetchConfig()
        self._encode = encode
        self._client: httpx.AsyncClient | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._spec = ToolSpec(
            name="fetch",
            description=(
                "Fetch a web page (http or https) and return its readable text, after a header "
                "with the final URL, the HTTP status and the content type."
            ),
            args_model=FetchArgs,
            cost=self.config.cost,
            timeout_s=self.config.timeout_s + _EXTRACT_SLACK_S,
        )

    @property
    def spec(self) -> ToolSpec:
        return self._spec

    async def __call__(self, args: Any) -> ToolOutput:
        if not isinstance(args, FetchArgs):
            args = FetchArgs.model_validate(args)
        page = await self.fetch(args.url)
        text, cut = await asyncio.to_thread(self.render, page)
        return ToolOutput(
            text=text,
            truncated=page.truncated or cut,
            extra_cost={
                "bytes": float(page.bytes_downloaded),
                "tokens": float(len(self._encode(text))),
            },
        )

    async def fetch(self, url: str) -> FetchedPage:
        """GET `url`, following redirects, under the deadline. Raises `FetchError`."""
        progress = _Progress()
        try:
            async with asyncio.timeout(self.config.timeout_s):
                return await self._follow(url, progress)
        except TimeoutError:
            raise FetchError(
                "timeout",
                f"no complete response within {self.config.timeout_s:g} s "
                f"({progress.bytes} body bytes received)",
            ) from None
        except httpx.TimeoutException as e:
            raise FetchError("timeout", f"{type(e).__name__}: {e}") from None
        except httpx.InvalidURL as e:
            raise FetchError("bad_url", f"invalid URL: {e}") from None
        except httpx.RemoteProtocolError as e:
            # Also where a redirect's Location is not a URL: httpx parses it even when it
            # does not follow redirects (to fill `Response.next_request`).
            raise FetchError("protocol", f"{type(e).__name__}: {e}") from None
        except (httpx.HTTPError, OSError) as e:
            raise FetchError("network", f"{type(e).__name__}: {e}") from None

    def render(self, page: FetchedPage) -> tuple[str, bool]:
        """The observation text of `page` within `max_output_tokens`; returns (text, cut).
        CPU-bound (trafilatura): `__call__` runs it in a worker thread."""
        header = [
            f"URL: {page.url}",
            f"Status: {page.status} {page.reason}".rstrip(),
            f"Content-Type: {page.content_type or '(none)'}",
        ]
        if page.truncated:
            header.append(f"Note: only the first {len(page.body)} bytes were read.")
        head = "\n".join(header) + "\n\n"
        if page.content_type in self.config.content_types:
            body = page_text(page) or "(no readable text)"
        else:
            body = f"(a {page.content_type or 'untyped'} body is not shown)"
        marker = len(self._encode(" …[truncated]"))
        budget = max(0, self.config.max_output_tokens - len(self._encode(head)) - marker)
        limit = budget * _MAX_TOKEN_CHARS
        shown, cut = truncate_to_tokens(body[:limit], self._encode, budget)
        if len(body) > limit and not cut:
            shown, cut = shown + " …[truncated]", True
        # Token counts are not additive across a join: check the whole once more.
        excess = len(self._encode(head + shown)) - self.config.max_output_tokens
        if excess > 0:
            shown, _ = truncate_to_tokens(shown, self._encode, max(0, budget - excess))
            cut = True
        return head + shown, cut

    async def aclose(self) -> None:
        """Close the shared client. Idempotent; a later call opens a new one."""
        client, self._client = self._client, None
        if client is not None:
            await client.aclose()

    async def __aenter__(self) -> WebFetch:
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self.aclose()

    def _http(self) -> httpx.AsyncClient:
        # Opened on first use, in the event loop that runs the calls. A client's pooled
        # connections belong to its loop: a call from another loop (a second `asyncio.run`)
        # gets a new client, and the old one's sockets are left to the collector.
        loop = asyncio.get_running_loop()
        if self._client is None or self._loop is not loop:
            self._loop = loop
            self._client = httpx.AsyncClient(
                follow_redirects=False,
                timeout=httpx.Timeout(self.config.timeout_s),
                trust_env=self.config.trust_env,
                headers={
                    "User-Agent": self.config.user_agent,
                    "Accept": ", ".join([*self.config.content_types, "*/*;q=0.1"]),
                    "Accept-Encoding": "gzip, deflate",
                },
            )
        return self._client

    async def _follow(self, url: str, progress: _Progress) -> FetchedPage:
        current = httpx.URL(url)
        redirects: list[str] = []
        while True:
            await self._check(current)
            async with self._http().stream("GET", current) as resp:
                location = resp.headers.get("location")
                if resp.status_code not in _REDIRECT_STATUSES or not location:
                    return await self._read(resp, tuple(redirects), progress)
            if len(redirects) >= self.config.max_redirects:
                raise FetchError(
                    "redirects",
                    f"stopped after {len(redirects)} redirects (max_redirects="
                    f"{self.config.max_redirects}); the next would have been {location}",
                )
            current = current.join(location)
            redirects.append(str(current))

    async def _check(self, url: httpx.URL) -> None:
        """Refuse a URL (first or redirect target) the config does not let through."""
        if url.scheme not in ("http", "https"):
            shown = f"{url.scheme}:" if url.scheme else "no scheme"
            raise FetchError(
                "scheme", f"refused {url}: only http:// and https:// URLs are fetched ({shown})"
            )
        host = url.host
        if not host:
            raise FetchError("bad_url", f"refused {url}: the URL has no host")
        if not self.config.host_allowed(host):
            raise FetchError("denied_host", f"refused {url}: host {host!r} is not allowed")
        if self.config.block_private:
            port = url.port or (443 if url.scheme == "https" else 80)
            try:
                infos = await asyncio.get_running_loop().getaddrinfo(
                    host, port, type=socket.SOCK_STREAM
                )
            except OSError as e:
                raise FetchError("network", f"cannot resolve {host!r}: {e}") from None
            for info in infos:
                ip = ipaddress.ip_address(str(info[4][0]).split("%", 1)[0])
                if not is_public_address(ip):
                    raise FetchError("private_address", f"refused {url}: {host!r} resolves to {ip}")

    async def _read(
        self, resp: httpx.Response, redirects: tuple[str, ...], progress: _Progress
    ) -> FetchedPage:
        media, charset = _content_type(resp.headers.get("content-type"))
        page = FetchedPage(
            url=str(resp.url),
            status=resp.status_code,
            reason=resp.reason_phrase,
            content_type=media,
            charset=charset,
            body=b"",
            truncated=False,
            bytes_downloaded=0,
            redirects=redirects,
        )
        if media not in self.config.content_types:
            if resp.status_code >= 400:
                return page  # the status is the observation; its body is not readable text
            raise FetchError(
                "content_type",
                f"refused {resp.url}: content type {media or '(none)'} is not shown "
                f"(allowed: {', '.join(self.config.content_types)})",
            )
        cap = self.config.max_bytes
        inflater = Inflater(resp.headers.get("content-encoding", ""))
        body = bytearray()
        truncated = False
        async for chunk in resp.aiter_raw():
            progress.bytes += len(chunk)
            body += inflater.feed(chunk, cap + 1 - len(body))
            if len(body) > cap or progress.bytes > cap:
                truncated = True
                break
        return replace(
            page, body=bytes(body[:cap]), truncated=truncated, bytes_downloaded=progress.bytes
        )


@dataclass
class _Progress:
    """How far a fetch got, for the message of a timeout."""

    bytes: int = 0
    """Body bytes read off the network so far."""


def _content_type(header: str | None) -> tuple[str, str | None]:
    """(media type, charset parameter) of a `Content-Type` header."""
    if not header:
        return "", None
    media, _, params = header.partition(";")
    charset = None
    for param in params.split(";"):
        key, _, value = param.partition("=")
        if key.strip().lower() == "charset":
            charset = value.strip().strip("'\"") or None
    return media.strip().lower(), charset


class Inflater:
    """Undoes a `Content-Encoding` (identity, gzip, deflate), never producing more than asked:
    the output of a compression bomb is bounded by the caller's limit, not by the input."""

    def __init__(self, encoding: str) -> None:
        enc = encoding.strip().lower()
        self._wbits: int | None
        if enc in ("", "identity"):
            self._wbits = None
        elif enc in ("gzip", "x-gzip"):
            self._wbits = 16 + zlib.MAX_WBITS
        elif enc == "deflate":
            self._wbits = zlib.MAX_WBITS
        else:
            raise FetchError("encoding", f"unsupported content encoding {encoding!r}")
        self._d = zlib.decompressobj(self._wbits or 0)
        self._seen = bytearray()  # input before the first output, for the raw-deflate retry
        self._produced = False
        self._done = False

    def feed(self, data: bytes, limit: int) -> bytes:
        """Up to `limit` bytes of output for the next `data`. Once `limit` is reached the rest
        is dropped: the caller stops reading there. Raises `FetchError` on a corrupt stream."""
        if self._wbits is None:
            return data[:limit]
        out = bytearray()
        pending = data
        if not self._produced:
            self._seen += data
        while pending and len(out) < limit and not self._done:
            try:
                out += self._d.decompress(pending, limit - len(out))
            except zlib.error as e:
                if self._wbits == zlib.MAX_WBITS and not self._produced:
                    # "deflate" is zlib-wrapped by the spec, raw in some servers (as httpx does).
                    self._wbits = -zlib.MAX_WBITS
                    self._d = zlib.decompressobj(self._wbits)
                    pending = bytes(self._seen)
                    continue
                if self._produced:
                    self._done = True  # trailing garbage after a complete stream: ignore it
                    break
                raise FetchError("encoding", f"corrupt compressed body: {e}") from None
            self._produced = self._produced or bool(out)
            pending = self._d.unconsumed_tail
            if self._d.eof:
                # gzip allows several members back to back (RFC 1952 section 2.2).
                pending = self._d.unused_data + pending
                if self._wbits < 0 or self._wbits == zlib.MAX_WBITS:
                    self._done = True
                else:
                    self._d = zlib.decompressobj(self._wbits)
        return bytes(out)


_WESTERN = frozenset({"iso8859-1", "iso8859-15", "cp1252", "ascii"})
_META_CHARSET = re.compile(rb"""<meta[^>]{0,200}?charset\s*=\s*["']?\s*([A-Za-z0-9_.:-]+)""", re.I)
_BOMS = (
    (codecs.BOM_UTF8, "utf-8-sig"),
    (codecs.BOM_UTF16_LE, "utf-16"),
    (codecs.BOM_UTF16_BE, "utf-16"),
)


def _codec(label: str | None) -> str | None:
    """Python's name for a text encoding label, or None when unknown (or not text: `zlib`)."""
    if not label:
        return None
    try:
        info = codecs.lookup(label)
    except LookupError:
        return None
    # bytes-to-bytes codecs (zlib, base64, rot13) carry this flag; str.decode refuses them too.
    return info.name if getattr(info, "_is_text_encoding", True) else None


def _strict(body: bytes, codec: str, truncated: bool) -> str | None:
    # A cut body may end inside a multi-byte character: an incremental decode drops that tail.
    try:
        return codecs.getincrementaldecoder(codec)("strict").decode(body, final=not truncated)
    except (ValueError, LookupError, TypeError):  # UnicodeError is a ValueError
        return None


def decode_body(body: bytes, media: str, charset: str | None, truncated: bool = False) -> str:
    """Text of `body`: a BOM, else the declared `charset`, else (HTML) a `<meta>` charset, else
    UTF-8, else `charset_normalizer`'s guess, else UTF-8 with replacement. A Western single-byte
    label on a body that is valid non-ASCII UTF-8 is taken as mislabelled UTF-8: valid
    multi-byte sequences almost never arise from Latin-1 text. Never raises."""
    for bom, codec in _BOMS:
        if body.startswith(bom):
            return body.decode(codec, errors="replace")
    declared = _codec(charset)
    if declared is None and media in HTML_TYPES:
        m = _META_CHARSET.search(body[:4096])
        declared = _codec(m.group(1).decode("ascii")) if m else None
    if declared is not None:
        if declared in _WESTERN and not body.isascii():
            utf8 = _strict(body, "utf-8", truncated)
            if utf8 is not None:
                return utf8
        text = _strict(body, declared, truncated)
        if text is not None:
            return text
    text = _strict(body, "utf-8", truncated)
    if text is not None:
        return text
    best = charset_normalizer.from_bytes(body).best()
    if best is not None and _codec(best.encoding) is not None:
        return body.decode(best.encoding, errors="replace")
    return body.decode("utf-8", errors="replace")


def page_text(page: FetchedPage) -> str:
    """Readable text of a page: HTML through trafilatura (main text and tables; the whole
    page's text when no main text is found), anything else as decoded."""
    text = decode_body(page.body, page.content_type, page.charset, page.truncated)
    if page.content_type not in HTML_TYPES:
        return text.strip()
    try:
        extracted = trafilatura.extract(
            text, url=page.url, include_tables=True, include_comments=False
        )
    except Exception:  # a parser failure on hostile markup falls back, never crashes
        extracted = None
    if extracted and extracted.strip():
        return str(extracted).strip()
    try:
        return str(trafilatura.html2txt(text)).strip()
    except Exception:
        return ""
