"""HFPolicy decode throughput at 16 concurrent episodes, and multi-turn rollouts with its prefix
cache, against transformers `generate`.

Decode: 16 concurrent `generate` calls with prompts of one length, sampling at temperature 1
with no end ids (`end_token_ids=()`), so every row samples exactly `--new` tokens. The limit is
one `model.generate` call on the same 16 prompts as one batch (same lengths, same token count,
sampling, KV cache): what the model does with nobody scheduling around it. The ratio
turnrl/hf-generate shows what HFPolicy's scheduling, per-row sampling and bookkeeping cost.
Target: >= 0.8. Each side runs `--repeats` times after a warm-up; the best run counts.

Multi-turn (the demo's rollout workload): 16 concurrent episodes share a ~590-id prompt (system
prompt, tool schemas, examples), each adds its own ~30-id task, then for 3 turns samples 48 ids
and appends a 60-id observation and the next assistant header. HFPolicy runs it with the prefix
cache on and off (a fresh policy each run, so the cache starts empty); `model.generate` runs
each turn as one batch that prefills every full history again. `multiturn_speedup` = cache-off
wall time / cache-on wall time (target >= 3); prefill ids show where the time goes.

One torch thread by default: with two intra-op threads on a 2-core machine that other work
shares, both sides slow down many times over and the figures mean little.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import time
from dataclasses import dataclass

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


def sampling_config(model: PreTrainedModel, new: int) -> GenerationConfig:
    """Sampling at temperature 1 over the whole vocabulary, exactly `new` ids."""
    return GenerationConfig(
        do_sample=True,
        temperature=1.0,
        top_k=0,
        top_p=1.0,
        max_new_tokens=new,
        min_new_tokens=new,
        eos_token_id=model.config.eos_token_id,
        pad_token_id=model.config.pad_token_id,
    )


def hf_run(model: PreTrainedModel, prompts: list[list[int]], new: int) -> float:
    config = sampling_config(model, new)
    ids = torch.tensor(prompts)
    start = time.perf_counter()
    with torch.inference_mode():
        out = model.generate(ids, attention_mask=torch.ones_like(ids), generation_config=config)
    elapsed = time.perf_counter() - start
    assert out.shape[1] == ids.shape[1] + new
    return ROWS * new / elapsed


@dataclass(frozen=True)
class Rollout:
    """The multi-turn workload: every id each episode's prompts are made of, but the sampled."""

    shared: list[int]
    """The prompt every episode starts with."""
    tasks: list[list[int]]
    """Per episode, the rest of its first prompt (ends with the assistant header)."""
    observations: list[list[list[int]]]
    """Per episode and turn, the ids appended after the completion (before the header)."""
    header: list[int]
    """The next assistant header, after each observation."""
    new: int
    """Ids sampled per turn."""

    @property
    def turns(self) -> int:
        return len(self.observations[0])


def make_rollout(
    tokenizer: PreTrainedTokenizerBase,
    shared: int,
    task: int,
    observation: int,
    new: int,
    turns: int,
) -> Rollout:
    def ids(text: str) -> list[int]:
        return list(tokenizer(text, add_special_tokens=False).input_ids)

    tools = " ".join(
        f'{{"name": "tool_{i}", "description": "Looks up fact {i} about an entity and returns '
        f'it as JSON.", "parameters": {{"entity": {{"type": "string"}}}}}}'
        for i in range(40)
    )
    system = ids(f"<|im_start|>system\nYou are an agent. Call tools as JSON. Tools: {tools}")
    header = ids("<|im_start|>assistant\n")
    tasks = []
    for e in range(ROWS):
        question = ids(
            f"<|im_end|>\n<|im_start|>user\nTask {e}: " + f"find fact {e} of x{e}. " * 20
        )
        tasks.append(question[: task - len(header)] + header)

    def observation_ids(e: int, t: int) -> list[int]:
        result = f'{{"fact": {e * 7 + t}, "ok": true}} ' * 20
        return ids("<|im_end|>\n<|im_start|>tool\n" + result)[:observation]

    observations = [[observation_ids(e, t) for t in range(turns)] for e in range(ROWS)]
    return Rollout(system[:shared], tasks, observations, header, new)


async def rollout_policy(policy: HFPolicy, work: Rollout) -> float:
    async def episode(e: int) -> None:
        prompt = work.shared + work.tasks[e]
        for t in range(work.turns):
            params = SamplingParams(temperature=1.0, max_tokens=work.new, seed=100 * e + t)
            completion = await policy.generate(prompt, params)
            assert len(completion.token_ids) == work.new
            prompt = prompt + list(completion.token_ids) + work.observations[e][t] + work.header

    start = time.perf_counter()
    await asyncio.gather(*(episode(e) for e in range(ROWS)))
    return time.perf_counter() - start


