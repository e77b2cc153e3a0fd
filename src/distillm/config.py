"""Typed configuration: frozen dataclasses are the schema and the single home of every default.

A run's configuration is built in three layers, later ones winning:

1. the defaults below,
2. a YAML preset (``distillm train --config configs/tiny/kd.yaml``), nested like the dataclasses, over the
   preset its ``base:`` key names (if any, relative to the preset's file; a base may have a base),
3. dotted ``key=value`` overrides on the command line (``train.max_steps=20 objective.divergence=skew_reverse_kl``),
   whose values are parsed as YAML scalars (``1e-4``, ``true``, ``null``, ``[q_proj, v_proj]``).

Every field carries its help text in ``metadata["help"]``; ``distillm train --help`` is generated from it.
``distillm train --config X --print-config`` prints the resolved result.
An unknown key, a value of the wrong type or an out-of-range value raises :class:`ConfigError` naming the
key (and the file it came from) and the value.
"""

from __future__ import annotations

import dataclasses
import difflib
import logging
import os
import re
import types
import typing
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import torch
import yaml

from distillm.data.formats import format_choices
from distillm.errors import UserError
from distillm.losses.divergences import DIVERGENCES, HYPER_PARAMETERS
from distillm.storage import atomic_write_text

logger = logging.getLogger(__name__)


class ConfigError(UserError, ValueError):
    """A configuration value that cannot be used; the message names the key and the value.

    ``key``: the dotted key at fault, when there is one, so that the loader can name the file that set it.
    """

    def __init__(self, message: str, key: str | None = None):
        super().__init__(message)
        self.key = key


def _field(default: Any, help: str, **kwargs: Any) -> Any:
    if isinstance(default, (list, dict, set)):
        raise TypeError("mutable defaults are not allowed in frozen configs; use a tuple")
    if dataclasses.is_dataclass(default):
        return field(default_factory=lambda: default, metadata={"help": help}, **kwargs)
    return field(default=default, metadata={"help": help}, **kwargs)


class _Loader(yaml.SafeLoader):
    """YAML 1.1 reads ``5e-5`` (no dot) as a string; learning rates are written that way, so accept it."""


_Loader.add_implicit_resolver(
    "tag:yaml.org,2002:float",
    re.compile(
        r"""^(?:[-+]?(?:[0-9][0-9_]*)\.[0-9_]*(?:[eE][-+]?[0-9]+)?
        |[-+]?(?:[0-9][0-9_]*)(?:[eE][-+]?[0-9]+)
        |\.[0-9_]+(?:[eE][-+][0-9]+)?
        |[-+]?\.(?:inf|Inf|INF)
        |\.(?:nan|NaN|NAN))$""",
        re.X,
    ),
    list("-+0123456789."),
)


def _yaml_load(text: str) -> Any:
    return yaml.load(text, Loader=_Loader)  # noqa: S506 - a SafeLoader subclass


def _check(condition: bool, key: str, value: Any, requirement: str) -> None:
    if not condition:
        raise ConfigError(f"{key}={value!r} is invalid: {requirement}", key)


Precision = Literal["fp32", "bf16", "fp16"]


@dataclass(frozen=True)
class LoraConfig:
    """Low-rank adapters on the student (through peft). The paper's values: r 16, alpha 64, dropout 0.1."""

    enabled: bool = _field(False, "Train LoRA adapters instead of all student weights.")
    r: int = _field(16, "LoRA rank.")
    alpha: float = _field(64.0, "LoRA scaling numerator (lora_alpha).")
    dropout: float = _field(0.1, "Dropout on the LoRA branch.")
    target_modules: tuple[str, ...] | None = _field(
        None, "Module names to adapt (e.g. [q_proj, v_proj]); null lets peft pick the family's default."
    )
    merge_on_save: bool = _field(False, "Also write a merged full model next to the adapter at the end.")

    def validate(self, prefix: str) -> None:
        _check(self.r >= 1, f"{prefix}.r", self.r, "must be >= 1")
        _check(self.alpha > 0, f"{prefix}.alpha", self.alpha, "must be > 0")
        _check(0.0 <= self.dropout < 1.0, f"{prefix}.dropout", self.dropout, "must be in [0, 1)")


