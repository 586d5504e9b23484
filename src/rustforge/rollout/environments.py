"""RL environments: where GRPO's prompts come from, what tools an episode gets, and how it is scored.

An environment hands out `Prompt`s (Harmony ids ending with `<|start|>assistant`) per split, opens a
`Session` per episode (the tools the model may call, e.g. a materialised crate in the sandbox) and scores
finished episodes into `Score`s whose parts are the reward pool's named rewards (rust/rewards.py).

- `RustTaskEnvironment`: mined tasks (rust/tasks.py). The agent gets the crate with its failing tests and
  the tools of rust/tools.py; the reward is the pool's: cargo test on the crate as the agent left it
  (compiles / tests_pass / all_tests_pass), Harmony format, the endless-reasoning penalty and the patch
  size against the task's starting crate. Passed = every test passes.
- `HarmonyFormatEnvironment`: the same prompts without tools and without cargo (a tool call ends the
  episode); reward = the pool's harmony_format + endless_reasoning parts. The cheap reward for machines
  with no Rust toolchain (the GPU benchmark) and a format warm-up.
A test or a script can pass its own object with the same three methods.
"""

from __future__ import annotations

import shutil
import tempfile
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

from rustforge.config import RewardConfig
from rustforge.data.harmony import Message, render_prompt
from rustforge.rollout.multiturn import EpisodeResult, episode_format

FORMAT_PARTS = ("harmony_format", "endless_reasoning")


@dataclass
class Prompt:
    key: str  # groups and held-out splits are by key (a task id)
    ids: list[int]
    tool_names: list[str] | None = None  # the tools its developer message defines (None: not checked)
    payload: object = None  # the environment's own (a Task)


@dataclass
class Session:
    tools: object | None = None  # a ToolEnv, or None: a tool call ends the episode
    workdir: Path | None = None
    workspace: Path | None = None

    def close(self) -> None:
        if self.workdir is not None:
            shutil.rmtree(self.workdir, ignore_errors=True)


@dataclass
class Score:
    total: float
    parts: dict[str, float]
    passed: bool  # the task is solved (rust tasks: every test passes; format: compliant with a final answer)
    compliant: bool  # every assistant turn is well-formed Harmony
    endless_reasoning: bool
    tool_calls: int = 0
    extra: dict = field(default_factory=dict)


class HarmonyFormatEnvironment:
    """Prompts without tools; the reward pool's format rewards only."""

    def __init__(self, prompts: dict[str, list[Prompt]], tokenizer, reward_cfg: RewardConfig | None = None):
        self.splits, self.tokenizer = prompts, tokenizer
        self.reward_cfg = reward_cfg or RewardConfig()

    def prompts(self, split: str) -> list[Prompt]:
        return list(self.splits.get(split, []))

    def open(self, prompt: Prompt) -> Session:
        return Session()

    def score(self, prompts: Sequence[Prompt], results: Sequence[EpisodeResult], sessions: Sequence[Session]) -> list[Score]:
        from rustforge.rust.rewards import REWARD_FUNCTIONS, RolloutResult

        scores = []
        for prompt, result in zip(prompts, results):
            fmt = episode_format(result.completion, self.tokenizer, prompt.tool_names, self.reward_cfg.analysis_token_budget)
            rollout = RolloutResult(harmony_ok=fmt.compliant, has_final=fmt.has_final, analysis_tokens=fmt.analysis_tokens)
            parts = {name: REWARD_FUNCTIONS[name](rollout, self.reward_cfg) for name in FORMAT_PARTS}
            scores.append(Score(sum(parts.values()), parts, fmt.compliant and fmt.has_final, fmt.compliant,
                                fmt.endless_reasoning, fmt.tool_calls))  # fmt: skip
        return scores

    def close(self) -> None:
        pass


class TokenShareEnvironment:
    """A synthetic, learnable reward that needs no tokenizer, sandbox or cargo: the share of sampled tokens whose
    id is a multiple of `modulus` (reward part "token_share"). For benchmarks on random weights and tests of the
    GRPO loop; `splits` maps "train" / "val" to prompts (a missing split is empty)."""

    def __init__(self, splits: dict[str, list[Prompt]], modulus: int = 2):
        self.splits, self.modulus = splits, modulus

    def prompts(self, split: str) -> list[Prompt]:
        return self.splits.get(split, [])

    def open(self, prompt: Prompt) -> Session:
        return Session()

    def score(self, prompts, results, sessions) -> list[Score]:
        scores = []
        for r in results:
            sampled = [t for t, m in zip(r.completion.output_ids, r.completion.sampled_mask) if m]
            share = sum(t % self.modulus == 0 for t in sampled) / max(1, len(sampled))
            scores.append(Score(share, {"token_share": share}, share > 0.5, False, False))
        return scores

    def close(self) -> None:
        pass


