"""Tool-call parsing: well-formed calls, every malformed shape, tags inside a call's JSON
strings, hostile shapes, and fuzz tests."""

import json

from hypothesis import given, settings
from hypothesis import strategies as st

from turnrl.agent.parse import MAX_CALL_CHARS, parse_completion


def test_single_call_keeps_raw_text() -> None:
    raw = ' {"name": "search", "arguments": {"query": "capital of France", "k": 3}} '
    p = parse_completion(f"Let me look.<tool_call>{raw}</tool_call>", 0)
    assert p.format_error is None and p.answer is None
    (call,) = p.tool_calls
    assert call.id == "t0c0" and call.name == "search"
    assert call.raw == raw
    assert call.arguments == {"query": "capital of France", "k": 3}


def test_several_calls_in_one_turn() -> None:
    text = (
        '<tool_call>{"name": "a", "arguments": {}}</tool_call>\n'
        '<tool_call>{"name": "b", "arguments": "{\\"x\\": 1}"}</tool_call>'
    )
    p = parse_completion(text, 2)
    assert [c.name for c in p.tool_calls] == ["a", "b"]
    assert [c.id for c in p.tool_calls] == ["t2c0", "t2c1"]
    assert p.tool_calls[1].arguments == {"x": 1}
    assert p.format_error is None


def test_answer() -> None:
    p = parse_completion("I know. <answer> Paris </answer><|im_end|>", 1)
    assert p.answer == "Paris" and p.tool_calls == [] and p.format_error is None


def test_malformed_calls_become_errors_not_exceptions() -> None:
    cases = {
        "<tool_call>{not json}</tool_call>": "invalid JSON",
        "<tool_call>[1, 2]</tool_call>": "JSON object",
        '<tool_call>{"arguments": {}}</tool_call>': '"name"',
        '<tool_call>{"name": "a", "arguments": [1]}</tool_call>': "must be a JSON object",
        '<tool_call>{"name": "a", "arguments": "{bad"}</tool_call>': "not JSON",
    }
    for text, fragment in cases.items():
        p = parse_completion(text, 0)
        (call,) = p.tool_calls
        assert call.parse_error is not None and fragment in call.parse_error, text
        assert p.format_error is not None and fragment in p.format_error


def test_unterminated_tags_and_void_turns_are_format_errors() -> None:
    assert "unterminated <tool_call>" in (
        parse_completion('<tool_call>{"name"', 0).format_error or ""
    )
    p = parse_completion("<answer>Par", 0)
    assert p.answer is None and "unterminated <answer>" in (p.format_error or "")
    assert "no <tool_call> and no <answer>" in (parse_completion("hmm", 0).format_error or "")
    assert "without a matching" in (parse_completion("x</tool_call>", 0).format_error or "")


def test_answer_with_calls_answers_and_flags() -> None:
    p = parse_completion('<tool_call>{"name": "a"}</tool_call><answer>x</answer>', 0)
    assert p.answer == "x" and p.tool_calls == []
    assert "same turn" in (p.format_error or "")


def test_huge_arguments_are_refused_unparsed() -> None:
    huge = '{"name": "a", "arguments": {"q": "' + "x" * (MAX_CALL_CHARS + 10) + '"}}'
    (call,) = parse_completion(f"<tool_call>{huge}</tool_call>", 0).tool_calls
    assert call.arguments is None and "limit" in (call.parse_error or "")
    assert len(call.raw) == MAX_CALL_CHARS


def test_deeply_nested_json_does_not_escape() -> None:
    deep = "[" * 5000 + "]" * 5000
    p = parse_completion(f'<tool_call>{{"name": "a", "arguments": {deep}}}</tool_call>', 0)
    assert p.format_error is not None


_pieces = st.sampled_from(
    [
        "<tool_call>",
        "</tool_call>",
        "<answer>",
        "</answer>",
        '{"name": "search", ',
        '"arguments": {"query": "x"}}',
        "{",
        "}",
        '"',
        "\\",
        "\x00",
        "\ufffd",
        "[",
        "]",
        "null",
    ]
)


@settings(max_examples=400, deadline=None)
@given(st.lists(st.one_of(_pieces, st.text(max_size=20)), max_size=30))
def test_fuzz_no_input_escapes(parts: list[str]) -> None:
    text = "".join(parts)
    p = parse_completion(text, 0)
    # Every outcome is one of: an answer, calls, or a format error explaining why neither.
    assert p.answer is not None or p.tool_calls or p.format_error
    for c in p.tool_calls:
        assert (c.arguments is None) == (c.parse_error is not None) or c.name is None


# --- a call's content is read as JSON (a tag inside a string does not end the call) -----------