@dataclass(frozen=True)
class ModelConfig:
    """Which models to load and how."""

    student: str = _field("", "Student model: a Hugging Face folder or hub name (required for training).")
    teacher: str | None = _field(None, "Teacher model folder or hub name; null for methods without one.")
    teacher_adapter: str | None = _field(
        None, "A peft LoRA adapter folder merged into the teacher when it is loaded."
    )
    tokenizer: str | None = _field(None, "Tokenizer folder or name; defaults to the student's.")
    teacher_dtype: Precision = _field(
        "fp32", "Teacher weights' dtype; bf16 halves its memory and speeds up its frozen forward."
    )
    trust_remote_code: bool = _field(False, "Allow model code from the hub to run (off: safe by default).")
    gradient_checkpointing: bool = _field(False, "Recompute student activations in backward to save memory.")
    lora: LoraConfig = _field(LoraConfig(), "LoRA settings for the student.")

    def validate(self, prefix: str) -> None:
        self.lora.validate(f"{prefix}.lora")


@dataclass(frozen=True)
class DataConfig:
    """Instruction data, its template and its tokenization."""

    train: str = _field(
        "",
        "Training data: a file any `distillm prepare` format reads, a hub dataset name, or MiniLLM's processed "
        ".bin/.idx (folder, prefix or file; its ids as stored, its .jsonl's text for ROUGE-L).",
    )
    dev: str | None = _field(
        None,
        "Dev data; null takes `dev_size` rows out of the training pool (MiniLLM's .bin/.idx: its valid split).",
    )
    format: str = _field("auto", f"Data format: {format_choices()}.")
    dev_size: int = _field(1000, "Rows taken from the training pool for the dev split when `dev` is null.")
    dev_split: Literal["first", "random"] = _field(
        "first", "How the dev rows are taken: the first rows (as the original) or a seeded random sample."
    )
    template: Literal["alpaca", "chat"] = _field(
        "alpaca", "Prompt template: the paper's Alpaca-style text, or the tokenizer's chat template."
    )
    max_length: int = _field(
        512, "Maximum prompt + response tokens; a response that fits ends in EOS, a cut one gets none."
    )
    max_prompt_length: int = _field(256, "Maximum prompt tokens; longer prompts are cut from the left.")
    pretrain: str | None = _field(
        None,
        "Corpus of the pretraining LM term: a folder from `distillm prepare-pretrain`, MiniLLM's .bin/.idx "
        "(folder or prefix), or a small text file / folder of .txt packed into the cache at max_length.",
    )
    cache_dir: str | None = _field(None, "Where prepared data is cached; null uses <output_dir>/../.cache.")

    def validate(self, prefix: str) -> None:
        _check(self.dev_size >= 0, f"{prefix}.dev_size", self.dev_size, "must be >= 0")
        _check(self.max_length >= 2, f"{prefix}.max_length", self.max_length, "must be >= 2")
        _check(
            1 <= self.max_prompt_length < self.max_length,
            f"{prefix}.max_prompt_length",
            self.max_prompt_length,
            f"must be >= 1 and < data.max_length ({self.max_length})",
        )


@dataclass(frozen=True)
class ObjectiveConfig:
    """What is minimised: (1 - kd_ratio) * CE + kd_ratio * divergence + lm_coef * CE(pretraining chunk)."""

    divergence: str | None = _field(
        None,
        f"Divergence between teacher and student, by name ({', '.join(DIVERGENCES)}); null for plain "
        "fine-tuning.",
    )
    kd_ratio: float = _field(0.0, "Weight of the divergence; 1 - kd_ratio weighs the CE on the labels.")
    # One float field per divergence hyper-parameter (skew_alpha, jsd_beta): its default, help and range come
    # from the divergence registry, so a divergence with a new hyper-parameter needs no edit here.
    for _key, _parameter in HYPER_PARAMETERS.items():
        __annotations__[_key] = "float"
        locals()[_key] = _field(_parameter.default, _parameter.help)
    del _key, _parameter
    lm_coef: float = _field(0.0, "Weight of the pretraining language-model term (needs data.pretrain).")
    chunk_size: int = _field(
        0, "Tokens per chunk for the memory-efficient loss path; 0 computes full logits at once."
    )

    def validate(self, prefix: str) -> None:
        _check(0.0 <= self.kd_ratio <= 1.0, f"{prefix}.kd_ratio", self.kd_ratio, "must be in [0, 1]")
        for key, parameter in HYPER_PARAMETERS.items():
            value = getattr(self, key)
            _check(parameter.contains(value), f"{prefix}.{key}", value, f"must be in {parameter.interval}")
        _check(self.lm_coef >= 0.0, f"{prefix}.lm_coef", self.lm_coef, "must be >= 0")
        _check(self.chunk_size >= 0, f"{prefix}.chunk_size", self.chunk_size, "must be >= 0")
        if self.kd_ratio > 0:
            _check(
                self.divergence is not None,
                f"{prefix}.divergence",
                self.divergence,
                f"a divergence is required when {prefix}.kd_ratio > 0",
            )
        if self.divergence is not None:
            _check(
                self.divergence in DIVERGENCES,
                f"{prefix}.divergence",
                self.divergence,
                f"must be one of {sorted(DIVERGENCES)}",
            )

    def hyper_parameters(self) -> dict[str, float]:
        """The divergence hyper-parameters by config key (``{"skew_alpha": 0.1, ...}``), for ``get_divergence``."""
        return {key: getattr(self, key) for key in HYPER_PARAMETERS}


