"""The fused training kernels (model/triton_moe_train.py) against their torch references, forward and
gradients, and GroupedExperts with the kernels against GroupedExperts without them.

- CPU: moe._WeightedSumUnsorted's torch path equals the plain-autograd expression it replaced.
- With Triton importable but no GPU, the kernel checks run on CPU under TRITON_INTERPRET=1 in a
  subprocess (the interpreter must be chosen before Triton is imported): `python tests/test_triton_moe_train.py`.
  Inputs there are float32, so kernel and reference agree to float32 rounding.
- GPU (`-m gpu`): the same checks on bf16 inputs at bf16 tolerances (the kernels compute in float32 and
  round once; the references round after every op).
"""

from __future__ import annotations

import contextlib
import os
import sys

import pytest
import torch
from triton_interpreter import (
    needs_triton,
    run_interpreter_cases,
    run_under_interpreter,
)

from rustforge.model import moe
from rustforge.model import triton_moe_train as tk

ALPHA, LIMIT = 1.702, 7.0
gpu = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a GPU")


def _rel_err(got: torch.Tensor, want: torch.Tensor) -> float:
    got, want = got.detach().double(), want.detach().double()
    return float((got - want).abs().max() / want.abs().max().clamp_min(1e-30))


def _rel_fro(got: torch.Tensor, want: torch.Tensor) -> float:
    """||got - want|| / ||want||: at wide shapes bf16 flips a few clamp decisions, each moving one gate_up gradient
    element by up to ~9, which max-relative errors (_rel_err) see and this does not (run 21: 0.13 max-relative
    between the torch and fused bf16 paths at the 20B shape)."""
    got, want = got.detach().double(), want.detach().double()
    return float((got - want).norm() / want.norm().clamp_min(1e-30))


def _routing(n_tokens: int, top_k: int, n_experts: int, device, seed: int):
    g = torch.Generator().manual_seed(seed)
    indices = torch.stack([torch.randperm(n_experts, generator=g)[:top_k] for _ in range(n_tokens)])
    weights = torch.softmax(torch.randn(n_tokens, top_k, generator=g), dim=-1)
    return indices.to(device), weights.to(device)


def _swiglu_inputs(S: int, I: int, dtype, device, seed: int):
    g = torch.Generator().manual_seed(seed)
    gate_up = torch.randn(S, 2 * I, generator=g) * 5  # past the clamp at 7 on both sides, and at it exactly
    gate_up[0, :4] = torch.tensor([LIMIT, LIMIT, -LIMIT, -LIMIT])
    return gate_up.to(dtype).to(device), torch.randn(S, I, generator=g).to(dtype).to(device)


KERNEL_ENTRY_POINTS = ("swiglu_forward", "swiglu_backward", "combine_rows", "combine_rows_backward",
                       "low_rank_update_", "expert_transposed_product")
# one GroupedExperts forward + backward with the fused kernels: low_rank_update_ for both projections' LoRA + bias
# term and both input gradients, the Triton kernel for the four LoRA weight gradients
FUSED_CALLS = {"swiglu_forward": 1, "swiglu_backward": 1, "combine_rows": 2, "combine_rows_backward": 1,
               "low_rank_update_": 4, "expert_transposed_product": 4}


@contextlib.contextmanager
def _counting(module, names):
    """Counts the calls of module.<name> for each name (wrapping them for the duration)."""
    counts = dict.fromkeys(names, 0)
    originals = {name: getattr(module, name) for name in names}

    def wrap(name):
        def counted(*args, **kwargs):
            counts[name] += 1
            return originals[name](*args, **kwargs)
        return counted

    for name in names:
        setattr(module, name, wrap(name))
    try:
        yield counts
    finally:
        for name, fn in originals.items():
            setattr(module, name, fn)


