"""GPT-OSS for training: transformers' GptOssForCausalLM with rustforge's fast paths swapped in.

transformers' model is the reference implementation and the module tree we keep (so checkpoints, PEFT
adapters and export use the original names). What we change, each selected by `ModelConfig`:
- attention: our masks (packed documents never attend to each other) passed as transformers' mask dict,
  through its eager function (reference) or our flex-attention function with sinks (GPU), where the
  layer's forward also fuses q/k/v's LoRA projections and compiles RoPE with flex (PackedFlexAttention);
- experts: the split-LoRA grouped-GEMM module with frozen weights in bf16/FP8/MXFP4 (model/moe.py);
- loss: chunked cross-entropy from the final hidden states -- the [tokens x vocab] logits never exist;
- RMSNorm: one Triton kernel each way on the GPU (model/triton_rmsnorm.py), the same module tree; on the
  training path (no checkpointing, one process) our own loop over the decoder layers fuses each residual add
  with the norm after it (`decoder_stack`: one kernel each way instead of two, 48 pairs a 20B step);
- gradient checkpointing per decoder layer, optionally with the saved layer inputs in CPU memory.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass

import torch
from torch import nn
from transformers import GptOssForCausalLM

from rustforge.config import LoraConfig, ModelConfig
from rustforge.model.attention import (
    build_attention_masks,
    install_packed_flex_attention,
    register_flex_attention,
)
from rustforge.model.loss import (
    chunked_cross_entropy,
    chunked_token_logprobs,
    valid_rows,
)
from rustforge.model.presets import get_preset, hf_config
from rustforge.model.triton_rmsnorm import add_rmsnorm

FUSED_RESIDUAL_STREAM = True  # False: transformers' layer loop (separate residual adds) on every path


@dataclass
class LossOutput:
    loss: torch.Tensor  # mean token CE + aux coefficient * aux loss, for a single micro-batch
    ce_sum: torch.Tensor  # summed token cross-entropy, with grad (exact averaging over accumulation)
    n_tokens: torch.Tensor  # tokens with a label
    aux_loss: torch.Tensor  # router load-balancing loss, with grad (0 when the coefficient is 0)


def resolve_device(name: str = "auto") -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(name)


def resolve_dtype(cfg: ModelConfig, device: torch.device) -> torch.dtype:
    if cfg.dtype == "float16":
        raise ValueError("model.dtype: float16 diverges when training GPT-OSS; use bfloat16 (or float32 on CPU)")
    if cfg.dtype == "auto":
        return torch.bfloat16 if device.type == "cuda" else torch.float32
    try:
        return {"bfloat16": torch.bfloat16, "float32": torch.float32}[cfg.dtype]
    except KeyError:
        raise ValueError(f"model.dtype: unknown dtype {cfg.dtype!r}; use auto, bfloat16 or float32") from None


def resolve_attention(cfg: ModelConfig, device: torch.device) -> str:
    impl = cfg.attention
    if impl == "auto":
        impl = "flex" if device.type == "cuda" else "eager"
    if impl not in ("eager", "flex", "triton"):
        raise ValueError(f"model.attention: unknown implementation {impl!r}; use auto, eager, flex or triton")
    if impl == "triton" and device.type != "cuda":
        raise ValueError(f"model.attention: triton needs a CUDA GPU; use eager or auto on {device.type}")
    return impl


def resolve_experts(cfg: ModelConfig) -> str:
    impl = "grouped" if cfg.experts == "auto" else cfg.experts
    if impl not in ("reference", "grouped"):
        raise ValueError(f"model.experts: unknown implementation {impl!r}; use auto, reference or grouped")
    if impl == "reference" and cfg.expert_format != "bf16":
        raise ValueError("model.expert_format: compressed experts need model.experts = grouped")
    return impl


class RustforgeModel(nn.Module):
    """The trainable model: `hf` holds the weights; forward returns the chunked loss."""

    def __init__(self, hf: GptOssForCausalLM, cfg: ModelConfig, attention: str):
        super().__init__()
        self.hf = hf
        self.cfg = cfg
        self.attention = attention
        self.router_logits: dict[int, torch.Tensor] = {}
        # decoder_stack calls the layers' submodules itself: not under gradient checkpointing (which wraps the
        # layer call) nor FSDP2 (whose hooks unshard at the layer and body calls; shard_model turns it off)
        self.own_layer_loop = not cfg.gradient_checkpointing
        # flex and triton share one registered attention function (it dispatches on the mask's type)
        hf.config._attn_implementation = register_flex_attention() if attention != "eager" else "eager"
        for i, layer in enumerate(hf.model.layers):
            layer.mlp.router.register_forward_hook(self._keep_router_logits(i))
        if cfg.gradient_checkpointing:
            hf.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})

    @property
    def config(self):
        return self.hf.config

    def _keep_router_logits(self, layer: int):
        def hook(_module, _inputs, output):
            # first call per forward only: a checkpoint recompute in backward must not replace the logits,
            # since the replacement's autograd graph would keep that layer's whole recomputed forward alive
            # until the next step (measured: ~1.3 MB per token at 16K on the 20B shape, the 64K OOM)
            self.router_logits.setdefault(layer, output[0])

        return hook

    def attention_masks(self, doc_ids) -> dict:
        """The per-layer-type masks of a batch (flex BlockMasks on the GPU path)."""
        return build_attention_masks(
            doc_ids, self.config.sliding_window, self.attention, self.hf.model.embed_tokens.weight.dtype
        )

    def hidden_states(self, input_ids, position_ids, doc_ids, masks: dict | None = None) -> torch.Tensor:
        masks = self.attention_masks(doc_ids) if masks is None else masks
        offload = (
            torch.autograd.graph.save_on_cpu(pin_memory=self.cfg.offload_pinned)
            if self.cfg.offload_activations and self.training
            else contextlib.nullcontext()
        )
        self.router_logits.clear()
        with offload:
            if self.own_layer_loop and FUSED_RESIDUAL_STREAM:
                return self.decoder_stack(input_ids, position_ids, masks)
            out = self.hf.model(input_ids=input_ids, position_ids=position_ids, attention_mask=masks, use_cache=False)
        return out.last_hidden_state

    def decoder_stack(self, input_ids, position_ids, masks: dict) -> torch.Tensor:
        """transformers' GptOssModel.forward without a cache (embeddings, RoPE tables, layers, final norm), each
        residual add fused with the norm after it: post-attention norm inside a layer, the next layer's input
        norm (the final norm after the last layer) across. Same math; the add's rounding is the same."""
        body = self.hf.model
        hidden = body.embed_tokens(input_ids)
        position_embeddings = body.rotary_emb(hidden, position_ids)
        layers = body.layers
        normed = layers[0].input_layernorm(hidden)
        for i, layer in enumerate(layers):
            attended, _ = layer.self_attn(hidden_states=normed, attention_mask=masks[self.config.layer_types[i]],
                                          position_ids=position_ids, position_embeddings=position_embeddings)
            hidden, normed = add_rmsnorm(hidden, attended, layer.post_attention_layernorm)
            mixed, _ = layer.mlp(normed)
            next_norm = layers[i + 1].input_layernorm if i + 1 < len(layers) else body.norm
            hidden, normed = add_rmsnorm(hidden, mixed, next_norm)
        return normed

    def forward(self, input_ids, position_ids, doc_ids, labels, masks: dict | None = None,
                rows: torch.Tensor | None = None) -> LossOutput:
        """`masks` (attention_masks(doc_ids)) and `rows` (loss.valid_rows of the labels) may be given
        precomputed: a step captured as a CUDA graph must not wait for the GPU (train/graphed_step.py)."""
        # the loss's row selection (and label check) waits for the GPU: done here, before the forward is
        # queued, it costs nothing, and the host then runs ahead of the GPU through forward and backward
        rows = valid_rows(labels.flatten(), self.hf.lm_head.weight.shape[0]) if rows is None else rows
        hidden = self.hidden_states(input_ids, position_ids, doc_ids, masks)
        ce_sum, n_tokens = chunked_cross_entropy(
            hidden.flatten(0, 1).to(self.hf.lm_head.weight.dtype), self.hf.lm_head.weight, labels.flatten(),
            self.cfg.loss_chunk_size, keep_logits_bytes=int(self.cfg.loss_keep_logits_gib * 2**30), rows=rows,
        )
        aux = self.aux_loss(doc_ids)
        loss = ce_sum / n_tokens.clamp(min=1) + self.config.router_aux_loss_coef * aux
        return LossOutput(loss=loss, ce_sum=ce_sum, n_tokens=n_tokens, aux_loss=aux)

    def token_logprobs(self, input_ids, position_ids, doc_ids, targets, temperature: float = 1.0):
        """log p(targets[t] | prefix) per position, [B, T] float32, by the chunked path."""
        rows = valid_rows(targets.flatten(), self.hf.lm_head.weight.shape[0])  # before the forward: see forward
        hidden = self.hidden_states(input_ids, position_ids, doc_ids)
        lp = chunked_token_logprobs(
            hidden.flatten(0, 1).to(self.hf.lm_head.weight.dtype),
            self.hf.lm_head.weight,
            targets.flatten(),
            self.cfg.loss_chunk_size,
            temperature=temperature,
            rows=rows,
        )
        return lp.view(targets.shape)

    def aux_loss(self, doc_ids) -> torch.Tensor:
        coef = self.config.router_aux_loss_coef
        if coef == 0 or not self.router_logits:
            return torch.zeros((), device=doc_ids.device)
        logits = tuple(self.router_logits[i] for i in sorted(self.router_logits))
        return load_balancing_loss(logits, self.config.num_local_experts, self.config.num_experts_per_tok,
                                   doc_ids >= 0)


