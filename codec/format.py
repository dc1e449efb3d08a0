"""The packed form of one quantized matrix (docs/FORMAT.md is the byte-level spec).

Three tensors per matrix W [N, K] at depth d, G = K/16:
  <name>.trit_codes    uint8 [N, d, ceil(K/5)]   digit plane i of every weight, 5 per byte, group-aligned:
                       in each block of 80 weights (5 groups), byte j holds weights j, 16+j, .., 64+j, so
                       digit position p of the block's 16 bytes is exactly group p; a tail of < 80 weights
                       is packed in plain order
  <name>.trit_scales   uint8 [N, 3, ceil(G/5)]   the 3 digits of each group's codebook index, 5 per byte
  <name>.trit_codebook float32 [27]              the steps
Weight digits are the base-3 digits of u = q + qmax, which are exactly q's balanced-ternary digits + 1,
so q = Σ_i digit_i·3^i - qmax.
"""
from __future__ import annotations

import numpy as np

from .errors import CodecError
from .quantize import CODEBOOK_SIZE, GROUP_SIZE, QuantizedMatrix, qmax_of
from .trits import TRITS_PER_BYTE, from_digits, pack_trits, packed_len, to_digits, unpack_trits

CODES, SCALES, CODEBOOK = "trit_codes", "trit_scales", "trit_codebook"
SCALE_DIGITS = 3  # 27 codebook entries = 3 trits


def packed_shapes(n_out: int, n_in: int, depth: int) -> dict[str, tuple[int, ...]]:
    """Shapes of the three packed tensors of an [n_out, n_in] matrix."""
    return {CODES: (n_out, depth, packed_len(n_in)),
            SCALES: (n_out, SCALE_DIGITS, packed_len(n_in // GROUP_SIZE)),
            CODEBOOK: (CODEBOOK_SIZE,)}


BLOCK = GROUP_SIZE * TRITS_PER_BYTE  # 80 weights: 16 bytes per digit plane


def _block_order(values: np.ndarray, inverse: bool = False) -> np.ndarray:
    """Last axis: weight order -> packing order (or back with inverse).

    Packing position of weight k = 80·b + 16·p + j (k < 80·B) is 80·b + 5·j + p; the tail keeps its order.
    """
    lead, n_in = values.shape[:-1], values.shape[-1]
    main = n_in - n_in % BLOCK
    inner = (TRITS_PER_BYTE, GROUP_SIZE) if not inverse else (GROUP_SIZE, TRITS_PER_BYTE)
    head = np.swapaxes(values[..., :main].reshape(lead + (-1,) + inner), -1, -2).reshape(lead + (main,))
    return np.concatenate([head, values[..., main:]], axis=-1)


def pack_matrix(qm: QuantizedMatrix) -> dict[str, np.ndarray]:
    """QuantizedMatrix -> {suffix: packed array}."""
    u = qm.codes.astype(np.int32) + qmax_of(qm.depth)
    return {CODES: pack_trits(_block_order(to_digits(u, qm.depth))),
            SCALES: pack_trits(to_digits(qm.scale_idx, SCALE_DIGITS)),
            CODEBOOK: np.asarray(qm.codebook, np.float32)}


def unpack_matrix(packed: dict[str, np.ndarray], n_in: int, name: str = "weight") -> QuantizedMatrix:
    """Inverse of pack_matrix; checks shapes against n_in so a corrupt file fails with a clear message."""
    codes, scales, codebook = (np.asarray(packed[k]) for k in (CODES, SCALES, CODEBOOK))
    n_out, depth = codes.shape[0], codes.shape[1]
    want = packed_shapes(n_out, n_in, depth)
    for key, arr in ((CODES, codes), (SCALES, scales), (CODEBOOK, codebook)):
        if tuple(arr.shape) != want[key]:
            raise CodecError(f"tensor '{name}.{key}': shape {list(arr.shape)} does not match "
                             f"{list(want[key])} for a [{n_out}, {n_in}] matrix at depth {depth}")
    u = from_digits(_block_order(unpack_trits(codes, n_in), inverse=True))
    idx = from_digits(unpack_trits(scales, n_in // GROUP_SIZE))
    return QuantizedMatrix((u - qmax_of(depth)).astype(np.int8), idx.astype(np.uint8),
                           codebook.astype(np.float32), depth)


def packed_bits(n_out: int, n_in: int, depth: int) -> int:
    """Bits the three packed tensors take on disk."""
    return 8 * sum(int(np.prod(s)) * (4 if k == CODEBOOK else 1)
                   for k, s in packed_shapes(n_out, n_in, depth).items())


def bits_per_weight(n_out: int, n_in: int, depth: int) -> float:
    """Packed bits / weight, counting codes, scale indices and the codebook."""
    return packed_bits(n_out, n_in, depth) / (n_out * n_in)


def interleave_rows(packed: np.ndarray, rows: int) -> np.ndarray:
    """[N, planes, bytes] -> [ceil(N/rows), planes, bytes, rows]: `rows` consecutive output rows innermost
    (the kernels' run-time layout: the same bytes, zero rows up to a multiple of `rows`)."""
    pad = -packed.shape[0] % rows
    if pad:
        packed = np.concatenate([packed, np.zeros((pad,) + packed.shape[1:], packed.dtype)])
    return np.ascontiguousarray(np.moveaxis(packed.reshape((-1, rows) + packed.shape[1:]), 1, -1))


WORD_DIGITS_BASE9 = TRITS_PER_BYTE  # 5 base-9 digits (two trit planes) per 16-bit word: 9^5 = 59049 <= 2^16


def pair_planes(packed: np.ndarray) -> np.ndarray:
    """[..., planes, bytes] packed planes -> the same shape, each pair of planes (0,1), (2,3), .. re-encoded
    as one 16-bit word per byte position (low byte in the first plane, high byte in the second); an odd
    last plane is kept. The word holds the 5 positions' base-9 digits d_2k + 3·d_2k+1, most significant
    first, as ceil(V·2^16/9^5): digit p = (9·T_p) >> 16 with T_0 = word, T_p+1 = 9·T_p mod 2^16 (the
    TQ1_0 multiply-and-shift trick in base 9; exact for all 9^5 values). Same bytes count; a CPU kernel
    then decodes two planes with one multiply chain instead of two."""
    packed = np.asarray(packed, np.uint8)
    out = packed.copy()
    digits = [unpack_trits(packed[..., i, :], packed.shape[-1] * TRITS_PER_BYTE) for i in range(packed.shape[-2])]
    pow9 = 9 ** np.arange(WORD_DIGITS_BASE9 - 1, -1, -1, dtype=np.int64)
    for i in range(0, packed.shape[-2] - 1, 2):
        v9 = digits[i].astype(np.int64) + 3 * digits[i + 1].astype(np.int64)
        value = v9.reshape(v9.shape[:-1] + (-1, WORD_DIGITS_BASE9)) @ pow9
        word = -(-(value << 16) // 9 ** WORD_DIGITS_BASE9)
        out[..., i, :], out[..., i + 1, :] = word & 255, word >> 8
    return out
