"""`VLLMPolicy` and its HTTP client against a local fake vLLM server (`fake_vllm`)."""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable
from typing import Any

import pytest
from fake_vllm import VOCAB, FakeVLLM, Fault, default_rule, logprob_of
from fakes import CharTokenizer, EchoTool

from turnrl.agent.chat import ChatML
from turnrl.agent.http import HTTPClient, HTTPStatusError
from turnrl.agent.policy import PolicyError, SamplingParams
from turnrl.agent.records import StopReason
from turnrl.agent.runner import Budget, EpisodeRunner, EpisodeSpec
from turnrl.agent.vllm_policy import (
    PolicyResponseError,
    PolicyStatusError,
    PolicyTimeoutError,
    PolicyUnavailableError,
    VLLMPolicy,
    WeightSyncError,
)

TOK = CharTokenizer()
EOT = 2  # CharTokenizer's <|im_end|>
CALL = '<tool_call>{"name": "echo", "arguments": {"text": "hi"}}</tool_call><|im_end|>'
ANSWER = "<answer>42</answer><|im_end|>"
PROMPT = [5, 6, 7, 10]  # the default rule emits 8 ids for it


def serve(
    test: Callable[[FakeVLLM, VLLMPolicy], Awaitable[None]],
    *,
    rule: Callable[[list[int], str], list[int]] = default_rule,
    **policy_kwargs: Any,
) -> FakeVLLM:
    """Run `test` with a fresh server and a policy pointed at it; returns the server."""

    async def main() -> FakeVLLM:
        async with FakeVLLM(rule) as server:
            kwargs: dict[str, Any] = {"vocab_size": VOCAB, **policy_kwargs}
            async with VLLMPolicy(server.url, server.model, **kwargs) as policy:
                async with asyncio.timeout(60):  # a hang fails the test
                    await test(server, policy)
        return server

    return asyncio.run(main())


def expected(prompt: list[int], weights: str) -> tuple[tuple[int, ...], tuple[float, ...]]:
    ids = default_rule(prompt, weights)
    return tuple(ids), tuple(logprob_of(t, i) for i, t in enumerate(ids))


# -- completions ------------------------------------------------------------------------------


def test_completion_is_exactly_what_the_server_sent() -> None:
    async def test(server: FakeVLLM, policy: VLLMPolicy) -> None:
        params = SamplingParams(max_tokens=16, seed=3, stop_token_ids=(999,))
        c = await policy.generate(PROMPT, params)
        ids, logprobs = expected(PROMPT, "base")
        assert (c.token_ids, c.logprobs) == (ids, logprobs)
        assert server.replies == [(list(ids), list(logprobs))]
        assert c.finish_reason == "stop" and c.policy_version == 0
        sent = server.completions[0]
        assert sent["prompt"] == PROMPT and sent["model"] == "fake-model"
        assert sent["max_tokens"] == 16 and sent["seed"] == 3
        assert sent["stop_token_ids"] == [999, 77]  # the request's, then the policy's end ids
        assert (sent["logprobs"], sent["return_token_ids"]) == (0, True)
        assert sent["return_tokens_as_token_ids"] is True
        assert (sent["temperature"], sent["top_p"], sent["top_k"]) == (1.0, 1.0, 0)

    serve(test, end_token_ids=(77,))


def test_max_tokens_and_stop_ids_end_the_completion() -> None:
    ids, _ = expected(PROMPT, "base")
    assert len(ids) >= 3, "the prompt must make the rule emit at least 3 ids"

    async def test(server: FakeVLLM, policy: VLLMPolicy) -> None:
        cut = await policy.generate(PROMPT, SamplingParams(max_tokens=2))
        assert cut.token_ids == ids[:2] and cut.finish_reason == "length"
        stop = await policy.generate(PROMPT, SamplingParams(stop_token_ids=(ids[1],)))
        assert stop.token_ids == ids[:2] and stop.finish_reason == "stop"

    serve(test)


def test_chunked_response_is_read() -> None:
    async def test(server: FakeVLLM, policy: VLLMPolicy) -> None:
        server.inject(Fault("chunked"))
        c = await policy.generate(PROMPT, SamplingParams())
        assert (c.token_ids, c.logprobs) == expected(PROMPT, "base")
        again = await policy.generate(PROMPT, SamplingParams())  # the connection is reusable
        assert again.token_ids == c.token_ids and server.connections == 1

    serve(test)


