"""MoE experts for decode (few token-expert rows) straight from the stored weights, in Triton.

For rows r = (token t, slot j) with expert e = router_indices[t, j], gate/up columns interleaved as in
transformers' GptOssExperts and LoRA as in model/moe.py (`x @ A_e @ B_e * scaling`):
    g_r   = swiglu(x_t @ Wgu[e] + bgu[e] + scaling * (x_t @ Agu[e]) @ Bgu[e])      [I]
    y_r   = w[t, j] * (g_r @ Wd[e] + bd[e] + scaling * (g_r @ Ad[e]) @ Bd[e])        [H]
    out_t = sum_j y_(t, j)
with the frozen W read in the format GroupedExperts stores it: MXFP4 (`blocks` uint8 [E, N, K/32, 16],
`scales` uint8 [E, N, K/32]), block-scaled FP8 (uint8 codes [E, N, K], float32 scales [E, N, K/block]) or
dense ([E, K, N], any float dtype).

Why own code: at decode the rollout engine multiplies 1-256 rows by the experts. The grouped path
(model/moe.py) dequantises all experts of a layer into a buffer and runs torch's grouped_mm, whose tiles
are built for hundreds of rows per expert; a merged bf16 copy of the experts (rollout/weights.py
"merged") costs 38 GB on the 20B model and still reads 4x the MXFP4 bytes. Here each program owns one
(expert, block of output columns) pair, streams that slice of the packed weight once, dequantises it in
registers and multiplies it by all rows routed to the expert (tensor cores from two tokens on, a float32
multiply-and-sum for one), accumulating in float32. Output columns are split over programs so that all
SMs stream weights even at batch 1 (4 experts hit per layer); no split over K, so no atomics and the
result is deterministic. The bias, the LoRA term's second product, the clamped SwiGLU (gate/up) and the
routing weight (down) are applied in the same kernel's epilogue, so one layer is five Triton launches
(routing plan, LoRA x @ A twice, the two projections) and three small torch ones (the LoRA partial sums,
the top-k sum): decode steps are launch-bound too, and the engine replays them as CUDA graphs.
Weights are read by groups of 32 inputs (one MXFP4 scale byte or FP8 scale per group, codes as 16-byte
vector loads) and the next K tile is loaded before the current one is decoded (Triton's pipeliner only
stages loads that feed tl.dot directly); compiled for sm90 these kernels use no local memory at the
default tiles (checked with Triton 3.9's ahead-of-time compiler).

Kernels:
- `_plan_kernel` (one program): groups the rows by expert without a sort or a host sync (CUDA graphs):
  `row_order` (rows by ascending expert, stable), `group_start` [G + 1] and `group_expert` [G], G =
  min(rows, E) (at most that many experts can be hit; unused groups are empty).
- `_lora_rows_kernel`: x_r @ A[e_r] for each row as float32 partial sums over K slices (summed by torch:
  deterministic), so the second LoRA product is a rank-r dot inside the projection kernel.
- `_expert_rows_kernel`: the projection itself, grid (column blocks, groups).

`moe_decode_reference` is the same function in float32 torch (weights dequantised by model/quant.py's
references, experts looped on the host; the kernels differ only for MXFP4 scale bytes above 240, i.e.
scales of 2**114 and up, see `_e8m0_times_2_14`); tests/test_moe_decode.py compares the two and the
reference with GroupedExperts. GPU-only like model/triton_dequant.py, and importable without Triton or a GPU.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import torch
from torch import Tensor

from rustforge.model.quant import fp8_dequantize, mxfp4_dequantize

try:
    import triton
    import triton.language as tl
except ImportError:  # CPU-only installs: GroupedExperts keeps its grouped path
    triton = None

DECODE_FORMATS = ("mxfp4", "fp8", "bf16")
_FMT_CODE = {"mxfp4": 0, "fp8": 1, "bf16": 2}
_LORA_BLOCK_K = 256  # K slice per program of the LoRA x @ A kernel
_MIN_DOT = 16  # tl.dot needs every dimension >= 16


def triton_moe_decode_available(t: Tensor) -> bool:
    return triton is not None and t.is_cuda


def moe_decode_supported(fmt: str, t: Tensor) -> bool:
    """Whether the decode kernels run for experts in `fmt` on t's device: bf16 tensor cores need sm80+,
    Triton's FP8 e4m3 conversion sm89+."""
    if fmt not in DECODE_FORMATS or not triton_moe_decode_available(t):
        return False
    return torch.cuda.get_device_capability(t.device) >= ((8, 9) if fmt == "fp8" else (8, 0))


