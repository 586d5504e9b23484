"""`rustforge pipeline` (train/pipeline.py, train/agent_data.py): lang_rust -> core_agent -> ipo -> grpo from one
config, each stage starting from the previous stage's adapter, the agent data made once before the stages that
need it, qat + export from grpo's adapter, the eval row before/after, the efficacy table printed and saved, and
a rerun that skips finished stages, data steps and evaluations while an unfinished one resumes.

Mining and replaying tasks need cargo in the sandbox and real trajectories are ~2K tokens (test_tasks.py and
test_trajectories.py cover them): here `agent_data.mine` and `agent_data.build` are replaced by stubs that
record their calls and write short templated conversations and pairs through the same writers. For the same
reason grpo's environment is the cargo-free format reward (HarmonyFormatEnvironment) on templated prompts and
the harness' `evaluate` (test_eval*.py cover it) is a stub that records the model and writes a report.
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
from rustforge.eval import harness
from rustforge.rollout.environments import HarmonyFormatEnvironment, Prompt
from rustforge.train import agent_data, grpo, pipeline, sft

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


def format_environment(cfg, stage_cfg, tokenizer) -> HarmonyFormatEnvironment:
    """grpo's environment in the tests: templated task prompts, the format reward (no cargo)."""
    rng = random.Random(0)
    prompts = {split: [Prompt(f"{split}{i}", H.render_prompt(_prompt(rng), tokenizer), ["cargo_test"]) for i in range(n)]
               for split, n in (("train", 4), ("val", 2))}  # fmt: skip
    return HarmonyFormatEnvironment(prompts, tokenizer, cfg.rewards)


class FakeEvaluate:
    """Stands in for harness.evaluate: records the model evaluated, writes a report whose numbers name it."""

    OVERALL = {"lang_rust": {"pass@1": 0.0, "compile_rate": 0.25}, "grpo": {"pass@1": 0.5, "compile_rate": 0.75}}

    def __init__(self):
        self.models: list[str] = []

    def __call__(self, cfg, model, eval_cfg=None, progress=True, out=None) -> harness.EvalReport:
        self.models.append(Path(model).name)
        overall = {"problems": 2, "samples": 4, "correct": 1, **self.OVERALL[Path(model).name]}
        report = harness.EvalReport(eval_cfg.suite, eval_cfg.mode, str(model), 2, [1], overall, [], [])
        report.write(out)
        return report


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
        "grpo": {"lr": 1.0e-3, "warmup_steps": 0, "phases": [{"seq_len": 448, "steps": 2}], "eval_every": 2,
                 "save_every": 1, "prompts_per_step": 2, "num_generations": 4, "max_prompt_length": 384,
                 "max_completion_length": 8, "log_kl": False, "val_prompts": 2},
        "rollout": {"max_batch": 8},
        "qat": {**small, "phases": [{"seq_len": 128, "steps": 2}], "eval_every": 2, "save_every": 2},
        "eval": {"k": 2, "limit": 2, "pass_at": [1]},
    })  # fmt: skip
    fake = FakeAgentData()
    monkeypatch.setattr(agent_data, "mine", fake.mine)
    monkeypatch.setattr(agent_data, "build", fake.build)
    monkeypatch.setattr(grpo, "build_environment", format_environment)
    monkeypatch.setattr(harness, "evaluate", FakeEvaluate())
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

    # core_agent, ipo and grpo started from the previous stage's adapter; data made once, before the stage needing it
    assert starts == [run_dir / "lang_rust" / "adapter", run_dir / "core_agent" / "adapter", run_dir / "ipo" / "adapter"]
    assert fake.calls == ["mine", "trajectories.train", "trajectories.val", "pairs.train", "pairs.val"]
    assert all((run_dir / s / "adapter" / "adapter_config.json").is_file() for s in pipeline.STAGES)
    assert all(pipeline.stage_complete(run_cfg, s) for s in pipeline.STAGES)
    # the table: each stage's own metric before and after, printed and saved
    assert [(r["stage"], r["metric"].split()[0]) for r in rows] == [
        ("lang_rust", "held-out"), ("core_agent", "held-out"), ("core_agent", "Harmony"),
        ("core_agent", "valid"), ("ipo", "held-out"), ("ipo", "held-out"), ("grpo", "held-out"), ("grpo", "held-out"),
        ("grpo", "Harmony"), ("qat", "held-out"), ("qat", "held-out"), ("eval", "pass@1,"), ("eval", "compile"),
    ]  # fmt: skip
    # the eval row: the lang_rust model before the agent stages, grpo's after, each report saved for the rerun
    assert harness.evaluate.models == ["lang_rust", "grpo"]
    assert [(r["before"], r["after"], r["steps"]) for r in rows[-2:]] == [(0.0, 0.5, 4), (0.25, 0.75, 4)]
    assert all(pipeline.eval_out(run_cfg, label).is_file() for label in pipeline.EVAL_MODELS)
    # grpo trained on the environment's prompts: its held-out episodes logged at step 0 and the end
    assert grpo.summary(run_dir / "grpo")["steps"] == 2
    # qat ran from grpo's adapter and its result was exported in the gpt-oss layout
    assert json.loads((run_dir / "qat" / "final" / "qat.json").read_text())["source_adapter"] == str(run_dir / "grpo" / "adapter")
    export_config = json.loads((run_dir / "export" / run_cfg.qat.format / "config.json").read_text())
    assert export_config["quantization_config"]["quant_method"] == "mxfp4"
    assert json.loads((run_dir / pipeline.EFFICACY_FILE).read_text())["rows"] == rows
    printed = capsys.readouterr().out
    assert pipeline.format_efficacy(rows) in printed
    trained = [r for r in rows if r["stage"] != "eval" and "tool-call" not in r["metric"]]
    assert all(r["steps"] == 2 and r["before"] is not None for r in trained)

    # a rerun: every stage complete -> nothing trains, no data step repeats, the same table
    def must_not_train(*args, **kwargs):
        raise AssertionError("a finished stage was run again")

    for stage in (*pipeline.STAGES, "qat"):
        monkeypatch.setattr(f"rustforge.train.{stage}.run", must_not_train)
    monkeypatch.setattr("rustforge.export.hf.export_run", must_not_train)
    monkeypatch.setattr(harness, "evaluate", must_not_train)
    assert pipeline.run_pipeline(run_cfg, progress=False) == rows
    printed = capsys.readouterr().out
    assert fake.calls[5:] == [] and "grpo: complete, skipped" in printed and "exists, skipped" in printed


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

    def spy_resume(self) -> bool:
        resumed = real_resume(self)  # False: no checkpoint (grpo's first start)
        resumed_from.extend([self.stage_dir.name] if resumed else [])
        return resumed

    monkeypatch.setattr(sft.SFTTrainer, "_resume", spy_resume)
    rows = pipeline.run_pipeline(run_cfg, progress=False)
    assert fake.calls[calls_before:] == ["pairs.val"]
    assert resumed_from == ["ipo"]  # lang_rust and core_agent were skipped, not resumed; grpo started afresh
    train = read_metrics(run_dir / "ipo" / "logs" / "metrics.jsonl", "train")
    assert sorted(train) == [1, 2] and pipeline.stage_complete(run_cfg, "ipo")
    assert [r["stage"] for r in rows][-9:] == ["ipo", "ipo", "grpo", "grpo", "grpo", "qat", "qat", "eval", "eval"]


