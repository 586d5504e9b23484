"""Typed configuration: every default of rustforge lives in this file.

A run is described by one YAML file that maps onto `RunConfig`. Loading is strict: an unknown key or a
value of the wrong type is an error that names the file and the dotted field path, so a typo never
silently falls back to a default. Own code (no OmegaConf/Hydra): 100 lines buys exact error messages and
no extra dependency.
"""

from __future__ import annotations

import dataclasses
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml


class ConfigError(ValueError):
    """A config value is missing, unknown or of the wrong type; the message names file and field."""


# --------------------------------------------------------------------------------------------- model
@dataclass
class ModelConfig:
    preset: str = "tiny"  # "tiny" | "gpt-oss-20b" (see rustforge.model.presets)
    path: str | None = None  # a local gpt-oss directory; overrides the preset's architecture
    attention: str = "auto"  # "eager" (reference, any device) | "flex" | "triton" (GPU: model/triton_attention) | "auto"
    experts: str = "auto"  # "reference" (transformers' loop) | "grouped" (split-LoRA grouped GEMM) | "auto"
    expert_format: str = "bf16"  # frozen expert storage: "bf16" | "fp8" | "mxfp4"
    dtype: str = "auto"  # "auto" = float32 on CPU, bfloat16 on GPU; "float16" is refused for training
    router_aux_loss_coef: float = 0.01  # 0.005-0.01 suits fine-tuning; 0.02+ fights the pretrained router
    gradient_checkpointing: bool = False
    offload_activations: bool = False  # checkpointed layer inputs kept in pinned CPU memory
    offload_pinned: bool = True  # False: exact-size pageable host copies (pinned ones round up to a power of 2)
    loss_chunk_size: int = 4096  # tokens per chunk of the chunked cross-entropy
    # GPU: the forward's bf16 logits kept for the backward while they total at most this (one lm_head GEMM
    # fewer per chunk; 1.6 GB at 4K tokens on the 201K vocabulary); 0 = always recompute them
    loss_keep_logits_gib: float = 2.0
    moe_tile_tokens: int = 0  # > 0: experts run in token tiles of this size (long context; 0 = off)
    seed: int = 0  # weight init seed for presets without a checkpoint


@dataclass
class LoraConfig:
    r: int = 16
    alpha: float = 32.0
    dropout: float = 0.0
    targets: list[str] = field(
        default_factory=lambda: ["q_proj", "k_proj", "v_proj", "o_proj", "gate_up_proj", "down_proj"]
    )


@dataclass
class TinyBaseConfig:
    """Full-parameter pretraining of the embedded tiny base on the corpus, so that later stages start from
    a model that knows some Rust (a random base with frozen random lm_head barely moves under LoRA)."""

    pretrain_steps: int = 300
    seq_len: int = 256
    batch_size: int = 8
    lr: float = 3e-3
    warmup_steps: int = 20


@dataclass
class TokenizerConfig:
    path: str | None = None  # tokenizer.json to use; None = the model directory's, or the tiny one
    vocab_size: int = 4096  # size of the BPE trained for the tiny model (specials included)
    train_files_limit: int = 3000  # Rust files sampled to train the tiny tokenizer


# ---------------------------------------------------------------------------------------------- data
@dataclass
class CorpusConfig:
    sources: list[str] = field(default_factory=list)  # directories or git repositories (path or URL)
    debian: bool = True  # harvest /usr/share/cargo/registry (Debian librust-*-dev packages)
    debian_registry: str = "/usr/share/cargo/registry"
    out_dir: str = "data_cache/corpus"
    max_file_bytes: int = 200_000
    min_file_bytes: int = 64
    val_fraction: float = 0.05  # fraction of crates held out for validation
    near_dup_threshold: float = 0.85  # Jaccard similarity of shingles above which a file is a near-duplicate
    prefix_path: bool = True  # prefix each document with "// path: crate/src/x.rs"
    shard_docs: int = 5000
    max_crates: int | None = None
    seed: int = 0


@dataclass
class PackingConfig:
    long_docs: str = "split"  # "split" (with overlap) | "truncate"
    split_overlap: int = 64  # tokens repeated between consecutive pieces of a split document
    min_piece_tokens: int = 16  # pieces shorter than this are dropped


@dataclass
class CurriculumPhase:
    seq_len: int
    steps: int



