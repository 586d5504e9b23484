"""`rustforge pipeline` (train/pipeline.py, train/agent_data.py): lang_rust -> core_agent -> ipo from one config,
each stage starting from the previous stage's adapter, the agent data made once before the stages that need
it, the efficacy table printed and saved, and a rerun that skips finished stages and data steps while an
unfinished one resumes.

Mining and replaying tasks need cargo in the sandbox and real trajectories are ~2K tokens (test_tasks.py and
test_trajectories.py cover them): here `agent_data.mine` and `agent_data.build` are replaced by stubs that
record their calls and write short templated conversations and pairs through the same writers.
"""

from __future__ import annotations

import json
import random
import shutil
from pathlib import Path

import pytest

from rustforge.config import RunConfig, from_dict
from rustforge.data import harmony as H
from rustforge.rust.trajectories import PreferencePair, write_pairs, write_trajectories
from rustforge.train import agent_data, pipeline, sft

TOOLS = [{"name": "cargo_test", "description": "Run cargo test.", "parameters": {"type": "object", "properties": {}}}]


def _prompt(rng: random.Random) -> list[H.Message]:
    return [
        H.system_message(reasoning_effort="low", model_identity=None, knowledge_cutoff=None),
        H.developer_message("Fix the Rust crate.", TOOLS),
        H.Message("user", f"`f{rng.randint(0, 99)}` returns the wrong value. Fix it."),
    ]


def _conversation(rng: random.Random) -> H.Conversation:
    return H.Conversation(_prompt(rng) + [
        H.Message("assistant", "Run the tests.", channel="analysis"),
        H.tool_call_message("cargo_test", {}),
        H.tool_result_message("cargo_test", "test tests::works ... FAILED"),
        H.Message("assistant", "Fixed it.", channel="final"),
    ])  # fmt: skip


def _pair(rng: random.Random, index: int) -> PreferencePair:
    chosen = [H.Message("assistant", "The operator is wrong.", channel="final")]
    rejected = [H.Message("assistant", "The test is wrong.", channel="final")]
    return PreferencePair(f"task{index}", H.Conversation(_prompt(rng)), chosen, rejected)


class FakeAgentData:
    """Stands in for mining and replaying: records calls, writes templated data where build() would."""

    def __init__(self):
        self.calls: list[str] = []

    def mine(self, cfg, sandbox, progress=True) -> dict:
        self.calls.append("mine")
        return {"tasks_total": 12}

    def build(self, cfg, kind, split, sandbox, progress=True) -> dict:
        self.calls.append(f"{kind}.{split}")
        rng, count = random.Random(f"{kind}{split}"), 8 if split == "train" else 3
        out = agent_data.data_file(cfg.run_dir, kind, split)
        if kind == "trajectories":
            write_trajectories(out, [_conversation(rng) for _ in range(count)])
        else:
            write_pairs(out, [_pair(rng, i) for i in range(count)])
        return {"written": count, "skipped": 0, "file": str(out)}


@pytest.fixture
def run_cfg(tiny_base, tmp_path, monkeypatch) -> tuple[RunConfig, FakeAgentData]:
    cfg_dict, root = tiny_base
    shutil.copytree(root / "run" / "base", tmp_path / "run" / "base")
    small = {"warmup_steps": 1, "batch_size": 1, "eval_batches": 1, "lr": 5.0e-3}
    cfg = from_dict(RunConfig, {
        **cfg_dict,
        "run_dir": str(tmp_path / "run"),
        "expert_monitor": {"every_steps": 0},
        "lang_rust": {**small, "phases": [{"seq_len": 128, "steps": 2}], "eval_every": 2, "save_every": 2},
        "core_agent": {**small, "phases": [{"seq_len": 512, "steps": 2}], "eval_every": 2, "save_every": 1,
                       "sample_prompts": 2, "sample_max_new_tokens": 6},
        "ipo": {**small, "phases": [{"seq_len": 640, "steps": 2}], "eval_every": 2, "save_every": 1,
                "max_length": 320, "max_prompt_length": 240, "beta": 0.5},
        "qat": {**small, "phases": [{"seq_len": 128, "steps": 2}], "eval_every": 2, "save_every": 2},
    })  # fmt: skip
    fake = FakeAgentData()
    monkeypatch.setattr(agent_data, "mine", fake.mine)
    monkeypatch.setattr(agent_data, "build", fake.build)
    return cfg, fake


