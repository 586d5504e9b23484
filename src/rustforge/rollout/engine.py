"""The rollout engine: batched generation for GPT-OSS with a slot KV cache and continuous batching.

Own code rather than transformers' `generate` (one batch in lockstep, padding for every finished row, no
tool turns inside a rollout) or vLLM (a second copy of the weights and a weight sync after every
optimizer step; it can still be used through rollout/vllm_backend.py, same interface). The engine runs
the model's own layers -- norms, attention projections (with their LoRA, or merged: rollout/weights.py),
the router and the experts (the grouped path; decode steps read the stored experts directly:
model/triton_moe_decode.py) -- around its own attention over the cache
(rollout/attention.py, sinks included) and its own sampling (rollout/sampling.py).

How a call to `generate` runs:
- every request gets a cache slot when one is free (continuous batching: a finished sequence frees its
  slot at once and the next prompt takes it); requests with identical prompts are prefilled once and
  the cache copied (GRPO's G completions per prompt);
- prefill is batched and chunked: rows of new tokens, padded, `prefill_chunk` tokens at a time, attending
  to what the slot already caches plus the chunk (causal, window on sliding layers);
- decode steps run one token for every slot in [0, n), n a power-of-two bucket, over cache views (no
  gather); rows not decoding (free, or waiting for a tool) write nothing back. On CUDA the step is a
  CUDA graph per (n, kv-length bucket, greedy), captured on first use;
- a sequence ends on a stop token (Harmony's <|call|>/<|return|>, optionally <|end|>), at its token
  budget, or when the context is full. `on_stop` may instead continue it: it returns tokens to append
  (a tool's output rendered as Harmony) or a Future of them, and the sequence waits, keeping its slot,
  while others decode; its cache is kept, so only the new tokens are prefilled.
"""

from __future__ import annotations

import contextlib
import logging
import time
from collections import deque
from collections.abc import Callable, Sequence
from concurrent.futures import FIRST_COMPLETED, Future, wait
from dataclasses import dataclass, field

import torch
from torch import Tensor

from rustforge.rollout.attention import apply_rope, attend, window_allowed
from rustforge.rollout.kv_cache import KVCache
from rustforge.rollout.sampling import SamplingParams, sample_tokens
from rustforge.rollout.weights import WEIGHT_MODES, EngineWeights, decode_kernels_serve, merged_bytes, route

log = logging.getLogger(__name__)

FINISH_REASONS = ("stop", "length", "max_len")


@dataclass
class Completion:
    """One request's result. output_ids is everything after the prompt: the model's tokens and, in
    multi-turn rollouts, the environment's (tool outputs), told apart by sampled_mask."""

    prompt_ids: list[int]
    output_ids: list[int]
    sampled_mask: list[int]  # 1 = sampled by the model, 0 = appended by the environment
    logprobs: list[float]  # the sampling log-prob of each sampled token (0.0 for environment tokens)
    finish_reason: str  # "stop" (stop token, not continued) | "length" (max_new_tokens) | "max_len" (context full)
    turns: int = 0  # continuations appended by on_stop

    @property
    def num_sampled(self) -> int:
        return sum(self.sampled_mask)

    @property
    def stopped(self) -> bool:
        return self.finish_reason == "stop"


@dataclass
class SequenceState:
    """A running request, as `on_stop` sees it (read it; don't modify it)."""

    index: int  # position in the generate() call's prompt list
    stream: int  # sampling stream id
    ids: list[int]  # prompt + output so far; the last token is the stop token just sampled
    prompt_len: int
    max_new_tokens: int
    max_len: int
    sampled_mask: list[int] = field(default_factory=list)
    logprobs: list[float] = field(default_factory=list)
    new_tokens: int = 0
    turns: int = 0
    slot: int = -1
    cached: int = 0  # tokens whose keys/values are in the slot
    waiting: Future | None = None
    finish_reason: str | None = None

    @property
    def budget_left(self) -> int:
        """Tokens the model may still sample: the smaller of the token budget and the context room."""
        return min(self.max_new_tokens - self.new_tokens, self.max_len - len(self.ids))

    @property
    def uncached(self) -> int:
        return len(self.ids) - self.cached


