"""gpt-oss checkpoint directories: write (bf16 / MXFP4, sharded) -> load gives identical logits;
every malformed directory fails with an error naming the file and the tensor or config field;
the gpt-oss-20b preset matches the published config.json."""

import copy
import json
import re
import shutil

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file
from transformers import GptOssConfig, GptOssForCausalLM

from rustforge.model.loader import (
    INDEX_NAME,
    MXFP4_MODULES_TO_NOT_CONVERT,
    gptoss_config_from_dict,
    load_gptoss,
    read_gptoss_config,
    write_gptoss,
)
from rustforge.model.presets import get_preset, hf_config
from rustforge.model.quant import mxfp4_fake_quantize_values

VOCAB = 512
# Tiny preset: 4 layers, hidden 256, 8 heads of 32, 2 KV heads, 8 experts (top-2), intermediate 256.
LAYERS, HIDDEN, HEADS, EXPERTS, INTERMEDIATE = 4, 256, 8, 8, 256

# openai/gpt-oss-20b config.json as published on the Hugging Face hub.
PUBLISHED_20B_CONFIG = {
    "architectures": ["GptOssForCausalLM"],
    "attention_bias": True,
    "attention_dropout": 0.0,
    "eos_token_id": 200002,
    "experts_per_token": 4,
    "head_dim": 64,
    "hidden_act": "silu",
    "hidden_size": 2880,
    "initial_context_length": 4096,
    "initializer_range": 0.02,
    "intermediate_size": 2880,
    "layer_types": ["sliding_attention", "full_attention"] * 12,
    "max_position_embeddings": 131072,
    "model_type": "gpt_oss",
    "num_attention_heads": 64,
    "num_experts_per_tok": 4,
    "num_hidden_layers": 24,
    "num_key_value_heads": 8,
    "num_local_experts": 32,
    "output_router_logits": False,
    "pad_token_id": 199999,
    "quantization_config": {
        "modules_to_not_convert": [
            "model.layers.*.self_attn",
            "model.layers.*.mlp.router",
            "model.embed_tokens",
            "lm_head",
        ],
        "quant_method": "mxfp4",
    },
    "rms_norm_eps": 1e-05,
    "rope_scaling": {
        "beta_fast": 32.0,
        "beta_slow": 1.0,
        "factor": 32.0,
        "original_max_position_embeddings": 4096,
        "rope_type": "yarn",
        "truncate": False,
    },
    "rope_theta": 150000,
    "router_aux_loss_coef": 0.9,
    "sliding_window": 128,
    "swiglu_limit": 7.0,
    "tie_word_embeddings": False,
    "transformers_version": "4.55.0.dev0",
    "use_cache": True,
    "vocab_size": 201088,
}
ARCHITECTURE_FIELDS = (
    "num_hidden_layers", "hidden_size", "num_attention_heads", "num_key_value_heads", "head_dim",
    "num_local_experts", "num_experts_per_tok", "intermediate_size", "vocab_size", "sliding_window",
    "max_position_embeddings", "swiglu_limit", "rms_norm_eps", "attention_bias", "tie_word_embeddings",
    "hidden_act", "layer_types",
)  # fmt: skip


@pytest.fixture(scope="module")
def model() -> GptOssForCausalLM:
    torch.manual_seed(0)
    config = hf_config(get_preset("tiny"), vocab_size=VOCAB)
    config._attn_implementation = "eager"
    model = GptOssForCausalLM(config).float().eval()
    with torch.no_grad():  # no parameter left at an init constant (zero biases, unit norms)
        for parameter in model.parameters():
            parameter.add_(torch.randn_like(parameter) * 0.02)
    return model


@pytest.fixture(scope="module")
def input_ids() -> torch.Tensor:
    generator = torch.Generator().manual_seed(1)
    return torch.randint(0, VOCAB, (2, 80), generator=generator)  # longer than the 64-token window


@pytest.fixture(scope="module")
def bf16_dir(model, tmp_path_factory):
    """A bf16 checkpoint in several shards with an index."""
    return write_gptoss(model, tmp_path_factory.mktemp("ckpt") / "bf16", max_shard_bytes=2**20)


