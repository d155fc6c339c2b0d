"""The learner: PPO-clip optimizer steps over stored episodes, in place on the policy's model.

Design:
- The learner trains the *same module object* the in-process policy samples with (in-process
  weight sync): `Learner.model` is the transformers model passed in (for LoRA, peft injects
  the adapter layers into it, so sampling with it uses the adapters), and `Learner.version`
  counts the `step` calls that moved the policy (one weight sync each); the loop
  (`turnrl.loop`) brackets each step with the policy's `WeightSync.begin_update` /
  `end_update(version)`, so nothing samples
  while `step` runs: the weights change, and the module is in train mode (dropout) only for
  the duration of the step.
- Tokens are the truth: batches come from `turnrl.rl.batch` (the stored ids, never re-tokenized)
  and logprobs are recomputed with the sampling convention of `turnrl.agent.policy`:
  log_softmax(logits / temperature) in float32, gathered at the next token. The PPO ratio is
  taken against the stored rollout logprobs, or under an off-policy correction against the
  weights at the start of `step`, with an importance weight (`turnrl.rl.offpolicy`,
  `turnrl.rl.proximal`).
- Only trained positions reach the LM head: the decoder's hidden states are computed for every
  position, then the rows whose next token is trained are selected and projected to the vocab.
  This skips the head (and the vocab-sized log-softmax, its largest activation) on prompt,
  observation and padding positions. It assumes logits = lm_head(last hidden state), true for
  Llama/Qwen/Mistral-style models; `select_before_head=False` is the plain path.
- One `step` is `ppo_epochs` passes over the batch, each cut into `minibatches` minibatches
  of whole episodes, one optimizer step per minibatch (`turnrl.rl.ppo_epochs`: shuffling, the
  `target_kl` early stop, how scalars combine); the defaults take one optimizer step over all
  episodes. Each optimizer step accumulates gradients over micro-batches planned by a
  padded-token budget, each micro-batch's loss weighted by the minibatch's counts, so the
  accumulated gradient equals the minibatch's full gradient. The weighting
  (`LearnerConfig.loss_weighting`, defined in `turnrl.rl.losses`): `"token"` divides by the
  step's trained-token count (DAPO token-level mean, arXiv 2503.14476; long episodes weigh
  more), `"episode"` gives every episode with trained tokens the same share.
- A step with no learning signal is skipped: no value target, and no trained tokens or every
  trained token's advantage 0 with no KL term. No forward pass runs, the optimizer does not
  move (Adam's momentum would otherwise keep moving weights on a zero gradient), `version` is
  unchanged, and the `StepResult` says `skipped`. GRPO groups whose returns are all equal give
  such zeros.
- KL to a reference (k3, GRPO arXiv 2402.03300) is on when `kl_coef > 0`: for LoRA the
  reference is the base model (adapters disabled), for full fine-tuning a frozen copy made at
  construction.
- An optional value head (`turnrl.rl.value_head`) reads V(s_j) from the same forward pass as
  the logprobs; `step(..., value_targets=...)` adds `coef * MSE`. `values` scores stored
  episodes without gradients. Its parameters sit in a second optimizer group with their own
  learning rate and their own gradient clipping (a large value error never shrinks the
  policy's step); without `backprop_to_policy` the value loss never reaches the policy's
  weights, and a step whose only signal is the value loss leaves `version` unchanged.
- `sft_step` is the supervised variant (warm start, behaviour cloning): the same micro-batches
  and optimizer, with the weighted NLL of the trained tokens (`turnrl.rl.losses.sft_loss`)
  for loss; each turn's `advantage` is its weight.
- Where it runs (`turnrl.rl.placement`): the model is moved to `LearnerConfig.device`, with
  bf16 autocast over float32 master weights, the chosen attention kernel and gradient
  checkpointing; micro-batches are padded or packed (`turnrl.rl.packing`); with a
  `DataParallelGroup` every rank is given the whole batch, plans the same minibatches and
  trains on its share of each (`turnrl.rl.distributed`: global counts, summed gradients), so
  every optimizer step is one process's; one micro-batch's loss: `turnrl.rl.step_losses`.
- Checkpoints: `turnrl.rl.learner_checkpoint`; AdamW's groups, gradient clipping and the
  learning-rate schedule: `turnrl.rl.optimization`; no-gradient scoring passes (`logprobs`,
  `values`, the KL stop's measurement): `turnrl.rl.measure`; giving freed CPU memory back
  between steps (`LearnerConfig.release_memory`): `turnrl.rl.memory`.
"""

