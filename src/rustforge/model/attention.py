"""GPT-OSS attention over packed documents: masks, a flex-attention kernel with sinks, and a reference.

Builds on transformers' GPT-OSS (`GptOssAttention` looks its attention function up in
`ALL_ATTENTION_FUNCTIONS` and `GptOssModel.forward` hands each layer the mask stored under its layer
type when `attention_mask` is a dict) and on torch's `flex_attention`. Our own code is needed for two
things transformers does not do: masks that keep packed documents apart (per-token document ids, -1 for
padding), and GPT-OSS's per-head attention sinks on top of flex attention with exact gradients.

Mask semantics, shared by every path here: query i may attend key j iff
    doc_ids[b, i] == doc_ids[b, j] and doc_ids[b, i] >= 0 and j <= i
and, on sliding-window layers, also i - j < sliding_window (transformers' `sliding_window_overlay`:
kv_idx > q_idx - sliding_window). A padding query attends nothing; with a sink its output is exactly 0.
One exception: the Triton kernels (`DocumentSpans`) take a document to be a contiguous run of equal ids, so two runs
of one id apart (e.g. [0, 0, 1, 0]) are two documents there and one here. The same mask for every producer of
doc_ids (data/packing.py, train/grpo._micro_batch, train/core_agent.item_sequence: ids 0, 1, 2, ... in order per
row, -1 padding), whose documents are contiguous and numbered apart.

`PackedFlexAttention` (the layer class on the GPU paths) computes q/k/v with one LoRA projection call and runs
RoPE inside the compiled flex function, or compiled before model/triton_attention.py's kernels when the mask is
`DocumentSpans` (`model.attention: triton`: faster for short packed rows, slower than flex at 64K; bench/RESULTS.md,
session 7); its math is transformers' GptOssAttention.forward.

Sinks: GPT-OSS appends a learned per-head logit s_h as an extra softmax column and drops it, so
    out = sum_j exp(x_j) v_j / (sum_j exp(x_j) + exp(s_h)) = flex_out * sigmoid(lse - s_h)
with lse the natural-log logsumexp of the (masked, scaled) scores, which flex attention returns.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable

import torch
from torch import Tensor
from transformers.models.gpt_oss.modeling_gpt_oss import GptOssAttention

FLEX_IMPLEMENTATION_NAME = "rustforge_flex"
MASK_IMPLS = ("eager", "flex", "triton")

try:  # torch >= 2.9 asks for the logsumexp through return_aux; older torch through return_lse
    from torch.nn.attention.flex_attention import AuxRequest as _AuxRequest
except ImportError:  # pragma: no cover - depends on the torch version
    _AuxRequest = None

# Forward blocks of 64 queries x 64 keys on the GPU; the backward keeps torch's defaults. Forward + backward
# 1.13 -> 0.92 ms on full-attention layers and 1.25 -> 0.72 ms on sliding ones (4K tokens, 4 documents, the
# 20B shape, H100, bench/flex_tune.py, session 5); outputs differ from the default blocks by bf16 rounding.
# The fwd_ prefix (torch >= 2.9's FlexKernelOptions) keeps the option out of the backward, which 64x64
# blocks slow down (session 4's run without the prefix). {} restores torch's choice.
FLEX_KERNEL_OPTIONS: dict = {"fwd_BLOCK_M": 64, "fwd_BLOCK_N": 64}
FLEX_DECODING_BELOW = 128  # inductor's rule (torch/_inductor/kernel/flex/flex_decoding.py, _use_flex_decoding)


# ----------------------------------------------------------------------------------------------- masks


def _check_doc_ids(doc_ids: Tensor, sliding_window: int | None) -> None:
    if not isinstance(doc_ids, Tensor) or doc_ids.dim() != 2 or doc_ids.dtype not in (torch.int32, torch.int64):
        raise ValueError(
            f"doc_ids: expected an integer tensor [batch, seq], got "
            f"{type(doc_ids).__name__} {getattr(doc_ids, 'dtype', '')} {tuple(getattr(doc_ids, 'shape', ()))}"
        )
    if sliding_window is not None and (not isinstance(sliding_window, int) or sliding_window < 1):
        raise ValueError(f"sliding_window: expected a positive int, got {sliding_window!r}")


def allowed_pairs(doc_ids: Tensor, sliding_window: int | None) -> Tensor:
    """Dense bool [B, T, T]: entry [b, i, j] says query i may attend key j (module-docstring semantics)."""
    _check_doc_ids(doc_ids, sliding_window)
    seq_len = doc_ids.shape[1]
    q_idx = torch.arange(seq_len, device=doc_ids.device)[:, None]
    kv_idx = torch.arange(seq_len, device=doc_ids.device)[None, :]
    same_doc = doc_ids[:, :, None] == doc_ids[:, None, :]
    allowed = same_doc & (doc_ids[:, :, None] >= 0) & (kv_idx <= q_idx)
    if sliding_window is not None:
        allowed = allowed & (q_idx - kv_idx < sliding_window)
    return allowed


def document_mask_mod(doc_ids: Tensor, sliding_window: int | None) -> Callable:
    """flex-attention mask_mod for the same rule, reading document ids from `doc_ids` [B, T].

    Full attention is the same function with a window of T: one code object and tensor-valued captures
    mean compiled flex attention reuses one graph for both layer types and for every new batch layout.
    """
    window = torch.tensor(doc_ids.shape[1] if sliding_window is None else sliding_window, device=doc_ids.device)

    def document_causal_window(batch, head, q_idx, kv_idx):
        q_doc = doc_ids[batch, q_idx]
        same_doc = (q_doc == doc_ids[batch, kv_idx]) & (q_doc >= 0)
        return same_doc & (kv_idx <= q_idx) & (q_idx - kv_idx < window)

    return document_causal_window


@dataclass(frozen=True)
class DocumentSpans:
    """The mask of model/triton_attention's kernels for one layer type: per token (flattened B * T) the flat
    index where its document starts and one past where it ends (`triton_attention.document_spans`), and the
    window (None: full causal). Documents are runs of equal ids; a padding token attends nothing."""

    starts: Tensor
    ends: Tensor
    window: int | None


_compiled_create_block_mask = None


def _block_mask(doc_ids: Tensor, sliding_window: int | None):
    """BlockMask for one layer type; compiled on GPU so the [B, T, T] mask is never materialised
    (what create_block_mask(_compile=True) did before torch deprecated that flag)."""
    global _compiled_create_block_mask
    from torch.nn.attention.flex_attention import create_block_mask

    create = create_block_mask
    if doc_ids.device.type == "cuda":
        if _compiled_create_block_mask is None:
            _compiled_create_block_mask = torch.compile(create_block_mask)
        create = _compiled_create_block_mask
    batch, seq_len = doc_ids.shape
    return create(document_mask_mod(doc_ids, sliding_window), batch, None, seq_len, seq_len, device=doc_ids.device)


def build_attention_masks(
    doc_ids: Tensor, sliding_window: int, impl: str, dtype: torch.dtype = torch.float32
) -> dict:
    """Masks for `GptOssModel.forward(attention_mask=...)`, keyed by transformers' layer types.

    doc_ids: [B, T] document id per token, -1 for padding. impl "eager": additive float masks
    [B, 1, T, T] of `dtype` (0 allowed, finfo(dtype).min masked), as transformers' eager path builds.
    impl "flex": flex-attention BlockMasks (one per layer type, built once per batch) on doc_ids' device.
    impl "triton": DocumentSpans (model/triton_attention.py), the two layer types sharing one spans pair.
    """
    _check_doc_ids(doc_ids, sliding_window)
    if impl == "eager":
        min_value = torch.finfo(dtype).min
        zero = torch.zeros((), dtype=dtype, device=doc_ids.device)
        masked = torch.full((), min_value, dtype=dtype, device=doc_ids.device)

        def additive(window):
            return torch.where(allowed_pairs(doc_ids, window), zero, masked)[:, None]

        return {"full_attention": additive(None), "sliding_attention": additive(sliding_window)}
    if impl == "flex":
        return {
            "full_attention": _block_mask(doc_ids, None),
            "sliding_attention": _block_mask(doc_ids, sliding_window),
        }
    if impl == "triton":
        from rustforge.model.triton_attention import document_spans

        starts, ends = document_spans(doc_ids)
        return {"full_attention": DocumentSpans(starts, ends, None),
                "sliding_attention": DocumentSpans(starts, ends, sliding_window)}
    raise ValueError(f"attention impl: expected one of {MASK_IMPLS}, got {impl!r}")


# ------------------------------------------------------------------------------------ flex attention

def flex_attention_with_lse(query: Tensor, key: Tensor, value: Tensor, block_mask, scale: float):
    """(out [B, Hq, T, D], lse [B, Hq, T] fp32, natural log) with GQA broadcasting of key/value heads."""
    from torch.nn.attention.flex_attention import flex_attention

    common = dict(block_mask=block_mask, scale=scale, enable_gqa=query.shape[1] != key.shape[1])
    # under 128 queries inductor would run its flex *decoding* kernel, which found no valid configuration for a
    # 64-token evaluation batch of the tiny model (H100, torch 2.11, session 6): the main kernel is forced there
    if query.is_cuda and query.shape[-2] < FLEX_DECODING_BELOW:
        common["kernel_options"] = {"FORCE_USE_FLEX_ATTENTION": True}
    elif query.is_cuda and FLEX_KERNEL_OPTIONS:
        common["kernel_options"] = FLEX_KERNEL_OPTIONS
    if _AuxRequest is not None:
        out, aux = flex_attention(query, key, value, return_aux=_AuxRequest(lse=True), **common)
        return out, aux.lse
    return flex_attention(query, key, value, return_lse=True, **common)  # pragma: no cover - torch < 2.9


def apply_sinks(out: Tensor, lse: Tensor, sinks: Tensor) -> Tensor:
    """Renormalise attention output [B, H, T, D] as if sink logit sinks[h] were one more softmax column.

    A fully masked row has lse = -inf and out = 0, so its factor and its gradient are 0, not NaN.
    """
    factor = torch.sigmoid(lse.float() - sinks.float()[None, :, None])
    return (out * factor[..., None]).to(out.dtype)


def flex_attention_with_sinks(
    query: Tensor, key: Tensor, value: Tensor, block_mask, sinks: Tensor | None, scale: float
) -> Tensor:
    """Flex attention, sink renormalisation and the [B, T, Hq, D] layout transformers expects."""
    out, lse = flex_attention_with_lse(query, key, value, block_mask, scale)
    if sinks is not None:
        out = apply_sinks(out, lse, sinks)
    return out.transpose(1, 2).contiguous()


_COMPILED: dict[Callable, Callable] = {}


def _compiled_on_gpu(fn: Callable, device: torch.device) -> Callable:
    """`fn` compiled once per process on GPU (flex kernel with the sink epilogue, and RoPE where `fn` has it,
    fused in: about 1.4x faster forward+backward than compiling flex alone, H100); plain on CPU, whose
    compiled flex kernel cannot return the lse.

    dynamic=False: one compile per (batch, seq_len, heads, dtype, requires_grad), shared by both layer
    types and all document layouts. Keep seq_len fixed (packing): dynamo stops compiling a function after
    torch._dynamo.config.recompile_limit (default 8) variants and runs the slow unfused path instead.
    """
    if device.type == "cpu":
        return fn
    if fn not in _COMPILED:
        _COMPILED[fn] = torch.compile(fn, dynamic=False)
    return _COMPILED[fn]


def rotate_half_pairs(x: Tensor, cos: Tensor, sin: Tensor) -> Tensor:
    """transformers' GPT-OSS rotary embedding (`_apply_rotary_emb`: first/second halves, not interleaved)."""
    first, second = torch.chunk(x, 2, dim=-1)
    return torch.cat((first * cos - second * sin, second * cos + first * sin), dim=-1)


