"""The async episode runner: one coroutine per episode, bounded concurrency, G rollouts per task.

An episode alternates policy turns and tool calls until the policy answers or a budget runs
out. Everything the policy saw is recorded as token ids (`Turn.prompt_ids`, `completion_ids`,
`observation_ids`), so the concatenation over turns is the exact training context.

Branching: an `EpisodeSpec.prefix` of stored turns starts the episode mid-way. Their token ids
become the context exactly as stored (never re-rendered or re-tokenized), and their calls to
per-episode tools (`EpisodeTool`) are replayed into the episode's fresh sessions, so that a
Python interpreter or a file system is in the state the stored observations describe; shared
stateless tools are not called again (their stored observations stand). A replayed call whose
result differs from the stored one is noted in `Episode.error` (`replay mismatch: ...`) and
the episode goes on: the stored observation is what the context says. The prefix turns stay in
the episode, marked `replayed`, with their stored costs counted against the budget.

Failures are data: a malformed call, an unknown tool, bad arguments, a tool that raises or
hangs become observations the agent sees; a policy failure or a runner bug ends that episode
with a typed `StopReason` and its error text. Nothing escapes `run_episode` except
cancellation and `TemplateError` (a chat template that cannot render this conversation
append-only: a config a person must fix, not the agent's failure), so one episode never
cancels its siblings. The runner holds no global state: a runner is a value built from a
policy, a renderer (`agent.chat.Renderer`: ChatML, or a model's own template), tools and a
config.
"""

from __future__ import annotations

import asyncio
import time
import traceback
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field, replace

from turnrl.agent.budget import Budget
from turnrl.agent.chat import (
    Dialogue,
    Followup,
    Renderer,
    TemplateError,
    ToolResponses,
    UserMessage,
)
from turnrl.agent.dispatch import Dispatcher, Session, ToolIndex, close_sessions
from turnrl.agent.dispatch import error as _error
from turnrl.agent.policy import Policy, SamplingParams
from turnrl.agent.records import (
    Episode,
    Route,
    StopReason,
    ToolCall,
    ToolErrorKind,
    ToolResult,
    Turn,
    TurnSignals,
    UserTurn,
)
from turnrl.agent.routing import (
    RoutedModel,
    RouteView,
    Routing,
    StepRouter,
    budget_intro,
    budget_note,
    merged_cost,
    over_budget,
)
from turnrl.agent.state_key import ROOT, chain_key, step_key
from turnrl.tools.base import AnyTool

MIN_TURN_TOKENS = 8
"""A turn with fewer context tokens left than this cannot say anything useful."""


@dataclass(frozen=True)
class EpisodeSpec:
    """What one episode is about."""

    episode_id: str
    group_id: str
    task_id: str
    instructions: str
    """System instructions (the tool schemas are added by the renderer)."""
    question: str
    """The user message."""
    seed: int | None = None
    """Sampling seed; turn t uses `seed + t` so turns do not repeat one another's draws."""
    step: int = 0
    """Training step (-1 for evaluation)."""
    examples: tuple[tuple[str, str], ...] = ()
    """Few-shot messages `(role, content)` between the system message and the question."""
    prefix: tuple[Turn, ...] = ()
    """Stored turns to start from (a branch, see the module docstring; `TrajectoryGraph.
    branch_spec` builds it). When given, its first turn's `prompt_ids` are the initial context
    and `instructions`, `question` and `examples` are not rendered."""
    tools: tuple[AnyTool, ...] | None = None
    """This episode's tools instead of the runner's (a task item's simulators)."""
    followups: tuple[UserTurn, ...] = ()
    """User messages that follow the question, one after each answer: the episode ends at the
    answer to the last one (multi-turn conversations)."""
    hidden_tools: frozenset[str] = frozenset()
    """Tools neither shown nor callable until a followup's `reveal` names them."""
    policy: Policy | None = None
    """This episode's policy instead of the runner's (a scripted oracle that plays this item's
    gold solution)."""
    models: Mapping[str, Policy] = field(default_factory=dict)
    """Under routing: this episode's own policy for a routed model, by name, instead of the
    routing's (an oracle's script for this item)."""
    router: StepRouter | None = None
    """Under routing: this episode's router instead of the runner's (a task-level router's
    pick, as a `FixedRouter`)."""
    route: Route | None = None
    """A task-level router's logged decision for this episode (kept in `Episode.route`)."""


