"""trit-compile / trit-run: the IR shape, CUDA builds without a GPU, and every bad-input path."""
import json
import re
import shutil
import subprocess
import sys

import pytest
import tvm

from trit_tvm.cli import compile_main, run_main


@pytest.fixture(scope="module")
def cuda_artifact(trit_ckpt):
    out = trit_ckpt.parent / "art-cuda"
    assert compile_main([str(trit_ckpt), "--target", '{"kind":"cuda","arch":"sm_90"}', "-o", str(out)]) == 0
    return out


def _trit_calls(arch, cfg, depth_of) -> dict[str, list[str]]:
    """{function: the parameter prefix of each trit_decode_matmul call} of the exported model."""
    from trit_tvm.compile import export_model
    mod = export_model(arch, cfg, depth_of, tvm.target.Target({"kind": "llvm"})).mod
    tagged = [f for f in mod.functions.values() if isinstance(f, tvm.tirx.PrimFunc) and f.attrs
              and f.attrs.get("trit.op") == "decode_matmul"]
    assert tagged
    return {fn: re.findall(r"R\.call_tir\(trit_decode_matmul\d*, \(\w+, (\w+)_trit_codes", mod[fn].script())
            for fn in ("prefill", "decode")}


def test_one_trit_call_per_quantized_linear_qkv_and_gate_up_stacked(trit_ckpt):
    from codec import load_trit_checkpoint
    from trit_tvm.compile import checkpoint_depths
    from trit_tvm.models import architecture_of
    from trit_tvm.quantization import RowBlock
    ckpt = load_trit_checkpoint(trit_ckpt)
    arch, cfg = architecture_of(ckpt.config)
    depth_of = checkpoint_depths(ckpt)
    for fn, calls in _trit_calls(arch, cfg, depth_of).items():
        assert [c.split("_", 3)[-1] for c in calls[:4]] == ["self_attn_qkv_proj", "self_attn_o_proj",
                                                             "mlp_gate_up_proj", "mlp_down_proj"], fn
        assert len(calls) == 4 * cfg.num_hidden_layers and len(set(calls)) == len(calls), fn
    # a layer whose q has another depth than k and v: one call per depth (two depths cannot share a kernel)
    mixed = lambda name: 2 if name == "model.layers.0.self_attn.q_proj.weight" else depth_of(name)  # noqa: E731
    calls = _trit_calls(arch, cfg, mixed)["decode"]
    assert [c.split("_", 3)[-1] for c in calls[:5]] == [
        "self_attn_qkv_proj_linears_0", "self_attn_qkv_proj_linears_1", "self_attn_o_proj", "mlp_gate_up_proj",
        "mlp_down_proj"]
    # q stored as row blocks at depths 2, 3, 2 (k and v at 3): still one call per depth
    q = "model.layers.0.self_attn.q_proj.weight"
    heads = cfg.head_dim
    blocks = (RowBlock("q0", heads, 2), RowBlock("q1", heads, 3), RowBlock("q2", cfg.num_attention_heads * heads
                                                                            - 2 * heads, 2))
    calls = _trit_calls(arch, cfg, lambda name: blocks if name == q else depth_of(name))["decode"]
    assert [c.split("_", 3)[-1] for c in calls[:3]] == [
        "self_attn_qkv_proj_linears_0", "self_attn_qkv_proj_linears_1", "self_attn_o_proj"]