# ---------------------------------------------------------------------------------------------- rust
@dataclass
class SandboxConfig:
    timeout_s: float = 120.0  # wall clock for one run; the process group is SIGKILLed after it
    cpu_s: int = 300  # RLIMIT_CPU per process (soft: SIGXCPU, hard one second later: SIGKILL)
    memory_mb: int = 4096  # RLIMIT_AS per process; rustc + LLVM need ~1-2 GiB of address space
    nproc: int = 256  # RLIMIT_NPROC: tasks (processes and threads) of the sandbox user
    fsize_mb: int = 512  # RLIMIT_FSIZE: largest file the program may write
    tmpfs_mb: int = 512  # size of /tmp inside the sandbox (RAM-backed)
    output_limit_bytes: int = 1_000_000  # per stream; head and tail halves are kept
    allow_unsandboxed: bool = False  # CLI --unsafe-no-sandbox: run with rlimits only if bwrap can't
    cargo_jobs: int = 0  # `cargo -j`; 0 = cargo's default (number of CPUs)
    registry: str = "/usr/share/cargo/registry"  # directory source replacing crates.io (offline)
    bwrap: str = "bwrap"
    uid_base: int = 3_000_000  # root only: first uid of the pool sandboxed programs run as
    uid_count: int = 1024  # root only: size of that pool (= max concurrent sandboxes)

    def __post_init__(self):
        positive = ("timeout_s", "cpu_s", "memory_mb", "nproc", "fsize_mb", "tmpfs_mb", "output_limit_bytes",
                    "uid_count")  # fmt: skip
        for name in positive:
            if getattr(self, name) <= 0:
                raise ValueError(f"SandboxConfig.{name} must be > 0, got {getattr(self, name)!r}")
        if self.uid_base <= 0:
            raise ValueError(f"SandboxConfig.uid_base must be a non-root uid, got {self.uid_base}")


@dataclass
class RewardConfig:
    compiles: float = 0.2  # the crate and its tests build
    tests_pass: float = 0.5  # times the fraction of tests passing
    all_tests_pass: float = 0.3  # bonus when every test passes (and there is at least one)
    harmony_format: float = 0.2  # the completion is well-formed Harmony (validator's verdict)
    endless_reasoning: float = -0.8  # analysis past the budget and no final message
    analysis_token_budget: int = 4096
    patch_size: float = -0.2  # reached at patch_size_max_lines changed lines, linear from the free allowance
    patch_size_free_lines: int = 40
    patch_size_max_lines: int = 400

    def __post_init__(self):
        if self.patch_size_max_lines <= self.patch_size_free_lines:
            raise ValueError(
                f"RewardConfig.patch_size_max_lines ({self.patch_size_max_lines}) must exceed "
                f"patch_size_free_lines ({self.patch_size_free_lines})"
            )
        if self.analysis_token_budget < 0:
            raise ValueError(f"RewardConfig.analysis_token_budget must be >= 0, got {self.analysis_token_budget}")


MUTATION_KINDS = ("body_removal", "operator", "off_by_one", "wrong_return")


@dataclass
class TaskMiningConfig:
    out_dir: str = "data_cache/tasks"
    registry: str = "/usr/share/cargo/registry"  # where dev-dependencies are looked up (offline)
    kinds: list[str] = field(default_factory=lambda: list(MUTATION_KINDS))
    workers: int = 2  # crates mined at once (each runs cargo with its default -j)
    max_crates: int | None = None  # after sorting smallest first
    max_source_kb: int = 600  # skip crates whose library sources hold more Rust than this (slow to build)
    max_tasks_per_crate: int = 16
    max_candidates_per_crate: int = 48  # mutants tried per crate at most
    max_per_function: int = 3  # tasks (and candidates) per function at most
    max_kind_share: float = 0.5  # of a crate's max_tasks_per_crate, per mutation kind (keeps kinds mixed)
    max_body_lines: int = 60  # longer functions are not mutated
    max_removed_body_lines: int = 30  # body_removal only for bodies this short
    give_up_after: int = 16  # stop a crate after this many mutants in a row made no task (weak tests)
    crate_budget_s: float = 240.0  # wall clock for one crate's mutants (its baseline not counted)
    time_budget_s: float | None = 1200.0  # whole run: no crate starts after it (a re-run goes on); None = no limit
    baseline_timeout_s: float = 300.0
    mutant_timeout_min_s: float = 30.0  # per mutant: max(this, build + factor * baseline test time)
    mutant_timeout_factor: float = 10.0
    val_fraction: float = 0.05  # crates held out, by the corpus' hash of the crate name
    seed: int = 0

    def __post_init__(self):
        unknown = [k for k in self.kinds if k not in MUTATION_KINDS]
        if unknown or not self.kinds:
            raise ValueError(f"TaskMiningConfig.kinds: {unknown or 'empty'}; expected some of {MUTATION_KINDS}")
        if self.time_budget_s is not None and self.time_budget_s <= 0:
            raise ValueError(f"TaskMiningConfig.time_budget_s must be > 0 or None, got {self.time_budget_s!r}")
        for name in ("workers", "give_up_after", "max_tasks_per_crate", "max_candidates_per_crate", "max_per_function",
                     "max_body_lines", "max_removed_body_lines", "max_source_kb"):  # fmt: skip
            if getattr(self, name) < 1:
                raise ValueError(f"TaskMiningConfig.{name} must be >= 1, got {getattr(self, name)!r}")
        if not 0.0 < self.max_kind_share <= 1.0:
            raise ValueError(f"TaskMiningConfig.max_kind_share must be in (0, 1], got {self.max_kind_share!r}")
        if not 0.0 <= self.val_fraction < 1.0:
            raise ValueError(f"TaskMiningConfig.val_fraction must be in [0, 1), got {self.val_fraction!r}")


