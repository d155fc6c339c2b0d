"""Off-policy corrections (`turnrl.rl.offpolicy`) against numbers worked out by hand, and the
default loss locked to the one before the corrections existed."""

from __future__ import annotations

import math

import pytest
import torch
from test_learner import make_episode

from turnrl.rl.batch import build_token_batch
from turnrl.rl.learner_config import LearnerConfig, LossWeighting
from turnrl.rl.losses import ppo_clip_loss, sample_weights
from turnrl.rl.offpolicy import (
    clipped_surrogate,
    importance_metrics,
    log_importance_weights,
    masked_weights,
    sequence_mean,
    sequence_sum,
    truncated_weights,
)
from turnrl.rl.step_losses import policy_loss

# ------------------------------------------------------------------------ sequence reductions


def test_sequence_sum_and_mean_by_hand() -> None:
    # Row 0: sequence 10 = tokens 1, 2 (1 + 2 = 3), sequence 11 = token 4 (3).
    # Row 1: sequence 20 = tokens 1, 2 (4 + 6 = 10), sequence 21 = token 3 (8).
    # Untrained positions hold 9 and a junk id; they count nowhere and come out 0.
    x = torch.tensor([[9.0, 1, 2, 9, 3, 9], [9.0, 4, 6, 8, 9, 9]], requires_grad=True)
    mask = torch.tensor([[0, 1, 1, 0, 1, 0], [0, 1, 1, 1, 0, 0]], dtype=torch.bool)
    seq = torch.tensor([[-1, 10, 10, -1, 11, 7], [-1, 20, 20, 21, -1, -1]])
    summed = sequence_sum(x, mask, seq)
    assert summed.tolist() == [[0, 3, 3, 0, 3, 0], [0, 10, 10, 8, 0, 0]]
    assert sequence_mean(x, mask, seq).tolist() == [[0, 1.5, 1.5, 0, 3, 0], [0, 5, 5, 8, 0, 0]]
    # d(sum of every token's sequence total)/dx_t = the length of t's sequence.
    summed.sum().backward()
    assert x.grad is not None
    assert x.grad.tolist() == [[0, 2, 2, 0, 1, 0], [0, 2, 2, 1, 0, 0]]


# ------------------------------------------------------------------- importance weights

# One row: position 0 is prompt, 1-4 are trained, 5 is padding. Two sequences (turns):
# A = tokens 1, 2; B = tokens 3, 4. Token weights w = pi_prox / pi_behav:
#   A: 0.5, 3.0 (product 1.5)      B: 1.5, 1.8 (product 2.7)
MASK = torch.tensor([[False, True, True, True, True, False]])
SEQ = torch.tensor([[-1, 0, 0, 1, 1, -1]])
W = [0.5, 3.0, 1.5, 1.8]
BEHAVIOUR = torch.tensor([[0.0, -1.0, -2.0, -0.5, -1.5, 0.0]])
PROXIMAL = BEHAVIOUR + torch.tensor([[0.0, *map(math.log, W), 0.0]])


def _log_w(level: str) -> torch.Tensor:
    return log_importance_weights(PROXIMAL, BEHAVIOUR, MASK, SEQ if level == "sequence" else None)


def test_log_weights_per_token_and_per_sequence() -> None:
    token = _log_w("token")[0].exp().tolist()
    assert token == pytest.approx([1.0, *W, 1.0], abs=1e-6)  # exp(0) off the mask
    # Each token carries its sequence's product: A 0.5 * 3 = 1.5, B 1.5 * 1.8 = 2.7.
    assert _log_w("sequence")[0].exp().tolist() == pytest.approx([1, 1.5, 1.5, 2.7, 2.7, 1], 1e-6)


