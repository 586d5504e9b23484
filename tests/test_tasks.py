"""Task mining (rustforge.rust.tasks): the lexer-aware function locator and mutants on literal sources,
then one real mine of a tiny crate this test writes, through the bubblewrap sandbox (module-scoped, so
cargo builds it once): every mutation kind yields a task whose failing tests are the right ones, an
untested function's mutants are discarded, a missing dev-dependency is stripped with the test target
that needs it, a re-run does nothing, and a materialised task fails until its reference patch is applied.
"""

from __future__ import annotations

import json
import shutil
import tomllib
from pathlib import Path

import pytest

from rustforge.rust import tasks as T
from rustforge.rust.sandbox import Sandbox, SandboxConfig, find_toolchain_sysroot
from rustforge.rust.tools import ToolEnv, run_cargo

needs_sandbox = pytest.mark.skipif(
    shutil.which("bwrap") is None or find_toolchain_sysroot() is None, reason="needs bubblewrap and a Rust toolchain"
)

# ------------------------------------------------------------------------------------ the tiny crate
MANIFEST = """\
[package]
name = "tinytask"
version = "0.1.0"
edition = "2021"

[dependencies]

[dev-dependencies]
criterion = "0.3"
"""
LIB = r"""//! A tiny crate to mine.

/// Sum of the first `n` positive integers.
pub fn triangle(n: u32) -> u32 {
    let mut total = 0;
    for i in 1..=n {
        total += i;
    }
    total
}

/// Whether the slice is sorted ascending.
pub fn is_sorted(xs: &[i32]) -> bool {
    for w in xs.windows(2) {
        if w[0] > w[1] {
            return false;
        }
    }
    true
}

/// Nobody tests this: its mutants survive.
pub fn untested(x: i32) -> i32 {
    x + 7
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn triangle_numbers() {
        assert_eq!(triangle(4), 10);
        assert_eq!(triangle(1), 1);
    }

    #[test]
    fn sorted_slices() {
        assert!(is_sorted(&[1, 2, 2, 5]));
        assert!(!is_sorted(&[3, 1]));
    }
}
"""
BENCH_TEST = "use criterion::Criterion;\n\n#[test]\nfn needs_criterion() {\n    let _ = Criterion::default();\n}\n"


def write_crate(root: Path) -> Path:
    (root / "src").mkdir(parents=True)
    (root / "tests").mkdir()
    (root / "Cargo.toml").write_text(MANIFEST)
    (root / "src" / "lib.rs").write_text(LIB)
    (root / "tests" / "bench_like.rs").write_text(BENCH_TEST)
    return root


# ------------------------------------------------------------------------------------------- lexing
def test_code_mask_blanks_comments_strings_and_chars_but_not_lifetimes():
    src = 'fn f<\'a>(x: &\'a str) { let s = "}{"; let r = r#"a"{"#; let c = \'{\'; /* { /* } */ */ } // }\n'
    mask = T.code_mask(src)
    assert len(mask) == len(src)
    assert mask.count("{") == mask.count("}") == 1  # only the body's braces survive
    assert "'a" in mask and "let c = ' '" in mask
    assert T.match_close(mask, mask.index("{")) == mask.rindex("}")


def test_find_functions_skips_tests_macros_declarations_and_nested():
    src = """\
/// Doc line.
#[inline]
pub fn top(a: u8) -> Option<u8> {
    fn helper() {}
    Some(a)
}

pub trait Shape {
    fn area(&self) -> f64;
    fn double(&self) -> f64 { self.area() * 2.0 }
}

impl<T: Clone> Shape for Vec<T> {
    fn area(&self) -> f64 { let s = "fn fake() {"; s.len() as f64 }
}

impl<T: Copy> Shape for T {
    fn area(&self) -> f64 { 1.0 }
}

macro_rules! make { () => { fn made() {} } }

#[cfg(test)]
mod tests {
    fn in_tests() {}
}

#[test]
fn a_test() {}

#[cfg(all(unix, test))]
fn only_in_tests() {}

#[cfg(any(test, feature = "std"))]
fn also_in_normal_builds() {}
"""
    found = T.find_functions(src)
    assert [f.qualname for f in found] == ["top", "Shape::double", "Vec::area", "Shape::area", "also_in_normal_builds"]
    top = found[0]
    assert top.doc == "Doc line." and top.return_type == "Option<u8>" and top.line == 3
    assert src[top.item_start :].startswith("/// Doc line.")
    assert src[top.body_open] == "{" and src[top.body_close] == "}" and "Some(a)" in src[top.body_open : top.body_close]


