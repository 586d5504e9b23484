"""The expert GEMMs of one GPT-OSS-20B training step, one shape at a time: where do the grouped GEMMs lose time?

For the 4K step's token-expert rows (4096 tokens x top-4 = 16384 rows over 32 experts) this times each
grouped GEMM the MoE layer issues (model/moe.py) with torch's grouped_mm, in both weight layouts
([E, in, out] as transformers stores bf16 experts, and the transposed view of [E, out, in] that the
dequantisers write), with and without LoRA's A factor appended to the frozen weight as extra output
columns (`+ext`: y and x @ A from one GEMM), with LoRA's B factor appended to it as extra *input* rows (`+kext`:
x @ A appended to x as `--kpad` extra columns, so that one GEMM gives x @ W + (x @ A) @ B and its backward
g @ [W; B]^T gives the LoRA gradient g @ B^T as extra output columns -- the in-place low-rank update and the
skinny g @ B^T GEMM it would remove are timed too, `lora update ...`), and the LoRA-sized GEMMs on their own (on the GPU the weight gradients also
with model/triton_expert_lora.py's kernel, the `... triton` cases). Group sizes come from
a balanced and a skewed routing. Prints and appends one JSON line per case: ms and TFLOP/s.

    PYTHONPATH=$PWD/src python bench/grouped_mm_shapes.py --out $OUT/grouped_mm.jsonl
    PYTHONPATH=$PWD/src python bench/grouped_mm_shapes.py --device cpu --rows 256 --hidden 128 --inter 128  # smoke
"""

from __future__ import annotations

import argparse
import time

import torch
from records import emit

from rustforge.model.moe import grouped_mm
from rustforge.model.triton_dequant import triton_kernels_available
from rustforge.model.triton_expert_lora import expert_transposed_product
from rustforge.model.triton_moe_train import low_rank_update_


def group_offsets(rows: int, experts: int, skew: float, device) -> torch.Tensor:
    """Cumulative int32 offsets of `rows` rows drawn over `experts` (skew 0: uniform; >0: Dirichlet-skewed)."""
    g = torch.Generator().manual_seed(0)
    if skew > 0:
        probs = torch.distributions.Dirichlet(torch.full((experts,), 1.0 / skew)).sample()
    else:
        probs = torch.full((experts,), 1.0 / experts)
    ids = torch.multinomial(probs, rows, replacement=True, generator=g)
    counts = torch.bincount(ids, minlength=experts)
    return torch.cumsum(counts, 0).to(torch.int32).to(device)


def time_ms(fn, iters: int, device) -> float:
    fn()
    if device.type == "cuda":
        torch.cuda.synchronize()
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        for _ in range(iters):
            fn()
        end.record()
        torch.cuda.synchronize()
        return start.elapsed_time(end) / iters
    t0 = time.perf_counter()
    for _ in range(iters):
        fn()
    return (time.perf_counter() - t0) / iters * 1e3


def weight(experts: int, k: int, n: int, layout: str, device, dtype) -> torch.Tensor:
    """[E, k, n] in the given memory layout: 'in_out' contiguous, 'out_in' a transposed view of [E, n, k]."""
    if layout == "in_out":
        return torch.randn(experts, k, n, device=device, dtype=dtype) * 0.02
    return (torch.randn(experts, n, k, device=device, dtype=dtype) * 0.02).transpose(1, 2)


