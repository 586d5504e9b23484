"""Agent trajectories and IPO preference pairs for mined tasks, and user-supplied chats in OpenAI format.

`synthesise_trajectory(task, sandbox)` plays a short, competent core-agent episode on a task from
rustforge.rust.tasks: the user asks for the fix; the assistant reasons briefly (analysis channel; the
text is templated, filled with the task's facts and varied by a hash of the task id), runs `cargo_test`,
reads the function with `read_file`, applies the reference patch with `apply_patch`, runs `cargo_test`
again and ends with a final answer. Every tool result is the REAL output of rustforge.rust.tools' ToolEnv
on the materialised workspace in the bubblewrap sandbox; if the replay does not behave (the tests do not
fail first, or do not pass after the patch) the task is rejected with TrajectoryError.

`make_preference_pair(task, sandbox)` gives an IPO pair: the prompt is a trajectory up to the assistant's
fixing turn (after it has seen the failure and the code); `chosen` diagnoses the bug and applies the
reference patch, `rejected` diagnoses wrongly and applies a wrong patch -- the original function with a
different mutation of the task's kinds (for a removed body: a subtly wrong body), falling back to a
second bug on top of the first. Both patches are checked in the sandbox (chosen passes every test,
rejected fails one) and both completions are built by the same template, so they differ only in
substance.

Conversations are rustforge.data.harmony Messages (system + developer with the tool definitions, as the
harmony renderer expects). On disk (write_trajectories / write_pairs) one JSON object per line:
{"messages": [...]} / {"task_id", "prompt", "chosen", "rejected"}, each message a dict of the Message
fields (system/developer content as {"system": {...}} / {"developer": {...}}); read_* load them back.

`load_openai_jsonl(path)` converts chats in OpenAI's messages format (system/developer/user/assistant
with optional reasoning, tool_calls and tool-role results) into Conversations the way gpt-oss's chat
template maps them (system text -> developer instructions, reasoning -> analysis, content with tool
calls -> commentary, otherwise -> final), with errors naming file:line and the message.
"""

from __future__ import annotations

import hashlib
import json
import logging
import re
import shutil
import tempfile
import threading
from collections.abc import Iterable, Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass
from pathlib import Path

from tqdm import tqdm

from rustforge.data.harmony import (
    Conversation,
    DeveloperContent,
    Message,
    SystemContent,
    ToolDescription,
    ToolNamespace,
    developer_message,
    render_conversation,
    system_message,
    tool_call_message,
    tool_result_message,
    validate_completion,
)
from rustforge.rust.sandbox import Sandbox
from rustforge.rust.tasks import (
    Task,
    TaskError,
    check_report_fixed,
    code_mask,
    find_functions,
    function_mutants,
    load_tasks,
    materialise,
    unified_diff,
)
from rustforge.rust.tools import CargoReport, ToolEnv, run_cargo, split_lines

log = logging.getLogger(__name__)

AGENT_INSTRUCTIONS = (
    "You are a Rust coding agent. The user's crate is your workspace; paths are relative to its root. "
    "Use the tools to run cargo, read files and apply unified-diff patches. Find the cause before you "
    "change anything, keep patches minimal, and confirm with `cargo test` before you answer."
)
MAX_READ_SPAN = 80


class TrajectoryError(RuntimeError):
    """A task could not be replayed as a trajectory, or a trajectory file is malformed (names file:line)."""


@dataclass
class PreferencePair:
    task_id: str
    prompt: Conversation  # up to the assistant's fixing turn
    chosen: list[Message]  # diagnosis + apply_patch(reference): every test passes afterwards
    rejected: list[Message]  # diagnosis + apply_patch(wrong patch): some test still fails


# ============================================================================ templates and helpers
def _variant(task_id: str, step: str, options: Sequence[str]) -> str:
    digest = hashlib.sha256(f"{task_id}\0{step}".encode()).digest()
    return options[digest[0] % len(options)]


def _analysis(text: str) -> Message:
    return Message("assistant", text, channel="analysis")


