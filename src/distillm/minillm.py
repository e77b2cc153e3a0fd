"""MiniLLM's training loop (Gu et al., ICLR 2024): rollout cycles and PPO epochs over a rollout store.

The sibling of ``distillm.train`` for ``loop: minillm`` (``shared/reference/minillm-method.md``). Read
``_train`` from top to bottom: one optimizer step is

    (at a cycle's start) rollouts: ``minillm.num_rollouts`` prompts answered by ``generation.sample_mixed``
    from ``(1 - a) q_old + a p``, both models' log-probabilities kept -> the store
    -> this step's micro-batches of the store (a seeded shuffle per PPO epoch) and of the pretraining corpus
    -> advantages: rewards, normalised reward-to-go, whitened over the step's tokens on every process
    -> per micro-batch: teacher forward (frozen; for the single-step term and the soft CE) -> student
       forward and loss ``L_pg + L_reg + lm_coef L_pt`` -> backward
    -> clip, optimizer and scheduler step -> log / evaluate / keep the best / checkpoint.

After ``minillm.ppo_epochs`` passes over the store the next step collects new rollouts. Everything that
decides what comes next (the store, the position in the PPO epochs, the prompt and pretraining cursors, the
sampling generator and every RNG) is in each checkpoint, so a killed run resumes to the same weights.
The loss terms are ``distillm.losses.minillm``'s; evaluation, best-checkpoint keeping, checkpoints and
metrics are the token loop's own functions.
"""

from __future__ import annotations

import json
import logging
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, NamedTuple

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from distillm import IGNORE_INDEX
from distillm.checkpoint import (
    CHECKPOINTS,
    DEEPSPEED_STATE,
    checkpoint_name,
    load_model_weights,
    load_trainer_state,
    restore_rng_state,
    save_checkpoint,
    save_model,
    stage_checkpoint,
    staging_folder,
)
from distillm.config import Config, MiniLLMConfig, save_config
from distillm.data import collate
from distillm.errors import UserError
from distillm.faults import GracefulStop, TrainingStopped
from distillm.generation import sample_mixed
from distillm.losses.minillm import (
    chunked_token_objective,
    clipped_policy_loss,
    mixed_sampling_weights,
    normalized_reward_to_go,
    single_step_reverse_kl,
    teacher_soft_cross_entropy,
    token_rewards,
    whiten,
)
from distillm.losses.reduction import token_cross_entropy
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
from distillm.objective import (
    TeacherOutput,
    output_head,
    supervised_hidden_states,
    supervised_logits,
    teacher_forward,
)
from distillm.optim import build_optimizer, build_scheduler
from distillm.storage import StorageError, atomic_write_text, recover_replaced, storage_errors
from distillm.train import (
    BatchOrder,
    Cursor,
    MetricsLog,
    NonFiniteLossError,
    TrainResult,
    WholeStudent,
    _any_process,
    _choose_checkpoint,
    _evaluate,
    _gather_to_main,
    _is_zero3,
    _keep_best,
    _load_engine_state,
    _sharded,
    _stopped_writing,
    _student_outside_engine,
    _student_state_dict,
    _this_process_state,
    _together,
    _unwrap,
    backward_scale,
    build_accelerator,
    check_pretrain_positions,
    configure_deepspeed,
    load_data,
    loading_whole_models,
    micro_batch,
    seed_everything,
    synchronize,
)

logger = logging.getLogger(__name__)

_ENGINE_TAG = "engine"


# --------------------------------------------------------------------------------------------------------
# Rollouts: what one sampled response keeps, and the store of a cycle.


@dataclass
class Rollout:
    """One prompt and its teacher-mixed response, as stored for the cycle's PPO epochs (section 3.6).

    ``prompt`` ``[P]`` the prompt's real tokens; ``response`` ``[L]`` the response up to and including its
    first EOS (all ``max_new_tokens`` if it has none); ``student_logprobs`` / ``teacher_logprobs`` ``[L]``:
    ``log q_old(y_t | x, y_<t)`` and ``log p(y_t | x, y_<t)`` of the models' own distributions. Rewards,
    weights and advantages are recomputed from these at every step (cheap, and nothing else to store).
    """

    prompt: Tensor
    response: Tensor
    student_logprobs: Tensor
    teacher_logprobs: Tensor

    def to_dict(self) -> dict[str, Tensor]:
        return dict(vars(self))


