"""The run report: a fake run directory (two stages, expert history, eval JSON, export files) rendered to
HTML, checked as text and, when Chromium is installed, loaded headless: every image decodes and the
screenshot is not blank."""

from __future__ import annotations

import json
import math
import re
import subprocess
from pathlib import Path

import numpy as np
import pytest

from rustforge.eval.report import find_stages, phases, read_stage, render_report, smooth, write_report

CHROMIUM = Path("/usr/bin/chromium")


def write_jsonl(path: Path, records: list[dict], tail: str = "") -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(r) + "\n" for r in records) + tail)


def fake_run(root: Path) -> Path:
    """A run dir as the pipeline leaves it: lang_rust (3-phase curriculum, expert monitor) and grpo."""
    rng = np.random.default_rng(0)
    run = root / "run"
    records, t0 = [], 1_700_000_000.0
    for step in range(1, 181):
        seq_len, phase = (256, 0) if step <= 120 else (512, 1) if step <= 160 else (1024, 2)
        loss = 2.2 + 3.5 * math.exp(-step / 35) + rng.normal(0, 0.08)
        records.append(
            {
                "step": step,
                "split": "train",
                "time": t0 + 2.5 * step,
                "loss": loss,
                "aux_loss": 0.012 + rng.normal(0, 0.001),
                "lr": 2e-3 * min(1, step / 10) * (0.55 + 0.45 * math.cos(math.pi * step / 180)),
                "grad_norm": abs(rng.normal(0.8, 0.2)),
                "tok_s": 4100 * 256 / seq_len**0.3 + rng.normal(0, 60),
                "seq_len": seq_len,
                "phase": phase,
                "packing_efficiency": 0.97,
                "memory_gb": 1.1 + 0.6 * phase,
            }
        )
        if step % 30 == 0 or step == 1:
            records.append(
                {
                    "step": step,
                    "split": "val",
                    "time": t0 + 2.5 * step,
                    "loss": 2.5 + 3.0 * math.exp(-step / 40),
                    "perplexity": 1.0,
                }
            )
        if step % 20 == 0:
            records.append(
                {"step": step, "split": "experts", "experts/entropy_min": 0.8, "experts/alarms": float(step >= 160)}
            )
    records.append({"step": 10, "split": "train", "loss": 4.0, "seq_len": 256})  # a resumed run re-logs step 10
    write_jsonl(
        run / "lang_rust" / "logs" / "metrics.jsonl", records, tail='{"step": 181, "split": "tr'
    )  # killed mid-write
    history = []
    for step in range(20, 181, 20):
        counts = rng.poisson(200, (4, 8))
        counts[3, 6] += 40 * step  # layer 3 slowly collapses onto expert 6
        counts[3, :2] = 0 if step > 120 else counts[3, :2]
        history.append({"step": step, "counts": counts.tolist()})
    write_jsonl(run / "lang_rust" / "logs" / "expert_load.jsonl", history)

    grpo = []
    for step in range(1, 61):
        mean = 0.2 + 0.5 * (1 - math.exp(-step / 20)) + rng.normal(0, 0.04)
        grpo.append(
            {
                "step": step,
                "split": "train",
                "time": t0 + 30 * step,
                "loss": 0.05 + rng.normal(0, 0.01),
                "reward": mean,
                "reward_std": 0.2,
                "reward/compiles": min(0.2, 0.1 + step / 300),
                "reward/tests_pass": 0.4 * mean,
                "lr": 1e-5 * (1 - step / 120),
                "grad_norm": 0.3,
            }
        )
    write_jsonl(run / "grpo" / "logs" / "metrics.jsonl", grpo)

    (run / "eval").mkdir()
    (run / "eval" / "base.json").write_text(
        json.dumps({"pass@1": 0.121, "compile_rate": 0.48, "heldout": {"loss": 2.41}})
    )
    (run / "eval" / "tuned.json").write_text(
        json.dumps({"pass@1": 0.337, "compile_rate": 0.81, "heldout": {"loss": 1.93}})
    )
    (run / "eval" / "per_task.json").write_text(
        json.dumps([{"task": "lru_cache", "passed": True, "tests": 12}, {"task": "trie", "passed": False, "tests": 9}])
    )
    for rel, size in (
        ("adapter/adapter_model.safetensors", 3 * 2**20),
        ("adapter/adapter_config.json", 900),
        ("merged/model-00001.safetensors", 12 * 2**20),
    ):
        path = run / "export" / rel
        path.parent.mkdir(parents=True, exist_ok=True)
        with open(path, "wb") as f:
            f.truncate(size)
    (run / "config.yaml").write_text(
        "model:\n  preset: tiny\n  expert_format: bf16\n  router_aux_loss_coef: 0.01\nlora:\n  r: 16\n"
    )
    return run


