"""The run report: one self-contained HTML page summarising a run directory.

`write_report(run_dir)` reads what the pipeline leaves behind and writes `run_dir/report.html`:
- per stage (every `<stage>/logs/metrics.jsonl`): summary cards, the loss curves (train, smoothed train,
  validation) over the curriculum phases (shaded by seq_len), training dynamics (lr, grad norm,
  throughput, memory, aux loss, packing), reward curves when the stage logs rewards (GRPO), and the
  expert-utilisation heat map from `<stage>/logs/expert_load.jsonl` (train/expert_monitor.py);
- an evaluation table from `run_dir/eval/*.json`;
- the exported files and their sizes under `run_dir/export/`.

Charts are matplotlib PNGs embedded as base64 data URIs, so the page is a single file that can be mailed
or attached to an issue. Own code: a static page needs no dashboard server (TensorBoard stays available
for live curves); matplotlib's object API (no pyplot) keeps rendering free of global state.
"""

from __future__ import annotations

import base64
import datetime as dt
import html
import io
import itertools
import json
import math
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

STAGE_ORDER = ("tiny_base", "lang_rust", "core_agent", "ipo", "grpo", "qat")
STAGE_TITLES = {
    "tiny_base": "Tiny base pretraining",
    "lang_rust": "Rust language SFT",
    "core_agent": "Agent SFT",
    "ipo": "Preference tuning (IPO)",
    "grpo": "Reinforcement learning (GRPO)",
    "qat": "Quantisation-aware training",
}
REPORT_FILE = "report.html"

# palette (Tailwind-like tones, readable on white)
BLUE, ORANGE, GREEN, PURPLE, GRAY, RED = "#2563eb", "#ea580c", "#16a34a", "#7c3aed", "#64748b", "#dc2626"
PHASE_FILLS = ("#eff6ff", "#fef3c7", "#ecfdf5", "#fdf2f8", "#f1f5f9", "#ede9fe")
DYNAMICS = (  # key, title, colour, log-scale
    ("lr", "learning rate", PURPLE, False),
    ("grad_norm", "gradient norm", RED, False),
    ("tok_s", "throughput (tokens/s)", GREEN, False),
    ("seq_len", "sequence length", BLUE, False),
    ("memory_gb", "peak memory (GB)", GRAY, False),
    ("aux_loss", "router aux loss", ORANGE, False),
    ("packing_efficiency", "packing efficiency", BLUE, False),
)


# ---------------------------------------------------------------------------------------- reading
@dataclass
class StageLogs:
    name: str
    train: dict[int, dict] = field(default_factory=dict)  # step -> last record of that step
    val: dict[int, dict] = field(default_factory=dict)
    skipped_lines: int = 0
    expert_history: dict | None = None  # step -> counts [L, E]
    expert_error: str = ""

    @property
    def title(self) -> str:
        return STAGE_TITLES.get(self.name, self.name.replace("_", " ").capitalize())

    def series(self, key: str, split: str = "train") -> tuple[np.ndarray, np.ndarray]:
        records = self.train if split == "train" else self.val
        pts = [(s, r[key]) for s, r in sorted(records.items()) if _is_number(r.get(key))]
        if not pts:
            return np.zeros(0), np.zeros(0)
        steps, values = zip(*pts)
        return np.asarray(steps, dtype=np.float64), np.asarray(values, dtype=np.float64)


def _is_number(v) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)


def read_stage(stage_dir: Path) -> StageLogs:
    """A stage's metrics (the last record per step and split wins, as after a resume); lines that are not
    JSON (a run killed mid-write) are counted and skipped."""
    from rustforge.train.expert_monitor import HISTORY_FILE, read_load_history  # imports torch: only when needed

    logs = StageLogs(stage_dir.name)
    with open(stage_dir / "logs" / "metrics.jsonl") as f:
        for line in f:
            if not line.strip():
                continue
            try:
                rec = json.loads(line)
                step = int(rec["step"])
            except (ValueError, KeyError, TypeError):
                logs.skipped_lines += 1
                continue
            split = rec.get("split", "train")
            if split == "val":
                logs.val[step] = rec
            else:  # other splits (e.g. "experts") add their keys to the train record of that step
                extra = rec if split == "train" else {k: v for k, v in rec.items() if k not in ("split", "time")}
                logs.train.setdefault(step, {"step": step}).update(extra)
    history = stage_dir / "logs" / HISTORY_FILE
    if history.is_file():
        try:
            logs.expert_history = read_load_history(history) or None
        except ValueError as e:
            logs.expert_error = str(e)
    return logs


