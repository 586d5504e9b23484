"""FSDP2 scaling: training tokens/s of the GPT-OSS-20B shape at 16K tokens on 1 and 2 GPUs (issue #11).

Weak scaling: every rank trains one packed 16K sequence per step (the global batch grows with the world
size), LoRA r16 on q/k/v/o + experts, the SFT loop's step as train/sft.py runs it under torchrun
(train/distributed.py: fully_shard per decoder layer and the body, loss x world size since FSDP averages
gradients, clip_grad_norm_ on the sharded gradients, AdamW). tokens/s = world x seq_len / step time.
With MXFP4 experts the expert storage is buffers, which FSDP2 does not shard (each GPU keeps all of it);
with bf16 experts the expert weights are parameters and are sharded -- run both.

On the x2 machine (nvidia-h200-x2 / nvidia-h100-x2), the whole measurement:

    PYTHONPATH=$PWD/src python bench/fsdp_scaling.py --out $OUT/fsdp_scaling.jsonl

(= --worlds 1,2 --fmts mxfp4,bf16 --seq 16384; each (fmt, world) is a fresh `torch.distributed.run
--standalone --nproc-per-node W` launch with NCCL_NVLS_ENABLE=0, so each starts on empty GPUs; OOM and
crashes become JSON lines with status "oom"/"error" instead of stopping the plan). CPU smoke test:

    python bench/fsdp_scaling.py --shape tiny --device cpu --seq 256 --fmts bf16,mxfp4 --dtype bfloat16 --iters 2 --out /tmp/fsdp.jsonl

(bf16 on the CPU: the GPU's mix of bf16 base and fp32 LoRA in one FSDP all-gather, over gloo).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
import traceback
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "src"))


def _emit(path: str, rec: dict) -> None:
    with open(path, "a") as f:
        f.write(json.dumps(rec) + "\n")
    print(json.dumps(rec), flush=True)


def packed_batch(seq_len: int, vocab: int, n_docs: int, seed: int, device) -> dict:
    """Random tokens in n_docs equal documents (positions restart, labels never cross documents)."""
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, vocab, (1, seq_len), generator=g)
    doc_ids = (torch.arange(seq_len) // (seq_len // n_docs)).clamp(max=n_docs - 1)[None]
    starts = torch.searchsorted(doc_ids[0], doc_ids[0], right=False)
    labels = torch.cat([ids[:, 1:], torch.full((1, 1), -100)], 1)
    labels[:, :-1][doc_ids[:, 1:] != doc_ids[:, :-1]] = -100
    batch = {"input_ids": ids, "position_ids": (torch.arange(seq_len) - starts)[None], "doc_ids": doc_ids, "labels": labels}
    return {k: v.to(device) for k, v in batch.items()}


# ------------------------------------------------------------------------------------------ worker
def worker(args) -> None:
    from rustforge.config import LoraConfig, ModelConfig
    from rustforge.model.gptoss import build_model
    from rustforge.train import distributed

    ctx = distributed.init_distributed()
    device = ctx.device if args.device == "cuda" else torch.device("cpu")
    if device.type == "cuda" and not ctx.enabled:
        device = torch.device("cuda", torch.cuda.current_device())
    rec = {"bench": "fsdp_scaling", "shape": args.shape, "fmt": args.fmt, "world_size": ctx.world_size,
           "seq_len": args.seq, "device": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"}  # fmt: skip
    try:
        mcfg = ModelConfig(
            preset=args.shape,
            attention="flex" if device.type == "cuda" else "eager",
            experts="grouped",
            expert_format=args.fmt,
            dtype=args.dtype if args.dtype != "auto" else ("bfloat16" if device.type == "cuda" else "float32"),
            gradient_checkpointing=not args.no_ckpt,
            loss_chunk_size=min(args.seq, 4096),
        )
        model = build_model(mcfg, LoraConfig(r=16, alpha=32), device=device)
        if ctx.enabled:
            distributed.shard_model(model, ctx)
        params = [p for p in model.parameters() if p.requires_grad]
        opt = torch.optim.AdamW(params, lr=1e-5, foreach=False)
        batch = packed_batch(args.seq, model.config.vocab_size, args.docs, seed=ctx.rank, device=device)
        n_tokens = ctx.all_reduce_sum([float((batch["labels"] != -100).sum())])[0]
        times, losses = [], []
        for i in range(args.warmup + args.iters):
            _sync(device)
            t0 = time.perf_counter()
            with torch.autocast(device.type, dtype=torch.bfloat16, enabled=device.type == "cuda"):
                out = model(**batch)
            loss = out.ce_sum / n_tokens + model.config.router_aux_loss_coef * out.aux_loss / ctx.world_size
            (loss * ctx.world_size).backward()
            torch.nn.utils.clip_grad_norm_(params, 1.0)
            opt.step()
            opt.zero_grad(set_to_none=True)
            _sync(device)
            if i >= args.warmup:
                times.append(time.perf_counter() - t0)
            losses.append(ctx.all_reduce_sum([float(out.ce_sum.detach())])[0] / n_tokens)
        step_s = sorted(times)[len(times) // 2]
        peak = torch.cuda.max_memory_allocated(device) / 2**30 if device.type == "cuda" else 0.0
        peaks = ctx.all_reduce_sum([peak if r == ctx.rank else 0.0 for r in range(ctx.world_size)])
        rec.update(status="ok", step_s=step_s, tok_s=ctx.world_size * args.seq / step_s,
                   tok_s_per_gpu=args.seq / step_s, peak_gib_per_rank=peaks, losses=losses)  # fmt: skip
    except torch.OutOfMemoryError as e:
        rec.update(status="oom", error=str(e).splitlines()[0][:300])
    except Exception as e:  # noqa: BLE001 - one failed case must not lose the others' numbers
        rec.update(status="error", error=f"{type(e).__name__}: {e}"[:500], trace=traceback.format_exc()[-2000:])
    if ctx.is_main:
        _emit(args.out, rec)
    if rec["status"] == "ok":
        distributed.shutdown()  # after a failure a rank may be stuck in a collective: just exit


def _sync(device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


# ------------------------------------------------------------------------------------------ driver
def driver(args) -> None:
    results = {}
    for fmt in args.fmts.split(","):
        for world in [int(w) for w in args.worlds.split(",")]:
            cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", str(world),
                   __file__, "--worker", "--fmt", fmt, "--seq", str(args.seq), "--shape", args.shape,
                   "--device", args.device, "--warmup", str(args.warmup), "--iters", str(args.iters),
                   "--docs", str(args.docs), "--dtype", args.dtype, "--out", args.out] + (["--no-ckpt"] if args.no_ckpt else [])  # fmt: skip
            env = {**os.environ, "NCCL_NVLS_ENABLE": "0", "PYTHONPATH": str(ROOT / "src")}
            if args.device == "cpu":
                env["OMP_NUM_THREADS"] = "1"
            before = _count_lines(args.out)
            try:
                proc = subprocess.run(cmd, check=False, env=env, timeout=args.case_timeout, capture_output=True, text=True)
                status = proc.returncode
                tail = (proc.stdout + proc.stderr)[-1500:]
            except subprocess.TimeoutExpired:
                status, tail = "timeout", ""
            if _count_lines(args.out) == before:  # the worker died before writing its line
                _emit(args.out, {"bench": "fsdp_scaling", "fmt": fmt, "world_size": world, "seq_len": args.seq,
                                 "status": "error", "returncode": status, "tail": tail})  # fmt: skip
            last = json.loads(Path(args.out).read_text().splitlines()[-1])
            results[(fmt, world)] = last
    for fmt in args.fmts.split(","):
        one, two = results.get((fmt, 1), {}), results.get((fmt, 2), {})
        if one.get("status") == two.get("status") == "ok":
            _emit(args.out, {"bench": "fsdp_scaling_summary", "fmt": fmt, "seq_len": args.seq,
                             "tok_s_1": one["tok_s"], "tok_s_2": two["tok_s"],
                             "speedup": two["tok_s"] / one["tok_s"], "efficiency": two["tok_s"] / one["tok_s"] / 2})  # fmt: skip


def _count_lines(path: str) -> int:
    p = Path(path)
    return len(p.read_text().splitlines()) if p.is_file() else 0


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--worker", action="store_true", help="(internal) one measurement under torchrun")
    p.add_argument("--fmt", default="mxfp4", choices=["bf16", "fp8", "mxfp4"], help="worker: expert format")
    p.add_argument("--fmts", default="mxfp4,bf16", help="driver: expert formats to measure")
    p.add_argument("--worlds", default="1,2", help="driver: world sizes (processes = GPUs)")
    p.add_argument("--seq", type=int, default=16384)
    p.add_argument("--docs", type=int, default=4, help="documents packed per sequence")
    p.add_argument("--shape", default="gpt-oss-20b")
    p.add_argument("--device", default="cuda", choices=["cuda", "cpu"])
    p.add_argument("--no-ckpt", action="store_true", help="no activation checkpointing")
    p.add_argument("--dtype", default="auto", choices=["auto", "bfloat16", "float32"], help="auto: bf16 on GPU, fp32 on CPU")
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--iters", type=int, default=5)
    p.add_argument("--case-timeout", type=int, default=420)
    p.add_argument("--out", default="fsdp_scaling.jsonl")
    args = p.parse_args()
    worker(args) if args.worker else driver(args)


if __name__ == "__main__":
    main()
