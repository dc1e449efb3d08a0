"""Recover exact trit codes from a dequantized (Entrit-style FP16/BF16) matrix.

Such a matrix holds at most 27 distinct group steps and every weight is step·q rounded into the file's
dtype, whatever arithmetic computed the product (float64, float32 or FP16/BF16). Recovery works with exact
intervals instead of tolerances: a stored value v stands for the reals that round to it, so a weight with
code q pins the step to [lo(v)/q, hi(v)/q].
1. Per group, every m (its max |q|, up to Q = qmax of the depth) under which its weights are integer
   multiples of one step: each gives an interval for the step (m and 2m when codes share a factor; other
   m too when a coarse dtype cannot tell few distinct values apart).
2. Groups with one such m pin their step: their intervals are stabbed by the fewest points, the
   codebook's steps; a step's exact value lies in the intersection of its intervals.
3. Each step is the float32 inside that intersection that also serves the most other groups; groups no
   step serves get new steps, each where the most of them allow one (a sweep over their intervals).
4. Dequantizing is checked bit for bit (the sign of a zero excepted: a code of 0 has none). Depths are
   tried from the smallest whose codes explain every group.
"""
from __future__ import annotations

import numpy as np

from .errors import CodecError
from .quantize import CODEBOOK_SIZE, DEPTHS, GROUP_SIZE, QuantizedMatrix, check_matrix, qmax_of
from .safetensors_io import FLOAT_DTYPES, from_float, to_float32

def dequantize_as(qm: QuantizedMatrix, dtype: str) -> np.ndarray:
    """step·q rounded once into the storage form of `dtype` (BF16 as uint16 bits)."""
    return from_float(qm.dequantize(np.float64), dtype)


def _rounding_interval(stored: np.ndarray, dtype: str) -> tuple[np.ndarray, np.ndarray]:
    """For each stored value's magnitude, the closed interval of reals that round to it (round half to even:
    a midpoint belongs to the neighbour with the even last bit), as float64."""
    if dtype == "BF16":
        bits = np.asarray(stored, np.uint16) & np.uint16(0x7FFF)
        mag = to_float32(bits, "BF16").astype(np.float64)
        up = to_float32(bits + np.uint16(1), "BF16").astype(np.float64)
        down = to_float32(np.maximum(bits, 1) - np.uint16(1), "BF16").astype(np.float64)
        odd = (bits & np.uint16(1)).astype(bool)
    else:
        mag = np.abs(np.asarray(stored))
        up = np.nextafter(mag, np.inf).astype(np.float64)
        down = np.nextafter(mag, 0).astype(np.float64)
        odd = (mag.view(np.dtype(f"u{mag.dtype.itemsize}")) & 1).astype(bool)
        mag = mag.astype(np.float64)
    lo, hi = (mag + down) / 2, (mag + up) / 2
    lo = np.where(odd, np.nextafter(lo, np.inf), lo)  # an odd value does not own its midpoints
    hi = np.where(odd, np.nextafter(hi, -np.inf), hi)
    return np.where(mag > 0, lo, 0.0), hi


def _options(a: np.ndarray, lo: np.ndarray, hi: np.ndarray, ms: range) -> tuple[np.ndarray, ...]:
    """Every (group, m) with m in ms under which the group's weights fit one step with max |q| = m, and that
    step's interval: arrays (group, low, high). Groups of zeros have none (any step serves them)."""
    amax = a.max(axis=1)
    live = np.flatnonzero(amax > 0)
    found = []
    for m in ms:
        q = np.rint(a[live] * (m / amax[live])[:, None])
        pos = q > 0
        with np.errstate(divide="ignore", invalid="ignore"):
            lo_s = np.where(pos, lo[live] / q, -np.inf).max(axis=1)
            hi_s = np.where(pos, hi[live] / q, np.inf).min(axis=1)
        ok = (lo_s <= hi_s) & ~((q == 0) & (a[live] > 0)).any(axis=1)
        found.append((live[ok], lo_s[ok], hi_s[ok]))
    if not found:
        return np.zeros(0, np.int64), np.zeros(0), np.zeros(0)
    return tuple(np.concatenate(parts) for parts in zip(*found))


