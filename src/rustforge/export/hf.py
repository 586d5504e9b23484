"""`rustforge export`: a trained run as a Hugging Face model directory (bf16 | mxfp4 | nvfp4) or as a
PEFT adapter for serving base + LoRA.

Flow of a model export: the base (float32) with the run's final adapter merged in float32
(`model/lora.merge_adapter`, PEFT's layout incl. the expert `target_parameters`) -> the MERGE CHECK: on a
probe batch the merged model's next-token distributions must match base + adapter computed unmerged (our
LoRA modules) within `kl_threshold`, else nothing is written and the error says which deltas were lost (the
expert deltas silently vanishing from merged MoE checkpoints is the classic failure) -> write into a
staging directory: weights with the original tensor names and layouts (bf16 and MXFP4 through
`model/loader.write_gptoss`, MXFP4 with the gpt-oss rounding rule by default; NVFP4 in the layout of
`export/nvfp4.py`), config.json (+ gpt-oss's quantization_config for MXFP4), generation_config.json with
gpt-oss's stop tokens, tokenizer.json, tokenizer_config.json and the Harmony chat template -> reload the
staging directory and check that every tensor holds exactly the merged weight (experts: exactly its
quantise-dequantise value) -> export_report.json (KL of the export against base + adapter, i.e. what
quantisation costs) -> rename into place. Built on transformers/safetensors/PEFT formats; own code
because no library merges gpt-oss expert LoRA, checks the merge, and writes MXFP4 on a CPU.

That flow holds the base, the reference and the merged model in float32 (~170 GB for 20B). Big models
(`export.streaming`, auto from 1B parameters) go through export/streaming.py instead: the same files, the
same check and the same report, one decoder layer at a time; both call the pieces defined here
(merge_verdict, expected_tensor, quantized_expert_values, write_tokenizer_files, finish_report).
"""

from __future__ import annotations

import contextlib
import copy
import datetime
import json
import os
import platform
import shutil
from pathlib import Path

import torch

from rustforge.export import nvfp4
from rustforge.export.chat_template import CHAT_TEMPLATE
from rustforge.model.loader import expert_names, load_gptoss, write_gptoss
from rustforge.model.quant import bits_per_weight, mxfp4_fake_quantize_values

MODEL_FORMATS = ("bf16", "mxfp4", "nvfp4")
EXPORT_FORMATS = MODEL_FORMATS + ("adapter",)
REPORT_NAME = "export_report.json"
GENERATION_CONFIG_NAME = "generation_config.json"
CHAT_TEMPLATE_NAME = "chat_template.jinja"
# Rust and a Harmony exchange: the kinds of text the exported model will see.
PROBE_TEXTS = (
    (
        "use std::collections::HashMap;\n\n/// Counts words.\npub fn word_counts(text: &str) -> HashMap<&str, usize> {\n"
        "    let mut counts = HashMap::new();\n    for word in text.split_whitespace() {\n"
        "        *counts.entry(word).or_insert(0) += 1;\n    }\n    counts\n}\n"
    ),
    (
        "<|start|>user<|message|>Why does this fail to compile?\n\nfn first(v: &Vec<String>) -> &str { &v[0] }"
        "<|end|><|start|>assistant<|channel|>final<|message|>It compiles: the returned slice borrows from `v`.<|return|>"
    ),
    (
        "impl<T: Ord> BinaryHeap<T> {\n    pub fn push(&mut self, item: T) {\n        self.data.push(item);\n"
        "        self.sift_up(self.data.len() - 1);\n    }\n}\n#[cfg(test)]\nmod tests {\n    #[test]\n"
    ),
)


class ExportRefused(RuntimeError):
    """The export would write a model that does not compute what was trained; nothing was written."""


