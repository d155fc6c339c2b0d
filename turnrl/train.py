"""The training and evaluation loops that `turnrl train` and `turnrl eval` run.

One synchronous RL loop on one process: roll out a batch of task groups with the current
weights, grade, compute turn rewards and advantages, append the episodes to the run store,
take one learner step, then bump the policy version (in-process weight sync: the policy
generates with the very module the learner updates, so the next rollouts use the new weights).
Rollouts and learning alternate, never overlap, so the shared module is never read while it is
written.
"""

from __future__ import annotations

import asyncio
import contextlib
import gc
import random
import shutil
import time
from collections.abc import Awaitable, Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

from turnrl.agent.chat import ChatML, HFTokenizer
from turnrl.agent.hf_policy import HFPolicy
from turnrl.agent.model import (
    embedded_model_dir,
    load_model,
    load_tokenizer,
    tiny_model_dir,
    tokenizer_dir,
)
from turnrl.agent.policy import Policy, SamplingParams
from turnrl.agent.records import Episode
from turnrl.agent.runner import EpisodeRunner
from turnrl.agent.scripted import ScriptedPolicy
from turnrl.agent.store import RunStore
from turnrl.config import ModelConfig, RunConfig, WebToolConfig
from turnrl.credit import add_gold_signals
from turnrl.report import before_after_table, curves_table, summarize, write_eval
from turnrl.rl.advantages import value_targets
from turnrl.rl.learner import Learner
from turnrl.rl.rollout import collect
from turnrl.rl.scoring import score, turn_scalar_rewards
from turnrl.rl.value_head import with_values
from turnrl.sandboxes.base import Sandbox
from turnrl.sandboxes.config import open_sandbox
from turnrl.suites import build_suite, model_expert, needs_sandbox, oracle_policies
from turnrl.tasks.base import TaskItem, TaskSuite
from turnrl.tasks.embodied_tools import Generate
from turnrl.tools.base import AnyTool
from turnrl.tools.mcp import McpToolkit
from turnrl.tools.web import WebFetch

CURVES = {
    "reward": "reward",
    "success": "success",
    "f1": "f1",
    "tool_calls_per_episode": "calls/ep",
    "format_error_rate": "fmt err",
    "completion_tokens_per_episode": "tok/ep",
    "loss": "loss",
    "clip_frac": "clip",
    "rollout_s": "roll s",
    "learn_s": "learn s",
}
"""Metrics shown in the per-step curves table, with their column labels."""


def model_dir(cfg: ModelConfig, checkpoint: Path | None = None) -> Path:
    """Folder of the weights a run starts from: a checkpoint's loadable model folder (full
    fine-tuning's `model/`, LoRA's `merged/`), or the configured model."""
    if checkpoint is not None:
        for sub in ("merged", "model"):
            if (checkpoint / sub / "config.json").is_file():
                return checkpoint / sub
        if (checkpoint / "config.json").is_file():
            return checkpoint
        raise FileNotFoundError(f"{checkpoint}: no model checkpoint (config.json) found")
    if cfg.kind == "embedded":
        return embedded_model_dir()
    if cfg.kind == "tiny":
        return tiny_model_dir()
    if cfg.kind == "oracle":
        raise ValueError("the oracle model has no weights")
    return cfg.path