def test_mutants_of_each_kind_are_local_to_the_function():
    fns = {f.name: f for f in T.find_functions(LIB)}
    mask = T.code_mask(LIB)
    mutants = T.function_mutants(LIB, mask, "src/lib.rs", fns["triangle"], T.MUTATION_KINDS)
    described = {(m.kind, m.description.split(" (line")[0]) for m in mutants}
    assert ("operator", "`+=` -> `-=`") in described
    assert ("off_by_one", "literal 0 -> 1") in described and ("off_by_one", "range `..=` -> `..`") in described
    assert ("wrong_return", "fn triangle returns 0 early") in described
    removal = next(m for m in mutants if m.kind == "body_removal")
    assert removal.apply(LIB).count("todo!()") == 1 and "let mut total" not in removal.apply(LIB).split("mod tests")[0]
    sorted_mutants = T.function_mutants(LIB, mask, "src/lib.rs", fns["is_sorted"], ["wrong_return", "operator"])
    assert {m.description.split(" (line")[0] for m in sorted_mutants} >= {"`false` -> `true`", "`>` -> `>=`"}
    for m in mutants + sorted_mutants:  # never inside the tests module
        assert m.start < LIB.index("#[cfg(test)]")


def test_test_module_files_are_not_mutated(tmp_path):
    (tmp_path / "src" / "parse").mkdir(parents=True)
    (tmp_path / "src" / "lib.rs").write_text("mod parse;\n#[cfg(test)]\nmod checks;\npub fn f() -> u8 { 1 }\n")
    (tmp_path / "src" / "checks.rs").write_text("pub fn helper() -> u8 { 2 }\n")
    (tmp_path / "src" / "parse" / "mod.rs").write_text("pub fn g() -> u8 { 3 }\n")
    (tmp_path / "src" / "parse" / "parse_tests.rs").write_text("pub fn h() -> u8 { 4 }\n")
    sources = T.library_sources(tmp_path)
    tests = {p.relative_to(tmp_path).as_posix() for p in T.find_test_module_files(tmp_path, sources) if p.exists()}
    assert tests == {"src/checks.rs", "src/parse/parse_tests.rs"}
    mutated = {m.file for m in T.crate_mutants(tmp_path, T.TaskMiningConfig())}
    assert mutated == {"src/lib.rs", "src/parse/mod.rs"}


# ---------------------------------------------------------------------------------- manifests/semver
@pytest.mark.parametrize(
    "req, version, ok",
    [("0.3", "0.3.9", True), ("0.3", "0.4.0", False), ("^1.2", "1.9.0", True), ("1", "2.0.0", False),
     ("~1.2.3", "1.2.9", True), ("~1.2.3", "1.3.0", False), ("=0.3.2", "0.3.3", False), (">=0.9, <2", "1.5.0", True),
     ("0.0.3", "0.0.4", False), ("*", "7.1.0", True), ("1.*", "1.4.2", True), ("0.6.1", "0.8.5", False)],
)  # fmt: skip
def test_version_requirements(req, version, ok):
    assert T.version_matches(req, version) is ok


def test_unavailable_dev_dependencies_are_stripped_in_both_table_styles():
    text = (
        '[package]\nname = "x"\nversion = "1.0.0"\n\n[dev-dependencies]\nrand = "0.8"\ncriterion = "0.3"\n\n'
        '[dev-dependencies.quickcheck]\nversion = "0.9"\n\n'
        '[target."cfg(unix)".dev-dependencies.libc]\nversion = "0.2"\n'
    )
    index = {"rand": ["0.8.5"], "quickcheck": ["1.0.3"], "libc": ["0.2.139"]}
    missing = T.unavailable_dev_dependencies(tomllib.loads(text), index)
    assert missing == {"criterion", "quickcheck"}
    stripped = tomllib.loads(T.strip_dev_dependencies(text, missing))
    assert stripped["dev-dependencies"] == {"rand": "0.8"}
    assert stripped["target"]["cfg(unix)"]["dev-dependencies"] == {"libc": {"version": "0.2"}}


# ------------------------------------------------------------------------------------ real mining
@pytest.fixture(scope="module")
def sandbox() -> Sandbox:
    return Sandbox(SandboxConfig(timeout_s=120))


@pytest.fixture(scope="module")
def mined(tmp_path_factory, sandbox):
    root = tmp_path_factory.mktemp("mine")
    crate = write_crate(root / "crates" / "tinytask")
    cfg = T.TaskMiningConfig(
        registry="/usr/share/cargo/registry", workers=1, max_tasks_per_crate=50, max_candidates_per_crate=50,
        max_per_function=50, val_fraction=0.0,
    )  # fmt: skip
    first = T.mine_tasks([root / "crates"], root / "out", cfg, sandbox, progress=False)
    second = T.mine_tasks([root / "crates"], root / "out", cfg, sandbox, progress=False)
    return root, crate, first, second, cfg


