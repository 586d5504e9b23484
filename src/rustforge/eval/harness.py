"""The evaluation harness behind `rustforge eval`: sample k answers per problem, test them, report pass@k.

For each problem of a suite (eval/suites.py) the harness renders a Harmony prompt, samples k completions
with the rollout engine (rustforge.rollout: batched, KV-cached, counter-based sampling, so a sample is the
same whatever else runs beside it), builds the crate each answer gives and runs `cargo test` on it in the
bubblewrap sandbox, through the reward pool (rust/rewards.py: thread pool, per-worker target dirs), which
also gives each sample the GRPO reward for comparison. Two modes:

- `single` (code only): no tools; the model answers with the code in its final message, extracted by
  suites.extract_code. Crate tasks: the prompt shows the task and the function as it is now; the answer
  replaces that function in the crate (a body-only answer replaces the body). HumanEval-style problems:
  the answer completes the prompt into a program with the hidden tests (suites.ProgramProblem.program).
- `agentic`: the task in Harmony with the agent's tools (rust/tools.py: read/write/patch files, cargo) and
  turns (rollout/multiturn.run_episodes runs each tool call for real in the sandbox while other samples
  decode); the crate as the agent left it runs the task's tests. HumanEval-style problems start from a
  library crate holding the stub (`todo!()` body); the hidden tests are added only when scoring.

Metrics, per problem and overall: pass@k for the configured k <= n (the unbiased estimator, eval/passk.py;
n = samples per problem), compile rate (the crate built), Harmony compliance (every assistant turn valid,
rollout/multiturn.episode_format over harmony.validate_completion), endless-reasoning rate, mean assistant
turns, sampled tokens, tool calls and reward. Written as JSON (every sample included) and printed as a table.

The generator is anything with the engine's `generate(prompts, params, on_stop=None, streams=None)` (a
RolloutEngine, the vLLM backend, or a test's scripted fake): see `Generator`.
"""

from __future__ import annotations

import json
import math
import shutil
import tempfile
import time
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Protocol

from rustforge.config import EvalConfig, RunConfig
from rustforge.eval.passk import pass_at_k
from rustforge.eval.suites import (
    CrateProblem,
    ProgramProblem,
    Suite,
    SuiteError,
    defines_function,
    extract_code,
)

SINGLE_PROGRAM_INSTRUCTIONS = (
    "You are an expert Rust programmer. Complete the Rust function the user shows you so that it passes its "
    "hidden tests. Answer with the whole function, signature included, in one ```rust code block."
)
SINGLE_CRATE_INSTRUCTIONS = (
    "You are an expert Rust programmer working on a crate. Fix or implement the function the user shows you "
    "so that `cargo test` passes. Answer with the whole corrected function (doc comment, attributes and "
    "signature included) in one ```rust code block."
)
STAGE_ADAPTERS = ("grpo", "ipo", "core_agent", "lang_rust")  # a run dir's latest adapter: first one present
ANSWER_CHARS = 4000  # of each sample's answer kept in the JSON
PROBLEM_CHARS = 200  # of each Harmony problem (they quote the text) kept in the JSON


class Generator(Protocol):
    """What the harness samples with: RolloutEngine's interface (rustforge.rollout.engine)."""

    def generate(self, prompts, params, on_stop=None, streams=None) -> list: ...


# ============================================================================================ prompts
@dataclass
class EvalPrompt:
    problem: ProgramProblem | CrateProblem
    ids: list[int]
    tool_names: list[str]  # the tools the prompt defines ([] in single mode: any call is invalid)
    start: Path | None = None  # crate tasks: the materialised starting crate (the mutant)
    shown: str = ""  # crate tasks, single mode: the function source the prompt shows


def _messages(system_effort: str, instructions: str, user: str, tools: Sequence[dict] = ()):
    from rustforge.data.harmony import Message, developer_message, system_message

    return [system_message(reasoning_effort=system_effort), developer_message(instructions, list(tools)), Message("user", user)]


def locate_function(source: str, task):
    """The task's function (rust/tasks.find_functions) in the mutated file: by line, else by name."""
    from rustforge.rust.tasks import find_functions

    found = find_functions(source)
    return next((f for f in found if f.line == task.line), None) or next((f for f in found if f.qualname == task.function), None)


