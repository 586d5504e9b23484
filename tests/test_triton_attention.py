"""model/triton_attention.py (packed attention with sinks, causal + sliding-window, document spans) against
attention.reference_attention in float64: outputs and the gradients of q, k, v and the sinks.

- CPU: document_spans on hand-made rows.
- With Triton importable, the kernels run on CPU under TRITON_INTERPRET=1 in a subprocess
  (`python tests/test_triton_attention.py`), float32 inputs, small blocks so rows cross block edges.
- GPU (`-m gpu`): bf16 on the 20B head shape (64 query heads, 8 kv heads, head dim 64) with the default blocks.
"""

from __future__ import annotations

import sys

import pytest
import torch
from triton_interpreter import needs_triton, run_interpreter_cases, run_under_interpreter

from rustforge.model import triton_attention as ta
from rustforge.model.attention import build_attention_masks, reference_attention

gpu = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a GPU")


def _doc_ids(seq_len: int, lengths: list[int]) -> list[int]:
    """A row of documents of these lengths (a negative length is that much padding), padded to seq_len."""
    row = []
    for doc, length in enumerate(lengths):
        row += [-1] * -length if length < 0 else [doc] * length
    return (row + [-1] * seq_len)[:seq_len]


def dense_reference(q, k, v, sinks, doc_ids, window, scale):
    """transformers' eager GPT-OSS attention (eager_attention_forward: sink column, max subtraction) with the
    additive document mask, one kv head's query group at a time (the [H, T, T] scores of 5K tokens would not
    fit at once); q [B, Hq, T, D] -> [B, T, Hq, D]. For the GPU test, where the float64 loop is too slow."""
    from types import SimpleNamespace

    from transformers.models.gpt_oss.modeling_gpt_oss import eager_attention_forward

    mask = build_attention_masks(doc_ids, window or doc_ids.shape[1], "eager", q.dtype)
    mask = mask["sliding_attention" if window else "full_attention"]
    group = q.shape[1] // k.shape[1]
    outs = []
    for kv_head in range(k.shape[1]):
        heads = slice(kv_head * group, (kv_head + 1) * group)
        module = SimpleNamespace(num_key_value_groups=group, sinks=sinks[heads], training=False)
        out, _ = eager_attention_forward(module, q[:, heads], k[:, kv_head : kv_head + 1], v[:, kv_head : kv_head + 1],
                                         mask, scale)
        outs.append(out)
    return torch.cat(outs, dim=2)


