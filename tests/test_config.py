"""The configuration schema: presets, overrides, validation errors and generated help."""

from __future__ import annotations

import dataclasses
import re
from pathlib import Path

import pytest
import yaml

from distillm.config import (
    Config,
    ConfigError,
    DataConfig,
    MiniLLMConfig,
    ObjectiveConfig,
    describe_fields,
    format_help,
    load_config,
    parse_overrides,
    replace,
    save_config,
    to_dict,
)
from distillm.data.formats import FORMATS
from distillm.losses import DIVERGENCES, HYPER_PARAMETERS

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


# ---- the divergence registry's hyper-parameters and the formats' help ----------------------------------------


def test_every_divergence_hyper_parameter_is_an_objective_field_with_its_default_and_help():
    fields = {f.name: f for f in dataclasses.fields(ObjectiveConfig)}
    for key, parameter in HYPER_PARAMETERS.items():
        assert fields[key].default == parameter.default and fields[key].metadata["help"] == parameter.help
    assert ObjectiveConfig().hyper_parameters() == {k: p.default for k, p in HYPER_PARAMETERS.items()}
    divergence_help = fields["divergence"].metadata["help"]
    assert all(name in divergence_help for name in DIVERGENCES)


@pytest.mark.parametrize("key", sorted(HYPER_PARAMETERS))
def test_an_out_of_range_hyper_parameter_is_rejected_naming_the_field_and_the_range(key):
    parameter = HYPER_PARAMETERS[key]
    for outside in (parameter.low - 1.0, parameter.high + 1.0):
        message = rf"objective\.{key}={outside!r} is invalid: must be in {re.escape(parameter.interval)}"
        with pytest.raises(ConfigError, match=message):
            load_config(None, ["model.student=s", f"objective.{key}={outside}"])


def test_the_data_format_help_names_every_format():
    help_text = {f.name: f for f in dataclasses.fields(DataConfig)}["format"].metadata["help"]
    assert all(name in help_text for name in ("auto", *FORMATS))


# ---- presets over bases --------------------------------------------------------------------------------------


def write(path: Path, text: str) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)
    return path


def test_a_preset_overrides_its_base_key_by_key_and_a_base_may_have_a_base(tmp_path):
    write(tmp_path / "base" / "root.yaml", "seed: 3\ntrain:\n  lr: 0.1\n  epochs: 4\n  report_to: [wandb]\n")
    write(
        tmp_path / "base" / "family.yaml",
        "base: root.yaml\nmodel:\n  student: s\ntrain:\n  epochs: 5\n  batch_size: 2\n",
    )
    preset = write(
        tmp_path / "pair" / "run.yaml",
        "base: ../base/family.yaml\ntrain:\n  lr: 0.2\n  report_to: []\ndata:\n  dev: null\n",
    )
    config = load_config(preset, ["train.batch_size=3"])
    assert (config.seed, config.model.student) == (3, "s")  # from the bases
    assert (config.train.lr, config.train.epochs, config.train.batch_size) == (0.2, 5, 3)
    assert config.train.report_to == ()  # a list replaces, it does not merge
    assert config.data.dev is None


def test_a_cycle_of_bases_is_an_error_naming_the_files(tmp_path):
    write(tmp_path / "a.yaml", "base: b.yaml\nseed: 1\n")
    write(tmp_path / "b.yaml", "base: a.yaml\n")
    with pytest.raises(ConfigError, match=r"cycle \(.*a\.yaml -> .*b\.yaml -> .*a\.yaml\)"):
        load_config(tmp_path / "a.yaml")


def test_a_missing_base_is_an_error_naming_the_preset_and_the_base(tmp_path):
    preset = write(tmp_path / "p.yaml", "base: nowhere/base.yaml\n")
    with pytest.raises(ConfigError, match=r"p\.yaml: its base .*nowhere/base\.yaml does not exist"):
        load_config(preset)
    write(tmp_path / "q.yaml", "base: [a.yaml]\n")
    with pytest.raises(ConfigError, match=r"q\.yaml: base=\['a\.yaml'\] is invalid"):
        load_config(tmp_path / "q.yaml")


def test_a_bad_key_or_value_in_a_base_names_the_base(tmp_path):
    write(tmp_path / "base.yaml", "objective:\n  kd_ratio: 2.0\ntrain:\n  batch_siz: 2\n")
    preset = write(tmp_path / "p.yaml", "base: base.yaml\nmodel:\n  student: s\n")
    with pytest.raises(
        ConfigError, match=r"base\.yaml \(a base of .*p\.yaml\): unknown config key 'train\.batch_siz'"
    ):
        load_config(preset)
    write(tmp_path / "base.yaml", "objective:\n  kd_ratio: 2.0\n")
    with pytest.raises(
        ConfigError, match=r"base\.yaml \(a base of .*p\.yaml\): objective\.kd_ratio=2\.0 is invalid"
    ):
        load_config(preset)
    # the same key set again by the preset or on the command line is theirs
    with pytest.raises(ConfigError, match=r"^\S*p\.yaml: objective\.kd_ratio=3\.0"):
        load_config(preset, ["objective.kd_ratio=3.0"])


def _bases_of(path: Path) -> list[Path]:
    tree = yaml.safe_load(path.read_text()) or {}
    if "base" not in tree:
        return []
    base = (path.parent / tree["base"]).resolve()
    return [base, *_bases_of(base)]


def test_every_base_is_used_by_a_preset_and_holds_only_known_keys():
    assert {base.resolve() for base in BASES} == {base for preset in PRESETS for base in _bases_of(preset)}
    for base in BASES:
        load_config(base, validate=False)  # an unknown key or a wrong type raises


def test_print_config_prints_the_resolved_configuration_and_exits(capsys):
    from distillm.cli import main

    preset = CONFIGS / "gpt2" / "kd-base.yaml"
    assert main(["train", "--config", str(preset), "--print-config", "train.lr=0.001"]) == 0
    printed = yaml.safe_load(capsys.readouterr().out)
    assert printed == to_dict(load_config(preset, ["train.lr=0.001"]))
    assert printed["data"]["dev_size"] == 1000 and printed["train"]["lr"] == 0.001  # base, override
    assert main(["train", "--config", str(preset), "--print-config", "train.lr=-1"]) == 2  # still validated
