"""Packed micro-batches (several episodes per row) give the padded layout's hidden states,
losses and gradients; the learner's device, precision, attention and checkpointing switches."""

from __future__ import annotations

import copy

import pytest
import torch
import transformers
from fakes import with_advantages
from test_learner import make_episode, tiny_model, with_model_logprobs

from turnrl.agent.records import Episode
from turnrl.rl.batch import build_token_batch
from turnrl.rl.learner import Learner
from turnrl.rl.learner_config import LearnerConfig, LossWeighting, ValueHeadConfig
from turnrl.rl.logprobs import decoder_hidden
from turnrl.rl.packing import block_causal_mask, pack_micro_batches, plan_packs
from turnrl.rl.placement import resolve_device

SHAPES = [
    [(5, 6, 3), (0, 4, 2)],
    [(4, 5, 4)],
    [(6, 3, 2), (0, 7, 1), (0, 2, 2)],
    [(3, 8, 5)],
    [(7, 2, 1)],
    [(2, 9, 0)],
]


def varied_episodes(model: torch.nn.Module) -> list[Episode]:
    """Six episodes of 10-20 tokens: packed rows of the longest hold two or three each."""
    episodes = [make_episode(f"e{i}", s, seed=40 + i) for i, s in enumerate(SHAPES)]
    advantages = [[1.0, -0.5, 0.3][: len(s)] for s in SHAPES]
    advantages[4] = [-1.0]
    return with_advantages(with_model_logprobs(model, episodes), advantages)


def test_plan_packs_places_every_index_once_within_the_width() -> None:
    lengths = [9, 3, 7, 1, 5, 5, 12, 2]
    rows = plan_packs(lengths, 10)
    assert sorted(i for r in rows for i in r) == list(range(len(lengths)))
    assert all(sum(lengths[i] for i in r) <= 10 for r in rows if len(r) > 1)
    assert [6] in rows  # longer than the width: a row of its own
    # First-fit decreasing: 9+1, 7+3, 5+5, 2 -> 5 rows for 49 tokens (a lower bound is 5).
    assert len(rows) == 5


def test_block_causal_mask_confines_attention_to_each_episode() -> None:
    mask = block_causal_mask(torch.tensor([[0, 0, 3, 3, 3, -1]]))[0, 0]
    expected = torch.tensor(
        [
            [1, 0, 0, 0, 0, 0],
            [1, 1, 0, 0, 0, 0],
            [0, 0, 1, 0, 0, 0],
            [0, 0, 1, 1, 0, 0],
            [0, 0, 1, 1, 1, 0],
            [0, 0, 0, 0, 0, 1],
        ],
        dtype=torch.bool,
    )
    assert torch.equal(mask, expected)


@pytest.mark.parametrize("attention", ["sdpa", "eager"])
def test_packed_hidden_states_equal_each_episode_alone(attention: str) -> None:
    model = tiny_model()
    model.set_attn_implementation(attention)
    episodes = varied_episodes(model)
    advantages = [[t.advantage for t in e.turns] for e in episodes]
    packed = pack_micro_batches(episodes, advantages, 10_000)
    assert len(packed) == 1 and packed[0].input_ids_B_T.shape[0] < len(episodes)
    with torch.no_grad():
        hidden_B_T_H = decoder_hidden(model, packed[0])
        for i, e in enumerate(episodes):
            alone = build_token_batch([e], [advantages[i]])
            expected_T_H = decoder_hidden(model, alone)[0]
            segments_B_T = packed[0].segments_B_T
            assert segments_B_T is not None
            got_T_H = hidden_B_T_H[segments_B_T == i]
            torch.testing.assert_close(got_T_H, expected_T_H, atol=1e-5, rtol=1e-5)


def gradients(
    learner: Learner, episodes: list[Episode], targets: list[list[float | None]] | None
) -> tuple[dict[str, float], list[torch.Tensor]]:
    result = learner.accumulate_gradients(episodes, targets)
    params = learner.trainable_parameters + learner.value_parameters
    grads = [torch.zeros_like(p) if p.grad is None else p.grad.clone() for p in params]
    learner.optimizer.zero_grad(set_to_none=True)
    return dict(result.scalars), grads


@pytest.mark.parametrize("weighting", ["token", "episode"])
@pytest.mark.parametrize("value_head", [False, True])
def test_packed_losses_and_gradients_equal_the_padded_ones(
    weighting: LossWeighting, value_head: bool
) -> None:
    model = tiny_model()
    episodes = varied_episodes(model)
    targets: list[list[float | None]] | None = None
    head = None
    if value_head:
        head = ValueHeadConfig(init_std=0.1, backprop_to_policy=True)
        targets = [
            [0.5 * j - 0.2 * i if (i + j) % 3 else None for j in range(len(s))]
            for i, s in enumerate(SHAPES)
        ]
    # A budget of 40 tokens: two padded micro-batches of several rows, or packed micro-batches
    # of two rows of the longest episode.
    base = {"micro_batch_tokens": 40, "loss_weighting": weighting, "value_head": head}
    base["kl_coef"] = 0.1
    padded = Learner(copy.deepcopy(model), LearnerConfig(**base, share_prefix=False))
    packed = Learner(copy.deepcopy(model), LearnerConfig(**base, packing=True))
    if padded.value_head is not None and packed.value_head is not None:
        packed.value_head.load_state_dict(padded.value_head.state_dict())
    # Make the ratio move (PPO's clip and the KL term): perturb both copies alike.
    with torch.no_grad():
        for a, b in zip(padded.model.parameters(), packed.model.parameters(), strict=True):
            delta = 0.02 * torch.sin(torch.arange(a.numel(), dtype=a.dtype)).view_as(a)
            a.add_(delta)
            b.add_(delta)
    pad_scalars, pad_grads = gradients(padded, episodes, targets)
    pack_scalars, pack_grads = gradients(packed, episodes, targets)
    assert pack_scalars["n_padded_tokens"] < pad_scalars["n_padded_tokens"]
    for key in ("loss", "clip_frac", "approx_kl", "entropy", "kl_ref"):
        assert pack_scalars[key] == pytest.approx(pad_scalars[key], rel=1e-5, abs=1e-7), key
    if value_head:
        assert pack_scalars["value_loss"] == pytest.approx(pad_scalars["value_loss"], rel=1e-5)
    assert any(float(g.abs().sum()) > 0 for g in pad_grads)
    for g_pad, g_pack in zip(pad_grads, pack_grads, strict=True):
        torch.testing.assert_close(g_pack, g_pad, atol=1e-6, rtol=1e-4)