# --------------------------------------------------------------------------------------------- train
@dataclass
class ExpertMonitorConfig:
    every_steps: int = 50  # interval length in optimizer steps; 0 turns the monitor off
    overload_factor: float = 4.0  # alarm when an expert gets more than this multiple of its fair share
    # mean per-token router entropy, as a fraction of log(num_experts), under which a layer alarms. A trained
    # router is confident by design: the tiny base's layer 0 sat at 0.32-0.35 with its busiest expert at 1.8x its
    # fair share (load fine), so 0.5 raised false alarms; load collapse is caught by overload/idle anyway.
    entropy_floor: float = 0.2
    patience: int = 3  # consecutive intervals a condition must hold before it alarms
    idle_fraction_max: float = 0.25  # alarm when more than this share of a layer's experts get no token
    stop_on_alarm: bool = False  # stop training (after a checkpoint) when an alarm fires
    probe_drift: bool = True  # the trainer probes routing drift from the base model at each interval end
    drift_max: float = 0.5  # alarm when the total variation of a layer's load from the base exceeds this

    def __post_init__(self):
        rules = (
            ("every_steps", self.every_steps >= 0, ">= 0"),
            ("overload_factor", self.overload_factor > 1.0, "> 1"),
            ("entropy_floor", 0.0 <= self.entropy_floor < 1.0, "in [0, 1)"),
            ("patience", self.patience >= 1, ">= 1"),
            ("idle_fraction_max", 0.0 <= self.idle_fraction_max <= 1.0, "in [0, 1]"),
            ("drift_max", 0.0 < self.drift_max <= 1.0, "in (0, 1]"),
        )
        for name, ok, rule in rules:
            if not ok:
                raise ValueError(f"ExpertMonitorConfig.{name} must be {rule}, got {getattr(self, name)!r}")


@dataclass
class TrainConfig:
    lr: float = 2e-4
    min_lr_ratio: float = 0.1  # cosine decays to lr * min_lr_ratio
    weight_decay: float = 0.0
    betas: list[float] = field(default_factory=lambda: [0.9, 0.999])
    warmup_steps: int = 10
    batch_size: int = 1  # packed sequences per micro-batch
    grad_accum: int = 1
    max_grad_norm: float = 1.0
    phases: list[CurriculumPhase] = field(default_factory=lambda: [CurriculumPhase(512, 100)])
    eval_every: int = 50
    eval_batches: int = 8
    eval_seq_len: int | None = None  # one fixed validation set for the whole run; None = first phase's seq_len
    save_every: int = 50
    log_every: int = 1
    seed: int = 0
    # the whole step (micro-batches, clipping, AdamW) as one CUDA graph, captured per curriculum phase
    # (train/graphed_step.py): one GPU, a bf16 model, no gradient checkpointing or offload, lang_rust and
    # core_agent only; at 4K on the H100 graphed steps ran 4.93-4.98x transformers + PEFT, eager ones ~4.5x
    # (host-bound; bench/RESULTS.md)
    cuda_graph: bool = False


HARMONY_CHANNELS = ("analysis", "commentary", "final")  # the Harmony format's channels (data/harmony.py's)
LONG_CONVERSATION_MODES = ("truncate", "drop")


