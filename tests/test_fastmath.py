"""trit_tvm.fastmath: exp2 / exp as arithmetic, within float32 rounding of numpy's, and vectorized (no libm
call left in the kernel)."""
import numpy as np
import tvm
from tvm import s_tir, te

from trit_tvm import fastmath


def _kernel(fn):
    x = te.placeholder((4096,), "float32", "x")
    sch = s_tir.Schedule(te.create_prim_func([x, te.compute((4096,), lambda i: fn(x[i]), name="y")]))
    (loop,) = sch.get_loops(sch.get_sblock("y"))
    sch.vectorize(sch.split(loop, factors=[None, 16])[1])
    return tvm.compile(sch.mod, target="llvm")


def _run(lib, xs):
    out = tvm.runtime.tensor(np.zeros_like(xs))
    lib(tvm.runtime.tensor(xs), out)
    return out.numpy().astype(np.float64)


def test_exp2_and_exp_match_numpy_to_float32_rounding():
    rng = np.random.default_rng(0)
    xs = np.concatenate([np.linspace(-126, 127, 3996), rng.uniform(-4, 4, 100)]).astype(np.float32)
    lib = _kernel(fastmath.exp2)
    assert np.max(np.abs(_run(lib, xs) / np.exp2(xs.astype(np.float64)) - 1)) < 2e-7
    assert "exp2f" not in lib.mod.inspect_source("asm")
    xs = np.concatenate([np.linspace(-87, 88, 3996), rng.uniform(-4, 4, 100)]).astype(np.float32)
    # exp rounds x·log2(e) to float32 first: its relative error grows by ~|x|·6e-8
    err = np.abs(_run(_kernel(fastmath.exp), xs) / np.exp(xs.astype(np.float64)) - 1)
    assert np.all(err < 2e-7 + 1e-7 * np.abs(xs))


def test_exp2_saturates_instead_of_overflowing():
    out = _run(_kernel(fastmath.exp2), np.array([-1e4, -200, 200, 1e4] * 1024, np.float32))
    assert np.all(np.isfinite(out)) and out[0] < 1.2e-38 and out[2] > 1e38