def load_balancing_loss(router_logits: tuple[torch.Tensor, ...], num_experts: int, top_k: int,
                        valid: torch.Tensor) -> torch.Tensor:
    """transformers' load_balancing_loss_func with a token mask -- num_experts * sum_e f_e * P_e, f_e the share
    of the valid tokens' top-k assignments that go to expert e and P_e their mean router probability, over all
    layers -- computed for all layers at once: ~10 kernels instead of ~10 per layer, which a step replayed as
    a CUDA graph pays a few microseconds each for. router_logits: per layer [N, E]; valid: bool, N tokens."""
    probs = torch.softmax(torch.stack(router_logits), dim=-1)  # [L, N, E]
    layers, tokens, _ = probs.shape
    mask = valid.reshape(-1).to(torch.float32)
    selected = torch.topk(probs, top_k, dim=-1).indices.reshape(-1)
    per_assignment = mask[None, :, None].expand(layers, tokens, top_k).reshape(-1)
    assignments = torch.zeros(num_experts, dtype=torch.float32, device=probs.device).scatter_add_(0, selected,
                                                                                                 per_assignment)
    prob_sum = (probs.float() * mask[None, :, None]).sum(dim=(0, 1))
    total = mask.sum() * layers
    return num_experts * torch.sum((assignments / total) * (prob_sum / total))


