"""GPU-tier presets (as data), tier detection, a per-stage memory estimate and a plan that refuses what can't fit.

A tier fixes what depends on the card: the MoE backend, the format of the frozen base weights, the rollout
backend, and per stage (lang_rust, core_agent, ipo, grpo, qat) the micro-batch, accumulation, sequence
length, steps and GRPO generations. Format rules:
- GPT-OSS experts are 3-D parameters, not nn.Linear, so bitsandbytes 4-bit (which swaps nn.Linear) cannot
  hold them; MXFP4 (the checkpoint's own format, so lossless) is the compressed format on every card;
- FP8 needs tensor cores of compute capability >= 8.9 (Ada/Hopper): not on A100 (8.0);
- float16 diverges when training GPT-OSS: refused (`check_training_dtype`).

Memory model (`estimate_stage_memory`), in GiB, peak of one optimizer micro-step:
    weights          non-expert params in the model dtype + expert params at the format's bytes/param
    lora + AdamW     trainable LoRA params in float32: param + grad + two Adam moments = 16 B/param
    checkpoints      gradient checkpointing keeps each layer's input: layers x tokens x hidden x 2 B
                     (0 with offload_activations: they live in pinned host memory)
    working          max(one layer's recompute/backward working set, the chunked-loss chunk)
                     (+ one layer's experts dense twice for QAT's fake quantisation)
    rollout          GRPO generation: KV cache of the generations (+ vLLM's own copy of the weights)
    reserve          allocator/runtime slack (embedding and residual grads, router logits, fragments)
Calibration: the weights use the frozen sizes measured on an H100 for GPT-OSS-20B (bf16 39.7 GiB, FP8 22.4,
MXFP4 13.5; bench/RESULTS.md, 2026-11-25) as bytes per expert parameter. A layer's working set is
`WORKING_SET_FACTOR` x (hidden + attention projections + top-k x 3 x intermediate) x 2 B per token, and
the reserve `RESERVE_GIB`, both solved from two peaks measured on an H100 with MXFP4 experts (Triton
dequantiser, router-logits fix), LoRA r=16, checkpointing, flex attention, a 4096-token loss chunk and
batch 1: 65536 tokens -> 40.1 GiB, 98304 tokens -> 52.6 GiB (`max_memory_allocated`, bench/RESULTS.md,
session 2, run B). Shorter runs peak in the loss chunk instead (measured 21.7 GiB at 4096 and 23.5 GiB at
16384 tokens), which the estimate takes as the max of the two. The usable budget is
95% of the card's memory less 0.5 GiB of CUDA context (`max_memory_allocated` does not count it).

Own code: the numbers are specific to this pipeline's kernels; no library estimates them.
"""

from __future__ import annotations

import dataclasses
import os
from dataclasses import dataclass, field

from rustforge.model.presets import ArchPreset, get_preset

STAGES = ("lang_rust", "core_agent", "ipo", "grpo", "qat")
WEIGHT_FORMATS = ("bf16", "fp8", "mxfp4")
ROLLOUT_BACKENDS = ("own", "vllm")
FP8_MIN_CAPABILITY = (8, 9)
GIB = 2**30

# --------------------------------------------------------------------------------------- calibration
MEASURED_20B_WEIGHTS_GIB = {"bf16": 39.7, "fp8": 22.4, "mxfp4": 13.5}  # H100, bench/RESULTS.md
CALIBRATION_PEAKS_GIB = {65536: 40.1, 98304: 52.6}  # MXFP4, r=16, checkpointing, flex, chunk 4096, batch 1
CALIBRATION_LORA_R = 16
VLLM_OVERHEAD_GIB = 2.0  # vLLM's CUDA graphs, sampler and activation workspace (not measured here)
USABLE_FRACTION, CUDA_CONTEXT_GIB = 0.95, 0.5
HOST_USABLE_FRACTION = 0.8  # the CPU tier shares the host with the OS and data workers
HOST_RESERVE_GIB = 0.1  # on a CPU there is no caching allocator to calibrate; a token allowance


