"""Bug-fix and write-this-function tasks mined from real crates by mutating one function at a time.

Pipeline, per crate (a directory with a Cargo.toml: the Debian registry's crates, or user dirs; one
version per name, smallest crates first so a time-limited run yields the most tasks):
  1. prepare a base snapshot (<out_dir>/bases/<name>-<version>/): the crate copied without Cargo.lock
     (cargo resolves offline against the registry), its dev-dependencies that the registry cannot satisfy
     removed from Cargo.toml (many crates' benches need criterion & co., which Debian doesn't package;
     if resolution still fails, e.g. quickcheck is packaged but its env_logger is not, all of them go),
     and a `.cargo/config.toml` capping lints at warn (`#![deny(warnings)]` crates would otherwise break
     on newer rustc lints, and a mutant on an unused-variable warning);
  2. baseline: `cargo test --tests` must pass with at least one test, then the full `cargo test` (doc
     tests, examples), then `--tests` once more (timed: a mutant's cost; and a flaky test shows up).
     Test and example files that no longer compile because a dev-dependency was removed are dropped
     (file and manifest entry) and the build retried; errors in library code skip the crate. The
     verdict is cached in the crate's state file;
  3. locate the functions of the library sources (own lexer-aware locator rather than `syn`, which
     would need a Rust build step in the Python pipeline: comments, strings, raw strings and char
     literals are masked, lifetimes kept, before braces are matched), outside test code (#[test],
     #[cfg(test)] items and test-module files), macro_rules! bodies and other functions' bodies;
  4. mutate ONE function per candidate: `body_removal` (body -> `todo!()`), `operator` (< <=, > >=,
     == !=, && ||, + -, += -=), `off_by_one` (decimal literal n -> n+1 / n-1, `..` <-> `..=`),
     `wrong_return` (swap a bool literal, or return a default value early). Candidates alternate
     between kinds in a seeded per-crate order, at most `max_per_function` per function;
  5. run `cargo test --tests` (doc tests skipped: each doc test is a separate compile) with a wall-clock
     limit derived from the baseline. Kept: mutants that compile and make at least one test fail, with
     the failing test names recorded. Dropped, and counted: compile errors, survivors (no test fails),
     crashes, timeouts (a mutant loop that never ends). A crate stops at `max_tasks_per_crate`, after
     `give_up_after` fruitless mutants in a row, or when its `crate_budget_s` is spent; the whole run
     starts no crate after `time_budget_s` (a re-run continues where it stopped).

Extracting single modules into fresh crates was considered and not done: a module's `use crate::...`
paths, private items of sibling modules and macro imports make the extraction fail more often than
not, and whole small crates already give hundreds of tasks.

Output (<out_dir>): tasks.jsonl, one Task per line, appended atomically (one write per line, O_APPEND)
as tasks are found; state/<crate>.json: baseline verdict and every tried mutant's outcome (so a re-run
skips done crates and mutants; delete a crate's file to redo it); bases/: snapshots; targets/worker<i>:
cargo target dirs, one per worker thread (dependencies compile once per worker, a crate's mutants
rebuild incrementally; a cache, safe to delete); summary.json. A task is its base snapshot plus
`mutation_patch` (unified diff base -> mutant); `reference_patch` fixes it (mutant -> original).
Splits are by crate name with the corpus' seeded hash (rustforge.data.corpus.assign_splits): with the
same val_fraction and seed, a crate held out of the corpus is held out here too.

Parallelism: a thread pool (the work is sandboxed cargo subprocesses) of `workers` threads, each
mining whole crates; tasks are appended under a lock.
"""

from __future__ import annotations

import difflib
import hashlib
import json
import logging
import math
import os
import random
import re
import shutil
import threading
import time
import tomllib
from collections import Counter
from collections.abc import Iterable, Iterator
from concurrent.futures import ThreadPoolExecutor, as_completed
from dataclasses import MISSING, asdict, dataclass, field, fields, replace
from pathlib import Path

from tqdm import tqdm

from rustforge.config import MUTATION_KINDS, TaskMiningConfig
from rustforge.rust.sandbox import Sandbox, SandboxConfig
from rustforge.rust.tools import CargoReport, ToolEnv, ToolError, apply_unified_diff, run_cargo, split_lines

log = logging.getLogger(__name__)

SPLITS = ("train", "val")
TASKS_FILE = "tasks.jsonl"
CAP_LINTS_CONFIG = '[build]\nrustflags = ["--cap-lints", "warn"]\n'
_COPY_IGNORE = shutil.ignore_patterns(".git", "target", "Cargo.lock", ".cargo-checksum.json")


class TaskError(RuntimeError):
    """A task file or task directory is unusable; the message names it."""


# ============================================================================================ config
# TaskMiningConfig lives in rustforge.config with every other default.


# ========================================================================================== lexing
_IDENT_CHAR = re.compile(r"\w")


def code_mask(src: str) -> str:
    """`src` with comments, string/char literal contents blanked to spaces (newlines kept), same length.

    Delimiting quotes stay, so `"a{"` becomes `"  "` and braces can be matched on the mask."""
    out = list(src)
    n, i = len(src), 0

    def blank(a: int, b: int) -> None:
        for k in range(a, min(b, n)):
            if out[k] != "\n":
                out[k] = " "

    while i < n:
        c = src[i]
        if c == "/" and src.startswith("//", i):
            end = src.find("\n", i)
            end = n if end < 0 else end
            blank(i, end)
            i = end
        elif c == "/" and src.startswith("/*", i):
            depth, j = 1, i + 2
            while j < n and depth:
                if src.startswith("/*", j):
                    depth, j = depth + 1, j + 2
                elif src.startswith("*/", j):
                    depth, j = depth - 1, j + 2
                else:
                    j += 1
            blank(i, j)
            i = j
        elif c in "rbc" and (i == 0 or not _IDENT_CHAR.match(src[i - 1])) and (m := _RAW_STRING.match(src, i)):
            hashes = m.group(1)
            end = src.find('"' + hashes, m.end())
            end = n if end < 0 else end
            blank(m.end(), end)
            i = end + 1 + len(hashes)
        elif c == '"':
            j = i + 1
            while j < n and src[j] != '"':
                j += 2 if src[j] == "\\" else 1
            blank(i + 1, j)
            i = j + 1
        elif c == "'":
            end = _char_literal_end(src, i)
            if end is None:  # a lifetime or label
                i += 1
            else:
                blank(i + 1, end)
                i = end + 1
        else:
            i += 1
    return "".join(out)


_RAW_STRING = re.compile(r'(?:br|cr|r)(#*)"')


def _char_literal_end(src: str, i: int) -> int | None:
    """Index of the closing quote of a char literal opening at src[i], or None for a lifetime."""
    if i + 1 >= len(src):
        return None
    if src[i + 1] == "\\":
        end = src.find("'", i + 3)  # '\'' has its quote escaped: search after it
        return end if 0 <= end - i <= 12 else None
    return i + 2 if i + 2 < len(src) and src[i + 2] == "'" else None


_OPENERS = {"(": ")", "[": "]", "{": "}"}
_CLOSERS = {v: k for k, v in _OPENERS.items()}


