"""Reward functions (rustforge.rust.rewards) on synthetic results, and RewardPool on three tiny crates:
one passing, one that does not compile, one with a failing test (cargo test runs in the sandbox)."""

from __future__ import annotations

import os
import shutil
import threading
import time
from pathlib import Path

import pytest

from rustforge.rust import rewards
from rustforge.rust.rewards import (
    REWARD_FUNCTIONS,
    RewardConfig,
    RewardPool,
    RolloutResult,
    changed_lines,
    score,
)
from rustforge.rust.sandbox import Sandbox, SandboxConfig, find_toolchain_sysroot
from rustforge.rust.tools import CargoReport

needs_sandbox = pytest.mark.skipif(
    shutil.which("bwrap") is None or find_toolchain_sysroot() is None, reason="needs bubblewrap and a Rust toolchain"
)
CFG = RewardConfig()

PASSING = """\
pub fn double(x: i32) -> i32 { x * 2 }
#[cfg(test)]
mod tests {
    #[test] fn one() { assert_eq!(super::double(1), 2); }
    #[test] fn two() { assert_eq!(super::double(2), 4); }
}
"""
NOT_COMPILING = PASSING.replace("x * 2 }", '"x * 2" }')
FAILING_TEST = PASSING.replace("double(2), 4", "double(2), 5")


def write_crate(root: Path, lib: str) -> Path:
    (root / "src").mkdir(parents=True)
    (root / "Cargo.toml").write_text('[package]\nname = "task"\nversion = "0.1.0"\nedition = "2021"\n')
    (root / "src" / "lib.rs").write_text(lib)
    return root


def report(compiled=True, passed=0, failed=0, timed_out=False, crashed=0) -> CargoReport:
    return CargoReport("test", compiled=compiled, passed=passed, failed=failed, timed_out=timed_out,
                       crashed_binaries=crashed)  # fmt: skip


# ---------------------------------------------------------------------------------- the functions
def test_compiles_and_test_rewards():
    r = RolloutResult(report=report(passed=3, failed=1))
    assert rewards.compiles(r, CFG) == CFG.compiles
    assert rewards.tests_pass(r, CFG) == pytest.approx(CFG.tests_pass * 0.75)
    assert rewards.all_tests_pass(r, CFG) == 0.0
    all_ok = RolloutResult(report=report(passed=4))
    assert rewards.all_tests_pass(all_ok, CFG) == CFG.all_tests_pass
    broken = RolloutResult(report=report(compiled=False))
    assert rewards.compiles(broken, CFG) == rewards.tests_pass(broken, CFG) == rewards.all_tests_pass(broken, CFG) == 0
    no_tests = RolloutResult(report=report(passed=0))
    assert rewards.tests_pass(no_tests, CFG) == 0 and rewards.all_tests_pass(no_tests, CFG) == 0
    crashed = RolloutResult(report=report(passed=2, crashed=1))
    assert rewards.all_tests_pass(crashed, CFG) == 0
    timed_out = RolloutResult(report=report(passed=2, timed_out=True))
    assert rewards.all_tests_pass(timed_out, CFG) == 0
    assert rewards.compiles(RolloutResult(), CFG) == 0  # nothing was tested


def test_harmony_and_endless_reasoning():
    assert rewards.harmony_format(RolloutResult(harmony_ok=True), CFG) == 0.2
    assert rewards.harmony_format(RolloutResult(harmony_ok=False), CFG) == 0.0
    over = CFG.analysis_token_budget + 1
    assert rewards.endless_reasoning(RolloutResult(has_final=False, analysis_tokens=over), CFG) == -0.8
    assert rewards.endless_reasoning(RolloutResult(has_final=True, analysis_tokens=over), CFG) == 0.0
    at_budget = RolloutResult(has_final=False, analysis_tokens=CFG.analysis_token_budget)
    assert rewards.endless_reasoning(at_budget, CFG) == 0.0


def test_patch_size_penalty_ramps_linearly():
    cfg = RewardConfig(patch_size=-0.2, patch_size_free_lines=40, patch_size_max_lines=140)

    def penalty(lines):
        return rewards.patch_size(RolloutResult(patch_lines=lines), cfg)

    assert penalty(None) == 0.0 and penalty(0) == 0.0 and penalty(40) == 0.0
    assert penalty(90) == pytest.approx(-0.1)
    assert penalty(140) == pytest.approx(-0.2) and penalty(10_000) == pytest.approx(-0.2)
    with pytest.raises(ValueError, match="patch_size_max_lines"):
        RewardConfig(patch_size_free_lines=50, patch_size_max_lines=50)