def check_attention(rows: list[list[int]], seq_len: int, q_heads: int, kv_heads: int, head_dim: int, window,
                    with_sinks: bool, dtype, device, tol: float, blocks=None, seed: int = 0, dense: bool = False,
                    layout: str = "bthd") -> dict:
    """`layout`: how the kernel gets q/k/v -- "bthd" the projections' [B, T, H, D], "bhtd" transposed views of
    [B, H, T, D] tensors, "mixed" q/k so and v in rows (transformers' attention interface after its RoPE), "fused"
    head slices of one [B, T, Hq + 2 Hkv, D]."""
    g = torch.Generator().manual_seed(seed)
    doc_ids = torch.tensor([_doc_ids(seq_len, lengths) for lengths in rows], device=device)
    batch = doc_ids.shape[0]
    q, k, v, grad_out = (torch.randn(batch, seq_len, heads, head_dim, generator=g)
                         for heads in (q_heads, kv_heads, kv_heads, q_heads))
    sinks = torch.randn(q_heads, generator=g) if with_sinks else None
    scale = head_dim ** -0.5
    # the reference, float64 on the CPU (float32 on the device with `dense`), [B, H, T, D]
    ref_device, ref_dtype = (device, torch.float32) if dense else ("cpu", torch.float64)
    ref_in = [t.to(ref_device, ref_dtype).requires_grad_(True) for t in (q, k, v)]
    ref_sinks = sinks.to(ref_device, ref_dtype).requires_grad_(True) if with_sinks else None
    reference = dense_reference if dense else reference_attention
    want = reference(*(t.transpose(1, 2) for t in ref_in), ref_sinks, doc_ids.to(ref_device), window, scale)
    want.backward(grad_out.to(ref_device, ref_dtype))
    # the kernels
    ours, grads = _kernel_inputs([t.to(device=device, dtype=dtype) for t in (q, k, v)], layout)
    our_sinks = sinks.to(device).requires_grad_(True) if with_sinks else None  # float32, as the checkpoint's
    starts, ends = ta.document_spans(doc_ids)
    kwargs = {"blocks": blocks} if blocks else {}
    got = ta.packed_sink_attention(*ours, our_sinks, starts, ends, window, scale, **kwargs)
    got.backward(grad_out.to(device=device, dtype=dtype))

    def rel(a, b):
        a, b = a.detach().double(), b.detach().to(a.device).double()
        return float((a - b).abs().max() / b.abs().max())

    grad_q, grad_k, grad_v = grads()
    errs = {"out": rel(got, want), "grad_q": rel(grad_q, ref_in[0].grad), "grad_k": rel(grad_k, ref_in[1].grad),
            "grad_v": rel(grad_v, ref_in[2].grad)}
    if with_sinks:
        errs["grad_sinks"] = rel(our_sinks.grad, ref_sinks.grad)
    padding = doc_ids.reshape(-1) < 0
    pad_out = float(got.detach().reshape(-1, q_heads * head_dim)[padding].abs().max()) if padding.any() else 0.0
    ok = got.dtype == dtype and pad_out == 0.0 and all(e <= tol for e in errs.values())
    return {"ok": ok, "padding_out": pad_out, **errs}


def _kernel_inputs(qkv: list, layout: str):
    """(q, k, v in `layout` from leaf tensors, a thunk giving the leaves' gradients in [B, T, H, D])."""
    if layout == "bthd":
        leaves = [t.requires_grad_(True) for t in qkv]
        return leaves, lambda: [t.grad for t in leaves]
    if layout == "bhtd":
        leaves = [t.transpose(1, 2).contiguous().requires_grad_(True) for t in qkv]
        return [t.transpose(1, 2) for t in leaves], lambda: [t.grad.transpose(1, 2) for t in leaves]
    if layout == "mixed":  # transformers' path: q, k rotated into new [B, H, T, D] tensors, v a projection view
        leaves = [t.requires_grad_(True) for t in qkv]
        q, k = (t.transpose(1, 2).contiguous().transpose(1, 2) for t in leaves[:2])
        return [q, k, leaves[2]], lambda: [t.grad for t in leaves]
    if layout == "fused":
        widths = [t.shape[2] for t in qkv]
        fused = torch.cat(qkv, dim=2).requires_grad_(True)
        return list(fused.split(widths, dim=2)), lambda: list(fused.grad.split(widths, dim=2))
    raise ValueError(layout)


SMALL_BLOCKS = ((16, 16, 4, 1), (16, 16, 4, 1))
UNEVEN_BLOCKS = ((16, 32, 4, 1), (32, 16, 4, 1))  # BLOCK_M != BLOCK_N both ways
# (rows of document lengths, seq_len, window, sinks, layout, blocks): documents crossing block edges, padding inside
# and at the end, a window shorter than a block and one longer, two batch rows. The last two make the block ranges
# tight (an off-by-one in them drops a needed block): a window = 2 mod the block size (the forward's / dQ's first
# key block, dK/dV's last query block) and a document ending at 33 = 2 x 16 + 1 (dK/dV's last query block)
INTERPRETER_CASES = [
    ([[20, 7, -3, 15]], 45, None, True, "bthd", SMALL_BLOCKS),
    ([[20, 7, -3, 15], [45]], 45, 5, True, "bhtd", SMALL_BLOCKS),
    ([[30, -2, 13], [9, 9, 9]], 45, 24, False, "fused", SMALL_BLOCKS),
    ([[45]], 45, None, False, "bthd", SMALL_BLOCKS),
    ([[12, 33]], 45, 7, True, "mixed", SMALL_BLOCKS),
    ([[33, 12], [45]], 45, 18, True, "bhtd", SMALL_BLOCKS),
    ([[33, -1, 11], [70]], 70, 2, True, "fused", UNEVEN_BLOCKS),
    # key blocks that cross into a long document, with query blocks wholly inside it after them (the unmasked
    # interior must stop at the end of the block's *first* document), with and without a window
    ([[10, 60], [5, 65]], 70, None, True, "bthd", SMALL_BLOCKS),
    ([[10, 60]], 70, 40, False, "bthd", UNEVEN_BLOCKS),
]


