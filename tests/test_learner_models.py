"""Any local transformers causal LM trains: Qwen2-shaped (tied embeddings, GQA, rope theta 1e6)
and Llama-shaped models built by `random_model`, saved and loaded like a `model.kind: path`
checkpoint, take padded and packed learner steps that agree."""

from __future__ import annotations

import copy
from pathlib import Path
from typing import Any

import pytest
import torch
from fakes import with_advantages
from test_learner import make_episode, with_model_logprobs

from turnrl.agent.model import MODEL_SHAPES, load_model, random_model
from turnrl.rl.learner import Learner
from turnrl.rl.learner_config import LearnerConfig

SMALL = {
    "vocab_size": 512,
    "hidden_size": 64,
    "intermediate_size": 128,
    "num_hidden_layers": 2,
    "num_attention_heads": 4,
    "num_key_value_heads": 2,
}


def shape(name: str) -> dict[str, Any]:
    return {**MODEL_SHAPES[name], **SMALL}


def test_random_model_builds_the_named_shapes_without_weights() -> None:
    qwen = MODEL_SHAPES["qwen2.5-1.5b"]
    assert (qwen["hidden_size"], qwen["num_hidden_layers"], qwen["vocab_size"]) == (
        1536,
        28,
        151936,
    )
    model = random_model(shape("qwen2.5-1.5b"), dtype=torch.bfloat16)
    assert type(model).__name__ == "Qwen2ForCausalLM"
    assert model.config.tie_word_embeddings
    assert next(model.parameters()).dtype == torch.bfloat16
    with pytest.raises(ValueError, match="unknown model shape"):
        random_model("gpt-5")
    with pytest.raises(ValueError, match="model_type"):
        random_model({"hidden_size": 8})


@pytest.mark.parametrize("name", ["qwen2.5-1.5b", "smollm2-135m"])
def test_a_saved_checkpoint_loads_and_steps_padded_and_packed_alike(
    tmp_path: Path, name: str
) -> None:
    random_model(shape(name), seed=3).save_pretrained(str(tmp_path / "ckpt"))
    model = load_model(tmp_path / "ckpt")
    shapes = [[(4, 6, 3), (0, 4, 2)], [(5, 5, 4)], [(3, 3, 2)], [(2, 8, 1)]]
    episodes = [make_episode(f"e{i}", s, seed=60 + i) for i, s in enumerate(shapes)]
    episodes = with_advantages(
        with_model_logprobs(model, episodes), [[1.0, -1.0], [0.5], [-0.5], [1.0]]
    )
    results = []
    for packing in (False, True):
        learner = Learner(
            copy.deepcopy(model),
            LearnerConfig(lr=1e-4, packing=packing, share_prefix=False, micro_batch_tokens=60),
        )
        result = learner.step(episodes)
        assert not result.skipped and result.version == 1
        results.append(result)
        learner.save_checkpoint(tmp_path / f"out{packing}")
        # A tied head is written once; the checkpoint loads back into a fresh learner.
        fresh = Learner(load_model(tmp_path / "ckpt"), LearnerConfig())
        fresh.load_checkpoint(tmp_path / f"out{packing}")
        assert fresh.version == 1
    assert results[1].scalars["loss"] == pytest.approx(results[0].scalars["loss"], rel=1e-5)
    assert results[1].scalars["n_padded_tokens"] < results[0].scalars["n_padded_tokens"]