def find_stages(run_dir: Path) -> list[StageLogs]:
    dirs = [d for d in run_dir.iterdir() if (d / "logs" / "metrics.jsonl").is_file()]
    order = {name: i for i, name in enumerate(STAGE_ORDER)}
    dirs.sort(key=lambda d: (order.get(d.name, len(order)), d.name))
    return [read_stage(d) for d in dirs]


# ----------------------------------------------------------------------------------------- charts
def _figure(width: float, height: float):
    from matplotlib.figure import Figure

    fig = Figure(figsize=(width, height), dpi=120, layout="constrained")
    fig.set_facecolor("white")
    return fig


def _style(ax, title: str | None = None) -> None:
    for side in ("top", "right"):
        ax.spines[side].set_visible(False)
    for side in ("left", "bottom"):
        ax.spines[side].set_color("#cbd5e1")
    ax.tick_params(colors="#475569", labelsize=8)
    ax.grid(True, color="#e2e8f0", linewidth=0.7)
    ax.set_axisbelow(True)
    if title:
        ax.set_title(title, fontsize=9.5, loc="left", color="#0f172a")


def _png(fig) -> str:
    buf = io.BytesIO()
    fig.savefig(buf, format="png", facecolor="white")
    return base64.b64encode(buf.getvalue()).decode("ascii")


def smooth(values: np.ndarray, weight: float | None = None) -> np.ndarray:
    """Debiased exponential moving average (TensorBoard's smoothing); weight grows with the series length."""
    if len(values) < 5:
        return values
    weight = weight if weight is not None else min(0.95, 1 - 5 / len(values))
    out, acc = np.empty_like(values), 0.0
    for i, v in enumerate(values):
        acc = weight * acc + (1 - weight) * v
        out[i] = acc / (1 - weight ** (i + 1))
    return out


def phases(logs: StageLogs) -> list[tuple[float, float, int]]:
    """(first step, last step, seq_len) of each run of constant seq_len in the train records."""
    steps, seq = logs.series("seq_len")
    out: list[tuple[float, float, int]] = []
    for s, n in zip(steps, seq, strict=True):
        if out and out[-1][2] == int(n):
            out[-1] = (out[-1][0], s, int(n))
        else:
            out.append((s, s, int(n)))
    return out


def _shade_phases(ax, spans: list[tuple[float, float, int]]) -> None:
    if not spans:
        return
    for i, (start, end, seq_len) in enumerate(spans):
        # a phase covers its steps: from half a step before the first to half after the last
        ax.axvspan(start - 0.5, end + 0.5, color=PHASE_FILLS[i % len(PHASE_FILLS)], zorder=0, linewidth=0)
        ax.text(
            (start + end) / 2,
            0.98,
            f"seq {_tokens(seq_len)}",
            transform=ax.get_xaxis_transform(),
            ha="center",
            va="top",
            fontsize=8,
            color="#475569",
        )


SFT_STAGES = ("tiny_base", "lang_rust", "core_agent")


