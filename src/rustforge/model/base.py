"""Where a run's base model comes from.

With `model.path` set, the base is that local gpt-oss directory (its tokenizer.json, or the o200k_harmony
encoding when it has none). Without it, the base is the embedded default: the `tiny` preset with a
byte-level BPE trained here on the run's Rust corpus, written once to `<run_dir>/base` in the gpt-oss
checkpoint layout, so every later stage, export and test loads it exactly as it would load the real model.
"""

from __future__ import annotations

import shutil
from pathlib import Path

import torch

from rustforge.config import RunConfig
from rustforge.model.gptoss import RustforgeModel, build_model


def base_dir(cfg: RunConfig) -> Path:
    return Path(cfg.model.path) if cfg.model.path else Path(cfg.run_dir) / "base"


def ensure_corpus(cfg: RunConfig, progress: bool = True) -> None:
    from rustforge.data.corpus import harvest

    out = Path(cfg.corpus.out_dir)
    if not (out / "summary.json").is_file():
        summary = harvest(cfg.corpus, progress=progress)
        print(summary.table())


def build_tiny_base(cfg: RunConfig, progress: bool = True) -> Path:
    """Train the tiny tokenizer on the corpus, initialise the tiny GPT-OSS, write both as a gpt-oss dir."""
    from transformers import GptOssForCausalLM

    from rustforge.data.corpus import iter_documents
    from rustforge.data.tokenizer import train_tiny_tokenizer
    from rustforge.model.loader import write_gptoss
    from rustforge.model.presets import get_preset, hf_config

    out = base_dir(cfg)
    if (out / "config.json").is_file():
        return out
    ensure_corpus(cfg, progress)
    texts = [d["text"] for d in iter_documents(cfg.corpus.out_dir, "train")][: cfg.tokenizer.train_files_limit]
    tokenizer = train_tiny_tokenizer(texts, cfg.tokenizer.vocab_size)
    hf_cfg = hf_config(
        get_preset(cfg.model.preset),
        vocab_size=tokenizer.vocab_size,
        router_aux_loss_coef=cfg.model.router_aux_loss_coef,
        pad_token_id=tokenizer.pad_id,
        eos_token_id=tokenizer.return_id,
    )
    hf_cfg._attn_implementation = "eager"
    torch.manual_seed(cfg.model.seed)
    model = GptOssForCausalLM(hf_cfg)
    pretrain_tiny(model, tokenizer, cfg, progress)
    tmp = out.with_name(out.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    write_gptoss(model, tmp, expert_format="bf16")
    tokenizer.save(tmp)
    tmp.replace(out)
    return out


def pretrain_tiny(model, tokenizer, cfg: RunConfig, progress: bool = True) -> list[float]:
    """Full-parameter training of the tiny base on the corpus's train split (CPU, eager reference path,
    full logits: the vocabulary is small). Returns the losses. Deterministic for a given config."""
    import math

    import torch.nn.functional as F
    from tqdm import tqdm
    from transformers.models.gpt_oss.modeling_gpt_oss import load_balancing_loss_func

    from rustforge.data.packing import PackedDataset
    from rustforge.model.attention import build_attention_masks
    from rustforge.data.tokens import tokenize_split

    pcfg = cfg.tiny_base
    if pcfg.pretrain_steps <= 0:
        return []
    docs = tokenize_split(cfg.corpus.out_dir, tokenizer, "train", Path(cfg.run_dir) / "token_cache")
    data = PackedDataset(docs, pcfg.seq_len, cfg.packing, seed=cfg.model.seed, pad_id=tokenizer.pad_id)
    opt = torch.optim.AdamW(model.parameters(), lr=pcfg.lr, weight_decay=0.0)
    router_logits: dict[int, torch.Tensor] = {}
    for i, layer in enumerate(model.model.layers):
        layer.mlp.router.register_forward_hook(lambda _m, _in, out, i=i: router_logits.__setitem__(i, out[0]))
    model.train()
    losses = []
    bar = tqdm(range(pcfg.pretrain_steps), desc="tiny base pretraining", disable=not progress)
    for step in bar:
        warm = min(1.0, (step + 1) / max(1, pcfg.warmup_steps))
        for group in opt.param_groups:
            group["lr"] = pcfg.lr * warm * 0.5 * (1 + math.cos(math.pi * step / pcfg.pretrain_steps))
        batch = data.next_batch(pcfg.batch_size)
        masks = build_attention_masks(batch["doc_ids"], model.config.sliding_window, "eager", torch.float32)
        hidden = model.model(
            input_ids=batch["input_ids"], position_ids=batch["position_ids"], attention_mask=masks
        ).last_hidden_state
        logits = model.lm_head(hidden)
        ce = F.cross_entropy(logits.flatten(0, 1).float(), batch["labels"].flatten(), ignore_index=-100)
        # with the router aux loss: without it the tiny base's layer-0 router collapsed (the monitor saw it)
        aux = load_balancing_loss_func(
            tuple(router_logits[i] for i in sorted(router_logits)),
            model.config.num_local_experts,
            model.config.num_experts_per_tok,
            (batch["doc_ids"] >= 0).float(),
        )
        loss = ce + model.config.router_aux_loss_coef * aux
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)
        losses.append(float(ce.detach()))
        bar.set_postfix(loss=f"{losses[-1]:.3f}")
    model.eval()
    return losses


def prepare_base(cfg: RunConfig, device: torch.device, progress: bool = True, with_lora: bool = True):
    """(RustforgeModel with LoRA and fast paths, tokenizer) for this run."""
    from rustforge.data.tokenizer import load_tokenizer

    ensure_corpus(cfg, progress)
    path = base_dir(cfg) if cfg.model.path else build_tiny_base(cfg, progress)
    tokenizer = load_tokenizer(str(path))
    model_cfg = cfg.model if cfg.model.path else _with_path(cfg, path)
    model: RustforgeModel = build_model(model_cfg, cfg.lora if with_lora else None, device=device)
    return model, tokenizer


def _with_path(cfg: RunConfig, path: Path):
    from dataclasses import replace

    return replace(cfg.model, path=str(path))
