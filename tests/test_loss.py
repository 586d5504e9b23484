"""Chunked cross-entropy / token log-probs against full-logit torch references, and their memory bound.

The softmax kernels of model/triton_loss.py (the GPU path) against the torch path run on a CPU under
TRITON_INTERPRET=1 in a subprocess (`python tests/test_loss.py`) and natively in the GPU test below.
"""

from __future__ import annotations

import sys

import pytest
import torch
import torch.nn.functional as F
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_leaves
from triton_interpreter import needs_triton, run_under_interpreter

from rustforge.model import loss as loss_module
from rustforge.model.loss import (
    IGNORE_INDEX,
    chunked_cross_entropy,
    chunked_token_logprobs,
)

N, H, V = 37, 16, 50


def make_inputs(dtype, n=N, seed=0, ignore=()):
    gen = torch.Generator().manual_seed(seed)
    hidden = torch.randn(n, H, generator=gen, dtype=torch.float64).to(dtype).requires_grad_()
    weight = (torch.randn(V, H, generator=gen, dtype=torch.float64) / H**0.5).to(dtype).requires_grad_()
    labels = torch.randint(0, V, (n,), generator=gen)
    labels[list(ignore)] = IGNORE_INDEX
    return hidden, weight, labels


def full_logits(hidden, weight, temperature=1.0):
    return (hidden @ weight.T).float() / temperature if hidden.dtype != torch.float64 else hidden @ weight.T / temperature


# 8 ignored tokens in a row: with chunk 3 (and, before compaction, chunk 4 or 8) whole chunks have no target.
IGNORED = [0, 5, *range(10, 18), 36]


@pytest.mark.parametrize("chunk_size", [1, 3, 8, 64])
def test_cross_entropy_matches_full_logits_float64(chunk_size):
    hidden, weight, labels = make_inputs(torch.float64, ignore=IGNORED)
    loss, n_valid = chunked_cross_entropy(hidden, weight, labels, chunk_size)
    ref = F.cross_entropy(full_logits(hidden, weight), labels, ignore_index=IGNORE_INDEX, reduction="sum")
    assert n_valid.item() == N - len(IGNORED) and n_valid.dtype == torch.int64
    torch.testing.assert_close(loss, ref, rtol=1e-12, atol=1e-12)
    grads = torch.autograd.grad(loss, (hidden, weight))
    ref_grads = torch.autograd.grad(ref, (hidden, weight))
    for got, want in zip(grads, ref_grads):
        torch.testing.assert_close(got, want, rtol=1e-10, atol=1e-12)
    assert grads[0][IGNORED].abs().max() == 0  # ignored tokens get exactly zero gradient


@pytest.mark.parametrize("chunk_size", [3, 64])
def test_every_row_given_equals_the_valid_rows(chunk_size):
    """rows = every token (a CUDA graph's fixed shapes), ignored ones included: the same loss and gradients,
    exactly zero gradient for the ignored tokens."""
    hidden, weight, labels = make_inputs(torch.float64, ignore=IGNORED)
    loss, n_valid = chunked_cross_entropy(hidden, weight, labels, chunk_size)
    every, n_every = chunked_cross_entropy(hidden, weight, labels, chunk_size, rows=torch.arange(N))
    assert n_every.item() == n_valid.item() == N - len(IGNORED)
    torch.testing.assert_close(every, loss, rtol=1e-12, atol=1e-12)
    grads, every_grads = torch.autograd.grad(loss, (hidden, weight)), torch.autograd.grad(every, (hidden, weight))
    for got, want in zip(every_grads, grads):
        torch.testing.assert_close(got, want, rtol=1e-10, atol=1e-12)
    assert every_grads[0][IGNORED].abs().max() == 0


def test_cross_entropy_bf16_close_to_full_logits():
    hidden, weight, labels = make_inputs(torch.bfloat16, n=70, ignore=IGNORED)
    loss, _ = chunked_cross_entropy(hidden, weight, labels, 16)
    assert loss.dtype == torch.float32
    ref = F.cross_entropy(full_logits(hidden, weight), labels, ignore_index=IGNORE_INDEX, reduction="sum")
    torch.testing.assert_close(loss, ref, rtol=1e-3, atol=1e-3)
    grads = torch.autograd.grad(loss, (hidden, weight))
    ref_grads = torch.autograd.grad(ref, (hidden, weight))
    for got, want in zip(grads, ref_grads):
        assert got.dtype == torch.bfloat16
        torch.testing.assert_close(got.float(), want.float(), rtol=2e-2, atol=2e-2)


