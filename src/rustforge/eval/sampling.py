"""Sampling assistant turns from the model and scoring their Harmony format.

`sample_completions` runs transformers' `generate` on the wrapped GptOssForCausalLM (`model.hf`) with the
KV cache and eager attention (the training masks and flex kernels are for packed batches, not decoding),
greedy or with temperature / top-p, stopping on <|call|> or <|return|> -- where a Harmony turn ends.
Prompts are batched with left padding (generate derives position ids from the attention mask).
Own code around `generate` only for what it does not do: put the model in eval mode and eager attention
and back, keep the caller's RNG state untouched (sampling inside a training loop must not change what a
resumed run draws), and cut each row at its stop token.

`format_metrics` scores samples with rustforge.data.harmony.validate_completion plus two checks it lacks
(STRAY_SPECIAL: a header token such as <|channel|> inside a message's content; BAD_TERMINATOR: <|call|>
ending a message that has no recipient, <|end|> ending a tool call, <|return|> ending a non-final message):
the Harmony compliance rate (no problem found), the valid tool-call rate (tool calls with a JSON-object
argument to a known tool, ended by <|call|>) and the endless-reasoning rate (turns that never leave the
analysis channel).
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Iterable, Sequence
from dataclasses import dataclass

import torch

from rustforge.data.harmony import (
    ENDLESS_REASONING,
    ParsedMessage,
    assistant_stop_ids,
    parse_messages,
    validate_completion,
)

STRAY_SPECIAL = "special token in content"
BAD_TERMINATOR = "bad terminator"


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


@contextlib.contextmanager
def _generation_mode(hf):
    """Eval mode and eager attention for the duration; training mode and the attention function restored."""
    was_training, attention = hf.training, hf.config._attn_implementation
    hf.eval()
    hf.config._attn_implementation = "eager"
    try:
        yield
    finally:
        hf.config._attn_implementation = attention
        hf.train(was_training)


def _generation_config(tokenizer, max_new_tokens: int, temperature: float, top_p: float):
    from transformers import GenerationConfig

    if temperature < 0 or not 0 < top_p <= 1:
        raise ValueError(f"sampling: need temperature >= 0 and 0 < top_p <= 1, got {temperature}, {top_p}")
    if max_new_tokens < 1:
        raise ValueError(f"sampling: max_new_tokens must be >= 1, got {max_new_tokens}")
    # every knob explicit: generate fills unset ones from the checkpoint's generation_config
    sampling = {"do_sample": True, "temperature": temperature, "top_p": top_p, "top_k": 0} if temperature > 0 else {
        "do_sample": False
    }
    return GenerationConfig(
        max_new_tokens=max_new_tokens,
        eos_token_id=assistant_stop_ids(tokenizer),
        pad_token_id=tokenizer.pad_id,
        use_cache=True,
        num_beams=1,
        repetition_penalty=1.0,
        **sampling,
    )


def _left_pad(prompts: Sequence[Sequence[int]], pad_id: int, device) -> tuple[torch.Tensor, torch.Tensor]:
    width = max(len(p) for p in prompts)
    ids = torch.full((len(prompts), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(prompts), width), dtype=torch.long)
    for row, prompt in enumerate(prompts):
        ids[row, width - len(prompt) :] = torch.tensor(list(prompt), dtype=torch.long)
        mask[row, width - len(prompt) :] = 1
    return ids.to(device), mask.to(device)


def _cut_at_stop(ids: list[int], stops: set[int]) -> tuple[list[int], bool]:
    for i, token in enumerate(ids):
        if token in stops:
            return ids[: i + 1], True
    return ids, False


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
) -> list[Sample]:
    """One assistant turn per prompt (ids ending with `<|start|>assistant`, as harmony.render_prompt makes),
    in the prompts' order.

    model: a RustforgeModel or a GptOssForCausalLM. temperature 0 = greedy. Deterministic for a seed (and a
    batch_size: batching changes which random numbers a row gets); the global RNG state is the same
    afterwards as before. Memory: eager attention's prefill holds batch_size x heads x T^2 fp32 scores
    for the longest prompt T of a batch (gpt-oss-20b, T = 4096, batch 1: 4 GiB)."""
    if not prompts or any(len(p) == 0 for p in prompts):
        raise ValueError("sampling: need at least one prompt, each with at least one token")
    hf = getattr(model, "hf", model)
    device = next(hf.parameters()).device
    config = _generation_config(tokenizer, max_new_tokens, temperature, top_p)
    stops = set(assistant_stop_ids(tokenizer))
    batch_size = max(1, batch_size)
    # batches of similar lengths: less padding, and eager attention's [batch, heads, T, T] scores stay small
    order = sorted(range(len(prompts)), key=lambda i: len(prompts[i]))
    samples: list[Sample | None] = [None] * len(prompts)
    fork_devices = [device] if device.type == "cuda" else []
    with torch.random.fork_rng(devices=fork_devices), _generation_mode(hf):
        torch.manual_seed(seed)
        for start in range(0, len(order), batch_size):
            rows = order[start : start + batch_size]
            ids, mask = _left_pad([prompts[i] for i in rows], tokenizer.pad_id, device)
            out = hf.generate(input_ids=ids, attention_mask=mask, generation_config=config)
            for i, generated in zip(rows, out[:, ids.shape[1] :].tolist()):
                completion, stopped = _cut_at_stop(generated, stops)
                samples[i] = Sample(list(prompts[i]), completion, stopped)
    return samples


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
    problems += structure_problems(parsed, tokenizer)
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


def structure_problems(parsed: Sequence[ParsedMessage], tokenizer) -> list[str]:
    """What validate_completion lets through: header-only special tokens inside content, and terminators
    that do not fit the message (a <|call|> is how a tool call ends, <|return|> how a final answer ends)."""
    header_only = {tokenizer.channel_id, tokenizer.message_id, tokenizer.constrain_id, tokenizer.startoftext_id,
                   tokenizer.endoftext_id, tokenizer.endofprompt_id}  # fmt: skip
    problems = []
    for number, p in enumerate(parsed, start=1):
        stray = sorted({tokenizer.id_to_token(i) for i in p.content_ids if i in header_only})
        if stray:
            problems.append(f"{STRAY_SPECIAL}: message {number} content holds {', '.join(stray)}")
        is_call = p.message.recipient is not None
        if p.terminator == tokenizer.call_id and not is_call:
            problems.append(f"{BAD_TERMINATOR}: message {number} ends with <|call|> but calls no tool")
        elif p.terminator == tokenizer.end_id and is_call:
            problems.append(f"{BAD_TERMINATOR}: tool call {number} ends with <|end|>, not <|call|>")
        elif p.terminator == tokenizer.return_id and p.message.channel != "final":
            problems.append(f"{BAD_TERMINATOR}: message {number} ({p.message.channel}) ends with <|return|>")
    return problems


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
    "BAD_TERMINATOR",
    "STRAY_SPECIAL",
    "Sample",
    "SampleScore",
    "format_metrics",
    "sample_completions",
    "score_sample",
    "structure_problems",
]
