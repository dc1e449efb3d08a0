"""Dense trit packing: 5 base-3 digits per byte, decoded with a multiply and a shift.

A byte holds v = d0·81 + d1·27 + d2·9 + d3·3 + d4 (digits 0..2, d0 most significant) stored as
ceil(v·256/243). Digit n comes back as ((byte·3^n) mod 256 · 3) >> 8: no division (llama.cpp TQ1_0).
1.6 bits per trit, within 1% of log2(3) = 1.585.
"""
from __future__ import annotations

import numpy as np

TRITS_PER_BYTE = 5
_POW3_DESC = np.array([81, 27, 9, 3, 1], np.uint16)
_POW3_ASC = np.array([1, 3, 9, 27, 81], np.uint16)


def packed_len(n: int) -> int:
    """Bytes holding n trits."""
    return -(-n // TRITS_PER_BYTE)


def pack_trits(digits: np.ndarray) -> np.ndarray:
    """uint8 digits in {0,1,2} along the last axis -> uint8 bytes, 5 digits each (tail padded with 0)."""
    digits = np.asarray(digits, np.uint8)
    n = digits.shape[-1]
    pad = packed_len(n) * TRITS_PER_BYTE - n
    if pad:
        digits = np.concatenate([digits, np.zeros(digits.shape[:-1] + (pad,), np.uint8)], axis=-1)
    grouped = digits.reshape(digits.shape[:-1] + (-1, TRITS_PER_BYTE)).astype(np.uint16)
    v = grouped @ _POW3_DESC  # 0..242
    return ((v.astype(np.uint32) * 256 + 242) // 243).astype(np.uint8)


def unpack_trits(packed: np.ndarray, n: int) -> np.ndarray:
    """Inverse of pack_trits: the first n digits (uint8 in {0,1,2}) along the last axis."""
    b = np.asarray(packed, np.uint16)[..., None]
    digits = (((b * _POW3_ASC) & 255) * 3) >> 8
    return digits.reshape(packed.shape[:-1] + (-1,))[..., :n].astype(np.uint8)


def to_digits(values: np.ndarray, ndigits: int) -> np.ndarray:
    """Non-negative ints < 3^ndigits -> base-3 digits, least significant first, on a new axis -2."""
    v = np.asarray(values, np.int32)
    pows = 3 ** np.arange(ndigits, dtype=np.int32)
    return ((v[..., None, :] // pows[:, None]) % 3).astype(np.uint8)


def from_digits(digits: np.ndarray) -> np.ndarray:
    """Inverse of to_digits (digit axis -2, least significant first) -> int32 values."""
    pows = 3 ** np.arange(digits.shape[-2], dtype=np.int32)
    return np.einsum("...dk,d->...k", digits.astype(np.int32), pows)