def _quote(names: Sequence[str], limit: int = 3) -> str:
    shown = ", ".join(f"`{n}`" for n in names[:limit])
    return shown + (f" (and {len(names) - limit} more)" if len(names) > limit else "")


def agent_preamble(
    tools: Iterable[dict], instructions: str = AGENT_INSTRUCTIONS, reasoning_effort: str = "medium"
) -> list[Message]:
    """The system message and the developer message carrying the instructions and tool definitions."""
    return [system_message(reasoning_effort=reasoning_effort), developer_message(instructions, list(tools))]


@dataclass
class _Change:
    """The first changed line of a one-file patch: its line in the patched-from file, old and new text."""

    line: int
    old: list[str]
    new: list[str]


def _patch_change(patch: str) -> _Change:
    old_line, old, new, first = 0, [], [], None
    for raw in split_lines(patch):
        if raw.startswith(("--- ", "+++ ")):
            continue
        if m := re.match(r"^@@ -(\d+)", raw):
            old_line = int(m.group(1))
            continue
        if raw.startswith("-"):
            first = first or old_line
            old.append(raw[1:])
            old_line += 1
        elif raw.startswith("+"):
            first = first or old_line
            new.append(raw[1:])
        else:
            old_line += 1
            if first and (old or new):
                break  # only the first contiguous change is described
    return _Change(first or 1, old, new)


def _describe_change(change: _Change, kind: str, function: str) -> str:
    """One sentence about what a patch changes, for the analysis before applying it."""
    if kind == "body_removal" or len(change.new) > 2:
        shape = "; ".join(s.strip() for s in change.new if s.strip())[:240]
        return f"I'll write the body of `{function}`: {shape}"
    old, new = _joined(change.old), _joined(change.new)
    if not change.old:
        return f"Before line {change.line} it needs `{new}`."
    if not change.new:
        return f"Line {change.line}, `{old}`, must go: it does not belong there."
    return f"Line {change.line} reads `{old}`; it should be `{new}`."


def _joined(lines: list[str]) -> str:
    return " / ".join(line.strip() for line in lines)


def _function_span(source: str, task: Task) -> tuple[int, int]:
    """1-based (first, last) lines to show for the task's function: doc comment through closing brace."""
    functions = [f for f in find_functions(source) if f.line == task.line] or [
        f for f in find_functions(source) if f.qualname == task.function
    ]
    if not functions:
        return max(1, task.line - 5), task.line + 30
    fn = functions[0]
    first = source.count("\n", 0, fn.item_start) + 1
    last = source.count("\n", 0, fn.body_close) + 1
    if last - first + 1 > MAX_READ_SPAN:
        first = max(first, fn.line - 5)
        last = first + MAX_READ_SPAN - 1
    return first, last + 1


def _failing(report: CargoReport | None) -> list[str]:
    return [t.name for t in report.tests if t.status == "FAILED"] if report else []


# ============================================================================================ replay
class _Replay:
    """A materialised task with its ToolEnv; messages accumulate with the REAL tool outputs."""

    def __init__(self, task: Task, sandbox: Sandbox, target_dir: Path | None, reasoning_effort: str):
        self.task = task
        self.tmp = Path(tempfile.mkdtemp(prefix="rustforge-traj-"))
        self.workspace = materialise(task, self.tmp / "crate")
        self.env = ToolEnv(self.workspace, sandbox, target_dir=target_dir)
        self.messages = agent_preamble(self.env.definitions(), reasoning_effort=reasoning_effort)
        self.messages.append(Message("user", task.prompt))

    def call(self, name: str, arguments: dict) -> str:
        output = self.env.call(name, arguments)
        self.messages += [tool_call_message(name, arguments), tool_result_message(name, output)]
        return output

    def close(self) -> None:
        shutil.rmtree(self.tmp, ignore_errors=True)


def _opening_thought(task: Task) -> str:
    where = f"`{task.function}` in {task.file}"
    if task.kind == "body_removal":
        return _variant(task.id, "open", [
            (f"The user wants {where} implemented; its body is `todo!()`. "
             "First I'll run the tests to see which ones exercise it."),
            f"{where} is a `todo!()` stub. Let me run `cargo test` to see what is expected of it.",
        ])  # fmt: skip
    return _variant(task.id, "open", [
        f"The user reports failing tests and points at {where}. I'll reproduce the failure with `cargo test` first.",
        f"A bug in {where} breaks some tests. Let me run the test suite to see the failure.",
        f"Tests fail; the suspect is {where}. Reproduce first: run `cargo test`.",
    ])  # fmt: skip


