"""The one training loop, for every method (teacher SFT, student init, SFT, KD, SeqKD, ImitKD, GKD, DistiLLM).

Read ``train`` from top to bottom: one optimizer step is

    dataset micro-batches -> sources pick what to train on (dataset / fresh student samples / replay)
    -> count the step's supervised tokens -> per micro-batch: teacher forward (frozen) -> student forward
    and loss -> backward -> clip, optimizer and scheduler step -> log / evaluate / checkpoint.

Methods differ only in configuration (``objective`` and ``sources``); no method name appears here.
"""

from __future__ import annotations

import contextlib
import json
import logging
import math
import random
import shutil
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from distillm import IGNORE_INDEX
from distillm.checkpoint import (
    CHECKPOINTS,
    DEEPSPEED_STATE,
    capture_rng_state,
    checkpoint_name,
    checkpoint_step,
    list_checkpoints,
    load_model_weights,
    load_trainer_state,
    restore_rng_state,
    resumable_checkpoint,
    save_checkpoint,
    save_model,
    stage_checkpoint,
    staging_folder,
)
from distillm.config import Config, save_config
from distillm.errors import UserError
from distillm.faults import GracefulStop, TrainingStopped
from distillm.models import (
    apply_lora,
    check_same_tokenizer,
    enable_gradient_checkpointing,
    is_adapter,
    load_causal_lm,
    load_lora_student,
    load_tokenizer,
    merge_adapter,
    merge_lora,
    shared_vocab_size,
)
from distillm.objective import StudentObjective, teacher_forward
from distillm.optim import build_optimizer, build_scheduler
from distillm.sources import build_sources
from distillm.storage import StorageError, atomic_write_text, recover_replaced, storage_errors

logger = logging.getLogger(__name__)


class NonFiniteLossError(UserError):
    """The loss became NaN or inf; the last good checkpoint is kept."""


# --------------------------------------------------------------------------------------------------------
# Data order: a seeded permutation per epoch, so a position (epoch, batch) fully determines what comes next.


@dataclass
class BatchOrder:
    """Which rows make micro-batch ``index`` of ``epoch`` on this process; deterministic for ``seed``."""

    num_rows: int
    batch_size: int
    seed: int
    rank: int = 0
    world_size: int = 1
    _epoch_order: tuple[int, torch.Tensor] | None = field(default=None, init=False, repr=False, compare=False)

    @property
    def batches_per_epoch(self) -> int:
        return self.num_rows // (self.batch_size * self.world_size)  # drop the incomplete last batch

    def indices(self, epoch: int, index: int) -> list[int]:
        # One permutation per epoch, kept: a 10M-chunk pretraining corpus would otherwise redraw 80 MB of
        # indices for every micro-batch.
        if self._epoch_order is None or self._epoch_order[0] != epoch:
            generator = torch.Generator().manual_seed(self.seed * 100_003 + epoch)
            self._epoch_order = (epoch, torch.randperm(self.num_rows, generator=generator))
        start = (index * self.world_size + self.rank) * self.batch_size
        return self._epoch_order[1][start : start + self.batch_size].tolist()


@dataclass
class Cursor:
    """Position in a ``BatchOrder``: the next micro-batch to read."""

    epoch: int = 0
    index: int = 0

    def advance(self, order: BatchOrder) -> tuple[int, int]:
        if self.index >= order.batches_per_epoch:
            self.epoch, self.index = self.epoch + 1, 0
        position = (self.epoch, self.index)
        self.index += 1
        return position


@dataclass
class TrainState:
    step: int = 0
    data: Cursor = field(default_factory=Cursor)
    pretrain: Cursor = field(default_factory=Cursor)
    best_metric: float | None = None
    best_step: int | None = None
    tokens_seen: int = 0
    seconds: dict[str, float] = field(
        default_factory=lambda: dict.fromkeys(("generation", "teacher", "student", "evaluation"), 0.0)
    )


@dataclass
class TrainResult:
    output_dir: Path
    steps: int
    best_metric: float | None
    best_step: int | None
    final_dev_loss: float | None
    seconds: dict[str, float]
    source_counts: dict[str, int]


# --------------------------------------------------------------------------------------------------------
# Set-up.


def build_accelerator(config: Config):
    """An accelerate ``Accelerator``; on machines without a GPU it must be built with ``cpu=True``, or a
    multi-process launch silently runs independent single-process jobs (see docs/distributed.md).

    Under ``accelerate launch`` with a DeepSpeed config, ``cpu=True`` would silently turn DeepSpeed off, so
    without a GPU DeepSpeed gets the gloo backend instead. An FSDP config without a GPU is refused.
    """
    import os

    from accelerate import Accelerator
    from accelerate.utils import InitProcessGroupKwargs

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


def configure_deepspeed(accelerator, config: Config) -> None:
    """Give DeepSpeed the batch geometry it needs before ``prepare``.

    The loop hands DeepSpeed no DataLoader, so the micro-batch size and the accumulation steps are set here
    (the loop marks the last micro-batch of a step with ``micro_batch``); clipping moves into the engine.
    """
    plugin = accelerator.state.deepspeed_plugin
    if plugin is None:
        return
    # Under ZeRO-3 the chunked loss reads the student's partitioned lm_head inside the engine's forward,
    # where DeepSpeed gathers a parameter used outside its own module and registers it as external to the
    # module running (StudentObjective); its gradient, computed in forward, is reduce-scattered as usual.
    ds = plugin.deepspeed_config
    ds["train_micro_batch_size_per_gpu"] = config.train.batch_size
    ds["gradient_accumulation_steps"] = config.train.grad_accum
    ds["train_batch_size"] = config.train.batch_size * config.train.grad_accum * accelerator.num_processes
    ds["gradient_clipping"] = config.train.clip_grad  # 0 turns it off, as train.clip_grad=0 does


