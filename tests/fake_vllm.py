"""A fake vLLM OpenAI-compatible server on 127.0.0.1, for `VLLMPolicy` tests and benchmarks.

It speaks the subset `turnrl.agent.vllm_policy` uses: `POST /v1/completions` with token-id
prompts (answering with `token_ids`, `prompt_token_ids` and per-token logprobs named
`token_id:<id>`), the full-reload calls (`/pause`, `/collective_rpc` `reload_weights`,
`/reset_prefix_cache`, `/resume`), runtime LoRA (`/v1/load_lora_adapter`,
`/v1/unload_lora_adapter`), `GET /health` and `GET /v1/models`.

Sampling is a deterministic rule of the prompt ids and the weights in place (the base label,
the last `weights_path` reloaded, or the folder of the adapter a request names), so a test can
tell which weights sampled a reply. Logprobs are a fixed function of (id, position), exact in
binary. Faults are injected per completion request (`inject`: the next one, the one with a
given seed, or the n-th to arrive): delays, error statuses (with a `retry-after` header when
asked), malformed or truncated bodies, dropped connections, a body that stalls after its
headers, and replies whose ids, logprobs or echo are wrong. The other routes (the weight-sync
calls) take faults per path (`inject_path`: fail, hang, drop). Every request is counted and
logged in arrival order; the completions that met a fault are listed (`faulted`).

Run as a script (`python tests/fake_vllm.py`) it serves on a free port in its own process and
prints `port <n>` (the benchmark's zero-latency server). It also answers the command line
turnrl gives a vLLM interpreter (`--port`, `--served-model-name`; other options ignored), and
`--path-fault PATH=KIND[:STATUS][@N]` injects a fault into the N-th request to PATH (0-based;
default the first): a stand-in for a server turnrl starts itself. `--replies` plays scripted
turns instead of the default rule (`turn_rule`).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import itertools
import json
import math
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any, Generic, Literal, Protocol, TypeVar, cast

VOCAB = 1000
"""Vocabulary size of the default rule."""
EOS = 0
"""The default rule's end-of-sequence id."""

Rule = Callable[[list[int], str], list[int]]
"""(prompt ids, weights label) -> the ids the model emits, before stop ids and max_tokens."""

FaultKind = Literal[
    "delay",
    "hold",
    "status",
    "malformed_json",
    "truncated",
    "drop",
    "drop_mid",
    "stall_mid",
    "short_logprobs",
    "nan_logprob",
    "positive_logprob",
    "null_logprob",
    "bad_id",
    "bad_tokens",
    "wrong_prompt",
    "abort",
    "two_choices",
    "chunked",
    "close_after",
]


@dataclass(frozen=True)
class Fault:
    """What to do to one completion request."""

    kind: FaultKind
    delay_s: float = 0.0
    """`delay`: wait this long before answering. (`hold` waits for `FakeVLLM.release` before
    sending anything; `stall_mid` sends the headers and half the body, then waits for it.)"""
    status: int = 500
    """`status`: the error status sent."""
    retry_after: str | None = None
    """`status`: the `retry-after` header sent with it (None: no header)."""


def default_rule(prompt: list[int], weights: str) -> list[int]:
    """1-8 ids from a hash of the prompt and the weights label, ending with `EOS`."""
    h = (sum(prompt) * 31 + len(prompt) * 7 + sum(weights.encode()) * 101) % 1_000_003
    n = 1 + h % 8
    return [1 + (h + 37 * k) % (VOCAB - 1) for k in range(n - 1)] + [EOS]


def turn_rule(replies: list[list[int]], end_id: int) -> Rule:
    """Reply `k` at an episode's turn `k` (the last one from there on), for ChatML contexts
    that open with a system and a user message: turn k's prompt holds 2 + 2k `end_id`s (each
    turn adds the reply's and its observation's)."""

    def rule(prompt: list[int], weights: str) -> list[int]:
        k = max(0, prompt.count(end_id) - 2) // 2
        return replies[min(k, len(replies) - 1)]

    return rule


def logprob_of(token: int, position: int) -> float:
    """The logprob the server reports for `token` at `position` of the completion."""
    return -((token * 7 + position) % 16 + 1) / 8


