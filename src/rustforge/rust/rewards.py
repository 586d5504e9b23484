"""Named reward functions for Rust agent rollouts, and a pool that evaluates rollouts in parallel.

Each reward is a small function `(RolloutResult, RewardConfig) -> float` returning its weighted share;
`score` sums them into a `RewardBreakdown` that keeps every part for logging. Test results come from
`cargo test` in the bubblewrap sandbox (rustforge.rust.sandbox), parsed by rustforge.rust.tools; the
Harmony-format facts (`harmony_ok`, `has_final`, `analysis_tokens`) are computed by the caller (the
Harmony validator) and passed in as plain values, so this module doesn't depend on the parser.

`RewardPool` runs many evaluations at once on a concurrent.futures thread pool (the work is sandboxed
subprocesses, so threads suffice) behind a bounded submission queue, and reports rewards/s. Each worker
thread reuses one cargo target dir, so registry dependencies compile once per worker (run_cargo touches
the sources first, so another rollout's binary is never taken for fresh).
"""

from __future__ import annotations

import difflib
import logging
import os
import threading
import time
from collections.abc import Callable, Iterable
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Self

from rustforge.config import RewardConfig
from rustforge.rust.sandbox import Sandbox
from rustforge.rust.tools import SKIPPED_DIRS, CargoReport, run_cargo

log = logging.getLogger(__name__)


# RewardConfig lives in rustforge.config with every other default.



@dataclass
class RolloutResult:
    workspace: Path | None = None  # the crate as the agent left it; tested when `report` is None
    report: CargoReport | None = None  # `cargo test` results, if already known
    completion_text: str = ""
    completion_ids: list[int] = field(default_factory=list)
    harmony_ok: bool = False  # from the Harmony validator
    has_final: bool = False  # a final-channel message exists
    analysis_tokens: int = 0  # tokens spent in the analysis channel
    patch_lines: int | None = None  # lines added + removed by the agent; None = unknown (no penalty)
    original_workspace: Path | None = None  # the task's starting crate: patch_lines is computed from it
    task_id: str = ""


@dataclass
class RewardBreakdown:
    total: float
    parts: dict[str, float]
    report: CargoReport | None = None
    eval_s: float = 0.0


RewardFn = Callable[[RolloutResult, RewardConfig], float]


# --------------------------------------------------------------------------------------- rewards
def compiles(r: RolloutResult, cfg: RewardConfig) -> float:
    return cfg.compiles if r.report is not None and r.report.compiled else 0.0


def tests_pass(r: RolloutResult, cfg: RewardConfig) -> float:
    rep = r.report
    if rep is None or not rep.compiled or rep.total == 0:
        return 0.0
    return cfg.tests_pass * rep.passed / rep.total


def all_tests_pass(r: RolloutResult, cfg: RewardConfig) -> float:
    rep = r.report
    ok = (
        rep is not None
        and rep.compiled
        and not rep.timed_out
        and rep.total > 0
        and rep.failed == 0
        and rep.crashed_binaries == 0
    )
    return cfg.all_tests_pass if ok else 0.0


def harmony_format(r: RolloutResult, cfg: RewardConfig) -> float:
    return cfg.harmony_format if r.harmony_ok else 0.0


def endless_reasoning(r: RolloutResult, cfg: RewardConfig) -> float:
    endless = not r.has_final and r.analysis_tokens > cfg.analysis_token_budget
    return cfg.endless_reasoning if endless else 0.0


def patch_size(r: RolloutResult, cfg: RewardConfig) -> float:
    if r.patch_lines is None:
        return 0.0
    excess = (r.patch_lines - cfg.patch_size_free_lines) / (cfg.patch_size_max_lines - cfg.patch_size_free_lines)
    return cfg.patch_size * min(max(excess, 0.0), 1.0)


REWARD_FUNCTIONS: dict[str, RewardFn] = {
    "compiles": compiles,
    "tests_pass": tests_pass,
    "all_tests_pass": all_tests_pass,
    "harmony_format": harmony_format,
    "endless_reasoning": endless_reasoning,
    "patch_size": patch_size,
}


def score(r: RolloutResult, cfg: RewardConfig) -> RewardBreakdown:
    parts = {name: fn(r, cfg) for name, fn in REWARD_FUNCTIONS.items()}
    return RewardBreakdown(total=sum(parts.values()), parts=parts, report=r.report)


# ------------------------------------------------------------------------------------- patch size
def _source_files(root: Path) -> dict[str, Path]:
    """Regular files under root by relative path; build/VCS dirs, Cargo.lock and symlinks skipped."""
    files = {}
    for dirpath, dirnames, filenames in os.walk(root, followlinks=False):
        dirnames[:] = [d for d in dirnames if d not in SKIPPED_DIRS]
        for name in filenames:
            path = Path(dirpath) / name
            if name != "Cargo.lock" and not path.is_symlink():
                files[path.relative_to(root).as_posix()] = path
    return files


