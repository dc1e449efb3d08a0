"""Trit quantization of a model: every nn.Linear whose checkpoint tensors are quantized becomes a TritLinear
(one trit_decode_matmul call reading the packed trits), applied by one nn.Mutator over the plain model.

The mutator also records where each parameter of the mutated model comes from in the trit checkpoint
(`sources`), so the compiler loads parameters without deriving names itself.
"""
from __future__ import annotations

import functools
import itertools
from dataclasses import dataclass
from typing import Callable, NamedTuple

from tvm.relax.frontend import nn
from tvm.relax.frontend.nn import Tensor, op

from codec.checkpoint import is_quantized_tensor
from codec.format import CODEBOOK, CODES, SCALES

from .errors import CompileError
from .operator import WeightLayout, trit_decode_matmul_te, trit_op_attrs

class RowBlock(NamedTuple):
    """Rows of a matrix stored as a quantized matrix of their own (checkpoint `row_blocks`)."""
    tensor: str
    rows: int
    depth: int
    codebook: bytes | None = None  # when known: blocks of one kernel that are neighbours and share it share a part


# checkpoint weight name -> its trit depth, its row blocks in row order, or None when kept dense
DepthOf = Callable[[str], "int | tuple[RowBlock, ...] | None"]


class TritLinear(nn.Module):
    """A linear layer stored as packed trits; forward is one trit_decode_matmul call.

    parts: output sizes of several matrices with the same input stacked into one (q/k/v, gate/up, row blocks of one
    depth): one kernel reads x once and launches once for all of them; each keeps its own codebook."""

    def __init__(self, in_features: int, parts: tuple[int, ...], depth: int, bias: bool, dtype: str,
                 layout: WeightLayout):
        self.in_features, self.out_features = in_features, sum(parts)
        self.parts, self.depth, self.layout = tuple(parts), depth, layout
        self.trit_codes = nn.Parameter(layout.code_shape(self.out_features, in_features, depth), layout.unit_dtype)
        self.trit_scales = nn.Parameter(layout.scale_shape(self.out_features, in_features, depth), layout.unit_dtype)
        self.trit_codebook = nn.Parameter((layout.codebook_size(len(parts)),), "float32")
        self.bias = nn.Parameter((self.out_features,), dtype) if bias else None

    def forward(self, x: Tensor) -> Tensor:
        args = [x, self.trit_codes, self.trit_scales, self.trit_codebook]
        if self.bias is not None:
            args.append(self.bias)
        te_func = functools.partial(trit_decode_matmul_te, n_out=self.out_features, depth=self.depth,
                                    layout=self.layout, parts=self.parts)
        return op.tensor_expr_op(te_func, "trit_decode_matmul", args,
                                 attrs=trit_op_attrs(self.out_features, self.in_features, self.depth,
                                                     self.bias is not None, self.layout, self.parts))


class DepthGroupedLinear(nn.Module):
    """Row blocks of several depths (matrices stacked at different depths, or a matrix stored as row blocks): one
    TritLinear per depth (the packed layouts of different depths cannot share a kernel), the outputs put back in
    row order, then the bias."""

    def __init__(self, linears: list[TritLinear], blocks: list[tuple[int, ...]], order: list[tuple[int, int]],
                 bias: bool, dtype: str):
        self.linears = nn.ModuleList(linears)
        self.blocks = blocks  # per linear: the rows of each of its blocks
        self.order = order  # row order: (linear, block) of each block
        self.bias = nn.Parameter((sum(lin.out_features for lin in linears),), dtype) if bias else None

    def forward(self, x: Tensor) -> Tensor:
        outs = [linear(x) for linear in self.linears]
        if self.order != sorted(self.order):
            pieces = [op.split(y, list(itertools.accumulate(rows[:-1])), axis=-1) if len(rows) > 1 else (y,)
                      for y, rows in zip(outs, self.blocks)]
            outs = [pieces[i][b] for i, b in self.order]
        y = op.concat(outs, dim=-1)
        return y + self.bias if self.bias is not None else y


@dataclass(frozen=True)
class ParamSource:
    """Checkpoint tensors behind one model parameter, stacked along rows in order; `packed` is the trit
    checkpoint suffix (trit_codes, trit_scales, trit_codebook) or None for a kept tensor."""
    tensors: tuple[str, ...]
    packed: str | None = None


