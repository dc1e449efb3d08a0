"""Edge deployment: aarch64 cross-compilation, and running artifacts on TVM RPC servers (an x86 one on
loopback, and an emulated aarch64 device: scripts/arm_device.sh, qemu-user), with every failure a clear
error."""
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

from trit_tvm.cli import compile_main, run_main
from trit_tvm.errors import CompileError
from trit_tvm.remote import RemoteRuntime
from trit_tvm.runtime import TritModel

REPO = Path(__file__).resolve().parent.parent
ARM_DEVICE = REPO / "scripts" / "arm_device.sh"
ARM_ROOT = Path(os.environ.get("TRIT_ARM_ROOT", Path.home() / ".cache" / "trit-arm"))
EM_AARCH64 = 183  # ELF e_machine
PROMPT = [5, 17, 42, 99, 7]
needs_cross = pytest.mark.skipif(shutil.which("aarch64-linux-gnu-g++") is None,
                                 reason="no aarch64 cross compiler (apt-get install g++-aarch64-linux-gnu)")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _wait_for_port(port: int, proc: subprocess.Popen, seconds: float) -> None:
    deadline = time.time() + seconds
    while time.time() < deadline:
        if proc.poll() is not None:
            pytest.fail(f"RPC server exited with {proc.returncode}")
        try:
            socket.create_connection(("127.0.0.1", port), timeout=1).close()
            return
        except OSError:
            time.sleep(0.3)
    pytest.fail(f"no RPC server on port {port} after {seconds} s")


def _start(cmd: list[str], port: int, seconds: float = 60) -> subprocess.Popen:
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    _wait_for_port(port, proc, seconds)
    return proc


def _stop(proc: subprocess.Popen) -> None:
    try:
        os.killpg(proc.pid, signal.SIGKILL)  # the server and the session workers it forked
    except ProcessLookupError:
        pass
    proc.wait()


@pytest.fixture(scope="module")
def arm_artifact(trit_ckpt):
    if shutil.which("aarch64-linux-gnu-g++") is None:
        pytest.skip("no aarch64 cross compiler (apt-get install g++-aarch64-linux-gnu)")
    out = trit_ckpt.parent / "art-arm"
    assert compile_main([str(trit_ckpt), "--target", "aarch64", "-o", str(out)]) == 0
    return out


@pytest.fixture(scope="module")
def x86_server():
    port = _free_port()
    proc = _start([sys.executable, "-m", "tvm.exec.rpc_server", "--host", "127.0.0.1", "--port", str(port),
                   "--port-end", str(port + 1)], port)
    yield f"127.0.0.1:{port}"
    _stop(proc)


@needs_cross
@pytest.mark.parametrize("target", ["aarch64", '{"kind":"llvm","mtriple":"aarch64-linux-gnu","mattr":["+neon"]}'])
def test_cross_compiles_an_aarch64_library(trit_ckpt, tmp_path, target):
    out = tmp_path / "art"
    assert compile_main([str(trit_ckpt), "--target", target, "-o", str(out)]) == 0
    header = (out / "model.so").read_bytes()[:20]
    assert header[:4] == b"\x7fELF" and int.from_bytes(header[18:20], "little") == EM_AARCH64
    manifest = json.loads((out / "manifest.json").read_text())
    # NEON-wide row tiles (8 x 16-bit lanes), not x86's AVX-512 ones
    assert manifest["arch"] == "aarch64" and manifest["weight_layout"] == "trit-rows8-words-v1"


def test_llvm_artifact_over_loopback_rpc_matches_local(llvm_artifact, x86_server):
    local = TritModel(llvm_artifact).generate(PROMPT, 16).tokens
    remote = TritModel(llvm_artifact, runtime=RemoteRuntime(x86_server))
    assert remote.generate(PROMPT, 16).tokens == local
    assert str(remote.device).startswith("remote")


