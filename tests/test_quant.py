"""MXFP4 / FP8 / NVFP4 reference codecs: hand-computed encodings, round-trip bounds, parity with
transformers' MXFP4 dequantiser, and straight-through gradients of the fake-quantisers."""

import pytest
import torch

from rustforge.model import quant
from rustforge.model.quant import (
    bits_per_weight,
    fp8_dequantize,
    fp8_fake_quant,
    fp8_quantize,
    mxfp4_dequantize,
    mxfp4_fake_quant,
    mxfp4_quantize,
    nvfp4_dequantize,
    nvfp4_fake_quant,
    nvfp4_quantize,
)


def _block(*head: float, size: int = 32) -> torch.Tensor:
    return torch.tensor(list(head) + [0.0] * (size - len(head)), dtype=torch.float32)


def _nibbles(blocks: torch.Tensor) -> list[int]:
    flat = blocks.reshape(-1).tolist()
    return [code for byte in flat for code in (byte & 0xF, byte >> 4)]


# ------------------------------------------------------------------------------------- MXFP4


def test_mxfp4_known_encoding_max_six():
    # amax 6: floor(log2 6) - 2 = 0 -> biased 127; 6, 3, -1.5, 0.5 are codes 7, 5, 8|3, 1.
    blocks, scales = mxfp4_quantize(_block(6.0, 3.0, -1.5, 0.5))
    assert scales.tolist() == [127]
    assert blocks.shape == (1, 16) and blocks.dtype == torch.uint8
    assert blocks[0, :2].tolist() == [7 | (5 << 4), 11 | (1 << 4)]
    assert blocks[0, 2:].tolist() == [0] * 14


def test_mxfp4_known_encoding_scaled_block():
    # amax 1.0 -> exponent 0 - 2 -> biased 125 (scale 0.25); scaled 4, 1, 3, -1.2 -> codes 6, 2, 5, 8|2.
    blocks, scales = mxfp4_quantize(_block(1.0, 0.25, 0.75, -0.3))
    assert scales.tolist() == [125]
    assert _nibbles(blocks)[:4] == [6, 2, 5, 10]
    assert mxfp4_dequantize(blocks, scales, torch.float32)[:4].tolist() == [1.0, 0.25, 0.75, -0.25]


def test_mxfp4_rounds_ties_to_even_and_saturates():
    # Scale 1 (amax 7 -> floor(log2 7) - 2 = 0). Midpoints go to the code with an even mantissa bit.
    x = _block(7.0, 0.25, 0.75, 1.25, 1.75, 2.5, 3.5, 5.0, -5.0, -0.1, 0.2600, 5.01)
    blocks, scales = mxfp4_quantize(x)
    assert scales.tolist() == [127]
    decoded = mxfp4_dequantize(blocks, scales, torch.float32)[:12].tolist()
    assert decoded == [6.0, 0.0, 1.0, 1.0, 2.0, 2.0, 4.0, 4.0, -4.0, -0.0, 0.5, 6.0]
    assert _nibbles(blocks)[9] == 8  # -0.1 keeps its sign bit: -0.0


@pytest.mark.parametrize("ties", ["even", "away"])
def test_e2m1_rounding_matches_brute_force_nearest(ties):
    # Dense grid plus every midpoint and its float32 neighbours, against argmin distance with ties
    # broken towards the even code, or the larger magnitude (the E2M1 magnitudes are codes 0..7 in order).
    magnitudes = torch.tensor(quant.E2M1_VALUES[:8])
    midpoints = (magnitudes[1:] + magnitudes[:-1]) / 2
    neighbours = torch.cat(
        [torch.nextafter(midpoints, torch.tensor(0.0)), midpoints, torch.nextafter(midpoints, torch.tensor(9.0))]
    )
    x = torch.cat([torch.linspace(0, 7.5, 30001), neighbours])
    x = torch.cat([x, -x])
    distance = (x.abs().unsqueeze(-1) - magnitudes).abs()
    nearest = distance.min(-1, keepdim=True).values
    if ties == "even":
        candidates = (distance == nearest) & (torch.arange(8) % 2 == 0)  # an even code if it is nearest
        expected = torch.where(candidates.any(-1), candidates.int().argmax(-1), distance.argmin(-1))
    else:
        expected = 7 - (distance == nearest).flip(-1).int().argmax(-1)  # the largest nearest code
    expected = torch.where(x.abs() > 6, 7, expected) | (torch.signbit(x).long() << 3)
    assert torch.equal(quant._e2m1_encode(x, ties).long(), expected)


