"""GroupedExperts (split-LoRA grouped GEMM) vs ReferenceLoraExperts vs transformers' GptOssExperts."""

from __future__ import annotations

import copy

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten
from transformers import GptOssConfig
from transformers.models.gpt_oss.modeling_gpt_oss import GptOssExperts

from rustforge.config import LoraConfig, ModelConfig
from rustforge.model.moe import (
    GroupedExperts,
    ReferenceLoraExperts,
    _ClampedSwiGLU,
    add_expert_lora,
    grouped_mm,
    install_experts,
    native_grouped_mm_supported,
    swiglu_reference,
)

E, H, I, TOP_K, R = 6, 64, 64, 2, 8
LORA_NAMES = ("lora_gate_up_A", "lora_gate_up_B", "lora_down_A", "lora_down_B")


def _config() -> GptOssConfig:
    cfg = GptOssConfig(
        hidden_size=H, intermediate_size=I, num_local_experts=E, num_experts_per_tok=TOP_K, num_hidden_layers=1
    )
    cfg._experts_implementation = "eager"  # transformers' own per-expert loop
    return cfg


def _hf_experts(seed: int = 0) -> GptOssExperts:
    torch.manual_seed(seed)
    experts = GptOssExperts(_config())
    with torch.no_grad():
        # std 0.3 puts some gate/up pre-activations beyond the clamp limit of 7, so its gradient is covered
        experts.gate_up_proj.normal_(0, 0.3)
        experts.down_proj.normal_(0, 0.1)
        experts.gate_up_proj_bias.normal_(0, 0.5)
        experts.down_proj_bias.normal_(0, 0.5)
    return experts.requires_grad_(False)


def _randomize_lora(module, seed: int = 1) -> None:
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name in LORA_NAMES:
            p = getattr(module, name)
            p.copy_(torch.randn(p.shape, generator=gen) * 0.1)


def _routing(n: int, seed: int = 2, unused_experts: int = 2):
    """Random top-k routing that never picks the last `unused_experts` experts (zero-token groups)."""
    gen = torch.Generator().manual_seed(seed)
    logits = torch.randn(n, E, generator=gen)
    logits[:, E - unused_experts :] = -1e9
    top, idx = logits.topk(TOP_K, dim=-1)
    return idx, torch.softmax(top, dim=-1)


def _run(module, x, idx, w, grad_out):
    """Output and grads of (hidden, routing weights, LoRA params present on the module)."""
    x = x.clone().requires_grad_(True)
    w = w.clone().requires_grad_(True)
    for p in module.parameters():
        p.grad = None
    out = module(x, idx, w)
    (out.float() * grad_out).sum().backward()
    grads = {"out": out.detach(), "hidden": x.grad, "routing": w.grad}
    for name in LORA_NAMES:
        p = getattr(module, name, None)
        if p is not None:
            grads[name] = p.grad
    return grads


def _assert_close(got: dict, want: dict, rtol: float, atol_frac: float) -> None:
    assert got.keys() == want.keys()
    for key, want_value in want.items():
        scale = want_value.float().abs().max().item()
        assert scale > 0, f"{key}: reference is all zero, the comparison would be vacuous"
        torch.testing.assert_close(
            got[key].float(), want_value.float(), rtol=rtol, atol=atol_frac * scale, msg=lambda m, k=key: f"{k}: {m}"
        )


def _assert_close_lowp(got: dict, want: dict, max_rel_err: float = 0.02) -> None:
    """Low-precision comparison by relative Frobenius error: bf16 rounding moves a few pre-activations
    across the SwiGLU clamp, which flips single gradient entries but not the norm."""
    assert got.keys() == want.keys()
    for key, want_value in want.items():
        want_f, got_f = want_value.float(), got[key].float().to(want_value.device)
        assert want_f.norm() > 0, f"{key}: reference is all zero, the comparison would be vacuous"
        rel = ((got_f - want_f).norm() / want_f.norm()).item()
        assert rel < max_rel_err, f"{key}: relative error {rel:.4f} >= {max_rel_err}"


