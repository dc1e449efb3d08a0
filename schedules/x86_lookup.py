"""The codebook lookup of 16 group steps as AVX-512 permutes (a tensor intrinsic for the CPU rules).

TVM's LLVM code generator turns a vector load with data-dependent indices into one scalar load and insert
per lane (and LLVM's gather is no faster on Zen 4): a quarter of a decode GEMV's time went to the
codebook lookups. `vpermi2ps` picks 16 floats out of 32 held in two registers by a 5-bit index each, so a
codebook of up to 32 entries is one instruction per 16 rows, and stacked matrices' codebooks (54, 81
entries, padded to 64, 96) one permute per 32 entries and a blend. The operator states this lookup as a
one-hot sum over the codebook (trit_tvm.operator, `WeightLayout.permute_steps`), which this intrinsic
replaces.
"""
from __future__ import annotations

from tvm import tirx
from tvm.s_tir import TensorIntrin
from tvm.script import tirx as T

LANES = 16  # one 512-bit register of float32
TABLE_WINDOW = 32  # entries one vpermi2ps chooses from


def permute_lookup(table, idx) -> tirx.PrimExpr:
    """Vector expression: table[idx[0:16]] for a table of a multiple of 32 entries (idx < its size)."""
    index = idx.vload([0], f"int32x{LANES}")
    result = None
    for start in range(0, int(table.shape[0]), TABLE_WINDOW):
        window = tirx.call_llvm_pure_intrin(
            f"float32x{LANES}", "llvm.x86.avx512.vpermi2var.ps.512", table.vload([start], f"float32x{LANES}"),
            index, table.vload([start + LANES], f"float32x{LANES}"))
        ge = index >= tirx.Broadcast(tirx.const(start, "int32"), LANES)
        result = window if result is None else tirx.Select(ge, window, result)
    return result


def permute_lookup_intrin(table_size: int, index_dtype: str = "int32") -> str:
    """Register (once) and name the intrinsic for a codebook of `table_size` entries (a multiple of 32):
    out[i] += Σ_j (idx[i] == j) · table[j] for 16 lanes i, the form the operator's trit_step block has.
    index_dtype: the block's loop variables' (Relax builds its kernels with int64 indices, so there the
    int32 index is compared after a cast)."""
    assert table_size % TABLE_WINDOW == 0, table_size
    name = f"trit_permute_lookup16_f32_{table_size}_{index_dtype}"
    if TensorIntrin.get(name, allow_missing=True) is not None:
        return name
    lanes, size = tirx.const(LANES, index_dtype), tirx.const(table_size, index_dtype)

    @T.prim_func(s_tir=True)
    def desc(idx: T.Buffer((lanes,), "int32", offset_factor=1, scope="local"),
             table: T.Buffer((size,), "float32", offset_factor=1),
             out: T.Buffer((lanes,), "float32", offset_factor=1, scope="local")) -> None:
        with T.sblock("root"):
            T.reads(idx[0:lanes], table[0:size])
            T.writes(out[0:lanes])
            for i, j in T.grid(lanes, size):
                with T.sblock("lookup"):
                    vi, vj = T.axis.remap("SR", [i, j])
                    T.reads(out[vi], idx[vi], table[vj])
                    T.writes(out[vi])
                    out[vi] = out[vi] + T.Select(idx[vi].astype(index_dtype) == vj, table[vj], T.float32(0))

    @T.prim_func(s_tir=True)
    def impl(idx: T.Buffer((lanes,), "int32", offset_factor=1, scope="local"),
             table: T.Buffer((size,), "float32", offset_factor=1),
             out: T.Buffer((lanes,), "float32", offset_factor=1, scope="local")) -> None:
        with T.sblock("root"):
            T.reads(idx[0:lanes], table[0:size])
            T.writes(out[0:lanes])
            out[T.ramp(T.int32(0), 1, LANES)] = out[T.ramp(T.int32(0), 1, LANES)] + permute_lookup(table, idx)

    TensorIntrin.register(name, desc, impl)
    return name


# registered up front too: trit-compile replays tuning records (which name them) before any rule runs;
# the model stacks at most 3 matrices (q/k/v), so its codebooks have up to 96 padded entries
for _windows in (1, 2, 3):
    for _dtype in ("int32", "int64"):
        permute_lookup_intrin(_windows * TABLE_WINDOW, _dtype)