def changed_lines(original: Path, final: Path) -> int:
    """Lines added plus lines removed between two crate trees (a deleted file counts all its lines)."""
    before, after = _source_files(original), _source_files(final)
    total = 0
    for rel in sorted(set(before) | set(after)):
        old = _lines(before.get(rel))
        new = _lines(after.get(rel))
        if old == new:
            continue
        matcher = difflib.SequenceMatcher(None, old, new, autojunk=False)
        for tag, i1, i2, j1, j2 in matcher.get_opcodes():
            if tag != "equal":
                total += (i2 - i1) + (j2 - j1)
    return total


def _lines(path: Path | None) -> list[str]:
    if path is None:
        return []
    return path.read_bytes().decode("utf-8", errors="replace").splitlines()


# ------------------------------------------------------------------------------------------- pool
class RewardPool:
    """Scores rollouts in parallel: `submit` (blocks while `max_pending` are queued) or `map`."""

    def __init__(
        self,
        n_workers: int,
        sandbox: Sandbox | None = None,
        cfg: RewardConfig | None = None,
        target_root: Path | None = None,  # per-worker target dirs live here; None = each crate's target/
        max_pending: int | None = None,  # submitted but unfinished rollouts; default 2 * n_workers
    ):
        if n_workers < 1:
            raise ValueError(f"RewardPool: n_workers must be >= 1, got {n_workers}")
        self.cfg = cfg or RewardConfig()
        self.sandbox = sandbox or Sandbox()
        self.target_root = Path(target_root) if target_root is not None else None
        self.max_pending = max_pending or 2 * n_workers
        self._executor = ThreadPoolExecutor(n_workers, thread_name_prefix="reward")
        self._slots = threading.BoundedSemaphore(self.max_pending)
        self._local = threading.local()
        self._lock = threading.Lock()
        self._worker_count = 0
        self._completed = 0
        self._eval_s = 0.0
        self._started = time.monotonic()

    # ------------------------------------------------------------------------------------- public
    def submit(self, rollout: RolloutResult) -> Future[RewardBreakdown]:
        self._slots.acquire()  # the bounded queue: wait for a slot
        try:
            future = self._executor.submit(self.evaluate, rollout)
        except BaseException:
            self._slots.release()
            raise
        future.add_done_callback(lambda _: self._slots.release())
        return future

    def map(self, rollouts: Iterable[RolloutResult]) -> list[RewardBreakdown]:
        """Scores in input order; submission blocks on the queue bound, so memory stays bounded."""
        futures = [self.submit(r) for r in rollouts]
        return [f.result() for f in futures]

    def evaluate(self, rollout: RolloutResult) -> RewardBreakdown:
        """Test (if needed) and score one rollout on the calling thread."""
        start = time.monotonic()
        report = rollout.report
        if report is None and rollout.workspace is not None:
            target = self._worker_target_dir()
            report = run_cargo(self.sandbox, rollout.workspace, "test", target_dir=target)
        lines = rollout.patch_lines
        if lines is None and rollout.original_workspace is not None and rollout.workspace is not None:
            lines = changed_lines(rollout.original_workspace, rollout.workspace)
        breakdown = score(replace(rollout, report=report, patch_lines=lines), self.cfg)
        breakdown.eval_s = time.monotonic() - start
        with self._lock:
            self._completed += 1
            self._eval_s += breakdown.eval_s
        return breakdown

    def stats(self) -> dict[str, float]:
        with self._lock:
            elapsed = time.monotonic() - self._started
            done = self._completed
            return {
                "completed": done,
                "elapsed_s": elapsed,
                "rewards_per_s": done / elapsed if elapsed > 0 else 0.0,
                "mean_eval_s": self._eval_s / done if done else 0.0,
            }

    @property
    def rewards_per_s(self) -> float:
        return self.stats()["rewards_per_s"]

    def close(self) -> None:
        self._executor.shutdown(wait=True)
        stats = self.stats()
        log.info("reward pool: %d rewards, %.2f rewards/s", stats["completed"], stats["rewards_per_s"])

    def __enter__(self) -> Self:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    # ---------------------------------------------------------------------------------- internals
    def _worker_target_dir(self) -> Path | None:
        if self.target_root is None:
            return None
        if not hasattr(self._local, "target"):
            with self._lock:
                index = self._worker_count
                self._worker_count += 1
            self._local.target = self.target_root / f"worker{index}"
            self._local.target.mkdir(parents=True, exist_ok=True)
        return self._local.target
