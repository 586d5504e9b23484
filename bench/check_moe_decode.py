"""GPU self-check of the MoE decode kernels (model/triton_moe_decode.py) on the gpt-oss-20b expert shape:
correctness first, then time against grouped_mm on bf16 experts and the bytes floor. One device call:

    python bench/check_moe_decode.py --out results.jsonl            # ~2-3 min on an H100, compiles included
    python bench/check_moe_decode.py --no-sweep                     # skip the tile-size sweep

Records (JSON lines, printed and appended to --out):
- `env`, `ceiling` (copy bandwidth: 2 x bytes / time of a 2 GiB device copy).
- `check`: tests/test_moe_decode.py's comparisons on E=32, H=I=2880, top-4, LoRA r16: moe_decode vs the
  float32 reference for mxfp4 / fp8 / bf16 at 4, 64 and 256 rows (default tiles), both inner products
  forced at 64 rows, few experts hit with repeats, no LoRA; `route_plan` exact at 256 rows; and
  `module`: GroupedExperts (MXFP4 + LoRA) under no_grad (decode path) vs with autograd (grouped path).
- `time` per format and rows (T tokens x 4): one layer's experts per call, in a CUDA graph (as the rollout
  engine runs them) cycling over 4 layers' weights so that no call finds its weights in L2:
  `kernel_us` (moe_decode: plan, LoRA, both projections, top-k sum; x 24 layers in
  `experts_ms_per_step_24_layers`), `kernel_no_lora_us`, `gate_up_us` / `down_us` (one projection each,
  its LoRA included), `eager_us` (moe_decode without a graph: launch-bound),
  `grouped_bf16_us` (what "merged" rollouts run: GroupedExperts' grouped path on bf16 experts without
  LoRA: sort, gathers, torch grouped_mm, SwiGLU, sums), `floor_us` (bytes of the experts the routing
  hits, in the format, plus biases, at copy bandwidth; LoRA factors apart in `lora_bytes`) and
  `fraction_of_floor` = floor_us / kernel_us.
- `sweep`: mxfp4 kernel_us for other tile sizes at each row count (to retune default_config).
- `done` with `all_ok` (every check passed).
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import sys
import time
import traceback
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "src"))
sys.path.insert(0, str(ROOT / "bench"))

from ceilings import copy_bandwidth  # bench/ceilings.py

from rustforge.model import moe
from rustforge.model import triton_moe_decode as md

E, H, I, TOP_K, LORA_R = 32, 2880, 2880, 4, 16
ROWS = (4, 64, 256)
LAYERS = 4  # weight sets cycled by the timed calls: 4 x 423 MB of MXFP4 experts, far past the 50 MB L2
BYTES_PER_WEIGHT = {"mxfp4": 17 / 32, "fp8": 1 + 4 / 128, "bf16": 2.0}
SWEEP = {
    1: [md.KernelConfig(1, 16, 128), md.KernelConfig(1, 16, 256), md.KernelConfig(1, 32, 256),
        md.KernelConfig(1, 16, 512, num_warps=8), md.KernelConfig(1, 32, 512), md.KernelConfig(16, 32, 128)],
    16: [md.KernelConfig(16, 64, 128), md.KernelConfig(16, 32, 256), md.KernelConfig(16, 16, 256),
         md.KernelConfig(32, 32, 128), md.KernelConfig(16, 32, 128, num_warps=8)],
    64: [md.KernelConfig(16, 32, 128), md.KernelConfig(32, 64, 128), md.KernelConfig(64, 64, 64),
         md.KernelConfig(32, 32, 256), md.KernelConfig(64, 32, 128, num_warps=8)],
}  # fmt: skip


def load_tests():
    spec = importlib.util.spec_from_file_location("test_moe_decode", ROOT / "tests" / "test_moe_decode.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


class Log:
    def __init__(self, path: str | None):
        self.path, self.all_ok = path, True

    def emit(self, record: dict) -> None:
        if record.get("ok") is False:
            self.all_ok = False
        line = json.dumps(record)
        print(line, flush=True)
        if self.path:
            with open(self.path, "a") as f:
                f.write(line + "\n")


# ------------------------------------------------------------------------------------------- checks
def run_checks(log: Log, tests) -> None:
    shape = {"E": E, "H": H, "I": I, "k": TOP_K}
    cases = [(fmt, rows, {}) for fmt in md.DECODE_FORMATS for rows in ROWS]
    cases += [("mxfp4", 64, {"config": tests.CONFIGS["gemv"]}), ("mxfp4", 64, {"config": tests.CONFIGS["dot"]}),
              ("mxfp4", 64, {"hit": 3, "duplicates": True}), ("mxfp4", 4, {"lora_r": 0}),
              ("fp8", 64, {"lora_r": 0})]  # fmt: skip
    for fmt, rows, extra in cases:
        kwargs = {"lora_r": LORA_R, **extra}
        name = {k: str(v) for k, v in extra.items()}
        rec = {"record": "check", "fmt": fmt, "rows": rows, **name}
        try:
            rec.update(tests.check_moe_decode("cuda", fmt, **shape, T=rows // TOP_K, **kwargs))
        except Exception as e:  # noqa: BLE001 - a failure is a result
            rec.update(ok=False, error=type(e).__name__, detail=traceback.format_exc()[-1500:])
        log.emit(rec)
    try:
        g = torch.Generator().manual_seed(0)
        ok = all(tests.check_route_plan("cuda", torch.randint(0, high, (256,), generator=g), E) for high in (E, 7))
        log.emit({"record": "check", "what": "route_plan", "rows": 256, "ok": ok})
    except Exception as e:  # noqa: BLE001
        log.emit({"record": "check", "what": "route_plan", "ok": False, "error": type(e).__name__,
                  "detail": str(e)[:500]})  # fmt: skip
    log.emit(check_module(tests))


def check_module(tests) -> dict:
    """GroupedExperts with MXFP4 experts and LoRA: decode path (no_grad) == grouped path (autograd)."""
    rec = {"record": "check", "what": "module", "fmt": "mxfp4", "rows": 64}
    try:
        gu = tests.random_weights("mxfp4", E, H, 2 * I, 0, "cuda", 10)
        dn = tests.random_weights("mxfp4", E, I, H, 0, "cuda", 11)
        module = moe.GroupedExperts.from_mxfp4(*gu.storage, gu.bias, *dn.storage, dn.bias, alpha=tests.ALPHA,
                                               limit=tests.LIMIT, dtype=torch.bfloat16)  # fmt: skip
        moe.add_expert_lora(module, LORA_R, 2 * LORA_R, list(moe.EXPERT_TARGETS))
        module = module.to(torch.bfloat16)
        with torch.no_grad():
            for proj in moe.EXPERT_TARGETS:
                getattr(module, moe.lora_param_names(proj)[1]).normal_(0, 0.3)
        hidden = torch.randn(16, H, device="cuda").to(torch.bfloat16)
        indices, weights = tests.random_routing(16, TOP_K, E, "cuda", seed=12)
        with torch.no_grad():
            rec["decode_path"] = module.decode_path_applies(hidden, indices)
            decoded = module(hidden, indices, weights)
        grouped = module(hidden, indices, weights).detach()
        rec.update(tests.errors(decoded, grouped))
        rec["ok"] = rec["ok"] and rec["decode_path"]
    except Exception as e:  # noqa: BLE001
        rec.update(ok=False, error=type(e).__name__, detail=traceback.format_exc()[-1500:])
    return rec


# ------------------------------------------------------------------------------------------- timing
def time_calls(fn, calls: int = 2 * LAYERS, replays: int = 20) -> tuple[float, float]:
    """(graph_us, eager_us) per call of fn(i), i cycling over the layers."""
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        for i in range(LAYERS):
            fn(i)  # compiles outside the capture
    torch.cuda.current_stream().wait_stream(side)
    torch.cuda.synchronize()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    for r in range(replays):
        for i in range(calls):
            fn(i)
    end.record()
    torch.cuda.synchronize()
    eager = start.elapsed_time(end) * 1e3 / (replays * calls)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        for i in range(calls):
            fn(i)
    graph.replay()
    torch.cuda.synchronize()
    start.record()
    for _ in range(replays):
        graph.replay()
    end.record()
    torch.cuda.synchronize()
    return start.elapsed_time(end) * 1e3 / (replays * calls), eager


def floor_bytes(fmt: str, hit: int) -> dict:
    gate_up = hit * (2 * I * H * BYTES_PER_WEIGHT[fmt] + 2 * I * 2)
    down = hit * (H * I * BYTES_PER_WEIGHT[fmt] + H * 2)
    lora = hit * LORA_R * (H + 2 * I + I + H) * 2
    return {"gate_up": gate_up, "down": down, "lora": lora}


def make_layers(tests, fmt: str) -> list[tuple]:
    return [(tests.random_weights(fmt, E, H, 2 * I, LORA_R, "cuda", 100 + 2 * i),
             tests.random_weights(fmt, E, I, H, LORA_R, "cuda", 101 + 2 * i)) for i in range(LAYERS)]  # fmt: skip


def grouped_bf16_layers(layers) -> list[moe.GroupedExperts]:
    """Merged mode's experts: bf16 GroupedExperts without LoRA over the same bf16 weights."""
    return [moe.GroupedExperts("bf16", gu.storage, gu.bias, dn.storage, dn.bias, alpha=1.702, limit=7.0,
                               dtype=torch.bfloat16) for gu, dn in layers]  # fmt: skip


