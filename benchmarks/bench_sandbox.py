"""Latency of a `print(1)` snippet through each way of running it, and pooled throughput.

In one run: p50/p99 of `print(1)` through a warm bwrap worker (a fresh child forked per call,
`session.python_fresh`), through the stateful interpreter of a warm worker
(`session.python`), through a cold bubblewrap start (the full hardened command line, cgroup
excepted, running `python3 -c 'print(1)'`), through docker `exec_run` in a running container
(when a daemon answers), and through a plain unsandboxed `python3 -c` subprocess. Then the
throughput of `--snippets` snippets from `--episodes` concurrent episodes, each with its own
session (one worker each, from a pool of that size).

The figure is the warm p50 in ms; the ratio is cold bwrap p50 / warm p50 (how many times a warm
call is faster than a cold start measured in the same run). Targets: warm p50 <= 5 ms and
ratio >= 5.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import statistics
import sys
import time
from collections.abc import Awaitable, Callable
from typing import Any

from turnrl.sandboxes.base import Limits, SandboxError
from turnrl.sandboxes.bwrap import BwrapSandbox, bwrap_argv, bwrap_usable

SNIPPET = "print(1)"


def percentiles(samples: list[float]) -> dict[str, float]:
    ordered = sorted(samples)
    p99 = ordered[min(len(ordered) - 1, round(0.99 * (len(ordered) - 1)))]
    return {"p50_ms": statistics.median(ordered) * 1e3, "p99_ms": p99 * 1e3, "n": len(ordered)}


async def timed(fn: Callable[[], Awaitable[Any]], n: int) -> list[float]:
    await fn()  # warm-up
    out = []
    for _ in range(n):
        t0 = time.perf_counter()
        await fn()
        out.append(time.perf_counter() - t0)
    return out


async def run_cmd(argv: list[str]) -> None:
    proc = await asyncio.create_subprocess_exec(
        *argv, stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.DEVNULL
    )
    out, _ = await proc.communicate()
    if out.strip() != b"1":
        raise RuntimeError(f"{argv[0]} printed {out!r}")


async def docker_exec(n: int) -> dict[str, float] | str:
    try:
        from turnrl.sandboxes.docker import DockerSandbox, docker_usable
    except ImportError:
        return "no docker backend"
    reason = docker_usable()
    if reason is not None:
        return reason
    import docker

    sandbox = DockerSandbox(pool_size=1, warm=0)
    try:
        session = await sandbox.session()
        await session.python("pass")  # starts the container (and builds the image once)
        client = docker.from_env()
        found = client.containers.list(filters={"label": f"turnrl.run_id={sandbox.run_id}"})
        container = found[0]

        async def once() -> None:
            code, out = await asyncio.to_thread(
                container.exec_run, ["/usr/bin/python3", "-c", SNIPPET]
            )
            if code != 0 or out.strip() != b"1":
                raise RuntimeError(f"docker exec gave {code} {out!r}")

        return percentiles(await timed(once, n))
    finally:
        await sandbox.close()


async def throughput(episodes: int, snippets: int) -> dict[str, float]:
    sandbox = BwrapSandbox(pool_size=episodes, warm=episodes)
    try:
        sessions = [await sandbox.session() for _ in range(episodes)]
        # Start every worker first: throughput of calls, not of sandbox starts.
        await asyncio.gather(*(s.python_fresh("pass") for s in sessions))

        # `snippets` in all, spread as evenly as they go over the episodes.
        counts = [snippets // episodes + (i < snippets % episodes) for i in range(episodes)]

        async def episode(session: Any, n: int) -> None:
            for _ in range(n):
                result = await session.python_fresh(SNIPPET)
                if result.stdout != "1\n":
                    raise RuntimeError(f"bad result {result}")

        t0 = time.perf_counter()
        await asyncio.gather(*(episode(s, n) for s, n in zip(sessions, counts, strict=True)))
        wall = time.perf_counter() - t0
        for s in sessions:
            await s.close()
    finally:
        await sandbox.close()
    return {"snippets": snippets, "episodes": episodes, "wall_s": wall, "per_s": snippets / wall}


async def main(args: argparse.Namespace) -> dict[str, Any]:
    reason = bwrap_usable()
    if reason is not None:
        raise SandboxError(reason)
    report: dict[str, Any] = {}
    sandbox = BwrapSandbox(pool_size=1, warm=0)
    try:
        session = await sandbox.session()
        report["warm_fork"] = percentiles(
            await timed(lambda: session.python_fresh(SNIPPET), args.n)
        )
        report["warm_stateful"] = percentiles(await timed(lambda: session.python(SNIPPET), args.n))
        await session.close()
    finally:
        await sandbox.close()
    cold_argv = bwrap_argv(["/usr/bin/python3", "-c", SNIPPET], Limits())
    report["cold_bwrap"] = percentiles(await timed(lambda: run_cmd(cold_argv), args.n_cold))
    report["subprocess"] = percentiles(
        await timed(lambda: run_cmd([sys.executable, "-I", "-c", SNIPPET]), args.n_cold)
    )
    report["docker_exec"] = await docker_exec(args.n_cold)
    report["throughput"] = await throughput(args.episodes, args.snippets)
    for key, value in report.items():
        print(f"{key}: {value}", file=sys.stderr)
    warm = report["warm_fork"]["p50_ms"]
    ratio = report["cold_bwrap"]["p50_ms"] / warm
    return {
        "bench": "sandbox",
        "value": round(warm, 3),
        "unit": "ms p50 (warm print(1))",
        "ratio": round(ratio, 2),
        "ratio_of": "cold-bwrap/warm",
        "target": "<= 5 ms and ratio >= 5",
        "ok": warm <= 5.0 and ratio >= 5.0,
        "detail": report,
    }


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--quick", action="store_true", help="short run (< 45 s on 2 cores)")
    parser.add_argument("--n", type=int, default=None, help="warm calls timed")
    parser.add_argument("--n-cold", type=int, default=None, help="cold starts timed")
    parser.add_argument("--episodes", type=int, default=64, help="concurrent episodes")
    parser.add_argument("--snippets", type=int, default=None, help="snippets in the throughput run")
    args = parser.parse_args()
    args.n = args.n or (200 if args.quick else 2000)
    args.n_cold = args.n_cold or (30 if args.quick else 200)
    args.snippets = args.snippets or (256 if args.quick else 1000)
    if args.quick:
        args.episodes = min(args.episodes, 16)
    print(json.dumps(asyncio.run(main(args))))