def _first_panic(report: CargoReport | None) -> str | None:
    """The message of the first panic in the failure output ("assertion `left == right` failed ...")."""
    lines = report.failure_output if report else []
    for i, line in enumerate(lines):
        if " panicked at " in line and i + 1 < len(lines) and lines[i + 1].strip():
            return lines[i + 1].strip()[:160]
    return None


def _after_failure_thought(task: Task, report: CargoReport | None, first: int, last: int) -> str:
    failing = _failing(report)
    tests = _quote(failing)
    panic = _first_panic(report)
    why = f" The first one panics with: {panic}" if panic else ""
    return _variant(task.id, "after_fail", [
        (f"{len(failing)} test(s) fail: {tests}.{why} "
         f"Let me read `{task.function}` (lines {first}-{last} of {task.file})."),
        f"Confirmed: {tests} fail.{why} Now the code of `{task.function}` in {task.file}.",
    ])  # fmt: skip


def _diagnosis(task: Task, patch: str, kind: str) -> str:
    change = _describe_change(_patch_change(patch), kind, task.function)
    if kind == "body_removal":
        return _variant(task.id, "diag", [
            f"The body is `todo!()`. From the signature `{task.signature}` and what the tests expect: {change}",
            f"I have the signature and the tests' expectations. {change}",
        ])  # fmt: skip
    return _variant(task.id, "diag", [
        f"{change} That explains the failing assertion. Applying the fix.",
        f"Found it. {change} I'll patch that line.",
    ])  # fmt: skip


def _final_answer(task: Task, report: CargoReport) -> str:
    change = _patch_change(task.reference_patch)
    if task.kind == "body_removal":
        what = f"Implemented `{task.function}` in {task.file}."
    elif not change.new:
        what = f"Fixed `{task.function}` in {task.file}: removed `{_joined(change.old)}` (line {change.line})."
    elif not change.old:
        what = f"Fixed `{task.function}` in {task.file}: added `{_joined(change.new)}` at line {change.line}."
    else:
        old, new = _joined(change.old), _joined(change.new)
        what = f"Fixed `{task.function}` in {task.file}: line {change.line} now reads `{new}` instead of `{old}`."
    return f"{what} `cargo test` passes: {report.passed} passed, {report.failed} failed."


def _replay_to_code(task: Task, sandbox: Sandbox, target_dir: Path | None, reasoning_effort: str) -> _Replay:
    """Replay up to (and including) reading the function; checks that the tests really fail."""
    replay = _Replay(task, sandbox, target_dir, reasoning_effort)
    try:
        replay.messages.append(_analysis(_opening_thought(task)))
        replay.call("cargo_test", {})
        failing = _failing(replay.env.last_report)
        if not failing:
            raise TrajectoryError(f"task {task.id}: no test fails on the materialised workspace")
        source = (replay.workspace / task.file).read_text(encoding="utf-8", errors="replace")
        first, last = _function_span(source, task)
        replay.messages.append(_analysis(_after_failure_thought(task, replay.env.last_report, first, last)))
        replay.call("read_file", {"path": task.file, "start_line": first, "end_line": last})
        return replay
    except BaseException:
        replay.close()
        raise


def synthesise_trajectory(
    task: Task, sandbox: Sandbox, target_dir: Path | None = None, reasoning_effort: str = "medium"
) -> Conversation:
    """The whole episode for `task` with real tool outputs (see the module docstring)."""
    replay = _replay_to_code(task, sandbox, target_dir, reasoning_effort)
    try:
        replay.messages.append(_analysis(_diagnosis(task, task.reference_patch, task.kind)))
        applied = replay.call("apply_patch", {"patch": task.reference_patch})
        if applied.startswith("error:"):
            raise TrajectoryError(f"task {task.id}: reference patch does not apply: {applied}")
        replay.messages.append(_analysis("Patched. Running the whole test suite again to confirm."))
        replay.call("cargo_test", {})
        report = replay.env.last_report
        if report is None or not check_report_fixed(report):
            raise TrajectoryError(f"task {task.id}: tests still fail after the reference patch")
        replay.messages.append(Message("assistant", _final_answer(task, report), channel="final"))
        return Conversation(replay.messages)
    finally:
        replay.close()


