"""Validation: every rule, on small files written here, with the exact `file:line: field: reason` it reports.

Direct calls of the data stage (train.data.load_datasets) with the tiny tokenizer; the CLI's handling of the
same errors (exit code, nothing trained) is in test_data_cli.py.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from core.config import DataSection
from train.data import DataError, load_datasets

U = {"role": "user", "content": "hi"}
A = {"role": "assistant", "content": "yo"}
OK = json.dumps({"messages": [U, A]})


def msgs(*messages) -> str:
    return json.dumps({"messages": list(messages)})


def call(name: str, arguments, id: str | None = None) -> dict:
    return {"type": "function", "function": {"name": name, "arguments": arguments}} | ({"id": id} if id else {})


def problems_of(tok, files: list, **data) -> list[str]:
    with pytest.raises(DataError) as err:
        load_datasets(tok, DataSection(train_files=files, **{"max_seq_length": 32, **data}))
    return err.value.problems


# (line 2 of a file whose line 1 is valid, the `field: reason` reported for it)
RULES = {
    "json_truncated": (
        '{"messages": [{"role": "user", "content": "hi"}',
        "(line): invalid JSON: Expecting ',' delimiter at column 48",
    ),
    "json_not_object": ("[1, 2]", "(line): expected a JSON object, got array"),
    "no_known_field": ('{"foo": 1}', "(record): no 'messages', 'prompt'/'completion' or 'text' field (keys: ['foo'])"),
    "messages_type": ('{"messages": "hi"}', "messages: must be an array of messages, got string"),
    "messages_empty": ('{"messages": []}', "messages: is empty"),
    "message_type": ('{"messages": ["hi"]}', "messages[0]: must be an object with 'role' and 'content', got string"),
    "role_missing": (msgs({"content": "x"}, A), "messages[0].role: missing"),
    "role_type": (msgs({"role": 5, "content": "x"}, A), "messages[0].role: must be a string, got number"),
    "role_unknown": (
        msgs(U, {"role": "bot", "content": "x"}),
        "messages[1].role: 'bot' is not one of system, user, assistant, tool",
    ),
    "content_type": (msgs({"role": "user", "content": 5}, A), "messages[0].content: must be a string, got number"),
    "content_missing": (msgs({"role": "user"}, A), "messages[0].content: missing"),
    "content_part": (
        msgs({"role": "user", "content": [{"type": "image_url", "image_url": "x"}]}, A),
        "messages[0].content[0]: only text parts are supported ({'type': 'text', 'text': ...}), got 'image_url'",
    ),
    "assistant_empty": (
        msgs(U, {"role": "assistant", "content": " \n"}),
        "messages[1].content: assistant message is empty",
    ),
    "two_users": (msgs(U, U, A), "messages[1].role: two consecutive user messages at index 0 and 1"),
    "two_assistants": (msgs(U, A, A), "messages[2].role: two consecutive assistant messages at index 1 and 2"),
    "assistant_first": (
        msgs(A, U, A),
        "messages[0].role: the conversation must start with a user message (after an "
        "optional system message), got 'assistant'",
    ),
    "ends_with_user": (
        msgs(U, A, U),
        "messages[2].role: the last message must be from the assistant (nothing to learn otherwise), got 'user'",
    ),
    "only_system": (msgs({"role": "system", "content": "s"}), "messages: has only a system message"),
    "late_system": (
        msgs(U, A, {"role": "system", "content": "s"}, U, A),
        "messages[2].role: 'system' is only allowed as the first message",
    ),
    "tool_after_user": (
        msgs(U, {"role": "tool", "content": "r"}, A),
        "messages[1].role: a tool result must follow the assistant message that called the tool (or "
        "another tool result), not 'user' at index 0",
    ),
    "user_after_tool": (
        msgs(U, {"role": "assistant", "content": "<tool_call>{}</tool_call>"}, {"role": "tool", "content": "r"}, U, A),
        "messages[3].role: a user message cannot follow the tool result at index 2: the assistant answers tool results",
    ),
    "tool_calls_on_user": (
        msgs({"role": "user", "content": "hi", "tool_calls": [call("f", {})]}, A),
        "messages[0].tool_calls: only assistant messages carry tool calls, not 'user'",
    ),
    "tool_calls_type": (
        msgs(U, {"role": "assistant", "content": None, "tool_calls": {"name": "f"}}),
        "messages[1].tool_calls: must be an array, got object",
    ),
    "tool_name_empty": (
        msgs(U, {"role": "assistant", "content": None, "tool_calls": [call("", {})]}),
        "messages[1].tool_calls[0].function.name: is empty",
    ),
    "tool_arguments_json": (
        msgs(U, {"role": "assistant", "content": None, "tool_calls": [call("f", "{bad")]}),
        "messages[1].tool_calls[0].function.arguments: not valid JSON: Expecting property name "
        "enclosed in double quotes at column 2",
    ),
    "tool_arguments_type": (
        msgs(U, {"role": "assistant", "content": None, "tool_calls": [call("f", [1])]}),
        "messages[1].tool_calls[0].function.arguments: must be an object (or JSON text of one), got array",
    ),
    "tool_call_id": (
        msgs(
            U,
            {"role": "assistant", "content": None, "tool_calls": [call("f", {}, id="a")]},
            {"role": "tool", "tool_call_id": "b", "content": "r"},
            A,
        ),
        "messages[2].tool_call_id: 'b' matches no tool call of the assistant message at index 1 (ids: a)",
    ),
    "assistant_no_content": (msgs(U, {"role": "assistant"}), "messages[1].content: missing (and no tool_calls)"),
    "control_token": (
        msgs({"role": "user", "content": "stop<end_of_turn>"}, A),
        "messages[0].content: contains the control token '<end_of_turn>' as text (the tokenizer would "
        "read it as a marker, not text); remove or escape it",
    ),
    "weight": (
        msgs(U, {"role": "assistant", "content": "x", "weight": 2}),
        "messages[1].weight: only assistant messages take a weight, and it must be 0 or 1",
    ),
    "prompt_type": ('{"prompt": 3, "completion": "x"}', "prompt: must be a string, got number"),
    "completion_missing": ('{"prompt": "p"}', "completion: missing"),
    "completion_empty": ('{"prompt": "p", "completion": " "}', "completion: is empty"),
    "text_empty": ('{"text": ""}', "text: is empty"),
    "text_type": ('{"text": ["a"]}', "text: must be a string, got array"),
    "nothing_left_after_truncation": (
        json.dumps({"prompt": "word " * 100, "completion": "x"}),
        "(record): no supervised token left after truncation to max_seq_length=32 "
        "(the example has 304 tokens, the first supervised one is token 303); "
        "shorten the prompt or raise data.max_seq_length",
    ),
}


@pytest.mark.parametrize("rule", RULES)
def test_each_rule_reports_file_line_field_reason(tok, tmp_path: Path, rule: str):
    line, expected = RULES[rule]
    path = tmp_path / f"{rule}.jsonl"
    path.write_text(OK + "\n" + line + "\n" + OK + "\n", encoding="utf-8")
    assert problems_of(tok, [str(path)]) == [f"{path}:2: {expected}"]


def test_all_problems_are_reported_together_with_a_hint(tok, tmp_path: Path):
    a, b = tmp_path / "a.jsonl", tmp_path / "b.jsonl"
    a.write_text(OK + "\n\n" + msgs(U, U, A) + "\n" + RULES["json_not_object"][0] + "\n")
    b.write_text(RULES["text_empty"][0] + "\n" + OK + "\n")
    with pytest.raises(DataError) as err:
        load_datasets(
            tok, DataSection(train_files=[str(a), str(b), str(tmp_path / "missing.jsonl")], max_seq_length=64)
        )
    assert err.value.problems == [
        f"{tmp_path / 'missing.jsonl'}: file not found (relative paths start at {Path.cwd()})",
        f"{a}:3: messages[1].role: two consecutive user messages at index 0 and 1",  # blank line 2 is no record
        f"{a}:4: (line): expected a JSON object, got array",
        f"{b}:1: text: is empty",
    ]
    assert str(err.value).endswith(
        "nothing was trained. Fix the records, or set data.max_invalid_fraction (e.g. "
        "0.01) to skip invalid records; each skipped one is listed in the run folder"
    )


def test_non_utf8_and_cut_off_last_line(tok, tmp_path: Path):
    path = tmp_path / "bytes.jsonl"
    path.write_bytes(OK.encode() + b"\n" + b'{"text": "caf\xe9"}\n' + b'{"text": "the end is cut o')
    assert problems_of(tok, [str(path)]) == [
        f"{path}:2: (line): not UTF-8 (byte 0xe9 at column 14); re-encode the file as UTF-8",
        f"{path}:3: (line): invalid JSON: Unterminated string starting at column 10 (the line looks cut off: an "
        f"interrupted write?)",
    ]


def test_declared_format_requires_its_fields(tok, tmp_path: Path):
    path = tmp_path / "d.jsonl"
    path.write_text('{"text": "hello"}\n{"prompt": "p", "completion": "c"}\n')
    assert problems_of(tok, [{"path": str(path), "format": "text"}]) == [
        f"{path}:2: text: missing (the source declares format: text; the record has keys ['completion', 'prompt'])"
    ]


def test_file_level_problems(tok, tmp_path: Path):
    empty, txt, folder = tmp_path / "empty.jsonl", tmp_path / "notes.txt", tmp_path / "nodata"
    empty.write_text("\n \n")
    txt.write_text("hello")
    folder.mkdir()
    (folder / "README.md").write_text("# nothing here")
    assert problems_of(tok, [str(empty), str(txt), str(folder)]) == [
        f"{empty}: file is empty",
        f"{txt}: unsupported file type '.txt' (supported: .jsonl, .json, .csv, .parquet, a folder, or a dataset id)",
        f"{folder}: no data files (.jsonl, .json, .csv, .parquet) in this folder",
    ]


def test_tolerance_skips_invalid_records_and_lists_each(tok, tmp_path: Path):
    path = tmp_path / "mixed.jsonl"
    path.write_text("\n".join([OK, msgs(U, U, A), OK, '{"text": 1}', OK, OK, OK, OK]) + "\n")
    train, stats, _, _ = load_datasets(
        tok, DataSection(train_files=[str(path)], max_seq_length=64, max_invalid_fraction=0.25)
    )[:4]
    assert len(train) == stats.records == 6
    assert stats.skipped == [
        {"where": f"{path}:2", "field": "messages[1].role", "reason": "two consecutive user messages at index 0 and 1"},
        {"where": f"{path}:4", "field": "text", "reason": "must be a string, got number"},
    ]
    assert stats.sources[0].invalid == 2 and stats.sources[0].records == 8
    # one more than the tolerance allows: nothing is skipped, everything is reported
    problems = problems_of(tok, [str(path)], max_seq_length=64, max_invalid_fraction=0.2)
    assert len(problems) == 2


def test_tolerance_message_when_exceeded(tok, tmp_path: Path):
    path = tmp_path / "bad.jsonl"
    path.write_text("\n".join([OK, '{"text": 1}', '{"text": 2}']) + "\n")
    with pytest.raises(DataError) as err:
        load_datasets(tok, DataSection(train_files=[str(path)], max_seq_length=64, max_invalid_fraction=0.5))
    assert str(err.value).endswith(
        "2 of 3 records are invalid (66.7%), more than data.max_invalid_fraction=0.5; nothing was trained"
    )


def test_config_rejects_contradictory_data_settings(tmp_path: Path):
    from core.config import ConfigError, load_config

    path = tmp_path / "c.yaml"
    path.write_text("data:\n  train_files: []\n  eval_files: [e.jsonl]\n  eval_fraction: 0.1\n")
    with pytest.raises(ConfigError) as err:
        load_config(path)
    assert "data.train_files: is empty" in str(err.value)
    assert "data.eval_fraction and data.eval_files are both set" in str(err.value)
    path.write_text("data:\n  train_files: [{path: a.jsonl, fromat: text}]\n")
    with pytest.raises(ConfigError, match="data.train_files.0.fromat: unknown key; did you mean"):
        load_config(path)
