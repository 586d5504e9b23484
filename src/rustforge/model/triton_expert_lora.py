"""Triton kernel for the LoRA weight gradients of the training-time MoE layer (GPU only).

A LoRA factor on a grouped expert projection multiplies expert-sorted rows by a per-expert matrix whose
other side is the padded LoRA rank (16..32 columns). Its weight gradients are per-expert products
x_e^T @ u_e with one skinny side, which torch's grouped_mm (K-grouped) runs at about a third of the H100's
memory bandwidth (66 and 108 us for the 20B shape's 16384 rows over 32 experts; bench/grouped_mm_shapes.py).
They are memory-bound -- the time is reading the big [S, D] operand once -- so:

- `expert_transposed_product`: out[e] = scale * x_e^T @ u_e over expert e's rows -- the LoRA weight
  gradients, grad_A = expert_transposed_product(x, grad_xa, offs) and grad_B = its `transposed` form for
  (g, xa), written in the LoRA masters' dtype. One program per (expert, column block) sums its expert's rows
  in order: no atomics, deterministic, exact zeros for experts with no rows. 56 us a call in the 4K step on
  the H100 against grouped_mm's ~64 plus a mask, a scale and a cast (session 5).

The forward-direction products (x @ A, g @ B^T) stay on grouped_mm: a row-tiled Triton kernel for them
measured slower for x @ A (76-105 us against 61) and within 10% for g @ B^T (session 5; removed, in git
history at commit 46b3078).
Block sizes are autotuned per shape (12 configurations, once per process).
Own code because torch has no faster op for these shapes (grouped_mm is its only grouped GEMM, and a loop
of per-expert matmuls costs a host sync and E launches). Tests: tests/test_triton_expert_lora.py, against
moe.grouped_mm in float64, under TRITON_INTERPRET on a CPU and natively on the GPU.
`triton_dequant.triton_kernels_available(t)` says whether a tensor can take this path; this module
imports on machines without Triton or a GPU.
"""

from __future__ import annotations

import torch

from rustforge.model.triton_dequant import INTERPRETING

try:
    import triton
    import triton.language as tl
except ImportError:  # CPU-only installs: moe.py uses grouped_mm
    triton = None

_MAX_WIDTH = 128  # P: the LoRA side; padded in registers to a power of two >= 16 (tl.dot's minimum)


if triton is not None:

    # measured once per shape (memory-bound; the best tile depends on the expert's row count and the width)
    _CONFIGS = [triton.Config({"BLOCK_M": m, "BLOCK_D": d}, num_warps=w)
                for m in (16, 32, 64) for d in (128, 256) for w in (4, 8)]

    @triton.autotune(configs=_CONFIGS[:1] if INTERPRETING else _CONFIGS, key=["depth", "width"])
    @triton.jit
    def _expert_transposed_product_kernel(x_ptr, u_ptr, offs_ptr, out_ptr, depth, width, stride_x, stride_um,
                                          stride_up, stride_od, stride_op, scale, BLOCK_P: tl.constexpr,
                                          DOT_F32: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_D: tl.constexpr):
        e = tl.program_id(0)
        d = tl.program_id(1) * BLOCK_D + tl.arange(0, BLOCK_D)
        d_ok = d < depth
        p = tl.arange(0, BLOCK_P)
        p_ok = p < width
        begin = tl.where(e > 0, tl.load(offs_ptr + tl.maximum(e - 1, 0)), 0)
        end = tl.load(offs_ptr + e)
        acc = tl.zeros((BLOCK_D, BLOCK_P), dtype=tl.float32)  # stays zero for an expert with no rows
        for start in range(begin, end, BLOCK_M):
            rows = start + tl.arange(0, BLOCK_M)
            row_ok = (rows < end)[:, None]
            rows64 = rows[:, None].to(tl.int64)
            x = tl.load(x_ptr + rows64 * stride_x + d[None, :], mask=row_ok & d_ok[None, :], other=0.0)
            u = tl.load(u_ptr + rows64 * stride_um + p[None, :] * stride_up, mask=row_ok & p_ok[None, :], other=0.0)
            if DOT_F32:
                acc = tl.dot(tl.trans(x.to(tl.float32)), u.to(tl.float32), acc, input_precision="ieee")
            else:
                acc = tl.dot(tl.trans(x), u, acc)
        out = out_ptr + e.to(tl.int64) * depth * width + d[:, None] * stride_od + p[None, :] * stride_op
        tl.store(out, (acc * scale).to(out_ptr.dtype.element_ty), mask=d_ok[:, None] & p_ok[None, :])


