"""One ``step(closure)`` of ferroptim.LBFGS vs torch.optim.LBFGS: a small MLP (Python
overhead) and a 10M-parameter least-squares problem (memory-bound vector work). Cases:
see ``harness.CASES`` (``mlp``, ``lsq10M``).
"""

from __future__ import annotations

import pytest
from harness import SUITES, bench_params

SUITE = SUITES["lbfgs"]


@pytest.mark.parametrize(("case", "contender"), bench_params(SUITE))
def test_lbfgs_step(step_benchmark, case: str, contender: str) -> None:
    step_benchmark(SUITE, case, contender)
