"""The decode kernels (model/triton_moe_decode.py) against their torch reference, and the reference against
GroupedExperts (the model's own experts).

- CPU: the reference is GroupedExperts' function (float64, every format, LoRA, repeated and unrouted
  experts), and CPU modules never take the decode path.
- GPU (`-m gpu`): kernel == reference at bf16 tolerance for every format, both inner products (one-row
  multiply-and-sum, tensor cores), partial row/column/K tiles, 0..256 rows, rows sharing experts and
  experts hit by no row; the routing plan exactly; GroupedExperts under no_grad taking the path; a CUDA
  graph replay equal to eager.
- With Triton importable but no GPU, the same kernel checks run on CPU under TRITON_INTERPRET=1 in a
  subprocess (the interpreter must be chosen before Triton is imported): `python tests/test_moe_decode.py`.
bench/check_moe_decode.py runs `check_moe_decode` on the 20B shape and times the kernels.
"""

from __future__ import annotations

import sys

import pytest
import torch
from triton_interpreter import needs_triton, run_under_interpreter

from rustforge.model import moe
from rustforge.model import triton_moe_decode as md
from rustforge.model.quant import fp8_quantize

ALPHA, LIMIT = 1.702, 7.0
# bf16 output (and bf16 intermediates: gated rows, tensor-core operands) against a float32 reference:
# errors of a few 2**-9 of the values; a wrong row, expert or tile is off by O(1)
MAX_ERR_OF_MAX, REL_L2 = 2e-2, 1e-2
gpu = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a GPU")


