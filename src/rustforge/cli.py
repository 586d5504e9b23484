"""The `rustforge` command line: one subcommand per pipeline step, all driven by one YAML config.

    rustforge data corpus --config configs/tiny.yaml      harvest Rust source into train/val shards
    rustforge data tasks --config configs/tiny.yaml       mine tasks: mutants of real crates that fail tests
    rustforge data trajectories|pairs --config ... --out F.jsonl   agent trajectories / IPO pairs, tools run for real
    rustforge init --config configs/tiny.yaml             build the embedded tiny base (tokenizer + model)
    rustforge train --stage lang_rust|core_agent|ipo|grpo|qat --config ... [--resume]
    rustforge pipeline --config configs/tiny.yaml         lang_rust -> core_agent -> ipo -> grpo (mining a task set for
                                                          the agent stages) -> qat + export -> eval, resumable; then the
                                                          efficacy table
    rustforge smoke --config configs/tiny.yaml            build the base and run one forward pass
    rustforge plan --config configs/gpt-oss-20b-h100.yaml [--tier h100_80gb]   memory plan per stage
    rustforge report --config configs/tiny.yaml           one HTML page of the run
    rustforge export --config ... --format mxfp4|bf16|nvfp4|adapter [--out DIR]   Hugging Face directory
    rustforge eval --config ... --model RUN_OR_EXPORT --suite crate_tasks|humaneval_rust [--k K] [--limit N]
                   [--mode single|agentic] [--data PATH] [--out F.json]   pass@k etc., as JSON and a table
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from rustforge.config import ConfigError, RunConfig, dump_config, load_config

STAGES = ("lang_rust", "core_agent", "ipo", "grpo", "qat")


def main(argv: list[str] | None = None) -> int:
    parser = _parser()
    args = parser.parse_args(argv)
    try:
        cfg = load_config(args.config, args.set)
        return args.func(cfg, args)
    except ConfigError as e:
        print(f"config error: {e}", file=sys.stderr)
        return 2
    except ValueError as e:  # bad values that only the command can judge (a tier name, a plan that can't fit)
        print(f"error: {e}", file=sys.stderr)
        return 2


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="rustforge", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = p.add_subparsers(dest="command", required=True)

    def command(name: str, func, help: str) -> argparse.ArgumentParser:
        c = sub.add_parser(name, help=help)
        c.add_argument("--config", required=True, help="run config YAML (see configs/)")
        c.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="override a config field")
        c.add_argument("--no-progress", action="store_true", help="no progress bars")
        c.set_defaults(func=func)
        return c

    data = sub.add_parser("data", help="data preparation").add_subparsers(dest="data_command", required=True)
    corpus = data.add_parser("corpus", help="harvest Rust source into shards")
    corpus.add_argument("--config", required=True)
    corpus.add_argument("--set", action="append", default=[])
    corpus.add_argument("--source", action="append", default=[], help="extra directory or git repository")
    corpus.add_argument("--no-debian", action="store_true", help="skip /usr/share/cargo/registry")
    corpus.add_argument("--no-progress", action="store_true")
    corpus.set_defaults(func=cmd_corpus)

    tasks = data.add_parser("tasks", help="mine Rust tasks (mutants that break a test) from real crates")
    tasks.add_argument("--source", action="append", default=[], help="extra crate directory")
    tasks.add_argument("--out", default=None, help="output directory (default: tasks.out_dir)")
    for name, what in (("trajectories", "core_agent trajectories"), ("pairs", "IPO preference pairs")):
        build = data.add_parser(name, help=f"synthesise {what} from mined tasks, tools run for real")
        build.add_argument("--tasks", default=None, help="mined tasks directory (default: tasks.out_dir)")
        build.add_argument("--out", required=True, help="output JSONL")
        build.add_argument("--split", default="train", choices=["train", "val"])
        build.add_argument("--limit", type=int, default=None)
        build.set_defaults(func=cmd_build_dataset, what=name)
    for sub_parser in (tasks, *(data.choices[n] for n in ("trajectories", "pairs"))):
        sub_parser.add_argument("--config", required=True)
        sub_parser.add_argument("--set", action="append", default=[])
        sub_parser.add_argument("--no-progress", action="store_true")
        sub_parser.add_argument(
            "--unsafe-no-sandbox",
            action="store_true",
            help="run untrusted Rust without bubblewrap (rlimits only) when bubblewrap cannot run",
        )
    tasks.set_defaults(func=cmd_tasks)

    command("init", cmd_init, "build the base model directory (tiny preset: tokenizer + weights)")
    command("smoke", cmd_smoke, "build the base and run one forward pass")
    train = command("train", cmd_train, "run one training stage")
    train.add_argument("--stage", required=True, choices=STAGES)
    train.add_argument("--resume", action="store_true", help="continue from the stage's latest checkpoint")
    train.add_argument("--max-steps-this-run", type=int, default=None, help="stop after N steps (for testing)")
    plan = command("plan", cmd_plan, "print the GPU-tier preset and a memory estimate per stage")
    plan.add_argument("--tier", default=None, help="tier name (default: config's tier, auto = from the GPU found)")
    plan.add_argument("--host-gib", type=float, default=None,
                      help="host RAM of the GPU machine, for offloaded checkpoints (default: this machine's)")  # fmt: skip
    command("report", cmd_report, "write the run's HTML report")
    export = command("export", cmd_export, "write the trained model as a Hugging Face directory, or its adapter")
    export.add_argument("--format", required=True, choices=("mxfp4", "bf16", "nvfp4", "adapter"))
    export.add_argument("--out", default=None, help="output directory (default: export.out_dir or <run_dir>/export/FORMAT)")
    evaluate = command("eval", cmd_eval, "sample k answers per problem of a suite, test them in the sandbox: pass@k")
    evaluate.add_argument("--model", required=True, help="a run dir (base + latest stage adapter), a stage adapter or an exported model dir")
    evaluate.add_argument("--suite", default=None, help="crate_tasks | humaneval_rust (default: eval.suite)")
    evaluate.add_argument("--data", default=None, help="tasks dir (crate_tasks) or JSONL file (humaneval_rust)")
    evaluate.add_argument("--k", type=int, default=None, help="samples per problem (default: eval.k)")
    evaluate.add_argument("--limit", type=int, default=None, help="only the first N problems")
    evaluate.add_argument("--mode", default=None, choices=("single", "agentic"), help="default: eval.mode")
    evaluate.add_argument("--out", default=None, help="JSON report (default: eval.out or <run_dir>/eval/SUITE-MODE.json)")
    evaluate.add_argument("--unsafe-no-sandbox", action="store_true", help="run the model's Rust without bubblewrap (rlimits only)")
    pipe = command("pipeline", cmd_pipeline, "run every stage in order, resuming where it stopped")
    pipe.add_argument("--fresh", action="store_true", help="ignore existing checkpoints")
    return p


def cmd_corpus(cfg: RunConfig, args) -> int:
    from rustforge.data.corpus import harvest

    cfg.corpus.sources += args.source
    if args.no_debian:
        cfg.corpus.debian = False
    summary = harvest(cfg.corpus, progress=not args.no_progress)
    print(summary.table())
    return 0


def _sandbox(cfg: RunConfig, args):
    from dataclasses import replace

    from rustforge.rust.sandbox import Sandbox

    return Sandbox(replace(cfg.sandbox, allow_unsandboxed=cfg.sandbox.allow_unsandboxed or args.unsafe_no_sandbox))


def cmd_tasks(cfg: RunConfig, args) -> int:
    from rustforge.rust.tasks import mine_tasks

    out = args.out or cfg.tasks.out_dir
    dirs = [cfg.tasks.registry, *cfg.corpus.sources, *args.source]
    summary = mine_tasks(dirs, out, cfg.tasks, _sandbox(cfg, args), progress=not args.no_progress)
    print(summary.table())
    return 0


def cmd_build_dataset(cfg: RunConfig, args) -> int:
    from rustforge.rust.trajectories import build_dataset

    counts = build_dataset(
        args.tasks or cfg.tasks.out_dir,
        args.out,
        args.what,
        split=args.split,
        sandbox=_sandbox(cfg, args),
        limit=args.limit,
        progress=not args.no_progress,
    )
    print(f"{args.what}: {counts['written']} written to {args.out}, {counts['skipped']} skipped")
    return 0


def cmd_init(cfg: RunConfig, args) -> int:
    from rustforge.model.base import build_tiny_base

    if cfg.model.path:
        print(f"model.path is set ({cfg.model.path}): nothing to build")
        return 0
    print(f"base model written to {build_tiny_base(cfg, progress=not args.no_progress)}")
    return 0


def cmd_smoke(cfg: RunConfig, args) -> int:
    import torch

    from rustforge.model.base import prepare_base

    model, tok = prepare_base(cfg, torch.device("cpu"), progress=not args.no_progress)
    ids = tok.encode("fn main() {\n    println!(\"hello\");\n}\n")
    x = torch.tensor([ids])
    pos = torch.arange(len(ids))[None]
    with torch.no_grad():
        out = model(x, pos, torch.zeros_like(x), torch.cat([x[:, 1:], torch.full((1, 1), -100)], 1))
    n = sum(p.numel() for p in model.parameters())
    print(f"tiny GPT-OSS: {n / 1e6:.1f}M parameters, vocab {tok.vocab_size}; loss on a probe: {float(out.loss):.3f}")
    return 0


def cmd_plan(cfg: RunConfig, args) -> int:
    from rustforge.train.tiers import detect_tier, format_plan, get_tier, plan_run

    name = args.tier or cfg.tier
    # a named tier plans for that card without needing it here (plan before you rent); auto reads the GPU found
    tier = detect_tier() if name == "auto" else get_tier(name)
    plan = plan_run(cfg, tier, check=False, host_memory_gib=args.host_gib)
    print(format_plan(plan))
    return 0 if plan.fits else 3


def cmd_report(cfg: RunConfig, args) -> int:
    from rustforge.eval.report import write_report

    print(f"report: {write_report(cfg.run_dir)}")
    return 0


def cmd_export(cfg: RunConfig, args) -> int:
    from rustforge.export.hf import ExportRefused, export_run

    try:
        out = export_run(cfg, args.format, args.out)
    except ExportRefused as e:
        print(e, file=sys.stderr)
        return 4
    print(f"{args.format} export written to {out}")
    return 0


def cmd_eval(cfg: RunConfig, args) -> int:
    """`rustforge eval`: rustforge.eval.harness.evaluate with the command line over cfg.eval."""
    from dataclasses import replace

    from rustforge.eval.harness import evaluate
    from rustforge.eval.suites import SuiteError

    given = {"suite": args.suite, "data": args.data, "k": args.k, "limit": args.limit, "mode": args.mode}
    try:
        eval_cfg = replace(cfg.eval, **{k: v for k, v in given.items() if v is not None})
    except ValueError as e:
        raise ConfigError(f"rustforge eval: {e}") from None
    if args.unsafe_no_sandbox:
        cfg.sandbox = replace(cfg.sandbox, allow_unsandboxed=True)
    try:
        report = evaluate(cfg, args.model, eval_cfg, progress=not args.no_progress, out=args.out)
    except (SuiteError, FileNotFoundError) as e:
        print(f"eval: {e}", file=sys.stderr)
        return 2
    print(report.table())
    return 0


def cmd_train(cfg: RunConfig, args) -> int:
    import importlib

    from rustforge.train import distributed

    # under `torchrun --nproc-per-node N` (N > 1): one process group, FSDP2 in SFTTrainer (#11)
    dist = distributed.init_distributed()
    try:
        distributed.check_stage_supported(args.stage, dist)
        if dist.is_main:
            _save_run_config(cfg)
        stage = importlib.import_module(f"rustforge.train.{args.stage}")
        progress = not args.no_progress and dist.is_main
        result = stage.run(cfg, resume=args.resume, progress=progress, stop_after=args.max_steps_this_run)
        from rustforge.train.pipeline import efficacy_rows, format_efficacy

        rows = efficacy_rows(args.stage, result)
        if dist.is_main:
            print(format_efficacy(rows) if rows else f"{args.stage}: {result}")
    finally:
        distributed.shutdown()
    return 0


def cmd_pipeline(cfg: RunConfig, args) -> int:
    """Every stage in order (rustforge.train.pipeline), the efficacy table, the report."""
    from rustforge.eval.report import write_report
    from rustforge.train import distributed
    from rustforge.train.pipeline import run_pipeline

    # under `torchrun --nproc-per-node N`: every stage trains under FSDP2; rank 0 prepares data, exports,
    # evaluates and writes the report (train/pipeline.py)
    dist = distributed.init_distributed()
    try:
        if dist.is_main:
            _save_run_config(cfg)
        run_pipeline(cfg, fresh=args.fresh, progress=not args.no_progress and dist.is_main)
        if dist.is_main:
            print(f"report: {write_report(cfg.run_dir)}")
    finally:
        distributed.shutdown()
    return 0


def _save_run_config(cfg: RunConfig) -> None:
    Path(cfg.run_dir).mkdir(parents=True, exist_ok=True)
    dump_config(cfg, Path(cfg.run_dir) / "config.yaml")


if __name__ == "__main__":
    sys.exit(main())
