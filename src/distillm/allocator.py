"""Keep freed CPU memory for the next tensor: a process setting the command line applies at start.

glibc's malloc serves each block above its mmap threshold (128 KiB, rising to at most 32 MiB) with its own
``mmap`` and returns it to the kernel when freed, so the next tensor of that size starts as untouched pages
that the kernel maps and zero-fills one fault at a time. A training step allocates and frees tensors of
``[tokens x vocabulary]`` a dozen times (100 MB at 504 x 49,152), and on a virtual machine a fault costs about
a microsecond (24,000 of them for one 100 MB tensor): on a 2-core AMD EPYC VM the real pair's KD step took
2.93 s with glibc's default (296,000 faults a step) and 2.06 s with this setting (22,000;
``benchmarks/real_pair.py`` applies it as ``distillm train`` does; benchmarks/README.md).

:func:`keep_freed_memory` asks glibc to serve every block from its heap (``M_MMAP_MAX = 0``) and to keep the
freed top of the heap instead of giving it back (``M_TRIM_THRESHOLD`` at its maximum), which is what a GPU
caching allocator does for device memory. The heap grows over the first steps, until the holes that freed
tensors leave are large enough for the next step's (torch asks for aligned blocks, which need a little more
than the hole an equal block left), then a step finds all its memory resident (tests/test_allocator.py).
The price: the process holds on to that grown heap until it exits (the KD step above peaked at 2.2-2.4 GiB
resident instead of 2.0 in two runs). ``DISTILLM_KEEP_FREED_MEMORY=0`` leaves malloc as it is. Other C
libraries (musl, macOS) are left alone. A block that malloc serves from a worker thread's own arena above
that arena's size still gets its own ``mmap`` (glibc's fallback); torch allocates tensors on the calling thread.
"""

from __future__ import annotations

import ctypes
import functools
import logging
import os
import sys

logger = logging.getLogger(__name__)

# glibc's malloc.h
_M_TRIM_THRESHOLD = -1
_M_MMAP_MAX = -4
_INT_MAX = 2**31 - 1  # mallopt takes an int


@functools.cache
def keep_freed_memory() -> bool:
    """Make glibc's malloc keep freed memory for reuse (module docstring). Returns whether it took effect.

    Called once per process by ``distillm``'s command line before any work; idempotent. Not applied (False,
    logged) with ``DISTILLM_KEEP_FREED_MEMORY=0``, off Linux or with a C library other than glibc.
    """
    switch = os.environ.get("DISTILLM_KEEP_FREED_MEMORY", "1")
    if switch == "0":
        logger.debug("DISTILLM_KEEP_FREED_MEMORY=0: malloc keeps its defaults")
        return False
    if switch not in ("1", ""):
        logger.warning(
            "DISTILLM_KEEP_FREED_MEMORY=%r is neither 0 (off) nor 1 (on): freed memory is kept (on)", switch
        )
    if not sys.platform.startswith("linux"):
        return False
    try:
        libc = ctypes.CDLL(None)
        mallopt = libc.mallopt
    except (OSError, AttributeError):
        mallopt = None
    # glibc only: musl's mallopt accepts and ignores everything.
    if mallopt is None or not hasattr(libc, "gnu_get_libc_version"):
        logger.debug("not glibc: malloc keeps its defaults")
        return False
    mallopt.argtypes, mallopt.restype = [ctypes.c_int, ctypes.c_int], ctypes.c_int
    applied = mallopt(_M_MMAP_MAX, 0) == 1 and mallopt(_M_TRIM_THRESHOLD, _INT_MAX) == 1
    if applied:
        logger.debug(
            "malloc serves every block from its heap and keeps freed memory (DISTILLM_KEEP_FREED_MEMORY)"
        )
    else:
        logger.warning(
            "glibc refused the malloc settings of DISTILLM_KEEP_FREED_MEMORY: it keeps its defaults"
        )
    return applied
