"""Read and write a local gpt-oss checkpoint directory (config.json + safetensors shards).

Builds on safetensors and transformers' GptOssConfig / GptOssForCausalLM. Own code instead of
`from_pretrained` because we need: MXFP4 expert dequantisation on a CPU (transformers only keeps
MXFP4 with GPU triton kernels), validation whose errors name the file, tensor or config field and
the expected versus found shape, streaming one tensor at a time (the 20B model must not need twice
its size in RAM), and no hub access. `CheckpointReader` reads chosen parameters (a decoder layer) of a
directory without loading the rest, for the streaming export; shards are planned and indexed by
model/shards.py, shared with every other writer.

Layouts. Unquantised checkpoints hold every parameter under its transformers name and layout
(experts' `gate_up_proj` is [E, H, 2I], `down_proj` is [E, I, H]). MXFP4 checkpoints (as published
in openai/gpt-oss-*) replace each of these by `<name>_blocks` [E, out, in/32, 16] and
`<name>_scales` [E, out, in/32], i.e. stored [E, out, in]: dequantise, then swap the last two dims.
"""

from __future__ import annotations

import json
import os
import shutil
from dataclasses import dataclass
from pathlib import Path

import torch
import transformers
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file
from transformers import GptOssConfig, GptOssForCausalLM

from rustforge.model.quant import MXFP4_BLOCK, mxfp4_dequantize, mxfp4_quantize
from rustforge.model.shards import (
    INDEX_NAME,
    SINGLE_FILE_NAME,
    PlannedTensor,
    plan_shards,
    shard_file_names,
    write_index,
)

CONFIG_NAME = "config.json"
TOKENIZER_NAME = "tokenizer.json"

# As in openai/gpt-oss-20b's config.json: everything but the experts stays bf16.
MXFP4_MODULES_TO_NOT_CONVERT = [
    "model.layers.*.self_attn",
    "model.layers.*.mlp.router",
    "model.embed_tokens",
    "lm_head",
]
EXPERT_PROJECTIONS = ("gate_up_proj", "down_proj")
LOADABLE_DTYPES = (torch.float32, torch.bfloat16, torch.float16)
LAYER_TYPES = ("sliding_attention", "full_attention")
POSITIVE_INT_FIELDS = (
    "hidden_size",
    "num_hidden_layers",
    "num_attention_heads",
    "num_key_value_heads",
    "head_dim",
    "num_local_experts",
    "num_experts_per_tok",
    "intermediate_size",
    "vocab_size",
    "sliding_window",
)
# Keys of config.json that are about the file, not the architecture; never passed to GptOssConfig.
_FILE_ONLY_KEYS = ("quantization_config", "transformers_version", "torch_dtype", "dtype", "rope_scaling", "rope_theta")


# ---------------------------------------------------------------------------------------------
# config.json
# ---------------------------------------------------------------------------------------------


def _config_error(message: str) -> ValueError:
    return ValueError(f"{CONFIG_NAME}: {message}")


def _is_positive_int(value) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value > 0


def _rope_parameters(raw: dict) -> dict:
    """rope_parameters (transformers 5.x) from either that key or rope_scaling + rope_theta (4.x)."""
    scaling, parameters, theta = raw.get("rope_scaling"), raw.get("rope_parameters"), raw.get("rope_theta")
    for key, value in (("rope_scaling", scaling), ("rope_parameters", parameters)):
        if value is not None and not isinstance(value, dict):
            raise _config_error(f"{key} must be an object, got {value!r}")
    if parameters is None:
        parameters = dict(scaling) if scaling is not None else {"rope_type": "default"}
    else:
        parameters = dict(parameters)
        if scaling is not None and {k: v for k, v in parameters.items() if k != "rope_theta"} != scaling:
            raise _config_error(f"rope_scaling {scaling} disagrees with rope_parameters {parameters}")
    if "rope_theta" not in parameters:
        if theta is None:
            raise _config_error("missing rope_theta (neither top-level nor inside rope_parameters)")
        parameters["rope_theta"] = theta
    elif theta is not None and parameters["rope_theta"] != theta:
        raise _config_error(f"rope_theta={theta} disagrees with rope_parameters.rope_theta={parameters['rope_theta']}")
    rope_theta = parameters["rope_theta"]
    if isinstance(rope_theta, bool) or not isinstance(rope_theta, (int, float)) or rope_theta <= 0:
        raise _config_error(f"rope_theta must be a positive number, got {rope_theta!r}")
    parameters.setdefault("rope_type", parameters.pop("type", "default"))
    return parameters