def splice_function(source: str, task, code: str) -> str | None:
    """The file with the answer in place of the task's function (a whole function replaces doc comment
    through closing brace; a body replaces the body); None when the function cannot be found."""
    fn = locate_function(source, task)
    if fn is None:
        return None
    if defines_function(code, task.function.rsplit("::", 1)[-1]):
        return source[: fn.item_start] + code.strip("\n") + source[fn.body_close + 1 :]
    return source[: fn.body_open + 1] + "\n" + code.strip("\n") + "\n" + fn.indent + source[fn.body_close :]


def build_prompts(problems, mode: str, tokenizer, work: Path, reasoning_effort: str = "low") -> list[EvalPrompt]:
    """One EvalPrompt per problem. Crate tasks are materialised once (the start of every sample)."""
    from rustforge.data.harmony import render_prompt
    from rustforge.rust.tasks import materialise
    from rustforge.rust.tools import tool_definitions

    definitions = tool_definitions(include_clippy=False) if mode == "agentic" else []
    names = [d["name"] for d in definitions]
    prompts = []
    for i, problem in enumerate(problems):
        if isinstance(problem, CrateProblem):
            task = problem.task
            start = materialise(task, work / f"problem{i}" / "start")
            if mode == "agentic":
                from rustforge.rollout.environments import task_prompts

                (prompt,) = task_prompts([task], tokenizer, definitions, reasoning_effort)
                prompts.append(EvalPrompt(problem, prompt.ids, names, start))
                continue
            source = (start / task.file).read_text(encoding="utf-8", errors="replace")
            fn = locate_function(source, task)
            shown = source[fn.item_start : fn.body_close + 1] if fn else ""
            user = f"{task.prompt}\n\n`{task.function}` in {task.file} as it is now:\n```rust\n{shown}\n```"
            messages = _messages(reasoning_effort, SINGLE_CRATE_INSTRUCTIONS, user)
            prompts.append(EvalPrompt(problem, render_prompt(messages, tokenizer), [], start, shown))
        elif mode == "agentic":
            user = (
                f"Implement `{problem.entry_point}` in src/lib.rs (its body is `todo!()`) as its doc comment "
                "says. Hidden tests will call it; make sure the crate builds."
            )
            messages = _messages(reasoning_effort, _agent_instructions(), user, definitions)
            prompts.append(EvalPrompt(problem, render_prompt(messages, tokenizer), names))
        else:
            user = f"Complete this Rust function:\n```rust\n{problem.prompt.rstrip()}\n```"
            messages = _messages(reasoning_effort, SINGLE_PROGRAM_INSTRUCTIONS, user)
            prompts.append(EvalPrompt(problem, render_prompt(messages, tokenizer), []))
    return prompts


def _agent_instructions() -> str:
    from rustforge.rust.trajectories import AGENT_INSTRUCTIONS

    return AGENT_INSTRUCTIONS


# ============================================================================================ samples
@dataclass
class SampleResult:
    problem: str
    sample: int
    passed: bool  # the crate builds and every test passes
    compiled: bool
    answered: bool  # single mode: an answer with code was found; agentic: the episode ran
    compliant: bool  # every assistant turn is valid Harmony
    endless_reasoning: bool
    has_final: bool
    turns: int  # assistant turns (runs of sampled tokens)
    tokens: int  # sampled tokens
    tool_calls: int
    valid_tool_calls: int
    reward: float  # the GRPO reward pool's total (rust/rewards.py)
    tests_passed: int
    tests_failed: int
    timed_out: bool
    finish_reason: str
    ended_by: str = ""  # agentic: answer | turn_budget | token_budget | no_tool
    harmony_problems: list[str] = field(default_factory=list)
    answer: str = ""


def final_answer(completion, tokenizer) -> tuple[str, bool]:
    """(text of the last final-channel message, True), else (the sampled text, False): a fenced block in a
    non-compliant answer still counts (the compile rate sees it; Harmony compliance is scored apart)."""
    from rustforge.data.harmony import parse_messages
    from rustforge.rollout.multiturn import sampled_turns

    turns = sampled_turns(completion)
    finals = [p.message.content for turn in turns for p in parse_messages(turn, tokenizer) if p.message.channel == "final"]
    if finals:
        return str(finals[-1]), True
    return "".join(tokenizer.decode(turn) for turn in turns), False


