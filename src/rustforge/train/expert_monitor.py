"""Expert-utilisation monitoring for MoE fine-tuning: load balance, router entropy, collapse alarms, drift.

A LoRA fine-tune can quietly collapse a GPT-OSS layer onto a few experts (the aux loss is weak by design:
a strong one fights the pretrained router). `ExpertMonitor` watches the router logits that
`RustforgeModel` keeps from each forward and, per interval of `every_steps` optimizer steps, reports per
layer:

- load_cv: coefficient of variation of the tokens each expert received (0 = perfectly even);
- max_min_ratio: busiest / least busy expert (the least busy counted as >= 1 token, so idle experts give a
  large finite number instead of inf);
- idle_fraction: share of experts that received no token;
- entropy: mean entropy of the full softmax over experts, as a fraction of log(E) (1 = uniform);
- max_share: the busiest expert's share of the layer's top-k assignments (fair share = 1/E);
- overload: max_share * E, i.e. the busiest expert's load as a multiple of its fair share. With top-k
  routing an expert can receive at most every token, so overload <= E/k (4 for the tiny model's 8 experts
  top-2, 8 for GPT-OSS-20B's 32 top-4).

Counts follow GPT-OSS routing: top-k over the raw logits (the softmax over the top-k only weighs them).
Alarms fire when a condition holds for `patience` consecutive intervals: overload above
`overload_factor` (or one expert receiving every token: the most a top-k router can collapse), entropy
below `entropy_floor`, idle share above `idle_fraction_max`, or routing drift from the base model above
`drift_max` (total variation on a fixed probe batch; the base routing is that probe run once with the LoRA
switched off -- model/lora.lora_disabled -- so a stage that starts from an earlier stage's adapter measures
drift from the base model, not from that adapter).

Plots use matplotlib (the object API, no pyplot global state); TensorBoard histograms go through the
SummaryWriter the metrics logger already holds. Own code because no library watches MoE routing of a
PyTorch model under training.
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Callable, Mapping

import numpy as np
import torch

from rustforge.config import ExpertMonitorConfig

HISTORY_FILE = "expert_load.jsonl"  # in <stage>/logs/, next to metrics.jsonl


# ExpertMonitorConfig lives in rustforge.config with every other default.


# ------------------------------------------------------------------------------------------ counting
def routing_counts(
    router_logits: Mapping[int, torch.Tensor],
    valid_mask: torch.Tensor | None,
    num_layers: int,
    num_experts: int,
    top_k: int,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Per layer: top-k assignment counts [L, E] (int64), summed router entropy in nats [L], valid tokens [L].

    `router_logits[layer]` is [N, E] (or [..., E]); `valid_mask` is N booleans (any shape with N elements,
    e.g. [B, T]) or None for all tokens. Tensors stay on the logits' device (no host sync)."""
    device = next(iter(router_logits.values())).device if router_logits else torch.device("cpu")
    counts = torch.zeros(num_layers, num_experts, dtype=torch.int64, device=device)
    entropy = torch.zeros(num_layers, dtype=torch.float64, device=device)
    tokens = torch.zeros(num_layers, dtype=torch.int64, device=device)
    for layer, logits in router_logits.items():
        if not 0 <= layer < num_layers:
            raise ValueError(f"router_logits: layer {layer} out of range for a {num_layers}-layer model")
        logits = logits.detach().reshape(-1, logits.shape[-1]).float()
        if logits.shape[1] != num_experts:
            raise ValueError(f"router_logits[{layer}]: {logits.shape[1]} experts, expected {num_experts}")
        if valid_mask is not None:
            mask = valid_mask.reshape(-1).to(device=logits.device, dtype=torch.bool)
            if mask.numel() != logits.shape[0]:
                raise ValueError(f"valid_mask: {mask.numel()} tokens but router_logits[{layer}] has {logits.shape[0]}")
            logits = logits[mask]
        chosen = logits.topk(top_k, dim=-1).indices.flatten()
        counts[layer] += torch.bincount(chosen, minlength=num_experts)
        logp = torch.log_softmax(logits, dim=-1)
        entropy[layer] += -(logp.exp() * logp).sum().double()
        tokens[layer] += logits.shape[0]
    return counts, entropy, tokens


