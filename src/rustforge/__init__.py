"""rustforge: GPT-OSS into a Rust coding agent (see README.md and docs/STATUS.md)."""

import os

# libgomp's worker threads spin while they wait; with any other process on a 2-core machine that made CPU
# training 10x slower (measured: 15 s vs 1.4 s a tiny step). Must be set before torch is imported.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
