"""CPU experts on ONNX Runtime's fused `com.microsoft.QMoE` op: a whole layer in one call, int4/int8
weights in groups of 32 with uint8 zero points, int8 activations (`accuracy_level=4`; level 0 keeps
fp32 activations but runs ~5x slower here).

Routing stays ours: the op sees one row per (token, expert) assignment with a one-hot router and
k = 1, so it computes exactly the assignments placed on the CPU, never a top-k of its own.
Gate and up rows are interleaved (`swiglu_fusion=1`, the only fused layout its CPU kernel runs).
Zero points must be integers: Q4_0, Q8_0 and requantized types keep their width; Q4_1/Q4_K widen to
8-bit codes (GroupQuant.integer_zero), twice the bytes but 0.5% instead of ~8% error. Both projections
must have one width on the CPU ("mixed-width QMoE is not yet implemented"): the narrower one widens.
`MatMulNBits` would take float zero points (Q4_K exact in 4 bits) but its kernel then dequantizes on
every call, ~100x slower than with integer zero points, and it needs one call per expert; not used.

The model is written as protobuf bytes here (the `onnx` package is not a dependency); weights are
external initializers pointing at the shard's memory, and every session runs on one process-wide
thread pool.

Legend: A assignments, D model width, F expert width, Es experts loaded, G group (32).
"""

from __future__ import annotations

import functools
import struct

import numpy as np
import onnxruntime as ort
import torch

from .cpu_experts import GROUP, Assignments, ConvertedExperts, GroupQuant, pack_codes, stack_rows

ACCURACY_LEVEL = 4  # int8 activations
_POOL_THREADS: list[int] = []  # the size of the process-wide pool, once made


def shared_thread_pool(threads: int) -> int:
    """One intra-op pool for every session of the process; its size is fixed by the first caller."""
    if not _POOL_THREADS:
        ort.set_global_thread_pool_sizes(threads, 1)
        _POOL_THREADS.append(threads)
    return _POOL_THREADS[0]


def ort_layout(gq: GroupQuant) -> dict[str, np.ndarray]:
    """Packed codes (N, Kin * bits/8), float scales (N, Kin/G) and packed zero points."""
    gq = gq.integer_zero()
    return {
        "w": pack_codes(gq.codes, gq.bits),
        "s": np.ascontiguousarray(gq.scale, dtype=np.float32),
        "z": pack_codes(gq.zero_points(), gq.bits),
    }


@functools.cache
def missing_qmoe_features() -> list[str]:
    """What this onnxruntime's QMoE lacks of what the model below uses (older releases: block-wise
    int4/int8 on the CPU, accuracy_level, router_weights)."""
    from onnxruntime.capi import onnxruntime_pybind11_state as C

    schema = next(
        (s for s in C.get_all_operator_schema() if (s.name, s.domain) == ("QMoE", "com.microsoft")), None
    )
    if schema is None:
        return ["the QMoE op"]
    inputs = {i.name for i in schema.inputs}
    missing = [a for a in ("accuracy_level", "block_size", "swiglu_fusion") if a not in schema.attributes]
    return missing + [i for i in ("router_weights", "fc1_zero_points") if i not in inputs]


class OrtExperts(ConvertedExperts):
    name = "ort"
    version = 1

    def __init__(self, **options):
        super().__init__(**options)
        self.threads = shared_thread_pool(self.threads)

    @classmethod
    def unavailable_reason(cls) -> str | None:
        missing = missing_qmoe_features()
        if missing:
            return f"onnxruntime {ort.__version__}'s QMoE lacks {', '.join(missing)} (1.32 has them)"
        return None

    def convert_expert(self, gate: GroupQuant, up: GroupQuant, down: GroupQuant) -> dict[str, np.ndarray]:
        gate, up, down = (m.integer_zero() for m in (gate, up, down))
        bits = max(gate.bits, up.bits, down.bits)  # the CPU kernel runs one width for both projections
        fc1 = stack_rows(gate.widened(bits), up.widened(bits), interleave=True)  # (2F, D)
        return {f"fc1_{k}": a for k, a in ort_layout(fc1).items()} | {
            f"fc2_{k}": a for k, a in ort_layout(down.widened(bits)).items()
        }

    def build(self, arrays, experts, shape):
        if len(experts) == shape.n_expert:
            weights = dict(arrays)  # the memory-mapped shard itself
        else:
            weights = {name: np.ascontiguousarray(a[experts]) for name, a in arrays.items()}  # (Es, ...)
        bits = weights["fc1_w"].shape[2] * 8 // shape.hidden  # (Es, 2F, D * bits/8)
        model = qmoe_model(
            len(experts), shape.hidden, bits, {n: (a.shape, a.dtype) for n, a in weights.items()}
        )
        so = ort.SessionOptions()
        so.use_per_session_threads = False
        so.log_severity_level = 3
        names = list(weights)
        so.add_external_initializers(names, [ort.OrtValue.ortvalue_from_numpy(weights[n]) for n in names])
        session = ort.InferenceSession(model, so, providers=["CPUExecutionProvider"])
        return session, len(experts), weights  # the arrays must outlive the session that reads them

    def _compute(self, state, a: Assignments) -> torch.Tensor:
        session, n_loaded, _ = state
        one_hot = np.zeros((len(a.local), n_loaded), np.float32)  # (A, Es)
        one_hot[np.arange(len(a.local)), a.local] = 1.0
        feeds = {"input": a.x.numpy(), "router_probs": one_hot, "router_weights": one_hot}
        return torch.from_numpy(session.run(None, feeds)[0])  # (A, D)


