"""Sampling assistant turns from the model and scoring their Harmony format.

`sample_completions` runs the rollout engine (rustforge.rollout.RolloutEngine: KV cache with ring buffers
on sliding layers, sinks, continuous batching) on the model, greedy or with temperature / top-p, stopping
on <|call|> or <|return|> -- where a Harmony turn ends. Its sampler is counter-based (a hash of seed,
prompt index and position): the caller's RNG state is never touched (sampling inside a training loop must
not change what a resumed run draws) and a prompt samples the same tokens whatever the batch size.

`format_metrics` scores samples with rustforge.data.harmony.validate_completion (the one judge of "is this
completion valid Harmony"): the Harmony compliance rate (no problem found), the valid tool-call rate (tool
calls with a JSON-object argument to a known tool, ended by <|call|>) and the endless-reasoning rate (turns
that never leave the analysis channel).
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Sequence
from dataclasses import dataclass

import torch

from rustforge.data.harmony import ENDLESS_REASONING, assistant_stop_ids, parse_messages, validate_completion


@dataclass
class Sample:
    prompt_ids: list[int]
    completion_ids: list[int]  # what follows the prompt, up to and including the stop token
    stopped: bool  # ended on <|call|>/<|return|> (False: cut at max_new_tokens)


@dataclass
class SampleScore:
    problems: list[str]  # validate_completion's findings ([] = compliant)
    tool_calls: int
    valid_tool_calls: int
    endless_reasoning: bool


@torch.no_grad()
def sample_completions(
    model,
    prompts: Sequence[Sequence[int]],
    tokenizer,
    max_new_tokens: int = 256,
    temperature: float = 0.0,
    top_p: float = 1.0,
    seed: int = 0,
    batch_size: int = 8,
    streams: Sequence[int] | None = None,
) -> list[Sample]:
    """One assistant turn per prompt (ids ending with `<|start|>assistant`, as harmony.render_prompt makes),
    in the prompts' order.

    model: a RustforgeModel or a GptOssForCausalLM. temperature 0 = greedy. Deterministic for a seed, the
    same for any batch_size (sequences decoding at once). streams: each prompt's sampling stream (default
    0, 1, ...; a caller sampling a share of a larger list passes the prompts' indices in it, so each samples
    what it would in the whole list). The model's training mode is restored."""
    from rustforge.rollout import RolloutEngine, SamplingParams

    if not prompts or any(len(p) == 0 for p in prompts):
        raise ValueError("sampling: need at least one prompt, each with at least one token")
    params = SamplingParams(temperature=temperature, top_p=top_p, max_new_tokens=max_new_tokens, seed=seed)
    max_len = max(len(p) for p in prompts) + max_new_tokens + 1
    engine = RolloutEngine(model, max_batch=max(1, min(batch_size, len(prompts))), max_len=max_len,
                           stop_ids=assistant_stop_ids(tokenizer))  # fmt: skip
    try:
        completions = engine.generate(prompts, params, streams=streams)
    finally:
        engine.release()
    return [Sample(list(c.prompt_ids), list(c.output_ids), c.finish_reason == "stop") for c in completions]


# ------------------------------------------------------------------------------------------- scoring
def score_sample(
    sample: Sample,
    tokenizer,
    tool_names: Iterable[str] | None = None,
    reasoning_token_budget: int = 4096,
) -> SampleScore:
    problems = validate_completion(
        sample.completion_ids, tokenizer, tool_names=tool_names, reasoning_token_budget=reasoning_token_budget
    )
    parsed = parse_messages(sample.completion_ids, tokenizer)
    calls = [p for p in parsed if p.message.is_tool_call]
    known = None if tool_names is None else {n if "." in n else f"functions.{n}" for n in tool_names}
    valid_calls = sum(
        p.terminator == tokenizer.call_id
        and (known is None or p.message.recipient in known)
        and _is_json_object(p.message.content)
        for p in calls
    )
    answered = any(p.message.channel == "final" for p in parsed) or (
        bool(parsed) and parsed[-1].terminator == tokenizer.call_id
    )
    # cut off while still reasoning, or past the budget without an answer (validate's ENDLESS_REASONING)
    still_reasoning = bool(parsed) and parsed[-1].message.channel == "analysis" and not sample.stopped
    endless = not answered and (still_reasoning or any(p.startswith(ENDLESS_REASONING) for p in problems))
    return SampleScore(problems, len(calls), valid_calls, endless)


def _is_json_object(text: str) -> bool:
    import json

    try:
        return isinstance(json.loads(text), dict)
    except json.JSONDecodeError:
        return False


def format_metrics(
    samples: Sequence[Sample],
    tokenizer,
    tool_names: Sequence[Iterable[str] | None] | None = None,
    reasoning_token_budget: int = 4096,
) -> dict[str, float]:
    """harmony_compliance, valid_tool_call_rate (NaN when no sample calls a tool), endless_reasoning_rate,
    stop_rate (ended on a stop token) and mean completion length. tool_names: per sample, the tools its
    prompt defines (None: any tool name is accepted)."""
    if not samples:
        raise ValueError("format_metrics: no samples")
    names = list(tool_names) if tool_names is not None else [None] * len(samples)
    if len(names) != len(samples):
        raise ValueError(f"format_metrics: {len(samples)} samples but {len(names)} tool-name lists")
    scores = [score_sample(s, tokenizer, n, reasoning_token_budget) for s, n in zip(samples, names)]
    calls = sum(s.tool_calls for s in scores)
    n = len(samples)
    return {
        "harmony_compliance": sum(not s.problems for s in scores) / n,
        "valid_tool_call_rate": sum(s.valid_tool_calls for s in scores) / calls if calls else math.nan,
        "endless_reasoning_rate": sum(s.endless_reasoning for s in scores) / n,
        "stop_rate": sum(s.stopped for s in samples) / n,
        "completion_tokens": sum(len(s.completion_ids) for s in samples) / n,
        "samples": n,
    }


__all__ = [
    "Sample",
    "SampleScore",
    "format_metrics",
    "sample_completions",
    "score_sample",
]
