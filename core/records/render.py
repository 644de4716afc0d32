"""One record -> validated, rendered token ids and labels (what the loss sees: docs/data.md, "Formats and how they
render"). The text is tokenized in pieces cut at the supervised spans, so the prompt side is tokenized exactly as an
application tokenizes it at inference and no token straddles what the model is given and what it must produce.
"""

from __future__ import annotations

import json
import re
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, NamedTuple

import jinja2
from transformers.utils.chat_template_utils import _compile_jinja_template

from core.records.sources import json_error, json_type

IGNORE_INDEX = -100  # labels the loss skips (torch CrossEntropyLoss ignore_index)
TEMPLATES = Path(__file__).resolve().parent.parent / "templates"  # core/templates: the chat templates we ship
ROLES = ("system", "user", "assistant", "tool")
FORMATS = {"messages": ("messages",), "prompt_completion": ("prompt", "completion"), "text": ("text",)}  # its fields

TextCheck = Callable[[str, str], None]  # (text, field) -> None; raises RecordProblem when the text is unusable


class RecordProblem(Exception):
    """One record is invalid; `field` and `reason` become `file:line: field: reason`."""

    def __init__(self, field: str, reason: str):
        super().__init__(f"{field}: {reason}")
        self.field, self.reason = field, reason


@dataclass(frozen=True)
class RenderOptions:
    max_seq_length: int
    system_message: str = "merge"  # merge | keep | error (config.DataSection.system_message)
    assistant_only_loss: bool = True
    completion_only_loss: bool = True

    @classmethod
    def of(cls, data, max_seq_length: int | None = None) -> RenderOptions:
        """The options of a config's data section (config.DataSection): training and scoring render alike."""
        length = max_seq_length or data.max_seq_length
        return cls(length, data.system_message, data.assistant_only_loss, data.completion_only_loss)


@dataclass
class Rendered:
    input_ids: list[int]
    labels: list[int]
    length: int  # tokens before truncation
    truncated: bool


# ----------------------------------------------------------------------------- record checks


def not_a_string(field: str, value: Any) -> RecordProblem:
    return RecordProblem(field, "missing" if value is None else f"must be a string, got {json_type(value)}")


def record_format(record: dict[str, Any], declared: str) -> str:
    """The record's format: the declared one (whose fields must be there), or the first of FORMATS it has a field of."""
    present = {k for fields in FORMATS.values() for k in fields if record.get(k) is not None}
    if declared != "auto":
        missing = [k for k in FORMATS[declared] if k not in present]
        if missing:
            raise RecordProblem(
                missing[0], f"missing (the source declares format: {declared}; the record has keys {sorted(record)})"
            )
        return declared
    found = next((fmt for fmt, fields in FORMATS.items() if present.intersection(fields)), None)
    if found is None:
        raise RecordProblem(
            "(record)", f"no 'messages', 'prompt'/'completion' or 'text' field (keys: {sorted(record)})"
        )
    return found


def message_text(content: Any, field: str) -> str | None:
    """A message's content as text: a string, or OpenAI-style parts [{"type": "text", "text": ...}]."""
    if content is None or isinstance(content, str):
        return content
    if isinstance(content, list):
        texts = []
        for j, part in enumerate(content):
            if not isinstance(part, dict) or part.get("type") != "text" or not isinstance(part.get("text"), str):
                kind = part.get("type") if isinstance(part, dict) else json_type(part)
                raise RecordProblem(
                    f"{field}[{j}]", f"only text parts are supported ({{'type': 'text', 'text': ...}}), got {kind!r}"
                )
            texts.append(part["text"])
        return "".join(texts)
    raise RecordProblem(field, f"must be a string, got {json_type(content)}")


