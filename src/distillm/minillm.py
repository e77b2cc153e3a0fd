"""MiniLLM's training loop (Gu et al., ICLR 2024): rollout cycles and PPO epochs over a rollout store.

The sibling of ``distillm.train`` for ``loop: minillm`` (``shared/reference/minillm-method.md``). Read
``train`` from top to bottom: one optimizer step is

    (at a cycle's start) rollouts: ``minillm.num_rollouts`` prompts answered by ``generation.sample_mixed``
    from ``(1 - a) q_old + a p``, both models' log-probabilities kept -> the store
    -> this step's micro-batches of the store (a seeded shuffle per PPO epoch) and of the pretraining corpus
    -> advantages: rewards, normalised reward-to-go, whitened over the step's tokens on every process
    -> per micro-batch: teacher forward (frozen; for the single-step term and the soft CE) -> student
       forward and loss ``L_pg + L_reg + lm_coef L_pt`` -> backward
    -> clip, optimizer and scheduler step -> log / evaluate / keep the best / checkpoint.

After ``minillm.ppo_epochs`` passes over the store the next step collects new rollouts. Each rollout draws
from a generator keyed by its prompt's place in the run (not by process or batch), every process gets the
whole store, and the PPO shuffle is one for all processes: two processes of batch 2 train like one of batch 4.
Everything that decides what comes next (the store, the position in the PPO epochs, the prompt and
pretraining cursors and every RNG) is in each checkpoint, so a killed run resumes to the same weights.
The loss terms are ``distillm.losses.minillm``'s; evaluation, best-checkpoint keeping, checkpoints and
metrics are the token loop's own functions.
"""

from __future__ import annotations

import hashlib
import logging
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, NamedTuple

import torch
import torch.nn.functional as F
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
    load_model_weights,
    stopped_writing,
)
from distillm.config import Config, MiniLLMConfig, save_config
from distillm.data import collate
from distillm.distributed import Distributed
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
from distillm.storage import StorageError, recover_replaced, storage_errors
from distillm.train import (
    BatchOrder,
    Cursor,
    MetricsLog,
    TrainingData,
    TrainResult,
    check_pretrain_positions,
    count_tokens,
    keep_best,
    load_data,
    measure_student,
    optimizer_step,
    seed_everything,
    synchronize,
    write_final,
)

logger = logging.getLogger(__name__)


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


def rollout_generator(seed: int, epoch: int, position: int) -> torch.Generator:
    """The sampling generator of the rollout of the prompt at ``position`` of the prompt order's ``epoch``: a
    function of the run's seed and that place only, so the same prompt draws the same response whichever
    process or batch answers it."""
    key = hashlib.sha256(f"minillm-rollout/{seed}/{epoch}/{position}".encode()).digest()
    return torch.Generator().manual_seed(int.from_bytes(key[:8], "little"))


def collect_rollouts(
    student: nn.Module,
    teacher: nn.Module,
    prompts: list[list[int]],
    config: Config,
    eos_token_id: int,
    pad_token_id: int,
    generators: list[torch.Generator],
    device: torch.device,
) -> list[Rollout]:
    """Sample one teacher-mixed response per prompt (``generation.batch_size`` prompts at a time), prompt ``i``
    from ``generators[i]`` alone (``rollout_generator``), so that batching does not change what it draws."""
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
            generators[start : start + size],
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


def ppo_order(seed: int, cycle: int, epoch: int, size: int) -> list[int]:
    """The store's shuffled order in PPO epoch ``epoch`` of ``cycle`` (deterministic; the same on every
    process, which each take their share of a step's rows from it)."""
    generator = torch.Generator().manual_seed((seed * 100_003 + cycle) * 101 + epoch)
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
# The run: set-up and resuming.


