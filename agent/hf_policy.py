"""`HFPolicy`: an in-process transformers policy that batches concurrent episodes.

Many episodes call `generate` from one event loop. Requests submitted in the same loop
iteration are handed to the worker together; one worker thread owns the model and keeps a
running batch with a KV cache (continuous batching):

- between decode steps it admits waiting requests (up to `max_batch_size` rows): they are
  left-padded, prefilled together in one forward pass, and their cache is merged into the
  running batch's cache (the shorter side left-padded with masked columns);
- each decode step feeds every row's last sampled id with the row's own position id and the
  batch's padding mask, so a row's numbers do not depend on its neighbours (a left-padded row
  samples what it would sample alone, up to float rounding);
- each row samples with its own `SamplingParams` and its own seeded generator (one uniform
  per step, inverse-CDF); finished rows leave the batch at once (their cache rows are
  dropped, and padding columns no row needs any more are trimmed);
- results return to the caller's loop with `call_soon_threadsafe`.

Prefix cache (on unless `prefix_cache=False`; tree and layouts in `agent/kv_cache.py`): the KV
of each admitted prompt and each finished row's context (prompt + sampled ids but the last,
whose KV was never computed) is kept; a request copies the KV of its longest cached prefix and
prefills only the rest, and a prefix that requests admitted together share is prefilled once
first. `begin_update`, `set_version` and `close` empty it: no KV outlives its weights.

Logprobs follow `turnrl.agent.policy`: log_softmax(logits / temperature) of the sampled id
before top-p truncation; temperature 0 (greedy) scores under the raw logits.

Weights (`WeightSync`): the learner changes the shared model in place between
`begin_update()` and `end_update(version)` (or inside `async with
policy.updating_weights(version)`). Rows in flight finish under the old weights,
queued requests wait and start under the new ones, so every completion comes from exactly one
`policy_version`. One event loop drives a policy. Tensors live on the model's device (the
tests run on CPU).
"""

from __future__ import annotations

import asyncio
import contextlib
import inspect
import queue
import random
import threading
import time
from collections import deque
from collections.abc import AsyncIterator, Sequence
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from types import TracebackType
from typing import Any, Literal

import torch
from transformers import DynamicCache, PreTrainedModel, PreTrainedTokenizerBase

from turnrl.agent import kv_cache
from turnrl.agent.model import end_of_turn_id
from turnrl.agent.policy import Completion, PolicyError, SamplingParams
from turnrl.agent.sampling import sample_rows

FinishReason = Literal["stop", "length"]


@dataclass(eq=False)
class _Request:
    prompt_ids: list[int]
    params: SamplingParams
    seed: int
    loop: asyncio.AbstractEventLoop
    future: asyncio.Future[Completion]
    submitted: float
    cancelled: bool = False
    """Set from the loop when the caller stops waiting; the worker then drops the row."""


@dataclass(eq=False)
class _Pause:
    loop: asyncio.AbstractEventLoop
    paused: asyncio.Future[None]
    resume: threading.Event


@dataclass(eq=False)
class _Row:
    request: _Request
    rng: random.Random
    """The row's own sampler, seeded from the request (unused by greedy rows)."""
    version: int
    admitted: float
    batch_size: int
    cached: int
    """Prompt ids whose KV came from the prefix cache."""
    weights: int
    """`HFPolicy._weights` at admission: the row's context is cached only while it holds."""
    prefill_s: float = 0.0
    prefilled: float = 0.0
    ids: list[int] = field(default_factory=list)
    logprobs: list[float] = field(default_factory=list)
    finish: FinishReason | None = None


_WAKE = object()