def _stab(low: np.ndarray, high: np.ndarray) -> list[tuple[float, float]]:
    """The fewest points hitting every interval, as the intersections they stand for (greedy by right end).
    Vectorized where steps are far apart (the usual case); the exact loop only inside a run of
    overlapping intervals whose intersection is empty."""
    order = np.argsort(low, kind="stable")
    lo_s, hi_s = low[order], high[order]
    # a new run where an interval starts after every interval so far has ended
    starts = np.concatenate([[True], lo_s[1:] > np.maximum.accumulate(hi_s)[:-1]])
    bounds = np.flatnonzero(starts).tolist() + [len(lo_s)]
    out = []
    for b, e in zip(bounds[:-1], bounds[1:]):
        lo_run, hi_run = lo_s[b:e], hi_s[b:e]
        if lo_run.max() <= hi_run.min():
            out.append((float(lo_run.max()), float(hi_run.min())))
            continue
        first = len(out)
        for i in np.argsort(hi_run, kind="stable"):  # textbook greedy stabbing: the point at the first right end
            if len(out) > first and lo_run[i] <= out[-1][1]:
                out[-1] = (max(out[-1][0], float(lo_run[i])), out[-1][1])
            else:
                out.append((float(lo_run[i]), float(hi_run[i])))
    return out


def _float32_inside(lo: float, hi: float) -> float | None:
    """A float32 in [lo, hi] (the middle one if several), or None."""
    mid = np.float32((lo + hi) / 2)
    for cand in (mid, np.nextafter(mid, np.float32(np.inf)), np.nextafter(mid, np.float32(0))):
        if lo <= float(cand) <= hi:
            return float(cand)
    return None


def _best_step(low: np.ndarray, high: np.ndarray, within: tuple[float, float] = (0.0, np.inf)) -> float | None:
    """The float32 step inside `within` that the most of the intervals hold: a sweep over their ends counts
    how many are open at each point; the deepest stretch holding a float32 wins (None: none holds one)."""
    lo, hi = np.maximum(low, within[0]), np.minimum(high, within[1])
    keep = lo <= hi
    if not keep.any():
        return _float32_inside(*within)
    ends = np.concatenate([lo[keep], hi[keep]])
    kind = np.concatenate([np.ones(int(keep.sum()), np.int64), -np.ones(int(keep.sum()), np.int64)])
    order = np.lexsort((-kind, ends))  # at equal positions, openings first: closed intervals touch
    ends, depth = ends[order], np.cumsum(kind[order])
    for i in np.argsort(-depth[:-1], kind="stable")[:64]:
        step = _float32_inside(float(ends[i]), float(ends[i + 1]))
        if step is not None:
            return step
    return None


def _codebook(n_groups: int, group: np.ndarray, low: np.ndarray, high: np.ndarray):
    """(float32 steps, step index per group) from the groups' options, or a string saying why there is none.

    A group with one option (one max |q| fits it) pins its step to that interval: those intervals are
    stabbed by the fewest points, the codebook's steps. Each step is the float32 inside its intersection
    that also serves the most other groups (several options: codes sharing a factor, or too few distinct
    values to tell); groups no step serves get new steps, each where the most of them allow one."""
    count = np.bincount(group, minlength=n_groups)
    unique = count[group] == 1
    runs = _stab(low[unique], high[unique]) if unique.any() else []
    if len(runs) > CODEBOOK_SIZE:
        return f"more than {CODEBOOK_SIZE} distinct group steps"
    idx = np.zeros(n_groups, np.int64)
    done = np.zeros(n_groups, bool)
    steps: list[float] = []

    def take(step: float) -> bool:
        """Step len(steps) for every group not yet served that it serves; False if it serves none."""
        served = group[~done[group] & (low <= step) & (step <= high)]
        if served.size == 0:
            return False
        idx[served], done[served] = len(steps), True
        steps.append(step)
        return True

    for lo_k, hi_k in runs:
        open_ = ~done[group] & ~unique
        step = _best_step(low[open_], high[open_], (lo_k, hi_k))
        if step is None or not take(step):
            return f"no float32 step reproduces the groups that share step ≈ {lo_k:.6g}"
    while not done[group].all():
        if len(steps) == CODEBOOK_SIZE:
            return f"more than {CODEBOOK_SIZE} distinct group steps"
        open_ = ~done[group]
        step = _best_step(low[open_], high[open_])
        if step is None or not take(step):
            return f"no float32 step reproduces the group of step ≈ {low[open_][0]:.6g}"
    return np.array(steps, np.float32), idx