def test_mxfp4_gpt_oss_rule_on_triton_kernels_published_cases():
    # triton_kernels' test_mxfp4_rounding_cases: amax 6 -> scale 1; 0.25 rounds AWAY to 0.5 (OCP: to 0).
    x = _block(6.0, 0.0, 0.24, 0.25, 0.75, 0.99, 1.2, 1.3)
    blocks, scales = mxfp4_quantize(x, scale_rounding="gpt-oss")
    assert scales.tolist() == [127]
    assert mxfp4_dequantize(blocks, scales, torch.float32)[:8].tolist() == [6, 0, 0, 0.5, 1.0, 1.0, 1.0, 1.5]
    blocks, _ = mxfp4_quantize(x, scale_rounding="floor")
    assert mxfp4_dequantize(blocks, scales, torch.float32)[3].item() == 0.0


def test_mxfp4_gpt_oss_rule_hand_computed_scaled_block():
    # amax 7.5: ceil(log2(7.5 / 6)) = 1 -> biased 128, scale 2. Scaled: 3.75 -> 4 (code 6), 2.5 -> 3 (tie,
    # away; code 5), 0.25 -> 0.5 (tie, away; code 1), -1.25 -> -1.5 (tie, away; code 8|3), 1.75 -> 2 (code 4).
    x = _block(7.5, 5.0, 0.5, -2.5, 3.5)
    blocks, scales = mxfp4_quantize(x, scale_rounding="gpt-oss")
    assert scales.tolist() == [128]
    assert _nibbles(blocks)[:5] == [6, 5, 1, 11, 4]
    assert blocks[0, :3].tolist() == [6 | (5 << 4), 1 | (11 << 4), 4]
    assert mxfp4_dequantize(blocks, scales, torch.float32)[:5].tolist() == [8.0, 6.0, 1.0, -3.0, 4.0]
    # the same block with ties to even: 2.5 -> 2, 0.25 -> 0, -1.25 -> -1
    blocks, scales = mxfp4_quantize(x, scale_rounding="ceil")
    assert _nibbles(blocks)[:5] == [6, 4, 0, 10, 4]


def test_mxfp4_fake_quant_matches_quantize_for_every_rule():
    torch.manual_seed(9)
    w = (torch.randn(4, 96) * 3).to(torch.bfloat16).float()  # bf16 inputs: exact ties occur
    for rule in quant.MXFP4_RULES:
        expected = mxfp4_dequantize(*mxfp4_quantize(w, scale_rounding=rule), dtype=torch.float32)
        assert torch.equal(quant.mxfp4_fake_quantize_values(w, scale_rounding=rule), expected), rule
    away = quant.mxfp4_fake_quantize_values(w, scale_rounding="gpt-oss")
    even = quant.mxfp4_fake_quantize_values(w, scale_rounding="ceil")
    assert not torch.equal(away, even)  # bf16 weights hit exact midpoints, so the tie rule matters


def test_mxfp4_ceil_scale_rounding_never_clips():
    x = _block(7.5, 0.5)
    _, floor_scales = mxfp4_quantize(x)
    blocks, ceil_scales = mxfp4_quantize(x, scale_rounding="ceil")
    assert floor_scales.tolist() == [127]  # 7.5 saturates to 6
    assert ceil_scales.tolist() == [128]  # ceil(log2(7.5 / 6)) = 1
    assert mxfp4_dequantize(blocks, ceil_scales, torch.float32)[:2].tolist() == [8.0, 0.0]  # 3.75 -> 4, 0.25 ties to 0


def test_mxfp4_zero_and_tiny_blocks():
    blocks, scales = mxfp4_quantize(torch.zeros(2, 64))
    assert scales.tolist() == [[0, 0], [0, 0]] and int(blocks.max()) == 0
    assert torch.equal(mxfp4_dequantize(blocks, scales, torch.float32), torch.zeros(2, 64))
    tiny = _block(2.0**-130)  # below the smallest E8M0 scale: clamps to biased 0 and rounds to 0
    blocks, scales = mxfp4_quantize(tiny)
    assert scales.tolist() == [0] and mxfp4_dequantize(blocks, scales, torch.float32).abs().max() == 0