def loss_chart(logs: StageLogs) -> str | None:
    steps, loss = logs.series("loss")
    vsteps, vloss = logs.series("loss", "val")
    if not len(steps) and not len(vsteps):
        return None
    fig = _figure(10, 3.6)
    ax = fig.subplots()
    _style(ax, "loss (token cross-entropy, nats)" if logs.name in SFT_STAGES else "loss")
    _shade_phases(ax, phases(logs))
    if len(steps):
        ax.plot(steps, loss, color=BLUE, alpha=0.25, linewidth=0.9, label="train (per step)")
        ax.plot(steps, smooth(loss), color=BLUE, linewidth=2.0, label="train (smoothed)")
    if len(vsteps):
        ax.plot(vsteps, vloss, color=ORANGE, linewidth=2.0, marker="o", markersize=4.5, label="validation")
    ax.set_xlabel("step", fontsize=8, color="#475569")
    values = np.concatenate([loss, vloss])
    # percentiles, not min/max: a first-step spike must not flatten the rest of the curve
    low, high = np.percentile(values, 1), np.percentile(values, 99.5)
    pad = 0.08 * max(high - low, 1e-6)
    ax.set_ylim(low - pad, high + 3 * pad)
    ax.legend(frameon=False, fontsize=8, loc="upper right", bbox_to_anchor=(1.0, 0.9))
    return _png(fig)


def constant_dynamics(logs: StageLogs) -> dict[str, float]:
    """Dynamics series that never change (a flat panel says less than one number)."""
    out = {}
    for key, title, _, _ in DYNAMICS:
        _, values = logs.series(key)
        if len(values) and np.all(values == values[0]):
            out[title] = float(values[0])
    return out


def dynamics_chart(logs: StageLogs) -> str | None:
    constant = constant_dynamics(logs)
    present = [d for d in DYNAMICS if len(logs.series(d[0])[0]) and d[1] not in constant]
    if not present:
        return None
    ncols = min(3, len(present))
    nrows = math.ceil(len(present) / ncols)
    fig = _figure(10, 2.1 * nrows)
    axes = fig.subplots(nrows, ncols, squeeze=False)
    for ax, (key, title, colour, log) in zip(axes.flat, present, strict=False):
        steps, values = logs.series(key)
        _style(ax, title)
        if key == "seq_len":
            ax.step(steps, values, where="post", color=colour, linewidth=1.8)
            ax.yaxis.set_major_formatter(_token_formatter())
        else:
            if len(values) > 20 and key in ("grad_norm", "tok_s", "aux_loss"):
                ax.plot(steps, values, color=colour, alpha=0.25, linewidth=0.8)
                values = smooth(values)
            ax.plot(steps, values, color=colour, linewidth=1.6)
        if log:
            ax.set_yscale("log")
    for ax in list(axes.flat)[len(present) :]:
        ax.set_visible(False)
    return _png(fig)


def reward_keys(logs: StageLogs) -> list[str]:
    keys = {k for r in logs.train.values() for k, v in r.items() if "reward" in k and _is_number(v)}
    return sorted(k for k in keys if not k.endswith("_std"))


def reward_chart(logs: StageLogs) -> str | None:
    keys = reward_keys(logs)
    if not keys:
        return None
    main = [k for k in keys if "/" not in k] or keys
    parts = [k for k in keys if k not in main]
    fig = _figure(10, 3.2)
    axes = fig.subplots(1, 2 if parts else 1, squeeze=False)[0]
    _style(axes[0], "reward")
    colours = [GREEN, BLUE, ORANGE, PURPLE, RED, GRAY]
    for colour, key in zip(itertools.cycle(colours), main):
        steps, values = logs.series(key)
        axes[0].plot(steps, values, color=colour, alpha=0.25, linewidth=0.8)
        axes[0].plot(steps, smooth(values), color=colour, linewidth=2.0, label=key)
        s_steps, std = logs.series(key + "_std")
        if len(std) == len(values):
            axes[0].fill_between(steps, values - std, values + std, color=colour, alpha=0.08, linewidth=0)
    axes[0].legend(frameon=False, fontsize=8)
    axes[0].set_xlabel("step", fontsize=8, color="#475569")
    if parts:
        _style(axes[1], "reward components (smoothed)")
        for colour, key in zip(itertools.cycle(colours), parts):
            steps, values = logs.series(key)
            axes[1].plot(steps, smooth(values), color=colour, linewidth=1.6, label=key.split("/", 1)[1])
        axes[1].legend(frameon=False, fontsize=8, ncols=2)
        axes[1].set_xlabel("step", fontsize=8, color="#475569")
    return _png(fig)