# ------------------------------------------------------------------------------------------- inputs
@dataclass(frozen=True)
class ExpertWeights:
    """One projection of a stack of E experts as GroupedExperts stores it (model/moe.py), K inputs and
    N outputs: storage per `fmt` (module docstring), bias [E, N], optional LoRA A [E, K, r], B [E, r, N]."""

    fmt: str
    storage: tuple[Tensor, ...]
    bias: Tensor
    lora_A: Tensor | None = None
    lora_B: Tensor | None = None
    scaling: float = 0.0
    fp8_block: int = 128

    def __post_init__(self):
        if self.fmt not in DECODE_FORMATS:
            raise ValueError(f"moe_decode: unknown format {self.fmt!r}; known: {list(DECODE_FORMATS)}")
        if self.fmt == "fp8" and self.fp8_block % 32:
            raise ValueError(f"moe_decode: fp8 scale blocks must be a multiple of 32 inputs, got {self.fp8_block}")

    @property
    def num_experts(self) -> int:
        return self.bias.shape[0]

    @property
    def out_features(self) -> int:
        return self.bias.shape[1]

    @property
    def in_features(self) -> int:
        if self.fmt == "mxfp4":
            return self.storage[0].shape[2] * 32
        if self.fmt == "fp8":
            return self.storage[0].shape[2]
        return self.storage[0].shape[1]

    @property
    def has_lora(self) -> bool:
        return self.lora_A is not None


@dataclass(frozen=True)
class KernelConfig:
    """Tile sizes of the projection kernel (powers of two): block_m = 1 takes the float32 multiply-and-sum
    (one token: no tensor-core tile to fill), block_m >= 16 tl.dot; block_n >= 16 (tl.dot, even for the
    SwiGLU pairs), block_k >= 32 (whole MXFP4 scale groups)."""

    block_m: int
    block_n: int
    block_k: int
    num_warps: int = 4
    num_stages: int = 3

    def __post_init__(self):
        def pow2(v: int) -> bool:
            return v > 0 and v & (v - 1) == 0

        if not (self.block_m == 1 or (pow2(self.block_m) and self.block_m >= _MIN_DOT)):
            raise ValueError(f"KernelConfig: block_m must be 1 or a power of two >= 16, got {self.block_m}")
        if not (pow2(self.block_n) and self.block_n >= _MIN_DOT and pow2(self.block_k) and self.block_k >= 32):
            raise ValueError(f"KernelConfig: need block_n >= 16 and block_k >= 32, powers of two; got {self}")


def default_config(tokens: int, fmt: str = "mxfp4") -> KernelConfig:
    """One token: GEMV, 16 output columns per program (720-1440 programs per projection at batch 1 on
    the 20B shape, enough to stream from every SM), a K tile of 8 KB of MXFP4 (126 registers at sm90:
    4 programs per SM, two tiles in flight each) or 2-4 KB of FP8/bf16 (72 registers: 7 programs per SM;
    their 8 KB tiles take 168-254). More tokens: tensor cores with the rows of an expert in one M tile
    where they fit (a larger group loops over M tiles, re-reading its weights from L2). Register counts
    from Triton 3.9's sm90 compile; bench/check_moe_decode.py times alternatives."""
    if tokens <= 1:
        return KernelConfig(block_m=1, block_n=16, block_k=512 if fmt == "mxfp4" else 128)
    return KernelConfig(block_m=16 if tokens <= 16 else 32, block_n=32, block_k=128)


@dataclass(frozen=True)
class RoutePlan:
    """Rows grouped by expert (see `_plan_kernel`)."""

    row_order: Tensor  # [S] int32
    group_start: Tensor  # [G + 1] int32; group g = row_order[group_start[g]:group_start[g + 1]]
    group_expert: Tensor  # [G] int32 (0 for empty groups)

    @property
    def groups(self) -> int:
        return self.group_expert.numel()


