"""Saving and resuming the whole training state, atomically.

A run folder holds::

    config.yaml                the resolved configuration
    metrics.jsonl              one JSON object per logged step / evaluation
    checkpoints/step-0000100/  resumable: the model in Hugging Face format (safetensors) + tokenizer +
                               trainer_state.pt (optimizer, scheduler, data position, every RNG state, the
                               sources' state: replay buffer, phi, ...); under DeepSpeed also deepspeed/,
                               the engine's own checkpoint (every process's partition of the optimizer state)
    best/                      the best model so far by train.select_by (HF format, loadable as is)
    last/                      the final model (HF format)

Every folder is written under a temporary name and renamed into place, so a run killed at any moment
leaves the previous checkpoint intact, and a half-written folder is never mistaken for a checkpoint.
"""

from __future__ import annotations

import json
import logging
import os
import random
import shutil
from pathlib import Path
from typing import Any

import numpy as np
import torch

logger = logging.getLogger(__name__)

CHECKPOINTS = "checkpoints"
TRAINER_STATE = "trainer_state.pt"
DEEPSPEED_STATE = "deepspeed"  # the DeepSpeed engine's checkpoint, inside a step's folder
_PREFIX = "step-"


# --------------------------------------------------------------------------------------------------------
# RNG state: python, numpy and torch, in a form torch.load(weights_only=True) accepts.


def capture_rng_state() -> dict[str, Any]:
    version, mt_state, gauss = random.getstate()
    kind, keys, pos, has_gauss, cached = np.random.get_state()
    state: dict[str, Any] = {
        "python": [version, list(mt_state), gauss],
        "numpy": [kind, torch.from_numpy(keys.astype(np.int64)), int(pos), int(has_gauss), float(cached)],
        "torch": torch.get_rng_state(),
    }
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def restore_rng_state(state: dict[str, Any]) -> None:
    version, mt_state, gauss = state["python"]
    random.setstate((version, tuple(mt_state), gauss))
    kind, keys, pos, has_gauss, cached = state["numpy"]
    np.random.set_state((kind, keys.numpy().astype(np.uint32), pos, has_gauss, cached))
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


# --------------------------------------------------------------------------------------------------------
# Atomic folders.


def _fsync_tree(folder: Path) -> None:
    for path in folder.rglob("*"):
        if path.is_file():
            with open(path, "rb") as handle:
                os.fsync(handle.fileno())


def _publish(tmp: Path, final: Path) -> None:
    """Move the finished ``tmp`` folder to ``final``, replacing an older one without a moment of neither."""
    _fsync_tree(tmp)
    if final.exists():
        old = final.with_name(f".old-{final.name}")
        shutil.rmtree(old, ignore_errors=True)
        os.replace(final, old)
        os.replace(tmp, final)
        shutil.rmtree(old, ignore_errors=True)
    else:
        os.replace(tmp, final)


def save_model(
    folder: str | Path, model, tokenizer, state_dict: dict | None = None, extra: dict | None = None
) -> Path:
    """Write ``model`` (HF format, safetensors) and ``tokenizer`` to ``folder`` atomically.

    ``state_dict`` overrides the weights written (accelerate gathers it for sharded models);
    ``extra`` is written as ``distillm.json`` (metrics of a best checkpoint, say).
    """
    folder = Path(folder)
    tmp = folder.with_name(f".tmp-{folder.name}")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    model.save_pretrained(str(tmp), state_dict=state_dict, safe_serialization=True)
    tokenizer.save_pretrained(str(tmp))
    if extra is not None:
        (tmp / "distillm.json").write_text(json.dumps(extra, indent=2), encoding="utf-8")
    _publish(tmp, folder)
    return folder


def checkpoint_name(step: int) -> str:
    return f"{_PREFIX}{step:07d}"


