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
    checkpoints      gradient checkpointing keeps each layer's input: layers x tokens x hidden x 2 B;
                     with offload_activations they move to host memory and the GPU keeps a residue
                     max(0, OFFLOAD_RESIDUE_FRACTION x that - OFFLOAD_RESIDUE_OFFSET_GIB) (copies in flight,
                     what the allocator holds; fitted, see below)
    working          max(one layer's recompute/backward working set, the chunked-loss chunk)
                     (+ one layer's experts dense twice for QAT's fake quantisation); with moe_tile_tokens
                     the experts run in token tiles, so the expert rows count for one tile only:
                     TILED_WORKING_FACTOR x (hidden + attention projections) x 2 B per token
                     + TILE_WORKING_FACTOR x top-k x 3 x intermediate x 2 B per tile token
    rollout          GRPO generation: KV cache of the generations (+ vLLM's own copy of the weights)
    reserve          allocator/runtime slack (embedding and residual grads, router logits, fragments)
    host (not in the GPU total, `MemoryEstimate.host_gib`; only with offload) layers x one block of
                     tokens x hidden x 2 B, each block rounded up to a power of two when pinned (torch's
                     pinned host allocator does; pageable copies are exact), + HOST_BASE_GIB for the process
Calibration: the weights use the frozen sizes measured on an H100 for GPT-OSS-20B (bf16 39.7 GiB, FP8 22.4,
MXFP4 13.5; bench/RESULTS.md, 2026-11-25) as bytes per expert parameter. A layer's working set is
`WORKING_SET_FACTOR` x (hidden + attention projections + top-k x 3 x intermediate) x 2 B per token, and
the reserve `RESERVE_GIB`, both solved from two peaks of session 4's checkpointed grid on an H100 (MXFP4
experts, LoRA r=16, checkpointing, flex attention, a 4096-token loss chunk, batch 1; `max_memory_allocated`,
bench/results/2026-11-26s4-h100-run6-final-grid-final_grid.jsonl): 32768 tokens -> 26.37 GiB, 65536 -> 36.29
GiB (325 KB per token) give WORKING_SET_FACTOR 2.00 and RESERVE_GIB 0.19 (session 2's 65536 -> 40.1, 98304 ->
52.6 gave 2.91 and -1.16). The same run checks it: MXFP4 16384 -> 21.41 lies on that line; FP8 32768/65536 ->
35.28/45.19 are reproduced within 0.01 GiB; bf16 (51.04/60.95) lies 1.5 GiB under the model (likely one layer's
dequantised experts, which MXFP4 and FP8 hold and bf16 does not). Shorter runs would peak in the loss chunk
instead, which the estimate takes as the max of the two; that term (a 4096-token chunk of bf16 logits + fp32
softmax, 4.6 GiB) is session 2's and conservative for session 4's loss kernels (4096 tokens measured 17.85 GiB,
the model says 21.6; 16384: 21.41 vs 23.2); no pair of records isolates it, so it is kept. The usable budget
is 95% of the card's memory less 0.5 GiB of CUDA context (`max_memory_allocated` does not count it).
Long context, same setup + offload_activations, measured on an H100 on 2026-11-26, each pair solving two terms
with the others held fixed:
- offload, untiled: no session-4 record (offload alone was not rerun), so the GPU residue of the offloaded
  checkpoints keeps session 3's calibration: 131072 -> 48.8 GiB, 196608 -> 67.5 (pinned;
  bench/results/2026-11-26-h100-long-offload.jsonl) against the untiled line of the code they ran
  (SESSION3_CALIBRATION_PEAKS_GIB, session 2 run B: 65536 -> 40.1, 98304 -> 52.6;
  bench/results/2026-11-25s2-h100-run7-router-logits-fix.jsonl): the slope gives OFFLOAD_RESIDUE_FRACTION
  (0.253 of the checkpoints), the intercept OFFLOAD_RESIDUE_OFFSET_GIB (3.70; the clamp at 0 keeps offload
  from saving more than the checkpoints at short lengths). On session 4's working set the model puts those two
  lengths at 39.8 and 53.4 GiB: unmeasured;
