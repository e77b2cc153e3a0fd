"""The configuration schema: presets, overrides, validation errors and generated help."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import pytest
import yaml

from distillm.config import (
    Config,
    ConfigError,
    MiniLLMConfig,
    describe_fields,
    format_help,
    load_config,
    parse_overrides,
    replace,
    save_config,
    to_dict,
)

CONFIGS = Path(__file__).resolve().parent.parent / "configs"
BASES = sorted((CONFIGS / "base").glob("*.yaml"))  # parts of presets (their `base:`), not runnable alone
PRESETS = sorted(p for p in CONFIGS.rglob("*.yaml") if "accelerate" not in p.parts and p not in BASES)


def test_defaults_validate():
    assert Config().validate() == Config()


@pytest.mark.parametrize("preset", PRESETS, ids=[str(p.relative_to(CONFIGS)) for p in PRESETS])
def test_every_preset_loads_and_validates(preset):
    config = load_config(preset)
    assert config.model.student, "every preset names a student"
    header = preset.read_text().splitlines()
    assert any(
        f"distillm train --config configs/{preset.relative_to(CONFIGS)}" in line for line in header[:12]
    )


def test_presets_cover_every_method_of_the_tiny_pair():
    names = {p.stem for p in (CONFIGS / "tiny").glob("*.yaml")}
    assert {"teacher", "init", "sft", "kd", "seqkd", "imitkd", "gkd", "distillm"} <= names


def test_yaml_round_trip_gives_the_same_config(tmp_path):
    config = load_config(None, ["train.lr=3e-4", "model.lora.target_modules=[q_proj, v_proj]", "seed=3"])
    save_config(config, tmp_path / "c.yaml")
    assert load_config(tmp_path / "c.yaml") == config
    assert config.model.lora.target_modules == ("q_proj", "v_proj")


def test_overrides_are_parsed_as_yaml_scalars():
    assert parse_overrides(["a.b=1e-4", "c=true", "d=null", "e=text", "f=[1, 2]"]) == [
        ("a.b", 1e-4),
        ("c", True),
        ("d", None),
        ("e", "text"),
        ("f", [1, 2]),
    ]


def test_overrides_win_over_the_preset(tmp_path):
    preset = tmp_path / "p.yaml"
    preset.write_text(yaml.safe_dump({"train": {"lr": 1e-3, "batch_size": 4}, "seed": 1}))
    config = load_config(preset, ["train.lr=2e-5"])
    assert config.train.lr == 2e-5 and config.train.batch_size == 4 and config.seed == 1


def test_unknown_key_names_the_key_and_suggests_the_closest(tmp_path):
    with pytest.raises(
        ConfigError, match=r"unknown config key 'train.max_step'.*did you mean 'train.max_steps'"
    ):
        load_config(None, ["train.max_step=3"])
    preset = tmp_path / "bad.yaml"
    preset.write_text("objective:\n  kd_raito: 0.5\n")
    with pytest.raises(ConfigError, match=r"bad.yaml.*objective.kd_raito.*kd_ratio"):
        load_config(preset)


@pytest.mark.parametrize(
    "override, message",
    [
        ("objective.kd_ratio=1.5", r"objective.kd_ratio=1.5 is invalid: must be in \[0, 1\]"),
        ("objective.skew_alpha=0", r"objective.skew_alpha=0.0 is invalid"),
        ("train.batch_size=0", r"train.batch_size=0 is invalid"),
        ("train.batch_size=2.5", r"train.batch_size=2.5 is invalid: expected an integer"),
        ("train.scheduler=linear", r"train.scheduler='linear' is invalid: must be one of"),
        ("objective.divergence=kl", r"objective.divergence='kl' is invalid: must be one of"),
        ("train.eval_rouge=yes please", r"expected true or false"),
        ("data.max_prompt_length=600", r"data.max_prompt_length=600 is invalid"),
    ],
)
def test_invalid_values_name_the_key_and_the_value(override, message):
    with pytest.raises(ConfigError, match=message):
        load_config(None, ["model.student=s", override])


def test_combinations_are_checked():
    with pytest.raises(ConfigError, match="model.teacher"):
        load_config(None, ["model.student=s", "objective.divergence=forward_kl", "objective.kd_ratio=1"])
    with pytest.raises(ConfigError, match="data.pretrain"):
        load_config(None, ["model.student=s", "objective.lm_coef=1"])
    with pytest.raises(ConfigError, match="needs train.eval_rouge=true"):
        load_config(None, ["train.select_by=rougeL"])


def test_section_cannot_be_set_as_a_value():
    with pytest.raises(ConfigError, match="'seed' is a value"):
        load_config(None, ["seed.x=1"])


def test_malformed_yaml_and_non_mapping_files_name_the_file(tmp_path):
    bad = tmp_path / "broken.yaml"
    bad.write_text("train: [unclosed\n")
    with pytest.raises(ConfigError, match="broken.yaml"):
        load_config(bad)
    listed = tmp_path / "list.yaml"
    listed.write_text("- a\n- b\n")
    with pytest.raises(ConfigError, match="list.yaml.*mapping"):
        load_config(listed)
    with pytest.raises(ConfigError, match="does not exist"):
        load_config(tmp_path / "missing.yaml")


def test_replace_returns_a_modified_copy():
    config = Config()
    changed = replace(config, **{"train.lr": 1e-5})
    assert changed.train.lr == 1e-5 and config.train.lr == Config().train.lr


def test_help_lists_every_leaf_field_with_its_documentation():
    rows = describe_fields()
    keys = {key for key, *_ in rows}
    flat = to_dict(Config())

    def leaves(tree, prefix=""):
        for k, v in tree.items():
            if isinstance(v, dict):
                yield from leaves(v, f"{prefix}{k}.")
            else:
                yield f"{prefix}{k}"

    assert keys == set(leaves(flat))
    assert all(text for *_, text in rows), "every field documents itself"
    text = format_help()
    assert "objective.skew_alpha=0.1" in text and "alpha of the skew divergences" in text


def test_train_help_comes_from_the_field_docs(capsys):
    from distillm.cli import main

    with pytest.raises(SystemExit) as exit_info:
        main(["train", "--help"])
    assert exit_info.value.code == 0
    out = capsys.readouterr().out
    assert "sources.replay_ratio" in out and "share of phi spent on fresh generation" in out


def test_the_removed_num_workers_key_is_gone_from_the_schema_and_ignored_with_a_warning(tmp_path, caplog):
    from distillm.config import DataConfig

    assert "num_workers" not in {f.name for f in dataclasses.fields(DataConfig)}  # nothing reads it
    preset = tmp_path / "old.yaml"
    preset.write_text("data:\n  num_workers: 4\n  max_length: 64\n  max_prompt_length: 32\n")
    with caplog.at_level("WARNING", logger="distillm.config"):
        config = load_config(preset, ["data.num_workers=2"])
    assert config.data.max_length == 64
    assert caplog.text.count("'data.num_workers' is ignored") == 2


def test_minillm_defaults_are_the_original_scripts_values_and_validate():
    config = MiniLLMConfig()
    config.validate("minillm")
    # shared/reference/minillm-method.md, section 10: the values every released script passes.
    assert (config.teacher_mix_alpha, config.num_rollouts, config.ppo_epochs) == (0.2, 256, 4)
    assert (config.reward_scaling, config.cliprange_reward, config.gamma, config.cliprange) == (
        0.5,
        100.0,
        0.95,
        0.2,
    )
    assert (config.single_step_reg, config.lm_coef, config.pt_kd_ratio) == (True, 1.0, 0.5)
    assert all(f.metadata.get("help") for f in dataclasses.fields(MiniLLMConfig))


@pytest.mark.parametrize(
    ("field", "value"),
    [
        ("teacher_mix_alpha", 1.5),
        ("ppo_epochs", 0),
        ("reward_scaling", 0.0),
        ("gamma", -0.1),
        ("cliprange", 1.0),
        ("pt_kd_ratio", 2.0),
    ],
)
def test_minillm_invalid_values_name_the_field_and_the_value(field, value):
    with pytest.raises(ConfigError, match=rf"minillm\.{field}={value!r}"):
        dataclasses.replace(MiniLLMConfig(), **{field: value}).validate("minillm")
