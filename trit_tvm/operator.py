"""trit_decode_matmul: y = x @ Ŵᵀ (+ bias), reading the packed trits of Ŵ directly.

The TE definition decodes each weight inside the reduction (one PrimFunc, nothing materialized):
    digit(byte, p) = ((byte · 3^p) & 255) · 3 >> 8          (codec/trits.py: multiply and shift)
    q[n,k]   = Σ_j digit(codes[n, j, k/5], k%5) · 3^j − qmax
    s[n,g]   = codebook[Σ_j digit(scales[n, j, g/5], g%5) · 3^j],  g = k/16
    y[i, n]  = Σ_k x[i,k] · s[n, k/16] · q[n,k]  (+ bias[n]), accumulated in float32
The PrimFunc carries the attribute TRIT_OP_ATTR so schedule rules find it without guessing by name.
`reference_decode_matmul` is the numpy statement of the same math, used by the tests.
"""
from __future__ import annotations

import numpy as np
from tvm import te, tirx

from codec.format import SCALE_DIGITS
from codec.quantize import GROUP_SIZE, qmax_of
from codec.trits import TRITS_PER_BYTE, from_digits, unpack_trits
from schedules.base import TRIT_OP_ATTR

TRIT_OP_NAME = "decode_matmul"
OP_PATTERN_OPAQUE = 8  # relax FuseOps leaves the call alone: it stays one kernel with its attributes


def _pow3(pos: tirx.PrimExpr) -> tirx.PrimExpr:
    """3^pos for pos in 0..4, as a select chain the simplifier folds once pos is a constant."""
    out = tirx.const(81, "int32")
    for p in (3, 2, 1, 0):
        out = tirx.Select(pos == p, tirx.const(3 ** p, "int32"), out)
    return out


def _digit(byte: tirx.PrimExpr, pos: tirx.PrimExpr) -> tirx.PrimExpr:
    b = byte.astype("int32")
    return tirx.shift_right(tirx.bitwise_and(b * _pow3(pos), 255) * 3, 8)


def _base3(load, n, index: tirx.PrimExpr, ndigits: int) -> tirx.PrimExpr:
    """Σ_j digit_j · 3^j of element `index` in the packed planes load(n, j, byte)."""
    byte, pos = index // TRITS_PER_BYTE, index % TRITS_PER_BYTE
    total = _digit(load(n, 0, byte), pos)
    for j in range(1, ndigits):
        total = total + _digit(load(n, j, byte), pos) * (3 ** j)
    return total


def trit_decode_matmul_te(x: te.Tensor, codes: te.Tensor, scales: te.Tensor, codebook: te.Tensor,
                          bias: te.Tensor | None = None, *, out_dtype: str | None = None) -> te.Tensor:
    """TE compute of the operator; x is [..., K], the result [..., N]."""
    n_out, depth = int(codes.shape[0]), int(codes.shape[1])
    n_in = int(x.shape[-1])
    qmax = qmax_of(depth)
    out_dtype = out_dtype or x.dtype
    k = te.reduce_axis((0, n_in), name="k")

    def weight(n, kk):
        q = _base3(lambda a, b, c: codes[a, b, c], n, kk, depth) - qmax
        idx = _base3(lambda a, b, c: scales[a, b, c], n, kk // GROUP_SIZE, SCALE_DIGITS)
        return codebook[idx] * q.astype("float32")

    lead = list(x.shape[:-1])
    acc = te.compute(lead + [n_out],
                     lambda *i: te.sum(x[tuple(i[:-1]) + (k,)].astype("float32") * weight(i[-1], k), axis=k),
                     name="trit_matmul")
    if bias is None:
        return te.compute(acc.shape, lambda *i: acc[i].astype(out_dtype), name="trit_out")
    return te.compute(acc.shape, lambda *i: (acc[i] + bias[i[-1]].astype("float32")).astype(out_dtype),
                      name="trit_out")


def trit_op_attrs(n_out: int, n_in: int, depth: int, has_bias: bool) -> dict:
    """PrimFunc attributes: the tag schedule rules match, the static weight shape, the op pattern."""
    return {TRIT_OP_ATTR: TRIT_OP_NAME, "trit.n_out": n_out, "trit.n_in": n_in, "trit.depth": depth,
            "trit.bias": int(has_bias), "op_pattern": OP_PATTERN_OPAQUE}


def reference_decode_matmul(x: np.ndarray, codes: np.ndarray, scales: np.ndarray, codebook: np.ndarray,
                            bias: np.ndarray | None = None) -> np.ndarray:
    """numpy: x @ Ŵᵀ (+ bias) in float64, Ŵ unpacked with the codec (the operator's specification)."""
    n_in = x.shape[-1]
    depth = codes.shape[1]
    q = from_digits(unpack_trits(codes, n_in)) - qmax_of(depth)
    idx = from_digits(unpack_trits(scales, n_in // GROUP_SIZE))
    w = q.astype(np.float64) * np.repeat(codebook.astype(np.float64)[idx], GROUP_SIZE, axis=1)
    y = x.astype(np.float64) @ w.T
    return y if bias is None else y + bias.astype(np.float64)
