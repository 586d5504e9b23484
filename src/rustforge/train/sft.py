"""The supervised fine-tuning loop shared by the lang_rust and core_agent stages.

Own code, not HF Trainer or TRL: the curriculum re-packs the data at a new seq_len in the middle of a run,
a resume must continue at exactly the same batch with the same RNG, checkpoints hold PEFT-format adapters
with the expert factors packed as PEFT packs them, and the loss is our chunked one over document-masked
packed batches. Each of those fights a general trainer; the loop below is short enough to read whole.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import torch

from rustforge.config import ExpertMonitorConfig, LoraConfig, TrainConfig
from rustforge.model.gptoss import RustforgeModel
from rustforge.train import checkpoint as ckpt
from rustforge.train.expert_monitor import HISTORY_FILE, ExpertMonitor, probe_model_routing
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
        self.params = [p for p in model.parameters() if p.requires_grad]
        if not self.params:
            raise ValueError("no trainable parameters: lora.targets matched nothing")
        self.optimizer = torch.optim.AdamW(
            self.params, lr=cfg.lr, betas=tuple(cfg.betas), weight_decay=cfg.weight_decay, foreach=False
        )
        self.total_steps = sum(p.steps for p in cfg.phases)
        self.step = 0
        self.phase = -1
        self.source: BatchSource | None = None
        self.val_cache: dict[int, list[Batch]] = {}
        self.monitor = None
        if monitor_cfg is not None and monitor_cfg.every_steps > 0:
            history = self.stage_dir / "logs" / HISTORY_FILE
            self.monitor = ExpertMonitor.for_model(model.config, monitor_cfg, history)

    # ------------------------------------------------------------------ state
    def _save(self) -> Path:
        from rustforge.model.lora import save_adapter

        state = {
            "step": self.step,
            "phase": self.phase,
            "optimizer": self.optimizer.state_dict(),
            "data": self.source.state_dict() if self.source else None,
            "rng": ckpt.rng_state(),
            "expert_monitor": self.monitor.state_dict() if self.monitor else None,
        }
        return ckpt.save_checkpoint(
            self.ckpt_root, self.step, lambda d: save_adapter(self.model.hf, self.lora_cfg, d), state
        )

    def _resume(self) -> bool:
        from rustforge.model.lora import load_adapter

        path = ckpt.latest_checkpoint(self.ckpt_root)
        if path is None:
            return False
        state = ckpt.load_trainer_state(path)
        load_adapter(self.model.hf, path / "adapter")
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
        logger = MetricsLogger(self.stage_dir / "logs", self.total_steps, self.step, self.progress)
        if resumed:
            logger.bar.write(f"resumed from step {self.step}")
        last_val = {}
        if self.step == 0:
            last_val = self.evaluate(logger)
        if self.monitor and self.monitor.cfg.probe_drift and self.monitor.base_counts is None:
            self.monitor.set_probe_base(self._probe_routing())  # LoRA B is still zero: the base's routing
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
                stop = self._watch_experts(logger)
                if self.step % self.cfg.save_every == 0 or done or stop:
                    self._save()
                if stop:
                    logger.bar.write("stopping: expert routing collapsed (expert_monitor.stop_on_alarm)")
                    break
        finally:
            logger.close()
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
        t0, lr, batches = self.begin_step()
        n_total = sum(int((b["labels"] != -100).sum()) for b in batches)
        ce_total, aux_total = 0.0, 0.0
        for batch in batches:
            with self._autocast():
                out = self.model(**batch)
            if self.monitor:
                self.monitor.update(self.model.router_logits, batch["doc_ids"] >= 0)
            loss = out.ce_sum / max(n_total, 1) + self.model.config.router_aux_loss_coef * out.aux_loss / len(batches)
            loss.backward()
            ce_total += float(out.ce_sum.detach())
            aux_total += float(out.aux_loss.detach()) / len(batches)
        return self.finish_step(batches, t0, lr, {"loss": ce_total / max(n_total, 1), "aux_loss": aux_total})

    def begin_step(self) -> tuple[float, float, list[Batch]]:
        """Train mode, this step's learning rate set, and its grad_accum micro-batches on the device."""
        self.model.train()
        t0 = time.perf_counter()
        lr = lr_at(self.step, self.total_steps, self.cfg)
        for group in self.optimizer.param_groups:
            group["lr"] = lr
        return t0, lr, [self._to_device(self.source.next_batch()) for _ in range(self.cfg.grad_accum)]

    def finish_step(self, batches: list[Batch], t0: float, lr: float, metrics: dict[str, float]) -> dict[str, float]:
        """Clip, step the optimizer, and add the bookkeeping every stage logs to the stage's own metrics."""
        grad_norm = torch.nn.utils.clip_grad_norm_(self.params, self.cfg.max_grad_norm)
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        elapsed = time.perf_counter() - t0
        tokens = sum(b["labels"].numel() for b in batches)
        return {
            **metrics,
            "lr": lr,
            "grad_norm": float(grad_norm),
            "tok_s": tokens / elapsed,
            "seq_len": self.cfg.phases[self.phase].seq_len,
            "phase": self.phase,
            "packing_efficiency": self.source.packing_efficiency,
            "memory_gb": _memory_gb(self.device),
        }

    @torch.no_grad()
    def evaluate(self, logger: MetricsLogger | None = None) -> dict[str, float]:
        self.model.eval()
        seq_len = self.cfg.eval_seq_len or self.cfg.phases[0].seq_len  # fixed: losses compare across phases
        if seq_len not in self.val_cache:
            self.val_cache[seq_len] = self.data.validation(seq_len)
        ce, n = 0.0, 0
        for batch in self.val_cache[seq_len]:
            with self._autocast():
                out = self.model(**self._to_device(batch))
            ce += float(out.ce_sum)
            n += int(out.n_tokens)
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

