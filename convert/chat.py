"""Answer a prompt with a GGUF the way an application does: llama.cpp, the file's own chat template."""

from __future__ import annotations

from pathlib import Path

import llama_cpp

from convert.llamacpp import native_output_to


def answer(gguf_path: Path, prompt: str, max_tokens: int = 64) -> str:
    """Greedy reply to one user turn. The chat template and the stop token come from the GGUF itself,
    so a file that lost either answers visibly wrong here."""
    with native_output_to(None):
        llm = llama_cpp.Llama(model_path=str(gguf_path), n_ctx=512, verbose=False, seed=0)
    try:
        out = llm.create_chat_completion(
            messages=[{"role": "user", "content": prompt}], temperature=0.0, max_tokens=max_tokens
        )
    finally:
        llm.close()
    choice = out["choices"][0]  # type: ignore[index]  # not streamed: one response
    text = choice["message"]["content"] or ""
    # A reply cut by max_tokens means <end_of_turn> never ended generation: show it.
    return text if choice["finish_reason"] == "stop" else text + " [... no <end_of_turn>]"
