"""The function-calling tools a Rust agent sees, and the parser that turns cargo output into short facts.

Tools: list_files, read_file, write_file, apply_patch, search, cargo_check, cargo_test and (when the
toolchain ships clippy) cargo_clippy. Each takes a JSON object of arguments and returns plain text,
truncated to a budget; bad arguments (missing field, wrong type, path outside the workspace, a diff that
does not apply) come back as a readable "error: ..." string, never as an exception.

Cargo runs go through rustforge.rust.sandbox with `--message-format=json`; `parse_cargo_output` reduces
the JSON diagnostics and libtest's text to lines such as
    src/lib.rs:12:5: error[E0308]: mismatched types
    test tests::parses ... FAILED
plus counts, in a `CargoReport` that the rewards reuse. The unified-diff applier and the regex search are
own code: a small, strict applier gives precise errors (which hunk, which line), and the search runs in a
child process with a deadline so a pathological regex from the model cannot hang the trainer.
`tool_definitions()` gives JSON-schema function definitions (name, description, parameters) for the
Harmony developer message.
"""

from __future__ import annotations

import json
import logging
import os
import re
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from rustforge.rust.sandbox import SANDBOX_WORKSPACE, RunResult, Sandbox, SandboxUnavailable

log = logging.getLogger(__name__)

SKIPPED_DIRS = frozenset({".git", "target", ".hg", ".svn"})
MAX_WRITE_BYTES = 1_000_000
MAX_READ_LINES = 400
SEARCH_TIMEOUT_S = 10.0
TEST_NAME = re.compile(r"^[A-Za-z0-9_:]+$")


class ToolError(Exception):
    """A problem with the model's request; shown to the model as "error: <tool>: <message>"."""


# ================================================================================== cargo reports
@dataclass
class Diagnostic:
    level: str  # "error" | "warning" | ...
    message: str
    code: str | None = None
    file: str | None = None
    line: int | None = None
    column: int | None = None
    notes: list[str] = field(default_factory=list)  # primary span label, then "help: ..." / "note: ..."

    def header(self) -> str:
        kind = f"{self.level}[{self.code}]" if self.code else self.level
        where = f"{self.file}:{self.line}:{self.column}: " if self.file else ""
        return f"{where}{kind}: {self.message}"


@dataclass
class TestCase:
    name: str
    status: str  # "ok" | "FAILED" | "ignored"


@dataclass
class CargoReport:
    command: str  # "check" | "test" | "clippy" | "build"
    returncode: int = 0
    compiled: bool = False  # the build (all targets asked for) finished without errors
    timed_out: bool = False
    diagnostics: list[Diagnostic] = field(default_factory=list)
    tests: list[TestCase] = field(default_factory=list)
    passed: int = 0
    failed: int = 0
    ignored: int = 0
    failure_output: list[str] = field(default_factory=list)  # "---- name stdout ----" sections
    cargo_errors: list[str] = field(default_factory=list)  # cargo's own errors (manifest, resolution)
    crashed_binaries: int = 0  # test binaries that died before reporting their results

    @property
    def total(self) -> int:
        return self.passed + self.failed

    @property
    def errors(self) -> list[Diagnostic]:
        return [d for d in self.diagnostics if d.level == "error"]

    @property
    def warnings(self) -> list[Diagnostic]:
        return [d for d in self.diagnostics if d.level == "warning"]

    def summary(self, max_diagnostics: int = 30, list_passing_up_to: int = 30) -> str:
        """Short text for the agent: headline, diagnostics, test lines, failure output."""
        lines = [self._headline()]
        if not self.compiled and not self.errors:  # e.g. a manifest or dependency-resolution error
            lines += self.cargo_errors
        shown = (self.errors + self.warnings)[:max_diagnostics]
        for diag in shown:
            lines.append(diag.header())
            lines += [f"    {note}" for note in diag.notes]
        if len(self.diagnostics) > len(shown):
            lines.append(f"... {len(self.diagnostics) - len(shown)} more diagnostics")
        list_all = len(self.tests) <= list_passing_up_to
        lines += [f"test {t.name} ... {t.status}" for t in self.tests if list_all or t.status != "ok"]
        if self.failure_output:
            lines += ["", "failures:"] + self.failure_output
        return "\n".join(lines)

    def _headline(self) -> str:
        if self.timed_out:
            return f"cargo {self.command}: timed out (killed); compiled={self.compiled}"
        counts = f"{len(self.errors)} error(s), {len(self.warnings)} warning(s)"
        if not self.compiled:
            return f"cargo {self.command}: build FAILED ({counts})"
        if self.command != "test":
            return f"cargo {self.command}: ok ({counts})"
        verdict = "ok" if self.failed == 0 and self.returncode == 0 else "FAILED"
        crashed = f"; {self.crashed_binaries} test binary crashed" if self.crashed_binaries else ""
        return (
            f"cargo test: {verdict}. {self.passed} passed; {self.failed} failed; {self.ignored} ignored "
            f"({counts}){crashed}"
        )


