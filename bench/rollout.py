"""Rollout benchmark: decode tokens/s of rustforge's engine vs transformers' `generate`, and the
memory-bandwidth floor, in one run.

    python bench/rollout.py --out results.jsonl                                   # H100: 20B shape, MXFP4 base
    python bench/rollout.py --preset tiny --device cpu --batches 1 2 --new-tokens 8 --out /tmp/r.jsonl   # smoke
    python bench/rollout.py --plan grpo --expert-format mxfp4 --out results.jsonl   # GRPO steps, largest context

Order (each case's failure, OOM included, is recorded and the run goes on):
1. `check`: greedy decode of the engine == argmax of repeated full forwards of transformers' eager
   GptOssForCausalLM, token for token, on a small fp32 model whose prompts wrap the sliding window.
2. `ceiling`: copy bandwidth, 2 x bytes / time of a large device copy (each byte read once, written once).
3. `ours`: the 20B shape with random weights, MXFP4 experts, LoRA r16 on all targets, in each --weights
   mode (auto live merged compressed: rollout/weights.py), batch 1/16/64, `--prompt-len` random prompt tokens,
   `--new-tokens` decoded (no stop tokens). One warm-up generate (captures the CUDA graphs) then a timed
   one. decode_tok_s = tokens sampled by decode steps / decode time; e2e_tok_s = all sampled tokens / the
   whole generate call (prefill, and in merged mode the refresh of the merged weights, included).
   On CUDA also `graphs_check`: the same tokens with and without CUDA graphs at batch 16.
4. `hf`: transformers' GptOssForCausalLM in bf16 (the same shape, eager attention), `generate` greedy with
   min_new_tokens = max_new_tokens, in two modes (--hf-modes): `as_shipped` (on GPU generate swaps the
   experts to "batched_mm", which gathers a weight matrix per token and expert, prefill included) and
   `grouped_mm` (that swap turned off: transformers' fastest configuration that fits); decode_tok_s =
   B * (N - 1) / (t(N new tokens) - t(1 new token)), e2e_tok_s = B * N / t(N).

Bandwidth floor of one decode step at batch B (weights only; every weight byte read once per step):
    bytes(B) = L * [attention q,k,v,o weights + biases + sinks + 2 norms + router] (model dtype)
             + L * E_hit(B) * (3 * H * I weights * expert_bytes + (2I + H) biases * 2)
             + V * H * 2 (lm_head) + B * H * 2 (embedding rows)
    E_hit(B) = E * (1 - (1 - k/E)^B)   (distinct experts per layer if routing is uniform; random weights)
    floor_tok_s = B / (bytes(B) / copy_bandwidth)
expert_bytes: 17/32 for MXFP4 (a byte per two 4-bit values + one E8M0 scale per 32), 1 + 4/128 for FP8
(block scales), 2 for bf16. `floor_mxfp4` is the floor of an engine reading MXFP4 experts directly;
`floor_as_run` counts what ours reads: bf16 experts when merged (LoRA folded in), else the stored format:
"compressed" (and "live" where the decode kernels run) reads the routed experts as stored
(model/triton_moe_decode.py; the LoRA factors, <1% of it, not counted); "live" without them also writes
and reads back a dequantised copy of every expert, not counted. KV-cache bytes are reported apart
(`kv_bytes`: 2 * L_full * B * ctx * Hkv * D * 2 + 2 * L_sliding * B * min(W, ctx) * Hkv * D * 2).

`--plan grpo` (train/grpo.py's trainer on the 20B shape, random weights, LoRA r16, gradient checkpointing,
flex attention, the base in --expert-format): a cheap reward with no cargo (the share of even token ids;
no stop tokens, so every episode has its full length). `grpo_step`: two real GRPO steps of
--grpo-prompts x --grpo-generations episodes (--prompt-len prompt + --new-tokens sampled), the second
timed: rollout tokens/s (sampled tokens / rollout time), train tokens/s (episode tokens / time of the
reference forward + policy forward and backward), peak memory. `grpo_context`: the training half of a
step (reference forward, forward + backward, optimizer step) on two episodes of L tokens (half prompt,
half sampled) for each L of --grpo-seqs until one runs out of memory; with `rollout_kv_gib_per_slot`, the
KV cache one rollout slot needs at L (the rollout runs while no training state is alive).
"""

