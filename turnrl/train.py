"""What `turnrl train`, `turnrl sft` and `turnrl eval` run: evaluations, the warm start, the RL
steps, progress and printing, over a `turnrl.session.Session`.

The RL step itself is `turnrl.loop.train_step` (rollout -> grade -> measure -> score -> store ->
learn -> sync); this module loops over steps, shows progress, prints curves and tables, and
saves checkpoints.

Under `torchrun` (several processes, e.g. one per GPU) rank 0 runs all of it and its learners
lead; every other rank runs `follow_run`: a replica of the model that takes part in each
learner call (`turnrl.rl.ranks`).
"""

from __future__ import annotations

import asyncio
import shutil
import time
from collections.abc import Callable
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

from turnrl.agent.model import load_model
from turnrl.agent.records import Episode
from turnrl.agent.routing import FixedRouter, StepRouter
from turnrl.agent.store import RunStore
from turnrl.config import RunConfig
from turnrl.loop import (
    StepHooks,
    StepReport,
    grade,
    laps,
    learn_and_sync,
    rollout,
    store_episodes,
    train_step,
)
from turnrl.openai_backend import cost_line
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
from turnrl.resume import (
    ResumeError,
    RunProgress,
    check_config,
    load_state,
    mark,
    read_progress,
    read_run,
    save_state,
)
from turnrl.rl.distributed import torch_world_size
from turnrl.rl.ranks import FollowReport, Ranks, finish, follow, join
from turnrl.routing import TaskRouting
from turnrl.routing_eval import (
    EXPLORE_TAG,
    boundary_tag,
    refit_router,
    report_frontier,
    report_ope,
)
from turnrl.session import Session, model_dir, open_session
from turnrl.sft import (
    WARM_START_DIR,
    WarmStartReport,
    collect,
    sft_learner_config,
    store_warm_start,
    train_on,
)
from turnrl.sft_config import WarmStartConfig
from turnrl.suites import oracle_policies

RL_SEED_OFFSET = 7919
"""The RL phase reseeds torch's generator with `seed + RL_SEED_OFFSET` (a prime: no other stage
seeds near it)."""

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


def _progress(console: Console) -> Progress:
    return Progress(
        TextColumn("{task.description}"),
        BarColumn(),
        MofNCompleteColumn(),
        TimeElapsedColumn(),
        console=console,
        transient=True,
    )


async def evaluate(s: Session, tag: str, router: StepRouter | None = None) -> dict[str, float]:
    """Evaluate on the first `eval.n_items` test items; episodes are stored with step -1 and
    journaled as they end. A resumed run keeps the journaled ones, and reads a finished
    evaluation (a stage in `progress.json`) back from the store. `router` replaces a routed
    run's router (a boundary policy: one model for every turn)."""
    if tag in s.progress.stages:
        return _evaluated(s, tag, s.stored.evaluations.get(tag, []), "stored")
    cfg = s.config.eval
    items = list(s.suite.items("test"))[: cfg.n_items]
    t0 = time.monotonic()
    r = s.rollouts(cfg.temperature, router)
    resumed = s.stored.resumed(tag)
    with _progress(s.console) as progress:
        bar = progress.add_task(f"{tag}: rollouts", total=len(items) * cfg.group_size)

        def ended(e: Episode) -> None:
            s.store.append_rollout(e)
            progress.advance(bar)

        episodes = await rollout(
            r,
            items,
            cfg.group_size,
            -1,
            s.config.seed,
            tag,
            on_episode=ended,
            done=resumed.rollouts,
        )
        if s.api is not None:
            episodes = s.api.charge(episodes)
        episodes = await grade(s.suite, items, episodes, r.concurrency, r.metrics)
    store_episodes(s.store, episodes, resumed.stored)
    return _evaluated(s, tag, episodes, f"{time.monotonic() - t0:.0f} s")


