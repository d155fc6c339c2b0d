"""Fault suite: the inference server fails during `turnrl train` (issue 15, item 4).

One short run per `train.mode` (`model.kind: vllm`, the tiny model's weights in the learner)
samples every turn on the fake server (`fake_vllm.py`, its own thread), which breaks a known
set of completion requests, chosen by arrival index: it answers too late or never (the
request times out), answers 5xx or 429 (with and without `retry-after`), sends a body that is
not JSON, drops the connection before, during or after the headers, stalls mid-body, or sends
well-framed replies whose logprobs, token names or prompt echo are wrong. Read back from the
run store:

- every fault fired and ended exactly one episode, with `StopReason.POLICY_ERROR` and the
  `PolicyError` subclass of its kind in `Episode.error`; every other episode ended normally;
- no request was sent twice, and every stored turn is one whole reply the server sent
  (turns stored = requests answered whole);
- the run completed all its steps, each with a real learner step;
- the learner trained only on turns with an advantage, and none of those belongs to a failed
  episode: its earlier turns are sound, but its reward says the server failed, not that the
  policy did (`test_failed_episodes_are_not_trained`).
"""

from __future__ import annotations

import functools
import itertools
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
from fake_vllm import FakeVLLM, Fault, Rule, ServerThread
from rich.console import Console
from transformers import PreTrainedTokenizerBase

from turnrl.agent.model import load_tokenizer, tiny_model_dir
from turnrl.agent.records import Episode, StopReason
from turnrl.agent.store import RunStore
from turnrl.config import load_config
from turnrl.train import run_train

ROOT = Path(__file__).resolve().parents[1]
STEPS = 3
REQUEST_TIMEOUT_S = 1.5
"""`model.request_timeout_s`: what the slow, silent and stalled replies run into."""

FAULTS: dict[int, tuple[Fault, str]] = {
    1: (Fault("delay", delay_s=30.0), "PolicyTimeoutError"),  # answers far too late
    4: (Fault("hold"), "PolicyTimeoutError"),  # never answers
    8: (Fault("status", status=500), "PolicyStatusError"),
    13: (Fault("status", status=503), "PolicyStatusError"),
    19: (Fault("status", status=429), "PolicyStatusError"),
    24: (Fault("status", status=429, retry_after="3600"), "PolicyStatusError"),
    30: (Fault("malformed_json"), "PolicyResponseError"),
    36: (Fault("drop"), "PolicyUnavailableError"),  # closed before any byte
    41: (Fault("drop_mid"), "PolicyUnavailableError"),  # closed mid-headers
    47: (Fault("truncated"), "PolicyUnavailableError"),  # closed mid-body
    52: (Fault("stall_mid"), "PolicyTimeoutError"),  # headers, half the body, then nothing
    58: (Fault("nan_logprob"), "PolicyResponseError"),
    63: (Fault("bad_tokens"), "PolicyResponseError"),
    69: (Fault("wrong_prompt"), "PolicyResponseError"),
}
"""Arrival index of the completion request -> its fault and the error the episode must end
with. The run makes ~90 requests (3 steps x 16 episodes x 2 turns, less the turns after a
first-turn fault), so every index is reached."""


@functools.cache
def tokenizer() -> PreTrainedTokenizerBase:
    tok: PreTrainedTokenizerBase = load_tokenizer(tiny_model_dir())
    return tok


def last_user_message(prompt: list[int]) -> str:
    """The text of a prompt's last user message (where tool responses are)."""
    text = str(tokenizer().decode(prompt))
    return text.rsplit("<|im_start|>user", 1)[-1]


def agent_rule() -> Rule:
    """A search call first; after the tool's answer, alternately the right answer and text
    without one (a group's rewards differ, so every step trains)."""
    tok = tokenizer()
    end = tok.convert_tokens_to_ids("<|im_end|>")
    call = tok.encode(
        '<tool_call>{"name": "search", "arguments": {"query": "capital"}}</tool_call>',
        add_special_tokens=False,
    )
    answer = tok.encode("<answer>Paris</answer>", add_special_tokens=False)
    rambling = tok.encode("I am not sure", add_special_tokens=False)
    second = itertools.count()

    def rule(prompt: list[int], weights: str) -> list[int]:
        if "<tool_response>" not in last_user_message(prompt):
            return [*call, end]
        return [*(answer if next(second) % 2 == 0 else rambling), end]

    return rule


@dataclass
class FaultRun:
    """The run under faults, read back."""

    fake: FakeVLLM
    episodes: list[Episode]
    metrics: list[dict[str, float]]
    rows: list[dict[str, float]]


