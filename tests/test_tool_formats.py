"""Tool-call formats (`agent.tool_formats`): each writes calls that it parses back, reads what
models of its family write, and reports malformed turns as format errors, never raising."""

from __future__ import annotations

from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from turnrl.agent.chat import CALL_SYNTAX
from turnrl.agent.parse import parse_completion
from turnrl.agent.records import ToolCall
from turnrl.agent.tool_formats import (
    Hermes,
    Llama3Json,
    Mistral,
    ToolFormat,
    make_tool_format,
    rewrite_hermes,
)

FORMATS: dict[str, ToolFormat] = {
    "hermes": Hermes(),
    "llama3_json": Llama3Json(("<|eot_id|>", "<|eom_id|>")),
    "mistral": Mistral(("</s>",)),
}
END = {"hermes": "<|im_end|>", "llama3_json": "<|eot_id|>", "mistral": "</s>"}


def _call(name: str, **arguments: Any) -> ToolCall:
    return ToolCall(id="x", name=name, raw="", arguments=arguments)


@pytest.mark.parametrize("fmt", list(FORMATS))
@pytest.mark.parametrize("n", [1, 2])
def test_written_calls_parse_back(fmt: str, n: int) -> None:
    calls = [
        _call("search", query='Paris "city" </tool_call> [TOOL_CALLS]', k=3),
        _call("python", code="print('<answer>no</answer>')\n"),
    ][:n]
    text = FORMATS[fmt].write_calls(calls) + END[fmt]
    parsed = FORMATS[fmt].parse(text, 4)
    assert parsed.format_error is None and parsed.answer is None
    assert [(c.id, c.name, c.arguments) for c in parsed.tool_calls] == [
        (f"t4c{i}", c.name, c.arguments) for i, c in enumerate(calls)
    ]


@pytest.mark.parametrize("fmt", list(FORMATS))
def test_answers_and_malformed_turns(fmt: str) -> None:
    f = FORMATS[fmt]
    assert f.parse(f"I know. <answer> Paris </answer>{END[fmt]}", 0).answer == "Paris"
    assert "no " in (f.parse(f"hmm{END[fmt]}", 0).format_error or "")
    assert "unterminated <answer>" in (f.parse("<answer>Par", 0).format_error or "")


@pytest.mark.parametrize("fmt", list(FORMATS))
def test_call_attempts_left_unrun_are_counted(fmt: str) -> None:
    """`calls_not_run`: calls beside an answer are attempts the turn does not run, whatever
    the format; a cut-off call is one too (hermes), or a call with a `parse_error` (the JSON
    formats, whose call runs as a parse error)."""
    f = FORMATS[fmt]
    calls = f.write_calls([_call("a", x=1), _call("b")])
    assert f.parse(calls + END[fmt], 0).calls_not_run == 0
    beside = f.parse(calls + "<answer>x</answer>" + END[fmt], 0)
    assert (beside.answer, beside.tool_calls, beside.calls_not_run) == ("x", [], 2)
    assert f.parse("<answer>x</answer>" + END[fmt], 0).calls_not_run == 0
    cut = f.parse(calls[: len(calls) // 4], 0)
    assert cut.format_error is not None
    assert cut.calls_not_run == (1 if fmt == "hermes" else 0)
    errors = [c.parse_error is not None for c in cut.tool_calls]
    assert errors == ([] if fmt == "hermes" else [True])


def test_llama3_json_reads_what_llama_writes() -> None:
    f = FORMATS["llama3_json"]
    (call,) = f.parse('<|python_tag|>{"name": "a", "parameters": {"x": 1}}<|eom_id|>', 0).tool_calls
    assert (call.name, call.arguments, call.raw) == (
        "a",
        {"x": 1},
        '{"name": "a", "parameters": {"x": 1}}',
    )
    # "arguments" is accepted too; a list holds several calls, each keeping its exact text.
    parsed = f.parse(
        ' [{"name": "a", "arguments": {}} , {"name": "b", "parameters": {"y": "z"}}]', 1
    )
    assert [(c.id, c.name, c.raw) for c in parsed.tool_calls] == [
        ("t1c0", "a", '{"name": "a", "arguments": {}}'),
        ("t1c1", "b", '{"name": "b", "parameters": {"y": "z"}}'),
    ]
    bad = f.parse('{"name": "a", "parameters": ', 0)
    assert "invalid JSON" in (bad.format_error or "") and bad.tool_calls[0].parse_error
    assert "must be a JSON object" in (
        f.parse('{"name": "a", "parameters": 3}', 0).format_error or ""
    )
    assert "text after the tool calls" in (f.parse('{"name": "a"} and more', 0).format_error or "")
    both = f.parse('{"name": "a"} <answer>x</answer>', 0)
    assert both.answer == "x" and not both.tool_calls and "same turn" in (both.format_error or "")
    huge = f.parse('{"name": "a", "parameters": {"s": "' + "x" * 200_000 + '"}}', 0)
    assert "the limit is" in (huge.format_error or "")


def test_mistral_reads_what_mistral_writes() -> None:
    f = FORMATS["mistral"]
    text = 'Let me look. [TOOL_CALLS] [{"name": "a", "arguments": {"q": "x"}}]</s>'
    (call,) = f.parse(text, 2).tool_calls
    assert (call.id, call.name, call.arguments) == ("t2c0", "a", {"q": "x"})
    assert "an empty list" in (f.parse("[TOOL_CALLS] []", 0).format_error or "")
    assert "expected ','" in (
        f.parse('[TOOL_CALLS] [{"name": "a"} {"name": "b"}]', 0).format_error or ""
    )
    both = f.parse('<answer>x</answer>[TOOL_CALLS] [{"name": "a"}]', 0)
    assert both.answer == "x" and "same turn" in (both.format_error or "")


def test_hermes_is_the_existing_parser_and_syntax() -> None:
    """Regression lock: the default format is `parse_completion` and ChatML's CALL_SYNTAX."""
    text = '<tool_call>{"name": "a", "arguments": {"s": "</tool_call>"}}</tool_call><|im_end|>'
    assert Hermes().parse(text, 3) == parse_completion(text, 3)
    assert Hermes().syntax() == CALL_SYNTAX
    assert isinstance(make_tool_format("hermes"), Hermes)
    assert isinstance(make_tool_format("mistral", ["</s>"]), Mistral)


def test_gold_replies_are_rewritten_in_the_format() -> None:
    gold = '<tool_call>{"name": "search", "arguments": {"query": "Paris"}}</tool_call>'
    assert rewrite_hermes(gold, FORMATS["hermes"]) == gold
    assert rewrite_hermes(gold, FORMATS["llama3_json"]) == (
        '{"name": "search", "parameters": {"query": "Paris"}}'
    )
    assert rewrite_hermes(gold, FORMATS["mistral"]).startswith("[TOOL_CALLS] [")
    for kept in ("<answer>Paris</answer>", "<tool_call>{broken</tool_call>"):
        assert rewrite_hermes(kept, FORMATS["mistral"]) == kept


@settings(max_examples=150, deadline=None)
@given(st.text(alphabet='{}[]",:<>/ abn_\\|TOLCS', max_size=60), st.sampled_from(list(FORMATS)))
def test_parsing_never_raises(text: str, fmt: str) -> None:
    parsed = FORMATS[fmt].parse(text, 0)
    assert parsed.answer is not None or parsed.tool_calls or parsed.format_error
