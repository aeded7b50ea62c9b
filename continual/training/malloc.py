"""Keep freed memory in the process on a CPU (glibc's malloc), so a training step's temporaries
reuse pages instead of faulting in fresh ones.

Why: glibc serves a large allocation (above a threshold that it raises up to 32 MiB as big blocks
are freed) with ``mmap`` and hands it back to the kernel on ``free``; it also gives the top of
the heap back once more than a threshold of it is free. A frozen-backbone training step makes
and drops hundreds of activation tensors of a few MB each, so every step touches pages the
kernel must map and zero again. Measured on MiniLM (batch 16 x 64 tokens, bf16, 2 threads):
3,000 to 15,000 minor page faults and 20 to 36 ms of kernel time per step of about 130 ms.
Raising both thresholds (``mallopt``) takes that to almost none, and the step from 125 to 148
samples/s (benchmarks/speed.py --device cpu, LoRA, each in a fresh process).

What it costs: the process keeps up to :data:`TRIM` bytes of freed heap for reuse rather than
returning it at once, and blocks below :data:`MMAP` come from the heap. The settings are
process-wide and stay until the process ends (glibc cannot go back to its adaptive defaults), so
:class:`continual.TrainConfig` asks for them (``malloc="hold"``) rather than setting them on import.
Only a CPU run applies them (:func:`apply`); with another C library (macOS, musl) nothing is
set and :func:`hold_freed_memory` returns False.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import functools

MALLOC = ("default", "hold")  # what TrainConfig.malloc accepts
MMAP = 256 << 20  # allocations below this come from the heap (glibc's own default: 128 KiB, adaptive up to 32 MiB)
TRIM = 1 << 30    # freed heap kept for reuse before any is given back
_M_TRIM_THRESHOLD, _M_MMAP_THRESHOLD = -1, -3  # <malloc.h>


@functools.lru_cache(maxsize=None)
def hold_freed_memory() -> bool:
    """Raise glibc's mmap and trim thresholds for this process (once; later calls do nothing).
    Returns whether they are now raised: False where the C library is not glibc."""
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        mallopt = libc.mallopt
    except (OSError, AttributeError):
        return False
    mallopt.argtypes, mallopt.restype = [ctypes.c_int, ctypes.c_int], ctypes.c_int
    return bool(mallopt(_M_MMAP_THRESHOLD, MMAP)) and bool(mallopt(_M_TRIM_THRESHOLD, TRIM))


def apply(malloc: str, device_type: str) -> bool:
    """What training on ``device_type`` does with a ``TrainConfig.malloc`` setting: "hold" on a
    CPU holds freed memory; anything else changes nothing. Returns whether memory is held."""
    return malloc == "hold" and device_type == "cpu" and hold_freed_memory()
