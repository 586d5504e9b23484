"""Packed-document attention masks, sinks and the flex path against a loop reference and transformers."""

from __future__ import annotations

import functools
import inspect
import warnings

import pytest
import torch
from torch import nn
from transformers import GptOssForCausalLM
from transformers.masking_utils import (
    create_causal_mask,
    create_sliding_window_causal_mask,
)
from transformers.models.gpt_oss.modeling_gpt_oss import eager_attention_forward

from rustforge.model.attention import (
    FLEX_IMPLEMENTATION_NAME,
    build_attention_masks,
    install_packed_flex_attention,
    reference_attention,
    register_flex_attention,
    rustforge_flex_attention,
)
from rustforge.model.presets import get_preset, hf_config

# transformers renamed past_key_values to cache (deprecated alias until 5.40); the device has 5.17.
CACHE_KWARG = "cache" if "cache" in inspect.signature(create_causal_mask).parameters else "past_key_values"
HQ, HKV, D = 4, 2, 8
# Three documents of 7, 9 and 12 tokens, then padding; a window of 5 is shorter than every document.
DOC_IDS = torch.tensor(
    [
        [0] * 7 + [1] * 9 + [2] * 12 + [-1] * 4,
        [4] * 20 + [9] * 12,  # different ids, no padding
    ]
)
WINDOWS = [None, 5]
B, T = DOC_IDS.shape


class SinkAttention(nn.Module):
    """What transformers' eager_attention_forward reads off GptOssAttention."""

    def __init__(self, sinks):
        super().__init__()
        self.num_key_value_groups = HQ // HKV
        self.sinks = nn.Parameter(sinks)


def random_qkv(dtype, seed=0, device="cpu"):
    gen = torch.Generator().manual_seed(seed)
    shapes = [(B, HQ, T, D), (B, HKV, T, D), (B, HKV, T, D), (HQ,)]
    return [torch.randn(s, generator=gen, dtype=torch.float64).to(device, dtype).requires_grad_() for s in shapes]


def eager_with_our_masks(q, k, v, sinks, window):
    module = SinkAttention(sinks.detach().clone())
    masks = build_attention_masks(DOC_IDS.to(q.device), window or 1, "eager", q.dtype)
    mask = masks["sliding_attention" if window else "full_attention"]
    out, _ = eager_attention_forward(module, q, k, v, mask, scaling=D**-0.5)
    return out, module.sinks


def grads(out, inputs, seed=1):
    upstream = torch.randn(out.shape, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)
    return torch.autograd.grad(out, inputs, grad_outputs=upstream.to(out.device, out.dtype))


@pytest.mark.parametrize("window", WINDOWS)
@pytest.mark.parametrize("dtype,tol", [(torch.float64, 1e-12), (torch.float32, 2e-6)])
def test_eager_masks_equal_reference_forward_and_grads(window, dtype, tol):
    q, k, v, sinks = random_qkv(dtype)
    out, sink_param = eager_with_our_masks(q, k, v, sinks, window)
    ref = reference_attention(q, k, v, sinks, DOC_IDS, window, D**-0.5)
    torch.testing.assert_close(out, ref, rtol=tol, atol=tol)
    assert out[0, -4:].abs().max() == 0  # padding queries attend nothing; the sink takes all the weight
    for got, want in zip(grads(out, (q, k, v, sink_param)), grads(ref, (q, k, v, sinks))):
        torch.testing.assert_close(got, want, rtol=tol, atol=tol)


def test_reference_is_sensitive_to_documents_window_and_sinks():
    """Guards the reference itself: each ingredient changes its output."""
    q, k, v, sinks = random_qkv(torch.float64)
    base = reference_attention(q, k, v, sinks, DOC_IDS, 5, D**-0.5)
    one_doc = torch.where(DOC_IDS >= 0, 0, -1)
    for other in (
        reference_attention(q, k, v, sinks, one_doc, 5, D**-0.5),
        reference_attention(q, k, v, sinks, DOC_IDS, 6, D**-0.5),
        reference_attention(q, k, v, None, DOC_IDS, 5, D**-0.5),
    ):
        assert (other - base).abs().max() > 1e-3


