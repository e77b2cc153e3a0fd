"""Our own decoder forward for the common model families, built from the model's own modules.

Distillation only needs a causal LM's final hidden states at the *supervised* positions (the response), and a
decoding step only at the *last* one. A transformer's last layer can stop there: its keys and values are
needed at every position, but its attention queries, output projection, MLP and final norm only where the
result is read. :class:`FastDecoder` runs the embedding and all layers but the last over every position,
then the last layer (after its key/value projection) and the final norm over the kept positions only. Few
positions of an instruction batch are supervised (docs/design.md gives the share on the bundled tasks), so
the last layer costs little more than its key/value projection, in the teacher's forward and in the
student's forward and backward alike.

Prompts built from one template start with the same words. A prefix that every row of a batch shares
(same tokens at the same positions) has the same keys and values in every row, so
:meth:`FastDecoder.hidden_states` runs it once, as a batch of one row, and broadcasts its keys and values
(their gradients are summed back over the rows); benchmarks/README.md (``vs_trl.py``) gives its length on
the bundled tasks.

It is the model's own computation, not an approximation: every linear map, norm, MLP, rotary embedding and
dropout is the model's own module (so LoRA adapters injected by peft apply); what is written here is only
the glue a Hugging Face decoder layer performs: splitting heads, the causal and padding mask, scaled
dot-product attention with the model's scale and dropout, and the residual additions. It also skips the
per-call machinery of Hugging Face's forward (mask builders, cache objects, output dataclasses), which is
a large share of a decoding step for small models on a CPU. The exception is decoding on packed weights
(:meth:`FastDecoder.pack_weights`, gradients off): the linear maps then run through our kernel or oneDNN's,
and a Llama-layout layer whose maps all run through our kernel runs its whole step as one call of it (the
same function, rounded differently). ``tests/test_fast_forward.py`` checks hidden states, decoding logits
and parameter gradients against the Hugging Face forward for every supported family.

Supported: the families of :data:`distillm.layouts.LAYOUTS`, GPT-2 (``gpt2``, without its reordered/upcast
attention) and the Llama layout (``llama``, ``mistral``, ``qwen2``, ``qwen3``: grouped keys/values, rotary
embeddings, optional q/k norms, a sliding-window attention only where the window covers the whole sequence).
:class:`FastDecoder` is the same for all of them; a family's layout says how to read its modules.
:func:`fast_decoder` returns ``None`` for anything else, and callers fall back to the model's own forward.
It must not be used on a model whose parameters are sharded over processes (DeepSpeed ZeRO-3, FSDP): those
gather parameters in the forward of the wrapped model, which this bypasses.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.utils.checkpoint import checkpoint

from distillm.kernels import skinny
from distillm.kernels.packing import NATIVE_MAX_ROWS, PackedLinears, packable
from distillm.layouts import LAYOUTS, DecoderLayout
from distillm.models import unwrap_peft

# Below this share of kept positions the last layer runs on the kept positions only; above it the gather
# and the [B, Q, T] mask cost more than the few skipped positions save.
_MAX_KEPT_SHARE = 0.75
# A shared prefix shorter than this runs with every row: its separate batch-of-one pass would cost more.
_MIN_SHARED_PREFIX = 4


@dataclass
class KVCache:
    """Keys and values of every layer for a decoding run, in buffers sized for the whole run.

    ``keys[i]`` / ``values[i]``: ``[B, KV heads, capacity, head_dim]``; positions ``[:length]`` are filled.
    ``key_mask``: ``[B, 1, 1, capacity]`` boolean (True = attend), or None when no row has padding.
    """

    keys: list[Tensor]
    values: list[Tensor]
    length: int
    key_mask: Tensor | None


def fast_decoder(model: nn.Module, positions: int | None = None) -> FastDecoder | None:
    """A :class:`FastDecoder` for ``model`` (a Hugging Face causal LM, possibly peft-wrapped), or None.

    ``positions``: how many positions the sequences it will run have at most (the batch width; prompt +
    new tokens when decoding); None means the model's ``max_position_embeddings``. A sliding-window
    attention is reproduced only where the window covers them all (then it changes nothing).
    """
    hf_model = unwrap_peft(model)
    config = getattr(hf_model, "config", None)
    layout = LAYOUTS.get(getattr(config, "model_type", None))
    base = getattr(hf_model, "base_model", None)
    if layout is None or base is None or not layout.supports(config, positions) or _sharded(hf_model):
        return None
    return FastDecoder(hf_model, layout(config, base))


def _sharded(model: nn.Module) -> bool:
    """Whether ``model``'s parameters are sharded over processes (DeepSpeed ZeRO-3, FSDP 1 or 2)."""
    if any(hasattr(parameter, "ds_id") for parameter in model.parameters()):  # ZeRO-3 tags its parameters
        return True
    if not torch.distributed.is_available():
        return False
    # Here, not at the top: a torch build without torch.distributed has no torch.distributed.fsdp.
    from torch.distributed.fsdp import FSDPModule, FullyShardedDataParallel

    return any(isinstance(module, (FSDPModule, FullyShardedDataParallel)) for module in model.modules())


