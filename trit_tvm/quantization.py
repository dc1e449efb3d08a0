"""Trit quantization of a model: every nn.Linear whose checkpoint tensors are quantized becomes a TritLinear
(one trit_decode_matmul call reading the packed trits), applied by one nn.Mutator over the plain model.

The mutator also records where each parameter of the mutated model comes from in the trit checkpoint
(`sources`), so the compiler loads parameters without deriving names itself.
"""
from __future__ import annotations

import functools
from dataclasses import dataclass
from typing import Callable

from tvm.relax.frontend import nn
from tvm.relax.frontend.nn import Tensor, op

from codec.checkpoint import is_quantized_tensor
from codec.format import CODEBOOK, CODES, SCALES

from .errors import CompileError
from .operator import WeightLayout, trit_decode_matmul_te, trit_op_attrs

DepthOf = Callable[[str], "int | None"]  # checkpoint weight name -> its trit depth, None when kept dense


class TritLinear(nn.Module):
    """A linear layer stored as packed trits; forward is one trit_decode_matmul call.

    parts: output sizes of several matrices with the same input stacked into one (q/k/v, gate/up): one
    kernel reads x once and launches once for all of them; each keeps its own codebook."""

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


class ConcatLinears(nn.Module):
    """Stacked matrices of different depths: one TritLinear each, outputs concatenated (the packed layouts of
    different depths cannot share a kernel)."""

    def __init__(self, linears: list[TritLinear]):
        self.linears = nn.ModuleList(linears)

    def forward(self, x: Tensor) -> Tensor:
        return op.concat([linear(x) for linear in self.linears], dim=-1)


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
        if len(set(depths)) == 1:
            return self._trit_linear(name, node, parts, depths[0], weights, biases)
        return ConcatLinears([self._trit_linear(f"{name}.linears.{i}", node, (n,), d, [w], [b])
                              for i, (n, d, w, b) in enumerate(zip(parts, depths, weights, biases))])

    def _trit_linear(self, name: str, node: nn.Linear, parts: tuple[int, ...], depth: int, weights: list[str],
                     biases: list[str | None]) -> TritLinear:
        for suffix in (CODES, SCALES, CODEBOOK):
            self.sources[f"{name}.{suffix}"] = ParamSource(tuple(weights), suffix)
        if node.bias is not None:
            self.sources[f"{name}.bias"] = ParamSource(tuple(biases))
        return TritLinear(node.in_features, parts, depth, node.bias is not None, node.weight.dtype, self.layout)

    def source(self, param: str) -> ParamSource:
        """Where a parameter of the mutated model comes from."""
        return self.sources.get(param) or ParamSource(tuple(self.source_names(param)))


def uniform_depth(depth: int) -> DepthOf:
    """Every linear weight at one depth (shape-only builds, tuning); depth 0: all dense."""
    return lambda name: depth if depth and is_quantized_tensor(name, (1, 1)) else None