@needs_sandbox
def test_every_kind_yields_tasks_with_the_right_failing_tests(mined):
    root, _, first, _, _ = mined
    tasks = T.load_tasks(root / "out", "train")
    assert first.tasks_new == len(tasks) > 0 and not T.load_tasks(root / "out", "val")
    assert {t.kind for t in tasks} == set(T.MUTATION_KINDS)
    expected = {"triangle": ["tests::triangle_numbers"], "is_sorted": ["tests::sorted_slices"]}
    for task in tasks:
        assert task.failing_tests == expected[task.function], task.mutation
        assert task.crate == "tinytask" and task.file == "src/lib.rs" and task.changed_files == ["src/lib.rs"]
        assert f"`{task.function}`" in task.prompt and "src/lib.rs" in task.prompt
        if task.kind == "body_removal":
            assert "Implement it from its doc comment" in task.prompt
        else:
            assert task.failing_tests[0] in task.prompt
    assert len({t.id for t in tasks}) == len(tasks)


@needs_sandbox
def test_survivors_are_discarded_and_missing_dev_deps_stripped(mined):
    root, _, first, _, _ = mined
    assert first.outcomes.get("survived", 0) >= 1  # untested() mutants
    assert first.outcomes["task"] == first.tasks_new
    assert all(t.function != "untested" for t in T.load_tasks(root / "out"))
    state = json.loads((root / "out" / "state" / "tinytask-0.1.0.json").read_text())
    assert state["baseline"] == "ok" and state["stripped_dev_deps"] == ["criterion"]
    assert state["dropped_targets"] == ["tests/bench_like.rs"]
    base = root / "out" / "bases" / "tinytask-0.1.0"
    assert "criterion" not in (base / "Cargo.toml").read_text() and not (base / "tests" / "bench_like.rs").exists()


@needs_sandbox
def test_rerun_skips_done_work(mined):
    _, _, first, second, _ = mined
    assert second.candidates_tried == 0 and second.tasks_new == 0
    assert second.tasks_total == first.tasks_total and second.crates_usable == 1


@needs_sandbox
def test_resume_after_interruption_continues_without_duplicates(mined, sandbox, tmp_path):
    root, _, first, _, cfg = mined
    out = tmp_path / "out"
    shutil.copytree(root / "out", out, ignore=shutil.ignore_patterns("targets"))
    state_path = out / "state" / "tinytask-0.1.0.json"
    state = json.loads(state_path.read_text())
    done = [k for k, v in state["tried"].items() if v == "task"]
    state["tried"] = {done[0]: "task"}  # as if killed after the first task was written and recorded...
    state["done_limits"] = None
    state_path.write_text(json.dumps(state))
    lines = (out / T.TASKS_FILE).read_text().splitlines(keepends=True)
    (out / T.TASKS_FILE).write_text("".join(lines[:2]) + lines[2][:40])  # ...and one line half-written
    summary = T.mine_tasks([root / "crates"], out, cfg, sandbox, progress=False)
    ids = [t.id for t in T.load_tasks(out)]
    assert len(ids) == len(set(ids)) == first.tasks_total
    assert summary.candidates_tried == first.candidates_tried - 1


@needs_sandbox
def test_materialised_task_fails_until_the_reference_patch_is_applied(mined, sandbox, tmp_path):
    root = mined[0]
    task = next(t for t in T.load_tasks(root / "out") if t.kind == "operator")
    workspace = T.materialise(task, tmp_path / "ws")
    assert (workspace / "src" / "lib.rs").read_text() != (root / "out" / task.base / "src" / "lib.rs").read_text()
    target = tmp_path / "target"
    report = run_cargo(sandbox, workspace, "test", target_dir=target)
    assert report.compiled and sorted(t.name for t in report.tests if t.status == "FAILED") == task.failing_tests
    env = ToolEnv(workspace, sandbox, target_dir=target, enable_clippy=False)
    assert env.call("apply_patch", {"patch": task.reference_patch}).startswith("patched src/lib.rs")
    fixed = run_cargo(sandbox, workspace, "test", target_dir=target)
    assert T.check_report_fixed(fixed)
    with pytest.raises(T.TaskError, match="not empty"):
        T.materialise(task, workspace)


def test_load_tasks_errors_name_the_file(tmp_path):
    with pytest.raises(T.TaskError, match="tasks.jsonl: not found"):
        T.load_tasks(tmp_path)
    (tmp_path / T.TASKS_FILE).write_text('{"id": "x"}\n')
    with pytest.raises(T.TaskError, match=r"tasks.jsonl:1: task record lacks crate"):
        T.load_tasks(tmp_path)
    with pytest.raises(ValueError, match="split must be one of"):
        T.load_tasks(tmp_path, "test")


@needs_sandbox
def test_time_budget_stops_before_any_crate_starts(tmp_path):
    write_crate(tmp_path / "crates" / "tinytask")
    cfg = T.TaskMiningConfig(time_budget_s=1e-9, workers=1)
    summary = T.mine_tasks([tmp_path / "crates"], tmp_path / "out", cfg, Sandbox(), progress=False)
    assert summary.crates_skipped == {"time_budget": 1} and summary.candidates_tried == 0
    assert not (tmp_path / "out" / "state" / "tinytask-0.1.0.json").exists()  # nothing recorded: a re-run mines it
