"""The rollout engine against full forwards of the reference model, on CPU with a small GPT-OSS.

The model here is the GPT-OSS architecture shrunk further than the tiny preset (window 8, so prompts of
20+ tokens wrap the sliding layers' ring buffers, and decoding runs far past the window). Exactness
tests run in float64, where greedy ties cannot flip a token, and compare token for token with repeated
full forwards of transformers' eager GptOssForCausalLM, or of RustforgeModel (LoRA + grouped experts).
"""

from __future__ import annotations

import math
from concurrent.futures import ThreadPoolExecutor
from dataclasses import replace

import pytest
import torch
from transformers import GptOssForCausalLM

from rustforge.config import LoraConfig, ModelConfig
from rustforge.model.attention import reference_attention
from rustforge.model.gptoss import RustforgeModel
from rustforge.model.lora import apply_lora
from rustforge.model.moe import install_experts
from rustforge.model.presets import get_preset, hf_config
from rustforge.rollout import RolloutEngine, SamplingParams
from rustforge.rollout.attention import attend, window_allowed
from rustforge.rollout.kv_cache import KVCache
from rustforge.rollout.sampling import counter_uniform, sample_tokens

VOCAB, WINDOW = 96, 8


def small_config(window: int = WINDOW):
    preset = replace(
        get_preset("tiny"), num_hidden_layers=4, hidden_size=64, num_attention_heads=4, num_key_value_heads=2,
        head_dim=16, num_local_experts=4, num_experts_per_tok=2, intermediate_size=64, sliding_window=window,
        initializer_range=0.2,
    )  # fmt: skip
    cfg = hf_config(preset, vocab_size=VOCAB)
    cfg._attn_implementation = "eager"
    cfg._experts_implementation = "eager"  # transformers' per-expert loop: the reference
    return cfg


@pytest.fixture(scope="module")
def reference():
    torch.manual_seed(0)
    return GptOssForCausalLM(small_config()).double().eval()


def rustforge_model(fmt: str = "bf16", dtype=torch.float64) -> RustforgeModel:
    """LoRA on every target with random B (so the adapter changes the function) and grouped experts."""
    torch.manual_seed(0)
    hf = GptOssForCausalLM(small_config()).to(dtype)
    lora = LoraConfig(r=4, alpha=8)
    install_experts(hf, "grouped", fmt, lora)
    apply_lora(hf, lora)
    with torch.no_grad():
        for name, p in hf.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.1)
    hf.to(dtype)
    return RustforgeModel(hf, ModelConfig(loss_chunk_size=64), "eager").eval()


def prompts_of(lengths, seed=1):
    g = torch.Generator().manual_seed(seed)
    return [torch.randint(0, VOCAB, (n,), generator=g).tolist() for n in lengths]


@torch.no_grad()
def greedy_reference(next_logits, prompt, steps):
    ids, out = list(prompt), []
    for _ in range(steps):
        token = int(next_logits(ids).argmax())
        out.append(token)
        ids.append(token)
    return out


def hf_next(model):
    return lambda ids: model(torch.tensor([ids], device=model.device)).logits[0, -1]


def rustforge_next(model: RustforgeModel):
    def next_logits(ids):
        x = torch.tensor([ids], device=model.hf.device)
        hidden = model.hidden_states(x, torch.arange(len(ids), device=x.device)[None], torch.zeros_like(x))
        return model.hf.lm_head(hidden[0, -1])

    return next_logits


GREEDY = SamplingParams(temperature=0.0, max_new_tokens=24)


# ------------------------------------------------------------------------------------- exactness
@pytest.mark.parametrize("prefill_chunk", [512, 5])
def test_greedy_decode_equals_full_forwards_of_transformers(reference, prefill_chunk):
    """Prompts shorter and longer than the window (20 and 30 wrap the ring before decoding starts), 24 new
    tokens (decoding wraps it again); a 5-token prefill chunk puts the window across chunk boundaries."""
    prompts = prompts_of([3, 11, 20, 30])
    engine = RolloutEngine(reference, max_batch=4, max_len=64, prefill_chunk=prefill_chunk)
    completions = engine.generate(prompts, GREEDY)
    for prompt, completion in zip(prompts, completions):
        assert completion.output_ids == greedy_reference(hf_next(reference), prompt, 24)
        assert completion.finish_reason == "length" and completion.sampled_mask == [1] * 24


@pytest.mark.parametrize("weights", ["live", "merged", "compressed"])
@pytest.mark.parametrize("fmt", ["bf16", "mxfp4"])
def test_greedy_decode_equals_rustforge_forward_with_lora(weights, fmt):
    model = rustforge_model(fmt)
    prompts = prompts_of([6, 25], seed=2)
    engine = RolloutEngine(model, max_batch=2, max_len=64, weights=weights)
    model.train()  # the engine samples in eval mode and gives the training mode back
    completions = engine.generate(prompts, GREEDY)
    assert model.hf.training
    model.eval()
    for prompt, completion in zip(prompts, completions):
        assert completion.output_ids == greedy_reference(rustforge_next(model), prompt, 24)


