"""Distillation losses: per-token divergences, masked reductions, and the chunked memory-efficient path.

* ``divergences``: the ``DIVERGENCES`` registry that configs name, one :class:`Divergence` record per
  divergence (``forward_kl``, ``reverse_kl``, ``skew_forward_kl``, ``skew_reverse_kl``, ``generalized_jsd``,
  ``total_variation``: logits ``[..., V]`` -> ``[...]``) with its hyper-parameters (``HYPER_PARAMETERS``);
* ``reduction``: token means over the valid tokens of the whole optimizer step, the per-token CE, and
  ``distillation_loss`` (the dense objective on logits);
* ``chunked``: ``chunked_distillation_loss``, the same objective from hidden states, chunk by chunk;
* ``minillm``: MiniLLM's policy-gradient terms (importance weights, rewards, advantages, the clipped loss,
  the single-step and pre-training terms), imported as ``distillm.losses.minillm``.

See docs/losses.md for the formulas and conventions.
"""

from distillm.losses.chunked import chunked_distillation_loss
from distillm.losses.divergences import (
    DIVERGENCES,
    HYPER_PARAMETERS,
    Divergence,
    HyperParameter,
    forward_kl,
    generalized_jsd,
    get_divergence,
    reverse_kl,
    skew_forward_kl,
    skew_reverse_kl,
    total_variation,
)
from distillm.losses.reduction import (
    LossParts,
    distillation_loss,
    masked_mean,
    masked_sum,
    token_cross_entropy,
)

__all__ = [
    "DIVERGENCES",
    "HYPER_PARAMETERS",
    "Divergence",
    "HyperParameter",
    "LossParts",
    "chunked_distillation_loss",
    "distillation_loss",
    "forward_kl",
    "generalized_jsd",
    "get_divergence",
    "masked_mean",
    "masked_sum",
    "reverse_kl",
    "skew_forward_kl",
    "skew_reverse_kl",
    "token_cross_entropy",
    "total_variation",
]
