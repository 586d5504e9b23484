"""Triton kernels for the per-expert LoRA products of the training-time MoE layer (GPU only).

A LoRA factor on a grouped expert projection multiplies expert-sorted rows by a per-expert matrix whose
other side is the padded LoRA rank (16..32 columns). model/moe.py computes these with torch's grouped_mm,
which runs such skinny shapes at about half the H100's memory bandwidth (measured, 16384 rows over 32
experts, bf16; bench/grouped_mm_shapes.py, the "lora ..." cases): x[S, 2880] @ A 60 us, g[S, 5760] @ B^T
108 us, the weight gradients 66 us and 108 us. All four are memory-bound -- the time is reading the big
[S, D] operand -- and each kernel here reads it once, accumulating in float32:

- `expert_transposed_product`: out[e] = x_e^T @ u_e over expert e's rows -- the LoRA weight gradients,
  grad_A = expert_transposed_product(x, grad_xa, offs) and grad_B = the `transposed` form of
  expert_transposed_product(g, xa, offs). One program per (expert, column block) sums its expert's rows in
  order: no atomics, deterministic, exact zeros for experts with no rows. On the training path (56 us a call
  in the 4K step on the H100 against grouped_mm's ~64 plus a mask and a scale; session 5).
- `rows_times_expert_matrix`: out[i] = x[i] @ w[expert(i)] on expert-sorted rows -- x @ A and g @ B^T. Row
  tiles; a tile that straddles experts runs once per expert it holds, loading only that expert's rows.
  Measured slower than grouped_mm for x @ A (76-105 us against 61) and within 10% for g @ B^T, so it is off
  the training path (moe.TRITON_EXPERT_LORA_ROWS) and kept for bench/grouped_mm_shapes.py's comparison.

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

    # measured once per shape (session 5's first H100 run of fixed [64, 128] tiles: x @ A 98 us against
    # grouped_mm's 60, 256 programs for 132 SMs being too few)
    _CONFIGS = [triton.Config({"BLOCK_M": m, "BLOCK_D": d}, num_warps=w)
                for m in (16, 32, 64) for d in (128, 256) for w in (4, 8)]

    @triton.autotune(configs=_CONFIGS[:1] if INTERPRETING else _CONFIGS, key=["depth", "width"])
    @triton.jit
    def _rows_times_expert_matrix_kernel(x_ptr, w_ptr, expert_ptr, out_ptr, n_rows, depth, width, stride_x,
                                         stride_we, stride_wd, stride_wp, stride_out, BLOCK_P: tl.constexpr,
                                         DOT_F32: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_D: tl.constexpr):
        first = tl.program_id(0) * BLOCK_M
        rows = first + tl.arange(0, BLOCK_M)
        row_ok = rows < n_rows
        p = tl.arange(0, BLOCK_P)
        p_ok = p < width
        experts = tl.load(expert_ptr + rows, mask=row_ok, other=-1)
        x_rows = x_ptr + rows[:, None].to(tl.int64) * stride_x
        acc = tl.zeros((BLOCK_M, BLOCK_P), dtype=tl.float32)
        # rows are sorted by expert: a tile spans the experts from its first row's to its last row's (usually
        # one); each pass loads only its expert's rows, so x is read once in all
        e_first = tl.load(expert_ptr + first)
        e_last = tl.load(expert_ptr + tl.minimum(first + BLOCK_M, n_rows) - 1)
        for e in range(e_first, e_last + 1):
            mine = (experts == e)[:, None]
            w_e = w_ptr + e * stride_we  # w is LoRA-sized: 32-bit offsets suffice
            for start in range(0, depth, BLOCK_D):
                d = start + tl.arange(0, BLOCK_D)
                d_ok = d < depth
                x = tl.load(x_rows + d[None, :], mask=mine & d_ok[None, :], other=0.0)
                w = tl.load(w_e + d[:, None] * stride_wd + p[None, :] * stride_wp, mask=d_ok[:, None] & p_ok[None, :],
                            other=0.0)
                if DOT_F32:  # the CPU interpreter multiplies bf16 dot operands as raw bits
                    acc = tl.dot(x.to(tl.float32), w.to(tl.float32), acc, input_precision="ieee")
                else:
                    acc = tl.dot(x, w, acc)
        out = out_ptr + rows[:, None].to(tl.int64) * stride_out + p[None, :]
        tl.store(out, acc.to(out_ptr.dtype.element_ty), mask=row_ok[:, None] & p_ok[None, :])

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


def _check_rows_times_expert_matrix(x: torch.Tensor, w: torch.Tensor, expert_of_row: torch.Tensor) -> None:
    fn = "rows_times_expert_matrix"
    if x.dim() != 2 or w.dim() != 3 or w.shape[1] != x.shape[1]:
        raise ValueError(f"{fn}: expected x [S, D] and w [E, D, P], got x {tuple(x.shape)}, w {tuple(w.shape)}")
    if not _unit_column_stride(x):
        raise ValueError(f"{fn}: x {tuple(x.shape)} needs unit column stride, has strides {x.stride()}")
    if x.dtype != w.dtype:
        raise ValueError(f"{fn}: x is {x.dtype} but w is {w.dtype}")
    if w.shape[2] > _MAX_WIDTH:
        raise ValueError(f"{fn}: w {tuple(w.shape)} has P = {w.shape[2]} > {_MAX_WIDTH} (a LoRA-rank kernel)")
    _check_index("expert_of_row", expert_of_row, (x.shape[0],), fn)


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


def rows_times_expert_matrix(x: torch.Tensor, w: torch.Tensor, expert_of_row: torch.Tensor) -> torch.Tensor:
    """out[i] = x[i] @ w[expert_of_row[i]] -> [S, P] in x's dtype (float32 accumulation, one rounding).

    x [S, D] with unit column stride (any row stride), w [E, D, P] with any strides (a transposed view is
    fine), expert_of_row int32 [S], non-decreasing (expert-sorted rows; experts may have none).
    = moe.grouped_mm(x, w, offs) for the offsets of those rows."""
    _check_rows_times_expert_matrix(x, w, expert_of_row)
    (S, D), P = x.shape, w.shape[2]
    out = x.new_empty(S, P)
    if out.numel():
        _rows_times_expert_matrix_kernel[lambda c: (triton.cdiv(S, c["BLOCK_M"]),)](
            x, w, expert_of_row.contiguous(), out, S, D, P, x.stride(0), w.stride(0), w.stride(1), w.stride(2),
            out.stride(0), BLOCK_P=_padded_width(P), DOT_F32=INTERPRETING or x.dtype == torch.float32)
    return out


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