@dataclass
class CoreAgentConfig(TrainConfig):
    """core_agent (train/core_agent.py): TrainConfig (lr, phases, ... as lang_rust) plus the stage's data and
    sampling settings."""

    lr: float = 1e-4
    phases: list[CurriculumPhase] = field(
        default_factory=lambda: [CurriculumPhase(8192, 1500), CurriculumPhase(16384, 500)]
    )
    # agent trajectories (rust/trajectories.py JSONL); empty = the run's own, <run_dir>/agent_data/, which
    # `rustforge pipeline` builds from mined tasks (train/agent_data.py)
    trajectories: list[str] = field(default_factory=list)
    openai_jsonl: list[str] = field(default_factory=list)  # extra chats in OpenAI messages format (training)
    val_trajectories: list[str] = field(default_factory=list)  # empty: hold out val_fraction of the above
    val_fraction: float = 0.05
    init_from: str = "previous"  # "previous" (<run_dir>/lang_rust/adapter), "none" (fresh LoRA) or a path
    train_channels: list[str] | None = None  # assistant channels with a loss; None = all
    long_conversations: str = "truncate"  # "truncate" (at a message boundary) | "drop"
    sample_prompts: int = 16  # held-out prompts sampled at each evaluation; 0 = no sampling
    sample_max_new_tokens: int = 1024
    sample_temperature: float = 0.0  # 0 = greedy
    sample_top_p: float = 1.0
    # sampling uses eager attention: its prefill holds ~batch x heads x prompt_len^2 x 6 bytes per layer
    # (gpt-oss-20b, 64 heads: 4 prompts of 4096 tokens ~ 26 GB, transient, while no training batch is alive)
    sample_batch_size: int = 4
    sample_max_prompt_tokens: int = 4096  # longer held-out prompts are not sampled
    reasoning_token_budget: int = 4096  # analysis tokens without an answer beyond this = endless reasoning

    def __post_init__(self):
        if self.long_conversations not in LONG_CONVERSATION_MODES:
            raise ValueError(
                f"core_agent.long_conversations must be one of {LONG_CONVERSATION_MODES}, got {self.long_conversations!r}"
            )
        channels = self.train_channels
        if channels is not None and (not channels or set(channels) - set(HARMONY_CHANNELS)):
            raise ValueError(f"core_agent.train_channels must be a non-empty subset of {HARMONY_CHANNELS}, got {channels}")
        if not 0.0 <= self.val_fraction < 1.0:
            raise ValueError(f"core_agent.val_fraction must be in [0, 1), got {self.val_fraction}")
        for name in ("sample_max_new_tokens", "sample_batch_size", "sample_max_prompt_tokens"):
            if getattr(self, name) < 1:
                raise ValueError(f"core_agent.{name} must be >= 1, got {getattr(self, name)}")
        if self.sample_prompts < 0:
            raise ValueError(f"core_agent.sample_prompts must be >= 0, got {self.sample_prompts}")


IPO_LOSS_TYPES = ("ipo", "sigmoid")
IPO_REFERENCES = ("base", "start")


@dataclass
class IpoConfig(TrainConfig):
    """ipo (train/ipo.py): TrainConfig plus the preference data and TRL's DPO/IPO settings (same names and
    meaning)."""

    lr: float = 2e-5
    warmup_steps: int = 20
    phases: list[CurriculumPhase] = field(default_factory=lambda: [CurriculumPhase(16384, 1000)])
    pairs: list[str] = field(default_factory=list)  # empty = the run's own, <run_dir>/agent_data/ (as core_agent)
    val_pairs: list[str] = field(default_factory=list)  # empty: hold out val_fraction of `pairs` by task id
    val_fraction: float = 0.05
    init_from: str = "previous"  # "previous" (<run_dir>/core_agent/adapter), "none" or an adapter directory
    beta: float = 0.1  # TRL's beta (IPO's tau): the target margin is 1 / (2 beta)
    loss_type: str = "ipo"  # "ipo" | "sigmoid" (DPO)
    max_length: int = 8192  # prompt + completion tokens per side; completions are cut to fit
    max_prompt_length: int = 6144  # longer prompts drop the pair
    average_logprobs: bool | None = None  # None: as TRL (mean for ipo, sum for sigmoid)
    reference: str = "base"  # "base" (LoRA off) | "start" (the adapter the stage started from)

    def __post_init__(self):
        if self.loss_type not in IPO_LOSS_TYPES:
            raise ValueError(f"ipo.loss_type must be one of {IPO_LOSS_TYPES}, got {self.loss_type!r}")
        if self.reference not in IPO_REFERENCES:
            raise ValueError(f"ipo.reference must be one of {IPO_REFERENCES}, got {self.reference!r}")
        if not self.beta > 0:
            raise ValueError(f"ipo.beta must be > 0, got {self.beta}")
        if not 0 < self.max_prompt_length < self.max_length:
            raise ValueError(
                f"ipo.max_prompt_length must be in (0, max_length={self.max_length}), got {self.max_prompt_length}"
            )
        short = [p.seq_len for p in self.phases if p.seq_len < 2 * self.max_length]
        if short or (self.eval_seq_len is not None and self.eval_seq_len < 2 * self.max_length):
            raise ValueError(
                f"ipo.phases[].seq_len (and eval_seq_len) must be >= 2 * max_length = {2 * self.max_length}: "
                f"a sequence holds both sides of a pair; got {short or self.eval_seq_len}"
            )
        if not 0.0 <= self.val_fraction < 1.0:
            raise ValueError(f"ipo.val_fraction must be in [0, 1), got {self.val_fraction}")

    @property
    def averages(self) -> bool:
        """Whether sequence log-probs are token means (TRL: for ipo) rather than sums."""
        return self.loss_type == "ipo" if self.average_logprobs is None else self.average_logprobs


# ---- grpo and its rollouts (issue #7)
ROLLOUT_BACKENDS = ("rustforge", "vllm")
ROLLOUT_WEIGHTS = ("auto", "live", "merged", "compressed")


