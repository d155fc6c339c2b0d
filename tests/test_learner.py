"""Batches trace back to sampled ids; the learner trains in place on a tiny random Llama."""

from __future__ import annotations

import copy
from pathlib import Path

import pytest
import torch
import transformers
from fakes import with_advantages
from hypothesis import given, settings
from hypothesis import strategies as st

from turnrl.agent.records import Episode, StopReason, Turn
from turnrl.rl.batch import build_token_batch, micro_batches, plan_micro_batches
from turnrl.rl.learner import Learner
from turnrl.rl.learner_config import FullConfig, LearnerConfig, LoraConfig, LossWeighting
from turnrl.rl.logprobs import token_logprobs

VOCAB = 512


def tiny_model(seed: int = 0) -> transformers.LlamaForCausalLM:
    torch.manual_seed(seed)
    config = transformers.LlamaConfig(
        vocab_size=VOCAB,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        tie_word_embeddings=False,
    )
    model = transformers.LlamaForCausalLM(config)
    model.eval()
    return model


def make_episode(
    name: str, shapes: list[tuple[int, int, int]], seed: int, logprob: float = -1.0
) -> Episode:
    """An episode whose turn j has (prompt, completion, observation) lengths `shapes[j]`;
    ids are random, completion logprobs a placeholder."""
    g = torch.Generator().manual_seed(seed)
    turns = []
    for j, (n_p, n_c, n_o) in enumerate(shapes):
        ids = torch.randint(1, VOCAB, (n_p + n_c + n_o,), generator=g).tolist()
        turns.append(
            Turn(
                index=j,
                prompt_ids=ids[:n_p],
                completion_ids=ids[n_p : n_p + n_c],
                completion_logprobs=[logprob - 0.01 * k for k in range(n_c)],
                observation_ids=ids[n_p + n_c :],
                text="",
                finish_reason="stop",
            )
        )
    return Episode(
        episode_id=name, task_id="t", group_id="g", turns=turns, stop_reason=StopReason.ANSWERED
    )


def with_model_logprobs(model: torch.nn.Module, episodes: list[Episode]) -> list[Episode]:
    """Replace the stored logprobs with the model's own, computed here independently of the
    learner (one full forward per episode, no padding), as a sampler would have."""
    out = []
    for e in episodes:
        ids = torch.tensor([e.token_ids()])
        with torch.no_grad():
            lp_T_V = torch.log_softmax(model(ids).logits.float()[0], dim=-1)
        pos, turns = 0, []
        for t in e.turns:
            pos += len(t.prompt_ids)
            lps = [float(lp_T_V[pos + k - 1, c]) for k, c in enumerate(t.completion_ids)]
            turns.append(t.model_copy(update={"completion_logprobs": lps}))
            pos += len(t.completion_ids) + len(t.observation_ids)
        out.append(e.model_copy(update={"turns": turns}))
    return out


def two_episodes(model: torch.nn.Module) -> list[Episode]:
    return with_model_logprobs(
        model,
        [
            make_episode("pos", [(6, 4, 3), (0, 5, 2)], seed=1),
            make_episode("neg", [(5, 3, 4), (0, 2, 3), (0, 6, 1)], seed=2),
        ],
    )


ADV = [[1.0, 1.0], [-1.0, -1.0, -1.0]]


def flat_completion(e: Episode) -> list[int]:
    return [i for t in e.turns for i in t.completion_ids]


# ---------------------------------------------------------------------------------- batches

episode_shapes = st.lists(
    st.lists(st.tuples(st.integers(0, 4), st.integers(0, 5), st.integers(0, 4)), max_size=4),
    min_size=1,
    max_size=5,
)


