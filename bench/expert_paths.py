"""The grouped experts' LoRA paths at GPT-OSS-20B's expert shape against a float32 reference: one step's output
and gradients, then a few AdamW steps.

Paths, all with bf16 weights: `torch` (moe.FUSED_KERNELS off: grouped_mm and torch ops), `fused` (the Triton
SwiGLU / routing-sum / low-rank-update / LoRA-gradient kernels, the default), `gemm_k` (fused + moe.LORA_IN_GEMM_K:
the LoRA term and the bias as 64 extra K of the frozen GEMM). The reference is the torch path on a float32 copy.
Errors are relative Frobenius norms (||got - want|| / ||want||: a bf16 path sits near 4e-3) and max-relative
(max |got - want| / max |want|: one clamp decision that bf16 rounding flips moves a gate_up gradient element by up
to ~9, so this one is noisy at this shape). The AdamW part trains each path's LoRA on the same fixed batch for
`--steps` steps (loss = <out, g>) and prints each path's distance from the float32 reference's LoRA weights: a
path whose gradients were biased would drift away, while rounding keeps all bf16 paths about equally near.

    PYTHONPATH=$PWD/src python bench/expert_paths.py --out $OUT/expert_paths.jsonl
"""

from __future__ import annotations

import argparse
import copy

import torch
from records import emit

from rustforge.model import moe

PATHS = {"torch": (False, False), "fused": (True, False), "gemm_k": (True, True)}  # (FUSED_KERNELS, LORA_IN_GEMM_K)


def make_module(experts: int, hidden: int, inter: int, rank: int):
    g = torch.Generator().manual_seed(0)
    shrink = hidden ** -0.5 * 8  # pre-activations of a few units: the clamp at 7 is hit now and then
    module = moe.GroupedExperts.from_dense(torch.randn(experts, hidden, 2 * inter, generator=g) * 0.3 * shrink,
                                           torch.randn(experts, 2 * inter, generator=g) * 0.5,
                                           torch.randn(experts, inter, hidden, generator=g) * 0.1 * shrink,
                                           torch.randn(experts, hidden, generator=g) * 0.5, fmt="bf16", alpha=1.702,
                                           limit=7.0)
    moe.add_expert_lora(module, r=rank, alpha=2 * rank, targets=moe.EXPERT_TARGETS)
    with torch.no_grad():
        for p in module.lora_parameters():
            p.copy_(torch.randn(p.shape, generator=g) * 0.1 * shrink)
    return module


def step(module, x, indices, weights, grad_out):
    xs, ws = x.clone().requires_grad_(True), weights.clone().requires_grad_(True)
    for p in module.lora_parameters():
        p.grad = None
    out = module(xs, indices, ws)
    out.backward(grad_out.to(out.dtype))
    return {"out": out.detach(), "x": xs.grad, "w": ws.grad,
            **{f"lora{i}": p.grad.clone() for i, p in enumerate(module.lora_parameters())}}


def errors(got: dict, want: dict) -> dict:
    rec = {}
    for k in want:
        a, b = got[k].double(), want[k].double()
        rec[k] = {"fro": round(float((a - b).norm() / b.norm()), 5),
                  "max": round(float((a - b).abs().max() / b.abs().max()), 5)}
    return rec


def train(module, x, indices, weights, grad_out, steps: int, lr: float):
    opt = torch.optim.AdamW(module.lora_parameters(), lr=lr)
    for _ in range(steps):
        step(module, x, indices, weights, grad_out)
        opt.step()
    return [p.detach().double().clone() for p in module.lora_parameters()]


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--experts", type=int, default=32)
    p.add_argument("--hidden", type=int, default=2880)
    p.add_argument("--inter", type=int, default=2880)
    p.add_argument("--rank", type=int, default=16)
    p.add_argument("--tokens", type=int, default=4096)
    p.add_argument("--top-k", type=int, default=4)
    p.add_argument("--steps", type=int, default=6)
    p.add_argument("--lr", type=float, default=1e-4)
    p.add_argument("--out", default="expert_paths.jsonl")
    p.add_argument("--device", default="cuda")
    args = p.parse_args()
    device = torch.device(args.device)
    base = make_module(args.experts, args.hidden, args.inter, args.rank)
    g = torch.Generator().manual_seed(5)
    indices = torch.stack([torch.randperm(args.experts, generator=g)[: args.top_k] for _ in range(args.tokens)])
    weights = torch.softmax(torch.randn(args.tokens, args.top_k, generator=g), dim=-1)
    x = torch.randn(args.tokens, args.hidden, generator=g)
    grad_out = torch.randn(args.tokens, args.hidden, generator=g)
    inputs = [t.to(device) for t in (x, indices, weights, grad_out)]
    saved = moe.FUSED_KERNELS, moe.LORA_IN_GEMM_K
    moe.FUSED_KERNELS, moe.LORA_IN_GEMM_K = False, False
    reference = copy.deepcopy(base).to(device=device, dtype=torch.float32)
    want = step(reference, *inputs)
    want_weights = train(reference, *inputs, args.steps, args.lr)
    shape = {"experts": args.experts, "hidden": args.hidden, "inter": args.inter, "rank": args.rank,
             "tokens": args.tokens, "top_k": args.top_k}
    for name, (fused, gemm_k) in PATHS.items():
        moe.FUSED_KERNELS, moe.LORA_IN_GEMM_K = fused, gemm_k
        module = copy.deepcopy(base).to(device=device, dtype=torch.bfloat16)
        for param in module.lora_parameters():  # float32 masters, as the model keeps them (add_expert_lora)
            param.data = param.data.float()
        bf16_inputs = [inputs[0].bfloat16(), inputs[1], inputs[2].bfloat16(), inputs[3]]
        rec = {"path": name, **shape, "one_step": errors(step(module, *bf16_inputs), want)}
        trained = train(module, *bf16_inputs, args.steps, args.lr)
        rec["after_steps"] = args.steps
        rec["lora_weights_vs_fp32"] = [round(float((a - b).norm() / b.norm()), 6) for a, b in zip(trained, want_weights)]
        emit(args.out, rec)
    moe.FUSED_KERNELS, moe.LORA_IN_GEMM_K = saved  # (True, True) by default since session 7


if __name__ == "__main__":
    main()
