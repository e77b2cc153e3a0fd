"""The one training loop for the token-level methods (teacher SFT, student init, SFT, KD, SeqKD, ImitKD, GKD,
DistiLLM).

``train`` reads top to bottom: ``setup`` (models, data, objective, optimizer, sources), resume from the newest
checkpoint, then per optimizer step

    step_batches   dataset micro-batches -> sources pick what to train on (dataset / fresh samples / replay)
                   -> count the step's supervised tokens (all micro-batches, all processes)
    loss_step      per micro-batch: teacher forward (frozen) -> student forward and loss -> backward
    optimizer_step check the loss is finite -> clip -> optimizer and scheduler step
    evaluate       dev loss (and ROUGE-L) -> the adaptive schedule -> keep the best model
    save           a resumable checkpoint

Methods differ only in configuration (``objective`` and ``sources``); no method name appears here. The
accelerator, the engine and every collective belong to ``distillm.distributed``; saving and resuming to
``distillm.checkpoint``.
"""

from __future__ import annotations

import argparse
import json
import logging
import math
import random
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor, nn
from tqdm.auto import tqdm
from transformers.utils import logging as hf_logging

from distillm import IGNORE_INDEX
from distillm.checkpoint import (
    CHECKPOINTS,
    Resumed,
    capture_rng_state,
    checkpoint_name,
    find_resume,
    list_checkpoints,
    load_model_weights,
    save_model,
    stopped_writing,
)
from distillm.config import Config, format_help, load_config, save_config
from distillm.data import collate, load_pretrain, prepare_dataset, read_examples, split_dev
from distillm.data.indexed import find_shards, load_indexed_instruction
from distillm.distributed import Distributed
from distillm.errors import UserError
from distillm.evaluate import dev_loss, dev_rouge
from distillm.faults import GracefulStop, TrainingStopped
from distillm.loops import run_training
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
    unwrap_peft,
)
from distillm.objective import StudentObjective, teacher_forward
from distillm.optim import build_optimizer, build_scheduler
from distillm.sources import Sources, build_sources
from distillm.storage import StorageError, atomic_write_text, recover_replaced, storage_errors

logger = logging.getLogger(__name__)