@pytest.fixture(scope="module")
def mxfp4_dir(model, tmp_path_factory):
    """An MXFP4 checkpoint with one tensor per shard: every blocks/scales pair is split across two files."""
    return write_gptoss(model, tmp_path_factory.mktemp("ckpt") / "mxfp4", expert_format="mxfp4", max_shard_bytes=1)


def _logits(model, input_ids) -> torch.Tensor:
    with torch.no_grad():
        return model(input_ids=input_ids).logits


def _rounded_copy(model, expert_transform=None) -> GptOssForCausalLM:
    """float32 copy whose parameters went through bf16 (and, for experts, expert_transform)."""
    reference = copy.deepcopy(model)
    with torch.no_grad():
        for name, parameter in reference.named_parameters():
            if expert_transform and name.endswith(("experts.gate_up_proj", "experts.down_proj")):
                parameter.copy_(expert_transform(parameter))
            else:
                parameter.copy_(parameter.to(torch.bfloat16).float())
    return reference


def _copy_checkpoint(source, tmp_path):
    target = tmp_path / "ckpt"
    shutil.copytree(source, target)
    return target


def _shard_of(directory, tensor_name) -> str:
    return json.loads((directory / INDEX_NAME).read_text())["weight_map"][tensor_name]


def _rewrite_shard(directory, file, edit) -> None:
    tensors = load_file(directory / file)
    edit(tensors)
    save_file(tensors, directory / file, metadata={"format": "pt"})


def _edit_config(directory, edit) -> None:
    raw = json.loads((directory / "config.json").read_text())
    edit(raw)
    (directory / "config.json").write_text(json.dumps(raw))


# ------------------------------------------------------------------------------- round trips


def test_bf16_round_trip_sharded_gives_identical_logits(model, input_ids, bf16_dir):
    index = json.loads((bf16_dir / INDEX_NAME).read_text())
    shards = sorted(set(index["weight_map"].values()))
    assert len(shards) > 1 and shards[0] == f"model-00001-of-{len(shards):05d}.safetensors"
    assert set(index["weight_map"]) == set(model.state_dict())  # original names, nothing else
    with safe_open(bf16_dir / _shard_of(bf16_dir, "model.layers.0.mlp.experts.gate_up_proj"), "pt") as f:
        stored = f.get_tensor("model.layers.0.mlp.experts.gate_up_proj")
    assert stored.dtype == torch.bfloat16 and stored.shape == (EXPERTS, HIDDEN, 2 * INTERMEDIATE)

    loaded = load_gptoss(bf16_dir, dtype=torch.float32)
    assert not loaded.training and loaded.config._attn_implementation == "eager"
    reference = _rounded_copy(model)
    for name, parameter in reference.state_dict().items():
        assert torch.equal(loaded.state_dict()[name], parameter), name
    assert torch.equal(_logits(loaded, input_ids), _logits(reference, input_ids))

    loaded_bf16 = load_gptoss(bf16_dir, dtype=torch.bfloat16)
    assert loaded_bf16.lm_head.weight.dtype == torch.bfloat16
    cast = copy.deepcopy(model)
    for parameter in cast.parameters():  # parameters only: rotary tables stay float32, as from_pretrained does
        parameter.data = parameter.data.to(torch.bfloat16)
    assert torch.equal(_logits(loaded_bf16, input_ids), _logits(cast, input_ids))


