"""Next-token sampling for the rollout engine: greedy, temperature and top-p, reproducible per sequence.

Own code, for one property torch.multinomial lacks: the random number a sequence draws for its token at
position p is a hash of (seed, the sequence's stream id, p) -- counter-based, like Philox -- so a
sequence samples the same tokens whether it runs alone, in any batch, or after other sequences finished
(continuous batching), on CPU and GPU alike, and the step stays capturable in a CUDA graph (no generator
state, no host sync). The hash is 32-bit integer arithmetic kept below 2^63 in int64, so it is exact on
every device.

Top-p follows the usual nucleus rule (HF's TopPLogitsWarper): tokens sorted by probability, keep the
smallest prefix whose mass reaches top_p (always at least one token), renormalise, then inverse-CDF
sampling with the hashed uniform. The log-prob returned with each token is under the temperature-scaled
distribution before the top-p cut (what a trainer's log-softmax(logits / T) gives).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

_MASK32 = 0xFFFFFFFF


@dataclass(frozen=True)
class SamplingParams:
    temperature: float = 1.0  # 0 = greedy
    top_p: float = 1.0
    max_new_tokens: int = 256  # tokens the model samples per request, over all its turns
    seed: int = 0

    def __post_init__(self):
        if self.temperature < 0 or not 0 < self.top_p <= 1:
            raise ValueError(
                f"sampling: need temperature >= 0 and 0 < top_p <= 1, got {self.temperature}, {self.top_p}"
            )
        if self.max_new_tokens < 1:
            raise ValueError(f"sampling: max_new_tokens must be >= 1, got {self.max_new_tokens}")

    @property
    def greedy(self) -> bool:
        return self.temperature == 0


def _mul32(x: Tensor, constant: int) -> Tensor:
    """(x * constant) mod 2^32 for x in [0, 2^32), without int64 overflow: constant split in 16-bit halves."""
    low = x * (constant & 0xFFFF)
    high = ((x * (constant >> 16)) & 0xFFFF) << 16
    return (low + high) & _MASK32


def _hash32(x: Tensor) -> Tensor:
    """Chris Wellons' lowbias32 integer hash on int64 tensors holding 32-bit values."""
    x = x ^ (x >> 16)
    x = _mul32(x, 0x7FEB352D)
    x = x ^ (x >> 15)
    x = _mul32(x, 0x846CA68B)
    return x ^ (x >> 16)


def counter_uniform(seed: Tensor | int, streams: Tensor, positions: Tensor) -> Tensor:
    """Uniform floats in (0, 1), one per (stream, position), a pure function of (seed, stream, position)."""
    seed = torch.as_tensor(seed, dtype=torch.int64, device=streams.device)
    x = _hash32(positions.to(torch.int64) & _MASK32)
    x = _hash32(x ^ (streams.to(torch.int64) & _MASK32))
    x = _hash32(x ^ (seed & _MASK32) ^ 0x9E3779B9)
    return ((x >> 8).to(torch.float32) + 0.5) / float(1 << 24)


def sample_tokens(
    logits: Tensor,
    greedy: bool,
    temperature: Tensor | float,
    top_p: Tensor | float,
    seed: Tensor | int,
    streams: Tensor,
    positions: Tensor,
) -> tuple[Tensor, Tensor]:
    """(tokens [B] int64, log-probs [B] float32) from logits [B, V].

    positions: the position the sampled token will take in its sequence (the counter of the draw).
    temperature/top_p/seed may be 0-d tensors, so a captured CUDA graph can change them between replays."""
    logits = logits.float()
    if greedy:
        tokens = logits.argmax(dim=-1)
        logprobs = torch.log_softmax(logits, dim=-1).gather(1, tokens[:, None]).squeeze(1)
        return tokens, logprobs
    logp = torch.log_softmax(logits / temperature, dim=-1)
    sorted_logp, order = torch.sort(logp, dim=-1, descending=True, stable=True)
    sorted_p = sorted_logp.exp()
    cumulative = torch.cumsum(sorted_p, dim=-1)
    keep = (cumulative - sorted_p) < top_p  # mass before the token < top_p: the first always stays
    kept = torch.where(keep, sorted_p, torch.zeros_like(sorted_p))
    kept_cdf = torch.cumsum(kept, dim=-1)
    u = counter_uniform(seed, streams, positions) * kept_cdf[:, -1]
    pick = torch.searchsorted(kept_cdf, u[:, None]).clamp_(max=logits.shape[-1] - 1)
    pick = torch.minimum(pick, keep.sum(dim=-1, keepdim=True) - 1)  # rounding never lands past the nucleus
    tokens = order.gather(1, pick).squeeze(1)
    return tokens, logp.gather(1, tokens[:, None]).squeeze(1)
