"""HFPolicy behaviour on the tiny model: exact ids and logprobs, batching, stops, lifecycle."""

from __future__ import annotations

import asyncio
import copy
from collections.abc import Sequence
from typing import Any

import pytest
import torch
from transformers import PreTrainedModel, PreTrainedTokenizerBase

from turnrl.agent.hf_policy import HFPolicy
from turnrl.agent.model import end_of_turn_id
from turnrl.agent.policy import Completion, Policy, PolicyError, SamplingParams, WeightSync
from turnrl.agent.records import Episode, StopReason, Turn
from turnrl.agent.sampling import draw as _draw
from turnrl.agent.sampling import draw_nucleus as _draw_nucleus
from turnrl.rl.learner import Learner
from turnrl.rl.learner_config import LearnerConfig

PROMPTS = [
    [1, 9690, 198, 2683, 359, 253],
    [1, 4093, 198, 6004, 2, 198, 1, 520, 9531, 198, 1780, 314, 260, 3575],
    [520],
    [1, 4093, 198, 1780, 314, 260, 3575, 282, 4649, 47],
]


def teacher_forced(
    model: PreTrainedModel, prompt: Sequence[int], completion: Completion, temperature: float
) -> torch.Tensor:
    """Logprobs of `completion`'s ids from one plain forward pass over prompt + completion."""
    ids = torch.tensor([[*prompt, *completion.token_ids]])
    with torch.inference_mode():
        logits = model(input_ids=ids).logits[0, len(prompt) - 1 : -1].float()
    logp = torch.log_softmax(logits / (temperature or 1.0), dim=-1)
    return logp.gather(1, torch.tensor(completion.token_ids)[:, None])[:, 0]


def assert_teacher_forced(
    model: PreTrainedModel, prompt: Sequence[int], completion: Completion, temperature: float
) -> None:
    expected = teacher_forced(model, prompt, completion, temperature)
    torch.testing.assert_close(torch.tensor(completion.logprobs), expected, atol=1e-4, rtol=0)


async def gather(
    policy: HFPolicy, prompts: Sequence[Sequence[int]], params: Sequence[SamplingParams]
) -> list[Completion]:
    return list(
        await asyncio.gather(*(policy.generate(p, s) for p, s in zip(prompts, params, strict=True)))
    )


async def decode_steps(policy: HFPolicy, n: int) -> None:
    """Return once the policy has run `n` decode steps (polls; gives up after ~10 s)."""
    for _ in range(10_000):
        if policy.n_decode_steps >= n:
            return
        await asyncio.sleep(0.001)
    raise TimeoutError(f"the policy ran fewer than {n} decode steps")


def test_is_a_policy(tiny_model: PreTrainedModel, tokenizer: PreTrainedTokenizerBase) -> None:
    policy = HFPolicy(tiny_model, tokenizer)
    try:
        assert isinstance(policy, Policy)
        assert end_of_turn_id(tokenizer) in policy.end_token_ids
    finally:
        policy.close()


def test_logprobs_match_teacher_forcing_for_left_padded_rows(
    tiny_model: PreTrainedModel, tokenizer: PreTrainedTokenizerBase
) -> None:
    """Rows of different prompt lengths share one left-padded batch; each row's ids and
    logprobs are what one unpadded forward pass gives, so padding and positions are right."""
    params = [
        SamplingParams(temperature=1.0, max_tokens=12, seed=1),
        SamplingParams(temperature=0.0, max_tokens=7),
        SamplingParams(temperature=0.7, top_p=0.9, max_tokens=10, seed=2),
        SamplingParams(temperature=1.5, max_tokens=4, seed=3),
    ]

    async def main() -> tuple[list[Completion], int]:
        async with HFPolicy(tiny_model, tokenizer, end_token_ids=()) as policy:
            completions = await gather(policy, PROMPTS, params)
            return completions, policy.n_prefills

    completions, n_prefills = asyncio.run(main())
    assert n_prefills == 1
    for prompt, p, completion in zip(PROMPTS, params, completions, strict=True):
        assert len(completion.token_ids) == p.max_tokens
        assert completion.finish_reason == "length"
        assert completion.metrics["batch_size"] == len(PROMPTS)
        assert_teacher_forced(tiny_model, prompt, completion, p.temperature)


