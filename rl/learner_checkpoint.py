"""Learner checkpoints: the weights (adapter or full model), the value head, the optimizer
state, the version and the optimizer step count (where the learning-rate schedule stands,
`turnrl.rl.optimization`), in one folder that `Learner.load_checkpoint` restores exactly."""

from __future__ import annotations

import copy
import json
from pathlib import Path
from typing import TYPE_CHECKING, Any

import peft
import safetensors.torch
import torch
from torch import nn

if TYPE_CHECKING:
    from turnrl.rl.learner import Learner

VALUE_HEAD_FILE = "value_head.safetensors"


def save_checkpoint(learner: Learner, directory: str | Path, *, merged: bool = False) -> Path:
    """Write `learner`'s weights, optimizer state, version and optimizer step count under
    `directory`.

    Layout: LoRA writes `adapter/` (peft `save_pretrained`) and, with `merged=True`, also
    `merged/`, a plain model with the adapters folded in (for servers without LoRA);
    full fine-tuning writes `model/` (`save_pretrained`, safetensors; `merged` changes
    nothing). Both write `optimizer.pt` and `learner.json`, and with a value head
    `value_head.safetensors` (the head is not part of the model folders).
    """
    root = Path(directory)
    root.mkdir(parents=True, exist_ok=True)
    if learner.peft_model is not None:
        learner.peft_model.save_pretrained(str(root / "adapter"))
        if merged:
            # Merging a copy keeps the live adapters exact (merge/unmerge in place adds
            # rounding error to the base weights on every save).
            folded = copy.deepcopy(learner.peft_model).merge_and_unload()
            folded.save_pretrained(str(root / "merged"))
    else:
        learner.model.save_pretrained(str(root / "model"))
    if learner.value_head is not None:
        head_state = {
            k: v.detach().contiguous() for k, v in learner.value_head.state_dict().items()
        }
        safetensors.torch.save_file(head_state, str(root / VALUE_HEAD_FILE))
    torch.save(learner.optimizer.state_dict(), root / "optimizer.pt")
    state = {
        "version": learner.version,
        "optimizer_steps": learner.optimizer_steps,
        "config": learner.config.model_dump(mode="json"),
    }
    (root / "learner.json").write_text(json.dumps(state, indent=2))
    return root


def load_checkpoint(learner: Learner, directory: str | Path) -> None:
    """Restore weights, optimizer state, version and optimizer step count written by
    `save_checkpoint` into this learner (same model architecture and adaptation); a
    checkpoint from before the step count was saved restarts the schedule at 0. The KL
    reference is kept: it is the model the learner was built on, not the checkpoint."""
    root = Path(directory)
    head_file = root / VALUE_HEAD_FILE
    if (learner.value_head is not None) != head_file.is_file():
        raise ValueError(
            f"value head mismatch: the learner {'has' if learner.value_head else 'has no'} "
            f"value head, the checkpoint {'has' if head_file.is_file() else 'has no'} "
            f"{VALUE_HEAD_FILE}"
        )
    if learner.peft_model is not None:
        state = safetensors.torch.load_file(root / "adapter" / "adapter_model.safetensors")
        result = peft.set_peft_model_state_dict(learner.peft_model, state)
        unexpected_adapter = list(getattr(result, "unexpected_keys", []))
        if unexpected_adapter:
            raise ValueError(f"unexpected adapter keys: {unexpected_adapter[:5]}")
    else:
        state = {}
        for f in sorted((root / "model").glob("*.safetensors")):
            state.update(safetensors.torch.load_file(f))
        missing, unexpected = learner.model.load_state_dict(state, strict=False)
        tied = _tied_names(learner.model)
        if unexpected or set(missing) - tied:
            raise ValueError(
                f"checkpoint does not match the model: missing {sorted(missing)[:5]}, "
                f"unexpected {sorted(unexpected)[:5]}"
            )
    if learner.value_head is not None:
        head_state = safetensors.torch.load_file(head_file, device=str(learner.device))
        learner.value_head.load_state_dict(head_state)
    learner.optimizer.load_state_dict(
        torch.load(root / "optimizer.pt", map_location=learner.device)
    )
    meta: dict[str, Any] = json.loads((root / "learner.json").read_text())
    learner.version = int(meta["version"])
    learner.optimizer_steps = int(meta.get("optimizer_steps", 0))


def _tied_names(model: nn.Module) -> set[str]:
    """Parameter names that share storage with an earlier one (not written by
    `save_pretrained`)."""
    seen: dict[int, str] = {}
    tied: set[str] = set()
    for name, p in model.named_parameters(remove_duplicate=False):
        if p.data_ptr() in seen:
            tied.add(name)
        else:
            seen[p.data_ptr()] = name
    return tied