@dataclass
class MiniLLMRun:
    """Everything a MiniLLM run carries from one step to the next (made by ``setup``)."""

    config: Config
    distributed: Distributed
    out: Path
    tokenizer: Any
    teacher: nn.Module
    vocab_size: int
    data: TrainingData
    prompt_order: BatchOrder  # one prompt at a time, a seeded permutation per epoch
    pretrain_order: BatchOrder | None
    shape: Geometry
    total_steps: int
    eval_every: int
    save_every: int
    objective: nn.Module  # the MiniLLMObjective; after ``Distributed.prepare``, its engine
    optimizer: torch.optim.Optimizer
    scheduler: Any
    state: MiniLLMState = field(default_factory=MiniLLMState)
    store: list[Rollout] = field(default_factory=list)  # the whole cycle's, every process's rollouts
    metrics: MetricsLog | None = None
    last_dev_loss: float | None = None

    @property
    def pad(self) -> int:
        return self.tokenizer.pad_token_id

    def due(self, every: int) -> bool:
        """Whether the step just taken is a multiple of ``every`` or the last one."""
        return self.state.step % every == 0 or self.state.step == self.total_steps


def setup(config: Config) -> MiniLLMRun:
    """The run folder, models, data, orders, objective, optimizer and scheduler of ``config``."""
    hf_logging.disable_progress_bar()
    distributed = Distributed(config)
    out = Path(config.train.output_dir)
    cache_dir = Path(config.data.cache_dir) if config.data.cache_dir else out.parent / ".cache"
    if distributed.is_main:
        with storage_errors(out):
            out.mkdir(parents=True, exist_ok=True)
        save_config(config, out / "config.yaml")
        for folder in ("best", "last"):
            recover_replaced(out / folder)
    distributed.wait_for_everyone()
    rank, world = distributed.rank, distributed.world_size
    seed_everything(config.seed + rank)
    with distributed.loading_whole_models():
        tokenizer, student, teacher, vocab_size = load_models(config, distributed.device)
    with distributed.main_process_first():
        data = load_data(config, tokenizer, cache_dir)
    knobs = config.minillm
    use_pretrain = data.pretrain is not None and knobs.lm_coef > 0
    if use_pretrain:
        check_pretrain_positions(student, data.pretrain.chunk_length, config.data.pretrain)
    shape = geometry(config, world)
    total_steps = total_optimizer_steps(config, shape, len(data.train), world)
    objective = MiniLLMObjective(student, knobs, vocab_size, config.objective.chunk_size, distributed.sharded)
    optimizer = build_optimizer(objective, config.train)
    return MiniLLMRun(
        config=config,
        distributed=distributed,
        out=out,
        tokenizer=tokenizer,
        teacher=teacher,
        vocab_size=vocab_size,
        data=data,
        prompt_order=BatchOrder(len(data.train), 1, config.seed, rank, world),
        pretrain_order=(
            BatchOrder(len(data.pretrain), config.train.batch_size, config.seed + 1, rank, world)
            if use_pretrain
            else None
        ),
        shape=shape,
        total_steps=total_steps,
        eval_every=config.train.eval_every or shape.steps_per_cycle,
        save_every=config.train.save_every or shape.steps_per_cycle,
        objective=objective,
        optimizer=optimizer,
        scheduler=build_scheduler(optimizer, total_steps, config.train),
    )


