"""Token ids and text round trips against llama.cpp's own tokenizer on strings that break tokenizers."""

from __future__ import annotations

import pytest

HARD_STRINGS = [
    "",
    " ",
    "   leading and trailing spaces   ",
    "Hello, world!",
    "emoji 🦙🔥👩‍👩‍👧 and flags 🇫🇷",
    "中文分词测试：深度求索的混合专家模型。",
    "日本語とかな、한국어도",
    "tabs\tand\nnewlines\r\n\n",
    "def f(x):\n    return x ** 2  # code\n",
    "<|im_start|>user\nhi<|im_end|>",
    "numbers 3.14159 1,000,000 0x1F",
    "ÀÉÎÕÜ ß ø ŋ — “quotes” ‘single’ …",
]


@pytest.fixture(scope="module")
def reference(default_gguf):
    import llama_cpp

    return llama_cpp.Llama(str(default_gguf), vocab_only=True, verbose=False)


@pytest.mark.parametrize("text", HARD_STRINGS)
def test_token_ids_match_llama_cpp(engine, reference, text):
    ours = engine.tokenize(text)
    theirs = reference.tokenize(text.encode(), add_bos=True, special=True) if text else []
    assert ours == theirs


@pytest.mark.parametrize("text", [s for s in HARD_STRINGS if "<|" not in s])
def test_round_trip(engine, text):
    assert engine.detokenize(engine.tokenize(text, add_bos=False)) == text


def test_special_tokens_parse_as_single_ids(engine):
    ids = engine.tokenize("<|im_start|>user", add_bos=False)
    assert ids[0] == 1  # <|im_start|> is token 1 in SmolLM2's vocabulary


def test_chat_template_renders_chatml(engine):
    text = engine.tokenizer.render_chat([{"role": "user", "content": "Hi"}])
    assert text.endswith("<|im_start|>user\nHi<|im_end|>\n<|im_start|>assistant\n")
    assert "You are a helpful AI assistant named SmolLM" in text


def test_streamed_text_equals_whole_detokenization(engine):
    from dsrun.tokenizer import TextStream

    ids = engine.tokenize("emoji 🦙🔥 中文 ok", add_bos=False)
    stream = TextStream(engine.tokenizer)
    assert "".join(stream.push(t) for t in ids) + stream.flush() == engine.detokenize(ids)
