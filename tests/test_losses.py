"""PPO-clip and KL estimators against numbers worked out by hand."""

from __future__ import annotations

import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from turnrl.rl.losses import (
    KL_ESTIMATORS,
    entropy_from_logprobs,
    kl_penalty,
    ppo_clip_loss,
    sample_weights,
    sft_loss,
    value_loss,
)

# Six tokens, clip 0.2 on both sides, so ratios are clipped to [0.8, 1.2]; per-token loss is
# the pessimistic max(-A r, -A clip(r)):
#   t0  r=1.5 A=+1: max(-1.5, -1.2) = -1.2  clipped branch -> no gradient
#   t1  r=0.5 A=+1: max(-0.5, -0.8) = -0.5  unclipped -> d/dlogp = -A r = -0.5
#   t2  r=0.5 A=-1: max(+0.5, +0.8) = +0.8  clipped -> no gradient
#   t3  r=1.5 A=-1: max(+1.5, +1.2) = +1.5  unclipped -> d/dlogp = -A r = +1.5
#   t4  r=1.1 A=+2: max(-2.2, -2.2) = -2.2  inside the band -> d/dlogp = -2.2
#   t5  masked out (r=10, A=5): contributes nothing
# Sum over the 5 trained tokens = -1.2 - 0.5 + 0.8 + 1.5 - 2.2 = -1.6; token mean = -0.32.
# Gradients are divided by 5: [0, -0.1, 0, 0.3, -0.44, 0]. clip_frac = 2/5.
# ratio_mean = (1.5 + 0.5 + 0.5 + 1.5 + 1.1) / 5 = 1.02.
# approx_kl = mean(r - 1 - log r) = (2(0.5 - ln 1.5) + 2(-0.5 + ln 2) + (0.1 - ln 1.1)) / 5.
RATIOS = [1.5, 0.5, 0.5, 1.5, 1.1, 10.0]
ADVANTAGES = [1.0, 1.0, -1.0, -1.0, 2.0, 5.0]
MASK = [True, True, True, True, True, False]


def _inputs() -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    old = torch.tensor([[-1.0, -2.0, -0.5, -3.0, -1.5, -0.7]])
    logprobs = (old + torch.tensor([RATIOS]).log()).requires_grad_(True)
    return logprobs, old, torch.tensor([ADVANTAGES]), torch.tensor([MASK])


def test_ppo_clip_hand_values_and_gradients() -> None:
    logprobs, old, adv, mask = _inputs()
    loss, metrics = ppo_clip_loss(logprobs, old, adv, mask)
    loss.backward()
    assert loss.item() == pytest.approx(-0.32, abs=1e-6)
    assert logprobs.grad is not None
    assert logprobs.grad[0].tolist() == pytest.approx([0.0, -0.1, 0.0, 0.3, -0.44, 0.0], abs=1e-6)
    assert metrics["clip_frac"].item() == pytest.approx(0.4)
    assert metrics["ratio_mean"].item() == pytest.approx(1.02, abs=1e-6)
    approx_kl = (2 * (0.5 - math.log(1.5)) + 2 * (-0.5 + math.log(2.0)) + (0.1 - math.log(1.1))) / 5
    assert metrics["approx_kl"].item() == pytest.approx(approx_kl, abs=1e-6)


def test_clip_higher_is_asymmetric() -> None:
    # clip_low 0.2, clip_high 0.28 (DAPO): band [0.8, 1.28].
    #   r=1.5  A=+1: max(-1.5, -1.28) = -1.28 (clipped at the higher bound)
    #   r=1.25 A=+1: max(-1.25, -1.25) = -1.25 (inside the band; 0.2 would have clipped it)
    #   r=0.7  A=-1: max(+0.7, +0.8) = +0.8 (clipped at the unchanged lower bound)
    # mean = (-1.28 - 1.25 + 0.8) / 3 = -0.57666...
    old = torch.zeros(1, 3)
    logprobs = torch.tensor([[1.5, 1.25, 0.7]]).log()
    adv = torch.tensor([[1.0, 1.0, -1.0]])
    loss, metrics = ppo_clip_loss(
        logprobs, old, adv, torch.ones(1, 3, dtype=torch.bool), clip_low=0.2, clip_high=0.28
    )
    assert loss.item() == pytest.approx((-1.28 - 1.25 + 0.8) / 3, abs=1e-6)
    assert metrics["clip_frac"].item() == pytest.approx(2 / 3)