def test_compressed_weights_merge_attention_and_serve_the_model_experts():
    """"compressed" copies no expert: each layer serves the model's own GroupedExperts (decode kernels on
    a GPU), with the attention LoRA merged; on CPU "auto" stays live."""
    from rustforge.rollout.weights import EngineWeights, _MergedLinear, decode_kernels_serve, merged_bytes

    model = rustforge_model("mxfp4")
    weights = EngineWeights(model.hf, "compressed")
    for layer, w in zip(model.hf.model.layers, weights.layers):
        assert w.experts is layer.mlp.experts
        assert all(isinstance(p, _MergedLinear) for p in (w.q, w.k, w.v, w.o))
    attention = merged_bytes(model.hf, "compressed")
    assert 0 < attention < merged_bytes(model.hf, "merged") and merged_bytes(model.hf, "live") == 0
    assert not decode_kernels_serve(model.hf)  # CPU
    assert RolloutEngine(model, max_batch=1, max_len=16).weights_mode == "live"


def test_lora_matters_and_merged_weights_follow_updates():
    """The LoRA changes the tokens; after an in-place update of the adapter the merged snapshot is
    refreshed by the next generate (what GRPO relies on between optimizer steps)."""
    model = rustforge_model()
    prompt = prompts_of([12], seed=3)
    engine = RolloutEngine(model, max_batch=1, max_len=64, weights="merged")
    before = engine.generate(prompt, GREEDY)[0].output_ids
    with torch.no_grad():
        for name, p in model.hf.named_parameters():
            if "lora_B" in name:
                p.mul_(-1.0)
    after = engine.generate(prompt, GREEDY)[0].output_ids
    assert after != before
    assert after == greedy_reference(rustforge_next(model), prompt[0], 24)


def test_a_batch_of_different_lengths_equals_each_prompt_alone(reference):
    prompts = prompts_of([2, 9, 17, 26, 33], seed=4)
    params = SamplingParams(temperature=1.0, top_p=0.9, max_new_tokens=16, seed=7)
    together = RolloutEngine(reference, max_batch=8, max_len=64).generate(prompts, params)
    alone_engine = RolloutEngine(reference, max_batch=1, max_len=64)
    for i, prompt in enumerate(prompts):
        alone = alone_engine.generate([prompt], params, streams=[i])[0]
        assert alone.output_ids == together[i].output_ids
        assert alone.logprobs == pytest.approx(together[i].logprobs, abs=1e-5)  # float32 log-probs


def test_continuous_batching_equals_one_at_a_time(reference):
    """7 requests through 2 slots: finished sequences free their slot for the queue, slots get compacted,
    and (counter-based sampling) every request samples what it samples alone."""
    prompts = prompts_of([4, 15, 4, 22, 7, 12, 9], seed=5)
    prompts[2] = prompts[0]  # same prompt, another stream: shared prefill, independent samples
    params = SamplingParams(temperature=1.2, max_new_tokens=20, seed=3)
    stop = (5, 17)
    engine = RolloutEngine(reference, max_batch=2, max_len=48, stop_ids=stop)
    batched = engine.generate(prompts, params)
    alone_engine = RolloutEngine(reference, max_batch=1, max_len=48, stop_ids=stop)
    for i, prompt in enumerate(prompts):
        assert alone_engine.generate([prompt], params, streams=[i])[0].output_ids == batched[i].output_ids
    assert batched[0].output_ids != batched[2].output_ids
    assert {c.finish_reason for c in batched} <= {"stop", "length"}
    assert len({len(c.output_ids) for c in batched}) > 1  # lengths differ: slots were freed at different steps


def test_identical_prompts_share_one_prefill(reference):
    prompt = prompts_of([18], seed=6)[0]
    engine = RolloutEngine(reference, max_batch=4, max_len=48)
    params = SamplingParams(temperature=1.0, max_new_tokens=8, seed=1)
    shared = engine.generate([prompt] * 4, params)
    assert engine.stats.prefill_tokens == len(prompt)
    for i in range(4):
        alone = RolloutEngine(reference, max_batch=1, max_len=48).generate([prompt], params, streams=[i])[0]
        assert alone.output_ids == shared[i].output_ids


