"""GPT-OSS's RMSNorm as one Triton kernel each way (GPU), for the frozen norms of LoRA training.

transformers' GptOssRMSNorm (the reference, kept for CPU and for trainable norm weights) runs ~7
elementwise passes over a float32 copy of the hidden states each way and its autograd keeps several
float32 [tokens, hidden] tensors per norm (49 norms on the 20B shape). `FusedRMSNorm` reads the row once and
writes it once, computing in float32 exactly as the reference does (x * rsqrt(mean(x^2) + eps), times the
weight in float32, cast to the input dtype), and saves only its input and one float32 per row.

`add_rmsnorm(residual, delta, norm)` is a residual add and the norm after it in one kernel each way:
(h = residual + delta rounded as torch's add rounds, norm(h)); its backward takes h's own gradient and the norm's
and writes their sum once -- the add kernel of each direction and one pass over [tokens, hidden] gone
(model/gptoss.py's residual stream uses it on the training path: 48 such pairs a step on the 20B shape).

Own code: torch's fused `rms_norm` follows autocast's float32 policy and multiplies in another order, and
nothing in torch fuses it with the residual add.
Tests: tests/test_triton_rmsnorm.py (TRITON_INTERPRET on a CPU, natively on the GPU).
"""

from __future__ import annotations

import torch
from transformers.models.gpt_oss.modeling_gpt_oss import GptOssRMSNorm

from rustforge.model.triton_dequant import triton_kernels_available

try:
    import triton
    import triton.language as tl
except ImportError:  # CPU-only installs: the reference forward is used
    triton = None

FUSED_NORMS = True  # False: every FusedRMSNorm runs transformers' forward


def rmsnorm_kernels_available(t: torch.Tensor) -> bool:
    """Native GPU path, or any device under the Triton interpreter (how the CPU tests run these kernels)."""
    return t.dtype in (torch.bfloat16, torch.float16, torch.float32) and triton_kernels_available(t)


if triton is not None:

    @triton.jit
    def _rmsnorm_forward_kernel(x_ptr, d_ptr, w_ptr, h_ptr, y_ptr, rstd_ptr, eps, HIDDEN: tl.constexpr,
                                HAS_DELTA: tl.constexpr, BLOCK: tl.constexpr):
        """y = w * x * rstd(x); HAS_DELTA: x = x + d first, rounded to h's dtype and stored as h (add_rmsnorm)."""
        row = tl.program_id(0).to(tl.int64)
        cols = tl.arange(0, BLOCK)
        mask = cols < HIDDEN
        x = tl.load(x_ptr + row * HIDDEN + cols, mask=mask, other=0.0).to(tl.float32)
        if HAS_DELTA:
            d = tl.load(d_ptr + row * HIDDEN + cols, mask=mask, other=0.0).to(tl.float32)
            h = (x + d).to(h_ptr.dtype.element_ty)  # rounded as a stored sum would be; the norm reads that
            tl.store(h_ptr + row * HIDDEN + cols, h, mask=mask)
            x = h.to(tl.float32)
        rstd = 1.0 / tl.sqrt(tl.sum(x * x, axis=0) / HIDDEN + eps)
        w = tl.load(w_ptr + cols, mask=mask, other=0.0).to(tl.float32)
        tl.store(y_ptr + row * HIDDEN + cols, (w * (x * rstd)).to(y_ptr.dtype.element_ty), mask=mask)
        tl.store(rstd_ptr + row, rstd)

    @triton.jit
    def _rmsnorm_backward_kernel(x_ptr, w_ptr, rstd_ptr, grad_y_ptr, grad_h_ptr, grad_x_ptr, HIDDEN: tl.constexpr,
                                 HAS_GRAD_H: tl.constexpr, BLOCK: tl.constexpr):
        """d y / d x * grad_y; HAS_GRAD_H: plus the gradient of x itself (add_rmsnorm's h, the residual stream)."""
        row = tl.program_id(0).to(tl.int64)
        cols = tl.arange(0, BLOCK)
        mask = cols < HIDDEN
        x = tl.load(x_ptr + row * HIDDEN + cols, mask=mask, other=0.0).to(tl.float32)
        grad_y = tl.load(grad_y_ptr + row * HIDDEN + cols, mask=mask, other=0.0).to(tl.float32)
        w = tl.load(w_ptr + cols, mask=mask, other=0.0).to(tl.float32)
        rstd = tl.load(rstd_ptr + row)
        x_hat = x * rstd
        grad_x_hat = grad_y * w
        # d/dx of x * rstd(x): rstd * (g - x_hat * mean(g * x_hat))
        grad_x = rstd * (grad_x_hat - x_hat * (tl.sum(grad_x_hat * x_hat, axis=0) / HIDDEN))
        if HAS_GRAD_H:
            grad_x += tl.load(grad_h_ptr + row * HIDDEN + cols, mask=mask, other=0.0).to(tl.float32)
        tl.store(grad_x_ptr + row * HIDDEN + cols, grad_x.to(grad_x_ptr.dtype.element_ty), mask=mask)


