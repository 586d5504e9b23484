"""QAT: the fake-quantised experts against transformers' experts on quantised weights (forward and
straight-through gradients), and the stage on the tiny run: merge check, metrics, exact resume, and the
export of its result holding exactly the weights QAT evaluated."""

from __future__ import annotations

import copy
import json
import shutil
from pathlib import Path

import pytest
import torch
from transformers import GptOssConfig
from transformers.models.gpt_oss.modeling_gpt_oss import GptOssExperts

from rustforge.config import LoraConfig, ModelConfig, QatConfig, RunConfig, from_dict
from rustforge.model.lora import save_adapter
from rustforge.model.quant import mxfp4_fake_quantize_values, nvfp4_fake_quant
from rustforge.train.qat import (
    QatExperts,
    expert_lora_config,
    fake_quant_disabled,
    install_qat_experts,
)

E, H, I = 4, 64, 32


def _experts(seed: int = 0) -> GptOssExperts:
    cfg = GptOssConfig(hidden_size=H, intermediate_size=I, num_local_experts=E, num_experts_per_tok=2, num_hidden_layers=1)
    cfg._experts_implementation = "eager"  # transformers' own per-expert loop
    experts = GptOssExperts(cfg)
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in experts.parameters():
            p.copy_(torch.randn(p.shape, generator=gen) * 0.1)
    return experts


def _routing(n: int = 24, seed: int = 1):
    gen = torch.Generator().manual_seed(seed)
    hidden = torch.randn(n, H, generator=gen)
    indices = torch.stack([torch.randperm(E, generator=gen)[:2] for _ in range(n)])
    weights = torch.softmax(torch.randn(n, 2, generator=gen), -1)
    return hidden, indices, weights


def _quantised(weight: torch.Tensor, fmt: str) -> torch.Tensor:
    """[E, in, out] -> per-expert quantise-dequantise along `in` (as the export stores it)."""
    if fmt == "mxfp4":
        return mxfp4_fake_quantize_values(weight.transpose(1, 2), scale_rounding="gpt-oss").transpose(1, 2)
    return torch.stack([nvfp4_fake_quant(w.t()).t() for w in weight])


