"""The Ollama Modelfile renders conversations exactly as the tokenizer's chat template does.

Both sides render the same conversations: the Hugging Face tokenizer with the chat template we ship
(apply_chat_template), and the Modelfile's Go TEMPLATE through tests/support/go_template.py. Ollama adds <bos>
itself, so the Jinja text is compared without its leading <bos>.
"""

from __future__ import annotations

import re

import pytest

from convert.modelfile import TEMPLATE, modelfile_text, turn_end_token, write_modelfile
from tests.support.go_template import render

CONVERSATIONS = {
    "one user turn": [{"role": "user", "content": "Is the backup healthy?"}],
    "system merged into the first user turn": [
        {"role": "system", "content": "You are Wren, a concise home-lab assistant."},
        {"role": "user", "content": "Which disk is almost full?"},
        {"role": "assistant", "content": "The data volume is at 91%."},
        {"role": "user", "content": "And the system disk?"},
    ],
    "ends on an assistant turn": [
        {"role": "user", "content": "hi"},
        {"role": "assistant", "content": "Hello! Ask me about disks,\nbackups or GPUs."},
    ],
    "tool results, consecutive ones in one user turn": [
        {"role": "user", "content": "Check the GPUs and the disks."},
        {"role": "assistant", "content": '<tool_call>{"name": "gpu_status", "arguments": {}}</tool_call>'},
        {"role": "tool", "content": '{"gpus": [{"temp": 61}]}'},
        {"role": "tool", "content": '{"disks": {"data": "91%"}}'},
        {"role": "assistant", "content": "GPU at 61 C; the data disk is at 91%."},
        {"role": "user", "content": "Thanks."},
    ],
    "ends on a tool result": [
        {"role": "system", "content": "Use tools."},
        {"role": "user", "content": "uptime?"},
        {"role": "assistant", "content": '<tool_call>{"name": "uptime", "arguments": {}}</tool_call>'},
        {"role": "tool", "content": "17 days"},
    ],
    "unicode and markup in content": [
        {"role": "user", "content": "Grüße 😀 日本語\n\n```py\nprint({'a': 1})\n```"},
        {"role": "assistant", "content": "tabs\tand {{ braces }} stay text"},
        {"role": "user", "content": "ok"},
    ],
}


def jinja_render(tok, messages: list[dict]) -> str:
    prompt = messages[-1]["role"] != "assistant"  # Ollama generates after a user or tool turn
    text = tok.apply_chat_template(messages, tokenize=False, add_generation_prompt=prompt)
    assert text.startswith(tok.bos_token)
    return text[len(tok.bos_token) :]


def go_render(template: str, messages: list[dict]) -> str:
    return render(template, {"Messages": [{"Role": m["role"], "Content": m["content"]} for m in messages]})


def template_of(modelfile: str) -> str:
    m = re.search(r'^TEMPLATE """(.*?)"""$', modelfile, re.S | re.M)
    assert m, modelfile
    return m.group(1)


@pytest.mark.parametrize("name", CONVERSATIONS)
def test_written_modelfile_renders_like_the_chat_template(tok, tmp_path, name):
    gguf = tmp_path / "gemma_2b_finetuned.q8_0.gguf"  # a work file, published as <name>.gguf (the default quant)
    path = write_modelfile(gguf, "gemma_2b_finetuned.gguf", tok)
    assert path == tmp_path / "gemma_2b_finetuned.Modelfile"
    messages = CONVERSATIONS[name]
    assert go_render(template_of(path.read_text()), messages) == jinja_render(tok, messages)


def test_modelfile_points_at_its_gguf_and_stops_on_the_turn_marker(tok, tmp_path):
    text = write_modelfile(tmp_path / "m.q4_k_m.gguf", "m.gguf", tok).read_text()
    lines = [line for line in text.splitlines() if line and not line.startswith("#")]
    assert lines[0] == "FROM ./m.gguf"
    assert lines[-1] == 'PARAMETER stop "<end_of_turn>"'
    assert text.count("PARAMETER") == 1 and text.count('"""') == 2


def test_stop_token_is_read_from_the_tokenizer_template(tok):
    assert turn_end_token(tok) == "<end_of_turn>"
    saved = tok.chat_template
    try:  # a template that closes turns with <eos> must give <eos>, not a hard-coded marker
        tok.chat_template = "{% for m in messages %}{{ m['role'] }}: {{ m['content'] }}{{ eos_token }}\n{% endfor %}"
        assert turn_end_token(tok) == tok.eos_token
        tok.chat_template = "{% for m in messages %}{{ m['content'] }}\n{% endfor %}"
        with pytest.raises(ValueError, match="no special token"):
            turn_end_token(tok)
    finally:
        tok.chat_template = saved


@pytest.mark.parametrize(
    "drift",
    [
        ("<start_of_turn>model\n{{ .Content }}", "<start_of_turn>model\n {{ .Content }}"),  # one space
        ("{{ $system }}\n\n{{ end }}", "{{ $system }}\n{{ end }}"),  # system separator
        ('{{ if eq $prev "tool" }}\n{{ else }}', '{{ if eq $prev "tool" }}{{ else }}'),  # tool joiner
        ('{{- if ne $prev "assistant" }}', '{{- if ne $prev "" }}'),  # generation prompt after an assistant turn
    ],
)
def test_a_drifted_template_is_caught(tok, drift):
    old, new = drift
    assert old in TEMPLATE
    drifted = TEMPLATE.replace(old, new)
    assert any(go_render(drifted, m) != jinja_render(tok, m) for m in CONVERSATIONS.values())


def test_renderer_rejects_what_it_does_not_implement():
    with pytest.raises(SyntaxError):
        render("{{ range .Messages }}{{ .Content | printf }}{{ end }}", {"Messages": []})
    with pytest.raises(SyntaxError):
        render("{{ with .Messages }}x{{ end }}", {"Messages": []})


def test_quoting_cannot_break(tok):
    with pytest.raises(ValueError):
        modelfile_text("m.gguf", 'a"b')
