"""Step-level estimators over trajectory graphs (GiGPO, SALT, TEMPO) against examples worked
out by hand from each paper's definition (arithmetic in the comments), and their properties."""

from __future__ import annotations

import math

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from test_advantages import close, ep

from turnrl.agent.records import Episode
from turnrl.rl.advantages import (
    GigpoConfig,
    GrpoConfig,
    SaltConfig,
    TempoConfig,
    compute_advantages,
    turn_graph,
)
from turnrl.rl.advantages import gigpo as gigpo_with_conventions
from turnrl.rl.group_advantages import dense_index, dr_grpo, grpo
from turnrl.rl.step_advantages import gigpo, salt

R2 = math.sqrt(2)


def three() -> tuple[list[Episode], list[list[float]]]:
    """One group: e1 A -> B -> answer (R 1), e2 A -> C -> answer (R 0), e3 D -> answer (R 1).
    e1 and e2 share the state after A (same call, same observation)."""
    episodes = [
        ep("g", ["search:A", "search:B", "answer:x"]),
        ep("g", ["search:A", "search:C", "answer:x"]),
        ep("g", ["search:D", "answer:x"]),
    ]
    return episodes, [[0.0, 0.0, 1.0], [0.0, 0.0, 0.0], [0.0, 1.0]]


# Episode level of all three: R = 1, 0, 1 -> mean 2/3, population std sqrt(2)/3 ->
# GRPO = (1/3) / (sqrt2/3) = 1/sqrt2 for e1 and e3, (-2/3) / (sqrt2/3) = -sqrt2 for e2.


def test_gigpo_hand_example() -> None:
    # gamma 0.5: discounted returns-to-go e1 [0.25, 0.5, 1], e2 [0, 0, 0], e3 [0.5, 1].
    # Anchor root {e1t0, e2t0, e3t0}: [0.25, 0, 0.5], mean 0.25, std sqrt(0.125/3) = 1/sqrt24
    #   -> step advantages 0, -0.25*sqrt24 = -sqrt1.5, +sqrt1.5.
    # Anchor "after A" {e1t1, e2t1}: [0.5, 0], mean 0.25, std 0.25 -> +1, -1.
    # Every other anchor holds one turn -> 0.  A = A^E + 1.0 * A^S.
    episodes, rewards = three()
    s15 = math.sqrt(1.5)
    adv = compute_advantages(episodes, rewards, GigpoConfig(gamma=0.5, omega=1.0, eps=0.0))
    assert close(
        adv,
        [
            [1 / R2, 1 / R2 + 1, 1 / R2],
            [-R2 - s15, -R2 - 1, -R2],
            [1 / R2 + s15, 1 / R2],
        ],
    )
    # scale "none" (Dr. GRPO-style): A^E = R - 2/3; root A^S = 0, -0.25, 0.25; after A +-0.25.
    adv = compute_advantages(episodes, rewards, GigpoConfig(gamma=0.5, scale="none"))
    third = 1 / 3
    assert close(
        adv,
        [
            [third, third + 0.25, third],
            [-2 * third - 0.25, -2 * third - 0.25, -2 * third],
            [third + 0.25, third],
        ],
    )


def test_gigpo_observation_anchors_group_equal_observations() -> None:
    # Different calls, same observation "same": history keys differ at turn 1, observation
    # keys agree. R = 1, 0 -> A^E = +1, -1 (eps 0). Root anchor (both): G^0.95 = [0.95, 0]
    # -> +1, -1. Turn 1 (G = [1, 0]): history -> singletons -> 0; observation -> +1, -1.
    episodes = [ep("g", ["see:p:same", "answer:x"]), ep("g", ["see:q:same", "answer:y"])]
    rewards = [[0.0, 1.0], [0.0, 0.0]]
    history = compute_advantages(episodes, rewards, GigpoConfig(eps=0.0))
    assert close(history, [[2.0, 1.0], [-2.0, -1.0]])
    observed = compute_advantages(episodes, rewards, GigpoConfig(eps=0.0, anchor="observation"))
    assert close(observed, [[2.0, 2.0], [-2.0, -2.0]])


_reward = st.floats(-3, 3, allow_nan=False)


@settings(max_examples=200, deadline=None)
@given(
    rows=st.lists(
        st.tuples(st.integers(0, 3), st.lists(_reward, min_size=0, max_size=5)),
        min_size=1,
        max_size=12,
    ),
    gamma=st.floats(0, 1),
    omega=st.floats(0, 2),
    scale=st.sampled_from(["std", "none"]),
)
def test_gigpo_equals_grpo_when_no_state_is_shared(
    rows: list[tuple[int, list[float]]], gamma: float, omega: float, scale: str
) -> None:
    """Every anchor group a singleton -> the step term is exactly 0 -> GiGPO is the
    episode-level estimator (GRPO, or Dr. GRPO for scale "none") on every turn."""
    width = max(len(r) for _, r in rows)
    rewards = np.array([r + [0.0] * (width - len(r)) for _, r in rows]).reshape(len(rows), width)
    mask = np.array([[t < len(r) for t in range(width)] for _, r in rows], np.bool_).reshape(
        len(rows), width
    )
    group = dense_index([str(g) for g, _ in rows])
    returns = np.array([sum(r) for _, r in rows])
    unique_states = np.arange(len(rows) * width).reshape(len(rows), width)
    adv = gigpo(returns, rewards, mask, group, unique_states, gamma, omega, scale)  # type: ignore[arg-type]
    episode = grpo(returns, group) if scale == "std" else dr_grpo(returns, group)
    assert np.array_equal(adv, np.where(mask, episode[:, None], 0.0))