def backward_scale(accelerator) -> int:
    """What each micro-batch's loss is multiplied by before ``accelerator.backward``.

    The loss is already a share of the whole step's token mean (all micro-batches, all processes). DDP and
    DeepSpeed average gradients over processes, and DeepSpeed divides each micro-batch's loss by its
    accumulation steps; both assume per-micro-batch means, so both are undone here.
    """
    plugin = accelerator.state.deepspeed_plugin
    accumulation = plugin.deepspeed_config["gradient_accumulation_steps"] if plugin is not None else 1
    return accelerator.num_processes * accumulation


@contextlib.contextmanager
def micro_batch(accelerator, objective, last: bool):
    """One micro-batch's forward and backward; gradients are synchronised on the step's last one only.

    DDP skips its all-reduce under ``no_sync``. accelerate steps a DeepSpeed engine inside every backward
    unless ``sync_gradients`` is off, which also tells the engine where the accumulation boundary is.
    """
    deepspeed = accelerator.state.deepspeed_plugin is not None
    if deepspeed:
        accelerator.sync_gradients = last
    try:
        with accelerator.no_sync(objective) if not last else contextlib.nullcontext():
            yield
    finally:
        if deepspeed:
            accelerator.sync_gradients = True


@contextlib.contextmanager
def loading_whole_models(accelerator):
    """Load models whole on every process, even under ZeRO-3.

    accelerate registers its ZeRO-3 config with transformers whatever ``zero3_init_flag`` says, and
    ``from_pretrained`` then partitions every model at load. The frozen teacher must stay whole (it runs
    outside the engine), and a whole student lets the vocabulary checks and resuming read its weights
    before the engine partitions it in ``prepare``.
    """
    if not _is_zero3(accelerator):
        yield
        return
    from transformers.integrations.deepspeed import unset_hf_deepspeed_config

    unset_hf_deepspeed_config()
    try:
        yield
    finally:
        accelerator.state.deepspeed_plugin.set_deepspeed_weakref()


def _is_zero3(accelerator) -> bool:
    plugin = accelerator.state.deepspeed_plugin
    return plugin is not None and plugin.zero_stage == 3


class WholeStudent:
    """Under ZeRO-3 or FSDP, a whole copy of the student for what runs outside the engine's forward.

    Evaluation, ROUGE-L generations and student-generated training sequences apply the student's lm_head
    outside its own module (supervised positions only, a head-only decoding step), where ZeRO-3 has not
    gathered it. And sharded parameters are gathered in every forward, a collective every process must join
    the same number of times, while these forwards differ per process: generations stop at each process's
    own EOS, dev batches are grouped by each process's row lengths. So those run on a plain copy on every
    process, refreshed from the engine's sharded weights when they changed.
    """

    def __init__(self, student: torch.nn.Module, fsdp: bool):
        import copy

        self.model = copy.deepcopy(student)
        self.fsdp = fsdp
        self.step: int | None = None

    def refreshed(self, accelerator, objective: torch.nn.Module, step: int) -> torch.nn.Module:
        """The copy holding the weights of optimizer step ``step``; ``objective`` is the prepared engine.

        Call it on every process: it gathers.
        """
        if self.step != step:
            if self.fsdp:
                self._copy_fsdp(objective)
            else:
                self._copy_zero3(_unwrap(accelerator, objective).student)
            self.step = step
        return self.model

    def _copy_zero3(self, partitioned: torch.nn.Module) -> None:
        """Copy a ZeRO-3-partitioned student into the copy, gathering ~``_REFRESH_GROUP`` weights at a time."""
        import deepspeed

        pairs = list(zip(self.model.parameters(), partitioned.parameters(), strict=True))
        for group in size_groups(pairs, lambda pair: getattr(pair[1], "ds_numel", pair[1].numel())):
            with deepspeed.zero.GatheredParameters([theirs for _, theirs in group]):  # whole inside
                for mine, theirs in group:
                    mine.data.copy_(theirs.data)

    def _copy_fsdp(self, objective: torch.nn.Module) -> None:
        """Copy the full weights of an FSDP-sharded ``StudentObjective`` (FSDP 1 or 2) into the copy."""
        from torch.distributed.tensor import DTensor

        params = dict(objective.named_parameters())
        with torch.no_grad():
            if all(isinstance(p, DTensor) for p in params.values()):  # FSDP 2: one parameter at a time
                for name, mine in self.model.named_parameters():
                    mine.copy_(params[f"student.{name}"].full_tensor())
                return
            from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

            # FSDP 1 gathers the full state dict (every process receives every tensor without cpu_offload).
            state = get_model_state_dict(objective, options=StateDictOptions(full_state_dict=True))
            for name, mine in self.model.named_parameters():
                mine.copy_(state[f"student.{name}"])


# Weights gathered at once while a ZeRO-3 WholeStudent is refreshed (256 MB in fp32): the gathered copy is
# transient memory on every process, so it is bounded instead of a whole second student.
_REFRESH_GROUP = 1 << 26


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


def _student_outside_engine(accelerator, objective, whole: WholeStudent | None, step: int):
    """The student to evaluate or sample from: the engine's own, or under ZeRO-3 / FSDP the refreshed copy."""
    if whole is not None:
        return whole.refreshed(accelerator, objective, step)
    return _unwrap(accelerator, objective).student