def _tokens_on_emulated_device(artifact) -> list[int]:
    """12 greedy tokens of an aarch64 artifact on the emulated device, over RPC (skips without the device)."""
    if shutil.which("qemu-aarch64") is None or not (ARM_ROOT / "ready").exists():
        pytest.skip(f"no emulated aarch64 device: run scripts/arm_device.sh prepare (qemu-user, an arm64 "
                    f"Python with TVM's runtime in {ARM_ROOT})")
    port = _free_port()
    proc = _start(["bash", str(ARM_DEVICE), "serve", str(port)], port, seconds=120)
    try:
        remote = TritModel(artifact, runtime=RemoteRuntime(f"127.0.0.1:{port}", timeout=120))
        return remote.generate(PROMPT, 12).tokens
    finally:
        _stop(proc)


def test_emulated_aarch64_device_matches_x86_build(arm_artifact, llvm_artifact):
    assert _tokens_on_emulated_device(arm_artifact) == TritModel(llvm_artifact).generate(PROMPT, 12).tokens


@needs_cross
def test_emulated_aarch64_dotprod_int8_build_matches_x86_int8_build(trit_ckpt, int8_artifact, tmp_path):
    """--target aarch64-dotprod --int8-activations: the `sdot` kernels (d=3 in the 5-bit layout) on the emulated
    device give the greedy tokens of this CPU's int8 build (VNNI or AVX2 kernels: the same integer sums)."""
    out = tmp_path / "art"
    assert compile_main([str(trit_ckpt), "--target", "aarch64-dotprod", "--int8-activations", "-o", str(out)]) == 0
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["arch"] == "aarch64" and "d3-5bit" in manifest["weight_layout"]
    assert _tokens_on_emulated_device(out) == TritModel(int8_artifact).generate(PROMPT, 12).tokens


def _cli_error(argv, capsys) -> str:
    assert run_main([str(a) for a in argv]) == 2
    err = capsys.readouterr().err
    assert "Traceback" not in err
    return err


def test_unreachable_server(llvm_artifact, capsys):
    err = _cli_error([llvm_artifact, "--prompt-ids", "1,2", "--rpc", f"127.0.0.1:{_free_port()}"], capsys)
    assert "cannot reach a TVM RPC server" in err and "tvm.exec.rpc_server" in err


def test_server_that_is_not_tvm(llvm_artifact, capsys):
    with socket.socket() as listener:  # accepts connections, never speaks TVM's protocol
        listener.bind(("127.0.0.1", 0))
        listener.listen()
        port = listener.getsockname()[1]
        err = _cli_error([llvm_artifact, "--prompt-ids", "1,2", "--rpc", f"127.0.0.1:{port}", "--rpc-timeout", "2"],
                         capsys)
    assert "is not a TVM RPC server" in err


def test_artifact_for_another_architecture(arm_artifact, x86_server, capsys):
    err = _cli_error([arm_artifact, "--prompt-ids", "1,2", "--rpc", x86_server], capsys)
    assert "cannot load this library" in err and "aarch64" in err
    err = _cli_error([arm_artifact, "--prompt-ids", "1,2"], capsys)  # and locally
    assert "built for aarch64" in err and "--rpc" in err


def test_bad_address(llvm_artifact, capsys):
    assert "HOST:PORT" in _cli_error([llvm_artifact, "--prompt-ids", "1", "--rpc", "devicebox"], capsys)


def test_lost_connection(llvm_artifact):
    port = _free_port()
    proc = _start([sys.executable, "-m", "tvm.exec.rpc_server", "--host", "127.0.0.1", "--port", str(port),
                   "--port-end", str(port + 1)], port)
    try:
        runtime = RemoteRuntime(f"127.0.0.1:{port}", timeout=10)
        model = TritModel(llvm_artifact, runtime=runtime)
    finally:
        _stop(proc)
    with pytest.raises(CompileError, match="lost the connection"):
        with runtime.errors():
            model.generate(PROMPT, 4)