from __future__ import annotations

import argparse
import contextlib
import gc
import json
import sys
import time
import traceback
from dataclasses import replace
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "src"))
sys.path.insert(0, str(ROOT / "bench"))

from ceilings import copy_bandwidth  # bench/ceilings.py

from rustforge.config import LoraConfig, ModelConfig
from rustforge.model.presets import get_preset, hf_config


def emit(path: str | None, record: dict) -> None:
    print(json.dumps(record), flush=True)
    if path:
        with open(path, "a") as f:
            f.write(json.dumps(record) + "\n")


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def free_memory(device: torch.device) -> None:
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()


EXPERT_BYTES = {"mxfp4": 17 / 32, "fp8": 1 + 4 / 128, "bf16": 2.0}


def step_bytes(preset, batch: int, expert_format: str, dtype_bytes: int = 2) -> dict:
    """Weight bytes one decode step reads (module docstring formula)."""
    H, Hq, Hkv, D = preset.hidden_size, preset.num_attention_heads, preset.num_key_value_heads, preset.head_dim
    E, k, I, L, V = preset.num_local_experts, preset.num_experts_per_tok, preset.intermediate_size, preset.num_hidden_layers, preset.vocab_size
    attention = (H * Hq * D + 2 * H * Hkv * D + Hq * D * H) + (Hq * D + 2 * Hkv * D + H) + Hq + 2 * H
    router = E * H + E
    experts_hit = E * (1 - (1 - k / E) ** batch)
    per_expert = 3 * H * I * EXPERT_BYTES[expert_format] + (2 * I + H) * 2
    dense = L * (attention + router) * dtype_bytes + V * H * dtype_bytes + batch * H * dtype_bytes
    return {"experts_hit": experts_hit, "bytes": dense + L * experts_hit * per_expert}


def expert_format_read(weights_mode: str, expert_format: str) -> str:
    """The expert format a decode step reads in this engine weights mode (module docstring)."""
    return "bf16" if weights_mode == "merged" else expert_format


def kv_bytes(preset, batch: int, context: int, dtype_bytes: int = 2) -> int:
    per_token = 2 * preset.num_key_value_heads * preset.head_dim * dtype_bytes
    full = preset.num_hidden_layers // 2  # layers alternate, sliding first (presets.hf_config)
    sliding = preset.num_hidden_layers - full
    return batch * per_token * (full * context + sliding * min(preset.sliding_window, context))


# ------------------------------------------------------------------------------------------ check
def small_reference(device: torch.device, dtype: torch.dtype):
    preset = replace(
        get_preset("tiny"), num_hidden_layers=4, hidden_size=64, num_attention_heads=4, num_key_value_heads=2,
        head_dim=16, num_local_experts=4, num_experts_per_tok=2, intermediate_size=64, sliding_window=8,
        initializer_range=0.2,
    )  # fmt: skip
    from transformers import GptOssForCausalLM

    cfg = hf_config(preset, vocab_size=96)
    cfg._attn_implementation = "eager"
    cfg._experts_implementation = "eager"
    torch.manual_seed(0)
    return GptOssForCausalLM(cfg).to(device=device, dtype=dtype).eval()