# ================================================================================= preference pairs
_WRONG_KINDS = ("operator", "off_by_one", "wrong_return")


def _shuffled_mutants(task: Task, source: str, functions) -> list:
    mask = code_mask(source)
    mutants = [m for fn in functions for m in function_mutants(source, mask, task.file, fn, _WRONG_KINDS)]
    return sorted(mutants, key=lambda m: hashlib.sha256(f"{task.id}\0{m.key}".encode()).hexdigest())


def _wrong_sources(task: Task, mutated: str, original: str) -> Iterator[str]:
    """Wrong versions of the file, most plausible first (deterministic order):
    1. the task's function with a different bug: for a removed body, the original body with a mutation
       (a subtly wrong implementation); otherwise a change elsewhere in the function that leaves the
       bug in place (a wrong fix), then the fix plus a new bug;
    2. a change in the nearest other functions of the file (patching the wrong place);
    3. for a removed body, a stub that still panics (`unimplemented!()`)."""
    sources = [original] if task.kind == "body_removal" else [mutated, original]
    seen = {original, mutated}
    for source in sources:
        own = [f for f in find_functions(source) if f.qualname == task.function]
        if own:
            own = [min(own, key=lambda f: abs(f.line - task.line))]
        for mutant in _shuffled_mutants(task, source, own):
            wrong = mutant.apply(source)
            if wrong not in seen:
                seen.add(wrong)
                yield wrong
    others = [f for f in find_functions(mutated) if f.qualname != task.function]
    others.sort(key=lambda f: abs(f.line - task.line))
    for mutant in _shuffled_mutants(task, mutated, others[:3]):
        wrong = mutant.apply(mutated)
        if wrong not in seen:
            seen.add(wrong)
            yield wrong
    if task.kind == "body_removal" and "todo!()" in mutated:
        yield mutated.replace("todo!()", "unimplemented!()", 1)


def _patch_outcome(task: Task, patch: str, sandbox: Sandbox, target_dir: Path | None) -> CargoReport | None:
    tmp = Path(tempfile.mkdtemp(prefix="rustforge-pair-"))
    try:
        workspace = materialise(task, tmp / "crate")
        env = ToolEnv(workspace, sandbox, target_dir=target_dir, enable_clippy=False)
        if env.call("apply_patch", {"patch": patch}).startswith("error:"):
            return None
        return run_cargo(sandbox, workspace, "test", target_dir=target_dir)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def make_preference_pair(
    task: Task,
    sandbox: Sandbox,
    target_dir: Path | None = None,
    reasoning_effort: str = "medium",
    max_rejected_tries: int = 8,
) -> PreferencePair:
    """An IPO pair for `task`: both patches verified in the sandbox (see the module docstring)."""
    chosen_report = _patch_outcome(task, task.reference_patch, sandbox, target_dir)
    if chosen_report is None or not check_report_fixed(chosen_report):
        raise TrajectoryError(f"task {task.id}: the reference patch does not make the tests pass")
    replay = _replay_to_code(task, sandbox, target_dir, reasoning_effort)
    try:
        mutated = (replay.workspace / task.file).read_text(encoding="utf-8")
    finally:
        replay.close()
    original = _apply_to_text(mutated, task.reference_patch, task)
    rejected_patch = None
    for tries, wrong in enumerate(_wrong_sources(task, mutated, original)):
        if tries >= max_rejected_tries:
            break
        patch = unified_diff(task.file, mutated, wrong)
        report = _patch_outcome(task, patch, sandbox, target_dir)
        if report is not None and not check_report_fixed(report):
            rejected_patch = patch
            break
    if rejected_patch is None:
        raise TrajectoryError(f"task {task.id}: no wrong patch that fails the tests was found")
    wrong_change = _patch_change(rejected_patch)
    wrong_kind = "body_removal" if any("todo!()" in line for line in wrong_change.old) else "operator"
    chosen = [_analysis(_diagnosis(task, task.reference_patch, task.kind)),
              tool_call_message("apply_patch", {"patch": task.reference_patch})]  # fmt: skip
    rejected = [_analysis(_diagnosis(task, rejected_patch, wrong_kind)),
                tool_call_message("apply_patch", {"patch": rejected_patch})]  # fmt: skip
    return PreferencePair(task.id, Conversation(replay.messages), chosen, rejected)