@dataclass
class Session:
    """The live objects of a run."""

    config: RunConfig
    tokenizer: Any
    store: RunStore
    policy: HFPolicy | ScriptedPolicy
    renderer: ChatML
    suite: TaskSuite
    learner: Learner | None
    console: Console
    sandbox: Sandbox | None = None

    extra_tools: list[AnyTool] = field(default_factory=list)
    """The configured tools offered besides the suite's (`RunConfig.tools`), once opened."""
    policy_for: Callable[[TaskItem], Policy] | None = None
    """Each item's own policy (the oracle's script), instead of `policy`."""
    _closers: list[Callable[[], Awaitable[None]]] = field(default_factory=list)

    async def open_tools(self) -> None:
        """Open `RunConfig.tools` in the run's event loop (an MCP connection lives in one)."""
        for cfg in self.config.tools:
            if isinstance(cfg, WebToolConfig):
                web = WebFetch(self.renderer.tokenizer.encode, cfg.fetch)
                self._closers.append(web.aclose)
                self.extra_tools.append(web)
            else:
                kit = McpToolkit(cfg.server)
                self._closers.append(kit.aclose)
                await kit.connect()
                self.extra_tools.extend(kit.tools)

    async def close_sandbox(self) -> None:
        """Close the extra tools and destroy every sandbox of the run; awaited in the event
        loop that used them."""
        while self._closers:
            with contextlib.suppress(Exception):
                await self._closers.pop()()
        self.extra_tools.clear()
        if self.sandbox is not None:
            await self.sandbox.close()

    def save_checkpoint(self, folder: Path) -> Path:
        """Learner state plus a loadable model folder (with the tokenizer) for `turnrl eval`."""
        assert self.learner is not None
        self.learner.save_checkpoint(folder, merged=True)
        self.tokenizer.save_pretrained(str(model_dir(self.config.model, folder)))
        return folder

    def runner(self, temperature: float) -> EpisodeRunner:
        sampling = SamplingParams(temperature=temperature, top_p=self.config.sampling.top_p)
        tools = [*self.suite.tools(), *self.extra_tools]
        return EpisodeRunner(self.policy, self.renderer, tools, self.config.budget, sampling)


@contextmanager
def open_session(
    config: RunConfig, console: Console, train: bool, checkpoint: Path | None = None
) -> Iterator[Session]:
    torch.manual_seed(config.seed)
    if config.policy.torch_threads:
        torch.set_num_threads(config.policy.torch_threads)
    if config.model.kind == "oracle":
        if train:
            raise ValueError("the oracle model plays gold answers: use it with `turnrl eval`")
        path = tokenizer_dir()
        console.print(
            f"[bold]model[/] oracle (scripted gold answers)  [bold]run[/] {config.run_dir}"
        )
    else:
        path = model_dir(config.model, checkpoint)
        console.print(f"[bold]model[/] {path.name}  [bold]run[/] {config.run_dir}")
    tokenizer = load_tokenizer(path)
    renderer = ChatML(HFTokenizer(tokenizer))
    sandbox = open_sandbox(config.sandbox) if needs_sandbox(config.task) else None
    expert = _expert(config, console)
    suite = build_suite(
        config.task, renderer.tokenizer.encode, sandbox, expert[1] if expert else None
    )
    suite.tools()  # opens (or builds, once) the search index before the event loop starts
    learner = None
    policy: HFPolicy | ScriptedPolicy
    if config.model.kind == "oracle":
        eot = str(tokenizer.convert_ids_to_tokens(renderer.end_of_turn_id()))
        oracle = oracle_policies(suite, renderer, eot)
        # The runner's own policy never speaks: every episode gets its item's script.
        policy = ScriptedPolicy(lambda _: f"(no item){eot}", renderer.tokenizer)
    else:
        model = load_model(path)
        learner = Learner(model, config.learner) if train else None
        policy = HFPolicy(
            learner.model if learner else model,
            tokenizer,
            max_batch_size=config.policy.max_batch_size,
        )
    store = RunStore(config.run_dir)
    store.write_config(config.to_yaml())
    # Move the start-up heap (torch, transformers, the corpus) out of the collector's view:
    # per-turn allocations would otherwise trigger gen-2 scans of millions of old objects.
    gc.freeze()
    try:
        session = Session(
            config, tokenizer, store, policy, renderer, suite, learner, console, sandbox
        )
        if config.model.kind == "oracle":
            session.policy_for = oracle
        yield session
    finally:
        if isinstance(policy, HFPolicy):
            policy.close()
        if expert is not None:
            expert[0].close()
        store.close()


