"""Tokenization and chat templates exactly as llama.cpp does them.

The vocabulary is llama.cpp's own (llama-cpp-python with vocab_only), so token ids match the reference by
construction; chat templates come from the GGUF and run in jinja2's sandbox because a model file is
untrusted input.
"""

from __future__ import annotations

import codecs
import contextlib
import os
from datetime import datetime
from pathlib import Path

import jinja2
from jinja2.sandbox import ImmutableSandboxedEnvironment

from .errors import InvalidRequestError, ModelFormatError
from .gguf_file import GGUFFile

# llama.cpp uses ChatML for a model whose GGUF carries no template.
CHATML = (
    "{% for message in messages %}{{'<|im_start|>' + message['role'] + '\n' + message['content'] + "
    "'<|im_end|>' + '\n'}}{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)
EOG_KEYS = tuple(f"tokenizer.ggml.{k}_token_id" for k in ("eos", "eot", "eom"))


@contextlib.contextmanager
def _quiet_stderr():
    """llama.cpp prints loader chatter on fd 2 even with verbose=False."""
    saved = os.dup(2)
    with open(os.devnull, "wb") as null:
        os.dup2(null.fileno(), 2)
        try:
            yield
        finally:
            os.dup2(saved, 2)
            os.close(saved)


class Tokenizer:
    def __init__(self, path: Path, f: GGUFFile):
        import llama_cpp

        with _quiet_stderr():
            try:
                self._llm = llama_cpp.Llama(str(path), vocab_only=True, verbose=False)
            except Exception as e:
                raise ModelFormatError(f"llama.cpp could not read the vocabulary of {path.name}: {e}") from e
        tokens = f.meta.get("tokenizer.ggml.tokens") or []
        self.n_vocab = len(tokens)
        self.bos_id = f.meta.get("tokenizer.ggml.bos_token_id")
        self.eog_ids = frozenset(int(f.meta[k]) for k in EOG_KEYS if f.meta.get(k) is not None)
        self.bos_text = tokens[self.bos_id] if self.bos_id is not None and self.bos_id < len(tokens) else ""
        eos_id = f.meta.get("tokenizer.ggml.eos_token_id")
        self.eos_text = tokens[eos_id] if eos_id is not None and eos_id < len(tokens) else ""
        self.template = _compile_template(f.meta.get("tokenizer.chat_template") or CHATML)

    def encode(self, text: str, *, add_bos: bool = True, special: bool = True) -> list[int]:
        """Token ids; add_bos adds the special tokens the model asks for (llama.cpp's add_special)."""
        if not text:
            return self._llm.tokenize(b"", add_bos=add_bos, special=special) if add_bos else []
        return self._llm.tokenize(text.encode("utf-8"), add_bos=add_bos, special=special)

    def decode_bytes(self, tokens: list[int]) -> bytes:
        return self._llm.detokenize(list(tokens), special=False) if tokens else b""

    def decode(self, tokens: list[int]) -> str:
        return self.decode_bytes(tokens).decode("utf-8", errors="replace")

    def render_chat(self, messages: list[dict], add_generation_prompt: bool = True) -> str:
        _check_messages(messages)
        try:
            return self.template.render(
                messages=messages,
                add_generation_prompt=add_generation_prompt,
                bos_token=self.bos_text,
                eos_token=self.eos_text,
            )
        except InvalidRequestError:
            raise
        except Exception as e:  # a template is untrusted code: any failure is the template's
            raise ModelFormatError(f"the model's chat template failed: {type(e).__name__}: {e}") from e

    def chat_tokens(self, messages: list[dict]) -> list[int]:
        text = self.render_chat(messages)
        add_bos = not (self.bos_text and text.startswith(self.bos_text))  # the template may write BOS
        return self.encode(text, add_bos=add_bos, special=True)


class TextStream:
    """Turns a growing token list into text pieces, holding back bytes of an unfinished UTF-8 char."""

    def __init__(self, tok: Tokenizer):
        self.tok = tok
        self.decoder = codecs.getincrementaldecoder("utf-8")(errors="replace")

    def push(self, token: int) -> str:
        return self.decoder.decode(self.tok.decode_bytes([token]))

    def flush(self) -> str:
        return self.decoder.decode(b"", final=True)


def _raise_exception(message: str):
    raise InvalidRequestError(f"the chat template refused the messages: {message}")


def _compile_template(source: str) -> jinja2.Template:
    env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True)
    env.globals["raise_exception"] = _raise_exception
    env.globals["strftime_now"] = lambda fmt: datetime.now().strftime(fmt)
    try:
        return env.from_string(source)
    except jinja2.TemplateError as e:
        raise ModelFormatError(f"the model's chat template does not parse: {e}") from e


def _check_messages(messages) -> None:
    if not isinstance(messages, list) or not messages:
        raise InvalidRequestError("messages must be a non-empty list of {'role', 'content'} objects")
    for i, m in enumerate(messages):
        if not isinstance(m, dict) or not isinstance(m.get("role"), str):
            raise InvalidRequestError(f"messages[{i}] must be an object with a string 'role'")
        if not isinstance(m.get("content"), str):
            raise InvalidRequestError(f"messages[{i}].content must be a string")