# --------------------------------------------------------------------------------- the checks
def check_swiglu(S: int, I: int, dtype, device, tol: float, pad: int = 0) -> dict:
    """pad > 0: the output written into the first I columns of an [S, I + pad] buffer and the incoming gradient
    read from such a buffer (moe.LORA_IN_GEMM_K's wide rows); the pad columns are left alone."""
    gate_up, grad_out = _swiglu_inputs(S, I, dtype, device, seed=S + I)
    leaf = gate_up.double().requires_grad_(True)
    want = moe.swiglu_reference(leaf, ALPHA, LIMIT)
    want.backward(grad_out.double())
    if pad:
        wide = torch.full((S, I + pad), 7.0, dtype=dtype, device=device)
        got = tk.swiglu_forward(gate_up, ALPHA, LIMIT, out=wide[:, :I])
        grad_wide = torch.full((S, I + pad), float("nan"), dtype=dtype, device=device)
        grad_wide[:, :I] = grad_out
        got_grad = tk.swiglu_backward(gate_up, grad_wide[:, :I], ALPHA, LIMIT)
        if not bool((wide[:, I:] == 7.0).all()):
            return {"ok": False, "pad_columns": "overwritten"}
    else:
        got = tk.swiglu_forward(gate_up, ALPHA, LIMIT)
        got_grad = tk.swiglu_backward(gate_up, grad_out, ALPHA, LIMIT)
    errs = {"forward": _rel_err(got, want), "grad": _rel_err(got_grad, leaf.grad)}
    ok = got.dtype == dtype and got_grad.dtype == dtype and all(e <= tol for e in errs.values())
    return {"ok": ok, **errs}


def check_combine(n_tokens: int, top_k: int, hidden: int, dtype, device, tol: float, pad: int = 0) -> dict:
    """combine_rows (with and without weights) and its backward against autograd of the torch expression; pad > 0:
    combine_rows reads the rows as the first columns of a wider buffer (a row stride)."""
    indices, weights = _routing(n_tokens, top_k, 8, device, seed=n_tokens)
    rows_info = moe.sort_by_expert(indices, 8)
    assert torch.equal(rows_info.expert_of_row.long(), indices.reshape(-1)[rows_info.perm])
    g = torch.Generator().manual_seed(hidden)
    rows = torch.randn(n_tokens * top_k, hidden, generator=g).to(dtype).to(device)
    grad = torch.randn(n_tokens, hidden, generator=g).to(device)  # the residual stream's dtype: float32
    rows64, w64 = rows.double().requires_grad_(True), weights.double().requires_grad_(True)
    weighted = rows64 * w64.reshape(-1)[rows_info.perm].unsqueeze(-1)
    want = weighted.index_select(0, rows_info.inverse).view(n_tokens, top_k, hidden).sum(1)
    want.backward(grad.double())
    rows_in = rows
    if pad:
        rows_in = torch.full((rows.shape[0], hidden + pad), float("nan"), dtype=dtype, device=device)[:, :hidden]
        rows_in.copy_(rows)
    got = tk.combine_rows(rows_in, rows_info.inverse, top_k, torch.float32, weights=weights)
    unweighted = tk.combine_rows(rows_in, rows_info.inverse, top_k, dtype)
    want_unweighted = rows.double().index_select(0, rows_info.inverse).view(n_tokens, top_k, hidden).sum(1)
    grad_rows, grad_w = tk.combine_rows_backward(grad, rows, weights, rows_info.perm, top_k)
    errs = {
        "forward": _rel_err(got, want),
        "unweighted": _rel_err(unweighted, want_unweighted),
        "grad_rows": _rel_err(grad_rows, rows64.grad),
        "grad_weights": _rel_err(grad_w.view(n_tokens, top_k), w64.grad),
    }
    ok = got.dtype == torch.float32 and grad_rows.dtype == dtype and all(e <= tol for e in errs.values())
    return {"ok": ok, **errs}


