"""The `turnrl` command line: train, sft, eval, replay, tasks list."""

# Each command imports what it runs (config, torch, suites) when it runs, so that `--help` and
# a mistyped command answer at once.

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Annotated, Any, Optional

import typer
from rich.console import Console


def _quiet_libraries() -> None:
    # Progress bars from transformers' weight loading would interleave with ours.
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()
    hf_logging.set_verbosity_error()


app = typer.Typer(no_args_is_help=True, add_completion=False, help=__doc__)
# Piped output (make demo | tee, CI logs) gets 120 columns instead of rich's default 80, so
# the curves table keeps its labels.
console = Console() if sys.stdout.isatty() else Console(width=120)


def _overrides(pairs: list[str]) -> dict[str, Any]:
    import yaml

    out = {}
    for pair in pairs:
        key, sep, value = pair.partition("=")
        if not sep:
            raise typer.BadParameter(f"--set expects key=value, got {pair!r}")
        out[key] = yaml.safe_load(value)
    return out


def _load(config: Path, sets: list[str]) -> Any:
    from turnrl.config import ConfigError, load_config

    try:
        return load_config(config, _overrides(sets))
    except ConfigError as e:
        console.print(f"[red]{e}[/]")
        raise typer.Exit(2) from None


def _trainable(cfg: Any) -> Any:
    """`cfg`, or a clear refusal when its model cannot be trained (the oracle, an API model)."""
    from turnrl.agent.model_config import training_refusal

    refusal = training_refusal(cfg.model)
    if refusal is not None:
        console.print(f"[red]{refusal}[/]")
        raise typer.Exit(2)
    return cfg


SetOpt = Annotated[
    Optional[list[str]],  # noqa: UP045 (typer reads the annotation at run time)
    typer.Option("--set", help="Override a config field: --set train.steps=2"),
]


@app.command()
def train(
    config: Annotated[Path, typer.Argument(help="YAML run config")],
    sets: SetOpt = None,
    no_eval: Annotated[bool, typer.Option("--no-eval", help="Skip before/after eval")] = False,
    overwrite: Annotated[
        bool, typer.Option("--overwrite", help="Replace an earlier run in the same run_dir")
    ] = False,
    resume: Annotated[
        bool, typer.Option("--resume", help="Continue a stopped run in the same run_dir")
    ] = False,
) -> None:
    """Evaluate, train with RL, evaluate again; store everything in the run folder."""
    from turnrl.agent.vllm_policy import WeightSyncError
    from turnrl.resume import ResumeError
    from turnrl.train import run_train

    _quiet_libraries()
    try:
        cfg = _trainable(_load(config, sets or []))
        run_train(cfg, console, with_eval=not no_eval, overwrite=overwrite, resume=resume)
    except (FileExistsError, ResumeError) as e:
        console.print(f"[red]{e}[/]")
        raise typer.Exit(2) from None
    except WeightSyncError as e:
        # The server failed, not the input: say so in one block, and how to go on.
        notes = "".join(f"\n  {n}" for n in getattr(e, "__notes__", ()))
        console.print(
            f"[red]{e}{notes}[/]\nThe run stopped; what it stored is intact. Continue it with "
            f"`turnrl train {config} --resume` once the server is healthy."
        )
        raise typer.Exit(1) from None


@app.command()
def sft(
    config: Annotated[Path, typer.Argument(help="YAML run config")],
    sets: SetOpt = None,
    no_eval: Annotated[bool, typer.Option("--no-eval", help="Skip before/after eval")] = False,
    overwrite: Annotated[
        bool, typer.Option("--overwrite", help="Replace an earlier run in the same run_dir")
    ] = False,
) -> None:
    """Warm start: supervised fine-tuning on trajectories (the config's `warm_start`; by
    default the suite's oracle on its train items), evaluated before and after."""
    from turnrl.train import run_sft

    _quiet_libraries()
    try:
        cfg = _trainable(_load(config, sets or []))
        run_sft(cfg, console, with_eval=not no_eval, overwrite=overwrite)
    except (FileExistsError, ValueError) as e:
        console.print(f"[red]{e}[/]")
        raise typer.Exit(2) from None


