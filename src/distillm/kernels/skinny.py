"""Our own float32 linear map for decoding-sized inputs (a few rows) on x86 CPUs with AVX2 and FMA.

A decoding step multiplies a few rows by every weight matrix of the model, so its floor is the time to read
the weights once. torch's CPU kernels for such skinny products (MKL's and oneDNN's, packed or not) read them
at about half the machine's memory bandwidth; ``skinny.c`` streams each weight row once, prefetched, into all
input rows at a time, and gets close to the bandwidth (``benchmarks/packed_linear.py``, benchmarks/README.md).
It reads a ``[out, in]`` weight as it is (``nn.Linear``'s, without a copy).

The C file is compiled at first use with the system's C compiler (``$CC``, else ``cc``) into a cache folder
(``$DISTILLM_KERNEL_CACHE``, else ``$XDG_CACHE_HOME/distillm/kernels``, else ``~/.cache/distillm/kernels``),
once per source and compiler, and loaded with ctypes. Where it cannot be had (no compiler, another CPU
architecture, a CPU without AVX2/FMA, or ``DISTILLM_NATIVE_KERNELS=0``) :func:`available` is False, the
reason is logged once (WARNING where a build or load failed, INFO otherwise), and callers use torch's kernels.
"""

from __future__ import annotations

import ctypes
import hashlib
import logging
import os
import platform
import shlex
import shutil
import subprocess
import tempfile
from functools import cache
from pathlib import Path

import torch
from torch import Tensor

from distillm.environment import switched_on

logger = logging.getLogger(__name__)

SOURCE = Path(__file__).with_name("skinny.c")
FLAGS = ("-O3", "-fPIC", "-shared", "-fopenmp")


def cache_dir() -> Path:
    explicit = os.environ.get("DISTILLM_KERNEL_CACHE")
    if explicit:
        return Path(explicit)
    base = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(base) / "distillm" / "kernels"


def _compiler() -> list[str] | None:
    """The C compiler's command line: ``$CC`` (which may carry arguments, e.g. ``ccache gcc``), else cc/gcc."""
    explicit = os.environ.get("CC")
    if explicit:
        return shlex.split(explicit)
    found = shutil.which("cc") or shutil.which("gcc")
    return [found] if found else None


def _build(compiler: list[str], rebuild: bool = False) -> Path:
    """The compiled library for this source and compiler: built now (atomically) unless the cache has it."""
    source = SOURCE.read_bytes()
    version = subprocess.run([*compiler, "--version"], capture_output=True, text=True, timeout=60).stdout
    key = hashlib.sha256(source + " ".join(FLAGS).encode() + version.encode()).hexdigest()[:16]
    folder = cache_dir()
    library = folder / f"skinny-{key}.so"
    if library.is_file() and not rebuild:
        return library
    try:
        folder.mkdir(parents=True, exist_ok=True)
        # Compile into a temporary name and rename: a concurrent process (torchrun) or a killed build never
        # leaves a half-written library under the final name.
        handle, partial = tempfile.mkstemp(dir=folder, prefix=library.stem, suffix=".partial")
    except OSError as error:
        raise RuntimeError(
            f"cannot write the kernel cache {folder} ({error}); point DISTILLM_KERNEL_CACHE at a writable folder"
        ) from error
    os.close(handle)
    try:
        done = subprocess.run(
            [*compiler, *FLAGS, str(SOURCE), "-o", partial], capture_output=True, text=True, timeout=300
        )
        if done.returncode != 0:
            raise RuntimeError(
                f"{' '.join(compiler)} failed on {SOURCE} (it needs OpenMP: with clang install libomp, or set "
                f"CC=gcc): {done.stderr.strip()[-2000:]}"
            )
        os.replace(partial, library)
    finally:
        if os.path.exists(partial):
            os.remove(partial)
    # Libraries of other versions of the source or compiler are not used again: remove them (a process
    # that still has one loaded keeps its mapping).
    for stale in folder.glob("skinny-*.so"):
        if stale != library:
            stale.unlink(missing_ok=True)
    return library


