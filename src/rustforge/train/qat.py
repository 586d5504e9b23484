"""Stage qat: quantisation-aware training after the last training stage, so that the MXFP4 (or NVFP4) export
keeps what fine-tuning learnt.

Why: gpt-oss ships its experts in MXFP4. LoRA fine-tuning moves them in bf16 by deltas mostly smaller than
half an MXFP4 step, so post-training quantisation (PTQ) of the merged model rounds much of the fine-tuning
back to the base. QAT trains through the quantiser instead.

Flow: base (float32) + the previous stage's adapter merged in float32 (checked against base + adapter on a
probe batch like the export, export/hf.check_merge) -> every `mlp.experts` becomes fake-quantised experts
(model/qat_moe.py), whose forward uses the expert weights quantised and dequantised exactly as the export
will write them (the straight-through estimator passes the gradient to the float32 weights) -> SFTTrainer
(checkpoints, resume, lr schedule) at a low lr (default 1e-5) on the previous stages' data ->
`<run_dir>/qat/final/`, which `rustforge export` picks up.

Which experts module (`qat.experts`): "grouped" (GroupedQatExperts: one quantiser call per projection and
layer, grouped GEMMs over expert-sorted rows; the GPU / 20B path), "reference" (QatExperts: transformers'
per-expert loop), "auto" = grouped where model.experts resolves to grouped. Same parameters and function.

What trains (`qat.trainable`):
- "experts" (default): the expert weight stacks themselves as float32 master weights; everything else is
  frozen. On the tiny model that is 6M parameters. On gpt-oss-20b it is ~19.7B parameters, x 16 bytes for
  fp32 master + Adam ~ 300 GB: more than a node's GPUs without sharding -> use "lora" there.
- "lora": a fresh LoRA on the experts of the merged model; the forward fake-quantises W + scaling * A @ B
  (the sum the export writes), materialised per expert like PEFT's target_parameters. Adapter-sized state.
Attention, router, embeddings and norms stay frozen and unquantised (gpt-oss's MXFP4 checkpoints keep
them bf16).

Data (`qat.data`): "lang_rust" (its corpus; validated on lang_rust's held-out batches), "core_agent" (the
Harmony trajectories core_agent trains on, through its own builders: assistant tokens only; validated on
its held-out batches) or "mix" (both, `qat.mix_core_agent_share` of the batches from core_agent, spread
evenly; validated on both held-out sets together), so QAT can train on the mix the last stages saw and its
numbers compare with theirs.
Metrics at each evaluation: `loss` = the fake-quantised model (what the export computes; at step 0 this is
the PTQ loss), `loss_bf16` = the same weights unquantised, `quant_gap` = their difference.
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import shutil
from dataclasses import replace
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from rustforge.config import LoraConfig, QatConfig, RunConfig
from rustforge.model.moe import EXPERT_TARGETS, add_expert_lora
from rustforge.model.qat_moe import GroupedQatExperts, QatExperts, qat_experts_class
from rustforge.train import distributed
from rustforge.train.sft import BatchSource, SFTTrainer, StageData

STAGE = "qat"
FINAL_DIR = "final"
INFO_NAME = "qat.json"
EXPERTS_FILE = "experts.safetensors"
TRAINABLE_FILE = "trainable.safetensors"
TRAINABLE = ("experts", "lora")


# -------------------------------------------------------------------------------------- the module
@contextlib.contextmanager
def fake_quant_disabled(model):
    """The model with unquantised expert weights for the duration (its bf16/float32 function)."""
    modules = [m for m in getattr(model, "hf", model).modules() if isinstance(m, QatExperts)]
    try:
        for m in modules:
            m.fake_quant_enabled = False
        yield model
    finally:
        for m in modules:
            m.fake_quant_enabled = True


def resolve_qat_experts(qcfg: QatConfig, model_cfg) -> str:
    """qat.experts with "auto" resolved: grouped where model.experts resolves to grouped (the 20B path)."""
    if qcfg.experts != "auto":
        return qcfg.experts
    from rustforge.model.gptoss import resolve_experts

    return resolve_experts(model_cfg)


def install_qat_experts(
    hf_model, qcfg: QatConfig, mxfp4_rule: str, lora_cfg: LoraConfig, seed: int, impl: str = "reference"
) -> None:
    """Swap every layer's experts for QatExperts ("reference") or GroupedQatExperts ("grouped"), the same
    parameters either way, and make exactly the `qcfg.trainable` tensors trainable."""
    if qcfg.trainable not in TRAINABLE:
        raise ValueError(f"qat.trainable must be one of {TRAINABLE}, got {qcfg.trainable!r}")
    experts_cls = qat_experts_class(impl)
    hf_model.requires_grad_(False)
    torch.manual_seed(seed)
    for layer in hf_model.model.layers:
        experts = experts_cls.from_experts(layer.mlp.experts, qcfg.format, mxfp4_rule)
        if qcfg.trainable == "experts":
            experts.gate_up_proj.requires_grad_(True)
            experts.down_proj.requires_grad_(True)
        else:
            add_expert_lora(experts, lora_cfg.r, lora_cfg.alpha, EXPERT_TARGETS)
        layer.mlp.experts = experts


def expert_lora_config(lora_cfg: LoraConfig) -> LoraConfig:
    return replace(lora_cfg, targets=list(EXPERT_TARGETS), dropout=0.0)


def trainable_state(model) -> dict[str, torch.Tensor]:
    """{name in the transformers model: whole CPU tensor} of every trainable tensor; under FSDP gathered
    from the shards, a collective every rank must call."""
    full = distributed.full_trainable_state(getattr(model, "hf", model))
    return {n: t.contiguous() for n, t in full.items()}


def load_trainable_state(model, tensors: dict[str, torch.Tensor], where: str) -> None:
    """Whole tensors (trainable_state's names) into the model; under FSDP each rank keeps its shard."""
    hf = getattr(model, "hf", model)
    params = {n: p for n, p in hf.named_parameters() if p.requires_grad}
    if set(params) != set(tensors):
        missing = sorted(set(params) - set(tensors)) or sorted(set(tensors) - set(params))
        raise KeyError(f"{where}: trainable tensors do not match the QAT model (first difference: {missing[0]})")
    distributed.load_full_into_shards(hf, tensors)


# ------------------------------------------------------------------------------------- the trainer
class QatTrainer(SFTTrainer):
    """SFTTrainer whose checkpoints hold the trainable tensors (expert weights or expert LoRA) and whose
    evaluation reports the fake-quantised and the unquantised loss. Under torchrun SFTTrainer's FSDP2 path
    as is: the float32 expert masters (or the expert LoRA) are sharded parameters of the decoder layers,
    whole inside each layer's forward where QatExperts fake-quantises them."""

    stage_name = "qat"
    graphable = False  # the fake-quantised step is not graphed (untested)

    def _write_weights(self, directory: Path, full: dict[str, torch.Tensor] | None) -> None:
        directory.mkdir(parents=True)
        hf_names = {n.removeprefix("hf."): t.contiguous() for n, t in full.items()} if full else None
        save_file(hf_names or trainable_state(self.model), str(directory / TRAINABLE_FILE))

    def _load_weights(self, path: Path) -> None:
        weights = path / "adapter" / TRAINABLE_FILE
        load_trainable_state(self.model, load_file(str(weights)), str(weights))

    @torch.no_grad()
    def evaluate(self, logger=None) -> dict[str, float]:
        quantized = super().evaluate(None)
        with fake_quant_disabled(self.model):
            unquantized = super().evaluate(None)
        metrics = {
            **quantized,
            "loss_bf16": unquantized["loss"],
            "quant_gap": quantized["loss"] - unquantized["loss"],
        }
        if logger is not None:
            logger.log(self.step, metrics, split="val")
        return metrics


# ---------------------------------------------------------------------------------------- building
def stage_dir(cfg: RunConfig) -> Path:
    return Path(cfg.run_dir) / STAGE


def result_dir(cfg: RunConfig) -> Path:
    return stage_dir(cfg) / FINAL_DIR


def is_complete(directory: Path) -> bool:
    return (Path(directory) / INFO_NAME).is_file()


def merged_start(cfg: RunConfig, adapter: Path, probe_tokens: int, kl_threshold: float):
    """(plain float32 model = base + adapter merged, tokenizer, merge check result); refuses a bad merge."""
    from rustforge.data.tokenizer import load_tokenizer
    from rustforge.export.hf import check_merge, lora_reference, probe_batch
    from rustforge.model.base import base_dir
    from rustforge.model.loader import load_gptoss
    from rustforge.model.lora import merge_adapter

    tokenizer = load_tokenizer(base_dir(cfg))
    base = load_gptoss(base_dir(cfg), dtype=torch.float32)
    reference = lora_reference(base, adapter)
    merged = base  # merged in place: the reference holds its own copy
    merge_adapter(merged, adapter)
    check = check_merge(merged, reference, probe_batch(tokenizer, probe_tokens), kl_threshold)
    return merged, tokenizer, check


class MixedBatches(BatchSource):
    """Batches from two sources, the second's `share` of them spread evenly: batch i (from 0) comes from
    the second when floor((i + 1) * share) > floor(i * share), so 0.5 alternates first, second, first, ...
    Resumes exactly: its state is the count drawn and both sources' states."""

    def __init__(self, first: BatchSource, second: BatchSource, share: float):
        self.sources, self.share, self.drawn = (first, second), share, 0
        self.packing_efficiency = (1 - share) * first.packing_efficiency + share * second.packing_efficiency

    def source_of(self, i: int) -> int:
        return int(math.floor((i + 1) * self.share) > math.floor(i * self.share))

    def next_batch(self):
        batch = self.sources[self.source_of(self.drawn)].next_batch()
        self.drawn += 1
        return batch

    def state_dict(self) -> dict:
        return {"drawn": self.drawn, "share": self.share, "sources": [s.state_dict() for s in self.sources]}

    def load_state_dict(self, state: dict) -> None:
        if state.get("share") != self.share:
            raise ValueError(f"data state: mix share {state.get('share')!r} was saved, this run has {self.share!r}")
        self.drawn = state["drawn"]
        for source, saved in zip(self.sources, state["sources"], strict=True):
            source.load_state_dict(saved)


def lang_rust_data(cfg: RunConfig, qcfg: QatConfig, tokenizer) -> StageData:
    """The lang_rust corpus at QAT's batch size and seed; validation = exactly lang_rust's batches (its
    eval_seq_len, batch size and eval_batches), so the losses compare with that stage's."""
    from rustforge.train import lang_rust

    train_cfg = replace(cfg.lang_rust, batch_size=qcfg.batch_size, seed=qcfg.seed)
    train = lang_rust.stage_data(replace(cfg, lang_rust=train_cfg), tokenizer, stage_dir(cfg)).train
    lang_val = lang_rust.stage_data(cfg, tokenizer, stage_dir(cfg)).validation
    val_seq_len = cfg.lang_rust.eval_seq_len or cfg.lang_rust.phases[0].seq_len
    return StageData(train=train, validation=lambda _seq_len: lang_val(val_seq_len))


def core_agent_data(cfg: RunConfig, qcfg: QatConfig, tokenizer) -> StageData:
    """core_agent's Harmony trajectories (its configured files, else the run's own) through core_agent's
    own builders (assistant tokens only, whole conversations packed, long ones cut as it cuts them) at QAT's
    batch size and seed; validation = exactly core_agent's held-out batches (no sampling metrics)."""
    from rustforge.train import core_agent

    agent_cfg = replace(core_agent.with_run_trajectories(cfg, cfg.core_agent), sample_prompts=0)
    train_convs, val_convs = core_agent.stage_conversations(agent_cfg, tokenizer)  # read once for both
    train_cfg = replace(agent_cfg, batch_size=qcfg.batch_size, seed=qcfg.seed)
    agent_train = core_agent.stage_data(train_cfg, tokenizer, train_convs, val_convs).stage.train
    agent_val = core_agent.stage_data(agent_cfg, tokenizer, train_convs, val_convs).stage.validation
    val_seq_len = agent_cfg.eval_seq_len or agent_cfg.phases[0].seq_len

    def train(phase: int, seq_len: int) -> BatchSource:
        try:
            return agent_train(phase, seq_len)
        except ValueError as err:  # say which setting made the conversations too long
            raise ValueError(f"qat.data={qcfg.data!r}: core_agent conversations at qat.phases[{phase}].seq_len "
                             f"{seq_len}: {err}") from err  # fmt: skip

    return StageData(train=train, validation=lambda _seq_len: agent_val(val_seq_len))


def stage_data(cfg: RunConfig, qcfg: QatConfig, tokenizer) -> StageData:
    """The `qat.data` batches. "mix": both sources (MixedBatches, qat.mix_core_agent_share from core_agent)
    and both held-out sets, whose `loss` is then over all their label tokens together."""
    if qcfg.data == "lang_rust":
        return lang_rust_data(cfg, qcfg, tokenizer)
    if qcfg.data == "core_agent":
        return core_agent_data(cfg, qcfg, tokenizer)
    lang, agent = lang_rust_data(cfg, qcfg, tokenizer), core_agent_data(cfg, qcfg, tokenizer)
    return StageData(
        train=lambda phase, seq_len: MixedBatches(
            lang.train(phase, seq_len), agent.train(phase, seq_len), qcfg.mix_core_agent_share
        ),
        validation=lambda seq_len: lang.validation(seq_len) + agent.validation(seq_len),
    )


def build(cfg: RunConfig, device: torch.device):
    """(RustforgeModel with QatExperts, tokenizer, info) at the start of QAT."""
    from rustforge.export.hf import stage_adapter
    from rustforge.model.gptoss import RustforgeModel, resolve_attention

    qcfg = cfg.qat
    adapter = stage_adapter(cfg.run_dir, qcfg.source)
    merged, tokenizer, check = merged_start(cfg, adapter, cfg.export.probe_tokens, cfg.export.kl_threshold)
    impl = resolve_qat_experts(qcfg, cfg.model)
    install_qat_experts(merged, qcfg, cfg.export.mxfp4_rounding, expert_lora_config(cfg.lora), cfg.model.seed, impl)
    model = RustforgeModel(merged.to(device), cfg.model, resolve_attention(cfg.model, device))
    info = {"source_adapter": str(adapter), "format": qcfg.format, "trainable": qcfg.trainable,
            "mxfp4_rounding": cfg.export.mxfp4_rounding, "experts": impl, "data": qcfg.data,
            "merge_check": check}  # fmt: skip
    return model, tokenizer, info


# ------------------------------------------------------------------------------------------ result
def save_result(model, cfg: RunConfig, info: dict, directory: Path) -> Path:
    """<run_dir>/qat/final: experts.safetensors (trained expert stacks, float32) or adapter/ (expert LoRA over
    base + source adapter), and qat.json. Atomic: staged, then renamed. Under FSDP every rank gathers the
    trained tensors (a collective), rank 0 writes, all wait for it."""
    ctx = distributed.current()
    trained = trainable_state(model)  # exactly the expert stacks ("experts") or the expert LoRA ("lora")
    if ctx.is_main:
        _write_result(model, cfg, info, directory, trained)
    ctx.barrier()
    return directory


def _write_result(model, cfg: RunConfig, info: dict, directory: Path, trained: dict[str, torch.Tensor]) -> None:
    from rustforge.model.lora import save_adapter

    staging = directory.with_name(f".{directory.name}.tmp-{os.getpid()}")
    shutil.rmtree(staging, ignore_errors=True)
    staging.mkdir(parents=True)
    hf = getattr(model, "hf", model)
    if info["trainable"] == "experts":
        stacks = {f"model.layers.{i}.mlp.experts.{p}": trained[f"model.layers.{i}.mlp.experts.{p}"].float()
                  for i in range(len(hf.model.layers)) for p in EXPERT_TARGETS}  # fmt: skip
        save_file(stacks, str(staging / EXPERTS_FILE))
    else:
        with distributed.params_in_place(hf, trained):
            save_adapter(hf, expert_lora_config(cfg.lora), staging / "adapter")
    (staging / INFO_NAME).write_text(json.dumps(info, indent=2) + "\n")
    if directory.exists():
        shutil.rmtree(directory)
    staging.rename(directory)


def load_result(cfg: RunConfig, directory: Path):
    """(plain float32 model = base + source adapter merged with the QAT experts in place, QAT adapter dir or
    None, info) -- what export merges and writes."""
    from rustforge.model.base import base_dir
    from rustforge.model.loader import load_gptoss
    from rustforge.model.lora import merge_adapter

    directory = Path(directory)
    info = json.loads((directory / INFO_NAME).read_text())
    model = load_gptoss(base_dir(cfg), dtype=torch.float32)
    merge_adapter(model, info["source_adapter"])
    if info["trainable"] == "lora":
        return model, directory / "adapter", {"source": str(directory), **info}
    stacks = load_file(str(directory / EXPERTS_FILE))
    params = dict(model.named_parameters())
    with torch.no_grad():
        for name, tensor in stacks.items():
            if name not in params or params[name].shape != tensor.shape:
                raise ValueError(f"{directory / EXPERTS_FILE}: {name} does not fit the base model")
            params[name].copy_(tensor)
    return model, None, {"source": str(directory), **info}


# --------------------------------------------------------------------------------------------- run
def run(cfg: RunConfig, resume: bool = False, progress: bool = True, stop_after: int | None = None) -> dict:
    """Merge, then train with fake-quantised experts to the end of qat.phases; writes qat/final when done."""
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    with distributed.current().main_first():  # under torchrun rank 0 alone builds the lang_rust token cache
        model, tokenizer, info = build(cfg, device)
        data = stage_data(cfg, cfg.qat, tokenizer)
    trainer = QatTrainer(model, cfg.lora, cfg.qat, data, stage_dir(cfg), device, progress)
    trainer.run(resume=resume, stop_after=stop_after)
    if trainer.step == trainer.total_steps:
        save_result(model, cfg, {**info, "steps": trainer.step}, result_dir(cfg))
    return summary(stage_dir(cfg))


def summary(directory: Path) -> dict:
    """The stage's before/after: the fake-quantised model's held-out loss (`val_loss_quantised_start` is PTQ,
    `_end` is QAT; also as val_loss_ptq / val_loss_qat) and the same weights unquantised (`val_loss_bf16_*`)."""
    from rustforge.train.metrics import read_metrics

    val = read_metrics(Path(directory) / "logs" / "metrics.jsonl", "val")
    if not val:
        raise ValueError(f"{directory}: no validation metrics logged")
    first, last = val[min(val)], val[max(val)]
    return {
        "steps": max(val),
        "val_loss_bf16_start": first["loss_bf16"],
        "val_loss_ptq": first["loss"],
        "val_loss_qat": last["loss"],
        "val_loss_bf16_end": last["loss_bf16"],
        "val_loss_quantised_start": first["loss"],
        "val_loss_quantised_end": last["loss"],
        "val_ppl_ptq": math.exp(min(first["loss"], 50)),
        "val_ppl_qat": math.exp(min(last["loss"], 50)),
    }


__all__ = [
    "GroupedQatExperts",
    "MixedBatches",
    "QatExperts",
    "QatTrainer",
    "build",
    "fake_quant_disabled",
    "install_qat_experts",
    "is_complete",
    "load_result",
    "resolve_qat_experts",
    "result_dir",
    "run",
    "save_result",
    "stage_data",
    "summary",
]
