"""Metric logging: a JSONL file (the record every report reads), TensorBoard event files, a tqdm bar.

TensorBoard's SummaryWriter comes from torch.utils.tensorboard; the JSONL is ours so that reports and
tests need no TensorBoard reader.
"""

from __future__ import annotations

import json
import time
from pathlib import Path

from tqdm import tqdm


class MetricsLogger:
    def __init__(self, log_dir: Path, total_steps: int, start_step: int = 0, progress: bool = True):
        log_dir.mkdir(parents=True, exist_ok=True)
        self.jsonl = open(log_dir / "metrics.jsonl", "a", buffering=1)
        try:
            from torch.utils.tensorboard import SummaryWriter

            self.tb = SummaryWriter(str(log_dir / "tensorboard"))
        except ImportError:  # tensorboard is optional at run time
            self.tb = None
        self.bar = tqdm(total=total_steps, initial=start_step, disable=not progress, dynamic_ncols=True, unit="step")

    def log(self, step: int, metrics: dict[str, float], split: str = "train") -> None:
        record = {"step": step, "split": split, "time": time.time(), **metrics}
        self.jsonl.write(json.dumps(record) + "\n")
        if self.tb is not None:
            for key, value in metrics.items():
                if isinstance(value, (int, float)):
                    self.tb.add_scalar(f"{split}/{key}", value, step)
        if split == "train":
            self.bar.set_postfix({k: f"{metrics[k]:.4g}" for k in ("loss", "lr", "tok_s") if k in metrics})
        elif split == "val":  # other splits (experts: ~6 numbers a layer) go to the files only
            self.bar.write(f"step {step} {split}: " + " ".join(f"{k}={v:.4g}" for k, v in metrics.items()))

    def advance(self, n: int = 1) -> None:
        self.bar.update(n)

    def close(self) -> None:
        self.bar.close()
        self.jsonl.close()
        if self.tb is not None:
            self.tb.close()


def read_metrics(path: Path, split: str = "train") -> dict[int, dict]:
    """Last record per step of one split (a resumed run re-logs the steps after its checkpoint)."""
    out: dict[int, dict] = {}
    with open(path) as f:
        for line in f:
            rec = json.loads(line)
            if rec.get("split") == split:
                out[rec["step"]] = rec
    return out


def before_after(stage_dir: Path, keys, what_is_held_out: str) -> dict:
    """A stage's first and last validation records as {"steps", <key>_start, <key>_end} (NaN when a record
    lacks a key): the row a stage gives the pipeline's efficacy table."""
    import math

    val = read_metrics(Path(stage_dir) / "logs" / "metrics.jsonl", "val")
    if not val:
        raise ValueError(f"{stage_dir}: no validation metrics logged (no {what_is_held_out}?)")
    first, last = val[min(val)], val[max(val)]
    out: dict = {"steps": max(val)}
    for key in keys:
        out[f"{key}_start"], out[f"{key}_end"] = first.get(key, math.nan), last.get(key, math.nan)
    return out
