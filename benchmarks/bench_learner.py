"""One learner step against a raw forward+backward over the same tokens.

The learner's step (micro-batching, recomputed logprobs at temperature, PPO-clip, entropy
metric, gradient clipping, AdamW) is timed against the floor a hand-written loop pays for the
same padded micro-batches: `model(input_ids).logits -> log_softmax -> gather -> masked mean ->
backward`, with no optimizer step. Ratio = learner seconds per step / raw seconds; target
<= 1.2. The model is the embedded SmolLM2-135M (fp32) when its converted folder is available
(the full run converts it on first use), else a random-weight Llama with its dimensions (same
compute). Episodes are multi-turn: a prompt, then turns of sampled tokens and observations, so
about half the tokens are trained. Also reported: the learner with the LM head applied to every
position (`select_before_head=False`) and a LoRA step.

Shared prefix: a demo-like batch (16 episodes behind one ~564-token prompt, ~200 tokens of
turns each, as `turnrl train` on the search demo sees) is stepped with
`LearnerConfig.share_prefix` on and off on the same learner, alternating; the JSON line's
`share_prefix_speedup` is unshared seconds / shared seconds (both losses are printed: they
agree to float rounding).

Packing: episodes of widely varying length (15-100% of the longest, as multi-turn agent
episodes are: one answers at once, another uses every turn) are stepped with
`LearnerConfig.packing` on and off on the same learner, alternating, same micro-batch token
budget, no shared prefix in either; `packing_speedup` is padded seconds / packed seconds and
`packing_token_ratio` the tokens the padded layout computes over the packed one (the losses
agree to float rounding).
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from collections.abc import Callable

import torch
import transformers

from turnrl.agent.records import Episode, StopReason, Turn
from turnrl.rl.batch import TokenBatch, micro_batches
from turnrl.rl.learner import Learner
from turnrl.rl.learner_config import LearnerConfig, LoraConfig
from turnrl.rl.logprobs import token_logprobs


def smollm2_sized_model() -> transformers.PreTrainedModel:
    """The embedded model if it is converted (or `--model embedded` converts it), else random
    weights with SmolLM2-135M's dimensions."""
    config = transformers.LlamaConfig(
        vocab_size=49152,
        hidden_size=576,
        intermediate_size=1536,
        num_hidden_layers=30,
        num_attention_heads=9,
        num_key_value_heads=3,
        max_position_embeddings=8192,
        tie_word_embeddings=False,
    )
    torch.manual_seed(0)
    model = transformers.LlamaForCausalLM(config)
    model.eval()
    return model


def load(model_choice: str) -> tuple[transformers.PreTrainedModel, str]:
    if model_choice in ("auto", "embedded"):
        try:
            from turnrl.agent import model as embedded

            folder = embedded.models_dir() / embedded.EMBEDDED_NAME
            if model_choice == "embedded" or folder.is_dir():
                return embedded.load_model(), "SmolLM2-135M (embedded)"
        except (ImportError, FileNotFoundError) as exc:
            if model_choice == "embedded":
                raise
            print(f"embedded model unavailable ({exc}); using random weights")
    return smollm2_sized_model(), "SmolLM2-135M dims, random weights"