@torch.no_grad()
def check_greedy(device: torch.device, new_tokens: int = 24) -> dict:
    from rustforge.rollout import RolloutEngine, SamplingParams

    model = small_reference(device, torch.float32)
    g = torch.Generator().manual_seed(1)
    prompts = [torch.randint(0, 96, (n,), generator=g).tolist() for n in (3, 11, 20, 30)]
    engine = RolloutEngine(model, max_batch=4, max_len=64)
    got = engine.generate(prompts, SamplingParams(temperature=0.0, max_new_tokens=new_tokens))
    mismatches = []
    for i, (prompt, completion) in enumerate(zip(prompts, got)):
        ids = list(prompt)
        for step in range(new_tokens):
            token = int(model(torch.tensor([ids], device=device)).logits[0, -1].argmax())
            if completion.output_ids[step] != token:
                mismatches.append({"prompt": i, "step": step, "ours": completion.output_ids[step], "transformers": token})
                break
            ids.append(token)
    return {"ok": not mismatches, "prompts": len(prompts), "new_tokens": new_tokens, "mismatches": mismatches}


# -------------------------------------------------------------------------------------- our engine
def build_ours(args, device, train: bool = False):
    """Our model as the stages build it; train=True adds what training needs (flex attention on GPU,
    gradient checkpointing)."""
    from rustforge.model.gptoss import build_model

    mcfg = ModelConfig(
        preset=args.preset,
        experts="grouped",
        expert_format=args.expert_format,
        dtype="bfloat16" if device.type == "cuda" else "float32",
        attention="auto" if train else "eager",
        gradient_checkpointing=train,
        moe_tile_tokens=args.moe_tile if train else 0,
    )
    return build_model(mcfg, LoraConfig(r=16, alpha=32), device=device)


def random_prompts(batch: int, length: int, vocab: int, seed: int = 0) -> list[list[int]]:
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, vocab, (batch, length), generator=g).tolist()


def time_ours(engine, prompts, new_tokens: int, device) -> dict:
    from rustforge.rollout import SamplingParams

    params = SamplingParams(temperature=0.0, max_new_tokens=new_tokens)
    engine.generate(prompts, params)  # warm-up: CUDA graph captures, merged weights
    engine.stats = type(engine.stats)()
    sync(device)
    t = time.perf_counter()
    completions = engine.generate(prompts, params)
    sync(device)
    elapsed = time.perf_counter() - t
    stats = engine.stats
    produced = sum(c.num_sampled for c in completions)
    return {
        "decode_tok_s": stats.decode_tok_s,
        "e2e_tok_s": produced / elapsed,
        "decode_step_ms": 1e3 * stats.decode_s / max(1, stats.decode_steps),
        "prefill_s": stats.prefill_s,
        "elapsed_s": elapsed,
        "graph_captures_total": engine.stats.graph_captures,
        "tokens": produced,
    }


