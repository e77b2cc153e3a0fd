"""The divergence test cases, read from the registry: each registered divergence at its hyper-parameters'
defaults and, one hyper-parameter at a time, at one other value of its range.

A new divergence needs nothing here; a new hyper-parameter may name its other test value in OTHER_VALUES
(else the midpoint between its default and the top of its range is used).
"""

from __future__ import annotations

import math
from collections.abc import Callable
from functools import partial

from distillm.losses import DIVERGENCES, Divergence, HyperParameter

OTHER_VALUES = {"skew_alpha": 0.7, "jsd_beta": 0.1}  # the values the cases used before the registry


def _other_value(parameter: HyperParameter) -> float:
    if parameter.key in OTHER_VALUES:
        return OTHER_VALUES[parameter.key]
    high = parameter.high if math.isfinite(parameter.high) else parameter.default + 2.0
    return (parameter.default + high) / 2


def hyper_parameter_values(divergence: Divergence) -> list[dict[str, float]]:
    """The hyper-parameter settings to test ``divergence`` at, by argument name ([{}] without any)."""
    defaults = {parameter.argument: parameter.default for parameter in divergence.parameters}
    settings = [defaults]
    for parameter in divergence.parameters:
        settings.append({**defaults, parameter.argument: _other_value(parameter)})
    return settings


def cases(closed_form_only: bool = False) -> list[tuple[str, Divergence, dict[str, float]]]:
    """``(id, divergence, hyper-parameters)`` for every registered divergence and setting."""
    out = []
    for name, divergence in DIVERGENCES.items():
        if closed_form_only and divergence.closed_form is None:
            continue
        for values in hyper_parameter_values(divergence):
            label = " ".join([name, *(f"{argument}={value:g}" for argument, value in values.items())])
            out.append((label, divergence, values))
    return out


def bound(function: Callable, values: dict[str, float]) -> Callable:
    """``function`` with the hyper-parameters ``values`` bound by keyword."""
    return partial(function, **values) if values else function
