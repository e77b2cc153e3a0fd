"""One object that owns the accelerator and the engine, for every training loop.

A loop (``distillm.train``, MiniLLM's) builds a ``Distributed`` from the config, loads its models inside
``loading_whole_models()``, hands its objective and optimizer to ``prepare``, and from then on asks it:

    micro_batch(last)        around each micro-batch's forward and backward (where gradients synchronise)
    backward(loss)           the loss, a share of the whole step's token mean, scaled for DDP / DeepSpeed
    clip_grad_norm(max)      clipping (inside the engine under DeepSpeed)
    student                  the student as the engine holds it (to save its config / tokenizer with it)
    whole_student(step)      the student to evaluate or sample from outside the engine's forward
    student_state_dict()     its full weights, gathered when sharded
    sum / gather / broadcast / any_process / together      the collectives a loop needs
    save_checkpoint / load_engine_state / optimizer_state  checkpoints, DeepSpeed's partitions included

On one process without DeepSpeed every collective is the identity, and nothing here costs anything.
Which backends are used and why: docs/distributed.md.
"""

from __future__ import annotations

import contextlib
import copy
import os
import shutil
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any, TypeVar

import torch
import torch.distributed as dist
from accelerate import Accelerator
from accelerate.utils import DistributedType, InitProcessGroupKwargs, broadcast_object_list, gather_object
from torch import nn

from distillm.checkpoint import DEEPSPEED_STATE, save_checkpoint, stage_checkpoint, staging_folder
from distillm.config import Config
from distillm.errors import UserError
from distillm.storage import StorageError

T = TypeVar("T")

# The DeepSpeed engine's checkpoint tag inside a step's ``deepspeed/`` folder.
ENGINE_TAG = "engine"

# Weights gathered at once while a ZeRO-3 WholeStudent is refreshed (256 MB in fp32): the gathered copy is
# transient memory on every process, so it is bounded instead of a whole second student.
_REFRESH_GROUP = 1 << 26


def build_accelerator(config: Config) -> Accelerator:
    """An accelerate ``Accelerator``; on machines without a GPU it must be built with ``cpu=True``, or a
    multi-process launch silently runs independent single-process jobs (see docs/distributed.md).

    Under ``accelerate launch`` with a DeepSpeed config, ``cpu=True`` would silently turn DeepSpeed off, so
    without a GPU DeepSpeed gets the gloo backend instead. An FSDP config without a GPU is refused.
    """
    mixed = {"fp32": "no", "bf16": "bf16", "fp16": "fp16"}[config.train.precision]
    log_with = list(config.train.report_to) or None
    gpu = torch.cuda.is_available()
    deepspeed = os.environ.get("ACCELERATE_USE_DEEPSPEED", "false").lower() == "true"
    if os.environ.get("ACCELERATE_USE_FSDP", "false").lower() == "true" and not gpu:
        # accelerate turns FSDP on only over an accelerator device; on CPU it would silently fall back to
        # plain data parallelism (cpu=True) or to independent single-process jobs.
        raise UserError(
            "FSDP needs GPUs: accelerate does not shard over CPU processes. Without a GPU use "
            "configs/accelerate/zero3-cpu.yaml (DeepSpeed ZeRO-3 shards on CPU), or torchrun for plain data "
            "parallelism (docs/distributed.md)"
        )
    return Accelerator(
        cpu=not gpu and not deepspeed,
        mixed_precision=mixed,
        log_with=log_with,
        project_dir=config.train.output_dir,
        kwargs_handlers=[InitProcessGroupKwargs(backend="gloo")] if deepspeed and not gpu else None,
    )


