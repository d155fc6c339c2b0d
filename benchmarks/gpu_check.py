"""The GPU check: learner throughput and MFU, in-process decode throughput, and the logprob gap
between the sampler and the learner, on a Qwen2.5-1.5B-shaped model with random weights.

Sized for <= 8 minutes on one H100/H200 (torch 2.11 CUDA, transformers 5.17, no network, no
vLLM). It also runs on the CPU with a tiny config (`--quick --device cpu`) so that the script
itself is known to work where no GPU is lent.

Measured, in one run:
1. Learner steps (`turnrl.rl.learner.Learner.step`, PPO-clip, full fine-tuning, AdamW over
   float32 master weights, bf16 autocast, sdpa attention) on the same varied-length episodes,
   padded and packed (`LearnerConfig.packing`), alternating: real (non-padding) tokens per
   second, and MFU = model FLOPs per second / peak dense bf16 (989 TFLOP/s for H100 SXM and
   H200: same tensor cores). Model FLOPs per step (PaLM's MFU convention, Chowdhery et al.
   2022, arXiv 2204.02311, appendix B, counted causally): 6 x N x real tokens, N = the decoder's
   non-embedding parameters (the input embedding is a lookup); + 6 x V x H x trained tokens for
   the LM head (the learner projects only trained positions); + causal attention
   6 x layers x H x sum over episodes of L_i^2 (fwd 2 matmuls x 2 x H x L_i^2 / 2, backward
   twice that), each episode attending to its own context only. Padding, recomputation and the
   cross-episode blocks a dense mask computes are not counted: MFU is useful work.
2. `HFPolicy` decode throughput (`turnrl.agent.hf_policy`): a batch of concurrent requests,
   random prompts, fixed length (no stop ids), sampled at temperature 1: generated tokens per
   second, with the float32 master weights the learner trains (in-process weight sync), with
   them under bf16 autocast (what `turnrl train` samples with when `learner.dtype` is
   bfloat16), and with a bf16 copy of them.
3. The largest |policy logprob - learner logprob| over the sampled ids: each policy's logprobs
   against the learner's recomputation under bf16 autocast of the same weights (the mismatch
   the PPO ratio and IS correction must absorb). Random
   weights give near-uniform distributions over the 151,936-word vocabulary, so the gap here
   is a floor, not what a trained model shows.

Running it on the device machine (torch and transformers are there; pydantic is not): carry a
folder of wheels for pydantic, pydantic-core, annotated-types and typing-inspection, then
  pip install --no-deps wheels/*.whl && pip install --no-deps --no-build-isolation -e . \
    && python benchmarks/gpu_check.py
The last line is the JSON figure; everything printed before it is the detail.

Several GPUs: `torchrun --nproc_per_node N benchmarks/gpu_check.py --learner-only` runs the
learner part data-parallel (`turnrl.rl.distributed`: each rank steps on its share of the
episodes, gradients summed over the ranks); tokens/s are the whole batch's, MFU is per GPU.
"""

from __future__ import annotations

import argparse
import asyncio
import copy
import json
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
import transformers

sys.path.insert(0, str(Path(__file__).parent))
from bench_learner import make_episodes, with_advantages

from turnrl.agent.hf_policy import HFPolicy
from turnrl.agent.model import MODEL_SHAPES, load_tokenizer, random_model
from turnrl.agent.policy import Completion, SamplingParams
from turnrl.agent.records import Episode, StopReason, Turn
from turnrl.rl.distributed import init_from_env
from turnrl.rl.learner import Learner
from turnrl.rl.learner_config import LearnerConfig
from turnrl.rl.placement import resolve_device

PEAK_BF16_FLOPS = {"H100": 989e12, "H200": 989e12}
"""Dense bf16 tensor-core peak by device name (NVIDIA datasheets, SXM parts)."""

TINY_SHAPE: dict[str, Any] = {
    **MODEL_SHAPES["qwen2.5-1.5b"],
    "vocab_size": 49152,
    "hidden_size": 64,
    "intermediate_size": 128,
    "num_hidden_layers": 2,
    "num_attention_heads": 4,
    "num_key_value_heads": 2,
    "bos_token_id": 1,
    "eos_token_id": 2,
}
"""The `--quick` model: Qwen2's architecture, tiny (ids of `make_episodes` are < 49152)."""