def left_pad(prompts: list[list[int]], pad_token_id: int) -> tuple[Tensor, Tensor]:
    """Prompts as a left-padded ``[B, P]`` batch and its attention mask (the samplers' input)."""
    width = max(len(p) for p in prompts)
    ids = torch.full((len(prompts), width), pad_token_id, dtype=torch.long)
    mask = torch.zeros((len(prompts), width), dtype=torch.long)
    for row, prompt in enumerate(prompts):
        ids[row, width - len(prompt) :] = torch.tensor(prompt, dtype=torch.long)
        mask[row, width - len(prompt) :] = 1
    return ids, mask


def collect_rollouts(
    student: nn.Module,
    teacher: nn.Module,
    prompts: list[list[int]],
    config: Config,
    eos_token_id: int,
    pad_token_id: int,
    generator: torch.Generator,
    device: torch.device,
) -> list[Rollout]:
    """Sample one teacher-mixed response per prompt (``generation.batch_size`` prompts at a time)."""
    rollouts: list[Rollout] = []
    size = config.generation.batch_size
    for start in range(0, len(prompts), size):
        ids, mask = left_pad(prompts[start : start + size], pad_token_id)
        samples = sample_mixed(
            student,
            teacher,
            ids.to(device),
            mask.to(device),
            config.generation,
            config.minillm.teacher_mix_alpha,
            eos_token_id,
            pad_token_id,
            generator,
        )
        for row, prompt in enumerate(prompts[start : start + size]):
            real = samples.mask[row]  # [N]: the response up to its first EOS
            rollouts.append(
                Rollout(
                    prompt=torch.tensor(prompt, dtype=torch.long),
                    response=samples.tokens[row][real].cpu(),
                    student_logprobs=samples.student_logprobs[row][real].float().cpu(),
                    teacher_logprobs=samples.teacher_logprobs[row][real].float().cpu(),
                )
            )
    return rollouts


class RolloutBatch(NamedTuple):
    """A micro-batch of rollouts in the batch contract, with its per-token values in label order.

    ``batch``: ``input_ids``, ``attention_mask``, ``labels`` ``[B, T]`` (``collate`` of prompt + response:
    the supervised labels are exactly the responses, row by row). The rest are ``[N]`` over those ``N``
    labels in row-major order: ``log q_old``, the importance weights ``w`` and the normalised reward-to-go
    (before whitening, which spans the whole step).
    """

    batch: dict[str, Tensor]
    student_logprobs: Tensor
    weights: Tensor
    reward_to_go: Tensor


def rollout_batch(rollouts: list[Rollout], knobs: MiniLLMConfig, pad_token_id: int) -> RolloutBatch:
    """Build a micro-batch of ``rollouts`` with their rewards, weights and reward-to-go (sections 3-6)."""
    lengths = [len(r.response) for r in rollouts]
    width = max(lengths)
    mask = torch.arange(width)[None, :] < torch.tensor(lengths)[:, None]  # [B, R]

    def padded(name: str) -> Tensor:  # [B, R], 0 after each response
        values = torch.zeros(len(rollouts), width)
        for row, rollout in enumerate(rollouts):
            values[row, : lengths[row]] = getattr(rollout, name)
        return values

    log_q_old, log_p = padded("student_logprobs"), padded("teacher_logprobs")
    weights = mixed_sampling_weights(log_q_old, log_p, mask, knobs.teacher_mix_alpha)
    rewards = token_rewards(log_p, log_q_old, mask, knobs.reward_scaling, knobs.cliprange_reward)
    reward_to_go = normalized_reward_to_go(rewards, mask, knobs.gamma)
    batch = collate([(r.prompt.tolist(), r.response.tolist()) for r in rollouts], pad_token_id)
    del batch["prompt_ids"], batch["prompt_attention_mask"]
    return RolloutBatch(batch, log_q_old[mask], weights[mask], reward_to_go[mask])


