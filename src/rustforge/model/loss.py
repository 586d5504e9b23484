"""Token log-probabilities and cross-entropy from hidden states, never building [tokens x vocab] logits.

GPT-OSS's vocabulary is 201k, so full logits for a 16k-token batch would take ~13 GB in fp32. Own code
(a torch.autograd.Function on plain torch ops) because neither torch nor transformers ships a chunked
loss whose backward recomputes the logits: forward walks the tokens `chunk_size` at a time, keeping only
each token's logsumexp; backward recomputes each chunk's logits and turns softmax - onehot into
gradients for hidden (and weight, when it trains). Peak extra memory is O(chunk_size x vocab).

Logits are `hidden_chunk @ weight.T` in the inputs' dtype (fp32 accumulation inside the matmul), upcast
to fp32 before the softmax, matching `F.cross_entropy(lm_head(hidden).float(), labels)`; results are fp32
(fp64 for fp64 inputs, which the tests use for tight comparisons). On the GPU the softmax
passes run as Triton kernels over the bf16 chunk (model/triton_loss.py: same values, no float32 copy of
the chunk). Tokens whose
target is IGNORE_INDEX get log-prob 0 and zero gradient; they are dropped before any vocab-sized work.
"""

from __future__ import annotations

import torch
from torch import Tensor

from rustforge.model.triton_loss import (
    logsumexp_and_target,
    loss_kernels_available,
    softmax_grad_,
)

IGNORE_INDEX = -100
FUSED_SOFTMAX = True  # on the GPU, the softmax passes as one-pass kernels over the bf16 logits (model/triton_loss.py)


def chunked_token_logprobs(
    hidden: Tensor, weight: Tensor, targets: Tensor, chunk_size: int, temperature: float = 1.0,
    keep_logits_bytes: int = 0, rows: Tensor | None = None,
) -> Tensor:
    """log softmax(hidden @ weight.T / temperature)[n, targets[n]] per token -> [N] fp32 (fp64 if inputs are).

    hidden [N, H], weight [V, H], targets [N] (IGNORE_INDEX -> 0 with zero gradient).
    Differentiable with respect to hidden and weight. keep_logits_bytes: on the kernel path, the
    forward's logits chunks are kept for the backward (instead of recomputed) while they total at most this.
    rows: `valid_rows(targets, V)` computed earlier (else here, with its host syncs), or any superset of it
    such as every row (`torch.arange(N)`: fixed shapes for a CUDA graph; the targets are then not range-checked).
    """
    _check_inputs(hidden, weight, targets, chunk_size, temperature)
    return _ChunkedTokenLogprobs.apply(hidden, weight, targets, chunk_size, float(temperature), keep_logits_bytes, rows)


def chunked_cross_entropy(
    hidden: Tensor, weight: Tensor, labels: Tensor, chunk_size: int, reduction: str = "sum", keep_logits_bytes: int = 0,
    rows: Tensor | None = None,
) -> tuple[Tensor, Tensor]:
    """Summed next-token cross-entropy of logits hidden @ weight.T against labels (already shifted).

    hidden [N, H], weight [V, H], labels [N] with IGNORE_INDEX for tokens without a loss.
    Returns (loss_sum fp32 scalar (fp64 for fp64 inputs), n_valid int64 scalar tensor); divide by n_valid for the mean.
    """
    if reduction != "sum":
        raise ValueError(f"chunked_cross_entropy: reduction must be 'sum', got {reduction!r}")
    logprobs = chunked_token_logprobs(hidden, weight, labels, chunk_size, keep_logits_bytes=keep_logits_bytes, rows=rows)
    n_valid = (labels != IGNORE_INDEX).sum()
    return -logprobs.sum(), n_valid


def _check_inputs(hidden: Tensor, weight: Tensor, targets: Tensor, chunk_size: int, temperature: float) -> None:
    if hidden.dim() != 2 or weight.dim() != 2 or hidden.shape[1] != weight.shape[1]:
        raise ValueError(
            f"chunked loss: expected hidden [N, H] and weight [V, H], got {tuple(hidden.shape)} and {tuple(weight.shape)}"
        )
    if targets.shape != hidden.shape[:1] or targets.dtype not in (torch.int32, torch.int64):
        raise ValueError(
            f"chunked loss: expected integer targets of shape [{hidden.shape[0]}], got {targets.dtype} {tuple(targets.shape)}"
        )
    if hidden.dtype != weight.dtype:
        raise ValueError(f"chunked loss: hidden dtype {hidden.dtype} != weight dtype {weight.dtype}")
    if not isinstance(chunk_size, int) or chunk_size < 1:
        raise ValueError(f"chunked loss: chunk_size must be a positive int, got {chunk_size!r}")
    if not temperature > 0:
        raise ValueError(f"chunked loss: temperature must be > 0, got {temperature!r}")


def valid_rows(targets: Tensor, vocab_size: int) -> Tensor:
    """Indices of tokens with a target; raises on targets outside [0, vocab) (two host syncs: callers on a GPU
    compute it before the forward, while the GPU is idle, and pass it as `rows`, so the loss itself never
    stalls the host between the forward and the backward)."""
    valid = targets != IGNORE_INDEX
    if bool((valid & ((targets < 0) | (targets >= vocab_size))).any()):
        bad = targets[valid & ((targets < 0) | (targets >= vocab_size))][:5].tolist()
        raise ValueError(f"chunked loss: targets must be in [0, {vocab_size}) or {IGNORE_INDEX}, got e.g. {bad}")
    return valid.nonzero().squeeze(1)