@dataclass(frozen=True)
class SourcesConfig:
    """Where each step's training sequences come from.

    - ``dataset``: the (ground-truth or teacher-generated) dataset batch, every step (SFT, KD, SeqKD).
    - ``mixed``: student-generated outputs with probability ``student_ratio``, else the dataset (ImitKD, GKD).
    - ``adaptive``: DistiLLM's adaptive off-policy schedule with a replay buffer.
    """

    kind: Literal["dataset", "mixed", "adaptive"] = _field("dataset", "dataset, mixed or adaptive.")
    student_ratio: float = _field(
        0.5, "mixed: probability of training on fresh student outputs (the original's mixed_alpha)."
    )
    mixed_from_buffer: bool = _field(
        False, "mixed: push fresh outputs into the buffer and train on a buffer sample (the original's way)."
    )
    init_threshold: float = _field(0.0, "adaptive: initial probability phi of student-generated outputs.")
    loss_eps: float = _field(0.1, "adaptive: rise of the dev loss over the reference that raises phi.")
    phi_step: float = _field(0.1, "adaptive: how much phi grows at a time (capped at 1).")
    replay_ratio: Literal["decreasing", "constant", "increasing"] = _field(
        "decreasing", "adaptive: share of phi spent on fresh generation: 1 - t/T, 1/2 or t/T."
    )
    algorithm: Literal["code", "paper"] = _field(
        "code",
        "adaptive: 'code' follows the original implementation (train on fresh samples directly, force-fill "
        "the buffer, reference = loss at the last phi increase); 'paper' follows Algorithm 1.",
    )
    capacity: int = _field(1000, "Replay buffer capacity in samples.")
    generator: Literal["student", "teacher"] = _field("student", "Which model generates the outputs.")

    def validate(self, prefix: str) -> None:
        _check(0.0 <= self.student_ratio <= 1.0, f"{prefix}.student_ratio", self.student_ratio, "in [0, 1]")
        _check(
            0.0 <= self.init_threshold <= 1.0, f"{prefix}.init_threshold", self.init_threshold, "in [0, 1]"
        )
        _check(self.loss_eps >= 0.0, f"{prefix}.loss_eps", self.loss_eps, "must be >= 0")
        _check(0.0 < self.phi_step <= 1.0, f"{prefix}.phi_step", self.phi_step, "must be in (0, 1]")
        _check(self.capacity >= 1, f"{prefix}.capacity", self.capacity, "must be >= 1")


@dataclass(frozen=True)
class GenerationConfig:
    """Sampling settings, for student-generated outputs, SeqKD data and evaluation."""

    max_new_tokens: int = _field(256, "Maximum tokens generated per response.")
    temperature: float = _field(1.0, "Sampling temperature.")
    top_p: float = _field(1.0, "Nucleus sampling mass; 1 keeps the whole distribution.")
    top_k: int = _field(0, "Keep the k most likely tokens; 0 turns it off.")
    no_repeat_ngram_size: int = _field(0, "Forbid repeating n-grams of this size; 0 turns it off.")
    do_sample: bool = _field(True, "Sample; false decodes greedily.")
    batch_size: int = _field(16, "Prompts per generation batch in evaluation and `distillm generate`.")
    pack_weights: bool = _field(
        True,
        "On a CPU, run the decoding steps of each generation call of 16+ new tokens through distillm's own "
        "AVX2/AVX-512 kernel (batches of up to 16 rows; a Llama-layout layer's whole step in one call) or "
        "oneDNN's packed layout (a second copy of the large float32 linear weights while it runs): faster "
        "decoding steps (docs/generation.md).",
    )
    sampler: Literal["auto", "distillm", "generate"] = _field(
        "auto",
        "Decoding loop: distillm's own sampler (distillm.generation), Hugging Face's model.generate, or auto: "
        "the one measured faster on the model's device type (distillm on CPU; on CUDA distillm until "
        "benchmarks/gpu_check.sh measures otherwise, see docs/generation.md).",
    )

    def validate(self, prefix: str) -> None:
        _check(self.max_new_tokens >= 1, f"{prefix}.max_new_tokens", self.max_new_tokens, "must be >= 1")
        _check(self.temperature > 0, f"{prefix}.temperature", self.temperature, "must be > 0")
        _check(0.0 < self.top_p <= 1.0, f"{prefix}.top_p", self.top_p, "must be in (0, 1]")
        _check(self.top_k >= 0, f"{prefix}.top_k", self.top_k, "must be >= 0")
        _check(
            self.no_repeat_ngram_size >= 0,
            f"{prefix}.no_repeat_ngram_size",
            self.no_repeat_ngram_size,
            ">= 0",
        )
        _check(self.batch_size >= 1, f"{prefix}.batch_size", self.batch_size, "must be >= 1")