def cases(args, device, dtype):
    H, I2, E, r = args.hidden, 2 * args.inter, args.experts, args.pad_rank
    for skew in (0.0, 1.0):
        offs = group_offsets(args.rows, E, skew, device)
        S = args.rows
        x = torch.randn(S, H, device=device, dtype=dtype)
        h = torch.randn(S, I2 // 2, device=device, dtype=dtype)
        g_up = torch.randn(S, I2, device=device, dtype=dtype)
        g_down = torch.randn(S, H, device=device, dtype=dtype)
        tag = {"skew": skew, "max_group": int(torch.diff(offs, prepend=offs.new_zeros(1)).max())}
        for layout in ("in_out", "out_in"):
            for ext in (0, r):
                w_up = weight(E, H, I2 + ext, layout, device, dtype)
                w_down = weight(E, I2 // 2, H + ext, layout, device, dtype)
                g_up_ext = torch.randn(S, I2 + ext, device=device, dtype=dtype)
                g_down_ext = torch.randn(S, H + ext, device=device, dtype=dtype)
                name = f"{layout}{'+ext' if ext else ''}"
                yield dict(tag, case=f"gate_up_fwd {name}", flops=2 * S * H * (I2 + ext)), lambda: grouped_mm(x, w_up, offs)
                yield dict(tag, case=f"down_fwd {name}", flops=2 * S * (I2 // 2) * (H + ext)), lambda: grouped_mm(h, w_down, offs)
                yield (dict(tag, case=f"gate_up_bwd {name}", flops=2 * S * H * (I2 + ext)),
                       lambda: grouped_mm(g_up_ext, w_up.transpose(1, 2), offs))
                yield (dict(tag, case=f"down_bwd {name}", flops=2 * S * (I2 // 2) * (H + ext)),
                       lambda: grouped_mm(g_down_ext, w_down.transpose(1, 2), offs))
        kp = args.kpad  # session 6's proposal: K padded to a multiple of 64 (2880 + 64 = 2944 = 23 x 128)
        for layout in ("in_out", "out_in"):
            w_up = weight(E, H + kp, I2, layout, device, dtype)
            w_down = weight(E, I2 // 2 + kp, H, layout, device, dtype)
            x_k, h_k = torch.randn(S, H + kp, device=device, dtype=dtype), torch.randn(S, I2 // 2 + kp, device=device, dtype=dtype)
            name = f"{layout}+kext"
            yield dict(tag, case=f"gate_up_fwd {name}", flops=2 * S * (H + kp) * I2), lambda: grouped_mm(x_k, w_up, offs)
            yield dict(tag, case=f"down_fwd {name}", flops=2 * S * (I2 // 2 + kp) * H), lambda: grouped_mm(h_k, w_down, offs)
            yield (dict(tag, case=f"gate_up_bwd {name}", flops=2 * S * (H + kp) * I2),
                   lambda: grouped_mm(g_up, w_up.transpose(1, 2), offs))
            yield (dict(tag, case=f"down_bwd {name}", flops=2 * S * (I2 // 2 + kp) * H),
                   lambda: grouped_mm(g_down, w_down.transpose(1, 2), offs))
        if triton_kernels_available(x):  # what +kext would remove: the in-place updates of y (forward)
            expert_of_row = torch.repeat_interleave(torch.arange(E, device=device, dtype=torch.int32),
                                                    torch.diff(offs, prepend=offs.new_zeros(1)).long())
            u = torch.randn(S, r, device=device, dtype=dtype)
            y_up, y_down = torch.randn(S, I2, device=device, dtype=dtype), torch.randn(S, H, device=device, dtype=dtype)
            b_up_r, b_down_r = (torch.randn(E, r, n, device=device, dtype=dtype) * 0.01 for n in (I2, H))
            yield (dict(tag, case="lora update y += u @ B (gate_up)", flops=2 * S * r * I2),
                   lambda: low_rank_update_(y_up, u, b_up_r, expert_of_row))
            yield (dict(tag, case="lora update y += u @ B (down)", flops=2 * S * r * H),
                   lambda: low_rank_update_(y_down, u, b_down_r, expert_of_row))
        a_up = torch.randn(E, H, r, device=device, dtype=dtype)
        b_up = torch.randn(E, r, I2, device=device, dtype=dtype)
        xa = torch.randn(S, r, device=device, dtype=dtype)
        yield dict(tag, case="lora x@A (gate_up)", flops=2 * S * H * r), lambda: grouped_mm(x, a_up, offs)
        yield dict(tag, case="lora g@B^T (gate_up)", flops=2 * S * I2 * r), lambda: grouped_mm(g_up, b_up.transpose(1, 2), offs)
        yield dict(tag, case="lora x^T@gxa (grad A)", flops=2 * S * H * r), lambda: grouped_mm(x.t(), xa, offs)
        yield dict(tag, case="lora xa^T@g (grad B)", flops=2 * S * I2 * r), lambda: grouped_mm(xa.t(), g_up, offs)
        if triton_kernels_available(x):  # the weight gradients with model/triton_expert_lora.py's kernel
            yield (dict(tag, case="lora x^T@gxa (grad A) triton", flops=2 * S * H * r),
                   lambda: expert_transposed_product(x, xa, offs))
            yield (dict(tag, case="lora xa^T@g (grad B) triton", flops=2 * S * I2 * r),
                   lambda: expert_transposed_product(g_up, xa, offs).transpose(1, 2))


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--rows", type=int, default=16384)
    p.add_argument("--hidden", type=int, default=2880)
    p.add_argument("--inter", type=int, default=2880)
    p.add_argument("--experts", type=int, default=32)
    p.add_argument("--pad-rank", type=int, default=24, help="LoRA rank + bias column, padded (moe._padded_rank(16))")
    p.add_argument("--kpad", type=int, default=64, help="extra input rows/columns of the +kext cases")
    p.add_argument("--iters", type=int, default=20)
    p.add_argument("--device", default="cuda")
    p.add_argument("--out", default="grouped_mm.jsonl")
    args = p.parse_args()
    device = torch.device(args.device)
    dtype = torch.bfloat16
    for rec, fn in cases(args, device, dtype):
        flops = rec.pop("flops")
        try:
            ms = time_ms(fn, args.iters, device)
            rec.update(ms=round(ms, 4), tflops=round(flops / ms / 1e9, 1))
        except Exception as e:  # a layout the kernel rejects is a result too
            rec["error"] = f"{type(e).__name__}: {str(e)[:300]}"
        emit(args.out, rec)


if __name__ == "__main__":
    main()