Batch = dict[str, Tensor]


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

    def to_dict(self) -> dict[str, Any]:
        return {
            "step": self.step,
            "data": [self.data.epoch, self.data.index],
            "pretrain": [self.pretrain.epoch, self.pretrain.index],
            "best_metric": self.best_metric,
            "best_step": self.best_step,
            "tokens_seen": self.tokens_seen,
            "seconds": dict(self.seconds),
        }

    @classmethod
    def from_dict(cls, saved: dict[str, Any]) -> TrainState:
        return cls(
            step=saved["step"],
            data=Cursor(*saved["data"]),
            pretrain=Cursor(*saved["pretrain"]),
            best_metric=saved["best_metric"],
            best_step=saved["best_step"],
            tokens_seen=saved["tokens_seen"],
            seconds=dict(saved["seconds"]),
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
# Set-up and resuming.


@dataclass
class Run:
    """Everything a training run carries from one step to the next (made by ``setup``)."""

    config: Config
    distributed: Distributed
    out: Path
    tokenizer: Any
    teacher: nn.Module | None
    vocab_size: int
    data: TrainingData
    order: BatchOrder
    pretrain_order: BatchOrder | None
    total_steps: int
    eval_every: int
    save_every: int
    objective: nn.Module  # the StudentObjective; after ``Distributed.prepare``, its engine
    optimizer: torch.optim.Optimizer
    scheduler: Any
    sources: Sources
    state: TrainState = field(default_factory=TrainState)
    metrics: MetricsLog | None = None
    last_dev_loss: float | None = None
    all_sources: list[str] = field(default_factory=list)  # every micro-batch's source: ranks must agree

    @property
    def pad(self) -> int:
        return self.tokenizer.pad_token_id

    def due(self, every: int) -> bool:
        """Whether the step just taken is a multiple of ``every`` or the last one."""
        return self.state.step % every == 0 or self.state.step == self.total_steps


def setup(config: Config) -> Run:
    """The run folder, models, data, data order, objective, optimizer, scheduler and sources of ``config``."""
    hf_logging.disable_progress_bar()  # per-file load/save bars would bury the training bar
    distributed = Distributed(config)
    out = Path(config.train.output_dir)
    cache_dir = Path(config.data.cache_dir) if config.data.cache_dir else out.parent / ".cache"
    if distributed.is_main:
        with storage_errors(out):
            out.mkdir(parents=True, exist_ok=True)
        save_config(config, out / "config.yaml")
        for folder in ("best", "last"):
            recover_replaced(out / folder)  # a kill between the two renames that replace it
    distributed.wait_for_everyone()
    seed_everything(config.seed + distributed.rank)  # distinct dropout per process, as the original

    with distributed.loading_whole_models():
        tokenizer, student, teacher, vocab_size = load_models(config, distributed.device)
    with distributed.main_process_first():  # one process tokenizes into the cache, the others reuse it
        data = load_data(config, tokenizer, cache_dir)
    if data.pretrain is not None:
        check_pretrain_positions(student, data.pretrain.chunk_length, config.data.pretrain)

    batch_size, rank, world_size = config.train.batch_size, distributed.rank, distributed.world_size
    order = BatchOrder(len(data.train), batch_size, config.seed, rank, world_size)
    pretrain_order = (
        BatchOrder(len(data.pretrain), batch_size, config.seed + 1, rank, world_size)
        if data.pretrain is not None
        else None
    )
    total_steps = total_optimizer_steps(config, order)
    epoch_steps = steps_per_epoch(config, order)
    # Sharded parameters are gathered in every forward: all processes must run the same number of them.
    objective = StudentObjective(student, config.objective, vocab_size, sharded=distributed.sharded)
    optimizer = build_optimizer(objective, config.train)
    return Run(
        config=config,
        distributed=distributed,
        out=out,
        tokenizer=tokenizer,
        teacher=teacher,
        vocab_size=vocab_size,
        data=data,
        order=order,
        pretrain_order=pretrain_order,
        total_steps=total_steps,
        eval_every=config.train.eval_every or epoch_steps,
        save_every=config.train.save_every or epoch_steps,
        objective=objective,
        optimizer=optimizer,
        scheduler=build_scheduler(optimizer, total_steps, config.train),
        sources=build_sources(config, tokenizer, teacher, total_steps, distributed.device, rank),
    )


def restore(run: Run, resumed: Resumed) -> None:
    """Load a checkpoint's student weights, optimizer, scheduler, sources and position (before ``prepare``;
    the DeepSpeed engine's state and the RNG follow after it)."""
    saved = resumed.trainer_state
    load_model_weights(run.objective.student, resumed.checkpoint)
    run.distributed.load_optimizer_state(run.optimizer, saved["optimizer"], resumed.checkpoint)
    run.scheduler.load_state_dict(saved["scheduler"])
    run.sources.load_state_dict(resumed.process["sources"])
    run.state = TrainState.from_dict(saved["train"])
    logger.info("resumed from %s (step %d)", resumed.checkpoint, run.state.step)


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


# --------------------------------------------------------------------------------------------------------
# Models, data and the number of steps.


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
# The loop.


def train(config: Config) -> TrainResult:
    """Run (or resume) the training described by ``config``; returns where things were written.

    SIGTERM or SIGINT stops it at the next optimizer-step boundary with a checkpoint (``TrainingStopped``);
    a full disk stops it with ``StorageError``; either way a rerun resumes (docs/faults.md).
    """
    config.validate()
    with GracefulStop() as stop:
        run = setup(config)
        resumed = find_resume(run.distributed, run.out) if config.train.resume else None
        if resumed is not None:
            restore(run, resumed)  # before prepare: the whole student, the optimizer, sources, position
        run.objective, run.optimizer = run.distributed.prepare(run.objective, run.optimizer)
        if resumed is not None:
            run.distributed.load_engine_state(resumed.checkpoint)  # DeepSpeed's partitions, if any
            resumed.restore_rng()
        if config.train.report_to:
            run.distributed.init_trackers("distillm", config={"seed": config.seed})
        run.metrics = MetricsLog(
            run.out / "metrics.jsonl", run.distributed, run.state.step if resumed else None
        )
        bar = tqdm(
            total=run.total_steps,
            initial=run.state.step,
            desc=f"train {run.out.name}",
            disable=not (config.train.progress and run.distributed.is_main),
            dynamic_ncols=True,
        )
        if resumed is None and run.data.dev is not None:
            # The reference point: the adaptive schedule compares later dev losses with this one, and the
            # curves in metrics.jsonl start from the untrained student.
            evaluate(run, reference=True)
        step_start = time.perf_counter()
        while run.state.step < run.total_steps:
            batches = step_batches(run)
            logged = loss_step(run, batches)
            grad_norm = optimizer_step(run, batches, logged)
            elapsed, step_start = time.perf_counter() - step_start, time.perf_counter()
            log_step(run, batches, logged, grad_norm, elapsed, bar)
            if run.due(run.eval_every):
                evaluate(run)
            if run.due(run.save_every):
                save(run)
            # A signal on any process stops every process here, at the same step, after a checkpoint.
            if run.state.step < run.total_steps and stop.agreed(run.distributed.any_process()):
                if run.state.step % run.save_every != 0:
                    save(run)
                bar.close()
                checkpoint = run.out / CHECKPOINTS / checkpoint_name(run.state.step)
                raise TrainingStopped(stop.signal_name, run.state.step, checkpoint)
        bar.close()
        return finish(run)


@dataclass
class StepBatches:
    """One optimizer step's micro-batches (on the device) and what they are made of."""

    micro: list[Batch]
    pretrain: list[Batch | None]  # a pretraining chunk batch per micro-batch (the LM term), or Nones
    sources: list[str]  # where each micro-batch's sequences came from
    num_tokens: Tensor  # supervised tokens of the whole step: all micro-batches, all processes
    pretrain_tokens: Tensor | None
    seconds: dict[str, float] = field(
        default_factory=lambda: dict.fromkeys(("generation", "teacher", "student"), 0.0)
    )


def step_batches(run: Run) -> StepBatches:
    """This step's micro-batches: dataset rows in the seeded order, then the sources decide what is trained
    on; and the pretraining chunks of the LM term."""
    config, state, device = run.config, run.state, run.distributed.device
    samples_student = config.sources.kind != "dataset" and config.sources.generator == "student"
    sampler = run.distributed.whole_student(state.step) if samples_student else run.distributed.student
    micro, sources = [], []
    seconds = dict.fromkeys(("generation", "teacher", "student"), 0.0)
    for _ in range(config.train.grad_accum):
        epoch, index = state.data.advance(run.order)
        dataset_batch = collate([run.data.train[i] for i in run.order.indices(epoch, index)], run.pad)
        t0 = time.perf_counter()
        batch, source = run.sources.next_batch(dataset_batch, state.step, sampler)
        seconds["generation"] += time.perf_counter() - t0 if source != "dataset" else 0.0
        micro.append({k: v.to(device) for k, v in batch.items()})
        sources.append(source)
    run.all_sources += sources
    pretrain: list[Batch | None] = [None] * len(micro)
    pretrain_tokens = None
    if run.pretrain_order is not None and config.objective.lm_coef > 0:
        pretrain = []
        for _ in micro:
            epoch, index = state.pretrain.advance(run.pretrain_order)
            chunk = run.data.pretrain.collate(
                [run.data.pretrain[i] for i in run.pretrain_order.indices(epoch, index)]
            )
            pretrain.append({k: v.to(device) for k, v in chunk.items()})
        pretrain_tokens = count_tokens(pretrain, run.distributed)
    # Normalise by the supervised tokens of the whole step (all micro-batches, all processes), so that
    # batch 4 x accumulation 1 and 2 x 2 give the same loss and gradient.
    num_tokens = count_tokens(micro, run.distributed)
    return StepBatches(micro, pretrain, sources, num_tokens, pretrain_tokens, seconds)


def loss_step(run: Run, batches: StepBatches) -> Tensor:
    """Forward and backward of every micro-batch; returns [total, ce, divergence, lm] of the step, summed
    over micro-batches and processes (each already a share of the step's token mean)."""
    config, distributed, seconds = run.config, run.distributed, batches.seconds
    logged = torch.zeros(4, device=distributed.device)  # total, ce, divergence, lm
    for k, (batch, pretrain_batch) in enumerate(zip(batches.micro, batches.pretrain)):
        t0 = time.perf_counter()
        teacher_out = (
            teacher_forward(run.teacher, batch, run.vocab_size, chunked=config.objective.chunk_size > 0)
            if run.teacher is not None and config.objective.kd_ratio > 0
            else None
        )
        synchronize(distributed.device)
        t1 = time.perf_counter()
        seconds["teacher"] += t1 - t0
        with distributed.micro_batch(last=k == len(batches.micro) - 1):
            loss = run.objective(
                batch, batches.num_tokens, teacher_out, pretrain_batch, batches.pretrain_tokens
            )
            distributed.backward(loss.total)  # scaled: the loss is a share of the global token mean
        synchronize(distributed.device)
        seconds["student"] += time.perf_counter() - t1
        logged += torch.stack([loss.total.detach(), loss.ce, loss.divergence, loss.lm]).float()
    return distributed.sum(logged)


def optimizer_step(run: Run, batches: StepBatches, logged: Tensor) -> Tensor | None:
    """Refuse a non-finite loss, clip, step the optimizer and the scheduler; returns the gradient norm."""
    if not torch.isfinite(logged[0]):
        raise NonFiniteLossError(
            f"the loss became {logged[0].item()} at optimizer step {run.state.step + 1}; the last good "
            f"checkpoint in {run.out / 'checkpoints'} is kept. Lower train.lr, use train.precision=fp32, or "
            "check the data"
        )
    t0 = time.perf_counter()
    grad_norm = run.distributed.clip_grad_norm(run.config.train.clip_grad)
    run.optimizer.step()
    run.scheduler.step()
    run.optimizer.zero_grad(set_to_none=True)
    synchronize(run.distributed.device)
    batches.seconds["student"] += time.perf_counter() - t0
    for key, value in batches.seconds.items():
        run.state.seconds[key] += value
    run.state.step += 1
    run.state.tokens_seen += int(batches.num_tokens)
    return grad_norm


def log_step(run: Run, batches: StepBatches, logged: Tensor, grad_norm, elapsed: float, bar) -> None:
    num_tokens = int(batches.num_tokens)
    row = {
        "step": run.state.step,
        "loss": logged[0].item(),
        "ce": logged[1].item(),
        "divergence": logged[2].item(),
        "lm": logged[3].item(),
        "lr": run.scheduler.get_last_lr()[0],
        "tokens": num_tokens,
        "tokens_per_s": num_tokens / max(elapsed, 1e-9),
        "sources": ",".join(batches.sources),
        **{f"{key}_s": value for key, value in batches.seconds.items()},
    }
    if grad_norm is not None:
        row["grad_norm"] = float(grad_norm)
    bar.update(1)
    bar.set_postfix(loss=f"{row['loss']:.4f}", lr=f"{row['lr']:.2e}", tok_s=f"{row['tokens_per_s']:.0f}")
    if run.due(run.config.train.log_every):
        run.metrics.write(row)


def measure_student(run) -> dict[str, float]:
    """Dev loss, perplexity and (``train.eval_rouge``) dev ROUGE-L of the current whole student, logged;
    shared by both loops (``run`` is either loop's run: config, distributed, data, tokenizer, pad, vocab_size,
    state.step)."""
    config, distributed, step = run.config, run.distributed, run.state.step
    student = distributed.whole_student(step)
    evaluation: dict[str, float] = {}
    if run.data.dev is not None:
        evaluation["dev_loss"] = dev_loss(
            student,
            run.data.dev,
            collate,
            run.pad,
            config.train.batch_size,
            distributed.accelerator,
            run.vocab_size,
        )
        evaluation["dev_ppl"] = math.exp(min(evaluation["dev_loss"], 50.0))
    if config.train.eval_rouge and run.data.dev_examples:
        evaluation["dev_rougeL"] = dev_rouge(
            student, run.tokenizer, run.data.dev_examples, config, distributed, seed=config.seed
        )
    if evaluation:
        logger.info("step %d: %s", step, ", ".join(f"{k} {v:.4f}" for k, v in evaluation.items()))
    return evaluation


def evaluate(run: Run, reference: bool = False) -> None:
    """Dev loss (and ROUGE-L) of the current student, logged; the sources' schedule sees the dev loss, and
    the best model so far is kept. ``reference``: the untrained student's evaluation before step 1 (only
    logged and shown to the schedule)."""
    step = run.state.step
    t0 = time.perf_counter()
    evaluation = measure_student(run)
    if not reference:
        run.state.seconds["evaluation"] += time.perf_counter() - t0
        run.last_dev_loss = evaluation.get("dev_loss", run.last_dev_loss)
    if "dev_loss" in evaluation:
        run.sources.on_evaluation(evaluation["dev_loss"])
    evaluation.update(run.sources.describe())
    run.metrics.write({"step": step, **evaluation})
    if not reference:
        keep_best(run, evaluation)


def keep_best(run: Run, evaluation: dict[str, float]) -> None:
    """Write ``best/`` when ``evaluation`` beats the best so far by train.select_by."""
    state, distributed = run.state, run.distributed
    key = "dev_rougeL" if run.config.train.select_by == "rougeL" else "dev_loss"
    if key not in evaluation:
        return
    value = evaluation[key]
    better = state.best_metric is None or (
        value > state.best_metric if key == "dev_rougeL" else value < state.best_metric
    )
    if not better:
        return
    state.best_metric, state.best_step = value, state.step
    weights = distributed.student_state_dict()
    extra = {"step": state.step, **evaluation}
    try:
        distributed.on_main(
            lambda: save_model(
                run.out / "best", distributed.student, run.tokenizer, state_dict=weights, extra=extra
            ),
            "the best model",
        )
    except StorageError as error:
        raise stopped_writing(
            f"{run.out / 'best'} of step {state.step}", error, state.step, run.out
        ) from error


def save(run: Run) -> None:
    """A resumable checkpoint of this step (every process takes part)."""
    distributed, state = run.distributed, run.state
    # Each process has its own replay buffer, sampling stream and RNG: all of them go into the checkpoint.
    per_process = distributed.gather({"sources": run.sources.state_dict(), "rng": capture_rng_state()})
    trainer_state = {
        "optimizer": distributed.optimizer_state(run.optimizer),
        "scheduler": run.scheduler.state_dict(),
        "processes": per_process,
        "train": state.to_dict(),
    }
    try:
        distributed.save_checkpoint(
            run.out, state.step, run.tokenizer, trainer_state, keep=run.config.train.keep_checkpoints
        )
    except StorageError as error:
        raise stopped_writing(f"the checkpoint of step {state.step}", error, state.step, run.out) from error


def finish(run: Run) -> TrainResult:
    """Write ``last/`` (and ``merged/`` for LoRA) and ``summary.json``, last: the run is done."""
    distributed, state = run.distributed, run.state
    weights = distributed.student_state_dict()
    sources_by_rank = distributed.gather(",".join(run.all_sources))  # they must all be equal
    counts = {k: v for k, v in run.sources.counts.items() if v}
    summary = {
        "world_size": distributed.world_size,
        "sources_by_rank": sources_by_rank,
        "steps": state.step,
        "seconds": state.seconds,
        "source_counts": counts,
        "tokens": state.tokens_seen,
    }
    return write_final(run, weights, summary, counts)


def write_final(run, weights, summary: dict[str, Any], counts: dict[str, int]) -> TrainResult:
    """On the main process: ``last/`` from ``weights`` (and ``merged/`` for LoRA), then ``summary.json``;
    shared by both loops (``run`` is either loop's run)."""
    config, distributed, state = run.config, run.distributed, run.state

    def write_last() -> None:
        model = distributed.student
        extra = {"step": state.step, "dev_loss": run.last_dev_loss}
        save_model(run.out / "last", model, run.tokenizer, state_dict=weights, extra=extra)
        if config.model.lora.enabled and config.model.lora.merge_on_save:
            save_model(run.out / "merged", merge_lora(model), run.tokenizer, extra=extra)
        atomic_write_text(run.out / "summary.json", json.dumps(summary, indent=2))

    try:
        distributed.on_main(write_last, "the final model")
    except StorageError as error:
        raise stopped_writing(f"{run.out / 'last'}", error, state.step, run.out) from error
    distributed.end()
    return TrainResult(
        run.out, state.step, state.best_metric, state.best_step, run.last_dev_loss, state.seconds, counts
    )


def count_tokens(batches: list[Batch], distributed: Distributed) -> Tensor:
    """Supervised tokens of the whole optimizer step, over all micro-batches and processes."""
    local = sum((b["labels"] != IGNORE_INDEX).sum() for b in batches)
    return distributed.sum(torch.as_tensor(local, device=distributed.device, dtype=torch.long))


def synchronize(device: torch.device) -> None:
    """Wait for the work queued on ``device``: CUDA runs kernels asynchronously, so a phase's wall time
    (``teacher_s``, ``student_s`` in metrics.jsonl) is only its own once the device has finished it.
    A no-op on the CPU, whose operations return when done."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)


# --------------------------------------------------------------------------------------------------------
# metrics.jsonl


class MetricsLog:
    """metrics.jsonl in the run folder (and any accelerate trackers); rank zero only."""

    def __init__(self, path: Path, distributed: Distributed, resume_step: int | None):
        """``resume_step``: the step of the checkpoint resumed, or None for a fresh run (which starts a new
        file)."""
        self.path, self.distributed = path, distributed
        if distributed.is_main and resume_step is None and path.exists():
            path.unlink()
        if distributed.is_main and resume_step is not None and path.exists():
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
        if not self.distributed.is_main:
            return
        with storage_errors(self.path.parent), open(self.path, "a", encoding="utf-8") as handle:
            handle.write(json.dumps(row) + "\n")
        numeric = {k: v for k, v in row.items() if isinstance(v, (int, float)) and k != "step"}
        self.distributed.log(numeric, step=row["step"])


# --------------------------------------------------------------------------------------------------------
# `distillm train`


def add_arguments(parser) -> None:
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
    config = load_config(args.config, args.overrides)
    if args.resume:
        if not config.train.resume:
            raise UserError("--resume contradicts train.resume=false")
        if not list_checkpoints(config.train.output_dir):
            raise UserError(
                f"--resume: no checkpoint in {config.train.output_dir}/checkpoints to resume from"
            )
    result = run_training(config)
    logger.info(
        "done: %d steps in %s (best %s at step %s)",
        result.steps,
        result.output_dir,
        result.best_metric,
        result.best_step,
    )
    return 0