def _sharded(accelerator) -> bool:
    """Whether the student's parameters are split over processes (ZeRO-3, FSDP): saving must gather them, and
    every process must run the same number of student forwards."""
    from accelerate.utils import DistributedType

    return accelerator.distributed_type == DistributedType.FSDP or _is_zero3(accelerator)


def _student_state_dict(accelerator, objective) -> dict[str, torch.Tensor] | None:
    """The student's full weights gathered from every process when sharded (call on all ranks), else None."""
    if not _sharded(accelerator):
        return None
    state = accelerator.get_state_dict(objective)
    return {k.removeprefix("student."): v for k, v in state.items()} if state is not None else None


def synchronize(device: torch.device) -> None:
    """Wait for the work queued on ``device``: CUDA runs kernels asynchronously, so a phase's wall time
    (``teacher_s``, ``student_s`` in metrics.jsonl) is only its own once the device has finished it.
    A no-op on the CPU, whose operations return when done."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def load_models(config: Config, device: torch.device):
    """Tokenizer, student (LoRA-wrapped if asked), frozen teacher or None, and the shared vocabulary size."""
    m = config.model
    tokenizer = load_tokenizer(m.tokenizer or m.student, m.trust_remote_code, role="student")
    if m.lora.enabled and is_adapter(m.student):
        student = load_lora_student(m.student, m.trust_remote_code)  # keep training the saved adapter
    else:
        student = load_causal_lm(m.student, "fp32", m.trust_remote_code, role="student")
        if m.lora.enabled:
            student = apply_lora(student, m.lora)
    if m.gradient_checkpointing:
        enable_gradient_checkpointing(student)
    teacher = None
    vocab_size = student.get_output_embeddings().weight.shape[0]
    needs_teacher = config.objective.kd_ratio > 0 or config.sources.generator == "teacher"
    if needs_teacher:
        teacher_tokenizer = load_tokenizer(m.teacher, m.trust_remote_code, role="teacher")
        check_same_tokenizer(tokenizer, teacher_tokenizer, m.tokenizer or m.student, m.teacher)
        teacher = load_causal_lm(m.teacher, m.teacher_dtype, m.trust_remote_code, role="teacher")
        if m.teacher_adapter:
            teacher = merge_adapter(teacher, m.teacher_adapter)
        teacher.requires_grad_(False).eval().to(device)
        vocab_size = shared_vocab_size(student, teacher, tokenizer)
    return tokenizer, student, teacher, vocab_size


@dataclass
class TrainingData:
    train: Any  # TokenizedDataset
    dev: Any | None
    dev_examples: list
    pretrain: Any | None


def load_data(config: Config, tokenizer, cache_dir: Path) -> TrainingData:
    """Read, split, tokenize (cached) the instruction data and, if configured, the pretraining corpus."""
    from distillm.data import load_pretrain, prepare_dataset, read_examples, split_dev
    from distillm.data.indexed import find_shards, load_indexed_instruction

    d = config.data
    if find_shards(d.train):  # MiniLLM's processed .bin/.idx: its ids, its .jsonl's text (docs/data.md)
        train, dev, dev_rows = load_indexed_instruction(
            d, tokenizer, cache_dir, config.seed, config.train.batch_size
        )
        pretrain = load_pretrain(d.pretrain, tokenizer, d.max_length, cache_dir) if d.pretrain else None
        return TrainingData(train=train, dev=dev, dev_examples=dev_rows, pretrain=pretrain)
    examples, _ = read_examples(d.train, d.format)
    if d.dev is not None:
        train_rows = examples
        dev_rows, _ = read_examples(d.dev, d.format)
    else:
        train_rows, dev_rows = split_dev(examples, d.dev_size, d.dev_split, config.seed)
    dev_rows = [
        example.for_evaluation() for example in dev_rows
    ]  # SeqKD rows: the ground truth, not the teacher's
    if len(train_rows) < config.train.batch_size:
        raise UserError(
            f"{d.train}: {len(train_rows)} training rows is fewer than train.batch_size={config.train.batch_size}"
        )

    def prepare(rows):
        return prepare_dataset(rows, tokenizer, d.template, d.max_length, d.max_prompt_length, cache_dir)

    train = prepare(train_rows)
    dev = prepare(dev_rows) if dev_rows else None
    # A prepared folder or MiniLLM's .bin/.idx keeps its own chunk length; a text file is cut at max_length.
    pretrain = load_pretrain(d.pretrain, tokenizer, d.max_length, cache_dir) if d.pretrain else None
    return TrainingData(train=train, dev=dev, dev_examples=list(dev_rows), pretrain=pretrain)


def check_pretrain_positions(student, chunk_length: int, source: str) -> None:
    """Refuse pretraining chunks longer than the student's position embeddings (inputs are C - 1 tokens)."""
    from distillm.models import unwrap_peft

    model_config = unwrap_peft(student).config
    positions = getattr(model_config, "n_positions", None) or getattr(
        model_config, "max_position_embeddings", None
    )
    if isinstance(positions, int) and chunk_length - 1 > positions:
        raise UserError(
            f"data.pretrain={source}: chunks of {chunk_length} tokens give inputs of {chunk_length - 1}, more "
            f"than the student's {positions} positions; prepare the corpus with --chunk-length {positions + 1} "
            "or less (a text file is cut at data.max_length)"
        )


