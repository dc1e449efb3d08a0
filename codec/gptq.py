"""Calibrated quantization of one matrix: GPTQ (Frantar et al. 2022) onto the trit grid.

The layer's output error on calibration inputs X is ||(W − Ŵ) Xᵀ||², a quadratic form in H = XᵀX. Columns
are quantized one at a time and each one's rounding error is pushed onto the columns not yet quantized,
weighted by the inverse Hessian, so later columns compensate for earlier ones. The per-matrix codebook is
the data-free (mse) one; each group's step is chosen when the quantizer reaches the group, on the weights
as the error feedback has left them (GPTQ's "static groups off"). The output is an ordinary trit matrix.
"""
from __future__ import annotations

import numpy as np

from .errors import CodecError
from .quantize import GROUP_SIZE, QuantizedMatrix, best_amplitude_steps, choose_entries, qmax_of, quantize_matrix

BLOCK = 128  # columns updated lazily together (GPTQ's block): the rest of the matrix once per block
DAMP = 0.01  # added to H's diagonal, as a fraction of its mean: keeps the inverse well conditioned


def inverse_hessian_factor(h: np.ndarray, damp: float = DAMP) -> np.ndarray:
    """Upper Cholesky factor of H⁻¹ (GPTQ's formulation: row i holds the feedback of column i)."""
    h = np.array(h, np.float64)
    dead = np.diag(h) == 0
    h[dead, dead] = 1.0
    h[np.diag_indices_from(h)] += damp * float(np.mean(np.diag(h)))
    try:
        inv = np.linalg.inv(np.linalg.cholesky(h))
        return np.linalg.cholesky(inv.T @ inv).T
    except np.linalg.LinAlgError:
        raise CodecError("calibration Hessian is not positive definite (too few calibration tokens?)") from None


def gptq_matrix(w: np.ndarray, h: np.ndarray, depth: int, name: str = "weight") -> QuantizedMatrix:
    """Quantize w [out, in] at `depth` minimizing the output error on inputs whose Xᵀ X is h [in, in]."""
    w = np.asarray(w, np.float64)
    n_out, n_in = w.shape
    if h.shape != (n_in, n_in):
        raise CodecError(f"tensor '{name}': calibration Hessian is {list(h.shape)}, expected [{n_in}, {n_in}]")
    qmax = qmax_of(depth)
    codebook = quantize_matrix(w.astype(np.float32), depth, "mse", name).codebook
    u = inverse_hessian_factor(h)
    w = w.copy()
    w[:, np.diag(h) == 0] = 0.0  # inputs that are always zero: their weights cannot matter
    codes = np.zeros((n_out, n_in), np.int8)
    scale_idx = np.zeros((n_out, n_in // GROUP_SIZE), np.uint8)
    steps = np.zeros(n_out)
    for b0 in range(0, n_in, BLOCK):
        b1 = min(b0 + BLOCK, n_in)
        wb, ub = w[:, b0:b1].copy(), u[b0:b1, b0:b1]
        err = np.zeros_like(wb)
        for i in range(b1 - b0):
            col = b0 + i
            if col % GROUP_SIZE == 0:  # the group's step, on the weights as the feedback left them
                group = wb[:, i:i + GROUP_SIZE].astype(np.float32)
                best = best_amplitude_steps(group, qmax)
                idx = choose_entries(group, best, codebook, qmax, "mse")
                scale_idx[:, col // GROUP_SIZE], steps = idx, codebook[idx].astype(np.float64)
            x = wb[:, i]
            q = np.clip(np.rint(np.divide(x, steps, out=np.zeros_like(x), where=steps > 0)), -qmax, qmax)
            codes[:, col] = q
            e = (x - q * steps) / ub[i, i]
            wb[:, i:] -= np.outer(e, ub[i, i:])
            err[:, i] = e
        w[:, b1:] -= err @ u[b0:b1, b1:]
    return QuantizedMatrix(codes, scale_idx, codebook, depth)


def output_error(w: np.ndarray, qm: QuantizedMatrix, h: np.ndarray) -> float:
    """tr(ΔW H ΔWᵀ): the squared output error of the quantized layer on the calibration inputs."""
    d = np.asarray(w, np.float64) - qm.dequantize(np.float64)
    return float(np.sum((d @ np.asarray(h, np.float64)) * d))