def _lora_pair(fmt: str = "bf16"):
    hf = _hf_experts()
    ref = ReferenceLoraExperts.from_module(hf, LoraConfig(r=R, alpha=16.0))
    _randomize_lora(ref)
    grouped = GroupedExperts.from_hf(ref, fmt)
    return ref, grouped


# ------------------------------------------------------------------------------------------- no LoRA
def test_reference_and_grouped_match_transformers_without_lora():
    hf = _hf_experts()
    ref = ReferenceLoraExperts.from_module(hf)
    grouped = GroupedExperts.from_hf(hf, "bf16")
    x = torch.randn(40, H, generator=torch.Generator().manual_seed(3))
    idx, w = _routing(40)
    g = torch.randn(40, H, generator=torch.Generator().manual_seed(4))
    want = _run(hf, x, idx, w, g)
    _assert_close(_run(ref, x, idx, w, g), want, rtol=1e-5, atol_frac=1e-6)
    _assert_close(_run(grouped, x, idx, w, g), want, rtol=1e-5, atol_frac=1e-6)


def test_transformers_grouped_mm_implementation_agrees_with_eager():
    # guards the assumption that the eager loop is what GptOssExperts computes by default (grouped_mm)
    hf = _hf_experts()
    x = torch.randn(30, H, generator=torch.Generator().manual_seed(3))
    idx, w = _routing(30)
    eager = hf(x, idx, w)
    hf.config._experts_implementation = "grouped_mm"
    torch.testing.assert_close(hf(x, idx, w), eager, rtol=1e-5, atol=1e-5)


# --------------------------------------------------------------------------------------------- LoRA
@pytest.mark.parametrize("n_tokens", [1, 7, 53])
def test_grouped_lora_matches_reference_forward_and_grads(n_tokens):
    ref, grouped = _lora_pair()
    x = torch.randn(n_tokens, H, generator=torch.Generator().manual_seed(5))
    idx, w = _routing(n_tokens)
    g = torch.randn(n_tokens, H, generator=torch.Generator().manual_seed(6))
    want = _run(ref, x, idx, w, g)
    got = _run(grouped, x, idx, w, g)
    assert set(want) == {"out", "hidden", "routing", *LORA_NAMES}
    _assert_close(got, want, rtol=1e-5, atol_frac=1e-6)
    # experts that received no token get exactly zero LoRA gradient
    for name in LORA_NAMES:
        assert torch.count_nonzero(got[name][E - 2 :]) == 0, name


def test_lora_changes_the_output():
    _, grouped = _lora_pair()
    plain = ReferenceLoraExperts.from_module(_hf_experts())
    x = torch.randn(20, H, generator=torch.Generator().manual_seed(5))
    idx, w = _routing(20)
    diff = (grouped(x, idx, w) - plain(x, idx, w)).abs().max()
    assert diff > 1e-2


def test_only_one_expert_projection_targeted():
    hf = _hf_experts()
    for targets in (["gate_up_proj"], ["down_proj"]):
        ref = ReferenceLoraExperts.from_module(hf, LoraConfig(r=R, alpha=8.0, targets=targets))
        gen = torch.Generator().manual_seed(1)
        with torch.no_grad():
            for name in LORA_NAMES:
                if getattr(ref, name) is not None:
                    getattr(ref, name).normal_(0, 0.1, generator=gen)
        grouped = GroupedExperts.from_hf(ref, "bf16")
        x = torch.randn(25, H, generator=torch.Generator().manual_seed(5))
        idx, w = _routing(25)
        g = torch.randn(25, H)
        want = _run(ref, x, idx, w, g)
        assert len(want) == 5
        _assert_close(_run(grouped, x, idx, w, g), want, rtol=1e-5, atol_frac=1e-6)