# ------------------------------------------------------------------------------------------ kernels
if triton is not None:

    @triton.jit
    def _plan_kernel(ids_ptr, S, E, row_order_ptr, group_start_ptr, group_expert_ptr, G,
                     BLOCK_S: tl.constexpr, BLOCK_E: tl.constexpr, BLOCK_G: tl.constexpr):  # fmt: skip
        rows = tl.arange(0, BLOCK_S)
        ids = tl.load(ids_ptr + rows, mask=rows < S, other=-1).to(tl.int32)
        experts = tl.arange(0, BLOCK_E)
        # [S, E] one-hot; padding rows (-1) and out-of-range ids match no expert and are left out
        onehot = ((ids[:, None] == experts[None, :]) & (experts[None, :] < E)).to(tl.int32)
        counts = tl.sum(onehot, axis=0)
        starts = tl.cumsum(counts, axis=0) - counts
        earlier = tl.cumsum(onehot, axis=0) - onehot  # rows before this one with the same expert
        position = tl.sum(onehot * (starts[None, :] + earlier), axis=1)
        routed = tl.sum(onehot, axis=1) > 0
        tl.store(row_order_ptr + position, rows, mask=routed)
        active = counts > 0
        slot = tl.cumsum(active.to(tl.int32), axis=0) - 1  # group index of each hit expert
        tl.store(group_expert_ptr + slot, experts, mask=active)
        tl.store(group_start_ptr + slot, starts, mask=active)
        hit = tl.sum(active.to(tl.int32), axis=0)
        total = tl.sum(counts, axis=0)
        groups = tl.arange(0, BLOCK_G)
        unused = groups >= hit  # empty groups: start = end = total, expert 0 (any valid address)
        tl.store(group_start_ptr + groups, tl.zeros_like(groups) + total, mask=unused & (groups <= G))
        tl.store(group_expert_ptr + groups, tl.zeros_like(groups), mask=unused & (groups < G))

    @triton.jit
    def _lora_rows_kernel(x_ptr, stride_xm, x_row_div, ids_ptr, E, a_ptr, stride_ae, stride_ak, stride_ar, K, R,
                          part_ptr, S, BLOCK_K: tl.constexpr, R_BLOCK: tl.constexpr):  # fmt: skip
        row = tl.program_id(0)
        split = tl.program_id(1)
        e = tl.load(ids_ptr + row).to(tl.int64)
        # an expert id outside [0, E) reads expert 0 and contributes 0 (never an out-of-bounds read)
        routed = ((e >= 0) & (e < E)).to(tl.float32)
        e = tl.minimum(tl.maximum(e, 0), E - 1)
        k = split * BLOCK_K + tl.arange(0, BLOCK_K)
        k_ok = k < K
        x_row = (row // x_row_div).to(tl.int64)
        x = tl.load(x_ptr + x_row * stride_xm + k, mask=k_ok, other=0.0).to(tl.float32)
        r = tl.arange(0, R_BLOCK)
        a_mask = k_ok[:, None] & (r[None, :] < R)
        a = tl.load(a_ptr + e * stride_ae + k[:, None] * stride_ak + r[None, :] * stride_ar, mask=a_mask, other=0.0)
        part = tl.sum(x[:, None] * a.to(tl.float32), axis=0) * routed
        tl.store(part_ptr + (split.to(tl.int64) * S + row) * R_BLOCK + r, part)

    @triton.jit
    def _e2m1_as_half(bits16):
        """An E2M1 code placed as float16 bits (sign at bit 15, its 2 exponent and 1 mantissa bits at bits
        11..9) -> float32 equal to value * 2**-14: float16 has the exponent bias 15 where E2M1 has 1, and its
        subnormals make code 1 (0.5) come out right with no branch. Three integer ops and one conversion
        per value instead of a compare-and-select decoder (the kernel is ALU-bound at one row)."""
        return bits16.to(tl.int16).to(tl.float16, bitcast=True).to(tl.float32)

    @triton.jit
    def _e8m0_times_2_14(biased):
        """Biased exponent s (int32) -> 2**(s - 127 + 14) in float32, the MXFP4 scale times the 2**14 that
        _e2m1_as_half leaves out (exact for s <= 240, i.e. scales up to 2**113; s above reads as 2**127:
        no gpt-oss weight comes near, and 255 is NaN in OCP MX)."""
        return (tl.minimum(biased + 14, 254) << 23).to(tl.float32, bitcast=True)

    @triton.jit
    def _load_weight(w_ptr, s_ptr, w_base, s_base, n, n_ok, k0, K, stride_wn, stride_wk, stride_sn,
                     FMT: tl.constexpr, FP8_BLOCK: tl.constexpr, BLOCK_K: tl.constexpr):  # fmt: skip
        """The stored bytes of W[e]^T for output columns n and inputs k0 .. k0 + BLOCK_K, by groups of 32
        inputs: (codes [BLOCK_N, BLOCK_K/32, 16 | 32], scales [BLOCK_N, BLOCK_K/32, 1]); zero outside N x K.
        One scale load per group of 32 (not per value), and masks constant along a group so that codes load
        as 16-byte vectors. The packed formats store [N, K] with K contiguous."""
        n3 = n[:, None, None]
        g3 = tl.arange(0, BLOCK_K // 32)[None, :, None]
        group_ok = n_ok[:, None, None] & (k0 + g3 * 32 < K)
        if FMT == 0:  # MXFP4: byte i of a group holds inputs 2i (low nibble) and 2i + 1, one scale byte per group
            byte = k0 // 2 + g3 * 16 + tl.arange(0, 16)[None, None, :]
            codes = tl.load(w_ptr + w_base + n3 * stride_wn + byte, mask=group_ok, other=0)
            scales = tl.load(s_ptr + s_base + n3 * stride_sn + (k0 // 32 + g3), mask=group_ok, other=127)
        elif FMT == 1:  # FP8 e4m3 codes as uint8, one float32 scale per FP8_BLOCK (a multiple of 32) inputs
            k = k0 + g3 * 32 + tl.arange(0, 32)[None, None, :]
            codes = tl.load(w_ptr + w_base + n3 * stride_wn + k, mask=group_ok & (k < K), other=0)
            scales = tl.load(s_ptr + s_base + n3 * stride_sn + (k0 + g3 * 32) // FP8_BLOCK, mask=group_ok, other=1.0)
        else:  # dense [K, N] with any strides; no scales
            k = k0 + g3 * 32 + tl.arange(0, 32)[None, None, :]
            codes = tl.load(w_ptr + w_base + n3 * stride_wn + k * stride_wk, mask=group_ok & (k < K), other=0.0)
            scales = tl.zeros((1, 1, 1), dtype=tl.float32)
        return codes, scales

    @triton.jit
    def _mxfp4_halves(codes):
        """MXFP4 bytes [BLOCK_N, G, 16] -> float32 (even inputs, odd inputs) * 2**-14, each [BLOCK_N, G, 16]."""
        byte = codes.to(tl.int32)
        low = _e2m1_as_half(((byte & 0x08) << 12) | ((byte & 0x07) << 9))
        high = _e2m1_as_half(((byte & 0x80) << 8) | ((byte & 0x70) << 5))
        return low, high

    @triton.jit
    def _decode_weight(codes, scales, FMT: tl.constexpr):
        """_load_weight's tile as float32 [BLOCK_N, BLOCK_K/32, 32] (input k0 + 32 g + j at [:, g, j])."""
        if FMT == 0:
            low, high = _mxfp4_halves(codes)
            scale = _e8m0_times_2_14(scales.to(tl.int32))
            tile = tl.interleave(low * scale, high * scale)
        elif FMT == 1:
            tile = codes.to(tl.float8e4nv, bitcast=True).to(tl.float32) * scales
        else:
            tile = codes.to(tl.float32)
        return tile

    @triton.jit
    def _rows_times(a, b, USE_DOT: tl.constexpr, DOT_BF16: tl.constexpr):
        """a [M, K] @ b[N, K]^T in float32: tensor cores on bf16 operands (M, N, K >= 16), or a float32
        broadcast multiply-and-sum for one row. DOT_BF16=False (interpreter only) dots float32 operands."""
        if USE_DOT:
            if DOT_BF16:
                out = tl.dot(a.to(tl.bfloat16), tl.trans(b.to(tl.bfloat16)))
            else:
                out = tl.dot(a.to(tl.float32), tl.trans(b.to(tl.float32)), input_precision="ieee")
        else:
            out = tl.sum(a.to(tl.float32)[:, None, :] * b.to(tl.float32)[None, :, :], axis=2)
        return out

    @triton.jit
    def _rows_times_weight(x_ptr, stride_xm, x_rows, m_ok, w_ptr, s_ptr, w_base, s_base, n, n_ok, K,
                           stride_wn, stride_wk, stride_sn, FMT: tl.constexpr, FP8_BLOCK: tl.constexpr,
                           USE_DOT: tl.constexpr, DOT_BF16: tl.constexpr, BLOCK_M: tl.constexpr,
                           BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr):  # fmt: skip
        """x[x_rows] @ W[e][:, n] in float32 [BLOCK_M, BLOCK_N], streaming the stored weight slice once.
        The next K tile's bytes are loaded before the current one is decoded, so each program keeps two
        tiles in flight (Triton's pipeliner only stages loads that feed tl.dot directly)."""
        codes, scales = _load_weight(w_ptr, s_ptr, w_base, s_base, n, n_ok, 0, K, stride_wn, stride_wk, stride_sn,
                                     FMT, FP8_BLOCK, BLOCK_K)  # fmt: skip
        if USE_DOT:
            acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
            for k0 in range(0, K, BLOCK_K):
                k_next = k0 + BLOCK_K
                next_codes, next_scales = _load_weight(w_ptr, s_ptr, w_base, s_base, n, n_ok, k_next, K, stride_wn,
                                                       stride_wk, stride_sn, FMT, FP8_BLOCK, BLOCK_K)  # fmt: skip
                k = k0 + tl.arange(0, BLOCK_K)
                x = tl.load(x_ptr + x_rows[:, None] * stride_xm + k[None, :], mask=m_ok[:, None] & (k[None, :] < K),
                            other=0.0)  # fmt: skip
                w = tl.reshape(_decode_weight(codes, scales, FMT), (BLOCK_N, BLOCK_K))
                acc += _rows_times(x, w, USE_DOT, DOT_BF16)
                codes, scales = next_codes, next_scales
        else:  # one row (BLOCK_M == 1): products accumulate in registers, one reduction after the loop
            x_row = tl.sum(x_rows)  # the M loop steps one row at a time: it is always in range
            if FMT == 0:
                acc_groups = tl.zeros((BLOCK_N, BLOCK_K // 32), dtype=tl.float32)
                acc_values = tl.zeros((1, 1, 1), dtype=tl.float32)
            else:
                acc_groups = tl.zeros((1, 1), dtype=tl.float32)
                acc_values = tl.zeros((BLOCK_N, BLOCK_K // 32, 32), dtype=tl.float32)
            for k0 in range(0, K, BLOCK_K):
                k_next = k0 + BLOCK_K
                next_codes, next_scales = _load_weight(w_ptr, s_ptr, w_base, s_base, n, n_ok, k_next, K, stride_wn,
                                                       stride_wk, stride_sn, FMT, FP8_BLOCK, BLOCK_K)  # fmt: skip
                k = k0 + tl.arange(0, BLOCK_K // 32)[:, None] * 32 + tl.arange(0, 32)[None, :]
                x = tl.load(x_ptr + x_row * stride_xm + k, mask=k < K, other=0.0).to(tl.float32)
                if FMT == 0:
                    # MXFP4: even and odd inputs apart (an interleave moves the decoded tile through shared
                    # memory), each group's sum over its 32 inputs (in-thread) times its scale once
                    x_even, x_odd = tl.split(tl.reshape(x, (BLOCK_K // 32, 16, 2)))
                    low, high = _mxfp4_halves(codes)
                    group_sums = tl.sum(x_even[None, :, :] * low + x_odd[None, :, :] * high, axis=2)
                    scale = _e8m0_times_2_14(tl.reshape(scales, (BLOCK_N, BLOCK_K // 32)).to(tl.int32))
                    acc_groups += group_sums * scale
                else:
                    acc_values += x[None, :, :] * _decode_weight(codes, scales, FMT)
                codes, scales = next_codes, next_scales
            if FMT == 0:
                acc = tl.sum(acc_groups, axis=1)[None, :]
            else:
                acc = tl.sum(tl.sum(acc_values, axis=2), axis=1)[None, :]
        return acc

    @triton.jit
    def _expert_rows_kernel(
        x_ptr, stride_xm, x_row_div,
        row_order_ptr, group_start_ptr, group_expert_ptr,
        w_ptr, stride_we, stride_wn, stride_wk, s_ptr, stride_se, stride_sn,
        bias_ptr, stride_be,
        xa_ptr, stride_xa, lb_ptr, stride_lbe, stride_lbr, stride_lbn, lora_rank, scaling,
        rw_ptr, out_ptr, stride_om, N, K, alpha, limit,
        FMT: tl.constexpr, FP8_BLOCK: tl.constexpr, HAS_LORA: tl.constexpr, R_BLOCK: tl.constexpr,
        SWIGLU: tl.constexpr, ROW_WEIGHTS: tl.constexpr, USE_DOT: tl.constexpr, DOT_BF16: tl.constexpr,
        BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
    ):  # fmt: skip
        group = tl.program_id(1)
        start = tl.load(group_start_ptr + group)
        end = tl.load(group_start_ptr + group + 1)
        e = tl.load(group_expert_ptr + group).to(tl.int64)  # 64-bit: E * expert stride passes 2**31 on 120B
        n = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
        n_ok = n < N
        w_base, s_base = e * stride_we, e * stride_se
        bias = tl.load(bias_ptr + e * stride_be + n, mask=n_ok, other=0.0).to(tl.float32)
        for m0 in range(start, end, BLOCK_M):  # usually one M tile; none for an empty group
            m = m0 + tl.arange(0, BLOCK_M)
            m_ok = m < end
            rows = tl.load(row_order_ptr + m, mask=m_ok, other=0).to(tl.int64)
            x_rows = rows // x_row_div
            acc = _rows_times_weight(x_ptr, stride_xm, x_rows, m_ok, w_ptr, s_ptr, w_base, s_base, n, n_ok, K,
                                     stride_wn, stride_wk, stride_sn, FMT, FP8_BLOCK, USE_DOT, DOT_BF16,
                                     BLOCK_M, BLOCK_N, BLOCK_K)  # fmt: skip
            acc += bias[None, :]
            if HAS_LORA:  # + scaling * (x @ A_e) @ B_e, x @ A_e from _lora_rows_kernel
                r = tl.arange(0, R_BLOCK)
                r_ok = r < lora_rank
                xa = tl.load(xa_ptr + rows[:, None] * stride_xa + r[None, :], mask=m_ok[:, None] & r_ok[None, :],
                             other=0.0)  # fmt: skip
                lb_ptrs = lb_ptr + e * stride_lbe + r[None, :] * stride_lbr + n[:, None] * stride_lbn
                lb = tl.load(lb_ptrs, mask=n_ok[:, None] & r_ok[None, :], other=0.0)  # B_e^T [BLOCK_N, R_BLOCK]
                acc += scaling * _rows_times(xa, lb, USE_DOT, DOT_BF16)
            if SWIGLU:  # interleaved gate/up columns -> BLOCK_N // 2 outputs, transformers' clamped SwiGLU
                gate, up = tl.split(tl.reshape(acc, (BLOCK_M, BLOCK_N // 2, 2)))
                gate = tl.minimum(gate, limit)
                up = tl.minimum(tl.maximum(up, -limit), limit)
                value = (up + 1.0) * (gate * tl.sigmoid(gate * alpha))
                col = tl.program_id(0) * (BLOCK_N // 2) + tl.arange(0, BLOCK_N // 2)
                col_ok = col < N // 2
            else:
                value = acc
                if ROW_WEIGHTS:
                    value = value * tl.load(rw_ptr + rows, mask=m_ok, other=0.0).to(tl.float32)[:, None]
                col = n
                col_ok = n_ok
            out_ptrs = out_ptr + rows[:, None] * stride_om + col[None, :]
            tl.store(out_ptrs, value.to(out_ptr.dtype.element_ty), mask=m_ok[:, None] & col_ok[None, :])


def _interpreting() -> bool:
    """TRITON_INTERPRET=1 (CPU debugging): Triton 3.9's interpreter multiplies bf16 tl.dot operands as raw
    bits, so there the dot takes float32 operands."""
    return os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")


def _pow2(n: int, floor: int = 1) -> int:
    return max(floor, 1 << max(0, (n - 1).bit_length()))


# ------------------------------------------------------------------------------------- launchers
def route_plan(ids: Tensor, num_experts: int) -> RoutePlan:
    """Rows (flattened router indices, any integer dtype) grouped by expert; no host sync."""
    ids = ids.reshape(-1).contiguous()
    S = ids.numel()
    G = min(S, num_experts)
    plan = RoutePlan(
        row_order=torch.empty(S, dtype=torch.int32, device=ids.device),
        group_start=torch.zeros(G + 1, dtype=torch.int32, device=ids.device),
        group_expert=torch.empty(G, dtype=torch.int32, device=ids.device),
    )
    if S:
        block_e = _pow2(num_experts, 16)
        block_s = _pow2(S, 16)
        warps = 8 if block_s * block_e > 8192 else 4
        _plan_kernel[(1,)](ids, S, num_experts, plan.row_order, plan.group_start, plan.group_expert, G,
                           BLOCK_S=block_s, BLOCK_E=block_e, BLOCK_G=_pow2(G + 1, 16), num_warps=warps)  # fmt: skip
    return plan


def lora_rows(x: Tensor, x_row_div: int, ids: Tensor, lora_A: Tensor) -> Tensor:
    """[S, R_BLOCK] float32: row r's x[r // x_row_div] @ lora_A[ids[r]] (columns past the rank are 0)."""
    S, (E, K, R) = ids.numel(), lora_A.shape
    r_block = _pow2(R, _MIN_DOT)
    splits = triton.cdiv(K, _LORA_BLOCK_K)
    parts = torch.empty(splits, S, r_block, dtype=torch.float32, device=x.device)
    if S:
        _lora_rows_kernel[(S, splits)](x, x.stride(0), x_row_div, ids, E, lora_A, *lora_A.stride(), K, R, parts, S,
                                       BLOCK_K=_LORA_BLOCK_K, R_BLOCK=r_block)  # fmt: skip
    return parts.sum(dim=0)


def _weight_args(w: ExpertWeights) -> tuple:
    """(w, stride_we, stride_wn, stride_wk, s, stride_se, stride_sn) for _expert_rows_kernel."""
    if w.fmt == "mxfp4":
        blocks, scales = w.storage
        if blocks.dtype != torch.uint8 or scales.dtype != torch.uint8:
            raise ValueError(f"moe_decode: mxfp4 storage must be uint8, got {blocks.dtype}, {scales.dtype}")
        if blocks.stride()[2:] != (16, 1) or scales.stride(2) != 1:
            raise ValueError("moe_decode: mxfp4 blocks/scales must be contiguous along the input dim")
        return blocks, blocks.stride(0), blocks.stride(1), 0, scales, scales.stride(0), scales.stride(1)
    if w.fmt == "fp8":
        q, scales = w.storage[0].view(torch.uint8), w.storage[1].view(torch.float32)
        if q.stride(2) != 1 or scales.stride(2) != 1:
            raise ValueError("moe_decode: fp8 codes/scales must be contiguous along the input dim")
        return q, q.stride(0), q.stride(1), 1, scales, scales.stride(0), scales.stride(1)
    if w.fmt == "bf16":
        dense = w.storage[0]
        return dense, dense.stride(0), dense.stride(2), dense.stride(1), dense, 0, 0
    raise ValueError(f"moe_decode: unknown format {w.fmt!r}; known: {list(DECODE_FORMATS)}")


def expert_rows(
    x: Tensor,
    x_row_div: int,
    ids: Tensor,
    plan: RoutePlan,
    weights: ExpertWeights,
    config: KernelConfig,
    *,
    swiglu: tuple[float, float] | None = None,
    row_weights: Tensor | None = None,
) -> Tensor:
    """One projection for every row r: x[r // x_row_div] @ W[e_r] + b[e_r] (+ LoRA), then either the
    clamped SwiGLU (swiglu=(alpha, limit): [S, N/2]) or times row_weights[r] ([S, N]); x.dtype out."""
    S, K, N = ids.numel(), weights.in_features, weights.out_features
    if x.shape[-1] != K:
        raise ValueError(f"moe_decode: input has {x.shape[-1]} features, the experts take {K}")
    if swiglu is not None and N % 2:
        raise ValueError("moe_decode: swiglu needs an even number of outputs (gate/up pairs)")
    out = torch.empty(S, N // 2 if swiglu else N, dtype=x.dtype, device=x.device)
    if S == 0:
        return out
    x = x if x.stride(-1) == 1 else x.contiguous()
    bias = weights.bias.contiguous()
    xa, lb, lb_strides, r_block, rank = bias, bias, (0, 0, 0), _MIN_DOT, 0  # no LoRA: placeholders, never read
    if weights.has_lora:
        xa, lb = lora_rows(x, x_row_div, ids, weights.lora_A), weights.lora_B
        lb_strides, rank, r_block = lb.stride(), lb.shape[1], xa.shape[1]
    rw = row_weights.reshape(-1) if row_weights is not None else bias
    if not rw.is_contiguous():
        rw = rw.contiguous()
    alpha, limit = swiglu if swiglu is not None else (0.0, 0.0)
    use_dot = config.block_m >= _MIN_DOT
    grid = (triton.cdiv(N, config.block_n), plan.groups)
    _expert_rows_kernel[grid](
        x, x.stride(0), x_row_div,
        plan.row_order, plan.group_start, plan.group_expert,
        *_weight_args(weights),
        bias, bias.stride(0),
        xa, xa.stride(0), lb, *lb_strides, rank, float(weights.scaling),
        rw, out, out.stride(0), N, K, float(alpha), float(limit),
        FMT=_FMT_CODE[weights.fmt], FP8_BLOCK=weights.fp8_block, HAS_LORA=weights.has_lora, R_BLOCK=r_block,
        SWIGLU=swiglu is not None, ROW_WEIGHTS=row_weights is not None, USE_DOT=use_dot, DOT_BF16=not _interpreting(),
        BLOCK_M=config.block_m, BLOCK_N=config.block_n, BLOCK_K=config.block_k,
        num_warps=config.num_warps, num_stages=config.num_stages,
    )  # fmt: skip
    return out


def moe_decode(
    hidden: Tensor,
    router_indices: Tensor,
    routing_weights: Tensor,
    gate_up: ExpertWeights,
    down: ExpertWeights,
    *,
    alpha: float,
    limit: float,
    config: KernelConfig | None = None,
) -> Tensor:
    """The experts' forward (module docstring) for hidden [T, H], router_indices / routing_weights [T, k]
    -> [T, H] in hidden.dtype. Static shapes and no host sync: CUDA-graph capturable."""
    T, top_k = router_indices.shape
    if T == 0 or top_k == 0:
        return hidden.new_zeros(T, hidden.shape[-1])
    ids = router_indices.reshape(-1).contiguous()
    plan = route_plan(ids, gate_up.num_experts)
    config = config or default_config(T, gate_up.fmt)
    gated = expert_rows(hidden, top_k, ids, plan, gate_up, config, swiglu=(alpha, limit))
    out = expert_rows(gated, 1, ids, plan, down, config, row_weights=routing_weights)
    return out.view(T, top_k, out.shape[-1]).sum(dim=1)  # one rounding: torch sums bf16 in float32


# ------------------------------------------------------------------------------------- reference
def dequantize_reference(w: ExpertWeights, experts: slice | int, dtype: torch.dtype = torch.float32) -> Tensor:
    """W[experts] as [..., K, N] via model/quant.py's reference dequantisers."""
    if w.fmt == "mxfp4":
        blocks, scales = w.storage
        return mxfp4_dequantize(blocks[experts], scales[experts], torch.float32).transpose(-1, -2).to(dtype)
    if w.fmt == "fp8":
        q, scales = w.storage[0][experts].view(torch.float8_e4m3fn), w.storage[1][experts].view(torch.float32)
        return fp8_dequantize(q, scales, torch.float32, block=w.fp8_block).transpose(-1, -2).to(dtype)
    return w.storage[0][experts].to(dtype)


def expert_rows_reference(x, x_row_div, ids, weights: ExpertWeights, *, swiglu=None, row_weights=None,
                          dtype: torch.dtype = torch.float32) -> Tensor:  # fmt: skip
    """expert_rows computed in `dtype` with no intermediate rounding, one expert at a time."""
    ids = ids.reshape(-1)
    S, N = ids.numel(), weights.out_features
    rows_x = x.to(dtype)[torch.arange(S, device=x.device) // x_row_div]
    out = torch.zeros(S, N, dtype=dtype, device=x.device)
    for e in ids.unique().tolist():
        rows = (ids == e).nonzero().squeeze(1)
        xe = rows_x[rows]
        y = xe @ dequantize_reference(weights, e, dtype) + weights.bias[e].to(dtype)
        if weights.has_lora:
            y = y + weights.scaling * ((xe @ weights.lora_A[e].to(dtype)) @ weights.lora_B[e].to(dtype))
        out[rows] = y
    if swiglu is not None:
        alpha, limit = swiglu
        gate, up = out[:, ::2].clamp(max=limit), out[:, 1::2].clamp(-limit, limit)
        return (up + 1) * gate * torch.sigmoid(gate * alpha)
    if row_weights is not None:
        out = out * row_weights.reshape(-1, 1).to(dtype)
    return out


def moe_decode_reference(hidden, router_indices, routing_weights, gate_up: ExpertWeights, down: ExpertWeights, *,
                         alpha: float, limit: float, dtype: torch.dtype = torch.float32) -> Tensor:  # fmt: skip
    """moe_decode in `dtype` (default float32) torch; returns `dtype`."""
    T, top_k = router_indices.shape
    ids = router_indices.reshape(-1)
    gated = expert_rows_reference(hidden, top_k, ids, gate_up, swiglu=(alpha, limit), dtype=dtype)
    out = expert_rows_reference(gated, 1, ids, down, row_weights=routing_weights, dtype=dtype)
    return out.view(T, top_k, out.shape[-1]).sum(dim=1)
