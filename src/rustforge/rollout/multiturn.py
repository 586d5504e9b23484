"""Multi-turn agent rollouts: when the model ends a message with a tool call, run the tool for real and go on.

`ToolTurns` is the engine's `on_stop` handler. On <|call|> it parses the message the model just finished
(rustforge.data.harmony), runs `functions.NAME` with its JSON arguments through the episode's
rustforge.rust.tools.ToolEnv (cargo in the bubblewrap sandbox), and returns the Harmony rendering of the
tool's answer followed by `<|start|>assistant` -- exactly what a fresh render of the conversation would
hold there -- so the engine appends it (sampled_mask 0: the model is never trained on it) and the model
continues from its cache. Tools run on a thread pool when one is given, so other sequences keep decoding
(the work is sandboxed subprocesses). Budgets: `max_turns` tool calls per episode, and the engine's token
budget (max_new_tokens over all turns, max_len of context); a tool call made with no budget left ends
the episode without running the tool.

`episode_format` scores what the model wrote: each maximal run of sampled tokens is one assistant turn
(it starts right after a `<|start|>assistant` the prompt or the environment supplied), checked with
harmony.validate_completion, the one judge of valid Harmony.
"""

from __future__ import annotations

import threading
from collections.abc import Sequence
from concurrent.futures import Executor
from dataclasses import dataclass, field

from rustforge.data.harmony import (
    ENDLESS_REASONING,
    parse_messages,
    render_conversation,
    tool_result_message,
    validate_completion,
)
from rustforge.rollout.engine import Completion, RolloutEngine, SequenceState
from rustforge.rollout.sampling import SamplingParams

FUNCTIONS_PREFIX = "functions."


@dataclass
class EpisodeLog:
    """What the environment did in one episode."""

    tool_calls: list[tuple[str, str]] = field(default_factory=list)  # (tool name, arguments as written)
    tool_errors: int = 0  # tool outputs starting with "error:"
    ended_by: str = ""  # "answer" | "turn_budget" | "token_budget" | "no_tool" | "" (still running / length)


class ToolTurns:
    """on_stop handler for RolloutEngine: tool calls go to `envs[request index]` (a ToolEnv, or None for an
    episode without tools, whose tool calls end it)."""

    def __init__(
        self,
        tokenizer,
        envs: Sequence,
        max_turns: int = 8,
        executor: Executor | None = None,
        min_budget: int = 16,
    ):
        if max_turns < 0:
            raise ValueError(f"rollout.max_turns must be >= 0, got {max_turns}")
        self.tokenizer, self.envs, self.max_turns = tokenizer, list(envs), max_turns
        self.executor, self.min_budget = executor, min_budget
        self.logs = [EpisodeLog() for _ in self.envs]
        self._lock = threading.Lock()
        self._assistant = [tokenizer.start_id] + tokenizer.encode("assistant", allow_special=False)

    def __call__(self, state: SequenceState):
        log = self.logs[state.index]
        if state.ids[-1] != self.tokenizer.call_id:
            log.ended_by = "answer"
            return None
        call = self._last_call(state.ids)
        env = self.envs[state.index]
        if call is None or env is None:
            log.ended_by = "no_tool"
            return None
        if state.turns >= self.max_turns:
            log.ended_by = "turn_budget"
            return None
        if state.budget_left < self.min_budget:
            log.ended_by = "token_budget"
            return None
        name, arguments = call
        log.tool_calls.append((name, arguments))
        if self.executor is None:
            return self._run(env, name, arguments, log)
        return self.executor.submit(self._run, env, name, arguments, log)

    def _last_call(self, ids: list[int]) -> tuple[str, str] | None:
        """(tool name, arguments) of the message that just ended with <|call|>, or None if it calls no function."""
        start = len(ids) - 1 - ids[::-1].index(self.tokenizer.start_id) if self.tokenizer.start_id in ids else 0
        parsed = parse_messages(ids[start:], self.tokenizer, implied_role=None)
        if not parsed:
            return None
        recipient = parsed[-1].message.recipient or ""
        if not recipient.startswith(FUNCTIONS_PREFIX):
            return None
        return recipient[len(FUNCTIONS_PREFIX) :], parsed[-1].message.content

    def _run(self, env, name: str, arguments: str, log: EpisodeLog) -> list[int]:
        output = env.call(name, arguments)
        if output.startswith("error:"):
            with self._lock:
                log.tool_errors += 1
        message = tool_result_message(name, output)
        return render_conversation([message], self.tokenizer, for_training=False).ids + self._assistant


