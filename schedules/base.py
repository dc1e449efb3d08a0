"""What every trit rule needs: recognising the operator by its PrimFunc attributes, finding its blocks."""
from __future__ import annotations

from tvm import s_tir, tirx

TRIT_OP_ATTR = "trit.op"  # set by trit_tvm.operator.trit_op_attrs
LAYOUT_ROWS_ATTR = "trit.layout_rows"
PARTS_ATTR = "trit.parts"  # row counts of the matrices stacked into the operator (one entry when not stacked)
INT8_ACTIVATIONS_ATTR = "trit.int8_activations"  # 1: x is quantized per group of 16 (the operator's int8 form)
DOT_BITS_ATTR = "trit.dot_bits"  # 2, 5 or 8: the codes are in a dot-order layout (codec.format.dot_order_codes)
FACTORED_STEPS_ATTR = "trit.factored_steps"  # 1: the codebook parameter ends in factor tables (codebook_factors)
KERNEL_ATTR = "trit.kernel"  # other kernels the model emits with a rule of their own
LOGITS_KERNEL = "logits_nt"  # rows interleaved in the weight layout (0: checkpoint planes)
DECODE_SIMD16 = "simd16"  # CPUs: digits by multiply-and-shift in 16-bit SIMD lanes
DECODE_INT32 = "int32"  # GPUs: the same multiply-and-shift digits in 32-bit integers
DECODE_TABLE32 = "table32"  # GPUs: 32-bit integers, a byte's 5 digits from a 256-entry table (shared memory)
ACT_MAX = 127  # int8 activations: x / scale rounded into [-127, 127], scale = max |x| of its group of 16 / 127
ACT_OFFSET = 128  # an int8 level + this: an unsigned byte (the signed-times-unsigned multiplies of x86)
PREFILL_ROW_TILE = 8  # CPU prefill GEMM: rows of x per inner loop (the operator pads x's rows to a multiple)
BLOCK_NAMES = ("trit_digit_table", "trit_x_peak", "trit_x_padded", "trit_decode", "trit_xsum", "trit_group_dot",
               "trit_step_index", "trit_step", "trit_matmul", "trit_decode_tail", "trit_matmul_tail", "trit_out")


def is_trit_decode_matmul(func) -> bool:
    return isinstance(func, tirx.PrimFunc) and func.attrs is not None and TRIT_OP_ATTR in func.attrs


def dot_bits(func: tirx.PrimFunc) -> int:
    """Bits per weight of the kernel's dot-order codes, 0 for the words layout."""
    return int(func.attrs.get(DOT_BITS_ATTR, 0))


def layout_rows(func: tirx.PrimFunc) -> int:
    return int(func.attrs.get(LAYOUT_ROWS_ATTR, 0))


def row_count(func: tirx.PrimFunc) -> int | None:
    """Rows of x (product of its leading dims) when static, else None (prefill: symbolic)."""
    sch = s_tir.Schedule(func)
    out = sch.get(sch.get_sblock("trit_out"))
    total = 1
    for iv in out.iter_vars[:-1]:
        if not isinstance(iv.dom.extent, tirx.IntImm):
            return None
        total *= int(iv.dom.extent)
    return total


def kernel_key(func: tirx.PrimFunc) -> str:
    """A trit kernel's identity for the tuning choices kept outside MetaSchedule (trit_tvm/variant_tuning.py):
    decode (one row of x) or prefill, depth, in->out, the stacked matrices' rows, the activations' form."""
    rows = "gemv" if row_count(func) == 1 else "gemm"
    parts = "+".join(str(int(p)) for p in func.attrs.get(PARTS_ATTR, [func.attrs["trit.n_out"]]))
    form = "int8" if int(func.attrs.get(INT8_ACTIVATIONS_ATTR, 0)) else "float"
    form += {0: "", 2: " 2bit", 5: " 5bit", 8: " bytes"}[dot_bits(func)]
    return f"{rows} d{int(func.attrs['trit.depth'])} {int(func.attrs['trit.n_in'])}->{parts} {form}"


def trit_blocks(sch: s_tir.Schedule) -> dict[str, s_tir.schedule.SBlockRV]:
    """The operator's blocks that exist in this instance (the tail ones only when K % 80 != 0)."""
    found = {}
    for name in BLOCK_NAMES:
        try:
            found[name] = sch.get_sblock(name)
        except (ValueError, RuntimeError, s_tir.ScheduleError):
            continue
    return found


def static_extent(sch: s_tir.Schedule, loop) -> int | None:
    """A loop's extent when it is a constant."""
    extent = sch.get(loop).extent
    return int(extent) if isinstance(extent, tirx.IntImm) else None


def vectorize_lanes(sch: s_tir.Schedule, loop, lanes: int = 16) -> None:
    """Split `lanes` iterations off a loop and vectorize them, when its extent is a known multiple
    of `lanes` (16 float32 lanes: one AVX-512 register; LLVM splits them for narrower SIMD)."""
    extent = static_extent(sch, loop)
    if extent is not None and extent % lanes == 0:
        sch.vectorize(sch.split(loop, factors=[None, lanes])[1])


def split_loops(sch: s_tir.Schedule, block) -> tuple[list, list]:
    """A block's loops as (spatial, reduction) lists."""
    pairs = list(zip(sch.get_loops(block), sch.get(block).iter_vars))
    return ([lp for lp, iv in pairs if iv.iter_type == tirx.IterVar.DataPar],
            [lp for lp, iv in pairs if iv.iter_type == tirx.IterVar.CommReduce])

