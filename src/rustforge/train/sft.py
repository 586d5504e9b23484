"""The supervised fine-tuning loop shared by the lang_rust, core_agent and ipo stages, and their common setup.

Own code, not HF Trainer or TRL: the curriculum re-packs the data at a new seq_len in the middle of a run,
a resume must continue at exactly the same batch with the same RNG, checkpoints hold PEFT-format adapters
with the expert factors packed as PEFT packs them, and the loss is our chunked one over document-masked
packed batches. Each of those fights a general trainer; the loop below is short enough to read whole.

Around its own data and trainer a stage after lang_rust calls `start_stage` (the base with LoRA, holding the
previous stage's adapter) and every stage `finish_stage` (train or resume; at the end of the curriculum write
the stage's adapter, what the next stage starts from).
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import torch

from rustforge.config import ExpertMonitorConfig, LoraConfig, RunConfig, TrainConfig
from rustforge.model.gptoss import RustforgeModel
from rustforge.train import checkpoint as ckpt
from rustforge.train import distributed
from rustforge.train.expert_monitor import (
    HISTORY_FILE,
    ExpertMonitor,
    probe_model_routing,
)
from rustforge.train.metrics import MetricsLogger

Batch = dict[str, torch.Tensor]


class BatchSource:
    """What the loop needs from a stage's data: deterministic batches and a resumable position."""

    packing_efficiency: float = 1.0

    def next_batch(self) -> Batch:
        raise NotImplementedError

    def state_dict(self) -> dict:
        raise NotImplementedError

    def load_state_dict(self, state: dict) -> None:
        raise NotImplementedError


class DatasetBatches(BatchSource):
    """A packed dataset with next_batch(n)/state_dict()/load_state_dict()/stats as the trainer's source."""

    def __init__(self, dataset, batch_size: int):
        self.dataset, self.batch_size = dataset, batch_size
        self.packing_efficiency = dataset.stats.efficiency

    def next_batch(self) -> Batch:
        return self.dataset.next_batch(self.batch_size)

    def state_dict(self) -> dict:
        return self.dataset.state_dict()

    def load_state_dict(self, state: dict) -> None:
        self.dataset.load_state_dict(state)


@dataclass
class StageData:
    """Builds the train source for curriculum phase `phase` (seq_len given) and the fixed validation batches."""

    train: Callable[[int, int], BatchSource]
    validation: Callable[[int], list[Batch]]


def lr_at(step: int, total: int, cfg: TrainConfig) -> float:
    """Linear warmup then cosine decay to lr * min_lr_ratio, over the whole curriculum."""
    if step < cfg.warmup_steps:
        return cfg.lr * (step + 1) / cfg.warmup_steps
    progress = (step - cfg.warmup_steps) / max(1, total - cfg.warmup_steps)
    cosine = 0.5 * (1 + math.cos(math.pi * min(1.0, progress)))
    return cfg.lr * (cfg.min_lr_ratio + (1 - cfg.min_lr_ratio) * cosine)


def phase_of(step: int, cfg: TrainConfig) -> int:
    end = 0
    for i, phase in enumerate(cfg.phases):
        end += phase.steps
        if step < end:
            return i
    return len(cfg.phases) - 1