def test_salt_hand_example() -> None:
    # Trajectory advantages (GRPO, eps 0): e1 1/sqrt2, e2 -sqrt2, e3 1/sqrt2.
    # Edge "A" at the root: e1 and e2 -> (1/sqrt2 - sqrt2)/2 = -1/(2 sqrt2); every other edge
    # is one episode's own -> its own advantage.
    episodes, rewards = three()
    adv = compute_advantages(episodes, rewards, SaltConfig(eps=0.0))
    h = -1 / (2 * R2)
    assert close(adv, [[h, 1 / R2, 1 / R2], [h, -R2, -R2], [1 / R2, 1 / R2]])
    # RLOO base: e1 1 - (0 + 1)/2 = 0.5, e2 0 - 1 = -1, e3 0.5; edge "A": (0.5 - 1)/2 = -0.25.
    adv = compute_advantages(episodes, rewards, SaltConfig(base="rloo"))
    assert close(adv, [[-0.25, 0.5, 0.5], [-0.25, -1.0, -1.0], [0.5, 0.5]])


@settings(max_examples=100, deadline=None)
@given(st.lists(st.tuples(st.floats(-5, 5), st.integers(0, 4)), min_size=1, max_size=10))
def test_salt_without_shared_edges_is_its_base(rows: list[tuple[float, int]]) -> None:
    width = max(n for _, n in rows)
    advantages = np.array([a for a, _ in rows])
    mask = np.array([[t < n for t in range(width)] for _, n in rows], np.bool_).reshape(
        len(rows), width
    )
    edges = np.arange(len(rows) * width).reshape(len(rows), width)
    assert np.array_equal(salt(advantages, mask, edges), np.where(mask, advantages[:, None], 0.0))


def test_tempo_hand_example() -> None:
    # Returns-to-go (gamma 1): e1 [1, 1, 1], e2 [0, 0, 0], e3 [1, 1]; sigma = sqrt2/3.
    # V(root) = 2/3, Q(root, A) = (1 + 0)/2 = 1/2, Q(root, D) = 1; V(after A) = 1/2,
    # Q(after A, B) = 1, Q(after A, C) = 0; deeper nodes have one episode: Q = V.
    # td: A = GRPO + (Q - V)/sigma:
    #   e1: 1/sqrt2 + (1/2 - 2/3)*3/sqrt2 = 0.5/sqrt2; 1/sqrt2 + 1.5/sqrt2; 1/sqrt2
    #   e2: -sqrt2 - 0.5/sqrt2; -sqrt2 - 1.5/sqrt2; -sqrt2
    #   e3: 1/sqrt2 + (1 - 2/3)*3/sqrt2 = 2/sqrt2; 1/sqrt2
    episodes, rewards = three()
    adv = compute_advantages(episodes, rewards, TempoConfig(eps=0.0))
    assert close(
        adv,
        [[0.5 / R2, 2.5 / R2, 1 / R2], [-2.5 / R2, -3.5 / R2, -R2], [2 / R2, 1 / R2]],
    )
    # node_baseline: (G - V(s))/sigma: e1 (1 - 2/3), (1 - 1/2), 0; e2 -2/3, -1/2, 0;
    # e3 1/3, 0 -- each times 3/sqrt2.
    adv = compute_advantages(episodes, rewards, TempoConfig(form="node_baseline", eps=0.0))
    assert close(adv, [[1 / R2, 1.5 / R2, 0.0], [-R2, -1.5 / R2, 0.0], [1 / R2, 0.0]])


_STEPS = ["search:a", "search:b", "answer:x", "answer:y"]


@settings(max_examples=100, deadline=None)
@given(
    st.lists(
        st.tuples(st.lists(st.sampled_from(_STEPS), min_size=1, max_size=4), _reward),
        min_size=1,
        max_size=8,
    )
)
def test_tempo_td_term_is_zero_where_the_tree_does_not_branch(
    rows: list[tuple[list[str], float]],
) -> None:
    """At a node every episode leaves by the same edge, Q = V: TEMPO is GRPO there (up to the
    rounding of two means over the same returns, summed in different orders: hypothesis found
    three equal returns of 1.7597 whose Q - V came out -2.2e-10)."""
    episodes = [ep("g", steps, name=str(i)) for i, (steps, _) in enumerate(rows)]
    rewards = [[0.0] * (len(steps) - 1) + [r] for steps, r in rows]
    td = compute_advantages(episodes, rewards, TempoConfig())
    base = compute_advantages(episodes, rewards, GrpoConfig())
    graph = turn_graph(episodes, dense_index(["g"] * len(episodes)))
    children: dict[int, set[int]] = {}
    states, edges = graph.state_N_T.flatten().tolist(), graph.edge_N_T.flatten().tolist()
    for s, e in zip(states, edges, strict=True):
        if s >= 0:
            children.setdefault(s, set()).add(e)
    for n, steps in enumerate(s for s, _ in rows):
        for t in range(len(steps)):
            if len(children[int(graph.state_N_T[n, t])]) == 1:
                assert td[n][t] == pytest.approx(base[n][t], rel=1e-9, abs=1e-9)