def qmoe_model(n_expert: int, hidden: int, bits: int, weights: dict[str, tuple]) -> bytes:
    """An ONNX model of one QMoE node whose weights are external initializers."""
    inputs = [
        "input",
        "router_probs",
        "fc1_w",
        "fc1_s",
        "",
        "fc2_w",
        "fc2_s",
        "",
        "",
        "",
        "",
        "fc1_z",
        "fc2_z",
    ]
    node = _node(
        "QMoE",
        [*inputs, "", "router_weights"],
        ["output"],
        domain="com.microsoft",
        k=1,
        activation_type="swiglu",
        swiglu_fusion=1,  # gate/up rows interleaved
        activation_alpha=1.0,  # silu(g) * u: the op's defaults are another model's (alpha 1.702, beta 1)
        activation_beta=0.0,
        normalize_routing_weights=0,
        expert_weight_bits=bits,
        block_size=GROUP,
        accuracy_level=ACCURACY_LEVEL,
    )
    rows = ["A", n_expert]
    graph_inputs = [
        _value_info(n, np.float32, s)
        for n, s in (("input", ["A", hidden]), ("router_probs", rows), ("router_weights", rows))
    ]
    initializers = [_external_tensor(name, shape, dtype) for name, (shape, dtype) in weights.items()]
    graph = (
        _bytes(1, node)
        + _bytes(2, "qmoe")
        + b"".join(_bytes(5, t) for t in initializers)
        + b"".join(_bytes(11, v) for v in graph_inputs)
        + _bytes(12, _value_info("output", np.float32, ["A", hidden]))
    )
    opsets = _bytes(8, _bytes(1, "") + _int(2, 21)) + _bytes(8, _bytes(1, "com.microsoft") + _int(2, 1))
    return _int(1, 10) + _bytes(7, graph) + opsets  # ir_version 10


# --- ONNX protobuf: the few messages and fields (numbers from onnx.proto) the model above uses ----------

_ONNX_DTYPES = {np.dtype(np.float32): 1, np.dtype(np.uint8): 2}


def _varint(n: int) -> bytes:
    out = bytearray()
    while n > 0x7F:
        out.append(n & 0x7F | 0x80)
        n >>= 7
    return bytes(out + bytes([n]))


def _int(field: int, value: int) -> bytes:
    return _varint(field << 3) + _varint(value)


def _bytes(field: int, value: bytes | str) -> bytes:
    raw = value.encode() if isinstance(value, str) else value
    return _varint(field << 3 | 2) + _varint(len(raw)) + raw


def _attr(name: str, value) -> bytes:
    """AttributeProto: name 1, f 2, i 3, s 4, type 20 (FLOAT 1, INT 2, STRING 3)."""
    if isinstance(value, float):
        body = _varint(2 << 3 | 5) + struct.pack("<f", value) + _int(20, 1)
    elif isinstance(value, int):
        body = _int(3, value) + _int(20, 2)
    else:
        body = _bytes(4, value) + _int(20, 3)
    return _bytes(1, name) + body


def _node(op: str, inputs: list[str], outputs: list[str], *, domain: str, **attrs) -> bytes:
    """NodeProto: input 1, output 2, op_type 4, attribute 5, domain 7."""
    return (
        b"".join(_bytes(1, i) for i in inputs)
        + b"".join(_bytes(2, o) for o in outputs)
        + _bytes(4, op)
        + b"".join(_bytes(5, _attr(k, v)) for k, v in attrs.items())
        + _bytes(7, domain)
    )


def _value_info(name: str, dtype, dims: list) -> bytes:
    """ValueInfoProto {name 1, type 2: TypeProto {tensor_type 1: {elem_type 1, shape 2: {dim 1}}}}."""
    shape = b"".join(_bytes(1, _int(1, d) if isinstance(d, int) else _bytes(2, d)) for d in dims)
    tensor_type = _int(1, _ONNX_DTYPES[np.dtype(dtype)]) + _bytes(2, shape)
    return _bytes(1, name) + _bytes(2, _bytes(1, tensor_type))


def _external_tensor(name: str, shape: tuple[int, ...], dtype) -> bytes:
    """TensorProto with data_location EXTERNAL (14 = 1): dims 1, data_type 2, name 8, external_data 13.
    The data comes from SessionOptions.add_external_initializers."""
    location = _bytes(13, _bytes(1, "location") + _bytes(2, "memory"))
    return (
        b"".join(_int(1, d) for d in shape)
        + _int(2, _ONNX_DTYPES[np.dtype(dtype)])
        + _bytes(8, name)
        + location
        + _int(14, 1)
    )
