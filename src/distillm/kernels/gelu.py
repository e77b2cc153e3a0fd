"""The tanh-approximated GELU computed as x * sigmoid(2z), and the swap of a model's tanh-GELU modules for it.

``torch.tanh`` is slow in torch's CPU build and ``torch.sigmoid`` is not, so on a CPU the same function in
the sigmoid form is faster in the forward; ``benchmarks/gelu.py`` measures it (benchmarks/README.md, section
``gelu.py``, also for when it loses: small tensors and cores shared with other jobs).
"""

from __future__ import annotations

import math

import torch
from torch import Tensor, nn
from transformers.activations import FastGELUActivation, GELUTanh, NewGELUActivation

# The tanh-GELU's argument z = sqrt(2/pi) (x + 0.044715 x^3), doubled: 2z = x (LINEAR + CUBIC x^2).
_TWO_Z_LINEAR = 2 * math.sqrt(2 / math.pi)
_TWO_Z_CUBIC = _TWO_Z_LINEAR * 0.044715


def tanh_gelu_as_sigmoid(x: Tensor) -> Tensor:
    """The tanh-approximated GELU 0.5 x (1 + tanh(z)), computed as x * sigmoid(2z).

    z = sqrt(2/pi) (x + 0.044715 x^3); the two are equal because 0.5 (1 + tanh(z)) = sigmoid(2z). No
    autograd of its own (it works in place on a temporary): ``SigmoidTanhGELU`` adds the backward.
    """
    # Four kernels (each a pass over x, and a thread sync): LINEAR + CUBIC x^2 in one addcmul, then in place.
    two_z = torch.addcmul(x.new_full((), _TWO_Z_LINEAR), x, x, value=_TWO_Z_CUBIC).mul_(x)
    return two_z.sigmoid_().mul_(x)


class _SigmoidTanhGELUFunction(torch.autograd.Function):
    """Forward in the sigmoid form; backward is torch's own tanh-GELU backward, which needs only x (saved)."""

    @staticmethod
    def forward(ctx, x: Tensor) -> Tensor:
        ctx.save_for_backward(x)
        return tanh_gelu_as_sigmoid(x)

    @staticmethod
    def backward(ctx, grad_output: Tensor) -> Tensor:
        (x,) = ctx.saved_tensors
        # aten's backward, not one in the sigmoid form: that one was slower (benchmarks/README.md, gelu.py).
        # Under create_graph autograd records this call too, so double backward is aten's, and correct.
        return torch.ops.aten.gelu_backward(grad_output, x, approximate="tanh")


class SigmoidTanhGELU(nn.Module):
    """The tanh-approximated GELU (GPT-2's ``gelu_new``), a drop-in for ``F.gelu(x, approximate="tanh")``.

    On a CPU, for float32/float64 inputs (of any size), the forward runs in the sigmoid form
    (``tanh_gelu_as_sigmoid``): ``torch.tanh`` is slow in torch's CPU build, ``sigmoid`` is not
    (``benchmarks/gelu.py``). Its absolute error against a float64 reference is float32 rounding (5.2e-7 on
    [-20, 20]; torch's kernel 4.3e-7), and in the negative tail it is the more accurate (x = -5: relative
    error 4e-7, torch's fp32 kernel 30%, as its 1 + tanh(z) cancels). Everything else (CUDA, bf16/fp16)
    calls ``F.gelu(x, approximate="tanh")``: bf16 would round each step of the form, where torch's kernel
    computes in fp32. The backward (and double backward) is torch's ``gelu_backward``; with no grad needed
    (``no_grad``, or an input that needs none) nothing is saved. Edge values as ``F.gelu``: +inf -> +inf,
    -inf -> NaN, -0.0 -> -0.0, large negative x -> -0.0.
    """

    def forward(self, x: Tensor) -> Tensor:
        # No size threshold, though F.gelu is faster on small tensors (benchmarks/README.md, gelu.py): the
        # path must not depend on the batch shape (2 processes x batch 2 should compute what 1 x batch 4 does).
        if x.device.type != "cpu" or x.dtype not in (torch.float32, torch.float64):
            return nn.functional.gelu(x, approximate="tanh")
        if torch.is_grad_enabled() and x.requires_grad:
            return _SigmoidTanhGELUFunction.apply(x)
        return tanh_gelu_as_sigmoid(x)


def fuse_tanh_gelu(model: nn.Module) -> int:
    """Swap every tanh-GELU activation module for ``SigmoidTanhGELU``; returns how many.

    Covers transformers' ``NewGELUActivation`` (``gelu_new``, GPT-2), ``FastGELUActivation`` (``gelu_fast``)
    and ``GELUTanh`` (alias ``PytorchGELUTanh``: ``gelu_pytorch_tanh`` and ``gelu_python_tanh``). All compute
    0.5 x (1 + tanh(sqrt(2/pi) (x + 0.044715 x^3))): ``gelu_new`` as a chain of five or six elementwise ops
    (as many passes over the [B, T, 4H] activations and saved tensors), ``GELUTanh`` as torch's fused kernel,
    whose tanh is slow on CPU. ``SigmoidTanhGELU`` computes the same function in the sigmoid form
    (``benchmarks/gelu.py`` times the three). Outputs and gradients agree with transformers' modules to float
    rounding (``tests/test_model_families.py``). Only the modules change; ``config.activation_function`` is
    left as it is, so a saved model is unchanged.
    """
    swapped = 0
    for parent in list(model.modules()):
        for name, child in list(parent.named_children()):
            if type(child) in (NewGELUActivation, FastGELUActivation, GELUTanh):
                setattr(parent, name, SigmoidTanhGELU())
                swapped += 1
    return swapped
