"""The decode GEMV's weight prefetches (schedules/prefetch.py): inserted once per block iteration into the
hand-scheduled and the tunable GEMV, on odd shapes; the results stay the reference's."""
import numpy as np
import pytest
import tvm
from tvm import s_tir

from codec import pack_matrix, quantize_matrix
from schedules import TritGEMVCPU
from schedules.prefetch import LINE_BYTES, prefetch_trit_weights
from trit_tvm.operator import WeightLayout, reference_decode_matmul, trit_decode_matmul_func
from trit_tvm.pipeline import schedule_pass

LLVM = tvm.target.Target({"kind": "llvm"})


def _prefetch_count(func: tvm.tirx.PrimFunc, buffer: str = "codes") -> int:
    return func.script().count(f'"llvm.prefetch", T.address_of({buffer}[')


@pytest.mark.parametrize("depth", [1, 3, 4])
@pytest.mark.parametrize("n_out,n_in,rows", [(37, 16 * 21, 32), (131, 16 * 5, 32), (9, 16 * 7, 8)])
def test_gemv_prefetches_its_weights_and_matches_reference(depth, n_out, n_in, rows):
    layout = WeightLayout(rows)
    mod = tvm.IRModule({"main": trit_decode_matmul_func(n_out, n_in, depth, layout, rows=1)})
    with LLVM:
        func = schedule_pass(LLVM)(mod)["main"]
    # one prefetch per cache line of a block's codes in a row panel (16 words of `rows` lanes), and its scales
    assert _prefetch_count(func) == max(1, 16 * rows * 2 // LINE_BYTES) and _prefetch_count(func, "scales") >= 1
    with LLVM:  # what bench_gemv --cold compares against
        assert _prefetch_count(schedule_pass(LLVM, prefetch=False)(mod)["main"]) == 0
    rng = np.random.default_rng(depth + n_out)
    packed = pack_matrix(quantize_matrix(rng.standard_normal((n_out, n_in)).astype(np.float32), depth))
    x = rng.standard_normal((1, n_in)).astype(np.float32)
    ref = reference_decode_matmul(x, packed["trit_codes"], packed["trit_scales"], packed["trit_codebook"])
    args = [x, layout.repack_codes(packed["trit_codes"], n_in),
            layout.repack_scales(packed["trit_scales"], n_in, depth),
            layout.repack_codebook(packed["trit_codebook"])]
    out = tvm.runtime.tensor(np.zeros((1, n_out), np.float32), tvm.cpu())
    tvm.compile(tvm.IRModule({"main": func}), target=LLVM)(*[tvm.runtime.tensor(a, tvm.cpu()) for a in args], out)
    np.testing.assert_allclose(out.numpy(), ref, rtol=1e-4, atol=1e-5 * np.abs(ref).max())


def test_tunable_gemv_gets_them_too_and_gemm_does_not():
    """Kernels scheduled from tuning records (panels split for the parallel tasks) get the prefetches; the
    prefill GEMM (weights reused across rows of x) is left alone."""
    layout = WeightLayout(32)
    func = trit_decode_matmul_func(100, 16 * 9, 3, layout, rows=1)
    tuned = TritGEMVCPU().schedule(s_tir.Schedule(func), tunable=True).mod
    script = prefetch_trit_weights(tuned)["main"].script()
    assert _prefetch_count(prefetch_trit_weights(tuned)["main"]) == 16
    # inside the loop over weight blocks, not above it in the panel loop the tuning split off
    assert script.index("llvm.prefetch") > script.index("for kb in")
    gemm = tvm.IRModule({"main": trit_decode_matmul_func(100, 16 * 9, 3, layout)})
    with LLVM:
        assert _prefetch_count(schedule_pass(LLVM)(gemm)["main"]) == 0


def test_dense_output_head_prefetches_rows_ahead():
    """The 16-bit output head (DenseLogitsCPU): one prefetch per cache line of a vocabulary row ahead, same logits."""
    from tvm import te

    from schedules.base import KERNEL_ATTR, LOGITS_KERNEL
    from trit_tvm.models.base import logits_nt
    vocab, hidden = 301, 96
    x, w = te.placeholder((1, 1, hidden), "float32", "x"), te.placeholder((vocab, hidden), "float16", "w")
    func = te.create_prim_func([x, w, logits_nt(x, w)]).with_attr({KERNEL_ATTR: LOGITS_KERNEL})
    with LLVM:
        mod = schedule_pass(LLVM)(tvm.IRModule({"main": func}))
    assert _prefetch_count(mod["main"], "w") == hidden * 2 // LINE_BYTES
    rng = np.random.default_rng(0)
    xs = rng.standard_normal((1, 1, hidden)).astype(np.float32)
    ws = rng.standard_normal((vocab, hidden)).astype(np.float16)
    out = tvm.runtime.tensor(np.zeros((1, 1, vocab), np.float32), tvm.cpu())
    tvm.compile(mod, target=LLVM)(tvm.runtime.tensor(xs, tvm.cpu()), tvm.runtime.tensor(ws, tvm.cpu()), out)
    np.testing.assert_allclose(out.numpy()[0, 0], ws.astype(np.float64) @ xs[0, 0], rtol=1e-4, atol=1e-4)