def bench_ours(args, device, bandwidth: float) -> None:
    from rustforge.rollout import RolloutEngine
    from rustforge.rollout.weights import decode_kernels_serve

    preset = get_preset(args.preset)
    t0 = time.perf_counter()
    try:
        model = build_ours(args, device)
    except Exception as e:  # noqa: BLE001 - a failed build is a result
        emit(args.out, {"record": "ours", "error": type(e).__name__, "detail": str(e)[:300]})
        return
    vocab = model.config.vocab_size
    weights_gib = torch.cuda.memory_allocated(device) / 2**30 if device.type == "cuda" else 0.0
    emit(args.out, {"record": "ours_built", "build_s": time.perf_counter() - t0, "weights_gib": weights_gib})
    max_len = args.prompt_len + args.new_tokens + 1
    for mode in args.weights:
        engine = None
        for batch in args.batches:
            rec = {"record": "ours", "preset": args.preset, "expert_format": args.expert_format, "weights": mode,
                   "batch": batch, "prompt_len": args.prompt_len, "new_tokens": args.new_tokens}  # fmt: skip
            try:
                if engine is None or engine.max_batch < batch:
                    engine = None
                    free_memory(device)
                    engine = RolloutEngine(model, max_batch=max(args.batches), max_len=max_len, weights=mode,
                                           cuda_graphs=not args.no_graphs)  # fmt: skip
                if device.type == "cuda":
                    torch.cuda.reset_peak_memory_stats(device)
                rec.update(time_ours(engine, random_prompts(batch, args.prompt_len, vocab), args.new_tokens, device))
                rec["weights_mode"] = engine.weights_mode
                rec["decode_kernels"] = decode_kernels_serve(engine.hf)  # experts read as stored at decode
                rec["cuda_graphs"] = engine.use_graphs
                rec["peak_gib"] = torch.cuda.max_memory_allocated(device) / 2**30 if device.type == "cuda" else 0.0
                as_run = expert_format_read(engine.weights_mode, args.expert_format)
                context = args.prompt_len + args.new_tokens // 2
                for name, fmt in (("floor_mxfp4", "mxfp4"), ("floor_as_run", as_run)):
                    need = step_bytes(preset, batch, fmt)
                    rec[f"{name}_tok_s"] = batch / (need["bytes"] / bandwidth)
                    rec[f"{name}_bytes"] = need["bytes"]
                rec["experts_hit_per_layer"] = step_bytes(preset, batch, "mxfp4")["experts_hit"]
                rec["kv_bytes"] = kv_bytes(preset, batch, context)
                rec["fraction_of_floor_as_run"] = rec["decode_tok_s"] / rec["floor_as_run_tok_s"]
                rec["ok"] = True
            except torch.OutOfMemoryError as e:
                rec.update(ok=False, error="OOM", detail=str(e).splitlines()[0][:200])
                engine = None
            except Exception as e:  # noqa: BLE001
                rec.update(ok=False, error=type(e).__name__, detail=traceback.format_exc()[-1200:])
                engine = None
            emit(args.out, rec)
            free_memory(device)
        if device.type == "cuda" and engine is not None and engine.use_graphs and 16 in args.batches:
            emit(args.out, graphs_check(engine, vocab, args, mode))
        engine = None
        free_memory(device)
    del model
    free_memory(device)


@torch.no_grad()
def graphs_check(engine, vocab, args, mode) -> dict:
    """Greedy and sampled tokens with and without CUDA graphs: the same engine (its merged weights are
    not copied twice), replaying its graphs, then running the same step code eagerly."""
    from rustforge.rollout import SamplingParams

    rec = {"record": "graphs_check", "weights": mode}
    try:
        prompts = random_prompts(16, args.prompt_len, vocab, seed=1)
        for name, params in (("greedy", SamplingParams(0.0, max_new_tokens=16)),
                             ("sampled", SamplingParams(1.0, top_p=0.95, max_new_tokens=16, seed=3))):  # fmt: skip
            engine.use_graphs = True
            a = [c.output_ids for c in engine.generate(prompts, params)]
            engine.use_graphs = False
            b = [c.output_ids for c in engine.generate(prompts, params)]
            rec[f"{name}_identical_rows"] = sum(x == y for x, y in zip(a, b))
        engine.use_graphs = True
        rec["rows"] = 16
        rec["graph_captures"] = engine.stats.graph_captures
        rec["ok"] = rec["greedy_identical_rows"] == 16
    except Exception as e:  # noqa: BLE001
        rec.update(ok=False, error=type(e).__name__, detail=str(e)[:300])
    return rec


# ------------------------------------------------------------------------------------ transformers
def build_hf(args, device):
    from transformers import GptOssForCausalLM

    cfg = hf_config(get_preset(args.preset))
    cfg._attn_implementation = "eager"
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    previous = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        torch.manual_seed(0)
        with device:
            model = GptOssForCausalLM(cfg)
    finally:
        torch.set_default_dtype(previous)
    return model.eval()


def keep_grouped_mm_in_generate(model) -> bool:
    """transformers' generate swaps the experts to "batched_mm" on GPU for the whole call (prefill too), which
    gathers a weight matrix per (token, expert): 253 GiB at 16 x 128 prompt tokens. Keeping "grouped_mm" is
    transformers' fastest configuration that fits; returns whether the switch was found and turned off."""
    if not hasattr(model, "_optimize_model_for_decode"):
        return False
    model._optimize_model_for_decode = contextlib.nullcontext  # instance attribute shadows the method
    return True


