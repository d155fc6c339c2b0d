"""A run whose rollouts a vLLM server samples (`model.kind: vllm`).

The server holds one copy of the weights, the learner (in this process) another; after every
learner step (and after a warm start) the learner's weights are written to a folder in the run
and pushed to the server (`ServerSync`, a `WeightSync`):

- `reload`: the full weights as an untied safetensors folder (`save_pretrained`; with a LoRA
  learner, a copy with the adapters merged), reloaded in place by the server;
- `lora`: the learner's adapters (peft `save_pretrained`), loaded as a new adapter named for
  the version.

Requests in flight when an update begins finish on the old weights and carry the old version
(`VLLMPolicy.begin_update` waits for them); requests made meanwhile wait and go out on the new
weights. The two folders last written are kept (a server may still read the newest; the one
before is there to look at), older ones are deleted.

The server is started for the run when `model.url` is not given (`turnrl.agent.vllm_server`:
its own process group, a log at `<run>/vllm.log`, killed with the run), on a port chosen when
the session opens so that the policy knows its address before the server is up.
"""

from __future__ import annotations

import asyncio
import copy
import shutil
from collections.abc import Callable
from pathlib import Path
from typing import Any

from turnrl.agent.model_config import VLLMModel
from turnrl.agent.vllm_policy import VLLMPolicy
from turnrl.agent.vllm_server import VLLMServer, free_port, reap_servers, start_server
from turnrl.sandboxes.reaper import RunLock, run_is_alive

KEEP_FOLDERS = 2
"""Weight folders kept in the run (the newest and the one before)."""


class VLLMBackend:
    """The policy of a `model.kind: vllm` run, and the server it talks to when turnrl runs it."""

    def __init__(
        self,
        cfg: VLLMModel,
        weights_dir: Path,
        run_dir: Path,
        vocab_size: int,
        seed: int,
    ) -> None:
        self.cfg = cfg
        self.weights_dir = weights_dir
        self.run_dir = run_dir
        self.seed = seed
        self.port = None if cfg.url is not None else free_port()
        url = cfg.url or f"http://127.0.0.1:{self.port}"
        self.policy = VLLMPolicy(
            url,
            cfg.served_name,
            weight_sync=cfg.weight_sync,
            logprobs_mode=cfg.logprobs_mode,
            vocab_size=vocab_size,
            seed=seed,
            timeout_s=cfg.request_timeout_s,
            sync_timeout_s=cfg.sync_timeout_s,
        )
        self.server: VLLMServer | None = None
        self._lock: RunLock | None = None

    async def open(self) -> None:
        """Start the server (when turnrl runs it) and wait until it answers; or check that
        the given one does."""
        if self.cfg.url is None:
            # Servers of runs that died (their engine workers outlive a SIGKILLed trainer's
            # PDEATHSIG) go first; this run's is tagged with a live run lock.
            await asyncio.to_thread(reap_servers, run_is_alive)
            self._lock = RunLock()
            self.server = await start_server(
                self.weights_dir,
                self.cfg.served_name,
                self.cfg.server_options(self.seed),
                self.run_dir / "vllm.log",
                port=self.port,
                run_id=self._lock.run_id,
            )
        elif not await self.policy.health():
            raise ConnectionError(
                f"model.url: no vLLM server answers GET {self.cfg.url}/health (start it, or "
                "leave url out to let turnrl start one)"
            )

    def sync(self, current: Callable[[], tuple[Any, Any | None]]) -> ServerSync:
        """The run's `WeightSync`: `current()` gives the model and the peft model holding the
        learner's adapters (or None) at the time of each update."""
        lora = self.cfg.weight_sync == "lora"

        def write(folder: Path) -> None:
            model, peft = current()
            write_weights(model, peft, folder, adapters_only=lora)

        return ServerSync(self.policy, write, self.run_dir / "vllm_weights")

    async def close(self) -> None:
        """Close the connections and stop the server turnrl started. Idempotent."""
        self.policy.close()
        if self.server is not None:
            server, self.server = self.server, None
            await server.stop()
        if self._lock is not None:
            self._lock.release()
            self._lock = None


class ServerSync:
    """`WeightSync` for a policy on a vLLM server: `end_update(version)` writes the weights
    with `write(folder)` and pushes them (module docstring). `end_update` with the version
    already live (a failed step) pushes nothing."""

    def __init__(self, policy: VLLMPolicy, write: Callable[[Path], None], folder: Path) -> None:
        self.policy = policy
        self.write = write
        self.folder = folder

    @property
    def version(self) -> int:
        return self.policy.version

    async def begin_update(self) -> None:
        await self.policy.begin_update()

    async def end_update(self, version: int) -> None:
        if version == self.policy.version:
            await self.policy.end_update(version)
            return
        target = self.folder / f"v{version}"
        ok = False
        try:
            await asyncio.to_thread(self.write, target)
            await self.policy.load_checkpoint(target, version)
            ok = True
        finally:
            await self.policy.end_update(version if ok else self.policy.version)
        self._prune()

    def _prune(self) -> None:
        written = sorted(
            (p for p in self.folder.glob("v*") if p.name[1:].isdigit()),
            key=lambda p: int(p.name[1:]),
        )
        for old in written[:-KEEP_FOLDERS]:
            shutil.rmtree(old, ignore_errors=True)


def write_weights(model: Any, peft_model: Any | None, folder: Path, adapters_only: bool) -> None:
    """Write what the server loads: the adapters alone (`adapters_only`, LoRA sync), else the
    full weights (a merged copy when `peft_model` holds adapters, so the live adapters stay
    exact). Blocking."""
    if folder.exists():
        shutil.rmtree(folder)
    if adapters_only:
        if peft_model is None:
            raise ValueError("LoRA weight sync needs a LoRA learner")
        peft_model.save_pretrained(str(folder))
        return
    full = copy.deepcopy(peft_model).merge_and_unload() if peft_model is not None else model
    full.save_pretrained(str(folder))
