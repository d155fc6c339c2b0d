"""A fake OpenAI-compatible chat-completions server on 127.0.0.1, for `OpenAIPolicy` tests.

It speaks `POST <prefix>/chat/completions` with native function calling: it checks the request
as the real API would (a bearer key when one is required, `tools` as function entries, every
`tool` message answering a `tool_calls` id of the assistant message before it) and answers
from a script: `script(messages)` gives the reply (content and native calls). `oracle_script`
plays scripted turns written in turnrl's syntax (an oracle's gold solutions) as native replies,
one per assistant turn after the question.

Usage is a fixed function of the request and the reply (`usage_of`), and every answered reply
is logged with its question and usage, so a test can price each episode by hand.

Faults are injected per question (`inject(question, *faults)`): the requests of the episode
asking that question take them in order, one per request (a resend takes the next one), then
are answered normally: `status` (with an optional `retry-after`), `malformed_json`,
`missing_usage`, `drop` (the connection closes before any response), `drop_mid` (half a
response, then the close), `hold` (no answer for `delay_s`: the client's timeout), and
`echo_auth` (a 401 whose body quotes the key it was sent, as a careless proxy would).

`fake_vllm.ServerThread` runs it on an event loop of its own in a daemon thread, for code that
runs its own loop (`turnrl eval`).
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import ssl
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any, Literal

from turnrl.agent.parse import parse_completion

FaultKind = Literal[
    "status", "malformed_json", "missing_usage", "drop", "drop_mid", "hold", "echo_auth"
]


@dataclass(frozen=True)
class Fault:
    """What to do to one request."""

    kind: FaultKind
    status: int = 500
    """`status`: the error status sent."""
    retry_after: str | None = None
    """`status`: the `retry-after` header sent with it."""
    delay_s: float = 30.0
    """`hold`: how long the request goes unanswered."""


@dataclass(frozen=True)
class Reply:
    """What the model says: content and native calls `(name, arguments JSON text)`."""

    content: str | None
    calls: tuple[tuple[str, str], ...] = ()
    finish_reason: str = "stop"


Script = Callable[[list[dict[str, Any]]], Reply]


@dataclass
class Answered:
    """One reply sent."""

    question: str
    usage: dict[str, Any]
    reply: Reply
    messages: list[dict[str, Any]] = field(default_factory=list)


def question_of(messages: Sequence[dict[str, Any]]) -> str:
    """The episode's question: its last user message (tool results come as `tool` messages,
    and the few-shot examples come before the question)."""
    users = [m["content"] for m in messages if m["role"] == "user"]
    return str(users[-1]) if users else ""


def turn_of(messages: Sequence[dict[str, Any]]) -> int:
    """Assistant messages after the last user message: the index of the reply asked for."""
    last_user = max(i for i, m in enumerate(messages) if m["role"] == "user")
    return sum(m["role"] == "assistant" for m in messages[last_user:])


def oracle_script(turns_by_question: dict[str, list[str]]) -> Script:
    """Replies that play, for each question, its scripted turns (turnrl syntax) natively."""

    def script(messages: list[dict[str, Any]]) -> Reply:
        turns = turns_by_question.get(question_of(messages))
        if turns is None:
            return Reply("I do not know this one.")
        k = turn_of(messages)
        if k >= len(turns):
            return Reply("<answer>none</answer>")
        parsed = parse_completion(turns[k], k)
        if parsed.answer is not None:
            return Reply(f"<answer>{parsed.answer}</answer>")
        calls = tuple(
            (str(c.name), json.dumps(c.arguments or {}, ensure_ascii=False))
            for c in parsed.tool_calls
        )
        return Reply(None, calls, finish_reason="tool_calls")

    return script


def usage_of(body: bytes, messages: Sequence[dict[str, Any]], reply: Reply) -> dict[str, Any]:
    """The usage the server reports: prompt tokens a quarter of the request's bytes, half of
    them cached once the conversation has a tool result, completion tokens a quarter of the
    reply's characters plus 3 per call."""
    prompt = len(body) // 4
    cached = prompt // 2 if any(m["role"] == "tool" for m in messages) else 0
    text = (reply.content or "") + "".join(a for _, a in reply.calls)
    return {
        "prompt_tokens": prompt,
        "completion_tokens": len(text) // 4 + 3 * len(reply.calls) + 1,
        "total_tokens": prompt + len(text) // 4 + 3 * len(reply.calls) + 1,
        "prompt_tokens_details": {"cached_tokens": cached},
    }


