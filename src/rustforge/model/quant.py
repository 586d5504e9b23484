"""Weight number formats: MXFP4 (gpt-oss checkpoints), block-scaled FP8 e4m3, and NVFP4.

Pure-torch reference implementations (CPU or GPU, no custom kernels) of quantise, dequantise and
fake-quantise with a straight-through estimator for quantisation-aware training. Own code rather
than a library because the fast libraries (triton_kernels, torchao, modelopt) are GPU-only or
swizzle the layout, while export and the CPU loader need the exact on-disk gpt-oss layout.

Layouts (all formats quantise along the LAST dim, K):
- MXFP4: blocks of 32 E2M1 values sharing an E8M0 power-of-two scale. `blocks` uint8 [..., K/32, 16]
  with two values per byte (low nibble = even element), `scales` uint8 [..., K/32] holding the biased
  exponent s (scale = 2**(s - 127)). This is the layout of `*_blocks` / `*_scales` in
  openai/gpt-oss-* and what transformers' `convert_moe_packed_tensors` dequantises.
  MXFP4 rounding rules (`scale_rounding=`, see MXFP4_RULES): "floor" is the OCP MX v1.0 rule (scale
  2**(floor(log2 amax) - 2), elements to nearest, ties to even); "gpt-oss" is OpenAI's quantiser,
  triton_kernels' `downcast_to_mxfp` with its default ROUND_UP (scale 2**ceil(log2(amax / 6)), elements
  to nearest with ties AWAY from zero, e.g. 0.25 -> 0.5), which is also what transformers uses to
  quantise gpt-oss on load; "ceil" is the gpt-oss scale with ties to even.
- FP8: float8_e4m3fn values with one float32 scale (amax / 448) per block of `block` values.
- NVFP4: blocks of 16 E2M1 values with an E4M3 block scale plus one float32 per-tensor scale
  (amax / (6 * 448)); `packed` uint8 [..., K/2] with the same nibble order as MXFP4.
"""

from __future__ import annotations

import functools

import torch

# Code -> value of E2M1 (sign bit 3, exponent bits 2-1, mantissa bit 0), as transformers' FP4_VALUES.
E2M1_VALUES = (0.0, 0.5, 1.0, 1.5, 2.0, 3.0, 4.0, 6.0, -0.0, -0.5, -1.0, -1.5, -2.0, -3.0, -4.0, -6.0)
E2M1_MAX = 6.0
FP8_E4M3_MAX = 448.0
MXFP4_BLOCK = 32
NVFP4_BLOCK = 16
E8M0_BIAS = 127
E8M0_MAX_BIASED = 254  # 255 encodes NaN

# Midpoints between consecutive E2M1 magnitudes (codes 0..7). With ties to even the even code wins:
# the lower code is odd at 0.75, 1.75 and 3.5, so those ties round up and the others round down.
# With ties away from zero every tie rounds up (to the larger magnitude).
_E2M1_MIDPOINTS = (0.25, 0.75, 1.25, 1.75, 2.5, 3.5, 5.0)
_TIES_ROUND_UP = {
    "even": (False, True, False, True, False, True, False),
    "away": (True,) * 7,
}

# name -> (scale rounding, element tie rule); see the module docstring.
MXFP4_RULES = {
    "floor": ("floor", "even"),
    "ceil": ("ceil", "even"),
    "gpt-oss": ("ceil", "away"),
}


def _e2m1_code_boundaries(device: torch.device, ties: str = "even") -> torch.Tensor:
    """float32 boundaries b with code(|x|) = #{b < |x|}: a tie that rounds up moves its boundary one
    float32 ulp down, so `x > b` means `x >= midpoint` there, exactly."""
    midpoints = torch.tensor(_E2M1_MIDPOINTS, dtype=torch.float32, device=device)
    lowered = torch.nextafter(midpoints, torch.zeros_like(midpoints))
    return torch.where(torch.tensor(_TIES_ROUND_UP[ties], device=device), lowered, midpoints)