def test_ratio_one_gives_minus_mean_advantage() -> None:
    # At the first step the policy equals the rollout policy: r = 1 everywhere, nothing is
    # clipped, and the loss is -(1 + 3 - 2) / 3 over the trained tokens.
    lp = torch.tensor([[-1.0, -2.0, -3.0, -4.0]])
    adv = torch.tensor([[1.0, 3.0, -2.0, 7.0]])
    mask = torch.tensor([[1.0, 1.0, 1.0, 0.0]])
    loss, metrics = ppo_clip_loss(lp, lp.clone(), adv, mask)
    assert loss.item() == pytest.approx(-2 / 3)
    assert metrics["clip_frac"].item() == 0.0
    assert metrics["approx_kl"].item() == 0.0
    assert metrics["ratio_mean"].item() == pytest.approx(1.0)


def test_token_level_aggregation_with_step_denominator() -> None:
    # Same tokens as the hand example: sum -1.6; with n_tokens=10 (a micro-batch of a step
    # that trains 10 tokens in all) the loss is -1.6 / 10 and clip_frac 2 / 10.
    logprobs, old, adv, mask = _inputs()
    loss, metrics = ppo_clip_loss(logprobs, old, adv, mask, n_tokens=10)
    assert loss.item() == pytest.approx(-0.16, abs=1e-6)
    assert metrics["clip_frac"].item() == pytest.approx(0.2)
    # Token-level, not sequence-level: a 1-token row with A=1 and a 3-token row with A=0, at
    # r=1, give -(1 + 0 + 0 + 0) / 4 = -0.25; a mean per sequence, then over sequences, would
    # give (-1 + 0) / 2 = -0.5.
    lp = torch.zeros(2, 3)
    mask2 = torch.tensor([[True, False, False], [True, True, True]])
    adv2 = torch.tensor([[1.0, 0.0, 0.0], [0.0, 0.0, 0.0]])
    loss2, _ = ppo_clip_loss(lp, lp, adv2, mask2)
    assert loss2.item() == pytest.approx(-0.25)


def test_masked_tokens_contribute_nothing_even_when_not_finite() -> None:
    logprobs, old, adv, mask = _inputs()
    loss, _ = ppo_clip_loss(logprobs, old, adv, mask)
    loss.backward()
    poisoned = logprobs.detach().clone()
    poisoned[0, 5] = float("-inf")
    poisoned_old = old.clone()
    poisoned_old[0, 5] = float("nan")
    poisoned.requires_grad_(True)
    loss2, metrics2 = ppo_clip_loss(poisoned, poisoned_old, adv, mask)
    loss2.backward()
    assert loss2.item() == pytest.approx(loss.item())
    assert poisoned.grad is not None and logprobs.grad is not None
    assert torch.equal(poisoned.grad, logprobs.grad)
    assert poisoned.grad[0, 5] == 0.0
    assert all(torch.isfinite(v) for v in metrics2.values())


def test_empty_mask_gives_zero_loss() -> None:
    lp = torch.zeros(2, 4, requires_grad=True)
    loss, metrics = ppo_clip_loss(lp, lp.detach(), torch.ones(2, 4), torch.zeros(2, 4))
    loss.backward()
    assert loss.item() == 0.0
    assert lp.grad is not None and not lp.grad.any()
    assert metrics["clip_frac"].item() == 0.0


def test_micro_batch_accumulation_equals_full_batch() -> None:
    torch.manual_seed(0)
    B, T = 6, 9
    base = torch.randn(B, T)
    old = base + 0.3 * torch.randn(B, T)
    ref = base + 0.3 * torch.randn(B, T)
    adv = torch.randn(B, 1).expand(B, T)
    mask = torch.rand(B, T) < 0.6
    n_tokens = int(mask.sum())

    def objective(lp: torch.Tensor, rows: slice, n: int | None) -> torch.Tensor:
        pg, _ = ppo_clip_loss(lp[rows], old[rows], adv[rows], mask[rows], 0.2, 0.28, n)
        kl, _ = kl_penalty(lp[rows], ref[rows], mask[rows], "k3", n)
        return pg + 0.1 * kl

    full = base.clone().requires_grad_(True)
    full_loss = objective(full, slice(None), None)
    full_loss.backward()

    micro = base.clone().requires_grad_(True)
    total = torch.zeros(())
    for rows in (slice(0, 2), slice(2, 3), slice(3, 6)):
        part = objective(micro, rows, n_tokens)
        part.backward()
        total = total + part.detach()

    assert total.item() == pytest.approx(full_loss.item(), abs=1e-6)
    assert full.grad is not None and micro.grad is not None
    torch.testing.assert_close(micro.grad, full.grad, rtol=1e-6, atol=1e-7)