class PlanError(ValueError):
    """A plan that cannot fit; the message says which stage and what to change."""


# -------------------------------------------------------------------------------------------- tiers
@dataclass(frozen=True)
class StageSettings:
    batch_size: int  # sequences per micro-batch (GRPO: completions per micro-batch)
    grad_accum: int
    seq_len: int  # tokens per sequence (IPO: per side of a pair; GRPO: prompt + completion)
    max_steps: int
    num_generations: int = 1  # completions per prompt (GRPO); 1 elsewhere


@dataclass(frozen=True)
class GpuTier:
    name: str
    description: str
    memory_gib: float  # what torch reports as total_memory; detection puts the actual card's here
    weight_format: str  # frozen base experts: bf16 | fp8 | mxfp4
    rollout_backend: str  # GRPO generation: own (the training model) | vllm (colocated server)
    stages: dict[str, StageSettings]
    min_capability: tuple[int, int] | None = (8, 0)  # None: CPU
    allowed_formats: tuple[str, ...] = ("mxfp4", "bf16")
    moe_backend: str = "grouped"
    attention: str = "flex"
    dtype: str = "bfloat16"
    gradient_checkpointing: bool = True
    offload_activations: bool = False
    preset: str = "gpt-oss-20b"  # the model the stage settings are sized for
    loss_chunk_size: int = 4096
    device_name: str = ""  # filled by detection

    @property
    def is_gpu(self) -> bool:
        return self.min_capability is not None


def _stages(**kw: tuple) -> dict[str, StageSettings]:
    return {name: StageSettings(*values) for name, values in kw.items()}


#                    batch accum seq_len steps gens
TIERS: dict[str, GpuTier] = {
    "a100_40gb": GpuTier(
        name="a100_40gb",
        description="A100 40GB: MXFP4 base (no FP8 on sm80), 8K context, own rollout (no room for vLLM)",
        memory_gib=39.6,
        weight_format="mxfp4",
        rollout_backend="own",
        stages=_stages(
            lang_rust=(1, 8, 8192, 6000),
            core_agent=(1, 8, 8192, 2000),
            ipo=(1, 8, 4096, 800),
            grpo=(1, 8, 4096, 300, 4),
            qat=(1, 8, 4096, 300),
        ),
    ),
    "a100_80gb": GpuTier(
        name="a100_80gb",
        description="A100 80GB: MXFP4 base (no FP8 on sm80), 16K context, own rollout",
        memory_gib=79.3,
        weight_format="mxfp4",
        rollout_backend="own",
        stages=_stages(
            lang_rust=(1, 4, 16384, 6000),
            core_agent=(1, 4, 16384, 2000),
            ipo=(1, 8, 8192, 1000),
            grpo=(1, 8, 8192, 500, 8),
            qat=(1, 8, 4096, 500),
        ),
    ),
    "h100_80gb": GpuTier(
        name="h100_80gb",
        description="H100 80GB: MXFP4 base (FP8 allowed), 16K context, colocated vLLM rollout",
        memory_gib=79.6,
        weight_format="mxfp4",
        rollout_backend="vllm",
        min_capability=(9, 0),
        allowed_formats=("mxfp4", "fp8", "bf16"),
        stages=_stages(
            lang_rust=(1, 4, 16384, 6000),
            core_agent=(1, 4, 16384, 2000),
            ipo=(1, 8, 8192, 1000),
            grpo=(1, 8, 8192, 500, 8),
            qat=(1, 8, 4096, 500),
        ),
    ),
    "h200": GpuTier(
        name="h200",
        description="H200 141GB: MXFP4 base (FP8 allowed), 32K context, colocated vLLM rollout",
        memory_gib=140.4,
        weight_format="mxfp4",
        rollout_backend="vllm",
        min_capability=(9, 0),
        allowed_formats=("mxfp4", "fp8", "bf16"),
        stages=_stages(
            lang_rust=(1, 2, 32768, 6000),
            core_agent=(1, 2, 32768, 2000),
            ipo=(1, 4, 16384, 1000),
            grpo=(2, 8, 16384, 500, 16),
            qat=(1, 4, 8192, 500),
        ),
    ),
    "cpu": GpuTier(
        name="cpu",
        description="CPU: the tiny GPT-OSS in float32, eager attention, no checkpointing",
        memory_gib=16.0,  # detection puts the host's RAM here
        weight_format="bf16",  # dense experts in the model dtype
        rollout_backend="own",
        min_capability=None,
        allowed_formats=("bf16", "mxfp4"),
        attention="eager",
        dtype="float32",
        gradient_checkpointing=False,
        preset="tiny",
        loss_chunk_size=1024,
        stages=_stages(
            lang_rust=(4, 1, 1024, 180),
            core_agent=(4, 1, 1024, 100),
            ipo=(2, 2, 512, 60),
            grpo=(2, 2, 512, 30, 4),
            qat=(4, 1, 512, 30),
        ),
    ),
}