class TritQuantizer(nn.Mutator):
    """Swap the model's nn.Linear layers for TritLinear where the checkpoint holds their weights as trits.

    depth_of: checkpoint weight name -> depth (None: the tensor is kept, the layer stays a dense nn.Linear).
    source_names: the architecture's name mapping (model parameter -> checkpoint tensors)."""

    def __init__(self, depth_of: DepthOf, layout: WeightLayout, source_names: Callable[[str], list[str]]):
        self.depth_of, self.layout, self.source_names = depth_of, layout, source_names
        self.sources: dict[str, ParamSource] = {}

    def visit_module(self, name: str, node: nn.Module):
        if not isinstance(node, nn.Linear):
            return super().visit_module(name, node)
        weights = self.source_names(f"{name}.weight")
        depths = [self.depth_of(w) for w in weights]
        if all(d is None for d in depths):
            return node
        if any(d is None for d in depths):
            raise CompileError(f"tensors {', '.join(weights)} are stacked into one layer, but only some of them "
                               "are quantized")
        parts = getattr(node, "out_parts", (node.out_features,))
        biases = self.source_names(f"{name}.bias") if node.bias is not None else [None] * len(parts)
        if all(d == depths[0] for d in depths) and not isinstance(depths[0], tuple):
            return self._trit_linear(name, node, parts, depths[0], weights, biases)
        blocks = [b for w, n, d in zip(weights, parts, depths) for b in self._blocks(w, n, d)]
        by_depth: dict[int, list[int]] = {}
        for i, b in enumerate(blocks):
            by_depth.setdefault(b.depth, []).append(i)
        position = {i: (g, k) for g, members in enumerate(by_depth.values()) for k, i in enumerate(members)}
        order = [position[i] for i in range(len(blocks))]
        if node.bias is not None:
            self.sources[f"{name}.bias"] = ParamSource(tuple(biases))
        linears = []
        for g, (depth, members) in enumerate(by_depth.items()):
            parts, firsts = [], []  # a part per run of neighbours with one codebook (fewer tables to look up in)
            for i in members:
                b = blocks[i]
                if parts and b.codebook is not None and b.codebook == blocks[firsts[-1]].codebook:
                    parts[-1] += b.rows
                else:
                    parts.append(b.rows)
                    firsts.append(i)
            linears.append(self._trit_linear(f"{name}.linears.{g}", node, tuple(parts), depth,
                                             [blocks[i].tensor for i in members], None,
                                             [blocks[i].tensor for i in firsts]))
        return DepthGroupedLinear(linears, [tuple(blocks[i].rows for i in members) for members in by_depth.values()],
                                  order, node.bias is not None, node.weight.dtype)

    @staticmethod
    def _blocks(weight: str, rows: int, depth: "int | tuple[RowBlock, ...]") -> tuple[RowBlock, ...]:
        if not isinstance(depth, tuple):
            return (RowBlock(weight, rows, depth),)
        if sum(b.rows for b in depth) != rows:
            raise CompileError(f"the row blocks of '{weight}' hold {sum(b.rows for b in depth)} rows, the model "
                               f"config needs {rows}")
        return depth

    def _trit_linear(self, name: str, node: nn.Linear, parts: tuple[int, ...], depth: int, weights: list[str],
                     biases: list[str | None] | None, codebooks: list[str] | None = None) -> TritLinear:
        """biases None: the layer's bias is added outside (DepthGroupedLinear); codebooks: the tensor whose
        codebook each part uses (default: weights, one part each)."""
        for suffix in (CODES, SCALES):
            self.sources[f"{name}.{suffix}"] = ParamSource(tuple(weights), suffix)
        self.sources[f"{name}.{CODEBOOK}"] = ParamSource(tuple(codebooks or weights), CODEBOOK)
        bias = node.bias is not None and biases is not None
        if bias:
            self.sources[f"{name}.bias"] = ParamSource(tuple(biases))
        return TritLinear(node.in_features, parts, depth, bias, node.weight.dtype, self.layout)

    def source(self, param: str) -> ParamSource:
        """Where a parameter of the mutated model comes from."""
        return self.sources.get(param) or ParamSource(tuple(self.source_names(param)))


def uniform_depth(depth: int) -> DepthOf:
    """Every linear weight at one depth (shape-only builds, tuning); depth 0: all dense."""
    return lambda name: depth if depth and is_quantized_tensor(name, (1, 1)) else None
