"""trit-compile and trit-run."""
from __future__ import annotations

import argparse
import contextlib
import json
import logging
import sys
import tempfile
import time
from pathlib import Path
from typing import Sequence

from codec.cli import run_cli
from codec.errors import CodecError, read_json
from codec.quantize import DEPTHS, MODES

log = logging.getLogger("trit")


def compile_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="trit-compile",
        description="Compile a trit checkpoint (or a Hugging Face Qwen2 checkpoint, quantized on the fly) into "
                    "a deployable artifact dir. Without MODEL, builds the embedded demo model.")
    p.add_argument("model", nargs="?", type=Path, help="trit checkpoint dir or Hugging Face checkpoint dir")
    p.add_argument("--target", default="llvm",
                   help="llvm (this CPU), cuda, aarch64, a TVM tag, or a dict such as "
                        "'{\"kind\":\"cuda\",\"arch\":\"sm_90\"}' (default: llvm)")
    p.add_argument("-o", "--output", type=Path, help="artifact dir (default: ./<model name>-<target kind>)")
    p.add_argument("--depth", type=int, default=3, choices=DEPTHS, help="depth when quantizing an HF checkpoint")
    p.add_argument("--mode", default="mse", choices=MODES, help="codec mode when quantizing an HF checkpoint")
    p.add_argument("--force", action="store_true", help="replace the output dir if it exists")
    p.add_argument("--tuning-logs", type=Path, default=None,
                   help="root of tuning records (default: the repository's tuning_logs/); records under "
                        "<root>/<target key>/ schedule the kernels they match, hand rules the rest")
    p.add_argument("--no-tuning-logs", action="store_true", help="hand rules only")
    p.add_argument("-v", "--verbose", action="store_true")
    return p


def _compile(args: argparse.Namespace) -> int:
    from .compile import compile_model
    from .demo import DEMO_SPEC, build_tiny_qwen2
    from .targets import parse_target
    from .tuning import DEFAULT_LOGS

    target = parse_target(args.target)
    t0 = time.perf_counter()
    steps = iter(range(1, 100))

    def stage(msg: str) -> None:
        log.info("[%d] %s (%.1f s)", next(steps), msg, time.perf_counter() - t0)

    with tempfile.TemporaryDirectory(prefix="trit-demo-") as tmp:
        model = args.model
        if model is None:
            stage("no MODEL given: building the embedded demo model (a seeded 2-layer Qwen2, "
                  f"hidden {DEMO_SPEC.hidden}, with its own tokenizer)")
            model = build_tiny_qwen2(Path(tmp) / "trit-demo", DEMO_SPEC)
        out = args.output or Path(f"{Path(model).name}-{target.kind.name}")
        logs = None if args.no_tuning_logs else (args.tuning_logs or DEFAULT_LOGS)
        manifest = compile_model(model, target, out, args.depth, args.mode, args.force, stage, logs)
    log.info("wrote %s: %s, %d trit kernels (%d from tuning records), weights resident %.2f MB packed trits + "
             "%.2f MB kept (packed checkpoint %.2f MB), %.1f s", out, target.kind.name, manifest["trit_kernels"],
             len(manifest["tuned_kernels"]),
             manifest["resident_trit_bytes"] / 1e6, manifest["resident_kept_bytes"] / 1e6,
             manifest["packed_checkpoint_bytes"] / 1e6, time.perf_counter() - t0)
    return 0


def compile_main(argv: Sequence[str] | None = None) -> int:
    return run_cli(_compile, compile_parser(), argv)


def run_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="trit-run", description="Generate text with a compiled trit artifact.")
    p.add_argument("artifact", type=Path)
    src = p.add_mutually_exclusive_group(required=True)
    src.add_argument("--prompt", help="prompt text (needs the artifact's tokenizer)")
    src.add_argument("--prompt-ids", help="comma-separated token ids, e.g. 1,2,3")
    p.add_argument("--max-new-tokens", type=int, default=32)
    p.add_argument("--temperature", type=float, default=0.0, help="0 = greedy (default)")
    p.add_argument("--top-p", type=float, default=1.0)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--json", action="store_true", help="print one JSON object")
    p.add_argument("--rpc", metavar="HOST:PORT", help="run on a device's TVM RPC server (python -m "
                   "tvm.exec.rpc_server there): the library is uploaded and loaded there")
    p.add_argument("--rpc-timeout", type=float, default=60.0, help="seconds to wait for the server (default 60)")
    p.add_argument("-v", "--verbose", action="store_true")
    return p


def _parse_ids(text: str) -> list[int]:
    try:
        return [int(t) for t in text.replace(" ", "").split(",") if t != ""]
    except ValueError:
        raise CodecError(f"--prompt-ids must be comma-separated integers, got {text!r}") from None


def _load_tokenizer(artifact: Path):
    if not (artifact / "tokenizer.json").exists() and not (artifact / "tokenizer_config.json").exists():
        raise CodecError(f"{artifact}: has no tokenizer files; use --prompt-ids")
    from transformers import AutoTokenizer
    return AutoTokenizer.from_pretrained(str(artifact))


