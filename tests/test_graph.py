"""Trajectory graphs (merging, statistics, JSON) and branching rollouts from their nodes."""

from __future__ import annotations

import asyncio
import gc
import json
import os
import subprocess
import sys
from collections.abc import Sequence
from typing import Any

import pytest
from fakes import CharTokenizer, EchoArgs, EchoTool
from hypothesis import given, settings
from hypothesis import strategies as st

from turnrl.agent import graph as graph_module
from turnrl.agent import state_key as state_key_module
from turnrl.agent.chat import ChatML
from turnrl.agent.graph import (
    TrajectoryGraph,
    action_key,
    after_keys,
    clear_key_cache,
    observation_key,
    state_keys,
)
from turnrl.agent.policy import SamplingParams
from turnrl.agent.records import Episode, StopReason, ToolCall, ToolResult, Turn
from turnrl.agent.runner import Budget, EpisodeRunner, EpisodeSpec
from turnrl.agent.scripted import ScriptedPolicy
from turnrl.agent.state_key import ROOT
from turnrl.sandboxes.local import SubprocessSandbox
from turnrl.tools.base import EpisodeTool, Tool, ToolOutput, ToolSpec
from turnrl.tools.python import PythonTool

TOK = CharTokenizer()
ANSWER = "<answer>done</answer><|im_end|>"

# --- records built by hand ----------------------------------------------------------------

Step = tuple[str, str]
"""(query, observation) of one search turn."""


def make_turn(index: int, query: str, observation: str) -> Turn:
    call = ToolCall(id=f"t{index}c0", name="search", raw="", arguments={"query": query})
    return Turn(
        index=index,
        prompt_ids=[1] if index == 0 else [],
        completion_ids=[5, 6],
        completion_logprobs=[-0.1, -0.2],
        observation_ids=[7],
        text="",
        finish_reason="stop",
        tool_calls=[call],
        tool_results=[ToolResult(call_id=call.id, text=observation)],
    )


def make_episode(i: int, steps: Sequence[Step], group: str = "g") -> Episode:
    return Episode(
        episode_id=f"e{i}",
        task_id="t",
        group_id=group,
        turns=[make_turn(t, q, o) for t, (q, o) in enumerate(steps)],
        stop_reason=StopReason.MAX_TURNS,
    )


small = st.sampled_from(["a", "b", "c"])
steps_st = st.lists(st.tuples(small, small), min_size=1, max_size=5)


# --- keys -----------------------------------------------------------------------------------


@given(
    st.lists(
        st.tuples(
            st.dictionaries(
                st.sampled_from(["q", "k", "n"]),
                st.one_of(small, st.integers(0, 2), st.lists(small, max_size=2), st.booleans()),
                max_size=3,
            ),
            st.sampled_from(["x", "x y", "", "Error: z"]),
            st.sampled_from([None, "timeout"]),
        ),
        min_size=2,
        max_size=2,
    )
)
def test_fast_turn_text_partitions_like_the_readable_keys(
    pair: list[tuple[dict[str, Any], str, str | None]],
) -> None:
    """The hashed form of a turn is equal exactly when `action_key`/`observation_key` are."""
    turns = []
    for args, text, error in pair:
        call = ToolCall(id="t0c0", name="f", raw="", arguments=args)
        turns.append(
            make_turn(0, "", "").model_copy(
                update={
                    "tool_calls": [call],
                    "tool_results": [ToolResult(call_id="t0c0", text=text, error=error)],
                }
            )
        )
    a, b = turns
    readable = (action_key(a), observation_key(a)) == (action_key(b), observation_key(b))
    assert (state_key_module.turn_text(a) == state_key_module.turn_text(b)) == readable


@given(st.lists(steps_st, min_size=2, max_size=6))
def test_equal_keys_exactly_when_histories_are_equal(groups: list[list[Step]]) -> None:
    episodes = [make_episode(i, s) for i, s in enumerate(groups)]
    seen: dict[tuple[Step, ...], str] = {}
    for steps, ep in zip(groups, episodes, strict=True):
        starts, ends = state_keys(ep), after_keys(ep)
        assert starts == [ROOT, *ends[:-1]]
        for t, key in enumerate(ends):
            history = tuple(steps[: t + 1])
            assert seen.setdefault(history, key) == key
    assert len(set(seen.values())) == len(seen)  # different histories never share a key


