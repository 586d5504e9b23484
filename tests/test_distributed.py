"""FSDP2 training (train/distributed.py) on the tiny model, 2 gloo processes under torchrun, against one process.

One torchrun launch per test runs several jobs (process start-up and imports cost more than the tiny steps):
- SFTTrainer: the loss per step at world size 2 equals the single-process run with the same global batch,
  for both ways of splitting a step (whole micro-batches, rows of one micro-batch); a checkpoint written at
  world size 2 resumes at world size 1 and one written at world size 1 resumes at world size 2, both
  continuing as the uninterrupted run.
- every stage: `rustforge pipeline` (lang_rust -> core_agent -> ipo -> grpo -> qat + export -> eval, with
  test_pipeline.py's stand-ins for task mining, replay and the eval harness) gives at world size 2 the
  single-process losses and held-out metrics of every stage, rank 0 alone preparing data and evaluating;
  grpo on test_grpo.py's learnable reward (uneven groups per rank, reference and pi_old log-probs) gives
  the single-process rewards and losses, also when resumed at world size 1 from a world-size-2 checkpoint;
  ipo with `reference: start` (the start adapter copied into the shards) gives the single-process losses.
The file is also the torchrun worker (`python tests/test_distributed.py JOBS.json`).
"""

from __future__ import annotations

import json
import math
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
STEPS = 4
# fp32, one thread: measured worst relative difference 2 ranks vs 1 (and across resumes) 1.1e-7
LOSS_RTOL = 1e-5
# ipo's squared margin and grpo's advantage-weighted sums amplify the rounding of the ranks' gradient sums
# (measured on the isolated stages: ipo 4.9e-6, grpo 9.2e-7)
STAGE_RTOL = 1e-4


def _run_job(job: dict) -> None:
    """Train the tiny LoRA model on a fixed synthetic packed dataset; metrics land in job['dir']/logs."""
    from rustforge.config import (
        CurriculumPhase,
        LoraConfig,
        ModelConfig,
        PackingConfig,
        TrainConfig,
    )
    from rustforge.data.packing import PackedDataset, collate, pack_documents
    from rustforge.model.gptoss import build_model
    from rustforge.train.sft import DatasetBatches, SFTTrainer, StageData

    vocab, seq_len = 256, 64
    gen = torch.Generator().manual_seed(1234)
    docs = [torch.randint(1, vocab, (int(n),), generator=gen).tolist() for n in torch.randint(8, 90, (48,), generator=gen)]
    val_docs = docs[:10]
    model = build_model(
        ModelConfig(preset="tiny", dtype="float32", loss_chunk_size=64, router_aux_loss_coef=job.get("aux", 0.01),
                    **job.get("model", {})),
        LoraConfig(r=4, alpha=8),
        vocab_size=vocab,
    )  # fmt: skip
    cfg = TrainConfig(
        lr=3e-3, warmup_steps=1, batch_size=job["batch_size"], grad_accum=job["grad_accum"],
        phases=[CurriculumPhase(seq_len, STEPS)], eval_every=2, eval_batches=3, save_every=2, seed=0,
    )  # fmt: skip

    def train(phase: int, n: int):
        return DatasetBatches(PackedDataset(docs[10:], n, PackingConfig(split_overlap=8), pad_id=0, seed=phase), cfg.batch_size)

    def validation(n: int):
        packed = pack_documents(val_docs, n, PackingConfig(split_overlap=8), seed=0)
        seqs = [packed.sequence(i) for i in range(min(len(packed), 5))]  # 5 batches of 1: uneven over 2 ranks
        return [collate([s], n, 0) for s in seqs]

    trainer = SFTTrainer(model, LoraConfig(r=4, alpha=8), cfg, StageData(train, validation), Path(job["dir"]),
                         torch.device("cpu"), progress=False)  # fmt: skip
    trainer.run(resume=job.get("resume", False), stop_after=job.get("stop_after"))


# ------------------------------------------------------------------------------------------ the stages
# steps split evenly over 2 ranks: grad_accum 2 of batch 1 is whole micro-batches (exact, router aux loss too)
SMALL = {"warmup_steps": 1, "batch_size": 1, "grad_accum": 2, "eval_batches": 3, "lr": 5.0e-3}


