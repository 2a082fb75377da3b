"""Bad input gives one clear stderr line and a non-zero exit (a DsrunError in the API), no traceback."""

from __future__ import annotations

import subprocess
import sys

import numpy as np
import pytest
from gguf import GGMLQuantizationType, GGUFWriter

import dsrun


def dsrun_cli(*args, stdin=None, timeout=120):
    return subprocess.run(
        [sys.executable, "-m", "dsrun.cli", *args],
        input=stdin,
        capture_output=True,
        text=True,
        timeout=timeout,
    )


def assert_clean_error(proc, *words):
    assert proc.returncode != 0
    err = proc.stderr.strip()
    assert "Traceback" not in err, err
    assert len(err.splitlines()) == 1 and err.startswith("dsrun: error:"), err
    for w in words:
        assert w in err, err


def write_tiny_gguf(path, arch="llama", qtype=GGMLQuantizationType.F32):
    """A minimal file with one tensor: enough to reach the architecture and quant-type checks."""
    w = GGUFWriter(str(path), arch)
    w.add_block_count(1)
    w.add_embedding_length(32)
    w.add_head_count(4)
    w.add_feed_forward_length(64)
    w.add_context_length(128)
    w.add_array("tokenizer.ggml.tokens", [f"t{i}" for i in range(16)])
    if qtype == GGMLQuantizationType.F32:
        w.add_tensor("token_embd.weight", np.zeros((16, 32), np.float32))
    else:  # raw blocks of an exotic type: bytes per row from ggml's block size table
        from gguf.constants import GGML_QUANT_SIZES

        block, nbytes = GGML_QUANT_SIZES[qtype]
        w.add_tensor("token_embd.weight", np.zeros((16, 256 // block * nbytes), np.uint8), raw_dtype=qtype)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return path


def test_missing_path():
    assert_clean_error(dsrun_cli("run", "-m", "/no/such/model.gguf", "hi"), "not found")
    with pytest.raises(dsrun.ModelNotFoundError):
        dsrun.load("/no/such/model.gguf")


def test_not_a_gguf(tmp_path):
    bad = tmp_path / "notes.gguf"
    bad.write_text("hello, not a model")
    assert_clean_error(dsrun_cli("run", "-m", str(bad), "hi"), "not a GGUF")
    with pytest.raises(dsrun.ModelFormatError):
        dsrun.load(bad)


def test_truncated_gguf(tmp_path, default_gguf):
    cut = tmp_path / "cut.gguf"
    cut.write_bytes(default_gguf.read_bytes()[:3_000_000])
    assert_clean_error(dsrun_cli("run", "-m", str(cut), "hi"), "truncated")
    with pytest.raises(dsrun.ModelFormatError):
        dsrun.load(cut)


def test_unsupported_architecture(tmp_path):
    path = write_tiny_gguf(tmp_path / "mamba.gguf", arch="mamba")
    assert_clean_error(dsrun_cli("run", "-m", str(path), "hi"), "'mamba'")
    with pytest.raises(dsrun.UnsupportedModelError, match="mamba"):
        dsrun.load(path)


def test_unsupported_quant_type(tmp_path):
    path = write_tiny_gguf(tmp_path / "iq1.gguf", qtype=GGMLQuantizationType.Q8_K)
    assert_clean_error(dsrun_cli("run", "-m", str(path), "hi"), "Q8_K")
    with pytest.raises(dsrun.UnsupportedModelError, match="Q8_K"):
        dsrun.load(path)


def test_empty_prompt(engine):
    assert_clean_error(dsrun_cli("run", "   "), "empty")
    with pytest.raises(dsrun.InvalidRequestError):
        next(engine.generate(""))


def test_prompt_longer_than_context(engine):
    long_prompt = "word " * 200
    assert_clean_error(dsrun_cli("run", "--ctx", "64", "--raw", long_prompt), "context")
    with pytest.raises(dsrun.ContextLengthError):
        next(engine.generate(long_prompt * 10))


def test_bad_chat_template_is_an_error_not_a_crash(engine):
    from dsrun.tokenizer import _compile_template

    with pytest.raises(dsrun.ModelFormatError):
        _compile_template("{% for %}")
    evil = _compile_template("{{ messages.__class__.__mro__[1].__subclasses__() }}")
    with pytest.raises(Exception) as info:
        evil.render(messages=[])
    assert "unsafe" in str(info.value) or "SecurityError" in type(info.value).__name__