def test_keys_are_stable_across_processes_and_copies() -> None:
    episode = make_episode(0, [("capital of France", "Paris is the capital"), ("x", "y")])
    keys = after_keys(episode)
    code = (
        "from turnrl.agent.records import Episode; from turnrl.agent.graph import after_keys;"
        "import sys; print(','.join(after_keys(Episode.model_validate_json(sys.stdin.read()))))"
    )
    out = subprocess.run(
        [sys.executable, "-c", code],
        input=episode.model_dump_json(),
        capture_output=True,
        text=True,
        check=True,
        env={**os.environ, "PYTHONHASHSEED": "123"},
    )
    assert out.stdout.strip().split(",") == keys
    copy = episode.model_copy(update={"turns": [t.model_copy() for t in episode.turns]})
    assert after_keys(copy) == keys


def test_memoised_keys_die_with_their_episode() -> None:
    clear_key_cache()
    episodes = [make_episode(i, [("a", str(i))]) for i in range(50)]
    first = [after_keys(e) for e in episodes]
    assert len(graph_module._memo) == 50
    assert [after_keys(e) for e in episodes] == first  # served from the memo
    del episodes
    gc.collect()
    assert len(graph_module._memo) == 0


# --- graph structure --------------------------------------------------------------------------


@given(steps_st, st.integers(1, 6))
def test_identical_episodes_form_a_single_path(steps: list[Step], g: int) -> None:
    graph = TrajectoryGraph.build([make_episode(i, steps) for i in range(g)])
    assert len(graph) == len(steps) + 1
    node = graph.root
    for depth in range(len(steps) + 1):
        assert node.depth == depth and node.visits == g
        if depth == len(steps):
            assert node.children == {} and node.ends == g
            break
        ((child,),) = node.children.values()
        node = graph.node(child)


@given(
    st.lists(st.tuples(small, small), max_size=4),
    st.lists(steps_st, min_size=2, max_size=5, unique_by=lambda s: s[0]),
)
def test_episodes_that_differ_at_turn_k_share_exactly_k_nodes(
    common: list[Step], tails: list[list[Step]]
) -> None:
    """Episodes equal up to turn k and different at turn k share the root and the k nodes
    after turns 0..k-1, and nothing after."""
    k = len(common)
    episodes = [make_episode(i, common + tail) for i, tail in enumerate(tails)]
    graph = TrajectoryGraph.build(episodes)
    shared = graph.paths[0][:k]
    for path in graph.paths:
        assert path[:k] == shared
    for i, a in enumerate(graph.paths):
        for b in graph.paths[i + 1 :]:
            assert not set(a[k:]) & set(b[k:])
    assert len(graph) == 1 + k + sum(len(t) for t in tails)
    assert all(graph.node(key).visits == len(tails) for key in shared)


@given(
    st.lists(steps_st, min_size=1, max_size=8),
    st.lists(st.floats(-1, 1, allow_nan=False), min_size=8, max_size=8),
    st.lists(st.booleans(), min_size=8, max_size=8),
)
def test_visit_counts_returns_and_success_add_up(
    groups: list[list[Step]], returns: list[float], success: list[bool]
) -> None:
    episodes = [make_episode(i, s) for i, s in enumerate(groups)]
    n = len(episodes)
    graph = TrajectoryGraph.build(episodes, returns[:n], success[:n])
    nodes = graph.nodes
    assert graph.root.visits == n
    for node in nodes.values():
        below = sum(nodes[c].visits for cs in node.children.values() for c in cs)
        assert node.visits == node.ends + below
        assert node.visits == len(node.episodes)
        assert node.mean_return == pytest.approx(
            sum(returns[i] for i in node.episodes) / node.visits
        )
        assert node.success_rate == pytest.approx(
            sum(success[i] for i in node.episodes) / node.visits
        )
        for action, children in node.children.items():
            assert all(nodes[c].action == action and nodes[c].parent == node.key for c in children)
    for depth in range(max(len(s) for s in groups) + 1):
        at_depth = sum(v.visits for v in nodes.values() if v.depth == depth)
        assert at_depth == sum(len(s) >= depth for s in groups)
    assert sum(v.ends for v in nodes.values()) == n
    assert graph.state_keys() == [state_keys(e) for e in episodes]