@dataclass(frozen=True)
class TrainConfig:
    """The optimisation loop: steps, batches, optimizer, schedule, evaluation and checkpoints."""

    output_dir: str = _field("runs/train", "Run folder: checkpoints, metrics.jsonl, the resolved config.")
    max_steps: int = _field(0, "Optimizer steps; 0 derives them from `epochs`.")
    epochs: int = _field(1, "Passes over the training data when max_steps is 0.")
    batch_size: int = _field(8, "Sequences per micro-batch per process.")
    grad_accum: int = _field(1, "Micro-batches per optimizer step.")
    lr: float = _field(5e-4, "Peak learning rate.")
    lr_min: float = _field(1e-7, "Final learning rate of the cosine schedule.")
    weight_decay: float = _field(0.01, "AdamW weight decay (never on biases and norms).")
    adam_betas: tuple[float, float] = _field((0.9, 0.999), "AdamW betas.")
    adam_eps: float = _field(1e-8, "AdamW epsilon.")
    scheduler: Literal["cosine", "constant", "noam"] = _field("cosine", "Learning-rate schedule.")
    warmup_steps: int = _field(0, "Linear warmup steps.")
    clip_grad: float = _field(1.0, "Gradient-norm clipping; 0 turns it off.")
    precision: Precision = _field("fp32", "Student compute precision: fp32, bf16 or fp16 (GPU only).")
    eval_every: int = _field(0, "Evaluate on the dev split every N optimizer steps; 0 means once per epoch.")
    eval_rouge: bool = _field(False, "Also sample dev responses and compute ROUGE-L at each evaluation.")
    eval_rouge_rows: int = _field(0, "Dev rows used for in-training ROUGE-L; 0 uses them all.")
    select_by: Literal["dev_loss", "rougeL"] = _field(
        "dev_loss", "Criterion that picks the best checkpoint (rougeL needs eval_rouge)."
    )
    save_every: int = _field(
        0, "Write a resumable checkpoint every N optimizer steps; 0 means once per epoch."
    )
    keep_checkpoints: int = _field(
        2,
        "Resumable checkpoints kept besides best/ and last/ (2: if the newest is damaged, resume falls back "
        "to the one before; docs/faults.md).",
    )
    log_every: int = _field(10, "Log metrics every N optimizer steps.")
    report_to: tuple[Literal["tensorboard", "wandb"], ...] = _field(
        (), "Extra metric sinks besides metrics.jsonl: tensorboard, wandb."
    )
    resume: bool = _field(True, "Resume from the newest checkpoint in output_dir when one exists.")
    progress: bool = _field(True, "Show a progress bar.")

    def validate(self, prefix: str) -> None:
        _check(self.max_steps >= 0, f"{prefix}.max_steps", self.max_steps, "must be >= 0")
        _check(self.epochs >= 1, f"{prefix}.epochs", self.epochs, "must be >= 1")
        _check(self.batch_size >= 1, f"{prefix}.batch_size", self.batch_size, "must be >= 1")
        _check(self.grad_accum >= 1, f"{prefix}.grad_accum", self.grad_accum, "must be >= 1")
        _check(self.lr > 0, f"{prefix}.lr", self.lr, "must be > 0")
        _check(
            0 <= self.lr_min <= self.lr,
            f"{prefix}.lr_min",
            self.lr_min,
            f"must be in [0, train.lr={self.lr}]",
        )
        _check(self.weight_decay >= 0, f"{prefix}.weight_decay", self.weight_decay, "must be >= 0")
        _check(
            all(0.0 <= b < 1.0 for b in self.adam_betas),
            f"{prefix}.adam_betas",
            self.adam_betas,
            "each in [0, 1)",
        )
        _check(self.warmup_steps >= 0, f"{prefix}.warmup_steps", self.warmup_steps, "must be >= 0")
        _check(self.clip_grad >= 0, f"{prefix}.clip_grad", self.clip_grad, "must be >= 0")
        for name in ("eval_every", "eval_rouge_rows", "save_every"):
            _check(getattr(self, name) >= 0, f"{prefix}.{name}", getattr(self, name), "must be >= 0")
        _check(
            self.keep_checkpoints >= 1, f"{prefix}.keep_checkpoints", self.keep_checkpoints, "must be >= 1"
        )
        _check(self.log_every >= 1, f"{prefix}.log_every", self.log_every, "must be >= 1")
        if self.select_by == "rougeL":
            _check(self.eval_rouge, f"{prefix}.select_by", self.select_by, f"needs {prefix}.eval_rouge=true")


