"""The sessions that `turnrl train` and `turnrl eval` run: wiring, progress and printing.

A `Session` holds a run's live objects (tokenizer, policy and its weight sync, suite, tools,
sandbox, learner, store). The RL step itself is `turnrl.loop.train_step` (rollout -> grade ->
measure -> score -> store -> learn -> sync); this module loops over steps, shows progress,
prints curves and tables, and saves checkpoints.
"""

from __future__ import annotations

import asyncio
import contextlib
import gc
import json
import random
import shutil
import time
from collections.abc import Awaitable, Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from rich.console import Console
from rich.progress import (
    BarColumn,
    MofNCompleteColumn,
    Progress,
    TaskID,
    TextColumn,
    TimeElapsedColumn,
)
from transformers import PreTrainedModel

from turnrl.agent.chat import Renderer
from turnrl.agent.chat_template import build_renderer
from turnrl.agent.hf_policy import HFPolicy
from turnrl.agent.model import (
    embedded_model_dir,
    load_model,
    load_tokenizer,
    tiny_model_dir,
    tokenizer_dir,
)
from turnrl.agent.model_config import training_refusal
from turnrl.agent.openai_policy import OpenAIPolicy
from turnrl.agent.policy import Policy, SamplingParams, WeightSync
from turnrl.agent.records import Episode
from turnrl.agent.runner import EpisodeRunner
from turnrl.agent.scripted import ScriptedPolicy
from turnrl.agent.store import RunStore
from turnrl.agent.vllm_policy import VLLMPolicy
from turnrl.config import ModelConfig, RunConfig
from turnrl.loop import Rollouts, StepHooks, StepReport, grade, rollout, train_step
from turnrl.openai_backend import OpenAIBackend, cost_line
from turnrl.plots import plot_curves
from turnrl.report import (
    comparison_table,
    curves_table,
    rate_cell,
    success_tests,
    summarize,
    with_intervals,
    write_eval,
)
from turnrl.rl.distributed import torch_world_size
from turnrl.rl.learner import Learner
from turnrl.rl.placement import place_model, resolve_device
from turnrl.sandboxes.base import Sandbox
from turnrl.sandboxes.config import open_sandbox
from turnrl.sft import (
    WarmStartReport,
    collect,
    merge_adapters,
    sft_learner_config,
    store_warm_start,
    train_on,
)
from turnrl.sft_config import WarmStartConfig
from turnrl.suites import build_suite, open_expert, oracle_policies
from turnrl.tasks.base import TaskItem, TaskSuite
from turnrl.tasks.embodied_tools import Generate
from turnrl.tools.base import AnyTool
from turnrl.tools_config import ToolContext, open_run_tools
from turnrl.vllm_backend import VLLMBackend

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
    if cfg.kind == "openai":
        raise ValueError("an API model (model.kind openai) has no weights here")
    if cfg.kind == "vllm":
        return model_dir(cfg.weights)
    return cfg.path