def tool_call_text(call: Any, where: str) -> str:
    """An OpenAI-style tool call as the model writes it: <tool_call>{"name": ..., "arguments": {...}}</tool_call>"""
    if not isinstance(call, dict):
        raise RecordProblem(where, f"must be an object, got {json_type(call)}")
    fn = call.get("function", call)  # OpenAI nests name/arguments under "function"; flat is accepted too
    if "function" in call:
        where += ".function"
        if not isinstance(fn, dict):
            raise RecordProblem(where, f"must be an object, got {json_type(fn)}")
    name = fn.get("name")
    if not isinstance(name, str):
        raise not_a_string(f"{where}.name", name)
    if not name.strip():
        raise RecordProblem(f"{where}.name", "is empty")
    args = fn.get("arguments", {})
    if isinstance(args, str):  # the OpenAI wire format carries them as JSON text
        try:
            args = json.loads(args)
        except json.JSONDecodeError as e:
            raise RecordProblem(f"{where}.arguments", f"not valid JSON: {json_error(e)}") from None
    if not isinstance(args, dict):
        raise RecordProblem(f"{where}.arguments", f"must be an object (or JSON text of one), got {json_type(args)}")
    return "<tool_call>" + json.dumps({"name": name, "arguments": args}, ensure_ascii=False) + "</tool_call>"


def tool_calls_text(calls: Any, field: str) -> tuple[str, set[str]]:
    """OpenAI-style tool calls as the text the model writes, and the calls' ids."""
    if not isinstance(calls, list):
        raise RecordProblem(field, f"must be an array, got {json_type(calls)}")
    texts = [tool_call_text(call, f"{field}[{j}]") for j, call in enumerate(calls)]
    if not texts:
        raise RecordProblem(field, "is empty")
    ids = {call["id"] for call in calls if isinstance(call.get("id"), str)}
    return "\n".join(texts), ids


class Turn(NamedTuple):
    """One message, valid on its own: what the template gets, whether the loss covers it, its tool calls' ids."""

    message: dict[str, str]  # {"role": ..., "content": ...}
    trained: bool
    call_ids: set[str]  # ids of an assistant message's tool calls (empty otherwise)


def checked_message(m: Any, field: str, check_text: TextCheck) -> Turn:
    """One message on its own: role, content, tool calls, weight (its place in the conversation is checked later).
    The template gets its content, then its tool calls."""
    if not isinstance(m, dict):
        raise RecordProblem(field, f"must be an object with 'role' and 'content', got {json_type(m)}")
    role = m.get("role")
    if not isinstance(role, str):
        raise not_a_string(f"{field}.role", role)
    if role not in ROLES:
        raise RecordProblem(f"{field}.role", f"'{role}' is not one of {', '.join(ROLES)}")
    content = message_text(m.get("content"), f"{field}.content")
    if content is not None:
        check_text(content, f"{field}.content")
    ids: set[str] = set()
    if m.get("tool_calls") not in (None, []):  # Parquet/Arrow fill a missing key with null
        if role != "assistant":
            raise RecordProblem(f"{field}.tool_calls", f"only assistant messages carry tool calls, not '{role}'")
        calls, ids = tool_calls_text(m["tool_calls"], f"{field}.tool_calls")
        check_text(calls, f"{field}.tool_calls")
        text = (content or "").strip()
        content = text + "\n" + calls if text else calls
    if content is None:
        raise RecordProblem(f"{field}.content", "missing" + (" (and no tool_calls)" if role == "assistant" else ""))
    if role == "assistant" and not content.strip():
        raise RecordProblem(f"{field}.content", "assistant message is empty")
    weight = m.get("weight")
    if weight is not None and (role != "assistant" or weight not in (0, 1) or isinstance(weight, bool)):
        raise RecordProblem(f"{field}.weight", "only assistant messages take a weight, and it must be 0 or 1")
    return Turn({"role": role, "content": content}, role == "assistant" and weight != 0, ids)


