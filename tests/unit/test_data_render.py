"""Rendering: exact token ids and label masks of Gemma chat examples, on the tiny model's real tokenizer.

Direct calls (no CLI): the tokenizer is loaded once from the fixture's snapshot with the shipped template.
"""

from __future__ import annotations

import json

import pytest

from core.records.render import IGNORE_INDEX, RecordProblem, Rendered, Renderer, RenderOptions
from tests.conftest import ROOT
from train.data import Example, show_example

TEMPLATE = ROOT / "core" / "templates" / "gemma.jinja"
# google/gemma-2-2b-it's template as it was before the tool/system extension (git 1cc2cf8): the extension
# must render plain user/assistant conversations byte for byte like it.
ORIGINAL_GEMMA_TEMPLATE = (
    "{{ bos_token }}{% if messages[0]['role'] == 'system' %}{{ raise_exception('System role not supported') }}"
    "{% endif %}{% for message in messages %}{% if (message['role'] == 'user') != (loop.index0 % 2 == 0) %}"
    "{{ raise_exception('Conversation roles must alternate user/assistant/user/assistant/...') }}{% endif %}"
    "{% if (message['role'] == 'assistant') %}{% set role = 'model' %}{% else %}{% set role = message['role'] %}"
    "{% endif %}{{ '<start_of_turn>' + role + '\n' + message['content'] | trim + '<end_of_turn>\n' }}{% endfor %}"
    "{% if add_generation_prompt %}{{'<start_of_turn>model\n'}}{% endif %}"
)

# A Gemma chat example with a system message, a tool call (OpenAI style: arguments as JSON text), its
# result, and a second user turn.
AGENT_RECORD = {
    "messages": [
        {"role": "system", "content": "You are Wren."},
        {"role": "user", "content": "Is nginx up?"},
        {
            "role": "assistant",
            "content": None,
            "tool_calls": [
                {"id": "c1", "type": "function", "function": {"name": "status", "arguments": '{"service": "nginx"}'}}
            ],
        },
        {"role": "tool", "tool_call_id": "c1", "content": "active"},
        {"role": "assistant", "content": "Yes, nginx is up."},
        {"role": "user", "content": "Thanks"},
        {"role": "assistant", "content": "Any time."},
    ]
}
AGENT_TEXT = (
    "<bos><start_of_turn>user\nYou are Wren.\n\nIs nginx up?<end_of_turn>\n"
    "<start_of_turn>model\n"
    '<tool_call>{"name": "status", "arguments": {"service": "nginx"}}</tool_call><end_of_turn>\n'
    "<start_of_turn>user\n<tool_response>active</tool_response><end_of_turn>\n"
    "<start_of_turn>model\nYes, nginx is up.<end_of_turn>\n"
    "<start_of_turn>user\nThanks<end_of_turn>\n"
    "<start_of_turn>model\nAny time.<end_of_turn>\n"
)
# Token ids of AGENT_TEXT with the tiny tokenizer (bos=2, <start_of_turn>=4, <end_of_turn>=5, "\n"=16).
AGENT_IDS = [
    2,
    4,
    573,
    266,
    16,
    320,
    288,
    293,
    713,
    16,
    16,
    623,
    609,
    306,
    729,
    5,
    16,
    4,
    716,
    708,
    715,
    701,
    709,
    16,
    742,
    315,
    733,
    314,
    390,
    383,
    284,
    285,
    558,
    599,
    332,
    285,
    385,
    284,
    382,
    400,
    284,
    285,
    525,
    522,
    315,
    733,
    314,
    741,
    5,
    16,
    4,
    573,
    266,
    16,
    742,
    315,
    733,
    345,
    717,
    272,
    304,
    741,
    703,
    711,
    336,
    727,
    701,
    386,
    315,
    733,
    345,
    717,
    272,
    304,
    741,
    5,
    16,
    4,
    716,
    708,
    715,
    701,
    709,
    16,
    746,
    274,
    718,
    609,
    282,
    306,
    713,
    5,
    16,
    4,
    573,
    266,
    16,
    734,
    562,
    702,
    5,
    16,
    4,
    716,
    708,
    715,
    701,
    709,
    16,
    749,
    707,
    720,
    268,
    705,
    270,
    713,
    5,
    16,
]
# The supervised token ranges: each assistant turn's content through its <end_of_turn> and "\n".
AGENT_SUPERVISED = [range(24, 50), range(84, 93), range(109, 118)]


def render(tok, record: dict, **opts) -> Rendered | RecordProblem:
    return Renderer(tok, RenderOptions(**{"max_seq_length": 512, **opts})).render_many([record], ["auto"])[0]


def supervised_text(tok, r: Rendered) -> list[str]:
    """Decoded runs of supervised tokens."""
    runs, cur = [], []
    for t, label in zip(r.input_ids, r.labels, strict=True):
        if label != IGNORE_INDEX:
            cur.append(t)
        elif cur:
            runs.append(tok.decode(cur))
            cur = []
    return runs + ([tok.decode(cur)] if cur else [])