def layer_metrics(counts: np.ndarray, entropy_sum: float, tokens: int) -> dict[str, float]:
    """The flat metrics of one layer from its expert counts [E], summed entropy (nats) and token count."""
    counts = np.asarray(counts, dtype=np.float64)
    num_experts = counts.shape[0]
    total = counts.sum()
    mean = total / num_experts
    return {
        "load_cv": float(counts.std() / mean) if mean > 0 else 0.0,
        "max_min_ratio": float(counts.max() / max(counts.min(), 1.0)),
        "idle_fraction": float((counts == 0).mean()),
        "entropy": float(entropy_sum / tokens / math.log(num_experts)) if tokens else 0.0,
        "max_share": float(counts.max() / total) if total else 0.0,
        "overload": float(counts.max() / mean) if mean > 0 else 0.0,
    }


def routing_drift(base_counts, current_counts) -> dict[str, np.ndarray]:
    """Per-layer distance between two load distributions [L, E]: total variation "tv" in [0, 1] and
    Jensen-Shannon divergence "js" in bits, in [0, 1]. Layers without tokens on either side give 0."""
    p, q = _shares(base_counts), _shares(current_counts)
    if p.shape != q.shape:
        raise ValueError(f"routing_drift: base counts {p.shape} and current counts {q.shape} differ in shape")
    empty = (p.sum(1) == 0) | (q.sum(1) == 0)
    tv = 0.5 * np.abs(p - q).sum(1)
    m = 0.5 * (p + q)
    js = 0.5 * _kl_bits(p, m) + 0.5 * _kl_bits(q, m)
    tv[empty], js[empty] = 0.0, 0.0
    return {"tv": tv, "js": np.clip(js, 0.0, 1.0)}


def _shares(counts) -> np.ndarray:
    c = np.asarray(counts.cpu() if isinstance(counts, torch.Tensor) else counts, dtype=np.float64)
    total = c.sum(axis=1, keepdims=True)
    return np.divide(c, total, out=np.zeros_like(c), where=total > 0)


def _kl_bits(p: np.ndarray, q: np.ndarray) -> np.ndarray:
    ratio = np.divide(p, q, out=np.ones_like(p), where=(p > 0) & (q > 0))
    return (p * np.log2(ratio)).sum(1)


@torch.no_grad()
def probe_counts(
    forward: Callable[[], Mapping[int, torch.Tensor]],
    valid_mask: torch.Tensor | None,
    num_experts: int,
    top_k: int,
    num_layers: int,
) -> torch.Tensor:
    """Top-k counts [L, E] (CPU int64) of one probe forward: `forward()` runs the model on the probe batch
    and returns its router logits per layer."""
    counts, _, _ = routing_counts(forward(), valid_mask, num_layers, num_experts, top_k)
    return counts.cpu()


@torch.no_grad()
def probe_model_routing(model, batches: list[dict[str, torch.Tensor]]) -> torch.Tensor:
    """Counts [L, E] of a `RustforgeModel` on fixed probe batches (input_ids, position_ids, doc_ids on the
    model's device); padding (doc_ids < 0) is left out. Train/eval mode is restored afterwards."""
    cfg = model.config
    was_training = model.training
    model.eval()
    total = torch.zeros(cfg.num_hidden_layers, cfg.num_local_experts, dtype=torch.int64)
    try:
        for b in batches:

            def forward(b=b):
                model.hidden_states(b["input_ids"], b["position_ids"], b["doc_ids"])
                return model.router_logits

            total += probe_counts(
                forward, b["doc_ids"] >= 0, cfg.num_local_experts, cfg.num_experts_per_tok, cfg.num_hidden_layers
            )
    finally:
        model.train(was_training)
    return total