def _apply_to_text(text: str, patch: str, task: Task) -> str:
    tmp = Path(tempfile.mkdtemp(prefix="rustforge-apply-"))
    try:
        path = tmp / task.file
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text, encoding="utf-8")
        env = ToolEnv(tmp, Sandbox(), enable_clippy=False)
        result = env.call("apply_patch", {"patch": patch})
        if result.startswith("error:"):
            raise TrajectoryError(f"task {task.id}: {result}")
        return path.read_text(encoding="utf-8")
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


# ======================================================================================= validation
def validate_conversation(conv: Conversation, tokenizer, tool_names: Iterable[str] | None = None) -> list[str]:
    """Problems of a conversation's assistant parts: each assistant turn rendered alone must pass
    harmony.validate_completion; every tool call must be answered by its tool; the last turn must end
    in a final answer. [] when it is good."""
    messages = conv.messages
    names = None if tool_names is None else set(tool_names)
    problems: list[str] = []
    turn: list[Message] = []
    for index, message in enumerate(messages + [Message("user", "")]):
        if message.role == "assistant":
            turn.append(message)
            continue
        if turn:
            ids = render_conversation(turn, tokenizer, for_training=False).ids
            found = validate_completion(ids, tokenizer, tool_names=names, implied_role=None)
            problems += [f"assistant turn ending at message {index}: {p}" for p in found]
            last = turn[-1]
            if last.is_tool_call and index < len(messages):
                answer = messages[index]
                if answer.role != "tool" or answer.name != last.recipient:
                    problems.append(
                        f"message {index + 1}: {last.recipient} is answered by {answer.name or answer.role}"
                    )
            turn = []
    if not messages or messages[-1].role != "assistant" or messages[-1].channel != "final":
        problems.append("the conversation does not end with an assistant final answer")
    return problems


# ================================================================================== JSON (de)coding
def message_to_dict(message: Message) -> dict:
    data: dict = {"role": message.role}
    if isinstance(message.content, SystemContent):
        content = asdict(message.content)
        content["valid_channels"] = list(message.content.valid_channels or []) or None
        data["content"] = {"system": content}
    elif isinstance(message.content, DeveloperContent):
        data["content"] = {"developer": asdict(message.content)}
    else:
        data["content"] = message.content
    for key in ("channel", "recipient", "content_type", "name"):
        if getattr(message, key) is not None:
            data[key] = getattr(message, key)
    return data


def _namespaces(raw, where: str) -> list[ToolNamespace] | None:
    if raw is None:
        return None
    try:
        return [ToolNamespace(ns["name"], [ToolDescription(**t) for t in ns.get("tools", [])], ns.get("description"))
                for ns in raw]  # fmt: skip
    except (KeyError, TypeError) as e:
        raise TrajectoryError(f"{where}: bad tool namespaces: {e}") from None


def message_from_dict(data: dict, where: str = "<message>") -> Message:
    if not isinstance(data, dict) or "role" not in data or "content" not in data:
        raise TrajectoryError(f"{where}: a message needs 'role' and 'content'")
    content = data["content"]
    try:
        if isinstance(content, dict) and "system" in content:
            fields = dict(content["system"])
            fields["valid_channels"] = tuple(fields["valid_channels"]) if fields.get("valid_channels") else None
            fields["tools"] = _namespaces(fields.get("tools"), where)
            content = SystemContent(**fields)
        elif isinstance(content, dict) and "developer" in content:
            fields = dict(content["developer"])
            content = DeveloperContent(fields.get("instructions"), _namespaces(fields.get("tools"), where))
        elif not isinstance(content, str):
            raise TrajectoryError(f"{where}: content must be a string, or {{'system'|'developer': ...}}")
        extra = {k: data.get(k) for k in ("channel", "recipient", "content_type", "name")}
        return Message(data["role"], content, **extra)
    except (TypeError, ValueError) as e:
        if isinstance(e, TrajectoryError):
            raise
        raise TrajectoryError(f"{where}: {e}") from None