def get_tier(name: str) -> GpuTier:
    if name not in TIERS:
        raise ValueError(f"tier: unknown GPU tier {name!r}; known: {sorted(TIERS)} (or auto)")
    return TIERS[name]


# ------------------------------------------------------------------------------------------- checks
def check_training_dtype(dtype) -> None:
    """Refuse float16 for GPT-OSS training (it diverges); bfloat16 on GPU, float32 on CPU."""
    text = str(dtype).replace("torch.", "").lower()
    if text in ("float16", "fp16", "half"):
        raise ValueError("dtype float16 diverges when training GPT-OSS; use bfloat16 (or float32 on CPU)")


def check_weight_format(fmt: str, capability: tuple[int, int] | None) -> None:
    """Raise when `fmt` is unknown or the device (compute capability; None = CPU) cannot run it."""
    if fmt.lower() in ("nf4", "fp4", "int4", "int8", "bnb", "bnb4", "bnb-4bit", "bitsandbytes"):
        raise ValueError(
            f"expert format {fmt!r}: bitsandbytes quantises nn.Linear, but GPT-OSS experts are 3-D parameters "
            "(not nn.Linear); use mxfp4 (the checkpoint's own 4-bit format)"
        )
    if fmt not in WEIGHT_FORMATS:
        raise ValueError(f"expert format {fmt!r}: unknown; use one of {list(WEIGHT_FORMATS)}")
    if fmt == "fp8" and capability is not None and tuple(capability) < FP8_MIN_CAPABILITY:
        raise ValueError(
            f"expert format fp8 needs compute capability >= {FP8_MIN_CAPABILITY[0]}.{FP8_MIN_CAPABILITY[1]} "
            f"(Ada/Hopper); this GPU is {capability[0]}.{capability[1]}: use mxfp4"
        )


# ---------------------------------------------------------------------------------------- detection
def detect_tier(override: str | None = None) -> GpuTier:
    """The tier named by `override` (unless None/"auto"), else the one matching the visible GPU (or CPU).
    The tier's memory becomes the actual card's (or host's) when a device is found."""
    import torch

    if not torch.cuda.is_available():
        tier = get_tier(override) if override not in (None, "auto") else TIERS["cpu"]
        if tier.is_gpu:
            raise ValueError(f"tier {tier.name}: needs a CUDA GPU, none is visible")
        return dataclasses.replace(tier, memory_gib=_host_memory_gib(), device_name="CPU")
    name = torch.cuda.get_device_name(0)
    memory_gib = torch.cuda.get_device_properties(0).total_memory / GIB
    capability = tuple(torch.cuda.get_device_capability(0))
    if override not in (None, "auto"):
        tier = get_tier(override)
        if tier.is_gpu:
            check_weight_format(tier.weight_format, capability)
            return dataclasses.replace(tier, memory_gib=memory_gib, device_name=name)
        return dataclasses.replace(tier, memory_gib=_host_memory_gib(), device_name="CPU")
    return tier_for_device(name, memory_gib, capability)