def match_close(mask: str, open_at: int) -> int | None:
    """Index of the bracket closing mask[open_at] (one of ( [ {), counting all three kinds; None if unbalanced."""
    stack = []
    for i in range(open_at, len(mask)):
        c = mask[i]
        if c in _OPENERS:
            stack.append(c)
        elif c in _CLOSERS:
            if not stack or stack[-1] != _CLOSERS[c]:
                return None
            stack.pop()
            if not stack:
                return i
    return None


def _line_of(text: str, offset: int) -> int:
    return text.count("\n", 0, offset) + 1


# =================================================================================== function locator
@dataclass
class RustFunction:
    name: str
    qualname: str  # Type::name inside an impl or trait block, else name
    item_start: int  # start of the line holding the first doc comment / attribute of the item
    fn_start: int  # offset of the `fn` keyword line's first character
    body_open: int  # offset of the body's `{`
    body_close: int  # offset of the body's `}`
    line: int  # 1-based line of the `fn` keyword
    signature: str  # from the qualifiers through the return type (one line, spaces collapsed)
    return_type: str  # "" when the function returns ()
    doc: str  # the doc comment text (/// lines), "" if none
    indent: str


_FN = re.compile(r"\bfn\s+(r#)?([A-Za-z_]\w*)\s*[<(]")
_ATTR_OPEN = re.compile(r"#!?\[")
_IMPL = re.compile(r"\bimpl\b")
_TRAIT = re.compile(r"\btrait\s+([A-Za-z_]\w*)")
_MACRO_RULES = re.compile(r"\bmacro_rules!\s*[A-Za-z_]\w*\s*[({\[]")
_TEST_ATTR = re.compile(r"\s*(\w+::)*test\s*$")


def _skip_ws_back(mask: str, i: int) -> int:
    while i > 0 and mask[i - 1].isspace():
        i -= 1
    return i


def _header_stop(mask: str, start: int) -> int | None:
    """Index of the first `;` or `{` at bracket depth 0 from `start` (an item's header ends there); None if none."""
    depth = 0
    for i in range(start, len(mask)):
        c = mask[i]
        if c in "([":
            depth += 1
        elif c in ")]":
            depth -= 1
        elif depth == 0 and c in ";{":
            return i
    return None


def _item_end(mask: str, start: int) -> int:
    """End (inclusive) of the item starting at `start`: its first `{...}` block at depth 0, or its `;`."""
    stop = _header_stop(mask, start)
    if stop is None:
        return len(mask) - 1
    if mask[stop] == ";":
        return stop
    close = match_close(mask, stop)
    return close if close is not None else len(mask) - 1


def _test_regions(mask: str) -> list[tuple[int, int]]:
    """Spans of items under #[test], #[cfg(test)]-like or #[tokio::test]-like attributes."""
    regions = []
    for m in _ATTR_OPEN.finditer(mask):
        if mask[m.start() + 1] == "!":
            continue
        close = match_close(mask, m.end() - 1)
        if close is None:
            continue
        content = mask[m.end() : close]
        if _TEST_ATTR.match(content) or _is_cfg_test(content):
            regions.append((m.start(), _item_end(mask, close + 1)))
    return regions


def _is_cfg_test(attribute: str) -> bool:
    """cfg(test) or cfg(all(..., test, ...)): compiled only for tests (cfg(any(test, ...)) is not)."""
    text = "".join(attribute.split())
    if text == "cfg(test)":
        return True
    if not (text.startswith("cfg(all(") and text.endswith("))")):
        return False
    depth, args, current = 0, [], ""
    for c in text[len("cfg(all(") : -2]:
        if c == "," and depth == 0:
            args.append(current)
            current = ""
            continue
        depth += (c == "(") - (c == ")")
        current += c
    return "test" in args + [current]


def _macro_regions(mask: str) -> list[tuple[int, int]]:
    regions = []
    for m in _MACRO_RULES.finditer(mask):
        close = match_close(mask, m.end() - 1)
        regions.append((m.start(), close if close is not None else len(mask)))
    return regions


def _skip_angles(text: str, i: int) -> int:
    """Index after the `<...>` group starting at text[i] (which is `<`); `->` does not close it."""
    depth = 0
    while i < len(text):
        if text[i] == "<":
            depth += 1
        elif text[i] == ">" and text[i - 1] != "-":
            depth -= 1
            if depth == 0:
                return i + 1
        i += 1
    return i


def _generic_params(text: str) -> set[str]:
    """Names declared in a leading `<...>` (lifetimes, types, consts)."""
    if not text.startswith("<"):
        return set()
    inner = text[1 : _skip_angles(text, 0) - 1]
    depth, params, current = 0, [], ""
    for i, c in enumerate(inner):
        if c in "<([":
            depth += 1
        elif c in ">)]" and not (c == ">" and inner[i - 1 : i] == "-"):
            depth -= 1
        elif c == "," and depth == 0:
            params.append(current)
            current = ""
            continue
        current += c
    params.append(current)
    names = set()
    for param in params:
        m = re.match(r"\s*(?:const\s+)?('?\w+)", param)
        if m:
            names.add(m.group(1))
    return names


def _self_type_name(header: str) -> str:
    """`impl<T> Foo<T>` / `impl<T> Trait for &Foo<T> where ...` -> "Foo"; a blanket impl (`impl<T: X>
    Trait for T`) -> "Trait"."""
    text = header.strip()
    generics = _generic_params(text)
    if text.startswith("<"):
        text = text[_skip_angles(text, 0) :]
    text = re.split(r"\bwhere\b", text)[0]
    depth, cut = 0, None
    for i, c in enumerate(text):  # ` for ` at angle depth 0 separates the trait from the type
        if c == "<":
            depth += 1
        elif c == ">" and text[i - 1] != "-":
            depth -= 1
        elif depth == 0 and text.startswith(" for ", i):
            cut = i
    trait = text[:cut] if cut is not None else None
    if cut is not None:
        text = text[cut + len(" for ") :]
    name = _leading_path_name(text)
    if name in generics and trait is not None:
        name = _leading_path_name(trait)
    return name


def _leading_path_name(text: str) -> str:
    text = re.sub(r"^\s*(&\s*('\w+\s*)?(mut\s+)?|dyn\s+|\*(const|mut)\s+|\?|!)*", "", text)
    m = re.match(r"\s*((?:\w+::)*)(\w+)", text)
    if m:
        return m.group(2)
    return text.split()[0] if text.split() else "?"


def _word_before(mask: str, end: int) -> str:
    start = end
    while start > 0 and (mask[start - 1].isalnum() or mask[start - 1] == "_"):
        start -= 1
    return mask[start:end]


def _container_regions(mask: str) -> list[tuple[int, int, str]]:
    """(open brace, close brace, type name) of item-level impl and trait blocks."""
    out = []
    for m in _IMPL.finditer(mask):
        prev_end = _skip_ws_back(mask, m.start())
        prev_char = mask[prev_end - 1] if prev_end else ""
        if prev_char and prev_char not in "};{]" and _word_before(mask, prev_end) not in ("unsafe", "default"):
            continue  # `impl Trait` in a type position
        open_at = _body_open(mask, m.end())
        if open_at is None:
            continue
        close = match_close(mask, open_at)
        if close is not None:
            out.append((open_at, close, _self_type_name(mask[m.end() : open_at])))
    for m in _TRAIT.finditer(mask):
        open_at = _body_open(mask, m.end())
        if open_at is not None and (close := match_close(mask, open_at)) is not None:
            out.append((open_at, close, m.group(1)))
    return out