@pytest.mark.parametrize("temperature", [1.0, 0.7, 1.6])
def test_token_logprobs_match_log_softmax_gather(temperature):
    hidden, weight, targets = make_inputs(torch.float64, seed=1, ignore=[3, 4])
    logprobs = chunked_token_logprobs(hidden, weight, targets, 5, temperature=temperature)
    safe_targets = targets.clamp(min=0)
    ref = F.log_softmax(full_logits(hidden, weight, temperature), dim=-1).gather(1, safe_targets[:, None]).squeeze(1)
    ref = torch.where(targets == IGNORE_INDEX, torch.zeros_like(ref), ref)
    torch.testing.assert_close(logprobs, ref, rtol=1e-12, atol=1e-12)
    assert logprobs[[3, 4]].abs().max() == 0
    upstream = torch.randn(N, generator=torch.Generator().manual_seed(2))  # a per-token weighting, as in GRPO
    grads = torch.autograd.grad(logprobs, (hidden, weight), grad_outputs=upstream)
    ref_grads = torch.autograd.grad(ref, (hidden, weight), grad_outputs=upstream.double())
    for got, want in zip(grads, ref_grads):
        torch.testing.assert_close(got, want, rtol=1e-10, atol=1e-12)


def test_frozen_weight_gets_no_gradient_and_hidden_still_does():
    hidden, weight, labels = make_inputs(torch.float32)
    weight = weight.detach()
    loss, _ = chunked_cross_entropy(hidden, weight, labels, 7)
    loss.backward()
    assert weight.grad is None
    ref_hidden = hidden.detach().clone().requires_grad_()
    F.cross_entropy(full_logits(ref_hidden, weight), labels, reduction="sum").backward()
    torch.testing.assert_close(hidden.grad, ref_hidden.grad, rtol=1e-5, atol=1e-5)


def test_all_tokens_ignored_gives_zero_loss_and_zero_grad():
    hidden, weight, labels = make_inputs(torch.float32, ignore=range(N))
    loss, n_valid = chunked_cross_entropy(hidden, weight, labels, 4)
    loss.backward()
    assert loss.item() == 0 and n_valid.item() == 0
    assert hidden.grad.abs().max() == 0 and weight.grad.abs().max() == 0


def test_bad_inputs_raise_clear_errors():
    hidden, weight, labels = make_inputs(torch.float32)
    labels[2] = V
    with pytest.raises(ValueError, match=r"targets must be in \[0, 50\)"):
        chunked_cross_entropy(hidden, weight, labels, 4)
    with pytest.raises(ValueError, match="chunk_size"):
        chunked_cross_entropy(hidden, weight, labels.clamp(max=V - 1), 0)
    with pytest.raises(ValueError, match="hidden \\[N, H\\]"):
        chunked_cross_entropy(hidden[:, :-1], weight, labels, 4)
    with pytest.raises(ValueError, match="reduction"):
        chunked_cross_entropy(hidden, weight, labels, 4, reduction="mean")
    with pytest.raises(ValueError, match="temperature"):
        chunked_token_logprobs(hidden, weight, labels, 4, temperature=0.0)


class LargestTensorRecorder(TorchDispatchMode):
    """Records the element count of every tensor any op produces while active."""

    def __init__(self):
        super().__init__()
        self.largest = 0
        self.ops = set()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        self.ops.add(func.__name__.split(".")[0])
        sizes = [t.numel() for t in tree_leaves(out) if isinstance(t, torch.Tensor)]
        self.largest = max([self.largest, *sizes])
        return out


