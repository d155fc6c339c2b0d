"""`RunConfig.tools`: web fetch and MCP servers offered besides a suite's tools, opened in the
run's event loop and closed when it ends."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
from rich.console import Console

from turnrl.agent.store import RunStore
from turnrl.config import ConfigError, RunConfig, load_config
from turnrl.train import run_eval

ROOT = Path(__file__).resolve().parents[1]
FIXTURE = Path(__file__).with_name("mcp_server_fixture.py")


def _config(tmp_path: Path, kind: str, extra: dict[str, object] | None = None) -> RunConfig:
    path = tmp_path / "run.yaml"
    path.write_text(
        f"run_dir: {tmp_path / 'run'}\nmodel: {{kind: oracle}}\ntask: {{kind: {kind}}}\n"
    )
    tools = [
        {"kind": "web_fetch", "fetch": {"allow_hosts": ["example.org"], "timeout_s": 5}},
        {
            "kind": "mcp",
            "server": {
                "transport": "stdio",
                "command": sys.executable,
                "args": [str(FIXTURE), "stdio", "--tag", f"run-tools-{tmp_path.name}"],
                "name_prefix": "fx_",
                "include": ["add", "echo"],
            },
        },
    ]
    return load_config(path, {"tools": tools, "eval.n_items": 6, **(extra or {})})


@pytest.mark.parametrize("kind", ["embodied_search", "bfcl_single"])
def test_configured_tools_join_every_episode_and_close(kind: str, tmp_path: Path) -> None:
    """A suite-wide and a per-item suite: the web and MCP tools are shown in every episode's
    system message; the oracle still scores 100% with them present."""
    cfg = _config(tmp_path, kind, {"budget.max_new_tokens": 1024})
    summary = run_eval(cfg, Console(width=120, record=True), None)
    assert summary["success"] == 1.0 and summary["episodes"] == 6
    with RunStore.open_readonly(cfg.run_dir) as store:
        episodes = list(store.episodes())
    from turnrl.agent.model import load_tokenizer

    tok = load_tokenizer()
    for e in episodes:
        system = tok.decode(e.turns[0].prompt_ids)
        for name in ('"fetch"', '"fx_add"', '"fx_echo"'):
            assert f'"name": {name}' in system
        assert '"name": "fx_slow"' not in system
    # The MCP server the run started is gone with the run.
    assert not [
        p for p in Path("/proc").glob("[0-9]*") if _has_tag(p, f"run-tools-{tmp_path.name}")
    ]


def _has_tag(proc: Path, tag: str) -> bool:
    try:
        return tag in (proc / "cmdline").read_bytes().decode(errors="replace")
    except OSError:
        return False


def test_a_wrong_tool_config_names_the_field(tmp_path: Path) -> None:
    path = tmp_path / "run.yaml"
    path.write_text(
        "task: {kind: embodied_search}\ntools: [{kind: mcp, server: {transport: pigeon}}]\n"
    )
    with pytest.raises(ConfigError, match="tools"):
        load_config(path)
