"""One-pass GPU dequantisation of the frozen expert weights (MXFP4, block-scaled FP8), in Triton.

The reference implementations are `mxfp4_dequantize` and `fp8_dequantize` in model/quant.py: torch ops
that take several passes over the weight (byte lookup, scale multiply, casts) and measured ~12 ms per
20B MoE layer on the H100, three times per layer and training step (forward, checkpoint recompute,
backward). These kernels read the packed bytes and scales once and write the dense weight once, which
is the memory-traffic floor of dequantising into a buffer. Own code because torch has no MXFP4 type and
no block-scaled FP8 dequantiser; results equal the references bit for bit (tests/test_triton_dequant.py).

GPU-only: `triton_dequant_available(t)` says whether a tensor can take this path; this module imports on
machines without Triton or a GPU.
"""

from __future__ import annotations

import os

import torch

try:
    import triton
    import triton.language as tl
except ImportError:  # CPU-only installs: the torch reference path is used
    triton = None


INTERPRETING = os.environ.get("TRITON_INTERPRET") == "1"  # Triton's CPU interpreter (the kernel tests); read once


def triton_dequant_available(t: torch.Tensor) -> bool:
    return triton is not None and t.is_cuda


def triton_kernels_available(t: torch.Tensor) -> bool:
    """Whether `t` can go through the training kernels (SwiGLU, routing sums, RMSNorm, loss softmax): natively
    on a GPU, or on any device under Triton's interpreter (how the CPU tests run them)."""
    return triton is not None and (t.is_cuda or INTERPRETING)


if triton is not None:

    @triton.jit
    def _e2m1_value(code):
        """E2M1 code (int32, 0..15) -> float32: sign bit 3, exponent bits 2..1 (bias 1), mantissa bit 0."""
        magnitude = code & 7
        exponent = magnitude >> 1
        mantissa = (magnitude & 1).to(tl.float32)
        power = (1 << tl.maximum(exponent - 1, 0)).to(tl.float32)
        value = tl.where(exponent == 0, 0.5 * mantissa, power * (1.0 + 0.5 * mantissa))
        # multiply, not negate: Triton compiles -x as 0 - x, which turns the code for -0.0 into +0.0
        return value * tl.where((code & 8) != 0, -1.0, 1.0)

    # block size and warps measured per weight size on first use: the fixed 2048-byte blocks ran at ~70% of
    # the copy bandwidth on the H100 (0.47 ms per 20B-shape projection, session 4 profile)
    _BLOCK_CONFIGS = [triton.Config({"BYTES": b}, num_warps=w) for b in (1024, 2048, 4096, 8192) for w in (4, 8)]

    @triton.autotune(configs=_BLOCK_CONFIGS, key=["n_bytes"])
    @triton.jit
    def _mxfp4_dequant_kernel(blocks_ptr, scales_ptr, out_ptr, n_bytes, BYTES: tl.constexpr):
        pid = tl.program_id(0).to(tl.int64)
        offs = pid * BYTES + tl.arange(0, BYTES)
        mask = offs < n_bytes
        byte = tl.load(blocks_ptr + offs, mask=mask, other=0).to(tl.int32)
        biased = tl.load(scales_ptr + offs // 16, mask=mask, other=127).to(tl.int32)  # 16 bytes per block
        # 2**(s-127) built from float32 bits: s=0 is the subnormal 2**-127, s=255 is 2**127 * 2 (as the
        # reference does it, so that 0 * scale stays 0)
        bits = tl.where(biased == 0, 0x00400000, tl.minimum(biased, 254) << 23)
        scale = bits.to(tl.float32, bitcast=True)
        extra = tl.where(biased == 255, 2.0, 1.0)
        low = _e2m1_value(byte & 15) * scale * extra
        high = _e2m1_value(byte >> 4) * scale * extra
        values = tl.interleave(low, high).to(out_ptr.dtype.element_ty)  # low nibble first
        out_offs = pid * (2 * BYTES) + tl.arange(0, 2 * BYTES)
        tl.store(out_ptr + out_offs, values, mask=out_offs < 2 * n_bytes)

    @triton.autotune(configs=[triton.Config({"VALUES": v}, num_warps=w) for v in (2048, 4096, 8192) for w in (4, 8)],
                     key=["n_values"])
    @triton.jit
    def _fp8_dequant_kernel(q_ptr, scales_ptr, out_ptr, n_values, row_len, scales_per_row, QBLOCK: tl.constexpr,
                            VALUES: tl.constexpr):
        pid = tl.program_id(0).to(tl.int64)
        offs = pid * VALUES + tl.arange(0, VALUES)
        mask = offs < n_values
        row = offs // row_len
        col = offs - row * row_len
        q = tl.load(q_ptr + offs, mask=mask, other=0).to(tl.float8e4nv, bitcast=True).to(tl.float32)
        scale = tl.load(scales_ptr + row * scales_per_row + col // QBLOCK, mask=mask, other=1.0)
        tl.store(out_ptr + offs, (q * scale).to(out_ptr.dtype.element_ty), mask=mask)


def mxfp4_dequantize_triton(blocks: torch.Tensor, scales: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """(blocks uint8 [..., G, 16], scales uint8 [..., G]) -> [..., G * 32] in dtype; = quant.mxfp4_dequantize."""
    if blocks.dtype != torch.uint8 or scales.dtype != torch.uint8 or blocks.shape[:-1] != scales.shape:
        raise ValueError(f"mxfp4_dequantize_triton: need uint8 blocks [..., G, 16] and scales [..., G], got "
                         f"{blocks.dtype} {tuple(blocks.shape)} and {scales.dtype} {tuple(scales.shape)}")
    blocks, scales = blocks.contiguous(), scales.contiguous()
    out = torch.empty(*scales.shape[:-1], scales.shape[-1] * 32, dtype=dtype, device=blocks.device)
    n_bytes = blocks.numel()
    if n_bytes:
        _mxfp4_dequant_kernel[lambda meta: (triton.cdiv(n_bytes, meta["BYTES"]),)](blocks, scales, out, n_bytes)
    return out


def fp8_dequantize_triton(q: torch.Tensor, scales: torch.Tensor, dtype: torch.dtype, block: int) -> torch.Tensor:
    """(q float8_e4m3fn or its uint8 bits [..., K], scales float32 [..., ceil(K/block)]) -> [..., K] in
    dtype; = quant.fp8_dequantize."""
    k = q.shape[-1]
    if scales.dtype != torch.float32 or q.shape[:-1] != scales.shape[:-1] or scales.shape[-1] != -(-k // block):
        raise ValueError(f"fp8_dequantize_triton: scales {scales.dtype} {tuple(scales.shape)} do not fit values "
                         f"{tuple(q.shape)} with block={block}")
    q_bits = q.contiguous().view(torch.uint8)
    scales = scales.contiguous()
    out = torch.empty(q.shape, dtype=dtype, device=q.device)
    n = q.numel()
    if n:
        _fp8_dequant_kernel[lambda meta: (triton.cdiv(n, meta["VALUES"]),)](q_bits, scales, out, n, k,
                                                                            scales.shape[-1], QBLOCK=block)
    return out
