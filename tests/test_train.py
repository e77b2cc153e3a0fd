"""The training loop on tiny models: every method trains, accumulation invariance, exact resume, failures."""

from __future__ import annotations

import copy
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from distillm.config import load_config
from distillm.errors import UserError
from numerics import assert_as_accurate_as

CONFIGS = Path(__file__).resolve().parent.parent / "configs"
METHODS = ["sft", "kd", "seqkd", "imitkd", "gkd", "distillm"]


def tiny_overrides(task_data, student, teacher, out, **extra) -> list[str]:
    values = {
        "model.student": student,
        "model.teacher": teacher,
        "data.train": task_data / "train.jsonl",
        "data.dev": task_data / "dev.jsonl",
        "data.max_length": 96,
        "data.max_prompt_length": 64,
        "data.cache_dir": out.parent / "cache",
        "train.output_dir": out,
        "train.max_steps": 4,
        "train.batch_size": 4,
        "train.lr": 3e-3,
        "train.warmup_steps": 0,
        "train.eval_every": 2,
        "train.save_every": 2,
        "train.eval_rouge_rows": 4,
        "train.log_every": 1,
        "train.progress": False,
        "generation.max_new_tokens": 8,
        "generation.batch_size": 4,
        "seed": 3,
    }
    values.update(extra)
    return [f"{k}={v}" for k, v in values.items()]


def read_metrics(run: Path) -> list[dict]:
    return [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]


def fixed_batch_objective(config, model_dir) -> float:
    """The method's own objective on the first 8 training rows, for the model saved in ``model_dir``."""
    from distillm.data import collate
    from distillm.models import load_causal_lm, load_tokenizer, shared_vocab_size
    from distillm.objective import StudentObjective, teacher_forward
    from distillm.train import load_data

    tokenizer = load_tokenizer(str(model_dir))
    student = load_causal_lm(str(model_dir)).eval()
    data = load_data(config, tokenizer, Path(config.data.cache_dir))
    batch = collate([data.train[i] for i in range(8)], tokenizer.pad_token_id)
    teacher_out, vocab = None, student.get_output_embeddings().weight.shape[0]
    if config.objective.kd_ratio > 0:
        teacher = load_causal_lm(config.model.teacher).eval()
        vocab = shared_vocab_size(student, teacher, tokenizer)
        teacher_out = teacher_forward(teacher, batch, vocab, chunked=False)
    objective = StudentObjective(student, config.objective, vocab)
    with torch.no_grad():
        return objective(batch, (batch["labels"] != -100).sum(), teacher_out).total.item()


@pytest.mark.parametrize("method", METHODS)
def test_each_method_preset_trains_and_lowers_its_objective_on_a_fixed_batch(
    method, task_data, quiet_pair, tmp_path
):
    from distillm.train import train

    out = tmp_path / method
    overrides = tiny_overrides(
        task_data, quiet_pair["student"], quiet_pair["teacher"], out, **{"train.max_steps": 8}
    )
    config = load_config(
        CONFIGS / "tiny" / f"{method}.yaml",
        overrides + ["train.eval_rouge=false", "train.select_by=dev_loss"],
    )
    before = fixed_batch_objective(config, quiet_pair["student"])
    result = train(config)
    after = fixed_batch_objective(config, out / "last")
    assert result.steps == 8
    assert after < before, f"{method}: objective {before:.4f} -> {after:.4f}"
    summary = json.loads((out / "summary.json").read_text())
    assert sum(summary["source_counts"].values()) == 8
    if method == "imitkd":
        assert summary["source_counts"] == {"fresh": 8}, "ImitKD trains on student samples every step"


def test_batch_4_by_1_and_2_by_2_give_the_same_loss_and_gradient_norm(task_data, quiet_pair, tmp_path):
    from distillm.train import train

    runs = {}
    for name, batch, accum in (("a", 4, 1), ("b", 2, 2)):
        out = tmp_path / name
        overrides = tiny_overrides(
            task_data,
            quiet_pair["student"],
            quiet_pair["teacher"],
            out,
            **{"train.batch_size": batch, "train.grad_accum": accum, "train.max_steps": 3},
        )
        config = load_config(
            None, overrides + ["objective.divergence=skew_reverse_kl", "objective.kd_ratio=0.5"]
        )
        train(config)
        runs[name] = [r for r in read_metrics(out) if "loss" in r]
    for a, b in zip(runs["a"], runs["b"]):
        assert a["tokens"] == b["tokens"]
        assert a["loss"] == pytest.approx(b["loss"], rel=1e-5)
        assert a["grad_norm"] == pytest.approx(b["grad_norm"], rel=1e-4)