class _AddRMSNormFunction(torch.autograd.Function):
    """(h, y) = (residual + delta, weight * h * rsqrt(mean(h^2) + eps)), weight frozen; saves h and rstd [rows].
    The gradient of residual and of delta is the same tensor: h's gradient plus the norm's."""

    @staticmethod
    def forward(ctx, residual, delta, weight, eps):
        hidden = residual.shape[-1]
        r = residual.reshape(-1, hidden).contiguous()
        d = delta.reshape(-1, hidden).contiguous()
        h, y = torch.empty_like(r), torch.empty_like(r)
        rstd = torch.empty(r.shape[0], dtype=torch.float32, device=r.device)
        if r.numel():
            _rmsnorm_forward_kernel[(r.shape[0],)](r, d, weight, h, y, rstd, float(eps), HIDDEN=hidden, HAS_DELTA=True,
                                                   BLOCK=triton.next_power_of_2(hidden))
        ctx.save_for_backward(h, weight, rstd)
        ctx.shape = residual.shape
        return h.view(residual.shape), y.view(residual.shape)

    @staticmethod
    def backward(ctx, grad_h, grad_y):
        h, weight, rstd = ctx.saved_tensors
        hidden = h.shape[-1]
        grad_y = torch.zeros_like(h) if grad_y is None else grad_y.reshape(-1, hidden).contiguous()
        if grad_h is not None:
            grad_h = grad_h.reshape(-1, hidden).contiguous()
        grad = torch.empty_like(h)
        if h.numel():
            _rmsnorm_backward_kernel[(h.shape[0],)](h, weight, rstd, grad_y, grad_h if grad_h is not None else h, grad,
                                                    HIDDEN=hidden, HAS_GRAD_H=grad_h is not None,
                                                    BLOCK=triton.next_power_of_2(hidden))
        grad = grad.view(ctx.shape)
        return grad, grad, None, None


def add_rmsnorm(residual: torch.Tensor, delta: torch.Tensor, norm: GptOssRMSNorm) -> tuple[torch.Tensor, torch.Tensor]:
    """(h, norm(h)) with h = residual + delta: one kernel each way where FusedRMSNorm would take its kernel,
    else torch's add and the norm's own forward."""
    fused = FUSED_NORMS and rmsnorm_kernels_available(residual) and not norm.weight.requires_grad
    if not fused or residual.shape != delta.shape or residual.dtype != delta.dtype:
        h = residual + delta
        return h, norm(h)
    return _AddRMSNormFunction.apply(residual, delta, norm.weight, norm.variance_epsilon)


class _RMSNormFunction(torch.autograd.Function):
    """y = weight * x * rsqrt(mean(x^2) + eps) over the last dim, weight frozen; saves x and rstd [rows]."""

    @staticmethod
    def forward(ctx, x, weight, eps):
        hidden = x.shape[-1]
        rows = x.reshape(-1, hidden).contiguous()
        y = torch.empty_like(rows)
        rstd = torch.empty(rows.shape[0], dtype=torch.float32, device=x.device)
        if rows.numel():
            _rmsnorm_forward_kernel[(rows.shape[0],)](rows, rows, weight, y, y, rstd, float(eps), HIDDEN=hidden,
                                                      HAS_DELTA=False, BLOCK=triton.next_power_of_2(hidden))
        ctx.save_for_backward(rows, weight, rstd)
        return y.view(x.shape)

    @staticmethod
    def backward(ctx, grad_y):
        rows, weight, rstd = ctx.saved_tensors
        hidden = rows.shape[-1]
        grad_rows = grad_y.reshape(-1, hidden).contiguous()
        grad_x = torch.empty_like(rows)
        if rows.numel():
            _rmsnorm_backward_kernel[(rows.shape[0],)](rows, weight, rstd, grad_rows, grad_rows, grad_x, HIDDEN=hidden,
                                                       HAS_GRAD_H=False, BLOCK=triton.next_power_of_2(hidden))
        return grad_x.view(grad_y.shape), None, None


class FusedRMSNorm(GptOssRMSNorm):
    """transformers' GptOssRMSNorm (same parameter, same state-dict name) taking the fused kernels where
    they apply: a GPU tensor and a frozen weight. Anything else runs transformers' forward."""

    @classmethod
    def from_module(cls, norm: GptOssRMSNorm) -> FusedRMSNorm:
        fused = cls.__new__(cls)
        torch.nn.Module.__init__(fused)
        fused.weight = norm.weight  # the same Parameter: optimizers, hooks and state dicts see no change
        fused.variance_epsilon = norm.variance_epsilon
        return fused

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        fused = FUSED_NORMS and rmsnorm_kernels_available(hidden_states) and not self.weight.requires_grad
        if not fused:
            return super().forward(hidden_states)
        return _RMSNormFunction.apply(hidden_states, self.weight, self.variance_epsilon)


def install_fused_norms(hf_model: torch.nn.Module) -> int:
    """Swap every GptOssRMSNorm under hf_model for a FusedRMSNorm sharing its weight; returns how many."""
    swapped = 0
    for parent in list(hf_model.modules()):
        for name, child in list(parent.named_children()):
            if type(child) is GptOssRMSNorm:
                setattr(parent, name, FusedRMSNorm.from_module(child))
                swapped += 1
    return swapped