# ------------------------------------------------------------------------------------------ reading
def test_read_stage_merges_splits_keeps_last_record_and_skips_broken_lines(tmp_path):
    logs = read_stage(fake_run(tmp_path) / "lang_rust")
    assert len(logs.train) == 180 and logs.train[10]["loss"] == 4.0
    assert logs.train[20]["experts/alarms"] == 0.0 and logs.train[160]["experts/alarms"] == 1.0
    assert sorted(logs.val)[:3] == [1, 30, 60]
    assert logs.skipped_lines == 1
    assert sorted(logs.expert_history) == list(range(20, 181, 20))


def test_reads_what_the_metrics_logger_and_expert_monitor_write(tmp_path):
    import torch

    from rustforge.train.expert_monitor import ExpertMonitor, ExpertMonitorConfig
    from rustforge.train.metrics import MetricsLogger

    logs_dir = tmp_path / "run" / "core_agent" / "logs"
    logger = MetricsLogger(logs_dir, total_steps=4, progress=False)
    monitor = ExpertMonitor(2, 4, 2, ExpertMonitorConfig(every_steps=2), history_path=logs_dir / "expert_load.jsonl")
    for step in range(1, 5):
        logger.log(step, {"loss": 3.0 - 0.1 * step, "seq_len": 128, "lr": 1e-3 * step})
        monitor.update({0: torch.randn(16, 4), 1: torch.randn(16, 4)})
        if monitor.due(step):
            logger.log(step, monitor.end_interval(step), split="experts")
    logger.log(4, {"loss": 2.9}, split="val")
    logger.close()
    (stage,) = find_stages(tmp_path / "run")
    assert stage.name == "core_agent" and stage.skipped_lines == 0
    assert stage.series("loss")[1].tolist() == pytest.approx([2.9, 2.8, 2.7, 2.6])
    assert stage.train[4]["experts/alarms"] == 0.0 and "experts/L01/entropy" in stage.train[2]
    assert sorted(stage.expert_history) == [2, 4] and stage.expert_history[4].sum() == 2 * 32 * 2
    assert render_report(tmp_path / "run").count("<img ") == 3  # loss, dynamics, expert load


def test_find_stages_in_pipeline_order(tmp_path):
    run = fake_run(tmp_path)
    (run / "aaa_custom" / "logs").mkdir(parents=True)
    (run / "aaa_custom" / "logs" / "metrics.jsonl").write_text("")
    assert [s.name for s in find_stages(run)] == ["lang_rust", "grpo", "aaa_custom"]


def test_phases_and_smoothing(tmp_path):
    logs = read_stage(fake_run(tmp_path) / "lang_rust")
    assert phases(logs) == [(1, 120, 256), (121, 160, 512), (161, 180, 1024)]
    flat = np.full(50, 3.0)
    assert np.allclose(smooth(flat), 3.0)  # debiased: no ramp from zero
    noisy = np.random.default_rng(0).normal(0, 1, 400)
    assert smooth(noisy).std() < 0.5 * noisy.std()