def test_identical_episodes_make_one_path_and_groups_stay_apart() -> None:
    same = ["search:a", "search:b", "answer:x"]
    episodes = [ep("g", same, name=str(i)) for i in range(4)] + [ep("h", same, name="h")]
    graph = turn_graph(episodes, dense_index([e.group_id for e in episodes]))
    g_states = graph.state_N_T[:4]
    assert (g_states == g_states[0]).all() and len(set(g_states[0].tolist())) == 3
    # Keys are compared within a group only: the same history in group h is another path.
    assert not set(graph.state_N_T[4].tolist()) & set(g_states[0].tolist())
    # A graph hashed once serves every graph estimator.
    rewards = [[0.0, 0.0, float(i % 2)] for i in range(5)]
    for cfg in (GigpoConfig(), SaltConfig(), TempoConfig()):
        assert compute_advantages(episodes, rewards, cfg, graph=graph) == compute_advantages(
            episodes, rewards, cfg
        )


def test_gigpo_sample_std_hand_example() -> None:
    # verl-agent's mean_std_norm: torch.std (sample) at both levels. R = 1, 0, 1: mean 2/3,
    # sample var ((1/3)^2 * 2 + (2/3)^2) / 2 = 1/3 -> A^E = 1/sqrt3, -2/sqrt3, 1/sqrt3.
    # gamma 0.5, root anchor [0.25, 0, 0.5]: mean 0.25, sample var 0.125/2, std 0.25 -> 0, -1, 1.
    # After A [0.5, 0]: mean 0.25, sample var 0.125, std 1/sqrt8 -> +-0.25 * sqrt8 = +-1/sqrt2.
    episodes, rewards = three()
    cfg = GigpoConfig(gamma=0.5, eps=0.0, std="sample")
    r3 = math.sqrt(3)
    assert close(
        compute_advantages(episodes, rewards, cfg),
        [
            [1 / r3, 1 / r3 + 1 / R2, 1 / r3],
            [-2 / r3 - 1, -2 / r3 - 1 / R2, -2 / r3],
            [1 / r3 + 1, 1 / r3],
        ],
    )


def test_gigpo_and_salt_pass_a_group_of_one_through_as_verl_does() -> None:
    # Group h holds one episode (R = 2): its states are all singletons -> A^S = 0, and A^E is
    # 0 ("zero") or 2 / (1 + eps) ("return", eps 0 -> 2). Group g is unchanged by the option.
    episodes, rewards = three()
    episodes.append(ep("h", ["search:A", "answer:x"]))
    rewards.append([0.0, 2.0])
    for cfg in (GigpoConfig(gamma=0.5, eps=0.0), SaltConfig(eps=0.0)):
        zero = compute_advantages(episodes, rewards, cfg)
        passed = compute_advantages(
            episodes, rewards, cfg.model_copy(update={"singleton": "return"})
        )
        assert zero[3] == [0.0, 0.0] and passed[3] == [2.0, 2.0]
        assert passed[:3] == zero[:3]


@settings(max_examples=150, deadline=None)
@given(
    rows=st.lists(
        st.tuples(st.integers(0, 2), st.lists(_reward, min_size=0, max_size=4)),
        min_size=1,
        max_size=10,
    ),
    n_states=st.integers(1, 4),
    scale=st.sampled_from(["std", "none"]),
)
def test_gigpo_defaults_are_step_advantages_gigpo_to_the_bit(
    rows: list[tuple[int, list[float]]], n_states: int, scale: str
) -> None:
    width = max(len(r) for _, r in rows)
    rewards = np.array([r + [0.0] * (width - len(r)) for _, r in rows]).reshape(len(rows), width)
    mask = np.array([[t < len(r) for t in range(width)] for _, r in rows], np.bool_).reshape(
        len(rows), width
    )
    group = dense_index([str(g) for g, _ in rows])
    returns = np.array([sum(r) for _, r in rows])
    # Few state ids, so anchor groups are shared across episodes.
    states = (np.arange(len(rows) * width).reshape(len(rows), width) % n_states).astype(np.int64)
    ours = gigpo_with_conventions(returns, rewards, mask, group, states, 0.9, 0.7, scale)  # type: ignore[arg-type]
    theirs = gigpo(returns, rewards, mask, group, states, 0.9, 0.7, scale)  # type: ignore[arg-type]
    assert np.array_equal(ours, theirs)