# --------------------------------------------------------------------------------------------------------
# The objective: the student and MiniLLM's loss of one micro-batch, one module for DDP / DeepSpeed.


class MiniLLMLoss(NamedTuple):
    """A micro-batch's loss (with gradient) and its detached terms, each a share of the step's token mean."""

    total: Tensor
    policy: Tensor
    single_step: Tensor
    pretrain: Tensor


class MiniLLMObjective(nn.Module):
    """``L_pg + L_reg`` on rollout tokens plus ``lm_coef L_pt`` on pretraining text (sections 7-9).

    ``objective.chunk_size > 0`` computes both halves from hidden states in chunks of that many tokens
    (``chunked_token_objective``): neither the student's nor the teacher's ``[tokens, V]`` logits exist
    whole. ``sharded``: the student's parameters are split over processes (ZeRO-3), so every micro-batch
    runs through the student's own forward.
    """

    def __init__(
        self, student: nn.Module, knobs: MiniLLMConfig, vocab_size: int, chunk_size: int, sharded: bool
    ):
        super().__init__()
        self.student = student
        self.knobs = knobs
        self.vocab_size = vocab_size
        self.chunk_size = chunk_size
        self.sharded = sharded

    def forward(
        self,
        rollouts: RolloutBatch,
        advantages: Tensor,
        num_tokens: Tensor,
        teacher: TeacherOutput | None,
        pretrain_batch: dict[str, Tensor] | None = None,
        pretrain_teacher: TeacherOutput | None = None,
        pretrain_tokens: Tensor | None = None,
    ) -> MiniLLMLoss:
        knobs = self.knobs
        labels = rollouts.batch["labels"][rollouts.batch["labels"] != IGNORE_INDEX]  # [N]

        def rollout_terms(logits: Tensor, rows: slice, teacher_rows) -> Tensor:
            log_q = -token_cross_entropy(logits, labels[rows])  # [c]: log q_theta(y_t)
            mask = torch.ones_like(log_q, dtype=torch.bool)[None]  # [1, c]: every row is a real token
            policy = clipped_policy_loss(
                log_q[None],
                rollouts.student_logprobs[rows][None],
                rollouts.weights[rows][None],
                advantages[rows][None],
                mask,
                knobs.cliprange,
                num_tokens,
            )
            single_step = (
                single_step_reverse_kl(logits[None], teacher_rows(rows)[None], mask, num_tokens)
                if knobs.single_step_reg
                else torch.zeros_like(policy)
            )
            return torch.stack([policy + single_step, policy, single_step])

        terms = self._terms(rollouts.batch, teacher, rollout_terms)
        total, pretrain = terms[0], torch.zeros_like(terms[0])
        if pretrain_batch is not None and knobs.lm_coef > 0:
            pt_labels = pretrain_batch["labels"][pretrain_batch["labels"] != IGNORE_INDEX]  # [M]

            def pretrain_terms(logits: Tensor, rows: slice, teacher_rows) -> Tensor:
                ce = token_cross_entropy(logits, pt_labels[rows])  # [c]
                value = (1.0 - knobs.pt_kd_ratio) * ce.sum()
                if knobs.pt_kd_ratio > 0:
                    soft = teacher_soft_cross_entropy(logits, teacher_rows(rows))  # [c]
                    value = value + knobs.pt_kd_ratio * soft.sum()
                return (value / pretrain_tokens.clamp_min(1))[None]

            pretrain = self._terms(pretrain_batch, pretrain_teacher, pretrain_terms)[0]
            total = total + knobs.lm_coef * pretrain
        return MiniLLMLoss(total, terms[1].detach(), terms[2].detach(), pretrain.detach())

    def _terms(self, batch: dict[str, Tensor], teacher: TeacherOutput | None, objective) -> Tensor:
        """``objective(student logits [c, V], rows, teacher_rows)`` over the supervised positions of ``batch``."""

        def teacher_rows(rows: slice) -> Tensor:  # the teacher's logits [c, V] of those positions
            if teacher.logits is not None:
                return teacher.logits[rows]
            with torch.no_grad():
                return F.linear(teacher.hidden[rows], teacher.head_weight, teacher.head_bias).float()

        def bound(logits: Tensor, rows: slice) -> Tensor:
            return objective(logits, rows, teacher_rows)

        if self.chunk_size == 0:
            logits = supervised_logits(self.student, batch, self.vocab_size, self.sharded)  # [N, V]
            return bound(logits.float(), slice(None))
        hidden = supervised_hidden_states(self.student, batch, self.sharded)  # [N, H]
        weight, bias = output_head(self.student, self.vocab_size)
        return chunked_token_objective(hidden, weight, bias, bound, self.chunk_size)