class Distributed:
    """The accelerator and, after ``prepare``, the engine (DDP / DeepSpeed / FSDP wrapper) of one run."""

    def __init__(self, config: Config, accelerator: Accelerator | None = None):
        self.config = config
        self.accelerator = accelerator if accelerator is not None else build_accelerator(config)
        self.engine: nn.Module | None = None  # the prepared objective, set by ``prepare``
        self._whole: WholeStudent | None = None

    # ---- where this process stands ----------------------------------------------------------------------

    @property
    def device(self) -> torch.device:
        return self.accelerator.device

    @property
    def rank(self) -> int:
        return self.accelerator.process_index

    @property
    def world_size(self) -> int:
        return self.accelerator.num_processes

    @property
    def is_main(self) -> bool:
        return self.accelerator.is_main_process

    @property
    def deepspeed(self) -> bool:
        """Whether a DeepSpeed engine runs the student (it then holds the optimizer state and clipping)."""
        return self.accelerator.state.deepspeed_plugin is not None

    @property
    def zero3(self) -> bool:
        plugin = self.accelerator.state.deepspeed_plugin
        return plugin is not None and plugin.zero_stage == 3

    @property
    def sharded(self) -> bool:
        """Whether the student's parameters are split over processes (ZeRO-3, FSDP): saving must gather them,
        and every process must run the same number of student forwards."""
        return self.accelerator.distributed_type == DistributedType.FSDP or self.zero3

    # ---- set-up -------------------------------------------------------------------------------------------

    @contextlib.contextmanager
    def loading_whole_models(self) -> Iterator[None]:
        """Load models whole on every process, even under ZeRO-3.

        accelerate registers its ZeRO-3 config with transformers whatever ``zero3_init_flag`` says, and
        ``from_pretrained`` then partitions every model at load. The frozen teacher must stay whole (it runs
        outside the engine), and a whole student lets the vocabulary checks and resuming read its weights
        before the engine partitions it in ``prepare``.
        """
        if not self.zero3:
            yield
            return
        # Imported here: transformers' DeepSpeed integration is only needed (and importable) under DeepSpeed.
        from transformers.integrations.deepspeed import unset_hf_deepspeed_config

        unset_hf_deepspeed_config()
        try:
            yield
        finally:
            self.accelerator.state.deepspeed_plugin.set_deepspeed_weakref()

    def main_process_first(self):
        """Run the block on the main process first (it fills a cache), then on the others."""
        return self.accelerator.main_process_first()

    def prepare(self, objective: nn.Module, optimizer: torch.optim.Optimizer):
        """Wrap ``objective`` (a module with a ``student`` attribute) and ``optimizer`` for this launch;
        returns ``(engine, optimizer)``. Under ZeRO-3 / FSDP a whole copy of the student is kept first."""
        self._configure_deepspeed()
        if self.sharded:
            self._whole = WholeStudent(objective.student, fsdp=not self.zero3)
        self.engine, optimizer = self.accelerator.prepare(objective, optimizer)
        return self.engine, optimizer

    def _configure_deepspeed(self) -> None:
        """Give DeepSpeed the batch geometry it needs before ``prepare``.

        The loop hands DeepSpeed no DataLoader, so the micro-batch size and the accumulation steps are set
        here (the loop marks the last micro-batch of a step with ``micro_batch``); clipping moves into the
        engine.
        """
        plugin = self.accelerator.state.deepspeed_plugin
        if plugin is None:
            return
        # Under ZeRO-3 the chunked loss reads the student's partitioned lm_head inside the engine's forward,
        # where DeepSpeed gathers a parameter used outside its own module and registers it as external to the
        # module running (StudentObjective); its gradient, computed in forward, is reduce-scattered as usual.
        train = self.config.train
        ds = plugin.deepspeed_config
        ds["train_micro_batch_size_per_gpu"] = train.batch_size
        ds["gradient_accumulation_steps"] = train.grad_accum
        ds["train_batch_size"] = train.batch_size * train.grad_accum * self.world_size
        ds["gradient_clipping"] = train.clip_grad  # 0 turns it off, as train.clip_grad=0 does

    # ---- one optimizer step -------------------------------------------------------------------------------

    @property
    def backward_scale(self) -> int:
        """What each micro-batch's loss is multiplied by before the backward.

        The loss is already a share of the whole step's token mean (all micro-batches, all processes). DDP
        and DeepSpeed average gradients over processes, and DeepSpeed divides each micro-batch's loss by its
        accumulation steps; both assume per-micro-batch means, so both are undone here.
        """
        plugin = self.accelerator.state.deepspeed_plugin
        accumulation = plugin.deepspeed_config["gradient_accumulation_steps"] if plugin is not None else 1
        return self.world_size * accumulation

    @contextlib.contextmanager
    def micro_batch(self, last: bool) -> Iterator[None]:
        """One micro-batch's forward and backward; gradients are synchronised on the step's last one only.

        DDP skips its all-reduce under ``no_sync``. accelerate steps a DeepSpeed engine inside every backward
        unless ``sync_gradients`` is off, which also tells the engine where the accumulation boundary is.
        """
        if self.deepspeed:
            self.accelerator.sync_gradients = last
        try:
            with self.accelerator.no_sync(self.engine) if not last else contextlib.nullcontext():
                yield
        finally:
            if self.deepspeed:
                self.accelerator.sync_gradients = True

    def backward(self, loss: torch.Tensor) -> None:
        """Backward of ``loss``, a share of the step's global token mean (see ``backward_scale``)."""
        self.accelerator.backward(loss * self.backward_scale)

    def clip_grad_norm(self, max_norm: float) -> torch.Tensor | None:
        """Clip the gradients' global norm to ``max_norm`` and return it before clipping; None when 0."""
        if max_norm <= 0:
            return None
        return self.accelerator.clip_grad_norm_(self.engine.parameters(), max_norm)

    # ---- the student outside the engine -------------------------------------------------------------------

    @property
    def objective(self) -> nn.Module:
        """The prepared objective, unwrapped from its engine."""
        return self.accelerator.unwrap_model(self.engine)

    @property
    def student(self) -> nn.Module:
        """The student the engine trains (partitioned under ZeRO-3: use it for its config and saving)."""
        return self.objective.student

    def whole_student(self, step: int) -> nn.Module:
        """The student to evaluate or sample from: the engine's own, or under ZeRO-3 / FSDP a whole copy
        holding the weights of optimizer step ``step``. Call it on every process: it may gather."""
        if self._whole is not None:
            return self._whole.refreshed(self.accelerator, self.engine, step)
        return self.student

    def student_state_dict(self) -> dict[str, torch.Tensor] | None:
        """The student's full weights gathered from every process when sharded (call on all ranks), else
        None (the student's own ``state_dict`` is whole)."""
        if not self.sharded:
            return None
        state = self.accelerator.get_state_dict(self.engine)
        return {k.removeprefix("student."): v for k, v in state.items()} if state is not None else None

    # ---- collectives ---------------------------------------------------------------------------------------

    def sum(self, tensor: torch.Tensor) -> torch.Tensor:
        """``tensor`` summed over processes (the same on every process)."""
        return self.accelerator.reduce(tensor, reduction="sum")

    def gather(self, item: T) -> list[T]:
        """``item`` of every process, in rank order (complete on every process)."""
        if self.world_size == 1:
            return [item]
        return gather_object([item])

    def broadcast(self, item: T) -> T:
        """The main process's ``item``, on every process."""
        if self.world_size == 1:
            return item
        return broadcast_object_list([item])[0]

    def any_process(self) -> Callable[[bool], bool] | None:
        """``flag -> bool``: True on every process when ``flag`` is True on any (None for a single process)."""
        if self.world_size == 1:
            return None

        def any_process(flag: bool) -> bool:
            return bool(self.sum(torch.tensor(int(flag), device=self.device)).item() > 0)

        return any_process

    def wait_for_everyone(self) -> None:
        self.accelerator.wait_for_everyone()

    def together(self, work: Callable[[], T] | None, what: str) -> T | None:
        """Run ``work`` (writing files; None: nothing on this process), then agree: if it failed on any
        process, every process raises, instead of the others waiting for it in the next collective until a
        timeout."""
        error: BaseException | None = None
        result = None
        try:
            if work is not None:
                result = work()
        except Exception as caught:  # noqa: BLE001 - re-raised below, on every process
            error = caught
        if self.world_size > 1:
            code = 0 if error is None else (1 if isinstance(error, StorageError) else 2)
            worst = torch.tensor(code, device=self.device)
            dist.all_reduce(worst, op=dist.ReduceOp.MAX)
            worst = int(worst.item())
            if error is None and worst:
                kind = StorageError if worst == 1 else RuntimeError
                raise kind(f"another process could not write {what} (its error is in its log)")
        if error is not None:
            raise error
        return result

    def on_main(self, work: Callable[[], T], what: str) -> T | None:
        """``together`` with ``work`` run on the main process only."""
        return self.together(work if self.is_main else None, what)

    # ---- checkpoints ----------------------------------------------------------------------------------------

    def optimizer_state(self, optimizer: torch.optim.Optimizer) -> dict[str, Any] | None:
        """What a checkpoint keeps of the optimizer: its state, or None under DeepSpeed, whose engine saves
        every process's partition itself (``save_checkpoint``)."""
        return None if self.deepspeed else optimizer.state_dict()

    def load_optimizer_state(
        self, optimizer: torch.optim.Optimizer, saved: dict[str, Any] | None, checkpoint: Path
    ) -> None:
        """Restore ``optimizer_state``'s result (before ``prepare``); DeepSpeed's waits for ``load_engine_state``."""
        if saved is not None:
            optimizer.load_state_dict(saved)
        elif not self.deepspeed:
            raise UserError(
                f"{checkpoint} was written under DeepSpeed (its optimizer state is in {DEEPSPEED_STATE}/); "
                "resume it with the same DeepSpeed config and number of processes, or start a new "
                "train.output_dir"
            )

    def save_checkpoint(
        self, run_dir: Path, step: int, tokenizer, trainer_state: dict[str, Any], keep: int
    ) -> None:
        """Write ``step``'s checkpoint (call on every process): the student's full weights, ``trainer_state``
        and, under DeepSpeed, each process's partition of the engine's state, published together.

        Raises ``StorageError`` on every process if any could not write; the staging folder is removed.
        """
        self.wait_for_everyone()
        weights = self.student_state_dict()
        try:
            if self.deepspeed:
                # Each process writes its partition of the optimizer state into the folder being assembled;
                # the main process then adds the rest and renames the whole folder into place.
                self.on_main(lambda: stage_checkpoint(run_dir, step), "a checkpoint")
                engine_folder = staging_folder(run_dir, step) / DEEPSPEED_STATE
                self.together(
                    lambda: self.engine.save_checkpoint(
                        str(engine_folder), tag=ENGINE_TAG, save_latest=False
                    ),
                    "a checkpoint",
                )
            self.on_main(
                lambda: save_checkpoint(
                    run_dir,
                    step,
                    self.student,
                    tokenizer,
                    trainer_state,
                    keep=keep,
                    state_dict=weights,
                    staged=self.deepspeed,
                ),
                "a checkpoint",
            )
        except StorageError:
            if self.is_main:
                shutil.rmtree(staging_folder(run_dir, step), ignore_errors=True)
            raise

    def load_engine_state(self, checkpoint: Path) -> None:
        """Under DeepSpeed, restore the engine (this process's optimizer partition included) from a distillm
        checkpoint, after ``prepare``; nothing otherwise."""
        if not self.deepspeed:
            return
        folder = checkpoint / DEEPSPEED_STATE
        if not (folder / ENGINE_TAG).is_dir():
            raise UserError(
                f"{checkpoint} holds no DeepSpeed state ({folder}/{ENGINE_TAG}): it was written without "
                "DeepSpeed. Resume it without DeepSpeed, or start a new train.output_dir"
            )
        path, _ = self.engine.load_checkpoint(
            str(folder), tag=ENGINE_TAG, load_optimizer_states=True, load_lr_scheduler_states=False
        )
        if path is None:
            raise UserError(f"DeepSpeed could not load {folder}/{ENGINE_TAG}; start a new train.output_dir")

    # ---- trackers and the end ------------------------------------------------------------------------------

    def init_trackers(self, name: str, config: dict[str, Any]) -> None:
        self.accelerator.init_trackers(name, config=config)

    def log(self, values: dict[str, float], step: int) -> None:
        """Send ``values`` to the accelerate trackers (train.report_to), if any."""
        if self.accelerator.trackers:
            self.accelerator.log(values, step=step)

    def end(self) -> None:
        self.accelerator.end_training()


