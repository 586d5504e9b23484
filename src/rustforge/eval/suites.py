"""Evaluation suites: the problems `rustforge eval` samples, and how a problem's answer is put together.

- `crate_tasks`: the mined Rust tasks (rust/tasks.py) of the held-out split. Tasks are split by crate name
  with the corpus' seeded hash (data/corpus.assign_splits, the `split` field of each task record), so no
  crate of the `val` split was seen in training (lang_rust's corpus uses the same hash and seed). A problem
  is a real crate with one mutated function and tests that fail; solved = every test passes.
- `humaneval_rust`: HumanEval-style Rust problems from a JSONL file the user supplies (no copy is
  available offline here). Two layouts are read, one record per line:
  * MultiPL-E's Rust (`nuprl/MultiPL-E`, "humaneval-rs"): `name`, `prompt` (doc comment + signature,
    ending inside the function body), `tests` (starting with the `}` that closes the function, then
    `fn main` with assertions), `stop_tokens` (["\\n}"]); other fields (language, doctests, ...) are kept
    in `extra`. The program is prompt + completion (cut at the first stop token) + tests.
  * HumanEval-Rust / HumanEval-X style: `task_id`, `prompt`, `test` (usually a `#[cfg(test)] mod tests`),
    optional `declaration` (prepended to the prompt), `entry_point`, `canonical_solution`.
  Errors name the file, the line and the field.

Assembling a program (`ProgramProblem.program`): a chat model answers with the whole function (its
`fn <entry_point>` is in the code), which replaces the prompt; an answer without it is a continuation of the
body (the classic completion format). The program then lives in `src/main.rs` of a scratch crate
(`write_program_crate`); its `fn main` (MultiPL-E's assertions) is run by a #[test] the harness adds, so one
`cargo test` in the sandbox answers both "does it compile" and "does it pass", as for crate tasks.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass, field
from pathlib import Path

SUITES = ("crate_tasks", "humaneval_rust")
SUITE_ALIASES = {"multipl_e": "humaneval_rust", "multiple_rs": "humaneval_rust", "humaneval": "humaneval_rust"}
MAIN_TEST_NAME = "rustforge_eval_main"
PROGRAM_MANIFEST = '[package]\nname = "eval_problem"\nversion = "0.1.0"\nedition = "2021"\n\n[dependencies]\n'
_FN_NAME = re.compile(r"\bfn\s+(?:r#)?([A-Za-z_]\w*)\s*[<(]")
_MAIN = re.compile(r"(?m)^\s*(?:pub\s+)?fn\s+main\s*\(")
_USE_LINE = re.compile(r"(?m)^\s*use\s+[^;]+;\s*$")


class SuiteError(ValueError):
    """A suite file or directory cannot be read; the message names the file, line and field."""


# ============================================================================================ problems
@dataclass
class ProgramProblem:
    """A HumanEval-style problem: complete a function; hidden tests call it."""

    id: str
    prompt: str  # code shown to the model: doc comment + signature (MultiPL-E: ending inside the body)
    tests: str
    stop_tokens: list[str]
    entry_point: str
    canonical_solution: str | None = None
    source: str = ""  # file:line
    extra: dict = field(default_factory=dict)

    @property
    def tests_close_function(self) -> bool:
        """MultiPL-E's tests start with the `}` that closes the prompt's function."""
        return self.tests.lstrip().startswith("}")

    def closed_tests(self) -> str:
        """The tests for a program whose function is already closed (MultiPL-E's leading `}` dropped)."""
        text = self.tests.lstrip()
        return text[1:] if self.tests_close_function else self.tests

    def open_prompt(self) -> bool:
        """The prompt ends inside the function body (a completion continues it)."""
        return self.prompt.rstrip().endswith("{")

    def stub(self) -> str:
        """The prompt with a `todo!()` body: the agentic mode's starting src/lib.rs."""
        if not self.open_prompt():
            return self.prompt
        return self.prompt.rstrip() + "\n    todo!()\n}\n"

    def program(self, code: str) -> str:
        """The whole program for an answer: a whole function replaces the prompt (the prompt's `use` lines
        the code lacks are kept), a body continues it."""
        if defines_function(code, self.entry_point):
            uses = [u.strip() for u in _USE_LINE.findall(self.prompt) if u.strip() not in code]
            head = "\n".join(uses) + "\n\n" if uses else ""
            return f"{head}{code.rstrip()}\n\n{self.closed_tests().lstrip()}"
        body = truncate_at_stop(code, self.stop_tokens)
        if self.tests_close_function:
            return f"{self.prompt}{body}{self.tests}"
        return f"{self.prompt}{body}\n{self.tests}"

    def program_from_source(self, source: str) -> str:
        """The program for a whole file the agent wrote (the function closed): the file + the tests."""
        return f"{source.rstrip()}\n\n{self.closed_tests().lstrip()}"


@dataclass
class CrateProblem:
    """A held-out mined task (rustforge.rust.tasks.Task)."""

    task: object

    @property
    def id(self) -> str:
        return self.task.id


@dataclass
class Suite:
    name: str
    problems: list  # ProgramProblem | CrateProblem
    source: str  # where it was read from


# ============================================================================================= helpers
def defines_function(code: str, name: str) -> bool:
    return any(m.group(1) == name for m in _FN_NAME.finditer(code))


def truncate_at_stop(text: str, stop_tokens: list[str]) -> str:
    """text up to the first stop token (MultiPL-E's rule for completions)."""
    cut = min((i for i in (text.find(s) for s in stop_tokens if s) if i >= 0), default=len(text))
    return text[:cut]


_FENCE = re.compile(r"```[ \t]*([\w+-]*)[^\n]*\n(.*?)(?:```|\Z)", re.DOTALL)


def extract_code(text: str) -> str:
    """The code of an answer: the first ```rust (or ```rs) fenced block, else the first fenced block of any
    language, else the whole text (a bare-code answer). An unterminated fence runs to the end."""
    blocks = [(m.group(1).lower(), m.group(2)) for m in _FENCE.finditer(text)]
    for lang, body in blocks:
        if lang in ("rust", "rs"):
            return body
    return blocks[0][1] if blocks else text.strip("\n")


def with_main_test(program: str) -> str:
    """src/main.rs for `cargo test`: a #[test] that runs the program's `fn main` (MultiPL-E's assertions),
    or an empty main when the program has none (tests in a `mod tests` run as they are)."""
    if _MAIN.search(program):
        return f"{program.rstrip()}\n\n#[cfg(test)]\n#[test]\nfn {MAIN_TEST_NAME}() {{\n    main();\n}}\n"
    return f"{program.rstrip()}\n\n#[allow(dead_code)]\nfn main() {{}}\n"


def write_program_crate(directory: str | Path, program: str) -> Path:
    """A scratch crate (no dependencies) whose src/main.rs is `with_main_test(program)`."""
    root = Path(directory)
    (root / "src").mkdir(parents=True, exist_ok=True)
    (root / "Cargo.toml").write_text(PROGRAM_MANIFEST)
    (root / "src" / "main.rs").write_text(with_main_test(program))
    return root


def write_stub_crate(directory: str | Path, problem: ProgramProblem) -> Path:
    """The agentic mode's workspace: a library crate whose src/lib.rs is the problem's stub."""
    root = Path(directory)
    (root / "src").mkdir(parents=True, exist_ok=True)
    (root / "Cargo.toml").write_text(PROGRAM_MANIFEST)
    (root / "src" / "lib.rs").write_text(problem.stub())
    return root


# ============================================================================================= loaders
def canonical_suite_name(name: str) -> str:
    name = SUITE_ALIASES.get(name, name)
    if name not in SUITES:
        raise SuiteError(f"eval suite {name!r}: expected one of {SUITES} (aliases: {sorted(SUITE_ALIASES)})")
    return name


def load_suite(name: str, data: str | Path | None, split: str = "val") -> Suite:
    """Suite `name` from `data` (crate_tasks: a mined tasks dir; humaneval_rust: a JSONL file)."""
    name = canonical_suite_name(name)
    if data is None:
        raise SuiteError(f"eval suite {name}: no data given (eval.data / --data: "
                         f"{'a mined tasks directory' if name == 'crate_tasks' else 'a JSONL file'})")  # fmt: skip
    if name == "crate_tasks":
        return load_crate_tasks(data, split)
    return load_humaneval_rust(data)


def load_crate_tasks(tasks_dir: str | Path, split: str = "val") -> Suite:
    """The mined tasks of `split` (default: the held-out crates)."""
    from rustforge.rust.tasks import TaskError, load_tasks

    try:
        tasks = load_tasks(tasks_dir, split)
    except (TaskError, ValueError) as e:
        raise SuiteError(f"crate_tasks: {e}") from None
    if not tasks:
        raise SuiteError(f"crate_tasks: {Path(tasks_dir) / 'tasks.jsonl'} holds no task of split {split!r}")
    return Suite("crate_tasks", [CrateProblem(t) for t in tasks], str(tasks_dir))


def load_humaneval_rust(path: str | Path) -> Suite:
    """HumanEval-style Rust problems from a JSONL file (see the module docstring for the layouts)."""
    path = Path(path)
    if not path.is_file():
        raise SuiteError(f"{path}: HumanEval-Rust JSONL file not found")
    problems: list[ProgramProblem] = []
    seen: dict[str, int] = {}
    for number, line in enumerate(path.read_text(encoding="utf-8").splitlines(), start=1):
        if not line.strip():
            continue
        where = f"{path}:{number}"
        try:
            record = json.loads(line)
        except json.JSONDecodeError as e:
            raise SuiteError(f"{where}: not valid JSON: {e}") from None
        if not isinstance(record, dict):
            raise SuiteError(f"{where}: expected a JSON object, got {type(record).__name__}")
        problem = program_problem(record, where)
        if problem.id in seen:
            raise SuiteError(f"{where}: field 'name': duplicate problem id {problem.id!r} (first on line {seen[problem.id]})")
        seen[problem.id] = number
        problems.append(problem)
    if not problems:
        raise SuiteError(f"{path}: no problems")
    return Suite("humaneval_rust", problems, str(path))


def _field(record: dict, names: tuple[str, ...], where: str, required: bool = True) -> str | None:
    for name in names:
        if name in record:
            value = record[name]
            if not isinstance(value, str):
                raise SuiteError(f"{where}: field {name!r} must be a string, got {type(value).__name__}")
            if required and not value.strip():
                raise SuiteError(f"{where}: field {name!r} is empty")
            return value
    if required:
        raise SuiteError(f"{where}: missing field {' or '.join(repr(n) for n in names)}")
    return None


def program_problem(record: dict, where: str = "<record>") -> ProgramProblem:
    """One JSONL record (MultiPL-E or HumanEval-Rust layout) as a ProgramProblem."""
    pid = _field(record, ("name", "task_id"), where)
    prompt = _field(record, ("prompt",), where)
    declaration = _field(record, ("declaration",), where, required=False)
    if declaration and declaration.strip() not in prompt:
        prompt = declaration + prompt
    tests = _field(record, ("tests", "test"), where)
    stops = record.get("stop_tokens")
    if stops is None:
        stops = ["\n}"] if tests.lstrip().startswith("}") else []
    if not isinstance(stops, list) or not all(isinstance(s, str) and s for s in stops):
        raise SuiteError(f"{where}: field 'stop_tokens' must be a list of non-empty strings, got {stops!r}")
    entry = _field(record, ("entry_point",), where, required=False)
    if entry is None:
        names = [m.group(1) for m in _FN_NAME.finditer(prompt) if m.group(1) != "main"]
        if not names:
            raise SuiteError(f"{where}: field 'prompt' defines no function (and there is no 'entry_point')")
        entry = names[-1]
    elif not defines_function(prompt, entry):
        raise SuiteError(f"{where}: field 'entry_point' = {entry!r} is not a function of the prompt")
    canonical = _field(record, ("canonical_solution",), where, required=False)
    known = {"name", "task_id", "prompt", "declaration", "tests", "test", "stop_tokens", "entry_point", "canonical_solution"}
    extra = {k: v for k, v in record.items() if k not in known}
    return ProgramProblem(pid, prompt, tests, list(stops), entry, canonical, where, extra)


__all__ = [
    "MAIN_TEST_NAME",
    "SUITES",
    "CrateProblem",
    "ProgramProblem",
    "Suite",
    "SuiteError",
    "canonical_suite_name",
    "defines_function",
    "extract_code",
    "load_crate_tasks",
    "load_humaneval_rust",
    "load_suite",
    "program_problem",
    "truncate_at_stop",
    "with_main_test",
    "write_program_crate",
    "write_stub_crate",
]