def test_score_sums_named_parts_and_weights_are_configurable():
    r = RolloutResult(report=report(passed=1, failed=1), harmony_ok=True, patch_lines=0)
    breakdown = score(r, CFG)
    assert set(breakdown.parts) == set(REWARD_FUNCTIONS)
    assert breakdown.total == pytest.approx(0.2 + 0.25 + 0.2)
    silent = RewardConfig(compiles=0.0, harmony_format=0.0)
    assert score(r, silent).total == pytest.approx(0.25)


def test_changed_lines_counts_adds_removes_and_files(tmp_path):
    before = write_crate(tmp_path / "before", "a\nb\nc\n")
    after = write_crate(tmp_path / "after", "a\nB\nc\nd\n")
    (after / "src" / "new.rs").write_text("x\ny\n")
    (after / "target").mkdir()
    (after / "target" / "junk").write_text("ignored\n" * 100)
    (after / "Cargo.lock").write_text("ignored\n" * 100)
    # b -> B is one removed + one added; d added; new.rs adds two
    assert changed_lines(before, after) == 2 + 1 + 2
    assert changed_lines(before, before) == 0


# -------------------------------------------------------------------------------------- the pool
@pytest.fixture(scope="module")
def sandbox() -> Sandbox:
    return Sandbox(SandboxConfig(timeout_s=60))


@needs_sandbox
def test_pool_scores_three_crates(tmp_path, sandbox):
    crates = {name: write_crate(tmp_path / name, lib) for name, lib in
              [("passing", PASSING), ("broken", NOT_COMPILING), ("failing", FAILING_TEST)]}  # fmt: skip
    original = write_crate(tmp_path / "original", PASSING)
    rollouts = [
        RolloutResult(workspace=crates["passing"], harmony_ok=True, has_final=True, original_workspace=original),
        RolloutResult(workspace=crates["broken"], has_final=False, analysis_tokens=10_000),
        RolloutResult(workspace=crates["failing"], harmony_ok=True, has_final=True),
    ]
    with RewardPool(2, sandbox, CFG, target_root=tmp_path / "targets") as pool:
        passing, broken, failing = pool.map(rollouts)
        stats = pool.stats()
    assert passing.report.compiled and (passing.report.passed, passing.report.failed) == (2, 0)
    assert passing.total == pytest.approx(0.2 + 0.5 + 0.3 + 0.2)
    assert passing.parts["patch_size"] == 0.0
    assert not broken.report.compiled
    assert broken.total == pytest.approx(-0.8)  # no build, no final answer, reasoned past the budget
    assert (failing.report.passed, failing.report.failed) == (1, 1)
    assert failing.total == pytest.approx(0.2 + 0.25 + 0.2)
    assert stats["completed"] == 3 and stats["rewards_per_s"] > 0
    workers = {p.name for p in (tmp_path / "targets").iterdir()}
    assert workers and workers <= {"worker0", "worker1"}  # one reusable target dir per worker thread


@needs_sandbox
def test_shared_target_dir_never_reuses_another_rollouts_binary(tmp_path, sandbox):
    """Same crate name, same sandbox path, older sources: without the touch, cargo would call it fresh."""
    good = write_crate(tmp_path / "good", PASSING)
    bad = write_crate(tmp_path / "bad", FAILING_TEST)
    an_hour_ago = time.time() - 3600
    for path in (good / "src" / "lib.rs", good / "Cargo.toml"):
        os.utime(path, (an_hour_ago, an_hour_ago))
    with RewardPool(1, sandbox, CFG, target_root=tmp_path / "targets") as pool:
        first = pool.evaluate(RolloutResult(workspace=bad))
        second = pool.evaluate(RolloutResult(workspace=good))
    assert first.report.failed == 1
    assert (second.report.passed, second.report.failed) == (2, 0)


def test_pool_queue_is_bounded(monkeypatch):
    in_flight = running = max_in_flight = max_running = 0
    lock = threading.Lock()

    def slow_cargo(sandbox, workspace, command, extra_args=(), target_dir=None):
        nonlocal running, max_running
        with lock:
            running += 1
            max_running = max(max_running, running)
        time.sleep(0.05)
        with lock:
            running -= 1
        return CargoReport("test", compiled=True, passed=1)

    monkeypatch.setattr(rewards, "run_cargo", slow_cargo)
    pool = RewardPool(2, Sandbox(SandboxConfig()), CFG, max_pending=3)
    futures = []
    for i in range(8):
        future = pool.submit(RolloutResult(workspace=Path(".")))
        with lock:
            in_flight = sum(not f.done() for f in futures) + 1
            max_in_flight = max(max_in_flight, in_flight)
        futures.append(future)
    results = [f.result() for f in futures]
    pool.close()
    assert all(r.total == pytest.approx(1.0) for r in results)
    assert max_in_flight <= 3 and max_running <= 2
    assert pool.stats()["completed"] == 8


def test_pool_rejects_bad_worker_count():
    with pytest.raises(ValueError, match="n_workers"):
        RewardPool(0)