def _body_open(mask: str, start: int) -> int | None:
    """The `{` opening the block of the item whose header starts at `start`; None if a `;` comes first."""
    stop = _header_stop(mask, start)
    return stop if stop is not None and mask[stop] == "{" else None


def _inside(pos: int, regions: Iterable[tuple[int, int]]) -> bool:
    return any(a <= pos <= b for a, b in regions)


def _doc_and_item_start(src: str, fn_line_start: int) -> tuple[str, int]:
    """Doc comment text of the item whose `fn` line starts at fn_line_start, and where its attributes begin."""
    doc, start = [], fn_line_start
    while start > 0:
        prev = src.rfind("\n", 0, start - 1) + 1
        stripped = src[prev : start - 1].strip()
        if not stripped.startswith(("///", "#[")):
            break
        if stripped.startswith("///"):
            doc.insert(0, stripped[3:].removeprefix(" "))
        start = prev
    return "\n".join(doc), start


def find_functions(src: str) -> list[RustFunction]:
    """Functions with a body, outside test code, macro_rules! and other functions' bodies, in source order."""
    mask = code_mask(src)
    excluded = _test_regions(mask) + _macro_regions(mask)
    containers = _container_regions(mask)
    found: list[RustFunction] = []
    for m in _FN.finditer(mask):
        if _inside(m.start(), excluded) or any(f.body_open < m.start() < f.body_close for f in found):
            continue
        open_at = _body_open(mask, m.end() - 1)
        if open_at is None:
            continue  # a declaration without body
        close = match_close(mask, open_at)
        if close is None:
            continue
        line_start = src.rfind("\n", 0, m.start()) + 1
        prefix = src[line_start : m.start()]
        if prefix.strip() and not re.fullmatch(r"[\w\s()\"]*", mask[line_start : m.start()]):
            continue  # `fn` after other code on its line (a closure type, a macro call): not an item
        name = m.group(2)
        owner = [c for c in containers if c[0] < m.start() < c[1]]
        qualname = f"{max(owner, key=lambda c: c[0])[2]}::{name}" if owner else name
        signature = " ".join(src[line_start:open_at].split())
        ret = _return_type(mask[m.end() - 1 : open_at], src[m.end() - 1 : open_at])
        doc, item_start = _doc_and_item_start(src, line_start)
        indent = re.match(r"[ \t]*", src[line_start:]).group(0)
        found.append(
            RustFunction(
                name,
                qualname,
                item_start,
                line_start,
                open_at,
                close,
                _line_of(src, m.start()),
                signature,
                ret,
                doc,
                indent,
            )
        )
    return found


def _return_type(mask_sig: str, sig: str) -> str:
    """Return type text of a signature starting at its `(` or `<` (where clause dropped)."""
    i = 0
    if mask_sig.startswith("<"):
        i = _skip_angles(mask_sig, 0)
    open_paren = mask_sig.find("(", i)
    close = match_close(mask_sig, open_paren) if open_paren >= 0 else None
    if close is None:
        return ""
    rest = sig[close + 1 :]
    arrow = rest.find("->")
    if arrow < 0:
        return ""
    return " ".join(re.split(r"\bwhere\b", rest[arrow + 2 :])[0].split())


# =========================================================================================== mutants
@dataclass
class Mutant:
    file: str  # relative to the crate root
    function: RustFunction
    kind: str
    start: int  # replaced span of the original file
    end: int
    replacement: str
    description: str

    def apply(self, src: str) -> str:
        return src[: self.start] + self.replacement + src[self.end :]

    @property
    def key(self) -> str:
        text = f"{self.file}\0{self.function.qualname}\0{self.kind}\0{self.start}\0{self.end}\0{self.replacement}"
        return hashlib.sha1(text.encode()).hexdigest()[:12]


_OPERATOR_SWAPS = {
    " < ": " <= ", " <= ": " < ", " > ": " >= ", " >= ": " > ", " == ": " != ", " != ": " == ",
    " && ": " || ", " || ": " && ", " + ": " - ", " - ": " + ", " += ": " -= ", " -= ": " += ",
}  # fmt: skip
_OPERATOR = re.compile(r" (?:<=|>=|==|!=|&&|\|\||\+=|-=|<|>|\+|-) ")
_INT_LITERAL = re.compile(r"(?<![\w.])(\d[\d_]*)(?:(u8|u16|u32|u64|u128|usize|i8|i16|i32|i64|i128|isize))?(?![\w.])")
_RANGE = re.compile(r"(?<=[\w)\]])\.\.(=?)(?=[\w(])")
_BOOL = re.compile(r"(?<![\w.])(true|false)(?!\w)")
_INTEGER_TYPES = frozenset(["u8", "u16", "u32", "u64", "u128", "usize", "i8", "i16", "i32", "i64", "i128", "isize"])


def _default_return(return_type: str, pick: int) -> str | None:
    """A wrong but well-typed value to return early, or None when the type has no obvious one."""
    rt = return_type.strip()
    if rt == "bool":
        return "true" if pick % 2 else "false"
    if rt in _INTEGER_TYPES:
        return "0"
    if rt.startswith("Option<"):
        return "None"
    if rt in ("String", "&str", "&'static str"):
        return '""' if rt.startswith("&") else "String::new()"
    if rt.startswith("Vec<"):
        return "Vec::new()"
    return None


def function_mutants(src: str, mask: str, file: str, fn: RustFunction, kinds: Iterable[str]) -> list[Mutant]:
    """Every mutant of one function for the requested kinds (operator/literal sites in code only)."""
    lo, hi = fn.body_open + 1, fn.body_close
    body = mask[lo:hi]
    kinds = set(kinds)
    out: list[Mutant] = []

    def add(kind: str, start: int, end: int, replacement: str, what: str) -> None:
        line = _line_of(src, start)
        out.append(Mutant(file, fn, kind, start, end, replacement, f"{what} (line {line})"))

    # `impl Trait` return types: `!` implements no trait, so a todo!() body would not compile
    if "body_removal" in kinds and body.strip() and "impl " not in fn.return_type:
        stub = f"\n{fn.indent}    todo!()\n{fn.indent}"
        add("body_removal", lo, hi, stub, f"body of fn {fn.qualname} replaced by todo!()")
    if "operator" in kinds:
        for m in _OPERATOR.finditer(body):
            old = m.group(0)
            add(
                "operator",
                lo + m.start(),
                lo + m.end(),
                _OPERATOR_SWAPS[old],
                f"`{old.strip()}` -> `{_OPERATOR_SWAPS[old].strip()}`",
            )
    if "off_by_one" in kinds:
        for m in _INT_LITERAL.finditer(body):
            digits = m.group(1).replace("_", "")
            value = int(digits)
            new = value + 1 if value == 0 else value - 1
            add("off_by_one", lo + m.start(1), lo + m.end(1), str(new), f"literal {m.group(1)} -> {new}")
        for m in _RANGE.finditer(body):
            old = m.group(0)
            new = ".." if old == "..=" else "..="
            add("off_by_one", lo + m.start(), lo + m.end(), new, f"range `{old}` -> `{new}`")
    if "wrong_return" in kinds:
        for m in _BOOL.finditer(body):
            new = "false" if m.group(1) == "true" else "true"
            add("wrong_return", lo + m.start(), lo + m.end(), new, f"`{m.group(1)}` -> `{new}`")
        value = _default_return(fn.return_type, pick=fn.line)
        if value is not None and body.strip():
            stmt = f"\n{fn.indent}    return {value};"
            add("wrong_return", lo, lo, stmt, f"fn {fn.qualname} returns {value} early")
    return out


