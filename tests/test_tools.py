"""The agent's tools (rustforge.rust.tools) on a small crate this test writes, errors included.

Cargo runs in the bubblewrap sandbox with one target dir shared by the module, so each cargo call after
the first is incremental. The cargo-output parser is also checked on synthetic output (crashed test
binary, truncated JSON, a manifest error) that is awkward to produce for real.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

from rustforge.rust import tools
from rustforge.rust.sandbox import RunResult, Sandbox, SandboxConfig, find_toolchain_sysroot
from rustforge.rust.tools import ToolEnv, parse_cargo_output, tool_definitions

MANIFEST = '[package]\nname = "demo"\nversion = "0.1.0"\nedition = "2021"\n\n[dependencies]\n'
LIB = """\
pub fn add(a: i32, b: i32) -> i32 {
    a + b
}

pub fn is_big(n: i32) -> bool {
    let flag = n > 10;
    if flag == true { true } else { false }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn adds() {
        assert_eq!(add(1, 2), 3);
    }

    #[test]
    fn wrong() {
        assert_eq!(add(2, 2), 5);
    }
}
"""

needs_sandbox = pytest.mark.skipif(
    shutil.which("bwrap") is None or find_toolchain_sysroot() is None, reason="needs bubblewrap and a Rust toolchain"
)


@pytest.fixture(scope="module")
def sandbox() -> Sandbox:
    return Sandbox(SandboxConfig(timeout_s=60))


@pytest.fixture(scope="module")
def target_dir(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("target")


@pytest.fixture
def crate(tmp_path: Path) -> Path:
    root = tmp_path / "demo"
    (root / "src").mkdir(parents=True)
    (root / "Cargo.toml").write_text(MANIFEST)
    (root / "src" / "lib.rs").write_text(LIB)
    (root / "target" / "debug").mkdir(parents=True)
    (root / "target" / "debug" / "junk").write_text("x")
    (root / ".git").mkdir()
    (root / ".git" / "HEAD").write_text("ref")
    return root


@pytest.fixture
def env(crate, sandbox, target_dir) -> ToolEnv:
    return ToolEnv(crate, sandbox, target_dir=target_dir)


def call(env: ToolEnv, name: str, **arguments) -> str:
    return env.call(name, json.dumps(arguments))


# ------------------------------------------------------------------------------------ definitions
def test_tool_definitions_are_json_schema_functions():
    defs = tool_definitions(include_clippy=True)
    names = [d["name"] for d in defs]
    assert names == ["list_files", "read_file", "write_file", "apply_patch", "search", "cargo_check",
                     "cargo_test", "cargo_clippy"]  # fmt: skip
    for d in defs:
        assert set(d) == {"name", "description", "parameters"} and d["description"]
        params = d["parameters"]
        assert params["type"] == "object" and set(params["required"]) <= set(params["properties"])
    json.dumps(defs)  # serialisable for the Harmony developer message
    assert "cargo_clippy" not in [d["name"] for d in tool_definitions(include_clippy=False)]


def test_clippy_offered_only_when_installed(crate, sandbox, monkeypatch):
    monkeypatch.setattr(Sandbox, "has_tool", lambda self, name: False)
    assert "cargo_clippy" not in ToolEnv(crate, sandbox).tools
    assert ToolEnv(crate, sandbox).call("cargo_clippy", "{}").startswith("error: unknown tool 'cargo_clippy'")


# ------------------------------------------------------------------------------- argument errors
def test_argument_errors_are_readable_strings(env):
    assert call(env, "nope").startswith("error: unknown tool 'nope'; available: list_files")
    assert env.call("read_file", "{not json").startswith("error: read_file: arguments are not valid JSON")
    assert env.call("read_file", "[1]") == "error: read_file: arguments must be a JSON object, got list"
    assert call(env, "read_file") == "error: read_file: missing required argument(s): path"
    assert call(env, "read_file", path="src/lib.rs", start_line="3") == (
        "error: read_file: argument 'start_line' must be integer, got \"3\""
    )
    assert call(env, "read_file", path="src/lib.rs", start_line=True).startswith("error: read_file: argument")
    assert call(env, "read_file", path="src/lib.rs", start_line=0).endswith("must be >= 1, got 0")
    assert call(env, "write_file", path="a.rs", content="x", mode="w").startswith(
        "error: write_file: unknown argument(s): mode"
    )


# -------------------------------------------------------------------------------------- file tools
def test_list_files_skips_target_and_git(env):
    assert call(env, "list_files").splitlines() == ["Cargo.toml", "src/lib.rs"]
    assert call(env, "list_files", path="src") == "src/lib.rs"
    assert call(env, "list_files", path="nope") == "error: list_files: nope: no such file or directory"


def test_read_file_numbers_lines_and_ranges(env):
    out = call(env, "read_file", path="src/lib.rs", start_line=2, end_line=3)
    assert out.splitlines()[:2] == ["    2      a + b", "    3  }"]
    assert "(lines 2-3 of 23" in out
    assert "   23  }" in call(env, "read_file", path="src/lib.rs")
    assert call(env, "read_file", path="src/lib.rs", start_line=99).startswith(
        "error: read_file: start_line 99 is past the end of src/lib.rs (23 lines)"
    )
    assert "is a directory" in call(env, "read_file", path="src")


def test_paths_outside_workspace_are_refused(env, crate, tmp_path):
    secret = tmp_path / "secret.txt"
    secret.write_text("TOKEN")
    (crate / "src" / "link.rs").symlink_to(secret)
    for path in ["../secret.txt", str(secret), "/etc/passwd", "src/link.rs", "src/../../secret.txt"]:
        out = call(env, "read_file", path=path)
        assert out.startswith("error: read_file: path") and "outside the workspace" in out, (path, out)
    assert "outside the workspace" in call(env, "write_file", path="../evil.rs", content="x")
    assert not (tmp_path / "evil.rs").exists()
    assert "outside the workspace" in call(env, "list_files", path="..")
    assert "outside the workspace" in call(env, "search", pattern="TOKEN", path="../secret.txt")
    assert call(env, "search", pattern="TOKEN") == "no matches for 'TOKEN'"  # the symlink is skipped
    assert call(env, "read_file", path="/workspace/Cargo.toml").startswith("    1  [package]")


def test_write_file_creates_and_overwrites(env, crate):
    assert call(env, "write_file", path="src/util/mod.rs", content="pub fn f() {}\n") == (
        "created src/util/mod.rs (1 lines, 14 bytes)"
    )
    assert (crate / "src" / "util" / "mod.rs").read_text() == "pub fn f() {}\n"
    assert call(env, "write_file", path="src/util/mod.rs", content="").startswith("overwrote")
    assert "must be string" in call(env, "write_file", path="a.rs", content=3)


def test_line_numbers_count_only_newlines(env, crate):
    (crate / "src" / "ff.rs").write_text("let a = 1;\x0c// after form feed\nlet b = 2;\n")
    assert call(env, "read_file", path="src/ff.rs").splitlines()[-1] == "    2  let b = 2;"
    assert call(env, "search", pattern="b = 2") == "src/ff.rs:2:let b = 2;"
    patch = "--- a/src/ff.rs\n+++ b/src/ff.rs\n@@ -2 +2 @@\n-let b = 2;\n+let b = 3;\n"
    assert call(env, "apply_patch", patch=patch) == "patched src/ff.rs (1 hunk(s))"
    assert (crate / "src" / "ff.rs").read_text() == "let a = 1;\x0c// after form feed\nlet b = 3;\n"


def test_read_binary_file_is_refused(env, crate):
    (crate / "blob.bin").write_bytes(b"\x00\x01\x02")
    assert call(env, "read_file", path="blob.bin") == "error: read_file: blob.bin is a binary file"


# ------------------------------------------------------------------------------------- apply_patch
PATCH = """\
diff --git a/src/lib.rs b/src/lib.rs
--- a/src/lib.rs
+++ b/src/lib.rs
@@ -1,3 +1,3 @@
 pub fn add(a: i32, b: i32) -> i32 {
-    a + b
+    a.wrapping_add(b)
 }