def test_request_joining_mid_decode_matches_teacher_forcing(
    tiny_model: PreTrainedModel, tokenizer: PreTrainedTokenizerBase
) -> None:
    """A request that arrives while another decodes joins the running batch (its cache is
    merged in) without changing either row's numbers."""
    # Long enough that the first row is still decoding when the late one finishes, however
    # many steps the worker runs before the loop notices.
    first = SamplingParams(temperature=1.0, max_tokens=300, seed=5)
    late = SamplingParams(temperature=0.8, max_tokens=6, seed=6)

    async def main() -> tuple[Completion, Completion, HFPolicy]:
        async with HFPolicy(tiny_model, tokenizer, end_token_ids=()) as policy:
            task = asyncio.create_task(policy.generate(PROMPTS[0], first))
            await decode_steps(policy, 3)
            joined = await policy.generate(PROMPTS[1], late)
            assert not task.done()
            return await task, joined, policy

    a, b, policy = asyncio.run(main())
    assert policy.n_prefills == 2
    assert b.metrics["batch_size"] == 2
    # Both rows decoded together: fewer steps than the two requests run one after the other.
    assert policy.n_decode_steps < (first.max_tokens - 1) + (late.max_tokens - 1)
    assert_teacher_forced(tiny_model, PROMPTS[0], a, first.temperature)
    assert_teacher_forced(tiny_model, PROMPTS[1], b, late.temperature)


def test_greedy_batched_equals_alone_and_hf_generate(
    tiny_model: PreTrainedModel, tokenizer: PreTrainedTokenizerBase
) -> None:
    greedy = SamplingParams(temperature=0.0, max_tokens=10)

    async def main() -> tuple[list[Completion], list[Completion]]:
        async with HFPolicy(tiny_model, tokenizer, end_token_ids=()) as policy:
            batched = await gather(policy, PROMPTS, [greedy] * len(PROMPTS))
            alone = [await policy.generate(p, greedy) for p in PROMPTS]
            return batched, alone

    batched, alone = asyncio.run(main())
    for prompt, b, a in zip(PROMPTS, batched, alone, strict=True):
        assert b.token_ids == a.token_ids
        reference = tiny_model.generate(
            torch.tensor([prompt]),
            attention_mask=torch.ones(1, len(prompt), dtype=torch.long),
            do_sample=False,
            max_new_tokens=greedy.max_tokens,
            eos_token_id=None,
            pad_token_id=0,
        )
        assert a.token_ids == tuple(reference[0, len(prompt) :].tolist())


def test_seed_reproduces_sampling_regardless_of_batch(
    tiny_model: PreTrainedModel, tokenizer: PreTrainedTokenizerBase
) -> None:
    def seeded(seed: int) -> SamplingParams:
        return SamplingParams(temperature=1.0, top_p=0.95, max_tokens=16, seed=seed)

    async def main() -> tuple[Completion, Completion, Completion]:
        async with HFPolicy(tiny_model, tokenizer, end_token_ids=()) as policy:
            alone = await policy.generate(PROMPTS[0], seeded(7))
            crowd = await gather(policy, PROMPTS, [seeded(7), seeded(8), seeded(9), seeded(10)])
            other = await policy.generate(PROMPTS[0], seeded(8))
            return alone, crowd[0], other

    alone, in_batch, other_seed = asyncio.run(main())
    assert alone.token_ids == in_batch.token_ids
    assert alone.token_ids != other_seed.token_ids


def test_policy_seed_makes_unseeded_requests_reproducible(
    tiny_model: PreTrainedModel, tokenizer: PreTrainedTokenizerBase
) -> None:
    params = SamplingParams(temperature=1.0, max_tokens=8)

    async def sample(seed: int) -> list[tuple[int, ...]]:
        async with HFPolicy(tiny_model, tokenizer, seed=seed, end_token_ids=()) as policy:
            return [c.token_ids for c in await gather(policy, PROMPTS, [params] * 4)]

    assert asyncio.run(sample(0)) == asyncio.run(sample(0))


def greedy_reference(
    tiny_model: PreTrainedModel, tokenizer: PreTrainedTokenizerBase, n: int
) -> tuple[int, ...]:
    async def main() -> Completion:
        async with HFPolicy(tiny_model, tokenizer, end_token_ids=()) as policy:
            return await policy.generate(PROMPTS[3], SamplingParams(temperature=0, max_tokens=n))

    return asyncio.run(main()).token_ids