def test_mxfp4_round_trip_gives_logits_of_fake_quantised_experts(model, input_ids, mxfp4_dir):
    directory = mxfp4_dir
    config = json.loads((directory / "config.json").read_text())
    assert config["quantization_config"] == {
        "modules_to_not_convert": MXFP4_MODULES_TO_NOT_CONVERT,
        "quant_method": "mxfp4",
    }
    weight_map = json.loads((directory / INDEX_NAME).read_text())["weight_map"]
    assert "model.layers.0.mlp.experts.down_proj" not in weight_map
    with safe_open(directory / weight_map["model.layers.2.mlp.experts.gate_up_proj_blocks"], "pt") as f:
        blocks = f.get_tensor("model.layers.2.mlp.experts.gate_up_proj_blocks")
    with safe_open(directory / weight_map["model.layers.2.mlp.experts.gate_up_proj_scales"], "pt") as f:
        scales = f.get_tensor("model.layers.2.mlp.experts.gate_up_proj_scales")
    assert blocks.dtype == scales.dtype == torch.uint8
    assert blocks.shape == (EXPERTS, 2 * INTERMEDIATE, HIDDEN // 32, 16) and scales.shape == blocks.shape[:-1]

    loaded = load_gptoss(directory)
    # Stored [E, out, in], quantised along `in`: fake-quantise the transposed parameter.
    reference = _rounded_copy(model, lambda w: mxfp4_fake_quantize_values(w.transpose(1, 2)).transpose(1, 2))
    for name, parameter in reference.state_dict().items():
        assert torch.equal(loaded.state_dict()[name], parameter), name
    assert torch.equal(_logits(loaded, input_ids), _logits(reference, input_ids))

    mxfp4 = pytest.importorskip("transformers.integrations.mxfp4")
    convert = getattr(mxfp4, "convert_moe_packed_tensors", None) or mxfp4._convert_moe_packed_tensors
    theirs = convert(blocks, scales, dtype=torch.float32)  # already transposed to [E, in, out]
    assert torch.equal(theirs, loaded.model.layers[2].mlp.experts.gate_up_proj.detach())


def test_single_file_checkpoint_and_rope_parameters_style_config(model, input_ids, tmp_path):
    directory = write_gptoss(model, tmp_path / "single", dtype=torch.float32)
    assert sorted(p.name for p in directory.iterdir()) == ["config.json", "model.safetensors"]
    written = json.loads((directory / "config.json").read_text())
    assert "rope_parameters" not in written and written["rope_theta"] == 150000.0
    assert written["rope_scaling"]["rope_type"] == "yarn"
    # transformers' own parsing of what we wrote gives the same rope parameters
    assert GptOssConfig.from_dict(written).rope_parameters == model.config.rope_parameters
    assert torch.equal(_logits(load_gptoss(directory), input_ids), _logits(model, input_ids))  # float32: lossless

    def to_rope_parameters(raw):
        raw["rope_parameters"] = dict(raw.pop("rope_scaling"), rope_theta=raw.pop("rope_theta"))

    _edit_config(directory, to_rope_parameters)
    assert load_gptoss(directory).config.rope_parameters == model.config.rope_parameters


def test_loads_unindexed_shards(model, input_ids, bf16_dir, tmp_path):
    directory = _copy_checkpoint(bf16_dir, tmp_path)
    (directory / INDEX_NAME).unlink()
    assert torch.equal(_logits(load_gptoss(directory), input_ids), _logits(_rounded_copy(model), input_ids))


def test_write_refuses_existing_directory_unless_overwrite(model, tmp_path):
    tokenizer = tmp_path / "tok.json"
    tokenizer.write_text('{"model": {}}')
    target = tmp_path / "out"
    target.mkdir()
    (target / "stale.txt").write_text("old")
    with pytest.raises(ValueError, match="already exists"):
        write_gptoss(model, target)
    write_gptoss(model, target, overwrite=True, tokenizer_json_path=tokenizer)
    assert sorted(p.name for p in target.iterdir()) == ["config.json", "model.safetensors", "tokenizer.json"]
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".")] == []  # no staging left over
    with pytest.raises(ValueError, match="expert_format"):
        write_gptoss(model, tmp_path / "x", expert_format="nvfp4")


# ---------------------------------------------------------------------------------- errors


def test_missing_config_json(bf16_dir, tmp_path):
    directory = _copy_checkpoint(bf16_dir, tmp_path)
    (directory / "config.json").unlink()
    with pytest.raises(ValueError, match=r"config\.json: missing"):
        load_gptoss(directory)


