"""GPT-OSS mixture-of-experts with LoRA: a reference module and the split-LoRA grouped-GEMM module.

Both modules replace `mlp.experts` of transformers' GptOssForCausalLM and keep its call signature
`experts(hidden [N, H], router_indices [N, k], routing_weights [N, k]) -> [N, H]` and its math
(transformers' GptOssExperts: `x @ gate_up_proj[e] + bias`, interleaved gate/up columns, clamped
SwiGLU `(up + 1) * gate * sigmoid(alpha * gate)`, `@ down_proj[e] + bias`, weighted by the router).

Expert LoRA parameters live on the experts module under the same names in both modules, so state
dicts interchange: `lora_gate_up_A [E, H, r]`, `lora_gate_up_B [E, r, 2I]`, `lora_down_A [E, I, r]`,
`lora_down_B [E, r, H]`, used as `x @ A_e @ B_e * scaling` (the `x @ W_e` convention of the weights).

- `ReferenceLoraExperts`: transformers' per-expert loop with `W_e + scaling * A_e @ B_e` materialised,
  which is what PEFT's `target_parameters` LoRA computes. Slow, obviously right.
- `GroupedExperts`: tokens sorted by expert once per layer, the frozen expert GEMMs as grouped GEMMs
  (torch's `grouped_mm`, a per-expert loop where it is unavailable) and LoRA as `(x @ A_e) @ B_e` over
  the same groups, never forming `A_e @ B_e`. Own autograd Functions save only the sorted inputs,
  `x @ A` [S, r] and the offsets; frozen weights (bf16, block-scaled FP8 or MXFP4) are dequantised just
  in time in forward and again in backward. Own code: transformers' grouped path has no LoRA and
  PEFT's materialises a delta the size of every expert stack. Inference with few rows (decode: at most
  DECODE_MAX_ROWS token-expert rows, no autograd, bf16 on a GPU) instead reads the stored experts
  directly, LoRA included (model/triton_moe_decode.py), rather than dequantising every expert.
"""

from __future__ import annotations

import math
from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import nn

from rustforge.model.quant import (
    fp8_dequantize,
    fp8_quantize,
    mxfp4_dequantize,
    mxfp4_quantize,
)
from rustforge.model.triton_dequant import (
    fp8_dequantize_triton,
    mxfp4_dequantize_triton,
    triton_dequant_available,
    triton_kernels_available,
)
from rustforge.model.triton_expert_lora import expert_transposed_product
from rustforge.model.triton_moe_decode import (
    ExpertWeights,
    moe_decode,
    moe_decode_supported,
)
from rustforge.model.triton_moe_train import (
    combine_rows,
    combine_rows_backward,
    low_rank_update_,
    swiglu_backward,
    swiglu_forward,
)

EXPERT_TARGETS = ("gate_up_proj", "down_proj")
EXPERT_FORMATS = ("bf16", "fp8", "mxfp4")
FP8_BLOCK = 128
_EXPERTS_PER_CHUNK = 4  # bounds the float32 / int64 temporaries of (de)quantisation
TRITON_DEQUANT = True  # one-pass Triton dequantisation on GPU (model/triton_dequant.py); False = torch reference
FUSED_KERNELS = True  # SwiGLU and the routing-weighted sums as one-pass Triton kernels (model/triton_moe_train.py)
# with FUSED_KERNELS, the expert LoRA's weight gradients as a Triton kernel (model/triton_expert_lora.py: 56 us a
# call against grouped_mm's ~64 plus a mask and a scale in the 4K step, H100, session 5)
TRITON_EXPERT_LORA = True
# bf16 experts with LoRA: the LoRA term inside the frozen grouped GEMM as extra K -- x @ A (and the bias's column of
# ones) appended to x, the scaled B (and the bias row) to W -- instead of an in-place low-rank update of y, and the
# backward's g @ B^T as extra output columns of g @ [W; B]^T (_GroupedLoraLinearInK). Faster: the 4K step +4.6% /
# +4.8% on the H100 (runs 18, 19). More accurate in bf16: the LoRA term is summed in the GEMM's float32 accumulator
# before y's one rounding, where an update of an already-rounded bf16 y loses any LoRA delta under half a bf16 step
# -- early in training, with B near zero, that is most of them (the tiny model in bf16, 12 AdamW steps at lr 1e-5:
# the loss fell 0.028 this way, 0.015 the other, 0.033 in float32; the 20B step's loss after 14 steps 12.68 vs
# 12.78, runs 18-20). Off: the in-place update (_GroupedLoraLinear), the reference. Taken by models whose dtype is
# in LORA_IN_GEMM_K_DTYPES: float32 models (the CPU path) gain neither speed nor accuracy and keep the reference.
LORA_IN_GEMM_K = True
LORA_IN_GEMM_K_DTYPES = (torch.bfloat16, torch.float16)
DECODE_KERNELS = True  # inference with few rows reads the stored experts directly (model/triton_moe_decode.py)
DECODE_MAX_ROWS = 256  # token-expert rows (tokens x top-k) up to which it does: decode steps up to batch 64 at k=4
_LORA_PREFIX = {"gate_up_proj": "lora_gate_up", "down_proj": "lora_down"}

_NATIVE_GROUPED_MM = getattr(F, "grouped_mm", None) or getattr(torch, "_grouped_mm", None)


# ------------------------------------------------------------------------------------ grouped GEMM
def _strides_aligned(t: torch.Tensor) -> bool:
    """grouped_mm needs 16-byte aligned leading strides and base pointer."""
    size = t.element_size()
    if any(stride * size % 16 for stride in t.stride() if stride != 1):
        return False
    return torch.compiler.is_compiling() or t.data_ptr() % 16 == 0


def native_grouped_mm_supported(a: torch.Tensor, b: torch.Tensor) -> bool:
    """Whether to use torch's grouped_mm kernel: CUDA bf16 on sm90+. On CPU torch has a kernel too, but
    it measured ~10x slower than a loop of per-expert matmuls on the tiny model (2 cores, torch 2.13)."""
    if _NATIVE_GROUPED_MM is None or a.dtype != b.dtype or a.device != b.device or a.device.type != "cuda":
        return False
    if a.dtype != torch.bfloat16 or torch.cuda.get_device_capability(a.device) < (9, 0):
        return False
    return _strides_aligned(a) and _strides_aligned(b)


def _grouped_mm_loop(a: torch.Tensor, b: torch.Tensor, offs: torch.Tensor) -> torch.Tensor:
    ends = offs.tolist()  # the one host sync of the fallback
    starts = [0] + ends[:-1]
    if b.dim() == 3:
        out = a.new_zeros(a.shape[0], b.shape[-1])
        for e, (lo, hi) in enumerate(zip(starts, ends)):
            if hi > lo:
                out[lo:hi] = a[lo:hi] @ b[e]
        return out
    out = a.new_zeros(len(ends), a.shape[0], b.shape[-1])
    for e, (lo, hi) in enumerate(zip(starts, ends)):
        if hi > lo:
            out[e] = a[:, lo:hi] @ b[lo:hi]
    return out


def grouped_mm(a: torch.Tensor, b: torch.Tensor, offs: torch.Tensor) -> torch.Tensor:
    """Grouped matmul over row groups ending at `offs` (int32 [E], cumulative).

    a [S, K] with b [E, K, N] -> [S, N], rows of group e multiplied by b[e];
    a [M, S] with b [S, N]    -> [E, M, N], group e = a[:, group] @ b[group] (zero for empty groups).
    """
    if native_grouped_mm_supported(a, b):
        return _NATIVE_GROUPED_MM(a, b, offs=offs)
    return _grouped_mm_loop(a, b, offs)