def test_kl_estimators_hand_values() -> None:
    # pi = 0.5, pi_ref = 0.25: d = log(pi_ref / pi) = ln 0.5 = -0.693147
    #   k1 = -d = 0.693147; k2 = d^2 / 2 = 0.240227; k3 = e^d - d - 1 = 0.5 + 0.693147 - 1
    lp = torch.tensor([math.log(0.5)])
    ref = torch.tensor([math.log(0.25)])
    ln2 = math.log(2.0)
    assert KL_ESTIMATORS["k1"](lp, ref).item() == pytest.approx(ln2, abs=1e-6)
    assert KL_ESTIMATORS["k2"](lp, ref).item() == pytest.approx(ln2**2 / 2, abs=1e-6)
    assert KL_ESTIMATORS["k3"](lp, ref).item() == pytest.approx(0.5 + ln2 - 1, abs=1e-6)


def test_kl_penalty_mean_and_gradient() -> None:
    # Two trained tokens: (pi, pi_ref) = (0.5, 0.25) -> k3 = ln 2 - 0.5, and equal -> 0; a
    # third, masked token is ignored. Mean = (ln 2 - 0.5) / 2. d k3 / d logp = 1 - e^d =
    # 1 - 0.5 on the first token, 0 on the second, each divided by 2.
    lp = torch.tensor([[math.log(0.5), -1.0, 0.0]], requires_grad=True)
    ref = torch.tensor([[math.log(0.25), -1.0, -50.0]])
    mask = torch.tensor([[True, True, False]])
    kl, metrics = kl_penalty(lp, ref, mask, "k3")
    kl.backward()
    assert kl.item() == pytest.approx((math.log(2.0) - 0.5) / 2, abs=1e-6)
    assert metrics["kl_ref"].item() == pytest.approx(kl.item())
    assert lp.grad is not None
    assert lp.grad[0].tolist() == pytest.approx([0.25, 0.0, 0.0], abs=1e-6)


@settings(max_examples=50, deadline=None)
@given(
    st.lists(
        st.tuples(st.floats(-20, 0), st.floats(-20, 0)),
        min_size=1,
        max_size=8,
    )
)
def test_k3_is_nonnegative_and_zero_at_equality(pairs: list[tuple[float, float]]) -> None:
    lp = torch.tensor([p[0] for p in pairs], dtype=torch.float64)
    ref = torch.tensor([p[1] for p in pairs], dtype=torch.float64)
    k3 = KL_ESTIMATORS["k3"](lp, ref)
    assert (k3 >= 0).all()
    assert (k3[lp == ref] == 0).all()


def test_entropy_of_uniform_is_log_vocab() -> None:
    lp = torch.log_softmax(torch.zeros(3, 7), dim=-1)
    assert entropy_from_logprobs(lp).tolist() == pytest.approx([math.log(7)] * 3)


def test_n_tokens_must_be_positive() -> None:
    lp = torch.zeros(1, 2)
    with pytest.raises(ValueError, match="n_tokens"):
        ppo_clip_loss(lp, lp, lp, torch.ones(1, 2), n_tokens=0)


# ------------------------------------------------------------------------ loss weighting


def close(actual: torch.Tensor, expected: torch.Tensor | list[list[float]]) -> None:
    torch.testing.assert_close(
        actual, torch.as_tensor(expected, dtype=actual.dtype), rtol=1e-6, atol=1e-7
    )