def _mxfp4_rule(name: str) -> tuple[str, str]:
    if name not in MXFP4_RULES:
        raise ValueError(f"mxfp4: scale_rounding must be one of {sorted(MXFP4_RULES)}, got {name!r}")
    return MXFP4_RULES[name]


# ---------------------------------------------------------------------------------------------
# E2M1 element codec shared by MXFP4 and NVFP4
# ---------------------------------------------------------------------------------------------


def _e2m1_magnitude_code(scaled: torch.Tensor, ties: str = "even") -> torch.Tensor:
    """|scaled| rounded to the nearest E2M1 magnitude (ties to even or away, saturating at 6) as codes 0..7."""
    # bucketize(right=False) counts the boundaries strictly below each value.
    return torch.bucketize(scaled.abs(), _e2m1_code_boundaries(scaled.device, ties)).to(torch.uint8)


def _e2m1_encode(scaled: torch.Tensor, ties: str = "even") -> torch.Tensor:
    """float32 values already divided by their scale -> 4-bit E2M1 codes (uint8, 0..15).

    Negative values keep their sign bit even when they round to zero (code 8, -0.0), as OpenAI's
    triton_kernels quantiser does."""
    sign = torch.signbit(scaled).to(torch.uint8) << 3
    return sign | _e2m1_magnitude_code(scaled, ties)


def _divide(x: torch.Tensor, constant: float) -> torch.Tensor:
    """x / constant, correctly rounded on every device: CUDA turns division by a Python scalar into
    multiplication by its reciprocal, which can differ from CPU results in the last bit."""
    return x / torch.full((), constant, dtype=x.dtype, device=x.device)


def _e2m1_lut(device: torch.device) -> torch.Tensor:
    return torch.tensor(E2M1_VALUES, dtype=torch.float32, device=device)


