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
from dataclasses import dataclass
from typing import Any, Protocol


class Tokenizer(Protocol):
    """The two operations rendering needs (a transformers tokenizer satisfies it through
    `HFTokenizer`)."""

    def encode(self, text: str) -> list[int]:
        """Ids of `text`, with special-token strings mapped to their ids, no BOS/EOS added."""
        ...

    def decode(self, ids: Sequence[int]) -> str:
        """Text of `ids`, special tokens included, invalid UTF-8 replaced."""
        ...


class HFTokenizer:
    """Adapts a transformers tokenizer to `Tokenizer`."""

    def __init__(self, tokenizer: Any) -> None:
        self._tok = tokenizer

    def encode(self, text: str) -> list[int]:
        return list(self._tok.encode(text, add_special_tokens=False))

    def decode(self, ids: Sequence[int]) -> str:
        return str(self._tok.decode(list(ids), skip_special_tokens=False))


CALL_SYNTAX = """\
You can call tools. To call one, write a JSON object inside <tool_call></tool_call> tags:
<tool_call>{"name": "<tool name>", "arguments": {<arguments>}}</tool_call>
You may make several calls in one message. Their results come back inside \
<tool_response></tool_response> tags. When you know the answer, write it inside \
<answer></answer> tags, e.g. <answer>Paris</answer>, and nothing after it."""


@dataclass(frozen=True)
class ChatML:
    """ChatML renderer over a tokenizer."""

    tokenizer: Tokenizer
    end_of_turn: str = "<|im_end|>"
    """The string of the id that ends a message; the policy stops on it."""

    def end_of_turn_id(self) -> int:
        ids = self.tokenizer.encode(self.end_of_turn)
        if len(ids) != 1:
            raise ValueError(f"{self.end_of_turn!r} is not a single token for this tokenizer")
        return ids[0]

    def system_text(self, instructions: str, tools: Sequence[dict[str, Any]]) -> str:
        if not tools:
            return instructions
        schemas = "\n".join(json.dumps(t, ensure_ascii=False) for t in tools)
        return f"{instructions}\n\n# Tools\n{CALL_SYNTAX}\n\nAvailable tools:\n{schemas}"

    def initial(self, instructions: str, tools: Sequence[dict[str, Any]], user: str) -> list[int]:
        """Ids of the system and user messages followed by the assistant header."""
        text = (
            f"<|im_start|>system\n{self.system_text(instructions, tools)}{self.end_of_turn}\n"
            f"<|im_start|>user\n{user}{self.end_of_turn}\n<|im_start|>assistant\n"
        )
        return self.tokenizer.encode(text)

    def observation(self, results: Sequence[str], completion_closed: bool) -> list[int]:
        """Ids appended after a completion: close the assistant message if the sample did not,
        then the tool responses (or a note to the agent) as a user message, then the next
        assistant header."""
        body = "\n".join(f"<tool_response>\n{r}\n</tool_response>" for r in results)
        close = "" if completion_closed else self.end_of_turn
        text = f"{close}\n<|im_start|>user\n{body}{self.end_of_turn}\n<|im_start|>assistant\n"
        return self.tokenizer.encode(text)