from __future__ import annotations

import copy
import dataclasses
import time
import warnings
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import peft
import torch
from transformers import PreTrainedModel

from turnrl.agent.records import Episode
from turnrl.rl import learner_checkpoint, measure, memory, optimization, placement, proximal
from turnrl.rl.batch import ProximalLogprobs, TokenBatch, counts_of
from turnrl.rl.distributed import DataParallelGroup
from turnrl.rl.learner_config import LearnerConfig, LoraConfig
from turnrl.rl.logprobs import decoder_hidden, token_logprobs
from turnrl.rl.losses import Metrics, sample_weights, sft_loss
from turnrl.rl.packing import training_batches
from turnrl.rl.ppo_epochs import (
    Update,
    batch_counts,
    merge_scalars,
    plan_updates,
    run_epochs,
    trained_size,
)
from turnrl.rl.step_losses import policy_loss, state_value_loss
from turnrl.rl.value_head import ValueHead, state_values


@dataclass(frozen=True)
class StepResult:
    """What one learner step did."""

    skipped: bool
    """No learning signal (no trained token with a nonzero advantage, no KL term, no value
    target): nothing ran and the optimizer did not move."""
    policy_updated: bool
    """The policy's weights moved (False when skipped, or when only the value head trained):
    a weight sync is due."""
    version: int
    """`Learner.version` after the step: the version the next rollouts sample with."""
    scalars: Mapping[str, float] = field(default_factory=dict)
    """Figures for logging only (loss, clip_frac, grad_norm, ...; `Learner.step` lists them);
    nothing steers on them."""


