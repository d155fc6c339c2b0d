"""Step-level credit on a large batch: trajectory graphs plus GiGPO and SALT, against GRPO.

Synthetic but shaped like real rollouts: `--episodes` episodes of `--turns` turns in groups of
`--group` (one task each). At every turn an episode picks one of a few search queries; the
observation is a function of the history, so rollouts of a group share states wherever their
choices agree, as real ones do. The last turn answers and the outcome is random. Records are
built once, outside the timing.

Timed (best of `--repeats`, nothing memoised between repeats): building the trajectory graph
of every group, then GiGPO and SALT advantages for the whole batch on one shared turn graph;
the reference is GRPO (`compute_advantages` with the `grpo` config) on the same batch. The
records carry `Turn.state_key` as the runner records it (hashed while each turn is built, a
few microseconds per turn inside the rollout), which is what a training step sees; the detail
also gives the time for records without it (every key hashed here). The ratio is the figure
over GRPO's time. Target: <= 200 ms on 2 cores.
"""

from __future__ import annotations

import argparse
import json
import random
import time
from collections import defaultdict
from collections.abc import Callable

from turnrl.agent.graph import TrajectoryGraph, clear_key_cache
from turnrl.agent.records import Episode, StopReason, ToolCall, ToolResult, Turn
from turnrl.agent.state_key import ROOT, chain_key
from turnrl.rl.advantages import compute_advantages, estimator_config
from turnrl.rl.group_advantages import dense_index
from turnrl.rl.step_advantages import turn_graph

QUERIES = ["capital of {}", "population of {}", "currency of {}", "area of {}"]


def make_batch(n_episodes: int, n_turns: int, group: int, seed: int) -> list[Episode]:
    rng = random.Random(seed)
    episodes = []
    for n in range(n_episodes):
        task = f"task{n // group}"
        turns = []
        history = ""
        for t in range(n_turns):
            last = t == n_turns - 1
            if last:
                call = []
                results: list[ToolResult] = []
                answer: str | None = rng.choice(["Paris", "Lyon"])
                text = f"<answer>{answer}</answer>"
            else:
                query = rng.choice(QUERIES).format(task)
                args = {"query": query}
                call = [
                    ToolCall.model_construct(id=f"t{t}c0", name="search", raw="", arguments=args)
                ]
                history += query
                results = [
                    ToolResult.model_construct(
                        call_id=f"t{t}c0", text=f"result {hash(history) % 97}", cost={"calls": 1.0}
                    )
                ]
                answer, text = None, ""
            turn = Turn.model_construct(
                index=t,
                prompt_ids=[],
                completion_ids=[1, 2, 3],
                completion_logprobs=[-0.5, -0.2, -0.1],
                observation_ids=[],
                text=text,
                tool_calls=call,
                tool_results=results,
                answer=answer,
                format_error=None,
                rewards={},
                signals={},
                advantage=None,
                replayed=False,
                state_key=None,
            )
            # As the runner does when it records the turn.
            parent = turns[-1].state_key if turns else ROOT
            turns.append(turn.model_copy(update={"state_key": chain_key(parent, turn)}))
        episodes.append(
            Episode.model_construct(
                episode_id=f"{task}/{n % group}",
                task_id=task,
                group_id=task,
                turns=turns,
                stop_reason=StopReason.ANSWERED,
                answer=turns[-1].answer,
                outcome={"correct": float(turns[-1].answer == "Paris")},
            )
        )
    return episodes


def best_of(fn: Callable[[], object], repeats: int) -> float:
    best = float("inf")
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - t0)
    return best


def main(args: argparse.Namespace) -> dict[str, object]:
    episodes = make_batch(args.episodes, args.turns, args.group, args.seed)
    rewards = [[0.0] * (len(e.turns) - 1) + [e.outcome["correct"]] for e in episodes]
    groups: dict[str, list[Episode]] = defaultdict(list)
    for e in episodes:
        groups[e.group_id].append(e)
    gigpo, salt, grpo = (estimator_config(k) for k in ("gigpo", "salt", "grpo"))

    unkeyed = [
        e.model_copy(update={"turns": [t.model_copy(update={"state_key": None}) for t in e.turns]})
        for e in episodes
    ]
    unkeyed_groups: dict[str, list[Episode]] = defaultdict(list)
    for e in unkeyed:
        unkeyed_groups[e.group_id].append(e)

    def credit(batch: list[Episode], by_group: dict[str, list[Episode]]) -> None:
        clear_key_cache()  # nothing memoised from an earlier repeat
        for members in by_group.values():
            TrajectoryGraph.build(members)
        graph = turn_graph(batch, dense_index([e.group_id for e in batch]))
        compute_advantages(batch, rewards, gigpo, graph=graph)
        compute_advantages(batch, rewards, salt, graph=graph)

    credit(episodes, groups)  # warm-up (imports, allocator)
    ours = best_of(lambda: credit(episodes, groups), args.repeats)
    rehash = best_of(lambda: credit(unkeyed, unkeyed_groups), args.repeats)
    ref = best_of(lambda: compute_advantages(episodes, rewards, grpo), args.repeats)
    ms = ours * 1e3
    return {
        "bench": "credit",
        "value": round(ms, 1),
        "unit": f"ms (graph+GiGPO+SALT, {args.episodes}x{args.turns})",
        "ratio": round(ours / ref, 2),
        "ratio_of": "graph+gigpo+salt/grpo",
        "target": "<= 200 ms",
        "ok": ms <= 200.0,
        "detail": {"unkeyed_records_ms": rehash * 1e3, "grpo_ms": ref * 1e3},
    }


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--quick", action="store_true", help="short run (< 45 s on 2 cores)")
    parser.add_argument("--episodes", type=int, default=4096)
    parser.add_argument("--turns", type=int, default=16)
    parser.add_argument("--group", type=int, default=8)
    parser.add_argument("--repeats", type=int, default=None)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    args.repeats = args.repeats or (2 if args.quick else 5)
    print(json.dumps(main(args)))
