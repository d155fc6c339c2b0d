"""A learner step's off-policy bookkeeping: the proximal policy's logprobs, and how stale the
step's data is.

- Proximal logprobs (`LearnerConfig.off_policy` other than `rollout`; the estimators are in
  `turnrl.rl.offpolicy`): the proximal policy is the learner's weights at the start of
  `Learner.step`. When the step's plan (`turnrl.rl.ppo_epochs.plan_updates`) has more than one
  update, the weights move after the first, so every episode this rank trains is scored once
  beforehand, without gradient and in eval mode (`proximal_logprobs`); each update's
  micro-batches carry them (`TokenBatch.proximal_logprobs_B_T`), and the `target_kl` stop
  measures its KL against them. A step of a single update needs no such pass: the update's own
  logprobs, detached, are the proximal ones (its weights have not moved yet), so the ratio is
  exactly 1 and only the importance weight acts. Each data-parallel rank scores only its own
  shares of the plan's minibatches: the scores need no communication.
- Version lag (`version_lag`): the learner's version minus the `Turn.policy_version` that
  sampled each trained turn: 0 throughout in the synchronous loop, up to the staleness bound
  in the asynchronous one.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING

from turnrl.agent.records import Episode
from turnrl.rl import measure, placement
from turnrl.rl.learner_config import RolloutRatio

if TYPE_CHECKING:
    from turnrl.rl.learner import Learner

TurnLogprobs = list[list[float]]
"""One episode's logprobs, `[turn][token]`, shaped like its `Turn.completion_logprobs`."""


def proximal_logprobs(
    learner: Learner,
    episodes: Sequence[Episode],
    plan: Sequence[tuple[int, list[int]]],
    *,
    share: Callable[[list[int]], list[int]],
) -> dict[int, TurnLogprobs] | None:
    """The proximal logprobs of the episodes of `plan`'s parts that this rank trains (`share`
    gives its share of a part), by index in `episodes`, under `learner`'s current weights; None
    when nothing needs them: no off-policy correction, or a plan of a single update (module
    docstring). Call it before the step's first optimizer step; it runs in eval mode under
    the learner's autocast, without gradient."""
    config = learner.config
    if isinstance(config.off_policy, RolloutRatio) or len(plan) <= 1:
        return None
    needed = sorted({i for _, part in plan for i in share(part)})
    if not needed:
        return {}
    with placement.autocast(learner.device, placement.compute_dtype(config.dtype)):
        scores = measure.completion_logprobs(
            learner.model,
            [episodes[i] for i in needed],
            temperature=config.temperature,
            micro_batch_tokens=config.micro_batch_tokens,
            pad_id=learner.pad_id,
            share_prefix=config.share_prefix,
        )
    return dict(zip(needed, scores, strict=True))


def anchored(
    episodes: Sequence[Episode], part: Sequence[int], anchors: dict[int, TurnLogprobs] | None
) -> list[Episode]:
    """`episodes[i]` for `i` in `part`, with the proximal logprobs in place of the rollout's
    when there are `anchors`: the episodes the `target_kl` stop measures its KL on."""
    if anchors is None:
        return [episodes[i] for i in part]
    return [with_logprobs(episodes[i], anchors[i]) for i in part]


def with_logprobs(episode: Episode, logprobs: TurnLogprobs) -> Episode:
    """`episode` with `logprobs` as its turns' completion logprobs."""
    turns = [
        t.model_copy(update={"completion_logprobs": lp})
        for t, lp in zip(episode.turns, logprobs, strict=True)
    ]
    return episode.model_copy(update={"turns": turns})


def version_lag(episodes: Sequence[Episode], version: int) -> dict[str, float]:
    """`version_lag_mean` and `version_lag_max` over the turns a step trains (not replayed,
    with an advantage), each turn counted once: `version - Turn.policy_version`. Empty when
    no turn is trained."""
    lags = [
        version - t.policy_version
        for e in episodes
        for t in e.turns
        if t.advantage is not None and not t.context_only
    ]
    if not lags:
        return {}
    return {"version_lag_mean": sum(lags) / len(lags), "version_lag_max": float(max(lags))}
