"""A training step -- forward, backward, clipping, optimizer step -- captured once as a CUDA graph and replayed.

Why: at 4K tokens on the H100 the GPU work of a GPT-OSS-20B LoRA step is ~172 ms, but the host needs 140-290
ms to issue its few thousand kernels one by one (bench/RESULTS.md, session 5), so the GPU waits on Python.
A replayed graph issues all of them in one call: 4.96x transformers + PEFT at 4K against 4.5x eager (run 12).
torch does the capture (`torch.cuda.graph`); this module is the plumbing a training step needs for it, used by
bench/train_step.py (`--cuda-graph`) and by the SFT loop (TrainConfig.cuda_graph, e.g. `lang_rust.cuda_graph: true`; train/sft.py):

- nothing in the step may wait for the host: the loss takes every token as a row (ignored ones weighted 0,
  so no `nonzero` over the labels), the label count that normalises it is summed on the GPU, the attention
  masks are built outside the graph, and gradient clipping uses torch's sync-free foreach norm;
- the step's micro-batches (gradient accumulation) are all inside the one graph;
- warm-up steps on a side stream first (torch's rule), which also compile flex attention and autotune the
  Triton kernels -- nothing may compile or autotune during capture. The warm-up steps are real optimizer
  steps, so the trainable weights, the optimizer state and the RNG state are put back afterwards: training is
  the same as without the graph;
- autocast without its weight-cast cache (a cache entry made during capture would be freed after it);
- the optimizer must be capturable (`torch.optim.AdamW(..., fused=True, capturable=True)`), with the learning
  rate as a GPU tensor where it changes between steps (filled before each replay); gradients are set to None
  before capture so the backward allocates them in the graph's pool and each replay overwrites them.

`replay(batches)` runs one step on micro-batches of the captured shape: it copies the token ids, positions,
labels and document ids into the captured inputs, builds the batches' attention masks (as an eager step would)
and copies their tensors into the captured masks, whose kernels read them by address. `replay()` reruns the
inputs as they are (benchmarks). Labels must lie in [0, vocab) or be -100: the eager path's range check
needs the host, so the graph does not make it.
"""

from __future__ import annotations

import contextlib

import torch

INPUT_KEYS = ("input_ids", "position_ids", "labels", "doc_ids")


class GraphedTrainStep:
    """`step = GraphedTrainStep(model, optimizer, batches)`; then `loss = step.replay(batches)` per step.

    batches: one batch or the step's list of micro-batches (gradient accumulation), each a dict of [B, T]
    tensors on the GPU. The loss is the eager SFT loop's (train/sft.py): the cross-entropy summed over every
    micro-batch divided by the step's label tokens, plus router_aux_loss_coef x the mean aux loss. After a
    replay `ce_sum`, `aux_loss`, `n_tokens`, `grad_norm` (before clipping; None without max_grad_norm) and,
    with keep_router_logits, `router_logits` (per micro-batch {layer: [N, E]}) hold that step's values until
    the next replay overwrites them."""

    def __init__(self, model, optimizer, batches: dict | list[dict], *, max_grad_norm: float | None = None,
                 keep_router_logits: bool = False, warmup_steps: int = 2, autocast_dtype=torch.bfloat16):
        batches = [batches] if isinstance(batches, dict) else list(batches)
        if not torch.cuda.is_available() or any(b["input_ids"].device.type != "cuda" for b in batches):
            raise ValueError("GraphedTrainStep: CUDA graphs need the model and the batch on a CUDA device")
        if not all(group.get("capturable", False) for group in optimizer.param_groups):
            raise ValueError("GraphedTrainStep: the optimizer must be created with capturable=True")
        self.model, self.optimizer, self.autocast_dtype = model, optimizer, autocast_dtype
        self.max_grad_norm, self.keep_router_logits = max_grad_norm, keep_router_logits
        self.params = [p for group in optimizer.param_groups for p in group["params"]]
        self.inputs = [self._captured_inputs(b) for b in batches]  # the graph reads these tensors
        saved = _training_state(self.params, optimizer)
        rng = torch.random.get_rng_state(), torch.cuda.get_rng_state()
        self._warm_up(warmup_steps)
        _restore_training_state(self.params, optimizer, saved)
        torch.random.set_rng_state(rng[0])  # LoRA dropout draws as if the warm-up had not run
        torch.cuda.set_rng_state(rng[1])
        self.graph = torch.cuda.CUDAGraph()
        optimizer.zero_grad(set_to_none=True)
        with torch.cuda.graph(self.graph):
            self.loss, self.ce_sum, self.aux_loss, self.n_tokens, self.grad_norm, self.router_logits = self._step()

    def _captured_inputs(self, batch: dict) -> dict:
        inputs = {k: batch[k].clone() for k in INPUT_KEYS}
        inputs["masks"] = self.model.attention_masks(inputs["doc_ids"])  # its mask_mod reads that tensor
        inputs["rows"] = torch.arange(batch["labels"].numel(), device=batch["labels"].device)
        return inputs

    def _autocast(self):
        if self.autocast_dtype is None:
            return contextlib.nullcontext()
        return torch.autocast("cuda", dtype=self.autocast_dtype, cache_enabled=False)

    def _step(self):
        pieces, coef = len(self.inputs), self.model.config.router_aux_loss_coef
        n_tokens = torch.stack([(inp["labels"] != -100).sum() for inp in self.inputs]).sum()
        scale = 1.0 / n_tokens.clamp(min=1)
        ce_sum, aux_loss, kept = 0.0, 0.0, []
        for inputs in self.inputs:
            with self._autocast():
                out = self.model(**inputs)
            if self.keep_router_logits:  # a copy: the next micro-batch reuses the forward's memory
                kept.append({layer: t.detach().clone() for layer, t in self.model.router_logits.items()})
            (out.ce_sum * scale + coef * out.aux_loss / pieces).backward()
            ce_sum = ce_sum + out.ce_sum.detach()
            aux_loss = aux_loss + out.aux_loss.detach() / pieces
        grad_norm = None
        if self.max_grad_norm is not None:
            grad_norm = torch.nn.utils.clip_grad_norm_(self.params, self.max_grad_norm)
        self.optimizer.step()
        return ce_sum * scale + coef * aux_loss, ce_sum, aux_loss, n_tokens, grad_norm, kept

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

    def replay(self, batches: dict | list[dict] | None = None) -> torch.Tensor:
        """One training step on `batches` (the captured shapes, any documents and labels), or on the inputs
        as they are. Returns the step's loss, a tensor the next replay overwrites."""
        if batches is not None:
            batches = [batches] if isinstance(batches, dict) else list(batches)
            if len(batches) != len(self.inputs):
                raise ValueError(f"GraphedTrainStep: {len(batches)} micro-batches, the captured step has "
                                 f"{len(self.inputs)}: capture a step for that count")
            for captured, batch in zip(self.inputs, batches):
                self._copy_in(captured, batch)
        self.graph.replay()
        return self.loss

    def _copy_in(self, captured: dict, batch: dict) -> None:
        for key in INPUT_KEYS:
            if batch[key].shape != captured[key].shape:
                raise ValueError(f"GraphedTrainStep: batch[{key!r}] has shape {tuple(batch[key].shape)}, the "
                                 f"captured one {tuple(captured[key].shape)}: capture a step for that shape")
            captured[key].copy_(batch[key], non_blocking=True)
        fresh = self.model.attention_masks(captured["doc_ids"])
        for layer_type, mask in captured["masks"].items():
            _copy_mask(mask, fresh[layer_type], layer_type)


