"""Rank 0 leads, the other ranks follow: a training run under `torchrun`.

Rank 0 runs the whole run: rollouts, grading, scoring, storage, evaluations, checkpoints. The
other ranks hold a replica of the model and take part in learner calls only. Every learner call
that changes the weights is an *order* rank 0 broadcasts before it takes part in the call
itself: a new learner (its config and the version it continues from), an RL step or an SFT
step (the whole batch: `Learner.step` gives each rank its share of every minibatch), folding
LoRA adapters into the weights, loading a resume state, and the end of the run. Each rank
then makes the same `Learner` call, so the calls' collectives (global counts, gradient sums)
line up, and every rank takes the same optimizer steps (`turnrl.rl.distributed`).

Why one rollout rank: a run has one policy and one store (one writer: nothing is duplicated or
torn), rank 0's in-process policy samples with the module its learner trains, and a vLLM
server is one process anyway; followers need to know nothing of tasks, tools or sandboxes.

Orders travel on a gloo group of their own (CPU, pickled typed records), whatever backend the
gradients use: a follower waits there while rank 0 rolls out and evaluates, which can take far
longer than a collective's usual timeout, and a CPU wait holds no GPU kernel. If any rank
raises, its process exits and `torchrun` stops the others (a follower blocked on an order sees
the closed connection).

At the end rank 0 sends a fingerprint of its weights (each parameter's float64 sum) and every
follower checks its own against it: replicas that drifted apart fail the run loudly.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import timedelta
from pathlib import Path

import torch
import torch.distributed as dist
from transformers import PreTrainedModel

from turnrl.agent.records import Episode
from turnrl.rl.distributed import DataParallelGroup, init_from_env
from turnrl.rl.learner import Learner, StepResult
from turnrl.rl.learner_config import LearnerConfig

ORDER_WAIT = timedelta(days=7)
"""The longest a follower waits for rank 0's next order (rank 0's rollouts and evaluations
run meanwhile). A dead rank 0 does not leave followers waiting this long: `torchrun` stops
them when it exits."""


@dataclass(frozen=True)
class Reseed:
    """Reseed torch's generator with `seed`: every rank draws the same value-head init and
    minibatch order afterwards (rank 0 reseeds when the RL stage starts)."""

    seed: int


@dataclass(frozen=True)
class NewLearner:
    """Build a learner over the model with `config`, continuing from `version`."""

    config: LearnerConfig
    version: int


@dataclass(frozen=True)
class Step:
    """`Learner.step` on the whole batch."""

    episodes: list[Episode]
    value_targets: list[list[float | None]] | None


@dataclass(frozen=True)
class SftStep:
    """`Learner.sft_step` on the whole batch."""

    episodes: list[Episode]


@dataclass(frozen=True)
class MergeAdapters:
    """`Learner.merge_adapters`: the learner's LoRA adapters fold into the weights."""


@dataclass(frozen=True)
class Load:
    """`Learner.load_checkpoint` from a folder every rank can read (a resumed run)."""

    directory: str


@dataclass(frozen=True)
class Finish:
    """The run is over; rank 0's weights, fingerprinted, for the followers to check theirs."""

    fingerprint: list[float]


Order = Reseed | NewLearner | Step | SftStep | MergeAdapters | Load | Finish


@dataclass(frozen=True)
class Ranks:
    """The data-parallel ranks of a run and the channel rank 0's orders travel on."""

    group: DataParallelGroup
    channel: dist.ProcessGroup
    """A gloo group over every rank, for orders only."""

    @property
    def leads(self) -> bool:
        return self.group.rank == 0

    def send(self, order: Order) -> None:
        """Rank 0: broadcast `order` to the followers."""
        assert self.leads
        dist.broadcast_object_list([order], src=0, group=self.channel)

    def receive(self) -> Order:
        """A follower: the next order from rank 0 (blocks up to `ORDER_WAIT`)."""
        box: list[object] = [None]
        dist.broadcast_object_list(box, src=0, group=self.channel)
        order = box[0]
        if not isinstance(order, Order):
            raise TypeError(f"rank {self.group.rank}: not an order: {order!r}")
        return order


def open_ranks(group: DataParallelGroup, wait: timedelta = ORDER_WAIT) -> Ranks:
    """The orders' channel over `group`'s ranks; every rank calls it, in the same order as its
    other groups (`dist.new_group` is collective)."""
    return Ranks(group, dist.new_group(backend="gloo", timeout=wait))