def _stage_config(job: dict):
    """The tiny run in job['dir'] (its base copied there by _run_dir), every stage a few tiny steps;
    job['sections'] overrides settings of named sections."""
    from rustforge.config import RunConfig, from_dict

    sections = {
        **job["tiny_cfg"],
        "run_dir": job["dir"],
        "expert_monitor": {"every_steps": 0},
        "lang_rust": {**SMALL, "phases": [{"seq_len": 128, "steps": 2}], "eval_every": 2, "save_every": 2},
        "core_agent": {**SMALL, "phases": [{"seq_len": 512, "steps": 2}], "eval_every": 2, "save_every": 1,
                       "sample_prompts": 3, "sample_max_new_tokens": 6},  # 3 prompts: 1 on rank 0, 2 on rank 1
        "ipo": {**SMALL, "phases": [{"seq_len": 640, "steps": 2}], "eval_every": 2, "save_every": 1,
                "max_length": 320, "max_prompt_length": 240, "beta": 0.5},
        "grpo": {"lr": 1.0e-3, "warmup_steps": 0, "phases": [{"seq_len": 448, "steps": 2}], "eval_every": 2,
                 "save_every": 1, "prompts_per_step": 2, "num_generations": 4, "max_prompt_length": 384,
                 "max_completion_length": 8, "log_kl": False, "val_prompts": 2},
        "rollout": {"max_batch": 8},
        "qat": {**SMALL, "phases": [{"seq_len": 128, "steps": 2}], "eval_every": 2, "save_every": 2, "lr": 1e-3},
        "eval": {"k": 2, "limit": 2, "pass_at": [1]},
    }  # fmt: skip
    for name, settings in job.get("sections", {}).items():
        sections[name] = {**sections[name], **settings}
    return from_dict(RunConfig, sections)


def _run_pipeline_job(job: dict, patch=setattr) -> None:
    """`rustforge pipeline` with test_pipeline.py's stand-ins (patch: setattr, or pytest's monkeypatch in the
    test process); each rank records what its stand-ins were asked to do."""
    import test_pipeline as TP

    from rustforge.eval import harness
    from rustforge.train import agent_data, distributed, grpo, pipeline

    fake, evaluate = TP.FakeAgentData(), TP.FakeEvaluate()
    patch(agent_data, "mine", fake.mine)
    patch(agent_data, "build", fake.build)
    patch(grpo, "build_environment", TP.format_environment)
    patch(harness, "evaluate", evaluate)
    pipeline.run_pipeline(_stage_config(job), progress=False)
    calls = {"data": fake.calls, "evaluated": evaluate.models}
    (Path(job["dir"]) / f"calls-rank{distributed.current().rank}.json").write_text(json.dumps(calls))


def _run_grpo_job(job: dict) -> None:
    """grpo on the learnable token-share reward: 3 prompts x 4 episodes a step (1 group on rank 0, 2 on
    rank 1), pi_old and reference log-probs (num_iterations 2, beta > 0), several micro-batches a round."""
    import test_grpo as TG

    from rustforge.config import CurriculumPhase, GrpoConfig
    from rustforge.data.tokenizer import load_tokenizer
    from rustforge.train import grpo

    stage = GrpoConfig(
        lr=3e-3, warmup_steps=0, phases=[CurriculumPhase(128, 3)], init_from="none", prompts_per_step=3,
        num_generations=4, max_prompt_length=64, max_completion_length=16, eval_every=3, save_every=2,
        val_prompts=3, loss_type="grpo", num_iterations=2, beta=0.05, micro_batch_tokens=128,
    )  # fmt: skip
    environment = TG.TokenSetEnvironment(load_tokenizer(Path(job["dir"]) / "base"))
    grpo.run(_stage_config(job), stage, resume=job.get("resume", False), progress=False,
             stop_after=job.get("stop_after"), environment=environment)  # fmt: skip


def _run_ipo_job(job: dict) -> None:
    """ipo with `reference: start` (the start adapter copied into the shards for the reference pass)."""
    import test_ipo as TI

    from rustforge.config import CurriculumPhase, IpoConfig
    from rustforge.train import ipo

    stage = IpoConfig(
        lr=5e-3, warmup_steps=1, batch_size=1, grad_accum=2, beta=0.5, phases=[CurriculumPhase(640, 3)],
        max_length=320, max_prompt_length=240, eval_every=3, eval_batches=1, save_every=3, reference="start",
        init_from="none",
    )  # fmt: skip
    ipo.run(_stage_config(job), stage, progress=False, train_pairs=TI._pairs(0, 8), val_pairs=TI._pairs(1000, 3))