def test_missing_tensor_names_tensor_and_files(bf16_dir, tmp_path):
    directory = _copy_checkpoint(bf16_dir, tmp_path)
    name = "model.layers.1.mlp.router.bias"
    _rewrite_shard(directory, _shard_of(directory, name), lambda t: t.pop(name))
    index = json.loads((directory / INDEX_NAME).read_text())
    del index["weight_map"][name]
    (directory / INDEX_NAME).write_text(json.dumps(index))
    with pytest.raises(ValueError, match=rf"{name} is missing \(expected shape \(8,\) from config\.json "
                       r"num_local_experts=8\); searched model-00001-of-"):  # fmt: skip
        load_gptoss(directory)


def test_tensor_listed_in_index_but_absent_from_shard(bf16_dir, tmp_path):
    directory = _copy_checkpoint(bf16_dir, tmp_path)
    name = "model.norm.weight"
    shard = _shard_of(directory, name)
    _rewrite_shard(directory, shard, lambda t: t.pop(name))
    with pytest.raises(ValueError, match=rf"{shard}: {name} is listed in {INDEX_NAME} but not stored"):
        load_gptoss(directory)


def test_wrong_shape_names_file_tensor_and_config_field(bf16_dir, tmp_path):
    directory = _copy_checkpoint(bf16_dir, tmp_path)
    name = "model.layers.3.self_attn.sinks"
    shard = _shard_of(directory, name)
    _rewrite_shard(directory, shard, lambda t: t.update({name: torch.zeros(4, dtype=torch.bfloat16)}))
    expected = f"{shard}: {name} has shape (4,), expected (8,) from config.json num_attention_heads=8"
    with pytest.raises(ValueError, match=re.escape(expected)):
        load_gptoss(directory)


def test_unexpected_tensor(bf16_dir, tmp_path):
    directory = _copy_checkpoint(bf16_dir, tmp_path)
    (directory / INDEX_NAME).unlink()
    save_file({"model.layers.9.mlp.router.bias": torch.zeros(8)}, directory / "extra.safetensors")
    with pytest.raises(ValueError, match=r"extra\.safetensors: unexpected tensor model\.layers\.9\.mlp\.router\.bias"):
        load_gptoss(directory)


def test_mxfp4_tensors_with_wrong_dtype(mxfp4_dir, tmp_path):
    directory = _copy_checkpoint(mxfp4_dir, tmp_path)
    name = "model.layers.0.mlp.experts.down_proj_scales"
    shard = _shard_of(directory, name)
    _rewrite_shard(directory, shard, lambda t: t.update({name: t[name].float()}))
    with pytest.raises(ValueError, match=re.escape(f"{shard}: {name} has dtype F32, expected U8")):
        load_gptoss(directory)


@pytest.mark.parametrize(
    "edit, message",
    [
        (lambda c: c.update(num_key_value_heads=3), "num_key_value_heads=3 must divide num_attention_heads=8"),
        (lambda c: c.update(num_experts_per_tok=9), "num_experts_per_tok=9 exceeds num_local_experts=8"),
        (
            lambda c: c.update(layer_types=["full_attention"] * 3),
            "layer_types has 3 entries, expected num_hidden_layers=4",
        ),
        (lambda c: c.pop("head_dim"), "missing required field head_dim"),
        (lambda c: c.update(hidden_size="256"), "hidden_size must be a positive integer"),
        (lambda c: c.update(model_type="llama"), "model_type must be 'gpt_oss'"),
        (lambda c: c.pop("rope_theta"), "missing rope_theta"),
        (
            lambda c: c.update(quantization_config={"quant_method": "gptq"}),
            "quantization_config must have quant_method 'mxfp4'",
        ),
        (lambda c: c.update(experts_per_token=4), "experts_per_token=4 disagrees with num_experts_per_tok=2"),
    ],
)
def test_inconsistent_config_field(bf16_dir, tmp_path, edit, message):
    directory = _copy_checkpoint(bf16_dir, tmp_path)
    _edit_config(directory, edit)
    with pytest.raises(ValueError, match=re.escape(f"config.json: {message}")):
        load_gptoss(directory)


