"""MCP servers as tools, against a real MCP server (`mcp_server_fixture.py`) run as a child
process over stdio and over streamable HTTP on loopback: listing, calls, errors, timeouts,
concurrency, a server killed mid-run, and clean open/close cycles."""

from __future__ import annotations

import asyncio
import contextlib
import gc
import json
import os
import select
import signal
import subprocess
import sys
import time
import warnings
from collections.abc import Awaitable, Callable, Iterator
from pathlib import Path
from typing import Any, TypeVar

import pytest
from fakes import CharTokenizer
from pydantic import TypeAdapter, ValidationError

from turnrl.agent.chat import ChatML
from turnrl.agent.policy import SamplingParams
from turnrl.agent.records import StopReason
from turnrl.agent.runner import Budget, EpisodeRunner, EpisodeSpec
from turnrl.agent.scripted import ScriptedPolicy
from turnrl.tools.base import ArgumentError, CostModel, ToolError
from turnrl.tools.mcp import (
    McpConnectError,
    McpHttpConfig,
    McpServerConfig,
    McpStdioConfig,
    McpToolkit,
    mcp_tools,
    render_result,
)

FIXTURE = Path(__file__).with_name("mcp_server_fixture.py")
TAG = f"turnrl-mcp-test-{os.getpid()}"
"""Marks every server process a toolkit starts, to find leftovers (the HTTP servers the tests
start themselves are not marked)."""
NAMES = ["add", "echo", "slow", "fail", "big", "picture", "structured", "counter", "pid"]
T = TypeVar("T")


def run(make: Callable[[], Awaitable[T]]) -> T:
    """Run `make()` in a fresh loop and check that it left nothing behind: no task still
    pending, no error the loop logged, no resource or coroutine warning, no server process."""
    problems: list[str] = []

    async def main() -> T:
        asyncio.get_running_loop().set_exception_handler(
            lambda loop, ctx: problems.append(str(ctx.get("message")))
        )
        value = await make()
        await asyncio.sleep(0)
        me = asyncio.current_task()
        problems.extend(f"task left: {t!r}" for t in asyncio.all_tasks() if t is not me)
        return value

    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        value = asyncio.run(main())
        gc.collect()
    problems += [
        f"{w.category.__name__}: {w.message}"
        for w in caught
        if issubclass(w.category, ResourceWarning | RuntimeWarning)
    ]
    assert problems == []
    assert settled(server_processes) == []
    return value


def server_processes() -> list[int]:
    """Pids of live (not zombie) processes started by these tests."""
    pids = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            cmdline = (entry / "cmdline").read_bytes()
            state = (entry / "stat").read_text().rsplit(")", 1)[1].split()[0]
        except OSError:
            continue
        if TAG.encode() in cmdline and state != "Z":
            pids.append(int(entry.name))
    return pids


def settled(probe: Callable[[], list[int]], for_s: float = 30.0) -> list[int]:
    """`probe()` once it is empty, or what it still shows after `for_s` (a killed process
    takes a moment to go; the bound is generous for a loaded machine)."""
    for _ in range(int(for_s / 0.05)):
        if not (left := probe()):
            return left
        time.sleep(0.05)
    return probe()


async def until(holds: Callable[[], bool], for_s: float = 60.0) -> bool:
    """Whether `holds()` is true by `for_s` (polled; the bound is for a loaded machine)."""
    for _ in range(int(for_s / 0.05)):
        if holds():
            return True
        await asyncio.sleep(0.05)
    return holds()


async def reaped(pid: int) -> bool:
    """Whether process `pid` is gone, zombie included (its parent waited for it), soon."""

    def gone() -> bool:
        try:
            os.kill(pid, 0)  # succeeds for a zombie too
        except ProcessLookupError:
            return True
        return False

    return await until(gone)


def stdio_config(**kw: Any) -> McpStdioConfig:
    args = (str(FIXTURE), "stdio", "--page-size", "4", "--tag", TAG)
    return McpStdioConfig(command=sys.executable, args=args, **kw)