# ------------------------------------------------------------------------------------------- checks
def probe_batch(tokenizer, tokens: int = 256, rows: int = 2) -> torch.Tensor:
    """[rows, tokens // rows] ids: the probe texts, repeated to length."""
    ids = [i for text in PROBE_TEXTS for i in tokenizer.encode(text)]
    ids = (ids * (tokens // len(ids) + 1))[: (tokens // rows) * rows]
    return torch.tensor(ids, dtype=torch.long).view(rows, -1)


@torch.no_grad()
def next_token_logits(model, ids: torch.Tensor) -> torch.Tensor:
    hf = getattr(model, "hf", model)
    was_training = hf.training
    hf.eval()
    out = hf(input_ids=ids.to(next(hf.parameters()).device)).logits.float().cpu()
    hf.train(was_training)
    return out


def next_token_kl(reference: torch.Tensor, candidate: torch.Tensor) -> float:
    """Mean over positions of KL(p_reference || p_candidate) of the next-token distributions, in nats."""
    log_p = torch.log_softmax(reference.double(), dim=-1)
    log_q = torch.log_softmax(candidate.double(), dim=-1)
    return float((log_p.exp() * (log_p - log_q)).sum(-1).mean())


@contextlib.contextmanager
def expert_lora_disabled(model):
    """The model without its expert LoRA for the duration (attention LoRA stays on)."""
    from rustforge.model.moe import expert_lora_targets

    saved = [(m, m.lora_scaling) for m in getattr(model, "hf", model).modules() if expert_lora_targets(m)]
    try:
        for module, _ in saved:
            module.lora_scaling = 0.0
        yield model
    finally:
        for module, value in saved:
            module.lora_scaling = value


def lora_reference(base, adapter_dir: str | Path):
    """base + adapter computed UNMERGED: a copy of the plain base with our split-LoRA experts and LoRA
    linears holding the adapter (the reference the merged model must match)."""
    from rustforge.model.lora import (
        adapter_lora_config,
        apply_lora,
        load_adapter,
        read_peft_adapter,
    )
    from rustforge.model.moe import install_experts

    _, config = read_peft_adapter(adapter_dir)
    reference = copy.deepcopy(base)
    install_experts(reference, "grouped", "bf16")  # unquantised storage in the base's dtype
    apply_lora(reference, adapter_lora_config(config))
    load_adapter(reference, adapter_dir)
    return reference.eval()


def check_merge(merged, reference, probe: torch.Tensor, threshold: float) -> dict[str, float]:
    """Refuse (ExportRefused) unless KL(base + adapter || merged) <= threshold on the probe batch; the
    message tells whether the expert deltas, all deltas, or something else went missing."""
    from rustforge.model.lora import lora_disabled

    target = next_token_logits(reference, probe)
    merged_logits = next_token_logits(merged, probe)
    with lora_disabled(reference):
        base_logits = next_token_logits(reference, probe)
    with expert_lora_disabled(reference):
        no_expert_logits = next_token_logits(reference, probe)
    return merge_verdict(target, merged_logits, base_logits, no_expert_logits, threshold)


def merge_verdict(target, merged_logits, base_logits, no_expert_logits, threshold: float) -> dict[str, float]:
    """check_merge's decision from the probe's logits of base + adapter (target), the merged model, the base
    (adapter off) and base + adapter without its expert deltas: the report, or ExportRefused saying which
    deltas went missing."""
    kl = next_token_kl(target, merged_logits)
    result = {
        "kl_merged_vs_base_plus_adapter": kl,
        "kl_adapter_effect": next_token_kl(target, base_logits),
        "kl_expert_deltas_effect": next_token_kl(target, no_expert_logits),
        "kl_threshold": threshold,
    }
    if kl <= threshold:
        return result
    if next_token_kl(no_expert_logits, merged_logits) <= threshold:
        why = "the expert (MoE) LoRA deltas were lost: it matches base + adapter WITHOUT its expert deltas"
    elif next_token_kl(base_logits, merged_logits) <= threshold:
        why = "every LoRA delta was lost: it matches the base model"
    else:
        why = "it matches neither base + adapter, nor the base, nor base + adapter without expert deltas"
    raise ExportRefused(
        f"export refused: the merged model's next-token distributions differ from base + adapter on the probe "
        f"batch (KL {kl:.3g} nats > threshold {threshold:g}); {why}. "
        f"The adapter's own effect is KL {result['kl_adapter_effect']:.3g}, its expert deltas' "
        f"{result['kl_expert_deltas_effect']:.3g}. Nothing was written."
    )


def _quantized_values(weight_in_out: torch.Tensor, fmt: str, mxfp4_rule: str) -> torch.Tensor:
    if fmt == "mxfp4":
        out_in = weight_in_out.detach().float().transpose(1, 2)
        return mxfp4_fake_quantize_values(out_in, scale_rounding=mxfp4_rule).transpose(1, 2)
    if fmt == "nvfp4":
        return nvfp4.fake_quantized_experts(weight_in_out)
    return weight_in_out.detach().to(torch.bfloat16).float()


def quantized_expert_values(weight_in_out: torch.Tensor, fmt: str, mxfp4_rule: str, out=None) -> torch.Tensor:
    """[E, in, out] expert stack -> its quantise-dequantise values in float32 (what `fmt` stores), into `out`
    if given (a float32 stack; it may be the weight itself). An expert at a time: every format quantises
    each expert on its own (NVFP4's tensor scale is per expert), and the codec's scratch then stays one
    expert's size (a whole 20B stack at once needs several times the stack)."""
    out = torch.empty(weight_in_out.shape, dtype=torch.float32) if out is None else out
    for expert in range(weight_in_out.shape[0]):
        out[expert] = _quantized_values(weight_in_out[expert : expert + 1], fmt, mxfp4_rule)[0]
    return out


def expected_tensor(name: str, tensor: torch.Tensor, experts: set[str], fmt: str, mxfp4_rule: str,
                    in_place: bool = False) -> torch.Tensor:  # fmt: skip
    """What the written checkpoint must hold for parameter `name`, as float32 after loading: experts
    quantised in `fmt` (with `in_place`, over the float32 stack itself), everything else bf16-rounded."""
    if name in experts:
        return quantized_expert_values(tensor, fmt, mxfp4_rule, out=tensor.detach() if in_place else None)
    return tensor.detach().to(torch.bfloat16).float()


def expected_weights(merged, fmt: str, mxfp4_rule: str = "gpt-oss") -> dict[str, torch.Tensor]:
    """Every tensor the written checkpoint must hold, as float32 after loading (expected_tensor)."""
    experts = expert_names(merged.config)
    return {name: expected_tensor(name, t, experts, fmt, mxfp4_rule) for name, t in merged.state_dict().items()}


def load_export(directory: str | Path, dtype: torch.dtype = torch.float32):
    """A plain GptOssForCausalLM from an exported directory of any model format (quantised experts dequantised)."""
    directory = Path(directory)
    raw = json.loads((directory / "config.json").read_text())
    if (raw.get("quantization_config") or {}).get("quant_method") == nvfp4.QUANT_METHOD:
        return nvfp4.load_nvfp4(directory, dtype)
    return load_gptoss(directory, dtype=dtype)


def check_written(directory: Path, expected: dict[str, torch.Tensor]):
    """Reload `directory`; every tensor must equal `expected` exactly. Returns the reloaded model."""
    loaded = load_export(directory)
    state = loaded.state_dict()
    for name, value in expected.items():
        if name not in state:
            raise ExportRefused(f"{directory}: the written checkpoint lacks {name}; nothing was written")
        if not torch.equal(state[name].float(), value):
            diff = (state[name].float() - value).abs().max().item()
            raise ExportRefused(f"{directory}: {name} as written differs from the merged model (max |diff| {diff:.3g})")
    return loaded


# ------------------------------------------------------------------------------- non-weight files
def generation_config(tokenizer) -> dict:
    """gpt-oss's generation_config.json with this tokenizer's ids: generation stops at <|return|> (end of the
    answer), <|call|> (a tool call) and <|endoftext|>; without it generation runs past the answer."""
    return {
        "bos_token_id": tokenizer.startoftext_id,
        "do_sample": True,
        "eos_token_id": [tokenizer.return_id, tokenizer.endoftext_id, tokenizer.call_id],
        "pad_token_id": tokenizer.endoftext_id,
    }


def tokenizer_config(model_max_length: int) -> dict:
    return {
        "tokenizer_class": "PreTrainedTokenizerFast",
        "bos_token": "<|startoftext|>",
        "eos_token": "<|return|>",
        "pad_token": "<|endoftext|>",
        "model_input_names": ["input_ids", "attention_mask"],
        "model_max_length": model_max_length,
        "clean_up_tokenization_spaces": False,
    }


def write_tokenizer_files(directory: Path, tokenizer, model_max_length: int) -> None:
    """tokenizer.json, tokenizer_config.json, chat_template.jinja (Harmony) and generation_config.json."""
    tokenizer.save(directory)
    _write_json(directory / "tokenizer_config.json", tokenizer_config(model_max_length))
    (directory / CHAT_TEMPLATE_NAME).write_text(CHAT_TEMPLATE)
    _write_json(directory / GENERATION_CONFIG_NAME, generation_config(tokenizer))


def _write_json(path: Path, data: dict) -> None:
    path.write_text(json.dumps(data, indent=2) + "\n")


def _versions() -> dict:
    import safetensors
    import transformers

    return {"torch": torch.__version__, "transformers": transformers.__version__,
            "safetensors": safetensors.__version__, "python": platform.python_version()}  # fmt: skip


def finish_report(directory: Path, record: dict, report: dict | None) -> None:
    """export_report.json: the export's record, the caller's report (source, ...), date and versions."""
    record.update(report or {})
    now = datetime.datetime.now(datetime.timezone.utc)  # noqa: UP017 (the device may run Python 3.10)
    record.update(date=now.isoformat(timespec="seconds"), versions=_versions())
    _write_json(directory / REPORT_NAME, record)


# ------------------------------------------------------------------------------------------ writing
def _staging(out: Path) -> Path:
    staging = out.parent / f".{out.name}.export-{os.getpid()}"
    shutil.rmtree(staging, ignore_errors=True)
    return staging


def export_target(out: str | Path, fmt: str, overwrite: bool) -> Path:
    """The checked output path of a model export (format known, not there unless overwriting)."""
    if fmt not in MODEL_FORMATS:
        raise ValueError(f"export: format must be one of {list(MODEL_FORMATS)}, got {fmt!r}")
    out = Path(out)
    if out.exists() and not overwrite:
        raise FileExistsError(f"{out}: already exists (pass overwrite to replace it)")
    return out


def report_header(fmt: str, mxfp4_rule: str) -> dict:
    return {"format": fmt, "bits_per_expert_weight": bits_per_weight(fmt),
            "mxfp4_rounding": mxfp4_rule if fmt == "mxfp4" else None}  # fmt: skip


@contextlib.contextmanager
def staged(out: Path, overwrite: bool):
    """A fresh staging directory beside `out`, renamed into place when the block succeeds and removed when it
    raises (so a refused or failed export writes nothing)."""
    out.parent.mkdir(parents=True, exist_ok=True)
    staging = _staging(out)
    try:
        yield staging
        _publish(staging, out, overwrite)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise


def _publish(staging: Path, out: Path, overwrite: bool) -> None:
    if out.exists():
        if not overwrite:
            raise FileExistsError(f"{out}: already exists (pass overwrite to replace it)")
        retired = out.parent / f".{out.name}.old-{os.getpid()}"
        shutil.rmtree(retired, ignore_errors=True)
        out.rename(retired)
        staging.rename(out)
        shutil.rmtree(retired, ignore_errors=True)
    else:
        staging.rename(out)


def _write_weights(merged, staging: Path, fmt: str, mxfp4_rule: str, max_shard_bytes: int) -> None:
    if fmt == "nvfp4":
        nvfp4.write_nvfp4(merged, staging, max_shard_bytes)
    else:
        write_gptoss(merged, staging, fmt, dtype=torch.bfloat16, max_shard_bytes=max_shard_bytes,
                     mxfp4_scale_rounding=mxfp4_rule)  # fmt: skip


def export_model(
    merged,
    out: str | Path,
    fmt: str,
    tokenizer,
    *,
    reference=None,
    probe: torch.Tensor | None = None,
    kl_threshold: float = 1e-4,
    mxfp4_rule: str = "gpt-oss",
    overwrite: bool = False,
    max_shard_bytes: int = 5 * 2**30,
    report: dict | None = None,
) -> Path:
    """Write the plain GptOssForCausalLM `merged` (float32, LoRA already merged) as a Hugging Face directory.

    With `reference` (a model carrying the adapter unmerged) the merge is checked first (check_merge) and
    the export's KL against it is reported. Atomic: a staging directory renamed into place."""
    out = export_target(out, fmt, overwrite)
    probe = probe_batch(tokenizer) if probe is None else probe
    record = report_header(fmt, mxfp4_rule)
    if reference is not None:
        record["merge_check"] = check_merge(merged, reference, probe, kl_threshold)
    with staged(out, overwrite) as staging:
        _write_weights(merged, staging, fmt, mxfp4_rule, max_shard_bytes)
        write_tokenizer_files(staging, tokenizer, merged.config.max_position_embeddings)
        loaded = check_written(staging, expected_weights(merged, fmt, mxfp4_rule))
        exported = next_token_logits(loaded, probe)
        record["kl_export_vs_merged_float32"] = next_token_kl(next_token_logits(merged, probe), exported)
        if reference is not None:
            record["kl_export_vs_base_plus_adapter"] = next_token_kl(next_token_logits(reference, probe), exported)
        finish_report(staging, record, report)
    return out


def export_adapter(
    adapter_dir: str | Path, out: str | Path, tokenizer, base, *, base_model_name: str | None = None,
    overwrite: bool = False,
) -> Path:  # fmt: skip
    """The adapter in PEFT's format (adapter_config.json + adapter_model.safetensors) for serving base + LoRA,
    with the tokenizer, chat template and generation_config.json. `base` (plain model) checks the adapter's
    shapes against the base by merging it into a copy; base_model_name is recorded for PEFT."""
    from rustforge.model.lora import (
        ADAPTER_CONFIG,
        ADAPTER_WEIGHTS,
        merge_adapter,
        read_peft_adapter,
    )

    tensors, config = read_peft_adapter(adapter_dir)
    merge_adapter(copy.deepcopy(base), (tensors, config))  # raises naming the key if the adapter does not fit
    out = Path(out)
    if out.exists() and not overwrite:
        raise FileExistsError(f"{out}: already exists (pass overwrite to replace it)")
    out.parent.mkdir(parents=True, exist_ok=True)
    staging = _staging(out)
    try:
        staging.mkdir()
        shutil.copyfile(Path(adapter_dir) / ADAPTER_WEIGHTS, staging / ADAPTER_WEIGHTS)
        _write_json(staging / ADAPTER_CONFIG, {**config, "base_model_name_or_path": base_model_name})
        write_tokenizer_files(staging, tokenizer, base.config.max_position_embeddings)
        _publish(staging, out, overwrite)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    return out


# ------------------------------------------------------------------------------------------ a run
TRAINED_STAGES = ("grpo", "ipo", "core_agent", "lang_rust")  # latest first


def stage_adapter(run_dir: str | Path, source: str = "auto") -> Path:
    """The adapter to export: `auto` = the last stage (grpo, ipo, core_agent, lang_rust) that wrote its
    adapter, a stage name, or an adapter directory."""
    run_dir = Path(run_dir)
    if source == "auto":
        for stage in TRAINED_STAGES:
            if (run_dir / stage / "adapter" / "adapter_config.json").is_file():
                return run_dir / stage / "adapter"
        raise FileNotFoundError(f"{run_dir}: no finished stage adapter ({', '.join(TRAINED_STAGES)}); train first")
    path = run_dir / source / "adapter" if source in TRAINED_STAGES else Path(source)
    if not (path / "adapter_config.json").is_file():
        raise FileNotFoundError(f"export.source: no adapter at {path}")
    return path


def export_run(cfg, fmt: str, out: str | Path | None = None, overwrite: bool = True) -> Path:
    """`rustforge export`: the run's final model as `fmt` under `out` (default <run_dir>/export/<fmt>).

    Source (export.source): `auto` takes the QAT stage's result when it finished (<run_dir>/qat/final),
    else the last finished stage's adapter; or a stage name / adapter directory. Model formats stream layer
    by layer (export/streaming.py) when export.streaming says so (auto: models of 1B parameters and up)."""
    from rustforge.data.tokenizer import load_tokenizer
    from rustforge.export import streaming
    from rustforge.model.base import base_dir
    from rustforge.model.loader import read_gptoss_config
    from rustforge.model.lora import merge_adapter
    from rustforge.train import qat

    if fmt not in EXPORT_FORMATS:
        raise ValueError(f"export: --format must be one of {list(EXPORT_FORMATS)}, got {fmt!r}")
    ecfg = cfg.export
    out = Path(out or ecfg.out_dir or Path(cfg.run_dir) / "export" / fmt)
    tokenizer = load_tokenizer(base_dir(cfg))
    qat_dir = qat.result_dir(cfg)
    use_qat = ecfg.source in ("auto", "qat") and qat.is_complete(qat_dir)
    if ecfg.source == "qat" and not use_qat:
        raise FileNotFoundError(f"export.source: qat, but {qat_dir} holds no finished QAT result")
    if use_qat and fmt == "adapter":
        raise ValueError(f"export --format adapter: {qat_dir} is a QAT result, which changes the merged "
                         "model itself (no adapter over the original base reproduces it); export a model "
                         "format, or set export.source to a stage to export that stage's adapter")  # fmt: skip
    if fmt != "adapter" and streaming.should_stream(ecfg.streaming, read_gptoss_config(base_dir(cfg))):
        source, report = (streaming.qat_source(qat_dir) if use_qat
                          else streaming.adapter_source(stage_adapter(cfg.run_dir, ecfg.source)))  # fmt: skip
        return streaming.export_streaming(
            base_dir(cfg), source, out, fmt, tokenizer, probe=probe_batch(tokenizer, ecfg.probe_tokens),
            kl_threshold=ecfg.kl_threshold, mxfp4_rule=ecfg.mxfp4_rounding, overwrite=overwrite,
            max_shard_bytes=int(ecfg.max_shard_gb * 2**30), report=report,
        )  # fmt: skip
    if use_qat:
        start, adapter, report = qat.load_result(cfg, qat_dir)
    else:
        start = load_gptoss(base_dir(cfg), dtype=torch.float32)
        adapter = stage_adapter(cfg.run_dir, ecfg.source)
        report = {"source": str(adapter)}
    if fmt == "adapter":
        return export_adapter(adapter, out, tokenizer, start, base_model_name=ecfg.base_model_name, overwrite=overwrite)
    reference = lora_reference(start, adapter) if adapter is not None else None
    merged = start
    if adapter is not None:
        merged = copy.deepcopy(start)
        merge_adapter(merged, adapter)
    return export_model(
        merged, out, fmt, tokenizer, reference=reference, probe=probe_batch(tokenizer, ecfg.probe_tokens),
        kl_threshold=ecfg.kl_threshold, mxfp4_rule=ecfg.mxfp4_rounding, overwrite=overwrite,
        max_shard_bytes=int(ecfg.max_shard_gb * 2**30), report=report,
    )  # fmt: skip
