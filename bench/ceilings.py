"""The measured ceilings the benchmarks compare against: device copy bandwidth (the memory-bandwidth floor of
decode) and bf16 matmul throughput (the denominator of MFU). One definition for bench/train_step.py,
bench/rollout.py and bench/check_moe_decode.py."""

from __future__ import annotations

import time

import torch


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def copy_bandwidth(device: torch.device, gib: float = 2.0) -> float:
    """Bytes moved per second (each byte read once and written once) by a large device copy."""
    x = torch.empty(int(gib * 2**30), dtype=torch.uint8, device=device)
    y = torch.empty_like(x)
    for _ in range(2):
        y.copy_(x)
    _sync(device)
    t = time.perf_counter()
    for _ in range(5):
        y.copy_(x)
    _sync(device)
    return 2 * x.numel() * 5 / (time.perf_counter() - t)


def bf16_matmul_tflops(device: torch.device, n: int = 8192) -> float:
    """Dense bf16 n x n x n matmul throughput, TFLOP/s."""
    a = torch.randn(n, n, device=device, dtype=torch.bfloat16)
    b = torch.randn(n, n, device=device, dtype=torch.bfloat16)
    for _ in range(3):
        a @ b
    _sync(device)
    t = time.perf_counter()
    for _ in range(10):
        a @ b
    _sync(device)
    return 2 * n**3 * 10 / (time.perf_counter() - t) / 1e12