def check_low_rank_update(S: int, N: int, P: int, E: int, dtype, device, tol: float, transposed_b: bool) -> dict:
    """low_rank_update_ against y + per-row u @ b[e] in float64; experts with no rows and tiles spanning several."""
    g = torch.Generator().manual_seed(S + N + P)
    experts = torch.sort(torch.randint(0, E - 1, (S,), generator=g)).values  # the last expert gets no rows
    y = torch.randn(S, N, generator=g).to(dtype)
    u = torch.randn(S, P, generator=g).to(dtype)
    b = torch.randn(E, N, P, generator=g).to(dtype).transpose(1, 2) if transposed_b else torch.randn(E, P, N, generator=g).to(dtype)
    want = y.double() + torch.einsum("sp,spn->sn", u.double(), b.double()[experts])
    got = tk.low_rank_update_(y.to(device), u.to(device), b.to(device), experts.to(torch.int32).to(device))
    err = _rel_err(got.cpu(), want)
    return {"ok": err <= tol, "err": err}


EXPERT_DIMS = (6, 64, 96)  # E, H, I of the GroupedExperts checks


def _experts_case(fmt: str, dtype, device, n_tokens: int, dims=EXPERT_DIMS, top_k: int = 2, rank: int = 4):
    """A GroupedExperts with random weights and LoRA on both projections, routing, input and output gradient.
    Weights shrink with 1/sqrt(hidden) from the (H = 64) scale, so wide shapes keep the clamp partly hit."""
    E, H, I = dims
    shrink = (64 / H) ** 0.5
    g = torch.Generator().manual_seed(0)
    # std 0.3 puts some gate/up pre-activations past the clamp limit, so its gradient is covered
    module = moe.GroupedExperts.from_dense(torch.randn(E, H, 2 * I, generator=g) * 0.3 * shrink,
                                           torch.randn(E, 2 * I, generator=g) * 0.5,
                                           torch.randn(E, I, H, generator=g) * 0.1 * shrink,
                                           torch.randn(E, H, generator=g) * 0.5, fmt=fmt, alpha=ALPHA, limit=LIMIT)
    moe.add_expert_lora(module, r=rank, alpha=2 * rank, targets=moe.EXPERT_TARGETS)
    with torch.no_grad():
        for p in module.lora_parameters():
            p.copy_(torch.randn(p.shape, generator=g) * 0.1 * shrink)
    module = module.to(device=device, dtype=dtype)
    indices, weights = _routing(n_tokens, top_k, module.num_experts, device, seed=5)
    x = torch.randn(n_tokens, module.hidden_size, generator=torch.Generator().manual_seed(6)).to(device)
    return module, indices, weights, x, torch.randn_like(x)


def _experts_step(module, indices, weights, x, grad_out) -> dict:
    """The output and every gradient (hidden, router weights, LoRA) of one forward + backward."""
    xs, ws = x.clone().requires_grad_(True), weights.clone().requires_grad_(True)
    for p in module.lora_parameters():
        p.grad = None
    out = module(xs, indices, ws)
    out.backward(grad_out)
    return {"out": out.detach(), "x": xs.grad, "w": ws.grad,
            **{f"lora{i}": p.grad.clone() for i, p in enumerate(module.lora_parameters())}}


def check_grouped_experts(fmt: str, dtype, device, tol: float, n_tokens: int = 37, err=_rel_err, **shape) -> dict:
    """GroupedExperts forward and every gradient (hidden, router weights, LoRA) with the fused kernels == without."""
    case = _experts_case(fmt, dtype, device, n_tokens, **shape)
    results, calls = {}, {}
    in_k, moe.LORA_IN_GEMM_K = moe.LORA_IN_GEMM_K, False  # the in-place update's kernels; the K path: check_lora_in_gemm_k
    try:
        for fused in (False, True):
            moe.FUSED_KERNELS = fused
            with _counting(moe, KERNEL_ENTRY_POINTS) as calls[fused]:
                results[fused] = _experts_step(*case)
    finally:
        moe.FUSED_KERNELS, moe.LORA_IN_GEMM_K = True, in_k
    errs = {k: err(results[True][k], results[False][k]) for k in results[False]}
    # the comparison means something only if the fused run took every kernel and the other took none
    took_paths = calls[True] == FUSED_CALLS and not any(calls[False].values())
    return {"ok": took_paths and all(e <= tol for e in errs.values()), "kernel_calls": calls[True], **errs}