def test_all_tokens_on_one_expert_and_empty_batch():
    ref, grouped = _lora_pair()
    x = torch.randn(9, H)
    idx = torch.tensor([[3, 0]] * 9)
    w = torch.full((9, 2), 0.5)
    g = torch.randn(9, H)
    _assert_close(_run(grouped, x, idx, w, g), _run(ref, x, idx, w, g), rtol=1e-5, atol_frac=1e-6)
    grouped.zero_grad(set_to_none=True)
    empty = torch.zeros(0, H, requires_grad=True)
    out = grouped(empty, torch.zeros(0, TOP_K, dtype=torch.long), torch.zeros(0, TOP_K))
    out.sum().backward()
    assert out.shape == (0, H) and torch.count_nonzero(grouped.lora_gate_up_A.grad) == 0


def test_bf16_grouped_close_to_float32_reference():
    ref, _ = _lora_pair()
    ref_bf16_weights = ReferenceLoraExperts.from_module(ref)  # same LoRA, weights rounded to bf16 below
    with torch.no_grad():
        for name in ("gate_up_proj", "down_proj", "gate_up_proj_bias", "down_proj_bias"):
            p = getattr(ref_bf16_weights, name)
            p.copy_(p.to(torch.bfloat16).float())
    grouped = GroupedExperts.from_hf(ref, "bf16").to(torch.bfloat16)
    x = torch.randn(48, H, generator=torch.Generator().manual_seed(5)).to(torch.bfloat16)
    idx, w = _routing(48)
    g = torch.randn(48, H, generator=torch.Generator().manual_seed(6))
    want = _run(ref_bf16_weights, x.float(), idx, w, g)
    got = _run(grouped, x, idx, w.to(torch.bfloat16), g)
    assert got["out"].dtype == torch.bfloat16
    _assert_close_lowp(got, want)


@pytest.mark.parametrize("fmt", ["fp8", "mxfp4"])
def test_quantized_formats_match_reference_on_dequantized_weights(fmt):
    ref, _ = _lora_pair()
    grouped = GroupedExperts.from_hf(ref, fmt)
    dequant_ref = ReferenceLoraExperts.from_module(grouped)  # dequantised weights, same LoRA
    # the formats really quantise: weights differ from the originals, within the format's error
    err = (dequant_ref.gate_up_proj - ref.gate_up_proj).abs().max() / ref.gate_up_proj.abs().max()
    assert 0 < err < (0.05 if fmt == "fp8" else 0.25)  # e4m3: 3 mantissa bits; e2m1: 1
    x = torch.randn(33, H, generator=torch.Generator().manual_seed(5))
    idx, w = _routing(33)
    g = torch.randn(33, H, generator=torch.Generator().manual_seed(6))
    _assert_close(_run(grouped, x, idx, w, g), _run(dequant_ref, x, idx, w, g), rtol=1e-5, atol_frac=1e-6)


def test_quantized_storage_survives_dtype_cast_and_is_compact():
    _, grouped = _lora_pair("mxfp4")
    names = dict(grouped.named_buffers())
    assert set(names) == {"gate_up_proj_blocks", "gate_up_proj_scales", "down_proj_blocks", "down_proj_scales"}
    bits = 8 * sum(b.numel() * b.element_size() for b in names.values()) / (E * H * 2 * I + E * I * H)
    assert bits == pytest.approx(4.25)
    fp8 = GroupedExperts.from_hf(_hf_experts(), "fp8")
    before = fp8.dense_weight("gate_up_proj", torch.float32)
    fp8.to(torch.bfloat16)  # must not touch the fp8 codes or their float32 scales
    assert all(b.dtype in (torch.uint8, torch.int32) for b in fp8.buffers())
    torch.testing.assert_close(fp8.dense_weight("gate_up_proj", torch.float32), before, rtol=0, atol=0)


def test_from_mxfp4_checkpoint_tensors():
    ref, grouped = _lora_pair("mxfp4")
    loaded = GroupedExperts.from_mxfp4(
        grouped.gate_up_proj_blocks,
        grouped.gate_up_proj_scales,
        grouped.gate_up_proj_bias,
        grouped.down_proj_blocks,
        grouped.down_proj_scales,
        grouped.down_proj_bias,
        alpha=ref.alpha,
        limit=ref.limit,
        dtype=torch.float32,
        lora_cfg=LoraConfig(r=R, alpha=16.0),
    )
    torch.testing.assert_close(loaded.dense_weight("down_proj"), grouped.dense_weight("down_proj"))
    assert loaded.lora_gate_up_A.shape == (E, H, R) and torch.count_nonzero(loaded.lora_down_B) == 0
    with pytest.raises(ValueError, match="gate_up_scales"):
        GroupedExperts.from_mxfp4(
            grouped.gate_up_proj_blocks,
            grouped.gate_up_proj_scales[:, :-1],
            grouped.gate_up_proj_bias,
            grouped.down_proj_blocks,
            grouped.down_proj_scales,
            grouped.down_proj_bias,
            alpha=ref.alpha,
            limit=ref.limit,
        )