class HFPolicy:
    """A `Policy` backed by a transformers causal LM in this process."""

    def __init__(
        self,
        model: PreTrainedModel,
        tokenizer: PreTrainedTokenizerBase,
        *,
        max_batch_size: int = 16,
        end_token_ids: Sequence[int] | None = None,
        seed: int | None = None,
        policy_version: int = 0,
        prefix_cache: bool = True,
        prefix_cache_bytes: int = 512 * 2**20,
        autocast_dtype: torch.dtype | None = None,
    ) -> None:
        """`end_token_ids` end every request (kept in the output) on top of its own
        `stop_token_ids`; None means the tokenizer's end-of-turn and end-of-sequence ids, and
        `()` lets rows run to `max_tokens` (benchmarks). `seed` seeds the per-request seeds of
        requests that bring none. `prefix_cache` reuses the KV of earlier prompts and contexts
        (`prefix_cache_bytes` of it at most: 512 MiB holds ~11,600 ids of SmolLM2-135M in fp32,
        46 KB an id; 16 episodes x 3 turns on a 590-id shared prompt use ~250 MB).
        `autocast_dtype` (bfloat16) runs every forward under autocast, as a bf16 learner
        scores (`turnrl.rl.placement`): the sampled logprobs then come from the arithmetic
        the learner's ratio compares them with, not from float32."""
        if max_batch_size < 1:
            raise ValueError("max_batch_size must be at least 1")
        self.model = model
        self._autocast_dtype = autocast_dtype
        # transformers 5.24 renamed the forward's `past_key_values` argument to `cache` (the
        # old name warns); both spellings are in the supported range.
        params = inspect.signature(model.forward).parameters
        self._cache_kwarg = "cache" if "cache" in params else "past_key_values"
        self.tokenizer = tokenizer
        self.max_batch_size = max_batch_size
        self.policy_version = policy_version
        """Version of the weights; stamped on each completion at admission."""
        self._update: _Pause | None = None
        """The hold `begin_update` put on the worker, until `end_update` lifts it."""
        if end_token_ids is None:
            ends = {tokenizer.eos_token_id} if isinstance(tokenizer.eos_token_id, int) else set()
            with contextlib.suppress(ValueError):  # a tokenizer without ChatML markers
                ends.add(end_of_turn_id(tokenizer))
            end_token_ids = sorted(ends)
        self.end_token_ids = frozenset(end_token_ids)
        self.n_prefills = 0
        """Prefill forward passes run so far (one per admitted group of requests, and one
        more when the group's shared prefix is prefilled first)."""
        self.n_prefill_tokens = 0
        """Ids run through prefill passes so far (shared prefixes included, padding not)."""
        self.n_cached_tokens = 0
        """Prompt ids whose KV was copied from the prefix cache instead of prefilled."""
        cache_on = prefix_cache and kv_cache.plain_layers(model.config)  # no sliding windows
        self._prefix = kv_cache.PrefixCache(prefix_cache_bytes) if cache_on else None
        self._weights = 0
        """Bumped by `set_version` and update holds; the prefix cache empties when it moves."""
        self._prefix_weights = 0
        self.n_decode_steps = 0
        """Batched decode forward passes run so far."""

        config = model.config
        embeddings = model.get_input_embeddings().weight
        assert isinstance(embeddings, torch.Tensor)
        self._vocab_size = embeddings.shape[0]
        self._device = embeddings.device
        self._max_positions: int | None = getattr(config, "max_position_embeddings", None)
        pad = getattr(config, "pad_token_id", None)
        self._pad_id = pad if isinstance(pad, int) else 0
        self._seeds = random.Random(seed)
        self._queue: queue.SimpleQueue[object] = queue.SimpleQueue()
        self._outbox: list[_Request] = []
        self._closing = threading.Event()
        self._closed = False

        # Worker-thread state: the running batch, aligned row by row.
        self._waiting: deque[_Request] = deque()
        self._pause: _Pause | None = None
        self._rows: list[_Row] = []
        self._cache: DynamicCache | None = None
        self._mask_B_T: torch.Tensor
        self._pos_B: torch.Tensor
        self._last_B: torch.Tensor
        self._reset_batch()

        self._thread = threading.Thread(target=self._serve, name="turnrl-hf-policy", daemon=True)
        self._thread.start()

    # -- event-loop side ------------------------------------------------------------------

    async def generate(self, prompt_ids: Sequence[int], params: SamplingParams) -> Completion:
        if self._closed:
            raise PolicyError("the policy is closed")
        prompt = list(prompt_ids)
        self._validate(prompt, params)
        loop = asyncio.get_running_loop()
        seed = params.seed if params.seed is not None else self._seeds.getrandbits(63)
        request = _Request(prompt, params, seed, loop, loop.create_future(), time.perf_counter())
        if not self._outbox:
            # Everything submitted during this loop iteration goes to the worker as one group,
            # so concurrent episodes share their prefill.
            loop.call_soon(self._flush)
        self._outbox.append(request)
        try:
            return await request.future
        except asyncio.CancelledError:
            request.cancelled = True
            raise

    @property
    def version(self) -> int:
        """Version of the weights; stamped on each completion at admission (`WeightSync`)."""
        return self.policy_version

    def set_version(self, version: int) -> None:
        """Stamp later completions with `version`. Call only while nothing is generating
        (`begin_update`/`end_update` do it for you)."""
        self.policy_version = version
        # A new version means new weights: KV cached under the old ones must not be reused.
        self._weights += 1

    async def begin_update(self) -> None:
        """`WeightSync`: wait for the rows in flight to finish (requests submitted meanwhile
        queue up), then hold the worker until `end_update`."""
        if self._closed:
            raise PolicyError("the policy is closed")
        if self._update is not None:
            raise RuntimeError("begin_update called twice without end_update")
        loop = asyncio.get_running_loop()
        pause = _Pause(loop, loop.create_future(), threading.Event())
        self._update = pause
        self._flush()
        self._queue.put(pause)
        try:
            await pause.paused
        except BaseException:
            self._update = None
            pause.resume.set()
            raise

    async def end_update(self, version: int) -> None:
        """`WeightSync`: stamp later completions with `version` and let the worker go on."""
        pause, self._update = self._update, None
        if pause is None:
            raise RuntimeError("end_update without begin_update")
        self.set_version(version)
        pause.resume.set()

    @asynccontextmanager
    async def updating_weights(self, version: int | None = None) -> AsyncIterator[None]:
        """Hold generation while the body changes the model's weights in place.

        Waits for the rows in flight to finish (requests submitted meanwhile queue up), then
        runs the body; on a clean exit `version` (when given) becomes the policy version.
        """
        await self.begin_update()
        ok = False
        try:
            yield
            ok = True
        finally:
            await self.end_update(version if ok and version is not None else self.policy_version)

    def close(self) -> None:
        """Stop the worker; requests still pending fail with `PolicyError`. Idempotent. Blocks
        for at most the forward pass in progress (`async with` waits off the loop instead)."""
        self._signal_close()
        if threading.current_thread() is not self._thread:
            self._thread.join()

    async def __aenter__(self) -> HFPolicy:
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self._signal_close()
        await asyncio.to_thread(self._thread.join)

    def _signal_close(self) -> None:
        if self._closed:
            return
        self._closed = True
        self._flush()
        self._closing.set()
        self._queue.put(_WAKE)

    def _flush(self) -> None:
        if self._outbox:
            self._queue.put(self._outbox)
            self._outbox = []

    def _validate(self, prompt: list[int], params: SamplingParams) -> None:
        if not prompt:
            raise ValueError("the prompt is empty")
        if min(prompt) < 0 or max(prompt) >= self._vocab_size:
            raise ValueError(f"prompt ids must lie in [0, {self._vocab_size})")
        if params.temperature < 0:
            raise ValueError("temperature must be >= 0")
        if not 0 < params.top_p <= 1:
            raise ValueError("top_p must lie in (0, 1]")
        if params.max_tokens < 1:
            raise ValueError("max_tokens must be at least 1")
        total = len(prompt) + params.max_tokens
        if self._max_positions is not None and total > self._max_positions:
            raise ValueError(
                f"prompt ({len(prompt)} ids) + max_tokens ({params.max_tokens}) exceeds the "
                f"model's context of {self._max_positions} positions"
            )

    # -- worker thread --------------------------------------------------------------------

    def _serve(self) -> None:
        with torch.inference_mode():
            while not self._closing.is_set():
                idle = not self._rows and not self._waiting and self._pause is None
                self._pull(block=idle)
                if self._closing.is_set():
                    break
                if self._pause is not None:
                    if not self._rows:
                        self._hold(self._pause)
                        self._pause = None
                        continue
                elif self._waiting and len(self._rows) < self.max_batch_size:
                    self._admit()
                if self._rows:
                    self._step()
            self._shutdown()

    def _pull(self, block: bool) -> None:
        """Move queued requests to `_waiting`, stopping at a pause marker."""
        while self._pause is None:
            try:
                item = self._queue.get(block=block)
            except queue.Empty:
                return
            block = False
            if isinstance(item, list):
                self._waiting.extend(item)
            elif isinstance(item, _Pause):
                self._pause = item

    def _hold(self, pause: _Pause) -> None:
        self._weights += 1  # the weights may change while held, with or without a new version
        _settle(pause.loop, pause.paused, None)
        while not pause.resume.wait(0.1):
            if self._closing.is_set():
                return

    def _admit(self) -> None:
        group: list[_Request] = []
        while self._waiting and len(self._rows) + len(group) < self.max_batch_size:
            request = self._waiting.popleft()
            if not request.cancelled:
                group.append(request)
        if not group:
            return
        try:
            self._prefill(group)
        except Exception as exc:
            for request in group:
                _fail(request, exc)

    def _prefill(self, group: list[_Request]) -> None:
        start = time.perf_counter()
        prompts = [r.prompt_ids for r in group]
        tree = self._tree()
        hits = [kv_cache.Hit(0, ())] * len(group)
        if tree is not None:
            shared = kv_cache.shared_prefixes(prompts, tree)
            if shared:
                cache, _, _ = self._forward(shared, [tree.lookup(p, len(p)) for p in shared])
                for i, prefix in enumerate(shared):
                    tree.insert_row(prefix, cache, i)
            # At least the last id is prefilled: its logits pick the first sampled id.
            hits = [tree.lookup(p, len(p) - 1) for p in prompts]
        cache, mask_N_T, logits_N_V = self._forward(prompts, hits)
        self.n_cached_tokens += sum(h.length for h in hits)
        if tree is not None:
            for i, prompt in enumerate(prompts):
                tree.insert_row(prompt, cache, i)
        batch_size = len(self._rows) + len(group)
        rows = [
            _Row(
                request=r,
                rng=random.Random(r.seed),
                version=self.policy_version,
                admitted=start,
                batch_size=batch_size,
                cached=h.length,
                weights=self._weights,
            )
            for r, h in zip(group, hits, strict=True)
        ]
        tokens_N = self._sample(logits_N_V, rows)
        done = time.perf_counter()
        for row in rows:
            row.prefill_s = done - start
            row.prefilled = done
        pos_N = torch.tensor([len(p) for p in prompts], device=self._device)
        if self._cache is None or not self._rows:
            self._cache, self._mask_B_T = cache, mask_N_T
            self._pos_B, self._last_B = pos_N, tokens_N
        else:  # into the running batch, the narrower side left-padded
            self._mask_B_T = kv_cache.append_rows(self._cache, self._mask_B_T, cache, mask_N_T)
            self._pos_B = torch.cat([self._pos_B, pos_N])
            self._last_B = torch.cat([self._last_B, tokens_N])
        self._rows.extend(rows)
        self._retire()

    def _forward(
        self, prompts: list[list[int]], hits: list[kv_cache.Hit]
    ) -> tuple[DynamicCache, torch.Tensor, torch.Tensor]:
        tree, pad, kwarg = self._prefix, self._pad_id, self._cache_kwarg
        with self._autocast():
            out = kv_cache.prefill(self.model, prompts, hits, tree, pad_id=pad, cache_kwarg=kwarg)
        self.n_prefills += 1
        self.n_prefill_tokens += sum(len(p) for p in prompts) - sum(h.length for h in hits)
        return out

    def _autocast(self) -> contextlib.AbstractContextManager[object]:
        if self._autocast_dtype is None:
            return contextlib.nullcontext()
        return torch.autocast(device_type=self._device.type, dtype=self._autocast_dtype)

    def _tree(self) -> kv_cache.PrefixCache | None:
        """The prefix cache, emptied first if the weights changed since it was filled."""
        if self._prefix is not None and self._prefix_weights != self._weights:
            self._prefix.clear()
            self._prefix_weights = self._weights
        return self._prefix

    def _step(self) -> None:
        try:
            n = len(self._rows)
            mask_B_T = torch.cat(
                [self._mask_B_T, torch.ones(n, 1, dtype=torch.long, device=self._device)], dim=1
            )
            with self._autocast():
                out = self.model(
                    input_ids=self._last_B[:, None],
                    attention_mask=mask_B_T,
                    position_ids=self._pos_B[:, None],
                    use_cache=True,
                    **{self._cache_kwarg: self._cache},
                )
            self.n_decode_steps += 1
            self._mask_B_T = mask_B_T
            self._pos_B = self._pos_B + 1
            self._last_B = self._sample(out.logits[:, -1, :], self._rows)
            self._retire()
        except Exception as exc:
            rows, self._rows = self._rows, []
            self._reset_batch()
            for row in rows:
                _fail(row.request, exc)

    def _sample(self, logits_B_V: torch.Tensor, rows: list[_Row]) -> torch.Tensor:
        """Pick one id per row, append it and its logprob to the row, and return the ids."""
        temps = [r.request.params.temperature for r in rows]
        # One uniform per sampled row from the row's own generator (`sample_rows`).
        uniforms = [r.rng.random() for r, t in zip(rows, temps, strict=True) if t > 0]
        top_ps = [r.request.params.top_p for r in rows]
        tokens_B, chosen_B = sample_rows(logits_B_V, temps, top_ps, uniforms)
        for row, token, logprob in zip(rows, tokens_B.tolist(), chosen_B.tolist(), strict=True):
            row.ids.append(token)
            row.logprobs.append(logprob)
            row.finish = self._finish(row)
        return tokens_B

    def _finish(self, row: _Row) -> FinishReason | None:
        params = row.request.params
        token = row.ids[-1]
        if token in self.end_token_ids or token in params.stop_token_ids:
            return "stop"
        # The whole completion is decoded because a token can complete a stop string and carry
        # text past it, and decoding depends on neighbouring ids (multi-byte characters).
        if params.stop:
            text = self.tokenizer.decode(row.ids)
            if any(s in text for s in params.stop):
                return "stop"
        if len(row.ids) >= params.max_tokens:
            return "length"
        return None

    def _retire(self) -> None:
        """Deliver finished rows and drop them (and cancelled ones) from the batch."""
        keep: list[int] = []
        now = time.perf_counter()
        for i, row in enumerate(self._rows):
            if row.request.cancelled:
                continue
            if row.finish is None:
                keep.append(i)
                continue
            request = row.request
            tree = self._tree()
            if tree is not None and row.weights == self._weights and self._cache is not None:
                tree.insert_row(request.prompt_ids + row.ids[:-1], self._cache, i)
            completion = Completion(
                token_ids=tuple(row.ids),
                logprobs=tuple(row.logprobs),
                finish_reason=row.finish,
                policy_version=row.version,
                metrics={
                    "queue_s": row.admitted - request.submitted,
                    "prefill_s": row.prefill_s,
                    "decode_s": now - row.prefilled,
                    "batch_size": float(row.batch_size),
                    "cached_ids": float(row.cached),
                },
            )
            _settle(request.loop, request.future, completion)
        if len(keep) == len(self._rows):
            return
        self._rows = [self._rows[i] for i in keep]
        if not self._rows:
            self._reset_batch()
            return
        index = torch.tensor(keep, device=self._device)
        assert self._cache is not None
        self._mask_B_T = kv_cache.take_rows(self._cache, self._mask_B_T, index)
        self._pos_B = self._pos_B[index]
        self._last_B = self._last_B[index]

    def _reset_batch(self) -> None:
        self._cache = None
        self._mask_B_T = torch.zeros(0, 0, dtype=torch.long, device=self._device)
        self._pos_B = torch.zeros(0, dtype=torch.long, device=self._device)
        self._last_B = torch.zeros(0, dtype=torch.long, device=self._device)

    def _shutdown(self) -> None:
        if self._prefix is not None:
            self._prefix.clear()
        closed = PolicyError("the policy is closed")
        for row in self._rows:
            _fail(row.request, closed)
        self._rows = []
        self._reset_batch()
        while True:
            try:
                item = self._queue.get_nowait()
            except queue.Empty:
                break
            if isinstance(item, list):
                self._waiting.extend(item)
            elif isinstance(item, _Pause):
                _settle(item.loop, item.paused, None, PolicyError(*closed.args))
        while self._waiting:
            _fail(self._waiting.popleft(), closed)
        if self._pause is not None:
            _settle(self._pause.loop, self._pause.paused, None, PolicyError(*closed.args))


def _fail(request: _Request, exc: BaseException) -> None:
    # A fresh error per request: one exception object raised in many tasks would share (and
    # grow) one traceback.
    if isinstance(exc, PolicyError):
        error = PolicyError(*exc.args)
    else:
        error = PolicyError(f"generation failed: {exc!r}")
        error.__cause__ = exc
    _settle(request.loop, request.future, None, error)


def _settle(
    loop: asyncio.AbstractEventLoop,
    future: asyncio.Future[Any],
    result: Any,
    error: BaseException | None = None,
) -> None:
    def settle() -> None:
        if future.done():
            return
        if error is not None:
            future.set_exception(error)
        else:
            future.set_result(result)

    # A closed loop raises RuntimeError: nobody is waiting for the result any more.
    with contextlib.suppress(RuntimeError):
        loop.call_soon_threadsafe(settle)