@dataclass
class Session:
    """The live objects of a run."""

    config: RunConfig
    tokenizer: Any
    store: RunStore
    policy: Policy
    sync: WeightSync
    """How the learner's new weights reach `policy` (for an in-process model, a pause and a
    version stamp)."""
    renderer: Renderer
    suite: TaskSuite
    learner: Learner | None
    """The RL learner; None for an evaluation, and until the warm start has run."""
    console: Console
    sandbox: Sandbox | None = None
    model: PreTrainedModel | None = None
    """The weights the policy samples with (None for the oracle): what a warm start and the
    RL learner train in place."""

    extra_tools: list[AnyTool] = field(default_factory=list)
    """The configured tools offered besides the suite's (`RunConfig.tools`), once opened."""
    policy_for: Callable[[TaskItem], Policy] | None = None
    """Each item's own policy (the oracle's script), instead of `policy`."""
    evaluations: dict[str, list[Episode]] = field(default_factory=dict)
    """The episodes of each evaluation so far, by tag (paired before/after comparisons)."""
    backend: VLLMBackend | None = None
    """The vLLM server and its client (`model.kind: vllm`); None for an in-process policy."""
    api: OpenAIBackend | None = None
    """The API model and its cost ledger (`model.kind: openai`, evaluation only)."""
    _closers: list[Callable[[], Awaitable[None]]] = field(default_factory=list)

    async def open_tools(self) -> None:
        """Open `RunConfig.tools` in the run's event loop (an MCP connection lives in one), and
        start (or reach) the vLLM server of a `model.kind: vllm` run."""
        if self.backend is not None:
            self._closers.append(self.backend.close)
            await self.backend.open()
        if self.api is not None:
            self._closers.append(self.api.aclose)  # its connections belong to this loop
        ctx = ToolContext(self.renderer.tokenizer.encode, self.sandbox, self._closers)
        self.extra_tools.extend(await open_run_tools(self.config.tools, ctx))

    async def close_sandbox(self) -> None:
        """Close the extra tools and destroy every sandbox of the run; awaited in the event
        loop that used them."""
        while self._closers:
            with contextlib.suppress(Exception):
                await self._closers.pop()()
        self.extra_tools.clear()
        if self.sandbox is not None:
            await self.sandbox.close()

    def save_checkpoint(self, folder: Path, learner: Learner | None = None) -> Path:
        """Learner state plus a loadable model folder (with the tokenizer) for `turnrl eval`."""
        learner = learner or self.learner
        assert learner is not None
        learner.save_checkpoint(folder, merged=True)
        self.tokenizer.save_pretrained(str(model_dir(self.config.model, folder)))
        return folder

    def start_learner(self, version: int = 0) -> Learner:
        """The RL learner over the session's model, its version continuing from `version` (the
        warm start's steps), so policy versions only ever grow."""
        assert self.model is not None
        self.learner = Learner(self.model, self.config.learner)
        self.learner.version = version
        return self.learner

    def runner(self, temperature: float) -> EpisodeRunner:
        sampling = SamplingParams(temperature=temperature, top_p=self.config.sampling.top_p)
        tools = [*self.suite.tools(), *self.extra_tools]
        return EpisodeRunner(self.policy, self.renderer, tools, self.config.budget, sampling)

    def rollouts(self, temperature: float) -> Rollouts:
        """The rollout stage's inputs at `temperature`."""
        return Rollouts(
            self.runner(temperature),
            self.suite,
            self.config.concurrency,
            tuple(self.extra_tools),
            self.policy_for,
            self.config.task.metrics,
        )


@contextmanager
def open_session(
    config: RunConfig,
    console: Console,
    train: bool,
    checkpoint: Path | None = None,
    tag: str = "eval",
) -> Iterator[Session]:
    """The live objects of a run. A training session writes the run's `config.yaml`; an
    evaluation writes its config as `{tag}.config.yaml` beside a run's, so that evaluating
    into a training run's folder never replaces the config `turnrl replay` reads (an
    evaluation into a new folder writes `config.yaml` too)."""
    if train and torch_world_size() > 1:
        raise ValueError(
            "turnrl train under torchrun is not supported yet: every rank would run its own "
            "rollouts; the learner alone is data-parallel (turnrl.rl.distributed, README "
            "'Training on a GPU')"
        )
    torch.manual_seed(config.seed)
    if config.policy.torch_threads:
        torch.set_num_threads(config.policy.torch_threads)
    refusal = training_refusal(config.model)
    if train and refusal is not None:
        raise ValueError(refusal)
    if config.model.kind == "oracle":
        path = tokenizer_dir()
        console.print(
            f"[bold]model[/] oracle (scripted gold answers)  [bold]run[/] {config.run_dir}"
        )
    elif config.model.kind == "openai":
        path = tokenizer_dir()  # encodes the API's replies into the stored turns
        console.print(f"[bold]model[/] {config.model.model} (API)  [bold]run[/] {config.run_dir}")
    else:
        path = model_dir(config.model, checkpoint)
        console.print(f"[bold]model[/] {path.name}  [bold]run[/] {config.run_dir}")
    tokenizer = load_tokenizer(path)
    renderer = build_renderer(config.chat, tokenizer)
    sandbox = open_sandbox(config.sandbox) if config.needs_sandbox() else None
    expert = _expert(config, console)
    suite = build_suite(
        config.task, renderer.tokenizer.encode, sandbox, expert[1] if expert else None
    )
    suite.tools()  # opens (or builds, once) the search index before the event loop starts
    learner = None
    backend: VLLMBackend | None = None
    api: OpenAIBackend | None = None
    policy: HFPolicy | ScriptedPolicy | VLLMPolicy | OpenAIPolicy
    model: PreTrainedModel | None = None
    if config.model.kind == "vllm":
        vocab = json.loads((path / "config.json").read_text())["vocab_size"]
        backend = VLLMBackend(config.model, path, config.run_dir, int(vocab), config.seed)
        policy = backend.policy
        if train:
            model = load_model(path)
            if config.warm_start is None:
                learner = Learner(model, config.learner)
    elif config.model.kind == "openai":
        api = OpenAIBackend(config.model, renderer, config.seed)
        policy = api.policy
        console.print(f"[bold]API[/] {api.describe()}")
    elif config.model.kind == "oracle":
        eot = str(tokenizer.convert_ids_to_tokens(renderer.end_of_turn_id()))
        oracle = oracle_policies(suite, renderer, eot)
        # The runner's own policy never speaks: every episode gets its item's script.
        policy = ScriptedPolicy(lambda _: f"(no item){eot}", renderer.tokenizer)
    else:
        model = load_model(path)
        if train:
            # On the learner's device before the policy reads the model's device: both use
            # the one module (`learner.device`, `turnrl.rl.placement`).
            place_model(model, config.learner, resolve_device(config.learner.device))
        # With a warm start, the RL learner is built after it (`Session.start_learner`): its
        # KL reference and LoRA adapters belong to the warm-started weights. The policy samples
        # with `model` itself; both learners train it in place (peft injects into it).
        if train and config.warm_start is None:
            learner = Learner(model, config.learner)
        policy = HFPolicy(model, tokenizer, max_batch_size=config.policy.max_batch_size)
    store = RunStore(config.run_dir)
    if train or store.config_text() is None:
        store.write_config(config.to_yaml())
    if not train:
        store.write_config(config.to_yaml(), f"{tag}.config.yaml")
    # Move the start-up heap (torch, transformers, the corpus) out of the collector's view:
    # per-turn allocations would otherwise trigger gen-2 scans of millions of old objects.
    gc.freeze()
    try:
        session = Session(
            config,
            tokenizer,
            store,
            policy,
            policy,
            renderer,
            suite,
            learner,
            console,
            sandbox,
            model=policy.model if isinstance(policy, HFPolicy) else model,
            backend=backend,
            api=api,
        )
        if config.model.kind == "oracle":
            session.policy_for = oracle
        if backend is not None:
            # The session's current weights: the RL learner's (with its adapters), or the
            # warm-started model before the learner exists.
            session.sync = backend.sync(
                lambda: (session.model, session.learner.peft_model if session.learner else None)
            )
        yield session
    finally:
        if isinstance(policy, HFPolicy | VLLMPolicy | OpenAIPolicy):
            policy.close()
        if expert is not None:
            expert[0].close()
        store.close()


