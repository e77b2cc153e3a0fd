"""Saving and resuming the whole training state, atomically.

A run folder holds::

    config.yaml                the resolved configuration
    metrics.jsonl              one JSON object per logged step / evaluation
    checkpoints/step-0000100/  resumable (the newest train.keep_checkpoints=2 are kept): the model in Hugging Face format (safetensors) + tokenizer +
                               trainer_state.pt (optimizer, scheduler, data position, every RNG state, the
                               sources' state: replay buffer, phi, ...); under DeepSpeed also deepspeed/,
                               the engine's own checkpoint (every process's partition of the optimizer state)
    best/                      the best model so far by train.select_by (HF format, loadable as is)
    last/                      the final model (HF format)

Every folder is written under a temporary name, gets a ``manifest.json`` last (each file's size and SHA-256)
and is renamed into place, so a run killed at any moment leaves the previous checkpoint intact, and a
half-written folder is never mistaken for a checkpoint. Resuming verifies the newest checkpoint against its
manifest and falls back to the newest intact one (``resumable_checkpoint``); see docs/faults.md. These
functions know nothing of the loop that calls them, so a second loop (MiniLLM's) saves and resumes with them.
"""

from __future__ import annotations

import json
import logging
import os
import random
import shutil
import time
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import torch
from safetensors.torch import load_file

from distillm.errors import UserError
from distillm.storage import (
    StorageError,
    atomic_folder,
    check_free_space,
    publish_folder,
    remove_folder,
    storage_errors,
    verify_folder,
)

if TYPE_CHECKING:
    from distillm.distributed import Distributed

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
# Writing: every folder is assembled under a temporary name, gets its manifest last and is renamed into place.


def tensor_bytes(*objects: Any) -> int:
    """Bytes of every distinct tensor in nested dicts / lists: a lower bound on what saving them writes."""
    seen: set[tuple[int, int]] = set()
    total = 0

    def visit(obj: Any) -> None:
        nonlocal total
        if isinstance(obj, torch.Tensor):
            key = (
                (obj.untyped_storage().data_ptr(), obj.nbytes) if obj.device.type != "meta" else (id(obj), 0)
            )
            if key not in seen:
                seen.add(key)
                total += obj.nbytes
        elif isinstance(obj, dict):
            for value in obj.values():
                visit(value)
        elif isinstance(obj, (list, tuple)):
            for value in obj:
                visit(value)

    for obj in objects:
        visit(obj)
    return total


def _weights(model, state_dict: dict | None) -> dict:
    return state_dict if state_dict is not None else model.state_dict()


def save_model(
    folder: str | Path, model, tokenizer, state_dict: dict | None = None, extra: dict | None = None
) -> Path:
    """Write ``model`` (HF format, safetensors) and ``tokenizer`` to ``folder`` atomically, manifest last.

    ``state_dict`` overrides the weights written (accelerate gathers it for sharded models);
    ``extra`` is written as ``distillm.json`` (metrics of a best checkpoint, say).
    """
    folder = Path(folder)
    with atomic_folder(folder, needed=tensor_bytes(_weights(model, state_dict))) as tmp:
        model.save_pretrained(str(tmp), state_dict=state_dict, safe_serialization=True)
        tokenizer.save_pretrained(str(tmp))
        if extra is not None:
            (tmp / "distillm.json").write_text(json.dumps(extra, indent=2), encoding="utf-8")
    return folder


def checkpoint_name(step: int) -> str:
    return f"{_PREFIX}{step:07d}"


def checkpoint_step(folder: Path) -> int:
    return int(folder.name[len(_PREFIX) :])


def list_checkpoints(run_dir: str | Path) -> list[Path]:
    """Checkpoint folders of a run, oldest first, unverified (temporary folders are never listed)."""
    root = Path(run_dir) / CHECKPOINTS
    if not root.is_dir():
        return []
    found = [p for p in root.iterdir() if p.is_dir() and p.name.startswith(_PREFIX) and p.name[5:].isdigit()]
    return sorted(found, key=checkpoint_step)


def latest_checkpoint(run_dir: str | Path) -> Path | None:
    """The newest checkpoint folder, unverified; ``resumable_checkpoint`` is the one to resume from."""
    found = list_checkpoints(run_dir)
    return found[-1] if found else None


class NoGoodCheckpointError(UserError):
    """Every checkpoint of a run is damaged."""


def resumable_checkpoint(run_dir: str | Path) -> Path | None:
    """The newest checkpoint whose files match its manifest; None if the run has none at all.

    A damaged one (truncated, corrupted, incomplete) is skipped with a warning that names the file and what is
    wrong, and moved aside to ``.damaged-step-...`` so that it is never considered again. Call it on one
    process only (it renames). Raises ``NoGoodCheckpointError`` when checkpoints exist but none is intact.
    """
    damaged: list[str] = []
    for folder in reversed(list_checkpoints(run_dir)):
        problems = verify_folder(folder)
        if not problems:
            if damaged:
                logger.warning("resuming from %s, the newest intact checkpoint", folder)
            return folder
        aside = folder.with_name(f".damaged-{folder.name}")
        remove_folder(aside)
        os.replace(folder, aside)
        logger.warning(
            "skipping checkpoint %s: %s; moved it to %s (delete it when no longer needed)",
            folder.name,
            "; ".join(problems),
            aside,
        )
        damaged.append(f"{folder.name} ({'; '.join(problems)})")
    if damaged:
        raise NoGoodCheckpointError(
            f"no intact checkpoint in {Path(run_dir) / CHECKPOINTS} to resume from: "
            + ", ".join(damaged)
            + " (moved aside as .damaged-step-*). Restore a good copy of one there, or start the run over with "
            "train.resume=false (or a new train.output_dir)"
        )
    return None