# ---------------------------------------------------------------------------------- stops, budgets
def test_stop_tokens_end_a_sequence_and_the_context_bound_holds(reference):
    prompt = prompts_of([10], seed=7)[0]
    free_run = greedy_reference(hf_next(reference), prompt, 24)
    stop = free_run[5]
    first = free_run.index(stop)
    out = RolloutEngine(reference, max_batch=1, max_len=64, stop_ids=[stop]).generate([prompt], GREEDY)[0]
    assert out.output_ids == free_run[: first + 1] and out.finish_reason == "stop"
    # per-call stop ids override the engine's; max_len caps prompt + output
    out = RolloutEngine(reference, max_batch=1, max_len=16, stop_ids=[stop]).generate([prompt], GREEDY, stop_ids=[])[0]
    assert out.output_ids == free_run[:6] and out.finish_reason == "max_len"
    with pytest.raises(ValueError, match="prompt 0 has 16 tokens"):
        RolloutEngine(reference, max_batch=1, max_len=16).generate([list(range(16))], GREEDY)


def test_on_stop_continues_from_the_cache(reference):
    """A continuation appends environment tokens (mask 0) and the model goes on from its cache: the
    tokens after it equal greedy decoding of the whole sequence from scratch. The handler runs on a
    thread pool while the other sequence keeps decoding."""
    prompts = prompts_of([9, 14], seed=8)
    free_runs = [greedy_reference(hf_next(reference), p, 24) for p in prompts]
    stop = free_runs[0][3]
    extension = [1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11]  # longer than the window: the ring wraps in the prefill
    calls = []

    def on_stop(state):
        calls.append(state.index)
        return pool.submit(lambda: list(extension)) if state.turns == 0 and state.index == 0 else None

    with ThreadPoolExecutor(1) as pool:
        engine = RolloutEngine(reference, max_batch=2, max_len=80, stop_ids=[stop])
        out = engine.generate(prompts, SamplingParams(temperature=0.0, max_new_tokens=20), on_stop=on_stop)
    first = out[0]
    cut = free_runs[0].index(stop) + 1
    assert first.output_ids[:cut] == free_runs[0][:cut]
    assert first.output_ids[cut : cut + len(extension)] == extension
    assert first.sampled_mask == [1] * cut + [0] * len(extension) + [1] * (len(first.output_ids) - cut - len(extension))
    assert first.turns == 1 and first.num_sampled <= 20
    rest = first.output_ids[cut + len(extension) :]
    history = prompts[0] + first.output_ids[: cut + len(extension)]
    want = greedy_reference(hf_next(reference), history, len(rest))
    if stop in want:  # the continuation may itself stop at the stop token
        want = want[: want.index(stop) + 1]
    assert rest == want
    assert 0 in calls


# --------------------------------------------------------------------------------------- sampling
def test_top_p_sampling_matches_the_nucleus_distribution():
    logits = torch.tensor([[2.0, 1.5, 1.0, 0.0, -1.0, -3.0]])
    probs = torch.softmax(logits[0], 0)
    top_p = 0.8  # nucleus: the smallest prefix with mass >= 0.8
    nucleus = int((torch.cumsum(probs, 0) < top_p).sum()) + 1
    n = 20000
    tokens, logprobs = sample_tokens(
        logits.expand(n, -1), False, 1.0, top_p, 11, torch.arange(n), torch.zeros(n, dtype=torch.long)
    )
    counts = torch.bincount(tokens, minlength=6).double() / n
    want = torch.zeros(6, dtype=torch.float64)
    want[:nucleus] = probs[:nucleus].double() / probs[:nucleus].sum()
    assert counts[nucleus:].sum() == 0  # nothing outside the nucleus
    assert torch.allclose(counts, want, atol=4 * math.sqrt(0.25 / n))
    assert torch.allclose(logprobs, torch.log_softmax(logits[0], 0)[tokens])
    # temperature: T -> 0 concentrates on the argmax, large T flattens
    cold, _ = sample_tokens(logits.expand(n, -1), False, 0.05, 1.0, 11, torch.arange(n), torch.zeros(n, dtype=torch.long))
    hot, _ = sample_tokens(logits.expand(n, -1), False, 50.0, 1.0, 11, torch.arange(n), torch.zeros(n, dtype=torch.long))
    assert (cold == 0).float().mean() > 0.99
    assert torch.bincount(hot, minlength=6).min() > n / 6 * 0.8


def test_counter_uniform_is_uniform_and_a_function_of_its_counters():
    streams = torch.arange(4000).repeat_interleave(5)
    positions = torch.arange(5).repeat(4000)
    u = counter_uniform(3, streams, positions)
    assert 0 < float(u.min()) and float(u.max()) < 1
    assert abs(float(u.mean()) - 0.5) < 0.01 and abs(float(u.var()) - 1 / 12) < 0.005
    assert torch.equal(u, counter_uniform(3, streams, positions))
    assert not torch.equal(u, counter_uniform(4, streams, positions))
    histogram = torch.histc(u, bins=10, min=0, max=1)
    assert float(histogram.min()) > 0.9 * len(u) / 10