def model_flops(model: transformers.PreTrainedModel, episodes: list[Episode]) -> float:
    """Model FLOPs of one learner step over `episodes` (module docstring)."""
    config = model.config.get_text_config()
    hidden, layers = int(config.hidden_size), int(config.num_hidden_layers)
    embed = model.get_input_embeddings().weight
    head = model.get_output_embeddings()
    assert isinstance(embed, torch.Tensor) and head is not None
    n_params = sum(p.numel() for p in model.parameters())
    tied = head.weight.data_ptr() == embed.data_ptr()
    n_decoder = n_params - embed.numel() - (0 if tied else head.weight.numel())
    lengths = [len(e.token_ids()) for e in episodes]
    trained = sum(
        len(t.completion_ids) for e in episodes for t in e.turns if t.advantage is not None
    )
    return (
        6.0 * n_decoder * sum(lengths)
        + 6.0 * embed.numel() * trained
        + 6.0 * layers * hidden * sum(n * n for n in lengths)
    )


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def timed(fns: list[Callable[[], object]], reps: int, device: torch.device) -> list[float]:
    """Median seconds of each function, taking turns within each repetition."""
    times: list[list[float]] = [[] for _ in fns]
    for _ in range(reps):
        for fn, out in zip(fns, times, strict=True):
            sync(device)
            start = time.perf_counter()
            fn()
            sync(device)
            out.append(time.perf_counter() - start)
    return [statistics.median(t) for t in times]


def tokenizer_for_policy() -> transformers.PreTrainedTokenizerBase:
    """The embedded tokenizer where it is cached; else a one-word tokenizer (the decode test
    sets its own end ids and no stop strings, so the policy never reads text)."""
    try:
        embedded: transformers.PreTrainedTokenizerBase = load_tokenizer()
        return embedded
    except (FileNotFoundError, OSError, ImportError, ValueError):
        from tokenizers import Tokenizer, models

        fallback: transformers.PreTrainedTokenizerBase = transformers.PreTrainedTokenizerFast(
            tokenizer_object=Tokenizer(models.WordLevel({"<unk>": 0}, unk_token="<unk>"))
        )
        return fallback


def decode(
    model: transformers.PreTrainedModel,
    prompts: list[list[int]],
    max_tokens: int,
    device: torch.device,
    autocast_dtype: torch.dtype | None = None,
) -> tuple[float, list[Completion]]:
    """Generated tokens per second of `HFPolicy` over the concurrent `prompts`."""
    policy = HFPolicy(
        model,
        tokenizer_for_policy(),
        max_batch_size=len(prompts),
        end_token_ids=(),
        seed=0,
        prefix_cache=False,
        autocast_dtype=autocast_dtype,
    )
    params = SamplingParams(temperature=1.0, max_tokens=max_tokens)

    async def run() -> list[Completion]:
        return list(await asyncio.gather(*(policy.generate(p, params) for p in prompts)))

    try:
        asyncio.run(run())  # warm-up: kernels, allocator
        sync(device)
        start = time.perf_counter()
        completions = asyncio.run(run())
        sync(device)
        seconds = time.perf_counter() - start
    finally:
        policy.close()
    return sum(len(c.token_ids) for c in completions) / seconds, completions


def as_episodes(prompts: list[list[int]], completions: list[Completion]) -> list[Episode]:
    return [
        Episode(
            episode_id=f"d{i}",
            task_id="gpu_check",
            group_id="0",
            turns=[
                Turn(
                    index=0,
                    prompt_ids=p,
                    completion_ids=list(c.token_ids),
                    completion_logprobs=list(c.logprobs),
                    observation_ids=[],
                    text="",
                    finish_reason=c.finish_reason,
                )
            ],
            stop_reason=StopReason.ANSWERED,
        )
        for i, (p, c) in enumerate(zip(prompts, completions, strict=True))
    ]


