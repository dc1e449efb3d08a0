"""trit_tvm: trit checkpoints of decoder LMs (Qwen2/2.5, Qwen3, Llama, Mistral) → TVM Relax → compiled
artifacts that generate text. The Python API is `TritModel` (trit_tvm.runtime):

    from trit_tvm import TritModel
    model = TritModel("trit-demo-llvm")
    print(model.generate_text("Once upon a time", max_new_tokens=40))
"""
import os

# TVM sizes its CPU thread pool from the physical cores it detects; on VMs that report one socket of
# single-thread cores it settles on one thread. Default to every core this process may run on.
if hasattr(os, "sched_getaffinity"):
    os.environ.setdefault("TVM_NUM_THREADS", str(len(os.sched_getaffinity(0))))

__all__ = ["TritModel"]


def __getattr__(name: str):
    """TritModel imported on first use, so `import trit_tvm` stays cheap (TVM loads with the runtime)."""
    if name == "TritModel":
        from .runtime import TritModel
        return TritModel
    raise AttributeError(f"module 'trit_tvm' has no attribute {name!r}")