def test_masks_reject_bad_input():
    with pytest.raises(ValueError, match="doc_ids"):
        build_attention_masks(DOC_IDS.float(), 4, "eager", torch.float32)
    with pytest.raises(ValueError, match="sliding_window"):
        build_attention_masks(DOC_IDS, 0, "eager", torch.float32)
    with pytest.raises(ValueError, match="attention impl"):
        build_attention_masks(DOC_IDS, 4, "sdpa", torch.float32)


# ------------------------------------------------------------------------------- whole tiny model


def tiny_model(attn_implementation="eager", sliding_window=None, seed=0):
    config = hf_config(get_preset("tiny"), vocab_size=512)
    if sliding_window is not None:
        config.sliding_window = sliding_window
    torch.manual_seed(seed)
    return GptOssForCausalLM._from_config(config, attn_implementation=attn_implementation, dtype=torch.float32).eval()


@torch.no_grad()
def test_single_document_masks_give_exactly_transformers_output():
    model = tiny_model()
    window = model.config.sliding_window
    seq = window + 16  # longer than the window, so the sliding layers' convention matters
    input_ids = torch.randint(0, 512, (2, seq), generator=torch.Generator().manual_seed(0))
    doc_ids = torch.zeros(2, seq, dtype=torch.long)

    theirs = model(input_ids=input_ids).logits
    ours = model(input_ids=input_ids, attention_mask=build_attention_masks(doc_ids, window, "eager", torch.float32)).logits
    assert torch.equal(ours, theirs)

    off_by_one = build_attention_masks(doc_ids, window + 1, "eager", torch.float32)
    assert (model(input_ids=input_ids, attention_mask=off_by_one).logits - theirs).abs().max() > 1e-3


@torch.no_grad()
def test_padded_rows_match_transformers_masks_on_real_tokens():
    model = tiny_model()
    window = model.config.sliding_window
    seq = window + 16
    input_ids = torch.randint(0, 512, (2, seq), generator=torch.Generator().manual_seed(0))
    padding = torch.ones(2, seq, dtype=torch.long)
    padding[1, -9:] = 0  # right padding in row 1
    real = padding.bool()
    ours = build_attention_masks(torch.where(real, 0, -1), window, "eager", torch.float32)
    mask_inputs = dict(config=model.config, inputs_embeds=model.model.embed_tokens(input_ids), attention_mask=padding)
    theirs = {
        "full_attention": create_causal_mask(**mask_inputs, **{CACHE_KWARG: None}),
        "sliding_attention": create_sliding_window_causal_mask(**mask_inputs, **{CACHE_KWARG: None}),
    }
    for layer_type, their_mask in theirs.items():
        # transformers lets padding queries attend real keys; we let them attend nothing: compare real queries
        assert torch.equal(ours[layer_type][:, 0][real], their_mask[:, 0][real]), layer_type
    assert (ours["full_attention"][:, 0][~real] == torch.finfo(torch.float32).min).all()

    # Whole model: equal up to MoE kernels seeing different padding tokens in their expert groups.
    logits_theirs = model(input_ids=input_ids, attention_mask=padding).logits
    logits_ours = model(input_ids=input_ids, attention_mask=ours).logits
    torch.testing.assert_close(logits_ours[real], logits_theirs[real], rtol=1e-5, atol=1e-5)


