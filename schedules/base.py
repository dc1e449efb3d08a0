"""What every trit rule needs: recognising the operator by its PrimFunc attribute."""
from __future__ import annotations

from tvm import tirx

TRIT_OP_ATTR = "trit.op"  # set by trit_tvm.operator.trit_op_attrs


def is_trit_decode_matmul(func) -> bool:
    return isinstance(func, tirx.PrimFunc) and func.attrs is not None and TRIT_OP_ATTR in func.attrs