def _run_qat_job(job: dict) -> None:
    """qat from the run's lang_rust adapter, the float32 expert masters trained (sharded under FSDP)."""
    from rustforge.train import qat

    qat.run(_stage_config(job), progress=False)


JOBS = {"sft": _run_job, "pipeline": _run_pipeline_job, "grpo": _run_grpo_job, "ipo": _run_ipo_job, "qat": _run_qat_job}


def _worker(jobs_file: str) -> None:
    from rustforge.train import distributed

    torch.set_num_threads(1)
    distributed.init_distributed()
    try:
        for job in json.loads(Path(jobs_file).read_text()):
            JOBS[job.get("kind", "sft")](job)
    finally:
        distributed.shutdown()


def _torchrun(tmp_path: Path, jobs: list[dict], nproc: int = 2) -> None:
    jobs_file = tmp_path / f"jobs-{len(list(tmp_path.glob('jobs-*')))}.json"
    jobs_file.write_text(json.dumps(jobs))
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", str(nproc), __file__, str(jobs_file)]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1", "PYTHONPATH": str(ROOT / "src")}
    proc = subprocess.run(cmd, check=False, capture_output=True, text=True, env=env, timeout=300)
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-4000:]


def _metrics(run_dir: Path, split: str = "train") -> dict[int, dict]:
    from rustforge.train.metrics import read_metrics

    return read_metrics(run_dir / "logs" / "metrics.jsonl", split)


def _assert_same_losses(got: dict, want: dict, steps, what: str) -> float:
    worst = 0.0
    for step in steps:
        a, b = got[step]["loss"], want[step]["loss"]
        worst = max(worst, abs(a - b) / abs(b))
        assert a == pytest.approx(b, rel=LOSS_RTOL), f"{what}: step {step} loss {a} vs {b}"
    return worst


