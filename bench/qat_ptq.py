"""PTQ vs QAT on the tiny model (CPU): validation loss and next-token accuracy of the exported bf16,
PTQ-MXFP4, QAT-MXFP4, PTQ-NVFP4 and QAT-NVFP4 models.

Setup, chosen to be gpt-oss's situation: gpt-oss ships its experts in MXFP4, so the tiny base
(`<source-run>/base`, built by `rustforge init`) is first re-written with MXFP4 experts (gpt-oss rounding
rule), and lang_rust fine-tunes LoRA on it with `model.expert_format: mxfp4` -- the 20B recipe. Then:
- bf16:        base + adapter merged in float32, exported as bf16 (`rustforge export --format bf16`);
- PTQ-<fmt>:   the same merged model exported as <fmt>;
- QAT-<fmt>:   the qat stage (merge, fake-quantised expert weights, straight-through) then <fmt> export;
- control-<fmt>: the same extra steps with the fake quantiser OFF during training, then <fmt> export --
  separates "more training" from "quantisation-aware training".
Every row is measured on the exported directory reloaded by rustforge's loader (what a user gets), on
lang_rust's held-out-crate validation batches. "gain kept" = (L_base - L) / (L_base - L_bf16), with L_base
the MXFP4 base before fine-tuning: the share of what fine-tuning bought that survives.

    python bench/qat_ptq.py --source-run runs/tiny --work /tmp/rustforge-qat-bench --out bench/results/qat_ptq.json
"""

from __future__ import annotations

import argparse
import json
import platform
import shutil
import subprocess
import sys
import time
from dataclasses import replace
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "src"))

from rustforge.config import CurriculumPhase, dump_config, load_config
from rustforge.export.hf import export_model, load_export, lora_reference
from rustforge.model.gptoss import RustforgeModel
from rustforge.model.loader import load_gptoss, write_gptoss
from rustforge.model.lora import merge_adapter


def prepare_run(source_run: Path, work: Path, fresh: bool):
    """work/run: the source run's corpus tokens and config, its base re-written with MXFP4 experts."""
    run = work / "run"
    if fresh:
        shutil.rmtree(run, ignore_errors=True)
    cfg = load_config(source_run / "config.yaml", [f"run_dir={run}", "model.expert_format=mxfp4"])
    if not (run / "base" / "config.json").is_file():
        run.mkdir(parents=True, exist_ok=True)
        shutil.copytree(source_run / "token_cache", run / "token_cache", dirs_exist_ok=True)
        base = load_gptoss(source_run / "base", dtype=torch.float32)
        write_gptoss(base, run / "base", "mxfp4", mxfp4_scale_rounding=cfg.export.mxfp4_rounding,
                     tokenizer_json_path=source_run / "base" / "tokenizer.json")  # fmt: skip
    dump_config(cfg, run / "config.yaml")
    return cfg


def ensure_lang_rust(cfg, config_path: Path) -> None:
    if (Path(cfg.run_dir) / "lang_rust" / "adapter" / "adapter_config.json").is_file():
        return
    cmd = [sys.executable, "-m", "rustforge.cli", "train", "--stage", "lang_rust", "--config", str(config_path),
           "--no-progress", "--resume"]  # fmt: skip
    subprocess.run(cmd, check=True)


def train_qat(cfg, fmt: str, stage_directory: Path, control: bool) -> Path:
    """The qat stage for `fmt` into its own directory; control=True trains with the quantiser off."""
    from rustforge.train import qat

    final = stage_directory / "final"
    if qat.is_complete(final):
        return final
    cfg = replace(cfg, qat=replace(cfg.qat, format=fmt))
    model, tokenizer, info = qat.build(cfg, torch.device("cpu"))
    trainer_cls = ControlTrainer if control else qat.QatTrainer
    trainer = trainer_cls(model, cfg.lora, cfg.qat, qat.stage_data(cfg, cfg.qat, tokenizer), stage_directory,
                          torch.device("cpu"), progress=False)  # fmt: skip
    trainer.run(resume=True)
    qat.save_result(model, cfg, {**info, "steps": trainer.step, "control": control}, final)
    return final


def _control_trainer():
    from rustforge.train.qat import QatTrainer, fake_quant_disabled

    class Control(QatTrainer):
        """QAT's loop with the quantiser off in training steps (still on in evaluation)."""

        def train_step(self):
            with fake_quant_disabled(self.model):
                return super().train_step()

    return Control


ControlTrainer = None


@torch.no_grad()
def evaluate(model_or_dir, cfg, batches) -> dict:
    """Held-out loss (nats/token) and next-token top-1 accuracy of an exported directory (or a plain model)."""
    hf = load_export(model_or_dir, dtype=torch.float32) if isinstance(model_or_dir, Path) else model_or_dir
    model = RustforgeModel(hf, cfg.model, "eager").eval()
    ce, correct, n = 0.0, 0, 0
    for batch in batches:
        hidden = model.hidden_states(batch["input_ids"], batch["position_ids"], batch["doc_ids"])
        logits = hf.lm_head(hidden).float()
        labels = batch["labels"]
        mask = labels != -100
        ce += float(torch.nn.functional.cross_entropy(logits[mask], labels[mask], reduction="sum"))
        correct += int((logits.argmax(-1)[mask] == labels[mask]).sum())
        n += int(mask.sum())
    return {"val_loss": ce / n, "top1": correct / n, "tokens": n}