@pytest.mark.parametrize(
    ("level", "weights", "changed"),
    [
        # Token TIS, C = 2: only the 3.0 is cut, min(3, 2) = 2.
        ("token", [0.5, 2.0, 1.5, 1.8], [False, True, False, False]),
        # Sequence TIS, C = 2: A's product 1.5 stays; B's 2.7 becomes 2 on both its tokens,
        # although neither of B's token weights exceeds 2.
        ("sequence", [1.5, 1.5, 2.0, 2.0], [False, False, True, True]),
    ],
)
def test_truncated_is_by_hand(level: str, weights: list[float], changed: list[bool]) -> None:
    w, truncated = truncated_weights(_log_w(level), MASK, cap=2.0)
    assert w[0].tolist() == pytest.approx([0.0, *weights, 0.0], abs=1e-6)
    assert truncated[0].tolist() == [False, *changed, False]


@pytest.mark.parametrize(
    ("level", "weights", "changed"),
    [
        # Token MIS, band [0.6, 2.5]: 0.5 (below) and 3.0 (above) are dropped, 1.5 and 1.8
        # keep their weight (IcePop's M(k) = k inside the band).
        ("token", [0.0, 0.0, 1.5, 1.8], [True, True, False, False]),
        # Sequence MIS, same band: A (1.5) kept whole, B (2.7) dropped whole.
        ("sequence", [1.5, 1.5, 0.0, 0.0], [False, False, True, True]),
    ],
)
def test_masked_is_by_hand(level: str, weights: list[float], changed: list[bool]) -> None:
    w, masked = masked_weights(_log_w(level), MASK, low=0.6, high=2.5)
    assert w[0].tolist() == pytest.approx([0.0, *weights, 0.0], abs=1e-6)
    assert masked[0].tolist() == [False, *changed, False]


def test_a_sequence_weight_far_beyond_float_range_is_truncated_not_inf() -> None:
    # 100 tokens of w = e^2: the product e^200 overflows float32, its log does not.
    mask = torch.ones(1, 100, dtype=torch.bool)
    seq = torch.zeros(1, 100, dtype=torch.long)
    log_w = log_importance_weights(torch.full((1, 100), 2.0), torch.zeros(1, 100), mask, seq)
    w, truncated = truncated_weights(log_w, mask, cap=5.0)
    assert torch.allclose(w, torch.full_like(w, 5.0)) and bool(truncated.all())
    w, masked = masked_weights(log_w, mask, low=0.2, high=5.0)
    assert not w.any() and bool(masked.all())


def test_importance_metrics_by_hand() -> None:
    # Sequence TIS at C = 2 (above): applied weights 1.5, 1.5, 2, 2.
    #   is_weight_mean = 7 / 4 = 1.75; is_token_frac = 2 / 4 (B's tokens);
    #   is_seq_frac = 1 / 2 (B of A, B);
    #   behaviour_kl = mean over tokens of w - 1 - ln w with the *token* weights:
    #   (0.5 - 1 + ln 2) + (3 - 1 - ln 3) + (1.5 - 1 - ln 1.5) + (1.8 - 1 - ln 1.8), over 4.
    w, truncated = truncated_weights(_log_w("sequence"), MASK, cap=2.0)
    metrics = importance_metrics(_log_w("token"), w, truncated, MASK, SEQ, n_sequences=2)
    kl = sum(x - 1 - math.log(x) for x in W) / 4
    assert metrics["is_weight_mean"].item() == pytest.approx(1.75, abs=1e-6)
    assert metrics["is_token_frac"].item() == pytest.approx(0.5)
    assert metrics["is_seq_frac"].item() == pytest.approx(0.5)
    assert metrics["behaviour_kl"].item() == pytest.approx(kl, abs=1e-6)
    assert kl == pytest.approx(0.350321, abs=1e-6)
    # A step of 8 trained tokens and 4 sequences (this micro-batch is half of it): the
    # figures are this micro-batch's share, so the step's micro-batches add up.
    half = importance_metrics(_log_w("token"), w, truncated, MASK, SEQ, n_sequences=4, n_tokens=8)
    assert half["is_weight_mean"].item() == pytest.approx(7 / 8, abs=1e-6)
    assert half["is_seq_frac"].item() == pytest.approx(1 / 4)


# ---------------------------------------------------------------------------- the losses


