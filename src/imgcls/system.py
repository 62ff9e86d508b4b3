"""What this machine offers: CPUs and the compute device, one place each.

Torch-free at import (the prediction runtime installs without torch); the
functions that need torch import it when called.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

from .errors import UserError

# device nodes of the NVIDIA driver, ROCm and WSL2's GPU bridge: without any of them torch cannot
# see a GPU, so a CPU-only predict need not import it (seconds and hundreds of MB before the first image)
_GPU_NODES = ("/dev/nvidiactl", "/dev/nvidia0", "/dev/kfd", "/dev/dxg")


def available_cpus() -> int:
    """CPUs this process may use: the affinity mask, capped by a cgroup v2 CPU quota."""
    try:
        n = len(os.sched_getaffinity(0))
    except (AttributeError, OSError):
        n = os.cpu_count() or 1
    try:  # containers: cpu.max = "quota period" or "max period"
        quota, period = Path("/sys/fs/cgroup/cpu.max").read_text().split()[:2]
        if quota != "max":
            n = min(n, max(1, int(int(quota) // int(period))))
    except (OSError, ValueError):
        pass
    return max(1, n)


def default_workers(cap: int = 4) -> int:
    """Worker threads or processes for decoding: one per usable CPU, at most ``cap``."""
    return max(1, min(cap, available_cpus()))


def cuda_available() -> bool:
    """True when torch is installed and sees a CUDA GPU; imports torch only where a GPU may exist."""
    if sys.platform == "darwin" or (sys.platform.startswith("linux") and not any(map(os.path.exists, _GPU_NODES))):
        return False
    try:
        import torch
    except ImportError:
        return False
    return torch.cuda.is_available()


def resolve_device(name: str = "auto"):
    """``auto`` -> cuda when a GPU is visible, else cpu; ``cuda...`` without a GPU is a UserError."""
    import torch  # only callers that run torch ask for a torch device

    if name == "auto":
        return torch.device("cuda" if cuda_available() else "cpu")
    if name.startswith("cuda") and not cuda_available():
        raise UserError(f"--device {name} asked for, but no CUDA GPU is visible; use --device cpu")
    try:
        return torch.device(name)
    except RuntimeError:
        raise UserError(f"unknown --device {name!r}; use auto, cpu, cuda or cuda:N") from None


def cpu_has_native_bf16() -> bool:
    """AVX512-BF16 or AMX: bf16 runs natively instead of being emulated (hundreds of times slower)."""
    import torch

    return bool(getattr(torch.cpu, "_is_avx512_bf16_supported", lambda: False)()
                or getattr(torch.cpu, "_is_amx_tile_supported", lambda: False)())


# libgomp (torch's OpenMP on Linux) reads these once, when torch loads it: imgcls/__init__ sets them before
# any torch import. Passive: a thread that waits at a barrier sleeps instead of spinning, so a core shared
# with another busy process is not lost to spinning (benchmarks/threads.py; docs/decisions.md)
OPENMP_DEFAULTS = {"OMP_WAIT_POLICY": "PASSIVE"}
_openmp = {"torch_first": False}


def openmp_defaults() -> None:
    """Set :data:`OPENMP_DEFAULTS` in the environment where the user has not; remember whether torch was
    imported before (its OpenMP runtime then runs with whatever it read)."""
    _openmp["torch_first"] = "torch" in sys.modules
    for key, value in OPENMP_DEFAULTS.items():
        os.environ.setdefault(key, value)


def passive_openmp() -> bool:
    """Whether torch's OpenMP threads wait passively in this process."""
    return not _openmp["torch_first"] and os.environ.get("OMP_WAIT_POLICY", "").upper() == "PASSIVE"


def configure_threads(device) -> int:
    """Set torch's intra-op threads for training on ``device``; the one place training sets them.

    CPU: one per usable CPU (the affinity mask and cgroup quota, which torch's default ignores) while
    OpenMP waits passively; a single thread when torch's OpenMP runtime spins (torch was imported before
    imgcls, or OMP_WAIT_POLICY says so), since spinning threads collapse to a tenth of their speed when
    another process shares a core.  A GPU keeps torch's setting.  Returns the count."""
    import torch

    if device.type != "cpu":
        return torch.get_num_threads()
    threads = min(torch.get_num_threads(), available_cpus()) if passive_openmp() else 1
    torch.set_num_threads(threads)
    return threads