def _padded_width(width: int) -> int:
    return max(16, triton.next_power_of_2(width))


def _unit_column_stride(t: torch.Tensor) -> bool:
    return t.shape[1] <= 1 or t.stride(1) == 1


def _check_index(name: str, index: torch.Tensor, shape: tuple[int, ...], fn: str) -> None:
    if tuple(index.shape) != shape or index.dtype not in (torch.int32, torch.int64):
        raise ValueError(f"{fn}: {name} must be int32 of shape {shape}, got {index.dtype} {tuple(index.shape)}")


def _check_expert_transposed_product(x: torch.Tensor, u: torch.Tensor, offs: torch.Tensor) -> None:
    fn = "expert_transposed_product"
    if x.dim() != 2 or u.dim() != 2 or u.shape[0] != x.shape[0]:
        raise ValueError(f"{fn}: expected x [S, D] and u [S, P], got x {tuple(x.shape)}, u {tuple(u.shape)}")
    if not _unit_column_stride(x):
        raise ValueError(f"{fn}: x {tuple(x.shape)} needs unit column stride, has strides {x.stride()}")
    if x.dtype != u.dtype:
        raise ValueError(f"{fn}: x is {x.dtype} but u is {u.dtype}")
    if u.shape[1] > _MAX_WIDTH:
        raise ValueError(f"{fn}: u {tuple(u.shape)} has P = {u.shape[1]} > {_MAX_WIDTH} (a LoRA-rank kernel)")
    if offs.dim() != 1:
        raise ValueError(f"{fn}: offs must be 1-D [E], got {tuple(offs.shape)}")
    _check_index("offs", offs, (offs.shape[0],), fn)


def expert_transposed_product(x: torch.Tensor, u: torch.Tensor, offs: torch.Tensor,
                              out_dtype: torch.dtype | None = None, *, scale: float = 1.0,
                              transposed: bool = False) -> torch.Tensor:
    """out[e] = scale * x[rows of e]^T @ u[rows of e] -> [E, D, P] in out_dtype (default x's dtype), float32
    accumulation in row order; experts with no rows get exact zeros. `transposed`: return out[e]^T, a
    contiguous [E, P, D] (the layout of a LoRA B factor, whose gradient this is).

    x [S, D] with unit column stride (any row stride), u [S, P] with any strides, offs int32 [E]: the
    cumulative row ends per expert (expert e owns rows offs[e-1]..offs[e], offs[-1] == S; not checked, that
    would sync). = moe.grouped_mm(x.t(), u, offs) with empty groups zeroed."""
    _check_expert_transposed_product(x, u, offs)
    D, P, E = x.shape[1], u.shape[1], offs.shape[0]
    out = torch.empty(E, P, D, dtype=out_dtype or x.dtype, device=x.device).transpose(1, 2) if transposed else \
        torch.empty(E, D, P, dtype=out_dtype or x.dtype, device=x.device)
    if out.numel():
        _expert_transposed_product_kernel[lambda c: (E, triton.cdiv(D, c["BLOCK_D"]))](
            x, u, offs.contiguous(), out, D, P, x.stride(0), u.stride(0), u.stride(1), out.stride(1), out.stride(2),
            float(scale), BLOCK_P=_padded_width(P), DOT_F32=INTERPRETING or x.dtype == torch.float32)
    return out.transpose(1, 2) if transposed else out
