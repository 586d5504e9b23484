"""LoRA for GPT-OSS (attention projections and MoE experts) and its exchange in PEFT's adapter format.

Own modules instead of wrapping the model with PEFT: PEFT's `target_parameters` LoRA materialises
`W + scaling * A @ B` for every expert stack on every forward, which the split-LoRA experts of
model/moe.py avoid. The adapters we save are nevertheless PEFT's exactly (adapter_config.json +
adapter_model.safetensors), so `peft.PeftModel.from_pretrained` and servers that read PEFT adapters
load them unchanged. `merge_adapter` / `merge_lora` fold an adapter into plain transformers weights (in
float32) for export and QAT. The export streams big models one decoder layer at a time, so the pieces
work on one layer too: `apply_lora_to_layer`, `load_lora_tensors(prefix=...)`, `iter_peft_deltas(prefix=...)`,
`add_deltas` and `plain_layer` are what apply_lora, load_adapter, merge_adapter and plain_model are made of.

PEFT's layout for a 3-D expert parameter W [E, in, out] (transformers' GptOssExperts is
`is_transposed`, so in/out are not swapped): lora_A.weight is (E*r, in) read expert-slowest, i.e.
`reshape(E, r, in)`, while lora_B.weight is (out, E*r) read expert-FASTEST, i.e. `reshape(out, r, E)`
(see ParamWrapper.get_delta_weight: einsum "o r e, e r i -> e i o"). When both gate_up_proj and
down_proj of one `mlp.experts` are targeted PEFT nests two ParamWrappers in the order the parameters
are registered, so gate_up_proj's keys carry an extra `.base_layer`:
  ...mlp.experts.base_layer.lora_{A,B}.weight -> gate_up_proj,  ...mlp.experts.lora_{A,B}.weight -> down_proj.
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import shutil
from pathlib import Path

import torch
import torch.nn.functional as F
from safetensors.torch import load_file, save_file
from torch import nn

from rustforge.config import LoraConfig
from rustforge.model.moe import (
    EXPERT_TARGETS,
    GroupedExperts,
    ReferenceLoraExperts,
    add_expert_lora,
    dense_expert_params,
    expert_lora_targets,
    lora_param_names,
)

ATTENTION_TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj")
KNOWN_TARGETS = ATTENTION_TARGETS + EXPERT_TARGETS
PEFT_PREFIX = "base_model.model."
ADAPTER_WEIGHTS = "adapter_model.safetensors"
ADAPTER_CONFIG = "adapter_config.json"
FUSED_PROJECTIONS = True  # LoraLinear through _LoraProjections; False: PEFT's expression in plain autograd


class LoraLinear(nn.Module):
    """base_layer(x) + B(A(dropout(x))) * alpha / r around a frozen nn.Linear (PEFT's lora.Linear math).

    A and B are float32 (PEFT's autocast_adapter_dtype) and cast to the input dtype in forward, so the
    activations autograd saves stay in the model dtype."""

    def __init__(self, base_layer: nn.Linear, r: int, alpha: float, dropout: float = 0.0):
        super().__init__()
        if not isinstance(base_layer, nn.Linear):
            raise TypeError(f"LoraLinear wraps nn.Linear, got {type(base_layer).__name__}")
        self.base_layer = base_layer.requires_grad_(False)
        self.in_features, self.out_features = base_layer.in_features, base_layer.out_features
        self.r, self.scaling = r, alpha / r
        device = base_layer.weight.device
        self.lora_A = nn.Parameter(torch.empty(r, self.in_features, device=device))
        self.lora_B = nn.Parameter(torch.zeros(self.out_features, r, device=device))
        self.lora_dropout = nn.Dropout(dropout) if dropout > 0 else nn.Identity()
        self.reset_lora_parameters()

    def reset_lora_parameters(self) -> None:
        # drawn on the CPU so the init does not depend on the device
        a = torch.empty(self.lora_A.shape)
        nn.init.kaiming_uniform_(a, a=math.sqrt(5))
        with torch.no_grad():
            self.lora_A.copy_(a)
            self.lora_B.zero_()

    @property
    def weight(self) -> torch.Tensor:
        return self.base_layer.weight

    @property
    def bias(self) -> torch.Tensor | None:
        return self.base_layer.bias

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if FUSED_PROJECTIONS and isinstance(self.lora_dropout, nn.Identity):
            return lora_projections(x, [self])[0]
        return self.reference_forward(x)

    def reference_forward(self, x: torch.Tensor) -> torch.Tensor:
        """PEFT's lora.Linear expression in plain autograd (the test reference; the path with dropout)."""
        lora = F.linear(F.linear(self.lora_dropout(x), self.lora_A.to(x.dtype)), self.lora_B.to(x.dtype))
        return self.base_layer(x) + lora * self.scaling

    def extra_repr(self) -> str:
        return f"in={self.in_features}, out={self.out_features}, r={self.r}, scaling={self.scaling}"


class _LoraProjections(torch.autograd.Function):
    """Projections of one input x [N, in]: y_i = x @ W_i^T + b_i + (x @ A_i^T) @ (s_i * B_i)^T, W and b frozen.

    The LoRA term is accumulated into the base GEMM's output by the GEMM itself (addmm_ with beta=1), not
    by a scale and an add over [N, out]; the A factors of all projections share one GEMM and one read of
    x each way (q, k and v of an attention layer take one call). Saves x and x @ A^T [N, sum r]; the
    frozen weights are held on ctx by reference, so activation offloading never copies them. Computes in
    the autocast dtype when autocast is on (as F.linear would), the LoRA parameters cast to it (PEFT's
    float32 adapters). Own code: PEFT's lora.Linear runs the scale and the add as separate passes."""

    @staticmethod
    def forward(ctx, x, layout, *tensors):
        # layout: per projection (has_bias, rank, scaling); tensors: W, [b], [A, B] for each, in order
        device_type = x.device.type
        dtype = torch.get_autocast_dtype(device_type) if torch.is_autocast_enabled(device_type) else x.dtype
        with torch.autocast(device_type, enabled=False):
            x2 = x.reshape(-1, x.shape[-1]).to(dtype)
            weights, biases, lora_A, scaled_B, lora_dtype = _unpack_projections(layout, tensors, dtype)
            xa = x2 @ torch.cat(lora_A).t() if lora_A else None
            outs, col = [], 0
            for (_, rank, _), weight, bias, b in zip(layout, weights, biases, scaled_B):
                y = torch.addmm(bias, x2, weight.t()) if bias is not None else x2 @ weight.t()
                if rank:
                    y.addmm_(xa[:, col : col + rank], b.t())
                    col += rank
                outs.append(y.view(*x.shape[:-1], y.shape[-1]))
        ctx.layout, ctx.x_dtype, ctx.x_shape = layout, x.dtype, x.shape
        ctx.lora_dtype = lora_dtype
        ctx.weights = weights  # by reference, not saved: activation offloading must not copy weights to the host
        ctx.save_for_backward(x2, xa, *lora_A, *(b for b in scaled_B if b is not None))
        return tuple(outs)

    @staticmethod
    def backward(ctx, *grads):
        layout, weights = ctx.layout, ctx.weights
        x2, xa, *factors = ctx.saved_tensors
        lora_A, scaled_B = factors[: len(factors) // 2], factors[len(factors) // 2 :]
        with torch.autocast(x2.device.type, enabled=False):
            gs = [torch.zeros(x2.shape[0], w.shape[0], dtype=x2.dtype, device=x2.device) if g is None
                  else g.reshape(-1, w.shape[0]).to(x2.dtype) for g, w in zip(grads, weights)]
            lora_gs = [(g, scaling) for (_, rank, scaling), g in zip(layout, gs) if rank]
            grad_x = None
            if ctx.needs_input_grad[0]:
                for g, weight in zip(gs, weights):
                    grad_x = g @ weight if grad_x is None else grad_x.addmm_(g, weight)
            lora_grads = []
            if lora_gs:
                # d loss / d (x A^T) for every projection at once: [N, sum r], the scaling inside B
                g_xa = torch.cat([g @ b for (g, _), b in zip(lora_gs, scaled_B)], dim=1)
                if grad_x is not None:
                    grad_x.addmm_(g_xa, torch.cat(lora_A))
                grad_A_all = (g_xa.t() @ x2).to(ctx.lora_dtype)
                col = 0
                for (g, scaling), a in zip(lora_gs, lora_A):
                    rank = a.shape[0]
                    grad_B = (g.t() @ xa[:, col : col + rank]).to(ctx.lora_dtype).mul_(scaling)
                    lora_grads.append((grad_A_all[col : col + rank], grad_B))
                    col += rank
        out = [None if grad_x is None else grad_x.view(ctx.x_shape).to(ctx.x_dtype), None]
        next_lora = iter(lora_grads)
        for has_bias, rank, _ in layout:
            out.append(None)  # the frozen weight
            if has_bias:
                out.append(None)
            if rank:
                out.extend(next(next_lora))
        return tuple(out)


def _unpack_projections(layout, tensors, dtype):
    """(weights, biases or None, LoRA A factors, scaled B factors) in `dtype`, from _LoraProjections' flat args,
    and the LoRA parameters' own dtype (their gradients' dtype; None without LoRA)."""
    weights, biases, lora_A, scaled_B, lora_dtype = [], [], [], [], None
    it = iter(tensors)

    def cast(t):  # skipping the no-op .to() saves host time: this runs for every projection of every layer
        return t if t.dtype == dtype else t.to(dtype)

    for has_bias, rank, scaling in layout:
        weights.append(cast(next(it)))
        biases.append(cast(next(it)) if has_bias else None)
        if rank:
            a = next(it)
            lora_A.append(a.to(dtype))
            scaled_B.append((next(it) * scaling).to(dtype))
            lora_dtype = a.dtype
        else:
            scaled_B.append(None)
    return weights, biases, lora_A, scaled_B, lora_dtype


def lora_projections(x: torch.Tensor, projections: list[nn.Module]) -> tuple[torch.Tensor, ...]:
    """Each projection (a LoraLinear without dropout, or a plain nn.Linear) of x, by one _LoraProjections."""
    layout, tensors = [], []
    for proj in projections:
        base = proj.base_layer if isinstance(proj, LoraLinear) else proj
        rank = proj.r if isinstance(proj, LoraLinear) and proj.scaling != 0 else 0
        layout.append((base.bias is not None, rank, proj.scaling if rank else 0.0))
        tensors.append(base.weight)
        if base.bias is not None:
            tensors.append(base.bias)
        if rank:
            tensors.extend((proj.lora_A, proj.lora_B))
    return _LoraProjections.apply(x, tuple(layout), *tensors)


# --------------------------------------------------------------------------------------------- apply
def _validate(cfg: LoraConfig) -> None:
    unknown = [t for t in cfg.targets if t not in KNOWN_TARGETS]
    if unknown:
        raise ValueError(f"lora.targets: unknown target(s) {unknown}; known: {list(KNOWN_TARGETS)}")
    if not cfg.targets:
        raise ValueError("lora.targets: empty; name at least one of " + ", ".join(KNOWN_TARGETS))
    if cfg.r <= 0:
        raise ValueError(f"lora.r: must be positive, got {cfg.r}")
    if not 0.0 <= cfg.dropout < 1.0:
        raise ValueError(f"lora.dropout: must be in [0, 1), got {cfg.dropout}")


def _unwrap(model: nn.Module) -> nn.Module:
    """The GptOssForCausalLM inside a RustforgeModel (attribute `hf`), or the model itself."""
    return getattr(model, "hf", model)


def apply_lora(hf_model: nn.Module, cfg: LoraConfig) -> nn.Module:
    """Freeze everything, then add LoRA to cfg.targets: LoraLinear around q/k/v/o_proj and expert LoRA
    on `mlp.experts` (transformers' GptOssExperts becomes a ReferenceLoraExperts; ours keep their type).

    Every LoRA parameter is (re)initialised here, layer by layer in a fixed order, so the init under
    torch.manual_seed is the same whatever experts module is installed."""
    _validate(cfg)
    hf_model.requires_grad_(False)
    for layer in hf_model.model.layers:
        apply_lora_to_layer(layer, cfg)
    return hf_model


def apply_lora_to_layer(layer: nn.Module, cfg: LoraConfig) -> nn.Module:
    """apply_lora on one (frozen) decoder layer."""
    layer.requires_grad_(False)
    attn = layer.self_attn
    for name in ATTENTION_TARGETS:
        if name in cfg.targets:
            current = getattr(attn, name)
            base = current.base_layer if isinstance(current, LoraLinear) else current
            setattr(attn, name, LoraLinear(base, cfg.r, cfg.alpha, cfg.dropout))
    expert_targets = [t for t in EXPERT_TARGETS if t in cfg.targets]
    if expert_targets:
        experts = layer.mlp.experts
        if not isinstance(experts, (ReferenceLoraExperts, GroupedExperts)):
            experts = ReferenceLoraExperts.from_module(experts)
            layer.mlp.experts = experts
        add_expert_lora(experts, cfg.r, cfg.alpha, expert_targets)
    return layer


# ---------------------------------------------------------------------------------------------- PEFT
def _expert_key_prefixes(module_name: str, targets: list[str]) -> dict[str, str]:
    """PEFT's module path of each targeted expert parameter (nested ParamWrappers, see module doc)."""
    nested = len(targets) == 2
    return {
        proj: f"{PEFT_PREFIX}{module_name}" + (".base_layer" if nested and proj == "gate_up_proj" else "")
        for proj in targets
    }


def _lora_modules(model: nn.Module, prefix: str = ""):
    """(prefix + name, module) of every module carrying LoRA, in module order. `prefix` places a lone
    decoder layer in its model ("model.layers.3.")."""
    for name, module in _unwrap(model).named_modules():
        if isinstance(module, LoraLinear) or (name and expert_lora_targets(module)):
            yield prefix + name, module


def expert_lora_to_peft(lora_A: torch.Tensor, lora_B: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Ours (A [E, in, r], B [E, r, out]) -> PEFT's (lora_A (E*r, in), lora_B (out, E*r) expert-fastest)."""
    E, d_in, r = lora_A.shape
    peft_A = lora_A.detach().transpose(1, 2).reshape(E * r, d_in).contiguous()
    peft_B = lora_B.detach().permute(2, 1, 0).reshape(lora_B.shape[2], r * E).contiguous()
    return peft_A, peft_B


def expert_lora_from_peft(peft_A: torch.Tensor, peft_B: torch.Tensor, num_experts: int):
    """Inverse of expert_lora_to_peft."""
    d_in, d_out = peft_A.shape[1], peft_B.shape[0]
    r = peft_A.shape[0] // num_experts
    lora_A = peft_A.reshape(num_experts, r, d_in).transpose(1, 2)
    lora_B = peft_B.reshape(d_out, r, num_experts).permute(2, 1, 0)
    return lora_A, lora_B


def lora_state_dict_peft(model: nn.Module, prefix: str = "") -> dict[str, torch.Tensor]:
    """All LoRA weights under PEFT's saved key names and shapes (what adapter_model.safetensors holds)."""
    out: dict[str, torch.Tensor] = {}
    for name, module in _lora_modules(model, prefix):
        if isinstance(module, LoraLinear):
            out[f"{PEFT_PREFIX}{name}.lora_A.weight"] = module.lora_A.detach()
            out[f"{PEFT_PREFIX}{name}.lora_B.weight"] = module.lora_B.detach()
            continue
        targets = expert_lora_targets(module)
        for proj, key_prefix in _expert_key_prefixes(name, targets).items():
            name_A, name_B = lora_param_names(proj)
            peft_A, peft_B = expert_lora_to_peft(getattr(module, name_A), getattr(module, name_B))
            out[f"{key_prefix}.lora_A.weight"] = peft_A
            out[f"{key_prefix}.lora_B.weight"] = peft_B
    return out


def _lora_settings(model: nn.Module) -> tuple[int, float, list[str], list[str]]:
    """(r, scaling, target_modules, target_parameters) found on the model; one r and scaling only."""
    ranks, scalings, modules, params = set(), set(), set(), set()
    for name, module in _lora_modules(model):
        if isinstance(module, LoraLinear):
            ranks.add(module.r)
            scalings.add(module.scaling)
            modules.add(name.rsplit(".", 1)[-1])
        else:
            ranks.add(module.lora_r)
            scalings.add(module.lora_scaling)
            params.update(f"mlp.experts.{p}" for p in expert_lora_targets(module))
    if not ranks:
        raise ValueError("model has no LoRA modules; call apply_lora first")
    if len(ranks) > 1 or len(scalings) > 1:
        raise ValueError(f"model mixes LoRA ranks {sorted(ranks)} / scalings {sorted(scalings)}; PEFT needs one")
    ordered_params = [f"mlp.experts.{p}" for p in EXPERT_TARGETS if f"mlp.experts.{p}" in params]
    return ranks.pop(), scalings.pop(), sorted(modules), ordered_params


def peft_adapter_config(cfg: LoraConfig, base_model_name_or_path: str | None = None) -> dict:
    """adapter_config.json content for cfg. PEFT refuses dropout on parameter targets (it cannot be
    factored out of x @ (W + dW)); dropout only matters in training, so it is recorded as 0 then."""
    _validate(cfg)
    target_modules = [t for t in ATTENTION_TARGETS if t in cfg.targets]
    target_parameters = [f"mlp.experts.{t}" for t in EXPERT_TARGETS if t in cfg.targets]
    alpha = int(cfg.alpha) if float(cfg.alpha).is_integer() else cfg.alpha
    return {
        "peft_type": "LORA",
        "task_type": "CAUSAL_LM",
        "base_model_name_or_path": base_model_name_or_path,
        "revision": None,
        "r": cfg.r,
        "lora_alpha": alpha,
        "lora_dropout": 0.0 if target_parameters else cfg.dropout,
        # [] (not None): None would let PEFT substitute its default targets for the architecture
        "target_modules": sorted(target_modules),
        "target_parameters": target_parameters or None,
        "bias": "none",
        "fan_in_fan_out": False,
        "use_rslora": False,
        "use_dora": False,
        "lora_bias": False,
        "init_lora_weights": True,
        "inference_mode": True,
        "modules_to_save": None,
        "layers_to_transform": None,
        "layers_pattern": None,
        "rank_pattern": {},
        "alpha_pattern": {},
    }


def _check_cfg_matches_model(model: nn.Module, cfg: LoraConfig) -> None:
    r, scaling, modules, params = _lora_settings(model)
    want = peft_adapter_config(cfg)
    if r != cfg.r or not math.isclose(scaling, cfg.alpha / cfg.r):
        raise ValueError(f"lora: model has r={r}, scaling={scaling} but the config says r={cfg.r}, alpha={cfg.alpha}")
    if modules != want["target_modules"] or params != (want["target_parameters"] or []):
        raise ValueError(
            f"lora.targets: model has LoRA on {modules + params}, config targets "
            f"{want['target_modules'] + (want['target_parameters'] or [])}"
        )


def save_adapter(model: nn.Module, cfg: LoraConfig, directory: str | Path, base_model_name_or_path: str | None = None):
    """Write a PEFT adapter (adapter_config.json + adapter_model.safetensors) atomically: everything goes
    to a temporary sibling directory that is then renamed over `directory`."""
    _check_cfg_matches_model(model, cfg)
    directory = Path(directory)
    directory.parent.mkdir(parents=True, exist_ok=True)
    tmp = directory.with_name(f".{directory.name}.tmp-{os.getpid()}")
    old = directory.with_name(f".{directory.name}.old-{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir()
    tensors = {k: v.detach().cpu().contiguous() for k, v in lora_state_dict_peft(model).items()}
    save_file(tensors, str(tmp / ADAPTER_WEIGHTS), metadata={"format": "pt"})
    config = peft_adapter_config(cfg, base_model_name_or_path)
    (tmp / ADAPTER_CONFIG).write_text(json.dumps(config, indent=2) + "\n")
    if directory.exists():
        directory.rename(old)
    tmp.rename(directory)
    shutil.rmtree(old, ignore_errors=True)
    return directory


def _read_adapter_config(path: Path) -> dict:
    if not path.is_file():
        raise FileNotFoundError(f"{path}: adapter config not found")
    try:
        config = json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise ValueError(f"{path}: not valid JSON: {e}") from None
    checks = {
        "peft_type": lambda v: v == "LORA",
        "r": lambda v: isinstance(v, int) and v > 0,
        "lora_alpha": lambda v: isinstance(v, (int, float)),
        "use_rslora": lambda v: not v,
        "use_dora": lambda v: not v,
        "rank_pattern": lambda v: not v,
        "alpha_pattern": lambda v: not v,
    }
    for key, ok in checks.items():
        if key in ("peft_type", "r", "lora_alpha") and key not in config:
            raise ValueError(f"{path}: missing field {key!r}")
        if key in config and not ok(config[key]):
            raise ValueError(f"{path}: field {key!r} = {config[key]!r} is not supported")
    return config


def load_adapter(model: nn.Module, directory: str | Path) -> nn.Module:
    """Load a PEFT adapter into the model's LoRA parameters (the model must already have LoRA on the
    same targets with the same rank); scaling is taken from the file's lora_alpha / r."""
    tensors, config = read_peft_adapter(directory)
    return load_lora_tensors(model, tensors, config, Path(directory) / ADAPTER_WEIGHTS)


def load_lora_tensors(model: nn.Module, loaded: dict[str, torch.Tensor], config: dict, where, prefix: str = ""):
    """load_adapter from an adapter's (tensors, config). With `prefix` (a lone decoder layer placed in its
    model, "model.layers.3."), only the adapter's keys under that prefix must match the module's."""
    expected = lora_state_dict_peft(model, prefix)
    in_scope = [k for k in loaded if k.startswith(f"{PEFT_PREFIX}{prefix}")] if prefix else list(loaded)
    missing = [k for k in expected if k not in loaded]
    if missing:
        raise KeyError(f"{where}: missing key {missing[0]!r} ({len(missing)} missing in all)")
    unexpected = [k for k in in_scope if k not in expected]
    if unexpected:
        raise KeyError(f"{where}: unexpected key {unexpected[0]!r} ({len(unexpected)} unexpected in all)")
    for key, tensor in expected.items():
        if loaded[key].shape != tensor.shape:
            raise ValueError(
                f"{where}: key {key!r} has shape {tuple(loaded[key].shape)}, "
                f"the model expects {tuple(tensor.shape)}"
            )
    scaling = config["lora_alpha"] / config["r"]
    with torch.no_grad():
        for name, module in _lora_modules(model, prefix):
            if isinstance(module, LoraLinear):
                module.lora_A.copy_(loaded[f"{PEFT_PREFIX}{name}.lora_A.weight"])
                module.lora_B.copy_(loaded[f"{PEFT_PREFIX}{name}.lora_B.weight"])
                module.scaling = scaling
                continue
            targets = expert_lora_targets(module)
            for proj, key_prefix in _expert_key_prefixes(name, targets).items():
                lora_A, lora_B = expert_lora_from_peft(
                    loaded[f"{key_prefix}.lora_A.weight"], loaded[f"{key_prefix}.lora_B.weight"], module.num_experts
                )
                name_A, name_B = lora_param_names(proj)
                getattr(module, name_A).copy_(lora_A)
                getattr(module, name_B).copy_(lora_B)
            module.lora_scaling = scaling
    return model


@contextlib.contextmanager
def lora_disabled(model: nn.Module):
    """The model without its LoRA for the duration (PEFT's `disable_adapter()`): every LoRA scaling
    (LoraLinear.scaling, the experts' lora_scaling) is 0, then restored -- the base model's function with
    no copy of a weight. Takes a RustforgeModel or the transformers model inside it."""
    saved = []
    for _, module in _lora_modules(model):
        name = "scaling" if isinstance(module, LoraLinear) else "lora_scaling"
        saved.append((module, name, getattr(module, name)))
    try:
        for module, name, _ in saved:
            setattr(module, name, 0.0)
        yield model
    finally:
        for module, name, value in saved:
            setattr(module, name, value)


# --------------------------------------------------------------------------------------------- merge
def read_peft_adapter(directory: str | Path) -> tuple[dict[str, torch.Tensor], dict]:
    """(tensors, adapter_config) of a PEFT LoRA adapter directory, the config checked as load_adapter does."""
    directory = Path(directory)
    config = _read_adapter_config(directory / ADAPTER_CONFIG)
    weights_path = directory / ADAPTER_WEIGHTS
    if not weights_path.is_file():
        raise FileNotFoundError(f"{weights_path}: adapter weights not found")
    return load_file(str(weights_path)), config


def _expert_projection_of_key(module_path: str, config: dict, where: str) -> tuple[str, str]:
    """(experts module name, projection) of a PEFT expert key's module path (`...mlp.experts[.base_layer]`)."""
    experts_name = module_path.removesuffix(".base_layer")
    targets = [p for p in EXPERT_TARGETS if f"mlp.experts.{p}" in (config.get("target_parameters") or [])]
    for proj, prefix in _expert_key_prefixes(experts_name, targets).items():
        if prefix == f"{PEFT_PREFIX}{module_path}":
            return experts_name, proj
    raise ValueError(f"{where}: {module_path} matches no target_parameters entry {config.get('target_parameters')}")


def peft_deltas(
    tensors: dict[str, torch.Tensor], config: dict, num_experts: int, dtype: torch.dtype = torch.float32,
    where: str = "adapter", prefix: str = "",
) -> dict[str, torch.Tensor]:  # fmt: skip
    """{transformers parameter name: scaling * LoRA delta in that parameter's layout, in dtype}.

    q/k/v/o_proj: `scaling * B @ A` ([out, in], nn.Linear's weight); experts: `scaling * A_e @ B_e` per
    expert ([E, in, out], with lora_B read as reshape(out, r, E) -- see the module docstring). `prefix`
    ("model.layers.3.") keeps the keys of the modules under it: one layer's deltas, not the model's."""
    return dict(iter_peft_deltas(tensors, config, num_experts, dtype, where, prefix))


def iter_peft_deltas(
    tensors: dict[str, torch.Tensor], config: dict, num_experts: int, dtype: torch.dtype = torch.float32,
    where: str = "adapter", prefix: str = "",
):  # fmt: skip
    """peft_deltas one (name, delta) at a time, so that a caller adding them holds one delta, not all."""
    scaling = config["lora_alpha"] / config["r"]
    scope = f"{PEFT_PREFIX}{prefix}"
    tensors = {k: v for k, v in tensors.items() if k.startswith(scope)} if prefix else tensors
    unpaired = [k for k in tensors if k.endswith(".lora_B.weight") and k.replace("lora_B", "lora_A") not in tensors]
    if unpaired:
        raise KeyError(f"{where}: {unpaired[0]} has no matching lora_A")
    for key in sorted(k for k in tensors if k.endswith(".lora_A.weight")):
        module_path = key.removeprefix(PEFT_PREFIX).removesuffix(".lora_A.weight")
        key_B = key.replace(".lora_A.weight", ".lora_B.weight")
        if not key.startswith(PEFT_PREFIX) or key_B not in tensors:
            raise KeyError(f"{where}: {key} has no matching {key_B!r} or lacks the {PEFT_PREFIX!r} prefix")
        peft_A, peft_B = tensors[key].to(dtype), tensors[key_B].to(dtype)
        # scaled in place: the same product as `scaling * delta` without a second delta-sized tensor
        if module_path.rsplit(".", 1)[-1] in ATTENTION_TARGETS:
            yield f"{module_path}.weight", (peft_B @ peft_A).mul_(scaling)
            continue
        if not module_path.removesuffix(".base_layer").endswith("mlp.experts"):
            raise KeyError(f"{where}: {key} targets {module_path}, not one of {list(KNOWN_TARGETS)}")
        experts_name, proj = _expert_projection_of_key(module_path, config, where)
        lora_A, lora_B = expert_lora_from_peft(peft_A, peft_B, num_experts)
        yield f"{experts_name}.{proj}", torch.bmm(lora_A, lora_B).mul_(scaling)


def merge_adapter(hf_model: nn.Module, adapter: str | Path | tuple[dict, dict], dtype=torch.float32) -> dict:
    """Merge a PEFT adapter (directory, or (tensors, config)) into a plain transformers GptOssForCausalLM in
    place: every parameter becomes `dtype` (float32 by default: the merge happens in higher precision than
    the bf16 base) and W += delta. Returns the deltas by parameter name."""
    tensors, config = read_peft_adapter(adapter) if isinstance(adapter, (str, Path)) else adapter
    where = str(adapter) if isinstance(adapter, (str, Path)) else "adapter"
    hf_model.to(dtype)
    deltas = peft_deltas(tensors, config, hf_model.config.num_local_experts, dtype, where)
    add_deltas(dict(hf_model.named_parameters()), deltas, where)
    return deltas


def add_deltas(params: dict[str, torch.Tensor], deltas: dict[str, torch.Tensor], where: str = "adapter") -> None:
    """W += delta in place for every delta (parameter name -> tensor; a model's parameters or one layer's
    state); a delta without its parameter, or of another shape, is an error naming both."""
    with torch.no_grad():
        for name, delta in deltas.items():
            if name not in params:
                raise KeyError(f"{where}: the model has no parameter {name} (is it a plain transformers model?)")
            if params[name].shape != delta.shape:
                raise ValueError(f"{where}: delta for {name} has shape {tuple(delta.shape)}, "
                                 f"the parameter {tuple(params[name].shape)}")  # fmt: skip
            params[name].add_(delta)


def adapter_lora_config(config: dict) -> LoraConfig:
    """Our LoraConfig for a PEFT adapter_config.json (what apply_lora needs to rebuild its modules)."""
    parameters = [p.rsplit(".", 1)[-1] for p in config.get("target_parameters") or []]
    targets = list(config.get("target_modules") or []) + parameters
    return LoraConfig(r=config["r"], alpha=float(config["lora_alpha"]), dropout=0.0, targets=targets)


def base_state_dict(model: nn.Module, dtype=torch.float32) -> dict[str, torch.Tensor]:
    """The model's weights WITHOUT its LoRA under transformers' names and layouts (experts dense), in dtype: copies,
    also where the dtype already matches (merge_lora adds the deltas to them in place; `.to(same dtype)` would hand
    back the model's own tensors, and the merge would write into the model being trained)."""
    hf = _unwrap(model)
    out: dict[str, torch.Tensor] = {}
    replaced: list[str] = []
    for name, module in hf.named_modules():
        if isinstance(module, LoraLinear):
            out[f"{name}.weight"] = module.base_layer.weight.detach().to(dtype, copy=True)
            if module.base_layer.bias is not None:
                out[f"{name}.bias"] = module.base_layer.bias.detach().to(dtype, copy=True)
            replaced.append(f"{name}.")
        elif isinstance(module, (GroupedExperts, ReferenceLoraExperts)):
            gate_up, gate_up_bias, down, down_bias = (
                (module.dense_weight("gate_up_proj", dtype), module.gate_up_proj_bias,
                 module.dense_weight("down_proj", dtype), module.down_proj_bias)
                if isinstance(module, GroupedExperts) else dense_expert_params(module)
            )  # fmt: skip
            for key, value in (("gate_up_proj", gate_up), ("gate_up_proj_bias", gate_up_bias),
                               ("down_proj", down), ("down_proj_bias", down_bias)):  # fmt: skip
                out[f"{name}.{key}"] = value.detach().to(dtype, copy=True)
            replaced.append(f"{name}.")
    for key, value in hf.state_dict().items():
        if not any(key.startswith(prefix) for prefix in replaced):
            out[key] = value.detach().to(dtype, copy=True) if value.is_floating_point() else value.clone()
    return out


def plain_model(config, state: dict[str, torch.Tensor]):
    """transformers' GptOssForCausalLM (eager attention, eval mode) holding `state`, built without first
    allocating random weights."""
    from transformers import GptOssForCausalLM

    with torch.device("meta"):
        model = GptOssForCausalLM(config)
    model.load_state_dict(state, strict=True, assign=True)
    rotary = model.model.rotary_emb  # non-persistent buffers: rebuilt for real
    model.model.rotary_emb = type(rotary)(config=model.config)
    model.config._attn_implementation = "eager"
    return model.eval()


def plain_layer(config, index: int, state: dict[str, torch.Tensor]):
    """transformers' GptOssDecoderLayer `index` (eval mode) holding `state` (its parameters under the
    model's names, "model.layers.<index>.*"; the tensors are used, not copied)."""
    from transformers.models.gpt_oss.modeling_gpt_oss import GptOssDecoderLayer

    prefix = f"model.layers.{index}."
    with torch.device("meta"):
        layer = GptOssDecoderLayer(config, index)
    layer.load_state_dict({k.removeprefix(prefix): v for k, v in state.items()}, strict=True, assign=True)
    return layer.eval()


def merge_lora(model: nn.Module, dtype=torch.float32):
    """A plain GptOssForCausalLM (transformers' modules) holding the model's weights with its LoRA merged in
    `dtype`; the deltas go through the PEFT layout (lora_state_dict_peft -> merge_adapter), the same path as
    merging a saved adapter."""
    hf = _unwrap(model)
    r, scaling, modules, params = _lora_settings(hf)
    config = {"r": r, "lora_alpha": scaling * r, "target_modules": modules, "target_parameters": params}
    merged = plain_model(hf.config, base_state_dict(hf, dtype))
    merge_adapter(merged, (lora_state_dict_peft(hf), config), dtype)
    return merged