@dataclass(frozen=True)
class MiniLLMConfig:
    """MiniLLM's policy-gradient knobs (Gu et al., ICLR 2024; shared/reference/minillm-method.md, sections 3-10).

    Defaults are the paper's scripts' values (not the original's argparse defaults; docs/differences.md).
    Read by the MiniLLM loop (``loop: minillm``, ``distillm.minillm``); the token loop refuses a changed
    section (it would change nothing there). Its optimiser settings are the ``train`` section's (scripts: lr 5e-6, constant after 100 warm-up steps, AdamW betas (0.9, 0.95),
    weight decay 1e-6, 5000 steps, gradient clipping 1.0).
    """

    teacher_mix_alpha: float = _field(
        0.2,
        "Teacher share a of the rollout sampling distribution (1-a) q + a p; 0 samples the student alone.",
    )
    num_rollouts: int = _field(256, "Rollouts collected per cycle, over all processes.")
    ppo_epochs: int = _field(4, "Passes over each cycle's rollouts before new ones are sampled.")
    reward_scaling: float = _field(
        0.5, "Per-token rewards are (log p - log q_old) / reward_scaling (before clipping)."
    )
    cliprange_reward: float = _field(
        100.0,
        "Per-token rewards are clipped to +-cliprange_reward (the original's argparse default 1 is not what its scripts run).",
    )
    gamma: float = _field(0.95, "Discount of the reward-to-go.")
    cliprange: float = _field(0.2, "PPO clip range epsilon on the ratio (q_theta / q_old) * w.")
    single_step_reg: bool = _field(True, "Add the exact single-step reverse KL on the rollout tokens.")
    lm_coef: float = _field(1.0, "Weight of the pre-training term; 0 turns it off.")
    pt_kd_ratio: float = _field(
        0.5, "Pre-training term = (1 - pt_kd_ratio) CE + pt_kd_ratio soft CE against the teacher."
    )

    def validate(self, prefix: str) -> None:
        _check(
            0.0 <= self.teacher_mix_alpha <= 1.0,
            f"{prefix}.teacher_mix_alpha",
            self.teacher_mix_alpha,
            "must be in [0, 1]",
        )
        _check(self.num_rollouts >= 1, f"{prefix}.num_rollouts", self.num_rollouts, "must be >= 1")
        _check(self.ppo_epochs >= 1, f"{prefix}.ppo_epochs", self.ppo_epochs, "must be >= 1")
        _check(self.reward_scaling > 0, f"{prefix}.reward_scaling", self.reward_scaling, "must be > 0")
        _check(self.cliprange_reward > 0, f"{prefix}.cliprange_reward", self.cliprange_reward, "must be > 0")
        _check(0.0 <= self.gamma <= 1.0, f"{prefix}.gamma", self.gamma, "must be in [0, 1]")
        _check(0.0 < self.cliprange < 1.0, f"{prefix}.cliprange", self.cliprange, "must be in (0, 1)")
        _check(self.lm_coef >= 0, f"{prefix}.lm_coef", self.lm_coef, "must be >= 0")
        _check(0.0 <= self.pt_kd_ratio <= 1.0, f"{prefix}.pt_kd_ratio", self.pt_kd_ratio, "must be in [0, 1]")


