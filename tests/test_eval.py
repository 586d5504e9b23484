"""The eval harness: pass@k against known values, the suite loaders, the execution path with real cargo in the
sandbox (answers scripted by a fake generator), and a smoke run of `rustforge eval` on the tiny model."""

from __future__ import annotations

import hashlib
import itertools
import json
import math
import shutil
from fractions import Fraction
from pathlib import Path

import pytest
from rust_crate import SUM_OF_SQUARES_LIB, manifest

from rustforge.config import EvalConfig, RunConfig, from_dict
from rustforge.data import harmony as H
from rustforge.eval import suites as S
from rustforge.eval.harness import (
    SampleResult,
    resolve_model_source,
    run_suite,
    splice_function,
    summarise,
)
from rustforge.eval.passk import mean_pass_at_k, pass_at_k

HAVE_RUST = shutil.which("cargo") is not None and shutil.which("bwrap") is not None
needs_rust = pytest.mark.skipif(not HAVE_RUST, reason="needs cargo and bubblewrap")


# ============================================================================================ pass@k
@pytest.mark.parametrize(
    "n, c, k, expected",
    [
        (10, 3, 1, 0.3),  # pass@1 = c / n
        (10, 3, 2, 1 - 21 / 45),  # 1 - C(7,2)/C(10,2)
        (5, 2, 3, 0.9),  # 1 - C(3,3)/C(5,3) = 1 - 1/10
        (4, 1, 4, 1.0),  # n = k: any correct sample is drawn
        (4, 0, 4, 0.0),  # n = k, none correct
        (7, 0, 3, 0.0),  # c = 0
        (7, 7, 3, 1.0),  # c = n
        (6, 4, 3, 1.0),  # n - c < k
        (1, 1, 1, 1.0),
    ],
)
def test_pass_at_k_hand_computed(n, c, k, expected):
    assert pass_at_k(n, c, k) == pytest.approx(expected, abs=1e-12)


def test_pass_at_k_equals_brute_force_over_all_draws():
    """The fraction of all k-subsets of n samples (the first c correct) holding a correct one."""
    for n in range(1, 8):
        for c in range(n + 1):
            for k in range(1, n + 1):
                draws = list(itertools.combinations(range(n), k))
                brute = sum(any(i < c for i in d) for d in draws) / len(draws)
                assert pass_at_k(n, c, k) == pytest.approx(brute, abs=1e-12), (n, c, k)


def test_pass_at_k_is_stable_where_binomials_overflow_floats():
    n, c, k = 1000, 13, 400  # C(1000, 400) ~ 1e290: the ratio of floats would lose everything
    exact = 1 - Fraction(math.comb(n - c, k), math.comb(n, k))
    assert pass_at_k(n, c, k) == pytest.approx(float(exact), rel=1e-12)
    assert mean_pass_at_k([(10, 3), (10, 0)], 1) == pytest.approx(0.15)


@pytest.mark.parametrize("n, c, k", [(5, 6, 1), (5, -1, 1), (5, 2, 0), (5, 2, 6)])
def test_pass_at_k_refuses_impossible_counts(n, c, k):
    with pytest.raises(ValueError):
        pass_at_k(n, c, k)


def test_summary_of_samples_per_problem_and_overall():
    def sample(problem, passed, compiled=True, tokens=10):
        return SampleResult(problem, 0, passed, compiled, True, True, False, True, 1, tokens, 0, 0, 1.0, 1, 0, False, "stop")

    samples = [sample("a", True), sample("a", False), sample("b", False, compiled=False, tokens=30), sample("b", False)]
    rows, overall = summarise(samples, ["a", "b"], [1, 2])
    assert [r["pass@1"] for r in rows] == [0.5, 0.0] and [r["pass@2"] for r in rows] == [1.0, 0.0]
    assert overall["pass@1"] == 0.25 and overall["pass@2"] == 0.5
    assert overall["compile_rate"] == 0.75 and overall["mean_tokens"] == 15 and overall["samples"] == 4
    assert math.isnan(overall["valid_tool_call_rate"])  # no tool call: no rate (null in the JSON)