def expert_chart(logs: StageLogs) -> str | None:
    if not logs.expert_history:
        return None
    from rustforge.train.expert_monitor import load_heatmap_figure

    fig = load_heatmap_figure(logs.expert_history, title="expert load per layer (x fair share)")
    return _png(fig)


def _tokens(n: float) -> str:
    n = int(n)
    return f"{n // 1024}K" if n >= 1024 and n % 1024 == 0 else str(n)


def _token_formatter():
    from matplotlib.ticker import FuncFormatter

    return FuncFormatter(lambda v, _pos: _tokens(v))


# ------------------------------------------------------------------------------------------ tables
def _fmt(v) -> str:
    if isinstance(v, bool) or v is None:
        return html.escape(str(v))
    if isinstance(v, int):
        return f"{v:,}"
    if isinstance(v, float):
        if not math.isfinite(v):
            return str(v)
        if v != 0 and (abs(v) < 1e-3 or abs(v) >= 1e6):
            return f"{v:.3g}"
        return f"{v:,.4g}" if abs(v) >= 1 else f"{v:.4f}".rstrip("0").rstrip(".")
    return html.escape(str(v))


def _flatten(d: dict, prefix: str = "") -> dict:
    out = {}
    for k, v in d.items():
        key = f"{prefix}{k}"
        if isinstance(v, dict):
            out.update(_flatten(v, key + "."))
        elif not isinstance(v, list):
            out[key] = v
    return out


def _table(header: list[str], rows: list[list[str]], numeric_from: int = 1) -> str:
    head = "".join(
        f"<th{' class=num' if i >= numeric_from else ''}>{html.escape(h)}</th>" for i, h in enumerate(header)
    )
    body = "".join(
        "<tr>" + "".join(f"<td{' class=num' if i >= numeric_from else ''}>{c}</td>" for i, c in enumerate(r)) + "</tr>"
        for r in rows
    )
    return f"<div class=table-wrap><table><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table></div>"


def eval_section(run_dir: Path) -> str:
    files = sorted((run_dir / "eval").glob("*.json")) if (run_dir / "eval").is_dir() else []
    if not files:
        return ""
    summary: list[tuple[str, dict]] = []
    extra = []
    for path in files:
        try:
            data = json.loads(path.read_text())
        except (OSError, ValueError) as e:
            extra.append(f"<p class=warn>{html.escape(path.name)}: unreadable ({html.escape(str(e))})</p>")
            continue
        if isinstance(data, dict):
            summary.append((path.stem, _flatten(data)))
        elif isinstance(data, list) and data and all(isinstance(r, dict) for r in data):
            rows = [_flatten(r) for r in data]
            cols = list(dict.fromkeys(k for r in rows for k in r))
            extra.append(
                f"<h3>{html.escape(path.stem)}</h3>"
                + _table(cols, [[_fmt(r.get(c, "")) for c in cols] for r in rows], numeric_from=1)
            )
        else:
            extra.append(f"<p class=warn>{html.escape(path.name)}: expected a JSON object or a list of objects</p>")
    parts = []
    if summary:
        cols = list(dict.fromkeys(k for _, d in summary for k in d))
        rows = [
            [
                f"<b>{html.escape(name)}</b>",
                *(_fmt(d.get(c, "")) if c in d else "<span class=dim>–</span>" for c in cols),
            ]
            for name, d in summary
        ]
        parts.append(_table(["evaluation", *cols], rows))
    return _section("eval", "Evaluation", "".join(parts + extra), f"from {html.escape(str(run_dir / 'eval'))}/*.json")


def _size(n: int) -> str:
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if n < 1024 or unit == "TiB":
            return f"{n:,.0f} {unit}" if unit == "B" else f"{n:,.1f} {unit}"
        n /= 1024
    return ""


