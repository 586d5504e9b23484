"""RustforgeModel bookkeeping that the fast path depends on."""

import torch

from rustforge.config import LoraConfig, ModelConfig
from rustforge.model.gptoss import build_model


def _packed_step_with_nonzero_lora(model):
    """One forward + backward on two packed documents (96 tokens), the LoRA B factors made nonzero first (they
    start at zero) so that every LoRA gradient is exercised; returns the output and the trainable gradients."""
    gen = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("_B") or "lora_B" in name:
                p.copy_(torch.randn(p.shape, generator=gen) * 0.05)
    ids = torch.randint(0, 256, (1, 96), generator=torch.Generator().manual_seed(0))
    doc_ids = (torch.arange(96) >= 50).long()[None]
    positions = torch.cat([torch.arange(50), torch.arange(46)])[None]
    out = model(ids, positions, doc_ids, torch.roll(ids, -1, 1))
    out.loss.backward()
    return out, {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}


def test_checkpoint_recompute_keeps_the_forward_router_logits():
    # If the backward's recompute replaced them, the kept tensors' graphs would hold every recomputed
    # layer alive until the next step: the long-context OOM found on the H100.
    model = build_model(
        ModelConfig(preset="tiny", attention="eager", gradient_checkpointing=True, router_aux_loss_coef=0.01),
        LoraConfig(r=4, alpha=8),
        vocab_size=256,
    )
    ids = torch.randint(0, 256, (1, 64), generator=torch.Generator().manual_seed(0))
    out = model(ids, torch.arange(64)[None], torch.zeros_like(ids), torch.roll(ids, -1, 1))
    kept = {layer: id(t) for layer, t in model.router_logits.items()}
    assert len(kept) == model.config.num_hidden_layers
    out.loss.backward()
    assert {layer: id(t) for layer, t in model.router_logits.items()} == kept


def test_token_tiled_experts_give_the_same_loss_and_gradients_in_the_model():
    """model.moe_tile_tokens (the long-context setting) with checkpointing and the router aux loss on:
    the loss and every LoRA gradient equal the untiled model's (fp32, tiles that do not divide T)."""
    results = []
    for tile in (0, 23):
        model = build_model(
            ModelConfig(preset="tiny", attention="eager", gradient_checkpointing=True, router_aux_loss_coef=0.01,
                        expert_format="mxfp4", moe_tile_tokens=tile),
            LoraConfig(r=4, alpha=8),
            vocab_size=256,
        )  # fmt: skip
        model.train()
        out, grads = _packed_step_with_nonzero_lora(model)
        results.append((out.loss.detach(), grads))
    (loss0, grads0), (loss1, grads1) = results
    torch.testing.assert_close(loss1, loss0, rtol=1e-6, atol=1e-6)
    assert grads0.keys() == grads1.keys() and any("lora_down_A" in n for n in grads0)
    for name, g in grads0.items():
        scale = g.abs().max().item()
        assert scale > 0, name
        torch.testing.assert_close(grads1[name], g, rtol=1e-4, atol=1e-5 * scale, msg=lambda m, n=name: f"{n}: {m}")


def test_checkpointing_keeps_the_recomputed_dense_experts_for_backward(monkeypatch):
    """With checkpointing the experts dequantise twice per projection per step, not three times
    (forward, recompute; the backward reuses the recompute's weight), with the same loss and gradients."""
    from rustforge.model import moe

    calls = []
    real = moe._dequantize_all
    monkeypatch.setattr(moe, "_dequantize_all", lambda *a: calls.append(1) or real(*a))
    results = []
    for keep in (True, False):
        model = build_model(
            ModelConfig(preset="tiny", attention="eager", gradient_checkpointing=True, expert_format="mxfp4"),
            LoraConfig(r=4, alpha=8),
            vocab_size=256,
        )
        model.train()
        experts = [m for m in model.modules() if isinstance(m, moe.GroupedExperts)]
        assert experts and all(m.keep_dense_for_backward for m in experts)  # build_model's choice
        for m in experts:
            m.keep_dense_for_backward = keep
        ids = torch.randint(0, 256, (1, 64), generator=torch.Generator().manual_seed(0))
        calls.clear()
        out = model(ids, torch.arange(64)[None], torch.zeros_like(ids), torch.roll(ids, -1, 1))
        out.loss.backward()
        grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
        results.append((len(calls), out.loss.detach(), grads))
    (n_keep, loss_keep, g_keep), (n_plain, loss_plain, g_plain) = results
    layers = model.config.num_hidden_layers
    assert (n_keep, n_plain) == (4 * layers, 6 * layers)
    torch.testing.assert_close(loss_keep, loss_plain, rtol=0, atol=0)
    assert g_keep.keys() == g_plain.keys() and len(g_keep) > 0
    for name, g in g_plain.items():
        torch.testing.assert_close(g_keep[name], g, rtol=0, atol=0, msg=lambda m, n=name: f"{n}: {m}")