def _softmax_dtype(dtype: torch.dtype) -> torch.dtype:
    return torch.promote_types(dtype, torch.float32)


def _fused(t: Tensor) -> bool:
    return FUSED_SOFTMAX and loss_kernels_available(t)


def _chunk_logits(hidden_chunk: Tensor, weight: Tensor, temperature: float) -> Tensor:
    logits = (hidden_chunk @ weight.T).to(_softmax_dtype(hidden_chunk.dtype))
    if temperature != 1.0:
        logits.div_(temperature)
    return logits


class _ChunkedTokenLogprobs(torch.autograd.Function):
    """Saves hidden, weight, targets, the valid-row index and per-token logsumexp; nothing vocab-sized,
    unless keep_logits_bytes lets the kernel path keep the forward's logits chunks (then the backward
    turns them into gradients in place instead of recomputing them: one lm_head GEMM fewer per chunk)."""

    @staticmethod
    def forward(ctx, hidden, weight, targets, chunk_size, temperature, keep_logits_bytes=0, rows=None):
        rows = valid_rows(targets, weight.shape[0]) if rows is None else rows
        # rows may include ignored tokens (a CUDA-graphed step passes every row: shapes must not depend on the
        # labels); they get log-prob 0 and no gradient, their target clamped to a valid index meanwhile
        row_targets = targets[rows]
        row_valid = row_targets != IGNORE_INDEX
        row_targets = row_targets.clamp(min=0)
        out_dtype = _softmax_dtype(hidden.dtype)
        lse = torch.empty(rows.shape[0], dtype=out_dtype, device=hidden.device)
        picked = torch.empty_like(lse)
        keep = _fused(hidden) and rows.shape[0] * weight.shape[0] * hidden.element_size() <= keep_logits_bytes
        kept = []
        for start in range(0, rows.shape[0], chunk_size):
            chunk = slice(start, start + chunk_size)
            if _fused(hidden):
                logits = hidden[rows[chunk]] @ weight.T
                lse[chunk], picked[chunk] = logsumexp_and_target(logits, row_targets[chunk], temperature)
                if keep:
                    kept.append(logits)
            else:
                logits = _chunk_logits(hidden[rows[chunk]], weight, temperature)
                lse[chunk] = torch.logsumexp(logits, dim=1)
                picked[chunk] = logits.gather(1, row_targets[chunk, None]).squeeze(1)
            del logits
        logprobs = torch.zeros(hidden.shape[0], dtype=out_dtype, device=hidden.device)
        logprobs[rows] = torch.where(row_valid, picked - lse, 0)
        ctx.save_for_backward(hidden, weight, rows, row_targets, row_valid, lse, *kept)
        ctx.chunk_size, ctx.temperature = chunk_size, temperature
        return logprobs

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad_logprobs):
        hidden, weight, rows, row_targets, row_valid, lse, *kept = ctx.saved_tensors
        need_hidden, need_weight = ctx.needs_input_grad[:2]
        grad_hidden = torch.zeros_like(hidden) if need_hidden else None
        accumulate_dtype = _softmax_dtype(weight.dtype)
        grad_weight = torch.zeros(weight.shape, dtype=accumulate_dtype, device=weight.device) if need_weight else None
        # d logprob / d logits = (onehot - softmax) / temperature, scaled by the incoming per-token grad.
        row_scale = torch.where(row_valid, grad_logprobs.to(lse.dtype)[rows] / -ctx.temperature, 0)
        for i, start in enumerate(range(0, rows.shape[0], ctx.chunk_size)):
            chunk = slice(start, start + ctx.chunk_size)
            hidden_chunk = hidden[rows[chunk]]
            if _fused(hidden):
                logits = kept[i] if kept else hidden_chunk @ weight.T  # kept: the forward's, overwritten in place
                grad_logits = softmax_grad_(logits, lse[chunk], row_targets[chunk], row_scale[chunk], ctx.temperature)
                # a forward under autocast kept bf16 logits of float32 inputs; the backward runs without autocast
                grad_logits = grad_logits.to(hidden.dtype)
            else:
                grad_logits = _chunk_logits(hidden_chunk, weight, ctx.temperature)
                grad_logits.sub_(lse[chunk, None]).exp_()  # softmax
                grad_logits[torch.arange(grad_logits.shape[0], device=grad_logits.device), row_targets[chunk]] -= 1.0
                grad_logits.mul_(row_scale[chunk, None])
                grad_logits = grad_logits.to(hidden.dtype)
            if need_hidden:
                grad_hidden.index_add_(0, rows[chunk], grad_logits @ weight)
            if need_weight:
                grad_weight.add_(grad_logits.T @ hidden_chunk)
            del grad_logits
        if need_weight:
            grad_weight = grad_weight.to(weight.dtype)
        return grad_hidden, grad_weight, None, None, None, None, None
