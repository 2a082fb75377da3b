"""Rewrite GGUF files: copy metadata, re-type tensors (F32 references for parity tests, quantized copies)."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import numpy as np
from gguf import GGMLQuantizationType, GGUFReader, GGUFValueType, GGUFWriter

from .quants import dequantize

SKIP_KEYS = ("GGUF.", "general.architecture")  # the writer writes these itself


def copy_metadata(
    reader: GGUFReader, writer: GGUFWriter, skip: Callable[[str], bool] = lambda k: False
) -> None:
    """Every key/value of `reader` into `writer`, with its original GGUF type."""
    for key, field in reader.fields.items():
        if key.startswith(SKIP_KEYS) or skip(key):
            continue
        vtype = field.types[0]
        sub = field.types[-1] if vtype == GGUFValueType.ARRAY else None
        writer.add_key_value(key, field.contents(), vtype, sub_type=sub)


def write_gguf(
    path: Path,
    arch: str,
    reader: GGUFReader | None,
    tensors: dict[str, np.ndarray],
    raw_types: dict[str, GGMLQuantizationType] | None = None,
    extra: Callable[[GGUFWriter], None] | None = None,
    replaced_keys: tuple[str, ...] = (),
) -> Path:
    """Write a GGUF: metadata copied from `reader` (if given), then `extra` keys, then the tensors.

    Float arrays are written as they are typed (F32/F16); entries in raw_types are already-quantized
    uint8 block rows whose logical numpy shape the writer infers from the type. `replaced_keys` are not
    copied because `extra` writes them anew.
    """
    w = GGUFWriter(str(path), arch)
    if reader is not None:
        copy_metadata(reader, w, skip=lambda k: k in replaced_keys)
    if extra is not None:
        extra(w)
    for name, arr in tensors.items():
        qtype = (raw_types or {}).get(name)
        w.add_tensor(name, arr, raw_dtype=qtype)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return Path(path)


def to_f32(src: Path, dst: Path) -> Path:
    """A copy of `src` with every tensor dequantized to F32 (the exact reference for parity tests)."""
    reader = GGUFReader(src)
    arch = reader.fields["general.architecture"].contents()
    tensors = {}
    for t in reader.tensors:
        shape = tuple(int(d) for d in reversed(t.shape.tolist()))
        tensors[t.name] = dequantize(t.data, GGMLQuantizationType(t.tensor_type), shape, name=t.name).numpy()
    return write_gguf(
        dst, arch, reader, tensors, extra=lambda w: w.add_file_type(0), replaced_keys=("general.file_type",)
    )