def check_lora_in_gemm_k(dtype, device, tol: float, n_tokens: int = 37, err=_rel_err, **shape) -> dict:
    """GroupedExperts (bf16 storage, LoRA on both projections, fused kernels) with moe.LORA_IN_GEMM_K == without:
    the output and every gradient; the K path must have run (the wide rows through the fused kernels)."""
    case = _experts_case("bf16", dtype, device, n_tokens, **shape)
    rank = shape.get("rank", 4)
    results, widths = {}, []
    real, saved = moe._GroupedLoraLinearInK.apply, (moe.LORA_IN_GEMM_K, moe.LORA_IN_GEMM_K_DTYPES)
    moe._GroupedLoraLinearInK.apply = lambda *a: widths.append(a[0].shape[1]) or real(*a)
    moe.LORA_IN_GEMM_K_DTYPES = (dtype,)  # the interpreter runs float32
    try:
        for in_k in (False, True):
            moe.LORA_IN_GEMM_K = in_k
            results[in_k] = _experts_step(*case)
    finally:
        moe.LORA_IN_GEMM_K, moe.LORA_IN_GEMM_K_DTYPES = saved
        moe._GroupedLoraLinearInK.apply = real
    errs = {k: err(results[True][k], results[False][k]) for k in results[False]}
    _, H, I = shape.get("dims", EXPERT_DIMS)
    took_path = widths == [H + moe._k_pad(rank), I + moe._k_pad(rank)]
    return {"ok": took_path and all(e <= tol for e in errs.values()), "widths": widths, **errs}


def interpreter_cases():
    """(name, thunk -> result dict) pairs run on CPU under TRITON_INTERPRET=1 (small: the interpreter is numpy)."""
    f32 = torch.float32
    return [
        ("swiglu", lambda: check_swiglu(5, 700, f32, "cpu", tol=1e-5)),  # 3500 outputs: a partial last block
        ("swiglu-wide-rows", lambda: check_swiglu(5, 700, f32, "cpu", tol=1e-5, pad=64)),
        ("combine-k4", lambda: check_combine(13, 4, 1100, f32, "cpu", tol=1e-5)),  # 2 column blocks, the 2nd partial
        ("combine-k1", lambda: check_combine(3, 1, 64, f32, "cpu", tol=1e-5)),
        ("combine-row-stride", lambda: check_combine(13, 4, 1100, f32, "cpu", tol=1e-5, pad=64)),
        ("low-rank", lambda: check_low_rank_update(150, 200, 24, 5, f32, "cpu", tol=1e-5, transposed_b=False)),
        ("low-rank-strided", lambda: check_low_rank_update(70, 40, 16, 3, f32, "cpu", tol=1e-5, transposed_b=True)),
        ("grouped-bf16-weights", lambda: check_grouped_experts("bf16", f32, "cpu", tol=1e-5)),
        ("grouped-mxfp4", lambda: check_grouped_experts("mxfp4", f32, "cpu", tol=1e-5)),
        ("grouped-lora-in-gemm-k", lambda: check_lora_in_gemm_k(f32, "cpu", tol=1e-5)),
    ]


# ----------------------------------------------------------------------------------------------- CPU
def test_weighted_sum_torch_path_equals_the_autograd_expression_it_replaced():
    indices, weights = _routing(11, 3, 6, "cpu", seed=1)
    info = moe.sort_by_expert(indices, 6)
    rows = torch.randn(33, 16, requires_grad=True)
    w = weights.clone().requires_grad_(True)
    got = moe._WeightedSumUnsorted.apply(rows, w, info, torch.float32)
    grad = torch.randn_like(got)
    got_grads = torch.autograd.grad(got, (rows, w), grad)
    want = (rows * w.reshape(-1)[info.perm].unsqueeze(-1)).index_select(0, info.inverse).view(11, 3, 16).sum(1)
    want_grads = torch.autograd.grad(want, (rows, w), grad)
    torch.testing.assert_close(got, want)
    for a, b in zip(got_grads, want_grads):
        torch.testing.assert_close(a, b)


