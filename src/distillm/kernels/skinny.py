"""Our own float32 linear maps for decoding-sized inputs (a few rows) on x86 CPUs with AVX2 and FMA.

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

On a CPU with AVX-512 the kernel takes its AVX-512 path (:func:`instruction_set`), which gives the same bits
as the AVX2 path with about half the instructions: each output is summed in the same order on both, so the
path a CPU takes never changes what is sampled. :func:`skinny_linears` and :class:`Maps` run several maps of
the same input (a layer's query, key and value maps) in one call.
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
from collections.abc import Sequence
from functools import cache
from pathlib import Path

import torch
from torch import Tensor

from distillm.environment import switched_on

logger = logging.getLogger(__name__)

SOURCE = Path(__file__).with_name("skinny.c")
FLAGS = ("-O3", "-fPIC", "-shared", "-fopenmp")
LIBRARIES = ("-lm",)  # after the source: a linker that drops unneeded libraries keeps the ones it needs


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
    key = hashlib.sha256(source + " ".join(FLAGS + LIBRARIES).encode() + version.encode()).hexdigest()[:16]
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
            [*compiler, *FLAGS, str(SOURCE), "-o", partial, *LIBRARIES],
            capture_output=True,
            text=True,
            timeout=300,
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


class _LayerSpec(ctypes.Structure):
    """skinny.c's ``decode_layer_t``."""

    _fields_ = [
        ("hidden", ctypes.c_int64),
        ("heads", ctypes.c_int64),
        ("kv_heads", ctypes.c_int64),
        ("head_dim", ctypes.c_int64),
        ("inner", ctypes.c_int64),
        ("norm1", ctypes.c_void_p),
        ("norm2", ctypes.c_void_p),
        ("eps1", ctypes.c_double),
        ("eps2", ctypes.c_double),
        ("w", ctypes.c_void_p * 7),
        ("b", ctypes.c_void_p * 7),
        ("scaling", ctypes.c_double),
    ]


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
    library.distillm_skinny_maps.restype = ctypes.c_int
    library.distillm_skinny_maps.argtypes = [
        ctypes.c_void_p,  # x
        ctypes.c_int64,  # rows
        ctypes.c_int64,  # in
        ctypes.c_int,  # maps
        ctypes.c_void_p,  # weights: const float *[maps]
        ctypes.c_void_p,  # out features: int64 [maps]
        ctypes.c_void_p,  # biases: const float *[maps], NULL for none
        ctypes.c_void_p,  # outputs: float *[maps]
        ctypes.c_int,  # threads
        ctypes.c_int,  # 1: the AVX-512 path
    ]
    library.distillm_decode_layer.restype = ctypes.c_int
    library.distillm_decode_layer.argtypes = [
        ctypes.POINTER(_LayerSpec),
        ctypes.c_void_p,  # hidden [rows, hidden], updated in place
        ctypes.c_int64,  # rows
        ctypes.c_void_p,  # cos [rows, head_dim]
        ctypes.c_void_p,  # sin
        ctypes.c_void_p,  # cached keys [rows, kv heads, capacity, head_dim]
        ctypes.c_void_p,  # cached values
        ctypes.c_int64,  # capacity
        ctypes.c_int64,  # length: positions already cached
        ctypes.c_void_p,  # key mask [rows, capacity] (bool), NULL for none
        ctypes.c_int,  # threads
        ctypes.c_int,  # 1: the AVX-512 path
    ]
    library.distillm_skinny_wide.restype = ctypes.c_int
    library.wide = bool(library.distillm_skinny_wide())  # read once: a call per map would cost ~1 us
    return library


def _loaded() -> ctypes.CDLL:
    """The loaded kernel library; a RuntimeError where it is unavailable."""
    library = _library()
    if library is None:
        raise RuntimeError("the native decoding kernel is unavailable here; check skinny.available() first")
    return library


def available() -> bool:
    """Whether :func:`skinny_linear` can run here (built, loaded, and this CPU has AVX2 and FMA)."""
    return _library() is not None


