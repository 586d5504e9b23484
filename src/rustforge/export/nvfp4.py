"""NVFP4 gpt-oss checkpoints: our own documented layout (writer and reader).

There is no NVFP4 layout for gpt-oss's fused expert tensors that transformers can load, and NVIDIA
ModelOpt's exports name per-expert linear modules that gpt-oss does not have, so this is rustforge's own
layout, chosen to mirror the MXFP4 one of the gpt-oss checkpoints (experts stored [E, out, in] and
quantised along `in`, everything else bf16 under its transformers name):

    <experts>.{gate_up_proj,down_proj}_blocks        uint8          [E, out, in/16, 8]  two E2M1 per byte,
                                                                                         low nibble = even element
    <experts>.{gate_up_proj,down_proj}_scales        float8_e4m3fn  [E, out, in/16]     per-16 block scale
    <experts>.{gate_up_proj,down_proj}_global_scale  float32        [E]                 per-expert tensor scale

    w[e, o, i] = E2M1(code) * scales[e, o, i // 16] * global_scale[e]   (rustforge.model.quant.nvfp4_*)

config.json carries `quantization_config = {"quant_method": "rustforge_nvfp4", ...}`; transformers refuses an
unknown quant_method, so `load_nvfp4` (dequantise, then plain GptOssForCausalLM) is how it is read.
Built on safetensors (which stores float8_e4m3fn natively) and model/quant.py's reference codec. The
tensors are encoded from any state mapping (`encode_tensors`: a whole model, or one decoder layer of the
streaming export) and planned from the config alone (`stored_layout`), so both exports write the same files.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import save_file

from rustforge.model.loader import (
    CONFIG_NAME,
    MXFP4_MODULES_TO_NOT_CONVERT,
    CheckpointReader,
    expert_names,
    gptoss_config_from_dict,
    gptoss_config_to_dict,
)
from rustforge.model.quant import NVFP4_BLOCK, nvfp4_dequantize, nvfp4_quantize
from rustforge.model.shards import (
    PlannedTensor,
    plan_shards,
    shard_file_names,
    write_index,
)

QUANT_METHOD = "rustforge_nvfp4"
SUFFIXES = ("_blocks", "_scales", "_global_scale")


def quantization_config() -> dict:
    return {
        "quant_method": QUANT_METHOD,
        "weight_format": "nvfp4",
        "group_size": NVFP4_BLOCK,
        "modules_to_not_convert": list(MXFP4_MODULES_TO_NOT_CONVERT),
        "layout": "<experts>.<proj>_blocks uint8 [E, out, in/16, 8] (low nibble first), _scales float8_e4m3fn "
        "[E, out, in/16], _global_scale float32 [E]; w = e2m1 * scale * global_scale (rustforge.export.nvfp4)",
    }


def quantize_experts(weight_in_out: torch.Tensor) -> dict[str, torch.Tensor]:
    """[E, in, out] expert stack -> {suffix: tensor} of the layout above, one expert (one tensor scale) each."""
    parts = [nvfp4_quantize(w.detach().float().transpose(0, 1).contiguous()) for w in weight_in_out]
    packed = torch.stack([p for p, _, _ in parts])
    return {
        "_blocks": packed.reshape(*packed.shape[:-1], -1, NVFP4_BLOCK // 2).cpu(),
        "_scales": torch.stack([s for _, s, _ in parts]).cpu(),
        "_global_scale": torch.stack([g for _, _, g in parts]).cpu(),
    }


def dequantize_experts(blocks, scales, global_scale, dtype=torch.float32) -> torch.Tensor:
    """Inverse of quantize_experts: [E, in, out] in dtype."""
    if blocks.dtype != torch.uint8 or blocks.shape[-1] != NVFP4_BLOCK // 2 or blocks.shape[:-1] != scales.shape:
        raise ValueError(f"nvfp4: blocks {tuple(blocks.shape)} {blocks.dtype} do not fit scales {tuple(scales.shape)}")
    if global_scale.shape != blocks.shape[:1]:
        raise ValueError(f"nvfp4: global_scale {tuple(global_scale.shape)} must be [{blocks.shape[0]}]")
    out = [
        nvfp4_dequantize(b.reshape(b.shape[0], -1), s, g, dtype).transpose(0, 1)
        for b, s, g in zip(blocks, scales, global_scale)
    ]
    return torch.stack(out)


def fake_quantized_experts(weight_in_out: torch.Tensor, dtype=torch.float32) -> torch.Tensor:
    """What the checkpoint will hold for this stack, dequantised (for checks and evaluation)."""
    parts = quantize_experts(weight_in_out)
    return dequantize_experts(parts["_blocks"], parts["_scales"], parts["_global_scale"], dtype)


def encode_tensors(state, config, dtype=torch.bfloat16):
    """Yield (stored name, tensor) in the layout above, in `state`'s order (parameter name -> tensor: a whole
    model's state dict or one decoder layer's): experts quantised, everything else in `dtype`."""
    experts = expert_names(config)
    for name, tensor in state.items():
        if name == "lm_head.weight" and config.tie_word_embeddings:
            continue
        if name in experts:
            yield from ((f"{name}{suffix}", t) for suffix, t in quantize_experts(tensor).items())
        else:
            yield name, tensor.detach().to(device="cpu", dtype=dtype).contiguous()


def checkpoint_tensors(model, dtype=torch.bfloat16) -> dict[str, torch.Tensor]:
    """Every stored tensor of `model` (a plain GptOssForCausalLM) in the layout above."""
    return dict(encode_tensors(model.state_dict(), model.config, dtype))


def stored_layout(config, dtype=torch.bfloat16) -> list[PlannedTensor]:
    """Every stored tensor (name, dtype, shape) in file order, from the config alone."""
    from transformers import GptOssForCausalLM

    with torch.device("meta"):
        shapes = {name: tuple(t.shape) for name, t in GptOssForCausalLM(config).state_dict().items()}
    experts = expert_names(config)
    out = []
    for name, shape in shapes.items():
        if name == "lm_head.weight" and config.tie_word_embeddings:
            continue
        if name not in experts:
            out.append(PlannedTensor(name, dtype, shape))
            continue
        num_experts, fan_in, fan_out = shape  # stored [E, out, in] like MXFP4, blocks of 16 along `in`
        blocks = (num_experts, fan_out, fan_in // NVFP4_BLOCK)
        out += [
            PlannedTensor(f"{name}_blocks", torch.uint8, (*blocks, NVFP4_BLOCK // 2)),
            PlannedTensor(f"{name}_scales", torch.float8_e4m3fn, blocks),
            PlannedTensor(f"{name}_global_scale", torch.float32, (num_experts,)),
        ]
    return out


def config_dict(config) -> dict:
    """config.json of an NVFP4 export: the gpt-oss config with our quantization_config."""
    out = gptoss_config_to_dict(config, mxfp4=False)
    out["quantization_config"] = quantization_config()
    return dict(sorted(out.items()))


def write_config_json(directory: Path, config) -> None:
    (directory / CONFIG_NAME).write_text(json.dumps(config_dict(config), indent=2) + "\n")


def write_nvfp4(model, directory: str | Path, max_shard_bytes: int = 5 * 2**30) -> Path:
    """Write `model` into `directory` (which must not exist yet; callers stage and rename it)."""
    directory = Path(directory)
    directory.mkdir(parents=True)
    tensors = checkpoint_tensors(model)
    layout = stored_layout(model.config)
    found = [PlannedTensor(name, t.dtype, tuple(t.shape)) for name, t in tensors.items()]
    if found != layout:  # stored_layout is what the streaming export plans with: it must describe this
        first = next(i for i, (f, p) in enumerate(zip(found + [None], layout + [None])) if f != p)
        raise RuntimeError(f"write_nvfp4: encoded tensor #{first} differs from stored_layout's plan")
    weight_map = {}
    shards = plan_shards(layout, max_shard_bytes)
    for file, shard in zip(shard_file_names(len(shards)), shards):
        save_file({t.name: tensors[t.name] for t in shard}, directory / file, metadata={"format": "pt"})
        weight_map.update(dict.fromkeys((t.name for t in shard), file))
    write_index(directory, weight_map, sum(t.numel() * t.element_size() for t in tensors.values()))
    write_config_json(directory, model.config)
    return directory


def read_config(directory: Path):
    """(GptOssConfig, quantization_config) of an NVFP4 export's config.json."""
    path = directory / CONFIG_NAME
    raw = json.loads(path.read_text())
    quant = raw.pop("quantization_config", None)
    if not isinstance(quant, dict) or quant.get("quant_method") != QUANT_METHOD:
        raise ValueError(f"{path}: quantization_config.quant_method must be {QUANT_METHOD!r}, got {quant!r}")
    return gptoss_config_from_dict(raw), quant