def test_stop_token_is_kept_and_ends_with_stop(
    tiny_model: PreTrainedModel, tokenizer: PreTrainedTokenizerBase
) -> None:
    reference = greedy_reference(tiny_model, tokenizer, 12)
    stop_id = reference[4]
    cut = reference.index(stop_id) + 1

    async def main() -> Completion:
        async with HFPolicy(tiny_model, tokenizer, end_token_ids=()) as policy:
            params = SamplingParams(temperature=0, max_tokens=12, stop_token_ids=(stop_id,))
            return await policy.generate(PROMPTS[3], params)

    completion = asyncio.run(main())
    assert completion.token_ids == reference[:cut]
    assert completion.finish_reason == "stop"


def test_end_token_ids_stop_every_request(
    tiny_model: PreTrainedModel, tokenizer: PreTrainedTokenizerBase
) -> None:
    reference = greedy_reference(tiny_model, tokenizer, 12)
    cut = reference.index(reference[5]) + 1

    async def main() -> Completion:
        async with HFPolicy(tiny_model, tokenizer, end_token_ids=(reference[5],)) as policy:
            return await policy.generate(PROMPTS[3], SamplingParams(temperature=0, max_tokens=12))

    completion = asyncio.run(main())
    assert completion.token_ids == reference[:cut]
    assert completion.finish_reason == "stop"


def test_stop_string_keeps_the_completing_id(
    tiny_model: PreTrainedModel, tokenizer: PreTrainedTokenizerBase
) -> None:
    reference = greedy_reference(tiny_model, tokenizer, 12)
    text = tokenizer.decode(reference)
    stop = text[len(tokenizer.decode(reference[:6])) - 2 :][:3]
    # The first prefix whose text contains the stop string ends the completion.
    cut = next(k for k in range(1, 13) if stop in tokenizer.decode(reference[:k]))

    async def main() -> Completion:
        async with HFPolicy(tiny_model, tokenizer, end_token_ids=()) as policy:
            params = SamplingParams(temperature=0, max_tokens=12, stop=("never there", stop))
            return await policy.generate(PROMPTS[3], params)

    completion = asyncio.run(main())
    assert completion.token_ids == reference[:cut]
    assert completion.finish_reason == "stop"


def test_max_tokens_ends_with_length(
    tiny_model: PreTrainedModel, tokenizer: PreTrainedTokenizerBase
) -> None:
    async def main() -> list[Completion]:
        async with HFPolicy(tiny_model, tokenizer, end_token_ids=()) as policy:
            params = [SamplingParams(temperature=1.0, max_tokens=n, seed=n) for n in (1, 3, 9, 2)]
            return await gather(policy, PROMPTS, params)

    completions = asyncio.run(main())
    assert [len(c.token_ids) for c in completions] == [1, 3, 9, 2]
    assert {c.finish_reason for c in completions} == {"length"}


def test_concurrent_requests_share_forward_passes(
    tiny_model: PreTrainedModel, tokenizer: PreTrainedTokenizerBase
) -> None:
    params = SamplingParams(temperature=1.0, max_tokens=6)

    async def main() -> tuple[list[Completion], HFPolicy]:
        async with HFPolicy(tiny_model, tokenizer, max_batch_size=8, end_token_ids=()) as policy:
            prompts = [PROMPTS[i % 4] for i in range(16)]
            return await gather(policy, prompts, [params] * 16), policy

    completions, policy = asyncio.run(main())
    assert len(completions) == 16
    assert policy.n_prefills < 16
    assert policy.n_decode_steps < 16 * (params.max_tokens - 1)
    assert max(c.metrics["batch_size"] for c in completions) == 8


class FlakyModel(torch.nn.Module):
    """Wraps a model; the next `fail_next` forward passes raise."""

    def __init__(self, model: PreTrainedModel) -> None:
        super().__init__()
        self.inner = model
        self.config = model.config
        self.fail_next = 0

    def get_input_embeddings(self) -> torch.nn.Module:
        return self.inner.get_input_embeddings()

    def forward(self, **kwargs: Any) -> Any:
        if self.fail_next:
            self.fail_next -= 1
            raise RuntimeError("injected failure")
        return self.inner(**kwargs)