# ============================================================================================ suites
ADD = {
    "name": "HumanEval_53_add",
    "language": "rs",
    "prompt": "/// Add two numbers x and y\n/// >>> add(2, 3)\n/// 5\nfn add(x: isize, y: isize) -> isize {\n",
    "doctests": "transform",
    "tests": "\n}\n\nfn main() {\n    let candidate = add;\n    assert_eq!(candidate(0, 1), 1);\n    assert_eq!(candidate(5, 7), 12);\n}\n",
    "stop_tokens": ["\n}"],
}
# HumanEval-X / HumanEval-Rust layout: task_id, declaration, test as a #[cfg(test)] module
MAX_ELEMENT = {
    "task_id": "Rust/35",
    "declaration": "use std::cmp::max;\n",
    "prompt": "/// Largest element of a non-empty list.\nfn max_element(xs: Vec<i32>) -> i32 {\n",
    "test": "#[cfg(test)]\nmod tests {\n    use super::*;\n    #[test]\n    fn largest() {\n"
    "        assert_eq!(max_element(vec![1, 7, 3]), 7);\n        assert_eq!(max_element(vec![-4]), -4);\n    }\n}\n",
}


def write_jsonl(path: Path, records) -> Path:
    path.write_text("".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in records))
    return path


def test_humaneval_loader_reads_both_layouts(tmp_path):
    suite = S.load_humaneval_rust(write_jsonl(tmp_path / "he.jsonl", [ADD, "", MAX_ELEMENT]))
    add, mx = suite.problems
    assert (add.id, add.entry_point, add.stop_tokens, add.tests_close_function) == ("HumanEval_53_add", "add", ["\n}"], True)
    assert add.extra == {"language": "rs", "doctests": "transform"} and add.source.endswith("he.jsonl:1")
    assert (mx.id, mx.entry_point, mx.stop_tokens, mx.tests_close_function) == ("Rust/35", "max_element", [], False)
    assert mx.prompt.startswith("use std::cmp::max;\n") and mx.source.endswith(":3")


@pytest.mark.parametrize(
    "record, message",
    [
        ({k: v for k, v in ADD.items() if k != "tests"}, "he.jsonl:2: missing field 'tests' or 'test'"),
        ({**ADD, "prompt": 7}, "he.jsonl:2: field 'prompt' must be a string"),
        ({**ADD, "stop_tokens": "\n}"}, "he.jsonl:2: field 'stop_tokens' must be a list"),
        ({**ADD, "entry_point": "sub"}, "he.jsonl:2: field 'entry_point' = 'sub'"),
        ({**ADD, "prompt": "/// no function\n"}, "he.jsonl:2: field 'prompt' defines no function"),
        ("{not json", "he.jsonl:2: not valid JSON"),
        (ADD, "he.jsonl:2: field 'name': duplicate problem id"),
    ],
)
def test_humaneval_loader_errors_name_file_line_and_field(tmp_path, record, message):
    with pytest.raises(S.SuiteError, match=message.replace("(", r"\(")):
        S.load_humaneval_rust(write_jsonl(tmp_path / "he.jsonl", [ADD, record]))


def test_programs_from_whole_functions_and_from_bodies():
    add = S.program_problem(ADD)
    whole = add.program("fn add(x: isize, y: isize) -> isize {\n    x + y\n}")
    body = add.program("    x + y\n}\n\nfn trailing_junk() {}")  # cut at the stop token, as MultiPL-E does
    for program in (whole, body):
        assert program.count("fn add(") == 1 and "x + y\n}\n\nfn main() {" in program and "trailing_junk" not in program
    mx = S.program_problem(MAX_ELEMENT)
    assert mx.program("fn max_element(xs: Vec<i32>) -> i32 { xs[0] }").startswith("use std::cmp::max;\n\nfn max_element")
    assert S.extract_code("Sure:\n```text\nx\n```\n```rust\nfn a() {}\n```\n") == "fn a() {}\n"
    assert S.extract_code("```\nfn b() {}") == "fn b() {}"  # unterminated fence: to the end
    assert S.extract_code("fn c() {}\n") == "fn c() {}"
    assert S.MAIN_TEST_NAME in S.with_main_test(whole) and "fn main() {}" in S.with_main_test("fn f() {}")