def _expert(config: RunConfig, console: Console) -> tuple[HFPolicy, Generate] | None:
    """The model that answers the suite's `ask` when its config names one
    (`SuiteConfig.expert()`: the embodied suite's `ask.answered_by: model`): its policy, to
    close, and its prompt-to-answer function."""
    spec = config.task.expert()
    if spec is None:
        return None
    expert = open_expert(spec)
    console.print(f"[bold]expert[/] {expert.path.name} answers `ask`")
    return expert.policy, expert.generate


def _progress(console: Console) -> Progress:
    return Progress(
        TextColumn("{task.description}"),
        BarColumn(),
        MofNCompleteColumn(),
        TimeElapsedColumn(),
        console=console,
        transient=True,
    )


async def evaluate(s: Session, tag: str) -> dict[str, float]:
    """Evaluate on the first `eval.n_items` test items; episodes are stored with step -1."""
    cfg = s.config.eval
    items = list(s.suite.items("test"))[: cfg.n_items]
    t0 = time.monotonic()
    r = s.rollouts(cfg.temperature)
    with _progress(s.console) as progress:
        bar = progress.add_task(f"{tag}: rollouts", total=len(items) * cfg.group_size)
        episodes = await rollout(
            r,
            items,
            cfg.group_size,
            -1,
            s.config.seed,
            tag,
            on_episode=lambda _: progress.advance(bar),
        )
        if s.api is not None:
            episodes = s.api.charge(episodes)
        episodes = await grade(s.suite, items, episodes, r.concurrency, r.metrics)
    for e in episodes:
        s.store.append_episode(e)
    s.store.flush()
    summary = with_intervals(summarize(episodes), episodes)
    write_eval(s.config.run_dir, tag, episodes, summary)
    s.evaluations[tag] = episodes
    s.console.print(
        f"[bold]{tag}[/]: success {rate_cell(summary)}  "
        + (f"f1 {summary['f1']:.3f}  " if "f1" in summary else "")
        + f"tool calls/ep {summary['tool_calls_per_episode']:.2f}  "
        f"({time.monotonic() - t0:.0f} s, {len(episodes)} episodes)"
    )
    if s.api is not None:
        s.console.print(f"[bold]{tag}[/]: {cost_line(summary, episodes)}")
    return summary