def test_model_error_fails_its_batch_and_the_policy_recovers(
    tiny_model: PreTrainedModel, tokenizer: PreTrainedTokenizerBase
) -> None:
    flaky = FlakyModel(tiny_model)
    params = SamplingParams(temperature=0, max_tokens=4)

    async def main() -> tuple[list[Completion | BaseException], Completion]:
        async with HFPolicy(flaky, tokenizer, end_token_ids=()) as policy:  # type: ignore[arg-type]
            flaky.fail_next = 1
            failed = await asyncio.gather(
                *(policy.generate(p, params) for p in PROMPTS), return_exceptions=True
            )
            return failed, await policy.generate(PROMPTS[0], params)

    failed, after = asyncio.run(main())
    assert all(isinstance(f, PolicyError) for f in failed)
    assert isinstance(failed[0], PolicyError)
    assert isinstance(failed[0].__cause__, RuntimeError)
    assert len(after.token_ids) == 4


def test_updating_weights_waits_for_rows_and_bumps_version(
    tiny_model: PreTrainedModel, tokenizer: PreTrainedTokenizerBase
) -> None:
    params = SamplingParams(temperature=0, max_tokens=8)

    async def main() -> tuple[Completion, Completion, bool]:
        async with HFPolicy(tiny_model, tokenizer, end_token_ids=()) as policy:
            running = asyncio.create_task(policy.generate(PROMPTS[0], params))
            await decode_steps(policy, 1)
            async with policy.updating_weights(version=3):
                drained = running.done()
                queued = asyncio.create_task(policy.generate(PROMPTS[1], params))
                await asyncio.sleep(0.05)
                drained = drained and not queued.done()
            return await running, await queued, drained

    before, after, drained = asyncio.run(main())
    assert drained
    assert before.policy_version == 0
    assert after.policy_version == 3


def test_weight_sync_protocol_holds_generation_between_begin_and_end(
    tiny_model: PreTrainedModel, tokenizer: PreTrainedTokenizerBase
) -> None:
    """`WeightSync` as the loop uses it: the version changes only at `end_update`, requests
    made during the update wait for it, and the calls must pair up."""
    params = SamplingParams(temperature=0, max_tokens=4)

    async def main() -> tuple[Completion, bool, int, int]:
        async with HFPolicy(tiny_model, tokenizer, end_token_ids=()) as policy:
            sync: WeightSync = policy
            await sync.begin_update()
            queued = asyncio.create_task(policy.generate(PROMPTS[0], params))
            await asyncio.sleep(0.05)
            held = not queued.done()
            during = sync.version
            with pytest.raises(RuntimeError, match="twice"):
                await sync.begin_update()
            await sync.end_update(5)
            with pytest.raises(RuntimeError, match="without begin_update"):
                await sync.end_update(6)
            return await queued, held, during, sync.version

    completion, held, during, after = asyncio.run(main())
    assert held and during == 0 and after == 5
    assert completion.policy_version == 5


def test_cancelled_request_leaves_the_others_alone(
    tiny_model: PreTrainedModel, tokenizer: PreTrainedTokenizerBase
) -> None:
    async def main() -> Completion:
        async with HFPolicy(tiny_model, tokenizer, end_token_ids=()) as policy:
            doomed = asyncio.create_task(
                policy.generate(PROMPTS[0], SamplingParams(temperature=0, max_tokens=500))
            )
            kept = asyncio.create_task(
                policy.generate(PROMPTS[1], SamplingParams(temperature=0, max_tokens=20))
            )
            await decode_steps(policy, 2)
            doomed.cancel()
            return await kept

    assert len(asyncio.run(main()).token_ids) == 20


def test_close_is_idempotent_and_fails_later_requests(
    tiny_model: PreTrainedModel, tokenizer: PreTrainedTokenizerBase
) -> None:
    async def main() -> None:
        policy = HFPolicy(tiny_model, tokenizer)
        pending = asyncio.create_task(
            policy.generate(PROMPTS[0], SamplingParams(temperature=0, max_tokens=2000))
        )
        await decode_steps(policy, 1)
        policy.close()
        policy.close()
        with pytest.raises(PolicyError):
            await pending
        with pytest.raises(PolicyError):
            await policy.generate(PROMPTS[0], SamplingParams())
        async with policy:
            pass

    asyncio.run(main())


def test_rejects_requests_beyond_the_context(
    tiny_model: PreTrainedModel, tokenizer: PreTrainedTokenizerBase
) -> None:
    async def main() -> None:
        async with HFPolicy(tiny_model, tokenizer) as policy:
            context = tiny_model.config.max_position_embeddings
            with pytest.raises(ValueError, match="context"):
                await policy.generate([5] * 10, SamplingParams(max_tokens=context - 9))
            with pytest.raises(ValueError, match="empty"):
                await policy.generate([], SamplingParams())
            with pytest.raises(ValueError, match="prompt ids"):
                await policy.generate([10**6], SamplingParams())

    asyncio.run(main())