def test_decoupled_ppo_by_hand() -> None:
    """Three trained tokens; clip 0.2, so ratios clip to [0.8, 1.2]. The ratio r = pi /
    pi_prox and the weight w = pi_prox / pi_behav; per-token loss w * max(-A r, -A clip(r)):
      t0  r=1.5 A=+1 w=0.5: 0.5 * max(-1.5, -1.2) = -0.6  clipped -> no gradient
      t1  r=0.9 A=+1 w=2.0: 2.0 * max(-0.9, -0.9) = -1.8  in the band -> d/dlogp = -A r w = -1.8
      t2  r=0.5 A=-1 w=1.0: 1.0 * max(+0.5, +0.8) = +0.8  clipped -> no gradient
    Token mean: (-0.6 - 1.8 + 0.8) / 3 = -1.6 / 3; gradients [0, -0.6, 0]. Against the
    behaviour policy instead (plain PPO: r = pi / pi_behav = 0.75, 1.8, 0.5; no weight):
      t0  max(-0.75, -0.8) = -0.75 (gradient -0.75), t1 max(-1.8, -1.2) = -1.2 (clipped),
      t2  +0.8 (clipped): mean (-0.75 - 1.2 + 0.8) / 3 = -1.15 / 3."""
    mask = torch.ones(1, 3, dtype=torch.bool)
    prox = torch.tensor([[-1.0, -2.0, -0.5]])
    behaviour = prox - torch.tensor([[0.5, 2.0, 1.0]]).log()
    current = (prox + torch.tensor([[1.5, 0.9, 0.5]]).log()).requires_grad_(True)
    adv = torch.tensor([[1.0, 1.0, -1.0]])
    w = log_importance_weights(prox, behaviour, mask).exp()
    loss, metrics = clipped_surrogate(current, prox, adv, mask, is_weights_B_T=w)
    loss.backward()
    assert loss.item() == pytest.approx(-1.6 / 3, abs=1e-6)
    assert current.grad is not None
    assert current.grad[0].tolist() == pytest.approx([0.0, -0.6, 0.0], abs=1e-6)
    assert metrics["clip_frac"].item() == pytest.approx(2 / 3)
    plain, plain_metrics = clipped_surrogate(current, behaviour, adv, mask)
    assert plain.item() == pytest.approx(-1.15 / 3, abs=1e-6)
    assert plain_metrics["clip_frac"].item() == pytest.approx(2 / 3)


def test_gspo_sequence_ratio_by_hand() -> None:
    """Two sequences of two tokens, clip [0.8, 1.2]. Token ratios pi / pi_old:
      A (A=+1): 1.2, 1.5 -> s_A = sqrt(1.2 * 1.5) = sqrt(1.8) = 1.341641 > 1.2: clipped,
                max(-1.341641, -1.2) = -1.2 on both tokens, no gradient (token-level PPO
                would have kept t0's gradient: 1.2 is inside the band)
      B (A=-1): 0.9, 1.0 -> s_B = sqrt(0.9) = 0.948683, inside: +0.948683 on both tokens.
    Token mean: (2 * -1.2 + 2 * 0.948683) / 4 = -0.125658. Gradient to each of B's logprobs:
    d(-A s_B)/dlogp_t = s_B / 2 (the mean over B's 2 tokens), times B's 2 tokens / 4 in the
    mean: 0.948683 / 4 = 0.237171. clip_frac = 2 / 4; ratio_mean = (2 s_A + 2 s_B) / 4."""
    mask = torch.ones(1, 4, dtype=torch.bool)
    seq = torch.tensor([[3, 3, 8, 8]])
    old = torch.tensor([[-1.0, -0.7, -2.0, -0.3]])
    current = (old + torch.tensor([[1.2, 1.5, 0.9, 1.0]]).log()).requires_grad_(True)
    adv = torch.tensor([[1.0, 1.0, -1.0, -1.0]])
    loss, metrics = clipped_surrogate(current, old, adv, mask, sequence_B_T=seq)
    loss.backward()
    s_a, s_b = math.sqrt(1.8), math.sqrt(0.9)
    assert loss.item() == pytest.approx((-2.4 + 2 * s_b) / 4, abs=1e-6)
    assert loss.item() == pytest.approx(-0.125658, abs=1e-6)
    assert current.grad is not None
    assert current.grad[0].tolist() == pytest.approx([0, 0, s_b / 4, s_b / 4], abs=1e-6)
    assert metrics["clip_frac"].item() == pytest.approx(0.5)
    assert metrics["ratio_mean"].item() == pytest.approx((s_a + s_b) / 2, abs=1e-6)
    # GSPO's own clip range (3e-4, 4e-4) clips both: each sequence's ratio is far from 1.
    _, tight = clipped_surrogate(
        current, old, adv, mask, sequence_B_T=seq, clip_low=3e-4, clip_high=4e-4
    )
    assert tight["clip_frac"].item() == 1.0


