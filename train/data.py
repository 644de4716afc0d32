"""Training data: read records, render them with the chat template, mark what the loss sees.

Three record formats, detected per record:
- chat:        {"messages": [{"role": "system"|"user"|"assistant", "content": str}, ...]}
- completion:  {"prompt": str, "completion": str}
- text:        {"text": str}

Chat records are rendered with the tokenizer's chat template; the loss covers each assistant turn's
content and its `<end_of_turn>\\n` (so the model learns to stop), never the `<start_of_turn>model\\n`
header or user text. Every example starts with exactly one <bos>.

Problems are collected for the whole input and reported together as `file:line: field: reason`.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

IGNORE_INDEX = -100  # labels the loss skips (torch CrossEntropyLoss ignore_index)


class DataError(ValueError):
    """Invalid training data; `problems` holds one `file:line: field: reason` line each."""

    def __init__(self, problems: list[str]):
        self.problems = problems
        shown = problems[:50]
        more = f"\n  ... and {len(problems) - 50} more" if len(problems) > 50 else ""
        super().__init__(f"{len(problems)} data problem(s):\n  " + "\n  ".join(shown) + more)


@dataclass
class Example:
    input_ids: list[int]
    labels: list[int]
    source: str  # file:line
    truncated: bool = False


@dataclass
class DataStats:
    records: int = 0
    tokens: int = 0
    supervised_tokens: int = 0
    truncated: int = 0
    per_file: dict[str, int] = field(default_factory=dict)


def read_jsonl(path: Path, problems: list[str]) -> list[tuple[str, dict[str, Any]]]:
    """Parse a JSONL file into (file:line, record) pairs; unparseable lines become problems."""
    rows = []
    try:
        raw = path.read_bytes()
    except OSError as e:
        problems.append(f"{path}: cannot read: {e.strerror}")
        return rows
    if not raw.strip():
        problems.append(f"{path}: file is empty")
        return rows
    for n, line in enumerate(raw.split(b"\n"), start=1):
        where = f"{path}:{n}"
        if not line.strip():
            continue
        try:
            record = json.loads(line.decode("utf-8"))
        except UnicodeDecodeError as e:
            problems.append(f"{where}: (line): not UTF-8 at byte {e.start}")
            continue
        except json.JSONDecodeError as e:
            problems.append(f"{where}: (line): invalid JSON: {e.msg} at column {e.colno}")
            continue
        if not isinstance(record, dict):
            problems.append(f"{where}: (line): expected a JSON object, got {type(record).__name__}")
            continue
        rows.append((where, record))
    return rows


def _check_messages(where: str, messages: Any, system_message: str) -> list[dict] | str:
    """Validate chat messages; return them normalised for the Gemma template, or a problem string."""
    if not isinstance(messages, list) or not messages:
        return f"{where}: messages: must be a non-empty list"
    out = []
    for i, m in enumerate(messages):
        if not isinstance(m, dict) or not isinstance(m.get("role"), str) or not isinstance(m.get("content"), str):
            return f"{where}: messages[{i}]: needs string 'role' and 'content'"
        if m["role"] not in ("system", "user", "assistant"):
            return f"{where}: messages[{i}].role: '{m['role']}' is not one of system, user, assistant"
        out.append({"role": m["role"], "content": m["content"]})
    if out[0]["role"] == "system":
        if system_message == "error":
            return f"{where}: messages[0].role: system messages are rejected (data.system_message=error)"
        system = out.pop(0)
        if not out or out[0]["role"] != "user":
            return f"{where}: messages[1].role: a system message must be followed by a user message"
        # Gemma has no system role; its own -it models were trained with instructions in the user turn.
        out[0] = {"role": "user", "content": system["content"].strip() + "\n\n" + out[0]["content"]}
    for i, m in enumerate(out):
        expected = "user" if i % 2 == 0 else "assistant"
        if m["role"] != expected:
            return f"{where}: messages: roles must alternate user/assistant; turn {i} is '{m['role']}'"
        if m["role"] == "assistant" and not m["content"].strip():
            return f"{where}: messages[{i}].content: assistant message is empty"
    if out[-1]["role"] != "assistant":
        return f"{where}: messages: last message must be from the assistant (nothing to learn otherwise)"
    return out


def render_chat(tokenizer, messages: list[dict]) -> tuple[list[int], list[int]]:
    """Token ids and labels for a validated conversation; labels are IGNORE_INDEX outside assistant spans.

    Spans are found on the rendered text: the assistant turn i occupies the characters between the
    rendering of messages[:i] with a generation prompt and the rendering of messages[:i+1]. Mapping
    characters to tokens through the tokenizer's offsets keeps this exact for any template.
    """
    text = tokenizer.apply_chat_template(messages, tokenize=False)
    spans = []
    for i, m in enumerate(messages):
        if m["role"] != "assistant":
            continue
        before = tokenizer.apply_chat_template(messages[:i], tokenize=False, add_generation_prompt=True)
        upto = tokenizer.apply_chat_template(messages[: i + 1], tokenize=False)
        if not text.startswith(upto) or not upto.startswith(before):
            raise ValueError("chat template is not prefix-stable; cannot locate assistant turns")
        spans.append((len(before), len(upto)))
    enc = tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)
    labels = [
        tok if any(s <= start < e for s, e in spans) else IGNORE_INDEX
        for tok, (start, _end) in zip(enc["input_ids"], enc["offset_mapping"], strict=True)
    ]
    return enc["input_ids"], labels


def render_record(tokenizer, record: dict, where: str, system_message: str) -> tuple[list[int], list[int]] | str:
    """Render one record of any format; a string return is a problem report."""
    if "messages" in record:
        messages = _check_messages(where, record["messages"], system_message)
        if isinstance(messages, str):
            return messages
        ids, labels = render_chat(tokenizer, messages)
    elif "prompt" in record or "completion" in record:
        p, c = record.get("prompt"), record.get("completion")
        if not isinstance(p, str) or not isinstance(c, str):
            return f"{where}: prompt/completion: both must be strings"
        if not c.strip():
            return f"{where}: completion: is empty"
        p_ids = tokenizer(p, add_special_tokens=False)["input_ids"]
        c_ids = tokenizer(c, add_special_tokens=False)["input_ids"] + [tokenizer.eos_token_id]
        ids, labels = p_ids + c_ids, [IGNORE_INDEX] * len(p_ids) + c_ids
    elif "text" in record:
        if not isinstance(record["text"], str) or not record["text"].strip():
            return f"{where}: text: must be a non-empty string"
        ids = tokenizer(record["text"], add_special_tokens=False)["input_ids"] + [tokenizer.eos_token_id]
        labels = list(ids)
    else:
        return f"{where}: (record): no 'messages', 'prompt'/'completion' or 'text' field (keys: {sorted(record)})"
    return with_single_bos(ids, labels, tokenizer.bos_token_id)


def with_single_bos(ids: list[int], labels: list[int], bos: int) -> tuple[list[int], list[int]]:
    """Exactly one <bos>, first, never supervised: a template's <bos> plus the tokenizer's is a silent
    quality loss for Gemma (GEMMA_NOTES.md)."""
    while ids and ids[0] == bos:
        ids, labels = ids[1:], labels[1:]
    return [bos] + ids, [IGNORE_INDEX] + labels


def load_examples(tokenizer, files: list[str], max_seq_length: int, system_message: str) -> tuple[list[Example], DataStats]:
    """Read, validate and tokenize every record of `files`. Raises DataError listing every problem."""
    problems: list[str] = []
    examples: list[Example] = []
    stats = DataStats()
    for name in files:
        path = Path(name)
        if not path.is_file():
            problems.append(f"{path}: file not found (paths are relative to {Path.cwd()})")
            continue
        rows = read_jsonl(path, problems)
        stats.per_file[str(path)] = len(rows)
        for where, record in rows:
            out = render_record(tokenizer, record, where, system_message)
            if isinstance(out, str):
                problems.append(out)
                continue
            ids, labels = out
            truncated = len(ids) > max_seq_length
            ids, labels = ids[:max_seq_length], labels[:max_seq_length]
            if all(label == IGNORE_INDEX for label in labels):
                problems.append(f"{where}: (record): no supervised token left after truncation to "
                                f"max_seq_length={max_seq_length}; shorten the prompt or raise data.max_seq_length")
                continue
            examples.append(Example(ids, labels, where, truncated))
            stats.records += 1
            stats.tokens += len(ids)
            stats.supervised_tokens += sum(label != IGNORE_INDEX for label in labels)
            stats.truncated += truncated
    if problems:
        raise DataError(problems)
    return examples, stats


def fingerprint(examples: list[Example]) -> str:
    """sha256 of the data as trained on (token ids and labels), independent of file names."""
    h = hashlib.sha256()
    for ex in examples:
        h.update(json.dumps([ex.input_ids, ex.labels]).encode())
    return h.hexdigest()


def collate(batch: list[dict], pad_id: int) -> dict:
    """Right-pad a batch (Gemma: right padding for training; pad id 0 is not eos)."""
    import torch

    width = max(len(b["input_ids"]) for b in batch)
    ids = torch.full((len(batch), width), pad_id, dtype=torch.long)
    labels = torch.full((len(batch), width), IGNORE_INDEX, dtype=torch.long)
    mask = torch.zeros((len(batch), width), dtype=torch.long)
    for i, b in enumerate(batch):
        n = len(b["input_ids"])
        ids[i, :n] = torch.tensor(b["input_ids"])
        labels[i, :n] = torch.tensor(b["labels"])
        mask[i, :n] = 1
    return {"input_ids": ids, "labels": labels, "attention_mask": mask}


def show_example(tokenizer, ex: Example) -> str:
    """Render an example with the supervised spans in [[...]] for --dry-run."""
    out, inside = [], False
    for tok, label in zip(ex.input_ids, ex.labels, strict=True):
        sup = label != IGNORE_INDEX
        if sup != inside:
            out.append("[[" if sup else "]]")
            inside = sup
        out.append(tokenizer.decode([tok]))
    if inside:
        out.append("]]")
    return "".join(out)