def run_timing(log: Log, tests, bandwidth: float, formats, sweep: bool) -> None:
    bf16_layers = None
    for fmt in formats:
        layers = make_layers(tests, fmt)
        if fmt == "bf16":
            bf16_layers = layers
        for rows in ROWS:
            T = rows // TOP_K
            rec = {"record": "time", "fmt": fmt, "rows": rows, "tokens": T, "lora_r": LORA_R}
            try:
                rec.update(time_format(tests, layers, fmt, T, bandwidth))
                if fmt == "mxfp4" and sweep:
                    for config in SWEEP[min(SWEEP, key=lambda t: abs(t - T))]:
                        log.emit({"record": "sweep", "fmt": fmt, "rows": rows, **vars(config),
                                  "kernel_us": time_moe(tests, layers, T, config)[0]})  # fmt: skip
            except Exception as e:  # noqa: BLE001
                rec.update(ok=False, error=type(e).__name__, detail=traceback.format_exc()[-1500:])
            log.emit(rec)
        if fmt != "bf16":
            del layers
            torch.cuda.empty_cache()
    if bf16_layers is None:
        bf16_layers = make_layers(tests, "bf16")
    for rows in ROWS:
        rec = {"record": "time", "fmt": "bf16", "what": "grouped_mm (merged mode, no LoRA)", "rows": rows}
        try:
            rec["grouped_bf16_us"], rec["grouped_bf16_eager_us"] = time_grouped(tests, bf16_layers, rows // TOP_K)
        except Exception as e:  # noqa: BLE001
            rec.update(ok=False, error=type(e).__name__, detail=traceback.format_exc()[-1500:])
        log.emit(rec)


def inputs(tests, T: int, seed: int = 7):
    hidden = torch.randn(T, H, device="cuda").to(torch.bfloat16)
    indices, weights = tests.random_routing(T, TOP_K, E, "cuda", seed=seed)
    return hidden, indices, weights


def time_moe(tests, layers, T: int, config=None) -> tuple[float, float]:
    hidden, indices, weights = inputs(tests, T)

    def call(i):
        gu, dn = layers[i % LAYERS]
        return md.moe_decode(hidden, indices, weights, gu, dn, alpha=1.702, limit=7.0, config=config)

    return time_calls(call)


def time_format(tests, layers, fmt: str, T: int, bandwidth: float) -> dict:
    hidden, indices, weights = inputs(tests, T)
    ids = indices.reshape(-1)
    plan = md.route_plan(ids, E)
    config = md.default_config(T, fmt)
    gated = md.expert_rows(hidden, TOP_K, ids, plan, layers[0][0], config, swiglu=(1.702, 7.0))
    kernel_us, eager_us = time_moe(tests, layers, T)
    no_lora = [tuple(md.ExpertWeights(w.fmt, w.storage, w.bias, fp8_block=w.fp8_block) for w in layer)
               for layer in layers]  # fmt: skip
    kernel_no_lora_us, _ = time_moe(tests, no_lora, T)
    gate_up_us, _ = time_calls(lambda i: md.expert_rows(hidden, TOP_K, ids, plan, layers[i % LAYERS][0], config,
                                                        swiglu=(1.702, 7.0)))  # fmt: skip
    down_us, _ = time_calls(lambda i: md.expert_rows(gated, 1, ids, plan, layers[i % LAYERS][1], config,
                                                     row_weights=weights))  # fmt: skip
    hit = int(torch.unique(indices).numel())
    need = floor_bytes(fmt, hit)
    floor_us = (need["gate_up"] + need["down"]) / bandwidth * 1e6
    return {
        "experts_hit": hit, "config": vars(config), "kernel_us": kernel_us, "eager_us": eager_us,
        "kernel_no_lora_us": kernel_no_lora_us, "experts_ms_per_step_24_layers": kernel_us * 24 / 1e3,
        "gate_up_us": gate_up_us, "down_us": down_us, "floor_us": floor_us,
        "gate_up_floor_us": need["gate_up"] / bandwidth * 1e6, "down_floor_us": need["down"] / bandwidth * 1e6,
        "lora_bytes": need["lora"], "fraction_of_floor": floor_us / kernel_us,
    }  # fmt: skip


def time_grouped(tests, bf16_layers, T: int) -> tuple[float, float]:
    modules = grouped_bf16_layers(bf16_layers)
    hidden, indices, weights = inputs(tests, T)
    saved = moe.DECODE_KERNELS
    moe.DECODE_KERNELS = False  # the grouped path, as for merged mode's bf16 experts before this kernel
    try:
        with torch.no_grad():
            return time_calls(lambda i: modules[i % LAYERS](hidden, indices, weights))
    finally:
        moe.DECODE_KERNELS = saved


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", default=None)
    p.add_argument("--formats", nargs="+", default=list(md.DECODE_FORMATS), choices=list(md.DECODE_FORMATS))
    p.add_argument("--no-sweep", action="store_true")
    p.add_argument("--skip-checks", action="store_true")
    args = p.parse_args(argv)
    log = Log(args.out)
    if not torch.cuda.is_available() or md.triton is None:
        log.emit({"record": "env", "ok": False, "error": "needs CUDA and triton"})
        return 1
    import triton

    log.emit({"record": "env", "torch": torch.__version__, "triton": triton.__version__,
              "device": torch.cuda.get_device_name(),
              "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime())})  # fmt: skip
    tests = load_tests()
    started = time.perf_counter()
    if not args.skip_checks:
        run_checks(log, tests)  # not under no_grad: the module check compares with the autograd (grouped) path
    bandwidth = copy_bandwidth(torch.device("cuda"))
    log.emit({"record": "ceiling", "copy_bytes_per_s": bandwidth, "copy_tb_s": bandwidth / 1e12})
    with torch.no_grad():
        run_timing(log, tests, bandwidth, args.formats, not args.no_sweep)
    log.emit({"record": "done", "all_ok": log.all_ok, "total_s": time.perf_counter() - started})
    return 0 if log.all_ok else 1


if __name__ == "__main__":
    sys.exit(main())