# ------------------------------------------------------------------------------------ shared helpers
def random_weights(fmt: str, E: int, K: int, N: int, lora_r: int, device, seed: int) -> md.ExpertWeights:
    """A projection with outputs of order 1 for inputs of order 1: MXFP4 as random codes and scales,
    FP8 quantised from a normal, bf16 normal; LoRA with a nonzero B."""
    g = torch.Generator(device).manual_seed(seed)
    std = K**-0.5
    if fmt == "mxfp4":
        blocks = torch.randint(0, 256, (E, N, K // 32, 16), generator=g, device=device, dtype=torch.uint8)
        # E2M1 codes have rms ~3.2: scales 2**-9..2**-5 bracket std * 6 / 3.2 for K in the hundreds..thousands
        scales = torch.randint(118, 123, (E, N, K // 32), generator=g, device=device, dtype=torch.uint8)
        storage = (blocks, scales)
    elif fmt == "fp8":
        parts = [fp8_quantize(torch.randn(N, K, generator=g, device=device) * std, block=128) for _ in range(E)]
        codes, scales = torch.stack([q for q, _ in parts]), torch.stack([s for _, s in parts])
        storage = (codes.view(torch.uint8), scales.view(torch.int32))
    else:
        storage = ((torch.randn(E, K, N, generator=g, device=device) * std).to(torch.bfloat16),)
    bias = (torch.randn(E, N, generator=g, device=device) * 0.1).to(torch.bfloat16)
    if not lora_r:
        return md.ExpertWeights(fmt, storage, bias)
    lora_A = (torch.randn(E, K, lora_r, generator=g, device=device) * std).to(torch.bfloat16)
    lora_B = (torch.randn(E, lora_r, N, generator=g, device=device) * 0.3).to(torch.bfloat16)
    return md.ExpertWeights(fmt, storage, bias, lora_A, lora_B, scaling=2.0)


def random_routing(T: int, k: int, E: int, device, seed: int, hit: int | None = None, duplicates: bool = False):
    """(router indices [T, k], routing weights [T, k]): k distinct experts per token out of the first `hit`
    (default all; fewer leaves experts no row reaches), or with `duplicates` any experts, repeats included."""
    g = torch.Generator().manual_seed(seed)
    hit = hit or E
    if duplicates:
        indices = torch.randint(0, hit, (T, k), generator=g)
    else:
        indices = torch.stack([torch.randperm(hit, generator=g)[:k] for _ in range(T)]) if T else torch.zeros(0, k)
    weights = torch.rand(T, k, generator=g)
    return indices.long().to(device), (weights / weights.sum(-1, keepdim=True).clamp(min=1e-6)).to(device)


def errors(got: torch.Tensor, ref: torch.Tensor) -> dict:
    got, ref = got.float(), ref.float()
    if not ref.numel():
        return {"max_err": 0.0, "max_ref": 0.0, "rel_l2": 0.0, "ok": got.shape == ref.shape}
    diff = got - ref
    out = {
        "max_err": diff.abs().max().item(),
        "max_ref": ref.abs().max().item(),
        "rel_l2": (diff.norm() / ref.norm().clamp(min=1e-30)).item(),
        "finite": bool(torch.isfinite(got).all()),
    }
    out["ok"] = (
        got.shape == ref.shape
        and out["finite"]
        and out["max_err"] <= MAX_ERR_OF_MAX * out["max_ref"]
        and out["rel_l2"] <= REL_L2
    )
    return out


def check_moe_decode(device, fmt, *, E, H, I, k, T, lora_r=0, config=None, hit=None, duplicates=False, seed=0):
    """moe_decode vs moe_decode_reference on random weights and routing: the errors dict (`ok`)."""
    gate_up = random_weights(fmt, E, H, 2 * I, lora_r, device, seed)
    down = random_weights(fmt, E, I, H, lora_r, device, seed + 1)
    hidden = torch.randn(T, H, generator=torch.Generator(device).manual_seed(seed + 2), device=device)
    hidden = hidden.to(torch.bfloat16)
    indices, weights = random_routing(T, k, E, device, seed + 3, hit, duplicates)
    got = md.moe_decode(hidden, indices, weights, gate_up, down, alpha=ALPHA, limit=LIMIT, config=config)
    ref = md.moe_decode_reference(hidden, indices, weights, gate_up, down, alpha=ALPHA, limit=LIMIT)
    result = errors(got, ref)
    result["ok"] = result["ok"] and got.dtype == hidden.dtype
    return result


def check_expert_rows(device, fmt, *, E, K, N, k, T, lora_r, config, epilogue, hit=None, seed=0):
    """One projection (epilogue "swiglu" | "row_weights" | "plain") vs expert_rows_reference."""
    weights = random_weights(fmt, E, K, N, lora_r, device, seed)
    x = torch.randn(T, K, generator=torch.Generator(device).manual_seed(seed + 1), device=device).to(torch.bfloat16)
    indices, row_weights = random_routing(T, k, E, device, seed + 2, hit)
    ids = indices.reshape(-1)
    kwargs = {"swiglu": (ALPHA, LIMIT)} if epilogue == "swiglu" else {}
    if epilogue == "row_weights":
        kwargs["row_weights"] = row_weights
    got = md.expert_rows(x, k, ids, md.route_plan(ids, E), weights, config, **kwargs)
    return errors(got, md.expert_rows_reference(x, k, ids, weights, **kwargs))


def check_route_plan(device, ids: torch.Tensor, E: int) -> bool:
    """route_plan == a stable sort by expert, groups in ascending expert order, empty groups at the end."""
    plan = md.route_plan(ids.to(device), E)
    ids = ids.reshape(-1).cpu()
    S = ids.numel()
    experts, counts = torch.unique(ids, return_counts=True)
    G = min(S, E)
    starts = torch.cat([torch.zeros(1, dtype=torch.long), counts.cumsum(0)])
    want_start = torch.cat([starts, torch.full((G - len(experts),), S)])
    want_expert = torch.cat([experts, torch.zeros(G - len(experts), dtype=torch.long)])
    return (
        plan.groups == G
        and torch.equal(plan.row_order.cpu().long(), torch.sort(ids, stable=True).indices)
        and torch.equal(plan.group_start.cpu().long(), want_start)
        and torch.equal(plan.group_expert.cpu().long(), want_expert)
    )


# shapes with partial tiles: inputs K = H = 160 (5 MXFP4 groups; FP8 scale blocks of 128 + 32) and K = I = 96
# against block_k 64 / 128 / 256; outputs 2I = 192 and H = 160 against block_n 64 (gemv: 160) and 128 (dot:
# both), the SwiGLU's 96 outputs against 64 per program
SMALL = {"E": 8, "H": 160, "I": 96, "k": 4}
CONFIGS = {
    "gemv": md.KernelConfig(block_m=1, block_n=64, block_k=64),
    "dot": md.KernelConfig(block_m=16, block_n=128, block_k=128),
}


def interpreter_cases():
    """(name, thunk -> bool) pairs run on CPU under TRITON_INTERPRET=1 (small: the interpreter is numpy)."""
    cases = [("plan", lambda: check_route_plan("cpu", torch.tensor([3, 1, 3, 0, 1, 3, 7, 1]), 8))]
    for fmt in md.DECODE_FORMATS:
        for name, config in CONFIGS.items():
            case = {"E": 6, "H": 160, "I": 96, "k": 3, "T": 5, "lora_r": 4, "config": config, "hit": 4,
                    "duplicates": True}  # fmt: skip
            cases.append((f"{fmt}-{name}", lambda fmt=fmt, case=case: check_moe_decode("cpu", fmt, **case)["ok"]))
    cases.append(("zero-rows", lambda: check_moe_decode("cpu", "mxfp4", E=6, H=160, I=96, k=3, T=0, lora_r=4)["ok"]))
    return cases


# ------------------------------------------------------------------------------------------- CPU
def grouped_module(fmt: str, dtype=torch.float64, E=6, H=64, I=32, r=4) -> moe.GroupedExperts:
    g = torch.Generator().manual_seed(5)
    module = moe.GroupedExperts.from_dense(
        torch.randn(E, H, 2 * I, generator=g) * H**-0.5,
        torch.randn(E, 2 * I, generator=g) * 0.1,
        torch.randn(E, I, H, generator=g) * I**-0.5,
        torch.randn(E, H, generator=g) * 0.1,
        fmt=fmt,
        alpha=ALPHA,
        limit=LIMIT,
    ).to(dtype)
    moe.add_expert_lora(module, r, 2 * r, list(moe.EXPERT_TARGETS))
    with torch.no_grad():
        for proj in moe.EXPERT_TARGETS:
            getattr(module, moe.lora_param_names(proj)[1]).normal_(0, 0.3, generator=g)
    return module.to(dtype)


@pytest.mark.parametrize("fmt", md.DECODE_FORMATS)
@pytest.mark.parametrize("duplicates", [False, True])
def test_reference_is_the_grouped_experts_function(fmt, duplicates):
    """moe_decode_reference on the module's own storage (decode_weights) == GroupedExperts.forward, float64:
    the kernels are checked against exactly the model's function."""
    module = grouped_module(fmt)
    hidden = torch.randn(7, 64, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    indices, weights = random_routing(7, 3, 6, "cpu", seed=2, hit=4, duplicates=duplicates)  # experts 4, 5 unhit
    weights = weights.double()
    with torch.no_grad():
        want = module(hidden, indices, weights)
        got = md.moe_decode_reference(hidden, indices, weights, module.decode_weights("gate_up_proj"),
                                      module.decode_weights("down_proj"), alpha=ALPHA, limit=LIMIT,
                                      dtype=torch.float64)  # fmt: skip
    torch.testing.assert_close(got, want, rtol=1e-10, atol=1e-10)


def test_the_lora_matters_in_the_reference():
    """A reference that dropped the LoRA term would still pass the test above if LoRA were inert."""
    module = grouped_module("mxfp4")
    hidden = torch.randn(3, 64, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    indices, weights = random_routing(3, 3, 6, "cpu", seed=2)
    gate_up, down = module.decode_weights("gate_up_proj"), module.decode_weights("down_proj")
    args = (hidden, indices, weights.double(), gate_up, down)
    with_lora = md.moe_decode_reference(*args, alpha=ALPHA, limit=LIMIT, dtype=torch.float64)
    gate_up0, down0 = (md.ExpertWeights(w.fmt, w.storage, w.bias, fp8_block=w.fp8_block) for w in (gate_up, down))
    without = md.moe_decode_reference(hidden, indices, weights.double(), gate_up0, down0, alpha=ALPHA, limit=LIMIT,
                                      dtype=torch.float64)  # fmt: skip
    assert (with_lora - without).abs().max() > 0.05 * with_lora.abs().max()


def test_cpu_modules_keep_the_grouped_path():
    module = grouped_module("mxfp4", dtype=torch.bfloat16)
    hidden = torch.randn(2, 64, dtype=torch.bfloat16)
    indices = torch.tensor([[0, 1, 2], [3, 4, 5]])
    with torch.no_grad():
        assert not module.decode_path_applies(hidden, indices)
    assert not md.moe_decode_supported("mxfp4", hidden)
    assert not md.triton_moe_decode_available(hidden)


def test_reference_of_no_rows():
    gate_up = random_weights("mxfp4", 4, 64, 64, 2, "cpu", 0)
    down = random_weights("mxfp4", 4, 32, 64, 2, "cpu", 1)
    out = md.moe_decode_reference(torch.zeros(0, 64), torch.zeros(0, 2, dtype=torch.long), torch.zeros(0, 2),
                                  gate_up, down, alpha=ALPHA, limit=LIMIT)  # fmt: skip
    assert out.shape == (0, 64)


@needs_triton
def test_kernels_under_the_triton_interpreter():
    run_under_interpreter(__file__, timeout=1200)


# ------------------------------------------------------------------------------------------- GPU
@pytest.mark.gpu
@gpu
@pytest.mark.parametrize("S", [1, 4, 13, 64, 256])
def test_route_plan_groups_rows_by_expert(S):
    g = torch.Generator().manual_seed(S)
    for E, high in ((32, 32), (32, 5), (8, 8)):  # all experts reachable, or only the first 5
        assert check_route_plan("cuda", torch.randint(0, high, (S,), generator=g), E), (S, E, high)


@pytest.mark.gpu
@gpu
def test_route_plan_of_no_rows():
    plan = md.route_plan(torch.zeros(0, dtype=torch.long, device="cuda"), 32)
    assert plan.groups == 0 and plan.group_start.tolist() == [0] and plan.row_order.numel() == 0


@pytest.mark.gpu
@gpu
@pytest.mark.parametrize("fmt", md.DECODE_FORMATS)
@pytest.mark.parametrize("config", list(CONFIGS))
@pytest.mark.parametrize("epilogue", ["swiglu", "row_weights"])
@pytest.mark.parametrize("T,hit", [(1, None), (17, None), (64, 6)])
def test_expert_rows_match_the_reference(fmt, config, epilogue, T, hit):
    """T = 17 puts 17+ rows on some expert: two M tiles of 16 (dot) or 17 one-row steps (gemv)."""
    E, H, I, k = SMALL["E"], SMALL["H"], SMALL["I"], SMALL["k"]
    K, N = (H, 2 * I) if epilogue == "swiglu" else (I, H)
    for lora_r in (0, 5):  # 5: a rank below the 16-wide tile (rank 16 in the moe_decode tests)
        result = check_expert_rows("cuda", fmt, E=E, K=K, N=N, k=k, T=T, lora_r=lora_r, config=CONFIGS[config],
                                   epilogue=epilogue, hit=hit)  # fmt: skip
        assert result["ok"], (lora_r, result)


@pytest.mark.gpu
@gpu
@pytest.mark.parametrize("fmt", md.DECODE_FORMATS)
@pytest.mark.parametrize("T,hit,duplicates", [(0, None, False), (1, None, False), (1, None, True), (5, 3, True),
                                              (16, None, False), (64, 5, False), (64, None, False)])  # fmt: skip
def test_moe_decode_matches_the_reference(fmt, T, hit, duplicates):
    """The default configs from 0 to 256 rows (T x k = 4), with the LoRA, few experts or all hit."""
    result = check_moe_decode("cuda", fmt, **SMALL, T=T, lora_r=16, hit=hit, duplicates=duplicates)
    assert result["ok"], result


@pytest.mark.gpu
@gpu
@pytest.mark.parametrize("fmt", md.DECODE_FORMATS)
def test_grouped_experts_take_the_decode_path_in_inference(fmt, monkeypatch):
    module = grouped_module(fmt, dtype=torch.bfloat16, E=8, H=160, I=96, r=8).cuda()
    calls = []
    real = moe.moe_decode
    monkeypatch.setattr(moe, "moe_decode", lambda *a, **kw: calls.append(1) or real(*a, **kw))
    for T in (1, 9, moe.DECODE_MAX_ROWS // 4):
        hidden = torch.randn(T, 160, device="cuda").to(torch.bfloat16)
        indices, weights = random_routing(T, 4, 8, "cuda", seed=T)
        with torch.no_grad():
            decoded = module(hidden, indices, weights)
        grouped = module(hidden, indices, weights)  # autograd on: the grouped path
        assert len(calls) == 1 and decoded.dtype == grouped.dtype
        assert errors(decoded, grouped.detach())["ok"], (T, errors(decoded, grouped.detach()))
        calls.clear()
    hidden = torch.randn(moe.DECODE_MAX_ROWS // 4 + 1, 160, device="cuda").to(torch.bfloat16)
    indices, weights = random_routing(hidden.shape[0], 4, 8, "cuda", seed=0)
    with torch.no_grad():
        module(hidden, indices, weights)
    assert not calls  # more rows than DECODE_MAX_ROWS: the grouped path


@pytest.mark.gpu
@gpu
def test_a_captured_graph_replays_the_eager_result():
    """The engine captures decode steps: no host sync, and replays on new inputs equal eager calls."""
    gate_up = random_weights("mxfp4", 8, 160, 192, 16, "cuda", 0)
    down = random_weights("mxfp4", 8, 96, 160, 16, "cuda", 1)
    hidden = torch.randn(16, 160, device="cuda").to(torch.bfloat16)
    indices, weights = random_routing(16, 4, 8, "cuda", seed=0)

    def step():
        return md.moe_decode(hidden, indices, weights, gate_up, down, alpha=ALPHA, limit=LIMIT)

    torch.cuda.synchronize()
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        step()  # compile outside the capture
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        out = step()
    new_indices, new_weights = random_routing(16, 4, 8, "cuda", seed=1, hit=3, duplicates=True)
    hidden.copy_(torch.randn(16, 160, device="cuda"))
    indices.copy_(new_indices)
    weights.copy_(new_weights)
    graph.replay()
    torch.cuda.synchronize()
    assert torch.equal(out, step())


# ---------------------------------------------------------------------------- interpreter entry point
def main() -> int:
    """Run interpreter_cases (TRITON_INTERPRET=1 set by the caller); exit status 1 if any fails."""
    failed = []
    for name, case in interpreter_cases():
        ok = case()
        print(f"{name}: {'ok' if ok else 'FAILED'}", flush=True)
        if not ok:
            failed.append(name)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
