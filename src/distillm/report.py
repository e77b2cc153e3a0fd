"""The demo's report: one document rendered as Markdown and as HTML, with a PNG of the training curves.

Everything here reads files the other stages wrote and nothing else:

- ``<run>/metrics.jsonl`` and ``<run>/summary.json`` of each training run (``distillm.train``): steps, tokens,
  seconds per part of the step, where the training sequences came from, and the dev curves;
- the evaluation summaries of ``distillm evaluate`` (``summary.json``): ROUGE-L per model over seeds;
- its prediction files (``predictions/<model>/<dataset>/seed<k>.jsonl``): the example answers.

The document is a list of blocks (headings, paragraphs, tables, an image); :func:`to_markdown` and
:func:`to_html` render the same blocks, so the two files never disagree. The plot needs matplotlib, the
optional ``report`` extra (``pip install 'distillm[report]'``).
"""

from __future__ import annotations

import html
import io
import json
import logging
import re
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from distillm.data.template import instruction_and_input
from distillm.errors import UserError
from distillm.storage import atomic_write_bytes, atomic_write_text

logger = logging.getLogger(__name__)

# The paper's GPT-2 numbers, for orientation only (different models, data and scale). Source: the method
# reference's section 13, which quotes them from the paper and a third-party reproduction log.
PAPER_GPT2_MAIN = {
    "setting": "GPT-2 XL (1.5B) -> GPT-2 (0.1B), DistiLLM, ROUGE-L mean (std) over 5 seeds",
    "columns": ["Dolly", "SelfInst", "Vicuna", "S-NI", "UnNI"],
    "row": ["26.11 (0.68)", "13.14 (0.69)", "18.46 (0.53)", "27.51 (0.03)", "29.35 (0.07)"],
}
PAPER_GPT2_LOSSES = {
    "setting": "GPT-2 XL -> GPT-2 0.1B, fixed dataset, alpha 0.1 (the paper's Table 1, loss ablation)",
    "columns": ["S-NI", "UnNI"],
    "rows": {"KLD": ["20.68", "23.38"], "SKL": ["26.26", "28.06"], "SRKL": ["25.83", "28.62"]},
}


# --------------------------------------------------------------------------------------------------------
# The document model.


@dataclass
class Heading:
    text: str
    level: int = 2


@dataclass
class Paragraph:
    text: str


@dataclass
class Table:
    header: list[str]
    rows: list[list[str]]
    align_right: set[int] = field(default_factory=set)  # column indices of numbers


@dataclass
class Image:
    path: str  # relative to the report
    alt: str


@dataclass
class Preformatted:
    text: str


Block = Heading | Paragraph | Table | Image | Preformatted


def _md_cell(text: str) -> str:
    return text.replace("|", "\\|").replace("\n", "<br>")


def to_markdown(blocks: Sequence[Block]) -> str:
    """GitHub-flavoured Markdown of ``blocks``."""
    parts = []
    for block in blocks:
        if isinstance(block, Heading):
            parts.append("#" * block.level + " " + block.text)
        elif isinstance(block, Paragraph):
            parts.append(block.text)
        elif isinstance(block, Table):
            lines = ["| " + " | ".join(_md_cell(h) for h in block.header) + " |"]
            lines.append(
                "|"
                + "|".join("---:" if i in block.align_right else "---" for i in range(len(block.header)))
                + "|"
            )
            lines += ["| " + " | ".join(_md_cell(c) for c in row) + " |" for row in block.rows]
            parts.append("\n".join(lines))
        elif isinstance(block, Image):
            parts.append(f"![{block.alt}]({block.path})")
        elif isinstance(block, Preformatted):
            parts.append("```\n" + block.text.rstrip("\n") + "\n```")
    return "\n\n".join(parts) + "\n"


_CSS = (
    "body{font-family:sans-serif;max-width:72em;margin:2em auto;padding:0 1em;line-height:1.4}"
    "table{border-collapse:collapse;margin:1em 0}th,td{border:1px solid #ccc;padding:.25em .6em;"
    "vertical-align:top}th{background:#f3f3f3}td.num{text-align:right;font-variant-numeric:tabular-nums}"
    "td{white-space:pre-wrap}pre{background:#f6f6f6;padding:.6em}img{max-width:100%}"
)


