"""`rustforge pipeline`: every training stage in order from one config, each resumable, then the efficacy table.

lang_rust -> core_agent -> ipo -> grpo, then qat (the last adapter merged, trained through fake-quantised
experts) and the export of its result in `qat.format` to <run_dir>/export/<format>, then the eval row. Each
stage starts from the previous stage's adapter (`init_from: previous`).
Before core_agent and ipo, the run's agent data is made when their config names none (train/agent_data.py:
mine a task set, replay it into trajectories and pairs; finished steps are skipped); grpo's episodes are the
run's mined tasks (grpo.tasks_dir empty = tasks.out_dir), mined first if that step is not done. A stage whose adapter is
written and whose last checkpoint is the end of its curriculum is skipped, its before/after read back from
its logs; an unfinished one resumes from its latest checkpoint -- so rerunning a killed pipeline continues
where it stopped. `fresh` trains every stage from step 0 (the agent data, a cache, is kept).

The efficacy table has, per stage, the stage's own metric before and after it (`EFFICACY_METRICS`: a later
stage adds its entry there); it is printed and written to <run_dir>/efficacy.json for the report and README.
Its last rows ("eval") come from the evaluation harness (eval/harness.py, the `eval` section: by default
single-shot on the val split of the run's mined tasks, crates no stage trained on): pass@1 and compile rate of
the model before the agent stages (lang_rust's adapter) and after the last one (grpo's); their "steps" column
is the number of samples per model. Each evaluation's JSON is written to <run_dir>/eval/ and a rerun reads
it back instead of evaluating again.

Under `torchrun --nproc-per-node N` every training stage (qat included) runs on all ranks under FSDP2
(train/distributed.py); the agent data and task mining, the export and the evaluation run on rank 0 alone
while the others wait (`DistContext.on_main`), and rank 0 prints and writes the table.
"""

from __future__ import annotations

import importlib
import json
import math
from pathlib import Path

from rustforge.config import RunConfig

STAGES = ("lang_rust", "core_agent", "ipo", "grpo")
AGENT_DATA_BEFORE = {"core_agent": "trajectories", "ipo": "pairs"}  # stage -> the agent data it trains on
TASKS_BEFORE = ("grpo",)  # stages whose episodes are the run's mined tasks (when grpo.tasks_dir is empty)
# the eval row: (the model's stage dir in the run, its JSON under <run_dir>/eval/) before and after the agent stages
EVAL_MODELS = {"before": "lang_rust", "after": "grpo"}
EVAL_METRICS = [("pass@1", "pass@1"), ("compile rate", "compile_rate")]  # (printed, key of the report's overall)
EFFICACY_FILE = "efficacy.json"
# stage -> (metric as printed, key of the stage summary's <key>_start / <key>_end)
EFFICACY_METRICS = {
    "lang_rust": [("held-out Rust loss (nats/token)", "val_loss")],
    "core_agent": [
        ("held-out loss on assistant tokens", "val_loss"),
        ("Harmony compliance of sampled turns", "harmony_compliance"),
        ("valid tool-call rate", "valid_tool_call_rate"),
    ],
    "ipo": [("held-out preference accuracy", "accuracy"), ("held-out margin (target 1/(2 beta))", "margin")],
    # held-out episodes (greedy) at step 0 and at the end
    "grpo": [("held-out mean reward", "reward"), ("held-out pass rate (all tests pass)", "pass_rate"),
             ("Harmony compliance of episodes", "compliance_rate")],
    # before = PTQ (the merged model quantised as is), after = QAT; lang_rust's held-out set
    "qat": [("held-out loss, quantised (PTQ->QAT)", "val_loss_quantised"),
            ("held-out loss, the same unquantised", "val_loss_bf16")],
}


def stage_complete(cfg: RunConfig, stage: str) -> bool:
    """The stage's adapter is written and its latest checkpoint is the last step of its curriculum."""
    from rustforge.train.checkpoint import latest_checkpoint

    stage_dir = Path(cfg.run_dir) / stage
    if not (stage_dir / "adapter" / "adapter_config.json").is_file():
        return False
    latest = latest_checkpoint(stage_dir / "checkpoints")
    total = sum(phase.steps for phase in getattr(cfg, stage).phases)
    return latest is not None and int(latest.name.removeprefix("step-")) == total  # step-000180


def run_pipeline(cfg: RunConfig, fresh: bool = False, progress: bool = True) -> list[dict]:
    """Run STAGES in order (see the module docstring); returns the efficacy rows, also printed and saved
    (under torchrun: rank 0's rows; the other ranks' lack the eval rows, which rank 0 alone computes)."""
    from rustforge.train import distributed

    dist = distributed.current()
    rows: list[dict] = []
    for stage in STAGES:
        module = importlib.import_module(f"rustforge.train.{stage}")
        if not fresh and stage_complete(cfg, stage):
            _say(f"{stage}: complete, skipped")
            result = module.summary(Path(cfg.run_dir) / stage)
        else:
            dist.on_main(prepare_data, cfg, stage, progress)  # the other ranks wait for rank 0's files
            result = module.run(cfg, resume=not fresh, progress=progress)
        rows += efficacy_rows(stage, result)
        _save_rows(cfg, rows)  # after each stage: a partial table too
        if not stage_complete(cfg, stage):  # stopped early (e.g. a routing-collapse alarm): later stages wait
            _say(f"{stage}: stopped before the end of its curriculum; rerun the pipeline to resume it")
            _say(format_efficacy(rows))
            return rows
    rows += quantise_and_export(cfg, fresh, progress)
    _save_rows(cfg, rows)
    rows += dist.on_main(evaluation_rows, cfg, fresh, progress) or []
    _save_rows(cfg, rows)
    _say(format_efficacy(rows))
    return rows