def test_weights_of_one_change_nothing() -> None:
    logprobs = torch.randn(2, 7, generator=torch.Generator().manual_seed(0))
    old = logprobs + 0.3 * torch.randn(2, 7, generator=torch.Generator().manual_seed(1))
    adv = torch.randn(2, 7, generator=torch.Generator().manual_seed(2))
    mask = torch.rand(2, 7, generator=torch.Generator().manual_seed(3)) > 0.3
    plain, _ = ppo_clip_loss(logprobs, old, adv, mask)
    ones, _ = ppo_clip_loss(logprobs, old, adv, mask, is_weights_B_T=torch.ones(2, 7))
    assert torch.equal(plain, ones)


# ----------------------------------------------------------------- default = today's loss


def _legacy_ppo_clip(
    logprobs: torch.Tensor,
    old: torch.Tensor,
    adv: torch.Tensor,
    mask: torch.Tensor,
    n_tokens: int | None,
    weights: torch.Tensor | None,
) -> torch.Tensor:
    """The PPO loss as written before the off-policy corrections (a frozen copy)."""
    log_ratio = torch.where(mask, logprobs - old, 0.0)
    ratio = torch.exp(log_ratio)
    unclipped = -adv * ratio
    clipped = -adv * torch.clamp(ratio, 1.0 - 0.2, 1.0 + 0.2)
    is_clipped = (clipped > unclipped) & mask
    per_token = torch.where(is_clipped, clipped, unclipped)
    if weights is None:
        assert n_tokens is not None
        return torch.where(mask, per_token, 0.0).sum() / float(n_tokens)
    return torch.where(mask, per_token * weights, 0.0).sum()


@pytest.mark.parametrize("weighting", ["token", "episode"])
def test_default_config_gives_exactly_the_loss_before_corrections(weighting: LossWeighting) -> None:
    """Regression lock (do not change without a decision): with the default `off_policy`
    (`rollout`) and `ratio_level` (`token`), a micro-batch's loss and gradient are the PPO
    loss against the rollout logprobs, bit for bit as before the corrections existed."""
    episodes = [
        make_episode("a", [(3, 4, 2), (0, 3, 1)], seed=1),
        make_episode("b", [(2, 5, 1)], seed=2),
    ]
    batch = build_token_batch(episodes, [[0.7, -0.2], [1.3]])
    g = torch.Generator().manual_seed(5)
    logprobs = batch.old_logprobs_B_T + 0.3 * torch.randn(batch.old_logprobs_B_T.shape, generator=g)
    logprobs.requires_grad_(True)
    config = LearnerConfig(loss_weighting=weighting)
    n_tokens, n_rows = batch.n_tokens, 2
    entropy = torch.zeros(n_tokens)
    loss, _ = policy_loss(logprobs, entropy, None, batch, config, n_tokens, n_rows, n_turns=3)
    (grad,) = torch.autograd.grad(loss, logprobs)
    weights = None
    if weighting != "token":
        weights = sample_weights(batch.loss_mask_B_T, weighting, n_tokens, n_rows)
    legacy = _legacy_ppo_clip(
        logprobs,
        batch.old_logprobs_B_T,
        batch.advantages_B_T,
        batch.loss_mask_B_T,
        None if weights is not None else n_tokens,
        weights,
    )
    (legacy_grad,) = torch.autograd.grad(legacy, logprobs)
    assert torch.equal(loss, legacy)
    assert torch.equal(grad, legacy_grad)