def test_two_gloo_ranks_match_one_process_and_resume_across_world_sizes(tmp_path):
    torch.set_num_threads(1)
    micro = {"batch_size": 2, "grad_accum": 2}  # 2 ranks: one whole micro-batch each
    # 2 ranks: 2 rows of the one micro-batch each. Exact for the token loss; the router aux loss is the mean
    # of each rank's (a batch statistic: 2 rows != 4 rows, ~5e-4 relative by step 3), so it is off here
    rows = {"batch_size": 4, "grad_accum": 1, "aux": 0.0}
    # the long-context path: MXFP4 experts in token tiles, checkpointing (the recompute's dense weights kept)
    long = {**micro, "model": {"expert_format": "mxfp4", "gradient_checkpointing": True, "moe_tile_tokens": 16}}
    # dense experts are FSDP-sharded parameters: the backward reuses the recompute's unsharded weight
    dense = {**micro, "model": {"expert_format": "bf16", "gradient_checkpointing": True}}
    names = ("one_micro", "one_rows", "one_half", "one_long", "one_dense",
             "two_micro", "two_rows", "two_half", "two_long", "two_dense")  # fmt: skip
    d = {k: tmp_path / k for k in names}
    # single process, in this process: the untouched world-size-1 path
    _run_job({"dir": str(d["one_micro"]), **micro})
    _run_job({"dir": str(d["one_rows"]), **rows})
    _run_job({"dir": str(d["one_half"]), **micro, "stop_after": 2})  # checkpoint at step 2, world size 1
    _run_job({"dir": str(d["one_long"]), **long})
    _run_job({"dir": str(d["one_dense"]), **dense})
    shutil.copytree(d["one_half"], tmp_path / "one_then_two")
    _torchrun(tmp_path, [
        {"dir": str(d["two_micro"]), **micro},
        {"dir": str(d["two_rows"]), **rows},
        {"dir": str(d["two_half"]), **micro, "stop_after": 2},  # checkpoint at step 2, world size 2
        {"dir": str(tmp_path / "one_then_two"), **micro, "resume": True},  # world 1 -> 2
        {"dir": str(d["two_long"]), **long},
        {"dir": str(d["two_dense"]), **dense},
    ])  # fmt: skip
    shutil.copytree(d["two_half"], tmp_path / "two_then_one")
    _run_job({"dir": str(tmp_path / "two_then_one"), **micro, "resume": True})  # world 2 -> 1

    steps = range(1, STEPS + 1)
    ref = _metrics(d["one_micro"])
    assert sorted(ref) == list(steps)
    worst = _assert_same_losses(_metrics(d["two_micro"]), ref, steps, "2 ranks x 1 micro-batch")
    worst = max(worst, _assert_same_losses(_metrics(d["two_rows"]), _metrics(d["one_rows"]), steps, "2 ranks x 2 rows"))
    for name in ("one_then_two", "two_then_one"):
        worst = max(worst, _assert_same_losses(_metrics(tmp_path / name), ref, steps, name))
    worst = max(worst, _assert_same_losses(_metrics(d["two_long"]), _metrics(d["one_long"]), steps, "tiles + checkpointing"))
    worst = max(worst, _assert_same_losses(_metrics(d["two_dense"]), _metrics(d["one_dense"]), steps, "dense experts + checkpointing"))
    # the gradient reaches the same norm, and the all-reduced validation loss is the single-process one
    for step in steps:
        assert _metrics(d["two_micro"])[step]["grad_norm"] == pytest.approx(ref[step]["grad_norm"], rel=1e-4)
    val_ref, val_two = _metrics(d["one_micro"], "val"), _metrics(d["two_micro"], "val")
    assert sorted(val_two) == sorted(val_ref) == [0, 2, 4]
    for step in val_ref:
        assert val_two[step]["tokens"] == val_ref[step]["tokens"]
        assert val_two[step]["loss"] == pytest.approx(val_ref[step]["loss"], rel=LOSS_RTOL)
    # the losses move (a test of equal numbers that never changed would prove nothing)
    assert abs(ref[STEPS]["loss"] - ref[1]["loss"]) > 1e-3
    # checkpoints of world size 2 are the single-process format, with full tensors
    state = torch.load(d["two_half"] / "checkpoints" / "step-000002" / "trainer_state.pt", weights_only=False)
    one = torch.load(d["one_half"] / "checkpoints" / "step-000002" / "trainer_state.pt", weights_only=False)
    assert state["world_size"] == 2 and sorted(state["optimizer"]["state"]) == sorted(one["optimizer"]["state"])
    for i, s in one["optimizer"]["state"].items():
        torch.testing.assert_close(state["optimizer"]["state"][i]["exp_avg"], s["exp_avg"], rtol=1e-3, atol=1e-7)
    print(f"worst relative loss difference: {worst:.2e}")


def _run_dir(tiny_base, path: Path, kind: str, **settings) -> dict:
    """A job in a fresh run dir holding the tiny base (copied here: ranks must not race to copy it)."""
    cfg_dict, root = tiny_base
    shutil.copytree(root / "run" / "base", path / "base")
    return {"kind": kind, "dir": str(path), "tiny_cfg": cfg_dict, **settings}


def _assert_same_metrics(got: dict, want: dict, keys, what: str, rtol: float = LOSS_RTOL) -> float:
    """Every step's `keys` (all numeric ones if None) equal within rtol; the worst relative difference."""
    assert sorted(got) == sorted(want), what
    worst = 0.0
    for step, record in want.items():
        for key in keys or [k for k, v in record.items() if isinstance(v, (int, float))]:
            a, b = got[step][key], record[key]
            assert a == pytest.approx(b, rel=rtol, abs=1e-9, nan_ok=True), f"{what}: step {step} {key} {a} vs {b}"
            if not math.isnan(b) and b != 0:
                worst = max(worst, abs(a - b) / abs(b))
    return worst


def _cut_back(stage_dir: Path, step: int) -> None:
    """A finished stage as if killed after `step`: later checkpoints, the final adapter and the log records
    of later steps removed."""
    for path in (stage_dir / "checkpoints").glob("step-*"):
        if int(path.name.removeprefix("step-")) > step:
            shutil.rmtree(path)
    (stage_dir / "checkpoints" / "latest").write_text(f"step-{step:06d}")
    shutil.rmtree(stage_dir / "adapter")
    log = stage_dir / "logs" / "metrics.jsonl"
    log.write_text("".join(line for line in log.read_text().splitlines(True) if json.loads(line)["step"] <= step))


def _stage_metrics(job: dict, stage: str, split: str = "train") -> dict[int, dict]:
    return _metrics(Path(job["dir"]) / stage, split)


