"""Process-level tuning of the host that TensorFlow itself does not do."""

import ctypes
import os
import sys

# glibc mallopt parameters (malloc.h)
_M_TRIM_THRESHOLD, _M_TOP_PAD, _M_MMAP_THRESHOLD, _M_ARENA_MAX = -1, -2, -3, -8


def keep_freed_memory():
    """Make glibc keep the memory TensorFlow frees, instead of returning it
    to the kernel and faulting it back in on the next step.

    Measured on a 2-core CPU (benchmarks/train_loop.py): while a distributed
    dataset iterator is alive, the training step's large activations are
    served from per-thread malloc arenas that unmap them on free; each step
    then took about 170,000 page faults, half the CPU time went to the kernel
    and the step ran at half speed. One arena, a large top pad and no trimming
    bring it back to the speed of a step without the iterator. Call before
    TensorFlow starts its threads; returns False where it does not apply
    (not glibc) or when DPLG_MALLOC_TUNING=0 turns it off.
    """
    if os.environ.get("DPLG_MALLOC_TUNING") == "0" or not sys.platform.startswith("linux"):
        return False
    try:
        libc = ctypes.CDLL("libc.so.6")
    except OSError:
        return False
    settings = ((_M_ARENA_MAX, 1), (_M_MMAP_THRESHOLD, 32 << 20),
                (_M_TOP_PAD, 512 << 20), (_M_TRIM_THRESHOLD, (1 << 31) - 1))
    return all(libc.mallopt(param, value) == 1 for param, value in settings)