def _validate_config_fields(raw: dict) -> None:
    if raw.get("model_type") != "gpt_oss":
        raise _config_error(f"model_type must be 'gpt_oss', got {raw.get('model_type')!r}")
    for name in POSITIVE_INT_FIELDS:
        if name not in raw:
            raise _config_error(f"missing required field {name}")
        if not _is_positive_int(raw[name]):
            raise _config_error(f"{name} must be a positive integer, got {raw[name]!r}")
    heads, kv_heads = raw["num_attention_heads"], raw["num_key_value_heads"]
    if heads % kv_heads:
        raise _config_error(f"num_key_value_heads={kv_heads} must divide num_attention_heads={heads}")
    experts, top_k = raw["num_local_experts"], raw["num_experts_per_tok"]
    if top_k > experts:
        raise _config_error(f"num_experts_per_tok={top_k} exceeds num_local_experts={experts}")
    legacy_top_k = raw.get("experts_per_token")
    if legacy_top_k is not None and legacy_top_k != top_k:
        raise _config_error(f"experts_per_token={legacy_top_k} disagrees with num_experts_per_tok={top_k}")
    layer_types = raw.get("layer_types")
    if layer_types is not None:
        if not isinstance(layer_types, list) or len(layer_types) != raw["num_hidden_layers"]:
            found = len(layer_types) if isinstance(layer_types, list) else repr(layer_types)
            layers = raw["num_hidden_layers"]
            raise _config_error(f"layer_types has {found} entries, expected num_hidden_layers={layers}")
        unknown = sorted({t for t in layer_types if t not in LAYER_TYPES}, key=str)
        if unknown:
            raise _config_error(f"layer_types has unknown entries {unknown}; known: {list(LAYER_TYPES)}")
    quantization = raw.get("quantization_config")
    if quantization is not None and (not isinstance(quantization, dict) or quantization.get("quant_method") != "mxfp4"):
        raise _config_error(f"quantization_config must have quant_method 'mxfp4' (or be absent), got {quantization!r}")


def gptoss_config_from_dict(raw: dict) -> GptOssConfig:
    """Validated GptOssConfig from a parsed config.json (either rope style; attention "eager")."""
    if not isinstance(raw, dict):
        raise _config_error(f"expected a JSON object, got {type(raw).__name__}")
    _validate_config_fields(raw)
    fields = {k: v for k, v in raw.items() if k not in _FILE_ONLY_KEYS}
    fields["rope_parameters"] = _rope_parameters(raw)
    try:
        config = GptOssConfig(**fields)
    except (TypeError, ValueError, KeyError) as error:  # transformers' strict validators
        raise _config_error(f"rejected by transformers' GptOssConfig: {error}") from error
    config._attn_implementation = "eager"
    return config