# ------------------------------------------------------------------------------------ memory shape
class _AllocationShapes(TorchDispatchMode):
    """Shapes of every tensor an op allocates (views excluded)."""

    def __init__(self):
        super().__init__()
        self.shapes: list[tuple[int, ...]] = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        if not func.is_view:
            self.shapes += [tuple(t.shape) for t in tree_flatten(out)[0] if isinstance(t, torch.Tensor)]
        return out


def _weight_sized(shapes) -> list[tuple[int, ...]]:
    weight_mats = {(H, 2 * I), (2 * I, H), (I, H), (H, I)}
    return [s for s in shapes if len(s) >= 2 and s[-2:] in weight_mats]


def test_grouped_path_never_forms_a_weight_sized_delta_nor_saves_weights():
    ref, grouped = _lora_pair()
    x = torch.randn(16, H, requires_grad=True)  # 32 rows < H, so no activation looks like a weight
    idx, w = _routing(16)

    recorder = _AllocationShapes()
    with recorder:
        ref(x, idx, w).sum().backward()
    assert _weight_sized(recorder.shapes), "the recorder must see the reference path's A_e @ B_e"

    recorder, saved = _AllocationShapes(), []

    def pack(t):
        saved.append(tuple(t.shape))
        return t

    with recorder, torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        grouped(x, idx, w).sum().backward()
    assert recorder.shapes and saved
    assert _weight_sized(recorder.shapes) == []
    assert _weight_sized(saved) == [] and (E, H, 2 * I) not in saved


# -------------------------------------------------------------------------------------- components
@pytest.mark.parametrize("chunk_elements", [1 << 24, 3 * I])  # one chunk; several, with a ragged tail
def test_clamped_swiglu_backward_matches_autograd(chunk_elements, monkeypatch):
    monkeypatch.setattr("rustforge.model.moe._SWIGLU_CHUNK_ELEMENTS", chunk_elements)
    h = (torch.randn(50, 2 * I) * 6).requires_grad_(True)  # many entries beyond +-7
    h.data[0, :4] = torch.tensor([7.0, -7.0, 7.0, 7.0])  # exactly at the clamp bounds
    g = torch.randn(50, I)
    (swiglu_reference(h, 1.702, 7.0) * g).sum().backward()
    want = h.grad.clone()
    h.grad = None
    out = _ClampedSwiGLU.apply(h, 1.702, 7.0)
    (out * g).sum().backward()
    torch.testing.assert_close(h.grad, want, rtol=1e-5, atol=1e-6)


def test_grouped_mm_fallback_matches_native_shapes():
    from rustforge.model.moe import _grouped_mm_loop

    offs = torch.tensor([3, 3, 10, 10], dtype=torch.int32)
    a, b = torch.randn(10, 32), torch.randn(4, 32, 16)
    torch.testing.assert_close(grouped_mm(a, b, offs), _grouped_mm_loop(a, b, offs))
    g = torch.randn(10, 16)
    per_expert = _grouped_mm_loop(a.t(), g, offs)
    torch.testing.assert_close(grouped_mm(a.t(), g, offs), per_expert)
    torch.testing.assert_close(per_expert[2], a[3:10].t() @ g[3:10])
    assert torch.count_nonzero(per_expert[1]) == 0 and torch.count_nonzero(per_expert[3]) == 0


