"""The Triton dequantisers (GPU) against the torch references in model/quant.py, bit for bit."""

import pytest
import torch

from rustforge.model.quant import fp8_dequantize, fp8_quantize, mxfp4_dequantize
from rustforge.model.triton_dequant import fp8_dequantize_triton, mxfp4_dequantize_triton, triton_dequant_available

gpu = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a GPU")


def test_cpu_tensors_take_the_reference_path():
    assert not triton_dequant_available(torch.zeros(1, dtype=torch.uint8))


@pytest.mark.gpu
@gpu
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
def test_mxfp4_matches_reference_bit_for_bit(dtype):
    g = torch.Generator().manual_seed(0)
    blocks = torch.randint(0, 256, (3, 40, 7, 16), generator=g, dtype=torch.uint8)
    scales = torch.randint(100, 140, (3, 40, 7), generator=g, dtype=torch.uint8)
    scales[0, 0, :4] = torch.tensor([0, 1, 254, 127], dtype=torch.uint8)  # subnormal, tiny, huge scales
    # the CPU reference is exact IEEE arithmetic; on the GPU torch's ldexp flushes the 2**-127 scale
    want = mxfp4_dequantize(blocks, scales, dtype)
    got = mxfp4_dequantize_triton(blocks.cuda(), scales.cuda(), dtype).cpu()
    assert got.shape == want.shape and got.dtype == want.dtype
    bits = torch.int16 if dtype == torch.bfloat16 else torch.int32
    differ = (got.view(bits) != want.view(bits)).nonzero()
    where = [(tuple(i.tolist()), float(got[tuple(i)]), float(want[tuple(i)]), int(scales[tuple(i[:-1]) + (int(i[-1]) // 32,)]))
             for i in differ[:5]]
    assert not len(differ), f"{len(differ)} values differ; (index, triton, reference, scale byte): {where}"


@pytest.mark.gpu
@gpu
@pytest.mark.parametrize("k", [256, 2880])  # 2880 = 22.5 blocks of 128: a partial last block
def test_fp8_matches_reference_bit_for_bit(k):
    w = torch.randn(4, 24, k, generator=torch.Generator().manual_seed(1)) * 3
    q, scales = fp8_quantize(w, block=128)
    want = fp8_dequantize(q, scales, torch.bfloat16, block=128)
    got = fp8_dequantize_triton(q.view(torch.uint8).cuda(), scales.cuda(), torch.bfloat16, 128).cpu()
    assert torch.equal(got.view(torch.int16), want.view(torch.int16))