class EpisodeRunner:
    """Runs episodes of one policy with one set of tools under one budget."""

    def __init__(
        self,
        policy: Policy,
        renderer: Renderer,
        tools: Sequence[AnyTool],
        budget: Budget,
        sampling: SamplingParams,
        clock: Callable[[], float] = time.monotonic,
        routing: Routing | None = None,
    ) -> None:
        self.policy = policy
        self.routing = routing
        self.renderer = renderer
        self.tools = ToolIndex(tools)
        self._indexes: dict[tuple[int, ...], ToolIndex] = {}
        self.budget = budget
        self.sampling = replace(
            sampling,
            stop_token_ids=(*sampling.stop_token_ids, renderer.end_of_turn_id()),
        )
        self._eot_id = renderer.end_of_turn_id()
        self._parse = renderer.tool_format.parse
        self._clock = clock
        self.dispatcher = Dispatcher(renderer.tokenizer.encode, clock)

    def _index(self, spec: EpisodeSpec) -> ToolIndex:
        if spec.tools is None:
            return self.tools
        # The episodes of one task item share its tools: index them once. Keyed by identity
        # (tools need not be hashable); a cached index holds its tools, so no id is reused.
        key = tuple(id(t) for t in spec.tools)
        index = self._indexes.get(key)
        if index is None:
            if len(self._indexes) >= 256:
                self._indexes.clear()
            index = self._indexes[key] = ToolIndex(spec.tools)
        return index

    async def run_many(
        self,
        specs: Sequence[EpisodeSpec],
        concurrency: int,
        on_episode: Callable[[Episode], None] | None = None,
    ) -> list[Episode]:
        """Run `specs` with at most `concurrency` episodes in flight; results in input order.
        `on_episode` sees each episode as it ends (progress bars, streaming to the store)."""
        gate = asyncio.Semaphore(concurrency)

        async def one(spec: EpisodeSpec) -> Episode:
            async with gate:
                episode = await self.run_episode(spec)
            if on_episode is not None:
                on_episode(episode)
            return episode

        return list(await asyncio.gather(*(one(s) for s in specs)))

    async def run_episode(self, spec: EpisodeSpec) -> Episode:
        """Run one episode to its end. Never raises, except on cancellation and on a
        `TemplateError` (module docstring)."""
        state = _State(spec=spec, start=self._clock(), tools=self.tools)
        try:
            state.tools = self._index(spec)  # two tools with one name: this episode's error
            async with asyncio.timeout(self.budget.wall_clock_s):
                await self._loop(state)
        except TimeoutError:
            state.stop(StopReason.TIMEOUT, "wall-clock budget exhausted")
        except TemplateError:
            raise
        except Exception as e:  # the boundary: one episode's bug must not end the run
            state.stop(StopReason.ERROR, "".join(traceback.format_exception(e)))
        finally:
            # Shielded: a cancelled run must still destroy the episode's sandboxes. Skipped when
            # none was opened (stateless tools): the shield's task costs ~3 us a turn.
            if state.sessions:
                await asyncio.shield(close_sessions(state.sessions))
        return state.episode(self._clock())

    async def _loop(self, s: _State) -> None:
        b = self.budget
        if s.spec.prefix:
            restored = await self._restore(s)
            if restored is None:
                return
            context, dialogue = restored
            pending_prompt: list[int] = []
        else:
            instructions = s.spec.instructions
            shown = self.routing is not None and b.shown
            intro = budget_intro(b.max_cost) if shown else None
            if intro is not None:
                instructions = f"{instructions}\n\n{intro}"
            dialogue = self.renderer.start(
                instructions, s.tools.schemas(s.hidden), s.spec.question, s.spec.examples
            )
            context = dialogue.initial_ids()
            pending_prompt = list(context)
        while s.stop_reason is None:
            index = len(s.turns)
            if index >= b.max_turns:
                s.stop(StopReason.MAX_TURNS)
                break
            room = b.max_context_tokens - len(context)
            if room < MIN_TURN_TOKENS:
                s.stop(StopReason.CONTEXT_FULL)
                break
            sp = self.sampling  # built field by field: dataclasses.replace costs ~6 us a turn
            params = SamplingParams(
                temperature=sp.temperature,
                top_p=sp.top_p,
                max_tokens=min(b.max_new_tokens, room),
                stop=sp.stop,
                stop_token_ids=sp.stop_token_ids,
                seed=None if s.spec.seed is None else s.spec.seed + index,
            )
            policy = s.spec.policy or self.policy
            routed: RoutedModel | None = None
            route: Route | None = None
            if self.routing is not None:
                picked = self._route(s, index, len(context), params.max_tokens)
                if picked is None:
                    break
                routed, route = picked
                policy = s.spec.models.get(routed.name) or routed.policy or policy
            t0 = self._clock()
            try:
                completion = await policy.generate(context, params)
            except Exception as e:
                s.stop(StopReason.POLICY_ERROR, f"{type(e).__name__}: {e}")
                break
            generate_s = self._clock() - t0
            ids = list(completion.token_ids)
            if len(completion.logprobs) != len(ids):
                s.stop(StopReason.POLICY_ERROR, "policy returned misaligned ids and logprobs")
                break
            if routed is not None:
                billed = completion.metrics.get("cost_usd", 0.0)
                merged_cost(
                    s.cost, Routing.charge(routed, len(context), len(ids), generate_s, billed)
                )
                over = over_budget(s.cost, b.max_cost)
                if over:  # a cost not bounded in advance (per second) crossed a limit
                    s.stop(
                        StopReason.BUDGET_EXHAUSTED,
                        f"turn {index} of {routed.name} crossed the budget: {', '.join(over)}",
                    )
            text = self.renderer.tokenizer.decode(ids)
            parsed = self._parse(text, index)
            full = len(context) + len(ids) >= b.max_context_tokens
            if s.stop_reason is None and parsed.answer is None and full:
                s.stop(StopReason.CONTEXT_FULL)
            if s.stop_reason is not None:
                # Cut off mid-thought, or over budget: nothing after this runs or is seen.
                not_run = parsed.calls_not_run + len(parsed.tool_calls)
                parsed = replace(parsed, tool_calls=[], calls_not_run=not_run)

            t1 = self._clock()
            results = await self._run_calls(s, parsed.tool_calls)
            tools_s = self._clock() - t1

            observation: list[int] = []
            user_turn = s.user_turn
            closed = bool(ids) and ids[-1] == self._eot_id
            if parsed.answer is not None and s.user_turn < len(s.spec.followups):
                # A reply to one user message (in `Turn.answer`); `Episode.answer` is the last.
                if s.stop_reason is None:
                    observation = dialogue.append(ids, text, closed, self._next_user_turn(s))
                    if len(context) + len(ids) + len(observation) > b.max_context_tokens:
                        observation = []
                        s.stop(StopReason.CONTEXT_FULL)
            elif parsed.answer is not None and s.stop_reason is None:
                s.stop(StopReason.ANSWERED)
                s.answer = parsed.answer
            elif s.stop_reason is None:
                note = None if parsed.tool_calls else f"Error: {parsed.format_error}"
                if self.routing is not None and b.shown:
                    left = budget_note(s.cost, b.max_cost)
                    note = "\n".join(x for x in (note, left) if x) or None
                responses = ToolResponses(parsed.tool_calls, [r.text for r in results], note)
                observation = dialogue.append(ids, text, closed, responses)
                if len(context) + len(ids) + len(observation) > b.max_context_tokens:
                    # The reply would not fit: no policy call would ever see it.
                    observation = []
                    s.stop(StopReason.CONTEXT_FULL)
            context += ids + observation
            # Keyed before the record is built: a copy to add the key would cost ~3 us a turn.
            parent = s.turns[-1].state_key if s.turns else ROOT
            key = step_key(parent or ROOT, parsed.tool_calls, parsed.answer, text, results)
            turn = Turn(
                index=index,
                prompt_ids=pending_prompt,
                completion_ids=ids,
                completion_logprobs=list(completion.logprobs),
                observation_ids=observation,
                text=text,
                finish_reason=completion.finish_reason,
                tool_calls=parsed.tool_calls,
                tool_results=results,
                answer=parsed.answer,
                user_turn=user_turn,
                format_error=parsed.format_error,
                calls_not_run=parsed.calls_not_run,
                cost_so_far=dict(s.cost),
                tokens_left=b.max_context_tokens - len(context),
                policy_version=completion.policy_version,
                generate_s=generate_s,
                tools_s=tools_s,
                state_key=key,
                route=route,
                foreign=routed is not None and not routed.trained,
            )
            s.turns.append(turn)
            pending_prompt = []

    def _route(
        self, s: _State, index: int, context_tokens: int, max_tokens: int
    ) -> tuple[RoutedModel, Route] | None:
        """The model that writes turn `index` and the logged choice; None when the turn is
        refused (the episode stops: an unknown model, or a turn the budget cannot pay)."""
        routing = self.routing
        assert routing is not None
        b = self.budget
        view = RouteView(
            s.spec.task_id,
            index,
            s.turns,
            s.cost,
            b.max_cost,
            context_tokens,
            b.max_turns,
            s.spec.step,
        )
        route = (s.spec.router or routing.router).choose(view)
        model = routing.models.get(route.model)
        if model is None:
            s.stop(StopReason.ERROR, f"the router chose {route.model!r}, not a routed model")
            return None
        refusal = routing.refusal(model, s.cost, b.max_cost, context_tokens, max_tokens)
        if refusal is not None:
            s.stop(StopReason.BUDGET_EXHAUSTED, f"turn {index}: {refusal}")
            s.refused_route = route
            return None
        return model, route

    async def _restore(self, s: _State) -> tuple[list[int], Dialogue] | None:
        """Start from `spec.prefix`: its ids as the context, its costs and calls as spent, and
        its calls to per-episode tools replayed (module docstring). Returns the context and
        the dialogue that continues it (a template renderer follows the stored turns and
        checks it would have rendered the same ids); None when the prefix cannot be
        continued (the episode stops with an error)."""
        prefix = s.spec.prefix
        spec = s.spec
        problem = _prefix_problem(prefix, len(spec.followups))
        if problem is not None:
            s.stop(StopReason.ERROR, f"invalid prefix: {problem}")
            return None
        dialogue = self.renderer.resume(
            spec.instructions,
            s.tools.schemas(spec.hidden_tools),
            spec.question,
            spec.examples,
            prefix[0].prompt_ids,
        )
        context: list[int] = []
        for turn in prefix:
            s.set_user_turn(turn.user_turn)
            followup: Followup
            if turn.answer is not None:
                followup = UserMessage(self._followup_text(s, turn.user_turn))
            else:
                note = None if turn.tool_calls else f"Error: {turn.format_error}"
                texts = [r.text for r in turn.tool_results]
                followup = ToolResponses(turn.tool_calls, texts, note)
            closed = bool(turn.completion_ids) and turn.completion_ids[-1] == self._eot_id
            dialogue.replay(turn.completion_ids, turn.text, closed, followup, turn.observation_ids)
            context += turn.prompt_ids
            context += turn.completion_ids
            context += turn.observation_ids
            for call, stored in zip(turn.tool_calls, turn.tool_results, strict=True):
                if stored.error == ToolErrorKind.BUDGET:  # refused, never run: nothing to replay
                    continue
                s.n_calls += 1
                for kind, amount in stored.cost.items():
                    s.cost[kind] = s.cost.get(kind, 0.0) + amount
                if s.tools.episodic(call.name):
                    again = await self.dispatcher.call(s.tools, s.sessions, call, s.hidden)
                    if (again.error, again.text) != (stored.error, stored.text):
                        s.notes.append(_mismatch(turn.index, call, stored, again))
                elif call.name not in s.tools.entries and stored.error is None:
                    s.notes.append(
                        f"replay mismatch: turn {turn.index} call {call.id}: this runner has "
                        f"no tool {call.name!r}, its state is not restored"
                    )
            parent = s.turns[-1].state_key if s.turns else ROOT
            s.turns.append(
                turn.model_copy(
                    update={
                        "state_key": turn.state_key or chain_key(parent or ROOT, turn),
                        "replayed": True,
                        "rewards": {},
                        "signals": TurnSignals(),
                        "advantage": None,
                        "tokens_left": self.budget.max_context_tokens - len(context),
                    }
                )
            )
        last = prefix[-1]
        for kind in set(last.cost_so_far) - set(s.cost):  # models' costs (routing): not tools'
            s.cost[kind] = last.cost_so_far[kind]
        s.set_user_turn(last.user_turn + (last.answer is not None))
        return context, dialogue

    async def _run_calls(self, s: _State, calls: Sequence[ToolCall]) -> list[ToolResult]:
        """Run a turn's calls in order (tools may be stateful); every call gets a result."""
        results: list[ToolResult] = []
        for call in calls:
            if s.stop_reason is not None:
                results.append(
                    _error(call, ToolErrorKind.BUDGET, "not run: the episode's budget ran out")
                )
                continue
            if s.n_calls >= self.budget.max_tool_calls:
                results.append(_error(call, ToolErrorKind.BUDGET, "tool-call budget exhausted"))
                s.stop(StopReason.MAX_TOOL_CALLS)
                continue
            s.n_calls += 1
            result = await self.dispatcher.call(s.tools, s.sessions, call, s.hidden)
            for kind, amount in result.cost.items():
                s.cost[kind] = s.cost.get(kind, 0.0) + amount
            results.append(result)
            # Reaching a limit of a kind this call charged ends the episode (a model's kinds
            # are checked before its turns instead: `turnrl.agent.routing`).
            limits = self.budget.max_cost
            over = [k for k in result.cost if k in limits and s.cost[k] >= limits[k]]
            if over:
                s.stop(StopReason.BUDGET_EXHAUSTED, f"cost budget reached: {', '.join(over)}")
        return results

    def _next_user_turn(self, s: _State) -> UserMessage:
        """The next followup message (with the schemas of the tools it reveals)."""
        followup = s.spec.followups[s.user_turn]
        text = self._followup_text(s, s.user_turn)
        s.user_turn += 1
        if followup.reveal:
            s.hidden = s.hidden - set(followup.reveal)
        return UserMessage(text)

    def _followup_text(self, s: _State, index: int) -> str:
        """The text of followup `index`: the schemas of the tools it reveals, then its own."""
        followup = s.spec.followups[index]
        if not followup.reveal:
            return followup.text
        shown = [x for x in s.tools.schemas() if x["name"] in followup.reveal]
        return self.renderer.tools_note(shown) + "\n\n" + followup.text