def test_an_unfinished_grpo_stops_the_pipeline_before_qat_and_eval(tmp_path, monkeypatch, capsys):
    """grpo stopped early (its last checkpoint short of its curriculum): its row is kept, qat, the export and
    the evaluations wait for the rerun. The stages are stubs: only the pipeline's control flow runs."""
    from rustforge.train import core_agent, ipo, lang_rust, qat

    def must_not_run(*args, **kwargs):
        raise AssertionError("ran after an unfinished grpo")

    cfg = from_dict(RunConfig, {"run_dir": str(tmp_path)})
    monkeypatch.setattr(pipeline, "stage_complete", lambda cfg, stage: stage != "grpo")
    for module in (lang_rust, core_agent, ipo):
        monkeypatch.setattr(module, "summary", lambda stage_dir: {"steps": 1})
    monkeypatch.setattr(agent_data, "mine", FakeAgentData().mine)
    monkeypatch.setattr(grpo, "run", lambda cfg, **kw: {"steps": 1, "reward_start": 0.1, "reward_end": 0.2})
    for target in (qat, "run"), (harness, "evaluate"):
        monkeypatch.setattr(*target, must_not_run)
    monkeypatch.setattr("rustforge.export.hf.export_run", must_not_run)
    rows = pipeline.run_pipeline(cfg, progress=False)
    assert [(r["stage"], r["before"], r["after"]) for r in rows] == [("grpo", 0.1, 0.2)]
    assert "grpo: stopped before the end of its curriculum" in capsys.readouterr().out
    assert json.loads((tmp_path / pipeline.EFFICACY_FILE).read_text())["rows"] == rows


def test_grpo_mines_the_run_tasks_once_unless_it_names_its_own(tmp_path, monkeypatch):
    fake = FakeAgentData()
    monkeypatch.setattr(agent_data, "mine", fake.mine)
    cfg = from_dict(RunConfig, {"run_dir": str(tmp_path / "run")})
    agent_data.ensure_tasks(cfg, progress=False)
    agent_data.ensure_tasks(cfg, progress=False)
    assert fake.calls == ["mine"] and agent_data.finished_steps(cfg.run_dir)["tasks"] == {"tasks_total": 12}
    own = from_dict(RunConfig, {"run_dir": str(tmp_path / "own"), "grpo": {"tasks_dir": str(tmp_path / "tasks")}})
    agent_data.ensure_tasks(own, progress=False)
    assert fake.calls == ["mine"]


def test_qat_and_export_auto_take_the_last_stage_with_an_adapter(tmp_path):
    from rustforge.export.hf import stage_adapter

    with pytest.raises(FileNotFoundError, match="no finished stage adapter"):
        stage_adapter(tmp_path)
    for stage in ("lang_rust", "grpo"):
        (tmp_path / stage / "adapter").mkdir(parents=True)
        (tmp_path / stage / "adapter" / "adapter_config.json").write_text("{}")
    assert stage_adapter(tmp_path) == tmp_path / "grpo" / "adapter"

def test_stage_without_data_of_its_own_explains_what_to_run(tmp_path):
    with pytest.raises(FileNotFoundError, match=r"core_agent\.trajectories is empty.*rustforge pipeline"):
        agent_data.run_files(tmp_path, "trajectories")
    train = agent_data.data_file(tmp_path, "pairs", "train")
    train.parent.mkdir(parents=True)
    train.write_text("{}\n")
    agent_data.data_file(tmp_path, "pairs", "val").write_text("")  # the val crates gave no pair
    assert agent_data.run_files(tmp_path, "pairs") == ([str(train)], [])
