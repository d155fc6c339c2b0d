"""The model cache: where it lives, how it is built, and what the models look like."""

from __future__ import annotations

import asyncio
import threading
import time
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from transformers import LlamaForCausalLM, PreTrainedModel, PreTrainedTokenizerBase

from turnrl.agent.hf_policy import HFPolicy
from turnrl.agent.model import (
    build_tiny_model,
    cache_dir,
    cached_build,
    embedded_model_dir,
    end_of_turn_id,
    gguf_path,
    load_model,
    load_tokenizer,
    tiny_model_dir,
)
from turnrl.agent.policy import SamplingParams


def test_cache_dir_follows_the_environment(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setenv("TURNRL_CACHE", str(tmp_path))
    assert cache_dir() == tmp_path
    monkeypatch.delenv("TURNRL_CACHE")
    assert cache_dir() == Path.home() / ".cache" / "turnrl"


def test_gguf_is_found_without_importing_its_package() -> None:
    path = gguf_path()
    assert path.is_file()
    assert path.name == "SmolLM2-135M-Instruct.Q4_1.gguf"


def test_tokenizer_speaks_chatml(tokenizer: PreTrainedTokenizerBase) -> None:
    eot = end_of_turn_id(tokenizer)
    assert tokenizer.convert_ids_to_tokens(eot) == "<|im_end|>"
    ids = tokenizer.apply_chat_template(
        [{"role": "user", "content": "hi"}], add_generation_prompt=True, return_dict=False
    )
    text = tokenizer.decode(ids)
    assert text.endswith("<|im_start|>user\nhi<|im_end|>\n<|im_start|>assistant\n")
    assert ids.count(eot) == 2  # the default system message and the user message


def test_tiny_model_shares_the_tokenizer_and_is_untied(
    tiny_model: PreTrainedModel, tokenizer: PreTrainedTokenizerBase
) -> None:
    assert isinstance(tiny_model, LlamaForCausalLM)
    assert tiny_model.config.vocab_size == len(tokenizer)
    assert tiny_model.config.tie_word_embeddings is False
    head, embed = tiny_model.get_output_embeddings(), tiny_model.get_input_embeddings()
    assert head is not None
    assert head.weight.data_ptr() != embed.weight.data_ptr()
    assert next(tiny_model.parameters()).dtype == torch.float32
    folder = tiny_model_dir()
    with safe_open(str(folder / "model.safetensors"), "pt") as f:
        assert "lm_head.weight" in set(f.keys())
    assert load_tokenizer(folder).chat_template == tokenizer.chat_template


def test_tiny_model_is_seeded_and_leaves_the_global_generator_alone() -> None:
    torch.manual_seed(123)
    expected = torch.rand(3)
    torch.manual_seed(123)
    a, b, c = build_tiny_model(0), build_tiny_model(0), build_tiny_model(1)
    assert torch.equal(torch.rand(3), expected)
    assert torch.equal(a.lm_head.weight, b.lm_head.weight)
    assert not torch.equal(a.lm_head.weight, c.lm_head.weight)


def test_failed_build_leaves_no_folder(tmp_path: Path) -> None:
    def broken(folder: Path) -> None:
        (folder / "half.bin").write_bytes(b"x")
        raise OSError("disk full")

    target = tmp_path / "model"
    with pytest.raises(OSError, match="disk full"):
        cached_build(target, broken)
    assert not target.exists()
    assert [p.name for p in tmp_path.iterdir()] == [".model.lock"]


def test_concurrent_builds_write_once(tmp_path: Path) -> None:
    calls = []

    def write(folder: Path) -> None:
        calls.append(folder)
        time.sleep(0.05)
        (folder / "weights").write_text("w")

    target = tmp_path / "model"
    results: list[Path] = []
    threads = [
        threading.Thread(target=lambda: results.append(cached_build(target, write)))
        for _ in range(4)
    ]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert len(calls) == 1
    assert results == [target] * 4
    assert (target / "weights").read_text() == "w"


@pytest.mark.slow
def test_embedded_model_converts_untied_and_answers() -> None:
    folder = embedded_model_dir()
    with safe_open(str(folder / "model.safetensors"), "pt") as f:
        assert "lm_head.weight" in set(f.keys())
    model, tokenizer = load_model(folder), load_tokenizer(folder)
    assert model.config.tie_word_embeddings is False
    head = model.get_output_embeddings()
    assert head is not None
    assert head.weight.data_ptr() != model.get_input_embeddings().weight.data_ptr()
    prompt = tokenizer.apply_chat_template(
        [{"role": "user", "content": "What is the capital of France?"}],
        add_generation_prompt=True,
        return_dict=False,
    )

    async def main() -> tuple[int, ...]:
        async with HFPolicy(model, tokenizer) as policy:
            completion = await policy.generate(prompt, SamplingParams(temperature=0, max_tokens=40))
            assert completion.finish_reason == "stop"
            return completion.token_ids

    ids = asyncio.run(main())
    assert ids[-1] == end_of_turn_id(tokenizer)
    answer = tokenizer.decode(ids[:-1]).strip()
    assert answer
    assert "Paris" in answer