_TEST_LINE = re.compile(r"^test (.+?) \.\.\. (ok|FAILED|ignored.*)$")
_RUNNING = re.compile(r"^running (\d+) tests?$")
_RESULT = re.compile(r"^test result: \w+\. (\d+) passed; (\d+) failed; (\d+) ignored")
_CARGO_ECHO = re.compile(r"^error: (could not compile|test failed|\d+ targets? failed)")
_BOILERPLATE = re.compile(r"^(`#\[(warn|deny|forbid)\(.*on by default|for further information visit )")
_NOISE = re.compile(r"^(aborting due to|could not compile|\d+ warnings? emitted|For more information)")


def parse_cargo_output(command: str, result: RunResult) -> CargoReport:
    """Reduce `cargo <command> --message-format=json` output (stdout JSON + libtest text) to a report."""
    report = CargoReport(command=command, returncode=result.returncode, timed_out=result.timed_out)
    build_finished: bool | None = None
    seen: set[tuple] = set()
    text_lines = []
    for raw in result.stdout.splitlines():
        if not raw.startswith("{"):
            text_lines.append(raw)
            continue
        try:
            msg = json.loads(raw)
        except json.JSONDecodeError:
            continue  # a line cut by output truncation
        if msg.get("reason") == "build-finished":
            build_finished = bool(msg.get("success"))
        elif msg.get("reason") == "compiler-message":
            diag = _diagnostic(msg.get("message") or {})
            key = (diag.level, diag.code, diag.message, diag.file, diag.line, diag.column) if diag else None
            if diag is not None and key not in seen:  # --all-targets compiles the lib twice
                seen.add(key)
                report.diagnostics.append(diag)
    _parse_libtest(text_lines, report)
    report.cargo_errors = _cargo_errors(result.stderr)
    if build_finished is None:  # cargo stopped before building (manifest error) or was killed
        build_finished = result.returncode == 0 and not result.timed_out
    report.compiled = build_finished and not report.errors
    return report


def _diagnostic(message: dict) -> Diagnostic | None:
    level = message.get("level", "")
    text = message.get("message", "")
    if level not in ("error", "warning") or _NOISE.match(text):
        return None
    code = (message.get("code") or {}).get("code")
    diag = Diagnostic(level=level, message=text, code=code)
    primary = next((s for s in message.get("spans") or [] if s.get("is_primary")), None)
    if primary is not None:
        diag.file = _relative(primary.get("file_name", ""))
        diag.line, diag.column = primary.get("line_start"), primary.get("column_start")
        if primary.get("label"):
            diag.notes.append(primary["label"])
    for child in message.get("children") or []:
        if _BOILERPLATE.match(child.get("message", "")):
            continue
        note = f"{child.get('level', 'note')}: {child.get('message', '')}"
        child_span = next((s for s in child.get("spans") or [] if s.get("suggested_replacement") is not None), None)
        if child_span is not None:
            note += f" (suggested: `{child_span['suggested_replacement']}`)"
        diag.notes.append(note)
    return diag


def _relative(path: str) -> str:
    return path.removeprefix(SANDBOX_WORKSPACE + "/")