def restore(run: MiniLLMRun, resumed: Resumed) -> None:
    """Weights, optimizer, scheduler, position and the store (before ``prepare``)."""
    saved = resumed.trainer_state
    if saved.get("loop") != "minillm":
        raise UserError(
            f"{resumed.checkpoint} was not written by loop: minillm; resume it with its own loop, or start a new "
            "train.output_dir"
        )
    load_model_weights(run.objective.student, resumed.checkpoint)
    run.distributed.load_optimizer_state(run.optimizer, saved["optimizer"], resumed.checkpoint)
    run.scheduler.load_state_dict(saved["scheduler"])
    run.store = [Rollout(**row) for row in saved["store"]]
    run.state = MiniLLMState.from_dict(saved["train"])
    logger.info("resumed from %s (step %d, cycle %d)", resumed.checkpoint, run.state.step, run.state.cycle)


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
        run = setup(config)
        resumed = find_resume(run.distributed, run.out) if config.train.resume else None
        if resumed is not None:
            restore(run, resumed)
        run.objective, run.optimizer = run.distributed.prepare(run.objective, run.optimizer)
        if resumed is not None:
            run.distributed.load_engine_state(resumed.checkpoint)
            resumed.restore_rng()
        if config.train.report_to:
            run.distributed.init_trackers("distillm", config={"seed": config.seed})
        run.metrics = MetricsLog(
            run.out / "metrics.jsonl", run.distributed, run.state.step if resumed else None
        )
        bar = tqdm(
            total=run.total_steps,
            initial=run.state.step,
            desc=f"minillm {run.out.name}",
            disable=not (config.train.progress and run.distributed.is_main),
            dynamic_ncols=True,
        )
        if resumed is None:
            evaluate(run, reference=True)  # step 0: the curves start from the initialised student
        step_start = time.perf_counter()
        while run.state.step < run.total_steps:
            statistics = (
                rollout(run)
                if run.state.cycle < 0 or run.state.cycle_step >= run.shape.steps_per_cycle
                else None
            )
            batches = step_batches(run)
            if statistics is not None:
                batches.seconds["generation"] = statistics.pop("generation_s")
            logged = loss_step(run, batches)
            grad_norm = optimizer_step(run, batches, logged)  # the token loop's: check, clip, step
            run.state.cycle_step += 1
            elapsed, step_start = time.perf_counter() - step_start, time.perf_counter()
            log_step(run, batches, logged, grad_norm, elapsed, statistics, bar)
            if run.due(run.eval_every):
                evaluate(run)
            if run.due(run.save_every):
                save(run)
            if run.state.step < run.total_steps and stop.agreed(run.distributed.any_process()):
                if run.state.step % run.save_every != 0:
                    save(run)
                bar.close()
                checkpoint = run.out / CHECKPOINTS / checkpoint_name(run.state.step)
                raise TrainingStopped(stop.signal_name, run.state.step, checkpoint)
        bar.close()
        return finish(run)


def rollout(run: MiniLLMRun) -> dict[str, float]:
    """A new rollout cycle: each process answers its ``rollouts_per_process`` next prompts from the
    teacher-student mixture of the current student, each prompt from its own keyed generator; the store is
    every process's rollouts, in the prompt order (the same on every process, and the same store one process
    collects alone). Returns the cycle's statistics and its seconds."""
    state, distributed, world = run.state, run.distributed, run.distributed.world_size
    t0 = time.perf_counter()
    sampler = distributed.whole_student(state.step)
    prompts, generators = [], []
    for _ in range(run.shape.rollouts_per_process):
        epoch, index = state.prompts.advance(run.prompt_order)
        prompts.append(run.data.train[run.prompt_order.indices(epoch, index)[0]][0])
        # The prompt's place in the epoch's order, counted over all processes (BatchOrder's interleaving).
        generators.append(rollout_generator(run.config.seed, epoch, index * world + distributed.rank))
    eos = run.tokenizer.eos_token_id
    mine = collect_rollouts(
        sampler, run.teacher, prompts, run.config, eos, run.pad, generators, distributed.device
    )
    every = distributed.gather(mine)  # [rank][i]: prompt i * world + rank of the cycle
    run.store = [every[rank][i] for i in range(len(mine)) for rank in range(world)]
    state.cycle, state.cycle_step = state.cycle + 1, 0
    synchronize(distributed.device)
    return {**rollout_statistics(run.store, run.config.minillm), "generation_s": time.perf_counter() - t0}


@dataclass
class PPOBatches:
    """One optimizer step's micro-batches of the store (on the device) and of the pretraining corpus."""

    micro: list[RolloutBatch]
    advantages: list[Tensor]  # [N_k] per micro-batch, whitened over the whole step
    num_tokens: Tensor  # rollout tokens of the whole step: all micro-batches, all processes
    pretrain: list[dict[str, Tensor] | None]
    pretrain_tokens: Tensor | None
    ppo_epoch: int
    seconds: dict[str, float] = field(
        default_factory=lambda: dict.fromkeys(("generation", "teacher", "student"), 0.0)
    )