@settings(max_examples=60, deadline=None)
@given(episode_shapes, st.integers(1, 40))
def test_trained_ids_are_the_sampled_ids(
    shapes: list[list[tuple[int, int, int]]], budget: int
) -> None:
    # Every episode starts with at least one context token.
    shapes = [[(max(s[0][0], 1), *s[0][1:]), *s[1:]] if s else [(1, 0, 0)] for s in shapes]
    episodes = [make_episode(str(i), s, seed=i) for i, s in enumerate(shapes)]
    advantages = [[float(10 * i + j) for j in range(len(e.turns))] for i, e in enumerate(episodes)]
    batches = micro_batches(episodes, advantages, budget)
    seen: list[int] = []
    for b in batches:
        assert b.n_padded <= budget or len(b.episode_index_B) == 1
        for row, i in enumerate(b.episode_index_B.tolist()):
            e = episodes[i]
            seen.append(i)
            n = int(b.lengths_B[row])
            mask = b.loss_mask_B_T[row]
            assert b.input_ids_B_T[row, :n].tolist() == e.token_ids()
            # The proof: the ids at trained positions are, in order, the sampled ids.
            assert b.input_ids_B_T[row][mask].tolist() == flat_completion(e)
            assert b.old_logprobs_B_T[row][mask].tolist() == pytest.approx(
                [lp for t in e.turns for lp in t.completion_logprobs]
            )
            assert b.advantages_B_T[row][mask].tolist() == [
                advantages[i][j] for j, t in enumerate(e.turns) for _ in t.completion_ids
            ]
            assert not b.advantages_B_T[row][~mask].any()
            assert not b.old_logprobs_B_T[row][~mask].any()
            assert not mask[n:].any() and (b.turn_index_B_T[row, n:] == -1).all()
    assert sorted(seen) == list(range(len(episodes)))


def test_plan_micro_batches_budget() -> None:
    # Longest first; 10 alone exceeds the budget 8 and goes alone; 4+4 fill one group (2x4),
    # 3+2 would be 2x3=6 <= 8, then a third row makes 3x3=9 > 8.
    assert plan_micro_batches([3, 10, 4, 2, 4, 1], 8) == [[1], [2, 4], [0, 3], [5]]


def test_batch_rejects_bad_input() -> None:
    e = make_episode("e", [(0, 3, 1)], seed=0)
    with pytest.raises(ValueError, match="first token"):
        build_token_batch([e], [[1.0]])
    e = make_episode("e", [(2, 3, 1), (0, 1, 1)], seed=0)
    with pytest.raises(ValueError, match="one advantage, or None, per turn"):
        build_token_batch([e], [[1.0]])
    with pytest.raises(ValueError, match="non-finite"):
        build_token_batch([e], [[1.0, float("nan")]])
    bad = e.model_copy(
        update={"turns": [e.turns[0].model_copy(update={"completion_logprobs": []})]}
    )
    with pytest.raises(ValueError, match="logprobs"):
        build_token_batch([bad], [[1.0]])


# ---------------------------------------------------------------------------------- learner


def make_learner(adaptation: LoraConfig | FullConfig, **kw: float) -> Learner:
    return Learner(tiny_model(), LearnerConfig(adaptation=adaptation, **kw))


ADAPTATIONS: list[LoraConfig | FullConfig] = [LoraConfig(r=4, alpha=8), FullConfig()]


@pytest.mark.parametrize("adaptation", ADAPTATIONS, ids=["lora", "full"])
def test_rollout_logprobs_equal_learner_logprobs(adaptation: LoraConfig | FullConfig) -> None:
    learner = make_learner(adaptation, lr=1e-3)
    episodes = two_episodes(learner.model)
    scored = learner.logprobs(episodes)
    for e, per_turn in zip(episodes, scored, strict=True):
        for t, lps in zip(e.turns, per_turn, strict=True):
            assert lps == pytest.approx(t.completion_logprobs, abs=1e-5)
    scalars = learner.step(with_advantages(episodes, ADV)).scalars
    assert scalars["ratio_mean"] == pytest.approx(1.0, abs=1e-5)
    assert scalars["clip_frac"] == 0.0
    assert scalars["approx_kl"] == pytest.approx(0.0, abs=1e-6)
    # Ratio 1: loss = -mean advantage over trained tokens = -(9 - 11) / 20.
    assert scalars["n_tokens"] == 20
    assert scalars["loss"] == pytest.approx(2 / 20, abs=1e-5)