def _parse_libtest(lines: list[str], report: CargoReport) -> None:
    expected = seen = 0
    in_block = in_failure = False
    for line in lines:
        if m := _RUNNING.match(line):
            if in_block:  # previous binary never printed its result line: it crashed
                report.crashed_binaries += 1
                report.failed += max(0, expected - seen)
            expected, seen, in_block, in_failure = int(m.group(1)), 0, True, False
        elif m := _TEST_LINE.match(line):
            status = "ignored" if m.group(2).startswith("ignored") else m.group(2)
            report.tests.append(TestCase(m.group(1), status))
            seen += 1
        elif m := _RESULT.match(line):
            passed, failed, ignored = map(int, m.groups())
            report.passed, report.failed, report.ignored = (
                report.passed + passed, report.failed + failed, report.ignored + ignored,
            )  # fmt: skip
            in_block = in_failure = False
        elif line.startswith("---- ") and line.endswith(" ----"):
            in_failure = True
            report.failure_output.append(line)
        elif in_failure:
            if line == "failures:":  # the closing list of names
                in_failure = False
            else:
                report.failure_output.append(line)
    if in_block:
        report.crashed_binaries += 1
        report.failed += max(0, expected - seen)
    while report.failure_output and not report.failure_output[-1].strip():
        report.failure_output.pop()


def _cargo_errors(stderr: str) -> list[str]:
    """cargo's own error paragraphs (manifest/resolution problems), paths made workspace-relative."""
    out: list[str] = []
    capturing = False
    for line in stderr.splitlines():
        if line.startswith("error"):
            capturing = not _CARGO_ECHO.match(line)
        elif line and not line.startswith((" ", "Caused by:")) and not line[0].isspace():
            capturing = False
        if capturing:
            out.append(line.replace(SANDBOX_WORKSPACE + "/", ""))
    return out[:40]


def touch_sources(root: Path) -> None:
    """Set every file's mtime (build/VCS dirs skipped, symlinks not followed) to now."""
    now = time.time()
    for path in _walk_files(root):
        os.utime(path, (now, now), follow_symlinks=False)


def run_cargo(
    sandbox: Sandbox,
    workspace: Path,
    command: str,
    extra_args: list[str] | tuple[str, ...] = (),
    target_dir: Path | None = None,
) -> CargoReport:
    """`cargo <command>` in the sandbox, parsed. check/clippy cover all targets; test doesn't stop early.

    With a target dir that other crates share, the sources are touched first: cargo judges a local
    crate fresh by mtime, and every crate sits at the same sandbox path (/workspace), so an older source
    tree would otherwise get another crate's binary.
    """
    if target_dir is not None:
        touch_sources(workspace)
    args = ["--message-format=json"]
    if command in ("check", "clippy"):
        args.append("--all-targets")
    if command == "test":
        args.append("--no-fail-fast")
    result = sandbox.cargo(workspace, command, args + list(extra_args), target_dir=target_dir)
    return parse_cargo_output(command, result)


# ========================================================================================== tools
@dataclass(frozen=True)
class Tool:
    name: str
    description: str
    parameters: dict  # JSON schema of the arguments object
    fn: Callable[[ToolEnv, dict], str]

    def definition(self) -> dict:
        return {"name": self.name, "description": self.description, "parameters": self.parameters}


def _schema(properties: dict, required: list[str]) -> dict:
    return {"type": "object", "properties": properties, "required": required, "additionalProperties": False}


_PATH = {"type": "string", "description": "path relative to the crate root"}