def _expert(config: RunConfig, console: Console) -> tuple[HFPolicy, Generate] | None:
    """The model that answers `ask` when the task says `ask.answered_by: model` (its policy,
    to close, and its prompt-to-answer function)."""
    ask = getattr(config.task, "ask", None)
    if ask is None or ask.answered_by != "model":
        return None
    path = model_dir(ask.model)
    console.print(f"[bold]expert[/] {path.name} answers `ask`")
    tokenizer = load_tokenizer(path)
    renderer = ChatML(HFTokenizer(tokenizer))
    policy = HFPolicy(load_model(path), tokenizer, max_batch_size=8)
    return policy, model_expert(policy, renderer, ask.max_new_tokens)


def _progress(console: Console) -> Progress:
    return Progress(
        TextColumn("{task.description}"),
        BarColumn(),
        MofNCompleteColumn(),
        TimeElapsedColumn(),
        console=console,
        transient=True,
    )


async def _rollouts(
    s: Session,
    items: Sequence[TaskItem],
    group_size: int,
    step: int,
    temperature: float,
    tag: str,
    seed: int,
) -> list[Episode]:
    with _progress(s.console) as progress:
        bar = progress.add_task(f"{tag}: rollouts", total=len(items) * group_size)
        return await collect(
            s.runner(temperature),
            s.suite,
            items,
            group_size,
            step,
            seed,
            s.config.concurrency,
            on_episode=lambda _: progress.advance(bar),
            tag=tag,
            extra_tools=s.extra_tools,
            policy_for=s.policy_for,
        )


async def evaluate(s: Session, tag: str) -> dict[str, float]:
    """Evaluate on the first `eval.n_items` test items; episodes are stored with step -1."""
    cfg = s.config.eval
    items = list(s.suite.items("test"))[: cfg.n_items]
    t0 = time.monotonic()
    episodes = await _rollouts(s, items, cfg.group_size, -1, cfg.temperature, tag, s.config.seed)
    for e in episodes:
        s.store.append_episode(e)
    s.store.flush()
    summary = summarize(episodes)
    write_eval(s.config.run_dir, tag, episodes, summary)
    s.console.print(
        f"[bold]{tag}[/]: success {summary['success']:.3f}  "
        + (f"f1 {summary['f1']:.3f}  " if "f1" in summary else "")
        + f"tool calls/ep {summary['tool_calls_per_episode']:.2f}  "
        f"({time.monotonic() - t0:.0f} s, {len(episodes)} episodes)"
    )
    return summary


async def train_steps(s: Session) -> list[dict[str, float]]:
    """The RL loop; returns the per-step metrics rows (also appended to the store)."""
    assert s.learner is not None
    cfg = s.config
    train_items = list(s.suite.items("train"))
    rng = random.Random(cfg.seed)
    rows = []
    for step in range(cfg.train.steps):
        items = rng.sample(train_items, min(cfg.train.tasks_per_step, len(train_items)))
        t0 = time.monotonic()
        episodes = await _rollouts(
            s,
            items,
            cfg.train.group_size,
            step,
            cfg.sampling.temperature,
            f"s{step}",
            seed=cfg.seed + 1_000_000 * (step + 1),
        )
        rollout_s = time.monotonic() - t0
        episodes = await asyncio.to_thread(_measure, s, episodes, items)
        episodes, returns = score(episodes, cfg.rewards, cfg.train.estimator)
        for e in episodes:
            s.store.append_episode(e)
        s.store.flush()
        t1 = time.monotonic()
        advantages = [[t.advantage or 0.0 for t in e.turns] for e in episodes]
        targets = None
        if cfg.learner.value_head is not None:
            rewards_NT = turn_scalar_rewards(episodes, cfg.rewards)
            targets = value_targets(episodes, rewards_NT, cfg.train.estimator)
        with _progress(s.console) as progress:
            progress.add_task(f"s{step}: learner step ({len(episodes)} episodes)", total=None)
            learn = await asyncio.to_thread(s.learner.step, episodes, advantages, targets)
        s.policy.set_version(s.learner.version)
        row: dict[str, float] = {"step": float(step), "policy_version": float(s.learner.version)}
        row["reward"] = sum(returns) / len(returns)
        row |= summarize(episodes)
        row |= {k: float(v) for k, v in learn.items()}
        row |= {"rollout_s": rollout_s, "learn_s": time.monotonic() - t1}
        s.store.append_metrics(row)
        s.store.flush()
        rows.append(row)
        loss = "skipped (no signal)" if row["skipped"] else f"{row['loss']:+.4f}"
        s.console.print(
            f"step {step}: reward {row['reward']:+.3f}  success {row['success']:.3f}  "
            f"tool calls/ep {row['tool_calls_per_episode']:.2f}  loss {loss}  "
            f"rollout {rollout_s:.0f} s  learn {row['learn_s']:.0f} s"
        )
        if cfg.train.checkpoint_every and (step + 1) % cfg.train.checkpoint_every == 0:
            s.save_checkpoint(cfg.run_dir / "checkpoints" / f"step-{step + 1}")
    return rows