# ------------------------------------------------------------------------------------- crate tasks
CRATE_MANIFEST = manifest("evalcrate")
CRATE_LIB = SUM_OF_SQUARES_LIB
CRATE_MUTANT = CRATE_LIB.replace("x * x", "x + x")
FIXED_FUNCTION = CRATE_LIB.split("\n\n#[cfg(test)]")[0]


def write_tasks(root: Path) -> Path:
    """A tasks dir as rust/tasks.py writes it: a base snapshot and the same task in both splits."""
    from rustforge.rust.tasks import Task, unified_diff

    base = root / "bases" / "evalcrate-0.1.0"
    (base / "src").mkdir(parents=True)
    (base / "Cargo.toml").write_text(CRATE_MANIFEST)
    (base / "src" / "lib.rs").write_text(CRATE_LIB)
    records = []
    for split in ("train", "val"):
        task = Task(
            id=f"evalcrate-{split}", crate="evalcrate", version="0.1.0", split=split, base="bases/evalcrate-0.1.0",
            file="src/lib.rs", function="sum_of_squares", line=2, kind="operator", mutation="`*` -> `+`",
            changed_files=["src/lib.rs"], mutation_patch=unified_diff("src/lib.rs", CRATE_LIB, CRATE_MUTANT),
            reference_patch=unified_diff("src/lib.rs", CRATE_MUTANT, CRATE_LIB), failing_tests=["tests::sums_squares"],
            passing_tests=1, prompt="The test `tests::sums_squares` fails. The bug is in fn `sum_of_squares` in src/lib.rs (line 2).",
            mutated_sha256=hashlib.sha256(CRATE_MUTANT.encode()).hexdigest(),
        )  # fmt: skip
        records.append(task.record())
    write_jsonl(root / "tasks.jsonl", records)
    return root


def test_crate_suite_holds_the_held_out_split_only(tmp_path):
    suite = S.load_suite("crate_tasks", write_tasks(tmp_path / "tasks"))
    assert [p.id for p in suite.problems] == ["evalcrate-val"]
    with pytest.raises(S.SuiteError, match="tasks.jsonl: not found"):
        S.load_crate_tasks(tmp_path / "nowhere")
    with pytest.raises(S.SuiteError, match="expected one of"):
        S.load_suite("mbpp", tmp_path)


def test_splice_function_whole_and_body(tmp_path):
    task = S.load_crate_tasks(write_tasks(tmp_path / "tasks")).problems[0].task
    whole = splice_function(CRATE_MUTANT, task, FIXED_FUNCTION)
    assert whole == CRATE_LIB
    body = splice_function(CRATE_MUTANT, task, "xs.iter().map(|x| x * x).sum()")
    assert "pub fn sum_of_squares(xs: &[i64]) -> i64 {\nxs.iter().map(|x| x * x).sum()\n}" in body and "x + x" not in body


# ============================================================================== execution, fake model
class ScriptedGenerator:
    """RolloutEngine.generate's interface; sample `stream` writes the Harmony messages of scripts[stream], a
    tool call going through on_stop (the real tools) exactly as the engine would do it."""

    def __init__(self, tokenizer, scripts):
        self.tokenizer, self.scripts = tokenizer, scripts
        self.author = [tokenizer.start_id] + tokenizer.encode("assistant", allow_special=False)

    def _part(self, message) -> list[int]:
        ids = H.render_conversation([message], self.tokenizer, for_training=message.channel == "final").ids
        return ids[len(self.author) :]

    def generate(self, prompts, params, on_stop=None, streams=None):
        from concurrent.futures import Future

        from rustforge.rollout.engine import Completion, SequenceState

        out = []
        for index, prompt in enumerate(prompts):
            state = SequenceState(index, streams[index], list(prompt), len(prompt), params.max_new_tokens, 100_000)
            for message in self.scripts[streams[index]]:
                part = self._part(message)
                state.ids += part
                state.sampled_mask += [1] * len(part)
                state.new_tokens += len(part)
                extension = on_stop(state) if on_stop is not None else None
                if isinstance(extension, Future):
                    extension = extension.result()
                if extension is None:
                    break
                state.ids += extension
                state.sampled_mask += [0] * len(extension)
                state.turns += 1
            output = state.ids[state.prompt_len :]
            out.append(Completion(list(prompt), output, state.sampled_mask, [0.0] * len(output), "stop", state.turns))
        return out


