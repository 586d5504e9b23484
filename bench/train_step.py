"""Training-step benchmark: rustforge's fast MoE path vs transformers + PEFT, side by side in one run.

GPT-OSS-20B shape (24 layers, random weights), batch 1, LoRA r16 on q/k/v/o and on the experts'
gate_up/down projections. For each case a fresh subprocess builds the model once and times full training
steps (forward, backward, AdamW) at increasing sequence lengths until one runs out of memory, so every
case starts with an empty GPU. With `--checks`, the GPU-marked correctness tests (our kernels vs their
references, forward and gradients) run on the same GPU first.

    python bench/train_step.py --plan s5_last    --out results.jsonl   # 4K: baseline, ours graphed and eager (session 5)
    python bench/train_step.py --plan final_4k   --out results.jsonl   # the 4K comparison (session 4)
    python bench/train_step.py --plan final_grid --out results.jsonl   # checkpointed 4K-64K, every format
    python bench/train_step.py --plan long_tiled --out results.jsonl   # largest context (offload + tiles)
    python bench/train_step.py --case ours --fmt mxfp4 --seqs 4096 --shape tiny --device cpu   # smoke test

`--cuda-graph` runs our step as one CUDA graph (train/graphed_step.py: the first call warms up and captures).
`--unfused` runs a case on session 3's code paths (set_fused_kernels(False), unfused AdamW) and
`--session4-paths` on session 4's, for a same-run A/B; every step's time and the host time to issue it (`enqueue_s`) are in the records, and a plan logs SM
clocks and power beside them (`<out>.smi.csv`); `--profile-seq N` writes a kernel table and the dense GEMMs by
shape.

Useful FLOPs per token = 2*N_active (forward) + 2*N_active (backward to activations; the base is frozen, so
no weight gradients) + attention scores and values (forward 4*T_k*d per head, backward twice that), not
counting checkpoint recompute; MFU is that over the measured bf16 matmul ceiling.
"""

from __future__ import annotations

import argparse
import gc
import json
import subprocess
import sys
import time
import traceback
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "src"))
sys.path.insert(0, str(ROOT / "bench"))

from ceilings import bf16_matmul_tflops, copy_bandwidth  # noqa: E402
from records import emit as _emit  # noqa: E402

from rustforge.config import LoraConfig, ModelConfig  # noqa: E402
from rustforge.model.presets import get_preset  # noqa: E402


# ----------------------------------------------------------------------------------------- flops model
def active_params(p) -> tuple[float, float]:
    """(non-embedding active params per token, lm_head params)."""
    d, hq, hkv, hd = p.hidden_size, p.num_attention_heads, p.num_key_value_heads, p.head_dim
    attn = d * hq * hd * 2 + d * hkv * hd * 2
    experts = p.num_experts_per_tok * (d * 2 * p.intermediate_size + p.intermediate_size * d)
    router = d * p.num_local_experts
    return p.num_hidden_layers * (attn + experts + router), d * p.vocab_size


def useful_flops(p, seq_len: int, n_docs: int) -> float:
    body, head = active_params(p)
    dense = 4 * (body + head) * seq_len  # fwd 2N + bwd-to-activations 2N
    doc = seq_len / n_docs
    attn = 0.0
    for layer in range(p.num_hidden_layers):
        keys = min(p.sliding_window, doc / 2) if layer % 2 == 0 else doc / 2  # mean keys per query
        attn += 3 * 4 * seq_len * keys * p.head_dim * p.num_attention_heads  # fwd + 2x bwd
    return dense + attn


# ------------------------------------------------------------------------------------------- ceilings
def measure_ceilings(device) -> dict:
    out = {"bf16_matmul_tflops": bf16_matmul_tflops(device), "copy_tb_s": copy_bandwidth(device) / 1e12}
    torch.cuda.empty_cache()
    return out