def _measure(s: Session, episodes: list[Episode], items: Sequence[TaskItem]) -> list[Episode]:
    """The model measurements credit needs (gold-answer probabilities, values), taken with the
    weights that sampled `episodes`, before the learner changes them."""
    assert s.learner is not None
    cfg = s.config
    episodes = add_gold_signals(
        episodes,
        {it.id: it for it in items},
        cfg.rewards,
        model=s.learner.model,
        encode=s.renderer.tokenizer.encode,
        temperature=cfg.learner.temperature,
        micro_batch_tokens=cfg.learner.micro_batch_tokens,
    )
    if s.learner.value_head is not None:
        # One value more per episode: the state after the last turn, T-PPO's bootstrap at a cut.
        episodes = with_values(episodes, s.learner.values(episodes, bootstrap=True))
    return episodes


def prepare_run_dir(run_dir: Path, overwrite: bool) -> None:
    """A run folder holds one run: refuse to mix a new run into an old one's records."""
    if (run_dir / "episodes.rec").exists():
        if not overwrite:
            raise FileExistsError(
                f"{run_dir} already holds a run; pass --overwrite or choose another run_dir"
            )
        shutil.rmtree(run_dir)


def run_train(
    config: RunConfig, console: Console, with_eval: bool = True, overwrite: bool = False
) -> dict[str, Any]:
    """`turnrl train`: evaluate, train, evaluate again; print curves and the before/after table."""
    t0 = time.monotonic()
    prepare_run_dir(config.run_dir, overwrite)
    with open_session(config, console, train=True) as s:

        async def main() -> dict[str, Any]:
            try:
                await s.open_tools()
                before = await evaluate(s, "eval-before") if with_eval else {}
                rows = await train_steps(s)
                after = await evaluate(s, "eval-after") if with_eval else {}
            finally:
                await s.close_sandbox()
            return {"before": before, "rows": rows, "after": after}

        out = asyncio.run(main())
        ckpt = s.save_checkpoint(config.run_dir / "checkpoints" / "final")
    if out["rows"]:
        console.print(curves_table(out["rows"], CURVES))
    if with_eval:
        console.print(before_after_table(out["before"], out["after"]))
    console.print(
        f"done in {time.monotonic() - t0:.0f} s; episodes, metrics and config in {config.run_dir}; "
        f"checkpoint in {ckpt}"
    )
    return out


def run_eval(config: RunConfig, console: Console, checkpoint: Path | None) -> dict[str, float]:
    """`turnrl eval`: evaluate the configured model (or a checkpoint) on held-out items."""
    with open_session(config, console, train=False, checkpoint=checkpoint) as s:

        async def main() -> dict[str, float]:
            try:
                await s.open_tools()
                return await evaluate(s, "eval")
            finally:
                await s.close_sandbox()

        summary = asyncio.run(main())
    return summary
