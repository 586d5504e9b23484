"""One GPT-OSS-20B attention layer (64 query heads, 8 KV heads, head dim 64, RoPE, sinks) over a packed row of
`--docs` documents: flex attention (the model's compiled flex path, attention.flex_attention_with_rope_and_sinks)
against model/triton_attention.py (attention.triton_attention_with_rope_and_sinks) with candidate block
configurations, for both layer types (full causal, the 128-token window).

Each case's forward and forward + backward are timed as the profiler's GPU kernel time over `--iters` calls, not
the host's launch time (flex_tune.py's were host-bound). Every Triton candidate's
output and gradients are compared with flex's (max abs difference; bf16 rounding expected, ~1e-2).

    PYTHONPATH=$PWD/src python bench/attention_kernels.py --seq 4096 --docs 4 --out $OUT/attention_kernels.jsonl
"""

from __future__ import annotations

import argparse

import torch
from flex_tune import packed_rope_and_documents
from records import emit

from rustforge.model import attention
from rustforge.model import triton_attention as ta

# (forward blocks, backward blocks): (BLOCK_M, BLOCK_N, num_warps, num_stages) each
CANDIDATES = {
    "default": (ta.FORWARD_BLOCKS, ta.BACKWARD_BLOCKS),
    "f128x64_w4": ((128, 64, 4, 3), ta.BACKWARD_BLOCKS),  # session 7's first forward blocks
    "f128x64_w8": ((128, 64, 8, 3), ta.BACKWARD_BLOCKS),
    "f128x128_w8": ((128, 128, 8, 3), ta.BACKWARD_BLOCKS),
    "f64x128_w4": ((64, 128, 4, 3), ta.BACKWARD_BLOCKS),
    "b64x64_s2": (ta.FORWARD_BLOCKS, (64, 64, 4, 2)),
    "b32x64_w4": (ta.FORWARD_BLOCKS, (32, 64, 4, 3)),
    "b64x128_w8": (ta.FORWARD_BLOCKS, (64, 128, 8, 3)),
    "b128x64_w8": (ta.FORWARD_BLOCKS, (128, 64, 8, 3)),
    "b128x128_w8": (ta.FORWARD_BLOCKS, (128, 128, 8, 2)),
    "b32x32_w4": (ta.FORWARD_BLOCKS, (32, 32, 4, 3)),
    # the default blocks with triton_attention.UNMASKED_INTERIOR on (mask arithmetic only on edge blocks)
    "unmasked_interior": (ta.FORWARD_BLOCKS, ta.BACKWARD_BLOCKS),
}
UNMASKED_CANDIDATES = {"unmasked_interior"}


def make_inputs(seq: int, docs: int, device):
    g = torch.Generator(device="cpu").manual_seed(0)
    q, k, v = (torch.randn(1, seq, heads, 64, generator=g).to(device, torch.bfloat16).requires_grad_()
               for heads in (64, 8, 8))
    sinks = torch.randn(64, generator=g).to(device, torch.float32).requires_grad_()
    cos, sin, doc_ids = packed_rope_and_documents(seq, docs, device)
    grad = torch.randn(1, seq, 64, 64, generator=g).to(device, torch.bfloat16)
    return (q, k, v, sinks), cos, sin, doc_ids, grad


