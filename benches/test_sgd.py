"""One ``step()`` of ferroptim.SGD vs torch.optim.SGD (lr 0.01, momentum 0.9): fused,
foreach, for-loop, default. Cases: see ``harness.CASES``.
"""

from __future__ import annotations

import pytest
from harness import SUITES, bench_params

SUITE = SUITES["sgd"]


@pytest.mark.parametrize(("case", "contender"), bench_params(SUITE))
def test_sgd_step(step_benchmark, case: str, contender: str) -> None:
    step_benchmark(SUITE, case, contender)
