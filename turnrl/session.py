"""A run's live objects: `open_session` loads the tokenizer, the chat renderer, the suite, the
tools and sandbox, the policy (in-process, a vLLM server, an API, or the oracle's scripts),
the weight sync and, for training, the learner; `Session` holds them for `turnrl.train`'s
stages and closes them at the end.

Under `torchrun` only rank 0 opens a session: its learners are `turnrl.rl.ranks.LeadLearner`s,
whose weight-changing calls the other ranks follow (`turnrl.train.follow_run`).
"""

from __future__ import annotations

import contextlib
import dataclasses
import gc
import json
import random
from collections.abc import Awaitable, Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from rich.console import Console
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
from turnrl.agent.routing import StepRouter
from turnrl.agent.runner import EpisodeRunner
from turnrl.agent.scripted import ScriptedPolicy
from turnrl.agent.store import RunStore
from turnrl.agent.vllm_policy import VLLMPolicy
from turnrl.config import ModelConfig, RunConfig
from turnrl.loop import Rollouts, Scored
from turnrl.openai_backend import OpenAIBackend
from turnrl.resume import RunProgress, StoredRun
from turnrl.rl.learner import Learner
from turnrl.rl.learner_config import LearnerConfig
from turnrl.rl.placement import compute_dtype, place_model, resolve_device
from turnrl.rl.ranks import Ranks, new_learner, reseed
from turnrl.routing import RunRouting, open_routing
from turnrl.sandboxes.base import Sandbox
from turnrl.sandboxes.config import open_sandbox
from turnrl.suites import build_suite, open_expert, oracle_policies
from turnrl.tasks.base import TaskItem, TaskSuite
from turnrl.tasks.embodied_tools import Generate
from turnrl.tools.base import AnyTool
from turnrl.tools_config import ToolContext, open_run_tools
from turnrl.vllm_backend import VLLMBackend


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
    ranks: Ranks | None = None
    """The data-parallel ranks this session's learners lead (rank 0 under torchrun)."""
    progress: RunProgress = field(default_factory=RunProgress)
    """How far the run got (`progress.json`): stages done, the last resume state."""
    stored: StoredRun = field(default_factory=StoredRun)
    """What a killed run left in the store, when this session resumes it (else empty)."""
    routing: RunRouting | None = None
    """The priced models and router of a routed run (`models:`); None for one policy."""
    score: Callable[[Sequence[Episode]], Scored] | None = None
    """The RL steps' scoring in place of `rewards` and `train.estimator` (BoPO's, set by
    its stage); None scores as configured."""
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

    def new_learner(self, config: LearnerConfig, version: int = 0) -> Learner:
        """A learner over the session's model with `config`, its version continuing from
        `version`; under torchrun it leads the other ranks' (`turnrl.rl.ranks`)."""
        assert self.model is not None
        return new_learner(self.model, config, self.ranks, version)

    def reseed(self, seed: int) -> None:
        """Reseed torch's generator on every rank (`turnrl.rl.ranks.reseed`)."""
        reseed(self.ranks, seed)

    def start_learner(self, version: int = 0) -> Learner:
        """The RL learner over the session's model, its version continuing from `version` (the
        warm start's steps), so policy versions only ever grow."""
        self.learner = self.new_learner(self.config.learner, version)
        return self.learner

    def rl_plan(self) -> list[list[TaskItem]]:
        """Each RL step's train items: a seeded sequence, the same on every resume."""
        cfg = self.config
        train_items = list(self.suite.items("train"))
        rng = random.Random(cfg.seed)
        return [
            rng.sample(train_items, min(cfg.train.tasks_per_step, len(train_items)))
            for _ in range(cfg.train.steps)
        ]

    def runner(
        self, temperature: float, router: StepRouter | None = None, routed: bool = True
    ) -> EpisodeRunner:
        """The episode runner at `temperature`; `router` replaces a routed run's router, and
        `routed=False` runs the trained policy alone (a warm start's trajectories)."""
        sampling = SamplingParams(temperature=temperature, top_p=self.config.sampling.top_p)
        tools = [*self.suite.tools(), *self.extra_tools]
        routing = None if self.routing is None or not routed else self.routing.routing
        if not routed and self.routing is not None:
            tools = [t for t in tools if t not in self.routing.tools]
        if routing is not None and router is not None:
            routing = dataclasses.replace(routing, router=router)
        return EpisodeRunner(
            self.policy, self.renderer, tools, self.config.budget, sampling, routing=routing
        )

    def rollouts(
        self, temperature: float, router: StepRouter | None = None, routed: bool = True
    ) -> Rollouts:
        """The rollout stage's inputs at `temperature` (`router`, `routed`: as in `runner`)."""
        routing = self.routing if routed else None
        runner = self.runner(temperature, router, routed)
        extra = list(self.extra_tools)
        if self.routing is not None and not routed:  # the routing action goes with routing
            extra = [t for t in extra if t not in self.routing.tools]
        return Rollouts(
            runner,
            self.suite,
            self.config.concurrency,
            tuple(extra),
            policy_for=self.policy_for,
            route_spec=None if routing is None else routing.route_spec,
            learn_routes=None if routing is None else routing.learn,
            score=self.score,
            metrics=self.config.task.metrics,
        )


