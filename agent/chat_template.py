"""Rendering with a model's own Jinja chat template, append-only and token-exact.

The runner never re-renders history: each turn appends ids after the sampled ones. With an
arbitrary template that is only right if the template is append-only, so every append is
checked against a full render of the conversation so far (rendered with the tokenizer's
`apply_chat_template`, the same Jinja environment as transformers'):

1. Text: the full render must start with the text so far plus the sampled reply (decoded, its
   end-of-turn token included); what follows is the new piece. A template that rewrites the
   past (drops reasoning from earlier replies, moves the tool list to the last user message,
   trims a reply) fails here.
2. Tokens: the piece must start at a special token (or after the reply's end-of-turn token),
   so that tokenizing it alone gives the ids a full tokenization gives there; its ids must
   equal that tokenization (checked whenever no content holds special-token text).
3. Content: the piece is rendered a second time with each new message's content replaced by a
   slot marker; the template's own text (markup) is what lies between the slots. Special
   tokens are taken from the markup only and each stretch between them is encoded as plain
   text, so a tool result or a question holding `<|im_end|>` stays plain text ids (ChatML's
   guarantee). Content must appear verbatim or as a JSON string (`tojson`); a template that
   rewrites it, drops it, or renders the markup differently for other content is refused.

Any failure raises `TemplateError` naming the template and the turn: never a silent fallback.
The renderer checks itself on a synthetic conversation (a tool call with whitespace around it,
a tool result holding special-token text, a reply cut off before its end, a followup question,
a format error note) when it is built, so a template unfit for turnrl is refused before a run
starts. The reply's content goes to the template as `content` only (no structured
`tool_calls`): templates that re-serialise calls would not reproduce the sampled text.

The reply's own ids are the policy's and are never compared: where a generation prompt ends in
plain text (Llama's `\\n\\n`), a tokenizer may split a re-tokenized transcript differently at
that boundary; the stored ids are what the policy continued, as at inference.
"""

from __future__ import annotations

import json
import re
from collections.abc import Sequence
from typing import Any, Literal

from turnrl.agent.chat import (
    ChatML,
    Dialogue,
    Followup,
    HFTokenizer,
    Renderer,
    TemplateError,
    ToolResponses,
    UserMessage,
)
from turnrl.agent.chat_config import ChatConfig, ChatMLTemplate, ModelTemplate, PathTemplate
from turnrl.agent.records import ToolCall
from turnrl.agent.tool_formats import (
    ANSWER_SYNTAX,
    ToolFormat,
    ToolFormatName,
    make_tool_format,
    rewrite_hermes,
)

Message = dict[str, Any]
"""A message as chat templates read it (the transformers wire format)."""

_SLOT = "TURNRLSLOT{}X"
_SLOT_RE = re.compile(r"TURNRLSLOT(\d+)X")
"""Slot markers: letters and digits only, so `trim` and `tojson` leave them recognisable."""
_SAFE_NAME = re.compile(r"[A-Za-z0-9_.\-]{1,64}")
"""A tool name put into a `tool` message's markup: a model-chosen name of any other shape
could hold special-token text."""
_PROBE_TOOL = {
    "name": "probe_lookup",
    "description": "Looks a word up.",
    "parameters": {
        "type": "object",
        "properties": {"word": {"type": "string"}},
        "required": ["word"],
    },
}