def test_episode_weighting_hand_values() -> None:
    """Regression lock on the meaning of `loss_weighting`: do not change without a decision.

    Row 0 is an episode with 1 trained token (A=+1), row 1 one with 3 (A=0), ratio 1:
      token:   every token weighs 1/4:               loss = -(1 + 0 + 0 + 0) / 4 = -0.25
      episode: row 0's token weighs 1/(1*2) = 1/2,
               row 1's tokens 1/(3*2) = 1/6 each:    loss = -(1/2 * 1 + 3 * 1/6 * 0) = -0.5
    The gradient d loss / d logp is -A * w: [-1/4, 0, 0, 0] vs [-1/2, 0, 0, 0].
    """
    mask = torch.tensor([[True, False, False], [True, True, True]])
    adv = torch.tensor([[1.0, 0.0, 0.0], [0.0, 0.0, 0.0]])
    token_w = sample_weights(mask, "token", n_samples=4, n_rows=2)
    episode_w = sample_weights(mask, "episode", n_samples=4, n_rows=2)
    close(token_w, [[0.25, 0, 0], [0.25, 0.25, 0.25]])
    close(episode_w, [[0.5, 0, 0], [1 / 6, 1 / 6, 1 / 6]])
    for weights, expected in ((token_w, -0.25), (episode_w, -0.5)):
        lp = torch.zeros(2, 3, requires_grad=True)
        loss, metrics = ppo_clip_loss(lp, lp.detach(), adv, mask, weights_B_T=weights)
        loss.backward()
        assert loss.item() == pytest.approx(expected)
        assert lp.grad is not None
        close(lp.grad, -adv * weights)
        assert metrics["ratio_mean"].item() == pytest.approx(1.0)
    # Token weights reproduce the plain token mean.
    plain, _ = ppo_clip_loss(torch.zeros(2, 3), torch.zeros(2, 3), adv, mask)
    assert plain.item() == pytest.approx(-0.25)


def test_weights_and_n_tokens_are_exclusive() -> None:
    lp = torch.zeros(1, 2)
    mask = torch.ones(1, 2, dtype=torch.bool)
    with pytest.raises(ValueError, match="either n_tokens or weights"):
        ppo_clip_loss(lp, lp, lp, mask, n_tokens=2, weights_B_T=torch.full((1, 2), 0.5))
    with pytest.raises(ValueError, match="positive"):
        sample_weights(mask, "episode", n_samples=0, n_rows=0)


row_masks = st.lists(st.lists(st.booleans(), min_size=4, max_size=4), min_size=1, max_size=7)


@settings(max_examples=80, deadline=None)
@given(row_masks, st.integers(1, 6))
def test_weights_split_the_step_by_convention(rows: list[list[bool]], split: int) -> None:
    """Whatever the micro-batch split, built from step-wide counts: token weights are 1/N on
    every sample; episode weights give each episode with samples 1/E in all; both sum to 1."""
    mask = torch.tensor(rows)
    n, n_rows = int(mask.sum()), int(mask.any(dim=1).sum())
    if n == 0:
        return
    parts = [mask[i : i + split] for i in range(0, len(rows), split)]
    token = torch.cat([sample_weights(m, "token", n, n_rows) for m in parts])
    episode = torch.cat([sample_weights(m, "episode", n, n_rows) for m in parts])
    assert torch.equal(token == 0, ~mask) and torch.equal(episode == 0, ~mask)
    assert token[mask].tolist() == pytest.approx([1 / n] * n)
    assert token.sum().item() == pytest.approx(1.0)
    assert episode.sum().item() == pytest.approx(1.0)
    per_row = episode.sum(dim=1)
    assert per_row[mask.any(dim=1)].tolist() == pytest.approx([1 / n_rows] * n_rows)


def test_episode_weighted_micro_batches_equal_full_batch() -> None:
    torch.manual_seed(1)
    B, T = 6, 9
    base = torch.randn(B, T)
    old = base + 0.3 * torch.randn(B, T)
    ref = base + 0.3 * torch.randn(B, T)
    adv = torch.randn(B, 1).expand(B, T)
    mask = torch.rand(B, T) < 0.6
    mask[2] = False  # an episode without trained tokens takes no share
    n, n_rows = int(mask.sum()), int(mask.any(dim=1).sum())

    def objective(lp: torch.Tensor, rows: slice) -> torch.Tensor:
        w = sample_weights(mask[rows], "episode", n, n_rows)
        pg, _ = ppo_clip_loss(lp[rows], old[rows], adv[rows], mask[rows], 0.2, 0.28, None, w)
        kl, _ = kl_penalty(lp[rows], ref[rows], mask[rows], "k3", None, w)
        return pg + 0.1 * kl

    full = base.clone().requires_grad_(True)
    full_loss = objective(full, slice(None))
    full_loss.backward()
    micro = base.clone().requires_grad_(True)
    total = torch.zeros(())
    for rows in (slice(0, 2), slice(2, 3), slice(3, 6)):
        part = objective(micro, rows)
        part.backward()
        total = total + part.detach()
    assert total.item() == pytest.approx(full_loss.item(), abs=1e-6)
    assert full.grad is not None and micro.grad is not None
    torch.testing.assert_close(micro.grad, full.grad, rtol=1e-6, atol=1e-7)
    # And it is the mean over episodes of each episode's own token-mean loss.
    per_episode = []
    for b in range(B):
        if mask[b].any():
            one = slice(b, b + 1)
            pg, _ = ppo_clip_loss(base[one], old[one], adv[one], mask[one], 0.2, 0.28)
            kl, _ = kl_penalty(base[one], ref[one], mask[one], "k3")
            per_episode.append((pg + 0.1 * kl).item())
    assert full_loss.item() == pytest.approx(sum(per_episode) / n_rows, abs=1e-6)


