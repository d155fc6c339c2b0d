"""The `fetch` tool against a real HTTP server on loopback, hostile routes included."""

from __future__ import annotations

import asyncio
import gzip
import ipaddress
import json
import socket
import tracemalloc
import zlib
from collections.abc import Iterator

import pytest
from fakes import CharTokenizer
from hostile_http import ARTICLE, FRENCH, HUGE_BYTES, HostileServer
from hypothesis import given, settings
from hypothesis import strategies as st
from pydantic import ValidationError

from turnrl.agent.chat import ChatML
from turnrl.agent.policy import SamplingParams
from turnrl.agent.records import ToolResult
from turnrl.agent.runner import Budget, EpisodeRunner, EpisodeSpec
from turnrl.agent.scripted import ScriptedPolicy
from turnrl.tools.base import Tool, ToolOutput
from turnrl.tools.web import (
    FetchArgs,
    FetchedPage,
    FetchError,
    Inflater,
    WebFetch,
    WebFetchConfig,
    decode_body,
    host_matches,
    is_public_address,
)

TOK = CharTokenizer()
GUARD_S = 60.0
"""Outer bound on any one call in these tests: a hang fails the test instead of the suite."""


@pytest.fixture(scope="module")
def server() -> Iterator[HostileServer]:
    s = HostileServer()
    yield s
    s.close()


def fetch(url: str, **config: object) -> ToolOutput:
    """One call of a fresh tool (closed afterwards) with `config`."""

    async def go() -> ToolOutput:
        async with WebFetch(TOK.encode, WebFetchConfig.model_validate(config)) as tool:
            async with asyncio.timeout(GUARD_S):
                return await tool(FetchArgs(url=url))

    return asyncio.run(go())


def fetch_page(url: str, **config: object) -> FetchedPage:
    async def go() -> FetchedPage:
        async with WebFetch(TOK.encode, WebFetchConfig.model_validate(config)) as tool:
            async with asyncio.timeout(GUARD_S):
                return await tool.fetch(url)

    return asyncio.run(go())


def refusal(url: str, **config: object) -> FetchError:
    with pytest.raises(FetchError) as info:
        fetch(url, **config)
    return info.value


# --- pages that are shown --------------------------------------------------------------------


def test_article_is_extracted_without_navigation_or_footer(server: HostileServer) -> None:
    out = fetch(server.url("/article"))
    head, _, body = out.text.partition("\n\n")
    assert head.splitlines() == [
        f"URL: {server.url('/article')}",
        "Status: 200 OK",
        "Content-Type: text/html",
    ]
    assert "forty-two ships passed" in body
    assert "1901" in body and "42" in body  # the table is kept
    assert "Log in" not in body and "Footer Corp" not in body
    assert not out.truncated
    assert out.extra_cost["bytes"] == len(ARTICLE.encode())
    assert out.extra_cost["tokens"] == len(TOK.encode(out.text))


def test_plain_text_and_json_are_shown_as_sent(server: HostileServer) -> None:
    assert fetch(server.url("/text")).text.endswith("\n\nplain words, nothing more")
    out = fetch(server.url("/json"))
    assert "Content-Type: application/json" in out.text
    assert json.loads(out.text.partition("\n\n")[2]) == {"answer": 42, "unit": "ships"}


def test_output_is_cut_to_the_token_budget(server: HostileServer) -> None:
    out = fetch(server.url("/article"), max_output_tokens=120)
    assert len(TOK.encode(out.text)) <= 120
    assert out.truncated and out.text.endswith("…[truncated]")
    assert out.text.startswith(f"URL: {server.url('/article')}\nStatus: 200 OK")


def test_http_errors_are_observations_with_their_status(server: HostileServer) -> None:
    out = fetch(server.url("/404"))
    assert "Status: 404 Not Found" in out.text and "Page not found" in out.text
    out = fetch(server.url("/500"))
    assert "Status: 500 Internal Server Error" in out.text and out.text.endswith("boom")
    # An error page of a type that is not shown still reports its status.
    out = fetch(server.url("/404-png"))
    assert "Status: 404 Not Found" in out.text
    assert "(a image/png body is not shown)" in out.text


