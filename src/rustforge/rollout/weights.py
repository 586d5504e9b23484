"""What the rollout engine reads per decoder layer: the model's own modules, or a merged snapshot.

Three modes, one interface (`LayerWeights`):
- "live": the model's modules as they are (LoraLinear, GroupedExperts with split LoRA and just-in-time
  dequantisation). No extra memory; every decode step pays the attention LoRA side GEMMs; the experts
  take GroupedExperts' decode path where it runs (as in "compressed"), else a dequantisation of every
  FP8/MXFP4 expert of every layer.
- "merged": persistent buffers holding W + scaling * B @ A for the attention projections and, per expert,
  dense (dequantised) W_e + scaling * A_e @ B_e in the model dtype, served through a bf16-format
  GroupedExperts without LoRA (the same grouped path). `refresh()` rewrites the buffers in place, so CUDA
  graphs captured on them stay valid across GRPO steps. Costs a dense copy of what is merged (20B, MXFP4
  base: 38 GB of bf16 experts), which is why "auto" picks it only where it fits.
- "compressed": the attention projections merged as above (1.3 GB on the 20B), the experts served from
  the model's own compressed storage: GroupedExperts' decode path (model/triton_moe_decode.py) reads
  only the experts a step routes to, in their stored format, LoRA applied beside them, with no expert
  copies. Prefill chunks (more rows than moe.DECODE_MAX_ROWS) take the grouped path, as in "live". Where
  the decode kernels do not run (CPU, no Triton) it is "live" experts with merged attention. "auto"
  picks it for MXFP4/FP8 experts when the kernels run (`decode_kernels_serve`), else "merged" where that
  fits, else "live".

The result is the same function up to rounding: the tests compare every mode with the model's forward.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from rustforge.model import moe
from rustforge.model.lora import LoraLinear
from rustforge.model.moe import GroupedExperts, dense_expert_weight, expert_lora_targets, lora_param_names
from rustforge.model.triton_moe_decode import moe_decode_supported

WEIGHT_MODES = ("auto", "live", "merged", "compressed")
_MERGES_ATTENTION = ("merged", "compressed")
_EXPERTS_PER_CHUNK = 4
_PROJECTIONS = ("q_proj", "k_proj", "v_proj", "o_proj")


@dataclass
class LayerWeights:
    input_norm: nn.Module
    post_norm: nn.Module
    q: Callable[[Tensor], Tensor]
    k: Callable[[Tensor], Tensor]
    v: Callable[[Tensor], Tensor]
    o: Callable[[Tensor], Tensor]
    sinks: Tensor
    scale: float
    router: nn.Module
    experts: nn.Module


class _MergedLinear:
    """F.linear over a persistent merged weight buffer and the base layer's bias."""

    def __init__(self, lora: LoraLinear):
        self.lora = lora
        self.weight = torch.empty_like(lora.base_layer.weight)
        self.bias = lora.base_layer.bias

    def refresh(self) -> None:
        base = self.lora.base_layer.weight
        delta = self.lora.lora_B.float() @ self.lora.lora_A.float()
        self.weight.copy_((base.float() + self.lora.scaling * delta).to(base.dtype))

    def __call__(self, x: Tensor) -> Tensor:
        return F.linear(x, self.weight, self.bias)


class _MergedExperts:
    """A bf16-format GroupedExperts (no LoRA) over persistent buffers holding the merged dense experts."""

    def __init__(self, source: GroupedExperts):
        self.source = source
        dtype, E, H, I = source.dtype, source.num_experts, source.hidden_size, source.intermediate_size
        device = source.gate_up_proj_bias.device
        self.buffers = {
            "gate_up_proj": torch.empty(E, H, 2 * I, dtype=dtype, device=device),
            "down_proj": torch.empty(E, I, H, dtype=dtype, device=device),
        }
        self.module = GroupedExperts(
            "bf16",
            (self.buffers["gate_up_proj"],),
            source.gate_up_proj_bias.detach(),
            (self.buffers["down_proj"],),
            source.down_proj_bias.detach(),
            alpha=source.alpha,
            limit=source.limit,
            dtype=dtype,
        )

    def refresh(self) -> None:
        src = self.source
        lora = set(expert_lora_targets(src))
        for proj, buffer in self.buffers.items():
            storage = tuple(t.detach() for t in src.storage(proj))
            for lo in range(0, src.num_experts, _EXPERTS_PER_CHUNK):
                hi = lo + _EXPERTS_PER_CHUNK
                dense = dense_expert_weight(src.fmt, tuple(t[lo:hi] for t in storage), torch.float32)
                if proj in lora:
                    name_A, name_B = lora_param_names(proj)
                    A, B = getattr(src, name_A)[lo:hi].float(), getattr(src, name_B)[lo:hi].float()
                    dense = dense + src.lora_scaling * torch.bmm(A, B)
                buffer[lo:hi].copy_(dense)
                del dense


