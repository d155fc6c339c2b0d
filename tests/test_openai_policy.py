"""`OpenAIPolicy` against a local fake chat-completions server (`fake_openai`): translation of
token contexts into native tool-calling messages and back, pricing from the API's own usage,
and every fault kind (resent only when no reply was received, typed errors otherwise)."""

from __future__ import annotations

import asyncio
import json
from collections.abc import Awaitable, Callable
from typing import Any

import pytest
from fake_openai import FakeOpenAI, Fault, Reply

from turnrl.agent.chat import ChatML, HFTokenizer
from turnrl.agent.model import load_tokenizer, tokenizer_dir
from turnrl.agent.model_config import ApiPrice, OpenAIModel
from turnrl.agent.openai_chat import NATIVE_NOTE, ChatTranslator, ReplyMessage
from turnrl.agent.openai_policy import Ledger, OpenAIPolicy, PolicyRateLimitError
from turnrl.agent.policy import PolicyError, SamplingParams
from turnrl.agent.records import ApiUsage, Episode, StopReason, Turn
from turnrl.agent.vllm_policy import (
    PolicyResponseError,
    PolicyStatusError,
    PolicyTimeoutError,
    PolicyUnavailableError,
)

KEY = "sk-test-0123456789abcdef-secret"
PRICE = ApiPrice(input_per_mtok=0.15, output_per_mtok=0.60, cached_input_per_mtok=0.075)
SEARCH = {
    "name": "search",
    "description": "Search the corpus.",
    "parameters": {"type": "object", "properties": {"query": {"type": "string"}}},
}
QUESTION = "What is the capital of France?"


@pytest.fixture(scope="module")
def renderer() -> ChatML:
    return ChatML(HFTokenizer(load_tokenizer(tokenizer_dir())))


def cfg(server: FakeOpenAI, **kw: Any) -> OpenAIModel:
    options: dict[str, Any] = {
        "model": "fake-gpt",
        "base_url": server.base_url,
        "price": PRICE,
        "backoff_s": 0.01,
        "max_retries": 2,
        "request_timeout_s": 5.0,
    }
    return OpenAIModel.model_validate(options | kw)


def search_then_answer(messages: list[dict[str, Any]]) -> Reply:
    if messages[-1]["role"] == "tool":
        return Reply("<answer>Paris</answer>")
    return Reply(None, (("search", '{"query": "France capital"}'),), "tool_calls")


class Waits:
    """An injected `sleep` that records each wait and does not wait (behaviour, not timing)."""

    def __init__(self) -> None:
        self.waits: list[float] = []

    async def __call__(self, seconds: float) -> None:
        self.waits.append(seconds)


def serve(
    renderer: ChatML,
    test: Callable[[FakeOpenAI, OpenAIPolicy], Awaitable[None]],
    script: Callable[[list[dict[str, Any]]], Reply] = search_then_answer,
    waits: Waits | None = None,
    **options: Any,
) -> FakeOpenAI:
    async def main() -> FakeOpenAI:
        async with FakeOpenAI(script, api_key=KEY) as server:
            policy = OpenAIPolicy(
                cfg(server, **options), renderer, KEY, seed=1, sleep=waits or Waits()
            )
            async with policy:
                await test(server, policy)
            return server

    return asyncio.run(main())


def opening(renderer: ChatML) -> list[int]:
    return renderer.initial("Answer questions.", [SEARCH], QUESTION)


PARAMS = SamplingParams(temperature=0.0, max_tokens=200, seed=7)


# -- translation ----------------------------------------------------------------------------