@dataclass(frozen=True)
class Config:
    """A whole training run."""

    seed: int = _field(10, "The one seed all randomness flows from (the paper's scripts use 10).")
    loop: Literal["tokens", "minillm"] = _field(
        "tokens",
        "Which training loop runs: tokens (distillm.train: SFT, KD, SeqKD, ImitKD, GKD, DistiLLM) or minillm "
        "(distillm.minillm: MiniLLM's rollouts and PPO epochs, configured by the minillm section).",
    )
    model: ModelConfig = _field(ModelConfig(), "Models.")
    data: DataConfig = _field(DataConfig(), "Data.")
    objective: ObjectiveConfig = _field(ObjectiveConfig(), "Objective.")
    sources: SourcesConfig = _field(SourcesConfig(), "Training-sequence sources.")
    generation: GenerationConfig = _field(GenerationConfig(), "Sampling.")
    train: TrainConfig = _field(TrainConfig(), "Optimisation loop.")
    minillm: MiniLLMConfig = _field(MiniLLMConfig(), "MiniLLM's policy-gradient knobs (loop: minillm).")

    def validate(self) -> Config:
        """Check every field and the fields' combinations; return self so calls chain."""
        for f in dataclasses.fields(self):
            value = getattr(self, f.name)
            if dataclasses.is_dataclass(value):
                value.validate(f.name)
        if self.loop == "minillm":
            self._validate_minillm()
        else:
            _check(self.minillm == MiniLLMConfig(), "minillm", "(changed)", "is read only with loop: minillm")
        if self.objective.kd_ratio > 0 or self.sources.generator == "teacher":
            _check(
                self.model.teacher is not None,
                "model.teacher",
                self.model.teacher,
                "a teacher is required when objective.kd_ratio > 0 or sources.generator=teacher",
            )
        if self.objective.lm_coef > 0:
            _check(
                self.data.pretrain is not None,
                "data.pretrain",
                self.data.pretrain,
                "a pretraining corpus is required when objective.lm_coef > 0",
            )
        if self.train.precision == "fp16":
            _check(
                torch.cuda.is_available(),
                "train.precision",
                "fp16",
                "fp16 needs a GPU; use bf16 or fp32 on CPU",
            )
        return self

    def _validate_minillm(self) -> None:
        """MiniLLM's loop has its own objective and sequence source: settings of the token loop's would do nothing."""
        _check(self.model.teacher is not None, "model.teacher", None, "loop: minillm needs a teacher")
        unused = {
            "objective.divergence": (self.objective.divergence, None),
            "objective.kd_ratio": (self.objective.kd_ratio, 0.0),
            "objective.lm_coef": (self.objective.lm_coef, 0.0),
            "sources.kind": (self.sources.kind, "dataset"),
        }
        for key, (value, default) in unused.items():
            _check(value == default, key, value, "is not read by loop: minillm (use the minillm section)")
        if self.minillm.lm_coef > 0:
            _check(
                self.data.pretrain is not None,
                "data.pretrain",
                None,
                "minillm.lm_coef > 0 needs a pretraining corpus (or set minillm.lm_coef=0)",
            )
        # The rollout's stored log-probabilities are the models' own (temperature 1, no truncation), which
        # is what the rewards, weights and ratios need only under these settings (shared/reference, s. 11.8).
        g = self.generation
        plain = g.do_sample and g.temperature == 1.0 and g.top_k == 0 and g.top_p == 1.0
        _check(
            plain,
            "generation",
            f"temperature={g.temperature}, top_k={g.top_k}, top_p={g.top_p}, do_sample={g.do_sample}",
            "loop: minillm samples its rollouts at temperature 1 without top-k/top-p (the scripts' settings)",
        )
        _check(
            g.no_repeat_ngram_size == 0,
            "generation.no_repeat_ngram_size",
            g.no_repeat_ngram_size,
            "must be 0 with loop: minillm (banned tokens would leave the rollout distribution)",
        )


# --------------------------------------------------------------------------------------------------------
# Building a config from nested mappings, YAML files and dotted overrides.


def _type_name(tp: Any) -> str:
    return getattr(tp, "__name__", None) or str(tp).replace("typing.", "")


def _coerce(value: Any, tp: Any, key: str) -> Any:
    """Check ``value`` against the annotation ``tp`` and convert lists to tuples and ints to floats."""
    origin = typing.get_origin(tp)
    args = typing.get_args(tp)
    if tp is Any:
        return value
    if origin in (typing.Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        errors = []
        for option in args:
            if option is type(None):
                continue
            try:
                return _coerce(value, option, key)
            except ConfigError as error:
                errors.append(str(error))
        raise ConfigError(f"{key}={value!r} is invalid: expected {_type_name(tp)}", key)
    if origin is Literal:
        if value not in args:
            raise ConfigError(f"{key}={value!r} is invalid: must be one of {list(args)}", key)
        return value
    if origin is tuple:
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"{key}={value!r} is invalid: expected a list", key)
        if len(args) == 2 and args[1] is Ellipsis:
            return tuple(_coerce(v, args[0], key) for v in value)
        if len(value) != len(args):
            raise ConfigError(f"{key}={value!r} is invalid: expected a list of {len(args)} items", key)
        return tuple(_coerce(v, a, key) for v, a in zip(value, args))
    if dataclasses.is_dataclass(tp):
        if not isinstance(value, Mapping):
            raise ConfigError(f"{key}={value!r} is invalid: expected a mapping of {tp.__name__} fields", key)
        return _from_mapping(tp, value, key)
    if tp is bool:
        if not isinstance(value, bool):
            raise ConfigError(f"{key}={value!r} is invalid: expected true or false", key)
        return value
    if tp is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise ConfigError(f"{key}={value!r} is invalid: expected an integer", key)
        return value
    if tp is float:
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ConfigError(f"{key}={value!r} is invalid: expected a number", key)
        return float(value)
    if tp is str:
        if not isinstance(value, str):
            raise ConfigError(f"{key}={value!r} is invalid: expected a string", key)
        return value
    raise TypeError(f"unsupported config annotation {tp!r} for {key}")