@pytest.mark.parametrize("fmt", ["mxfp4", "nvfp4"])
def test_qat_experts_forward_and_straight_through_gradients(fmt):
    source = _experts()
    qat = QatExperts.from_experts(source, fmt, "gpt-oss")
    qat.gate_up_proj.requires_grad_(True)
    qat.down_proj.requires_grad_(True)
    # reference: transformers' module holding the quantised weights as leaves
    reference = copy.deepcopy(source)
    with torch.no_grad():
        reference.gate_up_proj.copy_(_quantised(source.gate_up_proj, fmt))
        reference.down_proj.copy_(_quantised(source.down_proj, fmt))
    hidden, indices, weights = _routing()
    hidden_q, hidden_r = hidden.clone().requires_grad_(), hidden.clone().requires_grad_()
    out, expected = qat(hidden_q, indices, weights), reference(hidden_r, indices, weights)
    torch.testing.assert_close(out, expected, rtol=1e-5, atol=1e-6)
    upstream = torch.randn_like(out)
    out.backward(upstream)
    expected.backward(upstream)
    # STE: the master weights get exactly the gradient the quantised weights would get
    torch.testing.assert_close(qat.gate_up_proj.grad, reference.gate_up_proj.grad, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(qat.down_proj.grad, reference.down_proj.grad, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(hidden_q.grad, hidden_r.grad, rtol=1e-5, atol=1e-6)
    with fake_quant_disabled(qat):  # the unquantised function is transformers' on the master weights
        torch.testing.assert_close(qat(hidden, indices, weights), source(hidden, indices, weights), rtol=1e-5, atol=1e-6)
    assert qat.fake_quant_enabled


def test_qat_lora_mode_quantises_weight_plus_delta():
    source = _experts()
    qat = QatExperts.from_experts(source, "mxfp4", "gpt-oss")
    from rustforge.model.moe import add_expert_lora

    add_expert_lora(qat, 4, 8.0, ["gate_up_proj", "down_proj"])
    with torch.no_grad():
        qat.lora_gate_up_B.normal_(0, 0.05)
        qat.lora_down_B.normal_(0, 0.05)
    merged = source.gate_up_proj + 2.0 * qat.lora_gate_up_A @ qat.lora_gate_up_B
    assert torch.equal(qat.expert_weight("gate_up_proj", 1).detach(), _quantised(merged.detach(), "mxfp4")[1])
    hidden, indices, weights = _routing()
    qat(hidden, indices, weights).square().sum().backward()
    assert qat.lora_gate_up_A.grad.abs().sum() > 0 and qat.lora_down_B.grad.abs().sum() > 0
    assert qat.gate_up_proj.grad is None  # frozen in lora mode


# ----------------------------------------------------------------------------- the stage on a run
def _qat_run(tiny_base, name: str, **qat_overrides) -> RunConfig:
    """A run dir with the tiny base and a random lang_rust adapter, and a few-step QAT config."""
    from rustforge.model.base import build_model

    cfg_dict, root = tiny_base
    run_dir = root / name
    shutil.rmtree(run_dir, ignore_errors=True)
    run_dir.mkdir()
    shutil.copytree(root / "run" / "base", run_dir / "base")
    qat = {"lr": 1.0e-4, "warmup_steps": 1, "batch_size": 2, "phases": [{"seq_len": 128, "steps": 4}],
           "eval_every": 2, "save_every": 2, **qat_overrides}  # fmt: skip
    lang_rust = {**cfg_dict["lang_rust"], "eval_batches": 1}  # QAT validates on lang_rust's batches
    cfg = from_dict(RunConfig, {**cfg_dict, "run_dir": str(run_dir), "lang_rust": lang_rust, "qat": qat,
                                "export": {"probe_tokens": 64}})  # fmt: skip
    adapter_dir = run_dir / "lang_rust" / "adapter"
    if not (root / "adapter").is_dir():  # one random adapter shared by every test run
        model = build_model(ModelConfig(path=str(run_dir / "base"), dtype="float32"), cfg.lora)
        gen = torch.Generator().manual_seed(3)
        with torch.no_grad():
            for param_name, p in model.named_parameters():
                if param_name.endswith("_B"):  # LoRA B starts at zero: give the adapter an effect
                    p.normal_(0, 0.02, generator=gen)
        save_adapter(model.hf, cfg.lora, root / "adapter")
    shutil.copytree(root / "adapter", adapter_dir)
    return cfg


def test_qat_stage_resumes_exactly_and_exports_what_it_evaluated(tiny_base):
    from safetensors.torch import load_file

    from rustforge.export.hf import export_run, load_export
    from rustforge.train import qat
    from rustforge.train.metrics import read_metrics

    straight = _qat_run(tiny_base, "qat_straight")
    result = qat.run(straight, progress=False)
    assert result["steps"] == 4 and set(result) >= {"val_loss_ptq", "val_loss_qat", "val_loss_bf16_start"}
    val = read_metrics(Path(straight.run_dir) / "qat" / "logs" / "metrics.jsonl", "val")
    assert sorted(val) == [0, 2, 4] and all(r["loss"] != r["loss_bf16"] for r in val.values())
    info = json.loads((qat.result_dir(straight) / "qat.json").read_text())
    assert info["merge_check"]["kl_merged_vs_base_plus_adapter"] < 1e-9 and info["trainable"] == "experts"

    resumed = _qat_run(tiny_base, "qat_resumed")
    qat.run(resumed, progress=False, stop_after=3)  # checkpoint at step 2, the third step is redone
    assert not qat.is_complete(qat.result_dir(resumed))
    qat.run(resumed, resume=True, progress=False)
    a = load_file(str(qat.result_dir(straight) / "experts.safetensors"))
    b = load_file(str(qat.result_dir(resumed) / "experts.safetensors"))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)

    # export picks the QAT result; its experts are exactly the quantised QAT weights
    out = export_run(straight, "mxfp4")
    report = json.loads((out / "export_report.json").read_text())
    assert report["source"] == str(qat.result_dir(straight)) and report["trainable"] == "experts"
    name = "model.layers.2.mlp.experts.down_proj"
    exported = load_export(out).state_dict()[name]
    assert torch.equal(exported, _quantised(a[name], "mxfp4"))


def test_qat_refuses_a_base_adapter_that_does_not_merge(tiny_base):
    from rustforge.train import qat

    cfg = _qat_run(tiny_base, "qat_missing", source="core_agent")
    with pytest.raises(FileNotFoundError, match="export.source: no adapter at .*core_agent"):
        qat.run(cfg, progress=False)


def test_install_qat_experts_trains_only_what_it_should():
    from transformers import GptOssForCausalLM

    from rustforge.model.presets import get_preset, hf_config

    cfg = hf_config(get_preset("tiny"), vocab_size=64)
    cfg.num_hidden_layers, cfg.layer_types = 1, cfg.layer_types[:1]
    model = GptOssForCausalLM(cfg)
    install_qat_experts(model, QatConfig(trainable="lora"), "gpt-oss", expert_lora_config(LoraConfig(r=2)), seed=0)
    assert sorted(n.rsplit(".", 1)[-1] for n, p in model.named_parameters() if p.requires_grad) == [
        "lora_down_A", "lora_down_B", "lora_gate_up_A", "lora_gate_up_B"]  # fmt: skip
    install_qat_experts(model, QatConfig(trainable="experts"), "gpt-oss", LoraConfig(), seed=0)
    assert sorted(n for n, p in model.named_parameters() if p.requires_grad) == [
        "model.layers.0.mlp.experts.down_proj", "model.layers.0.mlp.experts.gate_up_proj"]  # fmt: skip
    with pytest.raises(ValueError, match="qat.trainable must be one of"):
        QatConfig(trainable="all")