def test_context_becomes_native_messages_and_tool_results_answer_their_calls(
    renderer: ChatML,
) -> None:
    t = ChatTranslator(renderer)
    examples = [
        ("user", "Q1"),
        ("assistant", '<tool_call>{"name": "search", "arguments": {"query": "x"}}</tool_call>'),
        ("user", "<tool_response>\nresult x\n</tool_response>"),
        ("assistant", "<answer>A</answer>"),
    ]
    ctx = renderer.initial("Answer questions.", [SEARCH], QUESTION, examples)
    reply = ReplyMessage.model_validate(
        {
            "role": "assistant",
            "content": "Let me look.",
            "tool_calls": [
                {"id": "a", "function": {"name": "search", "arguments": '{"query": "France"}'}},
                {"id": "b", "function": {"name": "search", "arguments": "{not json"}},
            ],
        }
    )
    text = t.completion_text(reply)
    assert text == (
        'Let me look.\n<tool_call>{"name": "search", "arguments": {"query": "France"}}'
        '</tool_call>\n<tool_call>{"name": "search", "arguments": "{not json"}</tool_call>'
    )
    ctx += [*renderer.tokenizer.encode(text), renderer.end_of_turn_id()]
    ctx += renderer.observation(["Paris is the capital.", "invalid JSON"], True)
    conv = t.conversation(ctx)
    got = [m.model_dump(exclude_none=True) for m in conv.messages]
    assert got == [
        {"role": "system", "content": f"Answer questions.\n\n{NATIVE_NOTE}"},
        {"role": "user", "content": "Q1"},
        {
            "role": "assistant",
            "tool_calls": [
                {
                    "id": "call_2_0",
                    "type": "function",
                    "function": {"name": "search", "arguments": '{"query": "x"}'},
                }
            ],
        },
        {"role": "tool", "tool_call_id": "call_2_0", "content": "result x"},
        {"role": "assistant", "content": "<answer>A</answer>"},
        {"role": "user", "content": QUESTION},
        {
            "role": "assistant",
            "content": "Let me look.",
            "tool_calls": [
                {
                    "id": "call_6_0",
                    "type": "function",
                    "function": {"name": "search", "arguments": '{"query": "France"}'},
                },
                # Malformed arguments go back as the model wrote them.
                {
                    "id": "call_6_1",
                    "type": "function",
                    "function": {"name": "search", "arguments": "{not json"},
                },
            ],
        },
        {"role": "tool", "tool_call_id": "call_6_0", "content": "Paris is the capital."},
        {"role": "tool", "tool_call_id": "call_6_1", "content": "invalid JSON"},
    ]
    assert conv.tools == [{"type": "function", "function": SEARCH}]


def test_a_format_note_and_tools_revealed_later_are_user_text_and_new_tools(
    renderer: ChatML,
) -> None:
    t = ChatTranslator(renderer)
    ctx = renderer.initial("Answer.", [SEARCH], QUESTION)
    ctx += [*renderer.tokenizer.encode("I think so."), renderer.end_of_turn_id()]
    ctx += renderer.observation(["Error: no <tool_call> and no <answer>"], True)
    ctx += [*renderer.tokenizer.encode("<answer>Paris</answer>"), renderer.end_of_turn_id()]
    lookup = {**SEARCH, "name": "lookup"}
    ctx += renderer.user_turn(renderer.tools_note([lookup]) + "\n\nAnd Spain?", True)
    conv = t.conversation(ctx)
    roles = [(m.role, getattr(m, "content", None)) for m in conv.messages]
    assert roles[2:] == [
        ("assistant", "I think so."),
        ("user", "Error: no <tool_call> and no <answer>"),
        ("assistant", "<answer>Paris</answer>"),
        ("user", renderer.tools_note([lookup]) + "\n\nAnd Spain?"),
    ]
    assert [x["function"]["name"] for x in conv.tools] == ["search", "lookup"]


# -- requests, replies, prices ------------------------------------------------------------


