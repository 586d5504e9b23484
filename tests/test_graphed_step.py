"""GraphedTrainStep (train/graphed_step.py): a captured and replayed training step equals the eager steps.

- CPU: it refuses without CUDA, and without a capturable optimizer, with errors that say so.
- GPU (`-m gpu`): two models built alike (tiny GPT-OSS shape, LoRA, fused capturable AdamW); eager steps on one,
  warm-up + replays on the other: the same losses and the same LoRA weights after the same number of steps,
  including replays on new batches with other tokens and with another document layout; a batch of another
  shape is refused.
"""

from __future__ import annotations

import pytest
import torch

from rustforge.config import LoraConfig, ModelConfig
from rustforge.model.gptoss import build_model
from rustforge.train.graphed_step import GraphedTrainStep

gpu = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a GPU")


def _batch(seq: int, docs: int, vocab: int, device, seed: int) -> dict:
    g = torch.Generator().manual_seed(seed)
    doc_len = seq // docs
    doc_ids = (torch.arange(seq) // doc_len).clamp(max=docs - 1)[None]
    position_ids = (torch.arange(seq) - doc_ids[0] * doc_len)[None]
    input_ids = torch.randint(0, vocab, (1, seq), generator=g)
    labels = torch.roll(input_ids, -1, dims=1)
    labels[:, doc_len - 1 :: doc_len] = -100  # no target across a document end
    batch = {"input_ids": input_ids, "position_ids": position_ids, "doc_ids": doc_ids, "labels": labels}
    return {k: v.to(device) for k, v in batch.items()}


def _model(device):
    model = build_model(ModelConfig(preset="tiny"), LoraConfig(r=4, alpha=8), vocab_size=512, device=device)
    params = [p for p in model.parameters() if p.requires_grad]
    return model, params


def test_refuses_without_cuda():
    model, params = _model("cpu")
    opt = torch.optim.AdamW(params, lr=1e-3)
    with pytest.raises(ValueError, match="CUDA"):
        GraphedTrainStep(model, opt, _batch(64, 2, 512, "cpu", 0))


@pytest.mark.gpu
@gpu
def test_replays_equal_eager_steps():
    batch, other, moved = _batch(256, 2, 512, "cuda", 0), _batch(256, 2, 512, "cuda", 1), _batch(256, 4, 512, "cuda", 2)
    eager_model, eager_params = _model("cuda")
    eager_opt = torch.optim.AdamW(eager_params, lr=1e-3, fused=True)
    eager = []
    for b in (batch, batch, batch, other, moved):
        with torch.autocast("cuda", dtype=torch.bfloat16):
            loss = eager_model(**b).loss
        loss.backward()
        eager_opt.step()
        eager_opt.zero_grad(set_to_none=True)
        eager.append(float(loss.detach()))
    model, params = _model("cuda")
    with pytest.raises(ValueError, match="capturable"):
        GraphedTrainStep(model, torch.optim.AdamW(params, lr=1e-3, fused=True), batch)
    opt = torch.optim.AdamW(params, lr=1e-3, fused=True, capturable=True)
    step = GraphedTrainStep(model, opt, batch, warmup_steps=2)  # eager steps 1-2
    graphed = [float(step.replay()), float(step.replay(other)), float(step.replay(moved))]
    torch.testing.assert_close(torch.tensor(graphed), torch.tensor(eager[2:]), rtol=2e-3, atol=2e-3)
    for a, b in zip(params, eager_params):
        torch.testing.assert_close(a, b, rtol=2e-3, atol=2e-3)
    with pytest.raises(ValueError, match="shape"):
        step.replay(_batch(128, 2, 512, "cuda", 3))


def test_a_new_layouts_masks_are_copied_into_the_captured_ones():
    """replay(batch)'s mask update (CPU: flex BlockMasks build there too): the captured BlockMask's tensors take
    the new layout's values in place, and a mask of another shape is refused."""
    from rustforge.model.attention import build_attention_masks
    from rustforge.train.graphed_step import _copy_mask

    one_document = torch.zeros(1, 512, dtype=torch.long)
    four_documents = (torch.arange(512) // 128)[None]  # block-diagonal: other block counts than one document's
    captured = build_attention_masks(one_document, 128, "flex")["full_attention"]
    fresh = build_attention_masks(four_documents, 128, "flex")["full_attention"]
    assert not torch.equal(captured.full_kv_num_blocks, fresh.full_kv_num_blocks)
    kv_indices = captured.kv_indices
    _copy_mask(captured, fresh, "full_attention")
    assert captured.kv_indices is kv_indices  # in place: the graph reads it by address
    for a, b in zip(captured.as_tuple(), fresh.as_tuple()):
        if isinstance(a, torch.Tensor):
            assert torch.equal(a, b)
    longer = build_attention_masks(torch.zeros(1, 1024, dtype=torch.long), 128, "flex")["full_attention"]
    with pytest.raises(ValueError, match="changed shape"):
        _copy_mask(captured, longer, "full_attention")