def _evaluated(s: Session, tag: str, episodes: list[Episode], took: str) -> dict[str, float]:
    """An evaluation's summary, written beside the run and printed."""
    summary = with_intervals(summarize(episodes), episodes)
    write_eval(s.config.run_dir, tag, episodes, summary)
    s.evaluations[tag] = episodes
    s.console.print(
        f"[bold]{tag}[/]: success {rate_cell(summary)}  "
        + (f"f1 {summary['f1']:.3f}  " if "f1" in summary else "")
        + f"tool calls/ep {summary['tool_calls_per_episode']:.2f}  "
        f"({took}, {len(episodes)} episodes)"
    )
    if s.api is not None:
        s.console.print(f"[bold]{tag}[/]: {cost_line(summary, episodes)}")
    return summary


async def relearn_unsaved(s: Session) -> None:
    """A resumed run's steps that were learned after its last saved state: learned again from
    their stored episodes (`turnrl.resume`), in either train mode."""
    assert s.learner is not None
    for step in range(s.progress.rl_steps, len(s.stored.rows)):
        result = await learn_and_sync(step, s.stored.steps[step], s.config, s.learner, s.sync)
        s.console.print(f"step {step}: learned again from its stored episodes (v{result.version})")
        _save_state(s, step)


async def train_steps(s: Session) -> list[dict[str, float]]:
    """The synchronous RL loop; returns the metrics rows of the steps it takes (also appended
    to the store). A resumed run continues from the first step without a metrics row."""
    assert s.learner is not None
    cfg = s.config
    plan = s.rl_plan()
    rollouts = s.rollouts(cfg.sampling.temperature)
    rows: list[dict[str, float]] = []
    for step in range(len(s.stored.rows), cfg.train.steps):
        items = plan[step]
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
                s.stored.resumed(f"s{step}"),
            )
        row = report.row()
        s.store.append_metrics(row)
        s.store.flush()
        rows.append(row)
        s.console.print(_step_line(report, row))
        if cfg.train.checkpoint_every and (step + 1) % cfg.train.checkpoint_every == 0:
            s.save_checkpoint(cfg.run_dir / "checkpoints" / f"step-{step + 1}")
        _save_state(s, step)
    return rows


def _save_state(s: Session, step: int) -> None:
    """The resume state after `step`, every `train.resume_every` steps and after the last."""
    every, last = s.config.train.resume_every, step + 1 == s.config.train.steps
    if s.learner is not None and every and ((step + 1) % every == 0 or last):
        s.progress = save_state(s.config.run_dir, s.learner, step + 1, s.progress)


def _step_line(report: StepReport, row: dict[str, float]) -> str:
    loss = "skipped (no signal)" if report.learn.skipped else f"{row['loss']:+.4f}"
    return (
        f"step {report.step}: reward {row['reward']:+.3f}  success {row['success']:.3f}  "
        f"tool calls/ep {row['tool_calls_per_episode']:.2f}  loss {loss}  "
        f"rollout {row['rollout_s']:.0f} s  learn {row['learn_s']:.0f} s"
    )


