"""Data-parallel learner steps across processes (`torchrun --nproc_per_node N`): every rank
holds the whole model, takes a share of the step's episodes, and the ranks sum their gradients
before clipping and AdamW, so every rank takes the same optimizer step.

Why replicated weights and a gradient all-reduce (DDP's scheme, Li et al. 2020, arXiv
2006.15704) and not FSDP2 (`torch.distributed.fsdp.fully_shard`): the in-process policy
samples with the very module the learner trains (`turnrl.rl.learner`), and rank 0 runs the
rollouts alone; a sharded module all-gathers its weights inside every forward, so a forward
on rank 0 only (each decoding step of `generate`) would wait forever for the other ranks. With
replicated weights rank 0 decodes on its own copy. The memory cost, 16 bytes per parameter
(float32 weights, gradients, two AdamW moments), is ~24 GB for a 1.5B model: it fits one
80 GB GPU. FSDP2 is the path for models that do not fit, with rollouts served elsewhere (vLLM).

Why a hand-written all-reduce and not the `DistributedDataParallel` wrapper: the learner calls
the decoder and the LM head separately (`turnrl.rl.logprobs`, to project only trained
positions), accumulates over micro-batches, and some steps train the value head alone; DDP's
reducer expects one forward through the wrapper per backward. Summing once per optimizer step,
in buckets, is exact and as cheap in bytes (no overlap with the backward, which DDP would add).

Loss normalisation across ranks: each rank's micro-batch losses are divided by the *global*
counts (trained tokens, episodes with trained tokens, value targets: summed over the ranks
first), so the per-rank losses sum to the single-process loss of the whole batch and the
summed gradients are its gradient, for both `loss_weighting` modes (an episode is never split
across ranks). Whether a step has a learning signal is decided on the global counts too, so the
ranks skip or step together. Collectives: gloo on CPU, nccl on cuda.
"""

from __future__ import annotations

import os
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import TypeVar

import torch
import torch.distributed as dist

_T = TypeVar("_T")

BUCKET_BYTES = 256 << 20
"""Gradient bytes summed per all-reduce (bounds the flat buffer's extra memory)."""


@dataclass(frozen=True)
class DataParallelGroup:
    """The learner's view of its data-parallel ranks (an initialised default process group)."""

    rank: int
    """This process's rank, 0..world_size-1."""
    world_size: int
    """Number of ranks that take learner steps together."""
    local_rank: int = 0
    """Rank on this machine: the cuda device index a cuda learner uses."""

    @property
    def device(self) -> torch.device:
        """Where collective buffers live: cuda for nccl, cpu for gloo."""
        if dist.get_backend() == "nccl":
            return torch.device("cuda", self.local_rank)
        return torch.device("cpu")

    def shard(self, items: Sequence[_T]) -> list[_T]:
        """This rank's contiguous share of `items` (near-equal parts, earlier ranks first)."""
        size, extra = divmod(len(items), self.world_size)
        start = self.rank * size + min(self.rank, extra)
        return list(items[start : start + size + (1 if self.rank < extra else 0)])

    def sum_floats(self, values: Sequence[float]) -> list[float]:
        """`values` summed elementwise over the ranks (float64, exact for counts)."""
        t = torch.tensor(list(values), dtype=torch.float64, device=self.device)
        dist.all_reduce(t)
        return [float(v) for v in t.tolist()]

    def sum_metrics(self, metrics: dict[str, float]) -> dict[str, float]:
        """Each metric summed over the ranks that report it (step-weighted metrics add up)."""
        gathered: list[dict[str, float] | None] = [None] * self.world_size
        dist.all_gather_object(gathered, metrics)
        out: dict[str, float] = {}
        for part in gathered:
            for key, value in (part or {}).items():
                out[key] = out.get(key, 0.0) + value
        return out

    def sum_gradients(self, parameters: Sequence[torch.Tensor]) -> None:
        """Replace each parameter's `.grad` by its sum over the ranks. A parameter no rank has
        a gradient for keeps None (AdamW then leaves it alone, as in one process); one that
        only some ranks have gradients for counts zeros on the others."""
        has_P = torch.tensor(
            [p.grad is not None for p in parameters], dtype=torch.float32, device=self.device
        )
        dist.all_reduce(has_P)
        live = [p for p, n in zip(parameters, has_P.tolist(), strict=True) if n > 0]
        for p in live:
            if p.grad is None:
                p.grad = torch.zeros_like(p)
        for bucket in _buckets(live, BUCKET_BYTES):
            flat = torch.cat([p.grad.reshape(-1) for p in bucket if p.grad is not None])
            on_device = flat.to(self.device)
            dist.all_reduce(on_device)
            at = 0
            for p in bucket:
                assert p.grad is not None
                n = p.grad.numel()
                p.grad.copy_(on_device[at : at + n].view_as(p.grad))
                at += n

    def broadcast_parameters(self, parameters: Iterable[torch.Tensor], src: int = 0) -> None:
        """Copy rank `src`'s values of `parameters` to every rank (identical starting weights)."""
        with torch.no_grad():
            for p in parameters:
                buffer = p.detach().to(self.device)
                dist.broadcast(buffer, src)
                if buffer.data_ptr() != p.data_ptr():
                    p.copy_(buffer)

    def weighted_mean(self, value: float, weight: float) -> float:
        """sum(weight * value) / sum(weight) over the ranks (0 when no rank has weight)."""
        total, weights = self.sum_floats([value * weight, weight])
        return total / weights if weights > 0 else 0.0

    def broadcast_object(self, obj: _T | None, src: int = 0) -> _T:
        """Rank `src`'s `obj` on every rank (pickled: episodes, batches of them)."""
        box: list[object] = [obj]
        dist.broadcast_object_list(box, src)
        return box[0]  # type: ignore[return-value]


def _buckets(parameters: Sequence[torch.Tensor], limit: int) -> list[list[torch.Tensor]]:
    """Consecutive parameters of one dtype, at most `limit` bytes a bucket (one at least)."""
    out: list[list[torch.Tensor]] = []
    size = 0
    for p in parameters:
        nbytes = p.numel() * p.element_size()
        if out and out[-1][0].dtype == p.dtype and size + nbytes <= limit:
            out[-1].append(p)
            size += nbytes
        else:
            out.append([p])
            size = nbytes
    return out


def torch_world_size() -> int:
    """The number of processes `torchrun` launched together (1 outside it)."""
    return int(os.environ.get("WORLD_SIZE", "1"))


def init_from_env(backend: str | None = None) -> DataParallelGroup | None:
    """Join the process group `torchrun` describes in the environment (`RANK`, `WORLD_SIZE`,
    `LOCAL_RANK`, `MASTER_ADDR`, `MASTER_PORT`); None when not launched by it (one process).
    The backend defaults to nccl when cuda is available, else gloo."""
    if torch_world_size() <= 1:
        return None
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    if not dist.is_initialized():
        backend = backend or ("nccl" if torch.cuda.is_available() else "gloo")
        if backend == "nccl":
            torch.cuda.set_device(local_rank)
        dist.init_process_group(backend)
    return DataParallelGroup(dist.get_rank(), dist.get_world_size(), local_rank)