def max_gap(learner: Learner, episodes: list[Episode]) -> float:
    rescored = learner.logprobs(episodes)
    return max(
        abs(float(a) - float(b))
        for e, row in zip(episodes, rescored, strict=True)
        for t, lps in zip(e.turns, row, strict=True)
        for a, b in zip(t.completion_logprobs, lps, strict=True)
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--quick", action="store_true", help="tiny model, seconds on a CPU")
    parser.add_argument("--device", choices=["auto", "cpu", "cuda"], default="auto")
    parser.add_argument("--episodes", type=int, default=64)
    parser.add_argument("--longest", type=int, default=2048, help="longest episode, tokens")
    # 1.5B: ~24 GB of float32 weights, grads and AdamW moments, plus ~30 GB of bf16
    # activations for 8192 tokens without checkpointing (estimate): fits an 80 GB H100.
    parser.add_argument("--micro-batch-tokens", type=int, default=8192)
    parser.add_argument("--reps", type=int, default=3)
    parser.add_argument("--gradient-checkpointing", action="store_true")
    parser.add_argument("--learner-only", action="store_true", help="skip decode and logprobs")
    parser.add_argument("--decode-batch", type=int, default=32)
    parser.add_argument("--decode-prompt", type=int, default=256)
    parser.add_argument("--decode-tokens", type=int, default=128)
    args = parser.parse_args()
    shape: str | dict[str, Any] = "qwen2.5-1.5b"
    if args.quick:
        shape = TINY_SHAPE
        args.episodes, args.longest, args.micro_batch_tokens, args.reps = 8, 128, 512, 1
        args.decode_batch, args.decode_prompt, args.decode_tokens = 4, 32, 8
    group = init_from_env()  # under torchrun: data-parallel learner steps
    world = 1 if group is None else group.world_size
    device = resolve_device(args.device, None if group is None else group.local_rank)
    peak = next((v for k, v in PEAK_BF16_FLOPS.items() if k in device_name(device)), None)
    start = time.perf_counter()
    with device:  # built in place: no float32 copy of 1.5B weights through the host
        model = random_model(shape, dtype=torch.float32)
    n_params = sum(p.numel() for p in model.parameters())
    say(
        f"device {device_name(device)} x {world}; model {type(model).__name__} "
        f"{n_params / 1e9:.3f}B parameters, random weights; built in "
        f"{time.perf_counter() - start:.1f} s; torch {torch.__version__}, "
        f"transformers {transformers.__version__}"
    )

    # 1. Learner steps, padded and packed, on the same episodes.
    episodes = with_advantages(make_episodes(args.episodes, args.longest, seed=3, shortest=0.1))
    n_real = sum(len(e.token_ids()) for e in episodes)
    base = {
        "device": device.type,
        "dtype": "bfloat16",
        "lr": 1e-6,
        "micro_batch_tokens": args.micro_batch_tokens,
        "gradient_checkpointing": args.gradient_checkpointing,
    }
    padded = LearnerConfig(**base, share_prefix=False)
    packed = LearnerConfig(**base, packing=True)
    learner = Learner(model, padded, data_parallel=group)
    # Every rank is given the whole batch and trains on its share (`Learner.step`).
    mine = episodes if group is None else group.shard(episodes)
    computed: dict[bool, float] = {}

    def step(cfg: LearnerConfig) -> None:
        learner.config = cfg
        computed[cfg.packing] = learner.step(episodes).scalars["n_padded_tokens"]

    step(packed)
    step(padded)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    packed_s, padded_s = timed([lambda: step(packed), lambda: step(padded)], args.reps, device)
    peak_gb = torch.cuda.max_memory_allocated(device) / 1e9 if device.type == "cuda" else None
    flops = model_flops(model, episodes)
    rows: dict[str, dict[str, float | None]] = {}
    for name, seconds, is_packed in (("padded", padded_s, False), ("packed", packed_s, True)):
        mfu = flops / seconds / peak / world if peak else None
        rows[name] = {"seconds": seconds, "tokens_per_s": n_real / seconds, "mfu": mfu}
        say(
            f"learner step, {name}: {seconds:.3f} s, {n_real / seconds:,.0f} real tokens/s, "
            f"{computed[is_packed]:.0f} tokens computed for {len(mine)} episodes on rank 0, "
            f"{flops / seconds / 1e12:.3g} model TFLOP/s"
            + (f", MFU {mfu:.3f}" if mfu is not None else "")
        )
    say(
        f"{len(episodes)} episodes, {n_real} tokens, micro-batch budget "
        f"{args.micro_batch_tokens}; peak GPU memory "
        + (f"{peak_gb:.1f} GB" if peak_gb is not None else "n/a (cpu)")
    )

    if args.learner_only or group is not None:
        mfu = rows["packed"]["mfu"]
        summary = {
            "bench": "gpu_check",
            "value": round(float(rows["packed"]["tokens_per_s"] or 0.0), 1),
            "unit": "tokens/s (learner, packed)",
            "ratio": None if mfu is None else round(mfu, 3),
            "ratio_of": "model FLOPs / peak dense bf16, per GPU",
            "target": ">= 0.30 MFU",
            "ok": None if mfu is None else mfu >= 0.30,
            "gpus": world,
            "packing_speedup": round(padded_s / packed_s, 2),
        }
        say(json.dumps(summary))
        return

    # 2. Decode throughput; 3. the logprob gap on what was sampled.
    g = torch.Generator().manual_seed(4)
    prompts = [
        torch.randint(3, 49152, (args.decode_prompt,), generator=g).tolist()
        for _ in range(args.decode_batch)
    ]
    learner.config = padded
    fp32_rate, fp32_out = decode(model, prompts, args.decode_tokens, device)
    fp32_gap = max_gap(learner, as_episodes(prompts, fp32_out))
    # What `turnrl train` samples with under `learner.dtype: bfloat16`: the float32 master
    # weights under the learner's bf16 autocast.
    auto_rate, auto_out = decode(model, prompts, args.decode_tokens, device, torch.bfloat16)
    auto_gap = max_gap(learner, as_episodes(prompts, auto_out))
    bf16_model = copy.deepcopy(model).to(torch.bfloat16)
    bf16_rate, bf16_out = decode(bf16_model, prompts, args.decode_tokens, device)
    del bf16_model
    bf16_gap = max_gap(learner, as_episodes(prompts, bf16_out))
    say(
        f"HFPolicy decode, {args.decode_batch} concurrent x {args.decode_tokens} tokens after "
        f"{args.decode_prompt}-token prompts: {fp32_rate:,.0f} tokens/s with the float32 "
        f"master weights, {auto_rate:,.0f} with them under bf16 autocast (turnrl train's), "
        f"{bf16_rate:,.0f} with a bf16 copy"
    )
    say(
        f"max |policy - learner (bf16 autocast)| logprob: autocast policy {auto_gap:.4f}, "
        f"bf16 policy {bf16_gap:.4f}, float32 policy {fp32_gap:.4f}"
    )
    mfu = rows["packed"]["mfu"]
    say(
        json.dumps(
            {
                "bench": "gpu_check",
                "value": round(float(rows["packed"]["tokens_per_s"] or 0.0), 1),
                "unit": "tokens/s (learner, packed)",
                "ratio": None if mfu is None else round(mfu, 3),
                "ratio_of": "model FLOPs / peak dense bf16",
                "target": ">= 0.30 MFU",
                "ok": None if mfu is None else mfu >= 0.30,
                "device": device_name(device),
                "padded_tokens_per_s": round(float(rows["padded"]["tokens_per_s"] or 0.0), 1),
                "padded_mfu": None
                if rows["padded"]["mfu"] is None
                else round(rows["padded"]["mfu"], 3),
                "packing_speedup": round(padded_s / packed_s, 2),
                "peak_memory_gb": None if peak_gb is None else round(peak_gb, 1),
                "decode_tokens_per_s_fp32": round(fp32_rate, 1),
                "decode_tokens_per_s_bf16": round(bf16_rate, 1),
                "decode_tokens_per_s_autocast": round(auto_rate, 1),
                "max_logprob_gap_autocast_policy": round(auto_gap, 5),
                "max_logprob_gap_bf16": round(bf16_gap, 5),
                "max_logprob_gap_fp32_policy": round(fp32_gap, 5),
                "seconds": round(time.perf_counter() - start, 1),
            }
        )
    )


def say(text: str) -> None:
    """Print on rank 0 only (every rank under torchrun computes the same figures)."""
    if not torch.distributed.is_initialized() or torch.distributed.get_rank() == 0:
        print(text, flush=True)


def device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return "cpu"


if __name__ == "__main__":
    main()