# ------------------------------------------------------------------------------------------- monitor
class ExpertMonitor:
    """Accumulates routing statistics step by step; `end_interval(step)` closes an interval, updates the
    alarms and appends the interval's load to the history (and to `history_path`, if given)."""

    def __init__(
        self,
        num_layers: int,
        num_experts: int,
        top_k: int,
        cfg: ExpertMonitorConfig | None = None,
        history_path: Path | str | None = None,
    ):
        if not 0 < top_k <= num_experts:
            raise ValueError(f"ExpertMonitor: top_k {top_k} must be in [1, num_experts={num_experts}]")
        self.num_layers, self.num_experts, self.top_k = num_layers, num_experts, top_k
        self.cfg = cfg or ExpertMonitorConfig()
        self.history_path = Path(history_path) if history_path else None
        self.history: dict[int, np.ndarray] = {}  # step -> counts [L, E] of the interval ending there
        self.base_counts: np.ndarray | None = None
        self._streaks: dict[tuple[int, str], int] = {}
        self._alarms: list[str] = []
        self._reset()

    @classmethod
    def for_model(cls, hf_config, cfg: ExpertMonitorConfig | None = None, history_path=None) -> ExpertMonitor:
        return cls(
            hf_config.num_hidden_layers, hf_config.num_local_experts, hf_config.num_experts_per_tok, cfg, history_path
        )

    def _reset(self) -> None:
        self._counts = self._entropy = self._tokens = None

    def due(self, step: int) -> bool:
        """Whether the interval ends after optimizer step `step` (1-based)."""
        return self.cfg.every_steps > 0 and step > 0 and step % self.cfg.every_steps == 0

    def update(self, router_logits: Mapping[int, torch.Tensor], valid_mask: torch.Tensor | None = None) -> None:
        """Add one forward's routing (call after each micro-batch forward, before the next overwrites it)."""
        if not router_logits:
            return
        counts, entropy, tokens = routing_counts(
            router_logits, valid_mask, self.num_layers, self.num_experts, self.top_k
        )
        if self._counts is None:
            self._counts, self._entropy, self._tokens = counts, entropy, tokens
        else:
            self._counts += counts.to(self._counts.device)
            self._entropy += entropy.to(self._counts.device)
            self._tokens += tokens.to(self._counts.device)

    def interval_counts(self) -> np.ndarray:
        if self._counts is None:
            return np.zeros((self.num_layers, self.num_experts), dtype=np.int64)
        return self._counts.cpu().numpy()

    def interval_metrics(self) -> dict[str, float]:
        """Flat metrics of the current interval: experts/L{ll}/{metric} per layer with tokens, plus the
        worst value over layers (experts/load_cv_max, experts/entropy_min, ...)."""
        counts = self.interval_counts()
        entropy = self._entropy.cpu().numpy() if self._entropy is not None else np.zeros(self.num_layers)
        tokens = self._tokens.cpu().numpy() if self._tokens is not None else np.zeros(self.num_layers, dtype=np.int64)
        out: dict[str, float] = {}
        per_layer = []
        for layer in range(self.num_layers):
            if tokens[layer] == 0:
                continue
            m = layer_metrics(counts[layer], float(entropy[layer]), int(tokens[layer]))
            per_layer.append(m)
            out.update({f"experts/L{layer:02d}/{k}": v for k, v in m.items()})
        if per_layer:
            for key in ("load_cv", "max_min_ratio", "idle_fraction", "max_share", "overload"):
                out[f"experts/{key}_max"] = max(m[key] for m in per_layer)
            out["experts/entropy_min"] = min(m["entropy"] for m in per_layer)
        return out

    def set_probe_base(self, counts) -> None:
        """The base model's probe counts [L, E] (the probe run under model/lora.lora_disabled)."""
        base = np.asarray(counts.cpu() if isinstance(counts, torch.Tensor) else counts, dtype=np.int64)
        if base.shape != (self.num_layers, self.num_experts):
            raise ValueError(f"probe base counts: shape {base.shape}, expected {(self.num_layers, self.num_experts)}")
        self.base_counts = base

    def end_interval(self, step: int, probe_counts=None) -> dict[str, float]:
        """Close the interval ending at `step`: metrics (with drift if `probe_counts` and a base are given),
        alarm update, history; then start a new interval."""
        metrics = self.interval_metrics()
        counts = self.interval_counts()
        drift = None
        if probe_counts is not None and self.base_counts is not None:
            drift = routing_drift(self.base_counts, probe_counts)
            drift["probe_shares"] = _shares(probe_counts)
            for layer in range(self.num_layers):
                metrics[f"experts/L{layer:02d}/drift_tv"] = float(drift["tv"][layer])
                metrics[f"experts/L{layer:02d}/drift_js"] = float(drift["js"][layer])
            metrics["experts/drift_tv_max"] = float(drift["tv"].max())
            metrics["experts/drift_js_max"] = float(drift["js"].max())
        self._alarms = self._update_alarms(metrics, counts, drift)
        metrics["experts/alarms"] = float(len(self._alarms))
        self.history[step] = counts
        if self.history_path is not None:
            append_load_record(self.history_path, step, counts)
        self._reset()
        return metrics

    def alarms(self) -> list[str]:
        """Alarms standing after the last closed interval (conditions held for `patience` intervals)."""
        return list(self._alarms)

    @property
    def should_stop(self) -> bool:
        return self.cfg.stop_on_alarm and bool(self._alarms)

    def state_dict(self) -> dict:
        """What a resume needs (the probe base and the alarm streaks); the history lives in its file."""
        return {
            "base_counts": None if self.base_counts is None else self.base_counts.tolist(),
            "streaks": [[layer, name, n] for (layer, name), n in self._streaks.items()],
        }

    def load_state_dict(self, state: dict) -> None:
        if state.get("base_counts") is not None:
            self.set_probe_base(np.asarray(state["base_counts"]))
        self._streaks = {(int(layer), str(name)): int(n) for layer, name, n in state.get("streaks", [])}

    # -------------------------------------------------------------------------------------- alarms
    def _update_alarms(self, metrics: dict[str, float], counts: np.ndarray, drift) -> list[str]:
        alarms = []
        for layer in range(self.num_layers):
            key = f"experts/L{layer:02d}/"
            if key + "entropy" not in metrics:  # no tokens this interval: streaks carry over unchanged
                continue
            conditions = self._conditions(
                layer, {k[len(key) :]: v for k, v in metrics.items() if k.startswith(key)}, counts[layer], drift
            )
            for name, message in conditions.items():
                streak = self._streaks.get((layer, name), 0) + 1 if message else 0
                self._streaks[(layer, name)] = streak
                if message and streak >= self.cfg.patience:
                    alarms.append(f"{message} for {streak} interval{'s' if streak > 1 else ''}")
        return alarms

    def _conditions(self, layer: int, m: dict[str, float], counts: np.ndarray, drift) -> dict[str, str | None]:
        """Condition name -> alarm message when it holds this interval, else None (drift only when measured)."""
        cfg, E = self.cfg, self.num_experts
        busiest = int(counts.argmax())
        every_token = counts[busiest] * self.top_k >= counts.sum()  # got all of the layer's tokens
        out: dict[str, str | None] = {"overload": None, "entropy": None, "idle": None}
        if m["overload"] > cfg.overload_factor or every_token:
            out["overload"] = (
                f"layer {layer}: expert {busiest} overloaded: {m['overload']:.1f}x its fair share "
                f"({m['max_share']:.0%} of top-{self.top_k} assignments, fair {1 / E:.1%}; limit {cfg.overload_factor:g}x)"
            )
        if m["entropy"] < cfg.entropy_floor:
            out["entropy"] = (
                f"layer {layer}: router entropy collapsed to {m['entropy']:.2f} of log({E}) "
                f"(floor {cfg.entropy_floor:g}); expert {busiest} dominates ({m['max_share']:.0%} of assignments)"
            )
        if m["idle_fraction"] > cfg.idle_fraction_max:
            idle = [int(e) for e in np.flatnonzero(counts == 0)]
            out["idle"] = (
                f"layer {layer}: {len(idle)}/{E} experts idle ({m['idle_fraction']:.0%} > {cfg.idle_fraction_max:.0%}): "
                f"experts {_short_list(idle)}"
            )
        if drift is not None:
            out["drift"] = None
        if drift is not None and drift["tv"][layer] > cfg.drift_max:
            base, now = _shares(self.base_counts)[layer], drift["probe_shares"][layer]
            moved = int(np.abs(now - base).argmax())
            out["drift"] = (
                f"layer {layer}: routing drifted from the base model (total variation {drift['tv'][layer]:.2f} > "
                f"{cfg.drift_max:g}); expert {moved} moved most ({base[moved]:.0%} -> {now[moved]:.0%})"
            )
        return out

    # ------------------------------------------------------------------------------------- output
    def write_tensorboard(self, writer, step: int, counts: np.ndarray | None = None) -> None:
        """Histograms of routed tokens over expert index, one per layer (the last interval by default)."""
        if counts is None:
            if not self.history:
                return
            counts = self.history[max(self.history)]
        add_load_histograms(writer, step, counts)


