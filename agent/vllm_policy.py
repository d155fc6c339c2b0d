"""`VLLMPolicy`: a `Policy` served by a vLLM OpenAI-compatible server, with weight sync.

One `generate` is one `POST /v1/completions` with the prompt as token ids, asking for the
sampled ids (`return_token_ids`) and each one's logprob (`logprobs: 0`, tokens named
`token_id:<id>` by `return_tokens_as_token_ids`). Prompts are the runner's append-only
contexts, so the server's prefix cache hits across an episode's turns. Sampling is pinned to
what `HFPolicy` does (no top-k, min-p or penalties): a server otherwise fills unset fields from
the model's `generation_config.json`.

The response is checked before it becomes a `Completion`: one choice, the prompt echoed back
as sent, ids that are ints (in the vocabulary when its size is given), exactly one finite,
non-positive logprob per id, tokens naming the same ids, a finish reason of `stop` or `length`,
no more ids than `max_tokens`. Anything else, an HTTP error status, a timeout or a dead
server raises a `PolicyError` subclass (the runner ends that episode with `POLICY_ERROR`).
Nothing is retried after its bytes were written (`turnrl.agent.http`): a turn is sampled at
most once.

Logprob convention (`turnrl.agent.policy`): under softmax(logits / temperature), before top-p.
vLLM returns `raw_logprobs` (temperature ignored) unless started with `--logprobs-mode
processed_logprobs` (temperature and top-p applied). `logprobs_mode` says which the server
runs; a request that mode cannot score by the convention is refused with `ValueError`
(raw: temperature other than 0 or 1; processed: top_p < 1).

Weights (`WeightSync`). `begin_update` stops new requests (they wait in `generate`) and
returns once the requests in flight have finished: they finish on the old weights and are
stamped with the old version. `load_checkpoint(folder, version)` then pushes the weights:

- `reload` (full weights, an untied safetensors checkpoint): `POST /pause` →
  `POST /collective_rpc {"method": "reload_weights", "kwargs": {"weights_path": folder}}` →
  `POST /reset_prefix_cache` → `POST /resume` (the server needs `VLLM_SERVER_DEV_MODE=1`).
  `/resume` is sent even when a step before it failed (a `/pause` that timed out or lost its
  connection included: the server may have acted on it; not one it refused); after a failure
  past `/pause` the server's weights are unknown, and `generate` raises until a later load
  succeeds.
- `lora`: `POST /v1/load_lora_adapter {"lora_name": "turnrl-v<version>", "lora_path":
  folder}` (the server needs `--enable-lora` and `VLLM_ALLOW_RUNTIME_LORA_UPDATING=True`);
  requests name that adapter as their `model` from `end_update(version)` on, and adapters no
  longer in use are unloaded at the next load.

A sync never hangs silently: every call is bounded by `sync_timeout_s`, and a call that fails
or times out raises `WeightSyncError` naming the version, the call and why (after a failed
full reload, only the bounded `/resume` runs before it is raised). Nothing is retried: a sync
that failed is a fault a person must look at (TRL #6797/#7103 and slime #1484 are runs that
hung instead).

`end_update(version)` stamps later completions with `version` and lets waiting requests go.
`update_weights(folder, version)` does all three. Every completion therefore comes from
exactly one `policy_version`, and the ids trained on are the ids the server sent.
"""

from __future__ import annotations

import asyncio
import json
import math
import os
import random
import time
from collections.abc import Sequence
from types import TracebackType
from typing import Any, Literal
from urllib.parse import urlsplit

from turnrl.agent.http import (
    HTTPClient,
    HTTPConnectionError,
    HTTPError,
    HTTPMalformedError,
    HTTPStatusError,
    HTTPTimeoutError,
)
from turnrl.agent.policy import Completion, PolicyError, SamplingParams

LogprobsMode = Literal["raw_logprobs", "processed_logprobs"]
WeightSyncMode = Literal["reload", "lora"]

LOGPROB_SLACK = 1e-4
"""Largest positive logprob accepted (float rounding of a probability of 1)."""


class PolicyTimeoutError(PolicyError):
    """The server did not answer within the request's timeout."""


