"""How much of a LoRA update survives bf16: the tiny GPT-OSS trained from a zero B with AdamW, the same batch each
step, in float32 (the truth), in bf16 with moe.LORA_IN_GEMM_K (the experts' LoRA term summed in the GEMM's float32
accumulator before the output's one rounding) and in bf16 with the in-place update of the already-rounded expert
output (the reference path; PEFT adds its LoRA output the same way). With B near zero the LoRA term is under half
a bf16 step of the output and the in-place update drops it, so the loss falls slower than float32's.

    PYTHONPATH=$PWD/src python bench/lora_rounding.py --out lora_rounding.jsonl   # CPU, ~2 minutes
"""

from __future__ import annotations

import argparse

import torch
from records import emit

from rustforge.config import LoraConfig, ModelConfig
from rustforge.model import moe
from rustforge.model.gptoss import build_model

CASES = (("float32", False), ("bfloat16", True), ("bfloat16", False))  # (model dtype, LORA_IN_GEMM_K)


def packed_batch(seq: int, docs: int, vocab: int, seed: int = 0) -> dict:
    g = torch.Generator().manual_seed(seed)
    doc_len = seq // docs
    doc_ids = (torch.arange(seq) // doc_len).clamp(max=docs - 1)[None]
    input_ids = torch.randint(0, vocab, (1, seq), generator=g)
    labels = torch.roll(input_ids, -1, dims=1)
    labels[:, doc_len - 1 :: doc_len] = -100
    return {"input_ids": input_ids, "position_ids": (torch.arange(seq) - doc_ids[0] * doc_len)[None],
            "doc_ids": doc_ids, "labels": labels}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--steps", type=int, default=12)
    p.add_argument("--lr", type=float, default=1e-5)
    p.add_argument("--seq", type=int, default=512)
    p.add_argument("--out", default="lora_rounding.jsonl")
    args = p.parse_args()
    batch = packed_batch(args.seq, 4, 512)
    saved = moe.LORA_IN_GEMM_K
    for dtype, in_k in CASES:
        moe.LORA_IN_GEMM_K = in_k
        model = build_model(ModelConfig(preset="tiny", dtype=dtype), LoraConfig(r=16, alpha=32), vocab_size=512,
                            device="cpu")
        params = [q for q in model.parameters() if q.requires_grad]
        opt = torch.optim.AdamW(params, lr=args.lr)
        losses = []
        for _ in range(args.steps):
            loss = model(**batch).loss
            loss.backward()
            opt.step()
            opt.zero_grad(set_to_none=True)
            losses.append(round(float(loss.detach()), 5))
        emit(args.out, {"dtype": dtype, "lora_in_gemm_k": in_k, "lr": args.lr, "losses": losses,
                        "loss_fall": round(losses[0] - losses[-1], 5)})
    moe.LORA_IN_GEMM_K = saved


if __name__ == "__main__":
    main()