def _pack_nibbles(codes: torch.Tensor) -> torch.Tensor:
    """[..., 2n] codes -> [..., n] bytes, even element in the low nibble."""
    pairs = codes.reshape(*codes.shape[:-1], codes.shape[-1] // 2, 2)
    return pairs[..., 0] | (pairs[..., 1] << 4)


def _unpack_nibbles(packed: torch.Tensor) -> torch.Tensor:
    """[..., n] bytes -> [..., 2n] codes (int64, ready for indexing)."""
    low = (packed & 0x0F).to(torch.int64)
    high = (packed >> 4).to(torch.int64)
    return torch.stack((low, high), dim=-1).reshape(*packed.shape[:-1], packed.shape[-1] * 2)


def _check_last_dim(w: torch.Tensor, multiple: int, fmt: str) -> None:
    if w.ndim == 0 or w.shape[-1] % multiple != 0:
        raise ValueError(f"{fmt}: last dim must be a multiple of {multiple}, got shape {tuple(w.shape)}")
    if not w.is_floating_point():
        raise ValueError(f"{fmt}: expected a floating-point tensor, got {w.dtype}")


def _check_finite(w: torch.Tensor, fmt: str) -> None:
    if not bool(torch.isfinite(w).all()):
        raise ValueError(f"{fmt}: input has NaN or Inf values; they have no encoding")


class _StraightThrough(torch.autograd.Function):
    """Forward: the quantise-dequantise result; backward: the upstream gradient unchanged."""

    @staticmethod
    def forward(ctx, w: torch.Tensor, fake_quantized: torch.Tensor) -> torch.Tensor:
        return fake_quantized

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        return grad, None


def _straight_through(w: torch.Tensor, fake_quantized: torch.Tensor) -> torch.Tensor:
    return _StraightThrough.apply(w, fake_quantized.to(w.dtype))


# ---------------------------------------------------------------------------------------------
# MXFP4
# ---------------------------------------------------------------------------------------------


def _mxfp4_scale_exponents(blocked: torch.Tensor, scale_rounding: str) -> torch.Tensor:
    """Biased E8M0 exponents (int32, 0..254) for float32 blocks [..., G, 32]; scale_rounding "floor" | "ceil"."""
    amax = blocked.abs().amax(dim=-1)
    if scale_rounding == "floor":
        # OCP MX spec: 2**(floor(log2(amax)) - emax(E2M1)=2); the float32 exponent field is exactly
        # floor(log2(amax)) + 127 for normal amax (0 for zero/subnormal, which clamps to 0 below).
        biased = ((amax.view(torch.int32) >> 23) & 0xFF) - 2
    elif scale_rounding == "ceil":
        # triton_kernels' ROUND_UP: 2**ceil(log2(amax / 6)), never clips at the cost of range.
        dequant_scale = _divide(amax, E2M1_MAX).view(torch.int32)
        biased = ((dequant_scale + 0x007FFFFF) & 0x7F800000) >> 23
    else:
        raise ValueError(f"mxfp4: scale_rounding must be 'floor' or 'ceil', got {scale_rounding!r}")
    return biased.clamp(0, E8M0_MAX_BIASED)


def _mxfp4_codes(w: torch.Tensor, rule: str) -> tuple[torch.Tensor, torch.Tensor]:
    """(E2M1 codes [..., G, 32] uint8, biased exponents [..., G] int32) under an MXFP4_RULES rule."""
    scale_rounding, ties = _mxfp4_rule(rule)
    blocked = w.float().contiguous().reshape(*w.shape[:-1], w.shape[-1] // MXFP4_BLOCK, MXFP4_BLOCK)
    exponents = _mxfp4_scale_exponents(blocked, scale_rounding)
    # Dividing by a power of two is exact; ldexp keeps 2**-127 representable (subnormal) in float32.
    inverse_scale = torch.ldexp(torch.ones_like(exponents, dtype=torch.float32), E8M0_BIAS - exponents)
    codes = _e2m1_encode(blocked * inverse_scale.unsqueeze(-1), ties)
    return codes, exponents


def mxfp4_quantize(w: torch.Tensor, *, scale_rounding: str = "floor") -> tuple[torch.Tensor, torch.Tensor]:
    """w [..., K] -> (blocks uint8 [..., K/32, 16], scales uint8 [..., K/32]).

    scale_rounding names the rounding rule (MXFP4_RULES): "floor" is the OCP MX rule (largest magnitude
    lands in [4, 8) and saturates to 6), "ceil" picks the smallest power of two with amax / scale <= 6,
    "gpt-oss" is that scale with ties away from zero, bit for bit OpenAI's triton_kernels quantiser."""
    _check_last_dim(w, MXFP4_BLOCK, "mxfp4_quantize")
    _check_finite(w, "mxfp4_quantize")
    codes, exponents = _mxfp4_codes(w, scale_rounding)
    return _pack_nibbles(codes), exponents.to(torch.uint8)


def mxfp4_dequantize(blocks: torch.Tensor, scales: torch.Tensor, dtype: torch.dtype = torch.bfloat16) -> torch.Tensor:
    """(blocks [..., G, 16], scales [..., G]) -> [..., G * 32] in dtype.

    Computes value * 2**(s - 127) in float32 and rounds once to dtype, which is what
    transformers' convert_moe_packed_tensors does (ldexp promotes to float32), so results agree
    bit for bit (that function additionally transposes the last two logical dims)."""
    if blocks.dtype != torch.uint8 or scales.dtype != torch.uint8:
        raise ValueError(f"mxfp4_dequantize: blocks and scales must be uint8, got {blocks.dtype} and {scales.dtype}")
    if blocks.ndim < 2 or blocks.shape[-1] != MXFP4_BLOCK // 2 or blocks.shape[:-1] != scales.shape:
        raise ValueError(f"mxfp4_dequantize: blocks {tuple(blocks.shape)} must be scales {tuple(scales.shape)} + (16,)")
    if dtype in (torch.bfloat16, torch.float32):
        return _mxfp4_dequantize_by_byte(blocks, scales, dtype)
    values = _e2m1_lut(blocks.device)[_unpack_nibbles(blocks)]
    out = torch.ldexp(values, (scales.to(torch.int32) - E8M0_BIAS).unsqueeze(-1))
    return out.reshape(*scales.shape[:-1], scales.shape[-1] * MXFP4_BLOCK).to(dtype)


def _mxfp4_dequantize_by_byte(blocks: torch.Tensor, scales: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """The fast path (3x on the H100): one lookup per byte into a 256x2 table, then one multiply by the
    block scale in `dtype`. bf16 and fp32 share fp32's exponent range, and an E2M1 value (2 significant
    bits) times a power of two is exact there, so this equals the fp32 ldexp path bit for bit."""
    pairs = _e2m1_byte_lut(blocks.device, dtype)[blocks.to(torch.int32)]  # [..., G, 16, 2]
    exponent = scales.to(torch.int32) - E8M0_BIAS
    # 2**128 (scale byte 255) overflows: apply it as 2**127 * 2 so that 0 * scale stays 0, as in ldexp
    scale = torch.ldexp(torch.ones_like(exponent, dtype=torch.float32), exponent.clamp(max=127)).to(dtype)
    out = pairs.reshape(*scales.shape, MXFP4_BLOCK) * scale.unsqueeze(-1)
    out = out * (exponent == 128).to(dtype).add(1).unsqueeze(-1)
    return out.reshape(*scales.shape[:-1], scales.shape[-1] * MXFP4_BLOCK)


@functools.cache
def _e2m1_byte_lut(device: torch.device, dtype: torch.dtype) -> torch.Tensor:
    """[256, 2]: the two E2M1 values of every byte, low nibble first."""
    codes = torch.arange(256, dtype=torch.uint8)
    return _e2m1_lut(torch.device("cpu"))[_unpack_nibbles(codes[:, None])].reshape(256, 2).to(device, dtype)


def mxfp4_fake_quantize_values(w: torch.Tensor, *, scale_rounding: str = "floor") -> torch.Tensor:
    """dequant(quant(w)) in w's dtype without packing or autograd (no finiteness check)."""
    _check_last_dim(w, MXFP4_BLOCK, "mxfp4_fake_quant")
    codes, exponents = _mxfp4_codes(w, scale_rounding)
    values = torch.ldexp(_e2m1_lut(w.device)[codes.long()], (exponents - E8M0_BIAS).unsqueeze(-1))
    return values.reshape(w.shape).to(w.dtype)


def mxfp4_fake_quant(w: torch.Tensor, *, scale_rounding: str = "floor") -> torch.Tensor:
    """dequant(quant(w)) in the forward pass; the gradient passes through unchanged (STE)."""
    with torch.no_grad():
        fake = mxfp4_fake_quantize_values(w.detach(), scale_rounding=scale_rounding)
    return _straight_through(w, fake)


# ---------------------------------------------------------------------------------------------
# FP8 e4m3 with block scales
# ---------------------------------------------------------------------------------------------


def _pad_last_dim(w: torch.Tensor, block: int) -> torch.Tensor:
    pad = (-w.shape[-1]) % block
    return torch.nn.functional.pad(w, (0, pad)) if pad else w


def _fp8_codes(w: torch.Tensor, block: int) -> tuple[torch.Tensor, torch.Tensor]:
    if block <= 0:
        raise ValueError(f"fp8: block must be positive, got {block}")
    if w.ndim == 0 or not w.is_floating_point():
        raise ValueError(f"fp8: expected a floating-point tensor with at least one dim, got {w.dtype} {tuple(w.shape)}")
    padded = _pad_last_dim(w.float().contiguous(), block)
    blocked = padded.reshape(*padded.shape[:-1], -1, block)
    amax = blocked.abs().amax(dim=-1)
    # An all-zero block has no natural scale; 1.0 keeps 0 / scale finite and dequantises to 0.
    scales = torch.where(amax > 0, _divide(amax, FP8_E4M3_MAX), torch.ones_like(amax))
    scaled = (blocked / scales.unsqueeze(-1)).clamp(-FP8_E4M3_MAX, FP8_E4M3_MAX)
    q = scaled.to(torch.float8_e4m3fn).reshape(padded.shape)[..., : w.shape[-1]]
    return q, scales


def fp8_quantize(w: torch.Tensor, block: int = 128) -> tuple[torch.Tensor, torch.Tensor]:
    """w [..., K] -> (q float8_e4m3fn [..., K], scales float32 [..., ceil(K/block)]); w ~= q * scale."""
    _check_finite(w, "fp8_quantize")
    return _fp8_codes(w, block)


def fp8_dequantize(
    q: torch.Tensor, scales: torch.Tensor, dtype: torch.dtype = torch.bfloat16, *, block: int = 128
) -> torch.Tensor:
    """(q [..., K], scales [..., ceil(K/block)]) -> q * scale in dtype (computed in float32)."""
    if q.dtype != torch.float8_e4m3fn or scales.dtype != torch.float32:
        raise ValueError(f"fp8_dequantize: need float8_e4m3fn values and float32 scales, got {q.dtype}, {scales.dtype}")
    k = q.shape[-1]
    if q.shape[:-1] != scales.shape[:-1] or scales.shape[-1] != -(-k // block):
        raise ValueError(
            f"fp8_dequantize: scales {tuple(scales.shape)} do not fit values {tuple(q.shape)} with block={block}"
        )
    expanded = scales.repeat_interleave(block, dim=-1)[..., :k]
    return (q.float() * expanded).to(dtype)


def fp8_fake_quant(w: torch.Tensor, block: int = 128) -> torch.Tensor:
    """dequant(quant(w)) in the forward pass with a straight-through gradient."""
    with torch.no_grad():
        q, scales = _fp8_codes(w.detach(), block)
        fake = fp8_dequantize(q, scales, dtype=w.dtype, block=block)
    return _straight_through(w, fake)


# ---------------------------------------------------------------------------------------------
# NVFP4
# ---------------------------------------------------------------------------------------------


def _nvfp4_codes(w: torch.Tensor, per_slice: bool = False) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(E2M1 codes [..., K/16, 16], block scales e4m3 [..., K/16], global scale float32 []); per_slice: one
    global scale per w[i] instead, shaped [len(w), 1, ...] to broadcast against the block scales."""
    _check_last_dim(w, NVFP4_BLOCK, "nvfp4")
    blocked = w.float().contiguous().reshape(*w.shape[:-1], w.shape[-1] // NVFP4_BLOCK, NVFP4_BLOCK)
    if per_slice:
        amax = blocked.abs().flatten(1).amax(dim=1).view(-1, *[1] * (blocked.dim() - 2))
    else:
        amax = blocked.abs().amax()
    global_scale = torch.where(amax > 0, _divide(amax, E2M1_MAX * FP8_E4M3_MAX), torch.ones_like(amax))
    block_amax = blocked.abs().amax(dim=-1)
    block_scales = (_divide(block_amax, E2M1_MAX) / global_scale).clamp(max=FP8_E4M3_MAX).to(torch.float8_e4m3fn)
    effective = block_scales.float() * global_scale
    # A block whose scale underflows to 0 in e4m3 can only encode zeros.
    safe = torch.where(effective > 0, effective, torch.ones_like(effective))
    scaled = torch.where(effective.unsqueeze(-1) > 0, blocked / safe.unsqueeze(-1), torch.zeros_like(blocked))
    return _e2m1_encode(scaled), block_scales, global_scale.to(torch.float32)


def nvfp4_quantize(w: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """w [..., K] -> (packed uint8 [..., K/2], block_scales float8_e4m3fn [..., K/16], global_scale float32 [])."""
    _check_finite(w, "nvfp4_quantize")
    codes, block_scales, global_scale = _nvfp4_codes(w)
    return _pack_nibbles(codes.reshape(w.shape)), block_scales, global_scale


def nvfp4_dequantize(
    packed: torch.Tensor, block_scales: torch.Tensor, global_scale: torch.Tensor, dtype: torch.dtype = torch.bfloat16
) -> torch.Tensor:
    """Inverse of nvfp4_quantize: value * block_scale * global_scale, computed in float32."""
    if packed.dtype != torch.uint8 or block_scales.dtype != torch.float8_e4m3fn:
        raise ValueError(
            f"nvfp4_dequantize: need uint8 packed and e4m3 block scales, got {packed.dtype}, {block_scales.dtype}"
        )
    k = packed.shape[-1] * 2
    if packed.shape[:-1] != block_scales.shape[:-1] or block_scales.shape[-1] * NVFP4_BLOCK != k:
        raise ValueError(
            f"nvfp4_dequantize: block scales {tuple(block_scales.shape)} do not fit packed {tuple(packed.shape)}"
        )
    values = _e2m1_lut(packed.device)[_unpack_nibbles(packed)]
    blocked = values.reshape(*block_scales.shape, NVFP4_BLOCK)
    scale = block_scales.float() * global_scale.float()
    return (blocked * scale.unsqueeze(-1)).reshape(values.shape).to(dtype)


def nvfp4_fake_quant(w: torch.Tensor, per_slice: bool = False) -> torch.Tensor:
    """dequant(quant(w)) in the forward pass with a straight-through gradient; per_slice: each w[i] is its
    own tensor (its own global scale), as export/nvfp4.py stores a stack of experts."""
    with torch.no_grad():
        codes, block_scales, global_scale = _nvfp4_codes(w.detach(), per_slice)
        scale = block_scales.float() * global_scale
        fake = (_e2m1_lut(w.device)[codes.long()] * scale.unsqueeze(-1)).reshape(w.shape)
    return _straight_through(w, fake)


# ---------------------------------------------------------------------------------------------
# One entry point for QAT
# ---------------------------------------------------------------------------------------------

FAKE_QUANT_FORMATS = ("mxfp4", "nvfp4", "fp8")


def fake_quant(
    w: torch.Tensor, fmt: str, *, dim: int = -1, mxfp4_rule: str = "floor", fp8_block: int = 128, stacked: bool = False
):
    """dequant(quant(w)) with blocks along `dim` (the input dim of a weight) and a straight-through
    gradient: what a quantisation-aware forward sees. NVFP4's per-tensor scale is taken over all of `w`, or
    with `stacked` over each w[i] (a stack of expert weights [E, in, out], quantised expert by expert as
    the export writes them; the block-scaled formats are the same either way)."""
    if fmt not in FAKE_QUANT_FORMATS:
        raise ValueError(f"fake_quant: unknown format {fmt!r}; known: {list(FAKE_QUANT_FORMATS)}")
    if stacked and dim % w.dim() == 0:
        raise ValueError("fake_quant: with stacked=True dim 0 indexes the stack; the blocks run along another dim")
    moved = w.movedim(dim, -1)
    if fmt == "mxfp4":
        out = mxfp4_fake_quant(moved, scale_rounding=mxfp4_rule)
    elif fmt == "nvfp4":
        out = nvfp4_fake_quant(moved, per_slice=stacked)
    else:
        out = fp8_fake_quant(moved, block=fp8_block)
    return out.movedim(-1, dim)


# ---------------------------------------------------------------------------------------------
# Storage cost
# ---------------------------------------------------------------------------------------------


def bits_per_weight(fmt: str, *, fp8_block: int = 128) -> float:
    """Average stored bits per weight, scales included (NVFP4's one per-tensor float is ignored)."""
    costs = {
        "bf16": 16.0,
        "fp8": 8.0 + 32.0 / fp8_block,
        "mxfp4": 4.0 + 8.0 / MXFP4_BLOCK,
        "nvfp4": 4.0 + 8.0 / NVFP4_BLOCK,
    }
    if fmt not in costs:
        raise ValueError(f"bits_per_weight: unknown format {fmt!r}; known: {sorted(costs)}")
    return costs[fmt]