def step_batches(run: MiniLLMRun) -> PPOBatches:
    """This step's micro-batches: the next ``batch_size x grad_accum x world_size`` rows of the store in its
    PPO epoch's shuffled order, micro-batch ``k`` of process ``r`` the ``k * world_size + r``-th slice of
    ``batch_size``; advantages whitened over the step's rollout tokens on every process (so batch 4 x
    accumulation 1, 2 x 2 and two processes of 2 train on, whiten and normalise the same tokens); the
    pretraining chunks."""
    config, state, distributed = run.config, run.state, run.distributed
    epoch, index = divmod(state.cycle_step, run.shape.steps_per_epoch)
    order = ppo_order(config.seed, state.cycle, epoch, len(run.store))
    size, accumulation, world = config.train.batch_size, config.train.grad_accum, distributed.world_size
    first = index * size * accumulation * world

    def rows(k: int) -> list[Rollout]:
        start = first + (k * world + distributed.rank) * size
        return [run.store[i] for i in order[start : start + size]]

    micro = [
        _to_device(rollout_batch(rows(k), config.minillm, run.pad), distributed.device)
        for k in range(accumulation)
    ]
    reward_to_go = torch.cat([m.reward_to_go for m in micro])  # [N_step]
    every = torch.ones_like(reward_to_go, dtype=torch.bool)[None]
    advantages = whiten(reward_to_go[None], every, distributed.sum if distributed.world_size > 1 else None)[0]
    num_tokens = distributed.sum(torch.tensor(len(reward_to_go), device=distributed.device))
    pretrain: list[dict[str, Tensor] | None] = [None] * accumulation
    pretrain_tokens = None
    if run.pretrain_order is not None:
        pretrain = []
        for _ in range(accumulation):
            p_epoch, p_index = state.pretrain.advance(run.pretrain_order)
            rows = [run.data.pretrain[i] for i in run.pretrain_order.indices(p_epoch, p_index)]
            pretrain.append({k: v.to(distributed.device) for k, v in run.data.pretrain.collate(rows).items()})
        pretrain_tokens = count_tokens(pretrain, distributed)
    splits = advantages.split([len(m.reward_to_go) for m in micro])
    return PPOBatches(micro, list(splits), num_tokens, pretrain, pretrain_tokens, epoch)


def loss_step(run: MiniLLMRun, batches: PPOBatches) -> Tensor:
    """Teacher and student forward, backward of every micro-batch; returns [total, policy, single-step,
    pretraining] of the step, summed over micro-batches and processes (each a share of the step's mean)."""
    knobs, distributed, seconds = run.config.minillm, run.distributed, batches.seconds
    chunked = run.config.objective.chunk_size > 0
    logged = torch.zeros(4, device=distributed.device)
    for k, (micro, pretrain) in enumerate(zip(batches.micro, batches.pretrain)):
        t0 = time.perf_counter()
        teacher_out = (
            teacher_forward(run.teacher, micro.batch, run.vocab_size, chunked)
            if knobs.single_step_reg
            else None
        )
        teacher_pt = (
            teacher_forward(run.teacher, pretrain, run.vocab_size, chunked)
            if pretrain is not None and knobs.pt_kd_ratio > 0
            else None
        )
        synchronize(distributed.device)
        t1 = time.perf_counter()
        seconds["teacher"] += t1 - t0
        with distributed.micro_batch(last=k == len(batches.micro) - 1):
            loss = run.objective(
                micro,
                batches.advantages[k],
                batches.num_tokens,
                teacher_out,
                pretrain,
                teacher_pt,
                batches.pretrain_tokens,
            )
            distributed.backward(loss.total)
        synchronize(distributed.device)
        seconds["student"] += time.perf_counter() - t1
        logged += torch.stack([loss.total.detach(), loss.policy, loss.single_step, loss.pretrain]).float()
    return distributed.sum(logged)


