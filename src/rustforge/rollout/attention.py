"""Attention of new tokens against the rollout KV cache, with GPT-OSS's per-head sinks.

Own code: transformers' cache classes have no slot-addressed ring buffer, and flex attention would need
a BlockMask per decode step. The math is transformers' eager GPT-OSS attention (the reference the tests
compare with): softmax over [scaled scores of the allowed keys, sink logit s_h], the sink column dropped;
query head h reads kv head h // (q_heads / kv_heads). Which keys a query may see is given as an explicit
boolean `allowed` [B, T, S] built from key positions, so the same function serves the decode step (one
query per sequence over the cache), chunked prefill (many queries over cache + new keys) and the ring
buffers of sliding layers. Scores and the softmax are float32 whatever the model dtype.
"""

from __future__ import annotations

import torch
from torch import Tensor


def attend(q: Tensor, keys: Tensor, values: Tensor, allowed: Tensor, sinks: Tensor | None, scale: float) -> Tensor:
    """q [B, Hq, T, D], keys/values [B, Hkv, S, D], allowed [B, T, S] bool -> [B, T, Hq * D] (values' dtype).

    A query with no allowed key gets output 0 with a sink (everything goes to the sink), 0 without."""
    batch, q_heads, steps, dim = q.shape
    kv_heads, keys_len = keys.shape[1], keys.shape[2]
    if q_heads % kv_heads:
        raise ValueError(f"attend: {q_heads} query heads are not a multiple of {kv_heads} kv heads")
    group = q_heads // kv_heads
    grouped = q.reshape(batch, kv_heads, group * steps, dim)  # heads kv*G .. kv*G+G-1 read kv head `kv`
    scores = torch.matmul(grouped, keys.transpose(-1, -2)).float().mul_(scale)
    scores = scores.view(batch, q_heads, steps, keys_len)
    scores.masked_fill_(~allowed[:, None], float("-inf"))
    if sinks is None:
        sink = torch.full((batch, q_heads, steps, 1), float("-inf"), device=q.device)
    else:
        sink = sinks.float().view(1, q_heads, 1, 1).expand(batch, q_heads, steps, 1)
    probs = torch.softmax(torch.cat([scores, sink], dim=-1), dim=-1)[..., :keys_len]
    probs = torch.nan_to_num(probs, nan=0.0) if sinks is None else probs  # no key and no sink: 0/0
    probs = probs.to(values.dtype).view(batch, kv_heads, group * steps, keys_len)
    out = torch.matmul(probs, values).view(batch, q_heads, steps, dim)
    return out.transpose(1, 2).reshape(batch, steps, q_heads * dim)


def window_allowed(query_pos: Tensor, key_pos: Tensor, window: int | None) -> Tensor:
    """[B, T, S]: key positions [B, S] (-1 = empty) a query at query_pos [B, T] (-1 = padding) may see:
    causal, and inside the sliding window when `window` is given."""
    q = query_pos[:, :, None]
    k = key_pos[:, None, :]
    allowed = (k >= 0) & (k <= q) & (q >= 0)
    if window is not None:
        allowed &= q - k < window
    return allowed


def apply_rope(x: Tensor, cos: Tensor, sin: Tensor) -> Tensor:
    """GPT-OSS rotary embedding (transformers' _apply_rotary_emb: halves, not interleaved pairs).

    x [B, H, T, D], cos/sin [B, T, D/2] as GptOssRotaryEmbedding returns them."""
    cos, sin = cos[:, None], sin[:, None]
    first, second = torch.chunk(x, 2, dim=-1)
    return torch.cat((first * cos - second * sin, second * cos + first * sin), dim=-1)