@contextmanager
def open_session(
    config: RunConfig,
    console: Console,
    train: bool,
    checkpoint: Path | None = None,
    tag: str = "eval",
    ranks: Ranks | None = None,
) -> Iterator[Session]:
    """The live objects of a run. A training session writes the run's `config.yaml`; an
    evaluation writes its config as `{tag}.config.yaml` beside a run's, so that evaluating
    into a training run's folder never replaces the config `turnrl replay` reads (an
    evaluation into a new folder writes `config.yaml` too). With `ranks` (rank 0 of a torchrun
    training run) the learners lead the other ranks (`turnrl.rl.ranks`)."""
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
        config.task,
        renderer.tokenizer.encode,
        sandbox,
        expert[1] if expert else None,
        chat=config.chat,
    )
    suite.tools()  # opens (or builds, once) the search index before the event loop starts
    learner = None
    local_rank = None if ranks is None else ranks.group.local_rank
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
            if config.warm_start is None and config.boundary is None:
                learner = new_learner(model, config.learner, ranks)
    elif config.model.kind == "openai":
        api = OpenAIBackend(config.model, renderer, config.seed)
        policy = api.policy
        console.print(f"[bold]API[/] {api.describe()}")
    elif config.model.kind == "oracle":
        eot = _eot(tokenizer, renderer)
        oracle = oracle_policies(suite, renderer, eot)
        # The runner's own policy never speaks: every episode gets its item's script.
        policy = ScriptedPolicy(lambda _: f"(no item){eot}", renderer.tokenizer)
    else:
        model = load_model(path)
        if train:
            # On the learner's device before the policy reads the model's device: both use
            # the one module (`learner.device`, `turnrl.rl.placement`).
            place_model(model, config.learner, resolve_device(config.learner.device, local_rank))
        # With a warm start, the RL learner is built after it (`Session.start_learner`): its
        # KL reference and LoRA adapters belong to the warm-started weights. The policy samples
        # with `model` itself; both learners train it in place (peft injects into it).
        if train and config.warm_start is None and config.boundary is None:
            learner = new_learner(model, config.learner, ranks)
        policy = HFPolicy(
            model,
            tokenizer,
            max_batch_size=config.policy.max_batch_size,
            prefix_cache=config.policy.prefix_cache,
            # Sampled under the learner's autocast (bf16): the ratio's two sides alike.
            autocast_dtype=compute_dtype(config.learner.dtype) if train else None,
        )
    store = RunStore(config.run_dir)
    if train or store.config_text() is None:
        store.write_config(config.to_yaml())
    if not train:
        store.write_config(config.to_yaml(), f"{tag}.config.yaml")
    # Move the start-up heap (torch, transformers, the corpus) out of the collector's view:
    # per-turn allocations would otherwise trigger gen-2 scans of millions of old objects.
    gc.freeze()
    routing: RunRouting | None = None
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
            ranks=ranks,
        )
        if config.model.kind == "oracle":
            session.policy_for = oracle
        session.routing = routing = open_routing(
            config,
            renderer,
            tokenizer,
            model_dir,
            lambda: oracle_policies(suite, renderer, _eot(tokenizer, renderer)),
        )
        if routing is not None:
            session.extra_tools.extend(routing.tools)
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
        if routing is not None:
            routing.close()
        store.close()


def _eot(tokenizer: Any, renderer: Renderer) -> str:
    """The end-of-turn marker's text (what a script ends its replies with)."""
    return str(tokenizer.convert_ids_to_tokens(renderer.end_of_turn_id()))


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