def _inline_html(text: str) -> str:
    """Escape, then render the only inline Markdown the report uses: `code` and **bold**."""
    escaped = html.escape(text)
    escaped = re.sub(r"`([^`]+)`", r"<code>\1</code>", escaped)
    return re.sub(r"\*\*([^*]+)\*\*", r"<b>\1</b>", escaped)


def to_html(blocks: Sequence[Block], title: str) -> str:
    """A standalone HTML page of ``blocks``."""
    parts = [
        "<!DOCTYPE html>",
        f'<html><head><meta charset="utf-8"><title>{html.escape(title)}</title><style>{_CSS}</style></head><body>',
    ]
    for block in blocks:
        if isinstance(block, Heading):
            parts.append(f"<h{block.level}>{_inline_html(block.text)}</h{block.level}>")
        elif isinstance(block, Paragraph):
            parts.append(f"<p>{_inline_html(block.text)}</p>")
        elif isinstance(block, Table):
            rows = ["<tr>" + "".join(f"<th>{_inline_html(h)}</th>" for h in block.header) + "</tr>"]
            for row in block.rows:
                cells = "".join(
                    f'<td class="num">{_inline_html(c)}</td>'
                    if i in block.align_right
                    else f"<td>{_inline_html(c)}</td>"
                    for i, c in enumerate(row)
                )
                rows.append(f"<tr>{cells}</tr>")
            parts.append("<table>" + "".join(rows) + "</table>")
        elif isinstance(block, Image):
            parts.append(f'<img src="{html.escape(block.path)}" alt="{html.escape(block.alt)}">')
        elif isinstance(block, Preformatted):
            parts.append(f"<pre>{html.escape(block.text)}</pre>")
    parts.append("</body></html>")
    return "\n".join(parts) + "\n"


# --------------------------------------------------------------------------------------------------------
# Reading the stages' outputs.


@dataclass
class RunRecord:
    """One training run as the report needs it."""

    name: str
    metrics: list[dict[str, Any]]  # metrics.jsonl rows
    summary: dict[str, Any]  # summary.json: steps, tokens, seconds, source_counts
    extra_generation_seconds: float = 0.0  # generation done before the run (SeqKD's teacher answers)

    @property
    def evaluations(self) -> list[dict[str, Any]]:
        """The rows written at evaluations (they carry ``dev_loss``), in step order."""
        return [row for row in self.metrics if "dev_loss" in row]


def load_run(name: str, run_dir: str | Path) -> RunRecord:
    """The metrics and summary of the training run in ``run_dir``."""
    run_dir = Path(run_dir)
    summary_path, metrics_path = run_dir / "summary.json", run_dir / "metrics.jsonl"
    for path in (summary_path, metrics_path):
        if not path.is_file():
            raise UserError(f"{path} is missing: the run {name!r} did not finish; rerun it")
    rows = [
        json.loads(line) for line in metrics_path.read_text(encoding="utf-8").splitlines() if line.strip()
    ]
    return RunRecord(name, rows, json.loads(summary_path.read_text(encoding="utf-8")))


def read_predictions(eval_dir: str | Path, model: str, dataset: str, seed: int) -> list[dict[str, Any]]:
    """The rows of one prediction file written by ``distillm evaluate``."""
    path = Path(eval_dir) / "predictions" / model / dataset / f"seed{seed}.jsonl"
    if not path.is_file():
        raise UserError(f"{path} is missing; rerun the evaluation")
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]


# --------------------------------------------------------------------------------------------------------
# Sections.


def _fmt(value: float | None, digits: int = 2) -> str:
    return "-" if value is None else f"{value:.{digits}f}"


def rouge_table(
    evaluation: dict[str, Any], dataset: str, models: Sequence[str], reference: str | None
) -> Table:
    """One row per model: ROUGE-L and exact match, mean and std over seeds; the gap to ``reference``."""
    entries = evaluation["models"]
    base = entries[reference]["datasets"][dataset]["rougeL"]["mean"] if reference in entries else None
    header = ["model", "ROUGE-L mean", "ROUGE-L std", "exact match mean", "exact match std", "mean length"]
    if base is not None:
        header.append(f"vs {reference}")
    rows = []
    for model in models:
        stats = entries[model]["datasets"][dataset]
        row = [
            model,
            _fmt(stats["rougeL"]["mean"]),
            _fmt(stats["rougeL"]["std"]),
            _fmt(stats["exact_match"]["mean"]),
            _fmt(stats["exact_match"]["std"]),
            _fmt(stats["length"]["mean"], 1),
        ]
        if base is not None:
            row.append(f"{stats['rougeL']['mean'] - base:+.2f}")
        rows.append(row)
    return Table(header, rows, align_right=set(range(1, len(header))))


