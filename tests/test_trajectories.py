"""Trajectories and preference pairs (rustforge.rust.trajectories) on tasks mined from a tiny crate this
test writes (real cargo in the bubblewrap sandbox, one target dir per module), plus the OpenAI-format
converter and the JSONL round trip, which need no sandbox.
"""

from __future__ import annotations

import json
import shutil

import pytest

from rustforge.data import harmony as H
from rustforge.data.tokenizer import train_tiny_tokenizer
from rustforge.rust import tasks as T
from rustforge.rust import trajectories as TR
from rustforge.rust.sandbox import Sandbox, SandboxConfig, find_toolchain_sysroot
from rustforge.rust.tools import ToolEnv, run_cargo, tool_definitions

needs_sandbox = pytest.mark.skipif(
    shutil.which("bwrap") is None or find_toolchain_sysroot() is None, reason="needs bubblewrap and a Rust toolchain"
)

MANIFEST = '[package]\nname = "trajcrate"\nversion = "0.2.0"\nedition = "2021"\n\n[dependencies]\n'
LIB = """\
/// Number of items of `xs` strictly below `limit`.
pub fn count_below(xs: &[i64], limit: i64) -> usize {
    let mut count = 0;
    for &x in xs {
        if x < limit {
            count += 1;
        }
    }
    count
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn counts_strictly_below() {
        assert_eq!(count_below(&[1, 5, 3, 5, 9], 5), 2);
        assert_eq!(count_below(&[], 5), 0);
    }
}
"""


@pytest.fixture(scope="module")
def tokenizer():
    texts = [LIB, json.dumps(tool_definitions(include_clippy=True))] * 4
    return train_tiny_tokenizer(texts, vocab_size=400)


@pytest.fixture(scope="module")
def sandbox() -> Sandbox:
    return Sandbox(SandboxConfig(timeout_s=120))


@pytest.fixture(scope="module")
def mined(tmp_path_factory, sandbox):
    root = tmp_path_factory.mktemp("traj")
    crate = root / "crates" / "trajcrate"
    (crate / "src").mkdir(parents=True)
    (crate / "Cargo.toml").write_text(MANIFEST)
    (crate / "src" / "lib.rs").write_text(LIB)
    cfg = T.TaskMiningConfig(kinds=("operator", "body_removal"), workers=1, max_per_function=8, val_fraction=0.0)
    T.mine_tasks([root / "crates"], root / "out", cfg, sandbox, progress=False)
    tasks = {t.kind: t for t in T.load_tasks(root / "out")}
    assert set(tasks) == {"operator", "body_removal"}
    return tasks, root / "target"


@pytest.fixture(scope="module")
def trajectory(mined, sandbox):
    tasks, target = mined
    return TR.synthesise_trajectory(tasks["operator"], sandbox, target)


# ------------------------------------------------------------------------------------ trajectories
@needs_sandbox
def test_trajectory_is_valid_harmony_with_tool_definitions(trajectory, tokenizer):
    msgs = trajectory.messages
    assert msgs[0].role == "system" and msgs[1].role == "developer" and msgs[2].role == "user"
    tool_names = [t.name for t in msgs[1].content.tools[0].tools]
    assert {"cargo_test", "read_file", "apply_patch"} <= set(tool_names)
    assert TR.validate_conversation(trajectory, tokenizer, tool_names) == []
    rendered = H.render_conversation(trajectory, tokenizer)
    assert "# Tools" in rendered.text and "type apply_patch = (_:" in rendered.text
    assert rendered.text.endswith("<|return|>") and sum(rendered.loss_mask) > 0
    calls = [m.recipient for m in msgs if m.is_tool_call]
    assert calls == ["functions.cargo_test", "functions.read_file", "functions.apply_patch", "functions.cargo_test"]