def test_malformed_html_still_gives_its_text(server: HostileServer) -> None:
    out = fetch(server.url("/malformed"))
    assert "Hello world" in out.text and "unclosed paragraph" in out.text


# --- size and time bounds --------------------------------------------------------------------


def test_a_huge_page_is_read_only_up_to_max_bytes(server: HostileServer) -> None:
    cap = 256 * 1024
    page = fetch_page(server.url("/huge"), max_bytes=cap)
    assert page.truncated and len(page.body) == cap
    # The transport reads at most one 64 KiB chunk past the cap before the tool stops.
    assert page.bytes_downloaded <= cap + 64 * 1024
    # The server could write only what loopback socket buffers held after the client hung
    # up (tens of MiB at most with autotuning), not the 1 GiB the page is.
    (sent,) = server.sent("/huge")
    assert sent < cap + (64 << 20) < HUGE_BYTES

    out = fetch(server.url("/huge"), max_bytes=cap)
    assert out.truncated and f"Note: only the first {cap} bytes were read." in out.text


def test_a_slow_drip_is_stopped_at_the_deadline(server: HostileServer) -> None:
    e = refusal(server.url("/drip"), timeout_s=1.0)
    assert e.kind == "timeout" and "within 1 s" in str(e)
    assert server.sent("/drip")  # the client hung up, so the server's writes failed


def test_headers_that_never_come_are_a_timeout(server: HostileServer) -> None:
    e = refusal(server.url("/silent"), timeout_s=0.5)
    assert e.kind == "timeout"
    assert server.sent("/silent") == [0]


def test_a_gzip_bomb_is_capped_after_decompression(server: HostileServer) -> None:
    cap = 1 << 20
    tracemalloc.start()
    try:
        page = fetch_page(server.url("/bomb"), max_bytes=cap)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert page.truncated and page.body == b"A" * cap
    # Inflating one 64 KiB network chunk at once would allocate ~64 MiB.
    assert peak < 16 * cap


def test_gzip_and_raw_deflate_bodies_are_decoded(server: HostileServer) -> None:
    assert fetch(server.url("/gzip")).text.endswith(FRENCH)
    assert fetch(server.url("/deflate-raw")).text.endswith(FRENCH)
    e = refusal(server.url("/brotli"))
    assert e.kind == "encoding" and "'br'" in str(e)