def test_agent_trace_token_ids_and_label_mask_are_pinned(tok):
    r = render(tok, AGENT_RECORD)
    assert isinstance(r, Rendered)
    assert r.input_ids == AGENT_IDS
    supervised = {i for span in AGENT_SUPERVISED for i in span}
    assert r.labels == [t if i in supervised else IGNORE_INDEX for i, t in enumerate(AGENT_IDS)]
    assert tok.decode(r.input_ids) == AGENT_TEXT
    assert supervised_text(tok, r) == [
        '<tool_call>{"name": "status", "arguments": {"service": "nginx"}}</tool_call><end_of_turn>\n',
        "Yes, nginx is up.<end_of_turn>\n",
        "Any time.<end_of_turn>\n",
    ]
    assert (r.length, r.truncated) == (118, False)


def test_rendering_matches_the_template_and_inference_tokenization(tok):
    # The text is what transformers' apply_chat_template renders (the template the GGUF ships), after the
    # system merge; the tokens equal tokenizing that whole text (no drift from tokenizing in pieces).
    merged = [{"role": "user", "content": "You are Wren.\n\nIs nginx up?"}] + [
        {"role": m["role"], "content": m["content"]} for m in AGENT_RECORD["messages"][2:]
    ]
    merged[1]["content"] = '<tool_call>{"name": "status", "arguments": {"service": "nginx"}}</tool_call>'
    assert tok.apply_chat_template(merged, tokenize=False) == AGENT_TEXT
    assert tok(AGENT_TEXT, add_special_tokens=False)["input_ids"] == AGENT_IDS
    # The template merges a system message itself exactly as the data stage does, so an application that
    # sends one at inference gets the prompt the model was trained on.
    native = [{k: v for k, v in m.items() if k in ("role", "content")} for m in AGENT_RECORD["messages"]]
    native[2]["content"] = merged[1]["content"]
    assert tok.apply_chat_template(native, tokenize=False) == AGENT_TEXT


def test_template_extension_keeps_plain_gemma_conversations_byte_identical(tok):
    rows = [json.loads(line) for line in (ROOT / "data" / "demo" / "chat.jsonl").read_text().splitlines()]
    convs = [[m for m in r["messages"] if m["role"] != "system"] for r in rows[:60]]
    convs.append(
        [
            {"role": "user", "content": "  a \n"},
            {"role": "assistant", "content": "\nb "},
            {"role": "user", "content": "c"},
            {"role": "assistant", "content": "d"},
        ]
    )
    for conv in convs:
        for k in range(1, len(conv) + 1):
            for gen in (False, True):
                ours = tok.apply_chat_template(conv[:k], tokenize=False, add_generation_prompt=gen)
                assert ours == tok.apply_chat_template(
                    conv[:k], tokenize=False, add_generation_prompt=gen, chat_template=ORIGINAL_GEMMA_TEMPLATE
                )


def test_llama_cpp_python_renders_tool_turns_like_transformers(tok):
    # The GGUF carries this template; llama-cpp-python renders it with its own jinja2 environment.
    from llama_cpp.llama_chat_format import Jinja2ChatFormatter

    msgs = [
        {"role": "system", "content": "S"},
        {"role": "user", "content": "u"},
        {"role": "assistant", "content": "<tool_call>{}</tool_call>"},
        {"role": "tool", "content": "r1"},
        {"role": "tool", "content": "r2"},
    ]
    fmt = Jinja2ChatFormatter(
        template=tok.chat_template, eos_token="<eos>", bos_token="<bos>", add_generation_prompt=True
    )
    expected = (
        "<bos><start_of_turn>user\nS\n\nu<end_of_turn>\n<start_of_turn>model\n<tool_call>{}</tool_call>"
        "<end_of_turn>\n<start_of_turn>user\n<tool_response>r1</tool_response>\n"
        "<tool_response>r2</tool_response><end_of_turn>\n<start_of_turn>model\n"
    )
    assert fmt(messages=msgs).prompt == expected
    assert tok.apply_chat_template(msgs, tokenize=False, add_generation_prompt=True) == expected


