"""`model.kind: openai` end to end: `turnrl eval` (the real CLI and evaluation, the real
search_qa suite and search tool on the shipped data) against a fake OpenAI-compatible server
(`fake_openai.py`, in a thread of its own) that plays each test item's gold solution as native
tool calls and injects faults into chosen episodes."""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from fake_openai import FakeOpenAI, Fault, oracle_script
from fake_vllm import ServerThread
from rich.console import Console
from typer.testing import CliRunner

from turnrl.agent.chat import HFTokenizer
from turnrl.agent.model import load_tokenizer, tokenizer_dir
from turnrl.agent.records import StopReason
from turnrl.agent.store import RunStore
from turnrl.cli import app
from turnrl.config import RunConfig, load_config
from turnrl.sft import _stored_episodes
from turnrl.sft_config import RunSource
from turnrl.suites import build_suite
from turnrl.tasks.base import TaskItem, TaskSuite
from turnrl.train import run_eval, run_train

ROOT = Path(__file__).resolve().parents[1]
KEY_ENV = "TURNRL_TEST_OPENAI_KEY"
KEY = "sk-test-fake-key-7f3a9c1e5b2d4f60"
N_ITEMS = 10
PRICE = {"input_per_mtok": 0.15, "output_per_mtok": 0.60, "cached_input_per_mtok": 0.075}


def overrides(run_dir: Path, base_url: str) -> dict[str, Any]:
    return {
        "run_dir": str(run_dir),
        "model": {
            "kind": "openai",
            "model": "fake-gpt",
            "base_url": base_url,
            "api_key_env": KEY_ENV,
            "price": PRICE,
            "backoff_s": 0.01,
            "max_retries": 2,
            "request_timeout_s": 2.0,
        },
        "budget": {"max_turns": 4, "max_new_tokens": 160, "max_context_tokens": 4096},
        "eval.n_items": N_ITEMS,
        "concurrency": 4,
    }


def config(run_dir: Path, base_url: str) -> RunConfig:
    return load_config(ROOT / "examples" / "tiny.yaml", overrides(run_dir, base_url))


@pytest.fixture(scope="module")
def suite() -> TaskSuite:
    cfg = config(Path("unused"), "http://127.0.0.1:1/v1")
    encode = HFTokenizer(load_tokenizer(tokenizer_dir())).encode
    return build_suite(cfg.task, encode, None, chat=cfg.chat)


@pytest.fixture(scope="module")
def items(suite: TaskSuite) -> list[TaskItem]:
    """The evaluated test items."""
    test = list(suite.items("test"))[:N_ITEMS]
    assert len(test) == N_ITEMS
    return test


@pytest.fixture
def fake(
    suite: TaskSuite, items: list[TaskItem], monkeypatch: pytest.MonkeyPatch
) -> Iterator[FakeOpenAI]:
    """The server, playing each item's gold turns (the suite's oracle, in turnrl syntax)."""
    monkeypatch.setenv(KEY_ENV, KEY)
    script = oracle_script({it.question: suite.oracle_turns(it) for it in items})
    thread = ServerThread(FakeOpenAI(script, api_key=KEY))
    try:
        yield thread.server
    finally:
        thread.stop()


def test_eval_answers_through_native_calls_priced_by_the_apis_usage(
    fake: FakeOpenAI, items: list[TaskItem], tmp_path: Path
) -> None:
    run_dir = tmp_path / "run"
    console = Console(width=200, record=True)
    summary = run_eval(config(run_dir, fake.base_url), console, None)
    assert fake.protocol_errors == []
    # The gold solutions, played natively through the real search tool, answer every item.
    assert summary["success"] == 1.0 and summary["episodes"] == N_ITEMS
    assert summary["tool_calls_per_episode"] >= 1.0
    # The search results reached the API as `tool` messages answering their call ids.
    tool_messages = [m for a in fake.answered for m in a.messages if m["role"] == "tool"]
    assert tool_messages and all(m["tool_call_id"].startswith("call_") for m in tool_messages)
    with RunStore.open_readonly(run_dir) as store:
        episodes = list(store.episodes())
    # Dollars are the server's own usage times the price, per episode and per success.
    by_question: dict[str, list[dict[str, Any]]] = {}
    for a in fake.answered:
        by_question.setdefault(a.question, []).append(a.usage)
    question = {it.id: it.question for it in items}
    total = 0.0
    for e in episodes:
        usages = by_question[question[e.task_id]]
        dollars = sum(
            (
                (u["prompt_tokens"] - u["prompt_tokens_details"]["cached_tokens"]) * 0.15
                + u["prompt_tokens_details"]["cached_tokens"] * 0.075
                + u["completion_tokens"] * 0.60
            )
            / 1e6
            for u in usages
        )
        assert e.cost["model_usd"] == pytest.approx(dollars, rel=1e-9)
        assert e.cost["model_input_tokens"] == sum(u["prompt_tokens"] for u in usages)
        assert e.cost["model_output_tokens"] == sum(u["completion_tokens"] for u in usages)
        assert [t.api_usage.output_tokens for t in e.turns if t.api_usage] == [
            u["completion_tokens"] for u in usages
        ]
        total += dollars
    assert summary["cost/model_usd"] == pytest.approx(total / N_ITEMS, rel=1e-9)
    assert summary["cost_per_success/model_usd"] == pytest.approx(total / N_ITEMS, rel=1e-9)
    text = console.export_text()
    assert "model cost $" in text and "/success" in text
    # The key is read from the environment, sent, and written nowhere in the run folder.
    for path in run_dir.rglob("*"):
        if path.is_file():
            assert KEY.encode() not in path.read_bytes(), path
    assert KEY not in text
    # API episodes are never a warm start's trajectories, whatever the split.
    assert _stored_episodes(RunSource(path=run_dir, split="any"), set()) == []