class ToolEnv:
    """The tools bound to one workspace (the crate root) and a sandbox for cargo."""

    def __init__(
        self,
        workspace: Path,
        sandbox: Sandbox,
        target_dir: Path | None = None,
        max_output_chars: int = 8000,
        enable_clippy: bool | None = None,  # None: when the toolchain ships cargo-clippy
    ):
        self.workspace = Path(workspace).resolve()
        if not self.workspace.is_dir():
            raise ValueError(f"workspace: {workspace} is not a directory")
        self.sandbox = sandbox
        self.target_dir = target_dir
        self.max_output_chars = max_output_chars
        if enable_clippy is None:
            enable_clippy = sandbox.has_tool("cargo-clippy")
        self.tools = {t.name: t for t in all_tools(include_clippy=enable_clippy)}
        self.last_report: CargoReport | None = None

    def definitions(self) -> list[dict]:
        return [t.definition() for t in self.tools.values()]

    def call(self, name: str, arguments_json: str | dict) -> str:
        """Run tool `name` with JSON arguments; always returns text (errors start with "error:")."""
        tool = self.tools.get(name)
        if tool is None:
            return f"error: unknown tool {name!r}; available: {', '.join(self.tools)}"
        try:
            args = _parse_arguments(arguments_json)
            _validate(tool.parameters, args)
            output = tool.fn(self, args)
        except ToolError as e:
            return f"error: {name}: {e}"
        except SandboxUnavailable:
            raise  # the machine is misconfigured: not the model's problem to solve
        except (OSError, ValueError) as e:
            return f"error: {name}: {e}"
        return _truncate(output, self.max_output_chars)

    # -------------------------------------------------------------------------------------- paths
    def resolve(self, path: str, must_exist: bool = False) -> Path:
        """Workspace path for `path`; refuses anything (.., absolute, symlinks) that leaves it."""
        if "\x00" in path:
            raise ToolError("path contains a NUL byte")
        raw = Path(path)
        if raw.is_absolute():
            inside = Path(SANDBOX_WORKSPACE)
            raw = raw.relative_to(inside) if raw.is_relative_to(inside) else raw
        resolved = (self.workspace / raw).resolve()
        if not resolved.is_relative_to(self.workspace):
            raise ToolError(f"path {path!r} is outside the workspace")
        if must_exist and not resolved.exists():
            raise ToolError(f"{path}: no such file or directory")
        return resolved

    def display(self, path: Path) -> str:
        rel = path.relative_to(self.workspace).as_posix()
        return rel or "."

    def cargo(self, command: str, extra_args: list[str] | tuple[str, ...] = ()) -> str:
        report = run_cargo(self.sandbox, self.workspace, command, extra_args, self.target_dir)
        self.last_report = report
        return report.summary()


def _parse_arguments(arguments: str | dict) -> dict:
    if isinstance(arguments, dict):
        return arguments
    if not isinstance(arguments, str):
        raise ToolError(f"arguments must be a JSON object, got {type(arguments).__name__}")
    if not arguments.strip():
        return {}
    try:
        value = json.loads(arguments)
    except json.JSONDecodeError as e:
        raise ToolError(f"arguments are not valid JSON ({e.msg} at position {e.pos})") from None
    if not isinstance(value, dict):
        raise ToolError(f"arguments must be a JSON object, got {type(value).__name__}")
    return value


_JSON_TYPES = {"string": (str,), "integer": (int,), "boolean": (bool,)}


def _validate(schema: dict, args: dict) -> None:
    props = schema["properties"]
    missing = [name for name in schema.get("required", []) if name not in args]
    if missing:
        raise ToolError(f"missing required argument(s): {', '.join(missing)}")
    unknown = sorted(set(args) - set(props))
    if unknown:
        raise ToolError(f"unknown argument(s): {', '.join(unknown)}; expected: {', '.join(props)}")
    for name, value in args.items():
        spec = props[name]
        kinds = _JSON_TYPES[spec["type"]]
        if not isinstance(value, kinds) or (spec["type"] == "integer" and isinstance(value, bool)):
            raise ToolError(f"argument {name!r} must be {spec['type']}, got {json.dumps(value)[:60]}")
        if "minimum" in spec and value < spec["minimum"]:
            raise ToolError(f"argument {name!r} must be >= {spec['minimum']}, got {value}")