class Learner:
    """PPO-clip learner over a transformers causal LM, trained in place (module docstring)."""

    def __init__(
        self,
        model: PreTrainedModel,
        config: LearnerConfig,
        *,
        pad_id: int = 0,
        data_parallel: DataParallelGroup | None = None,
    ) -> None:
        """Train `model` in place, moved to `config.device` (`turnrl.rl.placement`). For LoRA,
        peft injects the adapter layers into `model` itself, so the policy keeps sampling with
        the same object and sees the adapters. `pad_id` pads rows; any id inside the
        vocabulary works (pads are never trained). With `data_parallel`, every rank is given
        the same episodes, trains on its share of each minibatch, and the ranks sum their
        gradients (`turnrl.rl.distributed`); rank
        0's weights are copied to the others here."""
        self.config = config
        self.pad_id = pad_id
        self.data_parallel = data_parallel
        local_rank = None if data_parallel is None else data_parallel.local_rank
        placement.place_model(model, config, placement.resolve_device(config.device, local_rank))
        if data_parallel is not None:
            # Before the KL reference copies them.
            data_parallel.broadcast_parameters(model.parameters())
        self._compute_dtype = placement.compute_dtype(config.dtype)
        self.version = 0
        """Number of `step`/`sft_step` calls that moved the policy's weights (one weight sync
        each, however many optimizer steps a call took; a call that trained the value head
        alone does not count); the policy reports it with each completion."""
        self.model = model
        """The module the policy samples with and the learner trains."""
        self.peft_model: peft.PeftModel | None = None
        """For LoRA, the peft wrapper around `model` (adapter saving, disabling); else None."""
        self._reference: PreTrainedModel | None = None
        adaptation = config.adaptation
        if isinstance(adaptation, LoraConfig):
            lora = peft.LoraConfig(
                r=adaptation.r,
                lora_alpha=adaptation.alpha,
                lora_dropout=adaptation.dropout,
                target_modules=list(adaptation.target_modules),
                task_type="CAUSAL_LM",
            )
            with warnings.catch_warnings():
                # peft probes a transformers attribute that transformers 5 deprecates; the
                # warning is theirs to fix and says nothing about this model.
                warnings.filterwarnings("ignore", "`is_gradient_checkpointing`", FutureWarning)
                self.peft_model = peft.get_peft_model(model, lora)
        elif config.kl_coef > 0:
            self._reference = copy.deepcopy(model).eval().requires_grad_(False)
        model.eval()
        self.trainable_parameters = [p for p in model.parameters() if p.requires_grad]
        """The trained parameters (the adapter weights for LoRA)."""
        if not self.trainable_parameters:
            raise ValueError("the model has no trainable parameters")
        self.device = self.trainable_parameters[0].device
        self._release_memory = config.release_memory and self.device.type == "cpu"
        self.value_head: ValueHead | None = None
        """The value head (`config.value_head`), outside `model`; None without one."""
        if config.value_head is not None:
            hidden_size = int(model.config.get_text_config().hidden_size)
            self.value_head = ValueHead(hidden_size, config.value_head).to(self.device)
        self.value_parameters = (
            [] if self.value_head is None else list(self.value_head.parameters())
        )
        """The value head's parameters (its own optimizer group); empty without a head."""
        if data_parallel is not None:
            # Parameters made here: LoRA adapters and the value head.
            made = self.trainable_parameters if self.peft_model is not None else []
            data_parallel.broadcast_parameters(made + self.value_parameters)
        self.optimizer = optimization.build_adamw(
            self.trainable_parameters, self.value_parameters, config
        )
        self.optimizer_steps = 0
        """Optimizer steps taken: where `config.lr_schedule` stands (saved with checkpoints)."""

    def accumulate_gradients(
        self,
        episodes: Sequence[Episode],
        value_targets: Sequence[Sequence[float | None]] | None = None,
        proximal: ProximalLogprobs | None = None,
    ) -> StepResult:
        """Forward and backward over `episodes` in micro-batches, adding the step's gradient
        to each trained parameter's `.grad`; no optimizer step, `version` unchanged. Each
        turn's `advantage` is broadcast to its sampled tokens (None: the turn is not trained).
        `proximal`: the proximal policy's logprobs under an off-policy correction (None: the
        current weights'). The result's scalars lack `grad_norm` and `seconds`. `step` is
        this plus clipping and AdamW."""
        cfg = self.config
        head_cfg = cfg.value_head
        if value_targets is not None and (self.value_head is None or head_cfg is None):
            raise ValueError("value_targets need a value head (LearnerConfig.value_head)")
        advantages = [[t.advantage for t in e.turns] for e in episodes]
        batches = training_batches(
            episodes,
            advantages,
            cfg.micro_batch_tokens,
            packing=cfg.packing,
            pad_id=self.pad_id,
            value_targets=value_targets,
            proximal=proximal,
        )
        # Step-wide counts (over every rank: `turnrl.rl.distributed`); the episodes that take
        # a share under "episode" weighting; the turns trained (an off-policy correction's
        # sequences).
        n_tokens, n_targets, n_policy_rows, n_value_rows, n_advantaged, n_turns = self._global(
            sum(b.n_tokens for b in batches),
            sum(b.n_value_targets for b in batches),
            sum(b.n_trained_episodes for b in batches),
            sum(b.n_value_episodes for b in batches),
            sum(bool(b.advantages_B_T.any()) for b in batches),
            sum(b.n_trained_turns for b in batches),
        )
        counts = counts_of(batches, len(episodes))
        policy_signal = n_tokens > 0 and (cfg.kl_coef > 0 or n_advantaged > 0)
        value_signal = n_targets > 0
        if value_targets is not None:
            counts["n_value_targets"] = float(n_targets)
        if not (policy_signal or value_signal):
            return StepResult(
                skipped=True,
                policy_updated=False,
                version=self.version,
                scalars={"n_micro_batches": 0.0, **counts},
            )
        use_kl = cfg.kl_coef > 0
        value_reaches_trunk = head_cfg is not None and head_cfg.backprop_to_policy

        def loss_of(cpu_batch: TokenBatch) -> tuple[torch.Tensor, Metrics] | None:
            train_policy = policy_signal and cpu_batch.n_tokens > 0
            train_value = value_signal and cpu_batch.n_value_targets > 0
            if not (train_policy or train_value):
                return None
            batch = cpu_batch.to(self.device)
            with torch.set_grad_enabled(train_policy or value_reaches_trunk):
                hidden_B_T_H = decoder_hidden(self.model, batch, share_prefix=cfg.share_prefix)
            loss = torch.zeros((), device=self.device)
            metrics: Metrics = {}
            if train_policy:
                loss, metrics = self._policy_loss(
                    batch, hidden_B_T_H, (n_tokens, n_policy_rows, n_turns), use_kl
                )
            if train_value:
                assert head_cfg is not None
                hidden = hidden_B_T_H if value_reaches_trunk else hidden_B_T_H.detach()
                v_loss, v_metrics = self._value_loss(batch, hidden, n_targets, n_value_rows)
                loss = loss + head_cfg.coef * v_loss
                metrics.update(v_metrics)
            return loss, metrics

        out = self._backward(batches, loss_of)
        trunk = policy_signal or (value_signal and value_reaches_trunk)
        return StepResult(
            skipped=False,
            policy_updated=trunk,
            version=self.version,
            scalars={"n_micro_batches": float(len(batches)), **counts, **out},
        )

    def accumulate_sft_gradients(self, episodes: Sequence[Episode]) -> StepResult:
        """`accumulate_gradients` for supervised fine-tuning (`sft_step`): the gradient of the
        weighted NLL of the trained tokens, added to `.grad`; no optimizer step. The stored
        `completion_logprobs` are not read. Scalars: loss, nll, n_tokens, n_padded_tokens,
        n_sequences, n_micro_batches."""
        cfg = self.config
        # Placeholders: oracle and other cloned episodes carry no usable logprobs.
        scrubbed = [measure.without_logprobs(e, keep_replayed=True) for e in episodes]
        advantages = [[t.advantage for t in e.turns] for e in episodes]
        batches = training_batches(
            scrubbed, advantages, cfg.micro_batch_tokens, packing=cfg.packing, pad_id=self.pad_id
        )
        n_tokens, n_rows, n_advantaged = self._global(
            sum(b.n_tokens for b in batches),
            sum(b.n_trained_episodes for b in batches),
            sum(bool(b.advantages_B_T.any()) for b in batches),
        )
        counts = counts_of(batches, len(episodes))
        if n_tokens == 0 or n_advantaged == 0:
            return StepResult(
                skipped=True,
                policy_updated=False,
                version=self.version,
                scalars={"n_micro_batches": 0.0, **counts},
            )

        def loss_of(cpu_batch: TokenBatch) -> tuple[torch.Tensor, Metrics] | None:
            if cpu_batch.n_tokens == 0:
                return None
            batch = cpu_batch.to(self.device)
            logprobs_B_T, _ = token_logprobs(
                self.model, batch, cfg.temperature, share_prefix=cfg.share_prefix
            )
            weights_B_T = None
            if cfg.loss_weighting != "token":
                weights_B_T = sample_weights(
                    batch.loss_mask_B_T, cfg.loss_weighting, n_tokens, n_rows, batch.segments_B_T
                )
            return sft_loss(
                logprobs_B_T,
                batch.advantages_B_T,
                batch.loss_mask_B_T,
                n_tokens=n_tokens,
                weights_B_T=weights_B_T,
            )

        out = self._backward(batches, loss_of)
        return StepResult(
            skipped=False,
            policy_updated=True,
            version=self.version,
            scalars={"n_micro_batches": float(len(batches)), **counts, **out},
        )

    def _backward(
        self,
        batches: Sequence[TokenBatch],
        loss_of: Callable[[TokenBatch], tuple[torch.Tensor, Metrics] | None],
    ) -> dict[str, float]:
        """Backward of each micro-batch's loss (None: nothing to train in it), in train mode;
        returns the metrics (and `loss`) summed over the micro-batches."""
        sums: Metrics = {}
        was_training = self.model.training
        self.model.train()
        try:
            for cpu_batch in batches:
                with placement.autocast(self.device, self._compute_dtype):
                    out = loss_of(cpu_batch)
                if out is None:
                    continue
                loss, metrics = out
                loss.backward()
                metrics["loss"] = loss.detach()
                for k, v in metrics.items():
                    sums[k] = sums[k] + v if k in sums else v
        finally:
            self.model.train(was_training)
        # One host sync for the whole step, not one per micro-batch.
        floats = {k: float(v) for k, v in sums.items()}
        return floats if self.data_parallel is None else self.data_parallel.sum_metrics(floats)

    def _share(self, part: list[int]) -> list[int]:
        """This rank's share of the episodes `part` indexes (all of them in one process). Every
        rank is given the whole batch and plans the same minibatches, so each optimizer step
        sums the same episodes' gradients as one process would."""
        return part if self.data_parallel is None else self.data_parallel.shard(part)

    def _global(self, *counts: int) -> list[int]:
        """`counts` summed over the data-parallel ranks (as they are in one process)."""
        if self.data_parallel is None:
            return list(counts)
        return [round(v) for v in self.data_parallel.sum_floats([float(c) for c in counts])]

    def _policy_loss(
        self,
        batch: TokenBatch,
        hidden_B_T_H: torch.Tensor,
        counts: tuple[int, int, int],
        use_kl: bool,
    ) -> tuple[torch.Tensor, Metrics]:
        """PPO-clip (+ KL) of one micro-batch, weighted for the whole step's `counts`: trained
        tokens, episodes with trained tokens, trained turns."""
        cfg = self.config
        ref_B_T = None
        if use_kl:
            ref_B_T = measure.reference_logprobs(
                self.model if self._reference is None else self._reference,
                batch,
                temperature=cfg.temperature,
                share_prefix=cfg.share_prefix,
                adapters=self.peft_model if self._reference is None else None,
            )
        logprobs_B_T, entropy_N = token_logprobs(
            self.model, batch, cfg.temperature, with_entropy=True, hidden_B_T_H=hidden_B_T_H
        )
        assert entropy_N is not None
        return policy_loss(logprobs_B_T, entropy_N, ref_B_T, batch, cfg, *counts)

    def _value_loss(
        self, batch: TokenBatch, hidden_B_T_H: torch.Tensor, n_targets: int, n_rows: int
    ) -> tuple[torch.Tensor, Metrics]:
        """MSE of V(s_j) against the batch's targets, weighted for the whole step."""
        assert self.value_head is not None
        values_B_J = state_values(self.value_head, hidden_B_T_H, batch.state_positions_B_J)
        return state_value_loss(values_B_J, batch, self.config.loss_weighting, n_targets, n_rows)

    def step(
        self,
        episodes: Sequence[Episode],
        value_targets: Sequence[Sequence[float | None]] | None = None,
    ) -> StepResult:
        """PPO updates over `episodes`: `config.ppo_epochs` passes, each cut into
        `config.minibatches` minibatches of whole episodes, one optimizer step per minibatch
        (`turnrl.rl.ppo_epochs`; the defaults, 1 and 1, take one step over the whole batch).
        Each turn's `Turn.advantage` is broadcast to its sampled tokens (None: the turn is not
        trained); the ratio is taken against the stored rollout logprobs, or the proximal
        policy's under `config.off_policy` (`turnrl.rl.proximal`). Each minibatch's loss is weighted
        with its own counts. `value_targets[i][j]` (needs a value head) is the regression
        target of V(s_j), the state turn `j` starts from (None: no target for that turn); the
        step adds `coef * MSE`, and the targets follow their episodes into the minibatches.
        With `config.target_kl`, the updates stop once the approximate KL to the rollout
        policy on the last updated minibatch exceeds it.

        Scalars (for logging; averaged over the optimizer steps that ran): loss, clip_frac,
        approx_kl, ratio_mean, entropy, kl_ref (when `kl_coef > 0`), grad_norm (before
        clipping), lr; under an off-policy correction is_weight_mean, is_token_frac,
        is_seq_frac, behaviour_kl (`turnrl.rl.offpolicy.importance_metrics`); with value
        targets also value_loss (the MSE before `coef`; `loss` includes `coef` times it),
        value_mean, value_target_mean, value_grad_norm. Counts of the whole batch: n_tokens,
        n_sequences, n_value_targets (with value targets); version_lag_mean and
        version_lag_max over the trained turns; work summed over the updates: n_micro_batches,
        n_padded_tokens; n_optimizer_steps; with several epochs clip_frac_last_epoch and
        approx_kl_last_epoch; when a KL stop was measured, early_stopped (0/1) and
        kl_after_update; seconds.

        `version` is incremented once per call that moved the policy's weights
        (`policy_updated`), however many optimizer steps it took: one weight sync per
        `step`. Not when skipped, nor when the value head alone trained.
        """
        start = time.perf_counter()
        cfg = self.config
        if value_targets is not None and len(value_targets) != len(episodes):
            raise ValueError(f"{len(value_targets)} value-target rows for {len(episodes)} episodes")
        value = value_targets is not None
        lag = proximal.version_lag(episodes, self.version)

        def subset(part: list[int]) -> list[Episode]:
            return list(episodes) if len(part) == len(episodes) else [episodes[i] for i in part]

        def update(part: list[int]) -> Update:
            part = self._share(part)
            targets = value_targets
            if value_targets is not None and len(part) != len(episodes):
                targets = [value_targets[i] for i in part]
            prox = None if anchors is None else [anchors[i] for i in part]
            accumulated = self.accumulate_gradients(subset(part), targets, prox)
            result = self._apply(accumulated, value=value)
            return Update(result.skipped, result.policy_updated, dict(result.scalars))

        plan = plan_updates(len(episodes), cfg.ppo_epochs, cfg.minibatches, seed=self.version)
        try:
            with memory.returned_to_system(self._release_memory):
                anchors = proximal.proximal_logprobs(self, episodes, plan, share=self._share)
                schedule = run_epochs(
                    len(episodes),
                    cfg.ppo_epochs,
                    cfg.minibatches,
                    seed=self.version,
                    update=update,
                    target_kl=cfg.target_kl,
                    kl_after=lambda part: self._rollout_kl(
                        proximal.anchored(episodes, self._share(part), anchors)
                    ),
                )
        finally:
            self.optimizer.zero_grad(set_to_none=True)
        steps = [u for u in schedule.updates if not u.skipped]
        policy_updated = any(u.policy_updated for u in steps)
        if policy_updated:
            self.version += 1
        counts = batch_counts(episodes, value_targets)
        scalars = merge_scalars(schedule, counts, cfg.ppo_epochs)
        scalars |= lag
        scalars["seconds"] = time.perf_counter() - start
        return StepResult(
            skipped=not steps, policy_updated=policy_updated, version=self.version, scalars=scalars
        )

    def sft_step(self, episodes: Sequence[Episode]) -> StepResult:
        """One optimizer step of supervised fine-tuning (behaviour cloning) on the stored ids:
        loss = -sum_tokens w * a * logprob(token) over the tokens `micro_batches` trains (the
        sampled `completion_ids` of turns whose `advantage` is not None, outside replayed
        turns; prompt, user and observation ids never are). The turn's `advantage` is its
        weight `a` (1.0 clones the turn, None leaves it out as context); `w` is the step's
        share under `LearnerConfig.loss_weighting` (`"token"`: 1 / the step's trained-token
        count; `"episode"`: every episode the same total). The stored `completion_logprobs`
        are ignored (cloned episodes carry placeholders). Gradient accumulation, clipping and
        AdamW as in `step`; `version` += 1.

        Logprobs are taken under `LearnerConfig.temperature` like the RL path; cloning should
        normally use temperature 1.0 (the model's own distribution), so configure the SFT
        learner with it.

        Scalars: loss (the weighted objective), nll (plain mean of -logprob per trained token),
        n_tokens, n_sequences, n_padded_tokens, n_micro_batches, grad_norm, lr, seconds. A step
        with no trained token, or only zero weights, is skipped like `step`'s.
        """
        start = time.perf_counter()
        with memory.returned_to_system(self._release_memory):
            mine = [episodes[i] for i in self._share(list(range(len(episodes))))]
            result = self._apply(self.accumulate_sft_gradients(mine), value=False)
        if result.policy_updated:
            self.version += 1
        scalars = dict(result.scalars)
        if self.data_parallel is not None:  # the whole batch's counts, like the loss
            keys = [k for k in ("n_tokens", "n_sequences", "n_padded_tokens") if k in scalars]
            summed = self.data_parallel.sum_floats([scalars[k] for k in keys])
            scalars |= dict(zip(keys, summed, strict=True))
        scalars["seconds"] = time.perf_counter() - start
        return dataclasses.replace(result, version=self.version, scalars=scalars)

    def _apply(self, result: StepResult, *, value: bool) -> StepResult:
        """Clip and take the optimizer step after an accumulation (none when skipped,
        `turnrl.rl.optimization`); zero the gradients either way. The caller bumps
        `version`."""
        scalars = dict(result.scalars)
        try:
            if not result.skipped:
                if self.data_parallel is not None:
                    self.data_parallel.sum_gradients(
                        self.trainable_parameters + self.value_parameters
                    )
                scalars |= optimization.optimizer_step(
                    self.optimizer,
                    self.config,
                    self.optimizer_steps,
                    self.trainable_parameters,
                    self.value_parameters,
                    value=value,
                )
                self.optimizer_steps += 1
        finally:
            self.optimizer.zero_grad(set_to_none=True)
        return dataclasses.replace(result, scalars=scalars)

    def _rollout_kl(self, episodes: Sequence[Episode]) -> float:
        cfg = self.config
        with placement.autocast(self.device, self._compute_dtype):
            kl = measure.rollout_kl(
                self.model,
                episodes,
                temperature=cfg.temperature,
                weighting=cfg.loss_weighting,
                micro_batch_tokens=cfg.micro_batch_tokens,
                pad_id=self.pad_id,
                share_prefix=cfg.share_prefix,
            )
        if self.data_parallel is None:
            return kl
        # The ranks' means, weighted by what each mean is over, so that every rank stops alike.
        return self.data_parallel.weighted_mean(kl, trained_size(episodes, cfg.loss_weighting))

    def values(self, episodes: Sequence[Episode], *, bootstrap: bool = False) -> list[list[float]]:
        """V(s_j) of every turn under the current weights: `[episode][turn]`, the value of the
        state turn `j` starts from, read at the last token before its completion. With
        `bootstrap`, each row ends with one more value, V(s_T) of the state after the last
        turn (read at the episode's last token), which a truncated episode's GAE bootstraps
        from. Computed from the stored ids in micro-batches, in eval mode, without
        gradients; store them with `turnrl.rl.value_head.with_values`."""
        if self.value_head is None:
            raise ValueError("this learner has no value head (LearnerConfig.value_head)")
        with (
            memory.returned_to_system(self._release_memory),
            placement.autocast(self.device, self._compute_dtype),
        ):
            return measure.episode_values(
                self.model,
                self.value_head,
                episodes,
                bootstrap=bootstrap,
                micro_batch_tokens=self.config.micro_batch_tokens,
                pad_id=self.pad_id,
                share_prefix=self.config.share_prefix,
            )

    def logprobs(self, episodes: Sequence[Episode]) -> list[list[list[float]]]:
        """Score each turn's stored completion ids under the current weights (teacher
        forcing), shaped like `Turn.completion_logprobs`: `[episode][turn][token]`. The
        episodes' own logprobs are ignored. Runs in eval mode without gradients."""
        with (
            memory.returned_to_system(self._release_memory),
            placement.autocast(self.device, self._compute_dtype),
        ):
            return measure.completion_logprobs(
                self.model,
                episodes,
                temperature=self.config.temperature,
                micro_batch_tokens=self.config.micro_batch_tokens,
                pad_id=self.pad_id,
                share_prefix=self.config.share_prefix,
            )

    def merge_adapters(self) -> None:
        """Fold LoRA adapters into the model's own weights, in place, so that the policy
        samples the merged model and a later learner starts from it (with adapters of its
        own, or full fine-tuning); this learner is done. Nothing to do after full
        fine-tuning."""
        if self.peft_model is not None:
            self.peft_model.merge_and_unload()

    def save_checkpoint(self, directory: str | Path, *, merged: bool = False) -> Path:
        """Write the weights, optimizer state, version and optimizer step count under
        `directory` (layout: `turnrl.rl.learner_checkpoint.save_checkpoint`)."""
        return learner_checkpoint.save_checkpoint(self, directory, merged=merged)

    def load_checkpoint(self, directory: str | Path) -> None:
        """Restore what `save_checkpoint` wrote into this learner (same model architecture
        and adaptation); the LR schedule continues from the saved step count. The KL
        reference is kept: it is the model the learner was built on, not the checkpoint."""
        learner_checkpoint.load_checkpoint(self, directory)
