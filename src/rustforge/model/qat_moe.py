"""Fake-quantised GPT-OSS experts for quantisation-aware training (train/qat.py): the forward sees the expert
weights quantised and dequantised exactly as the export stores them (MXFP4 or NVFP4 blocks along each
expert's input dim, NVFP4 with one tensor scale per expert), and the gradient passes straight through the
quantiser (STE) to float32 master weights or to an expert LoRA.

- `QatExperts`: transformers' per-expert loop (ReferenceLoraExperts) with each W_e (+ scaling * A_e @ B_e)
  fake-quantised per expert. Obviously right; a Python loop over experts with a quantiser call each, so
  slow on the 20B shape (24 layers x 32 experts x 2 projections per forward, again in backward).
- `GroupedQatExperts`: the same parameters and function over grouped GEMMs. Per layer and forward each
  projection is fake-quantised once for all experts (`fake_quant` over the [E, in, out] stack along `in`,
  a few experts at a time into one [E, in, out] tensor in the compute dtype), then moe.py's expert-sorted
  rows (`experts_on_sorted_rows`: sort, `_GatherSorted`, `_ClampedSwiGLU`, `_WeightedSumUnsorted`) and its
  `grouped_mm` do the rest. The backward recomputes the quantised stack instead of keeping every layer's
  (one projection's at a time is alive), and gives the masters their STE gradient as one K-grouped GEMM:
  dL/dW_e = x_e^T @ dy_e over the same offsets. With `trainable: lora` the forward forms W_e + scaling *
  A_e @ B_e for every expert: unlike GroupedExperts' split LoRA ((x @ A_e) @ B_e) this is inherent here,
  since what the export quantises is the merged weight, so QAT has to quantise the merged weight too; the
  gradient reaches A and B through the STE (dA_e = scaling * dW_e @ B_e^T, dB_e = scaling * A_e^T @ dW_e).

Own code: transformers' grouped experts have no fake quantiser, and its per-expert loop is the reference.
Under autocast (bf16 on a GPU) the grouped GEMMs run in the autocast dtype; the merge and the quantiser
always run in float32 on the masters.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from rustforge.model.moe import (
    _EXPERTS_PER_CHUNK,
    ReferenceLoraExperts,
    _zero_empty_groups,
    dense_expert_params,
    experts_on_sorted_rows,
    grouped_mm,
    lora_param_names,
)
from rustforge.model.quant import fake_quant

QAT_FORMATS = ("mxfp4", "nvfp4")
QAT_EXPERTS = ("reference", "grouped")


# ---------------------------------------------------------------------------------- reference loop
class QatExperts(ReferenceLoraExperts):
    """transformers' expert loop whose weights are fake-quantised in the forward: per expert, W_e (+ the
    LoRA delta) quantised along its input dim as the export stores it, gradient straight through."""

    def __init__(self, *args, fmt: str, mxfp4_rule: str, **kwargs):
        super().__init__(*args, **kwargs)
        if fmt not in QAT_FORMATS:
            raise ValueError(f"qat.format must be one of {QAT_FORMATS}, got {fmt!r}")
        self.fmt, self.mxfp4_rule, self.fake_quant_enabled = fmt, mxfp4_rule, True

    @classmethod
    def from_experts(cls, experts, fmt: str, mxfp4_rule: str):
        weights = [t.detach().float().clone() for t in dense_expert_params(experts)]
        return cls(*weights, alpha=experts.alpha, limit=experts.limit, fmt=fmt, mxfp4_rule=mxfp4_rule)

    def expert_weight(self, proj: str, e: int) -> torch.Tensor:
        # merge and quantise in float32 under autocast too, as StackQuantiser and the export do: an autocast
        # (bf16) A_e @ B_e moves merged elements across the quantiser's rounding boundaries (measured on one
        # 20b-shaped layer under CPU bf16 autocast: 1.4% gradient error vs float64 instead of 0.4-0.6%)
        with torch.autocast(getattr(self, proj).device.type, enabled=False):
            weight = super().expert_weight(proj, e)  # [in, out], LoRA delta included
            if not self.fake_quant_enabled:
                return weight
            return fake_quant(weight, self.fmt, dim=0, mxfp4_rule=self.mxfp4_rule)

    def extra_repr(self) -> str:
        return f"fmt={self.fmt}, rule={self.mxfp4_rule}, fake_quant={self.fake_quant_enabled}"


# -------------------------------------------------------------------------------- grouped GEMMs
@dataclass(frozen=True)
class StackQuantiser:
    """How one layer turns its masters into the weights its forward uses: W (+ scaling * A @ B), then the
    export's quantiser when `enabled` (else unquantised: QAT's loss_bf16)."""

    fmt: str
    mxfp4_rule: str
    enabled: bool
    scaling: float

    @torch.no_grad()
    def weights(self, weight, lora_A, lora_B, dtype: torch.dtype) -> torch.Tensor:
        """[E, in, out] in `dtype`, filled a few experts at a time so the float32 temporaries of the merge
        and the quantiser stay a chunk's (the result is the one full-size tensor)."""
        out = torch.empty(weight.shape, dtype=dtype, device=weight.device)
        with torch.autocast(weight.device.type, enabled=False):  # merge and quantise in float32 on a GPU too
            for lo in range(0, weight.shape[0], _EXPERTS_PER_CHUNK):
                hi = lo + _EXPERTS_PER_CHUNK
                merged = weight[lo:hi]
                if lora_A is not None:  # the delta as QatExperts adds it: W + scaling * (A @ B)
                    merged = merged + self.scaling * torch.bmm(lora_A[lo:hi].to(merged.dtype), lora_B[lo:hi].to(merged.dtype))
                if self.enabled:
                    merged = fake_quant(merged, self.fmt, dim=1, mxfp4_rule=self.mxfp4_rule, stacked=True)
                out[lo:hi] = merged
        return out


