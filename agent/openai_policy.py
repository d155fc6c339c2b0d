"""`OpenAIPolicy`: a `Policy` served by any OpenAI-compatible chat-completions endpoint, for
evaluation (`model.kind: openai`).

One `generate` is one `POST {base}/chat/completions`: the context ids become chat messages
with the tools declared natively (`turnrl.agent.openai_chat`), the reply's content and native
`tool_calls` become completion text in turnrl's call syntax, encoded with the local tokenizer
(plain text: a reply cannot forge a role marker) and closed with the end-of-turn id. Those ids
were not sampled by any model of this run and the API gives no logprobs for them: the
completion carries placeholder logprobs (0.0), and its turn is marked with the provider's
usage (`Turn.api_usage`), which keeps it out of training. A reply longer than `max_tokens` in
local ids is cut there (`finish_reason: length`), as a local model's would be, so the context
budget means the same thing for every policy.

Cost: each reply's `usage` (the provider's own counts: prompt, cached prompt, completion
tokens) is priced with `ApiPrice` and recorded in a `Ledger` keyed by the exact ids of the
request and the completion. The runner does not carry a completion's metrics into its turn,
so after a rollout `Ledger.charge` finds each turn's entry by the same ids and writes it into
the turn (`api_usage`) and the episode (`Episode.cost`: `model_usd`, `model_input_tokens`,
`model_cached_input_tokens`, `model_output_tokens`). A reply that never became a turn (the
episode's wall clock ran out during its tool calls) is still charged to its episode.

Faults. Every request has a timeout. What is resent, and why that is safe: a request is resent
only when **no reply was received** — a 429 (after its `retry-after`, in seconds, milliseconds
or an HTTP date, when it asks for at most `max_wait_s`), a 5xx, or a connection that failed or
closed before a response — with exponential backoff and jitter, at most `max_retries` times.
Since the client never read a reply, the turn it finally records is the only reply it ever saw:
nothing is sampled twice from the run's point of view, and no reply is chosen among several. A
provider may still have billed a request whose reply was lost; the dollar figures count the
replies received. A timeout is not resent (the provider may still be generating, and billing,
the first request; and a second wait would double the worst case). Anything else — another
4xx, a body that is not JSON, a reply missing the fields read — raises a typed `PolicyError`
at once; the runner ends that episode with `StopReason.POLICY_ERROR` and the error's class and
text in `Episode.error`, and the other episodes go on. The API key never appears in an error
text (a 401/403 body is not quoted, and the key is scrubbed from every message).
"""

from __future__ import annotations

import asyncio
import email.utils
import json
import random
import ssl
import time
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass
from types import TracebackType
from typing import Any
from urllib.parse import urlsplit

from pydantic import ValidationError

from turnrl.agent.chat import ChatML, Renderer
from turnrl.agent.http import (
    HTTPClient,
    HTTPConnectionError,
    HTTPError,
    HTTPMalformedError,
    HTTPTimeoutError,
    Response,
)
from turnrl.agent.model_config import OpenAIModel
from turnrl.agent.openai_chat import ChatResponse, ChatTranslator, ContextError
from turnrl.agent.policy import Completion, PolicyError, SamplingParams
from turnrl.agent.records import ApiUsage, Episode
from turnrl.agent.vllm_policy import (
    PolicyResponseError,
    PolicyStatusError,
    PolicyTimeoutError,
    PolicyUnavailableError,
)

COST_KINDS = (
    "model_usd",
    "model_input_tokens",
    "model_cached_input_tokens",
    "model_output_tokens",
)
"""The `Episode.cost` kinds an API model's usage adds (dollars, and the provider's counts)."""


class PolicyRateLimitError(PolicyStatusError):
    """The provider kept answering 429 (or asked to wait longer than allowed)."""


Sleep = Callable[[float], Awaitable[None]]


