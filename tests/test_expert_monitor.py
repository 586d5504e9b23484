"""Expert-utilisation monitor: each metric on hand-made router logits, alarms with patience, drift, the
history file, plots, and two short trainings of the tiny GPT-OSS (a healthy router and a skewed one)."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch

from rustforge.train.expert_monitor import (
    ExpertMonitor,
    ExpertMonitorConfig,
    layer_metrics,
    load_factors,
    plot_load_heatmap,
    probe_model_routing,
    read_load_history,
    routing_counts,
    routing_drift,
)

E, K = 8, 2


def one_hot_logits(n: int, expert: int, strength: float = 20.0) -> torch.Tensor:
    """n tokens whose router strongly prefers `expert` (second choice: expert+1, mildly)."""
    logits = torch.zeros(n, E)
    logits[:, expert] = strength
    logits[:, (expert + 1) % E] = 1.0
    return logits


def balanced_logits(n: int, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, E, generator=g) * 0.5


# ------------------------------------------------------------------------------------------ metrics
def test_routing_counts_are_top_k_over_raw_logits_and_skip_masked_tokens():
    logits = torch.tensor([[5.0, 4.0, 0.0, 0.0], [0.0, 1.0, 3.0, 2.0], [9.0, 9.5, 0.0, 0.0]])
    valid = torch.tensor([True, True, False])
    counts, entropy, tokens = routing_counts({0: logits}, valid, num_layers=2, num_experts=4, top_k=2)
    assert counts.tolist() == [[1, 1, 1, 1], [0, 0, 0, 0]]
    assert tokens.tolist() == [2, 0]
    expected = sum(float(torch.distributions.Categorical(logits=row).entropy()) for row in logits[:2])
    assert float(entropy[0]) == pytest.approx(expected, rel=1e-6)


def test_routing_counts_accepts_batch_shaped_mask_and_rejects_mismatches():
    logits = torch.zeros(6, E)
    counts, _, tokens = routing_counts({1: logits}, torch.ones(2, 3, dtype=torch.bool), 2, E, K)
    assert int(tokens[1]) == 6 and int(counts[1].sum()) == 6 * K
    with pytest.raises(ValueError, match="valid_mask: 5 tokens"):
        routing_counts({0: logits}, torch.ones(5, dtype=torch.bool), 2, E, K)
    with pytest.raises(ValueError, match="layer 3 out of range"):
        routing_counts({3: logits}, None, 2, E, K)
    with pytest.raises(ValueError, match="4 experts, expected 8"):
        routing_counts({0: torch.zeros(6, 4)}, None, 2, E, K)


def test_layer_metrics_even_load():
    m = layer_metrics(np.array([4, 4, 4, 4]), entropy_sum=10 * math.log(4), tokens=10)
    assert m == pytest.approx(
        {"load_cv": 0.0, "max_min_ratio": 1.0, "idle_fraction": 0.0, "entropy": 1.0, "max_share": 0.25, "overload": 1.0}
    )


def test_layer_metrics_collapsed_load_guards_zero_minimum():
    m = layer_metrics(np.array([8, 0, 0, 0]), entropy_sum=0.0, tokens=8)
    assert m["load_cv"] == pytest.approx(math.sqrt(12) / 2)  # std 3.46 over mean 2
    assert m["max_min_ratio"] == 8.0  # the idle minimum counts as one token, not a division by zero
    assert m["idle_fraction"] == 0.75
    assert m["entropy"] == 0.0
    assert m["max_share"] == 1.0 and m["overload"] == 4.0


def test_routing_drift_total_variation_and_js():
    same = routing_drift(np.array([[3, 1]]), np.array([[6, 2]]))
    assert same["tv"][0] == pytest.approx(0.0) and same["js"][0] == pytest.approx(0.0)
    disjoint = routing_drift(np.array([[5, 0]]), np.array([[0, 5]]))
    assert disjoint["tv"][0] == pytest.approx(1.0) and disjoint["js"][0] == pytest.approx(1.0)
    half = routing_drift(torch.tensor([[1, 1]]), torch.tensor([[4, 0]]))
    kl = lambda p, q: sum(a * math.log2(a / b) for a, b in zip(p, q, strict=True) if a > 0)  # noqa: E731
    m = [0.75, 0.25]
    assert half["tv"][0] == pytest.approx(0.5)
    assert half["js"][0] == pytest.approx(0.5 * kl([0.5, 0.5], m) + 0.5 * kl([1.0, 0.0], m))
    empty = routing_drift(np.zeros((1, 2)), np.array([[1, 1]]))
    assert empty["tv"][0] == 0.0
    with pytest.raises(ValueError, match="differ in shape"):
        routing_drift(np.ones((2, 3)), np.ones((2, 4)))


def test_load_factors_are_multiples_of_fair_share():
    assert load_factors(np.array([[2, 2, 0, 4]])).tolist() == [[1.0, 1.0, 0.0, 2.0]]
    assert load_factors(np.zeros((1, 3))).tolist() == [[0.0, 0.0, 0.0]]


# ------------------------------------------------------------------------------------------- alarms
def run_intervals(monitor: ExpertMonitor, per_layer: list[torch.Tensor], intervals: int) -> list[list[str]]:
    alarms = []
    for i in range(intervals):
        monitor.update(dict(enumerate(per_layer)))
        monitor.end_interval(step=i + 1)
        alarms.append(monitor.alarms())
    return alarms


def test_collapse_alarms_after_patience_intervals_and_names_layer_and_expert():
    monitor = ExpertMonitor(2, E, K, ExpertMonitorConfig(every_steps=1, patience=3))
    alarms = run_intervals(monitor, [balanced_logits(256), one_hot_logits(256, expert=3)], intervals=4)
    assert alarms[0] == [] and alarms[1] == []
    overload, entropy, idle = alarms[2]  # all three conditions of layer 1; layer 0 stays quiet
    assert overload.startswith("layer 1: expert 3 overloaded: 4.0x its fair share")
    assert entropy.startswith("layer 1: router entropy collapsed") and "expert 3 dominates" in entropy
    assert idle.startswith("layer 1: 6/8 experts idle") and "experts 0, 1, 2, 5, 6, 7" in idle
    assert "for 4 intervals" in alarms[3][0]


def test_a_healthy_interval_resets_the_streak():
    monitor = ExpertMonitor(1, E, K, ExpertMonitorConfig(every_steps=1, patience=2))
    assert run_intervals(monitor, [one_hot_logits(64, 5)], 1) == [[]]
    assert run_intervals(monitor, [balanced_logits(256)], 1) == [[]]
    assert run_intervals(monitor, [one_hot_logits(64, 5)], 1) == [[]]
    assert len(run_intervals(monitor, [one_hot_logits(64, 5)], 1)[0]) == 3


def test_overload_below_every_token_alarms_above_factor():
    # 20B-like router (32 experts, top-4): expert 0 is in 3 of 4 tokens' top-4 = 6x its fair share;
    # the other picks rotate over experts 1..31
    logits = torch.zeros(400, 32)
    for t in range(400):
        for j in range(4):
            logits[t, 1 + (4 * t + j) % 31] = 5.0 - 0.1 * j
        if t % 4:
            logits[t, 0] = 10.0
    monitor = ExpertMonitor(
        1, 32, 4, ExpertMonitorConfig(every_steps=1, patience=1, overload_factor=4.0, idle_fraction_max=1.0)
    )
    monitor.update({0: logits})
    metrics = monitor.end_interval(1)
    assert metrics["experts/L00/overload"] == pytest.approx(6.0)
    assert [a for a in monitor.alarms() if "overloaded" in a] and "expert 0" in monitor.alarms()[0]


def test_idle_experts_alarm_lists_them():
    logits = torch.full((100, E), -5.0)
    logits[:, :4] = torch.randn(100, 4)  # experts 4..7 never chosen
    monitor = ExpertMonitor(1, E, K, ExpertMonitorConfig(every_steps=1, patience=1, entropy_floor=0.0))
    monitor.update({0: logits})
    monitor.end_interval(1)
    (alarm,) = [a for a in monitor.alarms() if "idle" in a]
    assert "4/8 experts idle" in alarm and "experts 4, 5, 6, 7" in alarm


def test_drift_from_probe_base_alarms_and_reports_metrics():
    monitor = ExpertMonitor(2, E, K, ExpertMonitorConfig(every_steps=1, patience=1, drift_max=0.3))
    base = np.full((2, E), 10)
    monitor.set_probe_base(base)
    monitor.update({0: balanced_logits(256), 1: balanced_logits(256, seed=1)})
    drifted = base.copy()
    drifted[1] = [80, 0, 0, 0, 0, 0, 0, 0]
    metrics = monitor.end_interval(1, probe_counts=drifted)
    assert metrics["experts/L00/drift_tv"] == pytest.approx(0.0)
    assert metrics["experts/L01/drift_tv"] == pytest.approx(7 / 8)
    assert metrics["experts/drift_tv_max"] == pytest.approx(7 / 8)
    (alarm,) = monitor.alarms()
    assert alarm.startswith("layer 1: routing drifted") and "expert 0 moved most (12% -> 100%)" in alarm
    with pytest.raises(ValueError, match="shape"):
        monitor.set_probe_base(np.ones((3, E)))


def test_an_interval_without_probe_keeps_the_drift_streak():
    monitor = ExpertMonitor(1, E, K, ExpertMonitorConfig(every_steps=1, patience=2, drift_max=0.3))
    monitor.set_probe_base(np.full((1, E), 10))
    drifted = np.array([[80, 0, 0, 0, 0, 0, 0, 0]])
    alarms = []
    for step, probe in enumerate([drifted, None, drifted], 1):
        monitor.update({0: balanced_logits(256, seed=step)})
        monitor.end_interval(step, probe_counts=probe)
        alarms.append(monitor.alarms())
    assert alarms[0] == [] and alarms[1] == []
    (alarm,) = alarms[2]
    assert alarm.startswith("layer 0: routing drifted") and alarm.endswith("for 2 intervals")


def test_stop_on_alarm_and_due():
    cfg = ExpertMonitorConfig(every_steps=5, patience=1, stop_on_alarm=True)
    monitor = ExpertMonitor(1, E, K, cfg)
    assert [s for s in range(0, 16) if monitor.due(s)] == [5, 10, 15]
    assert not monitor.should_stop
    run_intervals(monitor, [one_hot_logits(32, 0)], 1)
    assert monitor.should_stop
    assert not ExpertMonitor(1, E, K, ExpertMonitorConfig(every_steps=0)).due(10)


def test_state_dict_resumes_streaks_and_probe_base():
    cfg = ExpertMonitorConfig(every_steps=1, patience=2)
    monitor = ExpertMonitor(1, E, K, cfg)
    monitor.set_probe_base(np.full((1, E), 3))
    run_intervals(monitor, [one_hot_logits(64, 2)], 1)  # one bad interval: streak 1, no alarm yet
    resumed = ExpertMonitor(1, E, K, cfg)
    resumed.load_state_dict(json.loads(json.dumps(monitor.state_dict())))  # it goes through a checkpoint
    assert resumed.base_counts.tolist() == [[3] * E]
    assert len(run_intervals(resumed, [one_hot_logits(64, 2)], 1)[0]) == 3  # the streak carried over


def test_config_validation_names_the_field():
    with pytest.raises(ValueError, match="ExpertMonitorConfig.entropy_floor"):
        ExpertMonitorConfig(entropy_floor=1.5)
    with pytest.raises(ValueError, match="ExpertMonitorConfig.patience"):
        ExpertMonitorConfig(patience=0)
    with pytest.raises(ValueError, match="top_k"):
        ExpertMonitor(1, 4, 5)


def test_interval_metrics_summaries_and_layers_without_tokens():
    monitor = ExpertMonitor(3, E, K)
    monitor.update({0: balanced_logits(128), 2: one_hot_logits(128, 1)})
    m = monitor.interval_metrics()
    assert not any(k.startswith("experts/L01/") for k in m)
    assert m["experts/entropy_min"] == m["experts/L02/entropy"] < 0.01
    assert m["experts/overload_max"] == m["experts/L02/overload"] == pytest.approx(4.0)


# -------------------------------------------------------------------------------- history and plots
def test_history_file_heatmap_and_tensorboard(tmp_path):
    from PIL import Image
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
    from torch.utils.tensorboard import SummaryWriter

    monitor = ExpertMonitor(
        2, E, K, ExpertMonitorConfig(every_steps=10), history_path=tmp_path / "logs" / "expert_load.jsonl"
    )
    for step in (10, 20, 30):
        monitor.update({0: balanced_logits(200, seed=step), 1: one_hot_logits(200, step // 10)})
        monitor.end_interval(step)
    history = read_load_history(tmp_path / "logs" / "expert_load.jsonl")
    assert list(history) == [10, 20, 30]
    assert all(np.array_equal(history[s], monitor.history[s]) for s in history)
    assert history[20][1, 2] == 200

    png = plot_load_heatmap(history, tmp_path / "heat.png")
    pixels = np.asarray(Image.open(png).convert("RGB"), dtype=np.float64)
    assert pixels.shape[0] > 200 and pixels.shape[1] > 300 and pixels.std() > 10
    with pytest.raises(ValueError, match="empty"):
        plot_load_heatmap({}, tmp_path / "none.png")

    writer = SummaryWriter(str(tmp_path / "tb"))
    monitor.write_tensorboard(writer, 30)
    writer.close()
    events = EventAccumulator(str(tmp_path / "tb"), size_guidance={"histograms": 0})
    events.Reload()
    assert sorted(events.Tags()["histograms"]) == ["experts/L00/tokens_per_expert", "experts/L01/tokens_per_expert"]
    (hist,) = events.Histograms("experts/L01/tokens_per_expert")
    assert hist.step == 30 and hist.histogram_value.num == 400
    assert list(hist.histogram_value.bucket)[3] == 200  # expert 3 got every token's first choice


def test_history_reader_names_bad_line(tmp_path):
    path = tmp_path / "expert_load.jsonl"
    path.write_text('{"step": 1, "counts": [[1, 2]]}\n{"oops": 1}\n')
    with pytest.raises(ValueError, match="expert_load.jsonl:2"):
        read_load_history(path)


# ------------------------------------------------------------------------------- the tiny GPT-OSS
@pytest.fixture
def one_thread():
    """Tiny shapes gain nothing from a second thread, and on a loaded machine OpenMP's spinning makes
    two threads ~10x slower."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def tiny_gptoss(vocab: int = 64):
    from transformers import GptOssForCausalLM

    from rustforge.model.presets import get_preset, hf_config

    cfg = hf_config(get_preset("tiny"), vocab_size=vocab, router_aux_loss_coef=0.0)
    cfg._attn_implementation = "eager"
    torch.manual_seed(0)
    return GptOssForCausalLM(cfg)


