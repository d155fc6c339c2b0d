"""Shared-prefix passes: running the rows' common prompt once, on a broadcast KV cache, gives
the plain pass's hidden states, logprobs, values, losses and gradients."""

from __future__ import annotations

import copy

import pytest
import torch
from fakes import with_advantages
from test_learner import VOCAB, make_episode, tiny_model, with_model_logprobs
from transformers import DynamicCache, PreTrainedModel

from turnrl.agent.records import Episode
from turnrl.rl.batch import build_token_batch
from turnrl.rl.learner import Learner
from turnrl.rl.learner_config import FullConfig, LearnerConfig, LoraConfig, ValueHeadConfig
from turnrl.rl.logprobs import (
    MIN_SHARED_PREFIX,
    context_hidden,
    decoder_hidden,
    shared_prefix_length,
)

PROMPT = 40


def shared_prompt_batch(model: PreTrainedModel) -> list[Episode]:
    """Four episodes behind one 40-token prompt; the first two also start their first
    completion with the same 3 tokens, so trained tokens fall inside their common prefix."""
    g = torch.Generator().manual_seed(7)
    prompt = torch.randint(1, VOCAB, (PROMPT,), generator=g).tolist()
    shapes = [[(0, 6, 3), (0, 4, 2)], [(0, 5, 4)], [(0, 3, 2), (0, 7, 1)], [(0, 8, 5)]]
    episodes = []
    for i, s in enumerate(shapes):
        e = make_episode(f"e{i}", s, seed=20 + i)
        first = e.turns[0]
        completion = [5, 6, 7, *first.completion_ids[3:]] if i < 2 else first.completion_ids
        turn0 = first.model_copy(update={"prompt_ids": prompt, "completion_ids": completion})
        episodes.append(e.model_copy(update={"turns": [turn0, *e.turns[1:]]}))
    return with_model_logprobs(model, episodes)


def perturbed(seed: int = 0) -> PreTrainedModel:
    model = tiny_model(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.01 * torch.sin(torch.arange(p.numel(), dtype=p.dtype)).view_as(p))
    return model


def test_shared_prefix_length_is_read_from_the_ids() -> None:
    ids = torch.tensor([[1, 2, 3, 4, 9], [1, 2, 3, 5, 0], [1, 2, 3, 4, 8]])
    assert shared_prefix_length(ids, torch.tensor([5, 4, 5])) == 3
    # Identical rows: capped so each keeps a token after the prefix; padding never counts.
    same = torch.tensor([[1, 2, 3, 0], [1, 2, 3, 4]])
    assert shared_prefix_length(same, torch.tensor([3, 4])) == 2
    assert shared_prefix_length(ids[:1], torch.tensor([5])) == 0
    assert shared_prefix_length(torch.tensor([[1, 2], [2, 2]]), torch.tensor([2, 2])) == 0


def test_hidden_states_equal_the_plain_pass_and_the_prefix_runs_once() -> None:
    model = perturbed()
    episodes = shared_prompt_batch(model)
    batch = build_token_batch(episodes, [[1.0] * len(e.turns) for e in episodes])
    # The first two episodes' common prefix is prompt + 3 tokens: the batch's is the prompt.
    assert shared_prefix_length(batch.input_ids_B_T, batch.lengths_B) == PROMPT
    assert PROMPT >= MIN_SHARED_PREFIX
    shapes: list[tuple[int, ...]] = []
    hook = model.get_input_embeddings().register_forward_hook(
        lambda _m, args, _o: shapes.append(tuple(args[0].shape))
    )
    try:
        with torch.no_grad():
            shared = decoder_hidden(model, batch, share_prefix=True)
    finally:
        hook.remove()
    with torch.no_grad():
        plain = decoder_hidden(model, batch)
    width = batch.input_ids_B_T.shape[1]
    assert shapes == [(1, PROMPT), (4, width - PROMPT)]
    torch.testing.assert_close(shared, plain, rtol=1e-4, atol=1e-5)
    two = build_token_batch(episodes[:2], [[1.0] * len(e.turns) for e in episodes[:2]])
    assert shared_prefix_length(two.input_ids_B_T, two.lengths_B) == PROMPT + 3


def _grads(learner: Learner) -> dict[str, torch.Tensor]:
    params = dict(learner.model.named_parameters())
    if learner.value_head is not None:
        params |= {f"value_head.{k}": v for k, v in learner.value_head.named_parameters()}
    return {k: p.grad.clone() for k, p in params.items() if p.grad is not None}