def log_step(
    run: MiniLLMRun, batches: PPOBatches, logged: Tensor, grad_norm, elapsed, statistics, bar
) -> None:
    """metrics.jsonl: train.py's columns where they apply (``divergence`` is the single-step reverse KL,
    ``lm`` the pretraining term), the policy loss, the cycle and PPO epoch, and at a cycle's first step the
    rollouts' statistics."""
    num_tokens = int(batches.num_tokens)
    row = {
        "step": run.state.step,
        "loss": logged[0].item(),
        "policy": logged[1].item(),
        "divergence": logged[2].item(),
        "lm": logged[3].item(),
        "lr": run.scheduler.get_last_lr()[0],
        "tokens": num_tokens,
        "tokens_per_s": num_tokens / max(elapsed, 1e-9),
        "cycle": run.state.cycle,
        "ppo_epoch": batches.ppo_epoch,
        **(statistics or {}),
        **{f"{key}_s": value for key, value in batches.seconds.items()},
    }
    if grad_norm is not None:
        row["grad_norm"] = float(grad_norm)
    bar.update(1)
    bar.set_postfix(loss=f"{row['loss']:.4f}", cycle=run.state.cycle)
    if run.due(run.config.train.log_every) or statistics is not None:
        run.metrics.write(row)


def evaluate(run: MiniLLMRun, reference: bool = False) -> None:
    """Dev loss (and ROUGE-L) of the current student with the token loop's functions, logged; the best
    model so far is kept (``train.keep_best``). ``reference``: the untrained student's evaluation before
    step 1, only logged (as the token loop does: a run's best is one of its trained students)."""
    step = run.state.step
    t0 = time.perf_counter()
    evaluation = measure_student(run)
    run.metrics.write({"step": step, **evaluation})
    if not reference:
        run.state.seconds["evaluation"] += time.perf_counter() - t0
        run.last_dev_loss = evaluation.get("dev_loss", run.last_dev_loss)
        keep_best(run, evaluation)


def save(run: MiniLLMRun) -> None:
    """A resumable checkpoint of this step: weights, optimizer, scheduler, the loop's position, the rollout
    store (while PPO epochs on it remain; the same on every process) and every process's RNGs."""
    distributed, state = run.distributed, run.state
    pending = state.cycle_step < run.shape.steps_per_cycle  # the store is still needed after a resume
    trainer_state = {
        "loop": "minillm",
        "optimizer": distributed.optimizer_state(run.optimizer),
        "scheduler": run.scheduler.state_dict(),
        "processes": distributed.gather({"rng": capture_rng_state()}),
        "store": [r.to_dict() for r in run.store] if pending else [],
        "train": state.to_dict(),
    }
    try:
        distributed.save_checkpoint(
            run.out, state.step, run.tokenizer, trainer_state, keep=run.config.train.keep_checkpoints
        )
    except StorageError as error:
        raise stopped_writing(f"the checkpoint of step {state.step}", error, state.step, run.out) from error


def finish(run: MiniLLMRun) -> TrainResult:
    """Write ``last/`` (and ``merged/`` for LoRA) and ``summary.json``, last: the run is done."""
    distributed, state = run.distributed, run.state
    weights = distributed.student_state_dict()
    # Steps on a cycle's rollouts in their first PPO pass count as fresh samples, the later passes as replayed:
    # the token loop's source names, so reports compare the two loops' use of student-generated text.
    first_pass = sum(s % run.shape.steps_per_cycle < run.shape.steps_per_epoch for s in range(state.step))
    counts = {k: v for k, v in (("fresh", first_pass), ("replay", state.step - first_pass)) if v}
    summary = {
        "world_size": distributed.world_size,
        "steps": state.step,
        "cycles": state.cycle + 1,
        "seconds": state.seconds,
        "source_counts": counts,
        "tokens": state.tokens_seen,
    }
    return write_final(run, weights, summary, counts)


def _to_device(rollouts: RolloutBatch, device: torch.device) -> RolloutBatch:
    return RolloutBatch(
        {k: v.to(device) for k, v in rollouts.batch.items()},
        rollouts.student_logprobs.to(device),
        rollouts.weights.to(device),
        rollouts.reward_to_go.to(device),
    )


def rollout_statistics(store: list[Rollout], knobs: MiniLLMConfig) -> dict[str, float]:
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
        # Sum over a mixed sample of log q_old - log p: the sequence-level reverse KL's integrand (an
        # estimate of KL(q || p) itself only for a = 0).
        "rollout_log_ratio": float(log_ratio.mean()),
        "rollout_weight": float(weights.mean()),
    }
