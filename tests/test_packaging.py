"""The wheel installs the user's top-level folders under `turnrl.*` and nothing else."""

from __future__ import annotations

import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.slow
def test_wheel_file_list(tmp_path: Path) -> None:
    subprocess.run(
        [sys.executable, "-m", "build", "--wheel", "--no-isolation", "--outdir", str(tmp_path)],
        cwd=ROOT,
        check=True,
        capture_output=True,
    )
    (wheel,) = tmp_path.glob("turnrl-*.whl")
    names = zipfile.ZipFile(wheel).namelist()
    tops = {n.split("/")[0] for n in names}
    assert tops == {"turnrl", next(t for t in tops if t.endswith(".dist-info"))}
    for module in (
        "turnrl/cli.py",
        "turnrl/agent/runner.py",
        "turnrl/agent/records.py",
        "turnrl/tools/base.py",
        "turnrl/rl/advantages.py",
        "turnrl/tasks/base.py",
        "turnrl/sandboxes/__init__.py",
        "turnrl/py.typed",
    ):
        assert module in names
    assert not any(n.startswith("turnrl/tests") or "/__pycache__/" in n for n in names)


def test_editable_install_maps_folders() -> None:
    import turnrl.agent.runner
    import turnrl.rl.advantages

    assert Path(turnrl.agent.runner.__file__).resolve() == ROOT / "agent" / "runner.py"
    assert Path(turnrl.rl.advantages.__file__).resolve() == ROOT / "rl" / "advantages.py"
