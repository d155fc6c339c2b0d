"""The model measurements that credit assignment needs, taken before scoring.

Most reward components and estimators are pure functions of stored records; three inputs are
not, and are measured here and stored on the turns (`Turn.signals`) so that replay needs no
model afterwards:

- `gold_prob` (and `Episode.gold_prob_initial`): the policy's teacher-forced probability of
  the gold answer after each turn, for `info_gain` and for `saturation`'s threshold
  (`turnrl.rl.info_gain`). The gold answer's text is tokenized here: it is a reward input, not
  training data, and the episode's own ids are never re-tokenized.
- `gold_seen`: whether a gold answer appeared in a turn's tool output (`saturation`).
- `value` (and `Episode.value_after`): a value head's estimate of the state before
  each turn (`gae`, `tppo`), measured by `Learner.values` (`turnrl.rl.value_head.with_values`).
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence

from transformers import PreTrainedModel

from turnrl.agent.records import Episode
from turnrl.rl.info_gain import gold_probabilities, with_gold_probs
from turnrl.rl.reward_config import RewardConfig, needs_gold_probs
from turnrl.rl.rewards import mark_gold_seen

ANSWER_PREFIX = "<answer>"
"""What the policy writes before an answer: teacher-forced between the context (which ends with
an assistant header after every observation) and the gold answer's ids."""


def add_gold_signals(
    episodes: Sequence[Episode],
    answers: Mapping[str, Sequence[str]],
    rewards: RewardConfig,
    *,
    model: PreTrainedModel | None,
    encode: Callable[[str], Sequence[int]],
    normalize: Callable[[str], str],
    temperature: float,
    micro_batch_tokens: int = 8192,
) -> list[Episode]:
    """`gold_seen` when `saturation` is configured, and `gold_prob` (measured with `model`)
    when `needs_gold_probs`; episodes unchanged otherwise. `answers` maps each task id to its
    gold answers (the first is the one whose probability is measured); `normalize` is the
    suite grader's answer normalisation."""
    out = list(episodes)
    if rewards.get("saturation") is not None:
        out = [mark_gold_seen(e, answers[e.task_id], normalize) for e in out]
    if needs_gold_probs(rewards):
        if model is None:
            raise ValueError(
                "information gain needs the policy's gold-answer probabilities: pass a model "
                "(`turnrl replay --checkpoint DIR` names the weights that sampled the run)"
            )
        gold_ids = [list(encode(answers[e.task_id][0])) for e in out]
        probs = gold_probabilities(
            model,
            out,
            gold_ids,
            list(encode(ANSWER_PREFIX)),
            micro_batch_tokens,
            temperature=temperature,
        )
        out = with_gold_probs(out, probs)
    return out