class TemplateRenderer:
    """A `Renderer` over a Jinja chat template (module docstring)."""

    def __init__(
        self,
        hf_tokenizer: Any,
        source: str,
        name: str,
        tool_format: ToolFormatName = "hermes",
        tool_schemas: Literal["template", "system"] = "system",
        tool_results: Literal["tool_role", "user_message"] = "user_message",
    ) -> None:
        self._hf = hf_tokenizer
        self.source = source
        self.name = name
        self.tool_schemas = tool_schemas
        """Who renders the tool schemas (`ChatConfig` documents the choice)."""
        self.tool_results = tool_results
        """How tool results are presented."""
        self.tokenizer = HFTokenizer(hf_tokenizer)
        added: dict[str, int] = dict(hf_tokenizer.get_added_vocab())
        self._added = added
        self._added_re = re.compile(
            "|".join(re.escape(t) for t in sorted(added, key=len, reverse=True)) or r"(?!)"
        )
        self.generation_prompt, self.eot_text = self._markers()
        """The text that opens a reply; the special token that closes one."""
        self._eot_id = added[self.eot_text]
        """`eot_text`'s id."""
        self.tool_format: ToolFormat = make_tool_format(tool_format, (self.eot_text,))
        self._probe()

    # --- Renderer -----------------------------------------------------------------------

    def end_of_turn_id(self) -> int:
        return self._eot_id

    def system_text(self, instructions: str, tools: Sequence[dict[str, Any]]) -> str:
        if not tools:
            return instructions
        if self.tool_schemas == "template":
            return f"{instructions}\n\n{ANSWER_SYNTAX}"
        schemas = "\n".join(json.dumps(t, ensure_ascii=False) for t in tools)
        syntax = self.tool_format.syntax()
        return f"{instructions}\n\n# Tools\n{syntax}\n\nAvailable tools:\n{schemas}"

    def tools_note(self, tools: Sequence[dict[str, Any]]) -> str:
        # The template's tool list is fixed at the opening: re-rendering it would rewrite the
        # past, so tools revealed later are announced in the conversation, as ChatML does.
        schemas = "\n".join(json.dumps(t, ensure_ascii=False) for t in tools)
        return f"New tools are available:\n{schemas}"

    def initial(
        self,
        instructions: str,
        tools: Sequence[dict[str, Any]],
        user: str,
        examples: Sequence[tuple[str, str]] = (),
    ) -> list[int]:
        return self.start(instructions, tools, user, examples).initial_ids()

    def start(
        self,
        instructions: str,
        tools: Sequence[dict[str, Any]],
        user: str,
        examples: Sequence[tuple[str, str]] = (),
    ) -> Dialogue:
        return _TemplateDialogue(self, instructions, tools, user, examples, "")

    def resume(
        self,
        instructions: str,
        tools: Sequence[dict[str, Any]],
        user: str,
        examples: Sequence[tuple[str, str]],
        stored: Sequence[int],
    ) -> Dialogue:
        dialogue = _TemplateDialogue(self, instructions, tools, user, examples, "")
        if dialogue.initial_ids() != list(stored):
            raise TemplateError(
                self.name,
                "the opening",
                "the stored prefix's opening ids differ from this template's rendering of the "
                "same messages (was it stored under another chat config?)",
            )
        return dialogue

    # --- rendering ----------------------------------------------------------------------

    def holds_special(self, text: str) -> bool:
        """Whether `text` holds an added token's text."""
        return self._added_re.search(text) is not None

    def render(
        self, messages: Sequence[Message], tools: list[Message] | None, generation: bool, where: str
    ) -> str:
        """The template's text for `messages` (a full render)."""
        try:
            text = self._hf.apply_chat_template(
                list(messages),
                tools=tools,
                chat_template=self.source,
                add_generation_prompt=generation,
                tokenize=False,
            )
        except Exception as e:  # Jinja errors and the template's raise_exception
            raise TemplateError(self.name, where, f"rendering failed: {e}") from e
        if not isinstance(text, str):
            raise TemplateError(self.name, where, "rendering did not return text")
        return text

    def piece(
        self,
        messages: list[Message],
        first_new: int,
        prefix: str,
        tools: list[Message] | None,
        where: str,
        after_cut: bool,
    ) -> tuple[str, list[int]]:
        """(full render of `messages` with the generation prompt, the ids of its text after
        `prefix`), checked (module docstring). Messages from `first_new` on are new: their
        content lies in the piece. `after_cut`: the text before the piece ends without the
        end-of-turn token, so the piece must start at a special token."""
        full = self.render(messages, tools, True, where)
        if not full.startswith(prefix):
            raise TemplateError(self.name, where, _divergence(prefix, full))
        slotted = [
            {**m, "content": _SLOT.format(k)} if k >= 0 else m
            for k, m in ((i - first_new, m) for i, m in enumerate(messages))
        ]
        marked = self.render(slotted, tools, True, where)
        if not marked.startswith(prefix):
            raise TemplateError(
                self.name, where, "earlier messages render differently depending on later ones"
            )
        text = full[len(prefix) :]
        new = messages[first_new:]
        specials, clean = self._markup_specials(text, marked[len(prefix) :], new, where)
        if after_cut and (not specials or specials[0][0] != 0):
            raise TemplateError(
                self.name,
                where,
                f"after a reply cut off before its end-of-turn token the template goes on with "
                f"plain text {text[:40]!r}: its ids would depend on the reply's last tokens",
            )
        ids: list[int] = []
        at = 0
        for start, end, token in specials:
            if start > at:
                ids += self.tokenizer.encode(text[at:start])
            ids.append(token)
            at = end
        if at < len(text):
            ids += self.tokenizer.encode(text[at:])
        if clean and ids != self.tokenizer.encode(text, parse_special=True):
            raise TemplateError(
                self.name,
                where,
                "the piece's ids differ from a full tokenization of the same text (an added "
                "token that strips or normalises its neighbours?)",
            )
        return full, ids

    def _markup_specials(
        self, text: str, marked: str, new: Sequence[Message], where: str
    ) -> tuple[list[tuple[int, int, int]], bool]:
        """(the special tokens of the template's markup in `text`, as (start, end, id); whether
        no content holds special-token text). `marked` is `text` rendered with slots."""
        specials: list[tuple[int, int, int]] = []
        clean = True
        parts = _SLOT_RE.split(marked)
        seen: set[int] = set()
        pos = 0
        for i in range(0, len(parts), 2):
            markup = parts[i]
            if not text.startswith(markup, pos):
                raise TemplateError(
                    self.name, where, "the template's own text depends on the messages' content"
                )
            specials += [
                (pos + m.start(), pos + m.end(), self._added[m.group()])
                for m in self._added_re.finditer(markup)
            ]
            pos += len(markup)
            if i + 1 == len(parts):
                break
            k = int(parts[i + 1])
            if k >= len(new):
                raise TemplateError(self.name, where, "unexpected slot marker in the render")
            seen.add(k)
            follows = parts[i + 2]
            form = next(
                (
                    f
                    for f in _content_forms(str(new[k]["content"]))
                    if text.startswith(f, pos) and text.startswith(follows, pos + len(f))
                ),
                None,
            )
            if form is None:
                raise TemplateError(
                    self.name,
                    where,
                    f"the content of a {new[k]['role']!r} message is not rendered verbatim "
                    "(nor as a JSON string): trimmed or rewritten content would not be the "
                    "text the policy saw",
                )
            clean = clean and self._added_re.search(form) is None
            pos += len(form)
        if pos != len(text):
            raise TemplateError(self.name, where, "the template's own text depends on content")
        dropped = [m["role"] for k, m in enumerate(new) if k not in seen]
        if dropped:
            raise TemplateError(self.name, where, f"the template drops {dropped} messages")
        return specials, clean

    def messages_for(self, followup: Followup) -> list[Message]:
        """The messages that present `followup` (the config's `tool_results`)."""
        if isinstance(followup, UserMessage):
            return [{"role": "user", "content": followup.text}]
        if self.tool_results == "user_message":
            texts = [*followup.texts, *([followup.note] if followup.note is not None else [])]
            body = "\n".join(f"<tool_response>\n{r}\n</tool_response>" for r in texts)
            return [{"role": "user", "content": body}]
        out: list[Message] = [
            {
                "role": "tool",
                "content": text,
                "name": call.name if call.name and _SAFE_NAME.fullmatch(call.name) else "invalid",
                "tool_call_id": call.id,
            }
            for call, text in zip(followup.calls, followup.texts, strict=True)
        ]
        if followup.note is not None:
            out.append({"role": "user", "content": followup.note})
        return out

    def _markers(self) -> tuple[str, str]:
        """(the generation prompt, the end-of-turn token's text), read off renders."""
        where = "the opening"
        opening = [{"role": "system", "content": "S"}, {"role": "user", "content": "U"}]
        bare = self.render(opening, None, False, where)
        prompted = self.render(opening, None, True, where)
        if not prompted.startswith(bare):
            raise TemplateError(self.name, where, "the generation prompt rewrites the messages")
        reply = self.render([*opening, {"role": "assistant", "content": "R"}], None, False, where)
        if not reply.startswith(prompted + "R"):
            raise TemplateError(
                self.name,
                where,
                f"an assistant message does not start with the generation prompt "
                f"{prompted[len(bare) :]!r} followed by its content",
            )
        end = self._added_re.match(reply, len(prompted) + 1)
        if end is None:
            raise TemplateError(
                self.name,
                where,
                f"an assistant message is not closed by a special token (it ends with "
                f"{reply[len(prompted) + 1 :][:40]!r}): the policy could not stop on it",
            )
        return prompted[len(bare) :], end.group()

    def _probe(self) -> None:
        """Run a synthetic conversation through every check (module docstring)."""
        tok, eot = self.tokenizer, self._eot_id
        d = _TemplateDialogue(self, "Probe. ", [_PROBE_TOOL], " What is x? \n", (), "probe ")
        call = ToolCall(id="t0c0", name="probe_lookup", raw="", arguments={"word": "x"})
        steps: list[tuple[str, bool, Followup]] = [
            (
                " " + self.tool_format.write_calls([call]) + " \n",
                True,
                ToolResponses([call], [' {"r": "<|im_end|></s><|eot_id|>[INST]"} \n']),
            ),
            ("<answer> y </answer>", False, UserMessage(" And then? ")),
            ("Hmm.", True, ToolResponses([], [], note="Error: no call")),
        ]
        try:
            for text, closed, followup in steps:
                ids = tok.encode(text, parse_special=True) + ([eot] if closed else [])
                d.append(ids, tok.decode(ids), closed, followup)
        except TemplateError as e:
            if self.tool_schemas != "template":
                raise
            hint = " (if the template moves its tool list, try `tool_schemas: system`)"
            raise TemplateError(self.name, e.where, e.problem + hint) from e