@pytest.mark.parametrize(
    ("fault", "error"),
    [
        (Fault("delay", delay_s=30.0), PolicyTimeoutError),
        (Fault("status", status=429), PolicyStatusError),
        (Fault("status", status=500), PolicyStatusError),
        (Fault("malformed_json"), PolicyResponseError),
        (Fault("truncated"), PolicyUnavailableError),
        (Fault("drop"), PolicyUnavailableError),
        (Fault("drop_mid"), PolicyUnavailableError),
        (Fault("short_logprobs"), PolicyResponseError),
        (Fault("nan_logprob"), PolicyResponseError),
        (Fault("positive_logprob"), PolicyResponseError),
        (Fault("null_logprob"), PolicyResponseError),
        (Fault("bad_id"), PolicyResponseError),
        (Fault("bad_tokens"), PolicyResponseError),
        (Fault("wrong_prompt"), PolicyResponseError),
        (Fault("abort"), PolicyResponseError),
        (Fault("two_choices"), PolicyResponseError),
    ],
    ids=lambda x: getattr(x, "kind", None) or getattr(x, "__name__", ""),
)
def test_each_fault_is_a_policy_error_sent_once(fault: Fault, error: type[PolicyError]) -> None:
    async def test(server: FakeVLLM, policy: VLLMPolicy) -> None:
        server.inject(fault)
        with pytest.raises(error) as info:
            await policy.generate(PROMPT, SamplingParams())
        if isinstance(info.value, PolicyStatusError):
            assert info.value.status == fault.status and "injected" in str(info.value)
        assert len(server.completions) == 1 and policy.http.n_sent == 1  # never resent
        # The pool recovers: the next request gets a good answer.
        c = await policy.generate(PROMPT, SamplingParams())
        assert c.token_ids == expected(PROMPT, "base")[0]
        assert len(server.completions) == 2

    serve(test, timeout_s=5.0)


def test_dead_server_is_a_policy_error() -> None:
    async def main() -> None:
        server = await FakeVLLM().start()
        url = server.url
        await server.close()
        async with VLLMPolicy(url, "fake-model") as policy:
            assert not await policy.health()
            with pytest.raises(PolicyUnavailableError):
                await policy.generate(PROMPT, SamplingParams())

    asyncio.run(main())


def test_server_closing_an_idle_connection_is_not_a_failure() -> None:
    async def test(server: FakeVLLM, policy: VLLMPolicy) -> None:
        server.inject(Fault("close_after"))
        await policy.generate(PROMPT, SamplingParams())
        idle = policy.http._idle[0]
        # Wait for the server's FIN to arrive (reading at the end of a stream gives b"").
        assert await asyncio.wait_for(idle.reader.read(1), 10) == b""
        assert not idle.usable()
        c = await policy.generate(PROMPT, SamplingParams())
        assert c.token_ids == expected(PROMPT, "base")[0]
        assert server.connections == 2 and len(server.completions) == 2
        assert policy.http.n_sent == 2

    serve(test, max_connections=1)


def test_only_idempotent_requests_are_resent_after_a_lost_response() -> None:
    async def main() -> None:
        async with FakeVLLM() as server, HTTPClient("127.0.0.1", server.port) as http:
            body = b'{"model":"fake-model","prompt":[5],"max_tokens":4}'
            server.inject(Fault("drop"))
            response = await http.request("POST", "/v1/completions", body, idempotent=True)
            assert response.status == 200 and len(server.completions) == 2
            server.inject(Fault("status", status=503))
            with pytest.raises(HTTPStatusError) as info:
                await http.post_json("/v1/completions", {"model": "fake-model", "prompt": [5]})
            assert info.value.status == 503 and len(server.completions) == 3

    asyncio.run(main())


def test_invalid_requests_are_refused_before_sending() -> None:
    async def test(server: FakeVLLM, policy: VLLMPolicy) -> None:
        for prompt, params in [
            ([], SamplingParams()),
            ([VOCAB], SamplingParams()),
            (PROMPT, SamplingParams(temperature=0.7)),  # raw logprobs cannot score it
            (PROMPT, SamplingParams(max_tokens=100)),  # past max_model_len
        ]:
            with pytest.raises(ValueError):
                await policy.generate(prompt, params)
        assert server.completions == []

    serve(test, max_model_len=64)


def test_processed_logprobs_allow_temperature_but_not_top_p() -> None:
    async def test(server: FakeVLLM, policy: VLLMPolicy) -> None:
        await policy.generate(PROMPT, SamplingParams(temperature=0.7))
        assert server.completions[0]["temperature"] == 0.7
        with pytest.raises(ValueError):
            await policy.generate(PROMPT, SamplingParams(top_p=0.9))

    serve(test, logprobs_mode="processed_logprobs")