NON_LIBRARY_DIRS = frozenset({"tests", "benches", "examples", "target", ".cargo", ".git", "fuzz"})


def library_sources(crate_root: Path) -> list[Path]:
    """The crate's .rs files that are not tests, benches, examples or build scripts, sorted."""
    files = []
    for dirpath, dirnames, filenames in os.walk(crate_root):
        here = Path(dirpath)
        dirnames[:] = sorted(d for d in dirnames if not (here == crate_root and d in NON_LIBRARY_DIRS))
        files += [here / f for f in filenames if f.endswith(".rs") and not (here == crate_root and f == "build.rs")]
    return sorted(files)


_TEST_FILE = re.compile(r"(^|/)(tests?|benches)(/|\.rs$)|_tests?\.rs$")


def find_test_module_files(crate_root: Path, files: Iterable[Path]) -> set[Path]:
    """Files that are test modules: named like one (tests.rs, foo_test.rs, a tests/ dir) or declared by
    `#[cfg(test)] mod name;` in another file."""
    out = set()
    for path in files:
        rel = path.relative_to(crate_root).as_posix()
        if _TEST_FILE.search(rel.split("/", 1)[-1] if "/" in rel else rel):
            out.add(path)
        try:
            src = path.read_text(encoding="utf-8")
        except (OSError, UnicodeDecodeError):
            continue
        mask = code_mask(src)
        module_dir = path.parent if path.name in ("lib.rs", "main.rs", "mod.rs") else path.parent / path.stem
        for start, end in _test_regions(mask):
            if m := re.search(r"\bmod\s+(\w+)\s*;", mask[start : end + 1]):
                out |= {module_dir / f"{m.group(1)}.rs", module_dir / m.group(1) / "mod.rs"}
    return out


def crate_mutants(crate_root: Path, cfg: TaskMiningConfig) -> list[Mutant]:
    """Candidate mutants of the crate's library sources, in a deterministic crate-specific shuffled order that
    alternates between kinds and keeps at most cfg.max_per_function per function."""
    by_kind: dict[str, list[Mutant]] = {k: [] for k in cfg.kinds}
    sources = library_sources(crate_root)
    test_files = find_test_module_files(crate_root, sources)
    for path in sources:
        if path in test_files:
            continue
        rel = path.relative_to(crate_root).as_posix()
        try:
            src = path.read_text(encoding="utf-8")
        except (OSError, UnicodeDecodeError):
            continue
        mask = code_mask(src)
        for fn in find_functions(src):
            body_lines = src.count("\n", fn.body_open, fn.body_close)
            if body_lines > cfg.max_body_lines:
                continue
            kinds = [k for k in cfg.kinds if k != "body_removal" or body_lines <= cfg.max_removed_body_lines]
            for mutant in function_mutants(src, mask, rel, fn, kinds):
                by_kind[mutant.kind].append(mutant)
    rng = random.Random(f"{cfg.seed}\0{crate_root.name}")
    for queue in by_kind.values():
        queue.sort(key=lambda m: m.key)
        rng.shuffle(queue)
    ordered, per_function = [], Counter()
    queues = [list(q) for q in by_kind.values()]
    while any(queues):
        for q in queues:
            while q:
                mutant = q.pop(0)
                fid = (mutant.file, mutant.function.qualname, mutant.function.line)
                if per_function[fid] < cfg.max_per_function:
                    per_function[fid] += 1
                    ordered.append(mutant)
                    break
    return ordered


# ============================================================================================= tasks
@dataclass
class Task:
    id: str
    crate: str
    version: str
    split: str
    base: str  # base snapshot dir, relative to the task dir (out_dir)
    file: str  # the mutated file, relative to the crate root
    function: str  # qualified name, e.g. Parser::next
    line: int  # line of the `fn` keyword in the mutated file
    kind: str
    mutation: str  # what changed, in words
    changed_files: list[str]
    mutation_patch: str  # unified diff: base -> mutated workspace
    reference_patch: str  # unified diff: mutated workspace -> base (the fix)
    failing_tests: list[str]
    passing_tests: int  # non-doc tests passing in the base
    prompt: str
    signature: str = ""
    mutated_sha256: str = ""  # of the mutated file (materialise checks it)
    root: str = ""  # absolute out_dir this task was loaded from (not stored)

    def record(self) -> dict:
        data = asdict(self)
        data.pop("root")
        return data

    @classmethod
    def from_record(cls, data: dict, root: str, where: str) -> Task:
        known = {f.name for f in fields(cls)} - {"root"}
        missing = [f.name for f in fields(cls) if f.name in known and f.name not in data and f.default is MISSING]
        if missing:
            raise TaskError(f"{where}: task record lacks {', '.join(missing)}")
        return cls(**{k: v for k, v in data.items() if k in known}, root=root)


def _natural_key(name: str) -> list:
    """test2 before test10."""
    return [int(part) if part.isdigit() else part for part in re.split(r"(\d+)", name)]


def unified_diff(path: str, before: str, after: str) -> str:
    """`diff -u` of one file with a/ b/ prefixes (what tools.apply_unified_diff applies)."""
    lines = difflib.unified_diff(
        split_lines(before), split_lines(after), fromfile=f"a/{path}", tofile=f"b/{path}", lineterm="", n=3
    )
    return "\n".join(lines) + "\n"


def _quote_tests(names: list[str], limit: int = 3) -> str:
    shown = ", ".join(f"`{n}`" for n in names[:limit])
    return shown + (f" and {len(names) - limit} more" if len(names) > limit else "")


def task_prompt(kind: str, fn: RustFunction, file: str, failing: list[str]) -> str:
    if kind == "body_removal":
        source = "its doc comment and signature" if fn.doc else "its signature and the tests"
        return (
            f"The function `{fn.qualname}` in {file} (line {fn.line}) is not implemented yet: its body is "
            f"`todo!()`. Implement it from {source}, so that `cargo test` passes (the failing tests are "
            f"{_quote_tests(failing)})."
        )
    verb = "fails" if len(failing) == 1 else "fail"
    return (
        f"The test{'s' if len(failing) > 1 else ''} {_quote_tests(failing)} {verb} when I run `cargo test`. "
        f"The bug is in fn `{fn.qualname}` in {file} (line {fn.line}). Find it and fix it."
    )


# ====================================================================================== registry index
_VERSION = re.compile(r"^(\d+)(?:\.(\d+))?(?:\.(\d+))?(?:-([\w.]+))?(?:\+[\w.]+)?$")


def _parse_version(text: str) -> tuple[int, int, int, bool] | None:
    m = _VERSION.match(text.strip())
    if not m:
        return None
    return int(m.group(1)), int(m.group(2) or 0), int(m.group(3) or 0), m.group(4) is not None