def test_run_json_and_text(llvm_artifact, capsys):
    assert run_main([str(llvm_artifact), "--prompt-ids", "1,2,3", "--max-new-tokens", "8", "--json"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert len(out["tokens"]) == 8 and out["prefill_tok_s"] > 0 and out["decode_tok_s"] > 0
    assert run_main([str(llvm_artifact), "--prompt", "Balanced ternary", "--max-new-tokens", "4"]) == 0
    captured = capsys.readouterr()
    assert captured.out.strip() and "decode" in captured.err


def test_sampling_is_seeded(llvm_artifact, capsys):
    runs = []
    for seed in (1, 1, 2):
        run_main([str(llvm_artifact), "--prompt-ids", "4,5", "--max-new-tokens", "12", "--temperature", "1.5",
                  "--top-p", "0.95", "--seed", str(seed), "--json"])
        runs.append(json.loads(capsys.readouterr().out)["tokens"])
    assert runs[0] == runs[1] and runs[0] != runs[2]


def test_cuda_artifact_builds_without_gpu(cuda_artifact):
    m = json.loads((cuda_artifact / "manifest.json").read_text())
    assert m["device"] == "cuda" and m["model_dtype"] == "float16" and m["target"]["arch"] == "sm_90"
    assert (cuda_artifact / "model.so").stat().st_size > 0


def test_cuda_artifact_runs_on_gpu(cuda_artifact, llvm_artifact):
    if not tvm.cuda(0).exist:
        pytest.skip("no CUDA GPU: the CUDA artifact was built, not run")
    from trit_tvm.runtime import TritModel
    gpu, cpu = TritModel(cuda_artifact), TritModel(llvm_artifact)
    prompt = [5, 17, 42, 99, 3]
    # fp16 activations on the GPU vs fp32 on the CPU: compare the first greedy tokens and the logits loosely
    assert gpu.generate(prompt, 8).tokens[:4] == cpu.generate(prompt, 8).tokens[:4]
    import numpy as np
    assert np.abs(gpu.prefill_logits(prompt) - cpu.prefill_logits(prompt)).max() < 5e-2


COMPILER_IMPORT = re.compile(r"^\s*(from tvm(\.\w+)* import .*\b(script|relax|tirx|te|dlight|meta_schedule)\b"
                             r"|(from|import) tvm\.(script|relax|tirx|te|s_tir|dlight|meta_schedule)\b"
                             r"|(from|import) (\.+|trit_tvm\.)(operator|pipeline|compile|attention_cpu|models)\b"
                             r"|(from|import) schedules\b)", re.M)


def test_runtime_loads_no_compiler_module():
    """A GPU box or RPC device has TVM's runtime only (scripts/gpu_env.sh leaves the compiler out, and there
    `tvm.script` fails to import): what `trit_tvm.runtime` pulls in must not import the compiler's parts."""
    code = ("import sys, trit_tvm.runtime; print('\\n'.join(m.__file__ for n, m in sys.modules.items() "
            "if n.split('.')[0] in ('trit_tvm', 'codec', 'schedules') and getattr(m, '__file__', None)))")
    files = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout.split()
    assert any(f.endswith("runtime.py") for f in files)
    offending = {f: m.group(0).strip() for f in files if (m := COMPILER_IMPORT.search(open(f).read()))}
    assert not offending


# ---- bad input ----------------------------------------------------------------------------------------

def _err(main, args, capsys):
    code = main([str(a) for a in args])
    err = capsys.readouterr().err
    assert "Traceback" not in err
    return code, err


def test_unsupported_architecture(tiny_hf, tmp_path, capsys):
    src = tmp_path / "gpt2"
    shutil.copytree(tiny_hf, src)
    cfg = json.loads((src / "config.json").read_text())
    cfg["architectures"] = ["GPT2LMHeadModel"]
    (src / "config.json").write_text(json.dumps(cfg))
    code, err = _err(compile_main, [src, "-o", tmp_path / "o"], capsys)
    assert code == 2 and "unsupported architecture GPT2LMHeadModel" in err
    assert all(name in err for name in ("Qwen2ForCausalLM", "LlamaForCausalLM", "MistralForCausalLM",
                                        "Qwen3ForCausalLM"))
    assert not (tmp_path / "o").exists()


def test_corrupt_trit_checkpoint(trit_ckpt, tmp_path, capsys):
    bad = tmp_path / "bad"
    shutil.copytree(trit_ckpt, bad)
    shard = next(bad.glob("model-*.safetensors"))
    shard.write_bytes(shard.read_bytes()[:-100])
    code, err = _err(compile_main, [bad, "-o", tmp_path / "o"], capsys)
    assert code == 2 and "checksum mismatch" in err and shard.name in err


def test_unknown_target(trit_ckpt, tmp_path, capsys):
    code, err = _err(compile_main, [trit_ckpt, "--target", "quantum-abacus", "-o", tmp_path / "o"], capsys)
    assert code == 2 and "unknown target 'quantum-abacus'" in err and "llvm" in err


def test_int8_activations_need_a_cpu_target(trit_ckpt, tmp_path, capsys):
    code, err = _err(compile_main, [trit_ckpt, "--target", "cuda", "--int8-activations", "-o", tmp_path / "o"],
                     capsys)
    assert code == 2 and "--int8-activations: for CPU targets" in err and "cuda" in err
    assert not (tmp_path / "o").exists()


def test_float32_kv_cache_needs_a_float32_model(trit_ckpt, tmp_path, capsys):
    code, err = _err(compile_main, [trit_ckpt, "--target", "cuda", "--kv-cache-dtype", "float32",
                                    "-o", tmp_path / "o"], capsys)
    assert code == 2 and "--kv-cache-dtype float32" in err and "cuda builds compute in float16" in err
    assert not (tmp_path / "o").exists()


def test_artifact_for_another_target(cuda_artifact, tmp_path, capsys):
    if tvm.cuda(0).exist:
        pytest.skip("a GPU is present, so the CUDA artifact is runnable here")
    code, err = _err(run_main, [cuda_artifact, "--prompt-ids", "1,2"], capsys)
    assert code == 2 and "built for CUDA" in err and "no CUDA GPU" in err


def test_artifact_for_another_cpu_architecture(llvm_artifact, tmp_path, capsys):
    art = tmp_path / "arm"
    shutil.copytree(llvm_artifact, art)
    m = json.loads((art / "manifest.json").read_text())
    m["arch"] = "aarch64"
    (art / "manifest.json").write_text(json.dumps(m))
    code, err = _err(run_main, [art, "--prompt-ids", "1,2"], capsys)
    assert code == 2 and "built for aarch64" in err


def test_empty_prompt(llvm_artifact, capsys):
    code, err = _err(run_main, [llvm_artifact, "--prompt", ""], capsys)
    assert code == 2 and "prompt is empty" in err
    code, err = _err(run_main, [llvm_artifact, "--prompt-ids", ""], capsys)
    assert code == 2 and "prompt is empty" in err


@pytest.mark.parametrize("flags, message", [
    (["--temperature", "-1"], "--temperature must be >= 0"), (["--temperature", "nan"], "--temperature must be"),
    (["--top-p", "0"], "--top-p must be in (0, 1]"), (["--top-p", "2"], "--top-p must be in (0, 1]"),
    (["--max-new-tokens", "0"], "--max-new-tokens must be at least 1"),
    (["--chat", "--json"], "does not go with --chat"), (["--prompt-ids", "1", "--system", "hi"], "goes with --chat"),
])
def test_bad_sampling_flags(llvm_artifact, capsys, flags, message):
    has_source = "--chat" in flags or "--prompt-ids" in flags
    args = [llvm_artifact] + (flags if has_source else ["--prompt-ids", "1,2"] + flags)
    code, err = _err(run_main, args, capsys)
    assert code == 2 and message in err, err


def test_prompt_beyond_the_context_fails_before_printing(llvm_artifact, capsys):
    code = run_main([str(llvm_artifact), "--prompt", "ternary " * 300, "--max-new-tokens", "8"])
    out = capsys.readouterr()
    assert code == 2 and "exceed the model's context length 256" in out.err and out.out == ""


def test_not_an_artifact(tmp_path, capsys):
    code, err = _err(run_main, [tmp_path, "--prompt-ids", "1"], capsys)
    assert code == 2 and "not a trit artifact" in err


def test_out_of_range_prompt_ids(llvm_artifact, capsys):
    code, err = _err(run_main, [llvm_artifact, "--prompt-ids", "1,99999"], capsys)
    assert code == 2 and "must be in [0, 384)" in err


def test_compile_help_exit_code():
    r = subprocess.run([sys.executable, "-c", "from trit_tvm.cli import compile_main; compile_main(['--help'])"],
                       capture_output=True, text=True)
    assert r.returncode == 0 and "--target" in r.stdout


def test_hf_checkpoint_is_quantized_on_the_fly(tiny_hf, tmp_path):
    out = tmp_path / "art"
    assert compile_main([str(tiny_hf), "--depth", "2", "-o", str(out)]) == 0
    m = json.loads((out / "manifest.json").read_text())
    assert m["depth"] == 2 and m["codec_mode"] == "mse" and (out / "tokenizer.json").exists()


def test_every_flag_of_every_command_has_help():
    from codec.cli import dequantize_parser, inspect_parser, quantize_parser
    from trit_tvm.cli import compile_parser, run_parser, tune_parser
    for parser in (quantize_parser(), dequantize_parser(), inspect_parser(), compile_parser(), run_parser(),
                   tune_parser()):
        undocumented = [a.dest for a in parser._actions if not a.help]
        assert not undocumented, (parser.prog, undocumented)