def export_section(run_dir: Path) -> str:
    root = run_dir / "export"
    if not root.is_dir():
        return ""
    files = sorted(p for p in root.rglob("*") if p.is_file())
    total = sum(p.stat().st_size for p in files)
    biggest = max((p.stat().st_size for p in files), default=1) or 1
    rows = []
    for p in files:
        size = p.stat().st_size
        bar = f"<div style='text-align:left'><span class=bar style='width:{max(1.0, 100 * size / biggest):.1f}%'></span></div>"
        rows.append([html.escape(str(p.relative_to(root))), f"{_size(size)}", bar])
    rows.append(["<b>total</b>", f"<b>{_size(total)}</b>", ""])
    body = _table(["file", "size", ""], rows) if files else "<p class=dim>empty</p>"
    return _section("export", "Export", body, f"{len(files)} files under {html.escape(str(root))}")


# ------------------------------------------------------------------------------------------ stages
def stage_cards(logs: StageLogs) -> str:
    cards = []
    steps, loss = logs.series("loss")
    vsteps, vloss = logs.series("loss", "val")
    if len(steps):
        cards.append(("steps", f"{int(steps[-1]):,}", f"{len(phases(logs)) or 1} phase(s)"))
        cards.append(("train loss", f"{smooth(loss)[-1]:.3f}", f"from {loss[0]:.3f}"))
    if len(vsteps):
        change = (vloss[-1] - vloss[0]) / vloss[0] if vloss[0] else 0.0
        trend = "good" if change < 0 else "bad" if change > 0 else ""
        cards.append(("val loss", f"{vloss[-1]:.3f}", f"<span class={trend}>{change:+.1%}</span> from {vloss[0]:.3f}"))
        cards.append(
            ("val perplexity", f"{math.exp(min(vloss[-1], 50)):.1f}", f"from {math.exp(min(vloss[0], 50)):.1f}")
        )
    for key, label, unit in (("tok_s", "throughput", "tokens/s (median)"), ("memory_gb", "peak memory", "GB")):
        _, v = logs.series(key)
        if len(v):
            value = np.median(v) if key == "tok_s" else v.max()
            cards.append((label, f"{value:,.0f}" if value >= 100 else f"{value:.1f}", unit))
    for key in reward_keys(logs)[:1]:
        _, v = logs.series(key)
        cards.append((key, f"{smooth(v)[-1]:.3f}", f"from {v[0]:.3f}"))
    _, alarms = logs.series("experts/alarms")
    if len(alarms):
        n = int(alarms.max())
        cards.append(
            ("expert alarms", str(n), "<span class=bad>collapse</span>" if n else "<span class=good>healthy</span>")
        )
    times = [r["time"] for r in logs.train.values() if _is_number(r.get("time"))]
    if len(times) > 1:
        cards.append(("wall time", _duration(max(times) - min(times)), "first to last step"))
    return (
        "<div class=cards>"
        + "".join(
            f"<div class=card><div class=label>{html.escape(a)}</div><div class=value>{b}</div><div class=sub>{c}</div></div>"
            for a, b, c in cards
        )
        + "</div>"
    )


def _duration(seconds: float) -> str:
    seconds = int(seconds)
    h, m = seconds // 3600, seconds % 3600 // 60
    return f"{h}h {m:02d}m" if h else f"{m}m {seconds % 60:02d}s"


def _img(b64: str | None, alt: str) -> str:
    return f"<figure><img src='data:image/png;base64,{b64}' alt='{html.escape(alt)}'></figure>" if b64 else ""