def test_document_spans():
    doc_ids = torch.tensor([_doc_ids(8, [3, -2, 2]), _doc_ids(8, [8])])
    starts, ends = ta.document_spans(doc_ids)
    assert starts.tolist() == [0, 0, 0, 4, 5, 5, 5, 8] + [8] * 8
    assert ends.tolist() == [3, 3, 3, 3, 4, 7, 7, 7] + [16] * 8
    assert starts.dtype == ends.dtype == torch.int32
    # batch rows are separate documents even where one row ends and the next begins with the same id
    starts, ends = ta.document_spans(torch.zeros(2, 4, dtype=torch.long))
    assert starts.tolist() == [0, 0, 0, 0, 4, 4, 4, 4] and ends.tolist() == [4, 4, 4, 4, 8, 8, 8, 8]


def _spans_mask(doc_ids, window):
    """The kernels' rule as a dense [B, T, T] mask: flat query i attends flat key j iff start[i] <= j <= i (and
    i - j < window)."""
    batch, seq_len = doc_ids.shape
    starts, ends = ta.document_spans(doc_ids)
    flat = torch.arange(batch * seq_len).view(batch, seq_len)
    i, j = flat[:, :, None], flat[:, None, :]
    allowed = (starts.long().view(batch, seq_len)[:, :, None] <= j) & (j <= i)
    if window is not None:
        allowed &= i - j < window
    # ends, as the dK/dV kernel reads them: every query of key j lies in [j, end[j])
    assert not (allowed & (i >= ends.long().view(batch, seq_len)[:, None, :])).any()
    return allowed


@pytest.mark.parametrize("window", [None, 3])
def test_document_spans_give_the_reference_mask_for_contiguous_documents(window):
    """The kernels' documents are runs of equal ids (attention.py's module docstring): the reference's mask for
    every layout the packers make (ids 0, 1, 2, ... in order, padding inside or at the end), not for an id that
    comes back after another (there two documents, one for the reference)."""
    from rustforge.model.attention import allowed_pairs

    g = torch.Generator().manual_seed(0)
    for _ in range(20):
        rows = [[int(n) * (1 if torch.rand(1, generator=g) < 0.8 else -1)
                 for n in torch.randint(1, 9, (5,), generator=g)] for _ in range(3)]
        doc_ids = torch.tensor([_doc_ids(24, lengths) for lengths in rows])
        assert torch.equal(_spans_mask(doc_ids, window), allowed_pairs(doc_ids, window)), rows
    returning = torch.tensor([[0, 0, 1, 0]])
    assert not torch.equal(_spans_mask(returning, window), allowed_pairs(returning, window))