class LeadLearner(Learner):
    """Rank 0's learner: each call that changes the weights is first sent as an order, then
    made here with the followers making it too."""

    def __init__(
        self, model: PreTrainedModel, config: LearnerConfig, ranks: Ranks, version: int = 0
    ) -> None:
        ranks.send(NewLearner(config, version))
        super().__init__(model, config, data_parallel=ranks.group)
        self.version = version
        self.ranks = ranks

    def step(
        self,
        episodes: Sequence[Episode],
        value_targets: Sequence[Sequence[float | None]] | None = None,
    ) -> StepResult:
        targets = None if value_targets is None else [list(row) for row in value_targets]
        self.ranks.send(Step(list(episodes), targets))
        return super().step(episodes, value_targets)

    def sft_step(self, episodes: Sequence[Episode]) -> StepResult:
        self.ranks.send(SftStep(list(episodes)))
        return super().sft_step(episodes)

    def merge_adapters(self) -> None:
        self.ranks.send(MergeAdapters())
        super().merge_adapters()

    def load_checkpoint(self, directory: str | Path) -> None:
        self.ranks.send(Load(str(directory)))
        super().load_checkpoint(directory)


def new_learner(
    model: PreTrainedModel, config: LearnerConfig, ranks: Ranks | None, version: int = 0
) -> Learner:
    """A learner over `model`: rank 0's `LeadLearner` under torchrun, else a plain one."""
    if ranks is not None:
        return LeadLearner(model, config, ranks, version)
    learner = Learner(model, config)
    learner.version = version
    return learner


def reseed(ranks: Ranks | None, seed: int) -> None:
    """Reseed torch's generator here and, under torchrun, on every follower."""
    if ranks is not None:
        ranks.send(Reseed(seed))
    torch.manual_seed(seed)


def finish(ranks: Ranks, model: torch.nn.Module) -> None:
    """Rank 0: end the followers' loop, sending its weights' fingerprint."""
    ranks.send(Finish(fingerprint(model)))


@dataclass(frozen=True)
class FollowReport:
    """What a follower did: learner calls by kind, and the final version."""

    learners: int
    steps: int
    sft_steps: int
    version: int


def follow(ranks: Ranks, model: PreTrainedModel) -> FollowReport:
    """A follower's whole run: carry out rank 0's orders on `model` until `Finish`; raises
    if this rank's weights then differ from rank 0's."""
    learner: Learner | None = None
    learners = steps = sft_steps = 0
    while True:
        order = ranks.receive()
        if isinstance(order, Reseed):
            torch.manual_seed(order.seed)
        elif isinstance(order, NewLearner):
            learner = None  # its optimizer state goes before the next one's is allocated
            learner = Learner(model, order.config, data_parallel=ranks.group)
            learner.version = order.version
            learners += 1
        elif isinstance(order, Finish):
            mine = fingerprint(model)
            drift = sum(not _same(a, b) for a, b in zip(mine, order.fingerprint, strict=False))
            if drift or len(mine) != len(order.fingerprint):
                raise RuntimeError(
                    f"rank {ranks.group.rank}: weights differ from rank 0's at the end of the "
                    f"run ({drift} of {len(mine)} parameters, or a different model)"
                )
            version = learner.version if learner is not None else 0
            return FollowReport(learners, steps, sft_steps, version)
        elif learner is None:
            raise RuntimeError(f"rank {ranks.group.rank}: {type(order).__name__} before a learner")
        elif isinstance(order, Step):
            learner.step(order.episodes, order.value_targets)
            steps += 1
        elif isinstance(order, SftStep):
            learner.sft_step(order.episodes)
            sft_steps += 1
        elif isinstance(order, Load):
            learner.load_checkpoint(order.directory)
        else:
            learner.merge_adapters()


def fingerprint(model: torch.nn.Module) -> list[float]:
    """Each parameter's sum in float64: equal on replicas that took the same steps."""
    with torch.no_grad():
        sums = [p.detach().double().sum() for p in model.parameters()]
    return [float(v) for v in torch.stack(sums).cpu().tolist()] if sums else []


def _same(a: float, b: float) -> bool:
    return a == b or (math.isnan(a) and math.isnan(b))


def join() -> Ranks | None:
    """This process's ranks and orders' channel when `torchrun` launched it (several
    processes), else None."""
    group = init_from_env()
    return None if group is None else open_ranks(group)