def version_matches(req: str, version: str) -> bool:
    """Cargo's semver requirement syntax (^ ~ = < <= > >= * and comma lists; bare = caret), no pre-release rules."""
    v = _parse_version(version)
    if v is None:
        return False
    vt = v[:3]
    for part in (p.strip() for p in req.split(",")):
        m = re.match(r"^(\^|~|=|<=|>=|<|>)?\s*(.*)$", part)
        op, rest = m.group(1) or "^", m.group(2).strip()
        if rest in ("*", ""):
            continue
        nums = rest.split("-")[0].split("+")[0].split(".")
        wild = [i for i, x in enumerate(nums) if x in ("*", "x", "X")]
        given = nums[: wild[0]] if wild else nums
        if not all(x.isdigit() for x in given):
            return False
        base = tuple(int(x) for x in given) + (0,) * (3 - len(given))
        if wild:
            op = "~" if len(given) > 1 else "^"
            if len(given) == 1:
                op = "major"
        if not _compare(op, vt, base, len(given)):
            return False
    return True


def _compare(op: str, v: tuple, base: tuple, given: int) -> bool:
    if op == "=":
        return v[:given] == base[:given]
    if op == ">":
        return v > base
    if op == ">=":
        return v >= base
    if op == "<":
        return v < base
    if op == "<=":
        return v <= base
    if op == "major":
        return v[0] == base[0]
    if op == "~":
        upper = (base[0] + 1, 0, 0) if given == 1 else (base[0], base[1] + 1, 0)
        return base <= v < upper
    # caret: the leftmost non-zero given component may not change
    if base[0] > 0 or given == 1:
        upper = (base[0] + 1, 0, 0)
    elif base[1] > 0 or given == 2:
        upper = (0, base[1] + 1, 0)
    else:
        upper = (0, 0, base[2] + 1)
    return base <= v < upper


def registry_index(registry: Path) -> dict[str, list[str]]:
    """Crate name (dashes as underscores) -> versions present in a directory registry."""
    index: dict[str, list[str]] = {}
    if not registry.is_dir():
        return index
    for entry in registry.iterdir():
        m = re.fullmatch(r"(.+?)-(\d[\w.+-]*)", entry.name)
        if m and entry.is_dir():
            index.setdefault(m.group(1).replace("-", "_"), []).append(m.group(2))
    return index


# ==================================================================================== manifest edits
_TABLE_HEADER = re.compile(r"^\s*\[\[?\s*([^\]]+?)\s*\]\]?\s*(#.*)?$")


def _split_tables(text: str) -> list[tuple[str | None, list[str]]]:
    """Manifest lines grouped by table: (header key or None for the preamble, lines incl. header)."""
    tables: list[tuple[str | None, list[str]]] = [(None, [])]
    for line in text.split("\n"):
        m = _TABLE_HEADER.match(line)
        if m:
            tables.append((m.group(1).replace('"', "").replace("'", ""), [line]))
        else:
            tables[-1][1].append(line)
    return tables


def _is_dev_deps(key: str | None) -> bool:
    return key is not None and (key == "dev-dependencies" or key.endswith(".dev-dependencies")
                                or ".dev-dependencies." in key or key.startswith("dev-dependencies."))  # fmt: skip


def strip_dev_dependencies(manifest_text: str, unavailable: set[str]) -> str:
    """Manifest without the dev-dependencies named in `unavailable` (both table styles)."""
    out: list[str] = []
    for key, lines in _split_tables(manifest_text):
        if _is_dev_deps(key) and "dev-dependencies." in key:
            dep = key.split("dev-dependencies.", 1)[1]
            if dep in unavailable:
                continue
        elif _is_dev_deps(key):
            lines = [ln for ln in lines if not (m := re.match(r"\s*([\w-]+)\s*=", ln)) or m.group(1) not in unavailable]
        out += lines
    return "\n".join(out)


def _dev_dependency_tables(manifest: dict) -> list[dict]:
    tables = [manifest.get("dev-dependencies", {})]
    tables += [t.get("dev-dependencies", {}) for t in (manifest.get("target") or {}).values() if isinstance(t, dict)]
    return [t for t in tables if isinstance(t, dict)]


def _dev_dependency_keys(manifest: dict) -> set[str]:
    return {key for table in _dev_dependency_tables(manifest) for key in table}


def unavailable_dev_dependencies(manifest: dict, index: dict[str, list[str]]) -> set[str]:
    """Dev-dependency keys whose crate/version the registry cannot provide."""
    missing = set()
    for table in _dev_dependency_tables(manifest):
        for key, spec in table.items():
            spec = {"version": spec} if isinstance(spec, str) else spec if isinstance(spec, dict) else {}
            if "path" in spec or "git" in spec:
                missing.add(key)
                continue
            name = str(spec.get("package", key)).replace("-", "_")
            req = str(spec.get("version", "*"))
            if not any(version_matches(req, v) for v in index.get(name, [])):
                missing.add(key)
    return missing


def drop_target_files(crate_root: Path, rel_files: set[str]) -> None:
    """Delete test/example/bench files and their [[test]]/[[example]]/[[bench]] manifest entries."""
    manifest = crate_root / "Cargo.toml"
    out: list[str] = []
    for key, lines in _split_tables(manifest.read_text()):
        if key in ("test", "example", "bench"):
            body = "\n".join(lines)
            path = re.search(r'^\s*path\s*=\s*"([^"]+)"', body, re.MULTILINE)
            name = re.search(r'^\s*name\s*=\s*"([^"]+)"', body, re.MULTILINE)
            target_path = (
                path.group(1).removeprefix("./") if path else f"{_target_dir(key)}/{name.group(1) if name else ''}.rs"
            )
            if target_path in rel_files:
                continue
        out += lines
    manifest.write_text("\n".join(out))
    for rel in rel_files:
        (crate_root / rel).unlink(missing_ok=True)


def _target_dir(kind: str) -> str:
    return {"test": "tests", "example": "examples", "bench": "benches"}[kind]


# ============================================================================================ mining
@dataclass
class MiningSummary:
    out_dir: str = ""
    crates: int = 0
    crates_usable: int = 0  # baseline passed (this run or cached)
    crates_skipped: dict[str, int] = field(default_factory=dict)  # reason -> count
    candidates_tried: int = 0  # this run
    outcomes: dict[str, int] = field(default_factory=dict)  # task | compile_error | survived | timeout
    tasks_new: int = 0
    tasks_total: int = 0
    tasks_by_kind: dict[str, int] = field(default_factory=dict)  # all tasks in the file
    tasks_by_split: dict[str, int] = field(default_factory=dict)
    seconds: float = 0.0

    def table(self) -> str:
        lines = [f"task mining summary: {self.out_dir}",
                 f"  crates              {self.crates} (usable {self.crates_usable})"]  # fmt: skip
        lines += [f"    skipped: {r:<17} {n}" for r, n in sorted(self.crates_skipped.items())]
        if self.crates_skipped.get("time_budget"):
            lines.append("    (time_budget: the run's time_budget_s ran out; run again to continue)")
        lines.append(f"  mutants tried       {self.candidates_tried}")
        lines += [f"    {o:<26} {n}" for o, n in sorted(self.outcomes.items())]
        lines.append(f"  tasks               {self.tasks_total} ({self.tasks_new} new this run)")
        lines += [f"    {k:<26} {n}" for k, n in sorted(self.tasks_by_kind.items())]
        lines += [f"    split {s:<20} {n}" for s, n in sorted(self.tasks_by_split.items())]
        lines.append(f"  seconds             {self.seconds:.1f}")
        return "\n".join(lines)