def machine() -> dict:
    import transformers

    cpu = next((line.split(":", 1)[1].strip() for line in Path("/proc/cpuinfo").read_text().splitlines()
                if line.startswith("model name")), platform.processor())  # fmt: skip
    return {"cpu": cpu, "threads": torch.get_num_threads(), "torch": torch.__version__,
            "transformers": transformers.__version__, "python": platform.python_version()}  # fmt: skip


def main() -> int:
    global ControlTrainer
    ControlTrainer = _control_trainer()
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--source-run", type=Path, default=ROOT / "runs" / "tiny", help="run with base/, token_cache/, config.yaml")
    p.add_argument("--work", type=Path, default=Path("/tmp/rustforge-qat-bench"))
    p.add_argument("--qat-steps", type=int, default=120)
    p.add_argument("--qat-lrs", type=float, nargs="+", default=[1e-5, 1e-4], help="one QAT (and control) run each")
    p.add_argument("--qat-seq-len", type=int, default=256)
    p.add_argument("--qat-batch-size", type=int, default=4)
    p.add_argument("--formats", nargs="+", default=["mxfp4", "nvfp4"])
    p.add_argument("--no-control", action="store_true", help="skip the quantiser-off control runs")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--fresh", action="store_true", help="rebuild the work run from scratch")
    p.add_argument("--out", type=Path, default=None, help="JSON with every row")
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    started = time.time()

    from rustforge.data.tokenizer import load_tokenizer
    from rustforge.train import lang_rust

    cfg = prepare_run(args.source_run, args.work, args.fresh)
    config_path = Path(cfg.run_dir) / "config.yaml"
    ensure_lang_rust(cfg, config_path)
    qat_cfg = replace(cfg.qat, warmup_steps=5, batch_size=args.qat_batch_size,
                      phases=[CurriculumPhase(args.qat_seq_len, args.qat_steps)],
                      eval_every=max(1, args.qat_steps // 3), save_every=max(1, args.qat_steps // 3))  # fmt: skip
    cfg = replace(cfg, qat=qat_cfg)
    run, exports = Path(cfg.run_dir), Path(cfg.run_dir) / "bench_exports"
    tokenizer = load_tokenizer(run / "base")
    batches = lang_rust.stage_data(cfg, tokenizer, run / "lang_rust").validation(
        cfg.lang_rust.eval_seq_len or cfg.lang_rust.phases[0].seq_len
    )
    rule = cfg.export.mxfp4_rounding

    base = load_gptoss(run / "base", dtype=torch.float32)
    adapter = run / "lang_rust" / "adapter"
    reference = lora_reference(base, adapter)
    merged = load_gptoss(run / "base", dtype=torch.float32)
    merge_adapter(merged, adapter)
    rows = {"base (MXFP4, before lang_rust)": evaluate(run / "base", cfg, batches)}

    def export_and_eval(label: str, model, fmt: str, ref=None) -> None:
        out = exports / label.replace(" ", "_").replace("(", "").replace(")", "").replace(",", "")
        if not (out / "export_report.json").is_file():
            export_model(model, out, fmt, tokenizer, reference=ref, mxfp4_rule=rule, overwrite=True)
        rows[label] = evaluate(out, cfg, batches)
        rows[label]["val_loss_unquantised_weights"] = evaluate(model, cfg, batches)["val_loss"]
        print(f"{label:<40} {rows[label]}", flush=True)

    export_and_eval("bf16", merged, "bf16", reference)
    from rustforge.train import qat

    for fmt in args.formats:
        export_and_eval(f"PTQ-{fmt}", merged, fmt, reference)
        for lr in args.qat_lrs:
            for control in [False] if args.no_control else [False, True]:
                kind = "control (quantiser off in training)" if control else "QAT"
                lr_cfg = replace(cfg, qat=replace(cfg.qat, lr=lr))
                final = train_qat(lr_cfg, fmt, run / f"qat-{fmt}-lr{lr:g}{'-control' if control else ''}", control)
                model, _, _ = qat.load_result(cfg, final)
                export_and_eval(f"{kind}-{fmt}, lr {lr:g}", model, fmt)

    base_loss, bf16_loss = rows["base (MXFP4, before lang_rust)"]["val_loss"], rows["bf16"]["val_loss"]
    for row in rows.values():
        row["gain_kept"] = (base_loss - row["val_loss"]) / (base_loss - bf16_loss)
    record = {
        "date": time.strftime("%Y-%m-%d"),
        "command": "python " + " ".join(sys.argv),
        "machine": machine(),
        "settings": {"qat_steps": args.qat_steps, "qat_lrs": args.qat_lrs, "qat_seq_len": args.qat_seq_len,
                     "qat_batch_size": args.qat_batch_size, "mxfp4_rounding": rule,
                     "lang_rust_steps": sum(ph.steps for ph in cfg.lang_rust.phases)},
        "rows": rows,
        "minutes": (time.time() - started) / 60,
    }
    print(markdown(record))
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(record, indent=2) + "\n")
    return 0


def markdown(record: dict) -> str:
    header = "| model (as exported) | val loss (nats/token) | next-token top-1 | fine-tuning gain kept | same weights unquantised |"
    lines = [header, "| --- | --- | --- | --- | --- |"]
    for label, row in record["rows"].items():
        unquantised = row.get("val_loss_unquantised_weights")
        lines.append(f"| {label} | {row['val_loss']:.4f} | {100 * row['top1']:.2f}% | {100 * row['gain_kept']:.1f}% | "
                     f"{'' if unquantised is None else f'{unquantised:.4f}'} |")  # fmt: skip
    return "\n".join(lines)


if __name__ == "__main__":
    sys.exit(main())
