"""Command lines of the codec: trit-quantize, trit-dequantize, trit-inspect.

Each exits 0 on success, 2 with a one-line message on bad input (CodecError), 130 on Ctrl-C.
"""
from __future__ import annotations

import argparse
import json
import logging
import sys
import time
from pathlib import Path
from typing import Callable, Sequence

import numpy as np
from tqdm import tqdm

from .checkpoint import (DTYPE_NAMES, HEAD_DEPTH, load_trit_checkpoint, read_source, write_dequantized_checkpoint,
                         write_trit_checkpoint)
from .errors import CodecError
from .gguf_source import gguf_tensor_count, is_gguf
from .quantize import DEPTHS, MODES, relative_mse
from .row_blocks import columns_are_channels, mlp_of
from .safetensors_io import to_float32

log = logging.getLogger("trit")


def run_cli(main: Callable[[argparse.Namespace], int], parser: argparse.ArgumentParser,
            argv: Sequence[str] | None, errors: tuple[type[BaseException], ...] = (CodecError,)) -> int:
    """Parse, set up logging, run; turn expected errors into one line on stderr and exit code 2."""
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.DEBUG if getattr(args, "verbose", False) else logging.INFO,
                        format="%(message)s", stream=sys.stderr)
    try:
        return main(args)
    except errors as e:
        print(f"{parser.prog}: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"{parser.prog}: interrupted", file=sys.stderr)
        return 130


def _element_bar(total: int, desc: str) -> tuple[tqdm, Callable[[str, int], None]]:
    bar = tqdm(total=total, desc=desc, unit="w", unit_scale=True, file=sys.stderr, disable=None)

    def step(name: str, n: int) -> None:
        bar.set_postfix_str(name[-40:], refresh=False)
        bar.update(n)
    return bar, step


def _total_elements(src: Path) -> int:
    if is_gguf(src):
        return gguf_tensor_count(src)
    _, files = read_source(src)
    return sum(int(np.prod(t.shape)) for f in files for t in f.tensors.values())


def quantize_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="trit-quantize",
        description="Quantize a Hugging Face checkpoint to balanced-ternary trits and pack them densely, or "
                    "(--recover) recover the exact codes of an Entrit-style dequantized checkpoint.")
    p.add_argument("src", type=Path, help="Hugging Face checkpoint dir (config.json + *.safetensors) or a GGUF file "
                   "(F32/F16/BF16/Q8_0/Q4_0/Q4_1/Q4_K/Q6_K tensors, dequantized)")
    p.add_argument("out", type=Path, help="output trit checkpoint dir (created atomically)")
    p.add_argument("--depth", type=int, default=3, choices=DEPTHS, help="trits per weight (default 3: 27 levels)")
    p.add_argument("--mode", default="mse", choices=MODES,
                   help="mse: better codebook and per-group MSE choice (default); reference: the published rule")
    p.add_argument("--recover", action="store_true",
                   help="SRC is already trit-quantized (dequantized FP16/BF16): recover its codes bit-exactly")
    p.add_argument("--calibration", type=Path, metavar="FILE",
                   help="UTF-8 text to calibrate on: each matrix is quantized by GPTQ (then coordinate descent) to "
                        "minimize its output error on the model's own inputs for this text (keep it apart from "
                        "evaluation text)")
    p.add_argument("--samples", type=int, default=32, help="calibration windows of 512 tokens (default: 32)")
    p.add_argument("--bpw", type=float, help="mixed depth: a depth 1..4 per matrix by sensitivity, average packed "
                   "bits/weight at most this (1.9..6.7); uses --calibration when given")
    p.add_argument("--row-blocks", action="store_true",
                   help="with --bpw and --calibration: a depth per q/k/v head and per MLP channel instead of per "
                        "matrix (lower perplexity at the same bits); the MLP's channels are reordered by depth and "
                        "such matrices stored as row blocks (format v2)")
    p.add_argument("--tune-norms", type=int, nargs="?", const=2, default=0, metavar="PASSES",
                   help="with --calibration: after quantizing, fit the RMSNorm weights so that the model's outputs "
                        "match the source model's on the calibration text (PASSES over it, default 2; SmolLM2 on 2 "
                        "cores: ~4 s a window and pass); lowers perplexity, the format is unchanged")
    p.add_argument("--tensor-depth", action="append", default=[], metavar="PATTERN=D",
                   help="pin the depth of tensors matching a glob, e.g. '*.mlp.down_proj.weight=4' (repeatable)")
    p.add_argument("--quantize-head", action="store_true",
                   help=f"also store the output head as trits (depth {HEAD_DEPTH}, a third of its 16-bit bytes: faster "
                        "decoding of small models); off by default, the published layout keeps it in 16 bits")
    p.add_argument("--shard-size", type=float, default=2.0, metavar="GB", help="max shard size (default 2 GB)")
    p.add_argument("--force", action="store_true", help="replace OUT if it exists")
    p.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    return p


