"""A training step -- forward, backward, optimizer step -- captured once as a CUDA graph and replayed.

Why: at 4K tokens on the H100 the GPU work of a GPT-OSS-20B LoRA step is ~172 ms, but the host needs 140-290
ms to issue its few thousand kernels one by one (bench/RESULTS.md, session 5), so the GPU waits on Python.
A replayed graph issues all of them in one call: 4.96x transformers + PEFT at 4K against 4.5x eager (run 12,
measured with this module's first form, which took one batch layout and the loss's valid rows; replay(batch)
on new layouts is tested on a GPU by tests/test_graphed_step.py, not yet run).
torch does the capture (`torch.cuda.graph`); this module is the plumbing a training step needs for it:

- nothing in the step may wait for the host: the loss takes every token as a row (ignored ones weighted 0,
  so no `nonzero` over the labels) and the attention masks are built outside the graph;
- warm-up steps on a side stream first (torch's rule), which also compile flex attention and autotune the
  Triton kernels -- nothing may compile or autotune during capture;
- autocast without its weight-cast cache (a cache entry made during capture would be freed after it);
- the optimizer must be capturable (`torch.optim.AdamW(..., fused=True, capturable=True)`); gradients are set to
  None before capture so the backward allocates them in the graph's pool and each replay overwrites them.

`replay(batch)` runs one step on any batch of the captured shape: it copies the token ids, positions, labels
and document ids into the captured inputs, builds the batch's attention masks (as an eager step would) and
copies their tensors into the captured masks, whose kernels read them by address. `replay()` reruns the
inputs as they are (benchmarks). Labels must lie in [0, vocab) or be -100: the eager path's range check
needs the host, so the graph does not make it.
"""

from __future__ import annotations

import contextlib

import torch

INPUT_KEYS = ("input_ids", "position_ids", "labels", "doc_ids")


class GraphedTrainStep:
    """`step = GraphedTrainStep(model, optimizer, batch)`; then `loss = step.replay(batch)` per step (a tensor)."""

    def __init__(self, model, optimizer, batch: dict, *, warmup_steps: int = 2, autocast_dtype=torch.bfloat16):
        if not torch.cuda.is_available() or batch["input_ids"].device.type != "cuda":
            raise ValueError("GraphedTrainStep: CUDA graphs need the model and the batch on a CUDA device")
        if not all(group.get("capturable", False) for group in optimizer.param_groups):
            raise ValueError("GraphedTrainStep: the optimizer must be created with capturable=True")
        self.model, self.optimizer, self.autocast_dtype = model, optimizer, autocast_dtype
        self.inputs = {k: batch[k].clone() for k in INPUT_KEYS}  # the graph reads these tensors
        self.inputs["masks"] = model.attention_masks(self.inputs["doc_ids"])  # its mask_mod reads that tensor
        self.inputs["rows"] = torch.arange(batch["labels"].numel(), device=batch["labels"].device)
        self._warm_up(warmup_steps)
        self.graph = torch.cuda.CUDAGraph()
        optimizer.zero_grad(set_to_none=True)
        with torch.cuda.graph(self.graph):
            self.loss = self._step()

    def _autocast(self):
        if self.autocast_dtype is None:
            return contextlib.nullcontext()
        return torch.autocast("cuda", dtype=self.autocast_dtype, cache_enabled=False)

    def _step(self) -> torch.Tensor:
        with self._autocast():
            out = self.model(**self.inputs)
        out.loss.backward()
        self.optimizer.step()
        return out.loss.detach()

    def _warm_up(self, steps: int) -> None:
        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):
            for _ in range(steps):
                self.optimizer.zero_grad(set_to_none=True)
                self._step()
        torch.cuda.current_stream().wait_stream(side)
        torch.cuda.synchronize()
        torch.cuda.empty_cache()  # the eager steps' cached blocks go back for the graph's private pool

    def replay(self, batch: dict | None = None) -> torch.Tensor:
        """One training step on `batch` (the captured shape, any documents and labels), or on the inputs as
        they are. Returns the step's loss, a tensor the next replay overwrites."""
        if batch is not None:
            self._copy_in(batch)
        self.graph.replay()
        return self.loss

    def _copy_in(self, batch: dict) -> None:
        for key in INPUT_KEYS:
            if batch[key].shape != self.inputs[key].shape:
                raise ValueError(f"GraphedTrainStep: batch[{key!r}] has shape {tuple(batch[key].shape)}, the "
                                 f"captured one {tuple(self.inputs[key].shape)}: capture a step for that shape")
            self.inputs[key].copy_(batch[key])
        fresh = self.model.attention_masks(self.inputs["doc_ids"])
        for layer_type, captured in self.inputs["masks"].items():
            _copy_mask(captured, fresh[layer_type], layer_type)


def _copy_mask(captured, fresh, name: str) -> None:
    """Copies a batch's mask (a flex BlockMask or a dense tensor) into the captured one of the same shapes."""
    if isinstance(captured, torch.Tensor):
        captured.copy_(fresh)
        return
    old, new = captured.as_tuple(), fresh.as_tuple()
    for a, b in zip(old, new, strict=True):
        if isinstance(a, torch.Tensor) != isinstance(b, torch.Tensor) or (
            isinstance(a, torch.Tensor) and a.shape != b.shape
        ):
            raise ValueError(f"GraphedTrainStep: the {name} mask's block layout changed shape; capture anew")
        if isinstance(a, torch.Tensor):
            a.copy_(b)