class SFTTrainer:
    stage_name = "lang_rust"  # the config section of the stage (error messages)
    graphable = True  # its step is SFT's train_step, so TrainConfig.cuda_graph applies (ipo, grpo, qat: False)

    def __init__(
        self,
        model: RustforgeModel,
        lora_cfg: LoraConfig,
        cfg: TrainConfig,
        data: StageData,
        stage_dir: Path,
        device: torch.device,
        progress: bool = True,
        monitor_cfg: ExpertMonitorConfig | None = None,
    ):
        self.model, self.lora_cfg, self.cfg, self.data = model, lora_cfg, cfg, data
        self.stage_dir, self.device, self.progress = Path(stage_dir), device, progress
        self.ckpt_root = self.stage_dir / "checkpoints"
        self.dist = distributed.current()  # world size 1 without torchrun (#11)
        if self.dist.enabled and not distributed.is_sharded(model):
            distributed.shard_model(model, self.dist)  # before the optimizer sees the parameters
        self.params = [p for p in model.parameters() if p.requires_grad]
        if not self.params:
            raise ValueError("no trainable parameters: lora.targets matched nothing")
        # one fused kernel on a single GPU (the unfused loop measured 5.6 ms of a 274 ms 4K step on the
        # 20B shape); the plain loop elsewhere (CPU, FSDP2's DTensors)
        fused = device.type == "cuda" and not self.dist.enabled
        if cfg.cuda_graph:
            self._check_graphable(model)
        # a captured optimizer step reads the learning rate from a GPU tensor, filled before each replay
        lr = torch.tensor(cfg.lr, device=device) if cfg.cuda_graph else cfg.lr
        self.optimizer = torch.optim.AdamW(
            self.params, lr=lr, betas=tuple(cfg.betas), weight_decay=cfg.weight_decay, foreach=False, fused=fused,
            capturable=cfg.cuda_graph,
        )
        self.graphed = None  # (micro-batch shapes, GraphedTrainStep) while cuda_graph is on
        self.total_steps = sum(p.steps for p in cfg.phases)
        self.step = 0
        self.phase = -1
        self.source: BatchSource | None = None
        self.val_cache: dict[int, list[Batch]] = {}
        self.monitor = None
        if monitor_cfg is not None and monitor_cfg.every_steps > 0:
            history = self.stage_dir / "logs" / HISTORY_FILE
            self.monitor = ExpertMonitor.for_model(model.config, monitor_cfg, history)

    def _check_graphable(self, model: RustforgeModel) -> None:
        problems = []
        if not self.graphable:
            problems.append(f"the {self.stage_name} stage's step is not graphed (only lang_rust and core_agent)")
        if self.device.type != "cuda":
            problems.append("it needs a CUDA device")
        if self.dist.enabled:
            problems.append("it runs in one process only (not under torchrun)")
        if model.cfg.gradient_checkpointing:
            problems.append("model.gradient_checkpointing is on")
        if model.cfg.offload_activations:
            problems.append("model.offload_activations is on")
        if model.hf.model.embed_tokens.weight.dtype != torch.bfloat16:  # the native grouped GEMM takes bf16 only
            problems.append("model.dtype must be bfloat16 (in float32 the experts' GEMMs loop per expert, which waits "
                            "for the GPU)")
        if problems:
            raise ValueError(f"{self.stage_name}.cuda_graph: " + "; ".join(problems))

    # ------------------------------------------------------------------ state
    def _trainer_state(self, optimizer_state: dict) -> dict:
        """What a checkpoint holds besides the weights (the data order is the same on every rank)."""
        return {
            "step": self.step,
            "phase": self.phase,
            "optimizer": optimizer_state,
            "data": self.source.state_dict() if self.source else None,
            "rng": ckpt.rng_state(),
            "expert_monitor": self.monitor.state_dict() if self.monitor else None,
        }

    def _save(self) -> Path:
        """A checkpoint in the single-process format at any world size (resumable at any other): under
        FSDP every rank gathers the trainable tensors and the optimizer state (collectives), rank 0 writes,
        all wait for it."""
        if self.dist.enabled:
            weights = distributed.full_trainable_state(self.model)
            optimizer = distributed.full_optimizer_state(self.optimizer)
        else:
            weights, optimizer = None, self.optimizer.state_dict()
        path = self.ckpt_root / f"step-{self.step:06d}"
        if self.dist.is_main:
            state = self._trainer_state(optimizer)
            if self.dist.enabled:
                state["world_size"] = self.dist.world_size
            path = ckpt.save_checkpoint(self.ckpt_root, self.step, lambda d: self._write_weights(d, weights), state)
        self.dist.barrier()
        return path

    def _write_weights(self, directory: Path, full: dict[str, torch.Tensor] | None) -> None:
        """The checkpoint's weights: the PEFT adapter. full: every trainable tensor gathered (under FSDP),
        swapped in while writing; None: the model's own parameters are whole."""
        from rustforge.model.lora import save_adapter

        with distributed.params_in_place(self.model, full or {}):
            save_adapter(self.model.hf, self.lora_cfg, directory)

    def _load_weights(self, path: Path) -> None:
        """The checkpoint's weights into the model (each rank keeps its shard under FSDP)."""
        distributed.load_adapter_full(self.model, path / "adapter", self.dist)

    def _resume(self) -> bool:
        path = ckpt.latest_checkpoint(self.ckpt_root)
        if path is None:
            return False
        state = ckpt.load_trainer_state(path)
        self._load_weights(path)
        if self.dist.enabled:
            distributed.load_optimizer_state(self.optimizer, self.params, state["optimizer"])
        else:
            self.optimizer.load_state_dict(state["optimizer"])
        self.step, self.phase = state["step"], state["phase"]
        if self.phase >= 0:
            self.source = self.data.train(self.phase, self.cfg.phases[self.phase].seq_len)
            self.source.load_state_dict(state["data"])
        ckpt.set_rng_state(state["rng"])
        if self.monitor and state.get("expert_monitor"):
            self.monitor.load_state_dict(state["expert_monitor"])
        return True

    # ------------------------------------------------------------------ loop
    def run(self, resume: bool = False, stop_after: int | None = None) -> dict:
        """Train to the end of the curriculum (or `stop_after` steps in this call); returns final metrics."""
        resumed = resume and self._resume()
        if not resumed:
            ckpt.seed_everything(self.cfg.seed)
        logger = (
            MetricsLogger(self.stage_dir / "logs", self.total_steps, self.step, self.progress)
            if self.dist.is_main
            else distributed.NullLogger()
        )
        if resumed:
            logger.bar.write(f"resumed from step {self.step}")
        last_val = {}
        if self.step == 0:
            last_val = self.evaluate(logger)
        if self.monitor and self.monitor.cfg.probe_drift and self.monitor.base_counts is None:
            from rustforge.model.lora import lora_disabled

            with lora_disabled(self.model):  # the base's routing, also when starting from an earlier adapter
                self.monitor.set_probe_base(self._probe_routing())
        steps_this_call = 0
        try:
            while self.step < self.total_steps and (stop_after is None or steps_this_call < stop_after):
                self._enter_phase(phase_of(self.step, self.cfg))
                logger.log(self.step + 1, self.train_step())
                self.step += 1
                steps_this_call += 1
                logger.advance()
                done = self.step == self.total_steps
                if self.step % self.cfg.eval_every == 0 or done:
                    last_val = self.evaluate(logger)
                stop = self.dist.broadcast_flag(self._watch_experts(logger))  # rank 0 decides for all
                if self.step % self.cfg.save_every == 0 or done or stop:
                    self._save()
                if stop:
                    logger.bar.write("stopping: expert routing collapsed (expert_monitor.stop_on_alarm)")
                    break
        finally:
            logger.close()
        self.dist.barrier()  # rank 0's logs and checkpoints are complete before any rank reads them
        return last_val

    def _probe_routing(self):
        seq_len = self.cfg.eval_seq_len or self.cfg.phases[0].seq_len
        if seq_len not in self.val_cache:
            self.val_cache[seq_len] = self.data.validation(seq_len)
        with self._autocast():
            return probe_model_routing(self.model, [self._to_device(b) for b in self.val_cache[seq_len][:1]])

    def _watch_experts(self, logger: MetricsLogger) -> bool:
        """At each monitor interval: log routing metrics and drift, raise alarms; True = stop the run."""
        if not (self.monitor and self.monitor.due(self.step)):
            return False
        probe = self._probe_routing() if self.monitor.cfg.probe_drift else None
        logger.log(self.step, self.monitor.end_interval(self.step, probe), split="experts")
        if logger.tb is not None:
            self.monitor.write_tensorboard(logger.tb, self.step)
        for alarm in self.monitor.alarms():
            logger.bar.write(f"EXPERT ALARM step {self.step}: {alarm}")
        return self.monitor.should_stop

    def _enter_phase(self, phase: int) -> None:
        if phase != self.phase or self.source is None:
            self.phase = phase
            self.source = self.data.train(phase, self.cfg.phases[phase].seq_len)

    def train_step(self) -> dict[str, float]:
        if self.cfg.cuda_graph:
            return self.graphed_train_step()
        t0, lr, batches = self.begin_step()
        n_total = self.step_label_tokens  # over the global step: every rank's micro-batches
        pieces = len(batches) * self.dist.world_size  # micro-batches (or row slices of them) in the global step
        ce_total, aux_total = 0.0, 0.0
        for batch in batches:
            with self._autocast():
                out = self.model(**batch)
            if self.monitor:
                self.monitor.update(self.model.router_logits, batch["doc_ids"] >= 0)
            loss = out.ce_sum / max(n_total, 1) + self.model.config.router_aux_loss_coef * out.aux_loss / pieces
            if self.dist.enabled:
                loss = loss * self.dist.world_size  # FSDP averages gradients over ranks; we want their sum
            loss.backward()
            ce_total += float(out.ce_sum.detach())
            aux_total += float(out.aux_loss.detach()) / pieces
        ce_total, aux_total = self.dist.all_reduce_sum([ce_total, aux_total])
        return self.finish_step(batches, t0, lr, {"loss": ce_total / max(n_total, 1), "aux_loss": aux_total})

    def graphed_train_step(self) -> dict[str, float]:
        """train_step as one CUDA graph replay (train/graphed_step.py): the same loss, clipping and update."""
        t0, lr, batches = self.begin_step()
        step = self._graphed_step_for(batches)
        step.replay(batches)
        if self.monitor:
            for router_logits, batch in zip(step.router_logits, batches):
                self.monitor.update(router_logits, batch["doc_ids"] >= 0)
        metrics = {"loss": float(step.ce_sum) / max(self.step_label_tokens, 1), "aux_loss": float(step.aux_loss)}
        return self.finish_step(batches, t0, lr, metrics, grad_norm=float(step.grad_norm))

    def _graphed_step_for(self, batches: list[Batch]):
        """The captured step for these micro-batch shapes: captured anew when they change (a curriculum phase),
        after the previous graph's memory is given back."""
        from rustforge.train.graphed_step import GraphedTrainStep, make_capturable

        shapes = tuple(tuple(b["input_ids"].shape) for b in batches)
        if self.graphed is None or self.graphed[0] != shapes:
            self.graphed = None
            self.optimizer.zero_grad(set_to_none=True)
            torch.cuda.empty_cache()
            make_capturable(self.optimizer, self.device)  # a resumed state may come from a run without the graph
            step = GraphedTrainStep(self.model, self.optimizer, batches, max_grad_norm=self.cfg.max_grad_norm,
                                    keep_router_logits=self.monitor is not None)
            self.graphed = (shapes, step)
        return self.graphed[1]

    def begin_step(self) -> tuple[float, float, list[Batch]]:
        """Train mode, this step's learning rate set, and its grad_accum micro-batches on the device."""
        self.model.train()
        t0 = time.perf_counter()
        lr = lr_at(self.step, self.total_steps, self.cfg)
        for group in self.optimizer.param_groups:
            if torch.is_tensor(group["lr"]):
                group["lr"].fill_(lr)  # in place: a captured optimizer step reads it by address
            else:
                group["lr"] = lr
        # every rank draws the whole global step in the same order and keeps its slice (train/distributed.py)
        step_batches = [self.source.next_batch() for _ in range(self.cfg.grad_accum)]
        self.step_batches = step_batches  # the global step (every rank's slices), for counts over all of it
        self.step_label_tokens = sum(int((b["labels"] != -100).sum()) for b in step_batches)
        return t0, lr, [self._to_device(b) for b in self.dist.shard_micro_batches(step_batches)]

    def finish_step(self, batches: list[Batch], t0: float, lr: float, metrics: dict[str, float],
                    grad_norm: float | None = None) -> dict[str, float]:
        """Clip and step the optimizer (unless a graphed step did, giving grad_norm), and add the bookkeeping
        every stage logs to the stage's own metrics."""
        if grad_norm is None:
            grad_norm = self.clip_and_step()
        elapsed = time.perf_counter() - t0
        tokens = sum(b["labels"].numel() for b in batches) * self.dist.world_size  # ranks hold equal slices
        return {
            **metrics,
            "lr": lr,
            "grad_norm": grad_norm,
            "tok_s": tokens / elapsed,
            "seq_len": self.cfg.phases[self.phase].seq_len,
            "phase": self.phase,
            "packing_efficiency": self.source.packing_efficiency,
            "memory_gb": _memory_gb(self.device),
        }

    def clip_and_step(self) -> float:
        """Clip the gradient to max_grad_norm, step the optimizer, zero the gradients; the norm before."""
        grad_norm = torch.nn.utils.clip_grad_norm_(self.params, self.cfg.max_grad_norm)
        if hasattr(grad_norm, "full_tensor"):  # a DTensor under FSDP2 (the norm over every rank's shard)
            grad_norm = grad_norm.full_tensor()
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        return float(grad_norm)

    @torch.no_grad()
    def evaluate(self, logger: MetricsLogger | None = None) -> dict[str, float]:
        self.model.eval()
        seq_len = self.cfg.eval_seq_len or self.cfg.phases[0].seq_len  # fixed: losses compare across phases
        if seq_len not in self.val_cache:
            self.val_cache[seq_len] = self.data.validation(seq_len)
        ce, n = 0.0, 0
        batches = self.val_cache[seq_len]
        for i, counts in self.dist.padded_share(len(batches)):  # all of them at world size 1
            with self._autocast():
                out = self.model(**self._to_device(batches[i]))
            if counts:
                ce += float(out.ce_sum)
                n += int(out.n_tokens)
        if self.dist.enabled:
            ce, n = self.dist.all_reduce_sum([ce, n])
            n = int(n)
        loss = ce / max(n, 1)
        metrics = {"loss": loss, "perplexity": math.exp(min(loss, 50.0)), "tokens": n}
        if logger is not None:
            logger.log(self.step, metrics, split="val")
        return metrics

    def _to_device(self, batch: Batch) -> Batch:
        return {k: v.to(self.device, non_blocking=True) for k, v in batch.items()}

    def _autocast(self):
        if self.device.type == "cuda":
            return torch.autocast("cuda", dtype=torch.bfloat16)
        return torch.autocast("cpu", enabled=False)