def test_without_checkpointing_the_dense_experts_are_not_kept():
    from rustforge.model import moe

    model = build_model(ModelConfig(preset="tiny", attention="eager", expert_format="mxfp4"), LoraConfig(r=4, alpha=8),
                        vocab_size=256)  # fmt: skip
    assert not any(m.keep_dense_for_backward for m in model.modules() if isinstance(m, moe.GroupedExperts))


def test_load_balancing_loss_equals_transformers():
    """Our all-layers-at-once router aux loss == transformers' per-layer load_balancing_loss_func (with the
    padding mask), value and gradient of the router logits."""
    from transformers.models.gpt_oss.modeling_gpt_oss import load_balancing_loss_func

    from rustforge.model.gptoss import load_balancing_loss

    g = torch.Generator().manual_seed(0)
    logits = [torch.randn(37, 8, generator=g, dtype=torch.float64, requires_grad=True) for _ in range(3)]
    valid = torch.rand(37, generator=g) > 0.2
    ours = load_balancing_loss(tuple(logits), 8, 2, valid)
    ref = load_balancing_loss_func(tuple(logits), 8, 2, valid.to(torch.float64))
    torch.testing.assert_close(ours.double(), ref.double(), rtol=1e-6, atol=1e-9)
    g_ours = torch.autograd.grad(ours, logits)
    g_ref = torch.autograd.grad(ref, logits)
    for a, b in zip(g_ours, g_ref):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-9)


def test_own_layer_loop_equals_transformers_loop(monkeypatch):
    """RustforgeModel.decoder_stack (each residual add fused with the next norm where the kernels run; on a CPU
    the same adds and norms) against transformers' GptOssModel.forward: the same loss, router logits and LoRA
    gradients, packed documents and the router aux loss on; with checkpointing the model keeps transformers'
    loop (its per-layer checkpoint wraps the layer call)."""
    from rustforge.model import gptoss

    calls = []
    real_stack = gptoss.RustforgeModel.decoder_stack
    monkeypatch.setattr(gptoss.RustforgeModel, "decoder_stack",
                        lambda self, *a: calls.append(1) or real_stack(self, *a))  # fmt: skip
    results = []
    for own in (True, False):
        monkeypatch.setattr(gptoss, "FUSED_RESIDUAL_STREAM", own)
        model = build_model(ModelConfig(preset="tiny", attention="eager", router_aux_loss_coef=0.01),
                            LoraConfig(r=4, alpha=8), vocab_size=256)  # fmt: skip
        out, grads = _packed_step_with_nonzero_lora(model)
        logits = {layer: t.detach().clone() for layer, t in model.router_logits.items()}
        results.append((out.loss.detach(), logits, grads))
    assert len(calls) == 1  # the first model took our loop, the second transformers'
    (loss0, logits0, grads0), (loss1, logits1, grads1) = results
    torch.testing.assert_close(loss0, loss1, rtol=0, atol=0)
    assert logits0.keys() == logits1.keys()
    for layer in logits0:
        torch.testing.assert_close(logits0[layer], logits1[layer], rtol=0, atol=0)
    for name, g in grads1.items():
        torch.testing.assert_close(grads0[name], g, rtol=1e-6, atol=1e-7 * g.abs().max().item(), msg=name)
    monkeypatch.setattr(gptoss, "FUSED_RESIDUAL_STREAM", True)
    checkpointed = build_model(ModelConfig(preset="tiny", attention="eager", gradient_checkpointing=True),
                               LoraConfig(r=4, alpha=8), vocab_size=256)  # fmt: skip
    assert not checkpointed.own_layer_loop