@pytest.mark.parametrize("n_episodes", [4, 2], ids=["prompt", "into-completions"])
@pytest.mark.parametrize(
    "adaptation", [FullConfig(), LoraConfig(r=4, alpha=8)], ids=["full", "lora"]
)
def test_losses_and_gradients_equal_the_unshared_computation(
    adaptation: LoraConfig | FullConfig, n_episodes: int
) -> None:
    """PPO + KL + a value head that reaches the trunk (every path through the hidden
    states), then SFT: the same loss scalars and gradients on every trained parameter. With
    the first two episodes alone, the shared prefix runs 3 tokens into their (trained)
    completions."""
    base = perturbed()
    episodes = shared_prompt_batch(tiny_model())[:n_episodes]
    advantages = [[1.0, -0.5], [2.0], [-1.0, 0.5], [0.3]][:n_episodes]
    trained = with_advantages(episodes, advantages)
    targets: list[list[float | None]] = [[0.5, None], [1.0], [None, -1.0], [0.2]][:n_episodes]
    head = ValueHeadConfig(init_std=0.1, backprop_to_policy=True)
    results = {}
    for share in (True, False):
        config = LearnerConfig(
            adaptation=adaptation, kl_coef=0.1, value_head=head, share_prefix=share
        )
        torch.manual_seed(0)  # the value head's init
        learner = Learner(copy.deepcopy(base), config)
        if isinstance(adaptation, LoraConfig):
            with torch.no_grad():  # nonzero adapters, so that LoRA's B matrices matter
                for name, p in learner.model.named_parameters():
                    if "lora_" in name:
                        p.add_(0.05 * torch.cos(torch.arange(p.numel(), dtype=p.dtype)).view_as(p))
        fed: list[tuple[int, ...]] = []
        embed = learner.model.get_input_embeddings()
        hook = embed.register_forward_hook(
            lambda _m, args, _o, fed=fed: fed.append(tuple(args[0].shape))
        )
        try:
            rl = learner.accumulate_gradients(trained, targets).scalars
        finally:
            hook.remove()
        # Shared: the prefix alone, at batch size 1 (the policy's pass; with LoRA also the KL
        # reference's, the same modules with the adapters off).
        prefix = PROMPT if n_episodes == 4 else PROMPT + 3
        assert ((1, prefix) in fed) == share
        rl_grads = _grads(learner)
        learner.optimizer.zero_grad(set_to_none=True)
        sft = learner.accumulate_sft_gradients(trained).scalars
        results[share] = (rl, rl_grads, sft, _grads(learner))
    (rl_s, g_s, sft_s, gs_s), (rl_p, g_p, sft_p, gs_p) = results[True], results[False]
    for key in ("loss", "clip_frac", "approx_kl", "ratio_mean", "kl_ref", "entropy", "value_loss"):
        assert rl_s[key] == pytest.approx(rl_p[key], rel=1e-4, abs=1e-6), key
    for key in ("loss", "nll"):
        assert sft_s[key] == pytest.approx(sft_p[key], rel=1e-4, abs=1e-6), key
    for shared, plain in ((g_s, g_p), (gs_s, gs_p)):
        assert shared.keys() == plain.keys() and shared
        for k in plain:
            torch.testing.assert_close(shared[k], plain[k], rtol=1e-4, atol=1e-6)


def test_logprobs_and_values_equal_the_unshared_pass() -> None:
    base = perturbed()
    episodes = shared_prompt_batch(base)
    out = {}
    for share in (True, False):
        config = LearnerConfig(value_head=ValueHeadConfig(init_std=0.1), share_prefix=share)
        torch.manual_seed(0)
        learner = Learner(copy.deepcopy(base), config)
        out[share] = (learner.logprobs(episodes), learner.values(episodes, bootstrap=True))
    (lp_s, v_s), (lp_p, v_p) = out[True], out[False]
    flat = [x for e in lp_p for t in e for x in t]
    assert [x for e in lp_s for t in e for x in t] == pytest.approx(flat, abs=1e-5)
    assert [x for e in v_s for x in e] == pytest.approx([x for e in v_p for x in e], abs=1e-5)
    # And the stored rollout logprobs (one plain forward per episode) are what both score.
    stored = [x for e in episodes for t in e.turns for x in t.completion_logprobs]
    assert flat == pytest.approx(stored, abs=1e-5)


def test_a_filled_cache_holds_the_plain_keys_and_values() -> None:
    """For a later pass that attends to the rows (cached gold probabilities): the cache the
    shared pass leaves equals the plain pass's, row by row."""
    model = perturbed()
    episodes = shared_prompt_batch(model)
    batch = build_token_batch(episodes, [[1.0] * len(e.turns) for e in episodes])
    caches = []
    with torch.no_grad():
        for share in (True, False):
            cache = DynamicCache(config=model.config)
            context_hidden(
                model, batch.input_ids_B_T, batch.lengths_B, share_prefix=share, cache=cache
            )
            caches.append(cache)
    shared, plain = caches
    for a, b in zip(shared.layers, plain.layers, strict=True):
        assert a.keys is not None and b.keys is not None
        assert a.keys.shape == b.keys.shape
        torch.testing.assert_close(a.keys, b.keys, rtol=1e-4, atol=1e-5)
        torch.testing.assert_close(a.values, b.values, rtol=1e-4, atol=1e-5)