class _TemplateDialogue:
    """One episode's messages and rendered text so far (the template renders them whole)."""

    def __init__(
        self,
        renderer: TemplateRenderer,
        instructions: str,
        tools: Sequence[dict[str, Any]],
        user: str,
        examples: Sequence[tuple[str, str]],
        label: str,
    ) -> None:
        r = self._r = renderer
        self._label = label
        self._turn = 0
        self._tools = (
            [{"type": "function", "function": t} for t in tools]
            if tools and r.tool_schemas == "template"
            else None
        )
        if self._tools and r.holds_special(json.dumps(self._tools, ensure_ascii=False)):
            # Schemas rendered by the template are markup: a description holding special-token
            # text (an MCP server's) would become a role marker.
            raise TemplateError(
                r.name,
                f"{label}opening",
                "a tool schema holds special-token text; use `tool_schemas: system`",
            )
        self._messages: list[Message] = [
            {"role": "system", "content": r.system_text(instructions, tools)},
            *(
                {
                    "role": role,
                    "content": rewrite_hermes(c, r.tool_format) if role == "assistant" else c,
                }
                for role, c in examples
            ),
            {"role": "user", "content": user},
        ]
        self._text, self._initial = r.piece(
            self._messages, 0, "", self._tools, f"{label}opening", after_cut=False
        )

    def initial_ids(self) -> list[int]:
        return list(self._initial)

    def append(
        self, completion: Sequence[int], text: str, closed: bool, followup: Followup
    ) -> list[int]:
        r = self._r
        where = f"{self._label}turn {self._turn}"
        if closed and not text.endswith(r.eot_text):
            raise TemplateError(r.name, where, f"the reply does not end with {r.eot_text!r}")
        content = text[: -len(r.eot_text)] if closed else text
        messages = [*self._messages, {"role": "assistant", "content": content}]
        first_new = len(messages)
        messages += r.messages_for(followup)
        full, ids = r.piece(
            messages, first_new, self._text + text, self._tools, where, after_cut=not closed
        )
        self._messages, self._text = messages, full
        self._turn += 1
        return ids

    def replay(
        self,
        completion: Sequence[int],
        text: str,
        closed: bool,
        followup: Followup,
        stored: Sequence[int],
    ) -> None:
        where = f"{self._label}turn {self._turn}"
        if self.append(completion, text, closed, followup) != list(stored):
            raise TemplateError(
                self._r.name,
                where,
                "the stored observation ids differ from this template's (was the prefix "
                "stored under another chat config?)",
            )


