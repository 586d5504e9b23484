"""The data core_agent and ipo train on when their config names none of its own: the run's agent data.

`rustforge pipeline` makes it before those stages: tasks mined from real crates (rust/tasks.py, into
`tasks.out_dir`, sized by the `tasks` section; mining itself resumes crate by crate), replayed in the sandbox
into agent trajectories and IPO pairs whose tool outputs are real (rust/trajectories.py), one JSONL file per
kind and task split under <run_dir>/agent_data/. Each finished step is recorded in agent_data/steps.json, so
the rerun of a killed pipeline skips it (delete agent_data/ to rebuild). The stages find these files with
`run_files` when their `core_agent.trajectories` / `ipo.pairs` setting is empty.

The val split is the task miner's, by crate (the corpus' rule: a crate held out of the corpus is held out
here too), so the held-out metrics are on crates the stage never trained on; when the val crates gave no
task, no val file is used and the stage holds out `val_fraction` of the train file instead.
"""

from __future__ import annotations

import json
from pathlib import Path

from rustforge.config import RunConfig

AGENT_DATA = "agent_data"
STEPS_FILE = "steps.json"
SPLITS = ("train", "val")
# the kinds of agent data, each with the stage setting that, when empty, means "the run's own"
KINDS = {"trajectories": "core_agent.trajectories", "pairs": "ipo.pairs"}


def data_file(run_dir: str | Path, kind: str, split: str) -> Path:
    if kind not in KINDS or split not in SPLITS:
        raise ValueError(f"agent data: kind must be in {tuple(KINDS)}, split in {SPLITS}; got {kind!r}, {split!r}")
    return Path(run_dir) / AGENT_DATA / f"{kind}.{split}.jsonl"


def run_files(run_dir: str | Path, kind: str) -> tuple[list[str], list[str]]:
    """(train files, val files) of the run's own agent data of `kind`; val is [] when the val split gave none."""
    train, val = data_file(run_dir, kind, "train"), data_file(run_dir, kind, "val")
    if not train.is_file():
        setting = KINDS[kind]
        raise FileNotFoundError(
            f"{setting} is empty and the run has no {kind} of its own ({train}): run `rustforge pipeline` "
            f"(it mines tasks and builds them), or set {setting}"
        )
    return [str(train)], [str(val)] if val.is_file() and val.stat().st_size > 0 else []


def configured_files(cfg: RunConfig, kind: str) -> list[str]:
    return cfg.core_agent.trajectories if kind == "trajectories" else cfg.ipo.pairs


def finished_steps(run_dir: str | Path) -> dict:
    path = Path(run_dir) / AGENT_DATA / STEPS_FILE
    return json.loads(path.read_text()) if path.is_file() else {}


def _record(run_dir: str | Path, step: str, result: dict) -> None:
    from rustforge.train.checkpoint import write_json

    steps = finished_steps(run_dir)
    steps[step] = result
    write_json(Path(run_dir) / AGENT_DATA / STEPS_FILE, steps)


def ensure_agent_data(cfg: RunConfig, kind: str, sandbox=None, progress: bool = True) -> dict:
    """Make the run's `kind` files (mining tasks first if that step is not done) unless the stage's config
    names files of its own; finished steps are skipped. Returns steps.json's records."""
    if configured_files(cfg, kind):
        return finished_steps(cfg.run_dir)
    from rustforge.rust.sandbox import Sandbox

    sandbox = sandbox or Sandbox(cfg.sandbox)
    _ensure_mined(cfg, sandbox, progress)
    for split in SPLITS:
        step = f"{kind}.{split}"
        if step not in finished_steps(cfg.run_dir):
            _record(cfg.run_dir, step, build(cfg, kind, split, sandbox, progress))
    return finished_steps(cfg.run_dir)


def ensure_tasks(cfg: RunConfig, sandbox=None, progress: bool = True) -> None:
    """Mine the run's task set (for grpo) unless `grpo.tasks_dir` names tasks of its own or it is done."""
    if not cfg.grpo.tasks_dir:
        from rustforge.rust.sandbox import Sandbox

        _ensure_mined(cfg, sandbox or Sandbox(cfg.sandbox), progress)


def _ensure_mined(cfg: RunConfig, sandbox, progress: bool) -> None:
    (Path(cfg.run_dir) / AGENT_DATA).mkdir(parents=True, exist_ok=True)
    if "tasks" not in finished_steps(cfg.run_dir):
        _record(cfg.run_dir, "tasks", mine(cfg, sandbox, progress))


def mine(cfg: RunConfig, sandbox, progress: bool = True) -> dict:
    """Mine tasks into tasks.out_dir from the registry and the corpus' extra directories (as `rustforge data
    tasks` does); the summary's counts."""
    from dataclasses import asdict

    from rustforge.rust.tasks import mine_tasks

    sources = [cfg.tasks.registry, *(s for s in cfg.corpus.sources if Path(s).is_dir())]
    summary = mine_tasks(sources, cfg.tasks.out_dir, cfg.tasks, sandbox, progress=progress)
    print(summary.table())
    return asdict(summary)


def build(cfg: RunConfig, kind: str, split: str, sandbox, progress: bool = True) -> dict:
    """Replay the `split` tasks into the run's `kind` file; {"written", "skipped", "file"}."""
    from rustforge.rust.trajectories import build_dataset

    out = data_file(cfg.run_dir, kind, split)
    counts = build_dataset(
        cfg.tasks.out_dir, out, kind, split=split, sandbox=sandbox, workers=cfg.tasks.workers, progress=progress
    )
    print(f"{kind} ({split}): {counts['written']} written to {out}, {counts['skipped']} skipped")
    return {**counts, "file": str(out)}


__all__ = ["AGENT_DATA", "KINDS", "build", "data_file", "ensure_agent_data", "finished_steps", "mine", "run_files"]