def _short_list(items: list[int], limit: int = 12) -> str:
    text = ", ".join(map(str, items[:limit]))
    return text + (f", ... ({len(items) - limit} more)" if len(items) > limit else "")


# ----------------------------------------------------------------------------------- history file
def append_load_record(path: Path | str, step: int, counts) -> None:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "a") as f:
        f.write(json.dumps({"step": int(step), "counts": np.asarray(counts).astype(int).tolist()}) + "\n")


def read_load_history(path: Path | str) -> dict[int, np.ndarray]:
    """step -> counts [L, E]; the last record of a step wins (a resumed run re-logs steps)."""
    out: dict[int, np.ndarray] = {}
    with open(path) as f:
        for n, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                rec = json.loads(line)
                out[int(rec["step"])] = np.asarray(rec["counts"], dtype=np.int64)
            except (ValueError, KeyError, TypeError) as e:
                raise ValueError(f"{path}:{n}: not an expert-load record ({e})") from None
    return dict(sorted(out.items()))


# ------------------------------------------------------------------------------------------ plots
def add_load_histograms(writer, step: int, counts) -> None:
    """One TensorBoard histogram per layer over expert index (bucket e holds expert e's routed tokens)."""
    counts = np.asarray(counts, dtype=np.float64)
    idx = np.arange(counts.shape[1], dtype=np.float64)
    for layer, c in enumerate(counts):
        total = c.sum()
        if total == 0:
            continue
        nonzero = np.flatnonzero(c)
        writer.add_histogram_raw(
            f"experts/L{layer:02d}/tokens_per_expert",
            min=float(idx[nonzero[0]]),
            max=float(idx[nonzero[-1]]),
            num=int(total),
            sum=float((idx * c).sum()),
            sum_squares=float((idx**2 * c).sum()),
            bucket_limits=(idx + 0.5).tolist(),
            bucket_counts=c.tolist(),
            global_step=step,
        )