def test_mxfp4_known_dequantization():
    blocks = torch.zeros(1, 16, dtype=torch.uint8)
    blocks[0, 0] = 0x7F  # low nibble 15 (-6) is element 0, high nibble 7 (+6) is element 1
    blocks[0, 1] = 0x92  # element 2: code 2 (+1), element 3: code 9 (-0.5)
    out = mxfp4_dequantize(blocks, torch.tensor([128], dtype=torch.uint8), torch.float32)
    assert out[:4].tolist() == [-12.0, 12.0, 2.0, -1.0]


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32, torch.float16])
def test_mxfp4_dequantize_matches_transformers_bit_for_bit(dtype):
    mxfp4 = pytest.importorskip("transformers.integrations.mxfp4")
    reference = getattr(mxfp4, "convert_moe_packed_tensors", None) or mxfp4._convert_moe_packed_tensors
    assert list(quant.E2M1_VALUES) == list(mxfp4.FP4_VALUES)
    # Every byte under every biased exponent 0..255, laid out [experts=2, rows, groups, 16].
    every_byte = torch.arange(256, dtype=torch.uint8).reshape(16, 16)
    blocks = every_byte.repeat(256, 1, 1).reshape(2, 128, 16, 16)
    scales = torch.arange(256, dtype=torch.int32).repeat_interleave(16).to(torch.uint8).reshape(2, 128, 16)
    ours = mxfp4_dequantize(blocks, scales, dtype)
    theirs = reference(blocks.clone(), scales.clone(), dtype=dtype).transpose(1, 2)  # they return [E, in, out]
    assert ours.dtype == theirs.dtype == dtype
    assert torch.equal(
        ours.view(torch.int16 if dtype != torch.float32 else torch.int32),
        theirs.contiguous().view(torch.int16 if dtype != torch.float32 else torch.int32),
    )


@pytest.mark.parametrize("scale_rounding, max_err_in_scales", [("floor", 2.0), ("ceil", 1.0)])
def test_mxfp4_random_round_trip_error_bound(scale_rounding, max_err_in_scales):
    torch.manual_seed(0)
    w = torch.randn(4, 8, 256) * torch.logspace(-3, 2, 8).reshape(1, 8, 1)
    blocks, scales = mxfp4_quantize(w, scale_rounding=scale_rounding)
    assert blocks.shape == (4, 8, 8, 16) and scales.shape == (4, 8, 8)
    err = (mxfp4_dequantize(blocks, scales, torch.float32) - w).abs().reshape(4, 8, 8, 32)
    scale = torch.ldexp(torch.ones(scales.shape), scales.int() - 127)
    # Half the widest step (4 -> 6) is one scale; OCP floor scales may also clip (4, 8) down to 6.
    assert (err <= max_err_in_scales * scale.unsqueeze(-1)).all()
    assert (err.square().mean() / w.square().mean()) < 0.03


def test_mxfp4_quantize_is_idempotent_and_accepts_bf16():
    torch.manual_seed(1)
    w = torch.randn(16, 128, dtype=torch.bfloat16)
    blocks, scales = mxfp4_quantize(w)
    again = mxfp4_quantize(mxfp4_dequantize(blocks, scales))
    assert torch.equal(again[0], blocks) and torch.equal(again[1], scales)


def test_mxfp4_rejects_bad_input():
    with pytest.raises(ValueError, match="multiple of 32"):
        mxfp4_quantize(torch.zeros(3, 48))
    with pytest.raises(ValueError, match="NaN"):
        mxfp4_quantize(torch.full((32,), float("nan")))
    with pytest.raises(ValueError, match="scale_rounding must be one of"):
        mxfp4_quantize(torch.zeros(32), scale_rounding="nearest")
    with pytest.raises(ValueError, match="must be scales"):
        mxfp4_dequantize(torch.zeros(2, 16, dtype=torch.uint8), torch.zeros(3, dtype=torch.uint8))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_mxfp4_fake_quant_forward_and_straight_through_gradient(dtype):
    torch.manual_seed(2)
    w = torch.randn(6, 64, dtype=dtype, requires_grad=True)
    out = mxfp4_fake_quant(w)
    assert out.dtype == dtype
    assert torch.equal(out.detach(), mxfp4_dequantize(*mxfp4_quantize(w.detach()), dtype=dtype))
    upstream = torch.randn(6, 64, dtype=dtype)
    (grad,) = torch.autograd.grad(out, w, upstream)
    assert torch.equal(grad, upstream)