def test_last_and_best_checkpoints_load_through_from_pretrained(
    task_data, tiny_student_dir, tiny_teacher_dir, tmp_path
):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from distillm.cli import main

    out = tmp_path / "run"
    code = main(["train", *tiny_overrides(task_data, tiny_student_dir, tiny_teacher_dir, out)])
    assert code == 0
    for folder in ("last", "best"):
        model = AutoModelForCausalLM.from_pretrained(str(out / folder))
        AutoTokenizer.from_pretrained(str(out / folder))
        assert any(p.suffix == ".safetensors" for p in (out / folder).iterdir())
        assert model.config.n_embd == 32
    assert json.loads((out / "best" / "distillm.json").read_text())["step"] in (2, 4)


def test_cli_overrides_reach_the_run(task_data, tiny_student_dir, tiny_teacher_dir, tmp_path):
    from distillm.cli import main

    out = tmp_path / "run"
    assert (
        main(
            [
                "train",
                "--config",
                str(CONFIGS / "tiny" / "sft.yaml"),
                *tiny_overrides(task_data, tiny_student_dir, tiny_teacher_dir, out, **{"train.max_steps": 3}),
            ]
        )
        == 0
    )
    saved = load_config(out / "config.yaml")
    assert saved.train.max_steps == 3 and saved.seed == 3
    assert [r["step"] for r in read_metrics(out) if "loss" in r] == [1, 2, 3]


def _final_weights(folder: Path) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    return load_file(str(folder / "model.safetensors"))


RESUMABLE = {
    # KD with the pretraining LM term: its cursor in the corpus (which wraps around every 10 steps) is resumed
    # too.
    "kd-pretrain": [
        "objective.divergence=skew_forward_kl",
        "objective.kd_ratio=0.7",
        "objective.lm_coef=0.5",
    ],
    # phi > 0 from the start and a small buffer: the checkpoint holds a non-empty buffer, and later steps
    # draw fresh samples and replays from it.
    "distillm": [
        "objective.divergence=skew_reverse_kl",
        "objective.kd_ratio=1.0",
        "sources.kind=adaptive",
        "sources.init_threshold=0.6",
        "sources.capacity=6",
        "generation.max_new_tokens=6",
    ],
}


@pytest.fixture(scope="module")
def pretrain_folder(tmp_path_factory, task_data, tiny_tokenizer):
    """A corpus prepared by ``pack_corpus``: 40 chunks of 16 tokens from the task suite's responses."""
    from distillm.data import pack_corpus
    from distillm.data.corpus import TextCorpus

    folder = tmp_path_factory.mktemp("pretrain")
    rows = [json.loads(line) for line in (task_data / "train.jsonl").read_text().splitlines()]
    (folder / "corpus.txt").write_text("".join(f"{row['instruction']} {row['response']}\n" for row in rows))
    pack_corpus(TextCorpus([folder / "corpus.txt"]), tiny_tokenizer, folder / "prepared", 16, max_chunks=40)
    return folder / "prepared"