# ----------------------------------------------------------------------------------------- install
def test_install_experts_round_trip_keeps_weights_and_lora():
    from transformers import GptOssForCausalLM

    from rustforge.model.presets import get_preset, hf_config

    cfg = hf_config(get_preset("tiny"), vocab_size=128)
    cfg.num_hidden_layers, cfg.layer_types = 2, cfg.layer_types[:2]
    cfg._attn_implementation = "eager"
    torch.manual_seed(0)
    model = GptOssForCausalLM(cfg).eval()
    ids = torch.randint(0, 128, (2, 12))
    base_logits = model(ids).logits
    lora = LoraConfig(r=4, alpha=8.0)
    install_experts(model, "grouped", "bf16", lora)
    assert all(isinstance(layer.mlp.experts, GroupedExperts) for layer in model.model.layers)
    torch.testing.assert_close(model(ids).logits, base_logits, rtol=1e-5, atol=1e-5)  # B = 0
    for layer in model.model.layers:
        _randomize_lora(layer.mlp.experts)
    grouped_logits = model(ids).logits
    lora_state = {k: v.clone() for k, v in model.state_dict().items() if "lora_" in k}
    install_experts(model, "reference")
    assert all(isinstance(layer.mlp.experts, ReferenceLoraExperts) for layer in model.model.layers)
    assert {k: v for k, v in model.state_dict().items() if "lora_" in k}.keys() == lora_state.keys()
    torch.testing.assert_close(model(ids).logits, grouped_logits, rtol=1e-5, atol=1e-5)
    with pytest.raises(ValueError, match="expert_format"):
        install_experts(model, "reference", "mxfp4")


def test_add_expert_lora_init_is_peft_like_and_seeded():
    grouped = GroupedExperts.from_hf(_hf_experts(), "bf16")
    torch.manual_seed(7)
    add_expert_lora(grouped, R, 16.0, ["gate_up_proj", "down_proj"])
    first = grouped.lora_down_A.clone()
    torch.manual_seed(7)
    add_expert_lora(grouped, R, 16.0, ["gate_up_proj", "down_proj"])
    torch.testing.assert_close(grouped.lora_down_A, first, rtol=0, atol=0)
    assert grouped.lora_scaling == 2.0 and torch.count_nonzero(grouped.lora_down_B) == 0
    bound = 1 / I**0.5  # kaiming_uniform(a=sqrt(5)) over fan_in = in
    assert first.abs().max() <= bound and first.abs().max() > 0.9 * bound
    with pytest.raises(ValueError, match="lora.targets"):
        add_expert_lora(grouped, R, 16.0, ["q_proj"])


# --------------------------------------------------------------------------------------------- GPU
gpu = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")


def _cuda_sm90() -> bool:
    return torch.cuda.is_available() and torch.cuda.get_device_capability() >= (9, 0)


@pytest.mark.gpu
@gpu
@pytest.mark.parametrize("fmt", ["bf16", "fp8", "mxfp4"])
def test_gpu_grouped_bf16_matches_float32_reference(fmt):
    ref, _ = _lora_pair()
    grouped = GroupedExperts.from_hf(ref, fmt).to(torch.bfloat16).cuda()
    with torch.no_grad():  # LoRA in bf16 too, so both sides use identical numbers
        for name in LORA_NAMES:
            getattr(ref, name).copy_(getattr(grouped, name).float())
    dequant_ref = ReferenceLoraExperts.from_module(grouped).float().cuda()
    n = 301
    x = torch.randn(n, H, generator=torch.Generator().manual_seed(5)).to(torch.bfloat16)
    idx, w = _routing(n)
    g = torch.randn(n, H, generator=torch.Generator().manual_seed(6)).cuda()
    x, idx, w = x.cuda(), idx.cuda(), w.cuda()
    if _cuda_sm90():
        assert native_grouped_mm_supported(x, grouped.dense_weight("gate_up_proj"))
    want = _run(dequant_ref, x.float(), idx, w, g)
    got = _run(grouped, x, idx, w.to(torch.bfloat16), g)
    _assert_close_lowp(got, want)
    for name in LORA_NAMES:  # zero-token experts: the K-grouped kernel must not leak garbage
        assert torch.count_nonzero(got[name][E - 2 :]) == 0, name