@torch.no_grad()
def bench_hf(args, device) -> None:
    t0 = time.perf_counter()
    try:
        model = build_hf(args, device)
    except Exception as e:  # noqa: BLE001
        emit(args.out, {"record": "hf", "error": type(e).__name__, "detail": str(e)[:300]})
        return
    experts_impl = getattr(model.config, "_experts_implementation", None)
    emit(args.out, {"record": "hf_built", "build_s": time.perf_counter() - t0, "experts_implementation": str(experts_impl)})
    for mode in args.hf_modes:
        if mode == "grouped_mm" and not keep_grouped_mm_in_generate(model):
            emit(args.out, {"record": "hf", "hf_mode": mode, "ok": False, "error": "no decode switch to turn off"})
            continue
        for batch in args.batches:
            emit(args.out, time_hf(args, model, device, batch, mode))
            free_memory(device)
    del model
    free_memory(device)


def time_hf(args, model, device, batch: int, mode: str) -> dict:
    rec = {"record": "hf", "preset": args.preset, "batch": batch, "prompt_len": args.prompt_len,
           "new_tokens": args.new_tokens, "hf_mode": mode}  # fmt: skip
    try:
        ids = torch.tensor(random_prompts(batch, args.prompt_len, model.config.vocab_size), device=device)
        mask = torch.ones_like(ids)

        def run(n):
            sync(device)
            t = time.perf_counter()
            out = model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=n, min_new_tokens=n,
                                 do_sample=False, pad_token_id=0, eos_token_id=None)  # fmt: skip
            sync(device)
            assert out.shape[1] == ids.shape[1] + n
            return time.perf_counter() - t

        if device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(device)
        run(2)  # warm-up
        first, full = run(1), run(args.new_tokens)
        rec.update(ok=True, e2e_tok_s=batch * args.new_tokens / full, elapsed_s=full, prefill_plus_one_s=first,
                   decode_tok_s=batch * (args.new_tokens - 1) / max(full - first, 1e-9),
                   peak_gib=torch.cuda.max_memory_allocated(device) / 2**30 if device.type == "cuda" else 0.0)  # fmt: skip
    except torch.OutOfMemoryError as e:
        rec.update(ok=False, error="OOM", detail=str(e).splitlines()[0][:200])
    except Exception as e:  # noqa: BLE001
        rec.update(ok=False, error=type(e).__name__, detail=traceback.format_exc()[-1200:])
    return rec


# --------------------------------------------------------------------------------------------- grpo
class HarmonyIds:
    """The o200k_harmony special ids the trainer needs (no tokenizer file on the GPU machine)."""

    start_id, end_id, message_id, channel_id, return_id, call_id = 200006, 200007, 200008, 200005, 200002, 200012

    def encode(self, text, allow_special=True):
        return [173781]


def grpo_trainer(args, model, device, seq_len: int, stage_dir: Path):
    from rustforge.config import CurriculumPhase, GrpoConfig, RolloutConfig
    from rustforge.rollout.environments import Prompt, TokenShareEnvironment
    from rustforge.train.grpo import GrpoTrainer, PromptSource
    from rustforge.train.sft import StageData

    vocab = model.config.vocab_size
    prompts = [Prompt(f"p{i}", ids) for i, ids in enumerate(random_prompts(args.grpo_prompts, args.prompt_len, vocab))]
    cfg = GrpoConfig(
        lr=1e-6, warmup_steps=0, phases=[CurriculumPhase(seq_len, 1000)], init_from="none",
        prompts_per_step=args.grpo_prompts, num_generations=args.grpo_generations,
        max_prompt_length=min(args.prompt_len, seq_len - 1), max_completion_length=args.new_tokens, val_prompts=0,
    )  # fmt: skip
    data = StageData(train=lambda phase, n: PromptSource(prompts, cfg.prompts_per_step, 0), validation=lambda n: [])
    rollout = RolloutConfig(max_batch=args.grpo_prompts * args.grpo_generations, cuda_graphs=not args.no_graphs)
    trainer = GrpoTrainer(
        model, LoraConfig(r=16, alpha=32), cfg, data, stage_dir, device, False, None, grpo_cfg=cfg, rollout_cfg=rollout,
        environment=TokenShareEnvironment({"train": prompts}), tokenizer=HarmonyIds(), val_prompts=[],
    )  # fmt: skip
    trainer.stop_ids = []  # random weights: every episode runs to its token budget
    trainer._enter_phase(0)
    return trainer


