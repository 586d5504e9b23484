"""FusedRMSNorm and add_rmsnorm (model/triton_rmsnorm.py) against transformers' GptOssRMSNorm (after torch's add),
forward and input gradients.

- CPU: the swap keeps the parameter object and names; CPU tensors and trainable weights run
  transformers' forward (identical results).
- With Triton importable, the kernels run on CPU under TRITON_INTERPRET=1 in a subprocess
  (`python tests/test_triton_rmsnorm.py`), float32 inputs: equal to float32 rounding.
- GPU (`-m gpu`): bf16 inputs at bf16 tolerance.
"""

from __future__ import annotations

import sys

import pytest
import torch
from transformers.models.gpt_oss.modeling_gpt_oss import GptOssRMSNorm
from triton_interpreter import needs_triton, run_under_interpreter

from rustforge.model import triton_rmsnorm as rn

gpu = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a GPU")


def check_rmsnorm(rows: int, hidden: int, dtype, device, tol: float) -> dict:
    g = torch.Generator().manual_seed(rows + hidden)
    reference = GptOssRMSNorm(hidden, eps=1e-5)
    with torch.no_grad():
        reference.weight.copy_(torch.randn(hidden, generator=g) * 0.5 + 1)
    reference = reference.to(device=device, dtype=dtype).requires_grad_(False)
    fused = rn.FusedRMSNorm.from_module(reference)
    x = (torch.randn(2, rows, hidden, generator=g) * 3).to(device=device, dtype=dtype)
    grad_y = torch.randn(2, rows, hidden, generator=g).to(device=device, dtype=dtype)
    x64 = x.double().requires_grad_(True)
    want = GptOssRMSNorm.forward(reference.double(), x64)  # the reference math in float64
    want.backward(grad_y.double())
    reference.to(dtype)
    xs = x.clone().requires_grad_(True)
    got = fused(xs)
    got.backward(grad_y)

    def rel(a, b):
        return float((a.detach().double() - b.detach().double()).abs().max() / b.detach().double().abs().max())

    errs = {"forward": rel(got, want), "grad": rel(xs.grad, x64.grad)}
    took_kernel = type(got.grad_fn).__name__ == "_RMSNormFunctionBackward"  # not transformers' forward
    ok = took_kernel and got.dtype == dtype and xs.grad.dtype == dtype and all(e <= tol for e in errs.values())
    return {"ok": ok, **errs}


def check_add_rmsnorm(rows: int, hidden: int, dtype, device, tol: float) -> dict:
    """add_rmsnorm's (h, norm(h)) and the gradients of residual and delta (= h's gradient + the norm's), against
    float64: with both outputs' gradients, and with the norm's alone (h unused downstream)."""
    g = torch.Generator().manual_seed(rows * 7 + hidden)
    reference = GptOssRMSNorm(hidden, eps=1e-5)
    with torch.no_grad():
        reference.weight.copy_(torch.randn(hidden, generator=g) * 0.5 + 1)
    norm = rn.FusedRMSNorm.from_module(reference.to(device=device, dtype=dtype).requires_grad_(False))
    residual, delta, grad_h, grad_y = ((torch.randn(1, rows, hidden, generator=g) * 2).to(device=device, dtype=dtype)
                                       for _ in range(4))
    errs, took_kernel = {}, True
    for with_grad_h in (True, False):
        r64, d64 = (t.double().requires_grad_(True) for t in (residual, delta))
        h64 = (r64 + d64).to(dtype).double()  # the stored sum's rounding, as torch's add in `dtype` makes it
        y64 = GptOssRMSNorm.forward(reference.double(), h64)
        (((h64 * grad_h.double()).sum() if with_grad_h else 0) + (y64 * grad_y.double()).sum()).backward()
        rs, ds = (t.clone().requires_grad_(True) for t in (residual, delta))
        h, y = rn.add_rmsnorm(rs, ds, norm)
        (((h * grad_h).sum() if with_grad_h else 0) + (y * grad_y).sum()).backward()
        took_kernel &= type(y.grad_fn).__name__ == "_AddRMSNormFunctionBackward"

        def rel(a, b):
            return float((a.detach().double() - b.detach().double()).abs().max() / b.detach().double().abs().max())

        suffix = "" if with_grad_h else "_norm_only"
        errs.update({f"h{suffix}": rel(h, h64), f"y{suffix}": rel(y, y64), f"grad_residual{suffix}": rel(rs.grad, r64.grad),
                     f"grad_delta{suffix}": rel(ds.grad, d64.grad)})
    ok = took_kernel and all(e <= tol for e in errs.values())
    return {"ok": ok, **errs}


def test_add_rmsnorm_on_cpu_is_the_add_and_the_norm():
    norm = rn.FusedRMSNorm.from_module(GptOssRMSNorm(8))
    residual, delta = torch.randn(3, 8), torch.randn(3, 8)
    h, y = rn.add_rmsnorm(residual, delta, norm)
    torch.testing.assert_close(h, residual + delta, rtol=0, atol=0)
    torch.testing.assert_close(y, GptOssRMSNorm.forward(norm, residual + delta), rtol=0, atol=0)


def test_swap_keeps_parameters_and_cpu_results():
    model = torch.nn.Sequential(GptOssRMSNorm(8), torch.nn.Sequential(GptOssRMSNorm(8)))
    weights = [m.weight for m in model.modules() if isinstance(m, GptOssRMSNorm)]
    assert rn.install_fused_norms(model) == 2
    swapped = [m for m in model.modules() if isinstance(m, GptOssRMSNorm)]
    assert all(type(m) is rn.FusedRMSNorm for m in swapped)
    assert [m.weight for m in swapped] == weights and list(model.state_dict()) == ["0.weight", "1.0.weight"]
    x = torch.randn(3, 8)
    torch.testing.assert_close(model(x), GptOssRMSNorm.forward(swapped[1], GptOssRMSNorm.forward(swapped[0], x)))


def test_trainable_weight_takes_the_reference_path():
    norm = rn.FusedRMSNorm.from_module(GptOssRMSNorm(8))
    out = norm(torch.randn(3, 8))
    out.sum().backward()
    assert norm.weight.grad is not None


@needs_triton
def test_kernels_under_the_triton_interpreter():
    run_under_interpreter(__file__)


@pytest.mark.gpu
@gpu
@pytest.mark.parametrize("check", [check_rmsnorm, check_add_rmsnorm])
@pytest.mark.parametrize("rows,hidden", [(1, 2880), (1000, 2880), (7, 100)])
def test_gpu_bf16(check, rows, hidden):
    result = check(rows, hidden, torch.bfloat16, "cuda", tol=1e-2)
    assert result["ok"], result


if __name__ == "__main__":  # the interpreter run (TRITON_INTERPRET=1 set by the caller)
    results = [check_rmsnorm(5, 2880, torch.float32, "cpu", tol=1e-5), check_rmsnorm(3, 100, torch.float32, "cpu", tol=1e-5),
               check_add_rmsnorm(5, 2880, torch.float32, "cpu", tol=1e-5), check_add_rmsnorm(3, 100, torch.float32, "cpu", tol=1e-5)]
    print(results)
    sys.exit(0 if all(r["ok"] for r in results) else 1)