@given(st.lists(steps_st, min_size=1, max_size=5), st.booleans(), st.booleans())
@settings(max_examples=50)
def test_json_round_trip(groups: list[list[Step]], with_stats: bool, merge: bool) -> None:
    episodes = [make_episode(i, s) for i, s in enumerate(groups)]
    n = len(episodes)
    graph = TrajectoryGraph.build(
        episodes,
        returns=[float(i) for i in range(n)] if with_stats else None,
        success=[i % 2 == 0 for i in range(n)] if with_stats else None,
        similarity=0.5 if merge else None,
    )
    text = graph.to_json()
    loaded = TrajectoryGraph.from_json(text)
    assert loaded == graph and loaded.to_json() == text
    doc = json.loads(text)
    assert doc["schema"] == "turnrl.trajectory_graph/1"
    assert doc["nodes"][0]["key"] == ROOT
    attached = TrajectoryGraph.from_json(text, episodes)
    assert attached.prefix(graph.paths[0][0]) == tuple(episodes[0].turns[:1])


def test_json_that_disagrees_with_itself_is_refused() -> None:
    graph = TrajectoryGraph.build([make_episode(0, [("a", "b")]), make_episode(1, [("a", "c")])])
    doc = json.loads(graph.to_json())
    doc["nodes"][1]["visits"] = 5
    with pytest.raises(ValueError, match="do not match"):
        TrajectoryGraph.from_json(json.dumps(doc))
    with pytest.raises(ValueError, match="one task group"):
        TrajectoryGraph.build([make_episode(0, [("a", "b")]), make_episode(1, [], group="h")])


def test_similarity_merge_joins_near_identical_observations_only_when_asked() -> None:
    """Two searches whose results differ only in a timestamp share a node at threshold 0.5
    (word bigrams: 5 of the 7 distinct ones are common, 5/7 = 0.71), and what follows them
    chains from the merged node; a different result (0 common bigrams) stays apart."""
    a = "Paris is the capital of France fetched 10:00"
    b = "Paris is the capital of France fetched 10:01"
    c = "Lyon is a city in France"
    episodes = [
        make_episode(0, [("capital", a), ("more", "x")]),
        make_episode(1, [("capital", b), ("more", "x")]),
        make_episode(2, [("capital", c), ("more", "x")]),
    ]
    exact = TrajectoryGraph.build(episodes)
    assert len(exact) == 7 and exact.paths == tuple(tuple(after_keys(e)) for e in episodes)
    merged = TrajectoryGraph.build(episodes, similarity=0.5)
    p0, p1, p2 = merged.paths
    assert p0 == p1 and p0 != p2 and len(merged) == 5
    node = merged.node(p0[0])
    assert node.visits == 2 and node.observation == f":{a}"  # the first seen represents it
    assert merged.node(p0[1]).visits == 2
    assert merged.state_keys()[1] == [ROOT, p0[0]]
    # A threshold no pair reaches changes nothing: the keys are the exact ones.
    assert TrajectoryGraph.build(episodes, similarity=1.0).paths == exact.paths
    with pytest.raises(ValueError, match="similarity"):
        TrajectoryGraph.build(episodes, similarity=0.0)


# --- branching --------------------------------------------------------------------------------


def echo(text: str) -> str:
    body = json.dumps({"name": "echo", "arguments": {"text": text}})
    return f"<tool_call>{body}</tool_call><|im_end|>"


class Session:
    def __init__(self, tool: StatefulEcho) -> None:
        self.tool = tool
        self.seen: list[str] = []
        tool.sessions.append(self)

    async def __call__(self, args: EchoArgs) -> ToolOutput:
        self.seen.append(args.text)
        tag = f"#{len(self.tool.sessions)}" if self.tool.drift else ""
        return ToolOutput(text="|".join(self.seen) + tag)

    async def aclose(self) -> None:
        self.tool.closed += 1


class StatefulEcho:
    """An `EpisodeTool` fake: a session answers with everything it was called with so far (its
    state); with `drift`, also with how many sessions the tool opened (so a replay differs)."""

    def __init__(self, drift: bool = False) -> None:
        self.drift = drift
        self.sessions: list[Session] = []
        self.closed = 0
        self._spec = ToolSpec(name="echo", description="Echo.", args_model=EchoArgs)

    @property
    def spec(self) -> ToolSpec:
        return self._spec

    def session(self) -> Session:
        return Session(self)