def test_rejects_inputs_the_kernels_would_misread():
    spans = ta.document_spans(torch.zeros(1, 4, dtype=torch.long))
    q, kv = torch.zeros(1, 4, 4, 16), torch.zeros(1, 4, 2, 16)
    with pytest.raises(ValueError, match=r"starts and ends must be \[B \* T\] = \[8\]"):
        ta.packed_sink_attention(torch.zeros(2, 4, 4, 16), torch.zeros(2, 4, 2, 16), torch.zeros(2, 4, 2, 16), None,
                                 *spans, None)
    with pytest.raises(ValueError, match="share a dtype"):
        ta.packed_sink_attention(q, kv, kv.double(), None, *spans, None)
    with pytest.raises(ValueError, match=r"k, v \[B, T, Hkv, D\]"):
        ta.packed_sink_attention(q, kv, kv[:, :3], None, *spans, None)
    with pytest.raises(ValueError, match=r"sinks must be \[Hq\] = \[4\]"):
        ta.packed_sink_attention(q, kv, kv, torch.zeros(2), *spans, None)


def test_dense_reference_is_the_loop_reference():
    g = torch.Generator().manual_seed(3)
    doc_ids = torch.tensor([_doc_ids(12, [5, -2, 4])])
    q, k, v = (torch.randn(1, heads, 12, 8, generator=g, dtype=torch.float64) for heads in (4, 2, 2))
    sinks = torch.randn(4, generator=g, dtype=torch.float64)
    for window in (None, 3):
        torch.testing.assert_close(dense_reference(q, k, v, sinks, doc_ids, window, 0.3),
                                   reference_attention(q, k, v, sinks, doc_ids, window, 0.3))


def test_rejects_odd_head_dim_and_a_cpu_without_the_interpreter():
    spans = ta.document_spans(torch.zeros(1, 4, dtype=torch.long))
    x = torch.zeros(1, 4, 2, 24)
    with pytest.raises(ValueError, match="head dim"):
        ta.packed_sink_attention(x, x, x, None, *spans, None)
    if not ta.triton_attention_available(x[..., :16]):
        with pytest.raises(RuntimeError, match="model.attention: eager"):
            ta.packed_sink_attention(x[..., :16], x[..., :16], x[..., :16], None, *spans, None)


def test_the_model_option_refuses_a_cpu():
    from rustforge.config import ModelConfig
    from rustforge.model.gptoss import resolve_attention

    with pytest.raises(ValueError, match="model.attention: triton needs a CUDA GPU"):
        resolve_attention(ModelConfig(attention="triton"), torch.device("cpu"))


@needs_triton
def test_kernels_under_the_triton_interpreter():
    run_under_interpreter(__file__)


@pytest.mark.gpu
@gpu
@pytest.mark.parametrize("window", [None, 128])
@pytest.mark.parametrize("rows", [[[1024, 1024, 1024, 1024]], [[700, -20, 1500, 1000, 300, -500, 1076]]])
def test_gpu_bf16_20b_heads(rows, window):
    result = check_attention(rows, 4096 if len(rows[0]) == 4 else 5096, 64, 8, 64, window, True, torch.bfloat16,
                             "cuda", tol=2e-2, dense=True)
    assert result["ok"], result


@pytest.mark.gpu
@gpu
def test_gpu_small_shapes_without_sinks():
    result = check_attention([[50, -3, 80], [133]], 133, 8, 2, 32, 40, False, torch.bfloat16, "cuda", tol=2e-2,
                             layout="fused")
    assert result["ok"], result


def _with_unmasked_interior(on: bool, check):
    """check() with triton_attention.UNMASKED_INTERIOR set (the loops split into masked and mask-free blocks)."""
    saved, ta.UNMASKED_INTERIOR = ta.UNMASKED_INTERIOR, on
    try:
        return check()
    finally:
        ta.UNMASKED_INTERIOR = saved


if __name__ == "__main__":  # the interpreter run (TRITON_INTERPRET=1 set by the caller)
    cases = [(f"case{i}{'-unmasked-interior' if on else ''}",
              lambda c=c, i=i, on=on: _with_unmasked_interior(on, lambda: check_attention(
                  c[0], c[1], 4, 2, 16, c[2], c[3], torch.float32, "cpu", tol=1e-4, blocks=c[5], seed=i, layout=c[4])))
             for on in (False, True) for i, c in enumerate(INTERPRETER_CASES)]
    sys.exit(run_interpreter_cases(cases))
