"""Recover exact trit codes from a dequantized (Entrit-style FP16/BF16) matrix.

Such a matrix holds at most 27 distinct group steps and every weight is round(step·q) in the file's
dtype. Per group the largest step under which all weights sit on integers is found; equal steps are
clustered across the matrix; each cluster's step is pinned inside the intersection of the rounding
intervals of all its weights. The result is checked by dequantizing: bit-exact or a CodecError.
"""
from __future__ import annotations

import numpy as np

from .errors import CodecError
from .quantize import CODEBOOK_SIZE, DEPTHS, GROUP_SIZE, QuantizedMatrix, check_matrix, qmax_of
from .safetensors_io import FLOAT_DTYPES, from_float, to_float32

_UNIT_ROUNDOFF = {"F16": 2.0 ** -11, "BF16": 2.0 ** -8, "F32": 2.0 ** -24, "F64": 2.0 ** -53}
_MAX_Q = qmax_of(max(DEPTHS))


def dequantize_as(qm: QuantizedMatrix, dtype: str) -> np.ndarray:
    """step·q rounded once into the storage form of `dtype` (BF16 as uint16 bits)."""
    return from_float(qm.dequantize(np.float64), dtype)


def _rounding_interval(mag: np.ndarray, stored: np.ndarray, dtype: str) -> tuple[np.ndarray, np.ndarray]:
    """For |w| values, the open interval of reals that round to them in `dtype` (as float64)."""
    if dtype == "BF16":
        bits = np.asarray(stored, np.uint16) & np.uint16(0x7FFF)
        up = to_float32(bits + np.uint16(1), "BF16").astype(np.float64)
        down = to_float32(np.maximum(bits, 1) - np.uint16(1), "BF16").astype(np.float64)
    else:
        typed = mag.astype(stored.dtype)
        up = np.nextafter(typed, np.inf).astype(np.float64)
        down = np.nextafter(typed, 0).astype(np.float64)
    return (mag + down) / 2, (mag + up) / 2


def _group_multiples(a: np.ndarray, amax: np.ndarray, u: float, name: str, groups_per_row: int) -> np.ndarray:
    """Per group, the smallest m such that every |w| / (max|w|/m) is an integer (within rounding)."""
    m_of = np.zeros(len(a), np.int32)
    todo = np.flatnonzero(amax > 0)
    for m in range(1, _MAX_Q + 1):
        if todo.size == 0:
            break
        r = a[todo] * (m / amax[todo])[:, None]
        ok = (np.abs(r - np.rint(r)) <= 3 * u * m + 1e-12).all(axis=1)
        m_of[todo[ok]] = m
        todo = todo[~ok]
    if todo.size:
        row, col = divmod(int(todo[0]), groups_per_row)
        raise CodecError(f"tensor '{name}': not trit-representable: row {row}, columns "
                         f"{col * GROUP_SIZE}..{col * GROUP_SIZE + GROUP_SIZE - 1} share no step with |q| <= {_MAX_Q}")
    return m_of


def _cluster_steps(est: np.ndarray, u: float) -> np.ndarray:
    """Labels grouping step estimates that agree within rounding error (sorted, ascending)."""
    order = np.argsort(est, kind="stable")
    s = est[order]
    breaks = np.concatenate([[False], s[1:] > s[:-1] * (1 + 3 * u)])  # same step: within ±u
    labels = np.empty(len(est), np.int64)
    labels[order] = np.cumsum(breaks)
    return labels


def _assign_steps(est: np.ndarray, m_of: np.ndarray, u: float, name: str) -> tuple[np.ndarray, np.ndarray]:
    """Cluster group step estimates into shared steps; returns (label per group, code multiplier per group).

    A group whose codes share a factor k (all even, say) yields k·step. Groups with m > max(m)/2 cannot
    share a factor, so their estimates define the steps; every other group takes the step of which its
    estimate is an integer multiple, or, if none fits, a step of its own.
    """
    reliable = m_of > m_of.max() / 2
    labels = np.full(len(est), -1, np.int64)
    labels[reliable] = _cluster_steps(est[reliable], u)
    centers = np.bincount(labels[reliable], weights=est[reliable]) / np.bincount(labels[reliable])
    mult = np.ones(len(est), np.int64)
    rest = np.flatnonzero(~reliable)
    if rest.size:
        k = est[rest, None] / centers[None, :]
        k_int = np.rint(k)
        fits = (k_int >= 1) & (np.abs(k - k_int) <= 3 * u * k) & (k_int * m_of[rest, None] <= _MAX_Q)
        dev = np.where(fits, np.abs(k - k_int) / k, np.inf)
        best = dev.argmin(axis=1)
        ok = np.isfinite(dev[np.arange(rest.size), best])
        labels[rest[ok]] = best[ok]
        mult[rest[ok]] = k_int[np.arange(rest.size), best][ok]
        orphan = rest[~ok]
        if orphan.size:
            labels[orphan] = len(centers) + _cluster_steps(est[orphan], u)
    n_steps = int(labels.max()) + 1
    if n_steps > CODEBOOK_SIZE:
        raise CodecError(f"tensor '{name}': not trit-representable: {n_steps} distinct group steps "
                         f"(a trit matrix has at most {CODEBOOK_SIZE})")
    return labels, mult