@contextlib.contextmanager
def http_server(port: int = 0) -> Iterator[tuple[str, subprocess.Popen[str]]]:
    """The fixture server over streamable HTTP; yields its URL once it listens."""
    cmd = [sys.executable, str(FIXTURE), "http", "--port", str(port), "--page-size", "4"]
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, text=True)
    try:
        assert proc.stdout is not None
        ready, _, _ = select.select([proc.stdout], [], [], 60)
        line = proc.stdout.readline() if ready else ""
        assert line.startswith("PORT "), f"the fixture server did not start: {line!r}"
        yield f"http://127.0.0.1:{int(line.split()[1])}/mcp", proc
    finally:
        proc.kill()
        proc.wait()
        if proc.stdout is not None:
            proc.stdout.close()


@pytest.fixture(scope="module")
def http_url() -> Iterator[str]:
    """One HTTP server shared by the tests that do not kill it."""
    with http_server() as (url, _):
        yield url


@pytest.fixture(params=["stdio", "http"])
def config(request: pytest.FixtureRequest) -> Callable[..., McpStdioConfig | McpHttpConfig]:
    """A config maker for either transport (the HTTP server is started only when needed)."""
    if request.param == "stdio":
        return stdio_config
    url = request.getfixturevalue("http_url")
    return lambda **kw: McpHttpConfig(url=url, **kw)


def test_config_is_a_tagged_union_that_round_trips() -> None:
    adapter: TypeAdapter[McpStdioConfig | McpHttpConfig] = TypeAdapter(McpServerConfig)
    stdio = adapter.validate_python(
        {"transport": "stdio", "command": "srv", "args": ["-v"], "env": {"K": "v"}, "cwd": "/"}
    )
    http = adapter.validate_python(
        {
            "transport": "http",
            "url": "http://127.0.0.1:1/mcp",
            "headers": {"Authorization": "Bearer x"},
            "tool_costs": {"search": {"per_call": {"money_usd": 0.01}}},
            "include": ["search*"],
            "name_prefix": "web_",
        }
    )
    assert isinstance(stdio, McpStdioConfig) and stdio.args == ("-v",)
    assert isinstance(http, McpHttpConfig)
    assert http.tool_costs["search"].per_call == {"money_usd": 0.01}
    for cfg in (stdio, http):
        assert adapter.validate_python(cfg.model_dump()) == cfg
    with pytest.raises(ValidationError):
        adapter.validate_python({"transport": "http", "url": "u", "command": "x"})
    with pytest.raises(ValidationError):
        adapter.validate_python({"transport": "ws", "url": "u"})


def test_lists_every_page_of_tools_with_their_schemas(config: Callable[..., Any]) -> None:
    cost = CostModel(per_call={"calls": 1.0, "money_usd": 0.25})

    async def main() -> None:
        cfg = config(timeout_s=7.0, cost=cost, max_output_tokens=50, concurrency=3, rate_per_s=9)
        async with McpToolkit(cfg) as kit:
            tools = {t.spec.name: t.spec for t in kit.tools}
            assert list(tools) == NAMES  # the server lists 4 per page: 3 pages
            add = tools["add"]
            assert add.description == "Add two integers."
            assert add.parameters == {
                "type": "object",
                "properties": {"a": {"type": "integer"}, "b": {"type": "integer"}},
                "required": ["a", "b"],
            }
            assert add.json_schema()["parameters"] == add.parameters
            assert (add.timeout_s, add.cost, add.max_output_tokens) == (7.0, cost, 50)
            assert (add.concurrency, add.rate_per_s) == (3, 9.0)

    run(main)


def test_calls_round_trip_and_server_state_is_shared(config: Callable[..., Any]) -> None:
    async def main() -> None:
        async with McpToolkit(config()) as kit, McpToolkit(config()) as other:
            tools = {t.spec.name: t for t in kit.tools}
            assert (await tools["add"]({"a": 2, "b": 40})).text == "42"
            assert (await tools["echo"]({"text": "héllo\nworld"})).text == "héllo\nworld"
            first = int((await kit.call("counter", {})).text)
            assert int((await kit.call("counter", {})).text) == first + 1
            # Two toolkits on one HTTP server see one counter; two stdio toolkits, two servers.
            seen = int((await other.call("counter", {})).text)
            assert seen == (first + 2 if isinstance(kit.config, McpHttpConfig) else 1)

    run(main)