def _compress(data: bytes, encoding: str) -> bytes:
    if encoding == "gzip":  # two members: RFC 1952 allows several back to back
        return gzip.compress(data[: len(data) // 2]) + gzip.compress(data[len(data) // 2 :])
    wbits = zlib.MAX_WBITS if encoding == "deflate" else -zlib.MAX_WBITS
    z = zlib.compressobj(6, zlib.DEFLATED, wbits)
    return z.compress(data) + z.flush()


@settings(max_examples=60, deadline=None)
@given(
    data=st.binary(max_size=3000).map(lambda b: b * 3),
    encoding=st.sampled_from(["identity", "gzip", "deflate", "raw-deflate"]),
    chunk=st.integers(1, 500),
    cap=st.integers(1, 12000),
)
def test_the_inflater_gives_exactly_the_first_cap_bytes(
    data: bytes, encoding: str, chunk: int, cap: int
) -> None:
    """Fed in arbitrary chunks with the reader's remaining budget (as `WebFetch` does), the
    output is the body's first `cap + 1` bytes at most (one past the cap marks truncation)."""
    wire = data if encoding == "identity" else _compress(data, encoding)
    inflater = Inflater("deflate" if encoding == "raw-deflate" else encoding)
    out = bytearray()
    for i in range(0, len(wire), chunk):
        out += inflater.feed(wire[i : i + chunk], cap + 1 - len(out))
        if len(out) > cap:
            break
    assert bytes(out) == data[: cap + 1]


# --- refusals --------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("path", "media"),
    [("/png", "image/png"), ("/octet", "application/octet-stream"), ("/untyped", "(none)")],
)
def test_binary_and_untyped_content_is_refused(
    server: HostileServer, path: str, media: str
) -> None:
    e = refusal(server.url(path))
    assert e.kind == "content_type" and f"content type {media} is not shown" in str(e)


def test_a_redirect_loop_stops_after_max_redirects(server: HostileServer) -> None:
    e = refusal(server.url("/loop"), max_redirects=4)
    assert e.kind == "redirects" and "stopped after 4 redirects" in str(e)


def test_redirects_are_followed_up_to_the_limit(server: HostileServer) -> None:
    page = fetch_page(server.url("/chain/3"), max_redirects=3)
    assert page.body == b"end of the chain"
    assert page.url == server.url("/chain/text")
    assert page.redirects == (
        server.url("/chain/2"),
        server.url("/chain/1"),
        server.url("/chain/text"),
    )
    assert refusal(server.url("/chain/3"), max_redirects=2).kind == "redirects"
    assert fetch(server.url("/text"), max_redirects=0).text.endswith("nothing more")


def test_a_redirect_to_a_host_outside_the_lists_is_refused(server: HostileServer) -> None:
    assert fetch(server.url("/to-localhost")).text.endswith("plain words, nothing more")
    e = refusal(server.url("/to-localhost"), deny_hosts=["localhost"])
    assert e.kind == "denied_host" and "'localhost'" in str(e)
    e = refusal(server.url("/to-localhost"), allow_hosts=["127.0.0.1"])
    assert e.kind == "denied_host"


def test_denied_hosts_are_refused_whatever_their_spelling(server: HostileServer) -> None:
    for host in ("localhost", "LOCALHOST", "localhost."):
        e = refusal(server.url("/text", host=host), deny_hosts=["localhost"])
        assert e.kind == "denied_host"


@pytest.mark.parametrize("path", ["/to-file", "/to-ftp"])
def test_a_redirect_to_another_scheme_is_refused(server: HostileServer, path: str) -> None:
    e = refusal(server.url(path))
    assert e.kind == "scheme" and "only http:// and https://" in str(e)


def test_urls_that_are_not_http_are_refused(server: HostileServer) -> None:
    assert refusal("file:///etc/passwd").kind == "scheme"
    assert refusal("example.org/page").kind == "scheme"
    assert refusal("http:///nohost").kind == "bad_url"
    e = refusal(server.url("/to-garbage"))
    assert e.kind == "protocol" and "location" in str(e).lower()


def test_block_private_refuses_loopback(server: HostileServer) -> None:
    assert fetch(server.url("/text"), block_private=False).text.endswith("nothing more")
    for host in ("127.0.0.1", "localhost"):
        e = refusal(server.url("/text", host=host), block_private=True)
        assert e.kind == "private_address" and "127.0.0.1" in str(e)


def test_an_unreachable_server_is_a_network_error() -> None:
    with socket.socket() as s:  # a port that was free a moment ago: nothing listens there
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    e = refusal(f"http://127.0.0.1:{port}/")
    assert e.kind == "network" and "ConnectError" in str(e)


# --- charsets --------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "path", ["/utf8-as-latin1", "/unknown-charset", "/zlib-charset", "/meta-charset"]
)
def test_wrong_or_missing_charsets_decode_correctly(server: HostileServer, path: str) -> None:
    assert fetch(server.url(path)).text.endswith(FRENCH)


def test_latin1_bytes_labelled_utf8_never_crash(server: HostileServer) -> None:
    # Detection picks some single-byte code page; the ASCII text survives whichever.
    text = fetch(server.url("/latin1-as-utf8")).text
    assert "Le caf" in text and "agr" in text and "fen" in text


def test_a_body_cut_inside_a_character_decodes_without_replacement() -> None:
    body = "déjà".encode()[:-1]  # the "à" is cut in half
    assert decode_body(body, "text/plain", "utf-8", truncated=True) == "déj"
    assert decode_body(b"\xef\xbb\xbfhi", "text/plain", "latin-1") == "hi"
    assert decode_body("€".encode("utf-16"), "text/plain", None) == "€"
    assert decode_body(b"\xff\xfe\xfd", "text/plain", "utf-8")  # something, never a crash


# --- host lists ------------------------------------------------------------------------------