@@ -20,3 +20,3 @@
     fn wrong() {
-        assert_eq!(add(2, 2), 5);
+        assert_eq!(add(2, 2), 4);
     }
--- /dev/null
+++ b/src/extra.rs
@@ -0,0 +1,2 @@
+// new file
+pub const X: u8 = 1;
"""


def test_apply_patch_modifies_and_creates(env, crate):
    out = call(env, "apply_patch", patch=PATCH)
    assert out.splitlines() == ["patched src/lib.rs (2 hunk(s))", "created src/extra.rs (1 hunk(s))"]
    lib = (crate / "src" / "lib.rs").read_text()
    assert "a.wrapping_add(b)" in lib and "assert_eq!(add(2, 2), 4);" in lib and "a + b" not in lib
    assert lib.endswith("}\n")
    assert (crate / "src" / "extra.rs").read_text() == "// new file\npub const X: u8 = 1;\n"


def test_apply_patch_tolerates_wrong_line_numbers_and_deletes(env, crate):
    shifted = PATCH.replace("@@ -20,3 +20,3 @@", "@@ -12,3 +12,3 @@").split("--- /dev/null")[0]
    assert call(env, "apply_patch", patch=shifted) == "patched src/lib.rs (2 hunk(s))"
    assert "assert_eq!(add(2, 2), 4);" in (crate / "src" / "lib.rs").read_text()
    deletion = "--- a/Cargo.toml\n+++ /dev/null\n@@ -1,1 +0,0 @@\n-[package]\n"
    assert call(env, "apply_patch", patch=deletion) == "deleted Cargo.toml"
    assert not (crate / "Cargo.toml").exists()


def test_apply_patch_is_all_or_nothing(env, crate):
    bad_second = PATCH.replace("-        assert_eq!(add(2, 2), 5);", "-        assert_eq!(add(7, 7), 5);")
    out = call(env, "apply_patch", patch=bad_second)
    assert out.startswith("error: apply_patch: src/lib.rs: hunk 2 (@@ -20,3 +20,3 @@) does not apply")
    assert (crate / "src" / "lib.rs").read_text() == LIB
    assert not (crate / "src" / "extra.rs").exists()


@pytest.mark.parametrize(
    ("patch", "message"),
    [
        ("just some text", "no file headers found"),
        ("@@ -1 +1 @@\n-a\n+b\n", "hunk before any"),
        ("--- a/src/lib.rs\n+++ b/src/lib.rs\n@@ bogus @@\n", "bad hunk header"),
        ("--- a/../../etc/passwd\n+++ b/../../etc/passwd\n@@ -1 +1 @@\n-a\n+b\n", "outside the workspace"),
        ("--- a/missing.rs\n+++ b/missing.rs\n@@ -1 +1 @@\n-a\n+b\n", "missing.rs: no such file to patch"),
        ("--- /dev/null\n+++ b/Cargo.toml\n@@ -0,0 +1 @@\n+x\n", "already exists"),
    ],
)
def test_apply_patch_bad_diffs(env, patch, message):
    out = call(env, "apply_patch", patch=patch)
    assert out.startswith("error: apply_patch:") and message in out, out


def test_apply_patch_no_newline_at_end(env, crate):
    (crate / "notes.txt").write_text("one\ntwo")
    patch = "--- a/notes.txt\n+++ b/notes.txt\n@@ -1,2 +1,2 @@\n one\n-two\n\\ No newline at end of file\n+three\n"
    assert call(env, "apply_patch", patch=patch) == "patched notes.txt (1 hunk(s))"
    assert (crate / "notes.txt").read_text() == "one\nthree\n"


# ------------------------------------------------------------------------------------------ search
def test_search_prints_path_line_text(env):
    assert call(env, "search", pattern=r"fn \w+\(a") == "src/lib.rs:1:pub fn add(a: i32, b: i32) -> i32 {"
    assert call(env, "search", pattern="ADD", ignore_case=True, glob="*.rs").count("src/lib.rs:") == 4
    assert call(env, "search", pattern="fn", max_results=2).splitlines()[-1].startswith("... (stopped at 2")
    assert call(env, "search", pattern="package", glob="*.rs") == "no matches for 'package'"
    assert call(env, "search", pattern="(unclosed").startswith("error: search: invalid regex '(unclosed'")


def test_search_with_catastrophic_regex_times_out(env, crate, monkeypatch):
    monkeypatch.setattr(tools, "SEARCH_TIMEOUT_S", 1.0)
    (crate / "src" / "a.txt").write_text("a" * 40 + "!\n")
    assert call(env, "search", pattern="(a+)+$").startswith("error: search: search timed out after 1 s")


# ------------------------------------------------------------------------------------------- cargo
@needs_sandbox
def test_cargo_check_reports_precise_errors(env, crate):
    (crate / "src" / "lib.rs").write_text(LIB.replace("    a + b\n", '    "a + b"\n'))
    out = call(env, "cargo_check")
    assert out.splitlines()[0] == "cargo check: build FAILED (1 error(s), 0 warning(s))"
    assert "src/lib.rs:2:5: error[E0308]: mismatched types" in out.splitlines()
    assert "expected `i32`, found `&str`" in out
    assert env.last_report is not None and not env.last_report.compiled


@needs_sandbox
def test_cargo_check_ok_with_warning(env, crate):
    (crate / "src" / "lib.rs").write_text(LIB.replace("    a + b\n", "    let spare = 1;\n    a + b\n"))
    out = call(env, "cargo_check")
    assert out.splitlines()[0] == "cargo check: ok (0 error(s), 1 warning(s))"
    assert "src/lib.rs:2:9: warning[unused_variables]: unused variable: `spare`" in out.splitlines()
    assert "    help: if this is intentional, prefix it with an underscore (suggested: `_spare`)" in out
    assert "on by default" not in out  # lint-level boilerplate is dropped


@needs_sandbox
def test_cargo_test_results_and_filter(env):
    out = call(env, "cargo_test")
    lines = out.splitlines()
    assert lines[0] == "cargo test: FAILED. 1 passed; 1 failed; 0 ignored (0 error(s), 0 warning(s))"
    assert "test tests::adds ... ok" in lines and "test tests::wrong ... FAILED" in lines
    assert "---- tests::wrong stdout ----" in lines and "  left: 4" in lines
    report = env.last_report
    assert (report.passed, report.failed, report.compiled) == (1, 1, True)
    only = call(env, "cargo_test", test_name="tests::adds")
    assert only.splitlines()[0].startswith("cargo test: ok. 1 passed; 0 failed")
    assert call(env, "cargo_test", test_name="--nocapture").startswith("error: cargo_test: test_name '--nocapture'")


@needs_sandbox
def test_cargo_test_compile_error_in_tests(env, crate):
    (crate / "src" / "lib.rs").write_text(LIB.replace("assert_eq!(add(1, 2), 3);", "assert_eq!(add(1), 3);"))
    out = call(env, "cargo_test")
    assert out.startswith("cargo test: build FAILED (1 error(s)")
    assert "src/lib.rs:16:20: error[E0061]: this function takes 2 arguments but 1 argument was supplied" in out


@needs_sandbox
def test_cargo_manifest_error_is_shown(env, crate):
    (crate / "Cargo.toml").write_text(MANIFEST + 'no_such_crate_xyz = "1"\n')
    out = call(env, "cargo_check")
    assert out.startswith("cargo check: build FAILED (0 error(s)")
    assert "no matching package named `no_such_crate_xyz` found" in out


@needs_sandbox
def test_cargo_clippy_lints(env, sandbox):
    if not sandbox.has_tool("cargo-clippy"):
        pytest.skip("clippy not installed")
    out = call(env, "cargo_clippy")
    assert out.startswith("cargo clippy: ok (0 error(s), ")
    assert (
        "src/lib.rs:7:8: warning[clippy::bool_comparison]: equality checks against true are unnecessary"
        in out.splitlines()
    )


# ---------------------------------------------------------------------------------- parser, offline
def fake_run(stdout: str, stderr: str = "", returncode: int = 101) -> RunResult:
    return RunResult(returncode, stdout, stderr, timed_out=False, truncated=False, killed_by_signal=None, wall_s=0.1)


def test_parser_counts_crashed_test_binary_as_failures():
    lines = [
        '{"reason":"build-finished","success":true}',
        "running 3 tests",
        "test a ... ok",
        '{"reason":"compiler-mess',  # cut by output truncation: ignored
    ]
    stdout = "\n".join(lines)
    report = parse_cargo_output("test", fake_run(stdout, "error: test failed\n(signal: 6, SIGABRT)"))
    assert report.compiled and (report.passed, report.failed, report.crashed_binaries) == (0, 2, 1)
    assert [t.status for t in report.tests] == ["ok"]
    assert "1 test binary crashed" in report.summary()


def test_parser_sums_several_test_binaries_and_ignored():
    lines = [
        '{"reason":"build-finished","success":true}',
        "running 2 tests", "test a ... ok", "test b ... ignored, slow",
        "test result: ok. 1 passed; 0 failed; 1 ignored; 0 measured; 0 filtered out; finished in 0.00s",
        "running 1 test", "test src/lib.rs - f (line 3) ... ok",
        "test result: ok. 1 passed; 0 failed; 0 ignored; 0 measured; 0 filtered out; finished in 0.01s",
    ]  # fmt: skip
    stdout = "\n".join(lines)
    report = parse_cargo_output("test", fake_run(stdout, returncode=0))
    assert (report.passed, report.failed, report.ignored, report.total) == (2, 0, 1, 2)
    headline = report.summary().splitlines()[0]
    assert headline == "cargo test: ok. 2 passed; 0 failed; 1 ignored (0 error(s), 0 warning(s))"


def test_parser_without_build_finished_uses_exit_code():
    timed_out = RunResult(-9, "", "", timed_out=True, truncated=False, killed_by_signal=9, wall_s=60.0)
    report = parse_cargo_output("test", timed_out)
    assert not report.compiled and report.summary().startswith("cargo test: timed out")


def test_output_is_truncated_to_budget(crate, sandbox):
    env = ToolEnv(crate, sandbox, max_output_chars=300)
    (crate / "big.txt").write_text("\n".join(f"line {i}" for i in range(300)))
    out = call(env, "read_file", path="big.txt")
    assert len(out) < 400 and "characters truncated" in out and out.startswith("    1  line 0")