# --------------------------------------------------------------------------------------- FP8


def test_fp8_known_encoding():
    w = torch.tensor([[448.0, 224.0, -1.0, 0.0, 1.0, 0.5, 0.0, 0.0]])
    q, scales = fp8_quantize(w, block=4)
    assert q.dtype == torch.float8_e4m3fn and scales.dtype == torch.float32
    assert scales.tolist() == [[1.0, pytest.approx(1 / 448)]]
    assert q.float()[0, :4].tolist() == [448.0, 224.0, -1.0, 0.0]
    assert q.float()[0, 4:].tolist() == [448.0, 224.0, 0.0, 0.0]
    assert fp8_dequantize(q, scales, torch.float32, block=4)[0, :4].tolist() == [448.0, 224.0, -1.0, 0.0]


def test_fp8_partial_last_block_and_zero_block():
    torch.manual_seed(3)
    w = torch.randn(3, 130)
    w[1] = 0
    q, scales = fp8_quantize(w)
    assert q.shape == (3, 130) and scales.shape == (3, 2)
    assert scales[1].tolist() == [1.0, 1.0]
    # The 2-element tail block gets its own amax / 448 scale.
    assert scales[0, 1].item() == pytest.approx(w[0, 128:].abs().max().item() / 448)
    assert torch.equal(fp8_dequantize(q, scales, torch.float32)[1], torch.zeros(130))


def test_fp8_random_round_trip_error_bound():
    torch.manual_seed(4)
    w = torch.randn(8, 512) * torch.logspace(-4, 1, 8).reshape(8, 1)
    q, scales = fp8_quantize(w, block=128)
    err = (fp8_dequantize(q, scales, torch.float32, block=128) - w).abs()
    per_element_scale = scales.repeat_interleave(128, dim=-1)
    # 3 mantissa bits: half an ulp is 2**-4 relative; the subnormal half-step is 2**-10 scaled units.
    assert (err <= w.abs() * 2.0**-4 + per_element_scale * 2.0**-10 + 1e-12).all()
    with pytest.raises(ValueError, match="block=64"):
        fp8_dequantize(q, scales, block=64)


def test_fp8_fake_quant_straight_through_gradient():
    torch.manual_seed(5)
    w = torch.randn(4, 200, dtype=torch.bfloat16, requires_grad=True)
    out = fp8_fake_quant(w, block=64)
    q, scales = fp8_quantize(w.detach(), block=64)
    assert torch.equal(out.detach(), fp8_dequantize(q, scales, torch.bfloat16, block=64))
    upstream = torch.randn_like(out)
    (grad,) = torch.autograd.grad(out, w, upstream)
    assert torch.equal(grad, upstream)


# ------------------------------------------------------------------------------------- NVFP4


def test_nvfp4_known_encoding():
    # Block 0: amax 6 = tensor amax -> block scale 448 (global 6 / 2688 makes it 1.0 overall).
    # Block 1: amax 0.75 -> block scale 0.75 / 6 / global = 56, effective 0.125: 0.75 -> 6, -0.25 -> -2.
    w = torch.cat([_block(6.0, 3.0, -1.5, 0.5, size=16), _block(0.75, -0.25, 0.0625, size=16)])
    packed, block_scales, global_scale = nvfp4_quantize(w)
    assert packed.shape == (16,) and block_scales.shape == (2,) and global_scale.shape == ()
    assert global_scale.item() == pytest.approx(6 / 2688)
    assert block_scales.float().tolist() == [448.0, 56.0]
    codes = _nibbles(packed)
    assert codes[:4] == [7, 5, 11, 1] and codes[16:19] == [7, 12, 1]  # 0.0625 / 0.125 = 0.5
    out = nvfp4_dequantize(packed, block_scales, global_scale, torch.float32)
    assert out[:4].tolist() == pytest.approx([6.0, 3.0, -1.5, 0.5], rel=1e-6)
    assert out[16:19].tolist() == pytest.approx([0.75, -0.25, 0.0625], rel=1e-6)