class FakeVLLM:
    """The server (module docstring). `async with FakeVLLM() as server: server.url ...`"""

    def __init__(
        self, rule: Rule = default_rule, *, model: str = "fake-model", port: int = 0
    ) -> None:
        self.rule = rule
        self.model = model
        self.port = port
        self.weights = "base"
        """Label of the full weights in place (a reload sets it to its `weights_path`)."""
        self.adapters: dict[str, str] = {}
        """Loaded LoRA adapters: name -> folder (the label of their weights)."""
        self.completions: list[dict[str, Any]] = []
        """The payload of every completion request received, in arrival order."""
        self.replies: list[tuple[list[int], list[float]]] = []
        """(ids, logprobs) of every completion answered, in answer order."""
        self.release = asyncio.Event()
        """Lets the completions held by `hold` faults answer."""
        self.log: list[str] = []
        """`<METHOD> <path>` per request received, `done <seed>` per completion answered."""
        self.connections = 0
        """Connections accepted so far."""
        self.served_while_paused = 0
        """Completion requests that arrived while paused (they wait for `/resume`)."""
        self.fail_next: dict[str, int] = {}
        """Path -> status: the next request to that path fails with it (then it is cleared)."""
        self.faulted: list[tuple[int, Fault, dict[str, Any]]] = []
        """(arrival index, fault, payload) of each completion request a fault was applied to."""
        self.path_counts: dict[str, int] = {}
        """Requests received per path."""
        self.arrived_at: dict[str, float] = {}
        """`time.monotonic()` when the last request to each path arrived."""
        self._faults: list[Fault] = []
        self._seed_faults: dict[int, Fault] = {}
        self._nth_faults: dict[int, Fault] = {}
        self._path_faults: dict[tuple[str, int], Fault] = {}
        self._arrived = asyncio.Condition()
        self._resumed = asyncio.Event()
        self._resumed.set()
        self._server: asyncio.Server | None = None
        self._tasks: set[asyncio.Task[None]] = set()

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    @property
    def paused(self) -> bool:
        return not self._resumed.is_set()

    def inject(self, fault: Fault, seed: int | None = None, *, nth: int | None = None) -> None:
        """Apply `fault` to the next completion request, to the one with this `seed`, or to
        the `nth` (0-based) in arrival order."""
        if nth is not None:
            self._nth_faults[nth] = fault
        elif seed is None:
            self._faults.append(fault)
        else:
            self._seed_faults[seed] = fault

    def inject_path(self, path: str, fault: Fault, nth: int | None = None) -> None:
        """Apply `fault` to the `nth` (0-based, counted from the start) request to `path`, a
        route other than completions; None: the next one. Kinds: `status` answers with its
        status, `hold` never answers (until `release`), `delay` answers late, `drop` closes
        the connection unanswered."""
        if fault.kind not in ("status", "hold", "delay", "drop"):
            raise ValueError(f"fault {fault.kind!r} applies to completions only")
        index = self.path_counts.get(path, 0) if nth is None else nth
        self._path_faults[(path, index)] = fault

    async def received(self, n: int) -> None:
        """Wait until `n` completion requests have arrived."""
        async with self._arrived:
            await self._arrived.wait_for(lambda: len(self.completions) >= n)

    async def start(self) -> FakeVLLM:
        self._server = await asyncio.start_server(self._serve, "127.0.0.1", self.port)
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

    async def __aenter__(self) -> FakeVLLM:
        return await self.start()

    async def __aexit__(self, *exc: object) -> None:
        await self.close()

    # -- connection handling --------------------------------------------------------------

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        task = asyncio.current_task()
        assert task is not None
        self._tasks.add(task)
        self.connections += 1
        try:
            while True:
                try:
                    head = await reader.readuntil(b"\r\n\r\n")
                except (asyncio.IncompleteReadError, ConnectionError):
                    return
                lines = head.decode("latin-1").split("\r\n")
                method, path, _ = lines[0].split(" ", 2)
                length = 0
                for line in lines[1:]:
                    name, _, value = line.partition(":")
                    if name.strip().lower() == "content-length":
                        length = int(value)
                body = await reader.readexactly(length) if length else b""
                self.log.append(f"{method} {path}")
                self.arrived_at[path] = time.monotonic()
                if not await self._route(method, path, body, writer):
                    return
        except (ConnectionError, asyncio.IncompleteReadError):
            return
        except asyncio.CancelledError:
            # Only `close` cancels a connection (one held by a fault); ending quietly keeps
            # asyncio's server callback from logging the cancellation as an error.
            return
        finally:
            self._tasks.discard(task)
            writer.close()

    async def _route(
        self, method: str, path: str, body: bytes, writer: asyncio.StreamWriter
    ) -> bool:
        """Answer one request; False closes the connection."""
        if path != "/v1/completions":
            index = self.path_counts.get(path, 0)
            self.path_counts[path] = index + 1
            fault = self._path_faults.pop((path, index), None)
            if fault is not None:
                if fault.kind == "drop":
                    return False
                if fault.kind == "hold":
                    await self.release.wait()
                elif fault.kind == "delay":
                    await asyncio.sleep(fault.delay_s)
                else:
                    _send_status(writer, fault)
                    return True
        status = self.fail_next.pop(path, None)
        if status is not None:
            _send(writer, status, {"error": {"message": "injected", "code": status}})
            return True
        payload: Any = json.loads(body) if body else {}
        if method == "GET" and path == "/health":
            _send(writer, 200, None)
        elif method == "GET" and path == "/v1/models":
            _send(writer, 200, {"object": "list", "data": [{"id": self.model}]})
        elif method == "POST" and path == "/v1/completions":
            return await self._complete(payload, writer)
        elif method == "POST" and path == "/pause":
            self._resumed.clear()
            _send(writer, 200, {"status": "paused"})
        elif method == "POST" and path == "/resume":
            self._resumed.set()
            _send(writer, 200, {"status": "resumed"})
        elif method == "POST" and path == "/reset_prefix_cache":
            _send(writer, 200, None)
        elif method == "POST" and path == "/collective_rpc":
            if payload.get("method") != "reload_weights":
                _send(writer, 400, {"error": {"message": "unknown method"}})
            else:
                self.weights = payload["kwargs"]["weights_path"]
                _send(writer, 200, {"results": [None]})
        elif method == "POST" and path == "/v1/load_lora_adapter":
            self.adapters[payload["lora_name"]] = payload["lora_path"]
            _send(writer, 200, None, text=f"Success: LoRA adapter {payload['lora_name']}")
        elif method == "POST" and path == "/v1/unload_lora_adapter":
            if self.adapters.pop(payload["lora_name"], None) is None:
                _send(writer, 404, {"error": {"message": "no such adapter"}})
            else:
                _send(writer, 200, None, text="Success")
        else:
            _send(writer, 404, {"error": {"message": f"no route {method} {path}"}})
        return True

    async def _complete(self, payload: dict[str, Any], writer: asyncio.StreamWriter) -> bool:
        index = len(self.completions)
        self.completions.append(payload)
        async with self._arrived:
            self._arrived.notify_all()
        seed = payload.get("seed")
        fault = self._nth_faults.pop(index, None)
        if fault is None and isinstance(seed, int):
            fault = self._seed_faults.pop(seed, None)
        if fault is None and self._faults:
            fault = self._faults.pop(0)
        if fault is not None:
            self.faulted.append((index, fault, payload))
        if self.paused:
            self.served_while_paused += 1
            await self._resumed.wait()
        kind = fault.kind if fault is not None else None
        if fault is not None and kind == "delay":
            await asyncio.sleep(fault.delay_s)
        if kind == "hold":
            await self.release.wait()
        if fault is not None and kind == "status":
            _send_status(writer, fault)
            return True
        if kind == "drop":
            return False
        if kind == "drop_mid":
            writer.write(b"HTTP/1.1 200 OK\r\nContent-Type: appl")
            await writer.drain()
            return False
        model = payload.get("model")
        if model == self.model:
            weights = self.weights
        elif model in self.adapters:
            weights = self.adapters[model]
        else:
            _send(writer, 404, {"error": {"message": f"model {model!r} does not exist"}})
            return True
        response = self._sample(payload, weights)
        choice = response["choices"][0]
        lp = choice["logprobs"]
        self.replies.append((list(choice["token_ids"]), list(lp["token_logprobs"])))
        if kind == "short_logprobs":
            lp["token_logprobs"].pop()
        elif kind == "nan_logprob":
            lp["token_logprobs"][0] = math.nan
        elif kind == "positive_logprob":
            lp["token_logprobs"][0] = 0.5
        elif kind == "null_logprob":
            lp["token_logprobs"][0] = None
        elif kind == "bad_id":
            choice["token_ids"][0] = VOCAB + 5
        elif kind == "bad_tokens":
            lp["tokens"][0] = f"token_id:{choice['token_ids'][0] + 1}"
        elif kind == "wrong_prompt":
            choice["prompt_token_ids"] = choice["prompt_token_ids"][1:]
        elif kind == "abort":
            choice["finish_reason"] = "abort"
        elif kind == "two_choices":
            response["choices"].append(dict(choice, index=1))
        data = json.dumps(response).encode()
        if kind == "malformed_json":
            data = data[: len(data) // 2]
            _write(writer, 200, data)
        elif kind == "truncated":
            head = f"HTTP/1.1 200 OK\r\nContent-Length: {len(data)}\r\n\r\n".encode()
            writer.write(head + data[: len(data) // 2])
            await writer.drain()
            return False
        elif kind == "stall_mid":
            # Headers and half the body out, then nothing: a server wedged mid-stream.
            head = f"HTTP/1.1 200 OK\r\nContent-Length: {len(data)}\r\n\r\n".encode()
            writer.write(head + data[: len(data) // 2])
            await writer.drain()
            await self.release.wait()
            writer.write(data[len(data) // 2 :])
        elif kind == "chunked":
            chunks = [data[i : i + 37] for i in range(0, len(data), 37)]
            framed = b"".join(b"%x;ext=1\r\n%s\r\n" % (len(c), c) for c in chunks)
            head = b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n"
            writer.write(head + framed + b"0\r\nX-Trailer: 1\r\n\r\n")
        else:
            _write(writer, 200, data)
        self.log.append(f"done {seed}")
        if kind == "close_after":
            await writer.drain()
            return False  # an idle keep-alive connection closed by the server
        return True

    def _sample(self, payload: dict[str, Any], weights: str) -> dict[str, Any]:
        prompt: list[int] = payload["prompt"]
        stops = set(payload.get("stop_token_ids") or ())
        max_tokens: int = payload["max_tokens"]
        emitted = self.rule(prompt, weights)
        ids: list[int] = []
        finish = "stop"
        for token in emitted:
            if len(ids) == max_tokens:
                finish = "length"
                break
            ids.append(token)
            if token in stops:
                break
        logprobs = [logprob_of(t, i) for i, t in enumerate(ids)]
        tokens = [f"token_id:{t}" for t in ids]
        return {
            "id": f"cmpl-{len(self.completions)}",
            "object": "text_completion",
            "created": 0,
            "model": payload["model"],
            "choices": [
                {
                    "index": 0,
                    "text": "",
                    "logprobs": {
                        "text_offset": list(range(len(ids))),
                        "token_logprobs": logprobs,
                        "tokens": tokens,
                        "top_logprobs": [{t: x} for t, x in zip(tokens, logprobs, strict=True)],
                    },
                    "finish_reason": finish,
                    "stop_reason": None,
                    "token_ids": ids,
                    "prompt_token_ids": prompt,
                }
            ],
            "usage": {
                "prompt_tokens": len(prompt),
                "completion_tokens": len(ids),
                "total_tokens": len(prompt) + len(ids),
            },
        }


def _send(writer: asyncio.StreamWriter, status: int, obj: Any, text: str | None = None) -> None:
    if text is not None:
        _write(writer, status, text.encode(), "text/plain")
    else:
        _write(writer, status, b"" if obj is None else json.dumps(obj).encode())


def _send_status(writer: asyncio.StreamWriter, fault: Fault) -> None:
    body = json.dumps({"error": {"message": "injected", "code": fault.status}}).encode()
    extra = "" if fault.retry_after is None else f"Retry-After: {fault.retry_after}\r\n"
    _write(writer, fault.status, body, extra=extra)


def _write(
    writer: asyncio.StreamWriter,
    status: int,
    data: bytes,
    kind: str = "application/json",
    extra: str = "",
) -> None:
    head = f"HTTP/1.1 {status} X\r\nContent-Type: {kind}\r\nContent-Length: {len(data)}\r\n"
    writer.write(head.encode() + extra.encode() + b"\r\n" + data)


class Serving(Protocol):
    """A fake server: started and closed in the event loop it serves from."""

    async def start(self) -> Any: ...

    async def close(self) -> None: ...


S = TypeVar("S", bound=Serving)


class ServerThread(Generic[S]):
    """A fake server (`FakeVLLM`, `fake_openai.FakeOpenAI`) on its own event loop in a daemon
    thread (for code under test that runs its own loop, such as `turnrl train`); `stop`
    closes the server in that loop."""

    def __init__(self, server: S) -> None:
        self.server = server
        self.loop = asyncio.new_event_loop()
        started = threading.Event()

        def run() -> None:
            asyncio.set_event_loop(self.loop)
            self.loop.run_until_complete(server.start())
            started.set()
            self.loop.run_forever()

        self.thread = threading.Thread(target=run, daemon=True)
        self.thread.start()
        if not started.wait(30):
            raise RuntimeError("the fake server did not start")

    def stop(self) -> None:
        asyncio.run_coroutine_threadsafe(self.server.close(), self.loop).result(30)
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join(10)


def parse_path_fault(text: str) -> tuple[str, Fault, int]:
    """`PATH=KIND[:STATUS][@N]` -> (path, fault, n): `/collective_rpc=hold@1`."""
    path, _, rest = text.partition("=")
    rest, _, nth = rest.partition("@")
    kind, _, status = rest.partition(":")
    fault = Fault(cast(FaultKind, kind), status=int(status) if status else 500)
    return path, fault, int(nth or 0)


async def _main(port: int, model: str, path_faults: list[str], rule: Rule) -> None:
    server = FakeVLLM(rule, port=port, model=model)
    for text in path_faults:
        path, fault, nth = parse_path_fault(text)
        server.inject_path(path, fault, nth)
    await server.start()
    print(f"port {server.port}", flush=True)
    await asyncio.Event().wait()


if __name__ == "__main__":
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0], allow_abbrev=False)
    ap.add_argument("--port", type=int, default=0)
    ap.add_argument("--served-model-name", dest="model", default="fake-model")
    ap.add_argument("--path-fault", action="append", default=[])
    ap.add_argument("--replies", help="JSON list of id lists: `turn_rule`'s replies")
    ap.add_argument("--end-id", type=int, default=2, help="`turn_rule`'s end-of-message id")
    args, _ = ap.parse_known_args()
    rule: Rule = default_rule
    if args.replies is not None:
        rule = turn_rule(json.loads(args.replies), args.end_id)
    with contextlib.suppress(KeyboardInterrupt):
        asyncio.run(_main(args.port, args.model, args.path_fault, rule))


@contextlib.contextmanager
def alternating_server() -> Iterator[FakeVLLM]:
    """A fake on a thread of its own whose replies (in the tiny model's vocabulary) alternate
    between a well-formed answer and text without one, so a group's format rewards differ,
    every step trains and pushes a new version."""
    from turnrl.agent.model import load_tokenizer, tiny_model_dir

    tok = load_tokenizer(tiny_model_dir())
    answer = tok.encode("<answer>Paris</answer>", add_special_tokens=False)
    rambling = tok.encode("I am not sure", add_special_tokens=False)
    end = tok.convert_tokens_to_ids("<|im_end|>")
    turn = itertools.count()

    def rule(prompt: list[int], weights: str) -> list[int]:
        return [*(answer if next(turn) % 2 == 0 else rambling), end]

    thread = ServerThread(FakeVLLM(rule, model="turnrl"))
    try:
        yield thread.server
    finally:
        thread.stop()