async def train_steps(s: Session) -> list[dict[str, float]]:
    """The RL loop; returns the per-step metrics rows (also appended to the store)."""
    assert s.learner is not None
    cfg = s.config
    train_items = list(s.suite.items("train"))
    rng = random.Random(cfg.seed)
    rollouts = s.rollouts(cfg.sampling.temperature)
    rows = []
    for step in range(cfg.train.steps):
        items = rng.sample(train_items, min(cfg.train.tasks_per_step, len(train_items)))
        with _progress(s.console) as progress:
            bar = progress.add_task(f"s{step}: rollouts", total=len(items) * cfg.train.group_size)

            def advance(_: Episode, bar: TaskID = bar) -> None:
                progress.advance(bar)

            def stage(name: str, step: int = step, bar: TaskID = bar) -> None:
                if name != "rollout":
                    progress.update(bar, description=f"s{step}: {name}", total=None)

            hooks = StepHooks(on_episode=advance, on_stage=stage)
            report = await train_step(
                step,
                items,
                rollouts,
                cfg,
                s.learner,
                s.sync,
                s.store,
                s.renderer.tokenizer.encode,
                hooks,
            )
        row = report.row()
        s.store.append_metrics(row)
        s.store.flush()
        rows.append(row)
        s.console.print(_step_line(report, row))
        if cfg.train.checkpoint_every and (step + 1) % cfg.train.checkpoint_every == 0:
            s.save_checkpoint(cfg.run_dir / "checkpoints" / f"step-{step + 1}")
    return rows


def _step_line(report: StepReport, row: dict[str, float]) -> str:
    loss = "skipped (no signal)" if report.learn.skipped else f"{row['loss']:+.4f}"
    return (
        f"step {report.step}: reward {row['reward']:+.3f}  success {row['success']:.3f}  "
        f"tool calls/ep {row['tool_calls_per_episode']:.2f}  loss {loss}  "
        f"rollout {row['rollout_s']:.0f} s  learn {row['learn_s']:.0f} s"
    )


def prepare_run_dir(run_dir: Path, overwrite: bool) -> None:
    """A run folder holds one run: refuse to mix a new run into an old one's records (or its
    evaluations, or a run that crashed before its first episode)."""
    held = [
        name for name in ("config.yaml", "episodes.rec", "metrics.rec") if (run_dir / name).exists()
    ]
    if held:
        if not overwrite:
            raise FileExistsError(
                f"{run_dir} already holds a run ({', '.join(held)}): pass --overwrite to "
                "replace it, or choose another run_dir (resuming a run is not supported yet)"
            )
        shutil.rmtree(run_dir)


async def run_warm_start(s: Session) -> WarmStartReport:
    """The warm start (`RunConfig.warm_start`): collect trajectories, train on them with a
    learner of its own, store both, checkpoint the weights; the policy is paused meanwhile and
    resumes at the warm start's version."""
    cfg = s.config
    ws = cfg.warm_start
    assert ws is not None and s.model is not None
    elapsed = _clock()
    eot = str(s.tokenizer.convert_ids_to_tokens(s.renderer.end_of_turn_id()))
    s.console.print("[bold]warm start[/]: collecting trajectories")
    data = await collect(
        ws,
        rollouts_at=s.rollouts,
        oracle=oracle_policies(s.suite, s.renderer, eot),
        suite=s.suite,
        temperature=cfg.sampling.temperature,
        seed=cfg.seed,
        success_metric=cfg.rewards.success_metric,
        answer_in_observations=cfg.task.answer_in_observations,
    )
    report = WarmStartReport(data, collect_s=elapsed())
    if not data.episodes:
        raise ValueError(
            f"warm start: no episode to train on (collected {data.collected}, failed "
            f"{data.failed}, unsupported {data.unsupported})"
        )
    learner = Learner(s.model, sft_learner_config(cfg.learner, ws))
    s.console.print(
        f"[bold]warm start[/]: {len(data.episodes)} episodes (collected {data.collected}, "
        f"failed {data.failed}, answer unsupported by an observation {data.unsupported}"
        f"{', kept' if ws.evidence == 'flag' else ''}); training {ws.epochs} epoch(s)"
    )
    elapsed = _clock()
    await s.sync.begin_update()
    try:
        report.rows = await asyncio.to_thread(train_on, learner, data.episodes, ws, cfg.seed)
        report.train_s = elapsed()
        report.version = learner.version
        store_warm_start(cfg.run_dir, report, cfg.to_yaml())
        s.save_checkpoint(cfg.run_dir / "checkpoints" / "warm_start", learner)
        merge_adapters(learner)
    finally:
        await s.sync.end_update(learner.version)
    nll = [r["nll"] for r in report.rows if "nll" in r]
    s.console.print(
        f"[bold]warm start[/]: {len(report.rows)} steps, nll {nll[0]:.3f} -> {nll[-1]:.3f} "
        f"(collect {report.collect_s:.0f} s, train {report.train_s:.0f} s)"
    )
    return report