def final(text: str):
    return H.Message("assistant", text, channel="final")


def rust_block(code: str) -> str:
    return f"Here is the function:\n```rust\n{code}\n```"


@pytest.fixture(scope="module")
def tokenizer():
    from rustforge.data.tokenizer import o200k_harmony_tokenizer

    return o200k_harmony_tokenizer()


@pytest.fixture(scope="module")
def sandbox():
    from rustforge.rust.sandbox import Sandbox, SandboxConfig

    return Sandbox(SandboxConfig(timeout_s=120))


@needs_rust
def test_single_shot_answers_pass_fail_and_fail_to_compile_in_the_sandbox(tmp_path, tokenizer, sandbox):
    """k = 2 per problem: per problem, the harness's pass@k, compile and Harmony numbers match the answers."""
    suite = S.load_humaneval_rust(write_jsonl(tmp_path / "he.jsonl", [ADD, MAX_ELEMENT]))
    tasks = S.load_crate_tasks(write_tasks(tmp_path / "tasks"))
    suite.problems += tasks.problems
    scripts = [
        [final(rust_block("fn add(x: isize, y: isize) -> isize {\n    x + y\n}"))],  # add: right
        [final(rust_block("    x - y\n}"))],  # add: a wrong body
        [final(rust_block("fn max_element(xs: Vec<i32>) -> i32 {\n    xs.iter().max()\n}"))],  # doesn't compile
        [final(rust_block("    xs.into_iter().fold(i32::MIN, max)\n}"))],  # body continuation using the declaration
        [final(rust_block(FIXED_FUNCTION))],  # crate task: fixed
        [H.Message("assistant", "thinking about it", channel="analysis")],  # no final answer: no code, not compliant
    ]
    cfg = EvalConfig(suite="humaneval_rust", k=2, pass_at=[1], work_dir=str(tmp_path))
    report = run_suite(suite, ScriptedGenerator(tokenizer, scripts), tokenizer, cfg, sandbox, model_name="scripted", progress=False)
    samples = {(s["problem"], s["sample"]): s for s in report.samples}
    add, mx, crate = ("HumanEval_53_add", "Rust/35", "evalcrate-val")
    assert samples[add, 0]["passed"] and samples[add, 0]["compiled"] and samples[add, 0]["tests_passed"] == 1
    assert not samples[add, 1]["passed"] and samples[add, 1]["compiled"] and samples[add, 1]["tests_failed"] == 1
    assert not samples[mx, 0]["compiled"] and samples[mx, 1]["passed"]
    assert samples[crate, 0]["passed"] and not samples[crate, 1]["answered"] and not samples[crate, 1]["compliant"]
    rows = {r["id"]: r for r in report.problems}
    assert rows[add]["pass@1"] == 0.5 and rows[add]["pass@2"] == 1.0 and rows[mx]["compile_rate"] == 0.5
    assert report.pass_at == [1, 2] and report.overall["pass@1"] == pytest.approx(0.5)
    assert report.overall["harmony_compliance"] == pytest.approx(5 / 6) and report.overall["mean_turns"] == 1.0
    assert samples[crate, 0]["reward"] > samples[add, 1]["reward"]  # the GRPO reward pool scored them too
    table = report.table()
    assert "overall" in table and "pass@1" in table and add in table
    assert json.loads(json.dumps(report.to_json()))["overall"]["samples"] == 6