@pytest.mark.gpu
@gpu
def test_gpu_grouped_mm_native_matches_loop():
    if not _cuda_sm90():
        pytest.skip("native grouped_mm needs sm90")
    from rustforge.model.moe import _grouped_mm_loop

    offs = torch.tensor([64, 64, 200, 200, 256], dtype=torch.int32, device="cuda")
    a = torch.randn(256, 128, device="cuda", dtype=torch.bfloat16)
    b = torch.randn(5, 256, 128, device="cuda", dtype=torch.bfloat16).transpose(1, 2)  # column-major
    torch.testing.assert_close(
        grouped_mm(a, b, offs).float(), _grouped_mm_loop(a, b, offs).float(), rtol=2e-2, atol=2e-1
    )
    g = torch.randn(256, 16, device="cuda", dtype=torch.bfloat16)
    got = grouped_mm(a.t(), g, offs)
    torch.testing.assert_close(got.float(), _grouped_mm_loop(a.t(), g, offs).float(), rtol=2e-2, atol=2e-1)


# ------------------------------------------------------------------------------------ token tiles
@pytest.mark.parametrize("fmt", ["bf16", "mxfp4"])
@pytest.mark.parametrize("tile", [7, 16])
def test_token_tiled_experts_equal_untiled_forward_and_grads(fmt, tile):
    _, grouped = _lora_pair(fmt)
    x = torch.randn(41, H, generator=torch.Generator().manual_seed(5))  # 41: tiles that do not divide it
    idx, w = _routing(41)
    g = torch.randn(41, H, generator=torch.Generator().manual_seed(6))
    want = _run(grouped, x, idx, w, g)
    grouped.tile_tokens = tile
    got = _run(grouped, x, idx, w, g)
    _assert_close(got, want, rtol=1e-5, atol_frac=1e-5)  # fp32 sums in another order: rounding only
    with torch.no_grad():  # inference tiles too, without the autograd Function
        _assert_close({"out": grouped(x, idx, w)}, {"out": want["out"]}, rtol=1e-5, atol_frac=1e-5)


def test_token_tiled_experts_under_checkpoint_and_with_frozen_lora():
    from torch.utils.checkpoint import checkpoint

    _, grouped = _lora_pair("mxfp4")
    x = torch.randn(30, H, generator=torch.Generator().manual_seed(5))
    idx, w = _routing(30)
    g = torch.randn(30, H, generator=torch.Generator().manual_seed(6))
    grouped.lora_down_B.requires_grad_(False)  # a frozen factor gets no gradient, the rest still do
    want = _run(grouped, x, idx, w, g)
    assert want.pop("lora_down_B") is None
    grouped.tile_tokens = 8
    xr, wr = x.clone().requires_grad_(True), w.clone().requires_grad_(True)
    for p in grouped.parameters():
        p.grad = None
    out = checkpoint(grouped, xr, idx, wr, use_reentrant=False)
    (out.float() * g).sum().backward()
    assert grouped.lora_down_B.grad is None
    got = {"out": out.detach(), "hidden": xr.grad, "routing": wr.grad}
    got.update({name: getattr(grouped, name).grad for name in ("lora_gate_up_A", "lora_gate_up_B", "lora_down_A")})
    _assert_close(got, want, rtol=1e-5, atol_frac=1e-5)


def test_token_tiles_bound_what_the_backward_keeps():
    """Saved for backward by the tiled path: the inputs only (no [tokens * k, 2I] rows)."""
    _, grouped = _lora_pair("bf16")
    n = 64
    x = torch.randn(n, H, requires_grad=True)
    idx, w = _routing(n)
    w.requires_grad_(True)
    saved = []

    def pack(t):
        saved.append(t.numel())
        return t

    biggest_param = max(p.numel() for p in grouped.parameters())  # saved by reference, not copied
    for tile, limit in ((0, None), (8, max(n * H, biggest_param))):
        grouped.tile_tokens = tile
        saved.clear()
        with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            grouped(x, idx, w)
        rows = max(saved)
        if limit is None:
            assert rows >= n * TOP_K * 2 * I  # the untiled path saves gate_up rows for all tokens
        else:
            assert rows <= limit, f"tiled path saved a tensor of {rows} elements"