def test_nvfp4_random_round_trip_error_bound():
    torch.manual_seed(6)
    w = torch.randn(8, 256) * torch.logspace(-2, 1, 8).reshape(8, 1)
    packed, block_scales, global_scale = nvfp4_quantize(w)
    assert packed.shape == (8, 128) and block_scales.shape == (8, 16)
    err = (nvfp4_dequantize(packed, block_scales, global_scale, torch.float32) - w).abs().reshape(8, 16, 16)
    block_amax = w.abs().reshape(8, 16, 16).amax(-1, keepdim=True)
    # Half the top step (4 -> 6) is amax / 6, widened by e4m3 rounding of the block scale.
    assert (err <= block_amax * (1 / 6) * (1 + 2.0**-3) + 1e-7).all()
    assert (err.square().mean() / w.square().mean()) < 0.02
    with pytest.raises(ValueError, match="multiple of 16"):
        nvfp4_quantize(torch.zeros(24))


def test_nvfp4_fake_quant_straight_through_gradient():
    torch.manual_seed(7)
    w = torch.randn(5, 48, requires_grad=True)
    out = nvfp4_fake_quant(w)
    assert torch.equal(out.detach(), nvfp4_dequantize(*nvfp4_quantize(w.detach()), dtype=torch.float32))
    upstream = torch.randn_like(out)
    (grad,) = torch.autograd.grad(out, w, upstream)
    assert torch.equal(grad, upstream)


@pytest.mark.parametrize("fmt", ["mxfp4", "nvfp4", "fp8"])
def test_fake_quant_blocks_along_the_given_dim(fmt):
    torch.manual_seed(10)
    w = torch.randn(64, 3, requires_grad=True)  # [in, out]: blocks run along dim 0
    out = quant.fake_quant(w, fmt, dim=0, mxfp4_rule="gpt-oss", fp8_block=32)
    along_last = {
        "mxfp4": lambda t: quant.mxfp4_fake_quantize_values(t, scale_rounding="gpt-oss"),
        "nvfp4": lambda t: nvfp4_fake_quant(t).detach(),
        "fp8": lambda t: fp8_fake_quant(t, block=32).detach(),
    }[fmt]
    assert torch.equal(out.detach(), along_last(w.detach().t()).t())
    upstream = torch.randn_like(out)
    assert torch.equal(torch.autograd.grad(out, w, upstream)[0], upstream)
    with pytest.raises(ValueError, match="unknown format"):
        quant.fake_quant(w, "int4")


def test_bits_per_weight():
    assert bits_per_weight("mxfp4") == 4.25
    assert bits_per_weight("nvfp4") == 4.5
    assert bits_per_weight("fp8", fp8_block=128) == 8.25
    with pytest.raises(ValueError, match="unknown format"):
        bits_per_weight("int3")


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_codecs_on_gpu_match_cpu():
    torch.manual_seed(8)
    w = torch.randn(16, 256)
    for quantize in (mxfp4_quantize, nvfp4_quantize, fp8_quantize):
        on_cpu, on_gpu = quantize(w), quantize(w.cuda())
        for a, b in zip(on_cpu, on_gpu):
            assert torch.equal(
                a.view(torch.uint8) if a.dtype == torch.float8_e4m3fn else a,
                (b.view(torch.uint8) if b.dtype == torch.float8_e4m3fn else b).cpu(),
            )
    blocks, scales = mxfp4_quantize(w.cuda())
    assert torch.equal(mxfp4_dequantize(blocks, scales).cpu(), mxfp4_dequantize(blocks.cpu(), scales.cpu()))
    for fake_quant in (mxfp4_fake_quant, fp8_fake_quant, nvfp4_fake_quant):
        on_gpu = w.cuda().requires_grad_()
        out = fake_quant(on_gpu)
        assert torch.equal(out.detach().cpu(), fake_quant(w))
        upstream = torch.randn_like(out)
        assert torch.equal(torch.autograd.grad(out, on_gpu, upstream)[0], upstream)