def test_bad_arguments_are_refused_by_the_schema_and_by_the_server(
    config: Callable[..., Any],
) -> None:
    async def main() -> None:
        async with McpToolkit(config()) as kit:
            add = next(t for t in kit.tools if t.spec.name == "add")
            with pytest.raises(ArgumentError, match=r"a: 'x' is not of type 'integer'"):
                add.spec.validate({"a": "x", "b": 1})
            with pytest.raises(ArgumentError, match="'b' is a required property"):
                add.spec.validate({"a": 1})
            # Past the runner's check (a direct call), the server refuses them itself.
            with pytest.raises(ToolError, match="valid integer"):
                await add({"a": "x", "b": 1})
            with pytest.raises(ToolError, match="Unknown tool"):
                await kit.call("no_such_tool", {})

    run(main)


def test_a_slow_call_times_out_and_the_connection_stays_usable(config: Callable[..., Any]) -> None:
    async def main() -> None:
        async with McpToolkit(config(timeout_s=0.5)) as kit:
            with pytest.raises(TimeoutError):
                await kit.call("slow", {"seconds": 30})
            # The calls that follow get a limit that a loaded machine cannot run past.
            kit.config = kit.config.model_copy(update={"timeout_s": 60.0})
            assert (await kit.call("add", {"a": 1, "b": 1})).text == "2"
            # A caller cancelled from outside (an episode's own deadline) is no different.
            task = asyncio.create_task(kit.call("slow", {"seconds": 30}))
            await asyncio.sleep(0.1)
            task.cancel()
            with pytest.raises(asyncio.CancelledError):
                await task
            assert (await kit.call("add", {"a": 1, "b": 2})).text == "3"

    run(main)


def test_a_raising_tool_is_a_tool_error_with_its_message(config: Callable[..., Any]) -> None:
    async def main() -> None:
        async with McpToolkit(config()) as kit:
            with pytest.raises(ToolError, match="failed on purpose"):
                await kit.call("fail", {})

    run(main)


def test_non_text_content_is_summarised_never_dumped(config: Callable[..., Any]) -> None:
    async def main() -> None:
        async with McpToolkit(config()) as kit:
            picture = (await kit.call("picture", {})).text
            assert picture == (
                "a picture:\n[image/png, 1032 bytes]\n"
                "[resource file:///data.bin: application/octet-stream, 4 bytes]"
            )
            structured = (await kit.call("structured", {})).text
            assert structured == '{"answer": 42, "unit": "m"}'
            big = await kit.call("big", {"chars": 300_000})
            assert len(big.text) == 300_000 and not big.truncated  # the runner cuts, not us

    run(main)


def test_render_result_of_each_block_kind() -> None:
    import mcp.types as mt

    def text(*blocks: Any, structured: Any = None, error: bool = False) -> str:
        return render_result(
            mt.CallToolResult(content=list(blocks), structured_content=structured, is_error=error)
        )

    doc = mt.EmbeddedResource(
        resource=mt.TextResourceContents(uri="file:///a.txt", mime_type="text/plain", text="A")
    )
    link = mt.ResourceLink(name="report", uri="file:///r.pdf")
    audio = mt.AudioContent(data="AAAA", mime_type="audio/wav")  # 4 base64 chars: 3 bytes
    assert text(mt.TextContent(text="x"), doc, link, audio) == (
        "x\nA\n[resource link report: file:///r.pdf]\n[audio/wav, 3 bytes]"
    )
    assert text(mt.TextContent(text="shown"), structured={"not": "shown"}) == "shown"
    assert text() == "(no output)"
    assert text(error=True) == "(the tool reported an error)"


