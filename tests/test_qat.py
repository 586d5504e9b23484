"""QAT: the fake-quantised experts against transformers' experts on quantised weights (forward and
straight-through gradients), the grouped-GEMM experts against that reference loop, and the stage on the
tiny run: merge check, metrics, exact resume, the export of its result holding exactly the weights QAT
evaluated, the same losses on either experts path, and the core_agent / mixed data."""

from __future__ import annotations

import copy
import json
import shutil
from dataclasses import replace
from pathlib import Path

import pytest
import torch
from transformers import GptOssConfig
from transformers.models.gpt_oss.modeling_gpt_oss import GptOssExperts

from rustforge.config import CurriculumPhase, LoraConfig, ModelConfig, QatConfig, RunConfig, from_dict
from rustforge.model.lora import save_adapter
from rustforge.model.moe import add_expert_lora, lora_param_names
from rustforge.model.quant import mxfp4_fake_quantize_values, nvfp4_fake_quant
from rustforge.train.qat import (
    GroupedQatExperts,
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


def _routing(n: int = 24, seed: int = 1, used_experts: int = E):
    gen = torch.Generator().manual_seed(seed)
    hidden = torch.randn(n, H, generator=gen)
    indices = torch.stack([torch.randperm(used_experts, generator=gen)[:2] for _ in range(n)])
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


def _qat_pair(fmt: str, trainable: str) -> tuple[QatExperts, GroupedQatExperts]:
    """The reference loop and the grouped module on the same masters (and the same non-zero LoRA)."""
    source = _experts()
    pair = (QatExperts.from_experts(source, fmt, "gpt-oss"), GroupedQatExperts.from_experts(source, fmt, "gpt-oss"))
    for module in pair:
        if trainable == "experts":
            module.gate_up_proj.requires_grad_(True)
            module.down_proj.requires_grad_(True)
        else:
            torch.manual_seed(5)
            add_expert_lora(module, 4, 8.0, ["gate_up_proj", "down_proj"])
            gen = torch.Generator().manual_seed(6)
            with torch.no_grad():  # LoRA B starts at zero: give the delta an effect
                module.lora_gate_up_B.normal_(0, 0.05, generator=gen)
                module.lora_down_B.normal_(0, 0.05, generator=gen)
    return pair


@pytest.mark.parametrize("trainable", ["experts", "lora"])
@pytest.mark.parametrize("fmt", ["mxfp4", "nvfp4"])
def test_grouped_qat_experts_equal_the_reference_loop(fmt, trainable):
    reference, grouped = _qat_pair(fmt, trainable)
    # the stack quantised at once is, expert by expert, exactly the reference's per-expert weight
    for proj in ("gate_up_proj", "down_proj"):
        with torch.no_grad():
            stack = grouped.forward_weights(proj)
        for e in range(E):
            assert torch.equal(stack[e], reference.expert_weight(proj, e).detach()), (proj, e)
    hidden, indices, weights = _routing(n=24, used_experts=E - 1)  # expert E-1 gets no token
    upstream = torch.randn(24, H, generator=torch.Generator().manual_seed(7))
    results = []
    for module in (reference, grouped):
        h, w = hidden.clone().requires_grad_(), weights.clone().requires_grad_()
        out = module(h, indices, w)
        out.backward(upstream)
        trained = {n: p.grad for n, p in module.named_parameters() if p.requires_grad}
        results.append((out.detach(), h.grad, w.grad, trained))
    (out_r, h_r, w_r, p_r), (out_g, h_g, w_g, p_g) = results
    close = {"rtol": 1e-5, "atol": 1e-5}
    torch.testing.assert_close(out_g, out_r, **close)
    torch.testing.assert_close(h_g, h_r, **close)
    torch.testing.assert_close(w_g, w_r, **close)
    assert p_g.keys() == p_r.keys() and len(p_g) == (2 if trainable == "experts" else 4)
    for name in p_r:
        torch.testing.assert_close(p_g[name], p_r[name], **close, msg=name)
        assert p_g[name].abs().sum() > 0 and p_g[name][E - 1].abs().sum() == 0  # the empty expert: zero
    with fake_quant_disabled(grouped), fake_quant_disabled(reference):  # loss_bf16's function too
        torch.testing.assert_close(grouped(hidden, indices, weights), reference(hidden, indices, weights), **close)


def test_reference_loop_merges_lora_in_float32_under_autocast():
    """Under autocast (bf16 on a GPU) the reference loop's W_e + scaling * A_e @ B_e is still float32, as
    StackQuantiser and the export merge it: an autocast A_e @ B_e was bf16 and moved merged elements across
    the quantiser's rounding boundaries (~2x the grouped path's gradient error on a 20b-shaped layer)."""
    reference, grouped = _qat_pair("mxfp4", "lora")
    for proj in ("gate_up_proj", "down_proj"):
        with torch.no_grad():
            stack = grouped.forward_weights(proj)  # float32 merge and quantiser
        W, (A, B) = getattr(reference, proj), (getattr(reference, n) for n in lora_param_names(proj))
        with torch.autocast("cpu", dtype=torch.bfloat16):
            for e in range(E):
                assert torch.equal(reference.expert_weight(proj, e).detach(), stack[e]), (proj, e)
            with fake_quant_disabled(reference):
                merged = reference.expert_weight(proj, 0).detach()
        assert merged.dtype == torch.float32 and torch.equal(merged, W[0] + reference.lora_scaling * A[0] @ B[0])


def test_stacked_fake_quant_scales_nvfp4_per_expert():
    from rustforge.model.quant import fake_quant

    weight = torch.randn(3, 32, 16)
    weight[1] *= 1000  # one expert's range would set everyone's tensor scale if it were shared
    stacked = fake_quant(weight, "nvfp4", dim=1, stacked=True)
    assert torch.equal(stacked, _quantised(weight, "nvfp4"))
    assert not torch.equal(fake_quant(weight, "nvfp4", dim=1), stacked)
    with pytest.raises(ValueError, match="stacked=True dim 0"):
        fake_quant(weight, "nvfp4", dim=0, stacked=True)


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


def _run_losses(cfg: RunConfig) -> tuple[list[float], list[tuple[float, float]]]:
    from rustforge.train.metrics import read_metrics

    logs = Path(cfg.run_dir) / "qat" / "logs" / "metrics.jsonl"
    train, val = read_metrics(logs, "train"), read_metrics(logs, "val")
    return [train[s]["loss"] for s in sorted(train)], [(val[s]["loss"], val[s]["loss_bf16"]) for s in sorted(val)]


@pytest.mark.parametrize("trainable", ["experts", "lora"])
def test_qat_stage_has_the_same_losses_on_either_experts_path(tiny_base, trainable):
    from rustforge.train import qat

    losses = {}
    for impl in ("reference", "grouped"):
        cfg = _qat_run(tiny_base, f"qat_{impl}_{trainable}", experts=impl, trainable=trainable,
                       phases=[{"seq_len": 128, "steps": 3}], eval_every=3, save_every=3)  # fmt: skip
        qat.run(cfg, progress=False)
        assert json.loads((qat.result_dir(cfg) / "qat.json").read_text())["experts"] == impl
        losses[impl] = _run_losses(cfg)
    (train_r, val_r), (train_g, val_g) = losses["reference"], losses["grouped"]
    assert len(train_g) == 3 and len(val_g) == 2 and val_g[-1] != val_g[0]  # it trained
    # fp32 on both paths; only the order of the sums differs (per-expert loop vs grouped rows)
    assert train_g == pytest.approx(train_r, rel=1e-5) and train_g != pytest.approx(train_r[::-1], rel=1e-5)
    assert [v for pair in val_g for v in pair] == pytest.approx([v for pair in val_r for v in pair], rel=1e-5)


# ----------------------------------------------------------------------------------------- qat.data
def _with_agent_data(cfg: RunConfig) -> RunConfig:
    """cfg whose run holds its own trajectories (where the pipeline's agent_data step leaves them) and whose
    core_agent section fits the tiny model (validation: 2 batches at seq_len 384)."""
    import random

    import test_core_agent as TC

    from rustforge.rust.trajectories import write_trajectories
    from rustforge.train.agent_data import data_file

    rng = random.Random(0)
    write_trajectories(data_file(cfg.run_dir, "trajectories", "train"), [TC.agent_conversation(rng) for _ in range(12)])
    write_trajectories(data_file(cfg.run_dir, "trajectories", "val"), [TC.agent_conversation(rng) for _ in range(3)])
    agent = replace(cfg.core_agent, batch_size=1, eval_batches=2, phases=[CurriculumPhase(384, 1)], sample_prompts=0)
    return replace(cfg, core_agent=agent)


def _same_batch(a: dict, b: dict) -> bool:
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_qat_data_core_agent_and_mix_are_core_agent_s_own_batches(tiny_base):
    from rustforge.data.tokenizer import load_tokenizer
    from rustforge.train import core_agent, qat

    cfg = _with_agent_data(_qat_run(tiny_base, "qat_data", data="mix"))
    tokenizer = load_tokenizer(Path(cfg.run_dir) / "base")
    agent = qat.stage_data(cfg, replace(cfg.qat, data="core_agent"), tokenizer)
    # what core_agent itself builds from the run's trajectories, at QAT's batch size and seed
    own_cfg = core_agent.with_run_trajectories(cfg, cfg.core_agent)
    own = core_agent.stage_data(replace(own_cfg, batch_size=2, seed=cfg.qat.seed), tokenizer).stage
    mine, theirs = agent.train(0, 384), own.train(0, 384)
    for _ in range(3):
        batch = mine.next_batch()
        assert _same_batch(batch, theirs.next_batch())
        labelled = int((batch["labels"] != -100).sum())
        assert 0 < labelled < int((batch["doc_ids"] >= 0).sum()) // 2  # the assistant's tokens only
    held_out = core_agent.stage_data(own_cfg, tokenizer).stage.validation(384)
    agent_val = agent.validation(128)  # QAT's own seq_len is not used: core_agent's held-out batches are
    assert len(agent_val) == 2 and all(_same_batch(a, b) for a, b in zip(agent_val, held_out, strict=True))

    # mix: lang_rust, core_agent, lang_rust, ... (share 0.5); resumes exactly; both held-out sets
    lang = qat.lang_rust_data(cfg, cfg.qat, tokenizer)
    mixed = qat.stage_data(cfg, cfg.qat, tokenizer)
    source, lang_train, agent_train = mixed.train(0, 384), lang.train(0, 384), agent.train(0, 384)
    for expected in (lang_train, agent_train, lang_train):
        assert _same_batch(source.next_batch(), expected.next_batch())
    resumed = mixed.train(0, 384)
    resumed.load_state_dict(source.state_dict())
    assert _same_batch(resumed.next_batch(), agent_train.next_batch())
    val = mixed.validation(384)
    assert len(val) == len(lang.validation(384)) + 2 and all(_same_batch(a, b) for a, b in zip(val[-2:], held_out))
    assert [qat.MixedBatches(lang_train, agent_train, 0.25).source_of(i) for i in range(8)] == [0, 0, 0, 1] * 2
    with pytest.raises(ValueError, match=r"qat.data='mix': core_agent conversations at qat.phases\[0\].seq_len 128"):
        mixed.train(0, 128)  # no conversation's first assistant turn fits
    with pytest.raises(ValueError, match="qat.data must be one of"):
        QatConfig(data="agent")
    with pytest.raises(ValueError, match="qat.mix_core_agent_share"):
        QatConfig(data="mix", mix_core_agent_share=1.0)


def test_qat_stage_trains_and_validates_on_the_mix(tiny_base):
    from rustforge.data.tokenizer import load_tokenizer
    from rustforge.train import qat
    from rustforge.train.metrics import read_metrics

    cfg = _with_agent_data(_qat_run(tiny_base, "qat_mix", data="mix", trainable="lora",
                                    phases=[{"seq_len": 384, "steps": 2}]))  # fmt: skip
    result = qat.run(cfg, progress=False)
    assert result["steps"] == 2 and json.loads((qat.result_dir(cfg) / "qat.json").read_text())["data"] == "mix"
    val = read_metrics(Path(cfg.run_dir) / "qat" / "logs" / "metrics.jsonl", "val")
    batches = qat.stage_data(cfg, cfg.qat, load_tokenizer(Path(cfg.run_dir) / "base")).validation(384)
    assert val[0]["tokens"] == sum(int((b["labels"] != -100).sum()) for b in batches)  # both held-out sets
    assert val[2]["loss"] != val[0]["loss"]
