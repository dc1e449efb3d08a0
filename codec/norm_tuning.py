"""Norm tuning: after every matrix is quantized, fit the model's RMSNorm weights (kept in float, a few
thousand numbers per layer) so that the quantized model's next-token distributions match the source model's
on the calibration text.

GPTQ minimizes each matrix's own output error; what is left compounds through the layers, shifting the scale
of each layer's activations a little. The norms' gains are where a model sets those scales, so re-fitting them
end to end (Adam on the KL divergence from the source model's distributions, both models in transformers,
float32, this CPU) recovers part of the loss the quantization caused without touching the format: the tuned
norms are stored as the checkpoint's kept tensors. Measured on SmolLM2-135M (README, Quality): calibrated
d=3 1.029x → 1.012x the source model's perplexity on held-out text, mixed depth at 4.4 bpw 1.052x → 1.029x.
"""
from __future__ import annotations

import copy
from pathlib import Path

import numpy as np

LEARNING_RATE = 5e-4


def norm_names(names) -> list[str]:
    """The norm weights among a model's parameter names (input_layernorm, post_attention_layernorm, the final
    norm, per-head q/k norms)."""
    return [n for n in names if n.endswith("norm.weight")]


def tune_norms(hf_dir: Path, quantized: dict[str, np.ndarray], windows: list[list[int]], epochs: int,
               lr: float = LEARNING_RATE, progress=None) -> tuple[dict[str, np.ndarray], dict]:
    """The source model at hf_dir as teacher; a copy with `quantized` (parameter name -> dequantized float32
    weights) in place of its matrices as the student, whose norm weights alone are trained for `epochs` passes
    over `windows` (token ids, one window a step). Returns the tuned norm weights by name (float32) and what
    trit.json records: epochs, learning rate, windows, and the mean KL divergence (nats per token) of each
    pass."""
    import torch
    from transformers import AutoModelForCausalLM

    torch.manual_seed(0)
    teacher = AutoModelForCausalLM.from_pretrained(str(hf_dir), dtype=torch.float32).eval()
    student = copy.deepcopy(teacher)
    student.requires_grad_(False)
    with torch.no_grad():
        for name, w in quantized.items():
            student.get_parameter(name).copy_(torch.from_numpy(w))
    names = norm_names(n for n, _ in student.named_parameters())
    params = [student.get_parameter(n) for n in names]
    for p in params:
        p.requires_grad_(True)
    optimizer = torch.optim.Adam(params, lr=lr)
    kl_per_epoch = []
    for epoch in range(epochs):
        total = 0.0
        for i, window in enumerate(windows):
            ids = torch.tensor([window])
            with torch.no_grad():
                target = torch.log_softmax(teacher(ids).logits[0], -1)
            log_q = torch.log_softmax(student(ids).logits[0], -1)
            loss = (target.exp() * (target - log_q)).sum(-1).mean()
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
            total += loss.item()
            if progress:
                progress(epoch * len(windows) + i + 1, epochs * len(windows))
        kl_per_epoch.append(round(total / len(windows), 5))
    tuned = {n: p.detach().numpy().astype(np.float32) for n, p in zip(names, params)}
    return tuned, {"epochs": epochs, "lr": lr, "windows": len(windows), "kl": kl_per_epoch}