def test_24_concurrent_calls_from_many_episodes(config: Callable[..., Any]) -> None:
    async def main() -> None:
        async with McpToolkit(config()) as kit:
            adds = [kit.call("add", {"a": i, "b": 1000}) for i in range(20)]
            slows = [kit.call("slow", {"seconds": 0.2}) for _ in range(4)]
            outs = await asyncio.gather(*adds, *slows)
            assert [o.text for o in outs[:20]] == [str(i + 1000) for i in range(20)]
            assert {o.text for o in outs[20:]} == {"slept 0.2 s"}

    run(main)


def test_include_exclude_prefix_and_tool_prices(config: Callable[..., Any]) -> None:
    priced = CostModel(per_call={"money_usd": 1.0})

    async def main() -> None:
        kit = McpToolkit(
            config(
                include=("add", "e*", "s*"),
                exclude=("slow",),
                name_prefix="fx_",
                tool_costs={"add": priced},
            )
        )
        async with kit:
            specs = {t.spec.name: t.spec for t in kit.tools}
            assert list(specs) == ["fx_add", "fx_echo", "fx_structured"]
            assert specs["fx_add"].cost == priced
            assert specs["fx_echo"].cost == CostModel()
            assert (await kit.tools[0]({"a": 1, "b": 2})).text == "3"  # sent as `add`
        with pytest.raises(McpConnectError, match=r"'nope\*', which matches none"):
            await McpToolkit(config(include=("add", "nope*"))).connect()
        with pytest.raises(McpConnectError, match="prices tools it does not have: ad"):
            await McpToolkit(config(tool_costs={"ad": priced})).connect()

    run(main)


def test_tools_of_one_name_on_two_servers_need_a_prefix() -> None:
    async def main() -> None:
        with pytest.raises(McpConnectError, match="give one of them a `name_prefix`"):
            async with mcp_tools([stdio_config(label="one"), stdio_config(label="two")]):
                pass
        both = [stdio_config(include=("add",)), stdio_config(include=("add",), name_prefix="b_")]
        async with mcp_tools(both) as tools:
            assert [t.spec.name for t in tools] == ["add", "b_add"]
            outs = await asyncio.gather(*(t({"a": 1, "b": 1}) for t in tools))
            assert [o.text for o in outs] == ["2", "2"]

    run(main)


def test_a_killed_stdio_server_fails_the_calls_then_reconnects_once() -> None:
    """The process is reaped (by the event loop's child watcher) a moment before its closed
    output reaches the toolkit; a call sent in between would fail as one in flight does, so
    each kill below waits until the toolkit has seen it (`connected`) before calling."""

    async def main() -> None:
        async with McpToolkit(stdio_config(label="fx")) as kit:
            pid = int((await kit.call("pid", {})).text)
            pending = asyncio.create_task(kit.call("slow", {"seconds": 30}))
            await asyncio.sleep(0.2)
            os.kill(pid, signal.SIGKILL)
            with pytest.raises(ToolError, match="MCP server 'fx': connection lost during the call"):
                await pending
            # The failed call saw the death: the next call starts a new server, whose state
            # (the counter) starts again.
            assert not kit.connected
            new_pid = int((await kit.call("pid", {})).text)
            assert new_pid != pid and kit.connected
            assert (await kit.call("counter", {})).text == "1"
            # Killed with no call in flight: the toolkit notices by itself (its output
            # closes), and the next call reconnects rather than failing.
            os.kill(new_pid, signal.SIGKILL)
            assert await until(lambda: not kit.connected)
            assert await reaped(new_pid)
            assert (await kit.call("add", {"a": 1, "b": 1})).text == "2"
            # Calls whose deadline is shorter than a server's start (the runner's timeout counts
            # the reconnect) still get one started: it goes on after they give up, and however
            # many gave up, one server runs.
            pid = int((await kit.call("pid", {})).text)
            os.kill(pid, signal.SIGKILL)
            assert await until(lambda: not kit.connected) and await reaped(pid)
            outs = []
            for _ in range(600):
                with contextlib.suppress(TimeoutError):
                    async with asyncio.timeout(0.1):
                        outs.append(await kit.call("add", {"a": 2, "b": 2}))
                        break
            assert [o.text for o in outs] == ["4"]
            assert server_processes() == [int((await kit.call("pid", {})).text)]

        async with McpToolkit(stdio_config(label="fx", reconnect=False)) as kit:
            pid = int((await kit.call("pid", {})).text)
            os.kill(pid, signal.SIGKILL)
            assert await until(lambda: not kit.connected) and await reaped(pid)
            for _ in range(2):
                with pytest.raises(ToolError, match="connection lost: the server closed"):
                    await kit.call("add", {"a": 1, "b": 1})

    run(main)