# --------------------------------------------------------------------------------------------------------
# Set-up.


def load_models(config: Config, device: torch.device):
    """Tokenizer, student (LoRA-wrapped if asked) without dropout, frozen teacher, shared vocabulary size.

    Dropout is off in every student forward, as in the original (its PPO model is put in eval mode once and
    never back, section 2): otherwise the first PPO pass's ratio would not be 1 and rollouts would be
    scored by another model than the one trained. Here the modules' probabilities are set to 0, so that
    gradient checkpointing (active in train mode only) still works.
    """
    m = config.model
    tokenizer = load_tokenizer(m.tokenizer or m.student, m.trust_remote_code, role="student")
    if m.lora.enabled and is_adapter(m.student):
        student = load_lora_student(m.student, m.trust_remote_code)
    else:
        student = load_causal_lm(m.student, "fp32", m.trust_remote_code, role="student")
        if m.lora.enabled:
            student = apply_lora(student, m.lora)
    for module in student.modules():
        if isinstance(module, nn.Dropout):
            module.p = 0.0
    if m.gradient_checkpointing:
        enable_gradient_checkpointing(student)
    teacher_tokenizer = load_tokenizer(m.teacher, m.trust_remote_code, role="teacher")
    check_same_tokenizer(tokenizer, teacher_tokenizer, m.tokenizer or m.student, m.teacher)
    teacher = load_causal_lm(m.teacher, m.teacher_dtype, m.trust_remote_code, role="teacher")
    if m.teacher_adapter:
        teacher = merge_adapter(teacher, m.teacher_adapter)
    teacher.requires_grad_(False).eval().to(device)
    return tokenizer, student, teacher, shared_vocab_size(student, teacher, tokenizer)


@dataclass(frozen=True)
class Geometry:
    """How rollouts, micro-batches and optimizer steps fit together on one process."""

    rollouts_per_process: int
    steps_per_epoch: int  # optimizer steps per PPO pass over the store
    ppo_epochs: int

    @property
    def steps_per_cycle(self) -> int:
        return self.steps_per_epoch * self.ppo_epochs


