"""Whether a CUDA GPU is there, answered without importing torch where the answer is plainly no.

``import torch`` costs seconds; a search on a machine without a GPU should not pay them just to learn
that it has none. Without NVIDIA device nodes (``/dev/nvidia0``…, or WSL's ``/dev/dxg``) and with torch
not yet loaded, the answer is False at once; otherwise torch is asked.
"""

from __future__ import annotations

import glob
import os
import sys


def gpu_device_nodes() -> bool:
    """Whether this machine shows a GPU device node CUDA could use (and CUDA_VISIBLE_DEVICES hides none)."""
    if os.environ.get("CUDA_VISIBLE_DEVICES", None) in ("", "-1"):
        return False
    return bool(glob.glob("/dev/nvidia[0-9]*") or os.path.exists("/dev/dxg"))


def cuda_available() -> bool:
    """``torch.cuda.is_available()``, without importing torch on a machine with no GPU device node."""
    if "torch" not in sys.modules and not gpu_device_nodes():
        return False
    import torch

    return torch.cuda.is_available()


def cpu_name() -> str:
    """The CPU's model name (``/proc/cpuinfo``; ``platform.processor()`` elsewhere) and how many cores this
    process may use: what a speed measured on one machine is valid for."""
    import platform

    name = ""
    try:
        for line in open("/proc/cpuinfo", encoding="utf-8", errors="replace"):
            if line.startswith("model name"):
                name = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    try:
        cores = len(os.sched_getaffinity(0))
    except AttributeError:
        cores = os.cpu_count() or 1
    return f"{name or platform.processor() or platform.machine()} x{cores}"