def test_lora_in_gemm_k_equals_the_default_path(monkeypatch):
    """moe.LORA_IN_GEMM_K (the LoRA term and the bias inside the frozen grouped GEMM as extra K): the outputs and
    every gradient of the default path -- on a first step, after an optimizer step and a state-dict load (the
    B rows it keeps in the weight buffer follow the factors), with two forwards before one backward, and with a
    no-grad forward of another LoRA scaling between a forward and its backward; the
    frozen weight keeps its values and state-dict name while it lives in the wider buffer."""
    from rustforge.model import moe

    x = torch.randn(23, H, generator=torch.Generator().manual_seed(5))
    idx, w = _routing(23)
    g = torch.randn(23, H, generator=torch.Generator().manual_seed(6))
    runs, modules, calls = {}, {}, []
    real = moe._GroupedLoraLinearInK.apply
    monkeypatch.setattr(moe._GroupedLoraLinearInK, "apply", lambda *a: calls.append(1) or real(*a))
    monkeypatch.setattr(moe, "LORA_IN_GEMM_K_DTYPES", (torch.float32,))  # float32 here: the path is bf16's by default
    for in_k in (False, True):
        monkeypatch.setattr(moe, "LORA_IN_GEMM_K", in_k)
        calls.clear()
        _, grouped = _lora_pair()
        weight_before = grouped.gate_up_proj.detach().clone()
        opt = torch.optim.SGD([getattr(grouped, n) for n in LORA_NAMES], lr=1e-3)  # a step that keeps the scale
        results = [_run(grouped, x, idx, w, g)]
        opt.step()
        results.append(_run(grouped, x, idx, w, g))
        grouped.load_state_dict({n: getattr(grouped, n) * 1.5 for n in LORA_NAMES}, strict=False)
        results.append(_run(grouped, x, idx, w, g))
        for p in grouped.parameters():
            p.grad = None
        twice = grouped(x, idx, w) + grouped(x * 0.5, idx, w)  # two forwards, one backward
        (twice * g).sum().backward()
        results.append({n: getattr(grouped, n).grad.clone() for n in LORA_NAMES})
        for p in grouped.parameters():
            p.grad = None
        out = grouped(x, idx, w)
        scaling, grouped.lora_scaling = grouped.lora_scaling, 0.0
        with torch.no_grad():  # another forward writes other LoRA rows before the first one's backward
            grouped(x, idx, w)
        grouped.lora_scaling = scaling
        (out * g).sum().backward()
        results.append({n: getattr(grouped, n).grad.clone() for n in LORA_NAMES})
        runs[in_k], modules[in_k] = results, grouped
        assert len(calls) == (14 if in_k else 0)  # both projections of 7 forwards took the K path, or none did
        torch.testing.assert_close(grouped.gate_up_proj.detach(), weight_before, rtol=0, atol=0)
    assert not modules[True].gate_up_proj.is_contiguous()  # the first rows of the [E, H + P, 2I] buffer
    assert modules[True].state_dict().keys() == modules[False].state_dict().keys()
    for got, want in zip(runs[True], runs[False]):  # float32; the K path sums in another order
        _assert_close(got, want, rtol=1e-4, atol_frac=1e-5)


