"""How :class:`distillm.fast_forward.FastDecoder` reads each model family's modules: one small class a family.

A layout names a family's modules and says what its layer computes around them: the embedding (learned
positions or a rotary embedding), the norms, the attention projections (one fused q/k/v map or three), the
output projection and, for decoding on packed weights, the MLP's linear maps and the glue between them.
Every tensor it touches goes through the model's own modules, so LoRA adapters injected by peft apply.
:data:`LAYOUTS` maps ``config.model_type`` to its layout; a type not listed runs the model's own forward.

To add a family: write its layout (the :class:`DecoderLayout` protocol below, :class:`LlamaLayout` as the
example), list it in :data:`LAYOUTS`, add its ``model_type`` to ``models.PLAIN_HEAD_MODEL_TYPES`` if its
logits are a plain linear head, and add it to ``FAMILIES`` in ``tests/test_fast_forward.py``, which checks
hidden states, decoding logits and gradients against the Hugging Face forward.
"""

from __future__ import annotations

import sys
from collections.abc import Sequence
from typing import Any, Protocol

from torch import Tensor, nn

from distillm.kernels import skinny
from distillm.kernels.packing import PackedLinears


class Linear(Protocol):
    """A module's forward, or its packed copy while decoding (``distillm.kernels.packing.PackedLinears``)."""

    def __call__(self, module: nn.Module, inputs: Tensor) -> Tensor: ...

    def many(self, modules: Sequence[nn.Module], inputs: Tensor) -> list[Tensor]:
        """Several maps of the same inputs (one kernel call where they are all packed for it)."""
        ...


class DecoderLayout(Protocol):
    """What :class:`~distillm.fast_forward.FastDecoder` asks of a family; shapes as in its docstrings.

    ``extra`` is whatever :meth:`embed` returns beside the embeddings for the layers (rotary ``(cos, sin)``,
    or None) and is passed back to :meth:`projections` untouched.
    """

    model_types: frozenset[str]  # the `config.model_type` values it reads
    layers: nn.ModuleList  # the decoder layers, in order
    heads: int  # query heads
    kv_heads: int  # key/value heads (fewer than `heads` under grouped-query attention)
    head_dim: int

    @staticmethod
    def supports(config: Any, positions: int | None) -> bool:
        """Whether the layout reproduces this config's forward on sequences of up to ``positions`` (None: any)."""
        ...

    def embed(self, input_ids: Tensor, positions: Tensor) -> tuple[Tensor, Any]:
        """Input embeddings ``[B, T, H]`` of ``input_ids`` at ``positions`` ``[1 or B, T]``, and ``extra``."""
        ...

    def final_norm(self, hidden: Tensor) -> Tensor: ...

    def attention_norm(self, layer: nn.Module, hidden: Tensor) -> Tensor:
        """The layer's norm before attention."""
        ...

    def projections(
        self, layer: nn.Module, normed: Tensor, extra: Any, linear: Linear
    ) -> tuple[Tensor, Tensor, Tensor]:
        """Queries ``[B, heads, T, d]``, keys and values ``[B, KV heads, T, d]`` (positions applied)."""
        ...

    def attention(self, layer: nn.Module) -> tuple[nn.Module, float]:
        """The layer's attention module (its ``training`` and ``scaling`` apply) and its dropout probability."""
        ...

    def attention_output(self, layer: nn.Module, attended: Tensor, linear: Linear) -> Tensor:
        """What attention adds to the residual: output projection (and dropout) of ``[B, Q, heads * d]``."""
        ...

    def mlp_norm(self, layer: nn.Module, hidden: Tensor) -> Tensor:
        """The layer's norm before the MLP (``layer.mlp``)."""
        ...

    def attention_linears(self, layer: nn.Module) -> list[nn.Module]:
        """The attention's linear maps, for packing."""
        ...

    def mlp_linears(self, layer: nn.Module) -> list[nn.Module] | None:
        """The MLP's linear maps when :meth:`packed_mlp` reproduces ``layer.mlp``'s forward, else None."""
        ...

    def packed_mlp(self, mlp: nn.Module, hidden: Tensor, linear: Linear) -> Tensor:
        """``mlp(hidden)`` with its linear maps through ``linear``."""
        ...

    def native_layer(self, layer: nn.Module, packed: PackedLinears) -> skinny.DecodeLayer | None:
        """The layer's whole decoding step in one call of our kernel, where its computation is one the kernel
        reproduces and all its maps are packed for it (``packed.native``); else None."""
        ...