def test_config_field_change_surfaces_as_shape_error(bf16_dir, tmp_path):
    directory = _copy_checkpoint(bf16_dir, tmp_path)
    _edit_config(directory, lambda c: c.update(intermediate_size=128))
    expected = ("model.layers.0.mlp.experts.gate_up_proj_bias has shape (8, 512), "
                "expected (8, 256) from config.json num_local_experts=8, intermediate_size=128")  # fmt: skip
    with pytest.raises(ValueError, match=re.escape(expected)):
        load_gptoss(directory)


def test_bad_index_json(bf16_dir, tmp_path):
    directory = _copy_checkpoint(bf16_dir, tmp_path)
    (directory / INDEX_NAME).write_text("{not json")
    with pytest.raises(ValueError, match=rf"{INDEX_NAME}: not valid JSON"):
        load_gptoss(directory)
    (directory / INDEX_NAME).write_text(json.dumps({"weight_map": {"model.norm.weight": "model-9.safetensors"}}))
    with pytest.raises(
        ValueError, match=re.escape("['model.norm.weight'] names model-9.safetensors, which does not exist")
    ):
        load_gptoss(directory)
    (directory / INDEX_NAME).write_text(json.dumps({"metadata": {}}))
    with pytest.raises(ValueError, match=rf"{INDEX_NAME}: needs a non-empty object 'weight_map'"):
        load_gptoss(directory)


def test_truncated_safetensors(bf16_dir, tmp_path):
    directory = _copy_checkpoint(bf16_dir, tmp_path)
    shard = _shard_of(directory, "lm_head.weight")
    data = (directory / shard).read_bytes()
    (directory / shard).write_bytes(data[: len(data) // 2])
    with pytest.raises(ValueError, match=rf"{shard}: unreadable safetensors file .*truncated or corrupt"):
        load_gptoss(directory)


# ------------------------------------------------------------------------------ 20B config


def test_20b_preset_matches_published_config():
    ours = hf_config(get_preset("gpt-oss-20b"))
    published = gptoss_config_from_dict(PUBLISHED_20B_CONFIG)
    for field in ARCHITECTURE_FIELDS:
        assert getattr(ours, field) == PUBLISHED_20B_CONFIG[field] == getattr(published, field), field
    rope = dict(PUBLISHED_20B_CONFIG["rope_scaling"], rope_theta=PUBLISHED_20B_CONFIG["rope_theta"])
    assert ours.rope_parameters == rope == published.rope_parameters
    assert ours.layer_types[:2] == ["sliding_attention", "full_attention"]
    assert published._attn_implementation == "eager"
    assert not hasattr(published, "quantization_config")  # experts are dequantised on load


def test_published_config_json_parses_and_needs_weights(tmp_path):
    (tmp_path / "config.json").write_text(json.dumps(PUBLISHED_20B_CONFIG, indent=2))
    config = read_gptoss_config(tmp_path)
    assert (config.num_hidden_layers, config.hidden_size, config.num_local_experts) == (24, 2880, 32)
    assert config.rope_parameters["factor"] == 32.0 and config.rope_parameters["rope_theta"] == 150000
    with pytest.raises(ValueError, match=r"no model\.safetensors\.index\.json, model\.safetensors or \*\.safetensors"):
        load_gptoss(tmp_path)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_load_onto_gpu_matches_cpu(model, tmp_path):
    directory = write_gptoss(copy.deepcopy(model).cuda(), tmp_path / "mx", expert_format="mxfp4")  # quantised on GPU
    on_cpu, on_gpu = load_gptoss(directory), load_gptoss(directory, device="cuda")
    assert all(t.is_cuda for t in [*on_gpu.parameters(), *on_gpu.buffers()])
    for name, tensor in on_cpu.state_dict().items():
        assert torch.equal(on_gpu.state_dict()[name].cpu(), tensor), name
    assert torch.equal(on_cpu.state_dict()["model.layers.1.mlp.experts.down_proj"],
                       load_gptoss(write_gptoss(model, tmp_path / "mx_cpu", expert_format="mxfp4"))
                       .state_dict()["model.layers.1.mlp.experts.down_proj"])  # fmt: skip