def bench_grpo(args, device) -> None:
    import tempfile

    import numpy as np

    from rustforge.train.grpo import Episode, token_weights

    preset = get_preset(args.preset)
    base = {"record": "grpo", "preset": args.preset, "expert_format": args.expert_format}
    t0 = time.perf_counter()
    try:
        model = build_ours(args, device, train=True)
    except Exception as e:  # noqa: BLE001
        emit(args.out, {**base, "event": "build", "ok": False, "error": type(e).__name__, "detail": str(e)[:300]})
        return
    emit(args.out, {**base, "event": "build", "ok": True, "build_s": time.perf_counter() - t0,
                    "weights_gib": torch.cuda.memory_allocated(device) / 2**30 if device.type == "cuda" else 0.0})  # fmt: skip
    stage_dir = Path(tempfile.mkdtemp(prefix="bench-grpo-"))
    seq_len = args.prompt_len + args.new_tokens + 1
    rec = {**base, "event": "grpo_step", "prompts": args.grpo_prompts, "generations": args.grpo_generations,
           "prompt_len": args.prompt_len, "completion_len": args.new_tokens}  # fmt: skip
    try:
        trainer = grpo_trainer(args, model, device, seq_len, stage_dir)
        trainer.train_step()
        trainer.step += 1
        metrics = trainer.train_step()
        keep = ("rollout_tok_s", "decode_tok_s", "train_tok_s", "rollout_s", "train_s", "step_s", "memory_gb",
                "micro_batch_tokens", "reward", "kl", "loss", "grad_norm")  # fmt: skip
        rec.update(ok=True, **{k: metrics[k] for k in keep if k in metrics})
        rec["rollout_weights"] = getattr(trainer.engine, "weights_mode", None)
        trainer.close()
    except Exception as e:  # noqa: BLE001 - OOM included: a result
        rec.update(ok=False, error=type(e).__name__, detail=traceback.format_exc()[-1200:])
    emit(args.out, rec)
    trainer = None
    free_memory(device)
    for length in args.grpo_seqs:
        rec = {**base, "event": "grpo_context", "seq_len": length, "episodes": 2}
        try:
            trainer = grpo_trainer(args, model, device, length, stage_dir)
            g = torch.Generator().manual_seed(length)
            episodes = []
            for advantage in (1.0, -1.0):
                ids = torch.randint(0, model.config.vocab_size, (length,), generator=g).numpy()
                trained = np.zeros(length, np.int8)
                trained[length // 2 :] = 1
                episodes.append(Episode(ids, trained, advantage, 0.0))
            weights = token_weights(torch.tensor([e.trained_tokens for e in episodes]), "dapo", length)
            for e, w in zip(episodes, weights.tolist()):
                e.weight = w
            if device.type == "cuda":
                torch.cuda.reset_peak_memory_stats(device)
            sync(device)
            t = time.perf_counter()
            metrics = trainer.optimize(episodes)
            sync(device)
            elapsed = time.perf_counter() - t
            rec.update(ok=True, train_s=elapsed, train_tok_s=2 * length / elapsed, micro_batch_tokens=trainer.micro_tokens,
                       peak_gib=torch.cuda.max_memory_allocated(device) / 2**30 if device.type == "cuda" else 0.0,
                       loss=metrics.get("loss"),
                       rollout_kv_gib_per_slot=kv_bytes(preset, 1, length) / 2**30)  # fmt: skip
            trainer.close()
        except torch.OutOfMemoryError as e:
            rec.update(ok=False, error="OOM", detail=str(e).splitlines()[0][:200])
        except Exception as e:  # noqa: BLE001
            rec.update(ok=False, error=type(e).__name__, detail=traceback.format_exc()[-1200:])
        emit(args.out, rec)
        trainer = None
        free_memory(device)
        if not rec["ok"]:
            break


# ------------------------------------------------------------------------------------------- main
def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--preset", default="gpt-oss-20b")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--expert-format", default="mxfp4", choices=["mxfp4", "fp8", "bf16"])
    p.add_argument("--weights", nargs="+", default=["auto"], choices=["auto", "live", "merged", "compressed"],
                   help="engine weight modes to time (rollout/weights.py)")
    p.add_argument("--batches", nargs="+", type=int, default=[1, 16, 64])
    p.add_argument("--prompt-len", type=int, default=128)
    p.add_argument("--new-tokens", type=int, default=64)
    p.add_argument("--copy-gib", type=float, default=None, help="size of the bandwidth copy (default 2 GPU, 0.25 CPU)")
    p.add_argument("--no-graphs", action="store_true")
    p.add_argument("--skip", nargs="*", default=[], choices=["check", "ours", "hf"])
    p.add_argument("--plan", default="decode", choices=["decode", "grpo"])
    p.add_argument("--hf-modes", nargs="+", default=["as_shipped", "grouped_mm"], choices=["as_shipped", "grouped_mm"],
                   help="transformers' generate as shipped (batched_mm experts on GPU) and with grouped_mm kept")
    p.add_argument("--grpo-prompts", type=int, default=4)
    p.add_argument("--grpo-generations", type=int, default=8)
    p.add_argument("--moe-tile", type=int, default=0, help="model.moe_tile_tokens for the GRPO plan (0 = off)")
    p.add_argument("--grpo-seqs", nargs="+", type=int, default=[8192, 16384, 32768, 65536])
    p.add_argument("--out", default=None, help="JSON lines are appended here (and printed)")
    return p.parse_args(argv)