def check_tool_call_id(call_id: Any, field: str, earlier: list[Turn]) -> None:
    """A tool result's tool_call_id names a call of the latest assistant message, when that message's calls
    have ids (a tool result without tool_call_id, or answering calls without ids, is taken as it is)."""
    if not isinstance(call_id, str):
        return
    asked = next((k for k in range(len(earlier) - 1, -1, -1) if earlier[k].message["role"] == "assistant"), None)
    if asked is not None and earlier[asked].call_ids and call_id not in earlier[asked].call_ids:
        raise RecordProblem(
            f"{field}.tool_call_id",
            f"'{call_id}' matches no tool call of the assistant message at index {asked} "
            f"(ids: {', '.join(sorted(earlier[asked].call_ids))})",
        )


def turn_order_problem(role: str, i: int, prev_role: str | None) -> str | None:
    """Why message `i` (of `role`) cannot follow message i - 1 (of `prev_role`; None: it opens the
    conversation), or None when it can."""
    if role == "system":
        return "'system' is only allowed as the first message"
    if prev_role is None and role != "user":
        return f"the conversation must start with a user message (after an optional system message), got '{role}'"
    if prev_role == role and role in ("user", "assistant"):
        return f"two consecutive {role} messages at index {i - 1} and {i}"
    if role == "tool" and prev_role not in ("assistant", "tool"):
        return (
            f"a tool result must follow the assistant message that called the tool (or another tool result), "
            f"not '{prev_role}' at index {i - 1}"
        )
    if role == "user" and prev_role == "tool":
        return f"a user message cannot follow the tool result at index {i - 1}: the assistant answers tool results"
    return None


def check_turn_order(turns: list[Turn], start: int) -> None:
    """The messages from `start` (after an optional system message) alternate user and assistant, tool results
    following the assistant message that called the tool, and end with an assistant message."""
    if start == len(turns):
        raise RecordProblem("messages", "has only a system message")
    roles = [t.message["role"] for t in turns]
    for i in range(start, len(roles)):
        problem = turn_order_problem(roles[i], i, roles[i - 1] if i > start else None)
        if problem:
            raise RecordProblem(f"messages[{i}].role", problem)
    if roles[-1] != "assistant":
        raise RecordProblem(
            f"messages[{len(roles) - 1}].role",
            f"the last message must be from the assistant (nothing to learn otherwise), got '{roles[-1]}'",
        )


def merge_system(msgs: list[dict[str, str]]) -> list[dict[str, str]]:
    """The system message merged into the first user message (Gemma has no system role) as the template and
    llama.cpp's built-in Gemma formatter merge one at inference: "<system>\\n\\n<first user message>"."""
    system, first = msgs[0]["content"].strip(), msgs[1]
    if not system:
        return msgs[1:]
    return [{"role": "user", "content": system + "\n\n" + first["content"].strip()}, *msgs[2:]]


def normalize_messages(
    messages: Any, system_message: str, check_text: TextCheck
) -> tuple[list[dict[str, str]], list[bool]]:
    """Validate an OpenAI-style conversation: {role, content} messages for the template and, per message, whether
    the loss covers it. `check_text(text, field)` vets every text that reaches the template."""
    if not isinstance(messages, list):
        raise RecordProblem("messages", f"must be an array of messages, got {json_type(messages)}")
    if not messages:
        raise RecordProblem("messages", "is empty")
    turns: list[Turn] = []
    for i, m in enumerate(messages):
        turn = checked_message(m, f"messages[{i}]", check_text)
        if turn.message["role"] == "tool":
            check_tool_call_id(m.get("tool_call_id"), f"messages[{i}]", turns)
        turns.append(turn)
    start = 1 if turns[0].message["role"] == "system" else 0
    if start and system_message == "error":
        raise RecordProblem(
            "messages[0].role",
            "system messages are rejected (data.system_message=error); remove it, or set data.system_message=merge",
        )
    check_turn_order(turns, start)
    msgs, trained = [t.message for t in turns], [t.trained for t in turns]
    if start and system_message == "merge":
        return merge_system(msgs), trained[1:]
    return msgs, trained


# ----------------------------------------------------------------------------- rendering


