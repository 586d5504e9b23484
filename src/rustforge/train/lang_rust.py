"""Stage 1, lang_rust: continued SFT on packed Rust source with a context-length curriculum.

Data flow: corpus shards (data/corpus.py) -> token ids, cached per split (here) -> best-fit-decreasing
packing at the phase's seq_len (data/packing.py) -> SFTTrainer (train/sft.py). Validation is on held-out
crates (the corpus split is by crate), packed the same way.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import numpy as np
import torch

from rustforge.config import RunConfig
from rustforge.data.packing import PackedDataset, collate, pack_documents
from rustforge.train.sft import BatchSource, SFTTrainer, StageData

STAGE = "lang_rust"


class PackedBatches(BatchSource):
    """Adapts a PackedDataset (deterministic, resumable order) to the trainer's batch interface."""

    def __init__(self, dataset: PackedDataset, batch_size: int):
        self.dataset, self.batch_size = dataset, batch_size
        self.packing_efficiency = dataset.stats.efficiency

    def next_batch(self):
        return self.dataset.next_batch(self.batch_size)

    def state_dict(self) -> dict:
        return self.dataset.state_dict()

    def load_state_dict(self, state: dict) -> None:
        self.dataset.load_state_dict(state)


def tokenize_split(cfg: RunConfig, tokenizer, split: str, cache_dir: Path) -> list:
    """Token ids (int32 arrays) of every document of a corpus split, each ending with <|endoftext|>; cached."""
    from rustforge.data.corpus import iter_documents

    docs = list(iter_documents(cfg.corpus.out_dir, split))
    key = hashlib.sha256()
    for d in docs:
        key.update(d["sha256"].encode())
    key.update(json.dumps(tokenizer.fingerprint()).encode())
    cache = cache_dir / f"tokens-{split}-{key.hexdigest()[:16]}.npz"
    if not cache.is_file():
        eos = tokenizer.endoftext_id
        ids = [tokens + [eos] for tokens in tokenizer.encode_batch([d["text"] for d in docs])]
        cache_dir.mkdir(parents=True, exist_ok=True)
        offsets = np.cumsum([0] + [len(x) for x in ids])
        tmp = cache.with_suffix(".tmp.npz")
        np.savez(tmp, ids=np.concatenate([np.asarray(x, dtype=np.int32) for x in ids]), offsets=offsets)
        tmp.replace(cache)
    data = np.load(cache)
    ids, offsets = data["ids"], data["offsets"]
    return [ids[offsets[i] : offsets[i + 1]] for i in range(len(offsets) - 1)]


def stage_data(cfg: RunConfig, tokenizer, stage_dir: Path) -> StageData:
    train_cfg = cfg.lang_rust
    cache_dir = Path(cfg.run_dir) / "token_cache"
    train_docs = tokenize_split(cfg, tokenizer, "train", cache_dir)
    val_docs = tokenize_split(cfg, tokenizer, "val", cache_dir)
    pad = tokenizer.pad_id

    def train(phase: int, seq_len: int) -> BatchSource:
        ds = PackedDataset(train_docs, seq_len, cfg.packing, seed=train_cfg.seed + phase, pad_id=pad)
        return PackedBatches(ds, train_cfg.batch_size)

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

    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    model, tokenizer = prepare_base(cfg, device, progress=progress)
    stage_dir = Path(cfg.run_dir) / STAGE
    trainer = SFTTrainer(model, cfg.lora, cfg.lang_rust, stage_data(cfg, tokenizer, stage_dir), stage_dir, device, progress)
    result = trainer.run(resume=resume, stop_after=stop_after)
    if trainer.step == trainer.total_steps:
        from rustforge.model.lora import save_adapter

        save_adapter(model.hf, cfg.lora, stage_dir / "adapter")
    return result