def _prefix_problem(prefix: Sequence[Turn], n_followups: int) -> str | None:
    """Why `prefix` cannot be continued, or None."""
    for i, turn in enumerate(prefix):
        if turn.index != i:
            return f"turn {i} has index {turn.index}"
        if (i == 0) != bool(turn.prompt_ids):
            return f"turn {i}: only the first turn carries prompt ids"
        if turn.answer is not None and turn.user_turn >= n_followups:
            return f"turn {i} answered the last user message: nothing can follow it"
        if not turn.observation_ids:
            return f"turn {i} has no observation: its episode was cut off there"
        if len(turn.tool_results) != len(turn.tool_calls):
            return f"turn {i} has {len(turn.tool_calls)} calls but {len(turn.tool_results)} results"
    return None


def _mismatch(index: int, call: ToolCall, stored: ToolResult, again: ToolResult) -> str:
    def show(r: ToolResult) -> str:
        text = r.text if len(r.text) <= 200 else r.text[:200] + "…"
        return f"{r.error or 'ok'} {text!r}"

    return (
        f"replay mismatch: turn {index} call {call.id} ({call.name}): "
        f"stored {show(stored)}, replayed {show(again)}"
    )


class _State:
    """Mutable bookkeeping of one running episode (frozen records are built at the end)."""

    def __init__(self, spec: EpisodeSpec, start: float, tools: ToolIndex) -> None:
        self.spec = spec
        self.start = start
        self.tools = tools
        self.hidden: set[str] = set(spec.hidden_tools)
        self.user_turn = 0
        """Index of the user message being served (0: the question, k: the k-th followup)."""
        self.turns: list[Turn] = []
        self.cost: dict[str, float] = {}
        self.n_calls = 0
        self.sessions: dict[str, Session] = {}
        self.answer: str | None = None
        self.stop_reason: StopReason | None = None
        self.error: str | None = None
        self.refused_route: Route | None = None
        """The router's choice of the turn the budget refused."""
        self.notes: list[str] = []
        """Replay mismatches of a branched episode (they end up in `Episode.error`)."""

    def set_user_turn(self, index: int) -> None:
        """Serve user message `index`: the tools revealed up to it are visible."""
        self.user_turn = index
        self.hidden = set(self.spec.hidden_tools)
        for followup in self.spec.followups[:index]:
            self.hidden -= set(followup.reveal)

    def stop(self, reason: StopReason, error: str | None = None) -> None:
        if self.stop_reason is None:
            self.stop_reason, self.error = reason, error

    def episode(self, now: float) -> Episode:
        return Episode(
            episode_id=self.spec.episode_id,
            task_id=self.spec.task_id,
            group_id=self.spec.group_id,
            turns=self.turns,
            stop_reason=self.stop_reason or StopReason.ERROR,
            answer=self.answer,
            error="\n".join(e for e in (self.error, *self.notes) if e) or None,
            cost=dict(self.cost),
            wall_s=now - self.start,
            step=self.spec.step,
            route=self.spec.route,
            refused_route=self.refused_route,
        )