def test_every_stage_and_the_pipeline_match_one_process_at_world_size_two(tiny_base, tmp_path, monkeypatch):
    torch.set_num_threads(1)
    names = ("pipeline", "grpo", "ipo", "qat")
    lora_qat = {"sections": {"qat": {"trainable": "lora"}}}  # the isolated qat job trains the expert masters
    one = {n: _run_dir(tiny_base, tmp_path / f"one_{n}", n, **(lora_qat if n == "pipeline" else {})) for n in names}
    two = {n: _run_dir(tiny_base, tmp_path / f"two_{n}", n, **(lora_qat if n == "pipeline" else {})) for n in names}
    _run_pipeline_job(one["pipeline"], monkeypatch.setattr)
    lang_rust_adapter = Path(one["pipeline"]["dir"]) / "lang_rust" / "adapter"
    for job in (one["qat"], two["qat"]):  # qat's source: one and the same lang_rust adapter at both world sizes
        shutil.copytree(lang_rust_adapter, Path(job["dir"]) / "lang_rust" / "adapter")
    _run_grpo_job(one["grpo"])
    _run_ipo_job(one["ipo"])
    _run_qat_job(one["qat"])
    _torchrun(tmp_path, list(two.values()))
    # world 2's grpo as if killed after step 2 (its checkpoint there), resumed at world size 1
    two_then_one = {**two["grpo"], "dir": str(tmp_path / "two_then_one"), "resume": True}
    shutil.copytree(two["grpo"]["dir"], two_then_one["dir"])
    _cut_back(Path(two_then_one["dir"]) / "grpo", 2)
    _run_grpo_job(two_then_one)

    worst = {}
    # the pipeline: every stage's train losses and held-out metrics are one process's. Each stage starts from
    # the previous one's adapter, so differences of rounding carry over: ipo's squared margin amplifies
    # them, and so does qat's quantiser (a weight a rounding away from a step boundary lands on the other
    # side), whence qat is compared before quantising here, exactly in its own job below
    for stage in ("lang_rust", "core_agent", "ipo", "grpo"):
        got, want = two["pipeline"], one["pipeline"]
        assert sorted(_stage_metrics(want, stage)) == [1, 2], stage
        rtol = LOSS_RTOL if stage != "ipo" else STAGE_RTOL
        for split, keys in (("train", ["loss"]), ("val", None)):  # val: every held-out metric
            got_split, want_split = _stage_metrics(got, stage, split), _stage_metrics(want, stage, split)
            diff = _assert_same_metrics(got_split, want_split, keys, f"{stage} {split}", rtol)
            worst[f"pipeline {stage}"] = max(worst.get(f"pipeline {stage}", 0.0), diff)
    qat_val = [_stage_metrics(job, "qat", "val") for job in (two["pipeline"], one["pipeline"])]
    worst["pipeline qat"] = _assert_same_metrics(
        {0: qat_val[0][0]}, {0: qat_val[1][0]}, ["loss_bf16"], "qat", STAGE_RTOL
    )
    assert sorted(_stage_metrics(two["pipeline"], "qat")) == [1, 2] and sorted(qat_val[0]) == [0, 2]
    efficacy = [Path(job["dir"]) / "efficacy.json" for job in (two["pipeline"], one["pipeline"])]
    rows = [json.loads(path.read_text())["rows"] for path in efficacy]
    assert [(r["stage"], r["metric"]) for r in rows[0]] == [(r["stage"], r["metric"]) for r in rows[1]]
    for a, b in zip(*rows):
        for end in ("before", "after") if a["stage"] != "qat" else ():
            assert a[end] == (None if b[end] is None else pytest.approx(b[end], rel=STAGE_RTOL)), a["metric"]
    # rank 0 alone mined, replayed, exported and evaluated (what one process did); rank 1 waited
    calls = [json.loads((Path(two["pipeline"]["dir"]) / f"calls-rank{r}.json").read_text()) for r in range(2)]
    want_calls = json.loads((Path(one["pipeline"]["dir"]) / "calls-rank0.json").read_text())
    assert calls[0] == want_calls and want_calls["evaluated"] == ["lang_rust", "grpo"]
    assert calls[1] == {"data": [], "evaluated": []}
    assert (Path(two["pipeline"]["dir"]) / "export" / "mxfp4" / "config.json").is_file()

    # grpo on the learnable reward: the same episodes (rewards) and losses, also resumed at world size 1
    grpo_one = _stage_metrics(one["grpo"], "grpo")
    assert sorted(grpo_one) == [1, 2, 3] and all(r["loss"] != 0 for r in grpo_one.values())
    for name, job in (("grpo", two["grpo"]), ("grpo 2 -> 1", two_then_one)):
        got = _stage_metrics(job, "grpo")
        worst[name] = _assert_same_metrics(got, grpo_one, ["reward", "loss", "kl", "trained_tokens"], name, STAGE_RTOL)
        assert all(got[s]["micro_batches"] == grpo_one[s]["micro_batches"] > 1 for s in grpo_one)
    resumed_log = (Path(two_then_one["dir"]) / "grpo" / "logs" / "metrics.jsonl").read_text().splitlines()
    assert [r["step"] for r in map(json.loads, resumed_log) if r["split"] == "train"] == [1, 2, 3]  # resumed at 2
    grpo_val = [_stage_metrics(job, "grpo", "val") for job in (two["grpo"], one["grpo"])]
    worst["grpo val"] = _assert_same_metrics(*grpo_val, None, "grpo val", STAGE_RTOL)
    # ipo with the start adapter as reference
    ipo_one = _stage_metrics(one["ipo"], "ipo")
    assert ipo_one[1]["margin"] == 0.0 and ipo_one[3]["margin"] != 0.0  # step 1: the policy is its reference
    ipo_two = _stage_metrics(two["ipo"], "ipo")
    worst["ipo"] = _assert_same_metrics(ipo_two, ipo_one, ["loss", "margin"], "ipo", STAGE_RTOL)
    # qat training the float32 expert masters through the quantiser, from the same adapter
    for split, keys in (("train", ["loss"]), ("val", ["loss", "loss_bf16"])):
        got, want = _stage_metrics(two["qat"], "qat", split), _stage_metrics(one["qat"], "qat", split)
        worst[f"qat {split}"] = _assert_same_metrics(got, want, keys, f"qat {split}", STAGE_RTOL)
    print("worst relative differences, world size 2 vs 1:", {k: f"{v:.1e}" for k, v in worst.items()})