def group_scores(
    predictions_by_seed: Sequence[Sequence[dict[str, Any]]], groups: Sequence[str]
) -> dict[str, float]:
    """Mean ROUGE-L per group (say, a task family) over every seed's prediction rows.

    ``predictions_by_seed``: one list of prediction rows per seed, each in test-set order; ``groups``: the
    group of each test row, in the same order.
    """
    totals: dict[str, list[float]] = {}
    for rows in predictions_by_seed:
        if len(rows) != len(groups):
            raise ValueError(f"{len(rows)} prediction rows for {len(groups)} test rows")
        for row, group in zip(rows, groups):
            totals.setdefault(group, []).append(row["rougeL"])
    return {group: sum(values) / len(values) for group, values in totals.items()}


def group_table(scores: dict[str, dict[str, float]], models: Sequence[str]) -> Table:
    """One row per group, one column per model: mean ROUGE-L (``scores[model][group]``)."""
    groups = sorted({group for model in models for group in scores[model]})
    rows = [[group] + [_fmt(scores[model].get(group)) for model in models] for group in groups]
    return Table(["family", *models], rows, align_right=set(range(1, len(models) + 1)))


def paper_tables() -> list[Block]:
    main, losses = PAPER_GPT2_MAIN, PAPER_GPT2_LOSSES
    return [
        Paragraph(f"{main['setting']}:"),
        Table(["method", *main["columns"]], [["DistiLLM (paper)", *main["row"]]], set(range(1, 6))),
        Paragraph(f"{losses['setting']}:"),
        Table(["loss", *losses["columns"]], [[k, *v] for k, v in losses["rows"].items()], {1, 2}),
    ]


def budget_table(runs: Sequence[RunRecord]) -> Table:
    """Steps, supervised tokens and wall seconds per part of the step, per training run."""
    header = ["run", "steps", "tokens", "generation s", "teacher s", "student s", "evaluation s", "total s"]
    rows = []
    for run in runs:
        seconds = run.summary.get("seconds", {})
        parts = [seconds.get(k, 0.0) for k in ("generation", "teacher", "student", "evaluation")]
        parts[0] += run.extra_generation_seconds
        rows.append(
            [
                run.name,
                str(run.summary.get("steps", "-")),
                f"{run.summary.get('tokens', 0):,}",
                *(f"{p:.1f}" for p in parts),
                f"{sum(parts):.1f}",
            ]
        )
    return Table(header, rows, align_right=set(range(1, len(header))))


def training_seconds(run: RunRecord) -> dict[int, tuple[float, float, float]]:
    """Step -> cumulative (generation, teacher, student) wall seconds up to and including it, from step 0;
    empty unless every step has its metrics row (``train.log_every=1``)."""
    rows = sorted((r for r in run.metrics if "loss" in r), key=lambda r: r["step"])
    if [r["step"] for r in rows] != list(range(1, len(rows) + 1)):
        return {}
    totals, cumulative = [0.0, 0.0, 0.0], {0: (0.0, 0.0, 0.0)}
    for r in rows:
        for k, part in enumerate(("generation_s", "teacher_s", "student_s")):
            totals[k] += r.get(part, 0.0)
        cumulative[r["step"]] = (totals[0], totals[1], totals[2])
    return cumulative


def _trained_scores(run: RunRecord) -> list[dict[str, Any]]:
    """The run's evaluations with a dev ROUGE-L after at least one step: the step-0 evaluation of the
    starting student is a reference, not something the run reached (as for the best checkpoint)."""
    return [row for row in run.evaluations if row.get("dev_rougeL") is not None and row.get("step", 0) > 0]


def _first_reaching(run: RunRecord, target: float) -> dict[str, Any] | None:
    """The first trained evaluation with dev ROUGE-L >= ``target`` and the training seconds spent until then."""
    seconds = training_seconds(run)
    for row in _trained_scores(run):
        if row["dev_rougeL"] >= target and row["step"] in seconds:
            return {"step": row["step"], "seconds": seconds[row["step"]]}
    return None