def _single_workspace(prompt: EvalPrompt, code: str, directory: Path) -> Path | None:
    """The crate a single-shot answer gives, or None when it gives none (no function to put it in)."""
    if isinstance(prompt.problem, ProgramProblem):
        from rustforge.eval.suites import write_program_crate

        return write_program_crate(directory, prompt.problem.program(code))
    task = prompt.problem.task
    spliced = splice_function((prompt.start / task.file).read_text(encoding="utf-8", errors="replace"), task, code)
    if spliced is None:
        return None
    shutil.copytree(prompt.start, directory, symlinks=True)
    (directory / task.file).write_text(spliced, encoding="utf-8")
    return directory


def _agentic_workspace(prompt: EvalPrompt, directory: Path) -> Path:
    """The crate an episode starts from (the agent's workspace)."""
    if isinstance(prompt.problem, ProgramProblem):
        from rustforge.eval.suites import write_stub_crate

        return write_stub_crate(directory, prompt.problem)
    shutil.copytree(prompt.start, directory, symlinks=True)
    return directory


def _scored_workspace(prompt: EvalPrompt, workspace: Path, directory: Path) -> Path:
    """What runs the tests after an episode: the crate as left (crate tasks), or the agent's src/lib.rs
    with the hidden tests in a scratch crate (HumanEval-style)."""
    if isinstance(prompt.problem, CrateProblem):
        return workspace
    from rustforge.eval.suites import write_program_crate

    lib = workspace / "src" / "lib.rs"
    source = lib.read_text(encoding="utf-8", errors="replace") if lib.is_file() else ""
    return write_program_crate(directory, prompt.problem.program_from_source(source))


# ============================================================================================== report
@dataclass
class EvalReport:
    suite: str
    mode: str
    model: str
    samples_per_problem: int
    pass_at: list[int]
    overall: dict
    problems: list[dict]
    samples: list[dict]
    skipped: list[str] = field(default_factory=list)  # problems left out (prompt too long)
    timings: dict = field(default_factory=dict)
    config: dict = field(default_factory=dict)

    def to_json(self) -> dict:
        return _json_safe(asdict(self))

    def write(self, path: str | Path) -> Path:
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(self.to_json(), indent=2) + "\n")
        return path

    def table(self, max_rows: int = 40) -> str:
        """Per problem and overall: n, pass@k, compile, harmony, endless, turns, tokens, reward."""
        ks = [f"pass@{k}" for k in self.pass_at]
        cols = [*ks, "compile", "harmony", "endless", "turns", "tokens", "reward"]
        keys = [*ks, "compile_rate", "harmony_compliance", "endless_reasoning_rate", "mean_turns", "mean_tokens", "mean_reward"]
        width = max([len("overall"), *(len(p["id"]) for p in self.problems[:max_rows])])
        width = min(width, 48)
        head = f"{'problem':<{width}} {'n':>3} {'pass':>4} " + " ".join(f"{c:>8}" for c in cols)
        lines = [
            f"{self.suite} ({self.mode}, n={self.samples_per_problem} samples/problem) on {self.model}",
            head,
            "-" * len(head),
        ]

        def row(name: str, n, c, metrics: dict) -> str:
            cells = " ".join(_cell(metrics.get(k)) for k in keys)
            return f"{name[:width]:<{width}} {n:>3} {c:>4} {cells}"

        for p in self.problems[:max_rows]:
            lines.append(row(p["id"], p["n"], p["correct"], p))
        if len(self.problems) > max_rows:
            lines.append(f"... {len(self.problems) - max_rows} more problems (see the JSON)")
        lines.append("-" * len(head))
        o = self.overall
        lines.append(row("overall", o["samples"], o["correct"], o))
        if self.skipped:
            lines.append(f"skipped (prompt too long): {len(self.skipped)}")
        if self.timings:
            lines.append("  ".join(f"{k} {v:.1f}" if isinstance(v, float) else f"{k} {v}" for k, v in self.timings.items()))
        return "\n".join(lines)


def _cell(value) -> str:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return f"{'n/a':>8}"
    return f"{value:>8.1f}" if abs(value) >= 10 else f"{value:>8.3f}"