def test_lora_in_gemm_k_keeps_the_small_lora_updates_bf16_rounding_drops(monkeypatch):
    """LORA_IN_GEMM_K's other reason (bench/lora_rounding.py): the tiny model trained from a zero B at a small
    learning rate. In bf16 the in-place update of the rounded expert output drops LoRA terms under half a bf16 step,
    so its loss falls about half as far as float32's; the K path sums them before the one rounding and follows
    float32 (measured: float32 0.0330, K path 0.0280, in-place 0.0147)."""
    from rustforge.model import moe
    from rustforge.model.gptoss import build_model

    g = torch.Generator().manual_seed(0)
    doc_ids = (torch.arange(512) // 128)[None]
    input_ids = torch.randint(0, 512, (1, 512), generator=g)
    labels = torch.roll(input_ids, -1, dims=1)
    labels[:, 127::128] = -100
    batch = {"input_ids": input_ids, "position_ids": (torch.arange(512) % 128)[None], "doc_ids": doc_ids,
             "labels": labels}
    falls = {}
    for dtype, in_k in (("float32", False), ("bfloat16", True), ("bfloat16", False)):
        monkeypatch.setattr(moe, "LORA_IN_GEMM_K", in_k)
        model = build_model(ModelConfig(preset="tiny", dtype=dtype), LoraConfig(r=16, alpha=32), vocab_size=512,
                            device="cpu")
        opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-5)
        losses = []
        for _ in range(12):
            loss = model(**batch).loss
            loss.backward()
            opt.step()
            opt.zero_grad(set_to_none=True)
            losses.append(float(loss.detach()))
        falls[(dtype, in_k)] = losses[0] - losses[-1]
    truth, in_k, in_place = falls[("float32", False)], falls[("bfloat16", True)], falls[("bfloat16", False)]
    assert abs(in_k - truth) < 0.5 * abs(in_place - truth), falls


def test_the_weights_readers_see_through_lora_in_gemm_k_s_buffer(tmp_path):
    """With LORA_IN_GEMM_K on (the default for bf16 models) a forward moves the bf16 expert weight into the first
    rows of the wider [E, in + P, out] buffer: the parameter becomes a non-contiguous view. What reads it must not
    care: the state dict (through the `.contiguous()` safetensors writers take), a state-dict load (into the view:
    the next forward uses the loaded weight), the rollout engine's merged experts, a change of dtype."""
    from safetensors.torch import load_file, save_file

    from rustforge.model import moe
    from rustforge.rollout.weights import _MergedExperts

    assert moe.LORA_IN_GEMM_K and torch.bfloat16 in moe.LORA_IN_GEMM_K_DTYPES
    x = torch.randn(23, H, generator=torch.Generator().manual_seed(5)).bfloat16()
    idx, w = _routing(23)
    _, grouped = _lora_pair()
    grouped = grouped.to(torch.bfloat16)
    weight = grouped.gate_up_proj.detach().clone()
    with torch.no_grad():
        grouped(x, idx, w)
    assert not grouped.gate_up_proj.is_contiguous() and "gate_up_proj" in grouped._aug_weights  # the K path ran
    torch.testing.assert_close(grouped.gate_up_proj.detach(), weight, rtol=0, atol=0)
    # state dict -> safetensors (as loader.write_gptoss / the exports write: .contiguous()) -> back
    save_file({k: v.contiguous() for k, v in grouped.state_dict().items()}, str(tmp_path / "experts.safetensors"))
    loaded = load_file(str(tmp_path / "experts.safetensors"))
    torch.testing.assert_close(loaded["gate_up_proj"], weight, rtol=0, atol=0)
    # a load writes into the view, so the K path's buffer holds the new weight at once
    other = weight * 0.5
    grouped.load_state_dict({"gate_up_proj": other}, strict=False)
    fresh = copy.deepcopy(grouped)  # its own contiguous weight and a buffer built anew
    fresh._aug_weights.clear()
    with torch.no_grad():
        torch.testing.assert_close(grouped(x, idx, w), fresh(x, idx, w), rtol=0, atol=0)
    # the rollout engine's merged experts: dense W + scaling * A @ B
    merged = _MergedExperts(grouped)
    merged.refresh()
    want = other.float() + grouped.lora_scaling * torch.bmm(grouped.lora_gate_up_A.float(), grouped.lora_gate_up_B.float())
    torch.testing.assert_close(merged.buffers["gate_up_proj"], want.bfloat16(), rtol=0, atol=0)
    # module.to(float32): contiguous float32 weights, the wider buffers dropped, the reference path
    grouped.float()
    assert grouped.gate_up_proj.is_contiguous() and not grouped._aug_weights
    torch.testing.assert_close(grouped.gate_up_proj.detach(), other.float(), rtol=0, atol=0)
    with torch.no_grad():
        grouped(x.float(), idx, w)
    assert not grouped._aug_weights
