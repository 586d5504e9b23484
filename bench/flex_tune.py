"""Flex attention with GPT-OSS sinks at the 20B shape: forward + backward time per kernel configuration.

One attention layer of GPT-OSS-20B (64 query heads, 8 KV heads, head_dim 64) over a packed batch of
`--docs` documents, for both layer types (full causal and the 128-token sliding window), timed through
model/attention.flex_attention_with_rope_and_sinks compiled as the model compiles it, with each
`kernel_options` candidate passed to flex_attention (dynamo is reset between candidates: session 4's
run compiled them all into one cache and its last candidate ran past the recompile limit, unfused). Prints and appends one JSON line per (options,
layer type): forward ms, forward + backward ms, and the largest difference from the default options'
output and gradients (a candidate must not change the result).

    PYTHONPATH=$PWD/src python bench/flex_tune.py --seq 4096 --out $OUT/flex_tune.jsonl
"""

from __future__ import annotations

import argparse
import time

import torch
from records import emit

from rustforge.model import attention

CANDIDATES = {  # fwd_/bwd_ prefixes apply an option to one direction only (torch's FlexKernelOptions)
    "default": {},
    "fwd64x64": {"fwd_BLOCK_M": 64, "fwd_BLOCK_N": 64},
    "fwd64x64_w4": {"fwd_BLOCK_M": 64, "fwd_BLOCK_N": 64, "fwd_num_warps": 4},
    "fwd64x64_s3": {"fwd_BLOCK_M": 64, "fwd_BLOCK_N": 64, "fwd_num_stages": 3},
    "fwd128x64_w8": {"fwd_BLOCK_M": 128, "fwd_BLOCK_N": 64, "fwd_num_warps": 8},
    "fwd64x128": {"fwd_BLOCK_M": 64, "fwd_BLOCK_N": 128},
    "contiguous": {"BLOCKS_ARE_CONTIGUOUS": True},
    "fwd64x64_contiguous": {"fwd_BLOCK_M": 64, "fwd_BLOCK_N": 64, "BLOCKS_ARE_CONTIGUOUS": True},
    "tma": {"USE_TMA": True},
    "bwd32x64": {"bwd_BLOCK_M1": 32, "bwd_BLOCK_N1": 64, "bwd_BLOCK_M2": 64, "bwd_BLOCK_N2": 32},
    "bwd64x64": {"bwd_BLOCK_M1": 64, "bwd_BLOCK_N1": 64, "bwd_BLOCK_M2": 64, "bwd_BLOCK_N2": 64},
    "bwd64x128": {"bwd_BLOCK_M1": 64, "bwd_BLOCK_N1": 128, "bwd_BLOCK_M2": 128, "bwd_BLOCK_N2": 64},
    "bwd_w4": {"bwd_num_warps": 4},
    # session 5: the forward at 64x64 (attention.FLEX_KERNEL_OPTIONS) with backward candidates
    "f64_bwd32x64": {"fwd_BLOCK_M": 64, "fwd_BLOCK_N": 64, "bwd_BLOCK_M1": 32, "bwd_BLOCK_N1": 64, "bwd_BLOCK_M2": 64,
                     "bwd_BLOCK_N2": 32},
    "f64_bwd_w4": {"fwd_BLOCK_M": 64, "fwd_BLOCK_N": 64, "bwd_num_warps": 4},
    "f64_bwd_w8": {"fwd_BLOCK_M": 64, "fwd_BLOCK_N": 64, "bwd_num_warps": 8},
    "f64_bwd_s2": {"fwd_BLOCK_M": 64, "fwd_BLOCK_N": 64, "bwd_num_stages": 2},
    "f64_bwd64x128": {"fwd_BLOCK_M": 64, "fwd_BLOCK_N": 64, "bwd_BLOCK_M1": 64, "bwd_BLOCK_N1": 128,
                      "bwd_BLOCK_M2": 128, "bwd_BLOCK_N2": 64},
    "f64_bwd32x128": {"fwd_BLOCK_M": 64, "fwd_BLOCK_N": 64, "bwd_BLOCK_M1": 32, "bwd_BLOCK_N1": 128,
                      "bwd_BLOCK_M2": 128, "bwd_BLOCK_N2": 32},
}


