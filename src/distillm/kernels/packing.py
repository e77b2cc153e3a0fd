"""Packed linear maps for the skinny products of decoding on a CPU: our own kernel, else oneDNN's.

A decoding step multiplies a few rows (the batch) by every weight matrix of the model. For such products
torch's default ``F.linear`` reads the weights at a fraction of the memory bandwidth. :class:`PackedLinears`
runs them through :mod:`distillm.kernels.skinny` (our kernel, which reads the module's weights as they
are) where it is available and the batch is at most :data:`NATIVE_MAX_ROWS` rows, else through oneDNN's
kernels on its own blocked copy of the weights (what ``torch.compile`` uses on CPUs); a call costs a fixed
overhead more, so small maps stay unpacked. ``benchmarks/packed_linear.py`` measures all three.

This is the one module that calls torch's private ``torch.ops.mkldnn`` ops; each use is probed first and a
build that refuses them falls back to the unpacked forward.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence

import torch
from torch import Tensor, nn
from transformers.pytorch_utils import Conv1D

from distillm.kernels import skinny

# The fewest weights a map needs to be packed: where a packed call's fixed overhead and its gain on reading
# the weights break even (benchmarks/README.md, packed_linear.py).
MIN_PACKED_WEIGHTS = 1 << 18
# The most rows a call may have for our kernel: it reads each weight row once for all of them, which beats
# oneDNN's blocked GEMM up to about 16 rows and loses from about 32 (benchmarks/README.md, packed_linear.py).
NATIVE_MAX_ROWS = 16
# The fewest weights a map needs for our kernel: its fixed cost per call (~15 us, twice F.linear's) is
# repaid from about 32K weights on (benchmarks/README.md, packed_linear.py).
MIN_NATIVE_WEIGHTS = 1 << 15


def onednn_packing_available() -> bool:
    """Whether torch has oneDNN's packed-weight linear ops (private ops that torch.compile uses on CPUs)."""
    if not torch.backends.mkldnn.is_available():
        return False
    return all(hasattr(torch.ops.mkldnn, name) for name in ("_reorder_linear_weight", "_linear_pointwise"))


def onednn_bf16_supported() -> bool:
    """Whether oneDNN runs bf16 natively on this CPU (AVX-512 BF16 or AMX); False on a build without oneDNN."""
    try:
        return bool(torch.ops.mkldnn._is_mkldnn_bf16_supported())
    except (AttributeError, RuntimeError):  # a torch build without oneDNN
        return False


def linear_weight(module: nn.Module) -> Tensor | None:
    """The ``[out, in]`` weight of a plain float32 CPU linear map (``nn.Linear``, transformers' ``Conv1D``)."""
    if type(module) is nn.Linear:
        weight = module.weight
    elif type(module) is Conv1D:
        weight = module.weight.t()  # Conv1D computes x @ W + b with W [in, out]
    else:
        return None
    if weight.device.type != "cpu" or weight.dtype != torch.float32:
        return None
    return weight.detach()


def packable(module: nn.Module, min_weights: int = MIN_PACKED_WEIGHTS) -> bool:
    """Whether :class:`PackedLinears` can pack ``module``: a plain float32 CPU map of ``min_weights``+ weights."""
    weight = linear_weight(module)
    return weight is not None and weight.numel() >= min_weights


def pack_weight(weight: Tensor, batch_size: int) -> Tensor:
    """``weight`` ``[out, in]`` copied into oneDNN's blocked layout for inputs of ``batch_size`` rows."""
    return torch.ops.mkldnn._reorder_linear_weight(weight, batch_size)


def packed_linear(inputs: Tensor, packed: Tensor, bias: Tensor | None) -> Tensor:
    """``inputs @ W^T + bias`` ``[..., out]`` through ``W``'s packed copy (:func:`pack_weight`)."""
    return torch.ops.mkldnn._linear_pointwise(inputs, packed, bias, "none", [None], "")