def rope_qk(query: Tensor, key: Tensor, cos: Tensor, sin: Tensor) -> tuple[Tensor, Tensor]:
    """RoPE on q/k in the projections' layout [B, T, H, D] (cos/sin [B, T, D/2]); one fused kernel each way when
    compiled (`_compiled_on_gpu`)."""
    cos, sin = cos.unsqueeze(2), sin.unsqueeze(2)
    return rotate_half_pairs(query, cos, sin), rotate_half_pairs(key, cos, sin)


def flex_attention_with_rope_and_sinks(
    query: Tensor, key: Tensor, value: Tensor, cos: Tensor, sin: Tensor, block_mask, sinks: Tensor | None, scale: float
) -> Tensor:
    """RoPE on q/k, then flex_attention_with_sinks on the [B, H, T, D] views; q/k/v come in the projections'
    layout [B, T, H, D], cos/sin [B, T, D/2]. Compiled as one function, the rotation is one fused kernel each
    way instead of ~8 strided elementwise passes, and its backward kernel writes q's and k's gradients straight
    in the projections' layout (given [B, H, T, D] views instead, the projections' backward copied dq into
    rows: 47 us a layer in the profile of run 14; the whole step measured 0.25% faster, run 16, within noise)."""
    query, key = rope_qk(query, key, cos, sin)
    return flex_attention_with_sinks(query.transpose(1, 2), key.transpose(1, 2), value.transpose(1, 2), block_mask,
                                     sinks, scale)