def test_host_patterns() -> None:
    assert host_matches("example.org", "example.org")
    assert host_matches("Example.ORG.", "example.org")
    assert not host_matches("www.example.org", "example.org")
    assert host_matches("www.example.org", "*.example.org")
    assert host_matches("a.b.example.org", "*.example.org")
    assert not host_matches("example.org", "*.example.org")
    assert not host_matches("badexample.org", "*.example.org")
    assert not host_matches("example.org.evil.com", "example.org")


def test_deny_wins_and_an_empty_allow_list_allows_the_rest() -> None:
    open_ = WebFetchConfig(deny_hosts=["evil.com", "*.evil.com"])
    assert open_.host_allowed("example.org")
    assert not open_.host_allowed("evil.com") and not open_.host_allowed("x.evil.com")
    closed = WebFetchConfig(allow_hosts=["*.wikipedia.org"], deny_hosts=["secret.wikipedia.org"])
    assert closed.host_allowed("en.wikipedia.org")
    assert not closed.host_allowed("secret.wikipedia.org")
    assert not closed.host_allowed("example.org")


def test_bad_host_patterns_and_fields_are_config_errors() -> None:
    for bad in ("*", "ex*ample.org", "*.", "a/b", ""):
        with pytest.raises(ValidationError):
            WebFetchConfig(deny_hosts=[bad])
    with pytest.raises(ValidationError):
        WebFetchConfig.model_validate({"max_byte": 10})
    assert WebFetchConfig(allow_hosts=["Example.ORG."]).allow_hosts == ("example.org",)


@pytest.mark.parametrize(
    ("ip", "public"),
    [
        ("93.184.216.34", True),
        ("2606:4700::1111", True),
        ("127.0.0.1", False),
        ("10.1.2.3", False),
        ("192.168.0.1", False),
        ("172.16.5.4", False),
        ("169.254.169.254", False),
        ("100.64.0.1", False),
        ("0.0.0.0", False),
        ("224.0.0.1", False),
        ("::1", False),
        ("fe80::1", False),
        ("fd00::1", False),
        ("::ffff:127.0.0.1", False),
        ("::ffff:8.8.8.8", True),
    ],
)
def test_public_addresses(ip: str, public: bool) -> None:
    assert is_public_address(ipaddress.ip_address(ip)) is public


# --- the tool in the runner ------------------------------------------------------------------


def test_fetch_through_the_runner(server: HostileServer) -> None:
    def call(url: str) -> str:
        body = json.dumps({"name": "fetch", "arguments": {"url": url}})
        return f"<tool_call>{body}</tool_call><|im_end|>"

    replies = iter(
        [call(server.url("/article")), call(server.url("/png")), "<answer>42</answer><|im_end|>"]
    )

    async def go() -> tuple[str | None, list[ToolResult]]:
        async with WebFetch(TOK.encode, WebFetchConfig(max_output_tokens=2000)) as tool:
            assert isinstance(tool, Tool)
            runner = EpisodeRunner(
                ScriptedPolicy(lambda ctx: next(replies), TOK),
                ChatML(TOK),
                [tool],
                Budget(max_context_tokens=100_000, max_turns=5),
                SamplingParams(),
            )
            spec = EpisodeSpec("e", "g", "t", "Use fetch.", "How many ships?")
            episode = await runner.run_episode(spec)
        return episode.answer, [r for t in episode.turns for r in t.tool_results]

    answer, (article, png) = asyncio.run(go())
    assert answer == "42"
    assert article.error is None
    assert "forty-two ships passed" in article.text
    assert article.cost["bytes"] == len(ARTICLE.encode()) and article.cost["calls"] == 1.0
    assert png.error == "tool_error"
    assert "FetchError" not in png.text and "content type image/png" in png.text


def test_the_client_is_closed_idempotently_and_reopened(server: HostileServer) -> None:
    tool = WebFetch(TOK.encode)

    async def go() -> None:
        await tool.aclose()
        assert (await tool.fetch(server.url("/text"))).body == b"plain words, nothing more"
        await tool.aclose()
        await tool.aclose()
        assert (await tool.fetch(server.url("/json"))).status == 200
        # left open on purpose: the next event loop must not reuse this loop's client

    asyncio.run(go())
    asyncio.run(go())
    asyncio.run(tool.aclose())