def test_a_turn_is_the_reply_in_call_syntax_priced_from_the_apis_usage(renderer: ChatML) -> None:
    async def test(server: FakeOpenAI, policy: OpenAIPolicy) -> None:
        ctx = opening(renderer)
        c = await policy.generate(ctx, PARAMS)
        text = '<tool_call>{"name": "search", "arguments": {"query": "France capital"}}</tool_call>'
        assert list(c.token_ids) == [*renderer.tokenizer.encode(text), renderer.end_id]
        assert c.finish_reason == "stop" and set(c.logprobs) == {0.0}
        (sent,) = server.answered
        u = sent.usage
        # Hand-priced: fresh input at $0.15/M, cached at $0.075/M, output at $0.60/M.
        cached = u["prompt_tokens_details"]["cached_tokens"]
        dollars = (
            (u["prompt_tokens"] - cached) * 0.15 + cached * 0.075 + u["completion_tokens"] * 0.6
        ) / 1e6
        assert c.metrics["cost_usd"] == pytest.approx(dollars, rel=1e-12)
        assert c.metrics["input_tokens"] == u["prompt_tokens"]
        assert c.metrics["output_tokens"] == u["completion_tokens"]
        payload = server.requests[0]
        assert payload["model"] == "fake-gpt"
        assert payload["max_tokens"] == 200 and payload["temperature"] == 0.0
        assert payload["seed"] == 7
        assert payload["tools"] == [{"type": "function", "function": SEARCH}]
        # The second turn answers the call with the tool's result as a `tool` message.
        ctx += list(c.token_ids) + renderer.observation(["Paris is the capital."], True)
        c2 = await policy.generate(ctx, PARAMS)
        assert renderer.tokenizer.decode(c2.token_ids) == "<answer>Paris</answer><|im_end|>"
        last = server.requests[1]["messages"][-1]
        assert last == {
            "role": "tool",
            "tool_call_id": "call_2_0",
            "content": "Paris is the capital.",
        }
        assert server.protocol_errors == []

    serve(renderer, test)


def test_max_completion_tokens_field_and_no_temperature(renderer: ChatML) -> None:
    async def test(server: FakeOpenAI, policy: OpenAIPolicy) -> None:
        await policy.generate(opening(renderer), PARAMS)
        payload = server.requests[0]
        assert payload["max_completion_tokens"] == 200
        assert "max_tokens" not in payload and "temperature" not in payload

    serve(renderer, test, token_limit_field="max_completion_tokens", send_temperature=False)


def test_a_reply_longer_than_max_tokens_is_cut_there(renderer: ChatML) -> None:
    long = "word " * 100

    async def test(server: FakeOpenAI, policy: OpenAIPolicy) -> None:
        c = await policy.generate(opening(renderer), SamplingParams(max_tokens=10))
        assert len(c.token_ids) == 10 and c.finish_reason == "length"
        assert renderer.end_id not in c.token_ids

    serve(renderer, test, script=lambda _: Reply(long))


def test_price_arithmetic_by_hand() -> None:
    # 1,000 input (400 cached), 200 output: (600 * 0.15 + 400 * 0.075 + 200 * 0.6) / 1e6.
    assert PRICE.dollars(1000, 400, 200) == pytest.approx(0.00024, rel=1e-12)
    plain = ApiPrice(input_per_mtok=1.0, output_per_mtok=2.0)  # cached billed as input
    assert plain.dollars(1000, 400, 200) == pytest.approx(0.0014, rel=1e-12)


# -- faults ----------------------------------------------------------------------------------


def test_429_honours_retry_after_then_the_reply_is_kept(renderer: ChatML) -> None:
    waits = Waits()

    async def test(server: FakeOpenAI, policy: OpenAIPolicy) -> None:
        server.inject(QUESTION, Fault("status", 429, retry_after="2"))
        c = await policy.generate(opening(renderer), PARAMS)
        assert c.metrics["retries"] == 1.0
        assert len(server.requests) == 2 and len(server.answered) == 1

    serve(renderer, test, waits=waits)
    assert waits.waits == [2.0]