def train_and_monitor(model, cfg: ExpertMonitorConfig, steps: int = 6) -> list[list[str]]:
    """A few full-parameter steps with the aux loss off; the monitor reads router logits from hooks."""
    router_logits = {}
    for i, layer in enumerate(model.model.layers):
        layer.mlp.router.register_forward_hook(lambda _m, _i, out, i=i: router_logits.__setitem__(i, out[0]))
    monitor = ExpertMonitor.for_model(model.config, cfg)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    g = torch.Generator().manual_seed(1)
    alarms = []
    for step in range(1, steps + 1):
        ids = torch.randint(0, model.config.vocab_size, (4, 32), generator=g)
        valid = torch.ones_like(ids, dtype=torch.bool)
        valid[:, -4:] = False  # padding: not counted
        out = model(input_ids=ids, labels=ids)
        out.loss.backward()
        opt.step()
        opt.zero_grad()
        monitor.update(router_logits, valid)
        if monitor.due(step):
            monitor.end_interval(step)
            alarms.append(monitor.alarms())
    assert sum(int(c.sum()) for c in monitor.history.values()) == 4 * (4 * 28 * 2) * steps  # layers x tokens x top-k
    return alarms


def test_tiny_gptoss_healthy_router_raises_no_alarm(one_thread):
    alarms = train_and_monitor(tiny_gptoss(), ExpertMonitorConfig(every_steps=2, patience=2))
    assert alarms == [[], [], []]