# ------------------------------------------------------------------------------------------ the page
def test_report_has_every_section(tmp_path):
    run = fake_run(tmp_path)
    path = write_report(run)
    assert path == run / "report.html"
    page = path.read_text()
    images = re.findall(r"<img src='data:image/png;base64,([A-Za-z0-9+/=]+)'", page)
    assert len(images) == 6  # lang_rust: loss, dynamics, experts; grpo: loss, rewards, dynamics
    for section in (
        "Rust language SFT",
        "Reinforcement learning (GRPO)",
        "Evaluation",
        "Export",
        "Expert utilisation",
        "Rewards",
    ):
        assert section in page
    assert page.index("id='lang_rust'") < page.index("id='grpo'") < page.index("id='eval'") < page.index("id='export'")
    assert "0.337" in page and "heldout.loss" in page and "lru_cache" in page  # eval tables
    assert "12.0 MiB" in page and "15.0 MiB" in page  # a file and the export total
    assert "1 unreadable line(s)" in page
    assert "<b>model</b> tiny" in page and "<b>LoRA r</b> 16" in page
    assert "collapse" in page  # the expert-alarm card
    assert "constant: gradient norm 0.3" in page  # grpo's flat grad norm is a number, not a panel


def test_report_of_an_empty_run_and_a_missing_one(tmp_path):
    assert "No training logs yet" in render_report(tmp_path)
    with pytest.raises(FileNotFoundError, match="does not exist"):
        render_report(tmp_path / "nope")


def test_bad_eval_file_is_reported_not_fatal(tmp_path):
    (tmp_path / "eval").mkdir()
    (tmp_path / "eval" / "broken.json").write_text("{nope")
    (tmp_path / "eval" / "scalar.json").write_text("3")
    page = render_report(tmp_path)
    assert "broken.json: unreadable" in page and "scalar.json: expected a JSON object" in page


# -------------------------------------------------------------------------------------- in a browser
CHECK_IMAGES = """<script>
window.addEventListener('load', () => {
  const imgs = Array.from(document.images);
  const ok = imgs.filter(i => i.complete && i.naturalWidth > 0).length;
  const marker = document.createElement('pre');
  marker.id = 'image-check';
  marker.textContent = 'IMAGES-DECODED ' + ok + '/' + imgs.length;
  document.body.appendChild(marker);
});
</script></body>"""


def chromium(tmp_path: Path, *args: str) -> subprocess.CompletedProcess:
    profile = tmp_path / "chromium-profile"
    flags = [
        "--headless",
        "--no-sandbox",
        "--disable-gpu",
        "--disable-quic",
        "--no-first-run",
        "--disable-background-networking",
        "--disable-component-update",
        "--disable-sync",
        f"--user-data-dir={profile}",
        "--hide-scrollbars",
        "--virtual-time-budget=5000",
    ]
    return subprocess.run([str(CHROMIUM), *flags, *args], capture_output=True, text=True, timeout=120)


@pytest.mark.skipif(not CHROMIUM.exists(), reason="chromium not installed (apt-get install chromium)")
def test_report_renders_in_headless_chromium(tmp_path):
    from PIL import Image

    report = write_report(fake_run(tmp_path))
    probe = report.with_name("probe.html")
    probe.write_text(report.read_text().replace("</body>", CHECK_IMAGES))
    dom = chromium(tmp_path, "--dump-dom", probe.as_uri())
    assert "IMAGES-DECODED 6/6" in dom.stdout, dom.stderr[-2000:]

    shot = tmp_path / "report.png"
    chromium(tmp_path, f"--screenshot={shot}", "--window-size=1280,2400", report.as_uri())
    pixels = np.asarray(Image.open(shot).convert("RGB"), dtype=np.float64)
    assert pixels.shape[:2] == (2400, 1280)
    colours = len(np.unique(pixels.reshape(-1, 3)[::7], axis=0))
    assert pixels.std() > 20 and colours > 200  # header gradient, cards, charts: not a blank page