def prepare_run_dir(run_dir: Path, overwrite: bool) -> None:
    """A run folder holds one run: refuse to mix a new run into an old one's records (or its
    evaluations, or a run that crashed before its first episode: it wrote its config). Empty
    record files alone are not a run (one killed between opening its store and writing its
    config): a new run may start there."""
    records = (RunStore.EPISODES, RunStore.METRICS, RunStore.ROLLOUTS)
    held = [
        name for name in records if (run_dir / name).exists() and (run_dir / name).stat().st_size
    ]
    if (run_dir / RunStore.CONFIG).exists():
        held.insert(0, RunStore.CONFIG)
    if held:
        if not overwrite:
            raise FileExistsError(
                f"{run_dir} already holds a run ({', '.join(held)}): pass --resume to "
                "continue it, --overwrite to replace it, or choose another run_dir"
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
        # The warm start clones the trained policy's own turns: its rollouts are not routed.
        rollouts_at=lambda t: s.rollouts(t, routed=False),
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
    learner = s.new_learner(sft_learner_config(cfg.learner, ws))
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
        learner.merge_adapters()
    finally:
        await s.sync.end_update(learner.version)
    nll = [r["nll"] for r in report.rows if "nll" in r]
    s.console.print(
        f"[bold]warm start[/]: {len(report.rows)} steps, nll {nll[0]:.3f} -> {nll[-1]:.3f} "
        f"(collect {report.collect_s:.0f} s, train {report.train_s:.0f} s)"
    )
    return report


def run_train(
    config: RunConfig,
    console: Console,
    with_eval: bool = True,
    overwrite: bool = False,
    resume: bool = False,
) -> dict[str, Any]:
    """`turnrl train`: evaluate, warm-start (when configured), evaluate, train with RL,
    evaluate again; print curves and the evaluations side by side with their intervals.
    `resume` continues a killed run in `config.run_dir` (`turnrl.resume`). Under torchrun,
    rank 0 does this and the other ranks follow (`follow_run`)."""
    ranks = join()
    if ranks is not None and not ranks.leads:
        return {"follower": follow_run(config, ranks, console)}
    t0 = time.monotonic()
    progress = RunProgress()
    if resume:
        if overwrite:
            raise ResumeError("--resume continues a run and --overwrite replaces it: pick one")
        held = config.run_dir.is_dir()
        stored = RunStore.open_readonly(config.run_dir).config_text() if held else None
        check_config(stored, config, config.run_dir)
        progress = read_progress(config.run_dir)
    else:
        prepare_run_dir(config.run_dir, overwrite)
    warm = "warm-start" in progress.stages
    stages: dict[str, float] = {}
    start = config.run_dir / "checkpoints" / "warm_start" if warm else None
    with open_session(config, console, train=True, checkpoint=start, ranks=ranks) as s:
        s.progress = progress
        if resume:
            s.stored = read_run(s.store)
            console.print(_resuming(s))

        async def main() -> dict[str, Any]:
            out: dict[str, Any] = {}
            try:
                await s.open_tools()
                lap = laps(stages)
                out["before"] = await _stage_eval(s, "eval-before") if with_eval else {}
                lap("eval-before")
                version = 0
                if config.warm_start is not None:
                    version = await _warm_start_stage(s)
                    lap("warm-start")
                    if with_eval:
                        out["warm"] = await _stage_eval(s, "eval-warm")
                        lap("eval-warm")
                if config.boundary is not None:
                    from turnrl.bopo import boundary_stage

                    version = await boundary_stage(s, version)
                    lap("boundary")
                # RL starts from a seed of its own, not from whatever the stages before it
                # drew: a resumed run skips its finished stages (and their draws), and must
                # still build the learner (a value head's init) and step it as the whole run.
                s.reseed(config.seed + RL_SEED_OFFSET)
                if s.learner is None:
                    s.start_learner(version)
                assert s.learner is not None
                loaded = load_state(config.run_dir, s.learner, s.progress)
                # The policy samples with the loaded weights, stamped with their version (also
                # when a resumed run skipped its finished warm start: the policy starts at 0).
                if loaded or s.sync.version != s.learner.version:
                    await s.sync.begin_update()
                    await s.sync.end_update(s.learner.version)
                if s.routing is not None:
                    # A learned router is its logged decisions: refit from the stored steps.
                    for step in range(len(s.stored.rows)):
                        s.routing.learn(s.stored.steps.get(step, []))
                await relearn_unsaved(s)
                if config.train.mode == "async":
                    from turnrl.async_loop import train_async

                    rows = await train_async(s)
                else:
                    rows = await train_steps(s)
                out["rows"] = [*s.stored.rows, *rows]
                lap("rl")
                out["after"] = await evaluate(s, "eval-after") if with_eval else {}
                lap("eval-after")
            finally:
                await s.close_sandbox()
            return out

        out = asyncio.run(main())
        ckpt = s.save_checkpoint(config.run_dir / "checkpoints" / "final")
        evaluations = dict(s.evaluations)
        if ranks is not None:
            assert s.model is not None
            finish(ranks, s.model)
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


async def _stage_eval(s: Session, tag: str) -> dict[str, float]:
    """An evaluation before RL, marked done in `progress.json` once stored."""
    summary = await evaluate(s, tag)
    if tag not in s.progress.stages:
        s.progress = mark(s.config.run_dir, s.progress, tag)
    return summary


async def _warm_start_stage(s: Session) -> int:
    """The warm start, or, when a resumed run finished it, its version (the session's model
    was loaded from its checkpoint). One that did not finish is run again from the start."""
    if "warm-start" in s.progress.stages:
        assert s.progress.warm_start_version is not None
        return s.progress.warm_start_version
    run_dir = s.config.run_dir
    for partial in (run_dir / WARM_START_DIR, run_dir / "checkpoints" / "warm_start"):
        shutil.rmtree(partial, ignore_errors=True)
    version = (await run_warm_start(s)).version
    s.progress = mark(run_dir, s.progress, "warm-start", warm_start_version=version)
    return version


def _resuming(s: Session) -> str:
    run, p = s.stored, s.progress
    return (
        f"[bold]resume[/]: stages done {', '.join(p.stages) or 'none'}; {len(run.rows)} RL "
        f"step(s) learned, {p.rl_steps} in the last saved state; {len(run.journal)} "
        f"rollouts journaled, {len(run.stored)} episodes stored"
    )


def run_sft(
    config: RunConfig, console: Console, with_eval: bool = True, overwrite: bool = False
) -> dict[str, Any]:
    """`turnrl sft`: evaluate, warm-start on trajectories (`RunConfig.warm_start`, the oracle
    on train items by default), evaluate again."""
    if config.warm_start is None:
        config = config.model_copy(update={"warm_start": WarmStartConfig()})
    ranks = join()
    if ranks is not None and not ranks.leads:
        return {"follower": follow_run(config, ranks, console)}
    prepare_run_dir(config.run_dir, overwrite)
    with open_session(config, console, train=True, ranks=ranks) as s:

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
        if ranks is not None:
            assert s.model is not None
            finish(ranks, s.model)
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


def run_eval(config: RunConfig, console: Console, checkpoint: Path | None) -> dict[str, float]:
    """`turnrl eval`: evaluate the configured model (or a checkpoint) on held-out items."""
    if torch_world_size() > 1:
        raise ValueError(
            "turnrl eval runs in one process: launch it without torchrun (every rank would "
            "evaluate and write the same run folder)"
        )
    with open_session(config, console, train=False, checkpoint=checkpoint, tag="eval") as s:

        async def main() -> dict[str, float]:
            try:
                await s.open_tools()
                if s.routing is not None and s.routing.learned is not None:
                    refit_router(s)
                summary = await evaluate(s, "eval")
                if config.models:
                    # Each model alone on the same items: the boundaries of the plane.
                    for name in config.models:
                        await evaluate(s, boundary_tag(name), FixedRouter(name))
                    await _explore_for_ope(s)
                return summary
            finally:
                await s.close_sandbox()

        summary = asyncio.run(main())
        if config.models:
            router = config.router.kind if config.router is not None else "router"
            runs = {f"router ({router})": s.evaluations["eval"]}
            runs |= {f"always {n}": s.evaluations[boundary_tag(n)] for n in config.models}
            report_frontier(console, config.run_dir, runs)
    return summary


async def _explore_for_ope(s: Session) -> None:
    """A task-level bandit router's off-policy check: an exploring pass over the evaluation's
    items logs its decisions with their propensities, and the greedy router's value estimated
    from that log is set beside its on-policy value (`routing_eval.report_ope`)."""
    learned = None if s.routing is None else s.routing.learned
    if not isinstance(learned, TaskRouting):
        return
    learned.explore_in_eval = True
    try:
        await evaluate(s, EXPLORE_TAG)
    finally:
        learned.explore_in_eval = False
    cfg = learned.config
    report_ope(
        s.console,
        s.config.run_dir,
        learned.bandit,
        s.evaluations[EXPLORE_TAG],
        s.evaluations["eval"],
        cfg.cost_weight,
        learned.scale,
        learned.success_metric,
    )


def follow_run(config: RunConfig, ranks: Ranks, console: Console) -> FollowReport:
    """A torchrun rank other than 0: load the run's starting weights and take part in every
    learner call rank 0 makes, until it finishes; raises if the replicas' weights differ."""
    torch.manual_seed(config.seed)
    if config.policy.torch_threads:
        torch.set_num_threads(config.policy.torch_threads)
    report = follow(ranks, load_model(model_dir(config.model)))
    console.print(
        f"rank {ranks.group.rank}: followed {report.learners} learner(s), {report.steps} RL "
        f"and {report.sft_steps} SFT step(s) to version {report.version}; weights equal rank 0's"
    )
    return report