def _needs_merge(module: nn.Module) -> bool:
    if isinstance(module, GroupedExperts):
        return module.fmt != "bf16" or bool(expert_lora_targets(module))
    return isinstance(module, LoraLinear)


def merged_bytes(hf: nn.Module, mode: str = "merged") -> int:
    """Extra memory `mode` allocates for this model (merged: attention and experts; compressed: attention)."""
    total = 0
    for layer in hf.model.layers:
        for name in _PROJECTIONS:
            proj = getattr(layer.self_attn, name)
            if isinstance(proj, LoraLinear) and mode in _MERGES_ATTENTION:
                total += proj.base_layer.weight.numel() * proj.base_layer.weight.element_size()
        experts = layer.mlp.experts
        if mode == "merged" and isinstance(experts, GroupedExperts) and _needs_merge(experts):
            E, H, I = experts.num_experts, experts.hidden_size, experts.intermediate_size
            total += E * 3 * H * I * torch.empty((), dtype=experts.dtype).element_size()
    return total


def decode_kernels_serve(hf: nn.Module) -> bool:
    """Whether "compressed" reads MXFP4/FP8 experts through the decode kernels on this model's device:
    every GroupedExperts layer is bf16 with a format the kernels run there, and one is compressed."""
    experts = [layer.mlp.experts for layer in hf.model.layers]
    if not moe.DECODE_KERNELS or not all(isinstance(e, GroupedExperts) for e in experts):
        return False
    if not any(e.fmt in ("mxfp4", "fp8") for e in experts):
        return False
    return all(e.dtype == torch.bfloat16 and moe_decode_supported(e.fmt, e.gate_up_proj_bias) for e in experts)


class EngineWeights:
    """Per-layer LayerWeights in `mode` ("live", "merged" or "compressed"); merged buffers are built once,
    refreshed by `refresh()` (call it whenever the trainable weights changed, e.g. before each rollout)."""

    def __init__(self, hf: nn.Module, mode: str):
        if mode not in ("live", "merged", "compressed"):
            raise ValueError(f"rollout.weights: expected live, merged or compressed here, got {mode!r}")
        self.hf, self.mode = hf, mode
        self._merged: list = []
        self.layers = [self._layer(layer) for layer in hf.model.layers]

    def _layer(self, layer: nn.Module) -> LayerWeights:
        attn = layer.self_attn
        projections = {}
        for name in _PROJECTIONS:
            module = getattr(attn, name)
            if self.mode in _MERGES_ATTENTION and isinstance(module, LoraLinear):
                module = _MergedLinear(module)
                self._merged.append(module)
            projections[name[0]] = module
        experts = layer.mlp.experts
        if self.mode == "merged" and isinstance(experts, GroupedExperts) and _needs_merge(experts):
            merged = _MergedExperts(experts)
            self._merged.append(merged)
            experts = merged.module
        return LayerWeights(
            input_norm=layer.input_layernorm,
            post_norm=layer.post_attention_layernorm,
            sinks=attn.sinks,
            scale=float(attn.scaling),
            router=layer.mlp.router,
            experts=experts,
            **projections,
        )

    @torch.no_grad()
    def refresh(self) -> None:
        for merged in self._merged:
            merged.refresh()

    def signature(self) -> tuple:
        """Changes whenever a captured decode graph would read stale state: parameter storage moved
        (e.g. an adapter snapshot swapped in) or a LoRA scaling changed (lora_disabled)."""
        params = tuple(p.data_ptr() for p in self.hf.parameters())
        scalings = tuple(
            getattr(m, "scaling", None) if isinstance(m, LoraLinear) else getattr(m, "lora_scaling", None)
            for m in self.hf.modules()
            if isinstance(m, (LoraLinear, GroupedExperts))
        )
        return params, scalings


def route(router: nn.Module, x: Tensor) -> tuple[Tensor, Tensor]:
    """(routing weights [N, k], expert indices [N, k]) from transformers' GptOssTopKRouter, whichever of
    its return conventions the installed version has: (logits, scores [N, k], indices) in 5.x,
    (scores [N, E] scattered, indices) in 4.5x."""
    out = router(x)
    if len(out) == 3:
        _, scores, indices = out
    elif len(out) == 2:
        scores, indices = out
    else:  # pragma: no cover - unknown transformers version
        raise TypeError(f"rollout: unexpected router output of {len(out)} tensors from {type(router).__name__}")
    if scores.shape[-1] != indices.shape[-1]:
        scores = scores.gather(-1, indices)
    return scores, indices
