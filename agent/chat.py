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
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from typing import Any, Protocol


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


CALL_SYNTAX = """\
You can call tools. To call one, write a JSON object inside <tool_call></tool_call> tags:
<tool_call>{"name": "<tool name>", "arguments": {<arguments>}}</tool_call>
You may make several calls in one message. Their results come back inside \
<tool_response></tool_response> tags. When you know the answer, write it inside \
<answer></answer> tags, e.g. <answer>Paris</answer>, and nothing after it."""


class ChatML:
    """ChatML renderer over a tokenizer. Special tokens are placed as ids, and every text
    segment between them is encoded as plain text, which is how a fast tokenizer splits a full
    render anyway (added tokens first, then each segment alone): so the pieces equal a full
    render of the same messages, while content can never inject a role marker."""

    def __init__(self, tokenizer: Tokenizer) -> None:
        self.tokenizer = tokenizer
        self.start_id = self._special("<|im_start|>")
        self.end_id = self._special("<|im_end|>")
        self._newline = tokenizer.encode("\n")
        self._assistant = [self.start_id, *tokenizer.encode("assistant\n")]
        self._prefixes: dict[tuple[str, tuple[tuple[str, str], ...]], list[int]] = {}

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
        return f"{instructions}\n\n# Tools\n{CALL_SYNTAX}\n\nAvailable tools:\n{schemas}"

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