@dataclass
class EpisodeResult:
    completion: Completion
    log: EpisodeLog


def run_episodes(
    engine: RolloutEngine,
    prompts: Sequence[Sequence[int]],
    envs: Sequence,
    tokenizer,
    params: SamplingParams,
    max_turns: int = 8,
    executor: Executor | None = None,
    streams: Sequence[int] | None = None,
) -> list[EpisodeResult]:
    """One multi-turn episode per prompt (Harmony ids ending with `<|start|>assistant`), tools from envs."""
    handler = ToolTurns(tokenizer, envs, max_turns=max_turns, executor=executor)
    completions = engine.generate(prompts, params, on_stop=handler, streams=streams)
    for completion, log in zip(completions, handler.logs):
        if not log.ended_by and completion.finish_reason != "stop":
            log.ended_by = "token_budget"
    return [EpisodeResult(c, log) for c, log in zip(completions, handler.logs)]


# --------------------------------------------------------------------------------------------- format
@dataclass
class EpisodeFormat:
    compliant: bool  # every assistant turn is well-formed Harmony
    problems: list[str]
    has_final: bool
    analysis_tokens: int
    tool_calls: int
    valid_tool_calls: int  # ended by <|call|>, JSON-object arguments, a known tool
    endless_reasoning: bool  # no final answer, and reasoning ran past the budget or was cut off


def sampled_turns(completion: Completion) -> list[list[int]]:
    """The runs of model-sampled tokens of a completion, one per assistant turn."""
    turns, current = [], []
    for token, sampled in zip(completion.output_ids, completion.sampled_mask):
        if sampled:
            current.append(token)
        elif current:
            turns.append(current)
            current = []
    if current:
        turns.append(current)
    return turns


def episode_format(
    completion: Completion, tokenizer, tool_names: Sequence[str] | None = None, reasoning_token_budget: int = 4096
) -> EpisodeFormat:
    problems, has_final, analysis, calls, valid_calls = [], False, 0, 0, 0
    known = None if tool_names is None else {n if "." in n else FUNCTIONS_PREFIX + n for n in tool_names}
    turns = sampled_turns(completion)
    for number, turn in enumerate(turns, start=1):
        found = validate_completion(turn, tokenizer, tool_names=tool_names, reasoning_token_budget=reasoning_token_budget)
        parsed = parse_messages(turn, tokenizer)
        problems += [f"turn {number}: {p}" for p in found]
        for p in parsed:
            has_final |= p.message.channel == "final"
            analysis += len(p.content_ids) if p.message.channel == "analysis" else 0
            if p.message.is_tool_call:
                calls += 1
                valid_calls += (
                    p.terminator == tokenizer.call_id
                    and (known is None or p.message.recipient in known)
                    and _is_json_object(p.message.content)
                )
    cut_reasoning = completion.finish_reason != "stop" and bool(turns) and _ends_in_analysis(turns[-1], tokenizer)
    endless = not has_final and (analysis > reasoning_token_budget or cut_reasoning or any(ENDLESS_REASONING in p for p in problems))
    return EpisodeFormat(
        compliant=bool(turns) and not problems,
        problems=problems,
        has_final=has_final,
        analysis_tokens=analysis,
        tool_calls=calls,
        valid_tool_calls=valid_calls,
        endless_reasoning=endless,
    )


def _ends_in_analysis(turn: list[int], tokenizer) -> bool:
    parsed = parse_messages(turn, tokenizer)
    return bool(parsed) and parsed[-1].message.channel == "analysis"


def _is_json_object(text: str) -> bool:
    import json

    try:
        return isinstance(json.loads(text), dict)
    except json.JSONDecodeError:
        return False


__all__ = ["EpisodeFormat", "EpisodeLog", "EpisodeResult", "ToolTurns", "episode_format", "run_episodes", "sampled_turns"]