def _call(code: str, ensure_ascii: bool = True) -> str:
    args = {"name": "python", "arguments": {"code": code}}
    return f"<tool_call>{json.dumps(args, ensure_ascii=ensure_ascii)}</tool_call>"


def test_tags_inside_a_json_string_do_not_end_the_call() -> None:
    code = "print('</tool_call>')\nprint('<answer>x</answer>')\n# <tool_call>"
    p = parse_completion("Let me run it. " + _call(code), 0)
    assert p.format_error is None and p.answer is None
    (call,) = p.tool_calls
    assert call.name == "python" and call.arguments == {"code": code}


def test_a_call_holding_tags_then_a_second_call() -> None:
    text = _call("s = '</tool_call><tool_call>'") + '\n<tool_call>{"name": "b"}</tool_call>'
    p = parse_completion(text, 0)
    assert [c.name for c in p.tool_calls] == ["python", "b"]
    assert p.tool_calls[0].arguments == {"code": "s = '</tool_call><tool_call>'"}
    assert p.format_error is None


def test_an_answer_after_a_call_holding_an_answer_is_the_answer() -> None:
    p = parse_completion(_call("print('<answer>no</answer>')") + "<answer>yes</answer>", 0)
    assert p.answer == "yes"
    assert "same turn" in (p.format_error or "")


def test_malformed_json_is_cut_at_the_first_close_and_reported() -> None:
    """Not JSON, so the textual reading: the call ends at the first `</tool_call>`, the rest
    is a stray closing tag, and both are reported."""
    text = '<tool_call>{"name": "a", "q": "x</tool_call>" oops }</tool_call>'
    p = parse_completion(text, 0)
    (call,) = p.tool_calls
    assert call.raw == '{"name": "a", "q": "x'
    assert "invalid JSON" in (call.parse_error or "")
    assert "without a matching" in (p.format_error or "")


def test_later_calls_after_malformed_json_are_still_parsed() -> None:
    text = '<tool_call>{"name": "a", "q": "x</tool_call>"</tool_call>'
    text += '<tool_call>{"name": "b"}</tool_call>'
    names = [c.name for c in parse_completion(text, 0).tool_calls]
    assert names[-1] == "b"


def test_a_call_cut_off_inside_a_string_keeps_its_answer_tags() -> None:
    """Out of tokens inside the code: what follows `<tool_call>` is that call's argument."""
    text = '<tool_call>{"name": "python", "arguments": {"code": "print(\'<answer>5</answer>\')'
    p = parse_completion(text, 0)
    assert p.answer is None and p.tool_calls == []
    assert "unterminated <tool_call>" in (p.format_error or "")


def test_a_complete_call_missing_its_close_tag_then_an_answer() -> None:
    """The JSON ended, so the answer after it is outside the call (as before)."""
    p = parse_completion('<tool_call>{"name": "a"}\n<answer>2</answer>', 0)
    assert p.answer == "2" and "unterminated <tool_call>" in (p.format_error or "")


def test_an_oversized_call_holding_an_answer_is_refused_whole() -> None:
    code = "x = 1\n" * MAX_CALL_CHARS + "print('</tool_call><answer>9</answer>')"
    p = parse_completion(_call(code), 0)
    assert p.answer is None
    (call,) = p.tool_calls
    assert "limit" in (call.parse_error or "") and len(call.raw) == MAX_CALL_CHARS


def test_hostile_shapes_parse_in_linear_time() -> None:
    """Each shape took a quadratic parser minutes at this size (runs of opening tags, answers
    that never close, strings left open call after call); here each is one pass."""
    n = 20_000
    shapes = {
        "<tool_call>" * n: "unterminated <tool_call>",
        "</answer>" + "<answer>" * n: "unterminated <answer>",
        '<tool_call>"</tool_call>' * n: "expected a JSON object",
        "<tool_call>" + '"\\"' * n: "unterminated <tool_call>",
    }
    for text, fragment in shapes.items():
        assert fragment in (parse_completion(text, 0).format_error or "")


_code = st.lists(
    st.one_of(
        st.text(max_size=8),
        st.sampled_from(["</tool_call>", "<tool_call>", "<answer>", "</answer>", '"', "\\"]),
    ),
    max_size=12,
).map("".join)


@settings(max_examples=300, deadline=None)
@given(_code, st.booleans())
def test_fuzz_any_code_argument_round_trips(code: str, ensure_ascii: bool) -> None:
    """Whatever the code holds, a call written with `json.dumps` is one call with that code,
    and its tags are never the turn's answer or a format error."""
    p = parse_completion(_call(code, ensure_ascii), 0)
    assert p.format_error is None and p.answer is None
    (call,) = p.tool_calls
    assert call.arguments == {"code": code}