@needs_rust
def test_agentic_episodes_run_tools_and_the_final_workspace_is_tested(tmp_path, tokenizer, sandbox):
    """One crate task fixed with apply_patch, one HumanEval problem written with write_file: the hidden tests
    run on what the tools left in the workspace."""
    suite = S.load_humaneval_rust(write_jsonl(tmp_path / "he.jsonl", [ADD]))
    task = S.load_crate_tasks(write_tasks(tmp_path / "tasks")).problems[0]
    suite.problems.append(task)
    lib = ADD["prompt"] + "    x + y\n}\n"
    scripts = [
        [H.tool_call_message("write_file", {"path": "src/lib.rs", "content": lib}), final("Implemented `add`.")],
        [H.tool_call_message("apply_patch", {"patch": task.task.reference_patch}), final("Fixed the operator.")],
    ]
    cfg = EvalConfig(suite="humaneval_rust", mode="agentic", k=1, work_dir=str(tmp_path))
    report = run_suite(suite, ScriptedGenerator(tokenizer, scripts), tokenizer, cfg, sandbox, progress=False)
    for sample in report.samples:
        assert sample["passed"] and sample["compliant"] and sample["tool_calls"] == sample["valid_tool_calls"] == 1, sample
        assert sample["turns"] == 2 and sample["ended_by"] == "answer"
    assert report.overall["pass@1"] == 1.0 and report.overall["valid_tool_call_rate"] == 1.0


# ========================================================================================= the model
def test_model_sources_resolve(tmp_path):
    cfg = from_dict(RunConfig, {"run_dir": str(tmp_path / "run")})
    run = tmp_path / "run"
    (run / "base").mkdir(parents=True)
    (run / "base" / "config.json").write_text("{}")
    assert resolve_model_source(run, cfg) == (run / "base", None, True)  # no stage finished: the bare base
    for stage in ("lang_rust", "ipo"):
        (run / stage / "adapter").mkdir(parents=True)
        (run / stage / "adapter" / "adapter_config.json").write_text("{}")
    assert resolve_model_source(run, cfg) == (run / "base", run / "ipo" / "adapter", True)  # the latest stage
    assert resolve_model_source(run / "lang_rust", cfg) == (run / "base", run / "lang_rust" / "adapter", False)
    assert resolve_model_source(run / "base", cfg) == (run / "base", None, False)
    with pytest.raises(FileNotFoundError, match="--model"):
        resolve_model_source(tmp_path / "missing", cfg)


def test_eval_config_errors_name_the_field():
    from rustforge.config import ConfigError

    with pytest.raises(ConfigError, match=r"eval: .*eval.mode must be one of"):
        from_dict(RunConfig, {"eval": {"mode": "interactive"}})
    with pytest.raises(ConfigError, match=r"eval.k: expected int"):
        from_dict(RunConfig, {"eval": {"k": "four"}})


def test_cli_eval_smoke_on_the_tiny_model(tiny_base, tmp_path):
    """`rustforge eval` on the tiny (untrained) base: k = 2 on 2 problems finishes and reports every metric."""
    from conftest import write_config

    from rustforge.cli import main

    cfg_dict, root = tiny_base
    config = write_config(tmp_path / "cfg.yaml", {**cfg_dict, "sandbox": {"timeout_s": 60}})
    data = write_jsonl(tmp_path / "he.jsonl", [ADD, MAX_ELEMENT, {**ADD, "name": "third"}])
    out = tmp_path / "report.json"
    argv = ["eval", "--config", str(config), "--model", str(root / "run"), "--suite", "humaneval_rust", "--data", str(data),
            "--k", "2", "--limit", "2", "--out", str(out), "--no-progress", "--set", "eval.max_new_tokens=24"]  # fmt: skip
    assert main(argv) == 0
    report = json.loads(out.read_text())
    assert report["model"].endswith("(no adapter)") and report["samples_per_problem"] == 2
    assert [p["id"] for p in report["problems"]] == ["HumanEval_53_add", "Rust/35"] and len(report["samples"]) == 4
    for key in ("pass@1", "pass@2", "compile_rate", "harmony_compliance", "endless_reasoning_rate", "mean_turns",
                "mean_tokens", "mean_reward", "samples", "problems"):  # fmt: skip
        assert key in report["overall"], key
    assert all(0 < s["tokens"] <= 24 for s in report["samples"])
    assert report["timings"]["generation_s"] > 0