class GPT2Layout:
    """GPT-2: learned positions, LayerNorms, one fused q/k/v ``Conv1D``, a GELU MLP (``c_fc``, ``c_proj``)."""

    model_types = frozenset({"gpt2"})

    def __init__(self, config: Any, base: nn.Module):
        self.base = base
        self.layers: nn.ModuleList = base.h
        self.heads = self.kv_heads = config.n_head
        self.head_dim = config.n_embd // config.n_head

    @staticmethod
    def supports(config: Any, positions: int | None) -> bool:
        return not (config.reorder_and_upcast_attn or getattr(config, "add_cross_attention", False))

    def embed(self, input_ids: Tensor, positions: Tensor) -> tuple[Tensor, None]:
        hidden = self.base.wte(input_ids) + self.base.wpe(positions)
        return self.base.drop(hidden), None

    def final_norm(self, hidden: Tensor) -> Tensor:
        return self.base.ln_f(hidden)

    def attention_norm(self, layer: nn.Module, hidden: Tensor) -> Tensor:
        return layer.ln_1(hidden)

    def projections(
        self, layer: nn.Module, normed: Tensor, extra: None, linear: Linear
    ) -> tuple[Tensor, Tensor, Tensor]:
        batch, width, _ = normed.shape
        qkv = linear(layer.attn.c_attn, normed).view(batch, width, 3, self.heads, self.head_dim)
        query, key, value = qkv.permute(2, 0, 3, 1, 4).unbind(0)  # each [B, heads, T, d]
        return query, key, value

    def attention(self, layer: nn.Module) -> tuple[nn.Module, float]:
        return layer.attn, layer.attn.attn_dropout.p

    def attention_output(self, layer: nn.Module, attended: Tensor, linear: Linear) -> Tensor:
        return layer.attn.resid_dropout(linear(layer.attn.c_proj, attended))

    def mlp_norm(self, layer: nn.Module, hidden: Tensor) -> Tensor:
        return layer.ln_2(hidden)

    def attention_linears(self, layer: nn.Module) -> list[nn.Module]:
        return [layer.attn.c_attn, layer.attn.c_proj]

    def mlp_linears(self, layer: nn.Module) -> list[nn.Module] | None:
        mlp = layer.mlp
        return [mlp.c_fc, mlp.c_proj] if type(mlp).__name__ == "GPT2MLP" else None

    def packed_mlp(self, mlp: nn.Module, hidden: Tensor, linear: Linear) -> Tensor:
        return mlp.dropout(linear(mlp.c_proj, mlp.act(linear(mlp.c_fc, hidden))))  # GPT2MLP.forward

    def native_layer(self, layer: nn.Module, packed: PackedLinears) -> None:
        return None  # the kernel's layer is the Llama layout's


# MLP classes whose forward is `down_proj(act_fn(gate_proj(x)) * up_proj(x))`.
_GATED_MLPS = frozenset({"LlamaMLP", "MistralMLP", "Qwen2MLP", "Qwen3MLP"})
# Activation modules whose forward is `F.silu`.
_SILUS = frozenset({"SiLU", "SiLUActivation"})
# RMS norm classes whose forward is `weight * (x * rsqrt(mean(x^2) + variance_epsilon))` (in float32).
_RMS_NORMS = frozenset({"LlamaRMSNorm", "MistralRMSNorm", "Qwen2RMSNorm", "Qwen3RMSNorm"})


