"""An Ollama Modelfile next to each promoted GGUF: `ollama create <name> -f <name>.Modelfile` in models/gguf.

Ollama renders its own Go text/template TEMPLATE, not the GGUF's Jinja chat template: TEMPLATE below is
core/templates/gemma.jinja rewritten in that syntax, without the leading <bos> (Ollama adds it) and without trimming
(Go templates have none); tests/unit/test_modelfile.py renders both on the same conversations.
"""

from __future__ import annotations

from pathlib import Path

from core.files import atomic_write_text

# Go text/template, the subset tests/unit/test_modelfile.py renders: {{- -}} trimming, := and =, range,
# if / else if / else, and/eq/ne, .Field and $var. `$prev` closes a run of tool results and decides the
# generation prompt (a conversation that ends on an assistant turn is rendered whole, as the Jinja template
# renders it without add_generation_prompt).
TEMPLATE = """\
{{- $system := "" }}{{ $prev := "" }}
{{- range .Messages }}
{{- if and (eq $prev "tool") (ne .Role "tool") }}<end_of_turn>
{{ end }}
{{- if eq .Role "system" }}{{ $system = .Content }}
{{- else if eq .Role "user" }}<start_of_turn>user
{{ if $system }}{{ $system }}

{{ end }}{{ .Content }}<end_of_turn>
{{ $system = "" }}
{{- else if eq .Role "assistant" }}<start_of_turn>model
{{ .Content }}<end_of_turn>
{{ else if eq .Role "tool" }}{{ if eq $prev "tool" }}
{{ else }}<start_of_turn>user
{{ end }}<tool_response>{{ .Content }}</tool_response>
{{- end }}
{{- $prev = .Role }}
{{- end }}
{{- if eq $prev "tool" }}<end_of_turn>
{{ end }}
{{- if ne $prev "assistant" }}<start_of_turn>model
{{ end }}"""


def turn_end_token(tokenizer) -> str:
    """The special token that closes an assistant turn in the tokenizer's chat template (<end_of_turn> for Gemma),
    read from a rendered reply rather than assumed: a template that closes turns otherwise gets its own stop."""
    probe = "\x00reply\x00"
    text = tokenizer.apply_chat_template(
        [{"role": "user", "content": "hi"}, {"role": "assistant", "content": probe}], tokenize=False
    )
    after = text.split(probe, 1)[1]
    special = set(tokenizer.all_special_tokens) | {
        t.content for t in tokenizer.added_tokens_decoder.values() if t.special
    }
    ids = tokenizer(after, add_special_tokens=False)["input_ids"]
    for token in tokenizer.convert_ids_to_tokens(ids):
        if token in special:
            return token
    raise ValueError(f"the chat template closes an assistant turn with {after!r}: no special token in it to stop on")


def modelfile_text(gguf_name: str, stop: str) -> str:
    """The Modelfile for a GGUF in the same folder (Ollama resolves FROM relative to the Modelfile)."""
    if '"""' in TEMPLATE or '"' in stop:
        raise ValueError("the template or stop token would end the Modelfile's quoting")
    return (
        f"# Ollama: `ollama create <model name> -f {Path(gguf_name).stem}.Modelfile`, run in this folder.\n"
        f"# Chat format: Gemma's, as the GGUF's own chat template (tokenizer.chat_template) renders it.\n"
        f"FROM ./{gguf_name}\n"
        f'TEMPLATE """{TEMPLATE}"""\n'
        f'PARAMETER stop "{stop}"\n'
    )


def write_modelfile(gguf_path: Path, published_as: str, tokenizer) -> Path:
    """<stem>.Modelfile of a GGUF published as `published_as`, written next to it (it is published beside it)."""
    path = gguf_path.with_name(f"{Path(published_as).stem}.Modelfile")
    atomic_write_text(path, modelfile_text(published_as, turn_end_token(tokenizer)))
    return path
