"""From a task config to a live suite (with its tools and sandbox), and the oracle policy.

The oracle plays each item's gold solution through the real pipeline: it calls the suite's
tool first (the search that finds the evidence, the Python that runs the reference solution
against the tests), reads nothing from the response, then answers with the gold answer. An
oracle that does not score 100% points at a broken tool, sandbox, parser or grader.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Sequence

from turnrl.agent.chat import Tokenizer
from turnrl.agent.scripted import Script
from turnrl.config import TaskConfig
from turnrl.sandboxes.base import Sandbox
from turnrl.tasks.base import TaskItem, TaskSuite
from turnrl.tools.python import PythonTool

Encode = Callable[[str], Sequence[int]]


def needs_sandbox(cfg: TaskConfig) -> bool:
    """Whether the suite runs code (in its tools or its grader)."""
    return cfg.kind in ("humaneval", "gsm_symbolic")


def build_suite(cfg: TaskConfig, encode: Encode | None, sandbox: Sandbox | None) -> TaskSuite:
    """The configured suite; `sandbox` is required when `needs_sandbox(cfg)`. Without `encode`
    (re-grading a stored run) the suite's tools are not built."""
    if cfg.kind == "search_qa":
        from turnrl.tasks.search_qa import SearchQA

        return SearchQA(
            seed=cfg.seed,
            n_train=cfg.n_train,
            n_test=cfg.n_test,
            encode=encode,
            search_k=cfg.search_k,
            result_tokens=cfg.result_tokens,
        )
    if sandbox is None:
        raise ValueError(f"task {cfg.kind!r} runs code and needs a sandbox")
    tool = None
    if cfg.python is not None and encode is not None:
        tool = PythonTool(
            sandbox,
            encode,
            max_tokens=cfg.python.max_tokens,
            stateful=cfg.python.stateful,
            limits=cfg.python.limits,
        )
    if cfg.kind == "humaneval":
        from turnrl.tasks.humaneval import HumanEval

        return HumanEval(sandbox=sandbox, python_tool=tool, seed=cfg.seed, timeout_s=cfg.timeout_s)
    from turnrl.tasks.math_python import MathPython

    return MathPython(seed=cfg.seed, n_train=cfg.n_train, n_test=cfg.n_test, python_tool=tool)


def oracle_turns(suite: TaskSuite, item: TaskItem) -> list[str]:
    """The replies the oracle gives for `item`, turn by turn."""
    tools = {t.spec.name for t in suite.tools()}
    answer = item.answers[0]
    call: dict[str, object] | None = None
    if suite.name == "humaneval":
        prompt, test, entry = (str(item.meta[k]) for k in ("prompt", "test", "entry_point"))
        # The full function as the answer: robust to the answer's surrounding whitespace
        # being stripped, which a body-only completion is not.
        answer = prompt + answer
        code = f"{answer}\n{test}\ncheck({entry})\nprint('all tests passed')"
        call = {"name": "python", "arguments": {"code": code}}
    elif "python" in tools:
        call = {"name": "python", "arguments": {"code": f"print({answer!r})"}}
    elif "search" in tools and "evidence_query" in item.meta:
        call = {"name": "search", "arguments": {"query": str(item.meta["evidence_query"])}}
    turns = []
    if call is not None and call["name"] in tools:
        turns.append(f"<tool_call>{json.dumps(call)}</tool_call>")
    turns.append(f"<answer>{answer}</answer>")
    return turns


def oracle_script(suite: TaskSuite, tokenizer: Tokenizer, end_of_turn: str) -> Script:
    """A `ScriptedPolicy` script: finds the item whose question the context ends with (the
    last one in it: few-shot examples come first) and plays its turns."""
    items = [it for split in ("train", "test") for it in suite.items(split)]
    turns = {it.question: oracle_turns(suite, it) for it in items}

    def script(context: Sequence[int]) -> str:
        text = tokenizer.decode(list(context))
        best, where = None, -1
        for question in turns:
            at = text.rfind(question)
            if at > where:
                best, where = question, at
        if best is None:
            return f"I cannot tell which item this is.{end_of_turn}"
        index = max(text.count("<|im_start|>assistant", where) - 1, 0)
        plan = turns[best]
        return plan[min(index, len(plan) - 1)] + end_of_turn

    return script