def with_single_bos(ids: list[int], labels: list[int], bos: int) -> tuple[list[int], list[int]]:
    """Exactly one <bos>, first, never supervised: Gemma's template opens with `{{ bos_token }}` and its tokenizer
    adds <bos> too (add_bos_token=True), two where the model was trained on one, with no error anywhere."""
    k = 0
    while k < len(ids) and ids[k] == bos:
        k += 1
    return [bos] + ids[k:], [IGNORE_INDEX] + labels[k:]


def compile_template(text: str):
    """The chat template, compiled to render exactly what tokenizer.apply_chat_template renders. A model's own
    template is untrusted code and runs in transformers' sandbox; ours (core/templates) run in a plain jinja
    environment configured like transformers', without the sandbox's per-attribute checks (their cost: docs/data.md)."""
    if text not in {p.read_text(encoding="utf-8") for p in TEMPLATES.glob("*.jinja")}:
        return _compile_jinja_template(text)

    def raise_exception(message):
        raise jinja2.TemplateError(message)

    def tojson(x, ensure_ascii=False, indent=None, separators=None, sort_keys=False):
        return json.dumps(x, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys)

    env = jinja2.Environment(trim_blocks=True, lstrip_blocks=True, extensions=["jinja2.ext.loopcontrols"])
    env.filters["tojson"] = tojson
    env.globals["raise_exception"] = raise_exception
    return env.from_string(text)