class Ledger:
    """The usage of every reply received, until a rollout's episodes are charged with it."""

    def __init__(self) -> None:
        self._by_reply: dict[int, list[ApiUsage]] = {}
        """hash(context + completion ids) -> usages (equal contexts and replies share a key)."""
        self._by_context: dict[int, list[int]] = {}
        """hash(context ids) -> the reply keys sent from it (to charge a reply no turn holds)."""

    def record(self, context: Sequence[int], completion: Sequence[int], usage: ApiUsage) -> None:
        reply = hash((*context, *completion))
        self._by_reply.setdefault(reply, []).append(usage)
        self._by_context.setdefault(hash(tuple(context)), []).append(reply)

    def _take(self, reply: int, context: int) -> ApiUsage | None:
        usages = self._by_reply.get(reply)
        if not usages:
            return None
        usage = usages.pop()
        if not usages:
            del self._by_reply[reply]
        replies = self._by_context.get(context, [])
        if reply in replies:
            replies.remove(reply)
            if not replies:
                del self._by_context[context]
        return usage

    def charge(self, episode: Episode) -> Episode:
        """`episode` with each turn's `api_usage` and the episode's model costs filled in.
        A turn with no entry is a bug (the ids of a turn are the ids of its request and reply):
        `RuntimeError`."""
        context: list[int] = []
        turns = []
        usages: list[ApiUsage] = []
        for turn in episode.turns:
            context += turn.prompt_ids
            if not turn.replayed:
                key = hash(tuple(context))
                usage = self._take(hash((*context, *turn.completion_ids)), key)
                if usage is None:
                    raise RuntimeError(
                        f"episode {episode.episode_id} turn {turn.index}: no API reply was "
                        "recorded for its ids"
                    )
                usages.append(usage)
                turn = turn.model_copy(update={"api_usage": usage})
            turns.append(turn)
            context += turn.completion_ids
            context += turn.observation_ids
        # A reply received for the final context that no turn holds (cut off by the clock).
        final = hash(tuple(context))
        for reply in list(self._by_context.get(final, [])):
            orphan = self._take(reply, final)
            if orphan is not None:
                usages.append(orphan)
        cost = dict(episode.cost)
        for kind, amount in zip(COST_KINDS, _totals(usages), strict=True):
            cost[kind] = cost.get(kind, 0.0) + amount
        return episode.model_copy(update={"turns": turns, "cost": cost})

    def __len__(self) -> int:
        """Replies recorded and not charged yet."""
        return sum(len(v) for v in self._by_reply.values())


def _totals(usages: Sequence[ApiUsage]) -> tuple[float, float, float, float]:
    return (
        sum(u.cost_usd for u in usages),
        float(sum(u.input_tokens for u in usages)),
        float(sum(u.cached_input_tokens for u in usages)),
        float(sum(u.output_tokens for u in usages)),
    )


@dataclass(frozen=True)
class _Attempt:
    """Why one attempt got no usable reply, and whether (after how long) to resend."""

    error: PolicyError
    wait_s: float | None
    """Seconds to wait before resending; None: do not resend."""