def _hints(cls: type) -> dict[str, Any]:
    return typing.get_type_hints(cls)


# Keys that earlier versions accepted: a preset or a saved run's config that still has one keeps loading.
REMOVED_KEYS = {
    "data.num_workers": "batches are collated in the training process from prepared token arrays; no DataLoader "
    "workers exist",
}


def _removed(dotted: str) -> bool:
    if dotted not in REMOVED_KEYS:
        return False
    logger.warning("config key %r is ignored (removed: %s); delete it", dotted, REMOVED_KEYS[dotted])
    return True


def _from_mapping(cls: type, data: Mapping[str, Any], prefix: str = "") -> Any:
    hints = _hints(cls)
    names = [f.name for f in dataclasses.fields(cls)]
    kwargs = {}
    for key, value in data.items():
        dotted = f"{prefix}.{key}" if prefix else str(key)
        if _removed(dotted):
            continue
        if key not in names:
            close = difflib.get_close_matches(str(key), names, n=1)
            hint = f"; did you mean {close[0]!r}?" if close else f"; known keys: {', '.join(names)}"
            raise ConfigError(f"unknown config key {dotted!r}{hint}", dotted)
        kwargs[key] = _coerce(value, hints[key], dotted)
    return cls(**kwargs)


def _to_plain(value: Any) -> Any:
    if dataclasses.is_dataclass(value):
        return {f.name: _to_plain(getattr(value, f.name)) for f in dataclasses.fields(value)}
    if isinstance(value, tuple):
        return [_to_plain(v) for v in value]
    return value


def to_dict(config: Any) -> dict[str, Any]:
    """Nested plain dict (lists for tuples) of a config, ready for YAML or JSON."""
    return _to_plain(config)


def _set_dotted(tree: dict[str, Any], key: str, value: Any, schema: type) -> None:
    if _removed(key):
        return
    parts = key.split(".")
    node, cls = tree, schema
    for depth, part in enumerate(parts):
        names = {f.name for f in dataclasses.fields(cls)}
        dotted = ".".join(parts[: depth + 1])
        if part not in names:
            close = difflib.get_close_matches(part, sorted(names), n=1)
            hint = f"; did you mean {'.'.join(parts[:depth] + [close[0]])!r}?" if close else ""
            raise ConfigError(f"unknown config key {dotted!r}{hint}")
        if depth == len(parts) - 1:
            node[part] = value
            return
        sub = _hints(cls)[part]
        if not dataclasses.is_dataclass(sub):
            raise ConfigError(f"config key {dotted!r} is a value, not a section; cannot set {key!r}")
        node = node.setdefault(part, {})
        if not isinstance(node, dict):
            raise ConfigError(f"config key {dotted!r} must be a mapping")
        cls = sub


def parse_overrides(overrides: Sequence[str]) -> list[tuple[str, Any]]:
    """``["train.lr=1e-4", "model.lora.enabled=true"]`` -> ``[("train.lr", 1e-4), ...]`` (YAML scalars)."""
    parsed = []
    for item in overrides:
        key, sep, raw = item.partition("=")
        if not sep or not key.strip():
            raise ConfigError(f"override {item!r} is not of the form key=value (e.g. train.max_steps=100)")
        try:
            value = _yaml_load(raw) if raw.strip() else ""
        except yaml.YAMLError as error:
            raise ConfigError(f"override {item!r}: the value is not valid YAML ({error})") from error
        parsed.append((key.strip(), value))
    return parsed


BASE_KEY = "base"
"""A preset's top-level ``base: <path>`` names the preset it overrides, relative to its own file."""


def load_config(
    path: str | Path | None = None,
    overrides: Sequence[str] = (),
    schema: type = Config,
    validate: bool = True,
) -> Any:
    """Defaults <- YAML preset at ``path`` (over its bases) <- dotted ``overrides``; validated unless ``validate`` is false.

    An error names the file that set the key at fault: the preset, one of its bases, or (for an override)
    the preset given.
    """
    tree: dict[str, Any] = {}
    origins: dict[str, Path] = {}
    source = "the command line"
    if path is not None:
        path = Path(path)
        source = str(path)
        tree, origins = resolve_preset(path)
    try:
        for key, value in parse_overrides(overrides):
            _set_dotted(tree, key, value, schema)
            origins = {leaf: file for leaf, file in origins.items() if not _within(leaf, key)}
        config = _from_mapping(schema, tree)
        return config.validate() if validate else config
    except ConfigError as error:
        origin = origins.get(error.key) if error.key is not None else None
        where = source if origin is None or origin == path else f"{origin} (a base of {path})"
        raise ConfigError(f"{where}: {error}", error.key) from None