def test_a_stage_listed_as_missing_is_refused_at_world_size_two(monkeypatch):
    from rustforge.train import distributed

    ctx = distributed.DistContext(rank=0, world_size=2, backend="gloo")
    for stage in ("lang_rust", "core_agent", "ipo", "grpo", "qat"):
        distributed.check_stage_supported(stage, ctx)  # every stage runs distributed
    monkeypatch.setitem(distributed.MISSING_FOR_DISTRIBUTED, "grpo", "something")
    with pytest.raises(RuntimeError, match="grpo.*missing something"):
        distributed.check_stage_supported("grpo", ctx)
    distributed.check_stage_supported("grpo", distributed.DistContext())  # world size 1: fine


def test_micro_batch_sharding_is_disjoint_and_covers_the_step():
    from rustforge.train.distributed import DistContext

    batches = [{"input_ids": torch.arange(8).view(4, 2) + 100 * i} for i in range(2)]
    by_rank = [DistContext(rank=r, world_size=2).shard_micro_batches(batches) for r in range(2)]
    assert [b["input_ids"][0, 0].item() for b in by_rank[0] + by_rank[1]] == [0, 100]  # whole micro-batches
    one = batches[:1]
    halves = [DistContext(rank=r, world_size=2).shard_micro_batches(one)[0]["input_ids"] for r in range(2)]
    assert torch.equal(torch.cat(halves), one[0]["input_ids"])  # rows
    with pytest.raises(ValueError, match="grad_accum.*batch_size"):
        DistContext(rank=0, world_size=3).shard_micro_batches(batches)
    slices = [DistContext(rank=r, world_size=2).padded_share(5) for r in range(2)]
    assert len(slices[0]) == len(slices[1]) == 3
    assert sorted(i for s in slices for i, counts in s if counts) == list(range(5))
    blocks = [DistContext(rank=r, world_size=2).share(3) for r in range(2)]  # grpo's groups, core_agent's prompts
    assert [list(b) for b in blocks] == [[0], [1, 2]] and list(DistContext().share(3)) == [0, 1, 2]


if __name__ == "__main__":
    _worker(sys.argv[1])
