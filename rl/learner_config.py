"""The learner's config: optimizer, loss, batching, what is trained, and the value head.

Kept apart from the learner (`turnrl.rl.learner`), which needs torch and peft, so that a run
config loads without them.
"""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict, Field

LossWeighting = Literal["token", "episode"]
"""How a step's loss is shared among its samples (see `turnrl.rl.losses`)."""


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
    """AdamW learning rate."""
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
    """Early stop: after each optimizer step, the k3 approximate KL(rollout || current) on the
    updated minibatch (`turnrl.rl.ppo_epochs`); above this, the step's remaining updates are
    dropped. None never stops (verl and OpenRLHF have no such stop; Stable-Baselines3 and
    Spinning Up stop at 1.5 x their `target_kl`). Costs one no-gradient forward pass over the
    minibatch per optimizer step but the last."""
    value_head: ValueHeadConfig | None = None
    """A linear value head on the final hidden state for turn-level critics (GAE); None
    builds none."""