@dataclass
class CrateSource:
    name: str
    version: str
    root: Path
    source_bytes: int

    @property
    def key(self) -> str:
        return f"{self.name}-{self.version}"


def discover_task_crates(crate_dirs: Iterable[str | Path]) -> list[CrateSource]:
    """Crates of the given dirs (a dir with Cargo.toml, or a dir of such dirs like the registry); one
    version per name (the highest), sorted by size of the library sources (smallest first)."""
    found: dict[str, CrateSource] = {}
    for raw in crate_dirs:
        top = Path(raw).expanduser()
        if not top.is_dir():
            raise TaskError(f"crate dir {raw}: not a directory")
        roots = (
            [top]
            if (top / "Cargo.toml").is_file()
            else sorted(p for p in top.iterdir() if (p / "Cargo.toml").is_file())
        )
        for root in roots:
            try:
                package = tomllib.loads((root / "Cargo.toml").read_text(encoding="utf-8")).get("package") or {}
            except (OSError, UnicodeDecodeError, tomllib.TOMLDecodeError):
                continue
            name, version = package.get("name"), package.get("version")
            if not isinstance(name, str) or not isinstance(version, str):
                continue  # a workspace root or a `version.workspace = true` member
            size = sum(p.stat().st_size for p in library_sources(root))
            crate = CrateSource(name, version, root.resolve(), size)
            old = found.get(name)
            if old is None or _version_key(version) > _version_key(old.version):
                found[name] = crate
    return sorted(found.values(), key=lambda c: (c.source_bytes, c.name))


def _version_key(version: str) -> tuple:
    v = _parse_version(version)
    return (v[0], v[1], v[2], not v[3]) if v else (-1,)


class _TaskWriter:
    """Appends task records to tasks.jsonl, one os.write of a whole line each (atomic under O_APPEND)."""

    def __init__(self, path: Path):
        self.path = path
        self.lock = threading.Lock()
        self.ids = {t["id"] for t in _read_records(path)} if path.exists() else set()
        _drop_torn_tail(path)

    def append(self, record: dict) -> bool:
        with self.lock:
            if record["id"] in self.ids:
                return False
            line = (json.dumps(record, ensure_ascii=False) + "\n").encode()
            fd = os.open(self.path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
            try:
                os.write(fd, line)
                os.fsync(fd)
            finally:
                os.close(fd)
            self.ids.add(record["id"])
            return True


def _drop_torn_tail(path: Path) -> None:
    """A crash mid-write may leave a last line without newline: cut it so appends start clean."""
    if not path.exists():
        return
    data = path.read_bytes()
    if data and not data.endswith(b"\n"):
        with path.open("r+b") as f:
            f.truncate(data.rfind(b"\n") + 1)


def _read_records(path: Path) -> Iterator[dict]:
    with path.open(encoding="utf-8") as f:
        for number, line in enumerate(f, 1):
            if not line.endswith("\n"):
                return  # torn last line of an interrupted run
            try:
                yield json.loads(line)
            except json.JSONDecodeError as e:
                raise TaskError(f"{path}:{number}: not valid JSON: {e}") from None


def _write_json_atomic(path: Path, data: dict) -> None:
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}-{threading.get_ident()}")
    tmp.write_text(json.dumps(data, indent=1) + "\n")
    os.replace(tmp, path)


@dataclass
class _CrateState:
    """What is known about one crate across runs (state/<name>-<version>.json)."""

    baseline: str = ""  # "" = not run, "ok", or the reason it is unusable
    passing_tests: int = 0
    test_s: float = 0.0  # wall time of `cargo test --tests` on the base (crate rebuild included)
    dropped_targets: list[str] = field(default_factory=list)
    stripped_dev_deps: list[str] = field(default_factory=list)
    tried: dict[str, str] = field(default_factory=dict)  # mutant key -> outcome
    done_limits: list | None = None  # [max_tasks, max_candidates] it was finished under

    @classmethod
    def load(cls, path: Path) -> _CrateState:
        if not path.exists():
            return cls()
        try:
            data = json.loads(path.read_text())
        except (OSError, json.JSONDecodeError):
            return cls()  # a damaged cache entry: redo the crate
        known = {f.name for f in fields(cls)}
        return cls(**{k: v for k, v in data.items() if k in known})


