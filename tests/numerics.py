"""The suite's tolerance policy: how two floating-point results are compared, written once.

CI runs on whichever x86-64 CPU it is given (AMD EPYC, Intel Xeon with AVX-512 FP16/BF16, ...), and torch and
MKL pick different vectorised kernels on each. A tolerance that one CPU happens to meet is a future red CI, so
every comparison in ``tests/`` falls into one of three kinds:

1. **Exact** (``torch.equal``, ``rtol=0, atol=0``) where equality is a promise: a resumed run against an
   uninterrupted one on the same machine, the same seed giving the same samples, two code paths that run the
   very same operations in the same order (a record kept bit for bit, a reshape of the same computation).

2. **Against float64, relative to an established float32 implementation** (``assert_as_accurate_as``): when
   our computation and an established one (Hugging Face's forward, the plain AdamW loop, the dense loss, one
   process) run the same math through different kernels, neither is "the answer". Both are compared with the
   same math in float64, and ours must be about as accurate as the established one: its largest error is at
   most ``FACTOR`` times the larger of the established one's and one ulp of the largest magnitude.
   A different order of the same float32 operations changes the constant of the rounding error, not its
   order: measured on two kernel sets (ATEN_CPU_CAPABILITY=avx2 and =default) the ratio stays under 2 for
   every tensor of the fast-forward tests; ``FACTOR = 4`` leaves twice that. A real bug (a missing term, a
   wrong position, a dropped gradient) is wrong at the scale of the values, millions of ulps away.

3. **A bound derived from the dtype, the magnitudes and the reduction length** (``rounding_bound``): when the
   float64 reference is not at hand, Higham's bound for a sum of ``n`` terms, ``gamma_n * sum |terms|`` with
   ``gamma_n = n u / (1 - n u)`` and ``u`` the unit roundoff of the dtype (half its machine epsilon), bounds
   how far any summation order can be from the exact sum; two orders are at most twice that apart.

Whole training runs (several processes against one) have no float64 twin and Adam amplifies rounding, so
tests/test_distributed.py measures them against a one-process run of the same steps split another way (the
distance rounding alone makes on this machine, times ``FACTOR``), with the bounds measured on one CPU as a floor.
Sampling tests compare frequencies with a tolerance from the sample size (standard errors), not from rounding.
"""

from __future__ import annotations

import torch

FACTOR = 4.0


def unit_roundoff(dtype: torch.dtype) -> float:
    """Half the machine epsilon: the largest relative error of rounding one real number to ``dtype``."""
    return torch.finfo(dtype).eps / 2


def gamma(n: int, dtype: torch.dtype) -> float:
    """Higham's ``gamma_n = n u / (1 - n u)``: the relative error bound of ``n`` chained roundings."""
    nu = n * unit_roundoff(dtype)
    if nu >= 1:
        raise ValueError(f"gamma_{n} is unbounded in {dtype}: n * u = {nu} >= 1")
    return nu / (1 - nu)


def rounding_bound(dtype: torch.dtype, length: int, magnitude: float) -> float:
    """How far two summation orders of ``length`` terms whose absolute values sum to ``magnitude`` can be apart.

    Each order is within ``gamma_length * magnitude`` of the exact sum, so two orders are within twice that.
    """
    return 2 * gamma(length, dtype) * magnitude


def max_error(actual: torch.Tensor, reference: torch.Tensor) -> float:
    return (
        float((actual.detach().double() - reference.detach().double()).abs().max()) if actual.numel() else 0.0
    )


def assert_as_accurate_as(
    actual: torch.Tensor,
    baseline: torch.Tensor,
    reference: torch.Tensor,
    *,
    factor: float = FACTOR,
    precision: torch.dtype | None = None,
    msg: str = "",
) -> None:
    """``actual`` (ours) is about as close to the float64 ``reference`` as ``baseline`` (established) is.

    ``actual`` and ``baseline`` are the same quantity computed in the same low precision by two implementations;
    ``reference`` is it computed in float64. Passes when ``max|actual - reference|`` is at most ``factor`` times
    ``max(max|baseline - reference|, eps * max|reference|)``, with ``eps`` that of the baseline's dtype: the floor of
    one ulp at the largest magnitude keeps a baseline that happens to be exact from demanding more than the dtype
    can hold. ``precision``: the dtype the computation's intermediates were rounded to when it is coarser than the
    result's (bf16 logits summed into a float32 loss); one ulp of it at the largest magnitude is then allowed too.
    """
    assert actual.shape == baseline.shape == reference.shape, (
        msg,
        actual.shape,
        baseline.shape,
        reference.shape,
    )
    assert reference.dtype == torch.float64, f"{msg}: the reference must be float64, got {reference.dtype}"
    scale = float(reference.abs().max()) if reference.numel() else 0.0
    ulp = torch.finfo(baseline.dtype).eps * scale
    baseline_error = max_error(baseline, reference)
    allowed = factor * max(baseline_error, ulp)
    if precision is not None:
        allowed = max(allowed, torch.finfo(precision).eps * scale)
    error = max_error(actual, reference)
    assert error <= allowed, (
        f"{msg}: largest error against float64 {error:.3e} exceeds the allowed {allowed:.3e} ({factor} x the "
        f"established implementation's {baseline_error:.3e}, one ulp at the largest magnitude: {ulp:.3e})"
    )