class FastDecoder:
    """Final hidden states of a supported decoder, with the last layer applied only where they are read.

    Family-agnostic: ``layout`` (:mod:`distillm.layouts`) says how to read the family's modules.
    """

    def __init__(self, hf_model: nn.Module, layout: DecoderLayout):
        self.model = hf_model
        self.layout = layout
        self.layers = layout.layers
        self.heads, self.kv_heads = layout.heads, layout.kv_heads
        # Linear maps packed for decoding (`pack_weights`), and the MLPs all of whose maps are packed.
        self._packed = PackedLinears()
        self._packed_mlps: set[nn.Module] = set()
        # Layers whose whole decoding step runs in one call of our kernel (`pack_weights`).
        self._native_layers: dict[nn.Module, skinny.DecodeLayer] = {}

    # ----------------------------------------------------------------------------------------------------
    # Training and scoring: a right-padded batch, hidden states at the kept positions.

    def hidden_states(self, input_ids: Tensor, attention_mask: Tensor, keep: Tensor) -> Tensor:
        """Final hidden states ``[N, H]`` at the positions where ``keep`` ``[B, T]`` is True, row-major.

        ``input_ids`` / ``attention_mask`` ``[B, T]``: positions count from column 0 in every row, as in the
        Hugging Face forward without ``position_ids`` (so right-padded rows, the batch contract, get their
        true positions); padding is masked as keys wherever it is.

        A prefix every row shares (the prompt template's opening words: the same tokens at the same
        positions) has the same keys and values in every row, since a causal layer's state at a position
        depends only on the tokens up to it. It runs once, as a batch of one row, and its keys and values
        are broadcast to every row (with gradients summed back over the rows). Not while dropout is active,
        which would draw one mask for all rows instead of one per row.
        """
        batch, width = input_ids.shape
        kept_per_row = keep.sum(-1)  # [B]
        queries = int(kept_per_row.max()) if keep.numel() else 0
        if queries == 0:
            return self.model.get_input_embeddings().weight.new_zeros(0, self.model.config.hidden_size)
        shared = self._shared_prefix(input_ids, attention_mask, keep)
        past = self._prefix_keys_values(input_ids[:1, :shared]) if shared else [None] * len(self.layers)
        positions = torch.arange(shared, width, device=input_ids.device)  # [S]: the rest, S = T - shared
        padded = not bool(attention_mask.all())
        # Without padding or prefix a plain causal mask (SDPA's is_causal) does.
        mask = (
            _attention_mask(attention_mask.bool(), positions[None, :].expand(batch, -1), width)
            if padded or shared
            else None
        )  # [B, 1, S, T]
        hidden, extra = self.layout.embed(input_ids[:, shared:], positions[None, :])
        for layer, layer_past in zip(self.layers[:-1], past[:-1]):
            hidden = self._maybe_checkpoint(self._layer, layer, hidden, extra, mask, layer_past)
        if queries > _MAX_KEPT_SHARE * (width - shared):
            hidden = self._maybe_checkpoint(self._layer, self.layers[-1], hidden, extra, mask, past[-1])
            return self.layout.final_norm(hidden)[keep[:, shared:]]
        # Each row's kept positions first, in order (a stable sort puts True before False), cut to the most
        # any row keeps; `valid` marks the real ones among them.
        query_positions = keep[:, shared:].int().argsort(dim=-1, descending=True, stable=True)[:, :queries]
        valid = torch.arange(queries, device=keep.device) < kept_per_row[:, None]  # [B, Q]
        query_mask = _attention_mask(attention_mask.bool(), query_positions + shared, width)  # [B, 1, Q, T]
        hidden = self._maybe_checkpoint(
            self._layer, self.layers[-1], hidden, extra, query_mask, past[-1], None, query_positions
        )  # [B, Q, H]
        return self.layout.final_norm(hidden[valid])  # [N, H]

    def _shared_prefix(self, input_ids: Tensor, attention_mask: Tensor, keep: Tensor) -> int:
        """How many leading positions every row shares (same real tokens, none kept); 0 when not worth it."""
        batch, width = input_ids.shape
        if batch < 2:
            return 0
        same = (input_ids == input_ids[:1]).all(0) & attention_mask.bool().all(0) & ~keep.any(0)  # [T]
        shared = int(same.int().cumprod(0).sum())
        # A row needs at least one position of its own; a short prefix saves less than its extra calls cost.
        shared = min(shared, width - 1)
        if shared < _MIN_SHARED_PREFIX or (self.model.training and self._dropout_active()):
            return 0
        return shared

    def _dropout_active(self) -> bool:
        _, attention_p = self.layout.attention(self.layers[0])
        return attention_p > 0 or any(
            isinstance(module, nn.Dropout) and module.p > 0 for module in self.model.modules()
        )

    def _prefix_keys_values(self, prefix_ids: Tensor) -> list[tuple[Tensor, Tensor]]:
        """Keys and values ``[1, KV heads, P, d]`` of every layer for the shared prefix ``[1, P]``."""
        positions = torch.arange(prefix_ids.shape[1], device=prefix_ids.device)[None, :]
        hidden, extra = self.layout.embed(prefix_ids, positions)
        recorded: list[tuple[Tensor, Tensor]] = []
        for layer in self.layers[:-1]:
            hidden = self._layer(layer, hidden, extra, None, record=recorded)
        # The last layer: only its keys and values (no position of the prefix is kept).
        _, key, value = self._projections(self.layers[-1], hidden, extra)
        recorded.append((key, value))
        return recorded

    def _maybe_checkpoint(self, function: Callable[..., Tensor], *args) -> Tensor:
        if self.model.training and _checkpointing(self.model):
            return checkpoint(function, *args, use_reentrant=False)
        return function(*args)

    # ----------------------------------------------------------------------------------------------------
    # Decoding: left-padded prompts, then one token per row and step.

    def prefill(self, input_ids: Tensor, attention_mask: Tensor, positions: Tensor, capacity: int):
        """Run the prompts ``[B, P]`` (left-padded, ``positions`` ``[B, P]``); returns ``(hidden [B, H], cache)``.

        The cache has room for ``capacity`` positions; ``hidden`` is the final hidden state at the last
        prompt position of every row.
        """
        batch, width = input_ids.shape
        key_valid = attention_mask.bool()
        padded = not bool(key_valid.all())
        # Causal by index (left padding: a row's real tokens are its last ones), with the padding masked.
        index = torch.arange(width, device=input_ids.device)[None, :].expand(batch, width)
        mask = _attention_mask(key_valid, index) if padded else None
        hidden, extra = self.layout.embed(input_ids, positions)
        recorded: list[tuple[Tensor, Tensor]] = []
        for layer in self.layers[:-1]:
            hidden = self._layer(layer, hidden, extra, mask, record=recorded)
        last = index[:, -1:]  # [B, 1]
        last_mask = mask[:, :, -1:] if mask is not None else None
        hidden = self._layer(
            self.layers[-1], hidden, extra, last_mask, record=recorded, query_positions=last
        )  # [B, 1, H]
        keys, values = _buffers(recorded, capacity)
        key_mask = None
        if padded:
            key_mask = torch.ones(batch, 1, 1, capacity, dtype=torch.bool, device=input_ids.device)
            key_mask[:, 0, 0, :width] = key_valid
        return self.layout.final_norm(hidden[:, 0]), KVCache(keys, values, width, key_mask)

    def step(self, tokens: Tensor, positions: Tensor, cache: KVCache) -> Tensor:
        """One decoding step: ``tokens`` ``[B]`` at ``positions`` ``[B, 1]``; returns the hidden states ``[B, H]``."""
        hidden, extra = self.layout.embed(tokens[:, None], positions)
        length = cache.length + 1
        mask = cache.key_mask[..., :length] if cache.key_mask is not None else None
        for index, layer in enumerate(self.layers):
            hidden = self._decode_layer(layer, hidden, extra, mask, cache, index)
        cache.length = length
        return self.layout.final_norm(hidden[:, 0])

    def pack_weights(
        self,
        batch_size: int,
        head: nn.Module | None = None,
        min_weights: int | None = None,
        native_layers: bool = True,
    ) -> int:
        """Make the layers' linear maps (and ``head``) ready for decoding ``batch_size`` rows on a CPU.

        A decoding step multiplies a few rows by every weight matrix of the model; for such skinny products
        torch's ``F.linear`` reads the weights at a fraction of the memory bandwidth
        (:mod:`distillm.kernels.packing`). Up to ``NATIVE_MAX_ROWS`` rows, where our kernel
        (:mod:`distillm.kernels.skinny`) is available, the maps run through it (on ``nn.Linear``'s own weights,
        a transposed copy of GPT-2's ``Conv1D``; a layer's maps of the same input in one call);
        otherwise they are copied into oneDNN's blocked layout, a second copy of the weights held as long as
        this object. Either is used by every later :meth:`prefill`, :meth:`step` and :meth:`linear` while
        gradients are off (``generation.sample`` packs after its prefill); pack once per decoding run, after
        the weights last changed. Nothing is packed under CPU autocast.

        Packs plain ``nn.Linear`` maps and GPT-2's ``Conv1D`` in float32 on the CPU with at least
        ``min_weights`` weights (default: where each kind's fixed cost per call is repaid,
        ``MIN_NATIVE_WEIGHTS`` or ``MIN_PACKED_WEIGHTS``); anything else (peft's LoRA layers, other dtypes
        or devices) keeps its own forward. Returns how many maps were packed: 0 where neither kind can run.

        ``native_layers``: where all of a layer's maps went to our kernel and the layout reproduces the
        layer there (``layout.native_layer``: the Llama layout without Qwen3's q/k norms), :meth:`step` runs
        the layer's whole decoding step as one call of it (:class:`distillm.kernels.skinny.DecodeLayer`)
        instead of some 45 torch operations; it rounds differently from them. False keeps the operations.
        """
        if min_weights is None:
            min_weights = PackedLinears.min_weights(PackedLinears.kind_for(batch_size))
        self._packed.clear()
        self._packed_mlps.clear()
        self._native_layers.clear()
        linears: list[nn.Module] = [head] if head is not None else []
        mlps: list[tuple[nn.Module, list[nn.Module]]] = []
        for layer in self.layers:
            linears += self.layout.attention_linears(layer)
            mlp_linears = self.layout.mlp_linears(layer)
            if mlp_linears is not None:
                mlps.append((layer.mlp, mlp_linears))
        # An MLP's maps only if all of them pack: otherwise the MLP runs its own forward (e.g. a LoRA layer
        # on one of them) and copies of the others would go unused.
        mlps = [(mlp, maps) for mlp, maps in mlps if all(packable(m, min_weights) for m in maps)]
        linears = [m for m in linears if packable(m, min_weights)] + [m for _, maps in mlps for m in maps]
        if not self._packed.pack(linears, batch_size):
            return 0
        self._packed_mlps.update(mlp for mlp, _ in mlps)
        if native_layers:
            for layer in self.layers:
                spec = self.layout.native_layer(layer, self._packed)
                if spec is not None:
                    self._native_layers[layer] = spec
        return len(self._packed)

    @property
    def native_layers(self) -> int:
        """How many layers :meth:`step` runs as one call of our kernel (after :meth:`pack_weights`)."""
        return len(self._native_layers)

    def packed(self, module: nn.Module) -> bool:
        """Whether :meth:`pack_weights` packed ``module``."""
        return module in self._packed

    def linear(self, module: nn.Module, inputs: Tensor) -> Tensor:
        """``module(inputs)``, through its packed weight when :meth:`pack_weights` packed it and grads are off."""
        return self._packed.linear(module, inputs)

    # ----------------------------------------------------------------------------------------------------
    # A layer, from the pieces its family's layout names.

    def _projections(self, layer: nn.Module, hidden: Tensor, extra) -> tuple[Tensor, Tensor, Tensor]:
        """Queries ``[B, heads, T, d]``, keys and values ``[B, KV heads, T, d]`` of the layer input ``[B, T, H]``."""
        normed = self.layout.attention_norm(layer, hidden)
        return self.layout.projections(layer, normed, extra, self._packed)

    def _attention(self, layer: nn.Module, query: Tensor, key: Tensor, value: Tensor, mask) -> Tensor:
        """Scaled dot-product attention ``[B, heads, Q, d]`` -> merged heads ``[B, Q, heads * d]``."""
        attention, dropout = self.layout.attention(layer)
        output = F.scaled_dot_product_attention(
            query,
            key,
            value,
            attn_mask=mask,
            dropout_p=dropout if attention.training else 0.0,
            is_causal=mask is None and query.shape[2] == key.shape[2] and query.shape[2] > 1,
            scale=attention.scaling,
            enable_gqa=self.kv_heads != self.heads,
        )
        return output.transpose(1, 2).flatten(2)

    def _finish(self, layer: nn.Module, hidden: Tensor, attended: Tensor) -> Tensor:
        """Output projection, residual, MLP and residual of a layer; ``hidden`` is the layer's input."""
        hidden = hidden + self.layout.attention_output(layer, attended, self._packed)
        normed = self.layout.mlp_norm(layer, hidden)
        if layer.mlp not in self._packed_mlps or torch.is_grad_enabled():
            return hidden + layer.mlp(normed)
        return hidden + self.layout.packed_mlp(layer.mlp, normed, self._packed)

    def _layer(
        self,
        layer,
        hidden: Tensor,
        extra,
        mask,
        past=None,
        record=None,
        query_positions: Tensor | None = None,
    ) -> Tensor:
        """A layer over the positions of ``hidden`` ``[B, S, H]``; returns ``[B, S, H]``.

        ``past``: keys and values ``[1 or B, KV heads, P, d]`` of earlier positions to attend to as well
        (the shared prefix); ``record``: a list the layer's own keys and values are appended to;
        ``query_positions`` ``[B, Q]``: run the layer past its key/value projection at these positions only
        (keys and values stay everywhere), returning ``[B, Q, H]``.
        """
        query, key, value = self._projections(layer, hidden, extra)
        if record is not None:
            record.append((key, value))
        key, value = _with_past(past, key, value)
        if query_positions is not None:
            # [B, heads, Q, d]: the queries of the kept positions, and their inputs [B, Q, H]
            index = query_positions[:, None, :, None].expand(-1, query.shape[1], -1, query.shape[3])
            query = query.gather(2, index)
            hidden = hidden.gather(1, query_positions[:, :, None].expand(-1, -1, hidden.shape[-1]))
        return self._finish(layer, hidden, self._attention(layer, query, key, value, mask))

    def _decode_layer(self, layer, hidden: Tensor, extra, mask, cache: KVCache, index: int) -> Tensor:
        native = self._native_layers.get(layer) if self._native_layers else None
        if native is not None and self._native_step_runs(layer, hidden):
            batch, _, width = hidden.shape
            cos, sin = (t.reshape(batch, -1).contiguous() for t in extra)
            if cos.shape[1] == self.layout.head_dim:  # else a partial rotary embedding: the operations below
                key_mask = cache.key_mask.view(batch, -1) if cache.key_mask is not None else None
                hidden = hidden.contiguous()  # updated in place: the embedding's or the last layer's output
                native(
                    hidden.view(batch, width),
                    cos,
                    sin,
                    cache.keys[index],
                    cache.values[index],
                    cache.length,
                    key_mask,
                )
                return hidden
        query, key, value = self._projections(layer, hidden, extra)
        start = cache.length
        cache.keys[index][:, :, start : start + 1] = key
        cache.values[index][:, :, start : start + 1] = value
        keys = cache.keys[index][:, :, : start + 1]
        values = cache.values[index][:, :, : start + 1]
        return self._finish(layer, hidden, self._attention(layer, query, keys, values, mask))

    def _native_step_runs(self, layer: nn.Module, hidden: Tensor) -> bool:
        """Whether the native layer can take this step: gradients off, float32 CPU rows within the kernel's
        batch limit, and no attention dropout in effect."""
        attention, dropout = self.layout.attention(layer)
        return (
            not torch.is_grad_enabled()
            and hidden.dtype == torch.float32
            and hidden.device.type == "cpu"
            and hidden.shape[0] * hidden.shape[1] <= NATIVE_MAX_ROWS
            and hidden.shape[1] == 1
            and not (attention.training and dropout > 0)
        )