class _Miner:
    def __init__(self, out_dir: Path, cfg: TaskMiningConfig, sandbox: Sandbox, splits: dict[str, str]):
        self.out, self.cfg, self.sandbox, self.splits = out_dir, cfg, sandbox, splits
        self.index = registry_index(Path(cfg.registry))
        self.writer = _TaskWriter(out_dir / TASKS_FILE)
        self.local = threading.local()
        self.lock = threading.Lock()
        self.n_workers = 0
        self.summary = MiningSummary(out_dir=str(out_dir))
        budget = cfg.time_budget_s
        self.deadline = None if budget is None else time.monotonic() + budget

    def _baseline_timeout(self) -> float:
        """cfg.baseline_timeout_s, cut to what is left of the run's budget (at least a minute)."""
        if self.deadline is None:
            return self.cfg.baseline_timeout_s
        return min(self.cfg.baseline_timeout_s, max(60.0, self.deadline - time.monotonic()))

    def out_of_time(self) -> bool:
        return self.deadline is not None and time.monotonic() > self.deadline

    # ------------------------------------------------------------------------------ bookkeeping
    def _count(self, table: str, key: str) -> None:
        with self.lock:
            counter = getattr(self.summary, table)
            counter[key] = counter.get(key, 0) + 1

    def _worker_dirs(self) -> tuple[Path, Path]:
        if not hasattr(self.local, "target"):
            with self.lock:
                index = self.n_workers
                self.n_workers += 1
            self.local.target = self.out / "targets" / f"worker{index}"
            self.local.scratch = self.out / "scratch" / f"worker{index}"
            self.local.target.mkdir(parents=True, exist_ok=True)
        return self.local.target, self.local.scratch

    def _state_path(self, crate: CrateSource) -> Path:
        return self.out / "state" / f"{crate.key}.json"

    def _save(self, crate: CrateSource, state: _CrateState) -> None:
        _write_json_atomic(self._state_path(crate), asdict(state))

    # ----------------------------------------------------------------------------------- crate
    def mine_crate(self, crate: CrateSource) -> int:
        """Tasks written for this crate in this run."""
        state = _CrateState.load(self._state_path(crate))
        limits = [self.cfg.max_tasks_per_crate, self.cfg.max_candidates_per_crate]
        if state.done_limits is not None and all(a >= b for a, b in zip(state.done_limits, limits)):
            self._finish_counts(state)
            return 0
        if self.out_of_time():
            self._count("crates_skipped", "time_budget")
            return 0
        if crate.source_bytes > self.cfg.max_source_kb * 1024:
            state.baseline = state.baseline or "too_large"
        target, scratch = self._worker_dirs()
        base = self.out / "bases" / crate.key
        if not state.baseline:
            verdict = self._baseline(crate, base, state, target)
            if verdict == "baseline_timeout" and self.out_of_time():  # cut by the run's budget: no verdict
                shutil.rmtree(base, ignore_errors=True)
                self._count("crates_skipped", "time_budget")
                return 0
            state.baseline = verdict
            if verdict != "ok":  # the verdict is remembered; the snapshot is not needed
                shutil.rmtree(base, ignore_errors=True)
            self._save(crate, state)
        if state.baseline != "ok":
            self._count("crates_skipped", state.baseline.split(":")[0])
            return 0
        with self.lock:
            self.summary.crates_usable += 1
        written, finished = self._mine_mutants(crate, base, scratch, target, state)
        if finished:
            state.done_limits = limits
            self._save(crate, state)
        else:
            self._count("crates_skipped", "time_budget")
        return written

    def _finish_counts(self, state: _CrateState) -> None:
        if state.baseline == "ok":
            with self.lock:
                self.summary.crates_usable += 1
        else:
            self._count("crates_skipped", state.baseline.split(":")[0])

    def _baseline(self, crate: CrateSource, base: Path, state: _CrateState, target: Path) -> str:
        """Prepare the base snapshot and test it; "ok" or the reason the crate is unusable."""
        if base.exists():
            shutil.rmtree(base)
        shutil.copytree(crate.root, base, symlinks=True, ignore=_COPY_IGNORE)
        manifest_path = base / "Cargo.toml"
        try:
            manifest = tomllib.loads(manifest_path.read_text(encoding="utf-8"))
        except (UnicodeDecodeError, tomllib.TOMLDecodeError) as e:
            return f"bad_manifest: {e}"
        if "workspace" in manifest and "package" not in manifest:
            return "workspace_root"
        problem = self._strip_dev_dependencies(manifest_path, unavailable_dev_dependencies(manifest, self.index), state)
        if problem:
            return problem
        (base / ".cargo").mkdir(exist_ok=True)
        (base / ".cargo" / "config.toml").write_text(CAP_LINTS_CONFIG)
        sandbox = Sandbox(replace(self.sandbox.cfg, timeout_s=self._baseline_timeout()))
        # the non-doc tests first: a crate without any is skipped before its doc tests are compiled
        quick = self._build_dropping_broken_targets(sandbox, base, ["--tests"], state, target)
        remaining = _dev_dependency_keys(tomllib.loads(manifest_path.read_text(encoding="utf-8")))
        if isinstance(quick, str) and quick.startswith("unresolvable") and remaining:
            # a packaged dev-dependency whose own dependencies are not (quickcheck needs env_logger)
            problem = self._strip_dev_dependencies(manifest_path, remaining, state)
            if problem:
                return problem
            quick = self._build_dropping_broken_targets(sandbox, base, ["--tests"], state, target)
        if isinstance(quick, str):
            return quick
        passing = [t.name for t in quick.tests if t.status == "ok"]
        if quick.failed or quick.crashed_binaries or quick.returncode != 0:
            return f"baseline_fails: {quick.failed} failed"
        if not passing:
            return "no_unit_tests"
        full = self._build_dropping_broken_targets(sandbox, base, [], state, target)  # + examples, doc tests
        if isinstance(full, str):
            return full
        if full.failed or full.crashed_binaries or full.returncode != 0:
            return f"baseline_fails: {full.failed} failed (doc tests included)"
        # a mutant's cost: rebuild the crate (not its dependencies) and run the tests; a second pass
        # also catches tests that fail now and then, which would make wrong tasks
        start = time.monotonic()
        again = run_cargo(sandbox, base, "test", ["--tests"], target_dir=target)
        state.test_s = time.monotonic() - start
        if not check_report_fixed(again):
            return "flaky_tests"
        state.passing_tests = len(passing)
        return "ok"

    @staticmethod
    def _strip_dev_dependencies(manifest_path: Path, names: set[str], state: _CrateState) -> str | None:
        """Remove dev-dependencies `names` from the manifest; None, or why the crate is unusable."""
        if not names:
            return None
        text = strip_dev_dependencies(manifest_path.read_text(encoding="utf-8"), names)
        try:
            tomllib.loads(text)
        except tomllib.TOMLDecodeError as e:
            return f"bad_manifest: stripping dev-dependencies broke it: {e}"
        manifest_path.write_text(text, encoding="utf-8")
        state.stripped_dev_deps = sorted(set(state.stripped_dev_deps) | names)
        return None

    @staticmethod
    def _build_dropping_broken_targets(
        sandbox: Sandbox, base: Path, args: list[str], state: _CrateState, target: Path
    ) -> CargoReport | str:
        """`cargo test args` on the base; test/example files that fail to build (a dev-dependency they
        use was stripped) are dropped and the build retried. The report, or why the crate is unusable."""
        for _ in range(3):
            report = run_cargo(sandbox, base, "test", args, target_dir=target)
            if report.timed_out:
                return "baseline_timeout"
            if report.compiled:
                return report
            broken = {d.file for d in report.errors if d.file}
            droppable = {f for f in broken if f.split("/")[0] in ("tests", "examples", "benches")}
            if not broken:
                return "unresolvable: " + " ".join(report.cargo_errors[:2])[:200]
            if broken - droppable:
                return "build_error: " + ", ".join(sorted(broken - droppable))[:200]
            drop_target_files(base, droppable)
            state.dropped_targets += sorted(droppable)
        return "build_error: test targets"

    def _mine_mutants(
        self, crate: CrateSource, base: Path, scratch: Path, target: Path, state: _CrateState
    ) -> tuple[int, bool]:
        """(tasks written, finished); not finished when the run's time budget interrupted the crate."""
        cfg = self.cfg
        candidates = crate_mutants(base, cfg)
        timeout = max(cfg.mutant_timeout_min_s, cfg.mutant_timeout_factor * state.test_s)
        sandbox = Sandbox(replace(self.sandbox.cfg, timeout_s=timeout))
        tasks_here = sum(1 for o in state.tried.values() if o == "task")
        tried_here = len(state.tried)
        kind_of = {m.key: m.kind for m in candidates}
        per_kind = Counter(kind_of.get(k) for k, o in state.tried.items() if o == "task")
        kind_cap = max(1, math.ceil(cfg.max_kind_share * cfg.max_tasks_per_crate))
        if scratch.exists():
            shutil.rmtree(scratch)
        shutil.copytree(base, scratch, symlinks=True)
        deadline = time.monotonic() + cfg.crate_budget_s
        written = misses = 0
        for mutant in candidates:
            if tasks_here >= cfg.max_tasks_per_crate or tried_here >= cfg.max_candidates_per_crate:
                break
            if self.out_of_time():
                return written, False
            if time.monotonic() > deadline:
                log.info("%s: crate budget of %.0f s spent", crate.key, cfg.crate_budget_s)
                break
            if mutant.key in state.tried or per_kind[mutant.kind] >= kind_cap:
                continue
            if misses >= cfg.give_up_after:
                log.info("%s: %d mutants in a row made no task; moving on", crate.key, misses)
                break
            outcome, record = self._try_mutant(crate, base, scratch, target, sandbox, mutant, state)
            misses = 0 if record is not None else misses + 1
            tried_here += 1
            state.tried[mutant.key] = outcome
            self._count("outcomes", outcome)
            with self.lock:
                self.summary.candidates_tried += 1
            if record is not None:
                tasks_here += 1
                per_kind[mutant.kind] += 1
                written += self.writer.append(record)
            self._save(crate, state)
        return written, True

    def _try_mutant(self, crate, base, scratch, target, sandbox, mutant: Mutant, state) -> tuple[str, dict | None]:
        path = scratch / mutant.file
        original = (base / mutant.file).read_text(encoding="utf-8")
        mutated = mutant.apply(original)
        path.write_text(mutated, encoding="utf-8")
        try:
            report = run_cargo(sandbox, scratch, "test", ["--tests"], target_dir=target)
        finally:
            path.write_text(original, encoding="utf-8")
        if report.timed_out:
            return "timeout", None
        if not report.compiled:
            return "compile_error", None
        failing = sorted({t.name for t in report.tests if t.status == "FAILED"}, key=_natural_key)
        if not failing:
            return ("crashed" if report.crashed_binaries else "survived"), None
        return "task", self._record(crate, mutant, original, mutated, failing, state)

    def _record(
        self, crate: CrateSource, mutant: Mutant, original: str, mutated: str, failing: list[str], state
    ) -> dict:
        fn = mutant.function
        line = _line_of(mutated, mutated.find("fn", fn.fn_start))
        shown = replace(fn, line=line)
        task = Task(
            id=f"{crate.key}-{mutant.key}",
            crate=crate.name,
            version=crate.version,
            split=self.splits.get(crate.name, "train"),
            base=f"bases/{crate.key}",
            file=mutant.file,
            function=fn.qualname,
            line=line,
            kind=mutant.kind,
            mutation=mutant.description,
            changed_files=[mutant.file],
            mutation_patch=unified_diff(mutant.file, original, mutated),
            reference_patch=unified_diff(mutant.file, mutated, original),
            failing_tests=failing,
            passing_tests=state.passing_tests,
            prompt=task_prompt(mutant.kind, shown, mutant.file, failing),
            signature=fn.signature,
            mutated_sha256=hashlib.sha256(mutated.encode()).hexdigest(),
        )
        return task.record()


