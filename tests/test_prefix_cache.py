"""Prefix caching in HFPolicy (agent/kv_cache.py): same numbers as without it, less prefill."""

from __future__ import annotations

import asyncio
import inspect
import random
from collections.abc import Callable
from typing import Any

import pytest
import torch
from transformers import LlamaConfig, PreTrainedModel, PreTrainedTokenizerBase

from turnrl.agent.hf_policy import HFPolicy
from turnrl.agent.kv_cache import (
    MIN_SHARED_IDS,
    Hit,
    PrefixCache,
    SpareLayer,
    prefill,
    shared_prefixes,
)
from turnrl.agent.model import load_model, tiny_model_dir
from turnrl.agent.policy import Completion, SamplingParams

_ids = random.Random(0)
SHARED = [1, *(_ids.randrange(3, 49152) for _ in range(79))]
"""80 ids every episode starts with (the system prompt, tool schemas and examples)."""
HEADER = [1, 520, 198]
"""What follows each observation: the next assistant header."""
N_EPISODES, N_TURNS = 6, 3
# Episode e asks its own question (5 + e ids; distinct first ids), gets observations of
# 4..15 ids and samples 3..12 ids a turn, so the episodes fall out of step.
QUESTIONS = [[100 + e, *(_ids.randrange(3, 49152) for _ in range(4 + e))] for e in range(6)]
OBSERVATIONS = [
    [[_ids.randrange(3, 49152) for _ in range(4 + (e + 3 * t) % 12)] for t in range(3)]
    for e in range(6)
]
MAX_TOKENS = [[3 + (2 * e + 5 * t) % 10 for t in range(3)] for e in range(6)]

Turns = list[tuple[list[int], Completion]]
"""An episode's turns: each prompt with its completion."""


async def decode_steps(policy: HFPolicy, n: int) -> None:
    for _ in range(10_000):
        if policy.n_decode_steps >= n:
            return
        await asyncio.sleep(0.001)
    raise TimeoutError(f"the policy ran fewer than {n} decode steps")


async def episode(
    policy: HFPolicy, e: int, params: Callable[[int, int], SamplingParams], start_after: int = 0
) -> Turns:
    """Episode `e`: each prompt is the last one + its completion + an observation + HEADER."""
    await decode_steps(policy, start_after)
    prompt, turns = SHARED + QUESTIONS[e], []
    for t in range(N_TURNS):
        completion = await policy.generate(prompt, params(e, t))
        turns.append((prompt, completion))
        prompt = prompt + list(completion.token_ids) + OBSERVATIONS[e][t] + HEADER
    return turns


def greedy(e: int, t: int) -> SamplingParams:
    return SamplingParams(temperature=0.0, max_tokens=MAX_TOKENS[e][t])


def sampled(e: int, t: int) -> SamplingParams:
    # At temperature 1 the tiny model's distribution is nearly flat over 49,152 ids (logit std
    # ~0.8): float rounding then moves inverse-CDF draws across ids. At 0.1 a few ids carry
    # the mass (top probability 0.4-1.0), and the draws still differ from greedy.
    top_p = 0.9 if e % 2 else 1.0
    return SamplingParams(
        temperature=0.1, top_p=top_p, max_tokens=MAX_TOKENS[e][t], seed=e * 10 + t
    )


def rollout(
    model: PreTrainedModel,
    tokenizer: PreTrainedTokenizerBase,
    params: Callable[[int, int], SamplingParams],
    **options: Any,
) -> tuple[list[Turns], HFPolicy]:
    """All episodes concurrently; half of them join while the first half decodes."""

    async def main() -> tuple[list[Turns], HFPolicy]:
        async with HFPolicy(model, tokenizer, end_token_ids=(), **options) as policy:
            late = N_EPISODES // 2
            starts = [0] * late + [2 + 3 * e for e in range(N_EPISODES - late)]
            runs = (episode(policy, e, params, s) for e, s in enumerate(starts))
            return list(await asyncio.gather(*runs)), policy

    return asyncio.run(main())


def assert_same(cached: list[Turns], plain: list[Turns]) -> None:
    for turns, reference in zip(cached, plain, strict=True):
        for (prompt, completion), (ref_prompt, ref_completion) in zip(
            turns, reference, strict=True
        ):
            assert prompt == ref_prompt
            assert completion.token_ids == ref_completion.token_ids
            torch.testing.assert_close(
                torch.tensor(completion.logprobs),
                torch.tensor(ref_completion.logprobs),
                atol=1e-4,
                rtol=0,
            )