@needs_sandbox
def test_trajectory_tool_outputs_are_real(trajectory, mined):
    task = mined[0]["operator"]
    results = [m.content for m in trajectory.messages if m.role == "tool"]
    first_test, read, applied, second_test = results
    assert "cargo test: FAILED" in first_test and "test tests::counts_strictly_below ... FAILED" in first_test
    assert "panicked" in first_test  # libtest's failure output, not a template
    assert "pub fn count_below(xs: &[i64], limit: i64) -> usize {" in read and "/// Number of items" in read
    buggy_line = next(
        ln[1:] for ln in task.reference_patch.splitlines() if ln.startswith("-") and not ln.startswith("---")
    )
    assert buggy_line in read  # the mutated code, as the file really holds it
    assert applied == "patched src/lib.rs (1 hunk(s))"
    assert second_test.startswith("cargo test: ok. 1 passed; 0 failed")
    final = trajectory.messages[-1]
    assert final.channel == "final" and "count_below" in final.content and "1 passed, 0 failed" in final.content
    assert task.prompt == trajectory.messages[2].content


@needs_sandbox
def test_body_removal_trajectory_writes_the_body(mined, sandbox, tokenizer):
    tasks, target = mined
    conv = TR.synthesise_trajectory(tasks["body_removal"], sandbox, target)
    patch_call = next(m for m in conv.messages if m.recipient == "functions.apply_patch")
    assert "+    let mut count = 0;" in json.loads(patch_call.content)["patch"]
    assert TR.validate_conversation(conv, tokenizer) == []


# ------------------------------------------------------------------------------- preference pairs
@needs_sandbox
def test_pair_chosen_passes_and_rejected_fails_in_the_sandbox(mined, sandbox, tokenizer, tmp_path):
    tasks, target = mined
    task = tasks["operator"]
    pair = TR.make_preference_pair(task, sandbox, target)
    assert pair.prompt.messages[-1].role == "tool" and pair.prompt.messages[-1].name == "functions.read_file"
    outcomes = {}
    for label, completion in (("chosen", pair.chosen), ("rejected", pair.rejected)):
        assert [m.channel for m in completion] == ["analysis", "commentary"] and completion[-1].is_tool_call
        ids = H.render_conversation(completion, tokenizer, for_training=False).ids
        assert H.validate_completion(ids, tokenizer, implied_role=None) == []
        workspace = T.materialise(task, tmp_path / label)
        env = ToolEnv(workspace, sandbox, target_dir=target, enable_clippy=False)
        assert env.call("apply_patch", completion[-1].content).startswith("patched")
        outcomes[label] = T.check_report_fixed(run_cargo(sandbox, workspace, "test", target_dir=target))
    assert outcomes == {"chosen": True, "rejected": False}
    assert pair.chosen[-1].content != pair.rejected[-1].content
    path = tmp_path / "pairs.jsonl"
    assert TR.write_pairs(path, [pair]) == 1
    loaded = TR.read_pairs(path)[0]
    assert loaded.task_id == task.id and loaded.rejected == pair.rejected
    assert loaded.prompt.messages == pair.prompt.messages


@needs_sandbox
def test_trajectories_round_trip_through_jsonl(trajectory, tmp_path):
    path = tmp_path / "traj.jsonl"
    assert TR.write_trajectories(path, [trajectory, trajectory]) == 2
    loaded = TR.read_trajectories(path)
    assert len(loaded) == 2 and loaded[0].messages == trajectory.messages


@needs_sandbox
def test_build_dataset_writes_replayable_jsonl(mined, sandbox, tmp_path):
    tasks, target = mined
    tasks_dir = tasks["operator"].root
    out = tmp_path / "trajectories.jsonl"
    counts = TR.build_dataset(tasks_dir, out, "trajectories", split="train", sandbox=sandbox, limit=1, workers=1,
                              target_root=target.parent / "replays", progress=False)  # fmt: skip
    assert counts == {"written": 1, "skipped": 0}
    (conv,) = TR.read_trajectories(out)
    assert conv.messages[-1].channel == "final" and conv.messages[2].role == "user"