# ---------------------------------------------------------------------------------------------- batch
def packed_batch(seq_len: int, vocab: int, n_docs: int, device):
    """Random tokens in n_docs equal documents: position ids restart, labels never cross documents."""
    g = torch.Generator().manual_seed(seq_len)
    ids = torch.randint(0, vocab, (1, seq_len), generator=g)
    doc_len = seq_len // n_docs
    doc_ids = (torch.arange(seq_len) // doc_len).clamp(max=n_docs - 1)[None]
    starts = torch.searchsorted(doc_ids[0], doc_ids[0], right=False)
    position_ids = (torch.arange(seq_len) - starts)[None]
    labels = torch.cat([ids[:, 1:], torch.full((1, 1), -100)], 1)
    labels[:, :-1][doc_ids[:, 1:] != doc_ids[:, :-1]] = -100
    batch = {"input_ids": ids, "position_ids": position_ids, "doc_ids": doc_ids, "labels": labels}
    return {k: v.to(device) for k, v in batch.items()}


# ------------------------------------------------------------------------------------------- our path
def build_ours(args, device):
    from rustforge.model.gptoss import build_model

    mcfg = ModelConfig(
        preset=args.shape,
        attention=args.attention if device.type == "cuda" else "eager",
        experts="grouped",
        expert_format=args.fmt,
        dtype="bfloat16" if device.type == "cuda" else "float32",
        gradient_checkpointing=not args.no_ckpt,
        offload_activations=args.offload,
        offload_pinned=not args.pageable,
        loss_chunk_size=args.loss_chunk,
        moe_tile_tokens=args.moe_tile,
    )
    model = build_model(mcfg, LoraConfig(r=16, alpha=32), device=device)
    if args.no_keep_dense:
        from rustforge.model.moe import configure_experts

        configure_experts(model.hf, args.moe_tile, keep_dense_for_backward=False)
    return model


def set_fused_kernels(on: bool) -> None:
    """The module switches of session 4's fused paths (their torch paths are the references): the Triton
    SwiGLU / routing-sum / RMSNorm / softmax kernels and the LoRA projection autograd (which also turns
    off PackedFlexAttention's fused q/k/v; RoPE then runs outside the compiled flex function)."""
    from rustforge.model import gptoss, lora, loss, moe, triton_rmsnorm

    moe.FUSED_KERNELS = loss.FUSED_SOFTMAX = triton_rmsnorm.FUSED_NORMS = lora.FUSED_PROJECTIONS = on
    gptoss.FUSED_RESIDUAL_STREAM = on


def use_session4_paths() -> None:
    """Session 5's switchable changes off, for a same-run A/B: torch's default flex forward blocks, the expert
    LoRA's weight gradients on grouped_mm instead of model/triton_expert_lora.py."""
    from rustforge.model import attention, moe

    attention.FLEX_KERNEL_OPTIONS = {}
    moe.TRITON_EXPERT_LORA = False


def step_ours(model, opt, batch, device):
    with torch.autocast(device.type, dtype=torch.bfloat16, enabled=device.type == "cuda"):
        out = model(**batch)
    out.loss.backward()
    opt.step()
    opt.zero_grad(set_to_none=True)
    return out.loss.detach()  # a tensor: converting it would wait for the GPU (see run_case's enqueue_s)


def graphed_step_ours():
    """step_ours as one CUDA graph (train/graphed_step.py): the first call warms up and captures."""
    from rustforge.train.graphed_step import GraphedTrainStep

    captured = {}

    def step(model, opt, batch, device):
        if captured.get("batch") is not batch:  # one graph per batch: a new sequence length captures anew
            captured.clear()
            torch.cuda.empty_cache()
            captured.update(batch=batch, graph=GraphedTrainStep(model, opt, batch))
        return captured["graph"].replay()

    return step


# --------------------------------------------------------------------------------------- the baseline
def build_hf_peft(args, device):
    from peft import LoraConfig as PeftLoraConfig
    from peft import get_peft_model
    from transformers import GptOssForCausalLM

    from rustforge.model.presets import hf_config

    cfg = hf_config(get_preset(args.shape))
    cfg._attn_implementation = args.hf_attn
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    prev = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    with device:
        model = GptOssForCausalLM(cfg)
    torch.set_default_dtype(prev)
    if args.hf_experts:
        model.config._experts_implementation = args.hf_experts
    peft_cfg = PeftLoraConfig(
        r=16,
        lora_alpha=32,
        target_modules=["q_proj", "k_proj", "v_proj", "o_proj"],
        target_parameters=["mlp.experts.gate_up_proj", "mlp.experts.down_proj"],
    )
    model = get_peft_model(model, peft_cfg)
    if not args.no_ckpt:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        model.enable_input_require_grads()
    return model


def step_hf(model, opt, batch, device):
    with torch.autocast(device.type, dtype=torch.bfloat16, enabled=device.type == "cuda"):
        out = model(input_ids=batch["input_ids"], labels=batch["labels"])
    out.loss.backward()
    opt.step()
    opt.zero_grad(set_to_none=True)
    return out.loss.detach()


# ---------------------------------------------------------------------------------------- one case
def run_case(args) -> None:
    device = torch.device(args.device)
    preset = get_preset(args.shape)
    record = {"case": args.case, "fmt": args.fmt, "hf_attn": args.hf_attn, "hf_experts": args.hf_experts,
              "ckpt": not args.no_ckpt, "offload": args.offload, "pageable": args.pageable, "moe_tile": args.moe_tile, "shape": args.shape,
              "paths": "session3" if args.unfused else "session4" if args.session4_paths else "current",
              "gc_freeze": args.gc_freeze, "attention": args.attention if args.case == "ours" else None}
    t0 = time.perf_counter()
    if args.torch_dequant:
        from rustforge.model import moe

        moe.TRITON_DEQUANT = False
        record["dequant"] = "torch"
    from rustforge.model import moe

    if args.attention_unmasked_interior:
        from rustforge.model import triton_attention

        triton_attention.UNMASKED_INTERIOR = True
        record["attention_unmasked_interior"] = True
    if args.no_lora_in_gemm_k:
        moe.LORA_IN_GEMM_K = False
    record["lora_in_gemm_k"] = moe.LORA_IN_GEMM_K
    if args.transformers_layer_loop:
        from rustforge.model import gptoss

        gptoss.FUSED_RESIDUAL_STREAM = False
        record["layer_loop"] = "transformers"
    if args.flex_options is not None:
        from rustforge.model import attention

        attention.FLEX_KERNEL_OPTIONS = json.loads(args.flex_options)
        record["flex_options"] = attention.FLEX_KERNEL_OPTIONS
    if args.unfused or args.session4_paths:
        use_session4_paths()
    if args.unfused:
        set_fused_kernels(False)
        record["fused"] = False
    if args.no_keep_dense:
        record["keep_dense"] = False
    model = build_ours(args, device) if args.case == "ours" else build_hf_peft(args, device)
    step = step_ours if args.case == "ours" else step_hf
    if args.cuda_graph:
        step = graphed_step_ours()
        record["cuda_graph"] = True
    params = [p for p in model.parameters() if p.requires_grad]
    # fused AdamW on both sides: what our SFT loop uses on one GPU (train/sft.py) and transformers' Trainer
    # default (adamw_torch_fused)
    opt = torch.optim.AdamW(params, lr=1e-5, fused=device.type == "cuda" and not args.unfused,
                            capturable=args.cuda_graph)
    if device.type == "cuda":
        torch.cuda.synchronize()
        weights_gb = torch.cuda.memory_allocated() / 2**30
    else:
        weights_gb = 0.0
    if args.case == "ours":
        _emit(args.out, {**record, "event": "dtype_audit", **dtype_audit(model, preset, device)})
    _emit(args.out, {**record, "event": "built", "build_s": time.perf_counter() - t0, "weights_gib": weights_gb,
                     "trainable_params": sum(p.numel() for p in params)})
    if args.memory_census:
        torch.cuda.memory._record_memory_history(max_entries=200000, stacks="python")
    for seq_len in [int(s) for s in args.seqs.split(",")]:
        rec = {**record, "event": "step", "seq_len": seq_len}
        try:
            batch = packed_batch(seq_len, preset.vocab_size if args.shape != "tiny" else 4096, args.docs, device)
            if device.type == "cuda":
                torch.cuda.reset_peak_memory_stats()
            for _ in range(args.warmup):
                loss = step(model, opt, batch, device)
            if args.gc_freeze:  # the model's objects out of the collector's way: no full scans of them mid-step
                gc.collect()
                gc.freeze()
            collections_before = [g["collections"] for g in gc.get_stats()]
            times, enqueue = [], []
            for _ in range(args.iters):
                if device.type == "cuda":
                    torch.cuda.synchronize()
                t = time.perf_counter()
                loss = step(model, opt, batch, device)
                # host time to issue the step; close to the step time = the GPU waited for the host
                enqueue.append(time.perf_counter() - t)
                if device.type == "cuda":
                    torch.cuda.synchronize()
                times.append(time.perf_counter() - t)
            loss = float(loss)
            in_order = list(times)
            times.sort()
            median = times[len(times) // 2]
            flops = useful_flops(preset, seq_len, args.docs)
            rec["gc_collections"] = [g["collections"] - b for g, b in zip(gc.get_stats(), collections_before)]
            rec.update(ok=True, loss=loss, step_s=median, all_step_s=in_order, enqueue_s=enqueue, end_time=time.time(), tok_s=seq_len / median, tflops=flops / median / 1e12,
                       peak_gib=torch.cuda.max_memory_allocated() / 2**30 if device.type == "cuda" else 0.0)
        except torch.OutOfMemoryError as e:
            rec.update(ok=False, error="OOM", detail=str(e).splitlines()[0][:200])
            if args.memory_census:  # inside the handler the traceback still holds every live tensor
                rec["live_at_oom"] = memory_census()
        except Exception as e:  # a failure is a result too: record it and stop this case
            rec.update(ok=False, error=type(e).__name__, detail=traceback.format_exc()[-1500:])
        _emit(args.out, rec)
        opt.zero_grad(set_to_none=True)
        batch = None
        if device.type == "cuda":
            torch.cuda.empty_cache()
        if not rec["ok"]:
            break
    for seq_len in [int(x) for x in args.memory_phases.split(",") if x]:
        batch = packed_batch(seq_len, preset.vocab_size, args.docs, device)
        _emit(args.out, {**record, "event": "memory_phases", "seq_len": seq_len,
                         **memory_phases(model, opt, batch, device)})
    if args.peak_census_seq and args.case == "ours" and device.type == "cuda":
        batch = packed_batch(args.peak_census_seq, preset.vocab_size, args.docs, device)
        _emit(args.out, {**record, "event": "peak_census", "seq_len": args.peak_census_seq,
                         "lines": peak_census(model, opt, batch, device)})
    if args.profile_seq and args.case == "ours" and device.type == "cuda":
        profile(model, opt, packed_batch(args.profile_seq, preset.vocab_size, args.docs, device), device, args)


def memory_census(top: int = 25) -> list[str]:
    """Live GPU allocations grouped by where they were made (innermost frames in rustforge, transformers or
    peft), largest first: what fills the GPU when a step runs out of memory."""
    from collections import Counter

    def site(frames) -> str:
        ours = [f for f in frames if any(k in f["filename"] for k in ("rustforge", "transformers", "peft", "bench"))]
        picked = ours[:3] or frames[:2]
        return " < ".join(f"{Path(f['filename']).name}:{f['line']}:{f['name']}" for f in picked) or "<no stack>"

    sizes, counts = Counter(), Counter()
    for segment in torch.cuda.memory._snapshot()["segments"]:
        for block in segment["blocks"]:
            if block["state"] == "active_allocated":
                key = site(block.get("frames", []))
                sizes[key] += block["size"]
                counts[key] += 1
    lines = [f"{size / 2**30:7.2f} GiB {counts[key]:5d}x  {key}" for key, size in sizes.most_common(top)]
    lines.insert(0, f"{sum(sizes.values()) / 2**30:7.2f} GiB live in total")
    print("\n".join(lines), flush=True)
    return lines


def memory_phases(model, opt, batch, device) -> dict:
    """GiB allocated after each decoder layer's forward, after the whole forward, and the peaks of forward
    and backward: says whether long-context memory is saved state (grows per layer) or a backward transient."""
    gib = lambda: torch.cuda.memory_allocated() / 2**30  # noqa: E731
    after_layer: list[float] = []
    hooks = [layer.mlp.register_forward_hook(lambda *_: after_layer.append(round(gib(), 3)) if torch.is_grad_enabled() else None)
             for layer in model.hf.model.layers]
    # during backward: (module, allocated, peak so far) as each module's gradient is done, and the live
    # blocks by size in the middle layer (shapes tell which tensors they are)
    during_backward, blocks_mid = [], {}
    layers = model.hf.model.layers
    probes = {"final_norm": model.hf.model.norm, "L23.mlp": layers[-1].mlp, "L23.attn": layers[-1].self_attn,
              "L12.experts": layers[12].mlp.experts, "L12.mlp": layers[12].mlp, "L12.attn": layers[12].self_attn}

    def probe(name):
        def hook(*_):
            torch.cuda.synchronize()
            during_backward.append((name, round(gib(), 2), round(torch.cuda.max_memory_allocated() / 2**30, 2)))
            if name == "L12.experts":
                from collections import Counter

                sizes = Counter()
                for seg in torch.cuda.memory_snapshot():
                    for b in seg["blocks"]:
                        if b["state"] == "active_allocated":
                            sizes[b["size"]] += 1
                blocks_mid.update({f"{size / 2**20:.1f}MiB": n for size, n in
                                   sorted(sizes.items(), key=lambda kv: -kv[0] * kv[1])[:15]})
        return hook

    backward_hooks = [m.register_full_backward_hook(probe(n)) for n, m in probes.items()]  # before forward
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    start = gib()
    with torch.autocast(device.type, dtype=torch.bfloat16):
        out = model(**batch)
    torch.cuda.synchronize()
    after_forward, forward_peak = gib(), torch.cuda.max_memory_allocated() / 2**30
    for h in hooks:
        h.remove()
    torch.cuda.reset_peak_memory_stats()
    out.loss.backward()
    torch.cuda.synchronize()
    backward_peak = torch.cuda.max_memory_allocated() / 2**30
    for h in backward_hooks:
        h.remove()
    opt.zero_grad(set_to_none=True)
    return {"start": start, "after_layer_mlp": after_layer[:30], "after_forward": after_forward,
            "forward_peak": forward_peak, "backward_peak": backward_peak, "during_backward": during_backward,
            "live_blocks_at_L12_experts_grad": blocks_mid}


def peak_census(model, opt, batch, device, top: int = 20) -> list[str]:
    """Replays the allocator trace of one training step and lists what was live at its peak, grouped by
    allocation site (innermost rustforge/transformers/peft frames): where long-context memory goes."""
    from collections import Counter

    torch.cuda.memory._record_memory_history(max_entries=400000, stacks="python")
    step_ours(model, opt, batch, device)
    torch.cuda.synchronize()
    trace = torch.cuda.memory._snapshot()["device_traces"][device.index or 0]
    torch.cuda.memory._record_memory_history(enabled=None)
    live, total, peak, at_peak = {}, 0, 0, {}
    for event in trace:
        if event["action"] == "alloc":
            live[event["addr"]] = (event["size"], event.get("frames", []))
            total += event["size"]
            if total > peak:
                peak, at_peak = total, dict(live)
        elif event["action"] == "free_completed" and event["addr"] in live:
            total -= live.pop(event["addr"])[0]

    def site(frames) -> str:
        ours = [f for f in frames if any(k in f["filename"] for k in ("rustforge", "transformers", "peft", "bench"))]
        return " < ".join(f"{Path(f['filename']).name}:{f['line']}:{f['name']}" for f in (ours[:3] or frames[:2])) or "?"

    sizes, counts = Counter(), Counter()
    for size, frames in at_peak.values():
        key = site(frames)
        sizes[key] += size
        counts[key] += 1
    lines = [f"{peak / 2**30:.2f} GiB allocated during the step at its peak (beyond what was live before it):"]
    lines += [f"{size / 2**30:7.2f} GiB {counts[k]:5d}x  {k}" for k, size in sizes.most_common(top)]
    print("\n".join(lines), flush=True)
    return lines


def dtype_audit(model, preset, device) -> dict:
    """Output dtype of each kind of module in layer 0 and of the final hidden states, under autocast."""
    seen: dict[str, str] = {}
    layer = model.hf.model.layers[0]
    named = {"input_norm": layer.input_layernorm, "attn": layer.self_attn, "o_proj": layer.self_attn.o_proj,
             "post_norm": layer.post_attention_layernorm, "router": layer.mlp.router, "experts": layer.mlp.experts,
             "embed": model.hf.model.embed_tokens}
    def record(key):
        def hook(_module, _inputs, out):
            seen.setdefault(key, str((out[0] if isinstance(out, tuple) else out).dtype))

        return hook

    hooks = [m.register_forward_hook(record(k)) for k, m in named.items()]
    batch = packed_batch(256, preset.vocab_size, 2, device)
    with torch.no_grad(), torch.autocast(device.type, dtype=torch.bfloat16, enabled=device.type == "cuda"):
        hidden = model.hidden_states(batch["input_ids"], batch["position_ids"], batch["doc_ids"])
    for h in hooks:
        h.remove()
    seen["final_hidden"] = str(hidden.dtype)
    seen["norm_weight"] = str(layer.post_attention_layernorm.weight.dtype)
    return seen


def profile(model, opt, batch, device, args) -> None:
    from torch.profiler import ProfilerActivity
    from torch.profiler import profile as torch_profile

    step_ours(model, opt, batch, device)
    with torch_profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA], record_shapes=True) as prof:
        step_ours(model, opt, batch, device)
        torch.cuda.synchronize()
    averages = prof.key_averages()
    # operators (aten::..., our rustforge.* ranges) by the GPU time they launched, then the kernels themselves
    by_op = averages.table(sort_by="cuda_time_total", row_limit=45, max_name_column_width=90)
    by_kernel = averages.table(sort_by="self_cuda_time_total", row_limit=50, max_name_column_width=110)
    # the dense GEMMs by shape: which of the many small LoRA matmuls cost what
    shapes = [e for e in prof.key_averages(group_by_input_shape=True) if e.key in ("aten::mm", "aten::addmm", "aten::addmm_")]
    def gpu_us(e) -> float:
        return getattr(e, "device_time_total", None) or getattr(e, "cuda_time_total", 0.0)

    shapes.sort(key=lambda e: -gpu_us(e))
    by_shape = "\n".join(f"{e.key:14s} {e.count:5d} calls {gpu_us(e) / 1e3:8.2f} ms  {e.input_shapes}" for e in shapes[:40])
    # the memory-bound torch ops (copies, casts, adds) by shape: which tensors the small kernels move
    def self_gpu_us(e) -> float:
        return getattr(e, "self_device_time_total", None) or getattr(e, "self_cuda_time_total", 0.0)

    others = [e for e in prof.key_averages(group_by_input_shape=True)
              if e.key.startswith("aten::") and e.key not in ("aten::mm", "aten::addmm", "aten::addmm_", "aten::_grouped_mm")
              and self_gpu_us(e) > 0]
    others.sort(key=lambda e: -self_gpu_us(e))
    by_other = "\n".join(f"{e.key:22s} {e.count:5d} calls {self_gpu_us(e) / 1e3:8.2f} ms  {e.input_shapes}"
                         for e in others[:60])
    # flex attention's kernels call by call, in launch order: the layers alternate sliding-window and full
    # attention, so this shows whether the window's ~8x fewer FLOPs show up in the backward's time
    flex_calls = [e for e in prof.events() if "flex_attention" in e.name and getattr(e, "device_type", None) is not None
                  and "CUDA" in str(e.device_type)]
    by_flex = "\n".join(f"{i:3d} {e.time_range.elapsed_us():9.1f} us  {e.name[:100]}" for i, e in enumerate(flex_calls))
    name = f".profile-{args.fmt}-{batch['input_ids'].shape[1]}{'-nockpt' if args.no_ckpt else ''}.txt"
    Path(args.out).with_suffix(name).write_text(by_op + "\n\n" + by_kernel + "\n\n" + by_shape + "\n\n" + by_other
                                                 + "\n\nflex attention kernels in launch order:\n" + by_flex)
    print(by_op[:5000])