def test_cpu_tensors_take_the_torch_path():
    from rustforge.model.triton_dequant import triton_kernels_available

    assert not triton_kernels_available(torch.zeros(1)) or os.environ.get("TRITON_INTERPRET") == "1"


@needs_triton
def test_kernels_under_the_triton_interpreter():
    run_under_interpreter(__file__)


# ----------------------------------------------------------------------------------------------- GPU
@pytest.mark.gpu
@gpu
@pytest.mark.parametrize("S,I", [(1, 7), (333, 2880), (4096, 2880)])
def test_gpu_swiglu_bf16(S, I):
    result = check_swiglu(S, I, torch.bfloat16, "cuda", tol=1e-2)
    assert result["ok"], result


@pytest.mark.gpu
@gpu
@pytest.mark.parametrize("n_tokens,top_k,hidden", [(1, 4, 2880), (777, 4, 2880), (64, 2, 100)])
def test_gpu_combine_bf16(n_tokens, top_k, hidden):
    result = check_combine(n_tokens, top_k, hidden, torch.bfloat16, "cuda", tol=1e-2)
    assert result["ok"], result


@pytest.mark.gpu
@gpu
@pytest.mark.parametrize("S,N,P,E,transposed", [(16384, 5760, 24, 32, False), (1000, 2880, 16, 32, True), (5, 7, 3, 2, False)])
def test_gpu_low_rank_update_bf16(S, N, P, E, transposed):
    result = check_low_rank_update(S, N, P, E, torch.bfloat16, "cuda", tol=1e-2, transposed_b=transposed)
    assert result["ok"], result


@pytest.mark.gpu
@gpu
def test_gpu_lora_in_gemm_k_equals_the_default_path():
    result = check_lora_in_gemm_k(torch.bfloat16, "cuda", tol=3e-2, n_tokens=300)
    assert result["ok"], result


@pytest.mark.gpu
@gpu
@pytest.mark.parametrize("S,I", [(333, 2880)])
def test_gpu_swiglu_wide_rows_bf16(S, I):
    result = check_swiglu(S, I, torch.bfloat16, "cuda", tol=1e-2, pad=64)
    assert result["ok"], result


@pytest.mark.gpu
@gpu
@pytest.mark.parametrize("fmt", ["bf16", "fp8", "mxfp4"])
def test_gpu_grouped_experts_fused_equals_unfused(fmt):
    result = check_grouped_experts(fmt, torch.bfloat16, "cuda", tol=3e-2, n_tokens=300)

    assert result["ok"], result


@pytest.mark.gpu
@gpu
@pytest.mark.parametrize("check", ["fused", "lora_in_gemm_k"])
def test_gpu_20b_expert_shape(check):
    """The same comparisons at GPT-OSS-20B's expert shape (32 experts, 2880 x 2880, top-4, LoRA r16, 4096 tokens):
    shape-dependent bugs (block edges, strides, the 64 extra K) would hide at the small shape. Relative Frobenius
    errors (see _rel_fro); two bf16 paths sit near 1e-2 of each other."""
    shape = {"dims": (32, 2880, 2880), "top_k": 4, "rank": 16, "err": _rel_fro}
    if check == "fused":
        result = check_grouped_experts("bf16", torch.bfloat16, "cuda", tol=2e-2, n_tokens=4096, **shape)
    else:
        result = check_lora_in_gemm_k(torch.bfloat16, "cuda", tol=2e-2, n_tokens=4096, **shape)
    assert result["ok"], result


# ---------------------------------------------------------------------------- interpreter entry point
if __name__ == "__main__":  # the interpreter run (TRITON_INTERPRET=1 set by the caller)
    sys.exit(run_interpreter_cases(interpreter_cases()))