class FakeOpenAI:
    """The server (module docstring)."""

    def __init__(
        self,
        script: Script,
        *,
        api_key: str | None = None,
        model: str = "fake-gpt",
        prefix: str = "/v1",
        tls: ssl.SSLContext | None = None,
    ) -> None:
        self.script = script
        self.tls = tls
        self.api_key = api_key
        self.model = model
        self.prefix = prefix
        self.port = 0
        self.requests: list[dict[str, Any]] = []
        """Every request payload received, in arrival order."""
        self.answered: list[Answered] = []
        """Every reply sent, in order."""
        self.protocol_errors: list[str] = []
        """What was wrong with requests (a 400 was sent for each)."""
        self._faults: dict[str, list[Fault]] = {}
        self._server: asyncio.Server | None = None
        self._tasks: set[asyncio.Task[None]] = set()

    @property
    def base_url(self) -> str:
        scheme = "https" if self.tls is not None else "http"
        return f"{scheme}://127.0.0.1:{self.port}{self.prefix}"

    def inject(self, question: str, *faults: Fault) -> None:
        """The next requests of the episode asking `question` take `faults`, one each."""
        self._faults.setdefault(question, []).extend(faults)

    async def start(self) -> FakeOpenAI:
        self._server = await asyncio.start_server(self._serve, "127.0.0.1", self.port, ssl=self.tls)
        self.port = self._server.sockets[0].getsockname()[1]
        return self

    async def close(self) -> None:
        if self._server is not None:
            self._server.close()
        for task in list(self._tasks):
            task.cancel()
        for task in list(self._tasks):
            with contextlib.suppress(BaseException):
                await task
        if self._server is not None:
            await self._server.wait_closed()
            self._server = None

    async def __aenter__(self) -> FakeOpenAI:
        return await self.start()

    async def __aexit__(self, *exc: object) -> None:
        await self.close()

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        task = asyncio.current_task()
        assert task is not None
        self._tasks.add(task)
        try:
            while True:
                try:
                    head = await reader.readuntil(b"\r\n\r\n")
                except (asyncio.IncompleteReadError, ConnectionError):
                    return
                lines = head.decode("latin-1").split("\r\n")
                method, path, _ = lines[0].split(" ", 2)
                headers = {}
                for line in lines[1:]:
                    name, _, value = line.partition(":")
                    headers[name.strip().lower()] = value.strip()
                length = int(headers.get("content-length", "0"))
                body = await reader.readexactly(length) if length else b""
                if not await self._route(method, path, headers, body, writer):
                    return
        except (ConnectionError, asyncio.IncompleteReadError):
            return
        finally:
            self._tasks.discard(task)
            writer.close()

    async def _route(
        self,
        method: str,
        path: str,
        headers: dict[str, str],
        body: bytes,
        writer: asyncio.StreamWriter,
    ) -> bool:
        """Answer one request; False closes the connection."""
        if method != "POST" or path != f"{self.prefix}/chat/completions":
            _send(writer, 404, {"error": {"message": f"no route {method} {path}"}})
            return True
        auth = headers.get("authorization")
        payload = json.loads(body)
        self.requests.append(payload)
        messages = payload["messages"]
        faults = self._faults.get(question_of(messages))
        fault = faults.pop(0) if faults else None
        if fault is not None and fault.kind == "echo_auth":
            _send(writer, 401, {"error": {"message": f"Incorrect API key provided: {auth}"}})
            return True
        if self.api_key is not None and auth != f"Bearer {self.api_key}":
            _send(writer, 401, {"error": {"message": "missing or wrong API key"}})
            return True
        problem = self._check(payload)
        if problem is not None:
            self.protocol_errors.append(problem)
            _send(writer, 400, {"error": {"message": problem}})
            return True
        if fault is not None:
            if fault.kind == "status":
                extra = {} if fault.retry_after is None else {"retry-after": fault.retry_after}
                _send(writer, fault.status, {"error": {"message": "injected"}}, extra)
                return True
            if fault.kind == "drop":
                return False
            if fault.kind == "hold":
                await asyncio.sleep(fault.delay_s)
                return False
        reply = self.script(messages)
        usage = usage_of(body, messages, reply)
        out: dict[str, Any] = {
            "id": f"chatcmpl-{len(self.answered)}",
            "object": "chat.completion",
            "model": self.model,
            "choices": [
                {
                    "index": 0,
                    "message": _message(reply),
                    "finish_reason": reply.finish_reason,
                    "logprobs": None,
                }
            ],
            "usage": usage,
            "system_fingerprint": "fp_fake",
        }
        if fault is not None and fault.kind == "missing_usage":
            del out["usage"]
        data = json.dumps(out).encode()
        if fault is not None and fault.kind == "malformed_json":
            data = data[: len(data) // 2]
        if fault is not None and fault.kind == "drop_mid":
            writer.write(_head(200, len(data)) + data[: len(data) // 2])
            await writer.drain()
            return False
        if fault is None or fault.kind not in ("missing_usage", "malformed_json"):
            self.answered.append(Answered(question_of(messages), usage, reply, messages))
        writer.write(_head(200, len(data)) + data)
        await writer.drain()
        return True

    def _check(self, payload: dict[str, Any]) -> str | None:
        """What the real API would refuse in `payload` (None: nothing)."""
        if payload.get("model") != self.model:
            return f"unknown model {payload.get('model')!r}"
        for tool in payload.get("tools", []):
            if tool.get("type") != "function" or "name" not in tool.get("function", {}):
                return f"bad tool entry {tool!r}"
        open_ids: set[str] = set()
        for m in payload["messages"]:
            if m["role"] == "assistant":
                open_ids = {c["id"] for c in m.get("tool_calls") or []}
                if m.get("content") is None and not open_ids:
                    return "an assistant message with neither content nor tool_calls"
            elif m["role"] == "tool":
                if m.get("tool_call_id") not in open_ids:
                    return f"tool message answers unknown id {m.get('tool_call_id')!r}"
            elif m["role"] in ("user", "system"):
                open_ids = set()
                if not isinstance(m.get("content"), str):
                    return f"{m['role']} message without text content"
            else:
                return f"unknown role {m['role']!r}"
        return None


def _message(reply: Reply) -> dict[str, Any]:
    message: dict[str, Any] = {"role": "assistant", "content": reply.content, "refusal": None}
    if reply.calls:
        message["tool_calls"] = [
            {"id": f"call_fake_{i}", "type": "function", "function": {"name": n, "arguments": a}}
            for i, (n, a) in enumerate(reply.calls)
        ]
    return message


def _head(status: int, length: int, extra: dict[str, str] | None = None) -> bytes:
    lines = [f"HTTP/1.1 {status} X", "Content-Type: application/json", f"Content-Length: {length}"]
    lines += [f"{k}: {v}" for k, v in (extra or {}).items()]
    return ("\r\n".join(lines) + "\r\n\r\n").encode()


def _send(
    writer: asyncio.StreamWriter,
    status: int,
    payload: Any,
    extra: dict[str, str] | None = None,
) -> None:
    data = json.dumps(payload).encode()
    writer.write(_head(status, len(data), extra) + data)
