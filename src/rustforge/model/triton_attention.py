"""Attention over packed documents with GPT-OSS's sinks, causal and sliding-window masks, as Triton kernels
(one forward, three backward), for the GPU training path.

Why our own kernel: the flex-attention kernels (model/attention.py) spend ~3.4x their forward's time in the
backward on the 20B shape (run 14's profile: 478 us a layer against 139), the sinks go through an lse
epilogue with its own gradient, and the document structure is rediscovered from a block mask per layer type.
Here a packed row is described by two int32 per token -- the flat index where its document starts and one past
where it ends (`document_spans`) -- and both layer types use them (the window is a kernel argument):
    query i attends key j  iff  start[i] <= j <= i  (and i - j < window on sliding layers)
which is attention.py's rule for contiguous documents (a padding token's start is i + 1: it attends nothing).
The kernels read q/k/v as [B, T, H, D] with any strides (the projections' rows on our path, transposed
[B, H, T, D] tensors on transformers'), so no transposes are copied.

The sink is one more softmax column with no value: the forward starts each row's online softmax at
(max = sink, sum = 1), so out = sum_j exp(s_j) v_j / (sum_j exp(s_j) + exp(sink)) and the stored logsumexp
includes it. The backward is FlashAttention-2's with that lse -- dS = P (dP - D), D = rowsum(dO * O) -- and
the sink's gradient is -sum_i exp(sink - lse_i) D_i.

Block ranges, no block mask: a query block scans keys from min(start) of its rows (or its window's first key)
to its last row; a key block scans queries from its first row to the end of its rows' documents (`ends`).
GQA: the dK/dV program of a kv head loops over the query heads of its group.

Reference: attention.reference_attention (float64, one query at a time). Tests: tests/test_triton_attention.py
(TRITON_INTERPRET on a CPU; natively with `-m gpu`).
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

from rustforge.model.triton_dequant import triton_kernels_available

try:
    import triton
    import triton.language as tl
except ImportError:  # CPU-only installs: flex or the eager reference is used
    triton = None

LOG2E = 1.4426950408889634
# (BLOCK_M, BLOCK_N, num_warps, num_stages) per kernel; tests pass smaller blocks for the interpreter. Chosen by
# bench/attention_kernels.py on the H100 (run 20, 4K tokens in 4 documents, the 20B heads, forward + backward per
# layer): forward 64 x 64 (0.91 / 0.43 ms full / sliding against 0.92 / 0.45 at 128 x 64); backward 64 x 64 with 4
# warps and 3 stages (2 stages 0.95 / 0.44; 64 x 128, 128 x 64 with 8 warps, 32 x 64: 1.1-1.2 / 0.5-0.8)
FORWARD_BLOCKS = (64, 64, 4, 3)
# True: blocks that every row (forward, dQ) or every key (dK/dV) of a program attends whole skip the mask arithmetic
# (FlashAttention-2's split of the loop). Interpreter-tested, not yet measured on a GPU (session 7 ran out of device
# time): bench/attention_kernels.py's `unmasked_interior` candidate measures it; False is what the step ran with.
UNMASKED_INTERIOR = False
BACKWARD_BLOCKS = (64, 64, 4, 3)  # both dK/dV (keys in blocks of BLOCK_N) and dQ (queries in blocks of BLOCK_M)


def triton_attention_available(q: Tensor) -> bool:
    return q.dtype in (torch.bfloat16, torch.float16, torch.float32) and triton_kernels_available(q)


def document_spans(doc_ids: Tensor) -> tuple[Tensor, Tensor]:
    """Per token of doc_ids [B, T] (-1 padding), flattened to B * T: the flat index where its document starts
    and one past where it ends, int32. A padding token gets (i + 1, i): it attends nothing, nothing attends it.
    Batch rows are separate: a document never spans two rows."""
    batch, seq_len = doc_ids.shape
    flat = torch.arange(batch * seq_len, device=doc_ids.device).view(batch, seq_len)
    new_doc = torch.ones_like(doc_ids, dtype=torch.bool)
    new_doc[:, 1:] = doc_ids[:, 1:] != doc_ids[:, :-1]
    # start: the running max of the flat index where a new document begins
    starts = torch.where(new_doc, flat, torch.zeros_like(flat)).cummax(dim=1).values
    new_doc_from_right = torch.ones_like(new_doc)
    new_doc_from_right[:, :-1] = new_doc[:, 1:]
    big = batch * seq_len
    ends = torch.where(new_doc_from_right, flat + 1, torch.full_like(flat, big)).flip(1).cummin(dim=1).values.flip(1)
    padding = doc_ids < 0
    starts = torch.where(padding, flat + 1, starts)
    ends = torch.where(padding, flat, ends)
    return starts.reshape(-1).to(torch.int32), ends.reshape(-1).to(torch.int32)


if triton is not None:

    @triton.jit
    def _offsets(rows, heads, seq_len, stride_b, stride_t, stride_h, dims):
        """Element offsets of [len(rows), len(dims)] (or the transpose, by the shapes given) in a [B, T, H, D]
        tensor: flat token index = batch * seq_len + position."""
        return ((rows // seq_len).to(tl.int64) * stride_b + (rows % seq_len).to(tl.int64) * stride_t
                + heads.to(tl.int64) * stride_h + dims)

    @triton.jit
    def _ceil_to(x, block: tl.constexpr):
        """The smallest multiple of `block` >= x, for x >= 0."""
        return ((x + block - 1) // block) * block

    @triton.jit
    def _forward_keys(acc, m_i, l_i, q, K, V, lo, hi, rows, starts, n_tokens, seq_len, kv_head, k_sb, k_st, k_sh, v_sb,
                      v_st, v_sh, qk_scale, window, dims, HAS_WINDOW: tl.constexpr, MASKED: tl.constexpr,
                      BLOCK_N: tl.constexpr, PRECISION: tl.constexpr):
        """The forward's online softmax over the key blocks starting in [lo, hi); MASKED=False for blocks every row
        may attend whole (no mask arithmetic)."""
        for key0 in range(lo, hi, BLOCK_N):
            keys = key0 + tl.arange(0, BLOCK_N)
            key_ok = keys < n_tokens
            k_t = tl.load(K + _offsets(keys[None, :], kv_head, seq_len, k_sb, k_st, k_sh, dims[:, None]),
                          mask=key_ok[None, :], other=0.0)  # [D, BLOCK_N]
            s = tl.dot(q, k_t, input_precision=PRECISION) * qk_scale
            if MASKED:
                allowed = (keys[None, :] <= rows[:, None]) & (keys[None, :] >= starts[:, None])
                if HAS_WINDOW:
                    allowed = allowed & (rows[:, None] - keys[None, :] < window)
                s = tl.where(allowed, s, float("-inf"))
            m_new = tl.maximum(m_i, tl.max(s, axis=1))
            m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)  # a row with nothing yet (no sink)
            p = tl.exp2(s - m_safe[:, None])
            alpha = tl.exp2(m_i - m_safe)
            v = tl.load(V + _offsets(keys[:, None], kv_head, seq_len, v_sb, v_st, v_sh, dims[None, :]),
                        mask=key_ok[:, None], other=0.0)
            l_i = l_i * alpha + tl.sum(p, axis=1)
            acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v, input_precision=PRECISION)
            m_i = m_new
        return acc, m_i, l_i

    @triton.jit
    def _interior_keys(lo, hi, block, starts, window, HAS_WINDOW: tl.constexpr, BLOCK_M: tl.constexpr,
                       BLOCK_N: tl.constexpr):
        """[mid_lo, mid_hi) within [lo, hi): the key blocks that every row of query block `block` may attend whole
        -- at or after every row's document start, wholly before the block's first row, and (window) within the
        window of its last row. A padding row (start = row + 1) or a row past the end leaves it empty."""
        mid_lo = _ceil_to(tl.max(starts, axis=0), BLOCK_N)
        if HAS_WINDOW:
            mid_lo = tl.maximum(mid_lo, _ceil_to(tl.maximum(block * BLOCK_M + BLOCK_M - window, 0), BLOCK_N))
        mid_hi = _ceil_to(tl.maximum(block * BLOCK_M - BLOCK_N + 2, 0), BLOCK_N)
        mid_lo = tl.minimum(tl.maximum(mid_lo, lo), hi)
        mid_hi = tl.minimum(tl.maximum(mid_hi, mid_lo), hi)
        return mid_lo, mid_hi

    @triton.jit
    def _attention_forward_kernel(Q, K, V, Sinks, Out, Lse, Starts, n_tokens, seq_len, q_sb, q_st, q_sh, k_sb, k_st,
                                  k_sh, v_sb, v_st, v_sh, o_sb, o_st, o_sh, qk_scale, window, GROUP: tl.constexpr,
                                  HEAD_DIM: tl.constexpr, HAS_SINKS: tl.constexpr, HAS_WINDOW: tl.constexpr,
                                  BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, PRECISION: tl.constexpr,
                                  UNMASKED_INTERIOR: tl.constexpr):
        """One block of BLOCK_M queries of one head: online softmax (log2 domain) over its documents' keys.
        Writes out and lse [Hq, tokens] (log2 units, sink included; +inf for a row with neither keys nor sink)."""
        block, head = tl.program_id(0), tl.program_id(1)
        kv_head = head // GROUP
        rows = block * BLOCK_M + tl.arange(0, BLOCK_M)
        dims = tl.arange(0, HEAD_DIM)
        row_ok = rows < n_tokens
        starts = tl.load(Starts + rows, mask=row_ok, other=n_tokens)
        q = tl.load(Q + _offsets(rows[:, None], head, seq_len, q_sb, q_st, q_sh, dims[None, :]), mask=row_ok[:, None],
                    other=0.0)
        first_key = tl.min(starts, axis=0)
        if HAS_WINDOW:
            first_key = tl.maximum(first_key, block * BLOCK_M - window + 1)
        lo = (first_key // BLOCK_N) * BLOCK_N
        hi = tl.minimum(block * BLOCK_M + BLOCK_M, n_tokens)  # exclusive
        if HAS_SINKS:
            sink = tl.load(Sinks + head).to(tl.float32) * 1.4426950408889634
            m_i = tl.zeros([BLOCK_M], dtype=tl.float32) + sink
            l_i = tl.zeros([BLOCK_M], dtype=tl.float32) + 1.0
        else:
            m_i = tl.zeros([BLOCK_M], dtype=tl.float32) - float("inf")
            l_i = tl.zeros([BLOCK_M], dtype=tl.float32)
        acc = tl.zeros([BLOCK_M, HEAD_DIM], dtype=tl.float32)
        if UNMASKED_INTERIOR:
            mid_lo, mid_hi = _interior_keys(lo, hi, block, starts, window, HAS_WINDOW, BLOCK_M, BLOCK_N)
            acc, m_i, l_i = _forward_keys(acc, m_i, l_i, q, K, V, lo, mid_lo, rows, starts, n_tokens, seq_len, kv_head,
                                          k_sb, k_st, k_sh, v_sb, v_st, v_sh, qk_scale, window, dims, HAS_WINDOW, True,
                                          BLOCK_N, PRECISION)
            acc, m_i, l_i = _forward_keys(acc, m_i, l_i, q, K, V, mid_lo, mid_hi, rows, starts, n_tokens, seq_len,
                                          kv_head, k_sb, k_st, k_sh, v_sb, v_st, v_sh, qk_scale, window, dims,
                                          HAS_WINDOW, False, BLOCK_N, PRECISION)
            lo = mid_hi
        acc, m_i, l_i = _forward_keys(acc, m_i, l_i, q, K, V, lo, hi, rows, starts, n_tokens, seq_len, kv_head, k_sb,
                                      k_st, k_sh, v_sb, v_st, v_sh, qk_scale, window, dims, HAS_WINDOW, True, BLOCK_N,
                                      PRECISION)
        empty = l_i == 0.0
        out = acc / tl.where(empty, 1.0, l_i)[:, None]
        lse = tl.where(empty, float("inf"), m_i + tl.log2(tl.where(empty, 1.0, l_i)))
        tl.store(Out + _offsets(rows[:, None], head, seq_len, o_sb, o_st, o_sh, dims[None, :]),
                 out.to(Out.dtype.element_ty), mask=row_ok[:, None])
        tl.store(Lse + head * n_tokens + rows, lse, mask=row_ok)

    @triton.jit
    def _attention_delta_kernel(Out, GradOut, Delta, n_tokens, seq_len, o_sb, o_st, o_sh, HEAD_DIM: tl.constexpr,
                                BLOCK_M: tl.constexpr):
        """D = rowsum(dO * O) per query and head, float32 [Hq, tokens] (dO has O's strides)."""
        block, head = tl.program_id(0), tl.program_id(1)
        rows = block * BLOCK_M + tl.arange(0, BLOCK_M)
        dims = tl.arange(0, HEAD_DIM)
        row_ok = rows < n_tokens
        offsets = _offsets(rows[:, None], head, seq_len, o_sb, o_st, o_sh, dims[None, :])
        o = tl.load(Out + offsets, mask=row_ok[:, None], other=0.0).to(tl.float32)
        do = tl.load(GradOut + offsets, mask=row_ok[:, None], other=0.0).to(tl.float32)
        tl.store(Delta + head * n_tokens + rows, tl.sum(o * do, axis=1), mask=row_ok)

    @triton.jit
    def _dkdv_rows(grad_k, grad_v, k, v, Q, GradOut, Lse, Delta, Starts, lo, hi, head, keys, n_tokens, seq_len, q_sb,
                   q_st, q_sh, o_sb, o_st, o_sh, qk_scale, window, dims, HAS_WINDOW: tl.constexpr, MASKED: tl.constexpr,
                   BLOCK_M: tl.constexpr, PRECISION: tl.constexpr):
        """dK, dV of one key block accumulated over the query blocks starting in [lo, hi) of one query head;
        MASKED=False for query blocks that attend every key of the block."""
        for row0 in range(lo, hi, BLOCK_M):
            rows = row0 + tl.arange(0, BLOCK_M)
            row_ok = rows < n_tokens
            q_t = tl.load(Q + _offsets(rows[None, :], head, seq_len, q_sb, q_st, q_sh, dims[:, None]),
                          mask=row_ok[None, :], other=0.0)  # [D, BLOCK_M]
            lse = tl.load(Lse + head * n_tokens + rows, mask=row_ok, other=float("inf"))
            s_t = tl.dot(k, q_t, input_precision=PRECISION) * qk_scale  # [BLOCK_N, BLOCK_M]
            if MASKED:
                starts = tl.load(Starts + rows, mask=row_ok, other=n_tokens)
                allowed = (keys[:, None] <= rows[None, :]) & (keys[:, None] >= starts[None, :])
                if HAS_WINDOW:
                    allowed = allowed & (rows[None, :] - keys[:, None] < window)
                p_t = tl.where(allowed, tl.exp2(s_t - lse[None, :]), 0.0)
            else:
                p_t = tl.exp2(s_t - lse[None, :])
            do = tl.load(GradOut + _offsets(rows[:, None], head, seq_len, o_sb, o_st, o_sh, dims[None, :]),
                         mask=row_ok[:, None], other=0.0)  # [BLOCK_M, D]
            grad_v += tl.dot(p_t.to(do.dtype), do, input_precision=PRECISION)
            dp_t = tl.dot(v, tl.trans(do), input_precision=PRECISION)  # [BLOCK_N, BLOCK_M]
            delta = tl.load(Delta + head * n_tokens + rows, mask=row_ok, other=0.0)
            ds_t = p_t * (dp_t - delta[None, :])
            grad_k += tl.dot(ds_t.to(q_t.dtype), tl.trans(q_t), input_precision=PRECISION)
        return grad_k, grad_v

    @triton.jit
    def _interior_rows(lo, hi, block, ends, window, HAS_WINDOW: tl.constexpr, BLOCK_M: tl.constexpr,
                       BLOCK_N: tl.constexpr):
        """[mid_lo, mid_hi) within [lo, hi): the query blocks that attend every key of key block `block` -- wholly
        after its last key, before the end of its first key's document (a block that crosses a document end or holds
        padding leaves it empty), and (window) within the window of its first key."""
        mid_lo = _ceil_to(block * BLOCK_N + BLOCK_N - 1, BLOCK_M)
        mid_hi = (tl.min(ends, axis=0) // BLOCK_M) * BLOCK_M
        if HAS_WINDOW:
            mid_hi = tl.minimum(mid_hi, ((block * BLOCK_N + window) // BLOCK_M) * BLOCK_M)
        mid_lo = tl.minimum(tl.maximum(mid_lo, lo), hi)
        mid_hi = tl.minimum(tl.maximum(mid_hi, mid_lo), hi)
        return mid_lo, mid_hi

    @triton.jit
    def _attention_dkdv_kernel(Q, K, V, GradOut, Lse, Delta, Starts, Ends, GradK, GradV, n_tokens, seq_len, q_sb, q_st,
                               q_sh, k_sb, k_st, k_sh, v_sb, v_st, v_sh, o_sb, o_st, o_sh, g_sb, g_st, g_sh, qk_scale,
                               sm_scale, window, GROUP: tl.constexpr, HEAD_DIM: tl.constexpr, HAS_WINDOW: tl.constexpr,
                               BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, PRECISION: tl.constexpr,
                               UNMASKED_INTERIOR: tl.constexpr):
        """dK, dV of one block of BLOCK_N keys of one kv head: every query head of the group, every query block
        from the keys' first row to the end of their documents (or of their window). dK/dV share strides g_*."""
        block, kv_head = tl.program_id(0), tl.program_id(1)
        keys = block * BLOCK_N + tl.arange(0, BLOCK_N)
        dims = tl.arange(0, HEAD_DIM)
        key_ok = keys < n_tokens
        k = tl.load(K + _offsets(keys[:, None], kv_head, seq_len, k_sb, k_st, k_sh, dims[None, :]), mask=key_ok[:, None],
                    other=0.0)
        v = tl.load(V + _offsets(keys[:, None], kv_head, seq_len, v_sb, v_st, v_sh, dims[None, :]), mask=key_ok[:, None],
                    other=0.0)
        ends = tl.load(Ends + keys, mask=key_ok, other=0)
        lo = ((block * BLOCK_N) // BLOCK_M) * BLOCK_M
        hi = tl.minimum(tl.max(ends, axis=0), n_tokens)  # exclusive
        if HAS_WINDOW:
            hi = tl.minimum(hi, block * BLOCK_N + BLOCK_N - 1 + window)
        mid_lo, mid_hi = hi, hi
        if UNMASKED_INTERIOR:
            mid_lo, mid_hi = _interior_rows(lo, hi, block, ends, window, HAS_WINDOW, BLOCK_M, BLOCK_N)
        grad_k = tl.zeros([BLOCK_N, HEAD_DIM], dtype=tl.float32)
        grad_v = tl.zeros([BLOCK_N, HEAD_DIM], dtype=tl.float32)
        for g in range(GROUP):
            head = kv_head * GROUP + g
            grad_k, grad_v = _dkdv_rows(grad_k, grad_v, k, v, Q, GradOut, Lse, Delta, Starts, lo, mid_lo, head, keys,
                                        n_tokens, seq_len, q_sb, q_st, q_sh, o_sb, o_st, o_sh, qk_scale, window, dims,
                                        HAS_WINDOW, True, BLOCK_M, PRECISION)
            if UNMASKED_INTERIOR:
                grad_k, grad_v = _dkdv_rows(grad_k, grad_v, k, v, Q, GradOut, Lse, Delta, Starts, mid_lo, mid_hi, head,
                                            keys, n_tokens, seq_len, q_sb, q_st, q_sh, o_sb, o_st, o_sh, qk_scale,
                                            window, dims, HAS_WINDOW, False, BLOCK_M, PRECISION)
                grad_k, grad_v = _dkdv_rows(grad_k, grad_v, k, v, Q, GradOut, Lse, Delta, Starts, mid_hi, hi, head,
                                            keys, n_tokens, seq_len, q_sb, q_st, q_sh, o_sb, o_st, o_sh, qk_scale,
                                            window, dims, HAS_WINDOW, True, BLOCK_M, PRECISION)
        grad_offsets = _offsets(keys[:, None], kv_head, seq_len, g_sb, g_st, g_sh, dims[None, :])
        tl.store(GradK + grad_offsets, (grad_k * sm_scale).to(GradK.dtype.element_ty), mask=key_ok[:, None])
        tl.store(GradV + grad_offsets, grad_v.to(GradV.dtype.element_ty), mask=key_ok[:, None])

    @triton.jit
    def _dq_keys(grad_q, q, do, lse, delta, K, V, lo, hi, rows, starts, n_tokens, seq_len, kv_head, k_sb, k_st, k_sh,
                 v_sb, v_st, v_sh, qk_scale, window, dims, HAS_WINDOW: tl.constexpr, MASKED: tl.constexpr,
                 BLOCK_N: tl.constexpr, PRECISION: tl.constexpr):
        """dQ of one query block accumulated over the key blocks starting in [lo, hi)."""
        for key0 in range(lo, hi, BLOCK_N):
            keys = key0 + tl.arange(0, BLOCK_N)
            key_ok = keys < n_tokens
            k_t = tl.load(K + _offsets(keys[None, :], kv_head, seq_len, k_sb, k_st, k_sh, dims[:, None]),
                          mask=key_ok[None, :], other=0.0)  # [D, BLOCK_N]
            v_t = tl.load(V + _offsets(keys[None, :], kv_head, seq_len, v_sb, v_st, v_sh, dims[:, None]),
                          mask=key_ok[None, :], other=0.0)
            s = tl.dot(q, k_t, input_precision=PRECISION) * qk_scale
            if MASKED:
                allowed = (keys[None, :] <= rows[:, None]) & (keys[None, :] >= starts[:, None])
                if HAS_WINDOW:
                    allowed = allowed & (rows[:, None] - keys[None, :] < window)
                p = tl.where(allowed, tl.exp2(s - lse[:, None]), 0.0)
            else:
                p = tl.exp2(s - lse[:, None])
            dp = tl.dot(do, v_t, input_precision=PRECISION)
            ds = p * (dp - delta[:, None])
            grad_q += tl.dot(ds.to(k_t.dtype), tl.trans(k_t), input_precision=PRECISION)
        return grad_q

    @triton.jit
    def _attention_dq_kernel(Q, K, V, GradOut, Lse, Delta, Starts, GradQ, n_tokens, seq_len, q_sb, q_st, q_sh, k_sb,
                             k_st, k_sh, v_sb, v_st, v_sh, o_sb, o_st, o_sh, g_sb, g_st, g_sh, qk_scale, sm_scale, window,
                             GROUP: tl.constexpr, HEAD_DIM: tl.constexpr, HAS_WINDOW: tl.constexpr,
                             BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, PRECISION: tl.constexpr,
                             UNMASKED_INTERIOR: tl.constexpr):
        """dQ (strides g_*) of one block of BLOCK_M queries of one head, over the forward's key range."""
        block, head = tl.program_id(0), tl.program_id(1)
        kv_head = head // GROUP
        rows = block * BLOCK_M + tl.arange(0, BLOCK_M)
        dims = tl.arange(0, HEAD_DIM)
        row_ok = rows < n_tokens
        q = tl.load(Q + _offsets(rows[:, None], head, seq_len, q_sb, q_st, q_sh, dims[None, :]), mask=row_ok[:, None],
                    other=0.0)
        do = tl.load(GradOut + _offsets(rows[:, None], head, seq_len, o_sb, o_st, o_sh, dims[None, :]),
                     mask=row_ok[:, None], other=0.0)
        starts = tl.load(Starts + rows, mask=row_ok, other=n_tokens)
        lse = tl.load(Lse + head * n_tokens + rows, mask=row_ok, other=float("inf"))
        delta = tl.load(Delta + head * n_tokens + rows, mask=row_ok, other=0.0)
        first_key = tl.min(starts, axis=0)
        if HAS_WINDOW:
            first_key = tl.maximum(first_key, block * BLOCK_M - window + 1)
        lo = (first_key // BLOCK_N) * BLOCK_N
        hi = tl.minimum(block * BLOCK_M + BLOCK_M, n_tokens)
        grad_q = tl.zeros([BLOCK_M, HEAD_DIM], dtype=tl.float32)
        if UNMASKED_INTERIOR:
            mid_lo, mid_hi = _interior_keys(lo, hi, block, starts, window, HAS_WINDOW, BLOCK_M, BLOCK_N)
            grad_q = _dq_keys(grad_q, q, do, lse, delta, K, V, lo, mid_lo, rows, starts, n_tokens, seq_len, kv_head,
                              k_sb, k_st, k_sh, v_sb, v_st, v_sh, qk_scale, window, dims, HAS_WINDOW, True, BLOCK_N,
                              PRECISION)
            grad_q = _dq_keys(grad_q, q, do, lse, delta, K, V, mid_lo, mid_hi, rows, starts, n_tokens, seq_len, kv_head,
                              k_sb, k_st, k_sh, v_sb, v_st, v_sh, qk_scale, window, dims, HAS_WINDOW, False, BLOCK_N,
                              PRECISION)
            lo = mid_hi
        grad_q = _dq_keys(grad_q, q, do, lse, delta, K, V, lo, hi, rows, starts, n_tokens, seq_len, kv_head, k_sb, k_st,
                          k_sh, v_sb, v_st, v_sh, qk_scale, window, dims, HAS_WINDOW, True, BLOCK_N, PRECISION)
        grad_offsets = _offsets(rows[:, None], head, seq_len, g_sb, g_st, g_sh, dims[None, :])
        tl.store(GradQ + grad_offsets, (grad_q * sm_scale).to(GradQ.dtype.element_ty), mask=row_ok[:, None])


def _precision(q: Tensor) -> str:
    """tl.dot's input precision: float32 inputs (the tiny model) in full float32, not TF32's 10-bit mantissa."""
    return "ieee" if q.dtype == torch.float32 else "tf32"


def _strides(t: Tensor, name: str) -> tuple[int, int, int]:
    """(batch, token, head) strides of a [B, T, H, D] tensor whose head dim is dense."""
    if t.dim() != 4 or t.stride(3) != 1:
        raise ValueError(f"triton attention: {name} must be [B, T, H, D] with a dense last dim, got shape "
                         f"{tuple(t.shape)} strides {t.stride()}")
    return t.stride(0), t.stride(1), t.stride(2)


class _PackedSinkAttention(torch.autograd.Function):
    @staticmethod
    def forward(ctx, q, k, v, sinks, starts, ends, window, scale, blocks):
        batch, seq_len, q_heads, head_dim = q.shape
        out = torch.empty(q.shape, dtype=q.dtype, device=q.device)
        lse = torch.empty(q_heads, batch * seq_len, dtype=torch.float32, device=q.device)
        block_m, block_n, warps, stages = blocks[0]
        _attention_forward_kernel[(triton.cdiv(batch * seq_len, block_m), q_heads)](
            q, k, v, sinks if sinks is not None else q, out, lse, starts, batch * seq_len, seq_len,
            *_strides(q, "q"), *_strides(k, "k"), *_strides(v, "v"), *_strides(out, "out"), scale * LOG2E,
            window,
            GROUP=q_heads // k.shape[2], HEAD_DIM=head_dim, HAS_SINKS=sinks is not None, HAS_WINDOW=window > 0,
            BLOCK_M=block_m, BLOCK_N=block_n, PRECISION=_precision(q), UNMASKED_INTERIOR=UNMASKED_INTERIOR, num_warps=warps,
            num_stages=stages)
        ctx.unmasked_interior = UNMASKED_INTERIOR  # the backward follows its forward's setting
        ctx.save_for_backward(q, k, v, sinks, starts, ends, out, lse)
        ctx.window, ctx.scale, ctx.blocks = window, scale, blocks
        return out

    @staticmethod
    def backward(ctx, grad_out):
        q, k, v, sinks, starts, ends, out, lse = ctx.saved_tensors
        batch, seq_len, q_heads, head_dim = q.shape
        n_tokens, kv_heads = batch * seq_len, k.shape[2]
        if grad_out.stride() != out.stride():
            grad_out = grad_out.contiguous()
        strides = (*_strides(q, "q"), *_strides(k, "k"), *_strides(v, "v"), *_strides(out, "out"))
        delta = torch.empty_like(lse)
        _attention_delta_kernel[(triton.cdiv(n_tokens, 64), q_heads)](
            out, grad_out, delta, n_tokens, seq_len, *strides[9:], HEAD_DIM=head_dim, BLOCK_M=64)
        # gradients [B, T, H, D] contiguous whatever the inputs' strides (q/k/v may be slices of one fused row)
        grad_q = torch.empty(q.shape, dtype=q.dtype, device=q.device)
        grad_k, grad_v = (torch.empty(k.shape, dtype=k.dtype, device=k.device) for _ in range(2))
        block_m, block_n, warps, stages = ctx.blocks[1]
        common = dict(GROUP=q_heads // kv_heads, HEAD_DIM=head_dim, HAS_WINDOW=ctx.window > 0, BLOCK_M=block_m,
                      BLOCK_N=block_n, PRECISION=_precision(q), UNMASKED_INTERIOR=ctx.unmasked_interior, num_warps=warps,
                      num_stages=stages)
        _attention_dkdv_kernel[(triton.cdiv(n_tokens, block_n), kv_heads)](
            q, k, v, grad_out, lse, delta, starts, ends, grad_k, grad_v, n_tokens, seq_len, *strides,
            *_strides(grad_k, "grad_k"), ctx.scale * LOG2E, ctx.scale, ctx.window, **common)
        _attention_dq_kernel[(triton.cdiv(n_tokens, block_m), q_heads)](
            q, k, v, grad_out, lse, delta, starts, grad_q, n_tokens, seq_len, *strides, *_strides(grad_q, "grad_q"),
            ctx.scale * LOG2E, ctx.scale, ctx.window, **common)
        grad_sinks = None
        if sinks is not None and ctx.needs_input_grad[3]:
            # d loss / d sink_h = -sum_i P(sink | row i) D_i, with P(sink | i) = exp2(sink * log2(e) - lse_i)
            p_sink = torch.exp2(sinks.float()[:, None] * LOG2E - lse)
            grad_sinks = (-(p_sink * delta).sum(dim=1)).to(sinks.dtype)
        return grad_q, grad_k, grad_v, grad_sinks, None, None, None, None, None


def packed_sink_attention(q: Tensor, k: Tensor, v: Tensor, sinks: Tensor | None, starts: Tensor, ends: Tensor,
                          window: int | None, scale: float | None = None, blocks: tuple | None = None) -> Tensor:
    """Attention of q [B, T, Hq, D] over k/v [B, T, Hkv, D] (any strides with a dense last dim) within the
    documents `document_spans` describes, causal, within `window` keys when given, with a sink logit per query
    head (or none). Returns [B, T, Hq, D] in q's dtype; differentiable in q, k, v and sinks."""
    if q.shape[-1] & (q.shape[-1] - 1) or q.shape[-1] < 16:
        raise ValueError(f"triton attention: head dim must be a power of two >= 16, got {q.shape[-1]}")
    if q.dim() != 4 or k.shape != v.shape or k.dim() != 4 or k.shape[:2] != q.shape[:2] or k.shape[3] != q.shape[3]:
        raise ValueError(f"triton attention: q [B, T, Hq, D] and k, v [B, T, Hkv, D] expected, got q "
                         f"{tuple(q.shape)}, k {tuple(k.shape)}, v {tuple(v.shape)}")
    if q.shape[2] % k.shape[2]:
        raise ValueError(f"triton attention: {q.shape[2]} query heads are not a multiple of {k.shape[2]} kv heads")
    if k.dtype != q.dtype or v.dtype != q.dtype:
        raise ValueError(f"triton attention: q, k, v must share a dtype, got {q.dtype}, {k.dtype}, {v.dtype}")
    n_tokens = q.shape[0] * q.shape[1]
    if starts.shape != (n_tokens,) or ends.shape != (n_tokens,):  # the kernels index them by flat token, unchecked
        raise ValueError(f"triton attention: starts and ends must be [B * T] = [{n_tokens}] (document_spans of this "
                         f"batch's doc_ids), got {tuple(starts.shape)} and {tuple(ends.shape)}")
    if sinks is not None and sinks.shape != (q.shape[2],):
        raise ValueError(f"triton attention: sinks must be [Hq] = [{q.shape[2]}], got {tuple(sinks.shape)}")
    if not triton_attention_available(q):
        raise RuntimeError(f"triton attention: needs a CUDA device with Triton (or TRITON_INTERPRET=1), got "
                           f"{q.dtype} on {q.device}; use model.attention: eager on a CPU")
    scale = scale if scale is not None else 1.0 / math.sqrt(q.shape[-1])
    blocks = blocks if blocks is not None else (FORWARD_BLOCKS, BACKWARD_BLOCKS)  # read now: settable
    return _PackedSinkAttention.apply(q, k, v, sinks, starts, ends, int(window or 0), float(scale), blocks)