def _quantize(args: argparse.Namespace) -> int:
    bar, step = _element_bar(_total_elements(args.src), "recover" if args.recover else f"quantize d={args.depth}")
    t0 = time.perf_counter()
    with bar:
        manifest = write_trit_checkpoint(args.src, args.out, args.depth, args.mode, args.recover, args.force,
                                         int(args.shard_size * (1 << 30)), step, args.calibration, args.samples,
                                         args.bpw, tuple(args.tensor_depth), args.quantize_head, args.tune_norms,
                                         args.row_blocks)
    n_q = sum(int(np.prod(q["shape"])) for q in manifest["quantized"].values())
    size = sum(s["bytes"] for s in manifest["shards"].values())
    log.info("wrote %s: %d quantized matrices (%.1f M weights, depth %s, mode %s), %d kept tensors, "
             "%.1f MB in %d shard(s), %.1f s", args.out, len(manifest["quantized"]), n_q / 1e6, manifest["depth"],
             manifest["codec_mode"], len(manifest["kept"]), size / 1e6, len(manifest["shards"]),
             time.perf_counter() - t0)
    if args.depth == 1 and args.calibration is None and args.bpw is None and not args.recover:
        log.warning("trit-quantize: data-free depth 1 keeps little of a model (SmolLM2-135M: perplexity 15.7 -> "
                    "53461; calibrated, 85); give --calibration FILE, or a higher --depth")
    return 0


def quantize_main(argv: Sequence[str] | None = None) -> int:
    return run_cli(_quantize, quantize_parser(), argv)


def dequantize_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="trit-dequantize",
                                description="Expand a trit checkpoint back to a Hugging Face safetensors checkpoint.")
    p.add_argument("trit_dir", type=Path, help="trit checkpoint dir (made by trit-quantize)")
    p.add_argument("out", type=Path, help="output Hugging Face checkpoint dir (created atomically)")
    p.add_argument("--dtype", choices=list(DTYPE_NAMES), default=None,
                   help="dtype of float tensors (default: each tensor's source dtype)")
    p.add_argument("--force", action="store_true", help="replace OUT if it exists")
    p.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    return p


def _dequantize(args: argparse.Namespace) -> int:
    ckpt = load_trit_checkpoint(args.trit_dir)
    total = sum(int(np.prod(e["shape"])) for sec in ("quantized", "kept") for e in ckpt.manifest[sec].values())
    bar, step = _element_bar(total, "dequantize")
    with bar:
        write_dequantized_checkpoint(ckpt, args.out, args.dtype, args.force, step)  # checksums verified once
    log.info("wrote %s", args.out)
    return 0


def dequantize_main(argv: Sequence[str] | None = None) -> int:
    return run_cli(_dequantize, dequantize_parser(), argv)


def inspect_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="trit-inspect",
                                description="Show per-tensor depth, shape, bits/weight (and relative MSE "
                                            "against the source checkpoint with --source).")
    p.add_argument("trit_dir", type=Path, help="trit checkpoint dir")
    p.add_argument("--source", type=Path, help="the Hugging Face checkpoint it was made from")
    p.add_argument("--json", action="store_true", help="print one JSON object instead of a table")
    return p


def _inspect(args: argparse.Namespace) -> int:
    ckpt = load_trit_checkpoint(args.trit_dir)
    sources = {}
    if args.source:
        _, files = read_source(args.source)
        sources = {n: f for f in files for n in f.keys()}
    rows, orders = [], ckpt.manifest.get("channel_orders", {})
    for name, e in ckpt.manifest["quantized"].items():
        row = {"tensor": name, "shape": e["shape"], "depth": e["depth"], "bits_per_weight": e["bits_per_weight"]}
        if name in sources:  # a row block has no source tensor of its own; down_proj's columns may be reordered
            f = sources[name]
            w = to_float32(f.read(name), f.tensors[name].dtype)
            order = orders.get(mlp_of(name)) if columns_are_channels(name) else None
            if order is not None and len(order) != w.shape[1]:
                raise CodecError(f"{ckpt.path}: channel_orders of '{name}' has {len(order)} channels, the source "
                                 f"matrix {w.shape[1]}")
            row["relative_mse"] = relative_mse(w if order is None else w[:, order], ckpt.matrix(name).dequantize())
        rows.append(row)
    n = sum(int(np.prod(r["shape"])) for r in rows)
    packed = ckpt.packed_bytes()
    summary = {"quantized_tensors": len(rows), "quantized_weights": n, "packed_bytes": packed,
               "bits_per_weight": packed * 8 / n, "codec_mode": ckpt.manifest["codec_mode"],
               "format_version": ckpt.manifest["format_version"], "kept_tensors": len(ckpt.kept_names),
               **({"calibration": ckpt.manifest["calibration"]} if "calibration" in ckpt.manifest else {})}
    if args.json:
        print(json.dumps({"summary": summary, "tensors": rows}))
        return 0
    print(f"{'tensor':<52} {'shape':>14} {'d':>2} {'bits/w':>7}" + (f" {'rel.MSE':>9}" if sources else ""))
    for r in rows:
        line = f"{r['tensor']:<52} {'x'.join(map(str, r['shape'])):>14} {r['depth']:>2} {r['bits_per_weight']:>7.3f}"
        if "relative_mse" in r:
            line += f" {r['relative_mse']:>9.2e}"
        print(line)
    print(f"{len(rows)} quantized tensors, {n / 1e6:.2f} M weights, {packed / 1e6:.2f} MB packed, "
          f"{summary['bits_per_weight']:.3f} bits/weight; {len(ckpt.kept_names)} kept tensors; "
          f"mode {summary['codec_mode']}, format v{summary['format_version']}")
    calibration = summary.get("calibration")
    if calibration:
        tuned = calibration.get("norm_tuning")
        print(f"calibrated on {calibration.get('file')} ({calibration.get('samples')} windows, "
              f"{calibration.get('tokens')} tokens)" + (f"; norms tuned: {tuned.get('epochs')} passes, KL from the "
                                                        f"source per pass {tuned.get('kl')}" if tuned else ""))
    return 0


def inspect_main(argv: Sequence[str] | None = None) -> int:
    return run_cli(_inspect, inspect_parser(), argv)