def list_checkpoints(run_dir: str | Path) -> list[Path]:
    """Complete checkpoints of a run, oldest first (temporary folders are never listed)."""
    root = Path(run_dir) / CHECKPOINTS
    if not root.is_dir():
        return []
    found = [p for p in root.iterdir() if p.name.startswith(_PREFIX) and (p / TRAINER_STATE).is_file()]
    return sorted(found, key=lambda p: int(p.name[len(_PREFIX) :]))


def latest_checkpoint(run_dir: str | Path) -> Path | None:
    found = list_checkpoints(run_dir)
    return found[-1] if found else None


def staging_folder(run_dir: str | Path, step: int) -> Path:
    """The temporary folder in which ``step``'s checkpoint is assembled before it is renamed into place."""
    return Path(run_dir) / CHECKPOINTS / f".tmp-{checkpoint_name(step)}"


def stage_checkpoint(run_dir: str | Path, step: int) -> Path:
    """Create ``step``'s staging folder empty, for other processes to write into before ``save_checkpoint``."""
    tmp = staging_folder(run_dir, step)
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    return tmp


def save_checkpoint(
    run_dir: str | Path,
    step: int,
    model,
    tokenizer,
    trainer_state: dict[str, Any],
    keep: int = 1,
    state_dict: dict | None = None,
    staged: bool = False,
) -> Path:
    """A resumable checkpoint of ``step``; keeps the newest ``keep`` and removes older ones.

    ``staged``: the staging folder was made by ``stage_checkpoint`` and already holds files (DeepSpeed's
    partitioned state); they are published together with the rest.
    """
    root = Path(run_dir) / CHECKPOINTS
    final = root / checkpoint_name(step)
    tmp = staging_folder(run_dir, step) if staged else stage_checkpoint(run_dir, step)
    model.save_pretrained(str(tmp), state_dict=state_dict, safe_serialization=True)
    tokenizer.save_pretrained(str(tmp))
    torch.save({**trainer_state, "rng": capture_rng_state(), "step": step}, tmp / TRAINER_STATE)
    _publish(tmp, final)
    for old in list_checkpoints(run_dir)[:-keep]:
        shutil.rmtree(old, ignore_errors=True)
    logger.info("saved checkpoint %s", final)
    return final


def load_trainer_state(checkpoint: str | Path) -> dict[str, Any]:
    return torch.load(Path(checkpoint) / TRAINER_STATE, map_location="cpu", weights_only=True)


def _read_safetensors(folder: Path, prefix: str) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    files = sorted(folder.glob(f"{prefix}*.safetensors"))
    if not files:
        raise FileNotFoundError(f"no {prefix}*.safetensors in {folder}")
    weights: dict[str, torch.Tensor] = {}
    for file in files:
        weights.update(load_file(str(file)))
    return weights


def load_model_weights(model, checkpoint: str | Path) -> None:
    """Load a checkpoint's weights into an already built ``model`` (plain HF model or peft-wrapped)."""
    checkpoint = Path(checkpoint)
    if (checkpoint / "adapter_config.json").is_file():
        from peft import set_peft_model_state_dict

        set_peft_model_state_dict(model, _read_safetensors(checkpoint, "adapter_model"))
        return
    weights = _read_safetensors(checkpoint, "model")
    missing, unexpected = model.load_state_dict(weights, strict=False)
    if unexpected:
        raise RuntimeError(f"checkpoint {checkpoint} has weights the model lacks: {unexpected[:5]}")
    # save_pretrained leaves tied weights out (lm_head tied to the embeddings): they are loaded through
    # their twin. Anything else missing means the checkpoint does not belong to this model.
    params = dict(model.named_parameters(remove_duplicate=False))
    loaded = {params[name].data_ptr() for name in weights if name in params}
    untied = [name for name in missing if name not in params or params[name].data_ptr() not in loaded]
    if untied:
        raise RuntimeError(f"checkpoint {checkpoint} lacks weights of the model: {untied[:5]}")