def make_inputs(seq: int, docs: int, device):
    g = torch.Generator(device="cpu").manual_seed(0)
    q = torch.randn(1, 64, seq, 64, generator=g).to(device, torch.bfloat16).requires_grad_()
    k = torch.randn(1, 8, seq, 64, generator=g).to(device, torch.bfloat16).requires_grad_()
    v = torch.randn(1, 8, seq, 64, generator=g).to(device, torch.bfloat16).requires_grad_()
    sinks = torch.randn(64, generator=g).to(device, torch.bfloat16).requires_grad_()
    return (q, k, v, sinks, *packed_rope_and_documents(seq, docs, device))


def packed_rope_and_documents(seq: int, docs: int, device):
    """RoPE tables (cos, sin [1, seq, 32] bf16; positions restart per document) and doc_ids [1, seq] of a row of
    `docs` equal documents: the attention benchmarks' packed batch."""
    pos = torch.arange(seq) % (seq // docs)
    inv_freq = 1.0 / (150000 ** (torch.arange(0, 64, 2).float() / 64))
    freqs = pos[:, None].float() * inv_freq[None]
    cos, sin = freqs.cos()[None].to(device, torch.bfloat16), freqs.sin()[None].to(device, torch.bfloat16)
    doc_ids = (torch.arange(seq) // (seq // docs)).clamp(max=docs - 1)[None].to(device)
    return cos, sin, doc_ids


def run(fn, q, k, v, sinks, cos, sin, mask, grad):
    for t in (q, k, v, sinks):
        t.grad = None
    out = fn(q, k, v, cos, sin, mask, sinks, 0.125)
    out.backward(grad)
    return out.detach(), [t.grad.clone() for t in (q, k, v, sinks)]


def time_ms(thunk, iters: int) -> float:
    thunk()
    torch.cuda.synchronize()
    start = time.perf_counter()
    for _ in range(iters):
        thunk()
    torch.cuda.synchronize()
    return (time.perf_counter() - start) / iters * 1e3


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--seq", type=int, default=4096)
    p.add_argument("--docs", type=int, default=4)
    p.add_argument("--iters", type=int, default=20)
    p.add_argument("--only", nargs="*", default=list(CANDIDATES))
    p.add_argument("--out", default="flex_tune.jsonl")
    args = p.parse_args()
    device = torch.device("cuda")
    q, k, v, sinks, cos, sin, doc_ids = make_inputs(args.seq, args.docs, device)
    masks = attention.build_attention_masks(doc_ids, 128, "flex")
    grad = torch.randn(1, args.seq, 64, 64, device=device, dtype=torch.bfloat16)
    reference = {}
    for name in args.only:
        options = CANDIDATES[name]

        def attend(q_, k_, v_, cos_, sin_, mask_, sinks_, scale_, options=options):
            cos_, sin_ = cos_.unsqueeze(1), sin_.unsqueeze(1)
            q_, k_ = attention.rotate_half_pairs(q_, cos_, sin_), attention.rotate_half_pairs(k_, cos_, sin_)
            from torch.nn.attention.flex_attention import AuxRequest, flex_attention

            out, aux = flex_attention(q_, k_, v_, block_mask=mask_, scale=scale_, enable_gqa=True,
                                      return_aux=AuxRequest(lse=True), kernel_options=options or None)
            return attention.apply_sinks(out, aux.lse, sinks_).transpose(1, 2).contiguous()

        torch._dynamo.reset()  # each candidate its own compile: past recompile_limit dynamo runs flex unfused
        compiled = torch.compile(attend, dynamic=False)
        for layer_type, mask in masks.items():
            rec = {"options": name, "kernel_options": options, "layer": layer_type, "seq": args.seq, "docs": args.docs}
            try:
                out, grads = run(compiled, q, k, v, sinks, cos, sin, mask, grad)
                if name == "default":
                    reference[layer_type] = (out, grads)
                ref_out, ref_grads = reference.get(layer_type, (out, grads))
                rec["max_diff"] = max(float((a.float() - b.float()).abs().max()) for a, b in
                                      zip((out, *grads), (ref_out, *ref_grads)))
                with torch.no_grad():
                    rec["fwd_ms"] = time_ms(lambda: compiled(q, k, v, cos, sin, mask, sinks, 0.125), args.iters)
                rec["fwd_bwd_ms"] = time_ms(lambda: run(compiled, q, k, v, sinks, cos, sin, mask, grad), args.iters)
            except Exception as e:  # a configuration the kernel rejects is a result too
                rec["error"] = f"{type(e).__name__}: {str(e)[:300]}"
            emit(args.out, rec)


if __name__ == "__main__":
    main()
