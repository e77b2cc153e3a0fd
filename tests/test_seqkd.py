"""`distillm generate` writes the teacher's answers as training data, and SeqKD trains on them (not on the
ground truth, as the original did by mistake)."""

from __future__ import annotations

import json
from pathlib import Path

from distillm.cli import main
from distillm.config import load_config

CONFIGS = Path(__file__).resolve().parent.parent / "configs"


def _dolly_rows(path: Path, n: int) -> list[dict]:
    rows = [
        {
            "instruction": f"Repeat the word number {i}.",
            "context": "" if i % 2 else f"word {i}",
            "response": f"ground truth {i}",
            "category": "test",
        }
        for i in range(n)
    ]
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return rows


def test_generate_writes_the_teachers_text_as_the_output_field(tiny_teacher_dir, tmp_path):
    data = tmp_path / "train.jsonl"
    rows = _dolly_rows(data, 6)
    out = tmp_path / "teacher.jsonl"
    assert (
        main(
            [
                "generate",
                "--model",
                str(tiny_teacher_dir),
                "--data",
                str(data),
                "--out",
                str(out),
                "--seed",
                "1",
                "generation.max_new_tokens=6",
                "generation.batch_size=4",
            ]
        )
        == 0
    )
    written = [json.loads(line) for line in out.read_text().splitlines()]
    assert len(written) == len(rows)
    for row, original in zip(written, rows):
        assert row["instruction"] == original["instruction"]
        assert row["input"] == original["context"]
        assert row["reference"] == original["response"]
        assert row["output"] != original["response"], "the output must be the teacher's, not the ground truth"


def test_generate_is_reproducible_for_a_seed(tiny_teacher_dir, tmp_path):
    data = tmp_path / "train.jsonl"
    _dolly_rows(data, 4)
    outputs = []
    for name, seed in (("a", 3), ("b", 3), ("c", 4)):
        out = tmp_path / f"{name}.jsonl"
        main(
            [
                "generate",
                "--model",
                str(tiny_teacher_dir),
                "--data",
                str(data),
                "--out",
                str(out),
                "--seed",
                str(seed),
                "generation.max_new_tokens=8",
            ]
        )
        outputs.append([json.loads(line)["output"] for line in out.read_text().splitlines()])
    assert outputs[0] == outputs[1]
    assert outputs[0] != outputs[2]


def test_generate_refuses_settings_outside_the_generation_section(tiny_teacher_dir, tmp_path, capsys):
    data = tmp_path / "train.jsonl"
    _dolly_rows(data, 2)
    code = main(
        [
            "generate",
            "--model",
            str(tiny_teacher_dir),
            "--data",
            str(data),
            "--out",
            str(tmp_path / "o"),
            "train.lr=1",
        ]
    )
    assert code == 2 and "only generation.KEY=VALUE" in capsys.readouterr().err
    assert not (tmp_path / "o").exists()


def test_seqkd_preset_trains_on_the_generated_responses(tiny_teacher_dir, tiny_student_dir, tmp_path):
    from distillm.models import load_tokenizer
    from distillm.train import load_data, train

    data = tmp_path / "train.jsonl"
    _dolly_rows(data, 8)
    generated = tmp_path / "teacher.jsonl"
    main(
        [
            "generate",
            "--model",
            str(tiny_teacher_dir),
            "--data",
            str(data),
            "--out",
            str(generated),
            "generation.max_new_tokens=6",
        ]
    )
    teacher_text = {json.loads(line)["output"] for line in generated.read_text().splitlines()}
    config = load_config(
        CONFIGS / "tiny" / "seqkd.yaml",
        [
            f"model.student={tiny_student_dir}",
            f"data.train={generated}",
            "data.dev=null",
            "data.dev_size=2",
            f"data.cache_dir={tmp_path / 'cache'}",
            f"train.output_dir={tmp_path / 'run'}",
            "train.max_steps=2",
            "train.batch_size=2",
            "train.eval_rouge=false",
            "train.select_by=dev_loss",
            "train.progress=false",
        ],
    )
    trained_on = load_data(config, load_tokenizer(str(tiny_student_dir)), tmp_path / "cache")
    responses = {example.response for example in trained_on.train.examples + trained_on.dev_examples}
    assert responses <= teacher_text and not any(r.startswith("ground truth") for r in responses)
    assert train(config).steps == 2


def test_dev_rows_taken_from_a_generated_file_are_scored_against_the_ground_truth(
    tiny_tokenizer_dir, tmp_path
):
    from transformers import AutoTokenizer

    from distillm.train import load_data

    # What `distillm generate` writes: the teacher's text as `output`, the dataset's response as `reference`.
    rows = [
        {
            "instruction": f"Say {i}.",
            "input": "",
            "output": f"teacher text {i}",
            "reference": f"ground truth {i}",
        }
        for i in range(12)
    ]
    data = tmp_path / "teacher.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in rows))
    config = load_config(
        None,
        [
            f"data.train={data}",
            "data.dev=null",
            "data.dev_size=4",
            "train.batch_size=2",
            "data.format=alpaca",
        ],
    )
    tokenizer = AutoTokenizer.from_pretrained(str(tiny_tokenizer_dir))
    loaded = load_data(config, tokenizer, tmp_path / "cache")
    # The dev split: ROUGE-L references and the dev loss's targets are the ground truth...
    assert [e.references for e in loaded.dev_examples] == [(f"ground truth {i}",) for i in range(4)]
    eos = [tokenizer.eos_token_id]
    for i in range(4):
        _, response_ids = loaded.dev[i]
        assert response_ids == tokenizer.encode(f"ground truth {i}", add_special_tokens=False) + eos
    # ...while training keeps the teacher's text (SeqKD's definition).
    _, response_ids = loaded.train[0]
    assert response_ids == tokenizer.encode("teacher text 4", add_special_tokens=False) + eos
