"""Stage 1, lang_rust: continued SFT on packed Rust source with a context-length curriculum.

Data flow: corpus shards (data/corpus.py) -> token ids, cached per split (data/tokens.py) -> best-fit-decreasing
packing at the phase's seq_len (data/packing.py) -> SFTTrainer (train/sft.py). Validation is on held-out
crates (the corpus split is by crate), packed the same way.
"""

from __future__ import annotations

from pathlib import Path

import torch

from rustforge.config import RunConfig
from rustforge.data.packing import PackedDataset, collate, pack_documents
from rustforge.data.tokens import tokenize_split
from rustforge.train.sft import (
    BatchSource,
    DatasetBatches,
    SFTTrainer,
    StageData,
    finish_stage,
)

STAGE = "lang_rust"


def stage_data(cfg: RunConfig, tokenizer, stage_dir: Path) -> StageData:
    train_cfg = cfg.lang_rust
    cache_dir = Path(cfg.run_dir) / "token_cache"
    train_docs = tokenize_split(cfg.corpus.out_dir, tokenizer, "train", cache_dir)
    val_docs = tokenize_split(cfg.corpus.out_dir, tokenizer, "val", cache_dir)
    pad = tokenizer.pad_id

    def train(phase: int, seq_len: int) -> BatchSource:
        ds = PackedDataset(train_docs, seq_len, cfg.packing, seed=train_cfg.seed + phase, pad_id=pad)
        return DatasetBatches(ds, train_cfg.batch_size)

    def validation(seq_len: int):
        packed = pack_documents(val_docs, seq_len, cfg.packing, seed=train_cfg.seed)
        n = min(train_cfg.eval_batches * train_cfg.batch_size, len(packed))
        seqs = [packed.sequence(i) for i in range(n)]
        return [
            collate(seqs[i : i + train_cfg.batch_size], seq_len, pad)
            for i in range(0, len(seqs), train_cfg.batch_size)
        ]

    return StageData(train=train, validation=validation)


def run(cfg: RunConfig, resume: bool = False, progress: bool = True, stop_after: int | None = None) -> dict:
    from rustforge.model.base import prepare_base
    from rustforge.train import distributed

    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    stage_dir = Path(cfg.run_dir) / STAGE
    with distributed.current().main_first():  # under torchrun rank 0 builds the base and token cache alone
        model, tokenizer = prepare_base(cfg, device, progress=progress)
        data = stage_data(cfg, tokenizer, stage_dir)
    trainer = SFTTrainer(model, cfg.lora, cfg.lang_rust, data, stage_dir, device, progress, cfg.expert_monitor)
    finish_stage(trainer, resume, stop_after)  # trains, then writes <stage_dir>/adapter at the end
    return summary(stage_dir)


def summary(stage_dir: Path) -> dict:
    """The stage's own metric before and after: held-out Rust loss (and perplexity) on the fixed val set."""
    import math

    from rustforge.train.metrics import read_metrics

    val = read_metrics(stage_dir / "logs" / "metrics.jsonl", "val")
    first, last = val[min(val)], val[max(val)]
    return {
        "steps": max(val),
        "val_loss_start": first["loss"],
        "val_loss_end": last["loss"],
        "val_ppl_start": math.exp(min(first["loss"], 50)),
        "val_ppl_end": math.exp(min(last["loss"], 50)),
    }
