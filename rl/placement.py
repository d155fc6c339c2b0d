"""Where and in what precision the learner computes: device, dtype, attention kernel and
gradient checkpointing (`LearnerConfig.device`, `.dtype`, `.attention`,
`.gradient_checkpointing`). The same code runs on the CPU and on a GPU; only the device differs.

Precision: `bfloat16` keeps float32 master weights (and float32 AdamW moments) and runs the
forward and backward passes under `torch.autocast(dtype=bfloat16)` (mixed precision,
Micikevicius et al. 2018, arXiv 1710.03740), rather than storing the weights in bf16. RL
fine-tuning takes small steps: at lr 1e-6 an AdamW update is ~1e-6 per weight, while bf16's
spacing near a typical weight of 0.02 is 2^-13 ~ 1.2e-4, so a bf16 weight would round almost
every update away (no stochastic rounding in torch's AdamW). The price is memory: 16 bytes per
trained parameter (weights, grads, two moments) instead of 8, ~24 GB for a 1.5B model, which
fits one 80 GB GPU. The policy that shares the module (in-process sync) then samples from the
same float32 weights. Whatever the compute dtype, logits are cast to float32 before
`log_softmax` (`turnrl.rl.logprobs`): the PPO ratio exp(new - old) is sensitive to the last
bits of both logprobs.

Attention: `sdpa` is torch's `scaled_dot_product_attention` (flash/memory-efficient kernels on
cuda, a fused kernel on CPU); `flash_attention_2` needs the `flash-attn` package and a cuda
device and is refused with a clear error otherwise; packed rows use a block-diagonal mask
under sdpa/eager and flash-attention's varlen kernel under flash_attention_2
(`turnrl.rl.packing`).
"""

from __future__ import annotations

import contextlib
import importlib.util
from collections.abc import Iterator

import torch
from transformers import PreTrainedModel

from turnrl.rl.learner_config import LearnerConfig, LearnerDevice, LearnerDtype


def resolve_device(device: LearnerDevice, local_rank: int | None = None) -> torch.device:
    """The torch device of a `LearnerConfig.device`: `auto` is cuda when available; a cuda
    device under torchrun is `cuda:local_rank`."""
    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    if device == "cuda":
        if not torch.cuda.is_available():
            raise ValueError("learner.device is cuda, but torch sees no cuda device")
        return torch.device("cuda", local_rank or 0)
    return torch.device("cpu")


def compute_dtype(dtype: LearnerDtype) -> torch.dtype | None:
    """The autocast dtype of a `LearnerConfig.dtype`; None computes in the weights' dtype."""
    return torch.bfloat16 if dtype == "bfloat16" else None


@contextlib.contextmanager
def autocast(device: torch.device, dtype: torch.dtype | None) -> Iterator[None]:
    """bf16 autocast on `device` when `dtype` is set; nothing otherwise."""
    if dtype is None:
        yield
        return
    with torch.autocast(device_type=device.type, dtype=dtype):
        yield


def check_attention(config: LearnerConfig, device: torch.device) -> None:
    """Refuse an attention kernel the machine cannot run, before any weight moves."""
    if config.attention != "flash_attention_2":
        return
    if device.type != "cuda":
        raise ValueError(
            f"learner.attention flash_attention_2 needs a cuda device, not {device.type} "
            "(use sdpa, which runs everywhere)"
        )
    if importlib.util.find_spec("flash_attn") is None:
        raise ValueError(
            "learner.attention flash_attention_2 needs the flash-attn package "
            "(pip install flash-attn), which is not installed; use sdpa"
        )


def place_model(model: PreTrainedModel, config: LearnerConfig, device: torch.device) -> None:
    """Move `model` to `device` in float32 (the master weights), set its attention kernel and
    gradient checkpointing, in place (the policy sharing the module follows)."""
    check_attention(config, device)
    module: torch.nn.Module = model  # transformers' typing of `to` hides nn.Module's
    module.to(device=device)
    if config.dtype == "bfloat16" and any(
        p.dtype != torch.float32 for p in model.parameters() if p.is_floating_point()
    ):
        # Master weights are float32 (module docstring); a bf16-loaded model is upcast.
        module.to(dtype=torch.float32)
    current = getattr(model.config, "_attn_implementation", None)
    if current != config.attention:
        model.set_attn_implementation(config.attention)
    if config.gradient_checkpointing:
        # Non-reentrant: works with inputs that need no grad and with autocast (torch docs,
        # torch.utils.checkpoint).
        # transformers 5.2x renamed it activation checkpointing; older 5.x has only the old name.
        kwargs = {"use_reentrant": False}
        if hasattr(model, "activation_checkpointing_enable"):
            model.activation_checkpointing_enable(activation_checkpointing_kwargs=kwargs)
        else:
            model.gradient_checkpointing_enable(gradient_checkpointing_kwargs=kwargs)