def test_value_loss_hand_values() -> None:
    # Values V and targets G of two episodes (turns without a target are masked):
    #   row 0: V = [1.0, 2.0, 9.0], G = [0.0, 2.0, -]  -> errors 1, 0
    #   row 1: V = [0.5, 7.0, 7.0], G = [1.5, -, -]    -> error -1
    # token (each turn weighs 1/3): (1 + 0 + 1) / 3 = 2/3;  dL/dV = 2 (V - G) / 3
    # episode (row 0's turns 1/4, row 1's 1/2): (1 + 0) / 4 + 1 / 2 = 0.75;  dL/dV = 2 (V - G) w
    values = torch.tensor([[1.0, 2.0, 9.0], [0.5, 7.0, 7.0]])
    targets = torch.tensor([[0.0, 2.0, 0.0], [1.5, 0.0, 0.0]])
    mask = torch.tensor([[True, True, False], [True, False, False]])
    v = values.clone().requires_grad_(True)
    loss, metrics = value_loss(v, targets, mask)
    loss.backward()
    assert loss.item() == pytest.approx(2 / 3)
    assert metrics["value_loss"].item() == pytest.approx(2 / 3)
    assert metrics["value_mean"].item() == pytest.approx((1.0 + 2.0 + 0.5) / 3)
    assert metrics["value_target_mean"].item() == pytest.approx((0.0 + 2.0 + 1.5) / 3)
    assert v.grad is not None
    close(v.grad, [[2 / 3, 0, 0], [-2 / 3, 0, 0]])
    v = values.clone().requires_grad_(True)
    w = sample_weights(mask, "episode", n_samples=3, n_rows=2)
    loss, _ = value_loss(v, targets, mask, weights_B_J=w)
    loss.backward()
    assert loss.item() == pytest.approx(0.75)
    assert v.grad is not None
    close(v.grad, [[0.5, 0, 0], [-1.0, 0, 0]])


def test_sft_loss_hand_values() -> None:
    """Regression lock on the SFT objective (do not change without a decision).

    Row 0 clones 2 tokens with weight a=1 (logprobs -1, -2); row 1 has 3 tokens with a=2, 2, 0
    (logprobs -0.5, -1.5, -3); column 3 is masked and holds -inf:
      token (w = 1/5):       loss = (1*1 + 1*2 + 2*0.5 + 2*1.5 + 0*3) / 5 = 7/5
      episode (w = 1/(n_i E)): row 0 (1 + 2) / (2*2) + row 1 (1 + 3 + 0) / (3*2) = 3/4 + 2/3
    nll is the plain token mean under both: (1 + 2 + 0.5 + 1.5 + 3) / 5 = 1.6.
    The gradient d loss / d logp is -a * w.
    """
    base = torch.tensor([[-1.0, -2.0, 0.0, -math.inf], [-0.5, -1.5, -3.0, -math.inf]])
    turn_w = torch.tensor([[1.0, 1.0, 0.0, 9.0], [2.0, 2.0, 0.0, 9.0]])
    mask = torch.tensor([[True, True, False, False], [True, True, True, False]])
    episode_w = sample_weights(mask, "episode", n_samples=5, n_rows=2)
    cases = [(None, 7 / 5, 0.2 * mask), (episode_w, 3 / 4 + 2 / 3, episode_w)]
    for weights, expected, w in cases:
        lp = base.clone().requires_grad_(True)
        loss, metrics = sft_loss(lp, turn_w, mask, n_tokens=5, weights_B_T=weights)
        loss.backward()
        assert loss.item() == pytest.approx(expected)
        assert metrics["nll"].item() == pytest.approx(1.6)
        assert lp.grad is not None
        close(lp.grad, torch.where(mask, -turn_w * w, 0.0))