class LlamaLayout:
    """The Llama layout (Llama, Mistral, Qwen2, Qwen3): RMS norms, q/k/v/o maps with grouped keys/values,
    rotary embeddings, Qwen3's optional q/k norms, a gated MLP.

    A sliding-window attention (Mistral, Qwen2's ``use_sliding_window``) is reproduced only where the window
    covers every position of the call, so that it restricts nothing.
    """

    model_types = frozenset({"llama", "mistral", "qwen2", "qwen3"})

    def __init__(self, config: Any, base: nn.Module):
        self.base = base
        self.layers: nn.ModuleList = base.layers
        attention = self.layers[0].self_attn
        self.heads = config.num_attention_heads
        self.kv_heads = config.num_key_value_heads
        self.head_dim = attention.head_dim
        # The modeling module's own rotary application (identical to what its attention calls).
        self.rotary = sys.modules[type(attention).__module__].apply_rotary_pos_emb

    @staticmethod
    def supports(config: Any, positions: int | None) -> bool:
        # A window of W positions (each query sees itself and the W - 1 before it) restricts nothing in a
        # sequence of at most W positions.
        window = getattr(config, "sliding_window", None)
        sliding = config.model_type == "mistral" or "sliding_attention" in (
            getattr(config, "layer_types", None) or ()
        )
        longest = config.max_position_embeddings if positions is None else positions
        return not sliding or window is None or window >= longest

    def embed(self, input_ids: Tensor, positions: Tensor) -> tuple[Tensor, tuple[Tensor, Tensor]]:
        hidden = self.base.embed_tokens(input_ids)
        return hidden, self.base.rotary_emb(hidden, position_ids=positions.expand(hidden.shape[0], -1))

    def final_norm(self, hidden: Tensor) -> Tensor:
        return self.base.norm(hidden)

    def attention_norm(self, layer: nn.Module, hidden: Tensor) -> Tensor:
        return layer.input_layernorm(hidden)

    def projections(
        self, layer: nn.Module, normed: Tensor, extra: tuple[Tensor, Tensor], linear: Linear
    ) -> tuple[Tensor, Tensor, Tensor]:
        batch, width, _ = normed.shape
        attention = layer.self_attn
        query, key, value = linear.many([attention.q_proj, attention.k_proj, attention.v_proj], normed)
        query = query.view(batch, width, self.heads, self.head_dim)
        key = key.view(batch, width, self.kv_heads, self.head_dim)
        value = value.view(batch, width, self.kv_heads, self.head_dim)
        if hasattr(attention, "q_norm"):  # Qwen3: RMS norm over each head's vector, before the rotation
            query, key = attention.q_norm(query), attention.k_norm(key)
        cos, sin = extra
        query, key = self.rotary(query.transpose(1, 2), key.transpose(1, 2), cos, sin)
        return query, key, value.transpose(1, 2)

    def attention(self, layer: nn.Module) -> tuple[nn.Module, float]:
        return layer.self_attn, layer.self_attn.attention_dropout

    def attention_output(self, layer: nn.Module, attended: Tensor, linear: Linear) -> Tensor:
        return linear(layer.self_attn.o_proj, attended)

    def mlp_norm(self, layer: nn.Module, hidden: Tensor) -> Tensor:
        return layer.post_attention_layernorm(hidden)

    def attention_linears(self, layer: nn.Module) -> list[nn.Module]:
        attention = layer.self_attn
        return [attention.q_proj, attention.k_proj, attention.v_proj, attention.o_proj]

    def mlp_linears(self, layer: nn.Module) -> list[nn.Module] | None:
        mlp = layer.mlp
        return [mlp.gate_proj, mlp.up_proj, mlp.down_proj] if type(mlp).__name__ in _GATED_MLPS else None

    def packed_mlp(self, mlp: nn.Module, hidden: Tensor, linear: Linear) -> Tensor:
        gate, up = linear.many([mlp.gate_proj, mlp.up_proj], hidden)  # the gated MLP's forward (_GATED_MLPS)
        return linear(mlp.down_proj, mlp.act_fn(gate) * up)

    def native_layer(self, layer: nn.Module, packed: PackedLinears) -> skinny.DecodeLayer | None:
        attention, mlp = layer.self_attn, layer.mlp
        norms = (layer.input_layernorm, layer.post_attention_layernorm)
        if (
            hasattr(attention, "q_norm")  # Qwen3's norms over each head: not in the kernel
            or type(mlp).__name__ not in _GATED_MLPS
            or type(mlp.act_fn).__name__ not in _SILUS
            or any(type(norm).__name__ not in _RMS_NORMS for norm in norms)
        ):
            return None
        maps = [packed.native(m) for m in (*self.attention_linears(layer), *self.mlp_linears(layer))]
        if (
            any(entry is None for entry in maps)
            or any(bias is not None and not skinny.supports(bias) for _, bias in maps)
            or any(not skinny.supports(n.weight) for n in norms)
        ):
            return None
        return skinny.DecodeLayer(
            [weight for weight, _ in maps],
            [bias for _, bias in maps],
            (
                norms[0].weight.detach(),
                norms[0].variance_epsilon,
                norms[1].weight.detach(),
                norms[1].variance_epsilon,
            ),
            self.heads,
            self.kv_heads,
            self.head_dim,
            attention.scaling,
        )


# config.model_type -> its layout.
LAYOUTS: dict[str, type[DecoderLayout]] = {
    model_type: layout for layout in (GPT2Layout, LlamaLayout) for model_type in layout.model_types
}