# --------------------------------------------------------------------------------- OpenAI format
TOOLS = [{"type": "function", "function": {"name": "cargo_test", "description": "run tests",
                                           "parameters": {"type": "object", "properties": {}}}}]  # fmt: skip
GOOD = {
    "tools": TOOLS,
    "messages": [
        {"role": "system", "content": "Be brief."},
        {"role": "user", "content": [{"type": "text", "text": "Do the tests pass?"}]},
        {"role": "assistant", "reasoning_content": "Run them.", "content": "Checking.",
         "tool_calls": [{"id": "c1", "type": "function", "function": {"name": "cargo_test", "arguments": "{}"}}]},
        {"role": "tool", "tool_call_id": "c1", "content": "cargo test: ok. 3 passed; 0 failed"},
        {"role": "assistant", "content": "Yes, all 3 pass."},
    ],
}  # fmt: skip


def test_openai_jsonl_converts_to_valid_harmony(tmp_path, tokenizer):
    path = tmp_path / "chats.jsonl"
    path.write_text(json.dumps(GOOD) + "\n\n" + json.dumps(GOOD["messages"][1:2] + GOOD["messages"][4:]) + "\n")
    convs = TR.load_openai_jsonl(path, tokenizer)
    msgs = convs[0].messages
    assert [(m.role, m.channel) for m in msgs] == [
        ("system", None), ("developer", None), ("user", None), ("assistant", "analysis"),
        ("assistant", "commentary"), ("assistant", "commentary"), ("tool", "commentary"), ("assistant", "final"),
    ]  # fmt: skip
    assert msgs[1].content.instructions == "Be brief." and msgs[1].content.tools[0].tools[0].name == "cargo_test"
    assert msgs[5].recipient == "functions.cargo_test" and msgs[6].name == "functions.cargo_test"
    assert msgs[2].content == "Do the tests pass?"
    assert [m.role for m in convs[1].messages] == ["system", "user", "assistant"]


@pytest.mark.parametrize(
    "mutate, error",
    [
        (lambda r: r["messages"][3].update(tool_call_id="zz"), r"chats.jsonl:2: message 4: tool_call_id 'zz' answers"),
        (lambda r: r["messages"][2]["tool_calls"][0]["function"].update(arguments="{oops"),
         r"chats.jsonl:2: message 3: tool_calls\[0\].function.arguments is not valid JSON"),
        (lambda r: r["messages"][2]["tool_calls"][0]["function"].update(name="rm_rf"), r"calls 'rm_rf', not one of"),
        (lambda r: r["messages"].pop(), r"chats.jsonl:2: the last message must be an assistant answer"),
        (lambda r: r["messages"][1].update(role="robot"), r"message 2: unknown role 'robot'"),
    ],
)  # fmt: skip
def test_openai_jsonl_errors_name_file_line_and_message(tmp_path, mutate, error):
    bad = json.loads(json.dumps(GOOD))
    mutate(bad)
    path = tmp_path / "chats.jsonl"
    path.write_text(json.dumps(GOOD) + "\n" + json.dumps(bad) + "\n")
    with pytest.raises(TR.TrajectoryError, match=error):
        TR.load_openai_jsonl(path)


def test_openai_jsonl_bad_json_line(tmp_path):
    path = tmp_path / "chats.jsonl"
    path.write_text(json.dumps(GOOD) + "\n{not json\n")
    with pytest.raises(TR.TrajectoryError, match=r"chats.jsonl:2: not valid JSON"):
        TR.load_openai_jsonl(path)


def test_validator_flags_a_broken_assistant_turn(tokenizer):
    conv = TR.openai_to_conversation(GOOD)
    conv.messages[4] = H.Message("assistant", "Checking.", channel="scratchpad")
    problems = TR.validate_conversation(conv, tokenizer)
    assert any(p.startswith("assistant turn ending at message 6: unknown channel") for p in problems)
    conv.messages.pop()  # no final answer any more
    assert "the conversation does not end with an assistant final answer" in TR.validate_conversation(conv, tokenizer)