def test_exactly_one_bos_whatever_template_and_tokenizer_do(tok, monkeypatch):
    # A template that emits <bos> twice, and a tokenizer whose add_bos would add a third: still one.
    double = "{{ bos_token }}" + TEMPLATE.read_text(encoding="utf-8")
    monkeypatch.setattr(tok, "chat_template", double)
    rec = {"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "yo"}]}
    r = render(tok, rec)
    assert r.input_ids[:2] == [tok.bos_token_id, 4] and r.input_ids.count(tok.bos_token_id) == 1
    assert r.labels[0] == IGNORE_INDEX
    # text and prompt/completion: no template; the tokenizer's own <bos> (add_bos_token) is not doubled either
    for rec in ({"text": "hello there"}, {"prompt": "hi", "completion": "yo"}):
        r = render(tok, rec)
        assert r.input_ids[0] == tok.bos_token_id and r.input_ids.count(tok.bos_token_id) == 1


def test_prompt_completion_and_text_formats(tok):
    eos = tok.eos_token_id
    p_ids = tok("Q: 2+2?", add_special_tokens=False)["input_ids"]
    c_ids = tok(" 4", add_special_tokens=False)["input_ids"]
    r = render(tok, {"prompt": "Q: 2+2?", "completion": " 4"})
    assert r.input_ids == [2, *p_ids, *c_ids, eos]
    assert r.labels == [IGNORE_INDEX] * (1 + len(p_ids)) + c_ids + [eos]
    r = render(tok, {"prompt": "Q: 2+2?", "completion": " 4"}, completion_only_loss=False)
    assert r.labels == [IGNORE_INDEX, *p_ids, *c_ids, eos]
    t_ids = tok("Plain text.", add_special_tokens=False)["input_ids"]
    r = render(tok, {"text": "Plain text."})
    assert r.input_ids == [2, *t_ids, eos] and r.labels == [IGNORE_INDEX, *t_ids, eos]


def test_loss_options_weight_zero_and_whole_conversation(tok):
    rec = {
        "messages": [
            {"role": "user", "content": "a"},
            {"role": "assistant", "content": "b", "weight": 0},
            {"role": "user", "content": "c"},
            {"role": "assistant", "content": "d"},
        ]
    }
    assert supervised_text(tok, render(tok, rec)) == ["d<end_of_turn>\n"]
    whole = render(tok, rec, assistant_only_loss=False)
    assert whole.labels == [IGNORE_INDEX] + whole.input_ids[1:]
    only_weight_zero = {"messages": rec["messages"][:2]}
    problem = render(tok, only_weight_zero)
    assert (problem.field, problem.reason) == ("(record)", "no supervised token (every assistant message has weight 0)")


def test_truncation_keeps_the_start_and_counts(tok):
    rec = {"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "a long answer " * 20}]}
    full = render(tok, rec)
    cut = render(tok, rec, max_seq_length=40)
    assert cut.truncated and cut.length == len(full.input_ids) > 40
    assert cut.input_ids == full.input_ids[:40] and cut.labels == full.labels[:40]


def test_system_message_policies(tok):
    rec = {
        "messages": [
            {"role": "system", "content": " Be brief. "},
            {"role": "user", "content": " hi"},
            {"role": "assistant", "content": "yo"},
        ]
    }
    merged = render(tok, rec)
    assert tok.decode(merged.input_ids).startswith("<bos><start_of_turn>user\nBe brief.\n\nhi<end_of_turn>")
    problem = render(tok, rec, system_message="error")
    assert (problem.field, problem.reason) == (
        "messages[0].role",
        "system messages are rejected (data.system_message=error); remove it, or set data.system_message=merge",
    )
    # 'keep' hands the system message to the template: the gemma template merges it the same way
    assert render(tok, rec, system_message="keep").input_ids == merged.input_ids


def test_show_example_marks_exactly_the_supervised_spans(tok):
    r = render(tok, {"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "yo"}]})
    shown = show_example(tok, Example(r.input_ids, r.labels, "x"))
    assert shown == "<bos><start_of_turn>user\nhi<end_of_turn>\n<start_of_turn>model\n[[yo<end_of_turn>\n]]"


def test_our_template_renders_exactly_like_apply_chat_template(tok):
    # Built-in templates render in a plain jinja environment (speed), any other in transformers' sandbox:
    # both must give apply_chat_template's text, and its errors.
    from core.records.render import compile_template

    assert type(compile_template(tok.chat_template).environment).__name__ == "Environment"
    assert "Sandboxed" in type(compile_template(ORIGINAL_GEMMA_TEMPLATE).environment).__name__
    renderer = Renderer(tok, RenderOptions(max_seq_length=512, system_message="keep"))
    rows = [json.loads(line) for line in (ROOT / "data" / "demo" / "chat.jsonl").read_text().splitlines()]
    convs = (
        [r["messages"] for r in rows[:80]]
        + [[{"role": "system", "content": "S"}, *m] for m in ([{"role": "user", "content": "u"}],)]
        + [
            [
                {"role": "user", "content": "u"},
                {"role": "assistant", "content": "<tool_call>{}</tool_call>"},
                {"role": "tool", "content": "r1"},
                {"role": "tool", "content": " r2 "},
                {"role": "assistant", "content": "a"},
            ]
        ]
    )
    for conv in convs:
        for gen in (False, True):
            expected = tok.apply_chat_template(conv, tokenize=False, add_generation_prompt=gen)
            assert renderer.chat_text(conv, add_generation_prompt=gen) == expected
    for bad in (
        [{"role": "user", "content": "a"}, {"role": "user", "content": "b"}],
        [{"role": "assistant", "content": "a"}],
        [{"role": "user", "content": "a"}, {"role": "tool", "content": "r"}],
        [{"role": "user", "content": "a"}, {"role": "bot", "content": "b"}],
    ):
        from jinja2 import TemplateError

        with pytest.raises(TemplateError) as err:
            tok.apply_chat_template(bad, tokenize=False)
        with pytest.raises(RecordProblem) as problem:
            renderer.chat_text(bad)
        assert problem.value.reason == f"the chat template rejected the conversation: {err.value}"