def _write_jsonl(path: str | Path, records: Iterable[dict]) -> int:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp")
    count = 0
    with tmp.open("w", encoding="utf-8") as f:
        for record in records:
            f.write(json.dumps(record, ensure_ascii=False) + "\n")
            count += 1
    tmp.replace(path)
    return count


def write_trajectories(path: str | Path, convs: Iterable[Conversation]) -> int:
    """One {"messages": [...]} per line; returns the count. Written to a temp file, then renamed."""
    return _write_jsonl(path, ({"messages": [message_to_dict(m) for m in c.messages]} for c in convs))


def write_pairs(path: str | Path, pairs: Iterable[PreferencePair]) -> int:
    """One {"task_id", "prompt", "chosen", "rejected"} per line (message lists); returns the count."""
    records = (
        {
            "task_id": p.task_id,
            "prompt": [message_to_dict(m) for m in p.prompt.messages],
            "chosen": [message_to_dict(m) for m in p.chosen],
            "rejected": [message_to_dict(m) for m in p.rejected],
        }
        for p in pairs
    )
    return _write_jsonl(path, records)


def _jsonl_records(path: str | Path) -> Iterator[tuple[str, object]]:
    path = Path(path)
    if not path.is_file():
        raise TrajectoryError(f"{path}: not found")
    with path.open(encoding="utf-8") as f:
        for number, line in enumerate(f, 1):
            if not line.strip():
                continue
            where = f"{path}:{number}"
            try:
                yield where, json.loads(line)
            except json.JSONDecodeError as e:
                raise TrajectoryError(f"{where}: not valid JSON: {e.msg} at column {e.colno}") from None


def read_trajectories(path: str | Path) -> list[Conversation]:
    convs = []
    for where, record in _jsonl_records(path):
        if not isinstance(record, dict) or not isinstance(record.get("messages"), list):
            raise TrajectoryError(f'{where}: expected {{"messages": [...]}}')
        convs.append(
            Conversation([message_from_dict(m, f"{where}: message {i + 1}") for i, m in enumerate(record["messages"])])
        )
    return convs


def _decode_messages(record: dict, key: str, where: str) -> list[Message]:
    return [message_from_dict(m, f"{where}: {key} message {i + 1}") for i, m in enumerate(record[key])]


def read_pairs(path: str | Path) -> list[PreferencePair]:
    pairs = []
    for where, record in _jsonl_records(path):
        keys = ("prompt", "chosen", "rejected")
        if not isinstance(record, dict) or not all(isinstance(record.get(k), list) for k in keys):
            raise TrajectoryError(f"{where}: expected task_id, prompt, chosen and rejected message lists")
        prompt, chosen, rejected = (_decode_messages(record, k, where) for k in keys)
        pairs.append(PreferencePair(str(record.get("task_id", "")), Conversation(prompt), chosen, rejected))
    return pairs


# =================================================================================== OpenAI format
def _text(content, where: str) -> str:
    if content is None:
        return ""
    if isinstance(content, str):
        return content
    if isinstance(content, list):  # [{"type": "text", "text": ...}, ...]
        parts = []
        for part in content:
            if not isinstance(part, dict) or part.get("type") != "text" or not isinstance(part.get("text"), str):
                raise TrajectoryError(f"{where}: only text content parts are supported, got {str(part)[:80]}")
            parts.append(part["text"])
        return "".join(parts)
    raise TrajectoryError(f"{where}: content must be a string or a list of text parts, got {type(content).__name__}")


