"""LoRA on GPT-OSS and its PEFT adapter format, checked against PEFT itself on the tiny model."""

from __future__ import annotations

import copy
import json

import peft
import pytest
import torch
from safetensors.torch import load_file, save_file
from transformers import GptOssForCausalLM

from rustforge.config import LoraConfig
from rustforge.model.lora import (
    LoraLinear,
    apply_lora,
    load_adapter,
    lora_disabled,
    lora_projections,
    lora_state_dict_peft,
    peft_adapter_config,
    save_adapter,
)
from rustforge.model.moe import GroupedExperts, ReferenceLoraExperts, install_experts
from rustforge.model.presets import get_preset, hf_config

VOCAB = 512
ALL_TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_up_proj", "down_proj"]


def _base_model(seed: int = 0, layers: int = 2) -> GptOssForCausalLM:
    cfg = hf_config(get_preset("tiny"), vocab_size=VOCAB)
    cfg.num_hidden_layers, cfg.layer_types = layers, cfg.layer_types[:layers]
    cfg._attn_implementation = "eager"
    torch.manual_seed(seed)
    return GptOssForCausalLM(cfg).float().eval()


def _randomize_lora(model, seed: int = 1) -> None:
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_" in name:
                p.copy_(torch.randn(p.shape, generator=gen) * 0.05)


def _ids():
    return torch.randint(0, VOCAB, (2, 16), generator=torch.Generator().manual_seed(3))


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """(base copy, our LoRA model with random A and B, saved adapter dir, lora config)."""
    base = _base_model()
    pristine = copy.deepcopy(base)
    cfg = LoraConfig(r=4, alpha=8.0)
    apply_lora(base, cfg)
    _randomize_lora(base)
    directory = save_adapter(base, cfg, tmp_path_factory.mktemp("adapters") / "adapter", "tiny-gpt-oss")
    return pristine, base, directory, cfg


# ----------------------------------------------------------------------------------------- apply
def test_apply_lora_freezes_base_wraps_targets_and_starts_at_identity():
    base = _base_model()
    want = base(_ids()).logits
    torch.manual_seed(11)
    apply_lora(base, LoraConfig(r=4, alpha=8.0))
    trainable = {n for n, p in base.named_parameters() if p.requires_grad}
    assert trainable and all("lora_" in n for n in trainable)
    layer = base.model.layers[0]
    assert isinstance(layer.self_attn.q_proj, LoraLinear) and isinstance(layer.mlp.experts, ReferenceLoraExperts)
    assert layer.mlp.experts.lora_gate_up_A.shape == (8, 256, 4) and layer.mlp.experts.lora_down_B.shape == (8, 4, 256)
    torch.testing.assert_close(base(_ids()).logits, want, rtol=1e-5, atol=1e-5)  # B = 0; loop vs grouped_mm order
    assert torch.count_nonzero(layer.self_attn.q_proj.lora_A) > 0


def test_init_is_seeded_and_independent_of_the_experts_module():
    states = []
    for impl in ("reference", "grouped"):
        model = _base_model()
        install_experts(model, impl)
        torch.manual_seed(5)
        apply_lora(model, LoraConfig(r=4, alpha=8.0))
        assert isinstance(
            model.model.layers[0].mlp.experts, ReferenceLoraExperts if impl == "reference" else GroupedExperts
        )
        states.append({k: v for k, v in model.state_dict().items() if "lora_" in k})
    assert states[0].keys() == states[1].keys() and len(states[0]) == 2 * (4 * 2 + 4)
    for key in states[0]:
        torch.testing.assert_close(states[0][key], states[1][key], rtol=0, atol=0)


def test_apply_lora_rejects_bad_config():
    with pytest.raises(ValueError, match="lora.targets.*mlp"):
        apply_lora(_base_model(layers=1), LoraConfig(targets=["mlp"]))
    with pytest.raises(ValueError, match="lora.r"):
        apply_lora(_base_model(layers=1), LoraConfig(r=0))


def test_lora_linear_dropout_only_in_training():
    torch.manual_seed(0)
    lin = LoraLinear(torch.nn.Linear(16, 8), r=2, alpha=4.0, dropout=0.5)
    torch.nn.init.normal_(lin.lora_B)
    x = torch.randn(4, 16)
    lin.eval()
    want = lin.base_layer(x) + (x @ lin.lora_A.T @ lin.lora_B.T) * 2.0
    torch.testing.assert_close(lin(x), want)
    lin.train()
    assert not torch.allclose(lin(x), want)