def _plain_or_nvfp4(stored: dict[str, torch.Tensor], name: str, dtype: torch.dtype) -> torch.Tensor:
    """Parameter `name` from its stored tensor(s), as load_nvfp4 turns them into parameters."""
    if f"{name}_blocks" in stored:
        return dequantize_experts(*(stored[name + s] for s in SUFFIXES), dtype)
    return stored[name].to(dtype)


def reader(directory: str | Path) -> CheckpointReader:
    """Chosen parameters of an NVFP4 export without loading the rest (experts dequantised)."""
    config, _ = read_config(Path(directory))
    return CheckpointReader(directory, config=config, decode=_plain_or_nvfp4, suffixes=SUFFIXES)


def load_nvfp4(directory: str | Path, dtype: torch.dtype = torch.float32):
    """A plain GptOssForCausalLM (experts dequantised to dtype) from an NVFP4 export."""
    from rustforge.model.lora import plain_model

    directory = Path(directory)
    config, _ = read_config(directory)
    stored: dict[str, torch.Tensor] = {}
    for file in sorted(directory.glob("model*.safetensors")):
        with safe_open(file, framework="pt") as handle:
            names = handle.keys()
            stored.update({name: handle.get_tensor(name) for name in names})
    state = {}
    for name in expert_names(config):
        missing = [name + s for s in SUFFIXES if name + s not in stored]
        if missing:
            raise ValueError(f"{directory}: missing {missing[0]} (NVFP4 layout: {', '.join(SUFFIXES)})")
        state[name] = dequantize_experts(*(stored.pop(name + s) for s in SUFFIXES), dtype)
    state.update({n: t.to(dtype) for n, t in stored.items()})
    if config.tie_word_embeddings:
        state["lm_head.weight"] = state["model.embed_tokens.weight"]
    return plain_model(config, state)
