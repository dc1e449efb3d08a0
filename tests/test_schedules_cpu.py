"""The CPU rules for the kernels around the trit operator: same numbers as numpy, and the RMSNorm
reduction computed once per row (on one row, dlight.cpu.Reduction recomputes it for every output element)."""
import numpy as np
import pytest
import tvm
from tvm import s_tir
from tvm.tirx import ForKind
from tvm.relax.frontend import nn

from schedules import ElementwiseCPU, RowReductionCPU
from trit_tvm.pipeline import fusion_passes

LLVM = tvm.target.Target({"kind": "llvm"})
HIDDEN = 96


class _Norm(nn.Module):
    def __init__(self):
        self.norm = nn.RMSNorm(HIDDEN, -1, 1e-6, bias=False, dtype="float32")

    def forward(self, x: nn.Tensor) -> nn.Tensor:
        return self.norm(x)


class _SiluMul(nn.Module):
    def forward(self, x: nn.Tensor, gate: nn.Tensor) -> nn.Tensor:
        return nn.op.silu(gate) * x


def _kernel(module: nn.Module, inputs: list[str], rows: int) -> tvm.tirx.PrimFunc:
    """The one fused TIR kernel of a module (inputs [1, rows, HIDDEN])."""
    spec = {"forward": {**{name: nn.spec.Tensor([1, rows, HIDDEN], "float32") for name in inputs},
                        "$": {"param_mode": "plain"}}}
    mod, _ = module.export_tvm(spec=spec)
    mod = tvm.transform.Sequential(fusion_passes())(mod)
    (func,) = [f for f in mod.functions.values() if isinstance(f, tvm.tirx.PrimFunc)]
    return func.with_attr("global_symbol", "main")


def _run(sch: s_tir.Schedule, arrays: dict[str, np.ndarray]) -> np.ndarray:
    """Run the kernel with its inputs by parameter name (fusion orders them its own way)."""
    lib = tvm.compile(sch.mod, target=LLVM)
    dev = tvm.cpu()
    *names, _ = [p.name for p in sch.mod["main"].params]
    out = tvm.runtime.tensor(np.zeros_like(arrays["x"]), dev)
    lib(*[tvm.runtime.tensor(arrays[n], dev) for n in names], out)
    return out.numpy()


@pytest.mark.parametrize("rows", [1, 5])
def test_rms_norm_reduces_each_row_once(rows):
    sch = RowReductionCPU().apply(_kernel(_Norm(), ["x"], rows), LLVM, False)
    assert sch is not None
    reduction = sch.get_sblock("T_multiply_red")
    runs = np.prod([int(sch.get(lp).extent) for lp in sch.get_loops(reduction)])
    assert runs == rows * HIDDEN  # dlight.cpu.Reduction at rows=1: HIDDEN * HIDDEN
    rng = np.random.default_rng(rows)
    x = rng.standard_normal((1, rows, HIDDEN)).astype(np.float32)
    w = rng.standard_normal(HIDDEN).astype(np.float32)
    ref = x / np.sqrt((x.astype(np.float64) ** 2).mean(-1, keepdims=True) + 1e-6) * w
    np.testing.assert_allclose(_run(sch, {"x": x, "norm.weight": w}), ref, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("rows", [1, 200])
def test_elementwise_kernel_is_vectorized_and_exact(rows):
    func = _kernel(_SiluMul(), ["x", "gate"], rows)
    assert RowReductionCPU().apply(func, LLVM, False) is None  # no reduction: not that rule's
    sch = ElementwiseCPU().apply(func, LLVM, False)
    assert sch is not None
    kinds = {int(sch.get(lp).kind) for lp in sch.get_loops(sch.get_child_blocks(sch.get_sblock("root"))[-1])}
    assert int(ForKind.VECTORIZED) in kinds
    assert (int(ForKind.PARALLEL) in kinds) == (rows * HIDDEN >= 1 << 14)  # small kernels stay on one core
    rng = np.random.default_rng(rows)
    x, gate = (rng.standard_normal((1, rows, HIDDEN)).astype(np.float32) for _ in range(2))
    np.testing.assert_allclose(_run(sch, {"x": x, "gate": gate}), gate / (1 + np.exp(-gate)) * x, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("positions", [1, 7, None])
def test_dense_logits_rule_reads_the_head_once_for_all_positions(positions):
    """DenseLogitsCPU: one position (decode) with a vocabulary row per parallel iteration; several (7, or a
    symbolic count as `score` chunks have: 13 given) with tiles of rows in the parallel loop and the
    positions inside each (each row of W read once per call). A vocabulary that is not a multiple of the
    tile; logits equal numpy's."""
    from tvm import te

    from schedules import DenseLogitsCPU
    from schedules.base import KERNEL_ATTR, LOGITS_KERNEL
    from trit_tvm.models.base import logits_nt
    vocab, i64 = 301, (lambda v: tvm.tirx.IntImm("int64", v))
    count = tvm.tirx.Var("n", "int64") if positions is None else i64(positions)
    x = te.placeholder((i64(1), count, i64(HIDDEN)), "float32", "x")
    w = te.placeholder((i64(vocab), i64(HIDDEN)), "float16", "w")
    func = te.create_prim_func([x, w, logits_nt(x, w)]).with_attr({KERNEL_ATTR: LOGITS_KERNEL})
    rule = DenseLogitsCPU()
    sch = rule.apply(func, LLVM, False)
    loops = sch.get_loops(sch.get_sblock("logits_rf" if positions == 1 else "logits_rf_update"))
    parallel = [lp for lp in loops if sch.get(lp).kind == ForKind.PARALLEL]
    tile = 1 if positions == 1 else rule.vocab_tile
    assert [int(sch.get(lp).extent) for lp in parallel] == [-(-vocab // tile)]
    assert loops.index(parallel[0]) == 0  # the positions inside
    rng = np.random.default_rng(5)
    n = positions or 13
    xs = rng.standard_normal((1, n, HIDDEN)).astype(np.float32)
    ws = rng.standard_normal((vocab, HIDDEN)).astype(np.float16)
    out = tvm.runtime.tensor(np.zeros((1, n, vocab), np.float32))
    tvm.compile(sch.mod, target=LLVM)(tvm.runtime.tensor(xs), tvm.runtime.tensor(ws), out)
    np.testing.assert_allclose(out.numpy()[0], xs[0] @ ws.astype(np.float32).T, rtol=1e-4, atol=1e-4)