def kernel_ms(thunk, iters: int) -> tuple[float, dict]:
    """GPU kernel time of one `thunk()` call (the profiler's device time over `iters` calls, / iters) and the
    largest kernels' shares: the host's launch time does not count (flex_tune.py's wall-clock figures were
    host-bound; a CUDA graph of autograd.grad did not capture here, run 19)."""
    thunk()
    torch.cuda.synchronize()
    activities = [torch.profiler.ProfilerActivity.CUDA]
    with torch.profiler.profile(activities=activities) as prof:
        for _ in range(iters):
            thunk()
        torch.cuda.synchronize()
    kernels = {e.key: e.self_device_time_total / iters / 1e3 for e in prof.key_averages() if e.self_device_time_total > 0}
    top = dict(sorted(kernels.items(), key=lambda kv: -kv[1])[:5])
    return sum(kernels.values()), {k[:80]: round(v, 4) for k, v in top.items()}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--seq", type=int, default=4096)
    p.add_argument("--docs", type=int, default=4)
    p.add_argument("--iters", type=int, default=10)
    p.add_argument("--only", nargs="*", default=list(CANDIDATES))
    p.add_argument("--out", default="attention_kernels.jsonl")
    args = p.parse_args()
    device = torch.device("cuda")
    leaves, cos, sin, doc_ids, grad = make_inputs(args.seq, args.docs, device)
    flex_masks = attention.build_attention_masks(doc_ids, 128, "flex")
    spans = attention.build_attention_masks(doc_ids, 128, "triton")
    flex = attention._compiled_on_gpu(attention.flex_attention_with_rope_and_sinks, device)
    # 4 documents of 1024: full layers ~34 GFLOP forward (causal), sliding (window 128) ~8.1; backward 2.5x
    flop_fwd = {"full_attention": 0.0, "sliding_attention": 0.0}
    per_doc = args.seq // args.docs
    for layer_type, window in (("full_attention", per_doc), ("sliding_attention", 128)):
        pairs = sum(min(i + 1, window) for i in range(per_doc)) * args.docs
        flop_fwd[layer_type] = 4 * pairs * 64 * 64

    def cases():
        for layer_type in flex_masks:
            yield "flex", layer_type, (lambda *a, m=flex_masks[layer_type]: flex(*a[:5], m, *a[5:]))
        for name in args.only:
            blocks = CANDIDATES[name]
            for layer_type in spans:
                def attend(q, k, v, cos_, sin_, sinks, scale, s=spans[layer_type], blocks=blocks):
                    query, key = attention._compiled_on_gpu(attention.rope_qk, device)(q, k, cos_, sin_)
                    return ta.packed_sink_attention(query, key, v, sinks, s.starts, s.ends, s.window, scale, blocks)
                yield name, layer_type, attend

    reference = {}
    for name, layer_type, fn in cases():
        rec = {"case": name, "layer": layer_type, "seq": args.seq, "docs": args.docs,
               "blocks": None if name == "flex" else CANDIDATES[name]}
        ta.UNMASKED_INTERIOR = name in UNMASKED_CANDIDATES
        rec["unmasked_interior"] = ta.UNMASKED_INTERIOR
        try:
            for t in leaves:
                t.grad = None
            out = fn(*leaves[:3], cos, sin, leaves[3], 0.125)
            grads = torch.autograd.grad(out, leaves, grad)
            result = [out.detach(), *grads]
            if name == "flex":
                reference[layer_type] = result
            else:
                rec["max_diff_vs_flex"] = [round(float((a.float() - b.float()).abs().max()), 5)
                                           for a, b in zip(result, reference[layer_type])]
            with torch.no_grad():
                rec["fwd_ms"], rec["fwd_kernels"] = kernel_ms(lambda: fn(*leaves[:3], cos, sin, leaves[3], 0.125),
                                                              args.iters)
            rec["fwd_bwd_ms"], rec["fwd_bwd_kernels"] = kernel_ms(
                lambda: torch.autograd.grad(fn(*leaves[:3], cos, sin, leaves[3], 0.125), leaves, grad), args.iters)
            rec["fwd_tflops"] = round(flop_fwd[layer_type] / rec["fwd_ms"] / 1e9, 1)
            rec["bwd_tflops"] = round(2.5 * flop_fwd[layer_type] / (rec["fwd_bwd_ms"] - rec["fwd_ms"]) / 1e9, 1)
        except Exception as e:  # a configuration the kernel rejects is a result too
            rec["error"] = f"{type(e).__name__}: {str(e)[:300]}"
        emit(args.out, rec)


if __name__ == "__main__":
    main()