def recover_matrix(stored: np.ndarray, dtype: str, name: str = "weight") -> QuantizedMatrix:
    """Exact codes, scale indices, codebook and depth of a dequantized trit matrix."""
    if dtype not in FLOAT_DTYPES:
        raise CodecError(f"tensor '{name}': dtype {dtype} cannot hold a dequantized trit matrix")
    check_matrix(stored, name)
    values = to_float32(stored, dtype).astype(np.float64)
    if not np.isfinite(values).all():
        raise CodecError(f"tensor '{name}': contains NaN or Inf")
    g = values.reshape(-1, GROUP_SIZE)
    a = np.abs(g)
    lo, hi = _rounding_interval(np.asarray(stored).reshape(-1, GROUP_SIZE), dtype)
    n_out, n_in = stored.shape
    options = [np.zeros(0, np.int64), np.zeros(0), np.zeros(0)]
    failure, q_done = "", 0
    for depth in DEPTHS:  # the smallest depth whose codes explain every group
        q_max = qmax_of(depth)
        options = [np.concatenate(pair) for pair in zip(options, _options(a, lo, hi, range(q_done + 1, q_max + 1)))]
        q_done = q_max
        unexplained = np.flatnonzero((a.max(axis=1) > 0) & (np.bincount(options[0], minlength=len(g)) == 0))
        if unexplained.size:
            row, col = divmod(int(unexplained[0]), n_in // GROUP_SIZE)
            failure = (f"row {row}, columns {col * GROUP_SIZE}..{col * GROUP_SIZE + GROUP_SIZE - 1} share no step "
                       f"with |q| <= {q_max}")
            continue
        found = _codebook(len(g), *options)
        if isinstance(found, str):
            failure = found
            continue
        steps, idx = found
        codebook = np.full(CODEBOOK_SIZE, steps[-1] if len(steps) else 0.0, np.float32)
        codebook[:len(steps)] = steps
        step_of = codebook.astype(np.float64)[idx]
        with np.errstate(divide="ignore", invalid="ignore"):
            codes = np.where(step_of[:, None] > 0, np.rint(g / step_of[:, None]), 0)
        qm = QuantizedMatrix(codes.reshape(n_out, n_in).astype(np.int8), idx.reshape(n_out, -1).astype(np.uint8),
                             codebook, depth)
        bad = _mismatches(qm, stored, dtype) | (np.abs(qm.codes) > q_max)
        if not bad.any():
            return qm
        r, c = np.argwhere(bad)[0]
        failure = f"recovered codes do not reproduce element [{r}, {c}] bit-exactly ({int(bad.sum())} elements differ)"
    raise CodecError(f"tensor '{name}': not trit-representable: {failure}")


def _mismatches(qm: QuantizedMatrix, stored: np.ndarray, dtype: str) -> np.ndarray:
    """Elements whose dequantized bits differ from the stored ones (-0.0 counts as 0.0: codes cannot carry
    the sign of a zero)."""
    back = dequantize_as(qm, dtype)
    width = np.dtype(f"u{back.dtype.itemsize}")
    same = back.view(width) == np.asarray(stored).view(width)
    return ~(same | (to_float32(stored, dtype) == 0) & (to_float32(back, dtype) == 0))
