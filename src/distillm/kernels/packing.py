"""oneDNN's packed-weight linear maps, for the skinny products of decoding on a CPU.

A decoding step multiplies a few rows (the batch) by every weight matrix of the model. For such products
oneDNN's kernels on its own blocked weight layout (what ``torch.compile`` uses on CPUs) beat the default
``F.linear`` once the weights no longer fit in the cache; a packed call costs a fixed overhead more, so small
maps stay unpacked. ``benchmarks/packed_linear.py`` measures both (benchmarks/README.md).

This is the one module that calls torch's private ``torch.ops.mkldnn`` ops; each use is probed first and a
build that refuses them falls back to the unpacked forward.
"""

from __future__ import annotations

from collections.abc import Iterable

import torch
from torch import Tensor, nn
from transformers.pytorch_utils import Conv1D

# The fewest weights a map needs to be packed: where a packed call's fixed overhead and its gain on reading
# the weights break even (benchmarks/README.md, packed_linear.py).
MIN_PACKED_WEIGHTS = 1 << 18


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
    """Packed copies of linear maps: module -> (oneDNN weight, bias or None), used while gradients are off.

    The copies are a second copy of the weights, taken by :meth:`pack`: a later change of a module's weights
    is not seen until it is packed again.
    """

    def __init__(self) -> None:
        self._maps: dict[nn.Module, tuple[Tensor, Tensor | None]] = {}

    def __len__(self) -> int:
        return len(self._maps)

    def __contains__(self, module: nn.Module) -> bool:
        return module in self._maps

    def clear(self) -> None:
        self._maps.clear()

    def pack(self, modules: Iterable[nn.Module], batch_size: int) -> bool:
        """Pack ``modules`` (each :func:`packable`) for inputs of ``batch_size`` rows, after what is packed.

        Returns False, with nothing packed, where this torch build has no oneDNN or refuses its private ops,
        and under CPU autocast (whose bf16 inputs the float32 packed maps refuse).
        """
        if not onednn_packing_available() or torch.is_autocast_enabled("cpu"):
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
            self._maps[module] = (packed, bias)
        return True

    def linear(self, module: nn.Module, inputs: Tensor) -> Tensor:
        """``module(inputs)``, through its packed copy when there is one, gradients are off and inputs float32."""
        packed = self._maps.get(module) if self._maps else None
        if packed is None or torch.is_grad_enabled() or inputs.dtype != torch.float32:
            return module(inputs)
        return packed_linear(inputs, packed[0], packed[1])
