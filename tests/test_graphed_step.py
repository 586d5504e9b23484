"""GraphedTrainStep (train/graphed_step.py) and the SFT loop's `train.cuda_graph`: replayed steps equal eager ones.

- CPU: it refuses without CUDA, and without a capturable optimizer, with errors that say so; the SFT loop
  refuses `cuda_graph` on a CPU, in stages whose step is not SFT's and with gradient checkpointing, naming the
  field.
- GPU (`-m gpu`): two models built alike (tiny GPT-OSS shape, LoRA, fused capturable AdamW); eager steps on one,
  warm-up + replays on the other: the same losses and the same LoRA weights after the same number of steps (the
  warm-up steps leave no trace), including replays on new batches with other tokens and with another document
  layout; a batch of another shape is refused. The SFT loop with `cuda_graph` on (two micro-batches a step, two
  curriculum phases, the expert monitor on) logs the eager loop's losses, gradient norms, learning rates and
  expert counts, and a run killed after a checkpoint resumes to the same numbers.
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


def _model(device, attention: str = "auto"):
    model = build_model(ModelConfig(preset="tiny", attention=attention), LoraConfig(r=4, alpha=8), vocab_size=512,
                        device=device)
    params = [p for p in model.parameters() if p.requires_grad]
    return model, params


def _eager_losses(model, params, batches) -> list[float]:
    opt = torch.optim.AdamW(params, lr=1e-3, fused=True)
    losses = []
    for b in batches:
        with torch.autocast("cuda", dtype=torch.bfloat16):
            loss = model(**b).loss
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        losses.append(float(loss.detach()))
    return losses


def test_refuses_without_cuda():
    model, params = _model("cpu")
    opt = torch.optim.AdamW(params, lr=1e-3)
    with pytest.raises(ValueError, match="CUDA"):
        GraphedTrainStep(model, opt, _batch(64, 2, 512, "cpu", 0))


@pytest.fixture
def lora_in_gemm_k(request, monkeypatch):
    from rustforge.model import moe

    monkeypatch.setattr(moe, "LORA_IN_GEMM_K", request.param)
    return request.param


@pytest.mark.gpu
@gpu
@pytest.mark.parametrize("attention", ["flex", "triton"])
@pytest.mark.parametrize("lora_in_gemm_k", [False, True], indirect=True)
def test_replays_equal_eager_steps(attention, lora_in_gemm_k):
    batch, other, moved = _batch(256, 2, 512, "cuda", 0), _batch(256, 2, 512, "cuda", 1), _batch(256, 4, 512, "cuda", 2)
    eager_model, eager_params = _model("cuda", attention)
    eager = _eager_losses(eager_model, eager_params, (batch, batch, batch, other, moved))
    model, params = _model("cuda", attention)
    with pytest.raises(ValueError, match="capturable"):
        GraphedTrainStep(model, torch.optim.AdamW(params, lr=1e-3, fused=True), batch)
    opt = torch.optim.AdamW(params, lr=1e-3, fused=True, capturable=True)
    step = GraphedTrainStep(model, opt, batch, warmup_steps=2)  # its two eager warm-up steps are undone
    graphed = [float(step.replay()), float(step.replay()), float(step.replay()), float(step.replay(other)),
               float(step.replay(moved))]
    torch.testing.assert_close(torch.tensor(graphed), torch.tensor(eager), rtol=2e-3, atol=2e-3)
    for a, b in zip(params, eager_params):
        torch.testing.assert_close(a, b, rtol=2e-3, atol=2e-3)
    with pytest.raises(ValueError, match="shape"):
        step.replay(_batch(128, 2, 512, "cuda", 3))


@pytest.mark.gpu
@gpu
@pytest.mark.parametrize("variant", ["triton_attention", "lora_in_gemm_k"])
def test_the_fast_variants_train_like_the_default_path(variant, monkeypatch):
    """Eager AdamW steps with model/triton_attention.py's kernels (against flex) or moe.LORA_IN_GEMM_K (against the
    default expert LoRA): the same losses step by step up to bf16 rounding, and LoRA weights within what AdamW's
    sign-like steps make of that rounding (a parameter whose gradient is near zero may step either way each step:
    up to 2 x lr x steps = 0.01 apart; measured 0.004-0.006 on an H100, run 19)."""
    from rustforge.model import moe

    batches = [_batch(256, 2, 512, "cuda", 0)] * 3 + [_batch(256, 4, 512, "cuda", 1)] * 2
    runs = []
    for fast in (False, True):
        monkeypatch.setattr(moe, "LORA_IN_GEMM_K", fast and variant == "lora_in_gemm_k")
        model, params = _model("cuda", "triton" if fast and variant == "triton_attention" else "flex")
        runs.append((_eager_losses(model, params, batches), params))
    (want, want_params), (got, got_params) = runs
    torch.testing.assert_close(torch.tensor(got), torch.tensor(want), rtol=2e-3, atol=2e-3)
    for a, b in zip(got_params, want_params):
        torch.testing.assert_close(a, b, rtol=0, atol=1e-2)


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


def test_a_new_layouts_document_spans_are_copied_in_place():
    from rustforge.model.attention import build_attention_masks
    from rustforge.train.graphed_step import _copy_mask

    captured = build_attention_masks(torch.zeros(1, 64, dtype=torch.long), 8, "triton")
    fresh = build_attention_masks((torch.arange(64) // 16)[None], 8, "triton")
    starts = captured["sliding_attention"].starts
    for layer_type in captured:
        _copy_mask(captured[layer_type], fresh[layer_type], layer_type)
    assert captured["sliding_attention"].starts is starts and captured["full_attention"].starts is starts
    assert torch.equal(starts, fresh["full_attention"].starts)
    assert torch.equal(captured["full_attention"].ends, fresh["full_attention"].ends)


# ------------------------------------------------------------------------------------ the SFT loop's option
STEPS_PER_PHASE = 3


def _trainer(tmp_path, device: str, cuda_graph: bool, trainer_class=None, train_cfg=None, trainer_kwargs=None,
             dtype="auto", **model_settings):
    """SFTTrainer on the tiny model with a fixed synthetic packed dataset: two phases (128 then 256 tokens),
    two micro-batches a step, the expert monitor every 2 steps."""
    from rustforge.config import CurriculumPhase, ExpertMonitorConfig, PackingConfig, TrainConfig
    from rustforge.data.packing import PackedDataset, collate, pack_documents
    from rustforge.train.sft import DatasetBatches, SFTTrainer, StageData

    vocab = 256
    gen = torch.Generator().manual_seed(1234)
    docs = [torch.randint(1, vocab, (int(n),), generator=gen).tolist() for n in torch.randint(8, 180, (64,), generator=gen)]
    model = build_model(ModelConfig(preset="tiny", dtype=dtype, loss_chunk_size=64, router_aux_loss_coef=0.01,
                                    **model_settings),
                        LoraConfig(r=4, alpha=8), vocab_size=vocab, device=device)  # fmt: skip
    cfg = train_cfg or TrainConfig(
        lr=3e-3, warmup_steps=2, batch_size=2, grad_accum=2, max_grad_norm=0.5, eval_every=2, eval_batches=2,
        save_every=2, seed=0, cuda_graph=cuda_graph,
        phases=[CurriculumPhase(128, STEPS_PER_PHASE), CurriculumPhase(256, STEPS_PER_PHASE)],
    )  # fmt: skip

    def train(phase: int, n: int):
        return DatasetBatches(PackedDataset(docs[8:], n, PackingConfig(split_overlap=8), pad_id=0, seed=phase), cfg.batch_size)

    def validation(n: int):
        packed = pack_documents(docs[:8], n, PackingConfig(split_overlap=8), seed=0)
        return [collate([packed.sequence(i)], n, 0) for i in range(min(len(packed), 2))]

    trainer_class = trainer_class or SFTTrainer
    return trainer_class(model, LoraConfig(r=4, alpha=8), cfg, StageData(train, validation), tmp_path,
                         torch.device(device), progress=False, monitor_cfg=ExpertMonitorConfig(every_steps=2),
                         **(trainer_kwargs or {}))


def test_the_sft_option_refuses_what_it_cannot_graph(tmp_path):
    from rustforge.config import IpoConfig
    from rustforge.train.ipo import IpoTrainer

    with pytest.raises(ValueError, match=r"lang_rust\.cuda_graph: it needs a CUDA device"):
        _trainer(tmp_path, "cpu", True)
    with pytest.raises(ValueError, match=r"model\.gradient_checkpointing is on"):
        _trainer(tmp_path, "cpu", True, gradient_checkpointing=True)
    with pytest.raises(ValueError, match=r"model\.dtype must be bfloat16"):  # auto = float32 on a CPU
        _trainer(tmp_path, "cpu", True)
    with pytest.raises(ValueError, match=r"ipo\.cuda_graph: the ipo stage's step is not graphed"):
        _trainer(tmp_path, "cpu", True, trainer_class=IpoTrainer, train_cfg=IpoConfig(cuda_graph=True),
                 trainer_kwargs={"ipo_cfg": IpoConfig()})
    _trainer(tmp_path, "cpu", False)  # the default builds


def test_make_capturable_readies_an_optimizer_state_saved_without_a_graph():
    """A run resumed with cuda_graph on from a checkpoint written without it: load_state_dict brings back
    capturable False and a float learning rate; make_capturable turns it into what a captured step needs."""
    from rustforge.train.graphed_step import make_capturable

    params = [torch.nn.Parameter(torch.randn(3, 2))]
    eager = torch.optim.AdamW(params, lr=1e-3)
    params[0].grad = torch.ones_like(params[0])
    eager.step()
    resumed = torch.optim.AdamW(params, lr=torch.tensor(1e-3), capturable=True)
    resumed.load_state_dict(eager.state_dict())
    assert not resumed.param_groups[0]["capturable"] and not torch.is_tensor(resumed.param_groups[0]["lr"])
    make_capturable(resumed, torch.device("cpu"))
    group = resumed.param_groups[0]
    assert group["capturable"] and torch.is_tensor(group["lr"]) and float(group["lr"]) == pytest.approx(1e-3)
    step = resumed.state[params[0]]["step"]
    assert step.dtype == torch.float32 and step.device == params[0].device and float(step) == 1.0


def _logged(stage_dir, split: str = "train") -> dict[int, dict]:
    from rustforge.train.metrics import read_metrics

    return read_metrics(stage_dir / "logs" / "metrics.jsonl", split)


@pytest.mark.gpu
@gpu
def test_the_sft_loop_graphed_logs_the_eager_loops_numbers(tmp_path):
    eager = _trainer(tmp_path / "eager", "cuda", False)
    eager.run()
    graphed = _trainer(tmp_path / "graphed", "cuda", True)
    graphed.run(stop_after=4)  # into the second phase (a second capture), checkpoint at step 4
    del graphed
    torch.cuda.empty_cache()
    resumed = _trainer(tmp_path / "graphed", "cuda", True)
    resumed.run(resume=True)
    want, got = _logged(tmp_path / "eager"), _logged(tmp_path / "graphed")
    assert sorted(got) == sorted(want) == list(range(1, 2 * STEPS_PER_PHASE + 1))
    for step in want:
        for key in ("loss", "aux_loss", "grad_norm", "lr", "seq_len"):
            torch.testing.assert_close(got[step][key], want[step][key], rtol=2e-3, atol=1e-5, msg=f"step {step} {key}")
    val_want, val_got = _logged(tmp_path / "eager", "val"), _logged(tmp_path / "graphed", "val")
    for step in val_want:
        torch.testing.assert_close(val_got[step]["loss"], val_want[step]["loss"], rtol=2e-3, atol=1e-5)
    experts_want, experts_got = _logged(tmp_path / "eager", "experts"), _logged(tmp_path / "graphed", "experts")
    assert sorted(experts_got) == sorted(experts_want) and experts_want
    for step in experts_want:
        for key, value in experts_want[step].items():
            if key.startswith("experts/") and key.endswith("load_cv_max"):
                torch.testing.assert_close(experts_got[step][key], value, rtol=2e-2, atol=1e-3)