@torch.no_grad()
def test_packed_documents_never_see_each_other():
    model = tiny_model(sliding_window=6)  # documents longer than the window
    gen = torch.Generator().manual_seed(1)
    doc_a, doc_b = torch.randint(0, 512, (1, 13), generator=gen), torch.randint(0, 512, (1, 19), generator=gen)
    packed = torch.cat([doc_a, doc_b, torch.zeros(1, 4, dtype=torch.long)], dim=1)
    doc_ids = torch.tensor([[0] * 13 + [1] * 19 + [-1] * 4])
    positions = torch.cat([torch.arange(13), torch.arange(19), torch.zeros(4, dtype=torch.long)])[None]

    masks = build_attention_masks(doc_ids, model.config.sliding_window, "eager", torch.float32)
    logits = model(input_ids=packed, attention_mask=masks, position_ids=positions).logits
    alone_a = model(input_ids=doc_a).logits
    alone_b = model(input_ids=doc_b).logits
    torch.testing.assert_close(logits[:, :13], alone_a, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(logits[:, 13:32], alone_b, rtol=1e-5, atol=1e-5)

    # Control: one document spanning A|B (same positions) changes B's logits, so the check above has teeth.
    crossing = build_attention_masks(doc_ids.clamp(max=0), model.config.sliding_window, "eager", torch.float32)
    leaked = model(input_ids=packed, attention_mask=crossing, position_ids=positions).logits
    assert (leaked[:, 13:32] - alone_b).abs().max() > 1e-3


# ------------------------------------------------------------------------------------ flex on CPU


@functools.cache
def flex_runs_on_cpu() -> bool:
    try:
        q = torch.randn(1, 1, 4, 8)
        masks = build_attention_masks(torch.zeros(1, 4, dtype=torch.long), 2, "flex", torch.float32)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            rustforge_flex_attention(None, q, q, q, masks["full_attention"], scaling=1.0)
        return True
    except Exception:  # noqa: BLE001 - any failure means this torch build cannot run it here
        return False


cpu_flex = pytest.mark.skipif(not flex_runs_on_cpu(), reason="torch flex attention does not run on this CPU build")


@cpu_flex
@pytest.mark.parametrize("window", WINDOWS)
@torch.no_grad()
def test_flex_forward_on_cpu_equals_reference(window):
    q, k, v, sinks = (t.detach() for t in random_qkv(torch.float32))
    masks = build_attention_masks(DOC_IDS, window or 1, "flex", torch.float32)
    mask = masks["sliding_attention" if window else "full_attention"]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        out, weights = rustforge_flex_attention(None, q, k, v, mask, scaling=D**-0.5, s_aux=sinks)
    assert weights is None and out.shape == (B, T, HQ, D) and out.is_contiguous()
    ref = reference_attention(q.double(), k.double(), v.double(), sinks.double(), DOC_IDS, window, D**-0.5)
    torch.testing.assert_close(out.double(), ref, rtol=2e-6, atol=2e-6)


@cpu_flex
@torch.no_grad()
def test_flex_mask_dict_passes_through_the_model():
    name = register_flex_attention()
    assert name == FLEX_IMPLEMENTATION_NAME
    eager_model, flex_model = tiny_model(), tiny_model(attn_implementation=name)
    input_ids = torch.randint(0, 512, DOC_IDS.shape, generator=torch.Generator().manual_seed(2))
    window = eager_model.config.sliding_window
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        flex = flex_model(input_ids=input_ids, attention_mask=build_attention_masks(DOC_IDS, window, "flex")).logits
    eager = eager_model(input_ids=input_ids, attention_mask=build_attention_masks(DOC_IDS, window, "eager")).logits
    torch.testing.assert_close(flex, eager, rtol=2e-5, atol=2e-5)


def test_flex_rejects_dense_masks_and_cpu_training():
    q, k, v, sinks = random_qkv(torch.float32)
    with pytest.raises(TypeError, match="BlockMask"):
        rustforge_flex_attention(None, q, k, v, torch.zeros(B, 1, T, T), scaling=1.0, s_aux=sinks)
    if flex_runs_on_cpu():
        mask = build_attention_masks(DOC_IDS, 4, "flex", torch.float32)["full_attention"]
        with pytest.raises(NotImplementedError, match="no CPU backward"):
            rustforge_flex_attention(None, q, k, v, mask, scaling=1.0, s_aux=sinks)


# ------------------------------------------------------------------------------------------- GPU

gpu = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
# Long enough for several 128-token flex blocks, with documents straddling block boundaries.
GPU_DOC_IDS = torch.tensor(
    [
        [0] * 100 + [1] * 150 + [2] * 30 + [-1] * 20,
        [7] * 300,
    ]
)


def gpu_inputs(dtype, seed=0):
    gen = torch.Generator().manual_seed(seed)
    batch, seq = GPU_DOC_IDS.shape
    shapes = [(batch, 8, seq, 64), (batch, 2, seq, 64), (batch, 2, seq, 64), (8,)]
    return [torch.randn(s, generator=gen, dtype=torch.float64).cuda().to(dtype).requires_grad_() for s in shapes]


def max_errors(q, k, v, sinks, out, against):
    """Largest |difference| of the output and of each gradient against float64 `against` results."""
    got = [out, *grads(out, (q, k, v, sinks))]
    return [(g.double() - w).abs().max().item() for g, w in zip(got, against)]


@pytest.mark.gpu
@gpu
@pytest.mark.parametrize("window", [None, 5, 128])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("impl", ["flex", "triton"])
def test_flex_forward_and_backward_on_cuda_match_reference(window, dtype, impl):
    """rustforge_flex_attention with a flex BlockMask or with DocumentSpans (model/triton_attention.py's kernels,
    here on transformers' [B, H, T, D] tensors)."""
    doc_ids = GPU_DOC_IDS.cuda()
    q, k, v, sinks = gpu_inputs(dtype)
    exact = [t.detach().double().requires_grad_() for t in (q, k, v, sinks)]
    ref = reference_attention(*exact[:4], doc_ids, window, 64**-0.5)
    truth = [ref.detach(), *grads(ref, exact)]

    masks = build_attention_masks(doc_ids, window or 1, impl, dtype)
    flex_out, _ = rustforge_flex_attention(
        None, q, k, v, masks["sliding_attention" if window else "full_attention"], scaling=64**-0.5, s_aux=sinks
    )
    flex_err = max_errors(q, k, v, sinks, flex_out, truth)
    assert all(torch.isfinite(torch.tensor(flex_err)))
    if dtype == torch.float32:
        assert max(flex_err) < 1e-4, flex_err
    else:  # bf16: no worse than transformers' own eager path in bf16, measured the same way
        eager_out, sink_param = eager_with_masks_on(q, k, v, sinks, doc_ids, window)
        eager_err = max_errors(q, k, v, sink_param, eager_out, truth)
        assert all(f <= 2 * e + 1e-2 for f, e in zip(flex_err, eager_err)), (flex_err, eager_err)


def eager_with_masks_on(q, k, v, sinks, doc_ids, window):
    module = SinkAttention(sinks.detach().clone())
    module.num_key_value_groups = q.shape[1] // k.shape[1]
    masks = build_attention_masks(doc_ids, window or 1, "eager", q.dtype)
    out, _ = eager_attention_forward(
        module, q, k, v, masks["sliding_attention" if window else "full_attention"], scaling=64**-0.5
    )
    return out, module.sinks


@pytest.mark.gpu
@gpu
def test_flex_under_128_queries_matches_the_eager_model_with_and_without_gradients():
    """Under 128 queries inductor would pick its flex decoding kernel, which failed to compile for the tiny
    model's 64-token evaluation batch (session 6); the main kernel is forced there (attention.py)."""
    name = register_flex_attention()
    eager_model, flex_model = tiny_model().cuda(), tiny_model(attn_implementation=name).cuda()
    doc_ids = torch.tensor([[0] * 40 + [1] * 24]).cuda()
    input_ids = torch.randint(0, 512, doc_ids.shape, generator=torch.Generator().manual_seed(4)).cuda()
    window = eager_model.config.sliding_window
    for grad in (False, True):
        results = []
        for model, impl in ((eager_model, "eager"), (flex_model, "flex")):
            with torch.set_grad_enabled(grad):
                logits = model(input_ids=input_ids, attention_mask=build_attention_masks(doc_ids, window, impl)).logits
            results.append(logits.detach())
        torch.testing.assert_close(results[1], results[0], rtol=1e-4, atol=1e-4)


@pytest.mark.gpu
@gpu
def test_flex_compiles_once_for_both_layer_types_and_any_document_layout():
    q, k, v, sinks = gpu_inputs(torch.bfloat16)

    def step(doc_ids, layer_type):
        mask = build_attention_masks(doc_ids.cuda(), 128, "flex")[layer_type]
        rustforge_flex_attention(None, q, k, v, mask, scaling=0.125, s_aux=sinks)[0].sum().backward()

    step(GPU_DOC_IDS, "full_attention")
    with torch._dynamo.config.patch(error_on_recompile=True):
        step(GPU_DOC_IDS, "sliding_attention")
        step(torch.roll(GPU_DOC_IDS, 37, dims=1), "full_attention")
        step(torch.roll(GPU_DOC_IDS, 37, dims=1), "sliding_attention")


@pytest.mark.gpu
@gpu
def test_flex_model_matches_eager_model_on_cuda_with_gradients():
    name = register_flex_attention()
    eager_model, flex_model = tiny_model().cuda(), tiny_model(attn_implementation=name).cuda()
    doc_ids = GPU_DOC_IDS.cuda()
    input_ids = torch.randint(0, 512, doc_ids.shape, generator=torch.Generator().manual_seed(3)).cuda()
    window = eager_model.config.sliding_window
    results = []
    for model, impl in ((eager_model, "eager"), (flex_model, "flex")):
        logits = model(input_ids=input_ids, attention_mask=build_attention_masks(doc_ids, window, impl)).logits
        logits[doc_ids >= 0].square().mean().backward()
        results.append((logits.detach(), {n: p.grad for n, p in model.named_parameters() if "self_attn" in n}))
    (eager_logits, eager_grads), (flex_logits, flex_grads) = results
    torch.testing.assert_close(flex_logits, eager_logits, rtol=1e-4, atol=1e-4)
    for param_name, grad in eager_grads.items():
        torch.testing.assert_close(flex_grads[param_name], grad, rtol=1e-3, atol=1e-4, msg=param_name)


# ------------------------------------------------------------------------- PackedFlexAttention
def _lora_pair(device):
    """Two copies of the tiny model with the same random LoRA on q/k/v/o; the second's attention swapped."""
    from rustforge.config import LoraConfig
    from rustforge.model.lora import apply_lora

    name = register_flex_attention()
    models = []
    for _ in range(2):
        model = tiny_model(attn_implementation=name)
        torch.manual_seed(5)
        apply_lora(model, LoraConfig(r=4, alpha=8, targets=["q_proj", "k_proj", "v_proj", "o_proj"]))
        with torch.no_grad():
            for n, p in model.named_parameters():
                if "lora_B" in n:
                    p.copy_(torch.randn(p.shape, generator=torch.Generator().manual_seed(len(n))) * 0.1)
        models.append(model.to(device))
    assert install_packed_flex_attention(models[1]) == models[1].config.num_hidden_layers
    return models


def _count_qkv_calls(monkeypatch) -> list[int]:
    """Counts lora_projections calls over three projections (PackedFlexAttention's q/k/v), as a one-item list."""
    from rustforge.model import lora

    calls, original = [0], lora.lora_projections

    def counted(x, projections):
        calls[0] += len(projections) == 3
        return original(x, projections)

    monkeypatch.setattr(lora, "lora_projections", counted)
    return calls


@cpu_flex
@torch.no_grad()
def test_packed_flex_attention_equals_transformers_forward_on_cpu(monkeypatch):
    plain, packed = _lora_pair("cpu")
    calls = _count_qkv_calls(monkeypatch)
    input_ids = torch.randint(0, 512, DOC_IDS.shape, generator=torch.Generator().manual_seed(2))
    masks = build_attention_masks(DOC_IDS, plain.config.sliding_window, "flex")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        want = plain(input_ids=input_ids, attention_mask=masks).logits
        assert calls[0] == 0
        got = packed(input_ids=input_ids, attention_mask=masks).logits
    assert calls[0] == packed.config.num_hidden_layers  # the packed forward ran, not transformers' fallback
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)


@pytest.mark.gpu
@gpu
@pytest.mark.parametrize("impl", ["flex", "triton"])
def test_packed_flex_attention_equals_transformers_forward_on_cuda_with_gradients(monkeypatch, impl):
    plain, packed = _lora_pair("cuda")
    calls = _count_qkv_calls(monkeypatch)
    doc_ids = GPU_DOC_IDS.cuda()
    input_ids = torch.randint(0, 512, doc_ids.shape, generator=torch.Generator().manual_seed(3)).cuda()
    masks = build_attention_masks(doc_ids, plain.config.sliding_window, impl)
    results = []
    for model in (plain, packed):
        logits = model(input_ids=input_ids, attention_mask=masks).logits
        logits[doc_ids >= 0].square().mean().backward()
        results.append((logits.detach(), {n: p.grad for n, p in model.named_parameters() if p.grad is not None}))
    (want, want_grads), (got, got_grads) = results
    assert calls[0] == packed.config.num_hidden_layers
    assert want_grads.keys() == got_grads.keys() and any("lora_A" in n for n in got_grads)
    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-4)
    for name, grad in want_grads.items():
        torch.testing.assert_close(got_grads[name], grad, rtol=1e-3, atol=1e-4, msg=name)