def stage_section(logs: StageLogs) -> str:
    body = [stage_cards(logs)]
    body.append(_img(loss_chart(logs), f"{logs.name} loss"))
    rewards = reward_chart(logs)
    if rewards:
        body.append("<h3>Rewards</h3>" + _img(rewards, f"{logs.name} rewards"))
    dynamics = _img(dynamics_chart(logs), f"{logs.name} dynamics")
    constant = constant_dynamics(logs)
    if constant:
        dynamics += (
            "<p class=note>constant: " + ", ".join(f"{html.escape(k)} {_fmt(v)}" for k, v in constant.items()) + "</p>"
        )
    body.append("<h3>Training dynamics</h3>" + (dynamics or "<p class=dim>no data</p>"))
    experts = expert_chart(logs)
    if experts:
        body.append(
            "<h3>Expert utilisation</h3><p class=note>Tokens routed to each expert per monitoring interval, as a multiple "
            "of its fair share: white is even, red overloaded, dark blue idle. A red band with blue around it is a "
            "collapsing layer.</p>" + _img(experts, f"{logs.name} expert load")
        )
    elif logs.expert_error:
        body.append(f"<p class=warn>{html.escape(logs.expert_error)}</p>")
    if logs.skipped_lines:
        body.append(f"<p class=warn>{logs.skipped_lines} unreadable line(s) in metrics.jsonl skipped</p>")
    return _section(logs.name, logs.title, "".join(body), html.escape(logs.name))


def _section(anchor: str, title: str, body: str, subtitle: str = "") -> str:
    sub = f"<span class=subtitle>{subtitle}</span>" if subtitle else ""
    return f"<section id='{html.escape(anchor)}'><h2>{html.escape(title)}{sub}</h2>{body}</section>"


# -------------------------------------------------------------------------------------------- page
def _config_chips(run_dir: Path) -> str:
    path = run_dir / "config.yaml"
    if not path.is_file():
        return ""
    try:
        import yaml

        cfg = yaml.safe_load(path.read_text()) or {}
    except Exception:  # a report must not fail on a config it only decorates with
        return ""
    model, lora = cfg.get("model") or {}, cfg.get("lora") or {}
    chips = [
        ("model", model.get("path") or model.get("preset")),
        ("experts", model.get("expert_format")),
        ("attention", model.get("attention")),
        ("LoRA r", lora.get("r")),
        ("aux coef", model.get("router_aux_loss_coef")),
    ]
    return "".join(
        f"<span class=chip><b>{html.escape(k)}</b> {html.escape(str(v))}</span>" for k, v in chips if v is not None
    )


CSS = """
:root { --ink:#0f172a; --muted:#64748b; --line:#e2e8f0; --bg:#f8fafc; --accent:#2563eb; }
* { box-sizing: border-box; }
body { margin:0; font: 15px/1.5 system-ui, -apple-system, "Segoe UI", "DejaVu Sans", sans-serif; color:var(--ink); background:var(--bg); }
header { background: linear-gradient(120deg, #1e3a8a, #2563eb 55%, #0ea5e9); color:white; padding: 28px 0 22px; }
.wrap { max-width: 1120px; margin: 0 auto; padding: 0 24px; }
header h1 { margin:0 0 4px; font-size: 26px; letter-spacing: -0.01em; }
header .meta { opacity: .85; font-size: 13px; }
.chip { display:inline-block; margin: 10px 8px 0 0; padding: 3px 10px; border-radius: 999px; background: rgba(255,255,255,.16); font-size: 12.5px; }
nav { position: sticky; top: 0; z-index: 5; background: rgba(248,250,252,.92); backdrop-filter: blur(6px); border-bottom: 1px solid var(--line); }
nav a { display:inline-block; padding: 10px 12px 9px; color: var(--muted); text-decoration:none; font-size: 13.5px; border-bottom: 2px solid transparent; }
nav a:hover { color: var(--accent); border-color: var(--accent); }
section { background:white; border:1px solid var(--line); border-radius: 14px; padding: 22px 24px 10px; margin: 22px 0; box-shadow: 0 1px 2px rgba(15,23,42,.04); }
h2 { margin: 0 0 14px; font-size: 20px; display:flex; align-items: baseline; gap: 12px; }
.subtitle { font-size: 12.5px; font-weight: 400; color: var(--muted); font-family: ui-monospace, "DejaVu Sans Mono", monospace; }
h3 { font-size: 14px; text-transform: uppercase; letter-spacing: .06em; color: var(--muted); margin: 22px 0 6px; }
.cards { display:grid; grid-template-columns: repeat(auto-fill, minmax(150px, 1fr)); gap: 10px; margin-bottom: 8px; }
.card { border:1px solid var(--line); border-radius: 10px; padding: 10px 12px; background: linear-gradient(#fff, #fbfdff); }
.card .label { font-size: 12px; color: var(--muted); }
.card .value { font-size: 22px; font-weight: 650; font-variant-numeric: tabular-nums; }
.card .sub { font-size: 12px; color: var(--muted); }
.good { color: #16a34a; font-weight: 600; } .bad { color: #dc2626; font-weight: 600; }
figure { margin: 8px 0 14px; } figure img { width: 100%; height: auto; display:block; border-radius: 8px; }
.note { color: var(--muted); font-size: 13px; margin: 0 0 4px; }
.warn { color: #b45309; background:#fffbeb; border:1px solid #fde68a; border-radius:8px; padding:6px 10px; font-size:13px; }
.dim { color: var(--muted); }
.table-wrap { overflow-x:auto; margin-bottom: 14px; }
table { border-collapse: collapse; width: 100%; font-size: 13.5px; }
th { text-align:left; font-weight:600; color: var(--muted); border-bottom: 2px solid var(--line); padding: 7px 10px; white-space: nowrap; }
td { border-bottom: 1px solid var(--line); padding: 7px 10px; }
tr:hover td { background: #f8fafc; }
.num { text-align: right; font-variant-numeric: tabular-nums; }
.bar { display:inline-block; height: 8px; border-radius: 4px; background: linear-gradient(90deg, #93c5fd, #2563eb); min-width: 2px; }
td:last-child { width: 35%; }
footer { color: var(--muted); font-size: 12px; text-align:center; padding: 8px 0 30px; }
"""