@dataclass
class RolloutConfig:
    """The rollout engine (rollout/engine.py) and the multi-turn tool driver (rollout/multiturn.py)."""

    backend: str = "rustforge"  # "rustforge" (own engine, shares the training weights) | "vllm" (if installed)
    max_batch: int = 64  # sequences decoding at once (KV-cache slots); more episodes wait in a queue
    weights: str = "auto"  # "live" (the model's modules) | "merged" (LoRA folded into dense copies) |
    # "compressed" (attention merged, experts read in their stored format) | "auto" (rollout/weights.py)
    cuda_graphs: bool = True  # capture decode steps (CUDA, bf16)
    prefill_chunk: int = 512  # prompt tokens per prefill chunk
    max_turns: int = 8  # tool calls per episode; a call past it ends the episode
    tool_workers: int = 4  # tool calls (sandboxed cargo) running at once while other episodes decode
    tool_output_chars: int = 8000  # a tool's answer is cut to this many characters
    stop_on_end: bool = False  # also stop at <|end|>; off, a turn runs on to <|call|> or <|return|>
    release_between_steps: bool = True  # free the KV cache and merged weights while the policy trains

    def __post_init__(self):
        if self.backend not in ROLLOUT_BACKENDS:
            raise ValueError(f"rollout.backend must be one of {ROLLOUT_BACKENDS}, got {self.backend!r}")
        if self.weights not in ROLLOUT_WEIGHTS:
            raise ValueError(f"rollout.weights must be one of {ROLLOUT_WEIGHTS}, got {self.weights!r}")
        for name in ("max_batch", "prefill_chunk", "tool_workers", "tool_output_chars"):
            if getattr(self, name) < 1:
                raise ValueError(f"rollout.{name} must be >= 1, got {getattr(self, name)}")
        if self.max_turns < 0:
            raise ValueError(f"rollout.max_turns must be >= 0, got {self.max_turns}")


GRPO_LOSS_TYPES = ("grpo", "dr_grpo", "dapo")
GRPO_SCALE_REWARDS = ("group", "batch", "none")
GRPO_ENVIRONMENTS = ("rust_tasks", "harmony_format")


@dataclass
class GrpoConfig(TrainConfig):
    """grpo (train/grpo.py): TrainConfig (lr, curriculum phases: seq_len = the longest episode, prompt + all
    turns) plus TRL's GRPOConfig names and meaning for the RL settings. One step = one generation round of
    prompts_per_step x num_generations episodes and num_iterations optimizer updates on it; batch_size and
    grad_accum are unused (micro-batches are packed to micro_batch_tokens and halved on OOM)."""

    lr: float = 5e-6
    warmup_steps: int = 5
    phases: list[CurriculumPhase] = field(default_factory=lambda: [CurriculumPhase(8192, 200), CurriculumPhase(16384, 100)])
    eval_every: int = 25
    save_every: int = 10
    init_from: str = "previous"  # "previous" (<run_dir>/ipo/adapter), "none" or an adapter directory
    environment: str = "rust_tasks"  # "rust_tasks" (tools + cargo rewards) | "harmony_format" (format reward only)
    tasks_dir: str | None = None  # mined tasks; None = tasks.out_dir
    prompts_per_step: int = 8
    num_generations: int = 8  # G: completions per prompt, one group
    max_prompt_length: int = 4096  # longer prompts are left out
    max_completion_length: int = 4096  # tokens the model samples per episode, over all its turns
    temperature: float = 1.0
    top_p: float = 1.0
    loss_type: str = "dapo"  # "grpo" (per-sequence mean) | "dr_grpo" (/ max_completion_length) | "dapo" (per token)
    scale_rewards: str = "group"  # divide advantages by the std of the group | batch | none (Dr. GRPO)
    epsilon: float = 0.2  # clip range below 1
    epsilon_high: float | None = None  # clip range above 1; None = epsilon (DAPO uses 0.28)
    beta: float = 0.0  # KL coefficient to the LoRA-disabled reference (k3 estimator, as TRL)
    num_iterations: int = 1  # optimizer updates per generation round (mu)
    mask_truncated_completions: bool = False  # episodes cut by a budget get no loss (DAPO)
    micro_batch_tokens: int = 16384  # tokens per training forward; halved on CUDA OOM
    log_kl: bool = True  # log the KL to the reference even when beta = 0 (one extra no-grad forward)
    val_prompts: int = 16  # held-out prompts rolled out at each evaluation (one episode each)
    val_temperature: float = 0.0  # 0 = greedy held-out episodes
    reward_workers: int = 4  # episodes scored at once (cargo test in the sandbox)

    def __post_init__(self):
        if self.loss_type not in GRPO_LOSS_TYPES:
            raise ValueError(f"grpo.loss_type must be one of {GRPO_LOSS_TYPES}, got {self.loss_type!r}")
        if self.scale_rewards not in GRPO_SCALE_REWARDS:
            raise ValueError(f"grpo.scale_rewards must be one of {GRPO_SCALE_REWARDS}, got {self.scale_rewards!r}")
        if self.environment not in GRPO_ENVIRONMENTS:
            raise ValueError(f"grpo.environment must be one of {GRPO_ENVIRONMENTS}, got {self.environment!r}")
        if self.num_generations < 2:
            raise ValueError(f"grpo.num_generations must be >= 2 (advantages are relative to the group), got {self.num_generations}")
        for name in ("prompts_per_step", "max_prompt_length", "max_completion_length", "num_iterations",
                     "micro_batch_tokens", "reward_workers"):  # fmt: skip
            if getattr(self, name) < 1:
                raise ValueError(f"grpo.{name} must be >= 1, got {getattr(self, name)}")
        if not 0 < self.epsilon < 1 or (self.epsilon_high is not None and not self.epsilon_high > 0):
            raise ValueError(f"grpo.epsilon must be in (0, 1) and epsilon_high > 0, got {self.epsilon}, {self.epsilon_high}")
        if self.beta < 0 or self.temperature <= 0 or not 0 < self.top_p <= 1 or self.val_temperature < 0:
            raise ValueError("grpo: need beta >= 0, temperature > 0, 0 < top_p <= 1, val_temperature >= 0")
        short = [p.seq_len for p in self.phases if p.seq_len <= self.max_prompt_length]
        if short:
            raise ValueError(f"grpo.phases[].seq_len must exceed max_prompt_length={self.max_prompt_length}, got {short}")


