"""Fused Triton kernels for the memory-bound steps of the training-time MoE layer (GPU only).

The grouped GEMMs of model/moe.py are torch's; what sits between them is elementwise and was measured
as a quarter of a 4K training step on the H100 (bench/RESULTS.md, session 2 profile: the clamped SwiGLU
13% with its strided even/odd slices and ~6 temporaries, the routing multiply and unsort-sum 12%). Each
kernel here reads its inputs once and writes its outputs once, computing in float32:

- `swiglu_forward` / `swiglu_backward`: GPT-OSS's clamped SwiGLU on interleaved gate/up columns
  (reference: moe.swiglu_reference and its autograd);
- `combine_rows`: out[t] = sum_j w[t, j] * rows[inverse[t * k + j]] -- the routing-weighted sum of a
  token's k expert rows, in the residual dtype (reference: the multiply, index_select and sum of
  moe._WeightedSumUnsorted's torch path); without weights it is the backward of the row gather;
- `combine_rows_backward`: per sorted row i, grad_rows[i] = w_i * grad[token(i)] and
  grad_w_i = <grad[token(i)], rows[i]> in one pass;
- `low_rank_update_`: y[i] += u[i] @ B[expert(i)] in place on expert-sorted rows, for the LoRA (and
  bias) term of a grouped projection, where torch needs a grouped GEMM into a temporary and an add
  (four passes over y's size instead of two); tiles autotuned per shape.

Own code because torch has no fused op for these (torch.compile would fuse the SwiGLU but not the
index-driven sums, and it does not trace our grouped-GEMM autograd Functions without graph breaks).
Tests: tests/test_triton_moe_train.py, against the torch references, under TRITON_INTERPRET on a CPU
and natively on the GPU. `triton_dequant.triton_kernels_available(t)` says whether a tensor can take this
path; this module imports on machines without Triton or a GPU.
"""

from __future__ import annotations

import torch

from rustforge.model.triton_dequant import INTERPRETING

try:
    import triton
    import triton.language as tl
except ImportError:  # CPU-only installs: moe.py uses its torch reference path
    triton = None

_SWIGLU_BLOCK = 1024  # output elements per program
_ROW_BLOCK = 1024  # hidden columns per loop step of the row kernels