def test_a_killed_http_server_fails_the_calls_and_is_reconnected_when_back() -> None:
    async def main() -> None:
        with http_server() as (url, proc):
            kit = McpToolkit(McpHttpConfig(url=url, label="fx", reconnect_backoff_s=600.0))
            await kit.connect()
            try:
                pending = asyncio.create_task(kit.call("slow", {"seconds": 30}))
                await asyncio.sleep(0.3)
                proc.kill()
                proc.wait()
                with pytest.raises(ToolError, match="connection lost"):
                    await pending
                # Still down: one reconnect, which fails.
                with pytest.raises(ToolError, match=r"reconnecting failed: .*ConnectError"):
                    await kit.call("add", {"a": 1, "b": 1})
                port = int(url.split(":")[2].split("/")[0])
                with http_server(port):
                    # Back, but within the back-off no call tries again: the error stands.
                    with pytest.raises(ToolError, match=r"reconnecting failed: .*ConnectError"):
                        await kit.call("add", {"a": 1, "b": 1})
                    kit.config = kit.config.model_copy(update={"reconnect_backoff_s": 0.0})
                    assert (await kit.call("add", {"a": 1, "b": 1})).text == "2"
            finally:
                await kit.aclose()

    run(main)


def test_a_legacy_session_the_server_forgot_is_started_anew() -> None:
    """Servers of the initialize handshake keep an HTTP session; one that restarts no longer
    knows it. The call it refused fails, the next one starts a new session."""

    async def main() -> None:
        with http_server() as (url, proc):
            async with McpToolkit(McpHttpConfig(url=url, protocol="legacy")) as kit:
                assert (await kit.call("counter", {})).text == "1"
                proc.kill()
                proc.wait()
                with http_server(int(url.split(":")[2].split("/")[0])):
                    with pytest.raises(ToolError, match="no longer knows this session"):
                        await kit.call("counter", {})
                    assert (await kit.call("counter", {})).text == "1"
        async with McpToolkit(stdio_config(protocol="legacy")) as kit:
            assert (await kit.call("add", {"a": 1, "b": 2})).text == "3"

    run(main)


def test_servers_that_cannot_be_reached_are_clear_connect_errors() -> None:
    sleeper = f"import time  # {TAG}\ntime.sleep(60)"
    cases: list[tuple[McpStdioConfig | McpHttpConfig, str]] = [
        (McpStdioConfig(command="/nonexistent/mcp-server"), "FileNotFoundError"),
        (
            McpStdioConfig(command=sys.executable, args=("-c", "import sys; sys.exit(3)")),
            "closed the connection",
        ),
        (McpHttpConfig(url="http://127.0.0.1:9/mcp"), "ConnectError"),
        (
            McpStdioConfig(command=sys.executable, args=("-c", sleeper), connect_timeout_s=1.0),
            "no answer within 1 s",
        ),
    ]

    async def main() -> None:
        for cfg, why in cases:
            kit = McpToolkit(cfg)
            with pytest.raises(McpConnectError, match=why):
                await kit.connect()
            with pytest.raises(RuntimeError, match="connect"):
                kit.tools  # noqa: B018
            await kit.aclose()
        # A connect cancelled half way (the server has not answered yet) leaves nothing.
        slow_start = McpStdioConfig(command=sys.executable, args=("-c", sleeper))
        connecting = asyncio.create_task(McpToolkit(slow_start).connect())
        await asyncio.sleep(0.3)
        connecting.cancel()
        with pytest.raises(asyncio.CancelledError):
            await connecting

    run(main)