QAT_FORMATS = ("mxfp4", "nvfp4")
QAT_TRAINABLE = ("experts", "lora")
QAT_DATA = ("lang_rust", "core_agent", "mix")
QAT_EXPERTS = ("auto", "reference", "grouped")  # rustforge.model.qat_moe
MXFP4_ROUNDINGS = ("gpt-oss", "floor", "ceil")  # rustforge.model.quant.MXFP4_RULES


@dataclass
class QatConfig(TrainConfig):
    """qat (train/qat.py): after the last training stage, LoRA merged into the base in float32, then training
    through fake-quantised expert weights (straight-through estimator) at a low lr on the same data mix.
    Validation uses the chosen data's own held-out batches (lang_rust's and/or core_agent's eval_seq_len,
    batch_size and eval_batches), so eval_seq_len and eval_batches here are not used."""

    lr: float = 1e-5
    warmup_steps: int = 10
    phases: list[CurriculumPhase] = field(default_factory=lambda: [CurriculumPhase(4096, 200)])
    format: str = "mxfp4"  # the format simulated, and written by `rustforge export` (mxfp4 | nvfp4)
    trainable: str = "experts"  # "experts" (float32 master expert weights) | "lora" (expert LoRA; for 20B)
    source: str = "auto"  # adapter merged first: "auto" (last finished stage), a stage name or a directory
    # trained on: "lang_rust" (its corpus), "core_agent" (the Harmony trajectories core_agent trains on,
    # assistant tokens only) or "mix" (both: mix_core_agent_share of the batches from core_agent, evenly spread)
    data: str = "lang_rust"
    mix_core_agent_share: float = 0.5
    # fake-quantised experts: "reference" (per-expert loop), "grouped" (grouped GEMMs, one quantiser call per
    # projection and layer), "auto" (grouped where model.experts resolves to grouped)
    experts: str = "auto"

    def __post_init__(self):
        if self.format not in QAT_FORMATS:
            raise ValueError(f"qat.format must be one of {QAT_FORMATS}, got {self.format!r}")
        if self.data not in QAT_DATA:
            raise ValueError(f"qat.data must be one of {QAT_DATA}, got {self.data!r}")
        if self.experts not in QAT_EXPERTS:
            raise ValueError(f"qat.experts must be one of {QAT_EXPERTS}, got {self.experts!r}")
        if not 0.0 < self.mix_core_agent_share < 1.0:
            raise ValueError(f"qat.mix_core_agent_share must be in (0, 1), got {self.mix_core_agent_share}")
        if self.trainable not in QAT_TRAINABLE:
            raise ValueError(f"qat.trainable must be one of {QAT_TRAINABLE}, got {self.trainable!r}")