def time_to_quality_table(runs: Sequence[RunRecord], reference: RunRecord, names: Sequence[str]) -> Table:
    """Training wall seconds (generation / teacher / student; evaluation excluded) for each run in ``names``
    to first reach ``reference``'s final dev ROUGE-L, and to reach its own best (both after step 0)."""
    evaluated = [r["dev_rougeL"] for r in reference.evaluations if "dev_rougeL" in r]
    target = evaluated[-1] if evaluated else None
    header = ["run", "reaches KD's final", "step", "seconds (gen / teacher / student)", "own best", "step",
              "seconds (gen / teacher / student)"]  # fmt: skip

    def cells(hit: dict[str, Any] | None) -> list[str]:
        if hit is None:
            return ["-", "-"]
        generation, teacher, student = hit["seconds"]
        return [
            str(hit["step"]),
            f"{generation + teacher + student:.1f} ({generation:.1f} / {teacher:.1f} / {student:.1f})",
        ]

    rows = []
    for run in runs:
        if run.name not in names:
            continue
        scores = [r["dev_rougeL"] for r in _trained_scores(run)]
        best = max(scores) if scores else None
        reach = _first_reaching(run, target) if target is not None else None
        own = _first_reaching(run, best) if best is not None else None
        rows.append([run.name, "yes" if reach else "no", *cells(reach), _fmt(best), *cells(own)])
    return Table(header, rows, align_right={2, 3, 4, 5, 6})


def source_table(runs: Sequence[RunRecord]) -> Table:
    """How many micro-batches came from the dataset, fresh student samples and the replay buffer."""
    header = ["run", "dataset", "fresh", "replay", "student-generated share", "final phi"]
    rows = []
    for run in runs:
        counts = run.summary.get("source_counts", {})
        total = sum(counts.values()) or 1
        generated = counts.get("fresh", 0) + counts.get("replay", 0)
        phis = [row["phi"] for row in run.evaluations if "phi" in row]
        rows.append(
            [
                run.name,
                str(counts.get("dataset", 0)),
                str(counts.get("fresh", 0)),
                str(counts.get("replay", 0)),
                f"{100 * generated / total:.0f}%",
                _fmt(phis[-1]) if phis else "-",
            ]
        )
    return Table(header, rows, align_right=set(range(1, len(header))))


def findings(
    evaluation: dict[str, Any], dataset: str, teacher: str, reference: str, methods: Sequence[str]
) -> list[str]:
    """Sentences read off the table: the teacher's lead, the ranking, and which gaps exceed the seed spread.

    A difference counts as beyond the seed-to-seed spread when it is larger than the sum of the two standard
    deviations over seeds (those measure sampling noise only, not the noise of training with another seed).
    """
    entries = {name: entry["datasets"][dataset]["rougeL"] for name, entry in evaluation["models"].items()}
    sentences = []
    if teacher in entries and reference in entries:
        gap = entries[teacher]["mean"] - entries[reference]["mean"]
        sentences.append(
            f"The teacher scores {entries[teacher]['mean']:.2f}, {gap:.2f} ROUGE-L points "
            f"{'above' if gap >= 0 else 'below'} the {reference} student ({entries[reference]['mean']:.2f})."
        )
    ranked = sorted((m for m in methods if m in entries), key=lambda m: -entries[m]["mean"])
    if ranked:
        sentences.append(
            "Students from best to worst: " + ", ".join(f"{m} {entries[m]['mean']:.2f}" for m in ranked) + "."
        )
    if reference in entries:
        base = entries[reference]
        above, below, within = [], [], []
        for method in ranked:
            if method == reference:
                continue
            diff = entries[method]["mean"] - base["mean"]
            spread = entries[method]["std"] + base["std"]
            (above if diff > spread else below if diff < -spread else within).append(
                f"{method} ({diff:+.2f})"
            )
        for names, verb in (
            (above, "beat"),
            (below, "fall behind"),
            (within, "are within the seed-to-seed spread of"),
        ):
            if names:
                sentences.append(f"{', '.join(names)} {verb} {reference} (spread: the sum of the two stds).")
    return sentences