FAULTS = {
    0: [Fault("status", 429, retry_after="0.01")],  # resent after retry-after, then answered
    1: [Fault("status", 502), Fault("drop")],  # resent twice, then answered
    2: [Fault("hold", delay_s=30)],  # timeout: not resent
    3: [Fault("malformed_json")],
    4: [Fault("missing_usage")],
    5: [Fault("status", 429)] * 3,  # past max_retries (2)
    6: [Fault("status", 503)] * 3,
    7: [Fault("drop")] * 3,
    8: [Fault("echo_auth")],  # a 401 quoting the key
}
EXPECTED = {
    2: "PolicyTimeoutError",
    3: "PolicyResponseError",
    4: "PolicyResponseError",
    5: "PolicyRateLimitError",
    6: "PolicyStatusError",
    7: "PolicyUnavailableError",
    8: "PolicyStatusError",
}


def test_every_fault_ends_only_its_episode_with_a_typed_stop(
    fake: FakeOpenAI, items: list[TaskItem], tmp_path: Path
) -> None:
    for i, faults in FAULTS.items():
        fake.inject(items[i].question, *faults)
    run_dir = tmp_path / "faults"
    console = Console(width=200, record=True)
    summary = run_eval(config(run_dir, fake.base_url), console, None)
    with RunStore.open_readonly(run_dir) as store:
        episodes = {e.task_id: e for e in store.episodes()}
    for i, it in enumerate(items):
        e = episodes[it.id]
        if i in EXPECTED:
            assert e.stop_reason == StopReason.POLICY_ERROR, (i, e.error)
            assert (e.error or "").startswith(EXPECTED[i]), (i, e.error)
        else:
            assert e.stop_reason == StopReason.ANSWERED, (i, e.error)
            assert e.outcome["correct"] == 1.0
    assert summary["stop/policy_error"] == len(EXPECTED) / N_ITEMS
    rows = [json.loads(line) for line in (run_dir / "eval.jsonl").read_text().splitlines()]
    assert sorted(r["error"].split(":")[0] for r in rows if r["error"]) == sorted(EXPECTED.values())
    assert "ended on a policy error" in console.export_text()
    for path in run_dir.rglob("*"):
        if path.is_file():
            assert KEY.encode() not in path.read_bytes(), path


def test_train_and_sft_refuse_an_api_model(tmp_path: Path) -> None:
    cfg = config(tmp_path / "train", "http://127.0.0.1:1/v1")
    with pytest.raises(ValueError, match="evaluation only"):
        run_train(cfg, Console(width=200, record=True), with_eval=False)
    path = tmp_path / "api.yaml"
    import yaml

    raw = yaml.safe_load((ROOT / "examples" / "tiny.yaml").read_text())
    raw["model"] = overrides(tmp_path / "cli", "http://127.0.0.1:1/v1")["model"]
    raw["run_dir"] = str(tmp_path / "cli")
    path.write_text(yaml.safe_dump(raw))
    for command in ("train", "sft"):
        result = CliRunner().invoke(app, [command, str(path)])
        assert result.exit_code == 2, result.output
        assert "evaluation only" in result.output
    assert not (tmp_path / "cli").exists()


def test_an_unset_key_variable_is_a_clear_error(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.delenv(KEY_ENV, raising=False)
    with pytest.raises(ValueError, match=KEY_ENV):
        run_eval(config(tmp_path / "nokey", "http://127.0.0.1:1/v1"), Console(), None)


def test_the_cli_evaluates_the_example_config_against_the_server(
    fake: FakeOpenAI, tmp_path: Path
) -> None:
    """`turnrl eval examples/openai_eval.yaml`, pointed at the fake server: the summary it
    prints carries the dollars per episode and per success."""
    sets = [
        f"run_dir={tmp_path / 'cli'}",
        f"model.base_url={fake.base_url}",
        f"model.api_key_env={KEY_ENV}",
        "model.model=fake-gpt",
        "task.n_train=40",
        "task.n_test=10",
        "eval.n_items=3",
    ]
    args = ["eval", str(ROOT / "examples" / "openai_eval.yaml")]
    for pair in sets:
        args += ["--set", pair]
    result = CliRunner().invoke(app, args)
    assert result.exit_code == 0, result.output
    summary = json.loads(result.output[result.output.index("{\n") :])
    assert summary["episodes"] == 3 and summary["cost/model_usd"] > 0
    assert summary["cost_per_success/model_usd"] == pytest.approx(
        summary["cost/model_usd"] / summary["success"]
    )
    assert len(fake.answered) >= 3