def tier_for_device(name: str, memory_gib: float, capability: tuple[int, int]) -> GpuTier:
    """Pure rule: name first (H200, H100/H800, A100/A800 by memory), else the largest tier whose memory
    and compute capability the card meets."""
    upper = name.upper()
    if "H200" in upper:
        key = "h200"
    elif "H100" in upper or "H800" in upper:
        key = "h100_80gb"
    elif "A100" in upper or "A800" in upper:
        key = "a100_80gb" if memory_gib >= 60 else "a100_40gb"
    else:
        fitting = [
            t
            for t in TIERS.values()
            if t.is_gpu and t.memory_gib <= memory_gib * 1.02 and tuple(capability) >= t.min_capability
        ]
        if not fitting:
            raise ValueError(
                f"GPU {name!r} ({memory_gib:.1f} GiB, sm{capability[0]}{capability[1]}) matches no tier: GPT-OSS-20B "
                f"training needs >= 40 GB and sm80+; pass a tier explicitly ({sorted(TIERS)}) or use the tiny model on cpu"
            )
        key = max(fitting, key=lambda t: t.memory_gib).name
    return dataclasses.replace(TIERS[key], memory_gib=memory_gib, device_name=name)


def _host_memory_gib() -> float:
    try:
        return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / GIB
    except (ValueError, OSError, AttributeError):  # pragma: no cover - non-POSIX
        return TIERS["cpu"].memory_gib


# ------------------------------------------------------------------------------------ parameter math
def param_counts(p: ArchPreset) -> dict[str, int]:
    """Parameters of a GPT-OSS preset: 'expert' (the MoE expert stacks, biases included) and 'other'."""
    H, I, E, L = p.hidden_size, p.intermediate_size, p.num_local_experts, p.num_hidden_layers  # noqa: E741
    q_out, kv_out = p.num_attention_heads * p.head_dim, p.num_key_value_heads * p.head_dim
    bias = 1 if p.attention_bias else 0
    attention = H * q_out + 2 * H * kv_out + q_out * H + bias * (q_out + 2 * kv_out + H) + p.num_attention_heads
    router = E * H + E
    per_layer = attention + router + 2 * H  # + the two RMSNorms
    embeddings = p.vocab_size * H * (1 if p.tie_word_embeddings else 2)
    experts = L * E * (H * 2 * I + 2 * I + I * H + H)
    return {"expert": experts, "other": L * per_layer + embeddings + H}


def lora_param_count(p: ArchPreset, r: int) -> int:
    """LoRA on q/k/v/o and on both expert projections (rustforge's default targets)."""
    H, I, E = p.hidden_size, p.intermediate_size, p.num_local_experts  # noqa: E741
    q_out, kv_out = p.num_attention_heads * p.head_dim, p.num_key_value_heads * p.head_dim
    attention = r * ((H + q_out) + 2 * (H + kv_out) + (q_out + H))
    experts = E * r * ((H + 2 * I) + (I + H))
    return p.num_hidden_layers * (attention + experts)


def _expert_bytes_per_param() -> dict[str, float]:
    """Bytes per expert parameter by format, calibrated on the measured GPT-OSS-20B frozen sizes (bf16 model dtype)."""
    counts = param_counts(get_preset("gpt-oss-20b"))
    return {fmt: (gib * GIB - counts["other"] * 2) / counts["expert"] for fmt, gib in MEASURED_20B_WEIGHTS_GIB.items()}


EXPERT_BYTES_PER_PARAM = _expert_bytes_per_param()


def _dtype_bytes(dtype: str) -> int:
    check_training_dtype(dtype)
    return {"bfloat16": 2, "float32": 4}[dtype]