class PolicyUnavailableError(PolicyError):
    """The server could not be reached, or the connection was lost mid-response."""


class PolicyStatusError(PolicyError):
    """The server answered with an error status (`status` is the code)."""

    def __init__(self, message: str, status: int) -> None:
        super().__init__(message)
        self.status = status


class PolicyResponseError(PolicyError):
    """The server's response was malformed or inconsistent with the request."""


class WeightSyncError(PolicyError):
    """A weight-sync call failed."""


class _SyncRefused(WeightSyncError):
    """A weight-sync call the server answered with an error status (it did not act on it)."""


class VLLMPolicy:
    """Implements `Policy` and `WeightSync` against a vLLM server (module docstring)."""

    def __init__(
        self,
        url: str,
        model: str,
        *,
        weight_sync: WeightSyncMode = "reload",
        logprobs_mode: LogprobsMode = "raw_logprobs",
        vocab_size: int | None = None,
        max_model_len: int | None = None,
        end_token_ids: Sequence[int] = (),
        seed: int | None = None,
        policy_version: int = 0,
        timeout_s: float = 600.0,
        sync_timeout_s: float = 600.0,
        max_connections: int = 64,
    ) -> None:
        """`url`: the server's base, `http://host:port`. `model`: its served model name.
        `vocab_size` and `max_model_len`, when given, check prompts before sending and ids
        on return. `end_token_ids` end every request on top of its `stop_token_ids` (the
        server adds its end-of-sequence id itself). `seed` seeds the per-request seeds of
        requests that bring none. `timeout_s` bounds each completion request (pool wait
        included), `sync_timeout_s` each weight-sync call (and `health`)."""
        if timeout_s <= 0 or sync_timeout_s <= 0:
            raise ValueError("timeout_s and sync_timeout_s must be positive")
        parts = urlsplit(url)
        if parts.scheme != "http" or not parts.hostname:
            raise ValueError(f"url must be http://host:port, got {url!r}")
        if parts.path not in ("", "/"):
            raise ValueError(f"url must not carry a path, got {url!r}")
        self.url = url
        self.model = model
        self.weight_sync: WeightSyncMode = weight_sync
        self.logprobs_mode: LogprobsMode = logprobs_mode
        self.vocab_size = vocab_size
        self.max_model_len = max_model_len
        self.end_token_ids = tuple(end_token_ids)
        self.timeout_s = timeout_s
        self.sync_timeout_s = sync_timeout_s
        self.policy_version = policy_version
        """Version stamped on completions admitted from now on."""
        self.http = HTTPClient(
            parts.hostname, parts.port or 80, max_connections=max_connections, timeout_s=timeout_s
        )
        self._seeds = random.Random(seed)
        self._serving = model
        """The `model` field of requests: the base model, or the live LoRA adapter."""
        self._adapters: dict[str, str] = {}
        """LoRA adapters loaded on the server: name -> folder."""
        self._pending: tuple[int, str | None] | None = None
        """(version, adapter or None for a full reload) pushed by `load_checkpoint`, live from
        `end_update(version)`."""
        self._unknown_weights: str | None = None
        """Why the server's weights are unknown (a failed full reload); None when known."""
        self._held: asyncio.Event | None = None
        """Set by `end_update`; present while an update holds new requests."""
        self._in_flight = 0
        self._drained: asyncio.Event | None = None
        self._closed = False

    # -- Policy ---------------------------------------------------------------------------

    async def generate(self, prompt_ids: Sequence[int], params: SamplingParams) -> Completion:
        if self._closed:
            raise PolicyError("the policy is closed")
        prompt = list(prompt_ids)
        self._validate(prompt, params)
        while self._held is not None:
            await self._held.wait()
        if self._closed:
            raise PolicyError("the policy is closed")
        if self._unknown_weights is not None:
            raise PolicyError(self._unknown_weights)
        # Counted from here to the end, with no await between the hold check and the count:
        # `begin_update` waits for exactly these requests.
        self._in_flight += 1
        version = self.policy_version
        try:
            payload = self._payload(prompt, params)
            start = time.perf_counter()
            try:
                body = await self.http.post_json("/v1/completions", payload)
            except HTTPError as e:
                raise _policy_error("completion", e) from None
            elapsed = time.perf_counter() - start
            return _completion(body, prompt, params, version, self.vocab_size, elapsed)
        finally:
            self._in_flight -= 1
            if self._in_flight == 0 and self._drained is not None:
                self._drained.set()

    def _payload(self, prompt: list[int], params: SamplingParams) -> dict[str, Any]:
        stops = list(params.stop_token_ids)
        stops += [i for i in self.end_token_ids if i not in stops]
        payload: dict[str, Any] = {
            "model": self._serving,
            "prompt": prompt,
            "max_tokens": params.max_tokens,
            "temperature": params.temperature,
            "top_p": params.top_p,
            "top_k": 0,
            "min_p": 0.0,
            "repetition_penalty": 1.0,
            "presence_penalty": 0.0,
            "frequency_penalty": 0.0,
            "seed": params.seed if params.seed is not None else self._seeds.getrandbits(63),
            "stop_token_ids": stops,
            "logprobs": 0,
            "return_token_ids": True,
            "return_tokens_as_token_ids": True,
            "skip_special_tokens": False,
        }
        if params.stop:
            # The id that completes a stop string is kept, as `HFPolicy` keeps it.
            payload["stop"] = list(params.stop)
            payload["include_stop_str_in_output"] = True
        return payload

    def _validate(self, prompt: list[int], params: SamplingParams) -> None:
        if not prompt:
            raise ValueError("the prompt is empty")
        if min(prompt) < 0 or (self.vocab_size is not None and max(prompt) >= self.vocab_size):
            raise ValueError(f"prompt ids must lie in [0, {self.vocab_size})")
        if params.temperature < 0:
            raise ValueError("temperature must be >= 0")
        if not 0 < params.top_p <= 1:
            raise ValueError("top_p must lie in (0, 1]")
        if params.max_tokens < 1:
            raise ValueError("max_tokens must be at least 1")
        if self.max_model_len is not None and len(prompt) + params.max_tokens > self.max_model_len:
            raise ValueError(
                f"prompt ({len(prompt)} ids) + max_tokens ({params.max_tokens}) exceeds the "
                f"server's context of {self.max_model_len} positions"
            )
        if self.logprobs_mode == "raw_logprobs" and params.temperature not in (0, 1):
            raise ValueError(
                "the server returns raw logprobs (temperature 1): sampling at temperature "
                f"{params.temperature} needs a server started with --logprobs-mode "
                "processed_logprobs"
            )
        if self.logprobs_mode == "processed_logprobs" and params.top_p < 1:
            raise ValueError("processed logprobs apply top-p truncation: use top_p = 1")

    # -- WeightSync -----------------------------------------------------------------------

    @property
    def version(self) -> int:
        """Version of the weights later completions are sampled with."""
        return self.policy_version

    async def begin_update(self) -> None:
        """Hold new requests, then wait for the ones in flight to finish on the old weights
        (each is bounded by `timeout_s`)."""
        if self._closed:
            raise PolicyError("the policy is closed")
        if self._held is not None:
            raise RuntimeError("begin_update called twice without end_update")
        self._held = asyncio.Event()
        self._pending = None
        try:
            while self._in_flight:
                self._drained = asyncio.Event()
                await self._drained.wait()
        except BaseException:
            self._release()
            raise
        finally:
            self._drained = None

    async def end_update(self, version: int) -> None:
        """Stamp later completions with `version` (and send them to the adapter loaded for it,
        in `lora` mode); let held requests go. Called after a failed update too, with the
        version that is still current. Any other version than that or the one loaded raises
        `ValueError` and lifts the hold: after a LoRA load requests go on under the version
        they had; after a full reload they fail until a later load succeeds."""
        if self._held is None:
            raise RuntimeError("end_update without begin_update")
        loaded, self._pending = self._pending, None
        if loaded is not None and version not in (loaded[0], self.policy_version):
            # The weights in place are version loaded[0]: any other stamp would mislabel them.
            # A full reload has already replaced the old weights: nothing can be sampled.
            if loaded[1] is None:
                self._unknown_weights = f"version {loaded[0]} was loaded, {version} announced"
            self._release()
            raise ValueError(f"end_update({version}) after loading version {loaded[0]}")
        if loaded is not None and loaded[0] == version and loaded[1] is not None:
            self._serving = loaded[1]
        self.policy_version = version
        self._release()

    async def load_checkpoint(self, folder: str | os.PathLike[str], version: int) -> None:
        """Push the checkpoint in `folder` (a path the server can read) to the server, between
        `begin_update` and `end_update(version)`. Raises `WeightSyncError` naming the version,
        the call and the cause on failure, within `sync_timeout_s` per call made."""
        if self._held is None:
            raise RuntimeError("load_checkpoint must run between begin_update and end_update")
        path = os.fspath(folder)
        try:
            if self.weight_sync == "lora":
                await self._load_lora(path, version)
            else:
                await self._reload(path)
                self._pending = (version, None)
        except WeightSyncError as e:
            raise WeightSyncError(
                f"weight sync ({self.weight_sync}) of version {version} from {path} failed: {e}"
            ) from None

    async def update_weights(self, folder: str | os.PathLike[str], version: int) -> None:
        """`begin_update`, `load_checkpoint(folder, version)`, `end_update`: on failure the
        version stays as it was and the error is raised."""
        await self.begin_update()
        ok = False
        try:
            await self.load_checkpoint(folder, version)
            ok = True
        finally:
            await self.end_update(version if ok else self.policy_version)

    async def _reload(self, path: str) -> None:
        try:
            await self._call("/pause")
        except _SyncRefused:
            raise  # the server said no: it is not paused
        except BaseException as e:
            await self._resume_after(e)  # timed out or lost: it may have paused all the same
            raise
        self._unknown_weights = f"a full reload from {path!r} failed: the weights are unknown"
        try:
            await self._call(
                "/collective_rpc",
                {"method": "reload_weights", "kwargs": {"weights_path": path}},
            )
            await self._call("/reset_prefix_cache")
        except BaseException as e:
            await self._resume_after(e)
            raise
        await self._call("/resume")
        self._unknown_weights = None

    async def _resume_after(self, error: BaseException) -> None:
        """`/resume` after a failed step of a reload: a paused server that is never resumed
        hangs every later request. The first failure is the one reported; when `/resume`
        fails too, one error names both."""
        try:
            await self._call("/resume")
        except WeightSyncError as again:
            if isinstance(error, WeightSyncError):
                raise WeightSyncError(
                    f"{error}; then {again} (the server may still be paused)"
                ) from None

    async def _load_lora(self, path: str, version: int) -> None:
        # Adapters that no request will name again: nothing is in flight during an update.
        for name in [n for n in self._adapters if n != self._serving]:
            await self._call("/v1/unload_lora_adapter", {"lora_name": name})
            del self._adapters[name]
        name = f"turnrl-v{version}"
        if name == self._serving:
            raise WeightSyncError(f"adapter {name} is live: a new version needs a new number")
        await self._call("/v1/load_lora_adapter", {"lora_name": name, "lora_path": path})
        self._adapters[name] = path
        self._pending = (version, name)

    async def _call(self, path: str, payload: dict[str, Any] | None = None) -> None:
        try:
            response = await self.http.request(
                "POST",
                path,
                b"" if payload is None else _dumps(payload),
                timeout_s=self.sync_timeout_s,
                idempotent=True,  # pausing, reloading the same folder, resuming: safe twice
            )
        except HTTPTimeoutError:
            raise WeightSyncError(
                f"POST {path}: no response within {self.sync_timeout_s:g} s (sync_timeout_s)"
            ) from None
        except HTTPError as e:
            text = str(e).removeprefix(f"POST {path}: ")
            raise WeightSyncError(f"POST {path}: {text}") from None
        if not 200 <= response.status < 300:
            text = response.body[:2000].decode("utf-8", "replace")
            raise _SyncRefused(f"POST {path}: HTTP {response.status}: {text}")

    def _release(self) -> None:
        held, self._held = self._held, None
        if held is not None:
            held.set()

    # -- lifecycle ------------------------------------------------------------------------

    async def health(self) -> bool:
        """Whether the server answers `GET /health` with 200 (within `sync_timeout_s`)."""
        try:
            response = await self.http.request("GET", "/health", timeout_s=self.sync_timeout_s)
        except HTTPError:
            return False
        return response.status == 200

    def close(self) -> None:
        """Close the connections; requests in progress fail with `PolicyError`, held ones
        too. Idempotent."""
        self._closed = True
        self.http.close()
        self._release()

    async def __aenter__(self) -> VLLMPolicy:
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self._closed = True
        self._release()
        await self.http.__aexit__(exc_type, exc, tb)