# -- through the episode runner ---------------------------------------------------------------


def agent_rule(prompt: list[int], weights: str) -> list[int]:
    """A tool call first, then the answer: system and user end with EOT, then 2 per turn."""
    return TOK.encode(CALL if prompt.count(EOT) < 4 else ANSWER, parse_special=True)


def runner(policy: VLLMPolicy) -> EpisodeRunner:
    return EpisodeRunner(
        policy, ChatML(TOK), [EchoTool()], Budget(max_context_tokens=100_000), SamplingParams()
    )


def spec(i: int) -> EpisodeSpec:
    return EpisodeSpec(f"e{i}", "g", "t", "Be brief.", "Q?", seed=1000 * i)


def test_episode_turns_keep_the_ids_the_server_sampled() -> None:
    async def test(server: FakeVLLM, policy: VLLMPolicy) -> None:
        ep = await runner(policy).run_episode(spec(1))
        assert ep.stop_reason == StopReason.ANSWERED and ep.answer == "42"
        assert [(t.completion_ids, t.completion_logprobs) for t in ep.turns] == server.replies
        assert [t.finish_reason for t in ep.turns] == ["stop", "stop"]
        # Each request's prompt is the episode's exact context before that turn.
        ids = ep.token_ids()
        offset = 0
        for turn, sent in zip(ep.turns, server.completions, strict=True):
            offset += len(turn.prompt_ids)
            assert sent["prompt"] == ids[:offset]
            offset += len(turn.completion_ids) + len(turn.observation_ids)

    serve(test, rule=agent_rule, vocab_size=None)


def test_faults_end_their_episode_with_policy_error_and_the_run_goes_on() -> None:
    async def test(server: FakeVLLM, policy: VLLMPolicy) -> None:
        server.inject(Fault("status", status=500), seed=3000)  # episode 3, turn 0
        server.inject(Fault("drop"), seed=5001)  # episode 5, turn 1
        server.inject(Fault("short_logprobs"), seed=6001)  # episode 6, turn 1
        episodes = await runner(policy).run_many([spec(i) for i in range(8)], concurrency=8)
        stops = {e.episode_id: e.stop_reason for e in episodes}
        failed = {"e3", "e5", "e6"}
        assert {k for k, v in stops.items() if v == StopReason.POLICY_ERROR} == failed
        assert all(v == StopReason.ANSWERED for k, v in stops.items() if k not in failed)
        errors = {e.episode_id: e.error or "" for e in episodes}
        assert "PolicyStatusError" in errors["e3"] and "500" in errors["e3"]
        assert "PolicyUnavailableError" in errors["e5"]
        assert "PolicyResponseError" in errors["e6"]
        # One request per turn: 5 answered episodes x 2, e3 x 1, e5 and e6 x 2.
        seeds = [c["seed"] for c in server.completions]
        assert len(seeds) == len(set(seeds)) == 5 * 2 + 1 + 2 + 2

    serve(test, rule=agent_rule, vocab_size=None)


def test_64_concurrent_episodes_share_the_pool() -> None:
    async def test(server: FakeVLLM, policy: VLLMPolicy) -> None:
        specs = [spec(i) for i in range(128)]
        episodes = await runner(policy).run_many(specs, concurrency=64)
        assert all(e.stop_reason == StopReason.ANSWERED for e in episodes)
        assert len(server.completions) == 2 * 128
        assert server.connections <= 8

    serve(test, rule=agent_rule, vocab_size=None, max_connections=8)


# -- weight sync ------------------------------------------------------------------------------

SYNC_CALLS = ["POST /pause", "POST /collective_rpc", "POST /reset_prefix_cache", "POST /resume"]