def total_optimizer_steps(config: Config, order: BatchOrder) -> int:
    if config.train.max_steps > 0:
        return config.train.max_steps
    steps = order.batches_per_epoch * config.train.epochs // config.train.grad_accum
    if steps < 1:
        raise UserError(
            f"{order.num_rows} training rows make no optimizer step of train.batch_size={config.train.batch_size} "
            f"x train.grad_accum={config.train.grad_accum} x {order.world_size} processes; lower them or set "
            "train.max_steps"
        )
    return steps


def steps_per_epoch(config: Config, order: BatchOrder) -> int:
    return max(1, order.batches_per_epoch // config.train.grad_accum)


# --------------------------------------------------------------------------------------------------------
# Evaluation on the dev split.


@torch.no_grad()
def dev_loss(
    model, dataset, collate, pad_token_id: int, batch_size: int, accelerator, vocab_size: int
) -> float:
    """Mean token cross-entropy of ``model`` on the ground-truth responses of ``dataset``."""
    from distillm.losses.reduction import token_cross_entropy
    from distillm.objective import supervised_logits

    was_training = model.training
    model.eval()
    total = torch.zeros(2, dtype=torch.float64, device=accelerator.device)  # [sum CE, tokens]
    rows = list(range(accelerator.process_index, len(dataset), accelerator.num_processes))
    for start in range(0, len(rows), batch_size):
        batch = collate([dataset[i] for i in rows[start : start + batch_size]], pad_token_id)
        batch = {k: v.to(accelerator.device) for k, v in batch.items()}
        labels = batch["labels"][batch["labels"] != IGNORE_INDEX]  # [N]
        logits = supervised_logits(model, batch, vocab_size)  # [N, V]
        total[0] += token_cross_entropy(logits, labels).double().sum()
        total[1] += labels.numel()
    total = accelerator.reduce(total, reduction="sum")
    model.train(was_training)
    return float(total[0] / total[1].clamp_min(1))


def dev_rouge(model, tokenizer, examples, config: Config, accelerator, seed: int) -> float:
    """Mean ROUGE-L of sampled dev responses (rows sharded over processes, gathered in order)."""
    from distillm.evaluate import generate_predictions, score_predictions

    limit = config.train.eval_rouge_rows or len(examples)
    rows = examples[:limit]
    mine = rows[accelerator.process_index :: accelerator.num_processes]
    predictions = generate_predictions(
        model,
        tokenizer,
        mine,
        config.generation,
        seed=seed,
        template=config.data.template,
        max_prompt_length=config.data.max_prompt_length,
        progress=False,
    )
    from accelerate.utils import gather_object

    gathered = gather_object([predictions]) if accelerator.num_processes > 1 else [predictions]  # rank order
    ordered: list[str] = [None] * len(rows)  # type: ignore[list-item]
    for rank, part in enumerate(gathered):
        ordered[rank :: accelerator.num_processes] = part
    return float(score_predictions(ordered, rows)["rougeL"])


# --------------------------------------------------------------------------------------------------------
# The loop.


def _count_tokens(batches: list[dict[str, torch.Tensor]], accelerator) -> torch.Tensor:
    """Supervised tokens of the whole optimizer step, over all micro-batches and processes."""
    local = sum((b["labels"] != IGNORE_INDEX).sum() for b in batches)
    local = torch.as_tensor(local, device=accelerator.device, dtype=torch.long)
    return accelerator.reduce(local, reduction="sum")


class MetricsLog:
    """metrics.jsonl in the run folder (and any accelerate trackers); rank zero only."""

    def __init__(self, path: Path, accelerator, resume_step: int | None):
        self.path, self.accelerator = path, accelerator
        if accelerator.is_main_process and resume_step is not None and path.exists():
            # Rows logged after the checkpoint belong to the abandoned part of the killed run; so does a last
            # line cut short by the kill.
            rows = []
            for line in path.read_text(encoding="utf-8").splitlines():
                try:
                    rows.append(json.loads(line))
                except ValueError:
                    logger.warning("%s: dropping an incomplete line written when the run was killed", path)
            kept = [r for r in rows if r.get("step", 0) <= resume_step]
            atomic_write_text(path, "".join(json.dumps(r) + "\n" for r in kept))

    def write(self, row: dict[str, Any]) -> None:
        if not self.accelerator.is_main_process:
            return
        with storage_errors(self.path.parent), open(self.path, "a", encoding="utf-8") as handle:
            handle.write(json.dumps(row) + "\n")
        numeric = {k: v for k, v in row.items() if isinstance(v, (int, float)) and k != "step"}
        if self.accelerator.trackers:
            self.accelerator.log(numeric, step=row["step"])


def train(config: Config) -> TrainResult:
    """Run (or resume) the training described by ``config``; returns where things were written.

    SIGTERM or SIGINT stops it at the next optimizer-step boundary with a checkpoint (``TrainingStopped``);
    a full disk stops it with ``StorageError``; either way a rerun resumes (docs/faults.md).
    """
    config.validate()
    with GracefulStop() as stop:
        return _train(config, stop)


def _train(config: Config, stop: GracefulStop) -> TrainResult:
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()  # per-file load/save bars would bury the training bar
    accelerator = build_accelerator(config)
    out = Path(config.train.output_dir)
    cache_dir = Path(config.data.cache_dir) if config.data.cache_dir else out.parent / ".cache"
    if accelerator.is_main_process:
        with storage_errors(out):
            out.mkdir(parents=True, exist_ok=True)
        save_config(config, out / "config.yaml")
        for folder in ("best", "last"):
            recover_replaced(out / folder)  # a kill between the two renames that replace it
    accelerator.wait_for_everyone()
    seed_everything(config.seed + accelerator.process_index)  # distinct dropout per process, as the original

    with loading_whole_models(accelerator):
        tokenizer, student, teacher, vocab_size = load_models(config, accelerator.device)
    with accelerator.main_process_first():  # one process tokenizes into the cache, the others reuse it
        data = load_data(config, tokenizer, cache_dir)
    if data.pretrain is not None:
        check_pretrain_positions(student, data.pretrain.chunk_length, config.data.pretrain)
    from distillm.data import collate

    order = BatchOrder(
        len(data.train),
        config.train.batch_size,
        config.seed,
        accelerator.process_index,
        accelerator.num_processes,
    )
    total_steps = total_optimizer_steps(config, order)
    epoch_steps = steps_per_epoch(config, order)
    eval_every = config.train.eval_every or epoch_steps
    save_every = config.train.save_every or epoch_steps
    pretrain_order = (
        BatchOrder(len(data.pretrain), config.train.batch_size, config.seed + 1, order.rank, order.world_size)
        if data.pretrain is not None
        else None
    )

    # Sharded parameters are gathered in every forward: all processes must run the same number of them.
    objective = StudentObjective(student, config.objective, vocab_size, sharded=_sharded(accelerator))
    optimizer = build_optimizer(objective, config.train)
    scheduler = build_scheduler(optimizer, total_steps, config.train)
    sources = build_sources(
        config, tokenizer, teacher, total_steps, accelerator.device, accelerator.process_index
    )
    state = TrainState()

    checkpoint = _choose_checkpoint(accelerator, out) if config.train.resume else None
    if checkpoint is not None:
        load_model_weights(student, checkpoint)
        saved = load_trainer_state(checkpoint)
        if saved["optimizer"] is not None:
            optimizer.load_state_dict(saved["optimizer"])
        elif accelerator.state.deepspeed_plugin is None:  # the engine holds it: restored after prepare
            raise UserError(
                f"{checkpoint} was written under DeepSpeed (its optimizer state is in {DEEPSPEED_STATE}/); "
                "resume it with the same DeepSpeed config and number of processes, or start a new "
                "train.output_dir"
            )
        scheduler.load_state_dict(saved["scheduler"])
        mine = _this_process_state(saved, accelerator, checkpoint)
        sources.load_state_dict(mine["sources"])
        state = _state_from_dict(saved["train"])
        logger.info("resumed from %s (step %d)", checkpoint, state.step)

    configure_deepspeed(accelerator, config)
    whole = WholeStudent(student, fsdp=not _is_zero3(accelerator)) if _sharded(accelerator) else None
    objective, optimizer = accelerator.prepare(objective, optimizer)
    if checkpoint is not None and accelerator.state.deepspeed_plugin is not None:
        _load_engine_state(objective, checkpoint)
    if checkpoint is not None:
        restore_rng_state(_this_process_state(load_trainer_state(checkpoint), accelerator, checkpoint)["rng"])
    if config.train.report_to:
        accelerator.init_trackers("distillm", config={"seed": config.seed})
    metrics = MetricsLog(out / "metrics.jsonl", accelerator, state.step if checkpoint is not None else None)
    if checkpoint is None and accelerator.is_main_process and (out / "metrics.jsonl").exists():
        (out / "metrics.jsonl").unlink()

    seconds = state.seconds  # carried in checkpoints, so a resumed run reports the whole run's time
    all_sources: list[str] = []  # this process's source of every micro-batch, to check that ranks agree
    last_dev_loss = None
    pad = tokenizer.pad_token_id
    samples_student = config.sources.kind != "dataset" and config.sources.generator == "student"

    from tqdm.auto import tqdm

    bar = tqdm(
        total=total_steps,
        initial=state.step,
        desc=f"train {out.name}",
        disable=not (config.train.progress and accelerator.is_main_process),
        dynamic_ncols=True,
    )
    if checkpoint is None and data.dev is not None:
        # The reference point: the adaptive schedule compares later dev losses with this one, and the
        # curves in metrics.jsonl start from the untrained student.
        evaluated = _student_outside_engine(accelerator, objective, whole, state.step)
        evaluation = _evaluate(config, accelerator, evaluated, tokenizer, data, vocab_size, 0)
        sources.on_evaluation(evaluation["dev_loss"])
        metrics.write({"step": 0, **evaluation, **sources.describe()})
    step_start = time.perf_counter()
    while state.step < total_steps:
        # 1. This step's micro-batches: dataset rows, then the sources decide what is trained on.
        micro_batches, step_sources = [], []
        sampling_student = (
            _student_outside_engine(accelerator, objective, whole, state.step)
            if samples_student
            else _unwrap(accelerator, objective).student
        )
        step_seconds = dict.fromkeys(("generation", "teacher", "student"), 0.0)
        for _ in range(config.train.grad_accum):
            epoch, index = state.data.advance(order)
            rows = [data.train[i] for i in order.indices(epoch, index)]
            dataset_batch = collate(rows, pad)
            t0 = time.perf_counter()
            batch, source = sources.next_batch(dataset_batch, state.step, sampling_student)
            step_seconds["generation"] += time.perf_counter() - t0 if source != "dataset" else 0.0
            micro_batches.append({k: v.to(accelerator.device) for k, v in batch.items()})
            step_sources.append(source)
            all_sources.append(source)
        pretrain_batches = [None] * len(micro_batches)
        pretrain_tokens = None
        if pretrain_order is not None and config.objective.lm_coef > 0:
            pretrain_batches = []
            for _ in micro_batches:
                epoch, index = state.pretrain.advance(pretrain_order)
                chunk = data.pretrain.collate(
                    [data.pretrain[i] for i in pretrain_order.indices(epoch, index)]
                )
                pretrain_batches.append({k: v.to(accelerator.device) for k, v in chunk.items()})
            pretrain_tokens = _count_tokens(pretrain_batches, accelerator)

        # 2. Normalise by the supervised tokens of the whole step (all micro-batches, all processes), so
        #    that batch 4 x accumulation 1 and 2 x 2 give the same loss and gradient.
        num_tokens = _count_tokens(micro_batches, accelerator)
        # Each process's loss is a share of the global token sum: undo the averaging over processes (DDP,
        # DeepSpeed) and DeepSpeed's division by the accumulation steps.
        scale = backward_scale(accelerator)
        logged = torch.zeros(4, device=accelerator.device)  # total, ce, divergence, lm
        for k, (batch, pretrain_batch) in enumerate(zip(micro_batches, pretrain_batches)):
            t0 = time.perf_counter()
            teacher_out = (
                teacher_forward(teacher, batch, vocab_size, chunked=config.objective.chunk_size > 0)
                if teacher is not None and config.objective.kd_ratio > 0
                else None
            )
            synchronize(accelerator.device)
            t1 = time.perf_counter()
            step_seconds["teacher"] += t1 - t0
            with micro_batch(accelerator, objective, last=k == len(micro_batches) - 1):
                loss = objective(batch, num_tokens, teacher_out, pretrain_batch, pretrain_tokens)
                accelerator.backward(loss.total * scale)
            synchronize(accelerator.device)
            step_seconds["student"] += time.perf_counter() - t1
            logged += torch.stack([loss.total.detach(), loss.ce, loss.divergence, loss.lm]).float()

        # 3. Check, clip, step.
        logged = accelerator.reduce(logged, reduction="sum")
        if not torch.isfinite(logged[0]):
            raise NonFiniteLossError(
                f"the loss became {logged[0].item()} at optimizer step {state.step + 1}; the last good checkpoint "
                f"in {out / 'checkpoints'} is kept. Lower train.lr, use train.precision=fp32, or check the data"
            )
        t0 = time.perf_counter()
        grad_norm = (
            accelerator.clip_grad_norm_(objective.parameters(), config.train.clip_grad)
            if config.train.clip_grad > 0
            else None
        )
        optimizer.step()
        scheduler.step()
        optimizer.zero_grad(set_to_none=True)
        synchronize(accelerator.device)
        step_seconds["student"] += time.perf_counter() - t0
        for key, value in step_seconds.items():
            seconds[key] += value
        state.step += 1
        state.tokens_seen += int(num_tokens)

        # 4. Log, evaluate, checkpoint.
        elapsed = time.perf_counter() - step_start
        step_start = time.perf_counter()
        row = {
            "step": state.step,
            "loss": logged[0].item(),
            "ce": logged[1].item(),
            "divergence": logged[2].item(),
            "lm": logged[3].item(),
            "lr": scheduler.get_last_lr()[0],
            "tokens": int(num_tokens),
            "tokens_per_s": int(num_tokens) / max(elapsed, 1e-9),
            "sources": ",".join(step_sources),
            **{f"{key}_s": value for key, value in step_seconds.items()},
        }
        if grad_norm is not None:
            row["grad_norm"] = float(grad_norm)
        bar.update(1)
        bar.set_postfix(loss=f"{row['loss']:.4f}", lr=f"{row['lr']:.2e}", tok_s=f"{row['tokens_per_s']:.0f}")
        if state.step % config.train.log_every == 0 or state.step == total_steps:
            metrics.write(row)

        if state.step % eval_every == 0 or state.step == total_steps:
            t0 = time.perf_counter()
            evaluated = _student_outside_engine(accelerator, objective, whole, state.step)
            evaluation = _evaluate(config, accelerator, evaluated, tokenizer, data, vocab_size, state.step)
            seconds["evaluation"] += time.perf_counter() - t0
            last_dev_loss = evaluation.get("dev_loss", last_dev_loss)
            if "dev_loss" in evaluation:
                sources.on_evaluation(evaluation["dev_loss"])
            evaluation.update(sources.describe())
            metrics.write({"step": state.step, **evaluation})
            _keep_best(config, accelerator, objective, tokenizer, state, evaluation, out)

        if state.step % save_every == 0 or state.step == total_steps:
            _save(config, accelerator, objective, tokenizer, optimizer, scheduler, sources, state, out)

        # 5. A signal on any process stops every process here, at the same step, after a checkpoint.
        if state.step < total_steps and stop.agreed(_any_process(accelerator)):
            if state.step % save_every != 0:
                _save(config, accelerator, objective, tokenizer, optimizer, scheduler, sources, state, out)
            bar.close()
            raise TrainingStopped(
                stop.signal_name, state.step, out / CHECKPOINTS / checkpoint_name(state.step)
            )
    bar.close()

    weights = _student_state_dict(accelerator, objective)
    sources_by_rank = _gather_sources(accelerator, all_sources)

    def write_last() -> None:
        model = _unwrap(accelerator, objective).student
        extra = {"step": state.step, "dev_loss": last_dev_loss}
        save_model(out / "last", model, tokenizer, state_dict=weights, extra=extra)
        if config.model.lora.enabled and config.model.lora.merge_on_save:
            save_model(out / "merged", merge_lora(model), tokenizer, extra=extra)
        summary = {
            "world_size": accelerator.num_processes,
            "sources_by_rank": sources_by_rank,
            "steps": state.step,
            "seconds": seconds,
            "source_counts": {k: v for k, v in sources.counts.items() if v},
            "tokens": state.tokens_seen,
        }
        atomic_write_text(
            out / "summary.json", json.dumps(summary, indent=2)
        )  # written last: the run is done

    try:
        _together(accelerator, write_last if accelerator.is_main_process else None, "the final model")
    except StorageError as error:
        raise _stopped_writing(f"{out / 'last'}", error, state.step, out) from error
    accelerator.end_training()
    counts = {k: v for k, v in sources.counts.items() if v}
    return TrainResult(out, state.step, state.best_metric, state.best_step, last_dev_loss, seconds, counts)


# --------------------------------------------------------------------------------------------------------
# Named steps of the loop.


def _unwrap(accelerator, objective) -> StudentObjective:
    return accelerator.unwrap_model(objective)


def _evaluate(config, accelerator, student, tokenizer, data, vocab_size, step) -> dict[str, float]:
    from distillm.data import collate

    result: dict[str, float] = {}
    if data.dev is not None:
        result["dev_loss"] = dev_loss(
            student,
            data.dev,
            collate,
            tokenizer.pad_token_id,
            config.train.batch_size,
            accelerator,
            vocab_size,
        )
        result["dev_ppl"] = math.exp(min(result["dev_loss"], 50.0))
    if config.train.eval_rouge and data.dev_examples:
        result["dev_rougeL"] = dev_rouge(
            student, tokenizer, data.dev_examples, config, accelerator, seed=config.seed
        )
    if result:
        logger.info("step %d: %s", step, ", ".join(f"{k} {v:.4f}" for k, v in result.items()))
    return result


def _keep_best(config, accelerator, objective, tokenizer, state: TrainState, evaluation, out: Path) -> None:
    key = "dev_rougeL" if config.train.select_by == "rougeL" else "dev_loss"
    if key not in evaluation:
        return
    value = evaluation[key]
    better = state.best_metric is None or (
        value > state.best_metric if key == "dev_rougeL" else value < state.best_metric
    )
    if not better:
        return
    state.best_metric, state.best_step = value, state.step
    weights = _student_state_dict(accelerator, objective)

    def write_best() -> None:
        model = _unwrap(accelerator, objective).student
        save_model(
            out / "best", model, tokenizer, state_dict=weights, extra={"step": state.step, **evaluation}
        )

    try:
        _together(accelerator, write_best if accelerator.is_main_process else None, "the best model")
    except StorageError as error:
        raise _stopped_writing(f"{out / 'best'} of step {state.step}", error, state.step, out) from error


def _any_process(accelerator):
    """``flag -> bool``: True on every process when ``flag`` is True on any (None for a single process)."""
    if accelerator.num_processes == 1:
        return None

    def any_process(flag: bool) -> bool:
        count = torch.tensor(int(flag), device=accelerator.device)
        return bool(accelerator.reduce(count, reduction="sum").item() > 0)

    return any_process


def _together(accelerator, work, what: str):
    """Run ``work`` (writing files; None: nothing on this process), then agree: if it failed on any process,
    every process raises, instead of the others waiting for it in the next collective until a timeout."""
    error: BaseException | None = None
    result = None
    try:
        if work is not None:
            result = work()
    except Exception as caught:  # noqa: BLE001 - re-raised below, on every process
        error = caught
    if accelerator.num_processes > 1:
        code = 0 if error is None else (1 if isinstance(error, StorageError) else 2)
        worst = torch.tensor(code, device=accelerator.device)
        worst = int(_reduce_max(accelerator, worst))
        if error is None and worst:
            kind = StorageError if worst == 1 else RuntimeError
            raise kind(f"another process could not write {what} (its error is in its log)")
    if error is not None:
        raise error
    return result


def _reduce_max(accelerator, value: torch.Tensor) -> int:
    import torch.distributed as dist

    dist.all_reduce(value, op=dist.ReduceOp.MAX)
    return int(value.item())


def _choose_checkpoint(accelerator, out: Path) -> Path | None:
    """The newest intact checkpoint (verified on the main process, which moves damaged ones aside), or None;
    the same on every process."""
    choice: list[Any] = [None, None]  # [path, error message]
    if accelerator.is_main_process:
        try:
            found = resumable_checkpoint(out)
            choice[0] = str(found) if found is not None else None
        except UserError as error:
            choice[1] = str(error)
    if accelerator.num_processes > 1:
        from accelerate.utils import broadcast_object_list

        choice = broadcast_object_list(choice)
    if choice[1] is not None:
        from distillm.checkpoint import NoGoodCheckpointError

        raise NoGoodCheckpointError(choice[1])
    return Path(choice[0]) if choice[0] is not None else None


def _gather_sources(accelerator, sources: list[str]) -> list[str]:
    """Every process's micro-batch sources, comma-joined, in rank order (they must all be equal)."""
    if accelerator.num_processes == 1:
        return [",".join(sources)]
    from accelerate.utils import gather_object

    return gather_object([",".join(sources)])


def _save(config, accelerator, objective, tokenizer, optimizer, scheduler, sources, state, out) -> None:
    accelerator.wait_for_everyone()
    weights = _student_state_dict(accelerator, objective)
    # Each process has its own replay buffer, sampling stream and RNG: all of them go into the checkpoint.
    per_process = _gather_to_main(accelerator, {"sources": sources.state_dict(), "rng": capture_rng_state()})
    deepspeed = accelerator.state.deepspeed_plugin is not None

    def write_checkpoint() -> None:
        trainer_state = {
            "optimizer": None if deepspeed else optimizer.state_dict(),
            "scheduler": scheduler.state_dict(),
            "processes": per_process,
            "train": _state_to_dict(state),
        }
        model = _unwrap(accelerator, objective).student
        save_checkpoint(
            out,
            state.step,
            model,
            tokenizer,
            trainer_state,
            keep=config.train.keep_checkpoints,
            state_dict=weights,
            staged=deepspeed,
        )

    main = accelerator.is_main_process
    try:
        if deepspeed:
            # Each process writes its partition of the optimizer state into the folder being assembled; rank 0
            # then adds the rest and renames the whole folder into place.
            _together(
                accelerator, (lambda: stage_checkpoint(out, state.step)) if main else None, "a checkpoint"
            )
            engine_folder = staging_folder(out, state.step) / DEEPSPEED_STATE
            _together(
                accelerator,
                lambda: objective.save_checkpoint(str(engine_folder), tag=_ENGINE_TAG, save_latest=False),
                "a checkpoint",
            )
        _together(accelerator, write_checkpoint if main else None, "a checkpoint")
    except StorageError as error:
        if main:
            shutil.rmtree(staging_folder(out, state.step), ignore_errors=True)
        raise _stopped_writing(f"the checkpoint of step {state.step}", error, state.step, out) from error


def _stopped_writing(what: str, error: StorageError, step: int, out: Path) -> StorageError:
    """``error`` with what could not be written, where training stopped and what a rerun redoes."""
    previous = [p for p in list_checkpoints(out) if checkpoint_step(p) <= step]
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


_ENGINE_TAG = "engine"


def _load_engine_state(engine, checkpoint: Path) -> None:
    """Restore a DeepSpeed engine (this process's optimizer partition included) from a distillm checkpoint."""
    folder = checkpoint / DEEPSPEED_STATE
    if not (folder / _ENGINE_TAG).is_dir():
        raise UserError(
            f"{checkpoint} holds no DeepSpeed state ({folder}/{_ENGINE_TAG}): it was written without DeepSpeed. "
            "Resume it without DeepSpeed, or start a new train.output_dir"
        )
    path, _ = engine.load_checkpoint(
        str(folder), tag=_ENGINE_TAG, load_optimizer_states=True, load_lr_scheduler_states=False
    )
    if path is None:
        raise UserError(f"DeepSpeed could not load {folder}/{_ENGINE_TAG}; start a new train.output_dir")


def _gather_to_main(accelerator, payload: dict[str, Any]) -> list[dict[str, Any]]:
    """``payload`` of every process, in rank order (complete on the main process)."""
    if accelerator.num_processes == 1:
        return [payload]
    from accelerate.utils import gather_object

    return gather_object([payload])


def _this_process_state(saved: dict[str, Any], accelerator, checkpoint: Path) -> dict[str, Any]:
    processes = saved["processes"]
    if len(processes) != accelerator.num_processes:
        raise UserError(
            f"{checkpoint} was written by {len(processes)} processes; resume it with the same number "
            f"(this run has {accelerator.num_processes}), or start a new train.output_dir"
        )
    return processes[accelerator.process_index]


def _state_to_dict(state: TrainState) -> dict[str, Any]:
    return {
        "step": state.step,
        "data": [state.data.epoch, state.data.index],
        "pretrain": [state.pretrain.epoch, state.pretrain.index],
        "best_metric": state.best_metric,
        "best_step": state.best_step,
        "tokens_seen": state.tokens_seen,
        "seconds": dict(state.seconds),
    }


def _state_from_dict(saved: dict[str, Any]) -> TrainState:
    return TrainState(
        step=saved["step"],
        data=Cursor(*saved["data"]),
        pretrain=Cursor(*saved["pretrain"]),
        best_metric=saved["best_metric"],
        best_step=saved["best_step"],
        tokens_seen=saved["tokens_seen"],
        seconds=dict(saved["seconds"]),
    )


# --------------------------------------------------------------------------------------------------------
# `distillm train`


def add_arguments(parser) -> None:
    import argparse

    from distillm.config import format_help

    parser.formatter_class = argparse.RawDescriptionHelpFormatter
    parser.description = (
        "Train a model: teacher fine-tuning, student initialisation, or any distillation method.\n"
        "A preset (YAML) fills the configuration; KEY=VALUE overrides follow it, e.g.\n"
        "  distillm train --config configs/tiny/distillm.yaml train.max_steps=200 seed=1\n"
        "A run resumes from the newest checkpoint in train.output_dir unless train.resume=false."
    )
    parser.epilog = "configuration keys (KEY=DEFAULT):" + format_help()
    parser.add_argument("--config", help="YAML preset (see configs/).")
    parser.add_argument(
        "--resume", action="store_true", help="Require a checkpoint in train.output_dir to resume from."
    )
    parser.add_argument("overrides", nargs="*", metavar="KEY=VALUE", help="Dotted configuration overrides.")


def run(args) -> int:
    from distillm.config import load_config

    config = load_config(args.config, args.overrides)
    if args.resume:
        if not config.train.resume:
            raise UserError("--resume contradicts train.resume=false")
        if not list_checkpoints(config.train.output_dir):
            raise UserError(
                f"--resume: no checkpoint in {config.train.output_dir}/checkpoints to resume from"
            )
    result = train(config)
    logger.info(
        "done: %d steps in %s (best %s at step %s)",
        result.steps,
        result.output_dir,
        result.best_metric,
        result.best_step,
    )
    return 0