class Renderer:
    """Renders records with one tokenizer and chat template; picklable (for `datasets.map(num_proc=...)`)."""

    def __init__(self, tokenizer, opts: RenderOptions):
        if tokenizer.bos_token_id is None or tokenizer.eos_token_id is None:
            raise ValueError("the tokenizer has no <bos> or <eos> token")
        self.tokenizer = tokenizer
        self.opts = opts
        self.bos, self.eos = tokenizer.bos_token_id, tokenizer.eos_token_id
        self.template_kwargs = {k: v for k, v in tokenizer.special_tokens_map.items() if isinstance(v, str)}
        special = {t.content for t in tokenizer.added_tokens_decoder.values() if t.special}
        special |= set(tokenizer.all_special_tokens)
        # Longest first, so '<start_of_turn>' is reported rather than a shorter token inside it.
        self.control = re.compile("|".join(re.escape(t) for t in sorted(special, key=len, reverse=True)))
        self._template = None

    def __getstate__(self):
        return {**self.__dict__, "_template": None}  # a compiled jinja template does not pickle

    def template(self):
        if self._template is None:
            if not self.tokenizer.chat_template:
                raise ValueError("the tokenizer has no chat template (model.chat_template)")
            self._template = compile_template(self.tokenizer.chat_template)
        return self._template

    def chat_text(self, messages: list[dict[str, str]], add_generation_prompt: bool = False) -> str:
        try:
            return self.template().render(
                messages=messages, add_generation_prompt=add_generation_prompt, **self.template_kwargs
            )
        except jinja2.TemplateError as e:
            raise RecordProblem("messages", f"the chat template rejected the conversation: {e}") from None

    def check_text(self, text: str, field: str) -> None:
        hit = self.control.search(text)
        if hit:
            raise RecordProblem(
                field,
                f"contains the control token '{hit.group()}' as text (the tokenizer would read "
                f"it as a marker, not text); remove or escape it",
            )

    def plan(self, record: dict[str, Any], declared: str) -> tuple[list[str], list[bool], bool]:
        """Text pieces, whether the loss covers each, and whether <eos> follows."""
        fmt = record_format(record, declared)
        if fmt == "messages":
            msgs, trained = normalize_messages(record["messages"], self.opts.system_message, self.check_text)
            return self.plan_chat(msgs, trained)
        # prompt_completion or text: strings, the last one (what is learned) not blank
        fields = FORMATS[fmt]
        texts: list[str] = []
        for k in fields:
            text = record.get(k)
            if not isinstance(text, str):
                raise not_a_string(k, text)
            texts.append(text)
        if not texts[-1].strip():
            raise RecordProblem(fields[-1], "is empty")
        for k, text in zip(fields, texts, strict=True):
            self.check_text(text, k)
        trained = [True] if fmt == "text" else [not self.opts.completion_only_loss, True]
        return texts, trained, True

    def plan_chat(self, msgs: list[dict[str, str]], trained: list[bool]) -> tuple[list[str], list[bool], bool]:
        text = self.chat_text(msgs)
        if not self.opts.assistant_only_loss:
            return [text], [True], False
        # Assistant turn i is the text between the rendering of msgs[:i] with the generation prompt (which ends
        # in the model header) and the rendering of msgs[:i+1]; this holds for any prefix-stable template.
        pieces, flags, pos = [], [], 0
        for i, m in enumerate(msgs):
            if m["role"] != "assistant" or not trained[i]:
                continue
            before = self.chat_text(msgs[:i], add_generation_prompt=True)
            upto = text if i == len(msgs) - 1 else self.chat_text(msgs[: i + 1])
            if not (text.startswith(upto) and upto.startswith(before)):
                raise RecordProblem(
                    "messages",
                    "the chat template does not render the start of this conversation "
                    "as the start of the whole, so assistant turns cannot be located "
                    "(check model.chat_template)",
                )
            pieces += [text[pos : len(before)], text[len(before) : len(upto)]]
            flags += [False, True]
            pos = len(upto)
        return [*pieces, text[pos:]], [*flags, False], False

    def encode(self, texts: list[str]) -> list[list[int]]:
        backend = getattr(self.tokenizer, "backend_tokenizer", None)
        if backend is None:
            return self.tokenizer(texts, add_special_tokens=False)["input_ids"]
        # The Rust tokenizer directly: same ids as tokenizer(texts, add_special_tokens=False), without the
        # Python wrapper's per-call overhead (most of the time for short records).
        encode = getattr(backend, "encode_batch_fast", backend.encode_batch)
        return [e.ids for e in encode(texts, add_special_tokens=False)]

    def render_many(self, records: list[dict[str, Any]], formats: list[str]) -> list[Rendered | RecordProblem]:
        """Render a batch: plans per record, one tokenizer call for every piece of the batch."""
        plans: list[Any] = []
        pieces: list[str] = []
        for record, fmt in zip(records, formats, strict=True):
            try:
                p, flags, eos = self.plan(record, fmt)
            except RecordProblem as problem:
                plans.append(problem)
                continue
            plans.append((len(pieces), flags, eos))
            pieces += p
        encoded = self.encode(pieces) if pieces else []
        out: list[Rendered | RecordProblem] = []
        for plan in plans:
            if isinstance(plan, RecordProblem):
                out.append(plan)
                continue
            first, flags, eos = plan
            ids: list[int] = []
            labels: list[int] = []
            for tok, supervised in zip(encoded[first : first + len(flags)], flags, strict=True):
                ids += tok
                labels += tok if supervised else [IGNORE_INDEX] * len(tok)
            tail = [self.eos] if eos else []
            out.append(self.finish(ids + tail, labels + tail))
        return out

    def finish(self, ids: list[int], labels: list[int]) -> Rendered | RecordProblem:
        ids, labels = with_single_bos(ids, labels, self.bos)
        if self.bos in ids[1:]:
            return RecordProblem(
                "(record)",
                f"<bos> (id {self.bos}) inside the example: the chat template emits it "
                f"more than once (check model.chat_template)",
            )
        supervised = [k for k, label in enumerate(labels) if label != IGNORE_INDEX]
        if not supervised:
            return RecordProblem("(record)", "no supervised token (every assistant message has weight 0)")
        limit = self.opts.max_seq_length
        if supervised[0] >= limit:
            return RecordProblem(
                "(record)",
                f"no supervised token left after truncation to max_seq_length={limit} "
                f"(the example has {len(ids)} tokens, the first supervised one is token "
                f"{supervised[0] + 1}); shorten the prompt or raise data.max_seq_length",
            )
        return Rendered(ids[:limit], labels[:limit], len(ids), len(ids) > limit)