@dataclass
class ExportConfig:
    """`rustforge export` (export/hf.py) and the merge check shared with qat."""

    out_dir: str | None = None  # None = <run_dir>/export/<format>
    source: str = "auto"  # "auto" (qat result if finished, else the last stage's adapter) | "qat" | stage | dir
    mxfp4_rounding: str = "gpt-oss"  # MXFP4 rule: gpt-oss (triton_kernels, ceil scale, ties away) | floor (OCP)
    kl_threshold: float = 1e-4  # max KL(base + adapter || merged) in nats on the probe batch; above it: refuse
    probe_tokens: int = 256  # tokens of the merge-check probe batch
    max_shard_gb: float = 5.0
    base_model_name: str | None = None  # base_model_name_or_path written into adapter exports
    # true: merge, check and write one decoder layer at a time (export/streaming.py; ~2 layers of float32 in
    # RAM instead of 3 models); false: the whole model in memory; auto: stream from 1B parameters up
    streaming: str | bool = "auto"

    def __post_init__(self):
        if self.streaming not in ("auto", True, False):
            raise ValueError(f"export.streaming must be auto, true or false, got {self.streaming!r}")
        if self.mxfp4_rounding not in MXFP4_ROUNDINGS:
            raise ValueError(f"export.mxfp4_rounding must be one of {MXFP4_ROUNDINGS}, got {self.mxfp4_rounding!r}")
        if not self.kl_threshold > 0 or self.probe_tokens < 2 or not self.max_shard_gb > 0:
            raise ValueError("export.kl_threshold and max_shard_gb must be > 0, probe_tokens >= 2")


# ---- eval harness (issue #10)
EVAL_SUITES = ("crate_tasks", "humaneval_rust")  # rustforge.eval.suites.SUITES (+ its aliases)
EVAL_MODES = ("single", "agentic")


@dataclass
class EvalConfig:
    """`rustforge eval` (eval/harness.py): k samples per problem, tested in the sandbox, pass@k and more."""

    suite: str = "crate_tasks"  # "crate_tasks" (held-out mined tasks) | "humaneval_rust" (a JSONL file, see data)
    data: str | None = None  # crate_tasks: a mined tasks dir (None = tasks.out_dir); humaneval_rust: the JSONL
    split: str = "val"  # crate_tasks: the split evaluated (val = crates held out of every training stage)
    mode: str = "single"  # "single" (code only, no tools) | "agentic" (tools and turns)
    k: int = 4  # samples per problem (n of the pass@k estimator)
    pass_at: list[int] = field(default_factory=lambda: [1, 5, 10])  # reported where k <= samples; n always
    limit: int | None = None  # the first N problems of the suite; None = all
    temperature: float = 0.8  # 0 = greedy (then k samples are the same)
    top_p: float = 0.95
    seed: int = 0
    max_new_tokens: int = 2048  # sampled tokens per sample, over all its turns
    max_prompt_tokens: int = 6144  # longer prompts are skipped (and listed in the report)
    max_context: int = 16384  # agentic: prompt + turns + tool outputs per episode
    max_turns: int = 8  # agentic: tool calls per episode
    reasoning_effort: str = "low"  # the system message's
    test_workers: int = 2  # cargo test runs at once
    test_timeout_s: float | None = None  # per cargo test; None = sandbox.timeout_s
    work_dir: str | None = None  # scratch crates live under a temporary dir here (None = the system's)
    target_dir: str | None = None  # cargo target dirs kept between evals (one per worker); None = temporary
    keep_workspaces: bool = False  # keep every sample's crate (debugging)
    out: str | None = None  # the JSON report; None = <run_dir>/eval/<suite>-<mode>.json

    def __post_init__(self):
        suites = (*EVAL_SUITES, "multipl_e", "multiple_rs", "humaneval")
        if self.suite not in suites:
            raise ValueError(f"eval.suite must be one of {suites}, got {self.suite!r}")
        if self.mode not in EVAL_MODES:
            raise ValueError(f"eval.mode must be one of {EVAL_MODES}, got {self.mode!r}")
        if self.split not in ("train", "val"):
            raise ValueError(f"eval.split must be train or val, got {self.split!r}")
        for name in ("k", "max_new_tokens", "max_prompt_tokens", "test_workers"):
            if getattr(self, name) < 1:
                raise ValueError(f"eval.{name} must be >= 1, got {getattr(self, name)}")
        if any(k < 1 for k in self.pass_at) or (self.limit is not None and self.limit < 1) or self.max_turns < 0:
            raise ValueError(f"eval: need pass_at >= 1, limit >= 1, max_turns >= 0; got {self.pass_at}, {self.limit}, {self.max_turns}")
        if self.temperature < 0 or not 0 < self.top_p <= 1:
            raise ValueError(f"eval: need temperature >= 0 and 0 < top_p <= 1, got {self.temperature}, {self.top_p}")
        if self.max_context <= self.max_prompt_tokens:
            raise ValueError(f"eval.max_context ({self.max_context}) must exceed max_prompt_tokens ({self.max_prompt_tokens})")
        if self.reasoning_effort not in ("low", "medium", "high"):
            raise ValueError(f"eval.reasoning_effort must be low, medium or high, got {self.reasoning_effort!r}")