def weights_gib(p: ArchPreset, fmt: str, dtype: str = "bfloat16") -> float:
    n, b = param_counts(p), _dtype_bytes(dtype)
    per_expert = EXPERT_BYTES_PER_PARAM[fmt] * (b / 2 if fmt == "bf16" else 1)  # "bf16" = dense, model dtype
    return (n["other"] * b + n["expert"] * per_expert) / GIB


def _layer_width(p: ArchPreset) -> int:
    """Per-token elements a decoder layer materialises: residual, q/k/v/o, top-k x (gate_up + activation)."""
    attention = (2 * p.num_attention_heads + 2 * p.num_key_value_heads) * p.head_dim
    return p.hidden_size + attention + p.num_experts_per_tok * 3 * p.intermediate_size


def _calibrate() -> tuple[float, float]:
    """(working-set factor, reserve GiB) solved from the two measured H100 peaks (module docstring)."""
    p = get_preset("gpt-oss-20b")
    (t0, peak0), (t1, peak1) = sorted(CALIBRATION_PEAKS_GIB.items())
    per_token = (peak1 - peak0) * GIB / (t1 - t0)
    checkpoint_per_token = p.num_hidden_layers * p.hidden_size * 2
    factor = (per_token - checkpoint_per_token) / (_layer_width(p) * 2)
    fixed = peak0 - MEASURED_20B_WEIGHTS_GIB["mxfp4"] - lora_param_count(p, CALIBRATION_LORA_R) * 16 / GIB
    reserve = fixed - t0 * per_token / GIB
    return factor, reserve


WORKING_SET_FACTOR, RESERVE_GIB = _calibrate()


# ------------------------------------------------------------------------------------------ estimate
@dataclass(frozen=True)
class MemoryEstimate:
    parts: dict[str, float]  # GiB by component (module docstring), in display order
    total_gib: float
    note: str = ""  # how the total combines the parts when it is not their sum


@dataclass(frozen=True)
class Setup:
    """The knobs of an estimate besides the stage's own settings (defaults from a tier)."""

    weight_format: str
    dtype: str = "bfloat16"
    attention: str = "flex"
    gradient_checkpointing: bool = True
    offload_activations: bool = False
    rollout_backend: str = "own"
    lora_r: int = 16
    loss_chunk_size: int = 4096
    device: str = "cuda"  # "cuda" | "cpu": which reserve applies

    @classmethod
    def of(cls, tier: GpuTier, lora_r: int = 16) -> Setup:
        return cls(
            weight_format=tier.weight_format,
            dtype=tier.dtype,
            attention=tier.attention,
            gradient_checkpointing=tier.gradient_checkpointing,
            offload_activations=tier.offload_activations,
            rollout_backend=tier.rollout_backend,
            lora_r=lora_r,
            loss_chunk_size=tier.loss_chunk_size,
            device="cuda" if tier.is_gpu else "cpu",
        )