def _tool_definitions(raw, where: str) -> list[dict]:
    if raw is None:
        return []
    if not isinstance(raw, list):
        raise TrajectoryError(f"{where}: 'tools' must be a list of function definitions")
    out = []
    for i, tool in enumerate(raw):
        spec = tool.get("function", tool) if isinstance(tool, dict) else None
        if not isinstance(spec, dict) or not isinstance(spec.get("name"), str):
            raise TrajectoryError(f"{where}: tools[{i}] needs a function name")
        out.append(
            {"name": spec["name"], "description": spec.get("description", ""), "parameters": spec.get("parameters")}
        )
    return out


def openai_to_conversation(
    record, where: str = "<record>", default_tools: Sequence[dict] = (), reasoning_effort: str = "medium"
) -> Conversation:
    """One OpenAI-format chat ({"messages": [...], "tools": [...]} or a bare message list) as a Conversation."""
    if isinstance(record, list):
        record = {"messages": record}
    if not isinstance(record, dict) or not isinstance(record.get("messages"), list) or not record["messages"]:
        raise TrajectoryError(f'{where}: expected {{"messages": [...]}} with at least one message')
    tools = _tool_definitions(record.get("tools"), where) or list(default_tools)
    tool_names = {t["name"] for t in tools}
    instructions: list[str] = []
    body: list[Message] = []
    pending: dict[str, str] = {}  # tool_call_id -> tool name, awaiting its result
    last_call: str | None = None
    for i, raw in enumerate(record["messages"]):
        at = f"{where}: message {i + 1}"
        if not isinstance(raw, dict):
            raise TrajectoryError(f"{at}: must be an object")
        role = raw.get("role")
        if role in ("system", "developer"):
            if body:
                raise TrajectoryError(f"{at}: a {role} message must come before the conversation starts")
            instructions.append(_text(raw.get("content"), at))
        elif role == "user":
            body.append(Message("user", _text(raw.get("content"), at)))
        elif role == "assistant":
            calls = _assistant_messages(raw, at, tool_names, pending, body)
            last_call = calls[-1] if calls else None
        elif role == "tool":
            name = raw.get("name")
            call_id = raw.get("tool_call_id")
            if call_id is not None:
                if call_id not in pending:
                    raise TrajectoryError(f"{at}: tool_call_id {call_id!r} answers no earlier tool call")
                name = pending.pop(call_id)
            elif name is None:
                name = last_call
            if not name:
                raise TrajectoryError(f"{at}: a tool message needs tool_call_id or name")
            body.append(tool_result_message(name, _text(raw.get("content"), at)))
        else:
            raise TrajectoryError(f"{at}: unknown role {role!r}; expected system, developer, user, assistant or tool")
    if pending:
        raise TrajectoryError(f"{where}: tool call(s) {sorted(pending)} never get a tool result")
    if not any(m.role == "user" for m in body):
        raise TrajectoryError(f"{where}: no user message")
    if body[-1].role != "assistant" or body[-1].channel != "final":
        raise TrajectoryError(f"{where}: the last message must be an assistant answer (content, no tool_calls)")
    preamble = [system_message(reasoning_effort=reasoning_effort)]
    if instructions or tools:
        preamble.append(developer_message("\n\n".join(instructions) or None, tools))
    return Conversation(preamble + body)