def _run(args: argparse.Namespace) -> int:
    from .runtime import TritModel

    if args.max_new_tokens < 1:
        raise CodecError("--max-new-tokens must be at least 1")
    tokenizer = None
    if args.prompt is not None:
        if args.prompt == "":
            raise CodecError("the prompt is empty: give at least one token")
        tokenizer = _load_tokenizer(args.artifact)
        ids = tokenizer.encode(args.prompt, add_special_tokens=False)
    else:
        ids = _parse_ids(args.prompt_ids)
    runtime = None
    if args.rpc:
        from .remote import RemoteRuntime
        runtime = RemoteRuntime(args.rpc, args.rpc_timeout)
    stop = () if tokenizer is None or tokenizer.eos_token_id is None else (tokenizer.eos_token_id,)
    with runtime.errors() if runtime is not None else contextlib.nullcontext():
        model = TritModel(args.artifact, runtime=runtime)
        gen = model.generate(ids, args.max_new_tokens, args.temperature, args.top_p, args.seed, stop)
    where = model.manifest["device"] + (f" at {runtime.description}" if runtime is not None else "")
    text = tokenizer.decode(gen.tokens) if tokenizer is not None else None
    if args.json:
        out = {"tokens": gen.tokens, "prompt_tokens": gen.prompt_tokens, "prefill_tok_s": gen.prefill_tok_s,
               "decode_tok_s": gen.decode_tok_s, "device": where}
        if text is not None:
            out["text"] = text
        print(json.dumps(out))
    else:
        print(text if text is not None else ",".join(map(str, gen.tokens)))
        print(f"prefill {gen.prompt_tokens} tokens: {gen.prefill_tok_s:.1f} tok/s; decode {gen.decode_steps} "
              f"tokens: {gen.decode_tok_s:.1f} tok/s ({where})", file=sys.stderr)
    return 0


def run_main(argv: Sequence[str] | None = None) -> int:
    return run_cli(_run, run_parser(), argv)


def tune_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="trit-tune",
        description="Tune the decode (one-row) trit kernels of a model with MetaSchedule and write the records "
                    "to TUNING_LOGS/<target key>/, where trit-compile finds them.")
    src = p.add_mutually_exclusive_group(required=True)
    src.add_argument("model", nargs="?", type=Path, help="trit or Hugging Face checkpoint dir (its config is used)")
    src.add_argument("--config", help="a Qwen2.5 size (0.5B, 1.5B, 3B, 7B) or a config.json: tune from shapes alone")
    p.add_argument("--target", default="llvm")
    p.add_argument("--depth", type=int, default=3, choices=DEPTHS, help="trit depth of every matrix (with --config)")
    p.add_argument("--trials", type=int, default=16, help="measured candidates per kernel (default 16)")
    p.add_argument("--tuning-logs", type=Path, default=None, help="records root (default: the repository's tuning_logs/)")
    p.add_argument("--rpc-tracker", help="HOST:PORT of a TVM RPC tracker: measure on its servers")
    p.add_argument("--rpc-key", help="device key the servers registered with the tracker")
    p.add_argument("-v", "--verbose", action="store_true")
    return p


def resolve_model_config(args: argparse.Namespace):
    """(Qwen2Config, depth) from --config (a Qwen2.5 size or config.json) or MODEL/config.json."""
    from .model import Qwen2Config
    from .shapes import QWEN25_CONFIGS, hf_config
    if args.config in QWEN25_CONFIGS:
        return Qwen2Config.from_hf(hf_config(args.config), f"Qwen2.5-{args.config}"), args.depth
    path = Path(args.config) if args.config else Path(args.model) / "config.json"
    if not path.exists():
        raise CodecError(f"{path}: no such config (give a checkpoint dir, a config.json or one of "
                         f"{', '.join(QWEN25_CONFIGS)})")
    return Qwen2Config.from_hf(read_json(path), str(path)), args.depth


def _tune(args: argparse.Namespace) -> int:
    from .compile import LINEAR_NAMES, export_model
    from .targets import parse_target
    from .tuning import DEFAULT_LOGS, decode_gemv_kernels, fused_module, keep_records_that_win, logs_dir, \
        make_runner, tune_kernels

    target = parse_target(args.target)
    cfg, depth = resolve_model_config(args)
    layers = [dict.fromkeys(LINEAR_NAMES, depth)] * cfg.num_hidden_layers
    mod, _, _, _ = export_model(cfg, layers, target)
    kernels = decode_gemv_kernels(fused_module(mod))
    out = logs_dir(args.tuning_logs or DEFAULT_LOGS, target)
    log.info("tuning %d decode kernels x %d trials for %s into %s", len(kernels), args.trials, target.kind.name, out)
    t0 = time.perf_counter()
    tune_kernels(kernels, target, out, args.trials, make_runner(args.rpc_tracker, args.rpc_key))
    if args.rpc_tracker:
        log.info("records measured on the tracker's servers are kept as they are (not re-timed here)")
    else:
        for row in keep_records_that_win(kernels, out, target):
            verdict = "kept" if row["kept"] else "dropped: the hand rule schedules it"
            ratio = "no record" if row["tuned_s"] is None else f"{row['hand_s'] / row['tuned_s']:.3f}x the hand rule"
            log.info("%s %s: %s, %s", row["name"], row["kernel"], ratio, verdict)
    log.info("done in %.0f s; trit-compile --target %s applies the records", time.perf_counter() - t0, args.target)
    return 0


def tune_main(argv: Sequence[str] | None = None) -> int:
    return run_cli(_tune, tune_parser(), argv)