def geometry(config: Config, world_size: int) -> Geometry:
    """The store's size per process and the optimizer steps per PPO epoch; refuses shapes that make none."""
    knobs, t = config.minillm, config.train
    per_process = knobs.num_rollouts // world_size
    per_step = t.batch_size * t.grad_accum
    if per_process < per_step:
        raise UserError(
            f"minillm.num_rollouts={knobs.num_rollouts} over {world_size} processes gives {per_process} rollouts "
            f"per process, fewer than one optimizer step's train.batch_size x train.grad_accum = {per_step}; "
            "raise minillm.num_rollouts or lower the batch"
        )
    return Geometry(per_process, per_process // per_step, knobs.ppo_epochs)


def total_optimizer_steps(config: Config, shape: Geometry, prompt_rows: int, world_size: int) -> int:
    """``train.max_steps``, or the steps of ``train.epochs`` passes over the prompts (whole cycles)."""
    if config.train.max_steps > 0:
        return config.train.max_steps
    cycles = prompt_rows // world_size * config.train.epochs // shape.rollouts_per_process
    if cycles < 1:
        raise UserError(
            f"{prompt_rows} prompts make no rollout cycle of minillm.num_rollouts={config.minillm.num_rollouts} "
            f"in train.epochs={config.train.epochs}; raise train.epochs or set train.max_steps"
        )
    return cycles * shape.steps_per_cycle


def ppo_order(seed: int, rank: int, cycle: int, epoch: int, size: int) -> list[int]:
    """The store's shuffled order in PPO epoch ``epoch`` of ``cycle`` on process ``rank`` (deterministic)."""
    generator = torch.Generator().manual_seed(((seed * 1_000_003 + rank) * 100_003 + cycle) * 101 + epoch)
    return torch.randperm(size, generator=generator).tolist()


@dataclass
class MiniLLMState:
    """The loop's position: step, rollout cycle, steps done in the cycle, the cursors and the run's totals."""

    step: int = 0
    cycle: int = -1  # no cycle collected yet
    cycle_step: int = 0  # optimizer steps done on the current store
    prompts: Cursor = field(default_factory=Cursor)
    pretrain: Cursor = field(default_factory=Cursor)
    best_metric: float | None = None
    best_step: int | None = None
    tokens_seen: int = 0
    seconds: dict[str, float] = field(
        default_factory=lambda: dict.fromkeys(("generation", "teacher", "student", "evaluation"), 0.0)
    )

    def to_dict(self) -> dict[str, Any]:
        values = dict(vars(self))
        values["prompts"] = [self.prompts.epoch, self.prompts.index]
        values["pretrain"] = [self.pretrain.epoch, self.pretrain.index]
        values["seconds"] = dict(self.seconds)
        return values

    @classmethod
    def from_dict(cls, saved: dict[str, Any]) -> MiniLLMState:
        values = dict(saved)
        values["prompts"], values["pretrain"] = Cursor(*saved["prompts"]), Cursor(*saved["pretrain"])
        values["seconds"] = dict(saved["seconds"])
        return cls(**values)


# --------------------------------------------------------------------------------------------------------
# The loop.


def train(config: Config) -> TrainResult:
    """Run (or resume) MiniLLM training described by ``config`` (``loop: minillm``).

    SIGTERM or SIGINT stops it at the next optimizer-step boundary with a checkpoint (``TrainingStopped``);
    a rerun resumes exactly (docs/minillm.md).
    """
    config.validate()
    if config.loop != "minillm":
        raise UserError(f"distillm.minillm runs loop: minillm, not loop: {config.loop}")
    with GracefulStop() as stop:
        return _train(config, stop)


def _train(config: Config, stop: GracefulStop) -> TrainResult:
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()
    accelerator = build_accelerator(config)
    out = Path(config.train.output_dir)
    cache_dir = Path(config.data.cache_dir) if config.data.cache_dir else out.parent / ".cache"
    if accelerator.is_main_process:
        with storage_errors(out):
            out.mkdir(parents=True, exist_ok=True)
        save_config(config, out / "config.yaml")
        for folder in ("best", "last"):
            recover_replaced(out / folder)
    accelerator.wait_for_everyone()
    rank, world = accelerator.process_index, accelerator.num_processes
    seed_everything(config.seed + rank)

    with loading_whole_models(accelerator):
        tokenizer, student, teacher, vocab_size = load_models(config, accelerator.device)
    with accelerator.main_process_first():
        data = load_data(config, tokenizer, cache_dir)
    knobs = config.minillm
    use_pretrain = data.pretrain is not None and knobs.lm_coef > 0
    if use_pretrain:
        check_pretrain_positions(student, data.pretrain.chunk_length, config.data.pretrain)
    shape = geometry(config, world)
    prompt_order = BatchOrder(len(data.train), 1, config.seed, rank, world)  # one prompt at a time
    pretrain_order = (
        BatchOrder(len(data.pretrain), config.train.batch_size, config.seed + 1, rank, world)
        if use_pretrain
        else None
    )
    total_steps = total_optimizer_steps(config, shape, len(data.train), world)
    eval_every = config.train.eval_every or shape.steps_per_cycle
    save_every = config.train.save_every or shape.steps_per_cycle
    eos, pad = tokenizer.eos_token_id, tokenizer.pad_token_id
    chunked = config.objective.chunk_size > 0

    objective = MiniLLMObjective(
        student, knobs, vocab_size, config.objective.chunk_size, _sharded(accelerator)
    )
    optimizer = build_optimizer(objective, config.train)
    scheduler = build_scheduler(optimizer, total_steps, config.train)
    # Rollout sampling draws differently on every process, from a stream of its own.
    sampling = torch.Generator().manual_seed(config.seed * 7919 + 2 + 104_729 * rank)
    state = MiniLLMState()
    store: list[Rollout] = []

    checkpoint = _choose_checkpoint(accelerator, out) if config.train.resume else None
    if checkpoint is not None:
        load_model_weights(student, checkpoint)
        saved = load_trainer_state(checkpoint)
        if saved["optimizer"] is not None:
            optimizer.load_state_dict(saved["optimizer"])
        elif accelerator.state.deepspeed_plugin is None:
            raise UserError(
                f"{checkpoint} was written under DeepSpeed; resume it with the same DeepSpeed config and number "
                "of processes, or start a new train.output_dir"
            )
        scheduler.load_state_dict(saved["scheduler"])
        mine = _this_process_state(saved, accelerator, checkpoint)
        sampling.set_state(mine["sampling"])
        store = [Rollout(**row) for row in mine["store"]]
        state = MiniLLMState.from_dict(saved["train"])
        logger.info("resumed from %s (step %d, cycle %d)", checkpoint, state.step, state.cycle)

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

    seconds = state.seconds
    last_dev_loss = None
    from tqdm.auto import tqdm

    bar = tqdm(
        total=total_steps,
        initial=state.step,
        desc=f"minillm {out.name}",
        disable=not (config.train.progress and accelerator.is_main_process),
        dynamic_ncols=True,
    )

    def evaluate_and_keep_best() -> dict[str, float]:
        t0 = time.perf_counter()
        evaluated = _student_outside_engine(accelerator, objective, whole, state.step)
        evaluation = _evaluate(config, accelerator, evaluated, tokenizer, data, vocab_size, state.step)
        seconds["evaluation"] += time.perf_counter() - t0
        metrics.write({"step": state.step, **evaluation})
        _keep_best(config, accelerator, objective, tokenizer, state, evaluation, out)
        return evaluation

    def save() -> None:
        _save(
            config,
            accelerator,
            objective,
            optimizer,
            scheduler,
            tokenizer,
            state,
            store,
            sampling,
            shape,
            out,
        )

    if checkpoint is None:
        last_dev_loss = evaluate_and_keep_best().get("dev_loss")  # step 0: the untrained student
    step_start = time.perf_counter()
    while state.step < total_steps:
        step_seconds = dict.fromkeys(("generation", "teacher", "student"), 0.0)
        row: dict[str, Any] = {}

        # 1. A new rollout cycle once the store has had its PPO epochs (or at the start).
        if state.cycle < 0 or state.cycle_step >= shape.steps_per_cycle:
            t0 = time.perf_counter()
            sampler = _student_outside_engine(accelerator, objective, whole, state.step)
            prompts = []
            for _ in range(shape.rollouts_per_process):
                epoch, index = state.prompts.advance(prompt_order)
                prompts.append(data.train[prompt_order.indices(epoch, index)[0]][0])
            store = collect_rollouts(
                sampler, teacher, prompts, config, eos, pad, sampling, accelerator.device
            )
            state.cycle, state.cycle_step = state.cycle + 1, 0
            synchronize(accelerator.device)
            step_seconds["generation"] = time.perf_counter() - t0
            row.update(_rollout_statistics(store, knobs))

        # 2. This step's micro-batches: the store in its PPO epoch's order, and pretraining chunks.
        epoch, index = divmod(state.cycle_step, shape.steps_per_epoch)
        order = ppo_order(config.seed, rank, state.cycle, epoch, len(store))
        size, accumulation = config.train.batch_size, config.train.grad_accum
        first = index * size * accumulation
        micro = [
            rollout_batch([store[i] for i in order[first + k * size : first + (k + 1) * size]], knobs, pad)
            for k in range(accumulation)
        ]
        micro = [_to_device(m, accelerator.device) for m in micro]
        pretrain_batches: list[dict[str, Tensor] | None] = [None] * accumulation
        pretrain_tokens = None
        if pretrain_order is not None:
            pretrain_batches = []
            for _ in range(accumulation):
                p_epoch, p_index = state.pretrain.advance(pretrain_order)
                chunk = data.pretrain.collate(
                    [data.pretrain[i] for i in pretrain_order.indices(p_epoch, p_index)]
                )
                pretrain_batches.append({k: v.to(accelerator.device) for k, v in chunk.items()})
            pretrain_tokens = _global_sum(
                accelerator, sum(int(b["labels"].ne(IGNORE_INDEX).sum()) for b in pretrain_batches)
            )

        # 3. Advantages, whitened over the whole step's rollout tokens on every process: batch 4 x
        #    accumulation 1, 2 x 2 and two processes of 2 all whiten (and normalise) the same tokens.
        reward_to_go = torch.cat([m.reward_to_go for m in micro])  # [N_step]
        everywhere = (lambda t: accelerator.reduce(t, reduction="sum")) if world > 1 else None
        advantages = whiten(
            reward_to_go[None], torch.ones_like(reward_to_go, dtype=torch.bool)[None], everywhere
        )[0]
        advantages = advantages.split([len(m.reward_to_go) for m in micro])
        num_tokens = _global_sum(accelerator, len(reward_to_go))

        # 4. Forward and backward per micro-batch.
        scale = backward_scale(accelerator)
        logged = torch.zeros(4, device=accelerator.device)  # total, policy, single-step, pretraining
        for k, (batch, pretrain_batch) in enumerate(zip(micro, pretrain_batches)):
            t0 = time.perf_counter()
            teacher_out = (
                teacher_forward(teacher, batch.batch, vocab_size, chunked) if knobs.single_step_reg else None
            )
            teacher_pt = (
                teacher_forward(teacher, pretrain_batch, vocab_size, chunked)
                if pretrain_batch is not None and knobs.pt_kd_ratio > 0
                else None
            )
            synchronize(accelerator.device)
            t1 = time.perf_counter()
            step_seconds["teacher"] += t1 - t0
            with micro_batch(accelerator, objective, last=k == len(micro) - 1):
                loss = objective(
                    batch, advantages[k], num_tokens, teacher_out, pretrain_batch, teacher_pt, pretrain_tokens
                )
                accelerator.backward(loss.total * scale)
            synchronize(accelerator.device)
            step_seconds["student"] += time.perf_counter() - t1
            logged += torch.stack([loss.total.detach(), loss.policy, loss.single_step, loss.pretrain]).float()

        # 5. Check, clip, step.
        logged = accelerator.reduce(logged, reduction="sum")
        if not torch.isfinite(logged[0]):
            raise NonFiniteLossError(
                f"the loss became {logged[0].item()} at optimizer step {state.step + 1}; the last good checkpoint "
                f"in {out / CHECKPOINTS} is kept. Lower train.lr, use train.precision=fp32, or check the data"
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
        state.cycle_step += 1
        state.tokens_seen += int(num_tokens)

        # 6. Log, evaluate, checkpoint.
        elapsed = time.perf_counter() - step_start
        step_start = time.perf_counter()
        row = {
            "step": state.step,
            "loss": logged[0].item(),
            "policy": logged[1].item(),
            "single_step_kl": logged[2].item(),
            "lm": logged[3].item(),
            "lr": scheduler.get_last_lr()[0],
            "tokens": int(num_tokens),
            "tokens_per_s": int(num_tokens) / max(elapsed, 1e-9),
            "cycle": state.cycle,
            "ppo_epoch": epoch,
            **row,
            **{f"{key}_s": value for key, value in step_seconds.items()},
        }
        if grad_norm is not None:
            row["grad_norm"] = float(grad_norm)
        bar.update(1)
        bar.set_postfix(loss=f"{row['loss']:.4f}", cycle=state.cycle)
        if state.step % config.train.log_every == 0 or state.step == total_steps or "rollout_tokens" in row:
            metrics.write(row)
        if state.step % eval_every == 0 or state.step == total_steps:
            last_dev_loss = evaluate_and_keep_best().get("dev_loss", last_dev_loss)
        if state.step % save_every == 0 or state.step == total_steps:
            save()
        if state.step < total_steps and stop.agreed(_any_process(accelerator)):
            if state.step % save_every != 0:
                save()
            bar.close()
            raise TrainingStopped(
                stop.signal_name, state.step, out / CHECKPOINTS / checkpoint_name(state.step)
            )
    bar.close()

    weights = _student_state_dict(accelerator, objective)

    def write_last() -> None:
        model = _unwrap(accelerator, objective).student
        extra = {"step": state.step, "dev_loss": last_dev_loss}
        save_model(out / "last", model, tokenizer, state_dict=weights, extra=extra)
        if config.model.lora.enabled and config.model.lora.merge_on_save:
            save_model(out / "merged", merge_lora(model), tokenizer, extra=extra)
        summary = {
            "world_size": world,
            "steps": state.step,
            "cycles": state.cycle + 1,
            "seconds": seconds,
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
    return TrainResult(out, state.step, state.best_metric, state.best_step, last_dev_loss, seconds, {})


# --------------------------------------------------------------------------------------------------------
# Named steps.


def _to_device(rollouts: RolloutBatch, device: torch.device) -> RolloutBatch:
    return RolloutBatch(
        {k: v.to(device) for k, v in rollouts.batch.items()},
        rollouts.student_logprobs.to(device),
        rollouts.weights.to(device),
        rollouts.reward_to_go.to(device),
    )


def _global_sum(accelerator, count: int) -> Tensor:
    """``count`` summed over every process, as a tensor on the device."""
    local = torch.as_tensor(count, device=accelerator.device, dtype=torch.long)
    return accelerator.reduce(local, reduction="sum") if accelerator.num_processes > 1 else local


def _rollout_statistics(store: list[Rollout], knobs: MiniLLMConfig) -> dict[str, float]:
    """This process's rollout cycle in numbers: lengths, the sequence log-ratio and the mean weight."""
    lengths = torch.tensor([len(r.response) for r in store], dtype=torch.float64)
    log_ratio = torch.tensor([float((r.student_logprobs - r.teacher_logprobs).sum()) for r in store])
    log_q, log_p = (
        torch.cat([r.student_logprobs for r in store]),
        torch.cat([r.teacher_logprobs for r in store]),
    )
    mask = torch.ones_like(log_q, dtype=torch.bool)
    weights = mixed_sampling_weights(log_q[None], log_p[None], mask[None], knobs.teacher_mix_alpha)
    return {
        "rollout_tokens": int(lengths.sum()),
        "rollout_length": float(lengths.mean()),
        # Sum over a mixed sample of log q_old - log p: the sequence-level reverse KL's integrand (biased
        # by the mixing for a > 0; an estimate of KL(q || p) itself for a = 0).
        "rollout_log_ratio": float(log_ratio.mean()),
        "rollout_weight": float(weights.mean()),
    }


def _save(
    config, accelerator, objective, optimizer, scheduler, tokenizer, state, store, sampling, shape, out
):
    """A resumable checkpoint of ``state.step``: weights, optimizer, scheduler, the loop's position and, per
    process, its rollout store (while PPO epochs on it remain), its sampling stream and every RNG."""
    from distillm.checkpoint import capture_rng_state

    accelerator.wait_for_everyone()
    weights = _student_state_dict(accelerator, objective)
    pending = state.cycle_step < shape.steps_per_cycle  # the store is still needed after a resume
    per_process = _gather_to_main(
        accelerator,
        {
            "store": [r.to_dict() for r in store] if pending else [],
            "sampling": sampling.get_state(),
            "rng": capture_rng_state(),
        },
    )
    deepspeed = accelerator.state.deepspeed_plugin is not None

    def write_checkpoint() -> None:
        trainer_state = {
            "optimizer": None if deepspeed else optimizer.state_dict(),
            "scheduler": scheduler.state_dict(),
            "processes": per_process,
            "train": state.to_dict(),
            "loop": "minillm",
        }
        save_checkpoint(
            out,
            state.step,
            _unwrap(accelerator, objective).student,
            tokenizer,
            trainer_state,
            keep=config.train.keep_checkpoints,
            state_dict=weights,
            staged=deepspeed,
        )

    main = accelerator.is_main_process
    try:
        if deepspeed:
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
        raise _stopped_writing(f"the checkpoint of step {state.step}", error, state.step, out) from error