def build_model(
    model_cfg: ModelConfig,
    lora_cfg: LoraConfig | None,
    vocab_size: int | None = None,
    device: torch.device | str = "cpu",
    special_ids: dict | None = None,
) -> RustforgeModel:
    """The base model (local gpt-oss dir, or a preset with seeded random weights) with LoRA and fast paths."""
    from rustforge.model.lora import apply_lora
    from rustforge.model.moe import configure_experts, install_experts
    from rustforge.model.triton_rmsnorm import install_fused_norms

    device = torch.device(device)
    dtype = resolve_dtype(model_cfg, device)
    attention = resolve_attention(model_cfg, device)
    experts = resolve_experts(model_cfg)
    if model_cfg.path:
        from rustforge.model.loader import load_gptoss

        hf = load_gptoss(model_cfg.path, dtype=dtype, device="cpu")
        hf.config.router_aux_loss_coef = model_cfg.router_aux_loss_coef
    else:
        cfg = hf_config(
            get_preset(model_cfg.preset),
            vocab_size=vocab_size,
            router_aux_loss_coef=model_cfg.router_aux_loss_coef,
            **(special_ids or {}),
        )
        cfg._attn_implementation = "eager"
        torch.manual_seed(model_cfg.seed)
        with _default_dtype(dtype), device:  # born on the target device: 20B fp32 on a CPU is 84 GB
            hf = GptOssForCausalLM(cfg)
    hf.requires_grad_(False)
    hf.to(device)
    install_experts(hf, experts, model_cfg.expert_format, lora_cfg)
    install_fused_norms(hf)  # one Triton kernel each way on the GPU; transformers' forward elsewhere
    if experts == "grouped":
        configure_experts(hf, model_cfg.moe_tile_tokens, keep_dense_for_backward=model_cfg.gradient_checkpointing)
    if lora_cfg is not None:
        torch.manual_seed(model_cfg.seed)  # the adapter's init depends on the seed alone, not on what ran before
        apply_lora(hf, lora_cfg)
    if attention in ("flex", "triton"):
        install_packed_flex_attention(hf)  # q/k/v in one LoRA call, RoPE compiled with the attention
    return RustforgeModel(hf.to(device), model_cfg, attention)


@contextlib.contextmanager
def _default_dtype(dtype: torch.dtype):
    previous = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        yield
    finally:
        torch.set_default_dtype(previous)