def _emit(path: str, rec: dict) -> None:
    print(json.dumps(rec), flush=True)
    with open(path, "a") as f:
        f.write(json.dumps(rec) + "\n")


# ----------------------------------------------------------------------------------------- the plans
PLANS = {
    # the one-call plan: each case in its own process, the claims that matter most first
    "main": [
        "--case ours --fmt mxfp4 --seqs 4096,16384,65536 --warmup 1 --iters 2",
        "--case hf --hf-attn eager --seqs 4096,16384 --warmup 1 --iters 2",
        "--case ours --fmt bf16 --seqs 4096,16384 --warmup 1 --iters 2",
        "--case ours --fmt fp8 --seqs 4096 --warmup 1 --iters 2",
        "--case ours --fmt mxfp4 --seqs 131072,196608 --warmup 1 --iters 1",
        "--case hf --hf-attn flex_attention --seqs 4096 --warmup 1 --iters 2",
    ],
    # the headline claims first; the largest-context search is its own plan ("long")
    "core": [
        "--case ours --fmt mxfp4 --seqs 4096,16384,65536 --warmup 1 --iters 2",
        "--case hf --hf-attn eager --seqs 4096,16384 --warmup 1 --iters 2",
        "--case hf --hf-attn flex_attention --seqs 4096,16384 --warmup 1 --iters 2",
        "--case ours --fmt bf16 --seqs 4096,16384 --warmup 1 --iters 2",
        "--case ours --fmt mxfp4 --no-ckpt --seqs 4096,8192 --warmup 1 --iters 2",
        "--case ours --fmt fp8 --seqs 4096 --warmup 1 --iters 2",
    ],
    "ours": [
        "--case ours --fmt mxfp4 --seqs 4096,16384,65536 --warmup 1 --iters 2",
        "--case ours --fmt bf16 --seqs 4096 --warmup 1 --iters 2",
        "--case ours --fmt fp8 --seqs 4096 --warmup 1 --iters 2",
    ],
    "long": [
        "--case ours --fmt mxfp4 --offload --seqs 131072,196608,262144,393216,524288 --iters 1 --warmup 1",
    ],
    # token-tiled experts (model.moe_tile_tokens) on top of offload: the MoE rows exist for one tile only
    "long_tiled": [
        "--case ours --fmt mxfp4 --offload --moe-tile 16384 --seqs 262144,393216,524288 --iters 1 --warmup 0",
        "--case ours --fmt mxfp4 --offload --pageable --moe-tile 16384 --seqs 524288 --iters 1 --warmup 0",
    ],
    "profile": ["--case ours --fmt mxfp4 --seqs 16384 --profile-seq 16384 --warmup 1 --iters 2"],
    # where a 4K step's time goes, per format and with/without checkpointing (one profile each)
    # one H100 run, every headline row side by side (2026-11-25 session 2)
    "h100": [
        "--case ours --fmt mxfp4 --seqs 4096,16384,32768 --warmup 1 --iters 2 --peak-census-seq 8192",
        "--case hf --hf-attn eager --seqs 4096,16384 --warmup 1 --iters 2",
        "--case hf --hf-attn flex_attention --seqs 4096,16384 --warmup 1 --iters 2",
        "--case ours --fmt bf16 --seqs 4096,16384 --warmup 1 --iters 2",
        "--case ours --fmt fp8 --seqs 4096,16384 --warmup 1 --iters 2",
        "--case ours --fmt mxfp4 --no-ckpt --seqs 4096,8192 --warmup 1 --iters 2",
        "--case ours --fmt mxfp4 --torch-dequant --seqs 4096 --warmup 1 --iters 2",
    ],
    "memory": ["--case ours --fmt mxfp4 --seqs 4096 --warmup 1 --iters 1 --memory-phases 16384"],
    # the grid in one run: every base format at 4K-64K beside the transformers + PEFT baseline
    "grid": [
        "--case hf --hf-attn eager --seqs 4096 --warmup 1 --iters 1",
        "--case hf --hf-attn flex_attention --seqs 4096 --warmup 1 --iters 1",
        "--case ours --fmt mxfp4 --seqs 4096,16384,32768,65536 --warmup 1 --iters 1",
        "--case ours --fmt fp8 --seqs 4096,16384,32768,65536 --warmup 1 --iters 1",
        "--case ours --fmt bf16 --seqs 4096,16384,32768,65536 --warmup 1 --iters 1",
        "--case ours --fmt mxfp4 --no-ckpt --seqs 4096 --warmup 1 --iters 1",
    ],
    # session 4: the fused training kernels against their torch paths, and one dequantisation fewer
    "fused": [
        "--case ours --fmt mxfp4 --no-ckpt --unfused --seqs 4096,8192 --warmup 1 --iters 3",
        "--case ours --fmt mxfp4 --no-ckpt --seqs 4096,8192 --warmup 1 --iters 3 --profile-seq 4096",
        "--case ours --fmt bf16 --no-ckpt --seqs 4096 --warmup 1 --iters 3",
        "--case ours --fmt mxfp4 --unfused --no-keep-dense --seqs 4096,16384 --warmup 1 --iters 2",
        "--case ours --fmt mxfp4 --no-keep-dense --seqs 4096 --warmup 1 --iters 2",
        "--case ours --fmt mxfp4 --seqs 4096,16384 --warmup 1 --iters 2",
    ],
    # session 4, round 2: + LoRA projection autograd, PackedFlexAttention, fused AdamW; the baseline in the run
    "fused2": [
        "--case hf --hf-attn flex_attention --seqs 4096 --warmup 1 --iters 2",
        "--case ours --fmt bf16 --no-ckpt --seqs 4096 --warmup 1 --iters 3 --profile-seq 4096",
        "--case ours --fmt mxfp4 --no-ckpt --seqs 4096,8192 --warmup 1 --iters 3 --profile-seq 4096",
        "--case ours --fmt mxfp4 --no-ckpt --unfused --seqs 4096 --warmup 1 --iters 3",
        "--case ours --fmt mxfp4 --seqs 4096,16384 --warmup 1 --iters 2",
    ],
    # round 3: + in-place LoRA rank updates in the grouped projections, autotuned dequantisers, clocks logged
    "fused3": [
        "--case hf --hf-attn flex_attention --seqs 4096 --warmup 1 --iters 3",
        "--case ours --fmt bf16 --no-ckpt --seqs 4096 --warmup 2 --iters 6 --profile-seq 4096",
        "--case ours --fmt mxfp4 --no-ckpt --seqs 4096,8192 --warmup 1 --iters 4 --profile-seq 4096",
        "--case ours --fmt fp8 --no-ckpt --seqs 4096 --warmup 1 --iters 4",
        "--case ours --fmt mxfp4 --seqs 4096,16384 --warmup 1 --iters 3",
    ],
    # session 4's closing runs: the 4K comparison (every format without checkpointing, session 3's paths as
    # `--unfused`) and the checkpointed grid, each with the transformers + PEFT baseline in the same call
    "final_4k": [
        "--case hf --hf-attn eager --seqs 4096 --warmup 1 --iters 2",
        "--case hf --hf-attn flex_attention --seqs 4096 --warmup 1 --iters 3",
        "--case ours --fmt bf16 --no-ckpt --seqs 4096,8192 --warmup 2 --iters 5 --profile-seq 4096",
        "--case ours --fmt mxfp4 --no-ckpt --seqs 4096,8192 --warmup 2 --iters 5",
        "--case ours --fmt fp8 --no-ckpt --seqs 4096 --warmup 2 --iters 5",
        "--case ours --fmt mxfp4 --no-ckpt --unfused --seqs 4096 --warmup 1 --iters 3",
    ],
    # the 4K comparison's key rows again (after the host-side trims): baseline, bf16 and MXFP4 without checkpointing
    "final_4k_short": [
        "--case hf --hf-attn flex_attention --seqs 4096 --warmup 1 --iters 3",
        "--case ours --fmt bf16 --no-ckpt --seqs 4096 --warmup 2 --iters 6",
        "--case ours --fmt mxfp4 --no-ckpt --seqs 4096 --warmup 2 --iters 6",
    ],
    # session 5: flex forward blocks, gate_up's LoRA inside the SwiGLU kernels; A/B against session 4's paths
    "s5": [
        "--case hf --hf-attn flex_attention --seqs 4096 --warmup 1 --iters 3",
        "--case ours --fmt bf16 --no-ckpt --seqs 4096 --warmup 2 --iters 6 --profile-seq 4096",
        "--case ours --fmt bf16 --no-ckpt --session4-paths --seqs 4096 --warmup 2 --iters 6",
        "--case ours --fmt mxfp4 --no-ckpt --seqs 4096 --warmup 2 --iters 6",
    ],
    # host time: the GPU work of a 4K step is ~171 ms now and the host's issue time (150-250 ms) sets the pace
    "s5_host": [
        "--case hf --hf-attn flex_attention --seqs 4096 --warmup 1 --iters 3",
        "--case ours --fmt bf16 --no-ckpt --seqs 4096 --warmup 2 --iters 10",
        "--case ours --fmt bf16 --no-ckpt --seqs 4096 --warmup 2 --iters 10 --gc-freeze",
        "--case ours --fmt bf16 --no-ckpt --session4-paths --seqs 4096 --warmup 2 --iters 10",
        "--case ours --fmt bf16 --no-ckpt --session4-paths --seqs 4096 --warmup 2 --iters 10 --gc-freeze",
    ],
    # session 5's closing A/B: every row with session 4's paths beside it, the baseline in the same call
    "s5_final": [
        "--case hf --hf-attn flex_attention --seqs 4096 --warmup 1 --iters 3",
        "--case ours --fmt mxfp4 --no-ckpt --seqs 4096 --warmup 2 --iters 8",
        "--case ours --fmt mxfp4 --no-ckpt --session4-paths --seqs 4096 --warmup 2 --iters 8",
        "--case ours --fmt bf16 --no-ckpt --seqs 4096 --warmup 2 --iters 8",
        "--case ours --fmt bf16 --no-ckpt --session4-paths --seqs 4096 --warmup 2 --iters 8",
    ],
    # the step as one CUDA graph: the host issues it in one call
    "s5_graph": [
        "--case hf --hf-attn flex_attention --seqs 4096 --warmup 1 --iters 3",
        "--case ours --fmt bf16 --no-ckpt --seqs 4096 --warmup 2 --iters 8 --cuda-graph",
        "--case ours --fmt bf16 --no-ckpt --seqs 4096 --warmup 2 --iters 8",
        "--case ours --fmt mxfp4 --no-ckpt --seqs 4096 --warmup 2 --iters 8 --cuda-graph",
        "--case ours --fmt bf16 --no-ckpt --seqs 8192 --warmup 2 --iters 4 --cuda-graph",
    ],
    # flex backward options measured inside the graphed step (flex_tune's per-layer timing is host-bound)
    "s5_graph2": [
        "--case hf --hf-attn flex_attention --seqs 4096 --warmup 1 --iters 3",
        "--case ours --fmt bf16 --no-ckpt --seqs 4096 --warmup 2 --iters 10 --cuda-graph",
        """--case ours --fmt bf16 --no-ckpt --seqs 4096 --warmup 2 --iters 10 --cuda-graph --flex-options {"fwd_BLOCK_M":64,"fwd_BLOCK_N":64,"bwd_num_warps":8}""",
        """--case ours --fmt bf16 --no-ckpt --seqs 4096 --warmup 2 --iters 10 --cuda-graph --flex-options {"fwd_BLOCK_M":64,"fwd_BLOCK_N":64,"bwd_BLOCK_M1":64,"bwd_BLOCK_N1":128,"bwd_BLOCK_M2":128,"bwd_BLOCK_N2":64}""",
    ],
    # session 5's closing run: the graphed step in every format beside the eager step and the baseline
    "s5_graph_final": [
        "--case hf --hf-attn flex_attention --seqs 4096 --warmup 1 --iters 3",
        "--case ours --fmt bf16 --no-ckpt --seqs 4096 --warmup 2 --iters 10 --cuda-graph",
        "--case ours --fmt bf16 --no-ckpt --seqs 4096 --warmup 2 --iters 8",
        "--case ours --fmt mxfp4 --no-ckpt --seqs 4096 --warmup 2 --iters 8 --cuda-graph",
        "--case ours --fmt fp8 --no-ckpt --seqs 4096 --warmup 2 --iters 8 --cuda-graph",
    ],
    # after folding the LoRA casts into the augmented factors (fewer small kernels in the graph)
    "s5_last": [
        "--case hf --hf-attn flex_attention --seqs 4096 --warmup 1 --iters 3",
        "--case ours --fmt bf16 --no-ckpt --seqs 4096 --warmup 2 --iters 10 --cuda-graph",
        "--case ours --fmt bf16 --no-ckpt --seqs 4096 --warmup 2 --iters 6",
        "--case ours --fmt mxfp4 --no-ckpt --seqs 4096 --warmup 2 --iters 6 --cuda-graph",
    ],
    # session 6: where the step's small kernels go (the shapes of the copies and adds; run 14's profile)
    # the residual adds fused with the norms (RustforgeModel.decoder_stack) against transformers' layer loop
    "s6_ab3": [
        "--case hf --hf-attn flex_attention --seqs 4096 --warmup 1 --iters 3",
        "--case ours --fmt bf16 --no-ckpt --seqs 4096 --warmup 2 --iters 12 --cuda-graph",
        "--case ours --fmt bf16 --no-ckpt --seqs 4096 --warmup 2 --iters 12 --cuda-graph --transformers-layer-loop",
        "--case ours --fmt bf16 --no-ckpt --seqs 4096 --warmup 2 --iters 6",
        "--case ours --fmt mxfp4 --no-ckpt --seqs 4096 --warmup 2 --iters 6 --cuda-graph",
    ],
    # the 4K comparison as it stands (session 6): baseline, ours graphed in bf16 and MXFP4, eager bf16
    "s6_final": [
        "--case hf --hf-attn flex_attention --seqs 4096 --warmup 1 --iters 3",
        "--case ours --fmt bf16 --no-ckpt --seqs 4096 --warmup 2 --iters 12 --cuda-graph",
        "--case ours --fmt mxfp4 --no-ckpt --seqs 4096 --warmup 2 --iters 6 --cuda-graph",
        "--case ours --fmt bf16 --no-ckpt --seqs 4096 --warmup 2 --iters 6",
    ],
    # for session 7: moe.LORA_IN_GEMM_K against the default expert LoRA path, graphed, beside the baseline
    "s7_lora_k": [
        "--case hf --hf-attn flex_attention --seqs 4096 --warmup 1 --iters 3",
        "--case ours --fmt bf16 --no-ckpt --seqs 4096 --warmup 2 --iters 12 --cuda-graph --no-lora-in-gemm-k",
        "--case ours --fmt bf16 --no-ckpt --seqs 4096 --warmup 2 --iters 12 --cuda-graph --lora-in-gemm-k",
        "--case ours --fmt bf16 --no-ckpt --seqs 4096 --warmup 2 --iters 12 --cuda-graph --no-lora-in-gemm-k",
    ],
    # session 7: model/triton_attention.py's kernels against flex in the graphed step, beside the baseline
    "s7_attn": [
        "--case hf --hf-attn flex_attention --seqs 4096 --warmup 1 --iters 3",
        "--case ours --fmt bf16 --no-ckpt --seqs 4096 --warmup 2 --iters 12 --cuda-graph --no-lora-in-gemm-k",
        "--case ours --fmt bf16 --no-ckpt --seqs 4096 --warmup 2 --iters 12 --cuda-graph --attention triton --no-lora-in-gemm-k",
        "--case ours --fmt bf16 --no-ckpt --seqs 4096 --warmup 2 --iters 12 --cuda-graph --lora-in-gemm-k",
        "--case ours --fmt bf16 --no-ckpt --seqs 4096 --warmup 2 --iters 12 --cuda-graph --lora-in-gemm-k --attention triton",
    ],
    # is moe.LORA_IN_GEMM_K's lower loss after 14 graphed steps (runs 18-19) numerics or a bug? eager, against the
    # default path and session 3's torch paths, the same 6 steps each
    "s7_kdiag": [
        "--case ours --fmt bf16 --no-ckpt --seqs 4096 --warmup 2 --iters 4 --no-lora-in-gemm-k",
        "--case ours --fmt bf16 --no-ckpt --seqs 4096 --warmup 2 --iters 4 --lora-in-gemm-k",
        "--case ours --fmt bf16 --no-ckpt --seqs 4096 --warmup 2 --iters 4 --unfused --no-lora-in-gemm-k",
    ],
    # session 7's closing comparison: the baseline, then the graphed step with both session-7 paths
    "s7_final": [
        "--case hf --hf-attn flex_attention --seqs 4096 --warmup 1 --iters 3",
        "--case ours --fmt bf16 --no-ckpt --seqs 4096 --warmup 2 --iters 12 --cuda-graph --lora-in-gemm-k --attention triton",
        "--case ours --fmt bf16 --no-ckpt --seqs 4096 --warmup 2 --iters 12 --cuda-graph --attention triton --no-lora-in-gemm-k",
        "--case ours --fmt mxfp4 --no-ckpt --seqs 4096 --warmup 2 --iters 6 --cuda-graph --attention triton",
    ],
    # the defaults as they stand after session 7 (LORA_IN_GEMM_K on, `model.attention: triton` chosen), and flex
    # against triton at 64K with checkpointing (full layers dominate there; ours is 5% slower per full layer at 4K)
    "s7_last": [
        "--case hf --hf-attn flex_attention --seqs 4096 --warmup 1 --iters 3",
        "--case ours --fmt bf16 --no-ckpt --seqs 4096 --warmup 2 --iters 12 --cuda-graph --attention triton",
        "--case ours --fmt mxfp4 --seqs 65536 --warmup 1 --iters 1 --attention flex",
        "--case ours --fmt mxfp4 --seqs 65536 --warmup 1 --iters 1 --attention triton",
    ],
    # for session 8: triton_attention.UNMASKED_INTERIOR (prepared in session 7) at 4K and at 64K against flex
    "s8_attn": [
        "--case hf --hf-attn flex_attention --seqs 4096 --warmup 1 --iters 3",
        "--case ours --fmt bf16 --no-ckpt --seqs 4096 --warmup 2 --iters 12 --cuda-graph --attention triton",
        "--case ours --fmt bf16 --no-ckpt --seqs 4096 --warmup 2 --iters 12 --cuda-graph --attention triton --attention-unmasked-interior",
        "--case ours --fmt mxfp4 --seqs 65536 --warmup 1 --iters 1 --attention flex",
        "--case ours --fmt mxfp4 --seqs 65536 --warmup 1 --iters 1 --attention triton --attention-unmasked-interior",
    ],
    "s6_profile": [
        "--case ours --fmt bf16 --no-ckpt --seqs 4096 --warmup 2 --iters 2 --profile-seq 4096",
    ],
    "final_grid": [
        "--case hf --hf-attn flex_attention --seqs 4096 --warmup 1 --iters 2",
        "--case ours --fmt mxfp4 --seqs 4096,16384,32768,65536 --warmup 1 --iters 2",
        "--case ours --fmt fp8 --seqs 4096,16384,32768,65536 --warmup 1 --iters 2",
        "--case ours --fmt bf16 --seqs 4096,16384,32768,65536 --warmup 1 --iters 2",
    ],
    "session2": [
        "--case ours --fmt mxfp4 --seqs 4096,16384 --profile-seq 4096 --warmup 1 --iters 2",
        "--case ours --fmt bf16 --seqs 4096 --profile-seq 4096 --warmup 1 --iters 2",
        "--case ours --fmt fp8 --seqs 4096 --warmup 1 --iters 2",
        "--case ours --fmt mxfp4 --no-ckpt --seqs 4096,8192 --warmup 1 --iters 2",
        "--case ours --fmt mxfp4 --seqs 65536 --warmup 0 --iters 1 --memory-census",
    ],
    "profile4k": [
        "--case ours --fmt bf16 --seqs 4096 --profile-seq 4096 --warmup 1 --iters 2",
        "--case ours --fmt mxfp4 --seqs 4096 --profile-seq 4096 --warmup 1 --iters 2",
        "--case ours --fmt mxfp4 --no-ckpt --seqs 4096,8192 --profile-seq 4096 --warmup 1 --iters 2",
    ],
}