def _checkpointing(model: nn.Module) -> bool:
    """Whether activation checkpointing is on (``gradient_checkpointing_enable``), asked without warnings."""
    name = "is_activation_checkpointing" if hasattr(type(model), "is_activation_checkpointing") else None
    return bool(getattr(model, name or "is_gradient_checkpointing", False))


def _with_past(past: tuple[Tensor, Tensor] | None, key: Tensor, value: Tensor) -> tuple[Tensor, Tensor]:
    """``key`` / ``value`` ``[B, KV heads, S, d]`` preceded by ``past``'s, broadcast over the batch."""
    if past is None:
        return key, value
    past_key, past_value = past
    size = (key.shape[0], -1, -1, -1)
    return torch.cat([past_key.expand(size), key], 2), torch.cat([past_value.expand(size), value], 2)


def _buffers(recorded: list[tuple[Tensor, Tensor]], capacity: int) -> tuple[list[Tensor], list[Tensor]]:
    """Each layer's prefill keys and values ``[B, KV heads, P, d]`` at the start of buffers of ``capacity``."""
    keys, values = [], []
    for key, value in recorded:
        for source, buffers in ((key, keys), (value, values)):
            batch, heads, width, dim = source.shape
            buffer = source.new_empty(batch, heads, capacity, dim)
            buffer[:, :, :width] = source
            buffers.append(buffer)
    return keys, values


def _attention_mask(key_valid: Tensor, query_positions: Tensor, width: int | None = None) -> Tensor:
    """Boolean SDPA mask ``[B, 1, Q, T]`` (True = attend): causal by position, padding keys excluded.

    ``key_valid`` ``[B, T]``; ``query_positions`` ``[B, Q]``, each query's index in ``[0, T)``. A query
    always sees itself, so a padding position (whose output is never read) has at least one key and
    softmax stays finite.
    """
    width = key_valid.shape[1] if width is None else width
    key_index = torch.arange(width, device=key_valid.device)  # [T]
    causal = key_index[None, None, :] <= query_positions[:, :, None]  # [B, Q, T]
    itself = key_index[None, None, :] == query_positions[:, :, None]
    return ((causal & key_valid[:, None, :]) | itself)[:, None]