def render_report(run_dir: Path) -> str:
    """The report's HTML for `run_dir`."""
    run_dir = Path(run_dir)
    if not run_dir.is_dir():
        raise FileNotFoundError(f"report: run directory {run_dir} does not exist")
    stages = find_stages(run_dir)
    sections = [stage_section(s) for s in stages]
    if not stages:
        sections.append(
            _section(
                "none",
                "No training logs yet",
                f"<p class=dim>No <code>&lt;stage&gt;/logs/metrics.jsonl</code> under {html.escape(str(run_dir))}.</p>",
            )
        )
    links = [(s.name, s.title) for s in stages]
    for anchor, title, section in (
        ("eval", "Evaluation", eval_section(run_dir)),
        ("export", "Export", export_section(run_dir)),
    ):
        if section:
            sections.append(section)
            links.append((anchor, title))
    nav = "".join(f"<a href='#{html.escape(a)}'>{html.escape(t)}</a>" for a, t in links)
    now = dt.datetime.now().strftime("%Y-%m-%d %H:%M")
    name = html.escape(run_dir.resolve().name)
    return f"""<!doctype html>
<html lang="en"><head><meta charset="utf-8"><meta name="viewport" content="width=device-width, initial-scale=1">
<title>rustforge · {name}</title><style>{CSS}</style></head>
<body>
<header><div class=wrap><h1>rustforge run · {name}</h1>
<div class=meta>{html.escape(str(run_dir))} · {len(stages)} stage(s) · generated {now}</div>{_config_chips(run_dir)}</div></header>
<nav><div class=wrap>{nav}</div></nav>
<main class=wrap>{"".join(sections)}</main>
<footer>rustforge · curves from &lt;stage&gt;/logs/metrics.jsonl · live curves: tensorboard --logdir {html.escape(str(run_dir))}</footer>
</body></html>
"""


def write_report(run_dir: Path | str, out: Path | str | None = None) -> Path:
    """Write the report (default `run_dir/report.html`) and return its path."""
    run_dir = Path(run_dir)
    text = render_report(run_dir)
    path = Path(out) if out else run_dir / REPORT_FILE
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text, encoding="utf-8")
    return path