# on_stop(state) -> None (finish) | tokens to append and continue | a Future of either
StopHandler = Callable[[SequenceState], "list[int] | Future | None"]


@dataclass
class EngineStats:
    prefill_tokens: int = 0
    decode_tokens: int = 0  # tokens sampled by decode steps
    decode_steps: int = 0
    prefill_s: float = 0.0
    decode_s: float = 0.0
    wait_s: float = 0.0  # waiting for environments with nothing to decode
    graph_captures: int = 0

    @property
    def decode_tok_s(self) -> float:
        return self.decode_tokens / self.decode_s if self.decode_s else 0.0


def _pow2_at_least(n: int, floor: int = 1) -> int:
    return max(floor, 1 << max(0, (n - 1).bit_length()))


class RolloutEngine:
    """generate(prompts, params, on_stop=None, streams=None) -> list[Completion].

    model: a RustforgeModel or transformers' GptOssForCausalLM (any experts module).
    max_batch: cache slots = sequences decoding at once. max_len: context per sequence (prompt + output).
    stop_ids: default stop tokens. weights: "live" | "merged" | "compressed" | "auto" (rollout/weights.py;
    auto = compressed for MXFP4/FP8 experts where the decode kernels run, else merged, either where its
    buffers fit in free GPU memory next to the cache, else live; live on CPU).
    cuda_graphs: capture decode steps on CUDA (bf16 models). prefill_chunk: tokens per prefill chunk.
    """

    def __init__(
        self,
        model,
        *,
        max_batch: int = 64,
        max_len: int = 4096,
        stop_ids: Sequence[int] = (),
        weights: str = "auto",
        cuda_graphs: bool = True,
        prefill_chunk: int = 512,
        prefill_budget_mb: int = 1024,
        kv_bucket: int = 256,
    ):
        self.hf = getattr(model, "hf", model)
        cfg = self.hf.config
        self.config = cfg
        if max_batch < 1 or max_len < 2 or prefill_chunk < 1:
            raise ValueError(f"rollout: need max_batch >= 1, max_len >= 2, prefill_chunk >= 1; got {max_batch}, {max_len}, {prefill_chunk}")
        self.max_batch, self.max_len = max_batch, max_len
        self.stop_ids = tuple(int(i) for i in stop_ids)
        self.prefill_chunk, self.prefill_budget = prefill_chunk, prefill_budget_mb * 2**20
        self.kv_bucket = kv_bucket
        self.device = self.hf.model.embed_tokens.weight.device
        self.dtype = self.hf.model.embed_tokens.weight.dtype
        self.head_dim = getattr(cfg, "head_dim", None) or cfg.hidden_size // cfg.num_attention_heads
        self.layer_types = list(cfg.layer_types)
        self.windows = [cfg.sliding_window if t == "sliding_attention" else None for t in self.layer_types]
        self.requested_weights = weights
        self.weights_mode = self._resolve_weights(weights)
        self.use_graphs = cuda_graphs and self.device.type == "cuda" and self.dtype == torch.bfloat16
        self.cache: KVCache | None = None
        self.weights: EngineWeights | None = None
        self.graphs: dict = {}
        self._graph_pool = None
        self._graph_signature = None
        self.stats = EngineStats()

    # ------------------------------------------------------------------------------------ resources
    def _resolve_weights(self, mode: str) -> str:
        if mode not in WEIGHT_MODES:
            raise ValueError(f"rollout.weights: expected one of {WEIGHT_MODES}, got {mode!r}")
        if mode != "auto":
            return mode
        if self.device.type != "cuda":
            return "live"
        free, _ = torch.cuda.mem_get_info(self.device)
        cache = KVCache.bytes_for(self.layer_types, self.config.sliding_window, self.config.num_key_value_heads,
                                  self.head_dim, self.max_batch, self.max_len, self.dtype)  # fmt: skip
        preferred = "compressed" if decode_kernels_serve(self.hf) else "merged"
        need = merged_bytes(self.hf, preferred) + cache + 4 * 2**30  # + room for activations and graphs
        return preferred if need < free else "live"

    def _ensure_ready(self) -> None:
        if self.weights is None:  # "auto" is decided again: free memory changes between GRPO steps
            self.weights_mode = self._resolve_weights(self.requested_weights)
            self.weights = EngineWeights(self.hf, self.weights_mode)
        self.weights.refresh()
        if self.cache is None:
            cfg = self.config
            self.cache = KVCache(self.layer_types, cfg.sliding_window, cfg.num_key_value_heads, self.head_dim,
                                 self.max_batch, self.max_len, self.dtype, self.device)  # fmt: skip
            self._allocate_step_buffers()
        signature = self.weights.signature()
        if signature != self._graph_signature:
            self.graphs.clear()
            self._graph_signature = signature

    def release(self) -> None:
        """Free the cache, merged weights and graphs (a later generate() rebuilds them)."""
        self.cache = self.weights = None
        self.graphs.clear()
        self._graph_pool = None
        if self.device.type == "cuda":
            torch.cuda.empty_cache()

    def _allocate_step_buffers(self) -> None:
        n, dev = self.max_batch, self.device
        self._tokens = torch.zeros(n, dtype=torch.long, device=dev)
        self._positions = torch.zeros(n, dtype=torch.long, device=dev)
        self._active = torch.zeros(n, dtype=torch.bool, device=dev)
        self._streams = torch.zeros(n, dtype=torch.long, device=dev)
        self._out_tokens = torch.zeros(n, dtype=torch.long, device=dev)
        self._out_logprobs = torch.zeros(n, dtype=torch.float32, device=dev)
        self._temperature = torch.ones((), dtype=torch.float32, device=dev)
        self._top_p = torch.ones((), dtype=torch.float32, device=dev)
        self._seed = torch.zeros((), dtype=torch.long, device=dev)

    @contextlib.contextmanager
    def _generation_mode(self):
        was_training = self.hf.training
        self.hf.eval()
        try:
            with torch.no_grad():
                yield
        finally:
            self.hf.train(was_training)

    # -------------------------------------------------------------------------------------- public
    def generate(
        self,
        prompts: Sequence[Sequence[int]],
        params: SamplingParams,
        on_stop: StopHandler | None = None,
        streams: Sequence[int] | None = None,
        stop_ids: Sequence[int] | None = None,
    ) -> list[Completion]:
        """Complete every prompt (token ids), in the prompts' order. streams: per prompt sampling stream
        ids (default: 0, 1, ...); a prompt given twice with different streams samples independently."""
        streams = list(range(len(prompts))) if streams is None else [int(s) for s in streams]
        if len(streams) != len(prompts):
            raise ValueError(f"rollout: {len(prompts)} prompts but {len(streams)} streams")
        stops = frozenset(self.stop_ids if stop_ids is None else stop_ids)
        seqs = []
        for i, prompt in enumerate(prompts):
            ids = [int(t) for t in prompt]
            if not 1 <= len(ids) < self.max_len:
                raise ValueError(f"rollout: prompt {i} has {len(ids)} tokens; need 1 .. max_len - 1 = {self.max_len - 1}")
            seqs.append(SequenceState(i, streams[i], ids, len(ids), params.max_new_tokens, self.max_len))
        with self._generation_mode():
            self._ensure_ready()
            self._temperature.fill_(max(params.temperature, 1e-6))
            self._top_p.fill_(params.top_p)
            self._seed.fill_(params.seed)
            self._run(seqs, params, stops, on_stop)
        return [
            Completion(s.ids[: s.prompt_len], s.ids[s.prompt_len :], s.sampled_mask, s.logprobs, s.finish_reason, s.turns)
            for s in seqs
        ]

    # ----------------------------------------------------------------------------------- scheduler
    def _run(self, seqs, params, stops, on_stop) -> None:
        queue = deque(seqs)
        running: dict[int, SequenceState] = {}
        free = list(range(self.max_batch))
        while queue or running:
            self._resume_waiting(running.values())
            while queue and free:
                seq = queue.popleft()
                seq.slot = free.pop(0)
                running[seq.slot] = seq
            ready = [s for s in running.values() if s.waiting is None and s.finish_reason is None]
            to_prefill = [s for s in ready if s.uncached > 1]
            if to_prefill:
                self._prefill_and_sample(to_prefill, params, stops, on_stop)
            to_decode = [s for s in ready if s.uncached == 1 and s.finish_reason is None and s.waiting is None]
            if to_decode:
                self._decode_and_sample(to_decode, running, params, stops, on_stop)
            elif not to_prefill and any(s.waiting is not None for s in running.values()):
                t0 = time.perf_counter()
                wait([s.waiting for s in running.values() if s.waiting is not None], return_when=FIRST_COMPLETED)
                self.stats.wait_s += time.perf_counter() - t0
            for slot in [slot for slot, s in running.items() if s.finish_reason is not None]:
                del running[slot]
                free.append(slot)
            free.sort()
            if not queue:
                self._compact(running, free)

    def _resume_waiting(self, seqs) -> None:
        for seq in seqs:
            if seq.waiting is not None and seq.waiting.done():
                future, seq.waiting = seq.waiting, None
                self._continue(seq, future.result())

    def _after_token(self, seq: SequenceState, token: int, logprob: float, stops, on_stop) -> None:
        seq.ids.append(token)
        seq.sampled_mask.append(1)
        seq.logprobs.append(logprob)
        seq.new_tokens += 1
        if token in stops:
            result = on_stop(seq) if on_stop is not None else None
            if isinstance(result, Future):
                seq.waiting = result
            else:
                self._continue(seq, result)
        elif seq.new_tokens >= seq.max_new_tokens:
            seq.finish_reason = "length"
        elif len(seq.ids) >= self.max_len:
            seq.finish_reason = "max_len"

    def _continue(self, seq: SequenceState, extension) -> None:
        if extension is None:
            seq.finish_reason = "stop"
            return
        extension = [int(t) for t in extension]
        room = self.max_len - len(seq.ids)
        seq.ids += extension[:room]
        seq.sampled_mask += [0] * min(room, len(extension))
        seq.logprobs += [0.0] * min(room, len(extension))
        seq.turns += 1
        if len(extension) >= room:
            seq.finish_reason = "max_len"  # no room left for the model to answer
        elif seq.new_tokens >= seq.max_new_tokens:
            seq.finish_reason = "length"

    def _compact(self, running: dict[int, SequenceState], free: list[int]) -> None:
        """Move sequences from the highest slots into free lower ones while that shrinks the decode
        bucket: a step always runs slots [0, n)."""
        while running and free and free[0] < max(running) and self._bucket(len(running)) < self._bucket(max(running) + 1):
            src, dst = max(running), free.pop(0)
            seq = running.pop(src)
            self.cache.copy_slot(src, dst, seq.cached)
            seq.slot = dst
            running[dst] = seq
            free.append(src)
            free.sort()

    def _bucket(self, n: int) -> int:
        return min(self.max_batch, _pow2_at_least(n))

    # ------------------------------------------------------------------------------------- prefill
    def _prefill_and_sample(self, seqs, params, stops, on_stop) -> None:
        t0 = time.perf_counter()
        leaders: dict[tuple, SequenceState] = {}
        followers: list[tuple[SequenceState, SequenceState]] = []
        rows = []
        for seq in seqs:
            key = tuple(seq.ids) if seq.cached == 0 else None
            if key is not None and key in leaders:
                followers.append((seq, leaders[key]))
                continue
            if key is not None:
                leaders[key] = seq
            rows.append(seq)
        logits = self._prefill(rows)
        row_of = {id(s): i for i, s in enumerate(rows)}
        for seq, leader in followers:
            self.cache.copy_slot(leader.slot, seq.slot, leader.cached)
            seq.cached = leader.cached
        everyone = rows + [s for s, _ in followers]
        picked = logits[[row_of[id(leader)] for _, leader in followers]] if followers else logits[:0]
        all_logits = torch.cat([logits, picked]) if followers else logits
        streams = torch.tensor([s.stream for s in everyone], device=self.device)
        positions = torch.tensor([len(s.ids) for s in everyone], device=self.device)
        tokens, logprobs = sample_tokens(
            all_logits, params.greedy, self._temperature, self._top_p, self._seed, streams, positions
        )
        self.stats.prefill_tokens += self._last_prefill_tokens
        self.stats.prefill_s += time.perf_counter() - t0
        for seq, token, logprob in zip(everyone, tokens.tolist(), logprobs.tolist()):
            self._after_token(seq, token, logprob, stops, on_stop)

    def _prefill(self, rows: list[SequenceState]) -> Tensor:
        """Run every row's uncached tokens through the model into its slot; logits [R, V] at each row's
        last token. Rows advance chunk by chunk together (padded)."""
        remaining = [s.uncached for s in rows]
        self._last_prefill_tokens = sum(remaining)
        last_hidden: list[Tensor | None] = [None] * len(rows)
        offset = 0
        while any(r > offset for r in remaining):
            active = [i for i, r in enumerate(remaining) if r > offset]
            chunk = self._chunk_size(len(active), max(rows[i].cached for i in active))
            counts = [min(chunk, remaining[i] - offset) for i in active]
            width = max(counts)
            ids = torch.zeros(len(active), width, dtype=torch.long)
            positions = torch.full((len(active), width), -1, dtype=torch.long)
            for row, (i, n) in enumerate(zip(active, counts)):
                seq = rows[i]
                ids[row, :n] = torch.tensor(seq.ids[seq.cached : seq.cached + n])
                positions[row, :n] = torch.arange(seq.cached, seq.cached + n)
            slots = torch.tensor([rows[i].slot for i in active], device=self.device)
            lengths = torch.tensor([rows[i].cached for i in active], device=self.device)
            hidden = self._forward_chunk(slots, ids.to(self.device), positions.to(self.device), lengths)
            for row, (i, n) in enumerate(zip(active, counts)):
                rows[i].cached += n
                if offset + n == remaining[i]:
                    last_hidden[i] = hidden[row, n - 1]
            offset += chunk
        hidden = torch.stack(last_hidden)
        return self._logits(hidden)

    def _chunk_size(self, rows: int, longest_cached: int) -> int:
        """Prefill chunk bounded by the float32 score tensor [rows, heads, chunk, keys] of one layer."""
        heads = self.config.num_attention_heads
        chunk = self.prefill_chunk
        while chunk > 16 and rows * heads * chunk * (longest_cached + chunk) * 4 > self.prefill_budget:
            chunk //= 2
        return chunk

    def _forward_chunk(self, slots: Tensor, ids: Tensor, positions: Tensor, lengths: Tensor) -> Tensor:
        """ids/positions [R, T] (position -1 = padding) appended to slots whose caches hold `lengths`
        tokens; returns the final-norm hidden states [R, T, H]."""
        cfg, cache = self.config, self.cache
        valid = positions >= 0
        ends = lengths + valid.sum(dim=1)
        hidden = self.hf.model.embed_tokens(ids)
        cos, sin = self.hf.model.rotary_emb(hidden, positions.clamp(min=0))
        rows, steps = ids.shape
        for i, w in enumerate(self.weights.layers):
            x = w.input_norm(hidden)
            q = w.q(x).view(rows, steps, cfg.num_attention_heads, self.head_dim).transpose(1, 2)
            k = w.k(x).view(rows, steps, cfg.num_key_value_heads, self.head_dim).transpose(1, 2)
            v = w.v(x).view(rows, steps, cfg.num_key_value_heads, self.head_dim).transpose(1, 2)
            q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
            keys_all, values_all = cache.keys[i], cache.values[i]
            if cache.is_ring(i):
                ring_pos = cache.ring_positions(i, lengths)
                keys = torch.cat([keys_all.index_select(0, slots), k], dim=2)
                values = torch.cat([values_all.index_select(0, slots), v], dim=2)
                key_pos = torch.cat([ring_pos, positions], dim=1)
                write = valid & (positions >= ends[:, None] - cache.capacity[i])  # the last `capacity` only
            else:
                span = int(ends.max())
                write = valid
                self._write(keys_all, values_all, slots, positions, write, k, v, i)
                keys = keys_all[:, :, :span].index_select(0, slots)
                values = values_all[:, :, :span].index_select(0, slots)
                key_pos = torch.arange(span, device=ids.device).expand(rows, span)
            allowed = window_allowed(positions, key_pos, self.windows[i])
            out = attend(q, keys, values, allowed, w.sinks, w.scale)
            if cache.is_ring(i):
                self._write(keys_all, values_all, slots, positions, write, k, v, i)
            hidden = hidden + w.o(out)
            hidden = hidden + self._mlp(w, w.post_norm(hidden))
        return self.hf.model.norm(hidden)

    def _write(self, keys_all, values_all, slots, positions, write, k, v, layer) -> None:
        rows, steps = positions.shape
        slot_idx = slots[:, None].expand(rows, steps)[write]
        index = self.cache.index_of(layer, positions[write])
        keys_all[slot_idx, :, index] = k.transpose(1, 2)[write]
        values_all[slot_idx, :, index] = v.transpose(1, 2)[write]

    def _mlp(self, w, x: Tensor) -> Tensor:
        shape = x.shape
        flat = x.reshape(-1, shape[-1])
        scores, indices = route(w.router, flat)
        return w.experts(flat, indices, scores).reshape(shape)

    def _logits(self, hidden: Tensor) -> Tensor:
        return self.hf.lm_head(hidden).float()

    # -------------------------------------------------------------------------------------- decode
    def _decode_and_sample(self, seqs, running, params, stops, on_stop) -> None:
        t0 = time.perf_counter()
        n = self._bucket(max(running) + 1)
        tokens = torch.zeros(n, dtype=torch.long)
        positions = torch.zeros(n, dtype=torch.long)
        active = torch.zeros(n, dtype=torch.bool)
        streams = torch.zeros(n, dtype=torch.long)
        for seq in seqs:
            tokens[seq.slot], positions[seq.slot] = seq.ids[-1], len(seq.ids) - 1
            active[seq.slot], streams[seq.slot] = True, seq.stream
        self._tokens[:n].copy_(tokens)
        self._positions[:n].copy_(positions)
        self._active[:n].copy_(active)
        self._streams[:n].copy_(streams)
        longest = int(positions.max()) + 1
        span = min(self.max_len, -(-longest // self.kv_bucket) * self.kv_bucket)
        span = min(self.max_len, _pow2_at_least(span, self.kv_bucket))
        self._run_decode(n, span, params.greedy)
        out_tokens = self._out_tokens[:n].tolist()
        out_logprobs = self._out_logprobs[:n].tolist()
        self.stats.decode_steps += 1
        self.stats.decode_tokens += len(seqs)
        self.stats.decode_s += time.perf_counter() - t0
        for seq in seqs:
            seq.cached += 1
            self._after_token(seq, out_tokens[seq.slot], out_logprobs[seq.slot], stops, on_stop)

    def _run_decode(self, n: int, span: int, greedy: bool) -> None:
        if not self.use_graphs:
            self._decode_step(n, span, greedy)
            return
        key = (n, span, greedy)
        graph = self.graphs.get(key)
        if graph is None:
            try:
                graph = self._capture(n, span, greedy)
            except Exception as e:  # noqa: BLE001 - any capture failure: run eagerly from now on
                log.warning("rollout: CUDA graph capture failed (%s); decoding without graphs", e)
                self.use_graphs = False
                torch.cuda.synchronize(self.device)
                self._decode_step(n, span, greedy)
                return
            self.graphs[key] = graph
        graph.replay()

    def _capture(self, n: int, span: int, greedy: bool):
        """Capture one decode step. The warm-up runs write the cache too, with the same values each time
        (same tokens at the same positions), so they are harmless."""
        stream = torch.cuda.Stream(self.device)
        stream.wait_stream(torch.cuda.current_stream(self.device))
        with torch.cuda.stream(stream):
            for _ in range(2):
                self._decode_step(n, span, greedy)
        torch.cuda.current_stream(self.device).wait_stream(stream)
        if self._graph_pool is None:
            self._graph_pool = torch.cuda.graph_pool_handle()
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph, pool=self._graph_pool):
            self._decode_step(n, span, greedy)
        self.stats.graph_captures += 1
        return graph

    def _decode_step(self, n: int, span: int, greedy: bool) -> None:
        """One token for slots [0, n): reads the step buffers, writes _out_tokens/_out_logprobs.
        Static shapes and no host sync: this is what a CUDA graph captures."""
        cfg, cache = self.config, self.cache
        tokens, positions, active = self._tokens[:n], self._positions[:n], self._active[:n]
        hidden = self.hf.model.embed_tokens(tokens)[:, None]
        cos, sin = self.hf.model.rotary_emb(hidden, positions[:, None])
        rows = torch.arange(n, device=tokens.device)
        keep = active[:, None, None]
        for i, w in enumerate(self.weights.layers):
            x = w.input_norm(hidden)
            q = w.q(x).view(n, 1, cfg.num_attention_heads, self.head_dim).transpose(1, 2)
            k = w.k(x).view(n, 1, cfg.num_key_value_heads, self.head_dim).transpose(1, 2)
            v = w.v(x).view(n, 1, cfg.num_key_value_heads, self.head_dim).transpose(1, 2)
            q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
            keys_all, values_all = cache.keys[i], cache.values[i]
            index = cache.index_of(i, positions)
            # rows that are not decoding write back what the slot holds (a waiting sequence keeps its cache)
            keys_all[rows, :, index] = torch.where(keep, k[:, :, 0], keys_all[rows, :, index])
            values_all[rows, :, index] = torch.where(keep, v[:, :, 0], values_all[rows, :, index])
            length = cache.capacity[i] if cache.is_ring(i) else span
            keys, values = keys_all[:n, :, :length], values_all[:n, :, :length]
            # ring: entry r holds a position inside the window iff r <= position (derivation in kv_cache)
            allowed = (torch.arange(length, device=tokens.device)[None] <= positions[:, None])[:, None]
            out = attend(q, keys, values, allowed, w.sinks, w.scale)
            hidden = hidden + w.o(out)
            hidden = hidden + self._mlp(w, w.post_norm(hidden))
        logits = self._logits(self.hf.model.norm(hidden[:, 0]))
        next_tokens, logprobs = sample_tokens(
            logits, greedy, self._temperature, self._top_p, self._seed, self._streams[:n], positions + 1
        )
        self._out_tokens[:n].copy_(next_tokens)
        self._out_logprobs[:n].copy_(logprobs)


__all__ = ["Completion", "EngineStats", "FINISH_REASONS", "RolloutEngine", "SequenceState", "StopHandler"]