def estimate_stage_memory(p: ArchPreset, stage: str, s: StageSettings, setup: Setup) -> MemoryEstimate:
    """Peak memory (GiB) of one micro-step of `stage` with settings `s` (module docstring for the model)."""
    if stage not in STAGES:
        raise ValueError(f"stage: unknown stage {stage!r}; known: {list(STAGES)}")
    b = _dtype_bytes(setup.dtype)
    L = p.num_hidden_layers
    sequences = s.batch_size * (2 if stage == "ipo" else 1)  # IPO: chosen and rejected side by side
    tokens = sequences * s.seq_len
    layer = WORKING_SET_FACTOR * _layer_width(p) * b * tokens
    if setup.attention == "eager":  # scores, probabilities and their gradient: [seqs, heads, T, T] fp32
        layer += 3 * sequences * p.num_attention_heads * s.seq_len**2 * 4
    chunk = min(setup.loss_chunk_size, tokens) * p.vocab_size * (b + 4)  # logits + fp32 softmax
    if setup.gradient_checkpointing:
        checkpoints = 0.0 if setup.offload_activations else L * tokens * p.hidden_size * b
        working = max(layer, chunk)
    else:
        checkpoints, working = 0.0, L * layer + chunk  # every layer's activations stay alive
    if stage == "qat":  # one layer's experts dense twice (dequantised + fake-quantised)
        working += 2 * p.num_local_experts * 3 * p.hidden_size * p.intermediate_size * b
    parts = {
        "weights": weights_gib(p, setup.weight_format, setup.dtype),
        "lora+adamw": lora_param_count(p, setup.lora_r) * 16 / GIB,
        "checkpoints": checkpoints / GIB,
        "working": working / GIB,
        "rollout": 0.0,
        "reserve": RESERVE_GIB if setup.device == "cuda" else HOST_RESERVE_GIB,
    }
    train_total = sum(parts.values())
    if stage != "grpo":
        return MemoryEstimate(parts, train_total)
    kv = s.num_generations * s.seq_len * L * 2 * p.num_key_value_heads * p.head_dim * b / GIB
    if setup.rollout_backend == "vllm":  # a colocated server keeps its pool while we train
        # vLLM serves the checkpoint's own MXFP4 experts (+ the merged LoRA), whatever format we train on
        parts["rollout"] = weights_gib(p, "mxfp4", setup.dtype) + kv + VLLM_OVERHEAD_GIB
        return MemoryEstimate(parts, train_total + parts["rollout"], "vLLM weights + KV stay resident while training")
    parts["rollout"] = kv  # generation runs between training steps, with the same resident weights
    generate = parts["weights"] + parts["lora+adamw"] + parts["reserve"] + kv
    return MemoryEstimate(parts, max(train_total, generate), "max(training, generation with KV cache)")


# ---------------------------------------------------------------------------------------------- plan
@dataclass(frozen=True)
class StagePlan:
    stage: str
    settings: StageSettings
    memory: MemoryEstimate
    fits: bool
    advice: tuple[str, ...] = ()  # what to change when it does not fit


@dataclass(frozen=True)
class Plan:
    tier: GpuTier
    preset: str
    setup: Setup
    budget_gib: float
    stages: list[StagePlan] = field(default_factory=list)

    @property
    def fits(self) -> bool:
        return all(s.fits for s in self.stages)


def usable_gib(tier: GpuTier) -> float:
    if not tier.is_gpu:
        return tier.memory_gib * HOST_USABLE_FRACTION
    return tier.memory_gib * USABLE_FRACTION - CUDA_CONTEXT_GIB


def plan(
    tier: GpuTier | str,
    preset: ArchPreset | str | None = None,
    *,
    lora_r: int = 16,
    stages: tuple[str, ...] = STAGES,
    settings: dict[str, StageSettings] | None = None,
    setup: Setup | None = None,
    check: bool = True,
) -> Plan:
    """Each stage's memory estimate on `tier` for `preset` (default: the tier's). With `check`, a plan that
    cannot fit raises PlanError naming the stage and what to change (seq_len, format, offload)."""
    tier = get_tier(tier) if isinstance(tier, str) else tier
    preset_name = preset if isinstance(preset, str) else (tier.preset if preset is None else "custom")
    arch = get_preset(preset_name) if preset is None or isinstance(preset, str) else preset
    setup = setup or Setup.of(tier, lora_r)
    check_weight_format(setup.weight_format, tier.min_capability)
    if setup.weight_format not in tier.allowed_formats:
        raise PlanError(
            f"tier {tier.name}: weight format {setup.weight_format} not allowed; use one of {list(tier.allowed_formats)}"
        )
    if setup.rollout_backend not in ROLLOUT_BACKENDS:
        raise PlanError(f"rollout backend {setup.rollout_backend!r}: unknown; use one of {list(ROLLOUT_BACKENDS)}")
    budget = usable_gib(tier)
    out = Plan(tier, preset_name, setup, budget)
    for stage in stages:
        s = (settings or {}).get(stage) or tier.stages[stage]
        memory = estimate_stage_memory(arch, stage, s, setup)
        fits = memory.total_gib <= budget
        advice = () if fits else tuple(_advice(arch, stage, s, setup, tier, budget))
        out.stages.append(StagePlan(stage, s, memory, fits, advice))
    if check and not out.fits:
        raise PlanError(_refusal(out))
    return out


