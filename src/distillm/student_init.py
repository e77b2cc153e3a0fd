"""``distillm init-student``: a student made of a model's own layers (embeddings, chosen blocks, norm, head).

A student cut from its teacher shares the teacher's tokenizer (token-level distillation needs one) and starts
from pretrained weights instead of random ones, as DistilBERT's students did (every other layer). The new model
is built from the source's config with fewer layers, so that everything indexed by layer (the attention's
``layer_idx`` for the KV cache, ``layer_types`` in the config) is renumbered, and then receives the source's
tensors: every non-layer tensor as it is, and block ``layers[j]`` of the source as block ``j``. Tied input and
output embeddings stay tied.

Without ``--layers``, ``--num-layers N`` keeps N evenly spaced blocks, the first and last included: block
``floor(i * (L - 1) / (N - 1) + 1/2)`` for i = 0..N-1 of a source with L blocks (N = 1 keeps block 0). For
SmolLM2's 30 blocks and N = 6 that is 0, 6, 12, 17, 23, 29.
"""

from __future__ import annotations

import argparse
import logging
import math
import re
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from distillm.errors import UserError
from distillm.storage import atomic_folder

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class LayerLayout:
    """Where a family keeps its blocks: the state-dict prefix of block i is ``f"{prefix}.{i}."``."""

    prefix: str
    count_field: str  # the config field holding the number of blocks


LAYOUTS: dict[str, LayerLayout] = {
    "llama": LayerLayout("model.layers", "num_hidden_layers"),
    "mistral": LayerLayout("model.layers", "num_hidden_layers"),
    "qwen2": LayerLayout("model.layers", "num_hidden_layers"),
    "qwen3": LayerLayout("model.layers", "num_hidden_layers"),
    "gpt2": LayerLayout("transformer.h", "n_layer"),
}

# Config fields that hold one entry per layer; they are sliced like the layers.
PER_LAYER_FIELDS = ("layer_types", "no_rope_layers")


def evenly_spaced_layers(total: int, count: int) -> list[int]:
    """``count`` of ``total`` block indices, evenly spaced, first and last included (see the module doc)."""
    if not 1 <= count <= total:
        raise UserError(f"--num-layers {count}: the model has {total} layers; choose 1 to {total}")
    if count == 1:
        return [0]
    return [math.floor(i * (total - 1) / (count - 1) + 0.5) for i in range(count)]


def check_layers(layers: Sequence[int], total: int) -> list[int]:
    """Refuse an empty, out-of-range, repeated or unsorted layer list, naming the offending index."""
    if not layers:
        raise UserError("--layers is empty; name at least one layer, e.g. --layers 0,6,12")
    for index in layers:
        if not 0 <= index < total:
            raise UserError(f"--layers: layer {index} is out of range; the model has layers 0 to {total - 1}")
    for before, index in zip(layers, layers[1:]):
        if index == before:
            raise UserError(f"--layers: layer {index} is named twice; name each layer once")
        if index < before:
            raise UserError(
                f"--layers: layer {index} comes after layer {before}; list layers in increasing order "
                "(a student keeps its teacher's layer order)"
            )
    return list(layers)


def parse_layers(text: str) -> list[int]:
    """``"0,6,12"`` -> [0, 6, 12] (an argparse type: its error becomes a usage message)."""
    try:
        return [int(part) for part in text.split(",") if part.strip()]
    except ValueError as error:
        raise argparse.ArgumentTypeError(
            f"{text!r}: expected comma-separated integers such as 0,6,12"
        ) from error


def student_config(config, layout: LayerLayout, layers: Sequence[int]):
    """A copy of ``config`` with ``len(layers)`` blocks and its per-layer fields sliced to ``layers``."""
    import copy

    student = copy.deepcopy(config)
    total = getattr(config, layout.count_field)
    setattr(student, layout.count_field, len(layers))
    for name in PER_LAYER_FIELDS:
        values = getattr(config, name, None)
        if isinstance(values, list | tuple) and len(values) == total:
            setattr(student, name, [values[i] for i in layers])
    return student


