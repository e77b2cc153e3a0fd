"""Keep freed CPU memory for the next tensor: a process setting the command line applies at start.

glibc's malloc serves each block above its mmap threshold (128 KiB, rising to at most 32 MiB) with its own
``mmap`` and returns it to the kernel when freed, so the next tensor of that size starts as untouched pages
that the kernel maps and zero-fills one fault at a time. A training step allocates and frees tensors of
``[tokens x vocabulary]`` a dozen times (100 MB at 504 x 49,152), and on a virtual machine a fault costs about
a microsecond (24,000 of them for one 100 MB tensor), more with the cache misses of fresh pages: on a 2-core
AMD EPYC VM the real pair's KD step took 2.16 s with glibc's default (260,000 faults a step) and 1.76 s with
this setting (9,000), 2.93 against 2.06 s in a slower minute (``benchmarks/real_pair.py`` applies it as
``distillm train`` does; benchmarks/README.md).

:func:`keep_freed_memory` asks glibc to serve every block from its heap (``M_MMAP_MAX = 0``) and to keep the
freed top of the heap instead of giving it back (``M_TRIM_THRESHOLD`` at its maximum), which is what a GPU
caching allocator does for device memory. The heap grows over the first steps, until the holes that freed
tensors leave are large enough for the next step's (torch asks for aligned blocks, which need a little more
than the hole an equal block left), then a step finds all its memory resident (tests/test_allocator.py).
The price: the process holds on to that grown heap until it exits (the KD step above peaked at 2.2-2.4 GiB
resident instead of 2.0 in two runs). mallopt takes an int, so the trim threshold stops at 2 GiB: a free top
of the heap beyond that still goes back. ``DISTILLM_KEEP_FREED_MEMORY=0`` leaves malloc as it is, and so do
a CUDA device, a launch of several processes, the user's own malloc settings, another allocator and other C
libraries (musl, macOS). A block that malloc serves from a worker thread's own arena above that arena's size
still gets its own ``mmap`` (glibc's fallback); torch allocates tensors on the calling thread.
"""

from __future__ import annotations

import ctypes
import functools
import logging
import os
import sys

from distillm.environment import launched_processes, switched_on

logger = logging.getLogger(__name__)

# glibc's malloc.h
_M_TRIM_THRESHOLD = -1
_M_MMAP_MAX = -4
_INT_MAX = 2**31 - 1  # mallopt takes an int


# glibc's own malloc settings: where the user chose any of these, theirs stand.
_USER_SETTINGS = ("MALLOC_MMAP_MAX_", "MALLOC_MMAP_THRESHOLD_", "MALLOC_TRIM_THRESHOLD_", "MALLOC_TOP_PAD_")
_USER_TUNABLES = ("glibc.malloc.mmap_max", "glibc.malloc.mmap_threshold", "glibc.malloc.trim_threshold")


@functools.cache
def keep_freed_memory() -> bool:
    """Make glibc's malloc keep freed memory for reuse (module docstring). Returns whether it took effect.

    Called once per process by ``distillm``'s command line before a command runs; idempotent. Not applied
    (False, logged at DEBUG) with ``DISTILLM_KEEP_FREED_MEMORY=0``; where a CUDA device is present (a GPU run's
    large temporaries live on the device, and a CPU heap that a model passed through on its way there should
    go back); in a launch of several processes (``WORLD_SIZE`` > 1); where the user set malloc's mmap or trim
    settings themselves (``MALLOC_*_`` variables,
    ``GLIBC_TUNABLES``) or preloads another allocator; off Linux; with a C library other than glibc.
    """
    if not switched_on("DISTILLM_KEEP_FREED_MEMORY", "freed memory is kept (on)", logger):
        logger.debug("DISTILLM_KEEP_FREED_MEMORY=0: malloc keeps its defaults")
        return False
    reason = _reason_to_leave_malloc_alone()
    if reason is not None:
        logger.debug("malloc keeps its defaults: %s", reason)
        return False
    libc = ctypes.CDLL(None)
    mallopt = libc.mallopt
    mallopt.argtypes, mallopt.restype = [ctypes.c_int, ctypes.c_int], ctypes.c_int
    # The trim threshold first: should the second call fail, malloc still maps large blocks as before.
    if mallopt(_M_TRIM_THRESHOLD, _INT_MAX) != 1 or mallopt(_M_MMAP_MAX, 0) != 1:
        logger.warning(
            "glibc refused a malloc setting of DISTILLM_KEEP_FREED_MEMORY: freed memory may still be returned"
        )
        return False
    logger.debug(
        "malloc serves every block from its heap and keeps freed memory (DISTILLM_KEEP_FREED_MEMORY)"
    )
    return True


def _reason_to_leave_malloc_alone() -> str | None:
    """Why :func:`keep_freed_memory` must not touch malloc here, or None."""
    if not sys.platform.startswith("linux"):
        return f"not Linux ({sys.platform})"
    try:
        libc = ctypes.CDLL(None)
        glibc = hasattr(libc, "mallopt") and hasattr(libc, "gnu_get_libc_version")
    except OSError:
        glibc = False
    if not glibc:
        return "not glibc"
    preloaded = os.environ.get("LD_PRELOAD", "")
    if any(name in preloaded for name in ("jemalloc", "tcmalloc", "mimalloc")):
        return f"another allocator is preloaded (LD_PRELOAD={preloaded})"
    chosen = [name for name in _USER_SETTINGS if name in os.environ]
    tunables = os.environ.get("GLIBC_TUNABLES", "")
    chosen += [name for name in _USER_TUNABLES if name in tunables]
    if chosen:
        return f"the user's own malloc settings stand ({', '.join(chosen)})"
    world_size = launched_processes()
    if world_size > 1:
        # Several processes share the machine's memory (and DeepSpeed's CPU paths exist to save it): each
        # keeping its own peak heap costs more there than page faults do.
        return f"one of {world_size} processes (WORLD_SIZE)"
    import torch  # here, not at import: the command line imports this module before torch

    if torch.cuda.is_available():
        return "a CUDA device is present"
    return None
