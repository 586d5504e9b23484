"""The unbiased pass@k estimator of Chen et al. 2021 ("Evaluating Large Language Models Trained on Code").

With n samples of a problem of which c pass, pass@k = 1 - C(n-c, k) / C(n, k): the chance that k samples
drawn without replacement from the n hold at least one that passes. The binomials overflow floats for the
n of real evaluations (n = 200), so it is computed as the paper's numerically stable product,
C(n-c, k) / C(n, k) = prod_{i=n-c+1}^{n} (1 - k / i). Own code: five lines, no dependency (human-eval's
numpy version is the same formula).
"""

from __future__ import annotations

import math
from collections.abc import Iterable


def pass_at_k(n: int, c: int, k: int) -> float:
    """Unbiased pass@k of one problem with n samples, c of them correct (1 <= k <= n, 0 <= c <= n)."""
    for name, value in (("n", n), ("c", c), ("k", k)):
        if isinstance(value, bool) or not isinstance(value, int):
            raise TypeError(f"pass@k: {name} must be an int, got {value!r}")
    if not 0 <= c <= n:
        raise ValueError(f"pass@k: need 0 <= c <= n, got n={n}, c={c}")
    if not 1 <= k <= n:
        raise ValueError(f"pass@k: need 1 <= k <= n (k samples drawn from n), got n={n}, k={k}")
    if n - c < k:  # every draw of k holds a correct sample
        return 1.0
    return 1.0 - math.prod(1.0 - k / i for i in range(n - c + 1, n + 1))


def mean_pass_at_k(counts: Iterable[tuple[int, int]], k: int) -> float:
    """pass@k of a suite: the mean over problems of pass_at_k(n, c, k), counts = (n, c) per problem."""
    values = [pass_at_k(n, c, k) for n, c in counts]
    if not values:
        raise ValueError("pass@k: no problems")
    return sum(values) / len(values)


__all__ = ["mean_pass_at_k", "pass_at_k"]
