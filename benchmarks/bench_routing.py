"""Budget-aware routing on the cost–success plane: trained routers against the boundary
policies, on held-out items.

`examples/routing.yaml` (the embedded SmolLM2-135M after its warm start as the cheap, trained
model; the oracle priced $0.01 per turn as the expensive one; search QA; a hard budget of $0.04
per task) is trained once per router, then evaluated with `turnrl eval` on the 100 held-out
items, where the router, always-small and always-big run on the same items:

- `learned`: the per-step router over turn features (a ridge oracle per model, epsilon-greedy
  while training);
- `bandit`: the task-level contextual bandit (one model per episode), with its off-policy check
  (an exploring pass; IPS, SNIPS and DR estimates of the greedy router beside its on-policy
  value);
- `bopo`: the trained policy decides (a `delegate` tool), trained by boundary-guided training
  (boundary runs, a routed warm start, boundary-relative rewards, the reference-guided
  advantage).

A run folder that already holds its evaluation (`eval.frontier.json`) is read, not run again
(`--fresh` reruns). The JSON line's `value` is the best router's success as a fraction of
always-big's, `ratio` its mean cost as a fraction of always-big's; the target is the issue's:
at least 0.9 of always-big's success at at most half its cost, and more success than
always-small. `--quick` runs the learned router's pipeline on the tiny random model (one
step, four items; `--routers` for others): a smoke test of the plumbing, whose figures mean
nothing.
"""

from __future__ import annotations

import argparse
import json
import shutil
from pathlib import Path
from typing import Any

from rich.console import Console

from turnrl.config import load_config
from turnrl.train import run_eval, run_train

ROOT = Path(__file__).resolve().parents[1]

ROUTERS: dict[str, dict[str, Any]] = {
    "learned": {},
    "bandit": {
        "router": {"kind": "bandit", "exploration": {"kind": "epsilon_greedy", "epsilon": 0.2}}
    },
    "bopo": {
        "router": {"kind": "delegate", "to": "big"},
        "boundary": {"runs": 2, "n_items": 64, "sft_epochs": 1},
    },
}

QUICK = {
    "model": {"kind": "tiny"},
    "warm_start": None,
    "task.n_train": 40,
    "task.n_test": 10,
    "train.steps": 1,
    "train.tasks_per_step": 2,
    "train.group_size": 2,
    "eval.n_items": 4,
    "concurrency": 8,
}


def run(name: str, base: Path, quick: bool, fresh: bool, console: Console) -> dict[str, Any]:
    run_dir = base / name
    overrides: dict[str, Any] = {"run_dir": str(run_dir), **ROUTERS[name]}
    if quick:
        overrides |= QUICK
        if name == "bopo":
            overrides["boundary"] = {"runs": 1, "n_items": 2, "sft_epochs": 1}
    config = load_config(ROOT / "examples" / "routing.yaml", overrides)
    frontier = run_dir / "eval.frontier.json"
    if fresh or not frontier.exists():
        shutil.rmtree(run_dir, ignore_errors=True)
        run_train(config, console, with_eval=False)
        run_eval(config, console, run_dir / "checkpoints" / "final")
    out: dict[str, Any] = json.loads(frontier.read_text())
    ope = run_dir / "eval.ope.json"
    if ope.exists():
        out["ope"] = json.loads(ope.read_text())
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true", help="tiny model, one step (smoke)")
    parser.add_argument("--fresh", action="store_true", help="rerun runs already evaluated")
    parser.add_argument("--runs", type=Path, default=ROOT / "runs" / "bench-routing")
    parser.add_argument("--routers", nargs="+", default=None, choices=list(ROUTERS))
    args = parser.parse_args()
    if args.routers is None:  # --quick: one router, to stay within its time
        args.routers = ["learned"] if args.quick else list(ROUTERS)
    base = args.runs / ("quick" if args.quick else "full")
    console = Console(width=120)
    results = {name: run(name, base, args.quick, args.fresh, console) for name in args.routers}

    rows: dict[str, dict[str, float]] = {}
    for name, result in results.items():
        summaries = result["summaries"]
        router = next(k for k in summaries if k.startswith("router"))
        rows[name] = summaries[router]
        rows.setdefault("always small", summaries["always small"])
        rows.setdefault("always big", summaries["always big"])
    big = rows["always big"]
    small = rows["always small"]
    kind = "cost/model_usd"
    scores = {
        name: (rows[name]["success"] / big["success"], rows[name][kind] / big[kind])
        for name in args.routers
        if big["success"] > 0 and big[kind] > 0
    }
    for name, (success, cost) in scores.items():
        console.print(
            f"{name}: success {rows[name]['success']:.3f} [{rows[name]['success_low']:.3f}, "
            f"{rows[name]['success_high']:.3f}] = {success:.2f} of always-big's, cost "
            f"${rows[name][kind]:.4f} = {cost:.2f} of always-big's"
        )
    ok = {
        n: s >= 0.9 and c <= 0.5 and rows[n]["success"] > small["success"]
        for n, (s, c) in scores.items()
    }
    best = max(scores, key=lambda n: (ok[n], scores[n][0] - scores[n][1]), default=None)
    line: dict[str, Any] = {
        "bench": "routing",
        "value": round(scores[best][0], 3) if best else None,
        "unit": "router success / always-big success",
        "ratio": round(scores[best][1], 3) if best else None,
        "ratio_of": "router cost / always-big cost (model_usd per episode)",
        "target": "success >= 0.9x always-big at cost <= 0.5x, success > always-small",
        "ok": bool(best and ok[best]),
        "best": best,
        "always_big_success": big["success"],
        "always_small_success": small["success"],
        "always_big_usd": round(big[kind], 5),
        "always_small_usd": round(small[kind], 5),
    }
    for name in args.routers:
        line[f"{name}_success"] = round(rows[name]["success"], 3)
        line[f"{name}_success_ci"] = [
            round(rows[name]["success_low"], 3),
            round(rows[name]["success_high"], 3),
        ]
        line[f"{name}_usd"] = round(rows[name][kind], 5)
        line[f"{name}_ok"] = ok.get(name, False)
    if "ope" in results.get("bandit", {}):
        ope = results["bandit"]["ope"]
        line["bandit_on_policy"] = round(ope["on_policy"]["value"], 3)
        line["bandit_on_policy_ci"] = [
            round(ope["on_policy"]["low"], 3),
            round(ope["on_policy"]["high"], 3),
        ]
        for est in ("ips", "snips", "dr"):
            if est in ope:
                line[f"bandit_{est}"] = round(ope[est]["value"], 3)
                line[f"bandit_{est}_within"] = bool(ope[est]["within_on_policy"])
    line["quick"] = args.quick
    print(json.dumps(line))


if __name__ == "__main__":
    main()
