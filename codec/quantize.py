"""Balanced-ternary post-training quantization of one linear weight matrix.

w ≈ step_g · q, q = Σ_{i<d} t_i·3^i, t_i ∈ {-1,0,1}, groups of 16 along `in`, step_g = codebook[idx_g]
with a 27-entry log-spaced codebook per matrix (3 trits per group index), entry 8a + b the float32 product of
two factors A_a and B_b (_log_codebook).

Two modes, same bits:
- "reference": the published rule. Per group the MSE-best of 4 order-statistic amplitudes, codebook
  spanning [smallest, largest] group step, each group's step snapped to the nearest entry in log space.
- "mse" (default): each group picks its codebook entry by measured MSE among the entries around its four
  candidates instead of snapping, and the codebook's lower end is the low quantile of the group steps
  (0, 0.5, 2 or 5%) whose codebook gives the matrix the least squared error: spanning down to the single
  smallest step can coarsen every other group's grid for one near-empty group.
"""
from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

import numpy as np

from .errors import CodecError

GROUP_SIZE = 16
CODEBOOK_SIZE = 27
FACTOR_TABLE = 8  # codebook entry 8a + b = A_a·B_b: two tables of 8 (one AVX2 vpermps each)
REVISION = 2  # of what a quantization setting writes (2: factored codebooks); caches of checkpoints key on it
DEPTHS = (1, 2, 3, 4)
MODES = ("mse", "reference")
_AMPLITUDE_RANKS = (GROUP_SIZE - 6, GROUP_SIZE - 4, GROUP_SIZE - 2, GROUP_SIZE - 1)
_CHUNK_GROUPS = 1 << 15
_LOW_QUANTILES = (0.0, 0.005, 0.02, 0.05)  # mse mode: the codebook lower ends tried, as quantiles of the steps


def qmax_of(depth: int) -> int:
    """Largest |q| at this depth: (3^d - 1) / 2."""
    return (3 ** depth - 1) // 2


@dataclass
class QuantizedMatrix:
    """Codes int8 [out, in], scale indices uint8 [out, in/16], codebook float32 [27] (steps)."""
    codes: np.ndarray
    scale_idx: np.ndarray
    codebook: np.ndarray
    depth: int

    @property
    def shape(self) -> tuple[int, int]:
        return self.codes.shape

    def dequantize(self, dtype=np.float32) -> np.ndarray:
        """step·q, computed exactly in float64 and rounded once to `dtype` (numpy dtype)."""
        steps = self.codebook.astype(np.float64)[self.scale_idx]
        w = self.codes.reshape(self.codes.shape[0], -1, GROUP_SIZE) * steps[..., None]
        return w.reshape(self.codes.shape).astype(dtype)


def check_matrix(w: np.ndarray, name: str = "weight") -> None:
    if w.ndim != 2:
        raise CodecError(f"tensor '{name}': expected a 2-D [out, in] matrix, got shape {list(w.shape)}")
    if w.shape[1] % GROUP_SIZE:
        raise CodecError(f"tensor '{name}': in_features {w.shape[1]} is not a multiple of the group size "
                         f"{GROUP_SIZE}")


def checked_float_matrix(w: np.ndarray, name: str = "weight") -> np.ndarray:
    """w as float32 after check_matrix, or a one-line error naming its first NaN or Inf."""
    check_matrix(w, name)
    w = np.asarray(w, np.float32)
    if not np.isfinite(w).all():
        bad = np.argwhere(~np.isfinite(w))[0].tolist()
        raise CodecError(f"tensor '{name}': contains NaN or Inf (first at index {bad})")
    return w


def _round_codes(g: np.ndarray, step: np.ndarray, qmax: int) -> np.ndarray:
    inv = np.divide(1.0, step, out=np.zeros_like(step), where=step > 0)
    q = np.rint(g * inv[:, None])
    return np.clip(q, -qmax, qmax, out=q)


def group_step_error(g: np.ndarray, step: np.ndarray, qmax: int, weight: np.ndarray | None = None) -> np.ndarray:
    """Per group (row of g), the squared rounding error at that step, each column weighted if asked."""
    q = _round_codes(g, step, qmax)
    q *= step[:, None]
    np.subtract(g, q, out=q)
    np.square(q, out=q)
    if weight is not None:
        q *= weight
    return q.sum(axis=1)


def best_amplitude_steps(g: np.ndarray, qmax: int) -> np.ndarray:
    """Per group, the MSE-best step among the 4 order-statistic amplitudes / qmax."""
    top = np.sort(np.abs(g), axis=1)[:, _AMPLITUDE_RANKS] / qmax
    errs = np.stack([group_step_error(g, top[:, c], qmax) for c in range(top.shape[1])], axis=1)
    return top[np.arange(len(g)), errs.argmin(axis=1)]


