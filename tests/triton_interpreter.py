"""Running a test file's kernel checks on a CPU under Triton's interpreter (test_moe_decode.py,
test_triton_moe_train.py, test_triton_rmsnorm.py, test_loss.py).

The interpreter has to be chosen before Triton is imported, so each file runs itself as a subprocess with
TRITON_INTERPRET=1 and its `__main__` block does the checks, exiting non-zero when one fails.
"""

from __future__ import annotations

import importlib.util
import os
import subprocess
import sys
from pathlib import Path

import pytest

needs_triton = pytest.mark.skipif(importlib.util.find_spec("triton") is None,
                                  reason="needs triton (its CPU interpreter)")


def run_under_interpreter(test_file: str, timeout: int = 900) -> None:
    """`python test_file` with TRITON_INTERPRET=1 and src/ and tests/ importable; fails with its output."""
    tests = Path(__file__).resolve().parent
    env = {**os.environ, "TRITON_INTERPRET": "1"}
    env["PYTHONPATH"] = os.pathsep.join(p for p in (str(tests.parent / "src"), str(tests), env.get("PYTHONPATH")) if p)
    done = subprocess.run([sys.executable, test_file], check=False, env=env, capture_output=True, text=True,
                          timeout=timeout)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]


def run_interpreter_cases(cases) -> int:
    """A test file's `__main__` under the interpreter: runs its (name, thunk -> result dict) cases, prints each
    result, and returns the exit status (1 if any result is not ok)."""
    failed = []
    for name, case in cases:
        result = case()
        print(f"{name}: {result}", flush=True)
        if not result["ok"]:
            failed.append(name)
    return 1 if failed else 0