def _dumps(payload: dict[str, Any]) -> bytes:
    return json.dumps(payload, separators=(",", ":")).encode()


def _policy_error(what: str, e: HTTPError) -> PolicyError:
    if isinstance(e, HTTPTimeoutError):
        return PolicyTimeoutError(f"{what}: {e}")
    if isinstance(e, HTTPStatusError):
        return PolicyStatusError(f"{what}: {e}", e.status)
    if isinstance(e, HTTPMalformedError):
        return PolicyResponseError(f"{what}: {e}")
    if isinstance(e, HTTPConnectionError):
        return PolicyUnavailableError(f"{what}: {e}")
    return PolicyError(f"{what}: {e}")


def _completion(
    body: Any,
    prompt: list[int],
    params: SamplingParams,
    version: int,
    vocab_size: int | None,
    elapsed: float,
) -> Completion:
    """The `Completion` in a `/v1/completions` response, or `PolicyResponseError`."""

    def bad(why: str) -> PolicyResponseError:
        return PolicyResponseError(f"completion: malformed response: {why}")

    choices = body.get("choices") if isinstance(body, dict) else None
    if not isinstance(choices, list) or len(choices) != 1 or not isinstance(choices[0], dict):
        raise bad("expected exactly one choice")
    choice = choices[0]
    echoed = choice.get("prompt_token_ids")
    if echoed is not None and echoed != prompt:
        raise bad("the prompt ids it echoes differ from the ids sent")
    ids = choice.get("token_ids")
    if not isinstance(ids, list) or not ids:
        raise bad("no token_ids (is return_token_ids supported?)")
    if any(type(i) is not int for i in ids):
        raise bad("token_ids are not all ints")
    if min(ids) < 0 or (vocab_size is not None and max(ids) >= vocab_size):
        raise bad(f"token ids outside the vocabulary [0, {vocab_size})")
    if len(ids) > params.max_tokens:
        raise bad(f"{len(ids)} ids for max_tokens {params.max_tokens}")
    finish = choice.get("finish_reason")
    if finish != "stop" and finish != "length":
        raise bad(f"finish_reason {finish!r}")
    lp = choice.get("logprobs")
    logprobs = lp.get("token_logprobs") if isinstance(lp, dict) else None
    if not isinstance(logprobs, list) or len(logprobs) != len(ids):
        n = len(logprobs) if isinstance(logprobs, list) else None
        raise bad(f"{n} logprobs for {len(ids)} ids")
    values: list[float] = []
    for x in logprobs:
        if type(x) is not float and type(x) is not int:
            raise bad(f"logprob {x!r} is not a number")
        if not math.isfinite(x) or x > LOGPROB_SLACK:
            raise bad(f"logprob {x!r} is not a finite log-probability")
        values.append(float(x))
    tokens = lp.get("tokens") if isinstance(lp, dict) else None
    # Cross-checked when the server names tokens by id (`return_tokens_as_token_ids`).
    if isinstance(tokens, list) and tokens and str(tokens[0]).startswith("token_id:"):
        if len(tokens) != len(ids):
            raise bad("logprobs.tokens does not match token_ids")
        for token, i in zip(tokens, ids, strict=True):
            if token != f"token_id:{i}":
                raise bad(f"logprobs.tokens names {token!r} where token_ids has {i}")
    return Completion(
        token_ids=tuple(ids),
        logprobs=tuple(values),
        finish_reason=finish,
        policy_version=version,
        metrics={"request_s": elapsed},
    )