def mine_tasks(
    crate_dirs: Iterable[str | Path],
    out_dir: str | Path,
    cfg: TaskMiningConfig | None = None,
    sandbox: Sandbox | None = None,
    progress: bool = True,
) -> MiningSummary:
    """Mine tasks from the crates of `crate_dirs` into out_dir (see the module docstring); resumable."""
    cfg = cfg or TaskMiningConfig()
    sandbox = sandbox or Sandbox(SandboxConfig())
    reason = sandbox.unavailable_reason()
    if reason is not None and not sandbox.cfg.allow_unsandboxed:
        raise TaskError(f"task mining runs crates' tests and needs the sandbox: {reason}")
    start = time.perf_counter()
    out = Path(out_dir).resolve()
    for sub in ("state", "bases", "targets"):
        (out / sub).mkdir(parents=True, exist_ok=True)
    crates = discover_task_crates(crate_dirs)
    if cfg.max_crates is not None:
        crates = crates[: cfg.max_crates]
    from rustforge.data.corpus import assign_splits

    splits = assign_splits([c.name for c in crates], cfg.val_fraction, cfg.seed)
    miner = _Miner(out, cfg, sandbox, splits)
    miner.summary.crates = len(crates)
    bar = tqdm(total=len(crates), desc="mine tasks", unit="crate", disable=not progress)
    with ThreadPoolExecutor(cfg.workers, thread_name_prefix="mine") as pool:
        futures = {pool.submit(miner.mine_crate, c): c for c in crates}
        for future in as_completed(futures):
            crate = futures[future]
            try:
                miner.summary.tasks_new += future.result()
            except Exception:
                log.exception("mining %s failed", crate.key)
                miner._count("crates_skipped", "internal_error")
            bar.update(1)
            bar.set_postfix(tasks=len(miner.writer.ids), new=miner.summary.tasks_new, refresh=False)
    bar.close()
    shutil.rmtree(out / "scratch", ignore_errors=True)
    summary = miner.summary
    records = list(_read_records(out / TASKS_FILE)) if (out / TASKS_FILE).exists() else []
    summary.tasks_total = len(records)
    summary.tasks_by_kind = dict(Counter(r["kind"] for r in records))
    summary.tasks_by_split = dict(Counter(r["split"] for r in records))
    summary.seconds = time.perf_counter() - start
    _write_json_atomic(out / "summary.json", asdict(summary))
    return summary


# ====================================================================================== loading/using
def load_tasks(out_dir: str | Path, split: str | None = None) -> list[Task]:
    """Tasks of out_dir/tasks.jsonl, optionally only one split ("train" | "val")."""
    if split is not None and split not in SPLITS:
        raise ValueError(f"split must be one of {SPLITS} or None, got {split!r}")
    root = Path(out_dir).resolve()
    path = root / TASKS_FILE
    if not path.is_file():
        raise TaskError(f"{path}: not found; run `rustforge data tasks` first")
    tasks = []
    for number, record in enumerate(_read_records(path), 1):
        task = Task.from_record(record, str(root), f"{path}:{number}")
        if split is None or task.split == split:
            tasks.append(task)
    return tasks


def materialise(task: Task, dest_dir: str | Path) -> Path:
    """A fresh workspace at dest_dir (must not exist or be empty) holding the mutated crate."""
    base = Path(task.root) / task.base
    if not base.is_dir():
        raise TaskError(f"task {task.id}: base snapshot {base} is missing")
    dest = Path(dest_dir)
    if dest.exists() and any(dest.iterdir()):
        raise TaskError(f"materialise: {dest} is not empty")
    if dest.exists():
        dest.rmdir()
    shutil.copytree(base, dest, symlinks=True)
    env = ToolEnv(dest, Sandbox(SandboxConfig()), enable_clippy=False)
    try:
        apply_unified_diff(env, task.mutation_patch)
    except ToolError as e:
        raise TaskError(f"task {task.id}: mutation_patch does not apply to {base}: {e}") from None
    digest = hashlib.sha256((dest / task.file).read_bytes()).hexdigest()
    if task.mutated_sha256 and digest != task.mutated_sha256:
        raise TaskError(f"task {task.id}: {task.file} after the mutation patch differs from the mined mutant")
    return dest


def check_report_fixed(report: CargoReport) -> bool:
    """The crate builds and every test passes (what a correct fix achieves)."""
    return (
        report.compiled
        and not report.timed_out
        and report.failed == 0
        and report.crashed_binaries == 0
        and report.passed > 0
    )


__all__ = [
    "MUTATION_KINDS",
    "TASKS_FILE",
    "CrateSource",
    "MiningSummary",
    "Mutant",
    "RustFunction",
    "Task",
    "TaskError",
    "TaskMiningConfig",
    "check_report_fixed",
    "code_mask",
    "crate_mutants",
    "discover_task_crates",
    "find_functions",
    "find_test_module_files",
    "function_mutants",
    "library_sources",
    "load_tasks",
    "match_close",
    "materialise",
    "mine_tasks",
    "strip_dev_dependencies",
    "unavailable_dev_dependencies",
    "unified_diff",
    "version_matches",
]
