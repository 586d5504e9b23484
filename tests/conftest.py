"""Shared fixtures: one small corpus + tiny base per test session (built from the Debian crate sources)."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch
import yaml

# One thread per test process: `pytest -n 2` runs two processes on two cores, and spinning OpenMP threads
# oversubscribed made tiny training ~10x slower; one thread also makes float reductions reproducible.
torch.set_num_threads(1)
os.environ.setdefault("OMP_NUM_THREADS", "1")
os.environ.setdefault("MKL_NUM_THREADS", "1")

REGISTRY = Path("/usr/share/cargo/registry")


def tiny_config_dict(run_dir: Path, corpus_dir: Path) -> dict:
    """A run config small enough for tests: a few crates, a 1K vocab, tens of short steps."""
    return {
        "run_dir": str(run_dir),
        "model": {"preset": "tiny", "loss_chunk_size": 256},
        "lora": {"r": 8, "alpha": 16},
        "tokenizer": {"vocab_size": 1024, "train_files_limit": 400},
        # an untrained base: what the test asks of lang_rust is that LoRA alone learns held-out Rust
        "tiny_base": {"pretrain_steps": 0},
        "corpus": {"out_dir": str(corpus_dir), "max_crates": 14, "val_fraction": 0.2, "seed": 0},
        "lang_rust": {
            "lr": 3.0e-3,
            "warmup_steps": 3,
            "batch_size": 4,
            "phases": [{"seq_len": 128, "steps": 12}, {"seq_len": 256, "steps": 6}],
            "eval_every": 9,
            "eval_batches": 3,
            "save_every": 3,
        },
    }


@pytest.fixture(scope="session")
def tiny_base(tmp_path_factory):
    """(config dict, path) of a run dir whose corpus and tiny base are built; copy it before training."""
    if not REGISTRY.is_dir():
        pytest.skip("Debian Rust crate sources missing: run scripts/setup.sh")
    from rustforge.config import from_dict, RunConfig
    from rustforge.model.base import build_tiny_base

    root = tmp_path_factory.mktemp("tiny")
    cfg_dict = tiny_config_dict(root / "run", root / "corpus")
    cfg = from_dict(RunConfig, cfg_dict)
    build_tiny_base(cfg, progress=False)
    return cfg_dict, root


def write_config(path: Path, cfg: dict) -> Path:
    path.write_text(yaml.safe_dump(cfg))
    return path
