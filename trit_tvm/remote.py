"""Run an artifact on a device over TVM RPC (`python -m tvm.exec.rpc_server` there, TVM's runtime only):
the library is uploaded and loaded on the device, parameters are copied to its memory, and generation is
driven from here, one RPC call per kernel launch of the VM.

TVM's RPC passes tensors, numbers, strings and handles to objects that live on the server, not objects
built here: shapes and parameter lists are therefore made on the device (ffi.Shape, ffi.Array) and the
VM's result tuples are read there (ffi.ArrayGetItem).
"""
from __future__ import annotations

import hashlib
import socket
import threading
from contextlib import contextmanager
from pathlib import Path

import tvm
from tvm import rpc

from .errors import CompileError

DEFAULT_TIMEOUT_S = 60.0
HANDSHAKE_TIMEOUT_S = 20.0  # a TVM server answers at once; waiting longer only delays the error


def parse_address(address: str) -> tuple[str, int]:
    host, sep, port = address.rpartition(":")
    if not sep or not host or not port.isdigit() or not 0 < int(port) < 65536:
        raise CompileError(f"--rpc needs HOST:PORT (e.g. 192.168.1.20:9090), got {address!r}")
    return host, int(port)


def _connect(host: str, port: int, timeout: float):
    """rpc.connect with a deadline: a peer that accepts TCP but never answers TVM's handshake would
    otherwise block forever."""
    try:
        socket.create_connection((host, port), timeout=min(timeout, 10.0)).close()
    except OSError as e:
        raise CompileError(f"cannot reach a TVM RPC server at {host}:{port} ({e.strerror or e}); start one on the "
                           f"device with: python -m tvm.exec.rpc_server --host 0.0.0.0 --port {port}") from None
    result: dict = {}

    def attempt():
        try:
            result["session"] = rpc.connect(host, port, session_timeout=timeout)
        except Exception as e:  # reported below, in the caller's thread
            result["error"] = e
    worker = threading.Thread(target=attempt, daemon=True)
    worker.start()
    worker.join(min(timeout, HANDSHAKE_TIMEOUT_S))
    if "session" in result:
        return result["session"]
    why = "no answer" if worker.is_alive() else str(result["error"]).strip().splitlines()[-1][:200]
    raise CompileError(f"{host}:{port} accepted the connection but is not a TVM RPC server ({why}); "
                       "start one with: python -m tvm.exec.rpc_server")


class RemoteRuntime:
    """TritModel's calls sent to a TVM RPC server (see trit_tvm.runtime.LocalRuntime)."""

    def __init__(self, address: str, timeout: float = DEFAULT_TIMEOUT_S):
        host, port = parse_address(address)
        self.description = f"{host}:{port}"
        self.session = _connect(host, port, timeout)
        self._shape = self.session.get_function("ffi.Shape")
        self._array = self.session.get_function("ffi.Array")
        self._getitem = self.session.get_function("ffi.ArrayGetItem")

    def function(self, name: str):
        return self.session.get_function(name)

    def shape(self, *dims: int):
        return self._shape(*dims)

    def array(self, items: list):
        return self._array(*items)

    def unpack(self, value, n: int) -> tuple:
        return tuple(self._getitem(value, i) for i in range(n))

    def device(self, manifest: dict, artifact: Path) -> tvm.runtime.Device:
        if manifest["device"] == "cuda":
            dev = self.session.cuda(0)
            if not dev.exist:
                raise CompileError(f"{artifact}: built for CUDA, but the device at {self.description} has no "
                                   "CUDA GPU (or its TVM runtime was built without CUDA)")
            return dev
        return self.session.cpu(0)

    def load_library(self, path: Path, arch: str | None = None):
        """Upload under a content-addressed name (several artifacts can share one server) and load it."""
        data = Path(path).read_bytes()
        name = f"trit-{hashlib.sha256(data).hexdigest()[:16]}.so"
        self.session.upload(bytearray(data), target=name)
        try:
            return self.session.load_module(name)
        except Exception as e:
            reason = str(e).strip().splitlines()[-1][:200]
            raise CompileError(f"{path}: the device at {self.description} cannot load this library, built for "
                               f"{arch or 'an unknown architecture'} ({reason}); rebuild it with --target for "
                               "the device's architecture") from None

    @contextmanager
    def errors(self):
        """A dropped connection or a timed-out call as one clear error, not a traceback."""
        try:
            yield
        except CompileError:
            raise
        except (RuntimeError, OSError, ValueError) as e:
            reason = str(e).strip().splitlines()[-1][:200] if str(e).strip() else type(e).__name__
            raise CompileError(f"lost the connection to the TVM RPC server at {self.description} ({reason})") from None