def pyplot():
    """matplotlib's pyplot on the file-only Agg backend; a UserError saying what to install without it."""
    try:
        import matplotlib  # here: matplotlib is the optional `report` extra
    except ImportError as error:
        raise UserError(
            "the report's plot needs matplotlib, which is not installed: pip install 'distillm[report]'"
        ) from error
    matplotlib.use("Agg")  # no display: write files only
    import matplotlib.pyplot as plt  # after use(): pyplot picks its backend when first imported

    return plt


def plot_curves(runs: Sequence[RunRecord], path: str | Path) -> Path:
    """A PNG with two panels, dev loss and dev ROUGE-L against the optimizer step, one line per run."""
    plt = pyplot()
    figure, (loss_axis, rouge_axis) = plt.subplots(1, 2, figsize=(12, 4.5))
    for run in runs:
        rows = run.evaluations
        steps = [row["step"] for row in rows]
        (line,) = loss_axis.plot(steps, [row["dev_loss"] for row in rows], marker="o", ms=3, label=run.name)
        rouge = [(row["step"], row["dev_rougeL"]) for row in rows if "dev_rougeL" in row]
        if rouge:
            rouge_axis.plot(*zip(*rouge), marker="o", ms=3, label=run.name, color=line.get_color())
    loss_axis.set(
        title="dev loss (cross-entropy on ground truth)", xlabel="optimizer step", ylabel="nats/token"
    )
    rouge_axis.set(
        title="dev ROUGE-L (sampled, in-training subset)", xlabel="optimizer step", ylabel="ROUGE-L"
    )
    for axis in (loss_axis, rouge_axis):
        axis.grid(alpha=0.3)
    rouge_axis.legend(fontsize=8, loc="best")
    figure.tight_layout()
    image = io.BytesIO()
    figure.savefig(image, format="png", dpi=110)
    plt.close(figure)
    return atomic_write_bytes(path, image.getvalue())


def example_table(predictions: dict[str, list[dict[str, Any]]], indices: Sequence[int]) -> Table:
    """Rows ``indices`` of the test set: the instruction and input, the reference, each model's answer."""
    models = list(predictions)
    first = predictions[models[0]]
    header = ["prompt (instruction and input)", "reference", *models]
    rows = []
    for i in indices:
        rows.append(
            [
                _prompt_core(first[i]["prompt"]),
                first[i]["references"][0],
                *(predictions[m][i]["prediction"] for m in models),
            ]
        )
    return Table(header, rows)


def _prompt_core(prompt: str) -> str:
    """The instruction and input of an Alpaca-template prompt, without the template's fixed text."""
    user = "<|im_start|>user\n"  # a ChatML chat template's user turn (SmolLM2, Qwen)
    if user in prompt:
        return prompt.split(user, 1)[1].split("<|im_end|>", 1)[0].strip()
    core = instruction_and_input(prompt)
    return prompt.strip() if core is None else core


# --------------------------------------------------------------------------------------------------------
# The whole report.


@dataclass
class ReportInputs:
    """What :func:`write_report` needs; every part is a plain value so tests can build it by hand."""

    title: str
    evaluation: dict[str, Any]  # ``distillm evaluate``'s summary.json format, all models merged
    dataset: str  # the test set's name in ``evaluation``
    models: list[str]  # table order; the evaluation summary's model names
    reference: str | None  # the model the table's last column compares with (SFT)
    runs: list[RunRecord]  # training runs for the budget table and the plot (methods; teacher, init too)
    method_runs: list[str]  # the runs drawn in the plot and counted in the sources table
    predictions: dict[str, list[dict[str, Any]]]  # model -> one seed's prediction rows, same row order
    example_indices: list[int]
    setup: list[str]  # sentences describing the setting (machine, sizes, budgets, wall time)
    findings: list[str] = field(default_factory=list)  # sentences read off the numbers
    group_scores: dict[str, dict[str, float]] = field(default_factory=dict)  # model -> family -> ROUGE-L
    # Time to quality: the run whose final dev ROUGE-L is the target (KD) and the runs timed against it.
    quality_reference: str | None = None
    quality_runs: list[str] = field(default_factory=list)


