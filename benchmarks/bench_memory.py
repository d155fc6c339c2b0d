"""Resident memory across learner steps: does RSS stay flat, step after step?

Runs N learner steps (full fine-tuning) of demo-like batches, 16 episodes behind one shared
~564-token prompt with ~240 tokens of turns each, lengths varying from step to step, the way
`turnrl train` drives the learner: each step's no-gradient measurement pass and its optimizer
step run in `asyncio.to_thread`, so they land on the default executor's worker threads (as in
`turnrl.loop.train_step`). RSS (`VmRSS`) is read after every step; the figure is the growth
from step 1 (optimizer state and allocator pools already in place) to step N. Target: RSS_N /
RSS_1 <= 1.10. `--malloc release` (default) is the learner's allocator hygiene
(`LearnerConfig.release_memory`: a 1 MiB mmap threshold inside the learner's passes and
`malloc_trim` after each, `turnrl.rl.memory`); `--malloc none` turns it off, to compare.
The model is the embedded SmolLM2-135M when converted (random weights with its dimensions
otherwise; `--quick` takes a tiny random model then).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import time
from pathlib import Path

import torch
import transformers
from bench_learner import demo_episodes, load

from turnrl.rl.learner import Learner
from turnrl.rl.learner_config import LearnerConfig


def rss_mb() -> tuple[float, float]:
    """(current RSS, peak RSS) of this process in MB, from /proc."""
    fields = {}
    for line in Path("/proc/self/status").read_text().splitlines():
        key, _, value = line.partition(":")
        if key in ("VmRSS", "VmHWM"):
            fields[key] = int(value.split()[0]) / 1024
    return fields["VmRSS"], fields["VmHWM"]


def tiny() -> transformers.PreTrainedModel:
    torch.manual_seed(0)
    config = transformers.LlamaConfig(
        vocab_size=49152,
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        tie_word_embeddings=False,
    )
    return transformers.LlamaForCausalLM(config).eval()


async def run(args: argparse.Namespace) -> None:
    if args.quick and args.model == "auto":
        model, name = tiny(), "tiny random Llama (vocab 49152)"
    else:
        model, name = load(args.model)
    config = LearnerConfig(
        lr=1e-7,
        micro_batch_tokens=args.micro_batch_tokens,
        release_memory=args.malloc == "release",
        share_prefix=not args.no_share_prefix,
    )
    learner = Learner(model, config)
    print(
        f"model: {name}; {args.episodes} episodes x (prompt {args.prompt} + ~{args.turns}) "
        f"tokens, micro-batch budget {args.micro_batch_tokens}, malloc {args.malloc}, "
        f"share_prefix {config.share_prefix}, threads={torch.get_num_threads()}"
    )
    rss: list[float] = []
    for step in range(1, args.steps + 1):
        # A new batch each step: other lengths, other turn structures (other tensor shapes).
        episodes = demo_episodes(args.episodes, args.prompt, args.turns, seed=step)
        start = time.perf_counter()
        await asyncio.to_thread(learner.logprobs, episodes)
        result = await asyncio.to_thread(learner.step, episodes)
        now, peak = rss_mb()
        rss.append(now)
        tokens = sum(len(e.token_ids()) for e in episodes)
        print(
            f"step {step:2d}: {tokens} tokens, {result.scalars['n_micro_batches']:.0f} "
            f"micro-batches, {time.perf_counter() - start:6.1f} s; RSS {now:8.0f} MB "
            f"(peak {peak:.0f} MB)",
            flush=True,
        )
    growth = rss[-1] - rss[0]
    ratio = rss[-1] / rss[0]
    print(f"RSS after step 1: {rss[0]:.0f} MB; after step {args.steps}: {rss[-1]:.0f} MB")
    print(
        json.dumps(
            {
                "bench": "memory",
                "value": round(growth, 1),
                "unit": f"MB RSS growth, step 1 -> {args.steps}",
                "ratio": round(ratio, 3),
                "ratio_of": f"rss-step-{args.steps}/rss-step-1",
                "rss_step1_mb": round(rss[0]),
                "rss_last_mb": round(rss[-1]),
                "rss_max_mb": round(max(rss)),
                "peak_mb": round(rss_mb()[1]),
                "malloc": args.malloc,
                "target": "<= 1.10",
                "ok": ratio <= 1.10,
            }
        )
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--quick", action="store_true", help="4 small steps, tiny model")
    parser.add_argument("--model", choices=["auto", "embedded", "random"], default="auto")
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--episodes", type=int, default=16)
    parser.add_argument("--prompt", type=int, default=564)
    parser.add_argument("--turns", type=int, default=240)
    parser.add_argument("--micro-batch-tokens", type=int, default=8192)
    parser.add_argument("--malloc", choices=["release", "none"], default="release")
    parser.add_argument("--no-share-prefix", action="store_true")
    args = parser.parse_args()
    if args.quick:
        args.steps, args.episodes, args.prompt, args.turns = 4, 8, 128, 64
        args.micro_batch_tokens = 2048
    asyncio.run(run(args))


if __name__ == "__main__":
    main()