# ------------------------------------------------------------------------------------------ PEFT
@pytest.mark.parametrize(
    "targets",
    [ALL_TARGETS, ["q_proj", "gate_up_proj"], ["down_proj"], ["k_proj", "o_proj"]],
)
def test_state_dict_keys_and_shapes_are_peft_exact(targets):
    ours = _base_model(layers=1)
    apply_lora(ours, LoraConfig(r=4, alpha=8.0, targets=targets))
    config = peft_adapter_config(LoraConfig(r=4, alpha=8.0, targets=targets))
    peft_cfg = peft.LoraConfig(
        r=4,
        lora_alpha=8,
        target_modules=config["target_modules"],
        target_parameters=config["target_parameters"],
        task_type="CAUSAL_LM",
    )
    theirs = peft.get_peft_model(_base_model(layers=1), peft_cfg)
    want = {k: tuple(v.shape) for k, v in peft.get_peft_model_state_dict(theirs).items()}
    got = {k: tuple(v.shape) for k, v in lora_state_dict_peft(ours).items()}
    assert got == want


def test_peft_loads_our_adapter_with_identical_logits(trained):
    pristine, ours, directory, _ = trained
    config = json.loads((directory / "adapter_config.json").read_text())
    assert config["peft_type"] == "LORA" and config["r"] == 4 and config["lora_alpha"] == 8
    assert config["target_parameters"] == ["mlp.experts.gate_up_proj", "mlp.experts.down_proj"]
    assert config["base_model_name_or_path"] == "tiny-gpt-oss"
    theirs = peft.PeftModel.from_pretrained(copy.deepcopy(pristine), str(directory)).eval()
    ids = _ids()
    with torch.no_grad():
        want = theirs(ids).logits
        got = ours(ids).logits
        assert (got - pristine(ids).logits).abs().max() > 1e-2  # the adapter changes the model
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
    grouped = copy.deepcopy(ours)
    install_experts(grouped, "grouped")
    with torch.no_grad():
        torch.testing.assert_close(grouped(ids).logits, want, rtol=1e-5, atol=1e-5)


def test_peft_delta_weight_equals_our_expert_delta(trained):
    pristine, ours, directory, cfg = trained
    theirs = peft.PeftModel.from_pretrained(copy.deepcopy(pristine), str(directory))
    for layer_ours, layer_theirs in zip(ours.model.layers, theirs.base_model.model.model.layers):
        experts = layer_ours.mlp.experts
        down_wrapper = layer_theirs.mlp.experts  # nested ParamWrappers: down_proj outside gate_up_proj
        gate_up_wrapper = down_wrapper.base_layer
        assert (down_wrapper.parameter_name, gate_up_wrapper.parameter_name) == ("down_proj", "gate_up_proj")
        for wrapper, name_A, name_B in (
            (gate_up_wrapper, "lora_gate_up_A", "lora_gate_up_B"),
            (down_wrapper, "lora_down_A", "lora_down_B"),
        ):
            A, B = getattr(experts, name_A), getattr(experts, name_B)
            ours_delta = torch.stack([A[e] @ B[e] for e in range(experts.num_experts)]) * cfg.alpha / cfg.r
            torch.testing.assert_close(wrapper.get_delta_weight("default"), ours_delta, rtol=1e-5, atol=1e-7)


def test_round_trip_into_our_model(trained):
    _, ours, directory, cfg = trained
    other = _base_model()
    install_experts(other, "grouped")
    torch.manual_seed(99)
    apply_lora(other, cfg)
    load_adapter(other, directory)
    want = lora_state_dict_peft(ours)
    got = lora_state_dict_peft(other)
    assert got.keys() == want.keys()
    for key in want:
        torch.testing.assert_close(got[key], want[key], rtol=0, atol=0)
    with torch.no_grad():
        torch.testing.assert_close(other(_ids()).logits, ours(_ids()).logits, rtol=1e-5, atol=1e-5)


