"""trit-compile and trit-run."""
from __future__ import annotations

import argparse
import json
import logging
import sys
import tempfile
import time
from pathlib import Path
from typing import Sequence

from codec.cli import run_cli
from codec.errors import CodecError
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
    p.add_argument("-v", "--verbose", action="store_true")
    return p


def _compile(args: argparse.Namespace) -> int:
    from .compile import compile_model
    from .demo import DEMO_SPEC, build_tiny_qwen2
    from .targets import parse_target

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
        manifest = compile_model(model, target, out, args.depth, args.mode, args.force, stage)
    log.info("wrote %s: %s, %d trit kernels, weights resident %.2f MB packed trits + %.2f MB kept "
             "(packed checkpoint %.2f MB), %.1f s", out, target.kind.name, manifest["trit_kernels"],
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
    model = TritModel(args.artifact)
    stop = () if tokenizer is None or tokenizer.eos_token_id is None else (tokenizer.eos_token_id,)
    gen = model.generate(ids, args.max_new_tokens, args.temperature, args.top_p, args.seed, stop)
    text = tokenizer.decode(gen.tokens) if tokenizer is not None else None
    if args.json:
        out = {"tokens": gen.tokens, "prompt_tokens": gen.prompt_tokens, "prefill_tok_s": gen.prefill_tok_s,
               "decode_tok_s": gen.decode_tok_s, "device": model.manifest["device"]}
        if text is not None:
            out["text"] = text
        print(json.dumps(out))
    else:
        print(text if text is not None else ",".join(map(str, gen.tokens)))
        print(f"prefill {gen.prompt_tokens} tokens: {gen.prefill_tok_s:.1f} tok/s; decode {gen.decode_steps} "
              f"tokens: {gen.decode_tok_s:.1f} tok/s ({model.manifest['device']})", file=sys.stderr)
    return 0


def run_main(argv: Sequence[str] | None = None) -> int:
    return run_cli(_run, run_parser(), argv)
