"""The benchmarks' one way to report a result: a JSON line printed and appended to the run's records file."""

from __future__ import annotations

import json


def emit(path: str, rec: dict) -> None:
    print(json.dumps(rec), flush=True)
    with open(path, "a") as f:
        f.write(json.dumps(rec) + "\n")