def read_gptoss_config(path: str | os.PathLike) -> GptOssConfig:
    """Parse and validate <path>/config.json."""
    config_path = Path(path) / CONFIG_NAME
    if not config_path.is_file():
        raise ValueError(f"{config_path}: missing; a gpt-oss checkpoint directory needs {CONFIG_NAME}")
    try:
        raw = json.loads(config_path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as error:
        raise ValueError(f"{config_path}: not valid JSON ({error})") from error
    return gptoss_config_from_dict(raw)


def gptoss_config_to_dict(config: GptOssConfig, *, mxfp4: bool) -> dict:
    """config.json content in the published openai/gpt-oss layout (rope_scaling + rope_theta), which
    transformers 4.x and 5.x, vLLM and llama.cpp's converter all read."""
    rope = dict(config.rope_parameters)
    rope_theta = rope.pop("rope_theta")
    out = {
        "architectures": ["GptOssForCausalLM"],
        "model_type": "gpt_oss",
        "transformers_version": transformers.__version__,
        "rope_theta": rope_theta,
        "rope_scaling": None if rope.get("rope_type", "default") == "default" else rope,
    }
    for name in (
        *POSITIVE_INT_FIELDS,
        "attention_bias", "attention_dropout", "hidden_act", "initializer_range", "layer_types",
        "max_position_embeddings", "rms_norm_eps", "router_aux_loss_coef", "output_router_logits",
        "swiglu_limit", "swiglu_alpha", "tie_word_embeddings", "use_cache",
        "pad_token_id", "bos_token_id", "eos_token_id",
    ):  # fmt: skip
        if getattr(config, name, None) is not None:
            out[name] = getattr(config, name)
    if mxfp4:
        out["quantization_config"] = {
            "modules_to_not_convert": list(MXFP4_MODULES_TO_NOT_CONVERT),
            "quant_method": "mxfp4",
        }
    return dict(sorted(out.items()))


# ---------------------------------------------------------------------------------------------
# Expected tensors
# ---------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class TensorSpec:
    """One tensor the checkpoint must hold: name, shape and the config fields the shape comes from."""

    name: str
    shape: tuple[int, ...]
    source: str

    def shape_error(self, file: str, found: tuple[int, ...]) -> ValueError:
        return ValueError(
            f"{file}: {self.name} has shape {found}, expected {self.shape} from {CONFIG_NAME} {self.source}"
        )


def _fields(config: GptOssConfig, *names: str) -> str:
    return ", ".join(f"{n}={getattr(config, n)}" for n in names)


def _layer_specs(config: GptOssConfig, layer: int) -> list[TensorSpec]:
    """Every tensor of one decoder layer except the expert weight matrices (see _expert_specs)."""
    p = f"model.layers.{layer}"
    hidden, experts = config.hidden_size, config.num_local_experts
    q_dim, kv_dim = config.num_attention_heads * config.head_dim, config.num_key_value_heads * config.head_dim
    q_src = _fields(config, "num_attention_heads", "head_dim")
    kv_src = _fields(config, "num_key_value_heads", "head_dim")
    h_src, e_src = _fields(config, "hidden_size"), _fields(config, "num_local_experts")
    specs = [
        TensorSpec(f"{p}.input_layernorm.weight", (hidden,), h_src),
        TensorSpec(f"{p}.post_attention_layernorm.weight", (hidden,), h_src),
        TensorSpec(f"{p}.self_attn.q_proj.weight", (q_dim, hidden), f"{q_src}, {h_src}"),
        TensorSpec(f"{p}.self_attn.k_proj.weight", (kv_dim, hidden), f"{kv_src}, {h_src}"),
        TensorSpec(f"{p}.self_attn.v_proj.weight", (kv_dim, hidden), f"{kv_src}, {h_src}"),
        TensorSpec(f"{p}.self_attn.o_proj.weight", (hidden, q_dim), f"{h_src}, {q_src}"),
        TensorSpec(f"{p}.self_attn.sinks", (config.num_attention_heads,), _fields(config, "num_attention_heads")),
        TensorSpec(f"{p}.mlp.router.weight", (experts, hidden), f"{e_src}, {h_src}"),
        TensorSpec(f"{p}.mlp.router.bias", (experts,), e_src),
        TensorSpec(f"{p}.mlp.experts.gate_up_proj_bias", (experts, 2 * config.intermediate_size),
                   _fields(config, "num_local_experts", "intermediate_size")),
        TensorSpec(f"{p}.mlp.experts.down_proj_bias", (experts, hidden), f"{e_src}, {h_src}"),
    ]  # fmt: skip
    if config.attention_bias:
        specs += [
            TensorSpec(f"{p}.self_attn.q_proj.bias", (q_dim,), q_src),
            TensorSpec(f"{p}.self_attn.k_proj.bias", (kv_dim,), kv_src),
            TensorSpec(f"{p}.self_attn.v_proj.bias", (kv_dim,), kv_src),
            TensorSpec(f"{p}.self_attn.o_proj.bias", (hidden,), h_src),
        ]
    return specs


def _expert_in_out(config: GptOssConfig, projection: str) -> tuple[int, int, str]:
    """(in features, out features, provenance) of one expert's projection."""
    sizes = _fields(config, "num_local_experts", "hidden_size", "intermediate_size")
    if projection == "gate_up_proj":
        return config.hidden_size, 2 * config.intermediate_size, sizes
    return config.intermediate_size, config.hidden_size, sizes


def _expert_specs(config: GptOssConfig, layer: int, projection: str, mxfp4: bool) -> list[TensorSpec]:
    name = f"model.layers.{layer}.mlp.experts.{projection}"
    fan_in, fan_out, source = _expert_in_out(config, projection)
    experts = config.num_local_experts
    if not mxfp4:
        return [TensorSpec(name, (experts, fan_in, fan_out), source)]
    groups = fan_in // MXFP4_BLOCK
    return [
        TensorSpec(f"{name}_blocks", (experts, fan_out, groups, MXFP4_BLOCK // 2), source),
        TensorSpec(f"{name}_scales", (experts, fan_out, groups), source),
    ]


def _top_level_specs(config: GptOssConfig) -> tuple[list[TensorSpec], list[TensorSpec]]:
    """(specs before the layers, specs after the layers)."""
    vocab_src = _fields(config, "vocab_size", "hidden_size")
    head = [TensorSpec("model.embed_tokens.weight", (config.vocab_size, config.hidden_size), vocab_src)]
    tail = [TensorSpec("model.norm.weight", (config.hidden_size,), _fields(config, "hidden_size"))]
    if not config.tie_word_embeddings:
        tail.append(TensorSpec("lm_head.weight", (config.vocab_size, config.hidden_size), vocab_src))
    return head, tail


def layer_specs(config: GptOssConfig, layer: int, mxfp4_projections: set[str] = frozenset()) -> list[TensorSpec]:
    """Every tensor of one decoder layer in file order (see expected_tensors for `mxfp4_projections`)."""
    specs = _layer_specs(config, layer)
    for projection in EXPERT_PROJECTIONS:
        mxfp4 = f"model.layers.{layer}.mlp.experts.{projection}" in mxfp4_projections
        specs += _expert_specs(config, layer, projection, mxfp4)
    return specs


def top_level_specs(config: GptOssConfig) -> tuple[list[TensorSpec], list[TensorSpec]]:
    """(specs stored before the layers, specs after them): embeddings; final norm and lm_head."""
    return _top_level_specs(config)


def expert_names(config: GptOssConfig) -> set[str]:
    """Every expert weight stack's parameter name (what the MXFP4 / NVFP4 formats quantise)."""
    return {f"model.layers.{i}.mlp.experts.{p}" for i in range(config.num_hidden_layers) for p in EXPERT_PROJECTIONS}


def expected_tensors(config: GptOssConfig, mxfp4_projections: set[str] = frozenset()) -> list[TensorSpec]:
    """Every tensor a checkpoint for `config` holds, in file order. `mxfp4_projections` names the
    expert projections (e.g. "model.layers.0.mlp.experts.down_proj") stored as blocks + scales."""
    head, tail = _top_level_specs(config)
    specs = list(head)
    for layer in range(config.num_hidden_layers):
        specs += layer_specs(config, layer, mxfp4_projections)
    return specs + tail


def parameter_count(config: GptOssConfig) -> int:
    """Parameters of the model `config` describes (a tied lm_head counted once)."""
    total = 0
    for spec in expected_tensors(config):
        numel = 1
        for size in spec.shape:
            numel *= size
        total += numel
    return total


def _check_mxfp4_divisible(config: GptOssConfig, file: str) -> None:
    for name in ("hidden_size", "intermediate_size"):
        if getattr(config, name) % MXFP4_BLOCK:
            raise ValueError(
                f"{file}: MXFP4 experts need {name} divisible by {MXFP4_BLOCK}; "
                f"{CONFIG_NAME} has {name}={getattr(config, name)}"
            )


# ---------------------------------------------------------------------------------------------
# Shard discovery
# ---------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class StoredTensor:
    file: str  # name inside the checkpoint directory
    shape: tuple[int, ...]
    dtype: str  # safetensors dtype string: "BF16", "F32", "U8", ...


def _shard_files(directory: Path) -> tuple[list[str], dict[str, str] | None]:
    """(shard file names, weight_map from index.json or None)."""
    index_path = directory / INDEX_NAME
    if index_path.is_file():
        return _read_index(index_path)
    if (directory / SINGLE_FILE_NAME).is_file():
        return [SINGLE_FILE_NAME], None
    shards = sorted(p.name for p in directory.glob("*.safetensors"))
    if not shards:
        raise ValueError(f"{directory}: no {INDEX_NAME}, {SINGLE_FILE_NAME} or *.safetensors files")
    return shards, None


def _read_index(index_path: Path) -> tuple[list[str], dict[str, str]]:
    try:
        index = json.loads(index_path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as error:
        raise ValueError(f"{index_path}: not valid JSON ({error})") from error
    weight_map = index.get("weight_map") if isinstance(index, dict) else None
    if not isinstance(weight_map, dict) or not weight_map:
        raise ValueError(f"{index_path}: needs a non-empty object 'weight_map' of tensor name -> shard file")
    for name, file in weight_map.items():
        if not isinstance(file, str) or Path(file).name != file or not file.endswith(".safetensors"):
            raise ValueError(f"{index_path}: weight_map[{name!r}] = {file!r} is not a .safetensors file name")
        if not (index_path.parent / file).is_file():
            raise ValueError(f"{index_path}: weight_map[{name!r}] names {file}, which does not exist")
    return sorted(set(weight_map.values())), weight_map


def _read_header(directory: Path, file: str) -> dict[str, StoredTensor]:
    try:
        with safe_open(directory / file, framework="pt") as handle:
            out = {}
            names = handle.keys()
            for name in names:
                view = handle.get_slice(name)
                out[name] = StoredTensor(file, tuple(view.get_shape()), view.get_dtype())
            return out
    except (SafetensorError, OSError) as error:
        raise ValueError(f"{file}: unreadable safetensors file ({error}); truncated or corrupt?") from error


def _inventory(directory: Path) -> dict[str, StoredTensor]:
    """Every stored tensor with its file, shape and dtype; index.json must agree with the files."""
    shards, weight_map = _shard_files(directory)
    inventory: dict[str, StoredTensor] = {}
    for file in shards:
        for name, stored in _read_header(directory, file).items():
            if name in inventory:
                raise ValueError(f"{file}: {name} is also stored in {inventory[name].file}")
            if weight_map is not None and weight_map.get(name) != file:
                listed = weight_map.get(name)
                where = f"lists it in {listed}" if listed else "does not list it"
                raise ValueError(f"{file}: holds {name} but {INDEX_NAME} {where}")
            inventory[name] = stored
    for name, file in (weight_map or {}).items():
        if name not in inventory:
            raise ValueError(f"{file}: {name} is listed in {INDEX_NAME} but not stored in the file")
    return inventory


def _mxfp4_projections(config: GptOssConfig, inventory: dict[str, StoredTensor]) -> set[str]:
    projections = set()
    for layer in range(config.num_hidden_layers):
        for projection in EXPERT_PROJECTIONS:
            name = f"model.layers.{layer}.mlp.experts.{projection}"
            if f"{name}_blocks" in inventory or f"{name}_scales" in inventory:
                projections.add(name)
                _check_mxfp4_divisible(config, inventory.get(f"{name}_blocks", inventory.get(f"{name}_scales")).file)
    return projections


def _validate_inventory(directory: Path, config: GptOssConfig, inventory: dict[str, StoredTensor]) -> list[TensorSpec]:
    specs = expected_tensors(config, _mxfp4_projections(config, inventory))
    searched = ", ".join(sorted({t.file for t in inventory.values()}))
    for spec in specs:
        stored = inventory.get(spec.name)
        if stored is None:
            raise ValueError(
                f"{directory}: {spec.name} is missing (expected shape {spec.shape} from {CONFIG_NAME} "
                f"{spec.source}); searched {searched}"
            )
        if stored.shape != spec.shape:
            raise spec.shape_error(stored.file, stored.shape)
        is_packed = spec.name.endswith(("_blocks", "_scales"))
        if is_packed and stored.dtype != "U8":
            raise ValueError(f"{stored.file}: {spec.name} has dtype {stored.dtype}, expected U8 (MXFP4)")
        if not is_packed and stored.dtype not in ("BF16", "F16", "F32"):
            raise ValueError(f"{stored.file}: {spec.name} has dtype {stored.dtype}, expected BF16, F16 or F32")
    expected_names = {spec.name for spec in specs}
    for name, stored in inventory.items():
        if name not in expected_names:
            raise ValueError(f"{stored.file}: unexpected tensor {name} (not part of gpt-oss with this {CONFIG_NAME})")
    return specs


# ---------------------------------------------------------------------------------------------
# Loading
# ---------------------------------------------------------------------------------------------


def _set_parameter(model: torch.nn.Module, name: str, value: torch.Tensor) -> None:
    module_name, _, leaf = name.rpartition(".")
    module = model.get_submodule(module_name)
    module._parameters[leaf] = torch.nn.Parameter(value, requires_grad=True)


def _materialise_buffers(model: GptOssForCausalLM, device: torch.device) -> None:
    """Rebuild modules whose non-persistent buffers were created on the meta device (rotary tables)."""
    for name, module in list(model.named_modules()):
        if not any(b.is_meta for b in module.buffers(recurse=False)):
            continue
        if not hasattr(module, "inv_freq"):
            raise RuntimeError(f"load_gptoss: no rule to build the buffers of {name} ({type(module).__name__})")
        with torch.device(device):
            rebuilt = type(module)(config=model.config)
        parent_name, _, leaf = name.rpartition(".")
        setattr(model.get_submodule(parent_name), leaf, rebuilt)


def _stream_parameters(directory: Path, inventory: dict[str, StoredTensor], dtype: torch.dtype, device: torch.device):
    """Yield (parameter name, tensor in the transformers layout), reading one shard at a time.
    MXFP4 blocks and scales may sit in different shards; the first half waits for its partner."""
    pending: dict[str, torch.Tensor] = {}
    for file in sorted({t.file for t in inventory.values()}):
        with safe_open(directory / file, framework="pt", device="cpu") as handle:
            names = handle.keys()
            for name in names:
                tensor = handle.get_tensor(name)
                if not name.endswith(("_blocks", "_scales")):
                    yield name, tensor.to(device=device, dtype=dtype)
                    continue
                base, _, kind = name.rpartition("_")
                partner = f"{base}_{'scales' if kind == 'blocks' else 'blocks'}"
                if partner not in pending:
                    pending[name] = tensor
                    continue
                blocks, scales = (tensor, pending.pop(partner)) if kind == "blocks" else (pending.pop(partner), tensor)
                yield base, _dequantise_experts(blocks, scales, dtype, device)


def _dequantise_experts(blocks: torch.Tensor, scales: torch.Tensor, dtype: torch.dtype, device: torch.device):
    """Stored [E, out, in] MXFP4 -> [E, in, out] parameter, one expert at a time so the float32 and
    index scratch stays one expert's size (a whole 20B layer would need ~10 GB of it)."""
    experts, fan_out, groups = scales.shape
    out = torch.empty(experts, groups * MXFP4_BLOCK, fan_out, dtype=dtype, device=device)
    for expert in range(experts):
        dequantised = mxfp4_dequantize(blocks[expert].to(device), scales[expert].to(device), dtype=dtype)
        out[expert] = dequantised.transpose(0, 1)
    return out


def _plain_or_mxfp4(stored: dict[str, torch.Tensor], name: str, dtype: torch.dtype) -> torch.Tensor:
    """Parameter `name` from its stored tensor(s), as load_gptoss turns them into parameters."""
    if f"{name}_blocks" in stored:
        return _dequantise_experts(stored[f"{name}_blocks"], stored[f"{name}_scales"], dtype, torch.device("cpu"))
    return stored[name].to(device="cpu", dtype=dtype)


class CheckpointReader:
    """Chosen parameters of a checkpoint directory, without loading the rest: the streaming export reads
    one decoder layer at a time. Validated as load_gptoss validates unless `config` is given: formats whose
    config.json read_gptoss_config does not accept (NVFP4) pass theirs, a `decode(stored, name, dtype)` and
    the `suffixes` under which a quantised parameter is stored."""

    def __init__(self, path: str | os.PathLike, config: GptOssConfig | None = None, decode=_plain_or_mxfp4,
                 suffixes: tuple[str, ...] = ("_blocks", "_scales")):  # fmt: skip
        self.directory = Path(path)
        if not self.directory.is_dir():
            raise ValueError(f"{self.directory}: not a directory")
        self.inventory = _inventory(self.directory)
        if config is None:
            config = read_gptoss_config(self.directory)
            _validate_inventory(self.directory, config, self.inventory)
        self.config, self._decode, self._suffixes = config, decode, suffixes

    def stored(self, names: list[str]) -> dict[str, torch.Tensor]:
        """Stored tensors by name, as in the files; each shard is opened once and closed again (its pages
        leave the process: a long stream of layers does not accumulate the mapped files)."""
        missing = [name for name in names if name not in self.inventory]
        if missing:
            raise ValueError(f"{self.directory}: {missing[0]} is not stored in this checkpoint")
        out: dict[str, torch.Tensor] = {}
        for file in sorted({self.inventory[name].file for name in names}):
            with safe_open(self.directory / file, framework="pt", device="cpu") as handle:
                for name in names:
                    if self.inventory[name].file == file:
                        out[name] = handle.get_tensor(name)
        return out

    def stored_names(self, name: str) -> list[str]:
        """The stored tensors parameter `name` is made of: itself, or its quantised parts."""
        if name in self.inventory:
            return [name]
        return [name + suffix for suffix in self._suffixes if name + suffix in self.inventory] or [name]

    def read(self, names: list[str], dtype: torch.dtype = torch.float32) -> dict[str, torch.Tensor]:
        """{parameter name: tensor in the transformers layout, dtype}; quantised experts dequantised. One
        parameter at a time: its stored copy is dropped before the next is read."""
        return {name: self._decode(self.stored(self.stored_names(name)), name, dtype) for name in names}


def load_gptoss(
    path: str | os.PathLike, dtype: torch.dtype = torch.float32, device: str | torch.device = "cpu"
) -> GptOssForCausalLM:
    """GptOssForCausalLM in eval mode with eager attention from a local checkpoint directory.

    Accepts unquantised and MXFP4 experts (dequantised to dtype). Raises ValueError naming the
    file and the tensor or config field on any mismatch."""
    if dtype not in LOADABLE_DTYPES:
        raise ValueError(f"load_gptoss: dtype must be one of {LOADABLE_DTYPES}, got {dtype}")
    directory, device = Path(path), torch.device(device)
    if not directory.is_dir():
        raise ValueError(f"{directory}: not a directory")
    config = read_gptoss_config(directory)
    inventory = _inventory(directory)
    specs = _validate_inventory(directory, config, inventory)
    with torch.device("meta"):
        model = GptOssForCausalLM(config)
    for name, tensor in _stream_parameters(directory, inventory, dtype, device):
        _set_parameter(model, name, tensor)
    if config.tie_word_embeddings:
        model.lm_head.weight = model.model.embed_tokens.weight
    _materialise_buffers(model, device)
    still_meta = [n for n, p in model.named_parameters() if p.is_meta]
    if still_meta:  # every spec was present, so this means the model has parameters we do not know
        raise RuntimeError(f"load_gptoss: parameters {still_meta[:5]} not covered by {len(specs)} checkpoint tensors")
    return model.eval()


# ---------------------------------------------------------------------------------------------
# Writing
# ---------------------------------------------------------------------------------------------


def _quantise_experts(weight: torch.Tensor, scale_rounding: str) -> tuple[torch.Tensor, torch.Tensor]:
    """[E, in, out] parameter -> MXFP4 (blocks [E, out, in/32, 16], scales [E, out, in/32]) on CPU,
    one expert at a time to bound the float32 scratch memory."""
    pairs = [mxfp4_quantize(w.detach().transpose(0, 1), scale_rounding=scale_rounding) for w in weight]
    return torch.stack([b.cpu() for b, _ in pairs]), torch.stack([s.cpu() for _, s in pairs])


def encode_tensors(state, specs: list[TensorSpec], dtype: torch.dtype, scale_rounding: str):
    """Yield (stored name, CPU tensor) in spec order from `state` (parameter name -> tensor; the whole
    model's state dict, or one layer's for the streaming export): experts with `_blocks` specs as MXFP4,
    everything else in `dtype`."""
    index = 0
    while index < len(specs):
        spec = specs[index]
        if spec.name.endswith("_blocks"):
            blocks, scales = _quantise_experts(state[spec.name.removesuffix("_blocks")], scale_rounding)
            yield spec.name, blocks
            yield specs[index + 1].name, scales
            index += 2
            continue
        yield spec.name, state[spec.name].detach().to(device="cpu", dtype=dtype).contiguous()
        index += 1


def planned_tensor(spec: TensorSpec, dtype: torch.dtype) -> PlannedTensor:
    """What `spec` is stored as: MXFP4 blocks and scales are uint8, everything else `dtype`."""
    is_packed = spec.name.endswith(("_blocks", "_scales"))
    return PlannedTensor(spec.name, torch.uint8 if is_packed else dtype, spec.shape)


def checkpoint_plan(config: GptOssConfig, mxfp4: bool, dtype: torch.dtype) -> list[PlannedTensor]:
    """Every stored tensor of a write_gptoss checkpoint, in file order."""
    specs = expected_tensors(config, expert_names(config) if mxfp4 else set())
    return [planned_tensor(spec, dtype) for spec in specs]


def _check_model_tensors(model: GptOssForCausalLM, specs: list[TensorSpec]) -> None:
    state = model.state_dict()
    for spec in specs:
        name = spec.name.removesuffix("_blocks").removesuffix("_scales")
        if name not in state:
            raise ValueError(f"write_gptoss: model has no tensor {name} (merge or unwrap adapters first)")
        if not spec.name.endswith(("_blocks", "_scales")) and tuple(state[name].shape) != spec.shape:
            found = tuple(state[name].shape)
            raise ValueError(f"write_gptoss: {name} has shape {found}, expected {spec.shape} from its config")
    expected = {spec.name.removesuffix("_blocks").removesuffix("_scales") for spec in specs}
    if model.config.tie_word_embeddings:
        expected.add("lm_head.weight")  # the same tensor as embed_tokens; not stored twice
    unknown = sorted(n for n in state if n not in expected)
    if unknown:
        raise ValueError(f"write_gptoss: model has tensors outside the gpt-oss layout: {unknown[:5]}")


def _write_into(directory: Path, model: GptOssForCausalLM, mxfp4: bool, dtype: torch.dtype,
                max_shard_bytes: int, scale_rounding: str) -> None:  # fmt: skip
    config = model.config
    specs = expected_tensors(config, expert_names(config) if mxfp4 else set())
    _check_model_tensors(model, specs)
    shards = plan_shards([planned_tensor(spec, dtype) for spec in specs], max_shard_bytes)
    stream = encode_tensors(model.state_dict(), specs, dtype, scale_rounding)
    weight_map, total_bytes = {}, 0
    for file, shard in zip(shard_file_names(len(shards)), shards):
        tensors = dict(next(stream) for _ in shard)
        save_file(tensors, directory / file, metadata={"format": "pt"})
        total_bytes += sum(t.numel() * t.element_size() for t in tensors.values())
        weight_map.update(dict.fromkeys(tensors, file))
        del tensors
    write_index(directory, weight_map, total_bytes)
    write_config_json(directory, config, mxfp4)


def write_config_json(directory: Path, config: GptOssConfig, mxfp4: bool) -> None:
    (directory / CONFIG_NAME).write_text(json.dumps(gptoss_config_to_dict(config, mxfp4=mxfp4), indent=2) + "\n")


def write_gptoss(
    model: GptOssForCausalLM,
    path: str | os.PathLike,
    expert_format: str = "bf16",
    *,
    dtype: torch.dtype = torch.bfloat16,
    max_shard_bytes: int = 5 * 2**30,
    tokenizer_json_path: str | os.PathLike | None = None,
    overwrite: bool = False,
    mxfp4_scale_rounding: str = "floor",
) -> Path:
    """Write `model` as a gpt-oss checkpoint directory with the original tensor names and layouts.

    expert_format "bf16" stores experts unquantised (in `dtype`, like every other tensor);
    "mxfp4" stores them as blocks + scales and adds quantization_config to config.json. Everything
    is written to a temporary sibling directory that is renamed into place at the end."""
    if expert_format not in ("bf16", "mxfp4"):
        raise ValueError(f"write_gptoss: expert_format must be 'bf16' or 'mxfp4', got {expert_format!r}")
    if dtype not in LOADABLE_DTYPES:
        raise ValueError(f"write_gptoss: dtype must be one of {LOADABLE_DTYPES}, got {dtype}")
    if max_shard_bytes <= 0:
        raise ValueError(f"write_gptoss: max_shard_bytes must be positive, got {max_shard_bytes}")
    target = Path(path)
    if target.exists() and not overwrite:
        raise ValueError(f"{target}: already exists (pass overwrite=True to replace it)")
    if tokenizer_json_path is not None and not Path(tokenizer_json_path).is_file():
        raise ValueError(f"{tokenizer_json_path}: tokenizer file not found")
    target.parent.mkdir(parents=True, exist_ok=True)
    staging = target.parent / f".{target.name}.tmp-{os.getpid()}"
    shutil.rmtree(staging, ignore_errors=True)
    staging.mkdir()
    try:
        if expert_format == "mxfp4":
            _check_mxfp4_divisible(model.config, "write_gptoss")
        _write_into(staging, model, expert_format == "mxfp4", dtype, max_shard_bytes, mxfp4_scale_rounding)
        if tokenizer_json_path is not None:
            shutil.copyfile(tokenizer_json_path, staging / TOKENIZER_NAME)
        _replace_directory(staging, target)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    return target


def _replace_directory(staging: Path, target: Path) -> None:
    """Rename staging to target; an existing target is moved aside first and removed after."""
    if not target.exists():
        staging.rename(target)
        return
    retired = target.parent / f".{target.name}.old-{os.getpid()}"
    shutil.rmtree(retired, ignore_errors=True)
    target.rename(retired)
    staging.rename(target)
    shutil.rmtree(retired, ignore_errors=True)