def triton_attention_with_rope_and_sinks(
    query: Tensor, key: Tensor, value: Tensor, cos: Tensor, sin: Tensor, spans: "DocumentSpans", sinks: Tensor | None,
    scale: float
) -> Tensor:
    """RoPE (compiled), then model/triton_attention's kernels on the [B, T, H, D] tensors; returns [B, T, Hq, D]."""
    from rustforge.model.triton_attention import packed_sink_attention

    query, key = _compiled_on_gpu(rope_qk, query.device)(query, key, cos, sin)
    return packed_sink_attention(query, key, value, sinks, spans.starts, spans.ends, spans.window, scale)


def rustforge_flex_attention(
    module: torch.nn.Module,
    query: Tensor,
    key: Tensor,
    value: Tensor,
    attention_mask,
    scaling: float | None = None,
    dropout: float = 0.0,
    sliding_window: int | None = None,
    s_aux: Tensor | None = None,
    **kwargs,
) -> tuple[Tensor, None]:
    """transformers attention function: q [B, Hq, T, D], k/v [B, Hkv, T, D] -> ([B, T, Hq, D], None).

    `attention_mask` must be a BlockMask or DocumentSpans from `build_attention_masks(..., impl="flex" or
    "triton")`; it already carries the causal, document and (for sliding layers) window rule, so
    `sliding_window` is unused.
    """
    from torch.nn.attention.flex_attention import BlockMask

    if not isinstance(attention_mask, (BlockMask, DocumentSpans)):
        raise TypeError(
            f"{FLEX_IMPLEMENTATION_NAME}: attention_mask must be a flex BlockMask or DocumentSpans from "
            f"rustforge.model.attention.build_attention_masks(impl='flex' or 'triton'), got "
            f"{type(attention_mask).__name__}"
        )
    if dropout:
        raise ValueError(f"{FLEX_IMPLEMENTATION_NAME}: attention dropout is not supported (got {dropout})")
    scale = scaling if scaling is not None else 1.0 / math.sqrt(query.shape[-1])
    if isinstance(attention_mask, DocumentSpans):  # the kernels take [B, T, H, D]: transposed views, no copy
        from rustforge.model.triton_attention import packed_sink_attention

        out = packed_sink_attention(query.transpose(1, 2), key.transpose(1, 2), value.transpose(1, 2), s_aux,
                                    attention_mask.starts, attention_mask.ends, attention_mask.window, scale)
        return out, None
    if query.device.type == "cpu" and any(t.requires_grad for t in (query, key, value)):
        raise NotImplementedError(
            f"{FLEX_IMPLEMENTATION_NAME}: torch's flex attention has no CPU backward; use the 'eager' "
            "attention implementation for CPU training"
        )
    attend = _compiled_on_gpu(flex_attention_with_sinks, query.device)
    return attend(query, key, value, attention_mask, s_aux, scale), None