def instruction_set() -> str | None:
    """The path :func:`skinny_linear` takes here: ``"avx512"`` (a CPU with AVX-512F), ``"avx2"``, or None
    where the kernel is unavailable. Both give the same bits."""
    library = _library()
    if library is None:
        return None
    return "avx512" if library.wide else "avx2"


def supports(weight: Tensor) -> bool:
    """Whether ``weight`` ``[out, in]`` is one :func:`skinny_linear` takes: float32, on the CPU, contiguous."""
    return weight.device.type == "cpu" and weight.dtype == torch.float32 and weight.is_contiguous()


def skinny_linear(
    inputs: Tensor, weight: Tensor, bias: Tensor | None = None, *, avx512: bool | None = None
) -> Tensor:
    """``inputs @ weight.T + bias``, ``[..., out]``, for float32 CPU tensors (``weight`` as :func:`supports`).

    Needs :func:`available`. Meant for a few rows (decoding); any number works. No autograd: tensors that
    require gradients are refused while gradients are on. A row's result does not depend on the other rows.
    ``avx512``: None takes the AVX-512 path where this CPU has it; False the AVX2 path (same bits; for tests
    and benchmarks); True requires the AVX-512 path.
    """
    return skinny_linears(inputs, [weight], [bias], avx512=avx512)[0]


def skinny_linears(
    inputs: Tensor,
    weights: Sequence[Tensor],
    biases: Sequence[Tensor | None] | None = None,
    *,
    avx512: bool | None = None,
) -> list[Tensor]:
    """``[skinny_linear(inputs, w, b) for w, b in zip(weights, biases)]`` in one call of the kernel, the
    maps' weight rows split among the threads together (a layer's query, key and value maps: one call
    instead of three, and the threads' shares even). Same bits as the separate calls."""
    return Maps(weights, biases)(inputs, avx512=avx512)


class Maps:
    """Linear maps of the same inputs, checked once and then called for each decoding step: ``maps(inputs)``
    is :func:`skinny_linears` ``(inputs, weights, biases)`` at a fraction of its fixed cost (~5 us a call
    instead of ~20). Holds the tensors (an in-place change of a weight is seen, as by :func:`skinny_linear`)."""

    def __init__(self, weights: Sequence[Tensor], biases: Sequence[Tensor | None] | None = None):
        library = _loaded()
        weights = list(weights)
        biases = list(biases) if biases is not None else [None] * len(weights)
        if not weights or len(biases) != len(weights):
            raise ValueError(
                f"skinny_linears takes one or more weights and as many biases; got {len(weights)} and {len(biases)}"
            )
        self.in_features = weights[0].shape[-1]
        for weight, bias in zip(weights, biases):
            if weight.dim() != 2 or weight.shape[1] != self.in_features or not supports(weight):
                raise ValueError(
                    f"skinny_linear takes contiguous float32 CPU weights [out, {self.in_features}]; got "
                    f"{tuple(weight.shape)} {weight.dtype} on {weight.device}"
                    + ("" if weight.is_contiguous() else " (not contiguous)")
                )
            if bias is not None and (
                bias.dtype != torch.float32 or bias.shape != (weight.shape[0],) or bias.device.type != "cpu"
            ):
                raise ValueError(
                    f"bias must be float32 [{weight.shape[0]}] on the CPU; got {tuple(bias.shape)} {bias.dtype} "
                    f"on {bias.device}"
                )
        self._library = library
        # Held here while this object is: the C function reads them through the pointers below.
        self._weights = weights
        self._biases = [b.contiguous() if b is not None else None for b in biases]
        self._trainable = any(t is not None and t.requires_grad for t in (*self._weights, *self._biases))
        count = len(weights)
        self.out_features = [w.shape[0] for w in weights]
        self._weight_ptrs = (ctypes.c_void_p * count)(*(w.data_ptr() for w in weights))
        self._out_features = (ctypes.c_int64 * count)(*self.out_features)
        self._bias_ptrs = (ctypes.c_void_p * count)(
            *(b.data_ptr() if b is not None else None for b in self._biases)
        )

    def __call__(self, inputs: Tensor, *, avx512: bool | None = None) -> list[Tensor]:
        """The maps of ``inputs`` ``[..., in]``: one ``[..., out]`` tensor a map. ``avx512`` as in
        :func:`skinny_linear`."""
        if (
            inputs.shape[-1] != self.in_features
            or inputs.dtype != torch.float32
            or inputs.device.type != "cpu"
        ):
            raise ValueError(
                f"skinny_linear takes float32 CPU inputs [..., {self.in_features}]; got inputs "
                f"{tuple(inputs.shape)} {inputs.dtype} on {inputs.device}, weight "
                + ", ".join(str((out, self.in_features)) for out in self.out_features)
            )
        if torch.is_grad_enabled() and (self._trainable or inputs.requires_grad):
            raise ValueError(
                "skinny_linear has no autograd: call it under torch.no_grad() or inference_mode()"
            )
        wide = self._library.wide
        if avx512 is not None:
            if avx512 and not wide:
                raise ValueError("this CPU lacks AVX-512F: call skinny_linear with avx512=None or False")
            wide = avx512
        flat = inputs.reshape(-1, self.in_features).contiguous()
        rows = flat.shape[0]
        outs = [torch.empty(rows, out, dtype=torch.float32) for out in self.out_features]
        out_ptrs = (ctypes.c_void_p * len(outs))(
            *(o.data_ptr() for o in outs)
        )  # named until the call returns
        failed = self._library.distillm_skinny_maps(
            flat.data_ptr(),
            rows,
            self.in_features,
            len(outs),
            self._weight_ptrs,
            self._out_features,
            self._bias_ptrs,
            out_ptrs,
            torch.get_num_threads(),
            int(wide),
        )
        if failed:
            raise MemoryError(f"skinny_linear: no memory for the AVX-512 path's copy of {rows} input rows")
        return [out.view(*inputs.shape[:-1], out.shape[1]) for out in outs]