def _log_codebook(lo: float, hi: float) -> np.ndarray:
    """27 log-spaced steps from lo to hi, entry 8a + b the float32 product A_a·B_b of A_a = lo·r^(8a) and
    B_b = r^b (r = (hi/lo)^(1/26)): the same grid up to float32 rounding, whose steps a kernel finds with two
    8-entry table reads and a multiply (codec.format.codebook_factors, the AVX2 integer kernels)."""
    if not hi > 0:
        return np.zeros(CODEBOOK_SIZE, np.float32)
    lo, hi = float(lo), float(hi)
    lo = min(lo, hi) if lo > 0 else hi
    ratio = np.exp((np.log(hi) - np.log(lo)) / (CODEBOOK_SIZE - 1))
    k = np.arange(CODEBOOK_SIZE)
    outer = (lo * ratio ** k[::FACTOR_TABLE]).astype(np.float32)
    inner = (ratio ** np.arange(FACTOR_TABLE)).astype(np.float32)
    return outer[k // FACTOR_TABLE] * inner[k % FACTOR_TABLE]


def log_position(step: np.ndarray, codebook: np.ndarray) -> np.ndarray:
    """Fractional codebook index of each step (log-spaced codebook)."""
    lo, hi = np.log(codebook[0]), np.log(codebook[-1])
    if hi <= lo:
        return np.zeros_like(step)
    with np.errstate(divide="ignore"):
        pos = (np.log(np.maximum(step, 1e-38)) - lo) / (hi - lo) * (CODEBOOK_SIZE - 1)
    return np.clip(pos, 0, CODEBOOK_SIZE - 1)


def choose_entries(g: np.ndarray, best: np.ndarray, codebook: np.ndarray, qmax: int, mode: str
                   ) -> tuple[np.ndarray, np.ndarray]:
    """Per group, its codebook entry and that entry's squared error (the reference mode snaps in log space)."""
    pos = log_position(best, codebook)
    if mode == "reference":
        idx = np.rint(pos).astype(np.uint8)
        return idx, group_step_error(g, codebook[idx], qmax)
    base = np.floor(pos).astype(np.int64)
    cands = np.clip(base[:, None] + np.array([-1, 0, 1, 2]), 0, CODEBOOK_SIZE - 1)
    errs = np.stack([group_step_error(g, codebook[cands[:, c]], qmax) for c in range(cands.shape[1])], axis=1)
    pick = errs.argmin(axis=1)
    rows = np.arange(len(g))
    return cands[rows, pick].astype(np.uint8), errs[rows, pick]


def map_group_chunks(fn, n: int, workers: int = 2) -> list:
    """Run fn(slice) over chunks of n groups; numpy releases the GIL, so 2 threads use 2 cores."""
    slices = [slice(i, min(i + _CHUNK_GROUPS, n)) for i in range(0, n, _CHUNK_GROUPS)]
    if workers <= 1 or len(slices) == 1:
        return [fn(s) for s in slices]
    with ThreadPoolExecutor(workers) as ex:
        return list(ex.map(fn, slices))


def group_amplitudes(groups: np.ndarray, qmax: int, workers: int = 2) -> np.ndarray:
    """best_amplitude_steps of every group (row of groups [n, GROUP_SIZE]), in chunks on `workers` threads."""
    return np.concatenate(map_group_chunks(lambda s: best_amplitude_steps(groups[s], qmax), len(groups), workers))


def fit_codebook(groups: np.ndarray, best: np.ndarray, qmax: int, mode: str, workers: int = 2
                 ) -> tuple[np.ndarray, np.ndarray]:
    """The matrix's codebook from its groups' best steps, and each group's entry in it: spanning [smallest,
    largest] step (reference), or the lower end among _LOW_QUANTILES whose codebook gives the least error (mse)."""
    positive = best[best > 0]
    hi = float(positive.max()) if positive.size else 0.0
    lows = [float(np.quantile(positive, q)) if positive.size else 0.0
            for q in (_LOW_QUANTILES if mode == "mse" else (0.0,))]
    fitted = None  # (error, codebook, idx) of the best lower end
    for lo in lows:
        codebook = _log_codebook(lo, hi)
        chosen = map_group_chunks(lambda s: choose_entries(groups[s], best[s], codebook, qmax, mode), len(groups),
                                  workers)
        error = float(sum(e.sum(dtype=np.float64) for _, e in chosen))
        if fitted is None or error < fitted[0]:
            fitted = (error, codebook, np.concatenate([i for i, _ in chosen]))
    return fitted[1], fitted[2]


def quantize_matrix(w: np.ndarray, depth: int = 3, mode: str = "mse", name: str = "weight",
                    workers: int = 2) -> QuantizedMatrix:
    """Quantize a [out, in] float matrix; deterministic (no randomness, fixed chunking)."""
    if depth not in DEPTHS:
        raise CodecError(f"depth must be one of {DEPTHS}, got {depth}")
    if mode not in MODES:
        raise CodecError(f"codec mode must be one of {MODES}, got '{mode}'")
    w = checked_float_matrix(w, name)
    n_out, n_in = w.shape
    qmax = qmax_of(depth)
    groups = w.reshape(-1, GROUP_SIZE)
    codebook, idx = fit_codebook(groups, group_amplitudes(groups, qmax, workers), qmax, mode, workers)
    steps = codebook[idx]
    codes = np.concatenate(map_group_chunks(lambda s: _round_codes(groups[s], steps[s], qmax).astype(np.int8),
                                            len(groups), workers))
    return QuantizedMatrix(codes.reshape(n_out, n_in), idx.reshape(n_out, n_in // GROUP_SIZE), codebook, depth)


def relative_mse(w: np.ndarray, w_hat: np.ndarray) -> float:
    """Σ(w-ŵ)² / Σw², accumulated in float64."""
    w = np.asarray(w, np.float64)
    return float(np.sum((w - np.asarray(w_hat, np.float64)) ** 2) / max(np.sum(w * w), 1e-300))