def run(
    replies: Sequence[str],
    tools: Sequence[Tool | EpisodeTool],
    spec: EpisodeSpec,
    budget: Budget | None = None,
) -> tuple[Episode, ScriptedPolicy]:
    it = iter(replies)
    policy = ScriptedPolicy(lambda ctx: next(it, ANSWER), TOK)
    runner = EpisodeRunner(
        policy,
        ChatML(TOK),
        tools,
        budget or Budget(max_context_tokens=100_000, max_turns=10),
        SamplingParams(),
    )
    return asyncio.run(runner.run_episode(spec)), policy


def base(i: int = 0) -> EpisodeSpec:
    return EpisodeSpec(f"e{i}", "g", "t", "Be brief.", "Q?", seed=7)


def prefix_ids(turns: Sequence[Turn]) -> list[int]:
    return [i for t in turns for i in (*t.prompt_ids, *t.completion_ids, *t.observation_ids)]


@pytest.mark.parametrize("depth", [0, 1, 2, 3])
def test_branch_restores_prefix_ids_and_tool_state(depth: int) -> None:
    tool = StatefulEcho()
    original, _ = run([echo("a"), echo("b"), echo("c")], [tool], base())
    assert [r.text for t in original.turns for r in t.tool_results] == ["a", "a|b", "a|b|c"]
    graph = TrajectoryGraph.build([original])
    key = ROOT if depth == 0 else graph.paths[0][depth - 1]

    fresh = StatefulEcho()
    spec = graph.branch_spec(key, base(1))
    branched, policy = run([echo("z")], [fresh], spec)

    stored = original.turns[:depth]
    assert spec.prefix == tuple(stored)
    # The prefix ids are the stored ones exactly, and so is what the policy first continued.
    assert prefix_ids(branched.turns[:depth]) == prefix_ids(stored)
    for new, old in zip(branched.turns[:depth], stored, strict=True):
        assert new.replayed and not old.replayed
        assert (new.prompt_ids, new.completion_ids, new.observation_ids) == (
            old.prompt_ids,
            old.completion_ids,
            old.observation_ids,
        )
        assert new.completion_logprobs == old.completion_logprobs
    if depth:
        assert policy.prompts[0] == prefix_ids(stored)
    else:
        assert policy.prompts[0] == original.turns[0].prompt_ids
    assert not any(t.replayed for t in branched.turns[depth:])
    # The tool state was rebuilt by replaying the stored calls into the fresh session.
    (session,) = fresh.sessions
    assert session.seen == [*"abc"[:depth], "z"]
    assert branched.turns[depth].tool_results[0].text == "|".join(session.seen)
    assert branched.error is None and branched.stop_reason == StopReason.ANSWERED
    assert [t.index for t in branched.turns] == list(range(len(branched.turns)))
    assert fresh.closed == 1
    # The branch lands in the same graph under the node it started from.
    regrown = TrajectoryGraph.build([original, branched])
    assert regrown.node(key).visits == 2


def test_replay_mismatch_is_recorded_and_the_episode_goes_on() -> None:
    tool = StatefulEcho(drift=True)
    original, _ = run([echo("a"), echo("b")], [tool], base())
    assert original.turns[1].tool_results[0].text == "a|b#1"
    graph = TrajectoryGraph.build([original])
    branched, _ = run([echo("c")], [tool], graph.branch_spec(graph.paths[0][1], base(1)))
    assert branched.stop_reason == StopReason.ANSWERED
    assert branched.turns[2].tool_results[0].text == "a|b|c#2"
    assert branched.error is not None
    lines = branched.error.splitlines()
    assert len(lines) == 2 and all(line.startswith("replay mismatch: turn") for line in lines)
    assert "call t1c0 (echo): stored ok 'a|b#1', replayed ok 'a|b#2'" in lines[1]
    # The stored observation, not the replayed one, is what the context holds.
    assert branched.turns[1].observation_ids == original.turns[1].observation_ids


def test_branch_counts_the_prefix_against_the_budget_and_skips_stateless_tools() -> None:
    stateless = EchoTool()
    original, _ = run([echo("a"), echo("b")], [stateless], base())
    assert stateless.calls == 2 and original.cost == {"calls": 2.0, "money_usd": 1.0}
    graph = TrajectoryGraph.build([original])
    budget = Budget(max_context_tokens=100_000, max_turns=10, max_tool_calls=2)
    branched, _ = run(
        [echo("c")], [stateless], graph.branch_spec(graph.paths[0][1], base(1)), budget
    )
    assert stateless.calls == 2  # a shared, stateless tool is not called again
    assert branched.stop_reason == StopReason.MAX_TOOL_CALLS
    assert branched.turns[2].tool_results[0].error == "budget"
    assert branched.cost == {"calls": 2.0, "money_usd": 1.0}