class DecodeLayer:
    """A whole decoding step of one Llama-layout layer (Llama, Mistral, Qwen2) in one call of the kernel.

    RMS norm, the query/key/value maps, the rotary embedding, the step's keys and values written into the
    cache, attention over the cached positions (grouped keys/values, a key mask), the output map and
    residual, RMS norm, the gated SiLU MLP and residual: what ``FastDecoder`` otherwise runs as some 45 torch
    operations a layer, each with a fixed cost of microseconds that a step of a small model adds up to
    milliseconds (docs/generation.md, point 6). Rounds differently from the torch operations (the norms' and
    the softmax's sums in double, the exponentials from the C library), about as accurately:
    ``tests/test_kernels.py`` holds it and the same formulas as torch operations to a float64 reference,
    ``tests/test_fast_forward.py`` the decoded logits to the Hugging Face forward's.

    ``weights`` / ``biases``: q, k, v, o, gate, up, down (``[out, in]`` float32, as :class:`Maps`); ``norms``:
    the two RMS norms' weights ``[hidden]`` and their epsilons. Holds the tensors (an in-place change is seen).
    """

    def __init__(
        self,
        weights: Sequence[Tensor],
        biases: Sequence[Tensor | None],
        norms: tuple[Tensor, float, Tensor, float],
        heads: int,
        kv_heads: int,
        head_dim: int,
        scaling: float,
    ):
        library = _loaded()
        norm1, eps1, norm2, eps2 = norms
        hidden, inner = norm1.shape[0], weights[4].shape[0]
        shapes = [
            (heads * head_dim, hidden),
            (kv_heads * head_dim, hidden),
            (kv_heads * head_dim, hidden),
            (hidden, heads * head_dim),
            (inner, hidden),
            (inner, hidden),
            (hidden, inner),
        ]
        problems = [
            f"map {i}: {tuple(w.shape)} {w.dtype}, expected {shape} float32 contiguous"
            for i, (w, shape) in enumerate(zip(weights, shapes, strict=True))
            if tuple(w.shape) != shape or not supports(w)
        ]
        problems += [
            f"bias {i}: {tuple(b.shape)} {b.dtype}, expected ({shape[0]},) float32"
            for i, (b, shape) in enumerate(zip(biases, shapes, strict=True))
            if b is not None and (tuple(b.shape) != (shape[0],) or not supports(b))
        ]
        problems += [
            f"norm weight {tuple(n.shape)} {n.dtype}, expected ({hidden},) float32"
            for n in (norm1, norm2)
            if tuple(n.shape) != (hidden,) or not supports(n)
        ]
        if heads % kv_heads or head_dim % 2:
            problems.append(f"{heads} query heads over {kv_heads} key/value heads of dimension {head_dim}")
        if problems:
            raise ValueError("DecodeLayer: " + "; ".join(problems))
        self._library = library
        self._tensors = [
            *weights,
            *(b for b in biases if b is not None),
            norm1,
            norm2,
        ]  # held for the pointers
        self.hidden, self.heads, self.kv_heads, self.head_dim = hidden, heads, kv_heads, head_dim
        self._spec = _LayerSpec(
            hidden,
            heads,
            kv_heads,
            head_dim,
            inner,
            norm1.data_ptr(),
            norm2.data_ptr(),
            eps1,
            eps2,
            (ctypes.c_void_p * 7)(*(w.data_ptr() for w in weights)),
            (ctypes.c_void_p * 7)(*(b.data_ptr() if b is not None else None for b in biases)),
            scaling,
        )
        self._pointer = ctypes.pointer(self._spec)

    def __call__(
        self,
        hidden: Tensor,
        cos: Tensor,
        sin: Tensor,
        keys: Tensor,
        values: Tensor,
        length: int,
        key_mask: Tensor | None = None,
    ) -> None:
        """The layer's step, in place on ``hidden`` ``[B, hidden]`` (float32, contiguous): the rotary
        embedding ``cos`` / ``sin`` ``[B, head_dim]`` at each row's position; ``keys`` / ``values``
        ``[B, kv heads, capacity, head_dim]`` (contiguous), positions ``[0, length)`` filled, this step's
        written at ``length``; ``key_mask`` ``[B, capacity]`` boolean (True = attend) or None: it masks the
        cached positions, never the step's own. No autograd."""
        batch, capacity = hidden.shape[0], keys.shape[2]
        expected = {
            "hidden": (hidden, (batch, self.hidden)),
            "cos": (cos, (batch, self.head_dim)),
            "sin": (sin, (batch, self.head_dim)),
            "keys": (keys, (batch, self.kv_heads, capacity, self.head_dim)),
            "values": (values, (batch, self.kv_heads, capacity, self.head_dim)),
        }
        for name, (tensor, shape) in expected.items():
            if tuple(tensor.shape) != shape or not supports(tensor):
                raise ValueError(
                    f"DecodeLayer: {name} is {tuple(tensor.shape)} {tensor.dtype}"
                    f"{'' if tensor.is_contiguous() else ' (not contiguous)'}; expected {shape} float32 "
                    "contiguous on the CPU"
                )
        if key_mask is not None and (
            key_mask.dtype != torch.bool
            or tuple(key_mask.shape) != (batch, capacity)
            or not key_mask.is_contiguous()
            or key_mask.device.type != "cpu"
        ):
            raise ValueError(
                f"DecodeLayer: key_mask is {tuple(key_mask.shape)} {key_mask.dtype} on {key_mask.device}; expected "
                f"({batch}, {capacity}) bool contiguous on the CPU"
            )
        if not 0 <= length < capacity:
            raise ValueError(
                f"DecodeLayer: length {length} leaves no room in a cache of {capacity} positions"
            )
        if torch.is_grad_enabled() and hidden.requires_grad:
            raise ValueError("DecodeLayer has no autograd: call it under torch.no_grad() or inference_mode()")
        failed = self._library.distillm_decode_layer(
            self._pointer,
            hidden.data_ptr(),
            batch,
            cos.data_ptr(),
            sin.data_ptr(),
            keys.data_ptr(),
            values.data_ptr(),
            capacity,
            length,
            key_mask.data_ptr() if key_mask is not None else None,
            torch.get_num_threads(),
            int(self._library.wide),
        )
        if failed:
            raise MemoryError(f"DecodeLayer: no memory for a decoding step of {batch} rows")