def test_tiny_gptoss_skewed_router_alarms_on_that_layer_and_expert(one_thread):
    model = tiny_gptoss()
    with torch.no_grad():
        model.model.layers[2].mlp.router.bias[5] += 12.0  # layer 2 sends every token to expert 5
    alarms = train_and_monitor(model, ExpertMonitorConfig(every_steps=2, patience=2))
    assert alarms[0] == []  # patience: one bad interval is not yet an alarm
    assert alarms[1] and alarms[2]
    assert all(a.startswith("layer 2: ") for a in alarms[1] + alarms[2])
    assert any("expert 5 overloaded" in a for a in alarms[1]) and any("expert 5 dominates" in a for a in alarms[1])


def test_probe_model_routing_on_rustforge_model(one_thread):
    from rustforge.config import ModelConfig
    from rustforge.model.gptoss import build_model

    model = build_model(ModelConfig(preset="tiny", attention="eager", experts="reference"), None, vocab_size=64)
    ids = torch.randint(0, 64, (2, 16), generator=torch.Generator().manual_seed(0))
    doc_ids = torch.zeros_like(ids)
    doc_ids[1, 10:] = -1  # padding
    batch = {"input_ids": ids, "position_ids": torch.arange(16).expand(2, 16), "doc_ids": doc_ids}
    model.train()
    counts = probe_model_routing(model, [batch])
    assert model.training
    assert counts.shape == (4, 8) and counts.sum(1).tolist() == [26 * 2] * 4
    again = probe_model_routing(model, [batch])
    assert routing_drift(counts, again)["tv"].max() == 0.0