@pytest.mark.parametrize("weighting", ["token", "episode"])
def test_packed_sft_step_equals_the_padded_one(weighting: LossWeighting) -> None:
    model = tiny_model()
    episodes = varied_episodes(model)
    cfg = {"micro_batch_tokens": 40, "loss_weighting": weighting, "lr": 1e-3}
    padded = Learner(copy.deepcopy(model), LearnerConfig(**cfg, share_prefix=False))
    packed = Learner(copy.deepcopy(model), LearnerConfig(**cfg, packing=True))
    a, b = padded.sft_step(episodes), packed.sft_step(episodes)
    assert b.scalars["loss"] == pytest.approx(a.scalars["loss"], rel=1e-5)
    assert b.scalars["nll"] == pytest.approx(a.scalars["nll"], rel=1e-5)
    # Adam's first step is ~lr * sign(grad): a gradient near 0 turns rounding into up to 1% of
    # a step (lr 1e-3); the gradients themselves are compared exactly above.
    for p, q in zip(padded.model.parameters(), packed.model.parameters(), strict=True):
        torch.testing.assert_close(q, p, atol=1e-5, rtol=1e-5)


def test_packing_and_share_prefix_exclude_each_other_in_config() -> None:
    config = LearnerConfig(packing=True)
    assert config.share_prefix is False
    assert LearnerConfig.model_validate(config.model_dump()) == config
    with pytest.raises(ValueError, match=r"share_prefix cannot be combined with learner\.packing"):
        LearnerConfig(packing=True, share_prefix=True)
    with pytest.raises(ValueError, match="gradient_checkpointing"):
        LearnerConfig(gradient_checkpointing=True, share_prefix=True)
    assert LearnerConfig().share_prefix is True  # the default is unchanged


def test_device_auto_is_the_cpu_without_cuda() -> None:
    if torch.cuda.is_available():
        pytest.skip("this machine has cuda")
    assert resolve_device("auto") == torch.device("cpu")
    with pytest.raises(ValueError, match="no cuda device"):
        resolve_device("cuda")


def test_flash_attention_2_is_refused_on_the_cpu() -> None:
    with pytest.raises(ValueError, match="flash_attention_2 needs a cuda device"):
        Learner(tiny_model(), LearnerConfig(device="cpu", attention="flash_attention_2"))


def test_gradient_checkpointing_gives_the_same_gradients() -> None:
    model = tiny_model()
    episodes = varied_episodes(model)
    plain = Learner(copy.deepcopy(model), LearnerConfig(share_prefix=False))
    ckpt = Learner(copy.deepcopy(model), LearnerConfig(gradient_checkpointing=True))
    assert any(getattr(m, "gradient_checkpointing", False) for m in ckpt.model.modules())
    a_scalars, a = gradients(plain, episodes, None)
    b_scalars, b = gradients(ckpt, episodes, None)
    assert b_scalars["loss"] == pytest.approx(a_scalars["loss"], rel=1e-6)
    for x, y in zip(a, b, strict=True):
        torch.testing.assert_close(y, x, atol=1e-7, rtol=1e-5)


@pytest.mark.parametrize("packing", [False, True])
def test_bfloat16_keeps_float32_weights_and_float32_logprobs(packing: bool) -> None:
    model = tiny_model()
    episodes = varied_episodes(model)
    fp32 = Learner(copy.deepcopy(model), LearnerConfig(lr=1e-3, packing=packing))
    bf16 = Learner(
        copy.deepcopy(model).to(torch.bfloat16),  # type: ignore[arg-type]
        LearnerConfig(lr=1e-3, dtype="bfloat16", packing=packing),
    )
    # Master weights are float32 even for a model handed over in bf16.
    assert all(p.dtype == torch.float32 for p in bf16.model.parameters())
    a, b = fp32.step(episodes), bf16.step(episodes)
    assert not b.skipped and b.version == 1
    # The same step to bf16 rounding (8 bits of mantissa: ~1e-2 relative).
    assert b.scalars["loss"] == pytest.approx(a.scalars["loss"], rel=0.05, abs=0.02)
    scored = bf16.logprobs(episodes)
    assert all(isinstance(x, float) for turn in scored[0] for x in turn)
    reference = fp32.logprobs(episodes)
    diffs = [
        abs(x - y)
        for e_a, e_b in zip(scored, reference, strict=True)
        for t_a, t_b in zip(e_a, e_b, strict=True)
        for x, y in zip(t_a, t_b, strict=True)
    ]
    assert 0 < max(diffs) < 0.1


def test_a_bf16_model_stays_trainable_in_plain_float32_config() -> None:
    # dtype float32 never casts: a model handed in float32 stays float32.
    model = tiny_model()
    learner = Learner(model, LearnerConfig())
    assert learner.device == torch.device("cpu")
    assert all(p.dtype == torch.float32 for p in model.parameters())
    assert isinstance(model, transformers.LlamaForCausalLM)