def per_expert_transposed_product(x: torch.Tensor, u: torch.Tensor, offs: torch.Tensor, empty_groups: torch.Tensor,
                                  scale: float = 1.0, transposed: bool = False, out_dtype: torch.dtype | None = None):
    """scale * x_e^T @ u_e over each expert's rows (zero for experts without rows) -- a LoRA weight gradient:
    [E, D, P], or with `transposed` its contiguous [E, P, D] transpose, in out_dtype (default x's)."""
    if TRITON_EXPERT_LORA and _fused(x):
        return expert_transposed_product(x, u, offs, out_dtype, scale=scale, transposed=transposed)
    out = grouped_mm(u.t(), x, offs) if transposed else grouped_mm(x.t(), u, offs)
    return out.masked_fill_(empty_groups, 0).mul_(scale).to(out_dtype or x.dtype)


def _zero_empty_groups(per_group: torch.Tensor, offs: torch.Tensor) -> torch.Tensor:
    # The K-grouped kernel leaves no guarantee about groups with no rows; their gradient is zero.
    counts = torch.diff(offs, prepend=offs.new_zeros(1))
    return per_group.masked_fill_((counts == 0).view(-1, 1, 1), 0)


# ------------------------------------------------------------------------------ frozen weight storage
def _quantize_by_expert_chunks(fn, weight: torch.Tensor) -> tuple[torch.Tensor, ...]:
    """fn over a few experts at a time, outputs concatenated along experts (dim 0)."""
    pieces = [fn(weight[lo : lo + _EXPERTS_PER_CHUNK]) for lo in range(0, weight.shape[0], _EXPERTS_PER_CHUNK)]
    if len(pieces) == 1:
        return pieces[0]
    return tuple(torch.cat(parts) for parts in zip(*pieces))