def make_capturable(optimizer, device: torch.device) -> None:
    """An AdamW made ready for capture on `device`: capturable (fused on a GPU), the learning rate a tensor there,
    the step counts float32 tensors beside their parameters. For an optimizer whose state_dict came from a run
    without a graph (load_state_dict restores the groups as saved -- capturable False, lr a float -- and a CPU
    run's step counts stay on the CPU)."""
    for group in optimizer.param_groups:
        group["capturable"], group["fused"], group["foreach"] = True, device.type == "cuda", False
        if not (torch.is_tensor(group["lr"]) and group["lr"].device.type == device.type):
            group["lr"] = torch.tensor(float(group["lr"]), device=device)
        for p in group["params"]:
            state = optimizer.state.get(p, {})
            if torch.is_tensor(state.get("step")) and (state["step"].device != p.device or state["step"].dtype != torch.float32):
                state["step"] = state["step"].to(device=p.device, dtype=torch.float32)


def _training_state(params: list[torch.Tensor], optimizer) -> tuple[list[torch.Tensor], list[dict]]:
    """Copies of the trainable weights and their optimizer state (empty where the optimizer has none yet)."""
    with torch.no_grad():
        weights = [p.detach().clone() for p in params]
        state = [{k: v.clone() for k, v in optimizer.state.get(p, {}).items() if torch.is_tensor(v)} for p in params]
    return weights, state


def _restore_training_state(params: list[torch.Tensor], optimizer, saved) -> None:
    """Puts back what _training_state copied, in place (the graph will read these tensors by address); state the
    warm-up created is zeroed, which is AdamW's fresh state (step 0, zero moments)."""
    weights, state = saved
    with torch.no_grad():
        for p, w, before in zip(params, weights, state):
            p.copy_(w)
            for key, value in optimizer.state.get(p, {}).items():
                if torch.is_tensor(value) and key in before:
                    value.copy_(before[key])
                elif torch.is_tensor(value):
                    value.zero_()


def _copy_mask(captured, fresh, name: str) -> None:
    """Copies a batch's mask (a flex BlockMask, DocumentSpans or a dense tensor) into the captured one of the same
    shapes."""
    from rustforge.model.attention import DocumentSpans

    if isinstance(captured, torch.Tensor):
        captured.copy_(fresh)
        return
    if isinstance(captured, DocumentSpans):  # both layer types share the tensors: copying twice is harmless
        captured.starts.copy_(fresh.starts)
        captured.ends.copy_(fresh.ends)
        return
    old, new = captured.as_tuple(), fresh.as_tuple()
    for a, b in zip(old, new, strict=True):
        if isinstance(a, torch.Tensor) != isinstance(b, torch.Tensor) or (
            isinstance(a, torch.Tensor) and a.shape != b.shape
        ):
            raise ValueError(f"GraphedTrainStep: the {name} mask's block layout changed shape; capture anew")
        if isinstance(a, torch.Tensor):
            a.copy_(b)
