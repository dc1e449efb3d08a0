"""Calibration statistics: for every linear layer of a checkpoint, H = Σ xᵀx over its inputs x when the
source model (transformers, float32, this CPU) reads a calibration text. GPTQ (codec.gptq) and the mixed-depth
allocation (codec.mixed) weigh quantization errors by it; mixed depth also weighs each output of a layer by
how much the loss responds to it.
"""
from __future__ import annotations

import hashlib
import logging
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from .errors import CodecError
from .gptq import DAMP, DESCENT_ROUNDS

log = logging.getLogger("trit")
SEQUENCE = 512  # tokens per calibration sample


@dataclass
class Calibration:
    """Per checkpoint weight name ("model.layers.0.mlp.up_proj.weight"): Σ xᵀx of that layer's inputs, and
    (when asked for) Σ (∂loss/∂y)² per output y of the layer. With both, a weight error ΔW raises the loss by
    about Σₒ gₒ (ΔW H ΔWᵀ)ₒₒ (the Fisher information taken as a Kronecker product of the two, K-FAC)."""
    hessians: dict[str, np.ndarray]
    settings: dict  # what trit.json records: file, sha256, samples, tokens, sequence
    output_grad_sq: dict[str, np.ndarray] | None = None
    windows: list[list[int]] | None = None  # the token ids it ran on (norm tuning runs on the same)


def read_text(path: Path) -> str:
    """A UTF-8 text file, or a one-line error naming it (missing, empty, not UTF-8)."""
    path = Path(path)
    try:
        text = path.read_bytes().decode("utf-8")
    except OSError as e:
        raise CodecError(f"{path}: cannot read ({e.strerror})") from None
    except UnicodeDecodeError as e:
        raise CodecError(f"{path}: not UTF-8 text (byte {e.start})") from None
    if not text.strip():
        raise CodecError(f"{path}: the text is empty")
    return text


def collect_hessians(hf_dir: Path, text_file: Path, samples: int = 32, progress=None,
                     output_gradients: bool = False) -> Calibration:
    """Run the checkpoint on up to `samples` windows of SEQUENCE tokens of the text; hooks on every
    nn.Linear accumulate its inputs' xᵀx (in float32 within a window, float64 across windows). With
    output_gradients, each window's language-model loss is also back-propagated and the squared gradients of every
    linear's outputs summed (what mixed depth ranks matrices by)."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    text = read_text(text_file)
    if samples < 1:
        raise CodecError(f"--samples must be at least 1, got {samples}")
    model = AutoModelForCausalLM.from_pretrained(str(hf_dir), dtype=torch.float32).eval()
    bad = next((n for n, p in model.named_parameters() if not torch.isfinite(p).all()), None)
    if bad is not None:  # before the text runs through it, which would only find NaN layers later
        raise CodecError(f"tensor '{bad}': contains NaN or Inf")
    ids = AutoTokenizer.from_pretrained(str(hf_dir)).encode(text)
    if len(ids) < 2:
        raise CodecError(f"{text_file}: too short to calibrate on ({len(ids)} tokens)")
    windows = [ids[s:s + SEQUENCE] for s in range(0, max(len(ids) - 1, 1), SEQUENCE)][:samples]
    hessians: dict[str, torch.Tensor] = {}
    inputs_seen: list[tuple[str, torch.Tensor]] = []  # this window's (layer, input); xᵀx taken after the window

    grads: dict[str, torch.Tensor] | None = {} if output_gradients else None

    def hook(name: str):
        def record(_module, inputs, output):
            inputs_seen.append((name, inputs[0]))
            if grads is not None:
                output.register_hook(lambda g: add_grad(name, g.detach().reshape(-1, g.shape[-1])
                                                        .to(torch.float64).square().sum(0)))
        return record

    def add_grad(name: str, value):
        grads[name] = value if name not in grads else grads[name] + value

    def add_products():
        """Each recorded layer's xᵀx, once per input tensor (q/k/v, gate/up read the same one): in float32 over the
        window, summed in float64. Taken after the window's passes, not in the hooks: 1.2 s a window faster."""
        products: dict[int, torch.Tensor] = {}
        for name, x_in in inputs_seen:
            if id(x_in) not in products:  # the tensors are held in inputs_seen, so ids stay their own
                x = x_in.detach().reshape(-1, x_in.shape[-1])
                products[id(x_in)] = x.T @ x
            if name in hessians:
                hessians[name].add_(products[id(x_in)])
            else:
                hessians[name] = products[id(x_in)].to(torch.float64)
        inputs_seen.clear()

    handles = [m.register_forward_hook(hook(f"{n}.weight")) for n, m in model.named_modules()
               if isinstance(m, torch.nn.Linear) and not n.endswith("lm_head")]
    if grads is not None:  # gradients flow from the embeddings on; no weight needs its own
        model.requires_grad_(False)
        handles.append(model.get_input_embeddings().register_forward_hook(lambda _m, _i, out: out.requires_grad_()))
    try:
        for i, window_ids in enumerate(windows):
            window = torch.tensor([window_ids])
            if grads is None:
                with torch.no_grad():
                    model(window)
            else:
                model(window, labels=window).loss.backward()
            with torch.no_grad():
                add_products()
            if progress:
                progress(i + 1, len(windows))
    finally:
        inputs_seen.clear()
        for h in handles:
            h.remove()
    bad = next((name for name, h in hessians.items() if not torch.isfinite(h).all()), None)
    if bad is not None:
        raise CodecError(f"{text_file}: the inputs of '{bad}' overflow to NaN or Inf when the source model reads "
                         "this text")
    tokens = sum(len(w) for w in windows)
    digest = hashlib.sha256(Path(text_file).read_bytes()).hexdigest()
    settings = {"file": Path(text_file).name, "sha256": digest, "samples": len(windows), "tokens": tokens,
                "sequence": SEQUENCE, "method": "gptq", "act_order": True, "static_groups": True, "damp": DAMP,
                "descent_rounds": DESCENT_ROUNDS}
    return Calibration({k: v.numpy() for k, v in hessians.items()}, settings,
                       {k: v.numpy() for k, v in grads.items()} if grads is not None else None, windows)
