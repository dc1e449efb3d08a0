"""A depth per block of rows: per q/k/v head and per MLP channel instead of per matrix (`trit-quantize --row-blocks`).

GPTQ and the K-FAC loss estimate Σₒ gₒ (ΔW H ΔWᵀ)ₒₒ are separable by output rows, so rows can be allocated
depths as codec.mixed allocates matrices (greedy on estimated loss per bit). The units: a q/k/v head (head_dim
rows in place), an MLP channel (its gate and up rows together), o_proj and down_proj whole. The channels are then
put in order of depth (stable), gate/up rows and down_proj's columns alike, which is the same function, so each of
gate/up holds at most one run of rows per depth; heads stay in place. A matrix whose rows have several depths is
written as its runs of rows, each a quantized matrix of its own (docs/FORMAT.md, `row_blocks`).
"""
from __future__ import annotations

import numpy as np

from .errors import CodecError
from .format import CODEBOOK, packed_shapes
from .mixed import check_budget, greedy_upgrades
from .quantize import DEPTHS, QuantizedMatrix

QKV = ("q_proj.weight", "k_proj.weight", "v_proj.weight")
Unit = list[tuple[str, "int | None"]]  # (matrix, row) pairs, or (matrix, None) for all its rows


def units_by(split: str, shapes: dict[str, tuple[int, int]], head_dim: int) -> list[Unit]:
    """Rows that share a depth. 'channels+heads': gate/up rows paired by channel, q/k/v rows by head (head_dim rows
    in place), other matrices whole (what --row-blocks writes); 'channels+qkv': the same with q/k/v rows alone;
    'rows': every row alone (the last two: oracles of benchmarks/bench_row_depths.py, not a layout)."""
    units = []
    for n, (n_out, _) in shapes.items():
        if split == "rows":
            units += [[(n, r)] for r in range(n_out)]
        elif n.endswith(QKV):
            per = head_dim if split == "channels+heads" else 1
            units += [[(n, r) for r in range(r0, r0 + per)] for r0 in range(0, n_out, per)]
        elif n.endswith("gate_proj.weight") and n.replace("gate_proj", "up_proj") in shapes:
            units += [[(n, r), (n.replace("gate_proj", "up_proj"), r)] for r in range(n_out)]
        elif not (n.endswith("up_proj.weight") and n.replace("up_proj", "gate_proj") in shapes):
            units.append([(n, None)])
    return units


def _rows(row: int | None) -> slice:
    return slice(None) if row is None else slice(row, row + 1)


def allocate_rows(units: list[Unit], row_errors: dict[str, dict[int, np.ndarray]],
                  row_bits: dict[str, dict[int, float]], budget: float, pinned: dict[str, int] | None = None
                  ) -> dict[str, np.ndarray]:
    """Depth per row: units start at depth 1 (pinned matrices at their depth) and are upgraded greedily
    (codec.mixed.greedy_upgrades) while the bits stay within budget. row_errors[n][d]: each row's error at depth d;
    row_bits[n][d]: one row's bits at depth d."""
    pinned = pinned or {}

    def bits(unit: Unit, d: int) -> float:
        return sum(row_bits[n][d] * len(row_errors[n][d][_rows(r)]) for n, r in unit)

    def err(unit: Unit, d: int) -> float:
        return sum(float(row_errors[n][d][_rows(r)].sum()) for n, r in unit)

    out = {n: np.full(len(row_errors[n][DEPTHS[0]]), pinned.get(n, DEPTHS[0])) for n in row_errors}
    free = [u for u in units if not any(n in pinned for n, _ in u)]
    used = sum(row_bits[n][int(d)] for n, rows in out.items() for d in rows)
    if used > budget:
        raise CodecError(f"--bpw: the pinned depths (with depth 1 everywhere else) need {used / budget:.2f}x the "
                         "bits of the budget")
    for unit, d in zip(free, greedy_upgrades(free, bits, err, used, budget)):
        for n, r in unit:
            out[n][_rows(r)] = d
    return out


def max_blocks(name: str, n_out: int, head_dim: int) -> int:
    """The most row blocks --row-blocks can cut a matrix into: a block per head of q/k/v, one per depth of
    gate/up (channels in order of depth), one for the rest."""
    if name.endswith(QKV):
        return -(-n_out // head_dim)
    return len(DEPTHS) if rows_are_channels(name) else 1


def codebook_bits() -> int:
    """The bits of one block's codebook (float32 steps)."""
    return 32 * int(np.prod(packed_shapes(1, 16, 1)[CODEBOOK]))


def block_budget(bpw: float, shapes: dict[str, tuple[int, int]], head_dim: int) -> float:
    """Bits left for the rows' codes and scales at bpw, after the codebooks of as many blocks as there can be:
    a budget the written checkpoint cannot exceed."""
    check_budget(bpw)
    total = sum(a * b for a, b in shapes.values())
    return bpw * total - codebook_bits() * sum(max_blocks(n, s[0], head_dim) for n, s in shapes.items())


def runs(depths: np.ndarray) -> list[tuple[int, int, int]]:
    """(start, stop, depth) of each run of equal depths."""
    cuts = [0, *(np.flatnonzero(np.diff(depths)) + 1).tolist(), len(depths)]
    return [(a, b, int(depths[a])) for a, b in zip(cuts[:-1], cuts[1:])]


def rows_are_channels(name: str) -> bool:
    """gate_proj and up_proj: their rows are the MLP's channels, so they are written in the channels' order."""
    return name.endswith(("gate_proj.weight", "up_proj.weight"))


def columns_are_channels(name: str) -> bool:
    """down_proj: its columns are the MLP's channels, so it is one unit and quantized again, columns in the
    channels' order, when written (not taken from its measured rows)."""
    return name.endswith("down_proj.weight")


def mlp_of(name: str) -> str:
    """The MLP a gate/up/down matrix belongs to (its name's parent): channel_orders' key."""
    return name.rsplit(".", 2)[0]


def channel_orders(row_depths: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """MLP (mlp_of gate_proj) -> its channels in order of depth (stable), where the depths differ."""
    return {mlp_of(n): np.argsort(d, kind="stable") for n, d in row_depths.items()
            if n.endswith("gate_proj.weight") and len(set(d.tolist())) > 1}


def take_rows(qm: QuantizedMatrix, rows: np.ndarray | slice) -> QuantizedMatrix:
    """These rows of a quantized matrix (rows are quantized on their own: codes, scales and codebook hold)."""
    return QuantizedMatrix(qm.codes[rows], qm.scale_idx[rows], qm.codebook, qm.depth)


def block_name(name: str, start: int, stop: int) -> str:
    """The checkpoint name of rows [start, stop) of a matrix written as row blocks."""
    return f"{name}.rows_{start}_{stop}"