def test_429_asking_for_more_than_max_wait_ends_at_once(renderer: ChatML) -> None:
    waits = Waits()

    async def test(server: FakeOpenAI, policy: OpenAIPolicy) -> None:
        server.inject(QUESTION, Fault("status", 429, retry_after="3600"))
        with pytest.raises(PolicyRateLimitError, match=r"exceeds model\.max_wait_s"):
            await policy.generate(opening(renderer), PARAMS)
        assert len(server.requests) == 1

    serve(renderer, test, waits=waits, max_wait_s=30.0)
    assert waits.waits == []


@pytest.mark.parametrize(
    ("fault", "error"),
    [
        (Fault("status", 429), PolicyRateLimitError),
        (Fault("status", 503), PolicyStatusError),
        (Fault("drop"), PolicyUnavailableError),
        (Fault("drop_mid"), PolicyUnavailableError),
    ],
)
def test_no_reply_is_resent_with_backoff_and_persisting_fails_typed(
    renderer: ChatML, fault: Fault, error: type[PolicyError]
) -> None:
    waits = Waits()

    async def test(server: FakeOpenAI, policy: OpenAIPolicy) -> None:
        server.inject(QUESTION, fault)  # once: resent, then answered
        c = await policy.generate(opening(renderer), PARAMS)
        assert c.metrics["retries"] == 1.0
        server.inject(QUESTION, fault, fault, fault)  # max_retries 2: three attempts fail
        with pytest.raises(error):
            await policy.generate(opening(renderer), PARAMS)
        assert len(server.requests) == 2 + 3
        assert len(server.answered) == 1

    serve(renderer, test, waits=waits)
    # Backoff 0.01 s doubling per resend of one request, each wait in [cap / 2, cap].
    caps = [0.01, 0.01, 0.02]
    assert len(waits.waits) == 3
    assert all(c / 2 <= w <= c for w, c in zip(waits.waits, caps, strict=True))


@pytest.mark.parametrize(
    ("fault", "error", "match"),
    [
        (Fault("malformed_json"), PolicyResponseError, "malformed reply"),
        (Fault("missing_usage"), PolicyResponseError, "usage"),
        (Fault("status", 400), PolicyStatusError, "HTTP 400"),
        (Fault("hold", delay_s=30), PolicyTimeoutError, "no response in time"),
    ],
)
def test_a_reply_received_or_a_timeout_is_never_resent(
    renderer: ChatML, fault: Fault, error: type[PolicyError], match: str
) -> None:
    async def test(server: FakeOpenAI, policy: OpenAIPolicy) -> None:
        server.inject(QUESTION, fault)
        with pytest.raises(error, match=match):
            await policy.generate(opening(renderer), PARAMS)
        assert len(server.requests) == 1

    serve(renderer, test, request_timeout_s=0.5)


def test_the_api_key_is_sent_and_never_quoted_in_an_error(renderer: ChatML) -> None:
    async def test(server: FakeOpenAI, policy: OpenAIPolicy) -> None:
        server.inject(QUESTION, Fault("echo_auth"))
        with pytest.raises(PolicyStatusError) as raised:
            await policy.generate(opening(renderer), PARAMS)
        assert KEY not in str(raised.value) and "api_key_env" in str(raised.value)
        assert (await policy.generate(opening(renderer), PARAMS)).token_ids

    serve(renderer, test)


def test_a_wrong_key_is_refused_by_the_server(renderer: ChatML) -> None:
    async def main() -> None:
        async with FakeOpenAI(search_then_answer, api_key=KEY) as server:
            policy = OpenAIPolicy(cfg(server), renderer, "sk-wrong")
            async with policy:
                with pytest.raises(PolicyStatusError, match="401"):
                    await policy.generate(opening(renderer), PARAMS)

    asyncio.run(main())


# -- the ledger -----------------------------------------------------------------------------


def _usage(dollars: float) -> ApiUsage:
    return ApiUsage(input_tokens=10, output_tokens=2, cost_usd=dollars)