def recover_matrix(stored: np.ndarray, dtype: str, name: str = "weight") -> QuantizedMatrix:
    """Exact codes, scale indices, codebook and depth of a dequantized trit matrix."""
    if dtype not in FLOAT_DTYPES:
        raise CodecError(f"tensor '{name}': dtype {dtype} cannot hold a dequantized trit matrix")
    check_matrix(stored, name)
    values = to_float32(stored, dtype).astype(np.float64)
    if not np.isfinite(values).all():
        raise CodecError(f"tensor '{name}': contains NaN or Inf")
    u = _UNIT_ROUNDOFF[dtype]
    g = values.reshape(-1, GROUP_SIZE)
    a = np.abs(g)
    amax = a.max(axis=1)
    m_of = _group_multiples(a, amax, u, name, stored.shape[1] // GROUP_SIZE)
    nz = np.flatnonzero(m_of)
    labels_nz, mult = np.zeros(0, np.int64), np.ones(0, np.int64)
    if nz.size:
        labels_nz, mult = _assign_steps(amax[nz] / m_of[nz], m_of[nz], u, name)
    # Exact step per cluster: intersect [lo/|q|, hi/|q|] over every nonzero weight of its groups.
    n_clusters = int(labels_nz.max()) + 1 if nz.size else 0
    q_nz = np.rint(a[nz] * (m_of[nz] * mult / amax[nz])[:, None])
    lo, hi = _rounding_interval(a[nz], np.asarray(stored).reshape(-1, GROUP_SIZE)[nz], dtype)
    with np.errstate(divide="ignore", invalid="ignore"):
        lo_s = np.where(q_nz > 0, lo / q_nz, -np.inf).max(axis=1)
        hi_s = np.where(q_nz > 0, hi / q_nz, np.inf).min(axis=1)
    low, high = np.full(n_clusters, -np.inf), np.full(n_clusters, np.inf)
    np.maximum.at(low, labels_nz, lo_s)
    np.minimum.at(high, labels_nz, hi_s)
    if (low >= high).any():
        raise CodecError(f"tensor '{name}': not trit-representable: no single step reproduces all weights "
                         f"of the groups that share step ≈ {float(low[low >= high][0]):.6g}")
    steps = ((low + high) / 2).astype(np.float32)
    codebook = np.full(CODEBOOK_SIZE, steps[-1] if n_clusters else 0.0, np.float32)
    codebook[:n_clusters] = steps
    idx = np.zeros(len(g), np.uint8)
    idx[nz] = labels_nz
    codes = np.zeros(g.shape, np.int64)
    codes[nz] = np.sign(g[nz]) * q_nz
    depth = next((d for d in DEPTHS if qmax_of(d) >= np.abs(codes).max(initial=0)), None)
    if depth is None:
        raise CodecError(f"tensor '{name}': not trit-representable: |q| reaches {np.abs(codes).max()}")
    n_out, n_in = stored.shape
    qm = QuantizedMatrix(codes.reshape(n_out, n_in).astype(np.int8), idx.reshape(n_out, -1), codebook, depth)
    _verify_exact(qm, stored, dtype, name)
    return qm


def _verify_exact(qm: QuantizedMatrix, stored: np.ndarray, dtype: str, name: str) -> None:
    """Dequantized bits must equal the input bits (-0.0 counts as 0.0: codes cannot carry a sign of zero)."""
    back = dequantize_as(qm, dtype)
    same = back.view(np.uint8).reshape(back.shape + (-1,)) == np.asarray(stored).view(np.uint8).reshape(back.shape + (-1,))
    same = same.all(axis=-1) | (to_float32(stored, dtype) == 0) & (to_float32(back, dtype) == 0)
    if not same.all():
        r, c = np.argwhere(~same)[0]
        raise CodecError(f"tensor '{name}': not trit-representable: recovered codes do not reproduce "
                         f"element [{r}, {c}] bit-exactly ({int((~same).sum())} elements differ)")