def _fp8_dequant(q_bytes: torch.Tensor, scale_bits: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    return fp8_dequantize(q_bytes.view(torch.float8_e4m3fn), scale_bits.view(torch.float32), dtype, block=FP8_BLOCK)


def _fp8_quant(out_in: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    q, scales = fp8_quantize(out_in.contiguous(), block=FP8_BLOCK)
    return q.contiguous().view(torch.uint8), scales.contiguous().view(torch.int32)


def _mxfp4_quant(out_in: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    return mxfp4_quantize(out_in.contiguous())


def dense_expert_weight(fmt: str, storage: tuple[torch.Tensor, ...], dtype: torch.dtype) -> torch.Tensor:
    """The frozen weight as [E, in, out] in dtype (for quantised formats a transposed view)."""
    if fmt == "bf16":
        return storage[0].to(dtype)
    with torch.profiler.record_function(f"rustforge.dequantize_{fmt}"):  # a named range in bench profiles
        return _dequantize_all(fmt, storage, dtype)


def _dequantize_all(fmt: str, storage: tuple[torch.Tensor, ...], dtype: torch.dtype) -> torch.Tensor:
    if TRITON_DEQUANT and triton_dequant_available(storage[0]):
        if fmt == "mxfp4":
            return mxfp4_dequantize_triton(*storage, dtype).transpose(1, 2)
        if fmt == "fp8":
            return fp8_dequantize_triton(storage[0], storage[1].view(torch.float32), dtype, FP8_BLOCK).transpose(1, 2)
    dequantize = {"fp8": _fp8_dequant, "mxfp4": mxfp4_dequantize}.get(fmt)
    if dequantize is None:
        raise ValueError(f"model.expert_format: unknown format {fmt!r}; known: {list(EXPERT_FORMATS)}")
    first, num_experts = dequantize(*(t[:_EXPERTS_PER_CHUNK] for t in storage), dtype), storage[0].shape[0]
    if num_experts <= _EXPERTS_PER_CHUNK:
        return first.transpose(1, 2)
    out_in = first.new_empty(num_experts, *first.shape[1:])  # filled chunk by chunk: peak = output + a chunk
    out_in[:_EXPERTS_PER_CHUNK] = first
    del first
    for lo in range(_EXPERTS_PER_CHUNK, num_experts, _EXPERTS_PER_CHUNK):
        out_in[lo : lo + _EXPERTS_PER_CHUNK] = dequantize(*(t[lo : lo + _EXPERTS_PER_CHUNK] for t in storage), dtype)
    return out_in.transpose(1, 2)


def quantize_expert_weight(fmt: str, weight_in_out: torch.Tensor) -> tuple[torch.Tensor, ...]:
    """[E, in, out] dense weight -> the storage tensors of `fmt`, quantised along `in` ([E, out, in] layout,
    as the gpt-oss checkpoint). FP8 codes and scales are stored as uint8 / int32 bit views so that
    `module.to(dtype)` can never cast them."""
    if fmt == "bf16":
        return (weight_in_out.detach(),)
    quantize = {"fp8": _fp8_quant, "mxfp4": _mxfp4_quant}.get(fmt)
    if quantize is None:
        raise ValueError(f"model.expert_format: unknown format {fmt!r}; known: {list(EXPERT_FORMATS)}")
    return _quantize_by_expert_chunks(quantize, weight_in_out.detach().transpose(1, 2))


def _storage_names(fmt: str, proj: str) -> tuple[str, ...]:
    return {
        "bf16": (proj,),
        "fp8": (f"{proj}_fp8", f"{proj}_fp8_scales"),
        "mxfp4": (f"{proj}_blocks", f"{proj}_scales"),
    }[fmt]


# ---------------------------------------------------------------------------------- autograd pieces
def _k_pad(r: int) -> int:
    """Extra K of _GroupedLoraLinearInK: the rank plus the bias column, rounded up to 64 (K = 2880 + 64 = 23 x 128
    on the 20B shape: whole GEMM tiles)."""
    return (r + 1 + 63) // 64 * 64


def _padded_rank(r: int) -> int:
    # LoRA rank + one column of ones for the bias, rounded up to 8 elements (16-byte grouped_mm strides)
    return (r + 1 + 7) // 8 * 8


def _bias_augmented_lora(lora_A, lora_B, bias, scaling, d_in: int):
    """(A' [E, in, p], B' [E, p, out]) in the bias's (compute) dtype with x @ A' @ B' = scaling * x @ A @ B once
    column r of x @ A' is set to 1 (row r of B' is the bias), so the bias rides on the LoRA GEMM instead of a
    gathered add. The LoRA factors may be float32 masters: the copies cast (no separate cast kernels)."""
    E, d_out = bias.shape
    r = 0 if lora_A is None else lora_A.shape[-1]
    p = _padded_rank(r)
    aug_A = bias.new_empty(E, d_in, p)
    aug_B = bias.new_empty(E, p, d_out)
    if lora_A is not None:
        aug_A[:, :, :r].copy_(lora_A)
        torch.mul(lora_B, scaling, out=aug_B[:, :r])
    aug_A[:, :, r:].zero_()
    aug_B[:, r].copy_(bias)
    aug_B[:, r + 1 :].zero_()
    return aug_A, aug_B, r


class _GroupedLoraLinear(torch.autograd.Function):
    """y = x @ W_e + b_e + scaling * (x @ A_e) @ B_e on expert-sorted rows; W, b frozen.

    Saves x, x @ A (plus the bias column) and the offsets. W is dequantised again in backward (kept on
    ctx as a reference to the module's storage, not as a saved tensor, so activation offloading never
    copies weights) -- unless `keep_dense`: then the dense W is a saved tensor too. Under gradient
    checkpointing that is what makes it one dequantisation fewer per projection per step: the first
    forward's saved tensors are dropped by the checkpoint, and the recompute's dense W lives only until
    this layer's backward (one layer's experts, ~1.6 GB on the 20B shape). Without checkpointing it would
    keep every layer's dense experts: build_model sets it only with checkpointing."""

    @staticmethod
    def forward(ctx, x, lora_A, lora_B, bias, offs, expert_of_row, empty_groups, scaling, fmt, storage, keep_dense=False):
        weight = dense_expert_weight(fmt, storage, x.dtype)
        y = grouped_mm(x, weight, offs)
        aug_A, aug_B, r = _bias_augmented_lora(lora_A, lora_B, bias.to(x.dtype), scaling, x.shape[-1])
        xa = grouped_mm(x, aug_A, offs)  # [S, p]; columns past r are zero
        xa[:, r] = 1
        # the backward reads the factors as the forward used them: aug_A[..., :r] = A, aug_B[:, :r] = scaling * B in
        # the compute dtype (lora_A / lora_B themselves may be float32 masters)
        ctx.save_for_backward(x, xa, offs, expert_of_row, empty_groups, aug_A, aug_B, *((weight,) if keep_dense else ()))
        ctx.has_lora, ctx.lora_dtype = lora_A is not None, None if lora_A is None else lora_A.dtype
        del weight
        ctx.scaling, ctx.fmt, ctx.storage, ctx.rank, ctx.keep_dense = scaling, fmt, storage, r, keep_dense
        if _fused(y):  # accumulated in place by one kernel instead of a grouped GEMM into a temporary + add
            low_rank_update_(y, xa, aug_B, expert_of_row)
        else:
            y.add_(grouped_mm(xa, aug_B, offs))
        return y

    @staticmethod
    def backward(ctx, grad_y):
        x, xa, offs, expert_of_row, empty_groups, aug_A, aug_B, *kept = ctx.saved_tensors
        grad_y = grad_y.contiguous()
        grad_x = grad_A = grad_B = None
        if ctx.needs_input_grad[0]:
            weight = kept[0] if kept else dense_expert_weight(ctx.fmt, ctx.storage, grad_y.dtype)
            grad_x = grouped_mm(grad_y, weight.to(grad_y.dtype).transpose(1, 2), offs)
            del weight
        if ctx.has_lora:
            r = ctx.rank
            lora_A_t, scaled_B = aug_A[:, :, :r].transpose(1, 2), aug_B[:, :r]
            grad_xa = grouped_mm(grad_y, scaled_B.transpose(1, 2), offs)  # the scaling rides in B
            if grad_x is not None and _fused(grad_x):
                low_rank_update_(grad_x, grad_xa, lora_A_t, expert_of_row)
            elif grad_x is not None:
                grad_x.add_(grouped_mm(grad_xa, lora_A_t, offs))
            if ctx.needs_input_grad[1]:  # in the factors' (master) dtype straight from the kernel
                grad_A = per_expert_transposed_product(x, grad_xa, offs, empty_groups, out_dtype=ctx.lora_dtype)
            if ctx.needs_input_grad[2]:
                grad_B = per_expert_transposed_product(grad_y, xa[:, :r], offs, empty_groups, ctx.scaling,
                                                       transposed=True, out_dtype=ctx.lora_dtype)
        return grad_x, grad_A, grad_B, None, None, None, None, None, None, None, None


class _GroupedLoraLinearInK(torch.autograd.Function):
    """_GroupedLoraLinear's y = x @ W_e + b_e + scaling * (x @ A_e) @ B_e as ONE grouped GEMM over K + P:
    [x | x @ A, 1, 0] @ [W; scaling * B; b; 0] (LORA_IN_GEMM_K). `x_wide` [S, K + P] holds x in its first K columns
    (written by the producer, _GatherSorted or _ClampedSwiGLU); this function writes the other P. `w_aug`
    [E, K + P, out] is the frozen W in its first K rows (GroupedExperts keeps the bf16 weight there) and this
    function writes the rest: both tails belong to this function. The weight's tail is shared by every forward of
    the module, so a backward whose forward was not the last writer (two forwards before a backward, a no-grad or
    LoRA-disabled forward in between) writes its own rows back first (`w_aug._lora_rows_writer`).
    Backward: g @ [W; scaling B; b]^T gives g @ W^T and, in its extra columns, g @ (scaling B)^T = d loss / d (x @ A):
    the skinny GEMM and the forward's in-place low-rank update of y are gone, the GEMMs are 64 / 2880 longer in K."""

    @staticmethod
    def forward(ctx, x_wide, lora_A, lora_B, bias, offs, expert_of_row, empty_groups, scaling, w_aug, K):
        r = 0 if lora_A is None else lora_A.shape[-1]
        x = x_wide[:, :K]
        lora_A_c = scaled_B = None
        if r:
            r8 = (r + 7) // 8 * 8  # grouped_mm's 16-byte strides
            lora_A_c = lora_A.to(x.dtype) if r8 == r else torch.nn.functional.pad(lora_A.to(x.dtype), (0, r8 - r))
            x_wide[:, K : K + r].copy_(grouped_mm(x, lora_A_c, offs)[:, :r])
            scaled_B = (lora_B * scaling).to(x.dtype)
        x_wide[:, K + r] = 1
        x_wide[:, K + r + 1 :].zero_()
        ctx.rows_token = object()  # this forward's mark on the weight's LoRA rows (not ctx: no reference cycle)
        _write_lora_rows(w_aug, K, scaled_B, bias, ctx.rows_token)
        y = grouped_mm(x_wide, w_aug, offs)
        saved = () if lora_A_c is None else (lora_A_c, scaled_B)
        ctx.save_for_backward(x_wide, offs, expert_of_row, empty_groups, bias, *saved)
        ctx.w_aug, ctx.K, ctx.rank, ctx.scaling = w_aug, K, r, scaling  # w_aug frozen: held by reference
        ctx.lora_dtype = None if lora_A is None else lora_A.dtype
        return y

    @staticmethod
    def backward(ctx, grad_y):
        x_wide, offs, expert_of_row, empty_groups, bias, *factors = ctx.saved_tensors
        K, r, w_aug = ctx.K, ctx.rank, ctx.w_aug
        if getattr(w_aug, "_lora_rows_writer", None) is not ctx.rows_token:
            _write_lora_rows(w_aug, K, factors[1] if r else None, bias, ctx.rows_token)
        grad_y = grad_y.contiguous()
        grad_wide = grouped_mm(grad_y, w_aug.transpose(1, 2), offs)  # [S, K + P]
        grad_x, grad_xa = grad_wide[:, :K], grad_wide[:, K : K + r]
        grad_A = grad_B = None
        if r:
            lora_A_t = factors[0][:, :, :r].transpose(1, 2)
            if ctx.needs_input_grad[1]:
                grad_A = per_expert_transposed_product(x_wide[:, :K], grad_xa, offs, empty_groups, out_dtype=ctx.lora_dtype)
            if ctx.needs_input_grad[2]:
                grad_B = per_expert_transposed_product(grad_y, x_wide[:, K : K + r], offs, empty_groups, ctx.scaling,
                                                       transposed=True, out_dtype=ctx.lora_dtype)
            if _fused(grad_x):
                low_rank_update_(grad_x, grad_xa, lora_A_t, expert_of_row)
            else:
                grad_x.add_(grouped_mm(grad_xa, lora_A_t, offs))
        grad_wide[:, K:].zero_()  # x_wide's tail is this function's own: no gradient to the producer
        return grad_wide, grad_A, grad_B, None, None, None, None, None, None, None


def _write_lora_rows(w_aug: torch.Tensor, K: int, scaled_B: torch.Tensor | None, bias: torch.Tensor, writer) -> None:
    """w_aug's rows past K: scaling * B, the bias, zeros; `writer` (a forward's token) noted as their author."""
    r = 0 if scaled_B is None else scaled_B.shape[1]
    if r:
        w_aug[:, K : K + r].copy_(scaled_B)
    w_aug[:, K + r].copy_(bias)
    w_aug[:, K + r + 1 :].zero_()
    w_aug._lora_rows_writer = writer


def _fused(t: torch.Tensor) -> bool:
    return FUSED_KERNELS and triton_kernels_available(t)


class _GatherSorted(torch.autograd.Function):
    """hidden [N, H] -> its rows in expert order [N*k, H]; backward gathers back and sums the k copies
    (no scatter-add: deterministic, no atomics)."""

    @staticmethod
    def forward(ctx, hidden, token_of_row, inverse, top_k, pad=0):
        """pad > 0: the rows land in the first columns of [N*k, H + pad]; the last `pad` columns are left for the
        projection to fill (_GroupedLoraLinearInK) and carry no gradient back."""
        ctx.save_for_backward(inverse)
        ctx.top_k, ctx.hidden = top_k, hidden.shape[1]
        if not pad:
            return hidden.index_select(0, token_of_row)
        wide = hidden.new_empty(token_of_row.shape[0], hidden.shape[1] + pad)
        torch.index_select(hidden, 0, token_of_row, out=wide[:, : hidden.shape[1]])
        return wide

    @staticmethod
    def backward(ctx, grad_rows):
        (inverse,) = ctx.saved_tensors
        grad_rows = grad_rows[:, : ctx.hidden]  # a view: the kernel reads any row stride
        if _fused(grad_rows):
            return combine_rows(grad_rows, inverse, ctx.top_k, grad_rows.dtype), None, None, None, None
        grad = grad_rows.index_select(0, inverse)
        return grad.view(-1, ctx.top_k, grad.shape[-1]).sum(dim=1), None, None, None, None


class _WeightedSumUnsorted(torch.autograd.Function):
    """Rows in expert order [N*k, H] (the down projection's output) -> per-token routing-weighted sums
    [N, H] in out_dtype: out[t] = sum_j w[t, j] * rows[inverse[t*k + j]]. The torch path is transformers'
    order of operations (weights cast to the rows' dtype, multiply, unsort, sum, cast); on the GPU one
    Triton kernel each way (float32 sums), the backward also giving the router weights their gradient."""

    @staticmethod
    def forward(ctx, rows, routing_weights, expert_rows: ExpertRows, out_dtype):
        ctx.save_for_backward(rows, routing_weights, expert_rows.perm, expert_rows.token_of_row)
        ctx.top_k, ctx.weights_dtype = expert_rows.top_k, routing_weights.dtype
        if _fused(rows):
            return combine_rows(rows, expert_rows.inverse, expert_rows.top_k, out_dtype, weights=routing_weights)
        weighted = rows * routing_weights.reshape(-1)[expert_rows.perm].to(rows.dtype).unsqueeze(-1)
        summed = weighted.index_select(0, expert_rows.inverse).view(-1, ctx.top_k, rows.shape[-1]).sum(dim=1)
        return summed.to(out_dtype)

    @staticmethod
    def backward(ctx, grad_out):
        rows, routing_weights, perm, token_of_row = ctx.saved_tensors
        if _fused(rows):
            grad_rows, grad_flat = combine_rows_backward(grad_out, rows, routing_weights, perm, ctx.top_k)
            return grad_rows, grad_flat.view(routing_weights.shape).to(ctx.weights_dtype), None, None
        grad_weighted = grad_out.to(rows.dtype).index_select(0, token_of_row)
        w_sorted = routing_weights.reshape(-1)[perm].to(rows.dtype)
        grad_rows = grad_weighted * w_sorted.unsqueeze(-1)
        grad_sorted = (grad_weighted * rows).sum(dim=-1).to(ctx.weights_dtype)
        grad_flat = torch.zeros(routing_weights.numel(), dtype=ctx.weights_dtype, device=rows.device)
        grad_flat[perm] = grad_sorted
        return grad_rows, grad_flat.view(routing_weights.shape), None, None


def swiglu_reference(gate_up: torch.Tensor, alpha: float, limit: float) -> torch.Tensor:
    """transformers' GptOssExperts._apply_gate: interleaved gate/up columns, clamped SwiGLU."""
    gate, up = gate_up[..., ::2], gate_up[..., 1::2]
    gate = gate.clamp(min=None, max=limit)
    up = up.clamp(min=-limit, max=limit)
    return (up + 1) * (gate * torch.sigmoid(gate * alpha))


_SWIGLU_CHUNK_ELEMENTS = 1 << 24  # bounds the temporaries of the SwiGLU backward


def _swiglu_grad(gate_up: torch.Tensor, grad_out: torch.Tensor, alpha: float, limit: float, out: torch.Tensor):
    """Writes d swiglu_reference / d gate_up (interleaved) into `out`, in the input dtype as autograd
    of the reference would (torch's clamp passes gradient where min <= x <= max, bounds included)."""
    gate, up = gate_up[..., ::2], gate_up[..., 1::2]
    gate_c = gate.clamp(max=limit)
    sig = torch.sigmoid(gate_c * alpha)
    glu = gate_c * sig
    out[..., 1::2] = (grad_out * glu).masked_fill_(up.abs() > limit, 0)
    # d/dg [g * sigmoid(alpha g)] = sig + alpha * glu * (1 - sig)
    d_glu = torch.addcmul(sig, glu, torch.sub(1, sig), value=alpha)
    d_glu.mul_(up.clamp(-limit, limit).add_(1)).mul_(grad_out).masked_fill_(gate > limit, 0)
    out[..., ::2] = d_glu


class _ClampedSwiGLU(torch.autograd.Function):
    """swiglu_reference saving only its input (autograd of the reference keeps ~5 [S, I] tensors);
    the backward runs over row chunks so its temporaries stay small."""

    @staticmethod
    def forward(ctx, gate_up, alpha, limit, pad=0):
        """pad > 0: the output lands in the first columns of [S, I + pad] (as _GatherSorted's)."""
        ctx.save_for_backward(gate_up)
        ctx.alpha, ctx.limit = alpha, limit
        if not pad:
            return swiglu_forward(gate_up, alpha, limit) if _fused(gate_up) else swiglu_reference(gate_up, alpha, limit)
        n_out = gate_up.shape[1] // 2
        out = gate_up.new_empty(gate_up.shape[0], n_out + pad)
        if _fused(gate_up):
            swiglu_forward(gate_up, alpha, limit, out=out[:, :n_out])
        else:
            out[:, :n_out] = swiglu_reference(gate_up, alpha, limit)
        return out

    @staticmethod
    def backward(ctx, grad_out):
        (gate_up,) = ctx.saved_tensors
        grad_out = grad_out[:, : gate_up.shape[1] // 2]  # the padded columns carry no gradient back
        if _fused(gate_up):
            return swiglu_backward(gate_up, grad_out, ctx.alpha, ctx.limit), None, None, None
        grad = torch.empty_like(gate_up)
        rows = max(1, _SWIGLU_CHUNK_ELEMENTS // max(1, grad_out.shape[-1]))
        for lo in range(0, gate_up.shape[0], rows):
            hi = lo + rows
            _swiglu_grad(gate_up[lo:hi], grad_out[lo:hi], ctx.alpha, ctx.limit, grad[lo:hi])
        return grad, None, None, None


# ------------------------------------------------------------------------------ expert-sorted rows
class ExpertRows(NamedTuple):
    """The token-expert rows of a layer in expert order: rows of expert e end at offs[e] (int32, cumulative);
    sorted row i is flat row perm[i] (token perm[i] // top_k), flat row j is sorted row inverse[j]."""

    offs: torch.Tensor
    perm: torch.Tensor
    inverse: torch.Tensor
    token_of_row: torch.Tensor
    top_k: int
    expert_of_row: torch.Tensor  # int32 [S]: the expert of each sorted row
    empty_groups: torch.Tensor  # bool [E, 1, 1]: experts with no rows (their K-grouped GEMM output is undefined)


def sort_by_expert(router_indices: torch.Tensor, num_experts: int) -> ExpertRows:
    """One stable sort per layer; gate_up and down, forward and backward reuse everything derived from it."""
    top_k = router_indices.shape[1]
    # the narrowest key type: the GPU's radix sort makes one pass per key byte (int64: 8 passes, 54 us at
    # 16K rows on the H100; uint8 for up to 256 experts: one)
    key_dtype = torch.uint8 if num_experts <= 256 else torch.int32
    expert_ids = router_indices.reshape(-1).to(key_dtype)
    sorted_ids, perm = torch.sort(expert_ids, stable=True)
    all_experts = torch.arange(num_experts, device=expert_ids.device, dtype=sorted_ids.dtype)
    offs = torch.searchsorted(sorted_ids, all_experts, right=True, out_int32=True)
    inverse = torch.empty_like(perm)
    inverse[perm] = torch.arange(perm.numel(), device=perm.device)
    empty = (torch.diff(offs, prepend=offs.new_zeros(1)) == 0).view(-1, 1, 1)
    return ExpertRows(offs, perm, inverse, perm // top_k, top_k, sorted_ids.to(torch.int32), empty)


def experts_on_sorted_rows(hidden_states, router_indices, routing_weights, num_experts, dtype, alpha, limit, project,
                           input_pad: int = 0):
    """transformers' expert math over expert-sorted rows, computed in `dtype`: gather, gate_up projection,
    clamped SwiGLU, down projection, routing weights, sum per token. `project(proj, x, rows)` applies one
    projection (bias included) to sorted rows [S, in] -> [S, out]; GroupedExperts and QAT's grouped experts
    (model/qat_moe.py) differ only there. input_pad > 0: each projection's input rows come `input_pad` columns wider,
    for the projection to fill (_GroupedLoraLinearInK)."""
    rows = sort_by_expert(router_indices, num_experts)
    # compute in the model dtype whatever the residual stream carries: an fp32 input here would
    # send every expert GEMM down the fp32 per-expert loop (seen on the H100, 2026-11-25)
    x = _GatherSorted.apply(hidden_states.to(dtype), rows.token_of_row, rows.inverse, rows.top_k, input_pad)
    gate_up = project("gate_up_proj", x, rows)
    gated = _ClampedSwiGLU.apply(gate_up, alpha, limit, input_pad)
    del gate_up  # saved by _ClampedSwiGLU when it is needed; the tiled path's peak is lower without it
    out = project("down_proj", gated, rows)
    return _WeightedSumUnsorted.apply(out, routing_weights, rows, hidden_states.dtype)


# --------------------------------------------------------------------------------------- expert LoRA
def lora_param_names(proj: str) -> tuple[str, str]:
    prefix = _LORA_PREFIX[proj]
    return f"{prefix}_A", f"{prefix}_B"


def expert_lora_targets(module: nn.Module) -> list[str]:
    """The expert projections that carry LoRA on this module, in EXPERT_TARGETS order."""
    return [p for p in EXPERT_TARGETS if getattr(module, lora_param_names(p)[0], None) is not None]


def _lora_shapes(module: nn.Module, proj: str, r: int) -> tuple[tuple[int, ...], tuple[int, ...]]:
    E, H, I = module.num_experts, module.hidden_size, module.intermediate_size
    d_in, d_out = (H, 2 * I) if proj == "gate_up_proj" else (I, H)
    return (E, d_in, r), (E, r, d_out)


def add_expert_lora(module: nn.Module, r: int, alpha: float, targets: list[str] | tuple[str, ...]) -> None:
    """(Re)create expert LoRA on `module` with PEFT's init (A kaiming-uniform a=sqrt(5), B zero).

    A is drawn on the CPU the way PEFT draws its (E*r, in) lora_A (same distribution and layout), so the
    init does not depend on the device. Parameters are float32 (PEFT's autocast_adapter_dtype)."""
    if r <= 0:
        raise ValueError(f"lora.r: must be positive, got {r}")
    unknown = [t for t in targets if t not in EXPERT_TARGETS]
    if unknown:
        raise ValueError(f"lora.targets: {unknown} are not expert projections; known: {list(EXPERT_TARGETS)}")
    device = next(t.device for t in list(module.parameters()) + list(module.buffers()))
    for proj in EXPERT_TARGETS:
        name_A, name_B = lora_param_names(proj)
        if proj not in targets:
            module.register_parameter(name_A, None)
            module.register_parameter(name_B, None)
            continue
        shape_A, shape_B = _lora_shapes(module, proj, r)
        E, d_in, _ = shape_A
        a = torch.empty(E * r, d_in)
        nn.init.kaiming_uniform_(a, a=math.sqrt(5))
        a = a.view(E, r, d_in).transpose(1, 2).contiguous()
        module.register_parameter(name_A, nn.Parameter(a.to(device)))
        module.register_parameter(name_B, nn.Parameter(torch.zeros(shape_B, device=device)))
    module.lora_r = r
    module.lora_scaling = alpha / r


def copy_expert_lora(src: nn.Module, dst: nn.Module) -> None:
    """Give `dst` the LoRA parameters (values and scaling) of `src`."""
    targets = expert_lora_targets(src)
    if not targets:
        return
    add_expert_lora(dst, src.lora_r, src.lora_scaling * src.lora_r, targets)
    with torch.no_grad():
        for proj in targets:
            for name in lora_param_names(proj):
                getattr(dst, name).copy_(getattr(src, name))


def _expert_dims(bias_gate_up: torch.Tensor, bias_down: torch.Tensor) -> tuple[int, int, int]:
    return bias_gate_up.shape[0], bias_down.shape[1], bias_gate_up.shape[1] // 2


def dense_expert_params(experts: nn.Module) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """(gate_up [E, H, 2I], gate_up_bias, down [E, I, H], down_bias) of any experts module, detached."""
    if isinstance(experts, GroupedExperts):
        dtype = experts.dtype
        return (
            experts.dense_weight("gate_up_proj", dtype),
            experts.gate_up_proj_bias.detach(),
            experts.dense_weight("down_proj", dtype),
            experts.down_proj_bias.detach(),
        )
    for name in ("gate_up_proj", "down_proj", "gate_up_proj_bias", "down_proj_bias"):
        p = getattr(experts, name, None)
        if not isinstance(p, torch.Tensor) or not p.is_floating_point():
            raise TypeError(
                f"{type(experts).__name__}.{name}: expected dense expert weights (transformers' GptOssExperts), "
                f"got {type(p).__name__ if p is None else p.dtype}"
            )
    return (
        experts.gate_up_proj.detach(),
        experts.gate_up_proj_bias.detach(),
        experts.down_proj.detach(),
        experts.down_proj_bias.detach(),
    )


# -------------------------------------------------------------------------------- reference experts
class ReferenceLoraExperts(nn.Module):
    """transformers' GptOssExperts loop with the LoRA delta folded into each expert's weight."""

    def __init__(self, gate_up_proj, gate_up_proj_bias, down_proj, down_proj_bias, *, alpha: float, limit: float):
        super().__init__()
        self.num_experts, self.hidden_size, self.intermediate_size = _expert_dims(gate_up_proj_bias, down_proj_bias)
        self.alpha, self.limit = alpha, limit
        self.gate_up_proj = nn.Parameter(gate_up_proj, requires_grad=False)
        self.gate_up_proj_bias = nn.Parameter(gate_up_proj_bias, requires_grad=False)
        self.down_proj = nn.Parameter(down_proj, requires_grad=False)
        self.down_proj_bias = nn.Parameter(down_proj_bias, requires_grad=False)
        for proj in EXPERT_TARGETS:
            for name in lora_param_names(proj):
                self.register_parameter(name, None)
        self.lora_r, self.lora_scaling = 0, 0.0

    @classmethod
    def from_module(cls, experts: nn.Module, lora_cfg=None) -> ReferenceLoraExperts:
        """From transformers' GptOssExperts (sharing its weights) or any of our experts modules; keeps the
        source's LoRA, else adds a fresh one for `lora_cfg`'s expert targets."""
        module = cls(*dense_expert_params(experts), alpha=experts.alpha, limit=experts.limit)
        _carry_or_add_lora(experts, module, lora_cfg)
        return module

    def expert_weight(self, proj: str, e: int) -> torch.Tensor:
        weight = getattr(self, proj)[e]
        name_A, name_B = lora_param_names(proj)
        lora_A, lora_B = getattr(self, name_A), getattr(self, name_B)
        if lora_A is None:
            return weight
        delta = lora_A[e].to(weight.dtype) @ lora_B[e].to(weight.dtype)
        return weight + self.lora_scaling * delta

    def forward(self, hidden_states, router_indices, routing_weights):
        next_states = torch.zeros_like(hidden_states)
        with torch.no_grad():
            expert_mask = F.one_hot(router_indices, num_classes=self.num_experts).permute(2, 1, 0)
            expert_hit = torch.greater(expert_mask.sum(dim=(-1, -2)), 0).nonzero()
        for e in expert_hit[:, 0].tolist():
            top_k_pos, token_idx = torch.where(expert_mask[e])
            current = hidden_states[token_idx]
            gate_up = current @ self.expert_weight("gate_up_proj", e) + self.gate_up_proj_bias[e]
            gated = swiglu_reference(gate_up, self.alpha, self.limit)
            out = gated @ self.expert_weight("down_proj", e) + self.down_proj_bias[e]
            weighted = out * routing_weights[token_idx, top_k_pos, None]
            next_states.index_add_(0, token_idx, weighted.to(hidden_states.dtype))
        return next_states


# ---------------------------------------------------------------------------------- grouped experts
class GroupedExperts(nn.Module):
    """Split-LoRA experts over grouped GEMMs with frozen weights stored as bf16 (the model dtype), FP8
    e4m3 with 1x128 block scales, or MXFP4 (checkpoint layout, ~4.25 bits per weight).

    State dict names: bf16 -> HF's `gate_up_proj` / `down_proj`; fp8 -> `{proj}_fp8` (uint8 view) and
    `{proj}_fp8_scales` (int32 view of float32); mxfp4 -> the checkpoint's `{proj}_blocks` / `{proj}_scales`.
    Biases are `gate_up_proj_bias` / `down_proj_bias` in every format; LoRA as in ReferenceLoraExperts."""

    def __init__(
        self,
        fmt: str,
        gate_up_storage: tuple[torch.Tensor, ...],
        gate_up_proj_bias: torch.Tensor,
        down_storage: tuple[torch.Tensor, ...],
        down_proj_bias: torch.Tensor,
        *,
        alpha: float,
        limit: float,
        dtype: torch.dtype,
    ):
        super().__init__()
        if fmt not in EXPERT_FORMATS:
            raise ValueError(f"model.expert_format: unknown format {fmt!r}; known: {list(EXPERT_FORMATS)}")
        self.fmt, self.alpha, self.limit = fmt, alpha, limit
        self.num_experts, self.hidden_size, self.intermediate_size = _expert_dims(gate_up_proj_bias, down_proj_bias)
        for proj, storage in (("gate_up_proj", gate_up_storage), ("down_proj", down_storage)):
            for name, tensor in zip(_storage_names(fmt, proj), storage, strict=True):
                if fmt == "bf16":
                    self.register_parameter(name, nn.Parameter(tensor, requires_grad=False))
                else:
                    self.register_buffer(name, tensor)
        self.gate_up_proj_bias = nn.Parameter(gate_up_proj_bias.to(dtype), requires_grad=False)
        self.down_proj_bias = nn.Parameter(down_proj_bias.to(dtype), requires_grad=False)
        for proj in EXPERT_TARGETS:
            for name in lora_param_names(proj):
                self.register_parameter(name, None)
        self.lora_r, self.lora_scaling = 0, 0.0
        self.tile_tokens = 0  # > 0: sequences longer than this run in token tiles (_TokenTiledExperts)
        self.keep_dense_for_backward = False  # with checkpointing: one dequantisation fewer (_GroupedLoraLinear)
        self._aug_weights: dict[str, torch.Tensor] = {}  # LORA_IN_GEMM_K: [E, K + P, out] holding the bf16 weight
        # FSDP2 all-gathers the weight into its own storage each forward: a wider copy would defeat the sharding
        # (train/distributed.shard_model turns this off)
        self.lora_in_gemm_k_allowed = True

    @property
    def dtype(self) -> torch.dtype:
        """The model dtype, read off the biases so that it follows `module.to(dtype)`."""
        return self.gate_up_proj_bias.dtype

    # ---- construction
    @classmethod
    def from_dense(
        cls, gate_up_proj, gate_up_proj_bias, down_proj, down_proj_bias, *, fmt: str, alpha: float, limit: float
    ) -> GroupedExperts:
        """From HF-layout dense weights (gate_up [E, H, 2I], down [E, I, H]); quantises for fp8/mxfp4."""
        return cls(
            fmt,
            quantize_expert_weight(fmt, gate_up_proj),
            gate_up_proj_bias.detach(),
            quantize_expert_weight(fmt, down_proj),
            down_proj_bias.detach(),
            alpha=alpha,
            limit=limit,
            dtype=gate_up_proj.dtype,
        )

    @classmethod
    def from_hf(cls, experts: nn.Module, fmt: str = "bf16", lora_cfg=None) -> GroupedExperts:
        """From transformers' GptOssExperts or one of our experts modules; keeps the source's LoRA, else
        adds a fresh one for `lora_cfg`'s expert targets. bf16 shares the source's weight tensors."""
        if isinstance(experts, GroupedExperts) and experts.fmt == fmt:
            storage = {p: tuple(getattr(experts, n) for n in _storage_names(fmt, p)) for p in EXPERT_TARGETS}
            module = cls(
                fmt,
                tuple(t.detach() for t in storage["gate_up_proj"]),
                experts.gate_up_proj_bias.detach(),
                tuple(t.detach() for t in storage["down_proj"]),
                experts.down_proj_bias.detach(),
                alpha=experts.alpha,
                limit=experts.limit,
                dtype=experts.dtype,
            )
        else:
            module = cls.from_dense(*dense_expert_params(experts), fmt=fmt, alpha=experts.alpha, limit=experts.limit)
        _carry_or_add_lora(experts, module, lora_cfg)
        return module

    @classmethod
    def from_mxfp4(
        cls,
        gate_up_blocks: torch.Tensor,
        gate_up_scales: torch.Tensor,
        gate_up_bias: torch.Tensor,
        down_blocks: torch.Tensor,
        down_scales: torch.Tensor,
        down_bias: torch.Tensor,
        *,
        alpha: float,
        limit: float,
        dtype: torch.dtype = torch.bfloat16,
        lora_cfg=None,
    ) -> GroupedExperts:
        """From a gpt-oss checkpoint's tensors: `*_blocks` uint8 [E, out, in/32, 16], `*_scales` uint8
        [E, out, in/32], biases [E, out]; `dtype` is the compute dtype."""
        E, H, I = _expert_dims(gate_up_bias, down_bias)
        expected = {
            "gate_up_blocks": (gate_up_blocks, (E, 2 * I, H // 32, 16)),
            "gate_up_scales": (gate_up_scales, (E, 2 * I, H // 32)),
            "down_blocks": (down_blocks, (E, H, I // 32, 16)),
            "down_scales": (down_scales, (E, H, I // 32)),
        }
        for name, (tensor, shape) in expected.items():
            if tuple(tensor.shape) != shape or tensor.dtype != torch.uint8:
                raise ValueError(
                    f"GroupedExperts.from_mxfp4: {name} must be uint8 {shape}, got {tensor.dtype} {tuple(tensor.shape)}"
                )
        module = cls(
            "mxfp4",
            (gate_up_blocks, gate_up_scales),
            gate_up_bias,
            (down_blocks, down_scales),
            down_bias,
            alpha=alpha,
            limit=limit,
            dtype=dtype,
        )
        _carry_or_add_lora(None, module, lora_cfg)
        return module

    # ---- weights
    def storage(self, proj: str) -> tuple[torch.Tensor, ...]:
        return tuple(getattr(self, name) for name in _storage_names(self.fmt, proj))

    def dense_weight(self, proj: str, dtype: torch.dtype | None = None) -> torch.Tensor:
        """The frozen (dequantised) weight [E, in, out], detached."""
        return dense_expert_weight(self.fmt, tuple(t.detach() for t in self.storage(proj)), dtype or self.dtype)

    def _lora(self, proj: str):
        """The projection's LoRA factors as stored (float32 masters under autocast: _GroupedLoraLinear casts)."""
        name_A, name_B = lora_param_names(proj)
        return getattr(self, name_A), getattr(self, name_B)

    def _project(self, proj: str, x, rows: ExpertRows, dense: dict | None = None):
        lora_A, lora_B = self._lora(proj)
        d_in = self.hidden_size if proj == "gate_up_proj" else self.intermediate_size
        if x.shape[1] > d_in:  # wide rows (forward_rows' input_pad): the LoRA term inside the GEMM
            w_aug = self._augmented_weight(proj, x.shape[1] - d_in)
            bias = getattr(self, f"{proj}_bias").detach().to(x.dtype)
            return _GroupedLoraLinearInK.apply(x, lora_A, lora_B, bias, rows.offs, rows.expert_of_row,
                                               rows.empty_groups, self.lora_scaling, w_aug, d_in)
        if dense is None:
            fmt, storage = self.fmt, tuple(t.detach() for t in self.storage(proj))
        else:  # dequantised once by the caller and shared by its token tiles
            fmt, storage = "bf16", (dense[proj],)
        bias = getattr(self, f"{proj}_bias").detach()
        return _GroupedLoraLinear.apply(
            x, lora_A, lora_B, bias, rows.offs, rows.expert_of_row, rows.empty_groups, self.lora_scaling, fmt, storage,
            self.keep_dense_for_backward,
        )

    def _lora_in_k_pad(self) -> int:
        """The input_pad of forward_rows: _k_pad(r) when LORA_IN_GEMM_K applies (bf16 storage, LoRA on, a model dtype
        in LORA_IN_GEMM_K_DTYPES), else 0."""
        applies = (LORA_IN_GEMM_K and self.lora_in_gemm_k_allowed and self.fmt == "bf16" and self.lora_r > 0
                   and self.dtype in LORA_IN_GEMM_K_DTYPES)
        return _k_pad(self.lora_r) if applies else 0

    def _augmented_weight(self, proj: str, pad: int) -> torch.Tensor:
        """[E, K + pad, out] whose first K rows ARE the bf16 weight parameter (moved there once: the parameter
        becomes a view, its values and state-dict name unchanged); _GroupedLoraLinearInK writes the other rows.
        The state dict then holds a non-contiguous view: torch.save writes the wider storage, safetensors wants
        .contiguous() (as the loader's writer and the export take it)."""
        param = getattr(self, proj)
        aug = self._aug_weights.get(proj)
        E, K, N = param.shape
        if aug is None or aug.shape[1] != K + pad or aug.data_ptr() != param.data_ptr() or aug.dtype != param.dtype:
            with torch.no_grad():
                aug = param.new_empty(E, K + pad, N)
                aug[:, :K].copy_(param)
                param.data = aug[:, :K]
            self._aug_weights[proj] = aug
        return aug

    def _apply(self, fn, *args, **kwargs):
        """module.to(...) and friends move the parameters, not the wider buffers: drop those (rebuilt when used)."""
        self._aug_weights.clear()
        return super()._apply(fn, *args, **kwargs)

    def dense_weights(self) -> dict:
        """Both projections' frozen weights dequantised in the model dtype (what the token tiles share)."""
        return {proj: self.dense_weight(proj) for proj in EXPERT_TARGETS}

    def lora_parameters(self) -> list[torch.Tensor]:
        return [p for proj in EXPERT_TARGETS for p in (getattr(self, n) for n in lora_param_names(proj)) if p is not None]

    # ---- forward
    def forward(self, hidden_states, router_indices, routing_weights):
        if self.decode_path_applies(hidden_states, router_indices):
            return self.forward_decode(hidden_states, router_indices, routing_weights)
        tile = self.tile_tokens
        if not tile or hidden_states.shape[0] <= tile:
            return self.forward_rows(hidden_states, router_indices, routing_weights)
        if torch.is_grad_enabled():
            return _TokenTiledExperts.apply(self, hidden_states, router_indices, routing_weights, *self.lora_parameters())
        return _tiled_forward(self, hidden_states, router_indices, routing_weights, self.dense_weights())

    def forward_rows(self, hidden_states, router_indices, routing_weights, dense: dict | None = None):
        """The experts over all given tokens at once (`dense`: pre-dequantised weights, else from storage)."""
        return experts_on_sorted_rows(
            hidden_states, router_indices, routing_weights, self.num_experts, self.dtype, self.alpha, self.limit,
            lambda proj, x, rows: self._project(proj, x, rows, dense),
            input_pad=self._lora_in_k_pad() if dense is None else 0,
        )  # fmt: skip

    # ---- decode (inference with few rows)
    def decode_path_applies(self, hidden_states, router_indices) -> bool:
        """No autograd, at most DECODE_MAX_ROWS token-expert rows, a bf16 model on a GPU that runs the decode
        kernels: then forward reads the stored experts directly instead of dequantising all of them."""
        return (
            DECODE_KERNELS
            and not torch.is_grad_enabled()
            and router_indices.numel() <= DECODE_MAX_ROWS
            and self.dtype == torch.bfloat16
            and moe_decode_supported(self.fmt, hidden_states)
        )

    def decode_weights(self, proj: str) -> ExpertWeights:
        """One projection as the decode kernels read it: the module's own storage, bias and LoRA (no copies)."""
        name_A, name_B = lora_param_names(proj)
        lora_A, lora_B = getattr(self, name_A), getattr(self, name_B)
        return ExpertWeights(
            self.fmt,
            tuple(t.detach() for t in self.storage(proj)),
            getattr(self, f"{proj}_bias").detach(),
            None if lora_A is None else lora_A.detach(),
            None if lora_B is None else lora_B.detach(),
            self.lora_scaling,
            FP8_BLOCK,
        )

    def forward_decode(self, hidden_states, router_indices, routing_weights):
        """forward through model/triton_moe_decode.py (GPU, no autograd)."""
        out = moe_decode(
            hidden_states.to(self.dtype),
            router_indices,
            routing_weights,
            self.decode_weights("gate_up_proj"),
            self.decode_weights("down_proj"),
            alpha=self.alpha,
            limit=self.limit,
        )
        return out.to(hidden_states.dtype)

    def extra_repr(self) -> str:
        return (
            f"fmt={self.fmt}, num_experts={self.num_experts}, hidden_size={self.hidden_size}, "
            f"intermediate_size={self.intermediate_size}, lora={expert_lora_targets(self)}, r={self.lora_r}"
        )


# ------------------------------------------------------------------------------ token-tiled experts
def _tiled_forward(experts: GroupedExperts, hidden, router_indices, routing_weights, dense: dict) -> torch.Tensor:
    out = torch.empty_like(hidden)
    for lo in range(0, hidden.shape[0], experts.tile_tokens):
        hi = lo + experts.tile_tokens
        out[lo:hi] = experts.forward_rows(hidden[lo:hi], router_indices[lo:hi], routing_weights[lo:hi], dense)
    return out


class _TokenTiledExperts(torch.autograd.Function):
    """The experts over tiles of `tile_tokens` tokens, for long sequences (Unsloth's tiled MLP, for the
    MoE). Forward keeps no intermediates; backward recomputes one tile at a time under autograd, so the
    expert-row tensors ([tokens * k, 2I] and kin, ~200 KB per token on the 20B shape) only ever exist
    for one tile. The frozen weights are dequantised once per call and shared by the tiles. Costs one
    more expert forward per step. Gradients reach the hidden states, the routing weights (so the router)
    and the expert LoRA factors, which are passed in so autograd can return theirs."""

    @staticmethod
    def forward(ctx, experts, hidden, router_indices, routing_weights, *lora):
        ctx.experts = experts
        ctx.save_for_backward(hidden, router_indices, routing_weights, *lora)
        return _tiled_forward(experts, hidden, router_indices, routing_weights, experts.dense_weights())

    @staticmethod
    def backward(ctx, grad_out):
        hidden, router_indices, routing_weights, *lora = ctx.saved_tensors
        experts, tile = ctx.experts, ctx.experts.tile_tokens
        want_hidden, want_routing = ctx.needs_input_grad[1], ctx.needs_input_grad[3]
        want_lora = list(ctx.needs_input_grad[4:])
        grad_hidden = torch.empty_like(hidden) if want_hidden else None
        grad_routing = torch.empty_like(routing_weights) if want_routing else None
        grad_lora = [torch.zeros_like(p) if want else None for p, want in zip(lora, want_lora)]
        dense = experts.dense_weights()
        for lo in range(0, hidden.shape[0], tile):
            hi = lo + tile
            with torch.enable_grad():
                h = hidden[lo:hi].detach().requires_grad_(want_hidden)
                w = routing_weights[lo:hi].detach().requires_grad_(want_routing)
                out = experts.forward_rows(h, router_indices[lo:hi], w, dense)
                inputs = [t for t, want in zip((h, w, *lora), (want_hidden, want_routing, *want_lora)) if want]
                grads = iter(torch.autograd.grad(out, inputs, grad_out[lo:hi], allow_unused=True))
            if want_hidden:
                grad_hidden[lo:hi] = next(grads)
            if want_routing:
                grad_routing[lo:hi] = next(grads)
            for acc, want in zip(grad_lora, want_lora):
                if want:
                    g = next(grads)
                    if g is not None:
                        acc.add_(g)
        return None, grad_hidden, None, grad_routing, *grad_lora


def configure_experts(hf_model: nn.Module, tile_tokens: int, keep_dense_for_backward: bool) -> None:
    """Every GroupedExperts layer: token tiles (0 = off; _TokenTiledExperts) and whether the recompute's
    dense weights are kept for the backward (only with gradient checkpointing; _GroupedLoraLinear)."""
    if tile_tokens < 0:
        raise ValueError(f"model.moe_tile_tokens must be >= 0, got {tile_tokens}")
    for module in hf_model.modules():
        if isinstance(module, GroupedExperts):
            module.tile_tokens = tile_tokens
            module.keep_dense_for_backward = keep_dense_for_backward


def _carry_or_add_lora(src: nn.Module | None, dst: nn.Module, lora_cfg) -> None:
    if src is not None and expert_lora_targets(src):
        copy_expert_lora(src, dst)
    elif lora_cfg is not None:
        targets = [t for t in lora_cfg.targets if t in EXPERT_TARGETS]
        if targets:
            add_expert_lora(dst, lora_cfg.r, lora_cfg.alpha, targets)


# ---------------------------------------------------------------------------------------- install
def install_experts(hf_model: nn.Module, impl: str, fmt: str = "bf16", lora_cfg=None) -> nn.Module:
    """Replace every layer's `mlp.experts` with ReferenceLoraExperts ("reference", bf16 only) or
    GroupedExperts ("grouped"); existing expert LoRA is carried over, else `lora_cfg` adds it."""
    if impl not in ("reference", "grouped"):
        raise ValueError(f"model.experts: unknown implementation {impl!r}; use reference or grouped")
    if fmt not in EXPERT_FORMATS:
        raise ValueError(f"model.expert_format: unknown format {fmt!r}; known: {list(EXPERT_FORMATS)}")
    if impl == "reference" and fmt != "bf16":
        raise ValueError("model.expert_format: compressed experts need model.experts = grouped")
    for layer in hf_model.model.layers:
        old = layer.mlp.experts
        if impl == "reference":
            layer.mlp.experts = ReferenceLoraExperts.from_module(old, lora_cfg)
        else:
            layer.mlp.experts = GroupedExperts.from_hf(old, fmt, lora_cfg)
    return hf_model