def test_head_selection_and_temperature_match_plain_path() -> None:
    model = tiny_model()
    episodes = two_episodes(model)
    batch = build_token_batch(episodes, ADV)
    with torch.no_grad():
        fast, _ = token_logprobs(model, batch, 0.7)
        plain, _ = token_logprobs(model, batch, 0.7, select_before_head=False)
        ids = batch.input_ids_B_T
        lp = torch.log_softmax(model(ids).logits.float() / 0.7, dim=-1)
        by_hand = lp[:, :-1].gather(-1, ids[:, 1:, None]).squeeze(-1)
    mask = batch.loss_mask_B_T
    torch.testing.assert_close(fast, plain, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(fast[:, 1:][mask[:, 1:]], by_hand[mask[:, 1:]], rtol=0, atol=1e-5)
    assert not fast[~mask].any()


def test_head_chunks_do_not_change_logprobs_entropy_or_gradients() -> None:
    model = tiny_model()
    batch = build_token_batch(two_episodes(model), ADV)
    out = []
    for chunk_rows in (3, 1024):
        model.zero_grad(set_to_none=True)
        lp, entropy = token_logprobs(model, batch, 0.7, with_entropy=True, chunk_rows=chunk_rows)
        lp.sum().backward()
        grads = [p.grad.clone() for p in model.parameters() if p.grad is not None]
        out.append((lp.detach(), entropy, grads))
    (lp_a, ent_a, g_a), (lp_b, ent_b, g_b) = out
    assert ent_a is not None and ent_b is not None and ent_a.shape == (20,)
    # Equal up to the matmul's float rounding (other blockings of the same rows).
    torch.testing.assert_close(lp_a, lp_b, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(ent_a, ent_b, rtol=1e-5, atol=1e-6)
    for a, b in zip(g_a, g_b, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-6)


def test_learner_feeds_the_model_exactly_the_episode_ids() -> None:
    learner = make_learner(FullConfig(), lr=1e-3, micro_batch_tokens=30)
    episodes = two_episodes(learner.model)
    fed: list[list[int]] = []
    embed = learner.model.get_input_embeddings()
    hook = embed.register_forward_hook(lambda _m, args, _o: fed.extend(args[0].tolist()))
    try:
        learner.step(with_advantages(episodes, ADV))
    finally:
        hook.remove()
    # The budget puts each episode alone in its micro-batch, so rows carry no padding.
    assert sorted(fed) == sorted(e.token_ids() for e in episodes)


def _snapshot(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in model.named_parameters()}


def test_lora_step_changes_only_adapters() -> None:
    learner = make_learner(LoraConfig(r=4, alpha=8), lr=1e-2)
    episodes = two_episodes(learner.model)
    before = _snapshot(learner.model)
    assert learner.version == 0
    learner.step(with_advantages(episodes, ADV))
    assert learner.version == 1
    assert not learner.model.training
    after = _snapshot(learner.model)
    changed = {k for k in before if not torch.equal(before[k], after[k])}
    assert changed and all("lora_" in k for k in changed)
    for name, p in learner.model.named_parameters():
        assert p.requires_grad == ("lora_" in name)


def test_full_step_changes_weights() -> None:
    learner = make_learner(FullConfig(), lr=1e-3)
    episodes = two_episodes(learner.model)
    before = _snapshot(learner.model)
    result = learner.step(with_advantages(episodes, ADV))
    after = _snapshot(learner.model)
    assert not result.skipped and result.scalars["grad_norm"] > 0
    assert any(not torch.equal(before[k], after[k]) for k in before)
    assert learner.version == 1 and not learner.model.training


@pytest.mark.parametrize("adaptation", ADAPTATIONS, ids=["lora", "full"])
def test_loss_falls_and_positive_episode_rises(adaptation: LoraConfig | FullConfig) -> None:
    learner = make_learner(adaptation, lr=3e-3 if adaptation.kind == "full" else 2e-2)
    episodes = two_episodes(learner.model)

    def total(i: int) -> float:
        return sum(sum(t) for t in learner.logprobs(episodes)[i])

    start_pos, start_neg = total(0), total(1)
    trained = with_advantages(episodes, ADV)
    losses = [learner.step(trained).scalars["loss"] for _ in range(6)]
    assert losses[-1] < losses[0]
    assert total(0) > start_pos
    assert total(1) < start_neg
    assert learner.version == 6


@pytest.mark.parametrize("adaptation", ADAPTATIONS, ids=["lora", "full"])
def test_kl_to_reference_starts_at_zero_then_grows(adaptation: LoraConfig | FullConfig) -> None:
    learner = make_learner(adaptation, lr=1e-2, kl_coef=0.1)
    episodes = two_episodes(learner.model)
    trained = with_advantages(episodes, ADV)
    first = learner.step(trained)
    assert first.scalars["kl_ref"] == pytest.approx(0.0, abs=1e-7)
    for _ in range(3):
        last = learner.step(trained)
    assert last.scalars["kl_ref"] > 1e-5


@pytest.mark.parametrize("weighting", ["token", "episode"])
def test_micro_batch_budget_does_not_change_the_gradient(weighting: LossWeighting) -> None:
    model = tiny_model()
    episodes = two_episodes(model) + with_model_logprobs(
        model, [make_episode("third", [(3, 7, 2), (0, 4, 0)], seed=3)]
    )
    trained = with_advantages(episodes, [*ADV, [0.5, -2.0]])
    grads = []
    for budget in (8, 4096):
        learner = Learner(
            copy.deepcopy(model),
            LearnerConfig(micro_batch_tokens=budget, kl_coef=0.05, loss_weighting=weighting),
        )
        # Perturb the policy so that ratios and the KL term are not trivially 1 and 0.
        with torch.no_grad():
            for p in learner.model.parameters():
                p.add_(0.01 * torch.sin(torch.arange(p.numel(), dtype=p.dtype)).view_as(p))
        metrics = learner.accumulate_gradients(trained).scalars
        grad = {
            k: p.grad.clone() for k, p in learner.model.named_parameters() if p.grad is not None
        }
        assert len(grad) == len(learner.trainable_parameters)
        grads.append((grad, metrics))
    (small, m_small), (large, m_large) = grads
    assert m_small["n_micro_batches"] == 3 and m_large["n_micro_batches"] == 1
    for key in ("loss", "clip_frac", "approx_kl", "kl_ref", "entropy", "n_tokens"):
        assert m_small[key] == pytest.approx(m_large[key], rel=1e-5, abs=1e-7)
    for k in large:
        torch.testing.assert_close(small[k], large[k], rtol=1e-4, atol=1e-7)


def test_step_without_signal_is_skipped() -> None:
    learner = make_learner(FullConfig(), lr=1e-2)
    episodes = two_episodes(learner.model)
    before = _snapshot(learner.model)
    result = learner.step(with_advantages(episodes, [[0.0, 0.0], [0.0, 0.0, 0.0]]))
    assert result.skipped and "loss" not in result.scalars
    assert learner.version == 0
    no_completion = [make_episode("empty", [(4, 0, 2)], seed=9)]
    assert learner.step(with_advantages(no_completion, [[1.0]])).skipped
    assert all(torch.equal(before[k], v) for k, v in _snapshot(learner.model).items())


@pytest.mark.parametrize("adaptation", ADAPTATIONS, ids=["lora", "full"])
def test_checkpoint_round_trip(adaptation: LoraConfig | FullConfig, tmp_path: Path) -> None:
    learner = make_learner(adaptation, lr=1e-2)
    episodes = two_episodes(learner.model)
    learner.step(with_advantages(episodes, ADV))
    learner.save_checkpoint(tmp_path, merged=True)
    saved = _snapshot(learner.model)
    saved_lp = learner.logprobs(episodes)
    learner.step(with_advantages(episodes, ADV))
    assert learner.version == 2
    learner.load_checkpoint(tmp_path)
    assert learner.version == 1
    assert all(torch.equal(saved[k], v) for k, v in _snapshot(learner.model).items())
    if adaptation.kind == "lora":
        plain = transformers.LlamaForCausalLM.from_pretrained(tmp_path / "merged")
        merged_lp = Learner(plain, LearnerConfig()).logprobs(episodes)
        assert _flat(merged_lp) == pytest.approx(_flat(saved_lp), abs=1e-4)


def _flat(scores: list[list[list[float]]]) -> list[float]:
    return [v for episode in scores for turn in episode for v in turn]


# ---------------------------------------------------------------------------- loss weighting

# "pos" trains 4 + 5 = 9 tokens with A = +1, "neg" 3 + 2 + 6 = 11 tokens with A = -0.5.
WEIGHTING_ADV = [[1.0, 1.0], [-0.5, -0.5, -0.5]]


@pytest.mark.parametrize(
    ("weighting", "expected"),
    [
        # Every token weighs 1/20: -(9 * 1 + 11 * -0.5) / 20 = -3.5 / 20.
        ("token", -3.5 / 20),
        # Every episode weighs 1/2, spread over its own tokens: -(1 + -0.5) / 2.
        ("episode", -0.25),
    ],
)
def test_loss_weighting_at_ratio_one(weighting: LossWeighting, expected: float) -> None:
    """Regression lock on `loss_weighting` (do not change without a decision): at ratio 1 the
    loss is minus the weighted mean advantage, under each convention."""
    learner = Learner(tiny_model(), LearnerConfig(loss_weighting=weighting))
    scalars = learner.step(with_advantages(two_episodes(learner.model), WEIGHTING_ADV)).scalars
    assert scalars["loss"] == pytest.approx(expected, abs=1e-5)
    assert scalars["ratio_mean"] == pytest.approx(1.0, abs=1e-5)
    assert scalars["n_tokens"] == 20


def test_episode_weighting_is_the_mean_of_per_episode_losses() -> None:
    """The "episode" gradient of a step equals the mean, over its episodes, of the gradient
    each episode would give alone under "token" weighting; an episode without trained tokens
    changes nothing (it takes no share)."""
    model = tiny_model()
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.01 * torch.cos(torch.arange(p.numel(), dtype=p.dtype)).view_as(p))
    episodes = two_episodes(tiny_model()) + with_model_logprobs(
        tiny_model(), [make_episode("third", [(3, 7, 2), (0, 4, 0)], seed=3)]
    )
    empty = make_episode("no-completion", [(4, 0, 2)], seed=9)
    advantages = [*WEIGHTING_ADV, [0.5, -2.0]]

    def grads(
        eps: list[Episode], adv: list[list[float]], weighting: LossWeighting
    ) -> dict[str, torch.Tensor]:
        config = LearnerConfig(loss_weighting=weighting, kl_coef=0.05, micro_batch_tokens=16)
        learner = Learner(copy.deepcopy(model), config)
        learner.accumulate_gradients(with_advantages(eps, adv))
        return {k: p.grad for k, p in learner.model.named_parameters() if p.grad is not None}

    together = grads([*episodes, empty], [*advantages, [1.0]], "episode")
    alone = [grads([e], [a], "token") for e, a in zip(episodes, advantages, strict=True)]
    for k, g in together.items():
        mean = sum(a[k] for a in alone) / len(alone)
        torch.testing.assert_close(g, mean, rtol=1e-4, atol=1e-7)


def test_replayed_turns_are_context_not_training() -> None:
    """A branched rollout's replayed prefix stays in the context, untrained: the batch equals
    that of the same ids with the replayed completion moved into the prompt, and it gets no
    advantage; scoring (`logprobs`) still covers it."""
    model = tiny_model()
    (e,) = with_model_logprobs(model, [make_episode("b", [(4, 3, 2), (0, 5, 1)], seed=4)])
    first, second = e.turns
    replayed = e.model_copy(update={"turns": [first.model_copy(update={"replayed": True}), second]})
    folded_first = first.model_copy(
        update={
            "prompt_ids": first.prompt_ids + first.completion_ids,
            "completion_ids": [],
            "completion_logprobs": [],
        }
    )
    folded = e.model_copy(update={"turns": [folded_first, second]})
    got = build_token_batch([replayed], [[7.0, 1.0]])
    want = build_token_batch([folded], [[7.0, 1.0]])
    for name in ("input_ids_B_T", "loss_mask_B_T", "old_logprobs_B_T", "advantages_B_T"):
        assert torch.equal(getattr(got, name), getattr(want, name)), name
    assert got.n_tokens == 5 and 7.0 not in got.advantages_B_T
    learner = Learner(model, LearnerConfig())
    scored = learner.logprobs([replayed])[0]
    assert [len(lps) for lps in scored] == [3, 5]
    assert scored[0] == pytest.approx(first.completion_logprobs, abs=1e-5)