@cache
def _library() -> ctypes.CDLL | None:
    """The loaded kernel library, or None (the reason logged once: at WARNING where building or loading
    failed, at INFO where this machine cannot have it or it was turned off)."""
    if not switched_on("DISTILLM_NATIVE_KERNELS", "the kernel stays on", logger):
        logger.info("native kernels off (DISTILLM_NATIVE_KERNELS=0): decoding uses torch's linear maps")
        return None
    if platform.machine().lower() not in ("x86_64", "amd64"):
        logger.info("no native decoding kernel for %s CPUs: decoding uses torch's", platform.machine())
        return None
    compiler = _compiler()
    if compiler is None:
        logger.warning(
            "no C compiler for the native decoding kernel (install cc/gcc or set CC; DISTILLM_NATIVE_KERNELS=0 "
            "silences this): decoding uses torch's slower linear maps"
        )
        return None
    try:
        try:
            library = ctypes.CDLL(str(_build(compiler)))
        except OSError:  # a cached library that does not load (truncated, another libc): build it again once
            library = ctypes.CDLL(str(_build(compiler, rebuild=True)))
    except (OSError, RuntimeError, subprocess.SubprocessError) as error:
        logger.warning(
            "the native decoding kernel is unavailable (%s): decoding uses torch's linear maps "
            "(DISTILLM_NATIVE_KERNELS=0 silences this)",
            error,
        )
        return None
    if not library.distillm_skinny_supported():
        logger.info("this CPU lacks AVX2/FMA: decoding uses torch's linear maps")
        return None
    library.distillm_skinny_linear.restype = None
    library.distillm_skinny_linear.argtypes = [
        ctypes.c_void_p,  # x
        ctypes.c_int64,  # rows
        ctypes.c_int64,  # in
        ctypes.c_void_p,  # w
        ctypes.c_int64,  # out features
        ctypes.c_void_p,  # bias or NULL
        ctypes.c_void_p,  # out
        ctypes.c_int,  # threads
    ]
    return library


def available() -> bool:
    """Whether :func:`skinny_linear` can run here (built, loaded, and this CPU has AVX2 and FMA)."""
    return _library() is not None


def supports(weight: Tensor) -> bool:
    """Whether ``weight`` ``[out, in]`` is one :func:`skinny_linear` takes: float32, on the CPU, contiguous."""
    return weight.device.type == "cpu" and weight.dtype == torch.float32 and weight.is_contiguous()


def skinny_linear(inputs: Tensor, weight: Tensor, bias: Tensor | None = None) -> Tensor:
    """``inputs @ weight.T + bias``, ``[..., out]``, for float32 CPU tensors (``weight`` as :func:`supports`).

    Needs :func:`available`. Meant for a few rows (decoding); any number works. No autograd: tensors that
    require gradients are refused while gradients are on. A row's result does not depend on the other rows.
    """
    library = _library()
    if library is None:
        raise RuntimeError("the native decoding kernel is unavailable here; check skinny.available() first")
    out_features, in_features = weight.shape
    if (
        inputs.shape[-1] != in_features
        or inputs.dtype != torch.float32
        or inputs.device.type != "cpu"
        or not supports(weight)
    ):
        raise ValueError(
            f"skinny_linear takes float32 CPU inputs [..., {in_features}] and a contiguous float32 weight; got "
            f"inputs {tuple(inputs.shape)} {inputs.dtype} on {inputs.device}, weight {tuple(weight.shape)} "
            f"{weight.dtype} on {weight.device}"
        )
    if bias is not None and (
        bias.dtype != torch.float32 or bias.shape != (out_features,) or bias.device.type != "cpu"
    ):
        raise ValueError(
            f"bias must be float32 [{out_features}] on the CPU; got {tuple(bias.shape)} {bias.dtype} on {bias.device}"
        )
    if torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in (inputs, weight, bias)):
        raise ValueError("skinny_linear has no autograd: call it under torch.no_grad() or inference_mode()")
    flat = inputs.reshape(-1, in_features).contiguous()
    bias = bias.contiguous() if bias is not None else None  # held here while the C function reads it
    out = torch.empty(flat.shape[0], out_features, dtype=torch.float32)
    library.distillm_skinny_linear(
        flat.data_ptr(),
        flat.shape[0],
        in_features,
        weight.data_ptr(),
        out_features,
        bias.data_ptr() if bias is not None else None,
        out.data_ptr(),
        torch.get_num_threads(),
    )
    return out.view(*inputs.shape[:-1], out_features)
