"""One-pass Triton kernels for the softmax parts of the chunked loss (model/loss.py), GPU only.

The chunked loss builds one chunk of logits at a time, [chunk x 201088] in the matmul's dtype (bf16 on
the GPU). Its torch path then upcasts the chunk to float32 (a second, twice-as-large copy), takes
logsumexp and the target logit, and in backward runs softmax - onehot, the per-token scale and the cast
back as separate passes: ~35 GB of memory traffic per 4K tokens, against ~5 GB for these kernels, which
read the bf16 logits once (and write the gradient once, in place), computing in float32:

- `logsumexp_and_target(logits, targets, temperature)` -> (lse, target logit), float32 per row;
- `softmax_grad_(logits, lse, targets, row_scale, temperature)`: logits <- row_scale * (softmax - onehot),
  in the logits' dtype, in place.

The values equal the torch path's up to float32 summation order (both upcast the same bf16 logits).
Own code: torch has no fused cross-entropy over a logits chunk that keeps bf16 storage with float32 math.
Tests: tests/test_loss.py (TRITON_INTERPRET on a CPU, natively on the GPU).
"""

from __future__ import annotations

import torch

from rustforge.model.triton_dequant import triton_kernels_available

try:
    import triton
    import triton.language as tl
except ImportError:  # CPU-only installs: model/loss.py uses its torch path
    triton = None

_VOCAB_BLOCK = 4096


def loss_kernels_available(t: torch.Tensor) -> bool:
    """Native GPU path, or any device under the Triton interpreter (how the CPU tests run these kernels)."""
    return t.dtype in (torch.bfloat16, torch.float16, torch.float32) and triton_kernels_available(t)


if triton is not None:

    @triton.jit
    def _lse_target_kernel(logits_ptr, targets_ptr, lse_ptr, target_ptr, vocab, stride_row, inv_temperature,
                           BLOCK: tl.constexpr):
        row = tl.program_id(0).to(tl.int64)
        base = logits_ptr + row * stride_row
        running_max = tl.full((BLOCK,), float("-inf"), tl.float32)
        running_sum = tl.zeros((BLOCK,), dtype=tl.float32)
        for start in range(0, vocab, BLOCK):  # per-lane online logsumexp, merged across lanes at the end
            cols = start + tl.arange(0, BLOCK)
            x = tl.load(base + cols, mask=cols < vocab, other=float("-inf")).to(tl.float32) * inv_temperature
            new_max = tl.maximum(running_max, x)
            safe_max = tl.where(new_max == float("-inf"), 0.0, new_max)
            running_sum = running_sum * tl.exp(running_max - safe_max) + tl.exp(x - safe_max)
            running_max = new_max
        row_max = tl.max(running_max, axis=0)
        total = tl.sum(running_sum * tl.exp(running_max - row_max), axis=0)
        tl.store(lse_ptr + row, row_max + tl.log(total))
        target = tl.load(targets_ptr + row).to(tl.int64)
        tl.store(target_ptr + row, tl.load(base + target).to(tl.float32) * inv_temperature)

    @triton.jit
    def _softmax_grad_kernel(logits_ptr, lse_ptr, targets_ptr, scale_ptr, vocab, stride_row, inv_temperature,
                             BLOCK: tl.constexpr):
        row = tl.program_id(0).to(tl.int64)
        cols = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
        mask = cols < vocab
        ptrs = logits_ptr + row * stride_row + cols
        x = tl.load(ptrs, mask=mask, other=0.0).to(tl.float32) * inv_temperature
        p = tl.exp(x - tl.load(lse_ptr + row))
        onehot = tl.where(cols == tl.load(targets_ptr + row).to(tl.int64), 1.0, 0.0)
        tl.store(ptrs, ((p - onehot) * tl.load(scale_ptr + row)).to(logits_ptr.dtype.element_ty), mask=mask)


def _check(logits: torch.Tensor, targets: torch.Tensor) -> None:
    if logits.dim() != 2 or logits.stride(1) != 1 or targets.shape != logits.shape[:1]:
        raise ValueError(f"loss kernels: need row-major logits [n, V] and targets [n], got {tuple(logits.shape)} "
                         f"(strides {logits.stride()}) and {tuple(targets.shape)}")


def logsumexp_and_target(logits: torch.Tensor, targets: torch.Tensor, temperature: float = 1.0):
    """(logsumexp(logits / T) per row, logits[row, target] / T), float32 [n] each; targets in [0, V)."""
    _check(logits, targets)
    n, vocab = logits.shape
    lse = torch.empty(n, dtype=torch.float32, device=logits.device)
    target = torch.empty_like(lse)
    if n:
        _lse_target_kernel[(n,)](logits, targets.contiguous(), lse, target, vocab, logits.stride(0),
                                 1.0 / float(temperature), BLOCK=_VOCAB_BLOCK)
    return lse, target


def softmax_grad_(logits: torch.Tensor, lse: torch.Tensor, targets: torch.Tensor, row_scale: torch.Tensor,
                  temperature: float = 1.0) -> torch.Tensor:
    """In place: logits <- row_scale[:, None] * (softmax(logits / T) - onehot(targets)); returns logits."""
    _check(logits, targets)
    n, vocab = logits.shape
    if n:
        grid = (n, triton.cdiv(vocab, _VOCAB_BLOCK))
        _softmax_grad_kernel[grid](logits, lse.float().contiguous(), targets.contiguous(),
                                   row_scale.float().contiguous(), vocab, logits.stride(0), 1.0 / float(temperature),
                                   BLOCK=_VOCAB_BLOCK)
    return logits