def resolve_preset(path: Path, included_by: tuple[Path, ...] = ()) -> tuple[dict[str, Any], dict[str, Path]]:
    """The preset at ``path`` merged over its bases: ``(tree, the file each dotted leaf key came from)``.

    A preset's ``base: <file>`` (relative to the preset) is read first, recursively, and the preset's own
    keys override it: mappings merge key by key, any other value (a list, null) replaces. A missing base and
    a cycle of bases are errors naming the files.
    """
    if path.resolve() in [file.resolve() for file in included_by]:
        cycle = " -> ".join(str(file) for file in (*included_by, path))
        raise ConfigError(
            f"{included_by[-1]}: its bases form a cycle ({cycle}); remove one of the base: keys"
        )
    if not path.is_file():
        if included_by:
            raise ConfigError(f"{included_by[-1]}: its base {path} does not exist; fix the base: path")
        raise ConfigError(f"config file {path} does not exist")
    try:
        tree = _yaml_load(path.read_text(encoding="utf-8"))
    except yaml.YAMLError as error:
        raise ConfigError(f"{path}: not valid YAML: {error}") from error
    if tree is None:
        tree = {}
    if not isinstance(tree, dict):
        raise ConfigError(f"{path}: the top level must be a mapping of sections, got {type(tree).__name__}")
    base = tree.pop(BASE_KEY, None)
    origins = dict.fromkeys(_leaf_keys(tree), path)
    if base is None:
        return tree, origins
    if not isinstance(base, str) or not base.strip():
        raise ConfigError(
            f"{path}: base={base!r} is invalid: give the path of a YAML preset, relative to {path}"
        )
    base_tree, base_origins = resolve_preset(Path(os.path.normpath(path.parent / base)), (*included_by, path))
    return _merged(base_tree, tree), {**base_origins, **origins}


def _merged(base: dict[str, Any], override: Mapping[str, Any]) -> dict[str, Any]:
    """``override`` over ``base``: mappings merge key by key, any other value replaces."""
    merged = dict(base)
    for key, value in override.items():
        if isinstance(value, Mapping) and isinstance(merged.get(key), Mapping):
            merged[key] = _merged(merged[key], value)
        else:
            merged[key] = value
    return merged


def _leaf_keys(tree: Mapping[str, Any], prefix: str = "") -> list[str]:
    """The dotted keys of the non-mapping values of ``tree``; an empty mapping is a leaf too."""
    keys = []
    for key, value in tree.items():
        dotted = f"{prefix}{key}"
        if isinstance(value, Mapping) and value:
            keys.extend(_leaf_keys(value, f"{dotted}."))
        else:
            keys.append(dotted)
    return keys


def _within(key: str, section: str) -> bool:
    """``key`` is ``section`` itself or one of its sub-keys."""
    return key == section or key.startswith(f"{section}.")


def replace(config: Any, **dotted: Any) -> Any:
    """A copy of ``config`` with dotted keys replaced: ``replace(cfg, **{"train.lr": 1e-4})``."""
    tree = to_dict(config)
    for key, value in dotted.items():
        _set_dotted(tree, key, value, type(config))
    return _from_mapping(type(config), tree)


def dump_config(config: Any) -> str:
    """``config`` as YAML, sections in the schema's order: what ``save_config`` writes, ``--print-config`` prints."""
    return yaml.safe_dump(to_dict(config), sort_keys=False)


def save_config(config: Any, path: str | Path) -> None:
    atomic_write_text(path, dump_config(config))


def describe_fields(schema: type = Config, prefix: str = "") -> list[tuple[str, str, Any, str]]:
    """``(dotted key, type, default, help)`` for every leaf field: the source of ``--help`` text."""
    rows = []
    hints = _hints(schema)
    default_instance = schema()
    for f in dataclasses.fields(schema):
        key = f"{prefix}{f.name}"
        tp = hints[f.name]
        if dataclasses.is_dataclass(tp):
            rows.extend(describe_fields(tp, prefix=f"{key}."))
            continue
        rows.append(
            (key, _type_name(tp), _to_plain(getattr(default_instance, f.name)), f.metadata.get("help", ""))
        )
    return rows


def format_help(schema: type = Config) -> str:
    """Help text listing every key, its default and its documentation."""
    lines = []
    section = None
    for key, _tp, default, text in describe_fields(schema):
        head = key.split(".")[0] if "." in key else ""
        if head != section:
            section = head
            lines.append(f"\n{head or 'top level'}:")
        lines.append(f"  {key}={default!r}\n      {text}")
    return "\n".join(lines)