if triton is not None:

    @triton.jit
    def _swiglu_values(gate, up, alpha, limit):
        gate = tl.minimum(gate, limit)
        up = tl.minimum(tl.maximum(up, -limit), limit)
        return (up + 1.0) * (gate * tl.sigmoid(gate * alpha))

    @triton.jit
    def _swiglu_grads(gate, up, grad_out, alpha, limit):
        """(d out / d gate, d out / d up) * grad_out, float32."""
        gate_c = tl.minimum(gate, limit)
        up_c = tl.minimum(tl.maximum(up, -limit), limit)
        sig = tl.sigmoid(gate_c * alpha)
        glu = gate_c * sig
        # torch's clamp passes the gradient where min <= x <= max, bounds included
        grad_up = tl.where(tl.abs(up) > limit, 0.0, grad_out * glu)
        d_glu = sig + alpha * glu * (1.0 - sig)  # d/dg [g * sigmoid(alpha g)]
        grad_gate = tl.where(gate > limit, 0.0, grad_out * (up_c + 1.0) * d_glu)
        return grad_gate, grad_up

    @triton.jit
    def _swiglu_forward_kernel(gate_up_ptr, out_ptr, n_out, n_cols, out_stride, alpha, limit, BLOCK: tl.constexpr):
        # contiguous [S, 2I] interleaved gate/up: output element e reads gate at 2e and up at 2e + 1; the output's
        # rows may be wider than I (out_stride: a wide buffer whose extra columns another kernel fills)
        pid = tl.program_id(0).to(tl.int64)
        offs = pid * BLOCK + tl.arange(0, BLOCK)
        mask = offs < n_out
        pair_offs = 2 * pid * BLOCK + tl.arange(0, 2 * BLOCK)
        pair = tl.load(gate_up_ptr + pair_offs, mask=pair_offs < 2 * n_out, other=0.0)
        gate, up = tl.split(tl.reshape(pair.to(tl.float32), (BLOCK, 2)))
        out_offs = (offs // n_cols) * out_stride + offs % n_cols
        tl.store(out_ptr + out_offs, _swiglu_values(gate, up, alpha, limit).to(out_ptr.dtype.element_ty), mask=mask)

    @triton.jit
    def _swiglu_backward_kernel(gate_up_ptr, grad_out_ptr, grad_ptr, n_out, n_cols, grad_out_stride, alpha, limit,
                                BLOCK: tl.constexpr):
        pid = tl.program_id(0).to(tl.int64)
        offs = pid * BLOCK + tl.arange(0, BLOCK)
        mask = offs < n_out
        pair_offs = 2 * pid * BLOCK + tl.arange(0, 2 * BLOCK)
        pair_mask = pair_offs < 2 * n_out
        pair = tl.load(gate_up_ptr + pair_offs, mask=pair_mask, other=0.0)
        gate, up = tl.split(tl.reshape(pair.to(tl.float32), (BLOCK, 2)))
        grad_offs = (offs // n_cols) * grad_out_stride + offs % n_cols
        grad_out = tl.load(grad_out_ptr + grad_offs, mask=mask, other=0.0).to(tl.float32)
        grad_gate, grad_up = _swiglu_grads(gate, up, grad_out, alpha, limit)
        tl.store(grad_ptr + pair_offs, tl.interleave(grad_gate, grad_up).to(grad_ptr.dtype.element_ty), mask=pair_mask)

    @triton.jit
    def _low_rank_tile(u_ptr, b_ptr, expert_ptr, first, n_rows, cols, col_ok, rank, stride_u, stride_be, stride_bp,
                       stride_bn, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_P: tl.constexpr,
                       DOT_F32: tl.constexpr):
        """float32 [BLOCK_M, BLOCK_N]: u[i] @ b[expert(i)][:, cols] for the expert-sorted rows first.. of a tile."""
        rows = first + tl.arange(0, BLOCK_M)
        row_ok = rows < n_rows
        p = tl.arange(0, BLOCK_P)
        p_ok = p < rank
        experts = tl.load(expert_ptr + rows, mask=row_ok, other=-1)
        u = tl.load(u_ptr + rows[:, None].to(tl.int64) * stride_u + p[None, :], mask=row_ok[:, None] & p_ok[None, :],
                    other=0.0)
        if DOT_F32:  # the CPU interpreter multiplies bf16 dot operands as raw bits
            u = u.to(tl.float32)
        acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
        # rows are sorted by expert: a tile spans the experts from its first row's to its last row's (usually one)
        e_first = tl.load(expert_ptr + first)
        e_last = tl.load(expert_ptr + tl.minimum(first + BLOCK_M, n_rows) - 1)
        for e in range(e_first, e_last + 1):
            b = tl.load(b_ptr + e * stride_be + p[:, None] * stride_bp + cols[None, :] * stride_bn,
                        mask=p_ok[:, None] & col_ok[None, :], other=0.0)
            mine = tl.where((experts == e)[:, None], u, tl.zeros_like(u))
            if DOT_F32:
                acc += tl.dot(mine, b.to(tl.float32), input_precision="ieee")
            else:
                acc += tl.dot(mine, b.to(u.dtype))
        return acc

    @triton.jit
    def _combine_rows_kernel(rows_ptr, weights_ptr, inverse_ptr, out_ptr, stride_rows, hidden: tl.constexpr,
                             TOP_K: tl.constexpr, HAS_WEIGHTS: tl.constexpr, BLOCK: tl.constexpr):
        token = tl.program_id(0).to(tl.int64)
        cols = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
        mask = cols < hidden
        acc = tl.zeros((BLOCK,), dtype=tl.float32)
        for j in tl.static_range(TOP_K):
            row = tl.load(inverse_ptr + token * TOP_K + j).to(tl.int64)
            values = tl.load(rows_ptr + row * stride_rows + cols, mask=mask, other=0.0).to(tl.float32)
            if HAS_WEIGHTS:
                values = values * tl.load(weights_ptr + token * TOP_K + j).to(tl.float32)
            acc += values
        tl.store(out_ptr + token * hidden + cols, acc.to(out_ptr.dtype.element_ty), mask=mask)

    @triton.jit
    def _combine_rows_backward_kernel(grad_ptr, rows_ptr, weights_ptr, perm_ptr, grad_rows_ptr, grad_weights_ptr,
                                      hidden: tl.constexpr, TOP_K: tl.constexpr, BLOCK: tl.constexpr):
        row = tl.program_id(0).to(tl.int64)
        flat = tl.load(perm_ptr + row).to(tl.int64)  # the (token, slot) this sorted row came from
        token = flat // TOP_K
        weight = tl.load(weights_ptr + flat).to(tl.float32)
        dot = tl.zeros((BLOCK,), dtype=tl.float32)
        for start in tl.static_range(0, hidden, BLOCK):  # hidden is a constexpr: one model, one compile
            cols = start + tl.arange(0, BLOCK)
            mask = cols < hidden
            grad = tl.load(grad_ptr + token * hidden + cols, mask=mask, other=0.0).to(tl.float32)
            values = tl.load(rows_ptr + row * hidden + cols, mask=mask, other=0.0).to(tl.float32)
            tl.store(grad_rows_ptr + row * hidden + cols, (grad * weight).to(grad_rows_ptr.dtype.element_ty), mask=mask)
            dot += grad * values
        tl.store(grad_weights_ptr + flat, tl.sum(dot, axis=0))


    # in place on y: the tuner restores y between its trials (restore_value)
    _LOW_RANK_UPDATE_CONFIGS = [triton.Config({"BLOCK_M": m, "BLOCK_N": n}, num_warps=w)
                                for m, n in ((32, 128), (64, 64), (64, 128), (64, 256), (128, 64), (128, 128))
                                for w in (4, 8)]

    @triton.autotune(configs=_LOW_RANK_UPDATE_CONFIGS[2:3] if INTERPRETING else _LOW_RANK_UPDATE_CONFIGS,
                     key=["n_cols", "rank"], restore_value=["y_ptr"])
    @triton.jit
    def _low_rank_update_kernel(y_ptr, u_ptr, b_ptr, expert_ptr, n_rows, n_cols, rank, stride_y, stride_u,
                                stride_be, stride_bp, stride_bn, BLOCK_P: tl.constexpr, DOT_F32: tl.constexpr,
                                BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):
        first = tl.program_id(0) * BLOCK_M
        rows = first + tl.arange(0, BLOCK_M)
        cols = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
        col_ok = cols < n_cols
        acc = _low_rank_tile(u_ptr, b_ptr, expert_ptr, first, n_rows, cols, col_ok, rank, stride_u, stride_be,
                             stride_bp, stride_bn, BLOCK_M, BLOCK_N, BLOCK_P, DOT_F32)
        ptrs = y_ptr + rows[:, None].to(tl.int64) * stride_y + cols[None, :]
        mask = (rows < n_rows)[:, None] & col_ok[None, :]
        y = tl.load(ptrs, mask=mask, other=0.0).to(tl.float32)
        tl.store(ptrs, (y + acc).to(y_ptr.dtype.element_ty), mask=mask)


def _check_low_rank(y: torch.Tensor, u: torch.Tensor, b: torch.Tensor, experts: torch.Tensor) -> None:
    S, N = y.shape
    P = u.shape[1]
    if y.stride(1) != 1 or u.stride(1) != 1 or b.shape[1:] != (P, N) or experts.shape != (S,):
        raise ValueError(f"low_rank_update_: y {tuple(y.shape)} (strides {y.stride()}), u {tuple(u.shape)}, "
                         f"b {tuple(b.shape)}, experts {tuple(experts.shape)} do not fit")


def _check_pairs(gate_up: torch.Tensor) -> None:
    if gate_up.dim() != 2 or gate_up.shape[1] % 2:
        raise ValueError(f"swiglu: expected interleaved gate/up [S, 2I], got {tuple(gate_up.shape)}")


def swiglu_forward(gate_up: torch.Tensor, alpha: float, limit: float, out: torch.Tensor | None = None) -> torch.Tensor:
    """[S, 2I] interleaved gate/up -> [S, I] = moe.swiglu_reference, computed in float32, stored in the input dtype
    (into `out` if given: [S, I] with unit column stride, any row stride -- the first columns of a wider buffer)."""
    _check_pairs(gate_up)
    gate_up = gate_up.contiguous()
    shape = (gate_up.shape[0], gate_up.shape[1] // 2)
    if out is None:
        out = gate_up.new_empty(shape)
    elif tuple(out.shape) != shape or (shape[0] > 1 and out.stride(1) != 1):
        raise ValueError(f"swiglu_forward: out {tuple(out.shape)} (strides {out.stride()}) does not fit {shape}")
    n = out.numel()
    if n:
        _swiglu_forward_kernel[(triton.cdiv(n, _SWIGLU_BLOCK),)](gate_up, out, n, shape[1], out.stride(0), float(alpha),
                                                                 float(limit), BLOCK=_SWIGLU_BLOCK)
    return out


def swiglu_backward(gate_up: torch.Tensor, grad_out: torch.Tensor, alpha: float, limit: float) -> torch.Tensor:
    """d swiglu / d gate_up (interleaved, the input dtype) given grad_out [S, I]."""
    _check_pairs(gate_up)
    if grad_out.shape != (gate_up.shape[0], gate_up.shape[1] // 2):
        raise ValueError(f"swiglu_backward: grad {tuple(grad_out.shape)} does not fit gate_up {tuple(gate_up.shape)}")
    gate_up = gate_up.contiguous()
    if grad_out.shape[1] > 1 and grad_out.stride(1) != 1:  # any row stride is read in place
        grad_out = grad_out.contiguous()
    grad = torch.empty_like(gate_up)
    n = grad_out.numel()
    if n:
        _swiglu_backward_kernel[(triton.cdiv(n, _SWIGLU_BLOCK),)](gate_up, grad_out, grad, n, grad_out.shape[1],
                                                                  grad_out.stride(0), float(alpha), float(limit),
                                                                  BLOCK=_SWIGLU_BLOCK)
    return grad


def combine_rows(rows: torch.Tensor, inverse: torch.Tensor, top_k: int, out_dtype: torch.dtype,
                 weights: torch.Tensor | None = None) -> torch.Tensor:
    """rows [S, H] in expert order (unit column stride, any row stride) -> [S // top_k, H]: out[t] = sum_j w[t*k+j]
    * rows[inverse[t*k+j]] (w = 1 without weights), summed in float32, stored in out_dtype."""
    if rows.shape[1] > 1 and rows.stride(1) != 1:
        rows = rows.contiguous()
    n_tokens, hidden = rows.shape[0] // top_k, rows.shape[1]
    out = torch.empty(n_tokens, hidden, dtype=out_dtype, device=rows.device)
    if weights is not None:
        weights = weights.reshape(-1).contiguous()
    if out.numel():
        grid = (n_tokens, triton.cdiv(hidden, _ROW_BLOCK))
        _combine_rows_kernel[grid](rows, weights if weights is not None else rows, inverse.contiguous(), out,
                                   rows.stride(0), hidden, TOP_K=top_k, HAS_WEIGHTS=weights is not None,
                                   BLOCK=_ROW_BLOCK)
    return out


def combine_rows_backward(grad: torch.Tensor, rows: torch.Tensor, weights: torch.Tensor, perm: torch.Tensor,
                          top_k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Gradients of combine_rows with weights: (grad_rows [S, H] in rows' dtype, grad_weights [S] float32 in
    the flat (token, slot) order of `weights`). perm[i] is the flat row of sorted row i."""
    grad, rows = grad.contiguous(), rows.contiguous()
    grad_rows = torch.empty_like(rows)
    grad_weights = torch.empty(weights.numel(), dtype=torch.float32, device=rows.device)
    if rows.numel():
        _combine_rows_backward_kernel[(rows.shape[0],)](grad, rows, weights.reshape(-1).contiguous(), perm.contiguous(),
                                                        grad_rows, grad_weights, rows.shape[1], TOP_K=top_k,
                                                        BLOCK=_ROW_BLOCK)
    return grad_rows, grad_weights


def low_rank_update_(y: torch.Tensor, u: torch.Tensor, b: torch.Tensor, expert_of_row: torch.Tensor) -> torch.Tensor:
    """In place: y[i] += u[i] @ b[expert_of_row[i]] (float32 accumulation, one rounding to y's dtype).

    y [S, N] with unit column stride, u [S, P], b [E, P, N] (any strides; a transposed view is fine),
    expert_of_row int32 [S], non-decreasing (expert-sorted rows). Returns y."""
    _check_low_rank(y, u, b, expert_of_row)
    (S, N), P = y.shape, u.shape[1]
    if S and N and P:

        def grid(config):
            return triton.cdiv(S, config["BLOCK_M"]), triton.cdiv(N, config["BLOCK_N"])

        _low_rank_update_kernel[grid](y, u, b, expert_of_row.contiguous(), S, N, P, y.stride(0), u.stride(0),
                                      b.stride(0), b.stride(1), b.stride(2), BLOCK_P=max(16, triton.next_power_of_2(P)),
                                      DOT_F32=INTERPRETING or y.dtype == torch.float32)
    return y