def _advice(arch: ArchPreset, stage: str, s: StageSettings, setup: Setup, tier: GpuTier, budget: float) -> list[str]:
    def total(s2: StageSettings = s, setup2: Setup = setup) -> float:
        return estimate_stage_memory(arch, stage, s2, setup2).total_gib

    advice = []
    seq = _largest_fitting(lambda n: total(dataclasses.replace(s, seq_len=n)) <= budget, s.seq_len)
    if seq:
        advice.append(f"lower seq_len to {seq} ({total(dataclasses.replace(s, seq_len=seq)):.1f} GiB)")
    if s.batch_size > 1 and total(dataclasses.replace(s, batch_size=1)) <= budget:
        advice.append(f"lower batch_size to 1 and raise grad_accum to {s.grad_accum * s.batch_size}")
    if stage == "grpo" and s.num_generations > 2:
        gens = _largest_fitting(
            lambda n: total(dataclasses.replace(s, num_generations=n)) <= budget, s.num_generations, floor=2
        )
        if gens:
            advice.append(f"lower num_generations to {gens}")
    if setup.weight_format != "mxfp4" and "mxfp4" in tier.allowed_formats:
        mx = dataclasses.replace(setup, weight_format="mxfp4")
        if total(setup2=mx) <= budget:
            advice.append(f"switch model.expert_format to mxfp4 ({total(setup2=mx):.1f} GiB)")
    if setup.gradient_checkpointing and not setup.offload_activations:
        off = dataclasses.replace(setup, offload_activations=True)
        if total(setup2=off) <= budget:
            advice.append(f"enable model.offload_activations ({total(setup2=off):.1f} GiB)")
    if not setup.gradient_checkpointing:
        ck = dataclasses.replace(setup, gradient_checkpointing=True)
        if total(setup2=ck) <= budget:
            advice.append(f"enable model.gradient_checkpointing ({total(setup2=ck):.1f} GiB)")
    if stage == "grpo" and setup.rollout_backend == "vllm":
        own = dataclasses.replace(setup, rollout_backend="own")
        if total(setup2=own) <= budget:
            advice.append(f"use the own rollout backend instead of vllm ({total(setup2=own):.1f} GiB)")
    return advice or ["nothing short of a larger GPU tier fits this stage (even seq_len 512 is too long)"]


def _largest_fitting(fits, current: int, floor: int = 512) -> int | None:
    """Largest power of two below `current` (and >= floor) for which fits(n)."""
    n = 2 ** (max(current - 1, 1).bit_length() - 1)
    while n >= floor:
        if fits(n):
            return n
        n //= 2
    return None


def _refusal(p: Plan) -> str:
    lines = [f"plan does not fit tier {p.tier.name} ({p.budget_gib:.1f} GiB usable of {p.tier.memory_gib:.1f} GiB):"]
    for s in p.stages:
        if not s.fits:
            parts = ", ".join(f"{k} {v:.1f}" for k, v in s.memory.parts.items() if v > 0)
            lines.append(
                f"  {s.stage}: needs {s.memory.total_gib:.1f} GiB ({parts}); to fit: " + "; or ".join(s.advice)
            )
    return "\n".join(lines)