def test_full_reload_waits_for_in_flight_requests_and_stamps_versions() -> None:
    async def test(server: FakeVLLM, policy: VLLMPolicy) -> None:
        old = [[10 + i, 11, 12] for i in range(4)]
        for i in range(4):
            server.inject(Fault("hold"), seed=i)
        in_flight = [
            asyncio.create_task(policy.generate(p, SamplingParams(seed=i)))
            for i, p in enumerate(old)
        ]
        await asyncio.wait_for(server.received(4), 10)
        update = asyncio.create_task(policy.update_weights("/ckpt/1", 1))
        await asyncio.sleep(0.05)
        assert "POST /pause" not in server.log  # the 4 are still being sampled
        new = [[20 + i, 21] for i in range(2)]
        later = [
            asyncio.create_task(policy.generate(p, SamplingParams(seed=10 + i)))
            for i, p in enumerate(new)
        ]
        await asyncio.sleep(0.05)
        assert len(server.completions) == 4  # held until the update ends
        server.release.set()
        await update
        done_old = await asyncio.gather(*in_flight)
        done_new = await asyncio.gather(*later)
        assert [c.policy_version for c in done_old] == [0] * 4
        assert [c.token_ids for c in done_old] == [expected(p, "base")[0] for p in old]
        assert [c.policy_version for c in done_new] == [1, 1]
        assert [c.token_ids for c in done_new] == [expected(p, "/ckpt/1")[0] for p in new]
        log = server.log
        sync = [line for line in log if line in SYNC_CALLS]
        assert sync == SYNC_CALLS
        first_sync, last_sync = log.index(SYNC_CALLS[0]), log.index(SYNC_CALLS[-1])
        assert all(log.index(f"done {i}") < first_sync for i in range(4))
        assert all(log.index(f"done {10 + i}") > last_sync for i in range(2))
        assert server.served_while_paused == 0 and policy.version == 1

    serve(test)


def test_failed_reload_resumes_the_server_and_refuses_until_a_good_reload() -> None:
    async def test(server: FakeVLLM, policy: VLLMPolicy) -> None:
        server.fail_next["/collective_rpc"] = 500
        with pytest.raises(WeightSyncError, match="collective_rpc"):
            await policy.update_weights("/ckpt/1", 1)
        assert [x for x in server.log if x in SYNC_CALLS] == [
            "POST /pause",
            "POST /collective_rpc",
            "POST /resume",
        ]
        assert not server.paused and policy.version == 0
        with pytest.raises(PolicyError, match="weights are unknown"):
            await policy.generate(PROMPT, SamplingParams())
        assert server.completions == []
        await policy.update_weights("/ckpt/2", 2)
        c = await policy.generate(PROMPT, SamplingParams())
        assert c.policy_version == 2 and c.token_ids == expected(PROMPT, "/ckpt/2")[0]
        # Announcing another version than the one reloaded: the weights would be mislabelled.
        await policy.begin_update()
        await policy.load_checkpoint("/ckpt/3", 3)
        with pytest.raises(ValueError, match="after loading version 3"):
            await policy.end_update(4)
        with pytest.raises(PolicyError, match="version 3 was loaded, 4 announced"):
            await policy.generate(PROMPT, SamplingParams())

    serve(test)


def test_lora_sync_names_the_adapter_of_each_version() -> None:
    async def test(server: FakeVLLM, policy: VLLMPolicy) -> None:
        base = await policy.generate(PROMPT, SamplingParams())
        assert base.token_ids == expected(PROMPT, "base")[0]
        for v in (1, 2, 3):
            await policy.update_weights(f"/lora/{v}", v)
            c = await policy.generate(PROMPT, SamplingParams())
            assert server.completions[-1]["model"] == f"turnrl-v{v}"
            assert c.policy_version == v and c.token_ids == expected(PROMPT, f"/lora/{v}")[0]
        # Adapters no request names any more are unloaded at the next load.
        assert server.adapters == {"turnrl-v2": "/lora/2", "turnrl-v3": "/lora/3"}
        assert server.log.count("POST /v1/unload_lora_adapter") == 1
        server.fail_next["/v1/load_lora_adapter"] = 500
        with pytest.raises(WeightSyncError):
            await policy.update_weights("/lora/4", 4)
        c = await policy.generate(PROMPT, SamplingParams())
        assert c.policy_version == 3 and server.completions[-1]["model"] == "turnrl-v3"
        assert "POST /pause" not in server.log
        # A stamp other than the version loaded (or the current one) is refused.
        await policy.begin_update()
        await policy.load_checkpoint("/lora/5", 5)
        with pytest.raises(ValueError, match="after loading version 5"):
            await policy.end_update(7)
        c = await policy.generate(PROMPT, SamplingParams())
        assert c.policy_version == 3 and server.completions[-1]["model"] == "turnrl-v3"

    serve(test, weight_sync="lora")


def test_close_fails_held_and_later_requests() -> None:
    async def test(server: FakeVLLM, policy: VLLMPolicy) -> None:
        await policy.begin_update()
        held = asyncio.create_task(policy.generate(PROMPT, SamplingParams()))
        await asyncio.sleep(0.01)
        policy.close()
        with pytest.raises(PolicyError, match="closed"):
            await held
        with pytest.raises(PolicyError, match="closed"):
            await policy.generate(PROMPT, SamplingParams())
        assert server.completions == []

    serve(test)