def staging_folder(run_dir: str | Path, step: int) -> Path:
    """The temporary folder in which ``step``'s checkpoint is assembled before it is renamed into place."""
    return Path(run_dir) / CHECKPOINTS / f".tmp-{checkpoint_name(step)}"


def stage_checkpoint(run_dir: str | Path, step: int) -> Path:
    """Create ``step``'s staging folder empty, for other processes to write into before ``save_checkpoint``."""
    tmp = staging_folder(run_dir, step)
    with storage_errors(tmp.parent):
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
    return tmp


# A test-only pause (seconds) between writing a checkpoint's weights and its trainer state, so that tests can
# kill a run inside a save (tests/test_faults.py).
_SAVE_DELAY_ENV = "DISTILLM_TEST_SAVE_DELAY"


def save_checkpoint(
    run_dir: str | Path,
    step: int,
    model,
    tokenizer,
    trainer_state: dict[str, Any],
    keep: int = 2,
    state_dict: dict | None = None,
    staged: bool = False,
) -> Path:
    """A resumable checkpoint of ``step``; keeps the newest ``keep`` and removes older ones.

    ``staged``: the staging folder was made by ``stage_checkpoint`` and already holds files (DeepSpeed's
    partitioned state); they are published together with the rest. If the disk is full or the folder not
    writable, raises ``StorageError`` (folder, bytes needed, bytes free), removes the staging folder and
    leaves every earlier checkpoint as it was.
    """
    root = Path(run_dir) / CHECKPOINTS
    final = root / checkpoint_name(step)
    state = {**trainer_state, "rng": capture_rng_state(), "step": step}
    needed = tensor_bytes(_weights(model, state_dict), state)
    tmp = staging_folder(run_dir, step)
    try:
        with storage_errors(root, needed):
            if not staged:
                root.mkdir(parents=True, exist_ok=True)
                check_free_space(root, needed)
                stage_checkpoint(run_dir, step)
            model.save_pretrained(str(tmp), state_dict=state_dict, safe_serialization=True)
            tokenizer.save_pretrained(str(tmp))
            if os.environ.get(_SAVE_DELAY_ENV):
                time.sleep(float(os.environ[_SAVE_DELAY_ENV]))
            torch.save(state, tmp / TRAINER_STATE)
            publish_folder(tmp, final)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    for old in list_checkpoints(run_dir)[:-keep]:
        remove_folder(old)
    logger.info("saved checkpoint %s", final)
    return final


def load_trainer_state(checkpoint: str | Path) -> dict[str, Any]:
    return torch.load(Path(checkpoint) / TRAINER_STATE, map_location="cpu", weights_only=True)


def _read_safetensors(folder: Path, prefix: str) -> dict[str, torch.Tensor]:
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
        from peft import set_peft_model_state_dict  # here: peft is the optional `lora` extra

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


# --------------------------------------------------------------------------------------------------------
# Resuming: which checkpoint, and this process's share of what it saved.


def choose_checkpoint(distributed: Distributed, run_dir: str | Path) -> Path | None:
    """The newest intact checkpoint of ``run_dir`` (verified on the main process, which moves damaged ones
    aside), or None; the same on every process. Call it on every process."""
    choice: list[Any] = [None, None]  # [path, error message]
    if distributed.is_main:
        try:
            found = resumable_checkpoint(run_dir)
            choice[0] = str(found) if found is not None else None
        except UserError as error:
            choice[1] = str(error)
    choice = distributed.broadcast(choice)
    if choice[1] is not None:
        raise NoGoodCheckpointError(choice[1])
    return Path(choice[0]) if choice[0] is not None else None


@dataclass
class Resumed:
    """A checkpoint being resumed: its folder, its ``trainer_state.pt``, and where this process stands."""

    checkpoint: Path
    trainer_state: dict[str, Any]
    rank: int
    world_size: int

    @property
    def process(self) -> dict[str, Any]:
        """What this process saved of its own (the trainer state's ``"processes"``, one entry per process);
        a checkpoint written by another number of processes is refused."""
        processes = self.trainer_state["processes"]
        if len(processes) != self.world_size:
            raise UserError(
                f"{self.checkpoint} was written by {len(processes)} processes; resume it with the same number "
                f"(this run has {self.world_size}), or start a new train.output_dir"
            )
        return processes[self.rank]

    def restore_rng(self) -> None:
        """This process's python, numpy and torch RNG as they were at the checkpoint (call it last)."""
        restore_rng_state(self.process["rng"])


def find_resume(distributed: Distributed, run_dir: str | Path) -> Resumed | None:
    """The checkpoint to resume ``run_dir`` from (``choose_checkpoint``), loaded, or None to start afresh."""
    checkpoint = choose_checkpoint(distributed, run_dir)
    if checkpoint is None:
        return None
    return Resumed(checkpoint, load_trainer_state(checkpoint), distributed.rank, distributed.world_size)


def stopped_writing(what: str, error: Exception, step: int, run_dir: str | Path) -> StorageError:
    """A ``StorageError`` saying what could not be written, where training stopped and what a rerun redoes."""
    previous = [p for p in list_checkpoints(run_dir) if checkpoint_step(p) <= step]
    if previous and checkpoint_step(previous[-1]) == step:
        kept = f"the checkpoint {previous[-1]} of this step is intact (nothing will be redone)"
    elif previous:
        kept = (
            f"the previous checkpoint {previous[-1]} is untouched (steps {checkpoint_step(previous[-1]) + 1}-"
            f"{step} will be redone)"
        )
    else:
        kept = f"there is no earlier checkpoint (the rerun starts over, {step} steps)"
    return StorageError(f"could not write {what}: {error}; training stopped at step {step}, {kept}")