@dataclass
class RunConfig:
    run_dir: str = "runs/tiny"
    model: ModelConfig = field(default_factory=ModelConfig)
    lora: LoraConfig = field(default_factory=LoraConfig)
    tokenizer: TokenizerConfig = field(default_factory=TokenizerConfig)
    tiny_base: TinyBaseConfig = field(default_factory=TinyBaseConfig)
    corpus: CorpusConfig = field(default_factory=CorpusConfig)
    packing: PackingConfig = field(default_factory=PackingConfig)
    lang_rust: TrainConfig = field(default_factory=TrainConfig)
    core_agent: CoreAgentConfig = field(default_factory=CoreAgentConfig)
    ipo: IpoConfig = field(default_factory=IpoConfig)
    grpo: GrpoConfig = field(default_factory=GrpoConfig)
    rollout: RolloutConfig = field(default_factory=RolloutConfig)
    qat: QatConfig = field(default_factory=QatConfig)
    export: ExportConfig = field(default_factory=ExportConfig)
    expert_monitor: ExpertMonitorConfig = field(default_factory=ExpertMonitorConfig)
    tier: str = "auto"  # GPU-tier preset (rustforge.train.tiers): auto = chosen from the GPU found
    sandbox: SandboxConfig = field(default_factory=SandboxConfig)
    tasks: TaskMiningConfig = field(default_factory=TaskMiningConfig)
    rewards: RewardConfig = field(default_factory=RewardConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)


# ------------------------------------------------------------------------------------------- loading
def load_config(path: str | Path, overrides: list[str] | None = None) -> RunConfig:
    """Read a YAML file into a RunConfig; `overrides` are "a.b.c=value" strings applied on top."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"{path}: config file not found")
    try:
        raw = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as e:
        raise ConfigError(f"{path}: not valid YAML: {e}") from None
    if not isinstance(raw, dict):
        raise ConfigError(f"{path}: top level must be a mapping, got {type(raw).__name__}")
    for item in overrides or []:
        key, sep, value = item.partition("=")
        if not sep:
            raise ConfigError(f"override {item!r}: expected KEY=VALUE")
        _set_dotted(raw, key.strip(), yaml.safe_load(value))
    return from_dict(RunConfig, raw, source=str(path))


def from_dict(cls: type, data: Any, source: str = "<config>", prefix: str = "") -> Any:
    """Build dataclass `cls` from plain data, checking every key and type."""
    where = f"{source}: {prefix or '<top>'}"
    if not isinstance(data, dict):
        raise ConfigError(f"{where}: expected a mapping for {cls.__name__}, got {type(data).__name__}")
    fields = {f.name: f for f in dataclasses.fields(cls)}
    unknown = sorted(set(data) - set(fields))
    if unknown:
        raise ConfigError(f"{where}: unknown field(s) {unknown}; known: {sorted(fields)}")
    hints = typing.get_type_hints(cls)
    kwargs = {}
    for name, value in data.items():
        kwargs[name] = _convert(hints[name], value, source, f"{prefix}.{name}" if prefix else name)
    missing = [
        n
        for n, f in fields.items()
        if n not in kwargs and f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING
    ]
    if missing:
        raise ConfigError(f"{where}: missing required field(s) {missing}")
    try:
        return cls(**kwargs)
    except ValueError as e:
        raise ConfigError(f"{where}: {e}") from None


def _convert(tp: Any, value: Any, source: str, path: str) -> Any:
    origin = typing.get_origin(tp)
    if origin in (typing.Union, types.UnionType):
        options = typing.get_args(tp)
        if value is None and type(None) in options:
            return None
        errors = []
        for option in options:
            if option is type(None):
                continue
            try:
                return _convert(option, value, source, path)
            except ConfigError as e:
                errors.append(str(e))
        raise ConfigError(errors[0] if errors else f"{source}: {path}: invalid value {value!r}")
    if origin is list:
        if not isinstance(value, list):
            raise ConfigError(f"{source}: {path}: expected a list, got {value!r}")
        (item_tp,) = typing.get_args(tp)
        return [_convert(item_tp, v, source, f"{path}[{i}]") for i, v in enumerate(value)]
    if dataclasses.is_dataclass(tp):
        return from_dict(tp, value, source, path)
    if tp is float and isinstance(value, (int, float)) and not isinstance(value, bool):
        return float(value)
    if tp in (int, str, bool) and type(value) is tp:
        return value
    raise ConfigError(f"{source}: {path}: expected {getattr(tp, '__name__', tp)}, got {value!r}")


def _set_dotted(raw: dict, key: str, value: Any) -> None:
    node = raw
    parts = key.split(".")
    for part in parts[:-1]:
        node = node.setdefault(part, {})
        if not isinstance(node, dict):
            raise ConfigError(f"override {key}: {part} is not a mapping")
    node[parts[-1]] = value


def to_dict(cfg: Any) -> dict:
    return dataclasses.asdict(cfg)


def dump_config(cfg: RunConfig, path: str | Path) -> None:
    Path(path).write_text(yaml.safe_dump(to_dict(cfg), sort_keys=False))
