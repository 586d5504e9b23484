"""The expert LoRA weight-gradient kernel (model/triton_expert_lora.py) against moe.grouped_mm in float64.

- CPU: argument validation (ValueErrors before any launch).
- With Triton importable but no GPU, the kernel checks run on CPU under TRITON_INTERPRET=1 in a
  subprocess (the interpreter must be chosen before Triton is imported): `python tests/test_triton_expert_lora.py`.
  Inputs there are float32, so kernel and reference agree to float32 rounding.
- GPU (`-m gpu`): the same checks on bf16 inputs at bf16 tolerances (the kernels accumulate in float32 and
  round once).

Cases cover row counts that are not a multiple of the row step, experts with no rows (first, middle, last),
a single expert, P = 16 and 24, x (and u) as a column slice of a wider tensor (row stride > D), the scaled and
transposed form (grad B) and a float32 output.
"""

from __future__ import annotations

import sys

import pytest
import torch
from triton_interpreter import (
    needs_triton,
    run_interpreter_cases,
    run_under_interpreter,
)

from rustforge.model import moe
from rustforge.model import triton_expert_lora as tk

gpu = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a GPU")


def _rel_err(got: torch.Tensor, want: torch.Tensor) -> float:
    got, want = got.detach().double().cpu(), want.detach().double().cpu()
    return float((got - want).abs().max() / want.abs().max().clamp_min(1e-30))


def _group_counts(S: int, E: int, empty: tuple[int, ...], g: torch.Generator) -> torch.Tensor:
    """Rows per expert summing to S, zero for the experts in `empty`, random (and uneven) for the others."""
    owners = torch.tensor([e for e in range(E) if e not in empty])
    picks = owners[torch.randint(0, len(owners), (S,), generator=g)]
    return torch.bincount(picks, minlength=E)


def _routing(S: int, E: int, empty: tuple[int, ...], device, seed: int):
    """(offs int32 [E], expert_of_row int32 [S]) of expert-sorted rows."""
    counts = _group_counts(S, E, empty, torch.Generator().manual_seed(seed))
    offs = torch.cumsum(counts, 0).to(torch.int32)
    expert_of_row = torch.repeat_interleave(torch.arange(E), counts).to(torch.int32)
    return offs.to(device), expert_of_row.to(device)


def _rows(S: int, D: int, dtype, device, g: torch.Generator, wide: bool) -> torch.Tensor:
    """[S, D]; with `wide`, a column slice of an [S, D + 9] tensor (row stride D + 9, offset base)."""
    if not wide:
        return torch.randn(S, D, generator=g).to(dtype).to(device)
    return torch.randn(S, D + 9, generator=g).to(dtype).to(device)[:, 5 : 5 + D]


# --------------------------------------------------------------------------------- the checks
def check_expert_transposed_product(S: int, D: int, P: int, E: int, empty: tuple[int, ...], dtype, device, tol: float,
                                    wide_x: bool = False, out_dtype=None) -> dict:
    """expert_transposed_product against grouped_mm(x.t(), u, offs) in float64 with empty groups zeroed; empty
    experts must be exact zeros. Also the grad-B use: expert_transposed_product(g, xa).transpose(1, 2) ==
    grouped_mm(xa.t(), g)."""
    g = torch.Generator().manual_seed(S + D + P + E + 1)
    offs, _ = _routing(S, E, empty, device, seed=S + E + 1)
    x = _rows(S, D, dtype, device, g, wide_x)
    u = _rows(S, P, dtype, device, g, wide_x)
    want = moe._zero_empty_groups(moe.grouped_mm(x.t().double(), u.double(), offs), offs)
    got = tk.expert_transposed_product(x, u, offs, out_dtype=out_dtype)
    want_grad_b = moe._zero_empty_groups(moe.grouped_mm(u.t().double(), x.double(), offs), offs)
    got_b = tk.expert_transposed_product(x, u, offs, out_dtype=out_dtype, scale=0.5, transposed=True)
    errs = {"err": _rel_err(got, want), "grad_B": _rel_err(got.transpose(1, 2), want_grad_b),
            "scaled_transposed": _rel_err(got_b, 0.5 * want_grad_b)}
    if not got_b.is_contiguous():
        errs["scaled_transposed"] = float("inf")  # the B factor's layout, contiguous [E, P, D]
    empty_zero = all(not got[e].any() for e in empty)
    ok = (got.dtype == (out_dtype or dtype) and got.shape == (E, D, P) and empty_zero
          and all(e <= tol for e in errs.values()))
    return {"ok": ok, "empty_experts_zero": empty_zero, **errs}


def interpreter_cases():
    """(name, thunk -> result dict) pairs run on CPU under TRITON_INTERPRET=1 (small: the interpreter is numpy)."""
    f32, tol = torch.float32, 1e-5
    xt_u = check_expert_transposed_product
    return [
        # 150 rows over 6 experts: row steps end inside experts' ranges; D = 300: the last column block partial
        ("xt-u-empty-first-mid-last", lambda: xt_u(150, 300, 24, 6, (0, 3, 5), f32, "cpu", tol)),
        ("xt-u-wide", lambda: xt_u(70, 200, 16, 3, (1,), f32, "cpu", tol, wide_x=True)),
        ("xt-u-single-expert", lambda: xt_u(130, 140, 16, 1, (), f32, "cpu", tol)),
        ("xt-u-one-expert-of-four", lambda: xt_u(20, 33, 24, 4, (0, 1, 3), f32, "cpu", tol)),
    ]


# ----------------------------------------------------------------------------------------------- CPU
def test_expert_transposed_product_rejects_bad_arguments():
    x, offs = torch.zeros(8, 32), torch.tensor([3, 8], dtype=torch.int32)
    with pytest.raises(ValueError, match=r"u \(7, 24\)"):
        tk.expert_transposed_product(x, torch.zeros(7, 24), offs)
    with pytest.raises(ValueError, match="unit column stride"):
        tk.expert_transposed_product(torch.zeros(32, 8).t(), torch.zeros(8, 24), offs)
    with pytest.raises(ValueError, match="offs"):
        tk.expert_transposed_product(x, torch.zeros(8, 24), offs.float())
    with pytest.raises(ValueError, match="P = 200"):
        tk.expert_transposed_product(x, torch.zeros(8, 200), offs)


@needs_triton
def test_kernels_under_the_triton_interpreter():
    run_under_interpreter(__file__)


# ----------------------------------------------------------------------------------------------- GPU
BF16_TOL = 1e-2


@pytest.mark.gpu
@gpu
@pytest.mark.parametrize("S,D,P,E,empty,wide,out_dtype", [
    (16384, 2880, 24, 32, (), False, None),  # grad A at the 20B shape
    (16384, 5760, 24, 32, (), False, torch.float32),  # grad B at the 20B shape, float32 out
    (1000, 2880, 16, 32, (0, 7, 31), True, None),
    (777, 300, 24, 1, (), True, None),
    (5, 7, 3, 2, (1,), False, None),
])
def test_gpu_expert_transposed_product_bf16(S, D, P, E, empty, wide, out_dtype):
    result = check_expert_transposed_product(S, D, P, E, empty, torch.bfloat16, "cuda", BF16_TOL, wide_x=wide,
                                             out_dtype=out_dtype)
    assert result["ok"], result


# ---------------------------------------------------------------------------- interpreter entry point
if __name__ == "__main__":  # the interpreter run (TRITON_INTERPRET=1 set by the caller)
    sys.exit(run_interpreter_cases(interpreter_cases()))