def prepare_data(cfg: RunConfig, stage: str, progress: bool = True) -> None:
    """What `stage` trains on when its config names nothing of its own: the run's agent data, mined tasks."""
    from rustforge.train.agent_data import ensure_agent_data, ensure_tasks

    if stage in AGENT_DATA_BEFORE:
        ensure_agent_data(cfg, AGENT_DATA_BEFORE[stage], progress=progress)
    if stage in TASKS_BEFORE:
        ensure_tasks(cfg, progress=progress)  # grpo trains on the run's mined tasks


def _say(text: str) -> None:
    """print on rank 0 only (every rank runs the pipeline under torchrun)."""
    from rustforge.train import distributed

    if distributed.current().is_main:
        print(text)


def _save_rows(cfg: RunConfig, rows: list[dict]) -> None:
    from rustforge.train import distributed
    from rustforge.train.checkpoint import write_json

    if distributed.current().is_main:
        write_json(Path(cfg.run_dir) / EFFICACY_FILE, {"rows": rows})


def quantise_and_export(cfg: RunConfig, fresh: bool, progress: bool) -> list[dict]:
    """qat from the last stage's adapter (skipped when its result is written), then the export in qat.format
    (skipped when that directory exists; under torchrun by rank 0 while the others wait); returns qat's
    efficacy rows."""
    from rustforge.train import distributed, qat

    if not fresh and qat.is_complete(qat.result_dir(cfg)):
        _say("qat: complete, skipped")
        result = qat.summary(qat.stage_dir(cfg))
    else:
        result = qat.run(cfg, resume=not fresh, progress=progress)
    distributed.current().on_main(export, cfg, fresh)
    return efficacy_rows("qat", result)


def export(cfg: RunConfig, fresh: bool) -> None:
    """The export of qat's result in qat.format (skipped when that directory exists, unless fresh)."""
    from rustforge.export.hf import export_run

    export_dir = Path(cfg.export.out_dir or Path(cfg.run_dir) / "export" / cfg.qat.format)
    if fresh or not (export_dir / "config.json").is_file():
        print(f"export: {export_run(cfg, cfg.qat.format, export_dir)}")


def eval_out(cfg: RunConfig, label: str) -> Path:
    """<run_dir>/eval/<suite>-<mode>-<before|after>.json"""
    return Path(cfg.run_dir) / "eval" / f"{cfg.eval.suite}-{cfg.eval.mode}-{label}.json"


def evaluation_rows(cfg: RunConfig, fresh: bool = False, progress: bool = True) -> list[dict]:
    """The eval rows: cfg.eval's suite on EVAL_MODELS' stages (each skipped when its JSON exists, unless
    fresh), pass@1 and compile rate before and after."""
    from rustforge.eval import harness

    overall = {}
    for label, stage in EVAL_MODELS.items():
        out = eval_out(cfg, label)
        if fresh or not out.is_file():
            report = harness.evaluate(cfg, Path(cfg.run_dir) / stage, cfg.eval, progress=progress, out=out)
            print(f"eval ({label}: {stage})\n{report.table(max_rows=0)}")
        else:
            print(f"eval ({label}: {stage}): {out} exists, skipped")
        overall[label] = json.loads(out.read_text())["overall"]
    where = "held-out crates" if (cfg.eval.suite, cfg.eval.split) == ("crate_tasks", "val") else cfg.eval.suite
    rows = []
    for metric, key in EVAL_METRICS:
        before, after = (_number(overall[label].get(key)) for label in EVAL_MODELS)
        rows.append({"stage": "eval", "metric": f"{metric}, {where} ({cfg.eval.mode})", "before": before,
                     "after": after, "steps": overall["after"].get("samples")})  # fmt: skip
    return rows


def efficacy_rows(stage: str, summary: dict) -> list[dict]:
    """The stage's EFFICACY_METRICS rows from its summary (a metric the run did not log is left out)."""
    rows = []
    for metric, key in EFFICACY_METRICS.get(stage, []):
        if f"{key}_start" in summary:
            before, after = (_number(summary[f"{key}_{end}"]) for end in ("start", "end"))
            rows.append({"stage": stage, "metric": metric, "before": before, "after": after, "steps": summary["steps"]})
    return rows


def _number(value) -> float | None:
    """JSON-safe: NaN (e.g. a tool-call rate with no tool call sampled) becomes None."""
    return None if value is None or (isinstance(value, float) and math.isnan(value)) else float(value)


def format_efficacy(rows: list[dict]) -> str:
    """The table the pipeline prints: stage, metric, before, after, steps."""
    lines = [f"{'stage':<11} {'metric':<38} {'before':>8} {'after':>8} {'steps':>6}"]
    for row in rows:
        before, after = (f"{v:8.3f}" if v is not None else f"{'n/a':>8}" for v in (row["before"], row["after"]))
        lines.append(f"{row['stage']:<11} {row['metric']:<38} {before} {after} {row['steps']:>6}")
    return "\n".join(lines)


__all__ = [
    "EFFICACY_METRICS", "EVAL_MODELS", "STAGES", "efficacy_rows", "eval_out", "evaluation_rows", "export",
    "format_efficacy", "prepare_data", "quantise_and_export", "run_pipeline", "stage_complete",
]