def test_never_allocates_or_saves_a_tokens_by_vocab_tensor():
    tokens, vocab, width, chunk = 512, 256, 8, 16  # tokens*vocab = 131072 >> chunk*vocab = 4096
    gen = torch.Generator().manual_seed(3)
    hidden = torch.randn(tokens, width, generator=gen, requires_grad=True)
    weight = torch.randn(vocab, width, generator=gen, requires_grad=True)
    labels = torch.randint(0, vocab, (tokens,), generator=gen)
    saved_sizes = []

    def pack(tensor):
        saved_sizes.append(tensor.numel())
        return tensor

    recorder = LargestTensorRecorder()
    with recorder, torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        loss, _ = chunked_cross_entropy(hidden, weight, labels, chunk)
        loss.backward()
    assert "index_add_" in recorder.ops  # the backward ran under the recorder too
    assert recorder.largest <= chunk * vocab
    assert saved_sizes and max(saved_sizes) <= max(tokens * width, vocab * width)

    # The recorder does see a full-logits loss, so the bound above is a real check.
    full = LargestTensorRecorder()
    with full:
        F.cross_entropy(hidden @ weight.T, labels, reduction="sum").backward()
    assert full.largest >= tokens * vocab


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_cuda_bf16_matches_full_logits_within_chunk_sized_memory():
    tokens, width, vocab, chunk = 4096, 256, 32768, 256
    gen = torch.Generator().manual_seed(4)
    hidden = torch.randn(tokens, width, generator=gen).cuda().bfloat16().requires_grad_()
    weight = (torch.randn(vocab, width, generator=gen) / width**0.5).cuda().bfloat16().requires_grad_()
    labels = torch.randint(0, vocab, (tokens,), generator=gen).cuda()
    labels[: tokens // 4] = IGNORE_INDEX
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    before = torch.cuda.memory_allocated()
    loss, n_valid = chunked_cross_entropy(hidden, weight, labels, chunk)
    grads = torch.autograd.grad(loss, (hidden, weight))
    peak = torch.cuda.max_memory_allocated() - before
    # fp32 and bf16 copies of one chunk's logits, plus the fp32 grad_weight accumulator and the grads
    budget = chunk * vocab * (4 + 4 + 2) + vocab * width * (4 + 2 + 2) + tokens * width * 2 * 3 + (1 << 20)
    assert peak <= budget < tokens * vocab * 4, (peak, budget)

    ref = F.cross_entropy((hidden @ weight.T).float(), labels, ignore_index=IGNORE_INDEX, reduction="sum")
    ref_grads = torch.autograd.grad(ref, (hidden, weight))
    assert n_valid.item() == tokens - tokens // 4
    torch.testing.assert_close(loss, ref, rtol=1e-4, atol=1e-2)
    for got, want in zip(grads, ref_grads):  # bf16 grads summed in another order: ~1 ulp (1/128 at |g| < 2)
        torch.testing.assert_close(got.float(), want.float(), rtol=2e-2, atol=1e-2)


# ------------------------------------------------------------------ the softmax kernels (GPU path)
def check_fused_softmax(dtype, device, vocab: int, tol: float, temperature: float = 0.7) -> dict:
    """Log-probs and both gradients with the kernels == the torch path, on the same inputs."""
    hidden, weight, labels = make_inputs(dtype, ignore=IGNORED)
    # a vocabulary past one kernel block (4096) with a partial last block
    weight = (torch.randn(vocab, H, generator=torch.Generator().manual_seed(9)) / H**0.5).to(dtype)
    hidden, weight, labels = hidden.detach().to(device), weight.to(device), labels.to(device)
    grad_out = torch.randn(N, generator=torch.Generator().manual_seed(3)).to(device)
    results, saved = {}, {}
    every_row = torch.arange(N, device=device)
    for variant, fused, keep, rows in (("torch", False, 0, None), ("kernels", True, 0, None),
                                       ("kept logits", True, 1 << 40, None), ("every row", True, 1 << 40, every_row)):
        loss_module.FUSED_SOFTMAX = fused
        h, w = hidden.clone().requires_grad_(), weight.clone().requires_grad_()
        out = chunked_token_logprobs(h, w, labels, chunk_size=16, temperature=temperature, keep_logits_bytes=keep,
                                     rows=rows)
        saved[variant] = len(out.grad_fn.saved_tensors)  # 6, plus one per kept logits chunk
        results[variant] = (out.detach(), *torch.autograd.grad(out, (h, w), grad_out))
    loss_module.FUSED_SOFTMAX = True
    errs = {f"{variant} {name}": float((a.double() - b.double()).abs().max() / b.double().abs().max())
            for variant in ("kernels", "kept logits", "every row")
            for name, a, b in zip(("logprobs", "grad_hidden", "grad_weight"), results[variant], results["torch"])}
    # the kernels path rounds differently from the torch path (so a zero error means it did not run), and only
    # the kept variant saved logits
    took_paths = errs["kernels logprobs"] > 0 and saved["kernels"] == 6 < saved["kept logits"]
    return {"ok": took_paths and all(e <= tol for e in errs.values()), **errs}


@needs_triton
def test_softmax_kernels_under_the_triton_interpreter():
    run_under_interpreter(__file__)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
@pytest.mark.parametrize("dtype,tol", [(torch.float32, 1e-5), (torch.bfloat16, 2e-2)])
def test_cuda_softmax_kernels_match_the_torch_path(dtype, tol):
    result = check_fused_softmax(dtype, "cuda", vocab=201088, tol=tol)
    assert result["ok"], result


def check_autocast_forward(device: str) -> dict:
    """float32 inputs, forward under bf16 autocast (bf16 logits kept), backward outside it: kernels == torch path."""
    hidden, weight, labels = make_inputs(torch.float32, ignore=IGNORED)
    results = {}
    for variant, fused, keep in (("torch", False, 0), ("kept logits", True, 1 << 40)):
        loss_module.FUSED_SOFTMAX = fused
        h, w = hidden.detach().clone().to(device).requires_grad_(), weight.detach().clone().to(device).requires_grad_()
        with torch.autocast(torch.device(device).type, dtype=torch.bfloat16):
            out = chunked_token_logprobs(h, w, labels.to(device), chunk_size=16, keep_logits_bytes=keep)
        results[variant] = (out.detach(), *torch.autograd.grad(out.sum(), (h, w)))
    loss_module.FUSED_SOFTMAX = True
    errs = {name: float((a.double() - b.double()).abs().max() / b.double().abs().max())
            for name, a, b in zip(("logprobs", "grad_hidden", "grad_weight"), results["kept logits"], results["torch"])}
    # bf16 logits both ways in forward; the torch path's backward recomputes them in float32: bf16-level differences
    return {"ok": all(e <= 3e-2 for e in errs.values()) and results["kept logits"][1].dtype == torch.float32, **errs}


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_cuda_autocast_forward_with_kept_logits():
    result = check_autocast_forward("cuda")
    assert result["ok"], result


if __name__ == "__main__":  # the interpreter run (TRITON_INTERPRET=1 set by the caller)
    results = [check_fused_softmax(torch.float32, "cpu", vocab=5000, tol=1e-5), check_autocast_forward("cpu")]
    print(results)
    sys.exit(0 if all(r["ok"] for r in results) else 1)
