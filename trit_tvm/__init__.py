"""trit_tvm: Qwen2 trit checkpoints → TVM Relax → compiled artifacts that generate text."""
import os

# TVM sizes its CPU thread pool from the physical cores it detects; on VMs that report one socket of
# single-thread cores it settles on one thread. Default to every core this process may run on.
if hasattr(os, "sched_getaffinity"):
    os.environ.setdefault("TVM_NUM_THREADS", str(len(os.sched_getaffinity(0))))
