"""Mixed depth by sensitivity: a depth d ∈ {1, 2, 3, 4} per matrix under an average bits-per-weight budget.

Each matrix's error at each depth is measured (with calibration the loss increase its GPTQ quantization
causes, to second order: its output errors weighted by the loss's sensitivity to each output; without, its
squared weight error); depths then start at 1 everywhere and the upgrade that removes the most error per
added bit is taken while the budget allows (greedy on a convex trade-off). Matrices that read the same
input (q/k/v, gate/up of a layer) move together: they run as one kernel only at one depth. `--tensor-depth
PATTERN=D` pins matching matrices (glob on the tensor name, as llama.cpp's --tensor-type).
"""
from __future__ import annotations

import fnmatch
import heapq
from typing import Any, Callable

from .errors import CodecError
from .format import packed_bits
from .quantize import DEPTHS

BPW_RANGE = (1.9, 6.7)  # d=1 and d=4 at 16-wide groups, codebook included
SHARED_INPUT = (("q_proj", "k_proj", "v_proj"), ("gate_proj", "up_proj"))


def parse_overrides(specs: list[str]) -> list[tuple[str, int]]:
    """PATTERN=D strings -> (glob, depth); a malformed one is a one-line error."""
    out = []
    for spec in specs:
        pattern, sep, depth = spec.rpartition("=")
        if not sep or not pattern or not depth.isdigit() or int(depth) not in DEPTHS:
            raise CodecError(f"--tensor-depth {spec!r}: expected PATTERN=D with D in {list(DEPTHS)}")
        out.append((pattern, int(depth)))
    return out


def pinned_depths(names: list[str], overrides: list[tuple[str, int]]) -> dict[str, int]:
    """The depth each override gives (the last matching pattern wins); a pattern matching nothing is an error."""
    pinned: dict[str, int] = {}
    for pattern, depth in overrides:
        hits = fnmatch.filter(names, pattern)
        if not hits:
            raise CodecError(f"--tensor-depth {pattern}={depth}: the pattern matches no quantized tensor")
        pinned.update(dict.fromkeys(hits, depth))
    return pinned


def units_of(names: list[str]) -> list[list[str]]:
    """Matrices that share a depth: those reading the same input in one layer, else each alone."""
    left, units = set(names), []
    for name in names:
        if name not in left:
            continue
        parts = name.rsplit(".", 2)  # [parent, linear, "weight"]
        group = next((g for g in SHARED_INPUT if len(parts) == 3 and parts[1] in g), None)
        unit = [n for n in (f"{parts[0]}.{m}.{parts[2]}" for m in group) if n in left] if group else [name]
        left -= set(unit)
        units.append(unit)
    return units


def check_budget(bpw: float) -> None:
    lo, hi = BPW_RANGE
    if not lo <= bpw <= hi:
        raise CodecError(f"--bpw {bpw} is outside [{lo}, {hi}] (the packed sizes of depth 1 and 4)")


def allocate(errors: dict[str, dict[int, float]], shapes: dict[str, tuple[int, int]], bpw: float,
             pinned: dict[str, int]) -> dict[str, int]:
    """Depth per matrix minimizing the summed error with average packed bits/weight ≤ bpw."""
    check_budget(bpw)
    names = list(errors)
    total = sum(shapes[n][0] * shapes[n][1] for n in names)
    budget = bpw * total
    depth: dict[str, int] = {}
    units = units_of(names)
    for unit in units:
        fixed = {pinned[n] for n in unit if n in pinned}
        depth.update(dict.fromkeys(unit, max(fixed) if fixed else DEPTHS[0]))

    def bits(unit: list[str], d: int) -> float:
        return sum(packed_bits(*shapes[n], d) for n in unit)

    def err(unit: list[str], d: int) -> float:
        return sum(errors[n][d] for n in unit)

    used = sum(packed_bits(*shapes[n], depth[n]) for n in names)
    if used > budget:
        raise CodecError(f"--bpw {bpw}: the pinned depths (with depth 1 everywhere else) need "
                         f"{used / total:.3f} bits/weight")
    free = [u for u in units if not any(n in pinned for n in u)]
    for unit, d in zip(free, greedy_upgrades(free, bits, err, used, budget)):
        depth.update(dict.fromkeys(unit, d))
    return depth


def greedy_upgrades(units: list, bits: Callable[[Any, int], float], err: Callable[[Any, int], float], used: float,
                    budget: float) -> list[int]:
    """Depth per unit, each starting at depth 1: the upgrade that removes the most error per added bit first,
    while the bits used stay within the budget (greedy on a convex trade-off). bits(unit, d), err(unit, d): the
    unit's packed bits and error at depth d; used: the bits already spent, these units at depth 1 included."""
    depth = [DEPTHS[0]] * len(units)
    heap = [(-(err(u, 1) - err(u, 2)) / (bits(u, 2) - bits(u, 1)), i) for i, u in enumerate(units)]
    heapq.heapify(heap)
    while heap:
        _, i = heapq.heappop(heap)
        unit, d = units[i], depth[i]
        extra = bits(unit, d + 1) - bits(unit, d)
        if used + extra > budget:
            continue  # too big for what is left; smaller upgrades elsewhere may still fit
        used += extra
        depth[i] = d + 1
        if d + 1 < DEPTHS[-1]:
            gain = err(unit, d + 1) - err(unit, d + 2)
            heapq.heappush(heap, (-gain / (bits(unit, d + 2) - bits(unit, d + 1)), i))
    return depth
