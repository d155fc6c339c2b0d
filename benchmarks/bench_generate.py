"""HFPolicy decode throughput at 16 concurrent episodes, against transformers `generate`.

16 concurrent `generate` calls with prompts of one length, sampling at temperature 1 with no
end ids (`end_token_ids=()`), so every row samples exactly `--new` tokens. The limit is one
`model.generate` call on the same 16 prompts as one batch (same lengths, same token count,
sampling, KV cache): what the model does with nobody scheduling around it. The ratio
turnrl/hf-generate shows what HFPolicy's scheduling, per-row sampling and bookkeeping cost.
Target: >= 0.8. Each side runs `--repeats` times after a warm-up; the best run counts.
One torch thread by default: with two intra-op threads on a 2-core machine that other work
shares, both sides slow down many times over and the figures mean little.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import time

import torch
from transformers import GenerationConfig, PreTrainedModel, PreTrainedTokenizerBase

from turnrl.agent.hf_policy import HFPolicy
from turnrl.agent.model import load_model, load_tokenizer, tiny_model_dir
from turnrl.agent.policy import SamplingParams

ROWS = 16


def make_prompts(tokenizer: PreTrainedTokenizerBase, length: int) -> list[list[int]]:
    """`ROWS` distinct chat prompts cut or padded (with filler text) to exactly `length` ids."""
    prompts = []
    for i in range(ROWS):
        question = f"Question {i}: name {i + 2} facts about the number {i * 7 + 3}. " * 40
        ids = tokenizer.apply_chat_template(
            [{"role": "user", "content": question}], add_generation_prompt=True, return_dict=False
        )
        prompts.append(list(ids)[-length:])
    return prompts


async def turnrl_run(policy: HFPolicy, prompts: list[list[int]], new: int) -> float:
    params = [SamplingParams(temperature=1.0, max_tokens=new, seed=i) for i in range(ROWS)]
    start = time.perf_counter()
    completions = await asyncio.gather(
        *(policy.generate(p, s) for p, s in zip(prompts, params, strict=True))
    )
    elapsed = time.perf_counter() - start
    assert all(len(c.token_ids) == new for c in completions)
    return ROWS * new / elapsed


def hf_run(model: PreTrainedModel, prompts: list[list[int]], new: int) -> float:
    config = GenerationConfig(
        do_sample=True,
        temperature=1.0,
        top_k=0,
        top_p=1.0,
        max_new_tokens=new,
        min_new_tokens=new,
        eos_token_id=model.config.eos_token_id,
        pad_token_id=model.config.pad_token_id,
    )
    ids = torch.tensor(prompts)
    start = time.perf_counter()
    with torch.inference_mode():
        out = model.generate(ids, attention_mask=torch.ones_like(ids), generation_config=config)
    elapsed = time.perf_counter() - start
    assert out.shape[1] == ids.shape[1] + new
    return ROWS * new / elapsed


async def main(args: argparse.Namespace) -> dict[str, object]:
    path = tiny_model_dir() if args.tiny else None
    tokenizer = load_tokenizer(path)
    model = load_model(path)
    prompts = make_prompts(tokenizer, args.prompt)
    async with HFPolicy(model, tokenizer, max_batch_size=ROWS, end_token_ids=()) as policy:
        warm = [p[-8:] for p in prompts]
        await turnrl_run(policy, warm, 2)
        hf_run(model, warm, 2)
        ours, peer = [], []
        for _ in range(args.repeats):
            peer.append(hf_run(model, prompts, args.new))
            ours.append(await turnrl_run(policy, prompts, args.new))
    value, limit = max(ours), max(peer)
    ratio = value / limit
    print(
        f"prompt {args.prompt} ids, {args.new} new ids x {ROWS} rows, "
        f"torch threads {torch.get_num_threads()}: turnrl {value:.1f} tok/s "
        f"(runs {', '.join(f'{x:.1f}' for x in ours)}), hf-generate {limit:.1f} tok/s "
        f"(runs {', '.join(f'{x:.1f}' for x in peer)})"
    )
    return {
        "bench": "generate",
        "value": round(value, 1),
        "unit": "tok/s",
        "ratio": round(ratio, 3),
        "ratio_of": "turnrl/hf-generate",
        "target": ">= 0.8",
        "ok": ratio >= 0.8,
    }


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--quick", action="store_true", help="short run (< 45 s on 2 cores)")
    parser.add_argument("--tiny", action="store_true", help="the tiny random model instead")
    parser.add_argument("--prompt", type=int, default=None, help="prompt length in ids")
    parser.add_argument("--new", type=int, default=None, help="ids sampled per row")
    parser.add_argument("--repeats", type=int, default=None)
    parser.add_argument(
        "--threads",
        type=int,
        default=1,
        help="torch intra-op threads (0: torch's default); one keeps a shared machine steady",
    )
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.prompt is None:
        args.prompt = 64 if args.quick else 256
    if args.new is None:
        args.new = 24 if args.quick else 128
    if args.repeats is None:
        args.repeats = 1 if args.quick else 3
    print(json.dumps(asyncio.run(main(args))))