@app.command("eval")
def eval_(
    config: Annotated[Path, typer.Argument(help="YAML run config")],
    checkpoint: Annotated[
        Optional[Path],  # noqa: UP045
        typer.Option(help="Checkpoint folder to evaluate instead of the configured model"),
    ] = None,
    sets: SetOpt = None,
) -> None:
    """Evaluate a policy on held-out items; episodes go to the run folder."""
    from turnrl.train import run_eval

    _quiet_libraries()
    summary = run_eval(_load(config, sets or []), console, checkpoint)
    console.print_json(json.dumps(summary))


@app.command()
def replay(
    run: Annotated[Path, typer.Argument(help="Run folder")],
    estimator: Annotated[
        Optional[str],  # noqa: UP045
        typer.Option(help="Recompute with another estimator (grpo, gigpo, salt, ...)"),
    ] = None,
    outcome_metric: Annotated[
        Optional[str],  # noqa: UP045
        typer.Option(help="Recompute with another outcome score (correct, f1)"),
    ] = None,
    reward: Annotated[
        Optional[list[str]],  # noqa: UP045
        typer.Option(help="A reward component and its weight, NAME=W (repeat); replaces the run's"),
    ] = None,
    checkpoint: Annotated[
        Optional[Path],  # noqa: UP045
        typer.Option(help="Weights that measure gold-answer probabilities (information gain)"),
    ] = None,
) -> None:
    """Reload a run; recompute grades, rewards and advantages from the stored tokens."""
    from turnrl.replay import replay as do_replay
    from turnrl.rl.advantages import ESTIMATORS

    if estimator is not None and estimator not in ESTIMATORS:
        console.print(f"[red]--estimator must be one of {sorted(ESTIMATORS)}[/]")
        raise typer.Exit(2)
    if not (run / "config.yaml").is_file():
        console.print(f"[red]{run}: not a run folder (no config.yaml)[/]")
        raise typer.Exit(2)
    weights = None
    if reward:
        weights = {}
        for pair in reward:
            name, sep, value = pair.partition("=")
            try:
                weights[name] = float(value) if sep else 1.0
            except ValueError:
                console.print(f"[red]--reward {pair}: the weight must be a number[/]")
                raise typer.Exit(2) from None
    try:
        result = do_replay(run, estimator, outcome_metric, weights, checkpoint)
    except ValueError as e:
        console.print(f"[red]{e}[/]")
        raise typer.Exit(2) from None
    for row in result["steps"]:
        name = "eval" if row["step"] < 0 else f"step {int(row['step'])}"
        mean_reward = f"  reward {row['reward']:+.3f}" if "reward" in row else ""
        console.print(
            f"{name}: {int(row['episodes'])} episodes  success {row['success']:.3f}  "
            f"tool calls/ep {row['tool_calls_per_episode']:.2f}{mean_reward}"
        )
    console.print(
        f"{result['episodes']} episodes; advantages differing from stored: "
        f"{result['advantages_differing']}/{result['turns_compared']} turns; "
        f"grades differing: {result['grades_differing']}"
    )


tasks_app = typer.Typer(no_args_is_help=True, help="Task suites.")
app.add_typer(tasks_app, name="tasks")


@tasks_app.command("list")
def tasks_list(
    as_json: Annotated[bool, typer.Option("--json", help="Print JSON instead of a table")] = False,
) -> None:
    """Every task suite: what `task.kind` selects it, its source, license, split sizes and the
    metrics its grader emits (what `rewards` may read)."""
    from rich.table import Table

    from turnrl.suites import describe_suites

    rows = describe_suites()
    if as_json:
        console.print_json(json.dumps(rows))
        return
    table = Table(title="Task suites (task.kind)")
    for column in ("kind", "train", "test", "metrics", "source", "license", "description"):
        table.add_column(column, justify="right" if column in ("train", "test") else "left")
    for r in rows:
        metrics = r["metrics"]
        assert isinstance(metrics, list)
        table.add_row(
            *(str(r[c]) for c in ("kind", "train", "test")),
            ", ".join(metrics),
            *(str(r[c]) for c in ("source", "license", "description")),
        )
    console.print(table)


if __name__ == "__main__":
    app()