def test_a_prefix_tool_the_runner_lacks_is_noted() -> None:
    original, _ = run([echo("a")], [StatefulEcho()], base())
    graph = TrajectoryGraph.build([original])
    branched, _ = run([], [], graph.branch_spec(graph.paths[0][0], base(1)))
    assert branched.stop_reason == StopReason.ANSWERED
    assert "turn 0 call t0c0: this runner has no tool 'echo'" in (branched.error or "")


def test_terminal_nodes_and_bad_prefixes() -> None:
    original, _ = run([echo("a"), ANSWER], [StatefulEcho()], base())
    graph = TrajectoryGraph.build([original])
    with pytest.raises(ValueError, match="terminal"):
        graph.branch_spec(graph.paths[0][1], base(1))
    with pytest.raises(KeyError, match="no state"):
        graph.branch_spec("nope", base(1))
    # The runner itself never raises on a prefix it cannot continue: the episode says why.
    bad = EpisodeSpec("e2", "g", "t", "I", "Q?", prefix=tuple(original.turns))
    episode, policy = run([], [StatefulEcho()], bad)
    assert episode.stop_reason == StopReason.ERROR and episode.turns == []
    assert "invalid prefix: turn 1 answered" in (episode.error or "")
    assert policy.prompts == []


def python_call(code: str) -> str:
    body = json.dumps({"name": "python", "arguments": {"code": code}})
    return f"<tool_call>{body}</tool_call><|im_end|>"


def test_branch_restores_a_real_python_session() -> None:
    """A variable defined in the prefix exists in the branch: the stored call was replayed
    into the branch's own interpreter (the subprocess sandbox)."""
    sandbox = SubprocessSandbox(pool_size=2, warm=0)
    tool = PythonTool(sandbox, TOK.encode, max_tokens=200)

    def runner(replies: Sequence[str]) -> EpisodeRunner:
        it = iter(replies)
        return EpisodeRunner(
            ScriptedPolicy(lambda ctx: next(it, ANSWER), TOK),
            ChatML(TOK),
            [tool],
            Budget(max_context_tokens=100_000),
            SamplingParams(),
        )

    async def main() -> tuple[Episode, Episode]:
        try:
            first = runner([python_call("x = 41"), python_call("print(x * 2)")])
            original = await first.run_episode(base())
            graph = TrajectoryGraph.build([original])
            spec = graph.branch_spec(graph.paths[0][0], base(1))
            return original, await runner([python_call("x += 1\nprint(x)")]).run_episode(spec)
        finally:
            await sandbox.close()

    original, branched = asyncio.run(main())
    assert [r.text for r in original.turns[1].tool_results] == ["82"]
    assert branched.error is None, branched.error
    assert branched.turns[0].replayed and not branched.turns[1].replayed
    assert [r.text for r in branched.turns[1].tool_results] == ["42"]


def test_runner_records_the_state_keys_the_graph_would_compute() -> None:
    """`Turn.state_key`, hashed by the runner as each turn is recorded, equals the key the graph
    computes from the turn's contents; records without it are hashed on demand."""
    from fakes import CharTokenizer, EchoTool

    from turnrl.agent.chat import ChatML
    from turnrl.agent.graph import after_keys, clear_key_cache
    from turnrl.agent.policy import SamplingParams
    from turnrl.agent.runner import Budget, EpisodeRunner, EpisodeSpec
    from turnrl.agent.scripted import ScriptedPolicy

    tok = CharTokenizer()
    call = '<tool_call>{"name": "echo", "arguments": {"text": "hi"}}</tool_call><|im_end|>'
    replies = iter([call, "no tags<|im_end|>", call, "<answer>42</answer><|im_end|>"])
    runner = EpisodeRunner(
        ScriptedPolicy(lambda ctx: next(replies), tok),
        ChatML(tok),
        [EchoTool()],
        Budget(max_context_tokens=100_000, max_turns=8),
        SamplingParams(),
    )
    episode = asyncio.run(runner.run_episode(EpisodeSpec("e", "g", "t", "I", "Q?")))
    stored = [t.state_key for t in episode.turns]
    assert len(stored) == 4 and all(k is not None for k in stored)
    bare = episode.model_copy(
        update={"turns": [t.model_copy(update={"state_key": None}) for t in episode.turns]}
    )
    clear_key_cache()
    assert after_keys(bare) == stored