def student_state_dict(state: dict, layout: LayerLayout, layers: Sequence[int]) -> dict:
    """The source's tensors renamed for the student: block ``layers[j]`` becomes block ``j``; the rest as is."""
    pattern = re.compile(rf"^{re.escape(layout.prefix)}\.(\d+)\.(.*)$")
    new_index = {old: new for new, old in enumerate(layers)}
    selected = {}
    for key, tensor in state.items():
        match = pattern.match(key)
        if match is None:
            selected[key] = tensor
        elif int(match.group(1)) in new_index:
            selected[f"{layout.prefix}.{new_index[int(match.group(1))]}.{match.group(2)}"] = tensor
    return selected


def init_student(
    source: str | Path,
    out: str | Path,
    layers: Sequence[int] | None = None,
    num_layers: int | None = None,
    force: bool = False,
) -> list[int]:
    """Write a student of ``source``'s chosen layers to ``out`` (model, tokenizer, generation config).

    Returns the layer indices kept. Exactly one of ``layers`` and ``num_layers`` is given.
    """
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer, GenerationConfig

    source, out = Path(source), Path(out)
    if (layers is None) == (num_layers is None):
        raise UserError("give either --layers I,J,... or --num-layers N")
    if not (source / "config.json").is_file():
        raise UserError(f"{source}: no config.json; --from takes a Hugging Face model folder")
    if out.exists() and any(out.iterdir()) and not force:
        raise UserError(f"{out} exists and is not empty; pass --force to replace it, or choose another --out")
    config = AutoConfig.from_pretrained(str(source))
    layout = LAYOUTS.get(config.model_type)
    if layout is None:
        raise UserError(
            f"{source}: model type {config.model_type!r} is not supported by init-student; supported: "
            f"{', '.join(sorted(LAYOUTS))}"
        )
    total = getattr(config, layout.count_field)
    layers = evenly_spaced_layers(total, num_layers) if layers is None else check_layers(layers, total)
    if getattr(config, "scale_attn_by_inverse_layer_idx", False):
        logger.warning(
            "%s scales attention by 1/(layer index + 1): the copied blocks get their new indices' scale",
            source,
        )

    model = AutoModelForCausalLM.from_pretrained(str(source))
    dtype = next(model.parameters()).dtype
    state = student_state_dict(model.state_dict(), layout, layers)
    with torch.device("meta"):
        student = AutoModelForCausalLM.from_config(student_config(config, layout, layers), dtype=dtype)
    student.load_state_dict(state, strict=True, assign=True)  # every student tensor comes from the source
    if getattr(student.config, "tie_word_embeddings", False):
        student.tie_weights()

    with atomic_folder(out) as temporary:  # manifest last, then renamed into place (docs/faults.md)
        student.save_pretrained(str(temporary), safe_serialization=True)
        AutoTokenizer.from_pretrained(str(source)).save_pretrained(str(temporary))
        if (source / "generation_config.json").is_file():
            GenerationConfig.from_pretrained(str(source)).save_pretrained(str(temporary))
    logger.info(
        "%s -> %s: layers %s of %d, %.1fM of %.1fM parameters",
        source,
        out,
        ",".join(map(str, layers)),
        total,
        sum(p.numel() for p in student.parameters()) / 1e6,
        sum(p.numel() for p in model.parameters()) / 1e6,
    )
    return layers


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--from", dest="source", required=True, help="The Hugging Face model folder to cut.")
    which = parser.add_mutually_exclusive_group(required=True)
    which.add_argument(
        "--layers", type=parse_layers, help="Layers to keep, increasing: e.g. 0,6,12,17,23,29."
    )
    which.add_argument(
        "--num-layers", type=int, help="Keep N evenly spaced layers, the first and the last included."
    )
    parser.add_argument("--out", required=True, help="The student folder to write.")
    parser.add_argument("--force", action="store_true", help="Replace --out if it exists.")


def run(args: argparse.Namespace) -> int:
    init_student(args.source, args.out, layers=args.layers, num_layers=args.num_layers, force=args.force)
    return 0