def _json_safe(value):
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        return {k: _json_safe(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_json_safe(v) for v in value]
    return value


def _mean(values) -> float:
    values = list(values)
    return sum(values) / len(values) if values else math.nan


def sample_rates(samples: Sequence[SampleResult]) -> dict:
    calls = sum(s.tool_calls for s in samples)
    return {
        "compile_rate": _mean(s.compiled for s in samples),
        "harmony_compliance": _mean(s.compliant for s in samples),
        "endless_reasoning_rate": _mean(s.endless_reasoning for s in samples),
        "answered_rate": _mean(s.answered for s in samples),
        "mean_turns": _mean(s.turns for s in samples),
        "mean_tokens": _mean(s.tokens for s in samples),
        "mean_tool_calls": _mean(s.tool_calls for s in samples),
        "valid_tool_call_rate": sum(s.valid_tool_calls for s in samples) / calls if calls else math.nan,
        "mean_reward": _mean(s.reward for s in samples),
    }


def summarise(samples: Sequence[SampleResult], problem_ids: Sequence[str], pass_at: Sequence[int]) -> tuple[list[dict], dict]:
    """(per-problem metrics, overall): pass@k from each problem's (n, c); rates over samples."""
    by_problem: dict[str, list[SampleResult]] = {pid: [] for pid in problem_ids}
    for s in samples:
        by_problem[s.problem].append(s)
    rows = []
    for pid, group in by_problem.items():
        n, c = len(group), sum(s.passed for s in group)
        row = {"id": pid, "n": n, "correct": c, **{f"pass@{k}": pass_at_k(n, c, k) for k in pass_at if k <= n}}
        rows.append({**row, **sample_rates(group)})
    overall = {"problems": len(rows), "samples": len(samples), "correct": sum(s.passed for s in samples)}
    for k in pass_at:
        overall[f"pass@{k}"] = _mean(r[f"pass@{k}"] for r in rows)
    overall.update(sample_rates(samples))
    return rows, overall


def pass_at_list(k_samples: int, configured: Sequence[int]) -> list[int]:
    """The pass@k reported: the configured k that n samples allow, and n itself."""
    return sorted({k for k in configured if 1 <= k <= k_samples} | {k_samples})


# ================================================================================================ run
def run_suite(
    suite: Suite,
    generator: Generator | Callable[[int], Generator],
    tokenizer,
    eval_cfg: EvalConfig,
    sandbox,
    *,
    rewards=None,
    max_turns: int = 8,
    tool_output_chars: int = 8000,
    model_name: str = "",
    progress: bool = True,
) -> EvalReport:
    """Evaluate `suite` (its first eval_cfg.limit problems) with eval_cfg.k samples per problem.

    generator: a Generator, or a function max_len -> Generator called once the prompts are known (max_len =
    the longest prompt + max_new_tokens + 1 in single mode, eval_cfg.max_context in agentic mode); one built
    here is released at the end."""
    from rustforge.config import RewardConfig
    from rustforge.rollout.sampling import SamplingParams
    from rustforge.rust.rewards import RewardPool

    if eval_cfg.mode not in ("single", "agentic"):
        raise ValueError(f"eval.mode must be single or agentic, got {eval_cfg.mode!r}")
    t_start = time.perf_counter()
    problems = suite.problems[: eval_cfg.limit] if eval_cfg.limit else list(suite.problems)
    work = Path(tempfile.mkdtemp(prefix="rustforge-eval-", dir=eval_cfg.work_dir))
    built = None
    pool = RewardPool(eval_cfg.test_workers, sandbox, rewards or RewardConfig(),
                      target_root=Path(eval_cfg.target_dir) if eval_cfg.target_dir else work / "targets")  # fmt: skip
    try:
        prompts = build_prompts(problems, eval_cfg.mode, tokenizer, work, eval_cfg.reasoning_effort)
        skipped = [p.problem.id for p in prompts if len(p.ids) > eval_cfg.max_prompt_tokens]
        prompts = [p for p in prompts if len(p.ids) <= eval_cfg.max_prompt_tokens]
        if not prompts:
            raise SuiteError(f"eval: every prompt of {suite.name} is longer than eval.max_prompt_tokens = {eval_cfg.max_prompt_tokens}")
        if not hasattr(generator, "generate"):
            longest = max(len(p.ids) for p in prompts)
            generator = built = generator(eval_cfg.max_context if eval_cfg.mode == "agentic" else longest + eval_cfg.max_new_tokens + 1)
        k = eval_cfg.k
        temperature = eval_cfg.temperature
        params = SamplingParams(temperature=temperature, top_p=eval_cfg.top_p if temperature > 0 else 1.0,
                                max_new_tokens=eval_cfg.max_new_tokens, seed=eval_cfg.seed)  # fmt: skip
        per_sample = [(i, j) for i in range(len(prompts)) for j in range(k)]
        streams = [i * k + j for i, j in per_sample]  # stable ids: the same samples for the same problem order
        sample_dirs = [work / f"problem{i}" / f"sample{j}" for i, j in per_sample]
        t_gen = time.perf_counter()
        if eval_cfg.mode == "agentic":
            results, workspaces = _run_agentic(prompts, per_sample, sample_dirs, generator, tokenizer, params,
                                               streams, sandbox, max_turns, tool_output_chars)  # fmt: skip
        else:
            completions = generator.generate([prompts[i].ids for i, _ in per_sample], params, streams=streams)
            results, workspaces = [(c, None) for c in completions], [None] * len(per_sample)
        generation_s = time.perf_counter() - t_gen
        t_test = time.perf_counter()
        samples = _score(prompts, per_sample, sample_dirs, results, workspaces, tokenizer, pool, eval_cfg, rewards, progress)
        test_s = time.perf_counter() - t_test
    finally:
        pool.close()
        if built is not None and hasattr(built, "release"):
            built.release()
        if not eval_cfg.keep_workspaces:
            shutil.rmtree(work, ignore_errors=True)
    pass_at = pass_at_list(k, eval_cfg.pass_at)
    rows, overall = summarise(samples, [p.problem.id for p in prompts], pass_at)
    timings = {"generation_s": generation_s, "test_s": test_s, "wall_s": time.perf_counter() - t_start}
    stats = getattr(generator, "stats", None)
    if stats is not None and getattr(stats, "decode_tok_s", 0):
        timings["decode_tok_s"] = stats.decode_tok_s
    return EvalReport(suite.name, eval_cfg.mode, model_name, k, pass_at, overall, rows,
                      [asdict(s) for s in samples], skipped, timings, asdict(eval_cfg))  # fmt: skip


def _run_agentic(prompts, per_sample, sample_dirs, generator, tokenizer, params, streams, sandbox, max_turns, tool_output_chars):
    from rustforge.rollout.multiturn import run_episodes
    from rustforge.rust.tools import ToolEnv

    workspaces, envs = [], []
    for (i, _), directory in zip(per_sample, sample_dirs):
        workspace = _agentic_workspace(prompts[i], directory / "crate")
        workspaces.append(workspace)
        envs.append(ToolEnv(workspace, sandbox, target_dir=directory / "target", max_output_chars=tool_output_chars,
                            enable_clippy=False))  # fmt: skip
    with ThreadPoolExecutor(max(1, min(4, len(envs))), thread_name_prefix="eval-tool") as executor:
        episodes = run_episodes(generator, [prompts[i].ids for i, _ in per_sample], envs, tokenizer, params,
                                max_turns=max_turns, executor=executor, streams=streams)  # fmt: skip
    return [(e.completion, e.log) for e in episodes], workspaces


def _score(prompts, per_sample, sample_dirs, results, workspaces, tokenizer, pool, eval_cfg, rewards, progress) -> list[SampleResult]:
    from tqdm import tqdm

    from rustforge.rollout.multiturn import episode_format
    from rustforge.rust.rewards import RolloutResult
    from rustforge.rust.tasks import check_report_fixed

    budget = rewards.analysis_token_budget if rewards is not None else 4096
    pending = []
    for (i, j), directory, (completion, log), workspace in zip(per_sample, sample_dirs, results, workspaces):
        prompt = prompts[i]
        fmt = episode_format(completion, tokenizer, prompt.tool_names, budget)
        if eval_cfg.mode == "agentic":
            answer, answered = "", True
            workspace = _scored_workspace(prompt, workspace, directory / "scored")
        else:
            text, from_final = final_answer(completion, tokenizer)
            answer = extract_code(text) if from_final or "```" in text else ""  # outside a final: fenced code only
            answered = bool(answer.strip())
            workspace = _single_workspace(prompt, answer, directory / "crate") if answered else None
            answered = workspace is not None
        rollout = RolloutResult(workspace=workspace, completion_ids=list(completion.output_ids), harmony_ok=fmt.compliant,
                                has_final=fmt.has_final, analysis_tokens=fmt.analysis_tokens,
                                original_workspace=prompt.start if workspace is not None else None, task_id=prompt.problem.id)  # fmt: skip
        pending.append((prompt, j, completion, log, fmt, answer, answered, pool.submit(rollout)))
    samples = []
    for prompt, j, completion, log, fmt, answer, answered, future in tqdm(pending, desc="cargo test", disable=not progress):
        breakdown = future.result()
        report = breakdown.report
        samples.append(SampleResult(
            problem=prompt.problem.id, sample=j,
            passed=report is not None and check_report_fixed(report), compiled=report is not None and report.compiled,
            answered=answered, compliant=fmt.compliant, endless_reasoning=fmt.endless_reasoning, has_final=fmt.has_final,
            turns=_turns(completion), tokens=completion.num_sampled, tool_calls=fmt.tool_calls,
            valid_tool_calls=fmt.valid_tool_calls, reward=breakdown.total,
            tests_passed=report.passed if report else 0, tests_failed=report.failed if report else 0,
            timed_out=bool(report and report.timed_out), finish_reason=completion.finish_reason,
            ended_by=getattr(log, "ended_by", ""), harmony_problems=[p[:PROBLEM_CHARS] for p in fmt.problems[:3]],
            answer=answer[:ANSWER_CHARS],
        ))  # fmt: skip
    return samples


def _turns(completion) -> int:
    from rustforge.rollout.multiturn import sampled_turns

    return len(sampled_turns(completion))


# ========================================================================================= the model
@dataclass
class EvalModel:
    model: object  # RustforgeModel (base + LoRA) or a plain GptOssForCausalLM (an exported directory)
    tokenizer: object
    name: str  # what was loaded, in words
    model_dir: str  # the weights directory (the vLLM backend loads it)
    adapter: Path | None = None


def resolve_model_source(source: str | Path, cfg: RunConfig) -> tuple[Path, Path | None, bool]:
    """(weights dir, adapter dir or None, is_run) for --model: an adapter dir (base = the config's), a
    stage dir holding adapter/, a model dir with config.json (a base or an export), or a run dir (its base
    + the latest stage adapter of STAGE_ADAPTERS, or the bare base when no stage finished)."""
    from rustforge.model.base import base_dir

    path = Path(source)
    if not path.is_dir():
        raise FileNotFoundError(f"--model {path}: not a directory (a run dir, a stage adapter or an exported model)")
    if (path / "adapter_config.json").is_file():
        return base_dir(cfg), path, False
    if (path / "adapter" / "adapter_config.json").is_file():
        run_dir = path.parent
        base = run_dir / "base" if (run_dir / "base" / "config.json").is_file() else base_dir(cfg)
        return base, path / "adapter", False
    if (path / "config.json").is_file():
        return path, None, False
    base = path / "base" if (path / "base" / "config.json").is_file() else _run_base(path, cfg)
    adapter = next((path / s / "adapter" for s in STAGE_ADAPTERS if (path / s / "adapter" / "adapter_config.json").is_file()), None)
    return base, adapter, True


def _run_base(run_dir: Path, cfg: RunConfig) -> Path:
    """A run dir without base/ trained model.path: its config.yaml says which (else the current config)."""
    from rustforge.config import load_config
    from rustforge.model.base import base_dir

    run_cfg = load_config(run_dir / "config.yaml") if (run_dir / "config.yaml").is_file() else cfg
    base = base_dir(run_cfg) if run_cfg.model.path else None
    if base is None or not (base / "config.json").is_file():
        raise FileNotFoundError(f"--model {run_dir}: no base model found (no base/ and no model.path in its config.yaml)")
    return base


def load_eval_model(cfg: RunConfig, source: str | Path, device=None) -> EvalModel:
    """The model `source` names (see resolve_model_source), on `device` (default: CUDA if present)."""
    import torch

    from rustforge.data.tokenizer import load_tokenizer
    from rustforge.model.gptoss import build_model, resolve_dtype

    device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    weights, adapter, _ = resolve_model_source(source, cfg)
    tokenizer = load_tokenizer(weights)
    if adapter is None and _needs_load_export(weights):
        from rustforge.export.hf import load_export

        model = load_export(weights, dtype=resolve_dtype(cfg.model, device)).to(device)
        return EvalModel(model, tokenizer, f"{weights}", str(weights))
    lora = None
    if adapter is not None:
        from rustforge.model.lora import adapter_lora_config, load_adapter

        lora = adapter_lora_config(json.loads((adapter / "adapter_config.json").read_text()))
    model = build_model(replace(cfg.model, path=str(weights)), lora, device=device)
    if adapter is not None:
        load_adapter(model.hf, adapter)
    name = f"{weights} + {adapter}" if adapter is not None else f"{weights} (no adapter)"
    return EvalModel(model, tokenizer, name, str(weights), adapter)


def _needs_load_export(directory: Path) -> bool:
    """An NVFP4 export (export/nvfp4.py), which only export.hf.load_export reads; bf16 and MXFP4 directories
    (bases and exports) load through build_model, with the grouped experts."""
    from rustforge.export import nvfp4

    raw = json.loads((directory / "config.json").read_text())
    return (raw.get("quantization_config") or {}).get("quant_method") == nvfp4.QUANT_METHOD


def make_generator(cfg: RunConfig, loaded: EvalModel, max_len: int, samples: int):
    """The rollout backend of cfg.rollout (RolloutEngine, or vLLM) with Harmony's turn stops."""
    from rustforge.data.harmony import assistant_stop_ids
    from rustforge.train.grpo import make_engine

    rollout = replace(cfg.rollout, max_batch=max(1, min(cfg.rollout.max_batch, samples)))
    engine = make_engine(loaded.model, rollout, max_len, assistant_stop_ids(loaded.tokenizer), loaded.model_dir)
    if hasattr(engine, "load_adapter"):
        engine.load_adapter(str(loaded.adapter) if loaded.adapter is not None else None)
    return engine


def default_out(cfg: RunConfig, eval_cfg: EvalConfig) -> Path:
    return Path(cfg.run_dir) / "eval" / f"{eval_cfg.suite}-{eval_cfg.mode}.json"


def evaluate(cfg: RunConfig, model: str | Path, eval_cfg: EvalConfig | None = None, progress: bool = True,
             out: str | Path | None = None) -> EvalReport:  # fmt: skip
    """`rustforge eval`: load `model` (resolve_model_source), run the suite of eval_cfg (default cfg.eval),
    write the JSON (out, else eval_cfg.out, else <run_dir>/eval/<suite>-<mode>.json) and return the report.
    The pipeline's efficacy rows can call this for a stage's start and end models."""
    from rustforge.eval.suites import canonical_suite_name, load_suite
    from rustforge.rust.sandbox import Sandbox

    eval_cfg = eval_cfg or cfg.eval
    eval_cfg = replace(eval_cfg, suite=canonical_suite_name(eval_cfg.suite))
    data = eval_cfg.data or (cfg.tasks.out_dir if eval_cfg.suite == "crate_tasks" else None)
    suite = load_suite(eval_cfg.suite, data, eval_cfg.split)
    loaded = load_eval_model(cfg, model)
    sandbox_cfg = cfg.sandbox if eval_cfg.test_timeout_s is None else replace(cfg.sandbox, timeout_s=eval_cfg.test_timeout_s)
    count = min(len(suite.problems), eval_cfg.limit or len(suite.problems)) * eval_cfg.k
    report = run_suite(suite, lambda max_len: make_generator(cfg, loaded, max_len, count), loaded.tokenizer, eval_cfg,
                       Sandbox(sandbox_cfg), rewards=cfg.rewards, max_turns=eval_cfg.max_turns,
                       tool_output_chars=cfg.rollout.tool_output_chars, model_name=loaded.name, progress=progress)  # fmt: skip
    report.write(out or eval_cfg.out or default_out(cfg, eval_cfg))
    return report


__all__ = [
    "EvalModel",
    "EvalPrompt",
    "EvalReport",
    "Generator",
    "SampleResult",
    "build_prompts",
    "default_out",
    "evaluate",
    "extract_code",
    "final_answer",
    "load_eval_model",
    "locate_function",
    "make_generator",
    "pass_at_list",
    "resolve_model_source",
    "run_suite",
    "sample_rates",
    "splice_function",
    "summarise",
]