@pytest.mark.parametrize("params", [greedy, sampled], ids=["greedy", "sampled"])
def test_multi_turn_rollout_equals_no_cache(
    tiny_model: PreTrainedModel,
    tokenizer: PreTrainedTokenizerBase,
    params: Callable[[int, int], SamplingParams],
) -> None:
    """Concurrent episodes sharing a long prompt, joining mid-decode, 3 turns each: the same
    ids and logprobs with the cache as without, and most prompt ids come from the cache."""
    cached, policy = rollout(tiny_model, tokenizer, params)
    plain, reference = rollout(tiny_model, tokenizer, params, prefix_cache=False)
    assert_same(cached, plain)
    # Late episodes joined a batch that was decoding.
    assert any(turns[0][1].metrics["batch_size"] > 1 for turns in cached[N_EPISODES // 2 :])
    prompt_ids = sum(len(p) for turns in plain for p, _ in turns)
    assert reference.n_prefill_tokens == prompt_ids and reference.n_cached_tokens == 0
    assert policy.n_prefill_tokens + policy.n_cached_tokens >= prompt_ids
    assert policy.n_cached_tokens > 2 * policy.n_prefill_tokens
    for turns in cached:
        for (prompt, completion), (last, done) in zip(turns[1:], turns, strict=False):
            # Later turns reuse the whole last context: its prompt and sampled ids but the last.
            assert completion.metrics["cached_ids"] >= len(last) + len(done.token_ids) - 1
            assert completion.metrics["cached_ids"] < len(prompt)


def test_counters_show_the_shared_prefix_prefilled_once(
    tiny_model: PreTrainedModel, tokenizer: PreTrainedTokenizerBase
) -> None:
    params = SamplingParams(temperature=0.0, max_tokens=5)
    prompts = [SHARED + q for q in QUESTIONS[:4]]  # question lengths 5, 6, 7, 8: 26 ids

    async def main() -> tuple[list[int], list[int], list[int], list[Completion]]:
        async with HFPolicy(tiny_model, tokenizer, end_token_ids=()) as policy:
            firsts = await asyncio.gather(*(policy.generate(p, params) for p in prompts))
            after_first = [policy.n_prefills, policy.n_prefill_tokens, policy.n_cached_tokens]
            nexts = [
                p + list(c.token_ids) + OBSERVATIONS[e][0] + HEADER
                for e, (p, c) in enumerate(zip(prompts, firsts, strict=True))
            ]
            seconds = await asyncio.gather(*(policy.generate(p, params) for p in nexts))
            appended = [len(o) + len(HEADER) + 1 for o in (OBSERVATIONS[e][0] for e in range(4))]
            after_second = [policy.n_prefills, policy.n_prefill_tokens, policy.n_cached_tokens]
            return after_first, after_second, appended, list(seconds)

    after_first, after_second, appended, seconds = asyncio.run(main())
    # Turn 1: one pass over the 80 shared ids, then one over the 4 questions on top of them.
    assert after_first == [2, 80 + 26, 4 * 80]
    # Turn 2: one pass over what each prompt appended (the last sampled id, whose KV was never
    # computed, + observation + header); the rest (prompt + 4 sampled ids) comes from the cache.
    cached = [len(SHARED) + len(QUESTIONS[e]) + 4 for e in range(4)]
    assert after_second == [3, 80 + 26 + sum(appended), 4 * 80 + sum(cached)]
    assert [c.metrics["cached_ids"] for c in seconds] == cached


def test_identical_prompts_prefill_all_but_their_last_id_once(
    tiny_model: PreTrainedModel, tokenizer: PreTrainedTokenizerBase
) -> None:
    """A GRPO group: the same prompt sampled 4 times costs one prompt's prefill."""
    prompt = SHARED + QUESTIONS[0]

    async def main() -> tuple[list[Completion], HFPolicy]:
        async with HFPolicy(tiny_model, tokenizer, end_token_ids=()) as policy:
            runs = [SamplingParams(temperature=1.0, max_tokens=6, seed=s) for s in range(4)]
            return list(await asyncio.gather(*(policy.generate(prompt, p) for p in runs))), policy

    completions, policy = asyncio.run(main())
    assert policy.n_prefill_tokens == len(prompt) - 1 + 4
    assert len({c.token_ids for c in completions}) > 1


@pytest.mark.parametrize(
    "how", ["begin_end_update", "updating_weights_same_version", "set_version"]
)
def test_weight_change_empties_the_cache(tokenizer: PreTrainedTokenizerBase, how: str) -> None:
    """KV computed under old weights is never reused: after the change the second turn equals a
    run without cache on the new weights."""
    model = load_model(tiny_model_dir())  # a private copy: its weights change
    params = SamplingParams(temperature=0.0, max_tokens=6)
    prompts = [SHARED + q for q in QUESTIONS[:3]]

    async def change(policy: HFPolicy) -> None:
        def perturb() -> None:
            with torch.no_grad():
                model.model.layers[0].self_attn.k_proj.weight.mul_(1.5)
                model.model.layers[1].mlp.up_proj.weight.mul_(-1.0)

        if how == "begin_end_update":
            await policy.begin_update()
            perturb()
            await policy.end_update(1)
        elif how == "updating_weights_same_version":
            async with policy.updating_weights():
                perturb()
        else:
            perturb()  # nothing is generating: the caller's promise to `set_version`
            policy.set_version(1)

    async def turns() -> tuple[list[list[int]], list[Completion]]:
        async with HFPolicy(model, tokenizer, end_token_ids=()) as policy:
            firsts = await asyncio.gather(*(policy.generate(p, params) for p in prompts))
            await change(policy)
            nexts = [p + list(c.token_ids) + HEADER for p, c in zip(prompts, firsts, strict=True)]
            seconds = await asyncio.gather(*(policy.generate(p, params) for p in nexts))
            return nexts, list(seconds)

    nexts, seconds = asyncio.run(turns())

    async def plain() -> list[Completion]:
        async with HFPolicy(model, tokenizer, end_token_ids=(), prefix_cache=False) as policy:
            return list(await asyncio.gather(*(policy.generate(p, params) for p in nexts)))

    for completion, reference in zip(seconds, asyncio.run(plain()), strict=True):
        assert completion.token_ids == reference.token_ids
        torch.testing.assert_close(
            torch.tensor(completion.logprobs), torch.tensor(reference.logprobs), atol=1e-4, rtol=0
        )
        # Only the shared prefix, prefilled again under the new weights, came from the cache.
        assert completion.metrics["cached_ids"] == len(SHARED)


@pytest.mark.parametrize("budget", [0, 60_000])
def test_eviction_under_a_tiny_budget_keeps_outputs_right(
    tiny_model: PreTrainedModel, tokenizer: PreTrainedTokenizerBase, budget: int
) -> None:
    # The tiny model's KV is 512 bytes an id (2 layers x K and V x 2 heads x 16 x fp32): 60 kB
    # holds ~117 ids: the shared prompt and a few episodes; entries come and go as they run.
    cached, policy = rollout(tiny_model, tokenizer, greedy, prefix_cache_bytes=budget)
    plain, _ = rollout(tiny_model, tokenizer, greedy, prefix_cache=False)
    assert_same(cached, plain)
    # With no room nothing is reused; with a little, something is (and evicted later).
    assert (policy.n_cached_tokens > 0) == (budget > 0)
    assert policy._prefix is not None and policy._prefix.nbytes == 0  # emptied on close


@pytest.mark.parametrize("attention", ["sdpa", "eager"])
def test_masked_columns_between_prefix_and_suffix_are_ignored(attention: str) -> None:
    """transformers' SDPA and eager paths honour a 2-D padding mask with holes: rows with
    cached prefixes and suffixes of different lengths give the logits of one unpadded pass."""
    model = load_model(tiny_model_dir())
    model.set_attn_implementation(attention)
    prompts = [SHARED[:40], SHARED[:20] + QUESTIONS[0], QUESTIONS[1] * 3, SHARED[:30]]
    tree = PrefixCache(2**30)
    with torch.inference_mode():
        name = cache_kwarg(model)
        full = getattr(model(input_ids=torch.tensor([SHARED[:36]]), use_cache=True), name)
        tree.insert_row(SHARED[:36], full, 0)
        hits = [tree.lookup(p, len(p) - 1) for p in prompts]
        # Cached 36, 20, 0, 29 ids; suffixes 4, 5, 15, 1 ids, left-padded to 15: rows 0, 1 and 3
        # have 11, 10 and 14 masked columns between their cached prefix and their suffix.
        assert [h.length for h in hits] == [36, 20, 0, 29]
        cache, mask, logits = prefill(model, prompts, hits, tree, pad_id=2, cache_kwarg=name)
        for i, prompt in enumerate(prompts):
            alone = model(input_ids=torch.tensor([prompt]), use_cache=True)
            torch.testing.assert_close(logits[i], alone.logits[0, -1], atol=1e-4, rtol=0)
            # Afterwards the row's KV is its own, right-aligned and unpadded.
            n = len(prompt)
            assert mask[i].tolist() == [0] * (mask.shape[1] - n) + [1] * n
            for mine, ref in zip(cache.layers, getattr(alone, name).layers, strict=True):
                torch.testing.assert_close(mine.keys[i, :, -n:], ref.keys[0], atol=1e-4, rtol=0)
                torch.testing.assert_close(mine.values[i, :, -n:], ref.values[0], atol=1e-4, rtol=0)


def cache_kwarg(model: PreTrainedModel) -> str:
    """The forward's name for the cache argument (renamed in transformers 5.24)."""
    return "cache" if "cache" in inspect.signature(model.forward).parameters else "past_key_values"


def kv(n: int, start: float = 0.0) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
    """One layer of made-up KV for `n` ids, 1 head of width 1: column j holds start + j."""
    column = torch.arange(n, dtype=torch.float32)[None, :, None] + start
    return [column], [-column]


def test_tree_matches_inside_runs_splits_and_copies() -> None:
    tree = PrefixCache(2**20)
    keys, values = kv(6)
    tree.insert([1, 2, 3, 4, 5, 6], keys, values)
    keys[0].fill_(99.0)  # the tree kept a copy
    assert tree.lookup([1, 2, 3, 9], 4).length == 3
    assert tree.lookup([1, 2, 3, 4, 5, 6, 7], 5).length == 5
    assert tree.lookup([2, 3], 2).length == 0
    tree.insert([1, 2, 3, 7, 8], *kv(5, start=10.0))  # splits the run after 3 ids
    assert len(tree) == 3
    hit = tree.lookup([1, 2, 3, 7, 8, 9], 6)
    assert hit.length == 5
    # Columns 0-2 from the first entry (0, 1, 2), 3-4 from the second (13, 14).
    batch = tree.gather([hit, tree.lookup([1, 2], 2), Hit(0, ())], 5, 2, _config())
    assert batch.layers[0].keys[:, 0, :, 0].tolist() == [
        [0.0, 1.0, 2.0, 13.0, 14.0],
        [0.0, 0.0, 0.0, 0.0, 1.0],
        [0.0] * 5,
    ]
    assert batch.layers[0].values[0, 0, :, 0].tolist() == [-0.0, -1.0, -2.0, -13.0, -14.0]


def test_tree_evicts_least_recently_used_leaves_first() -> None:
    # Each id costs 8 bytes (a key and a value of 4 bytes): 3 entries of 4 ids fit in 100.
    tree = PrefixCache(100)
    for first in (10, 20, 30):
        tree.insert([first, 1, 2, 3], *kv(4))
    assert tree.nbytes == 96
    tree.lookup([10, 1], 2)  # 10 is now the most recently used, 20 the least
    tree.insert([40, 1, 2, 3], *kv(4))
    assert [tree.lookup([f, 1, 2, 3], 4).length for f in (10, 20, 30, 40)] == [4, 0, 4, 4]
    assert tree.nbytes == 96
    tree.insert(list(range(100, 120)), *kv(20))  # 160 bytes: everything goes, itself too
    assert tree.nbytes == 0 and len(tree) == 0


def test_shared_prefixes_keeps_the_longest_worth_prefilling() -> None:
    tree = PrefixCache(2**20)
    base = list(range(1000, 1000 + MIN_SHARED_IDS))
    long = base + list(range(50))
    prompts = [[*long, 7], [*long, 8], [*base, 9, 9], [5, 6]]
    # long is shared by two prompts, base by three; base is a prefix of long: only long stays.
    assert shared_prefixes(prompts, tree) == [long]
    # Identical prompts share all but their last id.
    assert shared_prefixes([long, long], tree) == [long[:-1]]
    tree.insert(long, *kv(len(long)))
    assert shared_prefixes(prompts, tree) == []  # cached already


def _config() -> LlamaConfig:
    return LlamaConfig(num_hidden_layers=1, num_attention_heads=1, num_key_value_heads=1)


def test_spare_layer_appends_in_place_and_adopts_replaced_tensors() -> None:
    keys = torch.zeros(2, 1, 3, 4)
    layer = SpareLayer.of(keys, keys.clone(), 3)
    step = torch.ones(2, 1, 1, 4)
    first, _ = layer.update(step, step)  # no room yet: moved into a buffer with room
    assert first.shape[2] == 4
    second, _ = layer.update(2 * step, 2 * step)
    assert second.data_ptr() == first.data_ptr()  # appended in place
    assert second[:, 0, :, 0].tolist() == [[0.0, 0.0, 0.0, 1.0, 2.0]] * 2
    layer.keys = layer.values = second[[1]]  # a merge or a dropped row puts new tensors in
    third, _ = layer.update(step[:1], step[:1])
    assert third[:, 0, :, 0].tolist() == [[0.0, 0.0, 0.0, 1.0, 2.0, 1.0]]