# --------------------------------------------------------------------------------- cache, attention
def test_ring_positions_hold_the_last_capacity_positions():
    cache = KVCache(["sliding_attention", "full_attention"], 4, 1, 2, 1, 32, torch.float32, "cpu")
    held = cache.ring_positions(0, torch.tensor([0, 3, 4, 10]))
    assert held.tolist() == [[-1, -1, -1, -1], [0, 1, 2, -1], [0, 1, 2, 3], [8, 9, 6, 7]]
    assert cache.capacity == [4, 32]
    assert KVCache.bytes_for(["sliding_attention", "full_attention"], 4, 1, 2, 3, 32, torch.float32) == cache.nbytes() * 3


def test_attend_equals_the_reference_attention_with_sinks_and_window():
    torch.manual_seed(0)
    B, Hq, Hkv, T, D = 2, 4, 2, 11, 8
    q, k, v = torch.randn(B, Hq, T, D, dtype=torch.float64), torch.randn(B, Hkv, T, D, dtype=torch.float64), torch.randn(B, Hkv, T, D, dtype=torch.float64)
    sinks = torch.randn(Hq, dtype=torch.float64)
    positions = torch.arange(T).expand(B, T)
    for window in (None, 4):
        want = reference_attention(q, k, v, sinks, torch.zeros(B, T, dtype=torch.long), window, 0.3)
        got = attend(q, k, v, window_allowed(positions, positions, window), sinks, 0.3)
        assert torch.allclose(got, want.reshape(B, T, Hq * D), atol=1e-12)


def test_the_vllm_backend_says_how_to_get_vllm():
    import importlib.util

    from rustforge.rollout.vllm_backend import VllmEngine

    if importlib.util.find_spec("vllm") is not None:
        pytest.skip("vllm is installed")
    with pytest.raises(RuntimeError, match="vllm is not installed.*rollout.backend: rustforge"):
        VllmEngine("/nonexistent")


# --------------------------------------------------------------------------------------------- GPU
@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_gpu_graphs_decode_the_same_tokens_as_eager_and_fp32_matches_transformers():
    torch.manual_seed(0)
    ref = GptOssForCausalLM(small_config()).float().cuda().eval()
    prompts = prompts_of([5, 21, 30])
    got = RolloutEngine(ref, max_batch=4, max_len=64).generate(prompts, GREEDY)
    for prompt, completion in zip(prompts, got):
        assert completion.output_ids == greedy_reference(hf_next(ref), prompt, 24)
    model = rustforge_model("mxfp4", dtype=torch.bfloat16).cuda()
    params = SamplingParams(temperature=1.0, top_p=0.95, max_new_tokens=24, seed=5)
    graphs = RolloutEngine(model, max_batch=4, max_len=64, cuda_graphs=True)
    eager = RolloutEngine(model, max_batch=4, max_len=64, cuda_graphs=False)
    a, b = graphs.generate(prompts, params), eager.generate(prompts, params)
    assert graphs.stats.graph_captures > 0
    assert [c.output_ids for c in a] == [c.output_ids for c in b]


def test_the_rollout_benchmark_runs_on_cpu(tmp_path):
    """bench/rollout.py's CPU-runnable path (the lead runs the GPU one): every record is written and ok."""
    import importlib.util
    import json
    from pathlib import Path

    path = Path(__file__).resolve().parents[1] / "bench" / "rollout.py"
    spec = importlib.util.spec_from_file_location("bench_rollout", path)
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    out = tmp_path / "rollout.jsonl"
    argv = ["--preset", "tiny", "--device", "cpu", "--batches", "1", "2", "--prompt-len", "8", "--new-tokens", "4",
            "--copy-gib", "0.01", "--weights", "merged", "--out", str(out)]  # fmt: skip
    assert bench.main(argv) == 0
    records = [json.loads(line) for line in out.read_text().splitlines()]
    kinds = [r["record"] for r in records]
    assert kinds.count("ours") == 2 and kinds.count("hf") == 4 and kinds[-1] == "done"  # 2 batches x 2 hf modes
    assert {r["hf_mode"] for r in records if r["record"] == "hf"} == {"as_shipped", "grouped_mm"}
    assert all(r.get("ok", True) for r in records), [r for r in records if not r.get("ok", True)]
    ours = [r for r in records if r["record"] == "ours"]
    assert all(r["decode_tok_s"] > 0 and r["floor_mxfp4_tok_s"] > r["decode_tok_s"] for r in ours)
    # the floor formula: at batch 1 top-k experts per layer are read, at batch 2 the expected distinct count
    assert ours[0]["experts_hit_per_layer"] == 2 and 2 < ours[1]["experts_hit_per_layer"] < 4