def _lora_grads(grad_weight, lora_A, lora_B, scaling: float, want_A: bool, want_B: bool):
    """(dA, dB) of W + scaling * A @ B given dW [E, in, out] (any dtype), in the LoRA's dtype, per chunk of
    experts so that dW is only ever float32 for a chunk."""
    grad_A = torch.empty_like(lora_A) if want_A else None
    grad_B = torch.empty_like(lora_B) if want_B else None
    for lo in range(0, grad_weight.shape[0], _EXPERTS_PER_CHUNK):
        hi = lo + _EXPERTS_PER_CHUNK
        g = grad_weight[lo:hi].to(lora_A.dtype)
        if want_A:
            torch.bmm(g, lora_B[lo:hi].transpose(1, 2), out=grad_A[lo:hi]).mul_(scaling)
        if want_B:
            torch.bmm(lora_A[lo:hi].transpose(1, 2), g, out=grad_B[lo:hi]).mul_(scaling)
    return grad_A, grad_B


class _FakeQuantGroupedLinear(torch.autograd.Function):
    """y = x @ Q(W_e [+ scaling * A_e @ B_e]) + b_e on expert-sorted rows x [S, in], Q = `quantiser`; b frozen.

    Saves x, the offsets and the LoRA factors. The master W stays a reference on ctx (not a saved tensor:
    activation offloading never copies weights), and Q(...) is recomputed in backward, so only one
    projection's quantised stack is alive at a time rather than one per layer until backward (what the
    reference loop's autograd keeps: ~38 GB in bf16 on the 20B shape). The price is a second quantiser
    pass per projection; on a CPU, where the quantiser dominates, that made the tiny model's steps ~20%
    slower than the reference loop's."""

    @staticmethod
    def forward(ctx, x, weight, lora_A, lora_B, bias, offs, quantiser: StackQuantiser):
        weight_q = quantiser.weights(weight, lora_A, lora_B, x.dtype)
        y = grouped_mm(x, weight_q, offs)
        del weight_q
        counts = torch.diff(offs, prepend=offs.new_zeros(1))
        y.add_(bias.to(y.dtype).repeat_interleave(counts, dim=0, output_size=x.shape[0]))
        ctx.save_for_backward(x, offs, lora_A, lora_B)
        ctx.weight, ctx.quantiser = weight, quantiser
        return y

    @staticmethod
    def backward(ctx, grad_y):
        x, offs, lora_A, lora_B = ctx.saved_tensors
        want_x, want_w, want_A, want_B = ctx.needs_input_grad[:4]
        grad_y = grad_y.contiguous()
        grad_x = grad_w = grad_A = grad_B = None
        if want_x:
            weight_q = ctx.quantiser.weights(ctx.weight, lora_A, lora_B, grad_y.dtype)
            grad_x = grouped_mm(grad_y, weight_q.transpose(1, 2), offs)
            del weight_q
        if want_w or want_A or want_B:
            # dL/dQ(W)_e = x_e^T @ dy_e, and by the STE that is dL/dW_e (experts with no rows: zero)
            grad_q = _zero_empty_groups(grouped_mm(x.t(), grad_y, offs), offs)
            if want_w:
                grad_w = grad_q.to(ctx.weight.dtype)
            if want_A or want_B:
                grad_A, grad_B = _lora_grads(grad_q, lora_A, lora_B, ctx.quantiser.scaling, want_A, want_B)
        return grad_x, grad_w, grad_A, grad_B, None, None, None