def _truncate(text: str, limit: int) -> str:
    if len(text) <= limit:
        return text
    head = text[: limit * 2 // 3]
    tail = text[-(limit - len(head)) :]
    return f"{head}\n[... {len(text) - len(head) - len(tail)} characters truncated ...]\n{tail}"


def split_lines(text: str) -> list[str]:
    """Lines as rustc counts them: only \n ends a line (str.splitlines also splits on \f, \x1c, ...)."""
    lines = text.split("\n")
    return lines[:-1] if lines and lines[-1] == "" else lines


def _walk_files(root: Path):
    """Files under root, sorted, skipping build/VCS dirs and never following symlinked dirs."""
    for dirpath, dirnames, filenames in os.walk(root, followlinks=False):
        dirnames[:] = sorted(d for d in dirnames if d not in SKIPPED_DIRS)
        for name in sorted(filenames):
            yield Path(dirpath) / name


# --------------------------------------------------------------------------------- tool functions
def _list_files(env: ToolEnv, args: dict) -> str:
    root = env.resolve(args.get("path", "."), must_exist=True)
    if root.is_file():
        return env.display(root)
    limit = 500
    files = []
    for path in _walk_files(root):
        files.append(env.display(path) + ("@" if path.is_symlink() else ""))
        if len(files) > limit:
            break
    if not files:
        return f"{env.display(root)}: no files"
    more = f"\n... (more than {limit} files; list a subdirectory)" if len(files) > limit else ""
    return "\n".join(files[:limit]) + more


def _read_file(env: ToolEnv, args: dict) -> str:
    path = env.resolve(args["path"], must_exist=True)
    if path.is_dir():
        raise ToolError(f"{args['path']} is a directory; use list_files")
    data = path.read_bytes()
    if b"\x00" in data[:8192]:
        raise ToolError(f"{args['path']} is a binary file")
    lines = split_lines(data.decode("utf-8", errors="replace"))
    start = args.get("start_line", 1)
    end = min(args.get("end_line", len(lines)), len(lines))
    if not lines:
        return f"{env.display(path)}: empty file"
    if start > len(lines):
        raise ToolError(f"start_line {start} is past the end of {env.display(path)} ({len(lines)} lines)")
    if end < start:
        raise ToolError(f"end_line {end} is before start_line {start}")
    end = min(end, start + MAX_READ_LINES - 1)
    body = "\n".join(f"{n:>5}  {lines[n - 1]}" for n in range(start, end + 1))
    footer = ""
    if start > 1 or end < len(lines):
        footer = f"\n(lines {start}-{end} of {len(lines)}; use start_line/end_line for more)"
    return body + footer


def _write_file(env: ToolEnv, args: dict) -> str:
    path = env.resolve(args["path"])
    content = args["content"]
    if len(content.encode()) > MAX_WRITE_BYTES:
        raise ToolError(f"content is larger than {MAX_WRITE_BYTES} bytes")
    if path.is_dir():
        raise ToolError(f"{args['path']} is a directory")
    path.parent.mkdir(parents=True, exist_ok=True)
    existed = path.exists()
    path.write_text(content)
    verb = "overwrote" if existed else "created"
    return f"{verb} {env.display(path)} ({len(content.splitlines())} lines, {len(content.encode())} bytes)"


def _apply_patch(env: ToolEnv, args: dict) -> str:
    return apply_unified_diff(env, args["patch"])


def _search(env: ToolEnv, args: dict) -> str:
    root = env.resolve(args.get("path", "."), must_exist=True)
    pattern = args["pattern"]
    try:
        re.compile(pattern)
    except re.error as e:
        raise ToolError(f"invalid regex {pattern!r}: {e}") from None
    request = {
        "root": str(root),
        "workspace": str(env.workspace),
        "pattern": pattern,
        "ignore_case": args.get("ignore_case", False),
        "glob": args.get("glob"),
        "max_results": min(args.get("max_results", 50), 200),
    }
    code = "from rustforge.rust.tools import _search_child; _search_child()"
    try:
        out = subprocess.run(
            [sys.executable, "-c", code],
            input=json.dumps(request),
            capture_output=True,
            text=True,
            timeout=SEARCH_TIMEOUT_S,
            check=False,
            env={**os.environ, "PYTHONPATH": _package_root() + os.pathsep + os.environ.get("PYTHONPATH", "")},
        )
    except subprocess.TimeoutExpired:
        raise ToolError(f"search timed out after {SEARCH_TIMEOUT_S:.0f} s; simplify the regex") from None
    if out.returncode != 0:
        raise ToolError(f"search failed: {out.stderr.strip()[-300:]}")
    return out.stdout.rstrip("\n") or f"no matches for {pattern!r}"


def _package_root() -> str:
    return str(Path(__file__).resolve().parents[2])


def _search_child() -> None:
    """Entry point of the search subprocess: JSON request on stdin, `path:line:text` lines on stdout."""
    import fnmatch

    req = json.loads(sys.stdin.read())
    regex = re.compile(req["pattern"], re.IGNORECASE if req["ignore_case"] else 0)
    workspace, root = Path(req["workspace"]), Path(req["root"])
    files = [root] if root.is_file() else _walk_files(root)
    found = 0
    for path in files:
        if req["glob"] and not fnmatch.fnmatch(path.name, req["glob"]):
            continue
        try:
            if not path.resolve().is_relative_to(workspace) or path.stat().st_size > 2_000_000:
                continue
            data = path.read_bytes()
        except OSError:  # dangling symlink, unreadable file
            continue
        if b"\x00" in data[:8192]:
            continue
        for number, line in enumerate(split_lines(data.decode("utf-8", errors="replace")), 1):
            if regex.search(line):
                text = line if len(line) <= 200 else line[:200] + "..."
                print(f"{path.relative_to(workspace).as_posix()}:{number}:{text}")
                found += 1
                if found >= req["max_results"]:
                    print(f"... (stopped at {found} matches; narrow the pattern or path)")
                    return


def _cargo_check(env: ToolEnv, args: dict) -> str:
    return env.cargo("check")


def _cargo_test(env: ToolEnv, args: dict) -> str:
    name = args.get("test_name")
    if name is not None and not TEST_NAME.match(name):
        raise ToolError(f"test_name {name!r} must be a test path like tests::parses (letters, digits, _ and ::)")
    return env.cargo("test", ["--", name] if name else [])


def _cargo_clippy(env: ToolEnv, args: dict) -> str:
    return env.cargo("clippy")


def all_tools(include_clippy: bool = True) -> list[Tool]:
    tools = [
        Tool(
            "list_files",
            "List the files of the crate (or of a subdirectory), one path per line; target/ and .git/ are skipped.",
            _schema({"path": {**_PATH, "description": "directory to list (default: the crate root)"}}, []),
            _list_files,
        ),
        Tool(
            "read_file",
            "Read a text file; lines are shown with their 1-based numbers. At most 400 lines per call.",
            _schema(
                {
                    "path": _PATH,
                    "start_line": {"type": "integer", "minimum": 1, "description": "first line (default 1)"},
                    "end_line": {"type": "integer", "minimum": 1, "description": "last line, inclusive"},
                },
                ["path"],
            ),
            _read_file,
        ),
        Tool(
            "write_file",
            "Create or overwrite a file with the given content (parent directories are created).",
            _schema(
                {"path": _PATH, "content": {"type": "string", "description": "the full new content"}},
                ["path", "content"],
            ),
            _write_file,
        ),
        Tool(
            "apply_patch",
            "Apply a unified diff (as produced by `diff -u` or `git diff`) to files of the crate. "
            "Paths may carry a/ b/ prefixes; /dev/null creates or deletes a file. All files change or none.",
            _schema({"patch": {"type": "string", "description": "the unified diff"}}, ["patch"]),
            _apply_patch,
        ),
        Tool(
            "search",
            "Search files for a regular expression (Python/Rust syntax); prints path:line:text per match.",
            _schema(
                {
                    "pattern": {"type": "string", "description": "regular expression"},
                    "path": {**_PATH, "description": "file or directory to search (default: the crate root)"},
                    "glob": {"type": "string", "description": "only files whose name matches, e.g. *.rs"},
                    "ignore_case": {"type": "boolean"},
                    "max_results": {"type": "integer", "minimum": 1, "description": "default 50, at most 200"},
                },
                ["pattern"],
            ),
            _search,
        ),
        Tool(
            "cargo_check",
            "Type-check the crate and its tests (`cargo check --all-targets`); prints errors and warnings "
            "as file:line:col: level[code]: message.",
            _schema({}, []),
            _cargo_check,
        ),
        Tool(
            "cargo_test",
            "Build and run the tests (`cargo test`), optionally only those whose name contains test_name; "
            "prints compile errors, each test's result, failure output and the counts.",
            _schema({"test_name": {"type": "string", "description": "filter, e.g. tests::parses"}}, []),
            _cargo_test,
        ),
    ]
    if include_clippy:
        tools.append(
            Tool(
                "cargo_clippy",
                "Run the clippy linter over the crate and its tests; prints lints as file:line:col: level: message.",
                _schema({}, []),
                _cargo_clippy,
            )
        )
    return tools


def tool_definitions(include_clippy: bool | None = None) -> list[dict]:
    """JSON-schema function definitions {name, description, parameters} of the agent's tools."""
    if include_clippy is None:
        include_clippy = Sandbox().has_tool("cargo-clippy")
    return [t.definition() for t in all_tools(include_clippy)]


# =================================================================================== patch applier
@dataclass
class _Hunk:
    old_start: int  # 1-based, as in the header (0 with an empty old side: insert at the top)
    old_count: int
    header: str
    old: list[str] = field(default_factory=list)
    new: list[str] = field(default_factory=list)
    old_no_newline: bool = False  # "\ No newline at end of file" after the old side's last line
    new_no_newline: bool = False


@dataclass
class _FilePatch:
    old_path: str | None  # None = /dev/null (file is created)
    new_path: str | None  # None = /dev/null (file is deleted)
    hunks: list[_Hunk] = field(default_factory=list)


_HUNK_HEADER = re.compile(r"^@@ -(\d+)(?:,(\d+))? \+(\d+)(?:,(\d+))? @@")


def _strip_diff_path(raw: str) -> str | None:
    path = raw.split("\t")[0].strip()
    if path == "/dev/null":
        return None
    if path.startswith(("a/", "b/")):
        path = path[2:]
    return path


def parse_unified_diff(patch: str) -> list[_FilePatch]:
    lines = [line.removesuffix("\r") for line in split_lines(patch)]
    files: list[_FilePatch] = []
    i = 0
    while i < len(lines):
        line = lines[i]
        if line.startswith("--- ") and i + 1 < len(lines) and lines[i + 1].startswith("+++ "):
            files.append(_FilePatch(_strip_diff_path(line[4:]), _strip_diff_path(lines[i + 1][4:])))
            i += 2
        elif line.startswith("@@"):
            if not files:
                raise ToolError(f"line {i + 1}: hunk before any '--- a/path' / '+++ b/path' header")
            m = _HUNK_HEADER.match(line)
            if m is None:
                raise ToolError(f"line {i + 1}: bad hunk header {line!r}; expected '@@ -start,count +start,count @@'")
            old_count = int(m.group(2)) if m.group(2) is not None else 1
            i = _read_hunk(lines, i + 1, _Hunk(int(m.group(1)), old_count, line), files[-1])
        else:
            i += 1  # "diff --git", "index ...", commentary
    if not files:
        raise ToolError("no file headers found; expected a unified diff with '--- a/path' and '+++ b/path' lines")
    for fp in files:
        if not fp.hunks and fp.new_path is not None:
            raise ToolError(f"{fp.new_path}: file header without hunks")
    return files


def _read_hunk(lines: list[str], i: int, hunk: _Hunk, target: _FilePatch) -> int:
    last_side = None
    blank_tail = 0  # trailing empty (space-less) lines: blank context, or just the end of the message
    while i < len(lines):
        line = lines[i]
        next_is_new_file = i + 1 < len(lines) and lines[i + 1].startswith("+++ ")
        if line.startswith("@@") or (line.startswith("--- ") and next_is_new_file):
            break
        if line.startswith("\\"):
            if last_side in ("old", "both"):
                hunk.old_no_newline = True
            if last_side in ("new", "both"):
                hunk.new_no_newline = True
        elif line.startswith("-"):
            hunk.old.append(line[1:])
            last_side = "old"
        elif line.startswith("+"):
            hunk.new.append(line[1:])
            last_side = "new"
        elif line.startswith(" ") or line == "":  # models often drop the space of blank context lines
            hunk.old.append(line[1:])
            hunk.new.append(line[1:])
            last_side = "both"
        else:
            break  # commentary after the diff
        blank_tail = blank_tail + 1 if line == "" else 0
        i += 1
    while blank_tail and len(hunk.old) > hunk.old_count:  # beyond the header's count: not context
        hunk.old.pop()
        hunk.new.pop()
        blank_tail -= 1
    target.hunks.append(hunk)
    return i


def _find(lines: list[str], needle: list[str], around: int, loose: bool) -> int | None:
    """Index where `needle` occurs in `lines`, the one nearest `around`."""
    norm = str.rstrip if loose else str
    wanted = [norm(s) for s in needle]
    span = len(lines) - len(needle)
    for distance in range(max(span, 0) + 1 + abs(around)):
        for pos in (around - distance, around + distance) if distance else (around,):
            if 0 <= pos <= span and all(norm(lines[pos + k]) == wanted[k] for k in range(len(needle))):
                return pos
    return None


def _apply_hunks(path_label: str, text: str, hunks: list[_Hunk]) -> str:
    lines = split_lines(text)
    ends_with_newline = text.endswith("\n") or not text
    delta = 0
    for number, hunk in enumerate(hunks, 1):
        around = max(hunk.old_start - 1 + delta, 0)
        if not hunk.old:  # pure insertion after line old_start
            pos = min(max(hunk.old_start + delta, 0), len(lines))
        else:
            pos = _find(lines, hunk.old, around, loose=False)
            if pos is None:
                pos = _find(lines, hunk.old, around, loose=True)
            if pos is None:
                first = hunk.old[0]
                raise ToolError(
                    f"{path_label}: hunk {number} ({hunk.header}) does not apply: its {len(hunk.old)} "
                    f"context/removed line(s) starting with {first!r} were not found in the file"
                )
        lines[pos : pos + len(hunk.old)] = hunk.new
        delta += len(hunk.new) - len(hunk.old)
        if hunk.old_no_newline or hunk.new_no_newline:
            ends_with_newline = not hunk.new_no_newline
    out = "\n".join(lines)
    return out + "\n" if lines and ends_with_newline else out


def apply_unified_diff(env: ToolEnv, patch: str) -> str:
    """Apply every file of the diff, or none: contents are computed first, then written."""
    files = parse_unified_diff(patch)
    writes: dict[Path, str | None] = {}  # None = delete
    report = []
    for fp in files:
        label = fp.new_path or fp.old_path or "?"
        old = env.resolve(fp.old_path) if fp.old_path else None
        new = env.resolve(fp.new_path) if fp.new_path else None
        if old is not None and old in writes:
            current = writes[old]
        elif old is not None:
            if not old.is_file():
                raise ToolError(f"{fp.old_path}: no such file to patch (use /dev/null as the old path to create it)")
            current = old.read_text(errors="replace")
        else:
            if new is not None and new.exists():
                raise ToolError(f"{fp.new_path}: already exists, but the diff creates it from /dev/null")
            current = ""
        if new is None:
            writes[old] = None
            report.append(f"deleted {env.display(old)}")
            continue
        writes[new] = _apply_hunks(label, current, fp.hunks)
        if old is not None and old != new:
            writes.setdefault(old, None)
            report.append(f"renamed {env.display(old)} -> {env.display(new)}")
        else:
            verb = "created" if old is None else "patched"
            report.append(f"{verb} {env.display(new)} ({len(fp.hunks)} hunk(s))")
    for path, content in writes.items():
        if content is None:
            path.unlink(missing_ok=True)
        else:
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_text(content)
    return "\n".join(report)


__all__ = [
    "CargoReport",
    "Diagnostic",
    "TestCase",
    "Tool",
    "ToolEnv",
    "ToolError",
    "all_tools",
    "apply_unified_diff",
    "parse_cargo_output",
    "parse_unified_diff",
    "run_cargo",
    "tool_definitions",
]
