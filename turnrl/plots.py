"""Training curves as a PNG in the run folder (matplotlib, no display needed)."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path

PANELS = {
    "reward": "mean reward",
    "success": "success (train rollouts)",
    "tool_calls_per_episode": "tool calls / episode",
    "completion_tokens_per_episode": "sampled tokens / episode",
    "loss": "policy loss",
    "clip_frac": "clip fraction",
    "approx_kl": "approx KL (rollout -> updated)",
    "entropy": "entropy (nats / token)",
}
"""Metrics plotted, one panel each, with their titles (panels without data are skipped)."""


def plot_curves(
    run_dir: Path,
    rows: Sequence[Mapping[str, float]],
    name: str = "curves.png",
    panels: Mapping[str, str] = PANELS,
) -> Path | None:
    """One panel per metric of `panels` that `rows` (per-step metrics) hold, x = step;
    written to `run_dir/name`. None when no row holds any of them."""
    import matplotlib

    matplotlib.use("Agg")  # files only: never open a window, whatever the environment says
    import matplotlib.pyplot as plt

    present = [k for k in panels if any(k in r for r in rows)]
    if not present:
        return None
    cols = 4
    n_rows = (len(present) + cols - 1) // cols
    fig, axes = plt.subplots(n_rows, cols, figsize=(4 * cols, 2.8 * n_rows), squeeze=False)
    for ax, key in zip(axes.flat, present, strict=False):
        points = [(r.get("step", i), r[key]) for i, r in enumerate(rows) if key in r]
        ax.plot([p[0] for p in points], [p[1] for p in points], marker="o", markersize=3)
        ax.set_title(panels[key], fontsize=10)
        ax.set_xlabel("step", fontsize=8)
        ax.grid(alpha=0.3)
    for ax in list(axes.flat)[len(present) :]:
        ax.axis("off")
    fig.tight_layout()
    path = run_dir / name
    fig.savefig(path, dpi=90)
    plt.close(fig)
    return path