class RustTaskEnvironment:
    """Mined Rust tasks with real tools in the sandbox and the reward pool's cargo-based rewards."""

    def __init__(
        self,
        tasks: dict[str, list],
        tokenizer,
        sandbox,
        reward_cfg: RewardConfig | None = None,
        reward_workers: int = 4,
        tool_output_chars: int = 8000,
        reasoning_effort: str = "low",
        work_root: str | Path | None = None,
    ):
        from rustforge.rust.rewards import RewardPool
        from rustforge.rust.tools import tool_definitions

        self.tokenizer, self.sandbox = tokenizer, sandbox
        self.reward_cfg = reward_cfg or RewardConfig()
        self.tool_output_chars = tool_output_chars
        self.work_root = Path(work_root or tempfile.mkdtemp(prefix="rustforge-grpo-"))
        self.work_root.mkdir(parents=True, exist_ok=True)
        self.definitions = tool_definitions(sandbox.has_tool("cargo-clippy"))
        self.tool_names = [d["name"] for d in self.definitions]
        self.splits = {split: task_prompts(ts, tokenizer, self.definitions, reasoning_effort) for split, ts in tasks.items()}
        self.pool = RewardPool(reward_workers, sandbox, self.reward_cfg, target_root=self.work_root / "reward_targets")

    def prompts(self, split: str) -> list[Prompt]:
        return list(self.splits.get(split, []))

    def open(self, prompt: Prompt) -> Session:
        from rustforge.rust.tasks import materialise
        from rustforge.rust.tools import ToolEnv

        workdir = Path(tempfile.mkdtemp(prefix="episode-", dir=self.work_root))
        workspace = materialise(prompt.payload, workdir / "crate")
        tools = ToolEnv(workspace, self.sandbox, target_dir=workdir / "target", max_output_chars=self.tool_output_chars)
        return Session(tools, workdir, workspace)

    def score(self, prompts: Sequence[Prompt], results: Sequence[EpisodeResult], sessions: Sequence[Session]) -> list[Score]:
        from rustforge.rust.rewards import RolloutResult
        from rustforge.rust.tasks import materialise

        originals: dict[str, Path] = {}
        scratch = Path(tempfile.mkdtemp(prefix="originals-", dir=self.work_root))
        try:
            rollouts, formats = [], []
            for prompt, result, session in zip(prompts, results, sessions):
                if prompt.key not in originals:  # the task's starting crate, for the patch-size penalty
                    originals[prompt.key] = materialise(prompt.payload, scratch / f"task{len(originals)}")
                fmt = episode_format(result.completion, self.tokenizer, prompt.tool_names, self.reward_cfg.analysis_token_budget)
                formats.append(fmt)
                rollouts.append(RolloutResult(
                    workspace=session.workspace, completion_ids=list(result.completion.output_ids),
                    harmony_ok=fmt.compliant, has_final=fmt.has_final, analysis_tokens=fmt.analysis_tokens,
                    original_workspace=originals[prompt.key], task_id=prompt.key,
                ))  # fmt: skip
            breakdowns = self.pool.map(rollouts)
        finally:
            shutil.rmtree(scratch, ignore_errors=True)
        return [
            Score(b.total, dict(b.parts), b.parts.get("all_tests_pass", 0.0) > 0, f.compliant, f.endless_reasoning,
                  f.tool_calls, {"tool_errors": r.log.tool_errors})
            for b, f, r in zip(breakdowns, formats, results)
        ]

    def close(self) -> None:
        self.pool.close()
        shutil.rmtree(self.work_root, ignore_errors=True)


def task_prompts(tasks: Sequence, tokenizer, definitions: list[dict], reasoning_effort: str = "low") -> list[Prompt]:
    """The agent's opening of each task: system + developer (instructions, tool definitions) + the user's
    request, rendered up to `<|start|>assistant` (the layout of rust/trajectories.py's episodes)."""
    from rustforge.rust.trajectories import agent_preamble

    names = [d["name"] for d in definitions]
    preamble = agent_preamble(definitions, reasoning_effort=reasoning_effort)
    return [Prompt(t.id, render_prompt(preamble + [Message("user", t.prompt)], tokenizer), names, t) for t in tasks]


def task_splits(tasks_dir: str | Path) -> dict[str, list]:
    from rustforge.rust.tasks import load_tasks

    return {"train": load_tasks(tasks_dir, "train"), "val": load_tasks(tasks_dir, "val")}


__all__ = ["HarmonyFormatEnvironment", "Prompt", "RustTaskEnvironment", "Score", "Session", "task_prompts", "task_splits"]