class PackedLinears:
    """Linear maps made ready for decoding: module -> (kind, weight, bias or None), used while gradients are off.

    Two kinds. ``"native"`` (:mod:`distillm.kernels.skinny`, for batches of at most :data:`NATIVE_MAX_ROWS`
    rows where it is available): an ``nn.Linear``'s own contiguous ``[out, in]`` weight, not a copy, so an
    in-place change of it is seen; GPT-2's ``Conv1D`` (which stores ``[in, out]``) and non-contiguous
    weights get a ``[out, in]`` copy, taken by :meth:`pack`. ``"onednn"``: oneDNN's blocked copy of every
    weight, taken by :meth:`pack`. A copy does not see a later change of the weight; a parameter replaced
    rather than changed in place (``module.weight = ...``) is not seen by either kind. Biases are held as
    they are (shared memory). So pack after the weights last changed.
    """

    def __init__(self) -> None:
        self._maps: dict[nn.Module, tuple[str, Tensor, Tensor | None]] = {}
        # Native maps as called (one module, or several of the same input), checked once at their first call.
        self._calls: dict[tuple[nn.Module, ...], skinny.Maps] = {}

    def __len__(self) -> int:
        return len(self._maps)

    def __contains__(self, module: nn.Module) -> bool:
        return module in self._maps

    def clear(self) -> None:
        self._maps.clear()
        self._calls.clear()

    def kind(self, module: nn.Module) -> str | None:
        """``"native"``, ``"onednn"``, or None where ``module`` is not packed."""
        entry = self._maps.get(module)
        return entry[0] if entry is not None else None

    def native(self, module: nn.Module) -> tuple[Tensor, Tensor | None] | None:
        """``(weight [out, in], bias or None)`` that our kernel reads for ``module``, or None where it is not
        packed as the native kind."""
        entry = self._maps.get(module)
        return (entry[1], entry[2]) if entry is not None and entry[0] == "native" else None

    @staticmethod
    def kind_for(batch_size: int) -> str:
        """The kind :meth:`pack` uses for ``batch_size`` rows: ``"native"`` where our kernel runs, else
        ``"onednn"`` (which :meth:`pack` may still find unavailable)."""
        return "native" if batch_size <= NATIVE_MAX_ROWS and skinny.available() else "onednn"

    @staticmethod
    def min_weights(kind: str) -> int:
        """The fewest weights a map needs to be worth packing as ``kind``."""
        return MIN_NATIVE_WEIGHTS if kind == "native" else MIN_PACKED_WEIGHTS

    def pack(self, modules: Iterable[nn.Module], batch_size: int) -> bool:
        """Pack ``modules`` (each :func:`packable`) for inputs of ``batch_size`` rows, after what is packed.

        Our kernel where it is available and ``batch_size <= NATIVE_MAX_ROWS``, else oneDNN's. Returns False,
        with nothing packed, where neither can run (no native kernel for this batch and a torch build
        without oneDNN, or one that refuses its private ops), and under CPU autocast (whose bf16 inputs
        float32 maps refuse).
        """
        if torch.is_autocast_enabled("cpu"):
            return False
        self._calls.clear()  # a module packed again gets a new entry
        if self.kind_for(batch_size) == "native":
            for module in modules:
                weight = linear_weight(module).contiguous()  # Conv1D: [in, out] -> a [out, in] copy
                bias = module.bias.detach() if module.bias is not None else None
                self._maps[module] = ("native", weight, bias)
            return True
        if not onednn_packing_available():
            return False
        for module in modules:
            weight = linear_weight(module)
            bias = module.bias.detach() if module.bias is not None else None
            try:
                packed = pack_weight(weight, batch_size)
                if not self._maps:  # private ops: try the first one before relying on them
                    packed_linear(weight.new_zeros(1, weight.shape[1]), packed, bias)
            except (RuntimeError, TypeError):  # this torch build refuses them: decode unpacked
                self._maps.clear()
                return False
            self._maps[module] = ("onednn", packed, bias)
        return True

    def linear(self, module: nn.Module, inputs: Tensor) -> Tensor:
        """``module(inputs)``, through its packed form when there is one, gradients are off and inputs are float32
        on the CPU (for the native kind: at most :data:`NATIVE_MAX_ROWS` rows; a prompt's forward has more)."""
        entry = self._maps.get(module) if self._maps else None
        if entry is None or not self._usable(inputs):
            return module(inputs)
        kind, weight, bias = entry
        if kind == "native":
            if not self._native_rows(inputs):
                return module(inputs)
            return self._native((module,))(inputs)[0]
        return packed_linear(inputs, weight, bias)

    __call__ = linear

    def many(self, modules: Sequence[nn.Module], inputs: Tensor) -> list[Tensor]:
        """``[module(inputs) for module in modules]``: one call of our kernel where every one is packed for it
        (a layer's query, key and value maps; same bits as separate calls), else :meth:`linear` each."""
        entries = [self._maps.get(module) for module in modules]
        if (
            len(modules) > 1
            and all(entry is not None and entry[0] == "native" for entry in entries)
            and self._usable(inputs)
            and self._native_rows(inputs)
        ):
            return self._native(tuple(modules))(inputs)
        return [self.linear(module, inputs) for module in modules]

    def _native(self, modules: tuple[nn.Module, ...]) -> skinny.Maps:
        call = self._calls.get(modules)
        if call is None:
            entries = [self._maps[module] for module in modules]
            call = self._calls[modules] = skinny.Maps([e[1] for e in entries], [e[2] for e in entries])
        return call

    @staticmethod
    def _usable(inputs: Tensor) -> bool:
        return not torch.is_grad_enabled() and inputs.dtype == torch.float32 and inputs.device.type == "cpu"

    @staticmethod
    def _native_rows(inputs: Tensor) -> bool:
        return inputs.numel() <= NATIVE_MAX_ROWS * inputs.shape[-1]