def run_train(
    config: RunConfig, console: Console, with_eval: bool = True, overwrite: bool = False
) -> dict[str, Any]:
    """`turnrl train`: evaluate, warm-start (when configured), evaluate, train with RL,
    evaluate again; print curves and the evaluations side by side with their intervals."""
    t0 = time.monotonic()
    prepare_run_dir(config.run_dir, overwrite)
    stages: dict[str, float] = {}
    with open_session(config, console, train=True) as s:

        async def main() -> dict[str, Any]:
            out: dict[str, Any] = {}
            try:
                await s.open_tools()
                lap = _laps(stages)
                out["before"] = await evaluate(s, "eval-before") if with_eval else {}
                lap("eval-before")
                version = 0
                if config.warm_start is not None:
                    version = (await run_warm_start(s)).version
                    lap("warm-start")
                    if with_eval:
                        out["warm"] = await evaluate(s, "eval-warm")
                        lap("eval-warm")
                if s.learner is None:
                    s.start_learner(version)
                out["rows"] = await train_steps(s)
                lap("rl")
                out["after"] = await evaluate(s, "eval-after") if with_eval else {}
                lap("eval-after")
            finally:
                await s.close_sandbox()
            return out

        out = asyncio.run(main())
        ckpt = s.save_checkpoint(config.run_dir / "checkpoints" / "final")
        evaluations = dict(s.evaluations)
    out["stages_s"] = stages
    if out["rows"]:
        console.print(curves_table(out["rows"], CURVES))
        plot = plot_curves(config.run_dir, out["rows"])
        if plot is not None:
            console.print(f"training curves: {plot}")
    if with_eval:
        columns = {"base": "eval-before", "warm start": "eval-warm", "after RL": "eval-after"}
        _print_comparison(
            console, {k: evaluations[v] for k, v in columns.items() if v in evaluations}
        )
    console.print(
        "stages: " + "  ".join(f"{k} {v:.0f} s" for k, v in stages.items()) + "\n"
        f"done in {time.monotonic() - t0:.0f} s; episodes, metrics and config in "
        f"{config.run_dir}; checkpoint in {ckpt}"
    )
    return out


def run_sft(
    config: RunConfig, console: Console, with_eval: bool = True, overwrite: bool = False
) -> dict[str, Any]:
    """`turnrl sft`: evaluate, warm-start on trajectories (`RunConfig.warm_start`, the oracle
    on train items by default), evaluate again."""
    if config.warm_start is None:
        config = config.model_copy(update={"warm_start": WarmStartConfig()})
    prepare_run_dir(config.run_dir, overwrite)
    with open_session(config, console, train=True) as s:

        async def main() -> dict[str, Any]:
            try:
                await s.open_tools()
                before = await evaluate(s, "eval-before") if with_eval else {}
                report = await run_warm_start(s)
                after = await evaluate(s, "eval-warm") if with_eval else {}
            finally:
                await s.close_sandbox()
            return {"before": before, "report": report, "after": after}

        out = asyncio.run(main())
        evaluations = dict(s.evaluations)
    if with_eval:
        columns = {"base": "eval-before", "warm start": "eval-warm"}
        _print_comparison(console, {k: evaluations[v] for k, v in columns.items()})
    console.print(f"checkpoint in {config.run_dir / 'checkpoints' / 'warm_start'}")
    return out


def _print_comparison(console: Console, columns: dict[str, list[Episode]]) -> None:
    console.print(comparison_table(columns))
    for line in success_tests(columns):
        console.print(line)
    if "after RL" in columns and "warm start" in columns:
        rl = {"warm start": columns["warm start"], "after RL": columns["after RL"]}
        for line in success_tests(rl):
            console.print(line)


def _clock() -> Callable[[], float]:
    t0 = time.monotonic()
    return lambda: time.monotonic() - t0


def _laps(into: dict[str, float]) -> Callable[[str], None]:
    last = [time.monotonic()]

    def lap(name: str) -> None:
        now = time.monotonic()
        into[name] = now - last[0]
        last[0] = now

    return lap


def run_eval(config: RunConfig, console: Console, checkpoint: Path | None) -> dict[str, float]:
    """`turnrl eval`: evaluate the configured model (or a checkpoint) on held-out items."""
    with open_session(config, console, train=False, checkpoint=checkpoint, tag="eval") as s:

        async def main() -> dict[str, float]:
            try:
                await s.open_tools()
                return await evaluate(s, "eval")
            finally:
                await s.close_sandbox()

        summary = asyncio.run(main())
    return summary