def load_factors(counts: np.ndarray) -> np.ndarray:
    """Counts [..., E] as multiples of the fair share (1 = even load, 0 = idle)."""
    counts = np.asarray(counts, dtype=np.float64)
    total = counts.sum(-1, keepdims=True)
    return np.divide(counts * counts.shape[-1], total, out=np.zeros_like(counts), where=total > 0)


def plot_load_heatmap(
    history: Mapping[int, np.ndarray], path: Path | str, title: str = "Expert load per layer"
) -> Path:
    """PNG heat map of `load_heatmap_figure` at `path`."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    load_heatmap_figure(history, title).savefig(path)
    return path


def load_heatmap_figure(history: Mapping[int, np.ndarray], title: str = "Expert load per layer"):
    """Heat map (a matplotlib Figure): one panel per layer, steps across, experts down, colour = load /
    fair share (blue under-used, white fair, red overloaded; diverging on a log scale so 0.25x and 4x
    look alike)."""
    from matplotlib.colors import LogNorm
    from matplotlib.figure import Figure
    from matplotlib.ticker import MaxNLocator

    if not history:
        raise ValueError("plot_load_heatmap: empty history")
    steps = np.array(sorted(history))
    loads = load_factors(np.stack([history[s] for s in steps]))  # [S, L, E]
    _, num_layers, num_experts = loads.shape
    vmax = max(4.0, float(loads.max()))
    norm = LogNorm(vmin=1 / vmax, vmax=vmax)
    ncols = min(num_layers, 4)
    nrows = math.ceil(num_layers / ncols)
    fig = Figure(figsize=(3.2 * ncols + 1.0, 2.3 * nrows + 0.7), dpi=110, layout="constrained")
    axes = fig.subplots(nrows, ncols, squeeze=False, sharex=True, sharey=True)
    edges = _step_edges(steps)
    mesh = None
    for layer, ax in enumerate(axes.flat):
        if layer >= num_layers:
            ax.set_visible(False)
            continue
        # idle experts (0x) are drawn at the bottom of the scale instead of vanishing from the log norm
        mesh = ax.pcolormesh(
            edges,
            np.arange(num_experts + 1) - 0.5,
            np.clip(loads[:, layer, :].T, 1 / vmax, None),
            cmap="RdBu_r",
            norm=norm,
            shading="flat",
        )
        ax.set_title(f"layer {layer}", fontsize=9, loc="left")
        ax.tick_params(labelsize=7)
        if layer % ncols == 0:
            ax.set_ylabel("expert", fontsize=8)
        if layer >= num_layers - ncols:
            ax.set_xlabel("step", fontsize=8)
        ax.xaxis.set_major_locator(MaxNLocator(nbins=5, integer=True))
        ax.yaxis.set_major_locator(MaxNLocator(nbins=6, integer=True))
    bar = fig.colorbar(mesh, ax=axes, shrink=0.9, aspect=min(30, 10 * nrows), label="load / fair share")
    top = int(math.log2(vmax))
    ticks = [2.0**p for p in range(-top, top + 1, 1 if top <= 3 else 2)]
    bar.set_ticks(ticks, labels=[f"{t:g}x" for t in ticks])
    bar.minorticks_off()
    fig.suptitle(title, fontsize=11)
    return fig


def _step_edges(steps: np.ndarray) -> np.ndarray:
    """Cell edges for intervals ending at `steps` (each interval covers (previous step, step])."""
    if len(steps) == 1:
        return np.array([max(0, steps[0] - 1), steps[0]], dtype=np.float64)
    first = steps[0] - (steps[1] - steps[0])
    if first < 0 < steps[0]:
        first = 0
    return np.concatenate([[first], steps]).astype(np.float64)