@pytest.fixture(scope="module", params=["sync", "async"])
def fault_run(
    request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[FaultRun]:
    """The run, in each `train.mode` (async: rollouts of the next step overlap learning)."""
    thread = ServerThread(FakeVLLM(agent_rule(), model="turnrl"))
    fake = thread.server
    for nth, (fault, _) in FAULTS.items():
        fake.inject(fault, nth=nth)
    run_dir = tmp_path_factory.mktemp("faults") / "run"
    cfg = load_config(
        ROOT / "examples" / "tiny.yaml",
        {
            "run_dir": str(run_dir),
            "model": {
                "kind": "vllm",
                "weights": {"kind": "tiny"},
                "url": fake.url,
                "request_timeout_s": REQUEST_TIMEOUT_S,
            },
            "budget": {"max_turns": 2, "max_new_tokens": 48, "max_context_tokens": 4096},
            "train": {
                "steps": STEPS,
                "tasks_per_step": 4,
                "group_size": 4,
                "mode": request.param,
            },
            "sampling.temperature": 1.0,
        },
    )
    try:
        out = run_train(cfg, Console(width=120, record=True), with_eval=False)
        with RunStore.open_readonly(run_dir) as store:
            episodes = list(store.episodes())
            metrics = list(store.metrics())
        yield FaultRun(fake, episodes, metrics, out["rows"])
    finally:
        thread.stop()


def error_class(episode: Episode) -> str:
    """The `PolicyError` subclass named at the start of a `POLICY_ERROR` episode's error."""
    return (episode.error or "").split(":", 1)[0]


def test_every_fault_ends_one_episode_with_a_typed_stop_and_the_run_completes(
    fault_run: FaultRun,
) -> None:
    fake, episodes = fault_run.fake, fault_run.episodes
    # Every fault fired, on the request it was meant for, and each request went out once.
    assert sorted(i for i, _, _ in fake.faulted) == sorted(FAULTS)
    seeds = [c["seed"] for c in fake.completions]
    assert len(seeds) == len(set(seeds))
    # Each fault ended exactly one episode, typed; nothing else failed.
    failed = [e for e in episodes if e.stop_reason == StopReason.POLICY_ERROR]
    assert Counter(error_class(e) for e in failed) == Counter(w for _, w in FAULTS.values())
    assert len({e.episode_id for e in episodes}) == len(episodes) == STEPS * 16
    normal = {StopReason.ANSWERED, StopReason.MAX_TURNS}
    assert all(e.stop_reason in normal for e in episodes if e not in failed)
    for e in failed:
        if "PolicyStatusError" in (e.error or ""):
            assert "injected" in (e.error or "")
    # A failed request never becomes a turn: the episode keeps the turns before it, and its
    # context is the prompt of the request that failed.
    faulted_at = Counter(
        (tuple(p["prompt"]), w)
        for i, _, p in fake.faulted
        for w in [FAULTS[i][1]]
        if "<tool_response>" in last_user_message(p["prompt"])
    )
    later = Counter((tuple(e.token_ids()), error_class(e)) for e in failed if e.turns)
    assert later == faulted_at
    assert sum(later.values()) > 0 and sum(1 for e in failed if not e.turns) > 0
    # Tokens are the truth: turns stored = requests answered whole, each verbatim.
    turns = [t for e in episodes for t in e.turns]
    assert len(turns) == len(fake.completions) - len(FAULTS)
    replies = {tuple(ids): lps for ids, lps in fake.replies}
    for t in turns:
        assert t.completion_logprobs == replies[tuple(t.completion_ids)]
    # The run went on: every step stored its metrics and took a real learner step.
    assert len(fault_run.rows) == len(fault_run.metrics) == STEPS
    assert [m["step"] for m in fault_run.metrics] == list(range(STEPS))
    assert all(m["skipped"] == 0.0 for m in fault_run.metrics)
    assert [int(m["policy_version"]) for m in fault_run.metrics] == list(range(1, STEPS + 1))
    print(
        f"\nfaults injected {len(fake.faulted)}, episodes affected {len(failed)} of "
        f"{len(episodes)} ({sum(1 for e in failed if not e.turns)} at their first turn), "
        f"completion requests {len(fake.completions)}"
    )


def trained_tokens(e: Episode) -> int:
    return sum(len(t.completion_ids) for t in e.turns if t.advantage is not None)


def test_the_learner_trains_exactly_the_turns_with_an_advantage(fault_run: FaultRun) -> None:
    """What each step's learner reports training on is the stored turns with an advantage."""
    for m in fault_run.metrics:
        step = [e for e in fault_run.episodes if e.step == int(m["step"])]
        assert m["n_tokens"] == sum(trained_tokens(e) for e in step) > 0


def test_failed_episodes_are_not_trained(fault_run: FaultRun) -> None:
    """An episode a fault ended says nothing about the policy: none of its turns carries an
    advantage, so no learner step trains on it (nor counts it in its group's baseline)."""
    failed = [e for e in fault_run.episodes if e.stop_reason == StopReason.POLICY_ERROR]
    assert any(e.turns for e in failed)
    assert all(t.advantage is None for e in failed for t in e.turns)
