"""The sentence model: a real llama-server answers every prompt, greedily, with one sentence."""

from __future__ import annotations

from pathlib import Path
from typing import Final

import httpx
import pytest

from shared.tiny_gguf import DEMO_SENTENCE, PRESETS, TinyModelSpec, vocab_tokens, write_tiny_model
from tests.support.llama import llama_server

REQUEST_TIMEOUT_S: Final = 60.0
SERVER_ARGS: Final = ("-c", "512", "-np", "1", "-t", "1")


def test_word_tokens_follow_the_byte_vocab() -> None:
    spec = TinyModelSpec(sentence="Hello there world")
    tail = [text for text, _, _ in vocab_tokens(spec.sentence)][-3:]
    assert tail == ["Hello", "\u2581there", "\u2581world"]
    assert spec.n_vocab == len(vocab_tokens()) + 3


@pytest.mark.parametrize(("sentence", "message"), [
    ("a cat saw a cat", "words must all differ"),
    ("   ", "at least one word"),
    (" ".join(f"w{i}" for i in range(64)), "n_embd must be at least one more"),
])
def test_sentences_the_table_cannot_spell_say_why(sentence: str, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        TinyModelSpec(sentence=sentence)


def test_a_sentence_needs_a_plain_llama() -> None:
    with pytest.raises(ValueError, match="plain llama"):
        TinyModelSpec(sentence="Hi there", tied_embeddings=True)


@pytest.mark.llama
async def test_greedy_answers_are_the_sentence(llama_server_bin: Path, tmp_path: Path) -> None:
    model = write_tiny_model(tmp_path / "sentence.gguf", PRESETS["llama-sentence"])
    async with (
        llama_server(llama_server_bin, model, SERVER_ARGS) as server,
        httpx.AsyncClient(base_url=server.url, timeout=REQUEST_TIMEOUT_S) as client,
    ):
        for content in ("hi", "Good morning", "What did the GPU box do last night?"):
            chat = await client.post("/v1/chat/completions", json={
                "messages": [{"role": "user", "content": content}], "temperature": 0})
            assert chat.status_code == 200, chat.text
            answer = chat.json()["choices"][0]
            assert answer["message"]["content"] == DEMO_SENTENCE
            assert answer["finish_reason"] == "stop"  # the last word leads to end-of-sequence
        completion = await client.post("/completion", json={"prompt": "Once upon a time",
                                                             "top_k": 1})
        assert completion.json()["content"] == DEMO_SENTENCE