def format_plan(p: Plan) -> str:
    """The table `rustforge plan` prints."""
    t, su = p.tier, p.setup
    device = f"{t.device_name}, " if t.device_name else ""
    weights = _gib(p.stages[0].memory.parts["weights"]) if p.stages else "-"
    lines = [
        f"tier {t.name} ({device}{t.memory_gib:.1f} GiB, {p.budget_gib:.1f} GiB usable), model {p.preset}",
        f"  frozen weights {su.weight_format} ({weights} GiB), dtype {su.dtype}, MoE {t.moe_backend}, "
        f"attention {su.attention}, rollout {su.rollout_backend}, checkpointing "
        f"{'on' if su.gradient_checkpointing else 'off'}{' + offload' if su.offload_activations else ''}, LoRA r={su.lora_r}",
        "",
    ]
    part_names = list(p.stages[0].memory.parts) if p.stages else []
    header = ["stage", "batch", "accum", "seq_len", "steps", "gens", *part_names, "total GiB", "fits"]
    rows = []
    for s in p.stages:
        st = s.settings
        rows.append(
            [
                s.stage,
                st.batch_size,
                st.grad_accum,
                st.seq_len,
                st.max_steps,
                st.num_generations,
                *(_gib(v) for v in s.memory.parts.values()),
                _gib(s.memory.total_gib),
                "yes" if s.fits else "NO",
            ]
        )
    widths = [max(len(str(r[i])) for r in [header, *rows]) for i in range(len(header))]
    for r in [header, *rows]:
        lines.append(
            "  ".join(
                str(v).ljust(w) if i == 0 else str(v).rjust(w) for i, (v, w) in enumerate(zip(r, widths, strict=True))
            )
        )
    for s in p.stages:
        if s.memory.note:
            lines.append(f"  {s.stage}: {s.memory.note}")
        if not s.fits:
            lines.append(f"  {s.stage} does NOT fit; to fit: " + "; or ".join(s.advice))
    return "\n".join(lines)


def _gib(v: float) -> str:
    return "-" if v == 0 else f"{v:.2f}" if v < 1 else f"{v:.1f}"


def tier_overrides(tier: GpuTier) -> list[str]:
    """`--set` style KEY=VALUE strings that put the tier's choices into today's RunConfig (apply them before
    the user's own --set so the user wins)."""
    s = tier.stages["lang_rust"]
    return [
        f"model.expert_format={tier.weight_format}",
        f"model.experts={tier.moe_backend}",
        f"model.attention={tier.attention if tier.is_gpu else 'auto'}",
        f"model.gradient_checkpointing={str(tier.gradient_checkpointing).lower()}",
        f"model.offload_activations={str(tier.offload_activations).lower()}",
        f"model.loss_chunk_size={tier.loss_chunk_size}",
        f"lang_rust.batch_size={s.batch_size}",
        f"lang_rust.grad_accum={s.grad_accum}",
    ]


def plan_run(cfg, tier: GpuTier | str, check: bool = True) -> Plan:
    """The plan of a RunConfig on `tier`: stages the config describes (today lang_rust: its largest
    curriculum seq_len, batch and accumulation) use the config's values, the rest the tier's; the setup is
    the config's model section ("auto" dtype/attention resolve to the tier's)."""
    tier = get_tier(tier) if isinstance(tier, str) else tier
    m = cfg.model
    setup = dataclasses.replace(
        Setup.of(tier, cfg.lora.r),
        weight_format=m.expert_format,
        dtype=tier.dtype if m.dtype == "auto" else m.dtype,
        attention=tier.attention if m.attention == "auto" else m.attention,
        gradient_checkpointing=m.gradient_checkpointing,
        offload_activations=m.offload_activations,
        loss_chunk_size=m.loss_chunk_size,
    )
    t = cfg.lang_rust
    settings = {
        "lang_rust": StageSettings(
            t.batch_size, t.grad_accum, max(p.seq_len for p in t.phases), sum(p.steps for p in t.phases)
        )
    }
    preset = None if m.path else m.preset  # a local checkpoint is gpt-oss-20b (the only released size we train)
    return plan(tier, preset or "gpt-oss-20b", lora_r=cfg.lora.r, settings=settings, setup=setup, check=check)
