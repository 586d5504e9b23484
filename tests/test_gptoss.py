"""RustforgeModel bookkeeping that the fast path depends on."""

import torch

from rustforge.config import LoraConfig, ModelConfig
from rustforge.model.gptoss import build_model


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