- offload + moe_tile_tokens 16384, session 4: 65536 -> 23.70 GiB (pinned), 458752 -> 48.01 (pageable; pinning
  moves host memory only) (bench/results/2026-11-26s4-h100-run8-tiled64k-long448k-{tiled64k,long448k}.jsonl),
  less the fixed part and the held residue (0 at 64K, the clamp; 11.3 GiB at 448K), calibrate the tiled
  working set: the slope gives TILED_WORKING_FACTOR (1.47; session 3's 262144 -> 45.3, 393216 -> 60.9 gave
  3.83), the intercept TILE_WORKING_FACTOR (4.81; was 2.56). 4.81 is not a tile's cost alone (a 16K tile would
  cost more than a whole untiled 16K layer, 2.85 GiB): two points cannot tell the tile from the held residue,
  only their sum, which reproduces both peaks; between them the model lies up to 1.4 GiB under the straight
  line through the two (the residue's kink near 113K tokens). GPU bytes per token, session 4: 325 KB
  untiled, 66 KB offloaded + tiled (session 3: 410, 306 offloaded, 128);
- host: pageable offload + tiles at 393216 tokens peaked at 82 GiB of host RAM (`free`, 125 GiB host; session 3,
  session 4's records hold no host memory, so this term is kept); the offloaded blocks are 24 x 393216 x 2880 x
  2 B = 50.6 GiB, so HOST_BASE_GIB = 31.4 (the process: CUDA and torch runtime, compile workers; not broken
  down). Check: pinned at 524288 rounds 24 blocks of 2.8 GiB to 4 GiB, 96 + 31.4 = 127.4 GiB > the 125 GiB
  host, where the session-3 run was killed by the host's OOM killer.
Measured failures (`MEASURED_FAILURES`) overrule the estimate: a plan never claims a fit at or past them.
Offload + tiles at 524288 tokens failed in session 4 (bench/results/2026-11-26s4-h100-run7-long512k-long512k.jsonl:
a SystemError inside the tiled experts' forward with the GPU at 69 GB; not diagnosed, host RAM suspected: the
model puts pageable host RAM at 98.9 GiB, 100 usable of 125) where the model says 52.3 GiB of GPU; its cause is
not GPU memory, so it holds on every card (session 3's run at that length ran out of GPU memory). Untiled
offload at 262144 tokens ran out of GPU memory in session 3 (a 5.62 GiB expert-row tensor; not rerun since, the
model now says 66.9 GiB): it holds on cards no larger than that H100. The lengths the plan reports as largest
come from the ladder of powers of two and 1.5 x powers of two plus the measured lengths off it
(`MEASURED_FIT_LENGTHS`: 458752), so on the H100 80GB the plan reaches 448K (pageable offload + tiles) and no
further.

Without checkpointing (GPU): every layer's activations stay alive; NO_CHECKPOINT_FACTOR (x layers x layer
width x 2 B per token) and NO_CHECKPOINT_OFFSET_GIB are solved from 4096 -> 31.6 GiB and 8192 -> 47.8 GiB (H100,
MXFP4, r16, session 4's fused kernels; bench/RESULTS.md), the offset against the reserve above. A stage that
fits without checkpointing gets a plan note saying so: at 4K it is 48% faster on the H100 (16742 vs 11302 tok/s
in the same run, session 4 run 3).

QAT (stage qat): train/qat.py merges the adapter into float32 expert masters, so the weights term is the
non-expert parameters in the model dtype + every expert parameter at 4 B (71 GiB on the 20B model), and with
`qat.trainable: experts` their gradients and Adam moments (12 B more each); on 80 GB cards 20B QAT is refused
until QAT keeps the base in MXFP4 (docs/STATUS.md #8).

Long-context picks (`plan`): when a stage's seq_len does not fit as configured, the tier preset (a plan
without an explicit setup) turns on, in order of cost, offload_activations (slower: host copies), then
moe_tile_tokens 16384 (an extra expert forward per tile in backward), then offload_pinned false (slower
pageable copies) only where host RAM cannot hold the pinned rounding, never at or past a measured failure;
lengths that fit stay as they are. The
host budget is HOST_USABLE_FRACTION of the host's RAM: `plan(host_memory_gib=)` / `rustforge plan --host-gib`,
else the tier's `host_memory_gib`, else this machine's (`_host_memory_gib`: right on the GPU machine, not
when planning one from elsewhere). A plan with an explicit setup (a run config) keeps it: its advice names
the settings (`--set` keys), a shorter seq_len (a power of two or a measured length) and the largest seq_len
that fits each way, and a stage whose offload or tiling is not needed at its length gets a note (both cost
speed).

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
# MXFP4, r=16, checkpointing, flex, chunk 4096, batch 1: session 4's checkpointed grid (H100 2026-11-26,
# bench/results/2026-11-26s4-h100-run6-final-grid-final_grid.jsonl)
CALIBRATION_PEAKS_GIB = {32768: 26.37, 65536: 36.29}
CALIBRATION_LORA_R = 16
# the same setup on the code the session-3 offload peaks ran (session 2 run B,
# bench/results/2026-11-25s2-h100-run7-router-logits-fix.jsonl): only for the offload residue below
SESSION3_CALIBRATION_PEAKS_GIB = {65536: 40.1, 98304: 52.6}
# + offload_activations (pinned), untiled; H100 2026-11-26 session 3, bench/results/2026-11-26-h100-long-offload.jsonl
OFFLOAD_CALIBRATION_PEAKS_GIB = {131072: 48.8, 196608: 67.5}
# + offload + moe_tile_tokens 16384 (65536 pinned, 458752 pageable); H100 2026-11-26 session 4,
# bench/results/2026-11-26s4-h100-run8-tiled64k-long448k-{tiled64k,long448k}.jsonl
TILED_CALIBRATION_PEAKS_GIB = {65536: 23.70, 458752: 48.01}
TILED_CALIBRATION_TILE_TOKENS = 16384
HOST_CALIBRATION_PEAK_GIB = (393216, 82.0)  # pageable offload + tiles: host RAM peak (`free`), 125 GiB host; session 3
LONG_CONTEXT_TILE_TOKENS = 16384  # what the long-context pick sets model.moe_tile_tokens to
# lengths measured to fit that the ladder of powers of two and 1.5 x powers of two misses (448K, session 4)
MEASURED_FIT_LENGTHS = (458752,)
NO_CHECKPOINT_PEAKS_GIB = {4096: 31.6, 8192: 47.8}  # MXFP4, r=16, flex, chunk 4096, checkpointing OFF (session 4)
NO_CHECKPOINT_SPEEDUP = 16742 / 11302  # 4K tok/s without / with checkpointing, same H100 run (session 4, run 3)
VLLM_OVERHEAD_GIB = 2.0  # vLLM's CUDA graphs, sampler and activation workspace (not measured here)
USABLE_FRACTION, CUDA_CONTEXT_GIB = 0.95, 0.5
HOST_USABLE_FRACTION = 0.8  # the CPU tier shares the host with the OS and data workers
HOST_RESERVE_GIB = 0.1  # on a CPU there is no caching allocator to calibrate; a token allowance


@dataclass(frozen=True)
class MeasuredFailure:
    """A long-context run (checkpointing + offload, tiled or not) that failed: no plan claims a fit at `tokens`
    or more per micro-step with those settings on a card of at most `max_memory_gib` (None: any card),
    whatever the estimate says (module docstring)."""

    tokens: int
    tiled: bool  # moe_tile_tokens on
    max_memory_gib: float | None
    why: str


H100_MEASURED_MEMORY_GIB = 81559 / 1024  # the H100 80GB HBM3 of the runs (nvidia-smi memory.total, MiB)
MEASURED_FAILURES = (
    # session 3, bench/results/2026-11-26-h100-long-offload.jsonl: a GPU OOM, so only cards no larger
    MeasuredFailure(
        262144, False, H100_MEASURED_MEMORY_GIB,
        "ran out of GPU memory at 262144 tokens on an H100 80GB (session 3's code; not measured since)",
    ),
    # session 4, bench/results/2026-11-26s4-h100-run7-long512k-long512k.jsonl: not an OOM, cause unknown: any card
    MeasuredFailure(
        524288, True, None,
        "failed at 524288 tokens on an H100 80GB (session 4: SystemError inside the tiled experts with the GPU "
        "at 69 GB; cause not diagnosed)",
    ),
)  # fmt: skip


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
    offload_pinned: bool = True  # offloaded checkpoints in pinned host memory (False: exact-size pageable)
    moe_tile_tokens: int = 0  # experts in token tiles of this size (0: off)
    host_memory_gib: float = 0.0  # host RAM for offloaded checkpoints; 0: this machine's (`_host_memory_gib`)
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
    return _dense_width(p) + _expert_width(p)


def _dense_width(p: ArchPreset) -> int:
    """The part of `_layer_width` outside the experts: residual and q/k/v/o."""
    return p.hidden_size + (2 * p.num_attention_heads + 2 * p.num_key_value_heads) * p.head_dim


def _expert_width(p: ArchPreset) -> int:
    """The experts' part of `_layer_width`: top-k rows of gate_up (2 x intermediate) and the activation."""
    return p.num_experts_per_tok * 3 * p.intermediate_size


def _checkpoint_bytes_per_token(p: ArchPreset, b: int = 2) -> int:
    return p.num_hidden_layers * p.hidden_size * b


def _calibrate(peaks: dict[int, float]) -> tuple[float, float]:
    """(working-set factor, reserve GiB) solved from two measured checkpointed H100 peaks (module docstring)."""
    p = get_preset("gpt-oss-20b")
    (t0, peak0), (t1, peak1) = sorted(peaks.items())
    per_token = (peak1 - peak0) * GIB / (t1 - t0)
    checkpoint_per_token = p.num_hidden_layers * p.hidden_size * 2
    factor = (per_token - checkpoint_per_token) / (_layer_width(p) * 2)
    fixed = peak0 - MEASURED_20B_WEIGHTS_GIB["mxfp4"] - lora_param_count(p, CALIBRATION_LORA_R) * 16 / GIB
    reserve = fixed - t0 * per_token / GIB
    return factor, reserve


WORKING_SET_FACTOR, RESERVE_GIB = _calibrate(CALIBRATION_PEAKS_GIB)


def _fixed_20b_gib(reserve: float | None = None) -> float:
    """What the calibration runs hold whatever the length: MXFP4 weights, LoRA r16 + AdamW, the reserve."""
    p = get_preset("gpt-oss-20b")
    reserve = RESERVE_GIB if reserve is None else reserve
    return MEASURED_20B_WEIGHTS_GIB["mxfp4"] + lora_param_count(p, CALIBRATION_LORA_R) * 16 / GIB + reserve


def _slope_intercept(peaks: dict[int, float]) -> tuple[float, float]:
    """(bytes per token, GiB at 0 tokens) of the line through two measured peaks."""
    (t0, peak0), (t1, peak1) = sorted(peaks.items())
    per_token = (peak1 - peak0) * GIB / (t1 - t0)
    return per_token, peak0 - t0 * per_token / GIB


def _calibrate_offload() -> tuple[float, float]:
    """(OFFLOAD_RESIDUE_FRACTION, OFFLOAD_RESIDUE_OFFSET_GIB) from session 3's two offload peaks, against the
    untiled working set and reserve of the code they ran (SESSION3_CALIBRATION_PEAKS_GIB; module docstring)."""
    p = get_preset("gpt-oss-20b")
    factor, reserve = _calibrate(SESSION3_CALIBRATION_PEAKS_GIB)
    per_token, at_zero = _slope_intercept(OFFLOAD_CALIBRATION_PEAKS_GIB)
    fraction = (per_token - factor * _layer_width(p) * 2) / _checkpoint_bytes_per_token(p)
    return fraction, _fixed_20b_gib(reserve) - at_zero


OFFLOAD_RESIDUE_FRACTION, OFFLOAD_RESIDUE_OFFSET_GIB = _calibrate_offload()


def _offload_residue_gib(tokens: int, b: int = 2) -> float:
    """What stays on the GPU of the offloaded checkpoints (module docstring), GiB."""
    checkpoints = tokens * _checkpoint_bytes_per_token(get_preset("gpt-oss-20b"), b)
    return max(0.0, OFFLOAD_RESIDUE_FRACTION * checkpoints / GIB - OFFLOAD_RESIDUE_OFFSET_GIB)


def _calibrate_tiled() -> tuple[float, float]:
    """(TILED_WORKING_FACTOR, TILE_WORKING_FACTOR) from the two offload + tiles peaks, with the reserve and the
    offload residue (clamp included: at 64K it is 0) held at their calibrations (module docstring)."""
    p = get_preset("gpt-oss-20b")
    peaks = TILED_CALIBRATION_PEAKS_GIB
    working = {t: peak - _fixed_20b_gib() - _offload_residue_gib(t) for t, peak in peaks.items()}
    per_token, at_zero = _slope_intercept(working)
    dense = per_token / (_dense_width(p) * 2)
    return dense, at_zero * GIB / (_expert_width(p) * 2 * TILED_CALIBRATION_TILE_TOKENS)


TILED_WORKING_FACTOR, TILE_WORKING_FACTOR = _calibrate_tiled()


def _calibrate_host() -> float:
    """HOST_BASE_GIB: the measured host peak less the offloaded blocks (pageable, so exact-size)."""
    p = get_preset("gpt-oss-20b")
    tokens, peak = HOST_CALIBRATION_PEAK_GIB
    return peak - tokens * _checkpoint_bytes_per_token(p) / GIB


HOST_BASE_GIB = _calibrate_host()


def _loss_chunk_bytes(p: ArchPreset, tokens: int, chunk_size: int, b: int = 2) -> int:
    return min(chunk_size, tokens) * p.vocab_size * (b + 4)  # logits + fp32 softmax


def _calibrate_no_checkpoint() -> tuple[float, float]:
    """(NO_CHECKPOINT_FACTOR, NO_CHECKPOINT_OFFSET_GIB) from the two peaks without checkpointing: every layer's
    activations live, L x factor x layer width x 2 B per token, plus the loss chunk and an offset."""
    p = get_preset("gpt-oss-20b")
    per_token, at_zero = _slope_intercept(NO_CHECKPOINT_PEAKS_GIB)
    factor = per_token / (p.num_hidden_layers * _layer_width(p) * 2)
    t0 = min(NO_CHECKPOINT_PEAKS_GIB)
    return factor, at_zero - _fixed_20b_gib() - _loss_chunk_bytes(p, t0, 4096) / GIB


NO_CHECKPOINT_FACTOR, NO_CHECKPOINT_OFFSET_GIB = _calibrate_no_checkpoint()


def _pinned_block(nbytes: int) -> int:
    """What torch's pinned host allocator reserves for a block: the next power of two."""
    return 1 << max(nbytes - 1, 0).bit_length()


# ------------------------------------------------------------------------------------------ estimate
@dataclass(frozen=True)
class MemoryEstimate:
    parts: dict[str, float]  # GiB by component (module docstring), in display order
    total_gib: float
    note: str = ""  # how the total combines the parts when it is not their sum
    host_gib: float = 0.0  # host RAM the offloaded checkpoints need (with the process); 0 without offload


@dataclass(frozen=True)
class Setup:
    """The knobs of an estimate besides the stage's own settings (defaults from a tier)."""

    weight_format: str
    dtype: str = "bfloat16"
    attention: str = "flex"
    gradient_checkpointing: bool = True
    offload_activations: bool = False
    offload_pinned: bool = True  # offloaded checkpoints in pinned host memory (rounded up to a power of two)
    moe_tile_tokens: int = 0  # experts in token tiles of this size (0: off)
    rollout_backend: str = "own"
    lora_r: int = 16
    loss_chunk_size: int = 4096
    device: str = "cuda"  # "cuda" | "cpu": which reserve applies
    qat_trainable: str = "lora"  # qat.trainable: "experts" adds grads + Adam moments of the fp32 expert masters

    @classmethod
    def of(cls, tier: GpuTier, lora_r: int = 16) -> Setup:
        return cls(
            weight_format=tier.weight_format,
            dtype=tier.dtype,
            attention=tier.attention,
            gradient_checkpointing=tier.gradient_checkpointing,
            offload_activations=tier.offload_activations,
            offload_pinned=tier.offload_pinned,
            moe_tile_tokens=tier.moe_tile_tokens,
            rollout_backend=tier.rollout_backend,
            lora_r=lora_r,
            loss_chunk_size=tier.loss_chunk_size,
            device="cuda" if tier.is_gpu else "cpu",
        )


def _step_tokens(stage: str, s: StageSettings) -> int:
    """Tokens of one micro-step (IPO: chosen and rejected side by side)."""
    return s.batch_size * (2 if stage == "ipo" else 1) * s.seq_len


def _measured_failure(setup: Setup, tokens: int, budget: float) -> str:
    """Why `setup` is not proposed at `tokens` per micro-step on a card of `budget` usable GiB: the
    MEASURED_FAILURES entry that covers it, else ""."""
    if setup.device != "cuda" or not (setup.gradient_checkpointing and setup.offload_activations):
        return ""
    for f in MEASURED_FAILURES:
        card = f.max_memory_gib is None or budget <= f.max_memory_gib * USABLE_FRACTION - CUDA_CONTEXT_GIB + 1e-9
        if tokens >= f.tokens and (setup.moe_tile_tokens > 0) == f.tiled and card:
            return f.why
    return ""


def estimate_stage_memory(p: ArchPreset, stage: str, s: StageSettings, setup: Setup) -> MemoryEstimate:
    """Peak memory (GiB) of one micro-step of `stage` with settings `s` (module docstring for the model)."""
    if stage not in STAGES:
        raise ValueError(f"stage: unknown stage {stage!r}; known: {list(STAGES)}")
    b = _dtype_bytes(setup.dtype)
    L = p.num_hidden_layers
    sequences = s.batch_size * (2 if stage == "ipo" else 1)  # IPO: chosen and rejected side by side
    tokens = _step_tokens(stage, s)
    layer = WORKING_SET_FACTOR * _layer_width(p) * b * tokens
    if setup.moe_tile_tokens > 0 and tokens > setup.moe_tile_tokens:  # expert rows for one tile only
        dense = TILED_WORKING_FACTOR * _dense_width(p) * tokens
        layer = min(layer, (dense + TILE_WORKING_FACTOR * _expert_width(p) * setup.moe_tile_tokens) * b)
    if setup.attention == "eager":  # scores, probabilities and their gradient: [seqs, heads, T, T] fp32
        layer += 3 * sequences * p.num_attention_heads * s.seq_len**2 * 4
    chunk = _loss_chunk_bytes(p, tokens, setup.loss_chunk_size, b)
    host = 0.0
    if setup.gradient_checkpointing:
        checkpoints = L * tokens * p.hidden_size * b
        if setup.offload_activations:  # to host memory; the GPU keeps the calibrated residue
            block = tokens * p.hidden_size * b  # one layer's input
            host = L * (_pinned_block(block) if setup.offload_pinned else block) / GIB + HOST_BASE_GIB
            checkpoints = max(0.0, OFFLOAD_RESIDUE_FRACTION * checkpoints - OFFLOAD_RESIDUE_OFFSET_GIB * GIB)
        working = max(layer, chunk)
    elif setup.device == "cuda":  # every layer's activations stay alive (calibrated: NO_CHECKPOINT_PEAKS_GIB)
        live = L * NO_CHECKPOINT_FACTOR * _layer_width(p) * b * tokens
        checkpoints, working = 0.0, live + chunk + NO_CHECKPOINT_OFFSET_GIB * GIB
    else:
        checkpoints, working = 0.0, L * layer + chunk
    if stage == "qat":  # one layer's experts dense twice (dequantised + fake-quantised)
        working += 2 * p.num_local_experts * 3 * p.hidden_size * p.intermediate_size * b
    weights, trainable = weights_gib(p, setup.weight_format, setup.dtype), lora_param_count(p, setup.lora_r) * 16 / GIB
    if stage == "qat":  # train/qat.py merges into float32 expert masters (+ grads and Adam moments if trained)
        counts = param_counts(p)
        weights = (counts["other"] * b + counts["expert"] * 4) / GIB
        trainable = counts["expert"] * 12 / GIB if setup.qat_trainable == "experts" else trainable
    parts = {
        "weights": weights,
        "lora+adamw": trainable,
        "checkpoints": checkpoints / GIB,
        "working": working / GIB,
        "rollout": 0.0,
        "reserve": RESERVE_GIB if setup.device == "cuda" else HOST_RESERVE_GIB,
    }
    train_total = sum(parts.values())
    if stage != "grpo":
        return MemoryEstimate(parts, train_total, host_gib=host)
    kv = s.num_generations * s.seq_len * L * 2 * p.num_key_value_heads * p.head_dim * b / GIB
    if setup.rollout_backend == "vllm":  # a colocated server keeps its pool while we train
        # vLLM serves the checkpoint's own MXFP4 experts (+ the merged LoRA), whatever format we train on
        parts["rollout"] = weights_gib(p, "mxfp4", setup.dtype) + kv + VLLM_OVERHEAD_GIB
        return MemoryEstimate(
            parts, train_total + parts["rollout"], "vLLM weights + KV stay resident while training", host
        )
    parts["rollout"] = kv  # generation runs between training steps, with the same resident weights
    generate = parts["weights"] + parts["lora+adamw"] + parts["reserve"] + kv
    return MemoryEstimate(parts, max(train_total, generate), "max(training, generation with KV cache)", host)


# ---------------------------------------------------------------------------------------------- plan
@dataclass(frozen=True)
class StagePlan:
    stage: str
    settings: StageSettings
    memory: MemoryEstimate
    fits: bool
    advice: tuple[str, ...] = ()  # what to change when it does not fit
    setup: Setup | None = None  # the stage's setup: the plan's, or the long-context settings picked for it
    note: str = ""  # a pick, or settings that cost speed without being needed


@dataclass(frozen=True)
class Plan:
    tier: GpuTier
    preset: str
    setup: Setup
    budget_gib: float
    stages: list[StagePlan] = field(default_factory=list)
    host_memory_gib: float = 0.0  # host RAM the offload estimate is checked against
    host_budget_gib: float = 0.0  # HOST_USABLE_FRACTION of it
    host_is_local: bool = True  # host_memory_gib is this machine's RAM (neither the caller nor the tier named one)

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
    auto_long_context: bool | None = None,
    host_memory_gib: float | None = None,
) -> Plan:
    """Each stage's memory estimate on `tier` for `preset` (default: the tier's). With `check`, a plan that
    cannot fit raises PlanError naming the stage and what to change (seq_len, format, offload, tiling).

    `auto_long_context` (default: on when `setup` is None, i.e. the tier preset decides): a stage whose
    seq_len does not fit as configured gets the cheapest of offload, offload + token-tiled experts (each
    pageable where the host cannot hold pinned blocks) that fits. `host_memory_gib`: the host RAM offloaded
    checkpoints must fit in (default: the tier's, else this machine's)."""
    tier = get_tier(tier) if isinstance(tier, str) else tier
    preset_name = preset if isinstance(preset, str) else (tier.preset if preset is None else "custom")
    arch = get_preset(preset_name) if preset is None or isinstance(preset, str) else preset
    auto = setup is None if auto_long_context is None else auto_long_context
    setup = setup or Setup.of(tier, lora_r)
    check_weight_format(setup.weight_format, tier.min_capability)
    if setup.weight_format not in tier.allowed_formats:
        raise PlanError(
            f"tier {tier.name}: weight format {setup.weight_format} not allowed; use one of {list(tier.allowed_formats)}"
        )
    if setup.rollout_backend not in ROLLOUT_BACKENDS:
        raise PlanError(f"rollout backend {setup.rollout_backend!r}: unknown; use one of {list(ROLLOUT_BACKENDS)}")
    budget = usable_gib(tier)
    local = not (host_memory_gib or tier.host_memory_gib)
    host = _host_memory_gib() if local else host_memory_gib or tier.host_memory_gib
    host_budget = host * HOST_USABLE_FRACTION
    out = Plan(tier, preset_name, setup, budget, host_memory_gib=host, host_budget_gib=host_budget, host_is_local=local)
    for stage in stages:
        s = (settings or {}).get(stage) or tier.stages[stage]
        fit = _Fit(arch, stage, s, budget, host_budget)
        stage_setup, memory = setup, estimate_stage_memory(arch, stage, s, setup)
        fits, note = fit(setup, memory), ""
        if not fits and auto:
            picked = _pick_long_context(fit, setup)
            if picked is not None:
                (stage_setup, memory), fits = picked, True
                note = (
                    f"seq_len {s.seq_len} does not fit as configured; picked {_describe(stage_setup)}"
                    f"{_pinned_note(fit, stage_setup, ' (%s)')}: "
                    + " ".join(f"--set {o}" for o in _long_context_overrides(stage_setup, setup))
                )
        elif fits and _no_checkpoint_fits(fit, setup):
            m_off = fit.estimate(dataclasses.replace(setup, gradient_checkpointing=False))
            note = (
                f"checkpointing is not needed at seq_len {s.seq_len} ({m_off.total_gib:.1f} GiB without it) and "
                f"costs ~{(NO_CHECKPOINT_SPEEDUP - 1) * 100:.0f}% speed: --set model.gradient_checkpointing=false"
            )
        elif fits and _cost(setup) > (0, 0, 0):
            cheapest = _pick_long_context(fit, _bare(setup))
            if cheapest is not None and _cost(cheapest[0]) < _cost(setup):
                note = (
                    f"{_describe(setup)} is not needed at seq_len {s.seq_len} ({_describe(cheapest[0])} fits in "
                    f"{cheapest[1].total_gib:.1f} GiB) and costs speed"
                )
        advice = () if fits else tuple(_advice(arch, stage, s, setup, tier, budget, host_budget))
        out.stages.append(StagePlan(stage, s, memory, fits, advice, stage_setup, note))
    if check and not out.fits:
        raise PlanError(_refusal(out))
    return out


@dataclass(frozen=True)
class _Fit:
    """One stage's estimate and fit test: the GPU total within `budget`, offloaded checkpoints within
    `host_budget`, and no measured failure of those settings at that length (MEASURED_FAILURES)."""

    arch: ArchPreset
    stage: str
    s: StageSettings
    budget: float
    host_budget: float

    def estimate(self, setup: Setup, s2: StageSettings | None = None) -> MemoryEstimate:
        return estimate_stage_memory(self.arch, self.stage, s2 or self.s, setup)

    def failure(self, setup: Setup, s2: StageSettings | None = None) -> str:
        return _measured_failure(setup, _step_tokens(self.stage, s2 or self.s), self.budget)

    def __call__(self, setup: Setup, memory: MemoryEstimate | None = None, s2: StageSettings | None = None) -> bool:
        m = memory or self.estimate(setup, s2)
        return m.total_gib <= self.budget and m.host_gib <= self.host_budget and not self.failure(setup, s2)


def _long_context_ladder(setup: Setup) -> list[Setup]:
    """Cheapest first: `setup`, + offload_activations, + moe_tile_tokens (what `setup` has on stays on).
    Only with checkpointing on a GPU (the offload moves the checkpoints)."""
    ladder = [setup]
    if not setup.gradient_checkpointing or setup.device != "cuda":
        return ladder
    if not setup.offload_activations:
        ladder.append(dataclasses.replace(setup, offload_activations=True))
    if setup.moe_tile_tokens <= 0:
        ladder.append(dataclasses.replace(ladder[-1], moe_tile_tokens=LONG_CONTEXT_TILE_TOKENS))
    return ladder


def _variant(fit: _Fit, setup: Setup, s2: StageSettings | None = None) -> tuple[Setup, MemoryEstimate] | None:
    """`setup` if it fits; with pinned offload the host cannot hold, its pageable variant if that fits."""
    m = fit.estimate(setup, s2)
    if fit(setup, m, s2):
        return setup, m
    if setup.offload_activations and setup.offload_pinned:
        pageable = dataclasses.replace(setup, offload_pinned=False)
        m2 = fit.estimate(pageable, s2)
        if fit(pageable, m2, s2):
            return pageable, m2
    return None


def _pick_long_context(fit: _Fit, setup: Setup) -> tuple[Setup, MemoryEstimate] | None:
    """The first rung of the ladder that fits (pageable where the host demands it), or None."""
    for rung in _long_context_ladder(setup):
        found = _variant(fit, rung)
        if found is not None:
            return found
    return None


def _no_checkpoint_fits(fit: _Fit, setup: Setup) -> bool:
    """A GPU stage with checkpointing on (and nothing offloaded or tiled) that would fit without it."""
    if setup.device != "cuda" or not setup.gradient_checkpointing or _cost(setup) > (0, 0, 0):
        return False
    return fit(dataclasses.replace(setup, gradient_checkpointing=False))


def _bare(setup: Setup) -> Setup:
    return dataclasses.replace(setup, offload_activations=False, offload_pinned=True, moe_tile_tokens=0)


def _cost(setup: Setup) -> tuple[int, int, int]:
    """Speed cost of the long-context settings, for ordering: offload, tiling, pageable copies."""
    offload = setup.offload_activations and setup.gradient_checkpointing
    tiled = setup.moe_tile_tokens > 0
    return int(offload) + int(tiled), int(tiled), int(offload and not setup.offload_pinned)


def _describe(setup: Setup, pinning: bool = True) -> str:
    if setup.offload_activations and setup.gradient_checkpointing:
        text = f"offload ({'pinned' if setup.offload_pinned else 'pageable'})" if pinning else "offload"
    else:
        text = "no offload"
    return text + (f" + MoE tiles {setup.moe_tile_tokens}" if setup.moe_tile_tokens > 0 else "")


def _long_context_overrides(setup: Setup, relative_to: Setup) -> list[str]:
    """`--set` strings of the long-context settings where `setup` differs from `relative_to`."""
    out = []
    for key in ("offload_activations", "moe_tile_tokens", "offload_pinned"):
        value = getattr(setup, key)
        if value != getattr(relative_to, key):
            out.append(f"model.{key}={str(value).lower() if isinstance(value, bool) else value}")
    return out


def _seq_ladder(floor: int = 512, cap: int = 2**24) -> list[int]:
    """The lengths the largest-fitting search steps through: powers of two, 1.5 x powers of two and the
    measured lengths off that ladder (MEASURED_FIT_LENGTHS)."""
    ladder = {n for k in range(25) for n in (2**k, 3 * 2**k // 2)} | set(MEASURED_FIT_LENGTHS)
    return sorted(n for n in ladder if floor <= n <= cap)


def _largest_seq(fit: _Fit, s: StageSettings, setup: Setup, exact: bool = False) -> tuple[int, Setup] | None:
    """The largest ladder seq_len (and the variant: pinned or pageable, unless `exact`) at which `setup` fits."""
    best = None
    for n in _seq_ladder():
        s2 = dataclasses.replace(s, seq_len=n)
        found = ((setup, None) if fit(setup, s2=s2) else None) if exact else _variant(fit, setup, s2)
        if found is None:
            break
        best = (n, found[0])
    return best


def _advice(
    arch: ArchPreset, stage: str, s: StageSettings, setup: Setup, tier: GpuTier, budget: float, host_budget: float
) -> list[str]:
    fit = _Fit(arch, stage, s, budget, host_budget)

    def total(s2: StageSettings = s, setup2: Setup = setup) -> float:
        return estimate_stage_memory(arch, stage, s2, setup2).total_gib

    advice = []
    seq = _largest_fitting(
        lambda n: fit(setup, s2=dataclasses.replace(s, seq_len=n)), s.seq_len, extra=MEASURED_FIT_LENGTHS
    )
    if seq:
        advice.append(f"lower seq_len to {seq} ({total(dataclasses.replace(s, seq_len=seq)):.1f} GiB)")
    if s.batch_size > 1 and fit(setup, s2=dataclasses.replace(s, batch_size=1)):
        advice.append(f"lower batch_size to 1 and raise grad_accum to {s.grad_accum * s.batch_size}")
    if stage == "grpo" and s.num_generations > 2:
        gens = _largest_fitting(
            lambda n: fit(setup, s2=dataclasses.replace(s, num_generations=n)), s.num_generations, floor=2
        )
        if gens:
            advice.append(f"lower num_generations to {gens}")
    if setup.weight_format != "mxfp4" and "mxfp4" in tier.allowed_formats:
        mx = dataclasses.replace(setup, weight_format="mxfp4")
        if fit(mx):
            advice.append(f"switch model.expert_format to mxfp4 ({total(setup2=mx):.1f} GiB)")
    picked = _pick_long_context(fit, _bare(setup))  # the cheapest long-context settings that fit
    if picked is not None and picked[0] != setup:
        new, m = picked
        host = f"; host {m.host_gib:.1f} GiB of {host_budget:.1f} usable" if m.host_gib else ""
        advice.append(
            f"set {' '.join(_long_context_overrides(new, setup))} ({m.total_gib:.1f} GiB{host}"
            f"{_pinned_note(fit, new, '; %s')})"
        )
    elif picked is None:  # a rung the GPU holds but the host cannot: say what host it needs
        for rung in _long_context_ladder(_bare(setup))[1:]:
            m = fit.estimate(dataclasses.replace(rung, offload_pinned=False))
            if m.total_gib <= budget and not fit.failure(rung):
                advice.append(
                    f"with {_describe(rung, False)} the GPU holds it ({m.total_gib:.1f} GiB), but the offloaded "
                    f"checkpoints need {m.host_gib:.1f} GiB of host RAM (pageable), over {host_budget:.1f} usable: "
                    f"a host of {m.host_gib / HOST_USABLE_FRACTION:.0f} GiB or more"
                )
                break
    for rung in _long_context_ladder(_bare(setup))[1:]:  # the estimate fits, a measured run failed
        why, gpu = fit.failure(rung), fit.estimate(rung).total_gib
        if why and gpu <= budget:
            advice.append(f"not {_describe(rung, False)}: its estimate fits ({gpu:.1f} GiB), but it {why}")
    if not setup.gradient_checkpointing:
        ck = dataclasses.replace(setup, gradient_checkpointing=True)
        if fit(ck):
            advice.append(f"enable model.gradient_checkpointing ({total(setup2=ck):.1f} GiB)")
    if stage == "grpo" and setup.rollout_backend == "vllm":
        own = dataclasses.replace(setup, rollout_backend="own")
        if fit(own):
            advice.append(f"use the own rollout backend instead of vllm ({total(setup2=own):.1f} GiB)")
    ways = [(rung, _largest_seq(fit, s, rung, exact=rung == setup)) for rung in _long_context_ladder(setup)]
    if len(ways) > 1 and any(best for _, best in ways):
        advice.append(
            "largest seq_len that fits: "
            + ", ".join(
                (f"{best[0]} " if best else "none ")
                + ("as configured" if rung == setup else "with " + _describe(best[1] if best else rung, bool(best)))
                for rung, best in ways
            )
        )
    return advice or ["nothing short of a larger GPU tier fits this stage (even seq_len 512 is too long)"]


def _pinned_note(fit: _Fit, setup: Setup, template: str) -> str:
    """Why a pick or advice says pageable (the host estimate of the pinned blocks) put in `template`; ""
    when it says pinned."""
    if not (setup.offload_activations and not setup.offload_pinned):
        return ""
    pinned = fit.estimate(dataclasses.replace(setup, offload_pinned=True)).host_gib
    return template % f"pinned blocks round up to {pinned:.1f} GiB of host RAM, over {fit.host_budget:.1f} usable"


def _largest_fitting(fits, current: int, floor: int = 512, extra: tuple[int, ...] = ()) -> int | None:
    """Largest power of two (or of the lengths in `extra`) below `current` (and >= floor) for which fits(n)."""
    n, candidates = 2 ** (max(current - 1, 1).bit_length() - 1), set()
    while n >= floor:
        candidates.add(n)
        n //= 2
    for n in sorted(candidates | {e for e in extra if floor <= e < current}, reverse=True):
        if fits(n):
            return n
    return None


def _refusal(p: Plan) -> str:
    lines = [f"plan does not fit tier {p.tier.name} ({p.budget_gib:.1f} GiB usable of {p.tier.memory_gib:.1f} GiB):"]
    for s in p.stages:
        if not s.fits:
            parts = ", ".join(f"{k} {v:.1f}" for k, v in s.memory.parts.items() if v > 0)
            host = f"; host {s.memory.host_gib:.1f} GiB of {p.host_budget_gib:.1f} usable" if s.memory.host_gib else ""
            lines.append(
                f"  {s.stage}: needs {s.memory.total_gib:.1f} GiB ({parts}{host}); to fit: " + "; or ".join(s.advice)
            )
    return "\n".join(lines)


def format_plan(p: Plan) -> str:
    """The table `rustforge plan` prints."""
    t, su = p.tier, p.setup
    device = f"{t.device_name}, " if t.device_name else ""
    weights = _gib(p.stages[0].memory.parts["weights"]) if p.stages else "-"
    checkpointing = "on" if su.gradient_checkpointing else "off"
    if su.offload_activations and su.gradient_checkpointing:
        checkpointing += f" + offload ({'pinned' if su.offload_pinned else 'pageable'})"
    tiles = f" in {su.moe_tile_tokens}-token tiles" if su.moe_tile_tokens > 0 else ""
    lines = [
        f"tier {t.name} ({device}{t.memory_gib:.1f} GiB, {p.budget_gib:.1f} GiB usable), model {p.preset}",
        f"  frozen weights {su.weight_format} ({weights} GiB), dtype {su.dtype}, MoE {t.moe_backend}{tiles}, "
        f"attention {su.attention}, rollout {su.rollout_backend}, checkpointing {checkpointing}, LoRA r={su.lora_r}",
    ]
    stage_setups = [s.setup or su for s in p.stages]
    if any(x.offload_activations and x.gradient_checkpointing for x in stage_setups):
        lines.append(
            f"  host RAM {p.host_memory_gib:.1f} GiB ({p.host_budget_gib:.1f} usable) for offloaded checkpoints"
            + (" (this machine's)" if p.host_is_local else "")
        )
    lines.append("")
    part_names = list(p.stages[0].memory.parts) if p.stages else []
    header = ["stage", "batch", "accum", "seq_len", "steps", "gens", "offload", "tiles", *part_names, "total GiB",
              "host GiB", "fits"]  # fmt: skip
    rows = []
    for s, x in zip(p.stages, stage_setups, strict=True):
        st = s.settings
        on = x.offload_activations and x.gradient_checkpointing
        rows.append(
            [
                s.stage,
                st.batch_size,
                st.grad_accum,
                st.seq_len,
                st.max_steps,
                st.num_generations,
                ("pinned" if x.offload_pinned else "pageable") if on else "-",
                x.moe_tile_tokens or "-",
                *(_gib(v) for v in s.memory.parts.values()),
                _gib(s.memory.total_gib),
                _gib(s.memory.host_gib),
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
        if s.note:
            lines.append(f"  {s.stage}: {s.note}")
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
        f"model.offload_pinned={str(tier.offload_pinned).lower()}",
        f"model.moe_tile_tokens={tier.moe_tile_tokens}",
        f"model.loss_chunk_size={tier.loss_chunk_size}",
        f"lang_rust.batch_size={s.batch_size}",
        f"lang_rust.grad_accum={s.grad_accum}",
    ]


def plan_run(cfg, tier: GpuTier | str, check: bool = True, host_memory_gib: float | None = None) -> Plan:
    """The plan of a RunConfig on `tier`: stages the config describes (today lang_rust: its largest
    curriculum seq_len, batch and accumulation) use the config's values, the rest the tier's; the setup is
    the config's model section ("auto" dtype/attention resolve to the tier's). The config's offload/tiling
    settings are kept as written (no long-context pick): a stage that needs them is refused with advice."""
    tier = get_tier(tier) if isinstance(tier, str) else tier
    m = cfg.model
    setup = dataclasses.replace(
        Setup.of(tier, cfg.lora.r),
        weight_format=m.expert_format,
        dtype=tier.dtype if m.dtype == "auto" else m.dtype,
        attention=tier.attention if m.attention == "auto" else m.attention,
        gradient_checkpointing=m.gradient_checkpointing,
        offload_activations=m.offload_activations,
        offload_pinned=m.offload_pinned,
        moe_tile_tokens=m.moe_tile_tokens,
        loss_chunk_size=m.loss_chunk_size,
        qat_trainable=cfg.qat.trainable,
    )
    t = cfg.lang_rust
    settings = {
        "lang_rust": StageSettings(
            t.batch_size, t.grad_accum, max(p.seq_len for p in t.phases), sum(p.steps for p in t.phases)
        )
    }
    preset = None if m.path else m.preset  # a local checkpoint is gpt-oss-20b (the only released size we train)
    return plan(
        tier, preset or "gpt-oss-20b", lora_r=cfg.lora.r, settings=settings, setup=setup, check=check,
        host_memory_gib=host_memory_gib,
    )  # fmt: skip