class WholeStudent:
    """Under ZeRO-3 or FSDP, a whole copy of the student for what runs outside the engine's forward.

    Evaluation, ROUGE-L generations and student-generated training sequences apply the student's lm_head
    outside its own module (supervised positions only, a head-only decoding step), where ZeRO-3 has not
    gathered it. And sharded parameters are gathered in every forward, a collective every process must join
    the same number of times, while these forwards differ per process: generations stop at each process's
    own EOS, dev batches are grouped by each process's row lengths. So those run on a plain copy on every
    process, refreshed from the engine's sharded weights when they changed.
    """

    def __init__(self, student: nn.Module, fsdp: bool):
        self.model = copy.deepcopy(student)
        self.fsdp = fsdp
        self.step: int | None = None

    def refreshed(self, accelerator: Accelerator, objective: nn.Module, step: int) -> nn.Module:
        """The copy holding the weights of optimizer step ``step``; ``objective`` is the prepared engine.

        Call it on every process: it gathers.
        """
        if self.step != step:
            if self.fsdp:
                self._copy_fsdp(objective)
            else:
                self._copy_zero3(accelerator.unwrap_model(objective).student)
            self.step = step
        return self.model

    def _copy_zero3(self, partitioned: nn.Module) -> None:
        """Copy a ZeRO-3-partitioned student into the copy, gathering ~``_REFRESH_GROUP`` weights at a time."""
        # Imported here: deepspeed is an optional extra, installed only where ZeRO-3 runs.
        import deepspeed

        pairs = list(zip(self.model.parameters(), partitioned.parameters(), strict=True))
        for group in size_groups(pairs, lambda pair: getattr(pair[1], "ds_numel", pair[1].numel())):
            with deepspeed.zero.GatheredParameters([theirs for _, theirs in group]):  # whole inside
                for mine, theirs in group:
                    mine.data.copy_(theirs.data)

    def _copy_fsdp(self, objective: nn.Module) -> None:
        """Copy the full weights of an FSDP-sharded ``StudentObjective`` (FSDP 1 or 2) into the copy."""
        # Imported here: torch.distributed's tensor and checkpoint packages load only where FSDP runs.
        from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict
        from torch.distributed.tensor import DTensor

        params = dict(objective.named_parameters())
        with torch.no_grad():
            if all(isinstance(p, DTensor) for p in params.values()):  # FSDP 2: one parameter at a time
                for name, mine in self.model.named_parameters():
                    mine.copy_(params[f"student.{name}"].full_tensor())
                return
            # FSDP 1 gathers the full state dict (every process receives every tensor without cpu_offload).
            state = get_model_state_dict(objective, options=StateDictOptions(full_state_dict=True))
            for name, mine in self.model.named_parameters():
                mine.copy_(state[f"student.{name}"])


def size_groups(items: list, size, limit: int = _REFRESH_GROUP) -> list[list]:
    """``items`` in order, cut into consecutive groups that each close once their ``size(item)`` sum reaches
    ``limit`` (so a group exceeds it by less than its last item)."""
    groups: list[list] = [[]]
    total = 0
    for item in items:
        groups[-1].append(item)
        total += size(item)
        if total >= limit:
            groups.append([])
            total = 0
    return [group for group in groups if group]