def build_blocks(inputs: ReportInputs, plot_name: str) -> list[Block]:
    method_runs = [run for run in inputs.runs if run.name in inputs.method_runs]
    seeds = inputs.evaluation.get("settings", {}).get("seeds", [])
    rows = inputs.evaluation.get("datasets", {}).get(inputs.dataset, {}).get("rows")
    blocks: list[Block] = [Heading(inputs.title, 1)]
    blocks += [Paragraph(" ".join(inputs.setup))]
    blocks += [
        Heading("ROUGE-L on the test split"),
        Paragraph(
            f"Sampled responses (temperature 1) to the {rows} test prompts, scored with ROUGE-L against the "
            f"reference, mean and sample standard deviation over the seeds {', '.join(map(str, seeds))}."
        ),
        rouge_table(inputs.evaluation, inputs.dataset, inputs.models, inputs.reference),
    ]
    if inputs.findings:
        blocks += [Paragraph(" ".join(inputs.findings))]
    if inputs.group_scores:
        blocks += [
            Heading("ROUGE-L per task family", 3),
            Paragraph("Mean over the seeds and the family's test rows: where each model's points come from."),
            group_table(inputs.group_scores, inputs.models),
        ]
    blocks += [
        Heading("The paper's GPT-2 numbers, for orientation", 3),
        Paragraph(
            "Quoted from the DistiLLM paper (Ko et al., ICML 2024) as collected in the method reference; these "
            "are 1.5B -> 0.1B models on instruction data, not comparable in scale with this demo."
        ),
        *paper_tables(),
        Heading("Training curves"),
        Paragraph(
            "Dev loss (cross-entropy on the ground-truth responses) and in-training dev ROUGE-L of every method, "
            "all from the same initialised student."
        ),
        Image(plot_name, "dev loss and ROUGE-L over training"),
        Heading("Budget: steps, tokens and wall time"),
        Paragraph(
            "Per training run: optimizer steps, supervised tokens, and wall seconds spent generating (student "
            "samples, or nothing), in the teacher's forward, in the student's forward, backward and update, and "
            "in evaluation during training. SeqKD's teacher generation happens before its run and is listed "
            "separately below."
        ),
        budget_table(inputs.runs),
        *_time_to_quality_blocks(inputs),
        Heading("Where the training sequences came from"),
        Paragraph(
            "Micro-batches per source: the dataset, fresh student samples, or samples replayed from the buffer "
            "(DistiLLM's adaptive off-policy schedule; phi is its probability of student-generated outputs)."
            + (
                " MiniLLM trains only on its teacher-mixed rollouts: a step in a cycle's first PPO pass over them "
                "counts as fresh, a step of the later passes over the same rollouts as replayed."
                if any("cycles" in run.summary for run in method_runs)
                else ""
            )
        ),
        source_table(method_runs),
        Heading("Example answers"),
        Paragraph(f"One sampled answer per model (seed {seeds[0] if seeds else '?'}) to a few test prompts."),
        example_table(inputs.predictions, inputs.example_indices),
    ]
    return blocks


def _time_to_quality_blocks(inputs: ReportInputs) -> list[Block]:
    reference = next((r for r in inputs.runs if r.name == inputs.quality_reference), None)
    if reference is None or not inputs.quality_runs:
        return []
    return [
        Heading("Time to quality", 3),
        Paragraph(
            f"Training wall seconds (generation / teacher / student, evaluation excluded) until a run's in-training "
            f"dev ROUGE-L first reached {reference.name}'s final value, and until its own best: the paper's claim "
            "is that DistiLLM gets there up to 4.3x faster than MiniLLM and GKD. Dev ROUGE-L is measured only at "
            "the runs' few evaluations, on few dev rows with one sampling seed: a step is the first evaluation "
            "at or above the mark (the true crossing lies between it and the evaluation before), and the marks "
            "themselves carry the sampling noise of the dev ROUGE-L (a few points here). Seconds come from one "
            "run each on a shared machine."
        ),
        time_to_quality_table(inputs.runs, reference, inputs.quality_runs),
    ]


def write_report(inputs: ReportInputs, out_dir: str | Path) -> dict[str, Path]:
    """Write ``report.md``, ``report.html`` and ``curves.png`` into ``out_dir``; returns their paths."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    plot = plot_curves([run for run in inputs.runs if run.name in inputs.method_runs], out_dir / "curves.png")
    blocks = build_blocks(inputs, plot.name)
    paths = {"markdown": out_dir / "report.md", "html": out_dir / "report.html", "plot": plot}
    atomic_write_text(paths["markdown"], to_markdown(blocks))
    atomic_write_text(paths["html"], to_html(blocks, inputs.title))
    return paths