def _memory_gb(device: torch.device) -> float:
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**30
    try:
        import resource

        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20
    except Exception:  # pragma: no cover - non-POSIX
        return 0.0


# ------------------------------------------------------------------------------------ stage setup
@dataclass
class StageStart:
    model: RustforgeModel
    tokenizer: object
    device: torch.device
    stage_dir: Path


def initial_adapter(run_dir: str | Path, init_from: str, previous_stage: str, field_name: str) -> Path | None:
    """The adapter a stage starts from: the previous stage's (`previous`), none, or a given directory."""
    if init_from == "none":
        return None
    path = Path(run_dir) / previous_stage / "adapter" if init_from == "previous" else Path(init_from)
    if not (path / "adapter_config.json").is_file():
        hint = f"run the {previous_stage} stage first, or " if init_from == "previous" else ""
        raise FileNotFoundError(f"{field_name}: no adapter at {path} ({hint}set {field_name}: none to start fresh)")
    return path


def start_stage(cfg: RunConfig, stage: str, init_from: str, previous_stage: str, progress: bool = True) -> StageStart:
    """The base model with LoRA on the training device, holding the adapter `init_from` names (checked
    before the model is built); a checkpoint of this stage, when resuming, replaces it in SFTTrainer.run."""
    from rustforge.model.base import prepare_base
    from rustforge.model.lora import load_adapter

    start = initial_adapter(cfg.run_dir, init_from, previous_stage, f"{stage}.init_from")
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    with distributed.current().main_first():  # under torchrun rank 0 alone builds a missing corpus / tiny base
        model, tokenizer = prepare_base(cfg, device, progress=progress)
    if start is not None:
        load_adapter(model.hf, start)
    return StageStart(model, tokenizer, device, Path(cfg.run_dir) / stage)


def finish_stage(trainer: SFTTrainer, resume: bool, stop_after: int | None) -> bool:
    """Train (or resume) to the end of the curriculum or stop_after; at the end write <stage_dir>/adapter,
    what the next stage starts from. True when the stage is complete."""
    trainer.run(resume=resume, stop_after=stop_after)
    done = trainer.step == trainer.total_steps
    if done:
        distributed.save_adapter_full(trainer.model, trainer.lora_cfg, trainer.stage_dir / "adapter", trainer.dist)
    return done
