"""A training step -- forward, backward, optimizer step -- captured once as a CUDA graph and replayed.

Why: at 4K tokens on the H100 the GPU work of a GPT-OSS-20B LoRA step is ~171 ms, but the host needs 155-290
ms to issue its few thousand kernels one by one (bench/RESULTS.md, session 5), so the GPU waits on Python.
A replayed graph issues all of them in one call. torch does the capture (`torch.cuda.graph`); this module is
the plumbing a training step needs for it:

- what needs the host is done before capture: the batch's attention masks (flex BlockMasks) and the loss's
  valid rows (`loss.valid_rows`, a nonzero), passed to RustforgeModel.forward precomputed;
- warm-up steps on a side stream first (torch's rule), which also compile flex attention and autotune the
  Triton kernels -- nothing may compile or autotune during capture;
- autocast without its weight-cast cache (a cache entry made during capture would be freed after it);
- the optimizer must be capturable (`torch.optim.AdamW(..., fused=True, capturable=True)`); gradients are set to
  None before capture so the backward allocates them in the graph's pool and each replay overwrites them.

One graph serves one batch layout: the same shapes, documents (doc_ids) and ignored labels as the captured
batch. `replay(batch)` copies the new token ids, positions and labels into the captured inputs after checking
the layout (two comparisons on the GPU: the host waits for the previous step there); `replay()` reruns the
captured batch as it is (benchmarks).
"""

from __future__ import annotations

import contextlib

import torch

from rustforge.model.loss import valid_rows

LAYOUT_KEYS = ("doc_ids",)
COPIED_KEYS = ("input_ids", "position_ids", "labels")


class GraphedTrainStep:
    """`step = GraphedTrainStep(model, optimizer, batch)`; then `loss = step.replay()` per step (a tensor)."""

    def __init__(self, model, optimizer, batch: dict, *, warmup_steps: int = 2, autocast_dtype=torch.bfloat16):
        if not torch.cuda.is_available() or batch["input_ids"].device.type != "cuda":
            raise ValueError("GraphedTrainStep: CUDA graphs need the model and the batch on a CUDA device")
        if not all(group.get("capturable", False) for group in optimizer.param_groups):
            raise ValueError("GraphedTrainStep: the optimizer must be created with capturable=True")
        self.model, self.optimizer, self.autocast_dtype = model, optimizer, autocast_dtype
        self.inputs = {k: batch[k].clone() for k in (*COPIED_KEYS, *LAYOUT_KEYS)}  # the graph reads these
        self.ignored = batch["labels"] < 0
        # host work done now, never again: the masks and the loss rows of this layout
        self.inputs["masks"] = model.attention_masks(self.inputs["doc_ids"])  # its mask_mod reads this tensor
        self.inputs["rows"] = valid_rows(batch["labels"].flatten(), model.hf.lm_head.weight.shape[0])
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
        """One training step on `batch` (same layout as the captured one) or on the captured batch again."""
        if batch is not None:
            self._copy_in(batch)
        self.graph.replay()
        return self.loss

    def _copy_in(self, batch: dict) -> None:
        for key in (*COPIED_KEYS, *LAYOUT_KEYS):
            if batch[key].shape != self.inputs[key].shape:
                raise ValueError(f"GraphedTrainStep: batch[{key!r}] has shape {tuple(batch[key].shape)}, "
                                 f"the captured one {tuple(self.inputs[key].shape)}")
        if not torch.equal(batch["doc_ids"], self.inputs["doc_ids"]) or not torch.equal(batch["labels"] < 0,
                                                                                        self.ignored):
            raise ValueError("GraphedTrainStep: the batch's documents or ignored labels differ from the captured "
                             "batch's; capture a graph for this layout")
        for key in COPIED_KEYS:
            self.inputs[key].copy_(batch[key])