def test_inverse_cdf_draw() -> None:
    # CDF of [0.5, 0.3, 0.2, 0.0] is [0.5, 0.8, 1.0, 1.0]: u=0.4 -> id 0, 0.6 -> 1, 0.9 -> 2;
    # u just below 1 still lands on id 2, never on the zero-probability id 3.
    probs = torch.tensor([[0.5, 0.3, 0.2, 0.0]] * 5)
    u = torch.tensor([0.0, 0.4, 0.6, 0.9, 1.0])
    assert _draw(probs, u).tolist() == [0, 0, 1, 2, 2]


def test_nucleus_draw() -> None:
    # probs [0.2, 0.5, 0.3, 0.0] sorted: id 1 (0.5), id 2 (0.3), id 0 (0.2). With top_p 0.7 the
    # mass before each is 0, 0.5, 0.8: ids 1 and 2 stay (total 0.8). u=0.5 -> x=0.4 -> id 1;
    # u=0.9 -> x=0.72 -> id 2; id 0 is never drawn. top_p 1.0 keeps all: u=0.9 -> x=0.9 -> id 0.
    probs = torch.tensor([[0.2, 0.5, 0.3, 0.0]] * 4)
    top_p = torch.tensor([0.7, 0.7, 0.7, 1.0])
    u = torch.tensor([0.5, 0.9, 0.999, 0.9])
    assert _draw_nucleus(probs, top_p, u).tolist() == [1, 2, 2, 0]


def test_tiny_top_p_is_greedy(
    tiny_model: PreTrainedModel, tokenizer: PreTrainedTokenizerBase
) -> None:
    async def main() -> tuple[Completion, Completion]:
        async with HFPolicy(tiny_model, tokenizer, end_token_ids=()) as policy:
            greedy = SamplingParams(temperature=0, max_tokens=8)
            narrow = SamplingParams(temperature=1.0, top_p=1e-6, max_tokens=8, seed=4)
            return await policy.generate(PROMPTS[0], greedy), await policy.generate(
                PROMPTS[0], narrow
            )

    greedy, narrow = asyncio.run(main())
    assert narrow.token_ids == greedy.token_ids
    assert_teacher_forced(tiny_model, PROMPTS[0], narrow, 1.0)


def test_autocast_policy_samples_what_a_bf16_learner_scores(
    tiny_model: PreTrainedModel, tokenizer: PreTrainedTokenizerBase
) -> None:
    """`turnrl train` with `learner.dtype: bfloat16` samples under the learner's autocast: the
    sampled logprobs are closer to what the bf16 learner computes for the same ids (the PPO
    ratio's other side) than float32's are."""
    learner = Learner(copy.deepcopy(tiny_model), LearnerConfig(dtype="bfloat16", device="cpu"))
    params = [SamplingParams(temperature=1.0, max_tokens=12, seed=i) for i in range(4)]

    def gap(autocast_dtype: torch.dtype | None) -> float:
        """Mean |sampled logprob - the learner's| over the sampled ids."""

        async def run() -> list[Completion]:
            async with HFPolicy(
                tiny_model, tokenizer, end_token_ids=(), autocast_dtype=autocast_dtype
            ) as policy:
                return await gather(policy, PROMPTS, params)

        completions = asyncio.run(run())
        episodes = [
            Episode(
                episode_id=f"e{i}",
                task_id="t",
                group_id="g",
                turns=[
                    Turn(
                        index=0,
                        prompt_ids=list(prompt),
                        completion_ids=list(c.token_ids),
                        completion_logprobs=list(c.logprobs),
                        observation_ids=[],
                        text="",
                        finish_reason=c.finish_reason,
                    )
                ],
                stop_reason=StopReason.ANSWERED,
            )
            for i, (prompt, c) in enumerate(zip(PROMPTS, completions, strict=True))
        ]
        rescored = learner.logprobs(episodes)
        diffs = [
            abs(a - b)
            for c, row in zip(completions, rescored, strict=True)
            for a, b in zip(c.logprobs, row[0], strict=True)
        ]
        return sum(diffs) / len(diffs)

    # Measured: mean |policy - learner| 0.0026 under autocast, 0.0063 in float32. Not zero:
    # the policy's batches (left padding, KV-cached decoding) round bf16 differently.
    autocast, float32 = gap(torch.bfloat16), gap(None)
    assert 0 < autocast < float32