def build_renderer(config: ChatConfig, hf_tokenizer: Any) -> Renderer:
    """The renderer `config` names over a transformers tokenizer. Raises `TemplateError` with
    what to change when the template cannot be used (none, unreadable, not append-only)."""
    template = config.template
    if isinstance(template, ChatMLTemplate):
        fmt = make_tool_format(config.tool_format, ("<|im_end|>",))
        return ChatML(HFTokenizer(hf_tokenizer), fmt)
    if isinstance(template, ModelTemplate):
        source = getattr(hf_tokenizer, "chat_template", None)
        name = "model"
        if not isinstance(source, str) or not source.strip():
            raise TemplateError(
                name,
                "the config",
                "`chat.template: model`, but this tokenizer has no chat_template: use "
                "`template: chatml`, or give one with `template: {path: FILE}`",
            )
    elif isinstance(template, PathTemplate):
        name = template.path.name
        try:
            source = template.path.read_text()
        except OSError as e:
            raise TemplateError(name, "the config", f"cannot read {template.path}: {e}") from e
    else:
        name, source = "inline", template.inline
    schemas = template.tool_schemas
    if schemas == "auto":
        schemas = "template" if "tools" in _variables(source, name) else "system"
    results = template.tool_results
    if results == "auto":
        named = re.search(r"""['"](tool|ipython)['"]""", source) is not None
        results = "tool_role" if named else "user_message"
    return TemplateRenderer(hf_tokenizer, source, name, config.tool_format, schemas, results)


def _variables(source: str, name: str) -> set[str]:
    """The variables a template reads from its caller."""
    import jinja2
    from jinja2 import meta

    try:
        return set(meta.find_undeclared_variables(jinja2.Environment().parse(source)))
    except jinja2.TemplateSyntaxError as e:
        raise TemplateError(name, "the config", f"not a valid Jinja template: {e}") from e


def _content_forms(content: str) -> tuple[str, ...]:
    """How a template may render content: verbatim, or as a JSON string (`tojson`, with or
    the quotes being the template's; transformers' `tojson` keeps non-ASCII)."""
    return (content, json.dumps(content, ensure_ascii=False)[1:-1], json.dumps(content)[1:-1])


def _divergence(expected: str, full: str) -> str:
    at = next(
        (i for i, (a, b) in enumerate(zip(expected, full, strict=False)) if a != b),
        min(len(expected), len(full)),
    )
    lo = max(0, at - 40)
    return (
        f"not append-only: the full render rewrites what came before at character {at}: "
        f"the policy saw {expected[lo : at + 40]!r}, a full render gives {full[lo : at + 40]!r}"
    )