def rollout_generate(model: PreTrainedModel, work: Rollout) -> tuple[float, int]:
    """Wall time and ids prefilled: each turn one `generate` batch over the full histories."""
    histories = [work.shared + task for task in work.tasks]
    config = sampling_config(model, work.new)
    prefilled = 0
    start = time.perf_counter()
    for t in range(work.turns):
        ids = torch.tensor(histories)
        with torch.inference_mode():
            out = model.generate(ids, attention_mask=torch.ones_like(ids), generation_config=config)
        prefilled += ids.numel()
        width = ids.shape[1]
        histories = [
            h + out[e, width:].tolist() + work.observations[e][t] + work.header
            for e, h in enumerate(histories)
        ]
    return time.perf_counter() - start, prefilled


async def multiturn(
    model: PreTrainedModel, tokenizer: PreTrainedTokenizerBase, work: Rollout, repeats: int
) -> dict[str, float]:
    """Best wall time of each side over `repeats`, and the ids each prefilled."""
    times: dict[str, list[float]] = {"on": [], "off": [], "generate": []}
    prefilled: dict[str, int] = {}
    cached = 0
    for _ in range(repeats):
        for side in ("off", "on"):
            async with HFPolicy(
                model, tokenizer, max_batch_size=ROWS, end_token_ids=(), prefix_cache=side == "on"
            ) as policy:
                times[side].append(await rollout_policy(policy, work))
            prefilled[side] = policy.n_prefill_tokens
            cached = max(cached, policy.n_cached_tokens)
        elapsed, prefilled["generate"] = rollout_generate(model, work)
        times["generate"].append(elapsed)
    best = {side: min(runs) for side, runs in times.items()}
    print(
        f"multi-turn: {ROWS} episodes x {work.turns} turns, shared prompt {len(work.shared)} ids, "
        f"task {len(work.tasks[0])}, observation {len(work.observations[0][0])} + header "
        f"{len(work.header)}, {work.new} new ids a turn: cache on {best['on']:.1f} s "
        f"({prefilled['on']} ids prefilled, {cached} from the cache), cache off "
        f"{best['off']:.1f} s ({prefilled['off']}), generate {best['generate']:.1f} s "
        f"({prefilled['generate']}); runs "
        + "; ".join(f"{side} {', '.join(f'{x:.1f}' for x in runs)}" for side, runs in times.items())
    )
    return {
        "multiturn_cache_on_s": round(best["on"], 2),
        "multiturn_cache_off_s": round(best["off"], 2),
        "multiturn_generate_s": round(best["generate"], 2),
        "multiturn_prefill_ids_on": prefilled["on"],
        "multiturn_prefill_ids_off": prefilled["off"],
        "multiturn_prefill_ids_generate": prefilled["generate"],
        "multiturn_speedup": round(best["off"] / best["on"], 2),
        "multiturn_speedup_vs_generate": round(best["generate"] / best["on"], 2),
    }


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
    work = make_rollout(tokenizer, *args.multiturn)
    turns = await multiturn(model, tokenizer, work, args.multiturn_repeats)
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
        "target": ">= 0.8, multiturn_speedup >= 3",
        "ok": ratio >= 0.8 and turns["multiturn_speedup"] >= 3,
        **turns,
    }


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--quick", action="store_true", help="short run (< 45 s on 2 cores)")
    parser.add_argument("--tiny", action="store_true", help="the tiny random model instead")
    parser.add_argument("--prompt", type=int, default=None, help="prompt length in ids")
    parser.add_argument("--new", type=int, default=None, help="ids sampled per row")
    parser.add_argument("--repeats", type=int, default=None)
    parser.add_argument(
        "--multiturn",
        type=int,
        nargs=5,
        default=None,
        metavar=("SHARED", "TASK", "OBSERVATION", "NEW", "TURNS"),
        help="multi-turn workload: ids of the shared prompt, task, observation, sampled per "
        "turn, and turns (default 590 30 60 48 3)",
    )
    parser.add_argument("--multiturn-repeats", type=int, default=None)
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
    if args.multiturn is None:
        args.multiturn = [48, 8, 8, 4, 2] if args.quick else [590, 30, 60, 48, 3]
    if args.multiturn_repeats is None:
        args.multiturn_repeats = 1 if args.quick else 2
    print(json.dumps(asyncio.run(main(args))))
