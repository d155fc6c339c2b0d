"""Incremental chat rendering: each turn appends token ids; history is never re-rendered.

The embedded model speaks ChatML (`<|im_start|>role\\n...<|im_end|>\\n`). Its chat template
ignores tools, so turnrl writes the tool schemas and the call syntax into the system message
itself. Rendering is split into pieces that are tokenized once each and appended:

    initial(system, tools, user)  -> ids up to and including the assistant header
    (the policy samples a completion; its ids are kept exactly)
    observation(results, closed)  -> [<|im_end|> if the sample did not end with it]
                                     + tool responses as a user message + assistant header

Every piece starts at a special token or right after one, so tokenizing it alone gives the ids
a full render would give at that place; but that equivalence is only a convenience: what the
policy saw is what is stored, and training reads the stored ids.

`Renderer` is what the runner, the suites and training use; `ChatML` is the default and fast
path, and `agent.chat_template.TemplateRenderer` renders with a model's own Jinja template,
checking every appended piece against a full render. A renderer opens one `Dialogue` per
episode: the template renderer keeps the messages so far in it, ChatML keeps nothing.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, Protocol

from turnrl.agent.records import ToolCall
from turnrl.agent.tool_formats import HERMES_SYNTAX, Hermes, ToolFormat, rewrite_hermes


class Tokenizer(Protocol):
    """The operations rendering needs (`HFTokenizer` adapts a transformers tokenizer)."""

    def encode(self, text: str, parse_special: bool = False) -> list[int]:
        """Ids of `text`, no BOS/EOS added. Special-token strings (`<|im_end|>`) in `text`
        stay plain text unless `parse_special`: a tool result or a question must not be able
        to forge a role marker."""
        ...

    def decode(self, ids: Sequence[int]) -> str:
        """Text of `ids`, special tokens included, invalid UTF-8 replaced."""
        ...


class HFTokenizer:
    """Adapts a transformers (fast) tokenizer to `Tokenizer`, through its Rust backend: the
    Python wrapper costs more than the encoding on short observations."""

    def __init__(self, tokenizer: Any) -> None:
        from tokenizers import Tokenizer as RustTokenizer

        self._special = tokenizer.backend_tokenizer
        # A second backend that encodes special-token strings as text; two instances because
        # the flag is per instance and the policy thread may decode concurrently.
        self._plain = RustTokenizer.from_str(self._special.to_str())
        self._plain.encode_special_tokens = True

    def encode(self, text: str, parse_special: bool = False) -> list[int]:
        backend = self._special if parse_special else self._plain
        return list(backend.encode(text, add_special_tokens=False).ids)

    def decode(self, ids: Sequence[int]) -> str:
        return str(self._special.decode(list(ids), skip_special_tokens=False))


CALL_SYNTAX = HERMES_SYNTAX
"""The hermes call syntax ChatML writes into the system message (regression-locked)."""


class TemplateError(ValueError):
    """A chat template that cannot be rendered append-only and token-exact, or a conversation
    it renders differently than what the policy saw. A person must fix the config: the runner
    lets it escape the episode (it is not the agent's failure)."""

    def __init__(self, template: str, where: str, problem: str) -> None:
        super().__init__(f"chat template {template!r}, {where}: {problem}")
        self.template = template
        """The template's name (its file name, `model`, `inline`)."""
        self.where = where
        """Which turn of which conversation (`turn 3`, `probe turn 1`, `the opening`)."""
        self.problem = problem


@dataclass(frozen=True)
class ToolResponses:
    """What follows a reply that made calls (or a malformed one): the calls' results, in order."""

    calls: Sequence[ToolCall]
    """The turn's calls (a template's `tool` messages name them)."""
    texts: Sequence[str]
    """One result text per call."""
    note: str | None = None
    """A note to the agent when the reply made no call (its format error)."""


@dataclass(frozen=True)
class UserMessage:
    """What follows an answer when the user speaks again."""

    text: str


Followup = ToolResponses | UserMessage


class Dialogue(Protocol):
    """One episode's rendering: each method returns the ids to append after a completion."""

    def initial_ids(self) -> list[int]:
        """The ids of the opening (system, examples, question, assistant header); a new list."""
        ...

    def append(
        self, completion: Sequence[int], text: str, closed: bool, followup: Followup
    ) -> list[int]:
        """Ids after `completion` (decoded as `text`; `closed`: it ends with the end-of-turn
        id): close the reply if it was not, render `followup`, open the next reply."""
        ...

    def replay(
        self,
        completion: Sequence[int],
        text: str,
        closed: bool,
        followup: Followup,
        stored: Sequence[int],
    ) -> None:
        """Follow a stored turn whose observation ids were `stored` (a branch's prefix); a
        renderer that keeps state checks that it would have appended the same ids."""
        ...


class Renderer(Protocol):
    """Turns conversations into token ids, appending only (module docstring)."""

    @property
    def tokenizer(self) -> Tokenizer:
        """Encodes tool results (per-tool token limits) and decodes completions."""
        ...

    @property
    def tool_format(self) -> ToolFormat:
        """How the model writes calls: the runner parses completions with it."""
        ...

    @property
    def generation_prompt(self) -> str:
        """The text that opens an assistant reply (`<|im_start|>assistant\\n`)."""
        ...

    def end_of_turn_id(self) -> int:
        """The id that ends a message; the policy stops on it."""
        ...

    def system_text(self, instructions: str, tools: Sequence[dict[str, Any]]) -> str:
        """The system message for `instructions` and the tool schemas."""
        ...

    def tools_note(self, tools: Sequence[dict[str, Any]]) -> str:
        """Text announcing tools that became available mid-conversation."""
        ...

    def initial(
        self,
        instructions: str,
        tools: Sequence[dict[str, Any]],
        user: str,
        examples: Sequence[tuple[str, str]] = (),
    ) -> list[int]:
        """Ids of a one-question prompt up to the assistant header."""
        ...

    def start(
        self,
        instructions: str,
        tools: Sequence[dict[str, Any]],
        user: str,
        examples: Sequence[tuple[str, str]] = (),
    ) -> Dialogue:
        """A new episode's dialogue (`Dialogue.initial_ids` is `initial`'s)."""
        ...

    def resume(
        self,
        instructions: str,
        tools: Sequence[dict[str, Any]],
        user: str,
        examples: Sequence[tuple[str, str]],
        stored: Sequence[int],
    ) -> Dialogue:
        """The dialogue of a stored episode whose opening ids were `stored` (a branch)."""
        ...


class ChatML:
    """ChatML renderer over a tokenizer. Special tokens are placed as ids, and every text
    segment between them is encoded as plain text, which is how a fast tokenizer splits a full
    render anyway (added tokens first, then each segment alone): so the pieces equal a full
    render of the same messages, while content can never inject a role marker."""

    def __init__(self, tokenizer: Tokenizer, tool_format: ToolFormat | None = None) -> None:
        self.tokenizer = tokenizer
        self.tool_format: ToolFormat = tool_format or Hermes()
        self.start_id = self._special("<|im_start|>")
        self.end_id = self._special("<|im_end|>")
        self._newline = tokenizer.encode("\n")
        self._assistant = [self.start_id, *tokenizer.encode("assistant\n")]
        self._prefixes: dict[tuple[str, tuple[tuple[str, str], ...]], list[int]] = {}
        self.generation_prompt = tokenizer.decode(self._assistant)

    def _special(self, marker: str) -> int:
        ids = self.tokenizer.encode(marker, parse_special=True)
        if len(ids) != 1:
            raise ValueError(f"{marker!r} is not a single token for this tokenizer")
        return ids[0]

    def end_of_turn_id(self) -> int:
        """The id that ends a message; the policy stops on it."""
        return self.end_id

    def system_text(self, instructions: str, tools: Sequence[dict[str, Any]]) -> str:
        if not tools:
            return instructions
        schemas = "\n".join(json.dumps(t, ensure_ascii=False) for t in tools)
        syntax = self.tool_format.syntax()
        return f"{instructions}\n\n# Tools\n{syntax}\n\nAvailable tools:\n{schemas}"

    def message(self, role: str, content: str) -> list[int]:
        """`<|im_start|>{role}\n{content}<|im_end|>\n` as ids."""
        body = self.tokenizer.encode(f"{role}\n{content}")
        return [self.start_id, *body, self.end_id, *self._newline]

    def initial(
        self,
        instructions: str,
        tools: Sequence[dict[str, Any]],
        user: str,
        examples: Sequence[tuple[str, str]] = (),
    ) -> list[int]:
        """Ids of the system message, any example messages `(role, content)`, the user
        message, then the assistant header."""
        key = (self.system_text(instructions, tools), tuple(examples))
        prefix = self._prefixes.get(key)
        if prefix is None:
            # Every episode of a task shares its system message and examples (hundreds of
            # tokens, most of the runner's per-episode CPU when encoded each time).
            prefix = self.message("system", key[0])
            for role, content in examples:
                if role == "assistant":
                    content = rewrite_hermes(content, self.tool_format)
                prefix += self.message(role, content)
            if len(self._prefixes) >= 64:
                self._prefixes.clear()
            self._prefixes[key] = prefix
        return [*prefix, *self.message("user", user), *self._assistant]

    def tools_note(self, tools: Sequence[dict[str, Any]]) -> str:
        """Text announcing tools that became available mid-conversation."""
        schemas = "\n".join(json.dumps(t, ensure_ascii=False) for t in tools)
        return f"New tools are available:\n{schemas}"

    def user_turn(self, text: str, completion_closed: bool) -> list[int]:
        """Ids appended after an answer when the user speaks again: close the assistant
        message if the sample did not, the user message, the next assistant header."""
        close = [] if completion_closed else [self.end_id]
        return [*close, *self._newline, *self.message("user", text), *self._assistant]

    def observation(self, results: Sequence[str], completion_closed: bool) -> list[int]:
        """Ids appended after a completion: close the assistant message if the sample did not,
        then the tool responses (or a note to the agent) as a user message, then the next
        assistant header."""
        body = "\n".join(f"<tool_response>\n{r}\n</tool_response>" for r in results)
        close = [] if completion_closed else [self.end_id]
        return [*close, *self._newline, *self.message("user", body), *self._assistant]

    def start(
        self,
        instructions: str,
        tools: Sequence[dict[str, Any]],
        user: str,
        examples: Sequence[tuple[str, str]] = (),
    ) -> Dialogue:
        return _ChatMLDialogue(self, self.initial(instructions, tools, user, examples))

    def resume(
        self,
        instructions: str,
        tools: Sequence[dict[str, Any]],
        user: str,
        examples: Sequence[tuple[str, str]],
        stored: Sequence[int],
    ) -> Dialogue:
        """ChatML keeps no state: the stored ids stand as they are."""
        return _ChatMLDialogue(self, list(stored))


class _ChatMLDialogue:
    """ChatML's pieces do not depend on the conversation so far: nothing is kept."""

    def __init__(self, renderer: ChatML, initial: list[int]) -> None:
        self._renderer = renderer
        self._initial = initial

    def initial_ids(self) -> list[int]:
        return self._initial

    def append(
        self, completion: Sequence[int], text: str, closed: bool, followup: Followup
    ) -> list[int]:
        if isinstance(followup, UserMessage):
            return self._renderer.user_turn(followup.text, completion_closed=closed)
        notes = list(followup.texts)
        if followup.note is not None:
            notes.append(followup.note)
        return self._renderer.observation(notes, completion_closed=closed)

    def replay(
        self,
        completion: Sequence[int],
        text: str,
        closed: bool,
        followup: Followup,
        stored: Sequence[int],
    ) -> None:
        """Nothing to follow (stored ids stand: regression lock for branches)."""
