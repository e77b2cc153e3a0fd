"""Loading teacher and student models (Hugging Face causal LMs), and building small ones from config."""

from __future__ import annotations

import logging
from typing import Any

logger = logging.getLogger(__name__)

# Small architectures for the bundled demo and the tests: family -> config class name and field names.
_FAMILY_FIELDS: dict[str, dict[str, str]] = {
    "gpt2": {"layers": "n_layer", "hidden": "n_embd", "heads": "n_head", "positions": "n_positions"},
    "llama": {"layers": "num_hidden_layers", "hidden": "hidden_size", "heads": "num_attention_heads",
              "positions": "max_position_embeddings"},
    "qwen2": {"layers": "num_hidden_layers", "hidden": "hidden_size", "heads": "num_attention_heads",
              "positions": "max_position_embeddings"},
    "mistral": {"layers": "num_hidden_layers", "hidden": "hidden_size", "heads": "num_attention_heads",
                "positions": "max_position_embeddings"},
    "opt": {"layers": "num_hidden_layers", "hidden": "hidden_size", "heads": "num_attention_heads",
            "positions": "max_position_embeddings"},
}


def small_model_config(
    family: str,
    vocab_size: int,
    layers: int = 2,
    hidden: int = 64,
    heads: int = 4,
    positions: int = 1024,
    eos_token_id: int = 0,
    **extra: Any,
):
    """A ``transformers`` config of a small model of ``family`` (gpt2, llama, qwen2, mistral, opt)."""
    from transformers import AutoConfig

    if family not in _FAMILY_FIELDS:
        raise ValueError(f"unknown model family {family!r}; choose from {sorted(_FAMILY_FIELDS)}")
    names = _FAMILY_FIELDS[family]
    kwargs: dict[str, Any] = {
        names["layers"]: layers,
        names["hidden"]: hidden,
        names["heads"]: heads,
        names["positions"]: positions,
        "vocab_size": vocab_size,
        "eos_token_id": eos_token_id,
        "bos_token_id": eos_token_id,
        "pad_token_id": eos_token_id,
    }
    if family in ("llama", "qwen2", "mistral"):
        kwargs.update(intermediate_size=hidden * 4, num_key_value_heads=heads, tie_word_embeddings=True)
    if family == "opt":
        kwargs.update(ffn_dim=hidden * 4, word_embed_proj_dim=hidden)
    if family == "gpt2":
        kwargs.update(n_inner=hidden * 4)
    kwargs.update(extra)
    return AutoConfig.for_model(family, **kwargs)


def build_small_model(family: str, vocab_size: int, seed: int = 0, **kwargs: Any):
    """A randomly initialised small causal LM (deterministic for ``seed``)."""
    import torch
    from transformers import AutoModelForCausalLM

    config = small_model_config(family, vocab_size, **kwargs)
    torch.manual_seed(seed)
    return AutoModelForCausalLM.from_config(config)