def register_flex_attention() -> str:
    """Register `rustforge_flex` with transformers (attention + mask interfaces); returns its name.

    The mask registration lets transformers build its own BlockMask (e.g. in generate) when no mask
    dict is passed; training always passes `build_attention_masks(..., impl="flex")`.
    """
    from transformers import AttentionInterface
    from transformers.masking_utils import (
        ALL_MASK_ATTENTION_FUNCTIONS,
        AttentionMaskInterface,
    )

    AttentionInterface.register(FLEX_IMPLEMENTATION_NAME, rustforge_flex_attention)
    if "flex_attention" in ALL_MASK_ATTENTION_FUNCTIONS:
        AttentionMaskInterface.register(FLEX_IMPLEMENTATION_NAME, ALL_MASK_ATTENTION_FUNCTIONS["flex_attention"])
    return FLEX_IMPLEMENTATION_NAME


def _fusable_projection(module: torch.nn.Module) -> bool:
    from rustforge.model import lora

    if isinstance(module, lora.LoraLinear):
        return lora.FUSED_PROJECTIONS and isinstance(module.lora_dropout, torch.nn.Identity)
    return type(module) is torch.nn.Linear


class PackedFlexAttention(GptOssAttention):
    """transformers' GptOssAttention (same parameters and submodules) whose training forward -- a flex
    BlockMask or DocumentSpans from build_attention_masks and no KV cache -- computes q, k and v with one LoRA
    projection call (model/lora.lora_projections: one GEMM for the three LoRA A factors, LoRA accumulated inside
    the base GEMMs) and RoPE compiled with the attention (flex) or before it (the Triton kernels). Anything else
    (a cache, dense masks, another attention implementation, LoRA dropout) runs transformers' forward."""

    def forward(self, hidden_states, position_embeddings, attention_mask, **kwargs):
        from torch.nn.attention.flex_attention import BlockMask

        from rustforge.model.lora import lora_projections

        projections = (self.q_proj, self.k_proj, self.v_proj)
        if (
            kwargs.get("cache") is not None  # transformers >= 5.2x
            or kwargs.get("past_key_values") is not None  # its name before (the device has 5.17)
            or not isinstance(attention_mask, (BlockMask, DocumentSpans))
            or self.config._attn_implementation != FLEX_IMPLEMENTATION_NAME
            or not all(_fusable_projection(p) for p in projections)
            or (hidden_states.device.type == "cpu" and torch.is_grad_enabled())
        ):
            return super().forward(hidden_states, position_embeddings, attention_mask, **kwargs)
        input_shape = hidden_states.shape[:-1]
        hidden_shape = (*input_shape, -1, self.head_dim)
        query, key, value = (t.view(hidden_shape) for t in lora_projections(hidden_states, projections))  # [B, T, H, D]
        cos, sin = position_embeddings
        if isinstance(attention_mask, DocumentSpans):
            out = triton_attention_with_rope_and_sinks(query, key, value, cos, sin, attention_mask, self.sinks,
                                                       self.scaling)
        else:
            attend = _compiled_on_gpu(flex_attention_with_rope_and_sinks, query.device)
            out = attend(query, key, value, cos, sin, attention_mask, self.sinks, self.scaling)
        return self.o_proj(out.reshape(*input_shape, -1)), None