@pytest.mark.parametrize("method", sorted(RESUMABLE))
def test_a_run_killed_mid_way_resumes_to_the_same_weights(
    method, task_data, tiny_student_dir, tiny_teacher_dir, tmp_path, request
):
    """SIGKILL a real training process after its first checkpoint, restart it: same final weights, bit for bit.

    The student has dropout on, so this also checks that every RNG state is restored; with DistiLLM's
    sources, that the replay buffer, phi and the coin are; with the LM term, the position in its corpus."""
    from distillm.checkpoint import list_checkpoints, load_trainer_state

    steps = 30
    base = {
        "train.max_steps": steps,
        "train.save_every": 5,
        "train.eval_every": 10,
        "train.keep_checkpoints": 10,
    }
    if method == "kd-pretrain":
        base["data.pretrain"] = request.getfixturevalue("pretrain_folder")

    def command(out, resume=False):
        overrides = tiny_overrides(task_data, tiny_student_dir, tiny_teacher_dir, out, **base)
        flags = ["--resume"] if resume else []
        return [sys.executable, "-m", "distillm", "train", *flags, *overrides, *RESUMABLE[method]]

    env = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"}
    reference = tmp_path / "reference"
    subprocess.run(command(reference), check=True, env=env, capture_output=True)

    killed = tmp_path / "killed"
    process = subprocess.Popen(command(killed), env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    # Wait for its first complete checkpoint for as long as the run lives: a fixed deadline expired on a loaded
    # machine before step 5 was reached (the run finishing first is caught below).
    while process.poll() is None and not list_checkpoints(killed):
        time.sleep(0.002)
    process.send_signal(signal.SIGKILL)
    process.wait()
    assert not (killed / "last").exists(), "the run finished before it could be killed"
    saved = list_checkpoints(killed)
    assert saved, "no checkpoint was written before the kill"
    if method == "distillm":
        state = load_trainer_state(saved[-1])["processes"][0]["sources"]
        assert state["phi"] > 0 and len(state["buffer"]["samples"]) > 0
    if method == "kd-pretrain":
        assert load_trainer_state(saved[-1])["train"]["pretrain"][1] > 0  # killed inside the corpus

    resumed = subprocess.run(command(killed, resume=True), env=env, capture_output=True, text=True)
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    expected, got = _final_weights(reference / "last"), _final_weights(killed / "last")
    assert expected.keys() == got.keys()
    for name in expected:
        assert torch.equal(expected[name], got[name]), name
    reference_rows = [r for r in read_metrics(reference) if "loss" in r]
    resumed_rows = [r for r in read_metrics(killed) if "loss" in r]
    assert [r["step"] for r in resumed_rows] == list(range(1, steps + 1))
    assert [r["loss"] for r in resumed_rows] == [r["loss"] for r in reference_rows]
    assert [r["sources"] for r in resumed_rows] == [r["sources"] for r in reference_rows]
    if method == "distillm":
        used = {source for r in reference_rows for source in r["sources"].split(",")}
        assert {"fresh", "replay"} <= used


def test_pretrain_chunks_longer_than_the_students_positions_are_refused(tiny_student_dir):
    from distillm.models import load_causal_lm
    from distillm.train import check_pretrain_positions

    student = load_causal_lm(str(tiny_student_dir))
    positions = student.config.n_positions
    check_pretrain_positions(student, positions + 1, "corpus")  # inputs are C - 1 tokens: this fits
    with pytest.raises(
        UserError, match=rf"inputs of {positions + 1}, more than the student's {positions} positions"
    ):
        check_pretrain_positions(student, positions + 2, "corpus")


def test_resume_without_a_checkpoint_is_refused(task_data, tiny_student_dir, tmp_path, capsys):
    from distillm.cli import main

    out = tmp_path / "empty"
    assert main(["train", "--resume", *tiny_overrides(task_data, tiny_student_dir, "null", out)]) == 2
    assert "no checkpoint" in capsys.readouterr().err


def test_a_teacher_with_another_tokenizer_is_refused(task_data, tiny_student_dir, tmp_path):
    from distillm.models import build_small_model
    from distillm.tokenizer import train_bpe_tokenizer
    from distillm.train import train

    other = tmp_path / "other-teacher"
    tokenizer = train_bpe_tokenizer(["completely different words here"] * 50, vocab_size=300, out_dir=other)
    build_small_model("gpt2", len(tokenizer), eos_token_id=tokenizer.eos_token_id).save_pretrained(str(other))
    config = load_config(
        None,
        tiny_overrides(task_data, tiny_student_dir, other, tmp_path / "run")
        + ["objective.divergence=forward_kl", "objective.kd_ratio=1"],
    )
    with pytest.raises(UserError, match="tokenizer.*differs"):
        train(config)


def test_padded_vocabularies_of_one_tokenizer_are_reconciled(
    task_data, tiny_student_dir, tiny_tokenizer_dir, tmp_path, caplog
):
    from transformers import AutoTokenizer

    from distillm.models import build_small_model
    from distillm.train import train

    tokenizer = AutoTokenizer.from_pretrained(str(tiny_tokenizer_dir))
    padded = tmp_path / "padded-teacher"
    build_small_model("gpt2", len(tokenizer) + 64, eos_token_id=tokenizer.eos_token_id).save_pretrained(
        str(padded)
    )
    tokenizer.save_pretrained(str(padded))
    config = load_config(
        None,
        tiny_overrides(task_data, tiny_student_dir, padded, tmp_path / "run", **{"train.max_steps": 1})
        + ["objective.divergence=forward_kl", "objective.kd_ratio=1"],
    )
    with caplog.at_level("INFO"):
        train(config)
    assert f"comparing the first {len(tokenizer)}" in caplog.text


def test_a_missing_model_path_says_which(task_data, tiny_student_dir, tmp_path):
    from distillm.train import train

    config = load_config(
        None,
        tiny_overrides(task_data, tiny_student_dir, tmp_path / "no-such-teacher", tmp_path / "r")
        + ["objective.divergence=forward_kl", "objective.kd_ratio=1"],
    )
    with pytest.raises(UserError, match="teacher path .*no-such-teacher.* does not exist"):
        train(config)


def test_a_non_finite_loss_stops_with_the_step_and_keeps_the_last_checkpoint(
    task_data, tiny_student_dir, tmp_path
):
    from distillm.train import NonFiniteLossError, train

    out = tmp_path / "nan"
    config = load_config(
        None,
        tiny_overrides(
            task_data,
            tiny_student_dir,
            "null",
            out,
            **{
                "train.max_steps": 6,
                "train.save_every": 1,
                "train.lr": 1e12,
                "train.clip_grad": 0,
                "train.scheduler": "constant",
                "train.eval_every": 100,
            },
        ),
    )
    with pytest.raises(NonFiniteLossError, match=r"at optimizer step (\d+)") as error:
        train(config)
    failed_step = int(error.value.args[0].split("optimizer step ")[1].split(";")[0])
    from distillm.checkpoint import latest_checkpoint

    last = latest_checkpoint(out)
    assert last is not None and last.name == f"step-{failed_step - 1:07d}"


def test_report_to_tensorboard_writes_event_files(task_data, tiny_student_dir, tmp_path):
    pytest.importorskip("tensorboard")
    from distillm.train import train

    out = tmp_path / "tb"
    train(
        load_config(
            None,
            tiny_overrides(task_data, tiny_student_dir, "null", out, **{"train.max_steps": 2})
            + ["train.report_to=[tensorboard]"],
        )
    )
    events = list(out.rglob("events.out.tfevents.*"))
    assert events, "no TensorBoard event file was written"
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    accumulator = EventAccumulator(str(events[0].parent))
    accumulator.Reload()
    assert "loss" in accumulator.Tags()["scalars"]
    assert [e.step for e in accumulator.Scalars("loss")] == [1, 2]


def test_dev_loss_is_the_token_mean_cross_entropy_over_the_whole_dev_set(tiny_student_dir, tiny_tokenizer):
    import torch.nn.functional as F
    from accelerate import Accelerator
    from transformers import AutoModelForCausalLM

    from distillm.data import collate
    from distillm.evaluate import dev_loss

    model = AutoModelForCausalLM.from_pretrained(str(tiny_student_dir)).eval()
    encode = lambda text: tiny_tokenizer.encode(text, add_special_tokens=False)  # noqa: E731
    eos = tiny_tokenizer.eos_token_id
    rows = [(encode(f"count to {i}"), encode(" one two three"[: 4 + 3 * i]) + [eos]) for i in range(5)]
    got = dev_loss(
        model, rows, collate, tiny_tokenizer.pad_token_id, 2, Accelerator(cpu=True), len(tiny_tokenizer)
    )
    batch = collate(rows, tiny_tokenizer.pad_token_id)  # one batch: the reference pools every token at once
    expected, exact = (
        F.cross_entropy(
            m(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits.flatten(0, 1),
            batch["labels"].flatten(),
            ignore_index=-100,
        ).detach()
        for m in (model, copy.deepcopy(model).double())
    )
    # Batches of 2 against one batch of 5: other kernel shapes, so both are measured against float64.
    assert_as_accurate_as(torch.tensor(got, dtype=torch.float32), expected, exact)


def test_size_groups_cut_in_order_once_a_group_reaches_the_limit():
    from distillm.distributed import size_groups

    assert size_groups([3, 3, 3, 10, 1], size=lambda x: x, limit=6) == [[3, 3], [3, 10], [1]]
    assert size_groups([7, 1], size=lambda x: x, limit=6) == [[7], [1]]  # one item may exceed it alone
    assert size_groups([], size=lambda x: x, limit=6) == []
    assert size_groups(["ab", "c"], size=len, limit=100) == [["ab", "c"]]


def test_phase_timings_wait_for_cuda_and_leave_the_cpu_alone(monkeypatch):
    """CUDA kernels run asynchronously: the loop's teacher_s/student_s are only true after a sync there."""
    from distillm.train import synchronize

    waited: list[torch.device] = []
    monkeypatch.setattr(torch.cuda, "synchronize", lambda device=None: waited.append(device))
    synchronize(torch.device("cpu"))
    assert waited == []
    synchronize(torch.device("cuda", 0))
    assert waited == [torch.device("cuda", 0)]
