"""The learner's config: optimizer, loss, batching, what is trained, and the value head.

Kept apart from the learner (`turnrl.rl.learner`), which needs torch and peft, so that a run
config loads without them.
"""

from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator

LossWeighting = Literal["token", "episode"]
"""How a step's loss is shared among its samples (see `turnrl.rl.losses`)."""
LearnerDevice = Literal["auto", "cpu", "cuda"]
"""Where the learner trains: `auto` is cuda when one is available, else cpu."""
LearnerDtype = Literal["float32", "bfloat16"]
"""The learner's compute precision (`turnrl.rl.placement`)."""
AttentionImplementation = Literal["sdpa", "flash_attention_2", "eager"]
"""The transformers attention kernel the learner sets on the model."""
ISLevel = Literal["token", "sequence"]
"""Where an importance weight is formed and corrected: each sampled token alone, or a whole
sequence, one turn's sampled completion (the product of its tokens' weights, broadcast to
them). Why a turn and not the episode: `turnrl.rl.offpolicy`."""
RatioLevel = Literal["token", "sequence"]
"""PPO's ratio per token, or GSPO's per sequence (one turn's completion; `LearnerConfig`)."""


class RolloutRatio(BaseModel):
    """PPO's ratio against the rollout logprobs stored with each turn: the behaviour policy is
    also the clip's anchor (verl's "bypass" mode). No extra pass and no importance weight; the
    right choice when rollouts come from the learner's own weights (the synchronous loop)."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    kind: Literal["rollout"] = "rollout"
    """Selects the rollout-anchored ratio (the default: the loss of every earlier version)."""


class DecoupledPPO(BaseModel):
    """Decoupled PPO (Hilton, Cobbe & Schulman 2021, "Batch size-invariance for policy
    optimization", arXiv 2110.00641; AReaL's asynchronous PPO): the clip is taken against the
    proximal policy, the learner's weights at the start of `Learner.step`, and the behaviour
    policy enters only through the untruncated token weight `pi_prox / pi_behav`
    (`turnrl.rl.offpolicy`). For a truncated or masked weight, use `tis` or `mis`."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    kind: Literal["decoupled"] = "decoupled"
    """Selects decoupled PPO."""


class TruncatedIS(BaseModel):
    """Truncated importance sampling (Yao et al. 2025, "Your efficient RL framework secretly
    brings you off-policy RL training"; verl's `rollout_is`): decoupled PPO whose weight
    `w = pi_prox / pi_behav` is capped, `min(w, cap)` (at token or sequence level)."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    kind: Literal["tis"] = "tis"
    """Selects truncated importance sampling."""
    level: ISLevel = "token"
    """Token weights (biased, low variance), or one weight per turn's completion (the product
    of its tokens' weights: unbiased for that turn, higher variance)."""
    cap: float = Field(2.0, gt=0)
    """C in `min(w, C)`. verl's guide suggests 1.5-5 at token level, 2-10 at sequence level."""


class MaskedIS(BaseModel):
    """Masked importance sampling (IcePop: Ling team 2025, "Every step evolves: scaling
    reinforcement learning for trillion-scale thinking model"; sequence-level MIS: Liu, Li et
    al. 2025, "When speed kills stability"): decoupled PPO whose weight
    `w = pi_prox / pi_behav` is kept where `low <= w <= high` and is 0 elsewhere: a token (or a
    whole turn's completion) the behaviour policy sampled far off the proximal one is dropped
    from the loss instead of being down-weighted."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    kind: Literal["mis"] = "mis"
    """Selects masked importance sampling."""
    level: ISLevel = "token"
    """Mask tokens one by one, or whole turns' completions by their product weight."""
    low: float = Field(0.5, ge=0)
    """Lowest weight kept."""
    high: float = Field(5.0, gt=0)
    """Highest weight kept."""

    @model_validator(mode="after")
    def _ordered(self) -> MaskedIS:
        if not self.low < self.high:
            raise ValueError(f"mis needs low < high, got low={self.low}, high={self.high}")
        return self


OffPolicyCorrection = RolloutRatio | DecoupledPPO | TruncatedIS | MaskedIS
"""How the PPO loss treats the gap between the behaviour policy (the rollout logprobs) and the
policy being trained (`turnrl.rl.offpolicy`)."""


class ConstantLR(BaseModel):
    """`LearnerConfig.lr` throughout, after an optional linear warmup."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    kind: Literal["constant"] = "constant"
    """Selects the constant rate."""
    warmup_steps: int = Field(0, ge=0)
    """Optimizer steps of linear warmup: step k (1-based) of the first `warmup_steps` runs at
    `k / warmup_steps` of the rate (never at 0). 0 starts at the full rate."""


class WarmupCosineLR(BaseModel):
    """Linear warmup, then cosine decay to a floor (Loshchilov & Hutter 2017, arXiv
    1608.03983, without restarts), counted in optimizer steps (`turnrl.rl.lr_schedule`)."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    kind: Literal["warmup_cosine"] = "warmup_cosine"
    """Selects warmup and cosine decay."""
    warmup_steps: int = Field(0, ge=0)
    """Optimizer steps of linear warmup (as in `ConstantLR`)."""
    total_steps: int = Field(ge=1)
    """Optimizer steps, warmup included, after which the rate stays at the floor."""
    min_lr_ratio: float = Field(0.0, ge=0, le=1)
    """The floor, as a fraction of the rate."""

    @model_validator(mode="after")
    def _decays(self) -> WarmupCosineLR:
        if self.total_steps <= self.warmup_steps:
            raise ValueError(
                f"warmup_cosine needs total_steps > warmup_steps, got {self.total_steps} "
                f"<= {self.warmup_steps}"
            )
        return self


LRSchedule = ConstantLR | WarmupCosineLR
"""The learning rate at each optimizer step, as a factor of the configured rates."""


class ValueHeadConfig(BaseModel):
    """A linear value head on the final hidden state, trained by MSE to per-turn targets."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    coef: float = Field(0.5, ge=0)
    """Weight of the value loss in the step's loss: `loss = policy + coef * MSE(V, target)`."""
    lr: float = Field(1e-4, gt=0)
    """AdamW learning rate of the head (its own parameter group in the learner's optimizer).
    Larger than a policy's usual rate: the head starts from scratch."""
    init_std: float = Field(0.0, ge=0)
    """Std of the normal init of the head's weights; 0 starts them at zero, so every state's
    first value is `init_bias` and the first steps leave the trunk's features untouched."""
    init_bias: float = 0.0
    """Initial bias: the value every state starts from when `init_std` is 0 (e.g. the mean
    return expected at the start of training)."""
    backprop_to_policy: bool = False
    """Let the value loss's gradient flow into the policy's trained weights (a shared
    actor-critic trunk, PPO's usual setting). False trains the head alone on detached
    hidden states: the value loss then never moves the policy."""


class LoraConfig(BaseModel):
    """Train low-rank adapters (Hu et al. 2021, arXiv 2106.09685); the base stays frozen."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    kind: Literal["lora"] = "lora"
    """Selects LoRA."""
    r: int = Field(16, ge=1)
    """Rank of each adapter."""
    alpha: int = Field(32, ge=1)
    """Adapter scale numerator: the adapter's output is multiplied by alpha / r."""
    dropout: float = Field(0.0, ge=0.0, lt=1.0)
    """Dropout on the adapters' input; active only inside `Learner.step`."""
    target_modules: tuple[str, ...] = (
        "q_proj",
        "k_proj",
        "v_proj",
        "o_proj",
        "gate_proj",
        "up_proj",
        "down_proj",
    )
    """Names of the linear layers that get adapters."""


class FullConfig(BaseModel):
    """Train every parameter of the model."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    kind: Literal["full"] = "full"
    """Selects full fine-tuning."""


class LearnerConfig(BaseModel):
    """Optimizer, loss and batching settings of the learner."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    lr: float = Field(1e-6, gt=0)
    """AdamW learning rate (the peak, under a schedule)."""
    lr_schedule: LRSchedule = Field(default_factory=ConstantLR, discriminator="kind")
    """How the rate moves with the optimizer steps taken (`Learner.optimizer_steps`, saved
    with checkpoints): constant, or warmup then cosine decay. Scales every parameter group
    alike (the value head's `lr` too); the step's rate is logged as `lr`."""
    weight_decay: float = Field(0.0, ge=0)
    """AdamW decoupled weight decay."""
    betas: tuple[float, float] = (0.9, 0.999)
    """AdamW moment coefficients."""
    max_grad_norm: float | None = Field(1.0, gt=0)
    """Clip the global gradient L2 norm to this; None reports the norm without clipping."""
    clip_low: float = Field(0.2, ge=0, lt=1)
    """PPO ratio lower clip: ratios below 1 - clip_low stop pushing down."""
    clip_high: float = Field(0.2, ge=0)
    """PPO ratio upper clip: ratios above 1 + clip_high stop pushing up (DAPO uses 0.28)."""
    off_policy: OffPolicyCorrection = Field(default_factory=RolloutRatio, discriminator="kind")
    """The ratio's anchor and the importance weight for data the learner did not sample itself
    (`turnrl.rl.offpolicy`): `rollout` (the stored logprobs; no correction), `decoupled`,
    `tis` or `mis` (the proximal policy, with a plain, truncated or masked weight
    `pi_prox / pi_behav`). The proximal logprobs cost one no-gradient pass over the batch
    before the first update, except when the step takes a single update (they are then the
    update's own, detached)."""
    ratio_level: RatioLevel = "token"
    """`token`: PPO's per-token ratio. `sequence`: GSPO's (Zheng et al. 2025, arXiv
    2507.18071), one ratio per turn's completion, `exp(mean_t log(pi / pi_anchor))`, clipped
    per sequence. The geometric mean moves far less than a token's ratio: GSPO clips at
    `clip_low` 3e-4 and `clip_high` 4e-4, not 0.2."""
    kl_coef: float = Field(0.0, ge=0)
    """Weight of the k3 KL(policy || reference) term; 0 builds no reference at all."""
    temperature: float = Field(1.0, gt=0)
    """Sampling temperature of the rollouts, so that recomputed logprobs match stored ones
    (greedy rollouts are scored under the raw logits: use 1.0 for them)."""
    micro_batch_tokens: int = Field(4096, ge=1)
    """Padded-token budget (rows x longest row) of one forward/backward micro-batch."""
    share_prefix: bool = True
    """Run the prefix that all rows of a micro-batch share (the common prompt) through the
    decoder once and the rows' suffixes on its broadcast KV cache, in the learner's forward
    passes, `Learner.logprobs`, `Learner.values` and the KL stop's measurement
    (`turnrl.rl.logprobs`). Same results to float rounding; False runs every row in full
    (for comparison, or for a model whose attention cannot take the cache)."""
    release_memory: bool = True
    """On CPU, keep the process's resident memory at what is live between learner passes
    (glibc only, `turnrl.rl.memory.returned_to_system`): inside `step`, `sft_step`, `logprobs`
    and `values`, blocks of 1 MiB or more are served by their own mappings, and on the way out
    the allocator's free memory is returned to the system. Without it RSS grew step after
    step with the varying batch shapes (benchmarks/bench_memory.py). False leaves the
    allocator alone."""
    adaptation: LoraConfig | FullConfig = Field(default_factory=FullConfig, discriminator="kind")
    """What is trained: LoRA adapters or every weight."""
    loss_weighting: LossWeighting = "token"
    """How the step's loss is shared (see `turnrl.rl.losses`): `"token"`, every trained token
    weighs the same (long episodes dominate); `"episode"`, every episode with trained tokens
    weighs the same (its tokens share 1 / episodes). Applies to the value loss with turns as
    samples."""
    ppo_epochs: int = Field(1, ge=1)
    """Passes `Learner.step` makes over each rollout batch (PPO's K epochs, arXiv 1707.06347).
    With 1 pass of 1 minibatch the policy takes a single step from the rollout weights, the
    ratio is 1 throughout and the clip never engages (the update is the plain policy
    gradient); more passes reuse the batch and let the clip bound the drift. 1 is what verl
    (`actor.ppo_epochs: 1`) and OpenRLHF (`--max_epochs 1`) default to."""
    minibatches: int = Field(1, ge=1)
    """Minibatches each pass is cut into (whole episodes, shuffled per epoch with a seeded
    generator; fewer when there are fewer episodes), one optimizer step each. 1 takes one
    step per pass over the whole batch. verl's defaults take 4 steps per batch
    (`data.train_batch_size: 1024` prompts over `actor.ppo_mini_batch_size: 256`), OpenRLHF's
    8 (`--rollout_batch_size 1024` over `--train_batch_size 128`); here 1 keeps one weight
    update per step of a small on-CPU batch."""
    target_kl: float | None = Field(None, gt=0)
    """Early stop: after each optimizer step, the k3 approximate KL(anchor || current) on the
    updated minibatch, the anchor being the rollout policy, or the proximal one under an
    `off_policy` correction (`turnrl.rl.ppo_epochs`); above this, the step's remaining
    updates are dropped. None never stops (verl and OpenRLHF have no such stop;
    Stable-Baselines3 and Spinning Up stop at 1.5 x their `target_kl`). Costs one no-gradient
    forward pass over the minibatch per optimizer step but the last."""
    value_head: ValueHeadConfig | None = None
    """A linear value head on the final hidden state for turn-level critics (GAE); None
    builds none."""
    device: LearnerDevice = "auto"
    """Where the model is trained (it is moved there, with the policy that shares it): `auto`
    is `cuda` when torch sees one, else `cpu`. Under `torchrun` each rank takes
    `cuda:LOCAL_RANK` (`turnrl.rl.distributed`)."""
    dtype: LearnerDtype = "float32"
    """`bfloat16` keeps float32 master weights and AdamW state and runs the forward and
    backward under bf16 autocast; logprobs are always log_softmax'd in float32
    (`turnrl.rl.placement` says why not bf16 weights). `float32` computes in float32 (the
    right choice on AVX2-only CPUs, where bf16 is slower)."""
    gradient_checkpointing: bool = False
    """Recompute each decoder layer's activations in backward instead of storing them
    (transformers' non-reentrant checkpointing): ~1/3 more compute for activation memory of
    one layer per micro-batch. Excludes `share_prefix` (a checkpointed layer drops the KV
    cache the shared prefix lives in)."""
    attention: AttentionImplementation = "sdpa"
    """Attention kernel set on the model: `sdpa` (torch's scaled_dot_product_attention, any
    device), `flash_attention_2` (needs the `flash-attn` package and cuda; refused otherwise),
    `eager` (the reference implementation)."""
    packing: bool = False
    """Pack episodes end to end into rows as wide as the step's longest episode, positions
    restarting and attention confined to each episode (a block-diagonal causal mask, or
    flash-attention's varlen path), micro-batches of `micro_batch_tokens // width` rows
    (`turnrl.rl.packing`): the padding of short episodes is replaced by other episodes.
    Losses and gradients equal the padded layout's to float rounding, for either weighting.
    Applies to the gradient passes (`step`, `sft_step`); scoring passes stay padded. Excludes
    `share_prefix` (a pack row's episodes share no single prefix)."""

    @model_validator(mode="before")
    @classmethod
    def _share_prefix_default(cls, data: Any) -> Any:
        # share_prefix defaults to True, but packing and checkpointing exclude it: left out,
        # it follows them (so a dumped config loads back unchanged); set True, it is refused.
        if not isinstance(data, dict) or "share_prefix" in data:
            return data
        if data.get("packing") or data.get("gradient_checkpointing"):
            return {**data, "share_prefix": False}
        return data

    @model_validator(mode="after")
    def _share_prefix_excluded(self) -> LearnerConfig:
        if self.share_prefix and (self.packing or self.gradient_checkpointing):
            which = "packing" if self.packing else "gradient_checkpointing"
            raise ValueError(
                f"learner.share_prefix cannot be combined with learner.{which}: a "
                + (
                    "pack row's episodes share no single prefix"
                    if self.packing
                    else "checkpointed layer drops the prefix's KV cache"
                )
                + "; set learner.share_prefix: false (or leave it out)"
            )
        return self