def _assistant_messages(
    raw: dict, at: str, tool_names: set[str], pending: dict[str, str], body: list[Message]
) -> list[str]:
    """Append the Harmony messages of one OpenAI assistant message; returns the names it calls."""
    reasoning = raw.get("reasoning_content", raw.get("thinking", raw.get("reasoning")))
    if reasoning:
        body.append(_analysis(_text(reasoning, at)))
    content = _text(raw.get("content"), at)
    calls = raw.get("tool_calls") or []
    if not isinstance(calls, list):
        raise TrajectoryError(f"{at}: tool_calls must be a list")
    if content:
        body.append(Message("assistant", content, channel="commentary" if calls else "final"))
    names = []
    for j, call in enumerate(calls):
        spec = call.get("function") if isinstance(call, dict) else None
        if not isinstance(spec, dict) or not isinstance(spec.get("name"), str):
            raise TrajectoryError(f"{at}: tool_calls[{j}] needs function.name")
        name, arguments = spec["name"], spec.get("arguments", "{}")
        if tool_names and name not in tool_names:
            raise TrajectoryError(f"{at}: tool_calls[{j}] calls {name!r}, not one of the tools {sorted(tool_names)}")
        try:
            parsed = json.loads(arguments) if isinstance(arguments, str) else arguments
        except json.JSONDecodeError as e:
            raise TrajectoryError(f"{at}: tool_calls[{j}].function.arguments is not valid JSON: {e.msg}") from None
        if not isinstance(parsed, dict):
            raise TrajectoryError(f"{at}: tool_calls[{j}].function.arguments must be a JSON object")
        body.append(tool_call_message(name, parsed))
        pending[str(call.get("id", f"{at}#{j}"))] = name
        names.append(name)
    if not reasoning and not content and not calls:
        raise TrajectoryError(f"{at}: an assistant message needs content, reasoning or tool_calls")
    return names


def load_openai_jsonl(
    path: str | Path, tokenizer=None, default_tools: Sequence[dict] = (), reasoning_effort: str = "medium"
) -> list[Conversation]:
    """Chats in OpenAI messages format, one per line, as Conversations. With a tokenizer each is also
    rendered and checked (validate_conversation); any problem raises TrajectoryError naming file:line."""
    convs = []
    for where, record in _jsonl_records(path):
        conv = openai_to_conversation(record, where, default_tools, reasoning_effort)
        if tokenizer is not None:
            names = [t.name for m in conv.messages if isinstance(m.content, DeveloperContent)
                     for ns in m.content.tools or [] for t in ns.tools]  # fmt: skip
            problems = validate_conversation(conv, tokenizer, names or None)
            if problems:
                raise TrajectoryError(f"{where}: {'; '.join(problems)}")
        convs.append(conv)
    return convs


# ============================================================================================ batch
def build_dataset(
    tasks_dir: str | Path,
    out_path: str | Path,
    what: str = "trajectories",
    split: str | None = "train",
    sandbox: Sandbox | None = None,
    limit: int | None = None,
    workers: int = 2,
    target_root: str | Path | None = None,
    progress: bool = True,
) -> dict[str, int]:
    """`rustforge data trajectories|pairs`: replay the tasks of tasks_dir into out_path (JSONL).
    Tasks that fail to replay are skipped and counted. Returns {"written", "skipped"}."""
    if what not in ("trajectories", "pairs"):
        raise ValueError(f"what must be 'trajectories' or 'pairs', got {what!r}")
    tasks = load_tasks(tasks_dir, split)[:limit]
    sandbox = sandbox or Sandbox()
    root = Path(target_root) if target_root is not None else Path(tasks_dir) / "targets"
    local, lock, counter = threading.local(), threading.Lock(), [0]

    def one(task: Task):
        if not hasattr(local, "target"):
            with lock:
                local.target = root / f"replay{counter[0]}"
                counter[0] += 1
        try:
            if what == "pairs":
                return make_preference_pair(task, sandbox, local.target)
            return synthesise_trajectory(task, sandbox, local.target)
        except (TrajectoryError, TaskError) as e:
            log.warning("skipping task %s: %s", task.id, e)
            return None

    with ThreadPoolExecutor(max(1, workers)) as pool:
        results = list(tqdm(pool.map(one, tasks), total=len(tasks), desc=what, disable=not progress))
    kept = [r for r in results if r is not None]
    writer = write_pairs if what == "pairs" else write_trajectories
    writer(out_path, kept)
    return {"written": len(kept), "skipped": len(results) - len(kept)}


__all__ = [
    "AGENT_INSTRUCTIONS",
    "PreferencePair",
    "TrajectoryError",
    "agent_preamble",
    "build_dataset",
    "load_openai_jsonl",
    "make_preference_pair",
    "message_from_dict",
    "message_to_dict",
    "openai_to_conversation",
    "read_pairs",
    "read_trajectories",
    "synthesise_trajectory",
    "validate_conversation",
    "write_pairs",
    "write_trajectories",
]
