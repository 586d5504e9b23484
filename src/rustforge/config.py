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
    attention: str = "auto"  # "eager" (reference, any device) | "flex" (GPU) | "auto"
    experts: str = "auto"  # "reference" (transformers' loop) | "grouped" (split-LoRA grouped GEMM) | "auto"
    expert_format: str = "bf16"  # frozen expert storage: "bf16" | "fp8" | "mxfp4"
    dtype: str = "auto"  # "auto" = float32 on CPU, bfloat16 on GPU; "float16" is refused for training
    router_aux_loss_coef: float = 0.01  # 0.005-0.01 suits fine-tuning; 0.02+ fights the pretrained router
    gradient_checkpointing: bool = False
    offload_activations: bool = False  # checkpointed layer inputs kept in pinned CPU memory
    loss_chunk_size: int = 4096  # tokens per chunk of the chunked cross-entropy
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
    expert_monitor: ExpertMonitorConfig = field(default_factory=ExpertMonitorConfig)
    tier: str = "auto"  # GPU-tier preset (rustforge.train.tiers): auto = chosen from the GPU found
    sandbox: SandboxConfig = field(default_factory=SandboxConfig)
    tasks: TaskMiningConfig = field(default_factory=TaskMiningConfig)
    rewards: RewardConfig = field(default_factory=RewardConfig)


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