def make_episodes(n: int, length: int, seed: int, shortest: float = 0.8) -> list[Episode]:
    """`n` episodes of `shortest`-100% of `length` tokens: a prompt of length/5, then turns of
    20-60% sampled tokens and observations; the first episode is the longest."""
    g = torch.Generator().manual_seed(seed)
    episodes = []
    for i in range(n):
        spread = shortest + (1 - shortest) * float(torch.rand((), generator=g))
        target = length if i == 0 else int(length * spread)
        n_prompt = length // 5
        turns: list[Turn] = []
        used = 0
        while used < target:
            n_c = min(int(torch.randint(length // 16, length // 6, (), generator=g)), target - used)
            n_o = min(
                int(torch.randint(length // 24, length // 8, (), generator=g)), target - used - n_c
            )
            ids = torch.randint(3, 49152, (n_prompt + n_c + n_o,), generator=g).tolist()
            turns.append(
                Turn(
                    index=len(turns),
                    prompt_ids=ids[:n_prompt],
                    completion_ids=ids[n_prompt : n_prompt + n_c],
                    completion_logprobs=(-2.0 - torch.rand(n_c, generator=g)).tolist(),
                    observation_ids=ids[n_prompt + n_c :],
                    text="",
                    finish_reason="stop",
                )
            )
            used += n_prompt + n_c + n_o
            n_prompt = 0
        episodes.append(
            Episode(
                episode_id=str(i),
                task_id="bench",
                group_id=str(i // 4),
                turns=turns,
                stop_reason=StopReason.ANSWERED,
            )
        )
    return episodes


def with_advantages(episodes: list[Episode]) -> list[Episode]:
    """Half the episodes pushed up, half down: both PPO branches do work."""
    return [
        e.model_copy(
            update={
                "turns": [
                    t.model_copy(update={"advantage": 1.0 if i % 2 else -1.0}) for t in e.turns
                ]
            }
        )
        for i, e in enumerate(episodes)
    ]


def demo_episodes(n: int, prompt: int, turns: int, seed: int) -> list[Episode]:
    """`n` episodes that all start with the same `prompt` ids, then about `turns` tokens
    (+-20%) of turns: ~60% sampled, the rest observations; advantages +-1."""
    g = torch.Generator().manual_seed(seed)
    shared = torch.randint(3, 49152, (prompt,), generator=g).tolist()
    episodes = []
    for i in range(n):
        budget = int(turns * (0.8 + 0.4 * float(torch.rand((), generator=g))))
        out: list[Turn] = []
        while budget > 0:
            n_c = min(budget, int(torch.randint(20, 60, (), generator=g)))
            n_o = min(budget - n_c, int(torch.randint(10, 40, (), generator=g)))
            ids = torch.randint(3, 49152, (n_c + n_o,), generator=g).tolist()
            out.append(
                Turn(
                    index=len(out),
                    prompt_ids=shared if not out else [],
                    completion_ids=ids[:n_c],
                    completion_logprobs=(-2.0 - torch.rand(n_c, generator=g)).tolist(),
                    observation_ids=ids[n_c:],
                    text="",
                    finish_reason="stop",
                    advantage=1.0 if i % 2 else -1.0,
                )
            )
            budget -= n_c + n_o
        episodes.append(
            Episode(
                episode_id=f"demo{i}",
                task_id="bench",
                group_id=str(i // 8),
                turns=out,
                stop_reason=StopReason.ANSWERED,
            )
        )
    return episodes


def raw_fwd_bwd(model: transformers.PreTrainedModel, batches: list[TokenBatch]) -> None:
    """The floor: full logits, log_softmax, gather, masked mean, backward; no optimizer."""
    model.train()
    n_tokens = sum(b.n_tokens for b in batches)
    for b in batches:
        logits = model(input_ids=b.input_ids_B_T).logits
        logprobs = torch.log_softmax(logits[:, :-1].float(), dim=-1)
        target_lp = logprobs.gather(-1, b.input_ids_B_T[:, 1:, None]).squeeze(-1)
        mask = b.loss_mask_B_T[:, 1:]
        loss = -(target_lp * b.advantages_B_T[:, 1:] * mask).sum() / n_tokens
        loss.backward()
    model.eval()
    model.zero_grad(set_to_none=True)


def timed(fns: list[Callable[[], object]], reps: int) -> list[float]:
    """Median seconds of each function; the functions take turns within each repetition so
    that a load change on a shared machine hits them alike."""
    times: list[list[float]] = [[] for _ in fns]
    for _ in range(reps):
        for fn, out in zip(fns, times, strict=True):
            start = time.perf_counter()
            fn()
            out.append(time.perf_counter() - start)
    return [statistics.median(t) for t in times]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--quick", action="store_true", help="small batch, finishes in < 45 s")
    parser.add_argument("--model", choices=["auto", "embedded", "random"], default="auto")
    parser.add_argument("--episodes", type=int, default=8)
    parser.add_argument("--length", type=int, default=512)
    parser.add_argument("--micro-batch-tokens", type=int, default=2048)
    parser.add_argument("--reps", type=int, default=3)
    parser.add_argument("--no-lora", action="store_true", help="skip the LoRA step")
    parser.add_argument("--demo-episodes", type=int, default=16)
    parser.add_argument("--demo-prompt", type=int, default=564)
    parser.add_argument("--demo-turns", type=int, default=200)
    parser.add_argument("--pack-episodes", type=int, default=16)
    parser.add_argument("--pack-length", type=int, default=512, help="longest packed episode")
    parser.add_argument("--pack-micro-batch-tokens", type=int, default=2048)
    parser.add_argument(
        "--demo-micro-batch-tokens",
        type=int,
        default=4096,
        help="budget of the shared-prefix comparison (rows per micro-batch = budget / length)",
    )
    args = parser.parse_args()
    if args.quick:
        args.episodes, args.length, args.reps, args.micro_batch_tokens = 2, 128, 2, 2048
        args.no_lora = True
        args.demo_episodes, args.demo_prompt, args.demo_turns = 4, 96, 48
        args.pack_episodes, args.pack_length, args.pack_micro_batch_tokens = 6, 96, 256

    model, model_name = load(args.model)
    episodes = make_episodes(args.episodes, args.length, seed=0)
    episodes = with_advantages(episodes)
    # The raw baseline's batches take the advantages as a list.
    advantages: list[list[float | None]] = [[t.advantage for t in e.turns] for e in episodes]
    config = LearnerConfig(lr=1e-7, micro_batch_tokens=args.micro_batch_tokens)
    learner = Learner(model, config)
    batches = micro_batches(episodes, advantages, config.micro_batch_tokens)
    n_tokens = sum(b.n_tokens for b in batches)
    n_real = sum(int(b.lengths_B.sum()) for b in batches)
    n_padded = sum(b.n_padded for b in batches)
    print(
        f"model: {model_name}; {len(episodes)} episodes, {n_real} tokens ({n_padded} padded, "
        f"{n_tokens} trained) in {len(batches)} micro-batches; threads={torch.get_num_threads()}"
    )

    # Warm-up: allocator, kernels, and AdamW's lazily created state.
    learner.step(episodes)
    raw_fwd_bwd(model, batches)

    raw_s, step_s = timed(
        [lambda: raw_fwd_bwd(model, batches), lambda: learner.step(episodes)],
        args.reps,
    )
    ratio = step_s / raw_s
    print(f"raw forward+backward: {raw_s:.3f} s; learner step: {step_s:.3f} s; ratio {ratio:.3f}")

    # Shared prefix on and off, the same learner (lr 1e-7: its steps barely move the weights).
    demo = demo_episodes(args.demo_episodes, args.demo_prompt, args.demo_turns, seed=1)
    demo_config = config.model_copy(update={"micro_batch_tokens": args.demo_micro_batch_tokens})
    on = demo_config.model_copy(update={"share_prefix": True})
    off = demo_config.model_copy(update={"share_prefix": False})
    losses: dict[bool, float] = {}

    def demo_step(cfg: LearnerConfig) -> None:
        learner.config = cfg
        losses[cfg.share_prefix] = learner.step(demo).scalars["loss"]

    demo_step(on)
    demo_step(off)
    warm = dict(losses)  # consecutive steps on (nearly) the same weights
    shared_s, plain_s = timed([lambda: demo_step(on), lambda: demo_step(off)], args.reps)
    speedup = plain_s / shared_s
    lengths = [len(e.token_ids()) for e in demo]
    print(
        f"shared prefix: {len(demo)} episodes of {min(lengths)}-{max(lengths)} tokens behind "
        f"one {args.demo_prompt}-token prompt, micro-batch budget "
        f"{args.demo_micro_batch_tokens}: step {shared_s:.3f} s shared vs {plain_s:.3f} s "
        f"plain ({speedup:.2f}x); loss {warm[True]:.6f} vs {warm[False]:.6f}"
    )

    # Packing on and off, the same learner; no shared prefix in either (packing excludes it).
    varied = with_advantages(
        make_episodes(args.pack_episodes, args.pack_length, seed=2, shortest=0.15)
    )
    budget = args.pack_micro_batch_tokens
    pack_off = LearnerConfig(lr=1e-7, micro_batch_tokens=budget, share_prefix=False)
    pack_on = LearnerConfig(lr=1e-7, micro_batch_tokens=budget, packing=True)
    pack_losses: dict[bool, float] = {}
    computed: dict[bool, float] = {}

    def pack_step(cfg: LearnerConfig) -> None:
        learner.config = cfg
        scalars = learner.step(varied).scalars
        pack_losses[cfg.packing] = scalars["loss"]
        computed[cfg.packing] = scalars["n_padded_tokens"]

    # No warm-up: the learner is warm (kernels, AdamW state); the losses printed are those of
    # the last two (consecutive) steps.
    packed_s, unpacked_s = timed(
        [lambda: pack_step(pack_on), lambda: pack_step(pack_off)], 1 if args.quick else args.reps
    )
    pack_warm = dict(pack_losses)
    pack_speedup = unpacked_s / packed_s
    token_ratio = computed[False] / computed[True]
    lengths = [len(e.token_ids()) for e in varied]
    print(
        f"packing: {len(varied)} episodes of {min(lengths)}-{max(lengths)} tokens "
        f"({sum(lengths)} real), micro-batch budget {budget}: step {packed_s:.3f} s packed "
        f"({computed[True]:.0f} tokens computed) vs {unpacked_s:.3f} s padded "
        f"({computed[False]:.0f}); {pack_speedup:.2f}x; loss {pack_warm[True]:.6f} vs "
        f"{pack_warm[False]:.6f}"
    )

    if not args.quick:

        def full_head() -> None:
            model.train()
            for b in batches:
                lp, _ = token_logprobs(model, b, select_before_head=False)
                (lp.sum() / n_tokens).backward()
            model.eval()
            model.zero_grad(set_to_none=True)

        def selected_head() -> None:
            model.train()
            for b in batches:
                lp, _ = token_logprobs(model, b)
                (lp.sum() / n_tokens).backward()
            model.eval()
            model.zero_grad(set_to_none=True)

        sel_s, full_s = timed([selected_head, full_head], args.reps)
        print(
            f"logprobs fwd+bwd, head on trained positions only: {sel_s:.3f} s; "
            f"head on every position: {full_s:.3f} s ({full_s / sel_s:.2f}x)"
        )

    if not args.no_lora:
        learner.config = config
        del learner  # its AdamW state; `model` stays for the raw baseline
        lora_model, _ = load(args.model)
        lora = Learner(lora_model, config.model_copy(update={"adaptation": LoraConfig()}))
        lora.step(episodes)
        raw2_s, lora_s = timed(
            [lambda: raw_fwd_bwd(model, batches), lambda: lora.step(episodes)],
            args.reps,
        )
        print(
            f"LoRA (r=16, all linear layers) step: {lora_s:.3f} s; raw full-weight forward+"
            f"backward in the same loop: {raw2_s:.3f} s ({lora_s / raw2_s:.2f}x)"
        )

    print(
        json.dumps(
            {
                "bench": "learner",
                "value": round(step_s, 4),
                "unit": "s/step",
                "ratio": round(ratio, 3),
                "ratio_of": "turnrl/raw-fwd-bwd",
                "target": "<= 1.2",
                "ok": ratio <= 1.2,
                "share_prefix_speedup": round(speedup, 2),
                "packing_speedup": round(pack_speedup, 2),
                "packing_token_ratio": round(token_ratio, 2),
            }
        )
    )


if __name__ == "__main__":
    main()