# Plans before session 7 ran with moe.LORA_IN_GEMM_K off (it was off by default then): add --no-lora-in-gemm-k to a
# case of theirs to run it as it ran.


def run_plan(args) -> None:
    device = torch.device("cuda")
    env = {"torch": torch.__version__, "gpu": torch.cuda.get_device_name(0),
           "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime())}
    import transformers

    env["transformers"] = transformers.__version__
    try:
        import peft

        env["peft"] = peft.__version__
    except ImportError:
        pass
    _emit(args.out, {"event": "env", **env, **measure_ceilings(device)})
    if args.checks:
        tests = subprocess.run([sys.executable, "-m", "pytest", "-q", "-m", "gpu", "-x", *args.check_files],
                               capture_output=True, text=True, cwd=ROOT)
        tail = (tests.stdout + tests.stderr)[-3000:]
        print(tail)
        _emit(args.out, {"event": "gpu_checks", "returncode": tests.returncode, "tail": tail[-600:]})
    # SM clock, power and throttle reasons every 0.5 s beside the records: a bf16 case measured 205 -> 303 ms
    # over three steps in session 4, and clocks are the first suspect
    smi = subprocess.Popen(["nvidia-smi", "--query-gpu=timestamp,clocks.sm,power.draw,temperature.gpu,"
                            "clocks_throttle_reasons.active", "--format=csv", "-lms", "500",
                            "-f", str(Path(args.out).with_suffix(".smi.csv"))])  # fmt: skip
    try:
        for case in PLANS[args.plan]:
            cmd = [sys.executable, __file__, *case.split(), "--out", args.out, "--docs", str(args.docs)]
            print("+", " ".join(cmd[2:]), flush=True)
            _emit(args.out, {"event": "case_start", "case": case, "time": time.time()})
            try:
                proc = subprocess.run(cmd, cwd=ROOT, timeout=args.case_timeout)
            except subprocess.TimeoutExpired:
                _emit(args.out, {"event": "case_timeout", "case": case, "timeout_s": args.case_timeout})
                continue
            if proc.returncode != 0:
                _emit(args.out, {"event": "case_failed", "case": case, "returncode": proc.returncode})
    finally:
        smi.terminate()


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--plan", choices=sorted(PLANS))
    p.add_argument("--checks", action="store_true", help="run the GPU correctness tests first")
    p.add_argument("--check-files", nargs="*", default=["tests"], help="test files for --checks")
    p.add_argument("--case", choices=["ours", "hf"])
    p.add_argument("--fmt", default="bf16", choices=["bf16", "fp8", "mxfp4"])
    p.add_argument("--hf-attn", default="eager")
    p.add_argument("--hf-experts", default=None, help="transformers experts implementation (default: its own)")
    p.add_argument("--no-ckpt", action="store_true")
    p.add_argument("--offload", action="store_true")
    p.add_argument("--pageable", action="store_true", help="offload to pageable host memory (model.offload_pinned: false)")
    p.add_argument("--moe-tile", type=int, default=0, help="model.moe_tile_tokens: experts in token tiles (0 = off)")
    p.add_argument("--seqs", default="4096")
    p.add_argument("--docs", type=int, default=4, help="documents packed per sequence")
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--iters", type=int, default=3)
    p.add_argument("--loss-chunk", type=int, default=4096)
    p.add_argument("--profile-seq", type=int, default=0)
    p.add_argument("--memory-census", action="store_true", help="on OOM, record what the live memory is")
    p.add_argument("--memory-phases", default="", help="sequence lengths to split memory by phase")
    p.add_argument("--peak-census-seq", type=int, default=0, help="list what is live at the peak of a step")
    p.add_argument("--torch-dequant", action="store_true", help="dequantise experts with the torch reference")
    p.add_argument("--session4-paths", action="store_true", help="session 5's changes off (use_session4_paths)")
    p.add_argument("--attention", default="flex", choices=("flex", "triton"),
                   help="ours: model.attention on the GPU (flex, or model/triton_attention.py's kernels)")
    p.add_argument("--attention-unmasked-interior", action="store_true",
                   help="ours, --attention triton: triton_attention.UNMASKED_INTERIOR on (no mask arithmetic on "
                        "interior blocks; prepared in session 7, not yet measured)")
    p.add_argument("--flex-options", default=None, help="JSON for attention.FLEX_KERNEL_OPTIONS (kernel options)")
    lora_k = p.add_mutually_exclusive_group()
    lora_k.add_argument("--lora-in-gemm-k", action="store_true",
                        help="ours: moe.LORA_IN_GEMM_K on (the default since session 7; kept so older plans still run)")
    lora_k.add_argument("--no-lora-in-gemm-k", action="store_true",
                        help="ours: moe.LORA_IN_GEMM_K off (the in-place LoRA update of bf16 expert outputs, the reference)")
    p.add_argument("--transformers-layer-loop", action="store_true",
                   help="ours: transformers' decoder loop (residual adds apart from the norms), for an A/B")
    p.add_argument("--cuda-graph", action="store_true", help="ours: the step as one CUDA graph (GraphedTrainStep)")
    p.add_argument("--gc-freeze", action="store_true", help="gc.collect(); gc.freeze() after the warmup steps")
    p.add_argument("--unfused", action="store_true",
                   help="session 3's paths: no fused kernels, LoRA projections or fused AdamW (see set_fused_kernels)")
    p.add_argument("--no-keep-dense", action="store_true",
                   help="with checkpointing, dequantise the experts again in backward (the session-3 behaviour)")
    p.add_argument("--shape", default="gpt-oss-20b")
    p.add_argument("--device", default="cuda")
    p.add_argument("--case-timeout", type=int, default=400)
    p.add_argument("--out", default="bench_results.jsonl")
    args = p.parse_args()
    if args.plan:
        run_plan(args)
    else:
        run_case(args)


if __name__ == "__main__":
    main()