class OpenAIPolicy:
    """Implements `Policy` over an OpenAI-compatible chat endpoint (module docstring)."""

    def __init__(
        self,
        cfg: OpenAIModel,
        renderer: Renderer,
        api_key: str | None,
        *,
        seed: int = 0,
        sleep: Sleep = asyncio.sleep,
        tls: ssl.SSLContext | None = None,
    ) -> None:
        """`tls`: the context of an `https` endpoint (default: the system's trusted CAs);
        `sleep`: how waits before a resend are taken (tests record them)."""
        parts = urlsplit(cfg.base_url)
        if parts.scheme not in ("http", "https") or not parts.hostname:
            raise ValueError(f"model.base_url {cfg.base_url!r} is not an http(s) URL")
        if not isinstance(renderer, ChatML):
            raise ValueError("an API model's turns are rendered with ChatML (chat: chatml)")
        self.cfg = cfg
        self.renderer = renderer
        self.translator = ChatTranslator(renderer)
        self.ledger = Ledger()
        self.policy_version = 0
        self.path = parts.path.rstrip("/") + "/chat/completions"
        tls = (tls or ssl.create_default_context()) if parts.scheme == "https" else None
        self._key = api_key or None
        headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
        self.http = HTTPClient(
            parts.hostname,
            parts.port or (443 if tls is not None else 80),
            max_connections=cfg.max_connections,
            timeout_s=cfg.request_timeout_s,
            ssl=tls,
            headers=headers,
        )
        self._sleep = sleep
        self._jitter = random.Random(seed)
        self._closed = False
        self.n_requests = 0
        """Requests sent, resends included."""

    @property
    def version(self) -> int:
        return self.policy_version

    async def begin_update(self) -> None:
        """`WeightSync`: an API model has no weights here; nothing to hold."""

    async def end_update(self, version: int) -> None:
        """`WeightSync`: nothing changes (training refuses API models)."""

    async def generate(self, prompt_ids: Sequence[int], params: SamplingParams) -> Completion:
        if self._closed:
            raise PolicyError("the policy is closed")
        if params.max_tokens < 1:
            raise ValueError("max_tokens must be at least 1")
        context = list(prompt_ids)
        try:
            conversation = self.translator.conversation(context)
        except ContextError as e:
            raise PolicyError(f"cannot translate the context into chat messages: {e}") from None
        payload: dict[str, Any] = {
            "model": self.cfg.model,
            "messages": [m.model_dump(exclude_none=True) for m in conversation.messages],
            self.cfg.token_limit_field: params.max_tokens,
        }
        if conversation.tools:
            payload["tools"] = conversation.tools
        if self.cfg.send_temperature:
            payload["temperature"] = params.temperature
            if params.top_p < 1:
                payload["top_p"] = params.top_p
        if params.seed is not None:
            payload["seed"] = params.seed
        if params.stop:
            payload["stop"] = list(params.stop)
        body = json.dumps(payload, ensure_ascii=False, separators=(",", ":")).encode()
        start = time.perf_counter()
        reply, retries = await self._post(body)
        elapsed = time.perf_counter() - start
        return self._completion(context, reply, params, retries, elapsed)

    async def _post(self, body: bytes) -> tuple[ChatResponse, int]:
        """The parsed reply, and how many resends it took."""
        for attempt in range(self.cfg.max_retries + 1):
            outcome = await self._attempt(body, attempt)
            if isinstance(outcome, ChatResponse):
                return outcome, attempt
            if outcome.wait_s is None or attempt == self.cfg.max_retries:
                raise outcome.error
            await self._sleep(outcome.wait_s)
        raise AssertionError("unreachable")  # the loop returns or raises

    async def _attempt(self, body: bytes, attempt: int) -> ChatResponse | _Attempt:
        self.n_requests += 1
        what = f"POST {self.path}"
        try:
            response = await self.http.request("POST", self.path, body, idempotent=False)
        except HTTPTimeoutError as e:
            return _Attempt(PolicyTimeoutError(self._scrub(f"{e}")), None)
        except HTTPConnectionError as e:
            # No response was read: resending cannot make the run see two replies.
            return _Attempt(PolicyUnavailableError(self._scrub(f"{e}")), self._backoff(attempt))
        except HTTPMalformedError as e:
            return _Attempt(PolicyResponseError(self._scrub(f"{e}")), None)
        except HTTPError as e:
            return _Attempt(PolicyError(self._scrub(f"{e}")), None)
        status = response.status
        if status == 429:
            wait = _retry_after(response)
            if wait is not None and wait > self.cfg.max_wait_s:
                why = f"{what}: HTTP 429, retry-after {wait:g} s exceeds model.max_wait_s"
                return _Attempt(PolicyRateLimitError(why, 429), None)
            limited = PolicyRateLimitError(f"{what}: HTTP 429 {self._body(response)}", 429)
            return _Attempt(limited, self._backoff(attempt) if wait is None else wait)
        if status >= 500:
            failed = PolicyStatusError(f"{what}: HTTP {status} {self._body(response)}", status)
            return _Attempt(failed, self._backoff(attempt))
        if not 200 <= status < 300:
            if status in (401, 403):
                why = f"{what}: HTTP {status}: the API key was refused (model.api_key_env)"
            else:
                why = f"{what}: HTTP {status} {self._body(response)}"
            return _Attempt(PolicyStatusError(why, status), None)
        try:
            return ChatResponse.model_validate_json(response.body)
        except ValidationError as e:
            first = e.errors()[0]
            where = ".".join(str(p) for p in first["loc"]) or "body"
            why = f"{what}: malformed reply: {where}: {first['msg']} ({e.error_count()} errors)"
            return _Attempt(PolicyResponseError(self._scrub(why)), None)

    def _backoff(self, attempt: int) -> float:
        # Jitter (each wait uniform in [cap / 2, cap]) spreads the resends of many episodes
        # that failed together; the cap doubles with each resend of the same request.
        cap = min(self.cfg.max_wait_s, self.cfg.backoff_s * 2 ** min(attempt, 16))
        return self._jitter.uniform(0.5 * cap, cap)

    def _body(self, response: Response) -> str:
        return self._scrub(response.body[:500].decode("utf-8", "replace"))

    def _scrub(self, text: str) -> str:
        return text.replace(self._key, "[api key]") if self._key else text

    def _completion(
        self,
        context: list[int],
        reply: ChatResponse,
        params: SamplingParams,
        retries: int,
        elapsed: float,
    ) -> Completion:
        choice = reply.choices[0]
        text = self.translator.completion_text(choice.message)
        ids = self.renderer.tokenizer.encode(text)
        finish: str = "length" if choice.finish_reason == "length" else "stop"
        if finish == "stop":
            ids.append(self.translator.end_id)
        if len(ids) > params.max_tokens:
            ids, finish = ids[: params.max_tokens], "length"
        usage = reply.usage
        cached = usage.cached_tokens
        dollars = self.cfg.price.dollars(usage.prompt_tokens, cached, usage.completion_tokens)
        charged = ApiUsage(
            input_tokens=usage.prompt_tokens,
            cached_input_tokens=cached,
            output_tokens=usage.completion_tokens,
            cost_usd=dollars,
        )
        self.ledger.record(context, ids, charged)
        return Completion(
            token_ids=tuple(ids),
            logprobs=(0.0,) * len(ids),
            finish_reason="length" if finish == "length" else "stop",
            policy_version=self.policy_version,
            metrics={
                "request_s": elapsed,
                "retries": float(retries),
                "input_tokens": float(usage.prompt_tokens),
                "cached_input_tokens": float(cached),
                "output_tokens": float(usage.completion_tokens),
                "cost_usd": dollars,
            },
        )

    def close(self) -> None:
        """Close the connections; requests in progress fail. Idempotent."""
        self._closed = True
        self.http.close()

    async def __aenter__(self) -> OpenAIPolicy:
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self._closed = True
        await self.http.__aexit__(exc_type, exc, tb)


def _retry_after(response: Response) -> float | None:
    """Seconds a 429 asks to wait: `retry-after-ms` (OpenAI), or `retry-after` in seconds or
    as an HTTP date (RFC 9110 10.2.3); None when it says nothing readable."""
    ms = response.headers.get("retry-after-ms")
    if ms is not None:
        try:
            return max(0.0, float(ms) / 1000)
        except ValueError:
            pass
    value = response.headers.get("retry-after")
    if value is None:
        return None
    try:
        return max(0.0, float(value))
    except ValueError:
        pass
    try:
        when = email.utils.parsedate_to_datetime(value)
    except (TypeError, ValueError):
        return None
    return max(0.0, when.timestamp() - time.time())