def main(argv=None) -> int:
    args = parse_args(argv)
    device = torch.device(args.device)
    if device.type == "cpu":
        torch.set_num_threads(1)  # the smoke run shares 2 cores; oversubscribed threads make CPU timings noise
    import transformers

    env = {"record": "env", "torch": torch.__version__, "transformers": transformers.__version__,
           "device": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
           "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()), "args": vars(args)}  # fmt: skip
    emit(args.out, env)
    started = time.perf_counter()
    if args.plan == "grpo":
        bench_grpo(args, device)
        emit(args.out, {"record": "done", "total_s": time.perf_counter() - started})
        return 0
    if "check" not in args.skip:
        try:
            emit(args.out, {"record": "check", **check_greedy(device)})
        except Exception as e:  # noqa: BLE001
            emit(args.out, {"record": "check", "ok": False, "error": type(e).__name__, "detail": traceback.format_exc()[-1200:]})
        free_memory(device)
    gib = args.copy_gib if args.copy_gib is not None else (2.0 if device.type == "cuda" else 0.25)
    bandwidth = copy_bandwidth(device, gib)
    emit(args.out, {"record": "ceiling", "copy_bytes_per_s": bandwidth, "copy_tb_s": bandwidth / 1e12})
    free_memory(device)
    if "ours" not in args.skip:
        bench_ours(args, device, bandwidth)
    if "hf" not in args.skip:
        bench_hf(args, device)
    emit(args.out, {"record": "done", "total_s": time.perf_counter() - started})
    return 0


if __name__ == "__main__":
    sys.exit(main())