def test_pipeline_chains_the_stages_and_a_rerun_skips_what_is_done(run_cfg, monkeypatch, capsys):
    run_cfg, fake = run_cfg
    run_dir = Path(run_cfg.run_dir)
    starts = []
    real_initial_adapter = sft.initial_adapter

    def spy_initial_adapter(*args):
        starts.append(real_initial_adapter(*args))
        return starts[-1]

    monkeypatch.setattr(sft, "initial_adapter", spy_initial_adapter)
    rows = pipeline.run_pipeline(run_cfg, progress=False)

    # core_agent and ipo started from the previous stage's adapter; data made once, before the stage needing it
    assert starts == [run_dir / "lang_rust" / "adapter", run_dir / "core_agent" / "adapter"]
    assert fake.calls == ["mine", "trajectories.train", "trajectories.val", "pairs.train", "pairs.val"]
    assert all((run_dir / s / "adapter" / "adapter_config.json").is_file() for s in pipeline.STAGES)
    assert all(pipeline.stage_complete(run_cfg, s) for s in pipeline.STAGES)
    # the table: each stage's own metric before and after, printed and saved
    assert [(r["stage"], r["metric"].split()[0]) for r in rows] == [
        ("lang_rust", "held-out"), ("core_agent", "held-out"), ("core_agent", "Harmony"),
        ("core_agent", "valid"), ("ipo", "held-out"), ("ipo", "held-out"), ("qat", "held-out"), ("qat", "held-out"),
    ]  # fmt: skip
    # qat ran from ipo's adapter and its result was exported in the gpt-oss layout
    assert (run_dir / "qat" / "final").is_dir()
    export_config = json.loads((run_dir / "export" / run_cfg.qat.format / "config.json").read_text())
    assert export_config["quantization_config"]["quant_method"] == "mxfp4"
    assert json.loads((run_dir / pipeline.EFFICACY_FILE).read_text())["rows"] == rows
    printed = capsys.readouterr().out
    assert pipeline.format_efficacy(rows) in printed
    assert all(r["steps"] == 2 and r["before"] is not None for r in rows if "tool-call" not in r["metric"])

    # a rerun: every stage complete -> nothing trains, no data step repeats, the same table
    def must_not_train(*args, **kwargs):
        raise AssertionError("a finished stage was run again")

    for stage in (*pipeline.STAGES, "qat"):
        monkeypatch.setattr(f"rustforge.train.{stage}.run", must_not_train)
    monkeypatch.setattr("rustforge.export.hf.export_run", must_not_train)
    assert pipeline.run_pipeline(run_cfg, progress=False) == rows
    assert fake.calls[5:] == [] and "complete, skipped" in capsys.readouterr().out


def test_an_unfinished_stage_and_data_step_resume(run_cfg, monkeypatch):
    """A pipeline killed inside ipo (its last checkpoint at step 1 of 2, pairs.val not yet built): the
    rerun builds only the missing data step and resumes ipo from step 1 -- it does not start over."""
    from rustforge.train import ipo
    from rustforge.train.metrics import read_metrics

    run_cfg, fake = run_cfg
    run_dir = Path(run_cfg.run_dir)
    real_ipo_run = ipo.run
    monkeypatch.setattr(ipo, "run", lambda cfg, **kw: real_ipo_run(cfg, **{**kw, "stop_after": 1}))
    pipeline.run_pipeline(run_cfg, progress=False)
    assert not pipeline.stage_complete(run_cfg, "ipo") and pipeline.stage_complete(run_cfg, "core_agent")
    assert not (run_dir / "qat").exists()  # an unfinished stage stops the pipeline there
    steps = agent_data.finished_steps(run_dir)
    del steps["pairs.val"]
    (run_dir / "agent_data" / "steps.json").write_text(json.dumps(steps))
    calls_before = len(fake.calls)

    monkeypatch.setattr(ipo, "run", real_ipo_run)
    resumed_from = []
    real_resume = sft.SFTTrainer._resume
    monkeypatch.setattr(sft.SFTTrainer, "_resume", lambda self: resumed_from.append(self.stage_dir.name) or real_resume(self))
    rows = pipeline.run_pipeline(run_cfg, progress=False)
    assert fake.calls[calls_before:] == ["pairs.val"]
    assert resumed_from == ["ipo"]  # lang_rust and core_agent were skipped, not resumed
    train = read_metrics(run_dir / "ipo" / "logs" / "metrics.jsonl", "train")
    assert sorted(train) == [1, 2] and pipeline.stage_complete(run_cfg, "ipo")
    assert [r["stage"] for r in rows][-4:] == ["ipo", "ipo", "qat", "qat"]


def test_stage_without_data_of_its_own_explains_what_to_run(tmp_path):
    with pytest.raises(FileNotFoundError, match=r"core_agent\.trajectories is empty.*rustforge pipeline"):
        agent_data.run_files(tmp_path, "trajectories")
    train = agent_data.data_file(tmp_path, "pairs", "train")
    train.parent.mkdir(parents=True)
    train.write_text("{}\n")
    agent_data.data_file(tmp_path, "pairs", "val").write_text("")  # the val crates gave no pair
    assert agent_data.run_files(tmp_path, "pairs") == ([str(train)], [])