def test_open_and_close_from_different_tasks_leaves_nothing(config: Callable[..., Any]) -> None:
    async def main() -> None:
        for _ in range(2):
            kit = McpToolkit(config())
            await asyncio.create_task(kit.connect())
            calls = [asyncio.create_task(kit.call("add", {"a": i, "b": i})) for i in range(5)]
            assert [(await c).text for c in calls] == [str(2 * i) for i in range(5)]
            await asyncio.create_task(kit.aclose())
            await kit.aclose()  # idempotent
            with pytest.raises(ToolError, match="not connected"):
                await kit.call("add", {"a": 1, "b": 1})
        # Closed while a call is in flight: the call fails, the close completes.
        kit = McpToolkit(config())
        await kit.connect()
        pending = asyncio.create_task(kit.call("slow", {"seconds": 30}))
        await asyncio.sleep(0.2)
        await kit.aclose()
        with pytest.raises(ToolError):
            await pending

    run(main)


def test_episodes_call_the_server_through_the_runner(http_url: str) -> None:
    """End to end: a scripted policy calls MCP tools through the real runner, eight episodes
    at once over one connection; the runner validates arguments with the server's schema."""
    tok = CharTokenizer()

    def calls(*pairs: tuple[str, dict[str, Any]]) -> str:
        bodies = (json.dumps({"name": n, "arguments": a}) for n, a in pairs)
        return "".join(f"<tool_call>{b}</tool_call>" for b in bodies) + "<|im_end|>"

    replies = [
        calls(
            ("fx_add", {"a": 2, "b": 3}),
            ("fx_add", {"a": "x", "b": 3}),
            ("fx_fail", {}),
            ("fx_counter", {}),
        ),
        calls(("fx_big", {"chars": 5000}), ("fx_slow", {"seconds": 30})),
        "<answer>5</answer><|im_end|>",
    ]
    cost = CostModel(per_call={"calls": 1.0, "money_usd": 0.5})

    def script(ctx: Any) -> str:
        # The reply depends only on how many replies this episode has seen.
        return replies[tok.decode(ctx).count("<|im_start|>assistant") - 1]

    policy = ScriptedPolicy(script, tok)

    async def main() -> list[Any]:
        async with McpToolkit(
            McpHttpConfig(
                url=http_url, name_prefix="fx_", timeout_s=5.0, cost=cost, max_output_tokens=100
            )
        ) as kit:
            runner = EpisodeRunner(
                policy,
                ChatML(tok),
                kit.tools,
                Budget(
                    max_context_tokens=100_000,
                    max_new_tokens=1000,
                    max_turns=5,
                    max_tool_calls=10,
                ),
                SamplingParams(),
            )
            specs = [EpisodeSpec(f"e{i}", "g", "t", "Use the tools.", "2+3?") for i in range(8)]
            return await runner.run_many(specs, concurrency=8)

    episodes = run(main)
    system = tok.decode(policy.prompts[0])
    assert '"name": "fx_add"' in system and "Add two integers." in system
    counters = []
    for ep in episodes:
        assert ep.stop_reason == StopReason.ANSWERED and ep.answer == "5"
        add, bad, fail, counter = ep.turns[0].tool_results
        assert (add.text, add.error) == ("5", None)
        assert add.cost == {"calls": 1.0, "money_usd": 0.5}
        assert bad.error == "invalid_arguments" and "'x' is not of type 'integer'" in bad.text
        assert fail.error == "tool_error" and "failed on purpose" in fail.text
        counters.append(int(counter.text))
        big, slow = ep.turns[1].tool_results
        assert big.truncated and big.text.startswith("0123") and len(big.text) < 300
        assert slow.error == "timeout"
    # One server, shared: the eight episodes drew distinct, consecutive counter values.
    lo = min(counters)
    assert sorted(counters) == list(range(lo, lo + 8))
