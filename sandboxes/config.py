"""Choosing a backend: a discriminated union on `kind`, and `open_sandbox()`.

`auto` (the default) takes bubblewrap where it works, else Docker where a daemon answers, and
otherwise stops with an error naming both: it never falls back to the `subprocess` backend,
which is not a security boundary and must be asked for by name.
"""

from __future__ import annotations

import sys
from typing import Annotated, Literal

from pydantic import BaseModel, ConfigDict, Field

from turnrl.sandboxes.base import Limits, Sandbox, SandboxError
from turnrl.sandboxes.reaper import RunLock


class _Backend(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid")

    limits: Limits = Field(default_factory=Limits)
    """Default limits of every call (a caller may pass tighter ones)."""
    pool_size: int = Field(16, ge=1)
    """Most workers alive at once; episodes beyond it wait for one (backpressure)."""
    warm: int = Field(4, ge=0)
    """Workers kept started and idle, ready for the next episode."""


class BwrapConfig(_Backend):
    """Bubblewrap as an unprivileged uid, cgroup limits (see `turnrl.sandboxes.bwrap`)."""

    kind: Literal["bwrap"] = "bwrap"
    cpus: float = Field(1.0, gt=0)
    """CPU bandwidth of one sandbox, in cores."""
    python: str = "/usr/bin/python3"
    """The Python that runs inside (must live under /usr, the only host folder mounted)."""


class DockerConfig(_Backend):
    """Containers from a locally built image (see `turnrl.sandboxes.docker`)."""

    kind: Literal["docker"] = "docker"
    cpus: float = Field(1.0, gt=0)
    """CPU bandwidth of one container, in cores."""
    image: str = "turnrl-sandbox:latest"
    """Image to run; `turnrl-sandbox:*` is built from the host's Python when missing."""
    python: str = "/usr/bin/python3"
    """The Python inside the image."""
    ttl_s: float = Field(3600.0, gt=0)
    """A container older than this is removed by any run's reaper."""


class SubprocessConfig(_Backend):
    """Plain child processes. Not a security boundary (see `turnrl.sandboxes.local`)."""

    kind: Literal["subprocess"] = "subprocess"
    python: str = Field(default_factory=lambda: sys.executable)
    """The Python that runs snippets."""


class AutoConfig(_Backend):
    """bwrap if usable, else docker if a daemon answers, else an error."""

    kind: Literal["auto"] = "auto"


SandboxConfig = Annotated[
    AutoConfig | BwrapConfig | DockerConfig | SubprocessConfig, Field(discriminator="kind")
]


def open_sandbox(config: SandboxConfig | None = None, run: RunLock | None = None) -> Sandbox:
    """Start the configured backend (workers start lazily, in the caller's event loop)."""
    config = config or AutoConfig()
    lim, size, warm = config.limits, config.pool_size, config.warm
    if isinstance(config, BwrapConfig):
        from turnrl.sandboxes.bwrap import BwrapSandbox

        return BwrapSandbox(lim, size, warm, cpus=config.cpus, python=config.python, run=run)
    if isinstance(config, DockerConfig):
        from turnrl.sandboxes.docker import DockerSandbox

        return DockerSandbox(
            lim,
            size,
            warm,
            cpus=config.cpus,
            image=config.image,
            ttl_s=config.ttl_s,
            run=run,
            python=config.python,
        )
    if isinstance(config, SubprocessConfig):
        from turnrl.sandboxes.local import SubprocessSandbox

        return SubprocessSandbox(lim, size, warm, python=config.python, run=run)
    from turnrl.sandboxes.bwrap import bwrap_usable
    from turnrl.sandboxes.docker import docker_usable

    why_not_bwrap = bwrap_usable()
    if why_not_bwrap is None:
        return open_sandbox(BwrapConfig(limits=lim, pool_size=size, warm=warm), run)
    why_not_docker = docker_usable()
    if why_not_docker is None:
        return open_sandbox(DockerConfig(limits=lim, pool_size=size, warm=warm), run)
    raise SandboxError(
        "no sandbox backend is usable here:\n"
        f"  bwrap: {why_not_bwrap}\n  docker: {why_not_docker}\n"
        "install bubblewrap, or start dockerd, or set `sandbox.kind: subprocess` to run "
        "code without isolation (trusted code only)"
    )