def install_packed_flex_attention(hf_model: torch.nn.Module) -> int:
    """Make every GptOssAttention under hf_model a PackedFlexAttention (a class swap: no new state)."""
    swapped = 0
    for module in hf_model.modules():
        if type(module) is GptOssAttention:
            module.__class__ = PackedFlexAttention
            swapped += 1
    return swapped


# ------------------------------------------------------------------------------------------ reference


def reference_attention(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    sinks: Tensor | None,
    doc_ids: Tensor,
    sliding_window: int | None,
    scaling: float,
) -> Tensor:
    """Obviously-correct attention for tests: one query at a time, keys picked by an explicit loop.

    q [B, Hq, T, D], k/v [B, Hkv, T, D] (query head h uses kv head h // (Hq // Hkv)), sinks [Hq] or
    None, doc_ids [B, T] (-1 padding). Returns [B, T, Hq, D] in q's dtype (use float64 for tightness).
    """
    _check_doc_ids(doc_ids, sliding_window)
    batch, num_q_heads, seq_len, _ = q.shape
    group = num_q_heads // k.shape[1]
    kv_head = torch.arange(num_q_heads, device=q.device) // group
    rows = []
    for b in range(batch):
        row = []
        for i in range(seq_len):
            keys = [j for j in range(seq_len) if _may_attend(doc_ids[b], i, j, sliding_window)]
            row.append(_one_query(q[b, :, i], k[b, kv_head][:, keys], v[b, kv_head][:, keys], sinks, scaling))
        rows.append(torch.stack(row))
    return torch.stack(rows)


def _may_attend(doc_row: Tensor, i: int, j: int, sliding_window: int | None) -> bool:
    doc_i, doc_j = int(doc_row[i]), int(doc_row[j])
    in_window = sliding_window is None or i - j < sliding_window
    return doc_i >= 0 and doc_i == doc_j and j <= i and in_window


def _one_query(q_i: Tensor, keys: Tensor, values: Tensor, sinks: Tensor | None, scaling: float) -> Tensor:
    """q_i [H, D], keys/values [H, n, D] -> [H, D]; softmax over [scores, sink], sink column dropped."""
    scores = torch.einsum("hd,hnd->hn", q_i, keys) * scaling
    if sinks is not None:
        scores = torch.cat([scores, sinks.to(scores.dtype)[:, None]], dim=1)
    if scores.shape[1] == 0:  # padding query without sink: nothing to attend
        return torch.zeros_like(q_i[:, : values.shape[-1]])
    probs = torch.softmax(scores, dim=1)[:, : keys.shape[1]]
    return torch.einsum("hn,hnd->hd", probs, values)