def compute_dtype(master: torch.Tensor) -> torch.dtype:
    """The autocast dtype where autocast is on for the masters' device (bf16 on a GPU), else theirs."""
    device_type = master.device.type
    if torch.is_autocast_enabled(device_type):
        return torch.get_autocast_dtype(device_type)
    return master.dtype


class GroupedQatExperts(QatExperts):
    """QatExperts' parameters (state dicts interchange) and function over grouped GEMMs; see the module
    docstring. `expert_weight` (one expert's fake-quantised weight) is inherited and stays the reference."""

    def quantiser(self) -> StackQuantiser:
        return StackQuantiser(self.fmt, self.mxfp4_rule, self.fake_quant_enabled, self.lora_scaling)

    def forward_weights(self, proj: str, dtype: torch.dtype | None = None) -> torch.Tensor:
        """The [E, in, out] stack the forward multiplies `proj`'s rows by (no autograd)."""
        name_A, name_B = lora_param_names(proj)
        weight = getattr(self, proj)
        return self.quantiser().weights(weight, getattr(self, name_A), getattr(self, name_B), dtype or weight.dtype)

    def forward(self, hidden_states, router_indices, routing_weights):
        dtype = compute_dtype(self.gate_up_proj)
        quantiser = self.quantiser()

        def project(proj: str, x, rows):
            name_A, name_B = lora_param_names(proj)
            return _FakeQuantGroupedLinear.apply(
                x, getattr(self, proj), getattr(self, name_A), getattr(self, name_B),
                getattr(self, f"{proj}_bias").detach(), rows.offs, quantiser,
            )  # fmt: skip

        return experts_on_sorted_rows(
            hidden_states, router_indices, routing_weights, self.num_experts, dtype, self.alpha, self.limit, project
        )


def qat_experts_class(impl: str) -> type[QatExperts]:
    if impl not in QAT_EXPERTS:
        raise ValueError(f"qat.experts must be one of auto, {', '.join(QAT_EXPERTS)}; got {impl!r}")
    return GroupedQatExperts if impl == "grouped" else QatExperts


__all__ = ["QAT_EXPERTS", "QAT_FORMATS", "GroupedQatExperts", "QatExperts", "StackQuantiser", "qat_experts_class"]