def _turn(i: int, prompt: list[int], completion: list[int], obs: list[int]) -> Turn:
    return Turn(
        index=i,
        prompt_ids=prompt,
        completion_ids=completion,
        completion_logprobs=[0.0] * len(completion),
        observation_ids=obs,
        text="",
        finish_reason="stop",
    )


def test_ledger_charges_each_turn_by_its_ids_and_an_orphan_reply_to_its_episode() -> None:
    ledger = Ledger()
    ledger.record([1, 2], [3], _usage(1.0))
    ledger.record([1, 2], [3], _usage(2.0))  # a sibling with the same context and reply
    ledger.record([1, 2, 3, 4], [5], _usage(4.0))  # its turn was never recorded
    a = Episode(
        episode_id="a",
        task_id="t",
        group_id="g",
        stop_reason=StopReason.TIMEOUT,
        turns=[_turn(0, [1, 2], [3], [4])],
        cost={"calls": 1.0},
    )
    b = a.model_copy(update={"episode_id": "b", "cost": {}, "stop_reason": StopReason.ANSWERED})
    b = b.model_copy(update={"turns": [_turn(0, [1, 2], [3], [])]})
    charged_a, charged_b = ledger.charge(a), ledger.charge(b)
    assert len(ledger) == 0
    # Siblings take one entry each (which is which does not matter: the same ids).
    assert {charged_a.turns[0].api_usage, charged_b.turns[0].api_usage} == {
        _usage(1.0),
        _usage(2.0),
    }
    # `a` continued from [1, 2, 3, 4] and holds the orphan reply sent from there.
    orphan = charged_a.cost["model_usd"] - charged_a.turns[0].api_usage.cost_usd  # type: ignore[union-attr]
    assert orphan == 4.0 and charged_a.cost["calls"] == 1.0
    assert charged_a.cost["model_input_tokens"] == 20 and charged_a.cost["model_output_tokens"] == 4
    with pytest.raises(RuntimeError, match="no API reply"):
        ledger.charge(a)


def test_config_refuses_an_unknown_field_and_keeps_the_key_out(tmp_path: Any) -> None:
    with pytest.raises(ValueError, match="api_key"):
        OpenAIModel.model_validate({"model": "m", "price": PRICE, "api_key": KEY})
    dumped = json.dumps(OpenAIModel(model="m", price=PRICE).model_dump(mode="json"))
    assert "OPENAI_API_KEY" in dumped


def test_an_https_endpoint_is_reached_over_tls(renderer: ChatML, tmp_path: Any) -> None:
    """A self-signed certificate for 127.0.0.1, trusted by the client's context: the request
    and reply travel over TLS (a plain-HTTP client could not read the reply)."""
    import shutil
    import ssl
    import subprocess

    if shutil.which("openssl") is None:
        pytest.skip("no openssl command to make a certificate")
    cert, key = tmp_path / "cert.pem", tmp_path / "key.pem"
    make = "req -x509 -newkey rsa:2048 -nodes -days 1 -subj /CN=127.0.0.1"
    san = ["-addext", "subjectAltName=IP:127.0.0.1"]
    subprocess.run(
        ["openssl", *make.split(), "-keyout", str(key), "-out", str(cert), *san],
        check=True,
        capture_output=True,
    )
    server_tls = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    server_tls.load_cert_chain(cert, key)
    client_tls = ssl.create_default_context(cafile=str(cert))

    async def main() -> None:
        async with FakeOpenAI(search_then_answer, api_key=KEY, tls=server_tls) as server:
            assert server.base_url.startswith("https://")
            policy = OpenAIPolicy(cfg(server), renderer, KEY, tls=client_tls)
            async with policy:
                c = await policy.generate(opening(renderer), PARAMS)
            assert "search" in renderer.tokenizer.decode(c.token_ids)
            assert len(server.answered) == 1

    asyncio.run(main())