def test_save_replaces_existing_directory_atomically(trained, tmp_path):
    _, ours, _, cfg = trained
    target = tmp_path / "adapter"
    target.mkdir()
    (target / "stale.txt").write_text("old")
    save_adapter(ours, cfg, target)
    assert sorted(p.name for p in target.iterdir()) == ["adapter_config.json", "adapter_model.safetensors"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["adapter"]  # no temporary left behind
    with pytest.raises(ValueError, match="lora.targets"):
        save_adapter(ours, LoraConfig(r=4, alpha=8.0, targets=["q_proj"]), tmp_path / "wrong")


def test_dropout_is_recorded_only_without_expert_targets():
    assert peft_adapter_config(LoraConfig(dropout=0.1))["lora_dropout"] == 0.0
    attn_only = peft_adapter_config(LoraConfig(dropout=0.1, targets=["q_proj", "v_proj"]))
    assert attn_only["lora_dropout"] == 0.1 and attn_only["target_parameters"] is None
    assert attn_only["target_modules"] == ["q_proj", "v_proj"]


def _corrupt(directory, tmp_path, edit):
    bad = tmp_path / "bad"
    bad.mkdir()
    (bad / "adapter_config.json").write_text((directory / "adapter_config.json").read_text())
    tensors = load_file(str(directory / "adapter_model.safetensors"))
    edit(tensors)
    save_file(tensors, str(bad / "adapter_model.safetensors"))
    return bad


def test_load_adapter_errors_name_file_and_key(trained, tmp_path):
    _, ours, directory, _ = trained
    key = "base_model.model.model.layers.1.mlp.experts.base_layer.lora_B.weight"
    model = copy.deepcopy(ours)

    bad = _corrupt(directory, tmp_path, lambda t: t.__setitem__(key, t[key][:, :-1].clone()))
    with pytest.raises(ValueError, match=rf"adapter_model.safetensors.*{key}.*shape"):
        load_adapter(model, bad)

    (tmp_path / "bad2").mkdir()
    bad2 = _corrupt(directory, tmp_path / "bad2", lambda t: t.pop(key))
    with pytest.raises(KeyError, match=rf"adapter_model.safetensors.*missing key.*{key}"):
        load_adapter(model, bad2)

    config_path = bad2 / "adapter_config.json"
    config_path.write_text(json.dumps({**json.loads(config_path.read_text()), "use_dora": True}))
    with pytest.raises(ValueError, match=r"adapter_config.json.*use_dora"):
        load_adapter(model, bad2)
    with pytest.raises(FileNotFoundError, match="adapter_config.json"):
        load_adapter(model, tmp_path / "nowhere")


# ------------------------------------------------------------------ the fused projection autograd
def _projection(d_in: int, d_out: int, bias: bool, rank: int | None, seed: int, dtype=torch.float64):
    torch.manual_seed(seed)
    linear = torch.nn.Linear(d_in, d_out, bias=bias, dtype=dtype).requires_grad_(False)
    if rank is None:
        return linear
    lora = LoraLinear(linear, r=rank, alpha=2 * rank)
    with torch.no_grad():
        lora.lora_B.normal_()
    return lora.to(dtype)


def _reference(module, x):
    return module.reference_forward(x) if isinstance(module, LoraLinear) else module(x)


@pytest.mark.parametrize("layout", [[(True, 4)], [(True, 4), (False, 2), (True, None)], [(False, None), (True, 3)]])
def test_lora_projections_equal_the_peft_expression_with_gradients(layout):
    # (bias, rank or None for a plain nn.Linear) per projection; outputs of different widths
    modules = [_projection(12, 8 + 4 * i, bias, rank, seed=i) for i, (bias, rank) in enumerate(layout)]
    x = torch.randn(2, 5, 12, dtype=torch.float64, requires_grad=True)
    params = [x] + [p for m in modules for p in m.parameters() if p.requires_grad]
    got = lora_projections(x, modules)
    want = [_reference(m, x) for m in modules]
    grads_out = [torch.randn_like(w) for w in want]
    got_grads = torch.autograd.grad(got, params, grads_out)
    want_grads = torch.autograd.grad(want, params, grads_out)
    for a, b in zip((*got, *got_grads), (*want, *want_grads)):
        torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-10)


def test_lora_projections_under_autocast_and_with_lora_disabled():
    q, v = _projection(16, 16, True, 4, seed=0, dtype=torch.float32), _projection(16, 8, True, 4, seed=1, dtype=torch.float32)
    x = torch.randn(7, 16)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        got = lora_projections(x, [q, v])
        want = [q.reference_forward(x), v.reference_forward(x)]
    assert all(g.dtype == torch.bfloat16 for g in got)
    for a, b in zip(got, want):  # one bf16 rounding (ours) against three (scale, add, cast)
        torch.testing.assert_close(a.float(), b.float(), rtol=2e-2, atol=2e-2)
    with lora_disabled(torch.nn.ModuleList([q, v])):
        base = lora_projections(x, [q, v])
    torch.testing.assert_close(base[0], q.base_layer(x))


@pytest.mark.parametrize("experts", ["reference", "grouped"])
def test_merge_lora_leaves_the_model_it_merges_untouched(experts):
    """merge_lora adds the deltas to base_state_dict's tensors in place: they must be copies even where the dtype
    already matches (float32 here), else the merge writes W + delta into the model being trained."""
    from rustforge.model.lora import merge_lora

    model = _base_model()
    if experts == "grouped":
        install_experts(model, "grouped", "bf16", None)
    apply_lora(model, LoraConfig(r=4, alpha=8, targets=ALL_TARGETS))
    _randomize_lora(model)
    before = {n: t.detach().clone() for n, t in model.state_dict().items()}
    merged = merge_lora(model, torch.float32)
    after = model.state_dict()
    assert all(torch.equal(after[n], t) for n, t in before.items()), [n for n, t in before.items()
                                                                      if not torch.equal(after[n], t)][:5]
    q = "model.layers.0.self_attn.q_proj.weight"
    assert not torch.equal(merged.state_dict()[q], before["model.layers.0.self_attn.q_proj.base_layer.weight"])
