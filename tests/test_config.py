"""Typed config loading: every shipped config loads, and bad input names the file and the field."""

from __future__ import annotations

from pathlib import Path

import pytest

from rustforge.config import ConfigError, RunConfig, load_config
from rustforge.model.gptoss import resolve_dtype
from rustforge.config import ModelConfig

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.parametrize("name", sorted(p.name for p in (ROOT / "configs").glob("*.yaml")))
def test_shipped_configs_load(name):
    cfg = load_config(ROOT / "configs" / name)
    assert isinstance(cfg, RunConfig)
    assert 0.005 <= cfg.model.router_aux_loss_coef <= 0.01
    assert all(p.seq_len > 0 and p.steps > 0 for p in cfg.lang_rust.phases)


def test_h100_curriculum_is_the_seed_schedule():
    cfg = load_config(ROOT / "configs" / "gpt-oss-20b-h100.yaml")
    assert [(p.seq_len, p.steps) for p in cfg.lang_rust.phases] == [
        (4096, 1000), (8192, 2000), (16384, 3500), (32768, 5000), (65536, 7000)
    ]


def test_default_router_aux_loss_coef_suits_fine_tuning():
    assert RunConfig().model.router_aux_loss_coef == 0.01


def _write(tmp_path, text: str) -> Path:
    p = tmp_path / "bad.yaml"
    p.write_text(text)
    return p


def test_wrong_type_names_file_and_field(tmp_path):
    p = _write(tmp_path, "lang_rust:\n  phases:\n    - {seq_len: 128, steps: 10}\n    - {seq_len: long, steps: 5}\n")
    with pytest.raises(ConfigError) as e:
        load_config(p)
    assert str(p) in str(e.value) and "lang_rust.phases[1].seq_len" in str(e.value)


def test_unknown_field_names_it(tmp_path):
    p = _write(tmp_path, "lora:\n  rank: 8\n")
    with pytest.raises(ConfigError, match=r"lora.*unknown field.*rank"):
        load_config(p)


def test_missing_required_phase_field(tmp_path):
    p = _write(tmp_path, "lang_rust:\n  phases:\n    - {seq_len: 128}\n")
    with pytest.raises(ConfigError, match=r"lang_rust.phases\[0\].*steps"):
        load_config(p)


def test_overrides_apply_and_are_checked(tmp_path):
    p = _write(tmp_path, "run_dir: x\n")
    assert load_config(p, ["lora.r=4", "model.expert_format=mxfp4"]).lora.r == 4
    with pytest.raises(ConfigError, match="lora.r"):
        load_config(p, ["lora.r=four"])


def test_float16_is_refused():
    with pytest.raises(ValueError, match="float16"):
        resolve_dtype(ModelConfig(dtype="float16"), __import__("torch").device("cpu"))


def test_missing_file_and_bad_yaml(tmp_path):
    with pytest.raises(ConfigError, match="not found"):
        load_config(tmp_path / "nope.yaml")
    with pytest.raises(ConfigError, match="not valid YAML"):
        load_config(_write(tmp_path, "a: [1, 2\n"))


# ------------------------------------------------------------------------------ core_agent and ipo
def test_stage_sections_default_and_load(tmp_path):
    from rustforge.config import CoreAgentConfig, IpoConfig

    cfg = RunConfig()
    assert isinstance(cfg.core_agent, CoreAgentConfig) and isinstance(cfg.ipo, IpoConfig)
    assert cfg.core_agent.trajectories == [] and cfg.ipo.pairs == []  # = the run's own agent data
    p = _write(
        tmp_path,
        "core_agent:\n  phases: [{seq_len: 256, steps: 3}]\n  train_channels: [final]\n"
        "ipo:\n  phases: [{seq_len: 1024, steps: 2}]\n  max_length: 512\n  max_prompt_length: 400\n  average_logprobs: null\n",
    )
    cfg = load_config(p)
    assert cfg.core_agent.phases[0].steps == 3 and cfg.core_agent.train_channels == ["final"]
    assert cfg.ipo.max_length == 512 and cfg.ipo.averages  # null: as TRL, mean for loss_type ipo


@pytest.mark.parametrize(
    "text, field",
    [
        ("core_agent:\n  long_conversations: split\n", r"core_agent: .*long_conversations"),
        ("core_agent:\n  train_channels: [thinking]\n", r"core_agent: .*train_channels"),
        ("core_agent:\n  sample_prompts: many\n", r"core_agent\.sample_prompts"),
        ("core_agent:\n  sample_batch_size: 0\n", r"core_agent: .*sample_batch_size"),
        ("core_agent:\n  trajectory: [a.jsonl]\n", r"core_agent: unknown field.*trajectory"),
        ("ipo:\n  loss_type: kto\n", r"ipo: .*loss_type"),
        ("ipo:\n  reference: policy\n", r"ipo: .*reference"),
        ("ipo:\n  beta: 0\n", r"ipo: .*beta"),
        ("ipo:\n  betta: 0.1\n", r"ipo: unknown field.*betta"),
        ("ipo:\n  phases: [{seq_len: 1000, steps: 1}]\n", r"ipo: .*2 \* max_length"),
        ("ipo:\n  phases: [{seq_len: big, steps: 1}]\n", r"ipo\.phases\[0\]\.seq_len"),
    ],
)
def test_stage_section_errors_name_file_and_field(tmp_path, text, field):
    p = _write(tmp_path, text)
    with pytest.raises(ConfigError, match=field) as e:
        load_config(p)
    assert str(p) in str(e.value)


def test_tiny_config_sizes_the_agent_stages_for_a_cpu():
    """The README's main command runs these on 2 CPU cores: a few minutes per stage, a small task set."""
    cfg = load_config(ROOT / "configs" / "tiny.yaml")
    for stage in (cfg.core_agent, cfg.ipo):
        tokens = sum(p.steps * p.seq_len for p in stage.phases) * stage.batch_size * stage.grad_accum
        assert tokens <= 200_000 and stage.init_from == "previous"
    assert not (cfg.core_agent.trajectories or cfg.ipo.pairs)  # the run's own agent data
    assert cfg.tasks.max_crates is not None and cfg.tasks.time_budget_s <= 600
